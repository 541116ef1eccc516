//! The VMM's main loop: owns the running VM and waits on epoll for console input, guest
//! reset and exit requests, vCPU stop reports and API calls, until the VM stops.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Receiver};
use std::time::Instant;

use devices::DebugExit;
use serde_json::json;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::server::{ApiServer, Call, Reply, ServerError};
use crate::api::{Request, Response};
use crate::console::{self, RawStdin};
use crate::device_manager::DeviceManager;
use crate::metrics;
use crate::migration::source::{self, MigrateRequest};
use crate::snapshot::save::{self, VmMeta};
use crate::vcpu::exit::StopReason;
use crate::vcpu::Vcpus;
use crate::vm::Vm;

/// Errors of the event loop itself.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// epoll or eventfd failure.
    #[error("event loop: {0}")]
    Io(#[from] std::io::Error),
    /// The API socket could not be served.
    #[error(transparent)]
    Api(#[from] ServerError),
    /// The main thread's seccomp filter.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// The services around a running VM.
#[derive(Debug, Clone)]
pub struct Services {
    /// API socket to serve, if any.
    pub api_sock: Option<std::path::PathBuf>,
    /// The host store snapshots go to.
    pub store: std::path::PathBuf,
    /// Page sharing with other VMs on this host (`--share`).
    pub share: Option<crate::sharing::ShareMode>,
    /// How live page identities are kept.
    pub identities: crate::memory::identities::IdentityConfig,
}

/// A running VM and what the loop needs to serve it.
#[derive(Debug)]
pub struct Machine {
    /// The VM.
    pub vm: Vm,
    /// Its memory: dirty log and live identities.
    pub memory: crate::memory::MemoryManager,
    /// Its devices.
    pub devices: DeviceManager,
    /// Its running vCPUs.
    pub vcpus: Vcpus,
    /// How it was started.
    pub meta: VmMeta,
    /// When fabvm started building it.
    pub started: Instant,
}

const EV_STOP: u64 = 1;
const EV_RESET: u64 = 2;
const EV_STDIN: u64 = 3;
const EV_DRAINED: u64 = 4;
const EV_DEBUG_EXIT: u64 = 5;
const EV_API: u64 = 6;
const EV_POWER_OFF: u64 = 7;

/// Runs until the VM stops; then stops and joins the vCPU threads.
pub fn run(
    machine: Machine,
    services: &Services,
    stop_evt: &EventFd,
    stops: &Receiver<StopReason>,
) -> Result<StopReason, LoopError> {
    let mut state = LoopState {
        machine,
        paused: false,
        store: services.store.clone(),
        baseline: None,
        migrated: false,
        lost: None,
        sharing: None,
    };
    let api_wake = std::sync::Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let (calls_tx, calls) = channel();
    let _server = match &services.api_sock {
        Some(path) => Some(ApiServer::start(path, calls_tx, api_wake.clone())?),
        None => None,
    };
    // Other fabvm processes on this host (migration destinations, the sharing report) find
    // our pages through this registration; without it they just don't see this VM.
    let _registration = crate::host_index::Registration::new(
        &state.machine.vm.memory,
        services.api_sock.as_deref(),
    )
    .map_err(|e| log::warn!("{e}"))
    .ok();
    state.sharing = Some(crate::sharing::Sharing::start(
        &state.machine.vm.memory,
        services.share,
    ));
    let _raw = RawStdin::new();
    // Every service thread runs (each under its own filter, not inheriting this one): the
    // main thread's filter goes on before it serves the first event.
    crate::seccomp::install(crate::seccomp::ThreadKind::Vmm)?;
    let result = state.serve(stop_evt, stops, &api_wake, &calls);
    state.machine.vcpus.stop();
    result
}

struct LoopState {
    machine: Machine,
    paused: bool,
    store: std::path::PathBuf,
    /// The previous snapshot (pages unchanged since are in its store).
    baseline: Option<save::Baseline>,
    /// The VM now runs at a migration destination: stop here.
    migrated: bool,
    /// A post-copy migration failed after the switchover: the guest cannot run here.
    lost: Option<String>,
    /// Page sharing with other VMs (`--share`) and its figures.
    sharing: Option<crate::sharing::Sharing>,
}

impl LoopState {
    fn serve(
        &mut self,
        stop_evt: &EventFd,
        stops: &Receiver<StopReason>,
        api_wake: &EventFd,
        calls: &Receiver<Call>,
    ) -> Result<StopReason, LoopError> {
        let devices = &self.machine.devices;
        let epoll = Epoll::new()?;
        let add = |fd: i32, data: u64| {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, data),
            )
        };
        add(stop_evt.as_raw_fd(), EV_STOP)?;
        add(devices.reset.as_raw_fd(), EV_RESET)?;
        add(devices.serial_drained.as_raw_fd(), EV_DRAINED)?;
        add(devices.debug_exit.as_raw_fd(), EV_DEBUG_EXIT)?;
        add(api_wake.as_raw_fd(), EV_API)?;
        add(devices.power_off.as_raw_fd(), EV_POWER_OFF)?;
        // A regular file or /dev/null cannot be polled; then the guest simply gets no input.
        let mut stdin_open = add(console::stdin_fd(), EV_STDIN).is_ok();
        let mut pending: Vec<u8> = Vec::new();
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            for event in &events[..n] {
                let devices = &self.machine.devices;
                match event.data() {
                    EV_STOP => {
                        let _ = stop_evt.read();
                        if let Ok(reason) = stops.try_recv() {
                            return Ok(reason);
                        }
                    }
                    EV_RESET => {
                        let _ = devices.reset.read();
                        return Ok(StopReason::Reset);
                    }
                    EV_POWER_OFF => {
                        let _ = devices.power_off.read();
                        return Ok(StopReason::PowerOff);
                    }
                    EV_DEBUG_EXIT => {
                        let value = devices.debug_exit.read()?;
                        return Ok(match DebugExit::status_from_event(value) {
                            0 => StopReason::PowerOff,
                            status => StopReason::Failed(format!(
                                "guest reported failure (status {status} on the debug-exit port)"
                            )),
                        });
                    }
                    EV_STDIN => {
                        let mut buf = [0u8; 256];
                        match console::read_stdin(&mut buf) {
                            Ok(Some(len)) => pending.extend_from_slice(&buf[..len]),
                            Ok(None) | Err(_) => {
                                let _ = epoll.ctl(
                                    ControlOperation::Delete,
                                    console::stdin_fd(),
                                    EpollEvent::default(),
                                );
                                stdin_open = false;
                            }
                        }
                        feed_serial(devices, &mut pending);
                        if !pending.is_empty() && stdin_open {
                            // Hold stdin until the guest drains the FIFO.
                            let _ = epoll.ctl(
                                ControlOperation::Delete,
                                console::stdin_fd(),
                                EpollEvent::default(),
                            );
                        }
                    }
                    EV_DRAINED => {
                        let _ = devices.serial_drained.read();
                        let was_pending = !pending.is_empty();
                        feed_serial(devices, &mut pending);
                        if was_pending && pending.is_empty() && stdin_open {
                            add(console::stdin_fd(), EV_STDIN)?;
                        }
                    }
                    EV_API => {
                        let _ = api_wake.read();
                        while let Ok(call) = calls.try_recv() {
                            let stop = call.request == Request::Shutdown;
                            let reply = call.reply.clone();
                            let progress = move |p: serde_json::Value| {
                                let _ = reply.send(Reply::Progress(p));
                            };
                            let response = self.handle(call.request, &progress);
                            let _ = call.reply.send(Reply::Done(response));
                            if stop {
                                return Ok(StopReason::Requested);
                            }
                            if self.migrated {
                                return Ok(StopReason::Migrated);
                            }
                            if let Some(lost) = self.lost.take() {
                                return Ok(StopReason::Failed(lost));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Answers one API request.
    fn handle(
        &mut self,
        request: Request,
        progress: &(dyn Fn(serde_json::Value) + Sync),
    ) -> Response {
        match request {
            Request::Pause => match self.machine.vcpus.pause() {
                Ok(()) => {
                    self.paused = true;
                    Response::ok(json!({ "state": "paused" }))
                }
                Err(e) => Response::error(e.to_string()),
            },
            Request::Resume => match self.machine.vcpus.resume() {
                Ok(()) => {
                    self.paused = false;
                    Response::ok(json!({ "state": "running" }))
                }
                Err(e) => Response::error(e.to_string()),
            },
            Request::Status => Response::ok(self.status()),
            Request::Stats => Response::ok(self.stats()),
            Request::Snapshot { dir } => self.snapshot(std::path::Path::new(&dir)),
            Request::Identities => self.check_identities(),
            Request::Shutdown => Response::ok(json!({ "state": "stopping" })),
            Request::Migrate {
                dest,
                key,
                downtime_ms,
                max_rounds,
                compress,
                postcopy_after,
            } => {
                let request = MigrateRequest {
                    dest,
                    key: key.into(),
                    downtime: std::time::Duration::from_millis(downtime_ms),
                    max_rounds,
                    compress,
                    postcopy_after,
                };
                let started = Instant::now();
                let result = migrate_on_thread(&mut self.machine, self.paused, &request, progress);
                metrics::MIGRATIONS.record(
                    started.elapsed(),
                    result.as_ref().ok().map(|r| r.bytes_sent),
                );
                match result {
                    Ok(report) => {
                        self.migrated = true;
                        Response::ok(serde_json::to_value(report).unwrap_or_default())
                    }
                    Err(e) => {
                        if e.guest_gone() {
                            self.lost = Some(e.to_string());
                        }
                        Response::error(e.to_string())
                    }
                }
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let meta = &self.machine.meta;
        json!({
            "state": if self.paused { "paused" } else { "running" },
            "vcpus": meta.cpus,
            "mem_bytes": meta.mem,
            "kernel": meta.kernel,
            "cmdline": meta.cmdline,
            "uptime_ms": self.machine.started.elapsed().as_millis() as u64,
            "pid": std::process::id(),
        })
    }

    fn stats(&self) -> serde_json::Value {
        let mut stats = self.status();
        let rollup = smaps_rollup();
        stats["process"] = json!({
            "rss_bytes": rollup.get("Rss").copied().unwrap_or(0),
            "pss_bytes": rollup.get("Pss").copied().unwrap_or(0),
            "anonymous_bytes": rollup.get("Anonymous").copied().unwrap_or(0),
        });
        if let Some(sharing) = &self.sharing {
            stats["sharing"] = sharing.report();
        }
        stats["identities"] =
            serde_json::to_value(self.machine.memory.identities().stats()).unwrap_or_default();
        if let Some(counters) = metrics::counters().as_object() {
            for (key, value) in counters {
                stats[key] = value.clone();
            }
        }
        stats["virtio"] = self.machine.devices.virtio.metrics().into();
        stats
    }

    /// Pauses (if running), compares every current identity with a fresh hash of its page,
    /// and resumes (if it was running).
    fn check_identities(&mut self) -> Response {
        let was_running = !self.paused;
        if was_running {
            if let Err(e) = self.machine.vcpus.pause() {
                return Response::error(e.to_string());
            }
        }
        // No device writes guest memory while the lock is held.
        let virtio = self.machine.devices.virtio.lock();
        let result = self.machine.memory.identities().check();
        drop(virtio);
        if was_running {
            if let Err(e) = self.machine.vcpus.resume() {
                log::error!("resume after the identity check: {e}");
            }
        }
        match result {
            Ok(report) => Response::ok(serde_json::to_value(report).unwrap_or_default()),
            Err(e) => Response::error(e.to_string()),
        }
    }

    /// Pauses (if running), snapshots, and resumes (if it was running), whatever happened.
    fn snapshot(&mut self, dir: &std::path::Path) -> Response {
        let was_running = !self.paused;
        if was_running {
            if let Err(e) = self.machine.vcpus.pause() {
                return Response::error(e.to_string());
            }
        }
        let source = save::Source {
            vm: &self.machine.vm.fd,
            memory: &self.machine.vm.memory,
            identities: self.machine.memory.identities(),
            vcpus: &self.machine.vcpus,
            devices: &self.machine.devices,
            meta: &self.machine.meta,
        };
        let started = Instant::now();
        let vcpus = &self.machine.vcpus;
        let result = save::save(&source, dir, &self.store, &mut self.baseline, || {
            if was_running {
                if let Err(e) = vcpus.resume() {
                    log::error!("resume after snapshot: {e}");
                }
            }
        });
        metrics::SNAPSHOTS.record(
            started.elapsed(),
            result.as_ref().ok().map(|r| r.bytes_written),
        );
        match result {
            Ok(report) => Response::ok(serde_json::to_value(report).unwrap_or_default()),
            Err(e) => Response::error(e.to_string()),
        }
    }
}

/// Runs a migration on a thread of its own, under the migration source's seccomp filter (the
/// main thread's has no network), and waits for it.
fn migrate_on_thread(
    machine: &mut Machine,
    paused: bool,
    request: &MigrateRequest,
    progress: &(dyn Fn(serde_json::Value) + Sync),
) -> Result<source::MigrationReport, source::MigrateError> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("migrate".into())
            .spawn_scoped(scope, move || {
                crate::seccomp::install(crate::seccomp::ThreadKind::MigrationSource)?;
                source::migrate(&*machine, paused, request, progress)
            })
            .map_err(source::MigrateError::Thread)?;
        thread.join().unwrap_or_else(|_| {
            Err(source::MigrateError::Thread(std::io::Error::other(
                "the migration thread panicked",
            )))
        })
    })
}

/// Sizes from /proc/self/smaps_rollup, in bytes.
fn smaps_rollup() -> std::collections::HashMap<String, u64> {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
            Some((key.to_string(), kib * 1024))
        })
        .collect()
}

fn feed_serial(devices: &DeviceManager, pending: &mut Vec<u8>) {
    if pending.is_empty() {
        return;
    }
    let taken = devices
        .serial
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .enqueue_input(pending);
    pending.drain(..taken);
}
