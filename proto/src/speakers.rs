//! Who may make claims about a sender, and who may hand on what was sent to a service.
//!
//! A receive window believes what it is told about its sender: a message's number, a `Gap`
//! (numbers lost with a node), a `Skipped` number (refused on the way), a `Closed` sender. A
//! peer that could say these things about any sender could silence it: move its window past
//! numbers not yet delivered, so the real messages are dropped as copies. So a claim about
//! sender `X` is believed only from a node that **speaks for** `X`, or from a node that **had
//! custody** of the service the claim is addressed to (it hosted it, or held a copy of it, and
//! hands on what reached it there, having checked it itself).
//!
//! **Speakers.** Every service id carries its birth node's tag in the top half of its prefix
//! ([`prefix_for`], [`born_at`]), and a node's name comes from its certificate, so the node a
//! sender was born on is known without asking. A sender that moved speaks from its new node;
//! a node that sees it speak from there for the first time asks the node it believes speaks
//! for it (first its birth node), which answers from its own records ([`SpeakerAnswer`]):
//! here, moved to another node (then that node is asked in turn, a bounded number of times),
//! gone, or unknown. Until the answer, the claims wait (the node holds the stream they came
//! on). Former speakers stay believed (the last [`PAST_SPEAKERS_MAX`], and the birth node
//! always), so what a sender sent before it moved is still taken when it arrives late. A node
//! that knows and says otherwise, or does not answer in time, has the claim refused. When
//! nobody can vouch (the node that knows is away, restarted and forgot, or was never heard
//! of), the first node that speaks for the sender is believed: a sender must not go silent
//! because the device it was born on left. That is the one opening left (docs/security.md).
//!
//! **Custody.** Messages, skips, gaps and closes for a service that moved are handed on by
//! the nodes it left (their tombstones) and by the target of an attempt that was aborted.
//! Each node keeps, per service that moved through it, the nodes that had custody of it (the
//! snapshot carries the list on) and the targets of its attempts from here ([`Custody`]).
//!
//! Everything here is pure: the node holds the streams and sends the questions; the
//! data-plane simulation drives the same tables.

use std::collections::{HashSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::claims::ClaimRefused;
use crate::ids::{IdMap, NodeName, ServiceId};

/// Senders a node remembers a speaker for (past this, the oldest record goes, and the sender
/// is traced from its birth node again when it next speaks from elsewhere).
pub const SPEAKERS_MAX: usize = 65_536;
/// Former speakers remembered per sender.
pub const PAST_SPEAKERS_MAX: usize = 4;
/// Senders being asked about at once; past this a claim that needs a question is refused.
pub const ASKING_MAX: usize = 4096;
/// Nodes waiting for one answer about one sender; past this the claim is refused.
pub const CANDIDATES_MAX: usize = 8;
/// Answers followed for one question (a sender that moved this many times while the
/// question chased it is not vouched for).
pub const ANSWER_HOPS_MAX: u8 = 8;
/// Services a node keeps custody lists for.
pub const CUSTODY_SERVICES_MAX: usize = 65_536;
/// Nodes in one service's custody list (the most recent are kept).
pub const CUSTODY_NODES_MAX: usize = 16;

/// A node name's tag: 32 bits of FNV-1a over its bytes. Stable across builds and machines.
pub fn name_tag(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The id prefix for node `name` in one run: its tag, then 32 random bits drawn at start (so
/// a restarted node mints new ids).
///
/// ```
/// use tern_proto::ids::{NodeName, ServiceId};
/// use tern_proto::speakers::{born_at, prefix_for};
/// let phone = NodeName::new("phone");
/// let id = ServiceId::from_parts(prefix_for(&phone, 7), 1);
/// assert!(born_at(id, &phone) && !born_at(id, &NodeName::new("tv")));
/// ```
pub fn prefix_for(name: &NodeName, random: u32) -> u64 {
    (u64::from(name_tag(name.as_str())) << 32) | u64::from(random)
}

/// Whether service id `id` was minted on node `name` (in any of its runs).
pub fn born_at(id: ServiceId, name: &NodeName) -> bool {
    (id.prefix() >> 32) as u32 == name_tag(name.as_str())
}

/// A node's answer to "who speaks for this sender now?".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpeakerAnswer {
    /// It runs here.
    Here,
    /// It moved to this node (as far as the answering node knows).
    Moved(NodeName),
    /// It was born here, in this run, and is gone (stopped).
    Gone,
    /// Nothing known of it here.
    Unknown,
}

/// What to do with a claim about a sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The peer speaks for it: take the claim.
    Speaks,
    /// Nobody has been asked yet: ask this node (perhaps this one: answer it from its own
    /// records), and hold the claim until the answer.
    Ask(NodeName),
    /// A question is out already: hold the claim until its answer.
    Wait,
    /// Not believed: refuse the claim.
    Refused(ClaimRefused),
}

/// What an answer settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The question is closed: every held claim is to be checked again.
    Done,
    /// The sender moved on: ask this node next (the claims still wait).
    AskNext(NodeName),
}

/// A map keyed by service id that keeps at most `max` keys: a new key past the bound pushes
/// out the oldest one.
#[derive(Debug)]
struct Bounded<V> {
    map: IdMap<V>,
    order: VecDeque<ServiceId>,
    max: usize,
}

impl<V> Bounded<V> {
    fn new(max: usize) -> Self {
        Bounded {
            map: IdMap::default(),
            order: VecDeque::new(),
            max,
        }
    }

    /// The value of `key`, made by `make` (after the oldest key went, if full) when new.
    fn get_or_insert_with(&mut self, key: ServiceId, make: impl FnOnce() -> V) -> &mut V {
        if !self.map.contains_key(&key) {
            while self.map.len() >= self.max {
                match self.order.pop_front() {
                    Some(old) => {
                        self.map.remove(&old);
                    }
                    None => break,
                }
            }
            self.order.push_back(key);
        }
        self.map.entry(key).or_insert_with(make)
    }
}

#[derive(Debug)]
struct Entry {
    now: NodeName,
    past: Vec<NodeName>,
}

impl Entry {
    fn speaks(&self, peer: &NodeName) -> bool {
        self.now == *peer || self.past.contains(peer)
    }

    /// `node` speaks for the sender now; the one that did before is kept as a former speaker.
    fn move_to(&mut self, node: NodeName) {
        if self.now == node {
            return;
        }
        let old = std::mem::replace(&mut self.now, node);
        self.past.retain(|p| *p != old && *p != self.now);
        self.past.insert(0, old);
        self.past.truncate(PAST_SPEAKERS_MAX);
    }
}

#[derive(Debug)]
struct Asking {
    asked: NodeName,
    candidates: Vec<NodeName>,
    hops: u8,
}

/// One node's table of who speaks for which sender. See the [module documentation](self).
#[derive(Debug)]
pub struct Speakers {
    me: NodeName,
    entries: Bounded<Entry>,
    asking: IdMap<Asking>,
    /// Candidates an answer did not vouch for, each refused once when its held claim is
    /// checked again.
    denied: HashSet<(ServiceId, NodeName)>,
}

impl Speakers {
    /// An empty table for node `me`.
    pub fn new(me: NodeName) -> Self {
        Speakers {
            me,
            entries: Bounded::new(SPEAKERS_MAX),
            asking: IdMap::default(),
            denied: HashSet::new(),
        }
    }

    /// Senders with a record.
    pub fn len(&self) -> usize {
        self.entries.map.len()
    }

    /// True when no sender has a record.
    pub fn is_empty(&self) -> bool {
        self.entries.map.is_empty()
    }

    /// Questions out.
    pub fn asking(&self) -> usize {
        self.asking.len()
    }

    /// The node recorded as speaking for `from` now, if any.
    pub fn recorded(&self, from: ServiceId) -> Option<&NodeName> {
        self.entries.map.get(&from).map(|e| &e.now)
    }

    fn entry(&mut self, from: ServiceId, now: NodeName) -> &mut Entry {
        self.entries.get_or_insert_with(from, || Entry {
            now,
            past: Vec::new(),
        })
    }

    /// Whether `peer` speaks for `from` as far as the table knows, without asking anyone: its
    /// birth node, or a node its record names. The common case, checked before anything
    /// that needs the peer list ([`check`](Self::check) does the rest).
    pub fn speaks(&self, from: ServiceId, peer: &NodeName) -> bool {
        born_at(from, peer) || self.entries.map.get(&from).is_some_and(|e| e.speaks(peer))
    }

    /// Checks a claim about sender `from` made by `peer`. `birth` names the known node whose
    /// tag `from` carries (this one included), if any; it is called only when needed.
    pub fn check(
        &mut self,
        from: ServiceId,
        peer: &NodeName,
        birth: impl FnOnce() -> Option<NodeName>,
    ) -> Verdict {
        if !self.denied.is_empty() && self.denied.remove(&(from, peer.clone())) {
            return Verdict::Refused(refusal(
                from,
                peer,
                "the node that speaks for it does not vouch for this one",
            ));
        }
        if born_at(from, peer) {
            // Its birth node: always a speaker for it (first or former), and the common
            // case, checked without the table.
            return Verdict::Speaks;
        }
        let ask = match self.entries.map.get(&from) {
            Some(e) if e.speaks(peer) => return Verdict::Speaks,
            Some(e) => e.now.clone(),
            None => match birth() {
                Some(b) => b,
                None => {
                    // Nobody to ask: the first node that speaks for it is believed.
                    self.entry(from, peer.clone());
                    return Verdict::Speaks;
                }
            },
        };
        if let Some(a) = self.asking.get_mut(&from) {
            if a.candidates.contains(peer) {
                return Verdict::Wait;
            }
            if a.candidates.len() >= CANDIDATES_MAX {
                return Verdict::Refused(refusal(from, peer, "too many nodes claim it at once"));
            }
            a.candidates.push(peer.clone());
            return Verdict::Wait;
        }
        if self.asking.len() >= ASKING_MAX {
            return Verdict::Refused(refusal(from, peer, "too many senders being traced"));
        }
        self.asking.insert(
            from,
            Asking {
                asked: ask.clone(),
                candidates: vec![peer.clone()],
                hops: 0,
            },
        );
        Verdict::Ask(ask)
    }

    /// Node `by` answered about `from`. Refused when no question about `from` went to `by`.
    pub fn answered(
        &mut self,
        from: ServiceId,
        by: &NodeName,
        answer: SpeakerAnswer,
    ) -> Result<Settled, ClaimRefused> {
        let Some(a) = self.asking.get_mut(&from).filter(|a| a.asked == *by) else {
            return Err(ClaimRefused {
                claim: "speaker",
                detail: format!("an answer about {from} that was not asked of {by}"),
            });
        };
        let vouched = match answer {
            SpeakerAnswer::Here | SpeakerAnswer::Gone => None,
            SpeakerAnswer::Moved(next) => {
                if a.candidates.contains(&next) {
                    Some(next)
                } else if a.hops < ANSWER_HOPS_MAX && next != *by {
                    a.hops += 1;
                    a.asked = next.clone();
                    let e = self.entry(from, by.clone());
                    e.move_to(by.clone());
                    e.move_to(next.clone());
                    return Ok(Settled::AskNext(next));
                } else {
                    None
                }
            }
            // The node asked knows nothing of it (it restarted and forgot): nobody can vouch,
            // and the first node that spoke for it is believed (see `give_up`).
            SpeakerAnswer::Unknown => a.candidates.first().cloned(),
        };
        let candidates = self
            .asking
            .remove(&from)
            .map(|a| a.candidates)
            .unwrap_or_default();
        let e = self.entry(from, by.clone());
        e.move_to(by.clone());
        if let Some(v) = &vouched {
            e.move_to(v.clone());
        }
        for c in candidates {
            if Some(&c) != vouched.as_ref() {
                self.deny(from, c);
            }
        }
        Ok(Settled::Done)
    }

    /// The node asked about `from` cannot answer: when it is `lost` (no link to it), nobody
    /// can vouch, and the first node that spoke for the sender is believed (a sender must not
    /// go silent because the node it was born on left); when it is there and did not answer
    /// in time, every candidate is refused.
    pub fn give_up(&mut self, from: ServiceId, lost: bool) {
        let Some(a) = self.asking.remove(&from) else {
            return;
        };
        let mut candidates = a.candidates.into_iter();
        if lost {
            if let Some(first) = candidates.next() {
                self.entry(from, first.clone()).move_to(first);
            }
        }
        for c in candidates {
            self.deny(from, c);
        }
    }

    /// `peer`'s held claim about `from` is to be refused when checked again. Bounded: a held
    /// claim whose stream went before it was checked again leaves its refusal behind, and past
    /// `ASKING_MAX * CANDIDATES_MAX` such refusals some go (their claims are asked about anew).
    fn deny(&mut self, from: ServiceId, peer: NodeName) {
        while self.denied.len() >= ASKING_MAX * CANDIDATES_MAX {
            let Some(k) = self.denied.iter().next().cloned() else {
                break;
            };
            self.denied.remove(&k);
        }
        self.denied.insert((from, peer));
    }

    /// Node `by` says, unasked, where sender `from` speaks from now: the source of a
    /// migration tells every peer at its commit. Taken (true) only from the node that speaks
    /// for the sender now (its record, or its birth node when there is none), and only a
    /// move. Otherwise ignored: an honest source may be unknown here as the sender's node (a
    /// move this node missed), so this is no sign of a lie, and it changes nothing; the
    /// sender is traced by a question when it speaks from elsewhere.
    pub fn told(&mut self, from: ServiceId, by: &NodeName, answer: SpeakerAnswer) -> bool {
        let speaks = match self.entries.map.get(&from) {
            Some(e) => e.now == *by,
            None => born_at(from, by),
        };
        let SpeakerAnswer::Moved(next) = answer else {
            return false;
        };
        if !speaks {
            return false;
        }
        let e = self.entry(from, by.clone());
        e.move_to(by.clone());
        e.move_to(next);
        true
    }

    /// The node asked about `from`, if a question is out.
    pub fn asked(&self, from: ServiceId) -> Option<&NodeName> {
        self.asking.get(&from).map(|a| &a.asked)
    }

    /// Questions out to node `node` (to give up on when it is lost).
    pub fn asked_of(&self, node: &NodeName) -> Vec<ServiceId> {
        self.asking
            .iter()
            .filter(|(_, a)| a.asked == *node)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Sender `from` runs here now, having come from `source`: what `source` sent for it
    /// before is still believed.
    pub fn arrived(&mut self, from: ServiceId, source: &NodeName) {
        let me = self.me.clone();
        let e = self.entry(from, source.clone());
        e.move_to(source.clone());
        e.move_to(me);
    }

    /// This node believed that sender `from` runs on `at` now: a location that passed the
    /// checks of who may say so (a move's, or the takeover of a replicated service by the
    /// standby its host named, whose former node is gone and can answer nothing). `at` speaks
    /// for it from now on; a question out about it is settled (a candidate that is not `at`
    /// is checked again against the record).
    pub fn runs_at(&mut self, from: ServiceId, at: &NodeName) {
        let e = self.entry(from, at.clone());
        e.move_to(at.clone());
        self.asking.remove(&from);
    }

    /// Sender `from`, which ran here, moved to `to`: this node answers so when asked.
    pub fn moved_away(&mut self, from: ServiceId, to: &NodeName) {
        let me = self.me.clone();
        let e = self.entry(from, me.clone());
        e.move_to(me);
        e.move_to(to.clone());
    }
}

fn refusal(from: ServiceId, peer: &NodeName, why: &str) -> ClaimRefused {
    ClaimRefused {
        claim: "sender",
        detail: format!("{peer} does not speak for sender {from}: {why}"),
    }
}

/// Per service that moved through this node, the nodes that had custody of it: the nodes it
/// was on before (carried in its snapshot) and the targets of its attempts from here. Only
/// they hand on messages, skips, gaps and closes for it.
#[derive(Debug)]
pub struct Custody {
    lists: Bounded<Vec<NodeName>>,
}

impl Default for Custody {
    fn default() -> Self {
        Custody::new()
    }
}

impl Custody {
    /// An empty table.
    pub fn new() -> Self {
        Custody {
            lists: Bounded::new(CUSTODY_SERVICES_MAX),
        }
    }

    /// Services with a list.
    pub fn len(&self) -> usize {
        self.lists.map.len()
    }

    /// True when no service has a list.
    pub fn is_empty(&self) -> bool {
        self.lists.map.is_empty()
    }

    /// Whether `node` had custody of `service`.
    pub fn had(&self, service: ServiceId, node: &NodeName) -> bool {
        self.lists
            .map
            .get(&service)
            .is_some_and(|l| l.contains(node))
    }

    /// The list of `service`, most recent last (to carry in its snapshot).
    pub fn of(&self, service: ServiceId) -> Vec<NodeName> {
        self.lists.map.get(&service).cloned().unwrap_or_default()
    }

    /// `nodes` had custody of `service` (in order, most recent last).
    pub fn add(&mut self, service: ServiceId, nodes: impl IntoIterator<Item = NodeName>) {
        let list = self.lists.get_or_insert_with(service, Vec::new);
        for n in nodes {
            list.retain(|m| *m != n);
            list.push(n);
        }
        if list.len() > CUSTODY_NODES_MAX {
            let extra = list.len() - CUSTODY_NODES_MAX;
            list.drain(..extra);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeName {
        NodeName::new(s)
    }

    fn born(at: &str, c: u64) -> ServiceId {
        ServiceId::from_parts(prefix_for(&n(at), 9), c)
    }

    #[test]
    fn a_sender_speaks_from_its_birth_node_and_from_nowhere_else_unasked() {
        let mut s = Speakers::new(n("r"));
        let x = born("a", 1);
        assert_eq!(s.check(x, &n("a"), || None), Verdict::Speaks);
        // Another node claiming it: its birth node is asked, and the claim waits.
        assert_eq!(s.check(x, &n("m"), || Some(n("a"))), Verdict::Ask(n("a")));
        assert_eq!(s.check(x, &n("m"), || Some(n("a"))), Verdict::Wait);
        // a says it runs there: the liar's held claim is refused once checked again.
        assert_eq!(
            s.answered(x, &n("a"), SpeakerAnswer::Here),
            Ok(Settled::Done)
        );
        assert!(matches!(
            s.check(x, &n("m"), || Some(n("a"))),
            Verdict::Refused(_)
        ));
        assert_eq!(s.check(x, &n("a"), || None), Verdict::Speaks);
    }

    /// A replicated sender taken over on `b` after `a` died: `a` can answer nothing, and the
    /// takeover's location, once believed, makes `b` speak for it; the question out to `a`
    /// is settled, and `a` still speaks for what it sent.
    #[test]
    fn a_sender_whose_location_was_believed_speaks_from_there() {
        let mut s = Speakers::new(n("r"));
        let x = born("a", 1);
        assert_eq!(s.check(x, &n("b"), || Some(n("a"))), Verdict::Ask(n("a")));
        s.runs_at(x, &n("b"));
        assert_eq!(s.asking(), 0);
        assert_eq!(s.check(x, &n("b"), || Some(n("a"))), Verdict::Speaks);
        assert_eq!(s.check(x, &n("a"), || None), Verdict::Speaks);
        // Anyone else is traced from b.
        assert_eq!(s.check(x, &n("m"), || Some(n("a"))), Verdict::Ask(n("b")));
    }

    #[test]
    fn a_sender_that_moved_is_traced_and_its_former_node_still_speaks_for_what_it_sent() {
        let mut s = Speakers::new(n("r"));
        let x = born("a", 1);
        // x moved a -> b -> c; c speaks first.
        assert_eq!(s.check(x, &n("c"), || Some(n("a"))), Verdict::Ask(n("a")));
        assert_eq!(
            s.answered(x, &n("a"), SpeakerAnswer::Moved(n("b"))),
            Ok(Settled::AskNext(n("b")))
        );
        assert_eq!(s.check(x, &n("c"), || Some(n("a"))), Verdict::Wait);
        assert_eq!(
            s.answered(x, &n("b"), SpeakerAnswer::Moved(n("c"))),
            Ok(Settled::Done)
        );
        for peer in ["c", "b", "a"] {
            assert_eq!(s.check(x, &n(peer), || None), Verdict::Speaks, "{peer}");
        }
        assert_eq!(s.recorded(x), Some(&n("c")));
        // Only the node asked may answer.
        assert!(s.answered(x, &n("b"), SpeakerAnswer::Here).is_err());
    }

    #[test]
    fn an_answer_nobody_asked_for_is_refused_and_a_lost_node_cannot_hold_a_sender_hostage() {
        let mut s = Speakers::new(n("r"));
        let x = born("a", 1);
        assert!(s
            .answered(x, &n("m"), SpeakerAnswer::Moved(n("m")))
            .is_err());
        assert_eq!(s.check(x, &n("b"), || Some(n("a"))), Verdict::Ask(n("a")));
        assert_eq!(s.asked_of(&n("a")), vec![x]);
        // a is away: nobody can vouch, and the first node that spoke for x is believed.
        s.give_up(x, true);
        assert_eq!(s.check(x, &n("b"), || Some(n("a"))), Verdict::Speaks);
        // Silence from a node still there refuses the claim instead.
        let y = born("a", 2);
        assert_eq!(s.check(y, &n("m"), || Some(n("a"))), Verdict::Ask(n("a")));
        s.give_up(y, false);
        assert!(matches!(
            s.check(y, &n("m"), || Some(n("a"))),
            Verdict::Refused(_)
        ));
        // An answer that knows nothing: the first to speak for it is believed.
        let w = born("a", 3);
        assert_eq!(s.check(w, &n("b"), || Some(n("a"))), Verdict::Ask(n("a")));
        assert_eq!(
            s.answered(w, &n("a"), SpeakerAnswer::Unknown),
            Ok(Settled::Done)
        );
        assert_eq!(s.check(w, &n("b"), || None), Verdict::Speaks);
        // Unknown to everyone: the first to speak for it is believed.
        let z = born("gone", 1);
        assert_eq!(s.check(z, &n("b"), || None), Verdict::Speaks);
        assert_eq!(s.recorded(z), Some(&n("b")));
    }

    #[test]
    fn a_move_is_told_by_the_node_that_speaks_for_the_sender_and_by_no_other() {
        let mut s = Speakers::new(n("r"));
        let x = born("a", 1);
        assert!(!s.told(x, &n("m"), SpeakerAnswer::Moved(n("m"))));
        assert_eq!(s.recorded(x), None, "a lie changed nothing");
        assert!(s.told(x, &n("a"), SpeakerAnswer::Moved(n("b"))));
        assert_eq!(s.check(x, &n("b"), || None), Verdict::Speaks);
        // Now only b may tell where it goes next; a, a former speaker, may not.
        assert!(!s.told(x, &n("a"), SpeakerAnswer::Moved(n("m"))));
        assert!(!s.speaks(x, &n("m")) && s.speaks(x, &n("a")) && s.speaks(x, &n("b")));
        assert!(s.told(x, &n("b"), SpeakerAnswer::Moved(n("c"))));
        assert_eq!(s.recorded(x), Some(&n("c")));
    }

    #[test]
    fn this_nodes_own_moves_are_its_answers() {
        let mut s = Speakers::new(n("r"));
        let x = born("r", 1);
        s.moved_away(x, &n("b"));
        assert_eq!(s.recorded(x), Some(&n("b")));
        assert_eq!(s.check(x, &n("b"), || None), Verdict::Speaks);
        let y = born("a", 1);
        s.arrived(y, &n("a"));
        assert_eq!(s.recorded(y), Some(&n("r")));
        assert_eq!(s.check(y, &n("a"), || None), Verdict::Speaks);
        assert_eq!(s.check(y, &n("m"), || None), Verdict::Ask(n("r")));
    }

    #[test]
    fn claims_and_questions_are_bounded() {
        let mut s = Speakers::new(n("r"));
        let x = born("a", 1);
        for i in 0..CANDIDATES_MAX {
            let v = s.check(x, &n(&format!("m{i}")), || Some(n("a")));
            assert!(matches!(v, Verdict::Ask(_) | Verdict::Wait), "{v:?}");
        }
        assert!(matches!(
            s.check(x, &n("one-more"), || Some(n("a"))),
            Verdict::Refused(_)
        ));
        for c in 2..=(ASKING_MAX as u64) {
            assert!(matches!(
                s.check(born("a", c), &n("m"), || Some(n("a"))),
                Verdict::Ask(_)
            ));
        }
        assert!(matches!(
            s.check(born("a", 0), &n("m"), || Some(n("a"))),
            Verdict::Refused(_)
        ));
    }

    #[test]
    fn records_are_bounded_and_the_oldest_goes() {
        let mut s = Speakers::new(n("r"));
        // A node may tell where its own senders went: as many as it likes.
        for c in 0..(SPEAKERS_MAX as u64 + 10) {
            let x = born("m", c);
            assert!(s.told(x, &n("m"), SpeakerAnswer::Moved(n("z"))));
        }
        assert_eq!(s.len(), SPEAKERS_MAX);
        assert_eq!(s.recorded(born("m", 0)), None, "the oldest went");
        assert_eq!(
            s.recorded(born("m", SPEAKERS_MAX as u64 + 9)),
            Some(&n("z"))
        );
    }

    #[test]
    fn custody_lists_keep_the_most_recent_nodes() {
        let mut c = Custody::new();
        let t = born("a", 1);
        c.add(t, [n("a")]);
        c.add(t, (0..CUSTODY_NODES_MAX).map(|i| n(&format!("h{i}"))));
        assert!(!c.had(t, &n("a")), "the oldest went");
        assert!(c.had(t, &n("h0")) && c.had(t, &n(&format!("h{}", CUSTODY_NODES_MAX - 1))));
        assert_eq!(c.of(t).len(), CUSTODY_NODES_MAX);
        assert!(!c.had(born("a", 2), &n("h0")));
    }

    #[test]
    fn tags_are_stable() {
        // FNV-1a reference values: a change here changes every service id's meaning.
        assert_eq!(name_tag(""), 0x811c_9dc5);
        assert_eq!(name_tag("a"), 0xe40c_292c);
    }
}
