//! cloud-init NoCloud data of a node (`meta-data`, `user-data`, `network-config` v2), rendered
//! from its install plan and the cluster as pure functions; `handlers.rs` serves them at
//! `/boot/nocloud/{file}?node=&token=` under the same node-scoped token rule as the plan.
//!
//! YAML is written here rather than with a YAML crate: `serde_yaml` is archived upstream
//! (unmaintained since 2024) and its forks are young, while what is written is a fixed shape of
//! maps and lists whose every string is emitted as a JSON string — a double-quoted YAML scalar
//! with JSON's escapes, which YAML 1.1 (PyYAML, what cloud-init parses with) reads the same —
//! so no value (a hostname, a MAC, a key comment) can change the document's structure.

use std::fmt::Write as _;

use luna_core::api::{InstallPlan, PlanInterface};
use luna_core::model::BOOTIF;

/// The files a NoCloud seed has, as served and as written into `/var/lib/cloud/seed/nocloud/`.
pub const FILES: [&str; 3] = ["meta-data", "user-data", "network-config"];

/// A YAML double-quoted scalar (JSON string syntax).
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The node's fully qualified name, or its host name when there is no domain.
fn fqdn(plan: &InstallPlan) -> String {
    if plan.domain.is_empty() {
        plan.hostname.clone()
    } else {
        format!("{}.{}", plan.hostname, plan.domain)
    }
}

/// `meta-data`: instance id (node and image revision: a new install is a new instance), host
/// name, and the cluster's ssh keys as `public-keys`.
pub fn meta_data(plan: &InstallPlan, ssh_keys: &[String]) -> String {
    let rev = plan.image.as_ref().map(|i| format!("{}-{}", i.osimage, i.revision)).unwrap_or_else(|| "none".into());
    let mut out = String::new();
    let _ = writeln!(out, "instance-id: {}", q(&format!("luna-{}-{rev}", plan.node)));
    let _ = writeln!(out, "local-hostname: {}", q(&plan.hostname));
    if !ssh_keys.is_empty() {
        out.push_str("public-keys:\n");
        for k in ssh_keys {
            let _ = writeln!(out, "  - {}", q(k));
        }
    }
    out
}

/// `user-data`: the group's own text when it has one (served as is), else a `#cloud-config` that
/// sets the host name and gives root the cluster's ssh keys.
pub fn user_data(plan: &InstallPlan, group_userdata: &str, ssh_keys: &[String]) -> String {
    if !group_userdata.trim().is_empty() {
        let mut s = group_userdata.to_string();
        if !s.ends_with('\n') {
            s.push('\n');
        }
        return s;
    }
    let mut out = String::from("#cloud-config\n");
    let _ = writeln!(out, "hostname: {}", q(&plan.hostname));
    let _ = writeln!(out, "fqdn: {}", q(&fqdn(plan)));
    out.push_str("manage_etc_hosts: true\n");
    if !ssh_keys.is_empty() {
        out.push_str("disable_root: false\nssh_authorized_keys:\n");
        for k in ssh_keys {
            let _ = writeln!(out, "  - {}", q(k));
        }
    }
    out
}

/// The id of an interface in `ethernets:` (lower-case luna name; `BOOTIF` → `bootif`).
fn ethernet_id(i: &PlanInterface) -> String {
    i.name.to_ascii_lowercase()
}

/// `network-config` (version 2) for the interfaces with an address: matched by MAC when the plan
/// knows it (the boot interface always does), else by the interface's name; static address,
/// default route through the network's gateway, DNS server and the node's domain, MTU. The
/// boot interface's MAC comes from the command line when the node object has none.
pub fn network_config(plan: &InstallPlan, boot_mac: Option<luna_core::MacAddr>) -> String {
    let mut out = String::from("version: 2\nethernets:\n");
    let mut any = false;
    for i in plan.interfaces.iter().filter(|i| i.ip.is_some()) {
        let Some(ip) = i.ip else { continue };
        any = true;
        let mac = if i.name == BOOTIF { i.mac.or(boot_mac) } else { i.mac };
        let _ = writeln!(out, "  {}:", q(&ethernet_id(i)));
        match mac {
            Some(m) => {
                let _ = writeln!(out, "    match:\n      macaddress: {}", q(&m.to_string()));
            }
            None => {
                let _ = writeln!(out, "    match:\n      name: {}", q(&i.name));
                let _ = writeln!(out, "    set-name: {}", q(&i.name));
            }
        }
        out.push_str("    dhcp4: false\n");
        let _ = writeln!(out, "    addresses:\n      - {}", q(&format!("{ip}/{}", i.prefix)));
        if let Some(gw) = i.gateway {
            let _ = writeln!(out, "    routes:\n      - to: \"0.0.0.0/0\"\n        via: {}", q(&gw.to_string()));
        }
        if i.dns.is_some() || !plan.domain.is_empty() {
            out.push_str("    nameservers:\n");
            if let Some(dns) = i.dns {
                let _ = writeln!(out, "      addresses:\n        - {}", q(&dns.to_string()));
            }
            if !plan.domain.is_empty() {
                let _ = writeln!(out, "      search:\n        - {}", q(&plan.domain));
            }
        }
        if i.mtu != 1500 {
            let _ = writeln!(out, "    mtu: {}", i.mtu);
        }
    }
    if !any {
        // An empty map rather than a key without value (which YAML reads as null).
        out = "version: 2\nethernets: {}\n".into();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use luna_core::api::PlanImage;
    use luna_core::model::RootMode;

    fn plan() -> InstallPlan {
        InstallPlan {
            node: "node001".into(),
            hostname: "node001".into(),
            domain: "cluster".into(),
            interfaces: vec![
                PlanInterface {
                    name: "BOOTIF".into(),
                    mac: None,
                    ip: Some("10.141.0.1".parse().unwrap()),
                    prefix: 16,
                    gateway: Some("10.141.255.254".parse().unwrap()),
                    dns: Some("10.141.255.254".parse().unwrap()),
                    mtu: 1500,
                    params: String::new(),
                },
                PlanInterface {
                    name: "ib0".into(),
                    mac: None,
                    ip: Some("10.149.0.1".parse().unwrap()),
                    prefix: 16,
                    gateway: None,
                    dns: None,
                    mtu: 2044,
                    params: String::new(),
                },
                PlanInterface {
                    name: "eth9".into(),
                    mac: None,
                    ip: None,
                    prefix: 24,
                    gateway: None,
                    dns: None,
                    mtu: 1500,
                    params: String::new(),
                },
            ],
            image: Some(PlanImage {
                osimage: "compute".into(),
                revision: 4,
                torrent_url: String::new(),
                http_url: String::new(),
                sha256: String::new(),
                size: 0,
                info_hash: String::new(),
                http_mirrors: Vec::new(),
                torrent_mirrors: Vec::new(),
            }),
            root: RootMode::Overlay,
            prescript: String::new(),
            partscript: String::new(),
            postscript: String::new(),
            torrent_interface: "BOOTIF".into(),
            service: false,
            setupbmc: false,
            bmc: None,
            server_url: "http://10.141.255.254:7050".into(),
        }
    }

    #[test]
    fn network_config_v2_matches_by_mac_else_by_name() {
        let got = network_config(&plan(), Some("52:54:00:00:00:01".parse().unwrap()));
        let want = r#"version: 2
ethernets:
  "bootif":
    match:
      macaddress: "52:54:00:00:00:01"
    dhcp4: false
    addresses:
      - "10.141.0.1/16"
    routes:
      - to: "0.0.0.0/0"
        via: "10.141.255.254"
    nameservers:
      addresses:
        - "10.141.255.254"
      search:
        - "cluster"
  "ib0":
    match:
      name: "ib0"
    set-name: "ib0"
    dhcp4: false
    addresses:
      - "10.149.0.1/16"
    nameservers:
      search:
        - "cluster"
    mtu: 2044
"#;
        assert_eq!(got, want);
        let mut p = plan();
        p.interfaces.retain(|i| i.ip.is_none());
        assert_eq!(network_config(&p, None), "version: 2\nethernets: {}\n");
    }

    #[test]
    fn meta_data_names_the_instance_and_host() {
        let keys = vec!["ssh-ed25519 AAAAC3Nza admin@head".to_string()];
        assert_eq!(
            meta_data(&plan(), &keys),
            "instance-id: \"luna-node001-compute-4\"\nlocal-hostname: \"node001\"\npublic-keys:\n  - \"ssh-ed25519 AAAAC3Nza admin@head\"\n"
        );
        assert!(!meta_data(&plan(), &[]).contains("public-keys"));
    }

    #[test]
    fn user_data_is_the_groups_or_a_cloud_config_with_the_keys() {
        let keys = vec!["ssh-ed25519 AAAAC3Nza admin \"quoted\"".to_string()];
        let got = user_data(&plan(), "", &keys);
        assert_eq!(
            got,
            "#cloud-config\nhostname: \"node001\"\nfqdn: \"node001.cluster\"\nmanage_etc_hosts: true\n\
             disable_root: false\nssh_authorized_keys:\n  - \"ssh-ed25519 AAAAC3Nza admin \\\"quoted\\\"\"\n"
        );
        assert_eq!(user_data(&plan(), "#!/bin/sh\necho hi", &keys), "#!/bin/sh\necho hi\n");
        // A value cannot break out of its scalar.
        let mut p = plan();
        p.hostname = "x\nruncmd: [reboot]".into();
        let got = user_data(&p, "", &[]);
        assert!(got.contains("hostname: \"x\\nruncmd: [reboot]\"\n"), "{got}");
        assert_eq!(got.lines().filter(|l| l.starts_with("runcmd")).count(), 0, "{got}");
    }
}
