//! Post-copy on the destination's side of the protocol: the `Missing` list and `Switchover`
//! checked by the receiver, then [`PostcopyDest`] over [`PostcopyTable`]: faulted pages asked
//! for, streamed ones taken, each verified against its listed identity (see
//! [`super::postcopy`] for the sequence).

use std::collections::HashMap;
use std::time::Instant;

use super::channel::Channel;
use super::layout::Layout;
use super::receiver::Receiver;
use super::rx_state::RxState;
use super::sender::unexpected;
use super::wire::{
    self, AllIn, FaultKind, MsgType, OfferView, PostPage, Switchover, POSTCOPY_BATCH,
};
use super::{MigrationError, Transport};
use crate::identity::{Page, PageId, PAGE_SIZE};
use crate::manifest::Manifest;

impl RxState {
    /// A `Missing` message: its zero runs are zeroed now where they held data; its data
    /// pages that differ from what is installed are recorded for post-copy.
    pub(super) fn missing(
        &mut self,
        offer: &OfferView<'_>,
        layout: &Layout,
        sink: &mut dyn super::GuestSink,
    ) -> Result<(), MigrationError> {
        if self.round_open || !self.outstanding.is_empty() || self.expected != 0 {
            return Err(MigrationError::Unexpected {
                got: "Missing",
                when: "inside a round",
            });
        }
        self.postcopy_started = true;
        let mut entry = 0;
        for run in offer.runs() {
            let count = u64::from(run.count);
            let base = layout
                .run(run.first, count)
                .ok_or(MigrationError::GfnOutOfRange { gfn: run.first })?;
            for k in 0..count {
                let gfn = run.first + k;
                let index = base + k;
                if self.seen.test_and_set(index) {
                    return Err(MigrationError::DuplicateGfn {
                        gfn,
                        round: self.round,
                    });
                }
                self.covered.test_and_set(index);
                self.stale.unset(index);
                let current = self.manifest.get(gfn).flatten();
                if run.zero {
                    if let Some(old) = current {
                        self.forget(old, gfn);
                        sink.zero_page(gfn);
                        self.manifest.set(gfn, None);
                    }
                    continue;
                }
                let id = offer.id(entry);
                entry += 1;
                if id.is_zero_page() {
                    return Err(super::rx_state::bad("Missing", "zero page listed as data"));
                }
                self.listed += 1;
                if current == Some(id) {
                    self.present.push(gfn);
                    continue;
                }
                if let Some(old) = current {
                    self.forget(old, gfn);
                }
                self.manifest.set(gfn, Some(id));
                self.postcopy.push((gfn, id));
            }
        }
        Ok(())
    }

    /// `Switchover`: checks the VM is whole (every frame covered by a round or the
    /// `Missing` list, the state complete) and returns the manifest (the final identities,
    /// missing pages included), the state and the pages still to come.
    #[allow(clippy::type_complexity)]
    pub(super) fn switchover(
        self: Box<Self>,
        s: &Switchover,
        layout: &Layout,
    ) -> Result<(Manifest, Vec<u8>, PostcopyPages), MigrationError> {
        if s.listed != self.listed {
            return Err(super::rx_state::bad(
                "Switchover",
                "listed page count does not match",
            ));
        }
        self.check_whole("Switchover", s.rounds, layout, s.state_len, s.state_hash)?;
        let this = *self;
        let pages = PostcopyPages {
            missing: this.postcopy,
            present: this.present,
        };
        Ok((this.manifest, this.state, pages))
    }
}

/// The pages a post-copy switch listed, as the destination found them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostcopyPages {
    /// `(gfn, identity)` of the pages still to come.
    pub missing: Vec<(u64, PageId)>,
    /// Frames listed that already hold their listed content here (the source is told not
    /// to send them; they count as held).
    pub present: Vec<u64>,
}

/// Where a listed page stands at the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageState {
    /// Not listed: installed before the switch, or zero.
    NotListed,
    /// Listed, not yet in, not asked for.
    Missing,
    /// Listed and asked for (a fault), not yet in.
    Requested,
    /// Installed.
    In,
}

/// The destination's table of listed pages (no I/O: unit-tested alone).
#[derive(Debug, Clone)]
pub struct PostcopyTable {
    pages: HashMap<u64, (PageId, PageState)>,
    remaining: u64,
    /// Figures for `AllIn`.
    pub figures: AllIn,
}

impl PostcopyTable {
    /// A table of the listed pages: `missing` ones to come, and `present` frames that hold
    /// their listed content already (in, and counted as held).
    pub fn new(missing: &[(u64, PageId)], present: &[u64]) -> Self {
        let mut pages: HashMap<u64, (PageId, PageState)> = missing
            .iter()
            .map(|&(gfn, id)| (gfn, (id, PageState::Missing)))
            .collect();
        let remaining = pages.len() as u64;
        for &gfn in present {
            pages.insert(gfn, (PageId([0; 32]), PageState::In));
        }
        PostcopyTable {
            remaining,
            pages,
            figures: AllIn {
                held: present.len() as u64,
                ..AllIn::default()
            },
        }
    }

    /// Pages not yet in.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// Where `gfn` stands.
    pub fn state(&self, gfn: u64) -> PageState {
        self.pages
            .get(&gfn)
            .map_or(PageState::NotListed, |&(_, s)| s)
    }

    /// The identity listed for `gfn`.
    pub fn id(&self, gfn: u64) -> Option<PageId> {
        self.pages.get(&gfn).map(|&(id, _)| id)
    }

    /// Marks a missing page asked for; returns whether it was missing (else nothing to ask).
    pub fn request(&mut self, gfn: u64) -> bool {
        match self.pages.get_mut(&gfn) {
            Some((_, s)) if *s == PageState::Missing => {
                *s = PageState::Requested;
                true
            }
            _ => false,
        }
    }

    /// Checks `page` against `gfn`'s identity: `Ok(true)` when it should be installed now
    /// (then call [`PostcopyTable::installed`]), `Ok(false)` when the page is already in
    /// (a duplicate), an error when `gfn` is not listed or the page does not match.
    pub fn check(&mut self, gfn: u64, page: &Page) -> Result<bool, MigrationError> {
        let &(id, state) = self
            .pages
            .get(&gfn)
            .ok_or(MigrationError::GfnOutOfRange { gfn })?;
        if state == PageState::In {
            self.figures.duplicates += 1;
            return Ok(false);
        }
        if !id.matches(page) {
            return Err(MigrationError::BadPage { gfn });
        }
        Ok(true)
    }

    /// `gfn`'s page is installed; `from_host` when it came from this host (store, VMs,
    /// cluster) rather than the source.
    pub fn installed(&mut self, gfn: u64, from_host: bool) {
        let Some((_, state)) = self.pages.get_mut(&gfn) else {
            return;
        };
        let before = *state;
        if before == PageState::In {
            return;
        }
        *state = PageState::In;
        self.remaining -= 1;
        if from_host {
            self.figures.held += 1;
        } else if before == PageState::Requested {
            self.figures.faulted += 1;
        } else {
            self.figures.streamed += 1;
        }
    }

    /// The pages not yet in, in frame order.
    pub fn missing(&self) -> Vec<(u64, PageId)> {
        let mut v: Vec<(u64, PageId)> = self
            .pages
            .iter()
            .filter(|(_, (_, s))| *s != PageState::In)
            .map(|(&gfn, &(id, _))| (gfn, id))
            .collect();
        v.sort_unstable_by_key(|&(gfn, _)| gfn);
        v
    }
}

impl<S: Transport> Receiver<S> {
    /// After a `Switchover` ([`super::ReceivedVm::postcopy`]): the destination's end of
    /// post-copy, to take the missing pages from the source (told at once not to send the
    /// listed pages present here).
    pub fn into_postcopy(self, pages: &PostcopyPages) -> Result<PostcopyDest<S>, MigrationError> {
        let ch = self.into_channel()?;
        let mut dest = PostcopyDest {
            ch,
            table: PostcopyTable::new(&pages.missing, &pages.present),
            started: Instant::now(),
            buf: Box::new([0; PAGE_SIZE]),
        };
        dest.held(&pages.present)?;
        Ok(dest)
    }
}

/// The destination in post-copy: asks for faulted pages, takes streamed ones, verifies each
/// against its listed identity, and reports `AllIn` when every one is in.
#[derive(Debug)]
pub struct PostcopyDest<S: Transport> {
    ch: Channel<S>,
    table: PostcopyTable,
    started: Instant,
    buf: Box<Page>,
}

impl<S: Transport> PostcopyDest<S> {
    /// The listed pages and where each stands.
    pub fn table(&self) -> &PostcopyTable {
        &self.table
    }

    /// Mutable access, for pages taken from this host ([`PostcopyTable::check`] then
    /// [`PostcopyTable::installed`] with `from_host`).
    pub fn table_mut(&mut self) -> &mut PostcopyTable {
        &mut self.table
    }

    /// Tells the source the guest runs here now (it must never resume its copy).
    pub fn confirm_resumed(&mut self) -> Result<(), MigrationError> {
        self.ch.send(MsgType::Ack, &[])
    }

    /// Asks for the missing pages of `gfns` (those not yet asked for), ahead of the stream.
    pub fn want(&mut self, gfns: &[u64]) -> Result<(), MigrationError> {
        let wanted: Vec<u64> = gfns
            .iter()
            .copied()
            .filter(|&g| self.table.request(g))
            .collect();
        self.send_fault(FaultKind::Wanted, &wanted)
    }

    /// Tells the source these pages came from this host: it need not send them.
    pub fn held(&mut self, gfns: &[u64]) -> Result<(), MigrationError> {
        self.send_fault(FaultKind::Held, gfns)
    }

    fn send_fault(&mut self, kind: FaultKind, gfns: &[u64]) -> Result<(), MigrationError> {
        for chunk in gfns.chunks(POSTCOPY_BATCH) {
            wire::encode_fault(self.ch.begin(), kind, chunk);
            self.ch.commit(MsgType::Fault)?;
        }
        Ok(())
    }

    /// Whether a message is waiting (buffered or on the stream).
    pub fn input_ready(&self) -> bool {
        self.ch.input_ready()
    }

    /// Reads one message from the source (blocking) and installs its pages through
    /// `install(gfn, page)` after checking each against its identity. Returns the frames
    /// installed.
    pub fn recv(
        &mut self,
        install: &mut dyn FnMut(u64, &Page) -> std::io::Result<()>,
    ) -> Result<usize, MigrationError> {
        let (kind, payload) = self.ch.recv()?;
        if kind != MsgType::PostPages {
            return Err(unexpected(
                (kind, payload),
                "while receiving post-copy pages",
            ));
        }
        let mut pages: Vec<PostPage<'_>> = Vec::new();
        wire::decode_post_pages(payload, &mut pages)?;
        let mut n = 0;
        for p in &pages {
            p.body.expand(&mut self.buf)?;
            if self.table.check(p.gfn, &self.buf)? {
                install(p.gfn, &self.buf).map_err(MigrationError::Io)?;
                self.table.installed(p.gfn, false);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Every page is in: sends `AllIn` with the figures.
    pub fn finish(&mut self) -> Result<AllIn, MigrationError> {
        if self.table.remaining() != 0 {
            return Err(MigrationError::Misuse(
                "post-copy finished with pages missing",
            ));
        }
        self.table.figures.complete_us = self.started.elapsed().as_micros() as u64;
        let all = self.table.figures;
        all.encode(self.ch.begin());
        self.ch.commit(MsgType::AllIn)?;
        Ok(all)
    }

    /// Figures so far.
    pub fn figures(&self) -> AllIn {
        let mut f = self.table.figures;
        f.complete_us = self.started.elapsed().as_micros() as u64;
        f
    }
}
