//! Writes the seed corpora, `seeds/<target>/`, with fabvm's own encoders: a few valid inputs
//! per fuzz target, so a short run starts past the magic numbers and checksums.
//!
//! ```text
//! cd fuzz && cargo run --example seeds            # rewrites seeds/*/ (except the base below)
//! ```
//!
//! The snapshot state seeds derive from `seeds/snapshot_state/vm-1cpu-disk-rng`: a mode byte
//! (0) then the state file of a real snapshot of the test guest (1 vCPU, 16 MiB, a disk and
//! an rng: `fabvm --kernel guest-images/out/test-guest.elf --mem 16M --disk disk.raw --rng
//! --api-sock s --cmdline "fill=1 passes=0 hb=200 blk=3"`, then `fabvm ctl --api-sock s
//! snapshot snap`). Give another state file as the first argument to replace it.

use std::fs;
use std::path::{Path, PathBuf};

use fabric::live::{IdentityTable, TableRegion};
use fabric::{Manifest, PageId, Region, PAGE_SIZE};
use vmm::api::{routes, Request};
use vmm::snapshot::format;
use vmm::virtio::VirtioDeviceState;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let base_state = std::env::args().nth(1).map(|p| {
        let mut seed = vec![0u8];
        seed.extend(fs::read(p).expect("state file"));
        seed
    });
    let written = [
        ("block", block()),
        ("net_tx", net_tx()),
        ("rng", rng()),
        (
            "migration_receiver",
            named(fabric::migration::fuzzing::seed_inputs()),
        ),
        (
            "migration_sender",
            named(fabric::migration::fuzzing::sender_seed_inputs()),
        ),
        ("snapshot_state", snapshot_state(&root, base_state)),
        ("manifest", manifest()),
        ("store_open", store_open()),
        ("identity_table", identity_table()),
        ("api_request", api_request()),
        ("cli_args", cli_args()),
        (
            "cluster_decoders",
            cluster::fuzzing::seed_inputs()
                .into_iter()
                .map(|(name, bytes)| (name.to_string(), bytes))
                .collect(),
        ),
    ];
    for (target, seeds) in written {
        let dir = root.join(target);
        fs::create_dir_all(&dir).unwrap();
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.file_name().unwrap() != BASE_STATE {
                fs::remove_file(path).unwrap();
            }
        }
        for (name, bytes) in seeds {
            fs::write(dir.join(name), bytes).unwrap();
        }
        let total: u64 = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        println!("{target}: {total} bytes");
    }
}

type Seeds = Vec<(String, Vec<u8>)>;

fn named(inputs: Vec<Vec<u8>>) -> Seeds {
    inputs
        .into_iter()
        .enumerate()
        .map(|(i, bytes)| (format!("seed-{i}"), bytes))
        .collect()
}

// ---- virtio chains: the input format of fuzz_targets/common/mod.rs ----

const NEXT: u16 = 1;
const WRITE: u16 = 2;
/// Where the harness puts the bytes after the descriptors and heads.
const DATA: u64 = 0x4000;

/// 16 descriptors (unused ones zero), the heads offered, then the data bytes.
fn chains(descs: &[(u64, u32, u16, u16)], heads: &[u16], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..16 {
        let (addr, len, flags, next) = descs.get(i).copied().unwrap_or_default();
        out.extend_from_slice(&addr.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&next.to_le_bytes());
    }
    out.push(heads.len() as u8);
    for head in heads {
        out.extend_from_slice(&head.to_le_bytes());
    }
    out.extend_from_slice(data);
    out
}

fn blk_header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn block() -> Seeds {
    // A read of sector 1, a write of sector 2 and a GET_ID, each header / data / status.
    let descs = [
        (DATA, 16, NEXT, 1),
        (0x8000, 512, NEXT | WRITE, 2),
        (0x9000, 1, WRITE, 0),
        (DATA + 16, 16, NEXT, 4),
        (0xa000, 512, NEXT, 5),
        (0x9001, 1, WRITE, 0),
        (DATA + 32, 16, NEXT, 7),
        (0xb000, 20, NEXT | WRITE, 8),
        (0x9002, 1, WRITE, 0),
    ];
    let mut data = blk_header(0, 1);
    data.extend(blk_header(1, 2));
    data.extend(blk_header(8, 0));
    let mut rw = vec![0u8]; // read-write disk
    rw.extend(chains(&descs, &[0, 3, 6], &data));
    let mut ro = vec![1u8]; // read-only: the write fails
    ro.extend(chains(&descs[3..6], &[0], &blk_header(1, 0)));
    vec![("read-write-getid".into(), rw), ("ro-write".into(), ro)]
}

fn net_tx() -> Seeds {
    let mut frame = vec![0u8; 12]; // virtio-net header
    frame.extend_from_slice(&[0xff; 6]); // broadcast
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&[0x08, 0x06]);
    frame.resize(12 + 60, 0x42);
    let one = chains(&[(DATA, frame.len() as u32, 0, 0)], &[0], &frame);
    // The same frame as header and body in two descriptors.
    let two = chains(&[(DATA, 12, NEXT, 1), (DATA + 12, 60, 0, 0)], &[0], &frame);
    vec![("one-desc".into(), one), ("hdr-then-frame".into(), two)]
}

fn rng() -> Seeds {
    let one = chains(&[(DATA, 64, WRITE, 0)], &[0], &[]);
    let chained = chains(
        &[(DATA, 16, WRITE | NEXT, 1), (DATA + 0x100, 4096, WRITE, 0)],
        &[0, 0],
        &[],
    );
    vec![("one-buffer".into(), one), ("chained".into(), chained)]
}

// ---- snapshot state files ----

const BASE_STATE: &str = "vm-1cpu-disk-rng";

fn snapshot_state(root: &Path, base: Option<Vec<u8>>) -> Seeds {
    let base = base.unwrap_or_else(|| {
        fs::read(root.join("snapshot_state").join(BASE_STATE))
            .expect("the base state seed (or give a state file as the first argument)")
    });
    let mut state = format::decode(&base[1..]).expect("the base seed is a state file");
    let mut seeds = vec![(BASE_STATE.to_string(), base)];

    // A tap next to the disk (its transport state borrowed from the disk's), the disk
    // read-only, and a frame waiting for the guest: the JSON body only (mode 1).
    let transport = match &state.virtio[0] {
        VirtioDeviceState::Block { state, .. } => state.transport.clone(),
        other => panic!("the base's first device is not a disk: {other:?}"),
    };
    if let VirtioDeviceState::Block { state, .. } = &mut state.virtio[0] {
        state.read_only = true;
    }
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0x42; 60]);
    state.virtio.push(VirtioDeviceState::Net {
        tap: "fab0".into(),
        state: devices::virtio::NetState {
            transport: devices::virtio::TransportState {
                device_type: 1,
                ..transport
            },
            mac: devices::virtio::MacAddr([2, 0, 0, 0, 0, 9]),
            pending_rx: Some(frame),
        },
    });
    let mut body = vec![1u8];
    body.extend(serde_json::to_vec(&state).unwrap());
    seeds.push(("with-tap-json-body".into(), body));

    // No vCPUs and no devices: small, for the fuzzer to grow.
    state.vcpus.clear();
    state.virtio.clear();
    let mut small = vec![0u8];
    small.extend(format::encode(&state));
    seeds.push(("no-vcpus-no-devices".into(), small));
    seeds
}

// ---- manifests ----

fn manifest() -> Seeds {
    let page = |b: u8| [b; PAGE_SIZE];
    let mut mem = Vec::new();
    for b in [1u8, 0, 2, 1, 0, 0, 3, 3] {
        mem.extend_from_slice(&page(b));
    }
    let one = Manifest::from_memory(
        &[Region {
            guest_addr: 0,
            pages: 8,
        }],
        &[&mem],
    )
    .unwrap();
    // Two regions with a hole, the second over 64 pages (two bitmap words).
    let ids = |n: usize, every: usize| -> Vec<Option<PageId>> {
        (0..n)
            .map(|i| (i % every == 0).then(|| PageId::of(&page(i as u8 + 1))))
            .collect()
    };
    let two = Manifest::from_ids(
        &[
            Region {
                guest_addr: 0,
                pages: 3,
            },
            Region {
                guest_addr: 1 << 32,
                pages: 70,
            },
        ],
        vec![ids(3, 2), ids(70, 9)],
    )
    .unwrap();
    let mut raw = vec![0u8];
    raw.extend(one.encode());
    let encoded = two.encode();
    let mut body = vec![1u8];
    body.extend_from_slice(&encoded[..encoded.len() - 32]);
    vec![
        ("one-region".into(), raw),
        ("two-regions-body".into(), body),
    ]
}

// ---- the page store ----

fn store_open() -> Seeds {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("store");
    {
        let (mut store, ids) = fabric::store::fuzzing::sample_store(&dir).unwrap();
        store.add_root("snap-2", &ids[3..]).unwrap();
        store.remove_root("snap-1").unwrap();
    }
    let described = fabric::store::fuzzing::describe(&dir).unwrap();
    // The index and journal as raw files (sections 0 and 2), nothing else.
    let mut raw = Vec::new();
    for (kind, name) in [(0u8, "index"), (2u8, "journal")] {
        let bytes = fs::read(dir.join(name)).unwrap();
        raw.push(kind);
        raw.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        raw.extend(bytes);
    }
    vec![
        ("two-packs-roots-journal".into(), described),
        ("raw-index-journal".into(), raw),
    ]
}

// ---- identity tables ----

fn identity_table() -> Seeds {
    let mut genuine = vec![1u8, 2];
    for (gfn, pages, host) in [
        (0u32, 100u16, 0x7f00_0000_0000u64),
        (0x10_0000, 600, 0x7f10_0000_0000),
    ] {
        genuine.extend_from_slice(&gfn.to_le_bytes());
        genuine.extend_from_slice(&(pages - 1).to_le_bytes());
        genuine.extend_from_slice(&host.to_le_bytes());
    }
    // set page 5 current, page 650 stale with an identity, page 7 zero; mark 5 stale.
    for (op, page, byte) in [(2u8, 5u16, 7u8), (0, 650, 9), (1, 7, 0)] {
        genuine.push(op);
        genuine.extend_from_slice(&page.to_le_bytes());
        genuine.push(byte);
    }
    genuine.push(3);
    genuine.extend_from_slice(&5u16.to_le_bytes());
    // The same, then a patch of the header's page count.
    let mut patched = genuine.clone();
    patched.push(4);
    patched.extend_from_slice(&32u32.to_le_bytes());
    patched.push(8);
    patched.extend_from_slice(&701u64.to_le_bytes());
    // A whole table file, as published.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("1.ids");
    let table = IdentityTable::create(
        Some(&path),
        &[TableRegion {
            guest_addr: 0,
            pages: 16,
            host_addr: 0x7f00_0000_0000,
        }],
    )
    .unwrap();
    let mut file = vec![0u8];
    file.extend(fs::read(&path).unwrap());
    drop(table);
    vec![
        ("two-regions-writes".into(), genuine),
        ("two-regions-patched".into(), patched),
        ("table-file-16-pages".into(), file),
    ]
}

// ---- API requests ----

fn api_request() -> Seeds {
    let requests = [
        Request::Status,
        Request::Pause,
        Request::Snapshot {
            dir: "/var/tmp/snap1".into(),
        },
        Request::Migrate {
            dest: "10.0.0.2:7777".into(),
            key: "/etc/fabvm/key".into(),
            downtime_ms: 100,
            max_rounds: 30,
            compress: true,
            postcopy_after: Some(1),
        },
        Request::Identities,
    ];
    let mut seeds: Seeds = requests
        .iter()
        .map(|req| {
            let (route, body) = routes::for_request(req).unwrap();
            let mut bytes = format!("{} {}\n", route.method.as_str(), route.path).into_bytes();
            if let Some(body) = body {
                bytes.extend(serde_json::to_vec(&body).unwrap());
            }
            (route.op.to_string(), bytes)
        })
        .collect();
    seeds.push(("metrics-query".into(), b"GET /metrics?x=1\n".to_vec()));
    seeds.push(("wrong-method".into(), b"DELETE /vm/pause\n{}".to_vec()));
    seeds.push((
        "json-line".into(),
        b"PUT /vm/snapshot\n{\"op\":\"snapshot\",\"dir\":\"/s\"}".to_vec(),
    ));
    seeds
}

// ---- command-line values ----

fn cli_args() -> Seeds {
    let line = |args: &[&str]| args.join("\0");
    [
        ("size", "2GiB".to_string()),
        ("disk", "/img/a.raw,ro".to_string()),
        ("net", "tap=fab0,mac=52:54:00:12:34:56".to_string()),
        (
            "boot",
            line(&[
                "--kernel",
                "k.elf",
                "--mem",
                "512M",
                "--cpus",
                "2",
                "--disk",
                "a.raw,ro",
                "--net",
                "tap=t0",
                "--rng",
                "--identity-budget",
                "25%",
            ]),
        ),
        (
            "restore",
            line(&[
                "--restore",
                "snap",
                "--disk",
                "d.raw",
                "--net",
                "tap=t0",
                "--lazy",
            ]),
        ),
        (
            "migrate",
            line(&[
                "ctl",
                "--api-sock",
                "s.sock",
                "migrate",
                "h:1",
                "--key",
                "k",
                "--downtime-ms",
                "50",
            ]),
        ),
        (
            "store",
            line(&["store", "--json", "--store", "/tmp/s", "gc"]),
        ),
    ]
    .into_iter()
    .map(|(name, text)| (name.to_string(), text.into_bytes()))
    .collect()
}
