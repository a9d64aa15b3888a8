//! The harness's error type.

use std::time::Duration;

/// What went wrong while setting up or driving a test bed.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("command `{command}` failed ({status}): {stderr}")]
    Command { command: String, status: String, stderr: String },
    #[error("timed out after {timeout:?} waiting for {what} (log {log}); last output:\n{tail}")]
    Timeout { what: String, timeout: Duration, log: String, tail: String },
    #[error("output ended before {what} appeared (log {log}); last output:\n{tail}")]
    Closed { what: String, log: String, tail: String },
    #[error("{0}")]
    Setup(String),
}

/// Result of harness operations.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

impl HarnessError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        HarnessError::Io { what: what.into(), source }
    }
}

impl From<nix::Error> for HarnessError {
    fn from(e: nix::Error) -> Self {
        HarnessError::io("system call", std::io::Error::from(e))
    }
}
