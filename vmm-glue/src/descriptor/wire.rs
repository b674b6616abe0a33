//! Little-endian writer and bounds-checked reader for the descriptor format.

use super::DescriptorError;

/// Appends little-endian values and LEB128 varints to a byte vector.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    pub(crate) buf: Vec<u8>,
}

impl Writer {
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
    pub(crate) fn varint(&mut self, mut v: u64) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.buf.push(byte);
                return;
            }
            self.buf.push(byte | 0x80);
        }
    }
    /// A section: tag, varint length, body.
    pub(crate) fn section(&mut self, tag: u8, body: &[u8]) {
        self.u8(tag);
        self.varint(body.len() as u64);
        self.bytes(body);
    }
}

/// Reads from a byte slice; every read names the section it is in, so errors say where input ended
/// or went wrong.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    section: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], section: &'static str) -> Reader<'a> {
        Reader { buf, pos: 0, section }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DescriptorError> {
        if self.remaining() < n {
            return Err(DescriptorError::Malformed {
                section: self.section,
                reason: format!("needs {n} more bytes at offset {}, has {}", self.pos, self.remaining()),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DescriptorError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DescriptorError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DescriptorError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DescriptorError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DescriptorError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn bytes<const N: usize>(&mut self) -> Result<[u8; N], DescriptorError> {
        self.array()
    }
    pub(crate) fn varint(&mut self) -> Result<u64, DescriptorError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                break;
            }
            v |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.malformed("varint longer than 64 bits"))
    }
    /// A varint that must fit in `usize` and be at most `max`.
    pub(crate) fn count(&mut self, what: &str, max: u64) -> Result<usize, DescriptorError> {
        let n = self.varint()?;
        if n > max {
            return Err(self.malformed(format!("{what} {n} exceeds the limit {max}")));
        }
        Ok(n as usize)
    }
    pub(crate) fn malformed(&self, reason: impl Into<String>) -> DescriptorError {
        DescriptorError::Malformed { section: self.section, reason: reason.into() }
    }
    /// Fails unless every byte was consumed.
    pub(crate) fn finish(self) -> Result<(), DescriptorError> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self.malformed(format!("{} unexpected bytes at the end", self.remaining())))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn varints_roundtrip_and_reject_overlong() {
        for v in [0, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut w = Writer::default();
            w.varint(v);
            let mut r = Reader::new(&w.buf, "test");
            assert_eq!(r.varint().unwrap(), v);
            assert!(r.is_empty());
        }
        let overlong = [0xffu8; 11];
        assert!(Reader::new(&overlong, "test").varint().is_err());
        let too_big = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(Reader::new(&too_big, "test").varint().is_err());
    }
}
