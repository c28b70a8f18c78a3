//! The address books as this node knows them: its services' own entries and the ones its peers
//! announced (`tern_proto::directory::BookIndex` behind a lock). One of `NodeShared`'s
//! subsystems: its lock is a leaf (nothing else is locked while it is held); telling the peers
//! of a change is the node's part (`NodeShared::book_insert`, `book_remove`).

use std::collections::VecDeque;
use std::sync::Mutex;

use tern_proto::directory::{Associations, BookEdge, BookIndex, EdgesFull};
use tern_proto::ids::{NodeName, ServiceAddr, ServiceId};

/// Book changes kept aside because their holder was believed elsewhere (see
/// `tern_proto::claims::BookClaim::Wait`); the oldest goes first.
pub const BOOK_CHANGES_WAITING_MAX: usize = 1024;

/// A peer's book change waiting for its holder's move to that peer to be known here.
struct Waiting {
    peer: NodeName,
    edge: BookEdge,
    added: bool,
}

/// The books (bounded by `book_edges_max`).
pub(crate) struct Books {
    index: Mutex<BookIndex>,
    waiting: Mutex<VecDeque<Waiting>>,
}

impl Books {
    /// Empty books holding at most `edges_max` edges.
    pub fn new(edges_max: usize) -> Self {
        Books {
            index: Mutex::new(BookIndex::new(edges_max)),
            waiting: Mutex::new(VecDeque::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BookIndex> {
        crate::sync::lock(&self.index)
    }

    /// `holder`'s entry under `role`.
    pub fn get(&self, holder: ServiceId, role: &str) -> Option<ServiceAddr> {
        self.lock().get(holder, role).cloned()
    }

    /// `holder`'s whole book.
    pub fn book(&self, holder: ServiceId) -> Vec<(String, ServiceAddr)> {
        self.lock().book(holder)
    }

    /// Who `id` holds and who holds it.
    pub fn associations(&self, id: ServiceId) -> Associations {
        self.lock().associations(id)
    }

    /// `id`'s address as the books know it.
    pub fn addr_of(&self, id: ServiceId) -> Option<ServiceAddr> {
        self.lock().addr_of(id).cloned()
    }

    /// Where the books say `id` runs, and since which epoch.
    pub fn location(&self, id: ServiceId) -> Option<(NodeName, u64)> {
        self.lock().location(id).map(|(n, e)| (n.clone(), e))
    }

    /// Edges known.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Adds or replaces an edge.
    pub fn insert(&self, edge: BookEdge) -> Result<Option<BookEdge>, EdgesFull> {
        self.lock().insert(edge)
    }

    /// Removes `holder`'s entry under `role`.
    pub fn remove(&self, holder: ServiceId, role: &str) -> Option<BookEdge> {
        self.lock().remove(holder, role)
    }

    /// Removes `holder`'s whole book (it stopped).
    pub fn remove_holder(&self, holder: ServiceId) -> Vec<BookEdge> {
        self.lock().remove_holder(holder)
    }

    /// Every edge whose holder is on `node`.
    pub fn edges_held_on(&self, node: &NodeName) -> Vec<BookEdge> {
        self.lock().edges_held_on(node)
    }

    /// `id` is at `node` since `epoch`: every entry naming it follows (the channel rebuild).
    /// Returns how many entries were rewritten.
    pub fn relocate(&self, id: ServiceId, node: &NodeName, epoch: u64) -> usize {
        self.lock().relocate(id, node, epoch)
    }

    /// The book a snapshot carried: entries the index lacks are added under `holder` (its
    /// address at its source); entries it has are left as they are. On a full table, stops
    /// and returns the bound.
    pub fn learn(
        &self,
        holder: &ServiceAddr,
        book: Vec<(String, ServiceAddr)>,
    ) -> Result<(), usize> {
        let mut index = self.lock();
        for (role, target) in book {
            if index.get(holder.id, &role).is_some() {
                continue;
            }
            let edge = BookEdge {
                holder: holder.clone(),
                role,
                target,
            };
            index.insert(edge).map_err(|full| full.edges_max)?;
        }
        Ok(())
    }

    /// Keeps `peer`'s change aside until its holder is known to run there; returns the
    /// change this pushed out, if the waiting list was full.
    pub fn wait(&self, peer: &NodeName, edge: BookEdge, added: bool) -> Option<BookEdge> {
        let mut waiting = crate::sync::lock(&self.waiting);
        let out = if waiting.len() >= BOOK_CHANGES_WAITING_MAX {
            waiting.pop_front().map(|w| w.edge)
        } else {
            None
        };
        waiting.push_back(Waiting {
            peer: peer.clone(),
            edge,
            added,
        });
        out
    }

    /// `holder` is now known to run on `node`: the changes `node` made to its book while this
    /// node believed it elsewhere, in the order they came.
    pub fn take_waiting(&self, holder: ServiceId, node: &NodeName) -> Vec<(BookEdge, bool)> {
        let mut waiting = crate::sync::lock(&self.waiting);
        let mut out = Vec::new();
        waiting.retain_mut(|w| {
            if w.edge.holder.id == holder && w.peer == *node {
                out.push((w.edge.clone(), w.added));
                false
            } else {
                true
            }
        });
        out
    }

    /// Peer `peer` announced (or withdrew) an entry of one of its services. An entry of a
    /// service it does not say is its own is refused.
    pub fn peer_change(&self, peer: &NodeName, edge: BookEdge, added: bool) -> Result<(), String> {
        if &edge.holder.node != peer {
            return Err(format!(
                "node {peer} sent a book entry of service {} on node {}",
                edge.holder.id, edge.holder.node
            ));
        }
        if added {
            self.insert(edge)
                .map_err(|full| format!("book edge table is full ({})", full.edges_max))?;
        } else {
            self.remove(edge.holder.id, &edge.role);
        }
        Ok(())
    }
}
