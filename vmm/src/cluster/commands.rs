//! `fabvm cluster hosts` and `fabvm cluster place`: read the registry (every call within
//! [`super::ETCD_TIMEOUT`], so an unreachable etcd is one line and a non-zero exit within a
//! few seconds) and print a table, or one line of JSON with `--json`.

use std::path::Path;

use cluster::place::{rank, Placement, W_CPU, W_HELD, W_MEM};
use cluster::record::unix_ms;
use cluster::registry::RegistryError;
use cluster::{HostRecord, Registry};
use fabric::live::key_of;
use fabric::PAGE_SIZE;
use serde_json::{json, Value};

use super::ETCD_TIMEOUT;
use crate::api::{client, Request};
use crate::cli::{ClusterArgs, ClusterOp};

/// Errors of `fabvm cluster`.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("--etcd URL is required (or FABVM_ETCD)")]
    NoEtcd,
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("snapshot {0}: {1}")]
    Snapshot(String, String),
    #[error("VM at {0}: {1}")]
    Vm(String, String),
    #[error("--key FILE is required (the agents' key)")]
    NoKey,
    #[error("{0}")]
    Key(String),
    #[error("no live host named {0:?} (live: {1})")]
    UnknownHost(String, String),
    /// An agent refused or could not be reached.
    #[error("{0}")]
    Agent(String),
    /// Some VMs did not move: `report` is printed before `line`.
    #[error("{line}")]
    Incomplete { report: String, line: String },
}

/// Runs a `fabvm cluster` command; returns what to print.
pub fn run(args: &ClusterArgs) -> Result<String, CommandError> {
    let etcd = args
        .etcd
        .clone()
        .or_else(|| std::env::var("FABVM_ETCD").ok())
        .ok_or(CommandError::NoEtcd)?;
    match &args.op {
        ClusterOp::Hosts => {
            let hosts = Registry::connect(&etcd, ETCD_TIMEOUT)?.hosts()?;
            Ok(if args.json {
                hosts_json(&hosts)
            } else {
                hosts_table(&hosts)
            })
        }
        ClusterOp::Place {
            snapshot,
            api_sock,
            mem,
        } => {
            let (keys, guest_mem) = match (snapshot, api_sock) {
                (Some(dir), _) => snapshot_keys(dir)?,
                (None, Some(sock)) => vm_keys(sock)?,
                (None, None) => unreachable!("clap requires one"),
            };
            let mem = mem.unwrap_or(guest_mem);
            let hosts = Registry::connect(&etcd, ETCD_TIMEOUT)?.hosts_with_summaries()?;
            let ranked = rank(&hosts, &keys, mem);
            Ok(if args.json {
                json!({"pages": keys.len(), "mem": mem, "score": SCORE, "hosts": ranked})
                    .to_string()
            } else {
                place_table(&ranked, keys.len(), mem)
            })
        }
        ClusterOp::Drain {
            host,
            placement,
            seed,
            moves,
        } => super::drain::drain(
            &etcd,
            args.key.as_deref(),
            host,
            *placement,
            *seed,
            moves,
            args.json,
        ),
        ClusterOp::Pack { moves } => {
            super::drain::pack(&etcd, args.key.as_deref(), moves, args.json)
        }
    }
}

const SCORE: &str =
    "score = 0.7 held + 0.2 (available - needed) / total memory + 0.1 (1 - VMs / CPUs); \
held = share of the VM's distinct non-zero pages in the host's summary, corrected for its \
false-positive rate; hosts without room rank last";

/// Distinct non-zero page keys of a snapshot's manifest, and its memory size.
fn snapshot_keys(dir: &Path) -> Result<(Vec<u64>, u64), CommandError> {
    let err = |e: &dyn std::fmt::Display| {
        CommandError::Snapshot(dir.display().to_string(), e.to_string())
    };
    let loaded = crate::snapshot::restore::load(dir).map_err(|e| err(&e))?;
    let ids = loaded.manifest.distinct_ids();
    let mem = loaded.manifest.total_pages() * PAGE_SIZE as u64;
    Ok((ids.into_iter().map(|id| key_of(Some(id))).collect(), mem))
}

/// Distinct non-zero page keys of a VM running on this host (its published identity table:
/// nothing is hashed here), and its memory size.
fn vm_keys(sock: &Path) -> Result<(Vec<u64>, u64), CommandError> {
    let err =
        |e: &dyn std::fmt::Display| CommandError::Vm(sock.display().to_string(), e.to_string());
    let resp = client::call(sock, &Request::Stats, ETCD_TIMEOUT).map_err(|e| err(&e))?;
    let result = resp.result.unwrap_or(Value::Null);
    let path = result["identities"]["published"]
        .as_str()
        .ok_or_else(|| err(&"publishes no identity table (started with --identities off?)"))?;
    let (keys, pages) = super::control::table_keys(Path::new(path)).map_err(|e| err(&e))?;
    let mem = pages * PAGE_SIZE as u64;
    Ok((keys.into_iter().collect(), mem))
}

fn hosts_json(hosts: &[HostRecord]) -> String {
    let now = unix_ms();
    let list: Vec<Value> = hosts
        .iter()
        .map(|h| {
            let mut v = serde_json::to_value(h).unwrap_or_default();
            v["summary_age_ms"] = summary_age(h, now).map_or(Value::Null, Value::from);
            v
        })
        .collect();
    json!({ "hosts": list }).to_string()
}

fn summary_age(h: &HostRecord, now: u64) -> Option<u64> {
    (h.summary_generation > 0).then(|| now.saturating_sub(h.summary_unix_ms))
}

fn hosts_table(hosts: &[HostRecord]) -> String {
    let now = unix_ms();
    let mut out = format!(
        "{:<16} {:<22} {:>10} {:>5} {:>4} {:>12} {:>11}\n",
        "NAME", "ADDRESS", "MEM FREE", "CPUS", "VMS", "PAGES HELD", "SUMMARY AGE"
    );
    for h in hosts {
        let age = summary_age(h, now).map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1e3));
        out += &format!(
            "{:<16} {:<22} {:>10} {:>5} {:>4} {:>12} {:>11}\n",
            h.name,
            h.addr,
            size(h.mem_available),
            h.cpus,
            h.vms,
            h.pages_held,
            age
        );
    }
    if hosts.is_empty() {
        out += "(no live hosts)\n";
    }
    out.trim_end().to_string()
}

fn place_table(ranked: &[Placement], pages: usize, mem: u64) -> String {
    let mut out = format!(
        "{pages} distinct non-zero pages, {} of memory\n{:<4} {:<16} {:<22} {:>7} {:>6} {:>10} {:>5} {:>4} {:>6}\n",
        size(mem), "RANK", "NAME", "ADDRESS", "HELD", "SCORE", "MEM FREE", "CPUS", "VMS", "FITS"
    );
    for (i, p) in ranked.iter().enumerate() {
        let held = if p.summary {
            format!("{:.1}%", p.held * 100.0)
        } else {
            "-".into()
        };
        out += &format!(
            "{:<4} {:<16} {:<22} {:>7} {:>6.3} {:>10} {:>5} {:>4} {:>6}\n",
            i + 1,
            p.name,
            p.addr,
            held,
            p.score,
            size(p.mem_available),
            p.cpus,
            p.vms,
            if p.fits { "yes" } else { "no" }
        );
    }
    if ranked.is_empty() {
        out += "(no live hosts)\n";
    }
    out += &format!(
        "score = {W_HELD} held + {W_MEM} memory left + {W_CPU} CPU free (docs/cluster.md)"
    );
    out
}

fn size(bytes: u64) -> String {
    format!("{:.1}G", bytes as f64 / (1u64 << 30) as f64)
}
