//! Placement: which node each service should run on, and why. Pure functions over a view of
//! the cluster (nodes with capabilities, load and power; services with their needs and where
//! they run; observed traffic between services). No I/O: the node builds the view from its
//! membership table, directory and traffic table, and carries out the moves.
//!
//! The order of concerns is fixed: a node that lacks a required capability, is draining, is
//! not reachable or is excluded is never chosen; among the rest a [`Policy`] scores each node
//! (the default, [`AffinityPolicy`], weighs preferred capabilities, then affinity: being where
//! the services it talks to most are, then load and power). Every decision carries its reasons.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::ids::{KindKey, NodeName, ServiceId};

/// What a service kind needs from a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Needs {
    /// Capabilities a node must have to host it.
    pub required: Vec<String>,
    /// Capabilities it is better off with.
    pub preferred: Vec<String>,
    /// Older versions of the kind its version writes (it declares a downgrade to each): a
    /// node running one of them takes the service, written as that version's.
    #[serde(default)]
    pub writes: Vec<u32>,
}

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// The node.
    pub name: NodeName,
    /// What it offers now.
    pub capabilities: Vec<String>,
    /// Services it hosts.
    pub services: u64,
    /// Messages queued on it.
    pub backlog: u64,
    /// Charge left in percent (100 when plugged in).
    pub power_percent: u8,
    /// Reachable (connected, or this node).
    pub up: bool,
    /// Moving its services away: takes none.
    pub draining: bool,
    /// The kinds (with their versions) registered there: it runs these.
    pub kinds: Vec<KindKey>,
    /// Older versions of those kinds whose services it takes too, upgrading them on arrival
    /// (the kind declares how). It hosts nothing else.
    #[serde(default)]
    pub reads: Vec<KindKey>,
}

impl NodeView {
    fn has(&self, cap: &str) -> bool {
        self.capabilities.iter().any(|c| c == cap)
    }

    /// The version of kind `name` this node runs (the newest, should it register several).
    pub fn runs_version(&self, name: &str) -> Option<u32> {
        self.kinds
            .iter()
            .filter(|k| k.name == name)
            .map(|k| k.version)
            .max()
    }

    /// Whether it can host a service of `kind`: it runs that version, or reads it.
    pub fn takes(&self, kind: &KindKey) -> bool {
        self.kinds.contains(kind) || self.reads.contains(kind)
    }

    /// The older version a service of `kind` is written as to move here: the version this
    /// node runs, when it does not take `kind` itself and `writes` (the versions the kind
    /// declares downgrades to) has it. `None` when the service travels as it is.
    pub fn written_as(&self, kind: &KindKey, writes: &[u32]) -> Option<u32> {
        if self.takes(kind) {
            return None;
        }
        self.runs_version(&kind.name)
            .filter(|v| *v < kind.version && writes.contains(v))
    }

    /// Why this node cannot take a service of `kind` needing `needs`, whoever asks; `None`
    /// when it can. Reachability and exclusions are the caller's to check.
    pub fn unfit(&self, kind: &KindKey, needs: &Needs) -> Option<Unfit> {
        if self.draining {
            return Some(Unfit::Draining {
                node: self.name.clone(),
            });
        }
        if !self.takes(kind) && self.written_as(kind, &needs.writes).is_none() {
            return Some(match self.runs_version(&kind.name) {
                Some(runs) => Unfit::OtherVersion {
                    node: self.name.clone(),
                    kind: kind.clone(),
                    runs,
                },
                None => Unfit::LacksKind {
                    node: self.name.clone(),
                    kind: kind.clone(),
                },
            });
        }
        let missing: Vec<String> = needs
            .required
            .iter()
            .filter(|c| !self.has(c))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Some(Unfit::LacksCapability {
                node: self.name.clone(),
                missing,
            });
        }
        None
    }

    /// Why this node refuses an explicit move of a service of `kind` needing `needs`: as
    /// [`unfit`](Self::unfit), except that a `forced` move ignores draining and missing
    /// capabilities (never a missing kind: the node could not run it).
    pub fn refuses(&self, kind: &KindKey, needs: &Needs, forced: bool) -> Option<Unfit> {
        match self.unfit(kind, needs)? {
            u @ (Unfit::LacksKind { .. } | Unfit::OtherVersion { .. }) => Some(u),
            _ if forced => None,
            u => Some(u),
        }
    }

    /// How many of `needs`' preferred capabilities this node has.
    pub fn preferred_met(&self, needs: &Needs) -> usize {
        needs.preferred.iter().filter(|c| self.has(c)).count()
    }
}

/// Why a node cannot take a service: the same reasons rule a node out of a plan and refuse an
/// explicit move to it before anything freezes (unless the caller forces the move).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Unfit {
    /// The node is draining: it takes no more services.
    Draining {
        /// The node.
        node: NodeName,
    },
    /// The node has not registered the kind (or not this version of it).
    LacksKind {
        /// The node.
        node: NodeName,
        /// The kind it lacks.
        kind: KindKey,
    },
    /// The node runs another version of the kind, and cannot take this one: an older
    /// version the service's kind declares no downgrade to, or a newer one that does not
    /// declare how to upgrade from it.
    OtherVersion {
        /// The node.
        node: NodeName,
        /// The kind and version of the service.
        kind: KindKey,
        /// The version the node runs.
        runs: u32,
    },
    /// The node lacks capabilities the kind requires.
    LacksCapability {
        /// The node.
        node: NodeName,
        /// The required capabilities it lacks.
        missing: Vec<String>,
    },
}

impl std::fmt::Display for Unfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unfit::Draining { node } => write!(f, "node {node} is draining"),
            Unfit::LacksKind { node, kind } => {
                write!(f, "node {node} has not registered kind {kind}")
            }
            Unfit::OtherVersion { node, kind, runs } if *runs < kind.version => write!(
                f,
                "node {node} runs {}@{runs}, older than {kind}: a service moves to an older \
                 version of its kind only written as that version's, by a downgrade to version \
                 {runs} that {kind} declares",
                kind.name
            ),
            Unfit::OtherVersion { node, kind, runs } => write!(
                f,
                "node {node} runs {}@{runs}, which does not read {kind}: version {runs} \
                 declares no upgrade from version {}",
                kind.name, kind.version
            ),
            Unfit::LacksCapability { node, missing } => {
                write!(f, "node {node} lacks required {}", missing.join(", "))
            }
        }
    }
}

/// A service as placement sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    /// The service.
    pub id: ServiceId,
    /// Its kind.
    pub kind: KindKey,
    /// Where it runs.
    pub at: NodeName,
    /// What its kind needs.
    pub needs: Needs,
    /// Pinned services are never moved by placement.
    pub pinned: bool,
    /// Held where a user's explicit move or placement put it: only another explicit move, a
    /// drain, or its node losing a required capability moves it.
    pub held: bool,
}

/// Traffic between the service being placed and the nodes its peers run on: messages per
/// second (both directions) exchanged with services on each node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Affinity {
    /// Per node.
    pub by_node: BTreeMap<NodeName, f64>,
    /// All observed traffic of the service (including peers whose node is unknown).
    pub total: f64,
}

impl Affinity {
    /// The fraction of the service's traffic exchanged with services on `node`.
    pub fn share(&self, node: &NodeName) -> f64 {
        if self.total <= 0.0 {
            return 0.0;
        }
        self.by_node.get(node).copied().unwrap_or(0.0) / self.total
    }
}

/// What a policy sees besides the service and one node.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// Every candidate node (for relative load).
    pub nodes: &'a [NodeView],
    /// The service's traffic by node.
    pub affinity: &'a Affinity,
}

/// One node's score for one service, with the reasons that make it up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Higher is better.
    pub value: f64,
    /// What added or took away, in words.
    pub reasons: Vec<String>,
}

/// A placement strategy: scores a node that meets the service's required capabilities.
///
/// ```
/// use tern_proto::placement::{Context, NodeView, Policy, Score, ServiceView};
///
/// /// Prefers plugged-in devices, and otherwise the one with the fewest services.
/// struct PluggedFirst;
///
/// impl Policy for PluggedFirst {
///     fn name(&self) -> &str { "plugged-first" }
///     fn score(&self, _svc: &ServiceView, node: &NodeView, _cx: &Context<'_>) -> Score {
///         let plugged = if node.power_percent == 100 { 100.0 } else { 0.0 };
///         Score {
///             value: plugged - node.services as f64,
///             reasons: vec![format!("power {}%, {} services", node.power_percent, node.services)],
///         }
///     }
/// }
/// ```
pub trait Policy: Send + Sync {
    /// The policy's name, shown with its decisions.
    fn name(&self) -> &str;
    /// Scores `node` for `svc`.
    fn score(&self, svc: &ServiceView, node: &NodeView, cx: &Context<'_>) -> Score;
}

/// The default policy: preferred capabilities, then affinity, then load and power.
#[derive(Debug, Clone)]
pub struct AffinityPolicy {
    /// Added per preferred capability the node has.
    pub preferred_weight: f64,
    /// Times the share of the service's traffic exchanged with services on the node.
    pub affinity_weight: f64,
    /// Times the node's services relative to the busiest candidate's (taken away).
    pub load_weight: f64,
    /// Times the missing charge (0 plugged in, 1 empty) (taken away).
    pub power_weight: f64,
    /// Added to the node the service is on, so that a move must gain at least this much.
    pub stay_bonus: f64,
    /// Added to a node that runs the newest version of the service's kind, when the candidates
    /// run different versions: during a rolling update, services gather on updated devices.
    pub newest_version_weight: f64,
}

impl Default for AffinityPolicy {
    fn default() -> Self {
        AffinityPolicy {
            preferred_weight: 10.0,
            affinity_weight: 10.0,
            load_weight: 1.0,
            power_weight: 2.0,
            stay_bonus: 0.5,
            newest_version_weight: 4.0,
        }
    }
}

impl Policy for AffinityPolicy {
    fn name(&self) -> &str {
        "affinity"
    }

    fn score(&self, svc: &ServiceView, node: &NodeView, cx: &Context<'_>) -> Score {
        let mut value = 0.0;
        let mut reasons = Vec::new();
        for p in &svc.needs.preferred {
            if node.has(p) {
                value += self.preferred_weight;
                reasons.push(format!("has preferred {p} (+{:.1})", self.preferred_weight));
            }
        }
        let share = cx.affinity.share(&node.name);
        if share > 0.0 {
            let v = self.affinity_weight * share;
            value += v;
            reasons.push(format!(
                "{:.0}% of its traffic is with services there (+{v:.1})",
                share * 100.0
            ));
        }
        let busiest = cx
            .nodes
            .iter()
            .map(|n| n.services)
            .max()
            .unwrap_or(0)
            .max(1);
        let load = self.load_weight * node.services as f64 / busiest as f64;
        value -= load;
        reasons.push(format!("{} services (-{load:.2})", node.services));
        if node.power_percent < 100 {
            let p = self.power_weight * (100 - node.power_percent) as f64 / 100.0;
            value -= p;
            reasons.push(format!("battery {}% (-{p:.2})", node.power_percent));
        }
        let versions = cx
            .nodes
            .iter()
            .filter(|n| {
                n.up && (n.takes(&svc.kind) || n.written_as(&svc.kind, &svc.needs.writes).is_some())
            })
            .filter_map(|n| n.runs_version(&svc.kind.name));
        let (oldest, newest) = versions.fold((u32::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let runs = node.runs_version(&svc.kind.name);
        if oldest < newest && runs == Some(newest) {
            value += self.newest_version_weight;
            reasons.push(format!(
                "runs {}@{newest}, the newest version (+{:.1})",
                svc.kind.name, self.newest_version_weight
            ));
        }
        if node.name == svc.at {
            value += self.stay_bonus;
            reasons.push(format!("already there (+{:.1})", self.stay_bonus));
        }
        Score { value, reasons }
    }
}

/// Why a node was not a candidate, or the reasons it won.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// The node chosen (possibly where the service already is).
    pub node: NodeName,
    /// Its score.
    pub score: f64,
    /// Why: the winner's score parts, then what ruled the others out.
    pub reasons: Vec<String>,
}

/// Picks the node for `svc` among `nodes`, never one in `exclude`. `Err` lists why every node
/// was ruled out.
pub fn choose(
    policy: &dyn Policy,
    svc: &ServiceView,
    nodes: &[NodeView],
    affinity: &Affinity,
    exclude: &BTreeSet<NodeName>,
) -> Result<Choice, Vec<String>> {
    let mut ruled_out = Vec::new();
    let cx = Context { nodes, affinity };
    let mut best: Option<(f64, &NodeView, Score)> = None;
    let mut scored: Vec<(NodeName, f64)> = Vec::new();
    for node in nodes {
        if exclude.contains(&node.name) {
            ruled_out.push(format!("{}: excluded", node.name));
            continue;
        }
        if !node.up {
            ruled_out.push(format!("{}: not reachable", node.name));
            continue;
        }
        if let Some(why) = node.unfit(&svc.kind, &svc.needs) {
            ruled_out.push(ruled_out_as(&why));
            continue;
        }
        let score = policy.score(svc, node, &cx);
        scored.push((node.name.clone(), score.value));
        let better = match &best {
            None => true,
            Some((v, n, _)) => {
                score.value > *v
                    || (score.value == *v && node.name == svc.at)
                    || (score.value == *v && n.name != svc.at && node.name < n.name)
            }
        };
        if better {
            best = Some((score.value, node, score));
        }
    }
    match best {
        Some((value, node, score)) => {
            let mut reasons = Vec::new();
            if !svc.needs.required.is_empty() {
                reasons.push(format!("has required {}", svc.needs.required.join(", ")));
            }
            reasons.extend(score.reasons);
            for (n, v) in scored {
                if n != node.name {
                    reasons.push(format!("{n}: scored {v:.2} against {value:.2}"));
                }
            }
            reasons.extend(ruled_out);
            Ok(Choice {
                node: node.name.clone(),
                score: value,
                reasons,
            })
        }
        None => Err(ruled_out),
    }
}

/// How a plan's reasons say why a node was ruled out.
fn ruled_out_as(why: &Unfit) -> String {
    match why {
        Unfit::Draining { node } => format!("{node}: draining"),
        Unfit::LacksKind { node, kind } => format!("{node}: has not registered kind {kind}"),
        Unfit::OtherVersion { node, kind, runs } => {
            format!("{node}: runs {}@{runs}, cannot take {kind}", kind.name)
        }
        Unfit::LacksCapability { node, missing } => {
            format!("{node}: lacks required {}", missing.join(", "))
        }
    }
}

/// One traffic edge between two services, in messages per second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// One end.
    pub a: ServiceId,
    /// The other end.
    pub b: ServiceId,
    /// Messages per second, both directions together.
    pub msgs_per_s: f64,
}

/// How the rebalancer may move services.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebalanceLimits {
    /// Moves per round at most.
    pub max_moves: usize,
    /// A node may hold at most `ceil(mean * (1 + load_tolerance))` services after a move.
    pub load_tolerance: f64,
    /// A move must cut at least this many cross-node messages per second.
    pub min_gain: f64,
}

/// One move the rebalancer proposes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Move {
    /// The service.
    pub service: ServiceId,
    /// Where it is.
    pub from: NodeName,
    /// Where it should go.
    pub to: NodeName,
    /// Cross-node messages per second the move saves.
    pub gain: f64,
    /// Why, in words.
    pub reasons: Vec<String>,
}

/// The fraction of traffic (by message rate) whose two ends run on different nodes.
pub fn cross_node_fraction(links: &[Link], at: &BTreeMap<ServiceId, NodeName>) -> f64 {
    let (mut cross, mut total) = (0.0, 0.0);
    for l in links {
        let (Some(x), Some(y)) = (at.get(&l.a), at.get(&l.b)) else {
            continue;
        };
        total += l.msgs_per_s;
        if x != y {
            cross += l.msgs_per_s;
        }
    }
    if total > 0.0 {
        cross / total
    } else {
        0.0
    }
}

/// Counts a planned move of `id` from `from` to `to` in a round's running view.
fn book_move(
    count: &mut BTreeMap<NodeName, u64>,
    at: &mut BTreeMap<ServiceId, NodeName>,
    moved: &mut BTreeSet<ServiceId>,
    id: ServiceId,
    (from, to): (&NodeName, &NodeName),
) {
    *count.entry(from.clone()).or_default() -= 1;
    *count.entry(to.clone()).or_default() += 1;
    at.insert(id, to.clone());
    moved.insert(id);
}

/// The rebalancer's round: greedily, the move that cuts the most cross-node traffic, while
/// it cuts at least `min_gain`, keeps every node within the load tolerance and honours
/// required capabilities, pins and `frozen` (services in their cool-down). Each move is
/// planned against the placement the earlier moves of the round produced, and every move
/// strictly lowers the cross-node traffic of the view, so rounds cannot undo each other
/// while the traffic stays as observed.
pub fn rebalance(
    services: &[ServiceView],
    nodes: &[NodeView],
    links: &[Link],
    frozen: &BTreeSet<ServiceId>,
    limits: &RebalanceLimits,
) -> Vec<Move> {
    let mut at: BTreeMap<ServiceId, NodeName> =
        services.iter().map(|s| (s.id, s.at.clone())).collect();
    let mut count: BTreeMap<NodeName, u64> = BTreeMap::new();
    for s in services {
        *count.entry(s.at.clone()).or_default() += 1;
    }
    let usable: Vec<&NodeView> = nodes.iter().filter(|n| n.up && !n.draining).collect();
    if usable.is_empty() {
        return Vec::new();
    }
    let mean = services.len() as f64 / usable.len() as f64;
    let cap = (mean * (1.0 + limits.load_tolerance)).ceil().max(1.0) as u64;
    // Per service: its neighbours and rates.
    let mut adj: BTreeMap<ServiceId, Vec<(ServiceId, f64)>> = BTreeMap::new();
    for l in links {
        if l.a == l.b {
            continue;
        }
        adj.entry(l.a).or_default().push((l.b, l.msgs_per_s));
        adj.entry(l.b).or_default().push((l.a, l.msgs_per_s));
    }
    let mut moved: BTreeSet<ServiceId> = BTreeSet::new();
    let mut out = Vec::new();
    let node_of = |name: &NodeName| nodes.iter().find(|n| n.name == *name);
    // First, services on a node that lacks some of their preferred capabilities go to a node
    // that has more of them (the most, then the fewest services, then the smallest name).
    for s in services {
        if out.len() >= limits.max_moves {
            return out;
        }
        if s.pinned || s.held || frozen.contains(&s.id) || s.needs.preferred.is_empty() {
            continue;
        }
        let here = at[&s.id].clone();
        let met_here = node_of(&here).map_or(0, |n| n.preferred_met(&s.needs));
        let best = usable
            .iter()
            .filter(|n| n.name != here && n.unfit(&s.kind, &s.needs).is_none())
            .filter(|n| count.get(&n.name).copied().unwrap_or(0) < cap)
            .filter(|n| n.preferred_met(&s.needs) > met_here)
            .max_by(|a, b| {
                let key = |n: &NodeView| {
                    (
                        n.preferred_met(&s.needs),
                        std::cmp::Reverse(count.get(&n.name).copied().unwrap_or(0)),
                    )
                };
                key(a).cmp(&key(b)).then_with(|| b.name.cmp(&a.name))
            });
        let Some(to) = best else {
            continue;
        };
        let to = to.name.clone();
        book_move(&mut count, &mut at, &mut moved, s.id, (&here, &to));
        out.push(Move {
            service: s.id,
            from: here.clone(),
            to: to.clone(),
            gain: 0.0,
            reasons: vec![format!(
                "{to} has more of its preferred capabilities ({}) than {here}",
                s.needs.preferred.join(", ")
            )],
        });
    }
    while out.len() < limits.max_moves {
        let mut best: Option<(f64, usize, NodeName)> = None;
        for (i, s) in services.iter().enumerate() {
            if s.pinned || s.held || frozen.contains(&s.id) || moved.contains(&s.id) {
                continue;
            }
            let Some(neigh) = adj.get(&s.id) else {
                continue;
            };
            let here = at[&s.id].clone();
            let mut with: BTreeMap<&NodeName, f64> = BTreeMap::new();
            for (peer, rate) in neigh {
                if let Some(n) = at.get(peer) {
                    *with.entry(n).or_default() += rate;
                }
            }
            let local = with.get(&here).copied().unwrap_or(0.0);
            for node in &usable {
                if node.name == here || count.get(&node.name).copied().unwrap_or(0) + 1 > cap {
                    continue;
                }
                // Never to a node with fewer of its preferred capabilities: the round
                // above would move it back (preferences met only grow, then traffic falls).
                let met_here = node_of(&here).map_or(0, |n| n.preferred_met(&s.needs));
                if node.unfit(&s.kind, &s.needs).is_some()
                    || node.preferred_met(&s.needs) < met_here
                {
                    continue;
                }
                let gain = with.get(&node.name).copied().unwrap_or(0.0) - local;
                if gain >= limits.min_gain && best.as_ref().is_none_or(|(g, _, _)| gain > *g) {
                    best = Some((gain, i, node.name.clone()));
                }
            }
        }
        let Some((gain, i, to)) = best else {
            break;
        };
        let s = &services[i];
        let from = at[&s.id].clone();
        book_move(&mut count, &mut at, &mut moved, s.id, (&from, &to));
        out.push(Move {
            service: s.id,
            from: from.clone(),
            to: to.clone(),
            gain,
            reasons: vec![format!(
                "cuts {gain:.1} cross-node msgs/s: more of its traffic is with services on {to} than on {from}"
            )],
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, caps: &[&str], services: u64) -> NodeView {
        NodeView {
            name: NodeName::new(name),
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            services,
            backlog: 0,
            power_percent: 100,
            up: true,
            draining: false,
            kinds: vec![KindKey::new("k", 1)],
            reads: Vec::new(),
        }
    }

    fn svc(n: u64, at: &str, required: &[&str], preferred: &[&str]) -> ServiceView {
        ServiceView {
            id: ServiceId::from_parts(1, n),
            kind: KindKey::new("k", 1),
            at: NodeName::new(at),
            needs: Needs {
                required: required.iter().map(|c| c.to_string()).collect(),
                preferred: preferred.iter().map(|c| c.to_string()).collect(),
                writes: Vec::new(),
            },
            pinned: false,
            held: false,
        }
    }

    #[test]
    fn required_first_then_preferred_then_affinity_then_load() {
        let nodes = [
            node("phone", &["display", "speaker"], 5),
            node("tv", &["display", "speaker"], 1),
            node("watch", &["display"], 0),
        ];
        let p = AffinityPolicy::default();
        let none = BTreeSet::new();
        // Needs a speaker: the watch is out; the tv is less loaded than the phone.
        let s = svc(1, "phone", &["speaker"], &[]);
        let c = choose(&p, &s, &nodes, &Affinity::default(), &none).unwrap();
        assert_eq!(c.node.as_str(), "tv", "{c:?}");
        assert!(c
            .reasons
            .iter()
            .any(|r| r.contains("watch: lacks required speaker")));
        // Affinity outweighs load: most of its traffic is with services on the phone.
        let aff = Affinity {
            by_node: [(NodeName::new("phone"), 90.0)].into_iter().collect(),
            total: 100.0,
        };
        let c = choose(&p, &s, &nodes, &aff, &none).unwrap();
        assert_eq!(c.node.as_str(), "phone", "{c:?}");
        // Nothing fits: every node says why.
        let s = svc(2, "phone", &["camera"], &[]);
        let why = choose(&p, &s, &nodes, &Affinity::default(), &none).unwrap_err();
        assert_eq!(why.len(), 3);
    }

    #[test]
    fn the_rebalancer_cuts_cross_node_traffic_within_the_load_tolerance() {
        // Four pairs, each split across two nodes.
        let nodes = [node("a", &[], 4), node("b", &[], 4)];
        let mut services = Vec::new();
        let mut links = Vec::new();
        for k in 0..4u64 {
            services.push(svc(2 * k, "a", &[], &[]));
            services.push(svc(2 * k + 1, "b", &[], &[]));
            links.push(Link {
                a: ServiceId::from_parts(1, 2 * k),
                b: ServiceId::from_parts(1, 2 * k + 1),
                msgs_per_s: 100.0,
            });
        }
        let at: BTreeMap<ServiceId, NodeName> =
            services.iter().map(|s| (s.id, s.at.clone())).collect();
        assert_eq!(cross_node_fraction(&links, &at), 1.0);
        let limits = RebalanceLimits {
            max_moves: 10,
            load_tolerance: 0.25,
            min_gain: 1.0,
        };
        let moves = rebalance(&services, &nodes, &links, &BTreeSet::new(), &limits);
        assert_eq!(moves.len(), 4, "{moves:?}");
        let mut after = at.clone();
        for m in &moves {
            after.insert(m.service, m.to.clone());
        }
        assert_eq!(cross_node_fraction(&links, &after), 0.0);
        let on_a = after.values().filter(|n| n.as_str() == "a").count();
        assert_eq!(on_a, 4, "balanced: {after:?}");
        // Planned again from where they are: nothing left to gain.
        let settled: Vec<ServiceView> = services
            .iter()
            .map(|s| ServiceView {
                at: after[&s.id].clone(),
                ..s.clone()
            })
            .collect();
        assert!(rebalance(&settled, &nodes, &links, &BTreeSet::new(), &limits).is_empty());
    }

    #[test]
    fn versions_decide_who_takes_a_service_and_the_newest_is_preferred() {
        // k@1 runs on the phone; the tv runs k@2 and reads k@1; the car runs k@2 and reads
        // nothing older; the laptop still runs k@1.
        let phone = node("phone", &[], 1);
        let mut tv = node("tv", &[], 3);
        tv.kinds = vec![KindKey::new("k", 2)];
        tv.reads = vec![KindKey::new("k", 1)];
        let mut car = node("car", &[], 0);
        car.kinds = vec![KindKey::new("k", 2)];
        let laptop = node("laptop", &[], 0);
        let v1 = svc(1, "phone", &[], &[]);
        assert_eq!(tv.unfit(&v1.kind, &v1.needs), None, "the tv upgrades it");
        let no_upgrade = car
            .unfit(&v1.kind, &v1.needs)
            .expect("the car cannot read k@1");
        assert_eq!(
            no_upgrade.to_string(),
            "node car runs k@2, which does not read k@1: version 2 declares no upgrade from \
             version 1"
        );
        // A k@2 service never goes back to a node running k@1, forced or not.
        let mut v2 = svc(2, "tv", &[], &[]);
        v2.kind = KindKey::new("k", 2);
        let older = laptop.refuses(&v2.kind, &v2.needs, true).expect("older");
        assert_eq!(
            older.to_string(),
            "node laptop runs k@1, older than k@2: a service moves to an older version of its \
             kind only written as that version's, by a downgrade to version 1 that k@2 declares"
        );
        // With a downgrade to version 1 it goes there, written as version 1's; a node that
        // runs k@2 takes it as it is, and one that runs nothing of k never.
        let mut writes_v1 = v2.clone();
        writes_v1.needs.writes = vec![1];
        assert_eq!(laptop.unfit(&writes_v1.kind, &writes_v1.needs), None);
        assert_eq!(
            laptop.written_as(&writes_v1.kind, &writes_v1.needs.writes),
            Some(1)
        );
        assert_eq!(
            car.written_as(&writes_v1.kind, &writes_v1.needs.writes),
            None
        );
        let mut bare = node("bare", &[], 0);
        bare.kinds.clear();
        assert!(matches!(
            bare.unfit(&writes_v1.kind, &writes_v1.needs),
            Some(Unfit::LacksKind { .. })
        ));
        // Placement still prefers the newest version: the busy tv over the idle laptop.
        let c = choose(
            &AffinityPolicy::default(),
            &writes_v1,
            &[laptop.clone(), tv.clone()],
            &Affinity::default(),
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(c.node.as_str(), "tv", "{c:?}");
        // A downgrade to another version does not help.
        writes_v1.needs.writes = vec![0];
        assert!(laptop.unfit(&writes_v1.kind, &writes_v1.needs).is_some());
        // Placement moves the k@1 service to the newest version despite the tv's load, and
        // says why; the laptop runs the old version, the car cannot take it.
        let nodes = [phone, tv, car, laptop];
        let c = choose(
            &AffinityPolicy::default(),
            &v1,
            &nodes,
            &Affinity::default(),
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(c.node.as_str(), "tv", "{c:?}");
        assert!(c
            .reasons
            .iter()
            .any(|r| r == "runs k@2, the newest version (+4.0)"));
        assert!(c
            .reasons
            .iter()
            .any(|r| r == "car: runs k@2, cannot take k@1"));
        // When every candidate runs the same version, nobody gets the bonus.
        let same = [node("phone", &[], 1), node("laptop", &[], 0)];
        let c = choose(
            &AffinityPolicy::default(),
            &v1,
            &same,
            &Affinity::default(),
            &BTreeSet::new(),
        )
        .unwrap();
        assert!(!c.reasons.iter().any(|r| r.contains("newest")), "{c:?}");
    }

    #[test]
    fn a_node_without_the_kind_or_draining_is_never_chosen_and_says_why() {
        let mut lacks_kind = node("tv", &["display"], 0);
        lacks_kind.kinds = vec![KindKey::new("other", 1)];
        let mut draining = node("laptop", &["display"], 0);
        draining.draining = true;
        let nodes = [node("phone", &[], 3), lacks_kind, draining];
        let s = svc(1, "phone", &[], &["display"]);
        let c = choose(
            &AffinityPolicy::default(),
            &s,
            &nodes,
            &Affinity::default(),
            &BTreeSet::new(),
        )
        .unwrap();
        assert_eq!(c.node.as_str(), "phone", "{c:?}");
        assert!(c
            .reasons
            .iter()
            .any(|r| r == "tv: has not registered kind k@1"));
        assert!(c.reasons.iter().any(|r| r == "laptop: draining"));
        assert_eq!(
            nodes[1].unfit(&s.kind, &s.needs),
            Some(Unfit::LacksKind {
                node: NodeName::new("tv"),
                kind: KindKey::new("k", 1)
            })
        );
        let forced = nodes[2].refuses(&s.kind, &s.needs, true);
        assert_eq!(forced, None, "a forced move ignores draining");
        assert!(matches!(
            nodes[1].refuses(&s.kind, &s.needs, true),
            Some(Unfit::LacksKind { .. })
        ));
        let needs_camera = Needs {
            required: vec!["camera".into()],
            preferred: vec![],
            writes: vec![],
        };
        assert_eq!(
            nodes[0]
                .unfit(&s.kind, &needs_camera)
                .map(|u| u.to_string()),
            Some("node phone lacks required camera".into())
        );
    }

    #[test]
    fn the_rebalancer_brings_a_service_to_its_preferred_capabilities_and_never_back() {
        let nodes = [node("phone", &[], 1), node("tv", &["big-screen"], 0)];
        let limits = RebalanceLimits {
            max_moves: 10,
            load_tolerance: 1.0,
            min_gain: 1.0,
        };
        let lyrics = svc(1, "phone", &[], &["big-screen"]);
        let moves = rebalance(
            std::slice::from_ref(&lyrics),
            &nodes,
            &[],
            &BTreeSet::new(),
            &limits,
        );
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(moves[0].to.as_str(), "tv");
        // Held where the user put it: left alone.
        let held = ServiceView {
            held: true,
            ..lyrics.clone()
        };
        assert!(rebalance(&[held], &nodes, &[], &BTreeSet::new(), &limits).is_empty());
        // On the tv, its chatty peer on the phone does not pull it back to fewer of its
        // preferred capabilities; the peer comes to it instead.
        let on_tv = ServiceView {
            at: NodeName::new("tv"),
            ..lyrics
        };
        let peer = svc(2, "phone", &[], &[]);
        let links = [Link {
            a: on_tv.id,
            b: peer.id,
            msgs_per_s: 50.0,
        }];
        let moves = rebalance(&[on_tv, peer], &nodes, &links, &BTreeSet::new(), &limits);
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(
            (moves[0].service, moves[0].to.as_str()),
            (ServiceId::from_parts(1, 2), "tv")
        );
    }
}
