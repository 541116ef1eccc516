//! What a jail holds: the files a fabvm command names (kernel, initrd, disks, snapshot, store,
//! key, the API socket's directory) and the ones given with `--bind`, each bound at the same
//! path inside as outside, so the command and the paths sent over the API need no rewriting.
//! A pure function of the command line, tested without privileges.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::Parser;

use super::JailError;
use crate::cli::{Cli, Command};

/// One path made visible inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The path, the same outside and inside.
    pub path: PathBuf,
    /// Whether the jailed VMM may write to it.
    pub writable: bool,
    /// Created (a directory owned by the jail's user) when missing.
    pub create: bool,
}

/// Everything the jail makes available to one fabvm command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Paths to bind, parents before children.
    pub binds: Vec<Bind>,
    /// Whether the command may open taps (`/dev/net/tun` goes in).
    pub tun: bool,
}

/// The plan for `command` (fabvm's arguments, without the program name) plus the `--bind`
/// values `extra` (`PATH` or `PATH:ro`).
pub fn plan(command: &[OsString], extra: &[String]) -> Result<Plan, JailError> {
    let argv = std::iter::once(OsString::from("fabvm")).chain(command.iter().cloned());
    let cli = Cli::try_parse_from(argv).map_err(|e| {
        let rendered = e.render().to_string();
        let first = rendered
            .lines()
            .next()
            .unwrap_or("invalid arguments")
            .to_string();
        JailError::Command(first.trim_start_matches("error: ").to_string())
    })?;
    let mut binds = Vec::new();
    let ro = |path: &Path| Bind {
        path: path.to_path_buf(),
        writable: false,
        create: false,
    };
    let rw = |path: &Path| Bind {
        path: path.to_path_buf(),
        writable: true,
        create: false,
    };
    let store = |path: &Path| Bind {
        path: path.to_path_buf(),
        writable: true,
        create: true,
    };
    let api_dir = |sock: &Path| -> Result<Bind, JailError> {
        let dir = sock
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .ok_or_else(|| JailError::Command("--api-sock needs a directory".into()))?;
        Ok(rw(dir))
    };
    let tun = match cli.command {
        None => {
            let run = cli.run;
            binds.extend(run.kernel.as_deref().map(ro));
            binds.extend(run.initrd.as_deref().map(ro));
            binds.extend(run.restore.as_deref().map(ro));
            for disk in &run.disks {
                binds.push(if disk.read_only {
                    ro(&disk.path)
                } else {
                    rw(&disk.path)
                });
            }
            if run.share.is_some() {
                return Err(JailError::Command(
                    "--share needs the host's KSM settings and other VMs: not in a jail".into(),
                ));
            }
            if let Some(sock) = &run.api_sock {
                binds.push(api_dir(sock)?);
            }
            binds.extend(run.store.as_deref().map(store));
            // A snapshot may name taps too.
            !run.nets.is_empty() || run.restore.is_some()
        }
        Some(Command::Receive(receive)) => {
            binds.push(ro(&receive.key));
            if let Some(sock) = &receive.api_sock {
                binds.push(api_dir(sock)?);
            }
            binds.extend(receive.store.as_deref().map(store));
            true
        }
        Some(_) => {
            return Err(JailError::Command(
                "only a VM (--kernel or --restore) or `receive` runs in a jail".into(),
            ))
        }
    };
    for value in extra {
        let (path, writable) = match value.strip_suffix(":ro") {
            Some(path) => (path, false),
            None => (value.as_str(), true),
        };
        binds.push(Bind {
            path: PathBuf::from(path),
            writable,
            create: false,
        });
    }
    for bind in &mut binds {
        bind.path = std::path::absolute(&bind.path)
            .map_err(|e| JailError::Path(bind.path.clone(), e.to_string()))?;
        if bind.path.starts_with("/proc") || bind.path.starts_with("/dev") {
            return Err(JailError::Path(
                bind.path.clone(),
                "the jail has its own /proc and /dev".into(),
            ));
        }
    }
    // Parents first, so a child's mount is not hidden by its parent's; a path named twice
    // is bound once, writable if either asks.
    binds.sort_by(|a, b| a.path.cmp(&b.path));
    binds.dedup_by(|later, kept| {
        let same = later.path == kept.path;
        if same {
            kept.writable |= later.writable;
            kept.create |= later.create;
        }
        same
    });
    Ok(Plan { binds, tun })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn find<'a>(plan: &'a Plan, path: &str) -> Option<&'a Bind> {
        plan.binds.iter().find(|b| b.path == Path::new(path))
    }

    #[test]
    fn a_boot_binds_its_files_with_the_right_rights() {
        let plan = plan(
            &args(&[
                "--kernel",
                "/k/vmlinux",
                "--initrd",
                "/k/initrd",
                "--disk",
                "/d/root.raw,ro",
                "--disk",
                "/d/data.raw",
                "--api-sock",
                "/run/vm1/api.sock",
                "--store",
                "/var/store",
            ]),
            &["/snaps".into(), "/keys/k:ro".into()],
        )
        .unwrap();
        assert!(!find(&plan, "/k/vmlinux").unwrap().writable);
        assert!(!find(&plan, "/k/initrd").unwrap().writable);
        assert!(!find(&plan, "/d/root.raw").unwrap().writable);
        assert!(find(&plan, "/d/data.raw").unwrap().writable);
        assert!(find(&plan, "/run/vm1").unwrap().writable);
        assert!(find(&plan, "/var/store").unwrap().create);
        assert!(find(&plan, "/snaps").unwrap().writable);
        assert!(!find(&plan, "/keys/k").unwrap().writable);
        assert!(!plan.tun);
        assert_eq!(plan.binds.len(), 8);
        let paths: Vec<_> = plan.binds.iter().map(|b| b.path.clone()).collect();
        let mut sorted = paths.clone();
        sorted.sort();
        assert_eq!(paths, sorted);
    }

    #[test]
    fn receive_binds_its_key_and_may_open_taps() {
        let plan = plan(
            &args(&["receive", "--listen", "0.0.0.0:1", "--key", "/k/key"]),
            &[],
        )
        .unwrap();
        assert_eq!(plan.binds.len(), 1);
        assert!(!plan.binds[0].writable);
        assert!(plan.tun);
    }

    #[test]
    fn what_cannot_run_in_a_jail_is_refused() {
        for bad in [
            args(&["ctl", "--api-sock", "/a", "status"]),
            args(&["store", "stats"]),
            args(&["--kernel", "/k", "--share"]),
            args(&["--kernel", "/k", "--api-sock", "sock"]),
            args(&["--mem", "1G"]),
        ] {
            assert!(plan(&bad, &[]).is_err(), "{bad:?}");
        }
        let proc = plan(&args(&["--kernel", "/k"]), &["/proc/1".into()]);
        assert!(matches!(proc, Err(JailError::Path(..))));
    }
}
