//! Address books and their reverse index, cluster-wide.
//!
//! Every node keeps the edges `holder --role--> target` of the whole cluster: those held by its
//! own services, and those its peers told it about. From them it answers who a service holds and
//! who holds it. The table is bounded by `edges_max`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::ids::{NodeName, ServiceAddr, ServiceId};

/// One address-book entry: `holder` knows `target` as `role`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BookEdge {
    /// The service whose book holds the entry.
    pub holder: ServiceAddr,
    /// The entry's name in that book.
    pub role: String,
    /// The service the entry names.
    pub target: ServiceAddr,
}

/// What [`BookIndex::associations`] answers for one service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Associations {
    /// Entries of the service's own book: role and target.
    pub holds: Vec<(String, ServiceAddr)>,
    /// Services whose books hold it, and under which role.
    pub held_by: Vec<(ServiceAddr, String)>,
}

/// The table is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgesFull {
    /// The bound.
    pub edges_max: usize,
}

/// Books of every known holder and the reverse index.
#[derive(Debug)]
pub struct BookIndex {
    books: HashMap<ServiceId, (ServiceAddr, BTreeMap<String, ServiceAddr>)>,
    reverse: HashMap<ServiceId, BTreeSet<(ServiceId, String)>>,
    edges: usize,
    edges_max: usize,
    /// Per service the index names, the epoch of the last relocation applied: a late, older
    /// `Located` must not point entries back. Pruned to the services still named.
    epochs: HashMap<ServiceId, u64>,
}

impl BookIndex {
    /// An empty index holding at most `edges_max` edges.
    pub fn new(edges_max: usize) -> Self {
        BookIndex {
            books: HashMap::new(),
            reverse: HashMap::new(),
            edges: 0,
            edges_max,
            epochs: HashMap::new(),
        }
    }

    /// Number of edges held.
    pub fn len(&self) -> usize {
        self.edges
    }

    /// True when no edge is held.
    pub fn is_empty(&self) -> bool {
        self.edges == 0
    }

    /// Adds or replaces `holder`'s entry `role`. Returns the replaced edge.
    pub fn insert(&mut self, edge: BookEdge) -> Result<Option<BookEdge>, EdgesFull> {
        let holder_id = edge.holder.id;
        let exists = self
            .books
            .get(&holder_id)
            .is_some_and(|(_, b)| b.contains_key(&edge.role));
        if !exists && self.edges >= self.edges_max {
            return Err(EdgesFull {
                edges_max: self.edges_max,
            });
        }
        let (holder_addr, book) = self
            .books
            .entry(holder_id)
            .or_insert_with(|| (edge.holder.clone(), BTreeMap::new()));
        *holder_addr = edge.holder.clone();
        let old = book.insert(edge.role.clone(), edge.target.clone());
        let replaced = match old {
            Some(old_target) => {
                self.unlink(old_target.id, holder_id, &edge.role);
                Some(BookEdge {
                    holder: edge.holder.clone(),
                    role: edge.role.clone(),
                    target: old_target,
                })
            }
            None => {
                self.edges += 1;
                None
            }
        };
        self.reverse
            .entry(edge.target.id)
            .or_default()
            .insert((holder_id, edge.role));
        Ok(replaced)
    }

    fn unlink(&mut self, target: ServiceId, holder: ServiceId, role: &str) {
        if let Some(set) = self.reverse.get_mut(&target) {
            set.remove(&(holder, role.to_owned()));
            if set.is_empty() {
                self.reverse.remove(&target);
            }
        }
    }

    /// Removes `holder`'s entry `role`, returning it.
    pub fn remove(&mut self, holder: ServiceId, role: &str) -> Option<BookEdge> {
        let (holder_addr, book) = self.books.get_mut(&holder)?;
        let target = book.remove(role)?;
        let edge = BookEdge {
            holder: holder_addr.clone(),
            role: role.to_owned(),
            target,
        };
        if book.is_empty() {
            self.books.remove(&holder);
        }
        self.edges -= 1;
        self.unlink(edge.target.id, holder, role);
        Some(edge)
    }

    /// Channel rebuild: `id` runs on `node` since `epoch`. Rewrites every entry that names it
    /// and the holder address of its own book, unless a later epoch was applied already (a
    /// late `Located` never points entries back). Returns the number of entries rewritten.
    pub fn relocate(&mut self, id: ServiceId, node: &NodeName, epoch: u64) -> usize {
        if !self.books.contains_key(&id) && !self.reverse.contains_key(&id) {
            return 0;
        }
        if self.epochs.get(&id).is_some_and(|known| *known > epoch) {
            return 0; // older news: the entries already name a later place
        }
        self.epochs.insert(id, epoch);
        if self.epochs.len() > 2 * (self.books.len() + self.reverse.len()) + 64 {
            let (books, reverse) = (&self.books, &self.reverse);
            self.epochs
                .retain(|s, _| books.contains_key(s) || reverse.contains_key(s));
        }
        let mut rewritten = 0;
        if let Some((holder, book)) = self.books.get_mut(&id) {
            if holder.node != *node {
                holder.node = node.clone();
                rewritten += book.len();
            }
        }
        let holders: Vec<(ServiceId, String)> = self
            .reverse
            .get(&id)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        for (holder, role) in holders {
            if let Some(target) = self
                .books
                .get_mut(&holder)
                .and_then(|(_, b)| b.get_mut(&role))
            {
                if target.node != *node {
                    target.node = node.clone();
                    rewritten += 1;
                }
            }
        }
        rewritten
    }

    /// Removes every entry of `holder`'s book, returning them.
    pub fn remove_holder(&mut self, holder: ServiceId) -> Vec<BookEdge> {
        let roles: Vec<String> = match self.books.get(&holder) {
            Some((_, b)) => b.keys().cloned().collect(),
            None => return Vec::new(),
        };
        roles
            .iter()
            .filter_map(|r| self.remove(holder, r))
            .collect()
    }

    /// The target of `holder`'s entry `role`.
    pub fn get(&self, holder: ServiceId, role: &str) -> Option<&ServiceAddr> {
        self.books.get(&holder).and_then(|(_, b)| b.get(role))
    }

    /// Where the books say `id` runs, and since which epoch (0 before any move was applied).
    pub fn location(&self, id: ServiceId) -> Option<(&NodeName, u64)> {
        let epoch = self.epochs.get(&id).copied().unwrap_or(0);
        self.addr_of(id).map(|a| (&a.node, epoch))
    }

    /// `id`'s address as the books know it: its own (as a holder) or one naming it.
    pub fn addr_of(&self, id: ServiceId) -> Option<&ServiceAddr> {
        if let Some((addr, _)) = self.books.get(&id) {
            return Some(addr);
        }
        let (holder, role) = self.reverse.get(&id)?.iter().next()?;
        self.get(*holder, role)
    }

    /// `holder`'s whole book, by role.
    pub fn book(&self, holder: ServiceId) -> Vec<(String, ServiceAddr)> {
        self.books
            .get(&holder)
            .map(|(_, b)| b.iter().map(|(r, t)| (r.clone(), t.clone())).collect())
            .unwrap_or_default()
    }

    /// Who `id` holds and who holds `id`.
    pub fn associations(&self, id: ServiceId) -> Associations {
        let held_by = self
            .reverse
            .get(&id)
            .map(|set| {
                set.iter()
                    .filter_map(|(h, role)| {
                        self.books
                            .get(h)
                            .map(|(addr, _)| (addr.clone(), role.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Associations {
            holds: self.book(id),
            held_by,
        }
    }

    /// Every edge whose holder is on `node`, for telling a peer.
    pub fn edges_held_on(&self, node: &NodeName) -> Vec<BookEdge> {
        let mut out = Vec::new();
        for (holder, book) in self.books.values() {
            if &holder.node != node {
                continue;
            }
            for (role, target) in book {
                out.push(BookEdge {
                    holder: holder.clone(),
                    role: role.clone(),
                    target: target.clone(),
                });
            }
        }
        out
    }

    /// Checks that the forward and reverse tables agree. Used by tests and debug assertions.
    pub fn check(&self) -> Result<(), String> {
        let mut forward = 0usize;
        for (h, (addr, book)) in &self.books {
            if addr.id != *h {
                return Err(format!("holder {h} filed under another id"));
            }
            if book.is_empty() {
                return Err(format!("holder {h} has an empty book"));
            }
            for (role, t) in book {
                forward += 1;
                let ok = self
                    .reverse
                    .get(&t.id)
                    .is_some_and(|s| s.contains(&(*h, role.clone())));
                if !ok {
                    return Err(format!("edge {h} -{role}-> {} missing in reverse", t.id));
                }
            }
        }
        let reverse: usize = self.reverse.values().map(|s| s.len()).sum();
        if forward != self.edges || reverse != self.edges {
            return Err(format!(
                "edge counts differ: forward {forward}, reverse {reverse}, counted {}",
                self.edges
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::KindKey;

    fn addr(n: u64, node: &str) -> ServiceAddr {
        ServiceAddr {
            id: ServiceId::from_parts(0, n),
            kind: KindKey::new("k", 1),
            node: NodeName::new(node),
        }
    }

    fn edge(h: u64, role: &str, t: u64) -> BookEdge {
        BookEdge {
            holder: addr(h, "a"),
            role: role.into(),
            target: addr(t, "b"),
        }
    }

    #[test]
    fn relocate_rewrites_holders_and_targets() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let addr = |n: u64, node: &NodeName| ServiceAddr {
            id: ServiceId::from_parts(0, n),
            kind: crate::ids::KindKey::new("k", 1),
            node: node.clone(),
        };
        let mut idx = BookIndex::new(10);
        idx.insert(BookEdge {
            holder: addr(1, &a),
            role: "x".into(),
            target: addr(2, &a),
        })
        .unwrap();
        idx.insert(BookEdge {
            holder: addr(2, &a),
            role: "y".into(),
            target: addr(3, &b),
        })
        .unwrap();
        idx.insert(BookEdge {
            holder: addr(3, &b),
            role: "z".into(),
            target: addr(2, &a),
        })
        .unwrap();
        assert_eq!(idx.relocate(ServiceId::from_parts(0, 2), &b, 1), 3);
        assert_eq!(idx.get(ServiceId::from_parts(0, 1), "x").unwrap().node, b);
        assert_eq!(idx.get(ServiceId::from_parts(0, 3), "z").unwrap().node, b);
        assert_eq!(idx.edges_held_on(&b).len(), 2, "its own book moved with it");
        assert_eq!(
            idx.relocate(ServiceId::from_parts(0, 2), &b, 1),
            0,
            "idempotent"
        );
        // A late `Located` of an older epoch does not point the entries back.
        assert_eq!(idx.relocate(ServiceId::from_parts(0, 2), &a, 0), 0);
        assert_eq!(idx.get(ServiceId::from_parts(0, 1), "x").unwrap().node, b);
        assert_eq!(idx.relocate(ServiceId::from_parts(0, 2), &a, 2), 3);
        assert_eq!(idx.get(ServiceId::from_parts(0, 1), "x").unwrap().node, a);
    }

    #[test]
    fn insert_replace_remove_keep_both_sides() {
        let mut ix = BookIndex::new(10);
        assert!(ix.insert(edge(1, "db", 2)).unwrap().is_none());
        assert!(ix.insert(edge(3, "peer", 2)).unwrap().is_none());
        let replaced = ix.insert(edge(1, "db", 4)).unwrap().unwrap();
        assert_eq!(replaced.target.id, ServiceId::from_parts(0, 2));
        ix.check().unwrap();
        let a2 = ix.associations(ServiceId::from_parts(0, 2));
        assert_eq!(a2.held_by.len(), 1);
        assert_eq!(a2.held_by[0].1, "peer");
        let a1 = ix.associations(ServiceId::from_parts(0, 1));
        assert_eq!(a1.holds, vec![("db".to_string(), addr(4, "b"))]);
        assert!(ix.remove(ServiceId::from_parts(0, 3), "peer").is_some());
        assert!(ix
            .associations(ServiceId::from_parts(0, 2))
            .held_by
            .is_empty());
        assert_eq!(ix.remove_holder(ServiceId::from_parts(0, 1)).len(), 1);
        assert!(ix.is_empty());
        ix.check().unwrap();
    }

    #[test]
    fn bounded() {
        let mut ix = BookIndex::new(2);
        ix.insert(edge(1, "x", 2)).unwrap();
        ix.insert(edge(1, "y", 2)).unwrap();
        assert_eq!(ix.insert(edge(1, "z", 2)), Err(EdgesFull { edges_max: 2 }));
        // Replacing an existing entry needs no room.
        ix.insert(edge(1, "x", 3)).unwrap();
        ix.check().unwrap();
    }
}
