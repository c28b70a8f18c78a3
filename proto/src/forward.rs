//! Forwarding: what a node does with a message or a skip for a service that is not (or no
//! longer) here.
//!
//! A service that moves away leaves a tombstone on its former node. A message that still
//! arrives there is handed on to where the service went ([`Tombstones::hand_on`]), and the
//! first time a sender's node is seen routing through the tombstone it is told where the
//! service is (a `Moved` notice, one per sender node and epoch). That node repoints its channel
//! and sends a fence on its ordered data stream, behind everything it sent: once every peer
//! awaited has fenced, nothing can reach the tombstone any more and it goes
//! ([`Tombstones::fenced`]). The table is bounded: past its bound the oldest tombstone goes
//! first, and a message that then arrives is refused to its sender, never dropped.
//!
//! A number refused anywhere is closed where the service lives by a skip: the sender's node
//! sends it to the newest location it knows ([`newest_location`]) and a node that cannot
//! apply it hands it on ([`skip_next_hop`]), a bounded number of times.
//!
//! The node and the data-plane simulation both run this code.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::ids::{NodeName, ServiceId};
use crate::inbox::Admit;

/// How a handed-on message is to be taken at the next node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hand {
    /// Its sender does not wait.
    Tell,
    /// Its sender waits for room.
    Wait,
    /// Taken once already (a restored copy's parking, a commit's leftovers): never refused
    /// for room.
    Accepted,
}

impl Hand {
    /// The admission rule at the inbox that receives a message handed on this way. A plain
    /// tell handed on by a tombstone may go past the capacity (up to twice it): its sender
    /// may already have been told it was taken.
    pub fn admit(self) -> Admit {
        match self {
            Hand::Tell => Admit::Forwarded,
            Hand::Wait => Admit::Wait,
            Hand::Accepted => Admit::Accepted,
        }
    }
}

/// How far past its capacity an inbox takes messages a peer says were accepted elsewhere, as
/// a multiple of the capacity. What one source hands over honestly is at most its own queue
/// (twice its capacity with forwarded messages) and the forwarded ones here at most twice
/// this one's.
pub const ACCEPTED_DEPTH_FACTOR: usize = 4;

/// How a message a peer hands on is taken here. A peer's word that it was accepted elsewhere
/// (`accepted`) is believed while the inbox holds fewer than [`ACCEPTED_DEPTH_FACTOR`] times
/// its capacity; past that the message is taken as a plain handed-on tell (refused when full,
/// its sender told), so no peer can make an inbox grow without bound.
///
/// ```
/// use tern_proto::forward::{hand_from_peer, Hand};
/// assert_eq!(hand_from_peer(true, false, 10, 100), Hand::Accepted);
/// assert_eq!(hand_from_peer(true, false, 400, 100), Hand::Tell);
/// assert_eq!(hand_from_peer(false, true, 0, 100), Hand::Wait);
/// ```
pub fn hand_from_peer(accepted: bool, wait: bool, depth: usize, capacity: usize) -> Hand {
    match (accepted, wait) {
        (true, _) if depth < ACCEPTED_DEPTH_FACTOR.saturating_mul(capacity) => Hand::Accepted,
        (_, true) => Hand::Wait,
        _ => Hand::Tell,
    }
}

/// A tombstone's decision for one message: where it goes, and whom to tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandOn {
    /// The node the message goes on to.
    pub at: NodeName,
    /// The service's epoch there.
    pub epoch: u64,
    /// A sender's node to send a `Moved` notice to (the first time it routes through here
    /// at this epoch).
    pub notify: Option<NodeName>,
}

/// `Moved` notices remembered; past this the set starts over (a repeated notice is harmless).
pub const NOTICES_MAX: usize = 4096;

struct Tomb {
    epoch: u64,
    /// Its burial, to match its entry in the order queue (a service buried, removed and
    /// buried again has two entries; only the newest counts).
    burial: u64,
    /// The peers whose fence it still waits for; `None` until the node says which.
    waiting: Option<BTreeSet<NodeName>>,
}

/// The tombstones of one node, bounded, with the fences they wait for and the notices they
/// sent.
pub struct Tombstones {
    tombs: BTreeMap<ServiceId, Tomb>,
    /// Burial order, oldest first, cleaned lazily (at most twice the table plus 64).
    order: VecDeque<(ServiceId, u64)>,
    burials: u64,
    max: usize,
    told: BTreeSet<(ServiceId, NodeName, u64)>,
}

impl Tombstones {
    /// A table of at most `max` tombstones.
    pub fn new(max: usize) -> Self {
        Tombstones {
            tombs: BTreeMap::new(),
            order: VecDeque::new(),
            burials: 0,
            max,
            told: BTreeSet::new(),
        }
    }

    /// `service` left at `epoch`: a tombstone stays, the oldest one going past the bound.
    /// Returns the services whose tombstones were let go.
    pub fn bury(&mut self, service: ServiceId, epoch: u64) -> Vec<ServiceId> {
        let burial = match self.tombs.get(&service) {
            Some(t) => t.burial,
            None => {
                self.burials += 1;
                self.order.push_back((service, self.burials));
                self.burials
            }
        };
        self.tombs.insert(
            service,
            Tomb {
                epoch,
                burial,
                waiting: None,
            },
        );
        let mut evicted = Vec::new();
        while self.tombs.len() > self.max {
            let Some((old, burial)) = self.order.pop_front() else {
                break;
            };
            if self.tombs.get(&old).is_some_and(|t| t.burial == burial) {
                self.tombs.remove(&old);
                evicted.push(old);
            }
        }
        self.clean_order();
        evicted
    }

    /// The tombstone of `service` at `epoch` waits for a fence from each of `peers` (every
    /// node that may route through it). An empty set waits for nothing: the next fence of this
    /// epoch, from anyone, lets it go. Returns false if there is no such tombstone.
    pub fn await_fences(
        &mut self,
        service: ServiceId,
        epoch: u64,
        peers: impl IntoIterator<Item = NodeName>,
    ) -> bool {
        match self.tombs.get_mut(&service) {
            Some(t) if t.epoch == epoch => {
                t.waiting = Some(peers.into_iter().collect());
                true
            }
            _ => false,
        }
    }

    /// Node `from` no longer routes `service` through here (its fence for `epoch` came behind
    /// everything it sent). Returns true when that was the last fence awaited and the
    /// tombstone went.
    pub fn fenced(&mut self, from: &NodeName, service: ServiceId, epoch: u64) -> bool {
        let done = match self.tombs.get_mut(&service) {
            Some(Tomb {
                epoch: e,
                waiting: Some(waiting),
                ..
            }) if *e == epoch => {
                waiting.remove(from);
                waiting.is_empty()
            }
            _ => false,
        };
        done && self.unbury(service, epoch)
    }

    /// Removes the tombstone `service` left at `epoch`. Returns true when there was one.
    pub fn unbury(&mut self, service: ServiceId, epoch: u64) -> bool {
        if self.tombs.get(&service).map(|t| t.epoch) != Some(epoch) {
            return false;
        }
        self.tombs.remove(&service);
        self.clean_order();
        true
    }

    /// The service is back here (a newer copy restored): its tombstone goes, whatever epoch.
    pub fn remove(&mut self, service: ServiceId) {
        if self.tombs.remove(&service).is_some() {
            self.clean_order();
        }
    }

    fn clean_order(&mut self) {
        if self.order.len() > 2 * self.tombs.len() + 64 {
            let tombs = &self.tombs;
            self.order
                .retain(|(s, b)| tombs.get(s).is_some_and(|t| t.burial == *b));
        }
    }

    /// The epoch at which `service` left, if its tombstone is here.
    pub fn epoch(&self, service: ServiceId) -> Option<u64> {
        self.tombs.get(&service).map(|t| t.epoch)
    }

    /// Tombstones kept.
    pub fn len(&self) -> usize {
        self.tombs.len()
    }

    /// True when none is kept.
    pub fn is_empty(&self) -> bool {
        self.tombs.is_empty()
    }

    /// A message for `service`, sent from node `origin`, reached node `me`, where the service
    /// is not. With a tombstone here and a location (`located`: the newest this node knows,
    /// never older than the tombstone), it goes on there, and `origin` is told where the
    /// service went the first time (unless it is this node or the destination). `None`: no
    /// tombstone (or nowhere to go): the message is refused to its sender.
    pub fn hand_on(
        &mut self,
        me: &NodeName,
        service: ServiceId,
        origin: &NodeName,
        located: Option<(NodeName, u64)>,
    ) -> Option<HandOn> {
        let tomb = self.tombs.get(&service)?;
        let (at, epoch) = located?;
        debug_assert!(
            epoch >= tomb.epoch,
            "a location is never older than a tombstone"
        );
        if at == *me {
            return None;
        }
        let notify = (origin != me && *origin != at && self.first_notice(service, origin, epoch))
            .then(|| origin.clone());
        Some(HandOn { at, epoch, notify })
    }

    /// Node `node` is gone (its link went down): it may come back as a new run that knows
    /// nothing, so the notices it was sent are forgotten and it is told again.
    pub fn forget_notices_to(&mut self, node: &NodeName) {
        self.told.retain(|(_, n, _)| n != node);
    }

    /// The notice `hand_on` asked for could not be sent (no link to `origin` now): it is not
    /// counted as told, so the next hand-on tries again.
    pub fn notice_unsent(&mut self, service: ServiceId, origin: &NodeName, epoch: u64) {
        self.told.remove(&(service, origin.clone(), epoch));
    }

    fn first_notice(&mut self, service: ServiceId, origin: &NodeName, epoch: u64) -> bool {
        if self.told.len() >= NOTICES_MAX {
            self.told.clear();
        }
        self.told.insert((service, origin.clone(), epoch))
    }
}

/// Where a node sends the number it learned was refused (its own sender's), or a skip it
/// received: the newest of what its channel and its directory say, as `(node, epoch)`.
pub fn newest_location(
    channel: Option<(NodeName, u64)>,
    directory: Option<(NodeName, u64)>,
) -> Option<NodeName> {
    match (channel, directory) {
        (Some(c), Some(d)) => Some(if d.1 > c.1 { d.0 } else { c.0 }),
        (c, d) => c.or(d).map(|(n, _)| n),
    }
}

/// Times a skip or a gap waits (one progress tick each) for a link to where its service is
/// before it is dropped (about 12 s at the node's 20 ms tick).
pub const ROUTE_TRIES_MAX: u16 = 600;

/// What to do with a skip or a gap this node sends for a service (see [`route_notice`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Apply it here (the service is here, or nothing says where it is: the tombstone, if
    /// any, hands it on).
    Here,
    /// Send it to this node.
    Send(NodeName),
    /// Wait for the next tick: the place it would go has no link (a lost node, until gossip
    /// says where the service went).
    Wait,
    /// Give up after [`ROUTE_TRIES_MAX`] waits (the node logs it).
    Drop,
}

/// Where a skip of a refused number or a gap of numbers declared lost goes: `at`, the newest
/// place the node knows ([`newest_location`]), if it has a link there (`linked`); while it has
/// none, it waits, `tries` times so far. A notice dropped at a node with no link would leave
/// its number a hole the live window waits on.
///
/// ```
/// use tern_proto::forward::{route_notice, Route, ROUTE_TRIES_MAX};
/// use tern_proto::ids::NodeName;
///
/// let (me, b) = (NodeName::new("a"), NodeName::new("b"));
/// assert_eq!(route_notice(&me, Some(b.clone()), |_| true, 0), Route::Send(b.clone()));
/// assert_eq!(route_notice(&me, Some(b.clone()), |_| false, 3), Route::Wait);
/// assert_eq!(route_notice(&me, Some(b), |_| false, ROUTE_TRIES_MAX), Route::Drop);
/// assert_eq!(route_notice(&me, None, |_| false, 0), Route::Here);
/// ```
pub fn route_notice(
    me: &NodeName,
    at: Option<NodeName>,
    linked: impl Fn(&NodeName) -> bool,
    tries: u16,
) -> Route {
    match at {
        None => Route::Here,
        Some(at) if at == *me => Route::Here,
        Some(at) if linked(&at) => Route::Send(at),
        Some(_) if tries < ROUTE_TRIES_MAX => Route::Wait,
        Some(_) => Route::Drop,
    }
}

/// Whether a channel pointing at `points` (`(node, epoch)`), a node that is gone or that said
/// it does not know the service, follows membership gossip, which last listed the service at
/// `gossip`: only to another node, and only to a place at least as new as its own (a refusal
/// may be about a message sent long ago, and gossip may be older than the channel). Returns
/// where to point.
///
/// ```
/// use tern_proto::forward::follow_gossip;
/// use tern_proto::ids::NodeName;
///
/// let (a, b) = (NodeName::new("a"), NodeName::new("b"));
/// assert_eq!(follow_gossip((a.clone(), 2), Some((b.clone(), 3))), Some((b.clone(), 3)));
/// assert_eq!(follow_gossip((a.clone(), 3), Some((b, 2))), None, "gossip is older");
/// assert_eq!(follow_gossip((a.clone(), 1), Some((a, 4))), None, "the same node");
/// ```
pub fn follow_gossip(
    points: (NodeName, u64),
    gossip: Option<(NodeName, u64)>,
) -> Option<(NodeName, u64)> {
    gossip.filter(|(n, e)| *n != points.0 && *e >= points.1)
}

/// Nodes a skip may be handed on by before it is dropped.
pub const SKIP_HOPS_MAX: u8 = 8;

/// Where a skip that the local inbox could not take (none here, or it moved) goes next, after
/// `hops` nodes handed it on: the tombstone's node, else the directory's if it is not this
/// one. A tombstone points to a newer epoch; a directory may be stale, and two stale ones may
/// point at each other, hence the bound on hops. `None`: nowhere (dropped, with an event).
pub fn skip_next_hop(
    me: &NodeName,
    tombstone: Option<NodeName>,
    directory: Option<NodeName>,
    hops: u8,
) -> Option<NodeName> {
    if hops >= SKIP_HOPS_MAX {
        return None;
    }
    tombstone.or_else(|| directory.filter(|at| at != me))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeName {
        NodeName::new(s)
    }

    fn s(i: u8) -> ServiceId {
        ServiceId::from_parts(1, u64::from(i))
    }

    #[test]
    fn a_node_that_was_lost_is_told_again() {
        let mut t = Tombstones::new(4);
        t.bury(s(1), 2);
        let here = Some((n("b"), 2));
        let first = t.hand_on(&n("a"), s(1), &n("c"), here.clone());
        assert_eq!(first.and_then(|h| h.notify), Some(n("c")));
        assert_eq!(
            t.hand_on(&n("a"), s(1), &n("c"), here.clone())
                .and_then(|h| h.notify),
            None
        );
        t.forget_notices_to(&n("c"));
        assert_eq!(
            t.hand_on(&n("a"), s(1), &n("c"), here.clone())
                .and_then(|h| h.notify),
            Some(n("c"))
        );
        // A notice that could not be sent is not counted as told.
        t.notice_unsent(s(1), &n("c"), 2);
        assert_eq!(
            t.hand_on(&n("a"), s(1), &n("c"), here)
                .and_then(|h| h.notify),
            Some(n("c"))
        );
    }

    #[test]
    fn a_tombstone_hands_on_and_tells_each_sender_node_once() {
        let mut t = Tombstones::new(8);
        t.bury(s(1), 2);
        let at = Some((n("b"), 2));
        let first = t.hand_on(&n("a"), s(1), &n("c"), at.clone());
        assert_eq!(
            first,
            Some(HandOn {
                at: n("b"),
                epoch: 2,
                notify: Some(n("c"))
            })
        );
        let again = t
            .hand_on(&n("a"), s(1), &n("c"), at.clone())
            .expect("hands on");
        assert_eq!(again.notify, None, "one notice per sender node and epoch");
        let own = t
            .hand_on(&n("a"), s(1), &n("a"), at.clone())
            .expect("hands on");
        assert_eq!(
            own.notify, None,
            "this node's own senders follow its directory"
        );
        let dest = t.hand_on(&n("a"), s(1), &n("b"), at).expect("hands on");
        assert_eq!(dest.notify, None, "the destination knows");
        let newer = t
            .hand_on(&n("a"), s(1), &n("c"), Some((n("d"), 3)))
            .expect("hands on");
        assert_eq!(newer.notify, Some(n("c")), "a newer epoch is news");
        assert_eq!(t.hand_on(&n("a"), s(2), &n("c"), Some((n("b"), 1))), None);
        assert_eq!(
            t.hand_on(&n("a"), s(1), &n("c"), Some((n("a"), 4))),
            None,
            "a location pointing back here is nowhere to go"
        );
    }

    #[test]
    fn the_last_fence_awaited_lets_the_tombstone_go() {
        let mut t = Tombstones::new(8);
        t.bury(s(1), 2);
        assert!(!t.fenced(&n("b"), s(1), 2), "not told whom to wait for yet");
        assert!(t.await_fences(s(1), 2, [n("b"), n("c")]));
        assert!(!t.await_fences(s(1), 1, [n("b")]), "another epoch");
        assert!(!t.fenced(&n("b"), s(1), 1), "a fence of an older epoch");
        assert!(!t.fenced(&n("b"), s(1), 2));
        assert_eq!(t.len(), 1);
        assert!(t.fenced(&n("c"), s(1), 2));
        assert_eq!(t.len(), 0);
        assert_eq!(t.hand_on(&n("a"), s(1), &n("c"), Some((n("b"), 2))), None);
        assert!(!t.fenced(&n("c"), s(1), 2), "gone already");
    }

    #[test]
    fn the_table_keeps_its_bound_oldest_first() {
        let mut t = Tombstones::new(2);
        assert!(t.bury(s(1), 1).is_empty());
        assert!(t.bury(s(2), 1).is_empty());
        assert!(t.bury(s(2), 2).is_empty(), "reburied, still one");
        assert_eq!(t.bury(s(3), 1), vec![s(1)]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.epoch(s(1)), None);
        assert_eq!(t.epoch(s(2)), Some(2));
        t.remove(s(2));
        assert_eq!(t.epoch(s(2)), None);
        for i in 0..200u8 {
            t.bury(s(i), 1);
            t.unbury(s(i), 1);
        }
        assert!(t.order.len() <= 2 * t.tombs.len() + 64, "order cleaned");
    }

    #[test]
    fn a_service_buried_again_is_not_evicted_for_its_former_burial() {
        let mut t = Tombstones::new(2);
        t.bury(s(1), 1);
        assert!(t.unbury(s(1), 1));
        t.bury(s(2), 1);
        t.bury(s(1), 3);
        assert_eq!(t.bury(s(3), 1), vec![s(2)], "the oldest burial goes");
        assert_eq!(t.epoch(s(1)), Some(3));
    }

    #[test]
    fn notices_stay_bounded() {
        let mut t = Tombstones::new(1);
        t.bury(s(1), 1);
        for i in 0..(NOTICES_MAX as u64 + 10) {
            let origin = NodeName::new(&format!("n{i}"));
            t.hand_on(&n("a"), s(1), &origin, Some((n("b"), 1)));
            assert!(t.told.len() <= NOTICES_MAX);
        }
    }

    #[test]
    fn skips_go_to_the_newest_location_and_stop_after_the_hop_bound() {
        assert_eq!(
            newest_location(Some((n("b"), 1)), Some((n("c"), 2))),
            Some(n("c"))
        );
        assert_eq!(
            newest_location(Some((n("b"), 2)), Some((n("c"), 2))),
            Some(n("b"))
        );
        assert_eq!(newest_location(None, None), None);
        assert_eq!(
            skip_next_hop(&n("a"), Some(n("b")), Some(n("c")), 0),
            Some(n("b"))
        );
        assert_eq!(skip_next_hop(&n("a"), None, Some(n("a")), 0), None);
        assert_eq!(
            skip_next_hop(&n("a"), Some(n("b")), None, SKIP_HOPS_MAX),
            None
        );
    }
}
