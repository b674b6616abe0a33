//! Putting pages and blobs back together from their fragments.

use std::collections::HashMap;

/// Byte ranges received of one object, merged.
#[derive(Debug, Default)]
struct Coverage(Vec<(u32, u32)>);

impl Coverage {
    /// Adds `start..end`; false when it was already fully covered.
    fn add(&mut self, start: u32, end: u32) -> bool {
        if self.0.iter().any(|&(s, e)| s <= start && end <= e) {
            return false;
        }
        self.0.push((start, end));
        self.0.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(self.0.len());
        for &(s, e) in &self.0 {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.0 = merged;
        true
    }

    fn complete(&self, total: u32) -> bool {
        self.0.len() == 1 && self.0[0] == (0, total)
    }
}

/// One object being reassembled.
#[derive(Debug)]
struct Partial {
    tag: bool,
    bytes: Vec<u8>,
    coverage: Coverage,
}

/// Objects being reassembled, keyed by `K`.
#[derive(Debug)]
pub(super) struct Assembler<K> {
    partial: HashMap<K, Partial>,
}

impl<K> Default for Assembler<K> {
    fn default() -> Self {
        Assembler { partial: HashMap::new() }
    }
}

impl<K: std::hash::Hash + Eq + Copy> Assembler<K> {
    /// Adds a fragment of object `key` (whose encoding, flagged by `tag`, is `total` bytes long).
    /// Returns the whole encoding once complete. A fragment of a different encoding of the same
    /// object (another `tag` or `total`) starts the object over.
    pub fn add(&mut self, key: K, tag: bool, total: u32, offset: u32, bytes: &[u8]) -> Option<(bool, Vec<u8>)> {
        let end = offset.checked_add(bytes.len() as u32)?;
        if end > total || bytes.is_empty() {
            return None;
        }
        let p = self.partial.entry(key).or_insert_with(|| Partial {
            tag,
            bytes: vec![0; total as usize],
            coverage: Coverage::default(),
        });
        if p.tag != tag || p.bytes.len() != total as usize {
            *p = Partial { tag, bytes: vec![0; total as usize], coverage: Coverage::default() };
        }
        if !p.coverage.add(offset, end) {
            return None;
        }
        p.bytes[offset as usize..end as usize].copy_from_slice(bytes);
        if p.coverage.complete(total) {
            let done = self.partial.remove(&key)?;
            return Some((done.tag, done.bytes));
        }
        None
    }

    /// Forgets object `key`.
    pub fn forget(&mut self, key: K) {
        self.partial.remove(&key);
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.partial.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reassembles_out_of_order_with_duplicates_and_overlap() {
        let mut a: Assembler<u32> = Assembler::default();
        let data: Vec<u8> = (0..100u8).collect();
        assert!(a.add(1, false, 100, 60, &data[60..]).is_none());
        assert!(a.add(1, false, 100, 60, &data[60..]).is_none());
        assert!(a.add(1, false, 100, 0, &data[..30]).is_none());
        let (tag, out) = a.add(1, false, 100, 20, &data[20..70]).expect("complete");
        assert!(!tag);
        assert_eq!(out, data);
    }

    #[test]
    fn a_different_encoding_starts_over() {
        let mut a: Assembler<u32> = Assembler::default();
        assert!(a.add(7, true, 10, 0, &[1; 5]).is_none());
        assert!(a.add(7, false, 10, 5, &[2; 5]).is_none(), "raw fragment must not complete a zstd object");
        assert!(a.add(7, false, 10, 0, &[2; 5]).is_some());
    }
}
