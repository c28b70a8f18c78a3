//! The answers a service gave to the asks it took last, so that a copy of one of those asks is
//! answered the same way instead of being dropped unanswered.
//!
//! A receiver's windows drop a message whose number was already taken. For a tell that is
//! exactly right; for an ask it leaves the asker waiting for an answer that never comes. Copies
//! of asks arrive when a replicated service re-executes, after a takeover, handlers that asked
//! before the checkpoint it was restored from (its checkpointed send counters give the asks the
//! same numbers), or when a handle sends again what a lost copy of a replicated receiver had
//! not confirmed. The runner keeps, per service, the encoded answer to each of the last
//! [`REPLIES_KEPT_MAX`] asks it took (at most [`REPLY_BYTES_KEPT_MAX`] bytes), carried in its
//! snapshots and checkpoints: a copy of a kept ask gets the kept answer; a copy of an ask not
//! answered yet (still queued, or answered later from the state) gets the answer when it is
//! given; a copy of an ask whose answer is no longer kept is failed at once, with the reason.

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};

use tern_proto::ids::ServiceId;
use tern_proto::wire::KeptReply;

use crate::mailbox::AskOrigin;

/// Asks whose answers a service keeps: the last ones it took.
pub const REPLIES_KEPT_MAX: usize = 128;
/// Bytes of answers a service keeps; the oldest go first past it.
pub const REPLY_BYTES_KEPT_MAX: usize = 64 << 10;
/// Askers of one ask, besides the first, that wait for its answer (copies sent while it was
/// not answered yet); past it a copy is failed.
pub const REPEAT_ASKERS_MAX: usize = 4;

/// An ask taken, by its asker and number.
type Key = (ServiceId, u64);

enum Kept {
    /// Not answered yet: the answer goes to `origin` (the asker of the copy the service took;
    /// `None` while that copy is still queued) and to each of `also`.
    Waiting {
        origin: Option<AskOrigin>,
        also: Vec<AskOrigin>,
    },
    /// Answered: the answer, MessagePack.
    Answered(Vec<u8>),
}

/// What to do with a copy of an ask ([`Replies::repeat`]).
pub(crate) enum Repeat {
    /// Send it this answer.
    Answer(Vec<u8>),
    /// It gets the answer when the service gives it.
    Waits,
    /// Its answer is not kept (or too many copies wait): fail it, with this reason.
    Fail(String),
}

/// One service's kept answers.
#[derive(Default)]
pub(crate) struct Replies {
    kept: BTreeMap<Key, Kept>,
    /// Keys in the order they were first seen: the oldest go first.
    order: VecDeque<Key>,
    bytes: usize,
}

impl Replies {
    /// The answers carried in a snapshot or checkpoint.
    pub fn import(list: Vec<KeptReply>) -> Self {
        let mut r = Replies::default();
        for k in list {
            r.insert((k.from, k.seq), Kept::Answered(k.value));
        }
        r
    }

    /// The answers kept, for a snapshot or a checkpoint.
    pub fn export(&self) -> Vec<KeptReply> {
        self.order
            .iter()
            .filter_map(|key| match self.kept.get(key) {
                Some(Kept::Answered(v)) => Some(KeptReply {
                    from: key.0,
                    seq: key.1,
                    value: v.clone(),
                }),
                _ => None,
            })
            .collect()
    }

    fn insert(&mut self, key: Key, kept: Kept) {
        if let Kept::Answered(v) = &kept {
            self.bytes += v.len();
        }
        match self.kept.insert(key, kept) {
            Some(Kept::Answered(old)) => self.bytes -= old.len(),
            Some(Kept::Waiting { .. }) => {}
            None => self.order.push_back(key),
        }
        while self.order.len() > REPLIES_KEPT_MAX || self.bytes > REPLY_BYTES_KEPT_MAX {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(Kept::Answered(v)) = self.kept.remove(&oldest) {
                self.bytes -= v.len();
            }
        }
        debug_assert_eq!(self.order.len(), self.kept.len());
    }

    /// The service takes ask `seq` of `from`, to be answered at `origin`.
    pub fn taking(&mut self, from: ServiceId, seq: u64, origin: AskOrigin) {
        match self.kept.get_mut(&(from, seq)) {
            Some(Kept::Waiting { origin: o, .. }) => *o = Some(origin),
            Some(Kept::Answered(_)) => {}
            None => self.insert(
                (from, seq),
                Kept::Waiting {
                    origin: Some(origin),
                    also: Vec::new(),
                },
            ),
        }
    }

    fn find(&self, to: &AskOrigin) -> Option<Key> {
        // Most answers are to the ask in hand: the newest first.
        self.order.iter().rev().copied().find(|key| {
            matches!(self.kept.get(key), Some(Kept::Waiting { origin: Some(o), .. })
                if o.node == to.node && o.ask == to.ask)
        })
    }

    /// The service answered `to`: if that answers a kept ask, the answer (MessagePack, from
    /// `encode`, called only then) is kept, and comes back with the other askers that wait
    /// for it. `None` when `to` is not a kept ask (or the answer does not encode).
    pub fn answered(
        &mut self,
        to: &AskOrigin,
        encode: impl FnOnce() -> Option<Vec<u8>>,
    ) -> Option<(Cow<'_, [u8]>, Vec<AskOrigin>)> {
        let key = self.find(to)?;
        let value = encode()?;
        let also = match self.kept.remove(&key) {
            Some(Kept::Waiting { also, .. }) => also,
            _ => Vec::new(),
        };
        self.order.retain(|k| *k != key);
        if value.len() > REPLY_BYTES_KEPT_MAX {
            // Too large to keep: the askers waiting now still get it; a later copy is failed.
            return Some((Cow::Owned(value), also));
        }
        self.insert(key, Kept::Answered(value));
        match self.kept.get(&key) {
            Some(Kept::Answered(v)) => Some((Cow::Borrowed(v.as_slice()), also)),
            _ => None,
        }
    }

    /// A copy of ask `seq` of `from`, to be answered at `origin`; `queued`: its first copy is
    /// still queued here.
    pub fn repeat(&mut self, from: ServiceId, seq: u64, origin: AskOrigin, queued: bool) -> Repeat {
        match self.kept.get_mut(&(from, seq)) {
            Some(Kept::Answered(v)) => Repeat::Answer(v.clone()),
            Some(Kept::Waiting { also, .. }) if also.len() < REPEAT_ASKERS_MAX => {
                also.push(origin);
                Repeat::Waits
            }
            Some(Kept::Waiting { .. }) => Repeat::Fail(format!(
                "ask {seq} from {from} was sent again more than {REPEAT_ASKERS_MAX} times"
            )),
            None if queued => {
                self.insert(
                    (from, seq),
                    Kept::Waiting {
                        origin: None,
                        also: vec![origin],
                    },
                );
                Repeat::Waits
            }
            None => Repeat::Fail(format!(
                "ask {seq} from {from} was taken here before, and its answer is no longer kept \
                 (the last {REPLIES_KEPT_MAX} answers, at most {REPLY_BYTES_KEPT_MAX} bytes, are)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::ids::NodeName;

    fn at(node: &str, ask: u64) -> AskOrigin {
        AskOrigin {
            node: NodeName::new(node),
            ask,
        }
    }

    #[test]
    fn a_copy_of_an_ask_gets_the_kept_answer_or_waits_for_it_or_is_failed() {
        let s = ServiceId::from_parts(1, 1);
        let mut r = Replies::default();
        r.taking(s, 1, at("a", 10));
        assert!(r.answered(&at("a", 11), || Some(vec![9])).is_none());
        let (v, also) = r.answered(&at("a", 10), || Some(vec![1])).expect("kept");
        assert!(v.as_ref() == [1] && also.is_empty());
        // The asker re-executed elsewhere: same number, new asker.
        assert!(matches!(r.repeat(s, 1, at("b", 3), false), Repeat::Answer(v) if v == [1]));
        // A copy of an ask still queued waits for the answer, which goes to both.
        assert!(matches!(r.repeat(s, 2, at("b", 4), true), Repeat::Waits));
        r.taking(s, 2, at("a", 11));
        let (_, also) = r.answered(&at("a", 11), || Some(vec![2])).expect("kept");
        assert_eq!(also.len(), 1);
        assert_eq!((also[0].node.as_str(), also[0].ask), ("b", 4));
        // An ask answered later, from the state: copies wait, at most REPEAT_ASKERS_MAX.
        r.taking(s, 3, at("a", 12));
        for i in 0..REPEAT_ASKERS_MAX as u64 {
            assert!(matches!(
                r.repeat(s, 3, at("b", 20 + i), false),
                Repeat::Waits
            ));
        }
        assert!(matches!(
            r.repeat(s, 3, at("b", 99), false),
            Repeat::Fail(_)
        ));
        // Never taken here and not queued: failed.
        assert!(matches!(r.repeat(s, 9, at("b", 5), false), Repeat::Fail(_)));
        // What travels is the answers.
        let out = r.export();
        assert_eq!(
            out.iter()
                .map(|k| (k.seq, k.value.clone()))
                .collect::<Vec<_>>(),
            vec![(1, vec![1]), (2, vec![2])]
        );
        let mut back = Replies::import(out);
        assert!(matches!(back.repeat(s, 2, at("c", 1), false), Repeat::Answer(v) if v == [2]));
    }

    #[test]
    fn kept_answers_are_bounded_in_count_and_bytes() {
        let s = ServiceId::from_parts(1, 1);
        let mut r = Replies::default();
        for i in 0..(REPLIES_KEPT_MAX as u64 + 10) {
            r.taking(s, i, at("a", i));
            r.answered(&at("a", i), || Some(vec![0; 8]));
        }
        assert_eq!(r.export().len(), REPLIES_KEPT_MAX);
        assert!(matches!(r.repeat(s, 0, at("b", 1), false), Repeat::Fail(_)));
        r.taking(s, 1_000, at("a", 1_000));
        r.answered(&at("a", 1_000), || Some(vec![0; REPLY_BYTES_KEPT_MAX]));
        // Too large to keep: given to who waits, not kept.
        r.taking(s, 2_000, at("a", 2_000));
        assert!(matches!(
            r.repeat(s, 2_000, at("b", 7), false),
            Repeat::Waits
        ));
        let (v, also) = r
            .answered(&at("a", 2_000), || Some(vec![0; REPLY_BYTES_KEPT_MAX + 1]))
            .expect("given");
        assert!(v.len() == REPLY_BYTES_KEPT_MAX + 1 && also.len() == 1);
        assert!(matches!(
            r.repeat(s, 2_000, at("b", 8), false),
            Repeat::Fail(_)
        ));
        assert!(r.bytes <= REPLY_BYTES_KEPT_MAX);
        assert_eq!(r.order.len(), r.kept.len());
    }
}
