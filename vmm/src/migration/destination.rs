//! The destination side (`fabvm receive`): waits for one source, authenticates it, fills a
//! fresh guest memory from the wire and from what this host holds (its page store and the
//! VMs running here, each page verified), restores the machine state, and only after the
//! source commits starts the vCPUs and acknowledges. Any failure before that discards
//! everything here; the source keeps its guest.

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use fabric::migration::{Limits, MigrationError, Receiver};

use super::guest::GuestPages;
use super::postcopy_dest::{self, ClusterFallback, Loader, PostcopyError};
use super::{read_key, KeyFileError};
use crate::cli::ReceiveArgs;
use crate::event_loop::Services;
use crate::failpoint::failpoint;
use crate::host_pages::HostPages;
use crate::layout;
use crate::memory;
use crate::runner::{self, RunContext, RunError};
use crate::snapshot::format::{self, FormatError};
use crate::snapshot::open_store;
use crate::vcpu::exit::StopReason;

/// How long the destination waits for a running VM to hash its stale pages before it reads
/// that VM's identities for an incoming migration.
const SETTLE_WAIT: Duration = Duration::from_secs(2);
/// A link that moves nothing for this long is dead.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a destination waiting for its source re-reads what the VMs here published.
const REFRESH_WHILE_WAITING: Duration = Duration::from_millis(250);

/// Errors on the destination.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The key file.
    #[error(transparent)]
    Key(#[from] KeyFileError),
    /// Listening or accepting failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    /// No source came in time.
    #[error("no migration source connected within {0} s")]
    AcceptTimeout(u64),
    /// The protocol failed; nothing was started here.
    #[error("incoming migration failed: {0}")]
    Protocol(#[from] MigrationError),
    /// The described VM is not one this host runs.
    #[error("incoming VM refused: {0}")]
    Refused(String),
    /// The state blob does not decode.
    #[error("incoming VM state: {0}")]
    State(#[from] FormatError),
    /// Building the VM failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// Post-copy could not start (the guest never ran here).
    #[error(transparent)]
    Postcopy(#[from] PostcopyError),
    /// The page service's key file (`--page-key`, or `--key`, with `--etcd`).
    #[error("--etcd: {0}")]
    PageKey(KeyFileError),
}

/// Receives one VM and runs it until it stops.
pub fn receive(args: &ReceiveArgs) -> Result<StopReason, ReceiveError> {
    let key = read_key(&args.key)?;
    // The cluster's hosts are read now: etcd's client does not run under this thread's
    // seccomp filter (installed below).
    let fallback = cluster_fallback(args)?;
    let listener = TcpListener::bind(&args.listen).map_err(|source| ReceiveError::Listen {
        addr: args.listen.clone(),
        source,
    })?;
    // What the VMs running here hold is indexed while no source is connected yet, and
    // refreshed (only what changed) once one is.
    let me = Some(std::process::id());
    let mut hosted = HostPages::open(me, None).hash_always(args.hash_host_pages);
    hosted.settle(Duration::ZERO);
    // From here this thread takes bytes from the network: no more than a destination needs.
    crate::seccomp::install(crate::seccomp::ThreadKind::MigrationDestination)?;
    // While it waits, it keeps that index current (only what changed is read), so a
    // source that connects finds little left to read.
    let stream = accept(&listener, &args.listen, args.accept_timeout, || {
        hosted.refresh(me)
    })?;
    let started = Instant::now();
    let (mut receiver, description) = Receiver::accept(stream, &key, Limits::default())?;
    let mem: u64 = description.regions.iter().map(|r| r.bytes()).sum();
    let expected: Vec<(u64, u64)> = layout::ram_regions(mem);
    let regions: Vec<(u64, u64)> = description
        .regions
        .iter()
        .map(|r| (r.guest_addr, r.bytes()))
        .collect();
    if regions != expected || mem > layout::MAX_MEM || description.vcpus == 0 {
        receiver.abort("memory layout not supported here");
        return Err(ReceiveError::Refused(format!(
            "{} bytes in {} regions",
            mem,
            regions.len()
        )));
    }
    if crate::config::host_memory().is_some_and(|host| mem > host) {
        receiver.abort("destination has less memory than the guest");
        return Err(ReceiveError::Refused(format!(
            "{mem} bytes of guest memory exceed this host's"
        )));
    }
    // Small pages: the guest's pages arrive as host writes, and on these machines the first
    // touch of a fresh transparent huge page (2 MiB zeroed at once) costs more than the
    // 4 KiB faults it saves (measured: 1 GiB guest, 512 MiB copied from a sibling, round 1
    // 2.8 s with huge pages, 1.2 s without).
    let memory = match memory::create(mem, false) {
        Ok(memory) => memory,
        Err(e) => {
            receiver.abort("destination cannot allocate guest memory");
            return Err(ReceiveError::Refused(e.to_string()));
        }
    };
    log::debug!(target: "fabvm::timing", "incoming VM: memory made {:?} after the hello", started.elapsed());
    hosted.refresh(me);
    log::debug!(target: "fabvm::timing", "incoming VM: host pages refreshed {:?} after the hello", started.elapsed());
    hosted.settle(SETTLE_WAIT);
    // The store is opened only now: it is held (locked) until the pages are in.
    let hosted = hosted.with_store(args.store.as_ref().and_then(|dir| open_store(dir).ok()));
    log::debug!(target: "fabvm::timing", "incoming VM: memory and host pages ready {:?} after the hello", started.elapsed());
    // The VM is built while pages arrive (the guest's downtime only sets state). The memory
    // stays mapped here until then, whatever the build does with its handle.
    let mut sink = GuestPages::new(&memory);
    let keep_mapped = memory.clone();
    let vcpus = description.vcpus;
    let (shell, received) = std::thread::scope(|scope| {
        let building = scope.spawn(move || runner::Shell::build(memory, vcpus));
        let received = receiver.receive(&hosted, &mut sink);
        (building.join(), received)
    });
    let received = received?;
    log::debug!(target: "fabvm::timing", "incoming VM: pages and state in {:?} after the hello", started.elapsed());
    let host_figures = hosted.figures();
    log::info!("incoming migration: pages this host held: {host_figures}");
    // Post-copy keeps what this host holds for the pages still to come.
    let mut hosted = Some(hosted);
    if received.postcopy.is_none() {
        drop(hosted.take()); // release the store for others, and the files read from
    }
    let shell = match shell {
        Ok(Ok(shell)) => shell,
        Ok(Err(e)) => {
            receiver.abort("destination cannot create the VM");
            return Err(e.into());
        }
        Err(_) => {
            receiver.abort("destination cannot create the VM");
            return Err(ReceiveError::Refused("building the VM panicked".into()));
        }
    };
    let state = match format::decode(&received.state) {
        Ok(state) => state,
        Err(e) => {
            receiver.abort("state blob does not decode");
            return Err(e.into());
        }
    };
    // Post-copy: the pages still to come are registered on userfaultfd before anything
    // (the restore included) may touch them; the loader answers faults from here on.
    let mut confirm = match (&received.postcopy, hosted.take()) {
        (Some(pages), Some(hosted)) => {
            let loader = postcopy_dest::start(
                receiver,
                pages,
                &keep_mapped,
                Box::new(hosted),
                fallback,
                args.json,
            )?;
            Confirm::Postcopy(loader)
        }
        _ => Confirm::Precopy(Box::new(receiver)),
    };
    drop(keep_mapped);
    let ctx = RunContext::new()?;
    let built = match runner::restore_into(shell, &state, &ctx.sink) {
        Ok(mut built) => {
            built.contents = Some(received.manifest);
            built
        }
        Err(e) => {
            confirm.abort("destination cannot restore the machine state");
            return Err(e.into());
        }
    };
    // The source committed with its last message: from here the guest runs here, once
    // resumed, and `Ack` lets the source go.
    failpoint("before-resume");
    let services = Services {
        api_sock: args.api_sock.clone(),
        store: args.store.clone().unwrap_or_else(fabric::default_dir),
        share: None,
        identities: args.identities.config(),
    };
    let json = args.json;
    let reason = ctx.run(built, &services, move || {
        failpoint("before-ack");
        let stats = confirm.confirmed()?;
        let report = serde_json::json!({
            "received_ms": started.elapsed().as_secs_f64() * 1000.0,
            "stats": stats,
            "host_pages": host_figures,
        });
        if json {
            eprintln!("{report}");
        } else {
            log::info!("migration received: {report}");
        }
        Ok(())
    })?;
    Ok(reason)
}

/// How the destination tells the source the guest runs here.
enum Confirm {
    /// Pre-copy: `Ack` on the migration connection.
    Precopy(Box<Receiver<TcpStream>>),
    /// Post-copy: the loader owns the connection and sends it.
    Postcopy(Loader),
}

impl Confirm {
    fn abort(&mut self, reason: &str) {
        if let Confirm::Precopy(receiver) = self {
            receiver.abort(reason);
        }
    }

    /// Sends the acknowledgement; the receiver's figures (none in post-copy: the loader
    /// reports when every page is in).
    fn confirmed(&mut self) -> Result<serde_json::Value, String> {
        let err = |e| format!("could not acknowledge the migration: {e}");
        match self {
            Confirm::Precopy(receiver) => receiver
                .confirm_resumed()
                .map(|s| serde_json::to_value(s).unwrap_or_default())
                .map_err(|e| err(e.to_string())),
            Confirm::Postcopy(loader) => loader
                .confirm()
                .map(|()| serde_json::json!({ "postcopy": "switched" }))
                .map_err(err),
        }
    }
}

/// The cluster's live hosts and the page-service key, with `--etcd` (a registry that
/// cannot be read leaves post-copy without a fallback, and says so).
fn cluster_fallback(args: &ReceiveArgs) -> Result<Option<ClusterFallback>, ReceiveError> {
    let Some(etcd) = &args.etcd else {
        return Ok(None);
    };
    let key =
        read_key(args.page_key.as_ref().unwrap_or(&args.key)).map_err(ReceiveError::PageKey)?;
    match crate::cluster::pull::live_hosts(etcd) {
        Ok(hosts) => {
            log::info!("post-copy fallback: {} live hosts in {etcd}", hosts.len());
            Ok(Some(ClusterFallback { hosts, key }))
        }
        Err(e) => {
            log::warn!("--etcd {etcd}: {e}; a post-copy source that fails cannot be replaced");
            Ok(None)
        }
    }
}

/// Waits for the source's connection (up to `timeout_s` seconds, 0 = for ever), calling
/// `waiting` every [`REFRESH_WHILE_WAITING`] meanwhile.
fn accept(
    listener: &TcpListener,
    listen: &str,
    timeout_s: u64,
    mut waiting: impl FnMut(),
) -> Result<TcpStream, ReceiveError> {
    let err = |source| ReceiveError::Listen {
        addr: listen.to_string(),
        source,
    };
    listener.set_nonblocking(true).map_err(err)?;
    let deadline = (timeout_s > 0).then(|| Instant::now() + Duration::from_secs(timeout_s));
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(err(e)),
        }
        let wait = match deadline {
            Some(d) if Instant::now() >= d => return Err(ReceiveError::AcceptTimeout(timeout_s)),
            Some(d) => REFRESH_WHILE_WAITING.min(d - Instant::now()),
            None => REFRESH_WHILE_WAITING,
        };
        let mut fd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call; the listener's descriptor stays open.
        unsafe { libc::poll(&mut fd, 1, wait.as_millis() as libc::c_int) };
        if fd.revents == 0 {
            waiting();
        }
    };
    stream.set_nonblocking(false).map_err(err)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(err)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(err)?;
    stream.set_nodelay(true).map_err(err)?;
    Ok(stream)
}
