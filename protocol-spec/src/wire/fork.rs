//! The fork plan: which hosts start how many clones with which ids. Travels as a blob in the stream.
//!
//! Layout: `fork u32 | descriptor u32 | count u32 | entries` with each entry
//! `node u32 | first_clone u32 | clones u32`.
//!
//! ```text
//!  0       4            8       12      16            20      24
//!  +-------+------------+-------+-------+-------------+-------+----
//!  | fork  | descriptor | count | node  | first_clone |clones | ... (count entries of 12 bytes)
//!  +-------+------------+-------+-------+-------------+-------+----
//! ```
//!
//! A plan is valid when its length is exactly `12 + 12 * count`, `count <= MAX_FORK_ENTRIES`, and every
//! entry names a host (`node != 0`) that appears once, at least one clone, and a clone id range
//! `first_clone .. first_clone + clones` that fits a u32 and overlaps no other entry's range (a clone id
//! names one clone of the fork).

use super::bytes::{Reader, Writer};
use super::{DecodeError, NodeId};

/// Length of the fixed part of an encoded plan.
const PLAN_FIXED_LEN: usize = 12;
/// Length of one encoded entry.
const ENTRY_LEN: usize = 12;

/// Clones one host starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForkEntry {
    /// The host daemon.
    pub node: NodeId,
    /// Id of its first clone; its clones are `first_clone .. first_clone + clones`.
    pub first_clone: u32,
    /// How many clones it starts.
    pub clones: u32,
}

/// A fork announcement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkPlan {
    /// The fork's id.
    pub fork: u32,
    /// The descriptor blob clones start from.
    pub descriptor: u32,
    /// Per host.
    pub entries: Vec<ForkEntry>,
}

/// Most hosts one fork plan may name.
pub const MAX_FORK_ENTRIES: usize = 65_536;

impl ForkPlan {
    /// The encoded plan.
    ///
    /// Encodes what it is given: a plan that [`ForkPlan::decode`] refuses (more than
    /// [`MAX_FORK_ENTRIES`] entries, overlapping clone ids, ...) encodes but is refused by every host.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; PLAN_FIXED_LEN + ENTRY_LEN * self.entries.len()];
        let mut w = Writer::new(&mut out);
        w.u32(self.fork);
        w.u32(self.descriptor);
        w.u32(u32::try_from(self.entries.len()).unwrap_or(u32::MAX));
        for e in &self.entries {
            w.u32(e.node.0);
            w.u32(e.first_clone);
            w.u32(e.clones);
        }
        out
    }

    /// Decodes a plan, refusing overlapping clone ids and more than [`MAX_FORK_ENTRIES`] entries.
    ///
    /// Also refuses a truncated plan or trailing bytes ([`DecodeError::BadLength`]), and entries with
    /// node 0, a node named twice, no clones, or a clone range past `u32::MAX`
    /// ([`DecodeError::BadField`]). Allocates only after the length has been checked against `count`.
    pub fn decode(bytes: &[u8]) -> Result<ForkPlan, DecodeError> {
        let mut r = Reader::new("fork plan", bytes);
        let fork = r.u32()?;
        let descriptor = r.u32()?;
        let count = r.u32()?;
        let n = usize::try_from(count).unwrap_or(usize::MAX);
        if n > MAX_FORK_ENTRIES {
            return Err(DecodeError::BadField { field: "fork plan count", value: u64::from(count) });
        }
        if bytes.len() != PLAN_FIXED_LEN + ENTRY_LEN * n {
            return Err(r.bad_length());
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let e = ForkEntry { node: NodeId(r.u32()?), first_clone: r.u32()?, clones: r.u32()? };
            if e.node == NodeId::SERVER {
                return Err(DecodeError::BadField { field: "fork entry node", value: 0 });
            }
            if e.clones == 0 {
                return Err(DecodeError::BadField { field: "fork entry clones", value: 0 });
            }
            if e.first_clone.checked_add(e.clones).is_none() {
                return Err(DecodeError::BadField { field: "fork entry first_clone", value: u64::from(e.first_clone) });
            }
            entries.push(e);
        }
        r.end()?;
        check_disjoint(&entries)?;
        Ok(ForkPlan { fork, descriptor, entries })
    }
}

/// Refuses a node named twice and overlapping clone id ranges.
fn check_disjoint(entries: &[ForkEntry]) -> Result<(), DecodeError> {
    let mut sorted: Vec<&ForkEntry> = entries.iter().collect();
    sorted.sort_unstable_by_key(|e| e.node);
    for pair in sorted.windows(2) {
        if let [a, b] = pair {
            if a.node == b.node {
                return Err(DecodeError::BadField { field: "fork entry node", value: u64::from(b.node.0) });
            }
        }
    }
    sorted.sort_unstable_by_key(|e| e.first_clone);
    for pair in sorted.windows(2) {
        if let [a, b] = pair {
            // Ranges fit a u32 (checked above), so the end cannot overflow.
            if u64::from(a.first_clone) + u64::from(a.clones) > u64::from(b.first_clone) {
                return Err(DecodeError::BadField { field: "fork entry first_clone", value: u64::from(b.first_clone) });
            }
        }
    }
    Ok(())
}
