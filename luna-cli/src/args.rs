//! The command line, defined once with clap derive: every flag lives in exactly one struct and is
//! shared between verbs with `#[command(flatten)]`. `add` verbs make their mandatory flags required
//! with `mut_arg` instead of redefining them.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::Ipv4Net;
use luna_core::model::{BmcProtocol, IpRange, RootMode};
use luna_core::MacAddr;

pub const DEFAULT_SERVER: &str = "https://127.0.0.1:7051";
pub const DEFAULT_TOKEN_FILE: &str = "/etc/luna/token";
/// Where the package puts the CA of the certificate `luna-server init` generates.
pub const DEFAULT_CA: &str = "/etc/luna/ca.pem";

/// Manage a luna cluster: networks, os images, BMC setups, groups, nodes, switches, other devices.
///
/// Reads need no credentials; writes send the admin token from LUNA_TOKEN or the token file.
/// Texts (scripts, comments, passwords) can be given as `@FILE` to read a file or `-` for stdin.
#[derive(Debug, Parser)]
#[command(name = "luna", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// luna-server's admin API (HTTPS only).
    #[arg(long, global = true, display_order = 1000, env = "LUNA_SERVER", default_value = DEFAULT_SERVER, value_name = "URL")]
    pub server: String,
    /// File holding the admin token (used when LUNA_TOKEN is not set).
    #[arg(long, global = true, display_order = 1000, env = "LUNA_TOKEN_FILE", default_value = DEFAULT_TOKEN_FILE, value_name = "FILE")]
    pub token_file: PathBuf,
    /// CA certificate(s) (PEM) the server's HTTPS certificate must verify against.
    #[arg(long, global = true, display_order = 1000, env = "LUNA_CA", default_value = DEFAULT_CA, value_name = "FILE")]
    pub ca: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The cluster-wide settings.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Networks: address ranges nodes and devices get addresses from.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// OS images: chroot trees nodes boot.
    #[command(subcommand)]
    Osimage(OsimageCmd),
    /// BMC setups: the credentials and channels written into nodes' BMCs.
    #[command(subcommand)]
    Bmcsetup(BmcsetupCmd),
    /// Groups: what a set of nodes boots and which networks they sit on.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Nodes (names may be hostlists like node[001-004]).
    #[command(subcommand)]
    Node(NodeCmd),
    /// Ethernet switches luna reads MAC tables from.
    #[command(subcommand)]
    Switch(SwitchCmd),
    /// Other devices that hold an address (PDUs, storage controllers...).
    #[command(subcommand)]
    Otherdev(OtherdevCmd),
    /// Print a shell completion script.
    Completions(CompletionsArgs),
    /// Write man pages for luna and every subcommand into a directory.
    Manpages(ManpagesArgs),
}

// ---------------------------------------------------------------------------------------------
// arguments shared by every kind

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    pub name: String,
    /// Print JSON instead of key/value lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SecretArgs {
    /// Show secrets instead of ******** (needs the admin token).
    #[arg(long)]
    pub show_secrets: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RenameArgs {
    pub name: String,
    pub new_name: String,
}

#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    pub name: String,
}

#[derive(Debug, Clone, Args)]
pub struct CommentArgs {
    /// Free text (`@FILE` or `-` reads it).
    #[arg(long, value_name = "TEXT")]
    pub comment: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct UnsetArgs {
    /// Clear an optional field (repeatable).
    #[arg(long, value_name = "FIELD")]
    pub unset: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// cluster

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Check that the server was initialised and apply the settings given; safe to repeat.
    ///
    /// The store, the admin token and the cluster object are created on the server machine by
    /// `luna-server --config FILE init`; this verb configures the cluster over the API afterwards.
    Init(ClusterChange),
    /// Show the cluster settings and the luna-servers with their last heartbeat.
    Show(ClusterShow),
    /// Change cluster settings.
    Change(ClusterChange),
    /// List the luna-servers of the cluster (heartbeat, addresses, DHCP slice, revisions held).
    Servers(ClusterShow),
}

#[derive(Debug, Clone, Args)]
pub struct ClusterShow {
    /// Print JSON instead of key/value lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
#[command(mut_arg("unset", |a| a.value_parser(["frontend_address", "dhcp_range"])))]
pub struct ClusterChange {
    /// Cluster name.
    #[arg(long)]
    pub name: Option<String>,
    /// The server's address on the provisioning network.
    #[arg(long, value_name = "IP")]
    pub frontend_address: Option<Ipv4Addr>,
    /// Port of the server's HTTP (boot files, API).
    #[arg(long, value_name = "PORT")]
    pub http_port: Option<u16>,
    /// Prefix of automatically named nodes.
    #[arg(long, value_name = "PREFIX")]
    pub nodename_prefix: Option<String>,
    /// Digits of automatically named nodes.
    #[arg(long, value_name = "N")]
    pub nodename_digits: Option<u8>,
    /// Seconds between tracker announces.
    #[arg(long, value_name = "SECONDS")]
    pub tracker_interval: Option<u32>,
    /// Most peers the tracker hands out.
    #[arg(long, value_name = "N")]
    pub tracker_max_peers: Option<u32>,
    /// Interfaces DHCP answers on (comma-separated; replaces the list).
    #[arg(long, value_name = "IF,...", value_delimiter = ',')]
    pub dhcp_interfaces: Option<Vec<String>>,
    /// Addresses for machines luna does not know yet, like 10.141.200.1-10.141.200.254.
    #[arg(long, value_name = "RANGE")]
    pub dhcp_range: Option<IpRange>,
    /// DNS domain of the nodes.
    #[arg(long)]
    pub domain: Option<String>,
    /// SSH public keys cloud-init gives root on the nodes, one per line (`@FILE` such as
    /// `@/root/.ssh/id_ed25519.pub`, `-` for stdin, or the text); replaces the list, `''` empties it.
    #[arg(long, value_name = "KEYS", allow_hyphen_values = true)]
    pub ssh_authorized_keys: Option<String>,
    #[command(flatten)]
    pub comment: CommentArgs,
    #[command(flatten)]
    pub unset: UnsetArgs,
}

// ---------------------------------------------------------------------------------------------
// network

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// List networks.
    List(ListArgs),
    /// Show one network.
    Show(ShowArgs),
    /// Add a network.
    Add(NetworkAdd),
    /// Change a network.
    Change(NetworkChange),
    /// Rename a network (references follow).
    Rename(RenameArgs),
    /// Delete a network nothing uses.
    Delete(DeleteArgs),
    /// Copy a network under a new name.
    Clone(RenameArgs),
    /// Keep addresses of a network from being handed out.
    Reserve(RangeArgs),
    /// Undo a reservation.
    Release(RangeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct NetworkFields {
    /// Address and prefix, like 10.141.0.0/16.
    #[arg(long)]
    pub cidr: Option<Ipv4Net>,
    /// Default gateway.
    #[arg(long, value_name = "IP")]
    pub gateway: Option<Ipv4Addr>,
    /// DNS server handed to nodes.
    #[arg(long, value_name = "IP")]
    pub dns: Option<Ipv4Addr>,
    /// MTU.
    #[arg(long, value_name = "N")]
    pub mtu: Option<u16>,
    #[command(flatten)]
    pub comment: CommentArgs,
}

#[derive(Debug, Clone, Args)]
#[command(mut_arg("cidr", |a| a.required(true)))]
pub struct NetworkAdd {
    pub name: String,
    #[command(flatten)]
    pub fields: NetworkFields,
}

#[derive(Debug, Clone, Args)]
#[command(mut_arg("unset", |a| a.value_parser(["gateway", "dns_server"])))]
pub struct NetworkChange {
    pub name: String,
    #[command(flatten)]
    pub fields: NetworkFields,
    #[command(flatten)]
    pub unset: UnsetArgs,
}

#[derive(Debug, Clone, Args)]
pub struct RangeArgs {
    pub name: String,
    /// An address or a range like 10.141.0.1-10.141.0.9.
    pub range: IpRange,
}

// ---------------------------------------------------------------------------------------------
// osimage

#[derive(Debug, Subcommand)]
pub enum OsimageCmd {
    /// List OS images.
    List(ListArgs),
    /// Show one OS image.
    Show(ShowArgs),
    /// Add an OS image.
    Add(OsimageAdd),
    /// Change an OS image.
    Change(OsimageChange),
    /// Rename an OS image (references follow).
    Rename(RenameArgs),
    /// Delete an OS image no group uses.
    Delete(DeleteArgs),
    /// Copy an OS image under a new name (with --path, its tree too).
    Clone(OsimageClone),
    /// Pack the chroot into a new published revision: archive, kernel, initramfs, torrent (and a
    /// squashfs with its own torrent when the image or a group using it is in overlay root mode).
    Pack(OsimagePack),
    /// Make an older kept revision the current one again (default: the one before it).
    Rollback(OsimageRollback),
    /// List the kernels in the image's tree (`change --kernel-version` picks one).
    Kernels(ShowArgs),
    /// Make a new OS image from a container image: an OCI layout directory, or a `docker save`
    /// or OCI archive (no container runtime needed; run as root on the server host).
    Import(OsimageImport),
    /// Replace the image's tree with a running node's (rsync over ssh as root), except the
    /// image's grab_exclude paths.
    Grab(OsimageGrab),
}

#[derive(Debug, Clone, Args)]
pub struct OsimagePack {
    pub name: String,
    /// Rebuild only the kernel and initramfs; keep the current archive and torrent.
    #[arg(long, conflicts_with = "image_only")]
    pub boot_only: bool,
    /// Rebuild only the archive and torrent; keep the current kernel and initramfs.
    #[arg(long)]
    pub image_only: bool,
    /// Pack even while an lchroot session is open in the image.
    #[arg(long)]
    pub force: bool,
    /// Start the pack job, print its id and return without waiting.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Clone, Args)]
pub struct OsimageGrab {
    pub name: String,
    /// The node to copy from (its first interface with an address; ssh as root).
    #[arg(long, value_name = "NODE")]
    pub from: String,
    /// List what would change (rsync's itemized list) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Clone, Args)]
pub struct OsimageImport {
    pub name: String,
    /// The container image: an OCI image layout directory or a tar archive of one (or of `docker save`).
    #[arg(long, value_name = "SOURCE")]
    pub from: PathBuf,
    /// Where the image tree is written (absolute; must not exist).
    #[arg(long, value_name = "DIR")]
    pub path: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct OsimageClone {
    pub name: String,
    pub new_name: String,
    /// Copy the tree into DIR too (must not exist; hard links, xattrs, ACLs, device nodes and
    /// sparse files kept); run as root on the server host.
    #[arg(long, value_name = "DIR")]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct OsimageRollback {
    pub name: String,
    /// The revision to make current (a kept one; `luna osimage show NAME` lists them).
    pub revision: Option<u32>,
}

#[derive(Debug, Clone, Args)]
pub struct OsimageFields {
    /// The chroot directory (absolute).
    #[arg(long, value_name = "DIR")]
    pub path: Option<String>,
    /// Kernel version to boot, like 6.1.0-28-amd64.
    #[arg(long, value_name = "V")]
    pub kernel_version: Option<String>,
    /// Extra kernel command line (`@FILE` or `-` reads it).
    #[arg(long, value_name = "OPTS", allow_hyphen_values = true)]
    pub kernel_opts: Option<String>,
    /// Paths left out of the packed image (comma-separated globs; replaces the list).
    #[arg(long, value_name = "GLOB,...", value_delimiter = ',')]
    pub grab_exclude: Option<Vec<String>>,
    /// How nodes make their root: tmpfs (image in RAM), overlay (squashfs + RAM overlay) or disk.
    #[arg(long, value_name = "MODE", value_parser = parse_root)]
    pub root: Option<RootMode>,
    /// dracut modules added to the nodes' initramfs (comma-separated; replaces the list).
    #[arg(long, value_name = "MOD,...", value_delimiter = ',')]
    pub dracut_modules_add: Option<Vec<String>>,
    /// dracut modules left out of the nodes' initramfs (comma-separated; replaces the list).
    #[arg(long, value_name = "MOD,...", value_delimiter = ',')]
    pub dracut_modules_omit: Option<Vec<String>>,
    /// Kernel drivers added to the nodes' initramfs, like virtio_net (comma-separated; replaces the list).
    #[arg(long, value_name = "DRV,...", value_delimiter = ',')]
    pub dracut_drivers_add: Option<Vec<String>>,
    /// Kernel drivers left out of the nodes' initramfs (comma-separated; replaces the list).
    #[arg(long, value_name = "DRV,...", value_delimiter = ',')]
    pub dracut_drivers_omit: Option<Vec<String>>,
    #[command(flatten)]
    pub comment: CommentArgs,
}

#[derive(Debug, Clone, Args)]
#[command(mut_arg("path", |a| a.required(true)))]
pub struct OsimageAdd {
    pub name: String,
    #[command(flatten)]
    pub fields: OsimageFields,
}

#[derive(Debug, Clone, Args)]
#[command(mut_arg("unset", |a| a.value_parser(["kernel_version"])))]
pub struct OsimageChange {
    pub name: String,
    #[command(flatten)]
    pub fields: OsimageFields,
    #[command(flatten)]
    pub unset: UnsetArgs,
}

// ---------------------------------------------------------------------------------------------
// bmcsetup

#[derive(Debug, Subcommand)]
pub enum BmcsetupCmd {
    /// List BMC setups.
    List(BmcsetupList),
    /// Show one BMC setup.
    Show(BmcsetupShow),
    /// Add a BMC setup.
    Add(BmcsetupAdd),
    /// Change a BMC setup.
    Change(BmcsetupChange),
    /// Rename a BMC setup (references follow).
    Rename(RenameArgs),
    /// Delete a BMC setup no group uses.
    Delete(DeleteArgs),
    /// Copy a BMC setup under a new name.
    Clone(RenameArgs),
}

#[derive(Debug, Clone, Args)]
pub struct BmcsetupList {
    #[command(flatten)]
    pub list: ListArgs,
    #[command(flatten)]
    pub secrets: SecretArgs,
}

#[derive(Debug, Clone, Args)]
pub struct BmcsetupShow {
    #[command(flatten)]
    pub show: ShowArgs,
    #[command(flatten)]
    pub secrets: SecretArgs,
}

#[derive(Debug, Clone, Args)]
pub struct BmcsetupFields {
    /// BMC user name.
    #[arg(long)]
    pub user: Option<String>,
    /// Read the BMC password from FILE (`-`: stdin; the first line counts).
    #[arg(long, value_name = "FILE", group = "bmc_password")]
    pub password_file: Option<String>,
    /// Prompt for the BMC password (twice, not echoed).
    #[arg(long, group = "bmc_password")]
    pub ask_password: bool,
    /// Take the BMC password from the environment variable LUNA_BMC_PASSWORD.
    #[arg(long, group = "bmc_password")]
    pub password_from_env: bool,
    /// Give every node its own random BMC password, generated by luna-server on the node's first
    /// install plan (`luna node show NAME --show-secrets` shows it); the group password is then
    /// not needed and not sent to nodes.
    #[arg(long, value_parser = parse_yes_no, value_name = "yes|no")]
    pub per_node_password: Option<bool>,
    /// Refused with an explanation: a password on the command line shows in `ps`.
    #[arg(long, hide = true, group = "bmc_password")]
    pub password: Option<String>,
    /// BMC user id slot.
    #[arg(long, value_name = "N")]
    pub userid: Option<u8>,
    /// IPMI LAN channel.
    #[arg(long, value_name = "N")]
    pub netchannel: Option<u8>,
    /// IPMI management channel.
    #[arg(long, value_name = "N")]
    pub mgmtchannel: Option<u8>,
    /// How to talk to the BMC.
    #[arg(long, value_parser = parse_protocol, value_name = "ipmi|redfish")]
    pub protocol: Option<BmcProtocol>,
    /// Redfish: accept the BMC's certificate unverified (self-signed BMCs).
    #[arg(long, value_name = "BOOL")]
    pub insecure_tls: Option<bool>,
    #[command(flatten)]
    pub comment: CommentArgs,
}

#[derive(Debug, Clone, Args)]
#[command(mut_arg("user", |a| a.required(true)))]
pub struct BmcsetupAdd {
    pub name: String,
    #[command(flatten)]
    pub fields: BmcsetupFields,
}

#[derive(Debug, Clone, Args)]
pub struct BmcsetupChange {
    pub name: String,
    #[command(flatten)]
    pub fields: BmcsetupFields,
}

fn parse_protocol(s: &str) -> Result<BmcProtocol, String> {
    s.parse().map_err(|e: luna_core::ModelError| e.to_string())
}

fn parse_root(s: &str) -> Result<RootMode, String> {
    s.parse().map_err(|e: luna_core::ModelError| e.to_string())
}

/// A group's `--root`: a mode, or `inherit` (the osimage's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupRoot {
    Inherit,
    Mode(RootMode),
}

fn parse_group_root(s: &str) -> Result<GroupRoot, String> {
    if s == "inherit" {
        return Ok(GroupRoot::Inherit);
    }
    s.parse()
        .map(GroupRoot::Mode)
        .map_err(|_| format!("invalid root mode '{s}': expected tmpfs, overlay, disk or inherit"))
}

// ---------------------------------------------------------------------------------------------
// group

#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// List groups.
    List(ListArgs),
    /// Show one group.
    Show(ShowArgs),
    /// Add a group.
    Add(GroupAdd),
    /// Change a group.
    Change(GroupChange),
    /// Rename a group (its nodes follow).
    Rename(RenameArgs),
    /// Delete a group without nodes.
    Delete(DeleteArgs),
    /// Copy a group under a new name.
    Clone(RenameArgs),
}

#[derive(Debug, Clone, Args)]
pub struct GroupFields {
    /// The OS image the group boots.
    #[arg(long, value_name = "IMG")]
    pub osimage: Option<String>,
    /// Network of the boot interface (BOOTIF).
    #[arg(long, value_name = "NET")]
    pub network: Option<String>,
    /// BMC setup applied to the group's nodes.
    #[arg(long, value_name = "B")]
    pub bmcsetup: Option<String>,
    /// Network of the BMC interface.
    #[arg(long, value_name = "NET")]
    pub bmc_network: Option<String>,
    /// Another interface, as IF=NET (repeatable).
    #[arg(long = "interface", value_name = "IF=NET", value_parser = parse_if_net)]
    pub interfaces: Vec<(String, String)>,
    /// Script run before partitioning (`@FILE`, `-` for stdin, or the text itself).
    #[arg(long, value_name = "SCRIPT", allow_hyphen_values = true)]
    pub prescript: Option<String>,
    /// Script that prepares /sysroot (`@FILE`, `-` for stdin, or the text itself).
    #[arg(long, value_name = "SCRIPT", allow_hyphen_values = true)]
    pub partscript: Option<String>,
    /// Script run after the image is unpacked (`@FILE`, `-` for stdin, or the text itself).
    #[arg(long, value_name = "SCRIPT", allow_hyphen_values = true)]
    pub postscript: Option<String>,
    /// Interface the image is downloaded over.
    #[arg(long, value_name = "IF")]
    pub torrent_interface: Option<String>,
    /// Root mode for this group's nodes (tmpfs, overlay, disk), or `inherit` the osimage's.
    #[arg(long, value_name = "MODE", value_parser = parse_group_root)]
    pub root: Option<GroupRoot>,
    /// cloud-init user-data for images with cloud-init (`@FILE`, `-` for stdin, or the text).
    #[arg(long, value_name = "USERDATA", allow_hyphen_values = true)]
    pub cloudinit_userdata: Option<String>,
    /// DNS domain of the group's nodes (overrides the cluster's).
    #[arg(long)]
    pub domain: Option<String>,
    #[command(flatten)]
    pub comment: CommentArgs,
}

#[derive(Debug, Clone, Args)]
#[command(mut_arg("osimage", |a| a.required(true)))]
pub struct GroupAdd {
    pub name: String,
    #[command(flatten)]
    pub fields: GroupFields,
}

#[derive(Debug, Clone, Args)]
pub struct GroupChange {
    pub name: String,
    #[command(flatten)]
    pub fields: GroupFields,
    /// Remove an interface (repeatable).
    #[arg(long, value_name = "IF")]
    pub remove_interface: Vec<String>,
    /// Clear an optional field (repeatable).
    #[arg(long, value_name = "FIELD", value_parser = ["bmcsetup", "domain"])]
    pub unset: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// lpower (the second binary)

/// Power control of nodes through their BMCs (IPMI lanplus or Redfish, as their group's
/// bmcsetup says). The server talks to the BMCs; BMC passwords never reach this command.
///
/// ACTION: status, on, off, soft (ACPI shutdown), reset, cycle, identify [SECONDS|off],
/// pxe (next boot from the network, once), disk (next boot from disk, once).
/// One line per node in hostlist order; the exit status is 0 only if every node succeeded.
#[derive(Debug, Parser)]
#[command(
    name = "lpower",
    version,
    max_term_width = 100,
    override_usage = "lpower [OPTIONS] HOSTLIST ACTION [SECONDS|off]\n       lpower [OPTIONS] -g GROUP ACTION [SECONDS|off]"
)]
pub struct LpowerCli {
    #[command(flatten)]
    pub global: GlobalArgs,
    /// Every node of this group instead of a hostlist.
    #[arg(short = 'g', long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Print the per-node results as JSON.
    #[arg(long)]
    pub json: bool,
    /// HOSTLIST (unless -g) ACTION [SECONDS|off].
    #[arg(required = true, num_args = 1..=3, value_name = "ARGS")]
    pub words: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// node

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List nodes.
    List(NodeList),
    /// Show one node.
    Show(NodeShow),
    /// Add nodes (HOSTLIST like node[001-004]); addresses are allocated unless given.
    Add(NodeAdd),
    /// Change nodes.
    Change(NodeChange),
    /// Rename a node.
    Rename(RenameArgs),
    /// Delete nodes.
    Delete(DeleteArgs),
    /// Copy a node under a new name (it gets its own addresses and no MAC).
    Clone(RenameArgs),
    /// Reinstall nodes: localboot off, next boot from the network (once), then power cycle (power
    /// on if off).
    Reinstall(NodeReinstall),
    /// Follow nodes as they boot (live, like the web page): until all are installed or booted.
    Watch(NodeWatch),
}

#[derive(Debug, Clone, Args)]
pub struct NodeWatch {
    /// Nodes to watch (a hostlist like node[001-004]); every node when left out.
    pub hostlist: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct NodeReinstall {
    /// Nodes (a hostlist like node[001-004]).
    pub hostlist: String,
    /// Print the per-node results as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct NodeList {
    #[command(flatten)]
    pub list: ListArgs,
    /// Only the nodes of this group.
    #[arg(long, value_name = "G")]
    pub group: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NodeScript {
    /// The iPXE script the server hands the node when it boots.
    Boot,
}

#[derive(Debug, Clone, Args)]
pub struct NodeShow {
    #[command(flatten)]
    pub show: ShowArgs,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// Print a script the server generates for the node instead.
    #[arg(long, value_enum)]
    pub script: Option<NodeScript>,
}

#[derive(Debug, Clone, Args)]
pub struct NodeFields {
    /// The node's group.
    #[arg(long, value_name = "G")]
    pub group: Option<String>,
    /// MAC of the boot interface.
    #[arg(long)]
    pub mac: Option<MacAddr>,
    /// Address of an interface, as IF=ADDR (repeatable), like BOOTIF=10.141.0.10.
    #[arg(long = "ip", value_name = "IF=ADDR", value_parser = parse_if_ip)]
    pub ips: Vec<(String, Ipv4Addr)>,
    /// Switch the boot interface is cabled to.
    #[arg(long, value_name = "S")]
    pub switch: Option<String>,
    /// Port on that switch: its number (bridge port) or its name as the switch reports it (Gi1/0/7).
    #[arg(long, value_name = "P")]
    pub port: Option<luna_core::model::SwitchPort>,
    /// Boot from the local disk instead of the network.
    #[arg(long, value_parser = parse_yes_no, value_name = "yes|no")]
    pub localboot: Option<bool>,
    /// Service mode: boot into the installer environment and stay there.
    #[arg(long, value_parser = parse_yes_no, value_name = "yes|no")]
    pub service: Option<bool>,
    /// Configure the BMC while booting.
    #[arg(long, value_parser = parse_yes_no, value_name = "yes|no")]
    pub setupbmc: Option<bool>,
    #[command(flatten)]
    pub comment: CommentArgs,
}

#[derive(Debug, Clone, Args)]
#[command(mut_arg("group", |a| a.required(true)))]
pub struct NodeAdd {
    /// Node name or hostlist.
    pub name: String,
    #[command(flatten)]
    pub fields: NodeFields,
}

#[derive(Debug, Clone, Args)]
#[command(mut_arg("unset", |a| a.value_parser(["mac", "switch", "port", "status"])))]
pub struct NodeChange {
    /// Node name or hostlist.
    pub name: String,
    #[command(flatten)]
    pub fields: NodeFields,
    #[command(flatten)]
    pub unset: UnsetArgs,
}

// ---------------------------------------------------------------------------------------------
// switch, otherdev

#[derive(Debug, Subcommand)]
pub enum SwitchCmd {
    /// List switches.
    List(SwitchList),
    /// Show one switch.
    Show(SwitchShow),
    /// Add a switch.
    Add(SwitchAdd),
    /// Change a switch.
    Change(SwitchChange),
    /// Rename a switch (nodes follow).
    Rename(RenameArgs),
    /// Delete a switch no node is cabled to.
    Delete(DeleteArgs),
    /// Copy a switch under a new name (it gets the next free address).
    Clone(RenameArgs),
    /// MACs the switches reported on their ports (switch-port autodiscovery), with the node
    /// configured for each port.
    Listmacs(SwitchListmacs),
}

#[derive(Debug, Clone, Args)]
pub struct SwitchListmacs {
    /// Only this switch.
    pub name: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SwitchList {
    #[command(flatten)]
    pub list: ListArgs,
    #[command(flatten)]
    pub secrets: SecretArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SwitchShow {
    #[command(flatten)]
    pub show: ShowArgs,
    #[command(flatten)]
    pub secrets: SecretArgs,
}

#[derive(Debug, Clone, Args)]
pub struct DeviceFields {
    /// Network the device's address is on.
    #[arg(long, value_name = "NET")]
    pub network: Option<String>,
    /// The device's address.
    #[arg(long)]
    pub ip: Option<Ipv4Addr>,
    #[command(flatten)]
    pub comment: CommentArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SwitchFields {
    #[command(flatten)]
    pub device: DeviceFields,
    /// SNMP read community (`@FILE` or `-` reads it).
    #[arg(long, value_name = "C")]
    pub community: Option<String>,
    /// OID of the MAC → port table.
    #[arg(long)]
    pub oid: Option<String>,
    /// Ports leading to other switches (comma-separated; replaces the list).
    #[arg(long, value_name = "PORT,...", value_delimiter = ',')]
    pub uplinks: Option<Vec<u32>>,
}

#[derive(Debug, Clone, Args)]
#[command(mut_arg("network", |a| a.required(true)), mut_arg("ip", |a| a.required(true)))]
pub struct SwitchAdd {
    pub name: String,
    #[command(flatten)]
    pub fields: SwitchFields,
}

#[derive(Debug, Clone, Args)]
pub struct SwitchChange {
    pub name: String,
    #[command(flatten)]
    pub fields: SwitchFields,
}

#[derive(Debug, Subcommand)]
pub enum OtherdevCmd {
    /// List other devices.
    List(ListArgs),
    /// Show one device.
    Show(ShowArgs),
    /// Add a device.
    Add(OtherdevAdd),
    /// Change a device.
    Change(OtherdevChange),
    /// Rename a device.
    Rename(RenameArgs),
    /// Delete a device.
    Delete(DeleteArgs),
    /// Copy a device under a new name (it gets the next free address).
    Clone(RenameArgs),
}

#[derive(Debug, Clone, Args)]
#[command(mut_arg("network", |a| a.required(true)), mut_arg("ip", |a| a.required(true)))]
pub struct OtherdevAdd {
    pub name: String,
    #[command(flatten)]
    pub fields: DeviceFields,
}

#[derive(Debug, Clone, Args)]
pub struct OtherdevChange {
    pub name: String,
    #[command(flatten)]
    pub fields: DeviceFields,
}

// ---------------------------------------------------------------------------------------------
// generated files

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    pub shell: CompletionShell,
}

#[derive(Debug, Clone, Args)]
pub struct ManpagesArgs {
    /// Directory the pages are written to (created if missing).
    pub dir: PathBuf,
}

// ---------------------------------------------------------------------------------------------
// lchroot (its own binary)

/// luna-server's `data_dir` default: where lchroot sessions take an image's lock.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/luna";

/// Work inside an OS image's tree: an interactive shell, or COMMAND, in a private mount
/// namespace with /proc, /sys, /dev, /dev/pts, /run and /tmp mounted, the host's resolv.conf,
/// and `uname -r` reporting the image's kernel. Run it as root on the luna server. The
/// command's exit status is lchroot's; `luna osimage pack` refuses the image while a session
/// is open (unless --force).
#[derive(Debug, Parser)]
#[command(name = "lchroot", version, max_term_width = 100)]
pub struct LchrootCli {
    #[command(flatten)]
    pub global: GlobalArgs,
    /// luna-server's data directory (its `data_dir`), where sessions lock the image.
    #[arg(long, env = "LUNA_DATA_DIR", default_value = DEFAULT_DATA_DIR, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The osimage to enter.
    pub image: String,
    /// The command and its arguments (default: the image's /bin/bash, else /bin/sh).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

// ---------------------------------------------------------------------------------------------
// value parsers: errors are lower-case and name the input

pub fn parse_yes_no(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "yes" | "y" | "true" | "on" | "1" => Ok(true),
        "no" | "n" | "false" | "off" | "0" => Ok(false),
        _ => Err("expected yes or no".into()),
    }
}

fn split_assignment<'a>(s: &'a str, what: &str) -> Result<(&'a str, &'a str), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => Ok((k.trim(), v.trim())),
        _ => Err(format!("expected {what}")),
    }
}

/// `IF=ADDR`, like `BOOTIF=10.141.0.10`.
pub fn parse_if_ip(s: &str) -> Result<(String, Ipv4Addr), String> {
    let (iface, addr) = split_assignment(s, "IF=ADDR like BOOTIF=10.141.0.10")?;
    let ip = addr.parse().map_err(|_| format!("'{addr}' is not an IPv4 address"))?;
    Ok((iface.to_string(), ip))
}

/// `IF=NET`, like `ib0=infiniband`.
pub fn parse_if_net(s: &str) -> Result<(String, String), String> {
    let (iface, net) = split_assignment(s, "IF=NET like ib0=infiniband")?;
    Ok((iface.to_string(), net.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("luna").chain(args.iter().copied()))
    }

    fn ok(args: &[&str]) -> Command {
        match parse(args) {
            Ok(c) => c.command,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    fn err(args: &[&str]) -> String {
        match parse(args) {
            Ok(c) => panic!("{args:?} parsed: {:?}", c.command),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_anywhere() {
        let c = parse(&["node", "list", "--server", "http://x:1", "--token-file", "/t"]).unwrap();
        assert_eq!(c.global.server, "http://x:1");
        assert_eq!(c.global.token_file, PathBuf::from("/t"));
    }

    #[test]
    fn every_kind_has_the_common_verbs() {
        for kind in ["network", "osimage", "bmcsetup", "group", "node", "switch", "otherdev"] {
            ok(&[kind, "list"]);
            ok(&[kind, "list", "--json"]);
            ok(&[kind, "show", "x"]);
            ok(&[kind, "show", "x", "--json"]);
            ok(&[kind, "change", "x"]);
            ok(&[kind, "rename", "x", "y"]);
            ok(&[kind, "clone", "x", "y"]);
            ok(&[kind, "delete", "x"]);
            assert!(err(&[kind, "rename", "x"]).contains("NEW_NAME"), "{kind}");
        }
        for verb in ["init", "change"] {
            ok(&["cluster", verb]);
        }
        assert!(matches!(
            ok(&["cluster", "show", "--json"]),
            Command::Cluster(ClusterCmd::Show(ClusterShow { json: true }))
        ));
        assert!(matches!(
            ok(&["cluster", "servers", "--json"]),
            Command::Cluster(ClusterCmd::Servers(ClusterShow { json: true }))
        ));
    }

    #[test]
    fn cluster_fields() {
        let Command::Cluster(ClusterCmd::Init(c)) = ok(&[
            "cluster",
            "init",
            "--frontend-address",
            "10.141.255.254",
            "--dhcp-interfaces",
            "eth1,eth2",
            "--dhcp-range",
            "10.141.200.1-10.141.200.9",
            "--unset",
            "frontend_address",
        ]) else {
            panic!()
        };
        assert_eq!(c.frontend_address, Some("10.141.255.254".parse().unwrap()));
        assert_eq!(c.dhcp_interfaces, Some(vec!["eth1".to_string(), "eth2".to_string()]));
        assert_eq!(c.dhcp_range.unwrap().len(), 9);
        assert!(err(&["cluster", "change", "--unset", "http_port"]).contains("http_port"));
        assert!(err(&["cluster", "change", "--dhcp-range", "10.0.0.9-10.0.0.1"]).contains("runs backwards"));
    }

    #[test]
    fn network_verbs() {
        let Command::Network(NetworkCmd::Add(a)) = ok(&[
            "network",
            "add",
            "cluster",
            "--cidr",
            "10.141.0.0/16",
            "--gateway",
            "10.141.255.254",
            "--dns",
            "10.141.0.1",
            "--mtu",
            "9000",
            "--comment",
            "main",
        ]) else {
            panic!()
        };
        assert_eq!(a.fields.cidr.unwrap().to_string(), "10.141.0.0/16");
        assert_eq!(a.fields.mtu, Some(9000));
        assert_eq!(a.fields.comment.comment.as_deref(), Some("main"));
        let e = err(&["network", "add", "x"]);
        assert!(e.contains("--cidr"), "{e}");
        let e = err(&["network", "add", "x", "--cidr", "10.0.0.0/33"]);
        assert!(e.contains("'10.0.0.0/33'"), "{e}");
        let Command::Network(NetworkCmd::Change(c)) = ok(&["network", "change", "x", "--unset", "gateway"]) else {
            panic!()
        };
        assert_eq!(c.unset.unset, ["gateway"]);
        assert!(err(&["network", "change", "x", "--unset", "cidr"]).contains("cidr"));
        let Command::Network(NetworkCmd::Reserve(r)) = ok(&["network", "reserve", "x", "10.0.0.1-10.0.0.5"]) else {
            panic!()
        };
        assert_eq!(r.range.len(), 5);
        assert!(matches!(ok(&["network", "release", "x", "10.0.0.1"]), Command::Network(NetworkCmd::Release(_))));
        assert!(err(&["network", "reserve", "x", "10.0.0"]).contains("'10.0.0'"));
    }

    #[test]
    fn osimage_verbs() {
        let Command::Osimage(OsimageCmd::Add(a)) = ok(&[
            "osimage",
            "add",
            "rocky9",
            "--path",
            "/images/rocky9",
            "--kernel-version",
            "6.1.0-28-amd64",
            "--kernel-opts",
            "-- quiet",
            "--grab-exclude",
            "a/*,b/*",
        ]) else {
            panic!()
        };
        assert_eq!(a.fields.path.as_deref(), Some("/images/rocky9"));
        assert_eq!(a.fields.kernel_opts.as_deref(), Some("-- quiet"));
        assert_eq!(a.fields.grab_exclude.unwrap(), ["a/*", "b/*"]);
        assert!(err(&["osimage", "add", "x"]).contains("--path"));
        let Command::Osimage(OsimageCmd::Change(c)) = ok(&[
            "osimage",
            "change",
            "rocky9",
            "--dracut-drivers-add",
            "virtio_net,virtio_pci",
            "--dracut-modules-omit",
            "plymouth",
        ]) else {
            panic!()
        };
        assert_eq!(c.fields.dracut_drivers_add.unwrap(), ["virtio_net", "virtio_pci"]);
        assert_eq!(c.fields.dracut_modules_omit.unwrap(), ["plymouth"]);
        assert!(c.fields.dracut_modules_add.is_none() && c.fields.dracut_drivers_omit.is_none());
        let Command::Osimage(OsimageCmd::Pack(p)) = ok(&["osimage", "pack", "rocky9", "--boot-only"]) else { panic!() };
        assert!(p.boot_only && !p.image_only && !p.force && !p.no_wait);
        assert!(err(&["osimage", "pack", "x", "--boot-only", "--image-only"]).contains("--image-only"));
        let Command::Osimage(OsimageCmd::Rollback(r)) = ok(&["osimage", "rollback", "rocky9", "3"]) else { panic!() };
        assert_eq!(r.revision, Some(3));
        assert!(err(&["osimage", "rollback", "rocky9", "three"]).contains("three"));
    }

    #[test]
    fn bmcsetup_verbs() {
        let Command::Bmcsetup(BmcsetupCmd::Add(a)) = ok(&[
            "bmcsetup",
            "add",
            "b",
            "--user",
            "admin",
            "--password-file",
            "/p",
            "--userid",
            "3",
            "--netchannel",
            "2",
            "--mgmtchannel",
            "4",
            "--protocol",
            "redfish",
        ]) else {
            panic!()
        };
        assert_eq!(a.fields.protocol, Some(BmcProtocol::Redfish));
        let Command::Osimage(OsimageCmd::Change(o)) = ok(&["osimage", "change", "i", "--root", "overlay"]) else {
            panic!()
        };
        assert_eq!(o.fields.root, Some(RootMode::Overlay));
        assert!(err(&["osimage", "change", "i", "--root", "nfs"]).contains("tmpfs, overlay or disk"));
        let Command::Group(GroupCmd::Change(g)) = ok(&["group", "change", "g", "--root", "inherit"]) else { panic!() };
        assert_eq!(g.fields.root, Some(GroupRoot::Inherit));
        assert!(err(&["group", "change", "g", "--root", "nfs"]).contains("or inherit"));
        assert_eq!((a.fields.userid, a.fields.netchannel, a.fields.mgmtchannel), (Some(3), Some(2), Some(4)));
        assert_eq!(a.fields.password_file.as_deref(), Some("/p"));
        let two = err(&["bmcsetup", "add", "b", "--user", "u", "--password-file", "/p", "--ask-password"]);
        assert!(two.contains("--ask-password"), "{two}");
        assert!(err(&["bmcsetup", "add", "b", "--user", "u", "--ask-password", "--protocol", "snmp"]).contains("snmp"));
        let Command::Bmcsetup(BmcsetupCmd::Show(s)) = ok(&["bmcsetup", "show", "b", "--show-secrets"]) else {
            panic!()
        };
        assert!(s.secrets.show_secrets);
        let Command::Bmcsetup(BmcsetupCmd::List(l)) = ok(&["bmcsetup", "list", "--show-secrets", "--json"]) else {
            panic!()
        };
        assert!(l.secrets.show_secrets && l.list.json);
    }

    #[test]
    fn group_verbs() {
        let Command::Group(GroupCmd::Add(a)) = ok(&[
            "group",
            "add",
            "compute",
            "--osimage",
            "rocky9",
            "--network",
            "cluster",
            "--bmcsetup",
            "b",
            "--bmc-network",
            "ipmi",
            "--interface",
            "ib0=infiniband",
            "--interface",
            "eth1 = storage",
            "--prescript",
            "-",
            "--postscript",
            "@/tmp/post.sh",
        ]) else {
            panic!()
        };
        assert_eq!(
            a.fields.interfaces,
            [("ib0".to_string(), "infiniband".to_string()), ("eth1".to_string(), "storage".to_string())]
        );
        assert_eq!(a.fields.prescript.as_deref(), Some("-"));
        assert!(err(&["group", "add", "g"]).contains("--osimage"));
        let e = err(&["group", "add", "g", "--osimage", "i", "--interface", "ib0"]);
        assert!(e.contains("'ib0'") && e.contains("IF=NET"), "{e}");
        let Command::Group(GroupCmd::Change(c)) =
            ok(&["group", "change", "g", "--remove-interface", "ib0", "--unset", "bmcsetup"])
        else {
            panic!()
        };
        assert_eq!(c.remove_interface, ["ib0"]);
        assert_eq!(c.unset, ["bmcsetup"]);
    }

    #[test]
    fn node_verbs() {
        let Command::Node(NodeCmd::Add(a)) = ok(&[
            "node",
            "add",
            "node[001-004]",
            "--group",
            "compute",
            "--mac",
            "52-54-00-AB-CD-EF",
            "--ip",
            "BOOTIF=10.141.0.10",
            "--ip",
            "BMC=10.148.0.10",
        ]) else {
            panic!()
        };
        assert_eq!(a.name, "node[001-004]");
        assert_eq!(a.fields.mac.unwrap().to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(a.fields.ips.len(), 2);
        assert!(err(&["node", "add", "n1"]).contains("--group"));
        let e = err(&["node", "add", "n1", "--group", "g", "--mac", "zz:zz"]);
        assert!(e.contains("invalid mac address 'zz:zz'"), "{e}");
        let e = err(&["node", "add", "n1", "--group", "g", "--ip", "10.141.0.1"]);
        assert!(e.contains("'10.141.0.1'") && e.contains("IF=ADDR"), "{e}");
        let e = err(&["node", "add", "n1", "--group", "g", "--ip", "BOOTIF=10.141.0.300"]);
        assert!(e.contains("'10.141.0.300'"), "{e}");

        let Command::Node(NodeCmd::Change(c)) = ok(&[
            "node",
            "change",
            "node[001-002]",
            "--switch",
            "sw1",
            "--port",
            "7",
            "--localboot",
            "yes",
            "--service",
            "no",
            "--setupbmc",
            "yes",
            "--comment",
            "rack 3",
            "--unset",
            "mac",
        ]) else {
            panic!()
        };
        assert_eq!((c.fields.localboot, c.fields.service, c.fields.setupbmc), (Some(true), Some(false), Some(true)));
        assert_eq!(
            (c.fields.switch.as_deref(), c.fields.port),
            (Some("sw1"), Some(luna_core::model::SwitchPort::Number(7)))
        );
        assert_eq!(c.unset.unset, ["mac"]);
        assert!(err(&["node", "change", "n", "--localboot", "maybe"]).contains("'maybe'"));

        let Command::Node(NodeCmd::List(l)) = ok(&["node", "list", "--group", "compute", "--json"]) else { panic!() };
        assert_eq!(l.group.as_deref(), Some("compute"));
        let Command::Node(NodeCmd::Show(s)) = ok(&["node", "show", "node001", "--script", "boot"]) else { panic!() };
        assert_eq!(s.script, Some(NodeScript::Boot));
        assert!(err(&["node", "show", "n", "--script", "nope"]).contains("nope"));
    }

    #[test]
    fn switch_and_otherdev_verbs() {
        let Command::Switch(SwitchCmd::Add(a)) = ok(&[
            "switch",
            "add",
            "sw1",
            "--network",
            "cluster",
            "--ip",
            "10.141.253.1",
            "--community",
            "private",
            "--oid",
            "1.3.6.1.2.1.17.7.1.2.2.1.2",
            "--uplinks",
            "49,50",
        ]) else {
            panic!()
        };
        assert_eq!(a.fields.uplinks, Some(vec![49, 50]));
        assert_eq!(a.fields.device.ip, Some("10.141.253.1".parse().unwrap()));
        assert!(err(&["switch", "add", "sw1", "--network", "n"]).contains("--ip"));
        assert!(err(&["switch", "add", "sw1", "--network", "n", "--ip", "1.2.3.4", "--uplinks", "a"]).contains("'a'"));
        let Command::Switch(SwitchCmd::Show(s)) = ok(&["switch", "show", "sw1", "--show-secrets"]) else { panic!() };
        assert!(s.secrets.show_secrets);
        ok(&["otherdev", "add", "pdu1", "--network", "cluster", "--ip", "10.141.253.10", "--comment", "pdu"]);
        assert!(err(&["otherdev", "add", "pdu1", "--ip", "10.141.253.10"]).contains("--network"));
    }

    #[test]
    fn generated_files_verbs() {
        for shell in ["bash", "zsh", "fish"] {
            ok(&["completions", shell]);
        }
        assert!(err(&["completions", "tcsh"]).contains("tcsh"));
        let Command::Manpages(m) = ok(&["manpages", "/tmp/man"]) else { panic!() };
        assert_eq!(m.dir, PathBuf::from("/tmp/man"));
    }

    #[test]
    fn value_parsers() {
        assert_eq!(parse_if_ip("BOOTIF=10.0.0.1"), Ok(("BOOTIF".into(), "10.0.0.1".parse().unwrap())));
        assert!(parse_if_ip("=10.0.0.1").unwrap_err().contains("IF=ADDR"));
        assert!(parse_if_ip("BOOTIF=10.0.0.256").unwrap_err().contains("'10.0.0.256'"));
        assert!(parse_if_ip("BOOTIF=").is_err());
        assert_eq!(parse_yes_no("No"), Ok(false));
        assert_eq!(parse_yes_no("yes"), Ok(true));
    }

    #[test]
    fn port_by_name_and_listmacs() {
        let Command::Node(NodeCmd::Change(c)) = ok(&["node", "change", "n1", "--switch", "sw1", "--port", "Gi1/0/8"])
        else {
            panic!()
        };
        assert_eq!(c.fields.port, Some(luna_core::model::SwitchPort::Name("Gi1/0/8".into())));
        assert!(err(&["node", "change", "n1", "--switch", "sw1", "--port", "Gi 1"]).contains("Gi 1"));
        let Command::Switch(SwitchCmd::Listmacs(l)) = ok(&["switch", "listmacs", "sw1", "--json"]) else { panic!() };
        assert_eq!((l.name.as_deref(), l.json), (Some("sw1"), true));
        let Command::Switch(SwitchCmd::Listmacs(l)) = ok(&["switch", "listmacs"]) else { panic!() };
        assert_eq!((l.name, l.json), (None, false));
    }
}
