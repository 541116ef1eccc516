//! The destination end: answers each offer with the pages it lacks after taking what it
//! holds (this migration's earlier pages, the host's [`PageSource`]), verifies every page
//! before installing it, and checks the whole guest is covered before the VMM may resume it.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};

use super::channel::{Channel, HelloParams};
use super::layout::{Bitmap, Layout};
use super::rx_state::RxState;
use super::sender::unexpected;
use super::stats::ReceiverStats;
use super::wire::{
    self, Complete, MsgType, OfferView, Protocol, Role, FEATURE_LZ4, PAGES_PER_MESSAGE,
    VERSION_MAX, VERSION_MIN,
};
use super::{GuestSink, Limits, MigrationError, MigrationKey, PageSource, VmDescription};
use crate::identity::PAGE_SIZE;
use crate::manifest::Manifest;

/// What the destination has once the source completed: the guest's memory is installed
/// (through the [`GuestSink`]); the VMM restores `state`, resumes the guest, then calls
/// [`Receiver::confirm_resumed`].
#[derive(Debug)]
pub struct ReceivedVm {
    /// The VM as the source described it.
    pub description: VmDescription,
    /// The vCPU and device state blob.
    pub state: Vec<u8>,
    /// Identities of the installed memory (`None` = zero page): the destination's
    /// manifest, ready for its store or its next migration.
    pub manifest: Manifest,
    /// Figures so far.
    pub stats: ReceiverStats,
    /// Post-copy: the `(gfn, identity)` of the pages still to come (the guest may resume
    /// before they are in: see [`Receiver::into_postcopy`]); `None` after a pre-copy
    /// migration.
    pub postcopy: Option<super::PostcopyPages>,
}

/// The destination end of a migration over `S`.
///
/// [`Receiver::accept`] authenticates the source and reads the VM's description; the VMM
/// prepares guest memory and calls [`Receiver::receive`] (or [`Receiver::abort`]); once
/// it has restored the returned state and resumed the guest (the source committed with
/// `Complete`), [`Receiver::confirm_resumed`] sends `Ack`. On any error before that the VMM
/// discards the guest; the receiver is unusable after an error.
#[derive(Debug)]
pub struct Receiver<S: Read + Write> {
    ch: Channel<S>,
    limits: Limits,
    phase: Phase,
    desc: VmDescription,
    layout: Layout,
    rx: Option<Box<RxState>>,
    stats: ReceiverStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Described,
    Receiving,
    Completed,
    Done,
    Failed,
}

impl<S: Read + Write> Receiver<S> {
    /// Exchanges hellos with the source at the other end of `stream`, proves the key both
    /// ways and reads the VM's description (checked against `limits`).
    pub fn accept(
        stream: S,
        key: &MigrationKey,
        limits: Limits,
    ) -> Result<(Receiver<S>, VmDescription), MigrationError> {
        Self::accept_versions(stream, key, limits, (VERSION_MIN, VERSION_MAX))
    }

    pub(crate) fn accept_versions(
        stream: S,
        key: &MigrationKey,
        limits: Limits,
        versions: (u16, u16),
    ) -> Result<(Receiver<S>, VmDescription), MigrationError> {
        let own = HelloParams {
            protocol: Protocol::Migration,
            role: Role::Destination,
            versions,
            features: FEATURE_LZ4,
            max_batch: limits.max_batch,
            max_runs: limits.max_runs,
            max_window: limits.max_window,
        };
        let (mut ch, _peer, _version) = Channel::establish(stream, key, own, limits)?;
        let desc = match ch.recv() {
            Ok((MsgType::Describe, payload)) => wire::decode_describe(payload, &limits),
            Ok(other) => Err(unexpected(other, "while waiting for Describe")),
            Err(e) => Err(e),
        };
        let desc = desc.inspect_err(|e| {
            if !e.is_peer_or_link() {
                ch.send_abort(&e.to_string());
            }
        })?;
        let layout = Layout::new(&desc.regions);
        let receiver = Receiver {
            ch,
            limits,
            phase: Phase::Described,
            desc: desc.clone(),
            layout,
            rx: None,
            stats: ReceiverStats::default(),
        };
        Ok((receiver, desc))
    }

    /// Accepts the VM (guest memory is ready, zero filled, behind `sink`) and receives
    /// it: installs pages through `sink`, taking those this host holds from `source`,
    /// until the source completes. Returns the state blob to restore; nothing is resumed.
    pub fn receive(
        &mut self,
        source: &dyn PageSource,
        sink: &mut dyn GuestSink,
    ) -> Result<ReceivedVm, MigrationError> {
        self.guard(|r| {
            if r.phase != Phase::Described {
                return Err(MigrationError::Misuse("receive called twice"));
            }
            r.phase = Phase::Receiving;
            let manifest =
                Manifest::new(&r.desc.regions).map_err(|_| MigrationError::Malformed {
                    what: "Describe",
                    why: "invalid regions",
                })?;
            let total = r.layout.total();
            r.rx = Some(Box::new(RxState {
                manifest,
                covered: Bitmap::new(total),
                seen: Bitmap::new(total),
                expect: vec![0; total as usize],
                expected: 0,
                examined: 0,
                found: 0,
                holds_any: source.holds_any(),
                stale: Bitmap::new(total),
                have: HashMap::new(),
                round: 1,
                round_open: false,
                next_batch: 0,
                batches_in_round: 0,
                outstanding: VecDeque::new(),
                state: Vec::new(),
                state_total: None,
                postcopy_started: false,
                listed: 0,
                postcopy: Vec::new(),
                present: Vec::new(),
                actions: Vec::new(),
                fetch: Vec::new(),
                direct: Vec::new(),
                fetch_buf: Vec::new(),
                fetch_result: Vec::new(),
                need_bits: Vec::new(),
                page_buf: vec![0; PAGES_PER_MESSAGE * PAGE_SIZE],
                verified: vec![false; PAGES_PER_MESSAGE],
                tmp: Box::new([0; PAGE_SIZE]),
            }));
            r.ch.send(MsgType::Accept, &[])?;
            loop {
                let rx = r.rx.as_mut().expect("receiving");
                let stats = &mut r.stats;
                let msg = r.ch.recv()?;
                if rx.postcopy_started
                    && !matches!(
                        msg.0,
                        MsgType::Missing | MsgType::State | MsgType::Switchover
                    )
                {
                    return Err(unexpected(msg, "after the post-copy list"));
                }
                match msg {
                    (MsgType::Offer, payload) => {
                        let offer = OfferView::decode(payload, &r.limits)?;
                        let answer = rx.offer(&offer, &r.layout, &r.limits, stats, source, sink)?;
                        if let Some((batch, n)) = answer {
                            wire::encode_need(r.ch.begin(), batch, n, &rx.need_bits);
                            r.ch.commit(MsgType::Need)?;
                        }
                    }
                    (MsgType::Summary, payload) => {
                        let summary = wire::Summary::decode(payload)?;
                        let (flags, answers) =
                            rx.summary(&summary, &r.layout, stats, source, sink)?;
                        let answers: Vec<_> = answers.iter().map(|a| a.wire()).collect();
                        wire::encode_answer(r.ch.begin(), summary.batch, flags, &answers);
                        r.ch.commit(MsgType::Answer)?;
                    }
                    (MsgType::Push, payload) => rx.push(payload, &r.layout, stats, sink)?,
                    (MsgType::Pages, payload) => rx.pages(payload, &r.layout, stats, sink)?,
                    (MsgType::RoundEnd, payload) => rx.round_end(payload, &r.limits, stats)?,
                    (MsgType::State, payload) => rx.state(payload, &r.limits)?,
                    (MsgType::Complete, payload) => {
                        let complete = Complete::decode(payload)?;
                        let rx = r.rx.take().expect("receiving");
                        let (manifest, state) = rx.complete(&complete, &r.layout)?;
                        return Ok(r.received(manifest, state, None));
                    }
                    (MsgType::Missing, payload) => {
                        let list = OfferView::decode(payload, &r.limits)?;
                        rx.missing(&list, &r.layout, sink)?;
                    }
                    (MsgType::Switchover, payload) => {
                        let switch = wire::Switchover::decode(payload)?;
                        let rx = r.rx.take().expect("receiving");
                        let (manifest, state, postcopy) = rx.switchover(&switch, &r.layout)?;
                        return Ok(r.received(manifest, state, Some(postcopy)));
                    }
                    other => return Err(unexpected(other, "while receiving pages")),
                }
            }
        })
    }

    /// Sends `Ack`: the guest runs here now and the source may exit. If this fails the
    /// source will resume its copy, so the VMM must stop the guest here.
    pub fn confirm_resumed(&mut self) -> Result<ReceiverStats, MigrationError> {
        self.guard(|r| {
            if r.phase != Phase::Completed {
                return Err(MigrationError::Misuse(
                    "confirm_resumed before the migration completed",
                ));
            }
            r.ch.send(MsgType::Ack, &[])?;
            r.phase = Phase::Done;
            r.stats.set_counters(&r.ch.counters);
            Ok(r.stats.clone())
        })
    }

    /// The channel, once the source switched to post-copy (see [`super::postcopy`]).
    pub(super) fn into_channel(self) -> Result<Channel<S>, MigrationError> {
        if self.phase != Phase::Completed {
            return Err(MigrationError::Misuse("post-copy before the switchover"));
        }
        Ok(self.ch)
    }

    /// Refuses or gives up (e.g. no memory for the guest): tells the source why, best
    /// effort. The receiver is unusable after.
    pub fn abort(&mut self, reason: &str) {
        if !matches!(self.phase, Phase::Done | Phase::Failed) {
            self.ch.send_abort(reason);
            self.phase = Phase::Failed;
        }
    }

    /// The stream underneath (to change its timeouts).
    pub fn stream(&self) -> &S {
        self.ch.stream()
    }

    /// Figures so far.
    pub fn stats(&self) -> ReceiverStats {
        let mut stats = self.stats.clone();
        stats.set_counters(&self.ch.counters);
        stats
    }

    /// The migration is whole (`Complete`, or `Switchover` with the pages still to come in
    /// `postcopy`): the VM as received.
    fn received(
        &mut self,
        manifest: Manifest,
        state: Vec<u8>,
        postcopy: Option<super::PostcopyPages>,
    ) -> ReceivedVm {
        self.stats.state_bytes = state.len() as u64;
        self.stats.set_counters(&self.ch.counters);
        self.phase = Phase::Completed;
        ReceivedVm {
            description: self.desc.clone(),
            state,
            manifest,
            stats: self.stats.clone(),
            postcopy,
        }
    }

    fn guard<T>(
        &mut self,
        op: impl FnOnce(&mut Self) -> Result<T, MigrationError>,
    ) -> Result<T, MigrationError> {
        if matches!(self.phase, Phase::Done | Phase::Failed) {
            return Err(MigrationError::Unusable);
        }
        op(self).inspect_err(|e| {
            self.phase = Phase::Failed;
            self.rx = None;
            if !e.is_peer_or_link() {
                self.ch.send_abort(&e.to_string());
            }
        })
    }
}
