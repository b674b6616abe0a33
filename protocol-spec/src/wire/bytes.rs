//! Bounds-checked big-endian reading and writing: the only place the codec touches raw offsets, so
//! decoding cannot index past a buffer and encoding cannot write past one.

use super::{DecodeError, EncodeError};

/// Reads big-endian fields from the front of a message body. A read past the end is a
/// [`DecodeError::BadLength`] naming the message and the body's length.
pub(super) struct Reader<'a> {
    rest: &'a [u8],
    msg: &'static str,
    len: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(msg: &'static str, body: &'a [u8]) -> Reader<'a> {
        Reader { rest: body, msg, len: body.len() }
    }

    /// The error for a body of the wrong length.
    pub(super) fn bad_length(&self) -> DecodeError {
        DecodeError::BadLength { msg: self.msg, len: self.len }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self.rest.split_first_chunk::<N>().ok_or_else(|| self.bad_length())?;
        self.rest = rest;
        Ok(*head)
    }

    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.array::<1>().map(|[b]| b)
    }

    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    pub(super) fn u64(&mut self) -> Result<u64, DecodeError> {
        self.array().map(u64::from_be_bytes)
    }

    /// The bytes not read yet.
    pub(super) fn rest(self) -> &'a [u8] {
        self.rest
    }

    /// Checks that the whole body was read: trailing bytes are a length error.
    pub(super) fn end(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.bad_length())
        }
    }
}

/// Writes big-endian fields into a caller's buffer. Writing past the end never panics: it is
/// remembered and reported by [`Writer::finish`] as [`EncodeError::BufferTooSmall`].
pub(super) struct Writer<'b> {
    out: &'b mut [u8],
    pos: usize,
    overflow: bool,
}

impl<'b> Writer<'b> {
    pub(super) fn new(out: &'b mut [u8]) -> Writer<'b> {
        Writer { out, pos: 0, overflow: false }
    }

    /// The next `n` bytes of the buffer, or `None` (and the overflow remembered) if they do not fit.
    pub(super) fn slot(&mut self, n: usize) -> Option<&mut [u8]> {
        let start = self.pos;
        self.pos = self.pos.saturating_add(n);
        match self.out.get_mut(start..self.pos) {
            Some(slot) if !self.overflow => Some(slot),
            _ => {
                self.overflow = true;
                None
            }
        }
    }

    pub(super) fn bytes(&mut self, bytes: &[u8]) {
        if let Some(slot) = self.slot(bytes.len()) {
            slot.copy_from_slice(bytes);
        }
    }

    pub(super) fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }

    pub(super) fn u16(&mut self, v: u16) {
        self.bytes(&v.to_be_bytes());
    }

    pub(super) fn u32(&mut self, v: u32) {
        self.bytes(&v.to_be_bytes());
    }

    pub(super) fn u64(&mut self, v: u64) {
        self.bytes(&v.to_be_bytes());
    }

    /// Bytes written, or the error if the buffer was too small.
    pub(super) fn finish(self) -> Result<usize, EncodeError> {
        if self.overflow {
            Err(EncodeError::BufferTooSmall { need: self.pos, have: self.out.len() })
        } else {
            Ok(self.pos)
        }
    }
}
