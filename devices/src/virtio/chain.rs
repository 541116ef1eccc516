//! Descriptor chain validation: a chain from the guest becomes a [`Chain`] of checked segments
//! (inside guest memory, device-readable before device-writable, finite) before any device
//! touches its bytes; devices then read and write through byte offsets into those segments.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile, WriteVolatile};

use super::GuestMemoryMmap;
use virtio_queue::DescriptorChain;

/// Why a descriptor chain was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// No descriptor could be read (head outside the table, or a bad indirect table).
    #[error("empty descriptor chain")]
    Empty,
    /// The chain ended on a descriptor that says more follow: a loop, a chain longer than the
    /// queue, or a next index outside the table.
    #[error("descriptor chain loops or is cut short")]
    Truncated,
    /// A device-readable descriptor after a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A buffer not wholly inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    /// Guest memory access failed while moving bytes.
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// A byte range past the end of the chain's buffers.
    #[error("range {offset:#x}+{len:#x} past the end of the buffers")]
    OutOfRange { offset: u64, len: u64 },
}

/// One buffer of a chain, known to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never zero).
    pub len: u32,
}

/// A validated descriptor chain: its head index and its buffers, split by direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// Descriptor index of the head, to return with `add_used`.
    pub head: u16,
    /// Device-readable buffers, in order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers, in order.
    pub writable: Vec<Segment>,
}

/// Checks every descriptor of `chain` and collects its buffers. Zero-length descriptors are
/// skipped. The total length is bounded by virtio-queue (at most 4 GiB - 1 per chain), and so
/// is the number of descriptors (the queue size, which also ends loops).
pub fn parse(chain: DescriptorChain<&GuestMemoryMmap>) -> Result<Chain, ChainError> {
    let mem = chain.memory();
    let mut out = Chain {
        head: chain.head_index(),
        ..Chain::default()
    };
    let mut seen_any = false;
    let mut last_has_next = false;
    for desc in chain.clone() {
        seen_any = true;
        last_has_next = desc.has_next();
        let len = desc.len();
        if len == 0 {
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len as usize) {
            return Err(ChainError::OutsideMemory {
                addr: desc.addr().0,
                len,
            });
        }
        let segment = Segment {
            addr: desc.addr(),
            len,
        };
        if desc.is_write_only() {
            out.writable.push(segment);
        } else if out.writable.is_empty() {
            out.readable.push(segment);
        } else {
            return Err(ChainError::ReadableAfterWritable);
        }
    }
    if !seen_any {
        return Err(ChainError::Empty);
    }
    if last_has_next {
        return Err(ChainError::Truncated);
    }
    Ok(out)
}

/// Total length of `segments`.
pub fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

impl Chain {
    /// Bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        total_len(&self.readable)
    }

    /// Bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        total_len(&self.writable)
    }
}

/// The guest ranges covering bytes `[offset, offset + len)` of the stream `segments` form.
pub fn ranges(
    segments: &[Segment],
    offset: u64,
    len: u64,
) -> Result<Vec<(GuestAddress, usize)>, ChainError> {
    let end = offset
        .checked_add(len)
        .filter(|&end| end <= total_len(segments))
        .ok_or(ChainError::OutOfRange { offset, len })?;
    let mut out = Vec::new();
    let mut start = 0u64;
    for seg in segments {
        let seg_end = start + u64::from(seg.len);
        let lo = offset.max(start);
        let hi = end.min(seg_end);
        if lo < hi {
            // Inside the segment, which lies in guest memory: no overflow.
            out.push((seg.addr.unchecked_add(lo - start), (hi - lo) as usize));
        }
        if seg_end >= end {
            break;
        }
        start = seg_end;
    }
    Ok(out)
}

/// Copies bytes `[offset, offset + buf.len())` of `segments` into `buf`.
pub fn read_bytes(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    offset: u64,
    buf: &mut [u8],
) -> Result<(), ChainError> {
    let mut done = 0;
    for (addr, n) in ranges(segments, offset, buf.len() as u64)? {
        mem.read_slice(&mut buf[done..done + n], addr)?;
        done += n;
    }
    Ok(())
}

/// Copies `buf` into bytes `[offset, offset + buf.len())` of `segments`.
pub fn write_bytes(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    offset: u64,
    buf: &[u8],
) -> Result<(), ChainError> {
    let mut done = 0;
    for (addr, n) in ranges(segments, offset, buf.len() as u64)? {
        mem.write_slice(&buf[done..done + n], addr)?;
        done += n;
    }
    Ok(())
}

/// Fills bytes `[offset, offset + len)` of `segments` from `src` (a file), all or error.
pub fn fill_from<F: ReadVolatile>(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    offset: u64,
    len: u64,
    src: &mut F,
) -> Result<(), ChainError> {
    for (addr, n) in ranges(segments, offset, len)? {
        mem.read_exact_volatile_from(addr, src, n)?;
    }
    Ok(())
}

/// Writes bytes `[offset, offset + len)` of `segments` to `dst` (a file), all or error.
pub fn drain_to<F: WriteVolatile>(
    mem: &GuestMemoryMmap,
    segments: &[Segment],
    offset: u64,
    len: u64,
    dst: &mut F,
) -> Result<(), ChainError> {
    for (addr, n) in ranges(segments, offset, len)? {
        mem.write_all_volatile_to(addr, dst, n)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testutil::{mem, Desc, Driver};

    #[test]
    fn splits_by_direction_and_skips_empty_buffers() {
        let m = mem();
        let mut d = Driver::new(&m, 16);
        d.add(&[
            Desc::r(0x10000, 16),
            Desc::r(0x11000, 0),
            Desc::w(0x12000, 512),
            Desc::w(0x13000, 1),
        ]);
        let chain = parse(d.pop_chain()).unwrap();
        assert_eq!(chain.readable_len(), 16);
        assert_eq!(chain.writable_len(), 513);
        assert_eq!(chain.readable.len(), 1);
        assert_eq!(chain.writable.len(), 2);
    }

    #[test]
    fn refuses_buffers_outside_memory_and_wrapping() {
        let m = mem();
        let mut d = Driver::new(&m, 16);
        d.add(&[Desc::r(0x10000, 16), Desc::w(0xffff_0000_0000, 1)]);
        assert!(matches!(
            parse(d.pop_chain()),
            Err(ChainError::OutsideMemory { .. })
        ));
        d.add(&[Desc::w(u64::MAX - 8, 0x100)]);
        assert!(matches!(
            parse(d.pop_chain()),
            Err(ChainError::OutsideMemory { .. })
        ));
        // Straddling the end of memory.
        d.add(&[Desc::w(crate::virtio::testutil::MEM_SIZE - 8, 16)]);
        assert!(matches!(
            parse(d.pop_chain()),
            Err(ChainError::OutsideMemory { .. })
        ));
    }

    #[test]
    fn refuses_readable_after_writable() {
        let m = mem();
        let mut d = Driver::new(&m, 16);
        d.add(&[Desc::w(0x10000, 16), Desc::r(0x11000, 16)]);
        assert!(matches!(
            parse(d.pop_chain()),
            Err(ChainError::ReadableAfterWritable)
        ));
    }

    #[test]
    fn refuses_loops_and_bad_next_indices() {
        let m = mem();
        let mut d = Driver::new(&m, 16);
        // Two descriptors pointing at each other.
        d.add_raw(&[(0x10000, 16, true, Some(1)), (0x11000, 16, true, Some(0))]);
        assert!(matches!(parse(d.pop_chain()), Err(ChainError::Truncated)));
        // A next index past the table.
        d.add_raw(&[(0x10000, 16, false, Some(200))]);
        assert!(matches!(parse(d.pop_chain()), Err(ChainError::Truncated)));
        // A head past the table.
        d.push_head(300);
        assert!(matches!(parse(d.pop_chain()), Err(ChainError::Empty)));
    }

    #[test]
    fn ranges_cross_segments() {
        let segs = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 4,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 4,
            },
        ];
        assert_eq!(
            ranges(&segs, 2, 4).unwrap(),
            vec![(GuestAddress(0x1002), 2), (GuestAddress(0x2000), 2)]
        );
        assert_eq!(ranges(&segs, 8, 0).unwrap(), vec![]);
        assert!(ranges(&segs, 7, 2).is_err());
        assert!(ranges(&segs, u64::MAX, 2).is_err());
    }

    #[test]
    fn bytes_round_trip_through_segments() {
        let m = mem();
        let segs = [
            Segment {
                addr: GuestAddress(0x10000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x20000),
                len: 5,
            },
        ];
        write_bytes(&m, &segs, 1, b"abcdefg").unwrap();
        let mut back = [0u8; 7];
        read_bytes(&m, &segs, 1, &mut back).unwrap();
        assert_eq!(&back, b"abcdefg");
        assert!(write_bytes(&m, &segs, 2, b"abcdefg").is_err());
    }
}
