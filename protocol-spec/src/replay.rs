//! Replay protection: a sliding window over a peer's packet numbers.

/// Accepts each packet number once, within a window of 64 below the highest seen.
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    /// Highest packet number accepted plus one (0: none yet).
    top: u64,
    /// Bit i set: packet number `top - 1 - i` was accepted.
    seen: u64,
}

impl ReplayWindow {
    /// True (and recorded) when `pn` is new; false for a replay or a number too old to judge.
    pub fn accept(&mut self, pn: u64) -> bool {
        if pn >= self.top {
            let shift = pn - self.top + 1;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.top = pn + 1;
            return true;
        }
        let age = self.top - 1 - pn;
        if age >= 64 || self.seen & (1 << age) != 0 {
            return false;
        }
        self.seen |= 1 << age;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::ReplayWindow;

    #[test]
    fn accepts_each_number_once_and_tolerates_reordering() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(5));
        assert!(w.accept(3));
        assert!(!w.accept(5));
        assert!(!w.accept(3));
        assert!(w.accept(100));
        assert!(w.accept(40));
        assert!(!w.accept(36), "older than the window");
    }
}
