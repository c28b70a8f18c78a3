//! Replicated services: the same remote tells to a replicated sink (`REPLICAS = 1`, its
//! standby on a third node) and to a plain one, interleaved in the same run, and the bytes of
//! checkpoint sent per message. What is measured is what the node runs today: checkpoints to
//! the standby and confirmations held until they are acknowledged. The senders' retained
//! copies and leases are not built yet; they will cost more.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tern::{Ctx, Service, ServiceAddr};
use tern_harness::{wait_for, Cluster};

use crate::remote::{PayloadCount, PayloadMsg, PAYLOAD_BYTES};
use crate::util::{median, progress, round2, Latch, Scale};

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

async fn send_all<T: Service<Msg = PayloadMsg>>(
    ctx: &mut Ctx<Sender>,
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
            SenderMsg::Plain { to, total } => send_all::<PlainSink>(ctx, to, total).await,
            SenderMsg::Replicated { to, total } => send_all::<ReplicatedSink>(ctx, to, total).await,
        }
    }
}

pub fn run(scale: &Scale) -> Result<Value> {
    let cluster = Cluster::builder()
        .node("rep-a", &[])
        .node("rep-b", &[])
        .node("rep-c", &[])
        .setup(|n| {
            n.register::<PlainSink>()
                .register::<ReplicatedSink>()
                .register::<Sender>();
        })
        .start()?;
    cluster.wait_members(Duration::from_secs(10))?;
    let (a, b) = (cluster.node("rep-a"), cluster.node("rep-b"));
    let plain = b.spawn(PlainSink::default())?;
    let replicated = b.spawn(ReplicatedSink::default())?;
    wait_for(
        Duration::from_secs(10),
        "the replicated sink's standby",
        || b.replica(replicated.id()).is_some_and(|r| r.acked >= 1),
    )?;
    let sender = a.spawn(Sender)?;
    let total = scale.remote_msgs / 4;
    let (mut plain_runs, mut rep_runs) = (Vec::new(), Vec::new());
    let (mut ckpt_bytes, mut ckpts, mut rep_msgs) = (0u64, 0u64, 0u64);
    // A warm-up of each, then the two interleaved, run by run.
    for i in 0..=scale.repeats {
        let n = if i == 0 { total / 10 } else { total };
        for replicated_run in [false, true] {
            DONE.reset();
            let before = b.stats();
            // The target lands before timing starts.
            let ask = if replicated_run {
                replicated.tell(PayloadMsg::Target(n))?;
                SenderMsg::Replicated {
                    to: replicated.addr().clone(),
                    total: n,
                }
            } else {
                plain.tell(PayloadMsg::Target(n))?;
                SenderMsg::Plain {
                    to: plain.addr().clone(),
                    total: n,
                }
            };
            std::thread::sleep(Duration::from_millis(20));
            let t0 = Instant::now();
            sender.tell(ask)?;
            let end = DONE.wait(Duration::from_secs(120), "replicated bench tells")?;
            let rate = n as f64 / (end - t0).as_secs_f64();
            if i == 0 {
                continue;
            }
            if replicated_run {
                let after = b.stats();
                ckpt_bytes += after.checkpoint_bytes - before.checkpoint_bytes;
                ckpts += after.checkpoints_sent - before.checkpoints_sent;
                rep_msgs += n;
                progress(&format!("replicated run {i}: {rate:.0} msgs/s"));
                rep_runs.push(rate);
            } else {
                progress(&format!("plain run {i}: {rate:.0} msgs/s"));
                plain_runs.push(rate);
            }
        }
    }
    if ckpts == 0 {
        bail!("the replicated sink sent no checkpoint");
    }
    let ratio = median(
        rep_runs
            .iter()
            .zip(&plain_runs)
            .map(|(r, p)| r / p)
            .collect(),
    );
    let out = json!({
        "payload_bytes": PAYLOAD_BYTES,
        "plain_msgs_per_s": median(plain_runs).round(),
        "replicated_msgs_per_s": median(rep_runs).round(),
        "replicated_to_plain_ratio": round2(ratio),
        "checkpoints_per_1000_msgs": round2(ckpts as f64 * 1000.0 / rep_msgs as f64),
        "checkpoint_bytes_per_msg": round2(ckpt_bytes as f64 / rep_msgs as f64),
        "messages_per_run": total,
    });
    cluster.shutdown();
    Ok(out)
}
