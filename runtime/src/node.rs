//! A node: one runtime instance per device, on its own actix system and thread.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::{JoinHandle, ThreadId};
use std::time::Duration;

use actix::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::books::Books;
use crate::certs::NodeIdentity;
use crate::error::{AskError, DeliveryError, Error};
use crate::events::Logs;
pub use crate::events::{LossReport, NodeEvent};
use crate::handle::{AnyChannel, Channel};
use crate::handle::{ReplyPayload, Route, ServiceRef};
pub use crate::limits::Limits;
use crate::mailbox::Refusal;
use crate::mailbox::{lock, AskOrigin, Envelope, Mailbox, Meta, Slot};
use crate::members::{Member, Power};
use crate::members::{MemberInfo, Members};
use crate::migrate::{Driver, Go, InCopy, MigrateOptions, MigrationReport, MigrationStats};
use crate::registry::Registry;
use crate::service::{run_restored, Restored};
use crate::service::{run_service, ReplyTo, Service};
use crate::stats::{NodeStats, Stats};
use crate::tracked::Tracked;
use crate::transport::Links;
use crate::transport::{self, PeerStatus};
use crate::tree::{GroupReport, TreeMember};
use tern_proto::directory::{Associations, BookEdge};
use tern_proto::forward::{follow_gossip, Route as NoticeRoute};
use tern_proto::ids::{IdMap, KindKey, NodeName, ServiceAddr, ServiceId};
use tern_proto::ledger::Unconfirmed;
use tern_proto::placement::Needs;
use tern_proto::traffic::EdgeRate;
use tern_proto::traffic::TrafficSketch;
use tern_proto::wire::{self, CarriedMsg, Frame, MigMsg, SnapHeader};

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
    /// Wraps the node's UDP socket before QUIC runs on it: a test harness injects faults here
    /// (drops, delays, cut links). `None` in production.
    pub socket_wrap: Option<SocketWrap>,
    /// Who may open admin connections (the `tern` command line, a dashboard): names from
    /// admin or observer certificates ([`Role`](crate::certs::Role)); `"*"` lets in every
    /// admin and observer certificate the cluster CA issued. Empty (the default): nobody, so
    /// admin access is closed until a node says who may. A node's certificate never opens an
    /// admin connection, listed or not.
    ///
    /// ```
    /// # fn demo(identity: tern::certs::NodeIdentity) {
    /// let mut cfg = tern::NodeConfig::new(identity, "127.0.0.1:7101".parse().unwrap());
    /// cfg.admins = vec!["ops".into(), "wall".into()];
    /// # }
    /// ```
    pub admins: Vec<String>,
    /// The cluster CA's revocation list (DER) to hold from the start, as `tern ca revoke`
    /// writes it; a newer one can come later from a peer or an admin. `None`: none yet.
    pub revocations: Option<Vec<u8>>,
    /// Where the node keeps what must outlive it (`tern.redb`, created if missing): the
    /// latest checkpoint of each replicated service it runs, and its votes. A node started
    /// again on the same directory resumes those services, unless a copy promoted elsewhere
    /// meanwhile holds them (docs/failures.md, "Local durability"). `None` (the default):
    /// nothing is written, and a restarted node starts empty.
    ///
    /// ```
    /// # fn demo(identity: tern::certs::NodeIdentity) {
    /// let mut cfg = tern::NodeConfig::new(identity, "127.0.0.1:7101".parse().unwrap());
    /// cfg.data_dir = Some("/var/lib/tern/phone".into());
    /// # }
    /// ```
    pub data_dir: Option<std::path::PathBuf>,
}

/// A function given the node's UDP socket (as quinn sees it) that returns the socket QUIC
/// should use instead; see [`NodeConfig::socket_wrap`].
#[derive(Clone)]
pub struct SocketWrap(pub Arc<WrapFn>);

/// The function inside a [`SocketWrap`].
pub type WrapFn =
    dyn Fn(Arc<dyn quinn::AsyncUdpSocket>) -> Arc<dyn quinn::AsyncUdpSocket> + Send + Sync;

impl std::fmt::Debug for SocketWrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SocketWrap(..)")
    }
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
            socket_wrap: None,
            admins: Vec::new(),
            revocations: None,
            data_dir: None,
        }
    }
}

/// The UDP buffers a node asks the kernel for, each way. The kernel's defaults (about
/// 208 KiB on Linux) overflowed when a node's thread was busy taking in a burst, such as a
/// 1 MiB snapshot: 949 datagrams dropped in one run of the bench's migration section, and a
/// drop at a burst's end costs a probe timeout (tens of milliseconds) before it is sent again.
/// The kernel caps the request at its own maximum (`net.core.rmem_max`, `wmem_max`).
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

/// A UDP socket bound to `addr` with [`UDP_BUFFER_BYTES`] asked for each way: the socket a
/// node listens and dials on. For baselines that should run on the same sockets as nodes.
///
/// ```
/// let udp = tern::bind_udp("127.0.0.1:0".parse().unwrap()).unwrap();
/// assert!(udp.local_addr().unwrap().port() > 0);
/// ```
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // A smaller buffer than asked for is not an error: the kernel's cap is the machine's
    // choice, and the node works with what it gets.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The node's QUIC endpoint on `listen`, on a wrapped socket when `wrap` is given.
fn endpoint(
    server: quinn::ServerConfig,
    listen: SocketAddr,
    wrap: Option<&SocketWrap>,
) -> Result<quinn::Endpoint, Error> {
    let listening = |e| Error::io(format!("listening on {listen}"), e);
    let udp = bind_udp(listen).map_err(listening)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let Some(wrap) = wrap else {
        return quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), udp, runtime)
            .map_err(listening);
    };
    let socket = quinn::Runtime::wrap_udp_socket(&*runtime, udp).map_err(listening)?;
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(server),
        (wrap.0)(socket),
        runtime,
    )
    .map_err(listening)
}

/// One local service as listed by [`NodeHandle::services`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// The service.
    pub addr: ServiceAddr,
    /// Messages queued.
    pub mailbox_depth: usize,
    /// Mailbox bound.
    pub mailbox_capacity: usize,
    /// Senders its mailbox keeps a receive window for (at most
    /// `tern_proto::inbox::SENDERS_MAX`). A stopped sender's window goes once everything it
    /// sent here was taken or refused.
    pub sender_windows: usize,
    /// Its parent in an assembly tree.
    pub parent: Option<ServiceId>,
    /// Its epoch: how many times it has migrated.
    pub epoch: u64,
    /// Timers it has pending (as its runner last noted: after each message it handled, and
    /// when it arrived).
    #[serde(default)]
    pub timers_pending: usize,
}

type RestoreFn = fn(&Arc<NodeShared>, &KindKey, &[u8]) -> Result<ServiceAddr, Error>;
type RestorePausedFn = fn(
    &Arc<NodeShared>,
    &NodeName,
    SnapHeader,
    Vec<u8>,
    Option<Box<dyn Tracked>>,
) -> Result<InCopy, Error>;

/// Makes the empty part a kind's target fills as a pre-copy arrives ([`crate::Precopy`]).
pub(crate) type EmptyPartFn = fn() -> Box<dyn Tracked>;

type ChannelFn = fn(&Arc<NodeShared>, &ServiceAddr) -> Result<Arc<dyn AnyChannel>, DeliveryError>;
/// Writes a message of the kind, in the version its writer ran (first), as an older
/// version's (last) (`service::rewrite_msg`).
pub(crate) type RewriteFn = fn(u32, &[u8], u32) -> Result<Vec<u8>, String>;

struct KindEntry {
    restore: RestoreFn,
    restore_paused: RestorePausedFn,
    /// This node's channel to a service of the kind, made if there is none.
    channel: ChannelFn,
    needs: Needs,
    /// The kind copies its state ahead when it moves ([`Service::PRECOPY`]).
    precopy: Option<EmptyPartFn>,
    /// For an older version of a kind registered here: the version that takes its services,
    /// upgrading them on arrival ([`Service::UPGRADES`]). `None` for a version this node runs.
    upgraded_to: Option<u32>,
    /// For a version run here that declares downgrades ([`Service::DOWNGRADES`]): how a
    /// tombstone writes what it forwards to a copy on an older version.
    rewrite: Option<RewriteFn>,
}

fn open_channel<S: Service>(
    node: &Arc<NodeShared>,
    addr: &ServiceAddr,
) -> Result<Arc<dyn AnyChannel>, DeliveryError> {
    node.resolve::<S>(addr).map(|r| r.any_channel())
}

/// Builds a paused copy of a migrating service from its snapshot; the copy is registered and
/// its runner spawned only when the core installs it.
fn restore_paused<S: Service>(
    node: &Arc<NodeShared>,
    source: &NodeName,
    header: SnapHeader,
    state: Vec<u8>,
    part: Option<Box<dyn Tracked>>,
) -> Result<InCopy, Error> {
    let kind = node.registered_kind::<S>().unwrap_or_else(S::kind_key);
    let bad = |what: &str, e: String| Error::State {
        kind: kind.clone(),
        detail: format!("{what}: {e}"),
    };
    // The snapshot is in its source's version; an older one's is upgraded here.
    let written = header.kind.version;
    let mut value: S = crate::service::read_state(written, &state).map_err(|e| bad("state", e))?;
    if written != S::VERSION && part.is_some() {
        return Err(bad(
            "pre-copied part",
            format!("copied ahead from version {written}: only the whole state is upgraded"),
        ));
    }
    match (part, S::PRECOPY) {
        // What was copied ahead takes the place of the part the state's bytes left out.
        (Some(part), Some(p)) => (p.part)(&mut value)
            .adopt(part)
            .map_err(|e| bad("pre-copied part", e))?,
        (Some(_), None) => {
            return Err(bad(
                "pre-copied part",
                "the kind does not copy ahead".into(),
            ))
        }
        (None, _) if header.precopied => {
            return Err(bad("pre-copied part", "missing".into()));
        }
        (None, _) => {}
    }
    let mut timers = Vec::with_capacity(header.timers.len());
    for t in &header.timers {
        let msg = crate::service::read_msg::<S>(written, &t.msg).map_err(|e| bad("timer", e))?;
        timers.push((Duration::from_micros(t.after_us), msg));
    }
    let mut windows = Vec::with_capacity(header.windows.len());
    for w in &header.windows {
        let mut early = Vec::with_capacity(w.early.len());
        for m in &w.early {
            early.push(
                crate::mailbox::decode_envelope::<S::Msg>(
                    || header.id,
                    &kind,
                    m,
                    |b| crate::service::read_msg::<S>(written, b),
                )
                .map_err(|e| bad("early message", e.to_string()))?,
            );
        }
        windows.push(crate::mailbox::WindowExport {
            from: w.from,
            next: w.next,
            early,
            skipped: w.skipped.clone(),
            taken: w.taken,
        });
    }
    let capacity = node.limits.mailbox_capacity;
    let mailbox = Arc::new(
        Mailbox::<S::Msg>::restored(header.id, kind.clone(), capacity, windows)
            .sleeping_with(node.bell_for::<S>())
            .reading(node.versions_for::<S>(written)),
    );
    let slot: Arc<dyn Slot> = mailbox.clone();
    let restored = Restored {
        timers,
        seqs: header.send_seqs.clone(),
        source: source.clone(),
        mig: header.mig,
        marks: header
            .windows
            .iter()
            .filter(|w| w.taken > 0)
            .map(|w| (w.from, w.taken))
            .collect(),
        replies: header.replies.clone(),
        outputs: header.outputs.clone(),
    };
    let install = {
        let node = node.clone();
        let id = header.id;
        move |go: oneshot::Receiver<Go>| -> Result<(), Error> {
            let addr = ServiceAddr {
                id,
                kind,
                node: node.name.clone(),
            };
            let mailbox_slot: Arc<dyn Slot> = mailbox.clone();
            node.register_local(id, mailbox_slot.clone())?;
            let started = node
                .channel::<S::Msg>(&addr)
                .map_err(Error::from)
                .and_then(|chan| {
                    let me = ServiceRef::new(addr, node.clone(), chan);
                    let runner = {
                        let node = node.clone();
                        move || {
                            actix_rt::spawn(run_restored(value, me, mailbox, node, restored, go));
                        }
                    };
                    node.run_on_node(runner, id)
                });
            if started.is_err() {
                // Registered but never run: not a service of this node after all.
                node.forget_moved(id, &mailbox_slot);
            }
            started
        }
    };
    Ok(InCopy {
        header,
        slot,
        install: Mutex::new(Some(Box::new(install))),
    })
}

fn restore_service<S: Service>(
    node: &Arc<NodeShared>,
    kind: &KindKey,
    bytes: &[u8],
) -> Result<ServiceAddr, Error> {
    let state: S =
        crate::service::read_state(kind.version, bytes).map_err(|detail| Error::State {
            kind: kind.clone(),
            detail,
        })?;
    Ok(node.spawn(state, None)?.addr().clone())
}

/// One ask waiting: the node it was sent to, its target service, its waiter, and once its
/// request is queued, the request's number `(sender, seq)` in the channel to the target.
struct PendingAsk {
    node: NodeName,
    target: Option<ServiceId>,
    tx: oneshot::Sender<ReplyPayload>,
    numbered: Option<(ServiceId, u64)>,
}

/// A refused request's number: `(service, sender, seq)`, for its window to skip.
pub(crate) type RefusedNumber = (ServiceId, ServiceId, u64);

/// Asks waiting for replies, bounded.
pub(crate) struct AskTable {
    /// Per ask, what it waits on.
    pending: Mutex<HashMap<u64, PendingAsk>>,
    /// Counts asks; an ask's id is this count under a keyed hash.
    next: AtomicU64,
    /// The hash's random keys (SipHash keyed from the operating system's randomness at
    /// start): an ask id cannot be guessed from others, so a peer cannot answer an ask it
    /// never saw.
    key: std::collections::hash_map::RandomState,
    max: usize,
}

impl AskTable {
    fn new(max: usize) -> Self {
        AskTable {
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            key: std::collections::hash_map::RandomState::new(),
            max,
        }
    }

    /// A fresh ask id, not in `pending`.
    fn fresh_id(&self, pending: &HashMap<u64, PendingAsk>) -> u64 {
        use std::hash::BuildHasher;
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let id = self.key.hash_one(n);
            if !pending.contains_key(&id) {
                return id;
            }
        }
    }

    /// Opens an ask sent to `node`, for service `target` when there is one (its answer may
    /// come from wherever the service has moved since).
    pub fn open(
        &self,
        node: NodeName,
        target: Option<ServiceId>,
    ) -> Result<(u64, oneshot::Receiver<ReplyPayload>), AskError> {
        let (tx, rx) = oneshot::channel();
        let mut p = lock(&self.pending);
        if p.len() >= self.max {
            return Err(AskError::TooManyPending { max: self.max });
        }
        let id = self.fresh_id(&p);
        p.insert(
            id,
            PendingAsk {
                node,
                target,
                tx,
                numbered: None,
            },
        );
        Ok((id, rx))
    }

    /// Ask `ask`'s request was queued as number `seq` of `sender`: if it is refused on its
    /// way, the target's window is told to skip that number.
    pub fn numbered(&self, ask: u64, sender: ServiceId, seq: u64) {
        if let Some(p) = lock(&self.pending).get_mut(&ask) {
            p.numbered = Some((sender, seq));
        }
    }

    /// The connection to `lost` is gone: every ask whose answer can only come from there (sent
    /// there for no service, or for a service this node last knew there) fails now with
    /// `NodeLost` instead of at its timeout. Returns how many.
    pub fn fail_lost(
        &self,
        lost: &NodeName,
        location: impl Fn(ServiceId) -> Option<NodeName>,
    ) -> usize {
        let mut p = lock(&self.pending);
        let before = p.len();
        // Dropping a waiter's sender is what tells it the node was lost.
        p.retain(|_, a| {
            let at = a
                .target
                .and_then(&location)
                .unwrap_or_else(|| a.node.clone());
            at != *lost
        });
        before - p.len()
    }

    /// Hands `payload` to the ask's waiter; false if no such ask is waiting (late or unknown).
    /// A refusal also returns the request's number, which no window is to wait for.
    pub fn complete(&self, ask: u64, payload: ReplyPayload) -> (bool, Option<RefusedNumber>) {
        let entry = lock(&self.pending).remove(&ask);
        match entry {
            Some(p) => {
                let refused = match (&payload, p.target, p.numbered) {
                    (ReplyPayload::Refused(_), Some(to), Some((from, seq))) => {
                        Some((to, from, seq))
                    }
                    _ => None,
                };
                (p.tx.send(payload).is_ok(), refused)
            }
            None => (false, None),
        }
    }

    pub fn cancel(&self, ask: u64) {
        lock(&self.pending).remove(&ask);
    }

    /// The number ask `ask`'s request was sent under: `(service, sender, seq)`.
    pub fn numbering(&self, ask: u64) -> Option<RefusedNumber> {
        let p = lock(&self.pending);
        let a = p.get(&ask)?;
        Some((a.target?, a.numbered?.0, a.numbered?.1))
    }

    fn len(&self) -> usize {
        lock(&self.pending).len()
    }
}

/// State shared by everything on a node: handles, services, transport tasks.
pub(crate) struct NodeShared {
    name: NodeName,
    /// The subscriber the node's thread logs to (the one its starter's thread had): its
    /// migrations' spans are made there too, whichever thread asks for them.
    pub dispatch: Option<tracing::Dispatch>,
    pub limits: Limits,
    /// Who may open admin connections (`None`: any certificate of the cluster).
    pub admins: Vec<String>,
    /// The node's certificate, the CA's revocation list, and the TLS checks built on them.
    pub trust: crate::trust::Trust,
    /// Admin connections open now (at most `admin::ADMIN_CONNECTIONS_MAX`).
    pub admin_connections: AtomicUsize,
    /// Bytes reserved for the states of snapshots still arriving, from every peer (at most
    /// `Limits::snapshot_bytes_in_max`).
    pub snapshot_bytes_in: Arc<AtomicUsize>,
    /// Handled marks from peers the channel does not point at yet: peer, service, sender,
    /// number (see `settle_from`).
    handled_waiting: Mutex<tern_proto::ledger::WaitingMarks>,
    pub stats: Stats,
    pub asks: AskTable,
    id_prefix: u64,
    next_id: AtomicU64,
    kinds: RwLock<HashMap<KindKey, KindEntry>>,
    /// For each kind registered here that declares upgrades: the version each peer runs.
    kind_versions: RwLock<HashMap<String, Arc<crate::mailbox::PeerVersions>>>,
    /// The local services (the registry subsystem).
    pub(crate) registry: Registry,
    /// Wakes sleeping services (`None` when `Limits::sleep_after_idle_ms` is 0).
    bell: Option<Arc<crate::mailbox::Bell>>,
    /// The address books (the books subsystem).
    pub(crate) books: Books,
    /// The peer links (the links subsystem).
    pub(crate) links: Links,
    /// The event log and the loss log.
    pub(crate) logs: Logs,
    pub endpoint: quinn::Endpoint,
    arbiter: OnceLock<actix_rt::ArbiterHandle>,
    thread: OnceLock<ThreadId>,
    pub stopping: AtomicBool,
    /// Set by [`NodeHandle::halt`]: services handle nothing more, as after a crash.
    pub halted: Halted,
    /// Runs the migration protocol core for this node.
    pub driver: Driver,
    /// Per target service, the channel every handle on this node shares.
    channels: Mutex<IdMap<Arc<dyn AnyChannel>>>,
    /// Gaps that reached a service while its windows were busy (frozen, moving, a copy not
    /// yet started): `(to, from, through)`, tried again on every progress tick.
    gaps_pending: Mutex<VecDeque<Pending>>,
    /// Services with confirmations to report on the next progress tick (each at most once
    /// per tick: a mailbox adds itself when its first unreported mark appears).
    handled_pending: Mutex<Vec<ServiceId>>,
    /// Observed traffic of the edges touching local services (bounded by
    /// `traffic_edges_max`).
    pub traffic: Mutex<TrafficSketch>,
    /// What this node knows of every node, itself included.
    pub members: Mutex<Members>,
    /// Placement's state: policy, pins, rebalancer.
    pub placement: crate::placing::PlacementState,
    /// Who speaks for which sender, who had custody of which service
    /// (`tern_proto::speakers`).
    pub(crate) senders: crate::senders::SenderTables,
    /// Registered names of local services, those heard from peers, and what arriving copies
    /// carry besides their state (`names.rs`).
    pub(crate) names: crate::names::NameTables,
    /// A gossip round is asked for and not yet run (`gossip_soon`).
    pub(crate) gossip_pending: AtomicBool,
    /// Replicated services run here and checkpoints held for others (`replicas.rs`).
    pub(crate) replicas: crate::replicas::Replicas,
    /// The data directory's store, when one is set ([`NodeConfig::data_dir`]).
    pub(crate) store: Option<crate::store::Store>,
}

/// The halt flag, read by every service before each message: on a cache line of its own, so
/// that counters written by other threads beside it do not make each read a miss.
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct Halted(pub AtomicBool);

impl Halted {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Gaps kept waiting for a busy service; past this the oldest is dropped and logged (its
/// sender's later messages then wait in the window and are refused when it fills).
const GAPS_PENDING_MAX: usize = 4096;

/// A gap or a stopped sender's close that a mailbox could not apply yet (frozen, moving, a
/// copy not yet started): `(to, from, number)`, tried again on the next progress tick.
#[derive(Clone, Debug)]
pub(crate) enum Pending {
    /// Numbers of `from` up to `through` will not come (see `apply_gap`).
    Gap(ServiceId, ServiceId, u64),
    /// `from` stopped after sending `last`, handed on by so many nodes (see `apply_closed`).
    Closed(ServiceId, ServiceId, u64, u8),
    /// A declared gap whose service's place had no link: routed again, at most
    /// `tern_proto::forward::ROUTE_TRIES_MAX` times (see `route_gap`).
    Route(ServiceId, ServiceId, u64, u16),
    /// A refused number's skip whose service's place had no link (see `route_skip`).
    Skip(ServiceId, ServiceId, u64, u16),
    /// A message to a replicated service refused as unknown where its handle pointed, the
    /// handle not knowing yet where else to look (see `refusal_waits`).
    Refused(RefusedLater),
}

/// A refusal that waits for the handle to follow its service (see `refusal_waits`).
#[derive(Clone, Debug)]
pub(crate) struct RefusedLater {
    to: ServiceId,
    from: ServiceId,
    seq: u64,
    /// The node that refused it.
    at: NodeName,
    reason: DeliveryError,
    /// The ask it carried, still waiting.
    ask: Option<u64>,
    tries: u16,
}

/// Handled marks per frame.
const HANDLED_MARKS_PER_FRAME: usize = 4096;

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

    /// The prefix of the ids this run of the node mints.
    pub(crate) fn id_prefix(&self) -> u64 {
        self.id_prefix
    }

    fn on_node_thread(&self) -> bool {
        self.thread.get() == Some(&std::thread::current().id())
    }

    pub fn register<S: Service>(&self) {
        let entry = |upgraded_to: Option<u32>| KindEntry {
            restore: restore_service::<S>,
            restore_paused: restore_paused::<S>,
            channel: open_channel::<S>,
            // Only a service of the version run here copies ahead: an older one's state is
            // upgraded whole on arrival.
            precopy: S::PRECOPY
                .filter(|_| upgraded_to.is_none())
                .map(|p| p.empty),
            needs: Needs {
                required: S::REQUIRES.iter().map(|c| c.to_string()).collect(),
                preferred: S::PREFERS.iter().map(|c| c.to_string()).collect(),
                // Only the version run here writes older ones.
                writes: if upgraded_to.is_none() {
                    crate::service::writes_versions::<S>()
                } else {
                    Vec::new()
                },
            },
            upgraded_to,
            rewrite: (upgraded_to.is_none() && !crate::service::writes_versions::<S>().is_empty())
                .then_some(crate::service::rewrite_msg::<S> as RewriteFn),
        };
        let mut kinds = self.kinds.write().unwrap_or_else(|p| p.into_inner());
        match kinds.get(&S::kind_key()) {
            // A version run here takes the place of an upgrade to another one.
            Some(e) if e.upgraded_to.is_some() => {
                kinds.insert(S::kind_key(), entry(None));
            }
            Some(_) => {}
            None => {
                kinds.insert(S::kind_key(), entry(None));
            }
        }
        for u in S::UPGRADES {
            if u.from >= S::VERSION {
                tracing::error!(
                    kind = %S::kind_key(),
                    from = u.from,
                    "an upgrade from a version not older than the kind's own is ignored"
                );
                continue;
            }
            kinds
                .entry(KindKey::new(S::KIND, u.from))
                .or_insert_with(|| entry(Some(S::VERSION)));
        }
        if S::REPLICAS > 0 && !S::DOWNGRADES.is_empty() {
            tracing::error!(
                kind = %S::kind_key(),
                "a replicated kind's downgrades are ignored: its standbys keep its own version"
            );
        }
        drop(kinds);
        // The versions peers run: what their messages are written in, and what to write for
        // them.
        if !S::UPGRADES.is_empty() || !crate::service::writes_versions::<S>().is_empty() {
            self.kind_versions
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(S::KIND.to_owned())
                .or_default();
        }
    }

    /// How `S`'s mailboxes read older versions' messages, when `S` declares upgrades;
    /// `carried` is the version a restored copy's carried messages were written in.
    pub(crate) fn versions_for<S: Service>(
        &self,
        carried: u32,
    ) -> Option<crate::mailbox::Versions<S::Msg>> {
        if S::UPGRADES.is_empty() {
            return None;
        }
        let peers = self
            .kind_versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(S::KIND)
            .cloned()?;
        Some(crate::mailbox::Versions {
            read: crate::service::read_msg::<S>,
            read_any: crate::service::read_msg_any::<S>,
            carried,
            peers,
        })
    }

    /// The version `node` runs of kind `name`, as its gossip says: known for the kinds here
    /// that declare upgrades or downgrades; this node's own for itself.
    pub(crate) fn peer_version(&self, name: &str, node: &NodeName) -> Option<u32> {
        if node == &self.name {
            return self.versions_here(name).0.iter().map(|k| k.version).max();
        }
        self.kind_versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)?
            .version_of(node)
    }

    /// How the version of `kind` run here writes its messages as an older version's, when it
    /// declares downgrades.
    pub(crate) fn rewrite_of(&self, kind: &KindKey) -> Option<RewriteFn> {
        self.kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kind)
            .and_then(|k| k.rewrite)
    }

    /// Notes the versions `member` says it runs of the kinds here that declare upgrades.
    pub(crate) fn note_versions(&self, member: &NodeName, kinds: &[tern_proto::members::KindInfo]) {
        let table = self.kind_versions.read().unwrap_or_else(|p| p.into_inner());
        if table.is_empty() {
            return;
        }
        // The kinds with upgrades that the member runs (its newest version of each); one it
        // no longer lists is forgotten, so the table holds only what members say now.
        for (name, peers) in table.iter() {
            let runs = kinds
                .iter()
                .filter(|k| *k.kind.name == **name)
                .map(|k| k.kind.version)
                .max();
            match runs {
                Some(version) => {
                    peers.set(member, version);
                }
                None => peers.forget(member),
            }
        }
    }

    /// A member that left: its versions are forgotten (a lost one's are kept, for what it
    /// sent before and for its return).
    pub(crate) fn forget_versions(&self, member: &NodeName) {
        for peers in self
            .kind_versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            peers.forget(member);
        }
    }

    /// How many members' versions of kind `name` this node knows (0 for a kind without
    /// upgrades).
    #[cfg(test)]
    pub(crate) fn versions_known(&self, name: &str) -> usize {
        self.kind_versions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map_or(0, |p| p.len())
    }

    /// The bell that wakes `S`'s services when they sleep; `None` when they never do
    /// (replicated kinds, whose leases and checkpoints need a running task, or sleeping
    /// turned off).
    pub fn bell_for<S: Service>(&self) -> Option<Arc<crate::mailbox::Bell>> {
        self.bell.clone().filter(|_| S::REPLICAS == 0)
    }

    /// `S`'s key as registered: the one copy of its name that every address of the kind on
    /// this node shares. `None` if `S` is not registered.
    pub fn registered_kind<S: Service>(&self) -> Option<KindKey> {
        self.kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get_key_value(&S::kind_key())
            .map(|(k, _)| k.clone())
    }

    pub fn spawn<S: Service>(
        self: &Arc<Self>,
        state: S,
        parent: Option<ServiceId>,
    ) -> Result<ServiceRef<S>, Error> {
        let Some(kind) = self.registered_kind::<S>() else {
            return Err(Error::UnknownKind {
                kind: S::kind_key(),
                node: self.name.clone(),
            });
        };
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
        let mailbox = Arc::new(
            Mailbox::<S::Msg>::new(id, kind, self.limits.mailbox_capacity)
                .sleeping_with(self.bell_for::<S>())
                .reading(self.versions_for::<S>(S::VERSION)),
        );
        self.register_local(id, mailbox.clone())?;
        if let Some(p) = parent {
            if let Err(e) = self.record_child(p, &addr) {
                self.forget_service(id);
                return Err(e);
            }
        }
        self.stats.services_started.inc();
        if S::REPLICAS > 0 {
            self.replicas.start(id, S::kind_key(), 0, Vec::new());
        }
        let chan = self.channel::<S::Msg>(&addr)?;
        let me = ServiceRef::new(addr, self.clone(), chan);
        let runner = {
            let me = me.clone();
            let node = self.clone();
            move || {
                actix_rt::spawn(run_service(state, me, mailbox, node));
            }
        };
        self.run_on_node(runner, id)?;
        Ok(me)
    }

    /// Adds a local service to the table (bounded by `services_max`).
    pub fn register_local(&self, id: ServiceId, slot: Arc<dyn Slot>) -> Result<(), Error> {
        self.registry.register(id, slot)
    }

    /// Runs `fut` as a task on the node's thread; false if the node has stopped.
    pub fn spawn_task(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) -> bool {
        if self.on_node_thread() {
            actix_rt::spawn(fut);
            return true;
        }
        self.arbiter.get().is_some_and(|a| a.spawn(fut))
    }

    /// Runs `runner` on the node's thread (it spawns a service's task there).
    pub fn run_on_node(
        &self,
        runner: impl FnOnce() + Send + 'static,
        id: ServiceId,
    ) -> Result<(), Error> {
        if self.on_node_thread() {
            runner();
            return Ok(());
        }
        let spawned = self.arbiter.get().is_some_and(|a| a.spawn_fn(runner));
        if !spawned {
            self.forget_service(id);
            return Err(Error::Stopped);
        }
        Ok(())
    }

    /// Where this node's channel or its books say `id` runs, the newer of the two.
    pub fn location_besides_directory(&self, id: ServiceId) -> Option<(NodeName, u64)> {
        match (self.channel_location(id), self.books.location(id)) {
            (Some(c), Some(b)) if b.1 > c.1 => Some(b),
            (Some(c), _) => Some(c),
            (None, b) => b,
        }
    }

    /// Where this node's channel to `id` points, and since which epoch.
    pub fn channel_location(&self, id: ServiceId) -> Option<(NodeName, u64)> {
        lock(&self.channels).get(&id).map(|c| c.location())
    }

    /// The local service `id`'s address.
    pub fn local_addr_of(&self, id: ServiceId) -> Option<ServiceAddr> {
        self.registry.addr(id)
    }

    /// The channel from this node to `addr`'s service, shared by every handle made here. Made
    /// on first use, pointing where the directory last saw the service (else at `addr.node`).
    pub fn channel<M: DeserializeOwned + Send + 'static>(
        &self,
        addr: &ServiceAddr,
    ) -> Result<Arc<Channel<M>>, DeliveryError> {
        // Where the service is: the directory, else membership gossip (a node that joined
        // after a move never heard its `Located`), else the address itself. Read before the
        // channel table is locked (the core and the member table are other subsystems).
        let known = self.driver.location(addr.id).or_else(|| {
            self.hosting_member(addr.id)
                .filter(|at| *at != addr.node)
                .map(|at| (at, 0))
        });
        let mut table = lock(&self.channels);
        if let Some(c) = table.get(&addr.id) {
            return c.clone().into_any().downcast::<Channel<M>>().map_err(|_| {
                DeliveryError::KindMismatch {
                    id: addr.id,
                    expected: addr.kind.clone(),
                    actual: self
                        .slot(addr.id)
                        .map(|s| s.kind().clone())
                        .unwrap_or_else(|| addr.kind.clone()),
                }
            });
        }
        let (at, epoch) = known.unwrap_or_else(|| (addr.node.clone(), 0));
        let route = if at == self.name {
            let slot = self
                .slot(addr.id)
                .ok_or_else(|| DeliveryError::UnknownService {
                    id: addr.id,
                    node: self.name.clone(),
                })?;
            let actual = slot.kind().clone();
            Route::Local(slot.into_any().downcast::<Mailbox<M>>().map_err(|_| {
                DeliveryError::KindMismatch {
                    id: addr.id,
                    expected: addr.kind.clone(),
                    actual,
                }
            })?)
        } else {
            Route::Remote(
                self.links
                    .get(&at)
                    .ok_or_else(|| DeliveryError::UnknownNode { node: at.clone() })?,
            )
        };
        let client =
            ServiceId::from_parts(self.id_prefix, self.next_id.fetch_add(1, Ordering::Relaxed));
        let chan = Arc::new(Channel::new(addr.id, client, route, at, epoch));
        // Past the bound a handle still works, with a channel of its own that the rebuild
        // does not reach (the tombstone still forwards for it).
        if table.len() < self.limits.services_max {
            table.insert(addr.id, chan.clone());
        }
        Ok(chan)
    }

    /// Every channel of this node, with its service (copied out of the table's lock).
    fn all_channels(&self) -> Vec<(ServiceId, Arc<dyn AnyChannel>)> {
        lock(&self.channels)
            .iter()
            .map(|(id, c)| (*id, c.clone()))
            .collect()
    }

    /// Channels pointing at `gone`, a node that left or was lost, follow membership gossip
    /// when another node lists the service: the `Located` a crashed node was sending when it
    /// died never comes, and without this the channel's next message would be refused first.
    /// Returns how many moved.
    pub fn follow_gossip_away_from(&self, gone: &NodeName) -> usize {
        let chans = self.all_channels();
        let mut moved = 0;
        for (id, chan) in chans {
            let (points, epoch) = chan.location();
            if points != *gone {
                continue;
            }
            let Some((n, e)) = follow_gossip((points, epoch), self.hosting_member_at(id)) else {
                continue;
            };
            if chan.relocate(self, &n, e) {
                moved += 1;
                self.logs.event(
                    "channel-followed",
                    format!("service {id}: {gone} is gone; gossip says {n} hosts it"),
                );
            }
        }
        moved
    }

    /// True when this node's channel to `id` keeps its copy of `from`'s message `seq` (the
    /// service is replicated) and, after trying to follow the service away from `at`, points
    /// elsewhere: it sent its kept copies there. `None` when it keeps no such copy (not
    /// replicated, already confirmed, or a refusal of a number it never sent: a peer's word
    /// alone holds nothing here).
    fn followed_away(
        &self,
        id: ServiceId,
        at: &NodeName,
        from: ServiceId,
        seq: u64,
    ) -> Option<bool> {
        let chan = lock(&self.channels).get(&id).cloned()?;
        if !chan.keeps(from, seq) {
            return None;
        }
        self.not_known_at(id, at);
        Some(chan.location().0 != *at)
    }

    /// Number `seq` of `from` to service `to` was refused by `at` as unknown there (a tell, or
    /// the request of ask `ask`). True when the refusal is no loss, or not yet: this node's
    /// channel keeps copies (the service is replicated) and has followed the service elsewhere
    /// (here, or at an earlier such refusal), sending its kept copies there, this one among
    /// them; or it waits, while the copy is kept, for the directory or gossip to say where the
    /// service went (a node that joined after it moved may hear of that only from gossip,
    /// within a second or so). Given up after `ROUTE_TRIES_MAX` progress ticks: then the
    /// refusal is reported and skipped as any other.
    pub fn refusal_waits(
        &self,
        to: ServiceId,
        from: ServiceId,
        seq: u64,
        at: &NodeName,
        reason: &DeliveryError,
        ask: Option<u64>,
    ) -> bool {
        match self.followed_away(to, at, from, seq) {
            None => false,
            Some(true) => true,
            Some(false) => {
                self.wait_pending(Pending::Refused(RefusedLater {
                    to,
                    from,
                    seq,
                    at: at.clone(),
                    reason: reason.clone(),
                    ask,
                    tries: 1,
                }));
                true
            }
        }
    }

    /// A refusal that waited: done once the channel followed the service, else given up
    /// after `ROUTE_TRIES_MAX` ticks (reported, or the ask failed, and the number skipped).
    fn refused_later(&self, mut r: RefusedLater) {
        if self.followed_away(r.to, &r.at, r.from, r.seq) != Some(false) {
            return;
        }
        if r.tries < tern_proto::forward::ROUTE_TRIES_MAX {
            r.tries += 1;
            self.wait_pending(Pending::Refused(r));
            return;
        }
        match r.ask {
            Some(ask) => {
                let _ = self.asks.complete(ask, ReplyPayload::Refused(r.reason));
            }
            None => self.record_loss(LossReport {
                service: r.to,
                sender: r.from,
                first_seq: r.seq,
                last_seq: r.seq,
                messages: 1,
                node: r.at,
                reason: r.reason.to_string(),
            }),
        }
        self.skip_refused(r.to, r.from, r.seq);
    }

    /// Node `at` said service `id` is not known there: if this node's channel points there
    /// and the directory or membership gossip knows another place, the channel goes there (a
    /// handle whose tombstone was evicted follows the service again). True if it moved.
    pub fn not_known_at(&self, id: ServiceId, at: &NodeName) -> bool {
        let Some(chan) = lock(&self.channels).get(&id).cloned() else {
            return false;
        };
        let (points, epoch) = chan.location();
        if points != *at {
            return false;
        }
        let elsewhere = match self.driver.location(id) {
            Some((n, e)) if n != *at => Some((n, e.max(epoch))),
            _ => follow_gossip((points, epoch), self.hosting_member_at(id)),
        };
        match elsewhere {
            Some((n, e)) => {
                let moved = chan.relocate(self, &n, e);
                if moved {
                    self.logs.event(
                        "channel-followed",
                        format!("service {id}: not known at {at}; now sent to {n}"),
                    );
                }
                moved
            }
            None => false,
        }
    }

    /// Channel rebuild on this node: `id` runs on `node` since `epoch`. Repoints the shared
    /// channel and rewrites every book entry naming it. Returns the entries rewritten.
    pub fn relocated(&self, id: ServiceId, node: &NodeName, epoch: u64) -> usize {
        let chan = lock(&self.channels).get(&id).cloned();
        if let Some(c) = chan {
            c.relocate(self, node, epoch);
        }
        let n = self.books.relocate(id, node, epoch);
        self.driver.count_rebuilt(n);
        let marks = lock(&self.handled_waiting).take(id, node);
        for (from, seq) in marks {
            self.settle(id, from, seq);
        }
        for (edge, added) in self.books.take_waiting(id, node) {
            if let Err(e) = self.books.peer_change(node, edge, added) {
                self.logs.event("book-change-dropped", e);
            }
        }
        n
    }

    /// Copy `copy` of service `id` left this node (moved away, discarded, orphaned): forget
    /// it without stopping anything. A newer copy of the same service registered meanwhile
    /// (the next attempt's) stays, with its marks and traffic.
    pub fn forget_moved(&self, id: ServiceId, copy: &Arc<dyn Slot>) {
        self.flush_handled_of(id, copy);
        if self.registry.remove_copy(id, copy) {
            lock(&self.traffic).forget(id);
        }
    }

    /// Hands messages for `id` on to node `to` (after a commit, or back to the source after an
    /// abort), keeping their numbering; what cannot go is refused to its sender.
    pub fn hand_on<M: Serialize>(&self, id: ServiceId, to: &NodeName, msgs: Vec<Envelope<M>>) {
        for env in msgs {
            let origin = env.origin.clone().unwrap_or_else(|| self.name.clone());
            let res = crate::mailbox::encode_envelope(&env).and_then(|m| {
                crate::migrate::forward(
                    self,
                    to,
                    id,
                    &origin,
                    m,
                    tern_proto::forward::Hand::Accepted,
                )
            });
            if let Err(e) = res {
                self.refuse_envelope(id, env.refusal(e));
            }
        }
    }

    /// Tells node `to`, behind everything this node sent it, that this node's channel to `id`
    /// no longer points there (at `epoch`): `to` may then drop its tombstone for `id`.
    pub fn send_fence(&self, to: &NodeName, id: ServiceId, epoch: u64) {
        let Some(link) = self.links.get(to) else {
            return;
        };
        if let Err(e) = link
            .data
            .push(&link.name, &Frame::Fence { service: id, epoch })
        {
            // The tombstone stays; the bounded table lets it go in time.
            self.logs.event("fence-lost", format!("to {to}: {e}"));
        }
    }

    /// Peer `peer` changed an entry of a book it says is of one of its services: applied when
    /// the holder runs there as far as this node knows (or nothing here knows it), kept aside
    /// when it is believed elsewhere (until its move to `peer` is known), refused when it runs
    /// here (`tern_proto::claims::book_holder`). `Err` for an entry whose holder's address names
    /// another node (a malformed claim) or a full table.
    pub fn peer_book_change(
        &self,
        peer: &NodeName,
        edge: tern_proto::directory::BookEdge,
        added: bool,
    ) -> Result<(), String> {
        use tern_proto::claims::{book_holder, BookClaim};
        let id = edge.holder.id;
        let here = self.slot(id).is_some();
        let known: Vec<NodeName> = [
            self.driver.location(id).map(|(n, _)| n),
            self.channel_location(id).map(|(n, _)| n),
            self.books.addr_of(id).map(|a| a.node),
        ]
        .into_iter()
        .flatten()
        .collect();
        // Any of this node's sources naming the peer will do: they age differently.
        let at = known.iter().find(|n| *n == peer).or(known.first());
        match book_holder(peer, id, here, at) {
            Err(refusal) => {
                self.refuse_claim(peer, &refusal);
                Ok(())
            }
            Ok(BookClaim::Wait) if edge.holder.node == *peer => {
                if let Some(out) = self.books.wait(peer, edge, added) {
                    self.logs.event(
                        "book-change-dropped",
                        format!(
                            "service {}'s entry {:?}: its host was never known to be the \
                             node that sent it",
                            out.holder.id, out.role
                        ),
                    );
                }
                Ok(())
            }
            Ok(_) => self.books.peer_change(peer, edge, added),
        }
    }

    /// `peer` claimed something this node does not believe: logged, counted, and answered
    /// with a protocol error. The caller changes nothing.
    /// Offers the cluster CA's revocation list `crl`, from `from` (a peer, an admin, the
    /// node's owner). When it is newer than the list held, every handshake checks it from now
    /// on, every connection whose certificate it revokes is closed (the peer is lost: its
    /// services' senders get loss reports), and the list goes on to every other peer.
    pub fn install_revocations(
        &self,
        crl: &[u8],
        from: &str,
    ) -> Result<crate::trust::Installed, Error> {
        use crate::trust::Installed;
        let (installed, list) = self.trust.install(crl)?;
        if installed == Installed::NotNewer {
            return Ok(installed);
        }
        let _span =
            tracing::info_span!("revocations", node = %self.name, number = list.number()).entered();
        self.logs.event(
            "revocations",
            format!(
                "list #{} from {from}: {} certificates revoked",
                list.number(),
                list.len()
            ),
        );
        for link in self.links.all() {
            let Some(conn) = link.connection() else {
                continue;
            };
            if crate::tls::peer_cert(&conn).is_some_and(|der| list.revokes_cert(&der)) {
                tracing::warn!(peer = %link.name, "certificate revoked: disconnecting");
                conn.close(
                    quinn::VarInt::from_u32(tern_proto::wire::code::REVOKED as u32),
                    b"certificate revoked",
                );
                self.logs.event(
                    "peer-revoked",
                    format!("{}: its certificate is revoked; disconnected", link.name),
                );
            } else if link.name.as_str() != from {
                if let Err(e) = link.push_ctrl(&Frame::Revocations { crl }) {
                    self.logs
                        .event("revocations-unsent", format!("to {}: {e}", link.name));
                }
            }
        }
        Ok(installed)
    }

    pub fn refuse_claim(&self, peer: &NodeName, refusal: &tern_proto::claims::ClaimRefused) {
        tracing::warn!(%peer, claim = refusal.claim, detail = %refusal.detail, "claim refused");
        self.logs
            .event("claim-refused", format!("from {peer}: {refusal}"));
        if let Some(link) = self.links.get(peer) {
            if let Err(e) = link.push_ctrl(&Frame::ProtocolError {
                code: tern_proto::wire::code::CLAIM_REFUSED,
                detail: refusal.to_string(),
            }) {
                self.logs
                    .event("protocol-error-unreported", format!("to {peer}: {e}"));
            }
        }
        // Counted last: whoever sees the count finds the event.
        self.stats.claims_refused.inc();
    }

    /// Tells node `to` which numbers for `id` were refused here, so its windows go on. On the
    /// control stream: a skip carries no message, so it may overtake anything, and a data
    /// stream held by a waiting delivery must not hold the skip that would free it.
    pub fn send_skips(&self, id: ServiceId, to: &NodeName, skipped: &[(ServiceId, u64)], hops: u8) {
        let Some(link) = self.links.get(to) else {
            if !skipped.is_empty() {
                self.logs.event("skip-lost", format!("to {to}: no link"));
            }
            return;
        };
        for (from, seq) in skipped {
            if let Err(e) = link.push_ctrl(&Frame::Skipped {
                to: id,
                from: *from,
                seq: *seq,
                hops,
            }) {
                self.logs.event("skip-lost", format!("to {to}: {e}"));
            }
        }
    }

    /// Number `seq` of sender `from` (on this node) to service `to` was refused somewhere on
    /// its way and will not come: the service's window, wherever it runs now, must not wait
    /// for it. Sent where this node believes the service is: its channel or, when newer, the
    /// directory.
    pub fn skip_refused(&self, to: ServiceId, from: ServiceId, seq: u64) {
        let chan = lock(&self.channels).get(&to).cloned();
        // Reported already: a node lost later does not report it again.
        if let Some(c) = chan {
            c.refused(from, seq);
        }
        self.route_skip(to, from, seq, 0);
    }

    /// Sends the skip of number `seq` of `from` to where this node believes service `to` is.
    /// While that node has no link (a lost node, until gossip says where the service went), it
    /// waits for the next tick, as a gap does: a skip dropped there would leave its number a
    /// hole the live window waits on.
    pub fn route_skip(&self, to: ServiceId, from: ServiceId, seq: u64, tries: u16) {
        match self.route_notice(to, tries) {
            NoticeRoute::Here => self.apply_skip(to, from, seq, 0),
            NoticeRoute::Send(at) => self.send_skips(to, &at, &[(from, seq)], 0),
            NoticeRoute::Wait => self.wait_pending(Pending::Skip(to, from, seq, tries + 1)),
            NoticeRoute::Drop => self.logs.event(
                "skip-lost",
                format!("number {seq} of {from} to {to}: no link to where it is"),
            ),
        }
    }

    /// A skip for service `to`, handed on by `hops` nodes so far: applied to its window here,
    /// or handed on to where its tombstone, else the directory, says it went
    /// (`tern_proto::forward::skip_next_hop`).
    pub fn apply_skip(&self, to: ServiceId, from: ServiceId, seq: u64, hops: u8) {
        if let Some(slot) = self.slot(to) {
            if slot.skip(from, seq).is_ok() {
                return;
            }
        }
        let tomb = self.driver.tombstone(to).map(|(at, _)| at);
        let known = self.driver.location(to).map(|(at, _)| at);
        let next = tern_proto::forward::skip_next_hop(&self.name, tomb, known, hops);
        match next {
            Some(at) => self.send_skips(to, &at, &[(from, seq)], hops.saturating_add(1)),
            None => self.logs.event(
                "skip-lost",
                format!("number {seq} of {from} to {to}: not here, no tombstone or location, or {hops} hops"),
            ),
        }
    }

    /// Completes ask `ask` with `payload`; a refused request's number is skipped where the
    /// service is. False if no such ask was waiting.
    pub fn complete_ask(&self, ask: u64, payload: ReplyPayload) -> bool {
        if let ReplyPayload::Refused(reason @ DeliveryError::UnknownService { id, node }) = &payload
        {
            if let Some((to, from, seq)) = self.asks.numbering(ask) {
                if self.refusal_waits(to, from, seq, node, reason, Some(ask)) {
                    // The request goes again, from its kept copy, to where the service is:
                    // its answer comes from there.
                    return true;
                }
            }
            self.not_known_at(*id, node);
        }
        let (waiting, refused) = self.asks.complete(ask, payload);
        if let Some((to, from, seq)) = refused {
            self.skip_refused(to, from, seq);
        }
        waiting
    }

    /// Tells the sender of a message accepted earlier that it was not delivered after all.
    pub fn refuse_envelope(&self, to: ServiceId, r: Refusal) {
        self.stats.refused_from_peers.inc();
        self.refuse_envelope_quiet(to, r)
    }

    /// Tells a refused message's sender (or asker) why, without counting it as a refusal of a
    /// peer's message: the callers count it themselves.
    pub fn refuse_envelope_quiet(&self, to: ServiceId, r: Refusal) {
        match (&r.ask, &r.origin) {
            (Some(ask), _) => self.refuse_ask(ask, r.reason),
            (None, Some(origin)) if *origin != self.name => {
                if let Some(link) = self.links.get(origin) {
                    let _ = link.push_ctrl(&Frame::Refused {
                        to,
                        from: r.from,
                        seq: r.seq,
                        reason: r.reason,
                    });
                }
            }
            _ => {
                self.logs.event(
                    "refused",
                    format!("message {} to {to} from this node: {}", r.seq, r.reason),
                );
                if let Some(from) = r.from {
                    self.record_loss(LossReport {
                        service: to,
                        sender: from,
                        first_seq: r.seq,
                        last_seq: r.seq,
                        messages: 1,
                        node: self.name.clone(),
                        reason: r.reason.to_string(),
                    });
                    self.skip_refused(to, from, r.seq);
                }
            }
        }
    }

    /// Tells senders' nodes how far local services have taken their messages (the other half
    /// of the delivery ledger), and retries gaps that waited for a busy service.
    pub fn report_progress(self: &Arc<Self>) {
        let ids = std::mem::take(&mut *lock(&self.handled_pending));
        let mut remote: HashMap<NodeName, Vec<(ServiceId, ServiceId, u64)>> = HashMap::new();
        for id in ids {
            if let Some(slot) = self.slot(id) {
                self.note_handled(id, &slot, &mut remote);
            }
        }
        for (origin, marks) in remote {
            self.send_handled(&origin, marks);
        }
        let pending: Vec<_> = lock(&self.gaps_pending).drain(..).collect();
        for p in pending {
            match p {
                Pending::Gap(to, from, through) => self.apply_gap(to, from, through),
                Pending::Closed(to, from, last, hops) => self.apply_closed(to, from, last, hops),
                Pending::Route(to, from, through, tries) => {
                    self.route_gap(to, from, through, tries)
                }
                Pending::Skip(to, from, seq, tries) => self.route_skip(to, from, seq, tries),
                Pending::Refused(r) => self.refused_later(r),
            }
        }
    }

    /// Service `id` has confirmations to report (its mailbox says so once per tick).
    pub fn handled_pending(&self, id: ServiceId) {
        lock(&self.handled_pending).push(id);
    }

    /// Collects one service's handled marks: local senders settle at once, the rest are
    /// grouped by node.
    fn note_handled(
        &self,
        id: ServiceId,
        slot: &Arc<dyn Slot>,
        remote: &mut HashMap<NodeName, Vec<(ServiceId, ServiceId, u64)>>,
    ) {
        let marks = slot.take_handled();
        if !marks.is_empty() {
            let mut traffic = lock(&self.traffic);
            for (from, seq, _) in &marks {
                traffic.observe(*from, id, *seq);
            }
        }
        if self.replicas.is_protected(id) {
            // A replicated service's senders are confirmed by its acknowledged checkpoints
            // (to a node that sent copies again too: `Replicas::also_tell`).
            if !marks.is_empty() {
                self.replicas.also_tell(id, &marks);
            }
            return;
        }
        for (from, seq, origin) in marks {
            match origin {
                Some(o) if o != self.name => remote.entry(o).or_default().push((id, from, seq)),
                _ => self.settle(id, from, seq),
            }
        }
    }

    pub(crate) fn send_handled(&self, origin: &NodeName, marks: Vec<(ServiceId, ServiceId, u64)>) {
        let Some(link) = self.links.get(origin) else {
            return;
        };
        for chunk in marks.chunks(HANDLED_MARKS_PER_FRAME) {
            if let Err(e) = link.push_ctrl(&Frame::Handled {
                marks: chunk.to_vec(),
            }) {
                // The sender's ledger keeps those messages outstanding; a later mark settles them.
                self.logs.event("handled-lost", format!("to {origin}: {e}"));
            }
        }
    }

    /// A service that leaves this node (migration, stop) reports its last marks first.
    pub fn flush_handled(&self, id: ServiceId) {
        if let Some(slot) = self.slot(id) {
            self.flush_handled_of(id, &slot);
        }
    }

    /// Reports the last marks of copy `slot` of service `id` now.
    fn flush_handled_of(&self, id: ServiceId, slot: &Arc<dyn Slot>) {
        let mut remote = HashMap::new();
        self.note_handled(id, slot, &mut remote);
        for (origin, marks) in remote {
            self.send_handled(&origin, marks);
        }
    }

    /// A sampled message size on the edge `from -> to`.
    pub fn sample_size(&self, from: ServiceId, to: ServiceId, bytes: usize) {
        lock(&self.traffic).sample_size(from, to, bytes);
    }

    /// Service `to` confirmed taking `from`'s messages up to `seq`.
    pub fn settle(&self, to: ServiceId, from: ServiceId, seq: u64) {
        let chan = lock(&self.channels).get(&to).cloned();
        if let Some(c) = chan {
            c.settle(from, seq);
        }
    }

    /// Peer `peer` says service `to` took local sender `from`'s messages up to `seq`. Believed
    /// from a node the messages went to (or the channel points at); from any other node the
    /// mark is kept aside (`tern_proto::ledger::WaitingMarks`) until the channel points there
    /// (the service moved there and the news is on its way), so a lying peer cannot hide a
    /// loss. True when it was applied.
    pub fn settle_from(
        &self,
        peer: &NodeName,
        (to, from, seq): (ServiceId, ServiceId, u64),
    ) -> bool {
        let chan = lock(&self.channels).get(&to).cloned();
        let Some(c) = chan else {
            return false;
        };
        if c.settle_from(peer, from, seq) {
            return true;
        }
        lock(&self.handled_waiting).keep(peer, (to, from, seq));
        false
    }

    /// Node `lost`'s connection is gone: every message this node sent that went there, or
    /// whose service was there, and that was not confirmed taken, is declared lost: reported
    /// (log, counters, event) and, so no window waits for it, a gap is sent to where its
    /// service is now (behind anything still queued for it). The assembly-tree edges its
    /// services held are forgotten here (see `forget_tree_edges_at`).
    pub fn declare_lost(self: &Arc<Self>, lost: &NodeName) -> u64 {
        if self.stopping.load(Ordering::SeqCst) {
            return 0;
        }
        let chans = self.all_channels();
        let mut total = 0;
        for (id, chan) in chans {
            // Skips and gaps sent earlier may have been on their way through the lost node:
            // sent again (a window ignores a second copy).
            for u in chan.unconfirmed() {
                match u {
                    Unconfirmed::Skip(from, seq) => self.route_skip(id, from, seq, 0),
                    Unconfirmed::Gap(from, through) => self.route_gap(id, from, through, 0),
                }
            }
            // A replicated service's channel keeps copies: pointing elsewhere already, they
            // went there again; pointing at the lost node with a standby named, its standby
            // may take it over, and the copies go there. Declared only if nothing took it
            // over within the failover wait.
            if chan.retains() {
                if chan.location().0 != *lost {
                    continue;
                }
                if self.standby_named(id, lost).is_some() {
                    self.declare_lost_later(id, lost.clone());
                    continue;
                }
            }
            total += self.declare_channel_lost(&chan, lost);
        }
        let dropped = self.forget_tree_edges_at(lost);
        if dropped > 0 {
            self.logs.event(
                "tree-edges-dropped",
                format!("{dropped} assembly-tree edges held by services of {lost} forgotten"),
            );
        }
        if total > 0 {
            self.logs.event(
                "messages-lost",
                format!("{total} messages sent from here were not confirmed by {lost}'s services when it was lost"),
            );
        }
        total
    }

    /// A replicated service's channel still points at `lost` once a failover could have
    /// happened: what it kept is declared lost as for any service.
    fn declare_lost_later(self: &Arc<Self>, id: ServiceId, lost: NodeName) {
        let node = self.clone();
        let wait = Duration::from_micros(self.replicas.settings.standby_wait_us())
            + Duration::from_millis(crate::replicas::FAILOVER_SLACK_MS);
        let spawned = self.spawn_task(async move {
            tokio::time::sleep(wait).await;
            let chan = lock(&node.channels).get(&id).cloned();
            if let Some(chan) = chan {
                if chan.location().0 == lost {
                    let n = node.declare_channel_lost(&chan, &lost);
                    if n > 0 {
                        node.logs.event(
                            "messages-lost",
                            format!(
                                "{n} messages to replicated service {id}: {lost} was lost \
                                 and nothing took it over"
                            ),
                        );
                    }
                }
            }
        });
        if !spawned {
            self.logs
                .event("failover-wait-lost", format!("{id}: the node is stopping"));
        }
    }

    /// Declares lost what channel `chan` (to `id`) sent through `lost` and was not confirmed.
    fn declare_channel_lost(self: &Arc<Self>, chan: &Arc<dyn AnyChannel>, lost: &NodeName) -> u64 {
        let mut total = 0;
        {
            for r in chan.declare_lost(lost) {
                let messages = r.last - r.first + 1;
                total += messages;
                self.record_loss(LossReport {
                    service: r.service,
                    sender: r.sender,
                    first_seq: r.first,
                    last_seq: r.last,
                    messages,
                    node: lost.clone(),
                    reason: "node lost before the service confirmed taking them".into(),
                });
                tracing::warn!(service = %r.service, sender = %r.sender, first = r.first,
                    last = r.last, node = %lost, "messages declared lost");
                self.route_gap(r.service, r.sender, r.last, 0);
            }
        }
        total
    }

    /// Keeps a loss report and counts it.
    pub fn record_loss(&self, r: LossReport) {
        self.logs.record_loss(r, &self.stats);
    }

    /// Tells node `at` (perhaps this one) that numbers of `from` to `to` up to `through` will
    /// not come.
    pub fn send_gap(self: &Arc<Self>, at: &NodeName, to: ServiceId, from: ServiceId, through: u64) {
        if at == &self.name {
            return self.apply_gap(to, from, through);
        }
        let Some(link) = self.links.get(at) else {
            return;
        };
        if let Err(e) = link
            .data
            .push(&link.name, &Frame::Gap { to, from, through })
        {
            self.logs.event("gap-lost", format!("to {at}: {e}"));
        }
    }

    /// Sends a declared gap to where this node believes service `to` is (its channel or, when
    /// newer, the directory). While that node has no link (the lost node itself, until gossip
    /// says where the service went), it waits for the next tick
    /// (`tern_proto::forward::route_notice`).
    pub fn route_gap(self: &Arc<Self>, to: ServiceId, from: ServiceId, through: u64, tries: u16) {
        match self.route_notice(to, tries) {
            NoticeRoute::Here => self.apply_gap(to, from, through),
            NoticeRoute::Send(at) => self.send_gap(&at, to, from, through),
            NoticeRoute::Wait => self.wait_pending(Pending::Route(to, from, through, tries + 1)),
            NoticeRoute::Drop => self.logs.event(
                "gap-dropped",
                format!("numbers of {from} to {to} up to {through}: no place to send them"),
            ),
        }
    }

    /// Where a skip or gap for `to` goes now (`tern_proto::forward::route_notice`).
    fn route_notice(&self, to: ServiceId, tries: u16) -> NoticeRoute {
        let chan = lock(&self.channels).get(&to).map(|c| c.location());
        let at = tern_proto::forward::newest_location(chan, self.driver.location(to));
        tern_proto::forward::route_notice(&self.name, at, |n| self.links.get(n).is_some(), tries)
    }

    /// A gap for local service `to` (or one that was here: the tombstone passes it on).
    pub fn apply_gap(self: &Arc<Self>, to: ServiceId, from: ServiceId, through: u64) {
        match self.slot(to) {
            Some(slot) => {
                if slot.skip_through(from, through).is_err() {
                    self.wait_pending(Pending::Gap(to, from, through));
                }
            }
            None => {
                if let Some((at, _)) = self.driver.tombstone(to) {
                    self.send_gap(&at, to, from, through);
                }
            }
        }
    }

    /// Keeps a gap or a close for the next progress tick (bounded: past
    /// `GAPS_PENDING_MAX` the oldest goes, with an event).
    fn wait_pending(&self, p: Pending) {
        let mut pending = lock(&self.gaps_pending);
        if pending.len() >= GAPS_PENDING_MAX {
            let dropped = pending.pop_front();
            drop(pending);
            self.logs
                .event("gap-dropped", format!("{dropped:?}: too many waiting"));
            pending = lock(&self.gaps_pending);
        }
        pending.push_back(p);
    }

    /// Local service `from` stopped for good: every service it sent to hears its last number
    /// there, so that the receiver's window for it can go (`Inbox::close_sender`). Sent where
    /// this node believes each receiver is, as a refusal's skip is.
    pub fn sender_stopped(self: &Arc<Self>, from: ServiceId, sent: &[(ServiceId, u64)]) {
        for (to, last) in sent {
            let chan = lock(&self.channels).get(to).map(|c| c.location());
            let at = tern_proto::forward::newest_location(chan, self.driver.location(*to));
            match at {
                Some(at) => self.send_closed(&at, *to, (from, *last), 0),
                None => self.apply_closed(*to, from, *last, 0),
            }
        }
    }

    /// Tells node `at` (perhaps this one) that sender `from` stopped after number `last` to
    /// `to`; `hops` nodes handed the close on so far.
    pub fn send_closed(
        self: &Arc<Self>,
        at: &NodeName,
        to: ServiceId,
        (from, last): (ServiceId, u64),
        hops: u8,
    ) {
        if at == &self.name {
            return self.apply_closed(to, from, last, hops);
        }
        let Some(link) = self.links.get(at) else {
            return self.logs.event("close-lost", format!("to {at}: no link"));
        };
        let frame = Frame::Closed {
            to,
            from,
            last,
            hops,
        };
        if let Err(e) = link.data.push(&link.name, &frame) {
            self.logs.event("close-lost", format!("to {at}: {e}"));
        }
    }

    /// A stopped sender's close for service `to`: applied to its mailbox here, kept for the
    /// next tick while it cannot be, or handed on as a skip is (the tombstone, else the
    /// directory; `tern_proto::forward::skip_next_hop`). A close that finds nowhere to go only
    /// leaves a window in place.
    pub fn apply_closed(self: &Arc<Self>, to: ServiceId, from: ServiceId, last: u64, hops: u8) {
        if let Some(slot) = self.slot(to) {
            if slot.close_sender(from, last).is_err() {
                self.wait_pending(Pending::Closed(to, from, last, hops));
            }
            return;
        }
        let tomb = self.driver.tombstone(to).map(|(at, _)| at);
        let known = self.driver.location(to).map(|(at, _)| at);
        match tern_proto::forward::skip_next_hop(&self.name, tomb, known, hops) {
            Some(at) => self.send_closed(&at, to, (from, last), hops.saturating_add(1)),
            None => self.logs.event(
                "close-lost",
                format!("of {from} to {to}: not here, no tombstone or location, or {hops} hops"),
            ),
        }
    }

    /// Migrates `id` in the background (asked by the service itself); the outcome goes to the
    /// event log and to `done`.
    pub fn migrate_detached(
        self: &Arc<Self>,
        id: ServiceId,
        to: NodeName,
        opts: MigrateOptions,
        done: crate::service::MigrationDone,
    ) {
        let node = self.clone();
        actix_rt::spawn(async move {
            let refuse = node.preflight(&[(id, to.clone())], &opts).await;
            let rx = node
                .driver
                .migrate(&node, id, to, opts, refuse.map(|(_, why)| why));
            if let Ok(report) = rx.await {
                done(match report.aborted {
                    None => Ok(report),
                    Some(_) => Err(crate::reports::NotMoved {
                        reports: vec![report],
                        refused: Vec::new(),
                    }),
                });
            }
        });
    }

    /// Builds a paused copy from a received snapshot, through the kind registry.
    pub fn restore_paused(
        self: &Arc<Self>,
        source: &NodeName,
        mut header: SnapHeader,
        state: Vec<u8>,
        part: Option<Box<dyn Tracked>>,
    ) -> Result<InCopy, Error> {
        let f = self
            .kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&header.kind)
            .map(|k| k.restore_paused)
            .ok_or_else(|| Error::UnknownKind {
                kind: header.kind.clone(),
                node: self.name.clone(),
            })?;
        let holder = ServiceAddr {
            id: header.id,
            kind: header.kind.clone(),
            node: source.clone(),
        };
        let book = header.book.clone();
        let custody = std::mem::take(&mut header.custody);
        let (held, names) = (header.held, std::mem::take(&mut header.names));
        let copy = f(self, source, header, state, part)?;
        self.service_arriving(holder.id, source, custody);
        self.carried_arriving(holder.id, held, names);
        self.learn_book(holder, book);
        Ok(copy)
    }

    /// The book a snapshot carried: entries this node's index lacks (a `BookChange` it
    /// missed) are added, under the holder's address at its source; the commit's relocation
    /// then points them here. Entries it has are left as they are.
    fn learn_book(&self, holder: ServiceAddr, book: Vec<(String, ServiceAddr)>) {
        if let Err(edges_max) = self.books.learn(&holder, book) {
            self.logs.event(
                "book-edge-dropped",
                format!(
                    "service {}: a carried book entry does not fit ({edges_max} edges)",
                    holder.id
                ),
            );
        }
    }

    /// The versions of kind `name` registered here: those run, and the older ones read (one
    /// pass over the table, without building the gossip list).
    pub fn versions_here(&self, name: &str) -> (Vec<KindKey>, Vec<KindKey>) {
        let table = self.kinds.read().unwrap_or_else(|p| p.into_inner());
        let (mut runs, mut reads) = (Vec::new(), Vec::new());
        for (k, e) in table.iter().filter(|(k, _)| k.name == name) {
            match e.upgraded_to {
                None => runs.push(k.clone()),
                Some(_) => reads.push(k.clone()),
            }
        }
        (runs, reads)
    }

    /// The kinds run here, with what each needs and the older versions each reads (at most
    /// `KINDS_MAX`, for gossip).
    pub fn kind_infos(&self) -> Vec<tern_proto::members::KindInfo> {
        let table = self.kinds.read().unwrap_or_else(|p| p.into_inner());
        let mut kinds: Vec<tern_proto::members::KindInfo> = table
            .iter()
            .filter(|(_, k)| k.upgraded_to.is_none())
            .take(tern_proto::members::KINDS_MAX)
            .map(|(kind, k)| {
                let mut reads: Vec<u32> = table
                    .iter()
                    .filter(|(older, o)| {
                        older.name == kind.name && o.upgraded_to == Some(kind.version)
                    })
                    .map(|(older, _)| older.version)
                    .collect();
                reads.sort_unstable();
                tern_proto::members::KindInfo {
                    kind: kind.clone(),
                    needs: k.needs.clone(),
                    reads,
                }
            })
            .collect();
        kinds.sort_by(|a, b| a.kind.cmp(&b.kind));
        kinds
    }

    /// What kind `kind` needs from a node (`None` if it is not registered here).
    pub fn needs_of(&self, kind: &KindKey) -> Option<Needs> {
        self.kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kind)
            .map(|k| k.needs.clone())
    }

    /// This node's capabilities now.
    pub fn capabilities(&self) -> Vec<String> {
        lock(&self.members).me().capabilities.clone()
    }

    /// Services hosted here and messages queued for them.
    pub fn local_depths(&self) -> (u64, u64) {
        self.registry.with_all(|services| {
            let backlog = services.values().map(|s| s.depth() as u64).sum();
            (services.len() as u64, backlog)
        })
    }

    /// Up to `max` local services: id, kind, pinned, epoch.
    pub fn hosted_list(&self, max: usize) -> Vec<(ServiceId, KindKey, bool, u64)> {
        let pins = self.placement.pins();
        let hosted: Vec<(ServiceId, KindKey)> = self.registry.with_all(|services| {
            services
                .iter()
                .take(max)
                .map(|(id, s)| (*id, s.kind().clone()))
                .collect()
        });
        // Epochs are read outside the registry's lock (the core is another subsystem).
        let mut out: Vec<(ServiceId, KindKey, bool, u64)> = hosted
            .into_iter()
            .map(|(id, kind)| {
                let epoch = self.driver.epoch(id).unwrap_or(0);
                (id, kind, pins.contains(&id), epoch)
            })
            .collect();
        out.sort_by_key(|(id, _, _, _)| *id);
        out
    }

    /// The channels touching this node's services, busiest first.
    pub fn traffic(&self) -> Vec<EdgeRate> {
        lock(&self.traffic).all()
    }

    /// Every local service, with its mailbox, parent and epoch.
    pub fn service_infos(&self) -> Vec<ServiceInfo> {
        let local: Vec<(ServiceAddr, [usize; 4])> = self.registry.with_all(|services| {
            services
                .iter()
                .map(|(id, s)| {
                    let sizes = [s.depth(), s.capacity(), s.senders(), s.timers_pending()];
                    (self.registry.addr_of(*id, &**s), sizes)
                })
                .collect()
        });
        // Parents and epochs are read outside the registry's lock (other subsystems).
        local
            .into_iter()
            .map(|(addr, [depth, capacity, senders, timers])| ServiceInfo {
                parent: self.parent_of(addr.id),
                epoch: self.driver.epoch(addr.id).unwrap_or(0),
                addr,
                mailbox_depth: depth,
                mailbox_capacity: capacity,
                sender_windows: senders,
                timers_pending: timers,
            })
            .collect()
    }

    /// Every local service's address.
    pub fn local_services(&self) -> Vec<ServiceAddr> {
        self.registry.with_all(|services| {
            services
                .iter()
                .map(|(id, s)| self.registry.addr_of(*id, &**s))
                .collect()
        })
    }

    /// Whether `kind` is registered here (`Some`), and if so how to make the empty part its
    /// pre-copies fill (`Some(None)`: it does not copy ahead).
    pub fn precopy_part(&self, kind: &KindKey) -> Option<Option<EmptyPartFn>> {
        self.kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(kind)
            .map(|k| k.precopy)
    }

    /// Whether the service `id` run here copies its state ahead when it moves to `to`: its
    /// kind does, and `to` runs the same version as far as gossip says (a newer version
    /// upgrades the whole state on arrival).
    pub fn copies_ahead(&self, id: ServiceId, to: &NodeName) -> bool {
        let Some(kind) = self.slot(id).map(|s| s.kind().clone()) else {
            return false;
        };
        if self.precopy_part(&kind).flatten().is_none() {
            return false;
        }
        match lock(&self.members).fitness_of(to, &kind) {
            Some((_, _, runs, _)) => runs.is_empty() || runs.contains(&kind),
            None => true,
        }
    }

    /// Why this node refuses a service of `kind` it has not registered: it runs another
    /// version of the kind (older, or newer with no upgrade from it), or none.
    pub fn kind_refusal(&self, kind: &KindKey) -> String {
        let (runs, _) = self.versions_here(&kind.name);
        match runs.iter().map(|k| k.version).max() {
            Some(runs) => format!(
                "other version: {}",
                tern_proto::placement::Unfit::OtherVersion {
                    node: self.name.clone(),
                    kind: kind.clone(),
                    runs,
                }
            ),
            None => format!("unknown kind: {kind} is not registered on {}", self.name),
        }
    }

    pub fn has_kind(&self, kind: &KindKey) -> bool {
        self.kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(kind)
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
        restore(self, kind, state)
    }

    pub fn resolve<S: Service>(
        self: &Arc<Self>,
        addr: &ServiceAddr,
    ) -> Result<ServiceRef<S>, DeliveryError> {
        let expected = S::kind_key();
        // Another version of the kind is the same service as far as a handle goes (devices
        // on different versions of the app during a rolling update): a newer receiver
        // upgrades what an older sender writes ([`Service::UPGRADES`]); an older one reads it
        // as its own version's, or refuses it.
        if addr.kind.name != expected.name {
            return Err(DeliveryError::KindMismatch {
                id: addr.id,
                expected,
                actual: addr.kind.clone(),
            });
        }
        let chan = self.channel::<S::Msg>(addr)?;
        Ok(ServiceRef::new(addr.clone(), self.clone(), chan))
    }

    pub fn reply<R: Serialize + Send + 'static>(
        &self,
        to: ReplyTo<R>,
        value: R,
    ) -> Result<(), DeliveryError> {
        if to.node == self.name {
            if !self.complete_ask(to.ask, ReplyPayload::Local(Box::new(value))) {
                self.logs
                    .event("late-reply", format!("ask {} is no longer waiting", to.ask));
            }
            return Ok(());
        }
        let link = self
            .links
            .get(&to.node)
            .ok_or_else(|| DeliveryError::UnknownNode {
                node: to.node.clone(),
            })?;
        link.send_reply(to.ask, &value)?;
        self.stats.replies_remote.inc();
        Ok(())
    }

    /// Answers the ask behind `origin` with `value` (MessagePack, as kept by a service's
    /// [`Replies`](crate::replies::Replies)), wherever the asker is.
    pub(crate) fn answer_kept(&self, origin: &AskOrigin, value: &[u8]) {
        if origin.node == self.name {
            self.complete_ask(origin.ask, ReplyPayload::Bytes(value.to_vec()));
        } else if let Some(link) = self.links.get(&origin.node) {
            if link
                .push_ctrl(&Frame::Reply {
                    ask: origin.ask,
                    result: wire::ReplyBody::Value(value),
                })
                .is_ok()
            {
                self.stats.replies_remote.inc();
            }
        }
    }

    /// Fails the ask behind `origin` (a copy of an ask whose answer is not kept), saying why.
    pub(crate) fn fail_ask(&self, origin: &AskOrigin, why: String) {
        if origin.node == self.name {
            self.complete_ask(origin.ask, ReplyPayload::Failed(why));
        } else if let Some(link) = self.links.get(&origin.node) {
            let _ = link.push_ctrl(&Frame::Reply {
                ask: origin.ask,
                result: wire::ReplyBody::Failed(why),
            });
        }
    }

    /// Fails the ask behind `origin` with `reason`, wherever the asker is.
    fn refuse_ask(&self, origin: &AskOrigin, reason: DeliveryError) {
        if origin.node == self.name {
            self.complete_ask(origin.ask, ReplyPayload::Refused(reason));
        } else if let Some(link) = self.links.get(&origin.node) {
            if let Err(e) = link.push_ctrl(&Frame::Reply {
                ask: origin.ask,
                result: wire::ReplyBody::Refused(reason),
            }) {
                self.logs.event(
                    "refusal-lost",
                    format!("could not tell {}: {e}", origin.node),
                );
            }
        }
    }

    /// Called by a service's runner when it stops, with what was still queued: each of those
    /// messages is refused to its sender or asker with `reason`.
    pub fn service_stopped<M>(
        self: &Arc<Self>,
        id: ServiceId,
        rest: Vec<Envelope<M>>,
        reason: DeliveryError,
    ) {
        self.replica_left(id);
        self.flush_handled(id);
        self.service_left(id);
        self.forget_service(id);
        lock(&self.channels).remove(&id);
        self.driver.unhost(self, id);
        for edge in self.books.remove_holder(id) {
            self.broadcast_ctrl(&Frame::BookChange { edge, added: false });
        }
        self.forget_child(id);
        self.stats.services_stopped.inc();
        if rest.is_empty() {
            return;
        }
        let n = rest.len() as u64;
        for env in rest {
            self.refuse_envelope_quiet(id, env.refusal(reason.clone()));
        }
        self.stats.refused_on_stop.add(n);
        self.logs.event(
            "refused",
            format!(
                "service {id} stopped with {n} messages queued; their senders were told: {reason}"
            ),
        );
    }

    fn forget_service(&self, id: ServiceId) {
        self.registry.remove(id);
    }

    /// A message from peer `origin` for local service `to`. `cache` keeps the last target a
    /// stream delivered to, since consecutive frames usually share one.
    /// A message that is not for a service here: a tombstone forwards it.
    pub fn deliver_remote(
        self: &Arc<Self>,
        cache: &mut Option<(ServiceId, Arc<dyn Slot>)>,
        origin: &NodeName,
        to: ServiceId,
        (meta, wait): (Meta, bool),
        bytes: &[u8],
    ) -> Result<(), DeliveryError> {
        let mut res = match self.cached_slot(cache, to) {
            Ok(slot) => slot.deliver_bytes(meta, (origin, origin), wait, bytes),
            Err(e) => Err(e),
        };
        if matches!(res, Err(DeliveryError::Moved { .. })) {
            // The stream's cache held an instance that has moved; the service may be back.
            *cache = None;
            res = match self.cached_slot(cache, to) {
                Ok(slot) => slot.deliver_bytes(meta, (origin, origin), wait, bytes),
                Err(e) => Err(e),
            };
        }
        match res {
            Err(DeliveryError::UnknownService { .. } | DeliveryError::Moved { .. }) => {
                *cache = None;
                let msg = CarriedMsg {
                    from: meta.from,
                    seq: meta.seq,
                    ask: meta.ask.map(|a| (origin.clone(), a)),
                    origin: Some(origin.clone()),
                    msg: bytes.to_vec(),
                };
                let hand = if wait {
                    tern_proto::forward::Hand::Wait
                } else {
                    tern_proto::forward::Hand::Tell
                };
                crate::migrate::forward_by_tombstone(self, to, origin, msg, hand)
            }
            other => other,
        }
    }

    /// This node's channel to service `id`, if it has one.
    pub(crate) fn channel_known(&self, id: ServiceId) -> Option<Arc<dyn AnyChannel>> {
        lock(&self.channels).get(&id).cloned()
    }

    /// This node's channel to the service at `addr`, made (typed by its kind, if registered
    /// here) if there is none.
    pub(crate) fn channel_to(self: &Arc<Self>, addr: &ServiceAddr) -> Option<Arc<dyn AnyChannel>> {
        if let Some(c) = lock(&self.channels).get(&addr.id) {
            return Some(c.clone());
        }
        let open = self
            .kinds
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr.kind)
            .map(|k| k.channel)?;
        open(self, addr).ok()
    }

    /// The local service `id`, untyped.
    pub fn slot(&self, id: ServiceId) -> Option<Arc<dyn Slot>> {
        self.registry.slot(id)
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
        self.books
            .insert(edge.clone())
            .map_err(|full| Error::Limit {
                what: "book edges",
                max: full.edges_max,
            })?;
        self.broadcast_ctrl(&Frame::BookChange { edge, added: true });
        Ok(())
    }

    pub fn book_remove(&self, holder: ServiceId, role: &str) -> bool {
        let removed = self.books.remove(holder, role);
        match removed {
            Some(edge) => {
                self.broadcast_ctrl(&Frame::BookChange { edge, added: false });
                true
            }
            None => false,
        }
    }

    /// Node `name` said it runs a new incarnation: it restarted, and the services it ran are
    /// gone. The assembly-tree edges naming them leave the books.
    pub(crate) fn peer_restarted(&self, name: &NodeName) {
        let dropped = self.forget_tree_children_at(name);
        if dropped > 0 {
            self.logs.event(
                "tree-edges-dropped",
                format!("{dropped} assembly-tree edges named services of {name}, which restarted"),
            );
        }
    }

    fn broadcast_ctrl(&self, frame: &Frame<'_>) {
        for link in self.links.all() {
            if !link.is_connected() {
                // A link that comes up later gets the whole book in its BookSync.
                continue;
            }
            if let Err(e) = link.push_ctrl(frame) {
                self.logs
                    .event("book-change-lost", format!("to {}: {e}", link.name));
            }
        }
    }

    pub(crate) fn snapshot_stats(&self) -> NodeStats {
        let mut s = self.stats.snapshot();
        s.services_live = self.registry.with_all(|services| services.len()) as u64;
        // Every sleep ends in a wake (the bell is the only way back), so the difference is the
        // services asleep now, or being woken.
        s.services_asleep = s.services_slept.saturating_sub(s.services_woken);
        s.peers_connected = self.links.all().iter().filter(|l| l.is_connected()).count() as u64;
        s.book_edges = self.books.len() as u64;
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
        // The migration core's clock: deadlines and queries of prepared copies.
        ctx.run_interval(Duration::from_millis(10), |act, _| {
            act.shared.driver.tick(&act.shared)
        });
        // Membership: what this node is, to every peer, once a second; then the
        // rebalancer, when it is on and this node leads.
        ctx.run_interval(
            Duration::from_millis(crate::members::GOSSIP_MS),
            |act, _| {
                act.shared.gossip();
                act.shared.expire_second_hand_members();
                act.shared.rebalancer_tick();
            },
        );
        // Traffic rates: one window per second.
        let clock = std::time::Instant::now();
        ctx.run_interval(Duration::from_millis(1000), move |act, _| {
            lock(&act.shared.traffic).roll(clock.elapsed().as_millis() as u64)
        });
        // Leases of replicated services, and the waits of their standbys.
        ctx.run_interval(
            Duration::from_millis(crate::replicas::REPLICA_TICK_MS),
            |act, _| act.shared.replicas_tick(),
        );
        // The delivery ledger's confirmations, batched.
        ctx.run_interval(Duration::from_millis(PROGRESS_MS), |act, _| {
            act.shared.report_progress()
        });
        // Idle services are asked to sleep.
        let sleep_ms = self.shared.limits.sleep_after_idle_ms;
        if sleep_ms > 0 {
            ctx.run_interval(Duration::from_millis(sleep_ms), |act, _| {
                act.shared.registry.with_all(|services| {
                    for s in services.values() {
                        s.idle_round();
                    }
                })
            });
        }
    }
}

/// How often a node tells senders' nodes what its services have taken.
const PROGRESS_MS: u64 = 20;

/// How long a stopping node waits for its connections to close cleanly.
const SHUTDOWN_LINGER: Duration = Duration::from_millis(500);

#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Stop;

/// Ends the node's system at once (see [`NodeHandle::halt`]).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Halt;

impl Handler<Halt> for NodeActor {
    type Result = ();

    fn handle(&mut self, _: Halt, _: &mut Self::Context) {
        tracing::info!(node = %self.shared.name, "node halted");
        System::current().stop();
    }
}

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
    pub(crate) shared: Arc<NodeShared>,
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
        let role = config.identity.role()?;
        if role != crate::certs::Role::Node {
            return Err(Error::Cert(format!(
                "{name}'s certificate is an {role}'s: a node needs a node certificate \
                 (`tern ca issue {name}`)"
            )));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        // The node's thread logs where this one does (`trace::spawn`).
        let thread = crate::trace::spawn(format!("tern-{name}"), move || {
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
    let live = crate::tls::Liveness {
        idle_timeout_ms: config.limits.idle_timeout_ms,
        keep_alive_ms: config.limits.keep_alive_ms,
    };
    let trust = crate::trust::Trust::new(config.identity.clone(), live)?;
    if let Some(crl) = &config.revocations {
        trust.install(crl)?;
    }
    let endpoint = endpoint(
        trust.server_config()?,
        config.listen,
        config.socket_wrap.as_ref(),
    )?;
    let local_addr = endpoint
        .local_addr()
        .map_err(|e| Error::io("reading local address", e))?;
    let limits = config.limits.clone();
    let (store, loaded) = match &config.data_dir {
        Some(dir) => {
            let (store, loaded) = crate::store::Store::open(dir)?;
            (Some(store), Some(loaded))
        }
        None => (None, None),
    };
    // The top half names this node (so a peer can tell where an id was born), the bottom
    // half is drawn at each start (so a restarted node mints new ids).
    let id_prefix = tern_proto::speakers::prefix_for(&name, random_prefix()? as u32);
    let mut bell = (limits.sleep_after_idle_ms > 0).then(crate::mailbox::Bell::new);
    let shared = Arc::new(NodeShared {
        name: name.clone(),
        dispatch: crate::trace::current_dispatch(),
        stats: Stats::default(),
        asks: AskTable::new(limits.asks_pending_max),
        id_prefix,
        next_id: AtomicU64::new(1),
        kinds: RwLock::new(HashMap::new()),
        kind_versions: RwLock::new(HashMap::new()),
        registry: Registry::new(limits.services_max, name.clone()),
        bell: bell.as_ref().map(|(b, _)| b.clone()),
        books: Books::new(limits.book_edges_max),
        links: Links::new(limits.peers_max),
        logs: Logs::new(limits.events_max, limits.losses_max),
        endpoint: endpoint.clone(),
        arbiter: OnceLock::new(),
        thread: OnceLock::new(),
        stopping: AtomicBool::new(false),
        halted: Halted::default(),
        driver: Driver::new(name.clone(), &limits),
        channels: Mutex::new(IdMap::default()),
        gaps_pending: Mutex::new(VecDeque::new()),
        handled_pending: Mutex::new(Vec::new()),
        traffic: Mutex::new(TrafficSketch::new(limits.traffic_edges_max)),
        members: Mutex::new(Members::new(MemberInfo {
            name: name.clone(),
            addr: (!local_addr.ip().is_unspecified()).then_some(local_addr),
            capabilities: config.capabilities.clone(),
            load: Default::default(),
            power: Default::default(),
            draining: false,
            rebalancing: false,
            id_prefix,
            services: Vec::new(),
            standbys: Vec::new(),
            edges: Vec::new(),
            kinds: Vec::new(),
            held: Vec::new(),
            names: Vec::new(),
            incarnation: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            version: 1,
        })),
        placement: Default::default(),
        admins: config.admins.clone(),
        trust,
        admin_connections: AtomicUsize::new(0),
        snapshot_bytes_in: Arc::new(AtomicUsize::new(0)),
        handled_waiting: Mutex::new(Default::default()),
        senders: crate::senders::SenderTables::new(name.clone()),
        names: Default::default(),
        gossip_pending: AtomicBool::new(false),
        replicas: crate::replicas::Replicas::new(tern_proto::replica::Settings::default()),
        store,
        limits,
    });
    // Grantor terms start above any a former life used: from the data directory when there
    // is one, else from the clock (microseconds since 1970; a life supersedes far fewer
    // times than it lives microseconds).
    let clock_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let term_base = match &shared.store {
        Some(store) => store
            .next_term_base(clock_us)
            .map_err(|detail| Error::Store {
                path: store.path().display().to_string(),
                detail,
            })?,
        None => clock_us,
    };
    shared.replicas.set_term_base(term_base);
    if let Some(store) = &shared.store {
        // Senders wait for their checkpoints to be on disk: confirmed as soon as a batch is
        // written, on the node's own thread.
        let weak = Arc::downgrade(&shared);
        let arbiter = actix_rt::Arbiter::current();
        store.on_written(move || {
            let weak = weak.clone();
            arbiter.spawn(async move {
                if let Some(node) = weak.upgrade() {
                    node.confirm_durable();
                }
            });
        });
    }
    if let Some(loaded) = loaded {
        let held = loaded.checkpoints.len();
        for problem in shared.replicas.load(&name, loaded) {
            shared.logs.event("store-unreadable", problem);
        }
        if let Some(store) = &shared.store {
            tracing::info!(node = %name, path = %store.path().display(), checkpoints = held,
                "data directory opened");
        }
    }
    let _ = shared.arbiter.set(actix_rt::Arbiter::current());
    let _ = shared.thread.set(std::thread::current().id());
    for p in &config.peers {
        shared
            .links
            .get_or_insert(&NodeName::new(&p.name), Some(p.addr), &shared.limits)?;
    }
    actix_rt::spawn(transport::accept_loop(shared.clone(), endpoint));
    if let Some((_, keys)) = bell.take() {
        actix_rt::spawn(crate::service::ring_sleepers(keys));
    }
    let actor = NodeActor {
        shared: shared.clone(),
    }
    .start();
    tracing::info!(node = %name, addr = %local_addr, "node listening");
    Ok((shared, actor, local_addr))
}

impl NodeHandle {
    /// The node's name, from its certificate.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// assert_eq!(phone.name().as_str(), "phone");
    /// assert_eq!(tv.name().as_str(), "tv");
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn name(&self) -> &NodeName {
        self.shared.name()
    }

    /// The UDP address the node listens on.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// // What a peer dials to reach the tv.
    /// let addr = tv.local_addr();
    /// assert!(addr.ip().is_loopback() && addr.port() != 0);
    /// phone.add_peer("tv", addr)?;
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The node's capabilities now (see [`set_capabilities`](Self::set_capabilities)).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// phone.set_capabilities(&["display", "speaker"]);
    /// assert_eq!(phone.capabilities(), ["display", "speaker"]);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn capabilities(&self) -> Vec<String> {
        self.shared.capabilities()
    }

    /// The node's limits.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let limits = phone.limits();
    /// println!("a mailbox holds {} messages, a node {} services", limits.mailbox_capacity, limits.services_max);
    /// assert!(limits.mailbox_capacity > 0);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// Registers service kind `S` so this node can run and restore it.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// # use serde::{Deserialize, Serialize};
    /// # use tern::{Ctx, Service};
    /// #[derive(Serialize, Deserialize)]
    /// struct Lamp { on: bool }
    /// #[derive(Serialize, Deserialize)]
    /// enum LampMsg { Toggle }
    /// impl Service for Lamp {
    ///     type Msg = LampMsg;
    ///     const KIND: &'static str = "lamp";
    ///     const VERSION: u32 = 1;
    ///     async fn handle(&mut self, LampMsg::Toggle: LampMsg, _ctx: &mut Ctx<Self>) {
    ///         self.on = !self.on;
    ///     }
    /// }
    /// // Every node that may run the kind registers it, here and wherever it may move.
    /// assert!(phone.spawn(Lamp { on: false }).is_err());
    /// phone.register::<Lamp>();
    /// tv.register::<Lamp>();
    /// let lamp = phone.spawn(Lamp { on: false })?;
    /// lamp.tell(LampMsg::Toggle)?;
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn register<S: Service>(&self) -> &Self {
        self.shared.register::<S>();
        // Peers plan only for nodes that have a kind: tell them now, not at the next round.
        self.shared.gossip();
        self
    }

    /// Starts a service of a registered kind on this node.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = phone.spawn(Counter { total: 5 })?;
    /// counter.tell(CounterMsg::Add(2))?;
    /// assert_eq!(block_on(counter.ask(CounterMsg::Total, SECS_10))?, 7);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn spawn<S: Service>(&self, state: S) -> Result<ServiceRef<S>, Error> {
        self.shared.spawn(state, None)
    }

    /// Starts a service on peer `node` from `state`, through that node's kind registry.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// // Started on the tv from the phone; the handle works from here.
    /// let counter = block_on(phone.spawn_on(tv.name(), &Counter { total: 1 }, SECS_10))?;
    /// assert!(tv.services().iter().any(|s| s.addr.id == counter.id()));
    /// assert_eq!(block_on(counter.ask(CounterMsg::Total, SECS_10))?, 1);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
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
            .links
            .get(node)
            .ok_or_else(|| DeliveryError::UnknownNode { node: node.clone() })?;
        let bytes = rmp_serde::to_vec(state).map_err(|e| Error::State {
            kind: S::kind_key(),
            detail: e.to_string(),
        })?;
        let (req, rx) = self.shared.asks.open(node.clone(), None)?;
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
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// use tern::Service as _;
    /// // A state saved earlier, as MessagePack (how snapshots carry it too).
    /// let saved = rmp_serde::to_vec(&Counter { total: 7 })?;
    /// let addr = tv.restore(&Counter::kind_key(), &saved)?;
    /// let counter = tv.resolve::<Counter>(&addr)?;
    /// assert_eq!(block_on(counter.ask(CounterMsg::Total, SECS_10))?, 7);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn restore(&self, kind: &KindKey, state: &[u8]) -> Result<ServiceAddr, Error> {
        self.shared.restore(kind, state)
    }

    /// A typed handle to the service at `addr`, local or remote. `S` must be of `addr`'s
    /// kind (else [`DeliveryError::KindMismatch`]), in any version: during a rolling update a
    /// device may hold a handle of its own version to a service that runs another one (see
    /// [`Service::UPGRADES`]).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let addr = tv.spawn(Counter::default())?.addr().clone();
    /// // An address travels (in a message, a book, a file); a node makes a handle of it.
    /// let counter = phone.resolve::<Counter>(&addr)?;
    /// counter.tell(CounterMsg::Add(2))?;
    /// assert_eq!(block_on(counter.ask(CounterMsg::Total, SECS_10))?, 2);
    /// // Of the wrong kind, it is refused.
    /// assert!(phone.resolve::<tern::doc_support::Probe>(&addr).is_err());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn resolve<S: Service>(&self, addr: &ServiceAddr) -> Result<ServiceRef<S>, DeliveryError> {
        self.shared.resolve(addr)
    }

    /// Answers an ask from outside any service.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// # use std::sync::{mpsc, Mutex, OnceLock};
    /// # use serde::{Deserialize, Serialize};
    /// # use tern::{Ctx, ReplyTo, Service};
    /// // A desk hands each question to a worker thread, which answers through the node.
    /// static WORK: OnceLock<Mutex<mpsc::Sender<ReplyTo<u64>>>> = OnceLock::new();
    /// #[derive(Serialize, Deserialize)]
    /// struct Desk;
    /// #[derive(Serialize, Deserialize)]
    /// enum DeskMsg { Question(ReplyTo<u64>) }
    /// impl Service for Desk {
    ///     type Msg = DeskMsg;
    ///     const KIND: &'static str = "desk";
    ///     const VERSION: u32 = 1;
    ///     async fn handle(&mut self, DeskMsg::Question(reply): DeskMsg, _ctx: &mut Ctx<Self>) {
    ///         let _ = WORK.get().expect("a worker").lock().expect("lock").send(reply);
    ///     }
    /// }
    /// let (tx, rx) = mpsc::channel();
    /// WORK.set(Mutex::new(tx)).expect("set once");
    /// tv.register::<Desk>();
    /// let desk = tv.spawn(Desk)?;
    /// let node = tv.clone();
    /// std::thread::spawn(move || {
    ///     let reply = rx.recv().expect("a question");
    ///     node.reply(reply, 42).expect("answered");
    /// });
    /// assert_eq!(block_on(desk.ask(DeskMsg::Question, SECS_10))?, 42);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn reply<R: Serialize + Send + 'static>(
        &self,
        to: ReplyTo<R>,
        value: R,
    ) -> Result<(), DeliveryError> {
        self.shared.reply(to, value)
    }

    /// Adds or replaces entry `role` in the book of local service `holder` (an id, an
    /// address or a handle). The book is kept where the holder runs: a holder that does not
    /// run here is refused, naming where it was looked for.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let player = tv.spawn(Counter::default())?;
    /// let lyrics = phone.spawn(Counter::default())?;
    /// // The player names the lyrics service "lyrics": its channel moves with it.
    /// tv.book_insert(player.id(), "lyrics", lyrics.addr())?;
    /// assert_eq!(tv.book(player.id()), [("lyrics".to_string(), lyrics.addr().clone())]);
    /// // A holder that does not run here is refused.
    /// assert!(phone.book_insert(player.id(), "lyrics", lyrics.addr()).is_err());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn book_insert(
        &self,
        holder: impl Into<ServiceId>,
        role: &str,
        target: &ServiceAddr,
    ) -> Result<(), Error> {
        let id = holder.into();
        let addr = self
            .shared
            .local_addr_of(id)
            .ok_or_else(|| DeliveryError::UnknownService {
                id,
                node: self.name().clone(),
            })?;
        self.shared.book_insert(&addr, role, target.clone())
    }

    /// Removes entry `role` from the book of `holder`.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let player = tv.spawn(Counter::default())?;
    /// let lyrics = tv.spawn(Counter::default())?;
    /// tv.book_insert(player.id(), "lyrics", lyrics.addr())?;
    /// assert!(tv.book_remove(player.id(), "lyrics"));
    /// assert!(!tv.book_remove(player.id(), "lyrics"));
    /// assert!(tv.book(player.id()).is_empty());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn book_remove(&self, holder: impl Into<ServiceId>, role: &str) -> bool {
        self.shared.book_remove(holder.into(), role)
    }

    /// The book of `holder`, as this node knows it.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let player = tv.spawn(Counter::default())?;
    /// let lyrics = tv.spawn(Counter::default())?;
    /// tv.book_insert(player.id(), "lyrics", lyrics.addr())?;
    /// for (role, addr) in tv.book(player.id()) {
    ///     println!("{role}: {} on {}", addr.id, addr.node);
    /// }
    /// assert_eq!(tv.book(player.id()).len(), 1);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn book(&self, holder: impl Into<ServiceId>) -> Vec<(String, ServiceAddr)> {
        let holder = holder.into();
        self.shared.books.book(holder)
    }

    /// Who `id` holds and who holds it, across the cluster as this node knows it.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let player = tv.spawn(Counter::default())?;
    /// let lyrics = tv.spawn(Counter::default())?;
    /// tv.book_insert(player.id(), "lyrics", lyrics.addr())?;
    /// let of_lyrics = tv.associations(lyrics.id());
    /// assert_eq!(of_lyrics.held_by[0].0.id, player.id());
    /// assert_eq!(of_lyrics.held_by[0].1, "lyrics");
    /// assert_eq!(tv.associations(player.id()).holds[0].1.id, lyrics.id());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn associations(&self, id: ServiceId) -> Associations {
        self.shared.books.associations(id)
    }

    /// Moves service `id` to node `to` while it runs. The service may be on this node or on a
    /// peer (the request then goes to the node hosting it).
    ///
    /// `Ok` only when it moved; otherwise [`Error::NotMoved`] carries the report (which
    /// service, from where, to where, and why: [`AbortReason`](crate::AbortReason)), and the
    /// service runs on where it was. A target that is draining, lacks a capability the kind
    /// requires or has not registered the kind is refused before anything freezes
    /// ([`AbortReason::Unfit`](crate::AbortReason::Unfit)) unless `opts.force` (which cannot
    /// give a node a kind it lacks). The service is then held where it landed (`opts.hold`,
    /// the default): automatic placement leaves it alone until [`release`](Self::release).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// # let id = phone.spawn(Counter::default())?.id();
    /// # block_on(async {
    /// match phone.migrate(id, "tv", tern::MigrateOptions::default()).await {
    ///     Ok(report) => println!("moved in {} us of freeze, {} messages carried", report.freeze_us, report.carried),
    ///     Err(tern::Error::NotMoved(why)) => println!("still where it was: {why}"),
    ///     Err(e) => println!("could not ask: {e}"),
    /// }
    /// # });
    /// assert_eq!(tv.location(id), Some(tv.name().clone()));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn migrate(
        &self,
        id: ServiceId,
        to: impl Into<NodeName>,
        opts: MigrateOptions,
    ) -> Result<MigrationReport, Error> {
        moved(self.shared.migrate(id, to.into(), opts).await?)
    }

    /// Lets automatic placement move `id` again (an explicit move held it where it put it).
    /// `false` when it was not held. Works on the node that runs the service.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = phone.spawn(Counter::default())?;
    /// block_on(phone.migrate(counter.id(), "tv", tern::MigrateOptions::default()))?;
    /// // The move holds it on the tv; releasing it lets placement move it again.
    /// assert!(tv.is_held(counter.id()));
    /// assert!(tv.release(counter.id())?);
    /// assert!(!tv.release(counter.id())?);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn release(&self, id: ServiceId) -> Result<bool, Error> {
        self.shared.release(id)
    }

    /// Whether local service `id` is held where an explicit move put it.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = phone.spawn(Counter::default())?;
    /// assert!(!phone.is_held(counter.id()));
    /// block_on(phone.migrate(counter.id(), "tv", tern::MigrateOptions::default()))?;
    /// assert!(tv.is_held(counter.id()));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_held(&self, id: ServiceId) -> bool {
        self.shared.placement.is_held(id)
    }

    /// Registers `name` for local service `id`, cluster-wide: any node finds it with
    /// [`lookup`](Self::lookup). The name moves with the service and goes when it stops. A name
    /// another service holds is refused ([`NameError::Taken`](crate::NameError::Taken)).
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Serialize, Deserialize)] struct Board;
    /// # #[derive(Serialize, Deserialize)] enum BoardMsg { Stroke(u32) }
    /// # impl tern::Service for Board {
    /// #     type Msg = BoardMsg;
    /// #     const KIND: &'static str = "board";
    /// #     const VERSION: u32 = 1;
    /// #     async fn handle(&mut self, _m: BoardMsg, _c: &mut tern::Ctx<Self>) {}
    /// # }
    /// # let (phone, tv) = tern::doc_support::two_nodes()?;
    /// # phone.register::<Board>();
    /// # tv.register::<Board>();
    /// let board = phone.spawn(Board)?;
    /// phone.register_name("board", board.id())?;
    /// // On any node, once gossip has reached it (within a second):
    /// # for _ in 0..2000 { if tv.lookup::<Board>("board").is_ok() { break } std::thread::sleep(std::time::Duration::from_millis(5)); }
    /// let found = tv.lookup::<Board>("board")?;
    /// found.tell(BoardMsg::Stroke(1))?;
    /// assert_eq!(found.id(), board.id());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn register_name(&self, name: &str, id: ServiceId) -> Result<(), Error> {
        self.shared.register_name(name, id)
    }

    /// Removes `name` if local service `id` holds it; `true` if it did.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let clock = phone.spawn(Counter::default())?;
    /// phone.register_name("clock", clock.id())?;
    /// assert!(phone.unregister_name("clock", clock.id()));
    /// assert!(!phone.unregister_name("clock", clock.id()));
    /// assert!(phone.lookup::<Counter>("clock").is_err());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn unregister_name(&self, name: &str, id: ServiceId) -> bool {
        self.shared.unregister_name(name, id)
    }

    /// A handle to the service registered as `name`, wherever it runs; it follows the
    /// service when it moves. [`NameError::Unknown`](crate::NameError::Unknown) when no node
    /// this one hears from has it; a kind other than `S` is
    /// [`DeliveryError::KindMismatch`](crate::DeliveryError::KindMismatch).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let clock = phone.spawn(Counter::default())?;
    /// phone.register_name("clock", clock.id())?;
    /// let found = phone.lookup::<Counter>("clock")?;
    /// assert_eq!(found.id(), clock.id());
    /// // The name moves with the service, and the handle follows it.
    /// block_on(phone.migrate(clock.id(), "tv", tern::MigrateOptions::default()))?;
    /// found.tell(CounterMsg::Add(1))?;
    /// assert_eq!(block_on(found.ask(CounterMsg::Total, SECS_10))?, 1);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn lookup<S: Service>(&self, name: &str) -> Result<ServiceRef<S>, Error> {
        self.shared.lookup(name)
    }

    /// Every registered name this node knows of, with its service, sorted by name.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let clock = phone.spawn(Counter::default())?;
    /// let alarm = phone.spawn(Counter::default())?;
    /// phone.register_name("clock", clock.id())?;
    /// phone.register_name("alarm", alarm.id())?;
    /// assert_eq!(phone.names(), [("alarm".to_string(), alarm.id()), ("clock".to_string(), clock.id())]);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn names(&self) -> Vec<(String, ServiceId)> {
        self.shared.all_names()
    }

    /// The assembly tree rooted at `root`: root first, then breadth first, each member with
    /// its parent and the node it runs on.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let player = tv.spawn(Counter::default())?;
    /// let lyrics = tv.spawn(Counter::default())?;
    /// tv.adopt(player.id(), lyrics.addr())?;
    /// let tree = tv.tree(player.id())?;
    /// assert_eq!(tree.len(), 2);
    /// assert_eq!((tree[0].addr.id, tree[0].depth), (player.id(), 0));
    /// assert_eq!((tree[1].addr.id, tree[1].parent), (lyrics.id(), Some(player.id())));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn tree(&self, root: ServiceId) -> Result<Vec<TreeMember>, Error> {
        self.shared.tree(root)
    }

    /// Makes `child` a child of `parent` (which runs on this node) in its assembly tree. A
    /// service has one parent at most and a tree has no cycle.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let player = tv.spawn(Counter::default())?;
    /// let lyrics = tv.spawn(Counter::default())?;
    /// tv.adopt(player.id(), lyrics.addr())?;
    /// assert_eq!(tv.children(player.id()), [lyrics.id()]);
    /// // One parent at most, and no cycle.
    /// assert!(tv.adopt(lyrics.id(), player.addr()).is_err());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn adopt(&self, parent: ServiceId, child: &ServiceAddr) -> Result<(), Error> {
        self.shared.adopt(parent, child)
    }

    /// Moves the whole tree of `root` to `to` as one unit: every member is frozen at once,
    /// and all move or none does. Channels between members are local again on `to`;
    /// channels to the rest of the cluster are rebuilt as for one service.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let player = phone.spawn(Counter::default())?;
    /// let lyrics = player_child(&phone, &player)?;
    /// # fn player_child(phone: &tern::NodeHandle, player: &tern::ServiceRef<Counter>) -> Result<tern::ServiceId, tern::Error> {
    /// #     let child = phone.spawn(Counter::default())?;
    /// #     phone.adopt(player.id(), child.addr())?;
    /// #     Ok(child.id())
    /// # }
    /// let report = block_on(phone.migrate_tree(player.id(), "tv", tern::MigrateOptions::default()))?;
    /// println!("{} services moved, frozen for {} us", report.members.len(), report.freeze_us);
    /// assert_eq!(report.members.len(), 2);
    /// assert_eq!(phone.location(lyrics), Some(tv.name().clone()));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn migrate_tree(
        &self,
        root: ServiceId,
        to: impl Into<NodeName>,
        opts: MigrateOptions,
    ) -> Result<GroupReport, Error> {
        group_moved(self.shared.migrate_tree(root, to.into(), opts).await?)
    }

    /// Moves services that run on one node as one unit, each to its own node (a split
    /// tree): all or none, frozen together. `Ok` only when all moved; otherwise
    /// [`Error::NotMoved`] with every member's report.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let player = phone.spawn(Counter::default())?;
    /// let queue = phone.spawn(Counter::default())?;
    /// // Both move, frozen together, or neither does.
    /// let report = block_on(phone.migrate_group(
    ///     &[(player.id(), "tv"), (queue.id(), "tv")],
    ///     tern::MigrateOptions::default(),
    /// ))?;
    /// assert!(report.committed);
    /// assert_eq!(report.members.len(), 2);
    /// assert_eq!(phone.location(queue.id()).map(|n| n.to_string()), Some("tv".into()));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn migrate_group<N: Into<NodeName> + Clone>(
        &self,
        moves: &[(ServiceId, N)],
        opts: MigrateOptions,
    ) -> Result<GroupReport, Error> {
        let moves = moves
            .iter()
            .map(|(id, to)| (*id, to.clone().into()))
            .collect();
        group_moved(self.shared.migrate_group(moves, opts).await?)
    }

    /// Every node this one knows, itself first: capabilities, load, power, status.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let members = phone.members();
    /// // Itself first.
    /// assert_eq!(members[0].info.name.as_str(), "phone");
    /// for m in &members {
    ///     println!("{}: {:?}, capabilities {:?}", m.info.name, m.status, m.info.capabilities);
    /// }
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn members(&self) -> Vec<Member> {
        self.shared.members()
    }

    /// Replaces this node's capabilities (a display turned off, a speaker plugged in). Peers
    /// learn at the next gossip; local services that require a capability the node lost are
    /// moved to a node that has it, and those that prefer one to a node that offers it.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// tv.set_capabilities(&["display"]);
    /// // The display turned off: what requires one moves to a node that has it.
    /// tv.set_capabilities(&[]);
    /// assert!(tv.capabilities().is_empty());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_capabilities(&self, capabilities: &[&str]) {
        let caps: Vec<String> = capabilities.iter().map(|c| c.to_string()).collect();
        lock(&self.shared.members).update_me(|me| me.capabilities = caps);
        self.shared.gossip();
        self.shared
            .capabilities_changed(std::slice::from_ref(self.name()));
    }

    /// Sets this device's power. At or below `Limits::drain_below_percent` on battery, the
    /// node drains: every movable service moves to the best peers (see
    /// [`drain`](Self::drain)); the report lands in the event log (`drained`). Back on mains,
    /// or above the threshold, a node that drained for its battery takes services again
    /// (`power-restored`); a drain a user asked for stays.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// use tern::Power;
    /// phone.set_power(Power::Battery { percent: 8 }); // drains
    /// assert_eq!(phone.members()[0].info.power, Power::Battery { percent: 8 });
    /// phone.set_power(Power::Plugged); // charging: placement may use the phone again
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_power(&self, power: Power) {
        lock(&self.shared.members).update_me(|me| me.power = power);
        let low = matches!(power, Power::Battery { percent } if percent <= self.shared.limits.drain_below_percent);
        let draining = lock(&self.shared.members).me().draining;
        if !low
            && draining
            && self
                .shared
                .placement
                .power_drain
                .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            lock(&self.shared.members).update_me(|me| me.draining = false);
            self.shared
                .logs
                .event("power-restored", format!("{power}: taking services again"));
        }
        self.shared.gossip();
        if low && !draining {
            // Marked at once, so that power coming back before the drain starts ends it.
            lock(&self.shared.members).update_me(|me| me.draining = true);
            self.shared
                .placement
                .power_drain
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.shared
                .logs
                .event("power-low", format!("{power}: draining"));
            let node = self.shared.clone();
            self.shared.spawn_task(async move {
                if node
                    .placement
                    .power_drain
                    .load(std::sync::atomic::Ordering::SeqCst)
                {
                    node.drain().await;
                }
            });
        }
    }

    /// Pins (or unpins) local service `id`: placement, drain and the rebalancer never move
    /// it, and `migrate` refuses to.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = phone.spawn(Counter::default())?;
    /// phone.pin(counter.id(), true);
    /// let refused = block_on(phone.migrate(counter.id(), "tv", tern::MigrateOptions::default()));
    /// assert!(refused.is_err());
    /// phone.pin(counter.id(), false);
    /// block_on(phone.migrate(counter.id(), "tv", tern::MigrateOptions::default()))?;
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn pin(&self, id: ServiceId, pinned: bool) {
        self.shared.placement.pin(id, pinned);
        // The check itself is the protocol core's: it refuses whoever asks (this node, a
        // peer's request, a group or tree, the service's own `ctx.migrate`).
        self.shared.driver.pin(id, pinned);
    }

    /// Observed traffic of the edges touching this node's services, heaviest first.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// for edge in phone.traffic() {
    ///     println!("{} -> {}: {:.1} msgs/s, {} in all", edge.from, edge.to, edge.msgs_per_s, edge.total_msgs);
    /// }
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn traffic(&self) -> Vec<EdgeRate> {
        self.shared.traffic()
    }

    /// Counters of this node's migrations: committed, aborted by reason, freeze histogram.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = phone.spawn(Counter::default())?;
    /// block_on(phone.migrate(counter.id(), "tv", tern::MigrateOptions::default()))?;
    /// let stats = phone.migration_stats();
    /// assert_eq!((stats.started, stats.committed), (1, 1));
    /// assert_eq!(tv.migration_stats().arrived, 1);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn migration_stats(&self) -> MigrationStats {
        self.shared.driver.stats()
    }

    /// Where this node believes service `id` runs.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = phone.spawn(Counter::default())?;
    /// assert_eq!(phone.location(counter.id()), Some(phone.name().clone()));
    /// block_on(phone.migrate(counter.id(), "tv", tern::MigrateOptions::default()))?;
    /// assert_eq!(phone.location(counter.id()), Some(tv.name().clone()));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn location(&self, id: ServiceId) -> Option<NodeName> {
        if self.shared.slot(id).is_some() {
            return Some(self.name().clone());
        }
        self.shared.driver.location(id).map(|(n, _)| n)
    }

    /// Children of `id` in its assembly tree, wherever they run (from the cluster-wide
    /// books: a parent holds each child under the role `child:<id>`).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let player = tv.spawn(Counter::default())?;
    /// let lyrics = tv.spawn(Counter::default())?;
    /// assert!(tv.children(player.id()).is_empty());
    /// tv.adopt(player.id(), lyrics.addr())?;
    /// assert_eq!(tv.children(player.id()), [lyrics.id()]);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn children(&self, id: ServiceId) -> Vec<ServiceId> {
        self.shared
            .children_of(id)
            .into_iter()
            .map(|a| a.id)
            .collect()
    }

    /// Services running on this node.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = phone.spawn(Counter::default())?;
    /// let info = phone.services().into_iter().find(|s| s.addr.id == counter.id()).expect("runs here");
    /// println!("{} {}: {} of {} queued", info.addr.kind, info.addr.id, info.mailbox_depth, info.mailbox_capacity);
    /// assert_eq!(info.epoch, 0);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn services(&self) -> Vec<ServiceInfo> {
        self.shared.service_infos()
    }

    /// Where a replicated service this node runs stands: its standby, its voters, the
    /// checkpoints acknowledged (`None` for a service not run here or not replicated; see
    /// [`Service::REPLICAS`](crate::Service::REPLICAS)).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// # let id = phone.spawn(Counter::default())?.id();
    /// # let node = &phone;
    /// if let Some(r) = node.replica(id) {
    ///     println!("standby {:?}, {} checkpoints acknowledged", r.standby, r.acked);
    /// }
    /// // A counter is not replicated (`Service::REPLICAS` is 0).
    /// assert!(node.replica(id).is_none());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn replica(&self, id: impl Into<ServiceId>) -> Option<crate::ReplicaInfo> {
        self.shared.replicas.info(id.into())
    }

    /// The checkpoints this node holds as the standby of other nodes' services, by service.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// // Checkpoints of replicated services (`Service::REPLICAS`) that run elsewhere.
    /// for held in tv.standby_checkpoints() {
    ///     println!("{held:?}");
    /// }
    /// assert!(tv.standby_checkpoints().is_empty());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn standby_checkpoints(&self) -> Vec<crate::StandbyInfo> {
        self.shared.replicas.held()
    }

    /// The checkpoints in this node's data directory ([`NodeConfig::data_dir`]), by service,
    /// once every checkpoint cut before the call is written (it waits for the disk). Empty
    /// without a data directory.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// # let node = &phone;
    /// for c in node.stored_checkpoints()? {
    ///     println!("{} at epoch {}: checkpoint {}", c.service, c.epoch, c.no);
    /// }
    /// // Started without a data directory: nothing is stored.
    /// assert!(node.stored_checkpoints()?.is_empty());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stored_checkpoints(&self) -> Result<Vec<crate::StoredInfo>, Error> {
        let Some(store) = &self.shared.store else {
            return Ok(Vec::new());
        };
        store.flush();
        let rows = store.stored().map_err(|detail| Error::Store {
            path: store.path().display().to_string(),
            detail,
        })?;
        Ok(rows
            .into_iter()
            .map(|(service, epoch, no)| crate::StoredInfo { service, epoch, no })
            .collect())
    }

    /// Services whose checkpoints this node found in its data directory when it started and
    /// has not resumed or given up yet (it claims each once its kind is registered): service,
    /// kind, stored epoch.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// // Only a node started on a data directory with checkpoints in it resumes anything.
    /// for (id, kind, epoch) in phone.resuming() {
    ///     println!("{kind} {id} from epoch {epoch}");
    /// }
    /// assert!(phone.resuming().is_empty());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn resuming(&self) -> Vec<(ServiceId, KindKey, u64)> {
        self.shared.replicas.dormant()
    }

    /// A snapshot of the node's counters.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = phone.spawn(Counter::default())?;
    /// counter.tell(CounterMsg::Add(1))?;
    /// block_on(counter.ask(CounterMsg::Total, SECS_10))?;
    /// let stats = phone.stats();
    /// // The add was handled before the ask was taken (the ask's own count may come later).
    /// assert!(stats.processed >= 1 && stats.services_live >= 1);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stats(&self) -> NodeStats {
        self.shared.snapshot_stats()
    }

    /// Messages sent from this node that were declared lost with a node, oldest first
    /// (the last `losses_max`; `stats()` counts them all). See [`LossReport`].
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// // Messages that will not be handled, or may not have been, as their senders learn it.
    /// for loss in phone.losses() {
    ///     println!("to {}: {} messages from {}", loss.service, loss.messages, loss.sender);
    /// }
    /// assert!(phone.losses().is_empty());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn losses(&self) -> Vec<LossReport> {
        self.shared.logs.losses()
    }

    /// The node's recent events, oldest first.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = phone.spawn(Counter::default())?;
    /// block_on(phone.migrate(counter.id(), "tv", tern::MigrateOptions::default()))?;
    /// let events = phone.events();
    /// assert!(events.iter().any(|e| e.kind == "migration" && e.detail.contains(" to tv")));
    /// for e in events {
    ///     println!("{} {}", e.kind, e.detail);
    /// }
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn events(&self) -> Vec<NodeEvent> {
        self.shared.logs.events()
    }

    /// Offers the cluster CA's revocation list (`tern ca revoke` writes it as `crl.pem`;
    /// [`ClusterCa::revocation_list`](crate::certs::ClusterCa::revocation_list) makes one).
    /// When it is newer than the list this node holds, every handshake checks it from now on,
    /// connections whose certificates it revokes are closed at once (their services' senders
    /// get loss reports), and it spreads to every other node. A list the CA did not sign is
    /// refused with the reason.
    ///
    /// ```
    /// use tern::certs::ClusterCa;
    /// use tern::{Node, NodeConfig};
    /// let ca = ClusterCa::new()?;
    /// let node = Node::start(NodeConfig::new(ca.issue("phone")?, "127.0.0.1:0".parse()?))?;
    /// // The watch was stolen: its certificate is revoked, and refused from now on.
    /// let stolen = ca.issue("watch")?;
    /// let crl = ca.revocation_list(&[stolen.serial()?], 1)?;
    /// node.install_revocations(&crl)?;
    /// assert!(node.revocations().is_some_and(|r| r.revokes(&stolen.serial().unwrap())));
    /// # node.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn install_revocations(&self, crl: &[u8]) -> Result<crate::trust::Installed, Error> {
        self.shared
            .install_revocations(crl, &format!("{} itself", self.shared.name))
    }

    /// The revocation list this node holds, if any.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// // None until the cluster's authority installs a list (`install_revocations`).
    /// assert!(phone.revocations().is_none());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn revocations(&self) -> Option<Arc<crate::trust::Revocations>> {
        self.shared.trust.revocations()
    }

    /// Replaces this node's certificate without restarting (a renewed one before the old
    /// expires, or a new key after a leak): connections made from now on present it; those
    /// already open keep the one they were made with until they close. It must be a node's
    /// certificate for this node's name from the same CA, and not revoked.
    ///
    /// ```
    /// use tern::certs::ClusterCa;
    /// use tern::{Node, NodeConfig};
    /// let ca = ClusterCa::new()?;
    /// let node = Node::start(NodeConfig::new(ca.issue("phone")?, "127.0.0.1:0".parse()?))?;
    /// let before = node.identity().serial()?;
    /// // A renewed certificate: new connections present it.
    /// node.reload_identity(ca.issue(node.name().as_str())?)?;
    /// assert_ne!(node.identity().serial()?, before);
    /// # node.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn reload_identity(&self, identity: crate::certs::NodeIdentity) -> Result<(), Error> {
        let server = self.shared.trust.reload(identity)?;
        self.shared.endpoint.set_server_config(Some(server));
        self.shared.logs.event(
            "certificate-reloaded",
            format!(
                "serial {}",
                crate::certs::hex(&self.shared.trust.identity().serial()?)
            ),
        );
        Ok(())
    }

    /// The certificate this node presents now.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let identity = phone.identity();
    /// assert_eq!(identity.name()?.as_str(), "phone");
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn identity(&self) -> crate::certs::NodeIdentity {
        self.shared.trust.identity()
    }

    /// Adds (or re-addresses) a peer; the node connects to it.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// // Already connected: the address is kept up to date.
    /// tv.add_peer("phone", phone.local_addr())?;
    /// assert!(tv.is_connected("phone"));
    /// // A node is not its own peer.
    /// assert!(phone.add_peer("phone", phone.local_addr()).is_err());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn add_peer(&self, name: &str, addr: SocketAddr) -> Result<(), Error> {
        crate::certs::check_node_name(name)?;
        if name == self.name().as_str() {
            return Err(Error::Config(format!("node {name} cannot be its own peer")));
        }
        self.shared
            .links
            .get_or_insert(&NodeName::new(name), Some(addr), &self.shared.limits)?;
        Ok(())
    }

    /// The state of every link to a peer.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let link = phone.peers().into_iter().find(|p| p.name.as_str() == "tv").expect("a peer");
    /// assert!(link.connected);
    /// println!("tv at {:?}, rtt {:?}", link.addr, link.link.map(|l| l.rtt_us));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn peers(&self) -> Vec<PeerStatus> {
        self.shared.links.all().iter().map(|l| l.status()).collect()
    }

    /// True when a connection to `peer` is up.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// assert!(phone.is_connected("tv"));
    /// assert!(!phone.is_connected("car"));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn is_connected(&self, peer: &str) -> bool {
        self.shared
            .links
            .get(&NodeName::new(peer))
            .is_some_and(|l| l.is_connected())
    }

    /// Stops the node at once, as a crash would: its services handle nothing more, no
    /// goodbye goes to its peers and nothing lingers; its actix system ends and its thread is
    /// joined. Peers learn only by their idle timeout. For fault tests (the harness's
    /// `Cluster::kill`); a node leaving on purpose calls [`shutdown`](Self::shutdown).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = tv.spawn(Counter::default())?;
    /// tv.halt();
    /// // Gone as a crash would be: the tv handles nothing more.
    /// assert!(tv.spawn(Counter::default()).is_err());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn halt(&self) {
        self.shared.halted.0.store(true, Ordering::SeqCst);
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.actor.do_send(Halt);
        self.join();
        // As a device losing power: what was not written yet is not written.
        if let Some(store) = &self.shared.store {
            store.close(false);
        }
    }

    fn join(&self) {
        let thread = lock(&self.thread).take();
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::error!(node = %self.name(), "node thread panicked");
            }
        }
    }

    /// Stops the node: closes its endpoint, ends its actix system and joins its thread.
    /// Pending asks on this node fail with `NodeLost`.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = tv.spawn(Counter::default())?;
    /// tv.shutdown();
    /// assert!(tv.spawn(Counter::default()).is_err());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn shutdown(&self) {
        self.actor.do_send(Stop);
        self.join();
        if let Some(store) = &self.shared.store {
            store.close(true);
        }
    }
}

/// One line describing a migration report, for the event log.
pub(crate) fn describe(r: &MigrationReport) -> String {
    match &r.aborted {
        None => format!(
            "{} moved {} to {} (epoch {}): freeze {} us, total {} us, {} bytes, {} carried, {} forwarded",
            r.migration, r.service, r.to, r.epoch, r.freeze_us, r.total_us, r.snapshot_bytes, r.carried, r.forwarded
        ),
        Some(why) => format!("{} did not move {} to {}: {why}", r.migration, r.service, r.to),
    }
}

impl NodeShared {
    /// Migrates `id` (hosted here, or on the peer the directory names) to `to`.
    pub async fn migrate(
        self: &Arc<Self>,
        id: ServiceId,
        to: NodeName,
        opts: MigrateOptions,
    ) -> Result<MigrationReport, Error> {
        self.migrate_as(id, to, opts, false).await
    }

    /// [`migrate`](Self::migrate), for automatic placement when `spare_held`: the node that
    /// runs the service refuses to move it if a user's move holds it there
    /// ([`AbortReason::Held`](tern_proto::migration::AbortReason::Held)); only that node
    /// knows for sure (gossip of holds may be a second old).
    pub async fn migrate_as(
        self: &Arc<Self>,
        id: ServiceId,
        to: NodeName,
        opts: MigrateOptions,
        spare_held: bool,
    ) -> Result<MigrationReport, Error> {
        if self.slot(id).is_some() {
            let refuse = if spare_held && self.placement.is_held(id) {
                Some(tern_proto::migration::AbortReason::Held)
            } else {
                self.preflight(&[(id, to.clone())], &opts)
                    .await
                    .map(|(_, why)| why)
            };
            let rx = self.driver.migrate(self, id, to, opts, refuse);
            return rx.await.map_err(|_| Error::Stopped);
        }
        let unknown = || -> Error {
            DeliveryError::UnknownService {
                id,
                node: self.name.clone(),
            }
            .into()
        };
        let ask = |at: NodeName, to: NodeName| {
            self.request_migration(at, Some(id), REQUEST_SLACK, move |req| MigMsg::Request {
                req,
                service: id,
                to,
                drain: opts.drain,
                force: opts.force,
                hold: opts.hold,
                spare_held,
            })
        };
        let known = self
            .driver
            .location(id)
            .map(|(n, _)| n)
            .or_else(|| lock(&self.channels).get(&id).map(|c| c.location().0))
            .or_else(|| self.hosting_member(id));
        let Some(at) = known else {
            // Started on a peer a moment ago (gossip has not said so yet): ask the peers, one
            // after the other; the one that hosts it answers.
            for link in self.links.all().into_iter().filter(|l| l.is_connected()) {
                match ask(link.name.clone(), to.clone()).await {
                    Err(Error::Remote { detail, .. }) if detail.contains(NOT_HERE) => continue,
                    other => return other,
                }
            }
            return Err(unknown());
        };
        if at == self.name {
            return Err(unknown());
        }
        match ask(at.clone(), to.clone()).await {
            // This node's directory was stale (it missed a move's `Located`, say under a
            // cut): ask once more where membership gossip, at most a second old, says it is.
            Err(Error::Remote { node, detail }) if detail.contains(NOT_HERE) => {
                match self.hosting_member(id).filter(|alt| *alt != at) {
                    Some(alt) => ask(alt, to).await,
                    None => Err(Error::Remote { node, detail }),
                }
            }
            other => other,
        }
    }

    /// Sends a migration request made by `make` (given its request id) to `at` and waits for
    /// the answer: up to the migration deadline plus `slack` (the carried queues may still be
    /// streaming after the commit).
    pub async fn request_migration<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        at: NodeName,
        target: Option<ServiceId>,
        slack: Duration,
        make: impl FnOnce(u64) -> MigMsg,
    ) -> Result<T, Error> {
        let wait = Duration::from_millis(self.limits.migration_deadline_ms) + slack;
        self.ask_control(at, target, wait, make).await
    }

    /// Sends a control request made by `make` to `at` and waits up to `wait` for the answer.
    pub async fn request_control<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        at: NodeName,
        wait: Duration,
        make: impl FnOnce(u64) -> MigMsg,
    ) -> Result<T, Error> {
        self.ask_control(at, None, wait, make).await
    }

    async fn ask_control<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        at: NodeName,
        target: Option<ServiceId>,
        wait: Duration,
        make: impl FnOnce(u64) -> MigMsg,
    ) -> Result<T, Error> {
        let link = self
            .links
            .get(&at)
            .ok_or_else(|| DeliveryError::UnknownNode { node: at.clone() })?;
        let (req, rx) = self.asks.open(at.clone(), target)?;
        if let Err(e) = link.push_ctrl(&Frame::Mig(make(req))) {
            self.asks.cancel(req);
            return Err(e.into());
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(ReplyPayload::Failed(detail))) => Err(Error::Remote { node: at, detail }),
            Ok(Ok(p)) => Ok(p.into_typed()?),
            Ok(Err(_)) => Err(AskError::NodeLost { node: at }.into()),
            Err(_) => {
                self.asks.cancel(req);
                Err(AskError::Timeout {
                    timeout_ms: wait.as_millis() as u64,
                }
                .into())
            }
        }
    }
}

/// A migration's report as the public calls give it: `Ok` only when it moved.
pub(crate) fn moved(r: MigrationReport) -> Result<MigrationReport, Error> {
    if r.committed() {
        Ok(r)
    } else {
        Err(crate::reports::NotMoved {
            reports: vec![r],
            refused: Vec::new(),
        }
        .into())
    }
}

/// A group's report as the public calls give it: `Ok` only when every member moved.
pub(crate) fn group_moved(g: GroupReport) -> Result<GroupReport, Error> {
    if g.committed {
        Ok(g)
    } else {
        Err(crate::reports::NotMoved {
            reports: g.members,
            refused: Vec::new(),
        }
        .into())
    }
}

/// What a node answers to a migration request for a service it does not run.
pub(crate) const NOT_HERE: &str = "does not run on";

/// Beyond the migration deadline, how long a remote migration request waits for its report
/// (the carried queue may still be streaming after commit).
const REQUEST_SLACK: Duration = Duration::from_secs(30);

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

    /// Waits up to 10 s for `cond`.
    fn until(what: &str, cond: impl Fn() -> bool) {
        let started = std::time::Instant::now();
        while !cond() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "waited for {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The versions a node keeps of its peers' kinds hold only what members say now: a kind a
    /// member no longer lists, and a member that left, are forgotten.
    #[test]
    fn peers_versions_are_forgotten_when_a_member_stops_listing_the_kind_or_leaves() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct TallyV1(u64);
        impl Service for TallyV1 {
            type Msg = u64;
            const KIND: &'static str = "tally";
            const VERSION: u32 = 1;
            async fn handle(&mut self, n: u64, _: &mut crate::Ctx<Self>) {
                self.0 += n;
            }
        }
        #[derive(serde::Serialize, serde::Deserialize)]
        struct TallyV2(u64);
        impl Service for TallyV2 {
            type Msg = u64;
            const KIND: &'static str = "tally";
            const VERSION: u32 = 2;
            const UPGRADES: &'static [crate::Upgrade<Self>] = &[crate::Upgrade {
                from: 1,
                state: |b| crate::read_older::<u64>(b).map(TallyV2),
                msg: crate::read_older::<u64>,
            }];
            async fn handle(&mut self, n: u64, _: &mut crate::Ctx<Self>) {
                self.0 += n;
            }
        }
        let (phone, tv) = crate::doc_support::two_nodes().expect("two nodes");
        phone.register::<TallyV2>();
        tv.register::<TallyV1>();
        until("the phone to learn the tv's version", || {
            phone.shared.versions_known("tally") == 1
        });
        // Gossip from the tv that no longer lists the kind.
        phone.shared.note_versions(tv.name(), &[]);
        assert_eq!(phone.shared.versions_known("tally"), 0);
        until("the tv's next gossip", || {
            phone.shared.versions_known("tally") == 1
        });
        // The tv leaves (it says goodbye): forgotten.
        tv.shutdown();
        until("the tv's version to be forgotten", || {
            phone.shared.versions_known("tally") == 0
        });
        phone.shutdown();
    }

    #[test]
    fn pending_asks_are_bounded_and_freed() {
        let table = AskTable::new(2);
        let node = NodeName::new("b");
        let (a1, _r1) = table.open(node.clone(), None).unwrap();
        let (_a2, _r2) = table.open(node.clone(), None).unwrap();
        assert!(matches!(
            table.open(node.clone(), None),
            Err(AskError::TooManyPending { max: 2 })
        ));
        table.cancel(a1);
        assert!(
            table.open(node, None).is_ok(),
            "a cancelled ask frees its place"
        );
        assert!(
            !table.complete(a1, ReplyPayload::Failed("late".into())).0,
            "a late reply finds nothing"
        );
    }

    #[test]
    fn a_refused_ask_gives_back_its_request_number() {
        let table = AskTable::new(4);
        let (to, from) = (ServiceId::from_parts(1, 1), ServiceId::from_parts(2, 1));
        let node = NodeName::new("b");
        let (a1, _r1) = table.open(node.clone(), Some(to)).unwrap();
        let (a2, _r2) = table.open(node, Some(to)).unwrap();
        table.numbered(a1, from, 7);
        table.numbered(a2, from, 8);
        let refused = ReplyPayload::Refused(DeliveryError::Stopped { id: to });
        assert_eq!(table.complete(a1, refused), (true, Some((to, from, 7))));
        let answered = ReplyPayload::Bytes(vec![]);
        assert_eq!(
            table.complete(a2, answered),
            (true, None),
            "an answered request was taken"
        );
    }

    #[test]
    fn a_lost_node_fails_the_asks_only_it_can_answer() {
        let table = AskTable::new(16);
        let (b, c) = (NodeName::new("b"), NodeName::new("c"));
        let (moved, stayed) = (ServiceId::from_parts(1, 1), ServiceId::from_parts(1, 2));
        let (_, mut to_b) = table.open(b.clone(), None).unwrap();
        let (_, mut to_stayed) = table.open(b.clone(), Some(stayed)).unwrap();
        // Sent to b, but the service has moved on to c since: c answers it.
        let (_, mut to_moved) = table.open(b.clone(), Some(moved)).unwrap();
        let (_, mut to_c) = table.open(c.clone(), None).unwrap();
        let failed = table.fail_lost(&b, |id| (id == moved).then(|| c.clone()));
        assert_eq!(failed, 2);
        assert!(to_b.try_recv().is_err() && to_stayed.try_recv().is_err());
        assert!(matches!(
            to_b.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(
            to_moved.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        assert!(matches!(
            to_c.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        assert_eq!(table.len(), 2);
    }
}
