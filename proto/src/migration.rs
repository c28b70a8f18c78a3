//! The migration protocol and the data plane around it: one state machine per node, with no
//! I/O, no clock and no threads. The node (or a simulation) feeds it events and carries out the
//! [`Action`]s it returns.
//!
//! Rules that make the guarantees hold:
//! - **One decider.** The source alone decides commit or abort. It commits only after the
//!   target answered `Prepared`; once it has sent `Commit` it never resumes the service.
//! - **A prepared target waits.** It runs the service only on `Commit` and discards it only on
//!   `Abort`; when it hears nothing it asks (`Query`). So at most one instance ever runs.
//! - **Nothing accepted is dropped.** Messages arriving while the service is frozen are held
//!   and, at commit, forwarded to the target in order (at abort, given back behind the queue).
//!   Per-sender [`Window`]s at the receiver put forwarded and direct messages back in order and
//!   drop copies; their watermarks travel in the snapshot.
//! - **Epochs order locations.** Every commit bumps the service's epoch; directory updates and
//!   stale snapshots are judged by it. A tombstone forwards late messages and tells their
//!   senders' nodes where the service went.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::claims::{self, ClaimRefused, Known, Location, Role};
use crate::forward::{HandOn, Tombstones};
use crate::ids::{NodeName, ServiceId};
use crate::seq::{Offer, Watermark, Window};

/// Members of one group migration at most. Each holds a snapshot stream open until the group
/// commits; a node's QUIC stream limit is set from this.
pub const GROUP_MEMBERS_MAX: usize = 1024;

/// Identifies one migration attempt: the source node and a counter there.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MigrationId {
    /// The node that decides it.
    pub source: NodeName,
    /// Its number on that node.
    pub n: u64,
}

/// One sender's numbered message to one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Data<P> {
    /// The receiving service.
    pub to: ServiceId,
    /// The sender.
    pub from: ServiceId,
    /// Its number in the sender's channel to `to`, from 1.
    pub seq: u64,
    /// The message.
    pub payload: P,
}

/// What moves: the state, the queue, the channel watermarks and the epoch.
#[derive(Clone, Debug)]
pub struct Snapshot<S, P> {
    /// The service.
    pub service: ServiceId,
    /// The epoch it will have on the target.
    pub epoch: u64,
    /// Its state.
    pub state: S,
    /// Messages accepted and not yet handled, oldest first.
    pub queue: Vec<Data<P>>,
    /// Per sender, the next number expected.
    pub watermarks: Vec<(ServiceId, Watermark)>,
    /// Messages accepted early (waiting for an earlier number), to be offered again.
    pub early: Vec<Data<P>>,
    /// Numbers ahead of a watermark that were refused, per sender, so the gap still closes.
    pub skipped: Vec<(ServiceId, u64)>,
    /// The service's own channels as a sender: per receiver, the last number it used.
    pub send_seqs: Vec<(ServiceId, u64)>,
}

/// Protocol messages between nodes.
#[derive(Clone, Debug)]
pub enum Wire<S, P> {
    /// A message for a service; `origin` is the node of its sender.
    Data {
        /// The message.
        data: Data<P>,
        /// The sender's node, told where the service went if this reaches a tombstone.
        origin: NodeName,
    },
    /// A tombstone's answer to `origin`: the service is now at `node`.
    Moved {
        /// The service.
        service: ServiceId,
        /// Where it went.
        node: NodeName,
        /// Its epoch there.
        epoch: u64,
    },
    /// A number refused by a service's former node after its snapshot, so the new node's
    /// window does not wait for it.
    Skipped {
        /// The service.
        to: ServiceId,
        /// The sender.
        from: ServiceId,
        /// The refused number.
        seq: u64,
    },
    /// Source to target: restore this, paused.
    Snapshot {
        /// The attempt.
        mig: MigrationId,
        /// What moves.
        snap: Snapshot<S, P>,
    },
    /// Target to source: restored and paused.
    Prepared {
        /// The attempt.
        mig: MigrationId,
    },
    /// Target to source: will not take it.
    Refused {
        /// The attempt.
        mig: MigrationId,
        /// Why.
        reason: String,
    },
    /// Source to target: run it.
    Commit {
        /// The attempt.
        mig: MigrationId,
    },
    /// Target to source: running.
    CommitAck {
        /// The attempt.
        mig: MigrationId,
    },
    /// Source to target: drop the paused copy.
    Abort {
        /// The attempt.
        mig: MigrationId,
    },
    /// Target to source: what became of this attempt?
    Query {
        /// The attempt.
        mig: MigrationId,
    },
    /// The service lives at `node` from `epoch` on.
    Located {
        /// The service.
        service: ServiceId,
        /// Where.
        node: NodeName,
        /// Since which epoch.
        epoch: u64,
    },
}

/// Why a migration did not happen.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AbortReason {
    /// The service is not running on this node.
    NotHere,
    /// The service is already moving.
    Busy,
    /// The target is this node.
    SameNode,
    /// The target is not a node this one has ever been connected to.
    UnknownNode,
    /// The target refused.
    Refused(String),
    /// No answer from the target before the deadline.
    Deadline,
    /// The connection to the target went down before it answered.
    LinkLost,
    /// The service's state could not be taken (it did not serialize).
    Snapshot(String),
    /// The service moved as a member of a group (an assembly tree) and another member could
    /// not move, so none did. Says which and why.
    Group(String),
    /// The service is pinned to this node: nothing moves it, whoever asks.
    Pinned,
    /// The service did not hand over its state within `Config::freeze_ticks` of being asked
    /// to freeze: a handler still running (blocked, slow), or a drain under steady inflow.
    /// It runs on here.
    FreezeDeadline,
    /// The snapshot stream failed on the source's side while the connection stayed up (a
    /// frame that could not be encoded or written). Says why.
    Stream(String),
    /// The target cannot take the service (draining, lacks the kind or a required capability):
    /// refused before anything froze. A forced move skips this check.
    Unfit(crate::placement::Unfit),
    /// Automatic placement (the rebalancer) asked, and the service is held where a user's
    /// explicit move put it: it stays until the user releases it.
    Held,
}

impl std::fmt::Display for AbortReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AbortReason::NotHere => write!(f, "the service is not running on this node"),
            AbortReason::Busy => write!(f, "the service is already moving"),
            AbortReason::SameNode => write!(f, "the target is the node the service runs on"),
            AbortReason::UnknownNode => write!(f, "the target is not a known peer"),
            AbortReason::Refused(why) => write!(f, "the target refused: {why}"),
            AbortReason::Deadline => write!(f, "no answer from the target before the deadline"),
            AbortReason::LinkLost => write!(f, "the connection to the target went down"),
            AbortReason::Snapshot(why) => write!(f, "the snapshot could not be taken: {why}"),
            AbortReason::Group(why) => write!(f, "another member of its group did not move: {why}"),
            AbortReason::Pinned => write!(f, "the service is pinned to its node"),
            AbortReason::FreezeDeadline => write!(
                f,
                "the service did not hand over its state in time (a handler still running, or a drain that never emptied)"
            ),
            AbortReason::Stream(why) => write!(f, "the snapshot stream failed: {why}"),
            AbortReason::Unfit(why) => write!(f, "{why}"),
            AbortReason::Held => write!(f, "the service is held where a user's move put it"),
        }
    }
}

impl AbortReason {
    /// A short name for counters and logs.
    pub fn label(&self) -> &'static str {
        match self {
            AbortReason::NotHere => "not-here",
            AbortReason::Busy => "busy",
            AbortReason::SameNode => "same-node",
            AbortReason::UnknownNode => "unknown-node",
            AbortReason::Refused(_) => "refused",
            AbortReason::Deadline => "deadline",
            AbortReason::LinkLost => "link-lost",
            AbortReason::Snapshot(_) => "snapshot",
            AbortReason::Group(_) => "group",
            AbortReason::FreezeDeadline => "freeze-deadline",
            AbortReason::Pinned => "pinned",
            AbortReason::Stream(_) => "stream",
            AbortReason::Unfit(_) => "unfit",
            AbortReason::Held => "held",
        }
    }
}

/// How a migration ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The service runs on `to` with `epoch`.
    Committed {
        /// The target.
        to: NodeName,
        /// The new epoch.
        epoch: u64,
        /// Messages that arrived during the freeze and were forwarded.
        forwarded: usize,
    },
    /// The service runs on as before.
    Aborted(AbortReason),
}

/// What the driver must do.
#[derive(Debug)]
pub enum Action<S, P> {
    /// Send `msg` to node `to`.
    Send {
        /// Destination node.
        to: NodeName,
        /// The message.
        msg: Wire<S, P>,
    },
    /// Append `data` to the service's queue.
    Enqueue {
        /// The service.
        service: ServiceId,
        /// The message.
        data: Data<P>,
    },
    /// Copy the service's large state to `to` while it runs (pre-copy rounds), then call
    /// [`Core::precopied`] when what is left to send is small. Nothing is frozen yet: the
    /// service handles its messages as before.
    Precopy {
        /// The service.
        service: ServiceId,
        /// The attempt.
        mig: MigrationId,
        /// The target.
        to: NodeName,
    },
    /// The pre-copy of this attempt ended without a freeze (aborted): stop copying, and drop
    /// what was sent of it. The service never stopped.
    PrecopyEnded {
        /// The service.
        service: ServiceId,
        /// The attempt.
        mig: MigrationId,
    },
    /// Stop taking messages after the one in hand, then call [`Core::frozen`].
    Freeze {
        /// The service.
        service: ServiceId,
    },
    /// Restore the service from `snap`, paused, with its queue.
    Install {
        /// What to restore.
        snap: Snapshot<S, P>,
    },
    /// The restored service may run.
    Start {
        /// The service.
        service: ServiceId,
    },
    /// The frozen service runs again with this queue (what it handed over, then what arrived).
    Resume {
        /// The service.
        service: ServiceId,
        /// Its whole queue.
        queue: Vec<Data<P>>,
    },
    /// The service has moved away: drop the frozen instance.
    Retire {
        /// The service.
        service: ServiceId,
    },
    /// Drop the paused copy of an aborted attempt.
    Discard {
        /// The service.
        service: ServiceId,
    },
    /// Drop the paused copy whose source has not decided for `Config::orphan_ticks`: the
    /// source is gone (or cut off with its decision). The service is lost unless the source
    /// still runs it; what the copy holds is refused to its senders.
    Orphan {
        /// The service.
        service: ServiceId,
        /// The attempt.
        mig: MigrationId,
    },
    /// A peer's claim was not believed (see [`crate::claims`]): log it, count it, tell the
    /// peer. Nothing changed.
    ClaimRefused {
        /// Who claimed it.
        peer: NodeName,
        /// What and why.
        refusal: ClaimRefused,
    },
    /// `data` was not accepted; its sender must be told.
    Refuse {
        /// The message.
        data: Data<P>,
        /// Why.
        reason: &'static str,
    },
    /// The migration the caller asked for ended.
    Report {
        /// The attempt.
        mig: MigrationId,
        /// The service.
        service: ServiceId,
        /// How it ended.
        outcome: Outcome,
    },
}

/// Bounds and timings, in ticks of the driver's clock.
#[derive(Clone, Debug)]
pub struct Config {
    /// Early messages held per sender window.
    pub window_held_max: usize,
    /// Messages held per service while it is frozen.
    pub frozen_held_max: usize,
    /// Ticks between two sends of an unanswered snapshot or commit.
    pub retry_ticks: u64,
    /// Ticks after the snapshot is first sent before the source gives up.
    pub deadline_ticks: u64,
    /// Ticks between two queries of a prepared target.
    pub query_ticks: u64,
    /// Tombstones kept; the oldest is forgotten first.
    pub tombstones_max: usize,
    /// Locations kept of services neither hosted nor buried here; the longest known is
    /// forgotten first (the node then finds the service through gossip or by asking its
    /// peers, as it does one it never heard of).
    pub directory_max: usize,
    /// Decisions remembered for late questions; the oldest aborted ones are forgotten first.
    pub decisions_max: usize,
    /// Ticks a prepared copy waits for its source's decision before it is dropped as an
    /// orphan. Far above `deadline_ticks`: a live, connected source decides well before.
    pub orphan_ticks: u64,
    /// Ticks a service asked to freeze may take to hand over its state (finish the message in
    /// hand; with a drain, empty its queue) before the attempt is aborted and it runs on.
    pub freeze_ticks: u64,
    /// The number of this node's first migration attempt. A node that restarts must not
    /// number its attempts as it did before (a target may still hold a copy from an attempt
    /// of its former life): the node takes it from the clock.
    pub first_attempt: u64,
    /// Ticks a location claim held back ([`Location::Ahead`]) waits for this node to learn of
    /// a host between the one it knows and the claimer; then it is refused.
    pub ahead_ticks: u64,
    /// Location claims held back per peer; one more is refused at once.
    pub ahead_per_peer_max: usize,
    /// Ticks a pre-copy may run before the service is frozen anyway (what is still unsent
    /// then goes in the freeze).
    pub precopy_ticks: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            window_held_max: 4096,
            frozen_held_max: 65_536,
            retry_ticks: 50,
            deadline_ticks: 500,
            query_ticks: 100,
            tombstones_max: 65_536,
            directory_max: 65_536,
            decisions_max: 65_536,
            orphan_ticks: 6_000,
            freeze_ticks: 1_000,
            first_attempt: 1,
            ahead_ticks: 500,
            ahead_per_peer_max: 64,
            precopy_ticks: 10_000,
        }
    }
}

enum Phase<S, P> {
    Running,
    /// Running while its state is copied ahead to `to` ([`Action::Precopy`]); a member of a
    /// group move runs so until every member has caught up, then they all freeze together.
    Precopying {
        mig: MigrationId,
        to: NodeName,
        /// When the pre-copy began.
        since: u64,
        /// The group it moves with, if any.
        group: Option<u64>,
        /// Its state is copied ahead ([`Action::Precopy`] was given). False for a group member
        /// that only waits for the others (its state moves whole in the freeze).
        copying: bool,
        /// What is left is small enough for the freeze: a group member waits for the others.
        caught_up: bool,
    },
    Freezing {
        mig: MigrationId,
        to: NodeName,
        group: Option<u64>,
        /// When the freeze was asked for.
        since: u64,
    },
    Sent {
        mig: MigrationId,
        to: NodeName,
        snap: Snapshot<S, P>,
        sent_at: u64,
        deadline: u64,
        group: Option<u64>,
        /// The target answered `Prepared` (a group member waits for the others).
        prepared: bool,
    },
    Prepared {
        mig: MigrationId,
        last_query: u64,
        /// When it was prepared.
        since: u64,
    },
}

impl<S, P> Phase<S, P> {
    /// The service handles messages here in this phase.
    fn runs(&self) -> bool {
        matches!(self, Phase::Running | Phase::Precopying { .. })
    }
}

struct Hosted<S, P> {
    epoch: u64,
    windows: BTreeMap<ServiceId, Window<Data<P>>>,
    held: Vec<Data<P>>,
    /// Messages that reached a prepared copy: kept out of it until the outcome is known, then
    /// taken in (commit) or sent on to where the service runs (abort). With their origins.
    parked: Vec<(Data<P>, NodeName)>,
    phase: Phase<S, P>,
    /// The attempt that brought it here, to answer a repeated `Commit`.
    arrived_by: Option<MigrationId>,
}

enum Decision {
    Committed { to: NodeName, last_sent: u64 },
    Aborted,
}

/// Services migrating together, all or none: committed once every member's target is
/// prepared, aborted (every member resumes) as soon as one member cannot move.
struct Group {
    members: Vec<ServiceId>,
    /// Members whose target answered `Prepared`.
    prepared: usize,
    /// The first member that could not move, and why.
    failed: Option<(ServiceId, AbortReason)>,
}

/// A location claim held back ([`Location::Ahead`]): judged again when this node learns where
/// the service is, refused when it waited [`Config::ahead_ticks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldClaim {
    /// Who claimed it.
    pub from: NodeName,
    /// The service.
    pub service: ServiceId,
    /// Where `from` says it runs.
    pub at: NodeName,
    /// Since which epoch.
    pub epoch: u64,
}

struct Held {
    claim: HeldClaim,
    /// When it was first held back.
    since: u64,
    /// What the directory said of the service when the claim was last judged.
    known: Option<(NodeName, u64)>,
    /// Where the service was believed to run when the claim was last judged (the directory's
    /// word or the caller's, the newer): what it is refused against if nothing newer comes.
    basis: Option<(NodeName, u64)>,
}

/// Decides whether a snapshot may be installed here.
pub type Policy<S, P> = Box<dyn FnMut(&Snapshot<S, P>) -> Result<(), String> + Send>;

/// One node's protocol state.
pub struct Core<S, P> {
    me: NodeName,
    cfg: Config,
    now: u64,
    next_mig: u64,
    peers: Vec<NodeName>,
    hosted: BTreeMap<ServiceId, Hosted<S, P>>,
    tombs: Tombstones,
    directory: BTreeMap<ServiceId, (NodeName, u64)>,
    /// Directory entries, oldest first, for forgetting (cleaned lazily).
    directory_order: VecDeque<ServiceId>,
    decisions: BTreeMap<MigrationId, Decision>,
    decision_order: VecDeque<MigrationId>,
    send_seqs: BTreeMap<(ServiceId, ServiceId), u64>,
    groups: BTreeMap<u64, Group>,
    next_group: u64,
    /// Services that never move from here.
    pinned: BTreeSet<ServiceId>,
    policy: Policy<S, P>,
    out: Vec<Action<S, P>>,
    /// Location claims held back, oldest first (at most [`Config::ahead_per_peer_max`] per
    /// peer).
    held: Vec<Held>,
}

impl<S: Clone, P: Clone> Core<S, P> {
    /// A node named `me` that installs every snapshot.
    pub fn new(me: NodeName, cfg: Config) -> Self {
        Self::with_policy(me, cfg, Box::new(|_| Ok(())))
    }

    /// A node named `me` whose `policy` may refuse snapshots.
    pub fn with_policy(me: NodeName, cfg: Config, policy: Policy<S, P>) -> Self {
        let tombstones_max = cfg.tombstones_max;
        Core {
            me,
            next_mig: cfg.first_attempt.max(1),
            cfg,
            now: 0,
            peers: Vec::new(),
            hosted: BTreeMap::new(),
            tombs: Tombstones::new(tombstones_max),
            directory: BTreeMap::new(),
            directory_order: VecDeque::new(),
            decisions: BTreeMap::new(),
            decision_order: VecDeque::new(),
            send_seqs: BTreeMap::new(),
            groups: BTreeMap::new(),
            next_group: 1,
            pinned: BTreeSet::new(),
            policy,
            out: Vec::new(),
            held: Vec::new(),
        }
    }

    /// This node.
    pub fn name(&self) -> &NodeName {
        &self.me
    }

    /// Adds a node to tell about locations.
    pub fn add_peer(&mut self, peer: NodeName) {
        if peer != self.me && !self.peers.contains(&peer) {
            self.peers.push(peer);
        }
    }

    /// A service started here, running at epoch 0.
    pub fn host(&mut self, service: ServiceId) {
        self.hosted.insert(
            service,
            Hosted {
                epoch: 0,
                windows: BTreeMap::new(),
                held: Vec::new(),
                parked: Vec::new(),
                phase: Phase::Running,
                arrived_by: None,
            },
        );
        self.place(service, self.me.clone(), 0);
    }

    /// A service taken over here from a checkpoint (or going on here after a ballot), at
    /// `epoch`.
    pub fn host_at(&mut self, service: ServiceId, epoch: u64) {
        let h = self.hosted.entry(service).or_insert(Hosted {
            epoch,
            windows: BTreeMap::new(),
            held: Vec::new(),
            parked: Vec::new(),
            phase: Phase::Running,
            arrived_by: None,
        });
        h.epoch = epoch;
        self.place(service, self.me.clone(), epoch);
    }

    /// A replicated service's copy here retired: `node` continues it at `epoch`. A tombstone
    /// stays, so what still arrives here follows it there.
    pub fn retired(&mut self, service: ServiceId, node: NodeName, epoch: u64) {
        self.hosted.remove(&service);
        self.pinned.remove(&service);
        self.send_seqs.retain(|(from, _), _| *from != service);
        self.bury(service, epoch);
        self.place(service, node, epoch);
    }

    /// Records that `service` is at `node` since `epoch` (if newer than what is known).
    pub fn learn(&mut self, service: ServiceId, node: NodeName, epoch: u64) {
        let newer = self
            .directory
            .get(&service)
            .is_none_or(|(_, known)| epoch > *known);
        if newer {
            self.place(service, node, epoch);
        }
    }

    /// Writes `service`'s location, forgetting the longest-known location of a service that
    /// is neither hosted nor buried here when past [`Config::directory_max`].
    fn place(&mut self, service: ServiceId, node: NodeName, epoch: u64) {
        if self.directory.insert(service, (node, epoch)).is_none() {
            self.directory_order.push_back(service);
        }
        let keep = self.cfg.directory_max + self.hosted.len() + self.tombs.len();
        while self.directory.len() > keep {
            let Some(old) = self.directory_order.pop_front() else {
                break;
            };
            if self.hosted.contains_key(&old) || self.tombs.epoch(old).is_some() {
                // Needed while it is here or buried here: it goes to the back.
                self.directory_order.push_back(old);
            } else {
                self.directory.remove(&old);
            }
        }
        if self.directory_order.len() > 2 * self.directory.len() + 64 {
            let dir = &self.directory;
            let mut seen = BTreeSet::new();
            self.directory_order
                .retain(|s| dir.contains_key(s) && seen.insert(*s));
        }
    }

    /// Locations in the directory (at most [`Config::directory_max`] beyond the services
    /// hosted or buried here).
    pub fn directory_len(&self) -> usize {
        self.directory.len()
    }

    /// Where this node believes `service` is.
    pub fn locate(&self, service: ServiceId) -> Option<&NodeName> {
        self.directory.get(&service).map(|(n, _)| n)
    }

    /// True when `service` may handle messages here now.
    pub fn is_live(&self, service: ServiceId) -> bool {
        self.hosted.get(&service).is_some_and(|h| h.phase.runs())
    }

    /// The epoch of `service` if it is hosted here.
    pub fn epoch(&self, service: ServiceId) -> Option<u64> {
        self.hosted.get(&service).map(|h| h.epoch)
    }

    /// Where `service` is and since which epoch, as far as this node knows.
    pub fn location(&self, service: ServiceId) -> Option<(NodeName, u64)> {
        self.directory.get(&service).cloned()
    }

    /// Where a tombstone here forwards `service`'s messages, if there is one.
    pub fn tombstone(&self, service: ServiceId) -> Option<(NodeName, u64)> {
        if self.tombs.epoch(service).is_some() && !self.hosted.contains_key(&service) {
            self.directory.get(&service).cloned()
        } else {
            None
        }
    }

    /// Why `service` cannot start moving from here, if it cannot: not here, already moving,
    /// or pinned.
    fn refusal(&self, service: ServiceId) -> Option<AbortReason> {
        match self.hosted.get(&service) {
            None => Some(AbortReason::NotHere),
            Some(h) if !matches!(h.phase, Phase::Running) => Some(AbortReason::Busy),
            Some(_) if self.pinned.contains(&service) => Some(AbortReason::Pinned),
            Some(_) => None,
        }
    }

    /// Pins (`true`) or unpins `service`: while pinned, every migration of it from here is
    /// refused ([`AbortReason::Pinned`]), whoever asked (this node, a peer, the service).
    pub fn pin(&mut self, service: ServiceId, pinned: bool) {
        if pinned {
            self.pinned.insert(service);
        } else {
            self.pinned.remove(&service);
        }
    }

    /// A service hosted here stopped for good.
    ///
    /// A pre-copy of it ends there ([`Action::PrecopyEnded`]), and its attempt is reported
    /// aborted ([`AbortReason::NotHere`]).
    pub fn unhost(&mut self, service: ServiceId) -> Vec<Action<S, P>> {
        self.precopy_ended(service, AbortReason::NotHere);
        if self
            .hosted
            .get(&service)
            .is_some_and(|h| matches!(h.phase, Phase::Running))
        {
            self.hosted.remove(&service);
            self.pinned.remove(&service);
            self.directory.remove(&service);
            self.send_seqs.retain(|(from, _), _| *from != service);
        }
        self.take()
    }

    /// The frozen service could not hand over its state: it runs on, and the caller is told.
    /// In a group, every other member resumes too.
    pub fn freeze_failed(&mut self, service: ServiceId, why: String) -> Vec<Action<S, P>> {
        self.freeze_ended(service, AbortReason::Snapshot(why));
        self.take()
    }

    /// A freeze that ends without a snapshot: the service runs on (`Resume`), the attempt is
    /// aborted with `reason`, and the rest of its group with it.
    fn freeze_ended(&mut self, service: ServiceId, reason: AbortReason) {
        let Some(h) = self.hosted.get_mut(&service) else {
            return;
        };
        let Phase::Freezing { mig, group, .. } = std::mem::replace(&mut h.phase, Phase::Running)
        else {
            return;
        };
        let queue = std::mem::take(&mut h.held);
        self.out.push(Action::Resume { service, queue });
        self.decide(mig.clone(), Decision::Aborted);
        self.out.push(Action::Report {
            mig,
            service,
            outcome: Outcome::Aborted(reason.clone()),
        });
        if let Some(g) = group {
            self.fail_group(g, service, reason);
            self.leave_group(g, service);
        }
    }

    /// Moves every `(service, target)` of `members` (all hosted here) as one unit: all are
    /// frozen at once, each snapshot goes to its own target, and the source commits them
    /// together once every target is prepared. If one member cannot move (refused, deadline,
    /// link lost, snapshot failed) every member resumes here. A member's report names the
    /// member that failed ([`AbortReason::Group`]). Nothing freezes when a member is refused
    /// up front (not here, busy, same node, unknown node, listed twice).
    pub fn migrate_group(
        &mut self,
        members: &[(ServiceId, NodeName)],
    ) -> (Vec<MigrationId>, Vec<Action<S, P>>) {
        let members: Vec<(ServiceId, NodeName, bool)> = members
            .iter()
            .map(|(s, to)| (*s, to.clone(), false))
            .collect();
        self.migrate_group_with(&members)
    }

    /// As [`Core::migrate_group`]; the members marked `true` first copy their state ahead
    /// while every member runs on ([`Action::Precopy`]). Each calls [`Core::precopied`] when
    /// what is left of it is small (or its [`Config::precopy_ticks`] pass); once every such
    /// member has, all members freeze together, so no member stays frozen while another
    /// still copies. If one cannot move before the freeze (its pre-copy broke, its target
    /// refused or was lost, it stopped), none freezes: every member runs on where it was,
    /// untouched ([`Action::PrecopyEnded`] for those copying), and its report names the member
    /// that failed.
    pub fn migrate_group_with(
        &mut self,
        members: &[(ServiceId, NodeName, bool)],
    ) -> (Vec<MigrationId>, Vec<Action<S, P>>) {
        let migs: Vec<MigrationId> = members
            .iter()
            .map(|_| {
                let mig = MigrationId {
                    source: self.me.clone(),
                    n: self.next_mig,
                };
                self.next_mig += 1;
                mig
            })
            .collect();
        let mut refusal = None;
        for (i, (service, to, _)) in members.iter().enumerate() {
            let reason = if *to == self.me {
                Some(AbortReason::SameNode)
            } else if !self.peers.contains(to) {
                Some(AbortReason::UnknownNode)
            } else if members[..i].iter().any(|(s, _, _)| s == service) {
                Some(AbortReason::Busy)
            } else {
                self.refusal(*service)
            };
            if let Some(r) = reason {
                refusal = Some((*service, r));
                break;
            }
        }
        if let Some((culprit, reason)) = refusal {
            for ((service, _, _), mig) in members.iter().zip(&migs) {
                let outcome = if *service == culprit {
                    reason.clone()
                } else {
                    AbortReason::Group(format!("{culprit}: {reason}"))
                };
                self.out.push(Action::Report {
                    mig: mig.clone(),
                    service: *service,
                    outcome: Outcome::Aborted(outcome),
                });
            }
            return (migs, self.take());
        }
        let g = self.next_group;
        self.next_group += 1;
        self.groups.insert(
            g,
            Group {
                members: members.iter().map(|(s, _, _)| *s).collect(),
                prepared: 0,
                failed: None,
            },
        );
        if members.iter().any(|(_, _, precopy)| *precopy) {
            for ((service, to, precopy), mig) in members.iter().zip(&migs) {
                if let Some(h) = self.hosted.get_mut(service) {
                    h.phase = Phase::Precopying {
                        mig: mig.clone(),
                        to: to.clone(),
                        since: self.now,
                        group: Some(g),
                        copying: *precopy,
                        caught_up: !*precopy,
                    };
                }
                if *precopy {
                    self.out.push(Action::Precopy {
                        service: *service,
                        mig: mig.clone(),
                        to: to.clone(),
                    });
                }
            }
            return (migs, self.take());
        }
        self.freeze_group(
            g,
            members
                .iter()
                .map(|(s, to, _)| (*s, to.clone()))
                .zip(migs.clone()),
        );
        (migs, self.take())
    }

    /// Freezes every member of group `g` at once.
    fn freeze_group(
        &mut self,
        g: u64,
        members: impl IntoIterator<Item = ((ServiceId, NodeName), MigrationId)>,
    ) {
        for ((service, to), mig) in members {
            if let Some(h) = self.hosted.get_mut(&service) {
                h.phase = Phase::Freezing {
                    mig,
                    to,
                    group: Some(g),
                    since: self.now,
                };
            }
            self.out.push(Action::Freeze { service });
        }
    }

    /// Member `culprit` of group `g` cannot move: every member already waiting for its
    /// target aborts now; those still freezing resume when they hand over their snapshot.
    fn fail_group(&mut self, g: u64, culprit: ServiceId, reason: AbortReason) {
        let Some(group) = self.groups.get_mut(&g) else {
            return;
        };
        if group.failed.is_some() {
            return;
        }
        group.failed = Some((culprit, reason.clone()));
        let others: Vec<ServiceId> = group
            .members
            .iter()
            .copied()
            .filter(|m| *m != culprit)
            .collect();
        let why = AbortReason::Group(format!("{culprit}: {reason}"));
        for m in others {
            if matches!(
                self.hosted.get(&m).map(|h| &h.phase),
                Some(Phase::Sent { .. })
            ) {
                self.abort_one(m, why.clone());
            }
        }
    }

    /// `service` no longer belongs to group `g` (it resumed or moved).
    fn leave_group(&mut self, g: u64, service: ServiceId) {
        if let Some(group) = self.groups.get_mut(&g) {
            group.members.retain(|m| *m != service);
            if group.members.is_empty() {
                self.groups.remove(&g);
            }
        }
    }

    /// Groups under way (for invariant checks).
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// The connection to `node` went down: attempts waiting for its answer abort now rather
    /// than at their deadline (safe: the source has not committed them), and the tombstones
    /// will tell it again where services went (it may come back as a new run).
    pub fn link_lost(&mut self, node: &NodeName) -> Vec<Action<S, P>> {
        self.tombs.forget_notices_to(node);
        // Sent to it (true), or copying ahead to it (false).
        let lost: Vec<(ServiceId, bool)> = self
            .hosted
            .iter()
            .filter_map(|(s, h)| match &h.phase {
                Phase::Sent { to, .. } if to == node => Some((*s, true)),
                Phase::Precopying { to, .. } if to == node => Some((*s, false)),
                _ => None,
            })
            .collect();
        for (service, sent) in lost {
            if sent {
                self.abort(service, AbortReason::LinkLost);
            } else {
                self.precopy_ended(service, AbortReason::LinkLost);
            }
        }
        self.take()
    }

    /// The snapshot stream of attempt `mig` failed here while the connection stayed up: that
    /// attempt alone aborts, if it is not decided yet (`AbortReason::Stream`). Others to the
    /// same node go on; a lost connection is `link_lost`.
    pub fn stream_failed(&mut self, mig: &MigrationId, why: String) -> Vec<Action<S, P>> {
        let service = self.hosted.iter().find_map(|(s, h)| match &h.phase {
            Phase::Sent { mig: m, .. } if m == mig => Some(*s),
            _ => None,
        });
        if let Some(service) = service {
            self.abort(service, AbortReason::Stream(why));
            return self.take();
        }
        if let Some(service) = self.precopying_service(mig) {
            self.precopy_ended(service, AbortReason::Stream(why));
        }
        self.take()
    }

    /// Number of tombstones kept.
    pub fn tombstones(&self) -> usize {
        self.tombs.len()
    }

    /// Removes the tombstone `service` left here at `epoch`, once no node can still send to
    /// it through this one (the driver knows, from fences on ordered streams). Returns true
    /// when there was one. The directory entry stays: a snapshot no newer than it is stale.
    pub fn unbury(&mut self, service: ServiceId, epoch: u64) -> bool {
        self.tombs.unbury(service, epoch)
    }

    /// The tombstone table, for the fences that come from peers
    /// ([`Tombstones::await_fences`], [`Tombstones::fenced`]).
    pub fn tombstones_mut(&mut self) -> &mut Tombstones {
        &mut self.tombs
    }

    /// A message for `service`, from a sender on node `origin`, reached this node where the
    /// service is not: where its tombstone hands it on, and whom to tell (see
    /// [`Tombstones::hand_on`]). `None`: no tombstone, the message is refused.
    pub fn hand_on(&mut self, service: ServiceId, origin: &NodeName) -> Option<HandOn> {
        if self.hosted.contains_key(&service) {
            return None;
        }
        let located = self.directory.get(&service).cloned();
        self.tombs.hand_on(&self.me, service, origin, located)
    }

    /// The notice a hand-on asked for could not be sent ([`Tombstones::notice_unsent`]).
    pub fn notice_unsent(&mut self, service: ServiceId, origin: &NodeName, epoch: u64) {
        self.tombs.notice_unsent(service, origin, epoch);
    }

    fn take(&mut self) -> Vec<Action<S, P>> {
        std::mem::take(&mut self.out)
    }

    fn send(&mut self, to: NodeName, msg: Wire<S, P>) {
        self.out.push(Action::Send { to, msg });
    }

    /// A sender on this node sends `payload` to `to`; numbered and routed. A hosted service may
    /// send only while it runs here (not frozen, not a paused copy).
    pub fn send_from(&mut self, from: ServiceId, to: ServiceId, payload: P) -> Vec<Action<S, P>> {
        debug_assert!(
            self.hosted.get(&from).is_none_or(|h| h.phase.runs()),
            "a service sends only while it runs"
        );
        let seq = self.send_seqs.entry((from, to)).or_insert(0);
        *seq += 1;
        let data = Data {
            to,
            from,
            seq: *seq,
            payload,
        };
        let me = self.me.clone();
        self.route(data, me, true);
        self.take()
    }

    /// A message for `data.to`: taken here, parked, handed on by a tombstone, or refused.
    /// `sent_here` (a local sender's, or one a copy that went passes back): with neither the
    /// service nor its tombstone here, it goes where the directory says, as the node's
    /// channels and hand-backs do; from the network it is refused.
    fn route(&mut self, data: Data<P>, origin: NodeName, sent_here: bool) {
        let service = data.to;
        let parked_max = self.cfg.frozen_held_max;
        if let Some(h) = self.hosted.get_mut(&service) {
            if matches!(h.phase, Phase::Prepared { .. }) {
                if h.parked.len() >= parked_max {
                    self.out.push(Action::Refuse {
                        data,
                        reason: "prepared copy's parking is full",
                    });
                } else {
                    h.parked.push((data, origin));
                }
                return;
            }
            self.accept(data);
        } else {
            // Not here: a tombstone hands it on, as the node's does (`Tombstones::hand_on`);
            // without one it is refused to its sender.
            match self.hand_on(service, &origin) {
                Some(HandOn { at, epoch, notify }) => {
                    if let Some(origin) = notify {
                        self.send(
                            origin,
                            Wire::Moved {
                                service,
                                node: at.clone(),
                                epoch,
                            },
                        );
                    }
                    self.send(at, Wire::Data { data, origin });
                }
                None => match self.directory.get(&service).map(|(n, _)| n.clone()) {
                    Some(node) if sent_here && node != self.me => {
                        self.send(node, Wire::Data { data, origin })
                    }
                    _ => self.out.push(Action::Refuse {
                        data,
                        reason: "not here and no tombstone",
                    }),
                },
            }
        }
    }

    /// A message for a service hosted here: through its sender's window.
    fn accept(&mut self, data: Data<P>) {
        let service = data.to;
        let (held_max, frozen_max) = (self.cfg.window_held_max, self.cfg.frozen_held_max);
        let Some(h) = self.hosted.get_mut(&service) else {
            return;
        };
        let frozen = matches!(h.phase, Phase::Freezing { .. } | Phase::Sent { .. });
        if frozen && h.held.len() >= frozen_max {
            let seq = data.seq;
            let from = data.from;
            let window = h
                .windows
                .entry(from)
                .or_insert_with(|| Window::new(held_max));
            if seq >= window.watermark().0 {
                let unblocked = window.skip(seq);
                h.held.extend(unblocked);
                self.out.push(Action::Refuse {
                    data,
                    reason: "service frozen and its hold is full",
                });
            }
            return;
        }
        let window = h
            .windows
            .entry(data.from)
            .or_insert_with(|| Window::new(held_max));
        let seq = data.seq;
        match window.offer(seq, data.clone()) {
            Offer::Release(items) => {
                if frozen {
                    h.held.extend(items);
                } else {
                    for data in items {
                        self.out.push(Action::Enqueue { service, data });
                    }
                }
            }
            Offer::Held | Offer::Duplicate => {}
            Offer::Full(_) => {
                let unblocked = window.skip(seq);
                if frozen {
                    h.held.extend(unblocked);
                } else {
                    for d in unblocked {
                        self.out.push(Action::Enqueue { service, data: d });
                    }
                }
                self.out.push(Action::Refuse {
                    data,
                    reason: "receive window full",
                });
            }
        }
    }

    /// The caller asks to move `service` to `to`.
    pub fn migrate(
        &mut self,
        service: ServiceId,
        to: NodeName,
    ) -> (MigrationId, Vec<Action<S, P>>) {
        self.migrate_with(service, to, false)
    }

    /// As [`Core::migrate`]; with `precopy`, the service first runs on while its state is
    /// copied ahead ([`Action::Precopy`]) and freezes when the driver calls
    /// [`Core::precopied`] (or after [`Config::precopy_ticks`]). An abort before the freeze
    /// (link lost, stream failed, the service gone) leaves it running where it was, untouched
    /// ([`Action::PrecopyEnded`]).
    pub fn migrate_with(
        &mut self,
        service: ServiceId,
        to: NodeName,
        precopy: bool,
    ) -> (MigrationId, Vec<Action<S, P>>) {
        let mig = MigrationId {
            source: self.me.clone(),
            n: self.next_mig,
        };
        self.next_mig += 1;
        let refusal = if to == self.me {
            Some(AbortReason::SameNode)
        } else if !self.peers.contains(&to) {
            // Nothing is frozen for a node that cannot be reached at all.
            Some(AbortReason::UnknownNode)
        } else {
            self.refusal(service)
        };
        if let Some(reason) = refusal {
            self.out.push(Action::Report {
                mig: mig.clone(),
                service,
                outcome: Outcome::Aborted(reason),
            });
            return (mig, self.take());
        }
        if precopy {
            if let Some(h) = self.hosted.get_mut(&service) {
                h.phase = Phase::Precopying {
                    mig: mig.clone(),
                    to: to.clone(),
                    since: self.now,
                    group: None,
                    copying: true,
                    caught_up: false,
                };
            }
            self.out.push(Action::Precopy {
                service,
                mig: mig.clone(),
                to,
            });
            return (mig, self.take());
        }
        self.start_freeze(service, mig.clone(), to);
        (mig, self.take())
    }

    fn start_freeze(&mut self, service: ServiceId, mig: MigrationId, to: NodeName) {
        if let Some(h) = self.hosted.get_mut(&service) {
            h.phase = Phase::Freezing {
                mig,
                to,
                group: None,
                since: self.now,
            };
        }
        self.out.push(Action::Freeze { service });
    }

    /// What is left of `service`'s pre-copy is small enough to go in the freeze: freeze it
    /// now. Nothing happens unless attempt `mig` is pre-copying.
    pub fn precopied(&mut self, service: ServiceId, mig: &MigrationId) -> Vec<Action<S, P>> {
        let Some(h) = self.hosted.get_mut(&service) else {
            return self.take();
        };
        let group = match &mut h.phase {
            Phase::Precopying {
                mig: m,
                group,
                caught_up,
                ..
            } if m == mig => {
                *caught_up = true;
                *group
            }
            _ => return self.take(),
        };
        match group {
            Some(g) => self.freeze_group_if_caught_up(g),
            None => {
                let Phase::Precopying { mig, to, .. } =
                    std::mem::replace(&mut h.phase, Phase::Running)
                else {
                    return self.take();
                };
                self.start_freeze(service, mig, to);
            }
        }
        self.take()
    }

    /// Freezes group `g`'s members together once every one of them has caught up.
    fn freeze_group_if_caught_up(&mut self, g: u64) {
        let Some(group) = self.groups.get(&g) else {
            return;
        };
        let mut ready = Vec::with_capacity(group.members.len());
        for m in &group.members {
            match self.hosted.get(m).map(|h| &h.phase) {
                Some(Phase::Precopying {
                    mig,
                    to,
                    caught_up: true,
                    group: Some(in_g),
                    ..
                }) if *in_g == g => ready.push(((*m, to.clone()), mig.clone())),
                _ => return,
            }
        }
        self.freeze_group(g, ready);
    }

    /// The pre-copy of attempt `mig` failed (its state could not be encoded, its stream
    /// broke): the attempt aborts and the service runs on where it is, untouched.
    pub fn precopy_failed(
        &mut self,
        service: ServiceId,
        mig: &MigrationId,
        why: String,
    ) -> Vec<Action<S, P>> {
        if self
            .hosted
            .get(&service)
            .is_some_and(|h| matches!(&h.phase, Phase::Precopying { mig: m, .. } if m == mig))
        {
            self.precopy_ended(service, AbortReason::Stream(why));
        }
        self.take()
    }

    /// The service attempt `mig` is copying ahead.
    fn precopying_service(&self, mig: &MigrationId) -> Option<ServiceId> {
        self.hosted.iter().find_map(|(s, h)| match &h.phase {
            Phase::Precopying { mig: m, .. } if m == mig => Some(*s),
            _ => None,
        })
    }

    /// Ends `service`'s pre-copy, if it has one, as aborted with `reason`; in a group, every
    /// other member's too (none has frozen yet), and the group is gone.
    fn precopy_ended(&mut self, service: ServiceId, reason: AbortReason) {
        let Some(group) = self.end_precopy(service, reason.clone()) else {
            return;
        };
        let Some(g) = group else {
            return;
        };
        let members = self
            .groups
            .remove(&g)
            .map(|gr| gr.members)
            .unwrap_or_default();
        let why = AbortReason::Group(format!("{service}: {reason}"));
        for m in members.into_iter().filter(|m| *m != service) {
            self.end_precopy(m, why.clone());
        }
    }

    /// Ends one service's pre-copy as aborted with `reason`: it runs on untouched. `None` if
    /// it was not pre-copying, else its group.
    fn end_precopy(&mut self, service: ServiceId, reason: AbortReason) -> Option<Option<u64>> {
        let h = self.hosted.get_mut(&service)?;
        if !matches!(h.phase, Phase::Precopying { .. }) {
            return None;
        }
        let Phase::Precopying {
            mig,
            group,
            copying,
            ..
        } = std::mem::replace(&mut h.phase, Phase::Running)
        else {
            return None;
        };
        if copying {
            self.out.push(Action::PrecopyEnded {
                service,
                mig: mig.clone(),
            });
        }
        self.decide(mig.clone(), Decision::Aborted);
        self.out.push(Action::Report {
            mig,
            service,
            outcome: Outcome::Aborted(reason),
        });
        Some(group)
    }

    /// The frozen service handed over its state and queue.
    pub fn frozen(
        &mut self,
        service: ServiceId,
        state: S,
        queue: Vec<Data<P>>,
    ) -> Vec<Action<S, P>> {
        let now = self.now;
        let deadline = now + self.cfg.deadline_ticks;
        let Some(h) = self.hosted.get_mut(&service) else {
            return self.take();
        };
        let Phase::Freezing { mig, to, group, .. } =
            std::mem::replace(&mut h.phase, Phase::Running)
        else {
            // Not freezing (a confused driver): give the queue straight back.
            self.out.push(Action::Resume { service, queue });
            return self.take();
        };
        if let Some(failed) = group.and_then(|g| self.groups.get(&g)?.failed.clone()) {
            // Another member of its group could not move: resume at once.
            let mut queue = queue;
            queue.append(&mut h.held);
            self.out.push(Action::Resume { service, queue });
            self.decide(mig.clone(), Decision::Aborted);
            self.out.push(Action::Report {
                mig,
                service,
                outcome: Outcome::Aborted(AbortReason::Group(format!(
                    "{}: {}",
                    failed.0, failed.1
                ))),
            });
            if let Some(g) = group {
                self.leave_group(g, service);
            }
            return self.take();
        }
        // Messages accepted while the handler finished are behind the watermarks taken now:
        // they travel in the snapshot's queue, after what the driver handed over.
        let mut queue = queue;
        queue.append(&mut h.held);
        let mut watermarks = Vec::new();
        let mut early = Vec::new();
        let mut skipped = Vec::new();
        for (sender, w) in &h.windows {
            watermarks.push((*sender, w.watermark()));
            early.extend(w.held_items().cloned());
            skipped.extend(w.skipped_ahead().map(|seq| (*sender, seq)));
        }
        let send_seqs: Vec<(ServiceId, u64)> = self
            .send_seqs
            .range(
                (service, ServiceId::from_parts(0, 0))
                    ..=(service, ServiceId::from_parts(u64::MAX, u64::MAX)),
            )
            .map(|((_, to), seq)| (*to, *seq))
            .collect();
        let snap = Snapshot {
            service,
            epoch: h.epoch + 1,
            state,
            queue,
            watermarks,
            early,
            skipped,
            send_seqs,
        };
        h.phase = Phase::Sent {
            mig: mig.clone(),
            to: to.clone(),
            snap: snap.clone(),
            sent_at: now,
            deadline,
            group,
            prepared: false,
        };
        self.send(to, Wire::Snapshot { mig, snap });
        self.take()
    }

    /// Advances the clock to `now`: retries, deadlines, queries.
    pub fn tick(&mut self, now: u64) -> Vec<Action<S, P>> {
        debug_assert!(now >= self.now, "the clock does not go back");
        self.now = now;
        let mut expired = Vec::new();
        let mut resend = Vec::new();
        let mut queries = Vec::new();
        let mut orphans = Vec::new();
        let mut stuck = Vec::new();
        let mut long = Vec::new();
        for (service, h) in &mut self.hosted {
            match &mut h.phase {
                Phase::Freezing { since, .. } if now - *since >= self.cfg.freeze_ticks => {
                    stuck.push(*service);
                }
                Phase::Precopying { since, mig, .. } if now - *since >= self.cfg.precopy_ticks => {
                    long.push((*service, mig.clone()));
                }
                Phase::Sent {
                    deadline,
                    sent_at,
                    mig,
                    to,
                    snap,
                    prepared: false,
                    ..
                } => {
                    if now >= *deadline {
                        expired.push(*service);
                    } else if now - *sent_at >= self.cfg.retry_ticks {
                        *sent_at = now;
                        resend.push((
                            to.clone(),
                            Wire::Snapshot {
                                mig: mig.clone(),
                                snap: snap.clone(),
                            },
                        ));
                    }
                }
                Phase::Prepared { mig, since, .. } if now - *since >= self.cfg.orphan_ticks => {
                    orphans.push((*service, mig.clone()));
                }
                Phase::Prepared {
                    mig, last_query, ..
                } if now - *last_query >= self.cfg.query_ticks => {
                    *last_query = now;
                    queries.push((mig.source.clone(), Wire::Query { mig: mig.clone() }));
                }
                _ => {}
            }
        }
        for (to, msg) in resend.into_iter().chain(queries) {
            self.send(to, msg);
        }
        for service in expired {
            self.abort(service, AbortReason::Deadline);
        }
        for service in stuck {
            self.freeze_ended(service, AbortReason::FreezeDeadline);
        }
        for (service, mig) in long {
            // Copying ahead did not catch up with the service's writes in time: the rest goes
            // in the freeze.
            let mut more = self.precopied(service, &mig);
            self.out.append(&mut more);
        }
        for (service, mig) in orphans {
            self.orphan(service, mig);
        }
        let retry = self.cfg.retry_ticks;
        let mut commits = Vec::new();
        for (mig, d) in &mut self.decisions {
            if let Decision::Committed { to, last_sent } = d {
                if now - *last_sent >= retry {
                    *last_sent = now;
                    commits.push((to.clone(), Wire::Commit { mig: mig.clone() }));
                }
            }
        }
        for (to, msg) in commits {
            self.send(to, msg);
        }
        self.expire_held();
        self.take()
    }

    fn decide(&mut self, mig: MigrationId, d: Decision) {
        if !self.decisions.contains_key(&mig) {
            self.decision_order.push_back(mig.clone());
        }
        self.decisions.insert(mig, d);
        // Forget the oldest aborted decisions first: an unknown attempt is answered `Abort`,
        // which is right for an aborted one. Committed ones stay until acknowledged.
        while self.decisions.len() > self.cfg.decisions_max {
            let Some(pos) = self
                .decision_order
                .iter()
                .position(|m| matches!(self.decisions.get(m), Some(Decision::Aborted) | None))
            else {
                break;
            };
            if let Some(old) = self.decision_order.remove(pos) {
                self.decisions.remove(&old);
            }
        }
    }

    /// Aborts the attempt moving `service`, and with it every other member of its group.
    fn abort(&mut self, service: ServiceId, reason: AbortReason) {
        let group = match self.hosted.get(&service).map(|h| &h.phase) {
            Some(Phase::Sent { group, .. }) => *group,
            _ => None,
        };
        if let Some(g) = group {
            self.fail_group(g, service, reason.clone());
        }
        self.abort_one(service, reason);
    }

    fn abort_one(&mut self, service: ServiceId, reason: AbortReason) {
        let Some(h) = self.hosted.get_mut(&service) else {
            return;
        };
        let Phase::Sent {
            mig,
            to,
            snap,
            group,
            ..
        } = std::mem::replace(&mut h.phase, Phase::Running)
        else {
            return;
        };
        if let Some(g) = group {
            self.leave_group(g, service);
        }
        let Some(h) = self.hosted.get_mut(&service) else {
            return;
        };
        let mut queue = snap.queue;
        queue.append(&mut h.held);
        self.out.push(Action::Resume { service, queue });
        self.send(to, Wire::Abort { mig: mig.clone() });
        self.decide(mig.clone(), Decision::Aborted);
        self.out.push(Action::Report {
            mig,
            service,
            outcome: Outcome::Aborted(reason),
        });
    }

    fn commit(&mut self, service: ServiceId) {
        let Some(mut h) = self.hosted.remove(&service) else {
            return;
        };
        let Phase::Sent {
            mig,
            to,
            snap,
            group,
            ..
        } = std::mem::replace(&mut h.phase, Phase::Running)
        else {
            self.hosted.insert(service, h);
            return;
        };
        if let Some(g) = group {
            self.leave_group(g, service);
        }
        let epoch = snap.epoch;
        self.out.push(Action::Retire { service });
        self.decide(
            mig.clone(),
            Decision::Committed {
                to: to.clone(),
                last_sent: self.now,
            },
        );
        self.send(to.clone(), Wire::Commit { mig: mig.clone() });
        // What arrived during the freeze goes after the snapshot, in order: first what was
        // released, then what waits early in a window (its gap may be filled on the target),
        // then the numbers refused here, so the target's windows do not wait for them.
        let me = self.me.clone();
        let early: Vec<Data<P>> = h
            .windows
            .values()
            .flat_map(|w| w.held_items().cloned())
            .collect();
        let skipped: Vec<(ServiceId, u64)> = h
            .windows
            .iter()
            .flat_map(|(from, w)| w.skipped_ahead().map(move |seq| (*from, seq)))
            .collect();
        let forwarded = h.held.len() + early.len();
        for data in h.held.drain(..).chain(early) {
            self.send(
                to.clone(),
                Wire::Data {
                    data,
                    origin: me.clone(),
                },
            );
        }
        for (from, seq) in skipped {
            self.send(
                to.clone(),
                Wire::Skipped {
                    to: service,
                    from,
                    seq,
                },
            );
        }
        self.bury(service, epoch);
        self.send_seqs.retain(|(from, _), _| *from != service);
        self.place(service, to.clone(), epoch);
        for peer in self.peers.clone() {
            self.send(
                peer,
                Wire::Located {
                    service,
                    node: to.clone(),
                    epoch,
                },
            );
        }
        self.out.push(Action::Report {
            mig,
            service,
            outcome: Outcome::Committed {
                to,
                epoch,
                forwarded,
            },
        });
    }

    fn bury(&mut self, service: ServiceId, epoch: u64) {
        self.tombs.bury(service, epoch);
    }

    /// A protocol message from node `from`.
    pub fn receive(&mut self, from: NodeName, msg: Wire<S, P>) -> Vec<Action<S, P>> {
        match msg {
            Wire::Data { data, origin } => self.route(data, origin, false),
            Wire::Moved {
                service,
                node,
                epoch,
            }
            | Wire::Located {
                service,
                node,
                epoch,
            } => {
                let mut claims = vec![HeldClaim {
                    from,
                    service,
                    at: node,
                    epoch,
                }];
                // Each location learned may settle claims held back before it.
                while !claims.is_empty() {
                    for c in claims {
                        if let Err(refusal) =
                            self.located(&c.from, c.service, (&c.at, c.epoch), None, false, None)
                        {
                            self.refuse_claim(c.from, refusal);
                        }
                    }
                    claims = self.held_due();
                }
            }
            Wire::Skipped {
                to,
                from: sender,
                seq,
            } => self.on_skipped(to, sender, seq),
            Wire::Snapshot { mig, snap } => self.on_snapshot(from, mig, snap),
            Wire::Prepared { mig } | Wire::Query { mig } => {
                if let Err(r) = self.check_target("prepared", &from, &mig) {
                    return self.refused_claim(from, r);
                }
                self.on_prepared(from, mig)
            }
            Wire::Refused { mig, reason } => {
                if let Err(r) = self.check_target("refused", &from, &mig) {
                    return self.refused_claim(from, r);
                }
                let service = self.sent_service(&mig);
                if let Some(service) = service {
                    self.abort(service, AbortReason::Refused(reason));
                } else if let Some(service) = self.precopying_service(&mig) {
                    // The target would not take what was copied ahead: nothing froze.
                    self.precopy_ended(service, AbortReason::Refused(reason));
                }
            }
            Wire::Commit { mig } => {
                if let Err(r) = claims::role("commit", Role::Source, &from, &mig.source, None) {
                    return self.refused_claim(from, r);
                }
                self.on_commit(from, mig)
            }
            Wire::CommitAck { mig } => {
                if let Err(r) = self.check_target("commit-ack", &from, &mig) {
                    return self.refused_claim(from, r);
                }
                if matches!(self.decisions.get(&mig), Some(Decision::Committed { .. })) {
                    self.decisions.remove(&mig);
                    self.decision_order.retain(|m| m != &mig);
                }
            }
            Wire::Abort { mig } => {
                if let Err(r) = claims::role("abort", Role::Source, &from, &mig.source, None) {
                    return self.refused_claim(from, r);
                }
                let discard = self.hosted.iter().find_map(|(s, h)| match &h.phase {
                    Phase::Prepared { mig: m, .. } if *m == mig => Some(*s),
                    _ => None,
                });
                if let Some(service) = discard {
                    self.discard(service);
                }
            }
        }
        self.take()
    }

    /// The node could not set up the copy the core just installed (its service table is
    /// full, say): the copy goes, and the source is told `Refused` instead of `Prepared`, so
    /// it resumes. Returns the attempt, whose `Prepared` (already among the actions being
    /// carried out) must not be sent.
    pub fn install_failed(
        &mut self,
        service: ServiceId,
        reason: String,
    ) -> (Option<MigrationId>, Vec<Action<S, P>>) {
        let mig = match self.hosted.get(&service) {
            Some(Hosted {
                phase: Phase::Prepared { .. },
                arrived_by: Some(mig),
                ..
            }) => mig.clone(),
            _ => return (None, self.take()),
        };
        if let Some(h) = self.hosted.remove(&service) {
            self.send_seqs.retain(|(from, _), _| *from != service);
            for (data, origin) in h.parked {
                self.route(data, origin, true);
            }
        }
        self.send(
            mig.source.clone(),
            Wire::Refused {
                mig: mig.clone(),
                reason,
            },
        );
        (Some(mig), self.take())
    }

    /// Checks `from`'s word about a location (see [`claims::location`]) against what this node
    /// knows, and what the caller knows besides: a channel's location, say, and whether the
    /// service runs here though it never moved (a service is known to the core from its first
    /// migration on). Learns the location when it is believed. An `Err` changed nothing.
    /// `standby`: the standby the service's host named, and for which epoch: a claim its
    /// host did not make may still be that standby's takeover ([`claims::takeover`]).
    pub fn located(
        &mut self,
        from: &NodeName,
        service: ServiceId,
        (at, epoch): (&NodeName, u64),
        also: Option<(&NodeName, u64)>,
        runs_here: bool,
        standby: Option<(&NodeName, u64)>,
    ) -> Result<Location, ClaimRefused> {
        let hosted_epoch = match self.hosted.get(&service) {
            Some(h) if matches!(h.phase, Phase::Prepared { .. }) => None,
            Some(h) => Some(h.epoch),
            None => runs_here.then_some(0),
        };
        let dir = self.directory.get(&service).map(|(n, e)| (n, *e));
        let known_at = claims::newer(dir, also);
        let known = Known {
            me: &self.me,
            hosted_epoch,
            at: known_at,
        };
        let verdict = match claims::location(known, from, service, at, epoch) {
            Ok(v) => Ok(v),
            Err(refused) if standby.is_none() => Err(refused),
            Err(_) => claims::takeover(known, standby, from, service, at, epoch),
        };
        let claim = HeldClaim {
            from: from.clone(),
            service,
            at: at.clone(),
            epoch,
        };
        let held = self.held.iter().position(|h| h.claim == claim);
        match (verdict, held) {
            (Ok(Location::Ahead), Some(i)) => {
                let waited = self.now.saturating_sub(self.held[i].since);
                if waited < self.cfg.ahead_ticks {
                    self.held[i].known = self.directory.get(&service).cloned();
                    self.held[i].basis = known_at.map(|(n, e)| (n.clone(), e));
                    return Ok(Location::Ahead);
                }
                self.held.remove(i);
                Err(Self::waited_too_long(&claim, waited))
            }
            (Ok(Location::Ahead), None) => {
                let from_peer = self.held.iter().filter(|h| h.claim.from == *from).count();
                if from_peer >= self.cfg.ahead_per_peer_max {
                    return Err(ClaimRefused {
                        claim: "location",
                        detail: format!(
                            "{from} says service {service} runs on {at} since epoch {epoch}, \
                             past what this node knows, with {from_peer} such claims already \
                             held back"
                        ),
                    });
                }
                let basis = known_at.map(|(n, e)| (n.clone(), e));
                self.held.push(Held {
                    claim,
                    since: self.now,
                    known: self.directory.get(&service).cloned(),
                    basis,
                });
                Ok(Location::Ahead)
            }
            (verdict, held) => {
                if let Some(i) = held {
                    self.held.remove(i);
                }
                if verdict == Ok(Location::Take) {
                    self.place(service, at.clone(), epoch);
                }
                verdict
            }
        }
    }

    fn waited_too_long(claim: &HeldClaim, waited: u64) -> ClaimRefused {
        ClaimRefused {
            claim: "location",
            detail: format!(
                "{} says service {} runs on {} since epoch {}; held back for {waited} ticks, \
                 no node told this node of a host in between",
                claim.from, claim.service, claim.at, claim.epoch
            ),
        }
    }

    /// The held-back location claims about services whose location this node learned since
    /// they were last judged: the caller judges each again, as it judged it when it came
    /// ([`Self::located`]).
    pub fn held_due(&mut self) -> Vec<HeldClaim> {
        let mut due = Vec::new();
        for h in &mut self.held {
            let now = self.directory.get(&h.claim.service);
            if now != h.known.as_ref() {
                h.known = now.cloned();
                due.push(h.claim.clone());
            }
        }
        due
    }

    /// Location claims held back now.
    pub fn held_claims(&self) -> usize {
        self.held.len()
    }

    /// Refuses the held-back claims that waited [`Config::ahead_ticks`] and are still past
    /// what this node knows. A claim that became old news is dropped; one that this node
    /// could now believe is dropped too, unapplied (the caller judges claims again as soon
    /// as it learns where a service is, so this happens only for what it learned otherwise,
    /// and a service is found without the word).
    fn expire_held(&mut self) {
        let (now, wait) = (self.now, self.cfg.ahead_ticks);
        let mut expired = Vec::new();
        self.held.retain(|h| {
            let keep = now.saturating_sub(h.since) < wait;
            if !keep {
                expired.push((
                    h.claim.clone(),
                    h.basis.clone(),
                    now.saturating_sub(h.since),
                ));
            }
            keep
        });
        for (claim, basis, waited) in expired {
            let hosted_epoch = match self.hosted.get(&claim.service) {
                Some(h) if matches!(h.phase, Phase::Prepared { .. }) => None,
                Some(h) => Some(h.epoch),
                None => None,
            };
            let dir = self.directory.get(&claim.service).map(|(n, e)| (n, *e));
            let basis = basis.as_ref().map(|(n, e)| (n, *e));
            let at = claims::newer(dir, basis);
            let known = Known {
                me: &self.me,
                hosted_epoch,
                at,
            };
            let verdict =
                claims::location(known, &claim.from, claim.service, &claim.at, claim.epoch);
            let refusal = match verdict {
                Ok(Location::Ahead) => Self::waited_too_long(&claim, waited),
                Err(r) => r,
                Ok(Location::Take | Location::Ignore) => continue,
            };
            self.out.push(Action::ClaimRefused {
                peer: claim.from,
                refusal,
            });
        }
    }

    /// A migration message that only the attempt's target may send: the target this node sent
    /// the attempt to, as its source.
    fn check_target(
        &self,
        claim: &'static str,
        from: &NodeName,
        mig: &MigrationId,
    ) -> Result<(), ClaimRefused> {
        let target = self
            .hosted
            .values()
            .find_map(|h| match &h.phase {
                Phase::Freezing { mig: m, to, .. }
                | Phase::Sent { mig: m, to, .. }
                | Phase::Precopying { mig: m, to, .. }
                    if m == mig =>
                {
                    Some(to)
                }
                _ => None,
            })
            .or_else(|| match self.decisions.get(mig) {
                Some(Decision::Committed { to, .. }) => Some(to),
                _ => None,
            });
        match target {
            Some(t) => claims::role(claim, Role::Target, from, &mig.source, Some(t)),
            // An attempt this node no longer knows (aborted and forgotten, or never its own):
            // the answer is an `Abort` to whoever asks, which changes nothing here, as long as
            // the attempt is this node's.
            None => claims::role(claim, Role::Source, &self.me, &mig.source, None).map_err(|_| {
                ClaimRefused {
                    claim,
                    detail: format!(
                        "{from} sent {claim} to {} for a migration of {}'s",
                        self.me, mig.source
                    ),
                }
            }),
        }
    }

    fn refuse_claim(&mut self, peer: NodeName, refusal: ClaimRefused) {
        self.out.push(Action::ClaimRefused { peer, refusal });
    }

    fn refused_claim(&mut self, peer: NodeName, refusal: ClaimRefused) -> Vec<Action<S, P>> {
        self.refuse_claim(peer, refusal);
        self.take()
    }

    /// Drops a prepared copy; what was parked at it goes on to where the service runs.
    fn discard(&mut self, service: ServiceId) {
        if let Some(h) = self.hosted.remove(&service) {
            debug_assert!(matches!(h.phase, Phase::Prepared { .. }));
            self.send_seqs.retain(|(from, _), _| *from != service);
            self.out.push(Action::Discard { service });
            for (data, origin) in h.parked {
                self.route(data, origin, true);
            }
        }
    }

    fn on_skipped(&mut self, service: ServiceId, sender: ServiceId, seq: u64) {
        let held_max = self.cfg.window_held_max;
        if let Some(h) = self.hosted.get_mut(&service) {
            let frozen = matches!(h.phase, Phase::Freezing { .. } | Phase::Sent { .. });
            let released = h
                .windows
                .entry(sender)
                .or_insert_with(|| Window::new(held_max))
                .skip(seq);
            if frozen {
                h.held.extend(released);
            } else {
                for data in released {
                    self.out.push(Action::Enqueue { service, data });
                }
            }
        } else if self.tombs.epoch(service).is_some() {
            if let Some((node, _)) = self.directory.get(&service).cloned() {
                self.send(
                    node,
                    Wire::Skipped {
                        to: service,
                        from: sender,
                        seq,
                    },
                );
            }
        }
    }

    fn sent_service(&self, mig: &MigrationId) -> Option<ServiceId> {
        self.hosted.iter().find_map(|(s, h)| match &h.phase {
            Phase::Sent { mig: m, .. } if m == mig => Some(*s),
            _ => None,
        })
    }

    fn on_prepared(&mut self, from: NodeName, mig: MigrationId) {
        if let Some(service) = self.sent_service(&mig) {
            return self.prepared(service);
        }
        match self.decisions.get(&mig) {
            Some(Decision::Committed { .. }) => self.send(from, Wire::Commit { mig }),
            // Aborted, or forgotten (only aborted decisions are forgotten before acknowledged).
            _ => self.send(from, Wire::Abort { mig }),
        }
    }

    /// `service`'s target is prepared: commit it, or, in a group, once every member's is.
    fn prepared(&mut self, service: ServiceId) {
        let group = match self.hosted.get_mut(&service).map(|h| &mut h.phase) {
            Some(Phase::Sent {
                group: Some(g),
                prepared,
                ..
            }) => {
                let first = !*prepared;
                *prepared = true;
                Some((*g, first))
            }
            _ => None,
        };
        let Some((g, first)) = group else {
            return self.commit(service);
        };
        let Some(grp) = self.groups.get_mut(&g) else {
            return;
        };
        if first {
            grp.prepared += 1;
        }
        if grp.failed.is_some() || grp.prepared < grp.members.len() {
            return;
        }
        // Every member's target is prepared: decide them all now, in one step.
        let members = grp.members.clone();
        debug_assert!(members.iter().all(|m| matches!(
            self.hosted.get(m).map(|h| &h.phase),
            Some(Phase::Sent { prepared: true, .. })
        )));
        for m in members {
            self.commit(m);
        }
        debug_assert!(!self.groups.contains_key(&g), "a committed group is gone");
    }

    fn on_snapshot(&mut self, from: NodeName, mig: MigrationId, snap: Snapshot<S, P>) {
        let service = snap.service;
        if let Some(h) = self.hosted.get(&service) {
            match &h.phase {
                Phase::Prepared { mig: m, .. } if *m == mig => {
                    return self.send(from, Wire::Prepared { mig });
                }
                Phase::Running if h.arrived_by.as_ref() == Some(&mig) => {
                    // Committed already; the source will hear our CommitAck.
                    return;
                }
                Phase::Prepared { mig: m, .. } if m.source == mig.source && m.n < mig.n => {
                    // A paused copy of an older attempt by the same source, which has decided
                    // against it since it is trying again: replace it. (Never the other way
                    // round: a late copy of an old snapshot must not displace a newer attempt
                    // the source may already have committed.)
                    self.discard(service);
                }
                _ => return, // stale: the service is here with a newer (or the same) epoch
            }
        }
        if self.tombs.epoch(service).is_some_and(|e| e >= snap.epoch) {
            return; // stale: it has been here and left since
        }
        if self
            .directory
            .get(&service)
            .is_some_and(|(at, e)| *at != self.me && *e >= snap.epoch)
        {
            return; // stale: committed elsewhere at this epoch or later
        }
        if let Err(reason) = (self.policy)(&snap) {
            return self.send(from, Wire::Refused { mig, reason });
        }
        self.forget_former_life(service, &mig);
        let held_max = self.cfg.window_held_max;
        let mut windows: BTreeMap<ServiceId, Window<Data<P>>> = snap
            .watermarks
            .iter()
            .map(|(s, w)| (*s, Window::from_watermark(*w, held_max)))
            .collect();
        for data in &snap.early {
            let w = windows
                .entry(data.from)
                .or_insert_with(|| Window::new(held_max));
            let offered = w.offer(data.seq, data.clone());
            debug_assert!(matches!(offered, Offer::Held), "early messages stay early");
        }
        for (sender, seq) in &snap.skipped {
            let w = windows
                .entry(*sender)
                .or_insert_with(|| Window::new(held_max));
            let released = w.skip(*seq);
            debug_assert!(
                released.is_empty(),
                "a skip ahead of the watermark releases nothing"
            );
        }
        // A tombstone left here by an earlier stay stays until this copy commits: if the
        // attempt is aborted, messages that still come here go on to where the service runs.
        self.send_seqs.retain(|(from, _), _| *from != service);
        for (to, seq) in &snap.send_seqs {
            self.send_seqs.insert((service, *to), *seq);
        }
        self.hosted.insert(
            service,
            Hosted {
                epoch: snap.epoch,
                windows,
                held: Vec::new(),
                parked: Vec::new(),
                phase: Phase::Prepared {
                    mig: mig.clone(),
                    last_query: self.now,
                    since: self.now,
                },
                arrived_by: Some(mig.clone()),
            },
        );
        self.out.push(Action::Install { snap });
        self.send(from, Wire::Prepared { mig });
    }

    /// Attempt `mig` brings `service`: a copy of another service here that came by the same
    /// attempt id came from the source's former life (it restarted and numbers again). A
    /// paused one will never be decided: it goes as an orphan now; a running one forgets the
    /// id, so the new attempt's `Commit` is not taken for it.
    fn forget_former_life(&mut self, service: ServiceId, mig: &MigrationId) {
        let stale: Vec<ServiceId> = self
            .hosted
            .iter()
            .filter(|(s, h)| **s != service && h.arrived_by.as_ref() == Some(mig))
            .map(|(s, _)| *s)
            .collect();
        for s in stale {
            let paused = self
                .hosted
                .get(&s)
                .is_some_and(|h| matches!(h.phase, Phase::Prepared { .. }));
            if !paused {
                if let Some(h) = self.hosted.get_mut(&s) {
                    h.arrived_by = None;
                }
                continue;
            }
            self.orphan(s, mig.clone());
        }
    }

    /// Drops the paused copy of `service` (of attempt `mig`) whose source will never decide:
    /// the node is told (`Orphan`) and what arrived for it is refused to its senders.
    fn orphan(&mut self, service: ServiceId, mig: MigrationId) {
        if let Some(h) = self.hosted.remove(&service) {
            self.send_seqs.retain(|(from, _), _| *from != service);
            self.out.push(Action::Orphan { service, mig });
            for (data, _) in h.parked {
                self.out.push(Action::Refuse {
                    data,
                    reason: "the service's copy was orphaned",
                });
            }
        }
    }

    fn on_commit(&mut self, from: NodeName, mig: MigrationId) {
        let found = self
            .hosted
            .iter_mut()
            .find(|(_, h)| h.arrived_by.as_ref() == Some(&mig));
        let Some((service, h)) = found else {
            return; // Nothing of this attempt here (a stale copy); nothing to acknowledge.
        };
        let service = *service;
        if matches!(h.phase, Phase::Prepared { .. }) {
            h.phase = Phase::Running;
            let epoch = h.epoch;
            let parked = std::mem::take(&mut h.parked);
            self.tombs.remove(service);
            self.place(service, self.me.clone(), epoch);
            self.out.push(Action::Start { service });
            for (data, _) in parked {
                self.accept(data);
            }
        }
        self.send(from, Wire::CommitAck { mig });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type C = Core<Vec<u64>, u64>;

    fn svc() -> ServiceId {
        ServiceId::from_parts(1, 1)
    }

    fn sender() -> ServiceId {
        ServiceId::from_parts(2, 1)
    }

    fn sends(actions: &[Action<Vec<u64>, u64>]) -> Vec<(String, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send { to, msg } => Some((to.to_string(), format!("{msg:?}"))),
                _ => None,
            })
            .collect()
    }

    fn only_wire(actions: Vec<Action<Vec<u64>, u64>>) -> Wire<Vec<u64>, u64> {
        let mut wires: Vec<_> = actions
            .into_iter()
            .filter_map(|a| match a {
                Action::Send { msg, .. } => Some(msg),
                _ => None,
            })
            .collect();
        assert_eq!(wires.len(), 1, "exactly one message sent");
        wires.remove(0)
    }

    #[test]
    fn a_refused_migration_gives_back_the_queue_and_what_arrived_meanwhile_in_order() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let mut src: C = Core::new(a.clone(), Config::default());
        src.add_peer(b.clone());
        src.host(svc());
        let (_, acts) = src.migrate(svc(), b.clone());
        assert!(matches!(acts[..], [Action::Freeze { .. }]));
        assert!(!src.is_live(svc()), "frozen: not live");
        // One message arrives while the handler finishes: it is accepted and held.
        assert!(src.send_from(sender(), svc(), 10).is_empty());
        let queued = vec![Data {
            to: svc(),
            from: ServiceId::from_parts(3, 1),
            seq: 1,
            payload: 7,
        }];
        let snap = only_wire(src.frozen(svc(), vec![1, 2], queued.clone()));
        let Wire::Snapshot { mig, snap } = snap else {
            panic!("expected a snapshot")
        };
        assert_eq!(
            snap.queue.len(),
            2,
            "queue plus the message accepted while freezing"
        );
        // Another arrives after the snapshot left.
        assert!(src.send_from(sender(), svc(), 11).is_empty());
        let acts = src.receive(
            b.clone(),
            Wire::Refused {
                mig,
                reason: "no".into(),
            },
        );
        let resumed = acts.iter().find_map(|a| match a {
            Action::Resume { queue, .. } => {
                Some(queue.iter().map(|d| d.payload).collect::<Vec<_>>())
            }
            _ => None,
        });
        assert_eq!(resumed, Some(vec![7, 10, 11]), "everything, in order");
        assert!(src.is_live(svc()));
        assert!(acts.iter().any(|a| matches!(
            a,
            Action::Report {
                outcome: Outcome::Aborted(AbortReason::Refused(_)),
                ..
            }
        )));
    }

    /// A service whose handler never returns (or a drain that never empties) does not leave
    /// `migrate()` pending for ever: past `freeze_ticks` the attempt aborts and the service
    /// runs on; a snapshot handed over later is given straight back.
    fn kinds(actions: &[Action<Vec<u64>, u64>]) -> Vec<&'static str> {
        actions
            .iter()
            .map(|a| match a {
                Action::Precopy { .. } => "precopy",
                Action::PrecopyEnded { .. } => "precopy-ended",
                Action::Freeze { .. } => "freeze",
                Action::Report { .. } => "report",
                Action::Send { .. } => "send",
                _ => "other",
            })
            .collect()
    }

    #[test]
    fn a_precopy_runs_the_service_until_precopied_then_freezes_as_a_plain_move() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let mut src: C = Core::new(a.clone(), Config::default());
        src.add_peer(b.clone());
        src.host(svc());
        let (mig, acts) = src.migrate_with(svc(), b.clone(), true);
        assert_eq!(kinds(&acts), ["precopy"]);
        assert!(
            src.is_live(svc()),
            "still handling messages while copied ahead"
        );
        // It sends and is sent to as it did.
        assert!(!src.send_from(svc(), sender(), 1).is_empty());
        // Another move of it meanwhile is refused: one attempt at a time.
        let (_, again) = src.migrate(svc(), b.clone());
        assert!(matches!(
            &again[..],
            [Action::Report {
                outcome: Outcome::Aborted(AbortReason::Busy),
                ..
            }]
        ));
        // A word about another attempt changes nothing.
        let other = MigrationId {
            source: a.clone(),
            n: mig.n + 7,
        };
        assert!(src.precopied(svc(), &other).is_empty());
        assert!(src.is_live(svc()));
        assert_eq!(kinds(&src.precopied(svc(), &mig)), ["freeze"]);
        assert!(!src.is_live(svc()), "frozen now");
        let wire = only_wire(src.frozen(svc(), vec![1], Vec::new()));
        assert!(matches!(wire, Wire::Snapshot { mig: m, .. } if m == mig));
    }

    #[test]
    fn a_precopy_aborted_by_a_lost_link_a_broken_stream_or_a_stop_leaves_the_service_running() {
        let (a, b, c) = (NodeName::new("a"), NodeName::new("b"), NodeName::new("c"));
        let mut src: C = Core::new(a.clone(), Config::default());
        src.add_peer(b.clone());
        src.add_peer(c.clone());
        src.host(svc());
        // A lost link to another node leaves it alone; to its target ends it.
        let (mig, _) = src.migrate_with(svc(), b.clone(), true);
        assert!(src.link_lost(&c).is_empty());
        let acts = src.link_lost(&b);
        assert_eq!(kinds(&acts), ["precopy-ended", "report"]);
        assert!(matches!(
            &acts[1],
            Action::Report { mig: m, outcome: Outcome::Aborted(AbortReason::LinkLost), .. } if *m == mig
        ));
        assert!(src.is_live(svc()));
        // A late `precopied` for the aborted attempt freezes nothing.
        assert!(src.precopied(svc(), &mig).is_empty());
        assert!(src.is_live(svc()));
        // A broken stream.
        let (mig, _) = src.migrate_with(svc(), b.clone(), true);
        let acts = src.stream_failed(&mig, "reset".into());
        assert_eq!(kinds(&acts), ["precopy-ended", "report"]);
        assert!(src.is_live(svc()));
        // The target refuses what was copied ahead; a refusal from another node is not
        // believed.
        let (mig, _) = src.migrate_with(svc(), b.clone(), true);
        let refused = Wire::Refused {
            mig: mig.clone(),
            reason: "unknown kind".into(),
        };
        let acts = src.receive(c.clone(), refused.clone());
        assert!(
            matches!(&acts[..], [Action::ClaimRefused { .. }, ..]),
            "{:?}",
            kinds(&acts)
        );
        assert!(src.is_live(svc()));
        let acts = src.receive(b.clone(), refused);
        assert_eq!(kinds(&acts), ["precopy-ended", "report"]);
        let (mig, _) = src.migrate_with(svc(), b.clone(), true);
        let acts = src.precopy_failed(svc(), &mig, "encode".into());
        assert_eq!(kinds(&acts), ["precopy-ended", "report"]);
        // It moves normally afterwards.
        let (_, acts) = src.migrate(svc(), b.clone());
        assert_eq!(kinds(&acts), ["freeze"]);
        let _ = src.freeze_failed(svc(), "test".into());
        // Stopping for good during a pre-copy ends it and reports the attempt.
        let (mig, _) = src.migrate_with(svc(), b.clone(), true);
        let acts = src.unhost(svc());
        assert_eq!(kinds(&acts), ["precopy-ended", "report"]);
        assert!(matches!(&acts[0], Action::PrecopyEnded { mig: m, .. } if *m == mig));
        assert!(!src.is_live(svc()), "gone");
    }

    #[test]
    fn a_group_with_precopy_freezes_all_members_together_once_every_copy_caught_up() {
        let (a, b, c) = (NodeName::new("a"), NodeName::new("b"), NodeName::new("c"));
        let (big, other, small) = (
            ServiceId::from_parts(1, 1),
            ServiceId::from_parts(1, 2),
            ServiceId::from_parts(1, 3),
        );
        let mut src: C = Core::new(a.clone(), Config::default());
        src.add_peer(b.clone());
        src.add_peer(c.clone());
        for s in [big, other, small] {
            src.host(s);
        }
        let (migs, acts) = src.migrate_group_with(&[
            (big, b.clone(), true),
            (other, c.clone(), true),
            (small, b.clone(), false),
        ]);
        assert_eq!(
            kinds(&acts),
            ["precopy", "precopy"],
            "only the large copy ahead"
        );
        for s in [big, other, small] {
            assert!(src.is_live(s), "every member runs while the copies go");
        }
        // Another move of a member meanwhile is refused.
        let (_, again) = src.migrate(small, c.clone());
        assert!(matches!(
            &again[..],
            [Action::Report {
                outcome: Outcome::Aborted(AbortReason::Busy),
                ..
            }]
        ));
        // One caught up: nothing freezes while the other still copies.
        assert!(src.precopied(big, &migs[0]).is_empty());
        assert!(src.is_live(big) && src.is_live(small));
        // Said twice, or for the member that copies nothing: still nothing.
        assert!(src.precopied(big, &migs[0]).is_empty());
        assert!(src.precopied(small, &migs[2]).is_empty());
        // The last one: all three freeze at once.
        let acts = src.precopied(other, &migs[1]);
        assert_eq!(kinds(&acts), ["freeze", "freeze", "freeze"]);
        for s in [big, other, small] {
            assert!(!src.is_live(s));
        }
        // From here it is a plain group move: each snapshot goes to its own target.
        for (s, mig) in [big, other, small].into_iter().zip(&migs) {
            let wire = only_wire(src.frozen(s, vec![1], Vec::new()));
            assert!(matches!(wire, Wire::Snapshot { mig: m, .. } if m == *mig));
        }
        assert_eq!(src.groups(), 1);
    }

    #[test]
    fn a_group_precopy_that_fails_leaves_every_member_running_untouched() {
        let (a, b, c) = (NodeName::new("a"), NodeName::new("b"), NodeName::new("c"));
        let (big, other, small) = (
            ServiceId::from_parts(1, 1),
            ServiceId::from_parts(1, 2),
            ServiceId::from_parts(1, 3),
        );
        let members = [
            (big, b.clone(), true),
            (other, c.clone(), true),
            (small, b.clone(), false),
        ];
        // Each way a member can fail before the freeze.
        for how in 0..5 {
            let mut src: C = Core::new(a.clone(), Config::default());
            src.add_peer(b.clone());
            src.add_peer(c.clone());
            for s in [big, other, small] {
                src.host(s);
            }
            let (migs, _) = src.migrate_group_with(&members);
            // The first member caught up already: it fails with the others all the same.
            assert!(src.precopied(big, &migs[0]).is_empty());
            let (acts, culprit) = match how {
                0 => (src.link_lost(&c), other),
                1 => (src.stream_failed(&migs[1], "reset".into()), other),
                2 => (src.precopy_failed(other, &migs[1], "encode".into()), other),
                3 => (
                    src.receive(
                        c.clone(),
                        Wire::Refused {
                            mig: migs[1].clone(),
                            reason: "unknown kind".into(),
                        },
                    ),
                    other,
                ),
                _ => (src.unhost(small), small),
            };
            let ended: Vec<ServiceId> = acts
                .iter()
                .filter_map(|x| match x {
                    Action::PrecopyEnded { service, .. } => Some(*service),
                    _ => None,
                })
                .collect();
            assert_eq!(ended.len(), 2, "case {how}: {:?}", kinds(&acts));
            assert!(ended.contains(&big) && ended.contains(&other));
            let mut reported = 0;
            for x in &acts {
                if let Action::Report {
                    service,
                    outcome: Outcome::Aborted(r),
                    ..
                } = x
                {
                    reported += 1;
                    if *service == culprit {
                        assert!(!matches!(r, AbortReason::Group(_)), "case {how}: {r:?}");
                    } else {
                        assert!(
                            matches!(r, AbortReason::Group(w) if w.contains(&culprit.to_string())),
                            "case {how}: {r:?}"
                        );
                    }
                }
            }
            assert_eq!(reported, 3, "case {how}: every member reported");
            assert!(
                !acts.iter().any(|x| matches!(x, Action::Freeze { .. })),
                "case {how}: nothing froze"
            );
            for s in [big, other, small] {
                if !(how == 4 && s == small) {
                    assert!(src.is_live(s), "case {how}: {s} runs on");
                }
            }
            assert_eq!(src.groups(), 0, "case {how}: the group is gone");
            // A late word of the aborted attempt changes nothing, and they move again.
            assert!(src.precopied(other, &migs[1]).is_empty());
            let (_, acts) = src.migrate(big, b.clone());
            assert_eq!(kinds(&acts), ["freeze"], "case {how}");
        }
    }

    #[test]
    fn a_group_whose_copies_do_not_catch_up_freezes_together_at_the_deadline() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let cfg = Config {
            precopy_ticks: 100,
            ..Config::default()
        };
        let (big, small) = (ServiceId::from_parts(1, 1), ServiceId::from_parts(1, 2));
        let mut src: C = Core::new(a.clone(), cfg);
        src.add_peer(b.clone());
        src.host(big);
        src.host(small);
        let _ = src.tick(10);
        let _ = src.migrate_group_with(&[(big, b.clone(), true), (small, b.clone(), false)]);
        assert!(src.tick(109).is_empty());
        assert_eq!(kinds(&src.tick(110)), ["freeze", "freeze"]);
        assert!(!src.is_live(big) && !src.is_live(small));
    }

    #[test]
    fn a_precopy_that_does_not_catch_up_freezes_at_its_deadline() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let cfg = Config {
            precopy_ticks: 100,
            ..Config::default()
        };
        let mut src: C = Core::new(a.clone(), cfg);
        src.add_peer(b.clone());
        src.host(svc());
        let (_, _) = src.migrate_with(svc(), b.clone(), true);
        assert!(src.tick(99).is_empty());
        assert_eq!(kinds(&src.tick(100)), ["freeze"]);
        assert!(!src.is_live(svc()));
    }

    #[test]
    fn a_freeze_that_takes_too_long_aborts_and_the_service_runs_on() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let cfg = Config {
            freeze_ticks: 100,
            ..Config::default()
        };
        let mut src: C = Core::new(a.clone(), cfg);
        src.add_peer(b.clone());
        src.host(svc());
        let _ = src.tick(10);
        let (_, acts) = src.migrate(svc(), b.clone());
        assert!(matches!(acts[..], [Action::Freeze { .. }]));
        assert!(
            src.tick(109).is_empty(),
            "within the deadline: still waiting"
        );
        let acts = src.tick(110);
        assert!(acts.iter().any(|a| matches!(a, Action::Resume { .. })));
        assert!(acts.iter().any(|a| matches!(
            a,
            Action::Report {
                outcome: Outcome::Aborted(AbortReason::FreezeDeadline),
                ..
            }
        )));
        assert!(src.is_live(svc()));
        // The handler returns at last and the runner hands its snapshot over: not sent.
        let acts = src.frozen(svc(), vec![1], Vec::new());
        assert!(sends(&acts).is_empty(), "{acts:?}");
        assert!(acts.iter().any(|a| matches!(a, Action::Resume { .. })));
        // And it can move again.
        let (_, acts) = src.migrate(svc(), b);
        assert!(matches!(acts[..], [Action::Freeze { .. }]));
    }

    #[test]
    fn a_group_commits_only_when_every_target_is_prepared_and_one_refusal_resumes_all() {
        let (a, b, c) = (NodeName::new("a"), NodeName::new("b"), NodeName::new("c"));
        let members = [
            (ServiceId::from_parts(1, 1), b.clone()),
            (ServiceId::from_parts(1, 2), c.clone()),
            (ServiceId::from_parts(1, 3), b.clone()),
        ];
        for refuse_last in [false, true] {
            let mut src: C = Core::new(a.clone(), Config::default());
            src.add_peer(b.clone());
            src.add_peer(c.clone());
            for (s, _) in &members {
                src.host(*s);
            }
            let (migs, acts) = src.migrate_group(&members);
            assert_eq!(migs.len(), 3);
            let frozen = acts
                .iter()
                .filter(|x| matches!(x, Action::Freeze { .. }))
                .count();
            assert_eq!(frozen, 3, "every member freezes at once");
            for (s, _) in &members {
                assert!(!src.is_live(*s));
                let sent = src.frozen(*s, vec![], vec![]);
                assert!(matches!(only_wire(sent), Wire::Snapshot { .. }));
            }
            // Two targets prepared: nothing is decided yet.
            for (mig, (_, to)) in migs.iter().zip(&members).take(2) {
                let acts = src.receive(to.clone(), Wire::Prepared { mig: mig.clone() });
                assert!(
                    acts.is_empty(),
                    "no decision before the last member: {acts:?}"
                );
            }
            let last = if refuse_last {
                Wire::Refused {
                    mig: migs[2].clone(),
                    reason: "no room".into(),
                }
            } else {
                Wire::Prepared {
                    mig: migs[2].clone(),
                }
            };
            let acts = src.receive(b.clone(), last);
            let commits = acts
                .iter()
                .filter(|x| {
                    matches!(
                        x,
                        Action::Send {
                            msg: Wire::Commit { .. },
                            ..
                        }
                    )
                })
                .count();
            let aborts_sent = acts
                .iter()
                .filter(|x| {
                    matches!(
                        x,
                        Action::Send {
                            msg: Wire::Abort { .. },
                            ..
                        }
                    )
                })
                .count();
            let reports: Vec<&Outcome> = acts
                .iter()
                .filter_map(|x| match x {
                    Action::Report { outcome, .. } => Some(outcome),
                    _ => None,
                })
                .collect();
            assert_eq!(reports.len(), 3, "every member is reported");
            if refuse_last {
                assert_eq!(commits, 0);
                assert_eq!(aborts_sent, 3, "every prepared copy is told to go");
                assert!(members.iter().all(|(s, _)| src.is_live(*s)), "all resume");
                let group_reasons = reports
                    .iter()
                    .filter(|o| matches!(o, Outcome::Aborted(AbortReason::Group(_))))
                    .count();
                assert_eq!(group_reasons, 2, "the others name the member that failed");
            } else {
                assert_eq!(commits, 3);
                assert!(reports
                    .iter()
                    .all(|o| matches!(o, Outcome::Committed { .. })));
                assert!(members.iter().all(|(s, _)| !src.is_live(*s)));
            }
            assert_eq!(src.groups(), 0, "the group is closed either way");
        }
    }

    #[test]
    fn a_group_with_a_member_that_cannot_go_freezes_nothing() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let mut src: C = Core::new(a.clone(), Config::default());
        src.add_peer(b.clone());
        src.host(ServiceId::from_parts(1, 1));
        let members = [
            (ServiceId::from_parts(1, 1), b.clone()),
            (ServiceId::from_parts(1, 9), b.clone()), // not hosted here
        ];
        let (_, acts) = src.migrate_group(&members);
        assert!(acts.iter().all(|x| matches!(
            x,
            Action::Report {
                outcome: Outcome::Aborted(_),
                ..
            }
        )));
        assert_eq!(acts.len(), 2);
        assert!(src.is_live(ServiceId::from_parts(1, 1)));
        assert_eq!(src.groups(), 0);
    }

    #[test]
    fn a_prepared_target_waits_for_the_source_and_passes_parked_messages_on_if_aborted() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let cfg = Config {
            query_ticks: 10,
            ..Config::default()
        };
        let (mut dst, mig, acts) = prepared_at(b, a.clone(), cfg);
        assert!(acts.iter().any(|x| matches!(x, Action::Install { .. })));
        assert!(!dst.is_live(svc()), "prepared is not live");
        // A local sender's message is parked, not given to the paused copy.
        assert!(dst.send_from(sender(), svc(), 5).is_empty());
        // Silence from the source: the target only asks, it never starts on its own.
        for t in 1..=100 {
            for act in dst.tick(t) {
                assert!(!matches!(
                    act,
                    Action::Start { .. } | Action::Discard { .. }
                ));
            }
        }
        assert!(sends(&dst.tick(200))
            .iter()
            .any(|(to, m)| to == "a" && m.starts_with("Query")));
        // The source says abort: the copy goes, and the parked message goes to the source.
        let acts = dst.receive(a.clone(), Wire::Abort { mig });
        assert!(acts.iter().any(|x| matches!(x, Action::Discard { .. })));
        let out = sends(&acts);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, "a");
        assert!(out[0].1.starts_with("Data"), "{out:?}");
    }

    #[test]
    fn a_copy_whose_source_never_decides_is_orphaned_once_and_refuses_what_it_parked() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let cfg = Config {
            query_ticks: 10,
            orphan_ticks: 1_000,
            ..Config::default()
        };
        let (mut dst, mig, _) = prepared_at(b, a.clone(), cfg);
        assert!(dst.send_from(sender(), svc(), 5).is_empty());
        for t in 1..1_000 {
            assert!(!dst
                .tick(t)
                .iter()
                .any(|x| matches!(x, Action::Orphan { .. } | Action::Start { .. })));
        }
        let acts = dst.tick(1_000);
        assert!(acts
            .iter()
            .any(|x| matches!(x, Action::Orphan { mig: m, .. } if *m == mig)));
        assert!(acts.iter().any(
            |x| matches!(x, Action::Refuse { data, .. } if data.seq == 1 && data.payload == 5)
        ));
        assert!(!dst.is_live(svc()));
        // Once: a late Commit finds nothing to start, and nothing is orphaned again.
        assert!(!dst
            .receive(a.clone(), Wire::Commit { mig })
            .iter()
            .any(|x| matches!(x, Action::Start { .. })));
        assert!(dst.tick(5_000).is_empty());
    }

    /// A source that restarts numbers its attempts again; a target still holding a prepared
    /// copy from its former life (never decided: the source died) must not take the new
    /// attempt's `Commit` for that copy. It starts the service the new attempt sent, and the
    /// stale copy goes as an orphan. (With `Config::first_attempt` from the clock, as the
    /// node sets it, the numbers do not meet in the first place.)
    #[test]
    fn a_restarted_source_attempt_never_commits_its_former_lifes_copy() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let (x, y) = (ServiceId::from_parts(1, 1), ServiceId::from_parts(1, 2));
        let mut dst: C = Core::new(b.clone(), Config::default());
        dst.add_peer(a.clone());
        let move_to_b = |src: &mut C, s: ServiceId, dst: &mut C| {
            let (mig, _) = src.migrate(s, b.clone());
            let Wire::Snapshot { mig: m, snap } = only_wire(src.frozen(s, vec![], vec![])) else {
                panic!("a snapshot")
            };
            assert_eq!(m, mig);
            let acts = dst.receive(a.clone(), Wire::Snapshot { mig: m, snap });
            assert!(acts.iter().any(|x| matches!(x, Action::Install { .. })));
            mig
        };
        let mut old: C = Core::new(a.clone(), Config::default());
        old.add_peer(b.clone());
        old.host(x);
        let old_mig = move_to_b(&mut old, x, &mut dst);
        drop(old); // a dies before deciding
        let mut new: C = Core::new(a.clone(), Config::default());
        new.add_peer(b.clone());
        new.host(y);
        let new_mig = move_to_b(&mut new, y, &mut dst);
        assert_eq!(old_mig, new_mig, "the numbering started again");
        let acts = new.receive(
            b.clone(),
            Wire::Prepared {
                mig: new_mig.clone(),
            },
        );
        let commit = acts
            .into_iter()
            .find_map(|x| match x {
                Action::Send {
                    msg: m @ Wire::Commit { .. },
                    ..
                } => Some(m),
                _ => None,
            })
            .expect("a commit");
        let acts = dst.receive(a.clone(), commit);
        let started: Vec<ServiceId> = acts
            .iter()
            .filter_map(|x| match x {
                Action::Start { service } => Some(*service),
                _ => None,
            })
            .collect();
        assert_eq!(
            started,
            vec![y],
            "the new attempt's service starts, not the stale copy"
        );
        assert!(dst.is_live(y) && !dst.is_live(x));
    }

    #[test]
    fn a_pinned_service_never_starts_moving_alone_or_in_a_group() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let other = ServiceId::from_parts(1, 9);
        let mut src: C = Core::new(a, Config::default());
        src.add_peer(b.clone());
        src.host(svc());
        src.host(other);
        src.pin(svc(), true);
        let pinned = |acts: &[Action<Vec<u64>, u64>]| {
            acts.iter().any(|x| {
                matches!(
                    x,
                    Action::Report {
                        outcome: Outcome::Aborted(AbortReason::Pinned),
                        ..
                    }
                )
            })
        };
        let (_, acts) = src.migrate(svc(), b.clone());
        assert!(pinned(&acts) && !acts.iter().any(|x| matches!(x, Action::Freeze { .. })));
        let (_, acts) = src.migrate_group(&[(other, b.clone()), (svc(), b.clone())]);
        assert!(
            !acts.iter().any(|x| matches!(x, Action::Freeze { .. })),
            "all or none: nothing freezes"
        );
        src.pin(svc(), false);
        let (_, acts) = src.migrate(svc(), b);
        assert!(matches!(acts[..], [Action::Freeze { .. }]));
    }

    #[test]
    fn attempts_start_where_the_config_says() {
        let a = NodeName::new("a");
        let mut src: C = Core::new(
            a.clone(),
            Config {
                first_attempt: 1_000,
                ..Config::default()
            },
        );
        src.add_peer(NodeName::new("b"));
        src.host(svc());
        let (mig, _) = src.migrate(svc(), NodeName::new("b"));
        assert_eq!(
            mig,
            MigrationId {
                source: a,
                n: 1_000
            }
        );
    }

    /// Node `at` after it restored a copy of `svc()` (epoch 1) sent by `source`: the core,
    /// the attempt and the actions of the restore.
    fn prepared_at(
        at: NodeName,
        source: NodeName,
        cfg: Config,
    ) -> (C, MigrationId, Vec<Action<Vec<u64>, u64>>) {
        let mut dst: C = Core::new(at, cfg);
        dst.learn(svc(), source.clone(), 0);
        let mig = MigrationId {
            source: source.clone(),
            n: 1,
        };
        let snap = snapshot_at(1);
        let acts = dst.receive(
            source,
            Wire::Snapshot {
                mig: mig.clone(),
                snap,
            },
        );
        (dst, mig, acts)
    }

    fn snapshot_at(epoch: u64) -> Snapshot<Vec<u64>, u64> {
        Snapshot {
            service: svc(),
            epoch,
            state: vec![],
            queue: vec![],
            watermarks: vec![],
            early: vec![],
            skipped: vec![],
            send_seqs: vec![],
        }
    }

    /// Node `a` hosted the service and moved it to `b` (committed, acknowledged): a tombstone
    /// there forwards to `b`.
    fn moved_away(a: &NodeName, b: &NodeName) -> C {
        let mut src: C = Core::new(a.clone(), Config::default());
        src.add_peer(b.clone());
        src.host(svc());
        let _ = src.migrate(svc(), b.clone());
        let Wire::Snapshot { mig, .. } = only_wire(src.frozen(svc(), vec![], vec![])) else {
            panic!("expected a snapshot")
        };
        let _ = src.receive(b.clone(), Wire::Prepared { mig: mig.clone() });
        let _ = src.receive(b.clone(), Wire::CommitAck { mig });
        assert_eq!(src.tombstone(svc()), Some((b.clone(), 1)));
        src
    }

    #[test]
    fn a_tombstone_outlives_an_aborted_return_and_goes_at_a_committed_one() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let mut src = moved_away(&a, &b);
        // `b` brings it back: attempt `n`'s snapshot at epoch 2.
        let bring_back = |src: &mut C, n: u64| {
            let mig = MigrationId {
                source: b.clone(),
                n,
            };
            let snap = snapshot_at(2);
            let acts = src.receive(
                b.clone(),
                Wire::Snapshot {
                    mig: mig.clone(),
                    snap,
                },
            );
            (mig, acts)
        };
        // The first attempt aborts: the copy here goes, the tombstone stays.
        let (back, acts) = bring_back(&mut src, 7);
        assert!(acts.iter().any(|x| matches!(x, Action::Install { .. })));
        assert_eq!(
            src.tombstone(svc()),
            None,
            "a copy is here: nothing to hand on"
        );
        let acts = src.receive(b.clone(), Wire::Abort { mig: back });
        assert!(acts.iter().any(|x| matches!(x, Action::Discard { .. })));
        assert_eq!(src.tombstone(svc()), Some((b.clone(), 1)));
        let c = NodeName::new("c");
        let h = src
            .hand_on(svc(), &c)
            .expect("a message that still comes here goes on");
        assert_eq!((h.at, h.notify), (b.clone(), Some(c)));
        // A return that commits takes the tombstone away.
        let (again, _) = bring_back(&mut src, 8);
        let acts = src.receive(b.clone(), Wire::Commit { mig: again });
        assert!(acts.iter().any(|x| matches!(x, Action::Start { .. })));
        assert_eq!(src.tombstones(), 0);
    }

    #[test]
    fn an_unburied_tombstone_stops_forwarding_and_old_snapshots_stay_stale() {
        let (a, b, c) = (NodeName::new("a"), NodeName::new("b"), NodeName::new("c"));
        let mut src = moved_away(&a, &b);
        assert!(
            !src.unbury(svc(), 0),
            "another epoch's fence removes nothing"
        );
        assert_eq!(src.tombstones(), 1);
        assert!(src.unbury(svc(), 1));
        // And a migration to a node never connected freezes nothing.
        let (_, acts) = src.migrate(svc(), NodeName::new("nowhere"));
        assert!(!acts.iter().any(|x| matches!(x, Action::Freeze { .. })));
        assert_eq!(src.tombstones(), 0);
        assert_eq!(src.tombstone(svc()), None, "no forwarding once unburied");
        assert_eq!(
            src.location(svc()),
            Some((b.clone(), 1)),
            "the directory stays"
        );
        // A late snapshot of an attempt no newer than the directory is ignored.
        let late = MigrationId {
            source: c.clone(),
            n: 9,
        };
        let acts = src.receive(
            c.clone(),
            Wire::Snapshot {
                mig: late,
                snap: snapshot_at(1),
            },
        );
        assert!(acts.is_empty(), "stale snapshot answered: {acts:?}");
        // A newer one (the service coming back) is taken.
        let back = MigrationId {
            source: b.clone(),
            n: 1,
        };
        let acts = src.receive(
            b.clone(),
            Wire::Snapshot {
                mig: back,
                snap: snapshot_at(2),
            },
        );
        assert!(acts.iter().any(|x| matches!(x, Action::Install { .. })));
    }

    #[test]
    fn the_directory_forgets_the_oldest_location_past_its_bound_never_a_hosted_one() {
        let me = NodeName::new("a");
        let cfg = Config {
            directory_max: 3,
            ..Config::default()
        };
        let mut core: C = Core::new(me.clone(), cfg);
        let here = ServiceId::from_parts(1, 1);
        core.host(here);
        let far = |i: u64| ServiceId::from_parts(2, i);
        for i in 0..10 {
            core.learn(far(i), NodeName::new("b"), 1);
        }
        assert_eq!(core.directory_len(), 4, "three others and the hosted one");
        assert_eq!(core.locate(here), Some(&me));
        assert_eq!(core.locate(far(0)), None, "the oldest is forgotten");
        for i in 7..10 {
            assert!(core.locate(far(i)).is_some(), "the newest three are kept");
        }
        // A forgotten location is learned again like a new one.
        core.learn(far(0), NodeName::new("c"), 2);
        assert_eq!(core.locate(far(0)), Some(&NodeName::new("c")));
        assert_eq!(core.directory_len(), 4);
    }

    #[test]
    fn a_failed_stream_aborts_its_attempt_only() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let mut src: C = Core::new(a.clone(), Config::default());
        src.add_peer(b.clone());
        let (one, two) = (ServiceId::from_parts(1, 1), ServiceId::from_parts(1, 2));
        let mut migs = Vec::new();
        for s in [one, two] {
            src.host(s);
            src.migrate(s, b.clone());
            let Wire::Snapshot { mig, .. } = only_wire(src.frozen(s, vec![1], vec![])) else {
                panic!("expected a snapshot");
            };
            migs.push(mig);
        }
        let acts = src.stream_failed(&migs[0], "frame too large".into());
        let aborted: Vec<_> = acts
            .iter()
            .filter_map(|a| match a {
                Action::Report {
                    service,
                    outcome: Outcome::Aborted(reason),
                    ..
                } => Some((*service, reason.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            aborted,
            vec![(one, AbortReason::Stream("frame too large".into()))]
        );
        assert!(src.is_live(one), "the first runs on here");
        assert!(!src.is_live(two), "the second is still on its way");
        // Unknown or decided attempts: nothing happens.
        assert!(src.stream_failed(&migs[0], "again".into()).is_empty());
    }

    fn refusals(actions: &[Action<Vec<u64>, u64>]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::ClaimRefused { peer, refusal } => Some(format!("{peer}: {refusal}")),
                _ => None,
            })
            .collect()
    }

    fn located(service: ServiceId, node: &NodeName, epoch: u64) -> Wire<Vec<u64>, u64> {
        Wire::Located {
            service,
            node: node.clone(),
            epoch,
        }
    }

    #[test]
    fn a_location_ahead_of_the_directory_waits_for_the_move_before_it() {
        let n = NodeName::new;
        let (p, q, r, liar) = (n("p"), n("q"), n("r"), n("liar"));
        let cfg = Config {
            ahead_ticks: 100,
            ahead_per_peer_max: 2,
            ..Config::default()
        };
        let mut core: C = Core::new(n("c"), cfg);
        let s = svc();
        core.learn(s, p.clone(), 0);
        // q, which p moved s to at epoch 1, says s went on to r at epoch 2, before p's word.
        let acts = core.receive(q.clone(), located(s, &r, 2));
        assert!(refusals(&acts).is_empty(), "{:?}", refusals(&acts));
        assert_eq!(core.location(s), Some((p.clone(), 0)));
        assert_eq!(core.held_claims(), 1);
        // p's word comes: both are believed, in order.
        let acts = core.receive(p.clone(), located(s, &q, 1));
        assert!(refusals(&acts).is_empty(), "{:?}", refusals(&acts));
        assert_eq!(core.location(s), Some((r.clone(), 2)));
        assert_eq!(core.held_claims(), 0);

        // Nobody backs the liar's word up: refused once it waited, and s stays on r.
        let acts = core.receive(liar.clone(), located(s, &liar, 9));
        assert!(refusals(&acts).is_empty());
        // The same word again is held once.
        core.receive(liar.clone(), located(s, &liar, 9));
        assert_eq!(core.held_claims(), 1);
        assert!(refusals(&core.tick(99)).is_empty());
        let refused = refusals(&core.tick(100));
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].contains("held back for 100 ticks"),
            "{refused:?}"
        );
        assert_eq!(core.location(s), Some((r.clone(), 2)));
        assert_eq!(core.held_claims(), 0);

        // At most two held per peer: the third is refused at once.
        for e in [20, 21] {
            assert!(refusals(&core.receive(liar.clone(), located(s, &liar, e))).is_empty());
        }
        let refused = refusals(&core.receive(liar.clone(), located(s, &liar, 22)));
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(refused[0].contains("already held back"), "{refused:?}");
        assert_eq!(core.held_claims(), 2);
        // A held word that became old news is dropped without a refusal.
        core.receive(r.clone(), located(s, &q, 30));
        assert_eq!(core.location(s), Some((q.clone(), 30)));
        assert_eq!(core.held_claims(), 0);
        assert!(refusals(&core.tick(1_000)).is_empty());
    }
}
