//! Round trips and checks of every message's encoding.

use super::*;
use crate::identity::{PageId, PAGE_SIZE};
use crate::manifest::Region;
use crate::migration::{Limits, MigrationError, VmDescription};
use crate::testutil::page;

#[test]
fn hello_round_trip_and_magic() {
    let h = Hello {
        version_min: 1,
        version_max: 3,
        role: Role::Destination,
        features: FEATURE_LZ4,
        max_batch: 4096,
        max_runs: 100,
        max_window: 8,
        nonce: [7; 32],
    };
    let b = h.encode();
    assert_eq!(Hello::decode(&b).unwrap(), h);
    let mut bad = b;
    bad[0] = b'X';
    assert!(matches!(
        Hello::decode(&bad),
        Err(MigrationError::NotAPeer(_))
    ));
    let mut bad = b;
    bad[12] = 9;
    assert!(matches!(
        Hello::decode(&bad),
        Err(MigrationError::NotAPeer(_))
    ));
}

#[test]
fn header_round_trip() {
    let h = Header {
        kind: 17,
        flags: 0,
        reserved: 0,
        len: 12345,
        seq: 1 << 40,
    };
    assert_eq!(Header::decode(&h.encode()), h);
}

#[test]
fn message_types_and_directions() {
    for v in 0..=255u8 {
        if let Some(t) = MsgType::from_u8(v) {
            assert_eq!(t as u8, v);
            assert!(t.sent_by(Role::Source) || t.sent_by(Role::Destination));
        }
    }
    assert!(MsgType::Offer.sent_by(Role::Source));
    assert!(!MsgType::Offer.sent_by(Role::Destination));
    assert!(MsgType::Need.sent_by(Role::Destination));
    assert!(MsgType::Abort.sent_by(Role::Source) && MsgType::Abort.sent_by(Role::Destination));
}

#[test]
fn describe_round_trip_and_limits() {
    let limits = Limits::default();
    let desc = VmDescription {
        vcpus: 2,
        regions: vec![
            Region {
                guest_addr: 0,
                pages: 256,
            },
            Region {
                guest_addr: 1 << 32,
                pages: 16,
            },
        ],
        config: b"{}".to_vec(),
    };
    let mut out = Vec::new();
    encode_describe(&mut out, &desc);
    assert_eq!(decode_describe(&out, &limits).unwrap(), desc);
    assert!(out.len() as u64 <= MsgType::Describe.max_payload(&limits));

    // Truncated, trailing, and each limit.
    assert!(decode_describe(&out[..out.len() - 1], &limits).is_err());
    let mut long = out.clone();
    long.push(0);
    assert!(decode_describe(&long, &limits).is_err());
    let small = Limits {
        max_pages: 100,
        ..limits
    };
    assert!(matches!(
        decode_describe(&out, &small),
        Err(MigrationError::TooLarge { .. })
    ));
    let mut huge = out.clone();
    huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_describe(&huge, &limits),
        Err(MigrationError::TooLarge { .. })
    ));
    // Overlapping and unaligned regions.
    for regions in [
        vec![(0, 10), (4096 * 5, 10)],
        vec![(100, 1)],
        vec![(0, 0)],
        vec![(!4095u64, 2)],
        vec![],
    ] {
        let d = VmDescription {
            vcpus: 1,
            regions: regions
                .into_iter()
                .map(|(guest_addr, pages)| Region { guest_addr, pages })
                .collect(),
            config: vec![],
        };
        let mut out = Vec::new();
        encode_describe(&mut out, &d);
        assert!(decode_describe(&out, &limits).is_err(), "{d:?}");
    }
}

#[test]
fn offer_round_trip_and_checks() {
    let limits = Limits::default();
    let ids = [PageId([1; 32]), PageId([2; 32]), PageId([3; 32])];
    let runs = [
        Run {
            first: 10,
            count: 2,
            zero: false,
        },
        Run {
            first: 12,
            count: 1000,
            zero: true,
        },
        Run {
            first: 5000,
            count: 1,
            zero: false,
        },
    ];
    let mut out = Vec::new();
    encode_offer(&mut out, 7, 2, &runs, &ids);
    let v = OfferView::decode(&out, &limits).unwrap();
    assert_eq!((v.batch, v.round, v.id_count()), (7, 2, 3));
    assert_eq!(v.runs().collect::<Vec<_>>(), runs);
    assert_eq!((0..3).map(|i| v.id(i)).collect::<Vec<_>>(), ids);

    // Data runs must cover exactly the ids.
    let mut out = Vec::new();
    encode_offer(&mut out, 0, 1, &runs[..2], &ids);
    assert!(OfferView::decode(&out, &limits).is_err());
    // Empty run.
    let mut out = Vec::new();
    let empty = Run {
        first: 1,
        count: 0,
        zero: true,
    };
    encode_offer(&mut out, 0, 1, &[empty], &[]);
    assert!(OfferView::decode(&out, &limits).is_err());
    // Counts over the limits are refused before the length is looked at.
    let mut out = Vec::new();
    encode_offer(&mut out, 0, 1, &runs, &ids);
    out[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        OfferView::decode(&out, &limits),
        Err(MigrationError::TooLarge { .. })
    ));
}

#[test]
fn need_modes() {
    for (n, bits, mode) in [
        (10usize, vec![0u8, 0], 0u8),
        (10, vec![0xff, 0x03], 1),
        (10, vec![0x05, 0x02], 2),
    ] {
        let mut out = Vec::new();
        encode_need(&mut out, 3, n, &bits);
        assert_eq!(out[4], mode);
        let v = NeedView::decode(&out).unwrap();
        assert_eq!(v.batch, 3);
        let got: Vec<bool> = v.needed(n).unwrap().collect();
        let want: Vec<bool> = (0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect();
        assert_eq!(got, want);
    }
    // Bits past the offer, wrong bitmap length, bad mode.
    let v = NeedView::decode(&[0, 0, 0, 0, 2, 0x00, 0x04]).unwrap();
    assert!(v.needed(10).is_err());
    let v = NeedView::decode(&[0, 0, 0, 0, 2, 0x01]).unwrap();
    assert!(v.needed(10).is_err());
    assert!(NeedView::decode(&[0, 0, 0, 0, 3]).is_err());
    assert!(NeedView::decode(&[0, 0, 0, 0, 0, 1]).is_err());
}

#[test]
fn pages_round_trip() {
    let raw = page(1);
    let mut text = [b'a'; PAGE_SIZE];
    text[100] = b'b';
    let mut buf = [0u8; COMPRESS_BUF];
    assert_eq!(
        compress_page(&raw, &mut buf),
        None,
        "random data does not compress"
    );
    let len = compress_page(&text, &mut buf).unwrap();
    let block = buf[..len].to_vec();
    let entries = [
        PageEntry {
            new_id: None,
            body: Body::Raw(&raw),
        },
        PageEntry {
            new_id: Some(PageId([9; 32])),
            body: Body::Lz4(&block),
        },
        PageEntry {
            new_id: None,
            body: Body::Zero,
        },
        PageEntry {
            new_id: Some(PageId([8; 32])),
            body: Body::Known,
        },
    ];
    let mut out = Vec::new();
    encode_pages(&mut out, 5, 256, &entries);
    assert!(out.len() as u64 <= MsgType::Pages.max_payload(&Limits::default()));
    let mut got = Vec::new();
    let h = decode_pages(&out, &mut got).unwrap();
    assert_eq!(
        h,
        PagesHeader {
            batch: 5,
            first: 256
        }
    );
    assert_eq!(got, entries);
    let mut p = [0u8; PAGE_SIZE];
    decode_page(&got[1].body, &mut p).unwrap();
    assert_eq!(p, text);
    decode_page(&got[0].body, &mut p).unwrap();
    assert_eq!(p, *raw);

    // A damaged block, a bad tag, a zero page with an id, truncation.
    let mut bad_block = block.clone();
    bad_block[0] ^= 0xff;
    bad_block.truncate(3);
    assert!(decode_page(&Body::Lz4(&bad_block), &mut p).is_err());
    for (offset, value) in [(16usize, 0x80u8), (16, 6)] {
        let mut bad = out.clone();
        bad[offset] = value;
        assert!(decode_pages(&bad, &mut Vec::new()).is_err());
    }
    assert!(decode_pages(&out[..out.len() - 1], &mut Vec::new()).is_err());

    // The sealed part ends where the entries do: not before, not after, not past
    // the payload.
    let sealed = sealed_len(MsgType::Pages, &out).unwrap();
    assert_eq!(sealed, 16 + 1 + (1 + 32 + 2) + 1 + (1 + 32));
    for wrong in [
        0u32,
        15,
        sealed as u32 - 1,
        sealed as u32 + 1,
        out.len() as u32 + 1,
    ] {
        let mut bad = out.clone();
        bad[..4].copy_from_slice(&wrong.to_le_bytes());
        assert!(decode_pages(&bad, &mut Vec::new()).is_err(), "{wrong}");
    }
    assert_eq!(sealed_len(MsgType::State, &out).unwrap(), out.len());
}

#[test]
fn small_messages() {
    let c = Complete {
        rounds: 3,
        state_len: 10,
        state_hash: [4; 32],
    };
    let mut out = Vec::new();
    c.encode(&mut out);
    assert_eq!(out.len(), 48);
    assert_eq!(Complete::decode(&out).unwrap(), c);
    let mut out = Vec::new();
    encode_round_end(&mut out, 2, 9);
    assert_eq!(decode_round_end(&out).unwrap(), (2, 9));
    let mut out = Vec::new();
    encode_state(&mut out, 100, 50, b"xyz");
    assert_eq!(decode_state(&out).unwrap(), (100, 50, &b"xyz"[..]));
    let mut out = Vec::new();
    let long = "é".repeat(400);
    encode_abort(&mut out, &long);
    assert!(out.len() <= MAX_REASON);
    assert!(decode_abort(&out).starts_with("éé"));
}
