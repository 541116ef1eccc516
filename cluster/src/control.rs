//! Control requests to a host agent, carried on the page-service channel (same key, same
//! MACs and bounds) next to page requests: list the VMs running on the host, a sample of a
//! VM's page keys (for placement), migrate a VM to a destination, start a migration
//! receiver. `fabvm cluster drain` and `pack` are their only users.
//!
//! ```text
//! request   len u32 (1..=MAX_REQUEST) | 1 u32 | JSON ControlRequest [len]
//!           (a page request has 0 in the second word: see `service`)
//! reply     len u32 (1..=MAX_REPLY)   | 1 u32 | JSON ControlReply [len]
//!           a migration sends Progress replies (at least every HEARTBEAT) before its
//!           Migrated or Failed reply; every other request has exactly one reply
//! ```

use std::time::Duration;

use fabric::migration::wire::SERVICE_MAX_IDS;
use serde::{Deserialize, Serialize};

/// The second word of a request or reply: a control message (0 is a page request).
pub const KIND_CONTROL: u32 = 1;
/// Largest control request: what fits a page request's bound.
pub const MAX_REQUEST: usize = SERVICE_MAX_IDS * 32;
/// Largest control reply (under a page reply's bound).
pub const MAX_REPLY: usize = 1 << 20;
/// Most VMs one listing names.
pub const MAX_VMS: usize = 256;
/// Most page keys of one VM sent for placement (a uniform sample past that).
pub const MAX_SAMPLE_KEYS: usize = 32_768;
/// Longest destination address or error text in a message.
pub const MAX_TEXT: usize = 512;
/// Most time between two replies to a migration (progress, or a heartbeat).
pub const HEARTBEAT: Duration = Duration::from_secs(2);

/// Errors decoding a control message.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control message malformed: {0}")]
    Malformed(&'static str),
    #[error("control message malformed")]
    Json(#[source] serde_json::Error),
}

/// What a client asks a host agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// The VMs registered on the host.
    ListVms,
    /// The distinct non-zero page keys of VM `pid` (sampled past [`MAX_SAMPLE_KEYS`]).
    VmKeys { pid: u32 },
    /// Live-migrate VM `pid` to the receiver at `dest` (HOST:PORT) with the agent's key.
    Migrate {
        pid: u32,
        dest: String,
        downtime_ms: u64,
        max_rounds: u32,
    },
    /// Start a migration receiver (`fabvm receive`) on this host and say its port.
    Receive,
}

/// A VM running on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub pid: u32,
    /// Its API socket, when it has one (a VM without one cannot be migrated by the agent).
    pub api_sock: Option<String>,
    /// Guest memory, bytes.
    pub mem: u64,
    /// Distinct non-zero pages in its published identity table (0: none published).
    pub pages: u64,
}

/// What an agent answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlReply {
    Vms {
        vms: Vec<VmInfo>,
    },
    /// `pages` distinct non-zero keys, of which `keys` is all or a uniform sample.
    Keys {
        pages: u64,
        keys: Vec<u64>,
    },
    /// A migration under way (round 0: no report yet, a heartbeat).
    Progress {
        round: u64,
        bytes_sent: u64,
    },
    /// The migration's report (the VM runs at the destination).
    Migrated {
        report: serde_json::Value,
    },
    /// A receiver listens on `port` (at the agent's address); its API socket and console.
    Receiving {
        port: u16,
        pid: u32,
        api_sock: String,
        console: String,
    },
    /// The request failed (one line).
    Failed {
        error: String,
    },
}

/// Encodes a request.
pub fn encode_request(req: &ControlRequest) -> Vec<u8> {
    frame(serde_json::to_vec(req).expect("serializes"))
}

/// Encodes a reply (an over-long one becomes a `Failed` reply saying so).
pub fn encode_reply(reply: &ControlReply) -> Vec<u8> {
    let body = serde_json::to_vec(reply).expect("serializes");
    if body.len() > MAX_REPLY {
        let failed = ControlReply::Failed {
            error: "reply over the bound".into(),
        };
        return frame(serde_json::to_vec(&failed).expect("serializes"));
    }
    frame(body)
}

fn frame(body: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&KIND_CONTROL.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Whether a request or reply payload is a control message (its second word).
pub fn is_control(b: &[u8]) -> bool {
    b.get(4..8) == Some(&KIND_CONTROL.to_le_bytes()[..])
}

fn body(b: &[u8], max: usize) -> Result<&[u8], ControlError> {
    if b.len() < 8 || !is_control(b) {
        return Err(ControlError::Malformed("not a control message"));
    }
    let len = u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > max {
        return Err(ControlError::Malformed("length out of range"));
    }
    if b.len() != 8 + len {
        return Err(ControlError::Malformed("length"));
    }
    Ok(&b[8..])
}

/// Decodes a request, bounded, its texts checked.
pub fn decode_request(b: &[u8]) -> Result<ControlRequest, ControlError> {
    let req: ControlRequest =
        serde_json::from_slice(body(b, MAX_REQUEST)?).map_err(ControlError::Json)?;
    if let ControlRequest::Migrate { dest, .. } = &req {
        if dest.is_empty() || dest.len() > MAX_TEXT {
            return Err(ControlError::Malformed("destination address"));
        }
    }
    Ok(req)
}

/// Decodes a reply, bounded, its lists and texts checked.
pub fn decode_reply(b: &[u8]) -> Result<ControlReply, ControlError> {
    let reply: ControlReply =
        serde_json::from_slice(body(b, MAX_REPLY)?).map_err(ControlError::Json)?;
    match &reply {
        ControlReply::Vms { vms } if vms.len() > MAX_VMS => {
            Err(ControlError::Malformed("too many VMs"))
        }
        ControlReply::Keys { keys, .. } if keys.len() > MAX_SAMPLE_KEYS => {
            Err(ControlError::Malformed("too many keys"))
        }
        ControlReply::Failed { error } if error.len() > MAX_TEXT => {
            Err(ControlError::Malformed("error text"))
        }
        _ => Ok(reply),
    }
}

/// At most `max` of `keys` (distinct), a uniform sample past that: the keys below a
/// threshold in key space (keys are blake3 prefixes, so uniform), so two VMs' samples
/// agree on the keys they share below the lower of their thresholds.
pub fn sample_keys(mut keys: Vec<u64>, max: usize) -> Vec<u64> {
    if keys.len() <= max {
        return keys;
    }
    let threshold = ((u64::MAX as f64) * (max as f64 / keys.len() as f64)) as u64;
    keys.retain(|&k| k < threshold);
    keys.sort_unstable();
    keys.truncate(max);
    keys
}

/// An error text cut to [`MAX_TEXT`] bytes (at a character boundary).
pub fn short_text(s: &str) -> String {
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let reqs = [
            ControlRequest::ListVms,
            ControlRequest::VmKeys { pid: 7 },
            ControlRequest::Migrate {
                pid: 7,
                dest: "10.0.0.2:7000".into(),
                downtime_ms: 100,
                max_rounds: 30,
            },
            ControlRequest::Receive,
        ];
        for r in reqs {
            let b = encode_request(&r);
            assert!(is_control(&b));
            assert_eq!(decode_request(&b).unwrap(), r);
        }
        let replies = [
            ControlReply::Vms {
                vms: vec![VmInfo {
                    pid: 1,
                    api_sock: Some("/a.sock".into()),
                    mem: 1 << 30,
                    pages: 10,
                }],
            },
            ControlReply::Keys {
                pages: 3,
                keys: vec![1, 2, u64::MAX],
            },
            ControlReply::Progress {
                round: 1,
                bytes_sent: 5,
            },
            ControlReply::Failed { error: "no".into() },
        ];
        for r in replies {
            assert_eq!(decode_reply(&encode_reply(&r)).unwrap(), r);
        }
    }

    #[test]
    fn hostile_messages_are_refused() {
        let good = encode_request(&ControlRequest::ListVms);
        let mut bad = good.clone();
        bad[0] ^= 1; // length
        assert!(decode_request(&bad).is_err());
        assert!(decode_request(&good[..good.len() - 1]).is_err());
        assert!(decode_request(&frame(b"{\"op\":\"reboot\"}".to_vec())).is_err());
        assert!(decode_request(&frame(b"{\"op\":\"vm_keys\"}".to_vec())).is_err());
        assert!(decode_request(&frame(b"{\"op\":\"vm_keys\",\"pid\":-1}".to_vec())).is_err());
        let long = ControlRequest::Migrate {
            pid: 1,
            dest: "x".repeat(MAX_TEXT + 1),
            downtime_ms: 1,
            max_rounds: 1,
        };
        assert!(decode_request(&encode_request(&long)).is_err());
        let too_big = frame(vec![b' '; MAX_REQUEST + 1]);
        assert!(matches!(
            decode_request(&too_big),
            Err(ControlError::Malformed(_))
        ));
        let many = ControlReply::Keys {
            pages: 1,
            keys: vec![1; MAX_SAMPLE_KEYS + 1],
        };
        assert!(decode_reply(&encode_reply(&many)).is_err());
        // A page request is not a control message.
        assert!(!is_control(&crate::service::encode_request(&[
            fabric::PageId([1; 32])
        ])));
    }

    #[test]
    fn samples_are_bounded_uniform_and_consistent() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let keys: Vec<u64> = (0..100_000).map(|_| next()).collect();
        let s = sample_keys(keys.clone(), 10_000);
        assert!(s.len() <= 10_000 && s.len() > 9_000, "{}", s.len());
        // A smaller VM holding half of the keys: its sample (a higher threshold) contains
        // every key of the big sample that it holds.
        let half: Vec<u64> = keys[..50_000].to_vec();
        let hs: std::collections::HashSet<u64> =
            sample_keys(half.clone(), 10_000).into_iter().collect();
        let half: std::collections::HashSet<u64> = half.into_iter().collect();
        let held = s.iter().filter(|k| half.contains(k)).count();
        let found = s.iter().filter(|k| hs.contains(k)).count();
        assert!(held > 4_000 && held == found, "{held} {found}");
        assert_eq!(sample_keys(vec![3, 1], 5), vec![3, 1]);
    }
}
