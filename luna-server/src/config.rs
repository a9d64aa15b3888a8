//! luna-server's configuration file (`/etc/luna/luna.toml`): every key optional, every default
//! documented in [`documented_defaults`], unknown keys rejected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where objects live: `sqlite:///path/luna.db` (embedded) or `mongodb://host/db?replicaSet=rs0`.
    pub store: String,
    /// HTTP address of the REST API, boot scripts, image downloads and the tracker.
    pub listen: SocketAddr,
    /// File holding the admin bearer token (created by `luna-server init`, mode 0600).
    pub token_file: PathBuf,
    /// Packed images, torrents, kernels and initramfs files.
    pub data_dir: PathBuf,
    /// Cluster name given to the cluster object by `init`.
    pub cluster_name: String,
    pub dhcp: crate::dhcp::DhcpConfig,
    pub tftp: crate::tftp::TftpConfig,
    pub image: crate::image::ImageConfig,
    pub http: crate::httpd::HttpConfig,
    pub tracker: crate::tracker::TrackerSettings,
    pub power: crate::power::PowerConfig,
    pub discovery: crate::discovery::DiscoveryConfig,
    /// This server among the servers of one cluster (identity, advertised addresses, DHCP slice).
    pub server: crate::servers::ServerConfig,
    pub metrics: crate::web::MetricsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            store: "sqlite:///var/lib/luna/luna.db".into(),
            listen: "0.0.0.0:7050".parse().expect("valid literal"),
            token_file: "/etc/luna/token".into(),
            data_dir: "/var/lib/luna".into(),
            cluster_name: "luna".into(),
            dhcp: crate::dhcp::DhcpConfig::default(),
            tftp: crate::tftp::TftpConfig::default(),
            image: crate::image::ImageConfig::default(),
            http: crate::httpd::HttpConfig::default(),
            tracker: crate::tracker::TrackerSettings::default(),
            power: crate::power::PowerConfig::default(),
            discovery: crate::discovery::DiscoveryConfig::default(),
            server: crate::servers::ServerConfig::default(),
            metrics: crate::web::MetricsConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.into(), source })
    }
}

/// The defaults as a commented TOML file (`luna-server --print-config`).
pub fn documented_defaults() -> String {
    let d = Config::default();
    format!(
        r#"# luna-server configuration. Every key is optional; these are the defaults.

# Where objects live: "sqlite:///path/luna.db" (embedded, default) or
# "mongodb://host1,host2/luna?replicaSet=rs0" (production / HA).
store = "{store}"

# HTTP address of the REST API, iPXE boot scripts, image downloads and the tracker.
listen = "{listen}"

# File holding the admin bearer token (created by `luna-server init`, mode 0600).
token_file = "{token}"

# Packed images, torrents, kernels and initramfs files.
data_dir = "{data}"

# Name given to the cluster object by `luna-server init`.
cluster_name = "{cluster}"

# The built-in DHCP server. It answers only on the interfaces listed here (none: off), and
# only machines luna knows unless the cluster object has a dhcp_range (discovery).
# answer_router_solicitations: IPv6 router solicitations there get an advertisement that
# configures nothing (no router, no prefix, no DHCPv6), so iPXE does not wait 15 s for IPv6;
# turn it off where an IPv6 router serves the network.
[dhcp]
{dhcp}
{tftp}
{image}{http}{tracker}{discovery}{metrics}
{power}{server}"#,
        store = d.store,
        listen = d.listen,
        token = d.token_file.display(),
        data = d.data_dir.display(),
        cluster = d.cluster_name,
        dhcp = toml::to_string(&d.dhcp).expect("dhcp config serialises"),
        tftp = crate::tftp::TftpConfig::documented_defaults(),
        image = crate::image::documented_defaults(),
        http = crate::httpd::HttpConfig::documented_defaults(),
        tracker = crate::tracker::TrackerSettings::documented_defaults(),
        power = crate::power::documented_defaults(),
        discovery = crate::discovery::DiscoveryConfig::documented_defaults(),
        server = crate::servers::ServerConfig::documented_defaults(),
        metrics = crate::web::MetricsConfig::documented_defaults(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_defaults_parse_back_to_the_defaults() {
        let c = Config::parse(Path::new("defaults"), &documented_defaults()).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Config::parse(Path::new("/etc/luna/luna.toml"), "stor = \"x\"").unwrap_err().to_string();
        assert!(e.contains("/etc/luna/luna.toml") && e.contains("stor"), "{e}");
    }
}
