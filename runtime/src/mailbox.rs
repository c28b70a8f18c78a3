//! The runtime-owned mailbox: a bounded queue the runtime can read back as data.
//!
//! actix keeps its queued envelopes to itself; a service that must migrate with its queue needs
//! a queue the runtime owns. Pushing never blocks and never drops: a full mailbox is an error to
//! the sender, who may also wait for room.

use std::any::Any;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Notify;

use crate::error::DeliveryError;
use tern_proto::ids::{KindKey, NodeName, ServiceId};
use tern_proto::seq::{Offer, Watermark, Window};
use tern_proto::wire::CarriedMsg;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of the runtime's locks leaves plain data behind (queues,
    // tables); carrying on is better than poisoning every later sender.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where the answer to a queued request goes.
#[derive(Clone, Debug)]
pub(crate) struct AskOrigin {
    /// Node waiting for the reply.
    pub node: NodeName,
    /// Ask id on that node.
    pub ask: u64,
}

/// Who sent a message and where it stands in that sender's channel to the receiver; the ask id
/// (on the sender's node) when it is a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Meta {
    pub from: Option<ServiceId>,
    pub seq: u64,
    pub ask: Option<u64>,
}

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

struct State<M> {
    queue: VecDeque<Envelope<M>>,
    closed: bool,
    /// Set when the service has moved away: pushes are handed back with its new place.
    moved: Option<(NodeName, u64)>,
    /// Per numbered sender, the receive window: releases in order, holds early messages,
    /// drops copies. Keyed by ids peers choose, hence a tree rather than a fast hash map.
    windows: BTreeMap<ServiceId, Window<Envelope<M>>>,
    /// Some while a restored copy waits for the rest of its carried queue and its start:
    /// arrivals wait here, in arrival order, so none overtakes a carried message.
    parked: Option<Parked<M>>,
    /// Messages handed over in a snapshot not yet committed: they still count against the
    /// capacity, so a freeze does not let a second mailbox-full in behind them.
    handed_over: usize,
    /// Messages held early in the windows (reported, not counted against the capacity).
    early: usize,
    /// Between the snapshot and the decision: the windows are exported, so a declared gap
    /// waits for the outcome (see [`Mailbox::skip_through`]).
    frozen: bool,
    /// Per numbered sender, the last number taken for handling and the node it came from
    /// (`None`: this node), with whether that node has been told. One entry per sender, like
    /// the windows.
    handled: BTreeMap<ServiceId, Handled>,
    /// Marks not yet told that a newer mark from another node replaced (the sender moved):
    /// each node settles only what it sent. Bounded by [`HANDLED_MOVED_MAX`].
    handled_moved: Vec<(ServiceId, u64, Option<NodeName>)>,
    /// The last sender's mark, kept out of `handled` until another sender's message is taken.
    recent: Option<(ServiceId, Handled)>,
}

/// Replaced marks kept for telling; past this the oldest goes (its sender's node then keeps
/// those messages outstanding until a later mark or a node loss declares them).
const HANDLED_MOVED_MAX: usize = 1024;

/// One sender's progress at a receiver, for its node's delivery ledger.
struct Handled {
    seq: u64,
    origin: Option<NodeName>,
    told: bool,
}

/// A declared gap could not be applied now (the mailbox is frozen, moving or a restored copy
/// not yet started); the node tries again.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NotNow;

/// How a message comes to a mailbox.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Admit {
    /// A sender that does not wait: a full mailbox refuses and consumes the number.
    Tell,
    /// A sender that waits for room: a full mailbox refuses, the number stays open.
    Wait,
    /// Accepted earlier (parked at a restored copy): no capacity check.
    Accepted,
    /// Handed on by another node (a commit's leftovers, a tombstone): its sender may have
    /// been told it was taken, so it may go past the capacity, up to twice it.
    Forwarded,
}

impl<M> State<M> {
    /// Files `from`'s newest mark; an unreported older one from another node is kept for
    /// telling that node.
    fn store_mark(&mut self, from: ServiceId, mark: Handled) {
        match self.handled.get_mut(&from) {
            Some(h) => {
                let old = std::mem::replace(h, mark);
                if !old.told && old.origin != h.origin {
                    if self.handled_moved.len() >= HANDLED_MOVED_MAX {
                        self.handled_moved.remove(0);
                    }
                    self.handled_moved.push((from, old.seq, old.origin));
                }
            }
            None => {
                self.handled.insert(from, mark);
            }
        }
    }

    /// Messages waiting: queued, and parked at a restored copy.
    fn depth(&self) -> usize {
        self.queue.len() + self.handed_over + self.parked.as_ref().map_or(0, |p| p.msgs.len())
    }

    /// Queues messages a window released after a gap closed or a number was skipped.
    fn release(&mut self, items: Vec<Envelope<M>>) {
        self.early = self.early.saturating_sub(items.len());
        self.queue.extend(items);
    }
}

/// Arrivals at a restored copy before it may take them.
struct Parked<M> {
    msgs: VecDeque<Envelope<M>>,
    /// Numbers refused while parked (the parking was full), skipped when the gate opens.
    skips: Vec<(ServiceId, u64)>,
    carried_done: bool,
    started: bool,
}

/// Early messages held per sender window.
pub(crate) const WINDOW_HELD_MAX: usize = 4096;
/// Arrivals parked at a restored copy before it starts.
pub(crate) const PARKED_MAX: usize = 65_536;

/// What a window export of one sender holds: next number, early messages, skipped numbers.
pub(crate) struct WindowExport<T> {
    pub from: ServiceId,
    pub next: u64,
    pub early: Vec<T>,
    pub skipped: Vec<u64>,
}

/// What a commit hands on from the source: the arrivals since the snapshot, in order, then
/// early messages and skipped numbers still in its windows.
pub(crate) struct Leftovers<M> {
    pub queue: Vec<Envelope<M>>,
    pub early: Vec<Envelope<M>>,
    pub skipped: Vec<(ServiceId, u64)>,
}

/// A bounded, runtime-owned queue for one service.
pub(crate) struct Mailbox<M> {
    pub id: ServiceId,
    pub kind: KindKey,
    pub capacity: usize,
    state: Mutex<State<M>>,
    ready: Notify,
    space: Notify,
    space_waiters: AtomicUsize,
    /// Set by the node to ask the runner to freeze after the message in hand.
    pub freeze: std::sync::atomic::AtomicBool,
    /// Copies dropped by the windows.
    pub duplicates: AtomicUsize,
    /// Set when a handled mark has not been reported to its sender's node yet.
    handled_dirty: AtomicBool,
}

impl<M> Mailbox<M> {
    pub fn new(id: ServiceId, kind: KindKey, capacity: usize) -> Self {
        assert!(capacity > 0, "mailbox capacity must be positive");
        Mailbox {
            id,
            kind,
            capacity,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                closed: false,
                moved: None,
                windows: BTreeMap::new(),
                parked: None,
                handed_over: 0,
                early: 0,
                frozen: false,
                handled: BTreeMap::new(),
                handled_moved: Vec::new(),
                recent: None,
            }),
            ready: Notify::new(),
            space: Notify::new(),
            space_waiters: AtomicUsize::new(0),
            freeze: std::sync::atomic::AtomicBool::new(false),
            duplicates: AtomicUsize::new(0),
            handled_dirty: AtomicBool::new(false),
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
        let mb = Self::new(id, kind, capacity);
        {
            let mut st = lock(&mb.state);
            for w in windows {
                let mut win = Window::from_watermark(Watermark(w.next.max(1)), WINDOW_HELD_MAX);
                for env in w.early {
                    let seq = env.seq;
                    let _ = win.offer(seq, env);
                }
                for seq in w.skipped {
                    let _ = win.skip(seq);
                }
                st.early += win.held();
                st.windows.insert(w.from, win);
            }
            st.parked = Some(Parked {
                msgs: VecDeque::new(),
                skips: Vec::new(),
                carried_done: false,
                started: false,
            });
        }
        mb
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
        let queued = {
            let mut st = lock(&self.state);
            self.admit(&mut st, env, mode)?
        };
        if queued {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// [`push_with`](Self::push_with) for a sender that does not wait.
    #[cfg(test)]
    #[allow(clippy::result_large_err)]
    pub fn push(&self, env: Envelope<M>) -> Result<(), (DeliveryError, Envelope<M>)> {
        self.push_with(env, false)
    }

    /// The admission rules, under the lock. Ok(true) when something was queued.
    #[allow(clippy::result_large_err)]
    fn admit(
        &self,
        st: &mut State<M>,
        env: Envelope<M>,
        mode: Admit,
    ) -> Result<bool, (DeliveryError, Envelope<M>)> {
        if st.closed {
            return Err((DeliveryError::Stopped { id: self.id }, env));
        }
        if let Some((node, epoch)) = &st.moved {
            return Err((
                DeliveryError::Moved {
                    id: self.id,
                    node: node.clone(),
                    epoch: *epoch,
                },
                env,
            ));
        }
        let depth = st.depth();
        if let Some(p) = st.parked.as_mut() {
            // Parked arrivals count against the capacity like queued ones.
            let full = match mode {
                Admit::Accepted => false,
                Admit::Forwarded => depth >= 2 * self.capacity,
                Admit::Tell | Admit::Wait => depth >= self.capacity,
            };
            if full || p.msgs.len() >= PARKED_MAX {
                if let (Some(from), Admit::Tell) = (env.from, mode) {
                    if p.skips.len() < PARKED_MAX {
                        p.skips.push((from, env.seq));
                    }
                }
                return Err((self.full(), env));
            }
            p.msgs.push_back(env);
            return Ok(false);
        }
        let full = match mode {
            Admit::Accepted => false,
            Admit::Forwarded => depth >= 2 * self.capacity,
            Admit::Tell | Admit::Wait => depth >= self.capacity,
        };
        let Some(from) = env.from else {
            if full {
                return Err((self.full(), env));
            }
            st.queue.push_back(env);
            return Ok(true);
        };
        let w = st
            .windows
            .entry(from)
            .or_insert_with(|| Window::new(WINDOW_HELD_MAX));
        let seq = env.seq;
        if seq < w.watermark().0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        // Early messages are bounded by the window, not the capacity: they wait on a message
        // that comes another way, and must never hold up the stream that brings it.
        if full && seq == w.watermark().0 {
            // Only a waiting sender keeps its number open (it tries again).
            if mode != Admit::Wait {
                let released = w.skip(seq);
                st.release(released);
            }
            return Err((self.full(), env));
        }
        if w.take_in_order(seq) {
            st.queue.push_back(env);
            return Ok(true);
        }
        // Messages taken once already are never refused: their count is bounded where they
        // were taken (a mailbox's capacity, its parking).
        match w.offer_bounded(seq, env, mode != Admit::Accepted) {
            Offer::Release(items) => {
                // All but the offered one were held early.
                st.early = st.early.saturating_sub(items.len() - 1);
                st.queue.extend(items);
                Ok(true)
            }
            Offer::Held => {
                st.early += 1;
                Ok(false)
            }
            Offer::Duplicate => {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                Ok(false)
            }
            Offer::Full(env) if mode == Admit::Wait => {
                // A waiting sender far ahead of a gap waits for it to close, number kept.
                Err((
                    DeliveryError::WindowFull {
                        id: self.id,
                        held_max: WINDOW_HELD_MAX,
                    },
                    env,
                ))
            }
            Offer::Full(env) => {
                let released = w.skip(seq);
                let queued = !released.is_empty();
                st.release(released);
                if queued {
                    self.ready.notify_one();
                }
                Err((
                    DeliveryError::WindowFull {
                        id: self.id,
                        held_max: WINDOW_HELD_MAX,
                    },
                    env,
                ))
            }
        }
    }

    fn full(&self) -> DeliveryError {
        DeliveryError::MailboxFull {
            id: self.id,
            capacity: self.capacity,
        }
    }

    /// Consumes number `seq` of `from` without a message (it could not be decoded).
    pub fn skip_number(&self, from: ServiceId, seq: u64) {
        let queued = {
            let mut st = lock(&self.state);
            let st = &mut *st;
            if let Some(p) = st.parked.as_mut() {
                if p.skips.len() < PARKED_MAX {
                    p.skips.push((from, seq));
                }
                false
            } else {
                let released = st
                    .windows
                    .entry(from)
                    .or_insert_with(|| Window::new(WINDOW_HELD_MAX))
                    .skip(seq);
                let queued = !released.is_empty();
                st.release(released);
                queued
            }
        };
        if queued {
            self.ready.notify_one();
        }
    }

    /// Freeze, source side: takes the queue and exports the windows (early messages encoded by
    /// `encode`, and left in place: they are handed on again at commit, as copies).
    pub fn take_for_snapshot<T>(
        &self,
        encode: impl Fn(&Envelope<M>) -> T,
    ) -> (VecDeque<Envelope<M>>, Vec<WindowExport<T>>) {
        let mut st = lock(&self.state);
        let queue = std::mem::take(&mut st.queue);
        st.handed_over = queue.len();
        st.frozen = true;
        let windows = st
            .windows
            .iter()
            .map(|(from, w)| WindowExport {
                from: *from,
                next: w.watermark().0,
                early: w.held_items().map(&encode).collect(),
                skipped: w.skipped_ahead().collect(),
            })
            .collect();
        drop(st);
        (queue, windows)
    }

    /// Abort, source side: the queue handed over goes back in front of what arrived meanwhile.
    pub fn put_back(&self, mut queue: VecDeque<Envelope<M>>) {
        {
            let mut st = lock(&self.state);
            st.handed_over = 0;
            st.frozen = false;
            queue.append(&mut st.queue);
            st.queue = queue;
        }
        self.ready.notify_one();
    }

    /// Commit, source side: from now on pushes are handed back with the new place; returns
    /// what must follow the snapshot to the target.
    pub fn retire(&self, node: NodeName, epoch: u64) -> Leftovers<M> {
        let left = {
            let mut st = lock(&self.state);
            st.moved = Some((node, epoch));
            st.handed_over = 0;
            st.early = 0;
            let queue: Vec<Envelope<M>> = st.queue.drain(..).collect();
            let mut early = Vec::new();
            let mut skipped = Vec::new();
            for (from, w) in std::mem::take(&mut st.windows) {
                skipped.extend(w.skipped_ahead().map(|seq| (from, seq)));
                early.extend(w.into_held_items());
            }
            Leftovers {
                queue,
                early,
                skipped,
            }
        };
        self.ready.notify_one();
        self.space.notify_waiters();
        left
    }

    /// Restored copy: a carried message, already released by the source's windows.
    pub fn push_carried(&self, env: Envelope<M>) {
        lock(&self.state).queue.push_back(env);
        self.ready.notify_one();
    }

    /// Restored copy: the carried queue is complete. Returns parked arrivals the windows
    /// refused when the gate opened, for their senders to be told.
    pub fn carried_done(&self) -> Vec<(DeliveryError, Envelope<M>)> {
        self.open_gate(|p| p.carried_done = true)
    }

    /// Restored copy: it may run. Returns refusals as [`carried_done`](Self::carried_done).
    pub fn start(&self) -> Vec<(DeliveryError, Envelope<M>)> {
        self.open_gate(|p| p.started = true)
    }

    /// True while arrivals are parked (a restored copy not yet started or not yet complete).
    pub fn is_gated(&self) -> bool {
        lock(&self.state).parked.is_some()
    }

    fn open_gate(&self, mark: impl FnOnce(&mut Parked<M>)) -> Vec<(DeliveryError, Envelope<M>)> {
        let mut refused = Vec::new();
        {
            let mut st = lock(&self.state);
            let Some(p) = st.parked.as_mut() else {
                return refused;
            };
            mark(p);
            if !(p.carried_done && p.started) {
                return refused;
            }
            let Some(p) = st.parked.take() else {
                return refused;
            };
            for (from, seq) in p.skips {
                let released = st
                    .windows
                    .entry(from)
                    .or_insert_with(|| Window::new(WINDOW_HELD_MAX))
                    .skip(seq);
                st.release(released);
            }
            for env in p.msgs {
                // Accepted already: through the windows, past the capacity check.
                if let Err(r) = self.admit(&mut st, env, Admit::Accepted) {
                    refused.push(r);
                }
            }
        }
        self.ready.notify_one();
        refused
    }

    /// Aborted copy: closes the mailbox, drops the carried queue (the source still has it) and
    /// returns the arrivals that were parked, to go on to the source.
    pub fn discard(&self) -> Vec<Envelope<M>> {
        self.discard_all().1
    }

    /// Orphaned copy: closes the mailbox and returns its carried queue and parked arrivals.
    pub fn discard_all(&self) -> (Vec<Envelope<M>>, Vec<Envelope<M>>) {
        let out = {
            let mut st = lock(&self.state);
            st.closed = true;
            let carried = st.queue.drain(..).collect();
            let parked = st.parked.take().map(|p| p.msgs.into()).unwrap_or_default();
            (carried, parked)
        };
        self.ready.notify_one();
        self.space.notify_waiters();
        out
    }

    /// Returns once the receive window of `from` can hold another early message (or the
    /// mailbox closed or moved). Woken like [`wait_room`](Self::wait_room), by pops.
    pub async fn wait_window(&self, from: ServiceId) {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.space_waiters.fetch_add(1, Ordering::SeqCst);
            let room = {
                let st = lock(&self.state);
                st.closed
                    || st.moved.is_some()
                    || st
                        .windows
                        .get(&from)
                        .is_none_or(|w| w.held() < WINDOW_HELD_MAX)
            };
            if !room {
                notified.await;
            }
            self.space_waiters.fetch_sub(1, Ordering::SeqCst);
            if room {
                return;
            }
        }
    }

    /// Returns once the mailbox has room (or is closed).
    pub async fn wait_room(&self) {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.space_waiters.fetch_add(1, Ordering::SeqCst);
            let room = {
                let st = lock(&self.state);
                st.closed || st.depth() < self.capacity
            };
            if !room {
                notified.await;
            }
            self.space_waiters.fetch_sub(1, Ordering::SeqCst);
            if room {
                return;
            }
        }
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
        let mut newly_dirty = false;
        let (env, left) = {
            let mut st = lock(&self.state);
            let env = st.queue.pop_front();
            if let Some(Envelope {
                from: Some(from),
                seq,
                origin,
                ..
            }) = &env
            {
                // The common case (the same sender as the last pop) touches only the cache.
                match &mut st.recent {
                    Some((f, h)) if *f == *from && h.origin == *origin => {
                        h.seq = *seq;
                        h.told = false;
                    }
                    _ => {
                        let mark = Handled {
                            seq: *seq,
                            origin: origin.clone(),
                            told: false,
                        };
                        if let Some((f, h)) = st.recent.replace((*from, mark)) {
                            st.store_mark(f, h);
                        }
                    }
                }
                if !self.handled_dirty.load(Ordering::Relaxed) {
                    self.handled_dirty.store(true, Ordering::Relaxed);
                    newly_dirty = true;
                }
            }
            (env, st.depth())
        };
        if env.is_some()
            && left <= self.capacity / 2
            && self.space_waiters.load(Ordering::SeqCst) > 0
        {
            self.space.notify_waiters();
        }
        (env, newly_dirty)
    }

    /// Waits until a push may have happened.
    pub async fn wait_ready(&self) {
        self.ready.notified().await
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// The senders whose progress changed since the last call: `(sender, last number taken,
    /// its node)`. Cheap when nothing changed.
    pub fn take_handled(&self) -> Vec<(ServiceId, u64, Option<NodeName>)> {
        if !self.handled_dirty.swap(false, Ordering::Relaxed) {
            return Vec::new();
        }
        let mut st = lock(&self.state);
        if let Some((f, h)) = st.recent.take() {
            st.store_mark(f, h);
        }
        let mut out = std::mem::take(&mut st.handled_moved);
        out.extend(
            st.handled
                .iter_mut()
                .filter(|(_, h)| !h.told)
                .map(|(from, h)| {
                    h.told = true;
                    (*from, h.seq, h.origin.clone())
                }),
        );
        out
    }

    /// The numbers of `from` up to `through` that have not arrived never will: the window
    /// stops waiting for them and releases what waited behind them. Refused with [`NotNow`]
    /// while the windows are in a snapshot or parked (frozen, moving, a copy not yet started).
    pub fn skip_through(&self, from: ServiceId, through: u64) -> Result<(), NotNow> {
        let queued = {
            let mut st = lock(&self.state);
            if st.frozen || st.moved.is_some() || st.parked.is_some() || st.closed {
                return Err(NotNow);
            }
            let released = st
                .windows
                .entry(from)
                .or_insert_with(|| Window::new(WINDOW_HELD_MAX))
                .skip_through(through);
            let queued = !released.is_empty();
            st.release(released);
            queued
        };
        if queued {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Closes the mailbox and returns what was still queued, oldest first.
    pub fn close(&self) -> Vec<Envelope<M>> {
        let rest = {
            let mut st = lock(&self.state);
            st.closed = true;
            st.queue.drain(..).collect()
        };
        self.ready.notify_one();
        self.space.notify_waiters();
        rest
    }

    pub fn len(&self) -> usize {
        lock(&self.state).queue.len()
    }
}

/// A commit's leftovers, encoded: each message, or why it could not be encoded; then the
/// numbers refused since the snapshot, `(sender, seq)`.
pub(crate) type EncodedLeftovers = (Vec<Result<CarriedMsg, Box<Refusal>>>, Vec<(ServiceId, u64)>);

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
    Ok(CarriedMsg {
        from: env.from,
        seq: env.seq,
        ask: env.ask.as_ref().map(|a| (a.node.clone(), a.ask)),
        origin: env.origin.clone(),
        msg: rmp_serde::to_vec(&env.msg).map_err(|e| DeliveryError::Encode(e.to_string()))?,
    })
}

pub(crate) fn decode_envelope<M: DeserializeOwned>(
    id: ServiceId,
    kind: &KindKey,
    c: &CarriedMsg,
) -> Result<Envelope<M>, DeliveryError> {
    let msg: M = rmp_serde::from_slice(&c.msg).map_err(|e| DeliveryError::BadMessage {
        id,
        kind: kind.clone(),
        detail: e.to_string(),
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
        msgs: &[&serde_bytes::Bytes],
        start: usize,
    ) -> (usize, Option<DeliveryError>);
    /// A message handed on by another node (see `Admit::Forwarded`).
    fn deliver_forwarded(
        &self,
        msg: &CarriedMsg,
        origin: &NodeName,
        hand: crate::migrate::Hand,
    ) -> Result<(), DeliveryError>;
    /// Commit, source side: marks the mailbox moved and returns what must follow the snapshot,
    /// encoded: arrivals since the snapshot in order, early messages, skipped numbers.
    fn retire_encoded(&self, node: NodeName, epoch: u64) -> EncodedLeftovers;
    /// Restored copy: one carried message.
    fn deliver_carried(&self, msg: &CarriedMsg) -> Result<(), DeliveryError>;
    /// Restored copy: the carried queue is complete.
    fn carried_complete(&self) -> Vec<Refusal>;
    /// Consumes a number whose message could not be taken at all.
    fn skip(&self, from: ServiceId, seq: u64);
    /// See [`Mailbox::skip_through`].
    fn skip_through(&self, from: ServiceId, through: u64) -> Result<(), NotNow>;
    /// See [`Mailbox::take_handled`].
    fn take_handled(&self) -> Vec<(ServiceId, u64, Option<NodeName>)>;
    /// Asks the runner to freeze after the message in hand.
    fn request_freeze(&self);
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
        self.len()
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn deliver_bytes(
        &self,
        meta: Meta,
        (asker, origin): (&NodeName, &NodeName),
        wait: bool,
        bytes: &[u8],
    ) -> Result<(), DeliveryError> {
        let msg: M = match rmp_serde::from_slice(bytes) {
            Ok(m) => m,
            Err(e) => {
                if let Some(from) = meta.from {
                    self.skip_number(from, meta.seq);
                }
                return Err(DeliveryError::BadMessage {
                    id: self.id,
                    kind: self.kind.clone(),
                    detail: e.to_string(),
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
        msgs: &[&serde_bytes::Bytes],
        start: usize,
    ) -> (usize, Option<DeliveryError>) {
        let mode = if wait { Admit::Wait } else { Admit::Tell };
        let mut next = start;
        let mut queued = false;
        let stopped = {
            let mut st = lock(&self.state);
            loop {
                if next == msgs.len() {
                    break None;
                }
                // The caller checked that the numbering does not overflow.
                let seq = if from.is_some() {
                    first_seq + next as u64
                } else {
                    first_seq
                };
                let msg: M = match rmp_serde::from_slice(msgs[next]) {
                    Ok(m) => m,
                    Err(e) => {
                        if let Some(from) = from {
                            let released = st
                                .windows
                                .entry(from)
                                .or_insert_with(|| Window::new(WINDOW_HELD_MAX))
                                .skip(seq);
                            queued |= !released.is_empty();
                            st.release(released);
                        }
                        break Some(DeliveryError::BadMessage {
                            id: self.id,
                            kind: self.kind.clone(),
                            detail: e.to_string(),
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
                match self.admit(&mut st, env, mode) {
                    Ok(q) => queued |= q,
                    Err((e, _)) => break Some(e),
                }
                next += 1;
            }
        };
        if queued {
            self.ready.notify_one();
        }
        (next, stopped)
    }

    fn deliver_forwarded(
        &self,
        msg: &CarriedMsg,
        origin: &NodeName,
        hand: crate::migrate::Hand,
    ) -> Result<(), DeliveryError> {
        let env = match decode_envelope::<M>(self.id, &self.kind, msg) {
            Ok(mut env) => {
                env.origin.get_or_insert_with(|| origin.clone());
                env
            }
            Err(e) => {
                if let Some(from) = msg.from {
                    self.skip_number(from, msg.seq);
                }
                return Err(e);
            }
        };
        let queued = {
            let mut st = lock(&self.state);
            // A waiting sender's message waits like a direct one; one taken already is never
            // refused for room; others may go past the capacity, up to twice it.
            let mode = match hand {
                crate::migrate::Hand::Wait => Admit::Wait,
                crate::migrate::Hand::Accepted => Admit::Accepted,
                crate::migrate::Hand::Tell => Admit::Forwarded,
            };
            self.admit(&mut st, env, mode).map_err(|(e, _)| e)?
        };
        if queued {
            self.ready.notify_one();
        }
        Ok(())
    }

    fn retire_encoded(&self, node: NodeName, epoch: u64) -> EncodedLeftovers {
        let left = self.retire(node, epoch);
        let msgs = left
            .queue
            .into_iter()
            .chain(left.early)
            .map(|env| encode_envelope(&env).map_err(|e| Box::new(env.refusal(e))))
            .collect();
        (msgs, left.skipped)
    }

    fn deliver_carried(&self, msg: &CarriedMsg) -> Result<(), DeliveryError> {
        self.push_carried(decode_envelope(self.id, &self.kind, msg)?);
        Ok(())
    }

    fn carried_complete(&self) -> Vec<Refusal> {
        self.carried_done()
            .into_iter()
            .map(|(reason, env)| env.refusal(reason))
            .collect()
    }

    fn skip(&self, from: ServiceId, seq: u64) {
        self.skip_number(from, seq);
    }

    fn skip_through(&self, from: ServiceId, through: u64) -> Result<(), NotNow> {
        Mailbox::skip_through(self, from, through)
    }

    fn take_handled(&self) -> Vec<(ServiceId, u64, Option<NodeName>)> {
        Mailbox::take_handled(self)
    }

    fn request_freeze(&self) {
        self.freeze.store(true, Ordering::SeqCst);
        self.ready.notify_one();
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
}
