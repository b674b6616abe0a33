//! The UMEM: one memory area, cut into equal frames, that the kernel receives into and transmits
//! from. Frames are named by their byte offset in the area (a descriptor's `addr`).
//!
//! # Who may touch a frame
//!
//! At any time each frame belongs either to the application (in its free list, or just taken off
//! the RX or completion ring) or to the kernel (posted on the fill or TX ring and not yet
//! returned). The queue code (`queue.rs`) moves frames between those states and asks this module
//! for the bytes of frames it owns only. The kernel writes only frames it owns, so a slice made
//! here is not written by the kernel while it lives — if the queue code broke that rule, the bytes
//! read would be wrong but never invalid, as every bit pattern is a valid `u8`.

use std::io;

use super::sys::Mmap;

/// One descriptor of the RX and TX rings (`struct xdp_desc`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Desc {
    /// Offset of the data in the UMEM.
    pub addr: u64,
    /// Length of the data.
    pub len: u32,
    /// `XDP_PKT_CONTD` (bit 0): more descriptors of the same packet follow.
    pub options: u32,
}

/// `XDP_PKT_CONTD`: the packet continues in the next descriptor.
pub const PKT_CONTD: u32 = 1;

/// The UMEM of one socket.
#[derive(Debug)]
pub struct Umem {
    map: Mmap,
    frame_size: u32,
    frames: u32,
}

impl Umem {
    /// `frames` zeroed frames of `frame_size` bytes.
    pub fn new(frames: u32, frame_size: u32) -> io::Result<Umem> {
        let len = (frames as usize)
            .checked_mul(frame_size as usize)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        Ok(Umem { map: Mmap::anonymous(len)?, frame_size, frames })
    }

    /// The mapping, for `XDP_UMEM_REG`.
    pub fn mapping(&self) -> &Mmap {
        &self.map
    }

    /// Bytes per frame.
    pub fn frame_size(&self) -> u32 {
        self.frame_size
    }

    /// Number of frames.
    pub fn frames(&self) -> u32 {
        self.frames
    }

    /// Address of frame `i`.
    pub fn frame_addr(&self, i: u32) -> u64 {
        u64::from(i) * u64::from(self.frame_size)
    }

    /// The frame holding `addr` (rounded down to its start).
    pub fn frame_base(&self, addr: u64) -> u64 {
        addr - addr % u64::from(self.frame_size)
    }

    /// True if `[addr, addr + len)` lies inside one frame.
    fn in_one_frame(&self, addr: u64, len: usize) -> bool {
        let fs = u64::from(self.frame_size);
        let end = addr.checked_add(len as u64);
        addr < self.map.len() as u64 && end.is_some_and(|e| e <= self.frame_base(addr) + fs)
    }

    /// The `len` bytes at `addr` of a frame the caller owns (see the module docs), or `None` if
    /// they are not inside one frame of this UMEM (a bad descriptor from the ring).
    pub fn bytes(&self, addr: u64, len: usize) -> Option<&[u8]> {
        if !self.in_one_frame(addr, len) {
            return None;
        }
        // SAFETY: the range is inside the mapping (checked above), which lives as long as `self`;
        // it is inside one frame owned by the application, which the kernel does not write (module
        // docs), and `&self` keeps `bytes_mut` from making a mutable slice meanwhile.
        Some(unsafe { std::slice::from_raw_parts(self.map.ptr().as_ptr().add(addr as usize), len) })
    }

    /// The `len` bytes at `addr` of a frame the caller owns, writable; `None` if not inside one frame.
    pub fn bytes_mut(&mut self, addr: u64, len: usize) -> Option<&mut [u8]> {
        if !self.in_one_frame(addr, len) {
            return None;
        }
        // SAFETY: as in `bytes`; `&mut self` makes this the only slice of the UMEM alive.
        Some(unsafe { std::slice::from_raw_parts_mut(self.map.ptr().as_ptr().add(addr as usize), len) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_bounded() {
        let mut u = Umem::new(4, 2048).expect("map");
        assert_eq!((u.frames(), u.frame_size(), u.frame_addr(3), u.frame_base(4095)), (4, 2048, 6144, 2048));
        assert_eq!(u.bytes(0, 2048).map(<[u8]>::len), Some(2048));
        assert!(u.bytes(1, 2048).is_none(), "crosses into the next frame");
        assert!(u.bytes(8192, 1).is_none(), "past the end");
        assert!(u.bytes(u64::MAX, 2).is_none(), "overflowing");
        u.bytes_mut(2048 + 100, 3).expect("in frame 1").copy_from_slice(b"abc");
        assert_eq!(u.bytes(2148, 3), Some(&b"abc"[..]));
        assert_eq!(std::mem::size_of::<Desc>(), 16);
    }
}
