//! `fabvm host serve`: the host agent. It registers the host in the cluster registry under
//! a lease (renewed every third of its TTL), publishes a summary of the pages the host holds
//! when they change, and serves those pages to other hosts over the page service. An etcd
//! that goes away costs the registration only: pages keep being served, and the agent
//! registers again (a new lease) once etcd answers. SIGTERM or SIGINT revokes the lease (the
//! host leaves the registry at once) and ends the agent with exit 0.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::record::{check_name, unix_ms, RecordError};
use cluster::registry::RegistryError;
use cluster::service::{self, IO_TIMEOUT};
use cluster::{HostRecord, Registry};
use fabric::migration::MigrationKey;

use super::control::Control;
use super::host::{cpus, meminfo, Change, Holdings, Summary};
use super::ETCD_TIMEOUT;
use crate::cli::ServeArgs;
use crate::migration::{read_key, KeyFileError};

/// Most page-service connections served at once.
const MAX_CONNECTIONS: usize = 16;

/// Set by SIGTERM or SIGINT.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Errors starting the agent (once it runs it only logs).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Name(#[from] RecordError),
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("--summary-max must be between 4K and 64M")]
    SummaryMax,
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// Runs the agent until the process is killed.
pub fn serve(args: &ServeArgs) -> Result<(), AgentError> {
    check_name(&args.name)?;
    if args.ttl == 0 {
        return Err(AgentError::Zero("--ttl"));
    }
    if args.refresh == 0 {
        return Err(AgentError::Zero("--refresh"));
    }
    if !(4 << 10..=cluster::bloom::DECODE_MAX_BYTES as u64).contains(&args.summary_max) {
        return Err(AgentError::SummaryMax);
    }
    let key = read_key(&args.key)?;
    let listener =
        TcpListener::bind(&args.listen).map_err(|e| AgentError::Listen(args.listen.clone(), e))?;
    let mut registry = Registry::connect(&args.etcd, ETCD_TIMEOUT)?;
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `on_stop` only stores to an atomic, which is async-signal-safe; the
        // handler stays valid for the life of the process.
        unsafe { libc::signal(signal, on_stop as *const () as libc::sighandler_t) };
    }
    let holdings = Arc::new(Mutex::new(Holdings::open(args.store.as_deref())));
    {
        let holdings = holdings.clone();
        let control = Control::new(args);
        std::thread::Builder::new()
            .name("fabvm-pages".into())
            .spawn(move || accept_loop(listener, key, holdings, control))
            .map_err(|e| AgentError::Listen(args.listen.clone(), e))?;
    }
    eprintln!(
        "fabvm host serve: {} serving pages on {}, registered at {}",
        args.name, args.listen, args.etcd
    );
    Agent {
        args: args.clone(),
        holdings,
        lease: None,
        generation: 0,
        published: None,
        published_at: None,
        pending: None,
    }
    .run(&mut registry);
    Ok(())
}

/// The registration side of the agent.
struct Agent {
    args: ServeArgs,
    holdings: Arc<Mutex<Holdings>>,
    lease: Option<i64>,
    generation: u64,
    /// The summary last built and when (republished under a new lease).
    published: Option<(Summary, u64)>,
    /// When a summary was last published.
    published_at: Option<Instant>,
    /// A change to the filter not yet published.
    pending: Option<Change>,
}

impl Agent {
    fn run(mut self, registry: &mut Registry) {
        let ttl = Duration::from_secs(self.args.ttl);
        let tick = (ttl / 3).max(Duration::from_millis(500));
        let refresh = Duration::from_secs(self.args.refresh);
        let mut next_refresh = Instant::now();
        while !STOP.load(Ordering::SeqCst) {
            let now = Instant::now();
            let rebuilt = if now >= next_refresh {
                next_refresh = now + refresh;
                self.rebuild()
            } else {
                false
            };
            if let Err(e) = self.register(registry, ttl, rebuilt) {
                log::warn!("cluster registry: {e} (pages are still served; retrying)");
                if matches!(e, RegistryError::LeaseExpired) {
                    self.lease = None;
                }
            }
            let until =
                Instant::now() + tick.min(next_refresh.saturating_duration_since(Instant::now()));
            while Instant::now() < until && !STOP.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if let Some(lease) = self.lease {
            match registry.revoke(lease) {
                Ok(()) => log::info!("lease revoked: {} left the registry", self.args.name),
                Err(e) => log::warn!("cannot revoke the lease ({e}): it expires within its TTL"),
            }
        }
    }

    /// Builds a new summary if the pages held changed; true when it is to be published:
    /// at once when it was rebuilt (a VM came or went, the store changed), otherwise (keys
    /// added as guests write) at most every `--publish-every` seconds, since every write
    /// of a summary stays in etcd's history until it is compacted.
    fn rebuild(&mut self) -> bool {
        let max = usize::try_from(self.args.summary_max).unwrap_or(usize::MAX);
        let every = Duration::from_secs(self.args.publish_every);
        let mut holdings = self.holdings.lock().expect("not poisoned");
        match holdings.refresh(max) {
            Change::None => {}
            Change::Added => {
                self.pending.get_or_insert(Change::Added);
            }
            Change::Rebuilt => self.pending = Some(Change::Rebuilt),
        }
        let due = match self.pending {
            None => false,
            Some(Change::Rebuilt) => true,
            Some(_) => self.published_at.is_none_or(|at| at.elapsed() >= every),
        };
        let summary = if due { holdings.summary() } else { None };
        drop(holdings);
        let Some(summary) = summary else {
            return false;
        };
        self.pending = None;
        if self
            .published
            .as_ref()
            .is_some_and(|(last, _)| last.bytes == summary.bytes)
        {
            return false;
        }
        self.generation += 1;
        self.published = Some((summary, unix_ms()));
        self.published_at = Some(Instant::now());
        true
    }

    /// Keeps the lease alive, or takes a new one and writes everything again; writes the
    /// summary when it changed and the host record every time.
    fn register(
        &mut self,
        registry: &mut Registry,
        ttl: Duration,
        rebuilt: bool,
    ) -> Result<(), RegistryError> {
        let fresh = match self.lease {
            Some(lease) => {
                registry.keep_alive(lease)?;
                false
            }
            None => {
                let lease = registry.grant(ttl)?;
                log::info!("registered under lease {lease:x} (TTL {ttl:?})");
                self.lease = Some(lease);
                true
            }
        };
        let lease = self.lease.expect("set above");
        if let Some((summary, _)) = &self.published {
            if fresh || rebuilt {
                let bytes = &summary.bytes;
                registry.put_summary(&self.args.name, self.generation, bytes, lease)?;
                log::info!(
                    "summary {}: {} pages held, {} bytes, false positives {:.4}",
                    self.generation,
                    summary.pages_held,
                    bytes.len(),
                    summary.fp_rate
                );
            }
        }
        registry.put_host(&self.record(), lease)
    }

    fn record(&self) -> HostRecord {
        let (mem_available, mem_total) = meminfo();
        let (summary, at) = match &self.published {
            Some((s, at)) => (Some(s), *at),
            None => (None, 0),
        };
        HostRecord {
            name: self.args.name.clone(),
            addr: self.args.listen.clone(),
            mem_available,
            mem_total,
            cpus: cpus(),
            vms: crate::host_index::running_vms(None).len() as u32,
            pages_held: summary.map_or(0, |s| s.pages_held),
            store_pages: summary.map_or(0, |s| s.store_pages),
            summary_generation: if summary.is_some() {
                self.generation
            } else {
                0
            },
            summary_bytes: summary.map_or(0, |s| s.bytes.len() as u64),
            summary_fp_rate: summary.map_or(0.0, |s| s.fp_rate),
            summary_unix_ms: at,
            updated_unix_ms: unix_ms(),
        }
    }
}

/// Accepts page-service connections (page and control requests), one thread each, at most
/// [`MAX_CONNECTIONS`] at once.
fn accept_loop(
    listener: TcpListener,
    key: MigrationKey,
    holdings: Arc<Mutex<Holdings>>,
    control: Control,
) {
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else {
            // Out of descriptors, say: let some connections end first.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            log::warn!("page service: too many connections, one refused");
            continue;
        }
        let (key, holdings, done) = (key.clone(), holdings.clone(), active.clone());
        let control = control.clone();
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let spawned = std::thread::Builder::new()
            .name("fabvm-page-conn".into())
            .spawn(move || {
                let result = service::serve_with_control(
                    stream,
                    &key,
                    IO_TIMEOUT,
                    |ids, out| holdings.lock().expect("not poisoned").fetch(ids, out),
                    |req, reply| control.handle(req, reply),
                );
                match result {
                    Ok(s) => log::info!("page service {peer}: {s:?}"),
                    Err(e) => log::warn!("page service {peer}: {e}"),
                }
                done.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
