//! The sent stream, kept for repair: blocks of Data bodies and their parity, bounded in bytes.

use std::collections::VecDeque;

use crate::fec;
use crate::Time;

/// One FEC block of the stream.
#[derive(Debug)]
pub(super) struct Block {
    pub id: u32,
    pub first_seq: u64,
    pub bodies: Vec<Vec<u8>>,
    /// When each parity counter was queued (indices wrap modulo the parity total), and the stream
    /// position it followed (the sender's next position then).
    pub parity_log: Vec<(Time, u64)>,
    bytes: usize,
}

impl Block {
    /// Source packets in the block.
    pub fn k(&self) -> usize {
        self.bodies.len()
    }

    /// One past the block's last stream position.
    pub fn end_seq(&self) -> u64 {
        self.first_seq + self.bodies.len() as u64
    }
}

/// One parity symbol of a block, ready for a Repair message.
#[derive(Debug)]
pub(super) struct ParitySymbol {
    pub index: u16,
    pub total: u16,
    pub symbol: Vec<u8>,
}

/// Closed blocks, oldest first, within a byte budget.
#[derive(Debug)]
pub(super) struct History {
    blocks: VecDeque<Block>,
    bytes: usize,
    budget: usize,
}

impl History {
    pub fn new(budget: usize) -> History {
        History { blocks: VecDeque::new(), bytes: 0, budget }
    }

    /// Adds a closed block and drops the oldest ones past the budget.
    pub fn push(&mut self, id: u32, first_seq: u64, bodies: Vec<Vec<u8>>) {
        let bytes = bodies.iter().map(Vec::len).sum::<usize>();
        self.bytes += bytes;
        self.blocks.push_back(Block { id, first_seq, bodies, parity_log: Vec::new(), bytes });
        self.trim();
    }

    fn trim(&mut self) {
        while self.bytes > self.budget && self.blocks.len() > 1 {
            if let Some(b) = self.blocks.pop_front() {
                self.bytes -= b.bytes;
            }
        }
    }

    /// The block with id `id`, if still kept.
    pub fn get_mut(&mut self, id: u32) -> Option<&mut Block> {
        let front = self.blocks.front()?.id;
        let i = id.checked_sub(front)? as usize;
        self.blocks.get_mut(i)
    }

    /// Ids of the kept blocks that hold any position in `first .. end`.
    pub fn blocks_in(&self, first: u64, end: u64) -> Vec<(u32, u64)> {
        let start = self.blocks.partition_point(|b| b.end_seq() <= first);
        self.blocks
            .iter()
            .skip(start)
            .take_while(|b| b.first_seq < end)
            .map(|b| {
                let overlap = end.min(b.end_seq()) - first.max(b.first_seq);
                (b.id, overlap)
            })
            .collect()
    }

    /// The oldest position that can still be repaired.
    pub fn repairable_from(&self, next_seq: u64) -> u64 {
        self.blocks.front().map(|b| b.first_seq).unwrap_or(next_seq)
    }

    /// Whether block `id` is still kept.
    pub fn contains(&self, id: u32) -> bool {
        match self.blocks.front() {
            Some(f) => id >= f.id && ((id - f.id) as usize) < self.blocks.len(),
            None => false,
        }
    }

    /// The first stream position of block `id`, if kept.
    pub fn first_seq(&self, id: u32) -> Option<u64> {
        let f = self.blocks.front()?;
        self.blocks.get(id.checked_sub(f.id)? as usize).map(|b| b.first_seq)
    }

    /// Parity symbol `counter` (modulo the parity total) of block `id`. None when the block is no
    /// longer kept.
    pub fn parity_symbol(&self, id: u32, counter: u32) -> Option<Result<ParitySymbol, fec::FecError>> {
        let front = self.blocks.front()?.id;
        let block = self.blocks.get(id.checked_sub(front)? as usize)?;
        let total = fec::parity_total(block.k());
        let index = counter as usize % total;
        Some(fec::parity_symbol(&block.bodies, index).map(|symbol| ParitySymbol {
            index: index as u16,
            total: total as u16,
            symbol,
        }))
    }
}
