//! Untrusted snapshots: a restore reopens the disk images and taps its state file names, with
//! fabvm's rights, so each must be confirmed on the command line (`--disk`, `--net`).
//!
//! The confirmations must name exactly what the snapshot records: every disk path (both made
//! absolute as at boot, as the restore would open them) with the same access (`,ro` or not), and
//! every tap (a `mac=` given must be the snapshot's). A snapshot without disks or taps needs
//! nothing. Anything else is refused with one line naming what is missing or unknown, before
//! any file or tap is opened. Like Firecracker, which reopens the drives its snapshot names
//! and lets the loader override taps, the state file decides nothing on its own: the user
//! who restores does.

use std::path::{Path, PathBuf};

use devices::virtio::MacAddr;

use crate::virtio::spec::{DiskArg, NetArg};
use crate::virtio::VirtioDeviceState;

/// Errors from checking a snapshot's host resources against the command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfirmError {
    /// The snapshot reopens resources the command line does not name.
    #[error("snapshot {dir} reopens host resources that are not confirmed; add {missing}")]
    Unconfirmed { dir: PathBuf, missing: String },
    /// A `--disk` the snapshot does not have.
    #[error("--disk {given}: snapshot {dir} has no such disk ({has})")]
    NoSuchDisk {
        given: String,
        dir: PathBuf,
        has: String,
    },
    /// A `--net` the snapshot does not have.
    #[error("--net tap={given}: snapshot {dir} has no such tap ({has})")]
    NoSuchTap {
        given: String,
        dir: PathBuf,
        has: String,
    },
    /// A `--disk` with other access than the snapshot's.
    #[error("--disk {given}: snapshot {dir} opens it {access}; confirm it with --disk {wanted}")]
    Access {
        given: String,
        dir: PathBuf,
        access: &'static str,
        wanted: String,
    },
    /// A `--net` whose MAC differs from the snapshot's.
    #[error("--net tap={tap},mac={given}: snapshot {dir} gives that tap MAC {saved}")]
    Mac {
        tap: String,
        given: MacAddr,
        dir: PathBuf,
        saved: MacAddr,
    },
}

/// What the user confirmed on the command line for a restore.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Confirmed {
    /// `--disk PATH[,ro]` options.
    pub disks: Vec<DiskArg>,
    /// `--net tap=NAME[,mac=MAC]` options.
    pub nets: Vec<NetArg>,
}

impl Confirmed {
    /// The confirmations that name exactly what `devices` reopens (what a user would type).
    pub fn of(devices: &[VirtioDeviceState]) -> Self {
        let mut confirmed = Confirmed::default();
        for device in devices {
            match device {
                VirtioDeviceState::Block { path, state } => confirmed.disks.push(DiskArg {
                    path: path.clone(),
                    read_only: state.read_only,
                }),
                VirtioDeviceState::Net { tap, .. } => confirmed.nets.push(NetArg {
                    tap: tap.clone(),
                    mac: None,
                }),
                VirtioDeviceState::Rng { .. } => {}
            }
        }
        confirmed
    }

    /// Checks that these confirmations name exactly the disks and taps that `devices` (the
    /// state file of snapshot `dir`) reopens.
    pub fn check(&self, dir: &Path, devices: &[VirtioDeviceState]) -> Result<(), ConfirmError> {
        let saved = Confirmed::of(devices);
        let macs: Vec<(&str, MacAddr)> = devices
            .iter()
            .filter_map(|d| match d {
                VirtioDeviceState::Net { tap, state } => Some((tap.as_str(), state.mac)),
                _ => None,
            })
            .collect();
        for given in &self.disks {
            let path = absolute(&given.path);
            let Some(disk) = saved.disks.iter().find(|d| absolute(&d.path) == path) else {
                return Err(ConfirmError::NoSuchDisk {
                    given: disk_option(&given.path, given.read_only),
                    dir: dir.to_path_buf(),
                    has: listing("disks", saved.disks.iter().map(|d| d.path.display())),
                });
            };
            if disk.read_only != given.read_only {
                return Err(ConfirmError::Access {
                    given: disk_option(&given.path, given.read_only),
                    dir: dir.to_path_buf(),
                    access: if disk.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    },
                    wanted: disk_option(&disk.path, disk.read_only),
                });
            }
        }
        for given in &self.nets {
            let Some(&(_, saved_mac)) = macs.iter().find(|(tap, _)| *tap == given.tap) else {
                return Err(ConfirmError::NoSuchTap {
                    given: given.tap.clone(),
                    dir: dir.to_path_buf(),
                    has: listing("taps", macs.iter().map(|(tap, _)| tap)),
                });
            };
            if let Some(mac) = given.mac.filter(|m| *m != saved_mac) {
                return Err(ConfirmError::Mac {
                    tap: given.tap.clone(),
                    given: mac,
                    dir: dir.to_path_buf(),
                    saved: saved_mac,
                });
            }
        }
        let missing: Vec<String> = saved
            .disks
            .iter()
            .filter(|d| {
                let path = absolute(&d.path);
                !self.disks.iter().any(|g| absolute(&g.path) == path)
            })
            .map(|d| format!("--disk {}", disk_option(&d.path, d.read_only)))
            .chain(
                saved
                    .nets
                    .iter()
                    .filter(|n| !self.nets.iter().any(|g| g.tap == n.tap))
                    .map(|n| format!("--net tap={}", n.tap)),
            )
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(ConfirmError::Unconfirmed {
                dir: dir.to_path_buf(),
                missing: missing.join(" "),
            })
        }
    }
}

/// A path made absolute as boot does for `--disk` (lexically: symlinks are not followed).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `PATH[,ro]` as the user would type it (control characters escaped: one line).
fn disk_option(path: &Path, read_only: bool) -> String {
    let path = one_line(&path.display().to_string());
    if read_only {
        format!("{path},ro")
    } else {
        path
    }
}

/// "its disks: a, b" or "it has no disks", on one line.
fn listing<T: std::fmt::Display>(what: &str, items: impl Iterator<Item = T>) -> String {
    let items: Vec<String> = items.map(|i| one_line(&i.to_string())).collect();
    if items.is_empty() {
        format!("it has no {what}")
    } else {
        format!("its {what}: {}", items.join(", "))
    }
}

/// `text` with control characters escaped (`\n`, `\u{1b}`).
fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::virtio::{BlockState, NetState, RngState};

    fn block(read_only: bool) -> BlockState {
        BlockState {
            transport: Default::default(),
            capacity: 8,
            read_only,
            id: Default::default(),
        }
    }

    fn devices() -> Vec<VirtioDeviceState> {
        vec![
            VirtioDeviceState::Block {
                path: "/img/a.raw".into(),
                state: block(false),
            },
            VirtioDeviceState::Block {
                path: "/img/b.raw".into(),
                state: block(true),
            },
            VirtioDeviceState::Net {
                tap: "fab0".into(),
                state: NetState {
                    transport: Default::default(),
                    mac: MacAddr([2, 0, 0, 0, 0, 7]),
                    pending_rx: None,
                },
            },
            VirtioDeviceState::Rng {
                state: RngState {
                    transport: Default::default(),
                },
            },
        ]
    }

    fn given(disks: &[&str], nets: &[&str]) -> Confirmed {
        Confirmed {
            disks: disks
                .iter()
                .map(|d| crate::virtio::spec::parse_disk(d).unwrap())
                .collect(),
            nets: nets
                .iter()
                .map(|n| crate::virtio::spec::parse_net(n).unwrap())
                .collect(),
        }
    }

    const DIR: &str = "/snap";

    #[test]
    fn exactly_the_snapshots_resources_are_accepted() {
        let ok = given(&["/img/b.raw,ro", "/img/a.raw"], &["tap=fab0"]);
        assert_eq!(ok.check(Path::new(DIR), &devices()), Ok(()));
        let with_mac = given(
            &["/img/a.raw", "/img/b.raw,ro"],
            &["tap=fab0,mac=02:00:00:00:00:07"],
        );
        assert_eq!(with_mac.check(Path::new(DIR), &devices()), Ok(()));
        assert_eq!(
            Confirmed::of(&devices()).check(Path::new(DIR), &devices()),
            Ok(())
        );
        // Nothing to confirm, nothing needed.
        let rng_only = &devices()[3..];
        assert_eq!(Confirmed::default().check(Path::new(DIR), rng_only), Ok(()));
    }

    #[test]
    fn missing_confirmations_are_named_in_one_line() {
        let err = given(&["/img/a.raw"], &[])
            .check(Path::new(DIR), &devices())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "snapshot /snap reopens host resources that are not confirmed; \
             add --disk /img/b.raw,ro --net tap=fab0"
        );
        let err = Confirmed::default()
            .check(Path::new(DIR), &devices())
            .unwrap_err();
        assert!(
            err.to_string()
                .ends_with("add --disk /img/a.raw --disk /img/b.raw,ro --net tap=fab0"),
            "{err}"
        );
    }

    #[test]
    fn other_resources_access_or_mac_are_refused() {
        let all = |disks: &[&str], nets: &[&str]| {
            given(disks, nets)
                .check(Path::new(DIR), &devices())
                .unwrap_err()
        };
        assert!(matches!(
            all(&["/img/a.raw", "/img/b.raw,ro", "/etc/shadow"], &["tap=fab0"]),
            ConfirmError::NoSuchDisk { given, .. } if given == "/etc/shadow"
        ));
        assert!(matches!(
            all(&["/img/a.raw,ro", "/img/b.raw,ro"], &["tap=fab0"]),
            ConfirmError::Access { access: "read-write", wanted, .. } if wanted == "/img/a.raw"
        ));
        assert!(matches!(
            all(&["/img/a.raw", "/img/b.raw"], &["tap=fab0"]),
            ConfirmError::Access {
                access: "read-only",
                ..
            }
        ));
        assert!(matches!(
            all(&["/img/a.raw", "/img/b.raw,ro"], &["tap=fab1"]),
            ConfirmError::NoSuchTap { given, .. } if given == "fab1"
        ));
        assert!(matches!(
            all(
                &["/img/a.raw", "/img/b.raw,ro"],
                &["tap=fab0,mac=02:00:00:00:00:08"]
            ),
            ConfirmError::Mac { .. }
        ));
        let none = given(&["/img/a.raw"], &[])
            .check(Path::new(DIR), &devices()[3..])
            .unwrap_err();
        assert_eq!(
            none.to_string(),
            "--disk /img/a.raw: snapshot /snap has no such disk (it has no disks)"
        );
    }

    #[test]
    fn relative_confirmations_are_made_absolute_as_at_boot() {
        let cwd = std::env::current_dir().unwrap();
        let saved = vec![VirtioDeviceState::Block {
            path: cwd.join("d.raw"),
            state: block(false),
        }];
        assert_eq!(given(&["d.raw"], &[]).check(Path::new(DIR), &saved), Ok(()));
    }

    #[test]
    fn paths_with_control_characters_stay_on_one_line() {
        let saved = vec![VirtioDeviceState::Block {
            path: "/img/a\nb.raw".into(),
            state: block(false),
        }];
        let err = Confirmed::default()
            .check(Path::new(DIR), &saved)
            .unwrap_err();
        assert!(!err.to_string().contains('\n'), "{err}");
    }
}
