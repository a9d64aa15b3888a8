//! How `luna osimage pack` shows a running pack job: on a terminal one line redrawn in place
//! (step, bar, bytes, rate); otherwise (logs, CI) one line per step so nothing scrolls away.

use std::io::Write;

use serde_json::Value;

/// The fields of a `GET /api/v1/jobs/{id}` answer the display needs.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub state: String,
    pub step: String,
    pub bytes: u64,
    pub total: u64,
    pub rate: f64,
    pub error: Option<String>,
    pub warning: Option<String>,
    pub revision: Option<u64>,
}

impl JobView {
    /// Reads a job answer; `None` when it lacks the state or step (not a luna job).
    pub fn from_json(v: &Value) -> Option<JobView> {
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Some(JobView {
            state: text("state")?,
            step: text("step")?,
            bytes: v.get("bytes").and_then(Value::as_u64).unwrap_or(0),
            total: v.get("total").and_then(Value::as_u64).unwrap_or(0),
            rate: v.get("rate").and_then(Value::as_f64).unwrap_or(0.0),
            error: text("error"),
            warning: text("warning"),
            revision: v.get("revision").and_then(Value::as_u64),
        })
    }
}

/// `1536` → `1.5 KiB`; plain bytes below 1 KiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// One progress line: `archiving [#########...........]  45%  1.2 GiB / 2.6 GiB  230.0 MiB/s`.
/// Steps without a byte count (kernel, initramfs, torrent) show the step alone.
pub fn progress_line(job: &JobView, bar_width: usize) -> String {
    if job.total == 0 {
        return job.step.clone();
    }
    let done = job.bytes.min(job.total);
    let filled = (done as u128 * bar_width as u128 / job.total as u128) as usize;
    let percent = done as u128 * 100 / job.total as u128;
    let rate = if job.rate > 0.0 { format!("  {}/s", human_bytes(job.rate as u64)) } else { String::new() };
    format!(
        "{:<10} [{}{}] {percent:>3}%  {} / {}{rate}",
        job.step,
        "#".repeat(filled),
        ".".repeat(bar_width - filled),
        human_bytes(done),
        human_bytes(job.total),
    )
}

/// Draws job updates on `out` (stderr in the binary).
pub struct Progress<W: Write> {
    out: W,
    terminal: bool,
    last_step: Option<String>,
    drawn: usize,
}

impl<W: Write> Progress<W> {
    pub fn new(out: W, terminal: bool) -> Self {
        Progress { out, terminal, last_step: None, drawn: 0 }
    }

    /// Shows `job`; write errors are ignored (progress is a courtesy, the result is on stdout).
    pub fn update(&mut self, job: &JobView) {
        if self.terminal {
            let line = progress_line(job, 30);
            // Pad over the previous line: `\r` alone leaves its tail when the new one is shorter.
            let pad = self.drawn.saturating_sub(line.chars().count());
            let _ = write!(self.out, "\r{line}{}", " ".repeat(pad));
            self.drawn = line.chars().count();
        } else if self.last_step.as_deref() != Some(job.step.as_str()) {
            let _ = writeln!(self.out, "{}", job.step);
        }
        self.last_step = Some(job.step.clone());
        let _ = self.out.flush();
    }

    /// Ends the redrawn line so what follows starts on its own.
    pub fn finish(&mut self) {
        if self.terminal && self.drawn > 0 {
            let _ = writeln!(self.out);
            let _ = self.out.flush();
            self.drawn = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn job(step: &str, bytes: u64, total: u64, rate: f64) -> JobView {
        JobView {
            state: "running".into(),
            step: step.into(),
            bytes,
            total,
            rate,
            error: None,
            warning: None,
            revision: None,
        }
    }

    #[test]
    fn sizes_are_human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB");
    }

    #[test]
    fn bar_fills_with_the_bytes() {
        let line = progress_line(&job("archiving", 1 << 29, 1 << 30, 256.0 * 1048576.0), 10);
        assert_eq!(line, "archiving  [#####.....]  50%  512.0 MiB / 1.0 GiB  256.0 MiB/s");
        // More bytes than announced (the tree grew while packing) stays a full bar.
        let line = progress_line(&job("archiving", 3 << 30, 1 << 30, 0.0), 4);
        assert_eq!(line, "archiving  [####] 100%  1.0 GiB / 1.0 GiB");
        assert_eq!(progress_line(&job("initramfs", 0, 0, 0.0), 10), "initramfs");
    }

    #[test]
    fn lines_per_step_off_a_terminal() {
        let mut buf = Vec::new();
        let mut p = Progress::new(&mut buf, false);
        p.update(&job("scanning", 0, 0, 0.0));
        p.update(&job("archiving", 1, 10, 0.0));
        p.update(&job("archiving", 5, 10, 0.0));
        p.update(&job("torrent", 0, 0, 0.0));
        p.finish();
        assert_eq!(String::from_utf8(buf).unwrap(), "scanning\narchiving\ntorrent\n");
    }

    #[test]
    fn terminal_redraws_one_line() {
        let mut buf = Vec::new();
        let mut p = Progress::new(&mut buf, true);
        p.update(&job("archiving", 1, 2, 0.0));
        p.update(&job("kernel", 0, 0, 0.0));
        p.finish();
        let s = String::from_utf8(buf).unwrap();
        assert!(s.starts_with("\rarchiving  ["), "{s:?}");
        // The shorter second line blanks the rest of the first.
        let second = s.split('\r').nth(2).unwrap();
        assert!(second.starts_with("kernel ") && second.ends_with(" \n"), "{second:?}");
    }

    #[test]
    fn job_answers_parse() {
        let v = json!({"id": 3, "osimage": "x", "state": "failed", "step": "kernel", "bytes": 7,
                       "total": 9, "rate": 1.5, "error": "no kernel", "revision": null});
        let j = JobView::from_json(&v).unwrap();
        assert_eq!(j.state, "failed");
        assert_eq!(j.error.as_deref(), Some("no kernel"));
        assert_eq!(j.revision, None);
        assert!(JobView::from_json(&json!({"step": "x"})).is_none());
    }
}
