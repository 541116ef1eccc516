use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::thread;

use super::*;

fn key(b: u8) -> MigrationKey {
    MigrationKey::new(&[b; 32]).unwrap()
}

fn page(seed: u8) -> Box<Page> {
    Box::new([seed; PAGE_SIZE])
}

/// A server on a loopback port answering from `held` (a page per identity) for one
/// connection; returns its address and the serve result.
fn server(
    held: HashMap<PageId, Box<Page>>,
    server_key: MigrationKey,
    timeout: Duration,
) -> (String, thread::JoinHandle<Result<ServeStats, ServiceError>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let h = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        serve(stream, &server_key, timeout, |ids, out| {
            ids.iter()
                .zip(out.iter_mut())
                .map(|(id, out)| held.get(id).map(|p| out.copy_from_slice(&p[..])).is_some())
                .collect()
        })
    });
    (addr, h)
}

#[test]
fn serves_held_pages_by_identity_in_order() {
    let pages: Vec<Box<Page>> = (1..=3).map(page).collect();
    let ids: Vec<PageId> = pages.iter().map(|p| PageId::of(p)).collect();
    let held = ids
        .iter()
        .copied()
        .zip(pages.iter().cloned())
        .take(2)
        .collect();
    let (addr, h) = server(held, key(1), IO_TIMEOUT);
    // 600 identities: three requests on one connection.
    let asked: Vec<PageId> = (0..600).map(|i| ids[i % 3]).collect();
    let got = fetch_pages(&addr, &key(1), &asked).unwrap();
    for (i, got) in got.iter().enumerate() {
        match i % 3 {
            2 => assert!(got.is_none()),
            j => assert_eq!(got.as_deref(), Some(&*pages[j])),
        }
    }
    let stats = h.join().unwrap().unwrap();
    assert_eq!((stats.requests, stats.asked, stats.served), (3, 600, 400));
}

#[test]
fn a_source_giving_a_wrong_page_sends_it_as_absent() {
    let id = PageId::of(&page(1));
    let (addr, h) = server([(id, page(2))].into(), key(1), IO_TIMEOUT);
    assert_eq!(fetch_pages(&addr, &key(1), &[id]).unwrap(), vec![None]);
    assert_eq!(h.join().unwrap().unwrap().mismatched, 1);
}

#[test]
fn a_lying_server_is_caught_by_the_client() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (good, bad) = (page(1), page(9));
    let ids = [PageId::of(&good), PageId::of(&page(2))];
    let liar = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut ch = ServiceChannel::accept(stream, &key(1)).unwrap();
        ch.recv().unwrap();
        ch.send(&encode_reply(&[Some(&good), Some(&bad)])).unwrap();
    });
    let mut client = PageClient::connect(&addr, &key(1), IO_TIMEOUT).unwrap();
    let got = client.fetch(&ids).unwrap();
    assert_eq!(got[0].as_deref(), Some(&*page(1)));
    assert!(got[1].is_none());
    assert_eq!(client.mismatched(), 1);
    liar.join().unwrap();
}

#[test]
fn a_wrong_key_is_refused_at_both_ends() {
    let (addr, h) = server(HashMap::new(), key(1), IO_TIMEOUT);
    let err = fetch_pages(&addr, &key(2), &[PageId::of(&page(1))]).unwrap_err();
    assert!(
        matches!(err, ServiceError::Channel(MigrationError::AuthFailed)),
        "{err}"
    );
    let err = h.join().unwrap().unwrap_err();
    assert!(
        matches!(err, ServiceError::Channel(MigrationError::AuthFailed)),
        "{err}"
    );
}

#[test]
fn hostile_clients_get_errors_not_panics_or_hangs() {
    // Garbage instead of a hello.
    let (addr, h) = server(HashMap::new(), key(1), IO_TIMEOUT);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.write_all(&[0xa5; 4096]).unwrap();
    assert!(h.join().unwrap().is_err());
    // A client that says nothing: the server times out.
    let (addr, h) = server(HashMap::new(), key(1), Duration::from_millis(200));
    let _silent = TcpStream::connect(&addr).unwrap();
    let err = h.join().unwrap().unwrap_err();
    assert!(
        matches!(err, ServiceError::Channel(MigrationError::TimedOut)),
        "{err}"
    );
    // An authenticated client sending a malformed request is told and dropped.
    let (addr, h) = server(HashMap::new(), key(1), IO_TIMEOUT);
    let stream = TcpStream::connect(&addr).unwrap();
    let mut ch = ServiceChannel::connect(stream, &key(1)).unwrap();
    ch.send(&[1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    let err = ch.recv().unwrap_err();
    assert!(matches!(err, MigrationError::PeerAborted(_)), "{err}");
    assert!(matches!(h.join().unwrap(), Err(ServiceError::Malformed(_))));
}

#[test]
fn requests_decode_only_as_specified() {
    let id = PageId::of(&page(1));
    let good = encode_request(&[id, id]);
    assert_eq!(decode_request(&good).unwrap(), vec![id, id]);
    let mut too_many = (SERVICE_MAX_IDS as u32 + 1).to_le_bytes().to_vec();
    too_many.extend_from_slice(&[0; 4]);
    let mut reserved = good.clone();
    reserved[4] = 1;
    let cases: [&[u8]; 6] = [
        &[],
        &good[..7],
        &good[..good.len() - 1],
        &[good.as_slice(), &[0]].concat(),
        &too_many,
        &reserved,
    ];
    for case in cases {
        assert!(decode_request(case).is_err(), "{case:?}");
    }
    let zero = [0u8; 8];
    assert!(decode_request(&zero).is_err());
}

#[test]
fn replies_decode_only_as_specified() {
    let (a, b) = (page(1), page(2));
    let ids = [PageId::of(&a), PageId::of(&b)];
    let good = encode_reply(&[Some(&a), None]);
    let mut n = 0;
    let got = decode_reply(&good, &ids, &mut n).unwrap();
    assert_eq!(
        (got[0].as_deref(), got[1].is_none(), n),
        (Some(&*a), true, 0)
    );
    let mut bad_flag = good.clone();
    bad_flag[9] = 2;
    let mut held_mismatch = good.clone();
    held_mismatch[4] = 2;
    for case in [
        &good[..good.len() - 1],
        &bad_flag,
        &held_mismatch,
        &good[..3],
    ] {
        assert!(decode_reply(case, &ids, &mut n).is_err());
    }
    // A reply for another number of identities.
    assert!(decode_reply(&good, &ids[..1], &mut n).is_err());
}

#[test]
fn control_requests_share_the_connection_with_page_requests() {
    use crate::control::{ControlReply, ControlRequest};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let h = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let source = |ids: &[PageId], _: &mut [Page]| vec![false; ids.len()];
        serve_with_control(stream, &key(1), IO_TIMEOUT, source, |req, reply| {
            if let ControlRequest::Migrate { pid, .. } = req {
                for round in 1..=2 {
                    reply(&ControlReply::Progress {
                        round,
                        bytes_sent: round * 10,
                    })?;
                }
                reply(&ControlReply::Migrated {
                    report: serde_json::json!({ "pid": pid }),
                })
            } else {
                reply(&ControlReply::Failed {
                    error: format!("{req:?}"),
                })
            }
        })
    });
    let mut client = PageClient::connect(&addr, &key(1), IO_TIMEOUT).unwrap();
    let mut rounds = Vec::new();
    let migrate = ControlRequest::Migrate {
        pid: 9,
        dest: "x:1".into(),
        downtime_ms: 1,
        max_rounds: 1,
    };
    let done = client
        .control(&migrate, |p| rounds.push(p.clone()))
        .unwrap();
    assert_eq!(rounds.len(), 2);
    assert!(matches!(done, ControlReply::Migrated { report } if report["pid"] == 9));
    // Pages still work on the same connection, then another control request.
    let id = PageId::of(&page(1));
    assert_eq!(client.fetch(&[id]).unwrap(), vec![None]);
    let listed = client.control(&ControlRequest::ListVms, |_| {}).unwrap();
    assert!(matches!(listed, ControlReply::Failed { error } if error == "ListVms"));
    drop(client);
    let stats = h.join().unwrap().unwrap();
    assert_eq!((stats.control, stats.requests), (2, 1));

    // A plain page service refuses control requests politely.
    let (addr, h) = server(HashMap::new(), key(1), IO_TIMEOUT);
    let mut client = PageClient::connect(&addr, &key(1), IO_TIMEOUT).unwrap();
    let reply = client.control(&ControlRequest::Receive, |_| {}).unwrap();
    assert!(matches!(reply, ControlReply::Failed { .. }), "{reply:?}");
    drop(client);
    h.join().unwrap().unwrap();
}
