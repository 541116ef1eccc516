//! Migrations that succeed: what goes over the wire against the lower bound (distinct
//! non-zero pages the destination lacks), rounds, compression, deduplication.

use super::*;

/// A 64 MiB guest: a quarter zero, one page in 16 a duplicate of another, the rest
/// random (incompressible).
fn mixed_guest() -> Guest {
    let mut g = Guest::sized(64);
    fill(&mut g, |i| match i % 16 {
        0..=3 => Content::Zero,
        4 => Content::Random(i / 16 * 16 + 5), // same as page i + 1
        _ => Content::Random(i),
    });
    g
}

#[test]
fn nothing_at_destination_sends_each_distinct_page_once() {
    let guest = mixed_guest();
    let (stats, dest) = migrate(&guest, Held::default(), SenderConfig::default());
    assert_same_memory(&guest, &dest);
    assert_eq!(dest.state, b"state blob");
    assert_eq!(dest.description.as_ref().unwrap(), &guest.desc());

    let distinct = guest.distinct_nonzero().len() as u64;
    let zero = guest.zero_pages();
    assert_eq!(stats.pages_sent, distinct);
    assert_eq!(stats.pages_zero, zero);
    assert_eq!(stats.pages_offered, guest.total() - zero);
    assert_eq!(stats.pages_found, 0);
    assert_eq!(stats.pages_deduplicated, guest.total() - zero - distinct);
    assert_eq!(stats.pages_compressed, 0, "random pages do not compress");
    // Fresh memory at the destination: zero pages cost no write at all.
    assert_eq!(dest.memory.as_ref().unwrap().zeroes, 0);

    // Bytes both ways against the lower bound: distinct non-zero pages. The overhead is
    // the identities offered (32 bytes per non-zero page, 0.8 %) plus framing.
    let lower = distinct * PAGE_SIZE as u64;
    let total = stats.bytes_total();
    let overhead = (total - lower) as f64 / lower as f64;
    eprintln!(
        "nothing at destination: {total} bytes on the wire, lower bound {lower}, overhead {:.3} %",
        overhead * 100.0
    );
    assert!(overhead < 0.01, "overhead {overhead}");
    let r = dest.result.as_ref().unwrap();
    assert_eq!(r.bytes_received, stats.bytes_sent);
    assert_eq!(r.bytes_sent, stats.bytes_received);
    assert_eq!(r.pages_received, distinct);
}

#[test]
fn destination_holding_everything_gets_only_identities() {
    let guest = mixed_guest();
    let held = Held::from_guest(&guest, |_| true);
    let (stats, dest) = migrate(&guest, held, SenderConfig::default());
    assert_same_memory(&guest, &dest);
    assert_eq!(stats.pages_sent, 0);
    assert_eq!(stats.pages_found, stats.pages_offered);
    let total = stats.bytes_total();
    let share = total as f64 / guest.bytes() as f64;
    eprintln!(
        "destination holds all: {total} bytes on the wire for {} bytes of memory ({:.3} %)",
        guest.bytes(),
        share * 100.0
    );
    assert!(share < 0.03, "{share}");
    let r = dest.result.as_ref().unwrap();
    // Duplicates within the guest are copied at the destination rather than fetched.
    assert_eq!(
        r.pages_fetched + r.pages_copied,
        guest.total() - guest.zero_pages()
    );
}

#[test]
fn destination_holding_half_gets_the_other_half() {
    let guest = mixed_guest();
    let held = Held::from_guest(&guest, |i| i % 2 == 0);
    let missing: HashSet<PageId> = {
        let all = guest.distinct_nonzero();
        all.into_iter()
            .filter(|id| !held.pages.contains_key(id))
            .collect()
    };
    let (stats, dest) = migrate(&guest, held, SenderConfig::default());
    assert_same_memory(&guest, &dest);
    assert_eq!(stats.pages_sent, missing.len() as u64);
    let lower = missing.len() as u64 * PAGE_SIZE as u64;
    let identities = stats.pages_offered * 32;
    let total = stats.bytes_total();
    eprintln!(
        "destination holds half: {total} bytes on the wire, lower bound {lower} + {identities} of identities"
    );
    assert!((total as f64) < 1.05 * lower as f64 + identities as f64 + 65536.0);
}

#[test]
fn zero_pages_are_never_sent() {
    let mut guest = Guest::sized(16);
    fill(&mut guest, |i| {
        if i % 512 == 7 {
            Content::Random(i)
        } else {
            Content::Zero
        }
    });
    let (stats, dest) = migrate(&guest, Held::default(), SenderConfig::default());
    assert_same_memory(&guest, &dest);
    let nonzero = guest.total() - guest.zero_pages();
    assert_eq!(stats.pages_sent, nonzero);
    assert_eq!(stats.pages_zero, guest.zero_pages());
    // Pages sent, their identities, a few runs: nothing for the zero pages.
    let bound = nonzero * (PAGE_SIZE as u64 + 64) + 8192;
    assert!(
        stats.bytes_total() < bound,
        "{} >= {bound}",
        stats.bytes_total()
    );
    assert_eq!(dest.memory.as_ref().unwrap().writes, nonzero);
}

#[test]
fn compression_shrinks_compressible_pages_and_round_trips() {
    let mut guest = Guest::sized(16);
    fill(&mut guest, |i| {
        if i % 4 == 0 {
            Content::Random(i)
        } else {
            Content::Text(i)
        }
    });
    let (lz4, dest) = migrate(&guest, Held::default(), SenderConfig::default());
    assert_same_memory(&guest, &dest);
    let raw_config = SenderConfig {
        compression: Compression::None,
        ..SenderConfig::default()
    };
    let (raw, dest) = migrate(&guest, Held::default(), raw_config);
    assert_same_memory(&guest, &dest);
    assert_eq!(raw.pages_compressed, 0);
    let text_pages = guest.total() * 3 / 4;
    assert!(
        lz4.pages_compressed >= text_pages * 9 / 10,
        "{} of {text_pages} text pages compressed",
        lz4.pages_compressed
    );
    assert_eq!(raw.bytes_sent - lz4.bytes_sent, lz4.compression_saved_bytes);
    eprintln!(
        "compression: {} bytes with lz4, {} raw ({:.1} %)",
        lz4.bytes_total(),
        raw.bytes_total(),
        100.0 * lz4.bytes_total() as f64 / raw.bytes_total() as f64
    );
    assert!(lz4.bytes_total() * 10 < raw.bytes_total() * 6);
    assert_eq!(
        dest.result.as_ref().unwrap().pages_compressed,
        0,
        "the raw run sent nothing compressed"
    );
}

#[test]
fn rounds_with_dirty_pages_converge_to_the_final_memory() {
    let mut guest = Guest::sized(8);
    fill(&mut guest, |i| {
        if i % 3 == 0 {
            Content::Zero
        } else {
            Content::Random(i)
        }
    });
    let (a, b) = socket_pair();
    let dest = spawn_destination(b, key(), Limits::default(), Arc::new(Held::default()));

    let mut s = Sender::connect(a, &key(), SenderConfig::default()).unwrap();
    s.describe(&guest.desc()).unwrap();
    let r1 = {
        let g = &guest;
        s.round(g.identities(), &|gfn, out: &mut Page| g.read(gfn, out))
            .unwrap()
    };
    assert_eq!(r1.round, 1);

    // Round 2: a tenth of the pages dirtied: some new, some zeroed, some copies of other
    // pages, some written with the same content.
    let mut dirty = Vec::new();
    for i in (0..guest.total()).step_by(10) {
        let gfn = guest.gfn(i);
        let content = match i % 40 {
            0 => Content::Random(1_000_000 + i),
            10 => Content::Zero,
            20 => Content::Random(i + 1), // the content of page i + 1
            _ => Content::Random(i),      // unchanged (or newly non-zero for i % 3 == 0)
        };
        write_content(guest.page_mut(gfn), content);
        dirty.push(gfn);
    }
    let r2 = {
        let g = &guest;
        s.round(g.identities_of(&dirty), &|gfn, out: &mut Page| {
            g.read(gfn, out)
        })
        .unwrap()
    };
    assert_eq!(r2.pages_offered + r2.pages_zero, dirty.len() as u64);
    assert!(
        r2.pages_sent < r2.pages_offered,
        "copies and unchanged pages are not sent"
    );

    // Final round with the guest "paused".
    let mut last = Vec::new();
    for i in (5..guest.total()).step_by(97) {
        let gfn = guest.gfn(i);
        write_content(guest.page_mut(gfn), Content::Random(2_000_000 + i));
        last.push(gfn);
    }
    let stats = {
        let g = &guest;
        s.finish(
            &last,
            &|gfn, out: &mut Page| g.read(gfn, out),
            &[7u8; 3 << 20],
        )
        .unwrap()
    };
    assert_eq!(stats.rounds.len(), 3);
    assert!(stats.rounds[2].last && !stats.rounds[1].last);
    let dest = dest.join().unwrap();
    let r = dest.result.as_ref().unwrap();
    assert_eq!(r.rounds, 3);
    assert!(r.pages_unchanged > 0, "pages dirtied with the same content");
    assert!(r.pages_copied > 0, "pages that became copies of others");
    assert_eq!(dest.state, vec![7u8; 3 << 20]);
    assert_eq!(stats.state_bytes, 3 << 20);
    assert_same_memory(&guest, &dest);
}

#[test]
fn pages_changed_after_they_were_offered_are_sent_again_in_the_next_round() {
    let mut guest = Guest::sized(4);
    fill(&mut guest, Content::Random);
    // Identities hashed now; then the "running guest" writes before the pages are read.
    let ids: Vec<_> = guest.identities().collect();
    let changed: Vec<u64> = (0..guest.total())
        .step_by(50)
        .map(|i| guest.gfn(i))
        .collect();
    for (n, &gfn) in changed.iter().enumerate() {
        let content = if n % 2 == 0 {
            Content::Random(5_000_000 + gfn)
        } else {
            Content::Zero
        };
        write_content(guest.page_mut(gfn), content);
    }
    let (a, b) = socket_pair();
    let dest = spawn_destination(b, key(), Limits::default(), Arc::new(Held::default()));
    let mut s = Sender::connect(a, &key(), SenderConfig::default()).unwrap();
    s.describe(&guest.desc()).unwrap();
    let read = |gfn, out: &mut Page| guest.read(gfn, out);
    s.round(ids, &read).unwrap();
    // Pages sent as they read now: those now zero go as zero pages, the others under
    // their old identity, which they no longer match.
    let zeroed = changed.len() as u64 / 2;
    assert_eq!(s.stats().pages_changed, zeroed);
    // The dirty log reports them; the last round offers their current identities.
    let stats = s.finish(&changed, &read, b"").unwrap();
    assert_eq!(stats.state_bytes, 0);
    let dest = dest.join().unwrap();
    let received = dest.result.as_ref().unwrap();
    assert_eq!(
        received.pages_mismatched,
        changed.len() as u64 - zeroed,
        "held back until the last round"
    );
    assert_same_memory(&guest, &dest);
}

#[test]
fn a_lying_page_source_falls_back_to_the_source() {
    let mut guest = Guest::sized(4);
    fill(&mut guest, Content::Random);
    let mut held = Held::from_guest(&guest, |_| true);
    let lying: Vec<PageId> = held.pages.keys().step_by(7).copied().collect();
    held.lying.extend(lying.iter().copied());
    let (stats, dest) = migrate(&guest, held, SenderConfig::default());
    assert_same_memory(&guest, &dest);
    assert_eq!(stats.pages_sent, lying.len() as u64);
    assert_eq!(
        dest.result.as_ref().unwrap().fetch_mismatches,
        lying.len() as u64
    );
}

#[test]
fn small_batches_and_windows_still_pipeline_correctly() {
    let guest = {
        let mut g = Guest::sized(2);
        fill(&mut g, |i| match i % 5 {
            0 => Content::Zero,
            1 => Content::Text(i),
            _ => Content::Random(i % 100),
        });
        g
    };
    for (batch, window) in [(1, 1), (3, 2), (64, 1), (100, 64)] {
        let config = SenderConfig {
            batch,
            window,
            ..SenderConfig::default()
        };
        let held = Held::from_guest(&guest, |i| i % 3 == 0);
        let (_, dest) = migrate(&guest, held, config);
        assert_same_memory(&guest, &dest);
    }
}

#[test]
fn the_destination_limits_the_batch_and_window() {
    let mut guest = Guest::sized(1);
    fill(&mut guest, Content::Random);
    let (a, b) = socket_pair();
    let limits = Limits {
        max_batch: 10,
        max_runs: 3,
        max_window: 2,
        ..Limits::default()
    };
    let dest = spawn_destination(b, key(), limits, Arc::new(Held::default()));
    send_all(a, &key(), SenderConfig::default(), &guest, b"x").unwrap();
    let dest = dest.join().unwrap();
    dest.result.as_ref().unwrap();
    assert_same_memory(&guest, &dest);
}

#[test]
fn stats_serialize_to_json() {
    let mut guest = Guest::sized(1);
    fill(&mut guest, Content::Text);
    let (stats, dest) = migrate(&guest, Held::default(), SenderConfig::default());
    let json = serde_json::to_string(&stats).unwrap();
    assert!(json.contains("\"pages_sent\""));
    let back: MigrationStats = serde_json::from_str(&json).unwrap();
    assert_eq!(back, stats);
    let r = dest.result.unwrap();
    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(serde_json::from_str::<ReceiverStats>(&json).unwrap(), r);
}

#[test]
fn lazy_identities_match_a_full_hash() {
    let mut guest = Guest::sized(9);
    fill(&mut guest, |i| {
        if i % 7 == 0 {
            Content::Zero
        } else {
            Content::Random(i)
        }
    });
    let lazy: Vec<_> = identities(100, &guest.mem).collect();
    let full = crate::hashing::hash_region(&guest.mem).unwrap();
    assert_eq!(lazy.len(), full.len());
    for (i, ((gfn, id), want)) in lazy.iter().zip(&full).enumerate() {
        assert_eq!(*gfn, 100 + i as u64);
        assert_eq!(id, want);
    }
    // A trailing partial page is ignored.
    assert_eq!(identities(0, &guest.mem[..PAGE_SIZE + 5]).count(), 1);
}

#[test]
fn keys_from_files() {
    let hex = MigrationKey::random_hex().unwrap();
    assert_eq!(hex.len(), 65);
    let a = MigrationKey::from_file_contents(hex.as_bytes()).unwrap();
    let b = MigrationKey::from_file_contents(hex.trim().to_uppercase().as_bytes()).unwrap();
    assert_eq!(a.bytes(), b.bytes());
    assert_eq!(format!("{a:?}"), "MigrationKey(..)");
    assert_eq!(
        MigrationKey::from_file_contents(b"abc").unwrap_err(),
        KeyError::BadHex
    );
    assert_eq!(
        MigrationKey::new(b"short").unwrap_err(),
        KeyError::TooShort(5)
    );
    let raw = MigrationKey::from_file_contents(&[0xffu8; 32]).unwrap();
    assert_ne!(raw.bytes(), a.bytes());
}

/// A stream that cannot tell whether input is waiting: answers are read when the window
/// is full.
struct Plain(UnixStream);

impl Read for Plain {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Plain {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Transport for Plain {}

#[test]
fn any_stream_works_without_input_polling() {
    let mut guest = Guest::sized(2);
    fill(&mut guest, |i| match i % 3 {
        0 => Content::Zero,
        _ => Content::Random(i),
    });
    for window in [1, 4] {
        let (a, b) = socket_pair();
        let dest = spawn_destination(b, key(), Limits::default(), Arc::new(Held::default()));
        let config = SenderConfig {
            batch: 32,
            window,
            ..SenderConfig::default()
        };
        let mut s = Sender::connect(Plain(a), &key(), config).unwrap();
        s.describe(&guest.desc()).unwrap();
        let read = |gfn, out: &mut Page| guest.read(gfn, out);
        s.round(guest.identities(), &read).unwrap();
        s.finish(&[], &read, b"").unwrap();
        let dest = dest.join().unwrap();
        assert_same_memory(&guest, &dest);
    }
}

#[test]
fn a_tcp_stream_tells_what_it_has_not_sent() {
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (_b, _) = listener.accept().unwrap();
    assert_eq!(a.unsent(), Some(0), "nothing written yet");
    // The peer never reads: once its receive buffer is full, what is written stays queued.
    a.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 64 << 10];
    while a.write(&chunk).is_ok() {}
    assert!(a.unsent().unwrap() > 0, "a full send queue is reported");
}
