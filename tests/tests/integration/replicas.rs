//! Replicated services (`Service::REPLICAS`): checkpoints to a standby on another node, and
//! senders confirmed only by an acknowledged checkpoint (DESIGN guarantee 13, in progress:
//! failover is not built yet).

use std::time::Duration;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tern::{
    Ctx, MigrateOptions, NodeName, ReplyTo, Service, ServiceId, STANDBY_SERVICES_PER_PEER_MAX,
};
use tern_harness::rogue::{Rogue, RogueFrame};
use tern_harness::{block_on, wait_for};
use tern_proto::replica::ReplicaMsg;
use tern_proto::wire::Frame;

use crate::common::{killable_cluster, SECS_10};

/// A replicated counter: it keeps the numbers it handled.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Kept {
    pub seen: Vec<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum KeptMsg {
    Item(u64),
    Seen(ReplyTo<Vec<u64>>),
}

impl Service for Kept {
    type Msg = KeptMsg;
    const KIND: &'static str = "test-kept";
    const VERSION: u32 = 1;
    const REPLICAS: u8 = 1;

    async fn handle(&mut self, msg: KeptMsg, ctx: &mut Ctx<Self>) {
        match msg {
            KeptMsg::Item(i) => self.seen.push(i),
            KeptMsg::Seen(r) => {
                let _ = ctx.reply(r, self.seen.clone());
            }
        }
    }
}

/// Three killable nodes with [`Kept`], one spawned on `a`, and its standby once it holds
/// the first checkpoint.
fn kept_on_a() -> Result<(tern_harness::Cluster, tern::ServiceRef<Kept>, NodeName)> {
    kept_on_a_of(killable_cluster(&["a", "b", "c"])?)
}

/// [`kept_on_a`] on the cluster `c` (nodes `a`, `b` and `c`).
fn kept_on_a_of(
    c: tern_harness::Cluster,
) -> Result<(tern_harness::Cluster, tern::ServiceRef<Kept>, NodeName)> {
    for n in c.nodes() {
        n.register::<Kept>();
    }
    c.wait_members(SECS_10)?;
    let svc = c.node("a").spawn(Kept::default())?;
    let standby = standby_on_a(&c, svc.id())?;
    Ok((c, svc, standby))
}

/// The standby of replicated service `id` on node `a`, once it holds the first checkpoint.
fn standby_on_a(c: &tern_harness::Cluster, id: ServiceId) -> Result<NodeName> {
    wait_for(SECS_10, "a standby holds the first checkpoint", || {
        c.node("a").replica(id).is_some_and(|r| r.acked >= 1)
    })?;
    c.node("a")
        .replica(id)
        .and_then(|r| r.standby)
        .ok_or_else(|| anyhow::anyhow!("no standby"))
}

/// The node of the three that is neither `a` nor the standby, once it knows the standby from
/// the primary's gossip (only the standby it knows of may take the service over), and a handle
/// there.
fn sender_knowing_standby(
    c: &tern_harness::Cluster,
    svc: &tern::ServiceRef<Kept>,
    standby: &NodeName,
) -> Result<(&'static str, tern::ServiceRef<Kept>)> {
    let other = if standby.as_str() == "b" { "c" } else { "b" };
    standby_known(c, other, "a", svc.id(), standby)?;
    Ok((other, c.node(other).resolve::<Kept>(svc.addr())?))
}

/// Waits until node `observer` knows, from `host`'s own gossip, that `standby` stands by for
/// service `id` (only that standby's takeover is believed there).
fn standby_known(
    c: &tern_harness::Cluster,
    observer: &str,
    host: &str,
    id: ServiceId,
    standby: &NodeName,
) -> Result<()> {
    wait_for(SECS_10, "the standby is known to the sender's node", || {
        c.node(observer).members().iter().any(|m| {
            m.info.name.as_str() == host
                && m.info
                    .standbys
                    .iter()
                    .any(|(s, _, n)| *s == id && n == standby)
        })
    })
}

/// Tells `items` from `from`, each once there is room.
fn tell_items<S: Service<Msg = KeptMsg>>(
    from: &tern::ServiceRef<S>,
    items: std::ops::RangeInclusive<u64>,
) -> Result<()> {
    for i in items {
        block_on(from.tell_wait(KeptMsg::Item(i)))?;
    }
    Ok(())
}

/// Tells `items` from `from` (on node `sender`) after a takeover: the whole history is 1 to
/// the last of them, in order, everything is confirmed, and no loss was reported.
fn goes_on_whole(
    c: &tern_harness::Cluster,
    sender: &str,
    from: &tern::ServiceRef<Kept>,
    items: std::ops::RangeInclusive<u64>,
) -> Result<()> {
    let last = *items.end();
    tell_items(from, items)?;
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=last).collect::<Vec<_>>(), "history: {seen:?}");
    wait_for(Duration::from_secs(20), "every message confirmed", || {
        from.unconfirmed() == 0
    })?;
    ensure!(
        c.node(sender).losses().is_empty(),
        "losses reported: {:?}",
        c.node(sender).losses()
    );
    Ok(())
}

#[test]
fn a_replicated_service_with_no_node_to_stand_by_runs_and_confirms_as_any_other() -> Result<()> {
    let c = killable_cluster(&["solo"])?;
    c.node("solo").register::<Kept>();
    let svc = c.node("solo").spawn(Kept::default())?;
    for i in 1..=10 {
        block_on(svc.tell_wait(KeptMsg::Item(i)))?;
    }
    let seen = block_on(svc.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=10).collect::<Vec<_>>(), "handled {seen:?}");
    wait_for(SECS_10, "confirmed without a standby", || {
        svc.unconfirmed() == 0
    })?;
    let info = c.node("solo").replica(svc.id()).expect("replicated");
    ensure!(info.standby.is_none() && info.acked == 0, "{info:?}");
    let stats = c.node("solo").stats();
    ensure!(stats.checkpoints_sent == 0, "{stats:?}");
    c.shutdown();
    Ok(())
}

/// Two nodes: the other one has the kind, but with no third node to witness, a standby
/// could never take over (a claim needs two of three votes), so none is chosen and the service
/// runs as any other; it does not stop when the other node goes.
#[test]
fn with_two_nodes_a_replicated_service_has_no_standby_and_runs_on_when_the_other_goes() -> Result<()>
{
    let c = killable_cluster(&["a", "b"])?;
    for n in c.nodes() {
        n.register::<Kept>();
    }
    c.wait_members(SECS_10)?;
    let svc = c.node("a").spawn(Kept::default())?;
    let from = c.node("b").resolve::<Kept>(svc.addr())?;
    tell_items(&from, 1..=10)?;
    wait_for(SECS_10, "confirmed without a standby", || {
        from.unconfirmed() == 0
    })?;
    let info = c.node("a").replica(svc.id()).expect("replicated");
    ensure!(info.standby.is_none() && info.serving, "{info:?}");
    ensure!(
        c.node("a").stats().checkpoints_sent == 0,
        "a checkpoint went"
    );
    c.kill("b");
    for i in 11..=20 {
        block_on(svc.tell_wait(KeptMsg::Item(i)))?;
    }
    let seen = block_on(svc.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=20).collect::<Vec<_>>(), "handled {seen:?}");
    ensure!(c.node("a").stats().replica_pauses == 0, "it paused");
    c.shutdown();
    Ok(())
}

#[test]
fn a_replicated_service_checkpoints_to_a_standby_and_its_senders_wait_for_the_acknowledgement(
) -> Result<()> {
    // The first checkpoint goes as soon as a standby that has the kind is known.
    let (c, svc, standby) = kept_on_a()?;
    let id = svc.id();
    let info = c.node("a").replica(id).expect("replicated");
    ensure!(standby.as_str() != "a", "the standby is another node");
    ensure!(info.voters.len() == 3, "voters: {:?}", info.voters);
    let held = c.node(standby.as_str()).standby_checkpoints();
    ensure!(
        held.iter()
            .any(|h| h.service == id && h.primary.as_str() == "a"),
        "{standby} holds {held:?}"
    );

    // Messages from the node that is not the standby, confirmed once a checkpoint covers them.
    let other = if standby.as_str() == "b" { "c" } else { "b" };
    let from = c.node(other).resolve::<Kept>(svc.addr())?;
    tell_items(&from, 1..=100)?;
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=100).collect::<Vec<_>>(), "handled {seen:?}");
    wait_for(SECS_10, "every message confirmed", || {
        from.unconfirmed() == 0
    })?;
    let newest = |node: &str| {
        c.node(node)
            .standby_checkpoints()
            .iter()
            .find(|h| h.service == id)
            .map(|h| h.no)
    };
    let before = newest(standby.as_str()).unwrap_or(0);
    ensure!(before >= 2, "checkpoints held: {before}");

    // With the standby cut off until the link is lost (these nodes notice within 600 ms,
    // before a lease of 1 s runs out), the primary wins the next epoch from the witness and
    // goes on. With only two nodes up it has no standby (no witness for one), so it runs
    // unprotected and confirms its senders from its mailbox.
    c.cut("a", standby.as_str());
    tell_items(&from, 101..=110)?;
    wait_for(
        Duration::from_secs(20),
        "gone on at the next epoch, and confirmed",
        || c.node("a").stats().replica_continued == 1 && from.unconfirmed() == 0,
    )?;
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=110).collect::<Vec<_>>(), "handled {seen:?}");
    // Healed, the old standby's claim to the same epoch loses and it lets its checkpoint go;
    // the primary chooses a standby again.
    c.heal("a", standby.as_str());
    c.wait_connected(SECS_10)?;
    wait_for(
        Duration::from_secs(20),
        "the old checkpoint let go, a new one held",
        || {
            !c.node(standby.as_str())
                .standby_checkpoints()
                .iter()
                .any(|h| h.service == id && h.epoch == 0)
                && c.node("a")
                    .replica(id)
                    .is_some_and(|r| r.standby.is_some() && r.acked >= 1)
        },
    )?;
    ensure!(
        c.node(standby.as_str()).replica(id).is_none(),
        "the old standby took over"
    );
    let stats = c.node("a").stats();
    ensure!(stats.checkpoints_acked >= 3, "{stats:?}");
    // Traffic still flows.
    block_on(from.tell_wait(KeptMsg::Item(111)))?;
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=111).collect::<Vec<_>>(), "handled {seen:?}");

    // Moved to its first standby's node, it runs there with another standby, and the node it
    // left is no longer its primary.
    block_on(svc.migrate(standby.clone(), MigrateOptions::default()))?;
    wait_for(SECS_10, "a checkpoint acknowledged after the move", || {
        c.node(standby.as_str())
            .replica(id)
            .is_some_and(|r| r.acked >= 1 && r.standby.as_ref() != Some(&standby))
    })?;
    ensure!(c.node("a").replica(id).is_none(), "a still runs it");
    wait_for(SECS_10, "the checkpoints from a let go", || {
        c.nodes().iter().all(|n| {
            !n.standby_checkpoints()
                .iter()
                .any(|h| h.service == id && h.primary.as_str() == "a")
        })
    })?;
    tell_items(&from, 112..=120)?;
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=120).collect::<Vec<_>>(), "handled {seen:?}");
    wait_for(SECS_10, "confirmed after the move", || {
        from.unconfirmed() == 0
    })?;
    c.shutdown();
    Ok(())
}

/// A replicated service that logs, in this test process, which node handled each item and
/// when: the test can tell whether two copies ever handled messages at the same time.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Logged {
    pub seen: Vec<u64>,
}

/// (service, node, item, when) for every item any copy of a [`Logged`] handled.
type HandledLog = Vec<(ServiceId, String, u64, std::time::Instant)>;
static HANDLED: std::sync::Mutex<HandledLog> = std::sync::Mutex::new(Vec::new());

impl Service for Logged {
    type Msg = KeptMsg;
    const KIND: &'static str = "test-logged";
    const VERSION: u32 = 1;
    const REPLICAS: u8 = 1;

    async fn handle(&mut self, msg: KeptMsg, ctx: &mut Ctx<Self>) {
        match msg {
            KeptMsg::Item(i) => {
                self.seen.push(i);
                HANDLED.lock().unwrap_or_else(|p| p.into_inner()).push((
                    ctx.id(),
                    ctx.node_name().to_string(),
                    i,
                    std::time::Instant::now(),
                ));
            }
            KeptMsg::Seen(r) => {
                let _ = ctx.reply(r, self.seen.clone());
            }
        }
    }
}

/// When node `node` first and last handled an item of `id`.
fn handled_span(id: ServiceId, node: &str) -> Option<(std::time::Instant, std::time::Instant)> {
    let log = HANDLED.lock().unwrap_or_else(|p| p.into_inner());
    let times: Vec<std::time::Instant> = log
        .iter()
        .filter(|(s, n, _, _)| *s == id && n == node)
        .map(|(_, _, _, t)| *t)
        .collect();
    Some((*times.iter().min()?, *times.iter().max()?))
}

/// How many items node `node` handled of `id`.
fn handled_count(id: ServiceId, node: &str) -> usize {
    HANDLED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter(|(s, n, _, _)| *s == id && n == node)
        .count()
}

/// Four nodes that notice a lost link only after 10 s: a cut shorter than that leaves the
/// links up, and only the lease tells the primary it is cut off. The service runs on `a`,
/// its standby is `b`, the witness `c`, and `d` sends.
fn partition_cluster() -> Result<tern_harness::Cluster> {
    let c = ["a", "b", "c", "d"]
        .iter()
        .fold(tern_harness::Cluster::builder(), |b, n| b.node(n, &[]))
        .limits(tern::Limits {
            idle_timeout_ms: 10_000,
            keep_alive_ms: 1_000,
            ..tern::Limits::default()
        })
        .faults(0x7e57)
        .setup(crate::common::register_test_kinds)
        .start()?;
    c.wait_connected(SECS_10)?;
    for n in c.nodes() {
        n.register::<Logged>();
    }
    c.wait_members(SECS_10)?;
    Ok(c)
}

/// How the primary `a` is cut off from its standby `b` and the witness `c`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Cut {
    /// Nothing passes either way.
    Both,
    /// What `a` sends is lost (renewals, claims); it hears the others.
    FromPrimary,
    /// What `b` and `c` send to `a` is lost (grants, votes); they hear `a`.
    ToPrimary,
}

fn cut_primary(c: &tern_harness::Cluster, how: Cut, heal: bool) {
    for other in ["b", "c"] {
        let (a_addr, o_addr) = (c.node("a").local_addr(), c.node(other).local_addr());
        match (how, heal) {
            (Cut::Both, false) => c.cut("a", other),
            (Cut::Both, true) => c.heal("a", other),
            (Cut::FromPrimary, false) => c.faults("a").cut(o_addr),
            (Cut::FromPrimary, true) => c.faults("a").heal(o_addr),
            (Cut::ToPrimary, false) => c.faults(other).cut(a_addr),
            (Cut::ToPrimary, true) => c.faults(other).heal(a_addr),
        }
    }
}

/// The primary cut off from its standby and the witness while a sender keeps telling: it
/// stops handling when its lease runs out. Where the standby cannot hear it (`Both`,
/// `FromPrimary`), the standby takes the service over with the witness's vote, strictly after
/// the primary's last message handled, and the sender follows it; where the standby still
/// hears it (`ToPrimary`), nobody takes over, the messages wait, and the primary goes on once
/// the grants (or the votes it asked for) reach it. Either way every message is handled, once, in order
/// in the surviving history, and traffic goes on after the heal.
fn primary_cut_off(how: Cut) -> Result<()> {
    let c = partition_cluster()?;
    let svc = c.node("a").spawn(Logged::default())?;
    let id = svc.id();
    wait_for(
        SECS_10,
        "the standby holds a checkpoint, and d knows it",
        || {
            c.node("a")
                .replica(id)
                .is_some_and(|r| r.acked >= 1 && r.serving && r.voters.len() == 3)
                && c.node("d").members().iter().any(|m| {
                    m.info
                        .standbys
                        .iter()
                        .any(|(s, _, n)| *s == id && n.as_str() == "b")
                })
        },
    )?;
    let info = c.node("a").replica(id).expect("replicated");
    ensure!(
        info.standby.as_ref().map(|s| s.as_str()) == Some("b")
            && info.voters.iter().map(|v| v.as_str()).collect::<Vec<_>>() == ["a", "b", "c"],
        "{info:?}"
    );
    let from = c.node("d").resolve::<Logged>(svc.addr())?;
    // A second sender on the primary's own node: its messages reach the primary whatever the
    // cut, so a copy that handled without its lease would show.
    let local = c.node("a").resolve::<Logged>(svc.addr())?;
    const LOCAL: u64 = 1_000_000;
    let mut next = 1u64;
    let mut next_local = LOCAL;
    for _ in 0..20 {
        block_on(from.tell_wait(KeptMsg::Item(next)))?;
        next += 1;
    }
    cut_primary(&c, how, false);
    // Both senders go on telling while the primary is cut off.
    let mut tell = |next: &mut u64| {
        if from.tell(KeptMsg::Item(*next)).is_ok() {
            *next += 1;
        }
        if local.tell(KeptMsg::Item(next_local)).is_ok() {
            next_local += 1;
        }
    };
    wait_for(SECS_10, "the lease ran out", || {
        tell(&mut next);
        c.node("a").replica(id).is_some_and(|r| !r.serving)
    })?;
    wait_for(SECS_10, "the primary pauses", || {
        tell(&mut next);
        c.node("a").stats().replica_pauses >= 1
    })?;
    if how == Cut::ToPrimary {
        // The standby still hears renewals: nobody takes over, and what is told waits.
        let queued = || {
            c.node("a")
                .services()
                .iter()
                .find(|s| s.addr.id == id)
                .map_or(0, |s| s.mailbox_depth)
        };
        let before = next;
        wait_for(
            SECS_10,
            "ten messages told during the cut wait in the mailbox",
            || {
                if next < before + 10 {
                    tell(&mut next);
                }
                queued() >= 10
            },
        )?;
        ensure!(c.node("b").replica(id).is_none(), "the standby took over");
        cut_primary(&c, how, true);
        wait_for(Duration::from_secs(20), "the primary goes on", || {
            c.node("a")
                .replica(id)
                .is_some_and(|r| r.serving && queued() == 0)
        })?;
        // (It goes on under a renewed lease, or at the next epoch if the votes it asked for
        // during the cut came first: either is one copy.)
        ensure!(c.node("b").replica(id).is_none(), "the standby took over");
    } else {
        wait_for(Duration::from_secs(20), "the standby takes over", || {
            tell(&mut next);
            c.node("b").replica(id).is_some()
        })?;
        wait_for(SECS_10, "the sender follows", || {
            tell(&mut next);
            from.location().as_str() == "b"
        })?;
        // Both senders go on while the new primary handles: the one on `a` still reaches the
        // old copy, which must handle none of it.
        wait_for(SECS_10, "the new primary handles twenty items", || {
            tell(&mut next);
            handled_count(id, "b") >= 20
        })?;
        let (_, a_last) = handled_span(id, "a").expect("a handled the first twenty");
        let (b_first, _) = handled_span(id, "b").expect("b handled");
        ensure!(
            a_last < b_first,
            "two copies: a handled an item {:?} after b's first",
            a_last - b_first
        );
        // The old primary hears of the takeover (at once when it can hear the standby, else
        // once healed) and retires, handing on what it held.
        cut_primary(&c, how, true);
        wait_for(Duration::from_secs(20), "the old primary retires", || {
            c.node("a").replica(id).is_none()
        })?;
        ensure!(
            c.node("b").stats().takeovers == 1,
            "{:?}",
            c.node("b").stats()
        );
    }
    // Traffic goes on from both; then each sender's messages are in the history once, in
    // order.
    block_on(from.tell_wait(KeptMsg::Item(next)))?;
    block_on(local.tell_wait(KeptMsg::Item(next_local)))?;
    let mut seen = Vec::new();
    wait_for(
        Duration::from_secs(20),
        "both senders' last messages handled",
        || {
            seen = block_on(from.ask(KeptMsg::Seen, SECS_10)).unwrap_or_default();
            seen.contains(&next) && seen.contains(&next_local)
        },
    )?;
    let mine: Vec<u64> = seen.iter().copied().filter(|i| *i < LOCAL).collect();
    let theirs: Vec<u64> = seen.iter().copied().filter(|i| *i >= LOCAL).collect();
    ensure!(
        mine == (1..=next).collect::<Vec<_>>(),
        "{how:?}: d's history {mine:?}"
    );
    ensure!(
        theirs == (LOCAL..=next_local).collect::<Vec<_>>(),
        "{how:?}: a's local sender's history {theirs:?}"
    );
    wait_for(Duration::from_secs(20), "everything confirmed", || {
        from.unconfirmed() == 0 && local.unconfirmed() == 0
    })?;
    ensure!(
        c.node("d").losses().is_empty(),
        "{:?}",
        c.node("d").losses()
    );
    ensure!(
        c.node("a").losses().is_empty(),
        "{:?}",
        c.node("a").losses()
    );
    c.shutdown();
    Ok(())
}

/// A move is the other way to a service's next epoch, and it runs no ballot: the household
/// splits into {a, d} and {b, c} just as the service's primary `a` is asked to move it to `d`.
/// The standby `b` and the witness `c` are a majority of its voters, so `b` takes the service
/// over at the next epoch; a move that committed anyway would run that same epoch on `d`, two
/// copies. The move must first fence `b` (the only node holding a checkpoint), cannot, and is
/// aborted, saying why; the service runs on `b` alone, the sender on `d` follows it after the
/// heal with nothing lost, duplicated or reordered, and it moves again once `b` can fence.
#[test]
fn a_move_that_cannot_fence_its_standby_is_aborted_and_never_runs_a_second_copy() -> Result<()> {
    let c = partition_cluster()?;
    let svc = c.node("a").spawn(Logged::default())?;
    let id = svc.id();
    wait_for(SECS_10, "the standby b holds a checkpoint", || {
        c.node("a").replica(id).is_some_and(|r| {
            r.acked >= 1 && r.serving && r.standby.as_ref().map(|s| s.as_str()) == Some("b")
        })
    })?;
    let from = c.node("d").resolve::<Logged>(svc.addr())?;
    let mut next = 1u64;
    for _ in 0..20 {
        block_on(from.tell_wait(KeptMsg::Item(next)))?;
        next += 1;
    }
    // Handled on `a`, in a checkpoint `b` acknowledged.
    wait_for(SECS_10, "the first twenty confirmed", || {
        from.unconfirmed() == 0
    })?;
    let split = [("a", "b"), ("a", "c"), ("d", "b"), ("d", "c")];
    for (x, y) in split {
        c.cut(x, y);
    }
    let moved = block_on(
        c.node("a")
            .migrate(id, NodeName::new("d"), MigrateOptions::default()),
    );
    let tell = |next: &mut u64| {
        if from.tell(KeptMsg::Item(*next)).is_ok() {
            *next += 1;
        }
    };
    wait_for(Duration::from_secs(20), "the standby takes over", || {
        tell(&mut next);
        c.node("b").replica(id).is_some()
    })?;
    ensure!(
        c.node("d").replica(id).is_none() && handled_count(id, "d") == 0,
        "two copies: b took the service over and the move ran it on d ({moved:?})"
    );
    let why = match moved {
        Err(tern::Error::NotMoved(report)) => {
            format!("{:?}", report.aborted().collect::<Vec<_>>())
        }
        other => anyhow::bail!("the move went, or failed otherwise: {other:?}"),
    };
    ensure!(
        why.contains("fenced") && why.contains("b did not let go"),
        "aborted for another reason: {why}"
    );
    for (x, y) in split {
        c.heal(x, y);
    }
    wait_for(Duration::from_secs(20), "the old primary retires", || {
        tell(&mut next);
        c.node("a").replica(id).is_none()
    })?;
    wait_for(SECS_10, "the sender follows", || {
        tell(&mut next);
        from.location().as_str() == "b"
    })?;
    // Once the standby can be fenced, the service moves.
    let moved = block_on(from.migrate("d", MigrateOptions::default()))?;
    ensure!(moved.epoch > 0, "{moved:?}");
    block_on(from.tell_wait(KeptMsg::Item(next)))?;
    let mut seen = Vec::new();
    wait_for(Duration::from_secs(20), "the last message handled", || {
        seen = block_on(from.ask(KeptMsg::Seen, SECS_10)).unwrap_or_default();
        seen.contains(&next)
    })?;
    ensure!(seen == (1..=next).collect::<Vec<_>>(), "history {seen:?}");
    let (_, a_last) = handled_span(id, "a").expect("a handled the first twenty");
    let (b_first, _) = handled_span(id, "b").expect("b handled");
    ensure!(a_last < b_first, "two copies: a handled after b's first");
    wait_for(Duration::from_secs(20), "everything confirmed", || {
        from.unconfirmed() == 0
    })?;
    ensure!(
        c.node("d").losses().is_empty(),
        "{:?}",
        c.node("d").losses()
    );
    c.shutdown();
    Ok(())
}

#[test]
fn a_primary_cut_off_both_ways_stops_before_its_standby_takes_over() -> Result<()> {
    primary_cut_off(Cut::Both)
}

#[test]
fn a_primary_whose_messages_are_lost_stops_before_its_standby_takes_over() -> Result<()> {
    primary_cut_off(Cut::FromPrimary)
}

#[test]
fn a_primary_that_hears_nothing_stops_and_goes_on_after_the_heal() -> Result<()> {
    primary_cut_off(Cut::ToPrimary)
}

#[test]
fn a_peer_can_neither_fill_a_standby_nor_checkpoint_a_service_it_does_not_run() -> Result<()> {
    let (c, honest, standby) = kept_on_a()?;
    let id = honest.id();
    let mallory = NodeName::new("mallory");
    let checkpoint = |service: ServiceId, epoch: u64| {
        Frame::Replica(ReplicaMsg::Checkpoint {
            service,
            kind: Kept::kind_key(),
            epoch,
            no: 1,
            voters: vec![mallory.clone(), standby.clone()],
            body: vec![0xc0],
        })
    };
    block_on(async {
        let mut rogue = Rogue::connect(&c, "mallory", standby.as_str()).await?;
        // The honest service's checkpoint, in mallory's name, at a newer epoch: refused (if
        // the standby's directory knows an older epoch, after waiting a lease for the word of
        // a move, as the new host of a move may checkpoint before the old one's word comes).
        rogue.send_ctrl(&checkpoint(id, 99)).await?;
        let refused = rogue
            .next_picked("the refusal of the newer epoch's checkpoint", |f| match f {
                RogueFrame::Replica(ReplicaMsg::Refused {
                    service, reason, ..
                }) if service == id => Some(reason),
                _ => None,
            })
            .await?;
        ensure!(refused.contains("not mallory"), "{refused}");
        // Made-up services, past what one peer may make a standby hold.
        for i in 0..(STANDBY_SERVICES_PER_PEER_MAX as u64 + 50) {
            rogue
                .send_ctrl(&checkpoint(ServiceId::from_parts(0xbad, i), 1))
                .await?;
        }
        rogue.barrier().await?;
        anyhow::Ok(())
    })?;
    let held = c.node(standby.as_str()).standby_checkpoints();
    let by_mallory = held
        .iter()
        .filter(|h| h.primary.as_str() == "mallory")
        .count();
    ensure!(
        by_mallory == STANDBY_SERVICES_PER_PEER_MAX,
        "mallory holds {by_mallory}"
    );
    ensure!(
        held.iter()
            .any(|h| h.service == id && h.primary.as_str() == "a" && h.epoch == 0),
        "the honest checkpoint stays"
    );
    // The honest service still checkpoints there, and its senders are confirmed.
    let acked = c.node("a").stats().checkpoints_acked;
    for i in 1..=20 {
        block_on(honest.tell_wait(KeptMsg::Item(i)))?;
    }
    wait_for(SECS_10, "confirmed", || honest.unconfirmed() == 0)?;
    ensure!(c.node("a").stats().checkpoints_acked > acked);
    let seen = block_on(honest.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=20).collect::<Vec<_>>(), "handled {seen:?}");
    c.shutdown();
    Ok(())
}

/// A checkpoint from a node that a standby's directory does not name, at a newer epoch than
/// the one it knows, waits there for the word of a move (a move's new host may checkpoint
/// before the old host's `Located` arrives); from a peer that never becomes the host it is
/// refused after `renew_ms`, never held, and the service checkpoints there as before.
#[test]
fn a_checkpoint_ahead_of_the_standbys_directory_waits_and_is_refused() -> Result<()> {
    let (c, svc, standby) = kept_on_a()?;
    let id = svc.id();
    // Moved once: every node's directory knows it at epoch 1 on `to`.
    let to = if standby.as_str() == "b" { "c" } else { "b" };
    block_on(svc.migrate(to, MigrateOptions::default()))?;
    let judge = if standby.as_str() == "a" { "b" } else { "a" };
    let judge = if judge == to { standby.as_str() } else { judge };
    wait_for(SECS_10, "the judge's directory knows the move", || {
        c.node(judge).location(id).is_some_and(|n| n.as_str() == to)
    })?;
    let parked = c.node(judge).stats().checkpoints_parked;
    block_on(async {
        let mut rogue = Rogue::connect(&c, "mallory", judge).await?;
        rogue
            .send_ctrl(&Frame::Replica(ReplicaMsg::Checkpoint {
                service: id,
                kind: Kept::kind_key(),
                epoch: 99,
                no: 1,
                voters: vec![NodeName::new("mallory"), NodeName::new(judge)],
                body: vec![0xc0],
            }))
            .await?;
        let refused = rogue
            .next_picked(
                "the refusal of a checkpoint ahead of the directory",
                |f| match f {
                    RogueFrame::Replica(ReplicaMsg::Refused {
                        service, reason, ..
                    }) if service == id => Some(reason),
                    _ => None,
                },
            )
            .await?;
        ensure!(
            refused.contains(&format!("runs on {to}, not mallory")),
            "{refused}"
        );
        anyhow::Ok(())
    })?;
    ensure!(
        c.node(judge).stats().checkpoints_parked == parked + 1,
        "it was refused without waiting"
    );
    ensure!(
        !c.node(judge)
            .standby_checkpoints()
            .iter()
            .any(|h| h.primary.as_str() == "mallory"),
        "mallory's checkpoint is held"
    );
    // The service goes on, checkpointed and confirmed.
    for i in 1..=10 {
        block_on(svc.tell_wait(KeptMsg::Item(i)))?;
    }
    wait_for(SECS_10, "confirmed", || svc.unconfirmed() == 0)?;
    let seen = block_on(svc.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=10).collect::<Vec<_>>(), "handled {seen:?}");
    c.shutdown();
    Ok(())
}

/// A peer that never held a checkpoint of a service claims its next epoch from the node that
/// runs it: refused (that node grants the next epoch only to a standby it sent checkpoints of
/// this epoch to), and the copy goes on; granting it would retire the copy and hand its queue
/// to the claimer. A claim far past the next epoch is voted on but retires nothing.
#[test]
fn a_peer_cannot_take_a_replicated_service_by_claiming_its_next_epoch() -> Result<()> {
    let (c, svc, _standby) = kept_on_a()?;
    let id = svc.id();
    block_on(async {
        let mut rogue = Rogue::connect(&c, "mallory", "a").await?;
        let claim = tern_proto::replica::Claim {
            service: id,
            epoch: 1,
            holder: NodeName::new("mallory"),
        };
        rogue
            .send_ctrl(&Frame::Replica(ReplicaMsg::Claim(claim.clone())))
            .await?;
        let vote = rogue
            .next_picked("the vote on mallory's claim", |f| match f {
                RogueFrame::Replica(ReplicaMsg::Vote { claim: c, vote }) if c == claim => {
                    Some(vote)
                }
                _ => None,
            })
            .await?;
        ensure!(
            matches!(vote, tern_proto::replica::Vote::No { .. }),
            "a voted {vote:?}"
        );
        // An epoch far past the next: a copy that is behind cannot tell a real successor from
        // a liar, so it votes (it may be the witness two real claimers need) but does not
        // retire on its vote.
        let far = tern_proto::replica::Claim { epoch: 50, ..claim };
        rogue
            .send_ctrl(&Frame::Replica(ReplicaMsg::Claim(far.clone())))
            .await?;
        rogue
            .next_picked("the vote on mallory's far claim", |f| match f {
                RogueFrame::Replica(ReplicaMsg::Vote { claim: c, vote }) if c == far => Some(vote),
                _ => None,
            })
            .await?;
        anyhow::Ok(())
    })?;
    let info = c.node("a").replica(id).expect("a still runs it");
    ensure!(info.serving, "{info:?}");
    for i in 1..=10 {
        block_on(svc.tell_wait(KeptMsg::Item(i)))?;
    }
    let seen = block_on(svc.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=10).collect::<Vec<_>>(), "handled {seen:?}");
    ensure!(
        svc.location().as_str() == "a",
        "it went to {}",
        svc.location()
    );
    c.shutdown();
    Ok(())
}

/// Held inside its handler until the test lets it go: what it is sent meanwhile stays
/// unconfirmed.
static GATE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(0);

/// A replicated service whose `Hold` waits at [`GATE`].
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Gated {
    pub seen: Vec<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum GatedMsg {
    Hold,
    Item(u64),
    Seen(ReplyTo<Vec<u64>>),
}

impl Service for Gated {
    type Msg = GatedMsg;
    const KIND: &'static str = "test-gated";
    const VERSION: u32 = 1;
    const REPLICAS: u8 = 1;

    async fn handle(&mut self, msg: GatedMsg, ctx: &mut Ctx<Self>) {
        match msg {
            GatedMsg::Hold => {
                if let Ok(p) = GATE.acquire().await {
                    p.forget();
                }
            }
            GatedMsg::Item(i) => self.seen.push(i),
            GatedMsg::Seen(r) => {
                let _ = ctx.reply(r, self.seen.clone());
            }
        }
    }
}

/// A handle keeps a copy of every message to a replicated service until a checkpoint covers
/// it, at most `retained_per_channel_max` (4,096): past that `tell` fails with `Unsettled` and
/// `tell_wait` waits, and both go on once the service has caught up.
#[test]
fn a_sender_keeps_at_most_4096_unconfirmed_messages_then_tell_fails_and_tell_wait_waits(
) -> Result<()> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    // Mailboxes larger than the bound: the bound on kept copies is what stops the sender.
    let limits = tern::Limits {
        mailbox_capacity: 10_000,
        ..crate::common::quick_to_notice()
    };
    let c = ["a", "b", "c"]
        .iter()
        .fold(tern_harness::Cluster::builder(), |b, n| b.node(n, &[]))
        .limits(limits)
        .faults(seed)
        .setup(|n| {
            n.register::<Gated>();
        })
        .start()?;
    c.wait_connected(SECS_10)?;
    c.wait_members(SECS_10)?;
    let svc = c.node("a").spawn(Gated::default())?;
    let id = svc.id();
    wait_for(SECS_10, "a standby holds the first checkpoint", || {
        c.node("a").replica(id).is_some_and(|r| r.acked >= 1)
    })?;
    let from = c.node("b").resolve::<Gated>(svc.addr())?;
    from.tell(GatedMsg::Hold)?;
    let mut told = 0u64;
    let refused = loop {
        match from.tell(GatedMsg::Item(told + 1)) {
            Ok(()) => told += 1,
            Err(e) => break e,
        }
        ensure!(told <= 4_096, "more than the bound kept");
    };
    ensure!(
        matches!(refused, tern::DeliveryError::Unsettled { max: 4_096, .. }),
        "refused with {refused:?}"
    );
    ensure!(told == 4_095, "{told} tells kept besides the hold");
    ensure!(from.unconfirmed() == 4_096, "{} kept", from.unconfirmed());
    let waiter = {
        let from = from.clone();
        std::thread::spawn(move || block_on(from.tell_wait(GatedMsg::Item(4_096))))
    };
    GATE.add_permits(1);
    waiter
        .join()
        .map_err(|_| anyhow::anyhow!("the waiting sender panicked"))??;
    let seen = block_on(from.ask(GatedMsg::Seen, SECS_10))?;
    ensure!(
        seen == (1..=4_096).collect::<Vec<_>>(),
        "{} handled",
        seen.len()
    );
    wait_for(SECS_10, "every message confirmed", || {
        from.unconfirmed() == 0
    })?;
    c.shutdown();
    Ok(())
}

/// A handle made from an address naming a node that never ran the service (as a node that
/// joined late holds an address from before a move, once the tombstone is gone), before its
/// node has heard from gossip where the service runs: what it sends is refused there as
/// unknown. For a replicated service that loses nothing: the handle keeps its copies, waits
/// for gossip to say where the service is, and sends them there; nothing is reported lost.
#[test]
fn tells_refused_where_a_replicated_service_never_was_go_again_once_gossip_says_where() -> Result<()>
{
    let (c, _svc, _standby) = kept_on_a()?;
    // A fresh service each try, resolved on c at once: c must not have heard of it yet (its
    // gossip comes about once a second), so the handle points where the address says.
    let mut found = None;
    for _ in 0..5 {
        let svc = c.node("a").spawn(Kept::default())?;
        let wrong = tern::ServiceAddr {
            node: NodeName::new("b"),
            ..svc.addr().clone()
        };
        let from = c.node("c").resolve::<Kept>(&wrong)?;
        if from.location().as_str() == "b" {
            found = Some((svc, from));
            break;
        }
    }
    let (svc, from) = found.ok_or_else(|| anyhow::anyhow!("c heard of every try at once"))?;
    let refused_before = c.node("c").stats().refused_by_peers;
    goes_on_whole(&c, "c", &from, 1..=20)?;
    ensure!(
        from.location().as_str() == "a",
        "sent to {}",
        from.location()
    );
    ensure!(
        c.node("c").stats().refused_by_peers > refused_before,
        "nothing was refused: the case was not exercised"
    );
    let _ = svc;
    c.shutdown();
    Ok(())
}

/// The primary's node dies without a word: the standby waits out the lease, wins the next
/// epoch from the voters (itself and the third node), and runs the service from its last
/// checkpoint; the sender's node sends again what was not confirmed, and the service's
/// history has every message once, in order. An ask the primary never got is answered by the
/// new copy. Traffic goes on afterwards, and nothing is reported lost.
#[test]
fn a_replicated_service_survives_the_abrupt_death_of_its_node() -> Result<()> {
    let (c, svc, standby) = kept_on_a()?;
    let id = svc.id();
    let (other, from) = sender_knowing_standby(&c, &svc, &standby)?;
    tell_items(&from, 1..=100)?;
    // An ask that cannot reach the primary before it dies: it waits, and the new copy
    // answers it.
    c.faults(other).cut(c.node("a").local_addr());
    let asker = {
        let from = from.clone();
        std::thread::spawn(move || block_on(from.ask(KeptMsg::Seen, Duration::from_secs(30))))
    };
    // Some handled and covered by an acknowledged checkpoint, perhaps some not yet: killed
    // now, whatever the primary was doing.
    c.kill("a");
    wait_for(
        Duration::from_secs(20),
        "the standby runs the service",
        || c.node(standby.as_str()).replica(id).is_some(),
    )?;
    wait_for(SECS_10, "the sender follows it", || {
        from.location() == standby
    })?;
    let answered = asker
        .join()
        .map_err(|_| anyhow::anyhow!("the asking thread panicked"))??;
    ensure!(
        answered == (1..=100).collect::<Vec<_>>(),
        "the ask pending across the takeover was answered with {answered:?}"
    );
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(
        seen == (1..=100).collect::<Vec<_>>(),
        "history after the takeover: {seen:?}"
    );
    ensure!(
        c.node(standby.as_str()).stats().takeovers == 1,
        "{:?}",
        c.node(standby.as_str()).stats()
    );
    // Traffic goes on, and everything is confirmed (by the new primary's checkpoints to a new
    // standby: the sender's node is the only other node left).
    goes_on_whole(&c, other, &from, 101..=120)?;
    c.shutdown();
    Ok(())
}

/// Moved, then killed before it handles anything at its new node: the copy taken over from
/// the new node's first checkpoint goes on with each sender where it was (that checkpoint
/// carries the windows the move brought, not only what the copy handled since), and nothing
/// is lost.
#[test]
fn a_replicated_service_killed_right_after_a_move_goes_on_where_its_senders_were() -> Result<()> {
    let (c, svc, standby) = kept_on_a()?;
    let id = svc.id();
    let (other, from) = sender_knowing_standby(&c, &svc, &standby)?;
    tell_items(&from, 1..=50)?;
    wait_for(SECS_10, "confirmed before the move", || {
        from.unconfirmed() == 0
    })?;
    // Moved to its standby's node: a new standby there, known to the sender's node.
    let host = standby;
    block_on(svc.migrate(host.clone(), MigrateOptions::default()))?;
    let mut next_standby = None;
    wait_for(SECS_10, "a checkpoint at the new node acknowledged", || {
        next_standby = c
            .node(host.as_str())
            .replica(id)
            .filter(|r| r.acked >= 1)
            .and_then(|r| r.standby);
        next_standby.is_some()
    })?;
    let next_standby = next_standby.expect("waited for");
    standby_known(&c, other, host.as_str(), id, &next_standby)?;
    c.kill(host.as_str());
    wait_for(
        Duration::from_secs(20),
        "the new standby runs the service",
        || c.node(next_standby.as_str()).replica(id).is_some(),
    )?;
    goes_on_whole(&c, other, &from, 51..=60)?;
    c.shutdown();
    Ok(())
}

/// The primary's node and its standby's die together: nothing can take the service over, and
/// once the failover wait has run out the sender's node reports what it kept as lost (nothing
/// is dropped silently).
#[test]
fn when_the_primary_and_its_standby_die_together_the_sender_is_told_of_the_loss() -> Result<()> {
    let (c, svc, standby) = kept_on_a()?;
    let id = svc.id();
    let (other, from) = sender_knowing_standby(&c, &svc, &standby)?;
    // Cut off first, so that none of these is confirmed.
    c.faults(other).cut(c.node("a").local_addr());
    tell_items(&from, 1..=10)?;
    ensure!(
        from.unconfirmed() == 10,
        "{} unconfirmed",
        from.unconfirmed()
    );
    c.kill("a");
    c.kill(standby.as_str());
    wait_for(Duration::from_secs(20), "the ten reported lost", || {
        c.node(other)
            .losses()
            .iter()
            .filter(|l| l.service == id)
            .map(|l| l.messages)
            .sum::<u64>()
            == 10
    })?;
    ensure!(
        from.unconfirmed() == 0,
        "{} unconfirmed",
        from.unconfirmed()
    );
    c.shutdown();
    Ok(())
}

/// A data directory for each node of a test, removed when dropped.
struct DataDirs(std::path::PathBuf);

impl DataDirs {
    fn new(test: &str) -> Self {
        let root = std::env::temp_dir().join(format!("tern-data-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        DataDirs(root)
    }
}

impl Drop for DataDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The cluster, the service (a handle on `a`), its standby, the sender's node and a handle
/// there.
type KeptWithData = (
    tern_harness::Cluster,
    tern::ServiceRef<Kept>,
    NodeName,
    &'static str,
    tern::ServiceRef<Kept>,
);

/// [`kept_on_a`] with a data directory on every node: the standby holds a checkpoint, and
/// the sender's node knows it.
fn kept_on_a_with_data(dirs: &DataDirs) -> Result<KeptWithData> {
    let (c, svc, standby) = kept_on_a_of(crate::common::killable_cluster_with(
        &["a", "b", "c"],
        |b| b.data_dirs(&dirs.0),
    )?)?;
    let (other, from) = sender_knowing_standby(&c, &svc, &standby)?;
    Ok((c, svc, standby, other, from))
}

/// The primary's node and its standby's die together (a household losing power, say), and
/// the primary's node comes back on its data directory: it wins the epoch after its stored
/// checkpoint from the voters still up, resumes the service from it, and the sender sends
/// again what it kept. Nothing is lost, duplicated or reordered; the messages confirmed
/// before the deaths were in the checkpoint on disk (a sender is confirmed only once its
/// messages are written there).
#[test]
fn a_node_restarted_on_its_data_directory_resumes_its_replicated_service() -> Result<()> {
    let dirs = DataDirs::new("resume");
    let (mut c, svc, standby, other, from) = kept_on_a_with_data(&dirs)?;
    let id = svc.id();
    tell_items(&from, 1..=50)?;
    wait_for(SECS_10, "confirmed: on a's disk and at the standby", || {
        from.unconfirmed() == 0
    })?;
    ensure!(
        c.node("a")
            .stored_checkpoints()?
            .iter()
            .any(|s| s.service == id && s.epoch == 0),
        "{:?}",
        c.node("a").stored_checkpoints()
    );
    // Kept by the sender, never handled: the sender's link to a is cut.
    let a_addr = c.node("a").local_addr();
    c.faults(other).cut(a_addr);
    tell_items(&from, 51..=60)?;
    drop(svc);
    c.kill("a");
    c.kill(standby.as_str());
    c.faults(other).heal(a_addr);
    c.restart("a")?;
    let a = c.node("a");
    ensure!(
        a.resuming().iter().any(|(s, _, e)| *s == id && *e == 0),
        "{:?}",
        a.resuming()
    );
    // Claimed once its kind is registered.
    a.register::<Kept>();
    wait_for(Duration::from_secs(20), "a resumes the service", || {
        a.stats().resumed_from_disk == 1
    })?;
    wait_for(SECS_10, "a runs it", || a.replica(id).is_some())?;
    wait_for(SECS_10, "the sender follows it", || {
        from.location().as_str() == "a"
    })?;
    goes_on_whole(&c, other, &from, 61..=70)?;
    ensure!(a.resuming().is_empty(), "{:?}", a.resuming());
    wait_for(SECS_10, "its checkpoint on disk at the new epoch", || {
        a.stored_checkpoints()
            .is_ok_and(|s| s.iter().any(|s| s.service == id && s.epoch == 1))
    })?;
    c.shutdown();
    Ok(())
}

/// The primary's node dies and its standby takes the service over; the node comes back on its
/// data directory. Its stored checkpoint is older than the epoch the standby won: the voters
/// say so, the stored copy is dropped from the disk and never runs, and the service goes on
/// where the standby runs it.
#[test]
fn a_restarted_node_does_not_bring_back_a_service_its_standby_took_over() -> Result<()> {
    let dirs = DataDirs::new("superseded");
    let (mut c, svc, standby, other, from) = kept_on_a_with_data(&dirs)?;
    let id = svc.id();
    tell_items(&from, 1..=30)?;
    drop(svc);
    c.kill("a");
    wait_for(
        Duration::from_secs(20),
        "the standby runs the service",
        || c.node(standby.as_str()).replica(id).is_some(),
    )?;
    c.restart("a")?;
    let a = c.node("a");
    a.register::<Kept>();
    wait_for(
        Duration::from_secs(20),
        "a gives its stored copy up",
        || {
            a.events()
                .iter()
                .any(|e| e.kind == "stored-copy-superseded")
        },
    )?;
    ensure!(a.resuming().is_empty(), "{:?}", a.resuming());
    ensure!(
        a.stored_checkpoints()?.iter().all(|s| s.service != id),
        "{:?}",
        a.stored_checkpoints()
    );
    ensure!(a.replica(id).is_none(), "a runs a second copy");
    ensure!(a.stats().resumed_from_disk == 0, "{:?}", a.stats());
    goes_on_whole(&c, other, &from, 31..=40)?;
    ensure!(a.replica(id).is_none(), "a runs a second copy");
    c.shutdown();
    Ok(())
}

/// A data directory whose store is damaged stops the node from starting, with an error that
/// names the file: nothing in it is resumed, and nothing is guessed.
#[test]
fn a_node_whose_data_directory_is_damaged_does_not_start_and_says_why() -> Result<()> {
    let dirs = DataDirs::new("damaged");
    std::fs::create_dir_all(&dirs.0)?;
    std::fs::write(dirs.0.join("tern.redb"), vec![0x5au8; 8192])?;
    let ca = tern::certs::ClusterCa::new()?;
    let mut cfg = tern::NodeConfig::new(ca.issue("a")?, "127.0.0.1:0".parse()?);
    cfg.data_dir = Some(dirs.0.clone());
    match tern::Node::start(cfg) {
        Ok(node) => {
            node.shutdown();
            anyhow::bail!("a node started on a damaged store");
        }
        Err(e) => {
            let text = e.to_string();
            ensure!(
                text.contains("tern.redb") && text.contains("Not a redb database"),
                "{text}"
            );
        }
    }
    Ok(())
}

/// A household loses power: every node dies at once and starts again on its data directory.
/// The primary's node resumes the service from its stored checkpoint (the voters, restarted
/// too, remember nothing that says otherwise), with everything confirmed before the power went,
/// and a sender from the restarted devices goes on with it.
#[test]
fn after_a_whole_household_restarts_the_service_goes_on_from_its_stored_checkpoint() -> Result<()> {
    let dirs = DataDirs::new("household");
    let (mut c, svc, _standby, other, from) = kept_on_a_with_data(&dirs)?;
    let id = svc.id();
    tell_items(&from, 1..=40)?;
    wait_for(SECS_10, "confirmed", || from.unconfirmed() == 0)?;
    drop((svc, from));
    for n in ["a", "b", "c"] {
        c.kill(n);
    }
    for n in ["a", "b", "c"] {
        c.restart(n)?;
    }
    for n in c.nodes() {
        n.register::<Kept>();
    }
    let a = c.node("a");
    wait_for(Duration::from_secs(20), "a resumes the service", || {
        a.stats().resumed_from_disk == 1
    })?;
    wait_for(SECS_10, "a runs it", || a.replica(id).is_some())?;
    let copies: Vec<&str> = c
        .nodes()
        .iter()
        .filter(|n| n.replica(id).is_some())
        .map(|n| n.name().as_str())
        .collect();
    ensure!(copies == ["a"], "copies on {copies:?}");
    let from = c.node(other).resolve::<Kept>(&tern::ServiceAddr {
        id,
        kind: <Kept as Service>::kind_key(),
        node: NodeName::new("a"),
    })?;
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=40).collect::<Vec<_>>(), "history: {seen:?}");
    block_on(from.tell_wait(KeptMsg::Item(41)))?;
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=41).collect::<Vec<_>>(), "history: {seen:?}");
    c.shutdown();
    Ok(())
}

/// With two devices there is no standby (no third to witness), but a data directory still
/// keeps the service: its checkpoints go to the disk alone, its senders are confirmed once
/// they are written, and the device that restarts resumes it from the last one, its own vote
/// deciding (no standby could hold a checkpoint of that epoch, so nothing else can have taken
/// it over).
#[test]
fn with_two_devices_a_data_directory_alone_brings_a_service_back_after_a_restart() -> Result<()> {
    let dirs = DataDirs::new("two");
    let mut c = crate::common::killable_cluster_with(&["a", "b"], |b| b.data_dirs(&dirs.0))?;
    for n in c.nodes() {
        n.register::<Kept>();
    }
    c.wait_members(SECS_10)?;
    let svc = c.node("a").spawn(Kept::default())?;
    let id = svc.id();
    let from = c.node("b").resolve::<Kept>(svc.addr())?;
    tell_items(&from, 1..=30)?;
    wait_for(SECS_10, "confirmed once on a's disk", || {
        from.unconfirmed() == 0
    })?;
    let a = c.node("a");
    ensure!(
        a.replica(id).is_some_and(|r| r.standby.is_none()),
        "no standby"
    );
    ensure!(a.stats().checkpoints_stored > 0, "{:?}", a.stats());
    drop(svc);
    c.kill("a");
    c.restart("a")?;
    let a = c.node("a");
    a.register::<Kept>();
    wait_for(Duration::from_secs(20), "a resumes the service", || {
        a.stats().resumed_from_disk == 1
    })?;
    wait_for(SECS_10, "b's handle follows it", || {
        from.location().as_str() == "a" && a.replica(id).is_some()
    })?;
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=30).collect::<Vec<_>>(), "history: {seen:?}");
    tell_items(&from, 31..=40)?;
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=40).collect::<Vec<_>>(), "history: {seen:?}");
    c.shutdown();
    Ok(())
}

/// A counter that answers each `Incr` with its new count (not replicated).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Counter {
    pub count: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum CounterMsg {
    Incr(ReplyTo<u64>),
    Count(ReplyTo<u64>),
}

impl Service for Counter {
    type Msg = CounterMsg;
    const KIND: &'static str = "test-counter";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: CounterMsg, ctx: &mut Ctx<Self>) {
        match msg {
            CounterMsg::Incr(r) => {
                self.count += 1;
                let _ = ctx.reply(r, self.count);
            }
            CounterMsg::Count(r) => {
                let _ = ctx.reply(r, self.count);
            }
        }
    }
}

/// A gate that keeps the asks it takes in its state and answers them all at `Open`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Gate {
    pub waiting: Vec<ReplyTo<u64>>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum GateMsg {
    Pass(ReplyTo<u64>),
    Open(u64),
    Waiting(ReplyTo<usize>),
}

impl Service for Gate {
    type Msg = GateMsg;
    const KIND: &'static str = "test-gate";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: GateMsg, ctx: &mut Ctx<Self>) {
        match msg {
            GateMsg::Pass(r) => self.waiting.push(r),
            GateMsg::Open(v) => {
                for r in std::mem::take(&mut self.waiting) {
                    let _ = ctx.reply(r, v);
                }
            }
            GateMsg::Waiting(r) => {
                let _ = ctx.reply(r, self.waiting.len());
            }
        }
    }
}

/// A replicated service whose handler asks two others: the counter, then the gate.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Asker {
    /// Per `Go`: its number, the counter's answer, the gate's answer (0: no answer).
    pub results: Vec<(u64, u64, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum AskerMsg {
    Go(u64),
    Ping,
    Results(ReplyTo<Vec<(u64, u64, u64)>>),
}

impl Service for Asker {
    type Msg = AskerMsg;
    const KIND: &'static str = "test-asker";
    const VERSION: u32 = 1;
    const REPLICAS: u8 = 1;

    async fn handle(&mut self, msg: AskerMsg, ctx: &mut Ctx<Self>) {
        match msg {
            AskerMsg::Go(k) => {
                let wait = Duration::from_secs(5);
                let n = ctx
                    .ask_role::<Counter, u64>("counter", CounterMsg::Incr, wait)
                    .await
                    .unwrap_or(0);
                let g = ctx
                    .ask_role::<Gate, u64>("gate", GateMsg::Pass, Duration::from_secs(30))
                    .await
                    .unwrap_or(0);
                self.results.push((k, n, g));
            }
            AskerMsg::Ping => {}
            AskerMsg::Results(r) => {
                let _ = ctx.reply(r, self.results.clone());
            }
        }
    }
}

/// A replicated service's node dies while a handler of it waits on its second ask, the first
/// one answered. The standby re-executes the handler from its checkpoint: both asks go again
/// with the same numbers, and the receivers' windows drop them as copies. The counter answers
/// the copy with the answer it kept (it counts the ask once, not twice); the gate, which keeps
/// the ask in its state, answers the copy too when it opens. The handler's record is the same
/// as the first execution's would have been, and traffic goes on.
#[test]
fn asks_that_a_replicated_service_repeats_after_a_takeover_get_the_answers_first_given(
) -> Result<()> {
    let c = killable_cluster(&["a", "b", "c"])?;
    for n in c.nodes() {
        n.register::<Asker>();
        n.register::<Counter>();
        n.register::<Gate>();
    }
    c.wait_members(SECS_10)?;
    let asker = c.node("a").spawn(Asker::default())?;
    let id = asker.id();
    let standby = standby_on_a(&c, id)?;
    let other = if standby.as_str() == "b" { "c" } else { "b" };
    standby_known(&c, other, "a", id, &standby)?;
    let counter = c.node(other).spawn(Counter::default())?;
    let gate = c.node(other).spawn(Gate::default())?;
    c.node("a").book_insert(id, "counter", counter.addr())?;
    c.node("a").book_insert(id, "gate", gate.addr())?;
    let from = c.node(other).resolve::<Asker>(asker.addr())?;
    // A checkpoint with the book in it, acknowledged.
    from.tell(AskerMsg::Ping)?;
    wait_for(SECS_10, "the ping confirmed", || from.unconfirmed() == 0)?;
    let waiting = || block_on(gate.ask(GateMsg::Waiting, SECS_10)).unwrap_or(0);
    let count = || block_on(counter.ask(CounterMsg::Count, SECS_10)).unwrap_or(0);
    from.tell(AskerMsg::Go(1))?;
    wait_for(SECS_10, "the handler counted and waits at the gate", || {
        count() == 1 && waiting() == 1
    })?;
    c.kill("a");
    wait_for(
        Duration::from_secs(20),
        "the standby runs the service",
        || c.node(standby.as_str()).replica(id).is_some(),
    )?;
    wait_for(SECS_10, "the sender follows", || from.location() == standby)?;
    gate.tell(GateMsg::Open(7))?;
    let mut results = Vec::new();
    wait_for(Duration::from_secs(20), "the handler went through", || {
        results = block_on(from.ask(AskerMsg::Results, SECS_10)).unwrap_or_default();
        !results.is_empty()
    })?;
    ensure!(results == vec![(1, 1, 7)], "results {results:?}");
    ensure!(count() == 1, "the counter took the ask {} times", count());
    // Traffic goes on.
    from.tell(AskerMsg::Go(2))?;
    wait_for(SECS_10, "the second handler waits at the gate", || {
        waiting() == 1
    })?;
    gate.tell(GateMsg::Open(8))?;
    wait_for(SECS_10, "the second handler went through", || {
        results = block_on(from.ask(AskerMsg::Results, SECS_10)).unwrap_or_default();
        results.len() == 2
    })?;
    ensure!(results == vec![(1, 1, 7), (2, 2, 8)], "results {results:?}");
    wait_for(Duration::from_secs(20), "everything confirmed", || {
        from.unconfirmed() == 0
    })?;
    ensure!(
        c.node(other).losses().is_empty(),
        "{:?}",
        c.node(other).losses()
    );
    c.shutdown();
    Ok(())
}

/// Records the items it handles; stalls for good in the first it handles on the node named
/// in `stall_on`, as a handler that never finishes there would.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OutSink {
    pub seen: Vec<u64>,
    pub stall_on: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum OutSinkMsg {
    Item(u64),
    Seen(ReplyTo<Vec<u64>>),
}

async fn out_sink_handle(s: &mut OutSink, msg: OutSinkMsg, node: &NodeName) -> Option<Vec<u64>> {
    match msg {
        OutSinkMsg::Item(i) => {
            if s.stall_on.as_deref() == Some(node.as_str()) {
                std::future::pending::<()>().await;
            }
            s.seen.push(i);
            None
        }
        OutSinkMsg::Seen(_) => Some(s.seen.clone()),
    }
}

impl Service for OutSink {
    type Msg = OutSinkMsg;
    const KIND: &'static str = "test-out-sink";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: OutSinkMsg, ctx: &mut Ctx<Self>) {
        let node = ctx.node_name().clone();
        if let OutSinkMsg::Seen(r) = msg {
            let _ = ctx.reply(r, self.seen.clone());
        } else {
            out_sink_handle(self, msg, &node).await;
        }
    }
}

/// [`OutSink`], replicated.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct KeptSink(pub OutSink);

impl Service for KeptSink {
    type Msg = OutSinkMsg;
    const KIND: &'static str = "test-kept-sink";
    const VERSION: u32 = 1;
    const REPLICAS: u8 = 1;

    async fn handle(&mut self, msg: OutSinkMsg, ctx: &mut Ctx<Self>) {
        let node = ctx.node_name().clone();
        if let OutSinkMsg::Seen(r) = msg {
            let _ = ctx.reply(r, self.0.seen.clone());
        } else {
            out_sink_handle(&mut self.0, msg, &node).await;
        }
    }
}

/// A replicated relay: it records each item it handles and tells it on to its book's
/// `"sink"` (a [`KeptSink`] if `kept`, else an [`OutSink`]).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct OutRelay {
    pub seen: Vec<u64>,
    pub kept: bool,
}

impl Service for OutRelay {
    type Msg = KeptMsg;
    const KIND: &'static str = "test-out-relay";
    const VERSION: u32 = 1;
    const REPLICAS: u8 = 1;

    async fn handle(&mut self, msg: KeptMsg, ctx: &mut Ctx<Self>) {
        match msg {
            KeptMsg::Item(i) => {
                self.seen.push(i);
                let sent = if self.kept {
                    ctx.tell_wait_role::<KeptSink>("sink", OutSinkMsg::Item(i))
                        .await
                } else {
                    ctx.tell_wait_role::<OutSink>("sink", OutSinkMsg::Item(i))
                        .await
                };
                if let Err(e) = sent {
                    tracing::warn!(item = i, %e, "the relay could not tell the sink");
                }
            }
            KeptMsg::Seen(r) => {
                let _ = ctx.reply(r, self.seen.clone());
            }
        }
    }
}

fn register_out_kinds(c: &tern_harness::Cluster) {
    for n in c.nodes() {
        n.register::<OutRelay>();
        n.register::<OutSink>();
        n.register::<KeptSink>();
    }
}

/// Which way the link between the relay's node `a` and the sink's node `c` fails before `a`
/// dies.
#[derive(Debug, Clone, Copy)]
enum OutCut {
    /// What `a` sends to `c` is dropped: the sink never gets the items.
    Sends,
    /// What `c` sends to `a` is dropped: the sink takes the items, `a` never hears so.
    Hears,
}

/// A replicated relay on `a` tells each item it handles to a plain sink on `c`; the sender is
/// on `b`, the relay's standby. The link between `a` and `c` fails one way (`cut`), items 11
/// to 20 are handled and confirmed by an acknowledged checkpoint, and `a` dies. The copy that
/// takes the relay over on `b` sends again what the checkpoint carried of its unconfirmed
/// messages: the sink ends with 1 to 20 exactly once, in order, the copies on `b` are
/// confirmed before anything else is sent, and traffic goes on.
fn outputs_survive_their_node(cut: OutCut) -> Result<()> {
    // Links kept up for 10 s: the cut one must not time out before `a` dies (its node would
    // then report the sink's messages lost and send the sink a gap, as it should for a node
    // it lost), however slowly a loaded machine runs the steps between.
    let c = crate::common::killable_cluster_with(&["a", "b", "c"], |b| {
        b.limits(tern::Limits {
            idle_timeout_ms: 10_000,
            ..crate::common::quick_to_notice()
        })
    })?;
    register_out_kinds(&c);
    c.wait_members(SECS_10)?;
    let sink = c.node("c").spawn(OutSink::default())?;
    let relay = c.node("a").spawn(OutRelay::default())?;
    let id = relay.id();
    c.node("a").book_insert(id, "sink", sink.addr())?;
    let standby = standby_on_a(&c, id)?;
    ensure!(standby.as_str() == "b", "standby {standby}");
    let from = c.node("b").resolve::<OutRelay>(relay.addr())?;
    let sink_seen = || block_on(sink.ask(OutSinkMsg::Seen, SECS_10)).unwrap_or_default();
    tell_items(&from, 1..=10)?;
    wait_for(SECS_10, "the sink took 1 to 10", || {
        sink_seen() == (1..=10).collect::<Vec<_>>()
    })?;
    let to_sink_on_a = c.node("a").resolve::<OutSink>(sink.addr())?;
    wait_for(SECS_10, "the relay's node saw 1 to 10 confirmed", || {
        to_sink_on_a.unconfirmed() == 0
    })?;
    match cut {
        OutCut::Sends => c.faults("a").cut(c.node("c").local_addr()),
        OutCut::Hears => c.faults("c").cut(c.node("a").local_addr()),
    }
    tell_items(&from, 11..=20)?;
    wait_for(SECS_10, "11 to 20 confirmed to the sender", || {
        from.unconfirmed() == 0
    })?;
    ensure!(
        to_sink_on_a.unconfirmed() == 10,
        "the relay's node has {} messages to the sink unconfirmed",
        to_sink_on_a.unconfirmed()
    );
    if matches!(cut, OutCut::Hears) {
        wait_for(SECS_10, "the sink took 11 to 20", || {
            sink_seen() == (1..=20).collect::<Vec<_>>()
        })?;
    }
    c.kill("a");
    wait_for(
        Duration::from_secs(20),
        "the standby runs the relay",
        || c.node("b").replica(id).is_some(),
    )?;
    // The copies the checkpoint carried went again from b; the sink took them (or dropped
    // them as copies) and b heard so, with nothing else sent yet.
    let to_sink_on_b = c.node("b").resolve::<OutSink>(sink.addr())?;
    wait_for(SECS_10, "the sink took 1 to 20", || {
        sink_seen() == (1..=20).collect::<Vec<_>>()
    })?;
    wait_for(SECS_10, "b saw its copies confirmed", || {
        to_sink_on_b.unconfirmed() == 0
    })?;
    ensure!(
        c.node("b").stats().outputs_resent >= 10,
        "{:?}",
        c.node("b").stats()
    );
    // Traffic goes on.
    wait_for(SECS_10, "the sender follows the relay", || {
        from.location().as_str() == "b"
    })?;
    tell_items(&from, 21..=30)?;
    wait_for(SECS_10, "the sink took 1 to 30", || {
        sink_seen() == (1..=30).collect::<Vec<_>>()
    })?;
    let relayed = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(relayed == (1..=30).collect::<Vec<_>>(), "relay {relayed:?}");
    wait_for(SECS_10, "everything confirmed", || {
        from.unconfirmed() == 0 && to_sink_on_b.unconfirmed() == 0
    })?;
    no_losses(&c, &["b", "c"])?;
    c.shutdown();
    Ok(())
}

/// No node of `names` reported a loss.
fn no_losses(c: &tern_harness::Cluster, names: &[&str]) -> Result<()> {
    for n in names {
        ensure!(
            c.node(n).losses().is_empty(),
            "{n}: {:?}",
            c.node(n).losses()
        );
    }
    Ok(())
}

#[test]
fn messages_a_replicated_service_sent_that_never_arrived_go_again_from_the_copy_that_takes_over(
) -> Result<()> {
    outputs_survive_their_node(OutCut::Sends)
}

#[test]
fn messages_a_replicated_service_sent_that_arrived_unconfirmed_are_confirmed_to_the_copy_that_takes_over(
) -> Result<()> {
    outputs_survive_their_node(OutCut::Hears)
}

/// A replicated relay and the replicated sink it tells run on the same node, each
/// checkpointed on its own; the sink is stuck in its first item there, so its checkpoint holds
/// none of what the relay sent it, while the relay's acknowledged checkpoint covers all ten.
/// Both are taken over on `b` when `a` dies: the relay's new copy sends the ten again, and the
/// sink's (not stuck on `b`) takes each once, in order. Before, they were in neither copy's
/// future: the relay's counters said they were sent, and the sink waited for them for good.
#[test]
fn a_replicated_service_and_the_replicated_one_it_tells_on_the_same_node_lose_nothing_between_them(
) -> Result<()> {
    let c = killable_cluster(&["a", "b", "c"])?;
    register_out_kinds(&c);
    c.wait_members(SECS_10)?;
    let sink = c.node("a").spawn(KeptSink(OutSink {
        seen: Vec::new(),
        stall_on: Some("a".into()),
    }))?;
    let relay = c.node("a").spawn(OutRelay {
        seen: Vec::new(),
        kept: true,
    })?;
    let id = relay.id();
    c.node("a").book_insert(id, "sink", sink.addr())?;
    ensure!(standby_on_a(&c, id)?.as_str() == "b");
    ensure!(standby_on_a(&c, sink.id())?.as_str() == "b");
    let from = c.node("b").resolve::<OutRelay>(relay.addr())?;
    tell_items(&from, 1..=10)?;
    wait_for(SECS_10, "1 to 10 confirmed to the sender", || {
        from.unconfirmed() == 0
    })?;
    c.kill("a");
    wait_for(Duration::from_secs(20), "b runs both", || {
        c.node("b").replica(id).is_some() && c.node("b").replica(sink.id()).is_some()
    })?;
    wait_for(SECS_10, "the sender follows the relay", || {
        from.location().as_str() == "b"
    })?;
    let sink_on_b = c.node("b").resolve::<KeptSink>(sink.addr())?;
    let sink_seen = || block_on(sink_on_b.ask(OutSinkMsg::Seen, SECS_10)).unwrap_or_default();
    wait_for(SECS_10, "the sink took 1 to 10", || {
        sink_seen() == (1..=10).collect::<Vec<_>>()
    })?;
    tell_items(&from, 11..=20)?;
    wait_for(SECS_10, "the sink took 1 to 20", || {
        sink_seen() == (1..=20).collect::<Vec<_>>()
    })?;
    let relayed = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(relayed == (1..=20).collect::<Vec<_>>(), "relay {relayed:?}");
    wait_for(Duration::from_secs(20), "everything confirmed", || {
        from.unconfirmed() == 0 && sink_on_b.unconfirmed() == 0
    })?;
    no_losses(&c, &["b", "c"])?;
    c.shutdown();
    Ok(())
}

/// The sender is on the standby's own node, and the primary's node stops sending to it (so
/// nothing it handles is covered by an acknowledged checkpoint) before it dies. When the
/// standby takes the service over, the sender's channel points at a copy on its own node: the
/// copies it kept go there, in order, as they go to another node (before, they went only to
/// another node: the copy here waited for number 1 for good, checked 2026-12-06).
#[test]
fn a_sender_on_the_standbys_own_node_loses_nothing_when_the_standby_takes_the_service_over(
) -> Result<()> {
    let (c, svc, standby) = kept_on_a()?;
    let id = svc.id();
    let from = c.node(standby.as_str()).resolve::<Kept>(svc.addr())?;
    c.faults("a").cut(c.node(standby.as_str()).local_addr());
    tell_items(&from, 1..=50)?;
    c.kill("a");
    wait_for(
        Duration::from_secs(20),
        "the standby runs the service",
        || c.node(standby.as_str()).replica(id).is_some(),
    )?;
    wait_for(SECS_10, "the sender follows it", || {
        from.location() == standby
    })?;
    goes_on_whole(&c, standby.as_str(), &from, 51..=60)?;
    c.shutdown();
    Ok(())
}

/// A replicated service that needs a speaker.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Loud {
    pub seen: Vec<u64>,
}

impl Service for Loud {
    type Msg = KeptMsg;
    const KIND: &'static str = "test-loud";
    const VERSION: u32 = 1;
    const REQUIRES: &'static [&'static str] = &["speaker"];
    const REPLICAS: u8 = 1;

    async fn handle(&mut self, msg: KeptMsg, ctx: &mut Ctx<Self>) {
        match msg {
            KeptMsg::Item(i) => self.seen.push(i),
            KeptMsg::Seen(r) => {
                let _ = ctx.reply(r, self.seen.clone());
            }
        }
    }
}

/// The standby is a node that could run the service if it took it over: one with every
/// capability the kind requires, not draining. `b` comes first by name but has no speaker,
/// and `c` drains; `d` stands by. (Before, the first node by name with the kind stood by:
/// `b`, which would have run a service that needs a speaker on a device without one.)
#[test]
fn the_standby_is_a_node_placement_would_let_run_the_service() -> Result<()> {
    let c = ["a", "b", "c", "d"]
        .iter()
        .fold(tern_harness::Cluster::builder(), |b, n| {
            let caps: &[&str] = if *n == "b" { &[] } else { &["speaker"] };
            b.node(n, caps)
        })
        .limits(crate::common::quick_to_notice())
        .faults(0x10ad)
        .setup(crate::common::register_test_kinds)
        .start()?;
    c.wait_connected(SECS_10)?;
    for n in c.nodes() {
        n.register::<Loud>();
    }
    c.wait_members(SECS_10)?;
    block_on(c.node("c").drain());
    wait_for(SECS_10, "a hears that c drains", || {
        c.node("a")
            .members()
            .iter()
            .any(|m| m.info.name.as_str() == "c" && m.info.draining)
    })?;
    let svc = c.node("a").spawn(Loud::default())?;
    let standby = standby_on_a(&c, svc.id())?;
    ensure!(standby.as_str() == "d", "standby {standby}");
    // It takes the service over when a dies, and traffic goes on there.
    let from = c.node("b").resolve::<Loud>(svc.addr())?;
    tell_items(&from, 1..=10)?;
    wait_for(SECS_10, "1 to 10 confirmed", || from.unconfirmed() == 0)?;
    c.kill("a");
    wait_for(Duration::from_secs(20), "d runs the service", || {
        c.node("d").replica(svc.id()).is_some()
    })?;
    wait_for(SECS_10, "the sender follows it", || {
        from.location().as_str() == "d"
    })?;
    tell_items(&from, 11..=20)?;
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=20).collect::<Vec<_>>(), "history {seen:?}");
    no_losses(&c, &["b", "d"])?;
    c.shutdown();
    Ok(())
}

/// A sender whose node has lost the primary's node before hearing of the takeover (the
/// standby's word is cut off from it for a while) tells on: the messages are kept and go to
/// the new copy once the sender's node finds it (before, each `tell_wait` failed at once with
/// "node a was lost and is not connected", and a test that told right after a takeover failed
/// now and then that way, 2026-12-06).
#[test]
fn a_sender_that_lost_the_primarys_node_before_hearing_of_the_takeover_loses_nothing() -> Result<()>
{
    let (c, svc, standby) = kept_on_a()?;
    let (other, from) = sender_knowing_standby(&c, &svc, &standby)?;
    tell_items(&from, 1..=10)?;
    wait_for(SECS_10, "1 to 10 confirmed", || from.unconfirmed() == 0)?;
    c.faults(standby.as_str()).cut(c.node(other).local_addr());
    c.kill("a");
    wait_for(SECS_10, "the sender's node loses a", || {
        c.node(other)
            .members()
            .iter()
            .any(|m| m.info.name.as_str() == "a" && m.status == tern::MemberStatus::Lost)
    })?;
    ensure!(from.location().as_str() == "a", "it followed already");
    tell_items(&from, 11..=20)?;
    c.faults(standby.as_str()).heal(c.node(other).local_addr());
    wait_for(
        Duration::from_secs(20),
        "the sender follows the takeover",
        || from.location() == standby,
    )?;
    goes_on_whole(&c, other, &from, 21..=30)?;
    c.shutdown();
    Ok(())
}
