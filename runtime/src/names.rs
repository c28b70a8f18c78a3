//! What travels with a service besides its state and is the node's to keep: its registered
//! names ([`tern_proto::names`]) and whether a user's explicit move holds it where it is.
//! Both are installed when a copy restored here starts, and dropped when the service leaves
//! this node or stops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tern_proto::ids::{NodeName, ServiceAddr, ServiceId};
use tern_proto::names::{Conflict, NameError, Registry};

use crate::error::Error;
use crate::node::NodeShared;
use crate::sync::lock;

/// What a copy restored here brought besides its state, until it starts or is dropped.
struct Carried {
    held: bool,
    names: Vec<String>,
}

/// The node's names and arrivals.
pub(crate) struct NameTables {
    registry: Mutex<Registry>,
    arriving: Mutex<HashMap<ServiceId, Carried>>,
    /// The registry's clock starts here.
    since: Instant,
}

impl Default for NameTables {
    fn default() -> Self {
        NameTables {
            registry: Mutex::new(Registry::default()),
            arriving: Mutex::new(HashMap::new()),
            since: Instant::now(),
        }
    }
}

impl NameTables {
    fn now_ms(&self) -> u64 {
        self.since.elapsed().as_millis() as u64
    }
}

impl NodeShared {
    /// A copy of `id` was restored here (paused) with these carried flags and names.
    pub(crate) fn carried_arriving(&self, id: ServiceId, held: bool, names: Vec<String>) {
        lock(&self.names.arriving).insert(id, Carried { held, names });
    }

    /// The copy of `id` restored here runs now (`started`) or was dropped: what it carried is
    /// installed, or forgotten.
    pub(crate) fn carried_arrived(self: &Arc<Self>, id: ServiceId, started: bool) {
        let Some(c) = lock(&self.names.arriving).remove(&id) else {
            return;
        };
        if !started {
            return;
        }
        self.placement.hold(id, c.held);
        if !c.names.is_empty() {
            let now = self.names.now_ms();
            let conflicts = lock(&self.names.registry).install(id, c.names, now);
            self.name_conflicts(conflicts);
        }
        // Not gossiped from here: this runs before the copy starts, inside the freeze. The next
        // round says it (a second at most): the old host refuses nothing meanwhile (a hold is
        // checked where the service runs), and names heard stay `NAME_GRACE_MS` (3 s) after
        // the old host stops listing them, so lookups elsewhere keep finding them.
    }

    /// Service `id` left this node (moved away or stopped): its hold and names go.
    pub(crate) fn service_left(&self, id: ServiceId) {
        self.placement.hold(id, false);
        lock(&self.names.registry).remove_service(id);
    }

    fn name_conflicts(&self, conflicts: Vec<Conflict>) {
        for c in conflicts {
            let detail = if c.kept == c.dropped {
                format!(
                    "{}: not kept for {}: this node holds too many names",
                    c.name, c.kept
                )
            } else {
                format!("{}: kept by {}, dropped for {}", c.name, c.kept, c.dropped)
            };
            self.logs.event("name-conflict", detail);
        }
    }

    /// Registers `name` for the local service `id`.
    pub(crate) fn register_name(self: &Arc<Self>, name: &str, id: ServiceId) -> Result<(), Error> {
        if self.slot(id).is_none() {
            return Err(Error::Name(NameError::NotHere {
                name: name.into(),
                id,
                node: self.name().clone(),
            }));
        }
        let now = self.names.now_ms();
        lock(&self.names.registry)
            .register(name, id, now)
            .map_err(Error::Name)?;
        self.logs.event("name-registered", format!("{name}: {id}"));
        self.gossip_soon();
        Ok(())
    }

    /// Removes `name` if the local service `id` holds it.
    pub(crate) fn unregister_name(self: &Arc<Self>, name: &str, id: ServiceId) -> bool {
        let removed = lock(&self.names.registry).unregister(name, id);
        if removed {
            self.gossip_soon();
        }
        removed
    }

    /// The names of local services, for this node's gossip.
    pub(crate) fn local_names(&self) -> Vec<(String, ServiceId)> {
        lock(&self.names.registry).local()
    }

    /// The names local service `id` holds (they travel in its snapshot).
    pub(crate) fn names_of(&self, id: ServiceId) -> Vec<String> {
        lock(&self.names.registry).names_of(id)
    }

    /// Names a member gossiped; `hosts` tells whether it lists a service as its own.
    pub(crate) fn names_heard(
        &self,
        from: &NodeName,
        names: &[(String, ServiceId)],
        hosts: impl Fn(ServiceId) -> bool,
    ) {
        let now = self.names.now_ms();
        let conflicts = lock(&self.names.registry).heard_from(from, names, hosts, now);
        self.name_conflicts(conflicts);
    }

    /// Member `node` was lost or left: its word about names no longer counts.
    pub(crate) fn names_forget_node(&self, node: &NodeName) {
        lock(&self.names.registry).forget_node(node);
    }

    /// The address of the service registered as `name`, if any node is known to have it.
    pub(crate) fn lookup_name(&self, name: &str) -> Option<ServiceAddr> {
        let now = self.names.now_ms();
        let (id, listed_by) = lock(&self.names.registry).lookup(name, now)?;
        if let Some(addr) = self.local_addr_of(id) {
            return Some(addr);
        }
        // Its kind, from the gossip of whoever lists it (or the books).
        let kind = self
            .members()
            .into_iter()
            .flat_map(|m| m.info.services)
            .find(|(s, _, _, _)| *s == id)
            .map(|(_, kind, _, _)| kind)
            .or_else(|| self.books.addr_of(id).map(|a| a.kind))?;
        let node = self
            .channel_location(id)
            .map(|(n, _)| n)
            .or(listed_by)
            .unwrap_or_else(|| self.name().clone());
        Some(ServiceAddr { id, kind, node })
    }

    /// A typed handle to the service registered as `name`.
    pub(crate) fn lookup<S: crate::service::Service>(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<crate::handle::ServiceRef<S>, Error> {
        let addr = self
            .lookup_name(name)
            .ok_or_else(|| NameError::Unknown { name: name.into() })?;
        Ok(self.resolve(&addr)?)
    }

    /// Every name this node knows of, with its service.
    pub(crate) fn all_names(&self) -> Vec<(String, ServiceId)> {
        let now = self.names.now_ms();
        lock(&self.names.registry)
            .all(now)
            .into_iter()
            .map(|(n, id, _)| (n, id))
            .collect()
    }
}
