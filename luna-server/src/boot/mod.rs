//! Network boot: what luna tells a node's iPXE to do.

pub mod ipxe;
