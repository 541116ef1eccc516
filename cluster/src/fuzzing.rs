//! Properties the `cluster_decoders` fuzz target checks on every decoder of bytes a host
//! does not control: page-service requests and replies, control requests and replies (an
//! agent's VMs, migrations, receivers), page summaries and host records.
//! The first byte picks the decoder (its value mod 6); the rest is its input.

use fabric::{PageId, PAGE_SIZE};

use crate::bloom::{Bloom, DECODE_MAX_BYTES};
use crate::control;
use crate::record::{check_name, HostRecord};
use crate::service::{decode_reply, decode_request, encode_reply, encode_request};

/// Runs one input; panics when a property fails.
pub fn run(data: &[u8]) {
    let Some((&which, input)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => {
            // An accepted request is exactly what the encoder writes for its identities.
            if let Ok(ids) = decode_request(input) {
                assert_eq!(encode_request(&ids), input);
            }
        }
        1 => reply(input),
        2 => {
            // Bit 2 of the first byte: seal the input with a valid checksum first, so the
            // fuzzer reaches the shape checks.
            let mut sealed = input.to_vec();
            if which & 4 != 0 {
                sealed.extend_from_slice(blake3::hash(input).as_bytes());
            }
            if let Ok(bloom) = Bloom::decode(&sealed, DECODE_MAX_BYTES) {
                assert_eq!(bloom.encode(), sealed);
                let _ = bloom.contains(u64::from_le_bytes([which; 8]));
                let _ = bloom.fp_rate();
            }
        }
        4 => {
            // An accepted control request is what the encoder writes for it.
            if let Ok(req) = control::decode_request(input) {
                assert!(control::is_control(input));
                let again = control::decode_request(&control::encode_request(&req));
                assert_eq!(again.expect("re-decodes"), req);
            }
        }
        5 => {
            if let Ok(reply) = control::decode_reply(input) {
                let again = control::decode_reply(&control::encode_reply(&reply));
                assert_eq!(again.expect("re-decodes"), reply);
            }
        }
        _ => {
            if let Ok(record) = HostRecord::decode(input) {
                assert!(check_name(&record.name).is_ok());
                let again = HostRecord::decode(&record.encode()).expect("re-decodes");
                assert_eq!(again.name, record.name);
            }
        }
    }
}

/// A reply to a request for as many identities as the reply says (bounded): those of the
/// page bodies where the input has them, so matches happen, and made-up ones after. Every
/// page accepted must hash to the identity asked for at its position.
fn reply(input: &[u8]) {
    let count = input.get(..4).map_or(1, |b| {
        u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize
    });
    let n = count.clamp(1, fabric::migration::wire::SERVICE_MAX_IDS);
    let bodies = input.get(8 + n..).unwrap_or_default();
    let mut pages = bodies.chunks_exact(PAGE_SIZE);
    let flags = input.get(8..8 + n).unwrap_or_default();
    let asked: Vec<PageId> = (0..n)
        .map(|i| match flags.get(i) {
            Some(1) => pages.next().map(|p| PageId(*blake3::hash(p).as_bytes())),
            _ => None,
        })
        .enumerate()
        .map(|(i, id)| id.unwrap_or_else(|| PageId(*blake3::hash(&i.to_le_bytes()).as_bytes())))
        .collect();
    let mut mismatched = 0;
    if let Ok(pages) = decode_reply(input, &asked, &mut mismatched) {
        assert_eq!(pages.len(), asked.len());
        for (page, id) in pages.iter().zip(&asked) {
            if let Some(page) = page {
                assert!(id.matches(page), "an unverified page was accepted");
            }
        }
        let held = pages.iter().filter(|p| p.is_some()).count() as u64;
        assert!(held + mismatched <= asked.len() as u64);
        if mismatched == 0 {
            let refs: Vec<Option<&fabric::Page>> = pages.iter().map(|p| p.as_deref()).collect();
            assert_eq!(encode_reply(&refs), input);
        }
    }
}

/// Valid inputs for each decoder, written by the real encoders (the fuzz target's seeds).
pub fn seed_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let page = [5u8; PAGE_SIZE];
    let id = PageId::of(&page);
    let mut bloom = Bloom::with_capacity(64, 1 << 12);
    (0..64).for_each(|k| bloom.insert(k));
    let record = br#"{"name":"host-a","addr":"10.0.0.1:7100","mem_available":1,"mem_total":2,"cpus":2,"vms":1,"pages_held":3,"store_pages":0,"summary_generation":1,"summary_bytes":4096,"summary_fp_rate":0.01,"summary_unix_ms":5,"updated_unix_ms":6}"#;
    let bloom = bloom.encode();
    vec![
        ("request", [&[0u8][..], &encode_request(&[id, id])].concat()),
        (
            "reply",
            [&[1u8][..], &encode_reply(&[Some(&page), None])].concat(),
        ),
        ("summary", [&[2u8][..], &bloom].concat()),
        (
            "summary-sealed-here",
            [&[6u8][..], &bloom[..bloom.len() - 32]].concat(),
        ),
        ("record", [&[3u8][..], &record[..]].concat()),
        (
            "control-request",
            [
                &[4u8][..],
                &control::encode_request(&control::ControlRequest::Migrate {
                    pid: 42,
                    dest: "10.0.0.2:7000".into(),
                    downtime_ms: 100,
                    max_rounds: 30,
                }),
            ]
            .concat(),
        ),
        (
            "control-reply",
            [
                &[5u8][..],
                &control::encode_reply(&control::ControlReply::Vms {
                    vms: vec![control::VmInfo {
                        pid: 42,
                        api_sock: Some("/run/vm.sock".into()),
                        mem: 1 << 26,
                        pages: 100,
                    }],
                }),
            ]
            .concat(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn genuine_and_damaged_inputs_hold_the_properties() {
        let mut inputs: Vec<Vec<u8>> = seed_inputs().into_iter().map(|(_, b)| b).collect();
        // The genuine ones decode.
        let ids = decode_request(&inputs[0][1..]).unwrap();
        assert!(decode_reply(&inputs[1][1..], &[ids[0], ids[0]], &mut 0).unwrap()[0].is_some());
        assert!(Bloom::decode(&inputs[2][1..], DECODE_MAX_BYTES).is_ok());
        assert!(HostRecord::decode(&inputs[4][1..]).is_ok());
        assert!(control::decode_request(&inputs[5][1..]).is_ok());
        assert!(control::decode_reply(&inputs[6][1..]).is_ok());
        for i in 0..inputs.len() {
            let mut bad = inputs[i].clone();
            let at = bad.len() / 2;
            bad[at] ^= 0x40;
            inputs.push(bad);
            inputs.push(inputs[i][..inputs[i].len() / 2].to_vec());
        }
        inputs.iter().for_each(|i| run(i));
        run(&[]);
    }
}
