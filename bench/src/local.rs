//! Local tells: a Tern service feeding another on one node, against plain actix actors doing
//! the same work on one thread; and the memory of idle services.

use std::time::{Duration, Instant};

use actix::prelude::*;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tern::certs::ClusterCa;
use tern::{Ctx, Limits, Node, NodeConfig, ReplyTo, Service, ServiceAddr, ServiceRef};

use crate::util::{median, progress, resident_bytes, round2, Latch, Scale};

static LOCAL_DONE: Latch = Latch::new();
/// Messages sent between two yields of the driver, in both systems.
const BATCH: u64 = 1_000;

/// Adds what it is sent; signals when it has seen `target` messages.
#[derive(Default, Serialize, Deserialize)]
pub struct Sum {
    sum: u64,
    count: u64,
    target: u64,
}

#[derive(Serialize, Deserialize)]
pub enum SumMsg {
    Target(u64),
    Add(u64),
}

impl Sum {
    fn add(&mut self, x: u64) {
        self.sum = self.sum.wrapping_add(x);
        self.count += 1;
        if self.count == self.target {
            LOCAL_DONE.signal();
        }
    }
}

impl Service for Sum {
    type Msg = SumMsg;
    const KIND: &'static str = "bench-sum";
    const VERSION: u32 = 1;
    async fn handle(&mut self, msg: SumMsg, _ctx: &mut Ctx<Self>) {
        match msg {
            SumMsg::Target(t) => {
                self.count = 0;
                self.target = t;
            }
            SumMsg::Add(x) => self.add(x),
        }
    }
}

/// Sends `total` messages to a Sum, yielding every `BATCH`.
#[derive(Default, Serialize, Deserialize)]
pub struct Driver;

#[derive(Serialize, Deserialize)]
pub enum DriverMsg {
    Run { to: ServiceAddr, total: u64 },
}

impl Service for Driver {
    type Msg = DriverMsg;
    const KIND: &'static str = "bench-driver";
    const VERSION: u32 = 1;
    async fn handle(&mut self, msg: DriverMsg, ctx: &mut Ctx<Self>) {
        let DriverMsg::Run { to, total } = msg;
        let Ok(sum) = ctx.book_ref::<Sum>("sum").or_else(|_| {
            let _ = ctx.book_insert("sum", to);
            ctx.book_ref::<Sum>("sum")
        }) else {
            eprintln!("tern-bench: driver cannot reach the sum service");
            return;
        };
        for i in 0..total {
            if ctx.tell_wait(&sum, SumMsg::Add(i)).await.is_err() {
                eprintln!("tern-bench: driver send failed");
                return;
            }
            if i % BATCH == BATCH - 1 {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// A service that does nothing, for measuring what an idle service costs.
#[derive(Default, Serialize, Deserialize)]
pub struct Idle {
    n: u64,
}

#[derive(Serialize, Deserialize)]
pub enum IdleMsg {
    Ping(ReplyTo<u64>),
}

impl Service for Idle {
    type Msg = IdleMsg;
    const KIND: &'static str = "bench-idle";
    const VERSION: u32 = 1;
    async fn handle(&mut self, msg: IdleMsg, ctx: &mut Ctx<Self>) {
        let IdleMsg::Ping(r) = msg;
        self.n += 1;
        let _ = ctx.reply(r, self.n);
    }
}

// The actix baseline: the same consumer as a plain actix actor.
struct ActixSum {
    sum: u64,
    count: u64,
    target: u64,
}

impl Actor for ActixSum {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "()")]
struct ActixAdd(u64);

impl Handler<ActixAdd> for ActixSum {
    type Result = ();
    fn handle(&mut self, msg: ActixAdd, _: &mut Self::Context) {
        self.sum = self.sum.wrapping_add(msg.0);
        self.count += 1;
        if self.count == self.target {
            LOCAL_DONE.signal();
        }
    }
}

fn actix_once(total: u64) -> Result<f64> {
    LOCAL_DONE.reset();
    let sys = actix_rt::System::new();
    let t0 = Instant::now();
    sys.block_on(async move {
        let addr = ActixSum {
            sum: 0,
            count: 0,
            target: total,
        }
        .start();
        for i in 0..total {
            addr.do_send(ActixAdd(i));
            if i % BATCH == BATCH - 1 {
                tokio::task::yield_now().await;
            }
        }
        // Let the actor drain on this thread.
        while !LOCAL_DONE.is_done() {
            tokio::task::yield_now().await;
        }
    });
    let end = LOCAL_DONE.wait(Duration::from_secs(60), "actix local run")?;
    Ok(total as f64 / (end - t0).as_secs_f64())
}

fn tern_once(driver: &ServiceRef<Driver>, sum: &ServiceRef<Sum>, total: u64) -> Result<f64> {
    LOCAL_DONE.reset();
    sum.tell(SumMsg::Target(total))?;
    let t0 = Instant::now();
    driver.tell(DriverMsg::Run {
        to: sum.addr().clone(),
        total,
    })?;
    let end = LOCAL_DONE.wait(Duration::from_secs(60), "tern local run")?;
    Ok(total as f64 / (end - t0).as_secs_f64())
}

pub fn run(scale: &Scale) -> Result<Value> {
    let ca = ClusterCa::new()?;
    let mut cfg = NodeConfig::new(ca.issue("bench-local")?, "127.0.0.1:0".parse()?);
    cfg.limits = Limits {
        services_max: 2 * scale.idle_services as usize + 16,
        ..Limits::default()
    };
    let node = Node::start(cfg)?;
    node.register::<Sum>()
        .register::<Driver>()
        .register::<Idle>();
    let sum = node.spawn(Sum::default())?;
    let driver = node.spawn(Driver)?;

    let mut tern_runs = Vec::new();
    let mut actix_runs = Vec::new();
    let mut peer_runs: Vec<f64> = Vec::new();
    // Warm all up once, then alternate so drift affects all alike.
    tern_once(&driver, &sum, scale.local_msgs / 10)?;
    actix_once(scale.local_msgs / 10)?;
    kameo_once(scale.local_msgs / 10)?;
    for r in 0..scale.repeats {
        let t = tern_once(&driver, &sum, scale.local_msgs)?;
        let a = actix_once(scale.local_msgs)?;
        let k = kameo_once(scale.local_msgs)?;
        progress(&format!(
            "local run {}: tern {:.0} msgs/s, actix {:.0} msgs/s{}",
            r + 1,
            t,
            a,
            k.map(|k| format!(", kameo {k:.0} msgs/s"))
                .unwrap_or_default()
        ));
        tern_runs.push(t);
        actix_runs.push(a);
        peer_runs.extend(k);
    }
    let kameo = crate::util::peer_figures(&tern_runs, peer_runs);
    // Each tern run is paired with the actix run right after it; the ratio is the median of the
    // pairs' ratios, which cancels slow shifts of machine speed that a ratio of medians mixes.
    let overhead_ratio = crate::util::median_ratio(&actix_runs, &tern_runs);
    let tern_rate = median(tern_runs);
    let actix_rate = median(actix_runs);

    let live = node.stats().services_live;
    node.shutdown();

    // Idle services, each figure in a fresh process of this binary (`FOOTPRINT_ARG`): what
    // the runs above freed and left in the allocator would otherwise be reused and hide.
    let awake = footprint_child("awake", scale.idle_services)?;
    let asleep = footprint_child("asleep", scale.idle_services)?;
    let idle_bytes = awake.bytes_per_service;
    progress(&format!(
        "{} idle services: {} bytes resident each awake, {} asleep",
        scale.idle_services, awake.bytes_per_service, asleep.bytes_per_service
    ));

    let mut out = json!({
        "tern_tell_msgs_per_s": tern_rate.round(),
        "actix_tell_msgs_per_s": actix_rate.round(),
        "overhead_ratio": round2(overhead_ratio),
        "idle_service_bytes": idle_bytes,
        "idle_service_heap_bytes": awake.heap_bytes_per_service,
        "asleep_service_bytes": asleep.bytes_per_service,
        "asleep_service_heap_bytes": asleep.heap_bytes_per_service,
        "asleep_batch": SLEEP_BATCH,
        "services_asleep_at_measure": asleep.asleep,
        "idle_services": scale.idle_services,
        "services_live_at_measure": live,
        "messages_per_run": scale.local_msgs,
        "runs": scale.repeats,
    });
    if let (Some(map), Some((rate, ratio))) = (out.as_object_mut(), kameo) {
        map.insert("kameo_tell_msgs_per_s".into(), json!(rate.round()));
        map.insert("tern_to_kameo_ratio".into(), json!(round2(ratio)));
    }
    Ok(out)
}

/// One kameo run, when the bench is built with the `peers` feature.
fn kameo_once(total: u64) -> Result<Option<f64>> {
    #[cfg(feature = "peers")]
    return crate::peers::kameo_local(total).map(Some);
    #[cfg(not(feature = "peers"))]
    {
        let _ = total;
        Ok(None)
    }
}

/// The first argument that makes this binary measure the footprint of idle services and print
/// it as one JSON object: `tern-bench --footprint-probe awake|asleep N`.
pub const FOOTPRINT_ARG: &str = "--footprint-probe";

/// Services spawned at a time when measuring sleeping ones: each batch is let fall asleep
/// before the next, as on a node whose services went idle at different times. The last
/// batch's ended tasks stay in the allocator and count in the figure.
const SLEEP_BATCH: u64 = 1_000;

/// What a footprint probe measured.
#[derive(Deserialize)]
struct Footprint {
    /// Resident bytes: what the process holds, the allocator's free gaps included.
    bytes_per_service: u64,
    /// Bytes the allocator has handed out and not had back, its own headers included.
    heap_bytes_per_service: Option<u64>,
    asleep: u64,
}

/// Bytes the C allocator has handed out and not had back (`mallinfo2`'s ordinary and mmapped
/// blocks in use), where the allocator is glibc's.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn heap_in_use() -> Option<u64> {
    #[repr(C)]
    struct Mallinfo2 {
        arena: usize,
        ordblks: usize,
        smblks: usize,
        hblks: usize,
        hblkhd: usize,
        usmblks: usize,
        fsmblks: usize,
        uordblks: usize,
        fordblks: usize,
        keepcost: usize,
    }
    extern "C" {
        fn mallinfo2() -> Mallinfo2;
    }
    // SAFETY: glibc's mallinfo2 takes nothing and returns a plain struct by value.
    let m = unsafe { mallinfo2() };
    Some((m.uordblks + m.hblkhd) as u64)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn heap_in_use() -> Option<u64> {
    None
}

/// Runs a footprint probe in a fresh process of this binary.
fn footprint_child(mode: &str, services: u64) -> Result<Footprint> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([FOOTPRINT_ARG, mode, &services.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "the {mode} footprint probe failed: {}",
        out.status
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The footprint probe: resident bytes per idle service, awake (their tasks waiting for a
/// message) or asleep (`Limits::sleep_after_idle_ms`), printed as one JSON object.
pub fn footprint_main(mode: &str, services: &str) -> Result<()> {
    let services: u64 = services.parse()?;
    anyhow::ensure!(services > 0, "the probe needs at least one service");
    let asleep_mode = match mode {
        "awake" => false,
        "asleep" => true,
        other => anyhow::bail!("the footprint probe measures awake or asleep, not {other:?}"),
    };
    let ca = ClusterCa::new()?;
    let mut cfg = NodeConfig::new(ca.issue("bench-footprint")?, "127.0.0.1:0".parse()?);
    cfg.limits = Limits {
        services_max: services as usize + 16,
        sleep_after_idle_ms: if asleep_mode { 10 } else { 0 },
        ..Limits::default()
    };
    let node = Node::start(cfg)?;
    node.register::<Idle>();
    let sys = actix_rt::System::new();
    // One service first, so the node's own first allocations are not counted.
    let first = node.spawn(Idle::default())?;
    sys.block_on(first.ask(IdleMsg::Ping, Duration::from_secs(60)))?;
    let before = resident_bytes()?;
    let heap_before = heap_in_use();
    let batch = if asleep_mode { SLEEP_BATCH } else { services };
    let mut spawned = 0;
    while spawned < services {
        let n = batch.min(services - spawned);
        let mut last = None;
        for _ in 0..n {
            last = Some(node.spawn(Idle::default())?);
        }
        spawned += n;
        if let Some(last) = last {
            // The arbiter runs spawns in order: once the last one answers, all are running.
            sys.block_on(last.ask(IdleMsg::Ping, Duration::from_secs(60)))?;
        }
        if asleep_mode {
            // All of them, the first included, asleep before the next batch.
            let deadline = Instant::now() + Duration::from_secs(60);
            while node.stats().services_asleep < spawned + 1 {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{} of {} services fell asleep within 60 s",
                    node.stats().services_asleep,
                    spawned + 1
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    let after = resident_bytes()?;
    let heap = heap_before
        .zip(heap_in_use())
        .map(|(b, a)| a.saturating_sub(b) / services);
    let asleep = node.stats().services_asleep;
    node.shutdown();
    println!(
        "{}",
        json!({
            "bytes_per_service": after.saturating_sub(before) / services,
            "heap_bytes_per_service": heap,
            "asleep": asleep,
        })
    );
    Ok(())
}
