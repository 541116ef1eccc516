//! The API socket protocol: HTTP/1.1 over a Unix stream socket, JSON bodies, REST resources
//! in the style of Firecracker and Cloud Hypervisor (reference: `docs/api.md`, OpenAPI:
//! `docs/api.yaml`).
//!
//! ```text
//! GET  /vm            -> 200 {"state":"running","vcpus":2,"mem_bytes":268435456,...}
//! PUT  /vm/snapshot   {"dir":"/var/tmp/snap1"}
//!                     -> 200 {"dir":"/var/tmp/snap1","pages":65536,"new_pages":64512,...}
//! PUT  /vm/migrate    {"dest":"10.0.0.2:7777","key":"/etc/fabvm/key"}   (Accept: application/x-ndjson)
//!                     -> 200, chunked: {"progress":{...}} lines, then {"result":{...}}
//! GET  /metrics       -> 200 Prometheus text
//! GET  /frobnicate    -> 404 {"error":"no resource /frobnicate"}
//! ```
//!
//! [`routes::ROUTES`] is the table of resources; each makes one [`Request`], which the VMM's
//! event loop answers with a [`Response`]. Bodies longer than [`MAX_BODY`] are refused (413).
//! `fabvm ctl` speaks this protocol; so does `curl --unix-socket PATH http://localhost/vm`.

pub mod client;
pub mod routes;
pub mod server;

use serde::{Deserialize, Serialize};

/// Longest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// Content type of JSON answers.
pub const JSON: &str = "application/json";

/// Content type of streamed answers (one JSON object a line).
pub const NDJSON: &str = "application/x-ndjson";

/// A request to the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Take every vCPU out of the guest.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// Run state, vCPUs, memory, uptime.
    Status,
    /// Figures: VMM memory, guest memory, snapshot counts (JSON).
    Stats,
    /// Snapshot the VM into a directory (its pages go into the host store).
    Snapshot {
        /// Directory to create (must not exist, or be empty).
        dir: String,
    },
    /// Stop the VM; the fabvm process exits 0.
    Shutdown,
    /// Check the live page identities: pause, compare every current identity with a fresh
    /// hash of its page (none may differ), resume.
    Identities,
    /// Live-migrate to a `fabvm receive` destination; on success this fabvm exits 0.
    Migrate {
        /// HOST:PORT of the destination.
        dest: String,
        /// Path of the pre-shared key file (read by the VMM).
        key: String,
        /// Downtime budget in ms.
        #[serde(default = "default_downtime_ms")]
        downtime_ms: u64,
        /// Most pre-copy rounds.
        #[serde(default = "default_max_rounds")]
        max_rounds: u32,
        /// Compress sent pages (lz4) when it pays.
        #[serde(default = "default_true")]
        compress: bool,
        /// Switch to post-copy after this many pre-copy rounds (0: at once); absent or
        /// null: pre-copy only.
        #[serde(default)]
        postcopy_after: Option<u32>,
    },
}

fn default_downtime_ms() -> u64 {
    100
}

fn default_max_rounds() -> u32 {
    30
}

fn default_true() -> bool {
    true
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// What went wrong, on failure: one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// A success carrying `result`.
    pub fn ok(result: serde_json::Value) -> Self {
        Self {
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// A failure with a one-line message.
    pub fn error(message: impl Into<String>) -> Self {
        let message: String = message.into();
        Self {
            ok: false,
            result: None,
            error: Some(message.replace('\n', " ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_from_json() {
        let req: Request = serde_json::from_str(r#"{"op":"pause"}"#).unwrap();
        assert_eq!(req, Request::Pause);
        let req: Request = serde_json::from_str(r#"{"op":"snapshot","dir":"/tmp/s"}"#).unwrap();
        assert_eq!(
            req,
            Request::Snapshot {
                dir: "/tmp/s".into()
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Shutdown).unwrap(),
            r#"{"op":"shutdown"}"#
        );
    }

    #[test]
    fn bad_requests_are_errors_not_panics() {
        for bad in [
            r#"{"op":"frobnicate"}"#,
            r#"{"op":"snapshot"}"#,
            "[]",
            "",
            "{",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_messages_stay_on_one_line() {
        let r = Response::error("a\nb");
        assert_eq!(r.error.as_deref(), Some("a b"));
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"ok":false,"error":"a b"}"#
        );
    }
}
