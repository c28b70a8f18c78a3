//! Who may claim what. Every peer holds a certificate from the cluster's CA, and a peer may
//! still lie: a frame is a claim made by the node at the other end of an authenticated link,
//! and it is believed only when that node is the one that can know. The checks here are pure;
//! the node answers a refused claim (logged, counted, a protocol error back to the peer) and
//! changes nothing, and the simulation drives the same checks.
//!
//! The rules:
//! - a service's location (`Located`, `Moved`) is told only by the node this node believes
//!   hosts it (the committing source, or the tombstone it sent to), and only forwards: a
//!   claim at an epoch this node already passed is stale and ignored; a claim that a service
//!   this node runs is elsewhere, or a claim from any other node for the next epoch, is
//!   refused; a claim from another node for an epoch past the next is held back
//!   ([`Location::Ahead`]): the service may have moved to that node in between, and the word
//!   of it travels on another connection, so it may come second; a claim about a service
//!   nothing here points at is ignored (there is no one to check it against, and nothing
//!   needs it);
//! - a migration's messages come from the attempt's source (`Commit`, `Abort`) or its target
//!   (`Prepared`, `Query`, `Refused`, `CommitAck`): see [`Role`];
//! - requests to move services hosted here, and to start services here, come only from the
//!   peers the node's policy lists ([`allowed`]);
//! - a service's book is changed only by the node that hosts it ([`book_holder`]).

use std::fmt;

use crate::ids::{NodeName, ServiceId};

/// A claim a peer made that this node does not believe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRefused {
    /// What was claimed (the frame or message kind).
    pub claim: &'static str,
    /// Why it is not believed.
    pub detail: String,
}

impl fmt::Display for ClaimRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} refused: {}", self.claim, self.detail)
    }
}

/// What to do with a location claim that is not refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// Believe it: the service is where the claim says.
    Take,
    /// Nothing to learn: already known, older than what is known, about this node itself, or
    /// about a service nothing here points at.
    Ignore,
    /// Not believed yet, not refused yet: the claim comes from a node other than the host this
    /// node knows, for an epoch past the next. That node may have hosted the service in
    /// between (the host's word of the move to it travels on another connection and may come
    /// second), or it may lie. The caller holds the claim back and judges it again once it
    /// learns a newer location, and refuses it if none comes in time.
    Ahead,
}

/// What this node knows of a service when a location claim about it arrives.
#[derive(Debug, Clone, Copy)]
pub struct Known<'a> {
    /// This node's name.
    pub me: &'a NodeName,
    /// The epoch of the copy this node hosts and runs (or is freezing or sending), if any.
    /// A copy that is only prepared here does not count: its source is still the host.
    pub hosted_epoch: Option<u64>,
    /// Where this node believes the service runs, and since which epoch.
    pub at: Option<(&'a NodeName, u64)>,
}

/// The newer of two words of where a service runs (the one at the later epoch; `first` when
/// they are level).
///
/// ```
/// use tern_proto::claims::newer;
/// use tern_proto::ids::NodeName;
/// let (a, b) = (NodeName::new("a"), NodeName::new("b"));
/// assert_eq!(newer(Some((&a, 1)), Some((&b, 2))), Some((&b, 2)));
/// assert_eq!(newer(Some((&a, 2)), Some((&b, 2))), Some((&a, 2)));
/// assert_eq!(newer(None, Some((&b, 0))), Some((&b, 0)));
/// ```
pub fn newer<'a>(
    first: Option<(&'a NodeName, u64)>,
    second: Option<(&'a NodeName, u64)>,
) -> Option<(&'a NodeName, u64)> {
    match (first, second) {
        (Some(f), Some(s)) if s.1 > f.1 => Some(s),
        (Some(f), _) => Some(f),
        (None, s) => s,
    }
}

/// Checks `from`'s claim that `service` runs on `at` since `epoch`.
///
/// ```
/// use tern_proto::claims::{location, Known, Location};
/// use tern_proto::ids::{NodeName, ServiceId};
/// let (me, a, b, liar) = (NodeName::new("me"), NodeName::new("a"), NodeName::new("b"),
///     NodeName::new("liar"));
/// let s = ServiceId::from_parts(1, 1);
/// let known = Known { me: &me, hosted_epoch: None, at: Some((&a, 3)) };
/// // The host tells where the service went: believed.
/// assert_eq!(location(known, &a, s, &b, 4), Ok(Location::Take));
/// // Anyone else, for the next epoch: refused.
/// assert!(location(known, &liar, s, &liar, 4).is_err());
/// // Anyone else, past the next epoch: held back until a newer word says who hosts it.
/// assert_eq!(location(known, &liar, s, &liar, u64::MAX), Ok(Location::Ahead));
/// // An old word: ignored.
/// assert_eq!(location(known, &a, s, &b, 2), Ok(Location::Ignore));
/// ```
pub fn location(
    known: Known<'_>,
    from: &NodeName,
    service: ServiceId,
    at: &NodeName,
    epoch: u64,
) -> Result<Location, ClaimRefused> {
    let refuse = |detail: String| ClaimRefused {
        claim: "location",
        detail,
    };
    if let Some(here) = known.hosted_epoch {
        if epoch <= here || at == known.me {
            return Ok(Location::Ignore);
        }
        return Err(refuse(format!(
            "{from} says service {service} runs on {at} since epoch {epoch}, \
             but it runs here since epoch {here}"
        )));
    }
    match known.at {
        None => Ok(Location::Ignore),
        Some((_, k)) if epoch <= k => Ok(Location::Ignore),
        Some((host, _)) if host == from => Ok(Location::Take),
        Some((_, k)) if epoch > k.saturating_add(1) => Ok(Location::Ahead),
        Some((host, k)) => Err(refuse(format!(
            "{from} says service {service} runs on {at} since epoch {epoch}, \
             but only its host {host} (epoch {k}) may say where it goes"
        ))),
    }
}

/// Checks `from`'s claim that it took `service` over at `epoch`, after [`location`] refused
/// it: believed only from the standby that the service's host named for the epoch this node
/// knows (`standby`: that standby and the epoch, from the host's own gossip), and only for the
/// next epoch. A voters' majority granted that epoch to one claimer at most; the standby
/// claims only once it has won it. A copy this node runs learns here that it was taken over.
///
/// ```
/// use tern_proto::claims::{takeover, Known, Location};
/// use tern_proto::ids::{NodeName, ServiceId};
/// let (me, a, b, liar) = (NodeName::new("me"), NodeName::new("a"), NodeName::new("b"),
///     NodeName::new("liar"));
/// let s = ServiceId::from_parts(1, 1);
/// let known = Known { me: &me, hosted_epoch: None, at: Some((&a, 3)) };
/// // a named b its standby at epoch 3: b may say it runs the service at epoch 4.
/// assert_eq!(takeover(known, Some((&b, 3)), &b, s, &b, 4), Ok(Location::Take));
/// // Not at another epoch, not for another node, and nobody else may.
/// assert!(takeover(known, Some((&b, 3)), &b, s, &b, 5).is_err());
/// assert!(takeover(known, Some((&b, 3)), &b, s, &liar, 4).is_err());
/// assert!(takeover(known, Some((&b, 3)), &liar, s, &liar, 4).is_err());
/// // A standby named for an older epoch: refused.
/// assert!(takeover(known, Some((&b, 2)), &b, s, &b, 4).is_err());
/// ```
pub fn takeover(
    known: Known<'_>,
    standby: Option<(&NodeName, u64)>,
    from: &NodeName,
    service: ServiceId,
    at: &NodeName,
    epoch: u64,
) -> Result<Location, ClaimRefused> {
    let refuse = |detail: String| ClaimRefused {
        claim: "takeover",
        detail,
    };
    let base = match (known.hosted_epoch, known.at) {
        (Some(here), _) => here,
        (None, Some((_, k))) => k,
        (None, None) => return Ok(Location::Ignore),
    };
    if epoch <= base {
        return Ok(Location::Ignore);
    }
    match standby {
        Some((s, e)) if s == from && at == from && e == base && epoch == base + 1 => {
            Ok(Location::Take)
        }
        Some((s, e)) => Err(refuse(format!(
            "{from} says it runs service {service} since epoch {epoch}; its standby at epoch \
             {e} is {s}, and only it may take over, at epoch {}",
            e + 1
        ))),
        None => Err(refuse(format!(
            "{from} says it runs service {service} since epoch {epoch}; no standby of it is \
             known here"
        ))),
    }
}

/// What the node running a replicated service makes of a claim to one of its next epochs
/// that [`replica_claim`] does not refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaClaim {
    /// The next epoch, from a standby this copy sent checkpoints of its epoch to: the voter
    /// votes, and a copy that grants it retires.
    Next,
    /// An epoch past the next: this copy is behind (others went on since it last heard), and
    /// cannot tell a real successor from a liar. It votes (as a witness, its vote may decide
    /// between two real claimers) and does not retire on it: it learns of a successor from
    /// that successor's location, or by losing a ballot of its own.
    Beyond,
}

/// Checks `from`'s claim to run `service` at `epoch`, made to the node that runs it at epoch
/// `running` and that sent checkpoints of that epoch to the standbys in `may_hold`. The next
/// epoch may be claimed only by one of them (the only nodes that can take the service over
/// from a checkpoint of it); granting it to anyone else would retire the running copy and
/// hand its queue to a node that holds nothing of it. Refused, too: an epoch not past
/// `running`.
///
/// ```
/// use tern_proto::claims::{replica_claim, ReplicaClaim};
/// use tern_proto::ids::{NodeName, ServiceId};
/// let (b, liar) = (NodeName::new("b"), NodeName::new("liar"));
/// let s = ServiceId::from_parts(1, 1);
/// assert_eq!(replica_claim(3, &[b.clone()], &b, s, 4), Ok(ReplicaClaim::Next));
/// assert!(replica_claim(3, &[b.clone()], &liar, s, 4).is_err());
/// assert!(replica_claim(3, &[b.clone()], &b, s, 3).is_err());
/// // No checkpoint of the epoch sent: nobody can take it over.
/// assert!(replica_claim(3, &[], &b, s, 4).is_err());
/// // Past the next epoch: voted on, never a reason to retire.
/// assert_eq!(replica_claim(3, &[], &liar, s, 9), Ok(ReplicaClaim::Beyond));
/// ```
pub fn replica_claim(
    running: u64,
    may_hold: &[NodeName],
    from: &NodeName,
    service: ServiceId,
    epoch: u64,
) -> Result<ReplicaClaim, ClaimRefused> {
    if epoch > running.saturating_add(1) {
        return Ok(ReplicaClaim::Beyond);
    }
    if epoch == running + 1 && may_hold.contains(from) {
        return Ok(ReplicaClaim::Next);
    }
    Err(ClaimRefused {
        claim: "replica claim",
        detail: format!(
            "{from} claims service {service} at epoch {epoch}; it runs here at epoch {running}, \
             and only a standby sent its checkpoints ({may_hold:?}) may claim epoch {}",
            running + 1
        ),
    })
}

/// Which side of a migration attempt may send a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The node that ran the service and decides the attempt.
    Source,
    /// The node the service was sent to.
    Target,
}

/// Checks that `from` plays `role` in the attempt whose `source` and (when the node knows it)
/// `target` are given. An attempt this node does not know as source or target is checked
/// against its id alone: `Commit` and `Abort` must still come from the source it names.
///
/// ```
/// use tern_proto::claims::{role, Role};
/// use tern_proto::ids::NodeName;
/// let (a, b, liar) = (NodeName::new("a"), NodeName::new("b"), NodeName::new("liar"));
/// assert!(role("commit", Role::Source, &a, &a, Some(&b)).is_ok());
/// assert!(role("commit", Role::Source, &liar, &a, Some(&b)).is_err());
/// assert!(role("prepared", Role::Target, &b, &a, Some(&b)).is_ok());
/// assert!(role("prepared", Role::Target, &liar, &a, Some(&b)).is_err());
/// ```
pub fn role(
    claim: &'static str,
    role: Role,
    from: &NodeName,
    source: &NodeName,
    target: Option<&NodeName>,
) -> Result<(), ClaimRefused> {
    let (ok, who) = match role {
        Role::Source => (from == source, format!("its source {source}")),
        Role::Target => match target {
            Some(t) => (from == t, format!("its target {t}")),
            None => (false, "its target (unknown here)".to_string()),
        },
    };
    if ok {
        Ok(())
    } else {
        Err(ClaimRefused {
            claim,
            detail: format!("{from} sent {claim} for a migration of {source}'s; only {who} may"),
        })
    }
}

/// What to do with a peer's change to a book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BookClaim {
    /// The holder runs on the peer as far as this node knows: apply it.
    Apply,
    /// This node believes the holder runs elsewhere: keep the change aside until a location
    /// this node believes says the holder moved to the peer (the move's `Located` may still be
    /// on its way), and drop it if none does.
    Wait,
}

/// Checks `peer`'s change to the book of service `holder`: only the node that hosts a service
/// may change its book. `here` says the holder runs on this node; `known` is where this node
/// believes it runs otherwise.
///
/// ```
/// use tern_proto::claims::{book_holder, BookClaim};
/// use tern_proto::ids::{NodeName, ServiceId};
/// let (tv, phone) = (NodeName::new("tv"), NodeName::new("phone"));
/// let s = ServiceId::from_parts(1, 1);
/// assert_eq!(book_holder(&tv, s, false, Some(&tv)), Ok(BookClaim::Apply));
/// assert_eq!(book_holder(&tv, s, false, Some(&phone)), Ok(BookClaim::Wait));
/// assert!(book_holder(&tv, s, true, None).is_err());
/// ```
pub fn book_holder(
    peer: &NodeName,
    holder: ServiceId,
    here: bool,
    known: Option<&NodeName>,
) -> Result<BookClaim, ClaimRefused> {
    if here {
        return Err(ClaimRefused {
            claim: "book",
            detail: format!("{peer} changed the book of service {holder}, which runs here"),
        });
    }
    Ok(match known {
        Some(at) if at != peer => BookClaim::Wait,
        _ => BookClaim::Apply,
    })
}

/// Checks that `peer` is on a node's list for `what` (an empty list lets every peer).
///
/// ```
/// use tern_proto::claims::allowed;
/// use tern_proto::ids::NodeName;
/// let tv = NodeName::new("tv");
/// assert!(allowed("move request", &[], &tv).is_ok());
/// assert!(allowed("move request", &["phone".to_string()], &tv).is_err());
/// ```
pub fn allowed(what: &'static str, list: &[String], peer: &NodeName) -> Result<(), ClaimRefused> {
    if list.is_empty() || list.iter().any(|p| p == peer.as_str()) {
        Ok(())
    } else {
        Err(ClaimRefused {
            claim: what,
            detail: format!("policy: {peer} may not send a {what} to this node"),
        })
    }
}

/// Which peers may move the services of one kind (named without its version): push them to
/// this node (a migration or a spawn), and ask this node to move them away. Matter's access
/// control lists are the model. With no rule for a kind, the node's general lists apply
/// alone; with one, a peer must be on both. In a rule's lists, `"*"` is every peer and an
/// empty list is none: `KindRule { kind: "wallet".into(), ..Default::default() }` keeps
/// wallets where they are and lets none in.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct KindRule {
    /// The kind's name (`KindKey::name`).
    pub kind: String,
    /// Peers that may push services of this kind here.
    pub push_from: Vec<String>,
    /// Peers that may ask this node to move its services of this kind away.
    pub pull_by: Vec<String>,
}

/// What a peer asks of a kind: to bring its services here, or to take them away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindRight {
    /// A migration to this node, or a spawn here.
    Push,
    /// A request that this node move a service away.
    Pull,
}

/// Whether `peer` may `right` services of `kind` under `rules` (see [`KindRule`]).
///
/// ```
/// use tern_proto::claims::{kind_allowed, KindRight, KindRule};
/// use tern_proto::ids::NodeName;
/// let rules = [KindRule { kind: "wallet".into(), push_from: vec!["phone".into()], pull_by: vec![] }];
/// let (phone, tv) = (NodeName::new("phone"), NodeName::new("tv"));
/// assert!(kind_allowed(&rules, "wallet", KindRight::Push, &phone).is_ok());
/// assert!(kind_allowed(&rules, "wallet", KindRight::Push, &tv).is_err());
/// assert!(kind_allowed(&rules, "wallet", KindRight::Pull, &phone).is_err());
/// assert!(kind_allowed(&rules, "player", KindRight::Pull, &tv).is_ok());
/// ```
pub fn kind_allowed(
    rules: &[KindRule],
    kind: &str,
    right: KindRight,
    peer: &NodeName,
) -> Result<(), ClaimRefused> {
    let Some(rule) = rules.iter().find(|r| r.kind == kind) else {
        return Ok(());
    };
    let (list, what, verb) = match right {
        KindRight::Push => (&rule.push_from, "migration", "push"),
        KindRight::Pull => (&rule.pull_by, "move request", "move away"),
    };
    if list.iter().any(|p| p == "*" || p == peer.as_str()) {
        Ok(())
    } else {
        Err(ClaimRefused {
            claim: what,
            detail: format!("policy: {peer} may not {verb} services of kind {kind} on this node"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeName {
        NodeName::new(s)
    }

    #[test]
    fn a_hosted_service_is_moved_only_by_this_node() {
        let (me, liar) = (n("me"), n("liar"));
        let s = ServiceId::from_parts(1, 1);
        let known = Known {
            me: &me,
            hosted_epoch: Some(5),
            at: Some((&me, 5)),
        };
        assert!(location(known, &liar, s, &liar, 6).is_err());
        assert!(location(known, &liar, s, &liar, u64::MAX).is_err());
        assert_eq!(location(known, &liar, s, &liar, 5), Ok(Location::Ignore));
        assert_eq!(location(known, &liar, s, &me, 9), Ok(Location::Ignore));
    }

    #[test]
    fn the_host_may_skip_epochs_and_another_node_is_heard_only_past_the_next() {
        let (me, a, b) = (n("me"), n("a"), n("b"));
        let s = ServiceId::from_parts(1, 1);
        let known = Known {
            me: &me,
            hosted_epoch: None,
            at: Some((&a, 1)),
        };
        // Moves this node missed (a -> b -> a) bring the host back: its word still counts.
        assert_eq!(location(known, &a, s, &b, 4), Ok(Location::Take));
        assert!(location(known, &b, s, &b, 2).is_err());
        assert!(location(known, &b, s, &a, 2).is_err());
        // b may have hosted it at epoch 2 (a's word of that may come second): held back.
        assert_eq!(location(known, &b, s, &a, 3), Ok(Location::Ahead));
        assert_eq!(location(known, &b, s, &b, u64::MAX), Ok(Location::Ahead));
        let unknown = Known {
            me: &me,
            hosted_epoch: None,
            at: None,
        };
        assert_eq!(location(unknown, &b, s, &b, 2), Ok(Location::Ignore));
    }

    #[test]
    fn a_target_unknown_here_plays_no_role() {
        let (a, b) = (n("a"), n("b"));
        assert!(role("refused", Role::Target, &b, &a, None).is_err());
        assert!(role("abort", Role::Source, &b, &a, None).is_err());
        assert!(role("abort", Role::Source, &a, &a, None).is_ok());
    }
}
