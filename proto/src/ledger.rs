//! The delivery ledger of one channel (the path from a node to one service): per sender on
//! that node, what it sent that the service has not yet been seen to take, and the nodes those
//! messages went to. The receiver's handled marks settle it; when a node is lost, what went
//! there (or to the service while it was there) and was not settled is declared lost, so its
//! sender is told. Nothing is ever both settled and declared.
//!
//! ```
//! use tern_proto::ids::{NodeName, ServiceId};
//! use tern_proto::ledger::Ledger;
//!
//! let (b, me) = (NodeName::new("b"), ServiceId::from_parts(1, 1));
//! let mut ledger = Ledger::default();
//! for seq in 1..=5 {
//!     ledger.note(me, seq, &b);
//! }
//! ledger.settle(me, 3); // the service took 1..=3
//! assert_eq!(ledger.outstanding(), 2);
//! // b is lost, with the service on it: 4 and 5 are declared.
//! assert_eq!(ledger.declare_lost(&b, true), vec![(me, 4, 5)]);
//! assert_eq!(ledger.outstanding(), 0);
//! ```

use crate::ids::{IdMap, NodeName, ServiceId};

/// Nodes a ledger entry remembers having sent through; past that it assumes any (a lost node
/// then declares the entry: an over-report, never an under-report).
pub const LEDGER_VIA_MAX: usize = 4;
/// Refused numbers an entry remembers (above its settled mark), so that a node lost later does
/// not report them a second time; past this the lowest is forgotten (an over-report).
pub const LEDGER_REFUSED_MAX: usize = 64;
/// Skips and gaps a ledger remembers until a handled mark shows the live window passed them;
/// past this the oldest is forgotten.
pub const LEDGER_UNCONFIRMED_MAX: usize = 64;

/// Handled marks kept aside by [`WaitingMarks`].
pub const HANDLED_WAITING_MAX: usize = 4096;

/// Handled marks from a node that a channel's messages did not go to (see
/// [`Ledger::may_settle`]): kept, oldest first and at most [`HANDLED_WAITING_MAX`], until the
/// channel points at that node (the service moved there and the news is on its way).
#[derive(Debug, Default)]
pub struct WaitingMarks {
    /// Node, service, sender, number.
    marks: std::collections::VecDeque<(NodeName, ServiceId, ServiceId, u64)>,
}

impl WaitingMarks {
    /// Keeps `node`'s mark that service `to` took `from`'s messages up to `seq`; the oldest
    /// goes when full (its messages stay unconfirmed, and are reported if their node is lost).
    pub fn keep(&mut self, node: &NodeName, (to, from, seq): (ServiceId, ServiceId, u64)) {
        if self.marks.len() >= HANDLED_WAITING_MAX {
            self.marks.pop_front();
        }
        self.marks.push_back((node.clone(), to, from, seq));
    }

    /// The channel to `to` now points at `node`: the marks `node` gave for it, oldest first.
    pub fn take(&mut self, to: ServiceId, node: &NodeName) -> Vec<(ServiceId, u64)> {
        let mut out = Vec::new();
        self.marks.retain(|(n, t, from, seq)| {
            let now = *t == to && n == node;
            if now {
                out.push((*from, *seq));
            }
            !now
        });
        out
    }

    /// Marks kept.
    pub fn len(&self) -> usize {
        self.marks.len()
    }

    /// True when none is kept.
    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }
}

/// A number the sender's node told the live window not to wait for, not yet seen passed: sent
/// again when a node is lost, since it may have been on its way through that node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unconfirmed {
    /// The skip of a refused number.
    Skip(ServiceId, u64),
    /// A gap through a number (declared lost).
    Gap(ServiceId, u64),
}

impl Unconfirmed {
    fn sender_and_number(self) -> (ServiceId, u64) {
        match self {
            Unconfirmed::Skip(s, n) | Unconfirmed::Gap(s, n) => (s, n),
        }
    }
}

/// One channel's ledger: the last sender's entry kept apart (a channel mostly carries one
/// sender's run at a time), the others in a table. One entry per sender with messages
/// outstanding.
#[derive(Default, Debug, Clone)]
pub struct Ledger {
    /// The last sender noted, looked at first. Boxed: a channel with nothing outstanding
    /// (every idle service's) pays a pointer for it.
    hot: Option<Box<(ServiceId, Outstanding)>>,
    /// The other senders with messages outstanding (boxed when there are any: most channels
    /// have one sender at a time, and every channel pays for the field).
    #[allow(clippy::box_collection)]
    cold: Option<Box<IdMap<Outstanding>>>,
    /// Skips and gaps sent and not yet seen passed (bounded by [`LEDGER_UNCONFIRMED_MAX`]).
    /// Boxed when there are any: rare, and every channel pays for the field.
    #[allow(clippy::box_collection)]
    unconfirmed: Option<Box<Vec<Unconfirmed>>>,
}

/// One sender's messages to one service, sent and not yet confirmed taken for handling.
#[derive(Debug, Clone)]
struct Outstanding {
    /// The last number sent.
    sent: u64,
    /// The last number the service confirmed taking (0: none).
    handled: u64,
    /// The nodes the outstanding messages were sent to; empty with `via_any`.
    via: Vec<NodeName>,
    via_any: bool,
    /// Numbers above `handled` already reported refused to the sender, ascending.
    refused: Vec<u64>,
}

impl Outstanding {
    /// Drops the refused numbers the settled mark covers. True when nothing is left
    /// outstanding: every number above the mark was reported refused.
    fn tidy(&mut self) -> bool {
        let handled = self.handled;
        self.refused.retain(|r| *r > handled);
        self.handled >= self.sent || self.refused.len() as u64 >= self.sent - self.handled
    }

    /// Remembers that messages went (or may go) to `node`.
    fn went(&mut self, node: &NodeName) {
        if !self.via_any && !self.via.contains(node) {
            if self.via.len() < LEDGER_VIA_MAX {
                self.via.push(node.clone());
            } else {
                self.via.clear();
                self.via_any = true;
            }
        }
    }
}

impl Ledger {
    /// Notes number `seq` of `sender` as sent to node `via`, where the channel points. The
    /// common case (the same sender again) is one comparison and one store: an entry learns
    /// its nodes when it is made and when the channel is repointed, not per message.
    #[inline]
    pub fn note(&mut self, sender: ServiceId, seq: u64, via: &NodeName) {
        if let Some(h) = &mut self.hot {
            if h.0 == sender {
                h.1.sent = h.1.sent.max(seq);
                return;
            }
        }
        self.note_cold(sender, seq, via);
    }

    /// Takes `sender`'s entry out of the cold map (dropped when it empties).
    fn cold_remove(&mut self, sender: &ServiceId) -> Option<Outstanding> {
        let c = self.cold.as_mut()?;
        let o = c.remove(sender);
        if c.is_empty() {
            self.cold = None;
        }
        o
    }

    fn note_cold(&mut self, sender: ServiceId, seq: u64, via: &NodeName) {
        let mut o = self.cold_remove(&sender).unwrap_or(Outstanding {
            sent: seq,
            // Numbers before the first one seen here were confirmed or belong to another node.
            handled: seq.saturating_sub(1),
            via: Vec::new(),
            via_any: false,
            refused: Vec::new(),
        });
        o.sent = o.sent.max(seq);
        o.went(via);
        match &mut self.hot {
            Some(h) => {
                let (s, old) = std::mem::replace(&mut **h, (sender, o));
                self.cold
                    .get_or_insert_with(Default::default)
                    .insert(s, old);
            }
            None => self.hot = Some(Box::new((sender, o))),
        }
    }

    /// The channel now points at `node`: every outstanding entry may send there.
    pub fn repointed(&mut self, node: &NodeName) {
        if let Some(h) = &mut self.hot {
            h.1.went(node);
        }
        for o in self.cold.iter_mut().flat_map(|c| c.values_mut()) {
            o.went(node);
        }
    }

    /// True when node `node` may confirm `sender`'s messages: they were sent there, or the
    /// channel pointed there since, or nothing of `sender`'s is outstanding. A confirmation
    /// from any other node would hide a loss (see [`Ledger::declare_lost`]): the caller keeps
    /// it aside until the channel points at that node.
    ///
    /// ```
    /// use tern_proto::ids::{NodeName, ServiceId};
    /// use tern_proto::ledger::Ledger;
    /// let (tv, liar) = (NodeName::new("tv"), NodeName::new("liar"));
    /// let me = ServiceId::from_parts(1, 1);
    /// let mut l = Ledger::default();
    /// l.note(me, 1, &tv);
    /// assert!(l.may_settle(me, &tv));
    /// assert!(!l.may_settle(me, &liar));
    /// ```
    pub fn may_settle(&self, sender: ServiceId, node: &NodeName) -> bool {
        let o = match &self.hot {
            Some(h) if h.0 == sender => Some(&h.1),
            _ => self.cold.as_ref().and_then(|c| c.get(&sender)),
        };
        o.is_none_or(|o| o.via_any || o.via.contains(node))
    }

    /// The service confirmed taking `sender`'s messages up to `seq`; an entry with nothing
    /// left outstanding leaves.
    pub fn settle(&mut self, sender: ServiceId, seq: u64) {
        self.update(sender, |o| o.handled = o.handled.max(seq));
        if let Some(u) = self.unconfirmed.as_mut() {
            // The window took a later number: it passed these.
            u.retain(|u| {
                let (s, n) = u.sender_and_number();
                !(s == sender && n <= seq)
            });
            if u.is_empty() {
                self.unconfirmed = None;
            }
        }
    }

    /// Remembers a skip or a gap this node sent, until a handled mark shows it passed.
    pub fn sent_unconfirmed(&mut self, u: Unconfirmed) {
        let all = self.unconfirmed.get_or_insert_with(Default::default);
        if all.contains(&u) {
            return;
        }
        if all.len() >= LEDGER_UNCONFIRMED_MAX {
            all.remove(0);
        }
        all.push(u);
    }

    /// The skips and gaps sent and not yet seen passed, oldest first: to send again when a
    /// node is lost (they may have been on their way through it; the window ignores a second
    /// copy).
    pub fn unconfirmed(&self) -> &[Unconfirmed] {
        self.unconfirmed.as_deref().map_or(&[], |u| u.as_slice())
    }

    /// Number `seq` of `sender` was refused, and the sender told: it is no longer outstanding
    /// (a node lost later does not report it again). Its skip, which the caller sends, is
    /// remembered until seen passed ([`unconfirmed`](Self::unconfirmed)).
    pub fn refused(&mut self, sender: ServiceId, seq: u64) {
        self.sent_unconfirmed(Unconfirmed::Skip(sender, seq));
        self.update(sender, |o| {
            if seq <= o.handled || seq > o.sent {
                return;
            }
            if let Err(at) = o.refused.binary_search(&seq) {
                o.refused.insert(at, seq);
                if o.refused.len() > LEDGER_REFUSED_MAX {
                    o.refused.remove(0);
                }
            }
        });
    }

    /// Applies `change` to `sender`'s entry, which leaves if nothing is outstanding after.
    fn update(&mut self, sender: ServiceId, change: impl FnOnce(&mut Outstanding)) {
        let done = match &mut self.hot {
            Some(h) if h.0 == sender => {
                change(&mut h.1);
                h.1.tidy()
            }
            _ => match self.cold.as_mut().and_then(|c| c.get_mut(&sender)) {
                Some(o) => {
                    change(o);
                    o.tidy()
                }
                None => false,
            },
        };
        if done {
            if matches!(&self.hot, Some(h) if h.0 == sender) {
                self.hot = None;
            } else {
                self.cold_remove(&sender);
            }
        }
    }

    /// Node `lost` is gone (`here`: the channel points at it): every entry whose messages
    /// went there, or may have, leaves the ledger and comes back as `(sender, first, last)`,
    /// the numbers not confirmed.
    pub fn declare_lost(&mut self, lost: &NodeName, here: bool) -> Vec<(ServiceId, u64, u64)> {
        let mut out = Vec::new();
        let mut take = |sender: &ServiceId, o: &Outstanding| {
            if !(here || o.via_any || o.via.contains(lost)) {
                return true;
            }
            // The unsettled numbers, less those already reported refused.
            let mut first = o.handled + 1;
            for r in o.refused.iter().copied().chain(std::iter::once(o.sent + 1)) {
                if r > first {
                    out.push((*sender, first, r - 1));
                }
                first = r + 1;
            }
            false
        };
        if let Some(h) = &self.hot {
            if !take(&h.0, &h.1) {
                self.hot = None;
            }
        }
        if let Some(c) = &mut self.cold {
            c.retain(|s, o| take(s, o));
            if c.is_empty() {
                self.cold = None;
            }
        }
        // The gaps the caller sends for them are remembered until seen passed.
        for (sender, _, last) in &out {
            self.sent_unconfirmed(Unconfirmed::Gap(*sender, *last));
        }
        out
    }

    /// Messages noted and not yet settled or declared.
    pub fn outstanding(&self) -> u64 {
        self.hot
            .iter()
            .map(|h| &h.1)
            .chain(self.cold.iter().flat_map(|c| c.values()))
            .map(|o| o.sent - o.handled - o.refused.len() as u64)
            .sum()
    }

    /// Senders with messages outstanding.
    pub fn len(&self) -> usize {
        usize::from(self.hot.is_some()) + self.cold.as_ref().map_or(0, |c| c.len())
    }

    /// True when nothing is outstanding.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(i: u64) -> ServiceId {
        ServiceId::from_parts(3, i)
    }

    #[test]
    fn a_lost_node_declares_only_what_went_there_and_was_not_settled() {
        let (a, b, c) = (NodeName::new("a"), NodeName::new("b"), NodeName::new("c"));
        let mut l = Ledger::default();
        for seq in 1..=4 {
            l.note(sender(1), seq, &b);
        }
        for seq in 10..=12 {
            l.note(sender(2), seq, &b);
        }
        // The channel moves to c; sender 3 sends only there.
        l.repointed(&c);
        l.note(sender(3), 1, &c);
        l.settle(sender(1), 2);
        l.settle(sender(2), 12);
        assert_eq!(l.len(), 2, "a fully settled sender leaves");
        // a is not where anything went.
        assert!(l.declare_lost(&a, false).is_empty());
        // b: sender 1's unsettled numbers (sender 3 never sent there).
        assert_eq!(l.declare_lost(&b, false), vec![(sender(1), 3, 4)]);
        // c, where the channel points: the rest.
        assert_eq!(l.declare_lost(&c, true), vec![(sender(3), 1, 1)]);
        assert!(l.is_empty());
        assert_eq!(l.outstanding(), 0);
    }

    /// Skips and gaps stay remembered until a handled mark shows the window passed them, so a
    /// node lost later (perhaps one they went through) makes the sender's node send them again.
    #[test]
    fn skips_and_gaps_are_remembered_until_a_mark_passes_them() {
        let b = NodeName::new("b");
        let mut l = Ledger::default();
        for seq in 1..=6 {
            l.note(sender(1), seq, &b);
        }
        l.refused(sender(1), 2);
        l.settle(sender(1), 1);
        assert_eq!(l.unconfirmed(), &[Unconfirmed::Skip(sender(1), 2)]);
        assert_eq!(l.declare_lost(&b, true), vec![(sender(1), 3, 6)]);
        assert!(l.is_empty());
        assert_eq!(
            l.unconfirmed(),
            &[
                Unconfirmed::Skip(sender(1), 2),
                Unconfirmed::Gap(sender(1), 6)
            ]
        );
        // A later message taken past 2 but not 6: only the skip is passed.
        l.note(sender(1), 7, &b);
        l.settle(sender(1), 4);
        assert_eq!(l.unconfirmed(), &[Unconfirmed::Gap(sender(1), 6)]);
        l.settle(sender(1), 7);
        assert!(l.unconfirmed().is_empty() && l.is_empty());
        // Bounded: the oldest goes.
        for seq in 0..(LEDGER_UNCONFIRMED_MAX as u64 + 5) {
            l.sent_unconfirmed(Unconfirmed::Skip(sender(2), seq + 100));
        }
        assert_eq!(l.unconfirmed().len(), LEDGER_UNCONFIRMED_MAX);
        assert_eq!(l.unconfirmed()[0], Unconfirmed::Skip(sender(2), 105));
    }

    #[test]
    fn past_its_node_bound_an_entry_is_declared_by_any_lost_node() {
        let mut l = Ledger::default();
        for i in 0..=LEDGER_VIA_MAX as u64 {
            l.repointed(&NodeName::new(&format!("n{i}")));
            l.note(sender(1), i + 1, &NodeName::new(&format!("n{i}")));
        }
        let far = NodeName::new("somewhere-else");
        assert_eq!(
            l.declare_lost(&far, false),
            vec![(sender(1), 1, LEDGER_VIA_MAX as u64 + 1)],
            "over-reported, never under-reported"
        );
    }

    #[test]
    fn a_settle_never_resurrects_and_a_late_one_is_harmless() {
        let b = NodeName::new("b");
        let mut l = Ledger::default();
        l.note(sender(1), 1, &b);
        l.note(sender(2), 1, &b); // sender 1 goes cold
        l.settle(sender(1), 1);
        l.settle(sender(1), 1);
        l.settle(sender(9), 5);
        assert_eq!(l.outstanding(), 1);
        l.settle(sender(2), 7);
        assert!(l.is_empty());
    }

    #[test]
    fn a_refused_number_is_not_declared_again_when_its_node_is_lost() {
        let b = NodeName::new("b");
        let mut l = Ledger::default();
        for seq in 1..=8 {
            l.note(sender(1), seq, &b);
        }
        l.settle(sender(1), 2);
        // 4 and 8 refused (and reported).
        l.refused(sender(1), 8);
        l.refused(sender(1), 4);
        l.refused(sender(1), 4);
        l.refused(sender(1), 1); // settled already: ignored
        assert_eq!(l.outstanding(), 4, "3, 5, 6 and 7");
        assert_eq!(
            l.declare_lost(&b, true),
            vec![(sender(1), 3, 3), (sender(1), 5, 7)]
        );
        // A refusal of everything outstanding empties the entry.
        l.note(sender(2), 1, &b);
        l.note(sender(2), 2, &b);
        l.refused(sender(2), 1);
        l.refused(sender(2), 2);
        assert!(l.is_empty());
    }

    /// Found by the data-plane simulation: the top numbers refused, then more sent; the
    /// refused ones must stay out of a later declaration.
    #[test]
    fn numbers_refused_at_the_top_stay_refused_when_more_are_sent() {
        let b = NodeName::new("b");
        let mut l = Ledger::default();
        for seq in 1..=24 {
            l.note(sender(1), seq, &b);
        }
        l.settle(sender(1), 19);
        for seq in 20..=24 {
            l.refused(sender(1), seq);
        }
        assert!(
            l.is_empty(),
            "nothing outstanding: all above the mark refused"
        );
        l.note(sender(1), 25, &b);
        assert_eq!(l.declare_lost(&b, true), vec![(sender(1), 25, 25)]);
        // The same with the entry kept by an unsettled number below the refused ones.
        for seq in 26..=30 {
            l.note(sender(1), seq, &b);
        }
        for seq in 28..=30 {
            l.refused(sender(1), seq);
        }
        l.note(sender(1), 31, &b);
        assert_eq!(
            l.declare_lost(&b, true),
            vec![(sender(1), 26, 27), (sender(1), 31, 31)]
        );
    }
}
