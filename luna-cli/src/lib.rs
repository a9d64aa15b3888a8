//! The `luna` command line as a library: `bin/luna.rs` only parses and calls [`run`].
//!
//! Every verb checks what it can locally (names, hostlists, MACs, CIDRs, whole objects against
//! the model) before it sends anything, so bad input costs no request and changes nothing.

pub mod args;
pub mod client;
pub mod commands;
pub mod import;
pub mod lchroot;
pub mod power;
pub mod progress;
pub mod render;
pub mod text;
pub mod tree;
pub mod watch;

use std::io::Write;

use clap::CommandFactory;

pub use args::Cli;

/// Runs one parsed command line, printing its output to stdout.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // No connection is made until a verb sends a request, so generated files need no server.
    let client = client::Client::from_args(&cli.global);
    let mut ctx = commands::Ctx::new(client, std::io::stdin());
    ctx.dispatch(&cli.command)?;
    let out = ctx.out.into_bytes();
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&out).and_then(|()| stdout.flush()) {
        // `luna node list | head` is not an error.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(anyhow::anyhow!("cannot write to stdout: {e}")),
        _ => Ok(()),
    }
}

/// The completion script for `shell`, generated from the clap definition.
pub fn completions(shell: args::CompletionShell) -> Vec<u8> {
    let shell = match shell {
        args::CompletionShell::Bash => clap_complete::Shell::Bash,
        args::CompletionShell::Zsh => clap_complete::Shell::Zsh,
        args::CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "luna", &mut buf);
    buf
}

/// Writes `luna.1` and a page per subcommand (`luna-node-add.1`...) into `dir`.
pub fn manpages(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create man page directory '{}': {e}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .map_err(|e| anyhow::anyhow!("cannot write man pages into '{}': {e}", dir.display()))
}

/// `lpower`'s `main`: parse, run, print one line per node; exit 0 only if every node succeeded.
pub fn lpower_main<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::Parser;
    let cli = match args::LpowerCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { std::process::ExitCode::FAILURE } else { std::process::ExitCode::SUCCESS };
        }
    };
    match power::run(&cli) {
        Ok((out, all_ok)) => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(out.as_bytes()).and_then(|()| stdout.flush());
            if all_ok {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// What `main` does: parse, run, print `error: ...` and return the exit code (usage errors
/// exit 1 like every other error).
pub fn main_with_args<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::Parser;
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { std::process::ExitCode::FAILURE } else { std::process::ExitCode::SUCCESS };
        }
    };
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_cover_the_verbs() {
        for shell in [args::CompletionShell::Bash, args::CompletionShell::Zsh, args::CompletionShell::Fish] {
            let s = String::from_utf8(completions(shell)).unwrap();
            for word in ["network", "reserve", "show-secrets", "bmc-network"] {
                assert!(s.contains(word), "{shell:?} lacks {word}");
            }
        }
    }

    #[test]
    fn man_pages_for_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let cli = <Cli as clap::Parser>::try_parse_from(["luna", "manpages", dir.path().to_str().unwrap()]).unwrap();
        run(cli).unwrap();
        for page in ["luna.1", "luna-node.1", "luna-node-add.1", "luna-network-reserve.1", "luna-cluster-init.1"] {
            let text = std::fs::read_to_string(dir.path().join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
            assert!(text.contains(".TH"), "{page}");
        }
        let add = std::fs::read_to_string(dir.path().join("luna-node-add.1")).unwrap();
        assert!(add.contains("group"), "node add page lacks --group");
    }
}
