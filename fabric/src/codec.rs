//! Little-endian, fixed-layout encoding shared by the fabric's file formats, with a blake3
//! trailer as checksum. Every read is checked against the bytes left, so decoders of
//! untrusted input never allocate from a length they have not bounded.

use crate::identity::PageId;

/// Bytes of the checksum trailer (blake3 of everything before it).
pub(crate) const CHECKSUM_LEN: usize = 32;

/// Errors of decoding a fixed-layout buffer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The input ended inside a field.
    #[error("truncated: {0} cut short")]
    Truncated(&'static str),
    /// The checksum trailer does not match the content.
    #[error("checksum mismatch")]
    Checksum,
    /// Bytes are left over after the last field.
    #[error("{0} unexpected trailing bytes")]
    Trailing(usize),
    /// A count is larger than the input could hold or than the decoder allows.
    #[error("{what} count {count} exceeds the limit of {limit}")]
    TooLarge {
        what: &'static str,
        count: u64,
        limit: u64,
    },
}

/// Appends fields to a byte buffer.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Writer {
            buf: Vec::with_capacity(n),
        }
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.buf.extend_from_slice(v);
    }

    pub(crate) fn id(&mut self, id: &PageId) {
        self.buf.extend_from_slice(&id.0);
    }

    /// Appends the checksum of everything written so far and returns the buffer.
    pub(crate) fn seal(mut self) -> Vec<u8> {
        let sum = blake3::hash(&self.buf);
        self.buf.extend_from_slice(sum.as_bytes());
        self.buf
    }
}

/// Reads fields from a byte slice, never past its end.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// Checks and strips the checksum trailer of `sealed`, returning a reader of the body.
    pub(crate) fn unseal(sealed: &'a [u8]) -> Result<Self, CodecError> {
        let body_len = sealed
            .len()
            .checked_sub(CHECKSUM_LEN)
            .ok_or(CodecError::Truncated("checksum"))?;
        let (body, sum) = sealed.split_at(body_len);
        if blake3::hash(body) != blake3::Hash::from_bytes(sum.try_into().expect("32 bytes")) {
            return Err(CodecError::Checksum);
        }
        Ok(Reader { buf: body })
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        if n > self.buf.len() {
            return Err(CodecError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        what: &'static str,
    ) -> Result<[u8; N], CodecError> {
        let bytes = self.take(N, what)?;
        Ok(bytes.try_into().expect("took N bytes"))
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn id(&mut self, what: &'static str) -> Result<PageId, CodecError> {
        Ok(PageId(self.array(what)?))
    }

    /// Bounds a count of `elem_size`-byte elements read from the input: it must fit in the
    /// bytes left and under `limit`. Call before allocating for the elements.
    pub(crate) fn bound(
        &self,
        count: u64,
        elem_size: usize,
        limit: u64,
        what: &'static str,
    ) -> Result<usize, CodecError> {
        let fits = (self.buf.len() / elem_size.max(1)) as u64;
        if count > limit {
            return Err(CodecError::TooLarge { what, count, limit });
        }
        if count > fits {
            return Err(CodecError::Truncated(what));
        }
        Ok(count as usize)
    }

    /// Ends decoding: no bytes may be left.
    pub(crate) fn finish(self) -> Result<(), CodecError> {
        match self.buf.len() {
            0 => Ok(()),
            n => Err(CodecError::Trailing(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checksum() {
        let mut w = Writer::default();
        w.u8(1);
        w.u16(2);
        w.u32(3);
        w.u64(4);
        w.id(&PageId([5; 32]));
        let sealed = w.seal();
        let mut r = Reader::unseal(&sealed).unwrap();
        assert_eq!(r.u8("a").unwrap(), 1);
        assert_eq!(r.u16("b").unwrap(), 2);
        assert_eq!(r.u32("c").unwrap(), 3);
        assert_eq!(r.u64("d").unwrap(), 4);
        assert_eq!(r.id("e").unwrap(), PageId([5; 32]));
        r.finish().unwrap();

        let mut bad = sealed.clone();
        bad[3] ^= 1;
        assert_eq!(Reader::unseal(&bad).unwrap_err(), CodecError::Checksum);
        assert_eq!(
            Reader::unseal(&sealed[..50]).unwrap_err(),
            CodecError::Checksum
        );
        assert_eq!(
            Reader::unseal(&sealed[..3]).unwrap_err(),
            CodecError::Truncated("checksum")
        );
    }

    #[test]
    fn bounds_before_allocation() {
        let r = Reader::new(&[0u8; 64]);
        assert_eq!(r.bound(2, 32, 10, "x"), Ok(2));
        assert_eq!(r.bound(3, 32, 10, "x"), Err(CodecError::Truncated("x")));
        assert!(matches!(
            r.bound(u64::MAX, 1, 10, "x"),
            Err(CodecError::TooLarge { .. })
        ));
        let mut r = Reader::new(&[1, 2]);
        assert_eq!(r.u32("y"), Err(CodecError::Truncated("y")));
        assert_eq!(r.finish(), Err(CodecError::Trailing(2)));
    }
}
