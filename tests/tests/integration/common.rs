//! Services used only by tests.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern::{Ctx, KindKey, NodeName, ReplyTo, Service, ServiceAddr, ServiceId};

/// Records the items it handles, in order; `Hold` keeps it busy for a while.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Slow {
    pub handled: Vec<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum SlowMsg {
    Hold {
        ms: u64,
    },
    Item(u64),
    Items(ReplyTo<Vec<u64>>),
    /// Handled fine where it was sent, but cannot be encoded to travel.
    Unsendable(Poison, ReplyTo<u64>),
}

/// A value whose serialization always fails.
#[derive(Debug)]
pub struct Poison;

impl Serialize for Poison {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this value cannot be encoded"))
    }
}

impl<'de> Deserialize<'de> for Poison {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <()>::deserialize(d).map(|()| Poison)
    }
}

impl Service for Slow {
    type Msg = SlowMsg;
    const KIND: &'static str = "test-slow";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: SlowMsg, ctx: &mut Ctx<Self>) {
        match msg {
            SlowMsg::Hold { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
            SlowMsg::Item(i) => self.handled.push(i),
            SlowMsg::Items(r) => {
                let _ = ctx.reply(r, self.handled.clone());
            }
            SlowMsg::Unsendable(_, r) => {
                let _ = ctx.reply(r, 0);
            }
        }
    }
}

/// Spawns children and reports what its context says about itself.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Parent {
    children: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ParentMsg {
    SpawnChild(ReplyTo<ServiceAddr>),
    WhoAmI(ReplyTo<(ServiceId, KindKey, NodeName)>),
}

impl Service for Parent {
    type Msg = ParentMsg;
    const KIND: &'static str = "test-parent";
    const VERSION: u32 = 3;

    async fn handle(&mut self, msg: ParentMsg, ctx: &mut Ctx<Self>) {
        match msg {
            ParentMsg::SpawnChild(r) => {
                let child = ctx
                    .spawn_child(tern_actors::KvStore::default())
                    .expect("kv is registered on every test node");
                self.children += 1;
                ctx.book_insert(&format!("child-{}", self.children), child.addr().clone())
                    .expect("book has room");
                let _ = ctx.reply(r, child.addr().clone());
            }
            ParentMsg::WhoAmI(r) => {
                let _ = ctx.reply(r, (ctx.id(), ctx.kind(), ctx.node_name().clone()));
            }
        }
    }
}

/// What every [`Tally`] handled, by tally name: outside any node, so it outlives a killed one.
static TALLIES: std::sync::Mutex<std::collections::BTreeMap<String, Vec<u64>>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The items tally `name` handled, in order, wherever it ran.
pub fn tally(name: &str) -> Vec<u64> {
    TALLIES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .cloned()
        .unwrap_or_default()
}

/// Like [`Slow`], but writes what it handles to [`TALLIES`] under its name.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Tally {
    pub name: String,
}

impl Service for Tally {
    type Msg = SlowMsg;
    const KIND: &'static str = "test-tally";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: SlowMsg, ctx: &mut Ctx<Self>) {
        match msg {
            SlowMsg::Hold { ms } => tokio::time::sleep(Duration::from_millis(ms)).await,
            SlowMsg::Item(i) => TALLIES
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(self.name.clone())
                .or_default()
                .push(i),
            SlowMsg::Items(r) => {
                let _ = ctx.reply(r, tally(&self.name));
            }
            SlowMsg::Unsendable(_, r) => {
                let _ = ctx.reply(r, 0);
            }
        }
    }
}

pub fn register_test_kinds(node: &tern::NodeHandle) {
    tern_actors::register_all(node);
    node.register::<Slow>()
        .register::<Parent>()
        .register::<Alarm>()
        .register::<Tally>()
        .register::<Relay>()
        .register::<SpeakerRelay>()
        .register::<DisplayRelay>()
        .register::<Burst>();
}

/// Tells the [`tern_actors::SeqSink`] in its book under `"sink"` a burst of numbered messages
/// (as `name`), then stops for good.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Burst {
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum BurstMsg {
    /// Tell `count` messages, waiting for room, then stop.
    Go { count: u64 },
}

impl Service for Burst {
    type Msg = BurstMsg;
    const KIND: &'static str = "test-burst";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: BurstMsg, ctx: &mut Ctx<Self>) {
        let BurstMsg::Go { count } = msg;
        match ctx.book_ref::<tern_actors::SeqSink>("sink") {
            Ok(sink) => {
                for seq in 1..=count {
                    let m = tern_actors::SinkMsg::Record {
                        sender: self.name.clone(),
                        seq,
                    };
                    if let Err(e) = ctx.tell_wait(&sink, m).await {
                        tracing::warn!(error = %e, "burst tell failed");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "no sink in book"),
        }
        ctx.stop();
    }
}

pub const SECS_10: Duration = Duration::from_secs(10);

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sets alarms for itself and records where and how late each rang (wall clock, so the
/// lateness is measured the same on every node of the process).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Alarm {
    due_ms: Vec<(u32, u64)>,
    fired: Vec<(u32, NodeName, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum AlarmMsg {
    Set {
        after_ms: u64,
        tag: u32,
    },
    /// Like `Set`, with a timer message carrying `pad_bytes` bytes.
    SetPadded {
        after_ms: u64,
        tag: u32,
        pad_bytes: usize,
    },
    Ring {
        tag: u32,
    },
    RingPadded {
        tag: u32,
        pad: Vec<u8>,
    },
    Fired(ReplyTo<Vec<(u32, NodeName, u64)>>),
}

impl Service for Alarm {
    type Msg = AlarmMsg;
    const KIND: &'static str = "test-alarm";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: AlarmMsg, ctx: &mut Ctx<Self>) {
        match msg {
            AlarmMsg::Set { after_ms, tag } => {
                self.due_ms.push((tag, unix_ms() + after_ms));
                ctx.schedule(Duration::from_millis(after_ms), AlarmMsg::Ring { tag })
                    .expect("one timer fits");
            }
            AlarmMsg::SetPadded {
                after_ms,
                tag,
                pad_bytes,
            } => {
                self.due_ms.push((tag, unix_ms() + after_ms));
                let ring = AlarmMsg::RingPadded {
                    tag,
                    pad: vec![0; pad_bytes],
                };
                ctx.schedule(Duration::from_millis(after_ms), ring)
                    .expect("one timer fits");
            }
            AlarmMsg::Ring { tag } | AlarmMsg::RingPadded { tag, .. } => {
                let due = self
                    .due_ms
                    .iter()
                    .find(|(t, _)| *t == tag)
                    .map_or(0, |(_, d)| *d);
                let late = unix_ms().saturating_sub(due);
                self.fired.push((tag, ctx.node_name().clone(), late));
            }
            AlarmMsg::Fired(r) => {
                let _ = ctx.reply(r, self.fired.clone());
            }
        }
    }
}

/// An assembly-tree member: records each item under its name (in [`TALLIES`]) and passes it
/// on to each of its children (book roles `child:*`), so items flow down the tree.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Relay {
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum RelayMsg {
    Item(u64),
}

/// What every relay kind does with an item: record it, pass it to each child (children may
/// be of any relay kind; they all take [`RelayMsg`]).
async fn relay<S: Service<Msg = RelayMsg>>(name: &str, msg: RelayMsg, ctx: &mut Ctx<S>) {
    let RelayMsg::Item(i) = msg;
    TALLIES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(name.to_owned())
        .or_default()
        .push(i);
    for (role, addr) in ctx.book() {
        if !role.starts_with(tern::CHILD_ROLE_PREFIX) {
            continue;
        }
        let sent = match addr.kind.name.as_str() {
            "test-speaker-relay" => match ctx.book_ref::<SpeakerRelay>(&role) {
                Ok(c) => ctx.tell_wait(&c, RelayMsg::Item(i)).await,
                Err(e) => Err(e),
            },
            "test-display-relay" => match ctx.book_ref::<DisplayRelay>(&role) {
                Ok(c) => ctx.tell_wait(&c, RelayMsg::Item(i)).await,
                Err(e) => Err(e),
            },
            _ => match ctx.book_ref::<Relay>(&role) {
                Ok(c) => ctx.tell_wait(&c, RelayMsg::Item(i)).await,
                Err(e) => Err(e),
            },
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, to = %addr.id, "relay could not pass an item on");
        }
    }
}

impl Service for Relay {
    type Msg = RelayMsg;
    const KIND: &'static str = "test-relay";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: RelayMsg, ctx: &mut Ctx<Self>) {
        relay(&self.name, msg, ctx).await
    }
}

/// A relay that needs a speaker.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SpeakerRelay {
    pub name: String,
}

impl Service for SpeakerRelay {
    type Msg = RelayMsg;
    const KIND: &'static str = "test-speaker-relay";
    const VERSION: u32 = 1;
    const REQUIRES: &'static [&'static str] = &["speaker"];

    async fn handle(&mut self, msg: RelayMsg, ctx: &mut Ctx<Self>) {
        relay(&self.name, msg, ctx).await
    }
}

/// A relay that needs a display.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DisplayRelay {
    pub name: String,
}

impl Service for DisplayRelay {
    type Msg = RelayMsg;
    const KIND: &'static str = "test-display-relay";
    const VERSION: u32 = 1;
    const REQUIRES: &'static [&'static str] = &["display"];

    async fn handle(&mut self, msg: RelayMsg, ctx: &mut Ctx<Self>) {
        relay(&self.name, msg, ctx).await
    }
}

/// `handle`'s service takes `item` and has then handled exactly `want`: honest traffic
/// still flows, in order.
pub fn takes_in_order(
    handle: &tern::ServiceRef<Slow>,
    item: u64,
    want: &[u64],
) -> anyhow::Result<()> {
    let handled = tern_harness::block_on(async {
        handle.tell_wait(SlowMsg::Item(item)).await?;
        Ok::<_, anyhow::Error>(handle.ask(SlowMsg::Items, SECS_10).await?)
    })?;
    assert_eq!(handled, want);
    Ok(())
}

/// The usual cluster: nodes `names` with the test kinds, every pair connected.
pub fn connected(names: &[&str]) -> anyhow::Result<tern_harness::Cluster> {
    connected_with(names, tern::Limits::default())
}

/// [`connected`], every node with `limits`.
pub fn connected_with(
    names: &[&str],
    limits: tern::Limits,
) -> anyhow::Result<tern_harness::Cluster> {
    let c = names
        .iter()
        .fold(tern_harness::Cluster::builder(), |b, n| b.node(n, &[]))
        .limits(limits)
        .setup(register_test_kinds)
        .start()?;
    c.wait_connected(SECS_10)?;
    Ok(c)
}

/// Limits under which a killed node is noticed in well under a second.
pub fn quick_to_notice() -> tern::Limits {
    tern::Limits {
        idle_timeout_ms: 600,
        keep_alive_ms: 150,
        migration_deadline_ms: 1_000,
        prepared_orphan_ms: 2_500,
        // Every report kept: the checks read them all back.
        losses_max: 100_000,
        ..tern::Limits::default()
    }
}

/// A connected cluster of `names` with the test kinds, on fault-injecting sockets (so nodes
/// can be cut and killed) and [`quick_to_notice`] limits.
pub fn killable_cluster(names: &[&str]) -> anyhow::Result<tern_harness::Cluster> {
    killable_cluster_with(names, |b| b)
}

/// [`killable_cluster`], with more set on the builder.
pub fn killable_cluster_with(
    names: &[&str],
    more: impl FnOnce(tern_harness::ClusterBuilder) -> tern_harness::ClusterBuilder,
) -> anyhow::Result<tern_harness::Cluster> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let b = names
        .iter()
        .fold(tern_harness::Cluster::builder(), |b, n| b.node(n, &[]))
        .limits(quick_to_notice())
        .faults(seed)
        .setup(register_test_kinds);
    let c = more(b).start()?;
    c.wait_connected(SECS_10)?;
    Ok(c)
}

/// The report of a move that was to fail: the test fails if it moved, or if the call failed
/// some other way than with the report ([`tern::Error::NotMoved`]).
pub fn not_moved(
    res: Result<tern::MigrationReport, tern::Error>,
) -> anyhow::Result<tern::MigrationReport> {
    match res {
        Err(tern::Error::NotMoved(n)) if n.reports.len() == 1 => Ok(n.reports[0].clone()),
        Ok(r) => anyhow::bail!("expected the move to fail, it moved: {r:?}"),
        Err(e) => anyhow::bail!("expected the report of a move that did not happen, got: {e}"),
    }
}

/// The member reports of a group move that was to fail (as [`not_moved`]).
pub fn group_not_moved(
    res: Result<tern::GroupReport, tern::Error>,
) -> anyhow::Result<Vec<tern::MigrationReport>> {
    match res {
        Err(tern::Error::NotMoved(n)) if !n.reports.is_empty() => Ok(n.reports),
        Ok(r) => anyhow::bail!("expected the group not to move, it moved: {r:?}"),
        Err(e) => anyhow::bail!("expected the reports of a group that did not move, got: {e}"),
    }
}
