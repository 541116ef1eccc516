//! The destination side (`fabvm receive`): waits for one source, authenticates it, fills a
//! fresh guest memory from the wire and from what this host holds (its page store and the
//! VMs running here, each page verified), restores the machine state, and only after the
//! source commits starts the vCPUs and acknowledges. Any failure before that discards
//! everything here; the source keeps its guest.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fabric::migration::{Limits, MigrationError, PageSource, Receiver};
use fabric::{Page, PageId, Store};

use super::guest::GuestPages;
use super::{read_key, KeyFileError};
use crate::cli::ReceiveArgs;
use crate::event_loop::Services;
use crate::host_index::{self, RegisteredVm, RunningPages};
use crate::layout;
use crate::memory;
use crate::runner::{self, RunContext, RunError};
use crate::snapshot::format::{self, FormatError};
use crate::snapshot::open_store;
use crate::vcpu::exit::StopReason;

/// A link that moves nothing for this long is dead.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

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
}

/// Pages this host holds: VMs running here and the host store; every page is verified as
/// it is copied.
///
/// A VM started from the same image as the incoming one usually holds the same page at the
/// same guest frame, so each page is looked for there first: one read and one hash, and no
/// index of the host's memory at all while that keeps finding them. Once more than one
/// look in [`MISS_SHARE`] misses (after [`PROBES_BEFORE_JUDGING`]), the running VMs' memory
/// is hashed into an index (once) and every later page is looked up there. A page missed
/// before that is asked from the source, like one this host lacks.
struct HostPages {
    vms: Vec<RegisteredVm>,
    probes: AtomicU64,
    misses: AtomicU64,
    index: OnceLock<RunningPages>,
    store: Option<Store>,
}

/// Looks at the same frame before judging whether it pays.
const PROBES_BEFORE_JUDGING: u64 = 256;
/// Build the index once more than 1 look in this many misses.
const MISS_SHARE: u64 = 16;

impl HostPages {
    fn new(vms: Vec<RegisteredVm>, store: Option<Store>) -> Self {
        HostPages {
            vms,
            probes: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            index: OnceLock::new(),
            store,
        }
    }

    /// The index of the running VMs' pages, if it has been built.
    fn index(&self) -> Option<&RunningPages> {
        self.index.get()
    }

    /// Looks for `id` at frame `gfn` of each running VM.
    fn probe(&self, gfn: u64, id: &PageId, out: &mut Page) -> bool {
        let hit = self
            .vms
            .iter()
            .any(|vm| vm.read_page(gfn, out) && id.matches(out));
        let probes = self.probes.fetch_add(1, Ordering::Relaxed) + 1;
        if !hit {
            let misses = self.misses.fetch_add(1, Ordering::Relaxed) + 1;
            if probes >= PROBES_BEFORE_JUDGING && misses * MISS_SHARE > probes {
                self.index.get_or_init(|| RunningPages::hash(&self.vms));
            }
        }
        hit
    }
}

impl PageSource for HostPages {
    fn fetch(&self, id: &PageId, out: &mut Page) -> bool {
        self.index().is_some_and(|index| index.fetch(id, out))
            || self.store.as_ref().is_some_and(|s| s.get(id, out).is_ok())
    }

    fn fetch_at(&self, gfn: u64, id: &PageId, out: &mut Page) -> bool {
        if self.vms.is_empty() {
            return self.fetch(id, out);
        }
        match self.index() {
            Some(_) => self.fetch(id, out),
            None => {
                self.probe(gfn, id, out)
                    || self.store.as_ref().is_some_and(|s| s.get(id, out).is_ok())
            }
        }
    }

    /// The probe and the index re-hash what they copy; the store checks what it reads.
    fn verifies(&self) -> bool {
        true
    }
}

/// Receives one VM and runs it until it stops.
pub fn receive(args: &ReceiveArgs) -> Result<StopReason, ReceiveError> {
    let key = read_key(&args.key)?;
    let stream = accept(&args.listen, args.accept_timeout)?;
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
    let memory = match memory::create(mem, true) {
        Ok(memory) => memory,
        Err(e) => {
            receiver.abort("destination cannot allocate guest memory");
            return Err(ReceiveError::Refused(e.to_string()));
        }
    };
    // What this host already holds: the store (if it opens) and the VMs running here.
    let hosted = HostPages::new(
        host_index::running_vms(Some(std::process::id())),
        args.store.as_ref().and_then(|dir| open_store(dir).ok()),
    );
    // The VM is built while pages arrive, so the guest's downtime only sets state.
    let shell = match runner::Shell::build(memory, description.vcpus) {
        Ok(shell) => shell,
        Err(e) => {
            receiver.abort("destination cannot create the VM");
            return Err(e.into());
        }
    };
    let mut sink = GuestPages::new(shell.memory());
    let received = receiver.receive(&hosted, &mut sink)?;
    log::info!(
        "incoming migration: {} running VMs here; {} pages looked for at the same frame, {} \
         not there; index of their memory {}",
        hosted.vms.len(),
        hosted.probes.load(Ordering::Relaxed),
        hosted.misses.load(Ordering::Relaxed),
        match hosted.index() {
            Some(index) => format!(
                "built ({} pages, {} MiB hashed)",
                index.len(),
                index.bytes_hashed >> 20
            ),
            None => "not needed".to_string(),
        }
    );
    drop(hosted); // release the store for others
    let state = match format::decode(&received.state) {
        Ok(state) => state,
        Err(e) => {
            receiver.abort("state blob does not decode");
            return Err(e.into());
        }
    };
    let ctx = RunContext::new()?;
    let built = match runner::restore_into(shell, &state, &ctx.sink) {
        Ok(built) => built,
        Err(e) => {
            receiver.abort("destination cannot restore the machine state");
            return Err(e.into());
        }
    };
    failpoint("before-ready");
    receiver.ready()?;
    let services = Services {
        api_sock: args.api_sock.clone(),
        store: args.store.clone().unwrap_or_else(fabric::default_dir),
        share: None,
    };
    let json = args.json;
    let reason = ctx.run(built, &services, move || {
        failpoint("before-ack");
        let stats = receiver
            .confirm_resumed()
            .map_err(|e| format!("could not acknowledge the migration: {e}"))?;
        let report = serde_json::json!({
            "received_ms": started.elapsed().as_secs_f64() * 1000.0,
            "stats": stats,
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

/// Fault injection for tests: `FABVM_TEST_FAILPOINT=NAME` makes this process die at the
/// named point, as a crashed or killed destination would.
fn failpoint(name: &str) {
    if std::env::var("FABVM_TEST_FAILPOINT").as_deref() == Ok(name) {
        eprintln!("fabvm: failpoint {name}: exiting");
        std::process::exit(3);
    }
}

fn accept(listen: &str, timeout_s: u64) -> Result<TcpStream, ReceiveError> {
    let err = |source| ReceiveError::Listen {
        addr: listen.to_string(),
        source,
    };
    let listener = TcpListener::bind(listen).map_err(err)?;
    let stream = if timeout_s == 0 {
        listener.accept().map_err(err)?.0
    } else {
        listener.set_nonblocking(true).map_err(err)?;
        let deadline = Instant::now() + Duration::from_secs(timeout_s);
        loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(ReceiveError::AcceptTimeout(timeout_s));
                }
                Err(e) => return Err(err(e)),
            }
        }
    };
    stream.set_nonblocking(false).map_err(err)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(err)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(err)?;
    stream.set_nodelay(true).map_err(err)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_index::RegisteredRegion;
    use fabric::PAGE_SIZE;

    /// `pages` distinct pages in this process, registered as a running VM at frame 0.
    fn own_memory_as_a_vm(pages: usize) -> (Vec<u8>, RegisteredVm) {
        let mut mem = vec![0u8; pages * PAGE_SIZE];
        for (i, page) in mem.chunks_mut(PAGE_SIZE).enumerate() {
            page[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        }
        let vm = RegisteredVm {
            pid: std::process::id(),
            regions: vec![RegisteredRegion {
                guest_addr: 0,
                host_addr: mem.as_ptr() as u64,
                len: mem.len() as u64,
            }],
        };
        (mem, vm)
    }

    fn id_of(mem: &[u8], gfn: usize) -> PageId {
        PageId::of(
            mem[gfn * PAGE_SIZE..(gfn + 1) * PAGE_SIZE]
                .try_into()
                .unwrap(),
        )
    }

    #[test]
    fn a_twin_at_the_same_frames_is_used_without_hashing_its_memory() {
        let (mem, vm) = own_memory_as_a_vm(1024);
        let host = HostPages::new(vec![vm], None);
        let mut out = [0u8; PAGE_SIZE];
        for gfn in 0..1024 {
            assert!(host.fetch_at(gfn as u64, &id_of(&mem, gfn), &mut out));
            assert_eq!(out[..], mem[gfn * PAGE_SIZE..(gfn + 1) * PAGE_SIZE]);
        }
        // A few pages elsewhere (a guest's own stack, counters) do not give up on it.
        let unknown = PageId::of(&[7u8; PAGE_SIZE]);
        for gfn in 0..16 {
            assert!(!host.fetch_at(gfn, &unknown, &mut out));
        }
        assert!(
            host.index().is_none(),
            "no index while looking in place works"
        );
    }

    #[test]
    fn pages_at_other_frames_switch_to_the_index() {
        let (mem, vm) = own_memory_as_a_vm(1024);
        let host = HostPages::new(vec![vm], None);
        let mut out = [0u8; PAGE_SIZE];
        // The incoming VM holds the same pages, shifted by one frame.
        let mut found = 0;
        for gfn in 0..1023 {
            found += usize::from(host.fetch_at(gfn as u64, &id_of(&mem, gfn + 1), &mut out));
        }
        assert!(host.index().is_some(), "misses must build the index");
        assert!(found >= 1023 - PROBES_BEFORE_JUDGING as usize, "{found}");
        assert!(host.fetch_at(5, &id_of(&mem, 9), &mut out));
        assert_eq!(out[..], mem[9 * PAGE_SIZE..10 * PAGE_SIZE]);
    }
}
