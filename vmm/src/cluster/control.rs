//! The host agent's answers to control requests ([`cluster::control`], on the page-service
//! channel, same key): the VMs registered on this host (`host_index::running_vms`, with
//! their API sockets and page counts from their published identity tables), a VM's page
//! keys, a migration of one of them (through its API socket, with the agent's key file;
//! progress relayed, a heartbeat at least every [`HEARTBEAT`]), and a migration receiver
//! started as a child (`fabvm receive` on a free port at the agent's address, its console
//! and log under [`vm_dir`]; it outlives the agent).

use std::collections::HashSet;
use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cluster::control::{
    sample_keys, short_text, ControlReply, ControlRequest, VmInfo, HEARTBEAT, MAX_SAMPLE_KEYS,
    MAX_VMS,
};
use cluster::service::{Reply, ServiceError};
use fabric::live::{key_of, TableReader};
use serde_json::Value;

use crate::api::{client, Request};
use crate::cli::ServeArgs;
use crate::failpoint::failpoint;
use crate::host_index::{registry_dir, running_vms, table_path};

/// Longest a migration started here may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a receiver started here waits for its source before it exits.
const RECEIVER_ACCEPT_S: u64 = 120;
/// How long the agent waits for a receiver it started to listen.
const RECEIVER_READY: Duration = Duration::from_secs(8);

/// Where receivers started by the agent keep their API socket, console and log:
/// `received/` next to the VM registry.
pub fn vm_dir() -> PathBuf {
    registry_dir().with_file_name("received")
}

/// What the agent needs to answer control requests.
#[derive(Debug, Clone)]
pub struct Control {
    key_file: PathBuf,
    store: Option<PathBuf>,
    ip: Option<IpAddr>,
}

impl Control {
    pub fn new(args: &ServeArgs) -> Control {
        let ip = args
            .listen
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .map(|a| a.ip());
        Control {
            key_file: std::path::absolute(&args.key).unwrap_or_else(|_| args.key.clone()),
            store: args
                .store
                .as_ref()
                .map(|s| std::path::absolute(s).unwrap_or_else(|_| s.clone())),
            ip,
        }
    }

    /// Answers one request through `reply`.
    pub fn handle(&self, req: ControlRequest, reply: &mut Reply<'_>) -> Result<(), ServiceError> {
        let failed = |error: String| ControlReply::Failed {
            error: short_text(&error),
        };
        match req {
            ControlRequest::ListVms => reply(&ControlReply::Vms { vms: list_vms() }),
            ControlRequest::VmKeys { pid } => reply(&match vm_keys(pid) {
                Ok((pages, keys)) => ControlReply::Keys { pages, keys },
                Err(e) => failed(e),
            }),
            ControlRequest::Migrate {
                pid,
                dest,
                downtime_ms,
                max_rounds,
            } => self.migrate(pid, dest, downtime_ms, max_rounds, reply),
            ControlRequest::Receive => {
                failpoint("agent-receive");
                reply(&self.receive().unwrap_or_else(failed))
            }
        }
    }

    /// Migrates VM `pid` through its API socket, relaying its progress.
    fn migrate(
        &self,
        pid: u32,
        dest: String,
        downtime_ms: u64,
        max_rounds: u32,
        reply: &mut Reply<'_>,
    ) -> Result<(), ServiceError> {
        let Some(vm) = running_vms(None).into_iter().find(|v| v.pid == pid) else {
            return reply(&ControlReply::Failed {
                error: format!("no VM with pid {pid} runs on this host"),
            });
        };
        let Some(sock) = vm.api_sock else {
            return reply(&ControlReply::Failed {
                error: format!("VM {pid} has no API socket"),
            });
        };
        let request = Request::Migrate {
            dest,
            key: self.key_file.display().to_string(),
            downtime_ms,
            max_rounds,
            compress: true,
            postcopy_after: None,
        };
        log::info!("control: migrating VM {pid} ({})", sock.display());
        let (tx, rx) = mpsc::channel::<Value>();
        // If the client goes away, the migration goes on (its own rules keep the VM safe).
        let worker = std::thread::spawn(move || {
            client::call_with_progress(&sock, &request, MIGRATE_TIMEOUT, |p| {
                let _ = tx.send(p.clone());
            })
        });
        loop {
            let progress = match rx.recv_timeout(HEARTBEAT) {
                Ok(p) => ControlReply::Progress {
                    round: p["round"].as_u64().unwrap_or(0),
                    bytes_sent: p["bytes_sent"].as_u64().unwrap_or(0),
                },
                Err(mpsc::RecvTimeoutError::Timeout) => ControlReply::Progress {
                    round: 0,
                    bytes_sent: 0,
                },
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            reply(&progress)?;
        }
        let done = match worker.join() {
            Ok(Ok(resp)) if resp.ok => ControlReply::Migrated {
                report: resp.result.unwrap_or_default(),
            },
            Ok(Ok(resp)) => ControlReply::Failed {
                error: short_text(resp.error.as_deref().unwrap_or("migration failed")),
            },
            Ok(Err(e)) => ControlReply::Failed {
                error: short_text(&e.to_string()),
            },
            Err(_) => ControlReply::Failed {
                error: "the migration's client panicked".into(),
            },
        };
        log::info!("control: migration of VM {pid}: {done:?}");
        reply(&done)
    }

    /// Starts `fabvm receive` on a free port at the agent's address and waits until it
    /// listens.
    fn receive(&self) -> Result<ControlReply, String> {
        let ip = self
            .ip
            .ok_or("the agent's --listen address does not resolve")?;
        let port = TcpListener::bind(SocketAddr::new(ip, 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let dir = vm_dir();
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let base = dir.join(format!("recv-{port}"));
        let (sock, console, log) = (
            base.with_extension("sock"),
            base.with_extension("console"),
            base.with_extension("log"),
        );
        let open = |p: &Path| File::create(p).map_err(|e| format!("{}: {e}", p.display()));
        let exe = std::env::current_exe().map_err(|e| format!("fabvm's own path: {e}"))?;
        let mut cmd = Command::new(exe);
        cmd.arg("receive")
            .args(["--listen", &SocketAddr::new(ip, port).to_string()])
            .arg("--key")
            .arg(&self.key_file)
            .arg("--api-sock")
            .arg(&sock)
            .args(["--accept-timeout", &RECEIVER_ACCEPT_S.to_string()]);
        if let Some(store) = &self.store {
            cmd.arg("--store").arg(store);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(open(&console)?)
            .stderr(open(&log)?)
            .spawn()
            .map_err(|e| format!("cannot start fabvm receive: {e}"))?;
        let deadline = Instant::now() + RECEIVER_READY;
        loop {
            if listening(port) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let last = std::fs::read_to_string(&log).unwrap_or_default();
                let last = last.lines().last().unwrap_or("").to_string();
                return Err(format!("fabvm receive exited ({status}): {last}"));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "fabvm receive did not listen within {RECEIVER_READY:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = child.id();
        log::info!("control: receiver {pid} listening on port {port}");
        // Reaped when it ends (the VM it receives stops, or no source came).
        std::thread::spawn(move || {
            let status = child.wait();
            log::info!("control: receiver {pid} ended: {status:?}");
        });
        Ok(ControlReply::Receiving {
            port,
            pid,
            api_sock: sock.display().to_string(),
            console: console.display().to_string(),
        })
    }
}

/// The VMs registered here (at most [`MAX_VMS`]).
fn list_vms() -> Vec<VmInfo> {
    running_vms(None)
        .into_iter()
        .take(MAX_VMS)
        .map(|vm| VmInfo {
            pid: vm.pid,
            api_sock: vm.api_sock.map(|p| short_text(&p.display().to_string())),
            mem: vm.regions.iter().map(|r| r.len).sum(),
            pages: table_keys(&table_path(vm.pid)).map_or(0, |(k, _)| k.len() as u64),
        })
        .collect()
}

/// VM `pid`'s distinct non-zero page keys (sampled past [`MAX_SAMPLE_KEYS`]) and their count.
fn vm_keys(pid: u32) -> Result<(u64, Vec<u64>), String> {
    if !running_vms(None).iter().any(|v| v.pid == pid) {
        return Err(format!("no VM with pid {pid} runs on this host"));
    }
    let (keys, _) = table_keys(&table_path(pid))?;
    let pages = keys.len() as u64;
    Ok((
        pages,
        sample_keys(keys.into_iter().collect(), MAX_SAMPLE_KEYS),
    ))
}

/// The distinct non-zero page keys in an identity table, and the pages it covers (a table
/// being rewritten is read again, a few times).
pub fn table_keys(path: &Path) -> Result<(HashSet<u64>, u64), String> {
    let table = TableReader::open(path).map_err(|e| e.to_string())?;
    let mut entries = Vec::new();
    'again: for _ in 0..5 {
        let mut keys = HashSet::new();
        for chunk in 0..table.chunks() {
            if table.read_chunk(chunk, &mut entries).is_none() {
                std::thread::sleep(Duration::from_millis(50));
                continue 'again;
            }
            keys.extend(
                entries
                    .iter()
                    .filter_map(|e| e.id)
                    .map(|id| key_of(Some(id))),
            );
        }
        return Ok((keys, table.pages() as u64));
    }
    Err("its identity table is being rewritten; try again".into())
}

/// Whether something listens on TCP `port` in this network namespace.
fn listening(port: u16) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|text| {
            text.lines().skip(1).any(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                fields.len() > 3
                    && fields[3] == "0A"
                    && fields[1]
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listening_port_is_seen_and_a_closed_one_is_not() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(listening(port));
        drop(listener);
        assert!(!listening(port));
    }

    #[test]
    fn receivers_live_next_to_the_vm_registry() {
        assert_eq!(vm_dir().parent(), registry_dir().parent());
        assert!(vm_dir().ends_with("received"));
    }
}
