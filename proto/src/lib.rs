//! # tern-proto
//!
//! Tern's protocol with no I/O, no clock and no threads: plain data and state machines driven
//! by their caller, with time passed in as an argument. The node (crate `tern`) runs this code
//! over QUIC; the deterministic simulation in `tern-harness` drives the same code under seeded
//! faults. Inputs are events, outputs are actions.
//!
//! - [`claims`]: who may claim what; every frame is a claim by the node at the other end.
//! - [`ids`]: `ServiceId`, `NodeName`, `KindKey`, `ServiceAddr`.
//! - [`wire`]: frames and their codec (length-checked before anything is allocated).
//! - [`error`]: why a delivery or an ask failed (these travel on the wire).
//! - [`seq`]: one sender's receive window.
//! - [`inbox`]: one service's inbox: admission, parking, freeze and hand-over, handled marks.
//! - [`forward`]: tombstones (bounded, with their fences and notices) and the routing of
//!   messages and skips for a service that is not here.
//! - [`ledger`]: a channel's delivery ledger: sent, settled, declared lost with a node.
//! - [`snapshot`]: a snapshot's windows and send counters, cut into frames and put back.
//! - [`migration`]: one node's migration protocol, single and group, with tombstones and the
//!   directory of locations.
//! - [`directory`]: address books and their reverse index.
//! - [`members`]: what a node says of itself in gossip.
//! - [`traffic`], [`placement`]: observed traffic and pure placement decisions.
//! - [`replica`]: standby copies: checkpoint cadence, leases, ballots, retained copies.

#![warn(missing_docs)]

pub mod claims;
pub mod directory;
pub mod error;
pub mod forward;
pub mod ids;
pub mod inbox;
pub mod ledger;
pub mod members;
pub mod migration;
pub mod names;
pub mod placement;
pub mod replica;
pub mod seq;
pub mod snapshot;
pub mod speakers;
pub mod traffic;
pub mod wire;
#[cfg(test)]
mod wire_props;
