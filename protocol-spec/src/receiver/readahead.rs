//! Read-ahead that follows sequential faults: a few *streams* (like the kernel's per-file
//! read-ahead state), each the window of pages last asked for after a fault. A fault inside a
//! stream's window (or just past it) is the clone reading on: the window doubles, up to a maximum,
//! and the pages up to the new window's end are asked for, so a sequential reader soon has the
//! maximum in flight ahead of it and the transfer runs at the network's speed instead of one round
//! trip per window. A fault anywhere else starts a stream with the base window (the old fixed
//! read-ahead), replacing the stream used longest ago.
//!
//! Why faults only: with the host's cache mapped by the kernel, a clone reading pages that have
//! arrived raises no event at all; the next fault is where it caught up with what is in flight,
//! and that is where the window must grow.

/// Streams tracked at once (clones on a host reading different places).
const STREAMS: usize = 8;

#[derive(Debug, Clone, Copy)]
struct Stream {
    /// First page of the window last asked for.
    start: u32,
    /// One past its last page.
    end: u32,
    /// Its length.
    window: u32,
    /// When it was last used (a counter).
    used: u64,
}

/// The read-ahead state of one session. See the module docs.
#[derive(Debug, Default)]
pub(super) struct ReadAhead {
    streams: Vec<Stream>,
    clock: u64,
}

impl ReadAhead {
    /// A fault on `page` (not present): the pages to read ahead after it, `[page + 1, end)`, with a
    /// base window of `base` pages growing to `max` for a sequential reader, within `pages`.
    pub(super) fn on_fault(&mut self, page: u32, base: u32, max: u32, pages: u32) -> std::ops::Range<u32> {
        self.clock += 1;
        let clock = self.clock;
        let max = max.max(base);
        let from = page.saturating_add(1);
        if max == 0 {
            // No read-ahead at all.
            return from..from;
        }
        let found = self.streams.iter_mut().find(|s| page >= s.start && page <= s.end);
        let window = match found {
            Some(s) => {
                s.window = s.window.saturating_mul(2).clamp(1, max);
                s.start = page;
                s.end = from.saturating_add(s.window).min(pages).max(s.end);
                s.used = clock;
                return from.min(s.end)..s.end;
            }
            None => base,
        };
        let stream =
            Stream { start: page, end: from.saturating_add(window).min(pages), window: window.max(1), used: clock };
        if self.streams.len() < STREAMS {
            self.streams.push(stream);
        } else if let Some(oldest) = self.streams.iter_mut().min_by_key(|s| s.used) {
            *oldest = stream;
        }
        from.min(stream.end)..stream.end
    }

    /// Forgets every stream (a new epoch).
    pub(super) fn clear(&mut self) {
        self.streams.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sequential_reader_grows_its_window_to_the_maximum() {
        let mut ra = ReadAhead::default();
        assert_eq!(ra.on_fault(100, 16, 256, 100_000), 101..117);
        // The reader caught up inside the window: it doubles, and reaches past the old end.
        assert_eq!(ra.on_fault(101, 16, 256, 100_000), 102..134);
        assert_eq!(ra.on_fault(117, 16, 256, 100_000), 118..182);
        let mut last = 0..0;
        for page in 134..144 {
            last = ra.on_fault(page, 16, 256, 100_000);
        }
        assert_eq!(last.end - last.start, 256, "the window stops at the maximum");
    }

    #[test]
    fn scattered_faults_keep_the_base_window_and_the_image_bounds_it() {
        let mut ra = ReadAhead::default();
        for (i, p) in [5000u32, 90, 70_000, 123, 40_000, 9, 61_000, 33_000, 2000, 15_000].iter().enumerate() {
            assert_eq!(ra.on_fault(*p, 16, 256, 100_000), p + 1..p + 17, "fault {i}");
        }
        assert_eq!(ra.on_fault(99_995, 16, 256, 100_000), 99_996..100_000);
        assert_eq!(ra.on_fault(99_999, 16, 256, 100_000), 100_000..100_000);
        ra.clear();
        for p in [99_997, 99_998, 99_999] {
            assert!(ra.on_fault(p, 0, 0, 100_000).is_empty(), "read-ahead 0 asks for nothing more");
        }
    }
}
