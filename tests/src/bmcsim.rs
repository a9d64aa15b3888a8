//! A simulated BMC: OpenIPMI's `ipmi_sim` with a lanplus admin user and a chassis program that
//! keeps the power state and boot device (shared by `tests/power.rs` and `bench-power`).

use std::path::Path;
use std::process::Command;

use crate::{ChildGuard, HarnessError, Netns, Result};

/// One ipmi_sim BMC at `addr` (inside `ns`) with user admin/`password`; its chassis program keeps
/// `power` and `boot` as files in `dir/state` and logs every call to `dir/calls`.
pub fn ipmi_sim(ns: &Netns, dir: &Path, addr: &str, password: &str) -> Result<ChildGuard> {
    let io = |what: &str, e| HarnessError::io(format!("{what} in {}", dir.display()), e);
    std::fs::create_dir_all(dir.join("state")).map_err(|e| io("create state", e))?;
    std::fs::create_dir_all(dir.join("sim")).map_err(|e| io("create sim", e))?;
    let chassis = dir.join("chassis");
    let script = format!(
        r#"#!/bin/sh
d='{state}'
echo "$@" >> '{calls}'
shift
op=$1; shift
if [ "$op" = get ]; then
  for p in "$@"; do
    case $p in
      power) echo "power:$(cat $d/power 2>/dev/null || echo 0)";;
      boot) echo "boot:$(cat $d/boot 2>/dev/null || echo none)";;
    esac
  done
elif [ "$op" = set ]; then
  while [ $# -ge 2 ]; do echo "$2" > "$d/$1"; shift 2; done
fi
"#,
        state = dir.join("state").display(),
        calls = dir.join("calls").display()
    );
    std::fs::write(&chassis, script).map_err(|e| io("write chassis", e))?;
    let chmod = Command::new("chmod").arg("755").arg(&chassis).status().map_err(|e| io("chmod chassis", e))?;
    if !chmod.success() {
        return Err(HarnessError::Setup(format!("cannot make {} executable", chassis.display())));
    }
    let lan = format!(
        "name \"bmc\"\nset_working_mc 0x20\n  startlan 1\n    addr {addr} 623\n    priv_limit admin\n\
         allowed_auths_callback none md2 md5 straight\n    allowed_auths_user none md2 md5 straight\n\
         allowed_auths_operator none md2 md5 straight\n    allowed_auths_admin none md2 md5 straight\n\
         guid a123456789abcdefa123456789abcdef\n  endlan\n  chassis_control \"{chassis} 0x20\"\n\
         startnow false\n  user 2 true \"admin\" \"{password}\" admin 10 none md2 md5 straight\n",
        chassis = chassis.display()
    );
    std::fs::write(dir.join("lan.conf"), lan).map_err(|e| io("write lan.conf", e))?;
    std::fs::write(
        dir.join("bmc.emu"),
        "mc_setbmc 0x20\nmc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr\nmc_enable 0x20\n",
    )
    .map_err(|e| io("write bmc.emu", e))?;
    let mut cmd = ns.command("ipmi_sim");
    cmd.arg("-c").arg(dir.join("lan.conf")).arg("-f").arg(dir.join("bmc.emu")).arg("-s").arg(dir.join("sim")).arg("-n");
    ChildGuard::spawn(&mut cmd, &format!("ipmi_sim-{addr}"))
}
