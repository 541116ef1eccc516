//! What a host says about itself in the registry: one JSON record per host under
//! `/fabvm/hosts/NAME`, written under the host's lease (so it vanishes when the agent dies)
//! and rewritten at every refresh.

use serde::{Deserialize, Serialize};

/// Largest record a reader accepts.
pub const MAX_RECORD_BYTES: usize = 16 << 10;
/// Longest host name.
pub const MAX_NAME: usize = 64;

/// Errors about a host record.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A name that cannot be a key component.
    #[error("host name {0:?} is not 1-64 letters, digits, '.', '-' or '_'")]
    BadName(String),
    /// Not a record.
    #[error("host record is malformed")]
    Malformed(#[source] serde_json::Error),
    /// Larger than a reader accepts.
    #[error("host record of {0} bytes is over the bound")]
    TooLarge(usize),
}

/// A live host, as its agent publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Its name (unique in the cluster).
    pub name: String,
    /// Its page service, HOST:PORT.
    pub addr: String,
    /// Memory available for new VMs (`MemAvailable` in /proc/meminfo), bytes.
    pub mem_available: u64,
    /// All memory (`MemTotal`), bytes.
    pub mem_total: u64,
    /// Online CPUs.
    pub cpus: u32,
    /// VMs running (registered with the host's VM registry).
    pub vms: u32,
    /// Distinct pages in its store plus non-zero pages of its running VMs (pages held
    /// twice, in both or in two VMs, count twice).
    pub pages_held: u64,
    /// Of those, in the store.
    pub store_pages: u64,
    /// Generation of the summary published with this record (0: none yet).
    pub summary_generation: u64,
    /// The summary's size and its expected false-positive rate.
    pub summary_bytes: u64,
    pub summary_fp_rate: f64,
    /// When the summary was built, ms since the Unix epoch (its age is read against it).
    pub summary_unix_ms: u64,
    /// When this record was written, ms since the Unix epoch (every tick of the agent).
    #[serde(default)]
    pub updated_unix_ms: u64,
}

impl HostRecord {
    /// The JSON stored.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a record serializes")
    }

    /// Decodes a record, bounded, with its name checked.
    pub fn decode(b: &[u8]) -> Result<HostRecord, RecordError> {
        if b.len() > MAX_RECORD_BYTES {
            return Err(RecordError::TooLarge(b.len()));
        }
        let r: HostRecord = serde_json::from_slice(b).map_err(RecordError::Malformed)?;
        check_name(&r.name)?;
        Ok(r)
    }
}

/// A host name usable as a key component.
pub fn check_name(name: &str) -> Result<(), RecordError> {
    let ok = (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(RecordError::BadName(name.to_string()))
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A record for tests: host `name` at `name:1` with a summary, the rest zero; tests set what
/// they need with struct update syntax.
#[cfg(test)]
pub(crate) fn test_host(name: &str) -> HostRecord {
    HostRecord {
        name: name.into(),
        addr: format!("{name}:1"),
        mem_available: 0,
        mem_total: 0,
        cpus: 0,
        vms: 0,
        pages_held: 0,
        store_pages: 0,
        summary_generation: 1,
        summary_bytes: 0,
        summary_fp_rate: 0.0,
        summary_unix_ms: 0,
        updated_unix_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> HostRecord {
        HostRecord {
            addr: "10.0.0.1:7000".into(),
            mem_available: 8 << 30,
            mem_total: 24 << 30,
            cpus: 2,
            vms: 1,
            pages_held: 1000,
            store_pages: 10,
            summary_generation: 3,
            summary_bytes: 4096,
            summary_fp_rate: 0.01,
            summary_unix_ms: 1,
            updated_unix_ms: 2,
            ..test_host(name)
        }
    }

    #[test]
    fn round_trip() {
        let r = sample("host-a");
        assert_eq!(HostRecord::decode(&r.encode()).unwrap(), r);
    }

    #[test]
    fn bad_records_and_names_are_refused() {
        for name in ["", "a/b", "a b", "..\u{e9}", &"x".repeat(65)] {
            assert!(check_name(name).is_err(), "{name:?}");
            assert!(HostRecord::decode(&sample(name).encode()).is_err());
        }
        assert!(check_name("host-1.rack_2").is_ok());
        assert!(matches!(
            HostRecord::decode(b"{}"),
            Err(RecordError::Malformed(_))
        ));
        assert!(matches!(
            HostRecord::decode(&vec![b' '; MAX_RECORD_BYTES + 1]),
            Err(RecordError::TooLarge(_))
        ));
    }
}
