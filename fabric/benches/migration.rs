//! Benchmarks of the migration protocol: encoding and decoding of offers and page messages
//! (raw and lz4), and whole migrations of a 64 MiB guest between two threads over a Unix
//! socket pair (nothing held at the destination, everything held, compressible pages).
//!
//! Run with `cargo bench -p fabric --bench migration`; throughput is identities or bytes
//! of guest memory per second.

use std::collections::HashMap;
use std::hint::black_box;
use std::os::unix::net::UnixStream;
use std::thread;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fabric::manifest::Region;
use fabric::migration::wire::{self, Body, OfferView, PageEntry, Run};
use fabric::migration::{
    identities, GuestSink, Limits, MigrationKey, NoPages, PageSource, Receiver, Sender,
    SenderConfig, VmDescription,
};
use fabric::{Page, PageId, PAGE_SIZE};

const MIB: usize = 1 << 20;

/// Random (incompressible) page content from a seed (xorshift).
fn random_page(page: &mut [u8], seed: u64) {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for w in page.chunks_exact_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        w.copy_from_slice(&s.to_le_bytes());
    }
}

/// Text-like page content from a seed (compresses about 4:1 with lz4).
fn text_page(page: &mut [u8], seed: u64) {
    const WORDS: [&[u8]; 8] = [
        b"guest ", b"page ", b"fabric ", b"memory ", b"the ", b"of ", b"and ", b"vm ",
    ];
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut i = 0;
    while i < page.len() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        for &b in WORDS[(s % 8) as usize] {
            if i < page.len() {
                page[i] = b;
                i += 1;
            }
        }
    }
}

fn offers(c: &mut Criterion) {
    let mut g = c.benchmark_group("offer");
    let limits = Limits::default();
    let ids: Vec<PageId> = (0..4096u32)
        .map(|i| PageId(*blake3::hash(&i.to_le_bytes()).as_bytes()))
        .collect();
    // A typical first-round batch: data and zero runs alternating every 64 pages.
    let mut runs = Vec::new();
    let mut gfn = 0;
    for _ in 0..64 {
        runs.push(Run {
            first: gfn,
            count: 64,
            zero: false,
        });
        runs.push(Run {
            first: gfn + 64,
            count: 16,
            zero: true,
        });
        gfn += 80;
    }
    let mut out = Vec::new();
    g.throughput(Throughput::Elements(ids.len() as u64));
    g.bench_function("encode_4096_ids", |b| {
        b.iter(|| {
            out.clear();
            wire::encode_offer(&mut out, 1, 1, black_box(&runs), black_box(&ids));
            black_box(&out);
        })
    });
    g.bench_function("decode_4096_ids", |b| {
        b.iter(|| {
            let v = OfferView::decode(black_box(&out), &limits).unwrap();
            let mut n = 0u64;
            for run in v.runs() {
                n += u64::from(run.count);
            }
            let mut x = 0u8;
            for i in 0..v.id_count() {
                x ^= v.id(i).0[0];
            }
            black_box((n, x))
        })
    });
    g.finish();
}

fn as_page(b: &[u8]) -> &Page {
    b.try_into().unwrap()
}

/// `bytes` of random pages and as many text-like pages, page `i` of each from seed `i`.
fn random_and_text(bytes: usize) -> (Vec<u8>, Vec<u8>) {
    let mut random = vec![0u8; bytes];
    let mut text = vec![0u8; bytes];
    for (i, (r, t)) in random
        .chunks_exact_mut(PAGE_SIZE)
        .zip(text.chunks_exact_mut(PAGE_SIZE))
        .enumerate()
    {
        random_page(r, i as u64);
        text_page(t, i as u64);
    }
    (random, text)
}

fn pages(c: &mut Criterion) {
    let mut g = c.benchmark_group("pages");
    let n = wire::PAGES_PER_MESSAGE;
    let (random, text) = random_and_text(n * PAGE_SIZE);
    g.throughput(Throughput::Bytes((n * PAGE_SIZE) as u64));

    let mut out = Vec::new();
    let encode_raw = |out: &mut Vec<u8>| {
        out.clear();
        let entries: Vec<PageEntry> = random
            .chunks_exact(PAGE_SIZE)
            .map(|p| PageEntry {
                new_id: None,
                body: Body::Raw(as_page(p)),
            })
            .collect();
        wire::encode_pages(out, 0, 0, &entries);
    };
    g.bench_function("encode_raw_256", |b| b.iter(|| encode_raw(&mut out)));
    let mut raw_msg = Vec::new();
    encode_raw(&mut raw_msg);
    let mut entries = Vec::new();
    let mut page = [0u8; PAGE_SIZE];
    g.bench_function("decode_raw_256", |b| {
        b.iter(|| {
            wire::decode_pages(black_box(&raw_msg), &mut entries).unwrap();
            for e in &entries {
                wire::decode_page(&e.body, &mut page).unwrap();
            }
            black_box(&page);
        })
    });

    let mut comp = vec![[0u8; wire::COMPRESS_BUF]; n];
    let mut encode_lz4 = |out: &mut Vec<u8>, src: &[u8]| {
        out.clear();
        let entries: Vec<PageEntry> = src
            .chunks_exact(PAGE_SIZE)
            .zip(comp.iter_mut())
            .map(|(p, buf)| {
                let body = match wire::compress_page(as_page(p), buf) {
                    Some(len) => Body::Lz4(&buf[..len]),
                    None => Body::Raw(as_page(p)),
                };
                PageEntry { new_id: None, body }
            })
            .collect();
        wire::encode_pages(out, 0, 0, &entries);
    };
    g.bench_function("encode_lz4_text_256", |b| {
        b.iter(|| encode_lz4(&mut out, &text))
    });
    g.bench_function("encode_lz4_random_256", |b| {
        b.iter(|| encode_lz4(&mut out, &random))
    });
    let mut lz4_msg = Vec::new();
    encode_lz4(&mut lz4_msg, &text);
    let mut entries = Vec::new();
    g.bench_function("decode_lz4_text_256", |b| {
        b.iter(|| {
            wire::decode_pages(black_box(&lz4_msg), &mut entries).unwrap();
            for e in &entries {
                wire::decode_page(&e.body, &mut page).unwrap();
            }
            black_box(&page);
        })
    });
    g.bench_function("verify_256", |b| {
        let ids: Vec<PageId> = random
            .chunks_exact(PAGE_SIZE)
            .map(|p| PageId::of(as_page(p)))
            .collect();
        b.iter(|| {
            for (p, id) in random.chunks_exact(PAGE_SIZE).zip(&ids) {
                assert!(id.matches(as_page(p)));
            }
        })
    });
    g.finish();
}

/// Guest memory in one region at 0.
struct Memory(Vec<u8>);

impl GuestSink for Memory {
    fn write_page(&mut self, gfn: u64, data: &Page) {
        let o = gfn as usize * PAGE_SIZE;
        self.0[o..o + PAGE_SIZE].copy_from_slice(data);
    }

    fn zero_page(&mut self, gfn: u64) {
        let o = gfn as usize * PAGE_SIZE;
        self.0[o..o + PAGE_SIZE].fill(0);
    }

    fn read_page(&self, gfn: u64, out: &mut Page) {
        let o = gfn as usize * PAGE_SIZE;
        out.copy_from_slice(&self.0[o..o + PAGE_SIZE]);
    }
}

struct Held(HashMap<PageId, Vec<u8>>);

impl PageSource for Held {
    fn fetch(&self, id: &PageId, out: &mut Page) -> bool {
        self.0.get(id).map(|p| out.copy_from_slice(p)).is_some()
    }
}

/// One migration of `mem` to a destination holding `held`; returns bytes on the wire.
fn migrate(mem: &[u8], held: &(dyn PageSource + Sync)) -> u64 {
    let key = MigrationKey::new(&[7u8; 32]).unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let desc = VmDescription {
        vcpus: 1,
        regions: vec![Region {
            guest_addr: 0,
            pages: (mem.len() / PAGE_SIZE) as u64,
        }],
        config: Vec::new(),
    };
    thread::scope(|s| {
        let dest = s.spawn(|| {
            let (mut r, desc) = Receiver::accept(b, &key, Limits::default()).unwrap();
            let mut memory = Memory(vec![0u8; desc.regions[0].pages as usize * PAGE_SIZE]);
            r.receive(held, &mut memory).unwrap();
            r.confirm_resumed().unwrap();
        });
        let mut sender = Sender::connect(a, &key, SenderConfig::default()).unwrap();
        sender.describe(&desc).unwrap();
        let read = |gfn: u64, out: &mut Page| {
            let o = gfn as usize * PAGE_SIZE;
            out.copy_from_slice(&mem[o..o + PAGE_SIZE]);
        };
        sender.round(identities(0, mem), &read).unwrap();
        let stats = sender.finish(&[], &read, &[0; 4096]).unwrap();
        dest.join().unwrap();
        stats.bytes_total()
    })
}

fn whole_migrations(c: &mut Criterion) {
    let mut g = c.benchmark_group("migrate_64MiB");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((64 * MIB) as u64));
    let (random, text) = random_and_text(64 * MIB);
    let all = Held(
        random
            .chunks_exact(PAGE_SIZE)
            .map(|p| (PageId::of(p.try_into().unwrap()), p.to_vec()))
            .collect(),
    );
    g.bench_function("random_nothing_held", |b| {
        b.iter(|| migrate(&random, &NoPages))
    });
    g.bench_function("random_all_held", |b| b.iter(|| migrate(&random, &all)));
    g.bench_function("text_lz4_nothing_held", |b| {
        b.iter(|| migrate(&text, &NoPages))
    });
    g.finish();
}

criterion_group!(benches, offers, pages, whole_migrations);
criterion_main!(benches);
