//! Child processes that die with the test, and their output captured as searchable lines.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::{logs_dir, HarnessError, Result};

/// How many lines error messages quote from the end of a transcript.
const TAIL_LINES: usize = 40;

struct State {
    lines: Vec<String>,
    attached: usize,
    open: usize,
}

struct Shared {
    name: String,
    log_path: PathBuf,
    log: Mutex<File>,
    started: Instant,
    verbose: bool,
    state: Mutex<State>,
    cond: Condvar,
}

/// The line-by-line transcript of one or more output streams (a process's stdout and stderr, a
/// VM's serial console). Every line is kept in memory for searching and appended to a log file
/// under `tests/work/logs/`, prefixed with the seconds since the transcript began. Control characters and terminal escape sequences are removed.
/// Cloning gives another handle on the same transcript.
#[derive(Clone)]
pub struct Lines {
    shared: Arc<Shared>,
}

static LOG_SEQ: AtomicU32 = AtomicU32::new(0);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // a panicking reader thread must not hide the output from the test
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Lines {
    /// An empty transcript logging to `<logs>/<name>-<pid>-<seq>.log`.
    pub fn new(name: &str) -> Result<Lines> {
        let safe: String =
            name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
        let seq = LOG_SEQ.fetch_add(1, Ordering::Relaxed);
        let log_path = logs_dir()?.join(format!("{safe}-{}-{seq}.log", std::process::id()));
        let log = File::create(&log_path).map_err(|e| HarnessError::io(format!("create {}", log_path.display()), e))?;
        Ok(Lines {
            shared: Arc::new(Shared {
                name: name.to_string(),
                log_path,
                log: Mutex::new(log),
                started: Instant::now(),
                verbose: std::env::var("LUNA_TEST_VERBOSE").as_deref() == Ok("1"),
                state: Mutex::new(State { lines: Vec::new(), attached: 0, open: 0 }),
                cond: Condvar::new(),
            }),
        })
    }

    /// Reads `reader` to its end on a background thread, adding its lines. `stream` labels the
    /// lines in the log file (e.g. "stderr"; empty for none).
    pub fn attach<R: Read + Send + 'static>(&self, reader: R, stream: &'static str) {
        {
            let mut st = lock(&self.shared.state);
            st.attached += 1;
            st.open += 1;
        }
        let this = self.clone();
        let thread_name = format!("lines-{}", self.shared.name);
        let spawned = std::thread::Builder::new().name(thread_name).spawn(move || this.pump(reader, stream));
        if let Err(e) = spawned {
            // the stream counts as closed so waiters fail instead of hanging
            self.push_line(format!("harness: cannot start reader thread: {e}"), "harness");
            self.close_one();
        }
    }

    fn pump<R: Read>(&self, reader: R, stream: &'static str) {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(_) => self.push_line(strip_control(&String::from_utf8_lossy(&buf)), stream),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.push_line(format!("harness: read error: {e}"), "harness");
                    break;
                }
            }
        }
        self.close_one();
    }

    fn push_line(&self, line: String, stream: &str) {
        {
            let t = self.shared.started.elapsed().as_secs_f64();
            let mut log = lock(&self.shared.log);
            // the log is a debugging aid; a full disk must not fail the test by itself
            let _ = if stream.is_empty() {
                writeln!(log, "[{t:8.3}] {line}")
            } else {
                writeln!(log, "[{t:8.3}] [{stream}] {line}")
            };
        }
        if self.shared.verbose {
            eprintln!("[{}] {line}", self.shared.name);
        }
        lock(&self.shared.state).lines.push(line);
        self.shared.cond.notify_all();
    }

    fn close_one(&self) {
        let mut st = lock(&self.shared.state);
        st.open = st.open.saturating_sub(1);
        drop(st);
        self.shared.cond.notify_all();
    }

    /// The name given at creation.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The log file that receives every line.
    pub fn log_path(&self) -> &Path {
        &self.shared.log_path
    }

    /// All lines so far.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.shared.state).lines.clone()
    }

    /// How many lines there are so far: a cursor for [`Lines::wait_for_from`].
    pub fn len(&self) -> usize {
        lock(&self.shared.state).lines.len()
    }

    /// True when no line arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when every attached stream reached its end.
    pub fn is_closed(&self) -> bool {
        let st = lock(&self.shared.state);
        st.attached > 0 && st.open == 0
    }

    /// True when some line so far contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        lock(&self.shared.state).lines.iter().any(|l| l.contains(needle))
    }

    /// The last `n` lines, one per line.
    pub fn tail(&self, n: usize) -> String {
        let st = lock(&self.shared.state);
        let start = st.lines.len().saturating_sub(n);
        st.lines[start..].join("\n")
    }

    /// Waits until some line (from the first one on) contains `needle`; returns that line.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String> {
        self.wait_for_from(0, needle, timeout).map(|(_, line)| line)
    }

    /// Like [`Lines::wait_for`], looking only at lines with index `start` and later; returns the
    /// index and the line, so the next wait can start after it.
    pub fn wait_for_from(&self, start: usize, needle: &str, timeout: Duration) -> Result<(usize, String)> {
        self.wait_match(start, &format!("{needle:?}"), timeout, |l| l.contains(needle))
    }

    /// Waits until a line with index `start` or later satisfies `pred`; `what` names the
    /// awaited thing in errors. Fails early when every stream closed without a match.
    pub fn wait_match(
        &self,
        start: usize,
        what: &str,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<(usize, String)> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        let mut i = start;
        loop {
            while i < st.lines.len() {
                if pred(&st.lines[i]) {
                    return Ok((i, st.lines[i].clone()));
                }
                i += 1;
            }
            if st.attached > 0 && st.open == 0 {
                drop(st);
                return Err(HarnessError::Closed {
                    what: format!("{what} in {}", self.shared.name),
                    log: self.shared.log_path.display().to_string(),
                    tail: self.tail(TAIL_LINES),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                return Err(HarnessError::Timeout {
                    what: format!("{what} in {}", self.shared.name),
                    timeout,
                    log: self.shared.log_path.display().to_string(),
                    tail: self.tail(TAIL_LINES),
                });
            }
            st = self.shared.cond.wait_timeout(st, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Waits until every attached stream reached its end.
    pub fn wait_closed(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.shared.state);
        while !(st.attached > 0 && st.open == 0) {
            let now = Instant::now();
            if now >= deadline {
                drop(st);
                return Err(HarnessError::Timeout {
                    what: format!("end of output of {}", self.shared.name),
                    timeout,
                    log: self.shared.log_path.display().to_string(),
                    tail: self.tail(TAIL_LINES),
                });
            }
            st = self.shared.cond.wait_timeout(st, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
        Ok(())
    }
}

/// Reads `reader` (e.g. a child's stdout) in the background into a transcript logged as
/// `tests/work/logs/<log_name>-*.log`, and waits until a line contains `needle`. Returns the
/// transcript (which goes on collecting) and the matching line.
pub fn wait_for_line<R: Read + Send + 'static>(
    reader: R,
    needle: &str,
    timeout: Duration,
    log_name: &str,
) -> Result<(Lines, String)> {
    let lines = Lines::new(log_name)?;
    lines.attach(reader, "");
    let line = lines.wait_for(needle, timeout)?;
    Ok((lines, line))
}

/// Removes terminal escape sequences and control characters (keeps tabs), and the line end.
pub fn strip_control(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates up to a final byte in @..~
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' {
                            chars.next();
                            break;
                        }
                    }
                }
                // two-character sequences such as ESC c (reset) or charset selection ESC ( B
                Some('(' | ')') => {
                    chars.next();
                }
                _ => {}
            },
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// A child process (and its process group) that is killed when the guard is dropped. Its
/// stdout and stderr are captured into [`Lines`].
pub struct ChildGuard {
    child: Child,
    output: Lines,
    group: bool,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` in a new process group with stdin closed and stdout/stderr captured into a
    /// transcript named `name`.
    pub fn spawn(cmd: &mut Command, name: &str) -> Result<ChildGuard> {
        let output = Lines::new(name)?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut child = cmd
            .spawn()
            .map_err(|e| HarnessError::io(format!("spawn {name} ({})", cmd.get_program().to_string_lossy()), e))?;
        if let Some(out) = child.stdout.take() {
            output.attach(out, "");
        }
        if let Some(err) = child.stderr.take() {
            output.attach(err, "stderr");
        }
        Ok(ChildGuard { child, output, group: true, status: None })
    }

    /// Takes charge of a child spawned elsewhere: captures its stdout/stderr if they are pipes,
    /// and kills it (only it, not a group) on drop.
    pub fn adopt(mut child: Child, name: &str) -> Result<ChildGuard> {
        let output = match Lines::new(name) {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        if let Some(out) = child.stdout.take() {
            output.attach(out, "");
        }
        if let Some(err) = child.stderr.take() {
            output.attach(err, "stderr");
        }
        Ok(ChildGuard { child, output, group: false, status: None })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The captured stdout and stderr.
    pub fn output(&self) -> &Lines {
        &self.output
    }

    /// Waits for an output line containing `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Result<String> {
        self.output.wait_for(needle, timeout)
    }

    /// The exit status if the process has ended (reaping it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().map_err(|e| HarnessError::io("wait for child", e))?;
        }
        Ok(self.status)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for the process to end by itself.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Timeout {
                    what: format!("exit of {} (pid {})", self.output.name(), self.pid()),
                    timeout,
                    log: self.output.log_path().display().to_string(),
                    tail: self.output.tail(TAIL_LINES),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the process (group).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = Pid::from_raw(self.child.id() as i32);
        if self.group {
            killpg(pid, signal)?;
        } else {
            kill(pid, signal)?;
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL if the process still runs after `grace`; returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let _ = self.signal(Signal::SIGTERM);
        match self.wait_timeout(grace) {
            Ok(status) => Ok(status),
            Err(_) => {
                self.kill();
                self.try_wait()?.ok_or_else(|| HarnessError::Setup(format!("{} survived SIGKILL", self.output.name())))
            }
        }
    }

    /// SIGKILL to the process (group), then reap it.
    pub fn kill(&mut self) {
        if self.group || self.status.is_none() {
            // group members may outlive the leader, so signal the group even after it exited
            let _ = self.signal(Signal::SIGKILL);
        }
        if self.status.is_none() {
            self.status = self.child.wait().ok();
        }
    }

    /// The underlying child.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_escapes_and_controls() {
        assert_eq!(strip_control("\u{1b}c\u{1b}[?7l\u{1b}[2JLUNA-TEST-MARKER x\r\n"), "LUNA-TEST-MARKER x");
        assert_eq!(strip_control("a\tb\u{1b}(Bc\u{1b}]0;title\u{7}d"), "a\tbcd");
    }

    #[test]
    fn waits_for_a_line_and_fails_on_close() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo one; sleep 0.2; echo two-marker; echo err >&2"]);
        let mut child = ChildGuard::spawn(&mut cmd, "unit-sh").unwrap();
        let line = child.wait_for("marker", Duration::from_secs(10)).unwrap();
        assert_eq!(line, "two-marker");
        let (idx, _) = child.output().wait_for_from(0, "one", Duration::from_secs(1)).unwrap();
        assert_eq!(idx, 0);
        assert!(child.wait_timeout(Duration::from_secs(10)).unwrap().success());
        child.output().wait_closed(Duration::from_secs(5)).unwrap();
        assert!(child.output().contains("err"));
        let err = child.wait_for("never", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, HarnessError::Closed { .. }), "{err}");
        let log = std::fs::read_to_string(child.output().log_path()).unwrap();
        assert!(log.contains("two-marker") && log.contains("[stderr] err"), "{log}");
    }

    #[test]
    fn times_out_and_kills_on_drop() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; sleep 30"]);
        let child = ChildGuard::spawn(&mut cmd, "unit-sleep").unwrap();
        child.wait_for("started", Duration::from_secs(10)).unwrap();
        let err = child.wait_for("never", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, HarnessError::Timeout { .. }), "{err}");
        let pid = Pid::from_raw(child.pid() as i32);
        drop(child);
        // reaped and killed: no such process any more
        assert!(kill(pid, None).is_err());
    }

    #[test]
    fn wait_for_line_reads_any_reader() {
        let data: &'static [u8] = b"boot\nLUNA-TEST-MARKER hostname=n1\n";
        let (lines, line) = wait_for_line(data, "hostname=", Duration::from_secs(5), "unit-reader").unwrap();
        assert_eq!(line, "LUNA-TEST-MARKER hostname=n1");
        assert_eq!(lines.len(), 2);
    }
}
