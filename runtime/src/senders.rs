//! The node's side of [`tern_proto::speakers`]: claims about senders (a message's `from`, a
//! gap, a skip, a close) believed only from the node that speaks for the sender, and things
//! handed on for a service (a `Forward`, a skip or close with hops) only from a node that had
//! custody of it. The rules and tables are in `tern-proto`; here the node holds the stream of
//! a claim that waits for an answer, asks and answers the questions, and keeps the tables
//! up to date as services arrive and leave.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_proto::claims::ClaimRefused;
use tern_proto::ids::{IdMap, NodeName, ServiceId};
use tern_proto::speakers::{born_at, Custody, Settled, SpeakerAnswer, Speakers, Verdict};
use tern_proto::wire::Frame;

use crate::node::NodeShared;
use crate::sync::lock;
use crate::transport::Flow;

/// How long a claim waits for the answer about its sender before it is refused.
pub const SPEAKER_WAIT: Duration = Duration::from_secs(5);

/// The tables and the wake-up of the streams that wait on them.
pub(crate) struct SenderTables {
    speakers: Mutex<Speakers>,
    custody: Mutex<Custody>,
    /// Bumped (under the speakers' lock) at every answer; a waiting stream looks again.
    generation: AtomicU64,
    changed: tokio::sync::Notify,
    /// Copies restored here and not started yet: the node they came from.
    arriving: Mutex<IdMap<NodeName>>,
}

impl SenderTables {
    pub fn new(me: NodeName) -> Self {
        SenderTables {
            speakers: Mutex::new(Speakers::new(me)),
            custody: Mutex::new(Custody::new()),
            generation: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
            arriving: Mutex::new(IdMap::default()),
        }
    }
}

/// What to do with a claim.
pub(crate) enum Claim {
    /// Believe it.
    Take,
    /// Hold the stream until the answer about the sender, then look again.
    Hold(Flow),
    /// Refuse it (logged, counted, answered with a protocol error).
    Refuse(ClaimRefused),
}

impl NodeShared {
    /// A claim by `peer` about sender `from` in a frame for service `to`; `handed`: handed on
    /// by a node on the service's way (a `Forward`, a skip or close with hops). `done`: the
    /// messages of the frame already delivered, for a held stream to go on from.
    pub(crate) fn sender_claim(
        self: &Arc<Self>,
        peer: &NodeName,
        (to, from): (ServiceId, ServiceId),
        handed: bool,
        done: usize,
    ) -> Claim {
        if !handed {
            // The common cases: a sender on the node it was born on (no lock), or where this
            // node knows it runs (one lookup).
            if born_at(from, peer) || lock(&self.senders.speakers).speaks(from, peer) {
                return Claim::Take;
            }
        }
        if lock(&self.senders.custody).had(to, peer) {
            return Claim::Take;
        }
        if handed {
            return Claim::Refuse(ClaimRefused {
                claim: "handed-on",
                detail: format!("{peer} never had service {to}, so hands on nothing for it"),
            });
        }
        // Only now the peer list: for a sender this node must trace.
        let birth = self.birth_of(from);
        let (verdict, seen) = {
            let mut s = lock(&self.senders.speakers);
            let v = s.check(from, peer, || birth);
            (v, self.senders.generation.load(Ordering::SeqCst))
        };
        match verdict {
            Verdict::Speaks => Claim::Take,
            Verdict::Refused(r) => Claim::Refuse(r),
            Verdict::Wait => Claim::Hold(self.wait_for_speaker(from, seen, done)),
            Verdict::Ask(at) => {
                self.ask_speaker(from, &at);
                Claim::Hold(self.wait_for_speaker(from, seen, done))
            }
        }
    }

    /// The known node whose tag sender `from` carries (this one included).
    fn birth_of(&self, from: ServiceId) -> Option<NodeName> {
        if born_at(from, self.name()) {
            return Some(self.name().clone());
        }
        self.links
            .all()
            .into_iter()
            .map(|l| l.name.clone())
            .find(|n| born_at(from, n))
    }

    fn changed(&self) {
        self.senders.generation.fetch_add(1, Ordering::SeqCst);
        self.senders.changed.notify_waiters();
    }

    /// Asks node `at` who speaks for `from` (this node answers itself at once).
    fn ask_speaker(self: &Arc<Self>, from: ServiceId, at: &NodeName) {
        if at == self.name() {
            let answer = self.speaker_answer(from);
            if let Err(r) = self.speaker_answered(from, at, answer) {
                tracing::debug!(%from, %r, "own answer about a sender not taken");
            }
            return;
        }
        let sent = self
            .links
            .get(at)
            .filter(|l| l.is_connected())
            .map(|l| l.push_ctrl(&Frame::WhoSpeaks { sender: from }));
        match sent {
            Some(Ok(())) => {}
            // Nobody can vouch while it is away.
            _ => {
                lock(&self.senders.speakers).give_up(from, true);
                self.changed();
            }
        }
    }

    /// Holds a stream until the answer about `from` (or [`SPEAKER_WAIT`], after which its
    /// candidates are refused).
    fn wait_for_speaker(self: &Arc<Self>, from: ServiceId, seen: u64, done: usize) -> Flow {
        let node = self.clone();
        Flow::Held {
            done,
            until: Box::pin(async move {
                let deadline = tokio::time::Instant::now() + SPEAKER_WAIT;
                loop {
                    let notified = node.senders.changed.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    if node.senders.generation.load(Ordering::SeqCst) != seen {
                        return;
                    }
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        lock(&node.senders.speakers).give_up(from, false);
                        node.changed();
                        return;
                    }
                }
            }),
        }
    }

    /// What this node knows of sender `from`, for a peer that asked.
    pub(crate) fn speaker_answer(&self, from: ServiceId) -> SpeakerAnswer {
        if let Some(now) = lock(&self.senders.speakers).recorded(from) {
            if now != self.name() {
                return SpeakerAnswer::Moved(now.clone());
            }
        }
        if self.slot(from).is_some() {
            SpeakerAnswer::Here
        } else if from.prefix() == self.id_prefix() {
            SpeakerAnswer::Gone
        } else {
            SpeakerAnswer::Unknown
        }
    }

    /// Node `by` answered the question about `from`.
    pub(crate) fn speaker_answered(
        self: &Arc<Self>,
        from: ServiceId,
        by: &NodeName,
        answer: SpeakerAnswer,
    ) -> Result<(), ClaimRefused> {
        let settled = lock(&self.senders.speakers).answered(from, by, answer)?;
        self.changed();
        if let Settled::AskNext(next) = settled {
            self.ask_speaker(from, &next);
        }
        Ok(())
    }

    /// Node `by` told, unasked, where sender `from` went (taken only from the node that
    /// speaks for it; otherwise ignored, see `Speakers::told`).
    pub(crate) fn speaker_told(&self, from: ServiceId, by: &NodeName, answer: SpeakerAnswer) {
        if lock(&self.senders.speakers).told(from, by, answer) {
            self.changed();
        } else {
            tracing::debug!(%from, %by, "move notice from a node not known to speak for the sender: ignored");
        }
    }

    /// The link to `peer` went down: the questions out to it are given up (nobody can vouch).
    pub(crate) fn speakers_link_lost(&self, peer: &NodeName) {
        let mut s = lock(&self.senders.speakers);
        let out = s.asked_of(peer);
        for from in &out {
            s.give_up(*from, true);
        }
        drop(s);
        if !out.is_empty() {
            self.changed();
        }
    }

    /// This node believed that service `id` runs on `at` (`Speakers::runs_at`): as a sender,
    /// `at` speaks for it now, and streams held on a question about it look again.
    pub(crate) fn sender_runs_at(&self, id: ServiceId, at: &NodeName) {
        if at == self.name() {
            return;
        }
        lock(&self.senders.speakers).runs_at(id, at);
        self.changed();
    }

    /// Service `id` committed to `to`: this node answers so from now on, and tells every
    /// other peer (each then believes `to` about it).
    pub(crate) fn sender_moved_away(&self, id: ServiceId, to: &NodeName) {
        lock(&self.senders.speakers).moved_away(id, to);
        self.changed();
        let notice = Frame::Speaker {
            sender: id,
            answer: SpeakerAnswer::Moved(to.clone()),
            asked: false,
        };
        for link in self.links.all() {
            if link.name != *to && link.is_connected() {
                if let Err(e) = link.push_ctrl(&notice) {
                    self.logs
                        .event("speaker-notice-lost", format!("to {}: {e}", link.name));
                }
            }
        }
    }

    /// A copy of service `id` from `source` was restored here: `source` and the nodes before
    /// it (`custody`, from the snapshot) may hand on what they held for it.
    pub(crate) fn service_arriving(
        &self,
        id: ServiceId,
        source: &NodeName,
        custody: Vec<NodeName>,
    ) {
        lock(&self.senders.custody).add(id, custody.into_iter().chain([source.clone()]));
        lock(&self.senders.arriving).insert(id, source.clone());
    }

    /// The copy of `id` restored here runs now (`started`) or was dropped.
    pub(crate) fn service_arrived(self: &Arc<Self>, id: ServiceId, started: bool) {
        self.carried_arrived(id, started);
        let Some(source) = lock(&self.senders.arriving).remove(&id) else {
            return;
        };
        if started {
            lock(&self.senders.speakers).arrived(id, &source);
            self.changed();
        }
    }

    /// A snapshot of `id` goes to `to`: the custody list it carries (the nodes before this
    /// one); `to` holds a copy from now on, so what it hands back is believed.
    pub(crate) fn custody_for_snapshot(&self, id: ServiceId, to: &NodeName) -> Vec<NodeName> {
        let mut c = lock(&self.senders.custody);
        let list = c.of(id);
        c.add(id, [to.clone()]);
        list
    }
}
