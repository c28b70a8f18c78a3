//! One service's inbox, as data: the admission rules of the data plane.
//!
//! An [`Inbox`] is the state behind a service's mailbox: the queue, one receive
//! [`Window`] per numbered sender, the parking of a restored copy until it may run, the freeze
//! and hand-over of a migration, and the handled marks that feed the senders' delivery ledgers.
//! It has no lock, no clock and no waker: the node wraps it in a mutex and wakes its runner and
//! its waiting senders from what the methods return; the simulation drives the same code.
//!
//! The rule that keeps channels alive: **every number is taken, skipped or handed on**. A
//! number this inbox refuses (a full mailbox, a full window, a message it cannot decode) is
//! consumed here, and when the windows are in a snapshot (frozen) it is also remembered, so the
//! copy restored from that snapshot learns it with the leftovers.

use std::collections::{BTreeMap, VecDeque};

use crate::error::DeliveryError;
use crate::ids::{NodeName, ServiceId};
use crate::seq::{Offer, Watermark, Window};

/// Early messages held per sender window.
pub const WINDOW_HELD_MAX: usize = 4096;
/// Arrivals parked at a restored copy before it starts.
pub const PARKED_MAX: usize = 65_536;
/// Replaced handled marks kept for telling; past this the oldest goes (its sender's node then
/// keeps those messages outstanding until a later mark or a node loss declares them).
pub const HANDLED_MOVED_MAX: usize = 1024;
/// Senders a service keeps a receive window for. A window is what lets a message arrive
/// exactly once and in order whatever way it comes, so it is dropped only when its sender has
/// stopped and every number it sent was taken or skipped ([`Inbox::close_sender`]); past this
/// bound a sender never seen before is refused ([`DeliveryError::TooManySenders`]), and so is
/// every later message it sends here. Its skips and gaps are ignored: it has no window to wait
/// in.
pub const SENDERS_MAX: usize = 65_536;
/// Stopped senders an inbox remembers after dropping their windows (see
/// [`Inbox::close_sender`]). Each costs a sender id and a number instead of a window; they count
/// against [`SENDERS_MAX`] with the windows, and when a new sender needs the room the oldest is
/// forgotten first.
pub const RETIRED_MAX: usize = 4096;
/// Numbers skipped while frozen, kept for the leftovers. A freeze lasts one snapshot; past
/// this bound the oldest goes, and the sender's own skip (sent when it hears of the refusal)
/// closes that number at the target.
pub const FROZEN_SKIPS_MAX: usize = 65_536;

/// What the inbox needs to know of a queued item.
pub trait Numbered {
    /// The numbered sender (`None`: an unnumbered message, such as a reply-less system one).
    fn sender(&self) -> Option<ServiceId>;
    /// Its number in that sender's channel.
    fn seq(&self) -> u64;
    /// The node it came from (`None`: this node).
    fn origin(&self) -> Option<&NodeName>;
    /// True for a request that waits for an answer: a copy of one the windows drop is kept
    /// aside ([`Inbox::take_repeats`]) so that its asker can still be answered.
    fn is_ask(&self) -> bool {
        false
    }
}

/// Copies of asks the windows dropped, kept for the runner to answer; past this many waiting,
/// a copy is dropped as any other (its asker's wait runs out).
pub const REPEATS_MAX: usize = 64;

/// How a message comes to an inbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// A sender that does not wait: a full mailbox refuses and consumes the number.
    Tell,
    /// A sender that waits for room: a full mailbox refuses, the number stays open.
    Wait,
    /// Accepted earlier (parked at a restored copy, a commit's leftovers): no capacity check.
    Accepted,
    /// Handed on by another node (a tombstone): its sender may have been told it was taken,
    /// so it may go past the capacity, up to twice it.
    Forwarded,
}

/// A declared gap could not be applied now (the inbox is frozen, moving or a restored copy
/// not yet started); the node tries again.
#[derive(Debug, PartialEq, Eq)]
pub struct NotNow;

/// A skip that this inbox cannot apply: it has moved or closed (the caller hands it on).
#[derive(Debug, PartialEq, Eq)]
pub struct NotHere;

/// What a window export of one sender holds: next number, early messages, skipped numbers.
#[derive(Debug)]
pub struct WindowExport<T> {
    /// The sender.
    pub from: ServiceId,
    /// The next number expected.
    pub next: u64,
    /// Early messages, in number order.
    pub early: Vec<T>,
    /// Numbers ahead of `next` already skipped.
    pub skipped: Vec<u64>,
    /// The last number taken from this sender (handed to the service): below `next` by the
    /// messages queued from it.
    pub taken: u64,
}

/// What a commit hands on from the source: the arrivals since the snapshot, in order, then
/// early messages and the numbers skipped since the snapshot or ahead in its windows.
#[derive(Debug)]
pub struct Leftovers<T> {
    /// Arrivals since the snapshot, in order.
    pub queue: Vec<T>,
    /// Early messages still held.
    pub early: Vec<T>,
    /// `(sender, seq)` the target must not wait for.
    pub skipped: Vec<(ServiceId, u64)>,
    /// `(sender, last)` of stopped senders: pending closes and retired senders, whose windows
    /// the snapshot carried. The target applies them again ([`Inbox::close_sender`]).
    pub closing: Vec<(ServiceId, u64)>,
}

/// What a discarded copy held.
#[derive(Debug)]
pub struct Discarded<T> {
    /// Its carried queue (the source still has it after an abort).
    pub carried: Vec<T>,
    /// Arrivals parked at it, in order.
    pub parked: Vec<T>,
    /// `(sender, seq)` skips that waited for its gate.
    pub skips: Vec<(ServiceId, u64)>,
}

/// A handled mark as told: `(sender, last number taken, its node)`.
type Mark = (ServiceId, u64, Option<NodeName>);

/// One sender's progress at a receiver, for its node's delivery ledger.
#[derive(Debug)]
struct Handled {
    seq: u64,
    origin: Option<NodeName>,
}

/// Stopped senders: closes waiting for their windows to complete, and senders whose windows
/// went.
#[derive(Debug, Default)]
struct Closing {
    /// Per stopped sender, its last number here: its window goes once it has passed it.
    pending: BTreeMap<ServiceId, u64>,
    /// Senders whose windows went, with their last number, oldest first (bounded by
    /// [`RETIRED_MAX`]). A window for one of them is made again at `last + 1`, never at 1: a
    /// late copy or skip is then dropped as it would have been.
    retired: VecDeque<(ServiceId, u64)>,
}

/// Arrivals at a restored copy before it may take them.
#[derive(Debug)]
struct Parked<T> {
    msgs: VecDeque<T>,
    /// Numbers refused while parked (the parking was full), skipped when the gate opens.
    skips: Vec<(ServiceId, u64)>,
    carried_done: bool,
    started: bool,
}

/// A service's inbox. See the [module documentation](self).
pub struct Inbox<T> {
    id: ServiceId,
    capacity: usize,
    queue: VecDeque<T>,
    closed: bool,
    /// Set when the service has moved away: pushes are handed back with its new place.
    /// (Boxed, like `parked`: rare, and every idle service pays for the field.)
    moved: Option<Box<(NodeName, u64)>>,
    /// Per numbered sender, the receive window: releases in order, holds early messages,
    /// drops copies. Keyed by ids peers choose, hence a tree rather than a fast hash map.
    windows: BTreeMap<ServiceId, Window<T>>,
    /// Some while a restored copy waits for the rest of its carried queue and its start:
    /// arrivals wait here, in arrival order, so none overtakes a carried message.
    /// Boxed: only a restored copy has one, and every idle service pays for the field.
    parked: Option<Box<Parked<T>>>,
    /// Messages handed over in a snapshot not yet committed: they still count against the
    /// capacity, so a freeze does not let a second mailbox-full in behind them.
    handed_over: usize,
    /// Messages held early in the windows (reported, not counted against the capacity).
    early: usize,
    /// Between the snapshot and the decision: the windows are exported.
    frozen: bool,
    /// Numbers consumed while frozen: the exported windows do not know them, so they go with
    /// the leftovers.
    /// (Boxed when there are any: rare, and every idle service pays for the field: 8 bytes
    /// instead of a `VecDeque`'s 32.)
    #[allow(clippy::box_collection)]
    frozen_skips: Option<Box<VecDeque<(ServiceId, u64)>>>,
    /// Per numbered sender whose progress its node has not been told yet, the last number
    /// taken for handling and the node it came from (`None`: this node). A mark leaves once
    /// told, so this holds only the senders served since the last [`Inbox::take_handled`].
    handled: BTreeMap<ServiceId, Handled>,
    /// Marks not yet told that a newer mark from another node replaced (the sender moved):
    /// each node settles only what it sent. Bounded by [`HANDLED_MOVED_MAX`].
    /// (Boxed when there are any, like `frozen_skips`.)
    #[allow(clippy::box_collection)]
    handled_moved: Option<Box<VecDeque<Mark>>>,
    /// The last sender's mark, kept out of `handled` until another sender's message is taken.
    recent: Option<(ServiceId, Handled)>,
    /// Stopped senders (boxed: rare, and every idle service pays for the field).
    closing: Option<Box<Closing>>,
    /// Copies dropped by the windows.
    duplicates: u64,
    /// Set when a skip released messages (see [`Inbox::take_released`]).
    released: bool,
    /// Copies of asks the windows dropped, each with whether its first copy is still queued
    /// (see [`Inbox::take_repeats`]). Boxed: rare, and every idle service pays for the field.
    #[allow(clippy::box_collection)]
    repeats: Option<Box<Vec<(T, bool)>>>,
    /// Set when a copy from another node noted a mark for it (see
    /// [`Inbox::take_marked_again`]).
    marked_again: bool,
}

impl<T: Numbered> Inbox<T> {
    /// An empty inbox for service `id` taking at most `capacity` queued messages.
    pub fn new(id: ServiceId, capacity: usize) -> Self {
        assert!(capacity > 0, "mailbox capacity must be positive");
        Inbox {
            id,
            capacity,
            queue: VecDeque::new(),
            closed: false,
            moved: None,
            windows: BTreeMap::new(),
            parked: None,
            handed_over: 0,
            early: 0,
            frozen: false,
            frozen_skips: None,
            handled: BTreeMap::new(),
            handled_moved: None,
            recent: None,
            closing: None,
            duplicates: 0,
            released: false,
            repeats: None,
            marked_again: false,
        }
    }

    /// The inbox of a restored copy: windows from the snapshot, arrivals parked until
    /// [`carried_done`](Self::carried_done) and [`start`](Self::start) both happened.
    pub fn restored(id: ServiceId, capacity: usize, windows: Vec<WindowExport<T>>) -> Self {
        let mut inbox = Self::new(id, capacity);
        for w in windows {
            // A sender named twice (a peer may send anything) adds to its first window.
            let win = inbox.windows.entry(w.from).or_insert_with(|| {
                Window::from_watermark(Watermark(w.next.max(1)), WINDOW_HELD_MAX)
            });
            for item in w.early {
                let seq = item.seq();
                let _ = win.offer(seq, item);
            }
            for seq in w.skipped {
                let _ = win.skip(seq);
            }
        }
        inbox.early = inbox.windows.values().map(|w| w.held()).sum();
        inbox.parked = Some(Box::new(Parked {
            msgs: VecDeque::new(),
            skips: Vec::new(),
            carried_done: false,
            started: false,
        }));
        inbox
    }

    /// The service this inbox belongs to.
    pub fn id(&self) -> ServiceId {
        self.id
    }

    /// Its capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Messages waiting: queued, handed over in an undecided snapshot, and parked.
    #[inline]
    pub fn depth(&self) -> usize {
        self.queue.len() + self.handed_over + self.parked.as_ref().map_or(0, |p| p.msgs.len())
    }

    /// Messages queued for the runner.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// True when nothing is queued for the runner.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Messages held early in the windows.
    pub fn early(&self) -> usize {
        self.early
    }

    /// Copies the windows dropped so far.
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// True once closed (stopped, discarded).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// True once the service moved away.
    pub fn has_moved(&self) -> bool {
        self.moved.is_some()
    }

    /// True while arrivals are parked (a restored copy not yet started or not yet complete).
    pub fn is_gated(&self) -> bool {
        self.parked.is_some()
    }

    /// The next number expected from `from` (1 for a sender never seen).
    pub fn watermark(&self, from: ServiceId) -> u64 {
        self.windows.get(&from).map_or(1, |w| w.watermark().0)
    }

    /// True when a sender waiting for room should try again: there is room, or it never will
    /// come here (closed, moved). A copy not started whose parking is full ([`PARKED_MAX`])
    /// has none, whatever its capacity: a waiting sender told otherwise would try again at
    /// once, be refused again, and spin.
    pub fn has_room(&self) -> bool {
        self.closed
            || self.moved.is_some()
            || (self.depth() < self.capacity
                && self
                    .parked
                    .as_ref()
                    .is_none_or(|p| p.msgs.len() < PARKED_MAX))
    }

    /// True when a sender waiting on `from`'s window should try again.
    pub fn window_has_room(&self, from: ServiceId) -> bool {
        self.closed
            || self.moved.is_some()
            || self
                .windows
                .get(&from)
                .is_none_or(|w| w.held() < WINDOW_HELD_MAX)
    }

    fn full(&self) -> DeliveryError {
        DeliveryError::MailboxFull {
            id: self.id,
            capacity: self.capacity,
        }
    }

    #[inline]
    fn is_full(&self, mode: Admit) -> bool {
        let depth = self.depth();
        match mode {
            Admit::Accepted => false,
            Admit::Forwarded => depth >= 2 * self.capacity,
            Admit::Tell | Admit::Wait => depth >= self.capacity,
        }
    }

    /// Consumes number `seq` of `from` in its window, remembering it while frozen. True when
    /// that released messages to the queue.
    fn consume(&mut self, from: ServiceId, seq: u64) -> bool {
        let Some(w) = self.window(from) else {
            return false;
        };
        if seq < w.watermark().0 {
            if self.closing.is_some() {
                // A stopped sender's late skip may have made its window again.
                self.settle_closing();
            }
            return false;
        }
        if seq > w.watermark().0 && w.held() >= 2 * WINDOW_HELD_MAX {
            // Only a sender's refused numbers are skipped, one per message it sent: this many
            // ahead of a gap is not a sender's doing. Leave the window as it is.
            return false;
        }
        let released = w.skip(seq);
        if self.frozen {
            let skips = self.frozen_skips.get_or_insert_with(Default::default);
            if skips.len() >= FROZEN_SKIPS_MAX {
                skips.pop_front();
            }
            skips.push_back((from, seq));
        }
        let queued = self.release(released);
        if self.closing.is_some() {
            self.settle_closing();
        }
        queued
    }

    /// `from`'s window, made if it is new and there is room for one more sender. A retired
    /// sender's window is made again just past its last number, never at 1, and its close
    /// waits again: a late copy or skip is dropped as it would have been, and the window goes
    /// again. A new sender takes the room of the oldest retired one when it must.
    #[inline]
    fn window(&mut self, from: ServiceId) -> Option<&mut Window<T>> {
        let count = self.windows.len();
        match self.windows.entry(from) {
            std::collections::btree_map::Entry::Occupied(e) => Some(e.into_mut()),
            std::collections::btree_map::Entry::Vacant(e) => {
                let mut start = 1;
                if let Some(c) = self.closing.as_mut() {
                    if let Some(i) = c.retired.iter().position(|(f, _)| *f == from) {
                        if let Some((_, last)) = c.retired.remove(i) {
                            start = last.saturating_add(1);
                            c.pending.insert(from, last);
                        }
                    } else if count + c.retired.len() >= SENDERS_MAX {
                        c.retired.pop_front();
                    }
                }
                if count >= SENDERS_MAX {
                    return None;
                }
                Some(e.insert(Window::from_watermark(Watermark(start), WINDOW_HELD_MAX)))
            }
        }
    }

    /// The last number of `from` if it is a retired sender (its window went).
    fn retired_last(&self, from: ServiceId) -> Option<u64> {
        let c = self.closing.as_ref()?;
        c.retired.iter().find(|(f, _)| *f == from).map(|(_, l)| *l)
    }

    /// Senders this inbox keeps a window for (at most [`SENDERS_MAX`]).
    pub fn senders(&self) -> usize {
        self.windows.len()
    }

    /// Stopped senders whose windows went and are remembered (at most [`RETIRED_MAX`]).
    pub fn retired(&self) -> usize {
        self.closing.as_ref().map_or(0, |c| c.retired.len())
    }

    /// Sender `from` has stopped, and `last` is the last number it sent here: it will send
    /// nothing more. Its window goes once every number up to `last` was taken or skipped, and
    /// nothing waits in it early; until then the close waits here. `Ok(true)` when the window
    /// went now. Refused with [`NotNow`] while the windows are in a snapshot, parked or handed
    /// over (frozen, moving, a copy not yet started); the node applies it again later, where
    /// the service is then. A closed inbox takes it and forgets it.
    pub fn close_sender(&mut self, from: ServiceId, last: u64) -> Result<bool, NotNow> {
        if self.closed {
            return Ok(false);
        }
        if self.frozen || self.moved.is_some() || self.parked.is_some() {
            return Err(NotNow);
        }
        if self.retired_last(from).is_some() {
            return Ok(false);
        }
        let c = self.closing.get_or_insert_with(Default::default);
        if c.pending.len() >= RETIRED_MAX && !c.pending.contains_key(&from) {
            // This many stopped senders with messages still on their way: the window stays
            // (it counts against `SENDERS_MAX` like any other).
            return Ok(false);
        }
        let l = c.pending.entry(from).or_insert(last);
        *l = (*l).max(last);
        Ok(self.settle_closing() > 0)
    }

    /// Drops the windows of stopped senders that have passed their last number; returns how
    /// many went. Cheap when no sender has stopped.
    fn settle_closing(&mut self) -> usize {
        let Some(c) = self.closing.as_mut() else {
            return 0;
        };
        if self.frozen || self.moved.is_some() || self.parked.is_some() {
            return 0;
        }
        let windows = &mut self.windows;
        let mut done = Vec::new();
        for (from, last) in &c.pending {
            if let Some(w) = windows.get(from) {
                if w.watermark().0 > *last && w.held() == 0 {
                    // Retired where the window is, not at `last`: a sender that sends past its
                    // close (a lying close) finds its window again where it left it.
                    done.push((*from, w.watermark().0 - 1));
                }
            }
        }
        for (from, last) in &done {
            c.pending.remove(from);
            windows.remove(from);
            if c.retired.len() >= RETIRED_MAX {
                c.retired.pop_front();
            }
            c.retired.push_back((*from, *last));
        }
        if c.pending.is_empty() && c.retired.is_empty() {
            self.closing = None;
        }
        done.len()
    }

    /// Queues messages a window released after a gap closed or a number was skipped.
    fn release(&mut self, items: Vec<T>) -> bool {
        let queued = !items.is_empty();
        self.early = self.early.saturating_sub(items.len());
        self.queue.extend(items);
        self.released |= queued;
        queued
    }

    /// True when a refusal or a skip released held messages to the queue since the last call:
    /// the runner is to be woken although nothing was admitted.
    #[inline]
    pub fn take_released(&mut self) -> bool {
        std::mem::take(&mut self.released)
    }

    /// True when copies of asks wait to be answered ([`take_repeats`](Self::take_repeats)).
    pub fn has_repeats(&self) -> bool {
        self.repeats.is_some()
    }

    /// The copies of asks the windows dropped since the last call (a sender that sent one
    /// again: a replicated service re-executing after a takeover, or a handle sending what a
    /// lost copy had not confirmed), each with whether its first copy is still queued here.
    /// The runner answers each from the answers it kept, or fails it.
    pub fn take_repeats(&mut self) -> Vec<(T, bool)> {
        self.repeats.take().map_or_else(Vec::new, |r| *r)
    }

    /// The admission rules. `Ok(true)` when something was queued for the runner; on refusal
    /// the item comes back with the reason. A numbered message goes through its sender's
    /// window: a copy is dropped (and counts as taken), an early one is held. A refused number
    /// is consumed unless the sender waits ([`Admit::Wait`]).
    // The item comes back by value on refusal so that it is never lost; boxing it would
    // allocate on the path that is already under pressure.
    #[allow(clippy::result_large_err)]
    pub fn admit(&mut self, item: T, mode: Admit) -> Result<bool, (DeliveryError, T)> {
        if self.closed {
            return Err((DeliveryError::Stopped { id: self.id }, item));
        }
        if let Some(moved) = &self.moved {
            let (node, epoch) = &**moved;
            return Err((
                DeliveryError::Moved {
                    id: self.id,
                    node: node.clone(),
                    epoch: *epoch,
                },
                item,
            ));
        }
        let full = self.is_full(mode);
        if let Some(p) = self.parked.as_mut() {
            // Parked arrivals count against the capacity like queued ones.
            if full || p.msgs.len() >= PARKED_MAX {
                if let (Some(from), Admit::Tell | Admit::Forwarded) = (item.sender(), mode) {
                    if p.skips.len() < PARKED_MAX {
                        p.skips.push((from, item.seq()));
                    }
                }
                return Err((self.full(), item));
            }
            p.msgs.push_back(item);
            return Ok(false);
        }
        let Some(from) = item.sender() else {
            if full {
                return Err((self.full(), item));
            }
            self.queue.push_back(item);
            return Ok(true);
        };
        let seq = item.seq();
        let id = self.id;
        let Some(w) = self.window(from) else {
            return Err((
                DeliveryError::TooManySenders {
                    id,
                    senders_max: SENDERS_MAX,
                },
                item,
            ));
        };
        if seq < w.watermark().0 {
            self.duplicates += 1;
            self.came_again(from, seq, item.origin());
            if self.closing.is_some() {
                // A stopped sender's late copy may have made its window again.
                self.settle_closing();
            }
            if item.is_ask() {
                let repeats = self.repeats.get_or_insert_with(Default::default);
                if repeats.len() < REPEATS_MAX {
                    let queued = self
                        .queue
                        .iter()
                        .any(|q| q.sender() == Some(from) && q.seq() == seq);
                    repeats.push((item, queued));
                    return Ok(true);
                }
            }
            return Ok(false);
        }
        // Early messages are bounded by the window, not the capacity: they wait on a message
        // that comes another way, and must never hold up the stream that brings it.
        if full && seq == w.watermark().0 {
            // Only a waiting sender keeps its number open (it tries again). What the skip
            // releases is queued; see [`take_released`](Self::take_released).
            if mode != Admit::Wait {
                self.consume(from, seq);
            }
            return Err((self.full(), item));
        }
        if w.take_in_order(seq) {
            self.queue.push_back(item);
            return Ok(true);
        }
        // Messages taken once already are never refused: their count is bounded where they
        // were taken (a mailbox's capacity, its parking).
        match w.offer_bounded(seq, item, mode != Admit::Accepted) {
            Offer::Release(items) => {
                // All but the offered one were held early.
                self.early = self.early.saturating_sub(items.len() - 1);
                self.queue.extend(items);
                Ok(true)
            }
            Offer::Held => {
                self.early += 1;
                Ok(false)
            }
            Offer::Duplicate => {
                // A copy of one held early: nothing of it is taken yet to mark.
                self.duplicates += 1;
                if self.closing.is_some() {
                    self.settle_closing();
                }
                Ok(false)
            }
            Offer::Full(item) if mode == Admit::Wait => {
                // A waiting sender far ahead of a gap waits for it to close, number kept.
                Err((
                    DeliveryError::WindowFull {
                        id: self.id,
                        held_max: WINDOW_HELD_MAX,
                    },
                    item,
                ))
            }
            Offer::Full(item) => {
                self.consume(from, seq);
                Err((
                    DeliveryError::WindowFull {
                        id: self.id,
                        held_max: WINDOW_HELD_MAX,
                    },
                    item,
                ))
            }
        }
    }

    /// Consumes number `seq` of `from` without a message (it was refused or could not be
    /// decoded, here or on its way). `Ok(true)` when that released messages to the queue;
    /// [`NotHere`] when the service moved or stopped (the caller hands the skip on).
    pub fn skip(&mut self, from: ServiceId, seq: u64) -> Result<bool, NotHere> {
        if self.closed || self.moved.is_some() {
            return Err(NotHere);
        }
        if let Some(p) = self.parked.as_mut() {
            if p.skips.len() < PARKED_MAX {
                p.skips.push((from, seq));
            }
            return Ok(false);
        }
        Ok(self.consume(from, seq))
    }

    /// The numbers of `from` up to `through` that have not arrived never will: the window
    /// stops waiting for them and releases what waited behind them. `Ok(true)` when that
    /// queued something. Refused with [`NotNow`] while the windows are in a snapshot or parked
    /// (frozen, moving, a copy not yet started).
    pub fn skip_through(&mut self, from: ServiceId, through: u64) -> Result<bool, NotNow> {
        if self.frozen || self.moved.is_some() || self.parked.is_some() || self.closed {
            return Err(NotNow);
        }
        let released = match self.window(from) {
            Some(w) => w.skip_through(through),
            None => Vec::new(),
        };
        let queued = self.release(released);
        if self.closing.is_some() {
            self.settle_closing();
        }
        Ok(queued)
    }

    /// Freeze, source side: takes the queue and exports the windows (early messages encoded by
    /// `encode`, and left in place: they are handed on again at commit, as copies).
    pub fn take_for_snapshot<U>(
        &mut self,
        encode: impl Fn(&T) -> U,
    ) -> (VecDeque<T>, Vec<WindowExport<U>>) {
        let queue = std::mem::take(&mut self.queue);
        self.handed_over = queue.len();
        self.frozen = true;
        self.frozen_skips = None;
        // Per sender with a window, the first number still queued: everything below it was
        // taken. This walk is inside the freeze, so it is kept light: a run of one sender's
        // messages costs one look-up, not one each, and the walk ends once every sender with
        // a window is found.
        let mut first_queued: BTreeMap<ServiceId, u64> = BTreeMap::new();
        let mut missing = self.windows.len();
        let mut last_seen: Option<ServiceId> = None;
        for item in &queue {
            if missing == 0 {
                break;
            }
            let from = item.sender();
            if from.is_none() || from == last_seen {
                continue;
            }
            last_seen = from;
            if let Some(from) = from.filter(|f| self.windows.contains_key(f)) {
                if let std::collections::btree_map::Entry::Vacant(v) = first_queued.entry(from) {
                    v.insert(item.seq());
                    missing -= 1;
                }
            }
        }
        let mut windows: Vec<WindowExport<U>> = self
            .windows
            .iter()
            .map(|(from, w)| {
                let next = w.watermark().0;
                WindowExport {
                    from: *from,
                    next,
                    early: w.held_items().map(&encode).collect(),
                    skipped: w.skipped_ahead().collect(),
                    taken: first_queued
                        .get(from)
                        .map_or(next, |q| (*q).min(next))
                        .saturating_sub(1),
                }
            })
            .collect();
        // Retired senders travel as complete windows; their closes go with the leftovers, so
        // the target lets them go again.
        if let Some(c) = &self.closing {
            windows.extend(c.retired.iter().map(|(from, last)| WindowExport {
                from: *from,
                next: last.saturating_add(1),
                early: Vec::new(),
                skipped: Vec::new(),
                taken: *last,
            }));
        }
        (queue, windows)
    }

    /// Abort, source side: the queue handed over goes back in front of what arrived meanwhile.
    pub fn put_back(&mut self, mut queue: VecDeque<T>) {
        self.handed_over = 0;
        self.frozen = false;
        self.frozen_skips = None;
        queue.append(&mut self.queue);
        self.queue = queue;
    }

    /// Commit, source side: from now on pushes are handed back with the new place; returns
    /// what must follow the snapshot to the target.
    pub fn retire(&mut self, node: NodeName, epoch: u64) -> Leftovers<T> {
        self.moved = Some(Box::new((node, epoch)));
        self.handed_over = 0;
        self.early = 0;
        self.frozen = false;
        let queue: Vec<T> = self.queue.drain(..).collect();
        let mut early = Vec::new();
        let mut skipped: Vec<(ServiceId, u64)> = self
            .frozen_skips
            .take()
            .map_or_else(Vec::new, |q| q.into_iter().collect());
        for (from, w) in std::mem::take(&mut self.windows) {
            skipped.extend(w.skipped_ahead().map(|seq| (from, seq)));
            early.extend(w.into_held_items());
        }
        let closing = self.closing.take().map_or_else(Vec::new, |c| {
            c.pending.into_iter().chain(c.retired).collect()
        });
        Leftovers {
            queue,
            early,
            skipped,
            closing,
        }
    }

    /// Restored copy: a carried message, already released by the source's windows.
    pub fn push_carried(&mut self, item: T) {
        self.queue.push_back(item);
    }

    /// Restored copy: the carried queue is complete. Returns parked arrivals the windows
    /// refused when the gate opened, for their senders to be told, and whether the gate opened.
    #[allow(clippy::type_complexity)]
    pub fn carried_done(&mut self) -> (Vec<(DeliveryError, T)>, bool) {
        self.open_gate(|p| p.carried_done = true)
    }

    /// Restored copy: it may run. Returns as [`carried_done`](Self::carried_done).
    #[allow(clippy::type_complexity)]
    pub fn start(&mut self) -> (Vec<(DeliveryError, T)>, bool) {
        self.open_gate(|p| p.started = true)
    }

    #[allow(clippy::type_complexity)]
    fn open_gate(&mut self, mark: impl FnOnce(&mut Parked<T>)) -> (Vec<(DeliveryError, T)>, bool) {
        let mut refused = Vec::new();
        let Some(p) = self.parked.as_mut() else {
            return (refused, false);
        };
        mark(p);
        if !(p.carried_done && p.started) {
            return (refused, false);
        }
        let Some(p) = self.parked.take() else {
            return (refused, false);
        };
        for (from, seq) in p.skips {
            self.consume(from, seq);
        }
        for item in p.msgs {
            // Accepted already: through the windows, past the capacity check.
            if let Err(r) = self.admit(item, Admit::Accepted) {
                refused.push(r);
            }
        }
        (refused, true)
    }

    /// Orphaned or aborted copy: closes the inbox and returns what it held: its carried
    /// queue, its parked arrivals, and the skips that waited for its gate (they belong to
    /// wherever the service runs instead).
    pub fn discard_all(&mut self) -> Discarded<T> {
        self.closed = true;
        let carried = self.queue.drain(..).collect();
        let (parked, skips) = match self.parked.take() {
            Some(p) => (p.msgs.into(), p.skips),
            None => (Vec::new(), Vec::new()),
        };
        Discarded {
            carried,
            parked,
            skips,
        }
    }

    /// Closes the inbox and returns what was still queued, oldest first, then what the
    /// windows held early (per sender, in number order): the caller refuses them all to their
    /// senders.
    pub fn close(&mut self) -> Vec<T> {
        self.closed = true;
        let mut rest: Vec<T> = self.queue.drain(..).collect();
        for (_, w) in std::mem::take(&mut self.windows) {
            rest.extend(w.into_held_items());
        }
        self.early = 0;
        rest
    }

    /// Takes the oldest message for handling and notes its sender's handled mark. Returns the
    /// message and the depth left.
    #[inline]
    pub fn pop(&mut self) -> (Option<T>, usize) {
        let item = self.queue.pop_front();
        if let Some(it) = &item {
            if let Some(from) = it.sender() {
                let seq = it.seq();
                // The common case (the same sender as the last pop) touches only the cache.
                match &mut self.recent {
                    Some((f, h)) if *f == from && h.origin.as_ref() == it.origin() => {
                        h.seq = seq;
                    }
                    _ => {
                        let mark = Handled {
                            seq,
                            origin: it.origin().cloned(),
                        };
                        if let Some((f, h)) = self.recent.replace((from, mark)) {
                            self.store_mark(f, h);
                        }
                    }
                }
            }
        }
        (item, self.depth())
    }

    /// A copy of `from`'s message `seq` came again from `origin` and was dropped. That node
    /// may keep its copy until told the message was taken (the sender was taken over there
    /// and sent the copies its checkpoint carried), and nothing it sends later need ever be
    /// handled here to tell it. So a mark for that node is noted: through the last of `from`'s
    /// numbers taken for handling, never past one still queued (a queued message is not
    /// confirmed). Dropped copies are rare; the queue is looked through only for them.
    fn came_again(&mut self, from: ServiceId, seq: u64, origin: Option<&NodeName>) {
        let Some(origin) = origin else {
            return;
        };
        let Some(next) = self.windows.get(&from).map(|w| w.watermark().0) else {
            return;
        };
        let first_queued = self
            .queue
            .iter()
            .filter(|q| q.sender() == Some(from))
            .map(|q| q.seq())
            .min();
        let taken = first_queued.unwrap_or(next).saturating_sub(1).min(seq);
        if taken == 0 {
            return;
        }
        let moved = self.handled_moved.get_or_insert_with(Default::default);
        // A run of copies from one node needs one mark, its highest.
        if let Some(last) = moved.back_mut() {
            if last.0 == from && last.2.as_ref() == Some(origin) {
                last.1 = last.1.max(taken);
                self.marked_again = true;
                return;
            }
        }
        if moved.len() >= HANDLED_MOVED_MAX {
            moved.pop_front();
        }
        moved.push_back((from, taken, Some(origin.clone())));
        self.marked_again = true;
    }

    /// True (once) when a copy that came again noted a mark since the last call: the node
    /// should collect the marks ([`take_handled`](Self::take_handled)).
    pub fn take_marked_again(&mut self) -> bool {
        std::mem::take(&mut self.marked_again)
    }

    /// Files `from`'s newest mark; an unreported older one from another node is kept for
    /// telling that node.
    fn store_mark(&mut self, from: ServiceId, mark: Handled) {
        match self.handled.get_mut(&from) {
            Some(h) => {
                let old = std::mem::replace(h, mark);
                if old.origin != h.origin {
                    let moved = self.handled_moved.get_or_insert_with(Default::default);
                    if moved.len() >= HANDLED_MOVED_MAX {
                        moved.pop_front();
                    }
                    moved.push_back((from, old.seq, old.origin));
                }
            }
            None => {
                self.handled.insert(from, mark);
            }
        }
    }

    /// The senders whose progress changed since the last call: `(sender, last number taken,
    /// its node)`.
    pub fn take_handled(&mut self) -> Vec<(ServiceId, u64, Option<NodeName>)> {
        if let Some((f, h)) = self.recent.take() {
            self.store_mark(f, h);
        }
        if self.closing.is_some() {
            // A stopped sender's last messages were taken: its window may go now.
            self.settle_closing();
        }
        let mut out: Vec<_> = self
            .handled_moved
            .take()
            .map_or_else(Vec::new, |q| q.into_iter().collect());
        out.extend(
            std::mem::take(&mut self.handled)
                .into_iter()
                .map(|(from, h)| (from, h.seq, h.origin)),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    struct Msg {
        from: Option<ServiceId>,
        seq: u64,
        ask: bool,
    }

    impl Numbered for Msg {
        fn sender(&self) -> Option<ServiceId> {
            self.from
        }
        fn seq(&self) -> u64 {
            self.seq
        }
        fn origin(&self) -> Option<&NodeName> {
            None
        }
        fn is_ask(&self) -> bool {
            self.ask
        }
    }

    /// A copy of an ask the window drops is kept aside for the runner, marked by whether its
    /// first copy is still queued; a copy of a tell is dropped as before; past `REPEATS_MAX`
    /// waiting, copies of asks are dropped too.
    #[test]
    fn copies_of_asks_are_kept_aside_for_an_answer() {
        let ask = |seq| Msg {
            from: Some(FROM),
            seq,
            ask: true,
        };
        let mut inbox = Inbox::new(ME, 8);
        assert_eq!(inbox.admit(ask(1), Admit::Tell), Ok(true));
        assert_eq!(inbox.admit(m(2), Admit::Tell), Ok(true));
        assert_eq!(pop_seqs_n(&mut inbox, 1), vec![1]);
        assert!(!inbox.has_repeats());
        // 1 was taken, 2 is still queued.
        assert_eq!(inbox.admit(ask(1), Admit::Tell), Ok(true));
        assert_eq!(inbox.admit(ask(2), Admit::Tell), Ok(true));
        assert_eq!(inbox.admit(m(2), Admit::Tell), Ok(false));
        assert!(inbox.has_repeats());
        let r: Vec<(u64, bool)> = inbox
            .take_repeats()
            .into_iter()
            .map(|(x, q)| (x.seq, q))
            .collect();
        assert_eq!(r, vec![(1, false), (2, true)]);
        assert!(!inbox.has_repeats() && inbox.take_repeats().is_empty());
        assert_eq!(inbox.duplicates(), 3);
        for _ in 0..REPEATS_MAX {
            assert_eq!(inbox.admit(ask(1), Admit::Tell), Ok(true));
        }
        assert_eq!(inbox.admit(ask(1), Admit::Tell), Ok(false));
        assert_eq!(inbox.take_repeats().len(), REPEATS_MAX);
    }

    /// A message with the node it came from.
    #[derive(Debug, PartialEq, Eq)]
    struct Via(u64, Option<NodeName>);

    impl Numbered for Via {
        fn sender(&self) -> Option<ServiceId> {
            Some(FROM)
        }
        fn seq(&self) -> u64 {
            self.0
        }
        fn origin(&self) -> Option<&NodeName> {
            self.1.as_ref()
        }
        fn is_ask(&self) -> bool {
            false
        }
    }

    /// A copy that comes again from another node (its sender taken over there, sending what
    /// its checkpoint carried) notes a mark for that node, through the last number taken and
    /// never past one still queued; a run of copies needs one mark.
    #[test]
    fn a_copy_from_another_node_notes_a_mark_for_that_node_up_to_what_was_taken() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let mut inbox = Inbox::new(ME, 8);
        for seq in 1..=4 {
            assert_eq!(
                inbox.admit(Via(seq, Some(a.clone())), Admit::Tell),
                Ok(true)
            );
        }
        assert_eq!(inbox.pop().0.map(|v| v.0), Some(1));
        assert_eq!(inbox.pop().0.map(|v| v.0), Some(2));
        assert_eq!(inbox.take_handled(), vec![(FROM, 2, Some(a.clone()))]);
        assert!(!inbox.take_marked_again());
        // 1 to 4 again from b: 3 and 4 are queued, so b hears of 1 and 2 only, once.
        for seq in 1..=4 {
            assert_eq!(
                inbox.admit(Via(seq, Some(b.clone())), Admit::Tell),
                Ok(false)
            );
        }
        assert!(inbox.take_marked_again());
        assert!(!inbox.take_marked_again());
        assert_eq!(inbox.take_handled(), vec![(FROM, 2, Some(b.clone()))]);
        // A local copy (no node) notes nothing.
        assert_eq!(inbox.admit(Via(1, None), Admit::Tell), Ok(false));
        assert!(!inbox.take_marked_again());
        assert_eq!(inbox.pop().0.map(|v| v.0), Some(3));
        assert_eq!(inbox.admit(Via(3, Some(b.clone())), Admit::Tell), Ok(false));
        assert!(inbox.take_marked_again());
        assert_eq!(
            inbox.take_handled(),
            vec![(FROM, 3, Some(b)), (FROM, 3, Some(a))]
        );
    }

    const ME: ServiceId = ServiceId::from_parts(0, 1);
    const FROM: ServiceId = ServiceId::from_parts(7, 1);

    fn m(seq: u64) -> Msg {
        Msg {
            from: Some(FROM),
            seq,
            ask: false,
        }
    }

    /// A restored copy whose window for `FROM` expects `next`, with room for `capacity`.
    fn restored_at(next: u64, capacity: usize) -> Inbox<Msg> {
        Inbox::restored(
            ME,
            capacity,
            vec![WindowExport {
                from: FROM,
                next,
                early: vec![],
                skipped: vec![],
                taken: next - 1,
            }],
        )
    }

    fn pop_seqs(inbox: &mut Inbox<Msg>) -> Vec<u64> {
        std::iter::from_fn(|| inbox.pop().0.map(|m| m.seq)).collect()
    }

    #[test]
    fn a_snapshot_names_the_last_number_taken_from_each_sender() {
        let mut copy = restored_at(51, 100);
        let _ = copy.carried_done();
        let _ = copy.start();
        for seq in [51, 52, 54] {
            let _ = copy.admit(m(seq), Admit::Tell);
        }
        assert_eq!(pop_seqs_n(&mut copy, 1), vec![51]);
        // 52 queued and 54 early: neither was taken; 51 was.
        let (queue, windows) = copy.take_for_snapshot(|x| x.seq);
        assert_eq!(queue.len(), 1);
        assert_eq!(windows.len(), 1);
        assert_eq!((windows[0].next, windows[0].taken), (53, 51));
        assert_eq!(windows[0].early, vec![54]);
        // Nothing queued: everything below `next` was taken.
        let mut idle = restored_at(9, 100);
        let _ = idle.carried_done();
        let _ = idle.start();
        let (_, windows) = idle.take_for_snapshot(|x| x.seq);
        assert_eq!(windows[0].taken, 8);
    }

    #[test]
    fn a_snapshot_finds_each_senders_first_queued_number_however_deep_it_is() {
        const A: ServiceId = ServiceId::from_parts(7, 2);
        const B: ServiceId = ServiceId::from_parts(7, 3);
        const C: ServiceId = ServiceId::from_parts(7, 4);
        let from = |f: ServiceId, seq: u64| Msg {
            from: Some(f),
            seq,
            ask: false,
        };
        let mut inbox = Inbox::new(ME, 1_000);
        // C's only message is taken: its window stays, with nothing queued.
        assert_eq!(inbox.admit(from(C, 1), Admit::Tell), Ok(true));
        for seq in 1..=3 {
            assert_eq!(inbox.admit(from(A, seq), Admit::Tell), Ok(true));
        }
        assert_eq!(pop_seqs_n(&mut inbox, 3), vec![1, 1, 2]);
        // A's 3 heads a long run of A's; B's first queued message is deep behind it, and an
        // unnumbered one sits between.
        for seq in 4..=500 {
            assert_eq!(inbox.admit(from(A, seq), Admit::Tell), Ok(true));
        }
        let unnumbered = Msg {
            from: None,
            seq: 0,
            ask: false,
        };
        assert_eq!(inbox.admit(unnumbered, Admit::Tell), Ok(true));
        for seq in 1..=5 {
            assert_eq!(inbox.admit(from(B, seq), Admit::Tell), Ok(true));
        }
        let (queue, windows) = inbox.take_for_snapshot(|x| x.seq);
        assert_eq!(queue.len(), 498 + 1 + 5);
        let taken = |f: ServiceId| {
            windows
                .iter()
                .find(|w| w.from == f)
                .map(|w| (w.next, w.taken))
        };
        assert_eq!(taken(A), Some((501, 2)));
        assert_eq!(taken(B), Some((6, 0)));
        assert_eq!(taken(C), Some((2, 1)));
    }

    fn pop_seqs_n(inbox: &mut Inbox<Msg>, n: usize) -> Vec<u64> {
        (0..n)
            .filter_map(|_| inbox.pop().0.map(|m| m.seq))
            .collect()
    }

    #[test]
    fn a_copy_whose_parking_is_full_has_no_room_whatever_its_capacity() {
        let mut copy = restored_at(1, PARKED_MAX + 10);
        for seq in 1..=PARKED_MAX as u64 {
            assert_eq!(copy.admit(m(seq), Admit::Wait), Ok(false));
        }
        // A waiting sender told there is room would be refused at once, again and again.
        assert!(!copy.has_room());
        assert!(copy.admit(m(PARKED_MAX as u64 + 1), Admit::Wait).is_err());
        let _ = copy.carried_done();
        let _ = copy.start();
        // Started: the parked messages are queued, within the capacity.
        assert!(copy.has_room());
        assert_eq!(pop_seqs(&mut copy).len(), PARKED_MAX);
    }

    #[test]
    fn a_tell_refused_for_room_consumes_its_number_a_waiting_one_does_not() {
        let mut inbox = Inbox::new(ME, 1);
        assert_eq!(inbox.admit(m(1), Admit::Tell), Ok(true));
        assert!(matches!(
            inbox.admit(m(2), Admit::Wait),
            Err((DeliveryError::MailboxFull { .. }, _))
        ));
        assert_eq!(
            inbox.watermark(FROM),
            2,
            "a waiting sender keeps its number"
        );
        assert!(inbox.admit(m(2), Admit::Tell).is_err());
        assert_eq!(
            inbox.watermark(FROM),
            3,
            "a tell's refused number is consumed"
        );
        assert_eq!(pop_seqs(&mut inbox), vec![1]);
        assert_eq!(inbox.admit(m(3), Admit::Tell), Ok(true));
    }

    /// A tell refused at the watermark while frozen consumes its number at the source; the
    /// target restores the windows exported before, so the number must travel with the
    /// leftovers or the target waits for it for ever.
    #[test]
    fn a_number_refused_during_a_freeze_travels_with_the_leftovers() {
        let mut src = Inbox::new(ME, 2);
        src.admit(m(1), Admit::Tell).unwrap();
        src.admit(m(2), Admit::Tell).unwrap();
        let (queue, windows) = src.take_for_snapshot(|x| m(x.seq));
        assert_eq!((queue.len(), windows[0].next), (2, 3));
        // Still full (the handed-over queue counts): refused, its number consumed here.
        assert!(matches!(
            src.admit(m(3), Admit::Tell),
            Err((DeliveryError::MailboxFull { .. }, _))
        ));
        // A number refused on its way here, say.
        assert_eq!(src.skip(FROM, 4), Ok(false));
        let left = src.retire(NodeName::new("t"), 2);
        assert!(left.queue.is_empty());
        assert_eq!(left.skipped, vec![(FROM, 3), (FROM, 4)]);

        let mut dst = Inbox::restored(ME, 3, windows);
        for x in queue {
            dst.push_carried(x);
        }
        assert_eq!(dst.admit(m(5), Admit::Tell), Ok(false), "parked");
        assert!(!dst.carried_done().1);
        let (refused, opened) = dst.start();
        assert!(refused.is_empty() && opened);
        for (f, seq) in left.skipped {
            let _ = dst.skip(f, seq);
        }
        assert_eq!(
            pop_seqs(&mut dst),
            vec![1, 2, 5],
            "5 is released once 3 and 4 are known skipped"
        );
    }

    #[test]
    fn an_abort_forgets_the_skips_of_the_freeze() {
        let mut src = Inbox::new(ME, 1);
        src.admit(m(1), Admit::Tell).unwrap();
        let (queue, _) = src.take_for_snapshot(|x| x.seq);
        assert!(src.admit(m(2), Admit::Tell).is_err());
        src.put_back(queue);
        let left = src.retire(NodeName::new("t"), 2);
        assert_eq!(left.queue, vec![m(1)]);
        assert!(
            left.skipped.is_empty(),
            "after an abort the windows are the source's again: they hold the skip"
        );
    }

    #[test]
    fn a_skip_while_parked_waits_for_the_gate_and_a_moved_inbox_hands_it_on() {
        let mut dst = restored_at(3, 4);
        assert_eq!(dst.admit(m(4), Admit::Tell), Ok(false));
        assert_eq!(dst.skip(FROM, 3), Ok(false));
        dst.carried_done();
        dst.start();
        assert_eq!(pop_seqs(&mut dst), vec![4]);
        let _ = dst.take_for_snapshot(|x| x.seq);
        let _ = dst.retire(NodeName::new("u"), 3);
        assert_eq!(dst.skip(FROM, 5), Err(NotHere));
    }

    #[test]
    fn a_parked_refusal_of_a_forwarded_message_is_skipped_at_the_gate() {
        let mut dst = restored_at(1, 1);
        assert_eq!(dst.admit(m(1), Admit::Tell), Ok(false));
        assert!(
            dst.admit(m(2), Admit::Forwarded).is_ok(),
            "up to twice the capacity"
        );
        assert!(dst.admit(m(3), Admit::Forwarded).is_err());
        dst.carried_done();
        dst.start();
        assert_eq!(dst.admit(m(4), Admit::Accepted), Ok(true));
        assert_eq!(pop_seqs(&mut dst), vec![1, 2, 4]);
    }

    /// Found by the data-plane simulation: a skip that reached a prepared copy waited in its
    /// parking, and the abort that discarded the copy dropped it; the source, running again,
    /// waited for that number for ever.
    #[test]
    fn a_discarded_copy_gives_back_the_skips_it_parked() {
        let mut dst = restored_at(3, 4);
        assert_eq!(dst.admit(m(4), Admit::Tell), Ok(false));
        assert_eq!(dst.skip(FROM, 3), Ok(false));
        let gone = dst.discard_all();
        assert_eq!(gone.parked, vec![m(4)]);
        assert_eq!(gone.skips, vec![(FROM, 3)]);
        assert_eq!(dst.skip(FROM, 5), Err(NotHere));
    }

    #[test]
    fn skips_far_ahead_are_bounded() {
        let mut inbox: Inbox<Msg> = Inbox::new(ME, 4);
        for seq in 2..(2 + 3 * WINDOW_HELD_MAX as u64) {
            let _ = inbox.skip(FROM, seq);
        }
        assert_eq!(inbox.windows[&FROM].held(), 2 * WINDOW_HELD_MAX);
    }

    /// An inbox with a window for each of `SENDERS_MAX` senders `(9, i)`, each past its 1.
    fn full_of_senders() -> Inbox<Msg> {
        let mut inbox = Inbox::new(ME, 4);
        for i in 0..SENDERS_MAX as u64 {
            let msg = Msg {
                from: Some(ServiceId::from_parts(9, i)),
                seq: 1,
                ask: false,
            };
            assert_eq!(inbox.admit(msg, Admit::Accepted), Ok(true));
            assert!(inbox.pop().0.is_some());
        }
        inbox
    }

    #[test]
    fn past_the_senders_bound_a_new_sender_is_refused_and_known_ones_go_on() {
        let sender = |i: u64| ServiceId::from_parts(9, i);
        let mut inbox = full_of_senders();
        let late = sender(SENDERS_MAX as u64);
        let refused = inbox.admit(
            Msg {
                from: Some(late),
                seq: 1,
                ask: false,
            },
            Admit::Tell,
        );
        assert!(matches!(
            refused,
            Err((
                DeliveryError::TooManySenders {
                    senders_max: SENDERS_MAX,
                    ..
                },
                _
            ))
        ));
        // Its skip and its gap make no window either.
        assert_eq!(inbox.skip(late, 1), Ok(false));
        assert_eq!(inbox.skip_through(late, 5), Ok(false));
        assert_eq!(inbox.senders(), SENDERS_MAX);
        // A known sender's next message is taken.
        let known = Msg {
            from: Some(sender(3)),
            seq: 2,
            ask: false,
        };
        assert_eq!(inbox.admit(known, Admit::Tell), Ok(true));
    }

    /// Closing gives back the queue and what waited early, so that every one is refused to
    /// its sender: none is left neither handled nor reported.
    #[test]
    fn closing_gives_back_what_waited_early_too() {
        let mut inbox = Inbox::new(ME, 8);
        assert_eq!(inbox.admit(m(1), Admit::Tell), Ok(true));
        assert_eq!(inbox.admit(m(3), Admit::Tell), Ok(false));
        assert_eq!(inbox.admit(m(4), Admit::Tell), Ok(false));
        let rest: Vec<u64> = inbox.close().into_iter().map(|x| x.seq).collect();
        assert_eq!(rest, vec![1, 3, 4]);
        assert_eq!((inbox.early(), inbox.senders()), (0, 0));
        assert!(matches!(
            inbox.admit(m(2), Admit::Tell),
            Err((DeliveryError::Stopped { .. }, _))
        ));
    }

    /// A stopped sender's window goes once every number it sent was taken or skipped, and not
    /// before: its close may overtake its last messages.
    #[test]
    fn a_stopped_senders_window_goes_once_it_has_passed_its_last_number() {
        let mut inbox = Inbox::new(ME, 8);
        assert_eq!(inbox.admit(m(1), Admit::Tell), Ok(true));
        // Number 3 overtook 2, and the close overtook both.
        assert_eq!(inbox.admit(m(3), Admit::Tell), Ok(false));
        assert_eq!(inbox.close_sender(FROM, 4), Ok(false));
        assert_eq!(inbox.admit(m(2), Admit::Tell), Ok(true));
        assert_eq!(pop_seqs(&mut inbox), vec![1, 2, 3]);
        inbox.take_handled();
        assert_eq!(inbox.senders(), 1, "number 4 is still on its way");
        // Number 4 was refused on its way: its skip completes the window.
        assert_eq!(inbox.skip(FROM, 4), Ok(false));
        assert_eq!((inbox.senders(), inbox.retired()), (0, 1));
        // Late copies and skips are dropped as before, and the window goes again.
        assert_eq!(inbox.admit(m(2), Admit::Tell), Ok(false));
        assert_eq!(inbox.skip(FROM, 3), Ok(false));
        assert_eq!(inbox.duplicates(), 1);
        assert_eq!((inbox.senders(), inbox.retired()), (0, 1));
        assert!(inbox.is_empty());
        // Other senders go on.
        let other = Msg {
            from: Some(ServiceId::from_parts(9, 9)),
            seq: 1,
            ask: false,
        };
        assert_eq!(inbox.admit(other, Admit::Tell), Ok(true));
    }

    /// A close meeting a service mid-move waits; the retired senders travel with the snapshot
    /// as complete windows and their closes with the leftovers, so the target lets them go.
    #[test]
    fn closes_wait_out_a_freeze_and_retired_senders_follow_a_move() {
        let gone = ServiceId::from_parts(9, 1);
        let mut src = Inbox::new(ME, 8);
        for seq in 1..=2 {
            let msg = Msg {
                from: Some(gone),
                seq,
                ask: false,
            };
            assert_eq!(src.admit(msg, Admit::Tell), Ok(true));
        }
        pop_seqs(&mut src);
        assert_eq!(src.close_sender(gone, 2), Ok(true));
        assert_eq!(src.admit(m(1), Admit::Tell), Ok(true));
        let (queue, windows) = src.take_for_snapshot(|x| Msg {
            from: x.from,
            seq: x.seq,
            ask: false,
        });
        assert_eq!(src.close_sender(FROM, 1), Err(NotNow), "frozen");
        let left = src.retire(NodeName::new("t"), 2);
        assert_eq!(left.closing, vec![(gone, 2)]);
        let retired = windows.iter().find(|w| w.from == gone).map(|w| w.next);
        assert_eq!(
            retired,
            Some(3),
            "a retired sender travels as a complete window"
        );

        let mut dst = Inbox::restored(ME, 8, windows);
        for x in queue {
            dst.push_carried(x);
        }
        assert_eq!(dst.close_sender(FROM, 1), Err(NotNow), "not started");
        dst.carried_done();
        dst.start();
        for (from, last) in left.closing {
            assert_eq!(dst.close_sender(from, last), Ok(true));
        }
        // Number 1 was taken (queued): the window has passed it.
        assert_eq!(dst.close_sender(FROM, 1), Ok(true));
        assert_eq!((dst.senders(), dst.retired()), (0, 2));
        assert_eq!(pop_seqs(&mut dst), vec![1]);
        // A late copy of a retired sender is dropped, not taken as a first message.
        let late = Msg {
            from: Some(gone),
            seq: 1,
            ask: false,
        };
        assert_eq!(dst.admit(late, Admit::Forwarded), Ok(false));
        assert!(dst.is_empty());
    }

    /// A close that comes too early, or lies, costs nothing but a window made again: numbers
    /// past `last` are still taken, once and in order.
    #[test]
    fn a_sender_that_sends_past_its_close_goes_on_in_order() {
        let mut inbox = Inbox::new(ME, 8);
        assert_eq!(inbox.admit(m(1), Admit::Tell), Ok(true));
        assert_eq!(inbox.close_sender(FROM, 1), Ok(true));
        for seq in 2..=4 {
            assert_eq!(inbox.admit(m(seq), Admit::Tell), Ok(true), "number {seq}");
        }
        assert_eq!(inbox.admit(m(3), Admit::Tell), Ok(false), "a copy");
        assert_eq!(pop_seqs(&mut inbox), vec![1, 2, 3, 4]);
        assert_eq!((inbox.senders(), inbox.retired()), (0, 1));
        assert_eq!(inbox.admit(m(5), Admit::Tell), Ok(true));
        assert_eq!(inbox.admit(m(2), Admit::Tell), Ok(false), "a late copy");
        assert_eq!(pop_seqs(&mut inbox), vec![5]);
    }

    /// Retired senders make room for new ones: windows and retired senders together stay
    /// within `SENDERS_MAX`.
    #[test]
    fn retired_senders_give_their_room_to_new_ones() {
        let sender = |i: u64| ServiceId::from_parts(9, i);
        let mut inbox = full_of_senders();
        for i in 0..10 {
            assert_eq!(inbox.close_sender(sender(i), 1), Ok(true));
        }
        assert_eq!((inbox.senders(), inbox.retired()), (SENDERS_MAX - 10, 10));
        for i in 0..11 {
            let msg = Msg {
                from: Some(ServiceId::from_parts(10, i)),
                seq: 1,
                ask: false,
            };
            let taken = inbox.admit(msg, Admit::Tell);
            if i < 10 {
                assert_eq!(taken, Ok(true));
                assert!(inbox.pop().0.is_some());
            } else {
                assert!(matches!(
                    taken,
                    Err((DeliveryError::TooManySenders { .. }, _))
                ));
            }
        }
        assert_eq!((inbox.senders(), inbox.retired()), (SENDERS_MAX, 0));
    }

    #[test]
    fn handled_marks_leave_once_told() {
        let mut inbox = Inbox::new(ME, 8);
        for i in 0..5 {
            let msg = Msg {
                from: Some(ServiceId::from_parts(9, i)),
                seq: 1,
                ask: false,
            };
            assert_eq!(inbox.admit(msg, Admit::Tell), Ok(true));
            assert!(inbox.pop().0.is_some());
        }
        assert_eq!(inbox.take_handled().len(), 5);
        assert!(inbox.handled.is_empty() && inbox.recent.is_none());
        assert!(inbox.take_handled().is_empty(), "told once");
        assert_eq!(inbox.admit(m(1), Admit::Tell), Ok(true));
        assert!(inbox.pop().0.is_some());
        assert_eq!(inbox.take_handled(), vec![(FROM, 1, None)]);
    }

    #[test]
    fn a_restored_inbox_given_one_sender_twice_keeps_one_window_and_counts_right() {
        let export = |next: u64, early: Vec<u64>| WindowExport {
            from: FROM,
            next,
            early: early.into_iter().map(m).collect(),
            skipped: vec![],
            taken: next - 1,
        };
        let mut inbox = Inbox::restored(ME, 8, vec![export(1, vec![3]), export(5, vec![4])]);
        assert_eq!(inbox.senders(), 1);
        assert_eq!(inbox.early(), 2, "3 and 4 wait for 1 and 2");
        let (_, opened) = inbox.carried_done();
        assert!(!opened);
        inbox.start();
        assert_eq!(inbox.admit(m(1), Admit::Tell), Ok(true));
        assert_eq!(inbox.admit(m(2), Admit::Tell), Ok(true));
        assert_eq!(pop_seqs(&mut inbox), vec![1, 2, 3, 4]);
        assert_eq!(inbox.early(), 0);
    }
}
