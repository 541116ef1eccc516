//! The snapshot state file: magic, format version, body length, a JSON body and its blake3.
//! Decoded as untrusted input: every length is checked against a limit before allocating.
//!
//! ```text
//! offset 0   8 bytes  magic "FABVMSNP"
//!        8   u32 LE   format version (FORMAT_VERSION)
//!       12   u32 LE   flags (0)
//!       16   u64 LE   body length N (at most MAX_BODY)
//!       24   N bytes  body: SnapshotState as JSON
//!     24+N   32 bytes blake3(body)
//! ```

use std::path::PathBuf;

use devices::{I8042State, SerialDeviceState};
use fabric::Region;
use serde::{Deserialize, Serialize};

use crate::vcpu::state::VcpuState;
use crate::virtio::VirtioDeviceState;
use crate::vm_state::VmState;

const MAGIC: &[u8; 8] = b"FABVMSNP";
/// The format this fabvm writes and the newest it reads.
pub const FORMAT_VERSION: u32 = 1;
/// Largest body accepted (a 254-vCPU VM with large XSAVE areas stays far below).
pub const MAX_BODY: u64 = 64 << 20;
const HEADER: usize = 24;
const CHECKSUM: usize = 32;

/// Errors from decoding a state file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Not a snapshot state file.
    #[error("not a fabvm snapshot (bad magic)")]
    Magic,
    /// Written by a newer fabvm.
    #[error("snapshot format version {0} is newer than this fabvm supports ({FORMAT_VERSION})")]
    NewerVersion(u32),
    /// Unknown flags.
    #[error("snapshot has unknown flags {0:#x}")]
    Flags(u32),
    /// Body length beyond the limit.
    #[error("snapshot body of {0} bytes exceeds the limit")]
    TooLarge(u64),
    /// File shorter or longer than its header says.
    #[error("snapshot state is truncated or has trailing bytes")]
    Length,
    /// Checksum mismatch.
    #[error("snapshot state is corrupted (checksum mismatch)")]
    Checksum,
    /// The body does not parse.
    #[error("snapshot state is malformed: {0}")]
    Body(serde_json::Error),
}

/// Everything in a snapshot except memory contents (which are in the store).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotState {
    /// Guest memory size in bytes.
    pub mem: u64,
    /// vCPU count.
    pub cpus: u32,
    /// Command line the guest was booted with (informational).
    pub cmdline: String,
    /// Kernel the guest was booted from (informational).
    pub kernel: String,
    /// RAM regions; must match the memory map for `mem`.
    pub regions: Vec<Region>,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// One state per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialDeviceState,
    /// The i8042.
    pub i8042: I8042State,
    /// virtio devices in slot order, with the disk paths and tap names to reopen.
    #[serde(default)]
    pub virtio: Vec<VirtioDeviceState>,
    /// The store holding the pages, as it was given when the snapshot was taken.
    pub store: PathBuf,
    /// The root in that store that references the snapshot's pages.
    pub root: String,
    /// blake3 of the manifest file, so a swapped manifest is caught.
    pub manifest_blake3: String,
}

/// Encodes a state file.
pub fn encode(state: &SnapshotState) -> Vec<u8> {
    let body = serde_json::to_vec(state).expect("snapshot state serializes");
    let mut out = Vec::with_capacity(HEADER + body.len() + CHECKSUM);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(blake3::hash(&body).as_bytes());
    out
}

/// Decodes and checks a state file.
pub fn decode(bytes: &[u8]) -> Result<SnapshotState, FormatError> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(if bytes.len() >= 8 && &bytes[..8] != MAGIC {
            FormatError::Magic
        } else {
            FormatError::Length
        });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version > FORMAT_VERSION {
        return Err(FormatError::NewerVersion(version));
    }
    let flags = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    if flags != 0 {
        return Err(FormatError::Flags(flags));
    }
    let len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    if len > MAX_BODY {
        return Err(FormatError::TooLarge(len));
    }
    let len = len as usize;
    if bytes.len() != HEADER + len + CHECKSUM {
        return Err(FormatError::Length);
    }
    let body = &bytes[HEADER..HEADER + len];
    if blake3::hash(body).as_bytes() != &bytes[HEADER + len..] {
        return Err(FormatError::Checksum);
    }
    serde_json::from_slice(body).map_err(FormatError::Body)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};

    pub(crate) fn sample() -> SnapshotState {
        SnapshotState {
            mem: 64 << 20,
            cpus: 1,
            cmdline: "passes=0".into(),
            kernel: "/k".into(),
            regions: vec![Region {
                guest_addr: 0,
                pages: 16384,
            }],
            vm: VmState {
                pic_master: kvm_irqchip::default(),
                pic_slave: kvm_irqchip::default(),
                ioapic: kvm_irqchip::default(),
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data {
                    clock: 12345,
                    ..Default::default()
                },
            },
            vcpus: vec![],
            serial: SerialDeviceState {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: vec![],
            },
            i8042: I8042State {
                status: 4,
                control: 0x45,
                output: None,
                pending_command: None,
            },
            virtio: vec![],
            store: "/var/lib/fabvm/store".into(),
            root: "snapshot-1".into(),
            manifest_blake3: "00".into(),
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&sample());
        let back = decode(&bytes).unwrap();
        assert_eq!(back.vm.clock.clock, 12345);
        assert_eq!(back.regions, sample().regions);
    }

    #[test]
    fn truncation_anywhere_is_detected() {
        let bytes = encode(&sample());
        for cut in [0, 7, 8, 23, 24, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(FormatError::Length)));
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let bytes = encode(&sample());
        for i in (0..bytes.len()).step_by(7) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(decode(&bad).is_err(), "flip at byte {i}");
        }
    }

    #[test]
    fn newer_version_and_huge_lengths_are_refused() {
        let mut bytes = encode(&sample());
        bytes[8..12].copy_from_slice(&(FORMAT_VERSION + 1).to_le_bytes());
        assert!(
            matches!(decode(&bytes), Err(FormatError::NewerVersion(v)) if v == FORMAT_VERSION + 1)
        );
        let mut bytes = encode(&sample());
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(decode(&bytes), Err(FormatError::TooLarge(_))));
        assert!(matches!(
            decode(b"NOTASNAPSHOT-AT-ALL-0123456789"),
            Err(FormatError::Magic)
        ));
    }
}
