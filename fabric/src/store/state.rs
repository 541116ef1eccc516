//! The store's index in memory (where each page lives, its references, packs and roots),
//! the rules every journal record must obey, and the checkpoint file that saves it whole.
//!
//! ```text
//! checkpoint: magic "FABSTIDX" | version u32 | 0 u32 | generation u64 | next pack u32
//!             | pack count u32 | (pack u32, length in pages u32)*
//!             | entry count u64 | (identity 32, pack u32, slot u32, references u64)*
//!             | root count u32 | (name length u16, name, digest 32, pages u64)*
//!             | blake3 of all the above
//! ```

use std::collections::{BTreeMap, HashMap};

use super::journal::{decode_name, Record, MAX_NAME};
use crate::codec::{Reader, Writer};
use crate::identity::PageId;

const MAGIC: &[u8; 8] = b"FABSTIDX";
const VERSION: u32 = 1;
const ENTRY_LEN: usize = 48;

/// Where a page is and who holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) pack: u32,
    pub(crate) slot: u32,
    pub(crate) refs: u64,
}

/// A named root: a list of pages it holds one reference on each (see `roots`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RootInfo {
    pub(crate) digest: [u8; 32],
    pub(crate) pages: u64,
}

/// The whole index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct State {
    /// Incremented by every checkpoint; the journal carries the one it follows.
    pub(crate) generation: u64,
    /// Smallest pack number never used.
    pub(crate) next_pack: u32,
    /// Pack number to its length in pages.
    pub(crate) packs: BTreeMap<u32, u32>,
    pub(crate) entries: HashMap<PageId, Entry>,
    pub(crate) roots: BTreeMap<String, RootInfo>,
}

impl State {
    /// Applies one record, refusing any that does not follow from the current state: this
    /// is what makes a replayed journal a consistency check of the index.
    pub(crate) fn apply(&mut self, record: &Record) -> Result<(), String> {
        match record {
            Record::Put { id, pack, slot } => {
                if id.is_zero_page() || self.entries.contains_key(id) {
                    return Err(format!("page {id} put twice or is the zero page"));
                }
                let len = match self.packs.get_mut(pack) {
                    Some(len) => len,
                    None if *pack >= self.next_pack => {
                        self.next_pack = pack
                            .checked_add(1)
                            .ok_or_else(|| format!("put into pack {pack}, past the last"))?;
                        self.packs.entry(*pack).or_insert(0)
                    }
                    None => return Err(format!("put into retired pack {pack}")),
                };
                if *slot != *len {
                    return Err(format!("put into slot {slot} of pack {pack} of {len}"));
                }
                *len = len
                    .checked_add(1)
                    .ok_or_else(|| format!("put into full pack {pack}"))?;
                self.entries.insert(
                    *id,
                    Entry {
                        pack: *pack,
                        slot: *slot,
                        refs: 0,
                    },
                );
            }
            Record::Ref { id, delta } => {
                let entry = self
                    .entries
                    .get_mut(id)
                    .ok_or_else(|| format!("reference to unknown page {id}"))?;
                entry.refs = entry
                    .refs
                    .checked_add_signed(*delta)
                    .ok_or_else(|| format!("reference count of {id} out of range"))?;
            }
            Record::AddRoot {
                name,
                digest,
                pages,
            } => {
                if self.roots.contains_key(name) {
                    return Err(format!("root {name} added twice"));
                }
                self.roots.insert(
                    name.clone(),
                    RootInfo {
                        digest: *digest,
                        pages: *pages,
                    },
                );
            }
            Record::DelRoot { name } => {
                self.roots
                    .remove(name)
                    .ok_or_else(|| format!("removal of unknown root {name}"))?;
            }
        }
        Ok(())
    }

    /// This state as the next checkpoint (generation one more); `None` past the last
    /// generation, which only a damaged index reaches.
    pub(crate) fn successor(&self) -> Option<State> {
        Some(State {
            generation: self.generation.checked_add(1)?,
            ..self.clone()
        })
    }

    /// Encodes the checkpoint file.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(64 + self.packs.len() * 8 + self.entries.len() * 48);
        w.bytes(MAGIC);
        w.u32(VERSION);
        w.u32(0);
        w.u64(self.generation);
        w.u32(self.next_pack);
        w.u32(self.packs.len() as u32);
        for (&pack, &len) in &self.packs {
            w.u32(pack);
            w.u32(len);
        }
        // Sorted by location so that equal states encode identically.
        let mut entries: Vec<_> = self.entries.iter().collect();
        entries.sort_unstable_by_key(|(_, e)| (e.pack, e.slot));
        w.u64(entries.len() as u64);
        for (id, e) in entries {
            w.id(id);
            w.u32(e.pack);
            w.u32(e.slot);
            w.u64(e.refs);
        }
        w.u32(self.roots.len() as u32);
        for (name, root) in &self.roots {
            w.u16(name.len() as u16);
            w.bytes(name.as_bytes());
            w.bytes(&root.digest);
            w.u64(root.pages);
        }
        w.seal()
    }

    /// Decodes and checks a checkpoint file.
    pub(crate) fn decode(bytes: &[u8]) -> Result<State, String> {
        let e = |e: crate::codec::CodecError| format!("index: {e}");
        let mut r = Reader::unseal(bytes).map_err(e)?;
        if &r.array::<8>("magic").map_err(e)? != MAGIC {
            return Err("index: bad magic".into());
        }
        let version = r.u32("version").map_err(e)?;
        if version != VERSION {
            return Err(format!("index: unsupported version {version}"));
        }
        r.u32("reserved").map_err(e)?;
        let mut state = State {
            generation: r.u64("generation").map_err(e)?,
            next_pack: r.u32("next pack").map_err(e)?,
            ..State::default()
        };
        let packs = r.u32("pack count").map_err(e)?;
        let packs = r
            .bound(packs.into(), 8, u32::MAX.into(), "pack")
            .map_err(e)?;
        for _ in 0..packs {
            let (pack, len) = (r.u32("pack").map_err(e)?, r.u32("pack").map_err(e)?);
            if pack >= state.next_pack || state.packs.insert(pack, len).is_some() {
                return Err(format!("index: bad pack number {pack}"));
            }
        }
        let entries = r.u64("entry count").map_err(e)?;
        let entries = r.bound(entries, ENTRY_LEN, u64::MAX, "entry").map_err(e)?;
        state.entries.reserve(entries);
        for _ in 0..entries {
            let id = r.id("entry").map_err(e)?;
            let entry = Entry {
                pack: r.u32("entry").map_err(e)?,
                slot: r.u32("entry").map_err(e)?,
                refs: r.u64("entry").map_err(e)?,
            };
            let in_pack = state
                .packs
                .get(&entry.pack)
                .is_some_and(|&len| entry.slot < len);
            if !in_pack || id.is_zero_page() {
                return Err(format!("index: page {id} has no valid location"));
            }
            if state.entries.insert(id, entry).is_some() {
                return Err(format!("index: page {id} listed twice"));
            }
        }
        let roots = r.u32("root count").map_err(e)?;
        let roots = r
            .bound(roots.into(), 42, u32::MAX.into(), "root")
            .map_err(e)?;
        for _ in 0..roots {
            let name = decode_name(&mut r).map_err(|m| format!("index: {m}"))?;
            let info = RootInfo {
                digest: r.array("root").map_err(e)?,
                pages: r.u64("root").map_err(e)?,
            };
            if name.len() > MAX_NAME || state.roots.insert(name, info).is_some() {
                return Err("index: root listed twice".into());
            }
        }
        r.finish().map_err(e)?;
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(n: u8, pack: u32, slot: u32) -> Record {
        Record::Put {
            id: PageId([n; 32]),
            pack,
            slot,
        }
    }

    #[test]
    fn records_must_follow_from_the_state() {
        let mut s = State::default();
        s.apply(&put(1, 0, 0)).unwrap();
        s.apply(&put(2, 0, 1)).unwrap();
        assert!(s.apply(&put(3, 0, 5)).is_err(), "slot gap");
        assert!(s.apply(&put(1, 0, 2)).is_err(), "duplicate page");
        assert!(s
            .apply(&Record::Put {
                id: PageId::ZERO,
                pack: 0,
                slot: 2
            })
            .is_err());
        s.apply(&put(3, 4, 0)).unwrap();
        assert_eq!(s.next_pack, 5);
        s.packs.remove(&0);
        assert!(s.apply(&put(4, 0, 0)).is_err(), "retired pack");

        let id = PageId([1; 32]);
        s.apply(&Record::Ref { id, delta: 2 }).unwrap();
        assert!(s.apply(&Record::Ref { id, delta: -3 }).is_err());
        s.apply(&Record::Ref { id, delta: -2 }).unwrap();
        assert!(s
            .apply(&Record::Ref {
                id: PageId([9; 32]),
                delta: 1
            })
            .is_err());

        let add = Record::AddRoot {
            name: "a".into(),
            digest: [0; 32],
            pages: 1,
        };
        s.apply(&add).unwrap();
        assert!(s.apply(&add).is_err());
        s.apply(&Record::DelRoot { name: "a".into() }).unwrap();
        assert!(s.apply(&Record::DelRoot { name: "a".into() }).is_err());
    }

    /// Found by the store_open fuzz target: a put into pack u32::MAX overflowed the next
    /// pack number, and one into the last slot of a full pack its length.
    #[test]
    fn puts_at_the_end_of_the_numbers_are_refused() {
        let mut s = State::default();
        assert!(s.apply(&put(1, u32::MAX, 0)).is_err());
        assert_eq!(s, State::default(), "a refused record changes nothing");
        s.next_pack = 3;
        s.packs.insert(2, u32::MAX);
        assert!(s.apply(&put(2, 2, u32::MAX)).is_err());
        assert_eq!(s.packs[&2], u32::MAX);
        s.apply(&put(3, 3, 0)).unwrap();
        assert_eq!(s.next_pack, 4);
    }

    #[test]
    fn checkpoint_round_trip_and_damage() {
        let mut s = State {
            generation: 3,
            ..State::default()
        };
        for i in 0..10u8 {
            s.apply(&put(i + 1, u32::from(i) / 4, u32::from(i) % 4))
                .unwrap();
        }
        s.apply(&Record::Ref {
            id: PageId([2; 32]),
            delta: 5,
        })
        .unwrap();
        s.apply(&Record::AddRoot {
            name: "snap".into(),
            digest: [7; 32],
            pages: 1,
        })
        .unwrap();
        let bytes = s.encode();
        assert_eq!(State::decode(&bytes).unwrap(), s);
        for pos in [0, 20, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[pos] ^= 4;
            assert!(State::decode(&bad).is_err(), "flip at {pos}");
        }
        assert!(State::decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
