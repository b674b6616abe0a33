//! Following the server's stream: which positions arrived, which FEC blocks they form, what parity
//! rebuilds, and what to NAK.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::fec;
use crate::wire::{NakEntry, NO_BLOCK, NO_STREAM};
use crate::Time;

/// What the receiver knows of one block with positions still outstanding.
#[derive(Debug, Default)]
struct RxBlock {
    first_seq: u64,
    k: Option<u16>,
    /// Source bodies received, by index.
    bodies: BTreeMap<u8, Vec<u8>>,
    /// Parity symbols received, by index, with the code's total.
    parity: BTreeMap<u16, Vec<u8>>,
    parity_total: u16,
    /// One past the highest parity index seen.
    parity_seen: u16,
    /// When this block was last NAKed.
    last_nak: Option<Time>,
}

/// The outcome of taking a Data packet or a parity symbol.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Taken {
    /// New: process it.
    New,
    /// New, and it filled a position already counted missing (it came late): process it.
    Late,
    /// Seen before, or from before this receiver's start: ignore it.
    Duplicate,
}

/// Positions and blocks of the stream as this receiver sees them.
#[derive(Debug, Default)]
pub(super) struct Stream {
    /// The first position followed (None: not yet following).
    start: Option<u64>,
    /// Every position below `base` is done (received, rebuilt, or given up).
    base: u64,
    /// Received flags for `base ..`.
    received: VecDeque<bool>,
    blocks: BTreeMap<u32, RxBlock>,
    /// Loss estimate: positions seen missing vs. all positions, smoothed.
    loss: f64,
    samples: u64,
    /// Of `samples`, positions found missing (congestion feedback counts them) ...
    lost_samples: u64,
    /// ... and Data packets that later filled such a position (reordered, or sent again).
    late: u64,
    /// When range entries were last NAKed.
    last_range_nak: Option<Time>,
    /// Positions in `received` still missing.
    missing: usize,
    /// The newest block seen (it may be complete and forgotten already).
    newest_block: Option<u32>,
}

/// Positions this far behind the newest one are given up rather than tracked forever.
const MAX_TRACKED: usize = 1 << 20;

impl Stream {
    /// The position the receiver started following at, or `NO_STREAM`.
    pub fn start(&self) -> u64 {
        self.start.unwrap_or(NO_STREAM)
    }

    /// Starts following at `seq` if not following yet.
    pub fn begin(&mut self, seq: u64) {
        if self.start.is_none() {
            self.start = Some(seq);
            self.base = seq;
        }
    }

    /// Forgets everything (the server restarted).
    pub fn reset(&mut self) {
        *self = Stream::default();
    }

    /// One past the highest position known to exist.
    pub fn highest(&self) -> u64 {
        self.base + self.received.len() as u64
    }

    /// Every position below this one is done.
    pub fn received_through(&self) -> u64 {
        self.base
    }

    /// Recent loss rate in parts per million.
    pub fn loss_ppm(&self) -> u32 {
        (self.loss * 1e6) as u32
    }

    /// Positions found missing so far, and Data packets that later filled one: congestion
    /// feedback counts as lost what the second has not made up for.
    pub fn loss_counts(&self) -> (u64, u64) {
        (self.lost_samples, self.late)
    }

    fn sample(&mut self, lost: bool) {
        self.samples += 1;
        self.lost_samples += u64::from(lost);
        let alpha = (1.0 / self.samples as f64).max(1.0 / 512.0);
        self.loss += alpha * (f64::from(u8::from(lost)) - self.loss);
    }

    /// Learns that positions below `end` exist (from a later packet or a heartbeat); positions not
    /// seen so far count as missing. Returns how many became missing.
    pub fn extend_to(&mut self, end: u64) -> u64 {
        if self.start.is_none() {
            return 0;
        }
        let before = self.highest();
        let mut missing = 0;
        while self.highest() < end {
            self.received.push_back(false);
            missing += 1;
        }
        self.missing += missing as usize;
        for _ in 0..missing {
            self.sample(true);
        }
        if self.received.len() > MAX_TRACKED {
            let drop = self.received.len() - MAX_TRACKED;
            self.give_up_below(self.base + drop as u64);
        }
        let _ = before;
        missing
    }

    /// Records Data position `seq` of block `block` at `index` (`last`: it ends the block).
    /// The body is kept while the block might need rebuilding.
    pub fn take_data(&mut self, seq: u64, block: u32, index: u8, last: bool, body: &[u8]) -> Taken {
        self.begin(seq);
        if seq < self.base {
            return Taken::Duplicate;
        }
        let end = seq + 1;
        let mut taken = Taken::New;
        if end > self.highest() {
            // Positions between the old highest and seq are missing (the samples count them).
            let gap = seq - self.highest();
            self.extend_to(seq);
            let _ = gap;
            self.received.push_back(true);
            self.sample(false);
        } else {
            let slot = &mut self.received[(seq - self.base) as usize];
            if *slot {
                return Taken::Duplicate;
            }
            *slot = true;
            self.missing -= 1;
            self.late += 1;
            taken = Taken::Late;
        }
        let first_seq = seq - u64::from(index);
        self.newest_block = Some(self.newest_block.map_or(block, |n| n.max(block)));
        let b = self.blocks.entry(block).or_insert_with(|| RxBlock { first_seq, ..RxBlock::default() });
        b.first_seq = first_seq;
        if last {
            b.k = Some(u16::from(index) + 1);
        }
        b.bodies.insert(index, body.to_vec());
        // The block before, if it is still open, ends where this one starts.
        if let Some(prev) = block.checked_sub(1).and_then(|p| self.blocks.get_mut(&p)) {
            if prev.k.is_none() && first_seq > prev.first_seq {
                prev.k = u16::try_from(first_seq - prev.first_seq).ok();
            }
        }
        self.settle(block);
        self.advance();
        taken
    }

    /// Records a parity symbol. Returns the rebuilt `(position, body)`s when the block can now be
    /// decoded, or an error when decoding failed.
    #[allow(clippy::too_many_arguments)]
    pub fn take_parity(
        &mut self,
        first_seq: u64,
        block: u32,
        k: u16,
        index: u16,
        total: u16,
        symbol: &[u8],
    ) -> Result<Vec<(u64, Vec<u8>)>, fec::FecError> {
        if self.start.is_none() || first_seq + u64::from(k) <= self.base || index >= total {
            return Ok(Vec::new());
        }
        let end = first_seq + u64::from(k);
        if (first_seq.max(self.base)..end).all(|s| self.is_received(s)) && end <= self.highest() {
            return Ok(Vec::new());
        }
        self.extend_to(end);
        self.newest_block = Some(self.newest_block.map_or(block, |n| n.max(block)));
        let b = self.blocks.entry(block).or_insert_with(|| RxBlock { first_seq, ..RxBlock::default() });
        b.first_seq = first_seq;
        b.k = Some(k);
        if b.parity_total != total {
            // A different code for the block: earlier parity cannot be mixed with it.
            b.parity.clear();
            b.parity_total = total;
        }
        b.parity_seen = b.parity_seen.max(index + 1);
        b.parity.insert(index, symbol.to_vec());
        self.try_decode(block)
    }

    fn is_received(&self, seq: u64) -> bool {
        seq < self.base || self.received.get((seq - self.base) as usize).copied().unwrap_or(false)
    }

    /// Rebuilds block `block` if it now has enough symbols (a late source packet can complete a
    /// set that parity alone could not). Returns the rebuilt `(position, body)`s.
    pub fn try_decode(&mut self, block: u32) -> Result<Vec<(u64, Vec<u8>)>, fec::FecError> {
        let Some(b) = self.blocks.get(&block) else { return Ok(Vec::new()) };
        let Some(k) = b.k else { return Ok(Vec::new()) };
        if b.bodies.len() >= usize::from(k) || b.bodies.len() + b.parity.len() < usize::from(k) {
            return Ok(Vec::new());
        }
        let sources: Vec<(usize, &[u8])> =
            b.bodies.iter().map(|(&i, body)| (usize::from(i), body.as_slice())).collect();
        let parity: Vec<(usize, &[u8])> = b.parity.iter().map(|(&i, s)| (usize::from(i), s.as_slice())).collect();
        let rebuilt = fec::decode(usize::from(k), &sources, &parity);
        let first = b.first_seq;
        let rebuilt = match rebuilt {
            Ok(r) => r,
            Err(e) => {
                // Drop the parity so a later, consistent set can be tried.
                if let Some(b) = self.blocks.get_mut(&block) {
                    b.parity.clear();
                }
                return Err(e);
            }
        };
        let mut out = Vec::new();
        for (index, body) in rebuilt {
            let seq = first + index as u64;
            if seq >= self.base && !self.is_received(seq) {
                self.received[(seq - self.base) as usize] = true;
                self.missing -= 1;
                out.push((seq, body));
            }
        }
        self.blocks.remove(&block);
        self.advance();
        Ok(out)
    }

    /// Drops a block's state once all its positions are in.
    fn settle(&mut self, block: u32) {
        if let Some(b) = self.blocks.get(&block) {
            if let Some(k) = b.k {
                let end = b.first_seq + u64::from(k);
                if (b.first_seq.max(self.base)..end).all(|s| self.is_received(s)) {
                    self.blocks.remove(&block);
                }
            }
        }
    }

    fn advance(&mut self) {
        while self.received.front() == Some(&true) {
            self.received.pop_front();
            self.base += 1;
        }
        let base = self.base;
        self.blocks.retain(|_, b| b.k.is_none_or(|k| b.first_seq + u64::from(k) > base));
    }

    /// Learns from a heartbeat that every block below `end` is closed: the newest block, if its
    /// last packet was lost, ends at `end`.
    pub fn closed_at(&mut self, end: u64) {
        let newest = self.newest_block;
        if let Some((&id, b)) = self.blocks.iter_mut().next_back() {
            if Some(id) == newest && b.k.is_none() && b.first_seq < end && end - b.first_seq <= 64 {
                b.k = Some((end - b.first_seq) as u16);
            }
        }
    }

    /// Gives up on positions below `seq` (the server can no longer repair them). Returns how many
    /// were still missing.
    pub fn give_up_below(&mut self, seq: u64) -> u64 {
        let mut lost = 0;
        while self.base < seq {
            match self.received.pop_front() {
                Some(false) => {
                    lost += 1;
                    self.missing -= 1;
                }
                Some(true) => {}
                None => {}
            }
            self.base += 1;
        }
        self.advance();
        lost
    }

    /// Whether any position is missing.
    pub fn has_missing(&self) -> bool {
        debug_assert_eq!(self.missing, self.received.iter().filter(|r| !**r).count());
        self.missing > 0
    }

    /// The NAK entries due at `now`: blocks not NAKed within `retry`, and ranges of positions no
    /// known block covers. Marks the blocks as NAKed.
    pub fn nak_entries(&mut self, now: Time, retry: Duration, max: usize) -> Vec<NakEntry> {
        let highest = self.highest();
        let mut entries = Vec::new();
        // Known blocks, in stream order, with the range of positions each covers.
        let ids: Vec<u32> = self.blocks.keys().copied().collect();
        let mut covered: Vec<(u64, u64)> = Vec::with_capacity(ids.len());
        for (n, id) in ids.iter().enumerate() {
            let next_first = ids.get(n + 1).filter(|&&next| next == id + 1).map(|next| self.blocks[next].first_seq);
            let later = self.newest_block.filter(|&newest| newest > *id);
            let b = &self.blocks[id];
            let known_end = b.first_seq + b.bodies.keys().next_back().map_or(0, |&i| u64::from(i) + 1);
            let end = match (b.k, next_first, later) {
                (Some(k), _, _) => b.first_seq + u64::from(k),
                (None, Some(next), _) => next,
                // Its last packet and the next block's first ones were lost: the block covers what
                // was seen of it; the positions after it go out as a range entry, which the server
                // maps to blocks.
                (None, None, Some(_)) => known_end,
                (None, None, None) => highest,
            };
            covered.push((b.first_seq, end));
            let missing =
                (b.first_seq.max(self.base)..end.min(highest)).filter(|&s| !self.is_received(s)).count() as u64;
            // The newest block, with its end unknown, may still be arriving: wait for its end (a
            // later packet, its parity, or a heartbeat).
            if missing == 0 || (b.k.is_none() && next_first.is_none() && later.is_none()) {
                continue;
            }
            if b.last_nak.is_some_and(|t| now < t + retry) {
                continue;
            }
            let have = b.bodies.len() as u64 + b.parity.len() as u64;
            let k = u64::from(b.k.unwrap_or(0)).max(end - b.first_seq);
            let needed = k.saturating_sub(have).min(u64::from(u16::MAX));
            if needed == 0 || entries.len() == max {
                continue;
            }
            entries.push(NakEntry {
                block: *id,
                needed: needed as u16,
                parity_seen: b.parity_seen,
                first_seq: b.first_seq,
            });
            if let Some(b) = self.blocks.get_mut(id) {
                b.last_nak = Some(now);
            }
        }
        // Missing positions outside every known block: whole blocks lost.
        if self.last_range_nak.is_some_and(|t| now < t + retry) {
            return entries;
        }
        let blocks_only = entries.len();
        let mut seq = self.base;
        let mut c = 0;
        while seq < highest && entries.len() < max {
            while c < covered.len() && covered[c].1 <= seq {
                c += 1;
            }
            if c < covered.len() && covered[c].0 <= seq {
                seq = covered[c].1;
                continue;
            }
            if self.is_received(seq) {
                seq += 1;
                continue;
            }
            let limit = if c < covered.len() { covered[c].0.min(highest) } else { highest };
            let mut end = seq;
            while end < limit && !self.is_received(end) && end - seq < u64::from(u16::MAX) {
                end += 1;
            }
            entries.push(NakEntry { block: NO_BLOCK, needed: (end - seq) as u16, parity_seen: 0, first_seq: seq });
            seq = end;
        }
        if entries.len() > blocks_only {
            self.last_range_nak = Some(now);
        }
        entries
    }

    /// The earliest time a NAKed block becomes due for another NAK.
    pub fn next_renak(&self, retry: Duration) -> Option<Time> {
        self.blocks.values().filter_map(|b| b.last_nak).chain(self.last_range_nak).map(|t| t + retry).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(i: u8) -> Vec<u8> {
        vec![i; 40 + usize::from(i)]
    }

    #[test]
    fn a_late_packet_is_counted_against_the_loss_it_seemed_to_be_until_the_stream_resets() {
        let mut s = Stream::default();
        s.begin(0);
        let bodies: Vec<Vec<u8>> = (0..3).map(body).collect();
        assert_eq!(s.take_data(0, 0, 0, false, &bodies[0]), Taken::New);
        assert_eq!(s.take_data(2, 0, 2, true, &bodies[2]), Taken::New);
        assert_eq!(s.loss_counts(), (1, 0), "position 1 is missing");
        assert_eq!(s.take_data(1, 0, 1, false, &bodies[1]), Taken::Late);
        assert_eq!(s.take_data(1, 0, 1, false, &bodies[1]), Taken::Duplicate);
        assert_eq!(s.loss_counts(), (1, 1), "it came late");
        s.reset();
        assert_eq!(s.loss_counts(), (0, 0), "a new epoch's stream counts afresh, with its feedback");
    }

    #[test]
    fn a_gap_is_naked_per_block_and_parity_rebuilds_it() {
        let mut s = Stream::default();
        s.begin(0);
        let bodies: Vec<Vec<u8>> = (0..4).map(body).collect();
        let parity: Vec<Vec<u8>> = (0..4).map(|i| fec::parity_symbol(&bodies, i).expect("parity")).collect();
        assert_eq!(s.take_data(0, 0, 0, false, &bodies[0]), Taken::New);
        assert_eq!(s.take_data(2, 0, 2, false, &bodies[2]), Taken::New);
        assert_eq!(s.take_data(3, 0, 3, true, &bodies[3]), Taken::New);
        assert_eq!(s.take_data(3, 0, 3, true, &bodies[3]), Taken::Duplicate);
        let naks = s.nak_entries(Time::ZERO, Duration::from_millis(1), 16);
        assert_eq!(naks, vec![NakEntry { block: 0, needed: 1, parity_seen: 0, first_seq: 0 }]);
        assert!(s.nak_entries(Time::ZERO, Duration::from_millis(1), 16).is_empty(), "not again before the retry time");
        let total = fec::parity_total(4) as u16;
        let rebuilt = s.take_parity(0, 0, 4, 1, total, &parity[1]).expect("decode");
        assert_eq!(rebuilt, vec![(1, bodies[1].clone())]);
        assert!(!s.has_missing());
        assert_eq!(s.received_through(), 4);
    }

    #[test]
    fn a_whole_lost_block_becomes_a_range_entry() {
        let mut s = Stream::default();
        s.begin(0);
        s.take_data(0, 0, 0, true, &body(0));
        // Block 1 (positions 1-2) lost entirely; block 2 starts at 3.
        s.take_data(3, 2, 0, true, &body(3));
        let naks = s.nak_entries(Time::ZERO, Duration::from_millis(1), 16);
        assert_eq!(naks, vec![NakEntry { block: NO_BLOCK, needed: 2, parity_seen: 0, first_seq: 1 }]);
    }

    #[test]
    fn tail_loss_shows_after_a_heartbeat() {
        let mut s = Stream::default();
        s.begin(0);
        s.take_data(0, 0, 0, false, &body(0));
        assert_eq!(s.extend_to(2), 1);
        // Block 0's end is unknown, and it is the newest block: wait.
        assert!(s.nak_entries(Time::ZERO, Duration::from_millis(1), 16).is_empty());
        assert!(s.has_missing());
        // The heartbeat also says the block is closed: its lost last packet is NAKed.
        s.closed_at(2);
        let naks = s.nak_entries(Time::ZERO, Duration::from_millis(1), 16);
        assert_eq!(naks, vec![NakEntry { block: 0, needed: 1, parity_seen: 0, first_seq: 0 }]);
    }
}

#[cfg(test)]
mod lost_boundary {
    use super::*;

    #[test]
    fn a_lost_block_end_and_a_whole_lost_block_are_naked_as_a_range() {
        let mut s = Stream::default();
        s.begin(0);
        // Block 0 is positions 0-2, block 1 positions 3-4, block 2 starts at 5. Position 2 (block
        // 0's last) and all of block 1 are lost, so block 0's end is unknown but a later block exists.
        s.take_data(0, 0, 0, false, &[0; 8]);
        s.take_data(1, 0, 1, false, &[1; 8]);
        s.take_data(5, 2, 0, true, &[5; 8]);
        let naks = s.nak_entries(Time::ZERO, Duration::from_millis(1), 16);
        assert_eq!(naks, vec![NakEntry { block: NO_BLOCK, needed: 3, parity_seen: 0, first_seq: 2 }]);
    }
}

#[cfg(test)]
mod late_source {
    use super::*;

    #[test]
    fn a_late_source_packet_completes_a_set_that_parity_started() {
        let bodies: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 30]).collect();
        let p0 = fec::parity_symbol(&bodies, 0).expect("parity");
        let mut s = Stream::default();
        s.begin(0);
        s.take_data(0, 0, 0, false, &bodies[0]);
        s.take_data(3, 0, 3, true, &bodies[3]);
        // Positions 1 and 2 missing; one parity arrives: not enough yet.
        let total = fec::parity_total(4) as u16;
        assert!(s.take_parity(0, 0, 4, 0, total, &p0).expect("no decode yet").is_empty());
        // Position 1 arrives late (reordered): now 3 sources + 1 parity = k.
        s.take_data(1, 0, 1, false, &bodies[1]);
        let rebuilt = s.try_decode(0).expect("decode");
        assert_eq!(rebuilt, vec![(2, bodies[2].clone())]);
        assert!(!s.has_missing());
    }
}
