//! The page summary a host publishes: a Bloom filter over the 64-bit keys
//! ([`fabric::live::key_of`]) of the pages it holds, with a hard size bound. A summary only
//! guides placement and fetching; a false positive or a stale summary costs a miss (the page
//! is then asked elsewhere), never a wrong page: every page fetched is verified.
//!
//! Encoding (little endian): magic `FABBLOOM` | version u32 | hashes u32 | bits u64 | items
//! u64 | bit words u64 × bits/64 | blake3 of everything before [32].

use fabric::live::key_of;
use fabric::PageId;

/// Default bound on a summary's size.
pub const DEFAULT_MAX_BYTES: usize = 4 << 20;
/// Largest summary a reader accepts (whatever a host says).
pub const DECODE_MAX_BYTES: usize = 64 << 20;
/// False-positive rate a summary is sized for when the bound allows.
pub const TARGET_FP_RATE: f64 = 0.01;

const MAGIC: [u8; 8] = *b"FABBLOOM";
const VERSION: u32 = 1;
const HEADER: usize = 32;
const MIN_BITS: u64 = 512;
const MAX_HASHES: u32 = 16;

/// Errors decoding a summary.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BloomError {
    /// Not a summary, or damaged.
    #[error("page summary is malformed: {0}")]
    Malformed(&'static str),
    /// Larger than the reader accepts.
    #[error("page summary of {0} bytes is over the bound")]
    TooLarge(usize),
}

/// A Bloom filter over page keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bloom {
    words: Vec<u64>,
    hashes: u32,
    items: u64,
}

impl Bloom {
    /// A filter sized for `items` keys at [`TARGET_FP_RATE`], but never over `max_bytes`
    /// (at least 64 bytes): past that the false-positive rate grows instead.
    pub fn with_capacity(items: u64, max_bytes: usize) -> Bloom {
        let n = items.max(1) as f64;
        let ideal = (-n * TARGET_FP_RATE.ln() / (std::f64::consts::LN_2.powi(2))).ceil();
        let cap = (max_bytes.saturating_sub(HEADER + 32) as u64 * 8).max(MIN_BITS);
        let bits = (ideal as u64).clamp(MIN_BITS, cap).next_multiple_of(64);
        let bits = if bits > cap { bits - 64 } else { bits };
        let hashes = ((bits as f64 / n) * std::f64::consts::LN_2).round() as u32;
        Bloom {
            words: vec![0; (bits / 64) as usize],
            hashes: hashes.clamp(1, MAX_HASHES),
            items: 0,
        }
    }

    /// Adds a page's key.
    pub fn insert(&mut self, key: u64) {
        let bits = self.bits();
        for bit in probes(key, self.hashes, bits) {
            self.words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        self.items += 1;
    }

    /// Adds a page by identity.
    pub fn insert_id(&mut self, id: &PageId) {
        self.insert(key_of(Some(*id)));
    }

    /// Whether the key may be held (false: surely not).
    pub fn contains(&self, key: u64) -> bool {
        let bits = self.bits();
        probes(key, self.hashes, bits)
            .all(|bit| self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    /// Whether a page may be held.
    pub fn contains_id(&self, id: &PageId) -> bool {
        self.contains(key_of(Some(*id)))
    }

    /// Keys inserted (duplicates counted).
    pub fn items(&self) -> u64 {
        self.items
    }

    /// Size in bits.
    pub fn bits(&self) -> u64 {
        self.words.len() as u64 * 64
    }

    /// Encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        HEADER + self.words.len() * 8 + 32
    }

    /// Expected false-positive rate for the keys inserted: (1 - e^(-kn/m))^k.
    pub fn fp_rate(&self) -> f64 {
        let (k, n, m) = (
            f64::from(self.hashes),
            self.items as f64,
            self.bits() as f64,
        );
        (1.0 - (-k * n / m).exp()).powf(k)
    }

    /// The bytes published.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.hashes.to_le_bytes());
        out.extend_from_slice(&self.bits().to_le_bytes());
        out.extend_from_slice(&self.items.to_le_bytes());
        for w in &self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Decodes a summary of at most `max_bytes` (checked before anything else).
    pub fn decode(b: &[u8], max_bytes: usize) -> Result<Bloom, BloomError> {
        if b.len() > max_bytes {
            return Err(BloomError::TooLarge(b.len()));
        }
        if b.len() < HEADER + 32 || !(b.len() - HEADER - 32).is_multiple_of(8) {
            return Err(BloomError::Malformed("length"));
        }
        let (body, sum) = b.split_at(b.len() - 32);
        if blake3::hash(body) != blake3::Hash::from_bytes(sum.try_into().expect("32 bytes")) {
            return Err(BloomError::Malformed("checksum"));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        if b[..8] != MAGIC || u32_at(8) != VERSION {
            return Err(BloomError::Malformed("magic or version"));
        }
        let hashes = u32_at(12);
        let bits = u64_at(16);
        let words = (body.len() - HEADER) / 8;
        if !(1..=MAX_HASHES).contains(&hashes) || bits == 0 || bits != words as u64 * 64 {
            return Err(BloomError::Malformed("shape"));
        }
        Ok(Bloom {
            words: body[HEADER..]
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
                .collect(),
            hashes,
            items: u64_at(24),
        })
    }
}

/// The `hashes` bit positions of `key` in a filter of `bits` bits (double hashing; the key
/// is already the prefix of a cryptographic hash, the second is a mix of it).
fn probes(key: u64, hashes: u32, bits: u64) -> impl Iterator<Item = u64> {
    let h2 = mix(key) | 1;
    (0..u64::from(hashes)).map(move |i| key.wrapping_add(i.wrapping_mul(h2)) % bits)
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(i: u64) -> PageId {
        PageId(*blake3::hash(&i.to_le_bytes()).as_bytes())
    }

    #[test]
    fn no_false_negatives_and_fp_near_target() {
        let n = 100_000u64;
        let mut b = Bloom::with_capacity(n, DEFAULT_MAX_BYTES);
        (0..n).for_each(|i| b.insert_id(&id(i)));
        assert!((0..n).all(|i| b.contains_id(&id(i))));
        let fp = (n..n + 100_000).filter(|&i| b.contains_id(&id(i))).count() as f64 / 100_000.0;
        assert!(fp < 0.02, "measured false-positive rate {fp}");
        assert!(
            (b.fp_rate() - TARGET_FP_RATE).abs() < 0.005,
            "{}",
            b.fp_rate()
        );
        // 1% needs about 9.6 bits a key.
        assert!(b.encoded_len() < 130_000, "{}", b.encoded_len());
    }

    #[test]
    fn size_bound_holds_and_fp_rate_says_what_it_costs() {
        // 8 GiB of distinct pages into a 64 KiB bound.
        let max = 64 << 10;
        let n = 2_000_000u64;
        let mut b = Bloom::with_capacity(n, max);
        assert!(b.encoded_len() <= max, "{}", b.encoded_len());
        (0..n).for_each(|i| b.insert(mix(i)));
        assert!(
            b.fp_rate() > 0.5,
            "an overfull filter must say so: {}",
            b.fp_rate()
        );
        assert!((0..1000).all(|i| b.contains(mix(i))));
        // Default bound: 4 MiB holds about 3.5 million pages (13 GiB) at 1%.
        let b = Bloom::with_capacity(1 << 40, DEFAULT_MAX_BYTES);
        assert!(b.encoded_len() <= DEFAULT_MAX_BYTES);
    }

    #[test]
    fn encode_decode_round_trip_and_damage() {
        let mut b = Bloom::with_capacity(1000, DEFAULT_MAX_BYTES);
        (0..1000).for_each(|i| b.insert_id(&id(i)));
        let bytes = b.encode();
        assert_eq!(bytes.len(), b.encoded_len());
        assert_eq!(Bloom::decode(&bytes, DECODE_MAX_BYTES).unwrap(), b);
        assert_eq!(
            Bloom::decode(&bytes, 100),
            Err(BloomError::TooLarge(bytes.len()))
        );
        for at in [0, 13, 20, 40, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            assert!(
                Bloom::decode(&bad, DECODE_MAX_BYTES).is_err(),
                "flip at {at}"
            );
        }
        assert!(Bloom::decode(&bytes[..bytes.len() - 8], DECODE_MAX_BYTES).is_err());
        assert!(Bloom::decode(&[], DECODE_MAX_BYTES).is_err());
    }

    #[test]
    fn forged_shapes_are_refused() {
        let good = Bloom::with_capacity(10, 1 << 10).encode();
        let reseal = |mut b: Vec<u8>| {
            let n = b.len() - 32;
            let sum = blake3::hash(&b[..n]);
            b[n..].copy_from_slice(sum.as_bytes());
            b
        };
        let mut zero_hashes = good.clone();
        zero_hashes[12..16].copy_from_slice(&0u32.to_le_bytes());
        let mut more_bits = good.clone();
        more_bits[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        for bad in [zero_hashes, more_bits] {
            assert_eq!(
                Bloom::decode(&reseal(bad), DECODE_MAX_BYTES),
                Err(BloomError::Malformed("shape"))
            );
        }
    }
}
