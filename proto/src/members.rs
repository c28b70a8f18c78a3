//! What a node says about itself in membership gossip: capabilities, load, power, the services
//! it hosts and its heaviest traffic edges. The member table that merges these lives in the node.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::ids::{KindKey, NodeName, ServiceId};
use crate::traffic::EdgeRate;

/// How often a node gossips, in milliseconds.
pub const GOSSIP_MS: u64 = 1000;
/// Services a node lists in its gossip at most.
pub const GOSSIP_SERVICES_MAX: usize = 1024;
/// Traffic edges a node lists in its gossip at most (its heaviest).
pub const GOSSIP_EDGES_MAX: usize = 256;
/// Capabilities kept per member.
pub const CAPABILITIES_MAX: usize = 64;
/// Registered kinds kept per member.
pub const KINDS_MAX: usize = 256;
/// Registered names kept per member (one service may hold several).
pub const NAMES_MAX: usize = 1024;
/// Bytes of one registered name at most.
pub const NAME_BYTES_MAX: usize = 128;

/// A kind a node has registered, with what it needs from a node: any node can then plan
/// for services of kinds it does not run itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindInfo {
    /// The kind and its version.
    pub kind: KindKey,
    /// Its required and preferred capabilities.
    pub needs: crate::placement::Needs,
    /// Older versions of the kind whose services the node takes too, upgrading them on
    /// arrival.
    #[serde(default)]
    pub reads: Vec<u32>,
}

/// A device's power, as the device sets it (`NodeHandle::set_power` in crate `tern`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Power {
    /// On mains power.
    #[default]
    Plugged,
    /// On battery, with this much charge left (0 to 100).
    Battery {
        /// Charge left, in percent.
        percent: u8,
    },
}

impl Power {
    /// The charge left in percent (100 when plugged in).
    pub fn percent(&self) -> u8 {
        match self {
            Power::Plugged => 100,
            Power::Battery { percent } => (*percent).min(100),
        }
    }
}

impl std::fmt::Display for Power {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Power::Plugged => f.write_str("plugged in"),
            Power::Battery { percent } => write!(f, "battery {percent}%"),
        }
    }
}

/// A node's live load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeLoad {
    /// Services it hosts.
    pub services: u64,
    /// Messages queued in all their mailboxes.
    pub backlog: u64,
    /// Resident memory of the process hosting the node, in bytes (Linux; 0 elsewhere).
    /// Nodes sharing one process (the harness) report the same figure.
    pub memory_bytes: u64,
}

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The node.
    pub name: NodeName,
    /// Where peers can reach it, if it listens on a routable address.
    pub addr: Option<SocketAddr>,
    /// What the device offers now.
    pub capabilities: Vec<String>,
    /// Its load when it said so.
    pub load: NodeLoad,
    /// Its power.
    pub power: Power,
    /// True while it is draining (moving its services away before it stops).
    pub draining: bool,
    /// True when its rebalancer is on (the one with the smallest name among those leads).
    pub rebalancing: bool,
    /// The prefix of the ids it makes (a handle's sender id made there starts with it).
    pub id_prefix: u64,
    /// Services it hosts (at most [`GOSSIP_SERVICES_MAX`]): id, kind, pinned, and the epoch it
    /// hosts it at (a channel follows gossip only to a place at least as new as its own).
    pub services: Vec<(ServiceId, KindKey, bool, u64)>,
    /// Its heaviest observed traffic edges (at most [`GOSSIP_EDGES_MAX`]).
    pub edges: Vec<EdgeRate>,
    /// The kinds registered there (at most [`KINDS_MAX`]): it can host only these.
    #[serde(default)]
    pub kinds: Vec<KindInfo>,
    /// Services it hosts that a user's explicit move or placement holds there (at most
    /// [`GOSSIP_SERVICES_MAX`]): automatic placement leaves them alone.
    #[serde(default)]
    pub held: Vec<ServiceId>,
    /// Registered names of services it hosts (at most [`NAMES_MAX`]), each with its service.
    #[serde(default)]
    pub names: Vec<(String, ServiceId)>,
    /// Replicated services it hosts (at most [`GOSSIP_SERVICES_MAX`]): id, epoch, and the
    /// standby that holds a checkpoint of that epoch. Only that standby may later say it took
    /// the service over, at the next epoch (`claims::takeover`).
    #[serde(default)]
    pub standbys: Vec<(ServiceId, u64, NodeName)>,
    /// When this run of the node started (ms since the Unix epoch): a restarted node is a
    /// new incarnation, whose word replaces everything its earlier run said.
    pub incarnation: u64,
    /// Bumped by the node at each change it announces; within one incarnation a newer one
    /// replaces an older one.
    pub version: u64,
}

/// Whether a member is reachable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberStatus {
    /// Connected, or heard of recently through another node.
    Up,
    /// Said goodbye (shut down).
    Left,
    /// Its connection timed out.
    Lost,
}

/// One node as `NodeHandle::members` in crate `tern` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    /// What it last said.
    pub info: MemberInfo,
    /// Reachable or not.
    pub status: MemberStatus,
    /// True for the node answering.
    pub local: bool,
}
