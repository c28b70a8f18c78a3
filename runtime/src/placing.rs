//! Placement's state on a node and what placement plans and reports: the data the node layer
//! holds and names (the policy, pins, cool-downs, the rebalancer's settings and rounds, the
//! last drain). The engine that fills it and acts on it (`placement.rs`) sits above the node.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::migrate::{MigrateOptions, MigrationReport};
use crate::node::NodeShared;
use crate::sync::lock;
use crate::tree::GroupReport;
use tern_proto::ids::{KindKey, NodeName, ServiceId};
use tern_proto::members::Member;
use tern_proto::migration::AbortReason;
use tern_proto::placement::{AffinityPolicy, Policy, ServiceView};
use tern_proto::placement::{Needs, NodeView, Unfit};
use tern_proto::wire::MigMsg;

/// How long a source waits for a target's answer to whether it can take a service, when
/// gossip says it cannot.
pub(crate) const CAN_TAKE_WAIT: Duration = Duration::from_secs(2);

/// How long a move this node made is remembered for its view (a few gossip rounds).
pub(crate) const RECENT_KEPT: Duration = Duration::from_secs(5);
/// Moves remembered for the view at most.
pub(crate) const RECENT_MAX: usize = 4096;

/// Rounds kept in the rebalancer's log.
pub(crate) const ROUNDS_KEPT: usize = 64;
/// Cool-down entries kept (older ones are dropped first).
pub(crate) const COOLDOWNS_MAX: usize = 65_536;

/// The periodic affinity rebalancer's settings (it is off until started).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebalancerConfig {
    /// Time between rounds, in milliseconds.
    pub interval_ms: u64,
    /// Migrations per round at most.
    pub max_moves_per_round: usize,
    /// A service moved by the rebalancer is left alone this long, in milliseconds.
    pub cooldown_ms: u64,
    /// A node may hold at most `ceil(mean * (1 + load_tolerance))` services after a move.
    pub load_tolerance: f64,
    /// A move must cut at least this many cross-node messages per second.
    pub min_gain_msgs_per_s: f64,
}

impl Default for RebalancerConfig {
    fn default() -> Self {
        RebalancerConfig {
            interval_ms: 5_000,
            max_moves_per_round: 8,
            cooldown_ms: 30_000,
            load_tolerance: 0.25,
            min_gain_msgs_per_s: 1.0,
        }
    }
}

/// What to plan.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PlanOptions {
    /// Only this node may be chosen.
    pub to: Option<String>,
    /// These nodes may not be chosen.
    pub exclude: Vec<String>,
    /// Plan each service's whole assembly tree with it (members may split across nodes).
    pub tree: bool,
}

/// One service's placement decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedMove {
    /// The service.
    pub service: ServiceId,
    /// Its kind.
    pub kind: KindKey,
    /// Where it runs.
    pub from: NodeName,
    /// Where it should run (equal to `from`: it stays).
    pub to: NodeName,
    /// The chosen node's score.
    pub score: f64,
    /// Why.
    pub reasons: Vec<String>,
}

/// What would move where, without moving anything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The policy that scored the nodes.
    pub policy: String,
    /// Services that would move.
    pub moves: Vec<PlannedMove>,
    /// Services that would stay where they are, with the reasons.
    pub stays: Vec<PlannedMove>,
    /// Services no node can take (or that are pinned), with why. A plan with any is not
    /// carried out at all.
    pub refused: Vec<(ServiceId, String)>,
}

/// A plan and what carrying it out did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaceReport {
    /// The plan.
    pub plan: Plan,
    /// One group migration per source node (all or none within each).
    pub groups: Vec<GroupReport>,
}

/// What a drain did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DrainReport {
    /// Migrations that moved services away.
    pub moved: Vec<MigrationReport>,
    /// Pinned services, left in place.
    pub pinned: Vec<ServiceId>,
    /// Services that could not be moved, and why.
    pub failed: Vec<(ServiceId, String)>,
    /// The placement decisions behind the moves, with their reasons.
    pub plans: Vec<PlannedMove>,
}

/// One rebalancer round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebalanceRound {
    /// The node that planned it.
    pub leader: NodeName,
    /// Cross-node share of observed traffic before the round.
    pub cross_node_fraction_before: f64,
    /// The same if every planned move succeeds.
    pub cross_node_fraction_planned: f64,
    /// The moves, with their outcomes (`None`: committed).
    pub moves: Vec<(tern_proto::placement::Move, Option<String>)>,
}

/// One associated service of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Association {
    /// The other service (or a handle's sender id).
    pub peer: ServiceId,
    /// Its kind, when known.
    pub kind: Option<KindKey>,
    /// Where it runs, when known.
    pub node: Option<NodeName>,
    /// Book entries linking the two: `holds <role>` (in the service's book) or
    /// `held as <role>` (in the peer's).
    pub declared: Vec<String>,
    /// True when traffic between them was observed.
    pub observed: bool,
    /// Messages per second from the service to the peer.
    pub out_msgs_per_s: f64,
    /// Messages per second from the peer to the service.
    pub in_msgs_per_s: f64,
    /// Bytes per second, both directions (from sampled sizes).
    pub bytes_per_s: f64,
}

impl Association {
    /// `in`, `out`, `both` or `none` (declared only, no traffic seen).
    pub fn direction(&self) -> &'static str {
        match (self.in_msgs_per_s > 0.0, self.out_msgs_per_s > 0.0) {
            (true, true) => "both",
            (true, false) => "in",
            (false, true) => "out",
            (false, false) => "none",
        }
    }
}

/// The node's placement state.
#[derive(Default)]
pub(crate) struct PlacementState {
    pub(crate) policy: RwLock<Option<Arc<dyn Policy>>>,
    pub(crate) pins: Mutex<BTreeSet<ServiceId>>,
    pub(crate) rebalancer: Mutex<Option<RebalancerConfig>>,
    pub(crate) last_round: Mutex<Option<Instant>>,
    pub(crate) moved_at: Mutex<HashMap<ServiceId, Instant>>,
    /// Services this node moved lately, as they are now: gossip may not list them anywhere
    /// for a moment (their old node has dropped them, their new one not yet sent its list).
    pub(crate) recent: Mutex<VecDeque<(Instant, ServiceView)>>,
    pub(crate) rounds: Mutex<VecDeque<RebalanceRound>>,
    /// What the last drain did, whoever started it.
    pub(crate) last_drain: Mutex<Option<DrainReport>>,
    /// A trigger's re-placement is running (one at a time).
    pub(crate) replacing: AtomicBool,
    /// A trigger came while one ran: it runs again.
    pub(crate) replace_again: AtomicBool,
    /// A rebalancer round is running.
    pub(crate) rebalancing: AtomicBool,
    /// The node drains because its battery ran low (`set_power`), not at a user's request:
    /// power back above the threshold ends the drain.
    pub(crate) power_drain: AtomicBool,
    /// Services here that a user's explicit move or placement holds where they are.
    pub(crate) held: Mutex<BTreeSet<ServiceId>>,
}

impl PlacementState {
    pub fn pins(&self) -> BTreeSet<ServiceId> {
        lock(&self.pins).clone()
    }

    pub(crate) fn policy(&self) -> Arc<dyn Policy> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .unwrap_or_else(|| Arc::new(AffinityPolicy::default()))
    }
}

impl PlacementState {
    pub(crate) fn set_policy(&self, policy: Arc<dyn Policy>) {
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = Some(policy);
    }

    pub(crate) fn pin(&self, id: ServiceId, pinned: bool) {
        let mut pins = lock(&self.pins);
        if pinned {
            pins.insert(id);
        } else {
            pins.remove(&id);
        }
    }

    /// Holds service `id` here (a user's explicit move put it here), or releases it.
    pub(crate) fn hold(&self, id: ServiceId, held: bool) {
        let mut h = lock(&self.held);
        if held {
            h.insert(id);
        } else {
            h.remove(&id);
        }
    }

    /// Whether service `id` is held here.
    pub(crate) fn is_held(&self, id: ServiceId) -> bool {
        lock(&self.held).contains(&id)
    }

    /// The services held here.
    pub(crate) fn held(&self) -> BTreeSet<ServiceId> {
        lock(&self.held).clone()
    }

    pub(crate) fn note_moved(&self, ids: &[ServiceId]) {
        let mut m = lock(&self.moved_at);
        if m.len() + ids.len() > COOLDOWNS_MAX {
            // Oldest first.
            let mut by_age: Vec<(ServiceId, Instant)> = m.iter().map(|(k, v)| (*k, *v)).collect();
            by_age.sort_by_key(|(_, t)| *t);
            for (k, _) in by_age.into_iter().take(ids.len().max(COOLDOWNS_MAX / 4)) {
                m.remove(&k);
            }
        }
        let now = Instant::now();
        for id in ids {
            m.insert(*id, now);
        }
    }

    pub(crate) fn remember(&self, svc: ServiceView) {
        let mut r = lock(&self.recent);
        while r.len() >= RECENT_MAX || r.front().is_some_and(|(t, _)| t.elapsed() >= RECENT_KEPT) {
            r.pop_front();
        }
        r.push_back((Instant::now(), svc));
    }

    pub(crate) fn cooling(&self, id: ServiceId, cooldown: Duration) -> bool {
        lock(&self.moved_at)
            .get(&id)
            .is_some_and(|t| t.elapsed() < cooldown)
    }
}

impl NodeShared {
    /// How placement sees member `m`: `up` when reachable, hosting `services`.
    pub(crate) fn node_view(&self, m: &Member, up: bool, services: u64) -> NodeView {
        let infos = if m.local {
            self.kind_infos()
        } else {
            m.info.kinds.clone()
        };
        let kinds = infos.iter().map(|k| k.kind.clone()).collect();
        let reads = infos
            .iter()
            .flat_map(|k| k.reads.iter().map(|v| KindKey::new(&k.kind.name, *v)))
            .collect();
        NodeView {
            name: m.info.name.clone(),
            capabilities: m.info.capabilities.clone(),
            services,
            backlog: m.info.load.backlog,
            power_percent: m.info.power.percent(),
            up,
            draining: m.info.draining,
            kinds,
            reads,
        }
    }

    /// What `kind` needs: from this node's registry, or else from a member that gossiped it.
    pub(crate) fn needs_known(&self, kind: &KindKey) -> Option<Needs> {
        self.needs_in(&self.members(), kind)
    }

    /// [`needs_known`](Self::needs_known), from a copy of the members the caller holds.
    pub(crate) fn needs_in(&self, members: &[Member], kind: &KindKey) -> Option<Needs> {
        self.needs_of(kind).or_else(|| {
            members
                .iter()
                .flat_map(|m| &m.info.kinds)
                .find(|k| k.kind == *kind)
                .map(|k| k.needs.clone())
        })
    }

    /// Hands local service `id` back to automatic placement; whether it was held.
    pub(crate) fn release(self: &Arc<Self>, id: ServiceId) -> Result<bool, crate::error::Error> {
        if self.slot(id).is_none() {
            return Err(crate::error::DeliveryError::UnknownService {
                id,
                node: self.name().clone(),
            }
            .into());
        }
        let was = self.placement.is_held(id);
        self.placement.hold(id, false);
        self.gossip_soon();
        Ok(was)
    }

    /// Why this node cannot take a service of `kind` now (its own, authoritative word):
    /// draining or lacking a required capability (not counted when `forced`), or lacking the
    /// kind (always).
    pub(crate) fn unfit_here(&self, kind: &KindKey, forced: bool) -> Option<Unfit> {
        // On every snapshot a target admits, inside the freeze: only what the check reads.
        let (capabilities, draining) = {
            let m = lock(&self.members);
            (m.me().capabilities.clone(), m.me().draining)
        };
        let needs = self.needs_of(kind);
        let (runs, reads) = self.versions_here(&kind.name);
        let view = self.fitness_view(capabilities, draining, (runs, reads));
        view.refuses(kind, &needs.unwrap_or_default(), forced)
    }

    /// A view of a node, for [`NodeView::refuses`], from what that check reads.
    fn fitness_view(
        &self,
        capabilities: Vec<String>,
        draining: bool,
        (kinds, reads): (Vec<KindKey>, Vec<KindKey>),
    ) -> NodeView {
        NodeView {
            name: self.name().clone(),
            capabilities,
            services: 0,
            backlog: 0,
            power_percent: 100,
            up: true,
            draining,
            kinds,
            reads,
        }
    }

    /// Checks each `(service, target)` before anything freezes: the first service whose
    /// target cannot take it, and why. Gossip is read first; when it says a target cannot,
    /// the target itself is asked (gossip may be a second old: a kind registered, a drain
    /// ended), and its answer counts. No answer within [`CAN_TAKE_WAIT`]: the move goes ahead
    /// and the target checks the snapshot itself.
    pub(crate) async fn preflight(
        self: &Arc<Self>,
        moves: &[(ServiceId, NodeName)],
        opts: &MigrateOptions,
    ) -> Option<(ServiceId, AbortReason)> {
        for (id, to) in moves {
            if self.target_unfit(*id, to, opts).is_none() {
                continue;
            }
            let Some(kind) = self.local_addr_of(*id).map(|a| a.kind) else {
                continue;
            };
            // Asked for the version it would be written as.
            let kind = match self.written_for(&kind, to) {
                Some(v) => KindKey::new(kind.name.as_str(), v),
                None => kind,
            };
            let asked = self
                .request_control::<Option<Unfit>>(to.clone(), CAN_TAKE_WAIT, |req| {
                    MigMsg::CanTake {
                        req,
                        kind,
                        forced: opts.force,
                    }
                })
                .await;
            match asked {
                Ok(Some(why)) => return Some((*id, AbortReason::Unfit(why))),
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(%to, error = %e, "no answer to can-take; the target checks the snapshot")
                }
            }
        }
        None
    }

    /// The older version a service of `kind` run here is written as when it moves to `to`:
    /// gossip says `to` runs that version, and `kind` declares a downgrade to it
    /// ([`Service::DOWNGRADES`](crate::Service::DOWNGRADES)). `None`: it travels as it is.
    pub(crate) fn written_for(&self, kind: &KindKey, to: &NodeName) -> Option<u32> {
        if to == self.name() {
            return None;
        }
        let writes = self.needs_of(kind)?.writes;
        if writes.is_empty() {
            return None;
        }
        let (capabilities, draining, runs, reads) = lock(&self.members).fitness_of(to, kind)?;
        self.fitness_view(capabilities, draining, (runs, reads))
            .written_as(kind, &writes)
    }

    /// Why node `to` cannot take the local service `id`, checked before anything freezes:
    /// draining or lacking a required capability (skipped when `opts.force`), or lacking the
    /// kind (always). `None` when it can, or when this node has not heard from `to` yet (the
    /// target then checks the snapshot itself).
    pub(crate) fn target_unfit(
        &self,
        id: ServiceId,
        to: &NodeName,
        opts: &MigrateOptions,
    ) -> Option<Unfit> {
        if to == self.name() {
            return None;
        }
        let kind = self.local_addr_of(id)?.kind;
        let needs = self.needs_of(&kind).unwrap_or_default();
        let (capabilities, draining, runs, reads) = lock(&self.members).fitness_of(to, &kind)?;
        let mut view = self.fitness_view(capabilities, draining, (runs, reads));
        view.name = to.clone();
        view.refuses(&kind, &needs, opts.force)
    }
}
