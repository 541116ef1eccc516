//! The source's pushes: pages sent without waiting for an answer, read, hashed and (when
//! it pays) compressed on all cores, with one digest over their identities per message.

use super::sender::Sender;
use super::wire::{self, Body, MsgType, PageEntry, PAGES_PER_MESSAGE};
use super::{MigrationError, Transport};
use crate::identity::{Page, PAGE_SIZE};

impl<S: Transport> Sender<S> {
    /// Pushes the pages of `frames` (checked by the caller), as they read now.
    pub(super) fn push_pages<F>(
        &mut self,
        frames: &[u64],
        read_page: &F,
    ) -> Result<(), MigrationError>
    where
        F: Fn(u64, &mut Page) + Sync,
    {
        for chunk in frames.chunks(PAGES_PER_MESSAGE) {
            self.push_chunk(chunk, read_page)?;
        }
        Ok(())
    }

    fn push_chunk<F>(&mut self, chunk: &[u64], read_page: &F) -> Result<(), MigrationError>
    where
        F: Fn(u64, &mut Page) + Sync,
    {
        self.prepare(chunk, read_page, true);
        let mut runs: Vec<(u64, u32)> = Vec::new();
        for &gfn in chunk {
            match runs.last_mut() {
                Some((first, count)) if *first + u64::from(*count) == gfn => *count += 1,
                _ => runs.push((gfn, 1)),
            }
        }
        let mut entries = Vec::with_capacity(chunk.len());
        let mut ids = Vec::with_capacity(chunk.len());
        let counted = !self.describing;
        let mut zeros = 0u64;
        for i in 0..chunk.len() {
            let slot = self.scratch.slots[i];
            let body = match slot.id {
                None => {
                    zeros += 1;
                    entries.push(PageEntry {
                        new_id: None,
                        body: Body::Zero,
                    });
                    continue;
                }
                Some(id) if !self.pushed.insert(id) => {
                    self.stats.pages_deduplicated += 1;
                    entries.push(PageEntry {
                        new_id: Some(id),
                        body: Body::Known,
                    });
                    continue;
                }
                Some(id) => {
                    ids.push(id);
                    self.stats.pages_sent += 1;
                    match slot.compressed {
                        Some(len) => {
                            self.stats.pages_compressed += 1;
                            self.stats.compression_saved_bytes += (PAGE_SIZE - len - 2) as u64;
                            Body::Lz4(&self.scratch.comp[i][..len])
                        }
                        None => Body::Raw(
                            self.scratch.pages[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]
                                .try_into()
                                .expect("a page"),
                        ),
                    }
                }
            };
            entries.push(PageEntry { new_id: None, body });
        }
        if counted {
            self.stats.pages_offered += chunk.len() as u64 - zeros;
            self.stats.pages_zero += zeros;
        }
        self.stats.pages_pushed += chunk.len() as u64;
        let digest = wire::push_digest(&ids);
        wire::encode_push(self.ch.begin(), self.round, &runs, &entries, &digest);
        self.ch.commit(MsgType::Push)
    }
}
