//! A validated VM configuration: everything checked against the host before KVM is touched,
//! so bad input ends with one clear line instead of a half-built VM.

use std::fs::File;
use std::path::{Path, PathBuf};

use devices::virtio::MacAddr;

use crate::cli::RunArgs;
use crate::layout;
use crate::snapshot::confirm::Confirmed;
use crate::virtio::spec::{DiskArg, NetArg};
use crate::virtio::{self, DeviceSpec};

/// Command line used when the user gives none.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Guest memory when the user gives no --mem.
pub const DEFAULT_MEM: u64 = 512 << 20;

/// Most vCPUs we start: APIC ids are 8 bits in the MP table and one id goes to the IOAPIC.
pub const MAX_CPUS: u32 = 254;

/// Errors from validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file argument cannot be opened.
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file argument is a directory or otherwise not a regular file.
    #[error("{what} {path} is not a regular file")]
    NotAFile { what: &'static str, path: PathBuf },
    /// Memory size outside what we can boot.
    #[error("--mem {0}: must be at least 16M")]
    MemTooSmall(String),
    /// Memory size not page aligned.
    #[error("--mem {0}: must be a multiple of 4K")]
    MemUnaligned(String),
    /// Memory size beyond the host.
    #[error("--mem {asked}: more than this host's memory ({host})")]
    MemBeyondHost { asked: String, host: String },
    /// vCPU count outside 1..=max.
    #[error("--cpus {asked}: must be between 1 and {max}")]
    Cpus { asked: u32, max: u32 },
    /// Command line too long for the boot protocol.
    #[error("--cmdline is {0} bytes; the limit is 2047")]
    CmdlineTooLong(usize),
    /// Neither a kernel nor a snapshot.
    #[error("give --kernel PATH or --restore SNAPSHOT")]
    NoKernel,
    /// --restore names something that is not a directory.
    #[error("--restore {0}: not a snapshot directory")]
    NotASnapshot(PathBuf),
    /// Command line with a NUL byte.
    #[error("--cmdline must not contain NUL bytes")]
    CmdlineNul,
    /// More virtio devices than there are slots.
    #[error("{0} virtio devices (--disk, --net, --rng): at most {max} fit", max = layout::VIRTIO_MMIO_MAX_DEVICES)]
    TooManyDevices(usize),
    /// The same tap given twice.
    #[error("--net tap={0} is given twice")]
    DuplicateTap(String),
    /// The command line with the virtio_mmio.device= entries is too long.
    #[error("--cmdline with the virtio_mmio.device= entries is {0} bytes; the limit is 2047")]
    CmdlineWithDevicesTooLong(usize),
}

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Kernel image path.
    pub kernel: PathBuf,
    /// Initrd path.
    pub initrd: Option<PathBuf>,
    /// Guest memory in bytes.
    pub mem: u64,
    /// vCPU count.
    pub cpus: u32,
    /// Kernel command line.
    pub cmdline: String,
    /// Back memory with transparent huge pages.
    pub hugepages: bool,
    /// virtio devices, in slot order (disks, nets, rng).
    pub devices: Vec<DeviceSpec>,
}

/// What the fabvm process runs, and the services around it.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Boot a kernel, or restore a snapshot.
    pub source: Source,
    /// API socket path.
    pub api_sock: Option<PathBuf>,
    /// Host page store directory given with --store (else the default, or a snapshot's own).
    pub store: Option<PathBuf>,
    /// Page sharing with other VMs (--share).
    pub share: Option<crate::sharing::ShareMode>,
    /// How live page identities are kept.
    pub identities: crate::memory::identities::IdentityConfig,
}

/// Where the VM comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A fresh boot.
    Boot(VmConfig),
    /// A snapshot directory; `lazy` fetches pages on first touch.
    Restore {
        /// The snapshot directory.
        dir: PathBuf,
        /// Lazy (userfaultfd) rather than eager (memory image) restore.
        lazy: bool,
        /// The disks and taps the user lets the snapshot reopen (`--disk`, `--net`).
        confirmed: Confirmed,
        /// Where to fetch the pages the store lacks (`--etcd`, `--key`, `--json`).
        pull: crate::cluster::pull::PullConfig,
    },
}

impl Launch {
    /// Validates the run options against the host: files readable, sizes sane.
    pub fn from_args(args: RunArgs) -> Result<Self, ConfigError> {
        let source = match (args.kernel, args.restore) {
            (_, Some(dir)) => {
                if !dir.is_dir() {
                    return Err(ConfigError::NotASnapshot(dir));
                }
                Source::Restore {
                    dir,
                    lazy: args.lazy,
                    confirmed: Confirmed {
                        disks: args.disks,
                        nets: args.nets,
                    },
                    pull: crate::cluster::pull::PullConfig {
                        etcd: args.etcd,
                        key: args.key,
                        json: args.json,
                    },
                }
            }
            (Some(kernel), None) => Source::Boot(
                VmConfig::new(
                    kernel,
                    args.initrd,
                    args.mem.unwrap_or(DEFAULT_MEM),
                    args.cpus.unwrap_or(1),
                    args.cmdline.unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
                )?
                .with_hugepages(!args.no_hugepages && args.share.is_none())
                .with_devices(devices_from_args(
                    &args.disks,
                    &args.nets,
                    args.rng,
                ))?,
            ),
            (None, None) => return Err(ConfigError::NoKernel),
        };
        Ok(Self {
            source,
            api_sock: args.api_sock,
            store: args.store,
            share: args.share,
            identities: args.identities.config(),
        })
    }
}

impl Launch {
    /// The store snapshots of this VM go to: --store, else the default.
    pub fn store_dir(&self) -> PathBuf {
        self.store.clone().unwrap_or_else(fabric::default_dir)
    }
}

impl VmConfig {
    /// Validates a boot configuration.
    pub fn new(
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        mem: u64,
        cpus: u32,
        cmdline: String,
    ) -> Result<Self, ConfigError> {
        check_file("kernel", &kernel)?;
        if let Some(initrd) = &initrd {
            check_file("initrd", initrd)?;
        }
        check_mem(mem, host_memory())?;
        if cpus == 0 || cpus > MAX_CPUS {
            return Err(ConfigError::Cpus {
                asked: cpus,
                max: MAX_CPUS,
            });
        }
        if cmdline.len() >= layout::CMDLINE_MAX {
            return Err(ConfigError::CmdlineTooLong(cmdline.len()));
        }
        if cmdline.contains('\0') {
            return Err(ConfigError::CmdlineNul);
        }
        Ok(Self {
            kernel,
            initrd,
            mem,
            cpus,
            cmdline,
            hugepages: true,
            devices: Vec::new(),
        })
    }

    /// Chooses whether guest memory uses transparent huge pages.
    pub fn with_hugepages(self, hugepages: bool) -> Self {
        Self { hugepages, ..self }
    }

    /// Adds virtio devices: disk images must be openable (read-write unless read-only), taps
    /// are opened when the device is built; the command line must still fit with the
    /// `virtio_mmio.device=` entries.
    pub fn with_devices(self, devices: Vec<DeviceSpec>) -> Result<Self, ConfigError> {
        if devices.len() > layout::VIRTIO_MMIO_MAX_DEVICES {
            return Err(ConfigError::TooManyDevices(devices.len()));
        }
        let mut taps = std::collections::HashSet::new();
        for device in &devices {
            match device {
                DeviceSpec::Block { path, read_only } => check_disk(path, *read_only)?,
                DeviceSpec::Net { tap, .. } if !taps.insert(tap.as_str()) => {
                    return Err(ConfigError::DuplicateTap(tap.clone()))
                }
                DeviceSpec::Net { .. } | DeviceSpec::Rng => {}
            }
        }
        let full = virtio::cmdline_with_devices(&self.cmdline, devices.len());
        if full.len() >= layout::CMDLINE_MAX {
            return Err(ConfigError::CmdlineWithDevicesTooLong(full.len()));
        }
        Ok(Self { devices, ..self })
    }

    /// The command line the guest gets: the user's plus the `virtio_mmio.device=` entries.
    pub fn guest_cmdline(&self) -> String {
        virtio::cmdline_with_devices(&self.cmdline, self.devices.len())
    }
}

/// The devices the command line asks for, in slot order: disks, nets, then the rng. Disk paths
/// are made absolute (snapshots record them); a net without a MAC gets a random locally
/// administered one.
pub fn devices_from_args(disks: &[DiskArg], nets: &[NetArg], rng: bool) -> Vec<DeviceSpec> {
    let disks = disks.iter().map(|d| DeviceSpec::Block {
        path: std::path::absolute(&d.path).unwrap_or_else(|_| d.path.clone()),
        read_only: d.read_only,
    });
    let nets = nets.iter().map(|n| DeviceSpec::Net {
        tap: n.tap.clone(),
        mac: n.mac.unwrap_or_else(MacAddr::random_local),
    });
    disks
        .chain(nets)
        .chain(rng.then_some(DeviceSpec::Rng))
        .collect()
}

/// A disk image: a regular file or block device we may open as asked.
fn check_disk(path: &Path, read_only: bool) -> Result<(), ConfigError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(|source| ConfigError::Open {
            what: "disk image",
            path: path.to_path_buf(),
            source,
        })?;
    let kind = file.metadata().map(|m| m.file_type());
    let usable = kind.is_ok_and(|k| {
        use std::os::unix::fs::FileTypeExt;
        k.is_file() || k.is_block_device()
    });
    if !usable {
        return Err(ConfigError::NotAFile {
            what: "disk image",
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

fn check_file(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let file = File::open(path).map_err(|source| ConfigError::Open {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let is_file = file.metadata().map(|m| m.is_file()).unwrap_or(false);
    if !is_file {
        return Err(ConfigError::NotAFile {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Checks a memory size against our limits and the host's total memory (if known).
pub fn check_mem(mem: u64, host: Option<u64>) -> Result<(), ConfigError> {
    if mem < layout::MIN_MEM {
        return Err(ConfigError::MemTooSmall(human(mem)));
    }
    if !mem.is_multiple_of(layout::PAGE_SIZE) {
        return Err(ConfigError::MemUnaligned(human(mem)));
    }
    let limit = host.unwrap_or(layout::MAX_MEM).min(layout::MAX_MEM);
    if mem > limit {
        return Err(ConfigError::MemBeyondHost {
            asked: human(mem),
            host: human(limit),
        });
    }
    Ok(())
}

/// The host's total memory from /proc/meminfo.
pub fn host_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Renders a byte count the way users type it: whole units where exact, else one decimal.
pub fn human(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    match UNITS.iter().find(|(size, _)| bytes >= *size) {
        Some((size, unit)) if bytes.is_multiple_of(*size) => format!("{}{unit}", bytes / size),
        Some((size, unit)) => format!("{:.1}{unit}", bytes as f64 / *size as f64),
        None => format!("{bytes}B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_limits() {
        assert!(matches!(
            check_mem(0, None),
            Err(ConfigError::MemTooSmall(_))
        ));
        assert!(matches!(
            check_mem(1 << 20, None),
            Err(ConfigError::MemTooSmall(_))
        ));
        assert!(matches!(
            check_mem((64 << 20) + 1, None),
            Err(ConfigError::MemUnaligned(_))
        ));
        assert!(check_mem(256 << 20, Some(1 << 30)).is_ok());
        let err = check_mem(2 << 30, Some(1 << 30)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--mem 2G: more than this host's memory (1G)"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0B");
        assert_eq!(human(512 << 20), "512M");
        assert_eq!(human(3 << 30), "3G");
        assert_eq!(human(25_000_000_000), "23.3G");
        assert_eq!(human(24_682_416 * 1024), "23.5G");
        assert_eq!(human(1536), "1.5K");
    }
}
