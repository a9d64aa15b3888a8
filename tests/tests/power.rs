//! `lpower` against simulated BMCs (privileged: `LUNA_TEST_PRIVILEGED=1`).
//!
//! IPMI: 8 OpenIPMI `ipmi_sim` BMCs, each on its own address in a network namespace, with a
//! lanplus admin user and a chassis program that keeps the power state and boot device in files;
//! luna-server in the same namespace. Every state lpower sets is read back independently with
//! `ipmitool -I lanplus`. Redfish: two `sushy-emulator`s (fake driver, HTTPS with a self-signed
//! certificate), checked through their own API with curl.
//! Both check that the BMC password is in no CLI output, API answer or server log.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use luna_tests::{cargo_bin, ipmi_sim, privileged, require_tool, work_dir, ChildGuard, Netns};
use serde_json::Value;

const GOOD_PASSWORD: &str = "s3cr3t-lpw";
const BAD_PASSWORD: &str = "wr0ng-lpw";
const LISTEN: &str = "127.0.0.1:7150";
/// The admin API (HTTPS) of the server under test.
const API_LISTEN: &str = "127.0.0.1:7151";
/// `[power] timeout_secs` of the test server (keeps the dead-BMC case short).
const TIMEOUT_SECS: u64 = 2;

/// luna-server in its own namespace with a scratch directory.
struct Server {
    _server: ChildGuard,
    dir: tempfile::TempDir,
    /// Dropped last: everything runs inside.
    ns: Netns,
}

impl Server {
    fn start(ns: Netns) -> Server {
        std::fs::create_dir_all(work_dir()).unwrap();
        let dir = tempfile::Builder::new().prefix("lpower-").tempdir_in(work_dir()).unwrap();
        let d = dir.path();
        let config = format!(
            "store = \"sqlite://{db}\"\nlisten = \"{LISTEN}\"\ntoken_file = \"{token}\"\ndata_dir = \"{data}\"\n\
             [http]\napi_listen = \"{API_LISTEN}\"\n\
             [tftp]\nroot = \"{tftp}\"\nbind = \"127.0.0.1:6969\"\n[image]\nseed = false\n\
             [power]\ntimeout_secs = {TIMEOUT_SECS}\n",
            db = d.join("luna.db").display(),
            token = d.join("token").display(),
            data = d.join("data").display(),
            tftp = d.join("tftpboot").display(),
        );
        std::fs::write(d.join("luna.toml"), config).unwrap();
        let bin = cargo_bin("luna-server").unwrap();
        let status = Command::new(&bin).arg("--config").arg(d.join("luna.toml")).arg("init").status().unwrap();
        assert!(status.success(), "luna-server init");
        let mut cmd = ns.command(&bin);
        cmd.arg("--config").arg(d.join("luna.toml")).env("RUST_LOG", "debug");
        let server = ChildGuard::spawn(&mut cmd, "luna-server").unwrap();
        server.wait_for("http listening", Duration::from_secs(60)).unwrap();
        Server { _server: server, dir, ns }
    }

    fn command(&self, bin: &str, args: &[&str]) -> std::process::Command {
        let mut cmd = self.ns.command(cargo_bin(bin).unwrap());
        cmd.args(args)
            .env("LUNA_SERVER", format!("https://{API_LISTEN}"))
            .env("LUNA_CA", self.dir.path().join("data/tls/ca.pem"))
            .env("LUNA_TOKEN_FILE", self.dir.path().join("token"))
            .env_remove("LUNA_TOKEN")
            .env_remove("LUNA_BMC_PASSWORD");
        cmd
    }

    fn run(&self, bin: &str, args: &[&str]) -> Output {
        self.command(bin, args).output().unwrap()
    }

    /// `luna bmcsetup add ...` with the password as an admin gives it: from the environment,
    /// never on the command line.
    fn bmcsetup_add(&self, password: &str, args: &[&str]) {
        let out = self
            .command("luna", &[&["bmcsetup", "add"], args, &["--password-from-env"]].concat())
            .env("LUNA_BMC_PASSWORD", password)
            .output()
            .unwrap();
        assert!(out.status.success(), "luna bmcsetup add {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn luna(&self, args: &[&str]) -> String {
        let out = self.run("luna", args);
        assert!(out.status.success(), "luna {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn log(&self) -> String {
        self._server.output().lines().join("\n")
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("token")).unwrap().trim().to_string()
    }
}

/// What lpower printed and whether it exited 0.
struct Run {
    stdout: String,
    stderr: String,
    ok: bool,
    took: Duration,
}

fn lpower(s: &Server, args: &[&str], seen: &mut String) -> Run {
    let t = Instant::now();
    let out = s.run("lpower", args);
    let run = Run {
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
        ok: out.status.success(),
        took: t.elapsed(),
    };
    seen.push_str(&run.stdout);
    seen.push_str(&run.stderr);
    run
}

fn lines(nodes: std::ops::RangeInclusive<u32>, text: &str) -> String {
    nodes.map(|i| format!("node{i:02}: {text}\n")).collect()
}

/// `ipmitool -I lanplus` inside the namespace: the independent view of a BMC.
fn ipmitool(ns: &Netns, addr: &str, args: &[&str]) -> String {
    let out = ns
        .command("ipmitool")
        .args(["-I", "lanplus", "-C", "3", "-H", addr, "-U", "admin", "-P", GOOD_PASSWORD])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ipmitool {args:?} at {addr}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn bmc_addr(i: u32) -> String {
    format!("10.80.0.{}", 10 + i)
}

fn wait_bmcs_up(ns: &Netns, addrs: &[String]) {
    for a in addrs {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = ns
                .command("ipmitool")
                .args(["-I", "lanplus", "-C", "3", "-H", a, "-U", "admin", "-P", GOOD_PASSWORD, "-N", "1", "-R", "1"])
                .args(["chassis", "power", "status"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "ipmi_sim at {a} did not answer");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn lpower_drives_eight_ipmi_bmcs() {
    if !privileged() {
        return;
    }
    require_tool("ipmi_sim").unwrap();
    require_tool("ipmitool").unwrap();
    let ns = Netns::new().unwrap();
    // The BMC network: every BMC's address on one bridge. 10.80.0.99 is a BMC that never
    // answers: a socket on its port that reads and says nothing.
    ns.add_bridge("bmc0").unwrap();
    ns.link_up("bmc0").unwrap();
    ns.add_addr("bmc0", "10.80.0.1/24").unwrap();
    let addrs: Vec<String> = (1..=8).map(bmc_addr).collect();
    // The 9th BMC is node09's, which luna knows with the wrong password.
    let all_sims: Vec<String> = (1..=9).map(bmc_addr).collect();
    for a in all_sims.iter().map(String::as_str).chain(["10.80.0.99"]) {
        ns.add_addr("bmc0", &format!("{a}/32")).unwrap();
    }
    let _silent = ns.enter(|| std::net::UdpSocket::bind("10.80.0.99:623").unwrap()).unwrap();
    let server = Server::start(ns);
    let sims: Vec<ChildGuard> = all_sims
        .iter()
        .enumerate()
        .map(|(i, a)| ipmi_sim(&server.ns, &server.dir.path().join(format!("bmc{}", i + 1)), a, GOOD_PASSWORD).unwrap())
        .collect();
    wait_bmcs_up(&server.ns, &all_sims);

    server.luna(&["network", "add", "prov", "--cidr", "10.81.0.0/24"]);
    server.luna(&["network", "add", "ipmi", "--cidr", "10.80.0.0/24"]);
    server.luna(&["osimage", "add", "tiny", "--path", "/srv/tiny"]);
    server.bmcsetup_add(GOOD_PASSWORD, &["good", "--user", "admin"]);
    server.bmcsetup_add(BAD_PASSWORD, &["bad", "--user", "admin"]);
    let group = |name: &str, setup: Option<&str>| {
        let mut args = vec!["group", "add", name, "--osimage", "tiny", "--network", "prov", "--bmc-network", "ipmi"];
        if let Some(s) = setup {
            args.extend(["--bmcsetup", s]);
        }
        server.luna(&args);
    };
    group("compute", Some("good"));
    group("wrongpw", Some("bad"));
    group("nosetup", None);
    for i in 1..=8 {
        server.luna(&[
            "node",
            "add",
            &format!("node{i:02}"),
            "--group",
            "compute",
            "--ip",
            &format!("BMC={}", bmc_addr(i)),
        ]);
    }
    // node09: a BMC luna has the wrong password for; node10: no BMC answers; node11: no bmcsetup.
    server.luna(&["node", "add", "node09", "--group", "wrongpw", "--ip", &format!("BMC={}", bmc_addr(9))]);
    server.luna(&["node", "add", "node10", "--group", "compute", "--ip", "BMC=10.80.0.99"]);
    server.luna(&["node", "add", "node11", "--group", "nosetup", "--ip", "BMC=10.80.0.98"]);

    let mut seen = String::new();
    let all = "node[01-08]";
    let r = lpower(&server, &[all, "status"], &mut seen);
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(r.stdout, lines(1..=8, "off"));
    println!("lpower status of 8 BMCs: {:?}", r.took);

    let r = lpower(&server, &[all, "on"], &mut seen);
    assert!(r.ok, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, lines(1..=8, "on"));
    for a in &addrs {
        assert_eq!(ipmitool(&server.ns, a, &["chassis", "power", "status"]).trim(), "Chassis Power is on", "{a}");
    }
    let r = lpower(&server, &[all, "status"], &mut seen);
    assert_eq!(r.stdout, lines(1..=8, "on"));

    let r = lpower(&server, &[all, "off"], &mut seen);
    assert!(r.ok);
    assert_eq!(r.stdout, lines(1..=8, "off"));
    for a in &addrs {
        assert_eq!(ipmitool(&server.ns, a, &["chassis", "power", "status"]).trim(), "Chassis Power is off", "{a}");
    }

    // cycle: the simulator's chassis program sees power go 0 then 1; the BMCs end up on.
    lpower(&server, &[all, "on"], &mut seen);
    let before: Vec<usize> = (1..=8).map(|i| calls(&server, i).len()).collect();
    let r = lpower(&server, &[all, "cycle"], &mut seen);
    assert!(r.ok, "{}", r.stdout);
    assert_eq!(r.stdout, lines(1..=8, "cycle"));
    for i in 1..=8u32 {
        // The simulator powers back on a moment after the cycle command.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let new: Vec<String> = calls(&server, i)[before[i as usize - 1]..].to_vec();
            let down = new.iter().position(|c| c == "0x20 set power 0");
            let up = new.iter().rposition(|c| c == "0x20 set power 1");
            if matches!((down, up), (Some(d), Some(u)) if d < u) {
                break;
            }
            assert!(Instant::now() < deadline, "bmc{i} after cycle: {new:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(ipmitool(&server.ns, &bmc_addr(i), &["chassis", "power", "status"]).trim(), "Chassis Power is on");
    }

    // pxe and disk: the one-time boot device, read back as ipmitool reads it.
    let r = lpower(&server, &[all, "pxe"], &mut seen);
    assert_eq!(r.stdout, lines(1..=8, "pxe"));
    for a in &addrs {
        let p = ipmitool(&server.ns, a, &["chassis", "bootparam", "get", "5"]);
        assert!(p.contains("Force PXE") && p.contains("Options apply to only next boot"), "{a}: {p}");
    }
    let r = lpower(&server, &["node[01-02]", "disk"], &mut seen);
    assert_eq!(r.stdout, lines(1..=2, "disk"));
    let p = ipmitool(&server.ns, &bmc_addr(1), &["chassis", "bootparam", "get", "5"]);
    assert!(p.contains("Hard-Drive"), "{p}");

    // soft, reset and identify: what each simulator's chassis program was told, in order
    // (ipmi_sim turns Chassis Control 5 into `set shutdown 1`, 3 into `set reset 1`, and Chassis
    // Identify N into `set identify N 0`). The program only records them: power stays on.
    let before: Vec<usize> = (1..=8).map(|i| calls(&server, i).len()).collect();
    let r = lpower(&server, &[all, "soft"], &mut seen);
    assert!(r.ok, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, lines(1..=8, "soft"));
    let r = lpower(&server, &[all, "reset"], &mut seen);
    assert_eq!(r.stdout, lines(1..=8, "reset"));
    let r = lpower(&server, &[all, "identify"], &mut seen);
    assert_eq!(r.stdout, lines(1..=8, "identify 15s"));
    let r = lpower(&server, &["node[01-02]", "identify", "40"], &mut seen);
    assert_eq!(r.stdout, lines(1..=2, "identify 40s"));
    let r = lpower(&server, &["node01", "identify", "off"], &mut seen);
    assert!(r.ok, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "node01: identify off\n");
    for i in 1..=8u32 {
        let told: Vec<String> =
            calls(&server, i)[before[i as usize - 1]..].iter().filter(|c| c.contains(" set ")).cloned().collect();
        let mut want = vec!["0x20 set shutdown 1", "0x20 set reset 1", "0x20 set identify 15 0"];
        if i <= 2 {
            want.push("0x20 set identify 40 0");
        }
        if i == 1 {
            want.push("0x20 set identify 0 0");
        }
        assert_eq!(told, want, "bmc{i}");
    }
    // An identify time the BMC cannot take is refused before anything is sent.
    let r = lpower(&server, &[all, "identify", "300"], &mut seen);
    assert!(!r.ok && r.stderr.contains("'300'"), "{}", r.stderr);

    // Errors are per node and hide nothing: a wrong password, a dead address, no bmcsetup;
    // the dead BMC costs one timeout in total, not one per node.
    let r = lpower(&server, &["node[01-11]", "status"], &mut seen);
    assert!(!r.ok, "some nodes failed: the exit status says so");
    let mut want = lines(1..=8, "on");
    want.push_str("node09: wrong BMC user or password\n");
    want.push_str(&format!("node10: timeout after {TIMEOUT_SECS}s\n"));
    want.push_str("node11: no bmcsetup in group 'nosetup'\n");
    assert_eq!(r.stdout, want);
    let timeout = Duration::from_secs(TIMEOUT_SECS);
    assert!(r.took >= timeout && r.took < timeout + Duration::from_millis(1500), "took {:?}", r.took);
    println!("lpower status of 11 nodes with a dead BMC: {:?} (timeout {timeout:?})", r.took);

    // --json and -g.
    let r = lpower(&server, &["-g", "compute", "status", "--json"], &mut seen);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 9, "{v}");
    assert_eq!(v[0], serde_json::json!({"node": "node01", "state": "on"}));

    // Bad input: named, nothing sent.
    let r = lpower(&server, &[all, "explode"], &mut seen);
    assert!(!r.ok && r.stderr.contains("'explode'"), "{}", r.stderr);
    let r = lpower(&server, &["node[01-99]", "status"], &mut seen);
    assert!(!r.ok && r.stderr.contains("does not exist"), "{}", r.stderr);

    // The REST API answers the same; the password is in none of it.
    let api = server
        .ns
        .command("curl")
        .args(["-s", "-H", &format!("Authorization: Bearer {}", server.token())])
        .arg("--cacert")
        .arg(server.dir.path().join("data/tls/ca.pem"))
        .args(["-d", r#"{"nodes":"node[08-09]","action":"status"}"#, &format!("https://{API_LISTEN}/api/v1/power")])
        .output()
        .unwrap();
    let api = String::from_utf8(api.stdout).unwrap();
    seen.push_str(&api);
    let v: Value = serde_json::from_str(&api).unwrap();
    assert_eq!(v["results"][0]["state"], "on", "{api}");
    assert_eq!(v["results"][1]["error"], "wrong BMC user or password", "{api}");

    // luna node reinstall: one-time PXE, then cycle (on nodes) or power on (off nodes).
    lpower(&server, &["node02", "off"], &mut seen);
    let out = server.luna(&["node", "reinstall", "node[01-02]"]);
    seen.push_str(&out);
    assert_eq!(out, "node01: pxe, cycle\nnode02: pxe, on\n");
    for a in [bmc_addr(1), bmc_addr(2)] {
        assert!(ipmitool(&server.ns, &a, &["chassis", "bootparam", "get", "5"]).contains("Force PXE"));
        // A cycled simulator is back on a moment later.
        let deadline = Instant::now() + Duration::from_secs(10);
        while ipmitool(&server.ns, &a, &["chassis", "power", "status"]).trim() != "Chassis Power is on" {
            assert!(Instant::now() < deadline, "{a} is not on after reinstall");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    let log = server.log();
    assert!(log.contains("power"), "the server logs power requests");
    for secret in [GOOD_PASSWORD, BAD_PASSWORD] {
        assert!(!seen.contains(secret), "a BMC password reached the CLI or API output");
        assert!(!log.contains(secret), "a BMC password reached the server log");
    }
    drop(sims);
}

fn calls(s: &Server, i: u32) -> Vec<String> {
    let path: PathBuf = s.dir.path().join(format!("bmc{i}")).join("calls");
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

/// `curl -k` inside the namespace: the Redfish emulator's own view of a system; `auth` is a curl
/// config file with its user and password.
fn redfish_system(ns: &Netns, auth: &Path, addr: &str) -> Option<Value> {
    let get = |path: &str| -> Option<Value> {
        // The emulator's user and password come from a curl config file: never on a command line.
        let out = ns
            .command("curl")
            .args(["-sk", "--max-time", "5", "-K"])
            .arg(auth)
            .arg(format!("https://{addr}{path}"))
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    };
    let systems = get("/redfish/v1/Systems")?;
    get(systems["Members"][0]["@odata.id"].as_str()?)
}

/// Polls the emulator until `check` holds for the system (its fake power changes take a moment).
fn wait_system(ns: &Netns, auth: &Path, addr: &str, what: &str, check: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sys = redfish_system(ns, auth, addr);
        if sys.as_ref().is_some_and(&check) {
            return;
        }
        assert!(Instant::now() < deadline, "{addr}: {what} never seen: {sys:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn lpower_drives_redfish_bmcs() {
    if !privileged() {
        return;
    }
    let sushy = require_tool("/opt/luna-venv/bin/sushy-emulator").unwrap();
    let python = require_tool("/opt/luna-venv/bin/python3").unwrap();
    require_tool("openssl").unwrap();
    require_tool("curl").unwrap();
    let ns = Netns::new().unwrap();
    ns.add_bridge("rf0").unwrap();
    ns.add_addr("rf0", "10.85.0.1/24").unwrap();
    let addrs = ["10.85.0.21", "10.85.0.22"];
    // rf3's BMC: a third emulator, which luna knows with a password it does not take.
    let bad_addr = "10.85.0.23";
    for a in addrs.iter().chain([&bad_addr]) {
        ns.add_addr("rf0", &format!("{a}/32")).unwrap();
    }
    let server = Server::start(ns);
    let d = server.dir.path();
    // A self-signed certificate, as BMCs ship.
    let st = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bmc", "-keyout"])
        .arg(d.join("key.pem"))
        .arg("-out")
        .arg(d.join("cert.pem"))
        .output()
        .unwrap();
    assert!(st.status.success(), "openssl: {}", String::from_utf8_lossy(&st.stderr));
    // The emulators ask for HTTP basic auth (user root, GOOD_PASSWORD) on everything below
    // /redfish/v1: an htpasswd file with a bcrypt digest (the only kind sushy takes), made with
    // the venv's bcrypt from the environment, not the command line.
    let hash = Command::new(&python)
        .args(["-c", "import bcrypt, os; print(bcrypt.hashpw(os.environ['PW'].encode(), bcrypt.gensalt(4)).decode())"])
        .env("PW", GOOD_PASSWORD)
        .output()
        .unwrap();
    assert!(hash.status.success(), "bcrypt: {}", String::from_utf8_lossy(&hash.stderr));
    let htpasswd = d.join("htpasswd");
    std::fs::write(&htpasswd, format!("root:{}", String::from_utf8(hash.stdout).unwrap())).unwrap();
    let sushy_conf = d.join("sushy.conf");
    std::fs::write(&sushy_conf, format!("SUSHY_EMULATOR_AUTH_FILE = {:?}\n", htpasswd.display().to_string())).unwrap();
    let auth = d.join("curl-auth");
    std::fs::write(&auth, format!("user = \"root:{GOOD_PASSWORD}\"\n")).unwrap();
    let _bmcs: Vec<ChildGuard> = addrs
        .iter()
        .chain([&bad_addr])
        .map(|a| {
            // The fake driver keeps its systems in $TMPDIR/sushy-emulator: one private dir each.
            let tmp = d.join(format!("sushy-{a}"));
            std::fs::create_dir_all(&tmp).unwrap();
            let mut cmd = server.ns.command(&sushy);
            cmd.env("TMPDIR", &tmp);
            cmd.args(["--fake", "-i", a, "-p", "443", "--config"])
                .arg(&sushy_conf)
                .arg("--ssl-certificate")
                .arg(d.join("cert.pem"))
                .arg("--ssl-key")
                .arg(d.join("key.pem"));
            ChildGuard::spawn(&mut cmd, &format!("sushy-{a}")).unwrap()
        })
        .collect();
    for a in addrs.iter().chain([&bad_addr]) {
        wait_system(&server.ns, &auth, a, "a system", |s| s["PowerState"].is_string());
    }
    // The emulator does check the password (curl without it is refused).
    let anon = server
        .ns
        .command("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", &format!("https://{}/redfish/v1/Systems", addrs[0])])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&anon.stdout), "401");

    server.luna(&["network", "add", "prov", "--cidr", "10.86.0.0/24"]);
    server.luna(&["network", "add", "bmcnet", "--cidr", "10.85.0.0/24"]);
    server.luna(&["osimage", "add", "tiny", "--path", "/srv/tiny"]);
    server.bmcsetup_add(GOOD_PASSWORD, &["rf", "--user", "root", "--protocol", "redfish"]);
    server.bmcsetup_add(BAD_PASSWORD, &["rfbad", "--user", "root", "--protocol", "redfish", "--insecure-tls", "true"]);
    for (group, setup) in [("rfg", "rf"), ("rfbadg", "rfbad")] {
        server.luna(&[
            "group",
            "add",
            group,
            "--osimage",
            "tiny",
            "--network",
            "prov",
            "--bmc-network",
            "bmcnet",
            "--bmcsetup",
            setup,
        ]);
    }
    for (i, a) in addrs.iter().enumerate() {
        server.luna(&["node", "add", &format!("rf{}", i + 1), "--group", "rfg", "--ip", &format!("BMC={a}")]);
    }
    server.luna(&["node", "add", "rf3", "--group", "rfbadg", "--ip", &format!("BMC={bad_addr}")]);
    let mut seen = String::new();
    let nodes = "rf[1-2]";

    // The certificate is verified unless the bmcsetup says otherwise.
    let r = lpower(&server, &[nodes, "status"], &mut seen);
    assert!(!r.ok && r.stdout.contains("rf1: BMC unreachable") && r.stdout.contains("certificate"), "{}", r.stdout);
    server.luna(&["bmcsetup", "change", "rf", "--insecure-tls", "true"]);

    // A wrong password is that node's error, named; the others are done.
    let r = lpower(&server, &["rf[1-3]", "status"], &mut seen);
    assert!(!r.ok, "rf3 failed: the exit status says so");
    assert_eq!(r.stdout, "rf1: off\nrf2: off\nrf3: wrong BMC user or password\n");
    let log = server.log();
    assert!(
        log.lines().any(|l| l.contains("node=rf3") && l.contains(bad_addr) && l.contains("wrong BMC user or password")),
        "the server log names the node and BMC that refused the password"
    );

    let r = lpower(&server, &[nodes, "status"], &mut seen);
    assert!(r.ok, "{}{}", r.stdout, r.stderr);
    let r = lpower(&server, &[nodes, "off"], &mut seen);
    assert_eq!(r.stdout, "rf1: off\nrf2: off\n");
    for a in addrs {
        wait_system(&server.ns, &auth, a, "PowerState Off", |s| s["PowerState"] == "Off");
    }
    let r = lpower(&server, &[nodes, "status"], &mut seen);
    assert_eq!(r.stdout, "rf1: off\nrf2: off\n");
    let r = lpower(&server, &[nodes, "on"], &mut seen);
    assert_eq!(r.stdout, "rf1: on\nrf2: on\n");
    for a in addrs {
        wait_system(&server.ns, &auth, a, "PowerState On", |s| s["PowerState"] == "On");
    }
    let r = lpower(&server, &[nodes, "status"], &mut seen);
    assert_eq!(r.stdout, "rf1: on\nrf2: on\n");
    // soft is GracefulShutdown: the emulator's system goes off.
    let r = lpower(&server, &[nodes, "soft"], &mut seen);
    assert!(r.ok, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "rf1: soft\nrf2: soft\n");
    for a in addrs {
        wait_system(&server.ns, &auth, a, "PowerState Off after soft", |s| s["PowerState"] == "Off");
    }
    // reset is ForceRestart: from off, only the restart brings the system back on.
    let r = lpower(&server, &[nodes, "reset"], &mut seen);
    assert!(r.ok, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "rf1: reset\nrf2: reset\n");
    for a in addrs {
        wait_system(&server.ns, &auth, a, "PowerState On after reset", |s| s["PowerState"] == "On");
    }
    let r = lpower(&server, &[nodes, "pxe"], &mut seen);
    assert_eq!(r.stdout, "rf1: pxe\nrf2: pxe\n");
    for a in addrs {
        wait_system(&server.ns, &auth, a, "boot from Pxe", |s| s["Boot"]["BootSourceOverrideTarget"] == "Pxe");
    }
    let r = lpower(&server, &[nodes, "identify"], &mut seen);
    assert_eq!(r.stdout, "rf1: identify on\nrf2: identify on\n");
    for a in addrs {
        wait_system(&server.ns, &auth, a, "IndicatorLED Blinking", |s| s["IndicatorLED"] == "Blinking");
    }
    let r = lpower(&server, &["rf1", "identify", "off"], &mut seen);
    assert_eq!(r.stdout, "rf1: identify off\n");
    wait_system(&server.ns, &auth, addrs[0], "IndicatorLED Off", |s| s["IndicatorLED"] == "Off");
    let r = lpower(&server, &[nodes, "disk"], &mut seen);
    assert_eq!(r.stdout, "rf1: disk\nrf2: disk\n");
    wait_system(&server.ns, &auth, addrs[0], "boot from Hdd", |s| s["Boot"]["BootSourceOverrideTarget"] == "Hdd");
    // Last: the emulator forgets an order given while a restart is pending.
    // sushy-emulator has no PowerCycle: lpower sends ForceRestart, which it lists. The system
    // goes off and comes back on.
    let r = lpower(&server, &[nodes, "cycle"], &mut seen);
    assert_eq!(r.stdout, "rf1: cycle\nrf2: cycle\n");
    for a in addrs {
        wait_system(&server.ns, &auth, a, "PowerState On after the cycle", |s| s["PowerState"] == "On");
    }

    let log = server.log();
    for secret in [GOOD_PASSWORD, BAD_PASSWORD] {
        assert!(!seen.contains(secret), "a BMC password reached the CLI output");
        assert!(!log.contains(secret), "a BMC password reached the server log");
    }
}
