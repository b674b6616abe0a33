//! [`GuestMemory`]: the guest's RAM, one private anonymous mapping shown to the guest as one memslot at
//! guest-physical 0, with bounds-checked copies in and out.
//!
//! The guest (through KVM) writes this memory while the VMM reads it, so the VMM never forms Rust
//! references into it while a vCPU may run: every access is a raw copy. Whole-memory reads
//! ([`GuestMemory::copy_to`], [`GuestMemory::image_hash`]) are meant for moments when every vCPU is
//! paused (a fork) or has not started (a clone before its first instruction); run concurrently, they
//! return a torn but memory-safe snapshot.

use std::io;

use crate::abi::PAGE_SIZE;
use crate::ranges::PageRanges;
use crate::sys::AnonMapping;

/// A guest-physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GuestAddress(pub u64);

impl GuestAddress {
    /// The page number.
    pub fn page(self) -> u64 {
        self.0 / PAGE_SIZE
    }
}

/// One guest-physical range backed by the mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Guest-physical start.
    pub guest_addr: GuestAddress,
    /// Length in bytes.
    pub size: u64,
    /// Host virtual address of its first byte.
    pub host_addr: u64,
}

/// What went wrong with guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is 0, not page aligned, or too large.
    #[error("guest memory size {bytes} bytes must be a positive multiple of 2 MiB up to {max} bytes")]
    BadSize {
        /// Size asked for.
        bytes: u64,
        /// Largest size supported.
        max: u64,
    },
    /// mmap refused.
    #[error("cannot map {bytes} bytes of guest memory")]
    Map {
        /// Size asked for.
        bytes: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// An access outside guest memory.
    #[error("guest range [{addr:#x}, +{len:#x}) lies outside guest memory ({size:#x} bytes)")]
    OutOfRange {
        /// Start of the access.
        addr: u64,
        /// Length of the access.
        len: u64,
        /// Memory size.
        size: u64,
    },
}

/// The guest's memory. See the module docs.
#[derive(Debug)]
pub struct GuestMemory {
    map: AnonMapping,
    size: u64,
}

/// Largest guest memory (what the built-in page tables map).
pub const MAX_GUEST_MEMORY: u64 = crate::abi::layout::MAX_MAPPED;

impl GuestMemory {
    /// Maps `size` bytes of zeroed memory (a multiple of 2 MiB, at most [`MAX_GUEST_MEMORY`]).
    pub fn new(size: u64) -> Result<GuestMemory, MemoryError> {
        if size == 0 || !size.is_multiple_of(2 << 20) || size > MAX_GUEST_MEMORY {
            return Err(MemoryError::BadSize { bytes: size, max: MAX_GUEST_MEMORY });
        }
        let map = AnonMapping::new(size as usize).map_err(|source| MemoryError::Map { bytes: size, source })?;
        Ok(GuestMemory { map, size })
    }

    /// Makes the memory a private view of the host's cache memfd `fd` (which must hold at least
    /// [`GuestMemory::size`] bytes): pages the cache has read through the kernel, writes stay private.
    /// Before the guest runs.
    pub fn map_shared_cache(&self, fd: std::os::fd::BorrowedFd<'_>) -> Result<(), MemoryError> {
        self.map.map_file_private(fd).map_err(|source| MemoryError::Map { bytes: self.size, source })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of 4 KiB pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Host virtual address of guest-physical 0.
    pub fn host_addr(&self) -> u64 {
        self.map.ptr() as u64
    }

    /// The regions (one today: guest-physical 0 up to the size).
    pub fn regions(&self) -> Vec<MemoryRegion> {
        debug_assert_eq!(self.map.len() as u64, self.size);
        vec![MemoryRegion { guest_addr: GuestAddress(0), size: self.size, host_addr: self.host_addr() }]
    }

    fn check(&self, addr: GuestAddress, len: u64) -> Result<usize, MemoryError> {
        match addr.0.checked_add(len) {
            Some(end) if end <= self.size => Ok(addr.0 as usize),
            _ => Err(MemoryError::OutOfRange { addr: addr.0, len, size: self.size }),
        }
    }

    /// Copies guest bytes at `addr` into `buf`.
    pub fn read(&self, addr: GuestAddress, buf: &mut [u8]) -> Result<(), MemoryError> {
        let off = self.check(addr, buf.len() as u64)?;
        // SAFETY: `[off, off + len)` lies inside the mapping (checked), which lives as long as `self`;
        // `buf` is a distinct Rust allocation. A concurrent guest write can only make the copy torn.
        unsafe { std::ptr::copy_nonoverlapping(self.map.ptr().add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into guest memory at `addr`.
    pub fn write(&self, addr: GuestAddress, data: &[u8]) -> Result<(), MemoryError> {
        let off = self.check(addr, data.len() as u64)?;
        // SAFETY: as for `read`; the destination is guest memory, which no Rust reference covers.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.ptr().add(off), data.len()) };
        Ok(())
    }

    /// Reads a little-endian u64.
    pub fn read_u64(&self, addr: GuestAddress) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian u64.
    pub fn write_u64(&self, addr: GuestAddress, value: u64) -> Result<(), MemoryError> {
        self.write(addr, &value.to_le_bytes())
    }

    /// Copies the whole memory into `out` (which must be exactly [`GuestMemory::size`] bytes).
    pub fn copy_to(&self, out: &mut [u8]) -> Result<(), MemoryError> {
        if out.len() as u64 != self.size {
            return Err(MemoryError::OutOfRange { addr: 0, len: out.len() as u64, size: self.size });
        }
        self.read(GuestAddress(0), out)
    }

    /// Whether page `page` is all zero (reads it: in a clone this fetches it).
    pub fn page_is_zero(&self, page: u64) -> Result<bool, MemoryError> {
        let mut buf = [0u8; PAGE_SIZE as usize];
        self.read(GuestAddress(page * PAGE_SIZE), &mut buf)?;
        Ok(buf.iter().all(|&b| b == 0))
    }

    /// BLAKE3 of the memory image as clones of a fork see it: every page in order, with the pages of
    /// `discarded` taken as zeros (clones start them as zero pages). Reads every other page (in a
    /// clone, that fetches them all).
    pub fn image_hash(&self, discarded: &PageRanges) -> Result<[u8; 32], MemoryError> {
        let mut hasher = blake3::Hasher::new();
        let zero = vec![0u8; PAGE_SIZE as usize];
        let mut chunk = vec![0u8; 64 * PAGE_SIZE as usize];
        let mut page = 0;
        while page < self.pages() {
            if discarded.contains(page) {
                hasher.update(&zero);
                page += 1;
                continue;
            }
            // The longest stretch of pages up to 64 that holds no discarded page.
            let mut n = 1;
            while n < 64 && page + n < self.pages() && !discarded.contains(page + n) {
                n += 1;
            }
            let buf = &mut chunk[..(n * PAGE_SIZE) as usize];
            self.read(GuestAddress(page * PAGE_SIZE), buf)?;
            hasher.update(buf);
            page += n;
        }
        Ok(*hasher.finalize().as_bytes())
    }

    /// The pages of `[0, pages)` whose bytes are all zero, found by reading every page (the fallback
    /// when dirty logging is unavailable).
    pub fn scan_zero_pages(&self) -> Result<PageRanges, MemoryError> {
        let mut out = PageRanges::new();
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        for page in 0..self.pages() {
            self.read(GuestAddress(page * PAGE_SIZE), &mut buf)?;
            if buf.iter().all(|&b| b == 0) {
                out.insert(page, 1);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked() {
        let m = GuestMemory::new(2 << 20).unwrap();
        m.write_u64(GuestAddress(8), 0x1122).unwrap();
        assert_eq!(m.read_u64(GuestAddress(8)).unwrap(), 0x1122);
        let e = m.write(GuestAddress((2 << 20) - 4), &[0; 8]).unwrap_err();
        assert_eq!(e.to_string(), "guest range [0x1ffffc, +0x8) lies outside guest memory (0x200000 bytes)");
        assert!(m.read(GuestAddress(u64::MAX), &mut [0; 2]).is_err());
        assert!(matches!(GuestMemory::new(4096), Err(MemoryError::BadSize { .. })));
    }

    #[test]
    fn image_hash_treats_discarded_pages_as_zero() {
        let m = GuestMemory::new(2 << 20).unwrap();
        let clean = m.image_hash(&PageRanges::new()).unwrap();
        m.write_u64(GuestAddress(5 * 4096 + 16), 7).unwrap();
        let dirty = m.image_hash(&PageRanges::new()).unwrap();
        assert_ne!(clean, dirty);
        let mut d = PageRanges::new();
        d.insert(5, 1);
        assert_eq!(m.image_hash(&d).unwrap(), clean);
        let zeros = m.scan_zero_pages().unwrap();
        assert_eq!(zeros.page_count(), m.pages() - 1);
        assert!(!zeros.contains(5));
    }
}
