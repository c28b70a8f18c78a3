//! The runtime-owned mailbox: a bounded queue the runtime can read back as data.
//!
//! actix keeps its queued envelopes to itself; a service that must migrate with its queue needs
//! a queue the runtime owns. Pushing never blocks and never drops: a full mailbox is an error to
//! the sender, who may also wait for room.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Notify;

use crate::error::DeliveryError;
use tern_proto::ids::{KindKey, NodeName, ServiceId};
pub(crate) use tern_proto::inbox::NotHere;
use tern_proto::inbox::{Admit, Inbox, Numbered};
pub(crate) use tern_proto::inbox::{Discarded, Leftovers, NotNow, WindowExport};
use tern_proto::wire::CarriedMsg;

pub(crate) use crate::sync::lock;

/// Where the answer to a queued request goes.
#[derive(Clone, Debug)]
pub(crate) struct AskOrigin {
    /// Node waiting for the reply.
    pub node: NodeName,
    /// Ask id on that node.
    pub ask: u64,
}

pub(crate) use crate::transport::Meta;

/// One queued message with its channel metadata.
#[derive(Debug)]
pub(crate) struct Envelope<M> {
    pub from: Option<ServiceId>,
    pub seq: u64,
    pub ask: Option<AskOrigin>,
    pub origin: Option<NodeName>,
    pub msg: M,
}

impl<M> Envelope<M> {
    /// An envelope for `msg`; `asker` is the node waiting on `meta.ask`, `origin` the node it came
    /// from (`None` when local).
    pub fn new(meta: Meta, asker: &NodeName, origin: Option<&NodeName>, msg: M) -> Self {
        Envelope {
            from: meta.from,
            seq: meta.seq,
            ask: meta.ask.map(|ask| AskOrigin {
                node: asker.clone(),
                ask,
            }),
            origin: origin.cloned(),
            msg,
        }
    }
}

impl<M> Numbered for Envelope<M> {
    fn sender(&self) -> Option<ServiceId> {
        self.from
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn origin(&self) -> Option<&NodeName> {
        self.origin.as_ref()
    }
    fn is_ask(&self) -> bool {
        self.ask.is_some()
    }
}

/// A bounded, runtime-owned queue for one service: the data plane's [`Inbox`] (admission,
/// windows, parking, hand-over, handled marks, all in `tern-proto`) behind a lock, with the
/// wake-ups of its runner and of senders waiting for room.
pub(crate) struct Mailbox<M> {
    pub kind: KindKey,
    state: Mutex<Inbox<Envelope<M>>>,
    ready: Notify,
    /// Where senders wait for room, made by the first that waits: most mailboxes never fill,
    /// and every one pays for the field (16 bytes instead of 40).
    space: std::sync::OnceLock<Box<Space>>,
    /// Set by the node to ask the runner to freeze after the message in hand.
    pub freeze: std::sync::atomic::AtomicBool,
    /// Set by the node to ask the runner to copy its state ahead (`NodeShared::driver`
    /// holds the attempt).
    pub precopy: std::sync::atomic::AtomicBool,
    /// Set when a handled mark has not been reported to its sender's node yet.
    handled_dirty: AtomicBool,
    /// Set when copies of asks wait for the runner to answer them ([`take_repeats`]).
    ///
    /// [`take_repeats`]: Self::take_repeats
    repeats: AtomicBool,
    /// Set while the service sleeps (see [`Bell`]): its runner's task has ended and its state
    /// waits on the node's thread. Set and checked by the runner under the inbox's lock;
    /// whoever clears it (`swap`) rings the bell, once.
    asleep: AtomicBool,
    /// Set by the node's sweep ([`idle_round`](Slot::idle_round)) to ask an idle runner to
    /// sleep.
    sleep_asked: AtomicBool,
    /// Sweeps since the runner last took a message.
    idle_rounds: std::sync::atomic::AtomicU8,
    /// Timers the service has pending, as its runner last noted (for `ServiceInfo`).
    timers: std::sync::atomic::AtomicU32,
    /// The node's bell, when the service may sleep (`None`: it never does).
    bell: Option<Arc<Bell>>,
    /// How to read messages older versions of the kind wrote, when the kind declares
    /// upgrades (`None`: every message is read as this version's).
    versions: Option<Box<Versions<M>>>,
}

/// The versions peer nodes write one kind's messages in: the version each says it runs, in
/// its own gossip. Shared by the node's mailboxes of the kind; a leaf lock.
#[derive(Debug, Default)]
pub(crate) struct PeerVersions(std::sync::RwLock<HashMap<NodeName, u32>>);

impl PeerVersions {
    pub fn version_of(&self, node: &NodeName) -> Option<u32> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .copied()
    }

    /// `node` said it runs `version`; true when that is news.
    pub fn set(&self, node: &NodeName, version: u32) -> bool {
        let mut table = self.0.write().unwrap_or_else(|p| p.into_inner());
        table.insert(node.clone(), version) != Some(version)
    }

    /// `node` no longer runs the kind, or left the cluster: its messages are read as this
    /// node's own version's again.
    pub fn forget(&self, node: &NodeName) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(node);
    }

    /// Peers whose version is known.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// How a mailbox of a kind with upgrades reads what older versions wrote.
pub(crate) struct Versions<M> {
    /// Reads a message written by a version (`service::read_msg` of the kind).
    pub read: fn(u32, &[u8]) -> Result<M, String>,
    /// Reads a message in any version the kind reads, newest first
    /// (`service::read_msg_any`): for bytes whose writer is not who the origin says (a
    /// message an older copy hands back after an aborted move to it).
    pub read_any: fn(&[u8]) -> Result<M, String>,
    /// The version the messages carried with a restored copy were written in: its source's.
    pub carried: u32,
    /// The versions peers run.
    pub peers: Arc<PeerVersions>,
}

/// Who wrote a message's bytes, for a kind whose versions differ across the cluster.
#[derive(Clone, Copy)]
pub(crate) enum Written<'a> {
    /// A sender on node `.0`, in the version that node runs.
    By(&'a NodeName),
    /// The source of a restored copy, in the snapshot's version.
    Carried,
}

/// Where senders wait for room in one mailbox (see `Mailbox::wait_until`).
#[derive(Default)]
pub(crate) struct Space {
    notify: Notify,
    /// Senders registered on `notify`: a pop wakes them only when there are any.
    waiters: AtomicUsize,
}

/// How a sleeping service is woken: the waker sends its mailbox's key to the node's thread,
/// where the bell's task starts its runner again (`service::ring_sleepers`).
///
/// The queue holds at most one key per sleeping service (a key is sent only by whoever
/// clears the mailbox's `asleep` flag), so it is bounded by `services_max`.
pub(crate) struct Bell {
    tx: tokio::sync::mpsc::UnboundedSender<usize>,
}

impl Bell {
    /// A bell, and the keys it will ring with.
    pub fn new() -> (Arc<Bell>, tokio::sync::mpsc::UnboundedReceiver<usize>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (Arc::new(Bell { tx }), rx)
    }
}

/// The key a sleeping service is found by on its node's thread: its mailbox's address (one
/// per copy; the mailbox lives as long as the sleeping runner holds it).
pub(crate) fn sleep_key<M>(mailbox: &Mailbox<M>) -> usize {
    mailbox as *const Mailbox<M> as usize
}

impl<M> Mailbox<M> {
    pub fn new(id: ServiceId, kind: KindKey, capacity: usize) -> Self {
        Self::wrap(kind, Inbox::new(id, capacity))
    }

    /// The service's id (kept by the inbox alone: every idle service pays for a copy).
    pub fn id(&self) -> ServiceId {
        lock(&self.state).id()
    }

    /// Lets the service sleep when idle, woken through `bell`.
    pub fn sleeping_with(mut self, bell: Option<Arc<Bell>>) -> Self {
        self.bell = bell;
        self
    }

    /// Wakes the runner: its `ready` wait, or its sleep. Called after the change that gives
    /// it work, once the inbox's lock is released: a runner that went to sleep before the
    /// change (under the lock) is seen asleep here.
    fn wake(&self) {
        self.ready.notify_one();
        if self.asleep.load(Ordering::Acquire) {
            self.wake_sleeper();
        }
    }

    #[cold]
    fn wake_sleeper(&self) {
        if self.asleep.swap(false, Ordering::AcqRel) {
            if let Some(bell) = &self.bell {
                // Fails only once the node's thread has ended: nothing runs there any more.
                let _ = bell.tx.send(sleep_key(self));
            }
        }
    }

    /// The runner, idle, asks to sleep: true (and asleep) when it has nothing to do, under
    /// the inbox's lock. The caller then hands its state to the bell's side and ends its task.
    pub fn try_sleep(&self) -> bool {
        if self.bell.is_none() {
            return false;
        }
        let st = lock(&self.state);
        if !st.is_empty()
            || st.is_closed()
            || st.is_gated()
            || self.freeze.load(Ordering::SeqCst)
            || self.precopy.load(Ordering::SeqCst)
            || self.repeats.load(Ordering::Acquire)
        {
            return false;
        }
        self.asleep.store(true, Ordering::Release);
        true
    }

    /// True while the service sleeps.
    #[cfg(test)]
    fn is_asleep(&self) -> bool {
        self.asleep.load(Ordering::Relaxed)
    }

    /// The runner notes how many timers the service has pending.
    pub fn note_timers(&self, n: usize) {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if self.timers.load(Ordering::Relaxed) != n {
            self.timers.store(n, Ordering::Relaxed);
        }
    }

    /// True when the node's sweep asked this runner to sleep.
    pub fn sleep_asked(&self) -> bool {
        self.sleep_asked.load(Ordering::Relaxed)
    }

    /// The runner took a message, or woke: it is not idle.
    #[inline]
    pub fn active(&self) {
        if self.idle_rounds.load(Ordering::Relaxed) != 0 {
            self.idle_rounds.store(0, Ordering::Relaxed);
            self.sleep_asked.store(false, Ordering::Relaxed);
        }
    }

    fn wrap(kind: KindKey, inbox: Inbox<Envelope<M>>) -> Self {
        Mailbox {
            kind,
            state: Mutex::new(inbox),
            ready: Notify::new(),
            space: std::sync::OnceLock::new(),
            freeze: std::sync::atomic::AtomicBool::new(false),
            precopy: std::sync::atomic::AtomicBool::new(false),
            handled_dirty: AtomicBool::new(false),
            repeats: AtomicBool::new(false),
            asleep: AtomicBool::new(false),
            sleep_asked: AtomicBool::new(false),
            idle_rounds: std::sync::atomic::AtomicU8::new(0),
            timers: std::sync::atomic::AtomicU32::new(0),
            bell: None,
            versions: None,
        }
    }

    /// Reads older versions' messages as `versions` says.
    pub fn reading(mut self, versions: Option<Versions<M>>) -> Self {
        self.versions = versions.map(Box::new);
        self
    }

    /// The version `written`'s bytes are in, when it is not this mailbox's.
    fn older_version(&self, written: Written<'_>) -> Option<u32> {
        let v = self.versions.as_ref()?;
        let version = match written {
            Written::By(node) => v.peers.version_of(node)?,
            Written::Carried => v.carried,
        };
        (version != self.kind.version).then_some(version)
    }

    /// Decodes a message written in `version` (`None`: this mailbox's). A message a peer
    /// wrote in an older version that does not read as one is tried as this version's: the
    /// peer may have been updated since its last gossip. Last, any version the kind reads is
    /// tried (bytes an older copy wrote and handed back).
    fn decode(&self, bytes: &[u8], version: Option<u32>) -> Result<M, String>
    where
        M: DeserializeOwned,
    {
        match (version, &self.versions) {
            (Some(version), Some(v)) => (v.read)(version, bytes)
                .or_else(|e| rmp_serde::from_slice(bytes).map_err(|_| e))
                .or_else(|e| (v.read_any)(bytes).map_err(|_| e)),
            (None, Some(v)) => rmp_serde::from_slice(bytes)
                .map_err(|e| e.to_string())
                .or_else(|e| (v.read_any)(bytes).map_err(|_| e)),
            (_, None) => rmp_serde::from_slice(bytes).map_err(|e| e.to_string()),
        }
    }

    /// A mailbox for a restored copy: windows from the snapshot, arrivals parked until
    /// [`carried_done`](Self::carried_done) and [`start`](Self::start) both happened.
    pub fn restored(
        id: ServiceId,
        kind: KindKey,
        capacity: usize,
        windows: Vec<WindowExport<Envelope<M>>>,
    ) -> Self {
        Self::wrap(kind, Inbox::restored(id, capacity, windows))
    }

    /// Runs `f` on the inbox under the lock, then wakes the runner if it queued something
    /// (`f` says so, or a skip released held messages).
    fn with<R>(&self, f: impl FnOnce(&mut Inbox<Envelope<M>>) -> (R, bool)) -> R {
        let (r, queued) = {
            let mut st = lock(&self.state);
            let (r, queued) = f(&mut st);
            let marked = self.marked_again(&mut st);
            (r, queued | st.take_released() | marked)
        };
        if queued {
            self.wake();
        }
        r
    }

    /// Queues `env`, or hands it back with the reason it was not taken. A numbered message
    /// goes through its sender's window: a copy is dropped (and counts as taken), an early one
    /// is held. When `wait` is false a refused number is consumed, so later ones still flow.
    // The envelope comes back by value on refusal so that it is never lost; boxing it would
    // allocate on the path that is already under pressure.
    #[allow(clippy::result_large_err)]
    pub fn push_with(
        &self,
        env: Envelope<M>,
        wait: bool,
    ) -> Result<(), (DeliveryError, Envelope<M>)> {
        let mode = if wait { Admit::Wait } else { Admit::Tell };
        // Not through `with`, and with its own return per outcome: a result built once and
        // returned at the end (168 bytes here, the envelope on refusal) was copied out with a
        // `memcpy` on every push (perf, tern-bench's local case).
        let mut st = lock(&self.state);
        match st.admit(env, mode) {
            Ok(queued) => {
                let queued = queued | st.take_released() | self.marked_again(&mut st);
                if queued && st.has_repeats() {
                    self.repeats.store(true, Ordering::Release);
                }
                drop(st);
                if queued {
                    self.wake();
                }
                Ok(())
            }
            Err(refused) => {
                let released = st.take_released();
                drop(st);
                if released {
                    self.wake();
                }
                Err(refused)
            }
        }
    }

    /// A copy from another node noted a mark for it (`Inbox::take_marked_again`): the runner
    /// is woken to have its node collect the marks. True when it was.
    fn marked_again(&self, st: &mut Inbox<Envelope<M>>) -> bool {
        if !st.take_marked_again() {
            return false;
        }
        self.handled_dirty.store(true, Ordering::Relaxed);
        self.repeats.store(true, Ordering::Release);
        true
    }

    /// Copies of asks the windows dropped, each with whether its first copy is still queued
    /// (`Inbox::take_repeats`), and whether marks wait to be collected (a copy came again
    /// from another node); empty and false at the cost of one atomic load when there are none.
    pub fn take_repeats(&self) -> (Vec<(Envelope<M>, bool)>, bool) {
        // A load first: the mark is rarely set, and a swap on every message is a locked
        // instruction for nothing.
        if !self.repeats.load(Ordering::Acquire) || !self.repeats.swap(false, Ordering::AcqRel) {
            return (Vec::new(), false);
        }
        (lock(&self.state).take_repeats(), true)
    }

    /// [`push_with`](Self::push_with) for a sender that does not wait.
    #[cfg(test)]
    #[allow(clippy::result_large_err)]
    pub fn push(&self, env: Envelope<M>) -> Result<(), (DeliveryError, Envelope<M>)> {
        self.push_with(env, false)
    }

    /// Consumes number `seq` of `from` without a message (it was refused, here or on its
    /// way). [`NotHere`] when the service moved or stopped: the caller hands the skip on.
    pub fn skip_number(&self, from: ServiceId, seq: u64) -> Result<(), NotHere> {
        self.with(|st| match st.skip(from, seq) {
            Ok(queued) => (Ok(()), queued),
            Err(e) => (Err(e), false),
        })
    }

    /// Freeze, source side: takes the queue and exports the windows (early messages encoded by
    /// `encode`, and left in place: they are handed on again at commit, as copies).
    pub fn take_for_snapshot<T>(
        &self,
        encode: impl Fn(&Envelope<M>) -> T,
    ) -> (VecDeque<Envelope<M>>, Vec<WindowExport<T>>) {
        lock(&self.state).take_for_snapshot(encode)
    }

    /// Abort, source side: the queue handed over goes back in front of what arrived meanwhile.
    pub fn put_back(&self, queue: VecDeque<Envelope<M>>) {
        lock(&self.state).put_back(queue);
        self.wake();
    }

    /// Commit, source side: from now on pushes are handed back with the new place; returns
    /// what must follow the snapshot to the target.
    pub fn retire(&self, node: NodeName, epoch: u64) -> Leftovers<Envelope<M>> {
        let left = lock(&self.state).retire(node, epoch);
        self.wake();
        self.room_changed();
        left
    }

    /// Restored copy: a carried message, already released by the source's windows.
    pub fn push_carried(&self, env: Envelope<M>) {
        lock(&self.state).push_carried(env);
        self.wake();
    }

    /// Restored copy: the carried queue is complete. Returns parked arrivals the windows
    /// refused when the gate opened, for their senders to be told.
    pub fn carried_done(&self) -> Vec<(DeliveryError, Envelope<M>)> {
        self.with(|st| st.carried_done())
    }

    /// Restored copy: it may run. Returns refusals as [`carried_done`](Self::carried_done).
    pub fn start(&self) -> Vec<(DeliveryError, Envelope<M>)> {
        self.with(|st| st.start())
    }

    /// True while arrivals are parked (a restored copy not yet started or not yet complete).
    pub fn is_gated(&self) -> bool {
        lock(&self.state).is_gated()
    }

    /// Aborted or orphaned copy: closes the mailbox and returns its carried queue, its parked
    /// arrivals and the skips that waited for its gate.
    pub fn discard_all(&self) -> Discarded<Envelope<M>> {
        let out = lock(&self.state).discard_all();
        self.wake();
        self.room_changed();
        out
    }

    /// Wakes every sender waiting for room, if any ever waited here.
    fn room_changed(&self) {
        if let Some(space) = self.space.get() {
            space.notify.notify_waiters();
        }
    }

    /// Returns once `ok` holds of the inbox; woken by pops (and by moves and closes).
    ///
    /// The waiter makes the waiting place (if it is the first), registers, then looks under
    /// the inbox's lock. A change made under that lock before the look is seen by the look; one
    /// made after it finds the place made and the waiter counted, and wakes it.
    async fn wait_until(&self, ok: impl Fn(&Inbox<Envelope<M>>) -> bool) {
        let space = self.space.get_or_init(Box::default);
        loop {
            let notified = space.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            space.waiters.fetch_add(1, Ordering::SeqCst);
            let room = ok(&lock(&self.state));
            if !room {
                notified.await;
            }
            space.waiters.fetch_sub(1, Ordering::SeqCst);
            if room {
                return;
            }
        }
    }

    /// Returns once the receive window of `from` can hold another early message (or the
    /// mailbox closed or moved).
    pub async fn wait_window(&self, from: ServiceId) {
        self.wait_until(|st| st.window_has_room(from)).await
    }

    /// Returns once the mailbox has room (or is closed or moved).
    pub async fn wait_room(&self) {
        self.wait_until(|st| st.has_room()).await
    }

    /// Takes the oldest message. Senders waiting for room are woken once the queue is down to
    /// half its capacity, so each wake-up lets a run of messages in rather than one.
    #[cfg(test)]
    pub fn pop(&self) -> Option<Envelope<M>> {
        self.pop_noting().0
    }

    /// [`pop`](Self::pop), and whether this pop left a confirmation to report where there
    /// was none (so the node must visit this mailbox on its next progress tick).
    pub fn pop_noting(&self) -> (Option<Envelope<M>>, bool) {
        let (env, half_empty) = {
            let mut st = lock(&self.state);
            let (env, left) = st.pop();
            (env, left <= st.capacity() / 2)
        };
        let mut newly_dirty = false;
        if env.as_ref().is_some_and(|e| e.from.is_some())
            && !self.handled_dirty.load(Ordering::Relaxed)
        {
            self.handled_dirty.store(true, Ordering::Relaxed);
            newly_dirty = true;
        }
        if env.is_some() && half_empty {
            if let Some(space) = self.space.get() {
                if space.waiters.load(Ordering::SeqCst) > 0 {
                    space.notify.notify_waiters();
                }
            }
        }
        (env, newly_dirty)
    }

    /// Waits until a push may have happened.
    pub async fn wait_ready(&self) {
        self.ready.notified().await
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.state).is_closed()
    }

    /// The senders whose progress changed since the last call: `(sender, last number taken,
    /// its node)`. Cheap when nothing changed.
    pub fn take_handled(&self) -> Vec<(ServiceId, u64, Option<NodeName>)> {
        if !self.handled_dirty.swap(false, Ordering::Relaxed) {
            return Vec::new();
        }
        lock(&self.state).take_handled()
    }

    /// See [`Inbox::skip_through`].
    pub fn skip_through(&self, from: ServiceId, through: u64) -> Result<(), NotNow> {
        self.with(|st| match st.skip_through(from, through) {
            Ok(queued) => (Ok(()), queued),
            Err(e) => (Err(e), false),
        })
    }

    /// Sender `from` stopped after sending `last` here: its window goes once passed
    /// (`Inbox::close_sender`).
    pub fn close_sender(&self, from: ServiceId, last: u64) -> Result<(), NotNow> {
        lock(&self.state).close_sender(from, last).map(|_| ())
    }

    /// Closes the mailbox and returns what was still queued, oldest first.
    pub fn close(&self) -> Vec<Envelope<M>> {
        let rest = lock(&self.state).close();
        self.wake();
        self.room_changed();
        rest
    }

    pub fn len(&self) -> usize {
        lock(&self.state).len()
    }
}

/// A commit's leftovers, encoded: each message, or why it could not be encoded; then the
/// numbers refused since the snapshot, `(sender, seq)`.
/// A commit's leftovers, encoded: the messages, the skipped numbers, and the closes of stopped
/// senders (`(sender, last)`) that the target applies again.
pub(crate) type EncodedLeftovers = (
    Vec<Result<CarriedMsg, Box<Refusal>>>,
    Vec<(ServiceId, u64)>,
    Vec<(ServiceId, u64)>,
);

/// A message refused after it was accepted elsewhere (parked at a restored copy, forwarded),
/// described without its type so the node can tell its sender.
pub(crate) struct Refusal {
    pub from: Option<ServiceId>,
    pub seq: u64,
    pub ask: Option<AskOrigin>,
    pub origin: Option<NodeName>,
    pub reason: DeliveryError,
}

impl<M> Envelope<M> {
    pub(crate) fn refusal(self, reason: DeliveryError) -> Refusal {
        Refusal {
            from: self.from,
            seq: self.seq,
            ask: self.ask,
            origin: self.origin,
            reason,
        }
    }
}

/// An envelope as it travels in a snapshot or a forward: its message as MessagePack.
pub(crate) fn encode_envelope<M: Serialize>(
    env: &Envelope<M>,
) -> Result<CarriedMsg, DeliveryError> {
    encode_envelope_with(env, crate::service::write_plain::<M>)
}

/// An envelope as it travels, its message written by `write` (as it is, or as an older
/// version's).
pub(crate) fn encode_envelope_with<M>(
    env: &Envelope<M>,
    write: fn(&M) -> Result<Vec<u8>, String>,
) -> Result<CarriedMsg, DeliveryError> {
    Ok(CarriedMsg {
        from: env.from,
        seq: env.seq,
        ask: env.ask.as_ref().map(|a| (a.node.clone(), a.ask)),
        origin: env.origin.clone(),
        msg: write(&env.msg).map_err(DeliveryError::Encode)?,
    })
}

pub(crate) fn decode_envelope<M: DeserializeOwned>(
    id: impl FnOnce() -> ServiceId,
    kind: &KindKey,
    c: &CarriedMsg,
    decode: impl FnOnce(&[u8]) -> Result<M, String>,
) -> Result<Envelope<M>, DeliveryError> {
    let msg: M = decode(&c.msg).map_err(|detail| DeliveryError::BadMessage {
        id: id(),
        kind: kind.clone(),
        detail,
    })?;
    Ok(Envelope {
        from: c.from,
        seq: c.seq,
        ask: c.ask.as_ref().map(|(node, ask)| AskOrigin {
            node: node.clone(),
            ask: *ask,
        }),
        origin: c.origin.clone(),
        msg,
    })
}

/// A local service seen without its types: what the node needs to route bytes from the network
/// to it and to find it again by type.
pub(crate) trait Slot: Send + Sync + 'static {
    fn kind(&self) -> &KindKey;
    fn depth(&self) -> usize;
    fn capacity(&self) -> usize;
    /// Timers pending, as the runner last noted.
    fn timers_pending(&self) -> usize;
    /// Decodes `bytes` as the service's message type and queues it. `asker` is the node
    /// waiting on `meta.ask`; `wait` keeps the number open when the mailbox is full.
    fn deliver_bytes(
        &self,
        meta: Meta,
        nodes: (&NodeName, &NodeName),
        wait: bool,
        bytes: &[u8],
    ) -> Result<(), DeliveryError>;
    /// Decodes and queues `msgs[start..]` (numbered from `first_seq + start` when `from` is a
    /// service) under one lock, stopping at the first that cannot be taken. Returns the index of
    /// the first message not queued, with the reason, or `msgs.len()` and `None`.
    fn deliver_run(
        &self,
        sender: (Option<ServiceId>, u64, &NodeName),
        wait: bool,
        msgs: &tern_proto::wire::BatchMsgs<'_>,
        start: usize,
    ) -> (usize, Option<DeliveryError>);
    /// A message handed on by another node (see `Admit::Forwarded`).
    fn deliver_forwarded(
        &self,
        msg: &CarriedMsg,
        origin: &NodeName,
        hand: tern_proto::forward::Hand,
    ) -> Result<(), DeliveryError>;
    /// Commit, source side: marks the mailbox moved and returns what must follow the snapshot,
    /// encoded: arrivals since the snapshot in order, early messages, skipped numbers.
    fn retire_encoded(&self, node: NodeName, epoch: u64) -> EncodedLeftovers;
    /// Restored copy: one carried message.
    fn deliver_carried(&self, msg: &CarriedMsg) -> Result<(), DeliveryError>;
    /// Restored copy: the carried queue is complete.
    fn carried_complete(&self) -> Vec<Refusal>;
    /// Consumes a number whose message could not be taken at all; [`NotHere`] when the
    /// service moved or stopped (the caller hands the skip on).
    fn skip(&self, from: ServiceId, seq: u64) -> Result<(), NotHere>;
    /// See [`Mailbox::skip_through`].
    fn skip_through(&self, from: ServiceId, through: u64) -> Result<(), NotNow>;
    /// See [`Mailbox::close_sender`].
    fn close_sender(&self, from: ServiceId, last: u64) -> Result<(), NotNow>;
    /// Senders the mailbox keeps a receive window for.
    fn senders(&self) -> usize;
    /// See [`Mailbox::take_handled`].
    fn take_handled(&self) -> Vec<(ServiceId, u64, Option<NodeName>)>;
    /// Asks the runner to freeze after the message in hand.
    fn request_freeze(&self);
    /// Calls off a freeze asked for and not yet served.
    fn cancel_freeze(&self);
    /// Asks the runner to copy its state ahead between messages.
    fn request_precopy(&self);
    /// One round of the node's idle sweep: a runner idle for two rounds is asked to sleep.
    fn idle_round(&self);
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
    /// Resolves once the mailbox has room or is closed.
    fn room(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>;
    /// Resolves once the window of `from` has room (see `Mailbox::wait_window`).
    fn window_room(
        &self,
        from: ServiceId,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>;
}

impl<M: Serialize + DeserializeOwned + Send + 'static> Slot for Mailbox<M> {
    fn kind(&self) -> &KindKey {
        &self.kind
    }

    fn depth(&self) -> usize {
        // Queued, handed over in an undecided snapshot, and parked at a copy not started: all
        // of it is held here (a parked arrival counts against the capacity like a queued one).
        lock(&self.state).depth()
    }

    fn capacity(&self) -> usize {
        lock(&self.state).capacity()
    }

    fn timers_pending(&self) -> usize {
        self.timers.load(Ordering::Relaxed) as usize
    }

    fn deliver_bytes(
        &self,
        meta: Meta,
        (asker, origin): (&NodeName, &NodeName),
        wait: bool,
        bytes: &[u8],
    ) -> Result<(), DeliveryError> {
        let msg: M = match self.decode(bytes, self.older_version(Written::By(origin))) {
            Ok(m) => m,
            Err(detail) => {
                // Moved or stopped: the sender, told of the refusal, skips it where the
                // service is now.
                if let Some(from) = meta.from {
                    let _ = self.skip_number(from, meta.seq);
                }
                return Err(DeliveryError::BadMessage {
                    id: self.id(),
                    kind: self.kind.clone(),
                    detail,
                });
            }
        };
        self.push_with(Envelope::new(meta, asker, Some(origin), msg), wait)
            .map_err(|(e, _)| e)
    }

    fn deliver_run(
        &self,
        (from, first_seq, origin): (Option<ServiceId>, u64, &NodeName),
        wait: bool,
        msgs: &tern_proto::wire::BatchMsgs<'_>,
        start: usize,
    ) -> (usize, Option<DeliveryError>) {
        let mode = if wait { Admit::Wait } else { Admit::Tell };
        let version = self.older_version(Written::By(origin));
        let mut next = start;
        let mut rest = msgs.iter().skip(start);
        let stopped = self.with(|st| {
            let mut queued = false;
            let stopped = loop {
                let Some(bytes) = rest.next() else {
                    break None;
                };
                // The caller checked that the numbering does not overflow.
                let seq = if from.is_some() {
                    first_seq + next as u64
                } else {
                    first_seq
                };
                let msg: M = match self.decode(bytes, version) {
                    Ok(m) => m,
                    Err(detail) => {
                        if let Some(from) = from {
                            let _ = st.skip(from, seq);
                        }
                        break Some(DeliveryError::BadMessage {
                            id: st.id(),
                            kind: self.kind.clone(),
                            detail,
                        });
                    }
                };
                let env = Envelope {
                    from,
                    seq,
                    ask: None,
                    origin: Some(origin.clone()),
                    msg,
                };
                match st.admit(env, mode) {
                    Ok(q) => queued |= q,
                    Err((e, _)) => break Some(e),
                }
                next += 1;
            };
            (stopped, queued)
        });
        (next, stopped)
    }

    fn deliver_forwarded(
        &self,
        msg: &CarriedMsg,
        origin: &NodeName,
        hand: tern_proto::forward::Hand,
    ) -> Result<(), DeliveryError> {
        // Forwarded as it was sent: in the version of the node it was first sent from.
        let written_by = msg.origin.as_ref().unwrap_or(origin);
        let version = self.older_version(Written::By(written_by));
        let env = match decode_envelope::<M>(
            || self.id(),
            &self.kind,
            msg,
            |b| self.decode(b, version),
        ) {
            Ok(mut env) => {
                env.origin.get_or_insert_with(|| origin.clone());
                env
            }
            Err(e) => {
                if let Some(from) = msg.from {
                    let _ = self.skip_number(from, msg.seq);
                }
                return Err(e);
            }
        };
        let mode = hand.admit();
        self.with(|st| match st.admit(env, mode) {
            Ok(queued) => (Ok(()), queued),
            Err((e, _)) => (Err(e), false),
        })
    }

    fn retire_encoded(&self, node: NodeName, epoch: u64) -> EncodedLeftovers {
        let left = self.retire(node, epoch);
        let msgs = left
            .queue
            .into_iter()
            .chain(left.early)
            .map(|env| encode_envelope(&env).map_err(|e| Box::new(env.refusal(e))))
            .collect();
        (msgs, left.skipped, left.closing)
    }

    fn deliver_carried(&self, msg: &CarriedMsg) -> Result<(), DeliveryError> {
        let version = self.older_version(Written::Carried);
        self.push_carried(decode_envelope(
            || self.id(),
            &self.kind,
            msg,
            |b| self.decode(b, version),
        )?);
        Ok(())
    }

    fn carried_complete(&self) -> Vec<Refusal> {
        self.carried_done()
            .into_iter()
            .map(|(reason, env)| env.refusal(reason))
            .collect()
    }

    fn skip(&self, from: ServiceId, seq: u64) -> Result<(), NotHere> {
        self.skip_number(from, seq)
    }

    fn skip_through(&self, from: ServiceId, through: u64) -> Result<(), NotNow> {
        Mailbox::skip_through(self, from, through)
    }

    fn close_sender(&self, from: ServiceId, last: u64) -> Result<(), NotNow> {
        Mailbox::close_sender(self, from, last)
    }

    fn senders(&self) -> usize {
        lock(&self.state).senders()
    }

    fn take_handled(&self) -> Vec<(ServiceId, u64, Option<NodeName>)> {
        Mailbox::take_handled(self)
    }

    fn request_freeze(&self) {
        self.freeze.store(true, Ordering::SeqCst);
        // Through the lock: a runner going to sleep either sees the flag or is seen asleep.
        drop(lock(&self.state));
        self.wake();
    }

    fn cancel_freeze(&self) {
        self.freeze.store(false, Ordering::SeqCst);
    }

    fn request_precopy(&self) {
        self.precopy.store(true, Ordering::SeqCst);
        drop(lock(&self.state));
        self.wake();
    }

    fn idle_round(&self) {
        if self.bell.is_none() || self.asleep.load(Ordering::Relaxed) || self.sleep_asked() {
            return;
        }
        // Two sweeps with no message in between: idle for at least one sweep interval.
        if self.idle_rounds.fetch_add(1, Ordering::Relaxed) >= 1 {
            self.sleep_asked.store(true, Ordering::Relaxed);
            self.ready.notify_one();
        }
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }

    fn room(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>> {
        Box::pin(self.wait_room())
    }

    fn window_room(
        &self,
        from: ServiceId,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>> {
        Box::pin(self.wait_window(from))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(n: u32) -> Envelope<u32> {
        Envelope {
            from: None,
            seq: n as u64,
            ask: None,
            origin: None,
            msg: n,
        }
    }

    #[test]
    fn bounded_fifo_and_close_returns_rest() {
        let mb = Mailbox::new(ServiceId::from_parts(0, 1), KindKey::new("k", 1), 2);
        mb.push(env(1)).unwrap();
        mb.push(env(2)).unwrap();
        let (e, back) = mb.push(env(3)).unwrap_err();
        assert!(matches!(e, DeliveryError::MailboxFull { capacity: 2, .. }));
        assert_eq!(back.msg, 3, "a refused message is handed back, not dropped");
        assert_eq!(mb.pop().unwrap().msg, 1);
        mb.push(env(3)).unwrap();
        let rest: Vec<u32> = mb.close().into_iter().map(|e| e.msg).collect();
        assert_eq!(rest, vec![2, 3]);
        assert!(matches!(
            mb.push(env(4)),
            Err((DeliveryError::Stopped { .. }, _))
        ));
    }

    /// The sleep handshake: a runner sleeps only with nothing to do, under the inbox's lock,
    /// and the first change that gives it work rings the bell once with its key.
    #[test]
    fn a_sleeping_mailbox_rings_its_bell_once_per_sleep() {
        let (bell, mut keys) = Bell::new();
        let mb = Arc::new(
            Mailbox::new(ServiceId::from_parts(0, 1), KindKey::new("k", 1), 4)
                .sleeping_with(Some(bell)),
        );
        let key = sleep_key(&mb);
        assert!(mb.try_sleep(), "empty: it may sleep");
        assert!(mb.is_asleep());
        assert!(keys.try_recv().is_err(), "nothing rang yet");
        mb.push(env(1)).unwrap();
        assert!(!mb.is_asleep());
        assert_eq!(keys.try_recv().ok(), Some(key));
        mb.push(env(2)).unwrap();
        assert!(keys.try_recv().is_err(), "rung once per sleep");
        assert!(!mb.try_sleep(), "messages queued: it may not sleep");
        while mb.pop().is_some() {}
        // A freeze asked for while it sleeps wakes it; one asked before keeps it awake.
        assert!(mb.try_sleep());
        mb.request_freeze();
        assert_eq!(keys.try_recv().ok(), Some(key));
        assert!(!mb.try_sleep(), "a freeze waits to be served");
        mb.cancel_freeze();
        // A close wakes it too, and a closed mailbox does not sleep.
        assert!(mb.try_sleep());
        let _ = mb.close();
        assert_eq!(keys.try_recv().ok(), Some(key));
        assert!(!mb.try_sleep());
    }

    #[test]
    fn the_sweep_asks_a_runner_to_sleep_after_two_quiet_rounds() {
        let (bell, _keys) = Bell::new();
        let mb = Mailbox::<u32>::new(ServiceId::from_parts(0, 1), KindKey::new("k", 1), 4)
            .sleeping_with(Some(bell));
        mb.idle_round();
        assert!(!mb.sleep_asked(), "one round is not idle enough");
        mb.active();
        mb.idle_round();
        assert!(!mb.sleep_asked(), "a message taken starts the count again");
        mb.idle_round();
        assert!(mb.sleep_asked());
        // Without a bell (sleeping off, or a replicated kind) nothing sleeps.
        let never = Mailbox::<u32>::new(ServiceId::from_parts(0, 2), KindKey::new("k", 1), 4);
        never.idle_round();
        never.idle_round();
        assert!(!never.sleep_asked());
        assert!(!never.try_sleep());
    }
}
