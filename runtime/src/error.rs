//! Typed errors of the library.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{KindKey, NodeName, ServiceId};
use crate::wire::WireError;

/// Why a message was not accepted for a service. Local sends get it at once; remote sends get
/// it back from the receiving node (an ask fails with it, a tell is counted and logged).
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum DeliveryError {
    /// No service with this id lives on the node that was asked.
    #[error("service {id} is not known on node {node}")]
    UnknownService {
        /// The target.
        id: ServiceId,
        /// The node that looked for it.
        node: NodeName,
    },
    /// The service's mailbox holds `capacity` messages already.
    #[error("mailbox of service {id} is full ({capacity} messages)")]
    MailboxFull {
        /// The target.
        id: ServiceId,
        /// The mailbox bound.
        capacity: usize,
    },
    /// The sender's messages arrive too far ahead of the next one expected.
    #[error("receive window of service {id} for this sender is full ({held_max} early messages)")]
    WindowFull {
        /// The target.
        id: ServiceId,
        /// Early messages held per sender.
        held_max: usize,
    },
    /// The service was lost: the node that ran it, or that was handing it over, is gone.
    #[error("service {id} was lost with node {node}")]
    ServiceLost {
        /// The target.
        id: ServiceId,
        /// The node it was lost with.
        node: NodeName,
    },
    /// The message was handed on to `node` with its service (a migration's carried queue) and
    /// the connection failed before `node` confirmed it: it may not have been handled.
    #[error("message for service {id} handed on to {node} and not confirmed: it may not have been handled")]
    Unconfirmed {
        /// The target.
        id: ServiceId,
        /// The node it was handed on to.
        node: NodeName,
    },
    /// The service has stopped and takes no more messages.
    #[error("service {id} has stopped")]
    Stopped {
        /// The target.
        id: ServiceId,
    },
    /// The message could not be decoded as the service's message type.
    #[error("message for service {id} ({kind}) could not be decoded: {detail}")]
    BadMessage {
        /// The target.
        id: ServiceId,
        /// The target's kind.
        kind: KindKey,
        /// The decoder's complaint.
        detail: String,
    },
    /// A typed handle was made for one kind, but the service is of another.
    #[error("service {id} is of kind {actual}, not {expected}")]
    KindMismatch {
        /// The target.
        id: ServiceId,
        /// The kind the handle expected.
        expected: KindKey,
        /// The kind the service has.
        actual: KindKey,
    },
    /// The node is not a peer this node knows.
    #[error("node {node} is not a known peer")]
    UnknownNode {
        /// The node named.
        node: NodeName,
    },
    /// The queue of frames waiting for the link to a peer is at its bound.
    #[error("outgoing queue to node {node} is full ({bytes_max} bytes)")]
    Backpressure {
        /// The peer.
        node: NodeName,
        /// The queue bound in bytes.
        bytes_max: usize,
    },
    /// The message does not fit in one frame.
    #[error("message of {bytes} bytes exceeds frame_bytes_max {max}")]
    TooLarge {
        /// Encoded size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The message could not be encoded.
    #[error("message could not be encoded: {0}")]
    Encode(String),
    /// The service has moved to another node (a tombstone's answer; the runtime forwards the
    /// message itself, so callers only see this when the new node cannot be reached).
    #[error("service {id} moved to node {node} (epoch {epoch})")]
    Moved {
        /// The target.
        id: ServiceId,
        /// Where it runs now.
        node: NodeName,
        /// Its epoch there.
        epoch: u64,
    },
    /// The local node is shutting down.
    #[error("node {node} is shutting down")]
    NodeStopping {
        /// The local node.
        node: NodeName,
    },
}

/// Why an ask did not produce a reply.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum AskError {
    /// The receiving side refused the request after it left this node.
    #[error("request not delivered: {0}")]
    Delivery(#[from] DeliveryError),
    /// The request never left this node (the mailbox or link refused it at once): nothing
    /// was delivered, so sending it again cannot make a copy.
    #[error("request not sent: {0}")]
    NotSent(DeliveryError),
    /// No reply within the timeout.
    #[error("no reply within {timeout_ms} ms")]
    Timeout {
        /// The timeout that passed.
        timeout_ms: u64,
    },
    /// The reply arrived but is not of the expected type.
    #[error("reply could not be decoded: {detail}")]
    BadReply {
        /// The decoder's complaint.
        detail: String,
    },
    /// Too many asks are waiting on this node.
    #[error("too many pending asks on this node ({max})")]
    TooManyPending {
        /// The bound, `asks_pending_max`.
        max: usize,
    },
    /// The node answering for the reply went away before replying.
    #[error("node {node} went away before replying")]
    NodeLost {
        /// The node.
        node: NodeName,
    },
}

/// The library's general error.
#[derive(Debug, Error)]
pub enum Error {
    /// A kind that is not registered on the node.
    #[error("kind {kind} is not registered on node {node}")]
    UnknownKind {
        /// The kind asked for.
        kind: KindKey,
        /// The node.
        node: NodeName,
    },
    /// A kind registered twice with different code is refused.
    #[error("kind {0} is already registered")]
    KindTaken(KindKey),
    /// Service state could not be encoded or decoded.
    #[error("state of kind {kind} could not be (de)serialized: {detail}")]
    State {
        /// The kind.
        kind: KindKey,
        /// The codec's complaint.
        detail: String,
    },
    /// A delivery failed.
    #[error(transparent)]
    Delivery(#[from] DeliveryError),
    /// An ask failed.
    #[error(transparent)]
    Ask(#[from] AskError),
    /// A frame could not be read or written.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// Certificate creation or parsing failed.
    #[error("certificate: {0}")]
    Cert(String),
    /// TLS configuration failed.
    #[error("tls: {0}")]
    Tls(String),
    /// A configuration value is not acceptable.
    #[error("configuration: {0}")]
    Config(String),
    /// An I/O error, with what was being done. The cause is part of the message (and not
    /// repeated as a `source`, so error chains print it once).
    #[error("{what}: {cause}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        cause: std::io::Error,
    },
    /// A too-large table or queue.
    #[error("{what} is at its limit of {max}")]
    Limit {
        /// Which bound.
        what: &'static str,
        /// The bound.
        max: usize,
    },
    /// The node has stopped.
    #[error("node has stopped")]
    Stopped,
    /// An assembly-tree operation that cannot be done (a cycle, a second parent, members
    /// on several nodes).
    #[error("assembly tree: {0}")]
    Tree(String),
    /// No placement satisfies what the services need; nothing was moved.
    #[error("placement: {0}")]
    Placement(String),
    /// A remote node reported an error.
    #[error("node {node} answered: {detail}")]
    Remote {
        /// The node.
        node: NodeName,
        /// Its error.
        detail: String,
    },
    /// An admin connection failed, or the node refused the request; why, in words.
    #[error("admin: {0}")]
    Admin(String),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, cause: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            cause,
        }
    }
}
