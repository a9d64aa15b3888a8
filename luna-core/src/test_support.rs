//! Gated tests that say when they skip (feature `test-support`, enabled only by the test
//! crates: never part of a shipped binary).
//!
//! A test that needs root, a network namespace, qemu or MongoDB runs only when its variable is
//! set (`LUNA_TEST_PRIVILEGED=1`, `LUNA_TEST_MONGO=1`, ...). When it is not, the test returns
//! early and counts as passed, so every skip goes through [`skip`]: it writes
//! `SKIPPED: <test>: <reason>` straight to the process's stderr (not through the print macros,
//! which `cargo test` captures, so the line shows in a plain `cargo test` too) and appends the
//! same line to the file named by `LUNA_TEST_SKIP_LOG` when that is set. `scripts/test.sh`
//! points it at a fresh file and fails when a gated test skipped there.
//!
//! One helper per test crate wraps these (`luna_tests::privileged()`,
//! `image_support::privileged()`, `conformance::mongo_gate()`, ...); tests call those.

use std::io::Write;

/// The variable naming the file every skip is appended to.
pub const SKIP_LOG_ENV: &str = "LUNA_TEST_SKIP_LOG";

/// True when the gate variable `var` is `1`; otherwise reports the skip (see [`skip`]) and
/// returns false, so a test can `if !gate("LUNA_TEST_PRIVILEGED") { return; }`.
pub fn gate(var: &str) -> bool {
    if std::env::var(var).as_deref() == Ok("1") {
        return true;
    }
    skip(&format!("set {var}=1"));
    false
}

/// Reports that the running test skipped its body for `reason`: on stderr, uncaptured, and in
/// the `LUNA_TEST_SKIP_LOG` file. Panics when the log is set but cannot be written (a skip
/// nobody can see is what this is here to prevent).
pub fn skip(reason: &str) {
    let line = format!("SKIPPED: {}: {reason}\n", test_name());
    // Straight to the file descriptor: libtest captures only the print macros.
    let _ = std::io::stderr().write_all(line.as_bytes());
    if let Some(path) = std::env::var_os(SKIP_LOG_ENV).filter(|p| !p.is_empty()) {
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            // One write of one line: lines of parallel test processes do not interleave.
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!("cannot append to {SKIP_LOG_ENV} file {}: {e}", std::path::Path::new(&path).display());
        }
    }
}

/// `<test binary>::<test path>`: libtest runs each test on a thread named after it; the
/// binary's name (without cargo's hash) tells which crate and target it belongs to.
fn test_name() -> String {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unnamed test");
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .map(|n| strip_hash(&n).to_string())
        .unwrap_or_default();
    if binary.is_empty() {
        test.to_string()
    } else {
        format!("{binary}::{test}")
    }
}

/// `cli-0123456789abcdef` → `cli` (cargo's `-<16 hex digits>` suffix of test binaries).
fn strip_hash(name: &str) -> &str {
    match name.rsplit_once('-') {
        Some((stem, hash)) if hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => stem,
        _ => name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_drop_the_cargo_hash() {
        assert_eq!(strip_hash("cli-0123456789abcdef"), "cli");
        assert_eq!(strip_hash("luna_server-ffffffffffffffff"), "luna_server");
        assert_eq!(strip_hash("luna-server"), "luna-server");
        assert_eq!(strip_hash("a-0123"), "a-0123");
    }

    #[test]
    fn a_closed_gate_is_logged_with_the_test_name_and_an_open_one_is_not() {
        // The variables are this test's own: no other test reads them.
        let dir = std::env::temp_dir().join(format!("luna-skip-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips");
        // No other test of this binary reads LUNA_TEST_SKIP_LOG or the gate variables here.
        std::env::set_var(SKIP_LOG_ENV, &log);
        std::env::set_var("LUNA_TEST_GATE_OPEN_FOR_THIS_TEST", "1");
        assert!(gate("LUNA_TEST_GATE_OPEN_FOR_THIS_TEST"));
        assert!(!log.exists(), "an open gate logged a skip");
        assert!(!gate("LUNA_TEST_GATE_CLOSED_FOR_THIS_TEST"));
        skip("no widget here");
        std::env::remove_var(SKIP_LOG_ENV);
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let name = "test_support::tests::a_closed_gate_is_logged_with_the_test_name_and_an_open_one_is_not";
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines.iter().all(|l| l.starts_with("SKIPPED: luna_core::")), "{text}");
        assert!(lines[0].ends_with(&format!("{name}: set LUNA_TEST_GATE_CLOSED_FOR_THIS_TEST=1")), "{text}");
        assert!(lines[1].ends_with(&format!("{name}: no widget here")), "{text}");
    }
}
