//! (base layer) State copied ahead while a service runs: [`TrackedMap`], the [`Tracked`]
//! trait the runtime drives it through, and a kind's [`Precopy`] declaration.
//!
//! A migration of a service whose kind declares [`Service::PRECOPY`](crate::Service::PRECOPY)
//! does not stop the service while its large state travels. The service keeps handling
//! messages while the runtime sends the entries of its [`TrackedMap`] to the target, in order
//! of key, a chunk at a time between two messages; an entry changed after it was sent is sent
//! again. Once what is left is small (or after
//! [`Limits::precopy_deadline_ms`](crate::Limits::precopy_deadline_ms)) the service freezes as
//! in any move, and the freeze carries only the entries changed since they were sent, the rest
//! of the state, the windows and the head of the queue. The target has decoded the entries as
//! they came, so restoring does not grow with the map either.
//!
//! Why a tracked collection and not a delta of the serialized state: finding what changed in
//! serialized bytes means serializing and hashing the whole state again at the freeze, which
//! is about as long as copying it (for 64 MiB, tens of milliseconds on a laptop core); a
//! collection that notes the keys its handlers change knows the delta for free.

use std::any::Any;
use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Cursor;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A kind's pre-copy declaration ([`Service::PRECOPY`](crate::Service::PRECOPY)): where in
/// the state its [`TrackedMap`] is, and how to make an empty one for the target to fill.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tern::{Ctx, Precopy, Service, TrackedMap};
///
/// #[derive(Default, Serialize, Deserialize)]
/// struct Tiles {
///     // Large: copied ahead while the service runs.
///     tiles: TrackedMap<u32, serde_bytes::ByteBuf>,
///     // Small: goes in the freeze with the rest.
///     writes: u64,
/// }
///
/// impl Service for Tiles {
///     type Msg = (u32, Vec<u8>);
///     const KIND: &'static str = "tiles";
///     const VERSION: u32 = 1;
///     const PRECOPY: Option<Precopy<Self>> = Some(Precopy {
///         part: |s| &mut s.tiles,
///         empty: || Box::new(TrackedMap::<u32, serde_bytes::ByteBuf>::new()),
///         min_bytes: tern::PRECOPY_MIN_BYTES,
///     });
///     async fn handle(&mut self, (at, bytes): (u32, Vec<u8>), _ctx: &mut Ctx<Self>) {
///         self.tiles.insert(at, serde_bytes::ByteBuf::from(bytes));
///         self.writes += 1;
///     }
/// }
/// ```
pub struct Precopy<S> {
    /// The part of the state copied ahead.
    pub part: fn(&mut S) -> &mut dyn Tracked,
    /// An empty part of the same type: the target fills it as the entries arrive.
    pub empty: fn() -> Box<dyn Tracked>,
    /// A part smaller than this, encoded, moves whole in the freeze instead (copying ahead
    /// costs a turn of the service's task per chunk and a second pass over what changed).
    /// Read up to half of [`Limits::frame_bytes_max`](crate::Limits::frame_bytes_max): a larger
    /// value acts as that.
    pub min_bytes: usize,
}

/// The default [`Precopy::min_bytes`]: below it, the whole state moves in the freeze.
/// Measured with `tern-bench --only precopy` (docs/benchmarks.md, "Pre-copy"): at 4 KiB and
/// 64 KiB copying ahead froze the service as long as a whole copy did (1.15x, 1.09x) and
/// took longer in all; at 256 KiB it froze it a fifth as long.
pub const PRECOPY_MIN_BYTES: usize = 256 << 10;

/// A part of a service's state the runtime can copy ahead while the service runs. Implemented
/// by [`TrackedMap`]; the runtime calls these methods, a service only names the type.
pub trait Tracked: Send + 'static {
    /// Starts noting changes: every entry is to be sent, in order of key.
    fn track(&mut self);
    /// Stops noting changes and forgets what was still to be sent.
    fn untrack(&mut self);
    /// Encodes entries still to be sent, about `bytes_max` bytes of them, onto `out`; they are
    /// sent from then on. Returns how many.
    fn take_changes(&mut self, bytes_max: usize, out: &mut Vec<u8>) -> Result<usize, String>;
    /// The bytes still to be sent, estimated from the entries sent so far; `None` while the
    /// first pass over every entry is not over.
    fn unsent_bytes(&self) -> Option<usize>;
    /// Applies entries [`Tracked::take_changes`] encoded (on the target, in order). Returns
    /// how many.
    fn apply(&mut self, bytes: &[u8]) -> Result<usize, String>;
    /// While set, serializing the part writes no entries (they travelled ahead).
    fn leave_out(&mut self, out: bool);
    /// Takes the entries of `other`, a part of the same type, in place of its own.
    fn adopt(&mut self, other: Box<dyn Tracked>) -> Result<(), String>;
    /// For [`Tracked::adopt`].
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

/// How far the first pass over the entries went.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pass<K> {
    /// Nothing sent yet.
    Start,
    /// Entries before this key are sent.
    From(K),
    /// Every entry was sent once.
    Done,
}

/// What a map being copied ahead still has to send.
#[derive(Debug)]
struct Tracking<K> {
    pass: Pass<K>,
    /// Keys sent and changed (or removed) since.
    changed: BTreeSet<K>,
    /// Entries and bytes encoded so far, for the estimate of what is left.
    sent_entries: u64,
    sent_bytes: u64,
}

impl<K: Ord> Tracking<K> {
    /// Whether the entry at `k` has gone already (so a change to it must go again).
    fn sent(&self, k: &K) -> bool {
        match &self.pass {
            Pass::Start => false,
            Pass::From(next) => k < next,
            Pass::Done => true,
        }
    }
}

/// An ordered map whose changes the runtime can follow, so that a service holding it can move
/// while it runs ([`Precopy`]): the entries travel ahead of the freeze, and only those changed
/// since they were sent travel in it.
///
/// Reads cost what a `BTreeMap`'s do. While a migration copies it, a write (`insert`,
/// `remove`, `get_mut`, `clear`) to an entry already sent notes its key; otherwise writes cost
/// nothing more. `get_mut` notes the key even if the value is not changed: take it only to
/// write.
///
/// ```
/// let mut m = tern::TrackedMap::new();
/// m.insert(1u32, "one".to_string());
/// assert_eq!(m.get(&1).map(String::as_str), Some("one"));
/// if let Some(v) = m.get_mut(&1) {
///     v.push('!');
/// }
/// assert_eq!(m.remove(&1).as_deref(), Some("one!"));
/// assert!(m.is_empty());
/// ```
pub struct TrackedMap<K, V> {
    map: BTreeMap<K, V>,
    tracking: Option<Box<Tracking<K>>>,
    left_out: bool,
}

impl<K, V> Default for TrackedMap<K, V> {
    fn default() -> Self {
        TrackedMap {
            map: BTreeMap::new(),
            tracking: None,
            left_out: false,
        }
    }
}

impl<K: Clone, V: Clone> Clone for TrackedMap<K, V> {
    /// A copy of the entries; what a migration still had to send is not copied.
    fn clone(&self) -> Self {
        TrackedMap {
            map: self.map.clone(),
            tracking: None,
            left_out: false,
        }
    }
}

impl<K: fmt::Debug, V: fmt::Debug> fmt::Debug for TrackedMap<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.map.iter()).finish()
    }
}

impl<K: Ord + PartialEq, V: PartialEq> PartialEq for TrackedMap<K, V> {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl<K: Ord + Clone, V> TrackedMap<K, V> {
    /// An empty map.
    pub fn new() -> Self {
        TrackedMap {
            map: BTreeMap::new(),
            tracking: None,
            left_out: false,
        }
    }

    fn note(&mut self, k: &K) {
        if let Some(t) = &mut self.tracking {
            if t.sent(k) {
                t.changed.insert(k.clone());
            }
        }
    }

    /// Entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The value at `k`.
    pub fn get<Q: Ord + ?Sized>(&self, k: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.map.get(k)
    }

    /// Whether there is a value at `k`.
    pub fn contains_key<Q: Ord + ?Sized>(&self, k: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.map.contains_key(k)
    }

    /// The value at `k`, to change (noted as changed).
    pub fn get_mut<Q: Ord + ?Sized>(&mut self, k: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        if self.tracking.is_some() {
            if let Some(key) = self.map.get_key_value(k).map(|(key, _)| key.clone()) {
                self.note(&key);
            }
        }
        self.map.get_mut(k)
    }

    /// Puts `v` at `k`; returns the value it replaced.
    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.note(&k);
        self.map.insert(k, v)
    }

    /// Removes the value at `k`.
    pub fn remove<Q: Ord + ?Sized>(&mut self, k: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let (key, v) = self.map.remove_entry(k)?;
        self.note(&key);
        Some(v)
    }

    /// Removes every entry.
    pub fn clear(&mut self) {
        if let Some(t) = &mut self.tracking {
            let sent: Vec<K> = self.map.keys().filter(|k| t.sent(k)).cloned().collect();
            t.changed.extend(sent);
        }
        self.map.clear();
    }

    /// The entries, in order of key.
    pub fn iter(&self) -> std::collections::btree_map::Iter<'_, K, V> {
        self.map.iter()
    }

    /// The keys, in order.
    pub fn keys(&self) -> std::collections::btree_map::Keys<'_, K, V> {
        self.map.keys()
    }

    /// The values, in order of key.
    pub fn values(&self) -> std::collections::btree_map::Values<'_, K, V> {
        self.map.values()
    }

    /// The entries with keys in `range`, in order.
    pub fn range<R: std::ops::RangeBounds<K>>(
        &self,
        range: R,
    ) -> std::collections::btree_map::Range<'_, K, V> {
        self.map.range(range)
    }
}

impl<K: Ord + Clone, V> FromIterator<(K, V)> for TrackedMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        TrackedMap {
            map: iter.into_iter().collect(),
            tracking: None,
            left_out: false,
        }
    }
}

impl<K: Serialize, V: Serialize> Serialize for TrackedMap<K, V> {
    fn serialize<Ser: Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
        if self.left_out {
            s.collect_map(std::iter::empty::<(&K, &V)>())
        } else {
            s.collect_map(self.map.iter())
        }
    }
}

impl<'de, K: Ord + Deserialize<'de>, V: Deserialize<'de>> Deserialize<'de> for TrackedMap<K, V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(TrackedMap {
            map: BTreeMap::deserialize(d)?,
            tracking: None,
            left_out: false,
        })
    }
}

impl<K, V> Tracked for TrackedMap<K, V>
where
    K: Ord + Clone + Serialize + DeserializeOwned + Send + 'static,
    V: Serialize + DeserializeOwned + Send + 'static,
{
    fn track(&mut self) {
        self.tracking = Some(Box::new(Tracking {
            pass: Pass::Start,
            changed: BTreeSet::new(),
            sent_entries: 0,
            sent_bytes: 0,
        }));
    }

    fn untrack(&mut self) {
        self.tracking = None;
    }

    fn take_changes(&mut self, bytes_max: usize, out: &mut Vec<u8>) -> Result<usize, String> {
        let Some(t) = &mut self.tracking else {
            return Ok(0);
        };
        let start = out.len();
        let mut n = 0;
        let mut next = None;
        let pass = match &t.pass {
            Pass::Start => Some(self.map.range(..)),
            Pass::From(k) => Some(self.map.range(k.clone()..)),
            Pass::Done => None,
        };
        if let Some(entries) = pass {
            for (k, v) in entries {
                if out.len() - start >= bytes_max {
                    next = Some(k.clone());
                    break;
                }
                rmp_serde::encode::write(out, &(k, Some(v))).map_err(|e| e.to_string())?;
                n += 1;
            }
            t.pass = match next {
                Some(k) => Pass::From(k),
                None => Pass::Done,
            };
        }
        while out.len() - start < bytes_max {
            let Some(k) = t.changed.pop_first() else {
                break;
            };
            rmp_serde::encode::write(out, &(&k, self.map.get(&k))).map_err(|e| e.to_string())?;
            n += 1;
        }
        t.sent_entries += n as u64;
        t.sent_bytes += (out.len() - start) as u64;
        Ok(n)
    }

    fn unsent_bytes(&self) -> Option<usize> {
        let t = self.tracking.as_ref()?;
        if t.pass != Pass::Done {
            return None;
        }
        let per_entry = t.sent_bytes.checked_div(t.sent_entries).unwrap_or(0);
        Some((t.changed.len() as u64).saturating_mul(per_entry) as usize)
    }

    fn apply(&mut self, bytes: &[u8]) -> Result<usize, String> {
        let mut cur = Cursor::new(bytes);
        let mut n = 0;
        while (cur.position() as usize) < bytes.len() {
            let (k, v): (K, Option<V>) =
                rmp_serde::from_read(&mut cur).map_err(|e| format!("entry {n}: {e}"))?;
            match v {
                Some(v) => {
                    self.map.insert(k, v);
                }
                None => {
                    self.map.remove(&k);
                }
            }
            n += 1;
        }
        Ok(n)
    }

    fn leave_out(&mut self, out: bool) {
        self.left_out = out;
    }

    fn adopt(&mut self, other: Box<dyn Tracked>) -> Result<(), String> {
        let other = other
            .into_any()
            .downcast::<TrackedMap<K, V>>()
            .map_err(|_| "the pre-copied part is of another type".to_string())?;
        self.map = other.map;
        Ok(())
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type M = TrackedMap<u32, Vec<u8>>;

    /// Everything `from` has to send, applied to `to`, in chunks of about `chunk` bytes.
    fn ship(from: &mut M, to: &mut M, chunk: usize) -> usize {
        let mut n = 0;
        loop {
            let mut out = Vec::new();
            let k = from.take_changes(chunk, &mut out).expect("encodes");
            if k == 0 {
                return n;
            }
            assert_eq!(to.apply(&out).expect("applies"), k);
            n += k;
        }
    }

    #[test]
    fn changes_during_the_copy_reach_the_target_and_only_sent_entries_go_twice() {
        let mut src: M = (0..100u32).map(|i| (i, vec![i as u8; 100])).collect();
        let mut dst = M::new();
        src.track();
        assert_eq!(src.unsent_bytes(), None, "first pass not over");
        // Half the entries go.
        let mut out = Vec::new();
        let k = src.take_changes(50 * 104, &mut out).expect("encodes");
        assert!((40..=60).contains(&k), "about half: {k}");
        dst.apply(&out).expect("applies");
        // Writes on both sides of the cursor, a removal of a sent entry and of an unsent one,
        // a new entry behind the cursor.
        src.insert(1, vec![0xaa]);
        src.insert(99, vec![0xbb]);
        src.remove(&2);
        src.remove(&98);
        if let Some(v) = src.get_mut(&3) {
            v.push(7);
        }
        src.insert(1000, vec![1]);
        let second = ship(&mut src, &mut dst, 1 << 20);
        // What remained of the pass, plus 1, 2 and 3 again (99, 98 and 1000 were ahead).
        assert_eq!(k + second, 100 - 1 + 1 + 3);
        assert_eq!(src.unsent_bytes(), Some(0));
        assert_eq!(dst, src, "the target holds what the source does");
        // A change after the pass goes again; clear sends every removal.
        src.insert(5, vec![5]);
        assert!(src.unsent_bytes().is_some_and(|b| b > 0));
        assert_eq!(ship(&mut src, &mut dst, 1 << 20), 1);
        src.clear();
        assert_eq!(ship(&mut src, &mut dst, 1 << 20), 99);
        assert!(dst.is_empty());
    }

    #[test]
    fn a_map_left_out_serializes_empty_and_adopt_puts_the_shipped_entries_back() {
        let mut src: M = (0..10u32).map(|i| (i, vec![i as u8])).collect();
        let mut dst = M::new();
        src.track();
        ship(&mut src, &mut dst, 8);
        src.leave_out(true);
        let bytes = rmp_serde::to_vec(&src).expect("encodes");
        src.leave_out(false);
        let mut restored: M = rmp_serde::from_slice(&bytes).expect("decodes");
        assert!(restored.is_empty());
        restored.adopt(Box::new(dst)).expect("same type");
        assert_eq!(restored, src);
        // Another type is refused.
        let other: Box<dyn Tracked> = Box::new(TrackedMap::<u64, String>::new());
        assert!(restored.adopt(other).is_err());
        // Damaged entries are an error, not a panic.
        assert!(restored.apply(&[0x92, 0xc1]).is_err());
        assert!(restored.apply(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn untracked_writes_note_nothing_and_untrack_forgets() {
        let mut m: M = (0..4u32).map(|i| (i, vec![])).collect();
        let mut out = Vec::new();
        assert_eq!(m.take_changes(1 << 20, &mut out).expect("encodes"), 0);
        m.insert(1, vec![1]);
        m.track();
        ship(&mut m, &mut M::new(), 1 << 20);
        m.insert(1, vec![2]);
        m.untrack();
        assert_eq!(m.unsent_bytes(), None);
        assert_eq!(m.take_changes(1 << 20, &mut out).expect("encodes"), 0);
    }
}
