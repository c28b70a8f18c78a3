//! Registered names: find a service by a name instead of wiring its address by hand (as
//! Erlang's registered names or Akka's receptionist do). Pure data, no I/O; times are
//! milliseconds on the caller's clock.
//!
//! - A node registers names only for services it hosts; a name travels with its service in
//!   the snapshot header, and goes when the service stops.
//! - Each node gossips the names of the services it hosts ([`crate::members::MemberInfo`]'s
//!   `names`). A binding is believed only from the member that lists the service among those
//!   it hosts, the same belief as for locations in gossip.
//! - A binding heard stays [`NAME_GRACE_MS`] after the last gossip that listed it, so a move
//!   (the old host stops listing it before the new host starts) does not hide the name.
//! - One name, one service. Registering a name another service holds is refused. Two nodes
//!   that register one name at the same moment (within a gossip round) both succeed locally;
//!   when they hear of each other, the smaller service id keeps the name everywhere and the
//!   other node drops its binding and reports the conflict.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::ids::{NodeName, ServiceId};
use crate::members::{NAMES_MAX, NAME_BYTES_MAX};

/// How long a binding heard in gossip outlives the last gossip that listed it.
pub const NAME_GRACE_MS: u64 = 3 * crate::members::GOSSIP_MS;
/// Bindings heard from peers kept at most (the stalest goes first).
pub const NAMES_HEARD_MAX: usize = 65_536;

/// Why a name cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// Empty, too long, or with control characters.
    #[error("name {name:?} is not acceptable: {why}")]
    Invalid {
        /// The name.
        name: String,
        /// Why.
        why: &'static str,
    },
    /// Another service holds it.
    #[error("name {name:?} is taken by service {holder}")]
    Taken {
        /// The name.
        name: String,
        /// The service holding it.
        holder: ServiceId,
    },
    /// The service does not run on the node asked: names are registered where it runs.
    #[error("name {name:?} cannot be registered for service {id}: it does not run on node {node}")]
    NotHere {
        /// The name.
        name: String,
        /// The service.
        id: ServiceId,
        /// The node asked.
        node: NodeName,
    },
    /// No node is known to have a service registered under this name.
    #[error("no service is registered as {name:?}")]
    Unknown {
        /// The name.
        name: String,
    },
    /// This node holds [`NAMES_MAX`] names already.
    #[error("this node holds {max} names already")]
    Full {
        /// The bound.
        max: usize,
    },
}

/// Checks that `name` can be registered: 1 to [`NAME_BYTES_MAX`] bytes, no control
/// characters.
pub fn check_name(name: &str) -> Result<(), NameError> {
    let invalid = |why| {
        Err(NameError::Invalid {
            name: name.chars().take(NAME_BYTES_MAX).collect(),
            why,
        })
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > NAME_BYTES_MAX {
        return invalid("it is longer than 128 bytes");
    }
    if name.chars().any(char::is_control) {
        return invalid("it has control characters");
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct Heard {
    id: ServiceId,
    node: NodeName,
    last_ms: u64,
}

/// A binding dropped because another service keeps the name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The name.
    pub name: String,
    /// The service that keeps it.
    pub kept: ServiceId,
    /// The service that lost it (hosted here, or heard of from a peer).
    pub dropped: ServiceId,
}

/// One node's view of the names: those of its own services, and those heard from peers.
#[derive(Debug, Default)]
pub struct Registry {
    local: BTreeMap<String, ServiceId>,
    heard: BTreeMap<String, Heard>,
}

impl Registry {
    /// Registers `name` for `id`, a service hosted here. Registering a name the service
    /// already holds again is a no-op.
    pub fn register(&mut self, name: &str, id: ServiceId, now_ms: u64) -> Result<(), NameError> {
        check_name(name)?;
        if let Some(holder) = self.holder(name, now_ms) {
            if holder != id {
                return Err(NameError::Taken {
                    name: name.into(),
                    holder,
                });
            }
        }
        if !self.local.contains_key(name) && self.local.len() >= NAMES_MAX {
            return Err(NameError::Full { max: NAMES_MAX });
        }
        self.local.insert(name.into(), id);
        Ok(())
    }

    /// Removes `name` if `id` holds it here; true if it did.
    pub fn unregister(&mut self, name: &str, id: ServiceId) -> bool {
        if self.local.get(name) == Some(&id) {
            self.local.remove(name);
            true
        } else {
            false
        }
    }

    /// The names service `id` holds here.
    pub fn names_of(&self, id: ServiceId) -> Vec<String> {
        self.local
            .iter()
            .filter(|(_, v)| **v == id)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Service `id` left this node (moved away or stopped): its names go with it; returns
    /// them.
    pub fn remove_service(&mut self, id: ServiceId) -> Vec<String> {
        let names = self.names_of(id);
        for n in &names {
            self.local.remove(n);
        }
        names
    }

    /// Service `id` arrived here with `names`: they are installed, except those another
    /// service keeps (returned as conflicts) and those past [`NAMES_MAX`] (dropped and
    /// returned as conflicts with `kept` equal to `dropped`).
    pub fn install(&mut self, id: ServiceId, names: Vec<String>, now_ms: u64) -> Vec<Conflict> {
        let mut conflicts = Vec::new();
        for name in names {
            if check_name(&name).is_err() {
                continue;
            }
            match self.holder(&name, now_ms) {
                Some(other) if other != id && other < id => conflicts.push(Conflict {
                    name,
                    kept: other,
                    dropped: id,
                }),
                _ => {
                    if !self.local.contains_key(&name) && self.local.len() >= NAMES_MAX {
                        conflicts.push(Conflict {
                            name,
                            kept: id,
                            dropped: id,
                        });
                        continue;
                    }
                    // A heard binding of a larger id loses to this one.
                    if self.heard.get(&name).is_some_and(|h| h.id != id) {
                        self.heard.remove(&name);
                    }
                    self.local.insert(name, id);
                }
            }
        }
        conflicts
    }

    /// Every name held by a service hosted here, for gossip.
    pub fn local(&self) -> Vec<(String, ServiceId)> {
        self.local.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// A member's gossip: `names` as `node` lists them; a binding is taken only when `hosts`
    /// says `node` lists its service among those it hosts. A binding that clashes with one
    /// hosted here is settled by the smaller service id (the local one is dropped when it
    /// loses); between two heard bindings, the smaller id too.
    pub fn heard_from(
        &mut self,
        node: &NodeName,
        names: &[(String, ServiceId)],
        hosts: impl Fn(ServiceId) -> bool,
        now_ms: u64,
    ) -> Vec<Conflict> {
        let mut conflicts = Vec::new();
        for (name, id) in names.iter().take(NAMES_MAX) {
            if check_name(name).is_err() || !hosts(*id) {
                continue;
            }
            if let Some(mine) = self.local.get(name).copied() {
                if mine == *id {
                    continue;
                }
                if mine < *id {
                    continue;
                }
                self.local.remove(name);
                conflicts.push(Conflict {
                    name: name.clone(),
                    kept: *id,
                    dropped: mine,
                });
            }
            match self.heard.get_mut(name) {
                Some(h) if h.id == *id || fresh(h, now_ms).is_none() || *id < h.id => {
                    if h.id != *id && fresh(h, now_ms).is_some() {
                        conflicts.push(Conflict {
                            name: name.clone(),
                            kept: *id,
                            dropped: h.id,
                        });
                    }
                    *h = Heard {
                        id: *id,
                        node: node.clone(),
                        last_ms: now_ms,
                    };
                }
                Some(_) => {}
                None => {
                    if self.heard.len() >= NAMES_HEARD_MAX {
                        self.forget_stalest();
                    }
                    self.heard.insert(
                        name.clone(),
                        Heard {
                            id: *id,
                            node: node.clone(),
                            last_ms: now_ms,
                        },
                    );
                }
            }
        }
        conflicts
    }

    /// Forgets what `node` said (it was lost or left): its bindings no longer count, unless
    /// another member lists them since.
    pub fn forget_node(&mut self, node: &NodeName) {
        self.heard.retain(|_, h| h.node != *node);
    }

    /// The service holding `name`: one hosted here, or one a member listed within
    /// [`NAME_GRACE_MS`], with the member that listed it last.
    pub fn lookup(&self, name: &str, now_ms: u64) -> Option<(ServiceId, Option<NodeName>)> {
        if let Some(id) = self.local.get(name) {
            return Some((*id, None));
        }
        self.heard
            .get(name)
            .and_then(|h| fresh(h, now_ms))
            .map(|h| (h.id, Some(h.node.clone())))
    }

    /// Every binding known here (local ones with no node), sorted by name.
    pub fn all(&self, now_ms: u64) -> Vec<(String, ServiceId, Option<NodeName>)> {
        let mut out: BTreeMap<String, (ServiceId, Option<NodeName>)> = self
            .heard
            .iter()
            .filter_map(|(k, h)| {
                fresh(h, now_ms).map(|h| (k.clone(), (h.id, Some(h.node.clone()))))
            })
            .collect();
        for (k, v) in &self.local {
            out.insert(k.clone(), (*v, None));
        }
        out.into_iter().map(|(k, (id, n))| (k, id, n)).collect()
    }

    /// Bindings heard from peers held now (stale ones included until they are replaced).
    pub fn heard_len(&self) -> usize {
        self.heard.len()
    }

    fn holder(&self, name: &str, now_ms: u64) -> Option<ServiceId> {
        self.lookup(name, now_ms).map(|(id, _)| id)
    }

    fn forget_stalest(&mut self) {
        let stalest = self
            .heard
            .iter()
            .min_by_key(|(_, h)| h.last_ms)
            .map(|(k, _)| k.clone());
        if let Some(k) = stalest {
            self.heard.remove(&k);
        }
    }
}

fn fresh(h: &Heard, now_ms: u64) -> Option<&Heard> {
    (now_ms.saturating_sub(h.last_ms) <= NAME_GRACE_MS).then_some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ServiceId {
        ServiceId::from_parts(7, n)
    }

    #[test]
    fn a_name_is_one_services_and_goes_with_it() {
        let mut r = Registry::default();
        r.register("board", id(2), 0).unwrap();
        r.register("board", id(2), 0).unwrap();
        assert_eq!(
            r.register("board", id(3), 0),
            Err(NameError::Taken {
                name: "board".into(),
                holder: id(2)
            })
        );
        assert!(matches!(
            r.register("", id(3), 0),
            Err(NameError::Invalid { .. })
        ));
        assert!(matches!(
            r.register(&"x".repeat(NAME_BYTES_MAX + 1), id(3), 0),
            Err(NameError::Invalid { .. })
        ));
        assert_eq!(r.lookup("board", 0), Some((id(2), None)));
        assert_eq!(r.remove_service(id(2)), vec!["board".to_string()]);
        assert_eq!(r.lookup("board", 0), None);
        r.register("board", id(3), 0).unwrap();
    }

    #[test]
    fn heard_bindings_need_their_host_and_outlive_a_move_by_the_grace_only() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let mut r = Registry::default();
        let names = vec![("board".to_string(), id(2))];
        // A member that does not host the service is not believed.
        r.heard_from(&a, &names, |_| false, 0);
        assert_eq!(r.lookup("board", 0), None);
        r.heard_from(&a, &names, |s| s == id(2), 0);
        assert_eq!(r.lookup("board", 10), Some((id(2), Some(a.clone()))));
        // Moved to b: b lists it later; meanwhile a's word holds within the grace.
        assert!(r.lookup("board", NAME_GRACE_MS).is_some());
        r.heard_from(&b, &names, |s| s == id(2), NAME_GRACE_MS);
        assert_eq!(
            r.lookup("board", 2 * NAME_GRACE_MS),
            Some((id(2), Some(b.clone())))
        );
        // Nobody lists it any more (it stopped): gone after the grace.
        assert_eq!(r.lookup("board", 2 * NAME_GRACE_MS + 1), None);
        // Taken by another service meanwhile: refused while b's word is fresh.
        r.heard_from(&b, &names, |s| s == id(2), 100_000);
        assert!(matches!(
            r.register("board", id(9), 100_000),
            Err(NameError::Taken { .. })
        ));
        // b is lost: its word is forgotten, and the name is free again.
        r.forget_node(&b);
        r.register("board", id(9), 100_000).unwrap();
    }

    #[test]
    fn a_clash_keeps_the_smaller_id_everywhere() {
        let a = NodeName::new("a");
        let mut here = Registry::default();
        here.register("board", id(5), 0).unwrap();
        // A peer registered the same name at the same moment for a smaller id: it wins.
        let c = here.heard_from(&a, &[("board".into(), id(3))], |_| true, 0);
        assert_eq!(
            c,
            vec![Conflict {
                name: "board".into(),
                kept: id(3),
                dropped: id(5)
            }]
        );
        assert_eq!(here.lookup("board", 0), Some((id(3), Some(a.clone()))));
        // The other way round: the local one wins and the peer's is not taken.
        let mut there = Registry::default();
        there.register("board", id(3), 0).unwrap();
        assert!(there
            .heard_from(&a, &[("board".into(), id(5))], |_| true, 0)
            .is_empty());
        assert_eq!(there.lookup("board", 0), Some((id(3), None)));
        // A service arriving with a name a smaller id holds does not get it.
        let c = there.install(id(8), vec!["board".into(), "cursor".into()], 0);
        assert_eq!(c.len(), 1);
        assert_eq!(there.names_of(id(8)), vec!["cursor".to_string()]);
    }

    #[test]
    fn names_are_bounded() {
        let mut r = Registry::default();
        for n in 0..NAMES_MAX as u64 {
            r.register(&format!("n{n}"), id(n), 0).unwrap();
        }
        assert_eq!(
            r.register("one-more", id(1), 0),
            Err(NameError::Full { max: NAMES_MAX })
        );
        let a = NodeName::new("a");
        let many: Vec<(String, ServiceId)> = (0..NAMES_MAX as u64 + 10)
            .map(|n| (format!("p{n}"), id(10_000 + n)))
            .collect();
        r.heard_from(&a, &many, |_| true, 0);
        assert_eq!(
            r.heard_len(),
            NAMES_MAX,
            "one member's gossip is cut at NAMES_MAX"
        );
    }
}
