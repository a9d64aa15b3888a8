//! The DHCP server against real clients (busybox udhcpc, ISC dhclient), over veth pairs between
//! two network namespaces this test creates. The server runs in-process, on a thread that has
//! entered the server namespace; nothing of the test touches the root namespace's network.
//!
//! Needs root: set LUNA_TEST_PRIVILEGED=1.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use luna_core::model::{Claim, Cluster, Group, Kind, Network, Node, NodeInterface, Osimage, BOOTIF};
use luna_core::MacAddr;
use luna_server::dhcp::{
    serve, DhcpConfig, DhcpError, DhcpEvent, DhcpEventKind, DhcpStatusSink, Lease, LeaseState, Versioned,
};
use luna_server::store::{Collection, Expect, Store, Write};
use serde_json::json;
use tokio_util::sync::CancellationToken;

mod netns_support;
use netns_support::Netns;

const NODE_MAC: &str = "52:54:00:aa:00:01";
const STRANGER_MAC: &str = "52:54:00:aa:00:99";
const OTHER_STRANGER_MAC: &str = "52:54:00:aa:00:98";

/// True when tests needing root may run; otherwise reports the skip (see
/// `luna_core::test_support`) and returns false.
fn privileged() -> bool {
    luna_core::test_support::gate("LUNA_TEST_PRIVILEGED")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs the clients when missing (the test bed is a fresh Debian machine).
fn ensure_tools() {
    for (tool, package) in [("busybox", "busybox-static"), ("dhclient", "isc-dhcp-client"), ("ss", "iproute2")] {
        if !have(tool) {
            run(Command::new("apt-get").args(["install", "-y", "--no-install-recommends", package]));
        }
    }
}

/// A child process killed when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default)]
struct Events(Mutex<Vec<DhcpEvent>>);

impl DhcpStatusSink for Events {
    fn dhcp_event(&self, event: DhcpEvent) {
        self.0.lock().unwrap().push(event);
    }
}

/// `serve` on its own thread inside the server namespace; stopped and joined on drop.
struct Server {
    token: CancellationToken,
    thread: Option<JoinHandle<Result<(), DhcpError>>>,
}

impl Server {
    fn start(ns: &Netns, cfg: DhcpConfig, store: Arc<dyn Store>, sink: Arc<Events>) -> Server {
        let token = CancellationToken::new();
        let path = format!("/run/netns/{}", ns.0);
        let t = token.clone();
        let thread = std::thread::spawn(move || {
            let f = File::open(&path).expect("namespace file");
            // SAFETY: setns on this thread only; the fd is valid for the call.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(serve(cfg, store, sink, t))
        });
        let server = Server { token, thread: Some(thread) };
        // Listening once port 67 shows up in the namespace.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = run(ns.exec("ss").args(["-Hlun", "sport = :67"]));
            if !out.trim().is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "the dhcp server never bound port 67");
            if server.thread.as_ref().is_some_and(|t| t.is_finished()) {
                panic!("the dhcp server stopped at start");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("dhcp server ended with an error: {e}"),
                Err(_) => eprintln!("dhcp server thread panicked"),
            }
        }
    }
}

fn put(c: Collection, key: &str, doc: serde_json::Value) -> Write {
    Write::Put { collection: c, key: key.into(), expect: Expect::Absent, doc }
}

async fn seed(store: &dyn Store) {
    let mac: MacAddr = NODE_MAC.parse().unwrap();
    let cluster = Cluster { domain: "cluster.test".into(), ..Cluster::default() };
    let mut prov = Network::new("prov", "10.77.0.0/24".parse().unwrap());
    prov.gateway = Some("10.77.0.254".parse().unwrap());
    prov.dns_server = Some("10.77.0.53".parse().unwrap());
    prov.mtu = 1400;
    let other = Network::new("other", "10.78.0.0/24".parse().unwrap());
    let image = Osimage::new("rocky9", "/images/rocky9");
    let mut group = Group::new("compute", "rocky9");
    group.domain = Some("compute.test".into());
    let mut node = Node::new("node001", "compute");
    node.mac = Some(mac);
    node.interfaces.push(NodeInterface {
        name: BOOTIF.into(),
        network: "prov".into(),
        ip: Some("10.77.0.11".parse().unwrap()),
        mac: None,
    });
    let obj = Collection::Object;
    let owner = json!({"kind": "node", "owner": "node001"});
    store
        .commit(vec![
            put(obj(Kind::Cluster), Cluster::KEY, serde_json::to_value(&cluster).unwrap()),
            put(obj(Kind::Network), "prov", serde_json::to_value(&prov).unwrap()),
            put(obj(Kind::Network), "other", serde_json::to_value(&other).unwrap()),
            put(obj(Kind::Osimage), "rocky9", serde_json::to_value(&image).unwrap()),
            put(obj(Kind::Group), "compute", serde_json::to_value(&group).unwrap()),
            put(obj(Kind::Node), "node001", serde_json::to_value(&node).unwrap()),
            put(Collection::Claim, &Claim::Mac(mac).key(), owner.clone()),
            put(
                Collection::Claim,
                &Claim::Ip { network: "prov".into(), ip: "10.77.0.11".parse().unwrap() }.key(),
                owner,
            ),
        ])
        .await
        .unwrap();
}

async fn set_range(store: &dyn Store, range: &str) {
    let rec = store.get(Collection::Object(Kind::Cluster), Cluster::KEY).await.unwrap().unwrap();
    let mut cluster: Cluster = serde_json::from_value(rec.doc).unwrap();
    cluster.dhcp_range = Some(range.parse().unwrap());
    let doc = serde_json::to_value(&cluster).unwrap();
    store
        .commit(vec![Write::Put {
            collection: Collection::Object(Kind::Cluster),
            key: Cluster::KEY.into(),
            expect: Expect::Rev(rec.rev),
            doc,
        }])
        .await
        .unwrap();
}

async fn lease_of(store: &dyn Store, ip: &str) -> Option<Lease> {
    let rec = store.get(Collection::Lease, &format!("ip/{ip}")).await.unwrap()?;
    Some(Versioned::from_record(rec).unwrap().value)
}

fn write_script(path: &Path, body: &str) {
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Parses `env` output into a map.
fn env_file(path: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

struct Clients {
    dir: PathBuf,
    udhcpc_script: PathBuf,
    runs: std::cell::Cell<u32>,
}

impl Clients {
    fn new(dir: &Path) -> Clients {
        let udhcpc_script = dir.join("udhcpc.sh");
        // Configure the address too: udhcpc sends its RELEASE from it. Every call is logged to
        // `$DHCP_OUT.calls`, so a test can wait for the `deconfig` that follows a release.
        write_script(
            &udhcpc_script,
            "#!/bin/sh\n\
             echo \"$1\" >> \"$DHCP_OUT.calls\"\n\
             case \"$1\" in\n\
             deconfig) ip addr flush dev \"$interface\" ;;\n\
             bound|renew) ip addr flush dev \"$interface\"; ip addr add \"$ip/${mask:-24}\" dev \"$interface\"; env > \"$DHCP_OUT\" ;;\n\
             nak) echo \"${message:-nak}\" >> \"$DHCP_OUT.nak\" ;;\n\
             esac\n\
             exit 0\n",
        );
        Clients { dir: dir.to_path_buf(), udhcpc_script, runs: std::cell::Cell::new(0) }
    }

    fn out(&self, tool: &str) -> PathBuf {
        self.runs.set(self.runs.get() + 1);
        self.dir.join(format!("{tool}-{}.env", self.runs.get()))
    }

    /// One udhcpc run (three tries a second apart); the env of its `bound` call, if it got one,
    /// with the messages of the NAKs it got on the way under `naks`.
    fn udhcpc(&self, ns: &Netns, iface: &str, extra: &[&str]) -> Option<BTreeMap<String, String>> {
        let out = self.out("udhcpc");
        let status = ns
            .exec("busybox")
            .args(["udhcpc", "-i", iface, "-f", "-q", "-n", "-t", "3", "-T", "1", "-s"])
            .arg(&self.udhcpc_script)
            .args(extra)
            .env("DHCP_OUT", &out)
            .output()
            .expect("run udhcpc");
        // Shown when the test fails.
        eprintln!(
            "udhcpc {iface} {extra:?}:\n{}{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&status.stderr)
        );
        let status = status.status;
        if status.success() {
            let mut env = env_file(&out);
            if let Ok(naks) = std::fs::read_to_string(format!("{}.nak", out.display())) {
                env.insert("naks".into(), naks);
            }
            Some(env)
        } else {
            assert!(!out.exists(), "udhcpc failed but wrote {}", out.display());
            None
        }
    }

    /// udhcpc kept running until bound, then told to release (SIGUSR2: `-q -R` exits before it
    /// counts as bound and sends nothing); the env of its `bound` call.
    fn udhcpc_then_release(&self, ns: &Netns, iface: &str) -> Option<BTreeMap<String, String>> {
        let out = self.out("udhcpc");
        let child = ns
            .exec("busybox")
            .args(["udhcpc", "-i", iface, "-f", "-n", "-t", "3", "-T", "1", "-s"])
            .arg(&self.udhcpc_script)
            .env("DHCP_OUT", &out)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run udhcpc");
        let guard = ChildGuard(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !out.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        let env = out.exists().then(|| env_file(&out));
        // `ip netns exec` execs udhcpc, so the child's pid is udhcpc's. It sends the RELEASE, then
        // calls the script with `deconfig`: wait for that before the guard kills it, or a loaded
        // machine kills it first and nothing is released.
        run(Command::new("kill").args(["-USR2", &guard.0.id().to_string()]));
        let calls = out.with_extension("env.calls");
        let deadline = Instant::now() + Duration::from_secs(10);
        while env.is_some() {
            let log = std::fs::read_to_string(&calls).unwrap_or_default();
            if log.lines().skip_while(|l| *l != "bound").any(|l| l == "deconfig") {
                break;
            }
            assert!(Instant::now() < deadline, "udhcpc did not release within 10 s of SIGUSR2; script calls: {log:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        env
    }

    /// dhclient in the foreground until it is bound (or 20 s pass); the env of the bound call.
    fn dhclient(&self, ns: &Netns, iface: &str) -> Option<BTreeMap<String, String>> {
        let out = self.out("dhclient");
        let lease_file = self.dir.join(format!("dhclient-{}.leases", self.runs.get()));
        let pid_file = self.dir.join(format!("dhclient-{}.pid", self.runs.get()));
        let log = self.dir.join(format!("dhclient-{}.log", self.runs.get()));
        // dhclient clears the environment for its script, so the output path is baked in.
        let script = self.dir.join(format!("dhclient-{}.sh", self.runs.get()));
        write_script(&script, &format!("#!/bin/sh\n[ \"$reason\" = BOUND ] && env > '{}'\nexit 0\n", out.display()));
        let child = ns
            .exec("dhclient")
            .args(["-d", "-1", "-4", "-cf", "/dev/null", "-sf"])
            .arg(&script)
            .arg("-lf")
            .arg(&lease_file)
            .arg("-pf")
            .arg(&pid_file)
            .arg(iface)
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("dhclient log"))
            .spawn()
            .expect("run dhclient");
        let _guard = ChildGuard(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if out.exists() {
                // The script may still be writing.
                std::thread::sleep(Duration::from_millis(100));
                return Some(env_file(&out));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("dhclient log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        None
    }
}

fn set_mac(ns: &Netns, iface: &str, mac: &str) {
    ns.ip(&["link", "set", iface, "down"]);
    ns.ip(&["addr", "flush", "dev", iface]);
    ns.ip(&["link", "set", iface, "address", mac]);
    ns.ip(&["link", "set", iface, "up"]);
}

fn wait_for_events(sink: &Events, want: &[DhcpEventKind]) -> Vec<DhcpEvent> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let got = sink.0.lock().unwrap().clone();
        let kinds: Vec<_> = got.iter().map(|e| e.kind).collect();
        if want.iter().all(|w| kinds.contains(w)) || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn real_clients_against_the_server_in_a_namespace() {
    if !privileged() {
        return;
    }
    ensure_tools();
    // RUST_LOG=luna_server::dhcp=debug shows every decision.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let tag = std::process::id() % 100_000;
    let srv = Netns::new(format!("ldhcp-s{tag}"));
    let cli = Netns::new(format!("ldhcp-c{tag}"));
    // dv0/dc0: the provisioning link the server answers on; dv1/dc1: a link it must ignore.
    for (s, c, addr) in [("dv0", "dc0", "10.77.0.1/24"), ("dv1", "dc1", "10.78.0.1/24")] {
        srv.ip(&["link", "add", s, "type", "veth", "peer", "name", c, "netns", &cli.0]);
        srv.ip(&["addr", "add", addr, "dev", s]);
        srv.ip(&["link", "set", s, "up"]);
        cli.ip(&["link", "set", c, "up"]);
    }

    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store =
        rt.block_on(luna_server::store::open(&format!("sqlite://{}", dir.path().join("luna.db").display()))).unwrap();
    rt.block_on(seed(store.as_ref()));
    let sink = Arc::new(Events::default());
    let cfg = DhcpConfig { interfaces: vec!["dv0".into()], lease_time: 600, ..DhcpConfig::default() };
    let _server = Server::start(&srv, cfg, store.clone(), sink.clone());
    let clients = Clients::new(dir.path());

    // 1. A known node, busybox udhcpc: everything it needs, and its status.
    set_mac(&cli, "dc0", NODE_MAC);
    let env = clients.udhcpc(&cli, "dc0", &[]).expect("udhcpc got no lease for the known node");
    assert_eq!(env["ip"], "10.77.0.11");
    assert_eq!(env["subnet"], "255.255.255.0");
    assert_eq!(env["router"], "10.77.0.254");
    assert_eq!(env["dns"].trim(), "10.77.0.53");
    assert_eq!(env["hostname"], "node001");
    assert_eq!(env["domain"], "compute.test");
    assert_eq!(env["mtu"], "1400");
    assert_eq!(env["serverid"], "10.77.0.1");
    assert_eq!(env["lease"], "600");
    assert!(!env.contains_key("boot_file"), "a plain client got a boot file: {env:?}");
    let events = wait_for_events(&sink, &[DhcpEventKind::Offered, DhcpEventKind::Acked]);
    let kinds: Vec<_> = events.iter().map(|e| (e.node.as_str(), e.kind, e.ip.to_string())).collect();
    assert!(kinds.contains(&("node001", DhcpEventKind::Offered, "10.77.0.11".into())), "{kinds:?}");
    assert!(kinds.contains(&("node001", DhcpEventKind::Acked, "10.77.0.11".into())), "{kinds:?}");

    // 2. The same node as a BIOS PXE ROM, then as iPXE: same address, the right file each time.
    let env = clients
        .udhcpc(&cli, "dc0", &["-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000"])
        .expect("no lease for the PXE client");
    assert_eq!(
        (env["ip"].as_str(), env["boot_file"].as_str(), env["siaddr"].as_str()),
        ("10.77.0.11", "undionly.kpxe", "10.77.0.1")
    );
    let env = clients
        .udhcpc(&cli, "dc0", &["-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007"])
        .expect("no lease for UEFI");
    assert_eq!(env["boot_file"], "ipxe.efi");
    let env = clients
        .udhcpc(&cli, "dc0", &["-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x4d:69505845"])
        .expect("no lease for iPXE");
    assert_eq!(env["ip"], "10.77.0.11");
    assert_eq!(env["bootfile"], format!("http://10.77.0.1:7050/boot/ipxe?mac={NODE_MAC}"));
    // And broadcast replies when asked for them.
    assert_eq!(clients.udhcpc(&cli, "dc0", &["-B"]).expect("no lease with -B")["ip"], "10.77.0.11");

    // 3. ISC dhclient, as dracut runs it.
    set_mac(&cli, "dc0", NODE_MAC);
    let env = clients.dhclient(&cli, "dc0").expect("dhclient got no lease for the known node");
    assert_eq!(env["new_ip_address"], "10.77.0.11");
    assert_eq!(env["new_subnet_mask"], "255.255.255.0");
    assert_eq!(env["new_routers"], "10.77.0.254");
    assert_eq!(env["new_domain_name_servers"], "10.77.0.53");
    assert_eq!(env["new_dhcp_server_identifier"], "10.77.0.1");
    assert_eq!(env["new_host_name"], "node001");
    assert_eq!(env["new_domain_name"], "compute.test");

    // 4. The known node on a link the server is not configured for: silence.
    set_mac(&cli, "dc1", NODE_MAC);
    assert_eq!(clients.udhcpc(&cli, "dc1", &[]), None, "answered on an unconfigured interface");

    // 5. A stranger with discovery off: silence, nothing stored.
    set_mac(&cli, "dc0", STRANGER_MAC);
    assert_eq!(clients.udhcpc(&cli, "dc0", &[]), None, "answered an unknown mac with discovery off");
    assert!(rt.block_on(store.list(Collection::Lease, "")).unwrap().is_empty());

    // 6. Discovery on (no restart: nothing is cached): an address from the range, leased.
    rt.block_on(set_range(store.as_ref(), "10.77.0.100-10.77.0.110"));
    let env = clients.udhcpc_then_release(&cli, "dc0").expect("no lease for the stranger with discovery on");
    let first = env["ip"].clone();
    assert_eq!(first, "10.77.0.100");
    assert_eq!(env["domain"], "cluster.test");
    assert!(!env.contains_key("hostname"));
    // It released it.
    let deadline = Instant::now() + Duration::from_secs(3);
    let lease = loop {
        let l = rt.block_on(lease_of(store.as_ref(), &first)).expect("a lease record");
        if l.state == LeaseState::Released || Instant::now() > deadline {
            break l;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!((lease.mac, lease.state), (STRANGER_MAC.parse().unwrap(), LeaseState::Released));

    // 7. Asking again: the same address, bound for the lease time.
    let env = clients.udhcpc(&cli, "dc0", &[]).expect("no lease on the second request");
    assert_eq!(env["ip"], first);
    let lease = rt.block_on(lease_of(store.as_ref(), &first)).unwrap();
    assert_eq!(lease.state, LeaseState::Bound);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(lease.expires > now + 500 && lease.expires <= now + 600, "expires {} now {now}", lease.expires);

    // 8. Another stranger gets another address; dhclient works on the dynamic path too.
    set_mac(&cli, "dc0", OTHER_STRANGER_MAC);
    let env = clients.dhclient(&cli, "dc0").expect("dhclient got no dynamic lease");
    assert_eq!(env["new_ip_address"], "10.77.0.101");
    // The known node still gets its static address, never a range one.
    set_mac(&cli, "dc0", NODE_MAC);
    assert_eq!(clients.udhcpc(&cli, "dc0", &[]).expect("known node after discovery")["ip"], "10.77.0.11");
}

/// Waits for one HTTP request on `addr` inside namespace `ns` and returns its request line.
/// Two DHCP servers (two namespaces, one bridge, one store), each with its own `[dhcp] slice` of
/// the cluster's range: the known node gets the same static address from either; strangers get
/// an address from the slice of the server they chose, without a NAK; with A stopped, strangers
/// get addresses from B's slice only, never twice the same.
#[test]
fn two_servers_split_the_discovery_range_by_slice() {
    if !privileged() {
        return;
    }
    ensure_tools();
    let tag = std::process::id() % 100_000;
    let sa = Netns::new(format!("lt-twoservers-a{tag}"));
    let sb = Netns::new(format!("lt-twoservers-b{tag}"));
    let cli = Netns::new(format!("lt-twoservers-c{tag}"));
    cli.ip(&["link", "add", "br0", "type", "bridge"]);
    cli.ip(&["link", "set", "br0", "up"]);
    for (ns, s, c, addr) in [(&sa, "sa0", "ca0", "10.77.0.1/24"), (&sb, "sb0", "cb0", "10.77.0.2/24")] {
        ns.ip(&["link", "add", s, "type", "veth", "peer", "name", c, "netns", &cli.0]);
        ns.ip(&["addr", "add", addr, "dev", s]);
        ns.ip(&["link", "set", s, "up"]);
        cli.ip(&["link", "set", c, "master", "br0", "up"]);
    }
    cli.ip(&["link", "add", "dcl", "type", "veth", "peer", "name", "dclp"]);
    cli.ip(&["link", "set", "dclp", "master", "br0", "up"]);
    cli.ip(&["link", "set", "dcl", "up"]);

    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store =
        rt.block_on(luna_server::store::open(&format!("sqlite://{}", dir.path().join("luna.db").display()))).unwrap();
    rt.block_on(seed(store.as_ref()));
    rt.block_on(set_range(store.as_ref(), "10.77.0.100-10.77.0.119"));
    let slice_a = "10.77.0.100-10.77.0.109".parse().unwrap();
    let slice_b: luna_core::model::IpRange = "10.77.0.110-10.77.0.119".parse().unwrap();
    let cfg = |iface: &str, slice| DhcpConfig {
        interfaces: vec![iface.into()],
        lease_time: 600,
        slice: Some(slice),
        ..DhcpConfig::default()
    };
    let a = Server::start(&sa, cfg("sa0", slice_a), store.clone(), Arc::default());
    let _b = Server::start(&sb, cfg("sb0", slice_b), store.clone(), Arc::default());
    let clients = Clients::new(dir.path());

    // Both answer: the known node gets its address whoever answers.
    set_mac(&cli, "dcl", NODE_MAC);
    for _ in 0..3 {
        let env = clients.udhcpc(&cli, "dcl", &[]).expect("no lease for the known node");
        assert_eq!(env["ip"], "10.77.0.11");
    }
    // Strangers while both answer: both offer, each from its slice; the client takes one and
    // that server ACKs at once (no NAK: the shared `mac/` record names only the offer written
    // last, but the chosen server finds its own in its `ip/` record), the other stays silent.
    let mut given = Vec::new();
    let mut servers = std::collections::BTreeSet::new();
    for i in 0..6u8 {
        set_mac(&cli, "dcl", &format!("52:54:00:bb:02:{i:02x}"));
        let env = clients.udhcpc(&cli, "dcl", &[]).expect("no lease while both answer");
        assert_eq!(env.get("naks"), None, "a server NAKed the offer the client chose");
        let ip: std::net::Ipv4Addr = env["ip"].parse().unwrap();
        let slice = match env["serverid"].as_str() {
            "10.77.0.1" => slice_a,
            "10.77.0.2" => slice_b,
            other => panic!("server id {other}"),
        };
        assert!(slice.contains(ip), "{ip} is not in the slice {slice} of server {}", env["serverid"]);
        assert!(!given.contains(&ip), "{ip} given twice");
        given.push(ip);
        servers.insert(env["serverid"].clone());
    }
    eprintln!("strangers were served by {servers:?}");
    // A is gone: strangers get B's slice only, the known node its address from B.
    drop(a);
    for i in 0..3u8 {
        set_mac(&cli, "dcl", &format!("52:54:00:bb:01:{i:02x}"));
        let env = clients.udhcpc(&cli, "dcl", &[]).expect("no lease from b");
        let ip: std::net::Ipv4Addr = env["ip"].parse().unwrap();
        assert_eq!(env["serverid"], "10.77.0.2");
        assert!(slice_b.contains(ip), "{ip} is not in b's slice {slice_b}");
        assert!(!given.contains(&ip), "{ip} given twice");
        given.push(ip);
    }
    set_mac(&cli, "dcl", NODE_MAC);
    let env = clients.udhcpc(&cli, "dcl", &[]).expect("no lease for the known node from b");
    assert_eq!((env["ip"].as_str(), env["serverid"].as_str()), ("10.77.0.11", "10.77.0.2"));
}

fn http_request_line(ns: &Netns, addr: &'static str) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let path = format!("/run/netns/{}", ns.0);
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write as _};
        let f = File::open(&path).expect("namespace file");
        // SAFETY: setns on this thread only; the fd is valid for the call.
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        let listener = std::net::TcpListener::bind(addr).expect("bind the http listener");
        let _ = ready_tx.send(());
        if let Ok((mut conn, _)) = listener.accept() {
            let mut line = String::new();
            let _ = BufReader::new(&conn).read_line(&mut line);
            let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = tx.send(line.trim_end().to_string());
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).expect("http listener never started");
    rx
}

#[test]
fn an_ipxe_rom_in_a_vm_gets_its_address_and_fetches_the_boot_url() {
    if !privileged() {
        return;
    }
    if !have("qemu-system-x86_64") || !Path::new("/usr/lib/ipxe/qemu").exists() {
        run(Command::new("apt-get").args(["install", "-y", "--no-install-recommends", "qemu-system-x86", "ipxe-qemu"]));
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let ns = Netns::new(format!("ldhcp-q{}", std::process::id() % 100_000));
    ns.ip(&["tuntap", "add", "dev", "tp0", "mode", "tap"]);
    ns.ip(&["addr", "add", "10.79.0.1/24", "dev", "tp0"]);
    ns.ip(&["link", "set", "tp0", "up"]);

    let vm_mac = "52:54:00:bb:00:01";
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store =
        rt.block_on(luna_server::store::open(&format!("sqlite://{}", dir.path().join("luna.db").display()))).unwrap();
    rt.block_on(async {
        let mac: MacAddr = vm_mac.parse().unwrap();
        let mut node = Node::new("vm001", "compute");
        node.mac = Some(mac);
        node.interfaces.push(NodeInterface {
            name: BOOTIF.into(),
            network: "pxe".into(),
            ip: Some("10.79.0.21".parse().unwrap()),
            mac: None,
        });
        let owner = json!({"kind": "node", "owner": "vm001"});
        store
            .commit(vec![
                put(Collection::Object(Kind::Cluster), Cluster::KEY, serde_json::to_value(Cluster::default()).unwrap()),
                put(
                    Collection::Object(Kind::Network),
                    "pxe",
                    serde_json::to_value(Network::new("pxe", "10.79.0.0/24".parse().unwrap())).unwrap(),
                ),
                put(
                    Collection::Object(Kind::Group),
                    "compute",
                    serde_json::to_value(Group::new("compute", "rocky9")).unwrap(),
                ),
                put(Collection::Object(Kind::Node), "vm001", serde_json::to_value(&node).unwrap()),
                put(Collection::Claim, &Claim::Mac(mac).key(), owner),
            ])
            .await
            .unwrap();
    });
    let sink = Arc::new(Events::default());
    let cfg = DhcpConfig { interfaces: vec!["tp0".into()], ..DhcpConfig::default() };
    let _server = Server::start(&ns, cfg, store, sink.clone());
    let http = http_request_line(&ns, "10.79.0.1:7050");

    let serial = dir.path().join("serial.log");
    let vm = ns
        .exec("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "256", "-display", "none", "-no-reboot", "-boot", "n"])
        .args(["-netdev", "tap,id=n0,ifname=tp0,script=no,downscript=no"])
        .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={vm_mac}")])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run qemu");
    let _vm = ChildGuard(vm);

    // When the ACK went out, to see how long iPXE then took to ask for its script.
    let deadline = Instant::now() + Duration::from_secs(120);
    let acked_at = loop {
        if sink.0.lock().unwrap().iter().any(|e| e.node == "vm001" && e.kind == DhcpEventKind::Acked) {
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "the VM was never acked; events: {:?}", sink.0.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    };
    let line = http
        .recv_timeout(Duration::from_secs(120))
        .unwrap_or_else(|_| panic!("the VM never fetched the boot URL; events: {:?}", sink.0.lock().unwrap()));
    let after_ack = acked_at.elapsed();
    // iPXE percent-encodes the colons; the HTTP side decodes query strings anyway.
    assert_eq!(line.replace("%3A", ":"), format!("GET /boot/ipxe?mac={vm_mac} HTTP/1.1"));
    // Debian's iPXE also configures IPv6 and boots only once that is done too: without the
    // server's answer to its router solicitations it waited about 15 s here after the ACK.
    assert!(
        after_ack < Duration::from_secs(8),
        "iPXE asked for its script {after_ack:?} after the ack: it waited for IPv6 configuration"
    );
    eprintln!("iPXE asked for its script {after_ack:?} after the dhcp ack");
    let events = wait_for_events(&sink, &[DhcpEventKind::Acked]);
    assert!(
        events.iter().any(|e| e.node == "vm001" && e.kind == DhcpEventKind::Acked && e.ip.to_string() == "10.79.0.21"),
        "{events:?}"
    );
}
