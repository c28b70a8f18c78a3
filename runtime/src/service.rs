//! The service API: the [`Service`] trait, the [`Ctx`] a handler gets, and [`ReplyTo`].

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::error::{AskError, DeliveryError, Error};
use crate::handle::{SendNow, ServiceRef};
use crate::mailbox::{encode_envelope_with, lock, sleep_key, Envelope, Mailbox, Meta};
use crate::migrate::{CarriedQueue, Decision, Go, MigrateOptions, MsgWriter, OutSnap};
use crate::node::NodeShared;
use crate::precopy::Copying;
use crate::replicas::Gate;
use crate::reports::{MigrationReport, NotMoved};
use crate::tracked::Precopy;
use tern_proto::directory::Associations;
use tern_proto::ids::{IdMap, KindKey, NodeName, ServiceAddr, ServiceId};
use tern_proto::traffic::SIZE_SAMPLE_EVERY;
use tern_proto::wire::{SnapHeader, TimerWire, WindowWire};

/// A migratable service: a plain struct whose fields are its state, a message type, and a
/// handler that takes one message at a time.
///
/// Handlers may await; the runtime never starts the next message before the current handler's
/// future completes, so a service never handles two messages at once.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tern::{Ctx, ReplyTo, Service};
///
/// #[derive(Default, Serialize, Deserialize)]
/// struct Counter { total: u64 }
///
/// #[derive(Serialize, Deserialize)]
/// enum CounterMsg { Add(u64), Get(ReplyTo<u64>) }
///
/// impl Service for Counter {
///     type Msg = CounterMsg;
///     const KIND: &'static str = "counter";
///     const VERSION: u32 = 1;
///     async fn handle(&mut self, msg: CounterMsg, ctx: &mut Ctx<Self>) {
///         match msg {
///             CounterMsg::Add(n) => self.total += n,
///             CounterMsg::Get(reply) => { let _ = ctx.reply(reply, self.total); }
///         }
///     }
/// }
/// ```
pub trait Service: Serialize + DeserializeOwned + Send + Sized + 'static {
    /// The messages this service handles.
    type Msg: Serialize + DeserializeOwned + Send + 'static;
    /// The kind's registered name.
    const KIND: &'static str;
    /// The kind's version. A version reads the states and messages of older ones only as
    /// [`UPGRADES`](Self::UPGRADES) says, and a service moves to an older version only as
    /// [`DOWNGRADES`](Self::DOWNGRADES) says.
    const VERSION: u32;

    /// Capabilities a node must offer to host this kind (placement never puts it elsewhere).
    const REQUIRES: &'static [&'static str] = &[];
    /// Capabilities this kind is better off with (placement weighs them).
    const PREFERS: &'static [&'static str] = &[];
    /// Standby copies the runtime keeps of each service of this kind on other nodes (0: none;
    /// 1: one standby). A replicated service checkpoints its state to its standby, and its
    /// senders' messages are confirmed only once a checkpoint that covers them is
    /// acknowledged (docs/failures.md, "Replicated services"). Failover from the standby is
    /// not built yet.
    const REPLICAS: u8 = 0;

    /// Handles one message.
    fn handle(&mut self, msg: Self::Msg, ctx: &mut Ctx<Self>) -> impl Future<Output = ()>;

    /// Called once before the first message, on the node that runs the service.
    fn started(&mut self, _ctx: &mut Ctx<Self>) {}

    /// Called once after the last message, when the service stops.
    fn stopped(&mut self, _ctx: &mut Ctx<Self>) {}

    /// What happens when a handler (or `started`) panics. `None`, the default: the service
    /// stops, and everything queued for it fails with
    /// [`DeliveryError::ServicePanicked`](crate::DeliveryError::ServicePanicked). `Some`: it is
    /// restarted in place with a fresh state, as an OTP supervisor would, at most
    /// `max_restarts` times within `within_ms`; see [`Restart`].
    const RESTART: Option<Restart<Self>> = None;

    /// Copy the state's large part ahead when the service moves ([`Precopy`]): the service
    /// runs on while a [`TrackedMap`](crate::TrackedMap) in its state travels to the target,
    /// and the freeze carries only what changed since. `None`, the default: the whole state
    /// travels in the freeze.
    const PRECOPY: Option<Precopy<Self>> = None;

    /// How this version reads the states and messages of older versions of the kind, one
    /// [`Upgrade`] per older version it accepts. A node that registers this version takes
    /// services of those versions too: a move from a device running an older version of the
    /// app upgrades the state, the queued and carried messages and the pending timers on
    /// arrival, and messages from devices still running an older version are upgraded as
    /// they arrive. Empty, the default: only this version's services are taken.
    const UPGRADES: &'static [Upgrade<Self>] = &[];

    /// How this version writes the states and messages of older versions of the kind, one
    /// [`Downgrade`] per older version it can write. With a downgrade to version `v`, a
    /// service moves to a node that runs version `v` (a device rolled back, or not updated
    /// yet): this node writes the state, the queued and carried messages and the pending
    /// timers as version `v`'s, and from then on every node running this version writes what
    /// it sends the service as version `v`'s. Empty, the default: a service never moves to an
    /// older version. A replicated kind ([`REPLICAS`](Self::REPLICAS) above 0) ignores its
    /// downgrades: its standbys' checkpoints are in its own version.
    const DOWNGRADES: &'static [Downgrade<Self>] = &[];

    /// The kind key of this service type.
    fn kind_key() -> KindKey {
        KindKey::new(Self::KIND, Self::VERSION)
    }
}

/// How a version of a kind reads what an older version wrote ([`Service::UPGRADES`]): its
/// state, and its messages. Each function gets the older version's bytes; decode them as the
/// older types with [`read_older`] and convert. A chain of versions is a chain of
/// conversions: the upgrade from 1 to 3 reads a version-1 state and passes it through the
/// conversion to 2, then to 3.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tern::{read_older, Ctx, Service, Upgrade};
///
/// /// Version 1 kept the volume as a fraction.
/// #[derive(Serialize, Deserialize)]
/// struct SpeakerV1 { volume: f32 }
/// #[derive(Serialize, Deserialize)]
/// enum SpeakerMsgV1 { Volume(f32) }
///
/// /// Version 2 keeps it in percent, and can mute.
/// #[derive(Default, Serialize, Deserialize)]
/// struct Speaker { percent: u8, muted: bool }
/// #[derive(Serialize, Deserialize)]
/// enum SpeakerMsg { Volume(u8), Mute(bool) }
///
/// fn percent(fraction: f32) -> u8 { (fraction.clamp(0.0, 1.0) * 100.0).round() as u8 }
///
/// impl Service for Speaker {
///     type Msg = SpeakerMsg;
///     const KIND: &'static str = "speaker";
///     const VERSION: u32 = 2;
///     const UPGRADES: &'static [Upgrade<Self>] = &[Upgrade {
///         from: 1,
///         state: |bytes| {
///             let old: SpeakerV1 = read_older(bytes)?;
///             Ok(Speaker { percent: percent(old.volume), muted: false })
///         },
///         msg: |bytes| match read_older(bytes)? {
///             SpeakerMsgV1::Volume(v) => Ok(SpeakerMsg::Volume(percent(v))),
///         },
///     }];
///     async fn handle(&mut self, msg: SpeakerMsg, _ctx: &mut Ctx<Self>) {
///         match msg {
///             SpeakerMsg::Volume(p) => self.percent = p,
///             SpeakerMsg::Mute(m) => self.muted = m,
///         }
///     }
/// }
///
/// let v1 = rmp_serde::to_vec(&SpeakerV1 { volume: 0.25 }).unwrap();
/// let upgraded = (Speaker::UPGRADES[0].state)(&v1).unwrap();
/// assert_eq!((upgraded.percent, upgraded.muted), (25, false));
/// ```
pub struct Upgrade<S: Service> {
    /// The older version this reads.
    pub from: u32,
    /// Reads a state that version `from` wrote.
    pub state: fn(&[u8]) -> Result<S, String>,
    /// Reads a message that version `from` wrote (queued, carried, in a timer, or sent by a
    /// device that still runs it).
    pub msg: fn(&[u8]) -> Result<S::Msg, String>,
}

/// How a version of a kind writes what an older version reads ([`Service::DOWNGRADES`]): its
/// state, and its messages, as that version's bytes. Convert to the older types and encode
/// them with [`write_older`]. What the older version cannot hold is lost in the conversion,
/// as the kind decides; a conversion that fails (returns `Err`) stops the move before the
/// service leaves (the state) or refuses that message to its sender (a message).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tern::{read_older, write_older, Ctx, Downgrade, Service, Upgrade};
///
/// /// Version 1 kept the volume as a fraction.
/// #[derive(Serialize, Deserialize)]
/// struct SpeakerV1 { volume: f32 }
/// #[derive(Serialize, Deserialize)]
/// enum SpeakerMsgV1 { Volume(f32) }
///
/// /// Version 2 keeps it in percent, and can mute; version 1 plays a muted speaker at 0.
/// #[derive(Default, Serialize, Deserialize)]
/// struct Speaker { percent: u8, muted: bool }
/// #[derive(Serialize, Deserialize)]
/// enum SpeakerMsg { Volume(u8), Mute(bool) }
///
/// impl Service for Speaker {
///     type Msg = SpeakerMsg;
///     const KIND: &'static str = "speaker";
///     const VERSION: u32 = 2;
///     const UPGRADES: &'static [Upgrade<Self>] = &[Upgrade {
///         from: 1,
///         state: |bytes| {
///             let old: SpeakerV1 = read_older(bytes)?;
///             Ok(Speaker { percent: (old.volume * 100.0) as u8, muted: false })
///         },
///         msg: |bytes| match read_older(bytes)? {
///             SpeakerMsgV1::Volume(v) => Ok(SpeakerMsg::Volume((v * 100.0) as u8)),
///         },
///     }];
///     const DOWNGRADES: &'static [Downgrade<Self>] = &[Downgrade {
///         to: 1,
///         state: |s| {
///             let volume = if s.muted { 0.0 } else { f32::from(s.percent) / 100.0 };
///             write_older(&SpeakerV1 { volume })
///         },
///         msg: |m| match m {
///             SpeakerMsg::Volume(p) => write_older(&SpeakerMsgV1::Volume(f32::from(*p) / 100.0)),
///             SpeakerMsg::Mute(true) => write_older(&SpeakerMsgV1::Volume(0.0)),
///             SpeakerMsg::Mute(false) => Err("version 1 cannot unmute".into()),
///         },
///     }];
///     async fn handle(&mut self, msg: SpeakerMsg, _ctx: &mut Ctx<Self>) {
///         match msg {
///             SpeakerMsg::Volume(p) => self.percent = p,
///             SpeakerMsg::Mute(m) => self.muted = m,
///         }
///     }
/// }
///
/// let muted = Speaker { percent: 40, muted: true };
/// let v1: SpeakerV1 = read_older(&(Speaker::DOWNGRADES[0].state)(&muted).unwrap()).unwrap();
/// assert_eq!(v1.volume, 0.0);
/// assert!((Speaker::DOWNGRADES[0].msg)(&SpeakerMsg::Mute(false)).is_err());
/// ```
pub struct Downgrade<S: Service> {
    /// The older version this writes.
    pub to: u32,
    /// Writes the state as version `to`'s.
    pub state: fn(&S) -> Result<Vec<u8>, String>,
    /// Writes a message as version `to`'s (queued, carried, in a timer, or sent to a service
    /// on a node that runs version `to`).
    pub msg: fn(&S::Msg) -> Result<Vec<u8>, String>,
}

/// Encodes `value` (an older version's state or message) as that version reads it, for a
/// [`Downgrade`].
pub fn write_older<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    write_plain(value)
}

/// Writes a message (or a state) as it is: MessagePack, as every version reads its own.
pub(crate) fn write_plain<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    rmp_serde::to_vec(value).map_err(|e| e.to_string())
}

/// The downgrade of `S` to version `to`, when `S` is not replicated and declares one.
pub(crate) fn downgrade_to<S: Service>(to: u32) -> Option<&'static Downgrade<S>> {
    if S::REPLICAS > 0 || to >= S::VERSION {
        return None;
    }
    S::DOWNGRADES.iter().find(|d| d.to == to)
}

/// The older versions `S` writes (see [`downgrade_to`]).
pub(crate) fn writes_versions<S: Service>() -> Vec<u32> {
    if S::REPLICAS > 0 {
        return Vec::new();
    }
    let mut v: Vec<u32> = S::DOWNGRADES
        .iter()
        .map(|d| d.to)
        .filter(|to| *to < S::VERSION)
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Writes a message of `S`, read as version `written` wrote it, as version `to`'s: what a
/// tombstone does to a message it forwards to a copy on an older version. The bytes as they
/// are when `written` is not newer than `to`.
pub(crate) fn rewrite_msg<S: Service>(
    written: u32,
    bytes: &[u8],
    to: u32,
) -> Result<Vec<u8>, String> {
    if written <= to {
        return Ok(bytes.to_vec());
    }
    let d = downgrade_to::<S>(to).ok_or_else(|| {
        format!(
            "{}@{} declares no downgrade to version {to}",
            S::KIND,
            S::VERSION
        )
    })?;
    let msg = read_msg::<S>(written, bytes)?;
    (d.msg)(&msg).map_err(|e| format!("downgrading to version {to}: {e}"))
}

/// Decodes bytes an older version of a kind wrote as `T` (that version's state or message
/// type), for an [`Upgrade`]; the error says why they do not decode.
pub fn read_older<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
}

/// Why version `to` of kind `name` cannot read what version `from` wrote.
fn no_upgrade(name: &str, from: u32, to: u32) -> String {
    if from > to {
        format!("{name}@{from} is newer than {name}@{to}, which cannot read it")
    } else {
        format!("{name}@{to} declares no upgrade from version {from}")
    }
}

/// Reads a state of `S`'s kind written by version `from`: as it is for `S::VERSION`, else
/// through the kind's upgrade from `from`.
pub(crate) fn read_state<S: Service>(from: u32, bytes: &[u8]) -> Result<S, String> {
    if from == S::VERSION {
        return read_older(bytes);
    }
    match S::UPGRADES.iter().find(|u| u.from == from) {
        Some(u) => (u.state)(bytes).map_err(|e| format!("upgrading from version {from}: {e}")),
        None => Err(no_upgrade(S::KIND, from, S::VERSION)),
    }
}

/// Reads a message of `S`'s kind written by version `from` (see [`read_state`]).
pub(crate) fn read_msg<S: Service>(from: u32, bytes: &[u8]) -> Result<S::Msg, String> {
    if from == S::VERSION {
        return read_older(bytes);
    }
    match S::UPGRADES.iter().find(|u| u.from == from) {
        Some(u) => (u.msg)(bytes).map_err(|e| format!("upgrading from version {from}: {e}")),
        None => Err(no_upgrade(S::KIND, from, S::VERSION)),
    }
}

/// Reads a message of `S`'s kind in whichever version reads it: this version's, then each
/// older one `S` upgrades from, newest first.
pub(crate) fn read_msg_any<S: Service>(bytes: &[u8]) -> Result<S::Msg, String> {
    let first = match read_older(bytes) {
        Ok(m) => return Ok(m),
        Err(e) => e,
    };
    let mut from: Vec<u32> = S::UPGRADES.iter().map(|u| u.from).collect();
    from.sort_unstable_by(|a, b| b.cmp(a));
    from.into_iter()
        .find_map(|v| read_msg::<S>(v, bytes).ok())
        .ok_or(first)
}

/// A kind's restart policy after a panic ([`Service::RESTART`]).
///
/// On a panic the message in hand fails to its sender or asker with
/// [`DeliveryError::ServicePanicked`](crate::DeliveryError::ServicePanicked); the service keeps
/// its id, mailbox, queued messages and address book, loses its pending timers, and goes on
/// with the state `fresh()` returns (`started` runs again). The `max_restarts + 1`-th panic
/// within `within_ms` stops it for good, as without a policy. The count is kept by the node
/// running the service and starts again after a migration.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tern::{Ctx, Restart, Service};
///
/// #[derive(Default, Serialize, Deserialize)]
/// struct Parser { lines: u64 }
///
/// impl Service for Parser {
///     type Msg = String;
///     const KIND: &'static str = "parser";
///     const VERSION: u32 = 1;
///     const RESTART: Option<Restart<Self>> = Some(Restart {
///         fresh: Parser::default,
///         max_restarts: 3,
///         within_ms: 5_000,
///     });
///     async fn handle(&mut self, line: String, _ctx: &mut Ctx<Self>) {
///         assert!(!line.is_empty(), "empty line");
///         self.lines += 1;
///     }
/// }
/// ```
pub struct Restart<S> {
    /// Makes the state the service restarts with.
    pub fresh: fn() -> S,
    /// Restarts allowed within `within_ms`; one more panic stops the service.
    pub max_restarts: u32,
    /// The window the restarts are counted in, in milliseconds.
    pub within_ms: u64,
}

/// Restarts done recently, for a kind's [`Restart`] policy.
/// (Boxed when there is a restart to remember: most services never restart, and every
/// runner's future and sleeping service pays for the field.)
#[allow(clippy::box_collection)]
struct RestartBudget(Option<Box<Vec<std::time::Instant>>>);

impl RestartBudget {
    /// The fresh state, if the policy allows one more restart now.
    fn take<S: Service>(&mut self) -> Option<S> {
        let policy = S::RESTART?;
        let now = std::time::Instant::now();
        let window = Duration::from_millis(policy.within_ms);
        // At most `max_restarts` entries, oldest first.
        let times = self.0.get_or_insert_with(Default::default);
        times.retain(|t| now.duration_since(*t) <= window);
        if times.len() >= policy.max_restarts as usize {
            return None;
        }
        times.push(now);
        Some((policy.fresh)())
    }
}

/// A location-transparent, serializable handle for answering one ask.
///
/// It names the node and the pending ask waiting for the answer, so it can travel inside a
/// message, be stored in state, and be answered from any node.
#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub struct ReplyTo<R> {
    pub(crate) node: NodeName,
    pub(crate) ask: u64,
    #[serde(skip)]
    _reply: PhantomData<fn() -> R>,
}

impl<R> ReplyTo<R> {
    pub(crate) fn new(node: NodeName, ask: u64) -> Self {
        ReplyTo {
            node,
            ask,
            _reply: PhantomData,
        }
    }
    /// The node waiting for the answer.
    pub fn node(&self) -> &NodeName {
        &self.node
    }
}

impl<R> fmt::Debug for ReplyTo<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplyTo({}#{})", self.node, self.ask)
    }
}

/// Identifies a pending timer of a service, for [`Ctx::cancel`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TimerId(u64);

/// A service's pending timers: messages to itself, due at an instant. Kept by the runtime as
/// data (not as sleeping tasks), so they can be listed, bounded and moved. Made at the first
/// timer: a service that never schedules one pays a pointer for the field.
struct Timers<M>(Option<Box<TimerSet<M>>>);

struct TimerSet<M> {
    due: std::collections::BTreeMap<(tokio::time::Instant, TimerId), M>,
    by_id: std::collections::HashMap<TimerId, tokio::time::Instant>,
    next: u64,
}

impl<M> Timers<M> {
    fn new() -> Self {
        Timers(None)
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |t| t.due.len())
    }

    fn clear(&mut self) {
        if let Some(t) = &mut self.0 {
            t.due.clear();
            t.by_id.clear();
        }
    }

    /// Adds a timer unless `max` are pending already.
    fn add(&mut self, at: tokio::time::Instant, msg: M, max: usize) -> Option<TimerId> {
        if self.len() >= max {
            return None;
        }
        let t = self.0.get_or_insert_with(|| {
            Box::new(TimerSet {
                due: std::collections::BTreeMap::new(),
                by_id: std::collections::HashMap::new(),
                next: 1,
            })
        });
        let id = TimerId(t.next);
        t.next += 1;
        t.due.insert((at, id), msg);
        t.by_id.insert(id, at);
        Some(id)
    }

    fn cancel(&mut self, id: TimerId) -> bool {
        let Some(t) = &mut self.0 else {
            return false;
        };
        match t.by_id.remove(&id) {
            Some(at) => t.due.remove(&(at, id)).is_some(),
            None => false,
        }
    }

    fn next_due(&self) -> Option<tokio::time::Instant> {
        self.0.as_ref()?.due.keys().next().map(|(at, _)| *at)
    }

    fn pop_due(&mut self, now: tokio::time::Instant) -> Option<M> {
        let t = self.0.as_mut()?;
        let key = *t.due.keys().next().filter(|(at, _)| *at <= now)?;
        t.by_id.remove(&key.1);
        t.due.remove(&key)
    }

    /// The pending timers, soonest first.
    fn iter(&self) -> impl Iterator<Item = (tokio::time::Instant, &M)> {
        self.0
            .iter()
            .flat_map(|t| t.due.iter().map(|((at, _), m)| (*at, m)))
    }
}

/// What a handler can do besides changing its own state.
pub struct Ctx<S: Service> {
    /// Itself; its node is `me.node`.
    me: ServiceRef<S>,
    /// Per receiver, the last number this service used as a sender: the map its task's
    /// [`SENDING`] holds (so handles used inside its handlers number the same way), kept here
    /// from the first send on.
    seqs: Option<Seqs>,
    timers: Timers<S::Msg>,
    stop: bool,
    /// A move asked for by the handler in hand (boxed: rare, and every service pays for the
    /// field).
    migrate_to: Option<Box<(NodeName, MigrateOptions, MigrationDone)>>,
    /// Messages sent and received, for sampling their sizes.
    sent: u32,
    received: u32,
    /// The answers kept to the asks it took last (`replies.rs`); made at its first ask.
    replies: Option<Box<std::cell::RefCell<crate::replies::Replies>>>,
}

/// Records `msg`'s encoded size on the edge `from -> to`. Out of line and marked cold, so the
/// message path that calls it one time in [`SIZE_SAMPLE_EVERY`] stays small.
#[cold]
#[inline(never)]
fn sample_size<T: Serialize>(node: &NodeShared, from: ServiceId, to: ServiceId, msg: &T) {
    node.sample_size(from, to, encoded_len(msg));
}

/// The MessagePack size of `msg`, measured without keeping the bytes (0 if it does not
/// encode: it would not travel either).
pub(crate) fn encoded_len<T: Serialize>(msg: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    match rmp_serde::encode::write(&mut c, msg) {
        Ok(()) => c.0,
        Err(_) => 0,
    }
}

impl<S: Service> Ctx<S> {
    /// This service's id.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// // In a handler of yours (here, one `inside` runs on the phone):
    /// let id = inside(&phone, |ctx| ctx.id())?;
    /// assert!(phone.services().iter().any(|s| s.addr.id == id));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn id(&self) -> ServiceId {
        self.me.id()
    }

    /// This service's kind.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let kind = inside(&phone, |ctx| ctx.kind())?;
    /// assert_eq!((kind.name.as_str(), kind.version), ("probe", 1));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn kind(&self) -> KindKey {
        S::kind_key()
    }

    /// This service's address (id, kind, node).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let addr = inside(&phone, |ctx| ctx.addr().clone())?;
    /// assert_eq!(addr.node.as_str(), "phone");
    /// // An address can be given to anyone, on any node.
    /// assert_eq!(tv.resolve::<tern::doc_support::Probe>(&addr)?.id(), addr.id);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn addr(&self) -> &ServiceAddr {
        self.me.addr()
    }

    /// The node running this service now.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let here = inside(&tv, |ctx| ctx.node_name().clone())?;
    /// assert_eq!(here.as_str(), "tv");
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn node_name(&self) -> &NodeName {
        self.me.node.name()
    }

    /// A handle to this service, for giving to others.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// // A handle to give to others, for example in a message.
    /// let (id, me) = inside(&phone, |ctx| (ctx.id(), ctx.myself()))?;
    /// assert_eq!(me.id(), id);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn myself(&self) -> ServiceRef<S> {
        self.me.clone()
    }

    /// Measures one sent message in [`SIZE_SAMPLE_EVERY`] for the traffic table.
    #[inline(always)]
    fn sample_send<M: Serialize>(&mut self, to: ServiceId, msg: &M) {
        self.sent = self.sent.wrapping_add(1);
        if u64::from(self.sent) % SIZE_SAMPLE_EVERY == 1 {
            sample_size(&self.me.node, self.me.id(), to, msg);
        }
    }

    /// The metadata of this service's next message to `to`.
    fn next_meta(&mut self, to: ServiceId) -> Meta {
        let seqs = match &self.seqs {
            Some(seqs) => seqs,
            None => self.seqs.insert(SENDING.with(|s| s.numbers().clone())),
        };
        next_meta(seqs, self.me.id(), to, S::REPLICAS > 0)
    }

    /// Gives back the number of a message that was not queued, so its receiver does not
    /// wait for it.
    fn unnumber(&mut self, to: ServiceId) {
        if let Some(seqs) = &self.seqs {
            unnumber(seqs, to);
        }
    }

    /// Sends `msg` to `to`, numbered in this service's channel to it.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = tv.spawn(Counter::default())?;
    /// let total = inside_async(&phone, move |ctx| Box::pin(async move {
    ///     ctx.tell(&counter, CounterMsg::Add(3)).expect("queued");
    ///     // From the same service, in order: the ask comes after the tell.
    ///     ctx.ask(&counter, CounterMsg::Total, SECS_10).await
    /// }))??;
    /// assert_eq!(total, 3);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn tell<T: Service>(
        &mut self,
        to: &ServiceRef<T>,
        msg: T::Msg,
    ) -> Result<(), DeliveryError> {
        self.sample_send(to.id(), &msg);
        let meta = self.next_meta(to.id());
        let res = to.send(meta, msg);
        if res.is_err() {
            self.unnumber(to.id());
        }
        res
    }

    /// Like [`tell`](Self::tell), but waits for room when the target's mailbox or link is full.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = tv.spawn(Counter::default())?;
    /// let total = inside_async(&phone, move |ctx| Box::pin(async move {
    ///     for n in 1..=100 {
    ///         // Waits when the counter's mailbox or the link is full, instead of failing.
    ///         ctx.tell_wait(&counter, CounterMsg::Add(n)).await.expect("sent");
    ///     }
    ///     ctx.ask(&counter, CounterMsg::Total, SECS_10).await
    /// }))??;
    /// assert_eq!(total, 5050);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn tell_wait<T: Service>(
        &mut self,
        to: &ServiceRef<T>,
        msg: T::Msg,
    ) -> Result<(), DeliveryError> {
        self.sample_send(to.id(), &msg);
        let meta = self.next_meta(to.id());
        // Most sends are queued at once: only a full mailbox, window or link builds the
        // waiting future.
        let res = match to.send_now(meta, msg) {
            Ok(SendNow::Done) => Ok(()),
            Ok(SendNow::Settle(link, queued)) => {
                link.settle(queued).await;
                Ok(())
            }
            Ok(SendNow::Wait(msg)) => to.send_wait(meta, msg, None).await,
            Err(e) => Err(e),
        };
        if res.is_err() {
            self.unnumber(to.id());
        }
        res
    }

    /// Sends a request to `to` and waits for the answer. The service handles nothing else
    /// meanwhile.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let counter = tv.spawn(Counter { total: 9 })?;
    /// let total = inside_async(&phone, move |ctx| Box::pin(async move {
    ///     ctx.ask(&counter, CounterMsg::Total, SECS_10).await
    /// }))??;
    /// assert_eq!(total, 9);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn ask<T: Service, R: DeserializeOwned + Send + 'static>(
        &mut self,
        to: &ServiceRef<T>,
        make: impl FnOnce(ReplyTo<R>) -> T::Msg,
        timeout: Duration,
    ) -> Result<R, AskError> {
        let meta = self.next_meta(to.id());
        let (res, sent) = to.ask_sent(meta, make, timeout).await;
        if !sent {
            // Never queued, so no receiver will see this number. (A refusal from the far
            // side comes after the number was used there: it stays used.)
            self.unnumber(to.id());
        }
        res
    }

    /// Answers an ask, wherever the asker is.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// # use serde::{Deserialize, Serialize};
    /// # use tern::{Ctx, ReplyTo, Service};
    /// #[derive(Serialize, Deserialize)]
    /// struct Echo;
    /// #[derive(Serialize, Deserialize)]
    /// enum EchoMsg { Say(String, ReplyTo<String>) }
    /// impl Service for Echo {
    ///     type Msg = EchoMsg;
    ///     const KIND: &'static str = "echo";
    ///     const VERSION: u32 = 1;
    ///     async fn handle(&mut self, EchoMsg::Say(text, reply): EchoMsg, ctx: &mut Ctx<Self>) {
    ///         // Wherever the asker is; an asker that gave up is no error of ours.
    ///         let _ = ctx.reply(reply, text.to_uppercase());
    ///     }
    /// }
    /// tv.register::<Echo>();
    /// let echo = tv.spawn(Echo)?;
    /// let heard = block_on(echo.ask(|r| EchoMsg::Say("hello".into(), r), SECS_10))?;
    /// assert_eq!(heard, "HELLO");
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn reply<R: Serialize + Send + 'static>(
        &self,
        to: ReplyTo<R>,
        value: R,
    ) -> Result<(), DeliveryError> {
        self.keep_reply(&to, &value);
        self.me.node.reply(to, value)
    }

    /// If `value` answers an ask this service took (in hand, or kept in its state and answered
    /// now), keeps it for copies of that ask, and gives it to those that wait already.
    fn keep_reply<R: Serialize>(&self, to: &ReplyTo<R>, value: &R) {
        let origin = crate::mailbox::AskOrigin {
            node: to.node.clone(),
            ask: to.ask,
        };
        let Some(book) = self.replies.as_ref() else {
            return;
        };
        // Encoded only when it answers a kept ask; sent from the book, not copied.
        let mut book = book.borrow_mut();
        let Some((bytes, also)) = book.answered(&origin, || rmp_serde::to_vec(value).ok()) else {
            return;
        };
        for o in also {
            self.me.node.answer_kept(&o, &bytes);
        }
    }

    /// The runner takes ask `seq` of `from`, whose answer goes to `origin`.
    fn taking_ask(&mut self, from: ServiceId, seq: u64, origin: crate::mailbox::AskOrigin) {
        self.replies
            .get_or_insert_with(Default::default)
            .get_mut()
            .taking(from, seq, origin);
    }

    /// Answers the copies of asks the windows dropped: with the kept answer, later with the
    /// answer still to come, or a failure saying why.
    fn answer_repeats(&mut self, repeats: Vec<(Envelope<S::Msg>, bool)>) {
        for (env, queued) in repeats {
            let (Some(from), Some(origin)) = (env.from, env.ask) else {
                continue;
            };
            let what = self
                .replies
                .get_or_insert_with(Default::default)
                .get_mut()
                .repeat(from, env.seq, origin.clone(), queued);
            match what {
                crate::replies::Repeat::Answer(v) => self.me.node.answer_kept(&origin, &v),
                crate::replies::Repeat::Waits => {}
                crate::replies::Repeat::Fail(why) => {
                    self.me
                        .node
                        .logs
                        .event("ask-repeat-failed", format!("{}: {why}", self.id()));
                    self.me
                        .node
                        .fail_ask(&origin, format!("{}: {why}", self.id()));
                }
            }
        }
    }

    /// The answers kept, for a snapshot or a checkpoint.
    fn replies_kept(&self) -> Vec<tern_proto::wire::KeptReply> {
        self.replies
            .as_ref()
            .map_or_else(Vec::new, |r| r.borrow().export())
    }

    /// The address in this service's book under `role`.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let store = tv.spawn(Counter::default())?.addr().clone();
    /// let found = inside(&phone, move |ctx| {
    ///     ctx.book_insert("store", store)?;
    ///     Ok::<_, tern::Error>((ctx.book_get("store"), ctx.book_get("nothing")))
    /// })??;
    /// assert_eq!(found.0.map(|a| a.node.to_string()), Some("tv".into()));
    /// assert!(found.1.is_none());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn book_get(&self, role: &str) -> Option<ServiceAddr> {
        self.me.node.books.get(self.id(), role)
    }

    /// A typed handle to the service in this service's book under `role`
    /// ([`DeliveryError::UnknownRole`] when there is no such entry).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let store = tv.spawn(Counter { total: 4 })?;
    /// let addr = store.addr().clone();
    /// let total = inside_async(&phone, move |ctx| Box::pin(async move {
    ///     ctx.book_insert("store", addr)?;
    ///     let store = ctx.book_ref::<Counter>("store")?;
    ///     Ok::<_, Box<dyn std::error::Error + Send + Sync>>(ctx.ask(&store, CounterMsg::Total, SECS_10).await?)
    /// }))?;
    /// assert_eq!(total.map_err(|e| e.to_string())?, 4);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn book_ref<T: Service>(&self, role: &str) -> Result<ServiceRef<T>, DeliveryError> {
        let addr = self
            .book_get(role)
            .ok_or_else(|| DeliveryError::UnknownRole {
                holder: self.id(),
                role: role.into(),
            })?;
        self.me.node.resolve(&addr)
    }

    /// Sends `msg` to the service in this service's book under `role`.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let store = tv.spawn(Counter::default())?;
    /// let addr = store.addr().clone();
    /// inside(&phone, move |ctx| {
    ///     ctx.book_insert("store", addr)?;
    ///     ctx.tell_role::<Counter>("store", CounterMsg::Add(5))?;
    ///     // No such entry: refused, nothing sent.
    ///     assert!(ctx.tell_role::<Counter>("archive", CounterMsg::Add(1)).is_err());
    ///     Ok::<_, tern::Error>(())
    /// })??;
    /// # let mut total = 0;
    /// # for _ in 0..1000 { total = block_on(store.ask(CounterMsg::Total, SECS_10))?; if total == 5 { break } std::thread::sleep(std::time::Duration::from_millis(5)); }
    /// # assert_eq!(total, 5);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn tell_role<T: Service>(&mut self, role: &str, msg: T::Msg) -> Result<(), DeliveryError> {
        let to = self.book_ref::<T>(role)?;
        self.tell(&to, msg)
    }

    /// Like [`tell_role`](Self::tell_role), but waits for room when the target's mailbox or
    /// link is full.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let store = tv.spawn(Counter::default())?;
    /// let addr = store.addr().clone();
    /// let total = inside_async(&phone, move |ctx| Box::pin(async move {
    ///     ctx.book_insert("store", addr).expect("a book entry");
    ///     for n in 1..=10 {
    ///         ctx.tell_wait_role::<Counter>("store", CounterMsg::Add(n)).await.expect("sent");
    ///     }
    ///     ctx.ask_role::<Counter, u64>("store", CounterMsg::Total, SECS_10).await
    /// }))??;
    /// assert_eq!(total, 55);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn tell_wait_role<T: Service>(
        &mut self,
        role: &str,
        msg: T::Msg,
    ) -> Result<(), DeliveryError> {
        let to = self.book_ref::<T>(role)?;
        self.tell_wait(&to, msg).await
    }

    /// Asks the service in this service's book under `role` (see [`ask`](Self::ask)).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let store = tv.spawn(Counter { total: 8 })?;
    /// let addr = store.addr().clone();
    /// let total = inside_async(&phone, move |ctx| Box::pin(async move {
    ///     ctx.book_insert("store", addr).expect("a book entry");
    ///     ctx.ask_role::<Counter, u64>("store", CounterMsg::Total, SECS_10).await
    /// }))??;
    /// assert_eq!(total, 8);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn ask_role<T: Service, R: DeserializeOwned + Send + 'static>(
        &mut self,
        role: &str,
        make: impl FnOnce(ReplyTo<R>) -> T::Msg,
        timeout: Duration,
    ) -> Result<R, AskError> {
        let to = self.book_ref::<T>(role).map_err(AskError::from)?;
        self.ask(&to, make, timeout).await
    }

    /// Registers `name` for this service, cluster-wide (see
    /// [`NodeHandle::register_name`](crate::NodeHandle::register_name)).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let id = inside(&phone, |ctx| ctx.register_name("clock").map(|()| ctx.id()))??;
    /// assert_eq!(phone.lookup::<tern::doc_support::Probe>("clock")?.id(), id);
    /// // Taken.
    /// assert!(inside(&phone, |ctx| ctx.register_name("clock"))?.is_err());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn register_name(&self, name: &str) -> Result<(), Error> {
        self.me.node.register_name(name, self.id())
    }

    /// Removes `name` if this service holds it; `true` if it did.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let gone = inside(&phone, |ctx| {
    ///     ctx.register_name("clock")?;
    ///     Ok::<_, tern::Error>(ctx.unregister_name("clock"))
    /// })??;
    /// assert!(gone);
    /// assert!(phone.lookup::<tern::doc_support::Probe>("clock").is_err());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn unregister_name(&self, name: &str) -> bool {
        self.me.node.unregister_name(name, self.id())
    }

    /// A handle to the service registered as `name`, wherever it runs (see
    /// [`NodeHandle::lookup`](crate::NodeHandle::lookup)).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let clock = tv.spawn(Counter { total: 12 })?;
    /// tv.register_name("clock", clock.id())?;
    /// let total = inside_async(&tv, |ctx| Box::pin(async move {
    ///     let clock = ctx.lookup::<Counter>("clock").expect("registered");
    ///     ctx.ask(&clock, CounterMsg::Total, SECS_10).await
    /// }))??;
    /// assert_eq!(total, 12);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn lookup<T: Service>(&self, name: &str) -> Result<ServiceRef<T>, Error> {
        self.me.node.lookup(name)
    }

    /// This service's whole book.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let (a, b) = (tv.spawn(Counter::default())?, tv.spawn(Counter::default())?);
    /// let (a, b) = (a.addr().clone(), b.addr().clone());
    /// let book = inside(&phone, move |ctx| {
    ///     ctx.book_insert("left", a)?;
    ///     ctx.book_insert("right", b)?;
    ///     Ok::<_, tern::Error>(ctx.book())
    /// })??;
    /// assert_eq!(book.len(), 2);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn book(&self) -> Vec<(String, ServiceAddr)> {
        self.me.node.books.book(self.id())
    }

    /// Adds or replaces the entry `role` of this service's book.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let store = tv.spawn(Counter::default())?.addr().clone();
    /// let (me, book) = inside(&phone, move |ctx| {
    ///     // The entry, and the channel it names, move with this service.
    ///     ctx.book_insert("store", store)?;
    ///     Ok::<_, tern::Error>((ctx.id(), ctx.book()))
    /// })??;
    /// assert_eq!(book[0].0, "store");
    /// assert_eq!(phone.book(me), book);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn book_insert(&self, role: &str, target: ServiceAddr) -> Result<(), Error> {
        self.me.node.book_insert(self.addr(), role, target)
    }

    /// Removes the entry `role` of this service's book; true if there was one.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let store = tv.spawn(Counter::default())?.addr().clone();
    /// let removed = inside(&phone, move |ctx| {
    ///     ctx.book_insert("store", store)?;
    ///     Ok::<_, tern::Error>((ctx.book_remove("store"), ctx.book_remove("store")))
    /// })??;
    /// assert_eq!(removed, (true, false));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn book_remove(&self, role: &str) -> bool {
        self.me.node.book_remove(self.id(), role)
    }

    /// Who this service holds and who holds it, across the cluster.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let store = tv.spawn(Counter::default())?;
    /// let addr = store.addr().clone();
    /// let mine = inside(&phone, move |ctx| {
    ///     ctx.book_insert("store", addr)?;
    ///     Ok::<_, tern::Error>(ctx.associations())
    /// })??;
    /// assert_eq!(mine.holds[0].1.id, store.id());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn associations(&self) -> Associations {
        self.me.node.books.associations(self.id())
    }

    /// Starts a child service on this node, recorded as an assembly-tree edge.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let (parent, child) = inside(&phone, |ctx| {
    ///     let child = ctx.spawn_child(Counter::default())?;
    ///     Ok::<_, tern::Error>((ctx.id(), child.id()))
    /// })??;
    /// // It moves with its parent when the tree moves (`migrate_tree`).
    /// assert_eq!(phone.children(parent), [child]);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn spawn_child<C: Service>(&self, state: C) -> Result<ServiceRef<C>, Error> {
        self.me.node.spawn(state, Some(self.id()))
    }

    /// Makes `child` a child of this service in its assembly tree (see
    /// [`NodeHandle::adopt`](crate::NodeHandle::adopt)).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let stray = phone.spawn(Counter::default())?;
    /// let addr = stray.addr().clone();
    /// let parent = inside(&phone, move |ctx| ctx.adopt(&addr).map(|()| ctx.id()))??;
    /// assert_eq!(phone.children(parent), [stray.id()]);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn adopt(&self, child: &ServiceAddr) -> Result<(), Error> {
        self.me.node.adopt(self.id(), child)
    }

    /// Sends `msg` to this service after `delay`. A due timer is handled before the next queued
    /// message. Fails when the service has `timers_per_service_max` timers pending.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use serde::{Deserialize, Serialize};
    /// # use tern::{Ctx, Service};
    /// #[derive(Serialize, Deserialize)]
    /// struct Player { position_s: u64 }
    /// #[derive(Serialize, Deserialize)]
    /// enum PlayerMsg { Play, Tick }
    /// impl Service for Player {
    ///     type Msg = PlayerMsg;
    ///     const KIND: &'static str = "player";
    ///     const VERSION: u32 = 1;
    ///     async fn handle(&mut self, msg: PlayerMsg, ctx: &mut Ctx<Self>) {
    ///         if let PlayerMsg::Tick = msg {
    ///             self.position_s += 1;
    ///         }
    ///         // Advance the position every second.
    ///         let _ = ctx.schedule(Duration::from_secs(1), PlayerMsg::Tick);
    ///     }
    /// }
    /// ```
    pub fn schedule(&mut self, delay: Duration, msg: S::Msg) -> Result<TimerId, Error> {
        let at = tokio::time::Instant::now() + delay;
        let max = self.me.node.limits.timers_per_service_max;
        self.timers.add(at, msg, max).ok_or(Error::Limit {
            what: "timers of this service",
            max,
        })
    }

    /// Cancels a pending timer; false if it already fired or was cancelled.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// # use std::time::Duration;
    /// # use tern::doc_support::ProbeMsg;
    /// let cancelled = inside(&phone, |ctx| {
    ///     let timer = ctx.schedule(Duration::from_secs(60), ProbeMsg::default())?;
    ///     Ok::<_, tern::Error>((ctx.cancel(timer), ctx.cancel(timer), ctx.timers_pending()))
    /// })??;
    /// assert_eq!(cancelled, (true, false, 0));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn cancel(&mut self, timer: TimerId) -> bool {
        self.timers.cancel(timer)
    }

    /// Number of pending timers.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// # use std::time::Duration;
    /// # use tern::doc_support::ProbeMsg;
    /// let pending = inside(&phone, |ctx| {
    ///     ctx.schedule(Duration::from_secs(60), ProbeMsg::default())?;
    ///     ctx.schedule(Duration::from_secs(90), ProbeMsg::default())?;
    ///     Ok::<_, tern::Error>(ctx.timers_pending())
    /// })??;
    /// assert_eq!(pending, 2);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn timers_pending(&self) -> usize {
        self.timers.len()
    }

    /// Moves this service to node `to` after the current message, as
    /// [`NodeHandle::migrate`](crate::NodeHandle::migrate) does (held where it lands unless
    /// `opts.hold` is off). The returned [`Migration`] resolves to the outcome, the same way:
    /// `Ok(report)` when it moved, [`Error::NotMoved`] otherwise. Give it to a task that can
    /// wait (not this handler: the move starts only after it returns), or drop it; the outcome
    /// is also logged (`migration` event). To have the outcome come back to the service
    /// itself, use [`migrate_then`](Self::migrate_then).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// // The move starts once the handler returns; the `Migration` resolves to its outcome.
    /// let (id, moving) = inside(&phone, |ctx| (ctx.id(), ctx.migrate("tv", tern::MigrateOptions::default())))?;
    /// let report = block_on(moving)?;
    /// assert_eq!(report.to.as_str(), "tv");
    /// assert!(tv.services().iter().any(|s| s.addr.id == id));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn migrate(&mut self, to: impl Into<NodeName>, opts: MigrateOptions) -> Migration {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.migrate_to = Some(Box::new((
            to.into(),
            opts,
            Box::new(move |outcome| {
                let _ = tx.send(outcome);
            }),
        )));
        Migration(rx)
    }

    /// Like [`migrate`](Self::migrate), and the outcome comes back to this service as the
    /// message `outcome` makes, wherever it runs then (on the target when it moved).
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # use tern::{Ctx, MigrateOptions, MigrationReport, NotMoved, Service};
    /// #[derive(Serialize, Deserialize)]
    /// struct Board { moves_failed: u32 }
    /// #[derive(Serialize, Deserialize)]
    /// enum BoardMsg { GoTo(String), Moved(Result<MigrationReport, NotMoved>) }
    /// impl Service for Board {
    ///     type Msg = BoardMsg;
    ///     const KIND: &'static str = "board";
    ///     const VERSION: u32 = 1;
    ///     async fn handle(&mut self, msg: BoardMsg, ctx: &mut Ctx<Self>) {
    ///         match msg {
    ///             BoardMsg::GoTo(node) => ctx.migrate_then(node, MigrateOptions::default(), BoardMsg::Moved),
    ///             BoardMsg::Moved(Ok(_)) => {}
    ///             BoardMsg::Moved(Err(_why)) => self.moves_failed += 1,
    ///         }
    ///     }
    /// }
    /// ```
    pub fn migrate_then(
        &mut self,
        to: impl Into<NodeName>,
        opts: MigrateOptions,
        outcome: impl FnOnce(Result<MigrationReport, NotMoved>) -> S::Msg + Send + 'static,
    ) {
        let me = self.me.clone();
        self.migrate_to = Some(Box::new((
            to.into(),
            opts,
            Box::new(move |result| {
                if let Err(e) = me.tell(outcome(result)) {
                    tracing::warn!(service = %me.id(), error = %e, "migration outcome not delivered");
                }
            }),
        )));
    }

    /// Stops this service after the current message. Messages still queued are refused and
    /// their senders told.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, inside, inside_async, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let id = inside(&phone, |ctx| {
    ///     ctx.stop();
    ///     ctx.id()
    /// })?;
    /// # for _ in 0..1000 { if !phone.services().iter().any(|s| s.addr.id == id) { break } std::thread::sleep(std::time::Duration::from_millis(5)); }
    /// assert!(!phone.services().iter().any(|s| s.addr.id == id));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stop(&mut self) {
        self.stop = true;
    }
}

/// A service's send counters: per receiver, the last number it used.
type Seqs = std::rc::Rc<std::cell::RefCell<IdMap<u64>>>;

/// The service whose task is running, and its send counters.
struct Sending {
    from: ServiceId,
    /// Per receiver, the last number this service used as a sender: used by its context and
    /// by handles inside its handlers alike. Made at its first send: a service that never
    /// sends has none. (Made at the start, on the node's thread, the map's allocation sat
    /// among the places the tasks of sleeping services free, and kept the next tasks from
    /// reusing them: docs/benchmarks.md.)
    seqs: std::cell::OnceCell<Seqs>,
    /// The service is replicated: its node keeps copies of what it sends (`Meta::keep`).
    keep: bool,
}

impl Sending {
    /// The send numbers, made if this is the first send.
    fn numbers(&self) -> &Seqs {
        self.seqs.get_or_init(Seqs::default)
    }
}

/// Per receiver, the last number the running service used (none if it never sent). Called
/// only inside a service's task.
fn sent_numbers() -> Vec<(ServiceId, u64)> {
    SENDING.with(|s| {
        s.seqs
            .get()
            .map(|m| m.borrow().iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    })
}

/// The running service's send numbers, kept by a service that falls asleep.
fn kept_numbers() -> Option<Seqs> {
    SENDING.with(|s| s.seqs.get().cloned())
}

tokio::task_local! {
    /// Set for the whole task of each service: a handle used inside one of its handlers
    /// sends as the service (numbered in its channel, kept in order when it moves), not as
    /// an anonymous client of the node.
    static SENDING: Sending;
}

fn next_meta(seqs: &Seqs, from: ServiceId, to: ServiceId, keep: bool) -> Meta {
    let mut seqs = seqs.borrow_mut();
    let seq = seqs.entry(to).or_insert(0);
    *seq += 1;
    Meta {
        from: Some(from),
        seq: *seq,
        ask: None,
        keep,
    }
}

fn unnumber(seqs: &Seqs, to: ServiceId) {
    if let Some(seq) = seqs.borrow_mut().get_mut(&to) {
        *seq -= 1;
    }
}

/// A number taken in the running service's channel to a receiver, for a message sent
/// through a handle inside one of its handlers.
pub(crate) struct Numbered {
    seqs: Seqs,
    to: ServiceId,
    /// The message's metadata: the service as sender, its next number.
    pub meta: Meta,
}

impl Numbered {
    /// The message was not queued: the number goes back, so its receiver does not wait.
    pub fn give_back(self) {
        unnumber(&self.seqs, self.to)
    }
}

/// The next number in the running service's channel to `to`, when called from inside a
/// service's task; `None` elsewhere (a handle then sends as the node's client).
pub(crate) fn numbered_here(to: ServiceId) -> Option<Numbered> {
    SENDING
        .try_with(|s| {
            let seqs = s.numbers().clone();
            Numbered {
                meta: next_meta(&seqs, s.from, to, s.keep),
                seqs,
                to,
            }
        })
        .ok()
}

/// What becomes of a migration a service asked for: called once with its outcome.
pub(crate) type MigrationDone = Box<dyn FnOnce(Result<MigrationReport, NotMoved>) + Send>;

/// The outcome of [`Ctx::migrate`], for whoever can wait for it: `Ok(report)` when the service
/// moved, [`Error::NotMoved`] when it did not (it runs on where it was), [`Error::Stopped`] when
/// the node stopped first.
#[must_use = "drop it if the outcome does not matter (it is also logged)"]
pub struct Migration(tokio::sync::oneshot::Receiver<Result<MigrationReport, NotMoved>>);

impl Future for Migration {
    type Output = Result<MigrationReport, Error>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx).map(|r| match r {
            Ok(Ok(report)) => Ok(report),
            Ok(Err(not)) => Err(not.into()),
            Err(_) => Err(Error::Stopped),
        })
    }
}

/// How long a busy service handles messages before it yields its thread to the node's other
/// tasks and to the network, in microseconds (a turn ends at the first look at the clock past
/// it). A yield lets the runtime poll for I/O, a system call: a turn counted in messages made
/// cheap handlers pay for it often and let costly ones keep the thread for long.
const TURN_US: u64 = 300;
const TURN: std::time::Duration = std::time::Duration::from_micros(TURN_US);

/// A busy service looks at the clock once every this many messages.
const TURN_LOOK_EVERY: u32 = 16;

/// How many messages a busy service handles between reports of its handled marks, besides the
/// node's confirmation round (`PROGRESS_MS`, 20 ms): a sender that keeps copies until they are confirmed
/// (at most `retained_per_channel_max` per channel; a replicated service keeps its tells) would
/// otherwise send at most that many per round.
const MARKS_EVERY: u32 = 512;
// The marks' count is looked at only with the clock, every `TURN_LOOK_EVERY` messages.
const _: () = assert!(MARKS_EVERY % TURN_LOOK_EVERY == 0);

/// What a restored copy brings besides its state.
pub(crate) struct Restored<M> {
    pub timers: Vec<(Duration, M)>,
    pub seqs: Vec<(ServiceId, u64)>,
    pub source: NodeName,
    /// The attempt that brought it, numbered at `source`.
    pub mig: u64,
    /// Per sender, the last number the service handled before it came (see
    /// [`WindowWire::taken`]): a replicated service's first checkpoints here carry them.
    pub marks: Vec<(ServiceId, u64)>,
    /// The answers it kept to the asks it took last.
    pub replies: Vec<tern_proto::wire::KeptReply>,
    /// Taken over from a checkpoint: what it had sent and not seen confirmed, sent again
    /// before it runs.
    pub outputs: Vec<tern_proto::wire::KeptOutput>,
}

fn new_ctx<S: Service>(me: ServiceRef<S>) -> Ctx<S> {
    Ctx {
        me,
        seqs: None,
        timers: Timers::new(),
        stop: false,
        migrate_to: None,
        sent: 0,
        received: 0,
        replies: None,
    }
}

/// Runs a service until it stops, moves away or its node shuts down.
///
/// (A plain function returning the runner's future, not an `async fn`: an `async fn` keeps
/// its arguments in its future beside the locals they move into, and every idle service
/// pays for that copy for as long as it lives.)
pub(crate) fn run_service<S: Service>(
    state: S,
    me: ServiceRef<S>,
    mailbox: Arc<Mailbox<S::Msg>>,
    node: Arc<NodeShared>,
) -> impl std::future::Future<Output = ()> {
    let span = service_span::<S>(me.id(), &node);
    let ctx = new_ctx(me);
    serve(state, ctx, mailbox, None, None, None).instrument(span)
}

/// Runs a restored copy: paused until the source commits (or discarded if it aborts).
/// (A plain function returning the future, for the reason given at [`run_service`].)
pub(crate) fn run_restored<S: Service>(
    state: S,
    me: ServiceRef<S>,
    mailbox: Arc<Mailbox<S::Msg>>,
    node: Arc<NodeShared>,
    restored: Restored<S::Msg>,
    go: tokio::sync::oneshot::Receiver<Go>,
) -> impl std::future::Future<Output = ()> {
    let id = me.id();
    let span = service_span::<S>(id, &node);
    let mut ctx = new_ctx(me);
    async move {
        match go.await {
            Ok(Go::Start) => {
                for r in mailbox.start() {
                    let (reason, env) = r;
                    ctx.me.node.refuse_envelope(id, env.refusal(reason));
                }
                let now = tokio::time::Instant::now();
                let max = ctx.me.node.limits.timers_per_service_max;
                for (after, msg) in restored.timers {
                    // Bounded on the source by the same limit.
                    let _ = ctx.timers.add(now + after, msg, max);
                }
                mailbox.note_timers(ctx.timers.len());
                // The numbers it sent with at its source go on here (none if it never sent).
                let seqs = (!restored.seqs.is_empty()).then(|| {
                    let mut numbers = IdMap::default();
                    numbers.extend(restored.seqs);
                    Seqs::new(std::cell::RefCell::new(numbers))
                });
                if !restored.outputs.is_empty() {
                    ctx.me.node.send_outputs(id, restored.outputs);
                }
                if !restored.replies.is_empty() {
                    ctx.replies = Some(Box::new(std::cell::RefCell::new(
                        crate::replies::Replies::import(restored.replies),
                    )));
                }
                if S::REPLICAS > 0 {
                    let epoch = ctx.me.node.driver.location(id).map_or(0, |(_, e)| e);
                    ctx.me
                        .node
                        .replicas
                        .start(id, S::kind_key(), epoch, restored.marks);
                }
                let arrived = Arrived {
                    source: restored.source,
                    mig: restored.mig,
                    at: std::time::Instant::now(),
                };
                serve(state, ctx, mailbox, Some(arrived), None, seqs).await
            }
            Ok(Go::Discard) | Err(_) => {
                // The carried queue is still at the source; what arrived here goes there.
                let gone = mailbox.discard_all();
                let copy: Arc<dyn crate::mailbox::Slot> = mailbox.clone();
                ctx.me.node.forget_moved(id, &copy);
                ctx.me.node.hand_on(id, &restored.source, gone.parked);
                ctx.me.node.send_skips(id, &restored.source, &gone.skips, 0);
            }
            Ok(Go::Orphan) => {
                // Nobody else holds what the copy carried if the source committed and died;
                // if it lives and aborted, it has them too. Either way their senders are told.
                let gone = mailbox.discard_all();
                let copy: Arc<dyn crate::mailbox::Slot> = mailbox.clone();
                ctx.me.node.forget_moved(id, &copy);
                let reason = DeliveryError::ServiceLost {
                    id,
                    node: restored.source.clone(),
                };
                for env in gone.carried.into_iter().chain(gone.parked) {
                    ctx.me.node.refuse_envelope(id, env.refusal(reason.clone()));
                }
                for (from, seq) in gone.skips {
                    ctx.me.node.apply_skip(id, from, seq, 0);
                }
            }
        }
    }
    .instrument(span)
}

/// A snapshot, and the queue it carries (taken back on abort).
type Taken<M> = (OutSnap, Arc<CarriedQueue<M>>);

/// Takes the snapshot of a frozen service: its state, queue, timers, counters, windows, book.
/// `written_as`: the older version its target runs, which it is written as (a downgrade).
fn snapshot<S: Service>(
    state: &S,
    ctx: &Ctx<S>,
    mailbox: &Mailbox<S::Msg>,
    written_as: Option<u32>,
) -> Result<Taken<S::Msg>, String> {
    let (kind, bytes, write): (KindKey, Vec<u8>, MsgWriter<S::Msg>) = match written_as {
        None => (
            S::kind_key(),
            rmp_serde::to_vec(state).map_err(|e| format!("state: {e}"))?,
            write_plain::<S::Msg>,
        ),
        Some(v) => {
            let d = downgrade_to::<S>(v)
                .ok_or_else(|| format!("{} declares no downgrade to version {v}", S::kind_key()))?;
            let bytes =
                (d.state)(state).map_err(|e| format!("state: downgrading to version {v}: {e}"))?;
            (KindKey::new(S::KIND, v), bytes, d.msg)
        }
    };
    let timers = timer_wires(ctx, write)?;
    let (queue, windows) = mailbox.take_for_snapshot(|env| encode_envelope_with(env, write));
    let mut wins = Vec::with_capacity(windows.len());
    for w in windows {
        let early: Result<Vec<_>, _> = w.early.into_iter().collect();
        match early {
            Ok(early) => wins.push(WindowWire {
                from: w.from,
                next: w.next,
                early,
                skipped: w.skipped,
                taken: w.taken,
            }),
            Err(e) => {
                mailbox.put_back(queue);
                return Err(format!("early message: {e}"));
            }
        }
    }
    let header = SnapHeader {
        mig: 0,
        id: ctx.id(),
        kind,
        epoch: 0,
        parent: ctx.me.node.parent_of(ctx.id()),
        state_bytes: bytes.len() as u64,
        carried: queue.len() as u64,
        timers,
        send_seqs: sent_numbers(),
        windows: wins,
        // Set by the stream's writer, which cuts the windows and counters into frames.
        tables: 0,
        book: ctx.me.node.books.book(ctx.id()),
        // Set by the stream's writer, from the node's custody table, the migration's
        // options and the node's names.
        custody: Vec::new(),
        held: false,
        forced: false,
        names: Vec::new(),
        replies: ctx.replies_kept(),
        // A move leaves the copies where they were sent from: that node still keeps them.
        outputs: Vec::new(),
        // Set when the state was copied ahead (`Precopy::cut`).
        precopied: false,
        trace: None,
    };
    let carried = Arc::new(CarriedQueue(std::sync::Mutex::new(queue), write));
    Ok((
        OutSnap {
            header,
            state: bytes,
            carried: carried.clone(),
        },
        carried,
    ))
}

/// Cuts a checkpoint of a replicated service and sends it to its standby, if one is due:
/// state, timers, send counters, what it handled of each sender, book. Taken between messages,
/// while nothing else touches the state.
fn checkpoint<S: Service>(state: &S, ctx: &Ctx<S>) {
    ctx.me.node.replica_checkpoint(ctx.id(), |taken| {
        let body = tern_proto::replica::CheckpointBody {
            state: rmp_serde::to_vec(state).map_err(|e| format!("state: {e}"))?,
            timers: timer_wires(ctx, write_plain::<S::Msg>)?,
            send_seqs: sent_numbers(),
            taken,
            book: ctx.me.node.books.book(ctx.id()),
            replies: ctx.replies_kept(),
            outputs: ctx
                .me
                .node
                .outputs_of(ctx.id(), sent_numbers().into_iter().map(|(to, _)| to)),
        };
        rmp_serde::to_vec(&body).map_err(|e| format!("checkpoint: {e}"))
    });
}

/// A service's pending timers as they travel: due so long from now, their messages written
/// by `write`.
fn timer_wires<S: Service>(
    ctx: &Ctx<S>,
    write: MsgWriter<S::Msg>,
) -> Result<Vec<TimerWire>, String> {
    let now = tokio::time::Instant::now();
    let mut timers = Vec::with_capacity(ctx.timers.len());
    for (at, msg) in ctx.timers.iter() {
        timers.push(TimerWire {
            after_us: at.saturating_duration_since(now).as_micros() as u64,
            msg: write(msg).map_err(|e| format!("timer: {e}"))?,
        });
    }
    Ok(timers)
}

/// Starts copying the state ahead when the driver asks, and sends the next chunk when the
/// writer has room (`precopy.rs`). Between two messages, while nothing else touches the state.
fn precopy_turn<S: Service>(
    state: &mut S,
    ctx: &Ctx<S>,
    mailbox: &Mailbox<S::Msg>,
    copying: &mut Option<Box<Copying>>,
) {
    let Some(p) = S::PRECOPY else {
        return;
    };
    if mailbox.precopy.load(std::sync::atomic::Ordering::Relaxed)
        && mailbox
            .precopy
            .swap(false, std::sync::atomic::Ordering::SeqCst)
    {
        if let Some(tx) = ctx.me.node.driver.take_precopy(ctx.id()) {
            // One attempt at a time: an older one ended already.
            *copying = Some(Copying::start((p.part)(state), tx, p.min_bytes));
        }
    }
    if let Some(c) = copying {
        if !c.step((p.part)(state), &ctx.me.node, ctx.id()) {
            *copying = None;
        }
    }
}

/// Waits for a message or until `at` (a due timer or checkpoint). Boxed by the caller.
async fn ready_or_due<M>(mailbox: &Mailbox<M>, at: tokio::time::Instant) {
    tokio::select! {
        _ = mailbox.wait_ready() => {}
        _ = tokio::time::sleep_until(at) => {}
    }
}

/// Waits, while the state is being copied ahead, for a message, a due timer or room for the
/// next chunk. (Boxed by the caller: an idle service's task does not carry it.)
async fn idle_copying<M>(mailbox: &Mailbox<M>, c: &Copying, at: Option<tokio::time::Instant>) {
    let due = async {
        match at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = mailbox.wait_ready() => {}
        _ = due => {}
        _ = c.room() => {}
    }
}

/// At the freeze, the changes not yet copied ahead go (`Copying::finish`); true when the
/// snapshot may leave the part out (it travelled ahead).
async fn finish_copying<S: Service>(
    state: &mut S,
    ctx: &Ctx<S>,
    copying: Option<Box<Copying>>,
) -> Result<bool, String> {
    let (Some(c), Some(p)) = (copying, S::PRECOPY) else {
        return Ok(false);
    };
    let part = (p.part)(state);
    if !c.current(&ctx.me.node, ctx.id()) {
        // Left from an attempt that ended: this freeze moves the whole state.
        part.untrack();
        return Ok(false);
    }
    c.finish(part).await.map(|()| true)
}

/// Freezes the service for a migration; true if it moved away. What was being copied ahead
/// (`copying`) is finished first.
async fn freeze<S: Service>(
    state: &mut S,
    ctx: &mut Ctx<S>,
    mailbox: &Arc<Mailbox<S::Msg>>,
    copying: Option<Box<Copying>>,
) -> bool {
    let node = ctx.me.node.clone();
    let id = ctx.id();
    // This request is being served; one made while it runs is seen after it.
    mailbox
        .freeze
        .store(false, std::sync::atomic::Ordering::SeqCst);
    // The freeze is timed from here: fencing the standbys and taking the snapshot are part
    // of it.
    let since = std::time::Instant::now();
    // A replicated service's standbys let go of its epoch first: the move gives its target
    // the next epoch, which none of them may then claim.
    // In a block: the snapshot is handed to the driver before the await, and a binding still
    // in scope there would be kept in the runner's future, which every idle service pays for.
    // The older version its target runs, when the kind writes it (a downgrade): gossip's
    // word now, which the target checks again on the header.
    let written_as = if S::DOWNGRADES.is_empty() {
        None
    } else {
        node.driver
            .target_of(id)
            .and_then(|to| node.written_for(&S::kind_key(), &to))
    };
    let (carried, rx) = {
        let fence = if S::REPLICAS > 0 {
            // Boxed: the wait's state is not part of every runner's future.
            Box::pin(fence_standbys(node.clone(), id)).await
        } else {
            Ok(())
        };
        // Boxed too, for the same reason.
        let ahead = if copying.is_some() {
            Box::pin(finish_copying(state, ctx, copying)).await
        } else {
            Ok(false)
        };
        let snap = match (fence, ahead) {
            (Ok(()), Ok(false)) => snapshot(state, ctx, mailbox, written_as),
            // What travelled ahead is in this version: an older target could not read it.
            (Ok(()), Ok(true)) if written_as.is_some() => Err(
                "the target runs an older version than the state copied ahead; move again"
                    .to_string(),
            ),
            (Ok(()), Ok(true)) => {
                // The part travelled ahead: the snapshot's state leaves it out.
                let part = S::PRECOPY.map(|p| (p.part)(state));
                if let Some(part) = part {
                    part.leave_out(true);
                }
                let snap = snapshot(state, ctx, mailbox, None);
                if let Some(p) = S::PRECOPY {
                    (p.part)(state).leave_out(false);
                }
                snap.map(|(mut s, c)| {
                    s.header.precopied = true;
                    (s, c)
                })
            }
            (Ok(()), Err(why)) => Err(format!("the pre-copy: {why}")),
            (Err(why), _) => Err(format!(
                "a replicated service moves only with its standbys fenced: {why}"
            )),
        };
        let carried = snap.as_ref().ok().map(|(_, c)| c.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        node.driver
            .frozen(&node, id, since, snap.map(|(s, _)| s), tx);
        (carried, rx)
    };
    match rx.await {
        // The driver handed the leftovers on already, before any sender could be pointed at
        // the target: they go first on the link.
        Ok(Decision::Retire) => true,
        Ok(Decision::Resume) | Err(_) => {
            if let Some(c) = carried {
                let queue = std::mem::take(&mut *lock(&c.0));
                mailbox.put_back(queue);
            }
            false
        }
    }
}

/// Fences a moving replicated service's standbys (`NodeShared::replica_fence`) and waits for
/// their answers.
async fn fence_standbys(node: Arc<NodeShared>, id: ServiceId) -> Result<(), String> {
    match node.replica_fence(id) {
        Ok(Some(rx)) => rx
            .await
            .unwrap_or_else(|_| Err("the node is stopping".to_string())),
        Ok(None) => Ok(()),
        Err(why) => Err(why),
    }
}

/// How often a paused replicated service looks again even if nothing woke it (a freeze
/// request, a checkpoint to retry).
const PAUSED_LOOK: Duration = Duration::from_millis(20);

/// A copy that has just started on its target: the end of its freeze is measured from `at`.
struct Arrived {
    source: NodeName,
    mig: u64,
    at: std::time::Instant,
}

/// The message loop shared by new and restored services, run in the service's
/// [`SENDING`] scope.
/// `resumed`: woken from a sleep, with the restart budget it kept (`started` is not called
/// again).
fn serve<S: Service>(
    state: S,
    ctx: Ctx<S>,
    mailbox: Arc<Mailbox<S::Msg>>,
    arrived: Option<Arrived>,
    resumed: Option<RestartBudget>,
    seqs: Option<Seqs>,
) -> impl std::future::Future<Output = ()> {
    // Inside this service's task, a handle numbers its messages in the service's channels
    // (`numbered_here`), as `ctx.tell` does.
    let sending = Sending {
        from: ctx.id(),
        seqs: seqs.map_or_else(std::cell::OnceCell::new, std::cell::OnceCell::from),
        keep: S::REPLICAS > 0,
    };
    // (Split here, not in `serve_loop`: an `Option` taken apart inside the loop's future
    // would be kept beside its parts.)
    let restarts = match resumed {
        Some(r) => (r, true),
        None => (RestartBudget(None), false),
    };
    SENDING.scope(sending, serve_loop(state, ctx, mailbox, arrived, restarts))
}

/// The span of a service's task.
fn service_span<S: Service>(id: ServiceId, node: &NodeShared) -> tracing::Span {
    tracing::debug_span!("service", id = %id, kind = S::KIND, node = %node.name())
}

/// A service asleep: what its runner keeps between messages, waiting on its node's thread
/// (in [`SLEEPING`]) for a message, a freeze or a close to wake it. Its task has ended. Its
/// context is kept in parts: a sleeping service has no timer, no move asked for and no stop,
/// and its own address is made again from its mailbox.
struct Sleeper<S: Service> {
    state: S,
    node: Arc<NodeShared>,
    chan: Arc<crate::handle::Channel<S::Msg>>,
    mailbox: Arc<Mailbox<S::Msg>>,
    seqs: Option<Seqs>,
    replies: Option<Box<std::cell::RefCell<crate::replies::Replies>>>,
    restarts: RestartBudget,
    counted: (u32, u32),
}

impl<S: Service> Sleeper<S> {
    /// What of `ctx` a sleeping service keeps (see [`Sleeper`]).
    fn new(state: S, ctx: Ctx<S>, mailbox: Arc<Mailbox<S::Msg>>, restarts: RestartBudget) -> Self {
        debug_assert!(ctx.timers.len() == 0 && ctx.migrate_to.is_none() && !ctx.stop);
        let (node, chan) = ctx.me.into_parts();
        Sleeper {
            state,
            node,
            chan,
            mailbox,
            seqs: kept_numbers(),
            replies: ctx.replies,
            restarts,
            counted: (ctx.sent, ctx.received),
        }
    }
}

/// A sleeping service seen without its type.
trait Wake {
    /// Starts the service's runner again, as a new task on this thread.
    fn wake(self: Box<Self>);
}

impl<S: Service> Wake for Sleeper<S> {
    fn wake(self: Box<Self>) {
        let Sleeper {
            state,
            node,
            chan,
            mailbox,
            seqs,
            replies,
            restarts,
            counted: (sent, received),
        } = *self;
        node.stats.services_woken.inc();
        mailbox.active();
        let addr = ServiceAddr {
            id: mailbox.id(),
            kind: mailbox.kind.clone(),
            node: node.name().clone(),
        };
        let span = service_span::<S>(addr.id, &node);
        let ctx = Ctx {
            me: ServiceRef::new(addr, node, chan),
            seqs: None,
            timers: Timers::new(),
            stop: false,
            migrate_to: None,
            sent,
            received,
            replies,
        };
        actix_rt::spawn(serve(state, ctx, mailbox, None, Some(restarts), seqs).instrument(span));
    }
}

thread_local! {
    /// The services asleep on this thread (a node's thread), by their mailbox's key
    /// ([`sleep_key`]). Only the runners and the bell's task of the node running on this
    /// thread touch it.
    static SLEEPING: std::cell::RefCell<std::collections::HashMap<usize, Box<dyn Wake>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The bell's task: wakes each sleeping service whose key comes (`Bell`). Runs on the
/// node's thread until the node ends.
pub(crate) async fn ring_sleepers(mut keys: tokio::sync::mpsc::UnboundedReceiver<usize>) {
    while let Some(key) = keys.recv().await {
        if let Some(sleeper) = SLEEPING.with(|s| s.borrow_mut().remove(&key)) {
            sleeper.wake();
        }
    }
}

/// The message loop: from `started`, or from a sleep (`resumed`, with the restart budget
/// it kept). (A plain function returning an `async move` block, for the
/// reason given at [`run_service`]; clippy's rewrite would undo it.)
#[allow(clippy::manual_async_fn)]
fn serve_loop<S: Service>(
    mut state: S,
    mut ctx: Ctx<S>,
    mailbox: Arc<Mailbox<S::Msg>>,
    mut arrived: Option<Arrived>,
    (mut restarts, resumed): (RestartBudget, bool),
) -> impl std::future::Future<Output = ()> {
    async move {
        // Nothing about panics is held across an await (each idle service's task keeps what
        // is): a panic is dealt with where it is caught (`recover`).
        if !resumed {
            if let Err(panic) = catch_panic(|| state.started(&mut ctx)) {
                if !recover(&mut state, &mut ctx, &mailbox, &mut restarts, (panic, None)) {
                    return;
                }
            }
        }
        let mut turn = 0u32;
        // When this turn's first look at the clock was (`TURN_US`).
        let mut turn_began: Option<std::time::Instant> = None;
        let mut paused = false;
        // The state being copied ahead for a move (`Service::PRECOPY`).
        let mut copying: Option<Box<Copying>> = None;
        loop {
            if ctx.me.node.halted.is_set() {
                // A halted node handles nothing more; its system is ending.
                return std::future::pending().await;
            }
            // A freeze waits for the message in hand, for the rest of a carried queue still
            // streaming in (its parked arrivals are not in the queue yet), and when draining, for
            // the queue to empty.
            if mailbox.freeze.load(std::sync::atomic::Ordering::Relaxed)
                && !mailbox.is_gated()
                && !(mailbox.len() > 0 && ctx.me.node.driver.drains(ctx.id()))
            {
                // A checkpoint in the data directory goes before the service may: once the
                // move commits, a restart here must not bring this copy back.
                if S::REPLICAS > 0 {
                    ctx.me.node.store_forget(ctx.id());
                }
                // Boxed: a freeze is rare, and every runner's future would make room for it.
                if Box::pin(freeze(&mut state, &mut ctx, &mailbox, copying.take())).await {
                    // Moved away: the target runs it now. No `stopped`: it did not stop.
                    if S::REPLICAS > 0 {
                        ctx.me.node.replica_left(ctx.id());
                    }
                    return;
                }
                if S::REPLICAS > 0 {
                    // Still here: its checkpoint goes back on disk (and to a standby) soon.
                    ctx.me.node.replicas.stayed(ctx.id());
                }
                continue;
            }
            // Copying ahead goes on between messages (after the freeze check: at the freeze,
            // the last message's changes go in `finish`).
            if S::PRECOPY.is_some() {
                precopy_turn(&mut state, &ctx, &mailbox, &mut copying);
            }
            // A replicated copy that another node continues at a newer epoch hands what it holds
            // on to that node and ends, with nothing confirmed: that node confirms what it
            // handles. One that a standby may hold a checkpoint of handles nothing without its
            // standby's lease (the standby may be about to take it over): it still sends
            // checkpoints (the first to a new standby), and looks again when a lease is granted
            // or a checkpoint acknowledged.
            if S::REPLICAS > 0 {
                match ctx.me.node.replicas.gate(ctx.id()) {
                    Gate::Serve => {}
                    Gate::Retire(to, epoch) => {
                        // As a move's source at its commit: from now on what arrives is handed
                        // back with the new place, and a tombstone stays.
                        let id = ctx.id();
                        let left = mailbox.retire(to.clone(), epoch);
                        ctx.me.node.replica_retired(id, &to, epoch);
                        ctx.me.node.hand_on(
                            id,
                            &to,
                            left.queue.into_iter().chain(left.early).collect(),
                        );
                        ctx.me.node.send_skips(id, &to, &left.skipped, 0);
                        let copy: Arc<dyn crate::mailbox::Slot> = mailbox.clone();
                        ctx.me.node.forget_moved(id, &copy);
                        return;
                    }
                    Gate::Wait if mailbox.is_closed() => {}
                    Gate::Wait => {
                        let woken = ctx.me.node.replicas.changed.notified();
                        if !paused {
                            paused = true;
                            ctx.me.node.stats.replica_pauses.inc();
                            tracing::info!(service = %ctx.id(), "replica paused: no lease");
                        }
                        checkpoint(&state, &ctx);
                        // Boxed: a `Sleep` is large, and every runner's future would make room
                        // for it.
                        Box::pin(async {
                            tokio::select! {
                                _ = woken => {}
                                _ = tokio::time::sleep(PAUSED_LOOK) => {}
                            }
                        })
                        .await;
                        continue;
                    }
                }
            }
            paused = false;
            // A due timer goes before the next queued message.
            // (The clock is read only when a timer is pending.)
            let due = if ctx.timers.len() == 0 {
                None
            } else {
                ctx.timers.pop_due(tokio::time::Instant::now())
            };
            // Who sent the message in hand, so that a panic can fail it to its sender.
            let mut in_hand: Option<Envelope<()>> = None;
            {
                // In a block: nothing of it is kept across the awaits below.
                let (repeats, woke) = mailbox.take_repeats();
                if woke {
                    // Marks for a node that sent copies again may wait (`Mailbox::marked_again`).
                    ctx.me.node.handled_pending(ctx.id());
                }
                if !repeats.is_empty() {
                    ctx.answer_repeats(repeats);
                }
            }
            let next = match due {
                Some(msg) => Some(msg),
                None => {
                    let (env, newly_dirty) = mailbox.pop_noting();
                    if newly_dirty {
                        ctx.me.node.handled_pending(ctx.id());
                    }
                    match env {
                        Some(env) => {
                            ctx.received = ctx.received.wrapping_add(1);
                            if u64::from(ctx.received) % SIZE_SAMPLE_EVERY == 1 {
                                if let Some(from) = env.from {
                                    sample_size(&ctx.me.node, from, ctx.me.id(), &env.msg);
                                }
                            }
                            let Envelope {
                                from,
                                seq,
                                ask,
                                origin,
                                msg,
                            } = env;
                            if let (Some(f), Some(a)) = (from, &ask) {
                                ctx.taking_ask(f, seq, a.clone());
                            }
                            in_hand = Some(Envelope {
                                from,
                                seq,
                                ask,
                                origin,
                                msg: (),
                            });
                            Some(msg)
                        }
                        None => None,
                    }
                }
            };
            // The freeze ends when the copy handles its next message, or has nothing to handle
            // with every carried message in: the source learns how long after the start that was.
            if arrived.is_some() && (next.is_some() || !mailbox.is_gated()) {
                if let Some(a) = arrived.take() {
                    let after_start_us = a.at.elapsed().as_micros() as u64;
                    ctx.me
                        .node
                        .driver
                        .serving(&ctx.me.node, &a.source, a.mig, after_start_us);
                }
            }
            match next {
                Some(msg) => {
                    mailbox.active();
                    let handled = {
                        let fut = std::pin::pin!(state.handle(msg, &mut ctx));
                        CatchPanic(fut).await
                    };
                    if let Err(panic) = handled {
                        if recover(
                            &mut state,
                            &mut ctx,
                            &mailbox,
                            &mut restarts,
                            (panic, in_hand),
                        ) {
                            if let Some(c) = copying.take() {
                                // The fresh state is not what was copied ahead.
                                c.abandon(&ctx.me.node, ctx.id(), "the service restarted");
                            }
                            continue;
                        }
                        return;
                    }
                    ctx.me.node.stats.processed.inc();
                    mailbox.note_timers(ctx.timers.len());
                    if S::REPLICAS > 0 {
                        let from = in_hand
                            .as_ref()
                            .and_then(|e| e.from.map(|f| (f, e.seq, e.origin.clone())));
                        if ctx.me.node.replicas.handled(ctx.id(), from) {
                            checkpoint(&state, &ctx);
                        }
                    }
                    if ctx.stop {
                        break;
                    }
                    if let Some(m) = ctx.migrate_to.take() {
                        let (to, opts, done) = *m;
                        ctx.me.node.migrate_detached(ctx.id(), to, opts, done);
                    }
                    turn += 1;
                    if turn % TURN_LOOK_EVERY == 0 {
                        if turn >= MARKS_EVERY {
                            turn = 0;
                            ctx.me.node.flush_handled(ctx.id());
                        }
                        let now = std::time::Instant::now();
                        match turn_began {
                            None => turn_began = Some(now),
                            Some(began) if now.duration_since(began) >= TURN => {
                                turn_began = None;
                                tokio::task::yield_now().await;
                            }
                            Some(_) => {}
                        }
                    }
                }
                None if mailbox.is_closed() => break,
                None => {
                    // Idle: the next message begins a new turn.
                    turn_began = None;
                    // A replicated service's checkpoint may fall due while it waits.
                    let replica_at = if S::REPLICAS > 0 {
                        checkpoint(&state, &ctx);
                        ctx.me
                            .node
                            .replicas
                            .due_at(ctx.id())
                            .map(|d| tokio::time::Instant::now() + d)
                    } else {
                        None
                    };
                    let at = match (ctx.timers.next_due(), replica_at) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    match (at, copying.as_ref().filter(|c| c.wants_room())) {
                        (at, Some(c)) => Box::pin(idle_copying(&mailbox, c, at)).await,
                        // Boxed, as above.
                        (Some(at), None) => Box::pin(ready_or_due(&mailbox, at)).await,
                        (None, None) => {
                            // Idle for a while, with nothing that needs a task (no timer, no
                            // copy, not replicated, its start seen): it sleeps.
                            if mailbox.sleep_asked()
                                && S::REPLICAS == 0
                                && copying.is_none()
                                && arrived.is_none()
                                && mailbox.try_sleep()
                            {
                                ctx.me.node.stats.services_slept.inc();
                                let key = sleep_key(&mailbox);
                                let sleeper: Box<dyn Wake> =
                                    Box::new(Sleeper::new(state, ctx, mailbox, restarts));
                                SLEEPING.with(|s| s.borrow_mut().insert(key, sleeper));
                                return;
                            }
                            mailbox.wait_ready().await;
                        }
                    }
                }
            }
        }
        let stopped = catch_panic(|| state.stopped(&mut ctx));
        let rest = mailbox.close();
        match stopped {
            Ok(()) => {
                let id = ctx.id();
                sender_stopped(&ctx);
                ctx.me
                    .node
                    .service_stopped(id, rest, DeliveryError::Stopped { id });
            }
            Err(panic) => {
                let detail = panic_message(&*panic);
                report_panic(&ctx, &detail, rest, None);
            }
        }
    }
}

/// A caught panic, and the message that was in hand when it happened (none in `started`).
type Caught = (Box<dyn Any + Send>, Option<Envelope<()>>);

/// A handler (or `started`) panicked: under the kind's [`Restart`] policy the state is
/// replaced with a fresh one (whose `started` may panic too, and is dealt with the same way);
/// past it, or without one, the service stops. True when the service runs on.
fn recover<S: Service>(
    state: &mut S,
    ctx: &mut Ctx<S>,
    mailbox: &Mailbox<S::Msg>,
    restarts: &mut RestartBudget,
    (mut panic, mut in_hand): Caught,
) -> bool {
    loop {
        let Some(fresh) = restarts.take::<S>() else {
            panicked(ctx, mailbox, in_hand, panic);
            return false;
        };
        restarted(ctx, in_hand, &*panic);
        *state = fresh;
        match catch_panic(|| state.started(ctx)) {
            Ok(()) => return true,
            Err(again) => (panic, in_hand) = (again, None),
        }
    }
}

/// Runs a synchronous hook (`started`, `stopped`), catching a panic.
/// A handler's future (pinned by the caller), polled so that a panic in it comes out as an
/// `Err`: the node's thread and the other services go on. One `catch_unwind` per poll, inlined
/// into the runner (measured cheaper than a `poll_fn` closure around it).
struct CatchPanic<'a, F>(std::pin::Pin<&'a mut F>);

impl<F: std::future::Future<Output = ()>> std::future::Future for CatchPanic<'_, F> {
    type Output = Result<(), Box<dyn Any + Send>>;

    #[inline(always)]
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let fut = self.get_mut().0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(Poll::Ready(())) => Poll::Ready(Ok(())),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

fn catch_panic(f: impl FnOnce()) -> Result<(), Box<dyn Any + Send>> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
}

/// The text of a panic's payload (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".to_string()
    }
}

/// A handler (or `started`) panicked: the service stops for good. Its state may be half
/// changed, so neither `stopped` nor any other handler runs on it again. The message in hand
/// and everything queued fail to their senders and askers with `ServicePanicked`.
fn panicked<S: Service>(
    ctx: &Ctx<S>,
    mailbox: &Mailbox<S::Msg>,
    in_hand: Option<Envelope<()>>,
    panic: Box<dyn Any + Send>,
) {
    let detail = panic_message(&*panic);
    let rest = mailbox.close();
    report_panic(ctx, &detail, rest, in_hand);
}

/// A panic the kind's [`Restart`] policy absorbs: the message in hand fails, pending timers go
/// (they belong to the state that panicked), and the loop goes on with a fresh state.
fn restarted<S: Service>(
    ctx: &mut Ctx<S>,
    in_hand: Option<Envelope<()>>,
    panic: &(dyn Any + Send),
) {
    let id = ctx.id();
    let detail = panic_message(panic);
    tracing::warn!(service = %id, kind = S::KIND, panic = %detail, "handler panicked; service restarted");
    ctx.me.node.logs.event(
        "restarted",
        format!(
            "service {id} ({}) restarted with a fresh state: its handler panicked: {detail}",
            S::kind_key()
        ),
    );
    ctx.me.node.stats.services_restarted.inc();
    ctx.timers.clear();
    ctx.stop = false;
    if let Some(m) = ctx.migrate_to.take() {
        let (to, _, done) = *m;
        done(Err(NotMoved {
            reports: Vec::new(),
            refused: vec![(
                id,
                format!("its handler panicked before it could move to {to}"),
            )],
        }));
    }
    if let Some(env) = in_hand {
        let reason = DeliveryError::ServicePanicked { id, detail };
        ctx.me.node.refuse_envelope_quiet(id, env.refusal(reason));
    }
}

fn report_panic<S: Service, M>(
    ctx: &Ctx<S>,
    detail: &str,
    rest: Vec<Envelope<M>>,
    in_hand: Option<Envelope<()>>,
) {
    let id = ctx.id();
    tracing::error!(service = %id, kind = S::KIND, panic = detail, "handler panicked; service stopped");
    ctx.me.node.logs.event(
        "panicked",
        format!(
            "service {id} ({}) stopped: its handler panicked: {detail}; {} queued messages failed to their senders",
            S::kind_key(),
            rest.len()
        ),
    );
    let reason = DeliveryError::ServicePanicked {
        id,
        detail: detail.to_string(),
    };
    if let Some(env) = in_hand {
        ctx.me
            .node
            .refuse_envelope_quiet(id, env.refusal(reason.clone()));
    }
    sender_stopped(ctx);
    ctx.me.node.service_stopped(id, rest, reason);
    // Counted once the service is gone from the node's table: whoever sees the count sees it
    // gone too.
    ctx.me.node.stats.services_panicked.inc();
}

/// The service stopped for good: each service it sent to hears its last number there, so
/// that its window for this one can go (`tern_proto::inbox::Inbox::close_sender`).
fn sender_stopped<S: Service>(ctx: &Ctx<S>) {
    let sent: Vec<(ServiceId, u64)> = sent_numbers()
        .into_iter()
        .filter(|(_, last)| *last > 0)
        .collect();
    if !sent.is_empty() {
        ctx.me.node.sender_stopped(ctx.id(), &sent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct GaugeV1(u64);
    #[derive(Serialize, Deserialize)]
    enum GaugeMsgV1 {
        Set(u64),
    }

    /// Version 2 writes version 1 and reads it; `Split` has no version-1 form.
    #[derive(Serialize, Deserialize)]
    struct Gauge {
        value: u64,
    }
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum GaugeMsg {
        Set { value: u64 },
        Split,
    }

    impl Service for Gauge {
        type Msg = GaugeMsg;
        const KIND: &'static str = "gauge";
        const VERSION: u32 = 2;
        const UPGRADES: &'static [Upgrade<Self>] = &[Upgrade {
            from: 1,
            state: |b| read_older::<GaugeV1>(b).map(|g| Gauge { value: g.0 }),
            msg: |b| match read_older(b)? {
                GaugeMsgV1::Set(value) => Ok(GaugeMsg::Set { value }),
            },
        }];
        const DOWNGRADES: &'static [Downgrade<Self>] = &[Downgrade {
            to: 1,
            state: |g| write_older(&GaugeV1(g.value)),
            msg: |m| match m {
                GaugeMsg::Set { value } => write_older(&GaugeMsgV1::Set(*value)),
                GaugeMsg::Split => Err("version 1 cannot split".into()),
            },
        }];
        async fn handle(&mut self, _: GaugeMsg, _: &mut Ctx<Self>) {}
    }

    /// The same kind, replicated: its downgrades are ignored.
    #[derive(Serialize, Deserialize)]
    struct Replicated;
    impl Service for Replicated {
        type Msg = GaugeMsg;
        const KIND: &'static str = "gauge";
        const VERSION: u32 = 2;
        const REPLICAS: u8 = 1;
        const DOWNGRADES: &'static [Downgrade<Self>] = &[Downgrade {
            to: 1,
            state: |_| write_older(&GaugeV1(0)),
            msg: |_| write_older(&GaugeMsgV1::Set(0)),
        }];
        async fn handle(&mut self, _: GaugeMsg, _: &mut Ctx<Self>) {}
    }

    #[test]
    fn a_tombstone_writes_what_it_forwards_as_the_older_version_or_says_why_not() {
        let v2 = write_plain(&GaugeMsg::Set { value: 7 }).unwrap();
        let v1 = write_plain(&GaugeMsgV1::Set(7)).unwrap();
        // Written in version 2, for version 1: converted.
        assert_eq!(rewrite_msg::<Gauge>(2, &v2, 1).unwrap(), v1);
        // Written by an older sender in version 1: as it is.
        assert_eq!(rewrite_msg::<Gauge>(1, &v1, 1).unwrap(), v1);
        // What version 1 cannot hold, and a version nothing here writes, are refused.
        let split = write_plain(&GaugeMsg::Split).unwrap();
        let err = rewrite_msg::<Gauge>(2, &split, 1).unwrap_err();
        assert!(err.contains("version 1 cannot split"), "{err}");
        assert!(rewrite_msg::<Gauge>(2, &v2, 0)
            .unwrap_err()
            .contains("no downgrade to version 0"));
        assert_eq!(writes_versions::<Gauge>(), vec![1]);
        // A replicated kind writes no older version.
        assert!(downgrade_to::<Replicated>(1).is_none());
        assert!(writes_versions::<Replicated>().is_empty());
    }

    #[test]
    fn bytes_of_an_unknown_writer_are_read_in_any_version_the_kind_reads() {
        let v1 = write_plain(&GaugeMsgV1::Set(3)).unwrap();
        // Not a version-2 message...
        assert!(read_older::<GaugeMsg>(&v1).is_err());
        // ...but read through the upgrade from version 1.
        assert_eq!(
            read_msg_any::<Gauge>(&v1).unwrap(),
            GaugeMsg::Set { value: 3 }
        );
        let v2 = write_plain(&GaugeMsg::Split).unwrap();
        assert_eq!(read_msg_any::<Gauge>(&v2).unwrap(), GaugeMsg::Split);
        assert!(read_msg_any::<Gauge>(&[0xc1]).is_err());
    }
}
