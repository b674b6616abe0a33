//! Caller-owned batches of datagrams: [`RxBatch`] to receive into and [`TxBatch`] to send from.
//!
//! A batch is one contiguous allocation cut into `capacity` fixed-size *slots* of `slot_size` bytes
//! (slot `i` starts at byte `i * slot_size`), plus a small metadata record per slot: the datagram's
//! length and its addresses. It is allocated once and reused for every call, so moving packets never
//! allocates. The fixed stride is the shape both backends want: `recvmmsg`/`sendmmsg` point one
//! `iovec` at each slot, and an AF_XDP UMEM is the same thing (an array of equal frames), so a
//! frame can be copied into or out of a slot with one `memcpy`.
//!
//! * [`RxBatch`]: a backend's `recv_batch` clears it and appends what arrived. Read the datagrams
//!   with [`RxBatch::iter`] / [`RxBatch::get`]. A datagram longer than a slot is cut to the slot size
//!   and flagged [`RxDatagram::truncated`], as a socket does.
//! * [`TxBatch`]: the caller appends datagrams with [`TxBatch::push`] (copies) or
//!   [`TxBatch::push_with`] (encodes straight into the slot, no copy). A backend's `send_batch`
//!   sends the *pending* ones (from [`TxBatch::sent`] to [`TxBatch::len`]) and advances the `sent`
//!   cursor, so a send cut short by a full socket buffer resumes where it stopped.

use std::net::{Ipv4Addr, SocketAddrV4};

/// The largest total size of one batch's slots (1 GiB): a guard against a mistaken shape.
pub const MAX_BATCH_BYTES: usize = 1 << 30;

/// What went wrong building or filling a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// The requested capacity and slot size cannot make a batch.
    #[error("a batch of {capacity} slots of {slot_size} bytes is invalid: {reason}")]
    InvalidShape {
        /// Requested number of slots.
        capacity: usize,
        /// Requested bytes per slot.
        slot_size: usize,
        /// Why the shape was refused.
        reason: &'static str,
    },
    /// Every slot of the batch is already used.
    #[error("the batch is full: all {capacity} slots hold a datagram (send or clear it first)")]
    Full {
        /// Number of slots in the batch.
        capacity: usize,
    },
    /// The datagram is longer than a slot.
    #[error("a {len}-byte datagram does not fit in a {slot_size}-byte batch slot")]
    TooLarge {
        /// Length of the datagram.
        len: usize,
        /// Bytes per slot.
        slot_size: usize,
    },
    /// A writer given to [`TxBatch::push_with`] reported more bytes than the slot has.
    #[error("the writer reported {claimed} bytes written into a {slot_size}-byte batch slot")]
    WriterOverflow {
        /// Length the writer returned.
        claimed: usize,
        /// Bytes per slot.
        slot_size: usize,
    },
}

fn allocate(capacity: usize, slot_size: usize) -> Result<Box<[u8]>, BatchError> {
    let invalid = |reason| BatchError::InvalidShape { capacity, slot_size, reason };
    if capacity == 0 {
        return Err(invalid("a batch needs at least one slot"));
    }
    if slot_size == 0 {
        return Err(invalid("slots must be at least one byte"));
    }
    match capacity.checked_mul(slot_size) {
        Some(total) if total <= MAX_BATCH_BYTES => Ok(vec![0u8; total].into_boxed_slice()),
        _ => Err(invalid("the slots would take more than 1 GiB")),
    }
}

const UNSPECIFIED: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);

/// Metadata of one received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RxMeta {
    len: usize,
    source: SocketAddrV4,
    destination: SocketAddrV4,
    truncated: bool,
}

const EMPTY_RX: RxMeta = RxMeta { len: 0, source: UNSPECIFIED, destination: UNSPECIFIED, truncated: false };

/// One received datagram, borrowed from an [`RxBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxDatagram<'a> {
    /// The bytes received (at most the batch's slot size).
    pub payload: &'a [u8],
    /// Address and port of the sender.
    pub source: SocketAddrV4,
    /// Address and port the datagram was sent to: the multicast group for group traffic, this
    /// host's address for unicast. Backends without that information (see
    /// [`Capabilities::rx_destination`](crate::Capabilities::rx_destination)) report their bound address.
    pub destination: SocketAddrV4,
    /// True if the datagram was longer than a slot and its tail was cut off.
    pub truncated: bool,
}

/// A caller-owned batch of slots that a backend receives datagrams into. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct RxBatch {
    storage: Box<[u8]>,
    slot_size: usize,
    meta: Box<[RxMeta]>,
    len: usize,
}

impl RxBatch {
    /// A batch of `capacity` slots of `slot_size` bytes each (one allocation, zeroed).
    ///
    /// Size slots for the largest datagram expected (the link MTU less 28 bytes of IP and UDP
    /// headers, e.g. 1472 or 8972); larger ones arrive truncated.
    pub fn new(capacity: usize, slot_size: usize) -> Result<RxBatch, BatchError> {
        let storage = allocate(capacity, slot_size)?;
        Ok(RxBatch { storage, slot_size, meta: vec![EMPTY_RX; capacity].into_boxed_slice(), len: 0 })
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.meta.len()
    }

    /// Bytes per slot: the longest datagram kept whole.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Number of datagrams held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if no datagram is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True if every slot holds a datagram.
    pub fn is_full(&self) -> bool {
        self.len == self.capacity()
    }

    /// Forgets every datagram (the slots keep their bytes; nothing is freed).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// The `index`-th datagram received, if there is one.
    pub fn get(&self, index: usize) -> Option<RxDatagram<'_>> {
        if index >= self.len {
            return None;
        }
        let m = self.meta[index];
        let start = index * self.slot_size;
        Some(RxDatagram {
            payload: &self.storage[start..start + m.len],
            source: m.source,
            destination: m.destination,
            truncated: m.truncated,
        })
    }

    /// The `index`-th datagram's bytes, writable (for decrypting or decoding in place).
    pub fn payload_mut(&mut self, index: usize) -> Option<&mut [u8]> {
        if index >= self.len {
            return None;
        }
        let start = index * self.slot_size;
        Some(&mut self.storage[start..start + self.meta[index].len])
    }

    /// The datagrams held, in order of arrival.
    pub fn iter(&self) -> RxIter<'_> {
        RxIter { batch: self, next: 0 }
    }

    /// Appends a datagram by copying `payload` into the next free slot; a payload longer than a
    /// slot is cut to the slot size and flagged truncated, as a socket does. For backends that
    /// receive into their own memory (an AF_XDP UMEM, a simulator's queue).
    pub fn push(&mut self, payload: &[u8], source: SocketAddrV4, destination: SocketAddrV4) -> Result<(), BatchError> {
        if self.is_full() {
            return Err(BatchError::Full { capacity: self.capacity() });
        }
        let kept = payload.len().min(self.slot_size);
        let start = self.len * self.slot_size;
        self.storage[start..start + kept].copy_from_slice(&payload[..kept]);
        self.commit(kept, source, destination, payload.len() > kept);
        Ok(())
    }

    /// The storage of every slot, for a backend to point its receive descriptors at. Slot `i` is
    /// `[i * slot_size, (i + 1) * slot_size)`; fill slots from index [`len`](Self::len) on, then
    /// [`commit`](Self::commit) each.
    pub(crate) fn storage_mut(&mut self) -> &mut [u8] {
        &mut self.storage
    }

    /// Records that the slot at index `len` now holds a datagram of `len` bytes.
    pub(crate) fn commit(&mut self, len: usize, source: SocketAddrV4, destination: SocketAddrV4, truncated: bool) {
        debug_assert!(self.len < self.capacity() && len <= self.slot_size);
        self.meta[self.len] = RxMeta { len: len.min(self.slot_size), source, destination, truncated };
        self.len += 1;
    }
}

impl<'a> IntoIterator for &'a RxBatch {
    type Item = RxDatagram<'a>;
    type IntoIter = RxIter<'a>;
    fn into_iter(self) -> RxIter<'a> {
        self.iter()
    }
}

/// Iterator over the datagrams of an [`RxBatch`], from [`RxBatch::iter`].
#[derive(Debug, Clone)]
pub struct RxIter<'a> {
    batch: &'a RxBatch,
    next: usize,
}

impl<'a> Iterator for RxIter<'a> {
    type Item = RxDatagram<'a>;
    fn next(&mut self) -> Option<RxDatagram<'a>> {
        let d = self.batch.get(self.next)?;
        self.next += 1;
        Some(d)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.batch.len.saturating_sub(self.next);
        (n, Some(n))
    }
}

impl ExactSizeIterator for RxIter<'_> {}

/// Metadata of one datagram to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TxMeta {
    len: usize,
    destination: SocketAddrV4,
}

const EMPTY_TX: TxMeta = TxMeta { len: 0, destination: UNSPECIFIED };

/// One datagram to send, borrowed from a [`TxBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxDatagram<'a> {
    /// The bytes to send.
    pub payload: &'a [u8],
    /// Where to: a unicast address and port, or a multicast group and port.
    pub destination: SocketAddrV4,
}

/// A caller-owned batch of datagrams to send. See the [module docs](self).
///
/// Datagrams `0..sent()` have been handed to the network, `sent()..len()` are pending. A backend's
/// `send_batch` advances `sent`; [`clear`](Self::clear) empties the batch for reuse, and
/// [`compact`](Self::compact) drops the sent ones while keeping the pending ones.
#[derive(Debug, Clone)]
pub struct TxBatch {
    storage: Box<[u8]>,
    slot_size: usize,
    meta: Box<[TxMeta]>,
    len: usize,
    sent: usize,
}

impl TxBatch {
    /// A batch of `capacity` slots of `slot_size` bytes each (one allocation, zeroed).
    pub fn new(capacity: usize, slot_size: usize) -> Result<TxBatch, BatchError> {
        let storage = allocate(capacity, slot_size)?;
        Ok(TxBatch { storage, slot_size, meta: vec![EMPTY_TX; capacity].into_boxed_slice(), len: 0, sent: 0 })
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.meta.len()
    }

    /// Bytes per slot: the longest datagram that can be queued.
    pub fn slot_size(&self) -> usize {
        self.slot_size
    }

    /// Number of datagrams queued, sent or not.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if no datagram is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True if every slot holds a datagram.
    pub fn is_full(&self) -> bool {
        self.len == self.capacity()
    }

    /// Number of datagrams already sent (the index of the first pending one).
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// Number of datagrams still to send.
    pub fn pending(&self) -> usize {
        self.len - self.sent
    }

    /// True if every queued datagram has been sent (also when the batch is empty).
    pub fn is_sent(&self) -> bool {
        self.sent == self.len
    }

    /// Empties the batch for reuse (nothing is freed).
    pub fn clear(&mut self) {
        self.len = 0;
        self.sent = 0;
    }

    /// Queues a copy of `payload` for `destination`; returns its index.
    pub fn push(&mut self, destination: SocketAddrV4, payload: &[u8]) -> Result<usize, BatchError> {
        if self.is_full() {
            return Err(BatchError::Full { capacity: self.capacity() });
        }
        if payload.len() > self.slot_size {
            return Err(BatchError::TooLarge { len: payload.len(), slot_size: self.slot_size });
        }
        let start = self.len * self.slot_size;
        self.storage[start..start + payload.len()].copy_from_slice(payload);
        self.meta[self.len] = TxMeta { len: payload.len(), destination };
        self.len += 1;
        Ok(self.len - 1)
    }

    /// Queues a datagram for `destination` by letting `write` encode it straight into the next
    /// free slot (all `slot_size` bytes, holding whatever an earlier datagram left). `write` returns
    /// the length it wrote, or `None` to queue nothing. Returns the new datagram's index, or `None`
    /// if `write` declined.
    pub fn push_with<F>(&mut self, destination: SocketAddrV4, write: F) -> Result<Option<usize>, BatchError>
    where
        F: FnOnce(&mut [u8]) -> Option<usize>,
    {
        self.push_addressed(|buf| write(buf).map(|len| (destination, len)))
    }

    /// As [`TxBatch::push_with`], where `write` also says where the datagram goes (an endpoint of
    /// many sessions knows that only once it has chosen what to send).
    pub fn push_addressed<F>(&mut self, write: F) -> Result<Option<usize>, BatchError>
    where
        F: FnOnce(&mut [u8]) -> Option<(SocketAddrV4, usize)>,
    {
        if self.is_full() {
            return Err(BatchError::Full { capacity: self.capacity() });
        }
        let start = self.len * self.slot_size;
        let Some((destination, len)) = write(&mut self.storage[start..start + self.slot_size]) else {
            return Ok(None);
        };
        if len > self.slot_size {
            return Err(BatchError::WriterOverflow { claimed: len, slot_size: self.slot_size });
        }
        self.meta[self.len] = TxMeta { len, destination };
        self.len += 1;
        Ok(Some(self.len - 1))
    }

    /// The `index`-th datagram queued (sent or not), if there is one.
    pub fn get(&self, index: usize) -> Option<TxDatagram<'_>> {
        if index >= self.len {
            return None;
        }
        let m = self.meta[index];
        let start = index * self.slot_size;
        Some(TxDatagram { payload: &self.storage[start..start + m.len], destination: m.destination })
    }

    /// The datagrams still to send, in order.
    pub fn pending_iter(&self) -> TxIter<'_> {
        TxIter { batch: self, next: self.sent }
    }

    /// Marks `count` more pending datagrams as sent (clamped to the number pending). Backends
    /// call this; a caller may too, to drop pending datagrams without sending them.
    pub fn mark_sent(&mut self, count: usize) {
        self.sent = (self.sent + count).min(self.len);
    }

    /// Marks every queued datagram pending again, to send the same batch once more (to another
    /// destination set, or as a repeat) without refilling it.
    pub fn rewind(&mut self) {
        self.sent = 0;
    }

    /// Drops the sent datagrams and moves the pending ones to the front, making room for more.
    pub fn compact(&mut self) {
        if self.sent == 0 {
            return;
        }
        let (from, to) = (self.sent * self.slot_size, self.len * self.slot_size);
        self.storage.copy_within(from..to, 0);
        self.meta.copy_within(self.sent..self.len, 0);
        self.len -= self.sent;
        self.sent = 0;
    }
}

/// Iterator over the pending datagrams of a [`TxBatch`], from [`TxBatch::pending_iter`].
#[derive(Debug, Clone)]
pub struct TxIter<'a> {
    batch: &'a TxBatch,
    next: usize,
}

impl<'a> Iterator for TxIter<'a> {
    type Item = TxDatagram<'a>;
    fn next(&mut self) -> Option<TxDatagram<'a>> {
        let d = self.batch.get(self.next)?;
        self.next += 1;
        Some(d)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.batch.len.saturating_sub(self.next);
        (n, Some(n))
    }
}

impl ExactSizeIterator for TxIter<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, last), port)
    }

    #[test]
    fn shapes_are_checked() {
        let e = RxBatch::new(0, 1500).expect_err("must be refused");
        assert_eq!(e.to_string(), "a batch of 0 slots of 1500 bytes is invalid: a batch needs at least one slot");
        assert!(matches!(TxBatch::new(4, 0), Err(BatchError::InvalidShape { .. })));
        let e = TxBatch::new(usize::MAX, 2).expect_err("must be refused");
        assert!(e.to_string().contains("more than 1 GiB"), "{e}");
        let b = RxBatch::new(8, 100).expect("batch");
        assert_eq!((b.capacity(), b.slot_size(), b.len(), b.is_empty(), b.is_full()), (8, 100, 0, true, false));
    }

    #[test]
    fn tx_push_get_and_limits() {
        let mut b = TxBatch::new(3, 4).expect("batch");
        assert_eq!(b.push(addr(1, 10), b"ab").expect("push"), 0);
        assert_eq!(b.push(addr(2, 20), b"").expect("push empty datagram"), 1);
        let e = b.push(addr(3, 30), b"12345").expect_err("must be refused");
        assert_eq!(e, BatchError::TooLarge { len: 5, slot_size: 4 });
        assert_eq!(e.to_string(), "a 5-byte datagram does not fit in a 4-byte batch slot");
        assert_eq!(b.push(addr(3, 30), b"wxyz").expect("push full slot"), 2);
        assert!(b.is_full());
        assert_eq!(b.push(addr(4, 40), b"x").expect_err("must be refused"), BatchError::Full { capacity: 3 });
        assert_eq!(b.get(0), Some(TxDatagram { payload: b"ab", destination: addr(1, 10) }));
        assert_eq!(b.get(1).map(|d| d.payload.len()), Some(0));
        assert_eq!(b.get(2).map(|d| d.payload), Some(&b"wxyz"[..]));
        assert_eq!(b.get(3), None);
    }

    #[test]
    fn tx_push_with_writes_in_place() {
        let mut b = TxBatch::new(2, 8).expect("batch");
        let i = b
            .push_with(addr(1, 1), |slot| {
                assert_eq!(slot.len(), 8);
                slot[..3].copy_from_slice(b"abc");
                Some(3)
            })
            .expect("push_with");
        assert_eq!(i, Some(0));
        assert_eq!(b.push_with(addr(1, 1), |_| None).expect("declined"), None);
        assert_eq!(b.len(), 1);
        let e = b.push_with(addr(1, 1), |_| Some(9)).expect_err("must be refused");
        assert_eq!(e, BatchError::WriterOverflow { claimed: 9, slot_size: 8 });
        assert_eq!(b.len(), 1);
        assert_eq!(b.get(0).map(|d| d.payload), Some(&b"abc"[..]));
    }

    #[test]
    fn tx_cursor_and_compact() {
        let mut b = TxBatch::new(4, 2).expect("batch");
        assert!(b.is_sent(), "an empty batch has nothing pending");
        for (i, p) in [b"a0", b"a1", b"a2"].iter().enumerate() {
            b.push(addr(i as u8 + 1, 9), &p[..]).expect("push");
        }
        assert_eq!((b.sent(), b.pending()), (0, 3));
        b.mark_sent(2);
        assert_eq!((b.sent(), b.pending(), b.is_sent()), (2, 1, false));
        let pending: Vec<_> = b.pending_iter().map(|d| d.payload.to_vec()).collect();
        assert_eq!(pending, vec![b"a2".to_vec()]);
        assert_eq!(b.pending_iter().len(), 1);
        b.compact();
        assert_eq!((b.len(), b.sent(), b.pending()), (1, 0, 1));
        assert_eq!(b.get(0), Some(TxDatagram { payload: b"a2", destination: addr(3, 9) }));
        b.push(addr(4, 9), b"a3").expect("room after compact");
        b.mark_sent(100);
        assert_eq!((b.sent(), b.is_sent()), (2, true), "mark_sent clamps to the queued count");
        b.rewind();
        assert_eq!((b.len(), b.sent(), b.pending()), (2, 0, 2));
        b.clear();
        assert_eq!((b.len(), b.sent(), b.is_empty()), (0, 0, true));
    }

    #[test]
    fn rx_push_iter_truncate_and_clear() {
        let mut b = RxBatch::new(3, 4).expect("batch");
        let (src, dst) = (addr(1, 1000), SocketAddrV4::new(Ipv4Addr::new(239, 1, 2, 3), 7000));
        b.push(b"abc", src, dst).expect("push");
        b.push(b"123456", src, dst).expect("push long");
        let got: Vec<_> = b.iter().collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], RxDatagram { payload: b"abc", source: src, destination: dst, truncated: false });
        assert_eq!(got[1].payload, b"1234");
        assert!(got[1].truncated);
        assert_eq!(b.iter().len(), 2);
        if let Some(p) = b.payload_mut(0) {
            p[0] = b'X';
        }
        assert_eq!(b.get(0).map(|d| d.payload), Some(&b"Xbc"[..]));
        assert_eq!(b.payload_mut(2), None);
        b.push(b"", src, dst).expect("push empty");
        assert!(b.is_full());
        assert_eq!(b.push(b"x", src, dst).expect_err("must be refused"), BatchError::Full { capacity: 3 });
        assert_eq!((&b).into_iter().count(), 3);
        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.get(0), None);
        assert_eq!(b.iter().count(), 0);
    }

    #[test]
    fn rx_commit_records_backend_fills() {
        let mut b = RxBatch::new(2, 8).expect("batch");
        b.storage_mut()[8..11].copy_from_slice(b"xyz");
        b.commit(0, addr(1, 1), addr(2, 2), false);
        b.commit(3, addr(3, 3), addr(4, 4), false);
        assert_eq!(b.get(0).map(|d| d.payload.len()), Some(0));
        assert_eq!(b.get(1).map(|d| (d.payload, d.source)), Some((&b"xyz"[..], addr(3, 3))));
    }
}
