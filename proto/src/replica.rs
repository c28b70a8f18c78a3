//! Standby copies and failover, as data: the checkpoint cadence of a replicated service, the
//! marks a checkpoint releases, the lease a primary holds from its standby's node, the
//! standby's own-clock wait before it may take over, the ballots that decide who continues a
//! service after a lost link, the standby's table of checkpoints and the sender's copies of
//! what it has not seen confirmed. No clock is read here: every time is passed in, in
//! microseconds of the caller's own monotonic clock.
//!
//! The rules, in order:
//! 1. A replicated service's primary cuts a checkpoint (state, windows, send counters, timers,
//!    book) after [`Settings::checkpoint_msgs`] handled messages or
//!    [`Settings::checkpoint_ms`], whichever comes first, one in flight at a time
//!    ([`Cadence`]). The marks that tell senders their messages were taken are released only
//!    when the standby acknowledges the checkpoint that includes them; until then each sender
//!    keeps its copy ([`Retained`]).
//! 2. A primary serves only while it holds a lease from its standby's node ([`Lease`]): the
//!    lease runs [`Settings::lease_ms`] on the primary's clock from the moment the primary
//!    *sent* the renewal the standby granted.
//! 3. A standby may take over only after [`Settings::standby_wait_us`] on its own clock since
//!    it last granted that primary anything ([`Grantor`]). The wait is the lease stretched by the
//!    worst ratio of two clocks' rates, plus a margin, so the primary's lease has run out in
//!    real time before the standby's wait has: clocks need not agree, only tick at rates within
//!    [`Settings::clock_rate_ppm`] of each other. A grantor whose wait ran out moves to a new
//!    term, and a grant of the new term tells the primary its old copies were taken over.
//! 4. After a lost link, whoever continues the service (the standby taking over, or the
//!    primary going on with another standby) first wins a ballot for the next epoch from a
//!    majority of the service's voters, a set the checkpoints carry, so both sides know it
//!    ([`Ballots`], [`Tally`]). A voter grants each (service, epoch) once; two majorities
//!    share a voter, so at most one side wins. With two voters, the survivor of a pair can
//!    never win alone: failover needs a third device.
//! 5. A node with a data directory also keeps on disk the latest checkpoint of each
//!    replicated service it runs ([`Stored`]), and its votes. Restarted, it resumes such a
//!    service only by winning the ballot for the epoch after the stored one among the stored
//!    checkpoint's voters ([`Stored::resume`]), as a standby would: a copy promoted elsewhere
//!    meanwhile holds that epoch, or a newer one, and wins. A checkpoint cut while no standby
//!    could hold one of its epoch names no voters: nothing else can have taken that epoch
//!    over, and the node's own vote decides. Its own votes count from the start: a stored
//!    checkpoint is a vote for its own epoch ([`Ballots::restore`]), so no claim to an epoch
//!    this node already ran the service at is granted.
//! 6. A move is the other way to a service's next epoch, and it runs no ballot: the target
//!    simply runs the epoch after the source's. So before a replicated service's move may
//!    commit, its source fences every standby it sent a checkpoint of the current epoch
//!    ([`Standbys::fence`]): each drops what it holds of that epoch and refuses the older
//!    checkpoints still on the way, or refuses the fence when it is already taking the service
//!    over. The move commits only once each of them agreed, and the source runs no ballot of
//!    its own while it moves: no node is left holding a checkpoint from which to claim the
//!    epoch the move gives its target (the chaos runs found a standby and a move's target both
//!    running the same epoch).
//!
//! ```
//! use tern_proto::replica::{Grantor, Lease, Settings};
//! let s = Settings::default();
//! let mut lease = Lease::new(&s);
//! let mut grantor = Grantor::default();
//! // The primary asks at its time 0; the standby receives it at its time 5_000 and grants.
//! let renewal = lease.renew(0);
//! let grant = grantor.heard(5_000, &s).unwrap();
//! assert!(lease.granted(renewal, grant).is_ok());
//! assert!(lease.valid(999_999));
//! assert!(!lease.valid(1_000_000)); // lease_ms after the renewal was sent
//! // The standby may not take over until its own, longer wait has passed.
//! assert!(!grantor.expired(5_000 + s.standby_wait_us() - 1, &s));
//! assert!(grantor.expired(5_000 + s.standby_wait_us(), &s));
//! // Nor grant anything more until it has moved to a new term.
//! assert_eq!(grantor.heard(5_000 + s.standby_wait_us(), &s), None);
//! ```

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::ids::{IdMap, NodeName, ServiceId};

/// Renewals a lease remembers having sent and not yet seen granted; past this the oldest is
/// forgotten (its grant, if it comes, renews nothing: the lease only gets shorter).
pub const RENEWALS_PENDING_MAX: usize = 16;
/// Voters a replicated service has: the primary, the standby and witnesses.
pub const VOTERS_MAX: usize = 7;
/// Ballots a voter keeps (one per replicated service it has voted on). Full, it refuses new
/// ballots: forgetting one could let a second side win the same epoch.
pub const BALLOTS_MAX: usize = 65_536;

/// How replication behaves: checkpoint cadence and size, lease and margins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// A checkpoint after this many handled messages (K).
    pub checkpoint_msgs: u32,
    /// A checkpoint this long after the first message handled since the last one (T).
    pub checkpoint_ms: u64,
    /// Largest checkpoint (state, timers and tables, encoded); a larger one is not sent and
    /// the service runs unprotected until its state is small enough again.
    pub checkpoint_bytes_max: u64,
    /// How long a granted renewal lets the primary serve, on the primary's clock.
    pub lease_ms: u64,
    /// How often the primary asks for a renewal (well under `lease_ms`, so a lost renewal or
    /// two does not stop the service).
    pub renew_ms: u64,
    /// The largest difference between two nodes' clock rates, in parts per million.
    pub clock_rate_ppm: u32,
    /// Added to the standby's wait for scheduling delays on either side.
    pub margin_ms: u64,
    /// Messages a sender keeps for replicated services, per channel, until they are confirmed
    /// by an acknowledged checkpoint; a full one makes `tell` wait or fail as a full mailbox.
    pub retained_per_channel_max: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            checkpoint_msgs: 64,
            checkpoint_ms: 20,
            checkpoint_bytes_max: 8 << 20,
            lease_ms: 1_000,
            renew_ms: 200,
            clock_rate_ppm: 1_000,
            margin_ms: 50,
            retained_per_channel_max: 4_096,
        }
    }
}

impl Settings {
    /// What the standby waits, on its own clock, after it last granted a primary anything,
    /// before it may take over: the lease scaled by `(1 + p) / (1 - p)` for a rate difference
    /// `p`, rounded up, plus the margin.
    pub fn standby_wait_us(&self) -> u64 {
        let ppm = u128::from(self.clock_rate_ppm.min(500_000));
        let lease_us = u128::from(self.lease_ms) * 1_000;
        let stretched = (lease_us * (1_000_000 + ppm)).div_ceil(1_000_000 - ppm);
        u64::try_from(stretched)
            .unwrap_or(u64::MAX)
            .saturating_add(self.margin_ms.saturating_mul(1_000))
    }

    /// Checks the settings hang together: a renewal well inside the lease, non-zero cadence.
    pub fn check(&self) -> Result<(), String> {
        if self.checkpoint_msgs == 0 || self.checkpoint_ms == 0 {
            return Err("checkpoint_msgs and checkpoint_ms must be positive".into());
        }
        if self.renew_ms == 0 || self.renew_ms.saturating_mul(2) > self.lease_ms {
            return Err(format!(
                "renew_ms ({}) must be positive and at most half of lease_ms ({})",
                self.renew_ms, self.lease_ms
            ));
        }
        if self.clock_rate_ppm >= 500_000 {
            return Err("clock_rate_ppm must be under 500000".into());
        }
        if self.retained_per_channel_max == 0 {
            return Err("retained_per_channel_max must be positive".into());
        }
        Ok(())
    }
}

/// A checkpoint's number, from 1, per service and primary.
pub type CheckpointNo = u64;

/// The checkpoint cadence of one replicated service at its primary, and the marks each
/// checkpoint in flight will release once acknowledged.
#[derive(Debug, Default)]
pub struct Cadence {
    handled: u32,
    /// When the first message since the last cut was handled.
    first_at_us: Option<u64>,
    last_no: CheckpointNo,
    /// The checkpoint sent and not yet acknowledged, with the marks it covers.
    in_flight: Option<(CheckpointNo, Vec<(ServiceId, u64)>)>,
    /// When it was sent.
    sent_at_us: u64,
    /// Acknowledged checkpoints.
    acked: u64,
    /// Set when a checkpoint should go at once (a new standby, a move): it has nothing.
    urgent: bool,
}

impl Cadence {
    /// A message was handled at `now_us`.
    pub fn handled(&mut self, now_us: u64) {
        self.handled = self.handled.saturating_add(1);
        self.first_at_us.get_or_insert(now_us);
    }

    /// A checkpoint is wanted at once (a standby that has nothing yet).
    pub fn urgent(&mut self) {
        self.urgent = true;
    }

    /// True when a checkpoint should be cut now: none in flight, and either urgent, K
    /// messages handled, or T since the first of them.
    pub fn due(&self, now_us: u64, s: &Settings) -> bool {
        if self.in_flight.is_some() {
            return false;
        }
        if self.urgent || self.handled >= s.checkpoint_msgs {
            return true;
        }
        match self.first_at_us {
            Some(t) => now_us.saturating_sub(t) >= s.checkpoint_ms.saturating_mul(1_000),
            None => false,
        }
    }

    /// When the next checkpoint falls due by time alone, if messages were handled.
    pub fn due_at_us(&self, s: &Settings) -> Option<u64> {
        self.first_at_us
            .map(|t| t.saturating_add(s.checkpoint_ms.saturating_mul(1_000)))
    }

    /// A checkpoint covering `marks` (per sender, the last number taken for handling, from
    /// the first message on: each checkpoint's marks are complete, not a difference) was cut
    /// and sent at `now_us`: its number.
    pub fn cut(&mut self, marks: Vec<(ServiceId, u64)>, now_us: u64) -> CheckpointNo {
        assert!(
            self.in_flight.is_none(),
            "one checkpoint in flight at a time"
        );
        self.sent_at_us = now_us;
        self.last_no += 1;
        self.in_flight = Some((self.last_no, marks));
        self.handled = 0;
        self.first_at_us = None;
        self.urgent = false;
        self.last_no
    }

    /// True when the checkpoint in flight has waited longer than a lease for its
    /// acknowledgement: it or its acknowledgement was lost, and a fresh one should replace it
    /// ([`failed`](Self::failed), then cut again).
    pub fn overdue(&self, now_us: u64, s: &Settings) -> bool {
        self.in_flight.is_some()
            && now_us.saturating_sub(self.sent_at_us) >= s.lease_ms.saturating_mul(1_000)
    }

    /// The checkpoint could not be cut or sent: nothing is in flight, and the next is urgent.
    pub fn failed(&mut self) {
        self.in_flight = None;
        self.urgent = true;
    }

    /// Checkpoint `no` was acknowledged: the marks it releases (none for an old or unknown
    /// number).
    pub fn acked(&mut self, no: CheckpointNo) -> Option<Vec<(ServiceId, u64)>> {
        match &self.in_flight {
            Some((n, _)) if *n == no => {
                self.acked += 1;
                self.in_flight.take().map(|(_, m)| m)
            }
            _ => None,
        }
    }

    /// The standby changed or was lost: the checkpoint in flight will never be acknowledged,
    /// and the new standby needs one at once. The marks it held go back to the caller, to be
    /// covered by the next checkpoint.
    pub fn restart(&mut self) -> Vec<(ServiceId, u64)> {
        self.urgent = true;
        self.in_flight.take().map(|(_, m)| m).unwrap_or_default()
    }

    /// True while a checkpoint waits for its acknowledgement.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Checkpoints acknowledged so far.
    pub fn acked_count(&self) -> u64 {
        self.acked
    }

    /// The last checkpoint number used.
    pub fn last_no(&self) -> CheckpointNo {
        self.last_no
    }
}

/// A standby node's answer to a renewal: the term it grants under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Bumped each time the standby's wait for this primary ran out (it may have taken over
    /// the primary's services since).
    pub term: u64,
}

/// Why a grant renews nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseError {
    /// The grant's renewal is unknown or forgotten; the lease stays as it was.
    Unknown,
    /// The standby moved to a newer term: its wait ran out, and the copies it held of this
    /// primary's services may run there now. The primary's own copies under the old term
    /// must not serve again.
    Superseded {
        /// The term this primary held.
        held: u64,
        /// The standby's term now.
        now: u64,
    },
}

/// The lease a primary's node holds from one standby node. It covers every service whose
/// standby is there.
#[derive(Debug, Clone)]
pub struct Lease {
    lease_us: u64,
    renew_us: u64,
    next: u64,
    /// Renewals sent and not yet granted, with their send times, oldest first.
    pending: VecDeque<(u64, u64)>,
    /// Serve strictly before this time.
    until_us: u64,
    /// The term of the first grant; `None` before any grant.
    term: Option<u64>,
    last_sent_us: Option<u64>,
}

impl Lease {
    /// A lease not yet granted.
    pub fn new(s: &Settings) -> Self {
        Lease {
            lease_us: s.lease_ms.saturating_mul(1_000),
            renew_us: s.renew_ms.saturating_mul(1_000),
            next: 0,
            pending: VecDeque::new(),
            until_us: 0,
            term: None,
            last_sent_us: None,
        }
    }

    /// A renewal is sent at `now_us`: its number, to be echoed in the grant.
    pub fn renew(&mut self, now_us: u64) -> u64 {
        self.next += 1;
        if self.pending.len() >= RENEWALS_PENDING_MAX {
            self.pending.pop_front();
        }
        self.pending.push_back((self.next, now_us));
        self.last_sent_us = Some(now_us);
        self.next
    }

    /// True when a renewal should be sent at `now_us`.
    pub fn renew_due(&self, now_us: u64) -> bool {
        self.last_sent_us
            .is_none_or(|t| now_us.saturating_sub(t) >= self.renew_us)
    }

    /// Renewal `no` was granted: the lease runs to `lease_ms` after
    /// that renewal was sent, never shorter than it was.
    pub fn granted(&mut self, no: u64, grant: Grant) -> Result<(), LeaseError> {
        match self.term {
            Some(held) if held != grant.term => {
                return Err(LeaseError::Superseded {
                    held,
                    now: grant.term,
                })
            }
            _ => {}
        }
        let Some(pos) = self.pending.iter().position(|(n, _)| *n == no) else {
            return Err(LeaseError::Unknown);
        };
        let (_, sent_us) = self.pending[pos];
        // Older renewals are overtaken: their grants would renew less.
        self.pending.drain(..=pos);
        self.term.get_or_insert(grant.term);
        self.until_us = self.until_us.max(sent_us.saturating_add(self.lease_us));
        Ok(())
    }

    /// True when the primary may serve at `now_us`.
    pub fn valid(&self, now_us: u64) -> bool {
        self.term.is_some() && now_us < self.until_us
    }

    /// The end of the lease, on the primary's clock (0 before any grant).
    pub fn until_us(&self) -> u64 {
        self.until_us
    }

    /// The term held, once granted.
    pub fn term(&self) -> Option<u64> {
        self.term
    }
}

/// A standby node's side of one primary node's lease: when it last granted it anything.
#[derive(Debug, Clone, Default)]
pub struct Grantor {
    term: u64,
    last_granted_us: Option<u64>,
}

impl Grantor {
    /// A grantor whose first term is `term`. A node numbers its terms from a base above every
    /// term its former lives used (it forgets its grantors when it restarts): otherwise a
    /// restarted standby would grant a primary it had superseded in a term that primary still
    /// holds, and the primary's copies would serve again.
    ///
    /// ```
    /// use tern_proto::replica::{Grantor, Settings};
    /// let s = Settings::default();
    /// let mut g = Grantor::starting_at(1 << 40);
    /// assert_eq!(g.heard(0, &s).map(|grant| grant.term), Some(1 << 40));
    /// ```
    pub fn starting_at(term: u64) -> Self {
        Grantor {
            term,
            last_granted_us: None,
        }
    }

    /// The primary asked at `now_us` (a renewal or a checkpoint): the grant, or `None` when
    /// the wait ran out and the standby has not yet moved to a new term
    /// ([`supersede`](Self::supersede)) or let the primary go on ([`forget`](Self::forget)):
    /// a grant then could let the primary serve while the standby takes its services over.
    pub fn heard(&mut self, now_us: u64, s: &Settings) -> Option<Grant> {
        if self.expired(now_us, s) {
            return None;
        }
        self.last_granted_us = Some(now_us);
        Some(Grant { term: self.term })
    }

    /// True when the wait since the last grant ran out at `now_us`: the primary's lease is
    /// over in real time, whatever its clock's rate. False before any grant.
    pub fn expired(&self, now_us: u64, s: &Settings) -> bool {
        self.last_granted_us
            .is_some_and(|t| now_us.saturating_sub(t) >= s.standby_wait_us())
    }

    /// The wait ran out and the standby takes over (or may): a new term begins, and the next
    /// grant tells the primary so.
    pub fn supersede(&mut self) {
        self.term += 1;
        self.last_granted_us = None;
    }

    /// The wait ran out with nothing of the primary's held here to take over: the next
    /// renewal is granted in the same term.
    pub fn forget(&mut self) {
        self.last_granted_us = None;
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.term
    }
}

/// What a standby keeps of one service: the newest checkpoint's identity and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held<B> {
    /// The node that sent it (the primary then).
    pub primary: NodeName,
    /// The service's epoch at the primary.
    pub epoch: u64,
    /// The checkpoint's number at that primary.
    pub no: CheckpointNo,
    /// Who votes on who continues the service.
    pub voters: Vec<NodeName>,
    /// The checkpoint itself.
    pub body: B,
    /// Its size, counted against the table's budget.
    pub bytes: u64,
}

/// Why a standby refused a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HoldRefused {
    /// Older than the one held (a reordered or replayed checkpoint).
    #[error("checkpoint {no} at epoch {epoch} is older than the one held ({held_no} at epoch {held_epoch})")]
    Stale {
        /// Its epoch.
        epoch: u64,
        /// Its number.
        no: CheckpointNo,
        /// The held epoch.
        held_epoch: u64,
        /// The held number.
        held_no: CheckpointNo,
    },
    /// The same epoch from another node: only the service's host checkpoints it.
    #[error("{from} sent a checkpoint at epoch {epoch}, which {primary} holds")]
    NotPrimary {
        /// Who sent it.
        from: NodeName,
        /// The node that holds that epoch.
        primary: NodeName,
        /// The epoch.
        epoch: u64,
    },
    /// Too many services or bytes held already.
    #[error("standby table full ({services} services, {bytes} bytes)")]
    Full {
        /// Services held.
        services: usize,
        /// Bytes held.
        bytes: u64,
    },
    /// The voters list is empty, too long, or leaves out the sender or this node.
    #[error("bad voters: {0}")]
    Voters(String),
    /// This node took the service over (or handed it on) at a newer epoch.
    #[error("service taken over here at epoch {epoch}")]
    TakenOver {
        /// The epoch it runs at since.
        epoch: u64,
    },
    /// The primary fenced this node before moving the service: checkpoints up to this one
    /// are from before the move.
    #[error("fenced before a move: checkpoints up to {no} at epoch {epoch} are refused")]
    Fenced {
        /// The fenced epoch.
        epoch: u64,
        /// The last checkpoint sent before the fence.
        no: CheckpointNo,
    },
}

/// A standby node's checkpoints, one per service, bounded in count and bytes.
#[derive(Debug)]
pub struct Standbys<B> {
    held: IdMap<Held<B>>,
    bytes: u64,
    services_max: usize,
    bytes_max: u64,
    /// Services taken over here, with the epoch they took: a late checkpoint from the old
    /// primary is refused. Bounded like the table.
    taken: VecDeque<(ServiceId, u64)>,
    /// Services whose primary fenced this node before a move, with that primary and the last
    /// checkpoint it had sent (epoch, number): that one and older ones from it are refused.
    /// Bounded like the table.
    fenced: VecDeque<(ServiceId, NodeName, u64, CheckpointNo)>,
}

/// Why a standby refused a primary's fence before a move.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceRefused {
    /// This node is taking the service over (its ballot is open), or took it over, at a newer
    /// epoch than the fencing primary's.
    #[error("this node claims the service at epoch {epoch}")]
    Claiming {
        /// The epoch it claims.
        epoch: u64,
    },
    /// This node holds a checkpoint of a newer epoch, or of the same epoch from another node:
    /// the fencing primary's copy is not the service's current one.
    #[error("this node holds epoch {epoch} of the service, from {primary}")]
    Newer {
        /// The node that sent it.
        primary: NodeName,
        /// Its epoch.
        epoch: u64,
    },
}

impl<B> Standbys<B> {
    /// An empty table holding at most `services_max` services and `bytes_max` bytes.
    pub fn new(services_max: usize, bytes_max: u64) -> Self {
        Standbys {
            held: IdMap::default(),
            bytes: 0,
            services_max,
            bytes_max,
            taken: VecDeque::new(),
            fenced: VecDeque::new(),
        }
    }

    /// Offers `body`, checkpoint `no` of `service` at `epoch` from `from`, to be held by node
    /// `me`. A newer epoch replaces what is held whoever sends it (the service moved; its new
    /// host's right to it is the caller's check), the same epoch only from its primary.
    pub fn offer(
        &mut self,
        me: &NodeName,
        service: ServiceId,
        held: Held<B>,
    ) -> Result<(), HoldRefused> {
        if let Some((_, e)) = self.taken.iter().find(|(s, _)| *s == service) {
            if held.epoch <= *e {
                return Err(HoldRefused::TakenOver { epoch: *e });
            }
        }
        if let Some((_, _, e, n)) = self
            .fenced
            .iter()
            .find(|(s, p, _, _)| *s == service && *p == held.primary)
        {
            if (held.epoch, held.no) <= (*e, *n) {
                return Err(HoldRefused::Fenced { epoch: *e, no: *n });
            }
        }
        if held.voters.is_empty()
            || held.voters.len() > VOTERS_MAX
            || !held.voters.contains(me)
            || !held.voters.contains(&held.primary)
        {
            return Err(HoldRefused::Voters(format!(
                "{} voters, must be 1..={VOTERS_MAX} and name {} and {me}",
                held.voters.len(),
                held.primary
            )));
        }
        let old_bytes = match self.held.get(&service) {
            Some(h) => {
                if (held.epoch, held.no) <= (h.epoch, h.no) {
                    return Err(HoldRefused::Stale {
                        epoch: held.epoch,
                        no: held.no,
                        held_epoch: h.epoch,
                        held_no: h.no,
                    });
                }
                if held.epoch == h.epoch && held.primary != h.primary {
                    return Err(HoldRefused::NotPrimary {
                        from: held.primary,
                        primary: h.primary.clone(),
                        epoch: h.epoch,
                    });
                }
                h.bytes
            }
            None => {
                if self.held.len() >= self.services_max {
                    return Err(HoldRefused::Full {
                        services: self.held.len(),
                        bytes: self.bytes,
                    });
                }
                0
            }
        };
        let after = self.bytes - old_bytes + held.bytes;
        if after > self.bytes_max {
            return Err(HoldRefused::Full {
                services: self.held.len(),
                bytes: self.bytes,
            });
        }
        self.bytes = after;
        self.held.insert(service, held);
        Ok(())
    }

    /// What is held for `service`.
    pub fn get(&self, service: ServiceId) -> Option<&Held<B>> {
        self.held.get(&service)
    }

    /// Drops what is held for `service` (the service stopped, or another standby took over
    /// its protection).
    pub fn drop_service(&mut self, service: ServiceId) -> Option<Held<B>> {
        let h = self.held.remove(&service)?;
        self.bytes -= h.bytes;
        Some(h)
    }

    /// Every service held, with what is held.
    pub fn iter(&self) -> impl Iterator<Item = (ServiceId, &Held<B>)> {
        self.held.iter().map(|(s, h)| (*s, h))
    }

    /// How many services, and how many bytes, `primary` has held here.
    pub fn held_for(&self, primary: &NodeName) -> (usize, u64) {
        self.held
            .values()
            .filter(|h| h.primary == *primary)
            .fold((0, 0), |(n, b), h| (n + 1, b + h.bytes))
    }

    /// The services whose checkpoints came from `primary`.
    pub fn of_primary(&self, primary: &NodeName) -> Vec<ServiceId> {
        let mut out: Vec<ServiceId> = self
            .held
            .iter()
            .filter(|(_, h)| h.primary == *primary)
            .map(|(s, _)| *s)
            .collect();
        out.sort();
        out
    }

    /// `service` is taken over here at `epoch`: what was held leaves the table, and older
    /// checkpoints are refused from now on.
    pub fn take_over(&mut self, service: ServiceId, epoch: u64) -> Option<Held<B>> {
        self.taken.retain(|(s, _)| *s != service);
        if self.taken.len() >= self.services_max.max(1) {
            self.taken.pop_front();
        }
        self.taken.push_back((service, epoch));
        self.drop_service(service)
    }

    /// `from`, about to move `service` away from its `epoch`, fences this node: what is held
    /// from `from` goes, and checkpoints from it up to number `no` of the epoch (the last it
    /// sent) are refused from now on, so this node cannot claim the epoch the move gives its
    /// target. Refused while this node claims the service at a newer epoch, or holds a newer
    /// epoch (or the same one from another node). Returns what was dropped. A node that does
    /// not run the service can drop only what it sent itself.
    pub fn fence(
        &mut self,
        from: &NodeName,
        service: ServiceId,
        epoch: u64,
        no: CheckpointNo,
    ) -> Result<Option<Held<B>>, FenceRefused> {
        if let Some((_, e)) = self.taken.iter().find(|(s, _)| *s == service) {
            if *e > epoch {
                return Err(FenceRefused::Claiming { epoch: *e });
            }
        }
        let mine = match self.held.get(&service) {
            Some(h) if h.epoch > epoch || (h.epoch == epoch && h.primary != *from) => {
                return Err(FenceRefused::Newer {
                    primary: h.primary.clone(),
                    epoch: h.epoch,
                });
            }
            Some(h) => h.primary == *from,
            None => false,
        };
        self.fenced
            .retain(|(s, p, _, _)| !(*s == service && p == from));
        if self.fenced.len() >= self.services_max.max(1) {
            self.fenced.pop_front();
        }
        self.fenced.push_back((service, from.clone(), epoch, no));
        Ok(if mine {
            self.drop_service(service)
        } else {
            None
        })
    }

    /// A takeover of `service` was lost to another node or given up: checkpoints of it are
    /// taken again (from the node that continues it).
    pub fn untake(&mut self, service: ServiceId) {
        self.taken.retain(|(s, _)| *s != service);
    }

    /// Services held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// A claim to continue a service at a new epoch: the standby taking it over, or the primary
/// going on after losing its standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// The service.
    pub service: ServiceId,
    /// The epoch it would run at (one past the epoch of the checkpoints voters saw).
    pub epoch: u64,
    /// The node that would run it.
    pub holder: NodeName,
}

/// A voter's answer to a [`Claim`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Vote {
    /// Granted: this voter will grant no other holder this epoch or an older one.
    Yes,
    /// Refused: the voter granted `holder` at `epoch` (not older than the claim's).
    No {
        /// The epoch granted.
        epoch: u64,
        /// To whom.
        holder: NodeName,
    },
    /// The voter's ballot table is full; it grants nothing new.
    Full,
}

/// A voter's ballots: per service, the newest epoch granted and to whom.
#[derive(Debug, Default)]
pub struct Ballots {
    granted: IdMap<(u64, NodeName)>,
}

impl Ballots {
    /// Answers `claim`: yes if nothing was granted for that service at that epoch or a newer
    /// one, or if that same claim was granted already (a retried ballot).
    pub fn vote(&mut self, claim: &Claim) -> Vote {
        match self.granted.get(&claim.service) {
            Some((e, h)) if *e > claim.epoch || (*e == claim.epoch && *h != claim.holder) => {
                Vote::No {
                    epoch: *e,
                    holder: h.clone(),
                }
            }
            Some(_) => {
                self.granted
                    .insert(claim.service, (claim.epoch, claim.holder.clone()));
                Vote::Yes
            }
            None if self.granted.len() >= BALLOTS_MAX => Vote::Full,
            None => {
                self.granted
                    .insert(claim.service, (claim.epoch, claim.holder.clone()));
                Vote::Yes
            }
        }
    }

    /// Takes back a grant this node made before it restarted (kept on disk), or the epoch a
    /// stored checkpoint of its own ran at: claims to that epoch by others, or to older ones,
    /// are refused from now on. The newer grant is kept; past [`BALLOTS_MAX`] nothing is
    /// taken (false), and the caller must not answer claims for that service.
    pub fn restore(&mut self, service: ServiceId, epoch: u64, holder: NodeName) -> bool {
        match self.granted.get(&service) {
            Some((e, _)) if *e >= epoch => true,
            Some(_) => {
                self.granted.insert(service, (epoch, holder));
                true
            }
            None if self.granted.len() >= BALLOTS_MAX => false,
            None => {
                self.granted.insert(service, (epoch, holder));
                true
            }
        }
    }

    /// The grant that makes a copy of `service` at `epoch` stale: one for a newer epoch. A
    /// standby takes no checkpoint of such a copy (its primary was superseded; taking it would
    /// let that primary serve again).
    ///
    /// ```
    /// use tern_proto::ids::{NodeName, ServiceId};
    /// use tern_proto::replica::{Ballots, Claim, Vote};
    /// let s = ServiceId::from_parts(1, 1);
    /// let mut b = Ballots::default();
    /// let claim = Claim { service: s, epoch: 4, holder: NodeName::new("w") };
    /// assert_eq!(b.vote(&claim), Vote::Yes);
    /// assert!(b.supersedes(s, 3).is_some());
    /// assert!(b.supersedes(s, 4).is_none());
    /// ```
    pub fn supersedes(&self, service: ServiceId, epoch: u64) -> Option<&(u64, NodeName)> {
        self.granted.get(&service).filter(|(e, _)| *e > epoch)
    }

    /// The newest grant for `service`.
    pub fn granted(&self, service: ServiceId) -> Option<&(u64, NodeName)> {
        self.granted.get(&service)
    }

    /// Forgets a service that stopped for good (not one that may still be taken over).
    pub fn forget(&mut self, service: ServiceId) {
        self.granted.remove(&service);
    }

    /// Services with a ballot.
    pub fn len(&self) -> usize {
        self.granted.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.granted.is_empty()
    }
}

/// The outcome of a ballot, as its claimer counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not decided yet.
    Open,
    /// A majority granted the claim.
    Won,
    /// A majority can no longer grant it; the newest other grant heard, if any.
    Lost(Option<(u64, NodeName)>),
}

/// A claimer's count of one ballot.
#[derive(Debug, Clone)]
pub struct Tally {
    claim: Claim,
    voters: Vec<NodeName>,
    yes: Vec<NodeName>,
    no: Vec<NodeName>,
    newest_other: Option<(u64, NodeName)>,
}

impl Tally {
    /// Starts counting `claim` among `voters` (deduplicated).
    pub fn new(claim: Claim, voters: &[NodeName]) -> Self {
        let mut v: Vec<NodeName> = Vec::new();
        for n in voters.iter().take(VOTERS_MAX) {
            if !v.contains(n) {
                v.push(n.clone());
            }
        }
        Tally {
            claim,
            voters: v,
            yes: Vec::new(),
            no: Vec::new(),
            newest_other: None,
        }
    }

    /// The claim counted.
    pub fn claim(&self) -> &Claim {
        &self.claim
    }

    /// The voters not heard from yet.
    pub fn unheard(&self) -> Vec<NodeName> {
        self.voters
            .iter()
            .filter(|n| !self.yes.contains(n) && !self.no.contains(n))
            .cloned()
            .collect()
    }

    /// Voter `from` answered; answers from nodes that are not voters, and second answers, count
    /// for nothing.
    pub fn answer(&mut self, from: &NodeName, vote: Vote) -> Outcome {
        if self.voters.contains(from) && !self.yes.contains(from) && !self.no.contains(from) {
            match vote {
                Vote::Yes => self.yes.push(from.clone()),
                Vote::No { epoch, holder } => {
                    if self.newest_other.as_ref().is_none_or(|(e, _)| epoch > *e) {
                        self.newest_other = Some((epoch, holder));
                    }
                    self.no.push(from.clone());
                }
                Vote::Full => self.no.push(from.clone()),
            }
        }
        self.outcome()
    }

    /// The count so far: won with a majority of yes, lost once a majority can no longer say
    /// yes, open otherwise (voters not heard from count as neither).
    pub fn outcome(&self) -> Outcome {
        let majority = self.voters.len() / 2 + 1;
        if self.yes.len() >= majority {
            Outcome::Won
        } else if self.voters.len() - self.no.len() < majority {
            Outcome::Lost(self.newest_other.clone())
        } else {
            Outcome::Open
        }
    }
}

/// A sender's copies of the messages it sent to replicated services and has not seen
/// confirmed, per sender, in order; bounded per channel. Sent again, in order, to where the
/// service is taken over.
#[derive(Debug)]
pub struct Retained<T> {
    by_sender: BTreeMap<ServiceId, VecDeque<(u64, T)>>,
    len: usize,
    max: usize,
}

/// A retained copy was refused: the channel holds `max` already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetainedFull {
    /// Copies held.
    pub max: usize,
}

impl<T> Retained<T> {
    /// Holds at most `max` copies.
    pub fn new(max: usize) -> Self {
        Retained {
            by_sender: BTreeMap::new(),
            len: 0,
            max,
        }
    }

    /// True when another copy fits.
    pub fn has_room(&self) -> bool {
        self.len < self.max
    }

    /// Keeps `sender`'s message `seq` (numbers from one sender must come in increasing order).
    pub fn keep(&mut self, sender: ServiceId, seq: u64, msg: T) -> Result<(), RetainedFull> {
        if self.len >= self.max {
            return Err(RetainedFull { max: self.max });
        }
        let q = self.by_sender.entry(sender).or_default();
        if let Some((last, _)) = q.back() {
            assert!(seq > *last, "retained numbers must increase per sender");
        }
        q.push_back((seq, msg));
        self.len += 1;
        Ok(())
    }

    /// `sender`'s messages up to `seq` are confirmed: their copies go. The count dropped.
    pub fn settle(&mut self, sender: ServiceId, seq: u64) -> usize {
        let Some(q) = self.by_sender.get_mut(&sender) else {
            return 0;
        };
        let mut n = 0;
        while q.front().is_some_and(|(s, _)| *s <= seq) {
            q.pop_front();
            n += 1;
        }
        if q.is_empty() {
            self.by_sender.remove(&sender);
        }
        self.len -= n;
        n
    }

    /// True when `sender`'s copy of `seq` is kept.
    pub fn holds(&self, sender: ServiceId, seq: u64) -> bool {
        self.by_sender
            .get(&sender)
            .is_some_and(|q| q.binary_search_by_key(&seq, |(n, _)| *n).is_ok())
    }

    /// Drops `sender`'s copy of `seq` (refused, and its sender told).
    pub fn forget(&mut self, sender: ServiceId, seq: u64) -> bool {
        let Some(q) = self.by_sender.get_mut(&sender) else {
            return false;
        };
        let Some(pos) = q.iter().position(|(s, _)| *s == seq) else {
            return false;
        };
        q.remove(pos);
        if q.is_empty() {
            self.by_sender.remove(&sender);
        }
        self.len -= 1;
        true
    }

    /// Keeps `sender`'s copy of `seq` in its place among the others (a copy carried by a
    /// checkpoint, where this node may still hold copies of the same sender from an earlier
    /// time). False, keeping nothing, when that copy is held already or there is no room.
    pub fn adopt(&mut self, sender: ServiceId, seq: u64, msg: T) -> bool {
        if self.len >= self.max {
            return false;
        }
        let q = self.by_sender.entry(sender).or_default();
        match q.binary_search_by_key(&seq, |(n, _)| *n) {
            Ok(_) => false,
            Err(at) => {
                q.insert(at, (seq, msg));
                self.len += 1;
                true
            }
        }
    }

    /// `sender`'s copies, in order.
    pub fn of(&self, sender: ServiceId) -> impl Iterator<Item = (u64, &T)> {
        self.by_sender
            .get(&sender)
            .into_iter()
            .flat_map(|q| q.iter().map(|(n, m)| (*n, m)))
    }

    /// Drops `sender`'s copies `first..=last` (declared lost, and their sender told). The
    /// count dropped.
    pub fn forget_range(&mut self, sender: ServiceId, first: u64, last: u64) -> usize {
        let Some(q) = self.by_sender.get_mut(&sender) else {
            return 0;
        };
        let before = q.len();
        q.retain(|(n, _)| *n < first || *n > last);
        let n = before - q.len();
        if q.is_empty() {
            self.by_sender.remove(&sender);
        }
        self.len -= n;
        n
    }

    /// Every copy, per sender in order, to send again (kept: only a confirmation drops them).
    pub fn all(&self) -> impl Iterator<Item = (ServiceId, u64, &T)> {
        self.by_sender
            .iter()
            .flat_map(|(s, q)| q.iter().map(move |(n, m)| (*s, *n, m)))
    }

    /// Takes every copy out (the service was declared lost: their senders are told).
    pub fn drain(&mut self) -> Vec<(ServiceId, u64, T)> {
        self.len = 0;
        std::mem::take(&mut self.by_sender)
            .into_iter()
            .flat_map(|(s, q)| q.into_iter().map(move |(n, m)| (s, n, m)))
            .collect()
    }

    /// Copies held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when none is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What a checkpoint carries besides its identity: enough to restore the service where its
/// last acknowledged handling left it. Its queue is not in it: the senders keep every message
/// a checkpoint does not cover, and send it again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointBody {
    /// The state, MessagePack.
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
    /// Pending timers.
    pub timers: Vec<crate::wire::TimerWire>,
    /// The service's send counters: per receiver, the last number it used.
    pub send_seqs: Vec<(ServiceId, u64)>,
    /// Per sender, the last number handled (what the senders' confirmations say).
    pub taken: Vec<(ServiceId, u64)>,
    /// Its address book.
    pub book: Vec<(String, crate::ids::ServiceAddr)>,
    /// The answers it kept to the asks it took last.
    #[serde(default)]
    pub replies: Vec<crate::wire::KeptReply>,
    /// The messages it sent and had not seen confirmed (bounded by the senders' kept copies,
    /// `retained_per_channel_max` per receiver), sent again by the copy that takes it over.
    #[serde(default)]
    pub outputs: Vec<crate::wire::KeptOutput>,
}

/// The latest checkpoint of a replicated service a node runs, as it keeps it on disk: what a
/// standby would hold, and the voters of its epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// The record's format; a record of another format is refused, never guessed at.
    pub format: u8,
    /// The service's kind.
    pub kind: crate::ids::KindKey,
    /// The epoch the service ran at here.
    pub epoch: u64,
    /// The checkpoint's number.
    pub no: CheckpointNo,
    /// The voters of that epoch; empty when no standby could hold a checkpoint of it.
    pub voters: Vec<NodeName>,
    /// The checkpoint (MessagePack of a [`CheckpointBody`]).
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// Why a stored record cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoredError {
    /// Not a record at all (cut short, or damaged).
    #[error("the record does not decode: {0}")]
    Undecodable(String),
    /// A record of a format this build does not read.
    #[error(
        "the record has format {found}; this build reads format {}",
        Stored::FORMAT
    )]
    Format {
        /// The format found.
        found: u8,
    },
    /// The body is not a checkpoint.
    #[error("the checkpoint in the record does not decode: {0}")]
    Body(String),
}

impl Stored {
    /// The format written now.
    pub const FORMAT: u8 = 1;

    /// The record's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        rmp_serde::to_vec(self).map_err(|e| e.to_string())
    }

    /// Reads a record, and checks that its body is a checkpoint: a record that does not
    /// read whole is an error, never a service.
    ///
    /// ```
    /// use tern_proto::ids::{KindKey, NodeName};
    /// use tern_proto::replica::{CheckpointBody, Stored, StoredError};
    /// let body = CheckpointBody { state: vec![1, 2], timers: vec![], send_seqs: vec![],
    ///     taken: vec![], book: vec![], replies: vec![], outputs: vec![] };
    /// let s = Stored { format: Stored::FORMAT, kind: KindKey::new("player", 1), epoch: 3,
    ///     no: 9, voters: vec![NodeName::new("a")], body: rmp_serde::to_vec(&body).unwrap() };
    /// let bytes = s.encode().unwrap();
    /// assert_eq!(Stored::decode(&bytes), Ok(s));
    /// assert!(matches!(Stored::decode(&bytes[..bytes.len() / 2]),
    ///     Err(StoredError::Undecodable(_))));
    /// ```
    pub fn decode(bytes: &[u8]) -> Result<Stored, StoredError> {
        let s: Stored =
            rmp_serde::from_slice(bytes).map_err(|e| StoredError::Undecodable(e.to_string()))?;
        if s.format != Self::FORMAT {
            return Err(StoredError::Format { found: s.format });
        }
        rmp_serde::from_slice::<CheckpointBody>(&s.body)
            .map_err(|e| StoredError::Body(e.to_string()))?;
        Ok(s)
    }

    /// The claim node `me` makes to resume the service from this record after a restart,
    /// and the voters it asks: the epoch after the stored one, among the stored voters, or
    /// `me` alone when the record names none (no standby could hold a checkpoint of its
    /// epoch, so no one else can have taken it over).
    ///
    /// ```
    /// use tern_proto::ids::{KindKey, NodeName, ServiceId};
    /// use tern_proto::replica::Stored;
    /// let (a, b, c) = (NodeName::new("a"), NodeName::new("b"), NodeName::new("c"));
    /// let s = ServiceId::from_parts(1, 1);
    /// let mut r = Stored { format: Stored::FORMAT, kind: KindKey::new("player", 1),
    ///     epoch: 3, no: 9, voters: vec![a.clone(), b.clone(), c.clone()], body: vec![] };
    /// let (claim, voters) = r.resume(&a, s);
    /// assert_eq!((claim.epoch, claim.holder, voters.len()), (4, a.clone(), 3));
    /// r.voters.clear();
    /// assert_eq!(r.resume(&a, s).1, vec![a.clone()]);
    /// ```
    pub fn resume(&self, me: &NodeName, service: ServiceId) -> (Claim, Vec<NodeName>) {
        let voters = if self.voters.is_empty() {
            vec![me.clone()]
        } else {
            self.voters.clone()
        };
        (
            Claim {
                service,
                epoch: self.epoch.saturating_add(1),
                holder: me.clone(),
            },
            voters,
        )
    }
}

/// Replication messages between a primary's node and its standby's (control stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaMsg {
    /// A checkpoint of `service`, to be held by the receiver.
    Checkpoint {
        /// The service.
        service: ServiceId,
        /// Its kind.
        kind: crate::ids::KindKey,
        /// Its epoch at the sender.
        epoch: u64,
        /// The checkpoint's number at the sender.
        no: CheckpointNo,
        /// Who votes on who continues it.
        voters: Vec<NodeName>,
        /// A [`CheckpointBody`], MessagePack.
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    },
    /// Checkpoint `no` of `service` at `epoch` is held, under the standby's `term`.
    Ack {
        /// The service.
        service: ServiceId,
        /// Its epoch.
        epoch: u64,
        /// The checkpoint.
        no: CheckpointNo,
        /// The standby's term for the sender.
        term: u64,
    },
    /// Checkpoint `no` of `service` was refused.
    Refused {
        /// The service.
        service: ServiceId,
        /// The checkpoint.
        no: CheckpointNo,
        /// Why.
        reason: String,
    },
    /// The sender no longer runs `service` (it stopped or moved): what is held goes.
    Release {
        /// The service.
        service: ServiceId,
        /// The epoch it ran at.
        epoch: u64,
    },
    /// A primary's node renews its lease from the receiver (one lease per pair of nodes: it
    /// covers every service whose standby the receiver is).
    Renew {
        /// The renewal's number, echoed in the grant.
        no: u64,
    },
    /// The standby grants renewal `no`, under its `term` for the primary.
    Granted {
        /// The renewal.
        no: u64,
        /// The standby's term.
        term: u64,
    },
    /// A claim to continue a service at a new epoch, to a voter.
    Claim(Claim),
    /// A voter's answer to a claim.
    Vote {
        /// The claim answered.
        claim: Claim,
        /// The answer.
        vote: Vote,
    },
    /// The sender is about to move `service` away from `epoch`: the receiver, its standby
    /// now or earlier in the epoch, lets go of what it holds ([`Standbys::fence`]) and answers.
    Fence {
        /// The service.
        service: ServiceId,
        /// Its epoch at the sender.
        epoch: u64,
        /// The last checkpoint the sender cut in that epoch.
        no: CheckpointNo,
    },
    /// The answer to a fence: `refused` is `None` when the receiver holds nothing of the
    /// epoch any more and will take nothing older.
    Fenced {
        /// The service.
        service: ServiceId,
        /// The epoch fenced.
        epoch: u64,
        /// Why not, if not.
        refused: Option<String>,
    },
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_restored_grant_refuses_that_epoch_to_others_and_older_ones_to_all() {
        let (a, b) = (NodeName::new("a"), NodeName::new("b"));
        let s = ServiceId::from_parts(1, 1);
        let claim = |epoch, holder: &NodeName| Claim {
            service: s,
            epoch,
            holder: holder.clone(),
        };
        let mut ballots = Ballots::default();
        // What the disk said: a ran the service at epoch 3.
        assert!(ballots.restore(s, 3, a.clone()));
        assert!(matches!(
            ballots.vote(&claim(3, &b)),
            Vote::No { epoch: 3, .. }
        ));
        assert!(matches!(ballots.vote(&claim(2, &a)), Vote::No { .. }));
        assert_eq!(ballots.vote(&claim(4, &b)), Vote::Yes);
        // An older grant restored later changes nothing.
        assert!(ballots.restore(s, 1, a.clone()));
        assert_eq!(ballots.granted(s), Some(&(4, b.clone())));
        assert!(matches!(ballots.vote(&claim(4, &a)), Vote::No { .. }));
    }
    use super::*;

    fn n(s: &str) -> NodeName {
        NodeName::new(s)
    }

    #[test]
    fn the_standby_waits_longer_than_any_primary_lease_under_skewed_rates() {
        let s = Settings::default();
        // The primary's clock runs slow by p (its lease lasts longer in real time), the
        // standby's fast by p (its wait passes sooner): the wait must still cover the lease.
        let p = f64::from(s.clock_rate_ppm) / 1e6;
        let lease_real = s.lease_ms as f64 * 1_000.0 / (1.0 - p);
        let wait_real = s.standby_wait_us() as f64 / (1.0 + p);
        assert!(wait_real > lease_real, "{wait_real} <= {lease_real}");
        assert!(s.check().is_ok());
        let bad = Settings {
            renew_ms: 600,
            ..Settings::default()
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn a_lease_runs_from_the_send_time_of_the_granted_renewal_and_a_new_term_supersedes() {
        let s = Settings::default();
        let mut l = Lease::new(&s);
        let mut g = Grantor::default();
        assert!(!l.valid(0));
        assert!(l.renew_due(0));
        let r1 = l.renew(100);
        assert!(!l.renew_due(150));
        let r2 = l.renew(200_300);
        // The later renewal's grant comes first: the earlier one renews nothing after it.
        l.granted(r2, g.heard(10, &s).unwrap()).unwrap();
        assert_eq!(l.until_us(), 1_200_300);
        assert_eq!(
            l.granted(r1, g.heard(11, &s).unwrap()),
            Err(LeaseError::Unknown)
        );
        assert!(l.valid(1_200_299) && !l.valid(1_200_300));
        // The standby's wait runs out: a grant of its next term says the copies were taken.
        assert!(g.expired(11 + s.standby_wait_us(), &s));
        assert_eq!(g.heard(11 + s.standby_wait_us(), &s), None);
        g.supersede();
        let r3 = l.renew(300_000);
        assert_eq!(
            l.granted(r3, g.heard(12, &s).unwrap()),
            Err(LeaseError::Superseded { held: 0, now: 1 })
        );
        assert_eq!(l.until_us(), 1_200_300, "a superseded grant renews nothing");
    }

    #[test]
    fn cadence_cuts_after_k_messages_or_t_and_releases_marks_on_ack() {
        let s = Settings {
            checkpoint_msgs: 3,
            checkpoint_ms: 10,
            ..Settings::default()
        };
        let a = ServiceId::from_parts(1, 1);
        let mut c = Cadence::default();
        assert!(!c.due(0, &s));
        c.handled(1_000);
        c.handled(1_500);
        assert!(!c.due(2_000, &s));
        assert!(c.due(11_000, &s), "T after the first message");
        c.handled(2_000);
        assert!(c.due(2_000, &s), "K messages");
        let no = c.cut(vec![(a, 3)], 2_000);
        assert!(!c.overdue(2_000 + s.lease_ms * 1_000 - 1, &s));
        assert!(c.overdue(2_000 + s.lease_ms * 1_000, &s));
        c.handled(3_000);
        assert!(!c.due(100_000, &s), "one in flight at a time");
        assert_eq!(c.acked(no + 1), None);
        assert_eq!(c.acked(no), Some(vec![(a, 3)]));
        assert!(c.due(100_000, &s));
        let no2 = c.cut(vec![(a, 4)], 100_000);
        assert_eq!(c.restart(), vec![(a, 4)]);
        assert_eq!(
            c.acked(no2),
            None,
            "a restarted cadence forgets the old standby's ack"
        );
        assert!(c.due(0, &s), "the new standby needs one at once");
    }

    #[test]
    fn standbys_keep_the_newest_from_the_primary_within_bounds() {
        let (me, p, q, w) = (n("b"), n("p"), n("q"), n("w"));
        let s = ServiceId::from_parts(1, 1);
        let voters = [p.clone(), me.clone(), w.clone()];
        let held = |from: &NodeName, epoch, no, bytes| Held {
            primary: from.clone(),
            epoch,
            no,
            voters: vec![from.clone(), me.clone(), w.clone()],
            body: (),
            bytes,
        };
        let mut t: Standbys<()> = Standbys::new(2, 100);
        t.offer(&me, s, held(&p, 1, 1, 10)).unwrap();
        t.offer(&me, s, held(&p, 1, 2, 20)).unwrap();
        assert!(matches!(
            t.offer(&me, s, held(&p, 1, 1, 10)),
            Err(HoldRefused::Stale { .. })
        ));
        assert!(matches!(
            t.offer(&me, s, held(&q, 1, 9, 10)),
            Err(HoldRefused::NotPrimary { .. })
        ));
        // The service moved to q: a newer epoch from q replaces it.
        t.offer(&me, s, held(&q, 2, 1, 30)).unwrap();
        assert_eq!(t.bytes(), 30);
        assert_eq!(t.of_primary(&q), vec![s]);
        assert!(matches!(
            t.offer(&me, ServiceId::from_parts(1, 2), held(&p, 1, 1, 71)),
            Err(HoldRefused::Full { .. })
        ));
        let mut no_me = held(&p, 3, 1, 1);
        no_me.voters = voters[..1].to_vec();
        assert!(matches!(
            t.offer(&me, s, no_me),
            Err(HoldRefused::Voters(_))
        ));
        assert!(t.take_over(s, 3).is_some());
        assert_eq!(t.bytes(), 0);
        assert!(matches!(
            t.offer(&me, s, held(&q, 3, 2, 1)),
            Err(HoldRefused::TakenOver { epoch: 3 })
        ));
        t.untake(s);
        t.offer(&me, s, held(&q, 3, 2, 1)).unwrap();
    }

    #[test]
    fn a_fence_before_a_move_empties_the_standby_unless_it_claims_the_service() {
        let (me, p, q, w) = (n("b"), n("p"), n("q"), n("w"));
        let s = ServiceId::from_parts(1, 1);
        let held = |from: &NodeName, epoch, no| Held {
            primary: from.clone(),
            epoch,
            no,
            voters: vec![from.clone(), me.clone(), w.clone()],
            body: (),
            bytes: 10,
        };
        let mut t: Standbys<()> = Standbys::new(4, 100);
        t.offer(&me, s, held(&p, 4, 6)).unwrap();
        // A node that does not run the service drops nothing of it.
        assert_eq!(t.fence(&w, s, 9, 100), Ok(None));
        t.offer(&me, s, held(&p, 4, 7)).unwrap();
        // p fences epoch 4 after checkpoint 8 (still on the way): the held one goes.
        assert!(t.fence(&p, s, 4, 8).unwrap().is_some());
        assert!(t.get(s).is_none());
        assert_eq!(t.bytes(), 0);
        // The late checkpoint 8 is refused; so is anything older.
        assert_eq!(
            t.offer(&me, s, held(&p, 4, 8)),
            Err(HoldRefused::Fenced { epoch: 4, no: 8 })
        );
        assert!(t.offer(&me, s, held(&p, 3, 20)).is_err());
        // The move aborted: p goes on at epoch 4 with newer checkpoints, which are held.
        t.offer(&me, s, held(&p, 4, 9)).unwrap();
        // The move committed instead: the target's epoch 5 is held too.
        t.offer(&me, s, held(&q, 5, 1)).unwrap();
        // A fence from a copy older than what is held is refused, and drops nothing.
        assert_eq!(
            t.fence(&p, s, 4, 9),
            Err(FenceRefused::Newer {
                primary: q.clone(),
                epoch: 5
            })
        );
        assert!(t.get(s).is_some());
        // A standby that claims the service (its takeover ballot is open) refuses the fence.
        assert!(t.take_over(s, 6).is_some());
        assert_eq!(
            t.fence(&q, s, 5, 1),
            Err(FenceRefused::Claiming { epoch: 6 })
        );
        // Lost and given back: the fence is agreed.
        t.untake(s);
        t.offer(&me, s, held(&q, 5, 2)).unwrap();
        assert!(t.fence(&q, s, 5, 2).unwrap().is_some());
        // Nothing held: agreed all the same (a standby that refused or lost everything).
        assert_eq!(t.fence(&q, s, 5, 2), Ok(None));
    }

    #[test]
    fn at_most_one_claim_wins_an_epoch_and_two_voters_cannot_fail_over_alone() {
        let (p, b, w) = (n("p"), n("b"), n("w"));
        let s = ServiceId::from_parts(1, 1);
        let voters = vec![p.clone(), b.clone(), w.clone()];
        let mut ballots: BTreeMap<&str, Ballots> = BTreeMap::new();
        for v in ["p", "b", "w"] {
            ballots.insert(v, Ballots::default());
        }
        let by_b = Claim {
            service: s,
            epoch: 2,
            holder: b.clone(),
        };
        let by_p = Claim {
            service: s,
            epoch: 2,
            holder: p.clone(),
        };
        let mut tb = Tally::new(by_b.clone(), &voters);
        let mut tp = Tally::new(by_p.clone(), &voters);
        // Each votes for itself; the witness decides.
        assert_eq!(
            tb.answer(&b, ballots.get_mut("b").unwrap().vote(&by_b)),
            Outcome::Open
        );
        assert_eq!(
            tp.answer(&p, ballots.get_mut("p").unwrap().vote(&by_p)),
            Outcome::Open
        );
        assert_eq!(
            tb.answer(&w, ballots.get_mut("w").unwrap().vote(&by_b)),
            Outcome::Won
        );
        assert_eq!(
            tp.answer(&w, ballots.get_mut("w").unwrap().vote(&by_p)),
            Outcome::Open
        );
        assert_eq!(
            tp.answer(&b, ballots.get_mut("b").unwrap().vote(&by_p)),
            Outcome::Lost(Some((2, b.clone())))
        );
        // A retried ballot is granted again; a stranger's answer counts for nothing.
        assert_eq!(ballots.get_mut("w").unwrap().vote(&by_b), Vote::Yes);
        let mut t2 = Tally::new(by_b.clone(), &voters[..2]);
        assert_eq!(t2.answer(&w, Vote::Yes), Outcome::Open);
        assert_eq!(
            t2.answer(&b, Vote::Yes),
            Outcome::Open,
            "two voters: both needed"
        );
        assert_eq!(t2.unheard(), vec![p.clone()]);
    }

    #[test]
    fn replica_frames_round_trip_and_a_truncated_one_is_a_clear_error() {
        use crate::wire::{decode, encode_frame, Frame, FRAME_HEADER_BYTES};
        let msg = ReplicaMsg::Checkpoint {
            service: ServiceId::from_parts(1, 2),
            kind: crate::ids::KindKey::new("k", 1),
            epoch: 3,
            no: 4,
            voters: vec![n("a"), n("b")],
            body: vec![7; 100],
        };
        let mut out = Vec::new();
        encode_frame(&mut out, &Frame::Replica(msg.clone()), 1 << 20).unwrap();
        match decode(&out[FRAME_HEADER_BYTES..]).unwrap() {
            Frame::Replica(back) => assert_eq!(back, msg),
            other => panic!("decoded {other:?}"),
        }
        let cut = &out[FRAME_HEADER_BYTES..out.len() - 10];
        assert!(decode(cut).is_err());
        for msg in [
            ReplicaMsg::Fence {
                service: ServiceId::from_parts(1, 2),
                epoch: 3,
                no: 9,
            },
            ReplicaMsg::Fenced {
                service: ServiceId::from_parts(1, 2),
                epoch: 3,
                refused: Some("this node claims the service at epoch 4".into()),
            },
        ] {
            let mut out = Vec::new();
            encode_frame(&mut out, &Frame::Replica(msg.clone()), 1 << 20).unwrap();
            match decode(&out[FRAME_HEADER_BYTES..]).unwrap() {
                Frame::Replica(back) => assert_eq!(back, msg),
                other => panic!("decoded {other:?}"),
            }
        }
        // Too large for the frame bound: refused before it is sent.
        let mut small = Vec::new();
        assert!(encode_frame(&mut small, &Frame::Replica(msg), 50).is_err());
        assert!(small.is_empty());
    }

    #[test]
    fn carried_copies_are_adopted_in_their_place_once_and_bounded() {
        let a = ServiceId::from_parts(1, 1);
        let mut r = Retained::new(4);
        r.keep(a, 2, "a2").unwrap();
        r.keep(a, 5, "a5").unwrap();
        // Carried by a checkpoint: 1 and 3 go in their places, 2 is held already.
        assert!(r.adopt(a, 3, "a3"));
        assert!(r.adopt(a, 1, "a1"));
        assert!(!r.adopt(a, 2, "again"));
        assert_eq!(
            r.of(a).collect::<Vec<_>>(),
            vec![(1, &"a1"), (2, &"a2"), (3, &"a3"), (5, &"a5")]
        );
        // Full: nothing more is adopted.
        assert!(!r.adopt(a, 4, "a4"));
        assert_eq!(r.forget_range(a, 2, 3), 2);
        assert!(r.has_room());
        assert_eq!(r.of(a).map(|(n, _)| n).collect::<Vec<_>>(), vec![1, 5]);
        assert_eq!(r.settle(a, 5), 2);
        assert_eq!(r.of(a).count(), 0);
    }

    #[test]
    fn retained_copies_go_in_order_on_settle_and_are_bounded() {
        let (a, b) = (ServiceId::from_parts(1, 1), ServiceId::from_parts(1, 2));
        let mut r = Retained::new(3);
        r.keep(a, 1, "a1").unwrap();
        r.keep(a, 2, "a2").unwrap();
        r.keep(b, 7, "b7").unwrap();
        assert_eq!(r.keep(a, 3, "a3"), Err(RetainedFull { max: 3 }));
        assert_eq!(r.settle(a, 1), 1);
        assert!(r.has_room());
        assert!(r.holds(a, 2) && r.holds(b, 7));
        assert!(!r.holds(a, 1) && !r.holds(b, 8));
        let all: Vec<_> = r.all().map(|(s, n, m)| (s, n, *m)).collect();
        assert_eq!(all, vec![(a, 2, "a2"), (b, 7, "b7")]);
        assert!(r.forget(b, 7));
        assert_eq!(r.drain(), vec![(a, 2, "a2")]);
        assert!(r.is_empty());
    }
}
