//! `Limits`: the bounds on every table and queue of a node (`docs/limits.md` lists each).

use serde::{Deserialize, Serialize};

/// Bounds on every table and queue of a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limits {
    /// Messages a service's mailbox holds before senders get `MailboxFull`.
    pub mailbox_capacity: usize,
    /// Largest frame body accepted or sent, in bytes.
    pub frame_bytes_max: usize,
    /// Bytes queued per peer and stream kind before senders get `Backpressure`.
    pub link_queue_bytes_max: usize,
    /// Asks waiting for replies on this node.
    pub asks_pending_max: usize,
    /// Book edges known cluster-wide.
    pub book_edges_max: usize,
    /// Services running on this node.
    pub services_max: usize,
    /// Peers this node keeps links to, and members it knows. A member speaking for itself
    /// takes the place of one only heard of when the table is full.
    pub peers_max: usize,
    /// A member heard of only second hand (another peer's gossip) that has not spoken for
    /// itself within this time is forgotten, with the link made to dial it, in milliseconds.
    pub members_second_hand_ttl_ms: u64,
    /// Entries kept in the node's event log.
    pub events_max: usize,
    /// Time allowed for a connection's TLS and Tern handshakes.
    pub handshake_timeout_ms: u64,
    /// Pending timers per service.
    pub timers_per_service_max: usize,
    /// Largest service state a migration may bring to this node, in bytes.
    pub snapshot_bytes_max: usize,
    /// Bytes this node reserves, across every peer, for the states of snapshots still
    /// arriving. A state's room grows as its bytes arrive (never on the header's word alone);
    /// a snapshot whose next bytes would go past this is refused (`too large: ...`), and its
    /// service resumes at its source.
    pub snapshot_bytes_in_max: usize,
    /// The share of `snapshot_bytes_in_max` one peer's snapshots may hold at once: a peer
    /// cannot take the whole budget and keep every other peer's migrations out.
    pub snapshot_bytes_in_per_peer_max: usize,
    /// Most queued messages a migration may carry to this node.
    pub snapshot_carried_max: usize,
    /// Time a source waits for the target's answer before it aborts, in milliseconds.
    pub migration_deadline_ms: u64,
    /// Time a service asked to freeze for a migration may take to hand over its state (finish
    /// the message in hand; with `drain`, empty its queue), in milliseconds. Past it the
    /// migration aborts with `freeze-deadline` and the service runs on.
    pub freeze_deadline_ms: u64,
    /// Time a service may copy its state ahead ([`Precopy`](crate::Precopy)) before it freezes
    /// anyway (the changes still unsent then go in the freeze), in milliseconds. A target
    /// drops a pre-copy whose snapshot has not begun within this plus
    /// `migration_deadline_ms`.
    pub precopy_deadline_ms: u64,
    /// Tombstones kept (the oldest is forgotten first).
    pub tombstones_max: usize,
    /// Peers allowed to push migrations to this node, and to start services here with a state
    /// of their choosing (`spawn_on`); empty means every peer.
    pub migration_peers: Vec<String>,
    /// Peers whose requests to move services hosted here (`migrate`, `migrate_group`,
    /// `migrate_tree` called on another node) this node follows; empty means every peer. A
    /// request from any other peer is refused as a claim (see `tern_proto::claims`).
    pub move_requests_from: Vec<String>,
    /// Per kind, which peers may push its services here and ask for them to move away, on
    /// top of `migration_peers` and `move_requests_from` (see
    /// [`KindRule`](tern_proto::claims::KindRule)); a kind with no rule follows those alone.
    pub kind_rules: Vec<tern_proto::claims::KindRule>,
    /// A connection that hears nothing for this long is closed and its peer counted lost:
    /// asks only it could answer fail with `NodeLost`, and attempts waiting on it abort.
    pub idle_timeout_ms: u64,
    /// A quiet connection sends a keep-alive this often (well under `idle_timeout_ms`).
    pub keep_alive_ms: u64,
    /// Loss reports kept for [`NodeHandle::losses`](crate::NodeHandle::losses) (the oldest goes first; the counters
    /// `messages_lost_reported` and `loss_reports` keep the totals).
    pub losses_max: usize,
    /// A restored copy whose source has said neither commit nor abort for this long (the
    /// source is gone, or cut off with its decision) is dropped and reported lost, in
    /// milliseconds. Must be well over `migration_deadline_ms` plus `idle_timeout_ms`.
    pub prepared_orphan_ms: u64,
    /// A peer's word that a service moved to a place past what this node knows (from a node
    /// other than the host it knows, which may have hosted the service in between: the word
    /// of that move travels on another connection) is held back this long for that word to
    /// come, in milliseconds; then it is refused as a lie. At most 64 per peer are held.
    pub location_hold_ms: u64,
    /// Service-to-service edges whose traffic is observed (the heaviest are kept).
    pub traffic_edges_max: usize,
    /// On battery at or below this charge (percent), the node drains itself.
    pub drain_below_percent: u8,
    /// A service that has taken no message for between one and two of these (in
    /// milliseconds), with no timer pending, no copy under way and no replicas, sleeps: its
    /// runner's task ends and its state waits on the node's thread until a message, a move
    /// or a stop wakes it, which costs a task start. 0: services never sleep.
    pub sleep_after_idle_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            mailbox_capacity: 4096,
            frame_bytes_max: 16 << 20,
            link_queue_bytes_max: 32 << 20,
            asks_pending_max: 65_536,
            book_edges_max: 1_000_000,
            services_max: 1_000_000,
            peers_max: 256,
            members_second_hand_ttl_ms: 30_000,
            events_max: 256,
            handshake_timeout_ms: 5_000,
            timers_per_service_max: 1024,
            snapshot_bytes_max: 256 << 20,
            snapshot_bytes_in_max: 512 << 20,
            snapshot_bytes_in_per_peer_max: 256 << 20,
            snapshot_carried_max: 1_000_000,
            migration_deadline_ms: 10_000,
            freeze_deadline_ms: 10_000,
            precopy_deadline_ms: 10_000,
            tombstones_max: 65_536,
            migration_peers: Vec::new(),
            move_requests_from: Vec::new(),
            kind_rules: Vec::new(),
            idle_timeout_ms: 10_000,
            keep_alive_ms: 2_000,
            losses_max: 1024,
            prepared_orphan_ms: 60_000,
            location_hold_ms: 2_000,
            traffic_edges_max: 4096,
            drain_below_percent: 10,
            sleep_after_idle_ms: 1_000,
        }
    }
}
