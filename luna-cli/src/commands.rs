//! What each verb does: check the input locally, send one request (two when a change has to be
//! merged into the current object), print the answer.

use std::io::{IsTerminal as _, Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use luna_core::api::{Deleted, ErrorCode, NodeCreate, NodePatch, RangeRequest, RenameRequest};
use luna_core::hostlist;
use luna_core::model::{validate_name, AnyObject, BMC, BOOTIF};
use luna_core::Kind;
use serde_json::{json, Map, Value};

use crate::args::*;
use crate::client::{encode_segment, Client};
use crate::progress::{JobView, Progress};
use crate::render;
use crate::text::TextSource;

/// Where `--password-from-env` reads the BMC password.
pub const BMC_PASSWORD_ENV: &str = "LUNA_BMC_PASSWORD";

pub struct Ctx<R> {
    pub client: Client,
    pub text: TextSource<R>,
    pub out: String,
    /// Where running jobs are shown (stderr in the binary).
    pub progress: Progress<Box<dyn Write>>,
}

fn secrets_query(secrets: bool) -> &'static [(&'static str, &'static str)] {
    if secrets {
        &[("secrets", "1")]
    } else {
        &[]
    }
}

fn kind_path(kind: Kind) -> String {
    format!("/{kind}")
}

pub(crate) fn object_path(kind: Kind, name: &str) -> String {
    format!("/{kind}/{}", encode_segment(name))
}

/// Names this run sends as one object (not a hostlist).
fn check_name(kind: Kind, name: &str) -> Result<()> {
    validate_name(kind, name)?;
    Ok(())
}

/// Expands a node hostlist locally so a typo never reaches the server; returns the names.
pub(crate) fn check_hostlist(expr: &str) -> Result<Vec<String>> {
    let names = hostlist::expand(expr)?;
    for n in &names {
        validate_name(Kind::Node, n).with_context(|| format!("in hostlist '{expr}'"))?;
    }
    Ok(names)
}

/// Names of the objects in an answer array, folded into a hostlist.
fn names_of(objs: &[Value]) -> String {
    let names: Vec<&str> = objs.iter().filter_map(|o| o.get("name").and_then(Value::as_str)).collect();
    hostlist::compress(&names)
}

/// `node ` or `4 nodes: `, to precede the names.
fn plural(kind: Kind, n: usize) -> String {
    if n == 1 {
        format!("{kind} ")
    } else {
        format!("{n} {kind}s: ")
    }
}

fn as_array(v: Value, what: &str) -> Result<Vec<Value>> {
    match v {
        Value::Array(a) => Ok(a),
        other => Err(anyhow!("invalid answer from luna-server: expected a list of {what}, got {other}")),
    }
}

/// RFC 7396: objects merge key by key, `null` removes, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// Builds the object from the fields given and validates it with the model, so bad input is
/// reported without a request.
fn validate_new(kind: Kind, fields: &Map<String, Value>) -> Result<()> {
    let obj = AnyObject::from_value(kind, Value::Object(fields.clone()))?;
    obj.validate()?;
    Ok(())
}

fn put<T: serde::Serialize>(m: &mut Map<String, Value>, key: &str, v: Option<T>) {
    if let Some(v) = v {
        m.insert(key.into(), serde_json::to_value(v).expect("plain values serialise"));
    }
}

impl<R: Read> Ctx<R> {
    pub fn new(client: Client, stdin: R) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let progress = Progress::new(Box::new(std::io::stderr()) as Box<dyn Write>, terminal);
        Ctx { client, text: TextSource::new(stdin), out: String::new(), progress }
    }

    fn print(&mut self, s: &str) {
        self.out.push_str(s);
        if !s.ends_with('\n') {
            self.out.push('\n');
        }
    }

    fn print_json(&mut self, v: &Value) {
        let s = serde_json::to_string_pretty(v).expect("json values serialise");
        self.print(&s);
    }

    fn comment(&mut self, c: &CommentArgs, m: &mut Map<String, Value>) -> Result<()> {
        let v = self.text.read_opt("--comment", c.comment.as_ref())?;
        put(m, "comment", v);
        Ok(())
    }

    // ---- generic verbs --------------------------------------------------------------------

    fn list(
        &mut self,
        kind: Kind,
        args: &ListArgs,
        query: &[(&str, &str)],
        filter: impl Fn(&Value) -> bool,
    ) -> Result<()> {
        let items = as_array(self.client.get(&kind_path(kind), query)?, &format!("{kind}s"))?;
        let items: Vec<Value> = items.into_iter().filter(|o| filter(o)).collect();
        if args.json {
            self.print_json(&Value::Array(items));
        } else {
            self.print(&render::list(kind, &items));
        }
        Ok(())
    }

    fn fetch(&self, kind: Kind, name: &str, secrets: bool) -> Result<Value> {
        check_name(kind, name)?;
        Ok(self.client.get(&object_path(kind, name), secrets_query(secrets))?)
    }

    fn show(&mut self, kind: Kind, args: &ShowArgs, secrets: bool) -> Result<()> {
        let obj = self.fetch(kind, &args.name, secrets)?;
        if args.json {
            self.print_json(&obj);
        } else {
            self.print(&render::show(kind, &obj));
        }
        Ok(())
    }

    fn create(&mut self, kind: Kind, body: Value) -> Result<()> {
        let created = as_array(self.client.write("POST", &kind_path(kind), Some(&body))?, &format!("{kind}s"))?;
        let msg = format!("added {}{}", plural(kind, created.len()), names_of(&created));
        self.print(&msg);
        Ok(())
    }

    /// A non-node change: merged into the current object and validated locally first.
    fn change(&mut self, kind: Kind, name: &str, patch: Map<String, Value>) -> Result<()> {
        if patch.is_empty() {
            bail!("nothing to change for {kind} {name}: give at least one option");
        }
        let patch = Value::Object(patch);
        let mut current = self.fetch(kind, name, false)?;
        merge_patch(&mut current, &patch);
        AnyObject::from_value(kind, current)?.validate()?;
        self.send_patch(kind, name, &patch)
    }

    fn send_patch(&mut self, kind: Kind, name: &str, patch: &Value) -> Result<()> {
        let changed =
            as_array(self.client.write("PATCH", &object_path(kind, name), Some(patch))?, &format!("{kind}s"))?;
        let msg = format!("changed {}{}", plural(kind, changed.len()), names_of(&changed));
        self.print(&msg);
        Ok(())
    }

    fn rename(&mut self, kind: Kind, args: &RenameArgs, clone: bool) -> Result<()> {
        check_name(kind, &args.name)?;
        check_name(kind, &args.new_name)?;
        let verb = if clone { "clone" } else { "rename" };
        let body = serde_json::to_value(RenameRequest { new_name: args.new_name.clone() })?;
        self.client.write("POST", &format!("{}/{verb}", object_path(kind, &args.name)), Some(&body))?;
        let msg = if clone {
            format!("cloned {kind} {} as {}", args.name, args.new_name)
        } else {
            format!("renamed {kind} {} to {}", args.name, args.new_name)
        };
        self.print(&msg);
        Ok(())
    }

    fn delete(&mut self, kind: Kind, args: &DeleteArgs) -> Result<()> {
        if kind == Kind::Node {
            check_hostlist(&args.name)?;
        } else {
            check_name(kind, &args.name)?;
        }
        let answer = self.client.write("DELETE", &object_path(kind, &args.name), None)?;
        let deleted: Deleted = serde_json::from_value(answer).context("invalid answer from luna-server")?;
        let msg = format!("deleted {}{}", plural(kind, deleted.deleted.len()), hostlist::compress(&deleted.deleted));
        self.print(&msg);
        Ok(())
    }

    // ---- cluster ----------------------------------------------------------------------------

    fn cluster_patch(&mut self, c: &ClusterChange) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        put(&mut m, "name", c.name.clone());
        put(&mut m, "frontend_address", c.frontend_address);
        put(&mut m, "http_port", c.http_port);
        put(&mut m, "nodename_prefix", c.nodename_prefix.clone());
        put(&mut m, "nodename_digits", c.nodename_digits);
        put(&mut m, "tracker_interval", c.tracker_interval);
        put(&mut m, "tracker_max_peers", c.tracker_max_peers);
        put(&mut m, "dhcp_interfaces", c.dhcp_interfaces.clone());
        put(&mut m, "dhcp_range", c.dhcp_range);
        put(&mut m, "domain", c.domain.clone());
        if let Some(text) = self.text.read_opt("--ssh-authorized-keys", c.ssh_authorized_keys.as_ref())? {
            let keys: Vec<&str> =
                text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
            m.insert("ssh_authorized_keys".into(), Value::from(keys));
        }
        self.comment(&c.comment, &mut m)?;
        unset(&mut m, &c.unset.unset)?;
        Ok(m)
    }

    fn cluster(&mut self, cmd: &ClusterCmd) -> Result<()> {
        match cmd {
            ClusterCmd::Show(s) => {
                let c = self.client.get("/cluster", &[])?;
                if s.json {
                    self.print_json(&c);
                } else {
                    self.print(&render::show(Kind::Cluster, &c));
                    let servers = self.client.get("/cluster/servers", &[])?;
                    self.print(&format!("\n{}", render::servers(&servers).trim_end()));
                }
            }
            ClusterCmd::Servers(s) => {
                let servers = self.client.get("/cluster/servers", &[])?;
                if s.json {
                    self.print_json(&servers);
                } else {
                    self.print(render::servers(&servers).trim_end());
                }
            }
            ClusterCmd::Change(c) => {
                let patch = self.cluster_patch(c)?;
                if patch.is_empty() {
                    bail!("nothing to change for the cluster: give at least one option");
                }
                self.cluster_apply(patch)?;
                self.print("changed cluster");
            }
            ClusterCmd::Init(c) => {
                // Creating the store and the token needs the server machine; over the API, init
                // means "the cluster exists and has these settings", which is safe to repeat.
                let patch = self.cluster_patch(c)?;
                let current = match self.client.get("/cluster", &[]) {
                    Err(e) if e.code() == Some(ErrorCode::NotFound) => bail!(
                        "luna-server at {} has no cluster yet: run 'luna-server --config FILE init' on the server first",
                        self.client.base()
                    ),
                    other => other?,
                };
                let cluster = if patch.is_empty() { current } else { self.cluster_apply(patch)? };
                self.print(&render::show(Kind::Cluster, &cluster));
                if cluster.get("frontend_address").is_none_or(Value::is_null) {
                    self.print("note: frontend_address is not set; nodes cannot boot until 'luna cluster change --frontend-address IP'");
                }
                if cluster.get("dhcp_interfaces").and_then(Value::as_array).is_none_or(Vec::is_empty) {
                    self.print("note: dhcp_interfaces is empty; DHCP answers nowhere until 'luna cluster change --dhcp-interfaces IF'");
                }
            }
        }
        Ok(())
    }

    fn cluster_apply(&mut self, patch: Map<String, Value>) -> Result<Value> {
        let patch = Value::Object(patch);
        let mut current = self.client.get("/cluster", &[])?;
        merge_patch(&mut current, &patch);
        AnyObject::from_value(Kind::Cluster, current)?.validate()?;
        let answer = self.client.write("PATCH", "/cluster", Some(&patch))?;
        // The route table says the cluster PATCH answers with the cluster; accept a one-element
        // list as well, as every other PATCH answers with a list.
        Ok(match answer {
            Value::Array(mut a) if a.len() == 1 => a.remove(0),
            other => other,
        })
    }

    // ---- network ----------------------------------------------------------------------------

    fn network_fields(&mut self, f: &NetworkFields) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        put(&mut m, "cidr", f.cidr);
        put(&mut m, "gateway", f.gateway);
        put(&mut m, "dns_server", f.dns);
        put(&mut m, "mtu", f.mtu);
        self.comment(&f.comment, &mut m)?;
        Ok(m)
    }

    fn network(&mut self, cmd: &NetworkCmd) -> Result<()> {
        let k = Kind::Network;
        match cmd {
            NetworkCmd::List(a) => self.list(k, a, &[], |_| true),
            NetworkCmd::Show(a) => self.show(k, a, false),
            NetworkCmd::Add(a) => {
                check_name(k, &a.name)?;
                let mut m = self.network_fields(&a.fields)?;
                m.insert("name".into(), json!(a.name));
                validate_new(k, &m)?;
                self.create(k, Value::Object(m))
            }
            NetworkCmd::Change(a) => {
                let mut m = self.network_fields(&a.fields)?;
                unset(&mut m, &a.unset.unset)?;
                self.change(k, &a.name, m)
            }
            NetworkCmd::Rename(a) => self.rename(k, a, false),
            NetworkCmd::Clone(a) => self.rename(k, a, true),
            NetworkCmd::Delete(a) => self.delete(k, a),
            NetworkCmd::Reserve(a) | NetworkCmd::Release(a) => {
                let verb = if matches!(cmd, NetworkCmd::Reserve(_)) { "reserve" } else { "release" };
                check_name(k, &a.name)?;
                let body = serde_json::to_value(RangeRequest { range: a.range })?;
                self.client.write("POST", &format!("{}/{verb}", object_path(k, &a.name)), Some(&body))?;
                let done = if verb == "reserve" { "reserved" } else { "released" };
                self.print(&format!("{done} {} on network {}", a.range, a.name));
                Ok(())
            }
        }
    }

    // ---- osimage ----------------------------------------------------------------------------

    fn osimage_fields(&mut self, f: &OsimageFields) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        put(&mut m, "path", f.path.clone());
        put(&mut m, "kernel_version", f.kernel_version.clone());
        let opts = self.text.read_opt("--kernel-opts", f.kernel_opts.as_ref())?;
        put(&mut m, "kernel_opts", opts.map(|o| o.trim().to_string()));
        put(&mut m, "grab_exclude", f.grab_exclude.clone());
        put(&mut m, "root", f.root.map(|r| r.as_str()));
        put(&mut m, "dracut_modules_add", f.dracut_modules_add.clone());
        put(&mut m, "dracut_modules_omit", f.dracut_modules_omit.clone());
        put(&mut m, "dracut_drivers_add", f.dracut_drivers_add.clone());
        put(&mut m, "dracut_drivers_omit", f.dracut_drivers_omit.clone());
        self.comment(&f.comment, &mut m)?;
        Ok(m)
    }

    fn osimage(&mut self, cmd: &OsimageCmd) -> Result<()> {
        let k = Kind::Osimage;
        match cmd {
            OsimageCmd::List(a) => self.list(k, a, &[], |_| true),
            OsimageCmd::Show(a) => self.osimage_show(a),
            OsimageCmd::Add(a) => {
                check_name(k, &a.name)?;
                let mut m = self.osimage_fields(&a.fields)?;
                m.insert("name".into(), json!(a.name));
                validate_new(k, &m)?;
                self.create(k, Value::Object(m))
            }
            OsimageCmd::Change(a) => {
                if let Some(v) = &a.fields.kernel_version {
                    self.check_kernel_in_tree(&a.name, v)?;
                }
                let mut m = self.osimage_fields(&a.fields)?;
                unset(&mut m, &a.unset.unset)?;
                self.change(k, &a.name, m)
            }
            OsimageCmd::Rename(a) => self.rename(k, a, false),
            OsimageCmd::Clone(a) => self.osimage_clone(a),
            OsimageCmd::Delete(a) => self.delete(k, a),
            OsimageCmd::Pack(a) => self.osimage_pack(a),
            OsimageCmd::Rollback(a) => self.osimage_rollback(a),
            OsimageCmd::Kernels(a) => self.osimage_kernels(a),
            OsimageCmd::Import(a) => self.osimage_import(a),
            OsimageCmd::Grab(a) => self.osimage_grab(a),
        }
    }

    fn osimage_grab(&mut self, a: &OsimageGrab) -> Result<()> {
        let k = Kind::Osimage;
        check_name(k, &a.name)?;
        check_name(Kind::Node, &a.from)?;
        let image = self.fetch(k, &a.name, false)?;
        let path =
            image.get("path").and_then(Value::as_str).ok_or_else(|| anyhow!("osimage {} has no path", a.name))?;
        let excludes: Vec<String> = image
            .get("grab_exclude")
            .and_then(Value::as_array)
            .map(|l| l.iter().filter_map(|p| p.as_str().map(String::from)).collect())
            .unwrap_or_default();
        let node = self.fetch(Kind::Node, &a.from, false)?;
        let addr = node
            .get("interfaces")
            .and_then(Value::as_array)
            .and_then(|ifs| ifs.iter().find_map(|i| i.get("ip").and_then(Value::as_str)))
            .ok_or_else(|| anyhow!("node {} has no interface with an address to grab from", a.from))?
            .to_string();
        crate::tree::grab(&addr, Path::new(path), &excludes, a.dry_run)?;
        if !a.dry_run {
            self.print(&format!("grabbed node {} ({addr}) into osimage {} ({path})", a.from, a.name));
        }
        Ok(())
    }

    fn require_absent(&self, name: &str) -> Result<()> {
        match self.client.get(&object_path(Kind::Osimage, name), &[]) {
            Ok(_) => bail!("osimage {name} already exists"),
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The tree first (staged, verified, renamed into place), then the object; the tree is
    /// removed again if the object cannot be created.
    fn osimage_import(&mut self, a: &OsimageImport) -> Result<()> {
        let k = Kind::Osimage;
        check_name(k, &a.name)?;
        let dst = a.path.to_str().ok_or_else(|| anyhow!("--path {}: not UTF-8", a.path.display()))?;
        let mut m = Map::new();
        m.insert("name".into(), json!(a.name));
        m.insert("path".into(), json!(dst));
        validate_new(k, &m)?;
        self.require_absent(&a.name)?;
        crate::import::import(&a.from, &a.path)?;
        if let Err(e) = self.client.write("POST", &kind_path(k), Some(&Value::Object(m))) {
            let _ = std::fs::remove_dir_all(&a.path);
            return Err(e.into());
        }
        self.print(&format!("imported osimage {} from {} into {dst}", a.name, a.from.display()));
        Ok(())
    }

    /// The object (server-side clone), and with `--path` the tree first: copied into a staging
    /// directory, renamed into place, and only then recorded (removed again if that fails).
    fn osimage_clone(&mut self, a: &OsimageClone) -> Result<()> {
        let k = Kind::Osimage;
        let plain = RenameArgs { name: a.name.clone(), new_name: a.new_name.clone() };
        let Some(dst) = &a.path else { return self.rename(k, &plain, true) };
        check_name(k, &a.name)?;
        check_name(k, &a.new_name)?;
        let dst_str = dst.to_str().ok_or_else(|| anyhow!("--path {}: not UTF-8", dst.display()))?;
        self.require_absent(&a.new_name)?;
        let src = self.fetch(k, &a.name, false)?;
        let src_path =
            src.get("path").and_then(Value::as_str).ok_or_else(|| anyhow!("osimage {} has no path", a.name))?;
        crate::tree::copy_tree(Path::new(src_path), dst)?;
        let recorded = self
            .client
            .write("POST", &format!("{}/clone", object_path(k, &a.name)), Some(&json!({"new_name": a.new_name})))
            .and_then(|_| self.client.write("PATCH", &object_path(k, &a.new_name), Some(&json!({"path": dst_str}))));
        if let Err(e) = recorded {
            let _ = self.client.write("DELETE", &object_path(k, &a.new_name), None);
            let _ = std::fs::remove_dir_all(dst);
            return Err(e.into());
        }
        self.print(&format!("cloned osimage {} as {} with its tree in {dst_str}", a.name, a.new_name));
        Ok(())
    }

    fn kernels_of(&self, name: &str) -> Result<(Vec<String>, Value)> {
        check_name(Kind::Osimage, name)?;
        let answer = self.client.get(&format!("{}/kernels", object_path(Kind::Osimage, name)), &[])?;
        let kernels = answer
            .get("kernels")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|k| k.as_str().map(String::from)).collect())
            .ok_or_else(|| anyhow!("invalid answer from luna-server: no kernel list in {answer}"))?;
        Ok((kernels, answer))
    }

    /// `--kernel-version V` must name a kernel the tree holds (the server lists them).
    fn check_kernel_in_tree(&self, name: &str, version: &str) -> Result<()> {
        let (kernels, _) = self.kernels_of(name)?;
        if !kernels.iter().any(|k| k == version) {
            let held = if kernels.is_empty() { "none".to_string() } else { kernels.join(", ") };
            bail!(
                "osimage {name} has no kernel {version} in its tree (/boot/vmlinuz-{version} and /lib/modules/{version}/); \
                 it holds: {held}"
            );
        }
        Ok(())
    }

    fn osimage_kernels(&mut self, a: &ShowArgs) -> Result<()> {
        let (kernels, answer) = self.kernels_of(&a.name)?;
        if a.json {
            self.print_json(&answer);
            return Ok(());
        }
        let selected = answer.get("selected").and_then(Value::as_str);
        let mut text = String::new();
        for k in &kernels {
            let mark = if Some(k.as_str()) == selected { "  (boots)" } else { "" };
            text.push_str(&format!("{k}{mark}\n"));
        }
        if kernels.is_empty() {
            text.push_str(&format!("osimage {} has no kernel in its tree\n", a.name));
        } else if selected.is_none() {
            text.push_str("no kernel_version set: pick one with luna osimage change NAME --kernel-version V\n");
        }
        self.print(text.trim_end());
        Ok(())
    }

    /// The object, then its kept revisions with the tracker's and the seeder's counters.
    fn osimage_show(&mut self, args: &ShowArgs) -> Result<()> {
        let k = Kind::Osimage;
        let mut obj = self.fetch(k, &args.name, false)?;
        let revisions = self.client.get(&format!("{}/revisions", object_path(k, &args.name)), &[])?;
        let revisions = as_array(revisions, "revisions")?;
        if args.json {
            // The same key, each revision with its URLs and counters added.
            if let Some(m) = obj.as_object_mut() {
                m.insert("revisions".into(), Value::Array(revisions));
            }
            self.print_json(&obj);
            return Ok(());
        }
        if let Some(m) = obj.as_object_mut() {
            m.remove("revisions");
        }
        let mut text = render::show(k, &obj);
        text.push_str(&render::revisions(&revisions));
        self.print(&text);
        Ok(())
    }

    fn osimage_pack(&mut self, a: &OsimagePack) -> Result<()> {
        check_name(Kind::Osimage, &a.name)?;
        let body = json!({"boot_only": a.boot_only, "image_only": a.image_only, "force": a.force});
        let path = format!("{}/pack", object_path(Kind::Osimage, &a.name));
        let answer = self.client.write("POST", &path, Some(&body))?;
        let id = answer
            .get("job")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("invalid answer from luna-server: no job id in {answer}"))?;
        if a.no_wait {
            self.print(&format!("started pack job {id} for osimage {}", a.name));
            return Ok(());
        }
        let job = loop {
            let answer = self.client.get(&format!("/jobs/{id}"), &[])?;
            let job = JobView::from_json(&answer)
                .ok_or_else(|| anyhow!("invalid answer from luna-server for job {id}: {answer}"))?;
            self.progress.update(&job);
            if job.state != "running" {
                break job;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        self.progress.finish();
        if let Some(w) = &job.warning {
            eprintln!("warning: {w}");
        }
        match (job.state.as_str(), job.revision) {
            ("done", Some(rev)) => {
                self.print(&format!("packed osimage {} as revision {rev}", a.name));
                Ok(())
            }
            ("failed", _) => bail!(
                "packing osimage {} failed at step {}: {}",
                a.name,
                job.step,
                job.error.as_deref().unwrap_or("no reason given")
            ),
            (state, _) => bail!("pack job {id} of osimage {} ended as '{state}' without a revision", a.name),
        }
    }

    fn osimage_rollback(&mut self, a: &OsimageRollback) -> Result<()> {
        check_name(Kind::Osimage, &a.name)?;
        let body = json!({"revision": a.revision});
        let path = format!("{}/rollback", object_path(Kind::Osimage, &a.name));
        let image = self.client.write("POST", &path, Some(&body))?;
        let current = image.get("current_revision").and_then(Value::as_u64);
        let current = current.ok_or_else(|| anyhow!("invalid answer from luna-server: no current_revision"))?;
        self.print(&format!("osimage {} now boots revision {current}", a.name));
        Ok(())
    }

    // ---- bmcsetup ---------------------------------------------------------------------------

    /// The BMC password from wherever the flags say (never from the command line itself), or
    /// `None` if none was given.
    fn bmc_password(&mut self, f: &BmcsetupFields) -> Result<Option<String>> {
        let password = if f.password.is_some() {
            bail!(
                "--password would show the BMC password in `ps` and the shell history: use \
                 --password-file FILE (or - for stdin), --ask-password, or --password-from-env with \
                 LUNA_BMC_PASSWORD set"
            );
        } else if let Some(file) = &f.password_file {
            let arg = if file == "-" { "-".to_string() } else { format!("@{file}") };
            self.text.read_line("--password-file", &arg)?
        } else if f.ask_password {
            let first = rpassword::prompt_password("BMC password: ")
                .context("--ask-password: cannot read the password from the terminal")?;
            let again = rpassword::prompt_password("BMC password again: ")
                .context("--ask-password: cannot read the password from the terminal")?;
            if first != again {
                bail!("--ask-password: the two passwords differ; nothing was changed");
            }
            first
        } else if f.password_from_env {
            match std::env::var(BMC_PASSWORD_ENV) {
                Ok(p) => p,
                Err(_) => bail!("--password-from-env: {BMC_PASSWORD_ENV} is not set (or not UTF-8)"),
            }
        } else {
            return Ok(None);
        };
        if password.is_empty() {
            bail!("the BMC password is empty: give a non-empty one");
        }
        Ok(Some(password))
    }

    fn bmcsetup_fields(&mut self, f: &BmcsetupFields) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        put(&mut m, "user", f.user.clone());
        if let Some(p) = self.bmc_password(f)? {
            m.insert("password".into(), json!(p));
        }
        put(&mut m, "per_node_password", f.per_node_password);
        put(&mut m, "userid", f.userid);
        put(&mut m, "netchannel", f.netchannel);
        put(&mut m, "mgmtchannel", f.mgmtchannel);
        put(&mut m, "protocol", f.protocol);
        put(&mut m, "insecure_tls", f.insecure_tls);
        self.comment(&f.comment, &mut m)?;
        Ok(m)
    }

    fn bmcsetup(&mut self, cmd: &BmcsetupCmd) -> Result<()> {
        let k = Kind::Bmcsetup;
        match cmd {
            BmcsetupCmd::List(a) => self.list(k, &a.list, secrets_query(a.secrets.show_secrets), |_| true),
            BmcsetupCmd::Show(a) => self.show(k, &a.show, a.secrets.show_secrets),
            BmcsetupCmd::Add(a) => {
                check_name(k, &a.name)?;
                let f = &a.fields;
                let given = f.password.is_some() || f.password_file.is_some() || f.ask_password || f.password_from_env;
                if !given && f.per_node_password != Some(true) {
                    bail!(
                        "bmcsetup add needs the BMC password: --password-file FILE (or - for stdin), \
                         --ask-password, or --password-from-env with {BMC_PASSWORD_ENV} set \
                         (or --per-node-password yes)"
                    );
                }
                let mut m = self.bmcsetup_fields(&a.fields)?;
                m.insert("name".into(), json!(a.name));
                validate_new(k, &m)?;
                self.create(k, Value::Object(m))
            }
            BmcsetupCmd::Change(a) => {
                // What `change` fetches has the password redacted to `********`, which still
                // validates, so the merge check works without the secret.
                let m = self.bmcsetup_fields(&a.fields)?;
                self.change(k, &a.name, m)
            }
            BmcsetupCmd::Rename(a) => self.rename(k, a, false),
            BmcsetupCmd::Clone(a) => self.rename(k, a, true),
            BmcsetupCmd::Delete(a) => self.delete(k, a),
        }
    }

    // ---- group ------------------------------------------------------------------------------

    /// Scalar group fields; interfaces are handled by the callers since `add` builds a list and
    /// `change` edits the current one.
    fn group_fields(&mut self, f: &GroupFields) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        put(&mut m, "osimage", f.osimage.clone());
        put(&mut m, "bmcsetup", f.bmcsetup.clone());
        for (flag, key, arg) in [
            ("--prescript", "prescript", &f.prescript),
            ("--partscript", "partscript", &f.partscript),
            ("--postscript", "postscript", &f.postscript),
            ("--cloudinit-userdata", "cloudinit_userdata", &f.cloudinit_userdata),
        ] {
            let v = self.text.read_opt(flag, arg.as_ref())?;
            put(&mut m, key, v);
        }
        put(&mut m, "torrent_interface", f.torrent_interface.clone());
        if let Some(root) = f.root {
            m.insert(
                "root".into(),
                match root {
                    GroupRoot::Inherit => Value::Null,
                    GroupRoot::Mode(r) => Value::from(r.as_str()),
                },
            );
        }
        put(&mut m, "domain", f.domain.clone());
        self.comment(&f.comment, &mut m)?;
        Ok(m)
    }

    fn group(&mut self, cmd: &GroupCmd) -> Result<()> {
        let k = Kind::Group;
        match cmd {
            GroupCmd::List(a) => self.list(k, a, &[], |_| true),
            GroupCmd::Show(a) => self.show(k, a, false),
            GroupCmd::Add(a) => {
                check_name(k, &a.name)?;
                let mut m = self.group_fields(&a.fields)?;
                m.insert("name".into(), json!(a.name));
                let mut ifs = Vec::new();
                set_group_interfaces(&mut ifs, &a.fields, &[])?;
                if !ifs.is_empty() {
                    m.insert("interfaces".into(), Value::Array(ifs));
                }
                validate_new(k, &m)?;
                self.create(k, Value::Object(m))
            }
            GroupCmd::Change(a) => {
                let mut m = self.group_fields(&a.fields)?;
                unset(&mut m, &a.unset)?;
                let edits_interfaces = a.fields.network.is_some()
                    || a.fields.bmc_network.is_some()
                    || !a.fields.interfaces.is_empty()
                    || !a.remove_interface.is_empty();
                if edits_interfaces {
                    // A merge patch replaces lists whole: start from the group's current ones.
                    let current = self.fetch(k, &a.name, false)?;
                    let mut ifs = current.get("interfaces").and_then(Value::as_array).cloned().unwrap_or_default();
                    set_group_interfaces(&mut ifs, &a.fields, &a.remove_interface)
                        .with_context(|| format!("group {}", a.name))?;
                    m.insert("interfaces".into(), Value::Array(ifs));
                }
                self.change(k, &a.name, m)
            }
            GroupCmd::Rename(a) => self.rename(k, a, false),
            GroupCmd::Clone(a) => self.rename(k, a, true),
            GroupCmd::Delete(a) => self.delete(k, a),
        }
    }

    // ---- node -------------------------------------------------------------------------------

    fn node(&mut self, cmd: &NodeCmd) -> Result<()> {
        let k = Kind::Node;
        match cmd {
            NodeCmd::List(a) => {
                let group = a.group.clone();
                let query: Vec<(&str, &str)> = group.iter().map(|g| ("group", g.as_str())).collect();
                // The server filters too; filtering here as well keeps the answer right either way.
                self.list(k, &a.list, &query, |n| {
                    group.as_deref().is_none_or(|g| n.get("group").and_then(Value::as_str) == Some(g))
                })
            }
            NodeCmd::Show(a) => match a.script {
                None => self.show(k, &a.show, a.secrets.show_secrets),
                Some(NodeScript::Boot) => {
                    let node = self.fetch(k, &a.show.name, false)?;
                    let Some(mac) = node.get("mac").and_then(Value::as_str) else {
                        bail!(
                            "node {0} has no mac address, so it has no boot script: set one with 'luna node change {0} --mac MAC'",
                            a.show.name
                        );
                    };
                    let script = self
                        .client
                        .get_text(&format!("/boot/ipxe?mac={}&preview=1", encode_segment(mac)))
                        .with_context(|| format!("cannot get the boot script of node {} (mac {mac})", a.show.name))?;
                    self.print(&script);
                    Ok(())
                }
            },
            NodeCmd::Add(a) => {
                let names = check_hostlist(&a.name)?;
                let f = &a.fields;
                single_node_only(&a.name, names.len(), f)?;
                if let Some(g) = &f.group {
                    check_name(Kind::Group, g)?;
                }
                let create = NodeCreate {
                    name: a.name.clone(),
                    group: f.group.clone().unwrap_or_default(),
                    mac: f.mac,
                    ips: f.ips.iter().cloned().collect(),
                    switch: f.switch.clone(),
                    port: f.port.clone(),
                    localboot: f.localboot.unwrap_or(false),
                    service: f.service.unwrap_or(false),
                    setupbmc: f.setupbmc.unwrap_or(false),
                    comment: self.text.read_opt("--comment", f.comment.comment.as_ref())?.unwrap_or_default(),
                };
                if create.port.is_some() && create.switch.is_none() {
                    bail!(
                        "--port {} needs --switch",
                        create.port.as_ref().map(ToString::to_string).unwrap_or_default()
                    );
                }
                self.create(k, serde_json::to_value(create)?)
            }
            NodeCmd::Change(a) => {
                let names = check_hostlist(&a.name)?;
                let f = &a.fields;
                single_node_only(&a.name, names.len(), f)?;
                let mut p = NodePatch {
                    group: f.group.clone(),
                    mac: f.mac.map(Some),
                    ips: f.ips.iter().cloned().collect(),
                    switch: f.switch.clone().map(Some),
                    port: f.port.clone().map(Some),
                    localboot: f.localboot,
                    service: f.service,
                    setupbmc: f.setupbmc,
                    comment: self.text.read_opt("--comment", f.comment.comment.as_ref())?,
                    ..Default::default()
                };
                for field in &a.unset.unset {
                    let given = match field.as_str() {
                        "mac" => p.mac.replace(None).is_some(),
                        "switch" => p.switch.replace(None).is_some(),
                        "port" => p.port.replace(None).is_some(),
                        "status" => p.status.replace(None).is_some(),
                        other => bail!("invalid value '{other}' for --unset: a node cannot clear it"),
                    };
                    if given {
                        bail!("--{field} and --unset {field} contradict each other");
                    }
                }
                if p == NodePatch::default() {
                    bail!("nothing to change for node {}: give at least one option", a.name);
                }
                self.send_patch(k, &a.name, &serde_json::to_value(p)?)
            }
            NodeCmd::Rename(a) => self.rename(k, a, false),
            NodeCmd::Clone(a) => self.rename(k, a, true),
            NodeCmd::Delete(a) => self.delete(k, a),
            NodeCmd::Watch(a) => {
                let mut stdout = std::io::stdout();
                let terminal = stdout.is_terminal();
                crate::watch::run(&self.client, a.hostlist.as_deref(), &mut stdout, terminal)?;
                Ok(())
            }
            NodeCmd::Reinstall(a) => {
                let results = crate::power::reinstall(&self.client, &a.hostlist)?;
                let text = crate::power::render(&results, a.json);
                self.out.push_str(&text);
                // The error replaces the output: it names each failed node and why.
                let failed: Vec<_> = results.iter().filter(|r| !r.ok()).cloned().collect();
                if !failed.is_empty() {
                    bail!(
                        "{} of {} nodes were not reinstalled:\n{}",
                        failed.len(),
                        results.len(),
                        crate::power::render(&failed, false).trim_end()
                    );
                }
                Ok(())
            }
        }
    }

    // ---- switch, otherdev -------------------------------------------------------------------

    fn device_fields(&mut self, f: &DeviceFields) -> Result<Map<String, Value>> {
        let mut m = Map::new();
        put(&mut m, "network", f.network.clone());
        put(&mut m, "ip", f.ip);
        self.comment(&f.comment, &mut m)?;
        Ok(m)
    }

    fn switch_fields(&mut self, f: &SwitchFields) -> Result<Map<String, Value>> {
        let mut m = self.device_fields(&f.device)?;
        if let Some(c) = &f.community {
            m.insert("community".into(), json!(self.text.read_line("--community", c)?));
        }
        put(&mut m, "oid", f.oid.clone());
        put(&mut m, "uplinks", f.uplinks.clone());
        Ok(m)
    }

    fn switch(&mut self, cmd: &SwitchCmd) -> Result<()> {
        let k = Kind::Switch;
        match cmd {
            SwitchCmd::List(a) => self.list(k, &a.list, secrets_query(a.secrets.show_secrets), |_| true),
            SwitchCmd::Show(a) => self.show(k, &a.show, a.secrets.show_secrets),
            SwitchCmd::Add(a) => {
                check_name(k, &a.name)?;
                let mut m = self.switch_fields(&a.fields)?;
                m.insert("name".into(), json!(a.name));
                validate_new(k, &m)?;
                self.create(k, Value::Object(m))
            }
            SwitchCmd::Change(a) => {
                let m = self.switch_fields(&a.fields)?;
                self.change(k, &a.name, m)
            }
            SwitchCmd::Rename(a) => self.rename(k, a, false),
            SwitchCmd::Clone(a) => self.rename(k, a, true),
            SwitchCmd::Delete(a) => self.delete(k, a),
            SwitchCmd::Listmacs(a) => {
                let mut query = Vec::new();
                if let Some(n) = &a.name {
                    check_name(k, n)?;
                    query.push(("switch", n.as_str()));
                }
                let v = self.client.get("/discovery/macs", &query)?;
                if a.json {
                    self.print_json(&v);
                } else {
                    let switches: Vec<luna_core::api::SwitchMacs> = serde_json::from_value(v)
                        .map_err(|e| anyhow::anyhow!("unexpected answer to /discovery/macs: {e}"))?;
                    self.print(&render::listmacs(&switches));
                }
                Ok(())
            }
        }
    }

    fn otherdev(&mut self, cmd: &OtherdevCmd) -> Result<()> {
        let k = Kind::Otherdev;
        match cmd {
            OtherdevCmd::List(a) => self.list(k, a, &[], |_| true),
            OtherdevCmd::Show(a) => self.show(k, a, false),
            OtherdevCmd::Add(a) => {
                check_name(k, &a.name)?;
                let mut m = self.device_fields(&a.fields)?;
                m.insert("name".into(), json!(a.name));
                validate_new(k, &m)?;
                self.create(k, Value::Object(m))
            }
            OtherdevCmd::Change(a) => {
                let m = self.device_fields(&a.fields)?;
                self.change(k, &a.name, m)
            }
            OtherdevCmd::Rename(a) => self.rename(k, a, false),
            OtherdevCmd::Clone(a) => self.rename(k, a, true),
            OtherdevCmd::Delete(a) => self.delete(k, a),
        }
    }

    pub fn dispatch(&mut self, cmd: &Command) -> Result<()> {
        match cmd {
            Command::Cluster(c) => self.cluster(c),
            Command::Network(c) => self.network(c),
            Command::Osimage(c) => self.osimage(c),
            Command::Bmcsetup(c) => self.bmcsetup(c),
            Command::Group(c) => self.group(c),
            Command::Node(c) => self.node(c),
            Command::Switch(c) => self.switch(c),
            Command::Otherdev(c) => self.otherdev(c),
            // Generated from the clap definition; no request is sent.
            Command::Completions(a) => {
                let script =
                    String::from_utf8(crate::completions(a.shell)).context("completion script is not utf-8")?;
                self.print(&script);
                Ok(())
            }
            Command::Manpages(a) => crate::manpages(&a.dir),
        }
    }
}

/// `--unset` sets fields to `null` in a merge patch; giving a field and unsetting it is a mistake.
fn unset(m: &mut Map<String, Value>, fields: &[String]) -> Result<()> {
    for f in fields {
        if m.contains_key(f) {
            bail!("--{} and --unset {f} contradict each other", f.replace('_', "-"));
        }
        m.insert(f.clone(), Value::Null);
    }
    Ok(())
}

/// Addresses, MACs and switch ports belong to one node: refuse them for a hostlist of several.
fn single_node_only(expr: &str, count: usize, f: &NodeFields) -> Result<()> {
    if count < 2 {
        return Ok(());
    }
    if let Some(mac) = f.mac {
        bail!("--mac {mac} is one node's address, but '{expr}' names {count} nodes");
    }
    if let Some((iface, ip)) = f.ips.first() {
        bail!("--ip {iface}={ip} is one node's address, but '{expr}' names {count} nodes");
    }
    if let Some(port) = &f.port {
        bail!("--port {port} is one node's switch port, but '{expr}' names {count} nodes");
    }
    Ok(())
}

/// Applies `--network` (BOOTIF), `--bmc-network` (BMC), `--interface IF=NET` and
/// `--remove-interface IF` to a group's interface list, keeping each interface's other fields.
fn set_group_interfaces(ifs: &mut Vec<Value>, f: &GroupFields, remove: &[String]) -> Result<()> {
    let mut set = |name: &str, network: &str| match ifs
        .iter_mut()
        .find(|i| i.get("name").and_then(Value::as_str) == Some(name))
    {
        Some(i) => {
            if let Some(o) = i.as_object_mut() {
                o.insert("network".into(), json!(network));
            }
        }
        None => ifs.push(json!({"name": name, "network": network})),
    };
    if let Some(n) = &f.network {
        set(BOOTIF, n);
    }
    if let Some(n) = &f.bmc_network {
        set(BMC, n);
    }
    for (name, network) in &f.interfaces {
        set(name, network);
    }
    for r in remove {
        let before = ifs.len();
        ifs.retain(|i| i.get("name").and_then(Value::as_str) != Some(r.as_str()));
        if ifs.len() == before {
            bail!("has no interface '{r}' to remove");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_rfc7396() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}, "l": [3], "n": 1}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}, "l": [3], "n": 1}));
    }

    #[test]
    fn hostlists_are_checked_locally() {
        assert_eq!(check_hostlist("n[1-3]").unwrap(), ["n1", "n2", "n3"]);
        let e = check_hostlist("node[001-").unwrap_err().to_string();
        assert!(e.contains("malformed hostlist 'node[001-'"), "{e}");
        let e = format!("{:#}", check_hostlist("node_[1-2]").unwrap_err());
        assert!(e.contains("in hostlist 'node_[1-2]'") && e.contains("node_1"), "{e}");
    }

    #[test]
    fn new_objects_are_validated_with_the_model() {
        let mut m = Map::new();
        m.insert("name".into(), json!("cluster"));
        m.insert("cidr".into(), json!("10.141.0.1/16"));
        let e = validate_new(Kind::Network, &m).unwrap_err().to_string();
        assert!(e.contains("10.141.0.1/16") && e.contains("did you mean 10.141.0.0/16"), "{e}");
        m.insert("cidr".into(), json!("10.141.0.0/16"));
        validate_new(Kind::Network, &m).unwrap();
    }

    #[test]
    fn group_interfaces_edit_in_place() {
        let f = GroupFields {
            osimage: None,
            network: Some("cluster2".into()),
            bmcsetup: None,
            bmc_network: Some("ipmi".into()),
            interfaces: vec![("ib0".into(), "ib".into())],
            prescript: None,
            partscript: None,
            postscript: None,
            torrent_interface: None,
            root: None,
            cloudinit_userdata: None,
            domain: None,
            comment: CommentArgs { comment: None },
        };
        let mut ifs = vec![
            json!({"name": "BOOTIF", "network": "cluster", "params": "MTU=9000"}),
            json!({"name": "eth1", "network": "x"}),
        ];
        set_group_interfaces(&mut ifs, &f, &["eth1".to_string()]).unwrap();
        assert_eq!(
            ifs,
            [
                json!({"name": "BOOTIF", "network": "cluster2", "params": "MTU=9000"}),
                json!({"name": "BMC", "network": "ipmi"}),
                json!({"name": "ib0", "network": "ib"})
            ]
        );
        let e = set_group_interfaces(&mut ifs, &f, &["eth9".to_string()]).unwrap_err().to_string();
        assert!(e.contains("'eth9'"), "{e}");
    }

    #[test]
    fn unset_conflicts() {
        let mut m = Map::new();
        m.insert("gateway".into(), json!("10.0.0.1"));
        assert!(unset(&mut m, &["gateway".into()]).unwrap_err().to_string().contains("--gateway and --unset gateway"));
        let mut m = Map::new();
        unset(&mut m, &["dns_server".into()]).unwrap();
        assert_eq!(Value::Object(m), json!({"dns_server": null}));
    }
}
