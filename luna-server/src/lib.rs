//! luna-server as a library: the binary in `main.rs` only parses flags and calls in here.

pub mod api;
pub mod boot;
pub mod config;
pub mod dhcp;
pub mod discovery;
pub mod fsperm;
pub mod http;
pub mod httpd;
pub mod image;
pub mod live;
pub mod metrics;
pub mod power;
pub mod server;
pub mod servers;
pub mod service;
pub mod status;
pub mod store;
pub mod tftp;
pub mod tls;
pub mod tracker;
pub mod web;
pub mod wiring;
