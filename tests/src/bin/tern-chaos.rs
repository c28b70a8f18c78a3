//! tern-chaos: migrations at random through random network faults, checked end to end.
//!
//! `cargo run --release -p tern-harness --bin tern-chaos -- --nodes 5 --migrations 1000 --seed 7 --json`
//!
//! Every node hosts a sequence-checking sink and a sender per sink. The runner migrates sinks
//! to random nodes one after another while the senders stream numbered tells and asks, and
//! between migrations injects faults at random on the nodes' sockets: datagram loss, delay
//! with jitter (reordering), and short cuts between two nodes, one way or both. At the end the
//! network is healed, every sender's messages are awaited, and each sink reports what it got.
//! It prints one JSON object; the exit status is non-zero if any invariant broke: a message
//! lost, duplicated or reordered, a failed sender, or two instances of one sink handling
//! messages (one started after the other and the older one handled something again).
//!
//! Node kills are not injected yet: what a node's death costs is not defined yet, so
//! `lost_reported` is 0 by construction and `lost` must be 0.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tern::{AbortReason, Ctx, Limits, MigrateOptions, ReplyTo, Service, ServiceId, ServiceRef};
use tern_actors::SenderReport;
use tern_harness::{block_on, Cluster};

/// Which instance of each sink handled a message last, and the instances it replaced.
#[derive(Default)]
struct Live {
    current: u64,
    replaced: HashSet<u64>,
    max_live: usize,
}

fn live() -> &'static Mutex<HashMap<ServiceId, Live>> {
    static LIVE: OnceLock<Mutex<HashMap<ServiceId, Live>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(HashMap::new()))
}

static INSTANCES: AtomicU64 = AtomicU64::new(1);

/// A sink counting each sender's numbers; every running instance has its own token.
#[derive(Default, Serialize, Deserialize)]
struct Sink {
    senders: BTreeMap<String, SenderReport>,
    #[serde(skip)]
    instance: u64,
}

#[derive(Serialize, Deserialize)]
enum SinkMsg {
    Record {
        sender: String,
        seq: u64,
    },
    RecordAsk {
        sender: String,
        seq: u64,
        reply: ReplyTo<u64>,
    },
    Report(ReplyTo<BTreeMap<String, SenderReport>>),
}

impl Sink {
    fn handled_by_me(&self, id: ServiceId) {
        let mut all = live().lock().unwrap_or_else(|p| p.into_inner());
        let l = all.entry(id).or_default();
        if l.current == self.instance {
            l.max_live = l.max_live.max(1);
            return;
        }
        if l.replaced.contains(&self.instance) {
            // An instance that a newer one had replaced handled a message again.
            l.max_live = 2;
            return;
        }
        let old = l.current;
        l.replaced.insert(old);
        l.current = self.instance;
        l.max_live = l.max_live.max(1);
    }
}

impl Service for Sink {
    type Msg = SinkMsg;
    const KIND: &'static str = "chaos-sink";
    const VERSION: u32 = 1;

    fn started(&mut self, _ctx: &mut Ctx<Self>) {
        self.instance = INSTANCES.fetch_add(1, Ordering::Relaxed);
    }

    async fn handle(&mut self, msg: SinkMsg, ctx: &mut Ctx<Self>) {
        self.handled_by_me(ctx.id());
        match msg {
            SinkMsg::Record { sender, seq } => self.senders.entry(sender).or_default().record(seq),
            SinkMsg::RecordAsk { sender, seq, reply } => {
                self.senders.entry(sender).or_default().record(seq);
                let _ = ctx.reply(reply, seq);
            }
            SinkMsg::Report(reply) => {
                let _ = ctx.reply(reply, self.senders.clone());
            }
        }
    }
}

/// Sends numbered tells and asks to the sink in its book.
#[derive(Serialize, Deserialize)]
struct Sender {
    name: String,
    next: u64,
    failed: u64,
}

#[derive(Serialize, Deserialize)]
enum SenderMsg {
    Send {
        tells: u64,
        asks: u64,
    },
    /// (numbers sent and accepted, failures)
    Progress(ReplyTo<(u64, u64)>),
}

impl Service for Sender {
    type Msg = SenderMsg;
    const KIND: &'static str = "chaos-sender";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: SenderMsg, ctx: &mut Ctx<Self>) {
        match msg {
            SenderMsg::Send { tells, asks } => {
                let Ok(sink) = ctx.book_ref::<Sink>("sink") else {
                    self.failed += tells + asks;
                    return;
                };
                for _ in 0..tells {
                    let m = SinkMsg::Record {
                        sender: self.name.clone(),
                        seq: self.next + 1,
                    };
                    match ctx.tell_wait(&sink, m).await {
                        Ok(()) => self.next += 1,
                        Err(_) => self.failed += 1,
                    }
                }
                for _ in 0..asks {
                    let (sender, seq) = (self.name.clone(), self.next + 1);
                    let res = ctx
                        .ask(
                            &sink,
                            |reply| SinkMsg::RecordAsk { sender, seq, reply },
                            Duration::from_secs(60),
                        )
                        .await;
                    match res {
                        Ok(echo) if echo == seq => self.next += 1,
                        _ => self.failed += 1,
                    }
                }
            }
            SenderMsg::Progress(reply) => {
                let _ = ctx.reply(reply, (self.next, self.failed));
            }
        }
    }
}

struct Args {
    nodes: usize,
    migrations: usize,
    seed: u64,
    json: bool,
    faults: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        nodes: 5,
        migrations: 1000,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
        json: false,
        faults: true,
    };
    let mut it = std::env::args().skip(1);
    fn num(it: &mut impl Iterator<Item = String>, name: &str) -> Result<u64> {
        let v = it.next().with_context(|| format!("{name} needs a value"))?;
        v.parse::<u64>().with_context(|| format!("{name} {v:?}"))
    }
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--nodes" => a.nodes = num(&mut it, "--nodes")? as usize,
            "--migrations" => a.migrations = num(&mut it, "--migrations")? as usize,
            "--seed" => a.seed = num(&mut it, "--seed")?,
            "--json" => a.json = true,
            "--no-faults" => a.faults = false,
            other => bail!(
                "unknown argument {other:?}; usage: tern-chaos [--nodes N] [--migrations N] [--seed N] [--json] [--no-faults]"
            ),
        }
    }
    if !(2..=26).contains(&a.nodes) {
        bail!("--nodes must be 2 to 26");
    }
    Ok(a)
}

/// The run's own random choices (not the sockets'), from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() -> ExitCode {
    match run() {
        Ok((out, ok)) => {
            println!("{out}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("tern-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(String, bool)> {
    let a = args()?;
    let started = Instant::now();
    let names: Vec<String> = (0..a.nodes)
        .map(|i| ((b'a' + i as u8) as char).to_string())
        .collect();
    let mut builder = Cluster::builder();
    for n in &names {
        builder = builder.node(n, &[]);
    }
    let limits = Limits {
        migration_deadline_ms: 3_000,
        ..Limits::default()
    };
    let c = builder
        .limits(limits)
        .faults(a.seed)
        .setup(|n| {
            n.register::<Sink>().register::<Sender>();
        })
        .start()?;
    c.wait_connected(Duration::from_secs(20))?;
    eprintln!("tern-chaos: seed {} ({} nodes)", a.seed, a.nodes);

    // A sink on every node, and on every node a sender to every sink.
    let mut sinks: Vec<ServiceRef<Sink>> = Vec::new();
    for n in &names {
        sinks.push(c.node(n).spawn(Sink::default())?);
    }
    let mut senders = Vec::new();
    for n in &names {
        let node = c.node(n);
        for (j, sink) in sinks.iter().enumerate() {
            let name = format!("{n}->{j}");
            let s = node.spawn(Sender {
                name: name.clone(),
                next: 0,
                failed: 0,
            })?;
            node.book_insert(s.addr(), "sink", sink.addr())?;
            senders.push((name, s));
        }
    }

    let mut rng = Rng(a.seed ^ 0x5eed);
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let mut aborted: BTreeMap<String, u64> = BTreeMap::new();
    let (mut committed, mut freeze) = (0u64, Vec::new());
    block_on(async {
        for step in 0..a.migrations {
            // Keep every sender busy.
            if step % 4 == 0 {
                for (_, s) in &senders {
                    s.tell(SenderMsg::Send { tells: 20, asks: 1 })?;
                }
            }
            if a.faults {
                match rng.below(10) {
                    0 => {
                        let n = &names[rng.below(a.nodes)];
                        c.faults(n).drop_rate((rng.below(6) as f64) / 100.0);
                        *faults.entry("loss").or_default() += 1;
                    }
                    1 => {
                        let n = &names[rng.below(a.nodes)];
                        c.faults(n).delay(
                            Duration::from_micros(rng.below(2_000) as u64),
                            Duration::from_micros(rng.below(3_000) as u64),
                        );
                        *faults.entry("delay").or_default() += 1;
                    }
                    2 => {
                        let x = rng.below(a.nodes);
                        let y = (x + 1 + rng.below(a.nodes - 1)) % a.nodes;
                        let both = rng.below(2) == 0;
                        let (fx, fy) = (c.faults(&names[x]).clone(), c.faults(&names[y]).clone());
                        let (ax, ay) = (
                            c.node(&names[x]).local_addr(),
                            c.node(&names[y]).local_addr(),
                        );
                        fx.cut(ay);
                        if both {
                            fy.cut(ax);
                        }
                        // Healed on a timer of its own, whatever the run is waiting for.
                        let lasts = Duration::from_millis(50 + rng.below(400) as u64);
                        actix_rt::spawn(async move {
                            tokio::time::sleep(lasts).await;
                            fx.heal(ay);
                            fy.heal(ax);
                        });
                        *faults
                            .entry(if both { "cut" } else { "cut-one-way" })
                            .or_default() += 1;
                    }
                    _ => {}
                }
            }
            let sink = &sinks[rng.below(sinks.len())];
            // Another node than the one the handle last knew: rarely the same node, then an
            // abort that is not counted.
            let here = sink.location();
            let others: Vec<&String> = names
                .iter()
                .filter(|n| n.as_str() != here.as_str())
                .collect();
            let to = others[rng.below(others.len())];
            let report = sink.migrate(to, MigrateOptions::default()).await?;
            match &report.aborted {
                None => {
                    committed += 1;
                    freeze.push(report.freeze_us);
                }
                Some(AbortReason::SameNode) => {}
                Some(r) => *aborted.entry(r.label().to_owned()).or_default() += 1,
            }
        }
        // A clean network for the end of the run.
        for n in &names {
            c.faults(n).clear();
        }
        Ok::<_, anyhow::Error>(())
    })?;

    // Wait for every sender to finish, then ask every sink.
    let (expected, failed_senders) = block_on(async {
        let mut expected: BTreeMap<String, u64> = BTreeMap::new();
        let mut failed = 0u64;
        for (name, s) in &senders {
            let mut last = (u64::MAX, 0);
            loop {
                let p = s.ask(SenderMsg::Progress, Duration::from_secs(120)).await?;
                if p == last {
                    break;
                }
                last = p;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            expected.insert(name.clone(), last.0);
            failed += last.1;
        }
        Ok::<_, anyhow::Error>((expected, failed))
    })?;
    let (mut sent, mut processed, mut lost, mut duplicated, mut reordered) = (0, 0, 0, 0, 0);
    block_on(async {
        for (j, sink) in sinks.iter().enumerate() {
            let got = sink.ask(SinkMsg::Report, Duration::from_secs(120)).await?;
            for (name, want) in expected
                .iter()
                .filter(|(n, _)| n.ends_with(&format!("->{j}")))
            {
                let r = got.get(name).cloned().unwrap_or_default();
                sent += want;
                processed += r.received;
                // Everything up to what the sender counted as sent must be there.
                let seen_below = r.next.saturating_sub(1).min(*want);
                let missing_below = r.missing.iter().filter(|s| **s <= *want).count() as u64;
                lost += want - seen_below + missing_below + r.missing_overflow;
                duplicated += r.duplicated;
                reordered += r.reordered;
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let max_live = live()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .map(|l| l.max_live)
        .max()
        .unwrap_or(0);
    c.shutdown();

    freeze.sort_unstable();
    let ok = lost == 0
        && duplicated == 0
        && reordered == 0
        && failed_senders == 0
        && max_live <= 1
        && processed == sent;
    let out = json!({
        "seed": a.seed,
        "nodes": a.nodes,
        "migrations_asked": a.migrations,
        "migrations_committed": committed,
        "migrations_aborted": aborted,
        "faults_injected": faults,
        "node_kills": 0,
        "messages_sent": sent,
        "messages_processed": processed,
        "sender_failures": failed_senders,
        "lost": lost,
        "duplicated": duplicated,
        "reordered": reordered,
        "lost_reported": 0,
        "freeze_us_p50": percentile(&freeze, 0.5),
        "freeze_us_p99": percentile(&freeze, 0.99),
        "max_live_instances": max_live,
        "seconds": started.elapsed().as_secs_f64(),
        "ok": ok,
    });
    let text = if a.json {
        serde_json::to_string(&out)?
    } else {
        serde_json::to_string_pretty(&out)?
    };
    Ok((text, ok))
}
