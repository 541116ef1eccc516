//! Whole migrations between a sender and a receiver on two threads over a Unix socket
//! pair (or through a relay that damages, cuts, replays or reorders the stream), with a
//! fake guest in a `Vec<u8>`. No KVM, no root.

mod faults;
mod postcopy;
mod ranges;
mod transfer;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::*;
use crate::identity::{Page, PageId, PAGE_SIZE};
use crate::manifest::{Manifest, Region};
use crate::migration::layout::Layout;
use crate::testutil::fill_page;

const MIB: usize = 1 << 20;

/// Guest memory: regions laid out one after the other in a `Vec<u8>`.
#[derive(Debug, Clone)]
struct Guest {
    regions: Vec<Region>,
    layout: Layout,
    mem: Vec<u8>,
    /// Counts of sink calls when used as the destination's memory.
    writes: u64,
    zeroes: u64,
}

impl Guest {
    fn new(regions: Vec<Region>) -> Guest {
        let layout = Layout::new(&regions);
        let mem = vec![0u8; layout.total() as usize * PAGE_SIZE];
        Guest {
            regions,
            layout,
            mem,
            writes: 0,
            zeroes: 0,
        }
    }

    /// `mib` MiB in two regions: three quarters at 0, a quarter at 4 GiB.
    fn sized(mib: usize) -> Guest {
        let pages = (mib * MIB / PAGE_SIZE) as u64;
        Guest::new(vec![
            Region {
                guest_addr: 0,
                pages: pages * 3 / 4,
            },
            Region {
                guest_addr: 4 << 30,
                pages: pages - pages * 3 / 4,
            },
        ])
    }

    fn total(&self) -> u64 {
        self.layout.total()
    }

    fn gfn(&self, index: u64) -> u64 {
        self.layout.gfn(index)
    }

    fn offset(&self, gfn: u64) -> usize {
        self.layout.index(gfn).expect("gfn in the guest") as usize * PAGE_SIZE
    }

    fn page(&self, gfn: u64) -> &Page {
        let o = self.offset(gfn);
        (&self.mem[o..o + PAGE_SIZE]).try_into().unwrap()
    }

    fn page_mut(&mut self, gfn: u64) -> &mut Page {
        let o = self.offset(gfn);
        (&mut self.mem[o..o + PAGE_SIZE]).try_into().unwrap()
    }

    fn read(&self, gfn: u64, out: &mut Page) {
        out.copy_from_slice(self.page(gfn));
    }

    fn desc(&self) -> VmDescription {
        VmDescription {
            vcpus: 2,
            regions: self.regions.clone(),
            config: b"{\"devices\":[]}".to_vec(),
        }
    }

    /// Every page's identity, hashed lazily region by region.
    fn identities(&self) -> impl Iterator<Item = (u64, Option<PageId>)> + '_ {
        let mut offset = 0;
        self.regions.iter().flat_map(move |r| {
            let len = r.pages as usize * PAGE_SIZE;
            let mem = &self.mem[offset..offset + len];
            offset += len;
            identities(r.first_gfn(), mem)
        })
    }

    /// The identities of `gfns` (a dirty set).
    fn identities_of(&self, gfns: &[u64]) -> Vec<(u64, Option<PageId>)> {
        gfns.iter()
            .map(|&g| (g, crate::identity::identify(self.page(g))))
            .collect()
    }

    fn zero_pages(&self) -> u64 {
        (0..self.total())
            .filter(|&i| crate::identity::is_zero(self.page(self.gfn(i))))
            .count() as u64
    }

    fn distinct_nonzero(&self) -> HashSet<PageId> {
        (0..self.total())
            .filter_map(|i| crate::identity::identify(self.page(self.gfn(i))))
            .collect()
    }

    fn bytes(&self) -> u64 {
        self.mem.len() as u64
    }
}

impl GuestSink for Guest {
    fn write_page(&mut self, gfn: u64, data: &Page) {
        self.writes += 1;
        self.page_mut(gfn).copy_from_slice(data);
    }

    fn zero_page(&mut self, gfn: u64) {
        self.zeroes += 1;
        self.page_mut(gfn).fill(0);
    }

    fn read_page(&self, gfn: u64, out: &mut Page) {
        self.read(gfn, out);
    }
}

/// What a page of a test guest holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    Zero,
    /// Random bytes from a seed (incompressible).
    Random(u64),
    /// Text-like bytes from a seed (compresses about 4:1).
    Text(u64),
}

fn write_content(page: &mut Page, content: Content) {
    match content {
        Content::Zero => page.fill(0),
        Content::Random(seed) => fill_page(page, seed),
        Content::Text(seed) => {
            const WORDS: [&[u8]; 8] = [
                b"guest ", b"page ", b"fabric ", b"memory ", b"the ", b"of ", b"and ", b"vm ",
            ];
            let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut i = 0;
            while i < PAGE_SIZE {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                for &b in WORDS[(s % 8) as usize] {
                    if i < PAGE_SIZE {
                        page[i] = b;
                        i += 1;
                    }
                }
            }
        }
    }
}

/// Fills the guest: page `i` gets `content(i)`.
fn fill(guest: &mut Guest, content: impl Fn(u64) -> Content) {
    for i in 0..guest.total() {
        let gfn = guest.gfn(i);
        write_content(guest.page_mut(gfn), content(i));
    }
}

/// The pages a destination host holds.
#[derive(Debug, Default)]
struct Held {
    pages: HashMap<PageId, Box<Page>>,
    /// Ids for which fetch returns wrong bytes (a sibling VM that changed the page).
    lying: HashSet<PageId>,
    /// Range digests it answers summaries from.
    ranges: Option<RangeIndex>,
    /// Answers that it holds nothing (a host with no VMs and an empty store).
    empty: bool,
}

impl Held {
    /// The non-zero pages of `guest` whose index passes `keep`.
    fn from_guest(guest: &Guest, keep: impl Fn(u64) -> bool) -> Held {
        let mut held = Held::default();
        for i in (0..guest.total()).filter(|&i| keep(i)) {
            let page = guest.page(guest.gfn(i));
            if let Some(id) = crate::identity::identify(page) {
                held.pages.insert(id, Box::new(*page));
            }
        }
        held
    }
}

impl Held {
    /// Also answers range summaries for the ranges of `guests` (in page order).
    fn with_ranges(mut self, guests: &[&Guest]) -> Held {
        let mut index = RangeIndex::new();
        for g in guests {
            index.add(
                (0..g.total())
                    .map(|i| crate::identity::identify(g.page(g.gfn(i))))
                    .collect(),
            );
        }
        self.ranges = Some(index);
        self
    }
}

impl PageSource for Held {
    fn ranges(&self) -> Option<&RangeIndex> {
        self.ranges.as_ref()
    }

    fn holds_any(&self) -> bool {
        !self.empty
    }

    fn fetch(&self, id: &PageId, out: &mut Page) -> bool {
        match self.pages.get(id) {
            Some(p) => {
                out.copy_from_slice(&p[..]);
                if self.lying.contains(id) {
                    out[0] ^= 1;
                }
                true
            }
            None => false,
        }
    }
}

/// What the destination thread ended with.
#[derive(Debug)]
struct Dest {
    result: Result<ReceiverStats, MigrationError>,
    /// The destination's guest memory, once it accepted.
    memory: Option<Guest>,
    state: Vec<u8>,
    manifest: Option<Manifest>,
    description: Option<VmDescription>,
}

/// A connected pair of sockets with generous timeouts (a hung test fails, not hangs).
fn socket_pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    (a, b)
}

fn key() -> MigrationKey {
    MigrationKey::new(b"0123456789abcdef0123456789abcdef").unwrap()
}

/// Runs the destination's side on a thread: accept, receive into fresh memory, ready,
/// confirm.
fn spawn_destination(
    stream: UnixStream,
    key: MigrationKey,
    limits: Limits,
    held: Arc<Held>,
) -> JoinHandle<Dest> {
    thread::spawn(move || {
        let mut dest = Dest {
            result: Err(MigrationError::Unusable),
            memory: None,
            state: Vec::new(),
            manifest: None,
            description: None,
        };
        let (mut r, desc) = match Receiver::accept(stream, &key, limits) {
            Ok(x) => x,
            Err(e) => {
                dest.result = Err(e);
                return dest;
            }
        };
        dest.description = Some(desc.clone());
        let mut memory = Guest::new(desc.regions.clone());
        let received = r.receive(&*held, &mut memory);
        dest.memory = Some(memory);
        let vm = match received {
            Ok(vm) => vm,
            Err(e) => {
                dest.result = Err(e);
                return dest;
            }
        };
        dest.state = vm.state;
        dest.manifest = Some(vm.manifest);
        dest.result = r.confirm_resumed();
        dest
    })
}

/// The source's side of a one-round migration of a static guest.
fn send_all(
    stream: UnixStream,
    key: &MigrationKey,
    config: SenderConfig,
    guest: &Guest,
    state: &[u8],
) -> Result<MigrationStats, MigrationError> {
    let mut s = Sender::connect(stream, key, config)?;
    s.describe(&guest.desc())?;
    let read = |gfn, out: &mut Page| guest.read(gfn, out);
    s.round(guest.identities(), &read)?;
    s.finish(&[], &read, state)
}

/// Migrates a static guest over a socket pair to a destination holding `held`.
fn migrate(guest: &Guest, held: Held, config: SenderConfig) -> (MigrationStats, Dest) {
    let (a, b) = socket_pair();
    let dest = spawn_destination(b, key(), Limits::default(), Arc::new(held));
    let stats = send_all(a, &key(), config, guest, b"state blob").expect("sender");
    let dest = dest.join().unwrap();
    dest.result.as_ref().expect("receiver");
    (stats, dest)
}

/// Asserts the destination's memory equals the source's.
fn assert_same_memory(src: &Guest, dest: &Dest) {
    let memory = dest.memory.as_ref().expect("destination memory");
    for i in 0..src.total() {
        let gfn = src.gfn(i);
        assert!(
            memory.page(gfn) == src.page(gfn),
            "page at gfn {gfn:#x} differs"
        );
    }
    let manifest = dest.manifest.as_ref().expect("manifest");
    for (gfn, id) in manifest.iter() {
        assert_eq!(
            id,
            crate::identity::identify(src.page(gfn)),
            "manifest at {gfn:#x}"
        );
    }
}

/// Asserts every page the destination holds is zero or the source's page: nothing bad
/// was installed.
fn assert_nothing_bad_installed(src: &Guest, dest: &Dest) {
    let Some(memory) = dest.memory.as_ref() else {
        return;
    };
    for i in 0..src.total() {
        let gfn = src.gfn(i);
        let page = memory.page(gfn);
        assert!(
            crate::identity::is_zero(page) || page == src.page(gfn),
            "bad page installed at {gfn:#x}"
        );
    }
}

/// Copies bytes from `from` to `to`; `hook(offset, bytes)` may change them and returns
/// how many to forward (fewer cuts the link: every socket is shut down).
fn pipe(
    mut from: UnixStream,
    mut to: UnixStream,
    all: Vec<UnixStream>,
    mut hook: impl FnMut(u64, &mut [u8]) -> usize + Send + 'static,
) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut offset = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let keep = hook(offset, &mut buf[..n]);
            if to.write_all(&buf[..keep]).is_err() || keep < n {
                break;
            }
            offset += n as u64;
        }
        for s in &all {
            let _ = s.shutdown(Shutdown::Both);
        }
    })
}

/// A relay between a source socket and a destination socket: `sd` hooks the source's
/// bytes, `ds` the destination's.
fn relay(
    sd: impl FnMut(u64, &mut [u8]) -> usize + Send + 'static,
    ds: impl FnMut(u64, &mut [u8]) -> usize + Send + 'static,
) -> (UnixStream, UnixStream, Vec<JoinHandle<()>>) {
    let (src, relay_s) = socket_pair();
    let (relay_d, dst) = socket_pair();
    // Shutting the relay's own ends down cuts both endpoints; holding clones of the
    // endpoints here would keep a closed endpoint's socket open.
    let all = vec![relay_s.try_clone().unwrap(), relay_d.try_clone().unwrap()];
    let clone = |s: &UnixStream| s.try_clone().unwrap();
    let handles = vec![
        pipe(
            clone(&relay_s),
            clone(&relay_d),
            all.iter().map(clone).collect(),
            sd,
        ),
        pipe(relay_d, relay_s, all, ds),
    ];
    (src, dst, handles)
}

/// Forwards everything.
fn pass(_: u64, b: &mut [u8]) -> usize {
    b.len()
}

/// A relay that passes the destination's bytes and hands each of the source's frames
/// (after the hello) to `plan`, which returns the frames to forward in its place.
fn frame_relay(
    mut plan: impl FnMut(usize, Vec<u8>) -> Vec<Vec<u8>> + Send + 'static,
) -> (UnixStream, UnixStream, Vec<JoinHandle<()>>) {
    let (src, relay_s) = socket_pair();
    let (relay_d, dst) = socket_pair();
    // Shutting the relay's own ends down cuts both endpoints; holding clones of the
    // endpoints here would keep a closed endpoint's socket open.
    let all = vec![relay_s.try_clone().unwrap(), relay_d.try_clone().unwrap()];
    let clone = |s: &UnixStream| s.try_clone().unwrap();
    let back = pipe(
        clone(&relay_d),
        clone(&relay_s),
        all.iter().map(clone).collect(),
        pass,
    );
    let mut from = relay_s;
    let mut to = relay_d;
    let forward = thread::spawn(move || {
        let mut hello = [0u8; wire::HELLO_LEN];
        let ok = from.read_exact(&mut hello).is_ok() && to.write_all(&hello).is_ok();
        let mut index = 0;
        if ok {
            loop {
                let mut header = [0u8; wire::HEADER_LEN];
                if from.read_exact(&mut header).is_err() {
                    break;
                }
                let len = wire::Header::decode(&header).len as usize;
                let mut frame = header.to_vec();
                frame.resize(wire::HEADER_LEN + len + wire::MAC_LEN, 0);
                if from.read_exact(&mut frame[wire::HEADER_LEN..]).is_err() {
                    break;
                }
                let out = plan(index, frame);
                index += 1;
                if out.iter().any(|f| to.write_all(f).is_err()) {
                    break;
                }
            }
        }
        for s in &all {
            let _ = s.shutdown(Shutdown::Both);
        }
    });
    (src, dst, vec![back, forward])
}
