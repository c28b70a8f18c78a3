//! Deterministic simulation of the data plane the node runs: `tern_proto::inbox::Inbox`.
//!
//! Several nodes host services whose inboxes are the real `Inbox` (small capacities, so
//! refusals are common). Senders on every node tell (and sometimes wait) numbered messages to
//! every service while the services migrate at random: freeze and snapshot at the source
//! (`take_for_snapshot`), a restored copy at the target that parks arrivals, commit with the
//! leftovers (`retire`) or abort (`put_back` at the source, the parked arrivals sent back).
//! Messages for a service that left go on by the node's tombstones
//! (`tern_proto::forward::Tombstones`, the node's code: bounded, oldest first), which tell the
//! sender's node where the service went; a node that learns a new location fences the node it
//! learned it from, on the ordered data path, and a tombstone every other node has fenced goes.
//! A node with neither the service nor its tombstone refuses them. Every refusal goes back to the sender's node, which
//! records it and sends a skip to where it believes the service is (`newest_location`,
//! `skip_next_hop`: the same functions the node calls). The network delays and reorders
//! everything (data is never lost: QUIC delivers it).
//!
//! Handlers panic now and then (`DataPlaneConfig::panic`): restarted, as under a kind's
//! `Restart` policy, with the message in hand reported to its sender.
//!
//! Each node also has a second sender that tells half as many messages and then stops: its
//! node sends each service it told a close with its last number (`Inbox::close_sender`),
//! handed on by tombstones and tried again while the service is mid-move, as the node does.
//! At the end the windows of stopped senders must be gone (except where a close found nowhere
//! to go), and none of their late copies or skips may be taken as new.
//!
//! A service asked to freeze may stop for good instead (`DataPlaneConfig::stop`: its handler
//! stopped it with the message in hand): its queue and what its windows held early are refused
//! to their senders, and what comes later is refused as addressed to a service not there.
//!
//! Nodes crash and restart (`DataPlaneConfig::crashes`; a node that hosts no service and is no
//! migration's target, since services are not replicated): what was on its links is lost, its
//! tombstones, directory, ledgers and senders with it. Every other node hears of the loss after
//! a while, as the node's `link_down` does: a migration to it aborts, each ledger declares what
//! went there unconfirmed (reported to its sender, and a gap sent to where the service is), and
//! sends to it are refused at once until it is back. It comes back empty, with new senders, and
//! learns the directory as gossip would tell it.
//!
//! Every claim between nodes goes through the node's checks (`tern_proto::speakers`): a
//! message, skip, gap or close in a sender's name is believed from the node that speaks for
//! the sender (here, where it was born: senders do not move), and anything handed on for a
//! service from a node that had custody of it (the snapshot carries the list). No honest
//! claim may be refused. A rogue member (`DataPlaneConfig::lies`) sends messages, skips, gaps
//! and closes in live senders' names, as their own or as handed on; every lie must be refused
//! (the question to the sender's node is answered at once here; the node holds the stream
//! meanwhile), and no made-up message may be handled. A lie about a sender whose node crashed
//! meanwhile may be believed (nobody can vouch): nothing of that sender is left to silence.
//!
//! Checked after every handled message: each is the next number from its sender that was not
//! reported (FIFO, exactly once). Checked at the end, once every sender has sent a last message
//! that waits for room (**liveness**): every sender's last message was handled, and every
//! message sent was handled once or reported to its sender, never both refused and handled. A
//! message declared lost with a node may have been handled too (the ledger over-reports, as
//! `docs/failures.md` says); one from a sender that died with its node may be neither.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, VecDeque};

use crate::sim::Rng;
use tern_proto::error::DeliveryError;
use tern_proto::forward::{
    follow_gossip, route_notice, skip_next_hop, Hand, HandOn, Route, Tombstones,
};
use tern_proto::ids::{NodeName, ServiceId};
use tern_proto::inbox::{Admit, Inbox, Numbered, WindowExport};
use tern_proto::ledger::{Ledger, Unconfirmed};
use tern_proto::speakers::{prefix_for, Custody, SpeakerAnswer, Speakers, Verdict};

/// The size and weather of one run.
#[derive(Clone, Debug)]
pub struct DataPlaneConfig {
    /// Nodes.
    pub nodes: usize,
    /// Services.
    pub services: usize,
    /// Messages each node's sender tells each service before its last one.
    pub msgs_per_sender: u64,
    /// Mailbox capacity of every service.
    pub capacity: usize,
    /// Migration attempts.
    pub migrations: usize,
    /// Probability an attempt is aborted after the target restored it.
    pub abort: f64,
    /// Tombstones a node keeps (the oldest goes first).
    pub tombstones_max: usize,
    /// Largest network delay; delays are uniform in 1..=max.
    pub delay_max: u64,
    /// Probability a tell is sent as a waiting one (kept when refused for room, tried again).
    pub wait: f64,
    /// Probability a handler panics on the message in hand; the kind restarts it (the node's
    /// `Restart` policy): the message is reported to its sender, never handled, and the
    /// service takes the next one.
    pub panic: f64,
    /// Node crashes tried (each restarts after a while); one happens only on a node that hosts
    /// no service and is no migration's target.
    pub crashes: usize,
    /// Probability that a service asked to freeze for a migration stops for good instead (its
    /// handler stopped it with the message in hand): the attempt ends, its queue is refused
    /// to its senders, and what comes later is refused as addressed to a service not there.
    pub stop: f64,
    /// Lies a rogue member tells: messages, skips, gaps and closes in the name of honest
    /// senders, sent as their own or as handed on. Each must be refused
    /// (`tern_proto::speakers`), and none may change what the honest senders' messages do.
    pub lies: usize,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        DataPlaneConfig {
            nodes: 3,
            services: 2,
            msgs_per_sender: 40,
            capacity: 4,
            migrations: 10,
            abort: 0.2,
            tombstones_max: 1,
            delay_max: 12,
            wait: 0.1,
            panic: 0.0,
            crashes: 0,
            stop: 0.0,
            lies: 0,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DataPlaneReport {
    /// The seed.
    pub seed: u64,
    /// Handled marks from a node the messages had not gone to, kept until the channel
    /// pointed there.
    pub marks_waited: u64,
    /// Messages sent (taken by a sender's channel).
    pub sent: u64,
    /// Messages handled.
    pub handled: u64,
    /// Messages reported refused to their senders.
    pub reported: u64,
    /// Migrations committed and aborted.
    pub committed: u64,
    /// Migrations aborted.
    pub aborted: u64,
    /// Skips that found nowhere to go.
    pub skips_lost: u64,
    /// Messages handed on by tombstones.
    pub handed_on: u64,
    /// Tombstones removed because every other node fenced them.
    pub unburied: u64,
    /// Handlers that panicked (their message reported, the service restarted).
    pub panicked: u64,
    /// Closes sent by stopped senders' nodes.
    pub closes: u64,
    /// Closes that found neither the service nor its tombstone.
    pub closes_lost: u64,
    /// Stopped senders' windows gone by the end (summed over services).
    pub windows_retired: u64,
    /// Nodes that crashed (and restarted).
    pub crashed: u64,
    /// Messages declared lost with a crashed node (reported to their senders).
    pub declared: u64,
    /// Of those, messages that were handled all the same (the ledger's over-report).
    pub declared_handled: u64,
    /// Messages from senders that died with their node, neither handled nor reported.
    pub lost_with_sender: u64,
    /// Gaps that found nowhere to go.
    pub gaps_lost: u64,
    /// Services that stopped for good when asked to freeze.
    pub stopped: u64,
    /// Skips that found no window because their service had stopped (nothing waits).
    pub skips_to_stopped: u64,
    /// Messages refused whose refusal report was lost with a crashed node and that were
    /// settled as taken: neither handled nor reported (docs/failures.md).
    pub refusals_lost: u64,
    /// Lies the rogue told that reached a node.
    pub lies: u64,
    /// Lies refused (every one about a live sender must be).
    pub lies_refused: u64,
    /// Lies believed about a sender whose node crashed after the lie was told: nobody could
    /// vouch for it, and nothing of it was left to silence.
    pub lies_about_the_dead: u64,
    /// Honest claims refused by the speaker and custody checks (must be none).
    pub honest_refused: u64,
    /// Events processed.
    pub events: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Msg {
    from: ServiceId,
    seq: u64,
    origin: usize,
    /// Made up by the rogue: never to be handled.
    forged: bool,
}

impl Numbered for Msg {
    fn sender(&self) -> Option<ServiceId> {
        Some(self.from)
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn origin(&self) -> Option<&NodeName> {
        None
    }
}

/// How a message travels between nodes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Tell,
    Wait,
    /// Handed on by another node: by a tombstone, or accepted once already (leftovers,
    /// parked arrivals of an aborted copy).
    Handed(Hand),
}

impl Mode {
    fn waits(self) -> bool {
        matches!(self, Mode::Wait | Mode::Handed(Hand::Wait))
    }
}

enum Net {
    Deliver {
        to: ServiceId,
        msg: Msg,
        mode: Mode,
    },
    Refused {
        to: ServiceId,
        from: ServiceId,
        seq: u64,
        /// Refused because the service is not known at this node (no service, no tombstone).
        unknown_at: Option<usize>,
    },
    /// Membership gossip: the services the sender hosts, with their epochs.
    Hosts {
        services: Vec<(ServiceId, u64)>,
    },
    /// Service `to` took `from`'s messages up to `seq` (for the sender's ledger).
    Handled {
        to: ServiceId,
        from: ServiceId,
        seq: u64,
    },
    Skip {
        to: ServiceId,
        from: ServiceId,
        seq: u64,
        hops: u8,
    },
    /// The numbers of `from` to `to` up to `through` that have not arrived never will.
    Gap {
        to: ServiceId,
        from: ServiceId,
        through: u64,
    },
    /// Sender `from` stopped after sending number `last` to `to`.
    Closed {
        to: ServiceId,
        from: ServiceId,
        last: u64,
        hops: u8,
    },
    /// Where a service is (from the source at a commit, or a tombstone's notice).
    Located {
        service: ServiceId,
        node: usize,
        epoch: u64,
    },
    /// The sender no longer routes `service` through the receiver: behind every data
    /// message it sent there.
    Fence {
        service: ServiceId,
        epoch: u64,
    },
    Snapshot {
        service: ServiceId,
        attempt: u64,
        epoch: u64,
        log: Vec<(ServiceId, u64)>,
        queue: Vec<Msg>,
        windows: Vec<WindowExport<Msg>>,
        /// The nodes that had custody of the service before the source.
        custody: Vec<NodeName>,
    },
    Prepared {
        service: ServiceId,
        attempt: u64,
    },
    Commit {
        service: ServiceId,
        attempt: u64,
        leftovers: Vec<Msg>,
        skipped: Vec<(ServiceId, u64)>,
    },
    Abort {
        service: ServiceId,
        attempt: u64,
    },
}

enum Event {
    Net {
        to: usize,
        from: usize,
        msg: Net,
        /// The incarnations of `from` and `to` when it was sent: a crash of either loses it.
        inc: (u64, u64),
    },
    /// A node crashes (if it hosts nothing and is no migration's target).
    Crash {
        node: usize,
    },
    /// Node `at` hears that `lost` is gone (its link went down).
    Lost {
        at: usize,
        lost: usize,
        /// `at`'s incarnation then (a restart since forgets it).
        at_inc: u64,
    },
    /// A crashed node starts again.
    Restart {
        node: usize,
    },
    /// A node's membership gossip round.
    Gossip {
        node: usize,
    },
    /// A declared gap, or a refused number's skip (`skip`), waiting for a place to go (see
    /// `route_gap`, `route_skip`).
    Route {
        node: usize,
        gap: (ServiceId, ServiceId, u64),
        tries: u16,
        /// `node`'s incarnation then (a crash since loses it).
        inc: u64,
        skip: bool,
    },
    Send {
        node: usize,
        /// Which of the node's senders (0 lasts, 1 stops).
        who: usize,
        service: ServiceId,
        last: bool,
    },
    /// The node's second sender stops.
    Stop {
        node: usize,
    },
    Handle {
        node: usize,
        service: ServiceId,
    },
    Migrate,
    /// The rogue tells a lie.
    Lie,
}

enum Phase {
    Running,
    /// Source: snapshot sent to the target.
    Frozen {
        to: usize,
        attempt: u64,
        queue: VecDeque<Msg>,
    },
    /// Target: restored, waiting for the decision of `attempt` from `source`.
    Prepared {
        attempt: u64,
        source: usize,
    },
}

struct Hosted {
    inbox: Inbox<Msg>,
    log: Vec<(ServiceId, u64)>,
    epoch: u64,
    phase: Phase,
}

struct Node {
    /// False between a crash and the restart.
    up: bool,
    /// Bumped at each crash.
    inc: u64,
    /// Nodes this one has heard are gone and not yet back: sends to them are refused at once.
    down: BTreeSet<usize>,
    /// Membership gossip: which node last said it hosts each service, at which epoch.
    gossip: BTreeMap<ServiceId, (usize, u64)>,
    hosted: BTreeMap<ServiceId, Hosted>,
    tombs: Tombstones,
    directory: BTreeMap<ServiceId, (usize, u64)>,
    /// This node's senders (the second one stops), and the last number per (sender,
    /// service).
    senders: [ServiceId; 2],
    next_seq: BTreeMap<(ServiceId, ServiceId), u64>,
    /// Per service, the delivery ledger of this node's channel to it (the node's own).
    ledgers: BTreeMap<ServiceId, Ledger>,
    /// Handled marks from nodes the channel did not send to, until it points there.
    marks_waiting: tern_proto::ledger::WaitingMarks,
    /// Who speaks for which sender, and who had custody of which service (the node's
    /// tables).
    speakers: Speakers,
    custody: Custody,
}

struct Sim {
    cfg: DataPlaneConfig,
    rng: Rng,
    now: u64,
    order: u64,
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Event>>,
    nodes: Vec<Node>,
    names: Vec<NodeName>,
    services: Vec<ServiceId>,
    /// Per (service, sender): numbers sent, handled, reported.
    sent: BTreeMap<(ServiceId, ServiceId), BTreeSet<u64>>,
    handled: BTreeMap<(ServiceId, ServiceId), Vec<u64>>,
    reported: BTreeMap<(ServiceId, ServiceId), BTreeSet<u64>>,
    /// Per (service, sender): numbers declared lost with a node.
    declared: BTreeMap<(ServiceId, ServiceId), BTreeSet<u64>>,
    /// Senders that died with their node.
    dead: BTreeSet<ServiceId>,
    /// Services that stopped for good.
    stopped: BTreeSet<ServiceId>,
    /// Refusal reports lost with a crashed node's links: `(service, sender, seq)`.
    refusals_lost: BTreeSet<(ServiceId, ServiceId, u64)>,
    last: BTreeMap<(ServiceId, ServiceId), u64>,
    report: DataPlaneReport,
    migrating: bool,
    attempts: u64,
    /// Per (from, to): the latest arrival time of a data message, which a fence never
    /// overtakes (a node pair's data stream is ordered).
    data_due: BTreeMap<(usize, usize), u64>,
    /// Time after which no handler panics (the liveness probe follows).
    faults_end: u64,
}

impl Sim {
    fn at(&mut self, delay: u64, ev: Event) {
        self.order += 1;
        let idx = self.events.len();
        self.events.push(Some(ev));
        self.queue
            .push(Reverse((self.now + delay, self.order, idx)));
    }

    fn net(&mut self, from: usize, to: usize, msg: Net) {
        if to == self.nodes.len() {
            // To the rogue, which ignores what it is told.
            return;
        }
        if from != to && self.nodes[from].down.contains(&to) {
            // No link: a message is refused to its sender at once, anything else is dropped
            // (the node's link-down handling covers what it carried).
            match msg {
                Net::Deliver {
                    to: service, msg, ..
                } => self.refuse(from, service, &msg),
                // The node logs `close-lost` (the window stays), `skip-lost`, `gap-dropped`.
                Net::Closed { .. } => self.report.closes_lost += 1,
                Net::Skip { .. } => self.report.skips_lost += 1,
                Net::Gap { .. } => self.report.gaps_lost += 1,
                _ => {}
            }
            return;
        }
        let inc = (self.nodes[from].inc, self.nodes[to].inc);
        let mut d = 1 + self.rng.below(self.cfg.delay_max);
        let due = self.data_due.entry((from, to)).or_default();
        match msg {
            Net::Deliver { .. } => *due = (*due).max(self.now + d),
            Net::Fence { .. } => d = d.max(due.saturating_sub(self.now) + 1),
            _ => {}
        }
        self.at(d, Event::Net { to, from, msg, inc });
    }

    /// An event for `node` itself (a stream's retry, the next progress tick).
    fn local(&mut self, delay: u64, node: usize, msg: Net) {
        let inc = (self.nodes[node].inc, self.nodes[node].inc);
        let ev = Event::Net {
            to: node,
            from: node,
            msg,
            inc,
        };
        self.at(delay, ev);
    }

    fn node_of(&self, name: &NodeName) -> usize {
        self.names.iter().position(|n| n == name).unwrap_or(0)
    }

    /// Where the tombstone of `service` at `node` hands on (the node's `Core::tombstone`).
    fn tomb(&self, node: usize, service: ServiceId) -> Option<usize> {
        let n = &self.nodes[node];
        n.tombs.epoch(service)?;
        if n.hosted.contains_key(&service) {
            return None;
        }
        n.directory.get(&service).map(|(at, _)| *at)
    }

    /// A message for `to` could not be taken at `node`: its sender's node hears of it.
    fn refuse(&mut self, node: usize, to: ServiceId, msg: &Msg) {
        self.refuse_at(node, to, msg, None);
    }

    /// A refusal; `unknown_at` when `node` knows nothing of the service.
    fn refuse_at(&mut self, node: usize, to: ServiceId, msg: &Msg, unknown_at: Option<usize>) {
        if msg.origin == node {
            self.refused_here(node, to, (msg.from, msg.seq), unknown_at);
        } else {
            self.net(
                node,
                msg.origin,
                Net::Refused {
                    to,
                    from: msg.from,
                    seq: msg.seq,
                    unknown_at,
                },
            );
        }
    }

    /// The sender's node records a refusal and closes the number where the service is. A
    /// refusal from a node that does not know the service makes the directory follow
    /// membership gossip, as the node's `not_known_at` repoints its channel.
    fn refused_here(
        &mut self,
        node: usize,
        to: ServiceId,
        (from, seq): (ServiceId, u64),
        unknown_at: Option<usize>,
    ) {
        if let Some(at) = unknown_at {
            // The channel follows gossip if it points there (`not_known_at`).
            match self.nodes[node].directory.get(&to).copied() {
                Some((p, epoch)) if p == at => self.follow_gossip(node, to, (p, epoch)),
                _ => {}
            }
        }
        let key = (to, from);
        let fresh = self.reported.entry(key).or_default().insert(seq);
        assert!(
            fresh,
            "seed {}: {to}/{from} #{seq} reported twice",
            self.report.seed
        );
        self.report.reported += 1;
        if let Some(l) = self.nodes[node].ledgers.get_mut(&to) {
            l.refused(from, seq);
            // Were this node lost now, no number reported refused would be reported again.
            let here = self.names[node].clone();
            let reported = &self.reported[&key];
            for (_, first, last) in l
                .clone()
                .declare_lost(&here, true)
                .into_iter()
                .filter(|(f, _, _)| *f == from)
            {
                assert!(
                    !(first..=last).any(|n| reported.contains(&n)),
                    "seed {}: {to}/{from}: {first}..={last} would be declared, some reported refused already",
                    self.report.seed
                );
            }
        }
        self.route_skip(node, (to, from, seq), 0);
    }

    /// The skip of a refused number goes where `node` believes the service is, as the node's
    /// `route_skip`: while that is a node known gone, it waits for the next tick (a bounded
    /// number of times) for gossip to say where the service went.
    fn route_skip(
        &mut self,
        node: usize,
        (to, from, seq): (ServiceId, ServiceId, u64),
        tries: u16,
    ) {
        match self.route_notice(node, to, tries) {
            Route::Here => self.apply_skip(node, to, from, seq, 0),
            Route::Send(at) => self.send_skip(node, &at, (to, from, seq), 0),
            Route::Wait => self.route_later(node, (to, from, seq), tries, true),
            Route::Drop => self.report.skips_lost += 1,
        }
    }

    /// A skip (`skip`) or a gap from `node` waits for the next tick, as the node's pending
    /// queue keeps it, and is routed again then.
    fn route_later(
        &mut self,
        node: usize,
        notice: (ServiceId, ServiceId, u64),
        tries: u16,
        skip: bool,
    ) {
        let ev = Event::Route {
            node,
            gap: notice,
            tries: tries + 1,
            inc: self.nodes[node].inc,
            skip,
        };
        self.at(5, ev);
    }

    fn send_skip(
        &mut self,
        node: usize,
        at: &NodeName,
        (to, from, seq): (ServiceId, ServiceId, u64),
        hops: u8,
    ) {
        let at = self.node_of(at);
        self.net(
            node,
            at,
            Net::Skip {
                to,
                from,
                seq,
                hops,
            },
        );
    }

    /// Where a skip or close for `to` that `node` cannot apply goes next, after `hops` nodes
    /// (the node's `skip_next_hop`: the tombstone, else the directory).
    fn next_hop(&self, node: usize, to: ServiceId, hops: u8) -> Option<NodeName> {
        let tomb = self.tomb(node, to).map(|n| self.names[n].clone());
        let known = self.nodes[node]
            .directory
            .get(&to)
            .map(|(n, _)| self.names[*n].clone());
        skip_next_hop(&self.names[node], tomb, known, hops)
    }

    fn apply_skip(&mut self, node: usize, to: ServiceId, from: ServiceId, seq: u64, hops: u8) {
        if let Some(h) = self.nodes[node].hosted.get_mut(&to) {
            if h.inbox.skip(from, seq).is_ok() {
                return;
            }
        }
        match self.next_hop(node, to, hops) {
            Some(at) => self.send_skip(node, &at, (to, from, seq), hops + 1),
            // A stopped service has no window left to wait.
            None if self.stopped.contains(&to) => self.report.skips_to_stopped += 1,
            None => self.report.skips_lost += 1,
        }
    }

    /// A stopped sender's close, as the node's `apply_closed`: applied where the service is,
    /// tried again while it cannot be, else handed on as a skip is (`skip_next_hop`) or lost.
    fn apply_closed(
        &mut self,
        node: usize,
        to: ServiceId,
        (from, last): (ServiceId, u64),
        hops: u8,
    ) {
        let closed = Net::Closed {
            to,
            from,
            last,
            hops,
        };
        if let Some(h) = self.nodes[node].hosted.get_mut(&to) {
            if h.inbox.close_sender(from, last).is_ok() {
                return;
            }
            // The node's next progress tick.
            return self.local(5, node, closed);
        }
        match self.next_hop(node, to, hops) {
            Some(at) => {
                let at = self.node_of(&at);
                let msg = Net::Closed {
                    to,
                    from,
                    last,
                    hops: hops + 1,
                };
                self.net(node, at, msg);
            }
            None => self.report.closes_lost += 1,
        }
    }

    /// The node's second sender stops: every service it told hears its last number there,
    /// sent where the node believes the service is (the node's `sender_stopped`).
    fn stop_sender(&mut self, node: usize) {
        if !self.nodes[node].up {
            return;
        }
        let from = self.nodes[node].senders[1];
        let told: Vec<(ServiceId, u64)> = self.nodes[node]
            .next_seq
            .iter()
            .filter(|((f, _), _)| *f == from)
            .map(|((_, to), last)| (*to, *last))
            .collect();
        for (to, last) in told {
            self.report.closes += 1;
            let at = self.nodes[node].directory.get(&to).map(|(n, _)| *n);
            match at {
                Some(at) if at != node => {
                    let msg = Net::Closed {
                        to,
                        from,
                        last,
                        hops: 0,
                    };
                    self.net(node, at, msg);
                }
                _ => self.apply_closed(node, to, (from, last), 0),
            }
        }
    }

    /// A gap, as the node's `apply_gap`: applied where the service is, tried again while it
    /// cannot be, handed on by a tombstone, else lost.
    fn apply_gap(&mut self, node: usize, to: ServiceId, from: ServiceId, through: u64) {
        if let Some(h) = self.nodes[node].hosted.get_mut(&to) {
            match h.inbox.skip_through(from, through) {
                Ok(_) => self.at(1, Event::Handle { node, service: to }),
                Err(_) => self.local(5, node, Net::Gap { to, from, through }),
            }
            return;
        }
        match self.tomb(node, to) {
            Some(at) => self.net(node, at, Net::Gap { to, from, through }),
            None => self.report.gaps_lost += 1,
        }
    }

    /// `node`'s channel to `service`, pointing at `points` (a node gone, or one that said it
    /// does not know the service), follows gossip by the node's rule
    /// (`tern_proto::forward::follow_gossip`).
    fn follow_gossip(&mut self, node: usize, service: ServiceId, (at, epoch): (usize, u64)) {
        let gossip = self.nodes[node]
            .gossip
            .get(&service)
            .map(|(g, e)| (self.names[*g].clone(), *e));
        let points = (self.names[at].clone(), epoch);
        if let Some((g, e)) = follow_gossip(points, gossip) {
            let g = self.node_of(&g);
            self.learn(node, service, g, e);
        }
    }

    /// Where a skip or gap from `node` for `to` goes now (`tern_proto::forward::route_notice`:
    /// the directory's node, if `node` has a link there).
    fn route_notice(&self, node: usize, to: ServiceId, tries: u16) -> Route {
        let n = &self.nodes[node];
        let at = n.directory.get(&to).map(|(at, _)| self.names[*at].clone());
        let linked = |name: &NodeName| !n.down.contains(&self.node_of(name));
        route_notice(&self.names[node], at, linked, tries)
    }

    /// A declared gap goes where `node` believes the service is, as the node's `route_gap`:
    /// while that is a node known gone, it waits for the next tick (a bounded number of times)
    /// for gossip to say where the service went.
    fn route_gap(
        &mut self,
        node: usize,
        (to, from, through): (ServiceId, ServiceId, u64),
        tries: u16,
    ) {
        match self.route_notice(node, to, tries) {
            Route::Here => self.apply_gap(node, to, from, through),
            Route::Send(at) => {
                let at = self.node_of(&at);
                self.net(node, at, Net::Gap { to, from, through })
            }
            Route::Wait => self.route_later(node, (to, from, through), tries, false),
            Route::Drop => self.report.gaps_lost += 1,
        }
    }

    /// `node` crashes, if it hosts nothing and no migration is headed there or waits for its
    /// decision (a copy whose source died after committing is lost with it: the
    /// migration-core simulation covers that): its state and what is on its links are lost;
    /// the others hear of it after a while; it restarts.
    fn crash(&mut self, node: usize) {
        let n = &self.nodes[node];
        let headed = self.nodes.iter().any(|o| {
            o.hosted.values().any(|h| match h.phase {
                Phase::Frozen { to, .. } => to == node,
                Phase::Prepared { source, .. } => source == node,
                Phase::Running => false,
            })
        });
        if !n.up || !n.hosted.is_empty() || headed {
            return;
        }
        self.report.crashed += 1;
        let n = &mut self.nodes[node];
        n.up = false;
        n.inc += 1;
        self.dead.extend(n.senders);
        n.tombs = Tombstones::new(self.cfg.tombstones_max);
        n.directory.clear();
        n.gossip.clear();
        n.next_seq.clear();
        n.ledgers.clear();
        n.down.clear();
        n.speakers = Speakers::new(self.names[node].clone());
        n.custody = Custody::new();
        for at in 0..self.nodes.len() {
            if at != node {
                let d = 1 + self.rng.below(2 * self.cfg.delay_max);
                let at_inc = self.nodes[at].inc;
                self.at(
                    d,
                    Event::Lost {
                        at,
                        lost: node,
                        at_inc,
                    },
                );
            }
        }
        let back = 3 * self.cfg.delay_max + 10 + self.rng.below(10);
        self.at(back, Event::Restart { node });
    }

    /// `at` hears that `lost` is gone, as the node's `link_down`: a migration to it aborts,
    /// each ledger declares what went there unconfirmed (reported, and a gap sent to where the
    /// service is), and sends to it are refused until it is back.
    fn lost(&mut self, at: usize, lost: usize) {
        // Channels pointing at it follow gossip first, so that the gaps below go where the
        // services are.
        let follow: Vec<(ServiceId, u64)> = self.nodes[at]
            .directory
            .iter()
            .filter(|(_, (n, _))| *n == lost)
            .map(|(s, (_, e))| (*s, *e))
            .collect();
        self.nodes[at].down.insert(lost);
        // Its next run is told again where services went (the node's `link_lost`).
        let name = self.names[lost].clone();
        self.nodes[at].tombs.forget_notices_to(&name);
        for (service, epoch) in follow {
            self.follow_gossip(at, service, (lost, epoch));
        }
        let frozen: Vec<ServiceId> = self.nodes[at]
            .hosted
            .iter()
            .filter(|(_, h)| matches!(h.phase, Phase::Frozen { to, .. } if to == lost))
            .map(|(s, _)| *s)
            .collect();
        for service in frozen {
            let Some(h) = self.nodes[at].hosted.get_mut(&service) else {
                continue;
            };
            if let Phase::Frozen { queue, .. } = std::mem::replace(&mut h.phase, Phase::Running) {
                h.inbox.put_back(queue);
                self.migrating = false;
                self.report.aborted += 1;
                self.at(1, Event::Handle { node: at, service });
            }
        }
        let name = self.names[lost].clone();
        let services: Vec<ServiceId> = self.nodes[at].ledgers.keys().copied().collect();
        for service in &services {
            // Skips and gaps sent earlier may have gone through the lost node: sent again.
            let again = self.nodes[at].ledgers[service].unconfirmed().to_vec();
            for u in again {
                match u {
                    Unconfirmed::Skip(from, seq) => self.route_skip(at, (*service, from, seq), 0),
                    Unconfirmed::Gap(from, through) => {
                        self.route_gap(at, (*service, from, through), 0)
                    }
                }
            }
        }
        for service in services {
            let where_now = self.nodes[at].directory.get(&service).map(|(n, _)| *n);
            let here = where_now == Some(lost);
            let Some(l) = self.nodes[at].ledgers.get_mut(&service) else {
                continue;
            };
            for (from, first, last) in l.declare_lost(&name, here) {
                let key = (service, from);
                let set = self.declared.entry(key).or_default();
                set.extend(first..=last);
                self.report.declared += last - first + 1;
                self.route_gap(at, (service, from, last), 0);
            }
        }
    }

    /// A crashed node starts again: empty, with new senders; it learns the directory as
    /// gossip would tell it, and the others connect to it again.
    fn restart(&mut self, node: usize) {
        let source = (0..self.nodes.len()).find(|i| *i != node && self.nodes[*i].up);
        let directory = source.map_or_else(BTreeMap::new, |i| self.nodes[i].directory.clone());
        let gossip = source.map_or_else(BTreeMap::new, |i| self.nodes[i].gossip.clone());
        let inc = self.nodes[node].inc;
        let prefix = prefix_for(&self.names[node], inc as u32);
        let n = &mut self.nodes[node];
        n.up = true;
        n.directory = directory;
        n.gossip = gossip;
        n.senders = [
            ServiceId::from_parts(prefix, 1),
            ServiceId::from_parts(prefix, 2),
        ];
        for o in self.nodes.iter_mut() {
            o.down.remove(&node);
        }
    }

    fn admit(&mut self, node: usize, to: ServiceId, msg: Msg, mode: Mode) {
        let Some(h) = self.nodes[node].hosted.get_mut(&to) else {
            return self.not_here(node, to, msg, mode);
        };
        let admit = match mode {
            Mode::Tell => Admit::Tell,
            Mode::Wait => Admit::Wait,
            Mode::Handed(hand) => hand.admit(),
        };
        match h.inbox.admit(msg, admit) {
            Ok(_) => {}
            Err((DeliveryError::Moved { .. }, msg)) => self.not_here(node, to, msg, mode),
            Err((DeliveryError::MailboxFull { .. } | DeliveryError::WindowFull { .. }, msg))
                if mode.waits() =>
            {
                // The stream holds it and tries again when there is room.
                let d = 1 + self.rng.below(4);
                self.local(d, node, Net::Deliver { to, msg, mode });
            }
            Err((_, msg)) => self.refuse(node, to, &msg),
        }
    }

    /// A message for `to`, which is not at `node`: its tombstone hands it on (telling the
    /// sender's node the first time), else it is refused.
    fn not_here(&mut self, node: usize, to: ServiceId, msg: Msg, mode: Mode) {
        let n = &mut self.nodes[node];
        let located = match n.hosted.contains_key(&to) {
            true => None,
            false => n
                .directory
                .get(&to)
                .map(|(at, e)| (self.names[*at].clone(), *e)),
        };
        let origin = self.names[msg.origin].clone();
        match n.tombs.hand_on(&self.names[node], to, &origin, located) {
            Some(HandOn { at, epoch, notify }) => {
                self.report.handed_on += 1;
                let at = self.node_of(&at);
                if let Some(o) = notify {
                    let o = self.node_of(&o);
                    if self.nodes[node].down.contains(&o) {
                        // No link: not counted as told (the node's `notice_unsent`).
                        self.nodes[node]
                            .tombs
                            .notice_unsent(to, &self.names[o], epoch);
                    }
                    self.net(
                        node,
                        o,
                        Net::Located {
                            service: to,
                            node: at,
                            epoch,
                        },
                    );
                }
                let hand = match mode {
                    Mode::Tell => Hand::Tell,
                    Mode::Wait => Hand::Wait,
                    Mode::Handed(h) => h,
                };
                let mode = Mode::Handed(hand);
                self.net(node, at, Net::Deliver { to, msg, mode });
            }
            None => self.refuse_at(node, to, &msg, Some(node)),
        }
    }

    /// Whether `node` believes what `from` claims about a sender in `msg` (the node's
    /// `speaker` and `custody` checks): a node that had custody of the service hands on
    /// anything for it; otherwise only the node that speaks for the sender may claim
    /// something in its name, and never as handed on. A question to the node that knows is
    /// answered at once here (the node holds the claim's stream until the answer).
    fn believed(&mut self, node: usize, from: usize, msg: &Net) -> bool {
        if from == node {
            return true;
        }
        let (service, sender, handed) = match msg {
            Net::Deliver { to, msg, mode } => (*to, msg.from, matches!(mode, Mode::Handed(_))),
            Net::Skip { to, from, hops, .. } | Net::Closed { to, from, hops, .. } => {
                (*to, *from, *hops > 0)
            }
            Net::Gap { to, from, .. } => (*to, *from, false),
            _ => return true,
        };
        let peer = self.names[from].clone();
        if self.nodes[node].custody.had(service, &peer) {
            return true;
        }
        if handed {
            return false;
        }
        let names = &self.names;
        let birth = || {
            names[..names.len() - 1]
                .iter()
                .find(|n| tern_proto::speakers::born_at(sender, n))
                .cloned()
        };
        match self.nodes[node].speakers.check(sender, &peer, birth) {
            Verdict::Speaks => true,
            Verdict::Refused(_) => false,
            Verdict::Wait => unreachable!("questions are answered at once here"),
            Verdict::Ask(at) => {
                let at = self.node_of(&at);
                let answer = self.nodes[at].up.then(|| {
                    if self.nodes[at].senders.contains(&sender) {
                        SpeakerAnswer::Here
                    } else {
                        SpeakerAnswer::Unknown
                    }
                });
                let asked = self.names[at].clone();
                let n = &mut self.nodes[node];
                match answer {
                    Some(a) => {
                        let _ = n.speakers.answered(sender, &asked, a);
                    }
                    None => n.speakers.give_up(sender, true),
                }
                matches!(n.speakers.check(sender, &peer, || None), Verdict::Speaks)
            }
        }
    }

    /// The rogue tells a lie to the node hosting a random service: a message, a skip, a gap
    /// or a close in the name of a live honest sender, as its own or as handed on.
    fn lie(&mut self) {
        let rogue = self.nodes.len();
        let service = self.services[self.rng.below(self.services.len() as u64) as usize];
        let node = self.host_of(service);
        let victim = self.rng.below(self.nodes.len() as u64) as usize;
        if !self.nodes[victim].up || !self.nodes[node].up {
            return;
        }
        let from = self.nodes[victim].senders[self.rng.below(2) as usize];
        let next = self.nodes[victim]
            .next_seq
            .get(&(from, service))
            .copied()
            .unwrap_or(0)
            + 1;
        let hops = self.rng.below(2) as u8;
        let msg = match self.rng.below(5) {
            0 | 1 => Net::Deliver {
                to: service,
                msg: Msg {
                    from,
                    seq: next,
                    origin: rogue,
                    forged: true,
                },
                mode: if self.rng.chance(0.5) {
                    Mode::Tell
                } else {
                    Mode::Handed(Hand::Accepted)
                },
            },
            2 => Net::Skip {
                to: service,
                from,
                seq: next,
                hops,
            },
            3 => Net::Gap {
                to: service,
                from,
                through: next + 5,
            },
            _ => Net::Closed {
                to: service,
                from,
                last: next,
                hops,
            },
        };
        let inc = (0, self.nodes[node].inc);
        let d = 1 + self.rng.below(self.cfg.delay_max);
        self.at(
            d,
            Event::Net {
                to: node,
                from: rogue,
                msg,
                inc,
            },
        );
    }

    /// A gossip round from `node`: every other node hears which services it hosts.
    fn gossip(&mut self, node: usize) {
        if !self.nodes[node].up {
            return;
        }
        let services: Vec<(ServiceId, u64)> = self.nodes[node]
            .hosted
            .iter()
            .filter(|(_, h)| matches!(h.phase, Phase::Running))
            .map(|(s, h)| (*s, h.epoch))
            .collect();
        for to in 0..self.nodes.len() {
            if to != node {
                let services = services.clone();
                self.net(node, to, Net::Hosts { services });
            }
        }
    }

    /// `service` left `node` at `epoch`: a tombstone stays until every other node fenced it.
    fn bury(&mut self, node: usize, service: ServiceId, epoch: u64) {
        let peers: Vec<NodeName> = (0..self.nodes.len())
            .filter(|p| *p != node)
            .map(|p| self.names[p].clone())
            .collect();
        let tombs = &mut self.nodes[node].tombs;
        tombs.bury(service, epoch);
        // False only when the bound is 0 (the tombstone went at once).
        let awaited = tombs.await_fences(service, epoch, peers);
        debug_assert!(awaited || self.cfg.tombstones_max == 0);
    }

    /// `node` hears that `service` is at `at` since `epoch`; when it is news, it fences the
    /// node that told it (`from`), as the node's `learned` does.
    fn learn(&mut self, node: usize, service: ServiceId, at: usize, epoch: u64) {
        let d = self.nodes[node]
            .directory
            .entry(service)
            .or_insert((at, epoch));
        if epoch >= d.1 {
            *d = (at, epoch);
            // The channel points there now: what it sent may be there (the node's channel
            // repoints its ledger).
            let name = self.names[at].clone();
            let n = &mut self.nodes[node];
            if let Some(l) = n.ledgers.get_mut(&service) {
                l.repointed(&name);
                for (sender, seq) in n.marks_waiting.take(service, &name) {
                    l.settle(sender, seq);
                }
            }
        }
    }

    fn learned_from(
        &mut self,
        node: usize,
        from: usize,
        service: ServiceId,
        at: usize,
        epoch: u64,
    ) {
        self.learn(node, service, at, epoch);
        if from != node {
            self.net(node, from, Net::Fence { service, epoch });
        }
    }

    fn on_net(&mut self, node: usize, from: usize, msg: Net) {
        match msg {
            Net::Deliver { to, msg, mode } => self.admit(node, to, msg, mode),
            Net::Refused {
                to,
                from,
                seq,
                unknown_at,
            } => self.refused_here(node, to, (from, seq), unknown_at),
            Net::Hosts { services } => {
                let g = &mut self.nodes[node].gossip;
                g.retain(|_, (at, _)| *at != from);
                g.extend(services.iter().map(|(s, e)| (*s, (from, *e))));
                // Where a channel points at a node known gone, gossip says where to go, if
                // at least as new (the node's `follow_gossip_away_from`).
                for (s, _) in services {
                    let n = &self.nodes[node];
                    match n.directory.get(&s).copied() {
                        Some(points) if n.down.contains(&points.0) => {
                            self.follow_gossip(node, s, points)
                        }
                        _ => {}
                    }
                }
            }
            Net::Handled {
                to,
                from: sender,
                seq,
            } => {
                // Believed from a node the messages went to or the channel points at; kept
                // until the channel points there otherwise (the node's `settle_from`).
                let by = self.names[from].clone();
                let n = &mut self.nodes[node];
                let points = n.directory.get(&to).is_some_and(|(at, _)| *at == from);
                if let Some(l) = n.ledgers.get_mut(&to) {
                    if points || l.may_settle(sender, &by) {
                        l.settle(sender, seq);
                    } else {
                        n.marks_waiting.keep(&by, (to, sender, seq));
                        self.report.marks_waited += 1;
                    }
                }
            }
            Net::Skip {
                to,
                from,
                seq,
                hops,
            } => self.apply_skip(node, to, from, seq, hops),
            Net::Closed {
                to,
                from,
                last,
                hops,
            } => self.apply_closed(node, to, (from, last), hops),
            Net::Gap { to, from, through } => self.apply_gap(node, to, from, through),
            Net::Located {
                service,
                node: at,
                epoch,
            } => self.learned_from(node, from, service, at, epoch),
            Net::Fence { service, epoch } => {
                let me = self.names[from].clone();
                if self.nodes[node].tombs.fenced(&me, service, epoch) {
                    self.report.unburied += 1;
                }
            }
            Net::Snapshot {
                service,
                attempt,
                epoch,
                log,
                queue,
                windows,
                custody,
            } => {
                // A copy of an earlier attempt whose abort is still on its way goes, as an
                // abort would take it.
                self.discard_copy(node, from, service, None);
                let source = self.names[from].clone();
                self.nodes[node]
                    .custody
                    .add(service, custody.into_iter().chain([source]));
                let mut inbox = Inbox::restored(service, self.cfg.capacity, windows);
                for m in queue {
                    inbox.push_carried(m);
                }
                self.nodes[node].hosted.insert(
                    service,
                    Hosted {
                        inbox,
                        log,
                        epoch,
                        phase: Phase::Prepared {
                            attempt,
                            source: from,
                        },
                    },
                );
                self.net(node, from, Net::Prepared { service, attempt });
            }
            Net::Prepared { service, attempt } => self.decide(node, service, attempt),
            Net::Commit {
                service,
                attempt,
                leftovers,
                skipped,
            } => {
                let Some(h) = self.nodes[node].hosted.get_mut(&service) else {
                    return;
                };
                if !matches!(h.phase, Phase::Prepared { attempt: a, .. } if a == attempt) {
                    return;
                }
                h.phase = Phase::Running;
                let mut refused = Vec::new();
                for m in leftovers {
                    if let Err((_, m)) = h.inbox.admit(m, Admit::Accepted) {
                        refused.push(m);
                    }
                }
                for (f, seq) in skipped {
                    let _ = h.inbox.skip(f, seq);
                }
                refused.extend(h.inbox.carried_done().0.into_iter().map(|(_, m)| m));
                refused.extend(h.inbox.start().0.into_iter().map(|(_, m)| m));
                let epoch = h.epoch;
                for m in refused {
                    self.refuse(node, service, &m);
                }
                self.learn(node, service, node, epoch);
                self.at(1, Event::Handle { node, service });
            }
            Net::Abort { service, attempt } => {
                self.discard_copy(node, from, service, Some(attempt));
            }
        }
    }

    /// Drops the prepared copy of `service` here (of `attempt` only, when given): its carried
    /// queue is still at the source, its parked arrivals go back there.
    fn discard_copy(
        &mut self,
        node: usize,
        source: usize,
        service: ServiceId,
        attempt: Option<u64>,
    ) {
        let ours = self.nodes[node].hosted.get(&service).is_some_and(|h| {
            matches!(h.phase, Phase::Prepared { attempt: a, .. } if attempt.is_none_or(|want| want == a))
        });
        if !ours {
            return;
        }
        let Some(mut h) = self.nodes[node].hosted.remove(&service) else {
            return;
        };
        let gone = h.inbox.discard_all();
        for (from, seq) in gone.skips {
            let at = self.names[source].clone();
            self.send_skip(node, &at, (service, from, seq), 0);
        }
        for m in gone.parked {
            self.net(
                node,
                source,
                Net::Deliver {
                    to: service,
                    msg: m,
                    mode: Mode::Handed(Hand::Accepted),
                },
            );
        }
    }

    /// The source hears `Prepared`: commit, or abort at random.
    fn decide(&mut self, node: usize, service: ServiceId, attempt: u64) {
        let abort = self.rng.chance(self.cfg.abort);
        let Some(h) = self.nodes[node].hosted.get_mut(&service) else {
            return;
        };
        if !matches!(h.phase, Phase::Frozen { attempt: a, .. } if a == attempt) {
            return;
        }
        let Phase::Frozen { to, queue, .. } = std::mem::replace(&mut h.phase, Phase::Running)
        else {
            return;
        };
        self.migrating = false;
        if abort {
            h.inbox.put_back(queue);
            self.report.aborted += 1;
            self.net(node, to, Net::Abort { service, attempt });
            self.at(1, Event::Handle { node, service });
            return;
        }
        let epoch = h.epoch + 1;
        let left = h.inbox.retire(self.names[to].clone(), epoch);
        self.nodes[node].hosted.remove(&service);
        self.report.committed += 1;
        let leftovers = left.queue.into_iter().chain(left.early).collect();
        self.net(
            node,
            to,
            Net::Commit {
                service,
                attempt,
                leftovers,
                skipped: left.skipped,
            },
        );
        // Stopped senders' closes follow the service, as the node's `retire` sends them.
        for (from, last) in left.closing {
            self.net(
                node,
                to,
                Net::Closed {
                    to: service,
                    from,
                    last,
                    hops: 0,
                },
            );
        }
        self.bury(node, service, epoch);
        self.learn(node, service, to, epoch);
        for peer in 0..self.nodes.len() {
            if peer != node {
                self.net(
                    node,
                    peer,
                    Net::Located {
                        service,
                        node: to,
                        epoch,
                    },
                );
            }
        }
    }

    /// `service` stops for good on `node` (its handler stopped it while a freeze was asked
    /// for: the node's runner breaks out before the snapshot, and the attempt ends at its
    /// deadline). Its queue and what its windows held early are refused to their senders.
    fn stop_service(&mut self, node: usize, service: ServiceId) {
        let Some(mut h) = self.nodes[node].hosted.remove(&service) else {
            return;
        };
        self.report.stopped += 1;
        self.stopped.insert(service);
        for m in h.inbox.close() {
            self.refuse(node, service, &m);
        }
    }

    fn migrate(&mut self) {
        if self.migrating {
            return;
        }
        let service = self.services[self.rng.below(self.services.len() as u64) as usize];
        let Some(node) = (0..self.nodes.len()).find(|n| {
            self.nodes[*n]
                .hosted
                .get(&service)
                .is_some_and(|h| matches!(h.phase, Phase::Running) && !h.inbox.is_gated())
        }) else {
            return;
        };
        let to =
            (node + 1 + self.rng.below(self.nodes.len() as u64 - 1) as usize) % self.nodes.len();
        if self.nodes[node].down.contains(&to) {
            // No link: the node refuses the attempt at once.
            return;
        }
        if self.rng.chance(self.cfg.stop) {
            return self.stop_service(node, service);
        }
        let Some(h) = self.nodes[node].hosted.get_mut(&service) else {
            return;
        };
        let (queue, windows) = h.inbox.take_for_snapshot(|m| m.clone());
        self.attempts += 1;
        let attempt = self.attempts;
        let snap = Net::Snapshot {
            service,
            attempt,
            epoch: h.epoch + 1,
            log: h.log.clone(),
            queue: queue.iter().cloned().collect(),
            windows,
            custody: self.nodes[node].custody.of(service),
        };
        let Some(h) = self.nodes[node].hosted.get_mut(&service) else {
            return;
        };
        h.phase = Phase::Frozen { to, attempt, queue };
        // The target holds a copy from now on: what it hands back is believed.
        let target = self.names[to].clone();
        self.nodes[node].custody.add(service, [target]);
        self.migrating = true;
        self.net(node, to, snap);
    }

    /// `node`'s ledger for `service` notes number `seq` of `from`, sent to node `via`.
    fn note_sent(
        &mut self,
        node: usize,
        service: ServiceId,
        (from, seq): (ServiceId, u64),
        via: usize,
    ) {
        let via = self.names[via].clone();
        self.nodes[node]
            .ledgers
            .entry(service)
            .or_default()
            .note(from, seq, &via);
    }

    fn send(&mut self, node: usize, who: usize, service: ServiceId, last: bool) {
        if !self.nodes[node].up {
            // Its senders died with it; the restarted node's senders send from then on.
            return;
        }
        let wait = last || self.rng.chance(self.cfg.wait);
        let from = self.nodes[node].senders[who];
        let seq = self.nodes[node]
            .next_seq
            .get(&(from, service))
            .copied()
            .unwrap_or(0)
            + 1;
        let msg = Msg {
            from,
            seq,
            origin: node,
            forged: false,
        };
        let here = self.nodes[node].hosted.get_mut(&service);
        if let Some(h) = here.filter(|h| !h.inbox.has_moved()) {
            // A local sender always waits for room; a number not queued is given back.
            match h.inbox.admit(msg, Admit::Wait) {
                Ok(_) => self.note_sent(node, service, (from, seq), node),
                Err(_) if last => {
                    return self.at(
                        2,
                        Event::Send {
                            node,
                            who,
                            service,
                            last,
                        },
                    );
                }
                Err(_) => return,
            }
        } else {
            let at = self.nodes[node]
                .directory
                .get(&service)
                .map_or(0, |(n, _)| *n);
            let mode = if wait { Mode::Wait } else { Mode::Tell };
            self.note_sent(node, service, (from, seq), at);
            if at == node {
                // Stale directory: the service just left; its tombstone hands it on.
                self.not_here(node, service, msg, mode);
            } else {
                self.net(
                    node,
                    at,
                    Net::Deliver {
                        to: service,
                        msg,
                        mode,
                    },
                );
            }
        }
        self.nodes[node].next_seq.insert((from, service), seq);
        self.sent.entry((service, from)).or_default().insert(seq);
        self.report.sent += 1;
        if last {
            self.last.insert((service, from), seq);
        }
    }

    fn handle(&mut self, node: usize, service: ServiceId) {
        let seed = self.report.seed;
        let Some(h) = self.nodes[node].hosted.get_mut(&service) else {
            return;
        };
        if !matches!(h.phase, Phase::Running) || h.inbox.is_gated() {
            return;
        }
        let (msg, _) = h.inbox.pop();
        let Some(msg) = msg else {
            return;
        };
        // Faults stop before the liveness probe: a last message is never the one that panics.
        let panics = self.now < self.faults_end && self.rng.chance(self.cfg.panic);
        let Some(h) = self.nodes[node].hosted.get_mut(&service) else {
            return;
        };
        assert!(
            !msg.forged || self.dead.contains(&msg.from),
            "seed {seed}: {service} handled a message the rogue made up in {}'s name",
            msg.from
        );
        if !panics {
            h.log.push((msg.from, msg.seq));
        }
        let more = !h.inbox.is_empty();
        // The marks go to the senders' nodes at once (the node sends them every 20 ms).
        for (from, seq, _) in h.inbox.take_handled() {
            match self.nodes.iter().position(|n| n.senders.contains(&from)) {
                Some(at) if at == node => {
                    if let Some(l) = self.nodes[node].ledgers.get_mut(&service) {
                        l.settle(from, seq);
                    }
                }
                Some(at) => self.net(
                    node,
                    at,
                    Net::Handled {
                        to: service,
                        from,
                        seq,
                    },
                ),
                None => {}
            }
        }
        if panics {
            // As the node's runner does: the message in hand fails to its sender
            // (`ServicePanicked`), the state restarts, the next message is taken.
            self.report.panicked += 1;
            self.refuse(node, service, &msg);
            if more {
                self.at(1, Event::Handle { node, service });
            }
            return;
        }
        let key = (service, msg.from);
        // In order, once: a refused number may be skipped here before its report reaches the
        // sender's node, so the numbers between are checked at the end.
        let prev = self
            .handled
            .get(&key)
            .and_then(|v| v.last())
            .copied()
            .unwrap_or(0);
        assert!(
            msg.seq > prev,
            "seed {seed}: {service} handled #{} of {} after #{prev}",
            msg.seq,
            msg.from
        );
        self.handled.entry(key).or_default().push(msg.seq);
        self.report.handled += 1;
        if more {
            self.at(1, Event::Handle { node, service });
        }
    }

    fn run(mut self) -> Result<DataPlaneReport, String> {
        let mut steps = 0u64;
        while let Some(Reverse((t, _, idx))) = self.queue.pop() {
            self.now = t;
            steps += 1;
            if steps > 5_000_000 {
                return Err(format!("seed {}: no quiescence", self.report.seed));
            }
            let Some(ev) = self.events[idx].take() else {
                continue;
            };
            match ev {
                Event::Net { to, from, msg, inc } if from == self.nodes.len() => {
                    // From the rogue.
                    let t = &self.nodes[to];
                    if !t.up || t.inc != inc.1 {
                        continue;
                    }
                    self.report.lies += 1;
                    if self.believed(to, from, &msg) {
                        if lie_about(&msg).is_some_and(|s| self.dead.contains(&s)) {
                            // Its node crashed since: nobody could vouch, and the first to
                            // speak for a sender nobody knows is believed. Its sender is dead
                            // (nothing of it is left to silence).
                            self.report.lies_about_the_dead += 1;
                        }
                        // Taken: the checks below show the harm.
                        self.on_net(to, from, msg);
                    } else {
                        self.report.lies_refused += 1;
                    }
                }
                Event::Net { to, from, msg, inc } => {
                    let (f, t) = (&self.nodes[from], &self.nodes[to]);
                    if !t.up || t.inc != inc.1 || f.inc != inc.0 {
                        // Lost with a crashed node's links.
                        match msg {
                            Net::Refused { to, from, seq, .. } => {
                                self.refusals_lost.insert((to, from, seq));
                            }
                            // The window stays (it counts against the senders' bound).
                            Net::Closed { .. } => self.report.closes_lost += 1,
                            _ => {}
                        }
                        continue;
                    }
                    let service = match &msg {
                        Net::Deliver { to: s, .. }
                        | Net::Skip { to: s, .. }
                        | Net::Commit { service: s, .. } => Some(*s),
                        _ => None,
                    };
                    if !self.believed(to, from, &msg) {
                        self.report.honest_refused += 1;
                        continue;
                    }
                    self.on_net(to, from, msg);
                    if let Some(s) = service {
                        self.at(
                            1,
                            Event::Handle {
                                node: to,
                                service: s,
                            },
                        );
                    }
                }
                Event::Send {
                    node,
                    who,
                    service,
                    last,
                } => {
                    self.send(node, who, service, last);
                    let (d, host) = (1 + self.rng.below(3), self.host_of(service));
                    self.at(
                        d,
                        Event::Handle {
                            node: host,
                            service,
                        },
                    );
                }
                Event::Handle { node, service } => self.handle(node, service),
                Event::Migrate => self.migrate(),
                Event::Lie => self.lie(),
                Event::Stop { node } => self.stop_sender(node),
                Event::Crash { node } => self.crash(node),
                Event::Lost { at, lost, at_inc } => {
                    if self.nodes[at].inc == at_inc {
                        self.lost(at, lost);
                    }
                }
                Event::Restart { node } => self.restart(node),
                Event::Gossip { node } => self.gossip(node),
                Event::Route {
                    node,
                    gap,
                    tries,
                    inc,
                    skip,
                } => match (self.nodes[node].inc == inc, skip) {
                    (true, false) => self.route_gap(node, gap, tries),
                    (true, true) => self.route_skip(node, gap, tries),
                    (false, _) => {}
                },
            }
        }
        self.report.events = steps;
        self.report.windows_retired = self.windows_retired()?;
        self.check()?;
        Ok(self.report)
    }

    /// Stopped senders' windows gone by the end: every stopped sender that told a service
    /// must have no window left there, unless a close was lost (then at most that many stay).
    fn windows_retired(&self) -> Result<u64, String> {
        let seed = self.report.seed;
        let (mut gone, mut left) = (0u64, Vec::new());
        for n in &self.nodes {
            let from = n.senders[1];
            for ((f, to), _) in n.next_seq.iter().filter(|((f, _), _)| *f == from) {
                let host = &self.nodes[self.host_of(*to)];
                let Some(h) = host.hosted.get(to) else {
                    continue;
                };
                // A window that passed any number expects more than 1; a retired one is gone.
                if h.inbox.watermark(*f) == 1 {
                    gone += 1;
                } else {
                    left.push((*to, *f, h.inbox.watermark(*f)));
                }
            }
        }
        if left.len() as u64 > self.report.closes_lost {
            return Err(format!(
                "seed {seed}: stopped senders' windows left (service, sender, watermark): {left:?}, with {} closes lost",
                self.report.closes_lost
            ));
        }
        Ok(gone)
    }

    fn host_of(&self, service: ServiceId) -> usize {
        (0..self.nodes.len())
            .find(|n| self.nodes[*n].hosted.contains_key(&service))
            .unwrap_or(0)
    }

    fn check(&mut self) -> Result<(), String> {
        let seed = self.report.seed;

        for (key, sent) in &self.sent {
            let handled: BTreeSet<u64> = self
                .handled
                .get(key)
                .map(|v| v.iter().copied().collect())
                .unwrap_or_default();
            let empty = BTreeSet::new();
            let reported = self.reported.get(key).unwrap_or(&empty);
            let declared = self.declared.get(key).unwrap_or(&empty);
            if let Some(both) = handled.intersection(reported).next() {
                return Err(format!("seed {seed}: {key:?} #{both} handled and reported"));
            }
            self.report.declared_handled += handled.intersection(declared).count() as u64;
            let accounted =
                |s: &u64| handled.contains(s) || reported.contains(s) || declared.contains(s);
            if self.dead.contains(&key.1) {
                // Its sender died with its node: nobody is left to tell.
                self.report.lost_with_sender +=
                    sent.iter().filter(|s| !accounted(s)).count() as u64;
                continue;
            }
            // A refusal report lost with a crashed node, for a number the receiver's window
            // passed: its sender's ledger settled it with the next handled mark
            // (docs/failures.md).
            let unreported = |s: &&u64| self.refusals_lost.contains(&(key.0, key.1, **s));
            self.report.refusals_lost += sent
                .iter()
                .filter(|s| !accounted(s))
                .filter(unreported)
                .count() as u64;
            if let Some(missing) = sent.iter().find(|s| !accounted(s) && !unreported(s)) {
                let held: Vec<_> = self
                    .nodes
                    .iter()
                    .flat_map(|n| n.hosted.get(&key.0))
                    .map(|h| {
                        (
                            h.inbox.watermark(key.1),
                            h.inbox.early(),
                            h.inbox.is_gated(),
                        )
                    })
                    .collect();
                return Err(format!(
                    "seed {seed}: {key:?} #{missing} neither handled nor reported ({} sent, {} handled, {} reported; live inbox (watermark, early, gated): {held:?}; skips lost {})",
                    sent.len(), handled.len(), reported.len(), self.report.skips_lost
                ));
            }
            if let Some(last) = self
                .last
                .get(key)
                .filter(|_| !self.stopped.contains(&key.0))
            {
                if !handled.contains(last) {
                    return Err(format!("seed {seed}: {key:?} last message #{last} not handled: the channel is dead"));
                }
            }
        }
        // Every ledger settled: each number sent was confirmed taken or reported refused.
        for (i, n) in self.nodes.iter().enumerate() {
            for (service, l) in &n.ledgers {
                if !l.is_empty() {
                    return Err(format!(
                        "seed {seed}: node {i}'s ledger for {service} keeps {} messages outstanding",
                        l.outstanding()
                    ));
                }
            }
        }
        let live: usize = self
            .services
            .iter()
            .filter(|s| self.nodes.iter().any(|n| n.hosted.contains_key(s)))
            .count();
        if live + self.stopped.len() != self.services.len() {
            return Err(format!("seed {seed}: a service runs nowhere"));
        }
        if self.report.honest_refused > 0 {
            return Err(format!(
                "seed {seed}: {} honest claims refused by the speaker and custody checks",
                self.report.honest_refused
            ));
        }
        if self.report.lies_refused + self.report.lies_about_the_dead != self.report.lies {
            return Err(format!(
                "seed {seed}: {} of {} lies about live senders believed",
                self.report.lies - self.report.lies_refused - self.report.lies_about_the_dead,
                self.report.lies
            ));
        }
        Ok(())
    }
}

/// The sender a lie names.
fn lie_about(msg: &Net) -> Option<ServiceId> {
    match msg {
        Net::Deliver { msg, .. } => Some(msg.from),
        Net::Skip { from, .. } | Net::Closed { from, .. } | Net::Gap { from, .. } => Some(*from),
        _ => None,
    }
}

/// One run from `seed`.
pub fn run(seed: u64, cfg: &DataPlaneConfig) -> Result<DataPlaneReport, String> {
    assert!(cfg.nodes >= 2 && cfg.services >= 1 && cfg.capacity >= 1);
    let names: Vec<NodeName> = (0..cfg.nodes)
        .map(|i| NodeName::new(&format!("n{i}")))
        .collect();
    let services: Vec<ServiceId> = (0..cfg.services as u64)
        .map(|i| ServiceId::from_parts(1000, i + 1))
        .collect();
    let mut nodes: Vec<Node> = (0..cfg.nodes)
        .map(|i| Node {
            up: true,
            inc: 0,
            down: BTreeSet::new(),
            gossip: BTreeMap::new(),
            hosted: BTreeMap::new(),
            tombs: Tombstones::new(cfg.tombstones_max),
            directory: BTreeMap::new(),
            senders: [
                ServiceId::from_parts(prefix_for(&names[i], 0), 1),
                ServiceId::from_parts(prefix_for(&names[i], 0), 2),
            ],
            next_seq: BTreeMap::new(),
            ledgers: BTreeMap::new(),
            marks_waiting: Default::default(),
            speakers: Speakers::new(names[i].clone()),
            custody: Custody::new(),
        })
        .collect();
    for (k, s) in services.iter().enumerate() {
        let home = k % cfg.nodes;
        nodes[home].hosted.insert(
            *s,
            Hosted {
                inbox: Inbox::new(*s, cfg.capacity),
                log: Vec::new(),
                epoch: 0,
                phase: Phase::Running,
            },
        );
        for n in nodes.iter_mut() {
            n.directory.insert(*s, (home, 0));
        }
    }
    // The rogue: a member with a name and a certificate, no services and no senders.
    let mut names = names;
    names.push(NodeName::new("rogue"));
    let mut sim = Sim {
        cfg: cfg.clone(),
        rng: Rng(seed),
        now: 0,
        order: 0,
        queue: BinaryHeap::new(),
        events: Vec::new(),
        nodes,
        names,
        services: services.clone(),
        sent: BTreeMap::new(),
        handled: BTreeMap::new(),
        reported: BTreeMap::new(),
        declared: BTreeMap::new(),
        dead: BTreeSet::new(),
        stopped: BTreeSet::new(),
        refusals_lost: BTreeSet::new(),
        last: BTreeMap::new(),
        report: DataPlaneReport {
            seed,
            ..Default::default()
        },
        migrating: false,
        attempts: 0,
        data_due: BTreeMap::new(),
        faults_end: cfg.msgs_per_sender * 2,
    };
    let span = cfg.msgs_per_sender * 2;
    for node in 0..cfg.nodes {
        for s in &services {
            for _ in 0..cfg.msgs_per_sender {
                let t = sim.rng.below(span);
                sim.at(
                    t,
                    Event::Send {
                        node,
                        who: 0,
                        service: *s,
                        last: false,
                    },
                );
            }
            // The second sender: half as many, in the first half, then it stops.
            for _ in 0..cfg.msgs_per_sender / 2 {
                let t = sim.rng.below(span / 2);
                sim.at(
                    t,
                    Event::Send {
                        node,
                        who: 1,
                        service: *s,
                        last: false,
                    },
                );
            }
            // The liveness probe: once the faults are over.
            sim.at(
                span + 4 * cfg.delay_max + 50,
                Event::Send {
                    node,
                    who: 0,
                    service: *s,
                    last: true,
                },
            );
        }
        sim.at(span / 2, Event::Stop { node });
    }
    for _ in 0..cfg.migrations {
        let t = sim.rng.below(span);
        sim.at(t, Event::Migrate);
    }
    for _ in 0..cfg.lies {
        let t = sim.rng.below(span);
        sim.at(t, Event::Lie);
    }
    // Gossip rounds until the liveness probe (then the run goes quiet).
    let probe = span + 4 * cfg.delay_max + 50;
    for t in (5..probe).step_by(10) {
        for node in 0..cfg.nodes {
            sim.at(t, Event::Gossip { node });
        }
    }
    // Crashes early enough that the restart is over before the liveness probe.
    for _ in 0..cfg.crashes {
        let t = sim.rng.below(span);
        let node = sim.rng.below(cfg.nodes as u64) as usize;
        sim.at(t, Event::Crash { node });
    }
    sim.run()
}
