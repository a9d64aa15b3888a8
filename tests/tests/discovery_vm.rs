//! Switch-port autodiscovery end to end: two qemu VMs with MACs luna does not know PXE-boot on
//! the cluster fixture while a simulated switch (snmpsim inside the cluster's namespace, on the
//! provisioning network, UDP 161) reports them on ports 7 and 8. Node `rack07` is configured
//! for port 7 by number, `rack08` for port `Gi1/0/8` by name, neither has a MAC. Each VM gets the
//! discovery menu, whose default entry polls the switch, binds its MAC to the port's node (status
//! `discovered`) and boots it: both come up installed as their node with no manual step, and
//! `luna node show` has their MACs. Needs root, dracut, qemu and snmpsim
//! (`LUNA_TEST_PRIVILEGED=1`).

use std::time::{Duration, Instant};

use luna_tests::{privileged, Cluster, ClusterOptions, BOOTED_MARKER};

const SUBNET: &str = "10.86.0";
const KERNEL_OPTS: &str = "console=ttyS0 panic=-1 rd.retry=300";
const BOOT_TIMEOUT: Duration = Duration::from_secs(480);
const IMAGE: &str = "tiny";
const MAC7: &str = "52:54:00:86:00:07";
const MAC8: &str = "52:54:00:86:00:08";

fn arcs(mac: &str) -> String {
    mac.split(':').map(|h| u8::from_str_radix(h, 16).unwrap().to_string()).collect::<Vec<_>>().join(".")
}

/// The switch: Q-BRIDGE dot1qTpFdbPort (VLAN 1), ports 7 and 8 with ifName Gi1/0/N.
fn snmprec() -> String {
    let mut rows = [
        "1.3.6.1.2.1.17.1.4.1.2.7|2|1007".to_string(),
        "1.3.6.1.2.1.17.1.4.1.2.8|2|1008".to_string(),
        format!("1.3.6.1.2.1.17.7.1.2.2.1.2.1.{}|2|7", arcs(MAC7)),
        format!("1.3.6.1.2.1.17.7.1.2.2.1.2.1.{}|2|8", arcs(MAC8)),
        "1.3.6.1.2.1.31.1.1.1.1.1007|4|Gi1/0/7".to_string(),
        "1.3.6.1.2.1.31.1.1.1.1.1008|4|Gi1/0/8".to_string(),
    ];
    let key =
        |l: &String| l.split('|').next().unwrap().split('.').map(|a| a.parse::<u64>().unwrap()).collect::<Vec<_>>();
    rows.sort_by_key(key);
    rows.join("\n") + "\n"
}

#[test]
fn unknown_machines_become_the_nodes_of_their_switch_ports() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    let c = Cluster::start(ClusterOptions { subnet: SUBNET.into(), ..ClusterOptions::default() })
        .expect("start luna-server in a namespace");
    // The switch's agent, on the provisioning network inside the namespace.
    let switch_ip = format!("{SUBNET}.250");
    c.ns.add_addr("br0", &format!("{switch_ip}/24")).unwrap();
    let data = c.dir().join("snmpsim");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("public.snmprec"), snmprec()).unwrap();
    let venv = std::env::var("LUNA_VENV").unwrap_or_else(|_| "/opt/luna-venv".into());
    let _sim =
        c.ns.spawn(
            "snmpsim-switch",
            &format!("{venv}/bin/snmpsim-command-responder"),
            &[
                format!("--data-dir={}", data.display()),
                format!("--cache-dir={}", c.dir().join("snmpsim-cache").display()),
                format!("--agent-udpv4-endpoint={switch_ip}:161"),
                "--process-user=root".into(),
                "--process-group=root".into(),
            ],
        )
        .expect("start snmpsim");

    c.cli(&["network", "add", "prov", "--cidr", &format!("{SUBNET}.0/24"), "--gateway", &c.server_ip()]).unwrap();
    c.cli(&["cluster", "change", "--dhcp-range", &format!("{SUBNET}.200-{SUBNET}.220")]).unwrap();
    c.cli(&["switch", "add", "sw1", "--network", "prov", "--ip", &switch_ip]).unwrap();
    c.add_test_osimage(IMAGE, KERNEL_OPTS).unwrap();
    c.cli(&["group", "add", "compute", "--osimage", IMAGE, "--network", "prov"]).unwrap();
    c.cli(&["node", "add", "rack07", "--group", "compute", "--switch", "sw1", "--port", "7"]).unwrap();
    c.cli(&["node", "add", "rack08", "--group", "compute", "--switch", "sw1", "--port", "Gi1/0/8"]).unwrap();
    // A second node for port 7 is refused at configuration.
    let dup = c.cli(&["node", "add", "dup07", "--group", "compute", "--switch", "sw1", "--port", "7"]);
    assert!(dup.is_err_and(|e| e.to_string().contains("port 7 of switch sw1")), "two nodes on port 7 accepted");
    c.pack(IMAGE, Duration::from_secs(600)).expect("pack the test image");
    println!("discovery_vm: cluster up and packed after {:?}", t0.elapsed());

    let phase = Instant::now();
    let vm7 = c.boot("disc-port7", MAC7).unwrap();
    let vm8 = c.boot("disc-port8", MAC8).unwrap();
    for (vm, node) in [(&vm7, "rack07"), (&vm8, "rack08")] {
        let left = BOOT_TIMEOUT.saturating_sub(phase.elapsed());
        let line = match vm.wait_for(BOOTED_MARKER, left) {
            Ok(l) => l,
            Err(e) => {
                panic!("{node} did not boot: {e}\n--- serial\n{}\n--- server\n{}", vm.serial().tail(60), c.server_log())
            }
        };
        assert!(line.contains(&format!("host={node}")), "{line}");
    }
    println!("discovery_vm: both machines booted as their port's node after {:?}", phase.elapsed());
    let log = c.server_log();
    for (node, mac, port) in [("rack07", MAC7, "port=7"), ("rack08", MAC8, "port=8")] {
        let n = c.node(node).unwrap();
        assert_eq!(n["mac"], mac, "{n}");
        assert!(
            log.lines().any(|l| l.contains("mac bound by switch-port discovery")
                && l.contains(&format!("node={node}"))
                && l.contains("switch=sw1")
                && l.contains(port)),
            "no binding of {node} logged:\n{log}"
        );
    }
    let macs = c.cli(&["switch", "listmacs", "sw1"]).unwrap();
    assert!(macs.contains("rack07") && macs.contains("rack08") && macs.contains("Gi1/0/8"), "{macs}");
}
