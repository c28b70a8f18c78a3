//! The node's migration driver: it runs the protocol core ([`tern_proto::migration::Core`])
//! for this node and carries out its actions with the node's real parts: the service runner
//! (freeze, resume, retire), the snapshot stream over QUIC, the mailbox (windows, parked
//! arrivals, tombstone forwarding) and the channel rebuild (books and handles).
//!
//! The core decides; this module only moves bytes and services. Every migration gets a tracing
//! span with its id; its steps are logged with their durations.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::error::{DeliveryError, Error};
use crate::mailbox::{encode_envelope_with, lock, Envelope, Refusal, Slot};
use crate::node::NodeShared;
use crate::precopy::{PreIn, PreOut, PreStream, PreTx};
use tern_proto::claims::{self, Location};
use tern_proto::forward::{Hand, HandOn};
use tern_proto::ids::{KindKey, NodeName, ServiceId};
use tern_proto::migration::{
    AbortReason, Action, Config, Core, MigrationId, Outcome, Snapshot, Wire,
};
use tern_proto::wire::{self, CarriedMsg, Frame, MigMsg, SnapHeader};

/// How to migrate.
///
/// ```
/// // Carry the queue (the default), hold the service where it lands, and refuse a target
/// // that is draining or lacks a capability the kind requires.
/// let opts = tern::MigrateOptions::default();
/// assert!(opts.hold && !opts.force && !opts.drain);
/// // Move it even so, and let placement move it again later.
/// let opts = tern::MigrateOptions { force: true, hold: false, ..Default::default() };
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// Handle every queued message at the source before freezing, instead of carrying the
    /// queue to the target.
    pub drain: bool,
    /// Move even to a node that is draining or lacks a capability the kind requires (a node
    /// that has not registered the kind cannot run it: that is refused whatever this says).
    /// Without it such a move is refused before anything freezes
    /// ([`AbortReason::Unfit`](crate::AbortReason::Unfit)).
    pub force: bool,
    /// Hold the service where it lands (the default): automatic placement (capability
    /// changes, the rebalancer) leaves it alone until [`NodeHandle::release`](crate::NodeHandle::release),
    /// another explicit move, a drain, or its node losing a capability the kind requires.
    pub hold: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            drain: false,
            force: false,
            hold: true,
        }
    }
}

impl MigrateOptions {
    /// What automatic placement (drain, capability changes, the rebalancer) moves with: no
    /// hold, no force.
    pub(crate) fn automatic() -> Self {
        MigrateOptions {
            hold: false,
            ..MigrateOptions::default()
        }
    }
}

pub use crate::reports::MigrationReport;

/// Counters of this node's migrations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStats {
    /// Migrations asked of this node as a source.
    pub started: u64,
    /// Of those, committed.
    pub committed: u64,
    /// Of those, aborted, by reason (`AbortReason::label`).
    pub aborted: BTreeMap<String, u64>,
    /// Services that arrived here and started.
    pub arrived: u64,
    /// Snapshots this node refused as a target, by reason.
    pub refused_in: BTreeMap<String, u64>,
    /// Committed migrations by freeze time: `(upper bound in µs, count)`, where a bucket
    /// holds the freezes longer than the previous bound and at most its own; bounds are powers
    /// of two up to 2^30 µs, then `u64::MAX`; buckets with no freeze are left out.
    pub freeze_us_histogram: Vec<(u64, u64)>,
    /// The freeze times of the committed migrations, added up (µs).
    #[serde(default)]
    pub freeze_us_sum: u64,
    /// Messages forwarded by tombstones on this node.
    pub tombstone_forwards: u64,
    /// Address-book entries rewritten on this node by channel rebuilds.
    pub rebuilt: u64,
    /// Tombstones kept.
    pub tombstones: u64,
    /// Tombstones removed because every node that could send through them has fenced.
    pub tombstones_removed: u64,
    /// Fences received: a peer's word that it no longer sends through a tombstone here.
    pub fences_in: u64,
    /// Attempts from this node not yet ended: service, attempt number, target.
    pub in_flight: Vec<(ServiceId, u64, NodeName)>,
}

/// What follows the snapshot on its stream after commit.
pub(crate) struct Leftover {
    msgs: Vec<CarriedMsg>,
    skipped: Vec<(ServiceId, u64)>,
}

/// What the frozen runner is told.
pub(crate) enum Decision {
    Resume,
    Retire,
}

/// What a paused copy's runner is told.
pub(crate) enum Go {
    Start,
    Discard,
    /// The source never decided: drop the copy and refuse what it holds.
    Orphan,
}

/// A queue carried in a snapshot, encoded lazily while it streams (so the freeze does not
/// grow with it).
pub(crate) trait CarriedSource: Send + Sync {
    fn len(&self) -> usize;
    /// Encodes messages from `start` until about `bytes_max` bytes; returns the next index.
    /// A message that cannot be encoded goes to `failed`, for its sender to be told.
    fn encode(
        &self,
        start: usize,
        bytes_max: usize,
        out: &mut Vec<CarriedMsg>,
        failed: &mut Vec<Refusal>,
    ) -> usize;
}

/// The typed queue a frozen runner hands over; it takes it back on abort. Its messages are
/// written by the second field: as they are, or as an older version's (a downgrade).
pub(crate) struct CarriedQueue<M>(pub Mutex<VecDeque<Envelope<M>>>, pub MsgWriter<M>);

/// Writes a message as the bytes a snapshot carries (`crate::service::write_plain`, or a
/// kind's downgrade).
pub(crate) type MsgWriter<M> = fn(&M) -> Result<Vec<u8>, String>;

impl<M: Serialize + Send> CarriedSource for CarriedQueue<M> {
    fn len(&self) -> usize {
        lock(&self.0).len()
    }

    fn encode(
        &self,
        start: usize,
        bytes_max: usize,
        out: &mut Vec<CarriedMsg>,
        failed: &mut Vec<Refusal>,
    ) -> usize {
        let q = lock(&self.0);
        let mut i = start;
        let mut bytes = 0;
        while i < q.len() && bytes < bytes_max {
            let env = &q[i];
            match encode_envelope_with(env, self.1) {
                Ok(m) => {
                    bytes += m.msg.len() + 32;
                    out.push(m);
                }
                Err(reason) => failed.push(Refusal {
                    from: env.from,
                    seq: env.seq,
                    ask: env.ask.clone(),
                    origin: env.origin.clone(),
                    reason,
                }),
            }
            i += 1;
        }
        i
    }
}

/// The source's side of a snapshot.
pub(crate) struct OutSnap {
    pub header: SnapHeader,
    pub state: Vec<u8>,
    pub carried: Arc<dyn CarriedSource>,
}

/// Registers a paused copy and spawns its runner, which waits for [`Go`].
pub(crate) type Installer = Box<dyn FnOnce(oneshot::Receiver<Go>) -> Result<(), Error> + Send>;

/// The target's restored, paused copy.
pub(crate) struct InCopy {
    pub header: SnapHeader,
    pub slot: Arc<dyn Slot>,
    /// Registers and spawns the paused runner; it waits for [`Go`].
    pub install: Mutex<Option<Installer>>,
}

pub(crate) enum Payload {
    Out(OutSnap),
    In(InCopy),
}

type Snap = Arc<Payload>;

struct Outgoing {
    mig: MigrationId,
    to: NodeName,
    called: Instant,
    freeze_at: Option<Instant>,
    /// Set on abort: from the freeze to the resumption at the source.
    freeze_us: Option<u64>,
    /// From the freeze until the target's acknowledgement of the commit arrived.
    acked_us: Option<u64>,
    /// From the target's start until its copy served (its `Serving` message).
    served_us: Option<u64>,
    snapshot_bytes: u64,
    /// Bytes copied ahead before the freeze.
    precopied_bytes: u64,
    carried: u64,
    forwarded: u64,
    rebuilt: u64,
    epoch: u64,
    committed: bool,
    written: bool,
    aborted: Option<AbortReason>,
    waiters: Vec<oneshot::Sender<MigrationReport>>,
    decide: Option<oneshot::Sender<Decision>>,
    /// Hands the commit's leftovers to the snapshot stream's writer.
    leftovers: Option<oneshot::Sender<Leftover>>,
    /// Tells the snapshot stream's writer that the target runs (its `CommitAck` came), so the
    /// rest of the carried queue may follow.
    target_runs: Option<oneshot::Sender<()>>,
    drain: bool,
    /// The target holds the service (an explicit move).
    hold: bool,
    /// The target takes it even while draining or lacking a required capability.
    force: bool,
    /// The older version the snapshot was written as (a downgrade), which the leftovers are
    /// written as too.
    written_as: Option<u32>,
    span: tracing::Span,
}

/// The histogram bucket of a freeze of `freeze_us`: bucket `i` holds the freezes in
/// `(2^(i-1), 2^i]` µs (bucket 0 those of at most 1 µs), the last one everything longer.
fn freeze_bucket(freeze_us: u64) -> usize {
    let above = freeze_us.saturating_sub(1);
    ((64 - above.leading_zeros()) as usize).min(FREEZE_BUCKETS - 1)
}

/// Buckets of the freeze histogram: the last holds freezes over 2^30 µs (about 18 minutes).
const FREEZE_BUCKETS: usize = 32;

#[derive(Default)]
struct Counters {
    stats: MigrationStats,
    freeze_hist: [u64; FREEZE_BUCKETS],
}

/// One node's migration driver.
pub(crate) struct Driver {
    core: Mutex<Core<Snap, ()>>,
    clock: Instant,
    outgoing: Mutex<HashMap<ServiceId, Outgoing>>,
    incoming: Mutex<HashMap<ServiceId, oneshot::Sender<Go>>>,
    counters: Mutex<Counters>,
    /// Services copying their state ahead (`precopy.rs`), one attempt each.
    precopies: Mutex<HashMap<ServiceId, PreOut>>,
    /// Services of kinds that write older versions that left this node: their tombstones
    /// write what they forward for the version run where they went (`rewrite_forwarded`).
    rewrites: Mutex<HashMap<ServiceId, KindKey>>,
}

/// Bytes of state per `SnapState` frame.
const SNAP_STATE_CHUNK_BYTES: usize = 1 << 20;
/// About this many message bytes per `SnapCarried` frame (small, so the node's thread turns to
/// other work, such as the target's answer, between two).
const SNAP_CARRIED_CHUNK_BYTES: usize = 8 << 10;
/// At most this many bytes of skipped numbers per `SnapLeftovers` frame (about 32 each).
const SKIPS_PER_FRAME_BYTES: usize = 64 << 10;
/// About this many message bytes of the queue's head go before the commit: enough for the
/// target to start on, few enough not to delay its `Prepared` (4 KiB measured slower).
const SNAP_CARRIED_HEAD_BYTES: usize = 1 << 10;
/// How long a committed migration's report waits for the target's acknowledgement and the
/// end of its snapshot stream before it is given as it stands.
const REPORT_WAIT: Duration = Duration::from_secs(30);

impl Driver {
    /// The driver of node `me`; the core's clock ticks in milliseconds.
    pub fn new(me: NodeName, limits: &crate::Limits) -> Self {
        let cfg = Config {
            orphan_ticks: limits.prepared_orphan_ms,
            // QUIC delivers what a live connection accepted; a lost connection aborts at once
            // (`link_lost`), so the core never needs to send a snapshot twice.
            retry_ticks: u64::MAX / 4,
            deadline_ticks: limits.migration_deadline_ms,
            freeze_ticks: limits.freeze_deadline_ms,
            // A restarted node must not number its attempts as its former life did: microseconds
            // since the epoch grow faster than any node starts attempts.
            first_attempt: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_micros() as u64),
            query_ticks: 500,
            tombstones_max: limits.tombstones_max,
            ahead_ticks: limits.location_hold_ms,
            precopy_ticks: limits.precopy_deadline_ms,
            ..Config::default()
        };
        Driver {
            core: Mutex::new(Core::new(me, cfg)),
            clock: Instant::now(),
            outgoing: Mutex::new(HashMap::new()),
            incoming: Mutex::new(HashMap::new()),
            counters: Mutex::new(Counters::default()),
            precopies: Mutex::new(HashMap::new()),
            rewrites: Mutex::new(HashMap::new()),
        }
    }

    /// Node `from` fenced `service` at `epoch` (see `Frame::Fence`). The last awaited fence
    /// removes the tombstone (`tern_proto::forward::Tombstones::fenced`).
    pub fn on_fence(&self, node: &NodeShared, from: &NodeName, service: ServiceId, epoch: u64) {
        lock(&self.counters).stats.fences_in += 1;
        if lock(&self.core)
            .tombstones_mut()
            .fenced(from, service, epoch)
        {
            lock(&self.counters).stats.tombstones_removed += 1;
            node.logs.event(
                "tombstone-removed",
                format!("service {service} (epoch {epoch}): every peer has fenced it"),
            );
        }
    }

    fn now_ticks(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// The epoch of `service` if it is hosted here.
    pub fn epoch(&self, service: ServiceId) -> Option<u64> {
        lock(&self.core).epoch(service)
    }

    /// Where `service` is and since which epoch, as far as this node knows.
    pub fn location(&self, service: ServiceId) -> Option<(NodeName, u64)> {
        lock(&self.core).location(service)
    }

    /// Where a tombstone on this node forwards `service`.
    pub fn tombstone(&self, service: ServiceId) -> Option<(NodeName, u64)> {
        lock(&self.core).tombstone(service)
    }

    /// Pins or unpins `service`: the core refuses every migration of a pinned one.
    pub fn pin(&self, service: ServiceId, pinned: bool) {
        lock(&self.core).pin(service, pinned);
    }

    pub fn add_peer(&self, peer: NodeName) {
        lock(&self.core).add_peer(peer);
    }

    /// A replicated service runs here from now on at `epoch` (taken over, or going on after a
    /// ballot).
    pub fn host_at(&self, service: ServiceId, epoch: u64) {
        lock(&self.core).host_at(service, epoch);
    }

    /// A replicated copy here retired: `node` continues the service at `epoch` (a tombstone
    /// stays).
    pub fn retired(&self, service: ServiceId, node: NodeName, epoch: u64) {
        lock(&self.core).retired(service, node, epoch);
    }

    /// A service hosted here stopped for good (a pre-copy of it ends there).
    pub fn unhost(&self, node: &Arc<NodeShared>, service: ServiceId) {
        let actions = lock(&self.core).unhost(service);
        self.run(node, actions);
    }

    /// Target `from` applied `bytes` of attempt `n`'s pre-copy of `id`. From anyone but
    /// that attempt's target it is not believed (it would only change when the freeze comes).
    pub fn pre_applied(&self, from: &NodeName, n: u64, id: ServiceId, bytes: u64) {
        if let Some(p) = lock(&self.precopies).get(&id) {
            if p.mig.n == n && p.to == *from {
                p.acked.set(bytes);
            }
        }
    }

    /// Whether attempt `mig` is `id`'s pre-copy now.
    pub fn precopying(&self, id: ServiceId, mig: &MigrationId) -> bool {
        lock(&self.precopies)
            .get(&id)
            .is_some_and(|p| p.mig == *mig)
    }

    /// The runner's end of `id`'s pre-copy, once.
    pub fn take_precopy(&self, id: ServiceId) -> Option<PreTx> {
        lock(&self.precopies).get_mut(&id).and_then(|p| p.tx.take())
    }

    /// `id`'s runner has copied its state ahead (`sent`), or found it too small to (then the
    /// writer is called off and the snapshot goes on a stream of its own): freeze it.
    pub fn precopied(&self, node: &Arc<NodeShared>, id: ServiceId, mig: &MigrationId, sent: bool) {
        if !sent {
            let mut pre = lock(&self.precopies);
            if pre.get(&id).is_some_and(|p| p.mig == *mig) {
                pre.remove(&id);
            }
        }
        let actions = lock(&self.core).precopied(id, mig);
        self.run(node, actions);
    }

    /// `id`'s pre-copy for attempt `mig` failed: the attempt aborts, the service runs on.
    pub fn precopy_failed(
        &self,
        node: &Arc<NodeShared>,
        id: ServiceId,
        mig: &MigrationId,
        why: String,
    ) {
        let actions = lock(&self.core).precopy_failed(id, mig, why);
        self.run(node, actions);
    }

    /// The stream `id`'s pre-copy for attempt `mig` went on, for its snapshot to follow.
    async fn pre_stream(&self, id: ServiceId, mig: &MigrationId) -> PreStream {
        let out = {
            let mut pre = lock(&self.precopies);
            match pre.get(&id) {
                Some(p) if p.mig == *mig => pre.remove(&id),
                _ => None,
            }
        };
        // Kept until the writer is done: dropping it would call the writer off.
        let Some(mut out) = out else {
            return Err("no pre-copy of this attempt".to_string());
        };
        match out.stream.take() {
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err("the pre-copy writer is gone".to_string())),
            None => Err("no pre-copy stream".to_string()),
        }
    }

    /// Starts copying `service`'s state ahead to `to`: the writer waits for the runner's
    /// chunks; the runner is told to start.
    fn start_precopy(
        &self,
        node: &Arc<NodeShared>,
        service: ServiceId,
        mig: MigrationId,
        to: NodeName,
    ) {
        let Some(slot) = node.slot(service) else {
            let actions =
                lock(&self.core).precopy_failed(service, &mig, "the service is gone".into());
            return self.run(node, actions);
        };
        let (out, writer) = PreOut::new(mig.clone(), to.clone());
        lock(&self.precopies).insert(service, out);
        let kind = slot.kind().clone();
        let node2 = node.clone();
        actix_rt::spawn(async move {
            crate::precopy::write_precopy(node2, to, (mig, service, kind), writer).await;
        });
        slot.request_precopy();
    }

    pub fn stats(&self) -> MigrationStats {
        let c = lock(&self.counters);
        let mut s = c.stats.clone();
        s.freeze_us_histogram = c
            .freeze_hist
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| match i {
                i if i + 1 == FREEZE_BUCKETS => (u64::MAX, *n),
                i => (1u64 << i, *n),
            })
            .collect();
        drop(c);
        s.tombstones = lock(&self.core).tombstones() as u64;
        s.in_flight = lock(&self.outgoing)
            .iter()
            .map(|(id, o)| (*id, o.mig.n, o.to.clone()))
            .collect();
        s.in_flight.sort();
        s
    }

    pub fn count_rebuilt(&self, n: usize) {
        lock(&self.counters).stats.rebuilt += n as u64;
    }

    /// See `tern_proto::migration::Core::notice_unsent`.
    pub fn notice_unsent(&self, service: ServiceId, origin: &NodeName, epoch: u64) {
        lock(&self.core).notice_unsent(service, origin, epoch);
    }

    /// Where a tombstone here hands on a message for `service` from a sender on `origin`,
    /// and whom to tell (`tern_proto::forward::Tombstones::hand_on`); counted.
    pub fn hand_on(&self, service: ServiceId, origin: &NodeName) -> Option<HandOn> {
        let h = lock(&self.core).hand_on(service, origin);
        if h.is_some() {
            lock(&self.counters).stats.tombstone_forwards += 1;
        }
        h
    }

    fn count_refused_in(&self, reason: &str) {
        let label = reason.split(':').next().unwrap_or(reason).to_owned();
        *lock(&self.counters)
            .stats
            .refused_in
            .entry(label)
            .or_default() += 1;
    }

    /// Starts moving local service `id` to `to`; the report comes on the returned receiver.
    pub fn migrate(
        &self,
        node: &Arc<NodeShared>,
        id: ServiceId,
        to: NodeName,
        opts: MigrateOptions,
        refuse: Option<AbortReason>,
    ) -> oneshot::Receiver<MigrationReport> {
        let (tx, rx) = oneshot::channel();
        // Read before the core is locked (the member table is another subsystem).
        let ahead = node.copies_ahead(id, &to);
        let actions = {
            let mut core = lock(&self.core);
            if core.epoch(id).is_none() && node.slot(id).is_some() {
                core.host(id);
            }
            let (mig, actions) = match &refuse {
                // Refused before anything freezes: the core is not asked.
                Some(_) => (
                    MigrationId {
                        source: node.name().clone(),
                        n: 0,
                    },
                    Vec::new(),
                ),
                None => core.migrate_with(id, to.clone(), ahead),
            };
            let entry = self.outgoing_entry(node, &core, id, mig, to, opts, tx, None);
            if let Some(why) = refuse {
                drop(core);
                self.refuse_busy(node, id, entry, why);
                return rx;
            }
            let mut out = lock(&self.outgoing);
            // A second request while one runs is answered by the core (`Busy`) through the
            // report of this new attempt; keep the running entry.
            if let Some(running) = out.get(&id) {
                if running.mig != entry.mig && running.aborted.is_none() && !running.committed {
                    drop(out);
                    self.refuse_busy(node, id, entry, AbortReason::Busy);
                    return rx;
                }
            }
            out.insert(id, entry);
            actions
        };
        self.run(node, actions);
        rx
    }

    /// Starts moving local services as one group (see [`Core::migrate_group_with`]): each
    /// member to its own target, all or none; members whose kind copies its state ahead do so
    /// while the group runs, and all freeze together. One report per member, in the order
    /// given.
    pub fn migrate_group(
        &self,
        node: &Arc<NodeShared>,
        members: &[(ServiceId, NodeName)],
        opts: MigrateOptions,
        refuse: Option<(ServiceId, AbortReason)>,
    ) -> Vec<oneshot::Receiver<MigrationReport>> {
        let mut rxs = Vec::with_capacity(members.len());
        let mut txs = Vec::with_capacity(members.len());
        for _ in members {
            let (tx, rx) = oneshot::channel();
            txs.push(tx);
            rxs.push(rx);
        }
        let ahead: Vec<bool> = members
            .iter()
            .map(|(id, to)| node.copies_ahead(*id, to))
            .collect();
        let actions = {
            let mut core = lock(&self.core);
            for (id, _) in members {
                if core.epoch(*id).is_none() && node.slot(*id).is_some() {
                    core.host(*id);
                }
            }
            let busy = {
                let out = lock(&self.outgoing);
                members
                    .iter()
                    .find(|(id, _)| {
                        out.get(id)
                            .is_some_and(|o| o.aborted.is_none() && !o.committed)
                    })
                    .map(|(id, _)| (*id, AbortReason::Busy))
            };
            // A member whose target cannot take it refuses the group before anything
            // freezes, as a busy one does.
            let busy = busy.or(refuse);
            let (migs, actions) = match busy {
                // A member whose earlier attempt has not ended: its entry must stay, so the
                // group is refused here, before the core freezes anything.
                Some(_) => (Vec::new(), Vec::new()),
                // Members whose kind copies its state ahead do so first; all freeze together.
                None => {
                    let members: Vec<(ServiceId, NodeName, bool)> = members
                        .iter()
                        .zip(&ahead)
                        .map(|((id, to), ahead)| (*id, to.clone(), *ahead))
                        .collect();
                    core.migrate_group_with(&members)
                }
            };
            let group = format!("{} services", members.len());
            for (i, ((id, to), tx)) in members.iter().zip(txs).enumerate() {
                let mig = migs.get(i).cloned().unwrap_or(MigrationId {
                    source: node.name().clone(),
                    n: 0,
                });
                let entry =
                    self.outgoing_entry(node, &core, *id, mig, to.clone(), opts, tx, Some(&group));
                match &busy {
                    Some((b, why)) => {
                        let reason = if b == id {
                            why.clone()
                        } else {
                            AbortReason::Group(format!("{b}: {why}"))
                        };
                        self.refuse_busy(node, *id, entry, reason);
                    }
                    None => {
                        lock(&self.outgoing).insert(*id, entry);
                    }
                }
            }
            actions
        };
        self.run(node, actions);
        rxs
    }

    #[allow(clippy::too_many_arguments)]
    fn outgoing_entry(
        &self,
        node: &Arc<NodeShared>,
        core: &Core<Snap, ()>,
        id: ServiceId,
        mig: MigrationId,
        to: NodeName,
        opts: MigrateOptions,
        tx: oneshot::Sender<MigrationReport>,
        group: Option<&str>,
    ) -> Outgoing {
        // Made in the node's subscriber, whichever thread asks (a child of the asker's span
        // when that is the same subscriber's).
        let span = crate::trace::within(node.dispatch.as_ref(), || {
            let span = tracing::info_span!(
                "migration",
                node = %node.name(),
                id = %format!("{}#{}", mig.source, mig.n),
                service = %id,
                to = %to,
                group = group.unwrap_or("")
            );
            tracing::info!(parent: &span, drain = opts.drain, "migration asked");
            span
        });
        lock(&self.counters).stats.started += 1;
        Outgoing {
            mig,
            to,
            called: Instant::now(),
            freeze_at: None,
            freeze_us: None,
            acked_us: None,
            served_us: None,
            snapshot_bytes: 0,
            precopied_bytes: 0,
            carried: 0,
            forwarded: 0,
            rebuilt: 0,
            epoch: core.epoch(id).unwrap_or(0),
            committed: false,
            written: false,
            aborted: None,
            waiters: vec![tx],
            decide: None,
            leftovers: None,
            target_runs: None,
            written_as: None,
            drain: opts.drain,
            hold: opts.hold,
            force: opts.force,
            span,
        }
    }

    /// The trace context of the attempt moving `id` (its span's), for the target's span to
    /// join: None without the `otel` feature or an OpenTelemetry layer.
    pub fn trace_of(&self, id: ServiceId) -> Option<tern_proto::wire::TraceContext> {
        if !crate::trace::CARRIES {
            return None;
        }
        let span = lock(&self.outgoing).get(&id).map(|o| o.span.clone())?;
        crate::trace::context_of(&span)
    }

    /// Answers an attempt refused because its service is already moving.
    fn refuse_busy(
        &self,
        node: &Arc<NodeShared>,
        id: ServiceId,
        entry: Outgoing,
        why: AbortReason,
    ) {
        let mut busy = entry;
        *lock(&self.counters)
            .stats
            .aborted
            .entry(why.label().into())
            .or_default() += 1;
        busy.aborted = Some(why);
        let report = report_of(node.name(), id, &busy);
        for w in busy.waiters {
            let _ = w.send(report.clone());
        }
    }

    /// The node the running migration of `id` moves it to.
    pub fn target_of(&self, id: ServiceId) -> Option<NodeName> {
        lock(&self.outgoing).get(&id).map(|o| o.to.clone())
    }

    /// Service `id`, of a kind run here that writes older versions, left this node: its
    /// tombstone writes what it forwards for the version run where it goes. Entries whose
    /// tombstone is gone are dropped (the table holds one per tombstone at most).
    fn note_rewrites(&self, id: ServiceId, kind: KindKey) {
        let mut table = lock(&self.rewrites);
        {
            let core = lock(&self.core);
            table.retain(|s, _| core.tombstone(*s).is_some());
        }
        table.insert(id, kind);
    }

    /// The kind (as run here) of a service whose tombstone writes what it forwards.
    fn rewritten_kind(&self, id: ServiceId) -> Option<KindKey> {
        let table = lock(&self.rewrites);
        if table.is_empty() {
            return None;
        }
        table.get(&id).cloned()
    }

    /// Whether the running migration of `id` holds it at its target, and forces it there.
    pub fn hold_and_force(&self, id: ServiceId) -> (bool, bool) {
        lock(&self.outgoing)
            .get(&id)
            .map_or((false, false), |o| (o.hold, o.force))
    }

    /// True when the runner should handle its queue before freezing.
    pub fn drains(&self, id: ServiceId) -> bool {
        lock(&self.outgoing).get(&id).is_some_and(|o| o.drain)
    }

    /// The frozen runner hands over its snapshot; `since` is when it stopped serving (the
    /// freeze is timed from there) and `decide` tells it the outcome.
    pub fn frozen(
        &self,
        node: &Arc<NodeShared>,
        id: ServiceId,
        since: Instant,
        snap: Result<OutSnap, String>,
        decide: oneshot::Sender<Decision>,
    ) {
        {
            let mut out = lock(&self.outgoing);
            if let Some(o) = out.get_mut(&id) {
                o.freeze_at = Some(since);
                o.decide = Some(decide);
                if let Ok(s) = &snap {
                    o.carried = s.carried.len() as u64;
                    o.written_as = node
                        .slot(id)
                        .filter(|slot| slot.kind().version != s.header.kind.version)
                        .map(|_| s.header.kind.version);
                }
                tracing::info!(
                    parent: &o.span,
                    carried = o.carried,
                    wait_us = o.called.elapsed().as_micros() as u64,
                    snapshot_us = since.elapsed().as_micros() as u64,
                    "frozen"
                );
            } else {
                let _ = decide.send(Decision::Resume);
                return;
            }
        }
        let actions = {
            let mut core = lock(&self.core);
            match snap {
                Ok(s) => core.frozen(id, Arc::new(Payload::Out(s)), Vec::new()),
                Err(why) => core.freeze_failed(id, why),
            }
        };
        self.run(node, actions);
    }

    /// Advances the core's clock: deadlines and queries; reports that waited too long.
    pub fn tick(&self, node: &Arc<NodeShared>) {
        let now = self.now_ticks();
        let actions = lock(&self.core).tick(now);
        self.run(node, actions);
        // Locations learned from gossip may settle claims held back.
        self.judge_held(node);
        let stale: Vec<ServiceId> = lock(&self.outgoing)
            .iter()
            .filter(|(_, o)| o.committed && o.called.elapsed() > REPORT_WAIT)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            node.logs.event(
                "migration-report-late",
                format!("service {id}: no acknowledgement or stream end; reported as it stands"),
            );
            self.finish(node, id, true);
        }
    }

    /// The connection to `peer` went down.
    pub fn link_lost(&self, node: &Arc<NodeShared>, peer: &NodeName) {
        let actions = lock(&self.core).link_lost(peer);
        self.run(node, actions);
    }

    /// A protocol message from `from`.
    pub fn on_msg(&self, node: &Arc<NodeShared>, from: &NodeName, msg: MigMsg) {
        let wire = match msg {
            MigMsg::Prepared { source, n } => Wire::Prepared {
                mig: MigrationId { source, n },
            },
            MigMsg::Refused { source, n, reason } => Wire::Refused {
                mig: MigrationId { source, n },
                reason,
            },
            MigMsg::Commit { source, n } => Wire::Commit {
                mig: MigrationId { source, n },
            },
            MigMsg::CommitAck { source, n } => {
                let mig = MigrationId { source, n };
                self.acked(node, from, &mig);
                Wire::CommitAck { mig }
            }
            MigMsg::Abort { source, n } => Wire::Abort {
                mig: MigrationId { source, n },
            },
            MigMsg::Query { source, n } => Wire::Query {
                mig: MigrationId { source, n },
            },
            MigMsg::Located {
                service,
                node: at,
                epoch,
            }
            | MigMsg::Moved {
                service,
                node: at,
                epoch,
            } => {
                self.on_location(node, from, service, &at, epoch);
                self.judge_held(node);
                return;
            }
            MigMsg::Serving {
                source,
                n,
                after_start_us,
            } => {
                if source == *node.name() {
                    self.served(node, from, &MigrationId { source, n }, after_start_us);
                }
                return;
            }
            MigMsg::Request { .. }
            | MigMsg::GroupRequest { .. }
            | MigMsg::TreeRequest { .. }
            | MigMsg::CanTake { .. } => return,
        };
        let actions = lock(&self.core).receive(from.clone(), wire);
        self.run(node, actions);
    }

    /// `from`'s word that `service` runs on `at` since `epoch` (`Located` or `Moved`), judged
    /// by the core ([`claims::location`]) against its directory
    /// and this node's channel and books, which may know the service when the directory does
    /// not.
    fn on_location(
        &self,
        node: &Arc<NodeShared>,
        from: &NodeName,
        service: ServiceId,
        at: &NodeName,
        epoch: u64,
    ) {
        let besides = node.location_besides_directory(service);
        let also = besides.as_ref().map(|(n, e)| (n, *e));
        let here = node.slot(service).is_some();
        // The host as the core will judge it: the newer of the directory's word and the
        // channel's.
        let dir = self.location(service);
        let host = claims::newer(dir.as_ref().map(|(n, e)| (n, *e)), also).map(|(n, _)| n);
        let standby = host.and_then(|h| node.standby_named(service, h));
        let standby = standby.as_ref().map(|(n, e)| (n, *e));
        let verdict = lock(&self.core).located(from, service, (at, epoch), also, here, standby);
        match verdict {
            Ok(Location::Take) => {
                // A copy here that was taken over retires.
                node.retire_older(service, at, epoch);
                learned(node, from, service, at, epoch);
                // What it sends from there is believed (a taken-over service's former node
                // is gone and answers nothing about it).
                node.sender_runs_at(service, at);
                // A checkpoint the new host sent ahead of this word can be held now.
                node.replica_parked_recheck(Some(service));
            }
            // Nothing to learn, yet this node no longer sends through `from`'s tombstone for
            // that epoch (it runs the service, or knows a newer place).
            Ok(Location::Ignore) => node.send_fence(from, service, epoch),
            // Past what this node knows, from a node that may have hosted the service since:
            // judged again when this node learns more (`judge_held`), refused if it does not.
            Ok(Location::Ahead) => node.logs.event(
                "claim-held",
                format!(
                    "{from} says service {service} runs on {at} since epoch {epoch}: \
                     held back until this node hears of a host in between"
                ),
            ),
            Err(refusal) => node.refuse_claim(from, &refusal),
        }
    }

    /// Judges again the location claims held back about services this node learned more of.
    fn judge_held(&self, node: &Arc<NodeShared>) {
        loop {
            let due = lock(&self.core).held_due();
            if due.is_empty() {
                return;
            }
            for c in due {
                self.on_location(node, &c.from, c.service, &c.at, c.epoch);
            }
        }
    }

    /// A whole snapshot arrived from `from` (state complete; the carried queue may follow).
    /// Returns the slot carried messages go to when the core installs it.
    pub fn on_snapshot(
        &self,
        node: &Arc<NodeShared>,
        from: &NodeName,
        copy: InCopy,
    ) -> Option<Arc<dyn Slot>> {
        let mig = MigrationId {
            source: from.clone(),
            n: copy.header.mig,
        };
        let id = copy.header.id;
        let epoch = copy.header.epoch;
        let slot = copy.slot.clone();
        let snap = Snapshot {
            service: id,
            epoch,
            state: Arc::new(Payload::In(copy)),
            queue: Vec::new(),
            watermarks: Vec::new(),
            early: Vec::new(),
            skipped: Vec::new(),
            send_seqs: Vec::new(),
        };
        let actions = lock(&self.core).receive(from.clone(), Wire::Snapshot { mig, snap });
        self.run(node, actions);
        // Installed, and set up (a copy waiting for its start).
        lock(&self.incoming).contains_key(&id).then_some(slot)
    }

    /// Refuses a snapshot before its state is read.
    pub fn refuse_snapshot(&self, node: &Arc<NodeShared>, from: &NodeName, n: u64, reason: String) {
        self.count_refused_in(&reason);
        node.logs
            .event("migration-refused", format!("from {from}: {reason}"));
        send_mig(
            node,
            from,
            MigMsg::Refused {
                source: from.clone(),
                n,
                reason,
            },
        );
    }

    fn note_precopied(&self, id: ServiceId, mig: &MigrationId, bytes: u64) {
        if let Some(o) = lock(&self.outgoing).get_mut(&id).filter(|o| o.mig == *mig) {
            o.precopied_bytes = bytes;
            tracing::info!(parent: &o.span, bytes, "copied ahead");
        }
    }

    fn note_written(&self, node: &Arc<NodeShared>, id: ServiceId, mig: &MigrationId, bytes: u64) {
        let done = {
            let mut out = lock(&self.outgoing);
            match out.get_mut(&id) {
                Some(o) if o.mig == *mig => {
                    o.snapshot_bytes = bytes;
                    o.written = true;
                    tracing::info!(
                        parent: &o.span,
                        bytes,
                        after_call_us = o.called.elapsed().as_micros() as u64,
                        "snapshot stream written"
                    );
                    o.complete()
                }
                _ => false,
            }
        };
        if done {
            self.finish(node, id, false);
        }
    }

    fn acked(&self, node: &Arc<NodeShared>, from: &NodeName, mig: &MigrationId) {
        self.note_answer(node, from, mig, |o| {
            if let Some(runs) = o.target_runs.take() {
                let _ = runs.send(());
            }
            if o.acked_us.is_none() {
                let us = o.freeze_at.map_or(0, |t| t.elapsed().as_micros() as u64);
                o.acked_us = Some(us);
                tracing::info!(parent: &o.span, after_freeze_us = us, "target runs");
            }
        });
    }

    /// The target's copy served its first message `after_start_us` after it started.
    fn served(
        &self,
        node: &Arc<NodeShared>,
        from: &NodeName,
        mig: &MigrationId,
        after_start_us: u64,
    ) {
        self.note_answer(node, from, mig, |o| {
            o.served_us.get_or_insert(after_start_us);
            tracing::info!(parent: &o.span, after_start_us, "target serves");
        });
    }

    /// Records one of the target's answers after commit on attempt `mig`, if `from` is its
    /// target (another node's word changes neither the report nor when the queue's rest
    /// goes); the report is given once every part of it is in.
    fn note_answer(
        &self,
        node: &Arc<NodeShared>,
        from: &NodeName,
        mig: &MigrationId,
        note: impl FnOnce(&mut Outgoing),
    ) {
        let done = {
            let mut out = lock(&self.outgoing);
            let found = out.iter_mut().find(|(_, o)| o.mig == *mig && o.to == *from);
            let Some((id, o)) = found else {
                return;
            };
            note(o);
            o.complete().then_some(*id)
        };
        if let Some(id) = done {
            self.finish(node, id, false);
        }
    }

    /// Tells the source of attempt `n` that its copy here serves (see [`MigMsg::Serving`]).
    pub fn serving(&self, node: &Arc<NodeShared>, source: &NodeName, n: u64, after_start_us: u64) {
        send_mig(
            node,
            source,
            MigMsg::Serving {
                source: source.clone(),
                n,
                after_start_us,
            },
        );
    }

    /// Gives the report to its waiters and forgets the attempt.
    fn finish(&self, node: &Arc<NodeShared>, id: ServiceId, late: bool) {
        let Some(o) = lock(&self.outgoing).remove(&id) else {
            return;
        };
        let report = report_of(node.name(), id, &o);
        {
            let mut c = lock(&self.counters);
            match &report.aborted {
                None => {
                    c.stats.committed += 1;
                    c.stats.freeze_us_sum = c.stats.freeze_us_sum.saturating_add(report.freeze_us);
                    c.freeze_hist[freeze_bucket(report.freeze_us)] += 1;
                }
                Some(r) => *c.stats.aborted.entry(r.label().to_owned()).or_default() += 1,
            }
        }
        // Every move this node made as a source, however it was asked (a user, placement, a
        // drain, the service itself), is in its event log (`tern events`).
        node.logs.event("migration", crate::node::describe(&report));
        tracing::info!(
            parent: &o.span,
            committed = report.committed(),
            late,
            freeze_us = report.freeze_us,
            total_us = report.total_us,
            snapshot_bytes = report.snapshot_bytes,
            carried = report.carried,
            forwarded = report.forwarded,
            rebuilt = report.rebuilt,
            aborted = ?report.aborted,
            "migration ended"
        );
        for w in o.waiters {
            let _ = w.send(report.clone());
        }
    }

    /// Carries out the core's actions.
    fn run(&self, node: &Arc<NodeShared>, actions: Vec<Action<Snap, ()>>) {
        // Attempts whose copy could not be set up here: their `Prepared` is not sent.
        let mut not_installed: Vec<MigrationId> = Vec::new();
        for action in actions {
            match action {
                Action::Send {
                    msg: Wire::Prepared { ref mig },
                    ..
                } if not_installed.contains(mig) => {}
                Action::Send { to, msg } => self.send(node, to, msg),
                Action::Freeze { service } => match node.slot(service) {
                    Some(slot) => slot.request_freeze(),
                    None => {
                        let actions =
                            lock(&self.core).freeze_failed(service, "the service is gone".into());
                        self.run(node, actions);
                    }
                },
                Action::Resume { service, .. } => {
                    // A freeze asked for and not yet served (the deadline passed) is called off.
                    if let Some(slot) = node.slot(service) {
                        slot.cancel_freeze();
                    }
                    let decide = lock(&self.outgoing)
                        .get_mut(&service)
                        .and_then(|o| o.decide.take());
                    if let Some(d) = decide {
                        let _ = d.send(Decision::Resume);
                    }
                }
                Action::Retire { service } => self.retire(node, service),
                Action::Precopy { service, mig, to } => self.start_precopy(node, service, mig, to),
                Action::PrecopyEnded { service, mig } => {
                    // Dropping it calls the writer off; the runner finds its queue closed.
                    let mut pre = lock(&self.precopies);
                    if pre.get(&service).is_some_and(|p| p.mig == mig) {
                        pre.remove(&service);
                    }
                }
                Action::Install { snap } => {
                    if let Some(mig) = self.install(node, snap) {
                        not_installed.push(mig);
                    }
                }
                Action::Start { service } => {
                    node.service_arrived(service, true);
                    if let Some(go) = lock(&self.incoming).remove(&service) {
                        let _ = go.send(Go::Start);
                    }
                    lock(&self.counters).stats.arrived += 1;
                    let epoch = lock(&self.core).epoch(service).unwrap_or(0);
                    node.relocated(service, node.name(), epoch);
                }
                Action::Discard { service } => {
                    node.service_arrived(service, false);
                    if let Some(go) = lock(&self.incoming).remove(&service) {
                        let _ = go.send(Go::Discard);
                    }
                }
                Action::Orphan { service, mig } => {
                    node.service_arrived(service, false);
                    if let Some(go) = lock(&self.incoming).remove(&service) {
                        let _ = go.send(Go::Orphan);
                    }
                    tracing::warn!(%service, source = %mig.source, n = mig.n,
                        "prepared copy orphaned: its source never decided");
                    // Events before counts: whoever sees the count finds the event.
                    node.logs.event(
                        "copy-orphaned",
                        format!(
                            "service {service} from {}: no decision after {} ms; it is lost unless {} still runs it",
                            mig.source,
                            node.limits.prepared_orphan_ms,
                            mig.source
                        ),
                    );
                    node.stats.copies_orphaned.inc();
                }
                Action::ClaimRefused { peer, refusal } => node.refuse_claim(&peer, &refusal),
                Action::Enqueue { .. } | Action::Refuse { .. } => {
                    // The node's data plane is the mailbox; no data goes through the core.
                    debug_assert!(false, "data action from a core that carries no data");
                }
                Action::Report {
                    service, outcome, ..
                } => self.report(node, service, outcome),
            }
        }
    }

    fn report(&self, node: &Arc<NodeShared>, service: ServiceId, outcome: Outcome) {
        let finish_now = {
            let mut out = lock(&self.outgoing);
            let Some(o) = out.get_mut(&service) else {
                return;
            };
            match outcome {
                Outcome::Committed { epoch, .. } => {
                    o.committed = true;
                    o.epoch = epoch;
                    tracing::info!(
                        parent: &o.span,
                        epoch,
                        after_freeze_us = o.freeze_at.map_or(0, |t| t.elapsed().as_micros() as u64),
                        "committed"
                    );
                    o.complete()
                }
                Outcome::Aborted(reason) => {
                    o.freeze_us = o.freeze_at.map(|t| t.elapsed().as_micros() as u64);
                    tracing::warn!(parent: &o.span, %reason, "aborted");
                    o.aborted = Some(reason);
                    true
                }
            }
        };
        if finish_now {
            self.finish(node, service, false);
        }
    }

    fn retire(&self, node: &Arc<NodeShared>, service: ServiceId) {
        let (to, epoch) = match lock(&self.core).location(service) {
            Some(loc) => loc,
            None => return,
        };
        // Before the target hears the commit (and the service speaks from there): this node
        // answers where it went, and every peer is told.
        node.sender_moved_away(service, &to);
        // Its hold and names went with the snapshot.
        node.service_left(service);
        // Leftovers first: what arrived during the freeze goes onto the link to the target
        // before any channel on this node points there, so a local sender's next message
        // queues behind its earlier ones.
        let retiring = node.slot(service);
        let forwarded = match &retiring {
            Some(slot) => {
                let (encoded, skipped, closing) = slot.retire_encoded(to.clone(), epoch);
                // Stopped senders' closes follow the service (on the data link; a close waits
                // at the target until it applies).
                for (from, last) in closing {
                    node.send_closed(&to, service, (from, last), 0);
                }
                let n = encoded.len();
                let mut msgs = Vec::with_capacity(n);
                let kind = slot.kind().clone();
                let written_as = lock(&self.outgoing)
                    .get(&service)
                    .and_then(|o| o.written_as);
                let rewrite = node.rewrite_of(&kind);
                for m in encoded {
                    match m {
                        // Written as the snapshot was: an older version's, in a downgrade.
                        Ok(mut msg) => match (written_as, rewrite) {
                            (Some(v), Some(rewrite)) => match rewrite(kind.version, &msg.msg, v) {
                                Ok(bytes) => {
                                    msg.msg = bytes;
                                    msgs.push(msg);
                                }
                                Err(detail) => refuse(
                                    node,
                                    service,
                                    refusal_of(
                                        &msg,
                                        DeliveryError::BadMessage {
                                            id: service,
                                            kind: kind.clone(),
                                            detail,
                                        },
                                    ),
                                ),
                            },
                            _ => msgs.push(msg),
                        },
                        Err(r) => refuse(node, service, *r),
                    }
                }
                // Its tombstone writes what it forwards for the version found there.
                if rewrite.is_some() {
                    self.note_rewrites(service, kind);
                }
                let writer = lock(&self.outgoing)
                    .get_mut(&service)
                    .and_then(|o| o.leftovers.take());
                let left = Leftover { msgs, skipped };
                // On the snapshot stream, behind the carried queue; if that stream is gone,
                // on the data link.
                if let Some(Err(left)) = writer.map(|w| w.send(left)) {
                    hand_on_link(node, service, &to, left);
                }
                n
            }
            None => 0,
        };
        let decide = lock(&self.outgoing).get_mut(&service).map(|o| {
            o.forwarded = forwarded as u64;
            o.decide.take()
        });
        if let Some(Some(d)) = decide {
            let _ = d.send(Decision::Retire);
        }
        if let Some(copy) = &retiring {
            node.forget_moved(service, copy);
        }
        let rebuilt = node.relocated(service, &to, epoch);
        let peers: Vec<NodeName> = node
            .links
            .all()
            .iter()
            .map(|l| l.name.clone())
            .filter(|n| n != node.name())
            .collect();
        // The tombstone stays until each of them (every node this one knows, connected or not)
        // has fenced it.
        lock(&self.core)
            .tombstones_mut()
            .await_fences(service, epoch, peers);
        if let Some(o) = lock(&self.outgoing).get_mut(&service) {
            o.rebuilt = rebuilt as u64;
        }
    }

    /// Sets up the paused copy the core installed. On failure the core turns the attempt into
    /// a refusal, and the attempt is returned so its `Prepared` is held back.
    fn install(&self, node: &Arc<NodeShared>, snap: Snapshot<Snap, ()>) -> Option<MigrationId> {
        let Payload::In(copy) = &*snap.state else {
            return None;
        };
        let install = lock(&copy.install).take()?;
        let (tx, rx) = oneshot::channel();
        match install(rx) {
            Ok(()) => {
                lock(&self.incoming).insert(snap.service, tx);
                None
            }
            Err(e) => {
                node.service_arrived(snap.service, false);
                let reason = format!("install failed: {e}");
                self.count_refused_in(&reason);
                node.logs.event(
                    "migration-refused",
                    format!("service {}: {reason}", snap.service),
                );
                let (mig, actions) = lock(&self.core).install_failed(snap.service, reason);
                self.run(node, actions);
                mig
            }
        }
    }

    fn send(&self, node: &Arc<NodeShared>, to: NodeName, msg: Wire<Snap, ()>) {
        let mig = match msg {
            Wire::Snapshot { mig, snap } => {
                let (tx, rx) = oneshot::channel();
                let (runs_tx, runs_rx) = oneshot::channel();
                if let Some(o) = lock(&self.outgoing).get_mut(&snap.service) {
                    o.leftovers = Some(tx);
                    o.target_runs = Some(runs_tx);
                }
                let node = node.clone();
                actix_rt::spawn(async move {
                    write_snapshot(node, to, mig, snap, (rx, runs_rx)).await;
                });
                return;
            }
            Wire::Prepared { mig } => MigMsg::Prepared {
                source: mig.source,
                n: mig.n,
            },
            Wire::Refused { mig, reason } => MigMsg::Refused {
                source: mig.source,
                n: mig.n,
                reason,
            },
            Wire::Commit { mig } => MigMsg::Commit {
                source: mig.source,
                n: mig.n,
            },
            Wire::CommitAck { mig } => MigMsg::CommitAck {
                source: mig.source,
                n: mig.n,
            },
            Wire::Abort { mig } => MigMsg::Abort {
                source: mig.source,
                n: mig.n,
            },
            Wire::Query { mig } => MigMsg::Query {
                source: mig.source,
                n: mig.n,
            },
            Wire::Located {
                service,
                node: at,
                epoch,
            } => MigMsg::Located {
                service,
                node: at,
                epoch,
            },
            Wire::Moved {
                service,
                node: at,
                epoch,
            } => MigMsg::Moved {
                service,
                node: at,
                epoch,
            },
            Wire::Data { .. } | Wire::Skipped { .. } => {
                debug_assert!(false, "data from a core that carries no data");
                return;
            }
        };
        send_mig(node, &to, mig);
    }
}

impl Outgoing {
    /// Committed, the stream written, and the target has said it runs and serves.
    fn complete(&self) -> bool {
        self.committed && self.written && self.acked_us.is_some() && self.served_us.is_some()
    }

    /// The freeze as reported. Committed: until the target acknowledged, plus how long after
    /// its start the copy served; an upper bound on the true freeze by the acknowledgement's
    /// one-way trip (the two clocks are never compared). Aborted: until the source resumed.
    /// A report given before the target's answers came counts up to the moment it is given.
    fn freeze_time_us(&self) -> u64 {
        match (self.freeze_us, self.acked_us, self.served_us) {
            (Some(us), _, _) => us,
            (None, Some(acked), Some(served)) => acked + served,
            _ => self.freeze_at.map_or(0, |t| t.elapsed().as_micros() as u64),
        }
    }
}

fn report_of(me: &NodeName, id: ServiceId, o: &Outgoing) -> MigrationReport {
    MigrationReport {
        migration: format!("{}#{}", o.mig.source, o.mig.n),
        service: id,
        from: me.clone(),
        to: o.to.clone(),
        aborted: o.aborted.clone(),
        epoch: o.epoch,
        freeze_us: o.freeze_time_us(),
        total_us: o.called.elapsed().as_micros() as u64,
        frozen_after_us: o.freeze_at.map_or(0, |t| {
            t.saturating_duration_since(o.called).as_micros() as u64
        }),
        snapshot_bytes: o.snapshot_bytes,
        precopied_bytes: o.precopied_bytes,
        carried: o.carried,
        forwarded: o.forwarded,
        rebuilt: o.rebuilt,
    }
}

/// Node `from` said `service` is at `at` since `epoch`: every channel and book here follows,
/// then a fence goes to `from` behind everything this node sent it.
fn learned(node: &Arc<NodeShared>, from: &NodeName, service: ServiceId, at: &NodeName, epoch: u64) {
    node.relocated(service, at, epoch);
    node.send_fence(from, service, epoch);
}

/// Sends a protocol message on the control stream to `to`.
pub(crate) fn send_mig(node: &NodeShared, to: &NodeName, msg: MigMsg) {
    match node.links.get(to) {
        Some(link) => {
            if let Err(e) = link.push_ctrl(&Frame::Mig(msg)) {
                node.logs
                    .event("migration-message-lost", format!("to {to}: {e}"));
            }
        }
        None => node
            .logs
            .event("migration-message-lost", format!("{to} is not a peer")),
    }
}

/// Writes one snapshot on its own unidirectional stream: header, state, carried queue, end.
async fn write_snapshot(
    node: Arc<NodeShared>,
    to: NodeName,
    mig: MigrationId,
    snap: Snapshot<Snap, ()>,
    (leftovers, target_runs): (oneshot::Receiver<Leftover>, oneshot::Receiver<()>),
) {
    let Payload::Out(out) = &*snap.state else {
        return;
    };
    let id = snap.service;
    let conn = node.links.get(&to).and_then(|l| l.connection());
    let Some(conn) = conn else {
        node.driver.link_lost(&node, &to);
        return;
    };
    let started = Instant::now();
    // Once committed, the carried queue and the leftovers have no other copy: if the stream is
    // not acknowledged to its end, their senders are told (see below).
    let mut committed_tail: Option<Leftover> = None;
    let result = async {
        let mut send = if out.header.precopied {
            // The snapshot follows what was copied ahead, on its stream.
            let (send, bytes) = node
                .driver
                .pre_stream(id, &mig)
                .await
                .map_err(|e| format!("the pre-copy stream: {e}"))?;
            node.driver.note_precopied(id, &mig, bytes);
            send
        } else {
            conn.open_uni()
                .await
                .map_err(|e| format!("opening the snapshot stream: {e}"))?
        };
        let frame_max = node.limits.frame_bytes_max;
        let mut header = out.header.clone();
        header.mig = mig.n;
        header.epoch = snap.epoch;
        header.custody = node.custody_for_snapshot(header.id, &to);
        (header.held, header.forced) = node.driver.hold_and_force(header.id);
        header.names = node.names_of(header.id);
        header.trace = node.driver.trace_of(header.id);
        // The windows, send counters, book and timers follow the header in frames of their
        // own, so that a service with many senders, a large book or many timers fits any
        // frame bound.
        let tables = tern_proto::snapshot::tables_frames(
            tern_proto::snapshot::Tables {
                windows: std::mem::take(&mut header.windows),
                send_seqs: std::mem::take(&mut header.send_seqs),
                book: std::mem::take(&mut header.book),
                timers: std::mem::take(&mut header.timers),
            },
            frame_max / 2,
        );
        header.tables =
            u32::try_from(tables.len()).map_err(|_| format!("{} tables frames", tables.len()))?;
        let mut buf = Vec::new();
        let mut written = 0u64;
        wire::encode_frame(&mut buf, &Frame::SnapBegin(Box::new(header)), frame_max)
            .map_err(|e| format!("snapshot header: {e}"))?;
        for part in tables {
            let frame = Frame::SnapTables(part);
            written += put_frame(&mut send, &mut buf, &frame, frame_max, "snapshot tables").await?;
        }
        for chunk in out
            .state
            .chunks(SNAP_STATE_CHUNK_BYTES.min(frame_max / 2).max(1))
        {
            written += put_frame(
                &mut send,
                &mut buf,
                &Frame::SnapState { bytes: chunk },
                frame_max,
                "snapshot state",
            )
            .await?;
        }
        if !buf.is_empty() {
            // No state bytes at all: the header alone.
            send.write_all(&buf).await.map_err(|e| e.to_string())?;
            written += buf.len() as u64;
            buf.clear();
        }
        // The head of the queue goes behind the state, so the target has work the moment it
        // starts; the rest follows once the source has committed and the target said it runs
        // (`CommitAck`). Until then the answer to Prepared, the Commit and its acknowledgement
        // have the link and both threads nearly to themselves, so the freeze does not grow with
        // the queue. The target takes the rest as it arrives, then what arrived during the
        // freeze. An abort sends nothing more.
        let mut next = 0;
        let total = out.carried.len();
        let mut msgs = Vec::new();
        // Messages that could not be encoded: their senders are told once the migration has
        // committed (never dropped unseen).
        let mut failed = Vec::new();
        if total > 0 {
            next = out
                .carried
                .encode(0, SNAP_CARRIED_HEAD_BYTES, &mut msgs, &mut failed);
            let frame = Frame::SnapCarried {
                msgs: std::mem::take(&mut msgs),
            };
            written +=
                put_frame(&mut send, &mut buf, &frame, frame_max, "carried messages").await?;
        }
        if let Ok(left) = leftovers.await {
            committed_tail = Some(Leftover {
                msgs: left.msgs.clone(),
                skipped: left.skipped.clone(),
            });
            if next < total {
                // Streamed beside the Commit, the rest filled the connection's congestion
                // window and the target's thread, and the Commit and its acknowledgement
                // waited behind it: 2 to 4 ms in about one move in ten with 10,000 queued
                // (docs/benchmarks.md). The wait is bounded, and ends with the connection or
                // the attempt (the sender dropped): the stream is correct at any pace.
                let bound = Duration::from_millis(node.limits.migration_deadline_ms);
                tokio::select! {
                    _ = target_runs => {}
                    _ = conn.closed() => {}
                    _ = tokio::time::sleep(bound) => {}
                }
            }
            while next < total {
                // The commit's own messages, queued just now, go out before the first chunk.
                tokio::task::yield_now().await;
                msgs.clear();
                next = out
                    .carried
                    .encode(next, SNAP_CARRIED_CHUNK_BYTES, &mut msgs, &mut failed);
                let frame = Frame::SnapCarried {
                    msgs: std::mem::take(&mut msgs),
                };
                written +=
                    put_frame(&mut send, &mut buf, &frame, frame_max, "carried messages").await?;
            }
            // Committed: the source no longer has them either. (After an abort they stay in
            // the queue it resumes with.)
            for r in failed.drain(..) {
                refuse(&node, id, r);
            }
            let mut rest = left.msgs.as_slice();
            let mut skipped = left.skipped;
            while !rest.is_empty() || !skipped.is_empty() {
                let mut bytes = 0;
                let n = rest
                    .iter()
                    .take_while(|m| {
                        bytes += m.msg.len() + 32;
                        bytes <= SNAP_CARRIED_CHUNK_BYTES
                    })
                    .count()
                    .max(1)
                    .min(rest.len());
                let k = skipped
                    .len()
                    .min(SKIPS_PER_FRAME_BYTES.min(frame_max / 2) / 32);
                let frame = Frame::SnapLeftovers {
                    msgs: rest[..n].to_vec(),
                    skipped: skipped.drain(..k).collect(),
                };
                rest = &rest[n..];
                written += put_frame(&mut send, &mut buf, &frame, frame_max, "leftovers").await?;
            }
        }
        wire::encode_frame(&mut buf, &Frame::SnapEnd, frame_max).map_err(|e| e.to_string())?;
        send.write_all(&buf).await.map_err(|e| e.to_string())?;
        written += buf.len() as u64;
        send.finish().map_err(|e| e.to_string())?;
        // Until the peer has every byte, the migration is not over.
        send.stopped()
            .await
            .map_err(|e| format!("the target did not acknowledge the stream: {e}"))?;
        Ok::<u64, String>(written)
    }
    .await;
    match result {
        Ok(bytes) => {
            node.stats.bytes_out.add(bytes);
            tracing::debug!(service = %id, bytes, us = started.elapsed().as_micros() as u64, "snapshot sent");
            node.driver.note_written(&node, id, &mig, bytes);
        }
        Err(e) => {
            node.logs.event(
                "snapshot-stream-failed",
                format!("service {id} to {to}: {e}"),
            );
            // Before commit this aborts the attempt: this one alone, with why, while the
            // connection is up; every attempt to the target when it went down. After the
            // commit, the target runs without the rest of the queue: counted and reported,
            // never hidden.
            let actions = if conn.close_reason().is_none() {
                lock(&node.driver.core).stream_failed(&mig, e.clone())
            } else {
                lock(&node.driver.core).link_lost(&to)
            };
            node.driver.run(&node, actions);
            node.driver.note_written(&node, id, &mig, 0);
            if let Some(Leftover {
                msgs: left,
                skipped,
            }) = committed_tail
            {
                refuse_unconfirmed(&node, id, &to, out.carried.as_ref(), left);
                // The numbers consumed here during the freeze went with the leftovers: the
                // target's windows must still learn them (on the control stream).
                node.send_skips(id, &to, &skipped, 0);
            }
        }
    }
}

/// Encodes `frame` into `buf` (left empty again) and writes it; returns the bytes written.
pub(crate) async fn put_frame(
    send: &mut quinn::SendStream,
    buf: &mut Vec<u8>,
    frame: &Frame<'_>,
    frame_max: usize,
    what: &str,
) -> Result<u64, String> {
    wire::encode_frame(buf, frame, frame_max).map_err(|e| format!("{what}: {e}"))?;
    send.write_all(buf).await.map_err(|e| e.to_string())?;
    let n = buf.len() as u64;
    buf.clear();
    Ok(n)
}

/// Leftovers on the data link, when the snapshot stream cannot take them.
fn hand_on_link(node: &Arc<NodeShared>, service: ServiceId, to: &NodeName, left: Leftover) {
    for msg in left.msgs {
        let origin = msg.origin.clone().unwrap_or_else(|| node.name().clone());
        if let Err(e) = forward(node, to, service, &origin, msg.clone(), Hand::Accepted) {
            refuse(node, service, refusal_of(&msg, e));
        }
    }
    node.send_skips(service, to, &left.skipped, 0);
}

/// A committed snapshot stream failed before the target acknowledged it: every carried
/// message and every leftover may be lost with it, and nobody else holds them. Each sender is
/// told (`Unconfirmed`); some may still have been handled at the target.
fn refuse_unconfirmed(
    node: &NodeShared,
    id: ServiceId,
    to: &NodeName,
    carried: &dyn CarriedSource,
    left: Vec<CarriedMsg>,
) {
    let reason = DeliveryError::Unconfirmed {
        id,
        node: to.clone(),
    };
    let (mut next, total) = (0, carried.len());
    let (mut msgs, mut failed) = (Vec::new(), Vec::new());
    let mut n = 0u64;
    while next < total {
        msgs.clear();
        next = carried.encode(next, SNAP_CARRIED_CHUNK_BYTES, &mut msgs, &mut failed);
        for m in &msgs {
            refuse(node, id, refusal_of(m, reason.clone()));
            n += 1;
        }
    }
    for m in &left {
        refuse(node, id, refusal_of(m, reason.clone()));
        n += 1;
    }
    node.logs.event(
        "carried-unconfirmed",
        format!("service {id} at {to}: {n} handed-on messages unconfirmed, their senders told"),
    );
}

/// Tells the sender of a message that was accepted and then could not be delivered.
pub(crate) fn refuse(node: &NodeShared, to: ServiceId, r: Refusal) {
    node.refuse_envelope(to, r);
}

/// A message for a service that is not here: a tombstone forwards it and tells its sender's
/// node where the service went. Returns false when there is no tombstone.
pub(crate) fn forward_by_tombstone(
    node: &Arc<NodeShared>,
    to: ServiceId,
    origin: &NodeName,
    msg: CarriedMsg,
    hand: Hand,
) -> Result<(), DeliveryError> {
    let Some(HandOn { at, epoch, notify }) = node.driver.hand_on(to, origin) else {
        return Err(DeliveryError::UnknownService {
            id: to,
            node: node.name().clone(),
        });
    };
    if let Some(origin) = notify {
        if node.links.get(&origin).is_some_and(|l| l.is_connected()) {
            send_mig(
                node,
                &origin,
                MigMsg::Moved {
                    service: to,
                    node: at.clone(),
                    epoch,
                },
            );
        } else {
            // Gone for now; its next run is told when it sends here again.
            node.driver.notice_unsent(to, &origin, epoch);
        }
    }
    let msg = match node.driver.rewritten_kind(to) {
        Some(kind) => rewrite_forwarded(node, (to, &kind), (origin, &at), msg)?,
        None => msg,
    };
    forward(node, &at, to, origin, msg, hand)
}

/// A message a tombstone forwards to node `at`, written for the version `at` runs: as it is,
/// unless it was written in a newer version than that one (here, in this node's version or an
/// older sender's) and the kind, as run here, writes the older one.
fn rewrite_forwarded(
    node: &NodeShared,
    (to, kind): (ServiceId, &KindKey),
    (origin, at): (&NodeName, &NodeName),
    mut msg: CarriedMsg,
) -> Result<CarriedMsg, DeliveryError> {
    let Some(there) = node.peer_version(&kind.name, at) else {
        return Ok(msg);
    };
    // Written for this node: by an older sender in its version, else in this node's.
    let sender = msg.origin.as_ref().unwrap_or(origin);
    let written = if sender == node.name() {
        kind.version
    } else {
        node.peer_version(&kind.name, sender)
            .map_or(kind.version, |v| v.min(kind.version))
    };
    if written <= there {
        return Ok(msg);
    }
    let Some(rewrite) = node.rewrite_of(kind) else {
        return Ok(msg);
    };
    msg.msg = rewrite(written, &msg.msg, there).map_err(|detail| DeliveryError::BadMessage {
        id: to,
        kind: kind.clone(),
        detail,
    })?;
    Ok(msg)
}

/// Sends `msg` for `to` on to node `at`, keeping its numbering, asker and origin.
pub(crate) fn forward(
    node: &NodeShared,
    at: &NodeName,
    to: ServiceId,
    origin: &NodeName,
    msg: CarriedMsg,
    hand: Hand,
) -> Result<(), DeliveryError> {
    let link = node
        .links
        .get(at)
        .ok_or_else(|| DeliveryError::UnknownNode { node: at.clone() })?;
    link.check_up()?;
    link.data.push(
        &link.name,
        &Frame::Forward {
            to,
            origin: origin.clone(),
            wait: hand == Hand::Wait,
            accepted: hand == Hand::Accepted,
            msg,
        },
    )?;
    Ok(())
}

/// A snapshot stream being received.
pub(crate) struct SnapRecv {
    n: u64,
    id: ServiceId,
    header: Option<SnapHeader>,
    /// The windows, send counters, book and timers, until every `SnapTables` frame announced
    /// has come.
    tables: tern_proto::snapshot::TablesIn,
    state: Vec<u8>,
    state_bytes: usize,
    /// `state`'s room, counted in the node's `snapshot_bytes_in` until the state is restored
    /// or dropped.
    room: Room,
    /// When the state (and the tables before it) must have come: `migration_deadline_ms`
    /// after the header, the time the source waits for the target's answer anyway. None once
    /// it came, or the snapshot was refused.
    state_due: Option<Instant>,
    /// The installed copy carried messages go to; None when refused or stale.
    slot: Option<Arc<dyn Slot>>,
    refused: bool,
    ended: bool,
    carried_in: u64,
    /// Carried messages the header announced: more is a protocol error.
    carried_announced: u64,
    /// What was copied ahead of the snapshot on its stream (its room held until restored).
    pre: Option<PreIn>,
    /// The target's span of the attempt (`migration-in`), a child of the source's when its
    /// header carried a trace context; it ends with the stream.
    span: tracing::Span,
}

/// Room reserved for a snapshot's state, counted against the node's
/// `Limits::snapshot_bytes_in_max` and its peer's `snapshot_bytes_in_per_peer_max`; given
/// back when dropped.
pub(crate) struct Room {
    total: Arc<std::sync::atomic::AtomicUsize>,
    peer: Arc<std::sync::atomic::AtomicUsize>,
    held: usize,
}

impl Room {
    /// No room yet, in the budgets of snapshots from `from`.
    pub(crate) fn from_peer(node: &NodeShared, from: &NodeName) -> Room {
        Room {
            total: node.snapshot_bytes_in.clone(),
            // A peer with no link (it just went) shares a counter of its own.
            peer: node
                .links
                .get(from)
                .map(|l| l.snapshot_bytes_in.clone())
                .unwrap_or_default(),
            held: 0,
        }
    }
}

/// Which budget a snapshot's room did not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spent {
    Node,
    Peer,
}

/// Adds `more` to `counter` if it stays within `max`.
fn take(counter: &std::sync::atomic::AtomicUsize, more: usize, max: usize) -> bool {
    use std::sync::atomic::Ordering;
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
            t.checked_add(more).filter(|n| *n <= max)
        })
        .is_ok()
}

impl Room {
    /// Takes `more` bytes more, if the peer's share stays within `peer_max` and the node's
    /// total within `max`.
    pub(crate) fn grow(
        &mut self,
        more: usize,
        (max, peer_max): (usize, usize),
    ) -> Result<(), Spent> {
        use std::sync::atomic::Ordering;
        if !take(&self.peer, more, peer_max) {
            return Err(Spent::Peer);
        }
        if !take(&self.total, more, max) {
            self.peer.fetch_sub(more, Ordering::AcqRel);
            return Err(Spent::Node);
        }
        self.held += more;
        Ok(())
    }

    pub(crate) fn release(&mut self) {
        use std::sync::atomic::Ordering;
        let held = std::mem::take(&mut self.held);
        self.total.fetch_sub(held, Ordering::AcqRel);
        self.peer.fetch_sub(held, Ordering::AcqRel);
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        self.release();
    }
}

/// Makes room in `state` for `more` bytes, growing its allocation by doubling up to the
/// `announced` size, within the node's and the peer's budgets; which one is spent, if any.
fn make_room(
    state: &mut Vec<u8>,
    room: &mut Room,
    more: usize,
    (announced, max, peer_max): (usize, usize, usize),
) -> Result<(), Spent> {
    let need = state.len() + more;
    if need <= state.capacity() {
        return Ok(());
    }
    // The caller refused more bytes than announced: the room wanted covers what is needed.
    debug_assert!(need <= announced);
    let want = need
        .max(state.capacity().saturating_mul(2))
        .max(64 << 10)
        .min(announced);
    room.grow(want - state.capacity(), (max, peer_max))?;
    state.reserve_exact(want - state.len());
    Ok(())
}

/// Checks a snapshot header against this node's rules; the reason when it is refused.
fn admit_snapshot(node: &NodeShared, from: &NodeName, h: &SnapHeader) -> Result<(), String> {
    let limits = &node.limits;
    if tern_proto::claims::allowed("migration", &limits.migration_peers, from).is_err() {
        return Err(format!("policy: node {from} may not push migrations here"));
    }
    use tern_proto::claims::{kind_allowed, KindRight};
    kind_allowed(&limits.kind_rules, &h.kind.name, KindRight::Push, from)
        .map_err(|refusal| refusal.detail)?;
    if !node.has_kind(&h.kind) {
        return Err(node.kind_refusal(&h.kind));
    }
    if h.state_bytes > limits.snapshot_bytes_max as u64 {
        return Err(format!(
            "too large: state of {} bytes exceeds snapshot_bytes_max {}",
            h.state_bytes, limits.snapshot_bytes_max
        ));
    }
    if !h.windows.is_empty()
        || !h.send_seqs.is_empty()
        || !h.book.is_empty()
        || !h.timers.is_empty()
    {
        return Err(
            "malformed: windows, send counters, book and timers travel in their own frames".into(),
        );
    }
    if h.carried > limits.snapshot_carried_max as u64 {
        return Err(format!(
            "too large: {} carried messages exceed snapshot_carried_max {}",
            h.carried, limits.snapshot_carried_max
        ));
    }
    if node.stopping.load(std::sync::atomic::Ordering::Relaxed) {
        return Err("stopping: the node is shutting down".into());
    }
    // The source checked this before freezing; this node has the last word (a drain begun
    // since, a capability just lost).
    if let Some(why) = node.unfit_here(&h.kind, h.forced) {
        return Err(format!("unfit: {why}"));
    }
    Ok(())
}

/// One frame of a snapshot stream.
pub(crate) fn snapshot_frame(
    node: &Arc<NodeShared>,
    from: &NodeName,
    (rx, pre): (&mut Option<SnapRecv>, &mut Option<PreIn>),
    frame: Frame<'_>,
) -> Result<(), wire::WireError> {
    let malformed = |detail: String| wire::WireError::Malformed { detail };
    match frame {
        Frame::SnapBegin(h) => {
            if rx.is_some() {
                return Err(malformed("a second snapshot header on one stream".into()));
            }
            let pre = match (h.precopied, pre.take()) {
                (true, Some(p)) if p.n == h.mig && p.id == h.id => Some(p),
                (true, _) => {
                    return Err(malformed(
                        "a pre-copied snapshot without its pre-copy ahead of it".into(),
                    ))
                }
                (false, Some(_)) => {
                    return Err(malformed(
                        "a pre-copy followed by a snapshot that does not use it".into(),
                    ))
                }
                (false, None) => None,
            };
            // A pre-copy refused already: its source heard why.
            let refused_before = pre.as_ref().is_some_and(|p| p.part.is_none());
            let refusal = if refused_before {
                Ok(())
            } else {
                admit_snapshot(node, from, &h)
            };
            // Early messages, the book and timers share the snapshot's byte bound with the
            // state.
            let early_max = (node.limits.snapshot_bytes_max as u64).saturating_sub(h.state_bytes);
            let span = tracing::info_span!(
                "migration-in",
                node = %node.name(),
                id = %format!("{from}#{}", h.mig),
                service = %h.id,
                from = %from,
                state_bytes = h.state_bytes,
                carried = h.carried
            );
            crate::trace::join(&span, h.trace);
            let mut recv = SnapRecv {
                n: h.mig,
                id: h.id,
                tables: tern_proto::snapshot::TablesIn::new(
                    h.tables,
                    usize::try_from(early_max).unwrap_or(usize::MAX),
                ),
                state: Vec::new(),
                state_bytes: h.state_bytes as usize,
                room: Room::from_peer(node, from),
                state_due: None,
                header: None,
                slot: None,
                refused: false,
                ended: false,
                carried_in: 0,
                carried_announced: h.carried,
                pre,
                span,
            };
            if refused_before {
                recv.refused = true;
                *rx = Some(recv);
                return Ok(());
            }
            match refusal {
                Err(reason) => {
                    recv.refused = true;
                    tracing::info!(parent: &recv.span, %reason, "refused");
                    node.driver.refuse_snapshot(node, from, h.mig, reason);
                }
                Ok(()) => {
                    // Room for the state is made as its bytes arrive (`make_room`).
                    recv.header = Some(*h);
                    let deadline = Duration::from_millis(node.limits.migration_deadline_ms);
                    recv.state_due = Some(Instant::now() + deadline);
                }
            }
            *rx = Some(recv);
            state_complete(node, from, rx);
        }
        Frame::SnapTables(part) => {
            let Some(recv) = rx.as_mut() else {
                return Err(malformed("snapshot tables before the header".into()));
            };
            if recv.refused {
                return Ok(());
            }
            if recv.header.is_none() || !recv.state.is_empty() {
                return Err(malformed("snapshot tables after the state".into()));
            }
            if recv.state_due.is_some_and(|due| Instant::now() >= due) {
                snapshot_overdue(node, from, rx);
                return Ok(());
            }
            if let Err(e) = recv.tables.add(part) {
                recv.refused = true;
                recv.header = None;
                recv.state = Vec::new();
                node.driver
                    .refuse_snapshot(node, from, recv.n, format!("too large: {e}"));
                return Ok(());
            }
            state_complete(node, from, rx);
        }
        Frame::SnapState { bytes } => {
            let Some(recv) = rx.as_mut() else {
                return Err(malformed("snapshot state before its header".into()));
            };
            if recv.refused {
                return Ok(());
            }
            if recv.header.is_none() || recv.state.len() + bytes.len() > recv.state_bytes {
                return Err(malformed(format!(
                    "snapshot state longer than the {} bytes announced",
                    recv.state_bytes
                )));
            }
            if !recv.tables.is_complete() {
                return Err(malformed("snapshot state before its tables".into()));
            }
            let bounds = (
                recv.state_bytes,
                node.limits.snapshot_bytes_in_max,
                node.limits.snapshot_bytes_in_per_peer_max,
            );
            if recv.state_due.is_some_and(|due| Instant::now() >= due) {
                // Trickled: each frame in time for the stream, the whole too late.
                snapshot_overdue(node, from, rx);
                return Ok(());
            }
            if let Err(spent) = make_room(&mut recv.state, &mut recv.room, bytes.len(), bounds) {
                use std::sync::atomic::Ordering;
                let reason = match spent {
                    Spent::Node => format!(
                        "too large: snapshots arriving here already hold {} bytes \
                         (snapshot_bytes_in_max {})",
                        node.snapshot_bytes_in.load(Ordering::Acquire),
                        node.limits.snapshot_bytes_in_max
                    ),
                    Spent::Peer => format!(
                        "too large: snapshots from {from} arriving here already hold {} bytes \
                         (snapshot_bytes_in_per_peer_max {})",
                        recv.room.peer.load(Ordering::Acquire),
                        node.limits.snapshot_bytes_in_per_peer_max
                    ),
                };
                recv.give_up(node, from, reason);
                return Ok(());
            }
            recv.state.extend_from_slice(bytes);
            state_complete(node, from, rx);
        }
        Frame::SnapCarried { msgs } => {
            let Some(recv) = rx.as_mut() else {
                return Err(malformed(
                    "carried messages before a snapshot header".into(),
                ));
            };
            let Some(slot) = &recv.slot else {
                // Refused or stale: the source still has these messages.
                return Ok(());
            };
            let after = recv.carried_in.saturating_add(msgs.len() as u64);
            if after > recv.carried_announced {
                return Err(malformed(format!(
                    "{after} carried messages, more than the {} the header announced",
                    recv.carried_announced
                )));
            }
            for m in msgs {
                recv.carried_in += 1;
                if let Err(reason) = slot.deliver_carried(&m) {
                    refuse(node, recv.id, refusal_of(&m, reason));
                }
            }
        }
        Frame::SnapLeftovers { msgs, skipped } => {
            let Some(recv) = rx.as_mut() else {
                return Err(malformed("leftovers before a snapshot header".into()));
            };
            let Some(slot) = &recv.slot else {
                return Ok(());
            };
            for m in msgs {
                let origin = m.origin.clone().unwrap_or_else(|| from.clone());
                if let Err(reason) = slot.deliver_forwarded(&m, &origin, Hand::Accepted) {
                    refuse(node, recv.id, refusal_of(&m, reason));
                }
            }
            for (sender, seq) in skipped {
                if slot.skip(sender, seq).is_err() {
                    node.apply_skip(recv.id, sender, seq, 0);
                }
            }
        }
        Frame::SnapEnd => {
            let Some(recv) = rx.as_mut() else {
                return Err(malformed("snapshot end before its header".into()));
            };
            recv.ended = true;
            if let Some(slot) = &recv.slot {
                let _in = recv.span.enter();
                for r in slot.carried_complete() {
                    refuse(node, recv.id, r);
                }
                tracing::debug!(carried = recv.carried_in, "carried queue complete");
            }
            // The target's part ends here (its span's end is its last exit), whatever the
            // stream's close waits for.
            recv.span = tracing::Span::none();
        }
        other => {
            return Err(wire::WireError::Unexpected {
                kind: other.kind(),
                stream: "snapshot",
            })
        }
    }
    Ok(())
}

fn refusal_of(m: &CarriedMsg, reason: DeliveryError) -> Refusal {
    Refusal {
        from: m.from,
        seq: m.seq,
        ask: m.ask.as_ref().map(|(node, ask)| crate::mailbox::AskOrigin {
            node: node.clone(),
            ask: *ask,
        }),
        origin: m.origin.clone(),
        reason,
    }
}

fn state_complete(node: &Arc<NodeShared>, from: &NodeName, rx: &mut Option<SnapRecv>) {
    let Some(recv) = rx.as_mut() else {
        return;
    };
    if !recv.tables.is_complete() || recv.state.len() < recv.state_bytes {
        return;
    }
    let Some(mut header) = recv.header.take() else {
        return;
    };
    let tables = std::mem::take(&mut recv.tables.tables);
    header.windows = tables.windows;
    header.send_seqs = tables.send_seqs;
    header.book = tables.book;
    header.timers = tables.timers;
    let state = std::mem::take(&mut recv.state);
    // The state becomes the service's: no longer a snapshot arriving (nor what was copied
    // ahead of it).
    recv.room.release();
    let part = recv.pre.take().and_then(|p| p.part);
    recv.state_due = None;
    let state_bytes = state.len();
    // Not inside the span: the service's own span, made here, outlives it.
    match node.restore_paused(from, header, state, part) {
        Ok(copy) => {
            tracing::info!(parent: &recv.span, state_bytes, "restored");
            recv.slot = node.driver.on_snapshot(node, from, copy);
        }
        Err(e) => {
            recv.refused = true;
            tracing::info!(parent: &recv.span, error = %e, "restore failed");
            node.driver
                .refuse_snapshot(node, from, recv.n, format!("restore failed: {e}"));
        }
    }
}

impl SnapRecv {
    /// When the state must have come, while it has not.
    pub(crate) fn state_due_by(&self) -> Option<Instant> {
        self.state_due.filter(|_| !self.refused)
    }

    /// Gives the snapshot up: refused to its source, its room given back; what still comes on
    /// its stream is read and dropped.
    fn give_up(&mut self, node: &Arc<NodeShared>, from: &NodeName, reason: String) {
        tracing::info!(parent: &self.span, %reason, "refused");
        self.refused = true;
        self.header = None;
        self.state = Vec::new();
        self.state_due = None;
        self.room.release();
        node.driver.refuse_snapshot(node, from, self.n, reason);
    }
}

/// A snapshot's state did not come by its due time: refused, its room given back.
pub(crate) fn snapshot_overdue(node: &Arc<NodeShared>, from: &NodeName, rx: &mut Option<SnapRecv>) {
    if let Some(recv) = rx.as_mut().filter(|r| r.state_due_by().is_some()) {
        let (have, want) = (recv.state.len(), recv.state_bytes);
        let reason = format!(
            "too slow: {have} of {want} bytes of state within migration_deadline_ms {}",
            node.limits.migration_deadline_ms
        );
        recv.give_up(node, from, reason);
    }
}

/// A snapshot stream ended; if it ended early, the copy it fed is incomplete.
pub(crate) fn snapshot_stream_ended(node: &NodeShared, from: &NodeName, rx: &mut Option<SnapRecv>) {
    if let Some(recv) = rx.take() {
        if !recv.ended && !recv.refused {
            node.logs.event(
                "snapshot-stream-cut",
                format!(
                    "service {} from {from}: stream ended after {} carried messages",
                    recv.id, recv.carried_in
                ),
            );
            // A committed copy runs with what arrived rather than waiting for the rest for
            // ever; an uncommitted one still waits for the source's word.
            if let Some(slot) = &recv.slot {
                for r in slot.carried_complete() {
                    refuse(node, recv.id, r);
                }
            }
        }
    }
}

/// A message handed on by another node, `accepted` elsewhere as it says, its sender waiting
/// or not: delivered here (the peer's word within `forward::hand_from_peer`'s bound), or
/// forwarded again by a tombstone with that word (the next node bounds it in turn).
pub(crate) fn on_forward(
    node: &Arc<NodeShared>,
    to: ServiceId,
    origin: &NodeName,
    (accepted, wait): (bool, bool),
    msg: &CarriedMsg,
) -> Result<(), DeliveryError> {
    let slot = node.slot(to);
    let (depth, capacity) = slot
        .as_ref()
        .map_or((0, usize::MAX), |s| (s.depth(), s.capacity()));
    let hand = tern_proto::forward::hand_from_peer(accepted, wait, depth, capacity);
    let res = match slot {
        Some(slot) => slot.deliver_forwarded(msg, origin, hand),
        None => Err(DeliveryError::UnknownService {
            id: to,
            node: node.name().clone(),
        }),
    };
    let res = match res {
        Err(DeliveryError::UnknownService { .. } | DeliveryError::Moved { .. }) => {
            forward_by_tombstone(node, to, origin, msg.clone(), hand)
        }
        other => other,
    };
    if res.is_ok() {
        node.stats.received_remote.inc();
    }
    res
}

/// Tells the sender of a handed-on message that it was not delivered.
pub(crate) fn refuse_carried(
    node: &NodeShared,
    to: ServiceId,
    msg: &CarriedMsg,
    reason: DeliveryError,
) {
    refuse(node, to, refusal_of(msg, reason));
}

/// A number refused on a service's former node.
pub(crate) fn on_skipped(
    node: &Arc<NodeShared>,
    to: ServiceId,
    from: ServiceId,
    (seq, hops): (u64, u8),
) {
    node.apply_skip(to, from, seq, hops);
}

impl NodeShared {
    /// Whether `peer` may ask this node to move the services a move request names (and, for
    /// a tree, every member): the kind rules' `pull_by` ([`tern_proto::claims::KindRule`]).
    pub(crate) fn may_pull(
        &self,
        msg: &MigMsg,
        peer: &NodeName,
    ) -> Result<(), tern_proto::claims::ClaimRefused> {
        use tern_proto::claims::{kind_allowed, KindRight};
        let rules = &self.limits.kind_rules;
        if rules.is_empty() {
            return Ok(());
        }
        let ids: Vec<ServiceId> = match msg {
            MigMsg::Request { service, .. } => vec![*service],
            MigMsg::GroupRequest { moves, .. } => moves.iter().map(|(id, _)| *id).collect(),
            MigMsg::TreeRequest { root, .. } => match self.tree(*root) {
                Ok(members) => members.iter().map(|m| m.addr.id).collect(),
                Err(_) => vec![*root],
            },
            _ => Vec::new(),
        };
        for id in ids {
            if let Some(addr) = self.addr_known(id) {
                kind_allowed(rules, &addr.kind.name, KindRight::Pull, peer)?;
            }
        }
        Ok(())
    }
}

/// Answers a peer's control request `req` with `res` (its value, or why it failed).
pub(crate) fn answer_request<T: Serialize>(
    node: &NodeShared,
    link: &crate::transport::PeerLink,
    req: u64,
    res: Result<T, String>,
) {
    let bytes = res.and_then(|r| rmp_serde::to_vec(&r).map_err(|e| e.to_string()));
    let result = match &bytes {
        Ok(b) => wire::ReplyBody::Value(b),
        Err(detail) => wire::ReplyBody::Failed(detail.clone()),
    };
    if let Err(e) = link.push_ctrl(&Frame::Reply { ask: req, result }) {
        node.logs
            .event("migration-report-lost", format!("to {}: {e}", link.name));
    }
}

/// A migration message on the control stream.
pub(crate) fn on_control(
    node: &Arc<NodeShared>,
    link: &Arc<crate::transport::PeerLink>,
    msg: MigMsg,
) {
    if let MigMsg::Request { req, .. }
    | MigMsg::GroupRequest { req, .. }
    | MigMsg::TreeRequest { req, .. } = &msg
    {
        let policy = &node.limits.move_requests_from;
        let allowed = tern_proto::claims::allowed("move request", policy, &link.name)
            .and_then(|()| node.may_pull(&msg, &link.name));
        if let Err(refusal) = allowed {
            node.refuse_claim(&link.name, &refusal);
            let answer = Frame::Reply {
                ask: *req,
                result: wire::ReplyBody::Failed(refusal.detail),
            };
            if let Err(e) = link.push_ctrl(&answer) {
                node.logs
                    .event("migration-report-lost", format!("to {}: {e}", link.name));
            }
            return;
        }
    }
    match msg {
        MigMsg::Request {
            req,
            service,
            to,
            drain,
            force,
            hold,
            spare_held,
        } => {
            let opts = MigrateOptions { drain, force, hold };
            let (node, link) = (node.clone(), link.clone());
            actix_rt::spawn(async move {
                let res = if node.slot(service).is_some() {
                    let refuse = if spare_held && node.placement.is_held(service) {
                        Some(AbortReason::Held)
                    } else {
                        node.preflight(&[(service, to.clone())], &opts)
                            .await
                            .map(|(_, why)| why)
                    };
                    let rx = node.driver.migrate(&node, service, to, opts, refuse);
                    rx.await.map_err(|_| "the node stopped".to_string())
                } else {
                    Err(format!(
                        "service {service} {} {}",
                        crate::node::NOT_HERE,
                        node.name()
                    ))
                };
                answer_request(&node, &link, req, res);
            });
        }
        MigMsg::GroupRequest {
            req,
            moves,
            drain,
            force,
            hold,
        } => {
            let opts = MigrateOptions { drain, force, hold };
            crate::tree::on_group_request(node, link, req, moves, opts);
        }
        MigMsg::TreeRequest {
            req,
            root,
            to,
            drain,
            force,
            hold,
        } => {
            let opts = MigrateOptions { drain, force, hold };
            crate::tree::on_tree_request(node, link, req, root, to, opts);
        }
        MigMsg::CanTake { req, kind, forced } => {
            answer_request(node, link, req, Ok(node.unfit_here(&kind, forced)));
        }
        other => node.driver.on_msg(node, &link.name, other),
    }
}

#[cfg(test)]
mod tests {
    use super::freeze_bucket;

    #[test]
    fn a_freeze_falls_in_the_bucket_whose_bound_is_the_first_not_below_it() {
        assert_eq!(freeze_bucket(0), 0);
        assert_eq!(freeze_bucket(1), 0);
        assert_eq!(freeze_bucket(2), 1);
        assert_eq!(freeze_bucket(3), 2);
        assert_eq!(freeze_bucket(4), 2);
        assert_eq!(freeze_bucket(5), 3);
        assert_eq!(freeze_bucket(1_000), 10, "1,000 us is at most 1,024");
        assert_eq!(freeze_bucket(1 << 30), 30);
        assert_eq!(freeze_bucket((1 << 30) + 1), 31);
        assert_eq!(freeze_bucket(u64::MAX), 31);
    }
}
