//! A migration test kit for your own services: one call moves a service of your kind around a
//! local cluster while a load of your messages reaches it, with faults if you ask, and says in
//! plain words what broke.
//!
//! The oracle is a twin: the kit runs two copies of the service from the same state and sends
//! both the same messages in the same order; one stays where it started, the other moves from
//! node to node all along. A service whose handling depends only on its state and its messages
//! ends the same in both, so any difference is something a move broke: a field the state's
//! serde leaves out, a message lost, repeated or reordered, a timer that did not come back,
//! state kept outside the struct (a thread-local, a file, a global). Asks made of the moving
//! copy must all be answered. See [`MigrationKit`].

use std::collections::BTreeMap;
use std::fmt::{self, Debug};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::de::DeserializeOwned;
use tern::{MigrateOptions, NodeHandle, ReplyTo, Service};

use crate::{block_on, Cluster};

/// How long an ask of the service may take before the kit counts it lost.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the kit waits, after the load, for both copies' timers to have fired before it
/// compares them anyway.
pub const SETTLE: Duration = Duration::from_secs(10);
/// The most characters of a state's `Debug` a finding shows.
const SHOWN_MAX: usize = 600;

/// Something a move broke, in plain words ([`Display`](fmt::Display)).
#[derive(Debug, Clone, PartialEq)]
pub enum Finding {
    /// The state does not come back the same through the encoding a move uses.
    StateRoundTrip(String),
    /// A message of the load was refused (the error says why).
    MessageRefused {
        /// Its number in the load, from 1.
        n: u64,
        /// The error.
        error: String,
    },
    /// An ask of the moving copy got no answer.
    AskLost {
        /// How many messages of the load had been sent.
        after: u64,
        /// The error.
        error: String,
    },
    /// The node reported messages lost.
    MessagesLost(String),
    /// After the load and the settling, the copy that moved differs from the one that
    /// stayed.
    Diverged {
        /// What the copy that stayed reads, from a little before the first difference.
        stayed: String,
        /// What the copy that moved reads, from the same point.
        moved: String,
    },
    /// The copy that stayed changed after the load ended (its timers fired), the one that
    /// moved did not: a timer did not come back after a move.
    TimerLost {
        /// What the copy that stayed read at the end of the load, then after its timers.
        stayed: (String, String),
        /// What the copy that moved read at both times.
        moved: String,
    },
}

/// Where `a` and `b` first differ, each shown from a little before that point.
fn difference(a: &impl Debug, b: &impl Debug) -> (String, String) {
    let (a, b) = (format!("{a:?}"), format!("{b:?}"));
    let at = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map(|((i, _), _)| i)
        .unwrap_or_else(|| a.len().min(b.len()));
    let window = |text: &str| {
        let from = text[..at.min(text.len())]
            .char_indices()
            .rev()
            .nth(80)
            .map_or(0, |(i, _)| i);
        let shown: String = text[from..].chars().take(SHOWN_MAX).collect();
        let more = if text[from..].chars().count() > SHOWN_MAX {
            "..."
        } else {
            ""
        };
        let less = if from > 0 { "..." } else { "" };
        format!("{less}{shown}{more}")
    };
    (window(&a), window(&b))
}

fn shown(value: &impl Debug) -> String {
    let text = format!("{value:?}");
    match text.char_indices().nth(SHOWN_MAX) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::StateRoundTrip(detail) => write!(
                f,
                "the state does not survive its own encoding, which every move uses: {detail} \
                 (a field with #[serde(skip)], or a Serialize that leaves something out)"
            ),
            Finding::MessageRefused { n, error } => {
                write!(f, "message {n} of the load was refused: {error}")
            }
            Finding::AskLost { after, error } => write!(
                f,
                "an ask after {after} messages got no answer: {error} (the handler may have \
                 panicked, or blocked past the timeout)"
            ),
            Finding::MessagesLost(what) => write!(f, "the node reported messages lost: {what}"),
            Finding::Diverged { stayed, moved } => write!(
                f,
                "the copy that moved ended different from the copy that stayed (a message \
                 lost, repeated or reordered, or state kept outside the struct); from a \
                 little before the first difference, stayed {stayed}, moved {moved}"
            ),
            Finding::TimerLost { stayed, moved } => write!(
                f,
                "a timer did not come back after a move: the copy that stayed went from {} to \
                 {} as its timers fired, the copy that moved stayed at {moved}",
                stayed.0, stayed.1
            ),
        }
    }
}

/// What one run found, and what it did.
#[derive(Debug, Clone, Default)]
pub struct KitReport {
    /// What broke; empty when nothing did.
    pub findings: Vec<Finding>,
    /// Messages of the load sent to each copy.
    pub messages: u64,
    /// Asks of the moving copy answered.
    pub asks_answered: u64,
    /// Moves committed.
    pub moves: u64,
    /// Moves that did not commit, by reason (with faults, some are expected: each left the
    /// service where it was).
    pub moves_aborted: BTreeMap<String, u64>,
    /// The nodes the copy that moved ran on, in order.
    pub path: Vec<String>,
}

impl KitReport {
    /// True when nothing broke.
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    /// Panics with the report unless nothing broke: the call a test makes.
    #[track_caller]
    pub fn assert_clean(&self) {
        assert!(self.is_clean(), "{self}");
    }
}

impl fmt::Display for KitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} messages, {} asks answered, {} moves committed ({} aborted), path {}",
            self.messages,
            self.asks_answered,
            self.moves,
            self.moves_aborted.values().sum::<u64>(),
            self.path.join(" -> ")
        )?;
        if self.findings.is_empty() {
            return write!(f, "nothing broke");
        }
        for (i, finding) in self.findings.iter().enumerate() {
            writeln!(f, "{}. {finding}", i + 1)?;
        }
        Ok(())
    }
}

type Load<S> = Box<dyn Fn(u64) -> <S as Service>::Msg>;
type Read<S, R> = Box<dyn Fn(ReplyTo<R>) -> <S as Service>::Msg>;

/// A migration check of kind `S`: build it with the state, the load and how to read the
/// service, adjust it, and [`run`](Self::run) it.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use tern::{Ctx, ReplyTo, Service};
/// use tern_harness::kit::MigrationKit;
///
/// /// Keeps the last words it was told, in order.
/// #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
/// struct Log { words: Vec<String> }
///
/// #[derive(Serialize, Deserialize)]
/// enum LogMsg { Add(String), Read(ReplyTo<Vec<String>>) }
///
/// impl Service for Log {
///     type Msg = LogMsg;
///     const KIND: &'static str = "log";
///     const VERSION: u32 = 1;
///     async fn handle(&mut self, msg: LogMsg, ctx: &mut Ctx<Self>) {
///         match msg {
///             LogMsg::Add(w) => self.words.push(w),
///             LogMsg::Read(r) => { let _ = ctx.reply(r, self.words.clone()); }
///         }
///     }
/// }
///
/// let report = MigrationKit::new(Log::default(), |n| LogMsg::Add(format!("w{n}")), LogMsg::Read)
///     .messages(300)
///     .moves(6)
///     .run()?;
/// report.assert_clean();
/// assert_eq!(report.moves, 6);
/// # Ok::<(), anyhow::Error>(())
/// ```
pub struct MigrationKit<S: Service, R> {
    state: S,
    load: Load<S>,
    read: Read<S, R>,
    messages: u64,
    moves: u64,
    ask_every: u64,
    nodes: usize,
    faults: Option<(u64, f64)>,
}

impl<S, R> MigrationKit<S, R>
where
    S: Service + Clone + PartialEq + Debug,
    R: DeserializeOwned + PartialEq + Debug + Send + 'static,
{
    /// A check of a service starting from `state`; `load(n)` makes the `n`-th message of the
    /// load (from 1; it must make the same message each time it is called with the same `n`);
    /// `read` makes an ask whose answer shows what the service holds (its whole state, or
    /// what matters of it), for the kit to compare the copies and to check the moving one
    /// answers. Defaults: 1,000 messages, 10 moves over 3 nodes, an ask every 100 messages,
    /// no faults.
    pub fn new(
        state: S,
        load: impl Fn(u64) -> S::Msg + 'static,
        read: impl Fn(ReplyTo<R>) -> S::Msg + 'static,
    ) -> Self {
        MigrationKit {
            state,
            load: Box::new(load),
            read: Box::new(read),
            messages: 1_000,
            moves: 10,
            ask_every: 100,
            nodes: 3,
            faults: None,
        }
    }

    /// Messages in the load.
    pub fn messages(mut self, n: u64) -> Self {
        self.messages = n;
        self
    }

    /// Moves to make while the load runs (spread over it).
    pub fn moves(mut self, n: u64) -> Self {
        self.moves = n;
        self
    }

    /// Asks the moving copy every `n` messages (0: only at the end).
    pub fn ask_every(mut self, n: u64) -> Self {
        self.ask_every = n;
        self
    }

    /// Nodes in the cluster (at least 2).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n.max(2);
        self
    }

    /// Drops each datagram between the nodes with probability `drop_rate`, chosen from
    /// `seed` (QUIC sends what was lost again; moves may abort and leave the service where it
    /// was, and the kit counts them).
    pub fn faults(mut self, seed: u64, drop_rate: f64) -> Self {
        self.faults = Some((seed, drop_rate));
        self
    }

    /// Runs the check on a fresh local cluster, and says what broke.
    pub fn run(self) -> Result<KitReport> {
        let mut report = KitReport::default();
        self.check_round_trip(&mut report);
        let names: Vec<String> = (0..self.nodes).map(|i| format!("kit-{i}")).collect();
        let mut builder = names.iter().fold(Cluster::builder(), |b, n| b.node(n, &[]));
        if let Some((seed, _)) = self.faults {
            builder = builder.faults(seed);
        }
        let cluster = builder
            .setup(|node| {
                node.register::<S>();
            })
            .start()?;
        cluster.wait_connected(Duration::from_secs(10))?;
        if let Some((_, rate)) = self.faults {
            for n in &names {
                cluster.faults(n).drop_rate(rate);
            }
        }
        let result = self.drive(&cluster, &names, &mut report);
        cluster.shutdown();
        result.map(|()| report)
    }

    fn check_round_trip(&self, report: &mut KitReport) {
        let back = rmp_serde::to_vec(&self.state)
            .map_err(|e| format!("it does not encode: {e}"))
            .and_then(|bytes| {
                rmp_serde::from_slice::<S>(&bytes).map_err(|e| format!("it does not decode: {e}"))
            });
        match back {
            Ok(back) if back == self.state => {}
            Ok(back) => report.findings.push(Finding::StateRoundTrip(format!(
                "{} came back as {}",
                shown(&self.state),
                shown(&back)
            ))),
            Err(e) => report.findings.push(Finding::StateRoundTrip(e)),
        }
    }

    fn drive(&self, cluster: &Cluster, names: &[String], report: &mut KitReport) -> Result<()> {
        let home = cluster.node(&names[0]).clone();
        let stayed = home.spawn(self.state.clone())?;
        let moving = home.spawn(self.state.clone())?;
        let id = moving.id();
        report.path.push(names[0].clone());
        // The mover: the moves spread over the load, each to the next node.
        let sent = Arc::new(AtomicU64::new(0));
        let mover = {
            let (home, sent, names) = (home.clone(), sent.clone(), names.to_vec());
            let plan = (self.moves, self.messages / (self.moves + 1));
            std::thread::spawn(move || mover(home, id, &names, plan, &sent))
        };
        let every = self.ask_every;
        for n in 1..=self.messages {
            if let Err(e) = block_on(stayed.tell_wait((self.load)(n))) {
                report.findings.push(Finding::MessageRefused {
                    n,
                    error: format!("to the copy that stayed: {e}"),
                });
            }
            if let Err(e) = block_on(moving.tell_wait((self.load)(n))) {
                report.findings.push(Finding::MessageRefused {
                    n,
                    error: e.to_string(),
                });
            }
            if every > 0 && n % every == 0 {
                match block_on(moving.ask(|r| (self.read)(r), ASK_TIMEOUT)) {
                    Ok(_) => report.asks_answered += 1,
                    Err(e) => report.findings.push(Finding::AskLost {
                        after: n,
                        error: e.to_string(),
                    }),
                }
            }
            report.messages = n;
            sent.store(n, Ordering::SeqCst);
        }
        // Moves not made by the end of the load are made now.
        sent.store(u64::MAX, Ordering::SeqCst);
        let (moves, aborted, path) = mover
            .join()
            .map_err(|_| anyhow::anyhow!("the kit's mover panicked"))?;
        report.moves = moves;
        report.moves_aborted = aborted;
        report.path.extend(path);
        self.compare(cluster, (&stayed, &moving), report);
        for node in cluster.nodes() {
            for loss in node.losses() {
                report.findings.push(Finding::MessagesLost(format!(
                    "{} messages to {} with {}: {}",
                    loss.messages, loss.service, loss.node, loss.reason
                )));
            }
        }
        Ok(())
    }

    /// Reads both copies at the end of the load, then once neither has a timer pending (or
    /// [`SETTLE`] has passed), and compares.
    fn compare(
        &self,
        cluster: &Cluster,
        (stayed, moving): (&tern::ServiceRef<S>, &tern::ServiceRef<S>),
        report: &mut KitReport,
    ) {
        let timers = |id: tern::ServiceId| {
            cluster
                .nodes()
                .iter()
                .flat_map(|n| n.services())
                .find(|i| i.addr.id == id)
                .map_or(0, |i| i.timers_pending)
        };
        let quiet = || timers(stayed.id()) == 0 && timers(moving.id()) == 0;
        let read = |svc: &tern::ServiceRef<S>| block_on(svc.ask(|r| (self.read)(r), ASK_TIMEOUT));
        // Both copies read at once; an ask either leaves unanswered is a finding.
        let read_both = |report: &mut KitReport| match (read(stayed), read(moving)) {
            (Ok(s), Ok(m)) => Some((s, m)),
            (_, Err(e)) | (Err(e), _) => {
                report.findings.push(Finding::AskLost {
                    after: report.messages,
                    error: e.to_string(),
                });
                None
            }
        };
        let Some((s0, m0)) = read_both(report) else {
            return;
        };
        // Every message of the load was handled before the reads were answered (an ask comes
        // after the tells on the same channel); what may still change them is their timers.
        let started = Instant::now();
        while !quiet() && started.elapsed() < SETTLE {
            std::thread::sleep(Duration::from_millis(20));
        }
        let Some((s1, m1)) = read_both(report) else {
            return;
        };
        if s1 == m1 {
            report.asks_answered += 2;
        } else if s0 != s1 && m0 == m1 {
            report.findings.push(Finding::TimerLost {
                stayed: (shown(&s0), shown(&s1)),
                moved: shown(&m1),
            });
        } else {
            let (stayed, moved) = difference(&s1, &m1);
            report.findings.push(Finding::Diverged { stayed, moved });
        }
    }
}

/// Moves service `id` `moves` times, each to the next of `names`, asking through `home`: move
/// `k` once `sent` (messages of the load sent) reaches `k * every`. A move that aborts is
/// tried again, up to three times each. The moves committed, those aborted by reason, and
/// the nodes it went to.
fn mover(
    home: NodeHandle,
    id: tern::ServiceId,
    names: &[String],
    (moves, every): (u64, u64),
    sent: &AtomicU64,
) -> (u64, BTreeMap<String, u64>, Vec<String>) {
    let (mut committed, mut aborted, mut path) = (0u64, BTreeMap::new(), Vec::new());
    let mut tries = 0;
    while committed < moves && tries < 4 {
        while sent.load(Ordering::SeqCst) < (committed + 1).saturating_mul(every) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let to = names[(committed as usize + 1) % names.len()].clone();
        match block_on(home.migrate(id, to.as_str(), MigrateOptions::default())) {
            Ok(r) if r.committed() => {
                committed += 1;
                tries = 0;
                path.push(to);
            }
            Ok(r) => {
                tries += 1;
                let why = r.aborted.map(|a| a.label().to_owned());
                *aborted
                    .entry(why.unwrap_or_else(|| "unknown".into()))
                    .or_default() += 1;
            }
            Err(e) => {
                tries += 1;
                let why = match &e {
                    tern::Error::NotMoved(n) => n.reason().unwrap_or_else(|| e.to_string()),
                    other => other.to_string(),
                };
                *aborted.entry(why).or_default() += 1;
            }
        }
    }
    (committed, aborted, path)
}
