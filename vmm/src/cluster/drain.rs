//! `fabvm cluster drain HOST` and `fabvm cluster pack`: ask the agents (control requests on
//! the page-service channel, [`cluster::control`]) for their VMs and a sample of each VM's
//! page keys, plan with [`cluster::plan`], then move the VMs one after the other: the
//! destination's agent starts a receiver, the source's agent migrates the VM to it. A VM
//! whose migration fails stays where it ran (the migration's own rule); the others go on,
//! and the command ends with exit 1 when any failed.

use std::path::Path;
use std::time::{Duration, Instant};

use cluster::control::{ControlReply, ControlRequest};
use cluster::plan::{plan_drain, plan_pack, Move, Strategy, Vm};
use cluster::{Bloom, HostRecord, PageClient, Registry};
use fabric::migration::MigrationKey;
use serde::Serialize;
use serde_json::{json, Value};

use super::commands::CommandError;
use super::ETCD_TIMEOUT;
use crate::cli::{MoveArgs, PlacementArg};
use crate::migration::read_key;

/// How long a control request may go without an answer (a migration answers at least every
/// `control::HEARTBEAT`; starting a receiver takes a few seconds).
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// How one VM's move went.
#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    #[serde(flatten)]
    pub plan: Move,
    pub ok: bool,
    pub error: Option<String>,
    /// Bytes the source sent, and the migration's time (from its report).
    pub bytes: u64,
    pub ms: f64,
    /// The VM at its destination: its process (the receiver the agent started), API socket
    /// and console (files on that host).
    pub dest_pid: Option<u32>,
    pub api_sock: Option<String>,
    pub console: Option<String>,
    pub report: Option<Value>,
}

/// `drain HOST`.
pub fn drain(
    etcd: &str,
    key_file: Option<&Path>,
    host: &str,
    placement: PlacementArg,
    seed: Option<u64>,
    moves: &MoveArgs,
    json: bool,
) -> Result<String, CommandError> {
    let key = key(key_file)?;
    let hosts = Registry::connect(etcd, ETCD_TIMEOUT)?.hosts_with_summaries()?;
    let source = find(&hosts, host)?;
    let vms = list_vms(source, &key)?;
    let strategy = match placement {
        PlacementArg::Overlap => Strategy::Overlap,
        PlacementArg::Random => Strategy::Random(seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })),
    };
    let plan = plan_drain(host, &vms, &hosts, strategy);
    let mut head = json!({
        "host": host,
        "placement": format!("{placement:?}").to_lowercase(),
        "dry_run": moves.dry_run,
    });
    if moves.dry_run {
        head["moves"] = serde_json::to_value(&plan).unwrap_or_default();
        return Ok(if json {
            head.to_string()
        } else {
            plan_table(&format!("drain {host}: plan"), &plan)
        });
    }
    let started = Instant::now();
    let done = execute(&plan, &hosts, &key, moves, json);
    head["wall_ms"] = (started.elapsed().as_secs_f64() * 1000.0).into();
    finish(head, &done, json, &format!("drain {host}"))
}

/// `pack`.
pub fn pack(
    etcd: &str,
    key_file: Option<&Path>,
    moves: &MoveArgs,
    json: bool,
) -> Result<String, CommandError> {
    let key = key(key_file)?;
    let hosts = Registry::connect(etcd, ETCD_TIMEOUT)?.hosts_with_summaries()?;
    let mut vms = Vec::new();
    let (mut answered, mut silent) = (Vec::new(), Vec::new());
    for (h, summary) in &hosts {
        // A host whose agent does not answer keeps its VMs, stays on and takes none.
        match list_vms(h, &key) {
            Ok(listed) => {
                vms.extend(listed);
                answered.push((h.clone(), summary.clone()));
            }
            Err(e) => silent.push((h.name.clone(), e.to_string())),
        }
    }
    if answered.is_empty() && !silent.is_empty() {
        return Err(CommandError::Agent(format!(
            "no agent answered ({})",
            silent[0].1
        )));
    }
    for (name, e) in &silent {
        log::warn!("{e}; host {name} stays on");
    }
    let hosts = answered;
    let mut plan = plan_pack(&vms, &hosts);
    plan.keep.extend(silent.into_iter().map(|(name, _)| name));
    plan.keep.sort();
    let mut head = json!({
        "dry_run": moves.dry_run,
        "hosts": hosts.len(),
        "switch_off": plan.switch_off,
        "keep": plan.keep,
    });
    if moves.dry_run {
        head["moves"] = serde_json::to_value(&plan.moves).unwrap_or_default();
        return Ok(if json {
            head.to_string()
        } else {
            format!(
                "{}\nswitch off: {}\nkeep on: {}",
                plan_table("pack: plan", &plan.moves),
                names(&plan.switch_off),
                names(&plan.keep)
            )
        });
    }
    let started = Instant::now();
    let done = execute(&plan.moves, &hosts, &key, moves, json);
    head["wall_ms"] = (started.elapsed().as_secs_f64() * 1000.0).into();
    // A host can go off only when every VM planned off it left.
    let off: Vec<&String> = plan
        .switch_off
        .iter()
        .filter(|h| done.iter().all(|m| &m.plan.from != *h || m.ok))
        .collect();
    head["switch_off"] = json!(off);
    let line = format!(
        "switch off: {}",
        names(&off.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    );
    finish(head, &done, json, "pack").map(|text| {
        if json {
            text
        } else {
            format!("{text}\n{line}")
        }
    })
}

fn key(key_file: Option<&Path>) -> Result<MigrationKey, CommandError> {
    let file = key_file.ok_or(CommandError::NoKey)?;
    read_key(file).map_err(|e| CommandError::Key(e.to_string()))
}

fn find<'a>(
    hosts: &'a [(HostRecord, Option<Bloom>)],
    name: &str,
) -> Result<&'a HostRecord, CommandError> {
    hosts
        .iter()
        .map(|(h, _)| h)
        .find(|h| h.name == name)
        .ok_or_else(|| {
            let live: Vec<String> = hosts.iter().map(|(h, _)| h.name.clone()).collect();
            CommandError::UnknownHost(name.into(), names(&live))
        })
}

fn names(list: &[String]) -> String {
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

/// One control request to `host`'s agent on a connection of its own.
fn ask(
    host: &HostRecord,
    key: &MigrationKey,
    req: &ControlRequest,
    progress: impl FnMut(&ControlReply),
) -> Result<ControlReply, String> {
    let mut client = PageClient::connect(&host.addr, key, CONTROL_TIMEOUT)
        .map_err(|e| format!("host {}'s agent: {e}", host.name))?;
    match client.control(req, progress) {
        Ok(ControlReply::Failed { error }) => Err(format!("host {}: {error}", host.name)),
        Ok(reply) => Ok(reply),
        Err(e) => Err(format!("host {}'s agent: {e}", host.name)),
    }
}

/// The VMs of `host`, each with a sample of its page keys.
fn list_vms(host: &HostRecord, key: &MigrationKey) -> Result<Vec<Vm>, CommandError> {
    let err = CommandError::Agent;
    let listed = match ask(host, key, &ControlRequest::ListVms, |_| {}).map_err(err)? {
        ControlReply::Vms { vms } => vms,
        other => return Err(err(format!("host {}: answered {other:?}", host.name))),
    };
    let mut vms = Vec::new();
    for vm in listed {
        let keys = match ask(host, key, &ControlRequest::VmKeys { pid: vm.pid }, |_| {}) {
            Ok(ControlReply::Keys { keys, .. }) => keys,
            // Gone meanwhile, or no identities published: placed by memory and CPU only.
            _ => Vec::new(),
        };
        vms.push(Vm {
            host: host.name.clone(),
            pid: vm.pid,
            mem: vm.mem,
            pages: vm.pages,
            keys,
        });
    }
    Ok(vms)
}

/// Moves the VMs of `plan` one after the other, with a line per VM on stderr (unless
/// `quiet`).
fn execute(
    plan: &[Move],
    hosts: &[(HostRecord, Option<Bloom>)],
    key: &MigrationKey,
    args: &MoveArgs,
    quiet: bool,
) -> Vec<Moved> {
    let say = |line: String| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    let n = plan.len();
    let mut done = Vec::new();
    for (i, mv) in plan.iter().enumerate() {
        let to = mv.to.as_deref().unwrap_or("-");
        say(format!(
            "[{}/{n}] VM {} ({} MiB) {} -> {to} ({:.0}% of its pages there): migrating",
            i + 1,
            mv.pid,
            mv.mem >> 20,
            mv.from,
            mv.held * 100.0
        ));
        let started = Instant::now();
        let mut moved = Moved {
            plan: mv.clone(),
            ok: false,
            error: None,
            bytes: 0,
            ms: 0.0,
            dest_pid: None,
            api_sock: None,
            console: None,
            report: None,
        };
        let mut progress = |p: &ControlReply| {
            if let ControlReply::Progress { round, bytes_sent } = p {
                if *round > 0 {
                    say(format!(
                        "[{}/{n}] VM {}: round {round}, {:.1} MB sent",
                        i + 1,
                        mv.pid,
                        *bytes_sent as f64 / 1e6
                    ));
                }
            }
        };
        match move_one(mv, hosts, key, args, &mut moved, &mut progress) {
            Ok(()) => moved.ok = true,
            Err(e) => moved.error = Some(e),
        }
        if moved.ms == 0.0 {
            moved.ms = started.elapsed().as_secs_f64() * 1000.0;
        }
        say(match &moved.error {
            None => format!(
                "[{}/{n}] VM {} -> {to}: moved, {:.1} MB in {:.2} s",
                i + 1,
                mv.pid,
                moved.bytes as f64 / 1e6,
                moved.ms / 1000.0
            ),
            Some(e) => format!(
                "[{}/{n}] VM {}: FAILED, it stays on {}: {e}",
                i + 1,
                mv.pid,
                mv.from
            ),
        });
        done.push(moved);
    }
    done
}

/// Starts a receiver at the destination and has the source's agent migrate the VM to it.
fn move_one(
    mv: &Move,
    hosts: &[(HostRecord, Option<Bloom>)],
    key: &MigrationKey,
    args: &MoveArgs,
    out: &mut Moved,
    progress: &mut dyn FnMut(&ControlReply),
) -> Result<(), String> {
    let host = |name: &str| {
        hosts
            .iter()
            .map(|(h, _)| h)
            .find(|h| h.name == name)
            .ok_or_else(|| format!("host {name} is gone"))
    };
    let to = mv.to.as_deref().ok_or("no live host has room for it")?;
    let (source, dest) = (host(&mv.from)?, host(to)?);
    let (port, pid, api_sock, console) = match ask(dest, key, &ControlRequest::Receive, |_| {})? {
        ControlReply::Receiving {
            port,
            pid,
            api_sock,
            console,
        } => (port, pid, api_sock, console),
        other => return Err(format!("host {to}: answered {other:?}")),
    };
    let ip = dest.addr.rsplit_once(':').map_or("", |(ip, _)| ip);
    let req = ControlRequest::Migrate {
        pid: mv.pid,
        dest: format!("{ip}:{port}"),
        downtime_ms: args.downtime_ms,
        max_rounds: args.max_rounds,
    };
    match ask(source, key, &req, progress)? {
        ControlReply::Migrated { report } => {
            out.bytes = report["bytes_sent"].as_u64().unwrap_or(0);
            out.ms = report["total_ms"].as_f64().unwrap_or(0.0);
            out.report = Some(report);
            out.dest_pid = Some(pid);
            out.api_sock = Some(api_sock);
            out.console = Some(console);
            Ok(())
        }
        other => Err(format!("host {}: answered {other:?}", mv.from)),
    }
}

/// The report, and an error when any VM failed to move.
fn finish(mut head: Value, done: &[Moved], json: bool, what: &str) -> Result<String, CommandError> {
    let moved = done.iter().filter(|m| m.ok).count();
    let failed = done.len() - moved;
    let bytes: u64 = done.iter().map(|m| m.bytes).sum();
    let ms: f64 = done.iter().map(|m| m.ms).sum();
    head["moves"] = serde_json::to_value(done).unwrap_or_default();
    head["moved"] = moved.into();
    head["failed"] = failed.into();
    head["bytes"] = bytes.into();
    head["ms"] = ms.into();
    let wall = head["wall_ms"].as_f64().unwrap_or(ms);
    let text = if json {
        head.to_string()
    } else {
        format!(
            "{what}: {moved} of {} VMs moved, {:.1} MB sent, {:.2} s in migrations, {:.2} s in all{}",
            done.len(),
            bytes as f64 / 1e6,
            ms / 1000.0,
            wall / 1000.0,
            if failed > 0 {
                format!(", {failed} failed (still on their hosts)")
            } else {
                String::new()
            }
        )
    };
    if failed > 0 {
        let first = done
            .iter()
            .find_map(|m| m.error.as_ref())
            .cloned()
            .unwrap_or_default();
        return Err(CommandError::Incomplete {
            report: text,
            line: format!("{what}: {failed} of {} VMs not moved ({first})", done.len()),
        });
    }
    Ok(text)
}

fn plan_table(title: &str, plan: &[Move]) -> String {
    let mut out = format!(
        "{title}\n{:<8} {:<16} {:<16} {:>9} {:>7} {:>6}\n",
        "VM", "FROM", "TO", "MEM", "HELD", "SCORE"
    );
    for m in plan {
        out += &format!(
            "{:<8} {:<16} {:<16} {:>8}M {:>6.1}% {:>6.3}\n",
            m.pid,
            m.from,
            m.to.as_deref().unwrap_or("(no room)"),
            m.mem >> 20,
            m.held * 100.0,
            m.score
        );
    }
    if plan.is_empty() {
        out += "(no VMs to move)\n";
    }
    out.trim_end().to_string()
}
