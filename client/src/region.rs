//! [`Region`]: one range of a clone's guest memory and where its bytes live in the snapshot image, in
//! Firecracker's JSON shape, and the checks every handed-over region list must pass.

use serde::{Deserialize, Serialize};

/// Base page size.
pub const PAGE_4K: u64 = 4096;
/// Huge page size (hugetlbfs-backed guest memory).
pub const PAGE_2M: u64 = 2 << 20;

/// A registered range of the clone's address space: `size` bytes at `base_host_virt_addr` in the
/// VMM's process hold the snapshot image bytes `[offset, offset + size)`.
///
/// Serialises as Firecracker's `GuestRegionUffdMapping`; deserialises from it with either `page_size`
/// (bytes) or older Firecracker's `page_size_kib`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "WireRegion")]
pub struct Region {
    /// Start of the range in the VMM's (clone's) address space.
    pub base_host_virt_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Byte offset of the range in the snapshot image.
    pub offset: u64,
    /// Page size of the mapping: 4096, or 2 MiB for hugetlbfs.
    pub page_size: u64,
}

impl Region {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.base_host_virt_addr.saturating_add(self.size)
    }

    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base_host_virt_addr && addr < self.end()
    }

    /// Image byte offset of the clone address `addr` (which must lie in the range).
    pub fn image_offset(&self, addr: u64) -> u64 {
        addr - self.base_host_virt_addr + self.offset
    }

    /// Clone address of the image byte offset `off` (which must lie in `[offset, offset + size)`).
    pub fn addr_of_image_offset(&self, off: u64) -> u64 {
        off - self.offset + self.base_host_virt_addr
    }

    /// The sub-range `[start, end)` (clamped to this region) as a region of its own.
    pub fn slice(&self, start: u64, end: u64) -> Option<Region> {
        let start = start.max(self.base_host_virt_addr);
        let end = end.min(self.end());
        (start < end).then(|| Region {
            base_host_virt_addr: start,
            size: end - start,
            offset: self.image_offset(start),
            page_size: self.page_size,
        })
    }
}

/// What a region list failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// Nothing to serve.
    #[error("the handoff lists no memory regions")]
    NoRegions,
    /// A region of size 0.
    #[error("region {index}: size is 0")]
    ZeroSize {
        /// Position in the list.
        index: usize,
    },
    /// Neither 4 KiB nor 2 MiB.
    #[error("region {index}: page size {page_size} is not 4096 or 2097152")]
    BadPageSize {
        /// Position in the list.
        index: usize,
        /// The page size given.
        page_size: u64,
    },
    /// An address, offset or size that is not a multiple of the page size.
    #[error("region {index}: {field} {value:#x} is not a multiple of the page size {page_size:#x}")]
    Unaligned {
        /// Position in the list.
        index: usize,
        /// `base_host_virt_addr`, `offset` or `size`.
        field: &'static str,
        /// The value.
        value: u64,
        /// The region's page size.
        page_size: u64,
    },
    /// `base + size` or `offset + size` past 2^64.
    #[error("region {index}: {field} + size overflows 64 bits")]
    Overflow {
        /// Position in the list.
        index: usize,
        /// `base_host_virt_addr` or `offset`.
        field: &'static str,
    },
    /// Two regions share clone addresses.
    #[error("regions {first} and {second} overlap in the clone's address space")]
    AddressOverlap {
        /// Position of one.
        first: usize,
        /// Position of the other.
        second: usize,
    },
    /// Two regions map the same image bytes.
    #[error("regions {first} and {second} map overlapping ranges of the snapshot image")]
    ImageOverlap {
        /// Position of one.
        first: usize,
        /// Position of the other.
        second: usize,
    },
}

/// Checks a region list: not empty, each region non-empty, page size 4 KiB or 2 MiB, address, offset
/// and size multiples of the page size, no overflow, and no two regions overlapping in the clone's
/// address space or in the image.
pub fn validate_regions(regions: &[Region]) -> Result<(), RegionError> {
    if regions.is_empty() {
        return Err(RegionError::NoRegions);
    }
    for (index, r) in regions.iter().enumerate() {
        if r.page_size != PAGE_4K && r.page_size != PAGE_2M {
            return Err(RegionError::BadPageSize { index, page_size: r.page_size });
        }
        if r.size == 0 {
            return Err(RegionError::ZeroSize { index });
        }
        for (field, value) in [("base_host_virt_addr", r.base_host_virt_addr), ("offset", r.offset), ("size", r.size)] {
            if value & (r.page_size - 1) != 0 {
                return Err(RegionError::Unaligned { index, field, value, page_size: r.page_size });
            }
        }
        if r.base_host_virt_addr.checked_add(r.size).is_none() {
            return Err(RegionError::Overflow { index, field: "base_host_virt_addr" });
        }
        if r.offset.checked_add(r.size).is_none() {
            return Err(RegionError::Overflow { index, field: "offset" });
        }
    }
    first_overlap(regions, |r| r.base_host_virt_addr)
        .map_or(Ok(()), |(first, second)| Err(RegionError::AddressOverlap { first, second }))?;
    first_overlap(regions, |r| r.offset)
        .map_or(Ok(()), |(first, second)| Err(RegionError::ImageOverlap { first, second }))
}

/// The first pair (by list position) of ranges `[key(r), key(r) + size)` that overlap.
fn first_overlap(regions: &[Region], key: impl Fn(&Region) -> u64) -> Option<(usize, usize)> {
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by_key(|&i| key(&regions[i]));
    order.windows(2).find_map(|w| {
        let (a, b) = (&regions[w[0]], &regions[w[1]]);
        (key(a) + a.size > key(b)).then(|| (w[0].min(w[1]), w[0].max(w[1])))
    })
}

/// A region as it appears on the wire: `page_size` in bytes, or `page_size_kib` (older Firecracker).
#[derive(Deserialize)]
struct WireRegion {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: Option<u64>,
    page_size_kib: Option<u64>,
}

impl TryFrom<WireRegion> for Region {
    type Error = String;

    fn try_from(w: WireRegion) -> Result<Region, String> {
        let page_size = match (w.page_size, w.page_size_kib) {
            (Some(bytes), None) => bytes,
            (None, Some(kib)) => kib.checked_mul(1024).ok_or_else(|| format!("page_size_kib {kib} is too large"))?,
            (Some(bytes), Some(kib)) if kib.checked_mul(1024) == Some(bytes) => bytes,
            (Some(bytes), Some(kib)) => return Err(format!("page_size {bytes} disagrees with page_size_kib {kib}")),
            (None, None) => return Err("region has neither page_size nor page_size_kib".to_string()),
        };
        Ok(Region { base_host_virt_addr: w.base_host_virt_addr, size: w.size, offset: w.offset, page_size })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn r(base: u64, size: u64, offset: u64) -> Region {
        Region { base_host_virt_addr: base, size, offset, page_size: PAGE_4K }
    }

    #[test]
    fn accepts_disjoint_regions() {
        assert_eq!(validate_regions(&[r(0x20000, 0x2000, 0x2000), r(0x10000, 0x2000, 0)]), Ok(()));
    }

    #[test]
    fn rejects_bad_regions_with_their_index() {
        assert_eq!(validate_regions(&[]), Err(RegionError::NoRegions));
        assert_eq!(validate_regions(&[r(0x1000, 0, 0)]), Err(RegionError::ZeroSize { index: 0 }));
        let e = validate_regions(&[r(0x1000, 0x1000, 0), r(0x3001, 0x1000, 0x1000)]).unwrap_err();
        assert_eq!(e.to_string(), "region 1: base_host_virt_addr 0x3001 is not a multiple of the page size 0x1000");
        let mut huge = r(0x20_0000, 0x1000, 0);
        huge.page_size = PAGE_2M;
        assert!(matches!(validate_regions(&[huge]), Err(RegionError::Unaligned { field: "size", .. })));
        let mut odd = r(0, 0x2000, 0);
        odd.page_size = 8192;
        assert_eq!(
            validate_regions(&[odd]).unwrap_err().to_string(),
            "region 0: page size 8192 is not 4096 or 2097152"
        );
        assert_eq!(
            validate_regions(&[r(0x1000, 0x2000, 0), r(0x2000, 0x1000, 0x4000)]),
            Err(RegionError::AddressOverlap { first: 0, second: 1 })
        );
        assert_eq!(
            validate_regions(&[r(0x1000, 0x2000, 0x1000), r(0x8000, 0x1000, 0x2000)]),
            Err(RegionError::ImageOverlap { first: 0, second: 1 })
        );
        assert!(matches!(validate_regions(&[r(u64::MAX - 0xfff, 0x2000, 0)]), Err(RegionError::Overflow { .. })));
    }

    #[test]
    fn slices_keep_the_image_mapping() {
        let s = r(0x10000, 0x4000, 0x8000).slice(0x11000, 0x20000);
        assert_eq!(s, Some(r(0x11000, 0x3000, 0x9000)));
        assert_eq!(r(0x10000, 0x4000, 0).slice(0x20000, 0x30000), None);
    }
}
