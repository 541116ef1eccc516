//! Post-copy between a sender and a receiver over a socket pair: after one pre-copy round
//! (pages rewritten since listed as missing) and at once (every page listed), the
//! destination resumes first and takes pages on fault or from the stream; a page that does
//! not match its listed identity fails the migration.

use super::*;
use crate::migration::postcopy::{Pace, PageState, PostcopyTable};

/// The destination's end: receive, take the post-copy list, ack, fault on `touch` frames
/// first, then take the stream until every page is in. Returns its memory and figures.
fn postcopy_destination(
    stream: UnixStream,
    touch: Vec<u64>,
) -> JoinHandle<Result<(Guest, wire::AllIn, usize), MigrationError>> {
    thread::spawn(move || {
        let (mut r, desc) = Receiver::accept(stream, &key(), Limits::default())?;
        let mut mem = Guest::new(desc.regions.clone());
        let vm = r.receive(&NoPages, &mut mem)?;
        let pages = vm.postcopy.expect("a post-copy switch");
        let listed = pages.missing.len() + pages.present.len();
        let mut pc = r.into_postcopy(&pages)?;
        pc.confirm_resumed()?;
        pc.want(&touch)?;
        while pc.table().remaining() > 0 {
            let m = &mut mem;
            pc.recv(&mut |gfn, page| {
                m.page_mut(gfn).copy_from_slice(page);
                Ok(())
            })?;
        }
        let all = pc.finish()?;
        Ok((mem, all, listed))
    })
}

fn source_guest() -> Guest {
    let mut g = Guest::sized(4);
    fill(&mut g, |i| match i % 4 {
        0 => Content::Zero,
        1 => Content::Text(i),
        _ => Content::Random(i),
    });
    g
}

#[test]
fn hybrid_after_one_round_installs_every_page() {
    let mut g = source_guest();
    let (a, b) = socket_pair();
    let touch: Vec<u64> = (0..8).map(|i| g.gfn(i * 50 + 1)).collect();
    let dest = postcopy_destination(b, touch.clone());
    let mut s = Sender::connect(a, &key(), SenderConfig::default()).unwrap();
    s.describe(&g.desc()).unwrap();
    let gr = g.clone();
    s.round(gr.identities(), &|gfn, out| gr.read(gfn, out))
        .unwrap();
    // Rewrite a tenth of the pages after round 1 (one becomes zero).
    let dirty: Vec<u64> = (0..g.total()).step_by(10).map(|i| g.gfn(i)).collect();
    for (k, &gfn) in dirty.iter().enumerate() {
        let c = if k == 3 {
            Content::Zero
        } else {
            Content::Random(1000 + k as u64)
        };
        write_content(g.page_mut(gfn), c);
    }
    let listed = g.identities_of(&dirty);
    let mut pc = s.switchover(&listed, b"state").unwrap();
    pc.prefer(&dirty[dirty.len() / 2..]);
    let mut switched = 0;
    let all = pc
        .serve(&|gfn, out| g.read(gfn, out), Pace::default(), || {
            switched += 1
        })
        .unwrap();
    assert_eq!(switched, 1);
    let (mem, dest_all, listed_at_dest) = dest.join().unwrap().unwrap();
    assert_eq!(mem.mem, g.mem, "destination memory differs");
    assert_eq!(all, dest_all);
    let data = listed.iter().filter(|(_, id)| id.is_some()).count() as u64;
    assert_eq!(pc.stats().listed, data);
    assert_eq!(listed_at_dest as u64, data);
    assert_eq!(all.faulted + all.streamed + all.held, data);
    assert!(pc.stats().sent_on_fault + pc.stats().sent_streamed >= data);
}

#[test]
fn at_once_lists_every_page() {
    let g = source_guest();
    let (a, b) = socket_pair();
    let dest = postcopy_destination(b, vec![g.gfn(5), g.gfn(777)]);
    let mut s = Sender::connect(a, &key(), SenderConfig::default()).unwrap();
    s.describe(&g.desc()).unwrap();
    let all_pages: Vec<_> = g.identities().collect();
    let mut pc = s.switchover(&all_pages, b"state").unwrap();
    let pace = Pace {
        pages_per_s: Some(20_000),
    };
    let all = pc.serve(&|gfn, out| g.read(gfn, out), pace, || {}).unwrap();
    let (mem, _, listed) = dest.join().unwrap().unwrap();
    assert_eq!(mem.mem, g.mem);
    let data = g.total() - g.zero_pages();
    assert_eq!(listed as u64, data);
    assert_eq!(all.faulted + all.streamed + all.held, data);
}

#[test]
fn a_page_not_matching_its_identity_fails_the_destination() {
    let g = source_guest();
    let (a, b) = socket_pair();
    let dest = thread::spawn(move || {
        let (mut r, desc) = Receiver::accept(b, &key(), Limits::default())?;
        let mut mem = Guest::new(desc.regions.clone());
        let vm = r.receive(&NoPages, &mut mem)?;
        let mut pc = r.into_postcopy(&vm.postcopy.unwrap_or_default())?;
        pc.confirm_resumed()?;
        loop {
            pc.recv(&mut |_, _| Ok(()))?;
        }
        #[allow(unreachable_code)]
        Ok::<(), MigrationError>(())
    });
    let mut s = Sender::connect(a, &key(), SenderConfig::default()).unwrap();
    s.describe(&g.desc()).unwrap();
    let mut all_pages: Vec<_> = g.identities().collect();
    // List frame 1 under another page's identity: what arrives cannot match it.
    all_pages[1].1 = all_pages[2].1;
    let mut pc = s.switchover(&all_pages, b"state").unwrap();
    let served = pc.serve(&|gfn, out| g.read(gfn, out), Pace::default(), || {});
    let err = dest.join().unwrap().unwrap_err();
    assert!(matches!(err, MigrationError::BadPage { .. }), "{err}");
    assert!(served.is_err(), "the source sees the destination give up");
}

#[test]
fn missing_list_inside_a_round_or_short_is_refused() {
    let g = source_guest();
    let (a, b) = socket_pair();
    let dest = thread::spawn(move || {
        let (mut r, desc) = Receiver::accept(b, &key(), Limits::default())?;
        let mut mem = Guest::new(desc.regions.clone());
        r.receive(&NoPages, &mut mem).map(|_| ())
    });
    let mut s = Sender::connect(a, &key(), SenderConfig::default()).unwrap();
    s.describe(&g.desc()).unwrap();
    // Only half the guest listed, no round before: the destination finds frames uncovered.
    let half: Vec<_> = g.identities().take(g.total() as usize / 2).collect();
    let switched = s.switchover(&half, b"state");
    let err = dest.join().unwrap().unwrap_err();
    assert!(matches!(err, MigrationError::Incomplete { .. }), "{err}");
    if let Ok(mut pc) = switched {
        assert!(pc
            .serve(&|gfn, out| g.read(gfn, out), Pace::default(), || {})
            .is_err());
    }
}

#[test]
fn table_counts_each_page_once_by_how_it_came() {
    let a = PageId::of(&[1u8; PAGE_SIZE]);
    let b = PageId::of(&[2u8; PAGE_SIZE]);
    let c = PageId::of(&[3u8; PAGE_SIZE]);
    let mut t = PostcopyTable::new(&[(10, a), (11, b), (12, c)], &[20]);
    assert_eq!(t.state(20), PageState::In);
    assert_eq!(t.remaining(), 3);
    assert_eq!(t.state(9), PageState::NotListed);
    assert!(t.request(10));
    assert!(!t.request(10), "asked once");
    assert_eq!(t.state(10), PageState::Requested);
    assert!(t.check(10, &[2u8; PAGE_SIZE]).is_err(), "wrong content");
    assert!(t.check(10, &[1u8; PAGE_SIZE]).unwrap());
    t.installed(10, false);
    assert!(t.check(11, &[2u8; PAGE_SIZE]).unwrap());
    t.installed(11, false);
    t.installed(12, true);
    assert!(!t.check(12, &[3u8; PAGE_SIZE]).unwrap(), "already in");
    t.installed(12, true);
    assert!(t.check(13, &[3u8; PAGE_SIZE]).is_err(), "not listed");
    assert_eq!(t.remaining(), 0);
    let f = t.figures;
    assert_eq!((f.faulted, f.streamed, f.held, f.duplicates), (1, 1, 2, 1));
    assert!(t.missing().is_empty());
}
