//! tern-chaos: migrations at random through random network faults and node kills, checked
//! end to end.
//!
//! `cargo run --release -p tern-harness --bin tern-chaos -- --nodes 5 --migrations 1000 --seed 7 --json`
//!
//! Every node hosts a sequence-checking sink, an assembly tree of three sinks (a root and two
//! children), and a sender per sink. The runner migrates lone sinks, and one time in three a
//! whole tree (all members or none), to random nodes one after another while the senders
//! stream numbered tells and asks, and
//! between migrations injects faults at random on the nodes' sockets: datagram loss, delay
//! with jitter (reordering), and short cuts between two nodes, one way or both. With
//! `--kills K` it also kills K nodes (never `a`, whose handles drive the run) at even intervals
//! without a goodbye, and restarts each a few seconds later with a new sink and senders.
//!
//! What sinks handled and what senders sent is recorded outside the nodes, so it outlives a
//! killed one. At the end the network is healed, every living sender's messages are awaited,
//! and the run is judged. It prints one JSON object; the exit status is non-zero if any
//! invariant broke: a message duplicated or reordered, two instances of one sink handling
//! messages (one started after the other and the older one handled something again), or a
//! message lost that its living sender's node did not report (`NodeHandle::losses`). Without
//! kills nothing may be lost at all and no sender may fail. Messages whose sender died with its
//! node are counted apart (`lost_with_sender`): there is nobody left to tell.
//!
//! With `--replicas 1` every sink's kind has a standby copy (`Service::REPLICAS`): a sink does
//! not die with its node, its standby takes it over. Such a run is judged by what each sink's
//! own state says it handled (a copy taken over from a checkpoint handles again what came after
//! it; the records kept outside count those as `reexecuted`), and nothing may be lost at all,
//! kills or not: every sink must answer at the end (`unanswered_sinks` 0) and `lost` must be 0.
//!
//! With `--data-dirs` every node has a data directory (under the system's temporary directory,
//! removed at the end): a killed node restarts on it, and claims the replicated sinks it had
//! stored; their standbys took them over meanwhile, so the stored copies must be given up
//! (`stored_given_up`), never run beside the ones that went on (`max_live_instances` 1).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tern::{
    AbortReason, AskError, Ctx, Limits, MigrateOptions, ReplyTo, Service, ServiceId, ServiceRef,
};
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

/// Per sink, per sender name, what it handled: kept outside the nodes.
fn records() -> &'static Mutex<HashMap<ServiceId, BTreeMap<String, SenderReport>>> {
    static RECORDS: OnceLock<Mutex<HashMap<ServiceId, BTreeMap<String, SenderReport>>>> =
        OnceLock::new();
    RECORDS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// What one sender did, kept outside the nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Sent {
    /// Numbers used: messages queued.
    used: u64,
    /// Sends that failed (at once, or asks answered with an error).
    failed: u64,
    /// Asks that were sent and then failed: their caller was told.
    asks_failed: u64,
}

/// Per sender name, what it did.
fn sent() -> &'static Mutex<HashMap<String, Sent>> {
    static SENT: OnceLock<Mutex<HashMap<String, Sent>>> = OnceLock::new();
    SENT.get_or_init(|| Mutex::new(HashMap::new()))
}

fn locked<T>(m: &'static Mutex<T>) -> std::sync::MutexGuard<'static, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

static INSTANCES: AtomicU64 = AtomicU64::new(1);

/// A sink counting each sender's numbers; every running instance has its own token. `R` is
/// its kind's `REPLICAS`: with `--replicas 1` every sink has a standby copy.
///
/// It also keeps what it handled in its own state (`reports`), which a replicated sink's
/// checkpoints carry: a promoted copy handles again what came after its checkpoint (its
/// handler's effects outside its state happen twice, the records above count that as
/// re-execution), and its state must still show every message exactly once, in order.
#[derive(Default, Serialize, Deserialize)]
struct Sink<const R: u8> {
    #[serde(skip)]
    instance: u64,
    reports: BTreeMap<String, SenderReport>,
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
    /// What the sink's state says it handled, per sender.
    Reports(ReplyTo<BTreeMap<String, SenderReport>>),
}

impl<const R: u8> Sink<R> {
    fn handled_by_me(&self, id: ServiceId) {
        let mut all = locked(live());
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

    fn record(&mut self, id: ServiceId, sender: String, seq: u64) {
        locked(records())
            .entry(id)
            .or_default()
            .entry(sender.clone())
            .or_default()
            .record(seq);
        self.reports.entry(sender).or_default().record(seq);
    }
}

impl<const R: u8> Service for Sink<R> {
    type Msg = SinkMsg;
    const KIND: &'static str = if R == 0 {
        "chaos-sink"
    } else {
        "chaos-replicated-sink"
    };
    const VERSION: u32 = 1;
    const REPLICAS: u8 = R;

    fn started(&mut self, _ctx: &mut Ctx<Self>) {
        self.instance = INSTANCES.fetch_add(1, Ordering::Relaxed);
    }

    async fn handle(&mut self, msg: SinkMsg, ctx: &mut Ctx<Self>) {
        self.handled_by_me(ctx.id());
        match msg {
            SinkMsg::Record { sender, seq } => self.record(ctx.id(), sender, seq),
            SinkMsg::RecordAsk { sender, seq, reply } => {
                self.record(ctx.id(), sender, seq);
                let _ = ctx.reply(reply, seq);
            }
            SinkMsg::Reports(reply) => {
                let _ = ctx.reply(reply, self.reports.clone());
            }
        }
    }
}

/// Sends numbered tells and asks to the sink in its book. Its numbers follow its channel's:
/// a tell that fails was never queued and gives its number back; so does an ask that was not
/// sent; any other ask used its number, whatever its outcome.
#[derive(Serialize, Deserialize)]
struct Sender<const R: u8> {
    name: String,
    next: u64,
    failed: u64,
    asks_failed: u64,
}

#[derive(Serialize, Deserialize)]
enum SenderMsg {
    Send { tells: u64, asks: u64 },
}

impl<const R: u8> Sender<R> {
    fn new(name: String) -> Self {
        Sender {
            name,
            next: 0,
            failed: 0,
            asks_failed: 0,
        }
    }

    fn publish(&self) {
        let s = Sent {
            used: self.next,
            failed: self.failed,
            asks_failed: self.asks_failed,
        };
        locked(sent()).insert(self.name.clone(), s);
    }
}

impl<const R: u8> Service for Sender<R> {
    type Msg = SenderMsg;
    const KIND: &'static str = if R == 0 {
        "chaos-sender"
    } else {
        "chaos-replicated-sender"
    };
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: SenderMsg, ctx: &mut Ctx<Self>) {
        let SenderMsg::Send { tells, asks } = msg;
        let Ok(sink) = ctx.book_ref::<Sink<R>>("sink") else {
            self.failed += tells + asks;
            return self.publish();
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
            self.publish();
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
            let used = !matches!(
                res,
                Err(AskError::NotSent(_) | AskError::TooManyPending { .. })
            );
            if used {
                self.next += 1;
            }
            if !matches!(res, Ok(echo) if echo == seq) {
                self.failed += 1;
                self.asks_failed += u64::from(used);
            }
            self.publish();
        }
    }
}

struct Args {
    nodes: usize,
    migrations: usize,
    seed: u64,
    json: bool,
    faults: bool,
    kills: usize,
    replicas: u8,
    data_dirs: bool,
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
        kills: 0,
        replicas: 0,
        data_dirs: false,
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
            "--kills" => a.kills = num(&mut it, "--kills")? as usize,
            "--replicas" => a.replicas = num(&mut it, "--replicas")? as u8,
            "--data-dirs" => a.data_dirs = true,
            other => bail!(
                "unknown argument {other:?}; usage: tern-chaos [--nodes N] [--migrations N] [--seed N] [--kills K] [--replicas 0|1] [--data-dirs] [--json] [--no-faults]"
            ),
        }
    }
    if !(2..=26).contains(&a.nodes) {
        bail!("--nodes must be 2 to 26");
    }
    if a.replicas > 1 {
        bail!("--replicas must be 0 or 1 (a replicated service has one standby)");
    }
    if a.replicas > 0 && a.nodes < 3 {
        bail!("--replicas needs at least 3 nodes (a standby and a witness besides the primary)");
    }
    if a.kills > 0 && a.nodes < 3 {
        bail!("--kills needs at least 3 nodes (a is never killed, and a migration needs two live ones)");
    }
    Ok(a)
}

/// Stored copies node `n` gave up after a restart: a newer copy held their epoch.
fn superseded_events(n: &tern::NodeHandle) -> u64 {
    n.events()
        .iter()
        .filter(|e| e.kind == "stored-copy-superseded")
        .count() as u64
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

/// The first words of an error, as a counter key.
fn short(e: &str) -> String {
    e.split(':').next().unwrap_or(e).chars().take(40).collect()
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

/// One sender: its name, the node it runs on, its sink, and its handle on node `a`.
struct SenderAt<const R: u8> {
    name: String,
    node: String,
    sink: ServiceId,
    id: ServiceId,
    handle: ServiceRef<Sender<R>>,
}

/// The run's sinks and senders, all handled from node `a`.
#[derive(Default)]
struct Fleet<const R: u8> {
    sinks: Vec<ServiceRef<Sink<R>>>,
    /// Lone sinks, migrated one at a time.
    lone: Vec<ServiceRef<Sink<R>>>,
    /// Roots of trees, migrated whole.
    trees: Vec<ServiceRef<Sink<R>>>,
    senders: Vec<SenderAt<R>>,
    dead_sinks: BTreeSet<ServiceId>,
    dead_senders: BTreeSet<String>,
}

impl<const R: u8> Fleet<R> {
    /// A sink on `node`, and senders to it from every live node (and from `node` to every
    /// live sink).
    fn add_node(&mut self, c: &Cluster, node: &str, live: &[String]) -> Result<()> {
        let a = c.node("a");
        let host = c.node(node);
        let lone = a.resolve::<Sink<R>>(host.spawn(Sink::<R>::default())?.addr())?;
        let root = host.spawn(Sink::<R>::default())?;
        let mut new = vec![lone.clone(), a.resolve::<Sink<R>>(root.addr())?];
        for _ in 0..2 {
            let child = host.spawn(Sink::<R>::default())?;
            host.adopt(root.id(), child.addr())
                .context("adopting a child sink")?;
            new.push(a.resolve::<Sink<R>>(child.addr())?);
        }
        self.lone.push(lone);
        self.trees.push(new[1].clone());
        let mut pairs: Vec<(String, ServiceRef<Sink<R>>)> = Vec::new();
        for sink in &new {
            self.sinks.push(sink.clone());
            pairs.extend(
                live.iter()
                    .filter(|n| n.as_str() != node)
                    .map(|n| (n.clone(), sink.clone())),
            );
        }
        for s in &self.sinks {
            if !self.dead_sinks.contains(&s.id()) && !new.iter().any(|x| x.id() == s.id()) {
                pairs.push((node.to_owned(), s.clone()));
            }
        }
        for (from, sink) in pairs {
            let n = c.node(&from);
            let name = format!("{from}->{}", sink.id());
            let s = n.spawn(Sender::<R>::new(name.clone()))?;
            n.book_insert(s.addr(), "sink", sink.addr())
                .with_context(|| format!("the book of sender {name} on {from}"))?;
            let handle = a.resolve::<Sender<R>>(s.addr())?;
            self.senders.push(SenderAt {
                name,
                node: from,
                sink: sink.id(),
                id: s.id(),
                handle,
            });
        }
        Ok(())
    }
}

fn run() -> Result<(String, bool)> {
    let a = args()?;
    if a.replicas > 0 {
        run_with::<1>(a)
    } else {
        run_with::<0>(a)
    }
}

/// The run, with sinks whose kind has `R` standby copies.
fn run_with<const R: u8>(a: Args) -> Result<(String, bool)> {
    // Logs go to stderr: stdout carries the one JSON object. (Set before the harness's own
    // subscriber, which writes where tests capture it.)
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .try_init();
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
        // A killed node is noticed in 2 s rather than 10.
        idle_timeout_ms: 2_000,
        keep_alive_ms: 500,
        losses_max: 1_000_000,
        // Kept whole, for the account of a failed run.
        events_max: 200_000,
        ..Limits::default()
    };
    let data_root = std::env::temp_dir().join(format!("tern-chaos-data-{}", std::process::id()));
    if a.data_dirs {
        let _ = std::fs::remove_dir_all(&data_root);
        builder = builder.data_dirs(&data_root);
    }
    let mut c = builder
        .limits(limits)
        .faults(a.seed)
        .setup(|n| {
            n.register::<Sink<R>>().register::<Sender<R>>();
        })
        .start()?;
    c.wait_connected(Duration::from_secs(20))?;
    eprintln!(
        "tern-chaos: seed {} ({} nodes, {} kills)",
        a.seed, a.nodes, a.kills
    );

    let mut fleet = Fleet::<R>::default();
    let mut up: Vec<String> = Vec::new();
    for n in &names {
        up.push(n.clone());
        fleet.add_node(&c, n, &up)?;
    }

    let mut rng = Rng(a.seed ^ 0x5eed);
    let mut faults: BTreeMap<&str, u64> = BTreeMap::new();
    let mut aborted: BTreeMap<String, u64> = BTreeMap::new();
    let (mut committed, mut freeze) = (0u64, Vec::new());
    let (mut trees_committed, mut tree_freeze) = (0u64, Vec::new());
    let mut trees_aborted: BTreeMap<String, u64> = BTreeMap::new();
    let kill_every = a.migrations / (a.kills + 1);
    let mut kills = 0usize;
    // Replicated services taken over by a standby: counted on each node before it is killed,
    // and on the living ones at the end.
    let mut takeovers = 0u64;
    // Stored copies resumed, and given up, by restarted nodes (`--data-dirs`).
    let (mut resumed, mut given_up) = (0u64, 0u64);
    // How long kills waited for the victim's replicated services to be protected.
    let mut kill_wait_ms = 0u64;
    // What the killed nodes had logged, for the account of a failed run.
    let mut killed_events: Vec<(String, tern::NodeEvent)> = Vec::new();
    // A killed node, and when it died: restarted once its peers have surely noticed.
    let mut down: Option<(String, Instant)> = None;
    for step in 0..a.migrations {
        if let Some((n, at)) = &down {
            if at.elapsed() > Duration::from_millis(3_000) {
                let n = n.clone();
                c.restart(&n)?;
                c.wait_connected(Duration::from_secs(20))?;
                up.push(n.clone());
                fleet.add_node(&c, &n, &up)?;
                down = None;
            }
        }
        if a.kills > 0 && kills < a.kills && down.is_none() && step > 0 && step % kill_every == 0 {
            // Mid-traffic: every sender has a burst under way when the node dies.
            for s in &fleet.senders {
                if !fleet.dead_senders.contains(&s.name) && !fleet.dead_sinks.contains(&s.sink) {
                    let _ = s.handle.tell(SenderMsg::Send {
                        tells: 200,
                        asks: 2,
                    });
                }
            }
            std::thread::sleep(Duration::from_millis(20 + rng.below(40) as u64));
            let candidates: Vec<&String> = up.iter().filter(|n| n.as_str() != "a").collect();
            let victim = candidates[rng.below(candidates.len())].clone();
            if R > 0 {
                // A known gap, waited out rather than hit: a replicated service that has just
                // moved is protected only once its new node's first checkpoint is
                // acknowledged (docs/failures.md, "What can still lose a service"). Under a
                // cut that can take the cut's length; a kill inside it loses the service.
                let waited = Instant::now();
                let protected = || {
                    let node = c.node(&victim);
                    node.services()
                        .iter()
                        .all(|s| node.replica(s.addr.id).is_none_or(|r| r.acked >= 1))
                };
                while !protected() && waited.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                kill_wait_ms += waited.elapsed().as_millis() as u64;
            }
            // What dies with it: the sinks it hosts and the senders on it.
            let hosted: BTreeSet<ServiceId> = c
                .node(&victim)
                .services()
                .iter()
                .map(|s| s.addr.id)
                .collect();
            // A replicated sink does not die with its node: its standby takes it over.
            for s in &fleet.sinks {
                if R == 0 && hosted.contains(&s.id()) {
                    fleet.dead_sinks.insert(s.id());
                }
            }
            for s in &fleet.senders {
                if s.node == victim {
                    fleet.dead_senders.insert(s.name.clone());
                }
            }
            takeovers += c.node(&victim).stats().takeovers;
            resumed += c.node(&victim).stats().resumed_from_disk;
            given_up += superseded_events(c.node(&victim));
            for e in c.node(&victim).events() {
                killed_events.push((victim.clone(), e));
            }
            eprintln!(
                "tern-chaos: step {step}: killing {victim} (it hosts {} services)",
                hosted.len()
            );
            if R > 0 {
                // Where each replicated sink it runs stands: its standby, and who holds what.
                for s in fleet.sinks.iter().filter(|s| hosted.contains(&s.id())) {
                    let info = c.node(&victim).replica(s.id());
                    let held: Vec<(String, u64, u64)> = up
                        .iter()
                        .flat_map(|n| {
                            c.node(n)
                                .standby_checkpoints()
                                .into_iter()
                                .filter(|h| h.service == s.id())
                                .map(move |h| (n.clone(), h.epoch, h.no))
                        })
                        .collect();
                    let seen: Vec<(String, Option<String>, u64)> = up
                        .iter()
                        .map(|n| {
                            let node = c.node(n);
                            (
                                n.clone(),
                                node.location(s.id()).map(|x| x.to_string()),
                                node.stats().checkpoints_parked,
                            )
                        })
                        .collect();
                    eprintln!(
                        "tern-chaos:   {} on {victim}: {info:?}; held {held:?}; located, parked {seen:?}",
                        s.id()
                    );
                }
            }
            c.kill(&victim);
            up.retain(|n| *n != victim);
            kills += 1;
            *faults.entry("kill").or_default() += 1;
            down = Some((victim, Instant::now()));
        }
        let step_result = block_on(async {
            // Keep every sender busy.
            if step % 4 == 0 {
                for s in &fleet.senders {
                    if !fleet.dead_senders.contains(&s.name) && !fleet.dead_sinks.contains(&s.sink)
                    {
                        let _ = s.handle.tell(SenderMsg::Send { tells: 20, asks: 1 });
                    }
                }
            }
            if a.faults {
                match rng.below(10) {
                    0 => {
                        let n = &up[rng.below(up.len())];
                        c.faults(n).drop_rate((rng.below(6) as f64) / 100.0);
                        *faults.entry("loss").or_default() += 1;
                    }
                    1 => {
                        let n = &up[rng.below(up.len())];
                        c.faults(n).delay(
                            Duration::from_micros(rng.below(2_000) as u64),
                            Duration::from_micros(rng.below(3_000) as u64),
                        );
                        *faults.entry("delay").or_default() += 1;
                    }
                    2 => {
                        let x = rng.below(up.len());
                        let y = (x + 1 + rng.below(up.len() - 1)) % up.len();
                        let both = rng.below(2) == 0;
                        let (fx, fy) = (c.faults(&up[x]).clone(), c.faults(&up[y]).clone());
                        let (ax, ay) = (c.node(&up[x]).local_addr(), c.node(&up[y]).local_addr());
                        fx.cut(ay);
                        if both {
                            fy.cut(ax);
                        }
                        // Healed on a timer of its own, whatever the run is waiting for.
                        let lasts = Duration::from_millis(50 + rng.below(400) as u64);
                        std::thread::spawn(move || {
                            std::thread::sleep(lasts);
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
            let live = |pool: &Vec<ServiceRef<Sink<R>>>| -> Vec<ServiceRef<Sink<R>>> {
                pool.iter()
                    .filter(|s| !fleet.dead_sinks.contains(&s.id()))
                    .cloned()
                    .collect()
            };
            let (trees, lone) = (live(&fleet.trees), live(&fleet.lone));
            // Kills can leave one pool empty for a while: then the other is used.
            let whole_tree = (rng.below(3) == 0 && !trees.is_empty()) || lone.is_empty();
            let alive: Vec<&ServiceRef<Sink<R>>> = if whole_tree {
                trees.iter()
            } else {
                lone.iter()
            }
            .collect();
            if alive.is_empty() {
                bail!("every sink is dead");
            }
            let sink = alive[rng.below(alive.len())];
            // Another live node than the one the handle last knew: rarely the same node, then
            // an abort that is not counted.
            let here = sink.location();
            let others: Vec<&String> = up.iter().filter(|n| n.as_str() != here.as_str()).collect();
            let to = others[rng.below(others.len())];
            if whole_tree {
                let moved = match c
                    .node("a")
                    .migrate_tree(sink.id(), to, MigrateOptions::default())
                    .await
                {
                    // A tree that did not move: every member's report says why.
                    Err(tern::Error::NotMoved(n)) if !n.reports.is_empty() => {
                        Ok(tern::GroupReport::from_reports(n.reports))
                    }
                    other => other,
                };
                match moved {
                    Ok(r) if r.committed => {
                        trees_committed += 1;
                        tree_freeze.push(r.freeze_us);
                    }
                    Ok(r) => {
                        let partial = r.members.iter().filter(|m| m.committed()).count();
                        if partial > 0 {
                            bail!("a tree moved {partial} of its {} members", r.members.len());
                        }
                        let reason = r
                            .members
                            .iter()
                            .filter_map(|m| m.aborted.as_ref())
                            .find(|a| !matches!(a, AbortReason::Group(_)))
                            .map(|a| a.label())
                            .unwrap_or("group");
                        if reason != "same-node" {
                            *trees_aborted.entry(reason.to_owned()).or_default() += 1;
                        }
                    }
                    // The request itself failed (its node unreachable under a cut): counted.
                    Err(e) => {
                        // Where each member really runs, for the log.
                        let members = c.node("a").tree(sink.id()).unwrap_or_default();
                        let hosts: Vec<Vec<&String>> = members
                            .iter()
                            .map(|m| {
                                up.iter()
                                    .filter(|n| {
                                        c.node(n).services().iter().any(|x| x.addr.id == m.addr.id)
                                    })
                                    .collect()
                            })
                            .collect();
                        eprintln!(
                            "tern-chaos: tree request failed: {e} (members run on {hosts:?})"
                        );
                        *trees_aborted
                            .entry(format!("request: {}", short(&e.to_string())))
                            .or_default() += 1;
                    }
                }
                return Ok::<_, anyhow::Error>(());
            }
            let report = match sink.migrate(to, MigrateOptions::default()).await {
                Ok(r) => r,
                // Did not move: the report says why (counted below).
                Err(tern::Error::NotMoved(n)) if n.reports.len() == 1 => n.reports[0].clone(),
                // A replicated sink whose node was just killed: the request cannot reach it
                // until its standby has taken it over. Counted like any abort.
                Err(e) if R > 0 => {
                    *aborted
                        .entry(format!("request: {}", short(&e.to_string())))
                        .or_default() += 1;
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            };
            match &report.aborted {
                None => {
                    committed += 1;
                    freeze.push(report.freeze_us);
                }
                Some(AbortReason::SameNode) => {}
                Some(r) => *aborted.entry(r.label().to_owned()).or_default() += 1,
            }
            Ok::<_, anyhow::Error>(())
        });
        step_result?;
    }
    if let Some((n, at)) = down.take() {
        let wait = Duration::from_millis(3_000).saturating_sub(at.elapsed());
        std::thread::sleep(wait);
        c.restart(&n)?;
        up.push(n);
    }
    // A clean network for the end of the run.
    for n in &up {
        c.faults(n).clear();
    }
    c.wait_connected(Duration::from_secs(20))?;

    // Wait until no living sender's count moves.
    let mut last: HashMap<String, Sent> = HashMap::new();
    for _ in 0..400 {
        std::thread::sleep(Duration::from_millis(300));
        let now = locked(sent()).clone();
        if now == last {
            break;
        }
        last = now;
    }
    // And for confirmations and loss reports to settle.
    std::thread::sleep(Duration::from_millis(500));

    // A replicated sink is judged by what its state says it handled: a copy promoted from a
    // checkpoint handles again what came after it, so the records kept outside (the handler's
    // side effects) count those twice; that is re-execution, reported apart.
    let mut reexecuted = 0u64;
    let mut unanswered_sinks = 0u64;
    let records = if R == 0 {
        locked(records()).clone()
    } else {
        let outside = locked(records()).clone();
        let mut kept = HashMap::new();
        for sink in &fleet.sinks {
            let res = block_on(sink.ask(SinkMsg::Reports, Duration::from_secs(30)));
            match res {
                Ok(r) => {
                    for (name, o) in outside.get(&sink.id()).into_iter().flatten() {
                        let k = r.get(name).map_or(0, |k| k.received);
                        reexecuted += o.received.saturating_sub(k);
                    }
                    kept.insert(sink.id(), r);
                }
                Err(e) => {
                    eprintln!(
                        "tern-chaos: replicated sink {} did not answer: {e}",
                        sink.id()
                    );
                    unanswered_sinks += 1;
                }
            }
        }
        kept
    };
    let (mut total_sent, mut processed, mut duplicated, mut reordered) = (0u64, 0u64, 0u64, 0u64);
    let (mut lost, mut lost_reported, mut lost_unreported, mut lost_with_sender) =
        (0u64, 0u64, 0u64, 0u64);
    let mut failed_senders = 0u64;
    // Failures told to senders that lived to the end (a replicated run allows none).
    let mut failed_living = 0u64;
    let mut dumped = BTreeSet::new();
    for s in &fleet.senders {
        let Sent {
            used,
            failed,
            asks_failed,
        } = last.get(&s.name).copied().unwrap_or_default();
        let r = records
            .get(&s.sink)
            .and_then(|m| m.get(&s.name))
            .cloned()
            .unwrap_or_default();
        let handled = r.received - r.duplicated;
        total_sent += used;
        processed += r.received;
        duplicated += r.duplicated;
        reordered += r.reordered;
        failed_senders += failed;
        let missing = used.saturating_sub(handled);
        if fleet.dead_senders.contains(&s.name) {
            lost_with_sender += missing;
            continue;
        }
        failed_living += failed;
        if failed > 0 && R > 0 {
            eprintln!(
                "tern-chaos: sender {} (on {}) was told {failed} sends failed ({asks_failed} of them asks)",
                s.name, s.node
            );
        }
        let reported: u64 = c
            .node(&s.node)
            .losses()
            .iter()
            .filter(|l| l.service == s.sink && l.sender == s.id)
            .map(|l| l.messages)
            .sum::<u64>()
            + asks_failed;
        if missing > 0 {
            let sink = fleet.sinks.iter().find(|x| x.id() == s.sink);
            let seen_from = sink
                .and_then(|x| c.node(&s.node).resolve::<Sink<R>>(x.addr()).ok())
                .map(|h| h.location());
            let runs_on: Vec<&String> = up
                .iter()
                .filter(|n| c.node(n).services().iter().any(|x| x.addr.id == s.sink))
                .collect();
            eprintln!(
                "tern-chaos: its sink runs on {runs_on:?}, the sender's node sends to {seen_from:?}"
            );
            if dumped.insert(s.sink) {
                let key = s.sink.to_string();
                let living = up
                    .iter()
                    .flat_map(|n| c.node(n).events().into_iter().map(move |e| (n.clone(), e)));
                // Repeated kinds: the first three of each per node.
                let mut seen: BTreeMap<(String, String), u32> = BTreeMap::new();
                for (n, e) in killed_events.iter().cloned().chain(living) {
                    if !e.detail.contains(&key) {
                        continue;
                    }
                    let k = seen.entry((n.clone(), e.kind.clone())).or_default();
                    *k += 1;
                    if *k <= 3 || !e.kind.ends_with("-lost") && !e.kind.starts_with("refused") {
                        eprintln!("tern-chaos:   {n} #{} {}: {}", e.n, e.kind, e.detail);
                    }
                }
            }
            eprintln!(
                "tern-chaos: sender {} (on {}) used {used} numbers, {failed} failed, its sink \
                 handled {handled} (next {}, {} missing: {:?}), its node reported {reported}",
                s.name,
                s.node,
                r.next,
                r.missing.len(),
                r.missing.iter().take(8).collect::<Vec<_>>(),
            );
        }
        lost += missing;
        lost_reported += reported;
        lost_unreported += missing.saturating_sub(reported);
    }
    takeovers += up.iter().map(|n| c.node(n).stats().takeovers).sum::<u64>();
    resumed += up
        .iter()
        .map(|n| c.node(n).stats().resumed_from_disk)
        .sum::<u64>();
    given_up += up.iter().map(|n| superseded_events(c.node(n))).sum::<u64>();
    if R > 0 && (lost > 0 || unanswered_sinks > 0) {
        // The replication events that name no one sink: standbys lost, claims, ballots.
        let kinds = [
            "standby-lost",
            "takeover-failed",
            "ballot-lost",
            "asks-failed",
        ];
        let living = up
            .iter()
            .flat_map(|n| c.node(n).events().into_iter().map(move |e| (n.clone(), e)));
        for (n, e) in killed_events.iter().cloned().chain(living) {
            if kinds.contains(&e.kind.as_str()) {
                eprintln!("tern-chaos:   {n} #{} {}: {}", e.n, e.kind, e.detail);
            }
        }
    }
    let max_live = locked(live())
        .values()
        .map(|l| l.max_live)
        .max()
        .unwrap_or(0);
    c.shutdown();
    if a.data_dirs {
        let _ = std::fs::remove_dir_all(&data_root);
    }

    freeze.sort_unstable();
    tree_freeze.sort_unstable();
    let ok = lost_unreported == 0
        && duplicated == 0
        && reordered == 0
        && max_live <= 1
        && (kills > 0 || (lost == 0 && failed_senders == 0 && processed == total_sent))
        // Replicated sinks lose nothing even to kills, and every one of them still answers.
        // (A send refused at once, its number given back, is told to its sender and counted
        // in `living_sender_failures`, not lost.)
        && (R == 0 || (lost == 0 && unanswered_sinks == 0));
    let out = json!({
        "seed": a.seed,
        "nodes": a.nodes,
        "migrations_asked": a.migrations,
        "migrations_committed": committed,
        "migrations_aborted": aborted,
        "faults_injected": faults,
        "node_kills": kills,
        "replicas": R,
        "takeovers": takeovers,
        "data_dirs": a.data_dirs,
        "stored_resumed": resumed,
        "stored_given_up": given_up,
        "kill_wait_ms": kill_wait_ms,
        "reexecuted": reexecuted,
        "unanswered_sinks": unanswered_sinks,
        "messages_sent": total_sent,
        "messages_processed": processed,
        "sender_failures": failed_senders,
        "living_sender_failures": failed_living,
        "lost": lost,
        "lost_reported": lost_reported,
        "lost_unreported": lost_unreported,
        "lost_with_sender": lost_with_sender,
        "duplicated": duplicated,
        "reordered": reordered,
        "freeze_us_p50": percentile(&freeze, 0.5),
        "freeze_us_p99": percentile(&freeze, 0.99),
        "tree_migrations_committed": trees_committed,
        "tree_migrations_aborted": trees_aborted,
        "tree_freeze_us_p50": percentile(&tree_freeze, 0.5),
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
