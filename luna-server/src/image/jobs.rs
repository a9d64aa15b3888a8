//! Background pack jobs and what `GET /api/v1/jobs/{id}` reports about them. Jobs live in
//! memory: a server restart forgets them (a pack that was running then left only a `.tmp`
//! directory, removed by the next pack).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::pack::{PackProgress, PackStep};

pub type JobId = u64;

/// How many finished jobs are remembered.
const KEEP_FINISHED: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Running,
    Done,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: JobId,
    pub osimage: String,
    pub state: JobState,
    pub step: PackStep,
    /// Bytes of the image tree read so far, of `total`.
    pub bytes: u64,
    pub total: u64,
    /// Bytes per second.
    pub rate: f64,
    pub error: Option<String>,
    /// The published revision once done.
    pub revision: Option<u32>,
    pub warning: Option<String>,
    /// Unix seconds.
    pub started: u64,
    pub finished: Option<u64>,
}

#[derive(Default)]
pub struct Jobs {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: JobId,
    jobs: BTreeMap<JobId, JobStatus>,
    /// When each running job started (its duration goes to `luna_pack_duration_seconds`).
    clocks: BTreeMap<JobId, std::time::Instant>,
}

impl Jobs {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A panic while holding the lock leaves plain data behind; keep using it.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn create(&self, osimage: &str, warning: Option<String>) -> JobId {
        self.with(|i| {
            i.next += 1;
            let id = i.next;
            i.jobs.insert(
                id,
                JobStatus {
                    id,
                    osimage: osimage.into(),
                    state: JobState::Running,
                    step: PackStep::Queued,
                    bytes: 0,
                    total: 0,
                    rate: 0.0,
                    error: None,
                    revision: None,
                    warning,
                    started: crate::service::unix_now(),
                    finished: None,
                },
            );
            i.clocks.insert(id, std::time::Instant::now());
            let finished: Vec<JobId> = i.jobs.values().filter(|j| j.state != JobState::Running).map(|j| j.id).collect();
            for old in finished.iter().take(finished.len().saturating_sub(KEEP_FINISHED)) {
                i.jobs.remove(old);
            }
            id
        })
    }

    pub fn progress(&self, id: JobId, p: &PackProgress) {
        self.with(|i| {
            if let Some(j) = i.jobs.get_mut(&id) {
                j.step = p.step;
                if p.step == super::pack::PackStep::Archiving || p.total > 0 || p.bytes > 0 {
                    j.bytes = p.bytes;
                    j.total = p.total;
                    j.rate = p.rate;
                }
            }
        })
    }

    pub fn step(&self, id: JobId, step: PackStep) {
        self.with(|i| {
            if let Some(j) = i.jobs.get_mut(&id) {
                j.step = step;
            }
        })
    }

    pub fn finish(&self, id: JobId, result: Result<u32, String>) {
        self.with(|i| {
            if let Some(j) = i.jobs.get_mut(&id) {
                j.finished = Some(crate::service::unix_now());
                let outcome = crate::metrics::l1("outcome", if result.is_ok() { "done" } else { "failed" });
                let m = crate::metrics::global();
                m.pack_jobs.get_or_create(&outcome).inc();
                if let Some(t) = i.clocks.remove(&id) {
                    m.pack_seconds.get_or_create(&outcome).observe(t.elapsed().as_secs_f64());
                }
                match result {
                    Ok(rev) => {
                        j.state = JobState::Done;
                        j.step = PackStep::Done;
                        j.revision = Some(rev);
                    }
                    Err(e) => {
                        j.state = JobState::Failed;
                        j.error = Some(e);
                    }
                }
            }
        })
    }

    pub fn get(&self, id: JobId) -> Option<JobStatus> {
        self.with(|i| i.jobs.get(&id).cloned())
    }

    /// The running job packing `osimage`, if any.
    pub fn running_for(&self, osimage: &str) -> Option<JobId> {
        self.with(|i| i.jobs.values().find(|j| j.osimage == osimage && j.state == JobState::Running).map(|j| j.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_lifecycle() {
        let j = Jobs::default();
        let a = j.create("c", None);
        assert_eq!(j.running_for("c"), Some(a));
        j.progress(a, &PackProgress { step: PackStep::Archiving, bytes: 5, total: 10, rate: 2.5 });
        let s = j.get(a).unwrap();
        assert_eq!((s.step, s.bytes, s.total, s.rate), (PackStep::Archiving, 5, 10, 2.5));
        // later steps keep the archive's numbers
        j.progress(a, &PackProgress { step: PackStep::Initramfs, bytes: 0, total: 0, rate: 0.0 });
        assert_eq!(j.get(a).unwrap().bytes, 5);
        j.finish(a, Ok(7));
        let s = j.get(a).unwrap();
        assert_eq!((s.state, s.revision, s.step), (JobState::Done, Some(7), PackStep::Done));
        assert_eq!(j.running_for("c"), None);
        let b = j.create("c", None);
        j.finish(b, Err("boom".into()));
        assert_eq!(j.get(b).unwrap().error.as_deref(), Some("boom"));
        let json = serde_json::to_value(j.get(b).unwrap()).unwrap();
        assert_eq!(json["state"], "failed");
    }

    #[test]
    fn old_finished_jobs_are_forgotten() {
        let j = Jobs::default();
        let first = j.create("c", None);
        j.finish(first, Ok(1));
        for _ in 0..KEEP_FINISHED + 5 {
            let id = j.create("c", None);
            j.finish(id, Ok(1));
        }
        assert!(j.get(first).is_none());
    }
}
