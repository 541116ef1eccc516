//! Benchmarks of the memory fabric: page hashing against memcpy on one core, parallel
//! hashing of 256 MiB, manifest updates per dirty page, and store put/get.
//!
//! Run with `cargo bench -p fabric --bench fabric`; throughput figures are bytes or pages
//! per second as criterion reports them.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use fabric::hashing::{bitmap_words, hash_region};
use fabric::manifest::{Manifest, Region};
use fabric::store::{Store, StoreOptions};
use fabric::{identify, is_zero, PageId, PAGE_SIZE};

const MIB: usize = 1 << 20;
const REGION: usize = 256 * MIB;

/// Fills `buf` with non-zero pseudo-random bytes from `seed` (xorshift).
fn fill(buf: &mut [u8], seed: u64) {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for word in buf.chunks_exact_mut(8) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        word.copy_from_slice(&s.to_le_bytes());
    }
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(&mut v, seed);
    v
}

/// One core: blake3 of a page against copying it (both cache hot), zero detection, and
/// the same over 256 MiB, where memory bandwidth counts.
fn page_hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("one_core");
    let page = random(PAGE_SIZE, 1);
    let page: &[u8; PAGE_SIZE] = page.as_slice().try_into().unwrap();
    let zero = [0u8; PAGE_SIZE];
    let mut dst = [0u8; PAGE_SIZE];
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    g.bench_function("blake3_page", |b| b.iter(|| PageId::of(black_box(page))));
    g.bench_function("memcpy_page", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(page));
            black_box(&dst);
        })
    });
    g.bench_function("is_zero_zero_page", |b| {
        b.iter(|| is_zero(black_box(&zero)))
    });
    g.bench_function("identify_zero_page", |b| {
        b.iter(|| identify(black_box(&zero)))
    });

    let region = random(REGION, 2);
    let mut copy = vec![0u8; REGION];
    g.throughput(Throughput::Bytes(REGION as u64));
    g.sample_size(10);
    g.bench_function("memcpy_256MiB", |b| {
        b.iter(|| {
            copy.copy_from_slice(black_box(&region));
            black_box(&copy);
        })
    });
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    g.bench_function("hash_region_256MiB", |b| {
        b.iter(|| one.install(|| hash_region(black_box(&region)).unwrap()))
    });
    g.finish();
}

/// All cores: 256 MiB of non-zero pages, and of half-zero pages.
fn parallel_hashing(c: &mut Criterion) {
    let mut g = c.benchmark_group("all_cores");
    g.throughput(Throughput::Bytes(REGION as u64));
    g.sample_size(10);
    let region = random(REGION, 3);
    g.bench_function("hash_region_256MiB", |b| {
        b.iter(|| hash_region(black_box(&region)).unwrap())
    });
    let mut half = region;
    for page in half.chunks_exact_mut(PAGE_SIZE).step_by(2) {
        page.fill(0);
    }
    g.bench_function("hash_region_256MiB_half_zero", |b| {
        b.iter(|| hash_region(black_box(&half)).unwrap())
    });
    g.finish();
}

/// Manifest update of a 256 MiB region from a dirty bitmap, per dirty page.
fn manifest_update(c: &mut Criterion) {
    let mut g = c.benchmark_group("manifest_update");
    let pages = REGION / PAGE_SIZE;
    let region = Region {
        guest_addr: 0,
        pages: pages as u64,
    };
    let mem = random(REGION, 4);
    let mut manifest = Manifest::from_memory(&[region], &[&mem]).unwrap();
    for dirty_pages in [1usize, 64, 4096, 65536] {
        // Spread the dirty pages evenly over the region.
        let mut dirty = vec![0u64; bitmap_words(pages)];
        let stride = pages / dirty_pages;
        for p in (0..pages).step_by(stride).take(dirty_pages) {
            dirty[p / 64] |= 1 << (p % 64);
        }
        g.throughput(Throughput::Elements(dirty_pages as u64));
        g.sample_size(if dirty_pages > 4096 { 10 } else { 50 });
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{dirty_pages}_dirty")),
            &dirty,
            |b, dirty| b.iter(|| manifest.update(0, &mem, black_box(dirty)).unwrap()),
        );
    }
    g.finish();
}

/// Store: put_many of 4096 new pages (16 MiB, one commit), get and get_many.
fn store(c: &mut Criterion) {
    let mut g = c.benchmark_group("store");
    g.sample_size(10);
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open_with(dir.path(), StoreOptions::default()).unwrap();
    const BATCH: usize = 4096;
    let mut seed = 100;
    g.throughput(Throughput::Bytes((BATCH * PAGE_SIZE) as u64));
    g.bench_function("put_many_4096_new", |b| {
        b.iter_batched(
            || {
                seed += 1;
                let data = random(BATCH * PAGE_SIZE, seed);
                let ids: Vec<PageId> = data
                    .chunks_exact(PAGE_SIZE)
                    .map(|p| PageId::of(p.try_into().unwrap()))
                    .collect();
                (ids, data)
            },
            |(ids, data)| {
                let batch: Vec<(PageId, &[u8])> = ids
                    .iter()
                    .copied()
                    .zip(data.chunks_exact(PAGE_SIZE))
                    .collect();
                assert_eq!(store.put_many(&batch).unwrap(), BATCH as u64);
            },
            BatchSize::PerIteration,
        )
    });
    let data = random(BATCH * PAGE_SIZE, 7);
    let ids: Vec<PageId> = data
        .chunks_exact(PAGE_SIZE)
        .map(|p| PageId::of(p.try_into().unwrap()))
        .collect();
    let batch: Vec<(PageId, &[u8])> = ids
        .iter()
        .copied()
        .zip(data.chunks_exact(PAGE_SIZE))
        .collect();
    store.put_many(&batch).unwrap();
    g.bench_function("put_many_4096_present", |b| {
        b.iter(|| store.put_many(black_box(&batch)).unwrap())
    });
    let mut out = vec![0u8; BATCH * PAGE_SIZE];
    g.bench_function("get_many_4096", |b| {
        b.iter(|| store.get_many(black_box(&ids), &mut out).unwrap())
    });
    g.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    g.sample_size(50);
    let mut page = vec![0u8; PAGE_SIZE];
    let mut i = 0;
    g.bench_function("get_one", |b| {
        b.iter(|| {
            i = (i + 97) % BATCH;
            store.get(&ids[i], &mut page).unwrap()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    page_hashing,
    parallel_hashing,
    manifest_update,
    store
);
criterion_main!(benches);
