//! luna-server as a library: the binary in `main.rs` only parses flags and calls in here.

pub mod store;
