//! [`RegionMap`]: a clone's regions sorted by address, with look-up and the edits that unmap and
//! mremap events make.

use crate::region::Region;

/// Non-overlapping regions sorted by `base_host_virt_addr`.
#[derive(Debug, Clone, Default)]
pub struct RegionMap {
    regions: Vec<Region>,
}

impl RegionMap {
    /// Builds a map from validated (non-overlapping) regions.
    pub fn new(mut regions: Vec<Region>) -> RegionMap {
        regions.sort_by_key(|r| r.base_host_virt_addr);
        RegionMap { regions }
    }

    /// The regions, by address.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The region containing `addr`.
    pub fn find(&self, addr: u64) -> Option<Region> {
        let i = self.regions.partition_point(|r| r.base_host_virt_addr <= addr);
        let r = *self.regions.get(i.checked_sub(1)?)?;
        r.contains(addr).then_some(r)
    }

    /// The parts of regions that lie in `[start, end)`.
    pub fn pieces(&self, start: u64, end: u64) -> impl Iterator<Item = Region> + '_ {
        self.regions.iter().filter_map(move |r| r.slice(start, end))
    }

    /// Drops `[start, end)` from the map (munmap).
    pub fn remove(&mut self, start: u64, end: u64) {
        self.regions = self
            .regions
            .iter()
            .flat_map(|r| {
                if r.slice(start, end).is_none() {
                    return vec![*r];
                }
                let before = r.slice(r.base_host_virt_addr, start);
                let after = r.slice(end, r.end());
                before.into_iter().chain(after).collect()
            })
            .collect();
    }

    /// Moves `[from, from + len)` to `to` (mremap); the image mapping moves with it.
    pub fn remap(&mut self, from: u64, to: u64, len: u64) {
        let moved: Vec<Region> = self
            .pieces(from, from.saturating_add(len))
            .map(|p| Region { base_host_virt_addr: p.base_host_virt_addr - from + to, ..p })
            .collect();
        self.remove(from, from.saturating_add(len));
        self.remove(to, to.saturating_add(len));
        self.regions.extend(moved);
        self.regions.sort_by_key(|r| r.base_host_virt_addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::PAGE_4K;

    fn r(base: u64, size: u64, offset: u64) -> Region {
        Region { base_host_virt_addr: base, size, offset, page_size: PAGE_4K }
    }

    #[test]
    fn find_remove_and_remap() {
        let mut m = RegionMap::new(vec![r(0x20000, 0x4000, 0x10000), r(0x10000, 0x4000, 0)]);
        assert_eq!(m.find(0x21000), Some(r(0x20000, 0x4000, 0x10000)));
        assert_eq!(m.find(0x14000), None);
        assert_eq!(m.find(0xf000), None);

        m.remove(0x11000, 0x12000);
        assert_eq!(m.regions(), &[r(0x10000, 0x1000, 0), r(0x12000, 0x2000, 0x2000), r(0x20000, 0x4000, 0x10000)]);

        m.remap(0x22000, 0x40000, 0x2000);
        assert_eq!(
            m.regions(),
            &[
                r(0x10000, 0x1000, 0),
                r(0x12000, 0x2000, 0x2000),
                r(0x20000, 0x2000, 0x10000),
                r(0x40000, 0x2000, 0x12000)
            ]
        );
        assert_eq!(m.find(0x41000).map(|r| r.image_offset(0x41000)), Some(0x13000));
    }
}
