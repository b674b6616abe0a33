//! Read-ahead that follows the access pattern: a few *streams* (like the kernel's per-file
//! read-ahead state), each the faults of one reader that follow a stride (1: sequential, or a
//! constant step of up to [`MAX_STRIDE`] pages either way).
//!
//! With a window that can grow (`max > base`), a fault reads ahead only where a pattern holds:
//!
//! * a fault that continues no stream starts one and asks for nothing more (a random reader, or
//!   the first fault of a run, costs exactly its page);
//! * a fault one stride on from a stream's last fault, or on a page of the window asked for ahead
//!   of it, or just past that window, continues the stream; once a stream has `trust` faults in a
//!   row on its stride, the fault asks for `base` pages ahead along the stride;
//! * a later fault of the stream that shows the read-ahead in use doubles the window, up to `max`,
//!   so a sequential reader soon has `max` pages in flight ahead of it. In use: the fault skipped
//!   pages the stream had asked for (they were hits), or the stream went on faulting one stride at
//!   a time for two faults more than it needed to start (a reader that overtakes the arrivals,
//!   which a short run's last pages cannot be told from); any other fault only tops the window up
//!   once less than half of it is left ahead. Every fault of the stream asks again for the whole
//!   window ahead of it, so a page of it whose request or answer was lost is asked for at once;
//! * `trust` adapts to what read-ahead earned: a stream whose read-ahead was in use makes it fall
//!   by one, to [`MIN_TRUST`]; a stream dropped (the longest unused of [`STREAMS`]) with its
//!   read-ahead never shown in use most likely read ahead for nothing, and makes it rise by one,
//!   to [`MAX_TRUST`]. Faults in short runs at random places (REAP
//!   measured runs of 2-3 pages) soon need more faults in a row than their runs have, and read
//!   ahead nothing; a sequential reader keeps trust at its least.
//!
//! Why faults only: with the host's cache mapped by the kernel, a clone reading pages that have
//! arrived raises no event at all; the next fault is where it caught up with what is in flight (or
//! left the pattern), and that is all the evidence there is.
//!
//! The state is per session: the faults of all of a host's clones of the session, told apart by
//! their streams. With a fixed window (`max <= base`) every fault reads ahead `base` pages after
//! it, as before streams existed.

/// Streams tracked at once (clones on a host reading different places).
const STREAMS: usize = 8;
/// The largest stride followed, pages.
pub(super) const MAX_STRIDE: i64 = 64;
/// Faults in a row a pattern needs, at least, before read-ahead follows it.
pub(super) const MIN_TRUST: u32 = 2;
/// Faults in a row a pattern needs, at most.
pub(super) const MAX_TRUST: u32 = 16;
/// Faults in a row beyond `trust` that show a stream's read-ahead in use (see [`ReadAhead::on_fault`]).
const RUN_PROOF: u32 = 2;

#[derive(Debug, Clone, Copy)]
struct Stream {
    /// The stream's last fault.
    last: u32,
    /// Its step, pages (0: one fault so far, no stride yet).
    stride: i64,
    /// Faults in a row on the stride (1 for a new stream).
    run: u32,
    /// Pages asked for ahead of `last`, in strides (0: none).
    ahead: u32,
    /// Its read-ahead window, strides (0: not reading ahead yet).
    window: u32,
    /// Read-ahead was asked for and the stream has not come back to it yet.
    unproven: bool,
    /// When it was last used (a counter).
    used: u64,
}

impl Stream {
    /// Whether a fault on `page` continues this stream: one stride on from its last fault, or on a
    /// page of what it asked for ahead (the reader overtook the arrivals), or just past that.
    fn continues(&self, page: u32) -> bool {
        let delta = i64::from(page) - i64::from(self.last);
        if self.stride == 0 {
            return delta != 0 && delta.abs() <= MAX_STRIDE;
        }
        delta % self.stride == 0 && (1..=i64::from(self.ahead) + 1).contains(&(delta / self.stride))
    }
}

/// Pages to read ahead: `left` pages from `next`, `stride` apart, within `[0, pages)`.
#[derive(Debug, Clone)]
pub(super) struct Ahead {
    next: i64,
    stride: i64,
    left: u32,
    pages: u32,
}

impl Ahead {
    fn none() -> Ahead {
        Ahead { next: 0, stride: 1, left: 0, pages: 0 }
    }
}

impl Iterator for Ahead {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        if self.left == 0 || self.next < 0 || self.next >= i64::from(self.pages) {
            return None;
        }
        let page = self.next as u32;
        self.left -= 1;
        self.next += self.stride;
        Some(page)
    }
}

/// The read-ahead state of one session. See the module docs.
#[derive(Debug)]
pub(super) struct ReadAhead {
    streams: Vec<Stream>,
    clock: u64,
    trust: u32,
}

impl Default for ReadAhead {
    fn default() -> Self {
        ReadAhead { streams: Vec::new(), clock: 0, trust: MIN_TRUST }
    }
}

impl ReadAhead {
    /// A fault on `page` (not present): the pages to read ahead after it, with a base window of
    /// `base` pages growing to `max` while a pattern holds, within `pages`. The whole window ahead
    /// of the fault is returned each time, also what was asked for before: the receiver skips what
    /// is present or wanted, and a page of it whose request or answer was lost is asked again at
    /// once (without that, at 2% loss, the demo's clones faulted 3x as often).
    pub(super) fn on_fault(&mut self, page: u32, base: u32, max: u32, pages: u32) -> Ahead {
        if max <= base {
            // A fixed window after every fault.
            return Ahead { next: i64::from(page) + 1, stride: 1, left: base, pages };
        }
        self.clock += 1;
        let clock = self.clock;
        let trust = self.trust;
        let found = self.streams.iter_mut().filter(|s| s.continues(page)).max_by_key(|s| (s.stride != 0, s.used));
        let Some(s) = found else {
            tracing::trace!(page, trust, "read-ahead: a new stream");
            self.start_stream(Stream {
                last: page,
                stride: 0,
                run: 1,
                ahead: 0,
                window: 0,
                unproven: false,
                used: clock,
            });
            return Ahead::none();
        };
        if s.stride == 0 {
            s.stride = i64::from(page) - i64::from(s.last);
        }
        // How far ahead the stream had asked, counted from this fault.
        let steps = (i64::from(page) - i64::from(s.last)) / s.stride;
        let still_ahead = (i64::from(s.ahead) - steps).max(0) as u32;
        s.run = s.run.saturating_add(1);
        // Read-ahead served the reader: it went past a page asked for without faulting on it (a
        // hit), or it kept faulting one stride on for [`RUN_PROOF`] faults more than it took to
        // start reading ahead (a reader that overtakes the arrivals; a short run's next few pages
        // fault like that too, so one or two such faults prove nothing).
        let proven = s.unproven && (steps >= 2 || s.run >= trust + RUN_PROOF);
        if proven {
            s.unproven = false;
        }
        s.last = page;
        s.used = clock;
        let stride = s.stride;
        let ask = s.run >= trust && (s.window == 0 || proven || still_ahead < s.window / 2);
        s.ahead = still_ahead;
        if ask {
            s.window = match s.window {
                0 => base.max(1),
                w if proven => w.saturating_mul(2),
                w => w,
            }
            .min(max);
            s.ahead = s.window.max(still_ahead);
            s.unproven = true;
        }
        // The whole window ahead of the fault, asked again: the receiver skips what is here, on
        // its way or already wanted, and a page of it that was lost is asked for at once.
        let ahead = Ahead { next: i64::from(page) + stride, stride, left: s.ahead, pages };
        if proven {
            self.trust = self.trust.saturating_sub(1).max(MIN_TRUST);
        }
        tracing::trace!(page, steps, run = s.run, trust, proven, asked = ahead.left, window = s.window, "read-ahead");
        ahead
    }

    fn start_stream(&mut self, stream: Stream) {
        if self.streams.len() < STREAMS {
            self.streams.push(stream);
            return;
        }
        let Some(oldest) = self.streams.iter_mut().min_by_key(|s| s.used) else { return };
        if oldest.unproven {
            self.trust = (self.trust + 1).min(MAX_TRUST);
        }
        *oldest = stream;
    }

    /// Forgets every stream (a new epoch); what was learnt of the workload (the trust) stays.
    pub(super) fn clear(&mut self) {
        self.streams.clear();
    }

    /// Faults in a row a pattern needs now before read-ahead follows it.
    #[cfg(test)]
    fn trust(&self) -> u32 {
        self.trust
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGES: u32 = 100_000;

    fn ahead(ra: &mut ReadAhead, page: u32) -> Vec<u32> {
        ra.on_fault(page, 4, 256, PAGES).collect()
    }

    #[test]
    fn a_sequential_reader_reads_ahead_from_its_second_fault_and_grows_to_the_maximum() {
        let mut ra = ReadAhead::default();
        assert!(ahead(&mut ra, 100).is_empty(), "one fault is no pattern");
        assert_eq!(ahead(&mut ra, 101), (102..106).collect::<Vec<_>>());
        // The reader overtook the arrivals: the rest of the window is asked again, nothing more.
        assert_eq!(ahead(&mut ra, 102), (103..106).collect::<Vec<_>>());
        // It goes on overtaking them, page by page: read-ahead is in use, the window doubles.
        assert_eq!(ahead(&mut ra, 103), (104..112).collect::<Vec<_>>());
        // It skipped pages it had asked for (hits): doubled again.
        assert_eq!(ahead(&mut ra, 105), (106..122).collect::<Vec<_>>());
        // It read the whole window and faults just past it: doubled again.
        assert_eq!(ahead(&mut ra, 122), (123..155).collect::<Vec<_>>());
        let mut asked = 0;
        let mut page = 155;
        for _ in 0..12 {
            let got = ahead(&mut ra, page);
            asked = got.len();
            page = got.last().copied().unwrap_or(page) + 1;
        }
        assert_eq!(asked, 256, "the window stops at the maximum");
        assert_eq!(ra.trust(), MIN_TRUST);
    }

    #[test]
    fn strides_are_followed_both_ways() {
        let mut ra = ReadAhead::default();
        assert!(ahead(&mut ra, 5000).is_empty());
        assert_eq!(ahead(&mut ra, 5008), vec![5016, 5024, 5032, 5040]);
        assert_eq!(ahead(&mut ra, 5048), (1..=8).map(|k| 5048 + 8 * k).collect::<Vec<_>>());
        let mut down = ReadAhead::default();
        assert!(ahead(&mut down, 900).is_empty());
        assert_eq!(ahead(&mut down, 899), vec![898, 897, 896, 895]);
        // Never below page 0 or past the image.
        let mut low = ReadAhead::default();
        ahead(&mut low, 2);
        assert_eq!(ahead(&mut low, 1), vec![0]);
        let mut high = ReadAhead::default();
        ahead(&mut high, PAGES - 3);
        assert_eq!(ahead(&mut high, PAGES - 2), vec![PAGES - 1]);
    }

    /// Touches 2000 runs of 1 to 4 pages at random places; each page of a run that read-ahead
    /// asked for faults too when `in_flight` (the reader overtakes the arrivals), else it is a hit.
    /// Returns the pages touched and the pages read ahead past the runs' ends.
    fn random_runs(ra: &mut ReadAhead, in_flight: bool) -> (u64, u64) {
        let mut state = 7u64;
        let (mut touched, mut extra) = (0u64, 0u64);
        for _ in 0..2000 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let start = ((state >> 33) % u64::from(PAGES - 8)) as u32;
            let len = 1 + ((state >> 20) % 4) as u32;
            let mut asked: Vec<u32> = Vec::new();
            for p in start..start + len {
                touched += 1;
                if in_flight || !asked.contains(&p) {
                    asked.extend(ahead(ra, p));
                }
            }
            asked.sort_unstable();
            asked.dedup();
            extra += asked.iter().filter(|&&p| p >= start + len).count() as u64;
        }
        (touched, extra)
    }

    #[test]
    fn random_runs_soon_read_ahead_nothing_and_a_sequential_reader_wins_trust_back() {
        let mut overtaken = ReadAhead::default();
        let (touched, extra) = random_runs(&mut overtaken, true);
        assert!(extra * 50 < touched, "overtaken: {extra} pages read ahead for nothing, {touched} touched");
        let mut ra = ReadAhead::default();
        let (touched, extra) = random_runs(&mut ra, false);
        assert!(extra * 100 < touched, "{extra} pages read ahead for nothing, {touched} touched");
        assert!(ra.trust() > 4, "runs of at most 4 faults earn no read-ahead (trust {})", ra.trust());
        assert!(extra * 100 < touched, "{extra} pages read ahead for nothing, {touched} touched");
        // A sequential reader: its read-ahead is used, so trust falls back and the window grows.
        let mut page = 50_000;
        let mut last = Vec::new();
        for _ in 0..64 {
            let got = ahead(&mut ra, page);
            page = got.last().copied().map_or(page + 1, |p| p + 1);
            if !got.is_empty() {
                last = got;
            }
        }
        assert_eq!(ra.trust(), MIN_TRUST);
        assert_eq!(last.len(), 256);
    }

    #[test]
    fn a_fixed_window_reads_ahead_after_every_fault() {
        let mut ra = ReadAhead::default();
        for p in [5000u32, 90, 70_000, 123] {
            assert_eq!(ra.on_fault(p, 16, 16, PAGES).collect::<Vec<_>>(), (p + 1..p + 17).collect::<Vec<_>>());
        }
        assert_eq!(ra.on_fault(PAGES - 2, 16, 0, PAGES).collect::<Vec<_>>(), vec![PAGES - 1]);
        assert_eq!(ra.on_fault(7, 0, 0, PAGES).count(), 0, "read-ahead 0 asks for nothing more");
        ra.clear();
    }
}
