//! The registry: which services run on this node, as untyped slots.
//!
//! One of `NodeShared`'s named subsystems. A service may leave and come back while an older
//! copy of it is still being cleaned up (an aborted attempt's copy discards itself after the
//! next attempt registered a new one), so removal by a copy names the copy: it never takes
//! out a newer one.
//!
//! An entry is the slot alone (a service's address is its id, its slot's kind and this node),
//! so each service costs the table a key and one pointer.

use std::sync::{Arc, RwLock};

use crate::error::Error;
use crate::mailbox::Slot;
use tern_proto::ids::{IdMap, NodeName, ServiceAddr, ServiceId};

/// The local services, bounded by `services_max`.
pub(crate) struct Registry {
    services: RwLock<IdMap<Arc<dyn Slot>>>,
    services_max: usize,
    /// This node: where every registered service is.
    node: NodeName,
}

/// True when `a` and `b` are the same copy (the same mailbox).
fn same_copy(a: &Arc<dyn Slot>, b: &Arc<dyn Slot>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

impl Registry {
    pub fn new(services_max: usize, node: NodeName) -> Self {
        Registry {
            services: RwLock::new(IdMap::default()),
            services_max,
            node,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, IdMap<Arc<dyn Slot>>> {
        self.services.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, IdMap<Arc<dyn Slot>>> {
        self.services.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `slot` as service `id` here (a newer copy replaces an older one).
    pub fn register(&self, id: ServiceId, slot: Arc<dyn Slot>) -> Result<(), Error> {
        let mut services = self.write();
        if services.len() >= self.services_max && !services.contains_key(&id) {
            return Err(Error::Limit {
                what: "services on this node",
                max: self.services_max,
            });
        }
        services.insert(id, slot);
        Ok(())
    }

    pub fn remove(&self, id: ServiceId) {
        self.write().remove(&id);
    }

    /// Removes `id` only if `slot` is the copy registered; true if it was.
    pub fn remove_copy(&self, id: ServiceId, slot: &Arc<dyn Slot>) -> bool {
        let mut services = self.write();
        match services.get(&id) {
            Some(s) if same_copy(s, slot) => {
                services.remove(&id);
                true
            }
            _ => false,
        }
    }

    pub fn slot(&self, id: ServiceId) -> Option<Arc<dyn Slot>> {
        self.read().get(&id).cloned()
    }

    /// A registered service's address.
    pub fn addr(&self, id: ServiceId) -> Option<ServiceAddr> {
        self.read().get(&id).map(|s| self.addr_of(id, &**s))
    }

    /// The address of `slot`, registered as `id`.
    pub fn addr_of(&self, id: ServiceId, slot: &dyn Slot) -> ServiceAddr {
        ServiceAddr {
            id,
            kind: slot.kind().clone(),
            node: self.node.clone(),
        }
    }

    pub fn with_all<R>(&self, f: impl FnOnce(&IdMap<Arc<dyn Slot>>) -> R) -> R {
        f(&self.read())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::Mailbox;
    use tern_proto::ids::{KindKey, NodeName};

    fn copy(id: ServiceId) -> Arc<dyn Slot> {
        Arc::new(Mailbox::<u32>::new(id, KindKey::new("k", 1), 4))
    }

    /// Hole 1 of the protocol-core work: an aborted attempt's copy cleaned up after the next
    /// attempt had registered a newer copy of the same service, and took it out; the newer
    /// copy then ran unreachable.
    #[test]
    fn a_discarded_copy_leaves_without_taking_the_newer_one() {
        let reg = Registry::new(8, NodeName::new("b"));
        let id = ServiceId::from_parts(1, 1);
        let (old, new) = (copy(id), copy(id));
        reg.register(id, old.clone()).unwrap();
        reg.register(id, new.clone()).unwrap();
        assert_eq!(
            reg.addr(id),
            Some(ServiceAddr {
                id,
                kind: KindKey::new("k", 1),
                node: NodeName::new("b"),
            })
        );
        assert!(
            !reg.remove_copy(id, &old),
            "the old copy is not the one registered"
        );
        let here = reg.slot(id).expect("the newer copy is still registered");
        assert!(same_copy(&here, &new));
        assert!(reg.remove_copy(id, &new));
        assert!(reg.slot(id).is_none());
    }

    #[test]
    fn the_bound_counts_services_not_copies() {
        let reg = Registry::new(1, NodeName::new("b"));
        let (a, b) = (ServiceId::from_parts(1, 1), ServiceId::from_parts(1, 2));
        reg.register(a, copy(a)).unwrap();
        reg.register(a, copy(a))
            .expect("a newer copy of the same service fits");
        assert!(matches!(
            reg.register(b, copy(b)),
            Err(Error::Limit { max: 1, .. })
        ));
    }
}
