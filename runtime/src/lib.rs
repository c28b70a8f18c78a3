//! # Tern
//!
//! An actor runtime for multi-device applications: every service is an actor whose state is a
//! serde value, hosted behind a runtime-owned mailbox on a node (one per device), reachable
//! through the same typed handle whether it runs on this node or another, over QUIC with mutual
//! TLS.
//!
//! Start at [`Service`] (writing a service), [`Node`] (running a node) and [`ServiceRef`]
//! (talking to a service). `runtime/examples/` holds programs to copy.

#![warn(missing_docs)]

pub mod admin;
pub mod certs;
pub mod core;
mod error;
mod handle;
mod ids;
mod mailbox;
mod members;
mod migrate;
mod node;
mod placement;
mod service;
mod stats;
pub mod tls;
mod transport;
mod tree;
pub mod wire;
#[cfg(test)]
mod wire_props;

pub use crate::core::directory::{Associations, BookEdge};
pub use crate::core::migration::AbortReason;
pub use crate::core::placement::{AffinityPolicy, Needs, Policy};
pub use crate::core::traffic::EdgeRate;
pub use error::{AskError, DeliveryError, Error};
pub use handle::ServiceRef;
pub use ids::{KindKey, NodeName, ServiceAddr, ServiceId};
pub use members::{Member, MemberInfo, MemberStatus, NodeLoad, Power};
pub use migrate::{MigrateOptions, MigrationReport, MigrationStats};
pub use node::{
    Limits, LossReport, Node, NodeConfig, NodeEvent, NodeHandle, PeerConfig, ServiceInfo,
    SocketWrap,
};
pub use placement::{
    Association, DrainReport, PlaceReport, Plan, PlanOptions, PlannedMove, RebalanceRound,
    RebalancerConfig,
};
pub use service::{Ctx, ReplyTo, Service, TimerId};
pub use stats::NodeStats;
pub use transport::PeerStatus;
pub use tree::{
    child_role, GroupReport, TreeMember, CHILD_ROLE_PREFIX, GROUP_MEMBERS_MAX, TREE_MEMBERS_MAX,
};
