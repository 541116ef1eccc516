//! Migrations that must fail, and fail safely: the source never reports success without
//! `Ack`, the destination never installs a page that does not match its identity.

use super::fuzzing::{self, Script, ScriptedPeer};
use super::*;
use std::sync::atomic::{AtomicU64, Ordering};

fn small_guest() -> Guest {
    let mut g = Guest::sized(2);
    fill(&mut g, |i| match i % 4 {
        0 => Content::Zero,
        1 => Content::Text(i),
        _ => Content::Random(i),
    });
    g
}

#[test]
fn wrong_key_fails_both_sides_before_anything_is_described() {
    let guest = small_guest();
    let (a, b) = socket_pair();
    let dest = spawn_destination(
        b,
        MigrationKey::new(b"another key, also 32 bytes long.").unwrap(),
        Limits::default(),
        Arc::new(Held::default()),
    );
    let err = send_all(a, &key(), SenderConfig::default(), &guest, b"").unwrap_err();
    assert!(matches!(err, MigrationError::AuthFailed), "{err:?}");
    let dest = dest.join().unwrap();
    assert!(
        matches!(dest.result, Err(MigrationError::AuthFailed)),
        "{:?}",
        dest.result
    );
    assert!(dest.memory.is_none() && dest.description.is_none());
}

#[test]
fn version_mismatch_fails_both_sides() {
    let (a, b) = socket_pair();
    let dest =
        thread::spawn(move || Receiver::accept_versions(b, &key(), Limits::default(), (1, 1)));
    let err = Sender::connect_versions(a, &key(), SenderConfig::default(), (2, 3)).unwrap_err();
    assert!(
        matches!(
            err,
            MigrationError::VersionMismatch {
                ours: (2, 3),
                peer: (1, 1)
            }
        ),
        "{err:?}"
    );
    let err = dest.join().unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            MigrationError::VersionMismatch {
                ours: (1, 1),
                peer: (2, 3)
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("no common protocol version"));
}

#[test]
fn overlapping_versions_agree() {
    let (a, b) = socket_pair();
    let dest =
        thread::spawn(move || Receiver::accept_versions(b, &key(), Limits::default(), (1, 1)));
    let mut s = Sender::connect_versions(a, &key(), SenderConfig::default(), (1, 2)).unwrap();
    s.abort("just checking");
    let err = dest.join().unwrap().unwrap_err();
    assert!(
        matches!(&err, MigrationError::PeerAborted(why) if why == "just checking"),
        "{err:?}"
    );
}

#[test]
fn two_sources_do_not_talk() {
    let (a, b) = socket_pair();
    let other = thread::spawn(move || Sender::connect(b, &key(), SenderConfig::default()));
    let err = Sender::connect(a, &key(), SenderConfig::default()).unwrap_err();
    assert!(matches!(err, MigrationError::NotAPeer(_)), "{err:?}");
    assert!(other.join().unwrap().is_err());
}

#[test]
fn a_corrupted_byte_in_flight_is_caught_and_nothing_bad_is_installed() {
    let guest = small_guest();
    let (sent, _) = stream_lengths();
    // Flip one byte deep in the stream (inside a Pages message), then a byte of an early
    // offer, then one of the hello's nonce.
    for at in [sent * 3 / 4, 2_000, 40] {
        let (src, dst, relays) = relay(
            move |offset, bytes| {
                if (offset..offset + bytes.len() as u64).contains(&at) {
                    bytes[(at - offset) as usize] ^= 0x20;
                }
                bytes.len()
            },
            pass,
        );
        let dest = spawn_destination(dst, key(), Limits::default(), Arc::new(Held::default()));
        let err = send_all(src, &key(), SenderConfig::default(), &guest, b"").unwrap_err();
        let dest = dest.join().unwrap();
        let derr = dest.result.as_ref().unwrap_err();
        match at {
            40 => assert!(matches!(derr, MigrationError::AuthFailed), "{derr:?}"),
            // In an offer or a page's entry, the MAC; in a page body, the page's identity
            // (the page is held back, and refused when no later round sends it again).
            2_000 => assert!(matches!(derr, MigrationError::BadMac { .. }), "{derr:?}"),
            _ => assert!(
                matches!(
                    derr,
                    MigrationError::BadMac { .. } | MigrationError::BadPage { .. }
                ),
                "{derr:?}"
            ),
        }
        assert!(
            matches!(
                err,
                MigrationError::PeerAborted(_)
                    | MigrationError::Disconnected
                    | MigrationError::AuthFailed
            ),
            "{err:?}"
        );
        if let MigrationError::PeerAborted(why) = &err {
            assert!(
                why.contains("failed authentication") || why.contains("does not match"),
                "{why}"
            );
        }
        assert_nothing_bad_installed(&guest, &dest);
        relays.into_iter().for_each(|h| h.join().unwrap());
    }
}

/// Bytes each way of a whole migration of `small_guest`.
fn stream_lengths() -> (u64, u64) {
    let guest = small_guest();
    let (stats, _) = migrate(&guest, Held::default(), SenderConfig::default());
    (stats.bytes_sent, stats.bytes_received)
}

#[test]
fn a_link_cut_at_any_point_never_reports_success_without_ack() {
    let guest = small_guest();
    let (sent, received) = stream_lengths();
    // Cut the source's stream at 40 points through the migration (hello, proof, describe,
    // offers, pages, state, complete, commit), then the destination's, up to its last
    // byte (the Ack).
    let mut cuts: Vec<(bool, u64)> = (0..40).map(|k| (true, sent * k / 40)).collect();
    cuts.extend([(true, 70), (true, sent - 1)]);
    cuts.extend((0..20).map(|k| (false, received * k / 20)));
    cuts.extend([(false, received - 1), (false, received - 48)]);
    for (source_side, at) in cuts {
        let cut = move |offset: u64, bytes: &mut [u8]| {
            (at.saturating_sub(offset) as usize).min(bytes.len())
        };
        let (src, dst, relays) = if source_side {
            relay(cut, pass)
        } else {
            relay(pass, cut)
        };
        let dest = spawn_destination(dst, key(), Limits::default(), Arc::new(Held::default()));
        let result = send_all(src, &key(), SenderConfig::default(), &guest, b"state blob");
        assert!(
            result.is_err(),
            "cut at {at} (source side {source_side}) reported success"
        );
        let err = result.unwrap_err();
        assert!(
            matches!(
                err,
                MigrationError::Disconnected | MigrationError::PeerAborted(_)
            ),
            "cut at {at}: {err:?}"
        );
        let dest = dest.join().unwrap();
        assert_nothing_bad_installed(&guest, &dest);
        // The destination cannot complete without every byte of the source's stream.
        if source_side {
            assert!(
                dest.result.is_err(),
                "destination confirmed with a cut at {at}"
            );
        }
        relays.into_iter().for_each(|h| h.join().unwrap());
    }
}

#[test]
fn destination_gone_before_ack_fails_the_source() {
    let guest = small_guest();
    let (a, b) = socket_pair();
    let dest = thread::spawn(move || {
        let (mut r, desc) = Receiver::accept(b, &key(), Limits::default()).unwrap();
        let mut memory = Guest::new(desc.regions.clone());
        r.receive(&Held::default(), &mut memory).unwrap();

        // Killed between resuming and acknowledging: the receiver is dropped.
    });
    let err = send_all(a, &key(), SenderConfig::default(), &guest, b"").unwrap_err();
    assert!(matches!(err, MigrationError::Disconnected), "{err:?}");
    dest.join().unwrap();
}

#[test]
fn destination_refusing_the_vm_gives_its_reason() {
    let guest = small_guest();
    let (a, b) = socket_pair();
    let dest = thread::spawn(move || {
        let (mut r, _desc) = Receiver::accept(b, &key(), Limits::default()).unwrap();
        r.abort("cannot allocate 2 MiB of guest memory");
        assert!(matches!(
            r.receive(&NoPages, &mut Guest::sized(1)),
            Err(MigrationError::Unusable)
        ));
    });
    let err = send_all(a, &key(), SenderConfig::default(), &guest, b"").unwrap_err();
    match err {
        MigrationError::PeerAborted(why) => assert!(why.contains("cannot allocate"), "{why}"),
        other => panic!("{other:?}"),
    }
    dest.join().unwrap();
}

#[test]
fn destination_failing_to_restore_state_aborts_before_ready() {
    let guest = small_guest();
    let (a, b) = socket_pair();
    let dest = thread::spawn(move || {
        let (mut r, desc) = Receiver::accept(b, &key(), Limits::default()).unwrap();
        let mut memory = Guest::new(desc.regions.clone());
        r.receive(&NoPages, &mut memory).unwrap();
        r.abort("vCPU state rejected by KVM");
    });
    let err = send_all(a, &key(), SenderConfig::default(), &guest, b"bad").unwrap_err();
    assert!(
        matches!(&err, MigrationError::PeerAborted(why) if why.contains("vCPU state")),
        "{err:?}"
    );
    dest.join().unwrap();
}

#[test]
fn source_abort_reaches_the_destination() {
    let guest = small_guest();
    let (a, b) = socket_pair();
    let dest = spawn_destination(b, key(), Limits::default(), Arc::new(Held::default()));
    let mut s = Sender::connect(a, &key(), SenderConfig::default()).unwrap();
    s.describe(&guest.desc()).unwrap();
    s.round(guest.identities(), &|gfn, out: &mut Page| {
        guest.read(gfn, out)
    })
    .unwrap();
    s.abort("operator cancelled");
    assert!(matches!(
        s.finish(&[], &|_, _: &mut Page| {}, b""),
        Err(MigrationError::Unusable)
    ));
    let dest = dest.join().unwrap();
    assert!(
        matches!(&dest.result, Err(MigrationError::PeerAborted(why)) if why == "operator cancelled"),
        "{:?}",
        dest.result
    );
}

#[test]
fn replayed_or_reordered_messages_are_refused() {
    // 64 MiB: two summaries go out before the first answer is awaited.
    let mut guest = Guest::sized(64);
    fill(&mut guest, |i| Content::Random(i % 512));
    // Frame 0 is the proof, 1 Describe, 2 the first summary, 3 the second.
    type Plan = Box<dyn FnMut(usize, Vec<u8>) -> Vec<Vec<u8>> + Send>;
    let replay: Plan = Box::new(|i, f| if i == 2 { vec![f.clone(), f] } else { vec![f] });
    let mut held = None;
    let reorder: Plan = Box::new(move |i, f| match i {
        2 => {
            held = Some(f);
            vec![]
        }
        3 => vec![f, held.take().unwrap()],
        _ => vec![f],
    });
    let mut first = None;
    let old: Plan = Box::new(move |i, f| {
        if i == 1 {
            first = Some(f.clone());
        }
        if i == 3 {
            vec![first.take().unwrap()]
        } else {
            vec![f]
        }
    });
    for (name, plan) in [("replay", replay), ("reorder", reorder), ("old", old)] {
        let (src, dst, relays) = frame_relay(plan);
        let dest = spawn_destination(dst, key(), Limits::default(), Arc::new(Held::default()));
        let config = SenderConfig {
            batch: 16,
            ..SenderConfig::default()
        };
        let err = send_all(src, &key(), config, &guest, b"").unwrap_err();
        let dest = dest.join().unwrap();
        assert!(
            matches!(dest.result, Err(MigrationError::OutOfSequence { .. })),
            "{name}: {:?}",
            dest.result
        );
        assert!(
            matches!(
                err,
                MigrationError::PeerAborted(_) | MigrationError::Disconnected
            ),
            "{name}: {err:?}"
        );
        assert_nothing_bad_installed(&guest, &dest);
        relays.into_iter().for_each(|h| h.join().unwrap());
    }
}

#[test]
fn a_stalled_link_times_out_distinctly() {
    let (a, b) = socket_pair();
    b.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = std::time::Instant::now();
    // The "source" connects and says nothing.
    let err = Receiver::accept(b, &key(), Limits::default()).unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(a);

    // A destination that stops answering mid-round.
    let guest = small_guest();
    let (a, b) = socket_pair();
    a.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let dest = thread::spawn(move || {
        // (Under heavy load the source may time out in the handshake already.)
        if let Ok((r, _desc)) = Receiver::accept(b, &key(), Limits::default()) {
            thread::sleep(Duration::from_secs(2));
            drop(r);
        }
    });
    let err = send_all(a, &key(), SenderConfig::default(), &guest, b"").unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    dest.join().unwrap();
}

#[test]
fn sender_refuses_frames_outside_the_guest_or_twice() {
    let guest = small_guest();
    for bad in [vec![(1u64 << 40, None)], vec![(3, None), (3, None)]] {
        let (a, b) = socket_pair();
        let dest = spawn_destination(b, key(), Limits::default(), Arc::new(Held::default()));
        let mut s = Sender::connect(a, &key(), SenderConfig::default()).unwrap();
        s.describe(&guest.desc()).unwrap();
        let err = s
            .round(bad.clone(), &|gfn, out: &mut Page| guest.read(gfn, out))
            .unwrap_err();
        assert!(
            matches!(
                err,
                MigrationError::GfnOutOfRange { .. } | MigrationError::DuplicateGfn { .. }
            ),
            "{err:?}"
        );
        let dest = dest.join().unwrap();
        assert!(
            matches!(&dest.result, Err(MigrationError::PeerAborted(_))),
            "{:?}",
            dest.result
        );
    }
}

/// Runs a receiver against a scripted source; returns its error.
fn scripted(script: Script, limits: Limits) -> (MigrationError, fuzzing::CheckedSink) {
    let stream = ScriptedPeer::new(fuzzing::fuzz_key(), wire::Role::Source, script);
    let (mut r, desc) = match Receiver::accept(stream, &fuzzing::fuzz_key(), limits) {
        Ok(x) => x,
        Err(e) => {
            return (e, fuzzing::CheckedSink::new(&fuzzing::fuzz_description()));
        }
    };
    let mut sink = fuzzing::CheckedSink::new(&desc);
    let err = r
        .receive(&fuzzing::FuzzSource::default(), &mut sink)
        .expect_err("scripted source must fail");
    (err, sink)
}

fn describe() -> (u8, Vec<u8>) {
    let mut d = Vec::new();
    wire::encode_describe(&mut d, &fuzzing::fuzz_description());
    (wire::MsgType::Describe as u8, d)
}

fn offer(batch: u32, round: u32, runs: &[wire::Run], ids: &[PageId]) -> (u8, Vec<u8>) {
    let mut o = Vec::new();
    wire::encode_offer(&mut o, batch, round, runs, ids);
    (wire::MsgType::Offer as u8, o)
}

fn run(first: u64, count: u32, zero: bool) -> wire::Run {
    wire::Run { first, count, zero }
}

#[test]
fn oversized_lengths_are_refused_before_allocation() {
    let limits = fuzzing::fuzz_limits();
    // A frame header claiming 4 GiB of payload, after a valid handshake.
    let mut header = wire::Header {
        kind: wire::MsgType::Describe as u8,
        flags: 0,
        reserved: 0,
        len: u32::MAX,
        seq: 1,
    }
    .encode()
    .to_vec();
    let (err, _) = scripted(Script::AfterAuth(header.clone()), limits);
    assert!(matches!(err, MigrationError::TooLarge { .. }), "{err:?}");
    // Reserved bits and unknown types.
    header[4..8].copy_from_slice(&0u32.to_le_bytes());
    header[1] = 1;
    let (err, _) = scripted(Script::AfterAuth(header.clone()), limits);
    assert!(matches!(err, MigrationError::Malformed { .. }), "{err:?}");
    header[1] = 0;
    header[0] = 99;
    let (err, _) = scripted(Script::AfterAuth(header.clone()), limits);
    assert!(matches!(err, MigrationError::Malformed { .. }), "{err:?}");
    // A message type only a destination sends.
    header[0] = wire::MsgType::Need as u8;
    let (err, _) = scripted(Script::AfterAuth(header), limits);
    assert!(matches!(err, MigrationError::Unexpected { .. }), "{err:?}");

    // A guest larger than the limit, regions too many.
    let huge = VmDescription {
        vcpus: 1,
        regions: vec![Region {
            guest_addr: 0,
            pages: 1 << 40,
        }],
        config: vec![],
    };
    let mut d = Vec::new();
    wire::encode_describe(&mut d, &huge);
    let (err, _) = scripted(
        Script::Frames(vec![(wire::MsgType::Describe as u8, d)]),
        limits,
    );
    assert!(
        matches!(
            err,
            MigrationError::TooLarge {
                what: "guest pages",
                ..
            }
        ),
        "{err:?}"
    );

    // A state blob over the limit.
    let mut state = Vec::new();
    wire::encode_state(&mut state, 1 << 40, 0, b"x");
    let (err, _) = scripted(
        Script::Frames(vec![describe(), (wire::MsgType::State as u8, state)]),
        limits,
    );
    assert!(
        matches!(err, MigrationError::TooLarge { what: "state", .. }),
        "{err:?}"
    );

    // An offer with more ids than the limit.
    let ids = vec![PageId([1; 32]); 65];
    let (err, _) = scripted(
        Script::Frames(vec![describe(), offer(0, 1, &[run(0, 65, false)], &ids)]),
        limits,
    );
    assert!(matches!(err, MigrationError::TooLarge { .. }), "{err:?}");
}

#[test]
fn frames_outside_the_guest_are_refused() {
    let limits = fuzzing::fuzz_limits();
    let id = PageId([1; 32]);
    for (runs, ids, bad_gfn) in [
        (vec![run(16, 1, false)], vec![id], 16),
        (vec![run(10, 10, true)], vec![], 16),
        (vec![run(0x10007, 2, true)], vec![], 0x10008),
        (vec![run(u64::MAX, 1, true)], vec![], u64::MAX),
    ] {
        let (err, sink) = scripted(
            Script::Frames(vec![describe(), offer(0, 1, &runs, &ids)]),
            limits,
        );
        assert!(
            matches!(err, MigrationError::GfnOutOfRange { gfn } if gfn == bad_gfn),
            "{err:?}"
        );
        let _ = sink;
    }
    let (err, _) = scripted(
        Script::Frames(vec![
            describe(),
            offer(0, 1, &[run(0, 2, true), run(1, 1, true)], &[]),
        ]),
        limits,
    );
    assert!(
        matches!(err, MigrationError::DuplicateGfn { gfn: 1, round: 1 }),
        "{err:?}"
    );
}

#[test]
fn a_page_that_does_not_match_its_identity_is_never_installed() {
    let limits = fuzzing::fuzz_limits();
    let good = Box::new([9u8; PAGE_SIZE]);
    let id = PageId::of(&good);
    let mut evil = *good;
    evil[0] = 8;
    let mut pages = Vec::new();
    wire::encode_pages(
        &mut pages,
        0,
        0,
        &[
            wire::PageEntry {
                new_id: None,
                body: wire::Body::Raw(&good),
            },
            wire::PageEntry {
                new_id: None,
                body: wire::Body::Raw(&evil),
            },
        ],
    );
    let (end, complete) = end_and_complete(1);
    // Every frame covered: the two data pages and zero runs over the rest.
    let runs = [run(0, 2, false), run(2, 14, true), run(0x10000, 8, true)];
    let (err, sink) = scripted(
        Script::Frames(vec![
            describe(),
            offer(0, 1, &runs, &[id, id]),
            (wire::MsgType::Pages as u8, pages),
            (wire::MsgType::RoundEnd as u8, end),
            (wire::MsgType::Complete as u8, complete),
        ]),
        limits,
    );
    // The changed (or damaged) page is held back until a later round offers frame 1
    // again; none did, so the migration is refused.
    assert!(matches!(err, MigrationError::BadPage { gfn: 1 }), "{err:?}");
    assert_eq!(sink.written(), 1, "only the matching page is installed");
}

/// `RoundEnd` for round 1 (one offer) and a `Complete` after `rounds` rounds, no state.
fn end_and_complete(rounds: u32) -> (Vec<u8>, Vec<u8>) {
    let mut end = Vec::new();
    wire::encode_round_end(&mut end, 1, 1);
    let mut complete = Vec::new();
    wire::Complete {
        rounds,
        state_len: 0,
        state_hash: *blake3::hash(b"").as_bytes(),
    }
    .encode(&mut complete);
    (end, complete)
}

#[test]
fn completing_without_covering_every_page_is_refused() {
    let limits = fuzzing::fuzz_limits();
    let (end, complete) = end_and_complete(1);
    let (err, _) = scripted(
        Script::Frames(vec![
            describe(),
            offer(0, 1, &[run(0, 16, true), run(0x10000, 7, true)], &[]),
            (wire::MsgType::RoundEnd as u8, end),
            (wire::MsgType::Complete as u8, complete),
        ]),
        limits,
    );
    assert!(
        matches!(err, MigrationError::Incomplete { gfn: 0x10007 }),
        "{err:?}"
    );
}

#[test]
fn fuzz_seeds_complete_and_mutations_never_panic() {
    let seeds = fuzzing::seed_inputs();
    assert!(
        fuzzing::run_receiver(&seeds[0]),
        "seed 0 completes a migration"
    );
    assert!(
        fuzzing::run_receiver(&seeds[1]),
        "seed 1 completes a migration"
    );
    assert!(
        fuzzing::run_receiver(&seeds[2]),
        "seed 2 (version 3: ranges and a push) completes a migration"
    );
    assert!(
        fuzzing::run_receiver(&seeds[3]),
        "seed 3 (post-copy at once) completes a migration"
    );
    let completed = AtomicU64::new(0);
    for seed in &seeds {
        // Every byte of the headers and small messages; a sample of the page contents.
        for i in (0..seed.len()).filter(|&i| i < 300 || i % 61 == 0 || seed.len() - i < 400) {
            for bit in [0x01u8, 0x80] {
                let mut input = seed.clone();
                input[i] ^= bit;
                if fuzzing::run_receiver(&input) {
                    completed.fetch_add(1, Ordering::Relaxed);
                }
            }
            let _ = fuzzing::run_receiver(&seed[..i]);
        }
    }
    // Flips in payload bytes that do not matter (page content of a raw page is verified;
    // reserved-free fields are not) may still complete; most do not.
    assert!(completed.load(Ordering::Relaxed) < seeds[0].len() as u64);
}

#[test]
fn sender_fuzz_seeds_complete_and_mutations_never_panic() {
    let seeds = fuzzing::sender_seed_inputs();
    for (i, seed) in seeds.iter().enumerate() {
        assert!(
            fuzzing::run_sender(seed),
            "sender seed {i} completes a migration"
        );
        for at in 0..seed.len() {
            for bit in [0x01u8, 0x40, 0x80] {
                let mut input = seed.clone();
                input[at] ^= bit;
                let _ = fuzzing::run_sender(&input);
            }
            assert!(
                !fuzzing::run_sender(&seed[..at]),
                "a cut script cannot complete"
            );
        }
    }
}

/// Writes the fuzz seeds into `$FABVM_FUZZ_SEEDS` (e.g. `fuzz/corpus/migration_receiver`):
/// `FABVM_FUZZ_SEEDS=$PWD/fuzz/corpus/migration_receiver cargo test -p fabric -- --ignored
/// write_fuzz_seeds`.
#[test]
#[ignore = "writes files; run by hand to seed the fuzz corpus"]
fn write_fuzz_seeds() {
    let dir = std::env::var("FABVM_FUZZ_SEEDS").expect("FABVM_FUZZ_SEEDS");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, seed) in fuzzing::seed_inputs().iter().enumerate() {
        std::fs::write(format!("{dir}/seed-{i}"), seed).unwrap();
    }
}
