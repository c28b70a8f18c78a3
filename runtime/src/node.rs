//! A node: one runtime instance per device, on its own actix system and thread.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::certs::NodeIdentity;
use crate::core::directory::{Associations, BookEdge, BookIndex};
use crate::error::{AskError, DeliveryError, Error};
use crate::handle::{ReplyPayload, Route, ServiceRef};
use crate::ids::{IdMap, KindKey, NodeName, ServiceAddr, ServiceId};
use crate::mailbox::{lock, AskOrigin, Envelope, Mailbox, Meta, Slot};
use crate::service::{run_service, ReplyTo, Service};
use crate::stats::{NodeStats, Stats};
use crate::transport::{self, PeerLink, PeerStatus};
use crate::wire::{self, Frame};

/// Bounds on every table and queue of a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limits {
    /// Messages a service's mailbox holds before senders get `MailboxFull`.
    pub mailbox_capacity: usize,
    /// Largest frame body accepted or sent, in bytes.
    pub frame_bytes_max: usize,
    /// Bytes queued per peer and stream kind before senders get `Backpressure`.
    pub link_queue_bytes_max: usize,
    /// Asks waiting for replies on this node.
    pub asks_pending_max: usize,
    /// Book edges known cluster-wide.
    pub book_edges_max: usize,
    /// Services running on this node.
    pub services_max: usize,
    /// Peers this node keeps links to.
    pub peers_max: usize,
    /// Entries kept in the node's event log.
    pub events_max: usize,
    /// Time allowed for a connection's TLS and Tern handshakes.
    pub handshake_timeout_ms: u64,
    /// Pending timers per service.
    pub timers_per_service_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            mailbox_capacity: 4096,
            frame_bytes_max: 16 << 20,
            link_queue_bytes_max: 32 << 20,
            asks_pending_max: 65_536,
            book_edges_max: 1_000_000,
            services_max: 1_000_000,
            peers_max: 256,
            events_max: 256,
            handshake_timeout_ms: 5_000,
            timers_per_service_max: 1024,
        }
    }
}

/// A peer to connect to: its name (as in its certificate) and address.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerConfig {
    /// The peer's node name.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// Everything a node needs to start. Its name is read from its certificate.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Certificate, key and cluster CA.
    pub identity: NodeIdentity,
    /// UDP address to listen on; port 0 lets the OS choose.
    pub listen: SocketAddr,
    /// What this device offers, e.g. `display`, `speaker`.
    pub capabilities: Vec<String>,
    /// Peers to connect to.
    pub peers: Vec<PeerConfig>,
    /// Bounds.
    pub limits: Limits,
}

impl NodeConfig {
    /// A configuration listening on `listen` with default limits and no peers.
    pub fn new(identity: NodeIdentity, listen: SocketAddr) -> Self {
        NodeConfig {
            identity,
            listen,
            capabilities: Vec::new(),
            peers: Vec::new(),
            limits: Limits::default(),
        }
    }
}

/// Something a node noticed that an operator may want to see: refusals, protocol errors,
/// peers coming and going. Kept in a bounded log (`events_max`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEvent {
    /// Position in the node's event sequence.
    pub n: u64,
    /// Short kind, e.g. `connection-refused`, `protocol-error`, `refused`.
    pub kind: String,
    /// What happened.
    pub detail: String,
}

/// One local service as listed by [`NodeHandle::services`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// The service.
    pub addr: ServiceAddr,
    /// Messages queued.
    pub mailbox_depth: usize,
    /// Mailbox bound.
    pub mailbox_capacity: usize,
    /// Its parent in an assembly tree.
    pub parent: Option<ServiceId>,
}

type RestoreFn = fn(&Arc<NodeShared>, &[u8]) -> Result<ServiceAddr, Error>;

struct KindEntry {
    restore: RestoreFn,
}

fn restore_service<S: Service>(node: &Arc<NodeShared>, bytes: &[u8]) -> Result<ServiceAddr, Error> {
    let state: S = rmp_serde::from_slice(bytes).map_err(|e| Error::State {
        kind: S::kind_key(),
        detail: e.to_string(),
    })?;
    Ok(node.spawn(state, None)?.addr().clone())
}

struct LocalService {
    slot: Arc<dyn Slot>,
    addr: ServiceAddr,
    parent: Option<ServiceId>,
}

/// Asks waiting for replies, bounded.
pub(crate) struct AskTable {
    pending: Mutex<HashMap<u64, (NodeName, oneshot::Sender<ReplyPayload>)>>,
    next: AtomicU64,
    max: usize,
}

impl AskTable {
    fn new(max: usize) -> Self {
        AskTable {
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            max,
        }
    }

    pub fn open(&self, node: NodeName) -> Result<(u64, oneshot::Receiver<ReplyPayload>), AskError> {
        let (tx, rx) = oneshot::channel();
        let mut p = lock(&self.pending);
        if p.len() >= self.max {
            return Err(AskError::TooManyPending { max: self.max });
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        p.insert(id, (node, tx));
        Ok((id, rx))
    }

    /// Hands `payload` to the ask's waiter; false if no such ask is waiting (late or unknown).
    pub fn complete(&self, ask: u64, payload: ReplyPayload) -> bool {
        let entry = lock(&self.pending).remove(&ask);
        match entry {
            Some((_, tx)) => tx.send(payload).is_ok(),
            None => false,
        }
    }

    pub fn cancel(&self, ask: u64) {
        lock(&self.pending).remove(&ask);
    }

    fn len(&self) -> usize {
        lock(&self.pending).len()
    }
}

/// State shared by everything on a node: handles, services, transport tasks.
pub(crate) struct NodeShared {
    name: NodeName,
    pub caps: Vec<String>,
    pub limits: Limits,
    pub stats: Stats,
    pub asks: AskTable,
    id_prefix: u64,
    next_id: AtomicU64,
    kinds: RwLock<HashMap<KindKey, KindEntry>>,
    services: RwLock<IdMap<LocalService>>,
    children: Mutex<HashMap<ServiceId, BTreeSet<ServiceId>>>,
    books: Mutex<BookIndex>,
    peers: RwLock<HashMap<NodeName, Arc<PeerLink>>>,
    events: Mutex<(u64, VecDeque<NodeEvent>)>,
    pub endpoint: quinn::Endpoint,
    arbiter: OnceLock<actix_rt::ArbiterHandle>,
    thread: OnceLock<ThreadId>,
    pub stopping: AtomicBool,
}

fn random_prefix() -> Result<u64, Error> {
    use rustls::crypto::ring::default_provider;
    let mut b = [0u8; 8];
    default_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| Error::Config("no system randomness for service ids".into()))?;
    Ok(u64::from_le_bytes(b))
}

impl NodeShared {
    pub fn name(&self) -> &NodeName {
        &self.name
    }

    fn on_node_thread(&self) -> bool {
        self.thread.get() == Some(&std::thread::current().id())
    }

    /// Records an event in the bounded log.
    pub fn event(&self, kind: &str, detail: String) {
        let mut ev = lock(&self.events);
        ev.0 += 1;
        let n = ev.0;
        if ev.1.len() >= self.limits.events_max {
            ev.1.pop_front();
        }
        ev.1.push_back(NodeEvent {
            n,
            kind: kind.to_owned(),
            detail,
        });
    }

    pub fn register<S: Service>(&self) {
        self.kinds
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(S::kind_key())
            .or_insert(KindEntry {
                restore: restore_service::<S>,
            });
    }

    pub fn spawn<S: Service>(
        self: &Arc<Self>,
        state: S,
        parent: Option<ServiceId>,
    ) -> Result<ServiceRef<S>, Error> {
        let kind = S::kind_key();
        if !self
            .kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&kind)
        {
            return Err(Error::UnknownKind {
                kind,
                node: self.name.clone(),
            });
        }
        if self.stopping.load(Ordering::Relaxed) {
            return Err(Error::Stopped);
        }
        let id =
            ServiceId::from_parts(self.id_prefix, self.next_id.fetch_add(1, Ordering::Relaxed));
        let addr = ServiceAddr {
            id,
            kind: kind.clone(),
            node: self.name.clone(),
        };
        let mailbox = Arc::new(Mailbox::<S::Msg>::new(
            id,
            kind,
            self.limits.mailbox_capacity,
        ));
        {
            let mut services = self.services.write().unwrap_or_else(|p| p.into_inner());
            if services.len() >= self.limits.services_max {
                return Err(Error::Limit {
                    what: "services on this node",
                    max: self.limits.services_max,
                });
            }
            services.insert(
                id,
                LocalService {
                    slot: mailbox.clone(),
                    addr: addr.clone(),
                    parent,
                },
            );
        }
        if let Some(p) = parent {
            lock(&self.children).entry(p).or_default().insert(id);
        }
        self.stats.services_started.inc();
        let me = ServiceRef::new(addr, self.clone(), Route::Local(mailbox.clone()));
        let runner = {
            let me = me.clone();
            let node = self.clone();
            move || {
                actix_rt::spawn(run_service(state, me, mailbox, node));
            }
        };
        if self.on_node_thread() {
            runner();
        } else {
            let spawned = self.arbiter.get().is_some_and(|a| a.spawn_fn(runner));
            if !spawned {
                self.forget_service(id);
                return Err(Error::Stopped);
            }
        }
        Ok(me)
    }

    /// Decodes `state` as `kind` through the registry and starts it here.
    pub fn restore(self: &Arc<Self>, kind: &KindKey, state: &[u8]) -> Result<ServiceAddr, Error> {
        let restore = self
            .kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kind)
            .map(|k| k.restore)
            .ok_or_else(|| Error::UnknownKind {
                kind: kind.clone(),
                node: self.name.clone(),
            })?;
        restore(self, state)
    }

    pub fn resolve<S: Service>(
        self: &Arc<Self>,
        addr: &ServiceAddr,
    ) -> Result<ServiceRef<S>, DeliveryError> {
        let expected = S::kind_key();
        if addr.kind != expected {
            return Err(DeliveryError::KindMismatch {
                id: addr.id,
                expected,
                actual: addr.kind.clone(),
            });
        }
        let node = self.clone();
        if addr.node == self.name {
            let slot = self
                .services
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&addr.id)
                .map(|s| s.slot.clone())
                .ok_or_else(|| DeliveryError::UnknownService {
                    id: addr.id,
                    node: self.name.clone(),
                })?;
            let actual = slot.kind().clone();
            let mailbox = slot.into_any().downcast::<Mailbox<S::Msg>>().map_err(|_| {
                DeliveryError::KindMismatch {
                    id: addr.id,
                    expected: S::kind_key(),
                    actual,
                }
            })?;
            Ok(ServiceRef::new(addr.clone(), node, Route::Local(mailbox)))
        } else {
            let link = self
                .peer(&addr.node)
                .ok_or_else(|| DeliveryError::UnknownNode {
                    node: addr.node.clone(),
                })?;
            Ok(ServiceRef::new(addr.clone(), node, Route::Remote(link)))
        }
    }

    pub fn reply<R: Serialize + Send + 'static>(
        &self,
        to: ReplyTo<R>,
        value: R,
    ) -> Result<(), DeliveryError> {
        if to.node == self.name {
            if !self
                .asks
                .complete(to.ask, ReplyPayload::Local(Box::new(value)))
            {
                self.event("late-reply", format!("ask {} is no longer waiting", to.ask));
            }
            return Ok(());
        }
        let link = self
            .peer(&to.node)
            .ok_or_else(|| DeliveryError::UnknownNode {
                node: to.node.clone(),
            })?;
        link.send_reply(to.ask, &value)?;
        self.stats.replies_remote.inc();
        Ok(())
    }

    /// Fails the ask behind `origin` with `reason`, wherever the asker is.
    fn refuse_ask(&self, origin: &AskOrigin, reason: DeliveryError) {
        if origin.node == self.name {
            self.asks
                .complete(origin.ask, ReplyPayload::Refused(reason));
        } else if let Some(link) = self.peer(&origin.node) {
            if let Err(e) = link.push_ctrl(&Frame::Reply {
                ask: origin.ask,
                result: wire::ReplyBody::Refused(reason),
            }) {
                self.event(
                    "refusal-lost",
                    format!("could not tell {}: {e}", origin.node),
                );
            }
        }
    }

    /// Called by a service's runner when it stops, with what was still queued.
    pub fn service_stopped<M>(&self, id: ServiceId, rest: Vec<Envelope<M>>) {
        self.forget_service(id);
        for edge in lock(&self.books).remove_holder(id) {
            self.broadcast_ctrl(&Frame::BookChange { edge, added: false });
        }
        self.stats.services_stopped.inc();
        if rest.is_empty() {
            return;
        }
        let n = rest.len() as u64;
        for env in rest {
            let reason = DeliveryError::Stopped { id };
            match (&env.ask, &env.origin) {
                (Some(ask), _) => self.refuse_ask(ask, reason),
                (None, Some(origin)) => {
                    if let Some(link) = self.peer(origin) {
                        let _ = link.push_ctrl(&Frame::Refused {
                            to: id,
                            from: env.from,
                            seq: env.seq,
                            reason,
                        });
                    }
                }
                (None, None) => {}
            }
        }
        self.stats.refused_on_stop.add(n);
        self.event(
            "refused",
            format!("service {id} stopped with {n} messages queued; their senders were told"),
        );
    }

    fn forget_service(&self, id: ServiceId) {
        let parent = self
            .services
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id)
            .and_then(|s| s.parent);
        let mut children = lock(&self.children);
        if let Some(p) = parent {
            if let Some(set) = children.get_mut(&p) {
                set.remove(&id);
                if set.is_empty() {
                    children.remove(&p);
                }
            }
        }
        children.remove(&id);
    }

    /// A message from peer `origin` for local service `to`. `cache` keeps the last target a
    /// stream delivered to, since consecutive frames usually share one.
    pub fn deliver_remote(
        &self,
        cache: &mut Option<(ServiceId, Arc<dyn Slot>)>,
        origin: &NodeName,
        to: ServiceId,
        meta: Meta,
        bytes: &[u8],
    ) -> Result<(), DeliveryError> {
        let slot = self.cached_slot(cache, to)?;
        slot.deliver_bytes(meta, origin, bytes)
    }

    /// The local service `id`, untyped.
    pub fn slot(&self, id: ServiceId) -> Option<Arc<dyn Slot>> {
        self.services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .map(|s| s.slot.clone())
    }

    /// The local service `to`, through a stream's cache of its last target.
    pub fn cached_slot<'c>(
        &self,
        cache: &'c mut Option<(ServiceId, Arc<dyn Slot>)>,
        to: ServiceId,
    ) -> Result<&'c Arc<dyn Slot>, DeliveryError> {
        match cache {
            Some((id, _)) if *id == to => {}
            _ => {
                let slot = self.slot(to).ok_or_else(|| DeliveryError::UnknownService {
                    id: to,
                    node: self.name.clone(),
                })?;
                *cache = Some((to, slot));
            }
        }
        match cache {
            Some((_, slot)) => Ok(slot),
            None => unreachable!("the cache was just filled"),
        }
    }

    pub fn book_get(&self, holder: ServiceId, role: &str) -> Option<ServiceAddr> {
        lock(&self.books).get(holder, role).cloned()
    }

    pub fn book(&self, holder: ServiceId) -> Vec<(String, ServiceAddr)> {
        lock(&self.books).book(holder)
    }

    pub fn associations(&self, id: ServiceId) -> Associations {
        lock(&self.books).associations(id)
    }

    pub fn book_insert(
        &self,
        holder: &ServiceAddr,
        role: &str,
        target: ServiceAddr,
    ) -> Result<(), Error> {
        if holder.node != self.name {
            return Err(Error::Config(format!(
                "the book of {:?} lives on node {}, not here ({})",
                holder, holder.node, self.name
            )));
        }
        let edge = BookEdge {
            holder: holder.clone(),
            role: role.to_owned(),
            target,
        };
        lock(&self.books)
            .insert(edge.clone())
            .map_err(|full| Error::Limit {
                what: "book edges",
                max: full.edges_max,
            })?;
        self.broadcast_ctrl(&Frame::BookChange { edge, added: true });
        Ok(())
    }

    pub fn book_remove(&self, holder: ServiceId, role: &str) -> bool {
        let removed = lock(&self.books).remove(holder, role);
        match removed {
            Some(edge) => {
                self.broadcast_ctrl(&Frame::BookChange { edge, added: false });
                true
            }
            None => false,
        }
    }

    /// A peer told us about one of its services' book entries.
    pub fn peer_book_change(
        &self,
        peer: &NodeName,
        edge: BookEdge,
        added: bool,
    ) -> Result<(), String> {
        if &edge.holder.node != peer {
            return Err(format!(
                "node {peer} sent a book entry of service {} on node {}",
                edge.holder.id, edge.holder.node
            ));
        }
        let mut books = lock(&self.books);
        if added {
            books
                .insert(edge)
                .map_err(|full| format!("book edge table is full ({})", full.edges_max))?;
        } else {
            books.remove(edge.holder.id, &edge.role);
        }
        Ok(())
    }

    pub fn local_edges(&self) -> Vec<BookEdge> {
        lock(&self.books).edges_held_on(&self.name)
    }

    fn broadcast_ctrl(&self, frame: &Frame<'_>) {
        for link in self.links() {
            if !link.is_connected() {
                // A link that comes up later gets the whole book in its BookSync.
                continue;
            }
            if let Err(e) = link.push_ctrl(frame) {
                self.event("book-change-lost", format!("to {}: {e}", link.name));
            }
        }
    }

    pub fn peer(&self, name: &NodeName) -> Option<Arc<PeerLink>> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn links(&self) -> Vec<Arc<PeerLink>> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The link to `name`, made if new. `addr` updates where to dial it.
    pub fn peer_or_insert(
        &self,
        name: &NodeName,
        addr: Option<SocketAddr>,
    ) -> Result<Arc<PeerLink>, Error> {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(link) = peers.get(name) {
            if addr.is_some() {
                link.set_addr(addr);
            }
            return Ok(link.clone());
        }
        if peers.len() >= self.limits.peers_max {
            return Err(Error::Limit {
                what: "peers",
                max: self.limits.peers_max,
            });
        }
        let link = Arc::new(PeerLink::new(name.clone(), addr, &self.limits));
        peers.insert(name.clone(), link.clone());
        Ok(link)
    }

    fn snapshot_stats(&self) -> NodeStats {
        let mut s = self.stats.snapshot();
        s.services_live = self
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len() as u64;
        s.peers_connected = self.links().iter().filter(|l| l.is_connected()).count() as u64;
        s.book_edges = lock(&self.books).len() as u64;
        s.asks_pending = self.asks.len() as u64;
        s
    }
}

/// The actix actor supervising a node: keeps links to peers up and stops the node.
pub(crate) struct NodeActor {
    shared: Arc<NodeShared>,
}

impl Actor for NodeActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        transport::maintain_links(&self.shared);
        ctx.run_interval(Duration::from_millis(250), |act, _| {
            transport::maintain_links(&act.shared)
        });
    }
}

/// How long a stopping node waits for its connections to close cleanly.
const SHUTDOWN_LINGER: Duration = Duration::from_millis(500);

#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Stop;

impl Handler<Stop> for NodeActor {
    type Result = ();

    fn handle(&mut self, _: Stop, _: &mut Self::Context) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let endpoint = self.shared.endpoint.clone();
        endpoint.close(
            quinn::VarInt::from_u32(wire::code::SHUTDOWN as u32),
            b"node shutting down",
        );
        tracing::info!(node = %self.shared.name, "node stopping");
        // Give the close frames a moment to leave, so peers learn at once rather than by
        // idle timeout; then end the system.
        actix_rt::spawn(async move {
            let _ = tokio::time::timeout(SHUTDOWN_LINGER, endpoint.wait_idle()).await;
            System::current().stop();
        });
    }
}

/// A running node. Cheap to clone; every clone talks to the same node.
///
/// ```no_run
/// use tern::{certs::ClusterCa, Node, NodeConfig};
/// let ca = ClusterCa::new()?;
/// let node = Node::start(NodeConfig::new(ca.issue("phone")?, "127.0.0.1:0".parse().unwrap()))?;
/// println!("{} listens on {}", node.name(), node.local_addr());
/// node.shutdown();
/// # Ok::<(), tern::Error>(())
/// ```
#[derive(Clone)]
pub struct NodeHandle {
    shared: Arc<NodeShared>,
    actor: Addr<NodeActor>,
    local_addr: SocketAddr,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// Starts nodes.
pub struct Node;

impl Node {
    /// Starts a node on a new thread with its own actix system, and returns once it listens.
    pub fn start(config: NodeConfig) -> Result<NodeHandle, Error> {
        let name = config.identity.name()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("tern-{name}"))
            .spawn(move || {
                let sys = actix_rt::System::new();
                match sys.block_on(boot(config)) {
                    Ok(booted) => {
                        let _ = tx.send(Ok(booted));
                        if let Err(e) = sys.run() {
                            tracing::error!(error = %e, "node system ended with an error");
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| Error::io("starting node thread", e))?;
        let (shared, actor, local_addr) = rx.recv().map_err(|_| Error::Stopped)??;
        Ok(NodeHandle {
            shared,
            actor,
            local_addr,
            thread: Arc::new(Mutex::new(Some(thread))),
        })
    }
}

async fn boot(config: NodeConfig) -> Result<(Arc<NodeShared>, Addr<NodeActor>, SocketAddr), Error> {
    let name = config.identity.name()?;
    let mut endpoint =
        quinn::Endpoint::server(crate::tls::server_config(&config.identity)?, config.listen)
            .map_err(|e| Error::io(format!("listening on {}", config.listen), e))?;
    endpoint.set_default_client_config(crate::tls::client_config(&config.identity)?);
    let local_addr = endpoint
        .local_addr()
        .map_err(|e| Error::io("reading local address", e))?;
    let limits = config.limits.clone();
    let shared = Arc::new(NodeShared {
        name: name.clone(),
        caps: config.capabilities.clone(),
        stats: Stats::default(),
        asks: AskTable::new(limits.asks_pending_max),
        id_prefix: random_prefix()?,
        next_id: AtomicU64::new(1),
        kinds: RwLock::new(HashMap::new()),
        services: RwLock::new(IdMap::default()),
        children: Mutex::new(HashMap::new()),
        books: Mutex::new(BookIndex::new(limits.book_edges_max)),
        peers: RwLock::new(HashMap::new()),
        events: Mutex::new((0, VecDeque::new())),
        endpoint: endpoint.clone(),
        arbiter: OnceLock::new(),
        thread: OnceLock::new(),
        stopping: AtomicBool::new(false),
        limits,
    });
    let _ = shared.arbiter.set(actix_rt::Arbiter::current());
    let _ = shared.thread.set(std::thread::current().id());
    for p in &config.peers {
        shared.peer_or_insert(&NodeName::new(&p.name), Some(p.addr))?;
    }
    actix_rt::spawn(transport::accept_loop(shared.clone(), endpoint));
    let actor = NodeActor {
        shared: shared.clone(),
    }
    .start();
    tracing::info!(node = %name, addr = %local_addr, "node listening");
    Ok((shared, actor, local_addr))
}

impl NodeHandle {
    /// The node's name, from its certificate.
    pub fn name(&self) -> &NodeName {
        self.shared.name()
    }

    /// The UDP address the node listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The node's capabilities.
    pub fn capabilities(&self) -> &[String] {
        &self.shared.caps
    }

    /// The node's limits.
    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// Registers service kind `S` so this node can run and restore it.
    pub fn register<S: Service>(&self) -> &Self {
        self.shared.register::<S>();
        self
    }

    /// Starts a service of a registered kind on this node.
    pub fn spawn<S: Service>(&self, state: S) -> Result<ServiceRef<S>, Error> {
        self.shared.spawn(state, None)
    }

    /// Starts a service on peer `node` from `state`, through that node's kind registry.
    pub async fn spawn_on<S: Service>(
        &self,
        node: &NodeName,
        state: &S,
        timeout: Duration,
    ) -> Result<ServiceRef<S>, Error> {
        if node == self.name() {
            let state =
                rmp_serde::from_slice(&rmp_serde::to_vec(state).map_err(|e| Error::State {
                    kind: S::kind_key(),
                    detail: e.to_string(),
                })?)
                .map_err(|e| Error::State {
                    kind: S::kind_key(),
                    detail: e.to_string(),
                })?;
            return self.spawn(state);
        }
        let link = self
            .shared
            .peer(node)
            .ok_or_else(|| DeliveryError::UnknownNode { node: node.clone() })?;
        let bytes = rmp_serde::to_vec(state).map_err(|e| Error::State {
            kind: S::kind_key(),
            detail: e.to_string(),
        })?;
        let (req, rx) = self.shared.asks.open(node.clone())?;
        if let Err(e) = link.push_ctrl(&Frame::Spawn {
            req,
            kind: S::kind_key(),
            state: &bytes,
        }) {
            self.shared.asks.cancel(req);
            return Err(e.into());
        }
        let payload = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(AskError::NodeLost { node: node.clone() }.into()),
            Err(_) => {
                self.shared.asks.cancel(req);
                return Err(AskError::Timeout {
                    timeout_ms: timeout.as_millis() as u64,
                }
                .into());
            }
        };
        let addr: ServiceAddr = match payload {
            ReplyPayload::Failed(detail) => {
                return Err(Error::Remote {
                    node: node.clone(),
                    detail,
                })
            }
            other => other.into_typed()?,
        };
        Ok(self.shared.resolve(&addr)?)
    }

    /// Starts a service from MessagePack `state` of registered `kind`.
    pub fn restore(&self, kind: &KindKey, state: &[u8]) -> Result<ServiceAddr, Error> {
        self.shared.restore(kind, state)
    }

    /// A typed handle to the service at `addr`, local or remote.
    pub fn resolve<S: Service>(&self, addr: &ServiceAddr) -> Result<ServiceRef<S>, DeliveryError> {
        self.shared.resolve(addr)
    }

    /// Answers an ask from outside any service.
    pub fn reply<R: Serialize + Send + 'static>(
        &self,
        to: ReplyTo<R>,
        value: R,
    ) -> Result<(), DeliveryError> {
        self.shared.reply(to, value)
    }

    /// Adds or replaces entry `role` in the book of local service `holder`.
    pub fn book_insert(
        &self,
        holder: &ServiceAddr,
        role: &str,
        target: &ServiceAddr,
    ) -> Result<(), Error> {
        self.shared.book_insert(holder, role, target.clone())
    }

    /// Removes entry `role` from the book of `holder`.
    pub fn book_remove(&self, holder: ServiceId, role: &str) -> bool {
        self.shared.book_remove(holder, role)
    }

    /// The book of `holder`, as this node knows it.
    pub fn book(&self, holder: ServiceId) -> Vec<(String, ServiceAddr)> {
        self.shared.book(holder)
    }

    /// Who `id` holds and who holds it, across the cluster as this node knows it.
    pub fn associations(&self, id: ServiceId) -> Associations {
        self.shared.associations(id)
    }

    /// Children of `id` in its assembly tree (on this node).
    pub fn children(&self, id: ServiceId) -> Vec<ServiceId> {
        lock(&self.shared.children)
            .get(&id)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Services running on this node.
    pub fn services(&self) -> Vec<ServiceInfo> {
        let services = self
            .shared
            .services
            .read()
            .unwrap_or_else(|p| p.into_inner());
        services
            .values()
            .map(|s| ServiceInfo {
                addr: s.addr.clone(),
                mailbox_depth: s.slot.depth(),
                mailbox_capacity: s.slot.capacity(),
                parent: s.parent,
            })
            .collect()
    }

    /// A snapshot of the node's counters.
    pub fn stats(&self) -> NodeStats {
        self.shared.snapshot_stats()
    }

    /// The node's recent events, oldest first.
    pub fn events(&self) -> Vec<NodeEvent> {
        lock(&self.shared.events).1.iter().cloned().collect()
    }

    /// Adds (or re-addresses) a peer; the node connects to it.
    pub fn add_peer(&self, name: &str, addr: SocketAddr) -> Result<(), Error> {
        crate::certs::check_node_name(name)?;
        if name == self.name().as_str() {
            return Err(Error::Config(format!("node {name} cannot be its own peer")));
        }
        self.shared
            .peer_or_insert(&NodeName::new(name), Some(addr))?;
        Ok(())
    }

    /// The state of every link to a peer.
    pub fn peers(&self) -> Vec<PeerStatus> {
        self.shared.links().iter().map(|l| l.status()).collect()
    }

    /// True when a connection to `peer` is up.
    pub fn is_connected(&self, peer: &str) -> bool {
        self.shared
            .peer(&NodeName::new(peer))
            .is_some_and(|l| l.is_connected())
    }

    /// Stops the node: closes its endpoint, ends its actix system and joins its thread.
    /// Pending asks on this node fail with `NodeLost`.
    pub fn shutdown(&self) {
        self.actor.do_send(Stop);
        let thread = lock(&self.thread).take();
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::error!(node = %self.name(), "node thread panicked");
            }
        }
    }
}

/// Decodes a reply payload sent over the wire.
pub(crate) fn reply_from_wire(body: wire::ReplyBody<'_>) -> ReplyPayload {
    match body {
        wire::ReplyBody::Value(b) => ReplyPayload::Bytes(b.to_vec()),
        wire::ReplyBody::Refused(e) => ReplyPayload::Refused(e),
        wire::ReplyBody::Failed(s) => ReplyPayload::Failed(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_asks_are_bounded_and_freed() {
        let table = AskTable::new(2);
        let node = NodeName::new("b");
        let (a1, _r1) = table.open(node.clone()).unwrap();
        let (_a2, _r2) = table.open(node.clone()).unwrap();
        assert!(matches!(
            table.open(node.clone()),
            Err(AskError::TooManyPending { max: 2 })
        ));
        table.cancel(a1);
        assert!(table.open(node).is_ok(), "a cancelled ask frees its place");
        assert!(
            !table.complete(a1, ReplyPayload::Failed("late".into())),
            "a late reply finds nothing"
        );
    }
}
