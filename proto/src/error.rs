//! Why a delivery or an ask failed. Both travel on the wire (a refusal, a failed ask's reply),
//! so they live with the protocol.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ids::{KindKey, NodeName, ServiceId};

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
    /// The sender's address book has no entry under this role.
    #[error("service {holder} has no entry {role:?} in its book")]
    UnknownRole {
        /// The service whose book was read.
        holder: ServiceId,
        /// The role asked for.
        role: String,
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
    /// A replicated service has not yet confirmed `max` messages sent to it from this node:
    /// the node keeps a copy of each until a checkpoint covers it, to send it again if the
    /// service is taken over.
    #[error("service {id} has {max} messages from this node not yet covered by a checkpoint")]
    Unsettled {
        /// The target.
        id: ServiceId,
        /// Copies kept per channel.
        max: usize,
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
    /// The service's handler panicked: the service stopped (its state may have been half
    /// changed, so it is not run again) and every message queued for it, and the one in hand,
    /// failed with this reason.
    #[error("service {id} stopped: its handler panicked: {detail}")]
    ServicePanicked {
        /// The target.
        id: ServiceId,
        /// The panic's message.
        detail: String,
    },
    /// The connection to the node the message was for was lost and is not back: nothing is
    /// queued for it (it would wait unreported), the sender is told at once.
    #[error("node {node} was lost and is not connected")]
    PeerLost {
        /// The node.
        node: NodeName,
    },
    /// The service already keeps a receive window for as many senders as it may
    /// ([`crate::inbox::SENDERS_MAX`]); a sender it has never heard from is refused.
    #[error("service {id} already has {senders_max} senders; a new one is refused")]
    TooManySenders {
        /// The service.
        id: ServiceId,
        /// The bound.
        senders_max: usize,
    },
    /// The receiving node does not believe that the node the message came from speaks for
    /// its sender ([`crate::speakers`]): the node that knows said otherwise, or did not answer
    /// in time.
    #[error("node {node} does not speak for sender {sender} as far as service {id}'s node knows")]
    NotSpeaker {
        /// The target.
        id: ServiceId,
        /// The sender named.
        sender: ServiceId,
        /// The node that sent the message.
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
