//! The messages around the pages: `RoundEnd`, `State` and `Complete`.

use crate::codec::Reader;

use super::{bad, malformed, put_u32, put_u64};
use crate::migration::MigrationError;

/// Appends a `State` payload.
pub fn encode_state(out: &mut Vec<u8>, total: u64, offset: u64, bytes: &[u8]) {
    put_u64(out, total);
    put_u64(out, offset);
    out.extend_from_slice(bytes);
}

/// Decodes a `State` payload: (total length, offset, bytes).
pub fn decode_state(payload: &[u8]) -> Result<(u64, u64, &[u8]), MigrationError> {
    const WHAT: &str = "State";
    let m = malformed(WHAT);
    let mut r = Reader::new(payload);
    let total = r.u64(WHAT).map_err(&m)?;
    let offset = r.u64(WHAT).map_err(&m)?;
    let bytes = r.take(r.remaining(), WHAT).map_err(&m)?;
    Ok((total, offset, bytes))
}

/// The `Complete` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Complete {
    /// Rounds sent, the final one included.
    pub rounds: u32,
    /// Bytes of the state blob.
    pub state_len: u64,
    /// blake3 of the state blob.
    pub state_hash: [u8; 32],
}

impl Complete {
    /// Appends the payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.rounds);
        put_u32(out, 0);
        put_u64(out, self.state_len);
        out.extend_from_slice(&self.state_hash);
    }

    /// Decodes the payload.
    pub fn decode(payload: &[u8]) -> Result<Complete, MigrationError> {
        const WHAT: &str = "Complete";
        let m = malformed(WHAT);
        let mut r = Reader::new(payload);
        let rounds = r.u32(WHAT).map_err(&m)?;
        if r.u32(WHAT).map_err(&m)? != 0 {
            return Err(bad(WHAT, "reserved field set"));
        }
        let state_len = r.u64(WHAT).map_err(&m)?;
        let state_hash = r.array(WHAT).map_err(&m)?;
        r.finish().map_err(&m)?;
        Ok(Complete {
            rounds,
            state_len,
            state_hash,
        })
    }
}

/// Appends a `RoundEnd` payload.
pub fn encode_round_end(out: &mut Vec<u8>, round: u32, batches: u32) {
    put_u32(out, round);
    put_u32(out, batches);
}

/// Decodes a `RoundEnd` payload: (round, offers in the round).
pub fn decode_round_end(payload: &[u8]) -> Result<(u32, u32), MigrationError> {
    const WHAT: &str = "RoundEnd";
    let m = malformed(WHAT);
    let mut r = Reader::new(payload);
    let round = r.u32(WHAT).map_err(&m)?;
    let batches = r.u32(WHAT).map_err(&m)?;
    r.finish().map_err(&m)?;
    Ok((round, batches))
}
