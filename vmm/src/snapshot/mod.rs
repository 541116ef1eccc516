//! Whole-VM snapshots on the memory fabric: the state file (vCPUs, VM, devices) plus a
//! manifest of page identities, with the pages themselves in the host store, each distinct
//! page once across every snapshot that holds it.
//!
//! A snapshot directory holds `state` (see [`format`]) and `memory.manifest` (the fabric
//! manifest format). The store holds one root per snapshot, named in the state file, which
//! keeps the snapshot's pages alive through `fabvm store gc`.

pub mod confirm;
pub mod format;
pub mod image;
pub mod lazy;
pub mod restore;
pub mod save;
pub mod staging;
pub mod uffd;

use std::path::Path;
use std::time::{Duration, Instant};

use fabric::{Store, StoreError};

/// The state file's name inside a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The manifest's name inside a snapshot directory.
pub const MANIFEST_FILE: &str = "memory.manifest";
/// How long to wait for another fabvm to release the store.
pub const STORE_WAIT: Duration = Duration::from_secs(60);

/// Opens the store, waiting while another process holds it.
pub fn open_store(dir: &Path) -> Result<Store, StoreError> {
    let deadline = Instant::now() + STORE_WAIT;
    loop {
        match Store::open(dir) {
            Err(StoreError::Busy(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}
