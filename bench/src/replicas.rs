//! Replicated services: the same remote tells to a replicated sink (`REPLICAS = 1`, its
//! standby on a third node), to the same sink on a node with a data directory (each
//! checkpoint also written to its redb file, senders confirmed once it is there) and to a
//! plain one, and from a replicated sender (its node keeping a copy of each tell until the
//! sink takes it) to the plain sink, interleaved in the same run, and the bytes of
//! checkpoint sent per message (with everything the node runs for it: checkpoints,
//! confirmations held until acknowledged, the senders' kept copies, leases). Then failover:
//! the time from the abrupt death of the primary's node to the first message the standby's
//! promoted copy handles, and what the lease costs an idle node in bytes. And the freeze of a
//! replicated service's move (its standby fenced first) against a plain one's.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tern::{Ctx, Service, ServiceAddr};
use tern_harness::{wait_for, Cluster};

use crate::remote::{PayloadCount, PayloadMsg, PAYLOAD_BYTES};
use crate::util::{median, median_ratio, progress, round2, Latch, Scale};

static DONE: Latch = Latch::new();

/// The plain sink.
#[derive(Default, Serialize, Deserialize)]
struct PlainSink(PayloadCount);

impl Service for PlainSink {
    type Msg = PayloadMsg;
    const KIND: &'static str = "bench-plain-sink";
    const VERSION: u32 = 1;
    async fn handle(&mut self, msg: PayloadMsg, _ctx: &mut Ctx<Self>) {
        self.0.take(msg, &DONE);
    }
}

/// The same sink, replicated.
#[derive(Default, Serialize, Deserialize)]
struct ReplicatedSink(PayloadCount);

impl Service for ReplicatedSink {
    type Msg = PayloadMsg;
    const KIND: &'static str = "bench-replicated-sink";
    const VERSION: u32 = 1;
    const REPLICAS: u8 = 1;
    async fn handle(&mut self, msg: PayloadMsg, _ctx: &mut Ctx<Self>) {
        self.0.take(msg, &DONE);
    }
}

/// Sends `total` payloads to the sink it is given, as a service (numbered, waiting for room).
#[derive(Default, Serialize, Deserialize)]
struct Sender;

#[derive(Serialize, Deserialize)]
enum SenderMsg {
    Plain { to: ServiceAddr, total: u64 },
    Replicated { to: ServiceAddr, total: u64 },
}

/// Which sink a run sends to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sink {
    Plain,
    Replicated,
    Durable,
    /// The plain sink, from the replicated sender.
    FromReplicated,
}

async fn send_all<S: Service, T: Service<Msg = PayloadMsg>>(
    ctx: &mut Ctx<S>,
    to: ServiceAddr,
    total: u64,
) {
    let _ = ctx.book_insert("sink", to);
    let sink = match ctx.book_ref::<T>("sink") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tern-bench: sender cannot reach the sink: {e}");
            return;
        }
    };
    let payload = vec![7u8; PAYLOAD_BYTES];
    for _ in 0..total {
        if let Err(e) = ctx
            .tell_wait(&sink, PayloadMsg::Payload(payload.clone()))
            .await
        {
            eprintln!("tern-bench: tell failed: {e}");
            return;
        }
    }
}

impl Service for Sender {
    type Msg = SenderMsg;
    const KIND: &'static str = "bench-replica-sender";
    const VERSION: u32 = 1;
    async fn handle(&mut self, msg: SenderMsg, ctx: &mut Ctx<Self>) {
        match msg {
            SenderMsg::Plain { to, total } => send_all::<Sender, PlainSink>(ctx, to, total).await,
            SenderMsg::Replicated { to, total } => {
                send_all::<Sender, ReplicatedSink>(ctx, to, total).await
            }
        }
    }
}

/// The same sender, replicated: its node keeps a copy of each tell until the sink is seen to
/// take it, for its checkpoints to carry.
#[derive(Default, Serialize, Deserialize)]
struct ReplicatedSender;

impl Service for ReplicatedSender {
    type Msg = SenderMsg;
    const KIND: &'static str = "bench-replicated-sender";
    const VERSION: u32 = 1;
    const REPLICAS: u8 = 1;
    async fn handle(&mut self, msg: SenderMsg, ctx: &mut Ctx<Self>) {
        if let SenderMsg::Plain { to, total } = msg {
            send_all::<ReplicatedSender, PlainSink>(ctx, to, total).await
        }
    }
}

pub fn run(scale: &Scale) -> Result<Value> {
    let data_dir = std::env::temp_dir().join(format!("tern-bench-data-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    let result = run_in(scale, &data_dir);
    let _ = std::fs::remove_dir_all(&data_dir);
    result
}

fn run_in(scale: &Scale, data_dir: &std::path::Path) -> Result<Value> {
    let cluster = Cluster::builder()
        .node("rep-a", &[])
        .node("rep-b", &[])
        .node("rep-c", &[])
        .node("rep-d", &[])
        .node_data_dir("rep-d", data_dir)
        .setup(|n| {
            n.register::<PlainSink>()
                .register::<ReplicatedSink>()
                .register::<Sender>()
                .register::<ReplicatedSender>();
        })
        .start()?;
    cluster.wait_members(Duration::from_secs(10))?;
    let (a, b, d) = (
        cluster.node("rep-a"),
        cluster.node("rep-b"),
        cluster.node("rep-d"),
    );
    let plain = b.spawn(PlainSink::default())?;
    let replicated = b.spawn(ReplicatedSink::default())?;
    let durable = d.spawn(ReplicatedSink::default())?;
    wait_for(
        Duration::from_secs(10),
        "the replicated sinks' standbys",
        || {
            b.replica(replicated.id()).is_some_and(|r| r.acked >= 1)
                && d.replica(durable.id()).is_some_and(|r| r.acked >= 1)
        },
    )?;
    let sender = a.spawn(Sender)?;
    let rep_sender = a.spawn(ReplicatedSender)?;
    wait_for(
        Duration::from_secs(10),
        "the replicated sender's standby",
        || a.replica(rep_sender.id()).is_some_and(|r| r.acked >= 1),
    )?;
    let total = scale.remote_msgs / 4;
    let (mut plain_runs, mut rep_runs, mut durable_runs) = (Vec::new(), Vec::new(), Vec::new());
    let mut from_rep_runs = Vec::new();
    let (mut ckpt_bytes, mut ckpts, mut rep_msgs) = (0u64, 0u64, 0u64);
    // A warm-up of each, then the three interleaved, run by run.
    for i in 0..=scale.repeats {
        let n = if i == 0 { total / 10 } else { total };
        for sink in [
            Sink::Plain,
            Sink::Replicated,
            Sink::Durable,
            Sink::FromReplicated,
        ] {
            DONE.reset();
            let before = b.stats();
            // The target lands before timing starts.
            let ask = match sink {
                Sink::Plain => {
                    plain.tell(PayloadMsg::Target(n))?;
                    SenderMsg::Plain {
                        to: plain.addr().clone(),
                        total: n,
                    }
                }
                Sink::Replicated => {
                    replicated.tell(PayloadMsg::Target(n))?;
                    SenderMsg::Replicated {
                        to: replicated.addr().clone(),
                        total: n,
                    }
                }
                Sink::Durable => {
                    durable.tell(PayloadMsg::Target(n))?;
                    SenderMsg::Replicated {
                        to: durable.addr().clone(),
                        total: n,
                    }
                }
                Sink::FromReplicated => {
                    plain.tell(PayloadMsg::Target(n))?;
                    SenderMsg::Plain {
                        to: plain.addr().clone(),
                        total: n,
                    }
                }
            };
            std::thread::sleep(Duration::from_millis(20));
            let t0 = Instant::now();
            if sink == Sink::FromReplicated {
                rep_sender.tell(ask)?;
            } else {
                sender.tell(ask)?;
            }
            let end = DONE.wait(Duration::from_secs(120), "replicated bench tells")?;
            let rate = n as f64 / (end - t0).as_secs_f64();
            if i == 0 {
                continue;
            }
            match sink {
                Sink::Replicated => {
                    let after = b.stats();
                    ckpt_bytes += after.checkpoint_bytes - before.checkpoint_bytes;
                    ckpts += after.checkpoints_sent - before.checkpoints_sent;
                    rep_msgs += n;
                    progress(&format!("replicated run {i}: {rate:.0} msgs/s"));
                    rep_runs.push(rate);
                }
                Sink::Durable => {
                    progress(&format!(
                        "replicated, data directory, run {i}: {rate:.0} msgs/s"
                    ));
                    durable_runs.push(rate);
                }
                Sink::Plain => {
                    progress(&format!("plain run {i}: {rate:.0} msgs/s"));
                    plain_runs.push(rate);
                }
                Sink::FromReplicated => {
                    progress(&format!(
                        "from a replicated sender, run {i}: {rate:.0} msgs/s"
                    ));
                    from_rep_runs.push(rate);
                }
            }
        }
    }
    let durable_ratio = median_ratio(&durable_runs, &plain_runs);
    let stored = d.stored_checkpoints()?.len();
    if ckpts == 0 {
        bail!("the replicated sink sent no checkpoint");
    }
    let ratio = median_ratio(&rep_runs, &plain_runs);
    let from_rep_ratio = median_ratio(&from_rep_runs, &plain_runs);
    let out = json!({
        "payload_bytes": PAYLOAD_BYTES,
        "plain_msgs_per_s": median(plain_runs).round(),
        "replicated_msgs_per_s": median(rep_runs).round(),
        "replicated_to_plain_ratio": round2(ratio),
        "checkpoints_per_1000_msgs": round2(ckpts as f64 * 1000.0 / rep_msgs as f64),
        "checkpoint_bytes_per_msg": round2(ckpt_bytes as f64 / rep_msgs as f64),
        "durable_msgs_per_s": median(durable_runs).round(),
        "durable_to_plain_ratio": round2(durable_ratio),
        "durable_checkpoints_stored": stored,
        "from_replicated_sender_msgs_per_s": median(from_rep_runs).round(),
        "from_replicated_sender_to_plain_ratio": round2(from_rep_ratio),
        "messages_per_run": total,
    });
    let moves = move_freezes(&cluster, &plain, &replicated, scale)?;
    let mut out = out;
    out["moves"] = moves;
    cluster.shutdown();
    let failover = failover(scale)?;
    out["failover"] = failover;
    Ok(out)
}

/// The freeze of a move of the plain sink and of the replicated one, back and forth between
/// `rep-b` and `rep-c`, interleaved. The replicated sink moves only once its standby holds a
/// checkpoint, so each of its moves first fences that standby (one more round trip in the
/// freeze) and its target then starts without a standby.
fn move_freezes(
    cluster: &Cluster,
    plain: &tern::ServiceRef<PlainSink>,
    replicated: &tern::ServiceRef<ReplicatedSink>,
    scale: &Scale,
) -> Result<Value> {
    let (mut plain_us, mut rep_us) = (Vec::new(), Vec::new());
    let runs = (scale.repeats * 4).max(4);
    for i in 0..runs {
        let to = if i % 2 == 0 { "rep-c" } else { "rep-b" };
        let report = block_on(plain.migrate(to, tern::MigrateOptions::default()))?;
        plain_us.push(report.freeze_us);
        wait_for(
            Duration::from_secs(10),
            "a standby holds a checkpoint",
            || {
                let at = replicated.location();
                cluster
                    .node(at.as_str())
                    .replica(replicated.id())
                    .is_some_and(|r| r.acked >= 1)
            },
        )?;
        let report = block_on(replicated.migrate(to, tern::MigrateOptions::default()))?;
        rep_us.push(report.freeze_us);
    }
    progress(&format!(
        "move freezes: plain {plain_us:?} us, replicated {rep_us:?} us"
    ));
    let (plain_p50, _) = crate::util::percentiles(plain_us.clone());
    let (rep_p50, _) = crate::util::percentiles(rep_us.clone());
    Ok(json!({
        "runs": runs,
        "plain_freeze_us_p50": plain_p50,
        "replicated_freeze_us_p50": rep_p50,
        "replicated_to_plain_freeze_p50_ratio": round2(rep_p50 as f64 / plain_p50.max(1) as f64),
    }))
}

/// When the promoted copy first handled a message (set by [`Watched`] on the standby).
static FIRST_ON_STANDBY: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);

/// A replicated service that notes when a copy on `fo-b` first handles something.
#[derive(Default, Serialize, Deserialize)]
struct Watched {
    handled: u64,
}

impl Service for Watched {
    type Msg = u64;
    const KIND: &'static str = "bench-watched";
    const VERSION: u32 = 1;
    const REPLICAS: u8 = 1;
    async fn handle(&mut self, _msg: u64, ctx: &mut Ctx<Self>) {
        self.handled += 1;
        if ctx.node_name().as_str() == "fo-b" {
            let mut first = FIRST_ON_STANDBY.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(Instant::now);
        }
    }
}

/// Kills the primary's node while a sender on a third node tells it every millisecond, and
/// times the first message handled by the standby's promoted copy; `scale.repeats` runs, each
/// on a fresh cluster. Also the bytes a node sends in 3 s with one idle replicated service
/// against none (the lease's renewals and grants, and the standby in gossip).
fn failover(scale: &Scale) -> Result<Value> {
    let settings = tern_proto::replica::Settings::default();
    let mut times_ms = Vec::new();
    let mut idle_extra = Vec::new();
    for run in 0..scale.repeats.max(1) {
        let cluster = Cluster::builder()
            .node("fo-a", &[])
            .node("fo-b", &[])
            .node("fo-c", &[])
            .faults(0xfa11 + run as u64)
            .setup(|n| {
                n.register::<Watched>();
            })
            .start()?;
        cluster.wait_members(Duration::from_secs(10))?;
        let a = cluster.node("fo-a");
        // What the primary's node sends in a quiet window, without and with the service.
        let window = Duration::from_secs(3);
        let quiet = |n: &tern::NodeHandle| {
            let before = n.stats().bytes_out;
            std::thread::sleep(window);
            n.stats().bytes_out - before
        };
        let without = quiet(a);
        let svc = a.spawn(Watched::default())?;
        let id = svc.id();
        wait_for(
            Duration::from_secs(10),
            "the standby on fo-b, known to fo-c",
            || {
                a.replica(id).is_some_and(|r| {
                    r.acked >= 1 && r.standby.as_ref().is_some_and(|s| s.as_str() == "fo-b")
                }) && cluster
                    .node("fo-c")
                    .members()
                    .iter()
                    .any(|m| m.info.standbys.iter().any(|(s, _, _)| *s == id))
            },
        )?;
        let with = quiet(a);
        idle_extra.push(with as f64 - without as f64);
        let from = cluster.node("fo-c").resolve::<Watched>(svc.addr())?;
        for i in 0..100 {
            block_on(from.tell_wait(i))?;
        }
        *FIRST_ON_STANDBY.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let teller = {
            let (from, stop) = (from.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 1_000u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if from.tell(i).is_ok() {
                        i += 1;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let killed = Instant::now();
        cluster.kill("fo-a");
        let first = wait_for(Duration::from_secs(30), "the promoted copy handles", || {
            FIRST_ON_STANDBY
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
        });
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = teller.join();
        first?;
        let at = FIRST_ON_STANDBY
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or_else(Instant::now);
        let ms = (at - killed).as_secs_f64() * 1_000.0;
        progress(&format!("failover run {run}: {ms:.1} ms"));
        times_ms.push(ms);
        cluster.shutdown();
    }
    let max = times_ms.iter().copied().fold(0.0f64, f64::max);
    let detector_ms = settings.standby_wait_us() as f64 / 1_000.0;
    Ok(json!({
        "runs": times_ms.len(),
        "kill_to_first_handled_ms_p50": round2(median(times_ms.clone())),
        "kill_to_first_handled_ms_max": round2(max),
        "detector_wait_ms": round2(detector_ms),
        "lease_ms": settings.lease_ms,
        "renew_ms": settings.renew_ms,
        "goal_ms": round2(detector_ms + 100.0),
        "idle_bytes_per_s_one_replicated_service": round2(median(idle_extra) / 3.0),
    }))
}

/// Runs a future to completion on a fresh runtime (the harness's helper).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tern_harness::block_on(f)
}
