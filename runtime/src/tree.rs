//! Assembly trees: a parent service and the children it spawned or adopted, migrated as one
//! unit (all members or none, frozen together), to one node or split across several.
//!
//! A tree is kept in the cluster-wide books: a parent holds each child under the role
//! `child:<id>`. So it is known on every node, travels with the parent's book, and is
//! rewritten by the channel rebuild like any other entry.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{DeliveryError, Error};
use crate::migrate::{MigrateOptions, MigrationReport};
use crate::node::NodeShared;
use tern_proto::ids::{NodeName, ServiceAddr, ServiceId};
use tern_proto::wire::MigMsg;

/// Book roles naming a child start with this.
pub const CHILD_ROLE_PREFIX: &str = "child:";

/// Members of one tree listed at most (a walk stops there with an error).
pub const TREE_MEMBERS_MAX: usize = 4096;

pub use tern_proto::migration::GROUP_MEMBERS_MAX;

/// The book role under which a parent holds `child`.
pub fn child_role(child: ServiceId) -> String {
    format!("{CHILD_ROLE_PREFIX}{child}")
}

/// One member of an assembly tree, as listed by [`NodeHandle::tree`](crate::NodeHandle::tree).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeMember {
    /// The member, with the node it runs on as far as this node knows.
    pub addr: ServiceAddr,
    /// Its parent; `None` for the root.
    pub parent: Option<ServiceId>,
    /// 0 for the root, 1 for its children, and so on.
    pub depth: u32,
}

/// What became of a group migration (a tree, whole or split): one report per member, and
/// the group's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupReport {
    /// Per member, in the order the moves were given.
    pub members: Vec<MigrationReport>,
    /// True when every member moved; false when none did.
    pub committed: bool,
    /// The group's freeze window: from the first member's freeze until the last member's
    /// target served (an upper bound, like each member's `freeze_us`), in microseconds.
    pub freeze_us: u64,
    /// From the call until every member ran on its target with its whole queue, in
    /// microseconds.
    pub total_us: u64,
}

impl GroupReport {
    /// The group's report from its members' (as [`NotMoved`](crate::NotMoved) carries them
    /// when a group did not move).
    pub fn from_reports(members: Vec<MigrationReport>) -> Self {
        let committed = !members.is_empty() && members.iter().all(|r| r.committed());
        debug_assert!(
            committed || members.iter().all(|r| !r.committed()),
            "a group moves all or none"
        );
        let frozen: Vec<&MigrationReport> =
            members.iter().filter(|r| r.frozen_after_us > 0).collect();
        let freeze_us = match (
            frozen.iter().map(|r| r.frozen_after_us).min(),
            frozen.iter().map(|r| r.frozen_after_us + r.freeze_us).max(),
        ) {
            (Some(first), Some(last)) => last - first,
            _ => 0,
        };
        let total_us = members.iter().map(|r| r.total_us).max().unwrap_or(0);
        GroupReport {
            members,
            committed,
            freeze_us,
            total_us,
        }
    }

    /// Why the group did not move: the first member's reason that is not merely "another
    /// member failed", else the first reason.
    pub fn aborted(&self) -> Option<String> {
        if self.committed {
            return None;
        }
        let reasons: Vec<&crate::AbortReason> = self
            .members
            .iter()
            .filter_map(|r| r.aborted.as_ref())
            .collect();
        reasons
            .iter()
            .find(|r| !matches!(r, crate::AbortReason::Group(_)))
            .or(reasons.first())
            .map(|r| r.to_string())
    }

    /// Messages carried in the members' snapshots.
    pub fn carried(&self) -> u64 {
        self.members.iter().map(|r| r.carried).sum()
    }

    /// Messages forwarded after the commit.
    pub fn forwarded(&self) -> u64 {
        self.members.iter().map(|r| r.forwarded).sum()
    }

    /// Book entries rewritten at the source.
    pub fn rebuilt(&self) -> u64 {
        self.members.iter().map(|r| r.rebuilt).sum()
    }
}

impl NodeShared {
    /// Records `child` as a child of local service `parent`.
    pub fn record_child(&self, parent: ServiceId, child: &ServiceAddr) -> Result<(), Error> {
        let holder = self
            .local_addr_of(parent)
            .ok_or(DeliveryError::UnknownService {
                id: parent,
                node: self.name().clone(),
            })?;
        self.book_insert(&holder, &child_role(child.id), child.clone())
    }

    /// A service stopped: its parent, if it runs here, no longer holds it.
    pub fn forget_child(&self, child: ServiceId) {
        if let Some(parent) = self.parent_of(child) {
            if self.local_addr_of(parent).is_some() {
                self.book_remove(parent, &child_role(child));
            }
        }
    }

    /// True when `node` was lost or left: its link is declared lost and not up again, or
    /// the member table says so.
    fn node_gone(&self, node: &NodeName) -> bool {
        self.links.get(node).is_some_and(|l| l.check_up().is_err()) || self.member_gone(node)
    }

    /// Node `lost` was lost: the `child:` entries held by its services are forgotten here (if
    /// it was cut off rather than dead, its `BookSync` brings them back when it reconnects),
    /// so services here it parented can be adopted again. The entries this node's services
    /// hold for children there stay: [`tree`](Self::tree) leaves those members out while
    /// their node is gone, and they leave the books if it comes back as a new incarnation
    /// ([`forget_tree_children_at`](Self::forget_tree_children_at)). Returns how many left.
    pub(crate) fn forget_tree_edges_at(&self, lost: &NodeName) -> usize {
        let mut dropped = 0;
        for edge in self.books.edges_held_on(lost) {
            if edge.role.starts_with(CHILD_ROLE_PREFIX)
                && self.books.remove(edge.holder.id, &edge.role).is_some()
            {
                dropped += 1;
            }
        }
        dropped
    }

    /// Node `node` restarted: children this node's services held there are gone. Their
    /// `child:` entries are removed (and the peers told). Returns how many.
    pub(crate) fn forget_tree_children_at(&self, node: &NodeName) -> usize {
        let me = self.name().clone();
        let mut dropped = 0;
        for edge in self.books.edges_held_on(&me) {
            if edge.role.starts_with(CHILD_ROLE_PREFIX)
                && self.whereabouts(edge.target.id, &edge.target.node) == *node
                && self.book_remove(edge.holder.id, &edge.role)
            {
                dropped += 1;
            }
        }
        dropped
    }

    /// The parent of `id` in its assembly tree, from the books.
    pub fn parent_of(&self, id: ServiceId) -> Option<ServiceId> {
        let role = child_role(id);
        self.books
            .associations(id)
            .held_by
            .into_iter()
            .find(|(_, r)| *r == role)
            .map(|(holder, _)| holder.id)
    }

    /// The children of `id`, from the books.
    pub fn children_of(&self, id: ServiceId) -> Vec<ServiceAddr> {
        self.books
            .book(id)
            .into_iter()
            .filter(|(role, _)| role.starts_with(CHILD_ROLE_PREFIX))
            .map(|(_, addr)| addr)
            .collect()
    }

    /// Where `id` runs as far as this node knows: here; else the directory, a handle's
    /// channel, the books, a member's gossip; else `fallback`. (The directory stays stale for
    /// as long as this node missed the `Located` of a move, for example under a cut; requests
    /// sent on a stale belief are asked again where gossip says.)
    pub fn whereabouts(&self, id: ServiceId, fallback: &NodeName) -> NodeName {
        if self.slot(id).is_some() {
            return self.name().clone();
        }
        self.driver
            .location(id)
            .map(|(n, _)| n)
            .or_else(|| self.channel_location(id).map(|(n, _)| n))
            .or_else(|| self.books.addr_of(id).map(|a| a.node))
            .or_else(|| self.hosting_member(id))
            .unwrap_or_else(|| fallback.clone())
    }

    /// Makes `child` a child of local service `parent`. A service has at most one parent,
    /// and a tree has no cycles.
    pub fn adopt(&self, parent: ServiceId, child: &ServiceAddr) -> Result<(), Error> {
        if parent == child.id {
            return Err(Error::Tree(format!("{parent} cannot adopt itself")));
        }
        if let Some(p) = self.parent_of(child.id) {
            return Err(Error::Tree(format!(
                "{} already has a parent ({p}); a service has at most one",
                child.id
            )));
        }
        let mut up = Some(parent);
        let mut steps = 0;
        while let Some(p) = up {
            if p == child.id {
                return Err(Error::Tree(format!(
                    "{} is an ancestor of {parent}: adopting it would make a cycle",
                    child.id
                )));
            }
            steps += 1;
            if steps > TREE_MEMBERS_MAX {
                break;
            }
            up = self.parent_of(p);
        }
        self.record_child(parent, child)
    }

    /// The tree rooted at `root`, root first, breadth first. Members on a node that was lost
    /// or left are left out, with what hangs below them.
    pub fn tree(&self, root: ServiceId) -> Result<Vec<TreeMember>, Error> {
        let root_node = self.whereabouts(root, self.name());
        let kind = self.addr_known(root).map(|a| a.kind);
        let Some(kind) = kind else {
            return Err(DeliveryError::UnknownService {
                id: root,
                node: self.name().clone(),
            }
            .into());
        };
        let mut out = vec![TreeMember {
            addr: ServiceAddr {
                id: root,
                kind,
                node: root_node,
            },
            parent: None,
            depth: 0,
        }];
        let mut seen: BTreeSet<ServiceId> = BTreeSet::from([root]);
        let mut todo = VecDeque::from([(root, 0u32)]);
        while let Some((id, depth)) = todo.pop_front() {
            for child in self.children_of(id) {
                if !seen.insert(child.id) {
                    continue;
                }
                if out.len() >= TREE_MEMBERS_MAX {
                    return Err(Error::Limit {
                        what: "members of one assembly tree",
                        max: TREE_MEMBERS_MAX,
                    });
                }
                let node = self.whereabouts(child.id, &child.node);
                if node != *self.name() && self.node_gone(&node) {
                    // Lost with its node (or the node left): not part of the tree while
                    // it is gone, nor is what hangs below it.
                    continue;
                }
                out.push(TreeMember {
                    addr: ServiceAddr { node, ..child },
                    parent: Some(id),
                    depth: depth + 1,
                });
                todo.push_back((child.id, depth + 1));
            }
        }
        Ok(out)
    }

    /// An address for `id` from the local table or the books.
    pub(crate) fn addr_known(&self, id: ServiceId) -> Option<ServiceAddr> {
        self.local_addr_of(id).or_else(|| self.books.addr_of(id))
    }

    /// Moves every `(service, node)` of `moves` as one group: all or none, frozen together.
    /// The members must all run on one node (this one or a peer, which then does it).
    pub async fn migrate_group(
        self: &Arc<Self>,
        moves: Vec<(ServiceId, NodeName)>,
        opts: MigrateOptions,
    ) -> Result<GroupReport, Error> {
        if moves.is_empty() {
            return Err(Error::Tree(
                "a group migration needs at least one member".into(),
            ));
        }
        if moves.len() > GROUP_MEMBERS_MAX {
            return Err(Error::Limit {
                what: "members of one group migration",
                max: GROUP_MEMBERS_MAX,
            });
        }
        let me = self.name().clone();
        // Where this node believes the members run. That can be stale (a `Located` lost with
        // a connection), so the request goes to the node most of them are believed on, and
        // that node, which knows its own services, checks that every member runs there.
        let mut sources: BTreeMap<NodeName, usize> = BTreeMap::new();
        for (id, _) in &moves {
            *sources.entry(self.whereabouts(*id, &me)).or_default() += 1;
        }
        let all_local = moves.iter().all(|(id, _)| self.slot(*id).is_some());
        let at = if all_local {
            me.clone()
        } else {
            sources
                .iter()
                .filter(|(n, _)| **n != me)
                .max_by_key(|(_, count)| **count)
                .map(|(n, _)| n.clone())
                .unwrap_or_else(|| me.clone())
        };
        if at == me && !all_local && sources.len() > 1 {
            return Err(Error::Tree(format!(
                "the members run on {} nodes ({}); a group moves from one node",
                sources.len(),
                sources
                    .keys()
                    .map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if at == *self.name() {
            let unknown = moves.iter().find(|(id, _)| self.slot(*id).is_none());
            if let Some((id, _)) = unknown {
                return Err(DeliveryError::UnknownService {
                    id: *id,
                    node: self.name().clone(),
                }
                .into());
            }
            let refuse = self.preflight(&moves, &opts).await;
            let rxs = self.driver.migrate_group(self, &moves, opts, refuse);
            let mut reports = Vec::with_capacity(rxs.len());
            for rx in rxs {
                reports.push(rx.await.map_err(|_| Error::Stopped)?);
            }
            return Ok(GroupReport::from_reports(reports));
        }
        let ask = |at: NodeName, moves: Vec<(ServiceId, NodeName)>| {
            self.request_migration::<Vec<MigrationReport>>(at, None, GROUP_SLACK, move |req| {
                MigMsg::GroupRequest {
                    req,
                    moves,
                    drain: opts.drain,
                    force: opts.force,
                    hold: opts.hold,
                }
            })
        };
        let first = moves[0].0;
        let reports = match ask(at.clone(), moves.clone()).await {
            // A stale belief: ask once more where gossip says the first member is.
            Err(Error::Remote { node, detail }) if detail.contains(crate::node::NOT_HERE) => {
                match self.hosting_member(first).filter(|alt| *alt != at) {
                    Some(alt) => ask(alt, moves).await?,
                    None => return Err(Error::Remote { node, detail }),
                }
            }
            other => other?,
        };
        Ok(GroupReport::from_reports(reports))
    }

    /// Moves the whole tree of `root` to `to`. The tree is read on the root's node, whose
    /// books are the ones its members hold (another node's copy may lag, and moving part of
    /// a tree would split it).
    pub async fn migrate_tree(
        self: &Arc<Self>,
        root: ServiceId,
        to: NodeName,
        opts: MigrateOptions,
    ) -> Result<GroupReport, Error> {
        let me = self.name().clone();
        let at = self.whereabouts(root, &me);
        if at == me {
            let moves = self
                .tree(root)?
                .into_iter()
                .map(|m| (m.addr.id, to.clone()))
                .collect();
            return self.migrate_group(moves, opts).await;
        }
        let ask = |at: NodeName, to: NodeName| {
            self.request_migration::<Vec<MigrationReport>>(
                at,
                Some(root),
                GROUP_SLACK,
                move |req| MigMsg::TreeRequest {
                    req,
                    root,
                    to,
                    drain: opts.drain,
                    force: opts.force,
                    hold: opts.hold,
                },
            )
        };
        let reports = match ask(at.clone(), to.clone()).await {
            // A stale belief: ask once more where gossip says the root is.
            Err(Error::Remote { node, detail }) if detail.contains(crate::node::NOT_HERE) => {
                match self.hosting_member(root).filter(|alt| *alt != at) {
                    Some(alt) => ask(alt, to).await?,
                    None => return Err(Error::Remote { node, detail }),
                }
            }
            other => other?,
        };
        Ok(GroupReport::from_reports(reports))
    }
}

/// Beyond the migration deadline, how long a remote group request waits for its reports.
const GROUP_SLACK: Duration = Duration::from_secs(30);

/// A peer asked this node to move a group of its services; answers with the reports.
pub(crate) fn on_group_request(
    node: &Arc<NodeShared>,
    link: &Arc<crate::transport::PeerLink>,
    req: u64,
    moves: Vec<(ServiceId, NodeName)>,
    opts: MigrateOptions,
) {
    let (node, link) = (node.clone(), link.clone());
    actix_rt::spawn(async move {
        let missing = moves.iter().find(|(id, _)| node.slot(*id).is_none());
        let res = match missing {
            _ if moves.len() > GROUP_MEMBERS_MAX => Err(format!(
                "{} members: a group migration moves at most {GROUP_MEMBERS_MAX}",
                moves.len()
            )),
            Some((id, _)) => Err(format!(
                "service {id} {} {}",
                crate::node::NOT_HERE,
                node.name()
            )),
            None => {
                let refuse = node.preflight(&moves, &opts).await;
                let rxs = node.driver.migrate_group(&node, &moves, opts, refuse);
                let mut reports = Vec::with_capacity(rxs.len());
                let mut stopped = false;
                for rx in rxs {
                    match rx.await {
                        Ok(r) => reports.push(r),
                        Err(_) => stopped = true,
                    }
                }
                if stopped {
                    Err("the node stopped".to_string())
                } else {
                    Ok(reports)
                }
            }
        };
        crate::migrate::answer_request(&node, &link, req, res);
    });
}

/// A peer asked this node to move the tree of its service `root`; answers with the reports.
pub(crate) fn on_tree_request(
    node: &Arc<NodeShared>,
    link: &Arc<crate::transport::PeerLink>,
    req: u64,
    root: ServiceId,
    to: NodeName,
    opts: MigrateOptions,
) {
    let (node, link) = (node.clone(), link.clone());
    actix_rt::spawn(async move {
        let res = if node.slot(root).is_none() {
            Err(format!(
                "service {root} {} {}",
                crate::node::NOT_HERE,
                node.name()
            ))
        } else {
            match node.migrate_tree(root, to, opts).await {
                Ok(r) => Ok(r.members),
                // The asker reads the reports and fails the same way.
                Err(Error::NotMoved(n)) if !n.reports.is_empty() => Ok(n.reports),
                Err(e) => Err(e.to_string()),
            }
        };
        crate::migrate::answer_request(&node, &link, req, res);
    });
}
