//! A scripted migration peer for the `migration_receiver` and `migration_sender` fuzz
//! targets and the tests: it performs a genuine handshake with a [`Receiver`] or a
//! [`Sender`] (answering its fresh nonce), then feeds it bytes or frames chosen by the
//! fuzzer, framed with valid MACs and sequence numbers when asked, so fuzzing reaches past
//! authentication into the decoders and the state machines. Compiled for tests and with the
//! `fuzzing` feature only.

use std::collections::HashMap;
use std::io::{self, Read, Write};

use super::channel::{encode_frame, Session};
use super::ranges::{digest, RangeIndex};
use super::wire::{
    self, Hello, MsgType, Protocol, RangeAnswer, Role, HELLO_LEN, VERSION_MAX, VERSION_MIN,
};
use super::{
    Compression, GuestSink, Limits, MigrationKey, PageSource, Receiver, Sender, SenderConfig,
    Transport, VmDescription,
};
use crate::identity::{Page, PageId, PAGE_SIZE};
use crate::manifest::Region;

/// What the scripted peer sends.
#[derive(Debug, Clone)]
pub enum Script {
    /// The whole stream, hello included, as given.
    Raw(Vec<u8>),
    /// A valid hello and key proof, then these bytes as they are.
    AfterAuth(Vec<u8>),
    /// A valid hello and key proof, then these messages `(type, payload)`, each framed
    /// with its sequence number and a valid MAC.
    Frames(Vec<(u8, Vec<u8>)>),
}

/// A byte stream that plays one side of a migration from a [`Script`].
#[derive(Debug)]
pub struct ScriptedPeer {
    key: MigrationKey,
    role: Role,
    hello: [u8; HELLO_LEN],
    script: Option<Script>,
    out: Vec<u8>,
    pos: usize,
    /// The first bytes the other end wrote (its hello).
    peer_hello: Vec<u8>,
}

impl ScriptedPeer {
    /// A peer in `role` that will speak `script` with `key`.
    pub fn new(key: MigrationKey, role: Role, script: Script) -> ScriptedPeer {
        let hello = Hello {
            version_min: VERSION_MIN,
            version_max: VERSION_MAX,
            role,
            features: wire::FEATURE_LZ4,
            max_batch: 4096,
            max_runs: 4096,
            max_window: 64,
            nonce: [0x5a; 32],
        }
        .encode();
        let (out, script) = match script {
            Script::Raw(bytes) => (bytes, None),
            other => (hello.to_vec(), Some(other)),
        };
        ScriptedPeer {
            key,
            role,
            hello,
            script,
            out,
            pos: 0,
            peer_hello: Vec::new(),
        }
    }

    /// Once the receiver's hello is known: the proof, then the scripted part.
    fn generate(&mut self) {
        let Some(script) = self.script.take() else {
            return;
        };
        let peer: [u8; HELLO_LEN] = self.peer_hello[..HELLO_LEN].try_into().expect("64 bytes");
        let (key, proof) = match self.role {
            Role::Source => {
                let s = Session::derive(&self.key, Protocol::Migration, &self.hello, &peer);
                (s.source_to_destination, s.source_proof)
            }
            Role::Destination => {
                let s = Session::derive(&self.key, Protocol::Migration, &peer, &self.hello);
                (s.destination_to_source, s.destination_proof)
            }
        };
        self.out = encode_frame(&key, MsgType::Auth as u8, 0, &proof);
        self.pos = 0;
        match script {
            Script::Raw(_) => {}
            Script::AfterAuth(bytes) => self.out.extend_from_slice(&bytes),
            Script::Frames(frames) => {
                for (i, (kind, payload)) in frames.iter().enumerate() {
                    let frame = encode_frame(&key, *kind, i as u64 + 1, payload);
                    self.out.extend_from_slice(&frame);
                }
            }
        }
    }
}

impl Read for ScriptedPeer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.out.len() && self.peer_hello.len() >= HELLO_LEN {
            self.generate();
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Transport for ScriptedPeer {}

impl Write for ScriptedPeer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let keep = buf
            .len()
            .min(HELLO_LEN.saturating_sub(self.peer_hello.len()));
        self.peer_hello.extend_from_slice(&buf[..keep]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The key the fuzz target uses.
pub fn fuzz_key() -> MigrationKey {
    MigrationKey::new(b"fabvm fuzzing key, not a secret").expect("long enough")
}

/// Small limits, so the fuzzer explores logic rather than allocation.
pub fn fuzz_limits() -> Limits {
    Limits {
        max_batch: 64,
        max_runs: 64,
        max_window: 4,
        max_regions: 4,
        max_pages: 4096,
        max_vcpus: 8,
        max_config: 4096,
        max_state: 1 << 16,
        max_rounds: 8,
    }
}

/// The VM described when the fuzz input asks for a valid `Describe` first: 16 pages at 0
/// and 8 pages at 256 MiB.
pub fn fuzz_description() -> VmDescription {
    VmDescription {
        vcpus: 1,
        regions: vec![
            Region {
                guest_addr: 0,
                pages: 16,
            },
            Region {
                guest_addr: 0x1000_0000,
                pages: 8,
            },
        ],
        config: Vec::new(),
    }
}

/// Pages the fuzz [`PageSource`] holds: every byte `k`, for `k` in 1..=3.
pub fn held_page(k: u8) -> Box<Page> {
    Box::new([k; PAGE_SIZE])
}

/// Holds [`held_page`]`(1..=3)`; answers ids starting with 0xff with a page that does not
/// match (a racing sibling VM); holds nothing else. Its range index holds the 16 pages
/// [`held_ids`].
#[derive(Debug)]
pub struct FuzzSource {
    pages: HashMap<PageId, Box<Page>>,
    ranges: RangeIndex,
}

/// The 16 pages of the one range [`FuzzSource`] indexes: the three held pages, then zeros.
pub fn held_ids() -> Vec<Option<PageId>> {
    let mut ids: Vec<Option<PageId>> = (1..=3).map(|k| Some(PageId::of(&held_page(k)))).collect();
    ids.resize(16, None);
    ids
}

impl Default for FuzzSource {
    fn default() -> Self {
        let pages = (1..=3)
            .map(|k| {
                let p = held_page(k);
                (PageId::of(&p), p)
            })
            .collect();
        let mut ranges = RangeIndex::new();
        ranges.add(held_ids());
        FuzzSource { pages, ranges }
    }
}

impl PageSource for FuzzSource {
    fn ranges(&self) -> Option<&RangeIndex> {
        Some(&self.ranges)
    }

    fn fetch(&self, id: &PageId, out: &mut Page) -> bool {
        if let Some(p) = self.pages.get(id) {
            out.copy_from_slice(&p[..]);
            true
        } else if id.0[0] == 0xff {
            out.fill(0xee);
            true
        } else {
            false
        }
    }
}

/// Guest memory as a map, which panics (a finding) if the receiver touches a frame outside
/// the description or reads back a frame it never wrote.
#[derive(Debug)]
pub struct CheckedSink {
    regions: Vec<Region>,
    pages: HashMap<u64, Box<Page>>,
}

impl CheckedSink {
    /// Memory for `desc`, all zero.
    pub fn new(desc: &VmDescription) -> CheckedSink {
        CheckedSink {
            regions: desc.regions.clone(),
            pages: HashMap::new(),
        }
    }

    /// Frames holding data.
    pub fn written(&self) -> usize {
        self.pages.len()
    }

    fn check(&self, gfn: u64) {
        assert!(
            self.regions
                .iter()
                .any(|r| gfn >= r.first_gfn() && gfn - r.first_gfn() < r.pages),
            "receiver touched frame {gfn:#x} outside the guest"
        );
    }
}

impl GuestSink for CheckedSink {
    fn write_page(&mut self, gfn: u64, data: &Page) {
        self.check(gfn);
        self.pages.insert(gfn, Box::new(*data));
    }

    fn zero_page(&mut self, gfn: u64) {
        self.check(gfn);
        assert!(
            self.pages.remove(&gfn).is_some(),
            "zeroed a frame never written"
        );
    }

    fn read_page(&self, gfn: u64, out: &mut Page) {
        self.check(gfn);
        let page = self
            .pages
            .get(&gfn)
            .expect("read back a frame never written");
        out.copy_from_slice(&page[..]);
    }
}

/// Splits fuzz bytes into messages: type u8, length u16, payload (cut at the end).
fn frames_from(mut data: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while data.len() >= 3 {
        let kind = data[0];
        let len = usize::from(u16::from_le_bytes([data[1], data[2]])).min(data.len() - 3);
        frames.push((kind, data[3..3 + len].to_vec()));
        data = &data[3 + len..];
    }
    frames
}

/// The fuzz target's body: the first byte picks how the rest reaches a [`Receiver`]
/// (0: the raw stream, hello included; 1: raw bytes after a valid handshake; 2: framed
/// messages after a valid handshake and `Describe`; 3: framed messages after a valid
/// handshake), which is then driven to the end. Must never panic.
/// Returns whether the migration completed (`Ack` sent).
pub fn run_receiver(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let script = match mode % 4 {
        0 => Script::Raw(rest.to_vec()),
        1 => Script::AfterAuth(rest.to_vec()),
        2 => {
            let mut describe = Vec::new();
            wire::encode_describe(&mut describe, &fuzz_description());
            let mut frames = vec![(MsgType::Describe as u8, describe)];
            frames.extend(frames_from(rest));
            Script::Frames(frames)
        }
        _ => Script::Frames(frames_from(rest)),
    };
    let key = fuzz_key();
    let stream = ScriptedPeer::new(key.clone(), Role::Source, script);
    let Ok((mut receiver, desc)) = Receiver::accept(stream, &key, fuzz_limits()) else {
        return false;
    };
    let mut sink = CheckedSink::new(&desc);
    if let Ok(vm) = receiver.receive(&FuzzSource::default(), &mut sink) {
        if let Some(pages) = &vm.postcopy {
            return run_postcopy(receiver, pages, &desc);
        }
        // A completed migration covered every page, and what was installed matches the
        // manifest the receiver reports.
        for (gfn, id) in vm.manifest.iter() {
            match (id, sink.pages.get(&gfn)) {
                (None, None) => {}
                (Some(id), Some(page)) => assert!(id.matches(page), "installed page {gfn:#x}"),
                (None, Some(page)) => assert!(page.iter().all(|&b| b == 0)),
                (Some(_), None) => panic!("frame {gfn:#x} in the manifest but not installed"),
            }
        }
        return receiver.confirm_resumed().is_ok();
    }
    false
}

/// Post-copy after a fuzzed switch: the rest of the input's frames are the source's pages.
/// Every page installed must be listed and match its identity. Returns whether every page
/// came.
fn run_postcopy(
    receiver: Receiver<ScriptedPeer>,
    pages: &super::PostcopyPages,
    desc: &VmDescription,
) -> bool {
    let listed: std::collections::HashMap<u64, PageId> = pages.missing.iter().copied().collect();
    let Ok(mut dest) = receiver.into_postcopy(pages) else {
        return false;
    };
    if dest.confirm_resumed().is_err() {
        return false;
    }
    let mut sink = CheckedSink::new(desc);
    while dest.table().remaining() > 0 {
        let installed = dest.recv(&mut |gfn, page| {
            let id = listed.get(&gfn).expect("installed a page not listed");
            assert!(id.matches(page), "installed page {gfn:#x} does not match");
            sink.write_page(gfn, page);
            Ok(())
        });
        if installed.is_err() {
            return false;
        }
    }
    dest.finish().is_ok()
}

/// Valid inputs for [`run_receiver`] (seeds for the fuzzer's corpus): whole migrations of
/// [`fuzz_description`] with held, sent (raw, lz4, known) and zero pages, two rounds and
/// state; one by offers, one by range summaries (held, descended to an offer) and a push.
pub fn seed_inputs() -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let push = |frames: &[(MsgType, Vec<u8>)], mode: u8| {
        let mut input = vec![mode];
        for (kind, payload) in frames {
            input.push(*kind as u8);
            input.extend_from_slice(&(payload.len() as u16).to_le_bytes());
            input.extend_from_slice(payload);
        }
        input
    };
    let held: Vec<PageId> = (1..=3).map(|k| PageId::of(&held_page(k))).collect();
    let text = Box::new([b'x'; PAGE_SIZE]);
    let text_id = PageId::of(&text);
    let mut random = Box::new([0u8; PAGE_SIZE]);
    fill(&mut random);
    let random_id = PageId::of(&random);

    // Round 1: frames 0..16 (3 held, 2 sent and 1 known, the rest zero), 0x10000..+8 zero.
    let mut offer = Vec::new();
    let runs = [
        wire::Run {
            first: 0,
            count: 6,
            zero: false,
        },
        wire::Run {
            first: 6,
            count: 10,
            zero: true,
        },
        wire::Run {
            first: 0x10000,
            count: 8,
            zero: true,
        },
    ];
    let ids = [held[0], held[1], held[2], text_id, random_id, text_id];
    wire::encode_offer(&mut offer, 0, 1, &runs, &ids);
    let mut block = [0u8; wire::COMPRESS_BUF];
    let len = wire::compress_page(&text, &mut block).expect("compresses");
    let mut pages = Vec::new();
    wire::encode_pages(
        &mut pages,
        0,
        0,
        &[
            wire::PageEntry {
                new_id: None,
                body: wire::Body::Lz4(&block[..len]),
            },
            wire::PageEntry {
                new_id: None,
                body: wire::Body::Raw(&random),
            },
            wire::PageEntry {
                new_id: None,
                body: wire::Body::Known,
            },
        ],
    );
    let mut end1 = Vec::new();
    wire::encode_round_end(&mut end1, 1, 1);

    // Round 2: frame 3 dirty, now a held page; frame 4 now zero.
    let mut offer2 = Vec::new();
    let runs2 = [
        wire::Run {
            first: 3,
            count: 1,
            zero: false,
        },
        wire::Run {
            first: 4,
            count: 1,
            zero: true,
        },
    ];
    wire::encode_offer(&mut offer2, 1, 2, &runs2, &[held[0]]);
    let mut end2 = Vec::new();
    wire::encode_round_end(&mut end2, 2, 1);
    let (state_msg, complete) = state_and_complete(2);

    let frames = vec![
        (MsgType::Offer, offer),
        (MsgType::Pages, pages),
        (MsgType::RoundEnd, end1),
        (MsgType::Offer, offer2),
        (MsgType::RoundEnd, end2),
        (MsgType::State, state_msg),
        (MsgType::Complete, complete),
    ];
    seeds.push(push(&frames, 2));
    let mut describe = Vec::new();
    wire::encode_describe(&mut describe, &fuzz_description());
    let mut with_describe = vec![(MsgType::Describe, describe)];
    with_describe.extend(frames.iter().cloned());
    seeds.push(push(&with_describe, 3));
    seeds.push(push(&v3_frames(&random, random_id, &text, text_id), 2));
    seeds.push(push(
        &postcopy_frames(&random, random_id, &text, text_id),
        2,
    ));
    seeds.push(vec![1, 17, 0, 0, 0, 0]);
    seeds.push(vec![0]);
    seeds
}

/// Post-copy at once: every frame listed (frames 0 and 1 with data, the rest zero), the
/// state and `Switchover`, then the two pages (lz4 and raw).
fn postcopy_frames(
    random: &Page,
    random_id: PageId,
    text: &Page,
    text_id: PageId,
) -> Vec<(MsgType, Vec<u8>)> {
    let desc = fuzz_description();
    let mut frames = Vec::new();
    for (i, r) in desc.regions.iter().enumerate() {
        let mut runs = Vec::new();
        let mut ids = Vec::new();
        if i == 0 {
            runs.push(wire::Run {
                first: r.first_gfn(),
                count: 2,
                zero: false,
            });
            ids = vec![text_id, random_id];
        }
        let skip = if i == 0 { 2 } else { 0 };
        runs.push(wire::Run {
            first: r.first_gfn() + skip,
            count: (r.pages - skip) as u32,
            zero: true,
        });
        let mut list = Vec::new();
        wire::encode_offer(&mut list, i as u32, 0, &runs, &ids);
        frames.push((MsgType::Missing, list));
    }
    let state = b"fuzz state".to_vec();
    let mut state_msg = Vec::new();
    wire::encode_state(&mut state_msg, state.len() as u64, 0, &state);
    frames.push((MsgType::State, state_msg));
    let mut switch = Vec::new();
    wire::Switchover {
        rounds: 0,
        state_len: state.len() as u64,
        state_hash: *blake3::hash(&state).as_bytes(),
        listed: 2,
    }
    .encode(&mut switch);
    frames.push((MsgType::Switchover, switch));
    let mut block = [0u8; wire::COMPRESS_BUF];
    let len = wire::compress_page(text, &mut block).expect("compresses");
    let first = desc.regions[0].first_gfn();
    let mut pages = Vec::new();
    wire::begin_post_pages(&mut pages, 2);
    wire::put_post_page(&mut pages, first, wire::PostBody::Lz4(&block[..len]));
    wire::put_post_page(&mut pages, first + 1, wire::PostBody::Raw(random));
    frames.push((MsgType::PostPages, pages));
    frames
}

/// Fills `page` with pseudo-random bytes (xorshift), so it does not compress.
fn fill(page: &mut Page) {
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for w in page.chunks_exact_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        w.copy_from_slice(&s.to_le_bytes());
    }
}

/// A version 3 migration of [`fuzz_description`] after `Describe`: round 1 as two ranges (the
/// first held, the second descended to a sub-range and then offered page by page), round 2
/// a push of frame 5, then state and `Complete`.
fn v3_frames(
    random: &Page,
    random_id: PageId,
    text: &Page,
    text_id: PageId,
) -> Vec<(MsgType, Vec<u8>)> {
    let mut tail_ids = vec![None; 8];
    tail_ids[0] = Some(random_id);
    let ranges = [
        wire::RangeSummary {
            first: 0,
            pages: 16,
            digest: digest(&held_ids()),
        },
        wire::RangeSummary {
            first: 16,
            pages: 8,
            digest: digest(&tail_ids),
        },
    ];
    let mut top = Vec::new();
    wire::encode_summary(&mut top, 0, 1, 0, &ranges);
    let mut sub = Vec::new();
    wire::encode_summary(&mut sub, 1, 1, 1, &ranges[1..]);
    let mut offer = Vec::new();
    let runs = [
        wire::Run {
            first: 0x10000,
            count: 1,
            zero: false,
        },
        wire::Run {
            first: 0x10001,
            count: 7,
            zero: true,
        },
    ];
    wire::encode_offer(&mut offer, 2, 1, &runs, &[random_id]);
    let mut pages = Vec::new();
    let raw = wire::PageEntry {
        new_id: None,
        body: wire::Body::Raw(random),
    };
    wire::encode_pages(&mut pages, 2, 0, &[raw]);
    let mut end1 = Vec::new();
    wire::encode_round_end(&mut end1, 1, 3);
    let mut push = Vec::new();
    let text_entry = wire::PageEntry {
        new_id: None,
        body: wire::Body::Raw(text),
    };
    wire::encode_push(
        &mut push,
        2,
        &[(5, 1)],
        &[text_entry],
        &wire::push_digest(&[text_id]),
    );
    let mut end2 = Vec::new();
    wire::encode_round_end(&mut end2, 2, 0);
    let (state, complete) = state_and_complete(2);
    vec![
        (MsgType::Summary, top),
        (MsgType::Summary, sub),
        (MsgType::Offer, offer),
        (MsgType::Pages, pages),
        (MsgType::RoundEnd, end1),
        (MsgType::Push, push),
        (MsgType::RoundEnd, end2),
        (MsgType::State, state),
        (MsgType::Complete, complete),
    ]
}

/// A `State` message and the `Complete` after `rounds` rounds.
fn state_and_complete(rounds: u32) -> (Vec<u8>, Vec<u8>) {
    let state = b"vcpu state".to_vec();
    let mut state_msg = Vec::new();
    wire::encode_state(&mut state_msg, state.len() as u64, 0, &state);
    let mut complete = Vec::new();
    wire::Complete {
        rounds,
        state_len: state.len() as u64,
        state_hash: *blake3::hash(&state).as_bytes(),
    }
    .encode(&mut complete);
    (state_msg, complete)
}

/// Page `i` (dense index) of the guest [`run_sender`] migrates: every third zero, pages 1-3
/// the ones [`FuzzSource`] holds, the rest a byte pattern.
fn sender_page(i: u64) -> Box<Page> {
    match i {
        1..=3 => held_page(i as u8),
        _ if i.is_multiple_of(3) => Box::new([0; PAGE_SIZE]),
        _ => Box::new([0x40 + i as u8; PAGE_SIZE]),
    }
}

/// The fuzz target's body for the source side: a [`Sender`] migrates a 24-page guest
/// ([`fuzz_description`]) to a scripted destination whose messages after a genuine
/// handshake are the fuzz input (type u8, length u16, payload, repeated): round 1 by range
/// summaries, a round over three dirty frames, and the final push. Must never panic, and
/// never read a frame outside the guest. Returns whether the sender saw its `Ack`.
pub fn run_sender(data: &[u8]) -> bool {
    let key = fuzz_key();
    let stream = ScriptedPeer::new(
        key.clone(),
        Role::Destination,
        Script::Frames(frames_from(data)),
    );
    let config = SenderConfig {
        batch: 64,
        window: 4,
        compression: Compression::Lz4,
        limits: fuzz_limits(),
    };
    let Ok(mut sender) = Sender::connect(stream, &key, config) else {
        return false;
    };
    let desc = fuzz_description();
    let layout = super::layout::Layout::new(&desc.regions);
    let read = |gfn: u64, out: &mut Page| {
        let i = layout
            .index(gfn)
            .expect("the sender read a frame outside the guest");
        out.copy_from_slice(&sender_page(i)[..]);
    };
    let all: Vec<(u64, Option<PageId>)> = (0..layout.total())
        .map(|i| (layout.gfn(i), crate::identity::identify(&sender_page(i))))
        .collect();
    sender.describe(&desc).is_ok()
        && sender.round(all, &read).is_ok()
        && sender.round_frames(&[0, 1, 0x10000], &read).is_ok()
        && sender.finish(&[2], &read, b"state").is_ok()
}

/// Valid inputs for [`run_sender`]: the destination holds the range; it has it descend to
/// an offer it answers; it asks for pushes.
pub fn sender_seed_inputs() -> Vec<Vec<u8>> {
    let frames = |list: Vec<(MsgType, Vec<u8>)>| {
        let mut input = Vec::new();
        for (kind, payload) in list {
            input.push(kind as u8);
            input.extend_from_slice(&(payload.len() as u16).to_le_bytes());
            input.extend_from_slice(&payload);
        }
        input
    };
    let answer = |batch: u32, flags: u8, a: RangeAnswer<'_>| {
        let mut out = Vec::new();
        wire::encode_answer(&mut out, batch, flags, &[a]);
        (MsgType::Answer, out)
    };
    let need = |batch: u32, n: usize, all: bool| {
        let mut out = Vec::new();
        let mut bits = vec![if all { 0xff } else { 0 }; n.div_ceil(8)];
        if all && !n.is_multiple_of(8) {
            *bits.last_mut().expect("a byte") = (1 << (n % 8)) - 1;
        }
        wire::encode_need(&mut out, batch, n, &bits);
        (MsgType::Need, out)
    };
    let accept = (MsgType::Accept, Vec::new());
    let ack = (MsgType::Ack, Vec::new());
    vec![
        frames(vec![
            accept.clone(),
            answer(0, 0, RangeAnswer::Held),
            need(1, 2, true),
            ack.clone(),
        ]),
        frames(vec![
            accept.clone(),
            answer(0, 0, RangeAnswer::Descend),
            answer(1, 0, RangeAnswer::Descend),
            need(2, 16, false),
            need(3, 2, true),
            ack.clone(),
        ]),
        frames(vec![
            accept,
            answer(0, wire::ANSWER_PUSH_LATER, RangeAnswer::Push),
            ack,
        ]),
    ]
}
