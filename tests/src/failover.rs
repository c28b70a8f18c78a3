//! Deterministic simulation of standby copies and failover (`tern_proto::replica`).
//!
//! Three voters: the primary `p`, its standby `b` and a witness `w`; senders on node `c` stream
//! numbered messages to one replicated service, which sends one output per message handled to
//! a sink on `c`. Every node's clock runs at its own rate (within the settings' bound). The
//! primary serves only under its lease, cuts checkpoints after K messages or T, and releases
//! the senders' marks (and, in the held mode, its outputs) when the standby acknowledges the
//! checkpoint that covers them. Control links between the voters are cut, one way or both,
//! and heal; one node crashes at a random moment (or none), and may restart on its data
//! directory (what it wrote there: its votes, and the latest checkpoint of the copy it ran,
//! written before the checkpoint was sent). A standby whose wait ran out, or a
//! primary whose lease did, asks the voters for the next epoch; the winner continues (the
//! standby from its checkpoint, the primary as it is) with another standby; the loser retires.
//! Senders keep what is not confirmed and send it again, in order, to where the service went.
//! A restarted node claims the epoch after its stored checkpoint among that checkpoint's
//! voters, its stored checkpoint and votes counting as its votes, and resumes the service from
//! it if it wins (as the node does, `tern_proto::replica::Stored::resume`).
//!
//! A crash ends a node's life: what it sent in that life and had not arrived is lost. A copy
//! keeps the outputs it sent (at once, or released) until the sink confirms them; its
//! checkpoints carry those and the held ones, and a copy that takes over sends them again, as
//! the node does with a replicated service's kept tells.
//!
//! Checked: no two copies ever handle messages in overlapping stretches of real time; the last
//! copy has handled every sender's messages exactly once and in order; every output reached
//! the sink exactly once, in order, and says what the newest surviving history says (in the
//! held mode always; when outputs go at once, with one sender, whose order re-execution
//! repeats); at a quiet end, none is missing.
//!
//! A run is a pure function of its seed and settings.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use tern::{NodeName, ServiceId};
use tern_proto::replica::{
    Ballots, Cadence, Claim, Grant, Grantor, Held, Lease, LeaseError, Outcome, Retained, Settings,
    Standbys, Tally, Vote,
};

use crate::sim::Rng;

/// How a replicated service's outputs are committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outputs {
    /// Held at the primary until the checkpoint that produced them is acknowledged.
    Held,
    /// Sent at once; copies produced again after a failover are dropped by number.
    Immediate,
}

/// The size and weather of one run.
#[derive(Debug, Clone)]
pub struct FailoverConfig {
    /// Senders (all on `c`).
    pub senders: usize,
    /// Messages each sender sends.
    pub msgs_per_sender: u64,
    /// Largest one-way delay, microseconds.
    pub delay_max_us: u64,
    /// Cuts of a control link between two voters (one way or both, at random).
    pub cuts: usize,
    /// Longest cut, microseconds.
    pub cut_max_us: u64,
    /// Crash one voter at a random moment (the primary, the standby or the witness).
    pub crash: bool,
    /// The crashed voter restarts on its data directory, up to `3 * lease_ms` later.
    pub restart: bool,
    /// Output commit.
    pub outputs: Outputs,
    /// Check that the service survives and handles everything. Off for runs that combine a
    /// cut with a crash: a primary that lost its standby to a cut and went on with another
    /// dies with it if it crashes before the new standby holds a checkpoint (two faults; its
    /// senders are told in a node). Safety is checked in every run.
    pub liveness: bool,
    /// Replication settings (times in the settings are in milliseconds of simulated time).
    pub settings: Settings,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            senders: 2,
            msgs_per_sender: 60,
            delay_max_us: 3_000,
            cuts: 2,
            cut_max_us: 400_000,
            crash: true,
            restart: false,
            outputs: Outputs::Held,
            liveness: false,
            settings: Settings {
                checkpoint_msgs: 4,
                checkpoint_ms: 5,
                lease_ms: 60,
                renew_ms: 15,
                // Clocks 5 % apart: far worse than hardware, to put the margin to work.
                clock_rate_ppm: 50_000,
                margin_ms: 0,
                retained_per_channel_max: 64,
                ..Settings::default()
            },
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailoverReport {
    /// The seed.
    pub seed: u64,
    /// The node that crashed, if any.
    pub crashed: Option<String>,
    /// Copies that served, in order of first message: (node, epoch).
    pub copies: Vec<(String, u64)>,
    /// Takeovers by a standby, and primaries that went on with another standby.
    pub takeovers: u64,
    /// Primaries that went on after losing their standby.
    pub continued: u64,
    /// Copies resumed from a data directory after a restart.
    pub resumed: u64,
    /// Stored checkpoints given up after a restart (a newer copy held the epoch).
    pub superseded: u64,
    /// Checkpoints acknowledged.
    pub checkpoints: u64,
    /// Messages handled again after a failover (re-executed from a checkpoint).
    pub reexecuted: u64,
    /// Messages sent again by senders.
    pub resent: u64,
    /// Claims the running copy refused (from a node it sent no checkpoint of its epoch to).
    pub claims_refused: u64,
    /// Outputs the sink dropped as copies.
    pub outputs_dropped: u64,
    /// Messages lost on the way because their sender's node crashed before they arrived (a
    /// connection's unacknowledged data dies with its node).
    pub lost_in_flight: u64,
    /// Outputs a copy sent again from the checkpoint it was taken over (or resumed) from.
    pub outputs_resent: u64,
    /// Stretches in which the primary could not serve for want of a lease.
    pub suspended: u64,
    /// Events processed.
    pub events: u64,
}

/// A checkpoint's body: what the standby would restore.
#[derive(Debug, Clone)]
struct Body {
    log: Vec<(ServiceId, u64)>,
    next: BTreeMap<ServiceId, u64>,
    out_seq: u64,
    /// Outputs not yet confirmed by the sink: held and not yet released (held mode), or sent
    /// and not yet seen taken (both modes). A copy that takes over sends them again, since
    /// the primary may have died before it released them or before they arrived; the sink
    /// drops what it took.
    outputs: Vec<(u64, (ServiceId, u64))>,
}

/// One copy of the service.
#[derive(Debug)]
struct Copy {
    epoch: u64,
    log: Vec<(ServiceId, u64)>,
    /// Per sender, the next number to take; early arrivals wait in `early`.
    next: BTreeMap<ServiceId, u64>,
    early: BTreeMap<(ServiceId, u64), ()>,
    queue: VecDeque<(ServiceId, u64)>,
    out_seq: u64,
    /// Per sender, the last number handled: what a checkpoint covers (the window's `next`
    /// runs ahead of it by what is queued).
    taken: BTreeMap<ServiceId, u64>,
    cadence: Cadence,
    /// The standby and the lease from it; `None` while none is chosen.
    standby: Option<(usize, Lease)>,
    /// When (this node's clock) the standby was chosen.
    standby_since: u64,
    /// The standby's term when it acknowledged this epoch's checkpoints: the copy serves only
    /// under a lease of that term (a newer one means the standby may have taken it over).
    standby_term: u64,
    /// The standby holds a checkpoint of this epoch (a spawn is protected from the start:
    /// it returns once the standby holds the first).
    protected: bool,
    /// A checkpoint of this epoch was sent (a standby may hold one): from then on the copy
    /// serves only once protected and under its lease. Before, no standby can take this epoch
    /// over, and the copy serves at once (the node's rule after a won ballot).
    sent: bool,
    /// The standbys sent a checkpoint of this epoch: the only nodes this copy grants its next
    /// epoch to (`claims::replica_claim`, as the node does).
    sent_to: Vec<usize>,
    /// Outputs waiting for the checkpoint that covers them (held mode): (checkpoint, seq,
    /// content).
    held_out: VecDeque<(u64, u64, (ServiceId, u64))>,
    /// Outputs sent and not yet confirmed by the sink: (seq, content), as the node keeps its
    /// copies of a replicated service's tells.
    sent_out: VecDeque<(u64, (ServiceId, u64))>,
    retired: bool,
    /// Messages this copy handles before its log passes what an earlier copy reached
    /// (re-execution after a takeover).
    replay_until: usize,
}

impl Copy {
    /// True when this copy may handle messages at `now_l` (its node's clock): under a valid
    /// lease of the term its standby acknowledged this epoch's checkpoints in.
    fn may_serve(&self, now_l: u64) -> bool {
        !self.retired
            && (!self.sent
                || (self.protected
                    && self.standby.as_ref().is_some_and(|(_, l)| {
                        l.valid(now_l) && l.term() == Some(self.standby_term)
                    })))
    }

    fn marks(&self) -> Vec<(ServiceId, u64)> {
        self.taken.iter().map(|(s, n)| (*s, *n)).collect()
    }
}

/// A voter node.
struct Voter {
    name: NodeName,
    alive: bool,
    drift_ppm: i64,
    ballots: Ballots,
    standbys: Standbys<Body>,
    grantors: BTreeMap<usize, Grantor>,
    copy: Option<Copy>,
    tally: Option<Tally>,
    /// The checkpoint a takeover ballot would start from, taken out of the table while the
    /// ballot runs (so that no checkpoint of that service is acknowledged meanwhile).
    pending: Option<Held<Body>>,
    /// When this node last started a ballot (its own clock), to retry.
    tally_at: u64,
    /// Its data directory: the newest vote it gave, and the latest checkpoint of the copy it
    /// runs (written as it is cut, before it is sent; removed when the copy retires).
    disk_vote: Option<(u64, NodeName)>,
    disk_copy: Option<Held<Body>>,
    /// After a restart: the stored checkpoint not resumed yet, and when (its clock) to claim.
    dormant: Option<(Held<Body>, u64)>,
    /// The first term of its grantors: above every term a former life used.
    term_base: u64,
}

#[derive(Debug, Clone)]
enum Net {
    Data(ServiceId, u64),
    Mark(ServiceId, u64),
    Renew(u64),
    Granted(u64, Grant),
    Checkpoint {
        epoch: u64,
        no: u64,
        body: Body,
        voters: Vec<NodeName>,
    },
    CheckpointAck(u64, u64, u64),
    Claim(Claim),
    Voted(Claim, Vote),
    Located(u64),
    Output(u64, (ServiceId, u64)),
    /// The sink took outputs up to this number.
    OutMark(u64),
}

#[derive(Debug, Clone)]
enum Ev {
    /// `life`: the sender's life when it sent (a crash ends a life).
    Deliver {
        from: usize,
        to: usize,
        msg: Net,
        life: u32,
    },
    Tick(usize),
    Send(usize),
    Crash(usize),
    Restart(usize),
}

/// Node indexes: voters 0..3, then the senders' and sink's node.
const P: usize = 0;
const B: usize = 1;
const W: usize = 2;
const C: usize = 3;
const TICK_US: u64 = 500;

struct World {
    cfg: FailoverConfig,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Ev>>,
    voters: Vec<Voter>,
    service: ServiceId,
    senders: Vec<ServiceId>,
    sent: Vec<u64>,
    retained: Retained<()>,
    /// Where the senders believe the service runs: (node, epoch).
    located: (usize, u64),
    /// Per node, its life: a crash ends one (what it had in flight is lost).
    lives: [u32; 4],
    /// Cuts: (from, to, start, until).
    cuts: Vec<(usize, usize, u64, u64)>,
    /// Per copy (node, epoch), the real times of its first and last message handled.
    spans: BTreeMap<(usize, u64), (u64, u64)>,
    sink_next: u64,
    sink_early: BTreeMap<u64, (ServiceId, u64)>,
    sink_seen: Vec<(ServiceId, u64)>,
    /// Per link (from, to), the last delivery time: a link delivers in order, like a stream.
    link_last: BTreeMap<(usize, usize), u64>,
    report: FailoverReport,
    /// Longest log any copy reached (re-execution is counted below it).
    high_water: usize,
    /// Print every control message delivered (`TERN_SIM_TRACE=1`).
    trace: bool,
}

fn voters_list(w: &World) -> Vec<NodeName> {
    w.voters.iter().map(|v| v.name.clone()).collect()
}

impl World {
    fn local(&self, node: usize) -> u64 {
        let d = self.voters.get(node).map_or(0, |v| v.drift_ppm);
        let t = i128::from(self.now);
        (t + t * i128::from(d) / 1_000_000) as u64
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        self.events.push(Some(ev));
        self.queue
            .push(Reverse((t, self.seq, self.events.len() - 1)));
    }

    fn alive(&self, n: usize) -> bool {
        n == C || self.voters[n].alive
    }

    fn cut(&self, from: usize, to: usize) -> bool {
        self.cuts.iter().any(|(f, t, start, until)| {
            *f == from && *t == to && *start <= self.now && self.now < *until
        })
    }

    /// Sends `msg`: lost if either end is down or (between voters) the link is cut; links
    /// deliver in order.
    fn send(&mut self, from: usize, to: usize, msg: Net) {
        if !self.alive(from) || !self.alive(to) || self.cut(from, to) {
            return;
        }
        let delay = 1 + self.rng.below(self.cfg.delay_max_us);
        let last = self.link_last.get(&(from, to)).copied().unwrap_or(0);
        let t = (self.now + delay).max(last);
        self.link_last.insert((from, to), t);
        let life = self.lives[from];
        self.at(
            t,
            Ev::Deliver {
                from,
                to,
                msg,
                life,
            },
        );
    }

    fn tick(&mut self, n: usize) {
        if !self.voters[n].alive {
            return;
        }
        let now_l = self.local(n);
        let s = self.cfg.settings.clone();
        // Restarted: the stored checkpoint is claimed at the epoch after it.
        if self.voters[n].tally.is_none()
            && self.voters[n]
                .dormant
                .as_ref()
                .is_some_and(|(_, at)| now_l >= *at)
        {
            if let Some((h, _)) = self.voters[n].dormant.take() {
                let (epoch, voters) = (h.epoch + 1, h.voters.clone());
                self.voters[n].pending = Some(h);
                self.start_ballot(n, epoch, &voters);
            }
        }
        // The standby's side: a primary whose wait ran out, with a checkpoint held here. The
        // grantor moves to a new term first, so that no grant it gives from now on lets that
        // primary serve again, then asks the voters for the next epoch.
        let expired: Vec<usize> = self.voters[n]
            .grantors
            .iter()
            .filter(|(_, g)| g.expired(now_l, &s))
            .map(|(p, _)| *p)
            .collect();
        for p in expired {
            let pname = self.voters[p].name.clone();
            if self.voters[n].standbys.of_primary(&pname).is_empty() {
                // Nothing of that primary's to take over: its next renewal is granted as usual.
                if let Some(g) = self.voters[n].grantors.get_mut(&p) {
                    g.forget();
                }
                continue;
            }
            if let Some(g) = self.voters[n].grantors.get_mut(&p) {
                g.supersede();
            }
            if self.voters[n].tally.is_none() {
                let epoch = self.voters[n]
                    .standbys
                    .get(self.service)
                    .map(|h| h.epoch + 1);
                if let Some(epoch) = epoch {
                    let h = self.voters[n].standbys.take_over(self.service, epoch);
                    let voters = h.as_ref().map(|h| h.voters.clone()).unwrap_or_default();
                    self.voters[n].pending = h;
                    self.start_ballot(n, epoch, &voters);
                }
            }
        }
        // A ballot not decided in a while is asked again of those not heard.
        if let Some(t) = &self.voters[n].tally {
            if now_l.saturating_sub(self.voters[n].tally_at) > s.renew_ms * 1_000 {
                let claim = t.claim().clone();
                let unheard = t.unheard();
                self.voters[n].tally_at = now_l;
                for v in unheard {
                    let to = self.index(&v);
                    self.send(n, to, Net::Claim(claim.clone()));
                }
            }
        }
        // The primary's side.
        let voters = voters_list(self);
        let mut disk = None;
        let name = self.voters[n].name.clone();
        let Some(copy) = self.voters[n].copy.as_mut().filter(|c| !c.retired) else {
            return;
        };
        let epoch = copy.epoch;
        let mut out: Vec<(usize, Net)> = Vec::new();
        let Some((sb, lease)) = copy.standby.as_mut() else {
            return;
        };
        let sb = *sb;
        if lease.renew_due(now_l) {
            let no = lease.renew(now_l);
            out.push((sb, Net::Renew(no)));
        }
        let leased = lease.valid(now_l);
        // Granted once, or chosen a lease ago and never granted.
        let ever_granted = lease.term().is_some()
            || now_l.saturating_sub(copy.standby_since) >= s.lease_ms * 1_000;
        // A primary serves only under its lease, and once its standby holds a checkpoint of
        // this epoch (so that a takeover always has one).
        let serving =
            !copy.sent || (copy.protected && leased && lease.term() == Some(copy.standby_term));
        if serving {
            for _ in 0..4 {
                let Some((from, seq)) = copy.queue.pop_front() else {
                    break;
                };
                copy.log.push((from, seq));
                copy.taken.insert(from, seq);
                if copy.log.len() <= copy.replay_until {
                    self.report.reexecuted += 1;
                }
                copy.out_seq += 1;
                copy.cadence.handled(now_l);
                let content = (from, seq);
                match self.cfg.outputs {
                    Outputs::Held => {
                        copy.held_out
                            .push_back((copy.cadence.last_no() + 1, copy.out_seq, content))
                    }
                    Outputs::Immediate => {
                        copy.sent_out.push_back((copy.out_seq, content));
                        out.push((C, Net::Output(copy.out_seq, content)))
                    }
                }
                let now = self.now;
                let span = self.spans.entry((n, epoch)).or_insert((now, now));
                span.1 = now;
            }
        }
        if copy.cadence.overdue(now_l, &s) {
            // Lost on the way (a cut): a fresh one replaces it.
            copy.cadence.failed();
        }
        if copy.cadence.due(now_l, &s) {
            let body = Body {
                log: copy.log.clone(),
                next: copy.taken.iter().map(|(s, n)| (*s, n + 1)).collect(),
                out_seq: copy.out_seq,
                outputs: copy
                    .sent_out
                    .iter()
                    .copied()
                    .chain(copy.held_out.iter().map(|(_, n, c)| (*n, *c)))
                    .collect(),
            };
            let no = copy.cadence.cut(copy.marks(), now_l);
            copy.sent = true;
            if !copy.sent_to.contains(&sb) {
                copy.sent_to.push(sb);
            }
            disk = Some(Held {
                primary: name.clone(),
                epoch,
                no,
                voters: voters.clone(),
                body: body.clone(),
                bytes: 1,
            });
            out.push((
                sb,
                Net::Checkpoint {
                    epoch,
                    no,
                    body,
                    voters: voters.clone(),
                },
            ));
        }
        let log_len = copy.log.len();
        if disk.is_some() {
            self.voters[n].disk_copy = disk;
        }
        // Without a lease it once had, the primary asks whether it may go on at the next epoch
        // with another standby (the standby may be gone, or may be taking the service over).
        let ask = ever_granted && !leased && self.voters[n].tally.is_none();
        self.high_water = self.high_water.max(log_len);
        for (to, m) in out {
            self.send(n, to, m);
        }
        if serving {
            self.check_one_live(n, epoch);
        }
        if ask {
            self.report.suspended += 1;
            self.start_ballot(n, epoch + 1, &voters);
        }
    }

    /// Node `n`'s ballot on `claim`; a yes is written to its data directory before it is
    /// given.
    fn vote(&mut self, n: usize, claim: &Claim) -> Vote {
        let v = &mut self.voters[n];
        let vote = v.ballots.vote(claim);
        if vote == Vote::Yes {
            v.disk_vote = v.ballots.granted(claim.service).cloned();
        }
        vote
    }

    /// Node `n` starts again on its data directory: nothing of its memory, its votes and its
    /// stored checkpoint from the disk; the checkpoint is claimed at its next tick.
    fn restart(&mut self, n: usize) {
        let service = self.service;
        let s = self.cfg.settings.clone();
        let v = &mut self.voters[n];
        v.alive = true;
        v.standbys = Standbys::new(16, 1 << 20);
        v.grantors.clear();
        // Its terms start above any its former life used.
        v.term_base += 1 << 32;
        v.copy = None;
        v.tally = None;
        v.pending = None;
        v.ballots = Ballots::default();
        if let Some((e, h)) = v.disk_vote.clone() {
            v.ballots.restore(service, e, h);
        }
        if let Some(h) = v.disk_copy.clone() {
            v.ballots.restore(service, h.epoch, v.name.clone());
            v.dormant = Some((h, 0));
        }
        let _ = s;
    }

    fn index(&self, name: &NodeName) -> usize {
        self.voters
            .iter()
            .position(|v| v.name == *name)
            .expect("a voter")
    }

    fn start_ballot(&mut self, n: usize, epoch: u64, voters: &[NodeName]) {
        let claim = Claim {
            service: self.service,
            epoch,
            holder: self.voters[n].name.clone(),
        };
        let mut tally = Tally::new(claim.clone(), voters);
        let own = self.vote(n, &claim);
        let me = self.voters[n].name.clone();
        let outcome = tally.answer(&me, own);
        self.voters[n].tally = Some(tally);
        self.voters[n].tally_at = self.local(n);
        for v in voters {
            if *v != me {
                let to = self.index(v);
                self.send(n, to, Net::Claim(claim.clone()));
            }
        }
        self.decided(n, outcome);
    }

    /// A ballot's outcome at its claimer.
    fn decided(&mut self, n: usize, outcome: Outcome) {
        if self.trace && outcome != Outcome::Open {
            eprintln!("{:>9} {n} ballot {outcome:?}", self.now);
        }
        let me = self.voters[n].name.clone();
        match outcome {
            Outcome::Open => {}
            Outcome::Lost(winner) => {
                self.voters[n].tally = None;
                let stored = self.voters[n]
                    .pending
                    .as_ref()
                    .is_some_and(|h| h.primary == me);
                if stored {
                    // The checkpoint from the data directory: given up when a newer copy holds
                    // the epoch, claimed again later when undecided.
                    if let Some(h) = self.voters[n].pending.take() {
                        let superseded = winner.as_ref().is_some_and(|(e, _)| *e > h.epoch);
                        if superseded {
                            self.voters[n].disk_copy = None;
                            self.report.superseded += 1;
                        } else {
                            let at = self.local(n) + 5 * self.cfg.settings.renew_ms * 1_000;
                            self.voters[n].dormant = Some((h, at));
                        }
                    }
                } else if let Some(h) = self.voters[n].pending.take() {
                    self.voters[n].standbys.untake(self.service);
                    let superseded = winner.as_ref().is_some_and(|(e, _)| *e > h.epoch);
                    if !superseded {
                        // Undecided: keep it, and try again after another wait.
                        let me = self.voters[n].name.clone();
                        let p = self.index(&h.primary);
                        let _ = self.voters[n].standbys.offer(&me, self.service, h);
                        let now_l = self.local(n);
                        let s = self.cfg.settings.clone();
                        let base = self.voters[n].term_base;
                        let g = self.voters[n]
                            .grantors
                            .entry(p)
                            .or_insert_with(|| Grantor::starting_at(base));
                        g.forget();
                        let _ = g.heard(now_l, &s);
                    }
                }
                if let Some((epoch, holder)) = winner.filter(|(_, h)| *h != me) {
                    // Another node continues the service at `epoch`: a copy here retires, a
                    // checkpoint held here is of no use any more.
                    if let Some(c) = self.voters[n].copy.as_mut() {
                        if c.epoch < epoch {
                            c.retired = true;
                            self.voters[n].disk_copy = None;
                        }
                    }
                    if self.voters[n]
                        .standbys
                        .get(self.service)
                        .is_some_and(|h| h.epoch < epoch)
                    {
                        self.voters[n].standbys.drop_service(self.service);
                    }
                    let _ = holder;
                }
            }
            Outcome::Won => {
                // The winner may act from now on: no other copy may still hold a valid lease.
                for (i, v) in self.voters.iter().enumerate() {
                    let Some(c) = v.copy.as_ref().filter(|c| !c.retired && v.alive) else {
                        continue;
                    };
                    if i == n {
                        continue;
                    }
                    assert!(
                        !c.may_serve(self.local(i)),
                        "seed {}: {} won a ballot while {}'s copy at epoch {} may serve",
                        self.report.seed,
                        me,
                        v.name,
                        c.epoch,
                    );
                }
                let claim = self.voters[n]
                    .tally
                    .take()
                    .expect("a won ballot")
                    .claim()
                    .clone();
                let s = self.cfg.settings.clone();
                let now_l = self.local(n);
                let old = self.voters[n]
                    .copy
                    .as_ref()
                    .filter(|c| !c.retired)
                    .and_then(|c| c.standby.as_ref().map(|(sb, _)| *sb));
                let standby = self.pick_standby(n, old);
                if let Some(copy) = self.voters[n].copy.as_mut().filter(|c| !c.retired) {
                    // The primary goes on, as it is, with another standby.
                    copy.epoch = claim.epoch;
                    drop(copy.cadence.restart());
                    copy.cadence = Cadence::default();
                    copy.cadence.urgent();
                    copy.standby = standby.map(|sb| (sb, Lease::new(&s)));
                    copy.standby_since = now_l;
                    copy.protected = false;
                    copy.sent = false;
                    copy.sent_to.clear();
                    self.report.continued += 1;
                } else if let Some(h) = self.voters[n].pending.take() {
                    // The standby takes over from its checkpoint.
                    let mut cadence = Cadence::default();
                    cadence.urgent();
                    self.voters[n].copy = Some(Copy {
                        epoch: claim.epoch,
                        log: h.body.log.clone(),
                        next: h.body.next.clone(),
                        early: BTreeMap::new(),
                        queue: VecDeque::new(),
                        out_seq: h.body.out_seq,
                        taken: h.body.next.iter().map(|(s, n)| (*s, n - 1)).collect(),
                        cadence,
                        standby: standby.map(|sb| (sb, Lease::new(&s))),
                        standby_since: now_l,
                        standby_term: 0,
                        protected: false,
                        sent: false,
                        sent_to: Vec::new(),
                        held_out: VecDeque::new(),
                        sent_out: VecDeque::new(),
                        retired: false,
                        replay_until: self.high_water,
                    });
                    if h.primary == me {
                        self.report.resumed += 1;
                    } else {
                        self.report.takeovers += 1;
                    }
                    self.report.outputs_resent += h.body.outputs.len() as u64;
                    for (seq, content) in h.body.outputs {
                        if let Some(c) = self.voters[n].copy.as_mut() {
                            c.sent_out.push_back((seq, content));
                        }
                        self.send(n, C, Net::Output(seq, content));
                    }
                } else {
                    return;
                }
                for to in [P, B, W, C] {
                    if to != n {
                        self.send(n, to, Net::Located(claim.epoch));
                    }
                }
            }
        }
    }

    /// Another voter to stand by: one that is not `n`, and not the standby just lost when
    /// there is a choice (the simulation knows who is up; a node would ask placement).
    fn pick_standby(&mut self, n: usize, lost: Option<usize>) -> Option<usize> {
        let up: Vec<usize> = [P, B, W]
            .into_iter()
            .filter(|v| *v != n && self.voters[*v].alive)
            .collect();
        up.iter()
            .copied()
            .find(|v| Some(*v) != lost)
            .or(up.first().copied())
    }

    fn deliver(&mut self, from: usize, to: usize, msg: Net) {
        if !self.alive(to) {
            return;
        }
        if self.trace && !matches!(msg, Net::Data(..) | Net::Mark(..) | Net::Output(..)) {
            eprintln!("{:>9} {from}->{to} {msg:?}", self.now);
        }
        let s = self.cfg.settings.clone();
        match msg {
            Net::Data(sender, seq) => {
                let Some(copy) = self.voters[to].copy.as_mut() else {
                    return;
                };
                if copy.retired {
                    return;
                }
                let next = copy.next.entry(sender).or_insert(1);
                if seq < *next {
                    return;
                }
                copy.early.insert((sender, seq), ());
                while copy.early.remove(&(sender, *next)).is_some() {
                    copy.queue.push_back((sender, *next));
                    *next += 1;
                }
            }
            Net::Mark(sender, seq) => {
                let _ = self.retained.settle(sender, seq);
            }
            Net::Renew(no) => {
                let now_l = self.local(to);
                let base = self.voters[to].term_base;
                let g = self.voters[to]
                    .grantors
                    .entry(from)
                    .or_insert_with(|| Grantor::starting_at(base));
                // A grantor whose wait ran out grants nothing until it has moved to a new
                // term (its tick does that before anything else).
                if let Some(grant) = g.heard(now_l, &s) {
                    self.send(to, from, Net::Granted(no, grant));
                }
            }
            Net::Granted(no, grant) => {
                let Some(copy) = self.voters[to].copy.as_mut() else {
                    return;
                };
                let Some((sb, lease)) = copy.standby.as_mut() else {
                    return;
                };
                if *sb != from {
                    return;
                }
                if let Err(LeaseError::Superseded { .. }) = lease.granted(no, grant) {
                    // The standby's wait ran out: it may be taking the service over. This
                    // lease renews nothing any more; a ballot decides who goes on.
                }
            }
            Net::Checkpoint {
                epoch,
                no,
                body,
                voters,
            } => {
                let now_l = self.local(to);
                let me = self.voters[to].name.clone();
                let primary = self.voters[from].name.clone();
                // A standby whose wait for this primary ran out takes nothing more from it.
                if self.voters[to]
                    .grantors
                    .get(&from)
                    .is_some_and(|g| g.expired(now_l, &s))
                {
                    return;
                }
                // Nor from a copy this node knows to be superseded: it voted for a newer epoch
                // (taking it would let that copy's primary serve again).
                if self.voters[to]
                    .ballots
                    .supersedes(self.service, epoch)
                    .is_some()
                {
                    return;
                }
                let held = Held {
                    primary,
                    epoch,
                    no,
                    voters,
                    body,
                    bytes: 1,
                };
                if self.voters[to]
                    .standbys
                    .offer(&me, self.service, held)
                    .is_ok()
                {
                    let base = self.voters[to].term_base;
                    let term = self.voters[to]
                        .grantors
                        .entry(from)
                        .or_insert_with(|| Grantor::starting_at(base))
                        .term();
                    self.send(to, from, Net::CheckpointAck(epoch, no, term));
                }
            }
            Net::CheckpointAck(epoch, no, term) => {
                let Some(copy) = self.voters[to].copy.as_mut() else {
                    return;
                };
                if copy.epoch != epoch || copy.standby.as_ref().map(|(s, _)| *s) != Some(from) {
                    return;
                }
                let Some(marks) = copy.cadence.acked(no) else {
                    return;
                };
                self.report.checkpoints += 1;
                copy.protected = true;
                copy.standby_term = term;
                let mut out = Vec::new();
                for (sender, seq) in marks {
                    out.push(Net::Mark(sender, seq));
                }
                while copy.held_out.front().is_some_and(|(k, _, _)| *k <= no) {
                    if let Some((_, seq, content)) = copy.held_out.pop_front() {
                        copy.sent_out.push_back((seq, content));
                        out.push(Net::Output(seq, content));
                    }
                }
                for m in out {
                    self.send(to, C, m);
                }
            }
            Net::Claim(claim) => {
                // A copy running here grants its next epoch only to a standby it checkpointed
                // to, as the node does.
                let names: Vec<NodeName> = self.voters.iter().map(|v| v.name.clone()).collect();
                let refused = self.voters[to]
                    .copy
                    .as_ref()
                    .filter(|c| !c.retired)
                    .and_then(|c| {
                        let may_hold: Vec<NodeName> =
                            c.sent_to.iter().map(|i| names[*i].clone()).collect();
                        tern_proto::claims::replica_claim(
                            c.epoch,
                            &may_hold,
                            &names[from],
                            claim.service,
                            claim.epoch,
                        )
                        .err()
                        .map(|_| c.epoch)
                    });
                let vote = match refused {
                    Some(epoch) => {
                        self.report.claims_refused += 1;
                        Vote::No {
                            epoch,
                            holder: names[to].clone(),
                        }
                    }
                    None => self.vote(to, &claim),
                };
                self.send(to, from, Net::Voted(claim, vote));
            }
            Net::Voted(claim, vote) => {
                let name = self.voters[from].name.clone();
                let Some(t) = self.voters[to].tally.as_mut() else {
                    return;
                };
                if *t.claim() != claim {
                    return;
                }
                let outcome = t.answer(&name, vote);
                self.decided(to, outcome);
            }
            Net::Located(epoch) => {
                if to == C {
                    if epoch > self.located.1 {
                        self.located = (from, epoch);
                        // Everything not confirmed goes again, in order, to the new copy.
                        let again: Vec<(ServiceId, u64)> =
                            self.retained.all().map(|(s, n, _)| (s, n)).collect();
                        self.report.resent += again.len() as u64;
                        for (sender, seq) in again {
                            self.send(C, from, Net::Data(sender, seq));
                        }
                    }
                } else if let Some(copy) = self.voters[to].copy.as_mut() {
                    if epoch > copy.epoch && from != to {
                        copy.retired = true;
                        self.voters[to].disk_copy = None;
                    }
                }
            }
            Net::OutMark(seq) => {
                if let Some(copy) = self.voters[to].copy.as_mut() {
                    while copy.sent_out.front().is_some_and(|(n, _)| *n <= seq) {
                        copy.sent_out.pop_front();
                    }
                }
            }
            Net::Output(seq, content) => {
                // The sink tells the node the output came from how far it took them (for a
                // copy too: that node may be one that sent its kept copies again).
                self.output(seq, content);
                if self.sink_next > 1 {
                    self.send(C, from, Net::OutMark(self.sink_next - 1));
                }
            }
        }
    }

    /// The sink takes output `seq`, or drops it as a copy.
    fn output(&mut self, seq: u64, content: (ServiceId, u64)) {
        if seq < self.sink_next || self.sink_early.contains_key(&seq) {
            self.report.outputs_dropped += 1;
            let seen = if seq < self.sink_next {
                self.sink_seen[seq as usize - 1]
            } else {
                self.sink_early[&seq]
            };
            assert_eq!(
                seen, content,
                "seed {}: output {seq} said {seen:?}, a copy of it {content:?}",
                self.report.seed
            );
            return;
        }
        self.sink_early.insert(seq, content);
        while let Some(c) = self.sink_early.remove(&self.sink_next) {
            self.sink_seen.push(c);
            self.sink_next += 1;
        }
    }

    fn send_next(&mut self, i: usize) {
        let sender = self.senders[i];
        if self.sent[i] >= self.cfg.msgs_per_sender {
            return;
        }
        if !self.retained.has_room() {
            // Back-pressure: try again later.
            let t = self.now + 2 * TICK_US;
            self.at(t, Ev::Send(i));
            return;
        }
        self.sent[i] += 1;
        let seq = self.sent[i];
        self.retained
            .keep(sender, seq, ())
            .expect("room was checked");
        let to = self.located.0;
        self.send(C, to, Net::Data(sender, seq));
        let t = self.now + 1 + self.rng.below(4 * TICK_US);
        self.at(t, Ev::Send(i));
    }
}

/// Runs one simulation.
pub fn run_failover(seed: u64, cfg: &FailoverConfig) -> FailoverReport {
    assert!(
        cfg.settings.check().is_ok(),
        "settings: {:?}",
        cfg.settings.check()
    );
    let mut rng = Rng(seed);
    let ppm = i64::from(cfg.settings.clock_rate_ppm);
    let mut voters = Vec::new();
    for name in ["p", "b", "w"] {
        let drift = rng.below((2 * ppm + 1) as u64) as i64 - ppm;
        voters.push(Voter {
            name: NodeName::new(name),
            alive: true,
            drift_ppm: drift,
            ballots: Ballots::default(),
            standbys: Standbys::new(16, 1 << 20),
            grantors: BTreeMap::new(),
            copy: None,
            tally: None,
            pending: None,
            tally_at: 0,
            disk_vote: None,
            disk_copy: None,
            dormant: None,
            term_base: 0,
        });
    }
    let service = ServiceId::from_parts(9, 1);
    let senders: Vec<ServiceId> = (0..cfg.senders)
        .map(|i| ServiceId::from_parts(3, i as u64 + 1))
        .collect();
    let mut cadence = Cadence::default();
    cadence.urgent();
    voters[P].copy = Some(Copy {
        epoch: 1,
        log: Vec::new(),
        next: BTreeMap::new(),
        early: BTreeMap::new(),
        queue: VecDeque::new(),
        out_seq: 0,
        taken: BTreeMap::new(),
        cadence,
        standby: Some((B, Lease::new(&cfg.settings))),
        standby_since: 0,
        standby_term: 0,
        protected: true,
        sent: true,
        sent_to: vec![B],
        held_out: VecDeque::new(),
        sent_out: VecDeque::new(),
        retired: false,
        replay_until: 0,
    });
    // The spawn returned once the standby held the first checkpoint.
    let first = Held {
        primary: voters[P].name.clone(),
        epoch: 1,
        no: 0,
        voters: voters.iter().map(|v| v.name.clone()).collect(),
        body: Body {
            log: Vec::new(),
            next: BTreeMap::new(),
            out_seq: 0,
            outputs: Vec::new(),
        },
        bytes: 1,
    };
    let b_name = voters[B].name.clone();
    voters[B]
        .standbys
        .offer(&b_name, service, first)
        .expect("an empty table takes the first checkpoint");
    let _ = voters[B]
        .grantors
        .entry(P)
        .or_default()
        .heard(0, &cfg.settings);
    let mut w = World {
        cfg: cfg.clone(),
        rng,
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        events: Vec::new(),
        voters,
        service,
        senders: senders.clone(),
        sent: vec![0; senders.len()],
        retained: Retained::new(cfg.settings.retained_per_channel_max),
        located: (P, 1),
        cuts: Vec::new(),
        sink_next: 1,
        sink_early: BTreeMap::new(),
        sink_seen: Vec::new(),
        lives: [0; 4],
        link_last: BTreeMap::new(),
        spans: BTreeMap::new(),
        report: FailoverReport {
            seed,
            ..FailoverReport::default()
        },
        high_water: 0,
        trace: std::env::var("TERN_SIM_TRACE").is_ok(),
    };
    // The traffic lasts about this long; faults fall inside it.
    let span_us = cfg.msgs_per_sender * 2 * TICK_US + 200_000;
    for i in 0..senders.len() {
        w.at(1, Ev::Send(i));
    }
    for n in [P, B, W] {
        w.at(TICK_US, Ev::Tick(n));
    }
    for _ in 0..cfg.cuts {
        let a = w.rng.below(3) as usize;
        let b = (a + 1 + w.rng.below(2) as usize) % 3;
        let start = w.rng.below(span_us);
        let until = start + 1 + w.rng.below(cfg.cut_max_us);
        w.cuts.push((a, b, start, until));
        if w.rng.chance(0.5) {
            w.cuts.push((b, a, start, until));
        }
    }
    if cfg.crash {
        let who = w.rng.below(3) as usize;
        let t = w.rng.below(span_us);
        w.at(t, Ev::Crash(who));
    }
    let horizon = span_us + cfg.cut_max_us + 20 * cfg.settings.lease_ms * 1_000;
    while let Some(Reverse((t, _, i))) = w.queue.pop() {
        if t > horizon {
            break;
        }
        w.now = t;
        w.report.events += 1;
        let Some(ev) = w.events[i].take() else {
            continue;
        };
        match ev {
            Ev::Deliver {
                from,
                to,
                msg,
                life,
            } => {
                if life != w.lives[from] || !w.alive(from) {
                    // Its node crashed: what it had in flight dies with it.
                    w.report.lost_in_flight += 1;
                    continue;
                }
                w.deliver(from, to, msg)
            }
            Ev::Tick(n) => {
                w.tick(n);
                let t = w.now + TICK_US;
                w.at(t, Ev::Tick(n));
            }
            Ev::Send(i) => w.send_next(i),
            Ev::Crash(n) => {
                if w.trace {
                    eprintln!("{:>9} {n} crashes", w.now);
                }
                w.voters[n].alive = false;
                w.lives[n] += 1;
                w.report.crashed = Some(w.voters[n].name.to_string());
                if w.cfg.restart {
                    let t = w.now + 1 + w.rng.below(3 * w.cfg.settings.lease_ms * 1_000);
                    w.at(t, Ev::Restart(n));
                }
            }
            Ev::Restart(n) => {
                if w.trace {
                    eprintln!("{:>9} {n} restarts on its data directory", w.now);
                }
                w.restart(n);
            }
        }
    }
    w.finish();
    w.report
}

impl World {
    /// Copy (`n`, `epoch`) just handled a message: no other copy's stretch of handling
    /// overlaps its own.
    fn check_one_live(&self, n: usize, epoch: u64) {
        let Some(&me) = self.spans.get(&(n, epoch)) else {
            return;
        };
        for (k, other) in &self.spans {
            if *k != (n, epoch) && k.0 == n {
                // The same node going on at a newer epoch is the same copy.
                continue;
            }
            if *k != (n, epoch) {
                assert!(
                    other.1 < me.0 || me.1 < other.0,
                    "seed {}: two live copies: {:?} {me:?} and {k:?} {other:?}",
                    self.report.seed,
                    (n, epoch)
                );
            }
        }
    }

    fn finish(&mut self) {
        // The newest copy not retired on a live node is the service; an older one may still be
        // waiting, suspended, to hear that it lost (it never served after the newer one began:
        // `check_one_live` saw to that at every message).
        let mut live: Vec<&Copy> = self
            .voters
            .iter()
            .filter(|v| v.alive)
            .filter_map(|v| v.copy.as_ref())
            .filter(|c| !c.retired)
            .collect();
        live.sort_by_key(|c| std::cmp::Reverse(c.epoch));
        let Some(last) = live.first() else {
            assert!(
                !self.cfg.liveness,
                "seed {}: no copy survives: {:?}",
                self.report.seed, self.report
            );
            return;
        };
        let complete = self.cfg.liveness;
        // Every sender's messages, once each, in order (a prefix of them when a double fault
        // may have lost the service's newest copy).
        for (i, s) in self.senders.iter().enumerate() {
            let got: Vec<u64> = last
                .log
                .iter()
                .filter(|(f, _)| f == s)
                .map(|(_, n)| *n)
                .collect();
            let upto = if complete {
                self.cfg.msgs_per_sender
            } else {
                got.len() as u64
            };
            let want: Vec<u64> = (1..=upto).collect();
            assert_eq!(
                got, want,
                "seed {}: sender {i}'s messages as handled: {:?}",
                self.report.seed, self.report
            );
        }
        // Every output the sink took says what the newest surviving history says: the newest
        // copy, or a newer checkpoint a live node holds (a standby that has not taken the
        // service over yet, a restarted node's stored one). An older copy, suspended, may have
        // handled past the checkpoint a newer epoch started from, and differently (it released
        // nothing of that), so the outputs are checked against the newest history, up to its
        // length (a double fault may have lost the newest copy).
        let outputs = &self.sink_seen;
        assert!(!complete || outputs.len() <= last.log.len());
        let newest = self
            .voters
            .iter()
            .filter(|v| v.alive)
            .flat_map(|v| {
                v.standbys
                    .iter()
                    .map(|(_, h)| h)
                    .chain(v.pending.iter())
                    .chain(v.dormant.iter().map(|(h, _)| h))
                    .map(|h| (h.epoch, &h.body.log))
            })
            .chain(std::iter::once((last.epoch, &last.log)))
            .max_by_key(|(e, log)| (*e, log.len()))
            .map_or(&last.log, |(_, log)| log);
        let common = outputs.len().min(newest.len());
        assert_eq!(
            outputs[..common],
            newest[..common],
            "seed {}: the outputs disagree with the history",
            self.report.seed
        );
        if complete {
            // A quiet end: the last checkpoint released everything (held mode), and every
            // output the last copy sent, or sent again from its checkpoint, arrived.
            assert!(
                outputs.len() + last.held_out.len() == last.log.len(),
                "seed {}: outputs missing: the sink took {}, the history has {}, {} held",
                self.report.seed,
                outputs.len(),
                last.log.len(),
                last.held_out.len()
            );
        }
        let mut copies: Vec<(u64, String, u64)> = self
            .spans
            .iter()
            .map(|((n, e), (f, _))| (*f, self.voters[*n].name.to_string(), *e))
            .collect();
        copies.sort();
        self.report.copies = copies.into_iter().map(|(_, n, e)| (n, e)).collect();
    }
}
