//! AF_XDP rings: single-producer, single-consumer queues of descriptors shared with the kernel.
//!
//! Each ring is a power-of-two array of entries plus three 32-bit words: the producer index, the
//! consumer index and flags. Indices count up forever and wrap at 2^32; an entry's slot is
//! `index & (size - 1)`, the number of entries waiting is `producer - consumer` (wrapping), and the
//! producer may write while `producer - consumer < size`. The side that writes entries publishes
//! them by storing the producer index with release ordering; the other side reads that index with
//! acquire ordering before reading the entries, and hands slots back by storing the consumer index.
//! Each side keeps cached copies of both indices and reads the other side's word only when its
//! cache says it has run out, as libxdp does.
//!
//! The application produces on the fill ring (empty frames for the kernel to receive into) and
//! the TX ring, and consumes the RX ring and the completion ring (frames the kernel finished
//! sending). [`Producer`] and [`Consumer`] are the two roles; both work over any memory described
//! by a [`RingMemory`], so the index arithmetic, wraparound and the need-wakeup flag are tested
//! below with plain heap memory playing both sides, no device needed (as s2n-quic's xdp crate does).

use std::io;
use std::marker::PhantomData;
use std::mem::size_of;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use super::sys::Mmap;

/// The `XDP_RING_NEED_WAKEUP` bit of a ring's flags word.
pub const NEED_WAKEUP: u32 = 1;

/// Where one ring's words and entries are.
#[derive(Debug)]
pub struct RingMemory<T> {
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    entries: NonNull<T>,
    size: u32,
    /// The mapping the pointers point into, when the ring is the kernel's.
    _owner: Option<Mmap>,
}

// SAFETY: the pointers refer to shared memory that is valid for the life of the ring (see `new`)
// and accessed only through atomics (indices, flags) or through slots owned by this side by the
// ring protocol (entries). Moving the handle to another thread does not change who owns what.
unsafe impl<T: Send> Send for RingMemory<T> {}

impl<T: Copy> RingMemory<T> {
    /// Describes a ring of `size` entries.
    ///
    /// # Safety
    ///
    /// For as long as the returned value (and any ring made from it) exists: `producer`,
    /// `consumer` and `flags` point to valid, 4-byte aligned 32-bit words, only ever accessed
    /// atomically; `entries` points to `size` valid, aligned `T` slots; `size` is a nonzero power
    /// of two; and at most one [`Producer`] and one [`Consumer`] use the memory, each on its side
    /// of the protocol (the kernel counts as one of them).
    pub unsafe fn new(
        producer: NonNull<u32>,
        consumer: NonNull<u32>,
        flags: NonNull<u32>,
        entries: NonNull<T>,
        size: u32,
    ) -> RingMemory<T> {
        debug_assert!(size.is_power_of_two());
        RingMemory {
            producer: producer.cast(),
            consumer: consumer.cast(),
            flags: flags.cast(),
            entries,
            size,
            _owner: None,
        }
    }

    /// Maps ring `pgoff` (`XDP_PGOFF_RX_RING`, ...) of the XDP socket `fd`, laid out as `off`
    /// says, with `size` entries (the size set with `setsockopt` before).
    pub fn map(fd: BorrowedFd<'_>, off: &libc::xdp_ring_offset, size: u32, pgoff: u64) -> io::Result<RingMemory<T>> {
        let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
        if !size.is_power_of_two() {
            return Err(invalid());
        }
        let entries_end = (size as u64).checked_mul(size_of::<T>() as u64).and_then(|b| b.checked_add(off.desc));
        let len = usize::try_from(entries_end.ok_or_else(invalid)?).map_err(|_| invalid())?;
        let words_ok = [off.producer, off.consumer, off.flags].iter().all(|&o| o % 4 == 0 && o + 4 <= len as u64);
        if !words_ok || !off.desc.is_multiple_of(std::mem::align_of::<T>() as u64) {
            return Err(invalid());
        }
        let map = Mmap::ring(fd, len, pgoff)?;
        let base = map.ptr();
        // SAFETY: every offset was checked to lie inside the mapping, with the word and entry
        // alignment required (the mapping itself is page-aligned); the mapping lives in `_owner`
        // as long as the pointers; the kernel made the ring with `size` entries; and the words
        // are only accessed atomically (by us through this value, by the kernel with its own
        // atomics). The caller makes one producer or consumer from it, the kernel is the other.
        let mut mem = unsafe {
            let at = |o: u64| NonNull::new_unchecked(base.as_ptr().add(o as usize));
            RingMemory::new(
                at(off.producer).cast(),
                at(off.consumer).cast(),
                at(off.flags).cast(),
                at(off.desc).cast(),
                size,
            )
        };
        mem._owner = Some(map);
        Ok(mem)
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: valid and aligned for the ring's life (contract of `new`); `AtomicU32` has the
        // layout of `u32`, and the word is only accessed atomically.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { self.consumer.as_ref() }
    }

    fn flags(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { self.flags.as_ref() }
    }

    fn write(&self, index: u32, value: T) {
        let slot = (index & (self.size - 1)) as usize;
        // SAFETY: `slot < size`, so the pointer is inside the entry array (contract of `new`).
        // Only the producer calls this, for slots between the producer index and consumer + size,
        // which the consumer does not read until the producer index is published past them.
        unsafe { self.entries.as_ptr().add(slot).write_volatile(value) }
    }

    fn read(&self, index: u32) -> T {
        let slot = (index & (self.size - 1)) as usize;
        // SAFETY: `slot < size`, inside the entry array. Only the consumer calls this, for slots
        // between the consumer index and the producer index it loaded with acquire ordering, which
        // the producer wrote before publishing and does not touch until the consumer index passes.
        unsafe { self.entries.as_ptr().add(slot).read_volatile() }
    }
}

/// The producing side of a ring (the application's side of fill and TX).
#[derive(Debug)]
pub struct Producer<T> {
    mem: RingMemory<T>,
    /// Next index to write.
    cached_prod: u32,
    /// Last consumer index seen, plus `size`: the producer may write below it.
    cached_limit: u32,
    /// Entries reserved with `reserve` and not yet submitted.
    reserved: u32,
    _entries: PhantomData<T>,
}

impl<T: Copy> Producer<T> {
    /// The producer side of `mem`, starting from the indices found there.
    pub fn new(mem: RingMemory<T>) -> Producer<T> {
        let prod = mem.producer().load(Ordering::Relaxed);
        let cons = mem.consumer().load(Ordering::Acquire);
        let limit = cons.wrapping_add(mem.size);
        Producer { mem, cached_prod: prod, cached_limit: limit, reserved: 0, _entries: PhantomData }
    }

    /// Number of entries in the ring.
    pub fn size(&self) -> u32 {
        self.mem.size
    }

    /// Free slots, reading the consumer's index again only if fewer than `wanted` are known free.
    pub fn free(&mut self, wanted: u32) -> u32 {
        let known = |limit: u32, prod: u32, reserved: u32| limit.wrapping_sub(prod).saturating_sub(reserved);
        let mut free = known(self.cached_limit, self.cached_prod, self.reserved);
        if free < wanted {
            self.cached_limit = self.mem.consumer().load(Ordering::Acquire).wrapping_add(self.mem.size);
            free = known(self.cached_limit, self.cached_prod, self.reserved);
        }
        free
    }

    /// Writes `value` into the next free slot, to be published by [`submit`](Self::submit).
    /// Returns false (writing nothing) if the ring is full.
    pub fn push(&mut self, value: T) -> bool {
        if self.free(1) == 0 {
            return false;
        }
        self.mem.write(self.cached_prod.wrapping_add(self.reserved), value);
        self.reserved += 1;
        true
    }

    /// Entries pushed and not yet submitted.
    pub fn unsubmitted(&self) -> u32 {
        self.reserved
    }

    /// Publishes every pushed entry to the consumer.
    pub fn submit(&mut self) {
        if self.reserved == 0 {
            return;
        }
        self.cached_prod = self.cached_prod.wrapping_add(self.reserved);
        self.reserved = 0;
        self.mem.producer().store(self.cached_prod, Ordering::Release);
    }

    /// Published entries the consumer has not taken yet.
    pub fn in_flight(&self) -> u32 {
        self.cached_prod.wrapping_sub(self.mem.consumer().load(Ordering::Acquire))
    }

    /// True if the consumer (the kernel) asks to be woken up to process this ring.
    pub fn needs_wakeup(&self) -> bool {
        self.mem.flags().load(Ordering::Relaxed) & NEED_WAKEUP != 0
    }
}

/// The consuming side of a ring (the application's side of RX and completion).
#[derive(Debug)]
pub struct Consumer<T> {
    mem: RingMemory<T>,
    /// Next index to read.
    cached_cons: u32,
    /// Last producer index seen.
    cached_prod: u32,
    _entries: PhantomData<T>,
}

impl<T: Copy> Consumer<T> {
    /// The consumer side of `mem`, starting from the indices found there.
    pub fn new(mem: RingMemory<T>) -> Consumer<T> {
        let cons = mem.consumer().load(Ordering::Relaxed);
        let prod = mem.producer().load(Ordering::Acquire);
        Consumer { mem, cached_cons: cons, cached_prod: prod, _entries: PhantomData }
    }

    /// Entries ready to read (up to `max`), reading the producer's index again only if none are
    /// known to be ready.
    pub fn available(&mut self, max: u32) -> u32 {
        let mut ready = self.cached_prod.wrapping_sub(self.cached_cons);
        if ready == 0 {
            self.cached_prod = self.mem.producer().load(Ordering::Acquire);
            ready = self.cached_prod.wrapping_sub(self.cached_cons);
        }
        ready.min(max)
    }

    /// The `i`-th ready entry (0 = the oldest), if it is ready.
    pub fn get(&self, i: u32) -> Option<T> {
        (i < self.cached_prod.wrapping_sub(self.cached_cons)).then(|| self.mem.read(self.cached_cons.wrapping_add(i)))
    }

    /// Hands the `n` oldest ready entries' slots back to the producer (clamped to those ready).
    pub fn release(&mut self, n: u32) {
        let n = n.min(self.cached_prod.wrapping_sub(self.cached_cons));
        if n == 0 {
            return;
        }
        self.cached_cons = self.cached_cons.wrapping_add(n);
        self.mem.consumer().store(self.cached_cons, Ordering::Release);
    }

    /// True if the producer (the kernel) asks to be woken up.
    pub fn needs_wakeup(&self) -> bool {
        self.mem.flags().load(Ordering::Relaxed) & NEED_WAKEUP != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::UnsafeCell;

    /// A ring in ordinary memory, to hand out both sides of.
    struct TestRing<T> {
        words: Box<[UnsafeCell<u32>; 3]>,
        entries: Box<[UnsafeCell<T>]>,
    }

    impl<T: Copy + Default> TestRing<T> {
        fn new(size: u32, start: u32) -> TestRing<T> {
            TestRing {
                words: Box::new([UnsafeCell::new(start), UnsafeCell::new(start), UnsafeCell::new(0)]),
                entries: (0..size).map(|_| UnsafeCell::new(T::default())).collect(),
            }
        }

        fn memory(&self) -> RingMemory<T> {
            let ptr = |c: &UnsafeCell<u32>| NonNull::new(c.get()).expect("non-null");
            let entries = NonNull::new(self.entries.as_ptr() as *mut T).expect("non-null");
            // SAFETY: the words and entries live in `self`, which every test keeps alive longer than
            // the rings; the words are u32-aligned and only used atomically through the rings;
            // sizes are powers of two; each test makes one producer and one consumer.
            unsafe {
                RingMemory::new(
                    ptr(&self.words[0]),
                    ptr(&self.words[1]),
                    ptr(&self.words[2]),
                    entries,
                    self.entries.len() as u32,
                )
            }
        }

        fn set_flags(&self, v: u32) {
            // SAFETY: no ring method runs concurrently in these single-threaded tests.
            unsafe { *self.words[2].get() = v }
        }
    }

    fn pair(size: u32, start: u32) -> (TestRing<u64>, Producer<u64>, Consumer<u64>) {
        let ring = TestRing::new(size, start);
        let (p, c) = (Producer::new(ring.memory()), Consumer::new(ring.memory()));
        (ring, p, c)
    }

    #[test]
    fn fill_drain_and_refill() {
        let (_ring, mut p, mut c) = pair(8, 0);
        assert_eq!((p.size(), p.free(8), c.available(8)), (8, 8, 0));
        for v in 0..8 {
            assert!(p.push(v));
        }
        assert!(!p.push(99), "a full ring takes nothing");
        assert_eq!(c.available(8), 0, "nothing is visible before submit");
        p.submit();
        assert_eq!((p.in_flight(), c.available(100)), (8, 8));
        assert_eq!(c.available(3), 3);
        assert_eq!((c.get(0), c.get(7), c.get(8)), (Some(0), Some(7), None));
        c.release(5);
        assert_eq!(p.in_flight(), 3);
        assert_eq!(p.free(1), 5);
        for v in 8..13 {
            assert!(p.push(v));
        }
        p.submit();
        assert_eq!(c.available(100), 3, "the cache holds the 3 known entries until they are taken");
        let got: Vec<u64> = (0..3).filter_map(|i| c.get(i)).collect();
        assert_eq!(got, vec![5, 6, 7]);
        c.release(3);
        assert_eq!(c.available(100), 5);
        let got: Vec<u64> = (0..5).filter_map(|i| c.get(i)).collect();
        assert_eq!(got, vec![8, 9, 10, 11, 12]);
        c.release(100);
        assert_eq!((c.available(100), p.in_flight(), p.free(8)), (0, 0, 8));
    }

    #[test]
    fn indices_wrap_at_u32_max() {
        // Start just below the wrap: every step crosses it.
        let (_ring, mut p, mut c) = pair(4, u32::MAX - 5);
        let mut next = 0u64;
        let mut expect = 0u64;
        for round in 0..20 {
            let free = p.free(4);
            for _ in 0..free.min(3) {
                assert!(p.push(next));
                next += 1;
            }
            p.submit();
            let n = c.available(2 + round % 3);
            for i in 0..n {
                assert_eq!(c.get(i), Some(expect), "round {round}");
                expect += 1;
            }
            c.release(n);
        }
        assert!(next > 20 && expect > 10, "the test moved entries through the wrap");
    }

    #[test]
    fn unsubmitted_entries_count_against_free() {
        let (_ring, mut p, _c) = pair(4, 0);
        assert!(p.push(1) && p.push(2));
        assert_eq!((p.unsubmitted(), p.free(4)), (2, 2));
        p.submit();
        assert_eq!((p.unsubmitted(), p.free(4)), (0, 2));
        p.submit(); // nothing to do
        assert_eq!(p.in_flight(), 2);
    }

    #[test]
    fn need_wakeup_flag() {
        let (ring, p, c) = pair(4, 0);
        assert!(!p.needs_wakeup() && !c.needs_wakeup());
        ring.set_flags(NEED_WAKEUP);
        assert!(p.needs_wakeup() && c.needs_wakeup());
        ring.set_flags(2); // other bits are not the wakeup flag
        assert!(!p.needs_wakeup());
    }

    #[test]
    fn a_ring_picks_up_where_the_kernel_left_it() {
        let ring: TestRing<u64> = TestRing::new(8, 1000);
        let mut p = Producer::new(ring.memory());
        assert_eq!(p.free(8), 8);
        assert!(p.push(5));
        p.submit();
        let mut c = Consumer::new(ring.memory());
        assert_eq!((c.available(8), c.get(0)), (1, Some(5)));
    }

    #[test]
    fn producer_and_consumer_on_two_threads() {
        let ring: TestRing<u64> = TestRing::new(64, u32::MAX - 100);
        let (mut p, mut c) = (Producer::new(ring.memory()), Consumer::new(ring.memory()));
        const N: u64 = 20_000;
        std::thread::scope(|s| {
            s.spawn(move || {
                let mut v = 0;
                while v < N {
                    while v < N && p.push(v) {
                        v += 1;
                    }
                    p.submit();
                    // Full: let the consumer run (the machine may have fewer cores than threads).
                    std::thread::yield_now();
                }
            });
            let mut expect = 0;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while expect < N {
                assert!(std::time::Instant::now() < deadline, "stalled at {expect}");
                let n = c.available(32);
                for i in 0..n {
                    assert_eq!(c.get(i), Some(expect));
                    expect += 1;
                }
                c.release(n);
                if n == 0 {
                    std::thread::yield_now();
                }
            }
        });
    }
}
