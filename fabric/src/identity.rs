//! Page identity: a guest page is known by the blake3 hash of its 4 KiB of content.
//! Zero pages are recognised here, a word at a time, and are never stored or sent.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Size of a guest page, the unit of identity, in bytes.
pub const PAGE_SIZE: usize = 4096;

/// `log2(PAGE_SIZE)`: shift between guest physical addresses and guest frame numbers.
pub const PAGE_SHIFT: u32 = 12;

/// One guest page.
pub type Page = [u8; PAGE_SIZE];

/// Errors of parsing a page identity.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    /// Not exactly 64 hexadecimal digits.
    #[error("page identity must be 64 hex digits")]
    BadHex,
}

/// The identity of a page: blake3 of its 4 KiB.
///
/// blake3 is cryptographic on purpose: with a weak hash a guest could craft a page that
/// collides with another tenant's page and be handed that tenant's data.
/// Displays as 64 lowercase hex digits; serializes as hex in human-readable formats and
/// as 32 raw bytes otherwise.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageId(pub [u8; 32]);

impl PageId {
    /// Identity of the all-zero page. Zero pages are recognised (see [`is_zero`]) and
    /// never stored; this value exists so that code holding a `PageId` can tell.
    pub const ZERO: PageId =
        PageId::from_hex_const("b6fb73fc46938c981e2b0b4b1ef282adcfc89854d01bfe3972fdc4785b41b2c7");

    /// Hashes one page. Prefer [`identify`], which skips the hash for zero pages.
    pub fn of(page: &Page) -> PageId {
        PageId(*blake3::hash(page).as_bytes())
    }

    /// The 32 bytes of the identity.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether this is the identity of the zero page.
    pub fn is_zero_page(&self) -> bool {
        *self == Self::ZERO
    }

    /// Whether `page` really has this identity (rehashes it).
    pub fn matches(&self, page: &Page) -> bool {
        // Comparison through blake3::Hash is constant time; identities are not secret,
        // but there is no reason to be faster here than the hash itself.
        blake3::Hash::from_bytes(self.0) == blake3::hash(page)
    }

    /// Parses 64 hex digits at compile time (panics, i.e. fails the build, when invalid).
    const fn from_hex_const(hex: &str) -> PageId {
        let hex = hex.as_bytes();
        assert!(hex.len() == 64, "page identity must be 64 hex digits");
        let mut out = [0u8; 32];
        let mut i = 0;
        while i < 32 {
            let (hi, lo) = (hex_digit(hex[2 * i]), hex_digit(hex[2 * i + 1]));
            assert!(hi < 16 && lo < 16, "page identity must be 64 hex digits");
            out[i] = (hi << 4) | lo;
            i += 1;
        }
        PageId(out)
    }
}

/// The identity of `page`, or `None` when it is a zero page (which is not hashed).
pub fn identify(page: &Page) -> Option<PageId> {
    if is_zero(page) {
        None
    } else {
        Some(PageId::of(page))
    }
}

/// Whether every byte of `bytes` is zero.
///
/// Reads 64-bit words and ORs them over 256-byte blocks, leaving at the first block that is
/// not zero; the inner loop vectorises. Non-zero pages usually differ from zero in their
/// first block, so the common cost is one block; a zero page costs one pass at memory speed.
pub fn is_zero(bytes: &[u8]) -> bool {
    const BLOCK: usize = 256;
    let mut blocks = bytes.chunks_exact(BLOCK);
    for block in &mut blocks {
        let mut acc = 0u64;
        for word in block.chunks_exact(8) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            acc |= u64::from_ne_bytes(w);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Views `mem` (whose length must be a multiple of [`PAGE_SIZE`]) as pages; a trailing
/// partial page is not yielded.
pub fn pages(mem: &[u8]) -> impl ExactSizeIterator<Item = &Page> + '_ {
    mem.chunks_exact(PAGE_SIZE).map(as_page)
}

/// Mutable variant of [`pages`].
pub fn pages_mut(mem: &mut [u8]) -> impl ExactSizeIterator<Item = &mut Page> + '_ {
    mem.chunks_exact_mut(PAGE_SIZE)
        .map(|c| <&mut Page>::try_from(c).expect("chunks_exact_mut yields PAGE_SIZE chunks"))
}

/// A `PAGE_SIZE` slice as a page. Panics if the length differs (callers pass exact chunks).
pub(crate) fn as_page(chunk: &[u8]) -> &Page {
    <&Page>::try_from(chunk).expect("chunk is exactly PAGE_SIZE")
}

const fn hex_digit(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => 16,
    }
}

impl fmt::Display for PageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageId(")?;
        for b in &self.0[..6] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

impl FromStr for PageId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.as_bytes();
        if hex.len() != 64 {
            return Err(IdentityError::BadHex);
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            let (hi, lo) = (hex_digit(pair[0]), hex_digit(pair[1]));
            if hi > 15 || lo > 15 {
                return Err(IdentityError::BadHex);
            }
            out[i] = (hi << 4) | lo;
        }
        Ok(PageId(out))
    }
}

impl Serialize for PageId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for PageId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IdVisitor;

        impl<'de> Visitor<'de> for IdVisitor {
            type Value = PageId;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a page identity (64 hex digits or 32 bytes)")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PageId, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<PageId, E> {
                <[u8; 32]>::try_from(v)
                    .map(PageId)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }

            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<PageId, A::Error> {
                let mut out = [0u8; 32];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| de::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<u8>()?.is_some() {
                    return Err(de::Error::invalid_length(33, &self));
                }
                Ok(PageId(out))
            }
        }

        if deserializer.is_human_readable() {
            deserializer.deserialize_str(IdVisitor)
        } else {
            deserializer.deserialize_bytes(IdVisitor)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_blake3_of_the_page() {
        let mut page = [0u8; PAGE_SIZE];
        page[100] = 7;
        let id = PageId::of(&page);
        assert_eq!(id.0, *blake3::hash(&page).as_bytes());
        assert!(id.matches(&page));
        page[101] = 1;
        assert!(!id.matches(&page));
        assert_ne!(PageId::of(&page), id);
    }

    #[test]
    fn zero_constant_is_the_hash_of_a_zero_page() {
        assert_eq!(PageId::of(&[0u8; PAGE_SIZE]), PageId::ZERO);
        assert!(PageId::ZERO.is_zero_page());
    }

    #[test]
    fn zero_pages_are_recognised_and_not_hashed() {
        assert_eq!(identify(&[0u8; PAGE_SIZE]), None);
        // A single set bit anywhere, including the last byte, makes a page non-zero.
        for pos in [0, 7, 8, 255, 256, 2048, PAGE_SIZE - 1] {
            let mut page = [0u8; PAGE_SIZE];
            page[pos] = 0x80;
            assert!(!is_zero(&page), "bit at {pos}");
            assert_eq!(identify(&page), Some(PageId::of(&page)));
        }
    }

    #[test]
    fn is_zero_handles_odd_lengths() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 300]));
        let mut v = vec![0u8; 300];
        v[299] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let id = PageId::of(&[3u8; PAGE_SIZE]);
        let hex = id.to_string();
        assert_eq!(hex.len(), 64);
        assert_eq!(hex.parse::<PageId>(), Ok(id));
        assert_eq!(hex.to_uppercase().parse::<PageId>(), Ok(id));
        assert_eq!("abc".parse::<PageId>(), Err(IdentityError::BadHex));
        let bad = format!("{}zz", &hex[..62]);
        assert_eq!(bad.parse::<PageId>(), Err(IdentityError::BadHex));
        assert!(format!("{id:?}").starts_with("PageId("));
    }

    #[test]
    fn serde_json_uses_hex() {
        let id = PageId::of(&[9u8; PAGE_SIZE]);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<PageId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<PageId>("\"00\"").is_err());
    }

    #[test]
    fn pages_view() {
        let mut mem = vec![0u8; 3 * PAGE_SIZE];
        for (i, p) in pages_mut(&mut mem).enumerate() {
            p[0] = i as u8;
        }
        let firsts: Vec<u8> = pages(&mem).map(|p| p[0]).collect();
        assert_eq!(firsts, vec![0, 1, 2]);
    }
}
