//! A snapshot directory is written whole or not at all: its files go to a hidden staging
//! directory beside it (`.NAME.partial-PID`), which is renamed to the snapshot's name once
//! every file is written and synced. A process killed while saving leaves the target absent
//! (or as empty as it was) and at most a staging directory, which the next save beside it
//! removes once its process is gone.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors of staging a snapshot directory.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// The target is unusable.
    #[error("snapshot directory {path}: {reason}")]
    Target { path: PathBuf, reason: String },
    /// A file or directory could not be written.
    #[error("snapshot directory {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The staging directory of one save; removed when dropped unpublished.
#[derive(Debug)]
pub struct Staging {
    target: PathBuf,
    path: PathBuf,
    published: bool,
}

impl Staging {
    /// Checks that `target` is absent or an empty directory and creates its staging
    /// directory (removing those of saves whose process is gone).
    pub fn new(target: &Path) -> Result<Self, StagingError> {
        let bad = |reason: &str| StagingError::Target {
            path: target.to_path_buf(),
            reason: reason.to_string(),
        };
        match fs::read_dir(target) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(bad("exists and is not empty"));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(bad(&e.to_string())),
        }
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| bad("has no usable name"))?;
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| bad(&e.to_string()))?;
        remove_abandoned(&parent, name);
        let path = parent.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).map_err(|source| StagingError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(Staging {
            target: target.to_path_buf(),
            path,
            published: false,
        })
    }

    /// Writes file `name` of the snapshot, synced.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), StagingError> {
        let path = self.path.join(name);
        let err = |source| StagingError::Write {
            path: path.clone(),
            source,
        };
        let mut file = fs::File::create(&path).map_err(err)?;
        file.write_all(bytes).map_err(err)?;
        file.sync_all().map_err(err)
    }

    /// Renames the staging directory to the target (which replaces an empty target
    /// directory) and syncs their parent.
    pub fn publish(mut self) -> Result<(), StagingError> {
        let err = |source| StagingError::Write {
            path: self.target.clone(),
            source,
        };
        fs::rename(&self.path, &self.target).map_err(err)?;
        self.published = true;
        if let Some(parent) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::File::open(parent)
                .and_then(|d| d.sync_all())
                .map_err(err)?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes `.NAME.partial-PID` directories in `parent` whose process no longer runs.
fn remove_abandoned(parent: &Path, name: &str) {
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_appear_only_when_published() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("snap");
        let staging = Staging::new(&target).unwrap();
        staging.write("a", b"1").unwrap();
        assert!(!target.exists(), "nothing at the target before publishing");
        staging.publish().unwrap();
        assert_eq!(fs::read(target.join("a")).unwrap(), b"1");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no staging left"
        );
    }

    #[test]
    fn an_unpublished_save_leaves_nothing_and_an_empty_target_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("snap");
        fs::create_dir(&target).unwrap();
        {
            let staging = Staging::new(&target).unwrap();
            staging.write("a", b"1").unwrap();
        }
        assert_eq!(fs::read_dir(&target).unwrap().count(), 0);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        // An empty target is replaced when published.
        let staging = Staging::new(&target).unwrap();
        staging.write("b", b"2").unwrap();
        staging.publish().unwrap();
        assert_eq!(fs::read(target.join("b")).unwrap(), b"2");
    }

    #[test]
    fn a_non_empty_target_is_refused_and_dead_saves_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("snap");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("x"), b"").unwrap();
        let err = Staging::new(&target).unwrap_err().to_string();
        assert!(err.contains("not empty"), "{err}");
        // A staging directory of a process that is gone (pid beyond pid_max) is removed.
        let dead = dir.path().join(".other.partial-4294967295");
        fs::create_dir(&dead).unwrap();
        let _ = Staging::new(&dir.path().join("other")).unwrap();
        assert!(!dead.exists());
    }
}
