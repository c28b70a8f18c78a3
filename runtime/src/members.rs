//! Membership: every node gossips what it is (capabilities, load, power) to its connected
//! peers once a second, with what it knows of the others. A node that starts with a few seed
//! peers learns the rest and connects to them; a node that shuts down is marked `Left`, one
//! that falls silent `Lost`.

use std::sync::Arc;
use std::time::Instant;

use crate::mailbox::lock;
use crate::node::NodeShared;
use tern_proto::ids::{KindKey, NodeName, ServiceId};
pub use tern_proto::members::{
    Member, MemberInfo, MemberStatus, NodeLoad, Power, CAPABILITIES_MAX, GOSSIP_EDGES_MAX,
    GOSSIP_MS, GOSSIP_SERVICES_MAX,
};
use tern_proto::members::{KINDS_MAX, NAMES_MAX, NAME_BYTES_MAX};
use tern_proto::wire::Frame;

/// What a node keeps of another member.
struct Known {
    info: MemberInfo,
    status: MemberStatus,
    /// When newer figures last came.
    heard: Instant,
    /// True once the member spoke for itself (its own gossip, on a link to it). Only such
    /// members are passed on in gossip, and only the others expire.
    first_hand: bool,
}

/// The table of members a node keeps (bounded by `peers_max` + itself).
pub(crate) struct Members {
    me: MemberInfo,
    others: std::collections::HashMap<NodeName, Known>,
}

/// A node's capabilities, whether it drains, and the versions of one kind it runs and reads.
pub(crate) type Fitness = (Vec<String>, bool, Vec<KindKey>, Vec<KindKey>);

/// The versions of kind `name` in a node's `kinds`: those it runs, and those it reads.
pub(crate) fn versions_of(
    kinds: &[tern_proto::members::KindInfo],
    name: &str,
) -> (Vec<KindKey>, Vec<KindKey>) {
    let mine = kinds.iter().filter(|k| k.kind.name == name);
    let runs = mine.clone().map(|k| k.kind.clone()).collect();
    let reads = mine
        .flat_map(|k| k.reads.iter().map(|v| KindKey::new(name, *v)))
        .collect();
    (runs, reads)
}

impl Members {
    pub fn new(me: MemberInfo) -> Self {
        Members {
            me,
            others: std::collections::HashMap::new(),
        }
    }

    pub fn me(&self) -> &MemberInfo {
        &self.me
    }

    pub fn update_me(&mut self, change: impl FnOnce(&mut MemberInfo)) {
        change(&mut self.me);
        self.me.version += 1;
    }

    /// Takes `info` if it is newer than what is known. `direct` when it came from the node
    /// itself, which is then up. Returns true when the node was not known before.
    pub fn learn(&mut self, info: MemberInfo, direct: bool, max: usize) -> bool {
        if info.name == self.me.name {
            return false;
        }
        if let Some(k) = self.others.get_mut(&info.name) {
            let newer = (info.incarnation, info.version) > (k.info.incarnation, k.info.version);
            // A node's own word is always taken: it may have restarted.
            if newer || direct {
                k.info = info;
                k.heard = Instant::now();
                if direct {
                    k.status = MemberStatus::Up;
                    k.first_hand = true;
                }
            }
            return false;
        }
        if self.others.len() >= max {
            // A member speaking for itself takes the place of the longest-unconfirmed one
            // heard of second hand: names a peer made up cannot keep real ones out.
            let unconfirmed = self
                .others
                .iter()
                .filter(|(_, k)| !k.first_hand)
                .min_by_key(|(_, k)| k.heard)
                .map(|(n, _)| n.clone());
            match unconfirmed {
                Some(out) if direct => {
                    self.others.remove(&out);
                }
                _ => return false,
            }
        }
        self.others.insert(
            info.name.clone(),
            Known {
                info,
                status: MemberStatus::Up,
                heard: Instant::now(),
                first_hand: direct,
            },
        );
        true
    }

    /// The names of the members known (besides this node).
    fn names(&self) -> std::collections::HashSet<NodeName> {
        self.others.keys().cloned().collect()
    }

    /// Forgets the members heard of only second hand, longer than `ttl` ago; returns them.
    pub fn expire_second_hand(&mut self, ttl: std::time::Duration) -> Vec<NodeName> {
        let old: Vec<NodeName> = self
            .others
            .iter()
            .filter(|(_, k)| !k.first_hand && k.heard.elapsed() > ttl)
            .map(|(n, _)| n.clone())
            .collect();
        for n in &old {
            self.others.remove(n);
        }
        old
    }

    /// The member up whose last list holds `id` at the newest epoch (the first by name among
    /// equals), with that epoch.
    fn hosting(&self, id: ServiceId) -> Option<(NodeName, u64)> {
        self.others
            .iter()
            .filter(|(_, k)| k.status == MemberStatus::Up)
            .filter_map(|(n, k)| {
                let found = k.info.services.iter().find(|(s, _, _, _)| *s == id);
                found.map(|(_, _, _, e)| (n.clone(), *e))
            })
            .min_by(|(na, ea), (nb, eb)| eb.cmp(ea).then_with(|| na.cmp(nb)))
    }

    /// What placement needs to know of `name` to tell whether it can take a service of
    /// `kind`: its capabilities, whether it drains, and the versions of the kind it runs and
    /// reads.
    pub fn fitness_of(&self, name: &NodeName, kind: &KindKey) -> Option<Fitness> {
        let info = if *name == self.me.name {
            &self.me
        } else {
            &self.others.get(name)?.info
        };
        let (runs, reads) = versions_of(&info.kinds, &kind.name);
        Some((info.capabilities.clone(), info.draining, runs, reads))
    }

    fn capabilities_of(&self, name: &NodeName) -> Option<Vec<String>> {
        if *name == self.me.name {
            return Some(self.me.capabilities.clone());
        }
        self.others.get(name).map(|k| k.info.capabilities.clone())
    }

    /// The incarnation `name` last said it runs.
    fn incarnation_of(&self, name: &NodeName) -> Option<u64> {
        self.others.get(name).map(|k| k.info.incarnation)
    }

    /// True when `name` left or was lost and has not been heard from directly since.
    fn is_gone(&self, name: &NodeName) -> bool {
        self.others
            .get(name)
            .is_some_and(|k| matches!(k.status, MemberStatus::Lost | MemberStatus::Left))
    }

    /// The members that left or were lost and have not been heard from directly since.
    fn gone(&self) -> Vec<NodeName> {
        self.others
            .iter()
            .filter(|(_, k)| matches!(k.status, MemberStatus::Lost | MemberStatus::Left))
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub fn set_status(&mut self, name: &NodeName, status: MemberStatus) {
        if let Some(k) = self.others.get_mut(name) {
            k.status = status;
        }
    }

    pub fn list(&self) -> Vec<Member> {
        let mut out = vec![Member {
            info: self.me.clone(),
            status: MemberStatus::Up,
            local: true,
        }];
        let mut others: Vec<Member> = self
            .others
            .values()
            .map(|k| Member {
                info: k.info.clone(),
                status: k.status,
                local: false,
            })
            .collect();
        others.sort_by(|a, b| a.info.name.cmp(&b.info.name));
        out.extend(others);
        out
    }

    /// What goes in a gossip frame: this node, then every member believed up that spoke for
    /// itself here (what was only heard of is not passed on, so a made-up member reaches only
    /// the nodes its inventor talks to, and is forgotten there in time).
    fn gossip(&self) -> Vec<MemberInfo> {
        std::iter::once(self.me.clone())
            .chain(
                self.others
                    .values()
                    .filter(|k| k.status == MemberStatus::Up && k.first_hand)
                    .map(|k| k.info.clone()),
            )
            .collect()
    }
}

/// Resident memory of this process, from `/proc/self/statm` (0 where there is none).
fn resident_bytes() -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

impl NodeShared {
    /// This node's load now.
    pub fn load(&self) -> NodeLoad {
        let (services, backlog) = self.local_depths();
        NodeLoad {
            services,
            backlog,
            memory_bytes: resident_bytes(),
        }
    }

    /// Gossip round: refresh this node's load, then tell every connected peer what this node
    /// knows.
    pub fn gossip(self: &Arc<Self>) {
        let load = self.load();
        let services = self.hosted_list(GOSSIP_SERVICES_MAX);
        let mut edges = lock(&self.traffic).all();
        edges.truncate(GOSSIP_EDGES_MAX);
        let kinds = self.kind_infos();
        let held: Vec<ServiceId> = self
            .placement
            .held()
            .into_iter()
            .take(GOSSIP_SERVICES_MAX)
            .collect();
        let names = self.local_names();
        let standbys = self.standbys_named(GOSSIP_SERVICES_MAX);
        let nodes = {
            let mut m = lock(&self.members);
            let me = m.me();
            if me.load != load
                || me.services != services
                || me.edges != edges
                || me.kinds != kinds
                || me.held != held
                || me.names != names
                || me.standbys != standbys
            {
                m.update_me(|me| {
                    me.load = load;
                    me.services = services;
                    me.edges = edges;
                    me.kinds = kinds;
                    me.held = held;
                    me.names = names;
                    me.standbys = standbys;
                });
            }
            m.gossip()
        };
        for link in self.links.all() {
            if !link.is_connected() {
                continue;
            }
            if let Err(e) = link.push_ctrl(&Frame::Members {
                nodes: nodes.clone(),
            }) {
                tracing::debug!(peer = %link.name, error = %e, "gossip not queued");
            }
        }
    }

    /// A gossip round soon, on the node's thread, out of the caller's way (a service arriving
    /// inside a freeze, a name registered): a burst of calls makes one round.
    pub fn gossip_soon(self: &Arc<Self>) {
        if self
            .gossip_pending
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            return;
        }
        let node = self.clone();
        let spawned = self.spawn_task(async move {
            node.gossip_pending
                .store(false, std::sync::atomic::Ordering::Release);
            node.gossip();
        });
        if !spawned {
            self.gossip_pending
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// A peer's gossip: learn new members (and connect to them), newer figures of known ones.
    pub fn on_members(self: &Arc<Self>, from: &NodeName, nodes: Vec<MemberInfo>) {
        let max = self.limits.peers_max;
        let mut changed = Vec::new();
        let mut new_peers = Vec::new();
        let mut restarted = Vec::new();
        let mut hosts_changed = false;
        let mut bad_names = Vec::new();
        let mut heard_names = Vec::new();
        {
            let mut m = lock(&self.members);
            for mut info in nodes.into_iter().take(max + 1) {
                // A name no certificate can carry is no member's.
                if crate::certs::check_node_name(info.name.as_str()).is_err() {
                    bad_names.push(info.name);
                    continue;
                }
                // Whatever a peer claims is kept within the same bounds this node gossips with.
                info.services.truncate(GOSSIP_SERVICES_MAX);
                info.edges.truncate(GOSSIP_EDGES_MAX);
                info.capabilities.truncate(CAPABILITIES_MAX);
                info.kinds.truncate(KINDS_MAX);
                info.held.truncate(GOSSIP_SERVICES_MAX);
                info.names.truncate(NAMES_MAX);
                info.names.retain(|(n, _)| n.len() <= NAME_BYTES_MAX);
                let direct = info.name == *from;
                let before = m.capabilities_of(&info.name);
                // Only a node's own word says it restarted (a peer may lie about another).
                if direct
                    && m.incarnation_of(&info.name)
                        .is_some_and(|was| was < info.incarnation)
                {
                    restarted.push(info.name.clone());
                }
                hosts_changed |= m
                    .others
                    .get(&info.name)
                    .is_none_or(|k| k.info.services != info.services);
                if direct {
                    // Names are taken from the member's own word only, and only for services
                    // it lists as its own.
                    let hosted: std::collections::HashSet<ServiceId> =
                        info.services.iter().map(|(id, _, _, _)| *id).collect();
                    heard_names.push((info.name.clone(), info.names.clone(), hosted));
                }
                if direct {
                    // The versions a node runs are its own word too.
                    self.note_versions(&info.name, &info.kinds);
                }
                let (name, addr, caps) = (info.name.clone(), info.addr, info.capabilities.clone());
                if m.learn(info, direct, max) {
                    if let Some(a) = addr {
                        new_peers.push((name.clone(), a));
                    }
                }
                if before.as_ref() != Some(&caps) {
                    changed.push(name);
                }
            }
        }
        for (member, names, hosted) in heard_names {
            self.names_heard(&member, &names, |id| hosted.contains(&id));
        }
        for name in bad_names {
            let refusal = tern_proto::claims::ClaimRefused {
                claim: "member",
                detail: format!(
                    "{from} gossiped a member named {:?}, which is not a node name",
                    name.as_str().chars().take(64).collect::<String>()
                ),
            };
            self.refuse_claim(from, &refusal);
        }
        for (name, addr) in new_peers {
            if name != *self.name() && self.links.get(&name).is_none() {
                match self.links.insert_heard(&name, addr, &self.limits) {
                    Ok(_) => self
                        .logs
                        .event("member-joined", format!("{name} at {addr} (via {from})")),
                    Err(e) => self.logs.event("member-ignored", format!("{name}: {e}")),
                }
            }
        }
        if !changed.is_empty() {
            self.capabilities_changed(&changed);
        }
        for name in restarted {
            self.peer_restarted(&name);
        }
        // Gossip may have just said where a service went whose channel points at a gone node.
        if hosts_changed {
            for gone in self.members_gone() {
                self.follow_gossip_away_from(&gone);
            }
        }
    }

    /// Forgets the members heard of only second hand for longer than
    /// `members_second_hand_ttl_ms`, and the links made to dial them that never connected.
    pub fn expire_second_hand_members(&self) {
        let ttl = std::time::Duration::from_millis(self.limits.members_second_hand_ttl_ms);
        let gone = lock(&self.members).expire_second_hand(ttl);
        for name in gone {
            self.logs.event(
                "member-forgotten",
                format!("{name}: heard of only second hand, never itself"),
            );
        }
        // Links made to dial members that are no longer known (forgotten, or pushed out of a
        // full table by a member speaking for itself) go too.
        let members = lock(&self.members).names();
        self.links
            .drop_heard_only(|n| members.contains(n) || n == self.name());
    }

    /// The members that left or were lost (and have not spoken for themselves since).
    pub fn members_gone(&self) -> Vec<NodeName> {
        lock(&self.members).gone()
    }

    /// True when `name` left or was lost (and has not spoken for itself since).
    pub fn member_gone(&self, name: &NodeName) -> bool {
        lock(&self.members).is_gone(name)
    }

    /// The connection to `peer` went down: it left (it said so) or was lost.
    pub fn member_down(&self, peer: &NodeName, left: bool) {
        let status = if left {
            MemberStatus::Left
        } else {
            MemberStatus::Lost
        };
        lock(&self.members).set_status(peer, status);
        self.names_forget_node(peer);
        if left {
            self.forget_versions(peer);
        }
        self.logs.event(
            if left { "member-left" } else { "member-lost" },
            peer.to_string(),
        );
    }

    /// The member whose gossip lists `id` among its services (at the newest epoch).
    pub fn hosting_member(&self, id: ServiceId) -> Option<NodeName> {
        lock(&self.members).hosting(id).map(|(n, _)| n)
    }

    /// [`hosting_member`](Self::hosting_member), with the epoch its gossip gave.
    pub fn hosting_member_at(&self, id: ServiceId) -> Option<(NodeName, u64)> {
        lock(&self.members).hosting(id)
    }

    /// The standby that `host` named for `id` in its gossip (kept once `host` is lost), with
    /// the epoch it named it for. Only the host's word counts: another member listing a
    /// standby for the service changes nothing.
    pub fn standby_named(&self, id: ServiceId, host: &NodeName) -> Option<(NodeName, u64)> {
        let m = lock(&self.members);
        let info = if *host == m.me.name {
            &m.me
        } else {
            &m.others.get(host)?.info
        };
        info.standbys
            .iter()
            .find(|(s, _, _)| *s == id)
            .map(|(_, e, n)| (n.clone(), *e))
    }

    /// Every member this node knows, itself first.
    pub fn members(&self) -> Vec<Member> {
        lock(&self.members).list()
    }
}
