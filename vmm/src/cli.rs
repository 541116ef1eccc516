//! Command-line interface: clap definitions and the size parser (K/M/G suffixes).
//! Validation that needs the host (files, memory, KVM limits) happens in `config`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::virtio::spec::{self, DiskArg, NetArg};

/// fabvm: a minimal KVM microVM monitor with a memory fabric.
#[derive(Debug, Parser)]
#[command(
    name = "fabvm",
    version,
    about,
    disable_help_subcommand = true,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// A subcommand; without one, fabvm boots (`--kernel`) or restores (`--restore`) a VM.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Boot or restore options.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Options for running a VM.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Guest kernel: a bzImage (64-bit boot protocol) or an uncompressed ELF vmlinux (PVH or 64-bit entry).
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present = "restore",
        conflicts_with = "restore"
    )]
    pub kernel: Option<PathBuf>,

    /// Start from a snapshot directory (made by `fabvm ctl snapshot DIR`) instead of a kernel.
    #[arg(long, value_name = "SNAPSHOT")]
    pub restore: Option<PathBuf>,

    /// With --restore: fetch pages from the store on first touch (userfaultfd) instead of
    /// mapping a memory image built up front.
    #[arg(long, requires = "restore")]
    pub lazy: bool,

    /// With --restore: etcd endpoints (comma-separated URLs) of the cluster to fetch the pages
    /// the store lacks from, from the hosts whose summaries claim them (docs/cluster.md).
    #[arg(
        long,
        value_name = "URL[,URL...]",
        requires = "key",
        conflicts_with = "kernel"
    )]
    pub etcd: Option<String>,

    /// With --etcd: the page service's pre-shared key file (the migration key scheme).
    #[arg(long, value_name = "FILE", requires = "etcd")]
    pub key: Option<PathBuf>,

    /// With --restore: report the pages pulled from the cluster (per host) as one line of
    /// JSON on stderr.
    #[arg(long, conflicts_with = "kernel")]
    pub json: bool,

    /// Guest memory size, e.g. 512M or 2G (K/M/G/T suffixes; a bare number is MiB) [default: 512M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size, conflicts_with = "restore")]
    pub mem: Option<u64>,

    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N", conflicts_with = "restore")]
    pub cpus: Option<u32>,

    /// Kernel command line [default: "console=ttyS0 reboot=k panic=1"].
    #[arg(long, value_name = "STR", conflicts_with = "restore")]
    pub cmdline: Option<String>,

    /// Initial ramdisk.
    #[arg(long, value_name = "PATH", conflicts_with = "restore")]
    pub initrd: Option<PathBuf>,

    /// Back guest memory with small pages only (no transparent huge pages): slower first touch,
    /// exact dirty logging on nested KVM (see docs/snapshots.md).
    #[arg(long, conflicts_with = "restore")]
    pub no_hugepages: bool,

    /// Share identical pages with other VMs on this host through the kernel's KSM (off by
    /// default: merged pages are a timing side channel between VMs, see docs/sharing.md). `guided`
    /// (what `--share` alone means) marks only pages with twins in other VMs and runs ksmd
    /// fast while they merge; `plain` marks all guest memory. Turns transparent huge pages off.
    #[arg(long, value_name = "MODE", num_args = 0..=1, require_equals = true,
          default_missing_value = "guided", value_enum, conflicts_with = "lazy")]
    pub share: Option<crate::sharing::ShareMode>,

    /// A virtio-blk disk on a raw image (repeatable); `,ro` refuses guest writes. With
    /// --restore: confirms a disk the snapshot reopens (each must be named, as recorded).
    #[arg(long = "disk", value_name = "PATH[,ro]", value_parser = spec::parse_disk)]
    pub disks: Vec<DiskArg>,

    /// A virtio-net device on a tap interface (repeatable; the tap is created if missing).
    /// With --restore: confirms a tap the snapshot reopens (each must be named).
    #[arg(long = "net", value_name = "tap=NAME[,mac=MAC]", value_parser = spec::parse_net)]
    pub nets: Vec<NetArg>,

    /// A virtio-rng device fed by the host's getrandom.
    #[arg(long, conflicts_with = "restore")]
    pub rng: bool,

    /// Serve the HTTP API (docs/api.md) on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,

    /// Host page store [default: $XDG_DATA_HOME/fabvm/store, or /var/lib/fabvm/store as root].
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,

    /// How page identities are kept.
    #[command(flatten)]
    pub identities: IdentityArgs,

    /// seccomp filters.
    #[command(flatten)]
    pub seccomp: SeccompArgs,
}

/// seccomp filters on the VMM's threads (see `seccomp` and docs/seccomp.md).
#[derive(Debug, Clone, Copy, Args)]
pub struct SeccompArgs {
    /// seccomp filters on every thread: `on`; `off` (debugging only); `log` (forbidden calls
    /// are allowed and logged by the kernel, see `dmesg`).
    #[arg(
        long = "seccomp",
        value_name = "on|off|log",
        default_value = "on",
        value_enum,
        env = "FABVM_SECCOMP"
    )]
    pub mode: crate::seccomp::Mode,
}

/// Live page identities (see `memory::identities`).
#[derive(Debug, Clone, Args)]
pub struct IdentityArgs {
    /// Keep every page's identity current in the background (`off`: only when a snapshot or
    /// migration needs them, which then hash what changed on the spot).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off,
          action = clap::ArgAction::Set)]
    pub identities: bool,
    /// CPU budget of the background identity thread, in percent of one core.
    #[arg(long, value_name = "PERCENT", default_value_t = 10.0,
          value_parser = parse_percent)]
    pub identity_budget: f64,
    /// How often the dirty log is harvested for the identities, in ms (10 to 60000).
    #[arg(long, value_name = "MS", default_value_t = 250,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub identity_period: u64,
}

impl IdentityArgs {
    /// The configuration these options ask for.
    pub fn config(&self) -> crate::memory::identities::IdentityConfig {
        crate::memory::identities::IdentityConfig {
            background: self.identities,
            budget_percent: self.identity_budget,
            period: std::time::Duration::from_millis(self.identity_period),
        }
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("'{s}': expected on or off")),
    }
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim_end_matches('%').parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 100.0 => Ok(p),
        _ => Err(format!(
            "'{s}': expected a percentage above 0 and at most 100"
        )),
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Control a running VM through its API socket.
    Ctl(CtlArgs),
    /// Inspect or maintain a host page store.
    Store(StoreArgs),
    /// Be the destination of a live migration: wait for one VM, then run it.
    Receive(ReceiveArgs),
    /// Figures about every VM running on this host (page sharing), or serve this host to the
    /// cluster (`host serve`).
    Host(HostArgs),
    /// The cluster registry on etcd: live hosts, and where a VM would best go.
    Cluster(ClusterArgs),
    /// Run a VM (or `receive`) as an unprivileged user in namespaces and a chroot of its own
    /// holding only its files (as root; see docs/jail.md).
    Jail(JailArgs),
}

/// `fabvm jail`.
#[derive(Debug, Args)]
pub struct JailArgs {
    /// The jail's name (letters, digits, '-', '_'); its root is CHROOT_BASE/fabvm/ID/root
    /// [default: jail-PID].
    #[arg(long)]
    pub id: Option<String>,
    /// User the VMM runs as (not 0).
    #[arg(long, value_name = "UID")]
    pub uid: u32,
    /// Group the VMM runs as (not 0).
    #[arg(long, value_name = "GID")]
    pub gid: u32,
    /// Directory the jail's root is made under (absolute, existing).
    #[arg(long, value_name = "DIR")]
    pub chroot_base: PathBuf,
    /// Run in this network namespace (a name from `ip netns`, or a path) instead of a new,
    /// empty one (loopback only).
    #[arg(long, value_name = "NAME|PATH")]
    pub netns: Option<String>,
    /// Also make PATH available inside, writable (or read-only with `:ro`): e.g. where
    /// snapshots go or a migration key `ctl migrate` names (repeatable).
    #[arg(long = "bind", value_name = "PATH[:ro]")]
    pub binds: Vec<String>,
    /// The fabvm command to jail, after `--`: a VM (`--kernel` or `--restore`) or `receive`.
    #[arg(last = true, required = true, value_name = "FABVM ARGS")]
    pub command: Vec<std::ffi::OsString>,
}

/// `fabvm host`.
#[derive(Debug, Args)]
pub struct HostArgs {
    /// Print the report as one line of JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub op: HostOp,
}

/// Operations of `fabvm host`.
#[derive(Debug, Clone, Subcommand)]
pub enum HostOp {
    /// Hash every running VM's memory now: pages identical to another VM's (potential),
    /// pages KSM has merged, zero pages, per VM and in total.
    Stats,
    /// The same figures (and the host store's, with --store) as a Prometheus text page.
    Metrics {
        /// Host page store to report on [default: as for `fabvm --store`].
        #[arg(long, value_name = "DIR")]
        store: Option<PathBuf>,
    },
    /// The host agent: register this host in the cluster registry under a lease, publish a
    /// summary of the pages it holds, and serve those pages to other hosts (see
    /// docs/cluster.md). Runs until killed; its entries vanish within the lease's TTL.
    Serve(ServeArgs),
}

/// `fabvm host serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// This host's name in the cluster (letters, digits, '.', '-', '_').
    #[arg(long)]
    pub name: String,
    /// Address the page service listens on (and other hosts reach it at), e.g. 10.0.0.1:7100.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// Pre-shared key file of the page service (the migration key scheme).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// etcd endpoints, comma-separated URLs (e.g. http://127.0.0.1:2379).
    #[arg(long, value_name = "URL")]
    pub etcd: String,
    /// Host page store whose pages are summarised and served (opened only briefly, so
    /// snapshots and migrations can use it meanwhile).
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Lease TTL in seconds: how long a dead agent's entries outlive it.
    #[arg(long, value_name = "SECONDS", default_value_t = 5)]
    pub ttl: u64,
    /// Seconds between summary refreshes.
    #[arg(long, value_name = "SECONDS", default_value_t = 2)]
    pub refresh: u64,
    /// Least seconds between publications of a summary that only gained pages (guests
    /// writing); one whose VMs or store changed is published at the next refresh. Every
    /// publication stays in etcd's history until compacted (see docs/cluster.md).
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    pub publish_every: u64,
    /// Largest page summary, e.g. 4M (K/M suffixes; past this the false-positive rate grows).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "4M")]
    pub summary_max: u64,
}

/// `fabvm cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// etcd endpoints, comma-separated URLs (e.g. http://127.0.0.1:2379).
    #[arg(long, value_name = "URL", global = true)]
    pub etcd: Option<String>,
    /// Print the result as one line of JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// The agents' pre-shared key file (the page service's; `drain` and `pack` need it).
    #[arg(long, value_name = "FILE", global = true)]
    pub key: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub op: ClusterOp,
}

/// How `drain` chooses each VM's destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlacementArg {
    /// The best-ranked host, as `place` ranks (pages held, then memory and CPU).
    Overlap,
    /// A random host with room (for comparison).
    Random,
}

/// Options of a migration started by `drain` or `pack`.
#[derive(Debug, Clone, Args)]
pub struct MoveArgs {
    /// Plan and print, move nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Downtime budget of each migration, ms.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    pub downtime_ms: u64,
    /// Most pre-copy rounds of each migration.
    #[arg(long, value_name = "N", default_value_t = 30)]
    pub max_rounds: u32,
}

/// Operations of `fabvm cluster`.
#[derive(Debug, Clone, Subcommand)]
pub enum ClusterOp {
    /// Live hosts: address, memory available, CPUs, VMs, pages held, summary age.
    Hosts,
    /// Rank hosts for a VM by the share of its pages each holds, then free memory and CPU.
    Place {
        /// A snapshot directory (its manifest's pages).
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "api_sock",
            conflicts_with = "api_sock"
        )]
        snapshot: Option<PathBuf>,
        /// A VM running on this host (its published live identities).
        #[arg(long, value_name = "PATH")]
        api_sock: Option<PathBuf>,
        /// Memory the VM needs [default: its guest memory size].
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        mem: Option<u64>,
    },
    /// Live-migrate every VM off HOST (maintenance), each to its best place, one after the
    /// other; a VM whose migration fails stays on HOST (exit 1).
    Drain {
        /// The host to empty (its name in the registry).
        host: String,
        /// How destinations are chosen.
        #[arg(long, value_enum, default_value = "overlap")]
        placement: PlacementArg,
        /// Seed of `--placement random` [default: from the clock].
        #[arg(long, value_name = "N")]
        seed: Option<u64>,
        #[command(flatten)]
        moves: MoveArgs,
    },
    /// Consolidate VMs onto as few hosts as memory allows and say which hosts can be switched
    /// off (power saving).
    Pack {
        #[command(flatten)]
        moves: MoveArgs,
    },
}

/// `fabvm receive`.
#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Address to listen on, e.g. 0.0.0.0:7777 or [::]:7777.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// Pre-shared key file (hex or raw bytes, at least 16 bytes); the source uses the same.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Serve the API on this Unix socket once the VM runs here.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// Host page store to take pages from (pages of VMs running on this host are used too).
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Give up when no source has connected after this many seconds (0 = wait forever).
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub accept_timeout: u64,
    /// Print the migration report as one line of JSON on stderr when the VM starts here.
    #[arg(long)]
    pub json: bool,
    /// Post-copy: etcd endpoints of the cluster whose page service may hold the pages a
    /// source that fails after the switch did not send (the hosts registered when
    /// `receive` starts are asked).
    #[arg(long, value_name = "URL")]
    pub etcd: Option<String>,
    /// The page service's key file (with --etcd) [default: the --key file].
    #[arg(long, value_name = "FILE")]
    pub page_key: Option<PathBuf>,
    /// Hash every page copied from a VM running here, instead of confirming it by asking
    /// that VM for a harvest of its dirty log after the copy (slower; for debugging).
    #[arg(long)]
    pub hash_host_pages: bool,
    /// How the received VM's page identities are kept.
    #[command(flatten)]
    pub identities: IdentityArgs,
    /// seccomp filters.
    #[command(flatten)]
    pub seccomp: SeccompArgs,
}

/// `fabvm ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The VM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: PathBuf,
    /// Print the result as one line of JSON.
    #[arg(long)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub op: CtlOp,
}

/// Operations of `fabvm ctl`.
#[derive(Debug, Clone, Subcommand)]
pub enum CtlOp {
    /// Pause every vCPU.
    Pause,
    /// Resume the vCPUs.
    Resume,
    /// Run state, vCPUs, memory, uptime.
    Status,
    /// Figures about the VM and its memory.
    Stats,
    /// Snapshot the VM into DIR (pages go into the host store).
    Snapshot {
        /// Directory to create.
        dir: PathBuf,
    },
    /// Stop the VM (fabvm exits 0).
    Shutdown,
    /// Check the live page identities against a fresh hash of every page (pauses the VM
    /// meanwhile); mismatched_pages must be 0.
    Identities,
    /// Live-migrate the VM to `fabvm receive` at HOST:PORT; fabvm exits 0 once it runs there.
    Migrate {
        /// The destination.
        dest: String,
        /// Pre-shared key file, the same as the destination's.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Downtime budget: stop and copy once the rest fits in it at the measured bandwidth.
        #[arg(long, value_name = "MS", default_value_t = 100)]
        downtime_ms: u64,
        /// Most pre-copy rounds before stopping regardless.
        #[arg(long, value_name = "N", default_value_t = 30)]
        max_rounds: u32,
        /// Send pages without compression.
        #[arg(long)]
        no_compress: bool,
        /// Post-copy (hybrid): after the first pre-copy round, stop the guest, resume it at
        /// the destination at once and send the rest on demand (pages the guest touches
        /// first) and in the background. A source failure after the switch loses the VM.
        #[arg(long)]
        postcopy: bool,
        /// Post-copy after N pre-copy rounds (0: at once, no pre-copy); implies --postcopy.
        #[arg(long, value_name = "N")]
        postcopy_after: Option<u32>,
    },
}

/// `fabvm store`.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The store [default: as for --store above].
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// Print the report as one line of JSON.
    #[arg(long)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub op: StoreOp,
}

/// Operations of `fabvm store`.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum StoreOp {
    /// Pages, bytes on disk, snapshots (roots) and how much is shared.
    Stats,
    /// Re-hash every page and check the index.
    Verify,
    /// Reclaim pages no snapshot references.
    Gc,
}

/// Errors from parsing a size argument.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    /// Not a number with an optional suffix.
    #[error("'{0}' is not a size (use e.g. 512M, 2G)")]
    Malformed(String),
    /// Too large to represent.
    #[error("'{0}' is too large")]
    Overflow(String),
}

/// Parses `512M`, `2G`, `2GiB`, `4096K`, `1T`; a bare number means MiB (as with QEMU's `-m`).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let malformed = || SizeError::Malformed(text.to_string());
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(split);
    if digits.is_empty() {
        return Err(malformed());
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(text.to_string()))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 20,
        "k" | "kb" | "kib" => 10,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "b" => 0,
        _ => return Err(malformed()),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("4096k"), Ok(4 << 20));
        assert_eq!(parse_size("128"), Ok(128 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn bad_sizes() {
        for bad in ["abc", "", "M", "12Q", "-1G", "1.5G"] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_size("99999999999999999999G"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("17179869184G"),
            Err(SizeError::Overflow(_))
        ));
    }
}
