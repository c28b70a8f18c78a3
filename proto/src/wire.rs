//! The wire: length-prefixed, versioned MessagePack frames.
//!
//! A frame is `[u32 big-endian body length][u8 wire version][body]`, the body a MessagePack
//! encoding of [`Frame`]. The length is checked against `frame_bytes_max` as soon as the five
//! header bytes are in, before any buffer is sized for the body, so a peer announcing a 4 GiB
//! frame costs nothing but an error.
//!
//! ```
//! use tern_proto::wire::{encode_frame, Frame, FrameReader};
//! let mut out = Vec::new();
//! encode_frame(&mut out, &Frame::Reject { reason: "busy".into() }, 1024).unwrap();
//! let mut reader = FrameReader::new(1024);
//! reader.push(&out);
//! let body = reader.next_frame().unwrap().unwrap();
//! assert!(matches!(tern_proto::wire::decode(body).unwrap(), Frame::Reject { .. }));
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::directory::BookEdge;
use crate::error::DeliveryError;
use crate::ids::{KindKey, NodeName, ServiceAddr, ServiceId};

/// The wire version this build speaks.
pub const WIRE_VERSION: u8 = 1;
/// The ALPN protocol id of Tern connections.
pub const ALPN: &[u8] = b"tern/1";
/// The ALPN protocol id of admin connections (the `tern` command line to a node).
pub const ADMIN_ALPN: &[u8] = b"tern-admin/1";
/// Bytes before a frame's body: length (4) and version (1).
pub const FRAME_HEADER_BYTES: usize = 5;

/// Codes carried in [`Frame::ProtocolError`] and QUIC close/stop codes.
pub mod code {
    /// The peer sent bytes that are not a frame.
    pub const MALFORMED: u16 = 1;
    /// A frame longer than the receiver's `frame_bytes_max`.
    pub const TOO_LARGE: u16 = 2;
    /// A stream ended in the middle of a frame.
    pub const TRUNCATED: u16 = 3;
    /// A frame of another wire version.
    pub const WRONG_VERSION: u16 = 4;
    /// A frame kind that does not belong on that stream.
    pub const UNEXPECTED: u16 = 5;
    /// Connection replaced by another one to the same peer.
    pub const DUPLICATE: u16 = 6;
    /// The node is shutting down.
    pub const SHUTDOWN: u16 = 7;
    /// The handshake was refused.
    pub const REFUSED: u16 = 8;
    /// A well-formed frame claimed something the sender may not claim (see
    /// [`crate::claims`]); it changed nothing.
    pub const CLAIM_REFUSED: u16 = 9;
    /// The peer's certificate is revoked by the cluster CA's revocation list.
    pub const REVOKED: u16 = 10;
}

/// Why bytes from a peer are not an acceptable frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// Announced body length over the limit.
    #[error("frame of {len} bytes exceeds frame_bytes_max {max}")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame: {have} of {need} bytes")]
    Truncated {
        /// Bytes the frame needs.
        need: usize,
        /// Bytes that arrived.
        have: usize,
    },
    /// Version byte not ours.
    #[error("wire version {got}, this node speaks {want}")]
    WrongVersion {
        /// Received.
        got: u8,
        /// Ours.
        want: u8,
    },
    /// The body is not a frame this node knows.
    #[error("malformed frame: {detail}")]
    Malformed {
        /// The decoder's complaint (an unknown frame kind shows up here as an unknown variant).
        detail: String,
    },
    /// A known frame on a stream where it has no meaning.
    #[error("unexpected {kind} frame on the {stream} stream")]
    Unexpected {
        /// The frame's kind.
        kind: &'static str,
        /// The stream.
        stream: &'static str,
    },
}

impl WireError {
    /// The protocol-error code for this error.
    pub fn code(&self) -> u16 {
        match self {
            WireError::TooLarge { .. } => code::TOO_LARGE,
            WireError::Truncated { .. } => code::TRUNCATED,
            WireError::WrongVersion { .. } => code::WRONG_VERSION,
            WireError::Malformed { .. } => code::MALFORMED,
            WireError::Unexpected { .. } => code::UNEXPECTED,
        }
    }
}

/// Everything that travels between nodes. Borrowed byte fields point into the receive buffer,
/// so a delivered message is decoded straight from it.
#[derive(Debug, Serialize, Deserialize)]
pub enum Frame<'a> {
    /// First frame of the dialer on the control stream.
    Hello {
        /// The dialer's capabilities.
        caps: Vec<String>,
    },
    /// The acceptor keeps the connection.
    Welcome {
        /// The acceptor's capabilities.
        caps: Vec<String>,
    },
    /// The acceptor refuses the connection.
    Reject {
        /// Why.
        reason: String,
    },
    /// All book edges held by services of the sender, sent when a connection comes up.
    BookSync {
        /// The edges.
        edges: Vec<BookEdge>,
    },
    /// One book edge added or removed on the sender.
    BookChange {
        /// The edge.
        edge: BookEdge,
        /// Added (true) or removed (false).
        added: bool,
    },
    /// Start a service of `kind` from `state` on the receiver; answered by [`Frame::Reply`].
    Spawn {
        /// Request id, answered in `Reply::ask`.
        req: u64,
        /// The kind.
        kind: KindKey,
        /// MessagePack state.
        #[serde(borrow, with = "serde_bytes")]
        state: &'a [u8],
    },
    /// The sender could not make sense of something the receiver sent.
    ProtocolError {
        /// One of [`code`].
        code: u16,
        /// Human-readable detail.
        detail: String,
    },
    /// A message for a service on the receiver.
    Deliver {
        /// Target.
        to: ServiceId,
        /// Sending service, if a service sent it.
        from: Option<ServiceId>,
        /// Per (sender, receiver) sequence number.
        seq: u64,
        /// Ask id on the sender's node, for a request.
        ask: Option<u64>,
        /// The sender chose to wait for room: a full mailbox holds this stream instead of
        /// refusing the message.
        wait: bool,
        /// MessagePack message.
        #[serde(borrow, with = "serde_bytes")]
        msg: &'a [u8],
    },
    /// Consecutive messages from one sender to one service, numbered `first_seq`,
    /// `first_seq + 1`, ... (all 0 when the sender is not a service). Never carries asks.
    DeliverBatch {
        /// Target.
        to: ServiceId,
        /// Sending service, if a service sent them.
        from: Option<ServiceId>,
        /// Number of the first message.
        first_seq: u64,
        /// The sender chose to wait for room (see `Deliver`).
        wait: bool,
        /// MessagePack messages, oldest first.
        #[serde(borrow)]
        msgs: BatchMsgs<'a>,
    },
    /// The answer to an ask or a spawn.
    Reply {
        /// Ask id on the receiver's node.
        ask: u64,
        /// MessagePack reply, or why there is none.
        #[serde(borrow)]
        result: ReplyBody<'a>,
    },
    /// A message handed on from another node: by a tombstone (the service moved), by a
    /// commit (arrivals during the freeze) or by an aborted copy (back to the source). Keeps
    /// its sender's numbering, asker and origin.
    Forward {
        /// Target.
        to: ServiceId,
        /// The node that first sent it, told where the service went.
        origin: NodeName,
        /// Its sender waits for room (see `Deliver`).
        wait: bool,
        /// Taken already by the service's former instance (a commit's leftovers, an aborted
        /// copy's parked arrivals): taken past the capacity, up to
        /// [`crate::forward::ACCEPTED_DEPTH_FACTOR`] times it (`forward::hand_from_peer`).
        accepted: bool,
        /// The message.
        msg: CarriedMsg,
    },
    /// Number `seq` of `from` to `to` was refused on the service's former node: the receiver's
    /// window must not wait for it.
    Skipped {
        /// Target.
        to: ServiceId,
        /// The sender.
        from: ServiceId,
        /// The refused number.
        seq: u64,
        /// Nodes it has been handed on by (bounded by `forward::SKIP_HOPS_MAX`).
        hops: u8,
    },
    /// A migration protocol message (control stream).
    Mig(MigMsg),
    /// First frame of a snapshot stream: everything but the state's bytes and the queue.
    SnapBegin(Box<SnapHeader>),
    /// Part of the state's bytes, in order.
    SnapState {
        /// The bytes.
        #[serde(borrow, with = "serde_bytes")]
        bytes: &'a [u8],
    },
    /// Queued messages carried with the service, oldest first.
    SnapCarried {
        /// The messages.
        msgs: Vec<CarriedMsg>,
    },
    /// After commit: what arrived at the source during the freeze, in order, then what waited
    /// early in its windows. Taken through the target's windows.
    SnapLeftovers {
        /// The messages.
        msgs: Vec<CarriedMsg>,
        /// Numbers refused at the source after the snapshot: `(sender, seq)`.
        skipped: Vec<(ServiceId, u64)>,
    },
    /// Last frame of a snapshot stream.
    SnapEnd,
    /// A tell the receiver did not accept.
    Refused {
        /// Target.
        to: ServiceId,
        /// Sending service.
        from: Option<ServiceId>,
        /// Its sequence number.
        seq: u64,
        /// Why.
        reason: DeliveryError,
    },
    /// Control stream, to the node messages came from: for each `(to, from, seq)`, service
    /// `to` has taken every message of sender `from` numbered up to `seq` for handling. The
    /// sender's node settles its delivery ledger with it.
    Handled {
        /// `(receiver, sender, last number taken)`.
        marks: Vec<(ServiceId, ServiceId, u64)>,
    },
    /// Data stream: the numbers of `from` to `to` up to `through` that have not arrived never
    /// will (the sender's node declared them lost with a node), so the receiver's window must
    /// not wait for them. Everything the sender sent this way before is ahead of it.
    Gap {
        /// Target.
        to: ServiceId,
        /// The sender.
        from: ServiceId,
        /// The last number declared lost.
        through: u64,
    },
    /// Control stream, once a second: what the sender is (capabilities, load, power, the
    /// services it hosts, its heaviest traffic) and what it knows of other nodes.
    Members {
        /// The sender first, then the members it believes up.
        nodes: Vec<crate::members::MemberInfo>,
    },
    /// Data stream, to the node that told the sender where `service` went (`Located`,
    /// `Moved`): the sender's channel no longer points at the receiver for `service` at
    /// `epoch`, and everything it sent there before is ahead of this frame on the stream.
    Fence {
        /// The service that moved.
        service: ServiceId,
        /// The epoch it moved at.
        epoch: u64,
    },
    /// Snapshot stream, after the header and before the state: part of the service's receive
    /// windows, send counters, address book and timers, as many frames as the header's
    /// `tables` says (see [`crate::snapshot`]). They travel apart from the header so that a
    /// service with many senders, a large book or many timers fits any frame bound.
    SnapTables(crate::snapshot::Tables),
    /// Data stream: sender `from` has stopped, and `last` is the last number it sent to `to`.
    /// The receiver's window for it goes once it has passed `last`
    /// ([`crate::inbox::Inbox::close_sender`]). Sent by the node where the sender stopped, to
    /// where it believes `to` is; handed on like a skip.
    Closed {
        /// Target.
        to: ServiceId,
        /// The stopped sender.
        from: ServiceId,
        /// Its last number to `to`.
        last: u64,
        /// Nodes it has been handed on by (bounded by `forward::SKIP_HOPS_MAX`).
        hops: u8,
    },
    /// Control stream: which node speaks for sender `sender` now, as far as the receiver
    /// knows ([`crate::speakers`])? Answered with a `Speaker` frame.
    WhoSpeaks {
        /// The sender.
        sender: ServiceId,
    },
    /// Control stream: where sender `sender` speaks from now. `asked`: the answer to a
    /// `WhoSpeaks`; otherwise told unasked by the source of the sender's migration, at its
    /// commit, to every peer.
    Speaker {
        /// The sender.
        sender: ServiceId,
        /// What the sending node knows.
        answer: crate::speakers::SpeakerAnswer,
        /// An answer to a question (else a notice of a move).
        asked: bool,
    },
    /// Control stream: the cluster CA's revocation list (a DER X.509 CRL). Self-authenticating:
    /// a node installs it only when the CA signed it and its number is higher than the one it
    /// holds, then passes it to its other peers; anyone may relay it.
    Revocations {
        /// The CRL, DER.
        #[serde(borrow, with = "serde_bytes")]
        crl: &'a [u8],
    },
    /// Control stream: replication between a primary's node and its standby's
    /// ([`crate::replica`]).
    Replica(crate::replica::ReplicaMsg),
    /// First frame of a snapshot stream that copies a service's state ahead while the service
    /// still runs at the source (pre-copy). `PreState` frames follow, then, once the service
    /// froze, the snapshot (`SnapBegin` with `precopied`). A stream that ends before its
    /// `SnapBegin` was an attempt aborted during its pre-copy: what it carried is dropped.
    PreBegin {
        /// Attempt number on the source.
        mig: u64,
        /// The service.
        id: ServiceId,
        /// Its kind: the target must run it, and the kind must copy ahead.
        kind: KindKey,
    },
    /// Entries of the pre-copied part of a service's state, changed or removed since the last
    /// time they were sent, in the kind's own encoding; applied in order.
    PreState {
        /// The entries.
        #[serde(borrow, with = "serde_bytes")]
        bytes: &'a [u8],
    },
    /// Control stream, target to source: of attempt `mig`'s pre-copy of `id`, the `PreState`
    /// bytes applied so far. The source asks for the freeze only once the target has caught
    /// up, so that the freeze does not wait for a backlog.
    PreApplied {
        /// Attempt number on the source.
        mig: u64,
        /// The service.
        id: ServiceId,
        /// `PreState` bytes applied.
        bytes: u64,
    },
}

impl Frame<'_> {
    /// The frame's kind, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "hello",
            Frame::Welcome { .. } => "welcome",
            Frame::Reject { .. } => "reject",
            Frame::BookSync { .. } => "book-sync",
            Frame::BookChange { .. } => "book-change",
            Frame::Spawn { .. } => "spawn",
            Frame::ProtocolError { .. } => "protocol-error",
            Frame::Deliver { .. } => "deliver",
            Frame::DeliverBatch { .. } => "deliver-batch",
            Frame::Reply { .. } => "reply",
            Frame::Refused { .. } => "refused",
            Frame::Forward { .. } => "forward",
            Frame::Skipped { .. } => "skipped",
            Frame::Mig(_) => "mig",
            Frame::SnapBegin(_) => "snap-begin",
            Frame::SnapState { .. } => "snap-state",
            Frame::SnapCarried { .. } => "snap-carried",
            Frame::SnapLeftovers { .. } => "snap-leftovers",
            Frame::SnapEnd => "snap-end",
            Frame::Fence { .. } => "fence",
            Frame::SnapTables(_) => "snap-tables",
            Frame::Members { .. } => "members",
            Frame::Handled { .. } => "handled",
            Frame::Gap { .. } => "gap",
            Frame::Closed { .. } => "closed",
            Frame::Revocations { .. } => "revocations",
            Frame::WhoSpeaks { .. } => "who-speaks",
            Frame::Speaker { .. } => "speaker",
            Frame::Replica(_) => "replica",
            Frame::PreBegin { .. } => "pre-begin",
            Frame::PreState { .. } => "pre-state",
            Frame::PreApplied { .. } => "pre-applied",
        }
    }
}

/// A queued message as it travels in a snapshot or a forward.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CarriedMsg {
    /// Sending service (or node client channel).
    pub from: Option<ServiceId>,
    /// Its number in that sender's channel.
    pub seq: u64,
    /// For a request: the node waiting and its ask id there.
    pub ask: Option<(NodeName, u64)>,
    /// The node it came from, if not the service's own.
    pub origin: Option<NodeName>,
    /// MessagePack message.
    #[serde(with = "serde_bytes")]
    pub msg: Vec<u8>,
}

/// A pending timer in a snapshot: due `after_us` after the snapshot was taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimerWire {
    /// Microseconds left until it is due (0 when overdue).
    pub after_us: u64,
    /// MessagePack message.
    #[serde(with = "serde_bytes")]
    pub msg: Vec<u8>,
}

/// One sender's receive window in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowWire {
    /// The sender.
    pub from: ServiceId,
    /// The next number expected.
    pub next: u64,
    /// Messages that arrived early, waiting for the gap before them.
    pub early: Vec<CarriedMsg>,
    /// Numbers ahead of `next` already refused.
    pub skipped: Vec<u64>,
    /// The last number the service handled from this sender (below `next` by the messages
    /// carried with it, queued or early): a replicated service's checkpoints at the target
    /// start from it, so a copy taken over from one neither waits for numbers long handled
    /// nor skips what was carried and not yet handled.
    #[serde(default)]
    pub taken: u64,
}

/// The head of a snapshot stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapHeader {
    /// Attempt number on the source (the stream's sender).
    pub mig: u64,
    /// The service.
    pub id: ServiceId,
    /// Its kind.
    pub kind: KindKey,
    /// The epoch it will have on the target.
    pub epoch: u64,
    /// Its parent in an assembly tree.
    pub parent: Option<ServiceId>,
    /// Length of the state, sent in `SnapState` frames after this one.
    pub state_bytes: u64,
    /// Queued messages, sent in `SnapCarried` frames after the state.
    pub carried: u64,
    /// Pending timers (on the wire: empty, they follow in `SnapTables` frames).
    pub timers: Vec<TimerWire>,
    /// Per receiver, the last number the service used as a sender (on the wire: empty, they
    /// follow in `SnapTables` frames).
    pub send_seqs: Vec<(ServiceId, u64)>,
    /// Its receive windows (on the wire: empty, they follow in `SnapTables` frames).
    pub windows: Vec<WindowWire>,
    /// `SnapTables` frames that follow this header, before the state.
    pub tables: u32,
    /// Its address book (on the wire: empty, it follows in `SnapTables` frames).
    pub book: Vec<(String, ServiceAddr)>,
    /// The nodes that had custody of the service before the source, most recent last
    /// ([`crate::speakers::Custody`]); the target adds the source.
    #[serde(default)]
    pub custody: Vec<NodeName>,
    /// A user's explicit move put it there: the target holds it (automatic placement leaves
    /// it alone).
    #[serde(default)]
    pub held: bool,
    /// The caller forced the move: the target takes it even while draining or lacking a
    /// capability the kind requires.
    #[serde(default)]
    pub forced: bool,
    /// The names it is registered under; they move with it.
    #[serde(default)]
    pub names: Vec<String>,
    /// The answers it kept to the asks it took last (see [`KeptReply`]).
    #[serde(default)]
    pub replies: Vec<KeptReply>,
    /// A replicated service taken over from a checkpoint: the messages it had sent and not
    /// seen confirmed, sent again before it runs (see [`KeptOutput`]). Empty for a move.
    /// (Always written: a header is a MessagePack array, so a field left out would shift the
    /// ones after it.)
    #[serde(default)]
    pub outputs: Vec<KeptOutput>,
    /// The state was copied ahead on this stream (`PreBegin`, `PreState`): the state's bytes
    /// leave its pre-copied part out, and the target puts back what the `PreState` frames
    /// built.
    #[serde(default)]
    pub precopied: bool,
    /// The trace context of the source's migration span (W3C Trace Context's trace id,
    /// parent span id and flags), so that the target's span joins the same trace. Set when
    /// the source exports spans (the `otel` feature) and its span is sampled; only ever
    /// used to attribute the target's spans, never trusted for anything else.
    #[serde(default)]
    pub trace: Option<TraceContext>,
}

/// A span's place in a distributed trace, as W3C Trace Context's `traceparent` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// The trace: 16 bytes, not all zero.
    pub trace_id: [u8; 16],
    /// The span the receiver's span is a child of: 8 bytes, not all zero.
    pub span_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// Whether the ids are not all zero (W3C Trace Context calls all-zero ids invalid: a
    /// receiver starts a trace of its own instead).
    pub fn is_valid(&self) -> bool {
        self.trace_id != [0; 16] && self.span_id != [0; 8]
    }
}

/// The answer a service gave to an ask it took, kept so that a copy of that ask (its asker
/// re-executing after a takeover, or sending again what a lost copy had not confirmed) is
/// answered the same way instead of being dropped unanswered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptReply {
    /// The asker.
    pub from: ServiceId,
    /// The ask's number in the asker's channel.
    pub seq: u64,
    /// The answer, MessagePack.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// A message a replicated service sent and had not seen confirmed when its checkpoint was
/// cut: the checkpoint carries a copy, and the copy that takes the service over sends it
/// again, under the same number, before it runs (its receiver drops it if it took it
/// already). Only tells: an ask is sent again by the handler that asked, re-executed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptOutput {
    /// The receiver.
    pub to: ServiceId,
    /// The message's number in the service's channel to `to`.
    pub seq: u64,
    /// The message, MessagePack.
    #[serde(with = "serde_bytes")]
    pub msg: Vec<u8>,
}

/// Migration protocol messages between nodes (see `core::migration::Wire`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MigMsg {
    /// Target to source: restored and paused.
    Prepared {
        /// Source of the attempt.
        source: NodeName,
        /// Attempt number there.
        n: u64,
    },
    /// Target to source: will not take it.
    Refused {
        /// Source of the attempt.
        source: NodeName,
        /// Attempt number there.
        n: u64,
        /// Why.
        reason: String,
    },
    /// Source to target: run it.
    Commit {
        /// Source of the attempt.
        source: NodeName,
        /// Attempt number there.
        n: u64,
    },
    /// Target to source: running.
    CommitAck {
        /// Source of the attempt.
        source: NodeName,
        /// Attempt number there.
        n: u64,
    },
    /// Source to target: drop the paused copy.
    Abort {
        /// Source of the attempt.
        source: NodeName,
        /// Attempt number there.
        n: u64,
    },
    /// Target to source: what became of this attempt?
    Query {
        /// Source of the attempt.
        source: NodeName,
        /// Attempt number there.
        n: u64,
    },
    /// The service lives at `node` from `epoch` on (sent to every peer at commit).
    Located {
        /// The service.
        service: ServiceId,
        /// Where.
        node: NodeName,
        /// Since which epoch.
        epoch: u64,
    },
    /// A tombstone's answer to a sender's node: the service is now at `node`.
    Moved {
        /// The service.
        service: ServiceId,
        /// Where.
        node: NodeName,
        /// Its epoch there.
        epoch: u64,
    },
    /// Ask the receiver to migrate its service `service` to `to`; answered by a `Reply` to
    /// `req` carrying the report.
    Request {
        /// Request id on the sender.
        req: u64,
        /// The service.
        service: ServiceId,
        /// Target node.
        to: NodeName,
        /// Handle the queue at the source first.
        drain: bool,
        /// Move even where the target is draining or lacks a required capability.
        #[serde(default)]
        force: bool,
        /// Hold the services where they land (an explicit move); automatic placement
        /// leaves held services alone.
        #[serde(default)]
        hold: bool,
        /// Asked by automatic placement (the rebalancer): a held service is not moved.
        #[serde(default)]
        spare_held: bool,
    },
    /// Ask the receiver to migrate a group of its services as one unit (all or none), each
    /// to its node; answered by a `Reply` to `req` carrying the reports, in order.
    GroupRequest {
        /// Request id on the sender.
        req: u64,
        /// `(service, target node)`.
        moves: Vec<(ServiceId, NodeName)>,
        /// Handle the queues at the source first.
        drain: bool,
        /// Move even where the target is draining or lacks a required capability.
        #[serde(default)]
        force: bool,
        /// Hold the services where they land (an explicit move); automatic placement
        /// leaves held services alone.
        #[serde(default)]
        hold: bool,
    },
    /// Ask the receiver to migrate the whole tree of its service `root` to `to`. The tree is
    /// read there, from the books its members hold; answered like `GroupRequest`.
    TreeRequest {
        /// Request id on the sender.
        req: u64,
        /// The tree's root.
        root: ServiceId,
        /// Target node.
        to: NodeName,
        /// Handle the queues at the source first.
        drain: bool,
        /// Move even where the target is draining or lacks a required capability.
        #[serde(default)]
        force: bool,
        /// Hold the services where they land (an explicit move); automatic placement
        /// leaves held services alone.
        #[serde(default)]
        hold: bool,
    },
    /// Source to target, before anything freezes, when gossip says the target cannot take a
    /// service of `kind` (it may be stale): can it? Answered by a `Reply` to `req` carrying
    /// `Option<placement::Unfit>` (`None`: it can).
    CanTake {
        /// Request id on the sender.
        req: u64,
        /// The service's kind.
        kind: KindKey,
        /// The caller forces the move (draining and missing capabilities do not count).
        forced: bool,
    },
    /// Target to source: the copy handled its first message (or had none to handle with the
    /// whole carried queue in) `after_start_us` after it started; this ends the freeze.
    Serving {
        /// Source of the attempt.
        source: NodeName,
        /// Attempt number there.
        n: u64,
        /// Microseconds from the start to that moment, on the target's clock.
        after_start_us: u64,
    },
}

/// The body of a reply.
#[derive(Debug, Serialize, Deserialize)]
pub enum ReplyBody<'a> {
    /// MessagePack value.
    Value(#[serde(borrow, with = "serde_bytes")] &'a [u8]),
    /// The request was not delivered.
    Refused(DeliveryError),
    /// The receiver failed the request for another reason.
    Failed(String),
}

/// How serde writes the start of a `Deliver` body: a one-entry map from the variant name to
/// an array of its six fields. The fast path below writes and recognises exactly these bytes.
const DELIVER_PREFIX: &[u8] = &[0x81, 0xa7, b'D', b'e', b'l', b'i', b'v', b'e', b'r', 0x96];
const MSGPACK_NIL: u8 = 0xc0;
const MSGPACK_ARRAY2: u8 = 0x92;

// Writes to a Vec cannot fail; the results are ignored on purpose.
fn write_id(out: &mut Vec<u8>, id: ServiceId) {
    out.push(MSGPACK_ARRAY2);
    let _ = rmp::encode::write_uint(out, id.prefix());
    let _ = rmp::encode::write_uint(out, id.counter());
}

/// Writes a `Deliver` body byte for byte as serde would, without serde's per-field
/// machinery: this frame is the one every message pays for.
fn write_deliver(
    out: &mut Vec<u8>,
    (to, from, seq, ask, wait, msg): (ServiceId, Option<ServiceId>, u64, Option<u64>, bool, &[u8]),
) -> Result<(), WireError> {
    let msg_len = u32::try_from(msg.len()).map_err(|_| WireError::TooLarge {
        len: msg.len() as u64,
        max: u32::MAX as usize,
    })?;
    out.extend_from_slice(DELIVER_PREFIX);
    write_id(out, to);
    match from {
        Some(id) => write_id(out, id),
        None => out.push(MSGPACK_NIL),
    }
    let _ = rmp::encode::write_uint(out, seq);
    match ask {
        Some(a) => {
            let _ = rmp::encode::write_uint(out, a);
        }
        None => out.push(MSGPACK_NIL),
    }
    let _ = rmp::encode::write_bool(out, wait);
    let _ = rmp::encode::write_bin_len(out, msg_len);
    out.extend_from_slice(msg);
    Ok(())
}

fn read_id(rd: &mut &[u8]) -> Option<ServiceId> {
    if rmp::decode::read_array_len(rd).ok()? != 2 {
        return None;
    }
    let prefix: u64 = rmp::decode::read_int(rd).ok()?;
    let counter: u64 = rmp::decode::read_int(rd).ok()?;
    Some(ServiceId::from_parts(prefix, counter))
}

fn read_opt<T>(rd: &mut &[u8], read: impl FnOnce(&mut &[u8]) -> Option<T>) -> Option<Option<T>> {
    if rd.first() == Some(&MSGPACK_NIL) {
        *rd = &rd[1..];
        Some(None)
    } else {
        read(rd).map(Some)
    }
}

/// How serde writes the start of a `DeliverBatch` body.
const BATCH_PREFIX: &[u8] = &[
    0x81, 0xac, b'D', b'e', b'l', b'i', b'v', b'e', b'r', b'B', b'a', b't', b'c', b'h', 0x95,
];
const MSGPACK_ARRAY32: u8 = 0xdd;
/// Messages in one batch frame at most.
pub const BATCH_MESSAGES_MAX: u32 = 4096;

/// Where an open batch frame sits in an output buffer, so more messages can join it.
#[derive(Debug, Clone, Copy)]
pub struct BatchTail {
    start: usize,
    count_at: usize,
    count: u32,
    to: ServiceId,
    from: Option<ServiceId>,
    next_seq: u64,
    wait: bool,
}

impl BatchTail {
    /// Whether a message with these fields may join this batch.
    pub fn takes(&self, to: ServiceId, from: Option<ServiceId>, seq: u64, wait: bool) -> bool {
        self.to == to
            && self.from == from
            && self.wait == wait
            && self.next_seq == seq
            && self.count < BATCH_MESSAGES_MAX
    }
}

fn bin_header_bytes(len: usize) -> usize {
    match len {
        0..=0xff => 2,
        0x100..=0xffff => 3,
        _ => 5,
    }
}

/// Appends a `DeliverBatch` frame holding one message; the array length is written in its
/// 32-bit form so the count can be patched in place as messages join. On error `out` is left
/// as it was.
pub fn start_batch(
    out: &mut Vec<u8>,
    (to, from, seq, wait, msg): (ServiceId, Option<ServiceId>, u64, bool, &[u8]),
    frame_bytes_max: usize,
) -> Result<BatchTail, WireError> {
    let start = out.len();
    if msg.len() > frame_bytes_max || msg.len() > u32::MAX as usize {
        return Err(WireError::TooLarge {
            len: msg.len() as u64,
            max: frame_bytes_max,
        });
    }
    out.extend_from_slice(&[0, 0, 0, 0, WIRE_VERSION]);
    out.extend_from_slice(BATCH_PREFIX);
    write_id(out, to);
    match from {
        Some(id) => write_id(out, id),
        None => out.push(MSGPACK_NIL),
    }
    let _ = rmp::encode::write_uint(out, seq);
    let _ = rmp::encode::write_bool(out, wait);
    out.push(MSGPACK_ARRAY32);
    let count_at = out.len();
    out.extend_from_slice(&1u32.to_be_bytes());
    let _ = rmp::encode::write_bin_len(out, msg.len() as u32);
    out.extend_from_slice(msg);
    let body = out.len() - start - FRAME_HEADER_BYTES;
    if body > frame_bytes_max {
        out.truncate(start);
        return Err(WireError::TooLarge {
            len: body as u64,
            max: frame_bytes_max,
        });
    }
    out[start..start + 4].copy_from_slice(&(body as u32).to_be_bytes());
    Ok(BatchTail {
        start,
        count_at,
        count: 1,
        to,
        from,
        next_seq: if from.is_some() {
            seq.wrapping_add(1)
        } else {
            seq
        },
        wait,
    })
}

/// Adds `msg` to the batch at `tail` (the last frame in `out`); false, with `out` unchanged, if
/// it would make the frame too large.
pub fn append_to_batch(
    out: &mut Vec<u8>,
    tail: &mut BatchTail,
    msg: &[u8],
    frame_bytes_max: usize,
) -> bool {
    debug_assert!(tail.count < BATCH_MESSAGES_MAX);
    let body = out.len() - tail.start - FRAME_HEADER_BYTES;
    if msg.len() > u32::MAX as usize
        || body + bin_header_bytes(msg.len()) + msg.len() > frame_bytes_max
    {
        return false;
    }
    let _ = rmp::encode::write_bin_len(out, msg.len() as u32);
    out.extend_from_slice(msg);
    tail.count += 1;
    if tail.from.is_some() {
        tail.next_seq = tail.next_seq.wrapping_add(1);
    }
    let body = out.len() - tail.start - FRAME_HEADER_BYTES;
    out[tail.count_at..tail.count_at + 4].copy_from_slice(&tail.count.to_be_bytes());
    out[tail.start..tail.start + 4].copy_from_slice(&(body as u32).to_be_bytes());
    true
}

/// The messages of a `DeliverBatch`, oldest first.
///
/// Read by the fast path, they stay where they arrived: the encoded run of binary values,
/// checked once and walked again on delivery, so a batch of thousands of messages costs no
/// allocation (a list of them would be one of up to 64 KiB per frame). Read by serde (a batch
/// written some other way), they are a list.
#[derive(Clone)]
pub struct BatchMsgs<'a>(BatchRepr<'a>);

#[derive(Clone)]
enum BatchRepr<'a> {
    /// `count` MessagePack binary values back to back, exactly filling `bytes` (checked by
    /// [`BatchMsgs::packed`]).
    Packed {
        bytes: &'a [u8],
        count: usize,
    },
    Listed(Vec<&'a serde_bytes::Bytes>),
}

impl<'a> BatchMsgs<'a> {
    /// Checks that `bytes` holds exactly `count` MessagePack binary values.
    fn packed(bytes: &'a [u8], count: usize) -> Option<Self> {
        let mut rd = bytes;
        for _ in 0..count {
            let len = rmp::decode::read_bin_len(&mut rd).ok()? as usize;
            rd = rd.get(len..)?;
        }
        rd.is_empty()
            .then_some(BatchMsgs(BatchRepr::Packed { bytes, count }))
    }

    /// A batch of these messages.
    pub fn from_list(msgs: Vec<&'a [u8]>) -> Self {
        BatchMsgs(BatchRepr::Listed(
            msgs.into_iter().map(serde_bytes::Bytes::new).collect(),
        ))
    }

    /// How many messages.
    pub fn len(&self) -> usize {
        match &self.0 {
            BatchRepr::Packed { count, .. } => *count,
            BatchRepr::Listed(v) => v.len(),
        }
    }

    /// No messages.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The messages, oldest first.
    pub fn iter(&self) -> BatchIter<'a> {
        BatchIter(match &self.0 {
            BatchRepr::Packed { bytes, count } => IterRepr::Packed {
                rd: bytes,
                left: *count,
            },
            BatchRepr::Listed(v) => IterRepr::Listed(v.clone().into_iter()),
        })
    }
}

/// The messages of a [`BatchMsgs`], oldest first.
pub struct BatchIter<'a>(IterRepr<'a>);

enum IterRepr<'a> {
    Packed { rd: &'a [u8], left: usize },
    Listed(std::vec::IntoIter<&'a serde_bytes::Bytes>),
}

impl<'a> Iterator for BatchIter<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        match &mut self.0 {
            IterRepr::Packed { rd, left } => {
                if *left == 0 {
                    return None;
                }
                // Checked when the batch was read: this cannot fail, and ends the walk if it
                // somehow did.
                let Ok(len) = rmp::decode::read_bin_len(rd) else {
                    *left = 0;
                    return None;
                };
                let Some((msg, rest)) = rd.split_at_checked(len as usize) else {
                    *left = 0;
                    return None;
                };
                *rd = rest;
                *left -= 1;
                Some(msg)
            }
            IterRepr::Listed(it) => it.next().map(|b| &b[..]),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = match &self.0 {
            IterRepr::Packed { left, .. } => *left,
            IterRepr::Listed(it) => it.len(),
        };
        (n, Some(n))
    }
}

impl ExactSizeIterator for BatchIter<'_> {}

impl std::fmt::Debug for BatchMsgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.iter().map(serde_bytes::Bytes::new))
            .finish()
    }
}

impl Serialize for BatchMsgs<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().map(serde_bytes::Bytes::new))
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for BatchMsgs<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list: Vec<&'a serde_bytes::Bytes> = Deserialize::deserialize(d)?;
        Ok(BatchMsgs(BatchRepr::Listed(list)))
    }
}

fn read_batch(body: &[u8]) -> Option<Frame<'_>> {
    let mut rd = body.strip_prefix(BATCH_PREFIX)?;
    let to = read_id(&mut rd)?;
    let from = read_opt(&mut rd, read_id)?;
    let first_seq: u64 = rmp::decode::read_int(&mut rd).ok()?;
    let wait = rmp::decode::read_bool(&mut rd).ok()?;
    let n = rmp::decode::read_array_len(&mut rd).ok()? as usize;
    // Every message takes at least one byte, so a count beyond the bytes left is a lie; the
    // walk below stops at the end of the bytes either way.
    if n > rd.len() {
        return None;
    }
    let msgs = BatchMsgs::packed(rd, n)?;
    Some(Frame::DeliverBatch {
        to,
        from,
        first_seq,
        wait,
        msgs,
    })
}

/// Reads a `Deliver` body written by [`write_deliver`] (or by serde, which writes the same
/// bytes). `None` for anything else, which then goes through serde and its errors.
fn read_deliver(body: &[u8]) -> Option<Frame<'_>> {
    let mut rd = body.strip_prefix(DELIVER_PREFIX)?;
    let to = read_id(&mut rd)?;
    let from = read_opt(&mut rd, read_id)?;
    let seq: u64 = rmp::decode::read_int(&mut rd).ok()?;
    let ask = read_opt(&mut rd, |r| rmp::decode::read_int::<u64, _>(r).ok())?;
    let wait = rmp::decode::read_bool(&mut rd).ok()?;
    let len = rmp::decode::read_bin_len(&mut rd).ok()? as usize;
    if rd.len() != len {
        return None;
    }
    Some(Frame::Deliver {
        to,
        from,
        seq,
        ask,
        wait,
        msg: rd,
    })
}

/// Appends one frame to `out`. On error `out` is left as it was.
pub fn encode_frame(
    out: &mut Vec<u8>,
    frame: &Frame<'_>,
    frame_bytes_max: usize,
) -> Result<usize, WireError> {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, WIRE_VERSION]);
    let written = match *frame {
        Frame::Deliver {
            to,
            from,
            seq,
            ask,
            wait,
            msg,
        } => write_deliver(out, (to, from, seq, ask, wait, msg)),
        _ => rmp_serde::encode::write(out, frame).map_err(|e| WireError::Malformed {
            detail: e.to_string(),
        }),
    };
    if let Err(e) = written {
        out.truncate(start);
        return Err(e);
    }
    let body_bytes = out.len() - start - FRAME_HEADER_BYTES;
    if body_bytes > frame_bytes_max || body_bytes > u32::MAX as usize {
        out.truncate(start);
        return Err(WireError::TooLarge {
            len: body_bytes as u64,
            max: frame_bytes_max,
        });
    }
    out[start..start + 4].copy_from_slice(&(body_bytes as u32).to_be_bytes());
    Ok(out.len() - start)
}

/// Decodes a frame body (as returned by [`FrameReader::next_frame`]).
pub fn decode(body: &[u8]) -> Result<Frame<'_>, WireError> {
    if let Some(frame) = read_deliver(body) {
        return Ok(frame);
    }
    if let Some(frame) = read_batch(body) {
        return Ok(frame);
    }
    rmp_serde::from_slice(body).map_err(|e| WireError::Malformed {
        detail: e.to_string(),
    })
}

/// Incremental frame splitter for one stream: push bytes as they arrive, take frames out.
///
/// It holds at most one partial frame plus the last pushed chunk: a header announcing more than
/// `frame_bytes_max` is refused before any room is made for its body.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    frame_bytes_max: usize,
}

impl FrameReader {
    /// A reader refusing bodies over `frame_bytes_max` bytes.
    pub fn new(frame_bytes_max: usize) -> Self {
        FrameReader {
            buf: Vec::new(),
            start: 0,
            frame_bytes_max,
        }
    }

    /// Bytes buffered and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Appends received bytes. Call [`next_frame`](Self::next_frame) until it returns `None`
    /// after each push, so that an oversize header is caught before more is buffered.
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 && (self.start == self.buf.len() || self.start >= self.buf.len() / 2) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame body, `None` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, WireError> {
        let avail = &self.buf[self.start..];
        if avail.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len > self.frame_bytes_max {
            return Err(WireError::TooLarge {
                len: len as u64,
                max: self.frame_bytes_max,
            });
        }
        if avail[4] != WIRE_VERSION {
            return Err(WireError::WrongVersion {
                got: avail[4],
                want: WIRE_VERSION,
            });
        }
        if avail.len() < FRAME_HEADER_BYTES + len {
            return Ok(None);
        }
        let body_start = self.start + FRAME_HEADER_BYTES;
        self.start = body_start + len;
        Ok(Some(&self.buf[body_start..body_start + len]))
    }

    /// Checks that the stream ended on a frame boundary.
    pub fn finish(&self) -> Result<(), WireError> {
        let have = self.buffered();
        if have == 0 {
            return Ok(());
        }
        let need = if have >= 4 {
            let b = &self.buf[self.start..];
            FRAME_HEADER_BYTES + u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
        } else {
            FRAME_HEADER_BYTES
        };
        Err(WireError::Truncated { need, have })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_in_pieces() {
        let mut out = Vec::new();
        for i in 0..10u64 {
            let msg = vec![i as u8; i as usize * 30];
            let f = Frame::Deliver {
                to: ServiceId::from_parts(1, i),
                from: None,
                seq: i,
                ask: None,
                wait: false,
                msg: &msg,
            };
            encode_frame(&mut out, &f, 4096).unwrap();
        }
        let mut r = FrameReader::new(4096);
        let mut seen = 0u64;
        for chunk in out.chunks(7) {
            r.push(chunk);
            while let Some(body) = r.next_frame().unwrap() {
                match decode(body).unwrap() {
                    Frame::Deliver { seq, msg, .. } => {
                        assert_eq!(seq, seen);
                        assert_eq!(msg.len(), seen as usize * 30);
                    }
                    other => panic!("unexpected {other:?}"),
                }
                seen += 1;
            }
        }
        assert_eq!(seen, 10);
        r.finish().unwrap();
    }

    #[test]
    fn deliver_fast_path_writes_exactly_what_serde_writes() {
        let big = ServiceId::from_parts(u64::MAX, 1 << 40);
        let cases = [
            (ServiceId::from_parts(1, 2), None, 0, None, false, &b""[..]),
            (
                big,
                Some(ServiceId::from_parts(300, 70_000)),
                u64::MAX,
                Some(5),
                true,
                &[7u8; 300][..],
            ),
            (big, None, 128, Some(u64::MAX), false, &[1, 2, 3][..]),
        ];
        for (to, from, seq, ask, wait, msg) in cases {
            let frame = Frame::Deliver {
                to,
                from,
                seq,
                ask,
                wait,
                msg,
            };
            let mut fast = Vec::new();
            write_deliver(&mut fast, (to, from, seq, ask, wait, msg)).unwrap();
            let serde = rmp_serde::to_vec(&frame).unwrap();
            assert_eq!(fast, serde, "{frame:?}");
            // Both readers agree on it.
            let via_fast = read_deliver(&serde).expect("fast path reads serde's bytes");
            let via_serde: Frame<'_> = rmp_serde::from_slice(&fast).unwrap();
            assert_eq!(format!("{via_fast:?}"), format!("{via_serde:?}"));
        }
        // Trailing bytes are not a Deliver the fast path accepts; serde then refuses them too.
        let mut bad = Vec::new();
        write_deliver(&mut bad, (big, None, 1, None, false, b"x")).unwrap();
        bad.push(0);
        assert!(read_deliver(&bad).is_none());
    }

    #[test]
    fn batches_grow_in_place_and_read_back_like_serde() {
        let to = ServiceId::from_parts(9, 9);
        let from = Some(ServiceId::from_parts(8, 8));
        let mut out = Vec::new();
        let mut tail = start_batch(&mut out, (to, from, 41, true, b"a"), 1 << 20).unwrap();
        assert!(tail.takes(to, from, 42, true));
        assert!(
            !tail.takes(to, from, 43, true),
            "only the next number joins"
        );
        assert!(!tail.takes(to, None, 42, true));
        let big = vec![5u8; 300];
        for msg in [&b"bb"[..], &big[..], &b""[..]] {
            assert!(append_to_batch(&mut out, &mut tail, msg, 1 << 20));
        }
        let mut r = FrameReader::new(1 << 20);
        r.push(&out);
        let body = r.next_frame().unwrap().unwrap();
        let fast = read_batch(body).expect("fast path reads its own batch");
        let via_serde: Frame<'_> = rmp_serde::from_slice(body).unwrap();
        assert_eq!(format!("{fast:?}"), format!("{via_serde:?}"));
        match fast {
            Frame::DeliverBatch {
                first_seq,
                msgs,
                wait,
                ..
            } => {
                assert_eq!(first_seq, 41);
                assert!(wait);
                let lens: Vec<usize> = msgs.iter().map(|m| m.len()).collect();
                assert_eq!(lens, vec![1, 2, 300, 0]);
                assert_eq!(msgs.len(), 4);
                assert_eq!(msgs.iter().nth(1), Some(&b"bb"[..]));
                assert_eq!(msgs.iter().len(), 4);
            }
            other => panic!("{other:?}"),
        }
        // A frame that would pass the limit does not take the message.
        let mut small = Vec::new();
        let mut t = start_batch(&mut small, (to, None, 0, false, &[1; 40]), 100).unwrap();
        let before = small.clone();
        assert!(!append_to_batch(&mut small, &mut t, &[2; 60], 100));
        assert_eq!(small, before);
        // A count larger than the bytes left is refused without sizing anything by it.
        let mut lie = BATCH_PREFIX.to_vec();
        lie.extend_from_slice(&[0x92, 1, 1, 0xc0, 1, 0xc2, 0xdd, 0xff, 0xff, 0xff, 0xff]);
        assert!(read_batch(&lie).is_none());
        assert!(decode(&lie).is_err());
        // A message running past the end, or bytes after the last one, are refused too.
        let body = r_body(&out);
        let mut short = body.clone();
        short.pop();
        assert!(read_batch(&short).is_none());
        let mut long = body;
        long.push(0);
        assert!(read_batch(&long).is_none());
    }

    /// The body of the one frame in `out`.
    fn r_body(out: &[u8]) -> Vec<u8> {
        let mut r = FrameReader::new(1 << 20);
        r.push(out);
        r.next_frame().unwrap().unwrap().to_vec()
    }

    #[test]
    fn oversize_header_is_refused_before_buffering() {
        let mut r = FrameReader::new(1024);
        r.push(&[0xff, 0xff, 0xff, 0xff, WIRE_VERSION]);
        assert_eq!(
            r.next_frame().unwrap_err(),
            WireError::TooLarge {
                len: u32::MAX as u64,
                max: 1024
            }
        );
        assert!(r.buffered() <= FRAME_HEADER_BYTES);
    }

    #[test]
    fn encode_refuses_oversize() {
        let big = vec![0u8; 2000];
        let mut out = vec![9];
        let f = Frame::Spawn {
            req: 1,
            kind: KindKey::new("k", 1),
            state: &big,
        };
        assert!(matches!(
            encode_frame(&mut out, &f, 1000),
            Err(WireError::TooLarge { .. })
        ));
        assert_eq!(out, vec![9]);
    }

    #[test]
    fn truncated_and_wrong_version_and_garbage() {
        let mut out = Vec::new();
        encode_frame(&mut out, &Frame::Hello { caps: vec![] }, 64).unwrap();
        let mut r = FrameReader::new(64);
        r.push(&out[..out.len() - 1]);
        assert!(r.next_frame().unwrap().is_none());
        assert!(matches!(r.finish(), Err(WireError::Truncated { .. })));

        let mut r = FrameReader::new(64);
        r.push(&[0, 0, 0, 1, 99, 0]);
        assert!(matches!(
            r.next_frame(),
            Err(WireError::WrongVersion { got: 99, .. })
        ));

        let mut r = FrameReader::new(64);
        r.push(&[0, 0, 0, 3, WIRE_VERSION, 0xc1, 0xc1, 0xc1]);
        let body = r.next_frame().unwrap().unwrap();
        assert!(matches!(decode(body), Err(WireError::Malformed { .. })));
    }
}
