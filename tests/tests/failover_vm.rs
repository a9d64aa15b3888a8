//! Two luna-servers, one cluster, and server A dies mid-boot (issue 21's proof): A and B on
//! one MongoDB-wire store (`Cluster::start_pair`: nx-27017 as a one-member replica set), the
//! busybox test image packed on A and replicated to B through the swarm. Two VMs PXE-boot; B
//! does not hear DHCP meanwhile (nftables), so both take A's offer and A's boot script; A is
//! SIGKILLed as soon as both scripts went out. Both must still install: the kernel and
//! initramfs from B (`kernel A || kernel B`), the plan from B with the token A minted (the
//! token ledger is in the store; the agent moves to `luna.fallback`), the image from B and the
//! swarm, `installed` reported to B. A third VM powered on after A died boots from B alone.
//! Prints the timings. Needs root, dracut, qemu (`LUNA_TEST_PRIVILEGED=1`) and nx-27017
//! (`LUNA_TEST_MONGO=1`).

use std::time::{Duration, Instant};

use luna_tests::{privileged, Cluster, ClusterOptions, Vm};
use serde_json::Value;

const SUBNET: &str = "10.86.0";
const KERNEL_OPTS: &str = "console=ttyS0 panic=-1 rd.retry=300 luna.stall=10";
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const IMAGE: &str = "tiny";

fn mac(i: u32) -> String {
    format!("52:54:00:86:00:{i:02x}")
}

/// Fails the test with the VMs' console tails and both servers' log tails.
fn fail(c: &Cluster, vms: &[&Vm], what: &str) -> ! {
    let mut msg = format!("{what}\n");
    for vm in vms {
        msg.push_str(&format!("--- console of {} (last 40 lines)\n{}\n", vm.name(), vm.serial().tail(40)));
    }
    for (name, log) in [("a", c.server_log()), ("b", c.server_b_log())] {
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        msg.push_str(&format!(
            "--- luna-server {name} (last 30 lines)\n{}\n",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ));
    }
    panic!("{msg}");
}

fn step(c: &Cluster, node: &str) -> String {
    c.api("GET", &format!("/api/v1/node/{node}"), None)
        .map(|n| n["status"]["step"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// Waits until every node in `nodes` reached one of `steps`; the time each took from `since`.
fn wait_steps(c: &Cluster, vms: &[&Vm], nodes: &[&str], steps: &[&str], since: Instant) -> Vec<Duration> {
    let mut done: Vec<Option<Duration>> = vec![None; nodes.len()];
    let deadline = since + BOOT_TIMEOUT;
    while done.iter().any(Option::is_none) {
        for (i, node) in nodes.iter().enumerate() {
            if done[i].is_none() {
                let s = step(c, node);
                if steps.contains(&s.as_str()) {
                    done[i] = Some(since.elapsed());
                } else if s == "error" {
                    fail(c, vms, &format!("{node} failed (status error)"));
                }
            }
        }
        if Instant::now() > deadline {
            fail(c, vms, &format!("{nodes:?} did not all reach {steps:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    done.into_iter().flatten().collect()
}

/// Whether B's log has `node`'s `installed` report (the agent reported to B).
fn reported_to_b(c: &Cluster, node: &str) -> bool {
    let needle = format!("node={node} ");
    c.server_b_log().lines().any(|l| l.contains("node status") && l.contains(&needle) && l.contains("step=installed"))
}

/// The revision listing on B, once B seeds `rev` itself.
fn wait_replicated(c: &Cluster, rev: u32) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let listed = c.revisions(IMAGE).unwrap_or_default();
        if let Some(r) = listed.iter().find(|r| r["id"] == rev) {
            if r["held_by"] == serde_json::json!(["a", "b"]) && r["seeded_by"] == serde_json::json!(["a", "b"]) {
                return r.clone();
            }
        }
        assert!(Instant::now() < deadline, "revision {rev} was not replicated to b: {listed:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

// About 7.7 min here (91 s of it the pack, two VMs under TCG): over the suite's budget, so it
// runs on request, like the debootstrap VM tests: `cargo test -p luna-tests --test failover_vm
// -- --ignored` with LUNA_TEST_PRIVILEGED=1 LUNA_TEST_MONGO=1.
#[test]
#[ignore = "a 7-8 min VM test: run with --ignored (LUNA_TEST_PRIVILEGED=1 LUNA_TEST_MONGO=1)"]
fn nodes_finish_installing_from_b_when_a_dies_mid_boot() {
    if !privileged() {
        return;
    }
    let Some(nx) = luna_server::store::conformance::mongo_gate() else { return };
    let t0 = Instant::now();
    let opts = ClusterOptions { subnet: SUBNET.into(), vm_memory_mb: 512, ..ClusterOptions::default() };
    let mut c = Cluster::start_pair(opts, &nx).expect("two luna-servers on one store");
    c.cli(&["network", "add", "prov", "--cidr", &format!("{SUBNET}.0/24")]).unwrap();
    c.add_test_osimage(IMAGE, KERNEL_OPTS).unwrap();
    c.cli(&["group", "add", "compute", "--osimage", IMAGE, "--network", "prov"]).unwrap();
    for i in 1..=3 {
        let node = format!("node{i:03}");
        c.cli(&["node", "add", &node, "--group", "compute"]).unwrap();
        c.cli(&["node", "change", &node, "--mac", &mac(i)]).unwrap();
    }
    let rev = c.pack(IMAGE, Duration::from_secs(600)).expect("pack on a");
    let packed = t0.elapsed();
    wait_replicated(&c, rev);
    let replicated = t0.elapsed();

    // B does not hear DHCP until A is gone (nftables in B's namespace), so both VMs take A's
    // offer and A's boot script (which names B as the fallback).
    let b_ns = c.server_b_ns().expect("b's namespace").name().to_string();
    let nft = |args: &[&str]| {
        let ok = std::process::Command::new("ip")
            .args(["netns", "exec", &b_ns, "nft"])
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "nft {args:?} in b's namespace");
    };
    nft(&["add", "table", "inet", "failover"]);
    nft(&["add", "chain", "inet", "failover", "in", "{ type filter hook input priority 0; }"]);
    nft(&["add", "rule", "inet", "failover", "in", "udp", "dport", "67", "drop"]);
    let boot = Instant::now();
    let vm1 = c.boot("fo-node001", &mac(1)).unwrap();
    let vm2 = c.boot("fo-node002", &mac(2)).unwrap();
    let scripts = wait_steps(&c, &[&vm1, &vm2], &["node001", "node002"], &["ipxe", "kernel", "plan"], boot);
    c.kill_server_a();
    let killed = boot.elapsed();
    nft(&["delete", "table", "inet", "failover"]);
    for vm in [&vm1, &vm2] {
        let from_a = format!("{SUBNET}.1:7050/boot/ipxe");
        if !vm.serial().contains(&from_a) {
            eprintln!("failover_vm: {} got its boot script from b, not a", vm.name());
        }
    }
    let installed = wait_steps(&c, &[&vm1, &vm2], &["node001", "node002"], &["installed", "booted"], boot);
    for node in ["node001", "node002"] {
        assert!(reported_to_b(&c, node), "{node}'s installed went to b: {}", c.server_b_log());
    }
    let a_log = c.server_log();
    assert!(!a_log.contains("step=installed"), "a was dead: nothing was reported to it");

    // A third machine, powered on after A died: B alone.
    let third = Instant::now();
    let vm3 = c.boot("fo-node003", &mac(3)).unwrap();
    let t3 = wait_steps(&c, &[&vm3], &["node003"], &["installed", "booted"], third);
    assert!(reported_to_b(&c, "node003"), "node003's installed went to b");
    assert!(!vm3.serial().contains(&format!("{SUBNET}.1:7050")), "node003 never talked to a");
    println!(
        "failover_vm: packed on a {:.1} s, replicated to b {:.1} s after start; scripts from a {:.1}/{:.1} s, \
         a killed {:.1} s after power-on; installed {:.1}/{:.1} s after power-on; node003 (b alone) installed in \
         {:.1} s; whole test {:.1} s",
        packed.as_secs_f64(),
        replicated.as_secs_f64(),
        scripts[0].as_secs_f64(),
        scripts[1].as_secs_f64(),
        killed.as_secs_f64(),
        installed[0].as_secs_f64(),
        installed[1].as_secs_f64(),
        t3[0].as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    drop((vm1, vm2, vm3));
}
