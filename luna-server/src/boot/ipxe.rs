//! iPXE scripts for booting nodes, as pure functions of their inputs.
//!
//! # URLs
//! A node's iPXE fetches [`boot_url`] (`<base>/boot/ipxe?mac=${netX/mac}`): the HTTP layer
//! answers with [`render_node_script`] for a known MAC, [`render_menu`] for an unknown one and
//! [`render_error`] when it cannot decide. [`bind_url`] (`<base>/boot/ipxe/bind?mac=…&node=…`)
//! binds the MAC to a node and answers with [`render_rebound`] (DHCP again, then `boot_url`). The MAC is `${netX/mac}`, not
//! `${net0/mac}`: `netX` is the interface iPXE last opened, i.e. the one it booted from, which
//! is not net0 on a machine that PXE-boots from its second port.
//!
//! # Escaping
//! iPXE has no quoting: a line is split at whitespace, a token starting with `#` starts a
//! comment, the tokens `||`, `&&` and `;` chain commands, `${…}` is expanded anywhere (with no
//! way to escape it), a trailing `\` joins the next line, and options are parsed until the
//! first argument not starting with `-`. So every value from the outside is reduced to what
//! cannot trigger any of that: URLs and kernel argument values are percent-encoded outside a
//! safe set, display text loses `$`, comment/chaining tokens and line breaks, and user text
//! never comes first on a line (a fixed word like `luna:` or a generated label precedes it).
//!
//! # Kernel command line and dracut
//! `ip=<ip>::<gw>:<mask>:<host>::none BOOTIF=01-<mac-with-dashes>`:
//! - `BOOTIF=` (pxelinux's form) makes that NIC dracut's boot device: network-legacy's udev
//!   rule runs `ifup` only for the NIC with that address (`net-genrules.sh`), whatever name the
//!   kernel gave it (eth1, ens3f1, …), the initqueue waits for exactly it, and luna's agent
//!   reads its MAC from there as well;
//! - the interface field of `ip=` is empty, so the static address applies to the one NIC
//!   `ifup` runs for: the one that PXE-booted. A name cannot go there (it is unknown) and
//!   neither can the MAC: the colon form collides with `ip=`'s separators and the dash form,
//!   which `ifup.sh` would resolve too, makes the cmdline hook warn "Network interface
//!   '52-54-…' does not exist" on every boot (it checks `/sys/class/net/<field>`);
//! - no `ifname=` renaming: a renamed NIC keeps its name after switch-root and would break
//!   the installed system's network configuration;
//! - no `rd.neednet=1`: with it dracut would also wait for a "did-setup" marker named after
//!   the dash form, which is never written;
//! - DNS servers go in `nameserver=` (one each), the domain in `luna.domain=` for the agent
//!   (dracut's static configuration has no search-domain field).

use luna_core::api::percent_encode as query_value;
use std::net::{IpAddr, Ipv4Addr};

use luna_core::mac::MacAddr;

/// Seconds a failing script waits before it tries again.
pub const RETRY_SECS: u32 = 10;
/// Suggested [`MenuInput::timeout_secs`]: how long the unknown-machine menu waits before it
/// asks the server again.
pub const MENU_TIMEOUT_SECS: u32 = 60;
/// The name iPXE gives the initrd image; the kernel's EFI stub loads it by this name.
pub const INITRD_NAME: &str = "initrd.img";

/// What the server knows about a node when it boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeBoot {
    /// Node name (`luna.node=`).
    pub name: String,
    /// The MAC it booted from.
    pub mac: MacAddr,
    /// Boot interface address, netmask and gateway.
    pub ip: Ipv4Addr,
    pub netmask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub dns: Vec<IpAddr>,
    /// Host name set in the initramfs (usually the node name).
    pub hostname: String,
    pub domain: Option<String>,
    /// Server base URL, e.g. `http://10.141.255.254:7050`.
    pub base_url: String,
    pub kernel_url: String,
    pub initrd_url: String,
    /// Base URLs of the cluster's other luna-servers: the kernel and initramfs are tried there,
    /// in order, when the answering server does not deliver them (the same paths).
    pub fallback_bases: Vec<String>,
    /// The osimage's kernel options, appended last.
    pub kernel_opts: String,
    /// Boot from the local disk instead.
    pub localboot: bool,
    /// Boot luna's kernel into the service shell (`luna.service=1`); wins over `localboot`.
    pub service: bool,
    /// Per-boot secret the agent presents to the server (`luna.token=`).
    pub token: String,
}

/// What the menu for an unknown MAC offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MenuInput {
    pub base_url: String,
    /// Nodes without a MAC, offered for binding, in display order.
    pub unbound_nodes: Vec<String>,
    /// Seconds before the default entry is chosen by itself; 0 waits for a key forever.
    pub timeout_secs: u32,
    /// Switch-port discovery's "look for this machine now" (see [`discover_url`]): the default
    /// entry when set, else "ask again" is.
    pub discover_url: Option<String>,
    /// A line shown above the menu (why the machine was not recognised).
    pub note: Option<String>,
}

/// Seconds the menu waits before switch-port discovery's entry is chosen by itself.
pub const DISCOVER_MENU_SECS: u32 = 3;

/// The URL that asks the server to poll the switches now and bind this machine by its port;
/// `attempt` counts the tries (the server answers with the next one or the menu).
pub fn discover_url(base_url: &str, attempt: u32) -> String {
    format!("{}/boot/ipxe/discover?mac=${{netX/mac}}&try={attempt}", url(base_url.trim_end_matches('/')))
}

/// A script that says the switches have not learned this machine yet, waits `pause_secs` and
/// asks again (`next` is a [`discover_url`]).
pub fn render_discover_wait(next: &str, attempt: u32, tries: u32, pause_secs: u32) -> String {
    format!(
        "#!ipxe\n\
         :retry\n\
         echo luna: no switch has learned this machine's port yet (try {attempt} of {tries}), looking again in {pause_secs} s\n\
         sleep {pause_secs}\n\
         chain --replace --autofree {next} || goto retry\n"
    )
}

/// The URL a node's iPXE chains to; the server answers with one of the scripts here.
pub fn boot_url(base_url: &str) -> String {
    format!("{}/boot/ipxe?mac=${{netX/mac}}", url(base_url.trim_end_matches('/')))
}

/// The URL that binds this machine's MAC to `node` (already in URL form, see [`render_menu`]).
pub fn bind_url(base_url: &str, node_query_value: &str) -> String {
    format!("{}/boot/ipxe/bind?mac=${{netX/mac}}&node={node_query_value}", url(base_url.trim_end_matches('/')))
}

/// Percent-encodes what iPXE's tokenizer or expander would act on, keeping URL syntax.
fn url(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b <= b' ' || b >= 0x7f || matches!(b, b'$' | b'{' | b'}' | b'\\' | b'#' | b'"' | b'\'') {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

/// A value inside one kernel argument (`luna.node=<value>`): a conservative character set,
/// percent-encoded otherwise, so it can be neither split nor expanded. Valid names and
/// tokens pass unchanged.
fn arg_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'@' | b',') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A token iPXE would read as syntax rather than as an argument.
fn is_syntax_token(t: &str) -> bool {
    t.starts_with('#') || matches!(t, "||" | "&&" | ";") || t.contains("${")
}

/// Kernel options from the osimage: kept token by token, minus tokens iPXE would act on.
fn kernel_opts(s: &str) -> String {
    let cleaned: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let tokens: Vec<&str> = cleaned.split_whitespace().filter(|t| !is_syntax_token(t)).collect();
    tokens.join(" ")
}

/// Text for `echo`, `menu` and `item`: printable, no expansion, no syntax tokens, no line
/// continuation. Never empty (iPXE's `item` needs its text for a visible entry).
fn display(s: &str) -> String {
    let cleaned: String = s.chars().filter(|&c| c != '$').map(|c| if c.is_control() { ' ' } else { c }).collect();
    let tokens: Vec<&str> = cleaned
        .split_whitespace()
        .map(|t| t.trim_start_matches('#'))
        .filter(|t| !t.is_empty() && !matches!(*t, "||" | "&&" | ";"))
        .collect();
    let joined = tokens.join(" ");
    let joined = joined.trim_end_matches('\\').trim_end().to_string();
    if joined.is_empty() {
        "?".to_string()
    } else {
        joined
    }
}

fn dashed(mac: &MacAddr) -> String {
    mac.to_string().replace(':', "-")
}

/// A host name for dracut's `ip=`: letters, digits, `-` and `.` only; else the node name.
fn host_field(hostname: &str, fallback: &str) -> String {
    let pick =
        |s: &str| -> String { s.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.')).collect() };
    let h = pick(hostname);
    if h.is_empty() {
        pick(fallback)
    } else {
        h
    }
}

/// The kernel command line (without the kernel URL) for a node.
pub fn kernel_cmdline(n: &NodeBoot) -> String {
    let mac = dashed(&n.mac);
    let gw = n.gateway.map(|g| g.to_string()).unwrap_or_default();
    let mut args = vec![
        format!("initrd={INITRD_NAME}"),
        "root=luna".to_string(),
        format!("luna.url={}", url(n.base_url.trim_end_matches('/'))),
        format!("luna.node={}", arg_value(&n.name)),
        format!("luna.mac={}", n.mac),
        format!("luna.token={}", arg_value(&n.token)),
        format!("BOOTIF=01-{mac}"),
        format!("ip={}::{gw}:{}:{}::none", n.ip, n.netmask, host_field(&n.hostname, &n.name)),
    ];
    if !n.fallback_bases.is_empty() {
        // The agent's plan fetch and status reports go to the next server when one is down.
        let bases: Vec<String> =
            n.fallback_bases.iter().map(|b| url(b.trim_end_matches('/')).replace(',', "%2C")).collect();
        args.push(format!("luna.fallback={}", bases.join(",")));
    }
    args.extend(n.dns.iter().map(|d| format!("nameserver={d}")));
    if let Some(domain) = n.domain.as_deref().filter(|d| !d.is_empty()) {
        args.push(format!("luna.domain={}", arg_value(domain)));
    }
    if n.service {
        args.push("luna.service=1".to_string());
    }
    let opts = kernel_opts(&n.kernel_opts);
    if !opts.is_empty() {
        args.push(opts);
    }
    args.join(" ")
}

/// The script for a known node: luna's kernel and initramfs (normal or service), or the
/// local disk. Every failure leads to a pause and a new attempt, never to the next line.
pub fn render_node_script(n: &NodeBoot) -> String {
    let name = display(&n.name);
    if n.localboot && !n.service {
        return format!(
            "#!ipxe\n\
             # luna: node {name} has localboot set: boot the local disk\n\
             echo luna: {name}: booting from the local disk\n\
             # BIOS: boot the first disk directly, as some firmware hangs when PXE returns.\n\
             iseq ${{platform}} pcbios || goto firmware\n\
             sanboot --no-describe --drive 0x80 || goto firmware\n\
             :firmware\n\
             # UEFI (or no bootable BIOS disk): back to the firmware's next boot entry, with a\n\
             # failure status: on success the UEFI boot manager stops and shows its menu (OVMF).\n\
             exit 1\n"
        );
    }
    let what = if n.service { "service mode" } else { "install and boot" };
    let cmdline = kernel_cmdline(n);
    // `a || b || goto failed`: each server in turn, the answering one first.
    let alternatives = |first: &str, line: &dyn Fn(&str) -> String| {
        let mut parts = vec![line(first)];
        if let Some(path) = first.strip_prefix(n.base_url.trim_end_matches('/')) {
            parts.extend(n.fallback_bases.iter().map(|b| line(&format!("{}{path}", b.trim_end_matches('/')))));
        }
        parts.join(" || ")
    };
    let kernel = alternatives(&n.kernel_url, &|u| format!("kernel {} {cmdline}", url(u)));
    let initrd = alternatives(&n.initrd_url, &|u| format!("initrd --name {INITRD_NAME} {}", url(u)));
    format!(
        "#!ipxe\n\
         # luna: node {name} ({mac}): {what}\n\
         :retry\n\
         echo luna: {name}: loading kernel and initramfs\n\
         {kernel} || goto failed\n\
         {initrd} || goto failed\n\
         boot || goto failed\n\
         :failed\n\
         echo luna: {name}: boot failed, retrying in {RETRY_SECS} seconds\n\
         imgfree\n\
         sleep {RETRY_SECS}\n\
         goto retry\n",
        mac = n.mac,
    )
}

/// The menu for a MAC luna does not know. "Ask again" is the default (taken after the
/// timeout), so an unattended machine keeps asking until the server recognises it, e.g. by
/// its switch port.
pub fn render_menu(m: &MenuInput) -> String {
    let again = boot_url(&m.base_url);
    let mut s = String::from("#!ipxe\n# luna: this MAC address is not known\n");
    if let Some(note) = &m.note {
        s.push_str(&format!("echo luna: {}\n", display(note)));
    }
    s.push_str(":menu\n");
    s.push_str("menu luna: unknown machine ${netX/mac}\n");
    s.push_str("item --gap luna does not know this machine yet\n");
    if m.discover_url.is_some() {
        s.push_str("item discover Find this machine by its switch port\n");
    }
    s.push_str("item again Ask luna again\n");
    if !m.unbound_nodes.is_empty() {
        s.push_str("item --gap Boot as one of the nodes without a MAC address:\n");
        for (i, node) in m.unbound_nodes.iter().enumerate() {
            s.push_str(&format!("item node{i} {}\n", display(node)));
        }
    }
    s.push_str("item --gap Other:\n");
    s.push_str("item name Type a node name\n");
    s.push_str("item shell iPXE shell\n");
    s.push_str("item reboot Reboot\n");
    s.push_str("item exit Exit to the firmware (next boot device)\n");
    let timeout = if m.timeout_secs == 0 { String::new() } else { format!(" --timeout {}", m.timeout_secs * 1000) };
    let default = if m.discover_url.is_some() { "discover" } else { "again" };
    s.push_str(&format!("choose --default {default}{timeout} target || goto menu\n"));
    s.push_str("goto ${target}\n");
    if let Some(d) = &m.discover_url {
        s.push_str(&format!(":discover\nchain --replace --autofree {d} || goto failed\n"));
    }
    s.push_str(&format!(":again\nchain --replace --autofree {again} || goto failed\n"));
    for (i, node) in m.unbound_nodes.iter().enumerate() {
        let bind = bind_url(&m.base_url, &query_value(node));
        s.push_str(&format!(":node{i}\nchain --replace --autofree {bind} || goto failed\n"));
    }
    // `read` takes a whole line; `:uristring` percent-encodes it for the query.
    s.push_str(":name\necho -n luna: node name: && read lunanode || goto menu\n");
    s.push_str("isset ${lunanode} || goto menu\n");
    s.push_str(&format!(
        "chain --replace --autofree {} || goto failed\n",
        bind_url(&m.base_url, "${lunanode:uristring}")
    ));
    s.push_str(":shell\nshell\ngoto menu\n");
    s.push_str(":reboot\nreboot\ngoto menu\n");
    s.push_str(":exit\nexit\n");
    s.push_str(&format!(
        ":failed\necho luna: the server did not answer, back to the menu in {RETRY_SECS} seconds\n\
         sleep {RETRY_SECS}\ngoto menu\n"
    ));
    s
}

/// What a request for a known node's script from another address gets: `msg`, then DHCP again
/// and the script asked for once more. A machine whose MAC an admin bound while it sat in the
/// discovery menu still has its discovery address; DHCP now gives it the node's, and its next
/// request gets the node's script. Anyone else learns nothing and gets their own address again.
/// The pause keeps a machine that DHCP never gives the node's address from hammering the server.
pub fn render_refused_redhcp(base_url: &str, msg: &str) -> String {
    let lead = format!(
        "echo luna: {msg}\n\
         echo luna: asking DHCP again in {REDHCP_PAUSE_SECS} seconds\n\
         sleep {REDHCP_PAUSE_SECS}\n",
        msg = display(msg),
    );
    redhcp_then_ask_again(base_url, &lead)
}

/// Pause before a refused machine asks DHCP again.
pub const REDHCP_PAUSE_SECS: u32 = 3;

/// What a machine gets once the menu bound its MAC: it still has its discovery address, so it asks
/// DHCP again (now for the node's own address) and fetches its script from there; only a request
/// from that address gets the node's token.
pub fn render_rebound(base_url: &str) -> String {
    redhcp_then_ask_again(base_url, "echo luna: mac bound, asking DHCP for the node's address\n")
}

/// `lead`, then DHCP again and `boot_url` once more, retrying both every [`RETRY_SECS`].
fn redhcp_then_ask_again(base_url: &str, lead: &str) -> String {
    format!(
        "#!ipxe\n\
         {lead}\
         :retry\n\
         dhcp || goto failed\n\
         chain --replace --autofree {again} || goto failed\n\
         :failed\n\
         echo luna: asking again in {RETRY_SECS} seconds\n\
         sleep {RETRY_SECS}\n\
         goto retry\n",
        again = boot_url(base_url),
    )
}

/// A script that shows `msg`, waits and asks the server again.
pub fn render_error(base_url: &str, msg: &str) -> String {
    format!(
        "#!ipxe\n\
         :retry\n\
         echo luna: {msg}\n\
         echo luna: asking again in {RETRY_SECS} seconds\n\
         sleep {RETRY_SECS}\n\
         chain --replace --autofree {again} || goto retry\n",
        msg = display(msg),
        again = boot_url(base_url),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_request_asks_dhcp_again_after_a_pause() {
        let s = render_refused_redhcp("http://10.141.255.254:7050", "boot refused: not from the node's address");
        assert!(s.starts_with("#!ipxe\n"), "{s}");
        assert!(s.contains("echo luna: boot refused: not from the node"), "{s}");
        let (pause, dhcp) = (s.find("sleep 3").unwrap(), s.find("dhcp || goto failed").unwrap());
        assert!(pause < dhcp, "{s}");
        assert!(s.contains("chain --replace --autofree http://10.141.255.254:7050/boot/ipxe?mac=${netX/mac}"), "{s}");
    }

    #[test]
    fn kernel_and_initrd_fall_back_to_the_other_servers_in_order() {
        let mut n = node();
        n.fallback_bases = vec!["http://10.141.255.253:7050".into(), "http://10.141.255.252:7050/".into()];
        let s = render_node_script(&n);
        let kernel = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
        let parts: Vec<&str> = kernel.split(" || ").collect();
        assert_eq!(parts.len(), 4, "{kernel}");
        assert!(parts[0].starts_with("kernel http://10.141.255.254:7050/boot/compute/vmlinuz "), "{kernel}");
        assert!(parts[1].starts_with("kernel http://10.141.255.253:7050/boot/compute/vmlinuz "), "{kernel}");
        assert!(parts[2].starts_with("kernel http://10.141.255.252:7050/boot/compute/vmlinuz "), "{kernel}");
        assert!(parts[1].contains("luna.token=tok-123_ABC"), "the same command line: {kernel}");
        assert!(
            parts[0].contains(" luna.fallback=http://10.141.255.253:7050,http://10.141.255.252:7050 "),
            "the agent gets the other servers: {kernel}"
        );
        assert_eq!(parts[3], "goto failed");
        let initrd = s.lines().find(|l| l.starts_with("initrd ")).unwrap();
        assert_eq!(
            initrd,
            "initrd --name initrd.img http://10.141.255.254:7050/boot/compute/initrd.img || initrd --name initrd.img http://10.141.255.253:7050/boot/compute/initrd.img || initrd --name initrd.img http://10.141.255.252:7050/boot/compute/initrd.img || goto failed"
        );
        // one server: the script is as before
        let single = render_node_script(&node());
        assert!(single.contains("\nkernel http://10.141.255.254:7050/boot/compute/vmlinuz "), "{single}");
        assert_eq!(single.matches(" || ").count(), 3, "kernel, initrd, boot: {single}");
        assert!(!single.contains("luna.fallback"), "{single}");
    }

    fn node() -> NodeBoot {
        NodeBoot {
            name: "node001".into(),
            mac: "52:54:00:12:34:56".parse().unwrap(),
            ip: Ipv4Addr::new(10, 141, 0, 1),
            netmask: Ipv4Addr::new(255, 255, 0, 0),
            gateway: Some(Ipv4Addr::new(10, 141, 255, 254)),
            dns: vec!["10.141.255.254".parse().unwrap(), "fd00::53".parse().unwrap()],
            hostname: "node001".into(),
            domain: Some("cluster".into()),
            base_url: "http://10.141.255.254:7050/".into(),
            kernel_url: "http://10.141.255.254:7050/boot/compute/vmlinuz".into(),
            initrd_url: "http://10.141.255.254:7050/boot/compute/initrd.img".into(),
            fallback_bases: Vec::new(),
            kernel_opts: "console=ttyS0,115200n8  quiet".into(),
            localboot: false,
            service: false,
            token: "tok-123_ABC".into(),
        }
    }

    #[test]
    fn normal_node_script() {
        let expected = "#!ipxe
# luna: node node001 (52:54:00:12:34:56): install and boot
:retry
echo luna: node001: loading kernel and initramfs
kernel http://10.141.255.254:7050/boot/compute/vmlinuz initrd=initrd.img root=luna luna.url=http://10.141.255.254:7050 luna.node=node001 luna.mac=52:54:00:12:34:56 luna.token=tok-123_ABC BOOTIF=01-52-54-00-12-34-56 ip=10.141.0.1::10.141.255.254:255.255.0.0:node001::none nameserver=10.141.255.254 nameserver=fd00::53 luna.domain=cluster console=ttyS0,115200n8 quiet || goto failed
initrd --name initrd.img http://10.141.255.254:7050/boot/compute/initrd.img || goto failed
boot || goto failed
:failed
echo luna: node001: boot failed, retrying in 10 seconds
imgfree
sleep 10
goto retry
";
        assert_eq!(render_node_script(&node()), expected);
    }

    #[test]
    fn service_node_gets_the_flag_and_no_gateway_field() {
        let mut n = node();
        n.service = true;
        n.localboot = true;
        n.gateway = None;
        n.dns.clear();
        n.domain = None;
        n.kernel_opts = String::new();
        let s = render_node_script(&n);
        let kernel_line = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
        assert_eq!(
            kernel_line,
            "kernel http://10.141.255.254:7050/boot/compute/vmlinuz initrd=initrd.img root=luna \
             luna.url=http://10.141.255.254:7050 luna.node=node001 luna.mac=52:54:00:12:34:56 \
             luna.token=tok-123_ABC BOOTIF=01-52-54-00-12-34-56 \
             ip=10.141.0.1:::255.255.0.0:node001::none luna.service=1 || goto failed"
        );
        assert!(s.starts_with("#!ipxe\n# luna: node node001 (52:54:00:12:34:56): service mode\n"));
    }

    #[test]
    fn localboot_script() {
        let mut n = node();
        n.localboot = true;
        let expected = "#!ipxe
# luna: node node001 has localboot set: boot the local disk
echo luna: node001: booting from the local disk
# BIOS: boot the first disk directly, as some firmware hangs when PXE returns.
iseq ${platform} pcbios || goto firmware
sanboot --no-describe --drive 0x80 || goto firmware
:firmware
# UEFI (or no bootable BIOS disk): back to the firmware's next boot entry, with a
# failure status: on success the UEFI boot manager stops and shows its menu (OVMF).
exit 1
";
        assert_eq!(render_node_script(&n), expected);
    }

    #[test]
    fn hostile_values_cannot_inject_ipxe_syntax() {
        let mut n = node();
        n.name = "evil ${net0/ip} || shell\n#x".into();
        n.token = "a b;c&&d".into();
        n.hostname = "h$o{s}t name".into();
        n.kernel_opts = "quiet || shell ; && #comment ${x} a\nb rd.break\\".into();
        n.kernel_url = "http://s/k ernel${x}#frag".into();
        n.domain = Some("clu ster".into());
        let s = render_node_script(&n);
        let kernel_line = s.lines().find(|l| l.starts_with("kernel ")).unwrap();
        assert_eq!(
            kernel_line,
            "kernel http://s/k%20ernel%24%7Bx%7D%23frag initrd=initrd.img root=luna \
             luna.url=http://10.141.255.254:7050 luna.node=evil%20%24%7Bnet0/ip%7D%20%7C%7C%20shell%0A%23x \
             luna.mac=52:54:00:12:34:56 luna.token=a%20b%3Bc%26%26d BOOTIF=01-52-54-00-12-34-56 \
             ip=10.141.0.1::10.141.255.254:255.255.0.0:hostname::none \
             nameserver=10.141.255.254 nameserver=fd00::53 luna.domain=clu%20ster quiet shell a b rd.break\\ || goto failed"
        );
        // The display name loses `$`, the chaining token and the comment marker.
        assert!(s.contains("\necho luna: evil {net0/ip} shell x: loading kernel and initramfs\n"));
        for line in s.lines() {
            let tokens: Vec<&str> = line.split_whitespace().collect();
            // Only our own `|| goto failed` may chain, and nothing may expand but ${platform}.
            let chains = tokens.iter().filter(|t| matches!(**t, "||" | "&&" | ";")).count();
            assert!(chains <= 1, "{line}");
            assert!(!line.contains("${") || line.contains("${platform}"), "{line}");
        }
    }

    #[test]
    fn menu_lists_unbound_nodes_and_escapes_them() {
        let m = MenuInput {
            base_url: "http://10.141.255.254:7050".into(),
            unbound_nodes: vec!["node002".into(), "odd name&x=${y}".into()],
            timeout_secs: 60,
            discover_url: None,
            note: None,
        };
        let expected = "#!ipxe
# luna: this MAC address is not known
:menu
menu luna: unknown machine ${netX/mac}
item --gap luna does not know this machine yet
item again Ask luna again
item --gap Boot as one of the nodes without a MAC address:
item node0 node002
item node1 odd name&x={y}
item --gap Other:
item name Type a node name
item shell iPXE shell
item reboot Reboot
item exit Exit to the firmware (next boot device)
choose --default again --timeout 60000 target || goto menu
goto ${target}
:again
chain --replace --autofree http://10.141.255.254:7050/boot/ipxe?mac=${netX/mac} || goto failed
:node0
chain --replace --autofree http://10.141.255.254:7050/boot/ipxe/bind?mac=${netX/mac}&node=node002 || goto failed
:node1
chain --replace --autofree http://10.141.255.254:7050/boot/ipxe/bind?mac=${netX/mac}&node=odd%20name%26x%3D%24%7By%7D || goto failed
:name
echo -n luna: node name: && read lunanode || goto menu
isset ${lunanode} || goto menu
chain --replace --autofree http://10.141.255.254:7050/boot/ipxe/bind?mac=${netX/mac}&node=${lunanode:uristring} || goto failed
:shell
shell
goto menu
:reboot
reboot
goto menu
:exit
exit
:failed
echo luna: the server did not answer, back to the menu in 10 seconds
sleep 10
goto menu
";
        assert_eq!(render_menu(&m), expected);
    }

    #[test]
    fn menu_without_unbound_nodes_or_timeout() {
        let m = MenuInput {
            base_url: "http://s:7050/".into(),
            unbound_nodes: vec![],
            timeout_secs: 0,
            discover_url: None,
            note: None,
        };
        let s = render_menu(&m);
        assert!(!s.contains("without a MAC"));
        assert!(!s.contains(":node0"));
        assert!(s.contains("\nchoose --default again target || goto menu\n"));
        assert!(
            s.contains("\n:again\nchain --replace --autofree http://s:7050/boot/ipxe?mac=${netX/mac} || goto failed\n")
        );
    }

    #[test]
    fn error_script() {
        let expected = "#!ipxe
:retry
echo luna: node node001 has no osimage
echo luna: asking again in 10 seconds
sleep 10
chain --replace --autofree http://s:7050/boot/ipxe?mac=${netX/mac} || goto retry
";
        assert_eq!(render_error("http://s:7050", "node node001 has no osimage"), expected);
    }

    #[test]
    fn error_message_is_defused() {
        let s = render_error("http://s:7050", "-n ${x}\n:retry\ngoto evil || #c\\");
        assert_eq!(s.lines().nth(2), Some("echo luna: -n {x} :retry goto evil c"));
        assert_eq!(render_error("http://s", "$$\n").lines().nth(2), Some("echo luna: ?"));
    }

    #[test]
    fn urls() {
        assert_eq!(boot_url("http://h:1/"), "http://h:1/boot/ipxe?mac=${netX/mac}");
        assert_eq!(bind_url("http://h:1", "n%201"), "http://h:1/boot/ipxe/bind?mac=${netX/mac}&node=n%201");
        assert_eq!(query_value("a b/c~d"), "a%20b%2Fc~d");
    }

    #[test]
    fn menu_with_discovery_defaults_to_it() {
        let m = MenuInput {
            base_url: "http://s:7050".into(),
            unbound_nodes: vec!["node002".into()],
            timeout_secs: DISCOVER_MENU_SECS,
            discover_url: Some(discover_url("http://s:7050", 1)),
            note: Some("mac learned on switch sw1 port 9; no node is configured for it ${x}".into()),
        };
        let s = render_menu(&m);
        assert!(s.contains("\nitem discover Find this machine by its switch port\n"), "{s}");
        assert!(s.contains("\nchoose --default discover --timeout 3000 target || goto menu\n"), "{s}");
        assert!(s.contains("\n:discover\nchain --replace --autofree http://s:7050/boot/ipxe/discover?mac=${netX/mac}&try=1 || goto failed\n"), "{s}");
        assert!(s.contains("\necho luna: mac learned on switch sw1 port 9; no node is configured for it {x}\n"), "{s}");
        assert!(s.contains(":node0\n") && s.contains("item name Type a node name"));
        let w = render_discover_wait(&discover_url("http://s:7050", 3), 2, 5, 2);
        assert!(w.contains("(try 2 of 5)") && w.contains("sleep 2\n"));
        assert!(
            w.contains(
                "chain --replace --autofree http://s:7050/boot/ipxe/discover?mac=${netX/mac}&try=3 || goto retry\n"
            ),
            "{w}"
        );
    }
}
