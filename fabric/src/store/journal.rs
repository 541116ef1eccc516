//! The store's journal: every change since the last checkpoint, as checksummed batches
//! appended and synced one at a time, so a batch is either wholly there or a torn tail.
//!
//! ```text
//! file:   header (32 bytes) | batch | batch | ...
//! header: magic "FABSTJNL" | version u32 | 0 u32 | generation u64 | blake3(first 24)[..8]
//! batch:  magic "FBAT" | payload length u32 | sequence u64 | blake3(first 16)[..8]
//!         | payload (records) | blake3(frame header and payload) (32 bytes)
//! record: tag u8 then its fields (see `Record`)
//! ```
//!
//! Only the last batch can be torn by a crash, since each is synced before the next is
//! written. On replay a batch that fails its checks ends the journal (a torn tail, cut
//! off) unless a valid batch follows it, which means damage in the middle: an error.

use crate::codec::{Reader, Writer};
use crate::identity::PageId;

const MAGIC: &[u8; 8] = b"FABSTJNL";
const VERSION: u32 = 1;
const BATCH_MAGIC: &[u8; 4] = b"FBAT";

/// Bytes of the journal file header.
pub(crate) const HEADER_LEN: usize = 32;
const FRAME_HEADER_LEN: usize = 24;
const SUM_LEN: usize = 32;

/// Longest root name in a record (names are checked before they get here).
pub(crate) const MAX_NAME: usize = 255;

/// One change to the store's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    /// A new page was written to `slot` of `pack` (with no references yet).
    Put { id: PageId, pack: u32, slot: u32 },
    /// A page's reference count changed by `delta`.
    Ref { id: PageId, delta: i64 },
    /// A root was registered; its page list is the file `roots/<name>` with this blake3.
    AddRoot {
        name: String,
        digest: [u8; 32],
        pages: u64,
    },
    /// A root was removed.
    DelRoot { name: String },
}

const TAG_PUT: u8 = 1;
const TAG_REF: u8 = 2;
const TAG_ADD_ROOT: u8 = 3;
const TAG_DEL_ROOT: u8 = 4;

/// How a journal's bytes replay.
#[derive(Debug)]
pub(crate) struct Replay {
    pub(crate) generation: u64,
    /// Batches in order, each a list of records.
    pub(crate) batches: Vec<Vec<Record>>,
    /// Length of the valid prefix; anything after it is a torn tail to cut off.
    pub(crate) valid_len: u64,
    /// Sequence number for the next batch.
    pub(crate) next_seq: u64,
}

/// The header of an empty journal of `generation`.
pub(crate) fn header(generation: u64) -> Vec<u8> {
    let mut w = Writer::with_capacity(HEADER_LEN);
    w.bytes(MAGIC);
    w.u32(VERSION);
    w.u32(0);
    w.u64(generation);
    let sum = short_sum(&w.buf);
    w.bytes(&sum);
    w.buf
}

/// Encodes `records` as the batch with sequence number `seq`.
pub(crate) fn batch(seq: u64, records: &[Record]) -> Vec<u8> {
    let mut payload = Writer::default();
    for r in records {
        encode_record(&mut payload, r);
    }
    frame(seq, &payload.buf)
}

/// Frames an encoded payload (records) as the batch with sequence number `seq`.
pub(crate) fn frame(seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut w = Writer::with_capacity(FRAME_HEADER_LEN + payload.len() + SUM_LEN);
    w.bytes(BATCH_MAGIC);
    w.u32(u32::try_from(payload.len()).expect("batch under 4 GiB"));
    w.u64(seq);
    let sum = short_sum(&w.buf);
    w.bytes(&sum);
    w.bytes(payload);
    let sum = blake3::hash(&w.buf);
    w.bytes(sum.as_bytes());
    w.buf
}

/// The payloads of the valid batches of a journal (see [`replay`]), undecoded.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn payloads(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut pos = HEADER_LEN;
    while let Some((end, payload)) = read_batch(bytes, pos, out.len() as u64) {
        out.push(payload);
        pos = end;
    }
    out
}

/// Replays a journal file's bytes. Errors are damage the journal cannot explain by a
/// crash: a bad header, or a bad batch with a good one after it.
pub(crate) fn replay(bytes: &[u8]) -> Result<Replay, String> {
    let head = bytes
        .get(..HEADER_LEN)
        .ok_or("journal shorter than its header")?;
    if &head[..8] != MAGIC || head[24..32] != short_sum(&head[..24]) {
        return Err("journal header damaged".into());
    }
    let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(format!("unsupported journal version {version}"));
    }
    let generation = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));

    let mut replay = Replay {
        generation,
        batches: Vec::new(),
        valid_len: HEADER_LEN as u64,
        next_seq: 0,
    };
    let mut pos = HEADER_LEN;
    while pos < bytes.len() {
        match read_batch(bytes, pos, replay.next_seq) {
            Some((end, payload)) => {
                let records = decode_records(payload)
                    .map_err(|e| format!("journal batch at offset {pos}: {e}"))?;
                replay.batches.push(records);
                replay.next_seq += 1;
                pos = end;
                replay.valid_len = end as u64;
            }
            None if later_batch(bytes, pos + 1, replay.next_seq) => {
                return Err(format!("journal batch at offset {pos} is damaged"));
            }
            None => break, // torn tail
        }
    }
    Ok(replay)
}

/// The batch at `pos` with sequence `seq`: its end offset and payload, or `None` if it
/// is incomplete or fails a check.
fn read_batch(bytes: &[u8], pos: usize, seq: u64) -> Option<(usize, &[u8])> {
    let (len, got_seq) = frame_header(bytes, pos)?;
    if got_seq != seq {
        return None;
    }
    let payload_start = pos + FRAME_HEADER_LEN;
    let end = payload_start.checked_add(len)?.checked_add(SUM_LEN)?;
    let frame = bytes.get(pos..end)?;
    let (body, sum) = frame.split_at(frame.len() - SUM_LEN);
    (blake3::hash(body).as_bytes() == sum).then(|| (end, &bytes[payload_start..end - SUM_LEN]))
}

/// Payload length and sequence of a well-formed frame header at `pos`.
fn frame_header(bytes: &[u8], pos: usize) -> Option<(usize, u64)> {
    let h = bytes.get(pos..pos.checked_add(FRAME_HEADER_LEN)?)?;
    if &h[..4] != BATCH_MAGIC || h[16..24] != short_sum(&h[..16]) {
        return None;
    }
    let len = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")) as usize;
    let seq = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    Some((len, seq))
}

/// Whether a complete, valid batch with a sequence number of at least `min_seq` starts
/// anywhere at or after `from`: proof that damage before it is not a torn tail.
fn later_batch(bytes: &[u8], from: usize, min_seq: u64) -> bool {
    let mut pos = from;
    while let Some(off) = bytes
        .get(pos..)
        .and_then(|rest| rest.windows(4).position(|w| w == BATCH_MAGIC))
    {
        let at = pos + off;
        if let Some((_, seq)) = frame_header(bytes, at) {
            if seq >= min_seq && read_batch(bytes, at, seq).is_some() {
                return true;
            }
        }
        pos = at + 1;
    }
    false
}

fn short_sum(bytes: &[u8]) -> [u8; 8] {
    blake3::hash(bytes).as_bytes()[..8]
        .try_into()
        .expect("8 bytes")
}

fn encode_record(w: &mut Writer, r: &Record) {
    match r {
        Record::Put { id, pack, slot } => {
            w.u8(TAG_PUT);
            w.id(id);
            w.u32(*pack);
            w.u32(*slot);
        }
        Record::Ref { id, delta } => {
            w.u8(TAG_REF);
            w.id(id);
            w.u64(*delta as u64);
        }
        Record::AddRoot {
            name,
            digest,
            pages,
        } => {
            w.u8(TAG_ADD_ROOT);
            encode_name(w, name);
            w.bytes(digest);
            w.u64(*pages);
        }
        Record::DelRoot { name } => {
            w.u8(TAG_DEL_ROOT);
            encode_name(w, name);
        }
    }
}

fn encode_name(w: &mut Writer, name: &str) {
    debug_assert!(name.len() <= MAX_NAME);
    w.u16(name.len() as u16);
    w.bytes(name.as_bytes());
}

fn decode_records(payload: &[u8]) -> Result<Vec<Record>, String> {
    let mut r = Reader::new(payload);
    let mut records = Vec::new();
    while r.remaining() > 0 {
        let record = match r.u8("tag").map_err(|e| e.to_string())? {
            TAG_PUT => Record::Put {
                id: r.id("id").map_err(|e| e.to_string())?,
                pack: r.u32("pack").map_err(|e| e.to_string())?,
                slot: r.u32("slot").map_err(|e| e.to_string())?,
            },
            TAG_REF => Record::Ref {
                id: r.id("id").map_err(|e| e.to_string())?,
                delta: r.u64("delta").map_err(|e| e.to_string())? as i64,
            },
            TAG_ADD_ROOT => Record::AddRoot {
                name: decode_name(&mut r)?,
                digest: r.array("digest").map_err(|e| e.to_string())?,
                pages: r.u64("pages").map_err(|e| e.to_string())?,
            },
            TAG_DEL_ROOT => Record::DelRoot {
                name: decode_name(&mut r)?,
            },
            tag => return Err(format!("unknown record tag {tag}")),
        };
        records.push(record);
    }
    Ok(records)
}

pub(crate) fn decode_name(r: &mut Reader<'_>) -> Result<String, String> {
    let len = r.u16("name length").map_err(|e| e.to_string())? as usize;
    if len > MAX_NAME {
        return Err(format!("root name of {len} bytes"));
    }
    let bytes = r.take(len, "name").map_err(|e| e.to_string())?;
    String::from_utf8(bytes.to_vec()).map_err(|_| "root name is not UTF-8".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: u8) -> Vec<Record> {
        vec![
            Record::Put {
                id: PageId([n; 32]),
                pack: 1,
                slot: n.into(),
            },
            Record::Ref {
                id: PageId([n; 32]),
                delta: -3,
            },
            Record::AddRoot {
                name: format!("snap-{n}"),
                digest: [n; 32],
                pages: 9,
            },
            Record::DelRoot { name: "old".into() },
        ]
    }

    fn journal(batches: u8) -> Vec<u8> {
        let mut bytes = header(7);
        for i in 0..batches {
            bytes.extend(batch(i.into(), &records(i)));
        }
        bytes
    }

    #[test]
    fn replays_what_was_written() {
        let bytes = journal(3);
        let r = replay(&bytes).unwrap();
        assert_eq!(r.generation, 7);
        assert_eq!(r.batches, vec![records(0), records(1), records(2)]);
        assert_eq!(r.valid_len, bytes.len() as u64);
        assert_eq!(r.next_seq, 3);
    }

    #[test]
    fn torn_tail_is_cut_at_every_length() {
        let full = journal(3);
        let two = journal(2).len();
        for cut in two..full.len() {
            let r = replay(&full[..cut]).unwrap();
            assert_eq!(r.batches.len(), 2, "cut at {cut}");
            assert_eq!(r.valid_len, two as u64);
        }
        // A tail of zeros (size extended, data never written) is torn too.
        let mut zeros = journal(2);
        zeros.extend(vec![0u8; 4096]);
        assert_eq!(replay(&zeros).unwrap().batches.len(), 2);
        // So is a final batch whose bytes are damaged.
        let mut bad_last = full.clone();
        let n = bad_last.len();
        bad_last[n - 40] ^= 1;
        assert_eq!(replay(&bad_last).unwrap().batches.len(), 2);
    }

    #[test]
    fn damage_before_a_good_batch_is_an_error() {
        let full = journal(3);
        let first_batch = HEADER_LEN + 10;
        for pos in [4, HEADER_LEN + 5, first_batch, HEADER_LEN + 30] {
            let mut bad = full.clone();
            bad[pos] ^= 0x40;
            assert!(replay(&bad).is_err(), "flip at {pos}");
        }
        assert!(replay(&full[..10]).is_err());
    }
}
