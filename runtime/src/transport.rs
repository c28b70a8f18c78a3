//! Links to peers over QUIC: one connection per pair of nodes, a control stream, one data
//! stream per direction, bounded outgoing queues that survive reconnections.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::Instrument;

use crate::error::{DeliveryError, Error};
use crate::events::Logs;
use crate::limits::Limits;
use crate::stats::Stats;
use crate::sync::lock;
use tern_proto::ids::{NodeName, ServiceId};
use tern_proto::wire::{self, code, encode_frame, Frame, FrameReader, WireError};

/// Bytes asked of quinn per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Bytes queued for a peer past which a waiting sender lets the writer run before going on.
/// Keeps the link pipelined (encode, send and the peer's decode overlap) instead of filling the
/// whole queue and then writing it in one burst.
const LINK_FLUSH_BYTES: usize = 256 * 1024;
/// Pause between two dials of the same peer.
const REDIAL_MS: u64 = 500;

/// What the transport needs of the node it serves: its name, limits, counters, event log and
/// links, and what to do when a connection comes up or goes down, with each incoming stream,
/// and with an admin connection. The node implements it (`host.rs`); the transport names
/// nothing above itself.
pub(crate) trait Host: 'static {
    /// This node's name.
    fn name(&self) -> &NodeName;
    /// Its bounds.
    fn limits(&self) -> &Limits;
    /// Its counters.
    fn stats(&self) -> &Stats;
    /// Its event log.
    fn logs(&self) -> &Logs;
    /// Its peer links.
    fn links(&self) -> &Links;
    /// The QUIC endpoint it dials from and listens on.
    fn endpoint(&self) -> &quinn::Endpoint;
    /// The client side to dial a peer with (the node's current certificate and checks).
    fn dial_config(&self) -> quinn::ClientConfig;
    /// True once the node is stopping: no more dials.
    fn stopping(&self) -> bool;
    /// The capabilities announced in `Hello` and `Welcome`.
    fn capabilities(&self) -> Vec<String>;
    /// A connection to `link` is up and its streams are about to start.
    fn link_up(&self, link: &PeerLink);
    /// The connection to `peer` went down (`left`: the peer said it was shutting down).
    fn link_down(self: &Arc<Self>, peer: &NodeName, left: bool);
    /// The sink an incoming stream's frames go to.
    fn open_stream(self: &Arc<Self>, link: &Arc<PeerLink>, kind: StreamKind)
        -> Box<dyn StreamSink>;
    /// Serves a connection that negotiated the admin protocol (`wire::ADMIN_ALPN`).
    fn serve_admin(
        self: Arc<Self>,
        conn: quinn::Connection,
        name: NodeName,
        role: crate::certs::Role,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;
}

/// A bounded byte queue of encoded frames waiting for a stream.
pub(crate) struct OutQueue {
    buf: Mutex<Pending>,
    ready: Notify,
    space: Notify,
    bytes_max: usize,
    frame_bytes_max: usize,
    /// Set while the peer is declared lost (its connection ended and no new one is up): new
    /// messages fail at once with `PeerLost` (see [`PeerLink::check_up`]) instead of waiting,
    /// unreported, for a node that may never come back; protocol frames (gaps, fences, skips)
    /// still queue, for the case it does. A link that was never up queues as usual.
    lost: AtomicBool,
}

/// Encoded frames waiting for the writer, and the open batch at their end, if any.
#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    batch: Option<wire::BatchTail>,
}

/// Who sent a message and where it stands in that sender's channel to the receiver; the ask id
/// (on the sender's node) when it is a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Meta {
    pub from: Option<ServiceId>,
    pub seq: u64,
    pub ask: Option<u64>,
    /// The sender is a replicated service: its node keeps a copy of the message until the
    /// receiver is seen to take it, for its checkpoints to carry (`KeptOutput`). Local only,
    /// never on the wire.
    pub keep: bool,
}

fn delivery_error(e: WireError) -> DeliveryError {
    match e {
        WireError::TooLarge { len, max } => DeliveryError::TooLarge {
            bytes: len as usize,
            max,
        },
        other => DeliveryError::Encode(other.to_string()),
    }
}

impl OutQueue {
    fn new(bytes_max: usize, frame_bytes_max: usize) -> Self {
        OutQueue {
            buf: Mutex::new(Pending::default()),
            ready: Notify::new(),
            space: Notify::new(),
            bytes_max,
            frame_bytes_max,
            lost: AtomicBool::new(false),
        }
    }

    /// The peer was declared lost (`true`) or is connected again (`false`). Senders waiting
    /// for room are woken: they find out which.
    fn set_lost(&self, lost: bool) {
        self.lost.store(lost, Ordering::SeqCst);
        self.space.notify_waiters();
    }

    /// Runs `write` on the pending bytes if they are under the bound, then wakes the writer if
    /// they were empty; the bytes queued afterwards.
    ///
    /// Bytes that join a non-empty queue need no wake: the writer takes the whole queue at
    /// once, under the same lock, so the take that will empty it has not happened yet and the
    /// append that made it non-empty woke the writer for it.
    fn append(
        &self,
        peer: &NodeName,
        write: impl FnOnce(&mut Pending) -> Result<(), DeliveryError>,
    ) -> Result<usize, DeliveryError> {
        let (queued, was_empty) = {
            let mut p = lock(&self.buf);
            let before = p.bytes.len();
            if before >= self.bytes_max {
                return Err(DeliveryError::Backpressure {
                    node: peer.clone(),
                    bytes_max: self.bytes_max,
                });
            }
            write(&mut p)?;
            (p.bytes.len(), before == 0)
        };
        if was_empty {
            self.ready.notify_one();
        }
        Ok(queued)
    }

    /// Queues one frame; the bytes queued afterwards.
    pub(crate) fn push(&self, peer: &NodeName, frame: &Frame<'_>) -> Result<usize, DeliveryError> {
        self.append(peer, |p| {
            encode_frame(&mut p.bytes, frame, self.frame_bytes_max).map_err(delivery_error)?;
            p.batch = None;
            Ok(())
        })
    }

    /// Queues a message that is not an ask: it joins the batch at the end of the queue when it
    /// continues it (same target, sender and wait flag, next number), else starts one.
    fn push_message(
        &self,
        peer: &NodeName,
        (to, meta, wait, msg): (ServiceId, Meta, bool, &[u8]),
    ) -> Result<usize, DeliveryError> {
        debug_assert!(meta.ask.is_none(), "asks are never batched");
        self.append(peer, |p| {
            let Pending { bytes, batch } = p;
            let joined = match batch {
                Some(tail) if tail.takes(to, meta.from, meta.seq, wait) => {
                    wire::append_to_batch(bytes, tail, msg, self.frame_bytes_max)
                }
                _ => false,
            };
            if !joined {
                let tail = wire::start_batch(
                    bytes,
                    (to, meta.from, meta.seq, wait, msg),
                    self.frame_bytes_max,
                )
                .map_err(delivery_error)?;
                *batch = Some(tail);
            }
            Ok(())
        })
    }

    /// Waits until at most `bytes` are queued (the writer takes everything at once).
    async fn drained_to(&self, bytes: usize) {
        loop {
            let space = self.space.notified();
            tokio::pin!(space);
            space.as_mut().enable();
            if self.queued_bytes() <= bytes || self.lost.load(Ordering::SeqCst) {
                return;
            }
            space.await;
        }
    }

    fn queued_bytes(&self) -> usize {
        lock(&self.buf).bytes.len()
    }

    /// Swaps the queued bytes into `out` (which must be empty).
    fn take(&self, out: &mut Vec<u8>) {
        debug_assert!(out.is_empty());
        {
            let mut p = lock(&self.buf);
            std::mem::swap(&mut p.bytes, out);
            // The open batch left with the bytes.
            p.batch = None;
        }
        if !out.is_empty() {
            self.space.notify_waiters();
        }
    }
}

struct LiveConn {
    conn: quinn::Connection,
    dialed_by_me: bool,
    gen: u64,
}

struct LinkState {
    addr: Option<SocketAddr>,
    live: Option<LiveConn>,
    dialing: bool,
    last_dial: Option<Instant>,
    caps: Vec<String>,
    last_error: Option<String>,
    gen: u64,
    /// Made because another peer's gossip named it, and never connected since: the first
    /// to go when the table is full.
    heard_only: bool,
}

/// The state of a link, as shown to users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The peer.
    pub name: NodeName,
    /// Where it is dialed, if known.
    pub addr: Option<SocketAddr>,
    /// True when a connection is up.
    pub connected: bool,
    /// The peer's capabilities, from its handshake.
    pub capabilities: Vec<String>,
    /// Why the last connection attempt or connection failed.
    pub last_error: Option<String>,
    /// Figures of the current connection, if one is up.
    #[serde(default)]
    pub link: Option<LinkFigures>,
    /// Bytes of frames queued for the peer and not yet written to its connection (data and
    /// control queues, each bounded by `Limits::link_queue_bytes_max`).
    #[serde(default)]
    pub queued_bytes: u64,
}

/// What QUIC measured on a live connection to a peer (reset when the connection is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkFigures {
    /// The smoothed round-trip time (µs).
    pub rtt_us: u64,
    /// UDP payload bytes sent on this connection.
    pub sent_bytes: u64,
    /// UDP payload bytes received on this connection.
    pub received_bytes: u64,
    /// Packets sent on this connection.
    pub sent_packets: u64,
    /// Of those, the packets QUIC declared lost (and sent again what they carried).
    pub lost_packets: u64,
    /// Congestion events on this connection (losses or ECN marks that shrank the window).
    pub congestion_events: u64,
    /// The congestion window now (bytes).
    pub cwnd_bytes: u64,
}

impl LinkFigures {
    fn of(conn: &quinn::Connection) -> Self {
        let s = conn.stats();
        LinkFigures {
            rtt_us: u64::try_from(s.path.rtt.as_micros()).unwrap_or(u64::MAX),
            sent_bytes: s.udp_tx.bytes,
            received_bytes: s.udp_rx.bytes,
            sent_packets: s.path.sent_packets,
            lost_packets: s.path.lost_packets,
            congestion_events: s.path.congestion_events,
            cwnd_bytes: s.path.cwnd,
        }
    }
}

/// The peer links of a node, by name (at most `peers_max`). One of the node's subsystems:
/// its lock is a leaf (a link is cloned out, then used).
pub(crate) struct Links {
    peers: RwLock<HashMap<NodeName, Arc<PeerLink>>>,
    peers_max: usize,
}

impl Links {
    /// No links yet; at most `peers_max`.
    pub fn new(peers_max: usize) -> Self {
        Links {
            peers: RwLock::new(HashMap::new()),
            peers_max,
        }
    }

    /// The link to `name`, if there is one.
    pub fn get(&self, name: &NodeName) -> Option<Arc<PeerLink>> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// Every link.
    pub fn all(&self) -> Vec<Arc<PeerLink>> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The link to `name`, made (with `limits`) if new. `addr` updates where to dial it. A
    /// link made only because gossip named a member goes first when the table is full.
    pub fn get_or_insert(
        &self,
        name: &NodeName,
        addr: Option<SocketAddr>,
        limits: &Limits,
    ) -> Result<Arc<PeerLink>, Error> {
        self.insert(name, addr, limits, false)
    }

    /// Removes the links made from gossip that never connected and whose member `known`
    /// no longer names; returns them.
    pub fn drop_heard_only(&self, known: impl Fn(&NodeName) -> bool) -> Vec<NodeName> {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        let out: Vec<NodeName> = peers
            .iter()
            .filter(|(n, l)| l.is_heard_only() && !known(n))
            .map(|(n, _)| n.clone())
            .collect();
        for n in &out {
            peers.remove(n);
        }
        out
    }

    /// The link to a member another peer's gossip named: made only while there is room, and
    /// the first to go for a peer that is configured or connecting.
    pub fn insert_heard(
        &self,
        name: &NodeName,
        addr: SocketAddr,
        limits: &Limits,
    ) -> Result<Arc<PeerLink>, Error> {
        self.insert(name, Some(addr), limits, true)
    }

    fn insert(
        &self,
        name: &NodeName,
        addr: Option<SocketAddr>,
        limits: &Limits,
        heard_only: bool,
    ) -> Result<Arc<PeerLink>, Error> {
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(link) = peers.get(name) {
            if addr.is_some() {
                link.set_addr(addr);
            }
            return Ok(link.clone());
        }
        if peers.len() >= self.peers_max {
            // A peer that is configured or connecting takes the place of one only heard of.
            let out = peers
                .iter()
                .find(|(_, l)| !heard_only && l.is_heard_only())
                .map(|(n, _)| n.clone());
            match out {
                Some(out) => {
                    peers.remove(&out);
                }
                None => {
                    return Err(Error::Limit {
                        what: "peers",
                        max: self.peers_max,
                    })
                }
            }
        }
        let link = Arc::new(PeerLink::new(name.clone(), addr, limits));
        lock(&link.state).heard_only = heard_only;
        peers.insert(name.clone(), link.clone());
        Ok(link)
    }
}

/// Everything this node keeps about one peer. Outlives connections: frames queued while no
/// connection is up are sent when one comes.
pub(crate) struct PeerLink {
    pub name: NodeName,
    pub(crate) data: OutQueue,
    ctrl: OutQueue,
    state: Mutex<LinkState>,
    /// Bytes reserved for the states of this peer's snapshots still arriving (its share of
    /// the node's, within `Limits::snapshot_bytes_in_per_peer_max`).
    pub(crate) snapshot_bytes_in: Arc<std::sync::atomic::AtomicUsize>,
}

thread_local! {
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub(crate) fn encode_scratch<T: Serialize, R>(
    value: &T,
    then: impl FnOnce(&[u8]) -> Result<R, DeliveryError>,
) -> Result<R, DeliveryError> {
    SCRATCH.with(|cell| {
        let mut guard = cell.try_borrow_mut();
        let mut fresh = Vec::new();
        let buf: &mut Vec<u8> = match guard.as_mut() {
            Ok(b) => b,
            Err(_) => &mut fresh,
        };
        buf.clear();
        rmp_serde::encode::write(buf, value).map_err(|e| DeliveryError::Encode(e.to_string()))?;
        then(buf)
    })
}

impl PeerLink {
    pub fn new(name: NodeName, addr: Option<SocketAddr>, limits: &Limits) -> Self {
        PeerLink {
            name,
            data: OutQueue::new(limits.link_queue_bytes_max, limits.frame_bytes_max),
            ctrl: OutQueue::new(limits.link_queue_bytes_max, limits.frame_bytes_max),
            state: Mutex::new(LinkState {
                addr,
                live: None,
                dialing: false,
                last_dial: None,
                caps: Vec::new(),
                last_error: None,
                gen: 0,
                heard_only: false,
            }),
            snapshot_bytes_in: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        }
    }

    pub fn set_addr(&self, addr: Option<SocketAddr>) {
        lock(&self.state).addr = addr;
    }

    /// The live QUIC connection, if any.
    pub fn connection(&self) -> Option<quinn::Connection> {
        lock(&self.state).live.as_ref().map(|l| l.conn.clone())
    }

    pub fn is_connected(&self) -> bool {
        lock(&self.state).live.is_some()
    }

    /// Made from gossip and never connected.
    fn is_heard_only(&self) -> bool {
        let st = lock(&self.state);
        st.heard_only && st.live.is_none()
    }

    pub fn status(&self) -> PeerStatus {
        let st = lock(&self.state);
        PeerStatus {
            name: self.name.clone(),
            addr: st.addr,
            connected: st.live.is_some(),
            capabilities: st.caps.clone(),
            last_error: st.last_error.clone(),
            link: st.live.as_ref().map(|l| LinkFigures::of(&l.conn)),
            queued_bytes: (self.data.queued_bytes() + self.ctrl.queued_bytes()) as u64,
        }
    }

    pub fn push_ctrl(&self, frame: &Frame<'_>) -> Result<(), DeliveryError> {
        self.ctrl.push(&self.name, frame).map(drop)
    }

    /// `PeerLost` while the peer is declared lost and not connected again: a new message for it
    /// would wait, unreported, for a node that may never come back.
    pub(crate) fn check_up(&self) -> Result<(), DeliveryError> {
        if self.data.lost.load(Ordering::SeqCst) {
            return Err(DeliveryError::PeerLost {
                node: self.name.clone(),
            });
        }
        Ok(())
    }

    pub(crate) fn deliver<M: Serialize>(
        &self,
        to: ServiceId,
        meta: Meta,
        wait: bool,
        msg: &M,
    ) -> Result<usize, DeliveryError> {
        self.check_up()?;
        encode_scratch(msg, |bytes| self.deliver_encoded(to, meta, wait, bytes))
    }

    /// [`deliver`](Self::deliver) for a message already encoded (a replicated service's kept
    /// copy).
    pub(crate) fn deliver_encoded(
        &self,
        to: ServiceId,
        meta: Meta,
        wait: bool,
        bytes: &[u8],
    ) -> Result<usize, DeliveryError> {
        self.check_up()?;
        match meta.ask {
            None => self.data.push_message(&self.name, (to, meta, wait, bytes)),
            Some(_) => self.data.push(
                &self.name,
                &Frame::Deliver {
                    to,
                    from: meta.from,
                    seq: meta.seq,
                    ask: meta.ask,
                    wait,
                    msg: bytes,
                },
            ),
        }
    }

    /// Whether a waiting sender that left `queued` bytes on the link must let it drain
    /// ([`settle`](Self::settle)) before it goes on.
    pub(crate) fn must_settle(queued: usize) -> bool {
        queued > LINK_FLUSH_BYTES
    }

    /// After a waiting sender queued `queued` bytes: lets the stream drain when it is long.
    pub(crate) async fn settle(&self, queued: usize) {
        if Self::must_settle(queued) && self.is_connected() {
            self.data.drained_to(LINK_FLUSH_BYTES).await;
        }
    }

    /// Waits until the data queue holds at most `bytes`.
    pub(crate) async fn data_drained_to(&self, bytes: usize) {
        self.data.drained_to(bytes).await
    }

    /// Waits until a queue that answered `Backpressure` has room again.
    pub(crate) async fn data_room(&self, bytes_max: usize) {
        self.data.drained_to(bytes_max / 2).await
    }

    /// Replies travel on the control stream: a data stream held by a full mailbox must never
    /// keep an answer from its asker.
    pub fn send_reply<R: Serialize>(&self, ask: u64, value: &R) -> Result<(), DeliveryError> {
        encode_scratch(value, |bytes| {
            self.ctrl.push(
                &self.name,
                &Frame::Reply {
                    ask,
                    result: wire::ReplyBody::Value(bytes),
                },
            )
        })
        .map(drop)
    }

    /// Why a new connection `conn` under this peer's name cannot be the peer itself while its
    /// live connection is up: it holds another key (a second certificate for the name), or the
    /// same key from another address (a copy of the certificate). A node dials from the one
    /// socket it also listens on, so the node itself, restarted, comes from the same address
    /// with the same key. `None`: no live connection, or the same node. A connection this node
    /// dialed is checked by key only: the address dialed need not be the one the peer's own
    /// connection comes from.
    fn collision(&self, conn: &quinn::Connection, dialed: bool) -> Option<String> {
        let live = lock(&self.state)
            .live
            .as_ref()
            .filter(|l| l.conn.close_reason().is_none())
            .map(|l| l.conn.clone())?;
        if live.stable_id() == conn.stable_id() {
            return None;
        }
        let key = |c: &quinn::Connection| {
            crate::tls::peer_cert(c).and_then(|der| crate::certs::key_of(&der).ok())
        };
        let (there, here) = (live.remote_address(), conn.remote_address());
        if key(&live) != key(conn) {
            Some(format!(
                "{} is connected from {there} with another key",
                self.name
            ))
        } else if there != here && !dialed {
            Some(format!("{} is connected from {there}", self.name))
        } else {
            None
        }
    }

    /// Whether to keep a connection this peer dialed to us. Of two connections between the
    /// same pair, the one dialed by the node with the smaller name wins, on both sides.
    fn accept_incoming(&self, me: &NodeName) -> bool {
        let st = lock(&self.state);
        if me > &self.name {
            return true;
        }
        let mine_up = st.live.as_ref().is_some_and(|l| l.dialed_by_me);
        !(mine_up || st.dialing)
    }

    /// Makes `conn` the link's connection; closes the one it replaces.
    fn install(&self, conn: quinn::Connection, dialed_by_me: bool, caps: Vec<String>) -> u64 {
        let mut st = lock(&self.state);
        st.gen += 1;
        let gen = st.gen;
        st.heard_only = false;
        if let Some(old) = st.live.replace(LiveConn {
            conn,
            dialed_by_me,
            gen,
        }) {
            old.conn
                .close(quinn::VarInt::from_u32(code::DUPLICATE as u32), b"replaced");
        }
        st.caps = caps;
        st.last_error = None;
        self.data.set_lost(false);
        self.ctrl.set_lost(false);
        gen
    }

    fn is_current(&self, gen: u64) -> bool {
        lock(&self.state)
            .live
            .as_ref()
            .is_some_and(|l| l.gen == gen)
    }

    /// The connection of generation `gen` ended.
    fn lost(&self, gen: u64, reason: String) -> bool {
        let mut st = lock(&self.state);
        if st.live.as_ref().is_some_and(|l| l.gen == gen) {
            st.live = None;
            st.last_error = Some(reason);
            self.data.set_lost(true);
            self.ctrl.set_lost(true);
            true
        } else {
            false
        }
    }

    fn fail_dial(&self, reason: String) {
        let mut st = lock(&self.state);
        st.dialing = false;
        st.last_error = Some(reason);
    }
}

/// Dials every peer with an address and no connection, at most once per `REDIAL_MS`.
pub(crate) fn maintain_links<H: Host>(node: &Arc<H>) {
    if node.stopping() {
        return;
    }
    for link in node.links().all() {
        let addr = {
            let mut st = lock(&link.state);
            let due = st
                .last_dial
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(REDIAL_MS));
            match st.addr {
                Some(addr) if st.live.is_none() && !st.dialing && due => {
                    st.dialing = true;
                    st.last_dial = Some(Instant::now());
                    addr
                }
                _ => continue,
            }
        };
        let span = tracing::info_span!("dial", node = %node.name(), peer = %link.name, %addr);
        actix_rt::spawn(dial(node.clone(), link, addr).instrument(span));
    }
}

async fn dial<H: Host>(node: Arc<H>, link: Arc<PeerLink>, addr: SocketAddr) {
    match dial_inner(&node, &link, addr).await {
        Ok(()) => {}
        Err(e) => {
            tracing::debug!(error = %e, "dial failed");
            link.fail_dial(e.to_string());
        }
    }
}

fn conn_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tls(format!("{what}: {e}"))
}

async fn dial_inner<H: Host>(
    node: &Arc<H>,
    link: &Arc<PeerLink>,
    addr: SocketAddr,
) -> Result<(), Error> {
    let handshake = Duration::from_millis(node.limits().handshake_timeout_ms);
    let connecting = node
        .endpoint()
        .connect_with(node.dial_config(), addr, link.name.as_str())
        .map_err(|e| conn_err("connect", e))?;
    let conn = tokio::time::timeout(handshake, connecting)
        .await
        .map_err(|_| conn_err("handshake", "timed out"))?
        .map_err(|e| conn_err("handshake", e))?;
    let (name, role) = crate::tls::peer_name_and_role(&conn)?;
    let refuse = |reason: &[u8], why: String| {
        conn.close(quinn::VarInt::from_u32(code::REFUSED as u32), reason);
        Err(Error::Cert(format!("dialed {}, but {why}", link.name)))
    };
    if role != crate::certs::Role::Node {
        return refuse(
            b"not a node certificate",
            format!("it answered with an {role} certificate, not a node's"),
        );
    }
    if name != link.name {
        return refuse(b"unexpected name", format!("the certificate names {name}"));
    }
    if let Some(why) = link.collision(&conn, true) {
        return refuse(b"name collision", format!("name collision: {why}"));
    }
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| conn_err("open control stream", e))?;
    let mut hello = Vec::new();
    encode_frame(
        &mut hello,
        &Frame::Hello {
            caps: node.capabilities(),
        },
        node.limits().frame_bytes_max,
    )?;
    send.write_all(&hello)
        .await
        .map_err(|e| conn_err("hello", e))?;
    let mut reader = FrameReader::new(node.limits().frame_bytes_max);
    let answer = tokio::time::timeout(handshake, read_handshake(&mut recv, &mut reader))
        .await
        .map_err(|_| conn_err("waiting for welcome", "timed out"))??;
    match answer {
        Handshake::Welcome(caps) => {
            {
                let mut st = lock(&link.state);
                st.dialing = false;
            }
            register(node, link, conn, true, send, recv, reader, caps);
            Ok(())
        }
        Handshake::Reject(reason) => {
            conn.close(quinn::VarInt::from_u32(code::REFUSED as u32), b"rejected");
            let mut st = lock(&link.state);
            st.dialing = false;
            if reason.starts_with("duplicate") {
                // The peer keeps the connection it dialed; nothing failed.
                return Ok(());
            }
            Err(Error::Remote {
                node: link.name.clone(),
                detail: reason,
            })
        }
        Handshake::Hello(_) => Err(Error::Wire(WireError::Unexpected {
            kind: "hello",
            stream: "control",
        })),
    }
}

enum Handshake {
    Hello(Vec<String>),
    Welcome(Vec<String>),
    Reject(String),
}

async fn read_handshake(
    recv: &mut quinn::RecvStream,
    reader: &mut FrameReader,
) -> Result<Handshake, Error> {
    loop {
        if let Some(body) = reader.next_frame()? {
            return match wire::decode(body)? {
                Frame::Hello { caps } => Ok(Handshake::Hello(caps)),
                Frame::Welcome { caps } => Ok(Handshake::Welcome(caps)),
                Frame::Reject { reason } => Ok(Handshake::Reject(reason)),
                other => Err(Error::Wire(WireError::Unexpected {
                    kind: other.kind(),
                    stream: "handshake",
                })),
            };
        }
        match recv.read_chunk(READ_CHUNK_BYTES, true).await {
            Ok(Some(chunk)) => reader.push(&chunk.bytes),
            Ok(None) => {
                reader.finish()?;
                return Err(conn_err("handshake", "stream ended before a frame"));
            }
            Err(e) => return Err(conn_err("handshake", e)),
        }
    }
}

/// Accepts connections until the endpoint closes.
pub(crate) async fn accept_loop<H: Host>(node: Arc<H>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        let span = tracing::info_span!("accept", node = %node.name(), %remote);
        actix_rt::spawn(accept_one(node.clone(), incoming).instrument(span));
    }
}

fn refuse<H: Host>(node: &H, what: String) {
    tracing::warn!(refusal = %what, "connection refused");
    // The event before the count: whoever sees the count finds the event.
    node.logs().event("connection-refused", what);
    node.stats().connections_refused.inc();
}

async fn accept_one<H: Host>(node: Arc<H>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let handshake = Duration::from_millis(node.limits().handshake_timeout_ms);
    let conn = match tokio::time::timeout(handshake, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return refuse(&*node, format!("from {remote}: {e}")),
        Err(_) => return refuse(&*node, format!("from {remote}: TLS handshake timed out")),
    };
    let close = |why: &str| {
        conn.close(
            quinn::VarInt::from_u32(code::REFUSED as u32),
            why.as_bytes(),
        );
    };
    let (name, role) = match crate::tls::peer_name_and_role(&conn) {
        Ok(n) => n,
        Err(e) => {
            close("bad certificate");
            return refuse(&*node, format!("from {remote}: {e}"));
        }
    };
    let admin = crate::tls::negotiated_alpn(&conn).as_deref() == Some(tern_proto::wire::ADMIN_ALPN);
    // A certificate opens only the connections its role allows: a stolen device's cannot
    // administer the cluster, and an admin's cannot join it and host services.
    if admin != role.may_administer() {
        let why = format!(
            "a certificate of role {role} cannot open {} connection",
            if admin { "an admin" } else { "a node" }
        );
        close(&why);
        return refuse(&*node, format!("from {name} at {remote}: {why}"));
    }
    if admin {
        // The command line, not a peer: it joins no membership and carries no messages.
        return node.serve_admin(conn, name, role).await;
    }
    if &name == node.name() {
        close("certificate names the accepting node");
        return refuse(
            &*node,
            format!("from {remote}: certificate names this node ({name})"),
        );
    }
    let first = async {
        let (send, mut recv) = conn
            .accept_bi()
            .await
            .map_err(|e| conn_err("control stream", e))?;
        let mut reader = FrameReader::new(node.limits().frame_bytes_max);
        let hs = read_handshake(&mut recv, &mut reader).await?;
        Ok::<_, Error>((send, recv, reader, hs))
    };
    let (mut send, recv, reader, hs) = match tokio::time::timeout(handshake, first).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            close("bad handshake");
            return refuse(&*node, format!("from {name} at {remote}: {e}"));
        }
        Err(_) => {
            close("handshake timed out");
            return refuse(&*node, format!("from {name} at {remote}: no hello in time"));
        }
    };
    let caps = match hs {
        Handshake::Hello(caps) => caps,
        _ => {
            close("expected hello");
            return refuse(
                &*node,
                format!("from {name} at {remote}: first frame was not hello"),
            );
        }
    };
    let link = match node.links().get_or_insert(&name, None, node.limits()) {
        Ok(l) => l,
        Err(e) => {
            close("too many peers");
            return refuse(&*node, format!("from {name} at {remote}: {e}"));
        }
    };
    // A name is bound to one key while it is connected: a second connection under a name
    // that is connected already, with another key or from elsewhere, is another holder of
    // that name (a re-issued or copied certificate), not the node itself: refused, and the
    // first stays. (A node restarted on another port, or with a new certificate, gets in once
    // its old connection has timed out or its old certificate was revoked.)
    if let Some(why) = link.collision(&conn, false) {
        close("name collision");
        return refuse(&*node, format!("from {remote}: name collision: {why}"));
    }
    let mut out = Vec::new();
    if !link.accept_incoming(node.name()) {
        let _ = encode_frame(
            &mut out,
            &Frame::Reject {
                reason: "duplicate: this node's own connection to you is kept".into(),
            },
            node.limits().frame_bytes_max,
        );
        let _ = send.write_all(&out).await;
        let _ = send.finish();
        tracing::debug!(peer = %name, "duplicate connection turned down");
        return;
    }
    if let Err(e) = encode_frame(
        &mut out,
        &Frame::Welcome {
            caps: node.capabilities(),
        },
        node.limits().frame_bytes_max,
    ) {
        return refuse(&*node, format!("encoding welcome: {e}"));
    }
    if let Err(e) = send.write_all(&out).await {
        return refuse(
            &*node,
            format!("from {name} at {remote}: writing welcome: {e}"),
        );
    }
    register(&node, &link, conn, false, send, recv, reader, caps);
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamKind {
    Control,
    Data,
}

impl StreamKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            StreamKind::Control => "control",
            StreamKind::Data => "data",
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn register<H: Host>(
    node: &Arc<H>,
    link: &Arc<PeerLink>,
    conn: quinn::Connection,
    dialed_by_me: bool,
    ctrl_send: quinn::SendStream,
    ctrl_recv: quinn::RecvStream,
    reader: FrameReader,
    caps: Vec<String>,
) {
    let gen = link.install(conn.clone(), dialed_by_me, caps);
    node.stats().connections_up.inc();
    node.link_up(link);
    node.logs().event(
        "peer-up",
        format!(
            "{} (dialed by {})",
            link.name,
            if dialed_by_me {
                node.name()
            } else {
                &link.name
            }
        ),
    );
    let span = tracing::info_span!("connection", node = %node.name(), peer = %link.name, gen);
    tracing::info!(parent: &span, "connection up");

    actix_rt::spawn(
        write_stream(
            node.clone(),
            link.clone(),
            StreamKind::Control,
            ctrl_send,
            conn.clone(),
            gen,
        )
        .instrument(span.clone()),
    );
    actix_rt::spawn(
        read_stream(
            node.clone(),
            link.clone(),
            StreamKind::Control,
            ctrl_recv,
            reader,
            conn.clone(),
        )
        .instrument(span.clone()),
    );
    {
        let (node, link, conn) = (node.clone(), link.clone(), conn.clone());
        actix_rt::spawn(
            async move {
                match conn.open_uni().await {
                    Ok(send) => write_stream(node, link, StreamKind::Data, send, conn, gen).await,
                    Err(e) => tracing::debug!(error = %e, "data stream not opened"),
                }
            }
            .instrument(span.clone()),
        );
    }
    let (node, link) = (node.clone(), link.clone());
    actix_rt::spawn(
        async move {
            loop {
                match conn.accept_uni().await {
                    Ok(recv) => {
                        let reader = FrameReader::new(node.limits().frame_bytes_max);
                        actix_rt::spawn(
                            read_stream(
                                node.clone(),
                                link.clone(),
                                StreamKind::Data,
                                recv,
                                reader,
                                conn.clone(),
                            )
                            .in_current_span(),
                        );
                    }
                    Err(e) => {
                        if link.lost(gen, e.to_string()) {
                            tracing::info!(reason = %e, "connection down");
                            node.logs()
                                .event("peer-down", format!("{}: {e}", link.name));
                            let left = matches!(&e, quinn::ConnectionError::ApplicationClosed(c)
                                if c.error_code == quinn::VarInt::from_u32(code::SHUTDOWN as u32));
                            node.link_down(&link.name, left);
                        }
                        break;
                    }
                }
            }
        }
        .instrument(span),
    );
}

async fn write_stream<H: Host>(
    node: Arc<H>,
    link: Arc<PeerLink>,
    kind: StreamKind,
    mut send: quinn::SendStream,
    conn: quinn::Connection,
    gen: u64,
) {
    let queue = match kind {
        StreamKind::Control => &link.ctrl,
        StreamKind::Data => &link.data,
    };
    let mut buf = Vec::new();
    loop {
        let ready = queue.ready.notified();
        tokio::pin!(ready);
        ready.as_mut().enable();
        if !link.is_current(gen) {
            return;
        }
        queue.take(&mut buf);
        if buf.is_empty() {
            tokio::select! {
                _ = &mut ready => continue,
                _ = conn.closed() => return,
            }
        }
        match send.write_all(&buf).await {
            Ok(()) => node.stats().bytes_out.add(buf.len() as u64),
            Err(e) => {
                node.stats().bytes_lost_on_link.add(buf.len() as u64);
                node.logs().event(
                    "link-write-failed",
                    format!(
                        "{} bytes for {} on the {} stream: {e}",
                        buf.len(),
                        link.name,
                        kind.name()
                    ),
                );
                return;
            }
        }
        buf.clear();
    }
}

async fn read_stream<H: Host>(
    node: Arc<H>,
    link: Arc<PeerLink>,
    kind: StreamKind,
    mut recv: quinn::RecvStream,
    mut reader: FrameReader,
    conn: quinn::Connection,
) {
    let mut sink = node.open_stream(&link, kind);
    loop {
        // Frames already buffered (the handshake may have read ahead) come first.
        loop {
            match reader.next_frame() {
                Ok(Some(body)) => {
                    node.stats().frames_in.inc();
                    // Messages of this frame already delivered, when a full mailbox held it.
                    let mut done = 0;
                    loop {
                        match sink.frame(body, done) {
                            Ok(Flow::Done) if sink.carries_snapshot() => {
                                // A snapshot stream can bring thousands of queued messages:
                                // let the protocol's frames through between two of its frames.
                                tokio::task::yield_now().await;
                                break;
                            }
                            Ok(Flow::Done) => break,
                            Ok(Flow::Held {
                                done: delivered,
                                until,
                            }) => {
                                // Go on from the message that did not fit.
                                done = delivered;
                                node.stats().deliveries_held.inc();
                                until.await;
                            }
                            Err(e) => {
                                // The frame was well delimited: report it and read on.
                                protocol_error(&*node, &link, &e);
                                break;
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // Framing is lost on this stream: report, stop it, keep the connection
                    // (unless it is the control stream). A snapshot it carried ends here: a
                    // committed copy runs with what arrived rather than wait for the rest.
                    protocol_error(&*node, &link, &e);
                    end_stream(kind, &mut recv, &conn, &e);
                    sink.ended();
                    return;
                }
            }
        }
        let read = recv.read_chunk(READ_CHUNK_BYTES, true);
        let read = match sink.due_by() {
            Some(due) => {
                match tokio::time::timeout_at(tokio::time::Instant::from_std(due), read).await {
                    Ok(r) => r,
                    Err(_) => {
                        // A peer that stops sending (or trickles) must not keep what the
                        // stream holds for ever.
                        sink.overdue();
                        continue;
                    }
                }
            }
            None => read.await,
        };
        match read {
            Ok(Some(chunk)) => {
                node.stats().bytes_in.add(chunk.bytes.len() as u64);
                reader.push(&chunk.bytes);
            }
            Ok(None) => {
                if let Err(e) = reader.finish() {
                    protocol_error(&*node, &link, &e);
                }
                sink.ended();
                return;
            }
            Err(e) => {
                tracing::debug!(stream = kind.name(), error = %e, "stream ended");
                sink.ended();
                return;
            }
        }
    }
}

fn end_stream(
    kind: StreamKind,
    recv: &mut quinn::RecvStream,
    conn: &quinn::Connection,
    e: &WireError,
) {
    let code = quinn::VarInt::from_u32(e.code() as u32);
    let _ = recv.stop(code);
    if kind == StreamKind::Control {
        // Without a control stream the connection is of no use; give the error frame a moment
        // to leave, then close.
        let conn = conn.clone();
        let reason = e.to_string();
        actix_rt::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            conn.close(code, reason.as_bytes());
        });
    }
}

fn protocol_error<H: Host>(node: &H, link: &PeerLink, e: &WireError) {
    node.stats().protocol_errors.inc();
    tracing::warn!(peer = %link.name, error = %e, "protocol error");
    node.logs()
        .event("protocol-error", format!("from {}: {e}", link.name));
    if let Err(qe) = link.push_ctrl(&Frame::ProtocolError {
        code: e.code(),
        detail: e.to_string(),
    }) {
        node.logs().event(
            "protocol-error-unreported",
            format!("to {}: {qe}", link.name),
        );
    }
}

/// What became of a frame handed to a stream's sink.
pub(crate) enum Flow {
    Done,
    /// The frame's sender waits for room: this stream holds (QUIC flow control then pushes
    /// back on the sender) until `until` completes, and the frame is handed over again with
    /// its first `done` messages already delivered.
    Held {
        done: usize,
        until: std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>,
    },
}

/// Where one incoming stream's frames go: the node makes one per stream
/// (`Host::open_stream`), and the transport hands it each frame's body, knowing
/// nothing of services.
pub(crate) trait StreamSink {
    /// One frame's body; `done` of its messages were delivered before it was held.
    fn frame(&mut self, body: &[u8], done: usize) -> Result<Flow, WireError>;
    /// True once the stream turned out to carry a snapshot (its frames are then let through
    /// one at a time, with the node's other work between them).
    fn carries_snapshot(&self) -> bool;
    /// When what the stream still owes must have come (a snapshot's state), if anything.
    fn due_by(&self) -> Option<Instant> {
        None
    }
    /// [`due_by`](Self::due_by) passed with nothing more read: give up what waits for it.
    fn overdue(&mut self) {}
    /// The stream ended, cleanly or not.
    fn ended(&mut self);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_queue_is_bounded_and_batches_only_what_continues() {
        let q = OutQueue::new(200, 1 << 20);
        let peer = NodeName::new("b");
        let to = ServiceId::from_parts(1, 1);
        let meta = |seq| Meta {
            from: Some(ServiceId::from_parts(2, 2)),
            seq,
            ask: None,
            keep: false,
        };
        let first = q
            .push_message(&peer, (to, meta(1), false, &[0; 40]))
            .unwrap();
        let second = q
            .push_message(&peer, (to, meta(2), false, &[0; 40]))
            .unwrap();
        assert_eq!(
            second - first,
            42,
            "the next number joins the batch: its bytes and a bin header"
        );
        let third = q
            .push_message(&peer, (to, meta(4), false, &[0; 40]))
            .unwrap();
        assert!(third - second > 42, "a gap starts a new frame");
        let mut refused = None;
        for seq in 5..20 {
            if let Err(e) = q.push_message(&peer, (to, meta(seq), false, &[0; 40])) {
                refused = Some(e);
                break;
            }
        }
        assert!(matches!(
            refused,
            Some(DeliveryError::Backpressure { bytes_max: 200, .. })
        ));
        let mut out = Vec::new();
        q.take(&mut out);
        assert!(out.len() >= 200);
        // Room again; and the batch that left is not appended to.
        let after = q
            .push_message(&peer, (to, meta(20), false, &[0; 40]))
            .unwrap();
        assert!(after > 42, "a fresh frame after the writer took the queue");
    }
}
