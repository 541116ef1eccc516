//! The cluster registry on etcd. Keys (all written under the writing host's lease, so a dead
//! agent's entries vanish within its TTL):
//!
//! ```text
//! /fabvm/hosts/NAME                       HostRecord (JSON)
//! /fabvm/summaries/NAME/current           SummaryMeta (JSON): generation, chunks, bytes, blake3
//! /fabvm/summaries/NAME/GGGGGGGGGGGGGGGG/IIII   chunk IIII (≤ 1 MiB) of the summary of
//!                                         generation G (hex): etcd refuses requests over
//!                                         1.5 MiB by default
//! ```
//!
//! A summary is written chunks first, then `current`, then the previous generation's chunks
//! are deleted; a reader that loses the race finds a checksum or chunk mismatch and reports
//! no summary (a miss, never a wrong page). Every call has a deadline, so an unreachable etcd
//! is an error within it. The client runs on a current-thread tokio runtime this type owns;
//! nothing else in fabvm needs tokio.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, DeleteOptions, GetOptions, PutOptions};
use serde::{Deserialize, Serialize};

use crate::bloom::{Bloom, BloomError, DECODE_MAX_BYTES};
use crate::record::{check_name, HostRecord, RecordError};

/// Prefix of every key.
pub const PREFIX: &str = "/fabvm/";
/// Largest chunk of a summary in one value.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Errors talking to the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The runtime could not start.
    #[error("cannot start the etcd client's runtime")]
    Runtime(#[source] std::io::Error),
    /// No answer in time.
    #[error("etcd at {0} did not answer within {1:?}")]
    TimedOut(String, Duration),
    /// etcd answered with an error, or the connection failed (the error's innermost
    /// cause, one line).
    #[error("etcd at {0}: {1}")]
    Etcd(String, String),
    /// The lease is gone (expired while this host could not reach etcd).
    #[error("the host's lease expired")]
    LeaseExpired,
    /// A host record.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// A summary.
    #[error("summary of host {0}: {1}")]
    Summary(String, BloomError),
}

/// Where a host's current summary is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryMeta {
    pub generation: u64,
    pub chunks: u32,
    pub bytes: u64,
    /// blake3 of the whole encoded summary, hex.
    pub blake3: String,
}

/// A connection to the registry.
pub struct Registry {
    rt: tokio::runtime::Runtime,
    client: Client,
    endpoints: String,
    timeout: Duration,
    keeper: Option<(
        i64,
        etcd_client::LeaseKeeper,
        etcd_client::LeaseKeepAliveStream,
    )>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("endpoints", &self.endpoints)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// Connects to etcd at `endpoints` (comma-separated URLs) and checks it answers, all
    /// within `timeout`; every later call has the same deadline.
    pub fn connect(endpoints: &str, timeout: Duration) -> Result<Registry, RegistryError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(RegistryError::Runtime)?;
        let urls: Vec<String> = endpoints.split(',').map(|s| s.trim().to_string()).collect();
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        let name = endpoints.to_string();
        let client = in_time(&rt, &name, timeout, Client::connect(urls, Some(options)))?;
        let mut reg = Registry {
            rt,
            client,
            endpoints: name,
            timeout,
            keeper: None,
        };
        // Connecting is lazy: one read proves etcd is there.
        reg.call(|c| Box::pin(c.get(PREFIX, Some(GetOptions::new().with_count_only()))))?;
        Ok(reg)
    }

    /// A new lease of `ttl`; entries written under it vanish `ttl` after the last
    /// [`Registry::keep_alive`].
    pub fn grant(&mut self, ttl: Duration) -> Result<i64, RegistryError> {
        let secs = ttl.as_secs().max(1) as i64;
        let id = self.call(|c| Box::pin(c.lease_grant(secs, None)))?.id();
        self.keeper = None;
        Ok(id)
    }

    /// Renews `lease` once; [`RegistryError::LeaseExpired`] when etcd no longer has it.
    pub fn keep_alive(&mut self, lease: i64) -> Result<(), RegistryError> {
        if self.keeper.as_ref().is_none_or(|k| k.0 != lease) {
            let (keeper, stream) = self.call(|c| Box::pin(c.lease_keep_alive(lease)))?;
            self.keeper = Some((lease, keeper, stream));
        }
        let (_, keeper, stream) = self.keeper.as_mut().expect("set above");
        let round = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        let answer = in_time(&self.rt, &self.endpoints, self.timeout, round);
        match answer {
            Ok(Some(resp)) if resp.ttl() > 0 => Ok(()),
            Ok(_) => {
                self.keeper = None;
                Err(RegistryError::LeaseExpired)
            }
            Err(e) => {
                // The stream may be broken (etcd restarted): open a new one next time.
                self.keeper = None;
                Err(e)
            }
        }
    }

    /// Gives `lease` up: its entries vanish now (an agent's clean exit).
    pub fn revoke(&mut self, lease: i64) -> Result<(), RegistryError> {
        self.keeper = None;
        self.call(|c| Box::pin(c.lease_revoke(lease))).map(|_| ())
    }

    /// Writes `record` under `lease`.
    pub fn put_host(&mut self, record: &HostRecord, lease: i64) -> Result<(), RegistryError> {
        check_name(&record.name)?;
        let key = host_key(&record.name);
        let value = record.encode();
        let opts = PutOptions::new().with_lease(lease);
        self.call(|c| Box::pin(c.put(key.clone(), value.clone(), Some(opts.clone()))))
            .map(|_| ())
    }

    /// Publishes `summary` as host `name`'s generation `generation`, under `lease`.
    pub fn put_summary(
        &mut self,
        name: &str,
        generation: u64,
        summary: &[u8],
        lease: i64,
    ) -> Result<SummaryMeta, RegistryError> {
        check_name(name)?;
        let opts = PutOptions::new().with_lease(lease);
        let chunks = summary.chunks(CHUNK_BYTES).collect::<Vec<_>>();
        for (i, chunk) in chunks.iter().enumerate() {
            let key = format!("{}{i:04}", gen_prefix(name, generation));
            let value = chunk.to_vec();
            self.call(|c| Box::pin(c.put(key.clone(), value.clone(), Some(opts.clone()))))?;
        }
        let meta = SummaryMeta {
            generation,
            chunks: chunks.len() as u32,
            bytes: summary.len() as u64,
            blake3: blake3::hash(summary).to_hex().to_string(),
        };
        let old = self.summary_meta(name).ok().flatten();
        let key = format!("{PREFIX}summaries/{name}/current");
        let value = serde_json::to_vec(&meta).expect("serializes");
        self.call(|c| Box::pin(c.put(key.clone(), value.clone(), Some(opts.clone()))))?;
        if let Some(old) = old.filter(|o| o.generation != generation) {
            let prefix = gen_prefix(name, old.generation);
            self.call(|c| {
                Box::pin(c.delete(prefix.clone(), Some(DeleteOptions::new().with_prefix())))
            })?;
        }
        Ok(meta)
    }

    /// Every live host, by name.
    pub fn hosts(&mut self) -> Result<Vec<HostRecord>, RegistryError> {
        let prefix = format!("{PREFIX}hosts/");
        let resp =
            self.call(|c| Box::pin(c.get(prefix.clone(), Some(GetOptions::new().with_prefix()))))?;
        let mut hosts = Vec::new();
        for kv in resp.kvs() {
            match HostRecord::decode(kv.value()) {
                Ok(r) if kv.key() == host_key(&r.name).as_bytes() => hosts.push(r),
                Ok(_) => log::warn!("host record under another host's key ignored"),
                Err(e) => log::warn!("host record ignored: {e}"),
            }
        }
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(hosts)
    }

    /// Every live host with its summary (one that cannot be read counts as none: a summary
    /// only guides where to ask, so a missing one costs misses, never an error).
    pub fn hosts_with_summaries(
        &mut self,
    ) -> Result<Vec<(HostRecord, Option<Bloom>)>, RegistryError> {
        let mut hosts = Vec::new();
        for host in self.hosts()? {
            let summary = self.summary(&host.name).unwrap_or_else(|e| {
                log::warn!("{e}; counted as holding nothing");
                None
            });
            hosts.push((host, summary));
        }
        Ok(hosts)
    }

    /// Host `name`'s current summary, if it has a whole one.
    pub fn summary(&mut self, name: &str) -> Result<Option<Bloom>, RegistryError> {
        check_name(name)?;
        let Some(meta) = self.summary_meta(name)? else {
            return Ok(None);
        };
        if meta.bytes > DECODE_MAX_BYTES as u64 {
            let err = BloomError::TooLarge(meta.bytes as usize);
            return Err(RegistryError::Summary(name.into(), err));
        }
        let prefix = gen_prefix(name, meta.generation);
        let resp =
            self.call(|c| Box::pin(c.get(prefix.clone(), Some(GetOptions::new().with_prefix()))))?;
        let mut kvs: Vec<_> = resp.kvs().iter().collect();
        kvs.sort_by(|a, b| a.key().cmp(b.key()));
        if kvs.len() != meta.chunks as usize {
            return Ok(None); // replaced meanwhile
        }
        let mut bytes = Vec::new();
        for kv in kvs {
            if bytes.len() + kv.value().len() > meta.bytes as usize {
                return Ok(None);
            }
            bytes.extend_from_slice(kv.value());
        }
        if blake3::hash(&bytes).to_hex().as_str() != meta.blake3 {
            return Ok(None);
        }
        Bloom::decode(&bytes, DECODE_MAX_BYTES)
            .map(Some)
            .map_err(|e| RegistryError::Summary(name.into(), e))
    }

    fn summary_meta(&mut self, name: &str) -> Result<Option<SummaryMeta>, RegistryError> {
        let key = format!("{PREFIX}summaries/{name}/current");
        let resp = self.call(|c| Box::pin(c.get(key.clone(), None)))?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
    }

    /// Runs one client call with the deadline.
    fn call<T>(
        &mut self,
        f: impl for<'a> FnOnce(&'a mut Client) -> BoxFuture<'a, T>,
    ) -> Result<T, RegistryError> {
        let fut = f(&mut self.client);
        in_time(&self.rt, &self.endpoints, self.timeout, fut)
    }
}

type BoxFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, etcd_client::Error>> + 'a>>;

fn in_time<T>(
    rt: &tokio::runtime::Runtime,
    endpoints: &str,
    timeout: Duration,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RegistryError> {
    match rt.block_on(async { tokio::time::timeout(timeout, fut).await }) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(RegistryError::Etcd(endpoints.into(), short(&e))),
        Err(_) => Err(RegistryError::TimedOut(endpoints.into(), timeout)),
    }
}

/// An etcd client error in a few words: a gRPC status's message and its root cause (e.g.
/// "tcp connect error: Connection refused (os error 111)").
fn short(e: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return e.to_string();
    };
    let mut root: Option<&dyn std::error::Error> = std::error::Error::source(status);
    while let Some(next) = root.and_then(|r| r.source()) {
        root = Some(next);
    }
    match root.map(|r| r.to_string()) {
        Some(cause) if cause != status.message() => format!("{}: {cause}", status.message()),
        _ => status.message().to_string(),
    }
}

fn host_key(name: &str) -> String {
    format!("{PREFIX}hosts/{name}")
}

fn gen_prefix(name: &str, generation: u64) -> String {
    format!("{PREFIX}summaries/{name}/{generation:016x}/")
}
