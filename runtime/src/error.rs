//! Typed errors of the library.

use thiserror::Error;

pub use tern_proto::error::{AskError, DeliveryError};
use tern_proto::ids::{KindKey, NodeName};
use tern_proto::wire::WireError;

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
    /// Discovery by mDNS could not start (see `NodeHandle::start_discovery`).
    #[error("discovery: {0}")]
    Discovery(String),
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
    /// The data directory's store cannot be opened or read (damaged, cut short, of another
    /// format, or not a store at all): nothing in it is resumed.
    #[error("data directory store {path}: {detail}")]
    Store {
        /// The store's file.
        path: String,
        /// What is wrong.
        detail: String,
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
    /// A registered name could not be taken or found (taken by another service, not
    /// acceptable, unknown, or the service does not run on the node asked).
    #[error(transparent)]
    Name(#[from] tern_proto::names::NameError),
    /// A call that moves services did not do what was asked: which services did not move,
    /// from where to where, and why ([`NotMoved`](crate::NotMoved)). Services the report does not list as
    /// moved are where they were.
    #[error("{0}")]
    NotMoved(Box<crate::reports::NotMoved>),
    /// Pairing a device by code failed (wrong, used or expired code, or a broken exchange);
    /// why, in words.
    #[error("pairing: {0}")]
    Pairing(String),
}

impl From<crate::reports::NotMoved> for Error {
    fn from(n: crate::reports::NotMoved) -> Self {
        Error::NotMoved(Box::new(n))
    }
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, cause: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            cause,
        }
    }
}
