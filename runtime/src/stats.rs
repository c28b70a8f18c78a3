//! Counters a node keeps, and the snapshot [`NodeStats`] users read.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// A monotonic counter, alone on its cache line: counters bumped on every message by
/// different threads (a sender's `sent_local`, a handler's `processed`) must not share one,
/// nor share one with the fields every send reads.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        #[derive(Debug, Default)]
        pub(crate) struct Stats { $(pub $name: Counter,)* }

        /// A snapshot of a node's counters and gauges.
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct NodeStats {
            $($(#[doc = $doc])* pub $name: u64,)*
            /// Services running on the node.
            pub services_live: u64,
            /// Of those, the services asleep (see `Limits::sleep_after_idle_ms`):
            /// `services_slept - services_woken`.
            pub services_asleep: u64,
            /// Peers with an established connection.
            pub peers_connected: u64,
            /// Book edges known cluster-wide.
            pub book_edges: u64,
            /// Asks waiting for a reply on this node.
            pub asks_pending: u64,
        }

        impl Stats {
            pub fn snapshot(&self) -> NodeStats {
                NodeStats { $($name: self.$name.get(),)* ..NodeStats::default() }
            }
        }

        impl NodeStats {
            /// The monotonic counters, each with its name and its doc comment (what it
            /// counts): what the metrics endpoint exports.
            pub(crate) fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
                vec![$((stringify!($name), concat!($($doc, "\n",)*), self.$name),)*]
            }
        }
    };
}

counters! {
    /// Messages accepted into local mailboxes from senders on this node.
    sent_local,
    /// Messages queued for a peer node.
    sent_remote,
    /// Messages from peers accepted into local mailboxes.
    received_remote,
    /// Messages handled by local services.
    processed,
    /// Sends refused at once to a sender on this node (full, stopped, unknown, backpressure).
    refused_to_senders,
    /// Messages from waiting senders that found their mailbox full and held their stream.
    deliveries_held,
    /// Messages from peers this node refused (their sender was told).
    refused_from_peers,
    /// Messages this node sent that a peer refused.
    refused_by_peers,
    /// Messages refused because their service stopped with them still queued.
    refused_on_stop,
    /// Asks started on this node.
    asks_started,
    /// Asks answered (a value or an error from the far side).
    asks_answered,
    /// Asks that timed out.
    asks_timed_out,
    /// Replies sent to another node.
    replies_remote,
    /// Frames received.
    frames_in,
    /// Frames sent.
    frames_out,
    /// Bytes received on streams.
    bytes_in,
    /// Bytes sent on streams.
    bytes_out,
    /// Frames from peers that were malformed, oversize, truncated or unexpected.
    protocol_errors,
    /// Protocol errors peers reported about frames of ours.
    protocol_errors_reported,
    /// Claims from peers this node did not believe (see `tern_proto::claims`): each was
    /// logged as a `claim-refused` event and answered with a `CLAIM_REFUSED` protocol error,
    /// and changed nothing.
    claims_refused,
    /// Bytes queued for a peer and lost when its connection failed.
    bytes_lost_on_link,
    /// Messages sent from this node reported not handled: declared lost with a node, or
    /// refused after they were accepted (see `NodeHandle::losses`).
    messages_lost_reported,
    /// Loss reports made.
    loss_reports,
    /// Restored copies dropped because their source never decided (see `prepared_orphan_ms`).
    copies_orphaned,
    /// Connections established (dialed or accepted).
    connections_up,
    /// Connections refused: TLS failures, bad handshakes, duplicates.
    connections_refused,
    /// Services started.
    services_started,
    /// Services stopped.
    services_stopped,
    /// Services stopped because a handler panicked (also counted in `services_stopped`).
    services_panicked,
    /// Times an idle service went to sleep: its runner's task ended, its state kept (see
    /// `Limits::sleep_after_idle_ms`).
    services_slept,
    /// Times a sleeping service was woken (by a message, a move, a stop).
    services_woken,
    /// Services restarted in place with a fresh state after a panic (their kind's `RESTART`).
    services_restarted,
    /// Capability changes this node has heard of (its own, or in a peer's gossip, a new
    /// member included): each asks for a re-placement round.
    capability_changes,
    /// Of those, the changes a completed re-placement round had heard of when it started: every
    /// local service has been checked against them (`capability_changes_handled >=` a value
    /// of `capability_changes` read earlier says the round for that change has run).
    capability_changes_handled,
    /// Checkpoints of replicated services sent to their standbys.
    checkpoints_sent,
    /// Bytes of those checkpoints.
    checkpoint_bytes,
    /// Checkpoints of replicated services acknowledged by their standbys.
    checkpoints_acked,
    /// Checkpoints this node took as a standby.
    checkpoints_held,
    /// Checkpoints this node parked as a standby, from a node its directory did not name yet
    /// at a newer epoch (answered once it names it, refused after a lease).
    checkpoints_parked,
    /// Checkpoints of replicated services with no standby, kept only in the data directory.
    checkpoints_stored,
    /// Replicated services resumed from the data directory after the node restarted.
    resumed_from_disk,
    /// Times a replicated service here stopped handling messages because its standby's lease
    /// lapsed (it was cut off from its standby, or the standby changed).
    replica_pauses,
    /// Replicated services this node took over as their standby, from a checkpoint.
    takeovers,
    /// Replicated services this node went on running at a new epoch after losing their
    /// standby's lease (it won the ballot).
    replica_continued,
    /// Messages to replicated services sent again from their kept copies when the service
    /// was found elsewhere.
    resent_to_replicas,
    /// Messages a replicated service taken over here had sent and not seen confirmed, sent
    /// again from the copies its checkpoint carried (receivers drop what they took).
    outputs_resent,
}
