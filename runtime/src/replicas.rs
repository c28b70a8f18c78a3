//! (node layer) Replicated services on this node: for each one it runs, its standby, its
//! checkpoint cadence and the senders' marks waiting for an acknowledgement
//! (`tern_proto::replica::Cadence`); the checkpoints it holds for other nodes' services
//! (`tern_proto::replica::Standbys`) and its side of their leases (`Grantor`).
//!
//! A replicated service's senders are confirmed only by an acknowledged checkpoint: until then
//! its mailbox's handled marks are not sent (`NodeShared::note_handled` leaves them out).

use std::collections::BTreeMap;
use std::sync::Mutex;

use tern_proto::ids::{IdMap, KindKey, NodeName, ServiceId};
use tern_proto::replica::{
    Ballots, Cadence, CheckpointBody, CheckpointNo, Claim, Grant, Grantor, Held, Lease, LeaseError,
    Outcome, ReplicaMsg, Settings, Standbys, Stored, Tally, Vote,
};
use tern_proto::wire::Frame;
use tern_proto::wire::{SnapHeader, WindowWire};

use crate::node::NodeShared;
use crate::sync::lock;

/// Checkpoints a node holds for other nodes' services.
pub const STANDBY_SERVICES_MAX: usize = 4_096;
/// Bytes of checkpoints a node holds for other nodes' services.
pub const STANDBY_BYTES_MAX: u64 = 256 << 20;
/// Of those, what one peer may make a node hold: a lying peer cannot take the whole table
/// from honest ones.
pub const STANDBY_SERVICES_PER_PEER_MAX: usize = 1_024;
/// Bytes one peer may make a node hold as its standby.
pub const STANDBY_BYTES_PER_PEER_MAX: u64 = 64 << 20;

/// Microseconds on this process's monotonic clock.
pub(crate) fn now_us() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_micros() as u64
}

/// One replicated service this node runs.
struct Primary {
    kind: KindKey,
    epoch: u64,
    standby: Option<NodeName>,
    voters: Vec<NodeName>,
    cadence: Cadence,
    /// Per sender, the last number handled and the node it came from (`None`: here).
    taken: BTreeMap<ServiceId, (u64, Option<NodeName>)>,
    /// Checkpoints acknowledged (by any standby, at this epoch): once one is, a standby may
    /// take the service over, and the copy here serves only under its current standby's lease.
    acked: u64,
    /// The current standby's term when it acknowledged a checkpoint: the copy serves only
    /// under a lease of that term (a newer one means the standby may have taken it over).
    /// `None` until the current standby holds a checkpoint.
    term: Option<u64>,
    /// After a checkpoint could not go (no standby, too large, refused), none is tried before
    /// this time (the runner would otherwise try again at once, for ever).
    retry_at_us: u64,
    /// A checkpoint of this epoch was sent: a standby may hold one, so from now on the copy
    /// serves only under its lease, once its current standby acknowledged one. Before, no
    /// standby can take this epoch over, and the copy serves at once (the simulation found a
    /// copy that served until the first acknowledgement while its standby, holding the
    /// checkpoint whose acknowledgement was lost, took it over).
    sent: bool,
    /// Per standby sent a checkpoint of this epoch, the first it was sent. One that refused
    /// that first one holds nothing of the epoch; when no other was sent any, `sent` is
    /// cleared again (a standby whose directory missed a move refuses the new host's first
    /// checkpoint: the copy serves on while another standby is tried, instead of claiming a
    /// new epoch that no standby could have taken).
    first_to: BTreeMap<NodeName, CheckpointNo>,
    /// Another node continues the service at a newer epoch (it took it over, or won the
    /// ballot this copy lost): this copy hands what it holds on to it and ends.
    retired: Option<(NodeName, u64)>,
    /// No ballot to go on at the next epoch before this time.
    ballot_at_us: u64,
    /// When the current standby was chosen: one that never granted a lease in `lease_ms` is
    /// given up (its grants may all be lost).
    standby_since_us: u64,
    /// The standby given up when the copy went on at this epoch: another is chosen if there
    /// is one.
    avoid: Option<NodeName>,
    /// A move of the service is under way (its standbys are fenced, or it is frozen): no
    /// ballot to go on at the next epoch, which the move gives its target.
    moving: bool,
    /// A ballot to go on at the next epoch is open: no move until it is decided.
    ballot_open: bool,
    /// Nodes other than the one its marks name that sent copies the service had taken
    /// already (a sender taken over there sent again what its checkpoint carried): sender,
    /// the number the copies reached, and the node, told too once a confirmation covers it
    /// (at most [`ALSO_TELL_MAX`], the oldest going first).
    also_tell: Vec<(ServiceId, u64, NodeName)>,
}

/// Nodes kept per replicated service to tell of confirmations besides its senders' current
/// ones (see `Primary::also_tell`); past it the oldest is forgotten, and that node's copies
/// wait for a confirmation of a later message.
pub const ALSO_TELL_MAX: usize = 64;

impl Primary {
    /// Adds the nodes to tell besides the marks' own (`also_tell`) for the marks a
    /// confirmation covers, and forgets them.
    fn with_also_told(
        &mut self,
        mut marks: Vec<(ServiceId, u64, Option<NodeName>)>,
    ) -> Vec<(ServiceId, u64, Option<NodeName>)> {
        if self.also_tell.is_empty() {
            return marks;
        }
        let mut extra = Vec::new();
        self.also_tell.retain(|(s, seq, node)| {
            let covered = marks.iter().find(|(m, n, _)| m == s && n >= seq);
            match covered {
                Some((_, n, origin)) => {
                    if origin.as_ref() != Some(node) {
                        extra.push((*s, *n, Some(node.clone())));
                    }
                    false
                }
                None => true,
            }
        });
        marks.extend(extra);
        marks
    }
}

/// A moving primary's fence (`replica_fence`): the standbys that have not answered yet.
struct Fencing {
    epoch: u64,
    waiting: std::collections::BTreeSet<NodeName>,
    until_us: u64,
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// A ballot this node runs as the claimer.
struct Claiming {
    tally: Tally,
    /// When the unheard voters were last asked.
    asked_us: u64,
    /// The checkpoint it would take over from (`None`: the primary going on).
    from: Option<Held<Body>>,
}

/// What a replicated service's runner needs to cut a checkpoint.
pub(crate) struct CheckpointPlan {
    pub standby: NodeName,
    pub taken: Vec<(ServiceId, u64)>,
}

/// What [`NodeHandle::replica`](crate::NodeHandle::replica) tells of a replicated service this
/// node runs.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaInfo {
    /// The epoch it runs at here.
    pub epoch: u64,
    /// Its standby's node, once one is chosen.
    pub standby: Option<NodeName>,
    /// Who votes on who continues it.
    pub voters: Vec<NodeName>,
    /// Checkpoints its standby acknowledged.
    pub acked: u64,
    /// True while a checkpoint waits for its acknowledgement.
    pub in_flight: bool,
    /// True when the copy may handle messages now: no checkpoint of its epoch was sent yet, or
    /// its standby acknowledged one and its lease is valid in the term it acknowledged in.
    pub serving: bool,
}

/// What the runner of a replicated service does before its next message.
pub(crate) enum Gate {
    /// Handle it.
    Serve,
    /// Wait: a standby may hold a checkpoint of this epoch, and there is no lease.
    Wait,
    /// Another node continues the service at this epoch: hand everything on and end.
    Retire(NodeName, u64),
}

/// What [`NodeHandle::standby_checkpoints`](crate::NodeHandle::standby_checkpoints) tells of a
/// checkpoint this node holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StandbyInfo {
    /// The service.
    pub service: ServiceId,
    /// The node that sent it.
    pub primary: NodeName,
    /// The service's epoch there.
    pub epoch: u64,
    /// The checkpoint's number.
    pub no: CheckpointNo,
    /// Its size.
    pub bytes: u64,
}

/// What [`NodeHandle::stored_checkpoints`](crate::NodeHandle::stored_checkpoints) tells of a
/// checkpoint in the node's data directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StoredInfo {
    /// The service.
    pub service: ServiceId,
    /// The epoch it ran at here.
    pub epoch: u64,
    /// The checkpoint's number.
    pub no: CheckpointNo,
}

/// A checkpoint held, with its kind.
type Body = (KindKey, Vec<u8>);

/// A checkpoint from a node this node's directory does not yet know as the service's host,
/// at an epoch newer than the directory's: the new host after a move, whose first checkpoint
/// can arrive before the old host's `Located`. Answered once the directory names the sender
/// (at that `Located`, or at the next replication tick), refused `renew_ms` after the first
/// one of that service from that sender was parked (a newer one replaces it and keeps that
/// time: the primary sends a fresh checkpoint each lease, and a wait started again each time
/// would never end; the copy waits, paused, for the answer).
struct Parked {
    service: ServiceId,
    from: NodeName,
    kind: KindKey,
    epoch: u64,
    no: CheckpointNo,
    voters: Vec<NodeName>,
    body: Vec<u8>,
    at_us: u64,
}

/// At most this many checkpoints parked per sending node; past it, they are refused.
pub const PARKED_PER_PEER_MAX: usize = 64;

/// A checkpoint from the data directory of a service this node ran before it restarted: resumed
/// by winning the ballot for the epoch after it ([`Stored::resume`]), once its kind is
/// registered here.
struct Dormant {
    record: Stored,
    /// No ballot for it before this time (one was not decided).
    retry_at_us: u64,
}

/// A checkpoint's number and the marks it confirms: per sender, the last number handled and
/// the node it came from.
type Pending = (CheckpointNo, Vec<(ServiceId, u64, Option<NodeName>)>);

/// Checkpoints per service whose marks wait for the disk; past it the oldest goes (the marks
/// of a newer checkpoint cover it).
const UNDURABLE_PER_SERVICE_MAX: usize = 4;

/// How long a resumed checkpoint whose ballot was not decided waits before it is claimed
/// again.
const RESUME_RETRY_MS: u64 = 1_000;

/// The replication subsystem of a node.
pub(crate) struct Replicas {
    pub settings: Settings,
    /// Replicated services run here: every service's confirmation round and stop asks
    /// whether it is one, and most nodes run none, so they need not take the lock.
    running: std::sync::atomic::AtomicUsize,
    primaries: Mutex<IdMap<Primary>>,
    standbys: Mutex<Standbys<Body>>,
    grantors: Mutex<BTreeMap<NodeName, Grantor>>,
    /// The leases this node holds, one per standby node its services use.
    leases: Mutex<BTreeMap<NodeName, Lease>>,
    /// Standbys given up while their link was down, per node: the services (and epochs) whose
    /// checkpoints they are told to let go when the link is back. At most
    /// [`STANDBY_SERVICES_PER_PEER_MAX`] per node (past that the oldest is forgotten).
    to_release: Mutex<BTreeMap<NodeName, std::collections::VecDeque<(ServiceId, u64)>>>,
    /// Services taken over here and not started yet: the node they were taken from, not to be
    /// chosen as their standby while another can be (it went silent; its links may look up
    /// for a while yet).
    taken_from: Mutex<IdMap<NodeName>>,
    /// This node's votes, as a voter.
    ballots: Mutex<Ballots>,
    /// The ballots this node runs, per service.
    claiming: Mutex<IdMap<Claiming>>,
    /// Checkpoints waiting for this node's directory to name their sender (see [`Parked`]).
    parked: Mutex<IdMap<Parked>>,
    /// Checkpoints from the data directory not resumed yet (see [`Dormant`]).
    dormant: Mutex<IdMap<Dormant>>,
    /// The first term of this node's grantors: above every term a former life used (see
    /// `Grantor::starting_at`).
    term_base: std::sync::atomic::AtomicU64,
    /// The node has a data directory: every replicated service it runs confirms its senders
    /// only once a checkpoint covering them is written there (a restart resumes from it), and
    /// acknowledged by its standby when it has one.
    durable: std::sync::atomic::AtomicBool,
    /// Per service, checkpoints whose marks wait for the disk (at most
    /// [`UNDURABLE_PER_SERVICE_MAX`]; a newer one's marks cover an older one's).
    undurable: Mutex<IdMap<std::collections::VecDeque<Pending>>>,
    /// Woken when a lease is granted or a checkpoint acknowledged: a paused runner looks again.
    pub changed: tokio::sync::Notify,
    /// Moves waiting for their standbys' answers to the fence, per service.
    fences: Mutex<IdMap<Fencing>>,
}

impl Replicas {
    pub fn new(settings: Settings) -> Self {
        Replicas {
            settings,
            running: std::sync::atomic::AtomicUsize::new(0),
            primaries: Mutex::new(IdMap::default()),
            standbys: Mutex::new(Standbys::new(STANDBY_SERVICES_MAX, STANDBY_BYTES_MAX)),
            grantors: Mutex::new(BTreeMap::new()),
            leases: Mutex::new(BTreeMap::new()),
            to_release: Mutex::new(BTreeMap::new()),
            taken_from: Mutex::new(IdMap::default()),
            ballots: Mutex::new(Ballots::default()),
            claiming: Mutex::new(IdMap::default()),
            parked: Mutex::new(IdMap::default()),
            dormant: Mutex::new(IdMap::default()),
            durable: std::sync::atomic::AtomicBool::new(false),
            term_base: std::sync::atomic::AtomicU64::new(0),
            undurable: Mutex::new(IdMap::default()),
            changed: tokio::sync::Notify::new(),
            fences: Mutex::new(IdMap::default()),
        }
    }

    /// True when replicated service `id` may handle a message now (see
    /// [`ReplicaInfo::serving`]); true for any other service.
    pub fn may_serve(&self, id: ServiceId) -> bool {
        matches!(self.gate(id), Gate::Serve)
    }

    /// What the runner of replicated service `id` does before its next message: one look at
    /// the tables (the primaries' lock, then the leases', in the lock order; nothing cloned
    /// unless it retires).
    pub fn gate(&self, id: ServiceId) -> Gate {
        if self.running.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return Gate::Serve;
        }
        let all = lock(&self.primaries);
        let Some(p) = all.get(&id) else {
            return Gate::Serve;
        };
        if let Some((to, epoch)) = &p.retired {
            return Gate::Retire(to.clone(), *epoch);
        }
        if !p.sent {
            return Gate::Serve;
        }
        let (Some(standby), Some(term)) = (&p.standby, p.term) else {
            return Gate::Wait;
        };
        let leased = lock(&self.leases)
            .get(standby)
            .is_some_and(|l| l.valid(now_us()) && l.term() == Some(term));
        if leased {
            Gate::Serve
        } else {
            Gate::Wait
        }
    }

    /// True when `id` is a replicated service this node runs with a standby: its senders are
    /// confirmed by acknowledged checkpoints. Without a standby nothing could take it over, and
    /// its mailbox's marks confirm them as for any service.
    pub fn is_protected(&self, id: ServiceId) -> bool {
        if self.running.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return false;
        }
        let durable = self.durable.load(std::sync::atomic::Ordering::Relaxed);
        lock(&self.primaries)
            .get(&id)
            .is_some_and(|p| durable || p.standby.is_some() || p.sent || p.retired.is_some())
    }

    /// For a replicated service this node runs (and has not retired): its epoch and the
    /// standbys it sent checkpoints of that epoch to (the only nodes that may claim the next).
    pub fn running(&self, id: ServiceId) -> Option<(u64, Vec<NodeName>)> {
        if self.running.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return None;
        }
        lock(&self.primaries)
            .get(&id)
            .filter(|p| p.retired.is_none())
            .map(|p| (p.epoch, p.first_to.keys().cloned().collect()))
    }

    /// `id` (of `kind`, at `epoch`) starts here as a replicated service, its senders' windows
    /// at `marks` (the last number each took: restored from a snapshot or a checkpoint).
    pub fn start(&self, id: ServiceId, kind: KindKey, epoch: u64, marks: Vec<(ServiceId, u64)>) {
        let mut cadence = Cadence::default();
        cadence.urgent();
        let avoid = lock(&self.taken_from).remove(&id);
        let mut all = lock(&self.primaries);
        all.insert(
            id,
            Primary {
                kind,
                epoch,
                standby: None,
                voters: Vec::new(),
                cadence,
                taken: marks.into_iter().map(|(s, n)| (s, (n, None))).collect(),
                acked: 0,
                term: None,
                retry_at_us: 0,
                sent: false,
                first_to: BTreeMap::new(),
                retired: None,
                ballot_at_us: 0,
                standby_since_us: 0,
                avoid,
                moving: false,
                ballot_open: false,
                also_tell: Vec::new(),
            },
        );
        self.running
            .store(all.len(), std::sync::atomic::Ordering::SeqCst);
    }

    /// `id` no longer runs here (stopped or moved).
    fn stop(&self, id: ServiceId) -> Option<Primary> {
        if self.running.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            return None;
        }
        lock(&self.undurable).remove(&id);
        let mut all = lock(&self.primaries);
        let p = all.remove(&id);
        self.running
            .store(all.len(), std::sync::atomic::Ordering::SeqCst);
        p
    }

    /// The runner handled a message of `id` from `from` (its number and node); true when a
    /// checkpoint is due.
    pub fn handled(&self, id: ServiceId, from: Option<(ServiceId, u64, Option<NodeName>)>) -> bool {
        let now = now_us();
        let mut all = lock(&self.primaries);
        let Some(p) = all.get_mut(&id) else {
            return false;
        };
        p.cadence.handled(now);
        if let Some((sender, seq, origin)) = from {
            p.taken.insert(sender, (seq, origin));
        }
        now >= p.retry_at_us
            && (p.cadence.overdue(now, &self.settings) || p.cadence.due(now, &self.settings))
    }

    /// The mailbox of `id` noted marks (`Inbox::take_handled`); a replicated service's
    /// senders are confirmed by its checkpoints, so only a mark for a node other than the one
    /// its own marks name is kept: that node sent copies of messages taken already, and is
    /// told too once a confirmation covers them.
    pub fn also_tell(&self, id: ServiceId, marks: &[(ServiceId, u64, Option<NodeName>)]) {
        let mut all = lock(&self.primaries);
        let Some(p) = all.get_mut(&id) else {
            return;
        };
        for (sender, seq, origin) in marks {
            let Some(node) = origin else {
                continue;
            };
            if p.taken
                .get(sender)
                .is_some_and(|(_, o)| o.as_ref() == Some(node))
            {
                continue;
            }
            if let Some(e) = p
                .also_tell
                .iter_mut()
                .find(|(s, _, n)| s == sender && n == node)
            {
                e.1 = e.1.max(*seq);
                continue;
            }
            if p.also_tell.len() >= ALSO_TELL_MAX {
                p.also_tell.remove(0);
            }
            p.also_tell.push((*sender, *seq, node.clone()));
        }
    }

    /// When a checkpoint of `id` falls due by time alone (or an overdue one is to be replaced).
    pub fn due_at(&self, id: ServiceId) -> Option<std::time::Duration> {
        let all = lock(&self.primaries);
        let p = all.get(&id)?;
        let now = now_us();
        if p.cadence.due(now, &self.settings) || p.cadence.overdue(now, &self.settings) {
            return Some(std::time::Duration::from_micros(
                p.retry_at_us.saturating_sub(now),
            ));
        }
        let at = if p.cadence.in_flight() {
            // Look again once it could be overdue.
            now + self.settings.lease_ms * 1_000
        } else {
            p.cadence.due_at_us(&self.settings)?
        };
        Some(std::time::Duration::from_micros(at.saturating_sub(now)))
    }

    /// The plan for a checkpoint of `id` now, if one is due and a standby is known.
    fn plan(&self, id: ServiceId) -> Option<CheckpointPlan> {
        let now = now_us();
        let mut all = lock(&self.primaries);
        let p = all.get_mut(&id)?;
        if now < p.retry_at_us {
            return None;
        }
        if p.cadence.overdue(now, &self.settings) {
            p.cadence.failed();
        }
        if !p.cadence.due(now, &self.settings) {
            return None;
        }
        Some(CheckpointPlan {
            standby: p.standby.clone()?,
            taken: p.taken.iter().map(|(s, (n, _))| (*s, *n)).collect(),
        })
    }

    fn standby_missing(&self, id: ServiceId) -> Option<(KindKey, Option<NodeName>)> {
        let all = lock(&self.primaries);
        let p = all.get(&id)?;
        p.standby
            .is_none()
            .then(|| (p.kind.clone(), p.avoid.clone()))
    }

    fn set_standby(&self, id: ServiceId, standby: NodeName, voters: Vec<NodeName>) {
        if let Some(p) = lock(&self.primaries).get_mut(&id) {
            lock(&self.leases)
                .entry(standby.clone())
                .or_insert_with(|| Lease::new(&self.settings));
            p.standby = Some(standby);
            p.standby_since_us = now_us();
            p.term = None;
            p.voters = voters;
            drop(p.cadence.restart());
        }
    }

    /// The standby of `p` can no longer be used: another is chosen for the next checkpoint.
    fn drop_standby(&self, p: &mut Primary) {
        p.standby = None;
        p.term = None;
        drop(p.cadence.restart());
        p.retry_at_us = now_us() + self.settings.renew_ms * 1_000;
    }

    /// The checkpoint was sent: its number.
    fn sent(
        &self,
        id: ServiceId,
        standby: &NodeName,
        taken: Vec<(ServiceId, u64)>,
    ) -> Option<(CheckpointNo, u64, Vec<NodeName>, KindKey, bool)> {
        let mut all = lock(&self.primaries);
        let p = all.get_mut(&id)?;
        let no = p.cadence.cut(taken, now_us());
        let first_of_epoch = !p.sent;
        p.sent = true;
        p.first_to.entry(standby.clone()).or_insert(no);
        Some((
            no,
            p.epoch,
            p.voters.clone(),
            p.kind.clone(),
            first_of_epoch,
        ))
    }

    /// The marks a checkpoint of `id` kept only on disk would cover, if one is due (a service
    /// with no standby, on a node with a data directory).
    fn plan_disk(&self, id: ServiceId) -> Option<Vec<(ServiceId, u64)>> {
        let now = now_us();
        let all = lock(&self.primaries);
        let p = all.get(&id)?;
        (now >= p.retry_at_us && p.cadence.due(now, &self.settings))
            .then(|| p.taken.iter().map(|(s, (n, _))| (*s, *n)).collect())
    }

    /// A checkpoint kept only on disk was cut: its number, the epoch, the voters a restart
    /// must win (none unless a standby may hold a checkpoint of this epoch) and the kind.
    fn disk_cut(
        &self,
        id: ServiceId,
        taken: Vec<(ServiceId, u64)>,
    ) -> Option<(CheckpointNo, u64, Vec<NodeName>, KindKey, Pending)> {
        let mut all = lock(&self.primaries);
        let p = all.get_mut(&id)?;
        let no = p.cadence.cut(taken, now_us());
        // Nobody acknowledges it: the disk holds it once written, and its marks are released
        // then.
        let marks = p
            .cadence
            .acked(no)
            .unwrap_or_default()
            .into_iter()
            .map(|(s, n)| (s, n, p.taken.get(&s).and_then(|(_, o)| o.clone())))
            .collect();
        let marks = p.with_also_told(marks);
        let voters = if p.sent { p.voters.clone() } else { Vec::new() };
        Some((no, p.epoch, voters, p.kind.clone(), (no, marks)))
    }

    /// A move of `id` did not happen (refused, aborted, or its fence refused): the copy here
    /// goes on, may run a ballot again, and checkpoints at once (its record on disk was
    /// removed for the move).
    pub fn stayed(&self, id: ServiceId) {
        lock(&self.fences).remove(&id);
        if let Some(p) = lock(&self.primaries).get_mut(&id) {
            p.moving = false;
            p.cadence.urgent();
        }
    }

    /// What the data directory held when the node started: its votes, and the checkpoints of
    /// services it ran, each a vote for its own epoch (no claim to an epoch this node ran the
    /// service at is granted to another).
    pub fn load(&self, me: &NodeName, loaded: crate::store::Loaded) -> Vec<String> {
        self.durable
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut problems = loaded.unreadable;
        let mut ballots = lock(&self.ballots);
        for (service, epoch, holder) in loaded.ballots {
            if !ballots.restore(service, epoch, holder) {
                problems.push(format!(
                    "vote on {service} not restored: the ballot table is full"
                ));
            }
        }
        let mut dormant = lock(&self.dormant);
        for (service, record) in loaded.checkpoints {
            if !ballots.restore(service, record.epoch, me.clone()) {
                problems.push(format!(
                    "checkpoint of {service} not resumed: the ballot table is full"
                ));
                continue;
            }
            dormant.insert(
                service,
                Dormant {
                    record,
                    retry_at_us: 0,
                },
            );
        }
        problems
    }

    /// Checkpoints from the data directory not resumed yet: service, kind, epoch.
    pub fn dormant(&self) -> Vec<(ServiceId, KindKey, u64)> {
        let mut out: Vec<_> = lock(&self.dormant)
            .iter()
            .map(|(id, d)| (*id, d.record.kind.clone(), d.record.epoch))
            .collect();
        out.sort_by_key(|(id, _, _)| *id);
        out
    }

    /// Sets the first term of this node's grantors (at start).
    pub fn set_term_base(&self, base: u64) {
        self.term_base
            .store(base, std::sync::atomic::Ordering::Relaxed);
    }

    /// A grantor for a primary this node hears from for the first time in this life.
    fn new_grantor(&self) -> Grantor {
        Grantor::starting_at(self.term_base.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// No checkpoint could go now: the next is tried after `renew_ms`.
    fn failed(&self, id: ServiceId) {
        if let Some(p) = lock(&self.primaries).get_mut(&id) {
            p.cadence.failed();
            p.retry_at_us = now_us() + self.settings.renew_ms * 1_000;
        }
    }

    /// What a replicated service this node runs stands at.
    pub fn info(&self, id: ServiceId) -> Option<ReplicaInfo> {
        let all = lock(&self.primaries);
        let p = all.get(&id)?;
        Some(ReplicaInfo {
            epoch: p.epoch,
            standby: p.standby.clone(),
            voters: p.voters.clone(),
            acked: p.acked,
            in_flight: p.cadence.in_flight(),
            serving: {
                drop(all);
                self.may_serve(id)
            },
        })
    }

    /// The checkpoints this node holds for others.
    pub fn held(&self) -> Vec<StandbyInfo> {
        let t = lock(&self.standbys);
        let mut out = Vec::new();
        for (id, h) in t.iter() {
            out.push(StandbyInfo {
                service: id,
                primary: h.primary.clone(),
                epoch: h.epoch,
                no: h.no,
                bytes: h.bytes,
            });
        }
        out.sort_by_key(|i| i.service);
        out
    }
}

impl NodeShared {
    /// A standby for a replicated service of `kind`: a member up, not this node, that
    /// placement would let take the service (the kind registered, every capability its
    /// `REQUIRES` names, not draining), the one with the most of its `PREFERS`, then the most
    /// charge, then the first by name; with it, the voters: this node, the standby
    /// and a witness, the first other member up. Exactly three: two claimers (the standby
    /// taking over, this node going on) each vote for itself, so the witness decides and a
    /// ballot never splits. With no witness there is no standby: two nodes alone could never
    /// fail over (a claim needs two of three), and the service runs unprotected instead of
    /// stopping whenever the other node leaves.
    /// `avoid`: a standby just given up, chosen again only if no other node can stand by.
    fn choose_standby(
        &self,
        kind: &KindKey,
        avoid: Option<&NodeName>,
    ) -> Option<(NodeName, Vec<NodeName>)> {
        let members = lock(&self.members).list();
        let up: Vec<&crate::members::Member> = members
            .iter()
            .filter(|m| !m.local && m.status == crate::members::MemberStatus::Up)
            .filter(|m| self.links.get(&m.info.name).is_some())
            .collect();
        // Placement's rule of who may take the service (`NodeView::unfit`: the kind
        // registered, every required capability, not draining); the best first: the most
        // preferred capabilities, then the most charge, then by name.
        let needs = self.needs_in(&members, kind).unwrap_or_default();
        let mut able: Vec<tern_proto::placement::NodeView> = up
            .iter()
            .map(|m| self.node_view(m, true, 0))
            .filter(|v| v.unfit(kind, &needs).is_none())
            .collect();
        able.sort_by_key(|v| {
            (
                std::cmp::Reverse(v.preferred_met(&needs)),
                std::cmp::Reverse(v.power_percent),
            )
        });
        let standby = able
            .iter()
            .find(|v| Some(&v.name) != avoid)
            .or(able.first())?
            .name
            .clone();
        let witness = up
            .iter()
            .find(|m| m.info.name != standby)?
            .info
            .name
            .clone();
        Some((standby.clone(), vec![self.name().clone(), standby, witness]))
    }

    /// Sends a checkpoint of replicated service `id` if one is due: `capture` builds its body
    /// from the marks it covers (MessagePack of a `CheckpointBody`). Called by the runner
    /// between messages.
    pub(crate) fn replica_checkpoint(
        &self,
        id: ServiceId,
        capture: impl FnOnce(Vec<(ServiceId, u64)>) -> Result<Vec<u8>, String>,
    ) {
        if let Some((kind, avoid)) = self.replicas.standby_missing(id) {
            match self.choose_standby(&kind, avoid.as_ref()) {
                Some((standby, voters)) => {
                    self.logs.event(
                        "standby-chosen",
                        format!("{id}: {standby}, voters {voters:?}"),
                    );
                    self.replicas.set_standby(id, standby, voters);
                }
                None if self.store.is_some() => {
                    self.replica_disk_checkpoint(id, capture);
                    return;
                }
                None => {
                    self.replicas.failed(id);
                    return;
                }
            }
        }
        let Some(plan) = self.replicas.plan(id) else {
            return;
        };
        let Some(body) = self.checkpoint_body(id, capture, plan.taken.clone()) else {
            return;
        };
        let Some(link) = self.links.get(&plan.standby) else {
            self.replicas.failed(id);
            return;
        };
        let bytes = body.len() as u64;
        let Some((no, epoch, voters, kind, first_of_epoch)) =
            self.replicas.sent(id, &plan.standby, plan.taken)
        else {
            return;
        };
        if let Some(store) = &self.store {
            store.put(
                id,
                &Stored {
                    format: Stored::FORMAT,
                    kind: kind.clone(),
                    epoch,
                    no,
                    voters: voters.clone(),
                    body: body.clone(),
                },
            );
            // The first checkpoint of the epoch a standby may hold: the record on disk must
            // name the voters before it goes (one that names none is resumed by this node
            // alone, which is right only while no standby can take the epoch over).
            if first_of_epoch {
                store.flush();
            }
        }
        let frame = Frame::Replica(ReplicaMsg::Checkpoint {
            service: id,
            kind,
            epoch,
            no,
            voters,
            body,
        });
        // A lease not valid now is renewed ahead of the checkpoint, on the same stream: its
        // grant comes back before the acknowledgement, and the copy need not pause between
        // the two.
        let renew = {
            let mut leases = lock(&self.replicas.leases);
            leases
                .get_mut(&plan.standby)
                .filter(|l| !l.valid(now_us()))
                .map(|l| l.renew(now_us()))
        };
        if let Some(no) = renew {
            let _ = link.push_ctrl(&Frame::Replica(ReplicaMsg::Renew { no }));
        }
        match link.push_ctrl(&frame) {
            Ok(()) => {
                self.stats.checkpoints_sent.inc();
                self.stats.checkpoint_bytes.add(bytes);
            }
            Err(e) => {
                self.logs.event(
                    "checkpoint-unsent",
                    format!("{id} to {}: {e}", plan.standby),
                );
                self.replicas.failed(id);
            }
        }
    }

    /// A checkpoint's body from `capture`, if it can be made and is not too large (else the
    /// next one is tried after `renew_ms`).
    fn checkpoint_body(
        &self,
        id: ServiceId,
        capture: impl FnOnce(Vec<(ServiceId, u64)>) -> Result<Vec<u8>, String>,
        taken: Vec<(ServiceId, u64)>,
    ) -> Option<Vec<u8>> {
        let body = match capture(taken) {
            Ok(b) => b,
            Err(e) => {
                self.logs.event("checkpoint-failed", format!("{id}: {e}"));
                self.replicas.failed(id);
                return None;
            }
        };
        if body.len() as u64 > self.replicas.settings.checkpoint_bytes_max {
            self.logs.event(
                "checkpoint-too-large",
                format!(
                    "{id}: {} bytes, checkpoint_bytes_max {}",
                    body.len(),
                    self.replicas.settings.checkpoint_bytes_max
                ),
            );
            self.replicas.failed(id);
            return None;
        }
        Some(body)
    }

    /// A checkpoint of `id`, which has no standby, kept on disk only: after a restart the
    /// node resumes the service from it.
    fn replica_disk_checkpoint(
        &self,
        id: ServiceId,
        capture: impl FnOnce(Vec<(ServiceId, u64)>) -> Result<Vec<u8>, String>,
    ) {
        let (Some(store), Some(taken)) = (&self.store, self.replicas.plan_disk(id)) else {
            return;
        };
        let Some(body) = self.checkpoint_body(id, capture, taken.clone()) else {
            return;
        };
        if let Some((no, epoch, voters, kind, pending)) = self.replicas.disk_cut(id, taken) {
            store.put(
                id,
                &Stored {
                    format: Stored::FORMAT,
                    kind,
                    epoch,
                    no,
                    voters,
                    body,
                },
            );
            self.stats.checkpoints_stored.inc();
            self.confirm_when_durable(id, pending);
        }
    }

    /// Removes `id`'s checkpoint from the data directory, durably, before it leaves this node
    /// (a move, a stop, a copy retiring): a restart must not bring back a copy that goes on
    /// elsewhere, or that was stopped.
    pub(crate) fn store_forget(&self, id: ServiceId) {
        if let Some(store) = &self.store {
            if let Err(e) = store.forget(id) {
                self.logs.event(
                    "store-error",
                    format!("checkpoint of {id} not removed: {e}"),
                );
            }
        }
    }

    /// Records this node's vote for `claim` in the data directory before it is given: a node
    /// that restarts must not grant the same epoch to another. False when it could not be
    /// written (the vote is then not given).
    fn store_grant(&self, claim: &Claim) -> bool {
        let Some(store) = &self.store else {
            return true;
        };
        match store.grant(claim.service, claim.epoch, &claim.holder) {
            Ok(()) => true,
            Err(e) => {
                self.logs.event(
                    "store-error",
                    format!(
                        "vote on {} at epoch {} not written: {e}",
                        claim.service, claim.epoch
                    ),
                );
                false
            }
        }
    }

    /// A replicated service left this node (stopped, or moved with no crash on the way): its
    /// standby lets it go, and what it handled is confirmed to its senders now.
    pub(crate) fn replica_left(&self, id: ServiceId) {
        let Some(mut p) = self.replicas.stop(id) else {
            return;
        };
        self.store_forget(id);
        if let Some(standby) = &p.standby {
            if let Some(link) = self.links.get(standby) {
                let _ = link.push_ctrl(&Frame::Replica(ReplicaMsg::Release {
                    service: id,
                    epoch: p.epoch,
                }));
            }
        }
        let marks = p
            .taken
            .iter()
            .map(|(s, (n, o))| (*s, *n, o.clone()))
            .collect();
        let marks = p.with_also_told(marks);
        self.confirm(id, marks);
    }

    /// Before a move of replicated service `id` may commit (called by its runner as it
    /// freezes): every standby sent a checkpoint of its epoch must let it go
    /// (`Standbys::fence`), or, left holding one, could claim the very epoch the move gives its
    /// target. `Ok(None)`: none was sent one, the move may go. `Ok(Some(rx))`: `rx` says
    /// whether all agreed (refused by one, or not all answered within `lease_ms`). `Err`: the
    /// move may not go now (a ballot for the next epoch is open, or the copy retired).
    pub(crate) fn replica_fence(
        &self,
        id: ServiceId,
    ) -> Result<Option<tokio::sync::oneshot::Receiver<Result<(), String>>>, String> {
        let claiming = lock(&self.replicas.claiming).contains_key(&id);
        let (epoch, no, to) = {
            let mut all = lock(&self.replicas.primaries);
            let Some(p) = all.get_mut(&id) else {
                return Ok(None);
            };
            if let Some((to, e)) = &p.retired {
                return Err(format!("{to} continues it at epoch {e}"));
            }
            if p.ballot_open || claiming {
                return Err(format!(
                    "its ballot to go on at epoch {} is not decided",
                    p.epoch + 1
                ));
            }
            p.moving = true;
            let mut to: std::collections::BTreeSet<NodeName> = p.first_to.keys().cloned().collect();
            if p.sent {
                to.extend(p.standby.clone());
            }
            if to.is_empty() {
                return Ok(None);
            }
            (p.epoch, p.cadence.last_no(), to)
        };
        let mut links = Vec::with_capacity(to.len());
        for n in &to {
            match self.links.get(n) {
                Some(link) => links.push(link),
                None => {
                    return Err(format!(
                        "{n}, which holds a checkpoint of its epoch {epoch}, is out of reach"
                    ))
                }
            }
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.replicas.fences).insert(
            id,
            Fencing {
                epoch,
                waiting: to,
                until_us: now_us() + self.replicas.settings.lease_ms * 1_000,
                done: tx,
            },
        );
        for link in links {
            let _ = link.push_ctrl(&Frame::Replica(ReplicaMsg::Fence {
                service: id,
                epoch,
                no,
            }));
        }
        Ok(Some(rx))
    }

    /// A standby answered a fence of `service` at `epoch`. Once all agreed, no node holds a
    /// checkpoint of the epoch: the copy here serves without a lease until it checkpoints to
    /// a standby again (if the move does not go after all).
    fn fenced(&self, from: &NodeName, service: ServiceId, epoch: u64, refused: Option<String>) {
        let mut fences = lock(&self.replicas.fences);
        let Some(f) = fences.get_mut(&service) else {
            return;
        };
        if f.epoch != epoch || !f.waiting.remove(from) {
            return;
        }
        if let Some(why) = refused {
            if let Some(f) = fences.remove(&service) {
                let _ = f
                    .done
                    .send(Err(format!("its standby {from} refused to let go: {why}")));
            }
            return;
        }
        if !f.waiting.is_empty() {
            return;
        }
        let Some(f) = fences.remove(&service) else {
            return;
        };
        drop(fences);
        if let Some(p) = lock(&self.replicas.primaries).get_mut(&service) {
            if p.epoch == epoch {
                p.first_to.clear();
                p.sent = false;
                p.acked = 0;
                self.replicas.drop_standby(p);
            }
        }
        let _ = f.done.send(Ok(()));
    }

    /// Fences that waited too long, or wait on `lost` (a link that went down), fail.
    fn fences_fail(&self, now: u64, lost: Option<&NodeName>) {
        let mut fences = lock(&self.replicas.fences);
        let failed: Vec<ServiceId> = fences
            .iter()
            .filter(|(_, f)| now >= f.until_us || lost.is_some_and(|n| f.waiting.contains(n)))
            .map(|(id, _)| *id)
            .collect();
        for id in failed {
            if let Some(f) = fences.remove(&id) {
                let names: Vec<String> = f.waiting.iter().map(|n| n.to_string()).collect();
                let _ = f.done.send(Err(format!(
                    "{} did not let go of its checkpoints within {} ms",
                    names.join(", "),
                    self.replicas.settings.lease_ms
                )));
            }
        }
    }

    /// The copies kept here of the tells replicated service `id` sent to `receivers` and has
    /// not seen confirmed, in order per receiver: its checkpoint carries them.
    pub(crate) fn outputs_of(
        &self,
        id: ServiceId,
        receivers: impl IntoIterator<Item = ServiceId>,
    ) -> Vec<tern_proto::wire::KeptOutput> {
        receivers
            .into_iter()
            .filter_map(|r| self.channel_known(r))
            .flat_map(|c| c.outputs_of(id))
            .collect()
    }

    /// Replicated service `id` runs here from a checkpoint (taken over, or resumed from the
    /// data directory): what it had sent and not seen confirmed goes again, in order per
    /// receiver, before it handles anything, under the same numbers. The receivers drop what
    /// they took already, and tell this node so.
    pub(crate) fn send_outputs(
        self: &std::sync::Arc<Self>,
        id: ServiceId,
        outputs: Vec<tern_proto::wire::KeptOutput>,
    ) {
        let mut by_to: BTreeMap<ServiceId, Vec<tern_proto::wire::KeptOutput>> = BTreeMap::new();
        for o in outputs {
            by_to.entry(o.to).or_default().push(o);
        }
        let mut sent = 0u64;
        let mut unrouted = 0usize;
        for (to, mut outs) in by_to {
            outs.sort_by_key(|o| o.seq);
            // A handler that finds its receivers in its book by role has made no channel to
            // them yet: the book names them, with their kinds.
            let chan = self.channel_known(to).or_else(|| {
                self.books
                    .addr_of(to)
                    .and_then(|addr| self.channel_to(&addr))
            });
            match chan {
                Some(chan) => sent += chan.send_outputs(self, id, outs) as u64,
                None => unrouted += outs.len(),
            }
        }
        if sent > 0 {
            self.stats.outputs_resent.add(sent);
        }
        if unrouted > 0 {
            // A receiver that is in no book here and of a kind not registered here cannot be
            // reached without its message type.
            self.logs.event(
                "outputs-unrouted",
                format!("{id}: {unrouted} carried messages to receivers with no channel here were not sent again"),
            );
        }
    }

    /// Tells senders that `service` took their messages up to the marks given.
    fn confirm(&self, service: ServiceId, marks: Vec<(ServiceId, u64, Option<NodeName>)>) {
        let mut remote: std::collections::HashMap<NodeName, Vec<(ServiceId, ServiceId, u64)>> =
            std::collections::HashMap::new();
        for (sender, seq, origin) in marks {
            match origin {
                Some(o) if o != *self.name() => {
                    remote.entry(o).or_default().push((service, sender, seq))
                }
                _ => self.settle(service, sender, seq),
            }
        }
        for (origin, marks) in remote {
            self.send_handled(&origin, marks);
        }
    }

    /// A peer's replication message.
    pub(crate) fn on_replica(self: &std::sync::Arc<Self>, from: &NodeName, msg: ReplicaMsg) {
        match msg {
            ReplicaMsg::Checkpoint {
                service,
                kind,
                epoch,
                no,
                voters,
                body,
            } => {
                let c = Parked {
                    service,
                    from: from.clone(),
                    kind,
                    epoch,
                    no,
                    voters,
                    body,
                    at_us: now_us(),
                };
                if let Some(answer) = self.hold_checkpoint(c, true) {
                    if let Some(link) = self.links.get(from) {
                        let _ = link.push_ctrl(&Frame::Replica(answer));
                    }
                }
            }
            ReplicaMsg::Ack {
                service,
                epoch,
                no,
                term,
            } => self.checkpoint_acked(from, service, epoch, no, term),
            ReplicaMsg::Refused {
                service,
                no,
                reason,
            } => {
                self.logs.event(
                    "checkpoint-refused",
                    format!("{service} checkpoint {no} by {from}: {reason}"),
                );
                // Another standby is chosen for the next one, another node if there is one.
                let mut all = lock(&self.replicas.primaries);
                if let Some(p) = all.get_mut(&service) {
                    if p.standby.as_ref() == Some(from) {
                        self.replicas.drop_standby(p);
                        p.avoid = Some(from.clone());
                    }
                    if p.first_to.get(from) == Some(&no) {
                        p.first_to.remove(from);
                        if p.first_to.is_empty() && p.acked == 0 {
                            p.sent = false;
                        }
                    }
                }
            }
            ReplicaMsg::Renew { no } => {
                let grant = lock(&self.replicas.grantors)
                    .entry(from.clone())
                    .or_insert_with(|| self.replicas.new_grantor())
                    .heard(now_us(), &self.replicas.settings);
                // Past the wait, silence: the primary's lease lapses, whatever it asks.
                if let (Some(Grant { term }), Some(link)) = (grant, self.links.get(from)) {
                    let _ = link.push_ctrl(&Frame::Replica(ReplicaMsg::Granted { no, term }));
                }
            }
            ReplicaMsg::Granted { no, term } => self.lease_granted(from, no, term),
            ReplicaMsg::Claim(claim) => self.on_claim(from, claim),
            ReplicaMsg::Vote { claim, vote } => self.on_vote(from, claim, vote),
            ReplicaMsg::Release { service, epoch } => {
                let mut t = lock(&self.replicas.standbys);
                if t.get(service)
                    .is_some_and(|h| h.primary == *from && h.epoch <= epoch)
                {
                    t.drop_service(service);
                }
            }
            ReplicaMsg::Fence { service, epoch, no } => {
                let answer = lock(&self.replicas.standbys).fence(from, service, epoch, no);
                // A checkpoint from before the fence, parked until the directory names its
                // sender, goes too.
                {
                    let mut parked = lock(&self.replicas.parked);
                    if parked
                        .get(&service)
                        .is_some_and(|c| c.from == *from && c.epoch <= epoch)
                    {
                        parked.remove(&service);
                    }
                }
                if let Err(why) = &answer {
                    self.logs.event(
                        "fence-refused",
                        format!("{service} at epoch {epoch}, to {from}: {why}"),
                    );
                }
                if let Some(link) = self.links.get(from) {
                    let _ = link.push_ctrl(&Frame::Replica(ReplicaMsg::Fenced {
                        service,
                        epoch,
                        refused: answer.err().map(|e| e.to_string()),
                    }));
                }
            }
            ReplicaMsg::Fenced {
                service,
                epoch,
                refused,
            } => self.fenced(from, service, epoch, refused),
        }
    }

    /// Takes checkpoint `c` as a standby: the answer to send, or `None` when it is parked
    /// (`may_park`) until this node's directory names its sender.
    fn hold_checkpoint(&self, c: Parked, may_park: bool) -> Option<ReplicaMsg> {
        let (service, no) = (c.service, c.no);
        let refuse = |reason: String| {
            Some(ReplicaMsg::Refused {
                service,
                no,
                reason,
            })
        };
        let from = &c.from;
        if !self.has_kind(&c.kind) {
            return refuse(format!("kind {} is not registered here", c.kind));
        }
        // Only the node that runs a service checkpoints it: the one this node's directory
        // names, or, when it names none, the node it holds the service's checkpoints from (a
        // new primary after a move waits until the old one has let them go). A directory
        // that knows only an older epoch may not have heard of the move yet: the checkpoint
        // waits for it.
        match self.driver.location(service) {
            Some((host, known)) if host != *from => {
                if may_park && known < c.epoch {
                    return self.park(c);
                }
                return refuse(format!("{service} runs on {host}, not {from}"));
            }
            Some(_) => {}
            None => {
                if let Some(h) = lock(&self.replicas.standbys).get(service) {
                    if h.primary != *from {
                        return refuse(format!(
                            "checkpoints of {service} come from {}, not {from}",
                            h.primary
                        ));
                    }
                }
            }
        }
        // Nor from a copy this node knows to be superseded: it granted a newer epoch (taking
        // the checkpoint would let that copy's primary serve again).
        if let Some((e, holder)) = lock(&self.replicas.ballots)
            .supersedes(service, c.epoch)
            .cloned()
        {
            return refuse(format!(
                "{service}: this node granted epoch {e} to {holder}; a checkpoint of epoch {} \
                 is of a superseded copy",
                c.epoch
            ));
        }
        let now = now_us();
        let term = {
            let mut g = lock(&self.replicas.grantors);
            match g
                .entry(from.clone())
                .or_insert_with(|| self.replicas.new_grantor())
                .heard(now, &self.replicas.settings)
            {
                Some(grant) => grant.term,
                None => return refuse("the standby's wait for this primary ran out".into()),
            }
        };
        let bytes = c.body.len() as u64;
        let held = Held {
            primary: from.clone(),
            epoch: c.epoch,
            no,
            voters: c.voters,
            body: (c.kind, c.body),
            bytes,
        };
        let mut table = lock(&self.replicas.standbys);
        let (services, held_bytes) = table.held_for(from);
        let replaced = table
            .get(service)
            .filter(|h| h.primary == *from)
            .map_or(0, |h| h.bytes);
        let new_service = table.get(service).is_none_or(|h| h.primary != *from);
        if (new_service && services >= STANDBY_SERVICES_PER_PEER_MAX)
            || held_bytes - replaced + bytes > STANDBY_BYTES_PER_PEER_MAX
        {
            return refuse(format!(
                "{from} holds {services} services and {held_bytes} bytes here already \
                 (at most {STANDBY_SERVICES_PER_PEER_MAX} and {STANDBY_BYTES_PER_PEER_MAX})"
            ));
        }
        match table.offer(self.name(), service, held) {
            Ok(()) => {
                self.stats.checkpoints_held.inc();
                Some(ReplicaMsg::Ack {
                    service,
                    epoch: c.epoch,
                    no,
                    term,
                })
            }
            Err(e) => refuse(e.to_string()),
        }
    }

    /// Parks checkpoint `c` (see [`Parked`]): a newer one of the same service replaces it,
    /// keeping the time the first was parked (the one replaced is never answered; its primary
    /// counts it overdue). Refused past [`PARKED_PER_PEER_MAX`] per sender.
    fn park(&self, mut c: Parked) -> Option<ReplicaMsg> {
        let mut parked = lock(&self.replicas.parked);
        let first = parked
            .get(&c.service)
            .filter(|p| p.from == c.from)
            .map(|p| p.at_us);
        let same = first.is_some();
        c.at_us = first.unwrap_or(c.at_us);
        let of_sender = parked.values().filter(|p| p.from == c.from).count();
        if !same && of_sender >= PARKED_PER_PEER_MAX {
            return Some(ReplicaMsg::Refused {
                service: c.service,
                no: c.no,
                reason: format!(
                    "{} has {of_sender} checkpoints waiting here for its moves to be heard of \
                     (at most {PARKED_PER_PEER_MAX})",
                    c.from
                ),
            });
        }
        parked.insert(c.service, c);
        self.stats.checkpoints_parked.inc();
        None
    }

    /// Answers the parked checkpoints whose sender this node's directory now names (of
    /// `only`, or all), and refuses those parked for `renew_ms`.
    pub(crate) fn replica_parked_recheck(&self, only: Option<ServiceId>) {
        let ready: Vec<Parked> = {
            let mut parked = lock(&self.replicas.parked);
            if parked.is_empty() {
                return;
            }
            let now = now_us();
            let wait_us = self.replicas.settings.renew_ms * 1_000;
            let ids: Vec<ServiceId> = parked
                .iter()
                .filter(|(id, _)| only.is_none_or(|o| o == **id))
                .filter(|(id, p)| {
                    now.saturating_sub(p.at_us) >= wait_us
                        || self
                            .driver
                            .location(**id)
                            .is_none_or(|(host, known)| host == p.from || known >= p.epoch)
                })
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| parked.remove(id)).collect()
        };
        for c in ready {
            let from = c.from.clone();
            if let Some(answer) = self.hold_checkpoint(c, false) {
                if let Some(link) = self.links.get(&from) {
                    let _ = link.push_ctrl(&Frame::Replica(answer));
                }
            }
        }
    }

    /// The standby holds checkpoint `no`: the senders' messages it covers are confirmed.
    fn checkpoint_acked(
        self: &std::sync::Arc<Self>,
        from: &NodeName,
        service: ServiceId,
        epoch: u64,
        no: u64,
        term: u64,
    ) {
        let marks = {
            let mut all = lock(&self.replicas.primaries);
            let Some(p) = all.get_mut(&service) else {
                return;
            };
            if p.epoch != epoch || p.standby.as_ref() != Some(from) {
                return;
            }
            let Some(marks) = p.cadence.acked(no) else {
                return;
            };
            p.acked += 1;
            // Peers learn the standby soon: only it may take the service over.
            if p.term.is_none() {
                self.gossip_soon();
            }
            p.term = Some(term);
            self.replicas.changed.notify_waiters();
            let marks = marks
                .into_iter()
                .map(|(s, n)| (s, n, p.taken.get(&s).and_then(|(_, o)| o.clone())))
                .collect::<Vec<_>>();
            p.with_also_told(marks)
        };
        self.stats.checkpoints_acked.inc();
        self.confirm_when_durable(service, (no, marks));
    }

    /// Confirms the marks of checkpoint `no` of `service` once it is in the data directory
    /// (at once without one); until then they wait (see [`Replicas::undurable`]).
    fn confirm_when_durable(&self, service: ServiceId, (no, marks): Pending) {
        let written = self
            .store
            .as_ref()
            .is_none_or(|s| s.durable(service).is_some_and(|d| d >= no));
        if written {
            self.confirm(service, marks);
            return;
        }
        let mut waiting = lock(&self.replicas.undurable);
        let q = waiting.entry(service).or_default();
        if q.len() >= UNDURABLE_PER_SERVICE_MAX {
            q.pop_front();
        }
        q.push_back((no, marks));
    }

    /// Confirms the marks of the checkpoints written to the data directory since the last
    /// look.
    pub(crate) fn confirm_durable(&self) {
        let Some(store) = &self.store else {
            return;
        };
        let ready: Vec<(ServiceId, Pending)> = {
            let mut waiting = lock(&self.replicas.undurable);
            if waiting.is_empty() {
                return;
            }
            let mut ready = Vec::new();
            for (id, q) in waiting.iter_mut() {
                let d = store.durable(*id);
                while q.front().is_some_and(|(no, _)| d.is_some_and(|d| d >= *no)) {
                    if let Some(p) = q.pop_front() {
                        ready.push((*id, p));
                    }
                }
            }
            waiting.retain(|_, q| !q.is_empty());
            ready
        };
        for (id, (_, marks)) in ready {
            self.confirm(id, marks);
        }
    }
}

impl NodeShared {
    /// Standby `from` granted renewal `no` of this node's lease, in `term`.
    fn lease_granted(self: &std::sync::Arc<Self>, from: &NodeName, no: u64, term: u64) {
        let mut leases = lock(&self.replicas.leases);
        let Some(lease) = leases.get_mut(from) else {
            return;
        };
        match lease.granted(no, Grant { term }) {
            Ok(()) => {
                drop(leases);
                self.replicas.changed.notify_waiters();
            }
            Err(LeaseError::Unknown) => {}
            Err(LeaseError::Superseded { held, now }) => {
                // The standby's wait for this node ran out: the copies here that it held
                // checkpoints of must not serve under the old term. A new lease starts, and
                // each of them serves again only once the standby acknowledges a checkpoint in
                // the new term.
                *lease = Lease::new(&self.replicas.settings);
                drop(leases);
                self.logs.event(
                    "lease-superseded",
                    format!("{from}: term {held} is over, now {now}"),
                );
                for p in lock(&self.replicas.primaries).values_mut() {
                    if p.standby.as_ref() == Some(from) {
                        p.term = None;
                        drop(p.cadence.restart());
                        p.cadence.urgent();
                    }
                }
            }
        }
    }

    /// The replication clock, every [`REPLICA_TICK_MS`]: the leases this node holds are
    /// renewed, leases no service uses any more are let go, and the waits this node keeps as a
    /// standby are checked.
    pub(crate) fn replicas_tick(self: &std::sync::Arc<Self>) {
        let now = now_us();
        // The standby's side: a primary silent for a whole wait. With nothing of it held here,
        // its next renewal is granted in the same term; with checkpoints of its services, the
        // standby moves to a new term (no grant from now on lets that primary serve again) and
        // claims each of them at the next epoch.
        let mut claims = Vec::new();
        {
            let mut grantors = lock(&self.replicas.grantors);
            let mut table = lock(&self.replicas.standbys);
            for (primary, g) in grantors.iter_mut() {
                if !g.expired(now, &self.replicas.settings) {
                    continue;
                }
                let held = table.of_primary(primary);
                if held.is_empty() {
                    g.forget();
                    continue;
                }
                g.supersede();
                for service in held {
                    let Some(epoch) = table.get(service).map(|h| h.epoch + 1) else {
                        continue;
                    };
                    if let Some(h) = table.take_over(service, epoch) {
                        claims.push(h_claim(self.name(), service, epoch, h));
                    }
                }
            }
        }
        for (claim, h) in claims {
            self.logs.event(
                "takeover-claimed",
                format!(
                    "{} at epoch {}: {} went silent",
                    claim.service, claim.epoch, h.primary
                ),
            );
            let voters = h.voters.clone();
            self.start_ballot(claim, &voters, Some(h));
        }
        self.fences_fail(now, None);
        self.ballots_tick(now);
        self.resume_stored(now);
        self.confirm_durable();
        self.replica_parked_recheck(None);
        if self
            .replicas
            .running
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
            && lock(&self.replicas.leases).is_empty()
        {
            return;
        }
        let used: std::collections::BTreeSet<NodeName> = lock(&self.replicas.primaries)
            .values()
            .filter_map(|p| p.standby.clone())
            .collect();
        let mut renew = Vec::new();
        {
            let mut leases = lock(&self.replicas.leases);
            leases.retain(|standby, _| used.contains(standby));
            for (standby, lease) in leases.iter_mut() {
                if lease.renew_due(now) {
                    renew.push((standby.clone(), lease.renew(now)));
                }
            }
        }
        for (standby, no) in renew {
            if let Some(link) = self.links.get(&standby) {
                let _ = link.push_ctrl(&Frame::Replica(ReplicaMsg::Renew { no }));
            }
        }
    }

    /// Claims the services whose checkpoints came from the data directory, once their kind is
    /// registered here: each is resumed if this node wins the epoch after the stored one (see
    /// [`Stored::resume`]). Also reports the store's write errors.
    fn resume_stored(self: &std::sync::Arc<Self>, now: u64) {
        if let Some(store) = &self.store {
            for e in store.take_errors() {
                self.logs.event("store-error", e);
            }
        }
        let ready: Vec<(ServiceId, Stored)> = {
            let mut dormant = lock(&self.replicas.dormant);
            if dormant.is_empty() {
                return;
            }
            let ids: Vec<ServiceId> = dormant
                .iter()
                .filter(|(_, d)| now >= d.retry_at_us && self.has_kind(&d.record.kind))
                .map(|(id, _)| *id)
                .collect();
            ids.iter()
                .filter_map(|id| dormant.remove(id).map(|d| (*id, d.record)))
                .collect()
        };
        for (service, record) in ready {
            let (claim, voters) = record.resume(self.name(), service);
            self.logs.event(
                "resume-claimed",
                format!(
                    "{service} at epoch {} from the checkpoint {} of epoch {} in the data \
                     directory, voters {voters:?}",
                    claim.epoch, record.no, record.epoch
                ),
            );
            let bytes = record.body.len() as u64;
            let h = Held {
                primary: self.name().clone(),
                epoch: record.epoch,
                no: record.no,
                voters: record.voters,
                body: (record.kind, record.body),
                bytes,
            };
            self.start_ballot(claim, &voters, Some(h));
        }
    }

    /// A checkpoint from the data directory whose ballot was not decided waits to be claimed
    /// again.
    fn redormant(&self, service: ServiceId, h: Held<Body>) {
        let (kind, body) = h.body;
        lock(&self.replicas.dormant).insert(
            service,
            Dormant {
                record: Stored {
                    format: Stored::FORMAT,
                    kind,
                    epoch: h.epoch,
                    no: h.no,
                    voters: h.voters,
                    body,
                },
                retry_at_us: now_us() + RESUME_RETRY_MS * 1_000,
            },
        );
    }

    /// The link to `peer` is lost: the services whose standby it was choose another.
    pub(crate) fn replicas_link_lost(&self, peer: &NodeName) {
        if self
            .replicas
            .running
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
        {
            return;
        }
        self.fences_fail(0, Some(peer));
        let mut all = lock(&self.replicas.primaries);
        let mut dropped = 0;
        for (id, p) in all.iter_mut() {
            if p.standby.as_ref() == Some(peer) {
                self.replicas.drop_standby(p);
                let mut later = lock(&self.replicas.to_release);
                let q = later.entry(peer.clone()).or_default();
                if q.len() >= STANDBY_SERVICES_PER_PEER_MAX {
                    q.pop_front();
                }
                q.push_back((*id, p.epoch));
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.logs.event(
                "standby-lost",
                format!("{peer}: {dropped} replicated services choose another standby"),
            );
        }
    }
}

/// How long, past a standby's wait, a sender's node waits for a replicated service on a lost
/// node to be taken over before it declares the messages it kept lost.
pub(crate) const FAILOVER_SLACK_MS: u64 = 5_000;

/// How often the replication clock runs.
pub(crate) const REPLICA_TICK_MS: u64 = 50;

impl NodeShared {
    /// The link to `peer` is up: the checkpoints it was left holding while it was away are let
    /// go.
    pub(crate) fn replicas_link_up(&self, link: &crate::transport::PeerLink) {
        let peer = &link.name;
        let Some(q) = lock(&self.replicas.to_release).remove(peer) else {
            return;
        };
        for (service, epoch) in q {
            // Not if the service chose it again meanwhile.
            let current = lock(&self.replicas.primaries)
                .get(&service)
                .is_some_and(|p| p.standby.as_ref() == Some(peer));
            if !current {
                let _ = link.push_ctrl(&Frame::Replica(ReplicaMsg::Release { service, epoch }));
            }
        }
    }
}

/// The claim a standby makes to take `service` over at `epoch` from checkpoint `h`.
fn h_claim(me: &NodeName, service: ServiceId, epoch: u64, h: Held<Body>) -> (Claim, Held<Body>) {
    (
        Claim {
            service,
            epoch,
            holder: me.clone(),
        },
        h,
    )
}

impl NodeShared {
    /// Starts a ballot for `claim` among `voters`: this node's own vote first, then a `Claim`
    /// to each of the others. `from`: the checkpoint a standby would take over from.
    fn start_ballot(
        self: &std::sync::Arc<Self>,
        claim: Claim,
        voters: &[NodeName],
        from: Option<Held<Body>>,
    ) {
        let mut tally = Tally::new(claim.clone(), voters);
        let own = self.vote_on(&claim);
        let outcome = tally.answer(self.name(), own);
        for v in tally.unheard() {
            if let Some(link) = self.links.get(&v) {
                let _ = link.push_ctrl(&Frame::Replica(ReplicaMsg::Claim(claim.clone())));
            }
        }
        lock(&self.replicas.claiming).insert(
            claim.service,
            Claiming {
                tally,
                asked_us: now_us(),
                from,
            },
        );
        if outcome != Outcome::Open {
            self.decided(claim.service, outcome);
        }
    }

    /// The primary's side of the replication clock: a copy that a standby held checkpoints of,
    /// and that has no lease (its standby is gone, or cut off), asks the voters whether it may
    /// go on at the next epoch with another standby. Unheard voters are asked again every
    /// `renew_ms`.
    fn ballots_tick(self: &std::sync::Arc<Self>, now: u64) {
        let settings = &self.replicas.settings;
        let mut asks = Vec::new();
        if self
            .replicas
            .running
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
        {
            let claiming: Vec<ServiceId> = lock(&self.replicas.claiming).keys().copied().collect();
            let mut all = lock(&self.replicas.primaries);
            let leases = lock(&self.replicas.leases);
            for (id, p) in all.iter_mut() {
                if p.retired.is_some() || !p.sent || p.moving || claiming.contains(id) {
                    continue;
                }
                if now < p.ballot_at_us {
                    continue;
                }
                let leased = p
                    .standby
                    .as_ref()
                    .and_then(|s| leases.get(s))
                    .is_some_and(|l| l.valid(now) && p.term.is_some() && l.term() == p.term);
                // Granted once and lapsed, never granted in a whole lease since the standby
                // was chosen (its grants may be lost on the way), or no standby any more.
                let lapsed = p.standby.is_none()
                    || p.standby
                        .as_ref()
                        .and_then(|s| leases.get(s))
                        .is_some_and(|l| {
                            if l.term().is_some() {
                                !l.valid(now)
                            } else {
                                now.saturating_sub(p.standby_since_us) >= settings.lease_ms * 1_000
                            }
                        });
                if !leased && lapsed {
                    p.ballot_at_us = now + settings.renew_ms * 1_000;
                    p.ballot_open = true;
                    asks.push((
                        Claim {
                            service: *id,
                            epoch: p.epoch + 1,
                            holder: self.name().clone(),
                        },
                        p.voters.clone(),
                    ));
                }
            }
        }
        for (claim, voters) in asks {
            self.logs.event(
                "continue-claimed",
                format!("{} at epoch {}: no lease", claim.service, claim.epoch),
            );
            self.start_ballot(claim, &voters, None);
        }
        let mut again = Vec::new();
        for (_, c) in lock(&self.replicas.claiming).iter_mut() {
            if now.saturating_sub(c.asked_us) >= settings.renew_ms * 1_000 {
                c.asked_us = now;
                again.push((c.tally.claim().clone(), c.tally.unheard()));
            }
        }
        for (claim, unheard) in again {
            for v in unheard {
                if let Some(link) = self.links.get(&v) {
                    let _ = link.push_ctrl(&Frame::Replica(ReplicaMsg::Claim(claim.clone())));
                }
            }
        }
    }

    /// A voter's side: `from` claims `claim`. A node claims only for itself; an epoch this
    /// node already knows the service at (a move, say) is not granted again; otherwise each
    /// (service, epoch) is granted once (`Ballots`). A copy this node runs at an older epoch
    /// retires once another node is granted a newer one.
    fn on_claim(self: &std::sync::Arc<Self>, from: &NodeName, claim: Claim) {
        if claim.holder != *from {
            let refusal = tern_proto::claims::ClaimRefused {
                claim: "replica claim",
                detail: format!("{from} claims {} for {}", claim.service, claim.holder),
            };
            self.refuse_claim(from, &refusal);
            return;
        }
        // The node that runs the service grants its next epoch only to a standby that may hold
        // a checkpoint of it, and retires only for such a claim.
        let mut may_retire = true;
        if let Some((epoch, may_hold)) = self.replicas.running(claim.service) {
            match tern_proto::claims::replica_claim(
                epoch,
                &may_hold,
                from,
                claim.service,
                claim.epoch,
            ) {
                Ok(tern_proto::claims::ReplicaClaim::Next) => {}
                Ok(tern_proto::claims::ReplicaClaim::Beyond) => may_retire = false,
                Err(refusal) => {
                    self.refuse_claim(from, &refusal);
                    let vote = Vote::No {
                        epoch,
                        holder: self.name().clone(),
                    };
                    if let Some(link) = self.links.get(from) {
                        let _ = link.push_ctrl(&Frame::Replica(ReplicaMsg::Vote { claim, vote }));
                    }
                    return;
                }
            }
        }
        let vote = match self.driver.location(claim.service) {
            Some((at, e)) if e >= claim.epoch && at != *from => Vote::No {
                epoch: e,
                holder: at,
            },
            _ => self.vote_on(&claim),
        };
        if vote == Vote::Yes && may_retire {
            self.retire_older(claim.service, &claim.holder, claim.epoch);
        }
        if let Some(link) = self.links.get(from) {
            let _ = link.push_ctrl(&Frame::Replica(ReplicaMsg::Vote { claim, vote }));
        }
    }

    /// This node's ballot on `claim` (`Ballots`), a yes written to the data directory before it
    /// counts: one that cannot be written is taken back and counted as no room.
    fn vote_on(&self, claim: &Claim) -> Vote {
        let mut ballots = lock(&self.replicas.ballots);
        let before = ballots.granted(claim.service).cloned();
        let vote = ballots.vote(claim);
        let new_grant = vote == Vote::Yes
            && before.as_ref().map(|(e, h)| (*e, h)) != Some((claim.epoch, &claim.holder));
        if new_grant && !self.store_grant(claim) {
            match before {
                Some((e, h)) => {
                    ballots.forget(claim.service);
                    ballots.restore(claim.service, e, h);
                }
                None => ballots.forget(claim.service),
            }
            return Vote::Full;
        }
        vote
    }

    /// The claimer's side: voter `from` answered.
    fn on_vote(self: &std::sync::Arc<Self>, from: &NodeName, claim: Claim, vote: Vote) {
        let outcome = {
            let mut all = lock(&self.replicas.claiming);
            let Some(c) = all.get_mut(&claim.service) else {
                return;
            };
            if *c.tally.claim() != claim {
                return;
            }
            c.tally.answer(from, vote)
        };
        if outcome != Outcome::Open {
            self.decided(claim.service, outcome);
        }
    }

    /// A ballot this node ran for `service` is decided.
    fn decided(self: &std::sync::Arc<Self>, service: ServiceId, outcome: Outcome) {
        let Some(c) = lock(&self.replicas.claiming).remove(&service) else {
            return;
        };
        let claim = c.tally.claim().clone();
        if c.from.is_none() && outcome != Outcome::Open {
            // The copy here may move again.
            if let Some(p) = lock(&self.replicas.primaries).get_mut(&service) {
                p.ballot_open = false;
            }
        }
        match (outcome, c.from) {
            (Outcome::Open, from) => {
                // Not decided: put back.
                lock(&self.replicas.claiming).insert(
                    service,
                    Claiming {
                        tally: c.tally,
                        asked_us: c.asked_us,
                        from,
                    },
                );
            }
            (Outcome::Won, Some(h)) => self.take_over(claim, h),
            (Outcome::Won, None) => self.go_on(claim),
            (Outcome::Lost(winner), from) => {
                self.logs.event(
                    "ballot-lost",
                    format!("{service} at epoch {}: granted to {winner:?}", claim.epoch),
                );
                if let Some(h) = from.as_ref().filter(|h| h.primary == *self.name()) {
                    // A checkpoint from the data directory: a copy promoted elsewhere meanwhile
                    // holds the epoch, or a newer one; this one is never resumed. Undecided:
                    // claimed again later.
                    let superseded = winner.as_ref().is_some_and(|(e, _)| *e >= claim.epoch);
                    if superseded {
                        self.store_forget(service);
                        self.logs.event(
                            "stored-copy-superseded",
                            format!(
                                "{service}: the checkpoint of epoch {} is not resumed, \
                                 {winner:?} holds it",
                                h.epoch
                            ),
                        );
                    } else {
                        self.redormant(service, h.clone());
                    }
                } else if let Some(h) = from {
                    let mut table = lock(&self.replicas.standbys);
                    table.untake(service);
                    let superseded = winner.as_ref().is_some_and(|(e, _)| *e >= claim.epoch);
                    if !superseded {
                        // Undecided (voters unreachable): kept, and claimed again after
                        // another wait.
                        let primary = h.primary.clone();
                        let _ = table.offer(self.name(), service, h);
                        drop(table);
                        let mut g = lock(&self.replicas.grantors);
                        let g = g
                            .entry(primary)
                            .or_insert_with(|| self.replicas.new_grantor());
                        g.forget();
                        let _ = g.heard(now_us(), &self.replicas.settings);
                    }
                }
                if let Some((epoch, holder)) = winner {
                    if holder != *self.name() {
                        self.retire_older(service, &holder, epoch);
                    }
                }
            }
        }
    }

    /// A copy of `service` this node runs at an epoch older than `epoch` retires: `holder`
    /// continues it.
    pub(crate) fn retire_older(&self, service: ServiceId, holder: &NodeName, epoch: u64) {
        if holder == self.name() {
            return;
        }
        let mut all = lock(&self.replicas.primaries);
        if let Some(p) = all.get_mut(&service) {
            if p.epoch < epoch && p.retired.is_none() {
                p.retired = Some((holder.clone(), epoch));
                drop(all);
                self.logs.event(
                    "replica-retired",
                    format!("{service}: {holder} continues it at epoch {epoch}"),
                );
                self.replicas.changed.notify_waiters();
                // Senders here follow it, sending again what they kept.
                self.relocated(service, holder, epoch);
            }
        }
    }

    /// A retired copy ended: forgotten, with nothing confirmed and no standby released (the
    /// node that continues it confirms what it handles); a tombstone sends what still arrives
    /// to `to`, which runs it since `epoch`.
    pub(crate) fn replica_retired(&self, id: ServiceId, to: &NodeName, epoch: u64) {
        drop(self.replicas.stop(id));
        self.store_forget(id);
        self.driver.retired(id, to.clone(), epoch);
    }

    /// The primary won the next epoch: it goes on there with another standby (it serves
    /// at once: no standby holds a checkpoint of the new epoch, and the old one can no longer
    /// win it).
    fn go_on(self: &std::sync::Arc<Self>, claim: Claim) {
        let id = claim.service;
        let confirm;
        {
            let mut all = lock(&self.replicas.primaries);
            let Some(p) = all.get_mut(&id) else {
                return;
            };
            if p.retired.is_some() || p.epoch + 1 != claim.epoch {
                return;
            }
            p.epoch = claim.epoch;
            p.acked = 0;
            p.sent = false;
            p.first_to.clear();
            p.avoid = p.standby.clone();
            // The only copy now: what it handled is confirmed.
            confirm = p.with_also_told(
                p.taken
                    .iter()
                    .map(|(s, (n, o))| (*s, *n, o.clone()))
                    .collect(),
            );
            if let Some(old) = p.standby.clone() {
                let mut later = lock(&self.replicas.to_release);
                later
                    .entry(old)
                    .or_default()
                    .push_back((id, claim.epoch - 1));
            }
            self.replicas.drop_standby(p);
            p.retry_at_us = 0;
        }
        self.driver.host_at(id, claim.epoch);
        self.confirm(id, confirm);
        self.stats.replica_continued.inc();
        self.logs.event(
            "replica-continued",
            format!("{id} goes on here at epoch {}", claim.epoch),
        );
        self.announce_location(id, claim.epoch);
        self.replicas.changed.notify_waiters();
    }

    /// Tells every peer that `id` runs here since `epoch`.
    fn announce_location(&self, id: ServiceId, epoch: u64) {
        for link in self.links.all() {
            let _ = link.push_ctrl(&Frame::Mig(tern_proto::wire::MigMsg::Located {
                service: id,
                node: self.name().clone(),
                epoch,
            }));
        }
    }

    /// The standby won: the service runs here from its checkpoint, at the claimed epoch.
    fn take_over(self: &std::sync::Arc<Self>, claim: Claim, h: Held<Body>) {
        let id = claim.service;
        let (kind, bytes) = h.body;
        let body: CheckpointBody = match rmp_serde::from_slice(&bytes) {
            Ok(b) => b,
            Err(e) => {
                self.logs.event(
                    "takeover-failed",
                    format!("{id}: the checkpoint does not decode: {e}"),
                );
                return;
            }
        };
        let header = SnapHeader {
            mig: 0,
            id,
            kind: kind.clone(),
            epoch: claim.epoch,
            parent: None,
            state_bytes: body.state.len() as u64,
            carried: 0,
            timers: body.timers,
            send_seqs: body.send_seqs,
            windows: body
                .taken
                .iter()
                .map(|(from, last)| WindowWire {
                    from: *from,
                    next: last + 1,
                    early: Vec::new(),
                    skipped: Vec::new(),
                    taken: *last,
                })
                .collect(),
            tables: 0,
            book: body.book,
            custody: Vec::new(),
            held: false,
            forced: false,
            names: Vec::new(),
            replies: body.replies,
            outputs: body.outputs,
            precopied: false,
            trace: None,
        };
        self.driver.host_at(id, claim.epoch);
        lock(&self.replicas.taken_from).insert(id, h.primary.clone());
        let started = self.start_taken_over(&h.primary, header, body.state);
        match started {
            Ok(()) if h.primary == *self.name() => {
                self.stats.resumed_from_disk.inc();
                self.logs.event(
                    "resumed-from-disk",
                    format!(
                        "{id} runs here again at epoch {} from checkpoint {} (epoch {}) in the \
                         data directory",
                        claim.epoch, h.no, h.epoch
                    ),
                );
                tracing::info!(service = %id, epoch = claim.epoch, "resumed from the data directory");
                self.relocated(id, self.name(), claim.epoch);
                self.announce_location(id, claim.epoch);
            }
            Ok(()) => {
                self.stats.takeovers.inc();
                self.logs.event(
                    "took-over",
                    format!(
                        "{id} runs here at epoch {} from checkpoint {} of {}",
                        claim.epoch, h.no, h.primary
                    ),
                );
                tracing::info!(service = %id, epoch = claim.epoch, from = %h.primary,
                    "replica took over");
                self.relocated(id, self.name(), claim.epoch);
                self.announce_location(id, claim.epoch);
            }
            Err(e) => {
                self.driver.unhost(self, id);
                lock(&self.replicas.taken_from).remove(&id);
                self.logs.event("takeover-failed", format!("{id}: {e}"));
            }
        }
    }

    /// The replicated services this node runs whose current standby holds a checkpoint of
    /// their epoch: id, epoch, standby (for gossip).
    pub(crate) fn standbys_named(&self, max: usize) -> Vec<(ServiceId, u64, NodeName)> {
        if self
            .replicas
            .running
            .load(std::sync::atomic::Ordering::SeqCst)
            == 0
        {
            return Vec::new();
        }
        let mut out: Vec<(ServiceId, u64, NodeName)> = lock(&self.replicas.primaries)
            .iter()
            .filter(|(_, p)| p.retired.is_none() && p.term.is_some())
            .filter_map(|(id, p)| p.standby.clone().map(|s| (*id, p.epoch, s)))
            .collect();
        out.sort_by_key(|(id, _, _)| *id);
        out.truncate(max);
        out
    }
}

impl NodeShared {
    /// Restores a service taken over from a checkpoint and starts it at once (the node it
    /// came from, `primary`, had custody of it: messages it hands on are believed).
    fn start_taken_over(
        self: &std::sync::Arc<Self>,
        primary: &NodeName,
        header: SnapHeader,
        state: Vec<u8>,
    ) -> Result<(), crate::Error> {
        let id = header.id;
        let copy = self.restore_paused(primary, header, state, None)?;
        let install = lock(&copy.install).take();
        let Some(install) = install else {
            return Ok(());
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        install(rx)?;
        // Nothing is carried: the senders send again what the checkpoint does not cover.
        for r in copy.slot.carried_complete() {
            self.refuse_envelope(id, r);
        }
        let _ = tx.send(crate::migrate::Go::Start);
        self.service_arrived(id, true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that sent copies of messages the service took already (its sender was taken
    /// over there) is told too, once a confirmation covers them; the marks' own node is not
    /// kept twice, and at most `ALSO_TELL_MAX` such nodes are kept per service.
    #[test]
    fn a_node_that_sent_copies_again_is_told_once_a_confirmation_covers_them() {
        let r = Replicas::new(Settings::default());
        let id = ServiceId::from_parts(1, 1);
        let (s1, s2) = (ServiceId::from_parts(2, 1), ServiceId::from_parts(3, 1));
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        r.start(id, KindKey::new("k", 1), 1, vec![(s1, 5)]);
        r.handled(id, Some((s1, 6, Some(a.clone()))));
        r.also_tell(
            id,
            &[
                (s1, 6, Some(a.clone())),
                (s1, 4, Some(b.clone())),
                (s1, 5, Some(b.clone())),
                (s2, 3, None),
            ],
        );
        let mut all = lock(&r.primaries);
        let p = all.get_mut(&id).expect("started");
        assert_eq!(p.also_tell, vec![(s1, 5, b.clone())]);
        // A confirmation through 4 does not cover b's copies: b waits.
        let marks = p.with_also_told(vec![(s1, 4, Some(a.clone()))]);
        assert_eq!(marks, vec![(s1, 4, Some(a.clone()))]);
        assert_eq!(p.also_tell.len(), 1);
        let marks = p.with_also_told(vec![(s1, 6, Some(a.clone()))]);
        assert_eq!(marks, vec![(s1, 6, Some(a.clone())), (s1, 6, Some(b))]);
        assert!(p.also_tell.is_empty());
        drop(all);
        for i in 0..ALSO_TELL_MAX + 3 {
            r.also_tell(id, &[(s2, 1, Some(NodeName::new(&format!("n{i}"))))]);
        }
        let all = lock(&r.primaries);
        let p = all.get(&id).expect("started");
        assert_eq!(p.also_tell.len(), ALSO_TELL_MAX);
        assert_eq!(p.also_tell[0].2, NodeName::new("n3"));
    }
}
