//! Typed, location-transparent handles to services.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::error::{AskError, DeliveryError};
use crate::mailbox::{lock, Envelope, Mailbox, Meta};
use crate::node::NodeShared;
use crate::service::{ReplyTo, Service};
use crate::transport::PeerLink;
use tern_proto::ids::{NodeName, ServiceAddr, ServiceId};
use tern_proto::ledger::Ledger;
use tern_proto::replica::Retained;

pub(crate) enum Route<M> {
    Local(Arc<Mailbox<M>>),
    Remote(Arc<PeerLink>),
}

impl<M> Clone for Route<M> {
    fn clone(&self) -> Self {
        match self {
            Route::Local(m) => Route::Local(m.clone()),
            Route::Remote(l) => Route::Remote(l.clone()),
        }
    }
}

/// The copies a channel keeps: per message, its ask (if one) and its encoding.
type KeptCopies = Retained<(Option<u64>, Vec<u8>)>;

/// Where a channel's messages go now.
struct ChanState<M> {
    route: Route<M>,
    node: NodeName,
    epoch: u64,
    /// Last number used by senders outside any service.
    client_seq: u64,
    /// The delivery ledger: per sender on this node, what it sent that the service has not yet
    /// been seen to take. One entry per sender with messages outstanding.
    ledger: Ledger,
    /// A copy of each message not yet confirmed (its ask, and its encoding): for a
    /// replicated service, of every message, sent again when the service is found elsewhere
    /// (taken over by its standby; its window there drops the copies it already took); for
    /// any service, of the tells a replicated service here sent, which its checkpoints carry
    /// (`KeptOutput`). Made at the first copy.
    /// (Boxed: most channels never keep a copy, and every one pays for the field.)
    retained: Option<Box<KeptCopies>>,
    /// The service is replicated.
    replicated: bool,
}

/// Messages declared lost with a node: `first..=last` of `sender` to `service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LostRange {
    pub service: ServiceId,
    pub sender: ServiceId,
    pub first: u64,
    pub last: u64,
    /// Where the channel points now, to be told of the gap.
    pub now_at: NodeName,
}

/// The path from this node to one service, shared by every handle to it made on this node.
/// The node rewrites it when the service moves (channel rebuild), so handles follow.
pub(crate) struct Channel<M> {
    id: ServiceId,
    /// The sender id of messages sent from outside any service through this channel.
    client: ServiceId,
    state: Mutex<ChanState<M>>,
    /// Woken when kept copies are let go: a sender waiting for room looks again. Made by the
    /// first sender that waits, before it looks under the state's lock (where copies are let
    /// go), so a release after its look finds it: only channels of replicated services keep
    /// copies, and every channel pays for the field (16 bytes instead of 32).
    room: std::sync::OnceLock<Box<tokio::sync::Notify>>,
}

/// A channel seen without its message type, for the node's table.
pub(crate) trait AnyChannel: Send + Sync + 'static {
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
    /// Points the channel at `node` if `epoch` is newer than what it knows. True if it moved.
    fn relocate(&self, shared: &NodeShared, node: &NodeName, epoch: u64) -> bool;
    /// Where the channel points.
    fn location(&self) -> (NodeName, u64);
    /// The service confirmed taking `sender`'s messages up to `seq`.
    fn settle(&self, sender: ServiceId, seq: u64);
    /// Node `node` says the service took `sender`'s messages up to `seq`: settled if `node`
    /// may say so (`Ledger::may_settle`); false, changing nothing, if not.
    fn settle_from(&self, node: &NodeName, sender: ServiceId, seq: u64) -> bool;
    /// Number `seq` of `sender` was refused and its sender told: no longer outstanding.
    fn refused(&self, sender: ServiceId, seq: u64);
    /// Node `lost` is gone: every outstanding message that went there, or that the service
    /// (now there) had not confirmed, is declared lost and leaves the ledger.
    fn declare_lost(&self, lost: &NodeName) -> Vec<LostRange>;
    /// The skips and gaps sent for this channel's service and not yet seen passed.
    fn unconfirmed(&self) -> Vec<tern_proto::ledger::Unconfirmed>;
    /// Messages sent through this channel and not yet confirmed.
    fn outstanding(&self) -> u64;
    /// True when the channel keeps copies of what it sends (its service is replicated).
    fn retains(&self) -> bool;
    /// True when the channel keeps a copy of `sender`'s message `seq` (its service is
    /// replicated).
    fn keeps(&self, sender: ServiceId, seq: u64) -> bool;
    /// The copies kept of the tells replicated service `sender` sent, in order, for its
    /// checkpoint.
    fn outputs_of(&self, sender: ServiceId) -> Vec<tern_proto::wire::KeptOutput>;
    /// Sends again, in order, the tells replicated service `sender` sent through another node
    /// (carried by the checkpoint it was taken over from), keeping copies of them as of its own
    /// messages. The count queued.
    fn send_outputs(
        &self,
        shared: &NodeShared,
        sender: ServiceId,
        outputs: Vec<tern_proto::wire::KeptOutput>,
    ) -> usize;
}

impl<M: Send + 'static> Channel<M> {
    pub(crate) fn new(
        id: ServiceId,
        client: ServiceId,
        route: Route<M>,
        node: NodeName,
        epoch: u64,
    ) -> Self {
        Channel {
            id,
            client,
            state: Mutex::new(ChanState {
                route,
                node,
                epoch,
                client_seq: 0,
                ledger: Ledger::default(),
                retained: None,
                replicated: false,
            }),
            room: std::sync::OnceLock::new(),
        }
    }

    fn repoint(&self, st: &mut ChanState<M>, shared: &NodeShared, node: &NodeName, epoch: u64) {
        let route = if node == shared.name() {
            match shared
                .slot(self.id)
                .map(|s| s.into_any().downcast::<Mailbox<M>>())
            {
                Some(Ok(mb)) => Route::Local(mb),
                _ => return,
            }
        } else {
            match shared.links.get(node) {
                Some(link) => Route::Remote(link),
                None => return,
            }
        };
        st.route = route;
        st.node = node.clone();
        st.epoch = st.epoch.max(epoch);
        st.ledger.repointed(node);
        // A replicated service's unconfirmed messages go again to where it is now: another
        // node, or this one (its standby here took it over).
        let Some(kept) = st.retained.as_ref().filter(|_| st.replicated) else {
            return;
        };
        let local = match &st.route {
            Route::Local(_) => shared.slot(self.id),
            Route::Remote(_) => None,
        };
        let mut again = 0u64;
        for (sender, seq, (ask, bytes)) in kept.all() {
            let meta = Meta {
                from: Some(sender),
                seq,
                ask: *ask,
                keep: false,
            };
            let sent = match (&st.route, &local) {
                (Route::Remote(link), _) => {
                    link.deliver_encoded(self.id, meta, false, bytes).is_ok()
                }
                (Route::Local(_), Some(slot)) => slot
                    .deliver_bytes(meta, (shared.name(), shared.name()), false, bytes)
                    .is_ok(),
                (Route::Local(_), None) => false,
            };
            if sent {
                again += 1;
            }
        }
        if again > 0 {
            shared.stats.resent_to_replicas.add(again);
        }
    }

    /// Keeps copies of what is sent to another node until it is confirmed: the service is
    /// replicated.
    pub(crate) fn retain(&self, max: usize) {
        let mut st = lock(&self.state);
        st.replicated = true;
        if st.retained.is_none() {
            st.retained = Some(Box::new(Retained::new(max)));
        }
    }

    /// True when this channel keeps copies of everything sent (its service is replicated).
    fn retains(&self) -> bool {
        lock(&self.state).replicated
    }

    /// Wakes the senders waiting for room, if any ever waited. Called under the state's lock.
    fn room_made(&self) {
        if let Some(room) = self.room.get() {
            room.notify_waiters();
        }
    }

    /// True unless the kept copies are at their bound.
    fn retains_room(&self) -> bool {
        lock(&self.state)
            .retained
            .as_ref()
            .is_none_or(|k| k.has_room())
    }
}

impl<M: Send + 'static> AnyChannel for Channel<M> {
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }

    fn relocate(&self, shared: &NodeShared, node: &NodeName, epoch: u64) -> bool {
        let mut st = lock(&self.state);
        if epoch <= st.epoch && st.node == *node {
            return false;
        }
        if epoch < st.epoch {
            return false;
        }
        self.repoint(&mut st, shared, node, epoch);
        true
    }

    fn location(&self) -> (NodeName, u64) {
        let st = lock(&self.state);
        (st.node.clone(), st.epoch)
    }

    fn settle(&self, sender: ServiceId, seq: u64) {
        let mut st = lock(&self.state);
        st.ledger.settle(sender, seq);
        if let Some(kept) = &mut st.retained {
            if kept.settle(sender, seq) > 0 {
                self.room_made();
            }
        }
    }

    fn settle_from(&self, node: &NodeName, sender: ServiceId, seq: u64) -> bool {
        let may = {
            let st = lock(&self.state);
            st.node == *node || st.ledger.may_settle(sender, node)
        };
        if may {
            AnyChannel::settle(self, sender, seq);
        }
        may
    }

    fn refused(&self, sender: ServiceId, seq: u64) {
        let mut st = lock(&self.state);
        st.ledger.refused(sender, seq);
        if let Some(kept) = &mut st.retained {
            if kept.forget(sender, seq) {
                self.room_made();
            }
        }
    }

    fn retains(&self) -> bool {
        Channel::retains(self)
    }

    fn keeps(&self, sender: ServiceId, seq: u64) -> bool {
        let st = lock(&self.state);
        st.replicated && st.retained.as_ref().is_some_and(|k| k.holds(sender, seq))
    }

    fn outputs_of(&self, sender: ServiceId) -> Vec<tern_proto::wire::KeptOutput> {
        let st = lock(&self.state);
        let Some(kept) = &st.retained else {
            return Vec::new();
        };
        kept.of(sender)
            .filter(|(_, (ask, _))| ask.is_none())
            .map(|(seq, (_, bytes))| tern_proto::wire::KeptOutput {
                to: self.id,
                seq,
                msg: bytes.clone(),
            })
            .collect()
    }

    fn send_outputs(
        &self,
        shared: &NodeShared,
        sender: ServiceId,
        outputs: Vec<tern_proto::wire::KeptOutput>,
    ) -> usize {
        let mut st = lock(&self.state);
        let max = shared.replicas.settings.retained_per_channel_max;
        let mut sent = 0;
        for out in outputs {
            let meta = Meta {
                from: Some(sender),
                seq: out.seq,
                ask: None,
                keep: false,
            };
            let res = match &st.route {
                Route::Remote(link) => link
                    .deliver_encoded(self.id, meta, false, &out.msg)
                    .map(drop),
                Route::Local(_) => match shared.slot(self.id) {
                    Some(slot) => {
                        slot.deliver_bytes(meta, (shared.name(), shared.name()), false, &out.msg)
                    }
                    None => Err(DeliveryError::UnknownService {
                        id: self.id,
                        node: shared.name().clone(),
                    }),
                },
            };
            if let Err(e) = res {
                // Kept all the same: a replicated receiver found elsewhere gets it again, and
                // a loss of its node reports it.
                tracing::debug!(to = %self.id, from = %sender, seq = out.seq, %e, "carried output not delivered");
            } else {
                sent += 1;
            }
            let ChanState {
                ledger,
                node,
                retained,
                ..
            } = &mut *st;
            ledger.note(sender, out.seq, node);
            retained
                .get_or_insert_with(|| Box::new(Retained::new(max)))
                .adopt(sender, out.seq, (None, out.msg));
        }
        sent
    }

    fn unconfirmed(&self) -> Vec<tern_proto::ledger::Unconfirmed> {
        lock(&self.state).ledger.unconfirmed().to_vec()
    }

    fn declare_lost(&self, lost: &NodeName) -> Vec<LostRange> {
        let mut st = lock(&self.state);
        let here = st.node == *lost;
        let now_at = st.node.clone();
        let ranges = st.ledger.declare_lost(lost, here);
        // Their senders are told: no copy is kept of them any longer.
        if let Some(kept) = st.retained.as_mut() {
            let mut dropped = 0;
            for (sender, first, last) in &ranges {
                dropped += kept.forget_range(*sender, *first, *last);
            }
            if dropped > 0 {
                self.room_made();
            }
        }
        ranges
            .into_iter()
            .map(|(sender, first, last)| LostRange {
                service: self.id,
                sender,
                first,
                last,
                now_at: now_at.clone(),
            })
            .collect()
    }

    fn outstanding(&self) -> u64 {
        lock(&self.state).ledger.outstanding()
    }
}

/// A typed handle to a service: the same code sends to it whether it runs on this node or on
/// another, and keeps working when the service migrates (its node's channel follows it).
///
/// ```no_run
/// # use std::time::Duration;
/// # use serde::{Deserialize, Serialize};
/// # use tern::{Ctx, ReplyTo, Service, ServiceRef};
/// # #[derive(Serialize, Deserialize)] struct Counter { total: u64 }
/// # #[derive(Serialize, Deserialize)] enum CounterMsg { Add(u64), Get(ReplyTo<u64>) }
/// # impl Service for Counter { type Msg = CounterMsg; const KIND: &'static str = "counter";
/// #   const VERSION: u32 = 1; async fn handle(&mut self, _m: CounterMsg, _c: &mut Ctx<Self>) {} }
/// async fn use_it(counter: ServiceRef<Counter>) -> Result<u64, tern::AskError> {
///     counter.tell(CounterMsg::Add(2))?;
///     counter.ask(CounterMsg::Get, Duration::from_secs(1)).await
/// }
/// ```
pub struct ServiceRef<S: Service> {
    addr: ServiceAddr,
    pub(crate) node: Arc<NodeShared>,
    chan: Arc<Channel<S::Msg>>,
}

impl<S: Service> Clone for ServiceRef<S> {
    fn clone(&self) -> Self {
        ServiceRef {
            addr: self.addr.clone(),
            node: self.node.clone(),
            chan: self.chan.clone(),
        }
    }
}

impl<S: Service> fmt::Debug for ServiceRef<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceRef({:?})", self.addr)
    }
}

/// What [`ServiceRef::send_now`] left to do.
pub(crate) enum SendNow<M> {
    /// Queued; nothing to wait for.
    Done,
    /// Queued on a link now holding this many bytes: let it drain before going on.
    Settle(Arc<PeerLink>, usize),
    /// Not queued (no room yet): wait with [`ServiceRef::send_wait`].
    Wait(M),
}

/// A message on its way: it keeps its number across re-routing.
enum Attempt<M> {
    /// Queued: bytes now waiting on the link (0 for a local mailbox), and whether it was local.
    Sent(usize, bool),
    Full(DeliveryError, Route<M>, M),
}

impl<S: Service> From<&ServiceRef<S>> for ServiceId {
    fn from(r: &ServiceRef<S>) -> Self {
        r.id()
    }
}

impl<S: Service> ServiceRef<S> {
    pub(crate) fn new(
        addr: ServiceAddr,
        node: Arc<NodeShared>,
        chan: Arc<Channel<S::Msg>>,
    ) -> Self {
        if S::REPLICAS > 0 {
            chan.retain(node.replicas.settings.retained_per_channel_max);
        }
        ServiceRef { addr, node, chan }
    }

    /// The service's id.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = tv.spawn(Counter::default())?;
    /// // A handle made on another node, from the address, names the same service.
    /// let from_phone = phone.resolve::<Counter>(counter.addr())?;
    /// assert_eq!(from_phone.id(), counter.id());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn id(&self) -> ServiceId {
        self.addr.id
    }

    /// The handle's node and channel, for a sleeping service to keep without its address
    /// (made again from its mailbox when it wakes).
    pub(crate) fn into_parts(self) -> (Arc<NodeShared>, Arc<Channel<S::Msg>>) {
        (self.node, self.chan)
    }

    /// The channel this handle sends through, untyped.
    pub(crate) fn any_channel(&self) -> Arc<dyn AnyChannel> {
        self.chan.clone()
    }

    /// The service's address: id, kind and the node it ran on when this handle was made
    /// (see [`location`](Self::location) for where it runs now). Serializable; turn it back
    /// into a handle with [`NodeHandle::resolve`](crate::NodeHandle::resolve), which follows
    /// the service wherever it went.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = phone.spawn(Counter::default())?;
    /// let addr = counter.addr().clone();
    /// assert_eq!((addr.kind.to_string(), addr.node.as_str()), ("counter@1".into(), "phone"));
    /// // An address travels (it is serializable) and becomes a handle again anywhere.
    /// let again = tv.resolve::<Counter>(&addr)?;
    /// again.tell(CounterMsg::Add(2))?;
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn addr(&self) -> &ServiceAddr {
        &self.addr
    }

    /// The node this handle sends to now.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = phone.spawn(Counter::default())?;
    /// assert_eq!(counter.location().as_str(), "phone");
    /// block_on(counter.migrate("tv", tern::MigrateOptions::default()))?;
    /// assert_eq!(counter.location().as_str(), "tv");
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn location(&self) -> NodeName {
        lock(&self.chan.state).node.clone()
    }

    /// Moves the service to node `to` while it runs, wherever it is now (the handle's node
    /// asks the node that hosts it), as [`NodeHandle::migrate`](crate::NodeHandle::migrate)
    /// does: `Ok` only when it moved, [`Error::NotMoved`](crate::Error::NotMoved) with the
    /// report otherwise. The handle keeps working: it follows the service.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # use tern::MigrateOptions;
    /// # let (phone, tv) = two_nodes()?;
    /// let player = phone.spawn(Counter::default())?;
    /// player.tell(CounterMsg::Add(3))?;
    /// let report = block_on(player.migrate("tv", MigrateOptions::default()))?;
    /// println!("freeze {} us, {} messages carried", report.freeze_us, report.carried);
    /// // The same handle reaches it on the tv, with what it had.
    /// assert_eq!(block_on(player.ask(CounterMsg::Total, SECS_10))?, 3);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn migrate(
        &self,
        to: impl Into<NodeName>,
        opts: crate::MigrateOptions,
    ) -> Result<crate::MigrationReport, crate::Error> {
        crate::node::moved(self.node.migrate(self.addr.id, to.into(), opts).await?)
    }

    /// The sender id this node's handles to the service put on messages sent from outside any
    /// service (what a [`LossReport`](crate::LossReport) names as `sender` for them).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = tv.spawn(Counter::default())?;
    /// let from_phone = phone.resolve::<Counter>(counter.addr())?;
    /// // Every handle on the phone to this service sends as the phone's one client of it.
    /// let other = phone.resolve::<Counter>(counter.addr())?;
    /// assert_eq!(from_phone.sender_id(), other.sender_id());
    /// // A loss report about what the phone sent would name it.
    /// assert!(phone.losses().iter().all(|l| l.sender != from_phone.sender_id()));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn sender_id(&self) -> ServiceId {
        self.chan.client
    }

    /// Messages sent to the service from this node (by handles and services here) that it
    /// has not yet confirmed taking. Confirmations come in batches every few milliseconds.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = tv.spawn(Counter::default())?;
    /// let from_phone = phone.resolve::<Counter>(counter.addr())?;
    /// for n in 1..=100 {
    ///     from_phone.tell(CounterMsg::Add(n))?;
    /// }
    /// // The answer comes after the hundred were taken; their confirmations follow shortly.
    /// let total = block_on(from_phone.ask(CounterMsg::Total, std::time::Duration::from_secs(5)))?;
    /// assert_eq!(total, 5050);
    /// let started = std::time::Instant::now();
    /// while from_phone.unconfirmed() > 0 && started.elapsed().as_secs() < 10 {
    ///     std::thread::sleep(std::time::Duration::from_millis(5));
    /// }
    /// assert_eq!(from_phone.unconfirmed(), 0);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn unconfirmed(&self) -> u64 {
        self.chan.outstanding()
    }

    /// True when the service runs on the node this handle belongs to.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = phone.spawn(Counter::default())?;
    /// assert!(counter.is_local());
    /// block_on(counter.migrate("tv", tern::MigrateOptions::default()))?;
    /// assert!(!counter.is_local(), "it runs on the tv now; the phone's handle follows it");
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_local(&self) -> bool {
        matches!(lock(&self.chan.state).route, Route::Local(_))
    }

    /// Sends `msg`. Fails at once when a local mailbox is full, the service stopped, or the link
    /// to a remote node has no room; a remote refusal comes back asynchronously (counted in
    /// `refused_by_peers` and logged in the node's events).
    ///
    /// Inside a service's handler this is [`Ctx::tell`](crate::Ctx::tell): the message is
    /// numbered in the sending service's channel, so its order holds when that service moves.
    /// Outside any service it is numbered as this node's client, and so is it in a task a
    /// handler spawned (such a task can outlive a move of its service and keep running here:
    /// numbers from the service's counters would clash with those it uses where it went).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = tv.spawn(Counter::default())?;
    /// let from_phone = phone.resolve::<Counter>(counter.addr())?;
    /// from_phone.tell(CounterMsg::Add(40))?;
    /// from_phone.tell(CounterMsg::Add(2))?;
    /// let total = block_on(from_phone.ask(CounterMsg::Total, std::time::Duration::from_secs(5)))?;
    /// assert_eq!(total, 42, "in order, once each");
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn tell(&self, msg: S::Msg) -> Result<(), DeliveryError> {
        match crate::service::numbered_here(self.addr.id) {
            None => self.send(Meta::default(), msg),
            Some(n) => {
                let res = self.send(n.meta, msg);
                if res.is_err() {
                    n.give_back();
                }
                res
            }
        }
    }

    /// Like [`tell`](Self::tell), but waits while the mailbox or the link is full.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = tv.spawn(Counter::default())?;
    /// let from_phone = phone.resolve::<Counter>(counter.addr())?;
    /// // More than a mailbox holds: each waits for room instead of failing.
    /// block_on(async {
    ///     for _ in 0..10_000 {
    ///         from_phone.tell_wait(CounterMsg::Add(1)).await?;
    ///     }
    ///     Ok::<_, tern::DeliveryError>(())
    /// })?;
    /// let total = block_on(from_phone.ask(CounterMsg::Total, std::time::Duration::from_secs(10)))?;
    /// assert_eq!(total, 10_000);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn tell_wait(&self, msg: S::Msg) -> Result<(), DeliveryError> {
        match crate::service::numbered_here(self.addr.id) {
            None => self.send_wait(Meta::default(), msg, None).await,
            Some(n) => {
                let res = self.send_wait(n.meta, msg, None).await;
                if res.is_err() {
                    n.give_back();
                }
                res
            }
        }
    }

    /// Sends a request made by `make` around a reply handle, and waits up to `timeout` for the
    /// answer. A full mailbox makes the request wait for room within the same timeout. Inside
    /// a service's handler it is numbered as the service, as [`tell`](Self::tell) is.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = tv.spawn(Counter::default())?;
    /// let from_phone = phone.resolve::<Counter>(counter.addr())?;
    /// from_phone.tell(CounterMsg::Add(7))?;
    /// // `CounterMsg::Total` is made around the reply handle: `|reply| CounterMsg::Total(reply)`.
    /// let total = block_on(from_phone.ask(CounterMsg::Total, std::time::Duration::from_secs(5)))?;
    /// assert_eq!(total, 7);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn ask<R: DeserializeOwned + Send + 'static>(
        &self,
        make: impl FnOnce(ReplyTo<R>) -> S::Msg,
        timeout: Duration,
    ) -> Result<R, AskError> {
        match crate::service::numbered_here(self.addr.id) {
            None => self.ask_from(Meta::default(), make, timeout).await,
            Some(n) => {
                let (res, sent) = self.ask_sent(n.meta, make, timeout).await;
                if !sent {
                    n.give_back();
                }
                res
            }
        }
    }

    fn count(&self, res: &Result<(), DeliveryError>, local: bool) {
        match res {
            Ok(()) if local => self.node.stats.sent_local.inc(),
            Ok(()) => self.node.stats.sent_remote.inc(),
            Err(_) => self.node.stats.refused_to_senders.inc(),
        }
    }

    /// One attempt under the channel lock: numbers a message from outside any service, follows
    /// the service if its old mailbox says it moved, and gives the number back if nothing was
    /// queued (so no receiver waits for it).
    fn attempt(
        &self,
        meta: Meta,
        wait: bool,
        msg: S::Msg,
    ) -> Result<Attempt<S::Msg>, DeliveryError> {
        let mut st = lock(&self.chan.state);
        let client = meta.from.is_none();
        let meta = if client {
            st.client_seq += 1;
            Meta {
                from: Some(self.chan.client),
                seq: st.client_seq,
                ..meta
            }
        } else {
            meta
        };
        let mut msg = msg;
        // A service moves at most a few times while one message looks for it.
        for _ in 0..8 {
            let (e, back): (DeliveryError, Option<S::Msg>) = match &st.route {
                Route::Local(mb) => {
                    // A replicated service here keeps copies too: if another node takes it
                    // over while this one lives on (a cut), they go there.
                    let copy = match self.copy_to_keep(&st, meta, &msg) {
                        Ok(c) => c,
                        Err(e @ DeliveryError::Unsettled { .. }) => {
                            if client {
                                st.client_seq -= 1;
                            }
                            return if wait {
                                Ok(Attempt::Full(e, st.route.clone(), msg))
                            } else {
                                Err(e)
                            };
                        }
                        Err(e) => {
                            if client {
                                st.client_seq -= 1;
                            }
                            return Err(e);
                        }
                    };
                    let env = Envelope::new(meta, self.node.name(), None, msg);
                    match mb.push_with(env, true) {
                        Ok(()) => {
                            if let Some(bytes) = copy {
                                self.keep_copy(&mut st, meta, bytes);
                            }
                            self.note_sent(&mut st, meta);
                            return Ok(Attempt::Sent(0, true));
                        }
                        Err((DeliveryError::Moved { node, epoch, .. }, env)) => {
                            msg = env.msg;
                            self.chan.repoint(&mut st, &self.node, &node, epoch);
                            continue;
                        }
                        Err((
                            e @ (DeliveryError::MailboxFull { .. }
                            | DeliveryError::WindowFull { .. }),
                            env,
                        )) => (e, Some(env.msg)),
                        Err((e, _)) => (e, None),
                    }
                }
                Route::Remote(link) if Self::copies(&st, meta) => {
                    let link = link.clone();
                    match self.deliver_kept(&mut st, link, meta, wait, &msg) {
                        Ok(queued) => {
                            self.note_sent(&mut st, meta);
                            return Ok(Attempt::Sent(queued, false));
                        }
                        Err(e @ DeliveryError::Backpressure { .. }) => (e, Some(msg)),
                        Err(e @ DeliveryError::Unsettled { .. }) => (e, Some(msg)),
                        Err(e) => (e, None),
                    }
                }
                Route::Remote(link) => match self.deliver_to(link, &st.node, (meta, wait), &msg) {
                    Ok(queued) => {
                        self.note_sent(&mut st, meta);
                        return Ok(Attempt::Sent(queued, false));
                    }
                    Err(e @ DeliveryError::Backpressure { .. }) => (e, Some(msg)),
                    Err(e) => (e, None),
                },
            };
            if client {
                st.client_seq -= 1;
            }
            return match back {
                Some(m) if wait => Ok(Attempt::Full(e, st.route.clone(), m)),
                _ => Err(e),
            };
        }
        if client {
            st.client_seq -= 1;
        }
        Err(DeliveryError::UnknownService {
            id: self.addr.id,
            node: st.node.clone(),
        })
    }

    /// Sends `msg` over `link` to the service on node `at`, written as the version `at` runs
    /// when that is an older one the kind writes ([`Service::DOWNGRADES`]).
    fn deliver_to(
        &self,
        link: &PeerLink,
        at: &NodeName,
        (meta, wait): (Meta, bool),
        msg: &S::Msg,
    ) -> Result<usize, DeliveryError> {
        if !S::DOWNGRADES.is_empty() {
            let older = self
                .node
                .peer_version(S::KIND, at)
                .and_then(crate::service::downgrade_to::<S>);
            if let Some(d) = older {
                let bytes = (d.msg)(msg).map_err(|e| DeliveryError::BadMessage {
                    id: self.addr.id,
                    kind: tern_proto::ids::KindKey::new(S::KIND, d.to),
                    detail: format!("downgrading to version {}: {e}", d.to),
                })?;
                return link.deliver_encoded(self.addr.id, meta, wait, &bytes);
            }
        }
        link.deliver(self.addr.id, meta, wait, msg)
    }

    /// The encoded copy to keep of a message to a replicated service (`None` for any other),
    /// or why none can be kept.
    fn copy_to_keep(
        &self,
        st: &ChanState<S::Msg>,
        meta: Meta,
        msg: &S::Msg,
    ) -> Result<Option<Vec<u8>>, DeliveryError> {
        if !Self::copies(st, meta) {
            return Ok(None);
        }
        if !st.retained.as_ref().is_none_or(|k| k.has_room()) {
            return Err(DeliveryError::Unsettled {
                id: self.addr.id,
                max: self.node.replicas.settings.retained_per_channel_max,
            });
        }
        rmp_serde::to_vec(msg)
            .map(Some)
            .map_err(|e| DeliveryError::Encode(e.to_string()))
    }

    /// Sends to a replicated service on another node, keeping a copy until it is confirmed.
    fn deliver_kept(
        &self,
        st: &mut ChanState<S::Msg>,
        link: Arc<PeerLink>,
        meta: Meta,
        wait: bool,
        msg: &S::Msg,
    ) -> Result<usize, DeliveryError> {
        let Some(bytes) = self.copy_to_keep(st, meta, msg)? else {
            return link.deliver(self.addr.id, meta, wait, msg);
        };
        let queued = match link.deliver_encoded(self.addr.id, meta, wait, &bytes) {
            Ok(q) => q,
            // The service's node was lost and the standby its host named may take it over:
            // the copy is kept and goes there with the others once the service is found
            // (declared lost, its sender told, if nothing takes it over within the failover
            // wait), instead of failing a sender that could not know.
            Err(DeliveryError::PeerLost { .. })
                if st.replicated && self.node.standby_named(self.addr.id, &st.node).is_some() =>
            {
                0
            }
            Err(e) => return Err(e),
        };
        self.keep_copy(st, meta, bytes);
        Ok(queued)
    }

    /// True when a copy of this message is kept until it is confirmed: to a replicated
    /// service, any numbered message; from one, a tell (an ask is sent again by the handler
    /// that asked, re-executed).
    fn copies(st: &ChanState<S::Msg>, meta: Meta) -> bool {
        meta.from.is_some() && (st.replicated || (meta.keep && meta.ask.is_none()))
    }

    /// Keeps the copy `copy_to_keep` made (room checked by it, under the same lock).
    fn keep_copy(&self, st: &mut ChanState<S::Msg>, meta: Meta, bytes: Vec<u8>) {
        let max = self.node.replicas.settings.retained_per_channel_max;
        let from = meta.from.unwrap_or(self.chan.client);
        let kept = st
            .retained
            .get_or_insert_with(|| Box::new(Retained::new(max)));
        if kept.keep(from, meta.seq, (meta.ask, bytes)).is_err() {
            debug_assert!(false, "retained copies over their bound");
        }
    }

    /// A message was queued: the delivery ledger notes its number, and an ask its request's
    /// number (so a refusal of it can be skipped at the receiver).
    fn note_sent(&self, st: &mut ChanState<S::Msg>, meta: Meta) {
        if let Some(from) = meta.from {
            let ChanState { ledger, node, .. } = st;
            ledger.note(from, meta.seq, node);
            if let Some(ask) = meta.ask {
                self.node.asks.numbered(ask, from, meta.seq);
            }
        }
    }

    pub(crate) fn send(&self, meta: Meta, msg: S::Msg) -> Result<(), DeliveryError> {
        let res = self.attempt(meta, false, msg);
        let local = matches!(res, Ok(Attempt::Sent(_, true)));
        let res = res.map(drop);
        self.count(&res, local);
        res
    }

    /// The link a waiting sender must let drain after it left `queued` bytes there, if any.
    /// The channel's guard is gone when this returns, before the caller awaits: other
    /// senders (some on the thread that drains the link) share the channel.
    fn link_to_settle(&self, queued: usize, here: bool) -> Option<Arc<PeerLink>> {
        if here || !PeerLink::must_settle(queued) {
            return None;
        }
        match lock(&self.chan.state).route.clone() {
            Route::Remote(link) => Some(link),
            Route::Local(_) => None,
        }
    }

    /// [`send_wait`](Self::send_wait)'s first attempt, without building its future: in the
    /// usual case the message is queued at once and nothing is left to wait for. Counted
    /// unless it gives the message back to wait with.
    pub(crate) fn send_now(
        &self,
        meta: Meta,
        msg: S::Msg,
    ) -> Result<SendNow<S::Msg>, DeliveryError> {
        match self.attempt(meta, true, msg) {
            Ok(Attempt::Sent(queued, here)) => {
                self.count(&Ok(()), here);
                Ok(match self.link_to_settle(queued, here) {
                    Some(link) => SendNow::Settle(link, queued),
                    None => SendNow::Done,
                })
            }
            Ok(Attempt::Full(_, _, back)) => Ok(SendNow::Wait(back)),
            Err(e) => {
                let res: Result<(), DeliveryError> = Err(e);
                self.count(&res, false);
                res.map(|()| SendNow::Done)
            }
        }
    }

    /// Sends, waiting for room. With `queued_flag`, sets it once the message is queued (before
    /// it waits for the link to drain), so a caller that gives up midway knows its number was
    /// used.
    pub(crate) async fn send_wait(
        &self,
        meta: Meta,
        msg: S::Msg,
        queued_flag: Option<&AtomicBool>,
    ) -> Result<(), DeliveryError> {
        let mut msg = msg;
        let mut local = false;
        let res = loop {
            match self.attempt(meta, true, msg) {
                Ok(Attempt::Sent(queued, here)) => {
                    if let Some(f) = queued_flag {
                        f.store(true, Ordering::Relaxed);
                    }
                    local = here;
                    if let Some(link) = self.link_to_settle(queued, here) {
                        link.settle(queued).await;
                    }
                    break Ok(());
                }
                Ok(Attempt::Full(e, route, back)) => {
                    msg = back;
                    match (route, e) {
                        (_, DeliveryError::Unsettled { .. }) => {
                            let woken = self.chan.room.get_or_init(Box::default).notified();
                            if !self.chan.retains_room() {
                                woken.await;
                            }
                        }
                        (Route::Local(mb), DeliveryError::WindowFull { .. }) => {
                            let from = meta.from.unwrap_or(self.chan.client);
                            mb.wait_window(from).await
                        }
                        (Route::Local(mb), _) => mb.wait_room().await,
                        (Route::Remote(link), DeliveryError::Backpressure { bytes_max, .. }) => {
                            link.data_room(bytes_max).await
                        }
                        (Route::Remote(_), e) => break Err(e),
                    }
                }
                Err(e) => break Err(e),
            }
        };
        self.count(&res, local);
        res
    }

    pub(crate) async fn ask_from<R: DeserializeOwned + Send + 'static>(
        &self,
        meta: Meta,
        make: impl FnOnce(ReplyTo<R>) -> S::Msg,
        timeout: Duration,
    ) -> Result<R, AskError> {
        self.ask_sent(meta, make, timeout).await.0
    }

    /// An ask, and whether its request was queued (so its number was used).
    pub(crate) async fn ask_sent<R: DeserializeOwned + Send + 'static>(
        &self,
        meta: Meta,
        make: impl FnOnce(ReplyTo<R>) -> S::Msg,
        timeout: Duration,
    ) -> (Result<R, AskError>, bool) {
        let (ask, rx) = match self.node.asks.open(self.location(), Some(self.addr.id)) {
            Ok(opened) => opened,
            Err(e) => return (Err(e), false),
        };
        self.node.stats.asks_started.inc();
        let msg = make(ReplyTo::new(self.node.name().clone(), ask));
        let deadline = tokio::time::Instant::now() + timeout;
        let queued = AtomicBool::new(false);
        let sent = tokio::time::timeout_at(
            deadline,
            self.send_wait(
                Meta {
                    ask: Some(ask),
                    ..meta
                },
                msg,
                Some(&queued),
            ),
        )
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(DeliveryError::PeerLost { node })) => {
                // The node it would go to is gone: the same answer as an ask pending there.
                self.node.asks.cancel(ask);
                return (Err(AskError::NodeLost { node }), false);
            }
            Ok(Err(e)) => {
                self.node.asks.cancel(ask);
                return (Err(AskError::NotSent(e)), false);
            }
            Err(_) => {
                self.node.asks.cancel(ask);
                self.node.stats.asks_timed_out.inc();
                let timeout_ms = timeout.as_millis() as u64;
                let used = queued.load(Ordering::Relaxed);
                return (Err(AskError::Timeout { timeout_ms }), used);
            }
        }
        let payload = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(payload)) => payload,
            Ok(Err(_)) => {
                let node = self.location();
                return (Err(AskError::NodeLost { node }), true);
            }
            Err(_) => {
                self.node.asks.cancel(ask);
                self.node.stats.asks_timed_out.inc();
                let timeout_ms = timeout.as_millis() as u64;
                return (Err(AskError::Timeout { timeout_ms }), true);
            }
        };
        self.node.stats.asks_answered.inc();
        (payload.into_typed(), true)
    }
}

/// What arrives for a pending ask.
pub(crate) enum ReplyPayload {
    Local(Box<dyn Any + Send>),
    Bytes(Vec<u8>),
    Refused(DeliveryError),
    Failed(String),
}

impl ReplyPayload {
    pub(crate) fn into_typed<R: DeserializeOwned + 'static>(self) -> Result<R, AskError> {
        match self {
            ReplyPayload::Local(b) => {
                b.downcast::<R>()
                    .map(|b| *b)
                    .map_err(|_| AskError::BadReply {
                        detail: format!("reply is not a {}", std::any::type_name::<R>()),
                    })
            }
            ReplyPayload::Bytes(bytes) => {
                rmp_serde::from_slice(&bytes).map_err(|e| AskError::BadReply {
                    detail: e.to_string(),
                })
            }
            ReplyPayload::Refused(e) => Err(AskError::Delivery(e)),
            ReplyPayload::Failed(detail) => Err(AskError::BadReply { detail }),
        }
    }
}
