//! The node's placement engine: builds a view of the cluster (membership, directory, traffic),
//! asks the pure functions in [`tern_proto::placement`] where services should run, and acts
//! on the triggers: explicit calls (`plan`, `place`), drain, capability changes and the
//! periodic rebalancer. Pinned services are never moved by any of them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{DeliveryError, Error};
use crate::mailbox::lock;
use crate::members::MemberStatus;
use crate::migrate::MigrateOptions;
use crate::node::{NodeHandle, NodeShared};
pub use crate::placing::{
    Association, DrainReport, PlaceReport, Plan, PlanOptions, PlannedMove, RebalanceRound,
    RebalancerConfig,
};
use crate::placing::{RECENT_KEPT, ROUNDS_KEPT};
use crate::reports::NotMoved;
use crate::tree::GroupReport;
use tern_proto::ids::{KindKey, NodeName, ServiceId};
use tern_proto::placement::{
    choose, cross_node_fraction, rebalance, Affinity, Link, Needs, NodeView, Policy,
    RebalanceLimits, ServiceView,
};

/// The cluster as one node sees it.
pub(crate) struct View {
    pub nodes: Vec<NodeView>,
    pub services: Vec<ServiceView>,
    pub links: Vec<Link>,
    pub at: BTreeMap<ServiceId, NodeName>,
    /// Node by id prefix, for handles' sender ids.
    prefixes: HashMap<u64, NodeName>,
    /// Directed edges: (from, to) -> (msgs/s, bytes/s).
    directed: HashMap<(ServiceId, ServiceId), (f64, f64)>,
    /// Kinds whose needs some node this one hears from has registered.
    known_kinds: BTreeSet<KindKey>,
}

impl View {
    fn node_of(&self, id: ServiceId) -> Option<NodeName> {
        self.at
            .get(&id)
            .cloned()
            .or_else(|| self.prefixes.get(&id.prefix()).cloned())
    }

    fn affinity(&self, id: ServiceId, at: &BTreeMap<ServiceId, NodeName>) -> Affinity {
        let mut a = Affinity::default();
        for l in &self.links {
            let peer = if l.a == id {
                l.b
            } else if l.b == id {
                l.a
            } else {
                continue;
            };
            a.total += l.msgs_per_s;
            let node = at.get(&peer).cloned().or_else(|| self.node_of(peer));
            if let Some(n) = node {
                *a.by_node.entry(n).or_default() += l.msgs_per_s;
            }
        }
        a
    }
}

impl NodeShared {
    /// Builds the cluster view from membership, local services and traffic.
    pub(crate) fn view(&self) -> View {
        let members = self.members();
        let pins = self.placement.pins();
        let held = self.placement.held();
        let mut nodes = Vec::new();
        let mut services = Vec::new();
        let mut at = BTreeMap::new();
        let mut prefixes = HashMap::new();
        let mut known_kinds = BTreeSet::new();
        let mut directed: HashMap<(ServiceId, ServiceId), (f64, f64)> = HashMap::new();
        let mut merge = |e: &tern_proto::traffic::EdgeRate| {
            let d = directed.entry((e.from, e.to)).or_insert((0.0, 0.0));
            d.0 = d.0.max(e.msgs_per_s);
            d.1 = d.1.max(e.bytes_per_s);
        };
        for e in lock(&self.traffic).all() {
            merge(&e);
        }
        for m in &members {
            let up = m.local
                || (m.status == MemberStatus::Up
                    && self
                        .links
                        .get(&m.info.name)
                        .is_some_and(|l| l.is_connected()));
            prefixes.insert(m.info.id_prefix, m.info.name.clone());
            let hosted: Vec<(ServiceId, KindKey, bool, bool)> = if m.local {
                self.local_services()
                    .into_iter()
                    .map(|a| (a.id, a.kind, pins.contains(&a.id), held.contains(&a.id)))
                    .collect()
            } else if up {
                m.info
                    .services
                    .iter()
                    .map(|(id, kind, pinned, _)| {
                        (*id, kind.clone(), *pinned, m.info.held.contains(id))
                    })
                    .collect()
            } else {
                Vec::new()
            };
            if !m.local && up {
                for e in &m.info.edges {
                    merge(e);
                }
            }
            nodes.push(self.node_view(m, up, hosted.len() as u64));
            for (id, kind, pinned, held) in hosted {
                // A service listed by two nodes (mid-move gossip): the local table wins.
                if at.contains_key(&id) && !m.local {
                    continue;
                }
                at.insert(id, m.info.name.clone());
                // What the kind needs: this node's registry first, then what members gossip.
                let needs = match self.needs_in(&members, &kind) {
                    Some(n) => {
                        known_kinds.insert(kind.clone());
                        n
                    }
                    None => Needs::default(),
                };
                services.retain(|s: &ServiceView| s.id != id);
                services.push(ServiceView {
                    id,
                    kind,
                    at: m.info.name.clone(),
                    needs,
                    pinned,
                    held,
                });
            }
        }
        // Services moved from here lately that no gossip lists yet still count where they went.
        for (t, svc) in lock(&self.placement.recent).iter() {
            if t.elapsed() < RECENT_KEPT && !at.contains_key(&svc.id) {
                at.insert(svc.id, svc.at.clone());
                if let Some(n) = nodes.iter_mut().find(|n| n.name == svc.at) {
                    n.services += 1;
                }
                if self.needs_in(&members, &svc.kind).is_some() {
                    known_kinds.insert(svc.kind.clone());
                }
                services.push(svc.clone());
            }
        }
        // The directory is newer than gossip for every service whose move this node has
        // heard of (`Located` at each commit): a plan from a stale location could undo a move.
        for svc in &mut services {
            if let Some((node, _)) = self.driver.location(svc.id) {
                if node != svc.at {
                    svc.at = node.clone();
                    at.insert(svc.id, node);
                }
            }
        }
        // Undirected links for affinity.
        let mut undirected: BTreeMap<(ServiceId, ServiceId), f64> = BTreeMap::new();
        for ((f, t), (rate, _)) in &directed {
            if f == t {
                continue;
            }
            let key = if f < t { (*f, *t) } else { (*t, *f) };
            *undirected.entry(key).or_default() += rate;
        }
        let links = undirected
            .into_iter()
            .map(|((a, b), msgs_per_s)| Link { a, b, msgs_per_s })
            .collect();
        View {
            nodes,
            services,
            links,
            at,
            prefixes,
            directed,
            known_kinds,
        }
    }

    /// What `ids` (with their trees when asked) would need to move where, moving nothing.
    pub fn plan(&self, ids: &[ServiceId], opts: &PlanOptions) -> Result<Plan, Error> {
        let view = self.view();
        self.plan_in(&view, ids, opts)
    }

    fn plan_in(&self, view: &View, ids: &[ServiceId], opts: &PlanOptions) -> Result<Plan, Error> {
        let policy = self.placement.policy();
        let mut order: Vec<ServiceId> = Vec::new();
        for id in ids {
            if opts.tree {
                for m in self.tree(*id)? {
                    if !order.contains(&m.addr.id) {
                        order.push(m.addr.id);
                    }
                }
            } else if !order.contains(id) {
                order.push(*id);
            }
        }
        let mut exclude: BTreeSet<NodeName> =
            opts.exclude.iter().map(|n| NodeName::new(n)).collect();
        if let Some(to) = &opts.to {
            for n in &view.nodes {
                if n.name.as_str() != to {
                    exclude.insert(n.name.clone());
                }
            }
            if !view.nodes.iter().any(|n| n.name.as_str() == to) {
                return Err(DeliveryError::UnknownNode {
                    node: NodeName::new(to),
                }
                .into());
            }
        }
        let mut plan = Plan {
            policy: policy.name().to_owned(),
            ..Plan::default()
        };
        // Members placed so far count where they will be, so a tree's members follow one
        // another.
        let mut at = view.at.clone();
        for id in order {
            let Some(svc) = view.services.iter().find(|s| s.id == id) else {
                plan.refused
                    .push((id, format!("not running on any node {} knows", self.name())));
                continue;
            };
            if !view.known_kinds.contains(&svc.kind) {
                plan.refused.push((
                    id,
                    format!(
                        "kind {} is registered on no node {} knows",
                        svc.kind,
                        self.name()
                    ),
                ));
                continue;
            }
            if svc.pinned {
                plan.refused.push((id, format!("pinned on {}", svc.at)));
                continue;
            }
            let affinity = view.affinity(id, &at);
            match choose(&*policy, svc, &view.nodes, &affinity, &exclude) {
                Ok(c) => {
                    at.insert(id, c.node.clone());
                    let m = PlannedMove {
                        service: id,
                        kind: svc.kind.clone(),
                        from: svc.at.clone(),
                        to: c.node,
                        score: c.score,
                        reasons: c.reasons,
                    };
                    if m.to == m.from {
                        plan.stays.push(m);
                    } else {
                        plan.moves.push(m);
                    }
                }
                Err(why) => plan
                    .refused
                    .push((id, format!("no node fits: {}", why.join("; ")))),
            }
        }
        Ok(plan)
    }

    /// Plans `ids` and carries the plan out: one all-or-none group migration per source
    /// node. A plan with a refused service moves nothing.
    pub async fn place(
        self: &Arc<Self>,
        ids: &[ServiceId],
        opts: &PlanOptions,
    ) -> Result<PlaceReport, Error> {
        let plan = self.plan(ids, opts)?;
        self.carry_out(plan, MigrateOptions::default()).await
    }

    /// Carries `plan` out, one all-or-none group per source node. A plan with a refused
    /// service moves nothing and fails with [`Error::NotMoved`] listing every refusal; the
    /// groups' outcomes are in the report (the caller decides what a partial outcome is).
    async fn carry_out(
        self: &Arc<Self>,
        plan: Plan,
        opts: MigrateOptions,
    ) -> Result<PlaceReport, Error> {
        if !plan.refused.is_empty() {
            return Err(NotMoved {
                reports: Vec::new(),
                refused: plan.refused,
            }
            .into());
        }
        let mut by_source: BTreeMap<NodeName, Vec<(ServiceId, NodeName)>> = BTreeMap::new();
        for m in &plan.moves {
            by_source
                .entry(m.from.clone())
                .or_default()
                .push((m.service, m.to.clone()));
        }
        let mut groups = Vec::new();
        for (_, moves) in by_source {
            let ids: Vec<ServiceId> = moves.iter().map(|(id, _)| *id).collect();
            let report = match self.migrate_group(moves, opts).await {
                Ok(r) => r,
                // A group that was tried and did not move: its reports say why.
                Err(Error::NotMoved(n)) if !n.reports.is_empty() => {
                    GroupReport::from_reports(n.reports)
                }
                Err(e) => return Err(e),
            };
            if report.committed {
                self.placement.note_moved(&ids);
                for m in plan.moves.iter().filter(|m| ids.contains(&m.service)) {
                    let needs = self.needs_known(&m.kind).unwrap_or_default();
                    self.placement.remember(ServiceView {
                        id: m.service,
                        kind: m.kind.clone(),
                        at: m.to.clone(),
                        needs,
                        pinned: false,
                        held: opts.hold,
                    });
                }
            }
            groups.push(report);
        }
        Ok(PlaceReport { plan, groups })
    }

    /// Moves every movable service away (each tree whose root is here as one unit), then
    /// stops taking services. Pinned services stay and are reported.
    pub async fn drain(self: &Arc<Self>) -> DrainReport {
        /// How long a drain plans with one view of the cluster before it reads it again
        /// (gossip changes it once a second).
        const DRAIN_VIEW_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(500);
        lock(&self.members).update_me(|me| me.draining = true);
        self.gossip();
        let pins = self.placement.pins();
        let mut report = DrainReport::default();
        let locals: Vec<ServiceId> = self.local_services().iter().map(|a| a.id).collect();
        // Roots here: services whose parent is not a local service.
        let local_set: BTreeSet<ServiceId> = locals.iter().copied().collect();
        let mut roots = Vec::new();
        for id in &locals {
            if pins.contains(id) {
                report.pinned.push(*id);
                continue;
            }
            let parent_here = self
                .parent_of(*id)
                .is_some_and(|p| local_set.contains(&p) && !pins.contains(&p));
            if !parent_here {
                roots.push(*id);
            }
        }
        let me = self.name().clone();
        // One view for many roots (building it reads every service the cluster gossips, so a
        // fresh one per root made a drain quadratic), kept current with the moves made here
        // and built again at the pace gossip changes it.
        let mut view = self.view();
        let mut view_at = std::time::Instant::now();
        for root in roots {
            if view_at.elapsed() >= DRAIN_VIEW_MAX_AGE {
                view = self.view();
                view_at = std::time::Instant::now();
            }
            // The tree's members that run here and are not pinned move together.
            let members: Vec<ServiceId> = match self.tree(root) {
                Ok(t) => t
                    .into_iter()
                    .map(|m| m.addr.id)
                    .filter(|id| local_set.contains(id) && !pins.contains(id))
                    .collect(),
                Err(_) => vec![root],
            };
            let opts = PlanOptions {
                exclude: vec![me.to_string()],
                ..PlanOptions::default()
            };
            let outcome = match self.plan_in(&view, &members, &opts) {
                Ok(plan) => {
                    report.plans.extend(plan.moves.iter().cloned());
                    self.carry_out(plan, MigrateOptions::automatic()).await
                }
                Err(e) => Err(e),
            };
            match outcome {
                Ok(placed) => {
                    for g in placed.groups {
                        if g.committed {
                            for m in &g.members {
                                view.at.insert(m.service, m.to.clone());
                                // Counted where they went, so the next roots spread (gossip
                                // says it a second later).
                                for n in view.nodes.iter_mut() {
                                    if n.name == m.to {
                                        n.services += 1;
                                    } else if n.name == m.from {
                                        n.services = n.services.saturating_sub(1);
                                    }
                                }
                            }
                            report.moved.extend(g.members);
                        } else {
                            let why = g.aborted().unwrap_or_default();
                            for m in g.members {
                                report.failed.push((m.service, why.clone()));
                            }
                        }
                    }
                }
                Err(e) => {
                    for id in members {
                        report.failed.push((id, e.to_string()));
                    }
                }
            }
        }
        self.logs.event(
            "drained",
            format!(
                "{} moved, {} pinned, {} failed",
                report.moved.len(),
                report.pinned.len(),
                report.failed.len()
            ),
        );
        *lock(&self.placement.last_drain) = Some(report.clone());
        report
    }

    /// What the last drain of this node did, if one ended.
    pub fn last_drain(&self) -> Option<DrainReport> {
        lock(&self.placement.last_drain).clone()
    }

    /// Nodes' capabilities changed (or nodes joined): services here that require a
    /// capability this node lost move now, held or not (their hold ends: the user's choice
    /// can no longer stand). Runs in the background, one at a time.
    pub fn capabilities_changed(self: &Arc<Self>, nodes: &[NodeName]) {
        tracing::debug!(?nodes, "capabilities changed");
        self.stats.capability_changes.inc();
        // A change while a round runs is not lost: that round runs once more.
        self.placement.replace_again.store(true, Ordering::Release);
        if self.placement.replacing.swap(true, Ordering::AcqRel) {
            return;
        }
        let node = self.clone();
        let spawned = self.spawn_task(async move {
            loop {
                node.placement.replace_again.store(false, Ordering::Release);
                let seen = node.stats.capability_changes.get();
                node.replace_misfits().await;
                // Only this task writes it, one round at a time: it only grows.
                let handled = &node.stats.capability_changes_handled;
                handled.add(seen.saturating_sub(handled.get()));
                if node.placement.replace_again.load(Ordering::Acquire) {
                    continue;
                }
                node.placement.replacing.store(false, Ordering::Release);
                // Asked again between the check and the release: run again if nobody else did.
                if !node.placement.replace_again.load(Ordering::Acquire)
                    || node.placement.replacing.swap(true, Ordering::AcqRel)
                {
                    break;
                }
            }
        });
        if !spawned {
            self.placement.replacing.store(false, Ordering::Release);
        }
    }

    async fn replace_misfits(self: &Arc<Self>) {
        if lock(&self.members).me().draining {
            return;
        }
        let view = self.view();
        let me = self.name().clone();
        let Some(here) = view.nodes.iter().find(|n| n.name == me).cloned() else {
            return;
        };
        // Only a required capability lost moves a service by itself, held or not: a
        // preferred one is the rebalancer's to weigh (off by default).
        let candidates: Vec<ServiceId> = view
            .services
            .iter()
            .filter(|s| s.at == me && !s.pinned)
            .filter(|s| {
                s.needs
                    .required
                    .iter()
                    .any(|c| !here.capabilities.contains(c))
            })
            .map(|s| s.id)
            .collect();
        for id in candidates {
            let plan = match self.plan_in(&view, &[id], &PlanOptions::default()) {
                Ok(p) => p,
                Err(_) => continue,
            };
            if plan.moves.is_empty() {
                for (sid, why) in &plan.refused {
                    self.logs.event("placement-stuck", format!("{sid}: {why}"));
                }
                continue;
            }
            let why = plan.moves[0].reasons.join("; ");
            let to = plan.moves[0].to.clone();
            match self.carry_out(plan, MigrateOptions::automatic()).await {
                Ok(r) if r.groups.iter().all(|g| g.committed) => {
                    self.logs.event("re-placed", format!("{id} to {to}: {why}"));
                }
                Ok(r) => {
                    let why = r
                        .groups
                        .iter()
                        .find_map(|g| g.aborted())
                        .unwrap_or_default();
                    self.logs
                        .event("re-place-failed", format!("{id} to {to}: {why}"));
                }
                Err(e) => self.logs.event("re-place-failed", format!("{id}: {e}")),
            }
        }
    }

    /// One rebalancer round planned on this node for the whole cluster, carried out.
    pub async fn rebalance_round(self: &Arc<Self>, cfg: &RebalancerConfig) -> RebalanceRound {
        let view = self.view();
        let cooldown = Duration::from_millis(cfg.cooldown_ms);
        let frozen: BTreeSet<ServiceId> = view
            .services
            .iter()
            .filter(|s| {
                self.placement.cooling(s.id, cooldown) || !view.known_kinds.contains(&s.kind)
            })
            .map(|s| s.id)
            .collect();
        let limits = RebalanceLimits {
            max_moves: cfg.max_moves_per_round,
            load_tolerance: cfg.load_tolerance,
            min_gain: cfg.min_gain_msgs_per_s,
        };
        let moves = rebalance(&view.services, &view.nodes, &view.links, &frozen, &limits);
        let before = cross_node_fraction(&view.links, &view.at);
        let mut planned = view.at.clone();
        for m in &moves {
            planned.insert(m.service, m.to.clone());
        }
        let after = cross_node_fraction(&view.links, &planned);
        let mut done = Vec::new();
        for m in moves {
            let res = self
                .migrate_as(m.service, m.to.clone(), MigrateOptions::automatic(), true)
                .await;
            // Moved or not, the service cools down: a failed move is not retried at once.
            self.placement.note_moved(&[m.service]);
            let outcome = match res {
                Ok(r) if r.committed() => {
                    if let Some(svc) = view.services.iter().find(|s| s.id == m.service) {
                        self.placement.remember(ServiceView {
                            at: m.to.clone(),
                            ..svc.clone()
                        });
                    }
                    None
                }
                Ok(r) => Some(r.aborted.map(|a| a.to_string()).unwrap_or_default()),
                Err(e) => Some(e.to_string()),
            };
            done.push((m, outcome));
        }
        let round = RebalanceRound {
            leader: self.name().clone(),
            cross_node_fraction_before: before,
            cross_node_fraction_planned: after,
            moves: done,
        };
        if !round.moves.is_empty() {
            self.logs.event(
                "rebalanced",
                format!(
                    "{} moves, cross-node traffic {:.2} -> {:.2} (planned)",
                    round.moves.len(),
                    before,
                    after
                ),
            );
        }
        let mut rounds = lock(&self.placement.rounds);
        if rounds.len() >= ROUNDS_KEPT {
            rounds.pop_front();
        }
        rounds.push_back(round.clone());
        round
    }

    /// Called every second: runs a rebalancer round when it is on, this node leads (the
    /// smallest name among nodes up with theirs on) and the interval has passed.
    pub fn rebalancer_tick(self: &Arc<Self>) {
        let Some(cfg) = lock(&self.placement.rebalancer).clone() else {
            return;
        };
        let me = self.name().clone();
        let leader = self
            .members()
            .into_iter()
            .filter(|m| {
                m.info.rebalancing
                    && (m.local
                        || (m.status == MemberStatus::Up
                            && self
                                .links
                                .get(&m.info.name)
                                .is_some_and(|l| l.is_connected())))
            })
            .map(|m| m.info.name)
            .min();
        if leader.as_ref() != Some(&me) {
            return;
        }
        {
            let mut last = lock(&self.placement.last_round);
            if last.is_some_and(|t| t.elapsed() < Duration::from_millis(cfg.interval_ms)) {
                return;
            }
            *last = Some(Instant::now());
        }
        if self.placement.rebalancing.swap(true, Ordering::AcqRel) {
            return;
        }
        let node = self.clone();
        let spawned = self.spawn_task(async move {
            node.rebalance_round(&cfg).await;
            node.placement.rebalancing.store(false, Ordering::Release);
        });
        if !spawned {
            self.placement.rebalancing.store(false, Ordering::Release);
        }
    }

    /// Starts (or re-configures) the rebalancer on this node, or stops it with `None`.
    pub fn set_rebalancer(self: &Arc<Self>, cfg: Option<RebalancerConfig>) {
        let on = cfg.is_some();
        *lock(&self.placement.rebalancer) = cfg;
        lock(&self.members).update_me(|me| me.rebalancing = on);
        self.gossip();
    }

    /// The rebalancer rounds this node led, oldest first.
    pub fn rebalance_rounds(&self) -> Vec<RebalanceRound> {
        lock(&self.placement.rounds).iter().cloned().collect()
    }

    /// The services associated with `id`: declared in books either way, or observed
    /// exchanging messages with it.
    pub fn associated(&self, id: ServiceId) -> Vec<Association> {
        let view = self.view();
        let books = self.books.associations(id);
        let mut out: BTreeMap<ServiceId, Association> = BTreeMap::new();
        let entry = |peer: ServiceId| Association {
            peer,
            kind: None,
            node: None,
            declared: Vec::new(),
            observed: false,
            out_msgs_per_s: 0.0,
            in_msgs_per_s: 0.0,
            bytes_per_s: 0.0,
        };
        for (role, addr) in books.holds {
            let a = out.entry(addr.id).or_insert_with(|| entry(addr.id));
            a.kind = Some(addr.kind.clone());
            a.declared.push(format!("holds {role}"));
        }
        for (holder, role) in books.held_by {
            let a = out.entry(holder.id).or_insert_with(|| entry(holder.id));
            a.kind = Some(holder.kind.clone());
            a.declared.push(format!("held as {role}"));
        }
        for ((f, t), (rate, bytes)) in &view.directed {
            let (peer, outgoing) = if *f == id {
                (*t, true)
            } else if *t == id {
                (*f, false)
            } else {
                continue;
            };
            if peer == id {
                continue;
            }
            let a = out.entry(peer).or_insert_with(|| entry(peer));
            a.observed = true;
            if outgoing {
                a.out_msgs_per_s += rate;
            } else {
                a.in_msgs_per_s += rate;
            }
            a.bytes_per_s += bytes;
        }
        let mut list: Vec<Association> = out
            .into_values()
            .map(|mut a| {
                a.node = view.node_of(a.peer);
                if a.kind.is_none() {
                    a.kind = view
                        .services
                        .iter()
                        .find(|s| s.id == a.peer)
                        .map(|s| s.kind.clone());
                }
                a
            })
            .collect();
        list.sort_by(|x, y| {
            (y.in_msgs_per_s + y.out_msgs_per_s).total_cmp(&(x.in_msgs_per_s + x.out_msgs_per_s))
        });
        list
    }
}

/// Placement's part of the public API.
impl NodeHandle {
    /// Moves every movable service of this node to the best peers (trees whose root is here
    /// as one unit each) and stops taking services; pinned services stay and are listed.
    /// Returns once every move has ended. Call [`shutdown`](Self::shutdown) after it to
    /// leave the cluster with nothing lost.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// # tern::doc_support::gossiped(&phone, &tv)?;
    /// # phone.spawn(Counter::default())?;
    /// let report = block_on(phone.drain());
    /// println!("{} moved, pinned: {:?}, failed: {:?}", report.moved.len(), report.pinned, report.failed);
    /// assert!(report.failed.is_empty() && phone.services().iter().all(|s| s.addr.kind.name.as_str() == "probe"));
    /// phone.shutdown();
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn drain(&self) -> DrainReport {
        // Asked for: power coming back does not end it.
        self.shared
            .placement
            .power_drain
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let node = self.shared.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = self.shared.spawn_task(async move {
            let _ = tx.send(node.drain().await);
        });
        if !spawned {
            return DrainReport::default();
        }
        rx.await.unwrap_or_default()
    }

    /// What the last drain of this node did (whether [`drain`](Self::drain) or a low
    /// battery started it), once it has ended.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// # tern::doc_support::gossiped(&phone, &tv)?;
    /// let counter = tv.spawn(Counter::default())?;
    /// assert!(tv.last_drain().is_none());
    /// block_on(tv.drain());
    /// let last = tv.last_drain().expect("drained");
    /// assert_eq!(last.moved.len(), 1);
    /// assert_eq!(phone.location(counter.id()), Some(phone.name().clone()));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn last_drain(&self) -> Option<DrainReport> {
        self.shared.last_drain()
    }

    /// Replaces the placement policy (the default is [`AffinityPolicy`](crate::AffinityPolicy)).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// use std::sync::Arc;
    /// // The default policy, with load weighed more than it is by default.
    /// let mut policy = tern::AffinityPolicy::default();
    /// policy.load_weight *= 2.0;
    /// phone.set_policy(Arc::new(policy));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_policy(&self, policy: Arc<dyn Policy>) {
        self.shared.placement.set_policy(policy);
    }

    /// Where `ids` (with their trees when `opts.tree`) would go and why, moving nothing.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// # tern::doc_support::gossiped(&phone, &tv)?;
    /// # let player = phone.spawn(Counter::default())?.id();
    /// let plan = phone.plan(&[player], &tern::PlanOptions { tree: true, ..Default::default() })?;
    /// for m in &plan.moves {
    ///     println!("{} {} -> {}: {}", m.kind, m.from, m.to, m.reasons.join("; "));
    /// }
    /// // Nothing moved.
    /// assert_eq!(phone.location(player), Some(phone.name().clone()));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn plan(&self, ids: &[ServiceId], opts: &PlanOptions) -> Result<Plan, Error> {
        self.shared.plan(ids, opts)
    }

    /// Plans `ids` and carries the plan out (one all-or-none group per source node), holding
    /// each service where it lands (as an explicit [`migrate`](Self::migrate) does). `Ok` only
    /// when every planned move happened. If any service cannot be placed, nothing moves and
    /// [`Error::NotMoved`] lists every refusal; if a group did not move, it carries every
    /// report (groups from other source nodes may have moved: their reports say so).
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// # tern::doc_support::gossiped(&phone, &tv)?;
    /// let counter = phone.spawn(Counter::default())?;
    /// let opts = tern::PlanOptions { to: Some("tv".into()), ..Default::default() };
    /// let report = block_on(phone.place(&[counter.id()], &opts))?;
    /// assert_eq!(report.plan.moves.len(), 1);
    /// assert!(report.groups.iter().all(|g| g.committed));
    /// assert!(tv.is_held(counter.id()));
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn place(&self, ids: &[ServiceId], opts: &PlanOptions) -> Result<PlaceReport, Error> {
        let report = self.shared.place(ids, opts).await?;
        if report.groups.iter().all(|g| g.committed) {
            return Ok(report);
        }
        Err(NotMoved {
            reports: report.groups.into_iter().flat_map(|g| g.members).collect(),
            refused: Vec::new(),
        }
        .into())
    }

    /// Starts the periodic affinity rebalancer on this node (`None` stops it). Of the nodes
    /// that run it, the one with the smallest name plans for the whole cluster.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// use tern::RebalancerConfig;
    /// phone.set_rebalancer(Some(RebalancerConfig { interval_ms: 30_000, ..Default::default() }));
    /// // ... and off again.
    /// phone.set_rebalancer(None);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_rebalancer(&self, cfg: Option<RebalancerConfig>) {
        self.shared.set_rebalancer(cfg);
    }

    /// Runs one rebalancer round now, planned here for the whole cluster, and waits for its
    /// migrations.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let round = block_on(phone.rebalance_now(&tern::RebalancerConfig::default()));
    /// println!("led by {}: {} moves", round.leader, round.moves.len());
    /// assert_eq!(round.leader, *phone.name());
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub async fn rebalance_now(&self, cfg: &RebalancerConfig) -> RebalanceRound {
        let node = self.shared.clone();
        let cfg = cfg.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = self.shared.spawn_task(async move {
            let _ = tx.send(node.rebalance_round(&cfg).await);
        });
        let empty = RebalanceRound {
            leader: self.name().clone(),
            cross_node_fraction_before: 0.0,
            cross_node_fraction_planned: 0.0,
            moves: Vec::new(),
        };
        if !spawned {
            return empty;
        }
        rx.await.unwrap_or(empty)
    }

    /// The rebalancer rounds this node led, oldest first.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// assert!(phone.rebalance_rounds().is_empty());
    /// block_on(phone.rebalance_now(&tern::RebalancerConfig::default()));
    /// assert_eq!(phone.rebalance_rounds().len(), 1);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn rebalance_rounds(&self) -> Vec<RebalanceRound> {
        self.shared.rebalance_rounds()
    }

    /// The services associated with `id`: in its book, holding it in theirs, or observed
    /// exchanging messages with it (rates from the traffic tables of this node and its
    /// peers), heaviest first.
    ///
    /// ```
    /// # use tern::doc_support::{block_on, two_nodes, Counter, CounterMsg, SECS_10};
    /// # let (phone, tv) = two_nodes()?;
    /// let player = tv.spawn(Counter::default())?;
    /// let lyrics = tv.spawn(Counter::default())?;
    /// tv.book_insert(player.id(), "lyrics", lyrics.addr())?;
    /// let with_player = tv.associated(player.id());
    /// assert_eq!(with_player[0].peer, lyrics.id());
    /// assert_eq!(with_player[0].declared, ["holds lyrics"]);
    /// # phone.shutdown(); tv.shutdown();
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn associated(&self, id: ServiceId) -> Vec<Association> {
        self.shared.associated(id)
    }
}
