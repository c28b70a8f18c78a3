//! Channel sequencing on the receiving side.
//!
//! Every sender numbers its messages to one receiver 1, 2, 3, ... A [`Window`] per sender at the
//! receiver releases them in that order, holds the ones that arrive early (a direct m2 that
//! overtook a forwarded m1), and drops copies of ones already taken. A number the receiver
//! refused is consumed too ([`Window::skip`]), so a refusal never leaves a gap that would stall
//! the sender's later messages. The window's watermark travels with a migrating service.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What became of an offered message.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer<T> {
    /// In order: these are released, oldest first (the offered one and any it unblocked).
    Release(Vec<T>),
    /// Early: held until the numbers before it arrive.
    Held,
    /// Already taken (or skipped): a copy, dropped.
    Duplicate,
    /// Early, and the window already holds `held_max` messages: refuse it (and then `skip` it).
    /// The message is handed back.
    Full(T),
}

enum Slot<T> {
    Item(T),
    Skipped,
}

/// The receive window of one sender's channel to one receiver.
pub struct Window<T> {
    next: u64,
    held: BTreeMap<u64, Slot<T>>,
    held_max: usize,
}

/// A window's watermark: the next number it expects. What a snapshot carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark(pub u64);

impl<T> Window<T> {
    /// A window expecting number 1 and holding at most `held_max` early messages.
    pub fn new(held_max: usize) -> Self {
        Self::from_watermark(Watermark(1), held_max)
    }

    /// A window resuming at `mark` (on a migration target).
    pub fn from_watermark(mark: Watermark, held_max: usize) -> Self {
        assert!(mark.0 >= 1, "sequence numbers start at 1");
        Window {
            next: mark.0,
            held: BTreeMap::new(),
            held_max,
        }
    }

    /// The next number expected.
    #[inline]
    pub fn watermark(&self) -> Watermark {
        Watermark(self.next)
    }

    /// Messages held early.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The messages held early, in number order.
    pub fn held_items(&self) -> impl Iterator<Item = &T> {
        self.held.values().filter_map(|s| match s {
            Slot::Item(t) => Some(t),
            Slot::Skipped => None,
        })
    }

    /// Gives up the messages held early, in number order.
    pub fn into_held_items(self) -> impl Iterator<Item = T> {
        self.held.into_values().filter_map(|s| match s {
            Slot::Item(t) => Some(t),
            Slot::Skipped => None,
        })
    }

    /// The numbers ahead of the watermark that were skipped (refused).
    pub fn skipped_ahead(&self) -> impl Iterator<Item = u64> + '_ {
        self.held.iter().filter_map(|(seq, s)| match s {
            Slot::Skipped => Some(*seq),
            Slot::Item(_) => None,
        })
    }

    /// The common case without a move: `seq` is the next number and nothing waits early. Takes
    /// it (true) without touching the item; otherwise changes nothing (false).
    #[inline]
    pub fn take_in_order(&mut self, seq: u64) -> bool {
        if seq == self.next && self.held.is_empty() {
            self.next += 1;
            true
        } else {
            false
        }
    }

    /// Offers message `seq`.
    pub fn offer(&mut self, seq: u64, item: T) -> Offer<T> {
        self.offer_bounded(seq, item, true)
    }

    /// Offers message `seq`; with `bounded` false an early message is held even past
    /// `held_max` (for messages accepted once already, whose number is bounded elsewhere).
    pub fn offer_bounded(&mut self, seq: u64, item: T, bounded: bool) -> Offer<T> {
        if seq < self.next || self.held.contains_key(&seq) {
            return Offer::Duplicate;
        }
        if seq > self.next {
            if bounded && self.held.len() >= self.held_max {
                return Offer::Full(item);
            }
            self.held.insert(seq, Slot::Item(item));
            return Offer::Held;
        }
        let mut out = vec![item];
        self.next += 1;
        self.drain_into(&mut out);
        Offer::Release(out)
    }

    /// Consumes number `seq` without a message (it was refused); returns what that unblocks.
    pub fn skip(&mut self, seq: u64) -> Vec<T> {
        let mut out = Vec::new();
        if seq < self.next {
            return out;
        }
        if seq > self.next {
            // Remembered so the gap closes when it is reached; bounded like any held entry
            // because the caller only skips what it refused, one per offered message.
            self.held.insert(seq, Slot::Skipped);
            return out;
        }
        self.next += 1;
        self.drain_into(&mut out);
        out
    }

    /// Consumes every number up to `through` that has not arrived: its sender declared them
    /// lost. Messages held early within that range are released in order, skipping the missing
    /// numbers; so is what follows them. Costs no more than the messages held, whatever the
    /// range, so a peer cannot make the receiver loop over a huge one.
    pub fn skip_through(&mut self, through: u64) -> Vec<T> {
        let mut out = Vec::new();
        if through < self.next {
            return out;
        }
        let rest = match through.checked_add(1) {
            Some(after) => self.held.split_off(&after),
            None => BTreeMap::new(),
        };
        for (_, slot) in std::mem::replace(&mut self.held, rest) {
            if let Slot::Item(item) = slot {
                out.push(item);
            }
        }
        self.next = through.saturating_add(1);
        self.drain_into(&mut out);
        out
    }

    fn drain_into(&mut self, out: &mut Vec<T>) {
        while let Some(slot) = self.held.remove(&self.next) {
            if let Slot::Item(item) = slot {
                out.push(item);
            }
            self.next += 1;
        }
        debug_assert!(self.held.keys().all(|&s| s > self.next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_in_order_holds_early_drops_copies() {
        let mut w = Window::new(8);
        assert_eq!(w.offer(2, "b"), Offer::Held);
        assert_eq!(w.offer(3, "c"), Offer::Held);
        assert_eq!(w.offer(2, "b"), Offer::Duplicate);
        assert_eq!(w.offer(1, "a"), Offer::Release(vec!["a", "b", "c"]));
        assert_eq!(w.offer(1, "a"), Offer::Duplicate);
        assert_eq!(w.watermark(), Watermark(4));
        assert_eq!(w.held(), 0);
    }

    #[test]
    fn refusals_consume_their_number() {
        let mut w = Window::new(8);
        assert_eq!(w.offer(3, "c"), Offer::Held);
        assert!(w.skip(2).is_empty());
        assert_eq!(w.offer(1, "a"), Offer::Release(vec!["a", "c"]));
        assert_eq!(w.skip(4), Vec::<&str>::new());
        assert_eq!(w.offer(5, "e"), Offer::Release(vec!["e"]));
    }

    #[test]
    fn a_declared_gap_releases_what_waited_behind_it_and_drops_late_arrivals() {
        let mut w = Window::new(8);
        assert_eq!(w.offer(1, 1), Offer::Release(vec![1]));
        assert_eq!(w.offer(4, 4), Offer::Held);
        assert_eq!(w.offer(6, 6), Offer::Held);
        assert!(w.skip(7).is_empty());
        assert_eq!(w.offer(8, 8), Offer::Held);
        // 2..=5 declared lost: 4 was here and goes on, 6 follows, 7 is skipped, 8 follows.
        assert_eq!(w.skip_through(5), vec![4, 6, 8]);
        assert_eq!(w.watermark(), Watermark(9));
        assert_eq!(w.offer(3, 3), Offer::Duplicate);
        assert!(w.skip_through(2).is_empty());
        assert!(w.skip_through(u64::MAX).is_empty());
        assert_eq!(w.watermark(), Watermark(u64::MAX));
    }

    #[test]
    fn bounded_and_resumable() {
        let mut w = Window::from_watermark(Watermark(10), 1);
        assert_eq!(w.offer(12, 12), Offer::Held);
        assert_eq!(w.offer(13, 13), Offer::Full(13));
        assert_eq!(w.offer(9, 9), Offer::Duplicate);
        assert_eq!(w.offer(10, 10), Offer::Release(vec![10]));
        assert_eq!(w.offer(11, 11), Offer::Release(vec![11, 12]));
    }
}
