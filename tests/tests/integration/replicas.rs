//! Replicated services (`Service::REPLICAS`): checkpoints to a standby on another node, and
//! senders confirmed only by an acknowledged checkpoint (DESIGN guarantee 13, in progress:
//! failover is not built yet).

use std::time::Duration;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tern::{
    Ctx, MigrateOptions, NodeName, ReplyTo, Service, ServiceId, STANDBY_SERVICES_PER_PEER_MAX,
};
use tern_harness::rogue::Rogue;
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

#[test]
fn a_replicated_service_checkpoints_to_a_standby_and_its_senders_wait_for_the_acknowledgement(
) -> Result<()> {
    let c = killable_cluster(&["a", "b", "c"])?;
    for n in c.nodes() {
        n.register::<Kept>();
    }
    c.wait_members(SECS_10)?;
    let svc = c.node("a").spawn(Kept::default())?;
    let id = svc.id();
    // The first checkpoint goes as soon as a standby that has the kind is known.
    wait_for(SECS_10, "a standby holds the first checkpoint", || {
        c.node("a").replica(id).is_some_and(|r| r.acked >= 1)
    })?;
    let info = c.node("a").replica(id).expect("replicated");
    let standby = info.standby.clone().expect("a standby");
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
    for i in 1..=100 {
        block_on(from.tell_wait(KeptMsg::Item(i)))?;
    }
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
    // before a lease of 1 s runs out), another standby is chosen, and the senders are
    // confirmed through it.
    c.cut("a", standby.as_str());
    for i in 101..=110 {
        block_on(from.tell_wait(KeptMsg::Item(i)))?;
    }
    wait_for(
        Duration::from_secs(20),
        "another standby, and confirmed",
        || {
            c.node("a")
                .replica(id)
                .is_some_and(|r| r.standby.as_ref().is_some_and(|s| *s != standby))
                && from.unconfirmed() == 0
        },
    )?;
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=110).collect::<Vec<_>>(), "handled {seen:?}");
    // Healed, the standby given up lets its checkpoint go.
    c.heal("a", standby.as_str());
    wait_for(Duration::from_secs(20), "the first standby let go", || {
        !c.node(standby.as_str())
            .standby_checkpoints()
            .iter()
            .any(|h| h.service == id)
    })?;
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
    for i in 112..=120 {
        block_on(from.tell_wait(KeptMsg::Item(i)))?;
    }
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=120).collect::<Vec<_>>(), "handled {seen:?}");
    wait_for(SECS_10, "confirmed after the move", || {
        from.unconfirmed() == 0
    })?;
    c.shutdown();
    Ok(())
}

/// Nodes that notice a lost link only after 10 s: a cut shorter than that leaves the links up,
/// and only the lease tells the primary it is cut off.
fn slow_to_notice_cluster(names: &[&str]) -> Result<tern_harness::Cluster> {
    let c = names
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
        n.register::<Kept>();
    }
    c.wait_members(SECS_10)?;
    Ok(c)
}

/// Cut off from its standby, in either direction or both, a replicated service handles
/// nothing once its lease runs out (the standby may be taking it over), and goes on with
/// nothing lost when the way is back.
#[test]
fn a_primary_cut_off_from_its_standby_stops_handling_when_its_lease_runs_out() -> Result<()> {
    let c = slow_to_notice_cluster(&["a", "b", "c"])?;
    let svc = c.node("a").spawn(Kept::default())?;
    let id = svc.id();
    wait_for(SECS_10, "a standby holds the first checkpoint", || {
        c.node("a")
            .replica(id)
            .is_some_and(|r| r.acked >= 1 && r.serving)
    })?;
    let standby = c
        .node("a")
        .replica(id)
        .and_then(|r| r.standby)
        .expect("a standby");
    let other = if standby.as_str() == "b" { "c" } else { "b" };
    let from = c.node(other).resolve::<Kept>(svc.addr())?;
    let queued = || {
        c.node("a")
            .services()
            .iter()
            .find(|s| s.addr.id == id)
            .map_or(0, |s| s.mailbox_depth)
    };
    let mut next = 1u64;
    // Two ways: both directions, then renewals lost (a to the standby), then grants lost (the
    // standby to a).
    let cuts: [(&str, &str, bool); 3] = [
        ("a", standby.as_str(), true),
        ("a", standby.as_str(), false),
        (standby.as_str(), "a", false),
    ];
    for (x, y, both) in cuts {
        let pauses = c.node("a").stats().replica_pauses;
        if both {
            c.cut(x, y);
        } else {
            c.faults(x).cut(c.node(y).local_addr());
        }
        wait_for(SECS_10, "the lease ran out", || {
            c.node("a").replica(id).is_some_and(|r| !r.serving)
        })?;
        // Told now, they wait in the mailbox: nothing is handled without the lease.
        for _ in 0..10 {
            block_on(from.tell_wait(KeptMsg::Item(next)))?;
            next += 1;
        }
        wait_for(SECS_10, "ten messages queued, none handled", || {
            queued() == 10
        })?;
        ensure!(
            c.node("a").stats().replica_pauses > pauses,
            "the service did not pause"
        );
        ensure!(
            from.unconfirmed() >= 10,
            "{} unconfirmed",
            from.unconfirmed()
        );
        if both {
            c.heal(x, y);
        } else {
            c.faults(x).heal(c.node(y).local_addr());
        }
        wait_for(
            Duration::from_secs(20),
            "handled and confirmed after the heal",
            || queued() == 0 && from.unconfirmed() == 0,
        )?;
        let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
        ensure!(seen == (1..next).collect::<Vec<_>>(), "handled {seen:?}");
        // The same standby: its link never went down.
        let r = c.node("a").replica(id).expect("replicated");
        ensure!(r.standby.as_ref() == Some(&standby), "{r:?}");
    }
    // Traffic still flows.
    block_on(from.tell_wait(KeptMsg::Item(next)))?;
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=next).collect::<Vec<_>>(), "handled {seen:?}");
    c.shutdown();
    Ok(())
}

#[test]
fn a_peer_can_neither_fill_a_standby_nor_checkpoint_a_service_it_does_not_run() -> Result<()> {
    let c = killable_cluster(&["a", "b", "c"])?;
    for n in c.nodes() {
        n.register::<Kept>();
    }
    c.wait_members(SECS_10)?;
    let honest = c.node("a").spawn(Kept::default())?;
    let id = honest.id();
    wait_for(SECS_10, "the first checkpoint", || {
        c.node("a").replica(id).is_some_and(|r| r.acked >= 1)
    })?;
    let standby = c
        .node("a")
        .replica(id)
        .and_then(|r| r.standby)
        .expect("a standby");
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
        // The honest service's checkpoint, in mallory's name, at a newer epoch.
        rogue.send_ctrl(&checkpoint(id, 99)).await?;
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
