//! (node layer) Pre-copy, the node's side: the runner's copying ahead between messages
//! ([`Copying`]), the stream writer that carries the chunks to the target ahead of the
//! snapshot ([`write_precopy`]), and the target's part being filled ([`PreIn`]).
//!
//! The protocol's part (when a move pre-copies, when it freezes, how an abort leaves the
//! service) is `tern_proto::migration::Core` (`migrate_with`, `precopied`, `precopy_failed`,
//! `Action::Precopy`, `Action::PrecopyEnded`); the driver (`migrate.rs`) carries out its
//! actions with what is here. The chunks and the snapshot that follows travel on one stream,
//! so the target applies them in order and a stream that ends before its `SnapBegin` leaves
//! nothing behind.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use crate::migrate::{put_frame, Room};
use crate::node::NodeShared;
use crate::tracked::Tracked;
use tern_proto::ids::{KindKey, NodeName, ServiceId};
use tern_proto::migration::MigrationId;
use tern_proto::wire::{self, Frame};

/// Bytes of entries per `PreState` frame, encoded by the service's task between two messages
/// (about a millisecond of work; a handler waits at most that long for it).
pub(crate) const PRECOPY_CHUNK_BYTES: usize = 256 << 10;
/// Chunks queued for the stream's writer at most: the service copies no further ahead of the
/// link than this.
pub(crate) const PRECOPY_CHUNKS_QUEUED_MAX: usize = 4;
/// Once every entry went once and the changes left are estimated at most this many bytes, the
/// service freezes: the freeze carries them.
pub(crate) const PRECOPY_LAST_BYTES: usize = 256 << 10;
/// Changes sent again past this multiple of the first pass's bytes: the service writes faster
/// than the link copies, and waiting longer would not shrink the freeze. It freezes.
pub(crate) const PRECOPY_RESEND_FACTOR: u64 = 2;

/// Bytes sent ahead and not yet applied by the target at most: past it the service waits
/// for the target's word (`PreApplied`) before it encodes more.
pub(crate) const PRECOPY_IN_FLIGHT_MAX: u64 = 4 << 20;

/// What the runner takes to copy ahead: the attempt, the writer's queue, and what the target
/// says it applied.
pub(crate) struct PreTx {
    pub mig: MigrationId,
    pub tx: mpsc::Sender<Vec<u8>>,
    pub acked: Arc<Acked>,
}

/// The bytes a target says it applied of a pre-copy, and a wake-up for the runner.
#[derive(Default)]
pub(crate) struct Acked {
    bytes: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
}

impl Acked {
    pub fn set(&self, bytes: u64) {
        self.bytes.fetch_max(bytes, Ordering::AcqRel);
        // One waiter, the runner: a permit kept for it if it is not waiting yet.
        self.changed.notify_one();
    }

    fn get(&self) -> u64 {
        self.bytes.load(Ordering::Acquire)
    }
}

/// The stream a pre-copy was written on, handed to the snapshot's writer, and the bytes written.
pub(crate) type PreStream = Result<(quinn::SendStream, u64), String>;

/// The source's side of one service's pre-copy, kept by the driver until the snapshot's
/// writer takes the stream or the attempt ends without a freeze.
pub(crate) struct PreOut {
    pub mig: MigrationId,
    /// The target.
    pub to: NodeName,
    pub acked: Arc<Acked>,
    /// For the runner, until it takes it.
    pub tx: Option<PreTx>,
    /// The stream, once the runner has sent the last chunk.
    pub stream: Option<oneshot::Receiver<PreStream>>,
    /// Dropped to call the writer off (an abort before the freeze).
    pub _cancel: oneshot::Sender<()>,
}

impl PreOut {
    /// A pre-copy of attempt `mig` and what its writer needs.
    pub fn new(mig: MigrationId, to: NodeName) -> (PreOut, PreWriter) {
        let (tx, rx) = mpsc::channel(PRECOPY_CHUNKS_QUEUED_MAX);
        let (cancel_tx, cancel) = oneshot::channel();
        let (done, stream) = oneshot::channel();
        let acked = Arc::new(Acked::default());
        (
            PreOut {
                mig: mig.clone(),
                to,
                acked: acked.clone(),
                tx: Some(PreTx { mig, tx, acked }),
                stream: Some(stream),
                _cancel: cancel_tx,
            },
            PreWriter { rx, cancel, done },
        )
    }
}

/// The writer's ends of a pre-copy.
pub(crate) struct PreWriter {
    rx: mpsc::Receiver<Vec<u8>>,
    cancel: oneshot::Receiver<()>,
    done: oneshot::Sender<PreStream>,
}

/// Why a pre-copy's writer stopped when its driver called it off.
const CALLED_OFF: &str = "called off";

/// Writes a pre-copy's chunks on a new stream to `to` (opened with the first chunk), then
/// hands the stream to the snapshot's writer once the runner dropped its end. Called off, or
/// failing, it resets the stream (the target drops what it built); failing, it tells the
/// driver.
pub(crate) async fn write_precopy(
    node: Arc<NodeShared>,
    to: NodeName,
    (mig, id, kind): (MigrationId, ServiceId, KindKey),
    w: PreWriter,
) {
    let PreWriter {
        mut rx,
        mut cancel,
        done,
    } = w;
    let frame_max = node.limits.frame_bytes_max;
    let mut send: Option<quinn::SendStream> = None;
    let mut buf = Vec::new();
    let mut written = 0u64;
    let result: Result<(), String> = async {
        loop {
            let chunk = tokio::select! {
                _ = &mut cancel => return Err(CALLED_OFF.to_string()),
                c = rx.recv() => c,
            };
            let Some(chunk) = chunk else {
                return Ok(());
            };
            let stream = match &mut send {
                Some(s) => s,
                None => {
                    let conn = node
                        .links
                        .get(&to)
                        .and_then(|l| l.connection())
                        .ok_or_else(|| format!("no connection to {to}"))?;
                    let mut s = conn
                        .open_uni()
                        .await
                        .map_err(|e| format!("opening the pre-copy stream: {e}"))?;
                    let begin = Frame::PreBegin {
                        mig: mig.n,
                        id,
                        kind: kind.clone(),
                    };
                    written += put_frame(&mut s, &mut buf, &begin, frame_max, "pre-copy").await?;
                    send.insert(s)
                }
            };
            let frame = Frame::PreState { bytes: &chunk };
            written += put_frame(stream, &mut buf, &frame, frame_max, "pre-copy").await?;
        }
    }
    .await;
    node.stats.bytes_out.add(written);
    match (result, send) {
        (Ok(()), Some(s)) => {
            if let Err(Ok((mut s, _))) = done.send(Ok((s, written))) {
                // Nobody takes it: the attempt ended meanwhile.
                let _ = s.reset(quinn::VarInt::from_u32(0));
            }
        }
        (Ok(()), None) => {
            let _ = done.send(Err("nothing was copied ahead".to_string()));
        }
        (Err(e), s) => {
            if let Some(mut s) = s {
                let _ = s.reset(quinn::VarInt::from_u32(0));
            }
            tracing::debug!(service = %id, n = mig.n, error = %e, "pre-copy stream ended");
            let _ = done.send(Err(e.clone()));
            // Called off, the driver ended the copy itself (an abort, or a state too small to
            // copy ahead that moves whole in the freeze): nothing failed. A group member
            // waiting for the others must not abort them over it.
            if e != CALLED_OFF {
                node.driver.precopy_failed(&node, id, &mig, e);
            }
        }
    }
}

/// A runner's copying ahead of its state's tracked part, between messages. Boxed in the
/// runner: an idle service does not pay for it.
pub(crate) struct Copying {
    mig: MigrationId,
    tx: mpsc::Sender<Vec<u8>>,
    acked: Arc<Acked>,
    /// What the runner waits for when it has nothing to send now.
    waits_ack: bool,
    /// Bytes handed to the writer.
    sent: u64,
    /// The bytes of the first pass over every entry, once it is over.
    pass_bytes: Option<u64>,
    /// `Core::precopied` was called: the freeze comes.
    asked_freeze: bool,
    min_bytes: usize,
}

impl Copying {
    /// Starts copying `part` ahead for attempt `pre.mig`.
    pub fn start(part: &mut dyn Tracked, pre: PreTx, min_bytes: usize) -> Box<Copying> {
        part.track();
        Box::new(Copying {
            mig: pre.mig,
            tx: pre.tx,
            acked: pre.acked,
            waits_ack: false,
            sent: 0,
            pass_bytes: None,
            asked_freeze: false,
            min_bytes,
        })
    }

    /// Whether the runner, waiting for a message, should also wait for room in the writer's
    /// queue to send the next chunk.
    pub fn wants_room(&self) -> bool {
        !self.asked_freeze && !self.tx.is_closed()
    }

    /// Until the next chunk may go: the writer's queue has room (or is closed), or, when the
    /// service waits for the target to catch up, the target said it applied more.
    pub async fn room(&self) {
        if self.waits_ack {
            self.acked.changed.notified().await;
        } else {
            let _ = self.tx.reserve().await;
        }
    }

    /// Whether this copying belongs to the attempt the driver runs now.
    pub fn current(&self, node: &NodeShared, id: ServiceId) -> bool {
        node.driver.precopying(id, &self.mig)
    }

    /// Sends one chunk of changes if the writer has room; asks for the freeze once what is
    /// left is small. False when the copying is over (ended by the driver, failed, or the
    /// part too small to copy ahead): the part is no longer tracked.
    pub fn step(&mut self, part: &mut dyn Tracked, node: &Arc<NodeShared>, id: ServiceId) -> bool {
        let in_flight = self.sent.saturating_sub(self.acked.get());
        if in_flight > PRECOPY_IN_FLIGHT_MAX {
            self.waits_ack = true;
            return true;
        }
        self.waits_ack = false;
        let permit = match self.tx.try_reserve() {
            Ok(p) => p,
            Err(mpsc::error::TrySendError::Full(())) => return true,
            Err(mpsc::error::TrySendError::Closed(())) => {
                part.untrack();
                return false;
            }
        };
        let mut buf = Vec::new();
        // The first chunk is at least `min_bytes` (within a frame), to tell a part too small
        // to copy ahead by its own encoding.
        let chunk = if self.sent == 0 {
            PRECOPY_CHUNK_BYTES
                .max(self.min_bytes)
                .min(node.limits.frame_bytes_max / 2)
        } else {
            PRECOPY_CHUNK_BYTES
        };
        match part.take_changes(chunk, &mut buf) {
            Err(e) => {
                part.untrack();
                node.driver
                    .precopy_failed(node, id, &self.mig, format!("encoding entries: {e}"));
                return false;
            }
            Ok(_)
                if self.sent == 0
                    && part.unsent_bytes() == Some(0)
                    && buf.len() < self.min_bytes =>
            {
                // Small (or empty): it moves whole in the freeze.
                part.untrack();
                node.driver.precopied(node, id, &self.mig, false);
                return false;
            }
            Ok(0) => drop(permit),
            Ok(_) => {
                self.sent += buf.len() as u64;
                permit.send(buf);
            }
        }
        if !self.asked_freeze {
            let left = part.unsent_bytes();
            if left.is_some() && self.pass_bytes.is_none() {
                self.pass_bytes = Some(self.sent);
            }
            let outrun = self
                .pass_bytes
                .is_some_and(|p| self.sent > p.saturating_mul(1 + PRECOPY_RESEND_FACTOR));
            // The target has caught up (else the freeze would wait for the backlog).
            let caught_up = self.sent.saturating_sub(self.acked.get()) <= PRECOPY_LAST_BYTES as u64;
            let small = left.is_some_and(|b| b <= PRECOPY_LAST_BYTES);
            if (small || outrun) && caught_up {
                self.asked_freeze = true;
                node.driver.precopied(node, id, &self.mig, true);
            } else if small || outrun {
                self.waits_ack = true;
            }
        }
        true
    }

    /// Ends the copying for good (the state it followed is gone): the attempt aborts.
    pub fn abandon(&self, node: &Arc<NodeShared>, id: ServiceId, why: &str) {
        node.driver
            .precopy_failed(node, id, &self.mig, why.to_string());
    }

    /// At the freeze: sends every change left, then lets the writer hand the stream to the
    /// snapshot's. The part is no longer tracked.
    pub async fn finish(self: Box<Self>, part: &mut dyn Tracked) -> Result<(), String> {
        let result = async {
            loop {
                let mut buf = Vec::new();
                let n = part
                    .take_changes(PRECOPY_CHUNK_BYTES, &mut buf)
                    .map_err(|e| format!("encoding entries: {e}"))?;
                if n == 0 {
                    return Ok(());
                }
                self.tx
                    .send(buf)
                    .await
                    .map_err(|_| "the pre-copy stream ended".to_string())?;
            }
        }
        .await;
        part.untrack();
        result
    }
}

/// The target's side of a pre-copy stream: the part being filled, and its room in the node's
/// snapshot budgets.
pub(crate) struct PreIn {
    pub n: u64,
    pub id: ServiceId,
    /// None once refused.
    pub part: Option<Box<dyn Tracked>>,
    pub room: Room,
    /// Bytes of entries applied (a key sent again counts again).
    applied: usize,
    /// When the snapshot must have begun: the source freezes within `precopy_deadline_ms`,
    /// and its snapshot comes within `migration_deadline_ms` of that.
    due: Instant,
}

impl PreIn {
    /// When the snapshot must have begun, while it has not and nothing was refused.
    pub fn due_by(&self) -> Option<Instant> {
        self.part.as_ref().map(|_| self.due)
    }

    /// Refuses the attempt: its part and room go; what still comes on the stream is dropped.
    pub fn give_up(&mut self, node: &Arc<NodeShared>, from: &NodeName, reason: String) {
        self.part = None;
        self.room.release();
        node.driver.refuse_snapshot(node, from, self.n, reason);
    }
}

fn malformed(detail: &str) -> wire::WireError {
    wire::WireError::Malformed {
        detail: detail.to_string(),
    }
}

/// Checks a pre-copy's header against this node's rules (as a snapshot header would be,
/// `migrate::admit_snapshot`, which checks the rest at `SnapBegin`); the empty part to fill.
fn admit_precopy(
    node: &NodeShared,
    from: &NodeName,
    kind: &KindKey,
) -> Result<Box<dyn Tracked>, String> {
    let limits = &node.limits;
    if tern_proto::claims::allowed("migration", &limits.migration_peers, from).is_err() {
        return Err(format!("policy: node {from} may not push migrations here"));
    }
    use tern_proto::claims::{kind_allowed, KindRight};
    kind_allowed(&limits.kind_rules, &kind.name, KindRight::Push, from)
        .map_err(|refusal| refusal.detail)?;
    if node.stopping.load(Ordering::Relaxed) {
        return Err("stopping: the node is shutting down".into());
    }
    match node.precopy_part(kind) {
        Some(Some(empty)) => Ok(empty()),
        Some(None) => Err(format!(
            "malformed: kind {kind} does not copy ahead here (it does not, or this node runs \
             another version of it)"
        )),
        None => Err(node.kind_refusal(kind)),
    }
}

/// A `PreBegin` or `PreState` frame of a stream from `from`.
pub(crate) fn pre_frame(
    node: &Arc<NodeShared>,
    from: &NodeName,
    pre: &mut Option<PreIn>,
    room: Room,
    frame: Frame<'_>,
) -> Result<(), wire::WireError> {
    match frame {
        Frame::PreBegin { mig, id, kind } => {
            if pre.is_some() {
                return Err(malformed("a second pre-copy header on one stream"));
            }
            let wait = Duration::from_millis(
                node.limits
                    .precopy_deadline_ms
                    .saturating_add(node.limits.migration_deadline_ms),
            );
            let mut p = PreIn {
                n: mig,
                id,
                part: None,
                room,
                applied: 0,
                due: Instant::now() + wait,
            };
            match admit_precopy(node, from, &kind) {
                Ok(part) => p.part = Some(part),
                Err(reason) => node.driver.refuse_snapshot(node, from, mig, reason),
            }
            *pre = Some(p);
        }
        Frame::PreState { bytes } => {
            let Some(p) = pre.as_mut() else {
                return Err(malformed("pre-copied entries before their header"));
            };
            if p.part.is_none() {
                // Refused: the source learns it and stops.
                return Ok(());
            }
            if Instant::now() >= p.due {
                p.give_up(
                    node,
                    from,
                    "too slow: the pre-copy outlasted its deadline".into(),
                );
                return Ok(());
            }
            let max = node.limits.snapshot_bytes_max;
            if p.applied.saturating_add(bytes.len()) > max {
                let reason =
                    format!("too large: more than snapshot_bytes_max {max} bytes copied ahead");
                p.give_up(node, from, reason);
                return Ok(());
            }
            let bounds = (
                node.limits.snapshot_bytes_in_max,
                node.limits.snapshot_bytes_in_per_peer_max,
            );
            if p.room.grow(bytes.len(), bounds).is_err() {
                let reason = format!(
                    "too large: snapshots arriving here hold snapshot_bytes_in_max {} or {from}'s share {}",
                    bounds.0, bounds.1
                );
                p.give_up(node, from, reason);
                return Ok(());
            }
            p.applied += bytes.len();
            let applied = p.part.as_mut().map(|part| part.apply(bytes));
            if let Some(Err(e)) = applied {
                p.give_up(node, from, format!("malformed: pre-copied entries: {e}"));
                return Ok(());
            }
            // The source freezes once this node has caught up.
            if let Some(link) = node.links.get(from) {
                let _ = link.push_ctrl(&Frame::PreApplied {
                    mig: p.n,
                    id: p.id,
                    bytes: p.applied as u64,
                });
            }
        }
        other => {
            return Err(wire::WireError::Unexpected {
                kind: other.kind(),
                stream: "pre-copy",
            })
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tracked::TrackedMap;

    fn mig() -> MigrationId {
        MigrationId {
            source: NodeName::new("a"),
            n: 1,
        }
    }

    #[test]
    fn the_freeze_sends_the_changes_made_since_the_last_chunk_then_lets_the_stream_go() {
        actix_rt::System::new().block_on(async {
            let (mut out, mut w) = PreOut::new(mig(), NodeName::new("b"));
            let pre = out.tx.take().expect("the runner's end");
            let mut src: TrackedMap<u32, Vec<u8>> =
                (0..64u32).map(|i| (i, vec![i as u8; 64])).collect();
            let c = Copying::start(&mut src, pre, 0);
            // Everything goes once, as the runner's turns would send it.
            let mut first = Vec::new();
            while src.take_changes(1 << 20, &mut first).expect("encodes") > 0 {}
            let mut dst: TrackedMap<u32, Vec<u8>> = TrackedMap::new();
            dst.apply(&first).expect("applies");
            // The last message's writes, then the freeze.
            src.insert(3, vec![0xee]);
            src.remove(&9);
            c.finish(&mut src).await.expect("sent");
            let mut n = 0;
            while let Some(chunk) = w.rx.recv().await {
                n += dst.apply(&chunk).expect("applies");
            }
            assert_eq!(n, 2, "both changes, and the queue closed after them");
            assert_eq!(dst, src);
            assert_eq!(src.unsent_bytes(), None, "no longer tracked");
        });
    }
}
