//! Before a restore: the snapshot's distinct non-zero pages missing from the local store are
//! fetched from the live hosts whose summaries claim them ([`cluster::pull`]) and put into
//! the store, so the restore then proceeds exactly as with a complete store. With no page
//! missing, nothing here needs the cluster (a restore works offline).

use std::path::{Path, PathBuf};

use cluster::pull::{plan, pull, PullReport};
use cluster::service::IO_TIMEOUT;
use cluster::{Bloom, HostRecord, PageClient};
use fabric::{PageId, StoreError};

#[cfg(feature = "etcd")]
use super::ETCD_TIMEOUT;
use crate::migration::{read_key, KeyFileError};
use crate::snapshot::open_store;
use crate::snapshot::restore::Loaded;

/// Where a restore may fetch the pages its store lacks (`--etcd`, `--key`).
#[derive(Debug, Clone, Default)]
pub struct PullConfig {
    /// etcd endpoints, comma-separated URLs.
    pub etcd: Option<String>,
    /// The page service's key file.
    pub key: Option<PathBuf>,
    /// Print the pull's report as one line of JSON on stderr (else an info log line).
    pub json: bool,
}

/// Errors of pulling a snapshot's missing pages (each one line).
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("page store {0}: {1}")]
    Store(PathBuf, #[source] StoreError),
    #[error(
        "snapshot {snapshot}: {missing} of its {total} pages are not in store {store} \
         (--etcd URL --key FILE fetch them from the cluster)"
    )]
    Offline {
        snapshot: PathBuf,
        store: PathBuf,
        missing: usize,
        total: usize,
    },
    #[error("snapshot {snapshot}: {missing} pages are not in store {store}, and {reason}")]
    Registry {
        snapshot: PathBuf,
        store: PathBuf,
        missing: usize,
        reason: String,
    },
    #[error("snapshot {snapshot}: {missing} pages are not in store {store}: {source}")]
    Key {
        snapshot: PathBuf,
        store: PathBuf,
        missing: usize,
        source: KeyFileError,
    },
    #[error(
        "snapshot {snapshot}: {missing} of its pages are held by no live host \
         ({fetched} of {wanted} missing from store {store} fetched)"
    )]
    Unavailable {
        snapshot: PathBuf,
        store: PathBuf,
        missing: u64,
        fetched: u64,
        wanted: u64,
    },
}

/// Makes sure `store_dir` holds every page of the snapshot `loaded` (read from `dir`),
/// fetching what it lacks from the cluster; returns the pull's report when pages were
/// fetched. On any error the restore must not go on (the pages fetched stay in the store,
/// unreferenced until the next `fabvm store gc`).
pub fn ensure_pages(
    dir: &Path,
    loaded: &Loaded,
    store_dir: &Path,
    config: &PullConfig,
) -> Result<Option<PullReport>, PullError> {
    let store_err = |e| PullError::Store(store_dir.to_path_buf(), e);
    let ids = loaded.manifest.distinct_ids();
    let mut store = open_store(store_dir).map_err(store_err)?;
    let missing: Vec<PageId> = store.missing(&ids);
    if missing.is_empty() {
        return Ok(None);
    }
    let (snapshot, store_path) = (dir.to_path_buf(), store_dir.to_path_buf());
    let (Some(etcd), Some(key)) = (&config.etcd, &config.key) else {
        return Err(PullError::Offline {
            snapshot,
            store: store_path,
            missing: missing.len(),
            total: ids.len(),
        });
    };
    let key = read_key(key).map_err(|source| PullError::Key {
        snapshot: snapshot.clone(),
        store: store_path.clone(),
        missing: missing.len(),
        source,
    })?;
    let hosts = live_hosts(etcd).map_err(|reason| PullError::Registry {
        snapshot: snapshot.clone(),
        store: store_path.clone(),
        missing: missing.len(),
        reason,
    })?;
    let plan = plan(&missing, &hosts);
    let connect = |addr: &str| PageClient::connect(addr, &key, IO_TIMEOUT);
    let report = pull(&missing, &plan, connect, |batch| {
        store.put_many(batch).map(|_| ())
    })
    .map_err(store_err)?;
    if report.missing > 0 {
        log_report(&report, config.json);
        return Err(PullError::Unavailable {
            snapshot,
            store: store_path,
            missing: report.missing,
            fetched: report.fetched,
            wanted: report.wanted,
        });
    }
    // The pulled pages stay through `store gc` as long as the snapshot's root does.
    let root = format!("pulled-{}", loaded.state.root);
    if !store.roots().iter().any(|r| r.name == root) {
        store.add_root(&root, &ids).map_err(store_err)?;
    }
    log_report(&report, config.json);
    Ok(Some(report))
}

/// Live hosts and their summaries (a summary that cannot be read counts as none).
#[cfg(feature = "etcd")]
pub(crate) fn live_hosts(etcd: &str) -> Result<Vec<(HostRecord, Option<Bloom>)>, String> {
    live_hosts_in(etcd).map_err(|e| e.to_string())
}

/// A build without the etcd client (the fuzz targets' build) has no registry to ask.
#[cfg(not(feature = "etcd"))]
pub(crate) fn live_hosts(etcd: &str) -> Result<Vec<(HostRecord, Option<Bloom>)>, String> {
    Err(format!(
        "this fabvm was built without etcd support (asked for {etcd})"
    ))
}

#[cfg(feature = "etcd")]
fn live_hosts_in(
    etcd: &str,
) -> Result<Vec<(HostRecord, Option<Bloom>)>, cluster::registry::RegistryError> {
    cluster::Registry::connect(etcd, ETCD_TIMEOUT)?.hosts_with_summaries()
}

fn log_report(report: &PullReport, json: bool) {
    let line = serde_json::json!({ "pull": report });
    if json {
        eprintln!("{line}");
    } else {
        log::info!("restore: pages pulled from the cluster: {line}");
    }
}
