//! Records: what a Data body carries (page fragments, zero-page runs, blob fragments).
//!
//! Every record is a 16-byte header followed by `len` bytes:
//! `type u8 | reserved u8 | len u16 | a u32 | b u32 | c u32`.
//!
//! | type | record            | a          | b                    | c              | bytes          |
//! |------|-------------------|------------|----------------------|----------------|----------------|
//! | 1    | page, raw         | page       | total encoded length | offset         | fragment       |
//! | 2    | page, zstd        | page       | total encoded length | offset         | fragment       |
//! | 3    | zero-page run     | first page | count                | 0              | none (len = 0) |
//! | 4    | descriptor blob   | blob id    | total length         | offset         | fragment       |
//! | 5    | fork-plan blob    | blob id    | total length         | offset         | fragment       |
//!
//! A record is valid when: its type is 1..=5, the reserved byte is 0, its `len` bytes are present;
//! a page fragment is non-empty, its encoding is 1 ..= [`super::MAX_PAGE_ENCODING`] bytes long and the
//! fragment lies within it (`offset + len <= total`); a zero run has no payload, `count >= 1`,
//! `first_page + count` fits a u32 and `c = 0`; a blob fragment is non-empty, the blob is at most
//! [`super::MAX_BLOB_LEN`] bytes and the fragment lies within it. [`Records`] yields an error for the
//! first record that is not valid and stops there; `Message::parse` refuses a Data body with any.

use super::{DecodeError, MAX_BLOB_LEN, MAX_PAGE_ENCODING, RECORD_HEADER_LEN};

const PAGE_RAW: u8 = 1;
const PAGE_ZSTD: u8 = 2;
const ZERO_RUN: u8 = 3;
const BLOB_DESCRIPTOR: u8 = 4;
const BLOB_FORK: u8 = 5;

/// The kinds of blob the stream carries besides pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlobKind {
    /// A VM descriptor.
    Descriptor,
    /// A fork plan ([`super::ForkPlan`]).
    Fork,
}

/// One record of a Data body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// A fragment of one page's encoding.
    Page {
        /// The page.
        page: u32,
        /// True when the encoding is a zstd frame; false when it is the raw page.
        zstd: bool,
        /// Length of the whole encoding (the raw page size when not compressed).
        total_len: u32,
        /// Where this fragment starts within the encoding.
        offset: u32,
        /// The fragment.
        bytes: &'a [u8],
    },
    /// `count` pages from `first_page` on are all zero.
    ZeroRun {
        /// The first zero page.
        first_page: u32,
        /// How many (at least 1).
        count: u32,
    },
    /// A fragment of a blob.
    Blob {
        /// What the blob is.
        kind: BlobKind,
        /// The blob's id.
        id: u32,
        /// The blob's whole length.
        total_len: u32,
        /// Where this fragment starts.
        offset: u32,
        /// The fragment.
        bytes: &'a [u8],
    },
}

/// Iterator over the records of a Data body. Stops after the first error.
#[derive(Debug, Clone)]
pub struct Records<'a> {
    rest: &'a [u8],
    offset: usize,
    failed: bool,
}

impl<'a> Records<'a> {
    /// Records in `bytes` (the `records` field of a [`super::Data`]).
    pub fn new(bytes: &'a [u8]) -> Records<'a> {
        Records { rest: bytes, offset: 0, failed: false }
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, DecodeError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        match parse_record(self.rest) {
            Ok((record, rest)) => {
                self.offset += self.rest.len() - rest.len();
                self.rest = rest;
                Some(Ok(record))
            }
            Err(why) => {
                self.failed = true;
                Some(Err(DecodeError::BadRecord { offset: self.offset, why }))
            }
        }
    }
}

/// Parses the record at the start of `bytes`; returns it and the bytes after it.
fn parse_record(bytes: &[u8]) -> Result<(Record<'_>, &[u8]), &'static str> {
    let (header, rest) =
        bytes.split_first_chunk::<RECORD_HEADER_LEN>().ok_or("truncated record header (fewer than 16 bytes left)")?;
    let [ty, reserved, l0, l1, a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3] = *header;
    let len = usize::from(u16::from_be_bytes([l0, l1]));
    let a = u32::from_be_bytes([a0, a1, a2, a3]);
    let b = u32::from_be_bytes([b0, b1, b2, b3]);
    let c = u32::from_be_bytes([c0, c1, c2, c3]);
    if !(PAGE_RAW..=BLOB_FORK).contains(&ty) {
        return Err("unknown record type (this version knows types 1 to 5)");
    }
    if reserved != 0 {
        return Err("reserved byte is not zero");
    }
    let (payload, rest) = rest.split_at_checked(len).ok_or("record length runs past the end of the data body")?;
    // Fragment bounds in u64: `offset + len` cannot overflow there.
    let end = u64::from(c) + len as u64;
    let record = match ty {
        PAGE_RAW | PAGE_ZSTD => {
            if len == 0 {
                return Err("page fragment is empty");
            }
            if b == 0 || b > MAX_PAGE_ENCODING {
                return Err("page encoding length is 0 or above 2 MiB + 64 KiB");
            }
            if end > u64::from(b) {
                return Err("page fragment ends beyond the page's encoding length");
            }
            Record::Page { page: a, zstd: ty == PAGE_ZSTD, total_len: b, offset: c, bytes: payload }
        }
        ZERO_RUN => {
            if len != 0 {
                return Err("zero-page run carries payload bytes");
            }
            if b == 0 {
                return Err("zero-page run has count 0");
            }
            if a.checked_add(b).is_none() {
                return Err("zero-page run extends beyond page 2^32 - 1");
            }
            if c != 0 {
                return Err("zero-page run has non-zero field c");
            }
            Record::ZeroRun { first_page: a, count: b }
        }
        _ => {
            if len == 0 {
                return Err("blob fragment is empty");
            }
            if b > MAX_BLOB_LEN {
                return Err("blob length exceeds 16 MiB");
            }
            if end > u64::from(b) {
                return Err("blob fragment ends beyond the blob's length");
            }
            let kind = if ty == BLOB_DESCRIPTOR { BlobKind::Descriptor } else { BlobKind::Fork };
            Record::Blob { kind, id: a, total_len: b, offset: c, bytes: payload }
        }
    };
    Ok((record, rest))
}

/// Appends records to a Data body being built in a caller-owned buffer.
///
/// The writer never panics and never writes past its buffer. It writes the values it is given; a record
/// a receiver would refuse (see the module docs) is the caller's bug, and shows up as a
/// [`DecodeError::BadRecord`] at the receiver.
#[derive(Debug)]
pub struct RecordWriter<'b> {
    buf: &'b mut [u8],
    len: usize,
}

impl<'b> RecordWriter<'b> {
    /// A writer filling `buf` from its start.
    pub fn new(buf: &'b mut [u8]) -> RecordWriter<'b> {
        RecordWriter { buf, len: 0 }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Payload bytes a further fragment record could still carry (0 if not even a header fits).
    pub fn room(&self) -> usize {
        (self.buf.len() - self.len).saturating_sub(RECORD_HEADER_LEN)
    }

    /// The records written so far.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.get(..self.len).unwrap_or_default()
    }

    /// Appends a page fragment; writes at most `room()` bytes of `bytes` and returns how many it wrote
    /// (0 when no room: nothing is written then).
    ///
    /// A record's length field is a u16, so at most 65,535 bytes go in one record even when the
    /// buffer has more room (a datagram never does).
    pub fn push_page(&mut self, page: u32, zstd: bool, total_len: u32, offset: u32, bytes: &[u8]) -> usize {
        let ty = if zstd { PAGE_ZSTD } else { PAGE_RAW };
        self.push_fragment(ty, page, total_len, offset, bytes)
    }

    /// Appends a zero-page run; false (and nothing written) if a header does not fit.
    pub fn push_zero_run(&mut self, first_page: u32, count: u32) -> bool {
        self.push_record(ZERO_RUN, first_page, count, 0, &[])
    }

    /// Appends a blob fragment, like [`RecordWriter::push_page`].
    pub fn push_blob(&mut self, kind: BlobKind, id: u32, total_len: u32, offset: u32, bytes: &[u8]) -> usize {
        let ty = match kind {
            BlobKind::Descriptor => BLOB_DESCRIPTOR,
            BlobKind::Fork => BLOB_FORK,
        };
        self.push_fragment(ty, id, total_len, offset, bytes)
    }

    fn push_fragment(&mut self, ty: u8, a: u32, b: u32, c: u32, bytes: &[u8]) -> usize {
        let n = self.room().min(bytes.len()).min(usize::from(u16::MAX));
        match bytes.get(..n) {
            Some(fragment) if n > 0 && self.push_record(ty, a, b, c, fragment) => n,
            _ => 0,
        }
    }

    /// Writes one record (header and `payload`) if it fits; true if written.
    fn push_record(&mut self, ty: u8, a: u32, b: u32, c: u32, payload: &[u8]) -> bool {
        let Ok(len) = u16::try_from(payload.len()) else { return false };
        let end = self.len + RECORD_HEADER_LEN + payload.len();
        let Some(slot) = self.buf.get_mut(self.len..end) else { return false };
        let (header, body) = slot.split_at_mut(RECORD_HEADER_LEN);
        header[0] = ty;
        header[1] = 0;
        header[2..4].copy_from_slice(&len.to_be_bytes());
        header[4..8].copy_from_slice(&a.to_be_bytes());
        header[8..12].copy_from_slice(&b.to_be_bytes());
        header[12..16].copy_from_slice(&c.to_be_bytes());
        body.copy_from_slice(payload);
        self.len = end;
        true
    }
}
