//! A headless Chromium driven over the DevTools protocol, for tests of the web page.
//!
//! Transport: `--remote-debugging-pipe` (the protocol's JSON messages, each ended by a NUL
//! byte, on descriptors 3 and 4 of the browser). Hand-rolled rather than `chromiumoxide` or
//! `headless_chrome` because the pipe needs no WebSocket and the few commands used here are
//! plain JSON (serde_json): this is about 150 lines against two crates whose async runtime or
//! WebSocket stack (dozens of dependencies) every build of the test crate would compile.
//!
//! The browser runs with a fresh profile in a temporary directory and is killed (with its
//! process group) when the [`Browser`] is dropped.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{require_tool, ChildGuard, HarnessError, Result};

/// A page in a headless Chromium.
pub struct Browser {
    to: File,
    from: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
    /// Dropped before the profile directory.
    _child: ChildGuard,
    _profile: tempfile::TempDir,
}

/// A pipe with both ends close-on-exec: (read, write).
fn pipe() -> Result<(RawFd, RawFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(HarnessError::io("pipe2", std::io::Error::last_os_error()));
    }
    Ok((fds[0], fds[1]))
}

/// `fd` copied to a descriptor ≥ 10 (close-on-exec), so that `dup2` onto 3 and 4 in the child
/// cannot overwrite one end with the other; the original is closed.
fn high(fd: RawFd) -> Result<RawFd> {
    // SAFETY: fcntl on a descriptor we own; F_DUPFD_CLOEXEC returns a new one or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
    // SAFETY: `fd` is ours and no longer used after this.
    unsafe { libc::close(fd) };
    if new < 0 {
        return Err(HarnessError::io("fcntl F_DUPFD_CLOEXEC", std::io::Error::last_os_error()));
    }
    Ok(new)
}

impl Browser {
    /// Starts Chromium headless with a blank page of `width`×`height` CSS pixels.
    pub fn launch(width: u32, height: u32) -> Result<Browser> {
        Browser::launch_with(Command::new(require_tool("chromium")?), width, height)
    }

    /// [`Browser::launch`] inside a network namespace (where the server listens).
    pub fn launch_in(ns: &crate::Netns, width: u32, height: u32) -> Result<Browser> {
        Browser::launch_with(ns.command(require_tool("chromium")?), width, height)
    }

    /// Starts `command` (chromium, or a wrapper that ends in it) with the browser's flags.
    fn launch_with(mut command: Command, width: u32, height: u32) -> Result<Browser> {
        let profile = tempfile::Builder::new()
            .prefix("luna-chromium-")
            .tempdir()
            .map_err(|e| HarnessError::io("profile directory", e))?;
        // Commands go browser-wards on `cmd`, answers come back on `resp`.
        let (cmd_r, cmd_w) = pipe()?;
        let (resp_r, resp_w) = pipe()?;
        let (cmd_r, resp_w) = (high(cmd_r)?, high(resp_w)?);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                // the pages under test are luna-server's, over HTTPS with the test cluster's
                // own CA, which this throw-away profile does not know
                "--ignore-certificate-errors",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank");
        // SAFETY: between fork and exec only async-signal-safe calls (dup2) are made, on
        // descriptors that exist in the child (inherited copies of ours).
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(cmd_r, 3) < 0 || libc::dup2(resp_w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = ChildGuard::spawn(&mut command, "chromium")?;
        // SAFETY: the child has its copies; ours of the browser's ends are closed, ours of the
        // other ends are owned by the `File`s from here on.
        let (to, from) = unsafe {
            libc::close(cmd_r);
            libc::close(resp_w);
            (File::from_raw_fd(cmd_w), File::from_raw_fd(resp_r))
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        buf.pop_if(|b| *b == 0);
                        if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        let mut b = Browser { to, from: rx, next_id: 0, session: String::new(), _child: child, _profile: profile };
        let target = b.call("Target.createTarget", json!({ "url": "about:blank" }), false)?;
        let id = target["targetId"].as_str().unwrap_or_default().to_string();
        let attached = b.call("Target.attachToTarget", json!({ "targetId": id, "flatten": true }), false)?;
        b.session = attached["sessionId"]
            .as_str()
            .ok_or_else(|| HarnessError::Setup(format!("no session from chromium: {attached}")))?
            .to_string();
        b.call("Page.enable", json!({}), true)?;
        b.call("Runtime.enable", json!({}), true)?;
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
            true,
        )?;
        Ok(b)
    }

    /// Sends one command (to the page's session when `page`) and waits for its answer.
    fn call(&mut self, method: &str, params: Value, page: bool) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if page {
            msg["sessionId"] = json!(self.session);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.to.write_all(&bytes).map_err(|e| HarnessError::io(format!("send {method} to chromium"), e))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .map_err(|_| HarnessError::Setup(format!("chromium did not answer {method} within 60 s")))?;
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    return Err(HarnessError::Setup(format!("chromium refused {method}: {e}")));
                }
                return Ok(v["result"].clone());
            }
            // Events and answers to nothing we wait for are dropped.
        }
    }

    /// Opens `url` in the page (returns once the navigation is committed, not loaded).
    pub fn navigate(&mut self, url: &str) -> Result<()> {
        let r = self.call("Page.navigate", json!({ "url": url }), true)?;
        if let Some(e) = r.get("errorText").and_then(Value::as_str) {
            return Err(HarnessError::Setup(format!("chromium cannot open {url}: {e}")));
        }
        Ok(())
    }

    /// Evaluates `expr` in the page and returns its value (promises awaited).
    pub fn eval(&mut self, expr: &str) -> Result<Value> {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            true,
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(HarnessError::Setup(format!("page script `{expr}` threw: {e}")));
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `expr` every 20 ms until it is truthy; returns how long that took.
    pub fn wait_for(&mut self, expr: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            // Not yet loaded pages throw (no `luna` yet): keep polling.
            let v = self.eval(expr).unwrap_or(Value::Null);
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                return Err(HarnessError::Setup(format!("page never had `{expr}` within {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Saves a PNG of the viewport.
    pub fn screenshot(&mut self, path: &Path) -> Result<()> {
        let r = self.call("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true }), true)?;
        let data = r["data"].as_str().ok_or_else(|| HarnessError::Setup("no screenshot data".into()))?;
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| HarnessError::Setup(format!("screenshot is not base64: {e}")))?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| HarnessError::io(format!("create {}", dir.display()), e))?;
        }
        std::fs::write(path, png).map_err(|e| HarnessError::io(format!("write {}", path.display()), e))
    }
}
