//! Live migration, the VMM's half: the source drives pre-copy rounds from the dirty log and
//! stops and copies when the rest fits the downtime budget; the destination installs pages
//! (taking those this host holds from its store and from VMs running here) and resumes the
//! guest. The wire protocol and its guarantees are in `fabric::migration`.
//!
//! ```text
//!  source fabvm (ctl migrate)                      destination (fabvm receive)
//!  connect, authenticate, describe   ───────────►  allocate guest memory
//!  round 1: every page (hashed as it is offered)   take held pages, ask for the rest
//!  round n: pages dirtied since        ───────────►
//!  pause vCPUs; last dirty set + state ──────────►  restore vCPU, VM and device state
//!                                       ◄───────── Ready
//!  Commit                              ──────────►  start vCPUs
//!                                       ◄───────── Ack   (then: the VM runs here)
//!  exit 0                    any error before Ack: resume the guest on the source
//! ```
//!
//! Post-copy (`--postcopy`, [`postcopy`] and [`postcopy_dest`]): after the rounds asked for
//! the source stops the guest, lists the pages the destination lacks and sends the state; the
//! destination resumes the guest with those pages on userfaultfd and takes each on first
//! touch or from the source's background stream; the source exits once all are in.

pub mod destination;
pub mod guest;
pub mod postcopy;
pub mod postcopy_dest;
pub mod source;

use std::path::Path;

use fabric::migration::{KeyError, MigrationKey};

/// Errors from reading a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file cannot be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The contents are not a usable key.
    #[error("key file {path}: {source}")]
    Key { path: String, source: KeyError },
}

/// Reads a pre-shared key file.
pub fn read_key(path: &Path) -> Result<MigrationKey, KeyFileError> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| KeyFileError::Read {
        path: name.clone(),
        source,
    })?;
    MigrationKey::from_file_contents(&bytes)
        .map_err(|source| KeyFileError::Key { path: name, source })
}
