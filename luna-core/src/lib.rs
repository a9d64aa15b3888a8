//! The one place that defines what luna's objects are.
//!
//! Everything here is pure: no sockets, no files, no store. The server, the CLI and the agent all
//! speak in these types, so a field exists exactly once.

pub mod api;
pub mod hostlist;
pub mod ipalloc;
pub mod mac;
pub mod model;
pub mod power;
#[cfg(any(test, feature = "test-support"))]
pub mod test_support;

pub use mac::MacAddr;
pub use model::{Kind, ModelError};
