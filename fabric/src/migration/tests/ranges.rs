//! Protocol v3's range summaries, pushes and one-round-trip commit: what a destination
//! holding all, part or none of a VM costs, and that a wrong claim costs pages, never a
//! wrong one.

use super::*;

/// A 64 MiB guest of random pages, a quarter of them zero.
fn random_guest() -> Guest {
    let mut g = Guest::sized(64);
    fill(&mut g, |i| {
        if i % 4 == 0 {
            Content::Zero
        } else {
            Content::Random(i)
        }
    });
    g
}

fn memory_bytes(g: &Guest) -> u64 {
    g.total() * PAGE_SIZE as u64
}

#[test]
fn a_vm_the_destination_holds_whole_costs_under_a_thousandth() {
    let guest = random_guest();
    let held = Held::from_guest(&guest, |_| true).with_ranges(&[&guest]);
    let (stats, dest) = migrate(&guest, held, SenderConfig::default());
    assert_same_memory(&guest, &dest);
    assert_eq!(stats.pages_sent, 0);
    assert_eq!(stats.pages_found, guest.total() - guest.zero_pages());
    assert_eq!(stats.ranges_held, stats.ranges_summarized);
    let r = dest.result.as_ref().unwrap();
    assert_eq!(r.pages_held, guest.total());
    let wire = stats.bytes_total();
    eprintln!(
        "held whole: {wire} bytes both ways for {} bytes of memory ({:.5})",
        memory_bytes(&guest),
        wire as f64 / memory_bytes(&guest) as f64
    );
    assert!(wire * 1000 <= memory_bytes(&guest), "{wire} bytes");
}

#[test]
fn a_few_changed_pages_cost_their_sub_ranges_only() {
    let guest = random_guest();
    // The destination holds an older copy: one page in 500 has changed since.
    let mut older = guest.clone();
    let changed: Vec<u64> = (0..guest.total()).filter(|i| i % 500 == 7).collect();
    for &i in &changed {
        write_content(older.page_mut(older.gfn(i)), Content::Random(1 << 40 | i));
    }
    let held = Held::from_guest(&older, |_| true).with_ranges(&[&older]);
    let (stats, dest) = migrate(&guest, held, SenderConfig::default());
    assert_same_memory(&guest, &dest);
    let data_changed = changed.iter().filter(|&&i| i % 4 != 0).count() as u64;
    assert_eq!(stats.pages_sent, data_changed, "{stats:?}");
    // Per changed page: its range's 16 sub-range digests and its sub-range's identities
    // (about 2 KiB), far below the 32 bytes a page the whole VM's identities would cost.
    let wire = stats.bytes_total() - data_changed * PAGE_SIZE as u64;
    let per_page_ids = guest.total() * 32;
    eprintln!("older copy held: {wire} bytes besides the changed pages' contents; identities would be {per_page_ids}");
    assert!(wire * 4 < per_page_ids, "{wire}");
}

#[test]
fn a_destination_holding_nothing_gets_pushes_at_page_cost() {
    let guest = random_guest();
    let held = Held {
        empty: true,
        ..Held::default()
    };
    let config = SenderConfig {
        compression: Compression::None,
        ..SenderConfig::default()
    };
    let (stats, dest) = migrate(&guest, held, config);
    assert_same_memory(&guest, &dest);
    let data = guest.total() - guest.zero_pages();
    assert_eq!(stats.pages_sent, data);
    assert_eq!(stats.pages_found, 0);
    // QEMU sends a page with an 8-byte header: at most 0.1% over that.
    let qemu = data * (PAGE_SIZE as u64 + 8);
    let wire = stats.bytes_sent;
    eprintln!(
        "nothing held: {wire} bytes sent, QEMU's format {qemu} ({:.5})",
        wire as f64 / qemu as f64
    );
    assert!(wire * 1000 <= qemu * 1001, "{wire} against {qemu}");
}

#[test]
fn a_host_holding_other_pages_switches_to_pushing() {
    let guest = random_guest();
    let mut other = random_guest();
    fill(&mut other, |i| Content::Random(1 << 41 | i));
    let held = Held::from_guest(&other, |_| true).with_ranges(&[&other]);
    let (stats, dest) = migrate(&guest, held, SenderConfig::default());
    assert_same_memory(&guest, &dest);
    let r = dest.result.as_ref().unwrap();
    // Some identities go out while the destination gathers evidence, then pushes.
    assert!(r.pages_pushed > guest.total() / 2, "{r:?}");
    let data = guest.total() - guest.zero_pages();
    let qemu = data * (PAGE_SIZE as u64 + 8);
    assert!(
        stats.bytes_sent * 100 <= qemu * 101,
        "{} against {qemu}",
        stats.bytes_sent
    );
}

#[test]
fn zero_ranges_are_no_evidence_of_holding_the_vm() {
    // Half the guest zero (whole zero ranges, which every destination "holds"), the other
    // half pages the host does not have: the destination must still switch to pushing.
    let mut guest = random_guest();
    let half = guest.total() / 2;
    fill(&mut guest, |i| {
        if i < half {
            Content::Zero
        } else {
            Content::Random(i)
        }
    });
    let mut other = random_guest();
    fill(&mut other, |i| Content::Random(1 << 44 | i));
    let held = Held::from_guest(&other, |_| true).with_ranges(&[&other]);
    let (stats, dest) = migrate(&guest, held, SenderConfig::default());
    assert_same_memory(&guest, &dest);
    let r = dest.result.as_ref().unwrap();
    assert!(r.pages_pushed > half / 2, "{r:?}");
    assert!(stats.pages_offered >= half, "{stats:?}");
}

#[test]
fn a_range_claimed_but_not_really_held_is_sent() {
    let guest = random_guest();
    // The index says the host holds every range, but some pages it gives are wrong (a VM
    // rewrote them after publishing, or the claim is forged).
    let mut held = Held::from_guest(&guest, |_| true).with_ranges(&[&guest]);
    let lying: Vec<PageId> = (0..guest.total())
        .filter(|i| i % 97 == 1)
        .filter_map(|i| crate::identity::identify(guest.page(guest.gfn(i))))
        .collect();
    held.lying.extend(lying.iter().copied());
    let (stats, dest) = migrate(&guest, held, SenderConfig::default());
    assert_same_memory(&guest, &dest);
    let r = dest.result.as_ref().unwrap();
    assert_eq!(r.fetch_mismatches, lying.len() as u64, "{r:?}");
    assert_eq!(stats.pages_sent, lying.len() as u64);
}

#[test]
fn later_rounds_push_when_the_destination_holds_nothing() {
    let mut guest = random_guest();
    let (a, b) = socket_pair();
    let held = Held {
        empty: true,
        ..Held::default()
    };
    let dest = spawn_destination(b, key(), Limits::default(), Arc::new(held));
    let mut s = Sender::connect(a, &key(), SenderConfig::default()).unwrap();
    s.describe(&guest.desc()).unwrap();
    s.round(guest.identities(), &|gfn, out: &mut Page| {
        guest.read(gfn, out)
    })
    .unwrap();
    let dirty: Vec<u64> = (0..64).map(|i| guest.gfn(i * 7)).collect();
    for &gfn in &dirty {
        write_content(guest.page_mut(gfn), Content::Random(gfn | 1 << 42));
    }
    let round2 = s
        .round(guest.identities_of(&dirty), &|gfn, out: &mut Page| {
            guest.read(gfn, out)
        })
        .unwrap();
    assert_eq!(round2.pages_found, 0);
    let stats = s
        .finish(&dirty, &|gfn, out: &mut Page| guest.read(gfn, out), b"s")
        .unwrap();
    let dest = dest.join().unwrap();
    assert_same_memory(&guest, &dest);
    // Everything pushed: the first round, the dirty round and the final round.
    assert_eq!(stats.pages_pushed, guest.total() + 2 * 64, "{stats:?}");
    assert_eq!(round2.pages_sent, 64);
}

/// A two-round migration through `(src, dst)`: everything, then 64 pages rewritten while
/// the guest "ran", pushed in the final round.
fn two_rounds(
    src: UnixStream,
    dst: UnixStream,
    guest: &Guest,
) -> (Result<MigrationStats, MigrationError>, Dest) {
    let dest = spawn_destination(dst, key(), Limits::default(), Arc::new(Held::default()));
    let mut guest = guest.clone();
    let result = (|| {
        let mut s = Sender::connect(src, &key(), SenderConfig::default())?;
        s.describe(&guest.desc())?;
        s.round(guest.identities(), &|gfn, out: &mut Page| {
            guest.read(gfn, out)
        })?;
        let dirty: Vec<u64> = (0..64).map(|i| guest.gfn(i * 5 + 1)).collect();
        for &gfn in &dirty {
            write_content(guest.page_mut(gfn), Content::Random(gfn | 1 << 43));
        }
        s.finish(
            &dirty,
            &|gfn, out: &mut Page| guest.read(gfn, out),
            b"state",
        )
    })();
    (result, dest.join().unwrap())
}

#[test]
fn a_link_cut_during_the_final_push_never_reports_success() {
    let mut guest = Guest::sized(8);
    fill(&mut guest, Content::Random);
    let (a, b) = socket_pair();
    let (stats, _) = two_rounds(a, b, &guest);
    let stats = stats.unwrap();
    let last = stats.rounds.last().unwrap();
    assert!(last.last && last.pages_sent == 64, "{stats:?}");
    // The final push ends a little before the state and Complete (under 300 bytes here).
    let push_end = stats.bytes_sent - 300;
    let push_start = push_end - last.bytes_sent;
    for at in [
        push_start + 20,
        push_start + last.bytes_sent / 2,
        push_end - 10,
    ] {
        let cut = move |offset: u64, bytes: &mut [u8]| {
            (at.saturating_sub(offset) as usize).min(bytes.len())
        };
        let (src, dst, relays) = relay(cut, pass);
        let (result, dest) = two_rounds(src, dst, &guest);
        assert!(
            matches!(
                result,
                Err(MigrationError::Disconnected | MigrationError::PeerAborted(_))
            ),
            "cut at {at}: {result:?}"
        );
        assert!(
            dest.result.is_err(),
            "destination confirmed with a cut at {at}"
        );
        relays.into_iter().for_each(|h| h.join().unwrap());
    }
}
