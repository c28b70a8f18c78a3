//! Deterministic simulation of the protocol core (`tern_proto::migration`).
//!
//! Several nodes, each with a [`Core`], exchange protocol messages through a simulated network
//! that delays, reorders and duplicates every message and loses control messages (data is not
//! lost without a crash: QUIC delivers it). Senders on every node stream numbered messages to
//! services that migrate at random; targets refuse at random. The service's state is the log of
//! what it handled, so state transfer is checked along with delivery.
//!
//! Checked after every event: at most one live instance per service; every handled message is
//! exactly the next number from its sender (exactly once, per-sender FIFO). Checked at the end:
//! every service runs somewhere and has handled everything sent to it.
//!
//! A run is a pure function of its seed: a failure names the seed, and [`run`] replays it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use tern::{NodeName, ServiceId, Tracked, TrackedMap};
use tern_proto::migration::{AbortReason, Action, Config, Core, Data, MigrationId, Outcome, Wire};

/// A service's state in the simulation: what it handled, in order.
pub type Log = Vec<(ServiceId, u64)>;
type Msg = Wire<Log, ()>;

/// The size and weather of one simulated run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Nodes.
    pub nodes: usize,
    /// Migratable services.
    pub services: usize,
    /// Messages each node's sender sends to each service.
    pub msgs_per_sender: u64,
    /// Migration requests.
    pub migrations: usize,
    /// Probability a control message is lost.
    pub loss: f64,
    /// Probability a message is delivered twice.
    pub dup: f64,
    /// Largest network delay (time units); delays are uniform in 1..=max.
    pub delay_max: u64,
    /// Probability a target refuses a snapshot.
    pub refuse: f64,
    /// Probability a service, having handled a message, sends one to another service.
    pub chatter: f64,
    /// Nodes that crash at a random moment while traffic flows (never all of them). A crashed
    /// node loses its instances and everything sent to it; the others notice after a while
    /// (`link_lost`). With crashes the run checks at most one live instance, no copy and no
    /// reordering of what is handled, and that no restored copy waits for ever; messages may
    /// be lost.
    pub crashes: usize,
    /// Probability a migration request moves every service its node hosts as one group, each
    /// to its own random target (a split tree). Without crashes the run checks that a group
    /// commits all or none.
    pub groups: f64,
    /// Probability that, as a protocol message is sent to a node, a lying peer (a node with a
    /// valid certificate that hosts nothing) sends the same node a forgery of it: the message
    /// in its own name, and for a location, naming itself at epoch `u64::MAX` or the next. The
    /// run checks that every forgery is refused or ignored, changes nothing, and that every
    /// other promise still holds.
    pub liar: f64,
    /// Probability a single migration copies the service's state ahead first (pre-copy): the
    /// service runs on while its log, kept in a [`tern::TrackedMap`] as a real service's is,
    /// goes to the target in rounds; it freezes when little is left or at the pre-copy
    /// deadline. The run checks that an attempt aborted during its rounds leaves the service
    /// running where it was with nothing lost, and that every committed pre-copied state is
    /// exactly the source's (what went ahead, then the changes at the freeze).
    pub precopy: f64,
    /// Probability a pre-copy round breaks its stream (the attempt aborts).
    pub precopy_break: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 3,
            services: 2,
            msgs_per_sender: 20,
            migrations: 8,
            loss: 0.1,
            dup: 0.05,
            delay_max: 20,
            refuse: 0.1,
            chatter: 0.3,
            crashes: 0,
            groups: 0.0,
            liar: 0.0,
            precopy: 0.0,
            precopy_break: 0.0,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Migrations committed.
    pub committed: u64,
    /// Migrations aborted, by reason.
    pub aborted: BTreeMap<String, u64>,
    /// Messages sent by all senders.
    pub sent: u64,
    /// Messages handled by all services.
    pub handled: u64,
    /// Protocol messages lost by the network.
    pub lost: u64,
    /// Events processed.
    pub events: u64,
    /// Nodes crashed.
    pub crashed: u64,
    /// Restored copies dropped because their source never decided.
    pub orphaned: u64,
    /// Group migrations asked, committed whole, aborted whole.
    pub groups: (u64, u64, u64),
    /// Claims a node refused, by claim: honest nodes refuse only stale words (a location from
    /// a node that no longer hosts the service, when this node missed a move).
    pub claims_refused: BTreeMap<&'static str, u64>,
    /// Forgeries the lying peer sent, and those refused (the rest were ignored), by claim.
    pub forged: (u64, BTreeMap<&'static str, u64>),
    /// Pre-copies started, ended by their freeze, aborted during their rounds; pre-copied
    /// states installed and checked against their source's.
    pub precopies: (u64, u64, u64, u64),
}

/// splitmix64: small, seedable, good enough to pick delays and dice. Shared by the simulations.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 >= 1.0 - p
    }
}

enum Event {
    Net {
        to: usize,
        from: usize,
        msg: Msg,
    },
    /// From the lying peer.
    Forged {
        to: usize,
        msg: Msg,
    },
    Process {
        node: usize,
        service: ServiceId,
    },
    Send {
        node: usize,
        service: ServiceId,
    },
    Migrate {
        service: ServiceId,
        to: usize,
    },
    Frozen {
        node: usize,
        service: ServiceId,
    },
    Tick {
        node: usize,
    },
    /// A round of `service`'s pre-copy for attempt `mig` on `node`.
    Round {
        node: usize,
        service: ServiceId,
        mig: MigrationId,
    },
    Crash {
        node: usize,
    },
    /// `node` notices that `dead` is gone (its connection timed out).
    Detect {
        node: usize,
        dead: usize,
    },
}

struct Instance {
    log: Log,
    /// What the log says of each sender (messages handled, last number), kept as a real
    /// service keeps its large state: in a map the runtime can copy ahead, each entry
    /// rewritten as messages come.
    tracked: TrackedMap<ServiceId, (u64, u64)>,
    queue: VecDeque<Data<()>>,
    running: bool,
}

impl Instance {
    fn new(log: Log, queue: VecDeque<Data<()>>, running: bool) -> Instance {
        let tracked = per_sender(&log);
        Instance {
            log,
            tracked,
            queue,
            running,
        }
    }
}

/// Per sender in `log`: messages handled and the last number.
fn per_sender(log: &Log) -> TrackedMap<ServiceId, (u64, u64)> {
    let mut m = TrackedMap::new();
    for (from, seq) in log {
        let (n, _) = m.get(from).copied().unwrap_or((0, 0));
        m.insert(*from, (n + 1, *seq));
    }
    m
}

/// A pre-copy under way: its attempt, its target, and what the target has built.
struct Copy {
    mig: MigrationId,
    to: usize,
}

/// Bytes of entries per simulated round (a few entries), and the bytes left at which the
/// source asks to freeze.
const ROUND_BYTES: usize = 24;
const LAST_BYTES: usize = 16;

struct Node {
    core: Core<Log, ()>,
    instances: BTreeMap<ServiceId, Instance>,
    sender: ServiceId,
}

struct Sim {
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    order: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Event>>,
    nodes: Vec<Node>,
    names: Vec<NodeName>,
    sent: BTreeMap<(ServiceId, ServiceId), u64>,
    services: Vec<ServiceId>,
    /// Crashed nodes: nothing reaches them and they do nothing more.
    dead: Vec<bool>,
    /// Service-to-service messages still allowed, so a run always ends.
    chatter_left: u64,
    report: SimReport,
    /// Per attempt in a group: the group's index.
    group_of: BTreeMap<tern_proto::migration::MigrationId, usize>,
    /// Per group: members, committed, aborted.
    group_outcomes: Vec<(usize, usize, usize)>,
    /// Members of a group not yet frozen nor reported, by source node and service: the
    /// group's index. A group's members freeze in one step (none while another still copies
    /// ahead) or not at all.
    unfrozen: BTreeMap<(usize, ServiceId), (usize, MigrationId)>,
    /// Pre-copies under way, by source node and service.
    copies: BTreeMap<(usize, ServiceId), Copy>,
    /// What each target built from pre-copy rounds, by node and attempt (lost with the node).
    built: BTreeMap<(usize, MigrationId), TrackedMap<ServiceId, (u64, u64)>>,
    /// Attempts whose freeze left the tracked part to what went ahead.
    precopied: std::collections::BTreeSet<MigrationId>,
    /// The attempt whose snapshot is being received now.
    receiving: Option<MigrationId>,
}

const TICK_EVERY: u64 = 5;

fn is_control(msg: &Msg) -> bool {
    !matches!(msg, Wire::Data { .. })
}

impl Sim {
    fn at(&mut self, delay: u64, ev: Event) {
        self.order += 1;
        let idx = self.events.len();
        self.events.push(Some(ev));
        self.queue
            .push(Reverse((self.now + delay, self.order, idx)));
    }

    fn node_of(&self, name: &NodeName) -> Option<usize> {
        let i = self.names.iter().position(|n| n == name);
        assert!(
            i.is_some() || *name == liar(),
            "the simulation only names its own nodes"
        );
        i
    }

    /// A forgery of `msg` (on its way to `to`) in the lying peer's name, if it has one.
    fn forge(&mut self, to: usize, msg: &Msg) {
        if self.cfg.liar == 0.0 || !self.rng.chance(self.cfg.liar) {
            return;
        }
        let forged = match msg {
            Wire::Located { service, epoch, .. } | Wire::Moved { service, epoch, .. } => {
                let epoch = if self.rng.chance(0.5) {
                    u64::MAX
                } else {
                    epoch.saturating_add(1)
                };
                Wire::Located {
                    service: *service,
                    node: liar(),
                    epoch,
                }
            }
            Wire::Prepared { .. }
            | Wire::Query { .. }
            | Wire::Refused { .. }
            | Wire::Commit { .. }
            | Wire::CommitAck { .. }
            | Wire::Abort { .. } => msg.clone(),
            Wire::Data { .. } | Wire::Skipped { .. } | Wire::Snapshot { .. } => return,
        };
        let d = 1 + self.rng.below(self.cfg.delay_max);
        self.at(d, Event::Forged { to, msg: forged });
    }

    fn carry_out(&mut self, node: usize, actions: Vec<Action<Log, ()>>) -> Result<(), String> {
        // Per group: its members frozen by these actions.
        let mut frozen_now: BTreeMap<usize, usize> = BTreeMap::new();
        for action in actions {
            match &action {
                Action::Freeze { service } => {
                    if let Some((g, _)) = self.unfrozen.remove(&(node, *service)) {
                        *frozen_now.entry(g).or_default() += 1;
                    }
                }
                // The member's attempt ended (not another attempt's refusal as busy).
                Action::Report { service, mig, .. }
                    if self
                        .unfrozen
                        .get(&(node, *service))
                        .is_some_and(|(_, m)| m == mig) =>
                {
                    self.unfrozen.remove(&(node, *service));
                }
                _ => {}
            }
            match action {
                Action::ClaimRefused { refusal, peer } if peer == liar() => {
                    *self.report.forged.1.entry(refusal.claim).or_default() += 1;
                }
                Action::ClaimRefused { refusal, peer } => {
                    // Every other node is honest: only a stale location may be refused.
                    if refusal.claim != "location" {
                        return Err(format!(
                            "t={}: {} refused an honest claim from {peer}: {refusal}",
                            self.now, self.names[node]
                        ));
                    }
                    *self.report.claims_refused.entry(refusal.claim).or_default() += 1;
                }
                Action::Send { to, msg } => {
                    let Some(to) = self.node_of(&to) else {
                        continue; // To the lying peer: nobody listens.
                    };
                    if self.dead[to] {
                        continue;
                    }
                    if is_control(&msg) {
                        self.forge(to, &msg);
                    }
                    if is_control(&msg) && self.rng.chance(self.cfg.loss) {
                        self.report.lost += 1;
                        continue;
                    }
                    if self.rng.chance(self.cfg.dup) {
                        let d = 1 + self.rng.below(self.cfg.delay_max);
                        self.at(
                            d,
                            Event::Net {
                                to,
                                from: node,
                                msg: msg.clone(),
                            },
                        );
                    }
                    let d = 1 + self.rng.below(self.cfg.delay_max);
                    self.at(
                        d,
                        Event::Net {
                            to,
                            from: node,
                            msg,
                        },
                    );
                }
                Action::Enqueue { service, data } => {
                    if std::env::var_os("TERN_SIM_TRACE").is_some() {
                        eprintln!(
                            "    enqueue {}#{} for {} on {node}",
                            data.from.counter(),
                            data.seq,
                            service.counter()
                        );
                    }
                    let inst = self.nodes[node]
                        .instances
                        .get_mut(&service)
                        .ok_or_else(|| {
                            format!("enqueue for {service} on node {node}, which has no instance")
                        })?;
                    inst.queue.push_back(data);
                    if inst.running {
                        let d = 1 + self.rng.below(3);
                        self.at(d, Event::Process { node, service });
                    }
                }
                Action::Precopy { service, mig, to } => {
                    let inst = self.nodes[node]
                        .instances
                        .get_mut(&service)
                        .ok_or("pre-copy of a missing instance")?;
                    if !inst.running {
                        return Err(format!(
                            "pre-copy of {service} on {node}, which is not running"
                        ));
                    }
                    inst.tracked.track();
                    let to = self.node_of(&to).ok_or("pre-copy to the liar")?;
                    self.report.precopies.0 += 1;
                    self.copies.insert(
                        (node, service),
                        Copy {
                            mig: mig.clone(),
                            to,
                        },
                    );
                    if !self.dead[to] {
                        self.built.insert((to, mig.clone()), TrackedMap::new());
                    }
                    let d = 1 + self.rng.below(3);
                    self.at(d, Event::Round { node, service, mig });
                }
                Action::PrecopyEnded { service, mig } => {
                    let copy = self.copies.remove(&(node, service));
                    if copy.as_ref().map(|c| &c.mig) != Some(&mig) {
                        return Err(format!(
                            "pre-copy {mig:?} of {service} on {node} ended, but it was not copying"
                        ));
                    }
                    // Untouched: it runs where it was, with its state.
                    let inst = self.nodes[node]
                        .instances
                        .get_mut(&service)
                        .ok_or_else(|| {
                            format!(
                                "pre-copy of {service} on {node} aborted and the service is gone"
                            )
                        })?;
                    if !inst.running {
                        return Err(format!(
                            "pre-copy of {service} on {node} aborted, leaving it stopped"
                        ));
                    }
                    inst.tracked.untrack();
                    if let Some(c) = copy {
                        self.built.remove(&(c.to, mig));
                    }
                    self.report.precopies.2 += 1;
                }
                Action::Freeze { service } => {
                    if let Some(c) = self.copies.remove(&(node, service)) {
                        // The freeze sends what is left, then the snapshot, on one stream.
                        self.finish_copy(node, service, c)?;
                    }
                    let inst = self.nodes[node]
                        .instances
                        .get_mut(&service)
                        .ok_or("freeze of a missing instance")?;
                    inst.running = false;
                    // The message in hand finishes first.
                    let d = self.rng.below(4);
                    self.at(d, Event::Frozen { node, service });
                }
                Action::Install { snap } => {
                    let service = snap.service;
                    if self.nodes[node].instances.contains_key(&service) {
                        return Err(format!(
                            "install of {service} over a live instance on {node}"
                        ));
                    }
                    let mig = self.receiving.clone().ok_or("install outside a snapshot")?;
                    if self.precopied.contains(&mig) {
                        // What went ahead plus the changes at the freeze is the source's state.
                        let built = self.built.remove(&(node, mig.clone())).ok_or_else(|| {
                            format!("pre-copied {service} installed on {node} with nothing built")
                        })?;
                        let want = per_sender(&snap.state);
                        if built != want {
                            return Err(format!(
                                "pre-copied {service} on {node} holds {built:?}, its source {want:?}"
                            ));
                        }
                        self.report.precopies.3 += 1;
                    }
                    self.nodes[node]
                        .instances
                        .insert(service, Instance::new(snap.state, snap.queue.into(), false));
                }
                Action::Start { service } | Action::Resume { service, .. } => {
                    let queue = match action {
                        Action::Resume { queue, .. } => Some(queue),
                        _ => None,
                    };
                    let inst = self.nodes[node]
                        .instances
                        .get_mut(&service)
                        .ok_or("start or resume of a missing instance")?;
                    if let Some(q) = queue {
                        if !inst.queue.is_empty() {
                            return Err("resume while messages were queued after freezing".into());
                        }
                        inst.queue = q.into();
                    }
                    inst.running = true;
                    self.at(1, Event::Process { node, service });
                }
                Action::Retire { service } => {
                    let inst = self.nodes[node]
                        .instances
                        .remove(&service)
                        .ok_or("retire of a missing instance")?;
                    if !inst.queue.is_empty() || inst.running {
                        return Err(format!(
                            "retired {service} on {node} with {} queued (running {})",
                            inst.queue.len(),
                            inst.running
                        ));
                    }
                }
                Action::Discard { service } => {
                    let inst = self.nodes[node]
                        .instances
                        .remove(&service)
                        .ok_or("discard of a missing instance")?;
                    if inst.running {
                        return Err(format!("discarded a running {service} on {node}"));
                    }
                }
                Action::Orphan { service, .. } => {
                    if self.cfg.crashes == 0 {
                        return Err(format!(
                            "copy of {service} on {node} orphaned, though every source lives and answers"
                        ));
                    }
                    let inst = self.nodes[node]
                        .instances
                        .remove(&service)
                        .ok_or("orphan of a missing instance")?;
                    if inst.running {
                        return Err(format!("orphaned a running {service} on {node}"));
                    }
                    self.report.orphaned += 1;
                }
                Action::Refuse { reason, .. }
                    if self.cfg.crashes > 0 && reason.contains("orphaned") => {}
                Action::Refuse { data, reason } => {
                    return Err(format!(
                        "message {} from {} to {} refused on node {node} ({reason}); the bounds are large enough that this must not happen",
                        data.seq, data.from, data.to
                    ));
                }
                Action::Report { outcome, mig, .. } => match outcome {
                    Outcome::Committed { .. } => {
                        self.report.committed += 1;
                        if let Some(g) = self.group_of.get(&mig) {
                            self.group_outcomes[*g].1 += 1;
                        }
                    }
                    Outcome::Aborted(reason) => {
                        if let Some(g) = self.group_of.get(&mig) {
                            self.group_outcomes[*g].2 += 1;
                        }
                        let key = match reason {
                            AbortReason::Refused(_) => "refused".to_string(),
                            AbortReason::Group(_) => "group".to_string(),
                            other => format!("{other:?}").to_lowercase(),
                        };
                        *self.report.aborted.entry(key).or_default() += 1;
                    }
                },
            }
        }
        for (g, n) in frozen_now {
            let members = self.group_outcomes[g].0;
            if n != members {
                return Err(format!(
                    "t={}: group {g} froze {n} of its {members} members in one step",
                    self.now
                ));
            }
        }
        Ok(())
    }

    /// At the freeze: the changes left go to the target, ahead of the snapshot.
    fn finish_copy(&mut self, node: usize, service: ServiceId, c: Copy) -> Result<(), String> {
        let inst = self.nodes[node]
            .instances
            .get_mut(&service)
            .ok_or("a freeze of a missing instance")?;
        let mut rest = Vec::new();
        while inst
            .tracked
            .take_changes(ROUND_BYTES, &mut rest)
            .map_err(|e| format!("encoding the last changes: {e}"))?
            > 0
        {}
        inst.tracked.untrack();
        if let Some(b) = self.built.get_mut(&(c.to, c.mig.clone())) {
            b.apply(&rest)
                .map_err(|e| format!("applying the last changes: {e}"))?;
        }
        self.precopied.insert(c.mig);
        self.report.precopies.1 += 1;
        Ok(())
    }

    fn check_one_live(&self) -> Result<(), String> {
        let mut live: BTreeMap<ServiceId, usize> = BTreeMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for (s, inst) in &n.instances {
                if inst.running {
                    *live.entry(*s).or_default() += 1;
                    if !n.core.is_live(*s) {
                        return Err(format!("{s} runs on {i} but its core there is not live"));
                    }
                }
            }
        }
        match live.iter().find(|(_, &n)| n > 1) {
            Some((s, n)) => Err(format!("{n} live instances of {s}")),
            None => Ok(()),
        }
    }

    fn step(&mut self, ev: Event) -> Result<(), String> {
        let on = match &ev {
            Event::Net { to, .. } | Event::Forged { to, .. } => Some(*to),
            Event::Process { node, .. }
            | Event::Send { node, .. }
            | Event::Frozen { node, .. }
            | Event::Tick { node }
            | Event::Round { node, .. }
            | Event::Crash { node }
            | Event::Detect { node, .. } => Some(*node),
            Event::Migrate { .. } => None,
        };
        if on.is_some_and(|n| self.dead[n]) {
            return Ok(());
        }
        match ev {
            Event::Crash { node } => {
                if self.dead.iter().filter(|d| !**d).count() > 1 {
                    self.dead[node] = true;
                    self.nodes[node].instances.clear();
                    self.copies.retain(|(n, _), _| *n != node);
                    self.unfrozen.retain(|(n, _), _| *n != node);
                    self.built.retain(|(n, _), _| *n != node);
                    self.report.crashed += 1;
                    // The others notice only after their idle timeout.
                    for other in 0..self.nodes.len() {
                        if other != node {
                            let d = 10 * self.cfg.delay_max + self.rng.below(self.cfg.delay_max);
                            self.at(
                                d,
                                Event::Detect {
                                    node: other,
                                    dead: node,
                                },
                            );
                        }
                    }
                }
            }
            Event::Detect { node, dead } => {
                let name = self.names[dead].clone();
                let actions = self.nodes[node].core.link_lost(&name);
                self.carry_out(node, actions)?;
            }
            Event::Net { to, from, msg } => {
                self.receiving = match &msg {
                    Wire::Snapshot { mig, .. } => Some(mig.clone()),
                    _ => None,
                };
                let actions = self.nodes[to].core.receive(self.names[from].clone(), msg);
                self.carry_out(to, actions)?;
                self.receiving = None;
            }
            Event::Round { node, service, mig } => {
                let Some(c) = self.copies.get(&(node, service)).filter(|c| c.mig == mig) else {
                    return Ok(()); // Ended: frozen or aborted.
                };
                let to = c.to;
                if self.rng.chance(self.cfg.precopy_break) {
                    let actions =
                        self.nodes[node]
                            .core
                            .precopy_failed(service, &mig, "stream broke".into());
                    return self.carry_out(node, actions);
                }
                let inst = self.nodes[node]
                    .instances
                    .get_mut(&service)
                    .ok_or("a pre-copy round of a missing instance")?;
                let mut chunk = Vec::new();
                inst.tracked
                    .take_changes(ROUND_BYTES, &mut chunk)
                    .map_err(|e| format!("encoding a round: {e}"))?;
                let left = inst.tracked.unsent_bytes();
                if let Some(b) = self.built.get_mut(&(to, mig.clone())) {
                    b.apply(&chunk)
                        .map_err(|e| format!("applying a round: {e}"))?;
                }
                if left.is_some_and(|b| b <= LAST_BYTES) {
                    let actions = self.nodes[node].core.precopied(service, &mig);
                    self.carry_out(node, actions)?;
                } else {
                    // A round takes about as long as a message to the target.
                    let d = 1 + self.rng.below(self.cfg.delay_max);
                    self.at(d, Event::Round { node, service, mig });
                }
            }
            Event::Forged { to, msg } => {
                self.report.forged.0 += 1;
                let what = format!("{msg:?}");
                let actions = self.nodes[to].core.receive(liar(), msg);
                // A forgery changes nothing: the node refuses it, ignores it, or at most
                // answers the liar.
                let changes = actions.iter().any(|a| match a {
                    Action::ClaimRefused { .. } => false,
                    Action::Send { to, .. } => *to != liar(),
                    _ => true,
                });
                if changes {
                    return Err(format!(
                        "t={}: a forgery changed {}: {what} -> {} actions",
                        self.now,
                        self.names[to],
                        actions.len()
                    ));
                }
                self.carry_out(to, actions)?;
            }
            Event::Process { node, service } => {
                let Some(inst) = self.nodes[node].instances.get_mut(&service) else {
                    return Ok(());
                };
                if !inst.running {
                    return Ok(());
                }
                if let Some(d) = inst.queue.pop_front() {
                    let last = inst
                        .log
                        .iter()
                        .rev()
                        .find(|(s, _)| *s == d.from)
                        .map_or(0, |(_, q)| *q);
                    let in_order = if self.cfg.crashes > 0 {
                        // Messages may be lost with a crashed node; never copied or reordered.
                        d.seq > last
                    } else {
                        d.seq == last + 1
                    };
                    if !in_order {
                        return Err(format!(
                            "{service} on {node} handled message {} from {} after {last}",
                            d.seq, d.from
                        ));
                    }
                    let (n, _) = inst.tracked.get(&d.from).copied().unwrap_or((0, 0));
                    inst.tracked.insert(d.from, (n + 1, d.seq));
                    inst.log.push((d.from, d.seq));
                    let more = !inst.queue.is_empty();
                    if std::env::var_os("TERN_SIM_TRACE").is_some() {
                        eprintln!(
                            "    handled {}#{} by {} on {node}",
                            d.from.counter(),
                            d.seq,
                            service.counter()
                        );
                    }
                    self.report.handled += 1;
                    if more {
                        let d = 1 + self.rng.below(3);
                        self.at(d, Event::Process { node, service });
                    }
                    // Services talk to each other too, and keep numbering their messages
                    // wherever they move.
                    if self.services.len() > 1
                        && self.chatter_left > 0
                        && self.rng.chance(self.cfg.chatter)
                    {
                        self.chatter_left -= 1;
                        let k = self.rng.below(self.services.len() as u64 - 1) as usize;
                        let others: Vec<ServiceId> = self
                            .services
                            .iter()
                            .copied()
                            .filter(|s| *s != service)
                            .collect();
                        let to = others[k];
                        *self.sent.entry((to, service)).or_default() += 1;
                        self.report.sent += 1;
                        let actions = self.nodes[node].core.send_from(service, to, ());
                        self.carry_out(node, actions)?;
                    }
                }
            }
            Event::Send { node, service } => {
                let sender = self.nodes[node].sender;
                *self.sent.entry((service, sender)).or_default() += 1;
                self.report.sent += 1;
                let actions = self.nodes[node].core.send_from(sender, service, ());
                self.carry_out(node, actions)?;
            }
            Event::Migrate { service, to } => {
                let at = (0..self.nodes.len())
                    .find(|&i| !self.dead[i] && self.nodes[i].core.epoch(service).is_some());
                if let Some(node) = at.filter(|_| self.rng.chance(self.cfg.groups)) {
                    // Everything this node hosts, each to its own other node.
                    let hosted: Vec<ServiceId> = self
                        .services
                        .iter()
                        .copied()
                        .filter(|s| self.nodes[node].core.epoch(*s).is_some())
                        .collect();
                    // Some members copy their state ahead first (as large ones would).
                    let members: Vec<(ServiceId, NodeName, bool)> = hosted
                        .into_iter()
                        .map(|s| {
                            let k = 1 + self.rng.below(self.nodes.len() as u64 - 1) as usize;
                            let precopy = self.rng.chance(self.cfg.precopy);
                            (
                                s,
                                self.names[(node + k) % self.nodes.len()].clone(),
                                precopy,
                            )
                        })
                        .collect();
                    let (migs, actions) = self.nodes[node].core.migrate_group_with(&members);
                    let g = self.group_outcomes.len();
                    self.group_outcomes.push((members.len(), 0, 0));
                    for ((s, _, _), mig) in members.iter().zip(&migs) {
                        self.unfrozen.insert((node, *s), (g, mig.clone()));
                    }
                    self.report.groups.0 += 1;
                    for mig in migs {
                        self.group_of.insert(mig, g);
                    }
                    self.carry_out(node, actions)?;
                } else if let Some(node) = at {
                    // Mostly to another node; now and then to where it already is.
                    let to = if to == node && !self.rng.chance(0.1) {
                        (node + 1 + self.rng.below(self.nodes.len() as u64 - 1) as usize)
                            % self.nodes.len()
                    } else {
                        to
                    };
                    let precopy = self.rng.chance(self.cfg.precopy);
                    let (_, actions) = self.nodes[node].core.migrate_with(
                        service,
                        self.names[to].clone(),
                        precopy,
                    );
                    self.carry_out(node, actions)?;
                }
            }
            Event::Frozen { node, service } => {
                let Some(inst) = self.nodes[node].instances.get_mut(&service) else {
                    return Err("frozen instance vanished".into());
                };
                let state = inst.log.clone();
                let queue: Vec<_> = inst.queue.drain(..).collect();
                let actions = self.nodes[node].core.frozen(service, state, queue);
                self.carry_out(node, actions)?;
            }
            Event::Tick { node } => {
                let now = self.now;
                let actions = self.nodes[node].core.tick(now);
                self.carry_out(node, actions)?;
            }
        }
        self.check_one_live()
    }
}

/// The lying peer's name.
fn liar() -> NodeName {
    NodeName::new("liar")
}

fn describe(ev: &Event) -> String {
    match ev {
        Event::Forged { to, msg } => format!("forged to {to}: {msg:?}"),
        Event::Net { to, from, msg } => match msg {
            Wire::Data { data, origin } => format!(
                "net {from}->{to} data {}#{} for {} (origin {origin})",
                data.from.counter(),
                data.seq,
                data.to.counter()
            ),
            Wire::Snapshot { mig, snap } => format!(
                "net {from}->{to} snapshot {}#{} epoch {} queue {:?} marks {:?}",
                mig.source,
                mig.n,
                snap.epoch,
                snap.queue
                    .iter()
                    .map(|d| (d.from.counter(), d.seq))
                    .collect::<Vec<_>>(),
                snap.watermarks
                    .iter()
                    .map(|(s, w)| (s.counter(), w.0))
                    .collect::<Vec<_>>()
            ),
            other => format!("net {from}->{to} {other:?}"),
        },
        Event::Process { node, service } => format!("process {} on {node}", service.counter()),
        Event::Send { node, service } => format!("send from {node} to {}", service.counter()),
        Event::Migrate { service, to } => format!("migrate {} to {to}", service.counter()),
        Event::Frozen { node, service } => format!("frozen {} on {node}", service.counter()),
        Event::Tick { .. } => "tick".into(),
        Event::Round { node, service, mig } => {
            format!(
                "pre-copy round {} on {node} ({}#{})",
                service.counter(),
                mig.source,
                mig.n
            )
        }
        Event::Crash { node } => format!("crash {node}"),
        Event::Detect { node, dead } => format!("{node} notices {dead} is gone"),
    }
}

/// Runs one seeded simulation; `Err` says which invariant broke, and when.
pub fn run(seed: u64, cfg: &SimConfig) -> Result<SimReport, String> {
    let mut rng = Rng(seed);
    let names: Vec<NodeName> = (0..cfg.nodes)
        .map(|i| NodeName::new(&format!("n{i}")))
        .collect();
    let core_cfg = Config {
        retry_ticks: 3 * cfg.delay_max,
        deadline_ticks: 10 * cfg.delay_max,
        query_ticks: 4 * cfg.delay_max,
        // Long after any live source answers; short enough to happen within a crash run.
        // Without crashes no copy may be orphaned, yet the model drops datagrams that the
        // real transport retransmits, so a live source's answers can be lost many times in a
        // row: there the wait covers 40 query rounds (at 30% loss each way, all fail with a
        // chance of about 2e-12). With 10 rounds, seed 31077 of the storm sweep lost them all.
        // Long enough for most pre-copies to catch up, short enough for some to freeze at it.
        precopy_ticks: 8 * cfg.delay_max,
        orphan_ticks: if cfg.crashes == 0 {
            160 * cfg.delay_max
        } else {
            40 * cfg.delay_max
        },
        ..Config::default()
    };
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut policy_rng = Rng(seed ^ (0xa5a5 + i as u64));
        let refuse = cfg.refuse;
        let mut core = Core::with_policy(
            name.clone(),
            core_cfg.clone(),
            Box::new(move |_| {
                if policy_rng.chance(refuse) {
                    Err("policy says no".into())
                } else {
                    Ok(())
                }
            }),
        );
        for other in &names {
            core.add_peer(other.clone());
        }
        nodes.push(Node {
            core,
            instances: BTreeMap::new(),
            sender: ServiceId::from_parts(2, i as u64),
        });
    }
    let services: Vec<ServiceId> = (0..cfg.services as u64)
        .map(|k| ServiceId::from_parts(1, k))
        .collect();
    for &s in &services {
        let home = rng.below(cfg.nodes as u64) as usize;
        nodes[home].core.host(s);
        nodes[home]
            .instances
            .insert(s, Instance::new(Vec::new(), VecDeque::new(), true));
        for n in nodes.iter_mut() {
            n.core.learn(s, names[home].clone(), 0);
        }
    }
    let mut sim = Sim {
        cfg: cfg.clone(),
        rng,
        now: 0,
        order: 0,
        queue: BinaryHeap::new(),
        events: Vec::new(),
        nodes,
        names,
        sent: BTreeMap::new(),
        services: services.clone(),
        dead: vec![false; cfg.nodes],
        chatter_left: cfg.msgs_per_sender * cfg.services as u64,
        report: SimReport {
            seed,
            ..SimReport::default()
        },
        group_of: BTreeMap::new(),
        group_outcomes: Vec::new(),
        unfrozen: BTreeMap::new(),
        copies: BTreeMap::new(),
        built: BTreeMap::new(),
        precopied: std::collections::BTreeSet::new(),
        receiving: None,
    };
    let busy_until = cfg.msgs_per_sender * 8 + 50;
    for node in 0..cfg.nodes {
        for &s in &services {
            // Sends of one sender are spaced out in increasing time, so they are numbered in
            // the order they are issued.
            let mut t = 0;
            for _ in 0..cfg.msgs_per_sender {
                t += 1 + sim.rng.below(8);
                sim.at(t, Event::Send { node, service: s });
            }
        }
    }
    for _ in 0..cfg.migrations {
        let t = sim.rng.below(busy_until);
        let service = services[sim.rng.below(services.len() as u64) as usize];
        let to = sim.rng.below(cfg.nodes as u64) as usize;
        sim.at(t, Event::Migrate { service, to });
    }
    for _ in 0..cfg.crashes {
        let t = sim.rng.below(busy_until);
        let node = sim.rng.below(cfg.nodes as u64) as usize;
        sim.at(t, Event::Crash { node });
    }
    let end = busy_until + 60 * cfg.delay_max;
    let mut t = 0;
    while t <= end {
        for node in 0..cfg.nodes {
            sim.at(t, Event::Tick { node });
        }
        t += TICK_EVERY;
    }
    while let Some(Reverse((time, _, idx))) = sim.queue.pop() {
        sim.now = time;
        let Some(ev) = sim.events[idx].take() else {
            continue;
        };
        sim.report.events += 1;
        if std::env::var_os("TERN_SIM_TRACE").is_some() {
            eprintln!("t={time} {}", describe(&ev));
        }
        sim.step(ev)
            .map_err(|e| format!("seed {seed}, time {time}: {e}"))?;
    }
    if cfg.crashes > 0 {
        // At most one instance of each service, and no restored copy left waiting.
        for &s in &services {
            let on: Vec<usize> = (0..cfg.nodes)
                .filter(|&i| !sim.dead[i] && sim.nodes[i].instances.contains_key(&s))
                .collect();
            if on.len() > 1 {
                return Err(format!("seed {seed}: {s} ends with instances on {on:?}"));
            }
            if let [node] = on[..] {
                if !sim.nodes[node].instances[&s].running {
                    return Err(format!(
                        "seed {seed}: {s} ends as a copy on {node} that never ran"
                    ));
                }
            }
        }
        return Ok(sim.report);
    }
    // Groups: all or none, and every member reported.
    for (g, &(members, committed, aborted)) in sim.group_outcomes.iter().enumerate() {
        if committed + aborted != members {
            return Err(format!(
                "seed {seed}: group {g} of {members} reported {committed} committed and {aborted} aborted"
            ));
        }
        if committed != 0 && committed != members {
            return Err(format!(
                "seed {seed}: group {g} committed {committed} of its {members} members"
            ));
        }
        if committed == members {
            sim.report.groups.1 += 1;
        } else {
            sim.report.groups.2 += 1;
        }
    }
    for n in &sim.nodes {
        if n.core.groups() != 0 {
            return Err(format!(
                "seed {seed}: {} groups left open on {}",
                n.core.groups(),
                n.core.name()
            ));
        }
    }
    // Everything settled: each service runs once, having handled all that was sent to it.
    for &s in &services {
        let live: Vec<usize> = (0..cfg.nodes)
            .filter(|&i| sim.nodes[i].instances.get(&s).is_some_and(|x| x.running))
            .collect();
        let [node] = live[..] else {
            return Err(format!("seed {seed}: {s} ends live on {live:?}"));
        };
        let inst = &sim.nodes[node].instances[&s];
        if !inst.queue.is_empty() {
            return Err(format!(
                "seed {seed}: {s} ends with {} queued",
                inst.queue.len()
            ));
        }
        for n in &sim.nodes {
            let want = sim.sent.get(&(s, n.sender)).copied().unwrap_or(0);
            let got = inst
                .log
                .iter()
                .filter(|(from, _)| *from == n.sender)
                .count() as u64;
            if got != want {
                return Err(format!(
                    "seed {seed}: {s} handled {got} of the {want} messages from {}",
                    n.sender
                ));
            }
        }
    }
    if sim.report.handled != sim.report.sent {
        return Err(format!(
            "seed {seed}: {} handled of {} sent",
            sim.report.handled, sim.report.sent
        ));
    }
    Ok(sim.report)
}
