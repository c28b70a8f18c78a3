//! Migration figures: freeze and total time by state size and queue length against what the
//! same bytes cost over a raw quinn stream; channel rebuild time; and a sink's count of lost,
//! duplicated and reordered messages over every run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tern::{Ctx, Limits, MigrateOptions, ReplyTo, Service, ServiceRef};
use tern_harness::{block_on, Cluster};

use crate::util::{percentiles, progress, Scale};

/// Opened by the bench once a case's queue is in place and its migration asked for.
static GATE: tokio::sync::Notify = tokio::sync::Notify::const_new();
/// True while a `Blob` waits at the gate.
static HOLDING: AtomicBool = AtomicBool::new(false);

/// A service whose state is `data`, checking that its numbered items arrive once and in order.
#[derive(Serialize, Deserialize)]
struct Blob {
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
    next: u64,
    got: u64,
    dup: u64,
    gaps: u64,
}

#[derive(Serialize, Deserialize)]
enum BlobMsg {
    /// Stay busy until the bench opens `GATE`, so what follows queues up.
    Hold,
    Item(u64),
    /// (received, duplicated, out of order)
    Check(ReplyTo<(u64, u64, u64)>),
}

impl Blob {
    fn new(state_bytes: usize) -> Self {
        Blob {
            data: vec![0x5a; state_bytes],
            next: 1,
            got: 0,
            dup: 0,
            gaps: 0,
        }
    }
}

impl Service for Blob {
    type Msg = BlobMsg;
    const KIND: &'static str = "bench-blob";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: BlobMsg, ctx: &mut Ctx<Self>) {
        match msg {
            BlobMsg::Hold => {
                HOLDING.store(true, Ordering::SeqCst);
                GATE.notified().await;
                HOLDING.store(false, Ordering::SeqCst);
            }
            BlobMsg::Item(i) => {
                self.got += 1;
                if i == self.next {
                    self.next += 1;
                } else if i < self.next {
                    self.dup += 1;
                } else {
                    self.gaps += 1;
                    self.next = i + 1;
                }
            }
            BlobMsg::Check(r) => {
                let _ = ctx.reply(r, (self.got, self.dup, self.gaps));
            }
        }
    }
}

/// Holds a book entry; does nothing else.
#[derive(Serialize, Deserialize)]
struct Holder;

impl Service for Holder {
    type Msg = ();
    const KIND: &'static str = "bench-holder";
    const VERSION: u32 = 1;

    async fn handle(&mut self, _: (), _: &mut Ctx<Self>) {}
}

const NODES: [&str; 3] = ["a", "b", "c"];
const QUEUED: u64 = 10_000;

fn cluster() -> Result<Cluster> {
    let limits = Limits {
        mailbox_capacity: 4 * QUEUED as usize,
        ..Limits::default()
    };
    let c = Cluster::builder()
        .node("a", &[])
        .node("b", &[])
        .node("c", &[])
        .limits(limits)
        .setup(|n| {
            n.register::<Blob>().register::<Holder>();
        })
        .start()?;
    c.wait_connected(Duration::from_secs(10))?;
    Ok(c)
}

#[derive(Default)]
struct Tally {
    sent: u64,
    got: u64,
    dup: u64,
    gaps: u64,
}

/// Migrates a `state_bytes` service back and forth `runs` times, `queued` messages waiting
/// each time. Returns (freeze_us, total_us) samples.
fn migrate_case(
    c: &Cluster,
    state_bytes: usize,
    queued: u64,
    runs: usize,
    tally: &mut Tally,
) -> Result<(Vec<u64>, Vec<u64>)> {
    let a = c.node("a");
    let blob = a.spawn(Blob::new(state_bytes))?;
    let (mut freeze, mut total) = (Vec::new(), Vec::new());
    let mut item = 0u64;
    block_on(async {
        for run in 0..runs {
            let (from, to) = if run % 2 == 0 { ("a", "b") } else { ("b", "a") };
            if queued > 0 {
                // Sent from the node that hosts it, so the queue is in place, not in flight,
                // when the migration is asked for.
                let here = c.node(from).resolve::<Blob>(blob.addr())?;
                here.tell(BlobMsg::Hold)?;
                while !HOLDING.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                for _ in 0..queued {
                    item += 1;
                    here.tell_wait(BlobMsg::Item(item)).await?;
                }
            }
            // The migration is asked for (the freeze waits for the message in hand), then the
            // service is let go: the whole queue is behind the freeze.
            let (report, ()) = tokio::join!(
                c.node(from)
                    .migrate(blob.id(), to, MigrateOptions::default()),
                async {
                    if queued > 0 {
                        tokio::task::yield_now().await;
                        GATE.notify_one();
                    }
                }
            );
            let report = report?;
            if !report.committed() {
                bail!("migration of {state_bytes} bytes did not commit: {report:?}");
            }
            if report.carried != queued {
                bail!(
                    "{} messages were carried, not the {queued} queued: {report:?}",
                    report.carried
                );
            }
            freeze.push(report.freeze_us);
            total.push(report.total_us);
        }
        // Everything sent is handled wherever the service ended up.
        let (got, dup, gaps) = loop {
            let r = blob.ask(BlobMsg::Check, Duration::from_secs(60)).await?;
            if r.0 >= item {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        tally.sent += item;
        tally.got += got;
        tally.dup += dup;
        tally.gaps += gaps;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok((freeze, total))
}

/// What the same bytes cost over a raw quinn stream: the state and `queued` messages
/// serialized, sent, received and deserialized, plus one raw round trip for the answer.
fn raw_limit(c: &Cluster, state_bytes: usize, queued: u64) -> Result<u64> {
    let sid = c.ca.issue("raw-server")?;
    let cid = c.ca.issue("raw-client")?;
    let (addr_tx, addr_rx) = mpsc::channel();
    let server = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let ep = crate::util::raw_endpoint(Some(tern::tls::server_config(&sid)?))?;
            addr_tx.send(ep.local_addr()?)?;
            let conn = ep.accept().await.context("no connection")?.await?;
            let (mut send, mut recv) = conn.accept_bi().await?;
            let bytes = recv.read_to_end(usize::MAX).await?;
            let (state, queue): (Blob, Vec<(u64, serde_bytes::ByteBuf)>) =
                rmp_serde::from_slice(&bytes)?;
            let msgs: Vec<BlobMsg> = queue
                .iter()
                .map(|(_, m)| rmp_serde::from_slice(m))
                .collect::<Result<_, _>>()?;
            std::hint::black_box((state.data.len(), msgs.len()));
            send.write_all(&[1]).await?;
            send.finish()?;
            let _ = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
            Ok::<_, anyhow::Error>(())
        })
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(10))?;
    let us = actix_rt::System::new().block_on(async move {
        let mut ep = crate::util::raw_endpoint(None)?;
        ep.set_default_client_config(tern::tls::client_config(&cid)?);
        let conn = ep.connect(addr, "raw-server")?.await?;
        let state = Blob::new(state_bytes);
        let t0 = Instant::now();
        let queue: Vec<(u64, serde_bytes::ByteBuf)> = (1..=queued)
            .map(|i| {
                Ok((
                    i,
                    serde_bytes::ByteBuf::from(rmp_serde::to_vec(&BlobMsg::Item(i))?),
                ))
            })
            .collect::<Result<_, rmp_serde::encode::Error>>()?;
        let bytes = rmp_serde::to_vec(&(&state, &queue))?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&bytes).await?;
        send.finish()?;
        let mut ack = [0u8; 1];
        recv.read_exact(&mut ack).await?;
        let us = t0.elapsed().as_micros() as u64;
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
        Ok::<_, anyhow::Error>(us)
    })?;
    server
        .join()
        .map_err(|_| anyhow!("raw server panicked"))??;
    Ok(us)
}

/// From the migrate call until every node has rewritten the books of `holders` services
/// spread over three nodes (an upper bound on commit-to-last-rewrite: it includes the freeze).
fn rebuild_case(c: &Cluster, holders: usize, runs: usize) -> Result<(Vec<u64>, Vec<u64>)> {
    let a = c.node("a");
    let sink = a.spawn(Blob::new(1024))?;
    let mut refs: Vec<ServiceRef<Holder>> = Vec::with_capacity(holders);
    for i in 0..holders {
        let node = c.node(NODES[i % 3]);
        let h = node.spawn(Holder)?;
        node.book_insert(h.addr(), "sink", sink.addr())?;
        refs.push(h);
    }
    tern_harness::wait_for(Duration::from_secs(30), "books everywhere", || {
        c.nodes()
            .iter()
            .all(|n| n.associations(sink.id()).held_by.len() == holders)
    })?;
    let (mut rebuild, mut freeze) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let (from, to) = if run % 2 == 0 { ("a", "b") } else { ("b", "a") };
        let before: Vec<u64> = c
            .nodes()
            .iter()
            .map(|n| n.migration_stats().rebuilt)
            .collect();
        let t0 = Instant::now();
        let report = block_on(
            c.node(from)
                .migrate(sink.id(), to, MigrateOptions::default()),
        )?;
        if !report.committed() {
            bail!("rebuild migration did not commit: {report:?}");
        }
        loop {
            let done = c
                .nodes()
                .iter()
                .zip(&before)
                .all(|(n, b)| n.migration_stats().rebuilt >= b + holders as u64);
            if done {
                break;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("books of {holders} holders not rebuilt within 30 s");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        rebuild.push(t0.elapsed().as_micros() as u64);
        freeze.push(report.freeze_us);
    }
    drop(refs);
    Ok((rebuild, freeze))
}

/// Drains node c holding `services` small services (a `Holder` each) to a and b: the drain's
/// wall time, and the moves' freeze and total times as its report gives them.
fn drain_case(services: usize) -> Result<Value> {
    // A cluster of its own: c holds these services and nothing else.
    let c = cluster()?;
    // Placement sees the other nodes (and the kinds they run) through gossip.
    c.wait_members(Duration::from_secs(10))?;
    let c_node = c.node("c");
    let mut refs: Vec<ServiceRef<Holder>> = Vec::with_capacity(services);
    for _ in 0..services {
        refs.push(c_node.spawn(Holder)?);
    }
    let t0 = Instant::now();
    let report = block_on(c_node.drain());
    let drain_us = t0.elapsed().as_micros() as u64;
    if !report.failed.is_empty() || report.moved.len() != services {
        bail!(
            "the drain moved {} of {services} services; failed: {:?}",
            report.moved.len(),
            report.failed.iter().take(3).collect::<Vec<_>>()
        );
    }
    let (freeze_p50, freeze_p99) = percentiles(report.moved.iter().map(|m| m.freeze_us).collect());
    let (total_p50, _) = percentiles(report.moved.iter().map(|m| m.total_us).collect());
    let sum_total_us: u64 = report.moved.iter().map(|m| m.total_us).sum();
    let mut moved_to: std::collections::BTreeMap<String, u64> = Default::default();
    for m in &report.moved {
        *moved_to.entry(m.to.to_string()).or_default() += 1;
    }
    drop(refs);
    c.shutdown();
    Ok(json!({
        "services": services,
        "drain_ms": drain_us as f64 / 1000.0,
        "per_service_us": drain_us / services as u64,
        "moves_freeze_us_p50": freeze_p50,
        "moves_freeze_us_p99": freeze_p99,
        "moves_total_us_p50": total_p50,
        "moves_total_us_sum_ms": sum_total_us as f64 / 1000.0,
        "moved_to": moved_to,
    }))
}

pub fn run(scale: &Scale) -> Result<Value> {
    let c = cluster()?;
    let quick = scale.repeats < 5 || scale.local_msgs < 10_000_000;
    let mut tally = Tally::default();
    let mut cases = Vec::new();
    // The small state's runs are cheap and its tail is a goal: enough runs that p99 is not
    // simply the slowest of a handful.
    for (state_bytes, runs) in [(1usize << 10, 200usize), (1 << 20, 10), (64 << 20, 3)] {
        let runs = match (quick, state_bytes) {
            (_, 1024) => runs,
            (true, _) => (runs / 4).max(2),
            (false, _) => runs,
        };
        for queued in [0u64, QUEUED] {
            progress(&format!(
                "migration: {state_bytes} bytes of state, {queued} queued, {runs} runs"
            ));
            let (freeze, total) = migrate_case(&c, state_bytes, queued, runs, &mut tally)?;
            let mut limits = Vec::new();
            for _ in 0..runs.min(3) {
                limits.push(raw_limit(&c, state_bytes, queued)?);
            }
            let (freeze_p50, freeze_p99) = percentiles(freeze);
            let (total_p50, _) = percentiles(total);
            let (limit_us, _) = percentiles(limits);
            cases.push(json!({
                "state_bytes": state_bytes,
                "queued": queued,
                "runs": runs,
                "freeze_us_p50": freeze_p50,
                "freeze_us_p99": freeze_p99,
                "total_us_p50": total_p50,
                "limit_us": limit_us,
            }));
        }
    }
    let mut rebuild = Vec::new();
    for holders in [10usize, 1000] {
        let runs = if quick { 3 } else { 7 };
        progress(&format!(
            "migration: rebuild of {holders} associations, {runs} runs"
        ));
        let (us, freeze) = rebuild_case(&c, holders, runs)?;
        let (p50, _) = percentiles(us);
        let (freeze_p50, _) = percentiles(freeze);
        rebuild.push(json!({
            "associations": holders,
            "runs": runs,
            "rebuild_us_p50": p50,
            "freeze_us_p50": freeze_p50,
        }));
    }
    c.shutdown();
    progress("migration: drain of a node holding 1,000 services");
    let drain = drain_case(1000)?;
    Ok(json!({
        "cases": cases,
        "rebuild": rebuild,
        "drain": drain,
        "lost": tally.sent.saturating_sub(tally.got - tally.dup),
        "duplicated": tally.dup,
        "reordered": tally.gaps,
        "messages": tally.sent,
    }))
}
