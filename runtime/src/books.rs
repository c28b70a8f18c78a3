//! The address books as this node knows them: its services' own entries and the ones its peers
//! announced (`tern_proto::directory::BookIndex` behind a lock). One of `NodeShared`'s
//! subsystems: its lock is a leaf (nothing else is locked while it is held); telling the peers
//! of a change is the node's part (`NodeShared::book_insert`, `book_remove`).

use std::sync::Mutex;

use tern_proto::directory::{Associations, BookEdge, BookIndex, EdgesFull};
use tern_proto::ids::{NodeName, ServiceAddr, ServiceId};

/// The books (bounded by `book_edges_max`).
pub(crate) struct Books {
    index: Mutex<BookIndex>,
}

impl Books {
    /// Empty books holding at most `edges_max` edges.
    pub fn new(edges_max: usize) -> Self {
        Books {
            index: Mutex::new(BookIndex::new(edges_max)),
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
