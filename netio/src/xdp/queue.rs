//! One AF_XDP socket bound to one queue of the interface: its UMEM, its four rings, and the frame
//! bookkeeping between them.
//!
//! The UMEM's frames are split in two halves. The receive half lives on the fill ring (kernel's)
//! or, for the moment a packet is copied out, with us: every frame taken off the RX ring goes
//! straight back to the fill ring, so the fill ring (as large as that half) always has room. The
//! send half lives in `free_tx` (ours) or on the TX ring (kernel's) until the completion ring hands
//! it back.
//!
//! A packet larger than a frame (MTU 9000 with `XDP_USE_SG`) arrives as several RX descriptors,
//! all but the last flagged `XDP_PKT_CONTD`; they are copied one after another into a reassembly
//! buffer, which may span two `receive` calls. Sending splits the same way.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::ring::{Consumer, Producer, RingMemory};
use super::sys;
use super::umem::{Desc, Umem, PKT_CONTD};

/// Headroom the kernel keeps in front of received data in each frame (`XDP_PACKET_HEADROOM`).
pub const RX_HEADROOM: u32 = 256;

/// Longest packet reassembled from several descriptors: the largest IPv4 packet plus Ethernet.
pub const MAX_PACKET: usize = 65_535 + 14;

/// How to bind the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSetup {
    /// Interface index.
    pub ifindex: u32,
    /// Queue id.
    pub queue: u32,
    /// Frames in the UMEM (a power of two; half receive, half send).
    pub frames: u32,
    /// Bytes per frame (2048 or 4096).
    pub frame_size: u32,
    /// `sxdp_flags` for bind (`XDP_COPY`, `XDP_ZEROCOPY`, `XDP_USE_SG`, `XDP_USE_NEED_WAKEUP`).
    pub bind_flags: u16,
    /// Register the UMEM for TX metadata, so sent packets can ask the device for their checksum;
    /// `Some(true)`: the kernel computes requested checksums in software (`XDP_UMEM_TX_SW_CSUM`).
    pub tx_checksum: Option<bool>,
}

/// The step of the socket setup that failed, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupStep {
    /// `socket(AF_XDP)`.
    Socket,
    /// Mapping the UMEM.
    Umem,
    /// `XDP_UMEM_REG`.
    RegisterUmem,
    /// Setting ring sizes.
    RingSize,
    /// `XDP_MMAP_OFFSETS` or mapping a ring.
    MapRings,
    /// `bind`.
    Bind,
    /// `XDP_OPTIONS`.
    Options,
}

impl std::fmt::Display for SetupStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SetupStep::Socket => "creating the AF_XDP socket",
            SetupStep::Umem => "allocating the UMEM",
            SetupStep::RegisterUmem => "registering the UMEM (XDP_UMEM_REG)",
            SetupStep::RingSize => "sizing the rings",
            SetupStep::MapRings => "mapping the rings",
            SetupStep::Bind => "binding the AF_XDP socket",
            SetupStep::Options => "reading XDP_OPTIONS",
        })
    }
}

/// What one `receive` call saw, besides the packets handed over.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxCounts {
    /// Descriptors taken off the RX ring.
    pub descriptors: u64,
    /// Descriptors pointing outside the UMEM (dropped).
    pub bad_descriptors: u64,
    /// Multi-descriptor packets longer than [`MAX_PACKET`] (dropped).
    pub oversize: u64,
}

/// One bound AF_XDP socket. See the [module docs](self).
#[derive(Debug)]
pub struct XskQueue {
    fill: Producer<u64>,
    comp: Consumer<u64>,
    rx: Consumer<Desc>,
    tx: Producer<Desc>,
    umem: Umem,
    fd: OwnedFd,
    queue: u32,
    zero_copy: bool,
    free_tx: Vec<u64>,
    tx_frames: u32,
    /// Reassembly of a packet spread over several descriptors.
    partial: Vec<u8>,
    partial_active: bool,
    partial_oversize: bool,
    /// Frames the device dropped on transmission (copy mode: `sendto` said `EBUSY`).
    tx_device_drops: u64,
    /// Bytes of TX metadata room before each packet's first frame (0: the UMEM has none).
    tx_meta: usize,
}

impl XskQueue {
    /// Creates the socket, UMEM and rings, fills the fill ring, and binds.
    pub fn open(s: &QueueSetup) -> Result<XskQueue, (SetupStep, io::Error)> {
        let fd = sys::xsk_socket().map_err(|e| (SetupStep::Socket, e))?;
        let umem = Umem::new(s.frames, s.frame_size).map_err(|e| (SetupStep::Umem, e))?;
        sys::register_umem(
            fd.as_fd(),
            umem.mapping(),
            s.frame_size,
            s.tx_checksum.is_some(),
            s.tx_checksum == Some(true),
        )
        .map_err(|e| (SetupStep::RegisterUmem, e))?;
        let half = s.frames / 2;
        for which in [libc::XDP_UMEM_FILL_RING, libc::XDP_UMEM_COMPLETION_RING, libc::XDP_RX_RING, libc::XDP_TX_RING] {
            sys::set_ring_size(fd.as_fd(), which, half).map_err(|e| (SetupStep::RingSize, e))?;
        }
        let off = sys::mmap_offsets(fd.as_fd()).map_err(|e| (SetupStep::MapRings, e))?;
        let map = |e| (SetupStep::MapRings, e);
        let fill = RingMemory::map(fd.as_fd(), &off.fr, half, libc::XDP_UMEM_PGOFF_FILL_RING).map_err(map)?;
        let comp = RingMemory::map(fd.as_fd(), &off.cr, half, libc::XDP_UMEM_PGOFF_COMPLETION_RING).map_err(map)?;
        let rx = RingMemory::map(fd.as_fd(), &off.rx, half, libc::XDP_PGOFF_RX_RING as u64).map_err(map)?;
        let tx = RingMemory::map(fd.as_fd(), &off.tx, half, libc::XDP_PGOFF_TX_RING as u64).map_err(map)?;
        let mut q = XskQueue {
            fill: Producer::new(fill),
            comp: Consumer::new(comp),
            rx: Consumer::new(rx),
            tx: Producer::new(tx),
            free_tx: (half..s.frames).map(|i| umem.frame_addr(i)).collect(),
            umem,
            fd,
            queue: s.queue,
            zero_copy: false,
            tx_frames: half,
            partial: Vec::with_capacity(MAX_PACKET),
            partial_active: false,
            partial_oversize: false,
            tx_device_drops: 0,
            tx_meta: if s.tx_checksum.is_some() { sys::TX_METADATA_LEN as usize } else { 0 },
        };
        for i in 0..half {
            let addr = q.umem.frame_addr(i);
            if !q.fill.push(addr) {
                break; // cannot happen: the ring has `half` slots
            }
        }
        q.fill.submit();
        sys::bind_xsk(q.fd.as_fd(), s.ifindex, s.queue, s.bind_flags).map_err(|e| (SetupStep::Bind, e))?;
        let options = sys::xdp_options(q.fd.as_fd()).map_err(|e| (SetupStep::Options, e))?;
        q.zero_copy = options & libc::XDP_OPTIONS_ZEROCOPY != 0;
        Ok(q)
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The queue id bound.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// True if the kernel runs this socket in zero-copy mode.
    pub fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    /// True if the RX ring has descriptors waiting.
    pub fn rx_ready(&mut self) -> bool {
        self.rx.available(1) > 0
    }

    /// Takes packets off the RX ring, calling `handle` with each complete packet's bytes (its
    /// Ethernet frame), until the ring is empty or `budget` packets were handed over; every frame
    /// goes back to the fill ring.
    pub fn receive(&mut self, budget: usize, mut handle: impl FnMut(&[u8])) -> RxCounts {
        let mut counts = RxCounts::default();
        let mut handed = 0;
        let n = self.rx.available(self.fill.size());
        let mut taken = 0;
        while taken < n {
            if !self.partial_active && handed >= budget {
                break;
            }
            let Some(d) = self.rx.get(taken) else { break };
            taken += 1;
            let more = d.options & PKT_CONTD != 0;
            match self.umem.bytes(d.addr, d.len as usize) {
                None => {
                    counts.bad_descriptors += 1;
                    self.partial_active = more; // drop the whole packet
                    self.partial_oversize = true;
                }
                Some(bytes) if !self.partial_active && !more => {
                    handle(bytes);
                    handed += 1;
                }
                Some(bytes) => {
                    if !self.partial_active {
                        self.partial.clear();
                        self.partial_oversize = false;
                    }
                    if self.partial.len() + bytes.len() > MAX_PACKET {
                        self.partial_oversize = true;
                    } else if !self.partial_oversize {
                        self.partial.extend_from_slice(bytes);
                    }
                    self.partial_active = more;
                    if !more {
                        if self.partial_oversize {
                            counts.oversize += 1;
                        } else {
                            handle(&self.partial);
                        }
                        handed += 1;
                    }
                }
            }
            if !self.partial_active {
                self.partial_oversize = false;
            }
            let base = self.umem.frame_base(d.addr);
            if !self.fill.push(base) {
                tracing::error!(queue = self.queue, "fill ring full: a receive frame is lost");
            }
        }
        counts.descriptors = u64::from(taken);
        self.rx.release(taken);
        self.fill.submit();
        if taken > 0 && self.fill.needs_wakeup() {
            // Only a hint to the driver; failures (EAGAIN, EBUSY) just mean "later".
            let _ = sys::kick_rx(self.fd.as_fd());
        }
        counts
    }

    /// Moves frames the kernel finished sending back to the free list; returns how many.
    pub fn reclaim(&mut self) -> usize {
        let n = self.comp.available(self.tx_frames);
        for i in 0..n {
            if let Some(addr) = self.comp.get(i) {
                self.free_tx.push(self.umem.frame_base(addr));
            }
        }
        self.comp.release(n);
        n as usize
    }

    /// Frames needed to send a packet of `len` bytes.
    pub fn frames_for(&self, len: usize) -> usize {
        len.div_ceil(self.umem.frame_size() as usize - self.tx_meta).max(1)
    }

    /// True if sent packets can ask the device to complete their checksum ([`post`](Self::post)).
    pub fn tx_checksum_offload(&self) -> bool {
        self.tx_meta > 0
    }

    /// True if a packet of `len` bytes can be posted now (free frames and TX ring room).
    pub fn can_post(&mut self, len: usize) -> bool {
        let need = self.frames_for(len);
        self.free_tx.len() >= need && self.tx.free(need as u32) as usize >= need
    }

    /// Writes a packet made of `head` followed by `body` into free frames and onto the TX ring
    /// (not yet submitted). Returns false, posting nothing, if frames or ring slots are short.
    /// With `checksum` (start and offset, see [`frame::UDP_CSUM_START`](super::frame::UDP_CSUM_START))
    /// and a UMEM registered for TX metadata, the packet asks the device to complete that checksum.
    pub fn post(&mut self, head: &[u8], body: &[u8], checksum: Option<(u16, u16)>) -> bool {
        let len = head.len() + body.len();
        if !self.can_post(len) {
            return false;
        }
        let fs = self.umem.frame_size() as usize;
        let mut written = 0;
        while written < len {
            let Some(base) = self.free_tx.pop() else { return false };
            // With TX metadata, every descriptor starts that far into its frame: the kernel checks
            // each one as if metadata came before it. Only the first carries a request.
            let skip = self.tx_meta;
            let chunk = (len - written).min(fs - skip);
            let meta = match checksum {
                Some((start, offset)) if skip > 0 && written == 0 => {
                    let Some(m) = self.umem.bytes_mut(base, skip) else {
                        self.free_tx.push(base);
                        return false;
                    };
                    m.copy_from_slice(&sys::tx_metadata_checksum(start, offset));
                    libc::XDP_TX_METADATA
                }
                _ => 0,
            };
            let addr = base + skip as u64;
            let Some(frame) = self.umem.bytes_mut(addr, chunk) else {
                self.free_tx.push(base);
                return false;
            };
            // Copy the part of head and body that falls into [written, written + chunk).
            let mut at = 0;
            if written < head.len() {
                let h = &head[written..head.len().min(written + chunk)];
                frame[..h.len()].copy_from_slice(h);
                at = h.len();
            }
            let body_from = (written + at).saturating_sub(head.len());
            let body_len = chunk - at;
            frame[at..].copy_from_slice(&body[body_from..body_from + body_len]);
            written += chunk;
            let options = meta | if written < len { PKT_CONTD } else { 0 };
            // Room was checked by `can_post`; a refused push cannot happen.
            self.tx.push(Desc { addr, len: chunk as u32, options });
        }
        true
    }

    /// Publishes the posted packets and, if the kernel wants it, kicks it to send them. In copy
    /// mode the kernel sends during the kick, a budget of frames per call (32), so this kicks
    /// until the ring is empty or memory runs short. Frames still on the ring afterwards
    /// ([`tx_in_flight`](Self::tx_in_flight)) go out on the next flush: callers that stop sending
    /// must flush again (the backend's `wait` does).
    pub fn flush(&mut self) -> io::Result<()> {
        self.tx.submit();
        if !self.tx.needs_wakeup() {
            return Ok(());
        }
        let mut rounds = self.tx.in_flight() / 16 + 4;
        while rounds > 0 {
            rounds -= 1;
            match sys::kick_tx(self.fd.as_fd()) {
                Ok(()) => {}
                // EAGAIN: the budget of one call ran out with more to send.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                // EBUSY: the device dropped one frame (a full queue; the frame is completed, not
                // sent), as a full NIC queue would. The rest of the ring is still to be sent.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => self.tx_device_drops += 1,
                // Memory is short: try again on the next flush.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => break,
                Err(e) => return Err(e),
            }
            if self.zero_copy || self.tx.in_flight() == 0 {
                break;
            }
        }
        Ok(())
    }

    /// Packets' frames posted on the TX ring that the kernel has not taken yet.
    pub fn tx_in_flight(&self) -> u32 {
        self.tx.in_flight()
    }

    /// Frames the device dropped on transmission so far.
    pub fn tx_device_drops(&self) -> u64 {
        self.tx_device_drops
    }

    /// Frames free for sending.
    pub fn free_tx_frames(&self) -> usize {
        self.free_tx.len()
    }
}
