//! Network boot: what luna tells a node's iPXE to do, and what the node's agent may fetch.

pub mod discover;
pub mod handlers;
pub mod ipxe;
pub mod nocloud;
pub mod token;

pub use handlers::{bind_node, boot_plan, install_plan, router, BootContext, BootPlan};
pub use token::BootTokens;
