//! What makes an unpacked image this node: hostname, interface configuration for the image's
//! network stack, and an `/etc/hosts` line. Rendering is pure; [`write`] puts the files in place.
//!
//! Stacks are detected from the image: NetworkManager (`etc/NetworkManager`), systemd-networkd
//! (`etc/systemd/network` plus the daemon), ifcfg (`etc/sysconfig/network-scripts`) and Debian's
//! ifupdown (`etc/network/interfaces`). Every detected stack gets a file; they describe the same
//! addresses, so an image carrying two (RHEL's NetworkManager reading ifcfg) stays consistent.
//! Interfaces are matched by MAC where the plan knows one (the boot interface always: its MAC
//! is on the command line), else by name. The group's `params` (`KEY=VALUE` lines) are ifcfg
//! syntax: they go verbatim into ifcfg files; for the other stacks `MTU=` is understood.

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use luna_core::api::{InstallPlan, PlanInterface};
use luna_core::mac::MacAddr;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
#[error("write personality file {path}: {source}")]
pub struct PersonalityError {
    pub path: String,
    pub source: io::Error,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetStack {
    NetworkManager,
    Networkd,
    Ifcfg,
    Debian,
}

pub fn detect(root: &Path) -> Vec<NetStack> {
    let mut out = Vec::new();
    if root.join("etc/NetworkManager").is_dir() {
        out.push(NetStack::NetworkManager);
    }
    let networkd_daemon =
        ["usr/lib/systemd/systemd-networkd", "lib/systemd/systemd-networkd"].iter().any(|p| root.join(p).exists());
    if root.join("etc/systemd/network").is_dir() && networkd_daemon {
        out.push(NetStack::Networkd);
    }
    if root.join("etc/sysconfig/network-scripts").is_dir() {
        out.push(NetStack::Ifcfg);
    }
    if root.join("etc/network/interfaces").is_file() {
        out.push(NetStack::Debian);
    }
    out
}

/// One interface as it will be configured: the plan's data plus what the agent found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface<'a> {
    pub plan: &'a PlanInterface,
    /// Kernel device name (the boot NIC's real name for `BOOTIF`).
    pub device: String,
    pub mac: Option<MacAddr>,
}

impl Iface<'_> {
    fn mtu(&self) -> Option<u32> {
        let from_params = self
            .plan
            .params
            .lines()
            .filter_map(|l| l.trim().strip_prefix("MTU="))
            .filter_map(|v| v.trim().trim_matches('"').parse().ok())
            .next_back();
        from_params.or((self.plan.mtu > 0).then_some(u32::from(self.plan.mtu)))
    }

    fn infiniband(&self) -> bool {
        self.device.starts_with("ib")
    }
}

/// The interfaces of the plan with device names and MACs resolved.
pub fn ifaces<'a>(plan: &'a InstallPlan, boot_device: &str, boot_mac: Option<MacAddr>) -> Vec<Iface<'a>> {
    plan.interfaces
        .iter()
        .map(|p| {
            let boot = p.name == "BOOTIF" || p.mac.is_some() && p.mac == boot_mac;
            Iface {
                plan: p,
                device: if p.name == "BOOTIF" { boot_device.to_string() } else { p.name.clone() },
                mac: p.mac.or(if boot { boot_mac } else { None }),
            }
        })
        .collect()
}

fn uuid(node: &str, device: &str) -> String {
    let h = Sha256::digest(format!("luna/{node}/{device}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x50; // version 5 style (name based)
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &x[..8], &x[8..12], &x[12..16], &x[16..20], &x[20..])
}

pub fn networkd(i: &Iface<'_>) -> String {
    let mut s = String::from("# written by luna-agent\n[Match]\n");
    match i.mac {
        Some(mac) => writeln!(s, "MACAddress={mac}"),
        None => writeln!(s, "Name={}", i.device),
    }
    .ok();
    if let Some(mtu) = i.mtu() {
        writeln!(s, "\n[Link]\nMTUBytes={mtu}").ok();
    }
    s.push_str("\n[Network]\n");
    match i.plan.ip {
        Some(ip) => {
            writeln!(s, "Address={ip}/{}", i.plan.prefix).ok();
            if let Some(gw) = i.plan.gateway {
                writeln!(s, "Gateway={gw}").ok();
            }
            if let Some(dns) = i.plan.dns {
                writeln!(s, "DNS={dns}").ok();
            }
        }
        None => s.push_str("DHCP=ipv4\n"),
    }
    s
}

pub fn nm_keyfile(node: &str, i: &Iface<'_>) -> String {
    let kind = if i.infiniband() { "infiniband" } else { "ethernet" };
    let mut s = format!(
        "# written by luna-agent\n[connection]\nid=luna-{dev}\nuuid={uuid}\ntype={kind}\nautoconnect=true\n",
        dev = i.device,
        uuid = uuid(node, &i.device)
    );
    if i.mac.is_none() {
        writeln!(s, "interface-name={}", i.device).ok();
    }
    writeln!(s, "\n[{kind}]").ok();
    if let Some(mac) = i.mac {
        writeln!(s, "mac-address={mac}").ok();
    }
    if let Some(mtu) = i.mtu() {
        writeln!(s, "mtu={mtu}").ok();
    }
    s.push_str("\n[ipv4]\n");
    match i.plan.ip {
        Some(ip) => {
            s.push_str("method=manual\n");
            match i.plan.gateway {
                Some(gw) => writeln!(s, "address1={ip}/{},{gw}", i.plan.prefix),
                None => writeln!(s, "address1={ip}/{}", i.plan.prefix),
            }
            .ok();
            if let Some(dns) = i.plan.dns {
                writeln!(s, "dns={dns};").ok();
            }
        }
        None => s.push_str("method=auto\n"),
    }
    s.push_str("\n[ipv6]\nmethod=ignore\n");
    s
}

pub fn ifcfg(i: &Iface<'_>) -> String {
    let mut s = format!("# written by luna-agent\nDEVICE={}\nNAME={}\nONBOOT=yes\n", i.device, i.device);
    s.push_str(if i.infiniband() { "TYPE=InfiniBand\n" } else { "TYPE=Ethernet\n" });
    if let Some(mac) = i.mac {
        writeln!(s, "HWADDR={mac}").ok();
    }
    match i.plan.ip {
        Some(ip) => {
            writeln!(s, "BOOTPROTO=none\nIPADDR={ip}\nPREFIX={}", i.plan.prefix).ok();
            if let Some(gw) = i.plan.gateway {
                writeln!(s, "GATEWAY={gw}").ok();
            }
            if let Some(dns) = i.plan.dns {
                writeln!(s, "DNS1={dns}").ok();
            }
        }
        None => s.push_str("BOOTPROTO=dhcp\n"),
    }
    let params_have_mtu = i.plan.params.lines().any(|l| l.trim().starts_with("MTU="));
    if i.plan.mtu > 0 && !params_have_mtu {
        writeln!(s, "MTU={}", i.plan.mtu).ok();
    }
    for line in i.plan.params.lines().map(str::trim).filter(|l| !l.is_empty()) {
        writeln!(s, "{line}").ok();
    }
    s
}

pub fn debian_stanza(i: &Iface<'_>) -> String {
    let mut s = format!("\n# written by luna-agent\nauto {dev}\n", dev = i.device);
    match i.plan.ip {
        Some(ip) => {
            writeln!(s, "iface {} inet static\n    address {ip}/{}", i.device, i.plan.prefix).ok();
            if let Some(gw) = i.plan.gateway {
                writeln!(s, "    gateway {gw}").ok();
            }
            if let Some(dns) = i.plan.dns {
                writeln!(s, "    dns-nameservers {dns}").ok();
            }
        }
        None => {
            writeln!(s, "iface {} inet dhcp", i.device).ok();
        }
    }
    if let Some(mtu) = i.mtu() {
        writeln!(s, "    mtu {mtu}").ok();
    }
    s
}

/// `/etc/hosts` with this node's line (boot interface address, FQDN, short name), replacing an
/// earlier line for the same name.
pub fn hosts(existing: &str, plan: &InstallPlan, ifaces: &[Iface<'_>]) -> Option<String> {
    let ip = ifaces.iter().find(|i| i.plan.name == "BOOTIF").or_else(|| ifaces.first()).and_then(|i| i.plan.ip)?;
    let fqdn =
        if plan.domain.is_empty() { plan.hostname.clone() } else { format!("{}.{}", plan.hostname, plan.domain) };
    let line = if fqdn == plan.hostname {
        format!("{ip}\t{}", plan.hostname)
    } else {
        format!("{ip}\t{fqdn} {}", plan.hostname)
    };
    let mut out: String = existing
        .lines()
        .filter(|l| {
            let names: Vec<&str> = l.split('#').next().unwrap_or("").split_whitespace().skip(1).collect();
            !names.iter().any(|n| *n == plan.hostname || *n == fqdn)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    out.push_str(&line);
    out.push('\n');
    Some(out)
}

fn put(path: &Path, content: &str, mode: u32) -> Result<(), PersonalityError> {
    let err = |source| PersonalityError { path: path.display().to_string(), source };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(err)?;
    }
    // Replace rather than write through: the image may ship a symlink here.
    if fs::symlink_metadata(path).is_ok() {
        fs::remove_file(path).map_err(err)?;
    }
    fs::write(path, content).map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)
}

/// Writes hostname, interface configuration and hosts into `root`; returns the files written.
pub fn write(
    root: &Path,
    plan: &InstallPlan,
    boot_device: &str,
    boot_mac: Option<MacAddr>,
) -> Result<Vec<PathBuf>, PersonalityError> {
    let mut written = Vec::new();
    let mut emit = |rel: String, content: &str, mode: u32| -> Result<(), PersonalityError> {
        let path = root.join(rel);
        put(&path, content, mode)?;
        written.push(path);
        Ok(())
    };
    emit("etc/hostname".into(), &format!("{}\n", plan.hostname), 0o644)?;
    let ifaces = ifaces(plan, boot_device, boot_mac);
    let stacks = detect(root);
    for i in &ifaces {
        for stack in &stacks {
            match stack {
                NetStack::Networkd => {
                    emit(format!("etc/systemd/network/10-luna-{}.network", i.device), &networkd(i), 0o644)?
                }
                NetStack::NetworkManager => emit(
                    format!("etc/NetworkManager/system-connections/luna-{}.nmconnection", i.device),
                    &nm_keyfile(&plan.node, i),
                    0o600,
                )?,
                NetStack::Ifcfg => emit(format!("etc/sysconfig/network-scripts/ifcfg-{}", i.device), &ifcfg(i), 0o644)?,
                NetStack::Debian => {}
            }
        }
    }
    if stacks.contains(&NetStack::Debian) {
        let path = root.join("etc/network/interfaces");
        let mut text = fs::read_to_string(&path)
            .map_err(|source| PersonalityError { path: path.display().to_string(), source })?;
        for i in &ifaces {
            text.push_str(&debian_stanza(i));
        }
        emit("etc/network/interfaces".into(), &text, 0o644)?;
    }
    let hosts_path = root.join("etc/hosts");
    let existing = fs::read_to_string(&hosts_path).unwrap_or_else(|_| "127.0.0.1\tlocalhost\n".to_string());
    if let Some(text) = hosts(&existing, plan, &ifaces) {
        emit("etc/hosts".into(), &text, 0o644)?;
    }
    Ok(written)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    pub(crate) fn plan_iface(name: &str, mac: Option<&str>, ip: Option<&str>) -> PlanInterface {
        PlanInterface {
            name: name.into(),
            mac: mac.map(|m| m.parse().unwrap()),
            ip: ip.map(|i| i.parse().unwrap()),
            prefix: 16,
            gateway: Some("10.141.255.254".parse().unwrap()),
            dns: Some("10.141.255.253".parse().unwrap()),
            mtu: 1500,
            params: String::new(),
        }
    }

    pub(crate) fn plan() -> InstallPlan {
        InstallPlan {
            node: "node001".into(),
            hostname: "node001".into(),
            domain: "cluster".into(),
            interfaces: vec![plan_iface("BOOTIF", None, Some("10.141.0.1")), {
                let mut ib = plan_iface("ib0", None, Some("10.149.0.1"));
                ib.gateway = None;
                ib.params = "CONNECTED_MODE=yes\nMTU=65520".into();
                ib
            }],
            image: None,
            root: luna_core::model::RootMode::Tmpfs,
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
    fn renders_each_stack() {
        let p = plan();
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let ifs = ifaces(&p, "ens3", Some(mac));
        assert_eq!(ifs[0].device, "ens3");
        assert_eq!(ifs[0].mac, Some(mac));
        assert_eq!(ifs[1].mac, None);

        let n = networkd(&ifs[0]);
        assert!(n.contains("[Match]\nMACAddress=52:54:00:12:34:56\n"), "{n}");
        assert!(n.contains("Address=10.141.0.1/16\nGateway=10.141.255.254\nDNS=10.141.255.253\n"), "{n}");
        let n = networkd(&ifs[1]);
        assert!(n.contains("Name=ib0") && n.contains("MTUBytes=65520"), "{n}");

        let k = nm_keyfile("node001", &ifs[0]);
        assert!(k.contains("type=ethernet") && k.contains("mac-address=52:54:00:12:34:56"), "{k}");
        assert!(k.contains("address1=10.141.0.1/16,10.141.255.254") && k.contains("dns=10.141.255.253;"), "{k}");
        assert!(nm_keyfile("node001", &ifs[1]).contains("type=infiniband\n"));
        assert_eq!(uuid("node001", "ens3"), uuid("node001", "ens3"));
        assert_ne!(uuid("node001", "ens3"), uuid("node002", "ens3"));

        let c = ifcfg(&ifs[1]);
        assert!(
            c.contains("DEVICE=ib0\n") && c.contains("TYPE=InfiniBand") && c.contains("CONNECTED_MODE=yes\nMTU=65520"),
            "{c}"
        );
        assert!(!c.contains("MTU=1500"), "{c}");
        assert!(ifcfg(&ifs[0]).contains("HWADDR=52:54:00:12:34:56\nBOOTPROTO=none\nIPADDR=10.141.0.1\nPREFIX=16\n"));

        let d = debian_stanza(&ifs[0]);
        assert!(
            d.contains("auto ens3\niface ens3 inet static\n    address 10.141.0.1/16\n    gateway 10.141.255.254"),
            "{d}"
        );

        let mut dhcp = plan_iface("eth1", None, None);
        dhcp.mtu = 0;
        let i = Iface { plan: &dhcp, device: "eth1".into(), mac: None };
        assert!(networkd(&i).contains("DHCP=ipv4"));
        assert!(nm_keyfile("n", &i).contains("method=auto"));
        assert!(ifcfg(&i).contains("BOOTPROTO=dhcp"));
    }

    #[test]
    fn hosts_replaces_old_line() {
        let p = plan();
        let ifs = ifaces(&p, "ens3", None);
        let out = hosts("127.0.0.1 localhost\n10.0.0.9 node001.cluster node001 # old\n", &p, &ifs).unwrap();
        assert_eq!(out, "127.0.0.1 localhost\n10.141.0.1\tnode001.cluster node001\n");
    }

    #[test]
    fn writes_into_detected_stacks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["etc/NetworkManager/system-connections", "etc/systemd/network", "usr/lib/systemd", "etc/network"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("usr/lib/systemd/systemd-networkd"), "").unwrap();
        fs::write(root.join("etc/network/interfaces"), "auto lo\niface lo inet loopback\n").unwrap();
        std::os::unix::fs::symlink("/proc/sys/kernel/hostname", root.join("etc/hostname")).unwrap();
        assert_eq!(detect(root), vec![NetStack::NetworkManager, NetStack::Networkd, NetStack::Debian]);

        let p = plan();
        let files = write(root, &p, "ens3", Some("52:54:00:12:34:56".parse().unwrap())).unwrap();
        assert_eq!(fs::read_to_string(root.join("etc/hostname")).unwrap(), "node001\n");
        assert!(!root.join("etc/hostname").is_symlink());
        let nm = root.join("etc/NetworkManager/system-connections/luna-ens3.nmconnection");
        assert_eq!(fs::metadata(&nm).unwrap().mode() & 0o777, 0o600);
        assert!(root.join("etc/systemd/network/10-luna-ib0.network").is_file());
        assert!(!root.join("etc/sysconfig").exists());
        let ifs = fs::read_to_string(root.join("etc/network/interfaces")).unwrap();
        assert!(ifs.starts_with("auto lo\n") && ifs.contains("iface ib0 inet static"), "{ifs}");
        assert!(fs::read_to_string(root.join("etc/hosts")).unwrap().contains("10.141.0.1\tnode001.cluster node001"));
        assert_eq!(files.len(), 1 + 2 * 2 + 1 + 1);
    }
}
