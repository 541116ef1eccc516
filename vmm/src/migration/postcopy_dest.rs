//! Post-copy on the destination: the guest resumes before all its pages are here. The pages
//! still to come are made absent (`MADV_DONTNEED`) and guest RAM is registered on
//! userfaultfd; a loader thread then answers every fault: a page this host holds (its store,
//! its VMs) is installed at once, any other is asked of the source ahead of its background
//! stream; streamed pages are installed as they come. Every page is checked against the
//! identity the source listed before `UFFDIO_COPY` installs it. When all are in the loader
//! tells the source (`AllIn`), which exits, and unregisters guest RAM.
//!
//! If the source fails after the switch, the loader asks the cluster's page service for
//! what is missing (`fabvm receive --etcd URL`, with the hosts registered when `receive`
//! started); if that does not bring every page, the VM is lost: one line on stderr naming
//! the pages missing and exit status 1. A link that brings nothing for
//! [`POSTCOPY_TIMEOUT`] while pages are missing is a failed source too.

use std::collections::HashMap;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cluster::{Bloom, HostRecord};
use fabric::migration::{
    GuestFrames, MigrationError, PageSource, PageState, PostcopyDest, PostcopyPages, Receiver,
};
use fabric::{Page, PageId, PAGE_SIZE};

use super::guest::GuestPages;
use super::postcopy::POSTCOPY_TIMEOUT;
use crate::memory::GuestMemory;
use crate::snapshot::uffd::Uffd;

/// Frames looked up on this host per loader step between faults.
const LOCAL_STEP: usize = 256;

/// Errors of starting post-copy on the destination (the guest has not run yet).
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// userfaultfd or madvise failed.
    #[error("post-copy: {what}: {source}")]
    Setup {
        what: &'static str,
        source: std::io::Error,
    },
    /// The protocol refused the switch.
    #[error("post-copy: {0}")]
    Protocol(#[from] MigrationError),
}

/// Where the loader may find pages if the source fails: the cluster's live hosts (read
/// when `fabvm receive` started) and the page-service key.
#[derive(Debug)]
pub struct ClusterFallback {
    pub hosts: Vec<(HostRecord, Option<Bloom>)>,
    pub key: fabric::migration::MigrationKey,
}

/// The running loader: [`Loader::confirm`] once the guest runs.
#[derive(Debug)]
pub struct Loader {
    resumed: mpsc::Sender<()>,
    confirmed: mpsc::Receiver<Result<(), String>>,
}

impl Loader {
    /// The guest runs here: tells the source (`Ack`). On error the caller stops the guest
    /// (the source may resume its copy).
    pub fn confirm(&self) -> Result<(), String> {
        self.resumed
            .send(())
            .map_err(|_| "the post-copy loader is gone".to_string())?;
        self.confirmed
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| "the post-copy loader did not answer".to_string())?
    }
}

/// Makes the listed pages absent, registers guest RAM on userfaultfd and starts the loader.
pub fn start(
    receiver: Receiver<TcpStream>,
    pages: &PostcopyPages,
    memory: &GuestMemory,
    hosted: Box<dyn PageSource + Send>,
    fallback: Option<ClusterFallback>,
    json: bool,
) -> Result<Loader, PostcopyError> {
    let setup = |what| move |source| PostcopyError::Setup { what, source };
    let guest = GuestPages::new(memory);
    let fd = receiver.stream().try_clone().map_err(setup("socket"))?;
    let _ = fd.set_read_timeout(Some(POSTCOPY_TIMEOUT));
    let _ = fd.set_write_timeout(Some(POSTCOPY_TIMEOUT));
    let mut sorted: Vec<u64> = pages.missing.iter().map(|&(gfn, _)| gfn).collect();
    sorted.sort_unstable();
    for run in sorted.chunk_by(|a, b| a + 1 == *b) {
        let addr = guest
            .frame_addr(run[0])
            .expect("listed frames are in guest RAM");
        // SAFETY: the range is whole guest pages of a private anonymous mapping this process
        // owns; no vCPU runs yet and nothing holds references into it. Their contents are
        // stale and are dropped on purpose: the loader installs the listed ones.
        let r = unsafe {
            libc::madvise(
                addr as *mut libc::c_void,
                run.len() * PAGE_SIZE,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(setup("madvise")(std::io::Error::last_os_error()));
        }
    }
    let uffd = Uffd::new().map_err(setup("userfaultfd"))?;
    for (host, len) in guest.host_ranges() {
        uffd.register(host as u64, len as u64)
            .map_err(setup("userfaultfd register"))?;
    }
    let dest = receiver.into_postcopy(pages)?;
    let (resumed, resumed_rx) = mpsc::channel();
    let (confirmed_tx, confirmed) = mpsc::channel();
    let state = State {
        dest,
        uffd,
        guest,
        sock: fd,
        hosted,
        fallback,
        json,
        resumed: resumed_rx,
        confirmed: confirmed_tx,
        acked: false,
        local: sorted,
        local_cursor: 0,
    };
    std::thread::Builder::new()
        .name("postcopy".into())
        .spawn(move || state.run())
        .map_err(setup("thread"))?;
    Ok(Loader { resumed, confirmed })
}

struct State {
    dest: PostcopyDest<TcpStream>,
    uffd: Uffd,
    guest: GuestPages,
    sock: TcpStream,
    hosted: Box<dyn PageSource + Send>,
    fallback: Option<ClusterFallback>,
    json: bool,
    resumed: mpsc::Receiver<()>,
    confirmed: mpsc::Sender<Result<(), String>>,
    acked: bool,
    /// Listed frames in order, looked up on this host a step at a time.
    local: Vec<u64>,
    local_cursor: usize,
}

impl State {
    fn run(mut self) {
        let mut last_page = Instant::now();
        loop {
            if self.resumed.try_recv().is_ok() {
                let sent = self.dest.confirm_resumed().map_err(|e| e.to_string());
                self.acked = sent.is_ok();
                let _ = self.confirmed.send(sent);
            }
            if self.dest.table().remaining() == 0 && self.acked {
                match self.dest.finish() {
                    Ok(all) => self.done(serde_json::to_value(all).unwrap_or_default()),
                    Err(e) => log::warn!(
                        "post-copy: every page is in, but telling the source failed: {e}"
                    ),
                }
                return;
            }
            if let Err(e) = self.step(&mut last_page) {
                self.source_failed(e);
                return;
            }
        }
    }

    /// One turn: faults, a step of local lookups, one message from the source.
    fn step(&mut self, last_page: &mut Instant) -> Result<(), MigrationError> {
        let wait = if self.dest.input_ready() || self.local_cursor < self.local.len() {
            0
        } else {
            50
        };
        let mut fds = [
            libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll(2) on two pollfds on this stack frame, for the call only.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, wait) };
        self.faults()?;
        self.local_step()?;
        if self.dest.input_ready() {
            let (uffd, guest) = (&self.uffd, &self.guest);
            let n = self
                .dest
                .recv(&mut |gfn, page| install(uffd, guest, gfn, page))?;
            if n > 0 {
                *last_page = Instant::now();
            }
        } else if self.dest.table().remaining() > 0 && last_page.elapsed() > POSTCOPY_TIMEOUT {
            return Err(MigrationError::TimedOut);
        }
        Ok(())
    }

    /// Answers every waiting fault: zero for frames not listed, the page when it is in (or
    /// held here), else asks the source.
    fn faults(&mut self) -> Result<(), MigrationError> {
        let mut wanted = Vec::new();
        let mut held = Vec::new();
        loop {
            let addr = match self.uffd.next_fault() {
                Ok(Some(addr)) => addr & !(PAGE_SIZE as u64 - 1),
                Ok(None) => break,
                Err(e) => return Err(MigrationError::Io(e)),
            };
            let Some(gfn) = self.guest.gfn_of(addr as usize) else {
                continue;
            };
            let result = match self.dest.table().state(gfn) {
                PageState::NotListed => self.uffd.zero(addr, PAGE_SIZE as u64).map(|_| ()),
                PageState::In => self.uffd.wake(addr, PAGE_SIZE as u64),
                PageState::Requested => Ok(()),
                PageState::Missing => {
                    if self.take_local(gfn) {
                        held.push(gfn);
                    } else {
                        wanted.push(gfn);
                    }
                    Ok(())
                }
            };
            result.map_err(MigrationError::Io)?;
        }
        self.dest.want(&wanted)?;
        self.dest.held(&held)
    }

    /// Looks up the next few listed pages on this host.
    fn local_step(&mut self) -> Result<(), MigrationError> {
        let end = (self.local_cursor + LOCAL_STEP).min(self.local.len());
        let mut held = Vec::new();
        for i in self.local_cursor..end {
            let gfn = self.local[i];
            if self.dest.table().state(gfn) == PageState::Missing && self.take_local(gfn) {
                held.push(gfn);
            }
        }
        self.local_cursor = end;
        self.dest.held(&held)
    }

    /// Installs `gfn`'s page from this host if it holds it (verified).
    fn take_local(&mut self, gfn: u64) -> bool {
        let Some(id) = self.dest.table().id(gfn) else {
            return false;
        };
        let mut page = [0u8; PAGE_SIZE];
        if !self.hosted.fetch_at(gfn, &id, &mut page) || !id.matches(&page) {
            return false;
        }
        if install(&self.uffd, &self.guest, gfn, &page).is_err() {
            return false;
        }
        self.dest.table_mut().installed(gfn, true);
        true
    }

    /// The source failed after the switch: the cluster may hold what is missing; if not,
    /// the VM is lost.
    fn source_failed(mut self, err: MigrationError) {
        let missing = self.dest.table().missing();
        log::info!(
            "post-copy: the source failed ({err}) with {} pages still missing",
            missing.len()
        );
        let pulled = match self.fallback.take() {
            Some(fallback) => self.pull(&fallback, &missing),
            None => None,
        };
        let missing = self.dest.table().missing();
        if missing.is_empty() {
            let mut report = serde_json::to_value(self.dest.figures()).unwrap_or_default();
            report["source_failed"] = err.to_string().into();
            report["pulled"] = pulled.unwrap_or_default();
            self.done(report);
            return;
        }
        let first: Vec<String> = missing
            .iter()
            .take(8)
            .map(|(gfn, _)| format!("{gfn:#x}"))
            .collect();
        let more = if missing.len() > first.len() {
            ", ..."
        } else {
            ""
        };
        let where_ = if pulled.is_some() {
            "nor from the cluster"
        } else {
            "and no cluster to ask (fabvm receive --etcd URL)"
        };
        eprintln!(
            "fabvm: post-copy source failed ({err}): {} pages missing (gfn {}{more}), not from the source {where_}; the VM is lost",
            missing.len(),
            first.join(", ")
        );
        std::process::exit(1);
    }

    /// Pulls `missing` from the cluster's live hosts; returns the pull's report.
    fn pull(
        &mut self,
        fallback: &ClusterFallback,
        missing: &[(u64, PageId)],
    ) -> Option<serde_json::Value> {
        let mut frames: HashMap<PageId, Vec<u64>> = HashMap::new();
        for &(gfn, id) in missing {
            frames.entry(id).or_default().push(gfn);
        }
        let ids: Vec<PageId> = frames.keys().copied().collect();
        let plan = cluster::pull::plan(&ids, &fallback.hosts);
        let connect = |addr: &str| {
            cluster::PageClient::connect(addr, &fallback.key, cluster::service::IO_TIMEOUT)
        };
        let (uffd, guest) = (&self.uffd, &self.guest);
        let table = self.dest.table_mut();
        let report = cluster::pull::pull(&ids, &plan, connect, |batch| {
            for &(id, bytes) in batch {
                let Ok(page) = <&Page>::try_from(bytes) else {
                    continue;
                };
                for &gfn in frames.get(&id).map(Vec::as_slice).unwrap_or_default() {
                    if table.check(gfn, page).unwrap_or(false)
                        && install(uffd, guest, gfn, page).is_ok()
                    {
                        table.installed(gfn, true);
                    }
                }
            }
            Ok::<(), std::convert::Infallible>(())
        });
        report
            .ok()
            .map(|r| serde_json::to_value(r).unwrap_or_default())
    }

    /// Every page is in: unregisters guest RAM and reports.
    fn done(&self, figures: serde_json::Value) {
        for (host, len) in self.guest.host_ranges() {
            if let Err(e) = self.uffd.unregister(host as u64, len as u64) {
                log::warn!("post-copy: unregister: {e}");
            }
        }
        let line = serde_json::json!({ "postcopy": figures });
        if self.json {
            eprintln!("{line}");
        } else {
            log::info!("post-copy complete: {line}");
        }
    }
}

/// Installs a verified page at `gfn` (`UFFDIO_COPY`; a page already there is fine).
fn install(uffd: &Uffd, guest: &GuestPages, gfn: u64, page: &Page) -> std::io::Result<()> {
    let addr = guest
        .frame_addr(gfn)
        .ok_or_else(|| std::io::Error::other("frame outside guest RAM"))?;
    uffd.copy(addr as u64, page).map(|_| ())
}
