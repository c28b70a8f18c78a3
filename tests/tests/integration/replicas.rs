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

use crate::common::{killable_cluster, SlowMsg, Tally, SECS_10};

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

    // With the standby cut off, the service goes on handling, and its senders stay
    // unconfirmed: no acknowledgement can come.
    c.cut("a", standby.as_str());
    for i in 101..=110 {
        block_on(from.tell_wait(KeptMsg::Item(i)))?;
    }
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen.len() == 110, "handled {}", seen.len());
    // A plain service beside it, told afterwards, is confirmed: the marks of its round went,
    // and those of the replicated one would have gone with them.
    let plain = c.node("a").spawn(Tally {
        name: "beside-kept".into(),
    })?;
    let plain_from = c.node(other).resolve::<Tally>(plain.addr())?;
    block_on(plain_from.tell_wait(SlowMsg::Item(1)))?;
    wait_for(SECS_10, "the plain service's sender confirmed", || {
        plain_from.unconfirmed() == 0
    })?;
    ensure!(
        from.unconfirmed() >= 10,
        "{} unconfirmed while the standby is cut off",
        from.unconfirmed()
    );
    // Healed, a newer checkpoint reaches the standby (or another one, if the link was lost
    // meanwhile) and the senders are confirmed.
    c.heal("a", standby.as_str());
    wait_for(Duration::from_secs(20), "confirmed after the heal", || {
        from.unconfirmed() == 0
    })?;
    let stats = c.node("a").stats();
    ensure!(stats.checkpoints_acked >= 3, "{stats:?}");
    // Traffic still flows.
    block_on(from.tell_wait(KeptMsg::Item(111)))?;
    let seen = block_on(from.ask(KeptMsg::Seen, SECS_10))?;
    ensure!(seen == (1..=111).collect::<Vec<_>>(), "handled {seen:?}");

    // Moved to its standby's node, it runs there with another standby, and the node it left
    // is no longer its primary.
    block_on(svc.migrate(standby.clone(), MigrateOptions::default()))?;
    wait_for(SECS_10, "a checkpoint acknowledged after the move", || {
        c.node(standby.as_str())
            .replica(id)
            .is_some_and(|r| r.acked >= 1 && r.standby.as_ref() != Some(&standby))
    })?;
    ensure!(c.node("a").replica(id).is_none(), "a still runs it");
    wait_for(SECS_10, "the old checkpoint let go", || {
        !c.node(standby.as_str())
            .standby_checkpoints()
            .iter()
            .any(|h| h.service == id)
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
