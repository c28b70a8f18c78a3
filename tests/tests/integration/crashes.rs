//! What a node's death costs, and who is told (DESIGN guarantee 8), at each step of a
//! migration and outside any. Every node here counts a peer lost after 600 ms of silence.
//!
//! The checks are the same each time: what the service handled (recorded outside the nodes,
//! so it survives a killed one) came once each and in order, and every message that was sent
//! and not handled is covered by a loss report on the sender's node.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Result};
use tern::{
    AskError, DeliveryError, LossReport, MigrateOptions, NodeHandle, ServiceId, ServiceRef,
};
use tern_harness::{block_on, wait_for, Cluster};

use crate::common::{killable_cluster, tally, Slow, SlowMsg, Tally, SECS_10};

/// The numbers `node`'s loss reports give for `sender`'s channel to `service`.
fn reported(node: &NodeHandle, service: ServiceId, sender: ServiceId) -> BTreeSet<u64> {
    node.losses()
        .iter()
        .filter(|r: &&LossReport| r.service == service && r.sender == sender)
        .flat_map(|r| r.first_seq..=r.last_seq)
        .collect()
}

/// Items `1..=n` went out as sequence numbers `1 + offset ..= n + offset` of one handle.
/// Checks that the handled ones came once each, in order, and that each of the others is
/// among the `reported` numbers. Returns how many were handled.
fn check_accounted(handled: &[u64], n: u64, offset: u64, reported: &BTreeSet<u64>) -> Result<u64> {
    ensure!(
        handled.windows(2).all(|w| w[0] < w[1]),
        "handled out of order or twice: {handled:?}"
    );
    let done: BTreeSet<u64> = handled.iter().copied().collect();
    let unreported: Vec<u64> = (1..=n)
        .filter(|i| !done.contains(i) && !reported.contains(&(i + offset)))
        .collect();
    ensure!(
        unreported.is_empty(),
        "{} messages lost without a report, first {:?}; reported {:?}",
        unreported.len(),
        unreported.first(),
        reported.iter().take(5).collect::<Vec<_>>()
    );
    Ok(done.len() as u64)
}

#[test]
fn a_node_that_dies_with_queued_messages_has_each_unhandled_one_reported() -> Result<()> {
    let c = killable_cluster(&["a", "b", "c"])?;
    let svc = c.node("a").spawn(Tally {
        name: "dies-with-b".into(),
    })?;
    let from_c = c.node("c").resolve::<Tally>(svc.addr())?;
    let n = 300;
    let lost = block_on(async {
        // It moves to b first, so the node that dies is one it arrived at.
        for i in 1..=20 {
            from_c.tell(SlowMsg::Item(i))?;
        }
        let report = svc.migrate("b", MigrateOptions::default()).await?;
        ensure!(report.committed(), "{report:?}");
        // Busy at b, with the rest queued behind, when b dies.
        from_c.tell(SlowMsg::Hold { ms: 2_000 })?;
        for i in 21..=n {
            from_c.tell(SlowMsg::Item(i))?;
        }
        Ok(())
    });
    lost?;
    // The hold is in hand and confirmed to c (every number up to it taken), the rest queued.
    wait_for(SECS_10, "b holds the rest behind the hold", || {
        from_c.unconfirmed() == n - 20
    })?;
    c.kill("b");
    let cn = c.node("c");
    wait_for(SECS_10, "c declares what b took with it", || {
        cn.stats().messages_lost_reported > 0
    })?;
    let handled = tally("dies-with-b");
    // Items 1..=20 are numbers 1..=20, the hold is 21, items 21.. are 22.. .
    let rep = reported(cn, svc.id(), from_c.sender_id());
    let items: BTreeSet<u64> = rep
        .iter()
        .filter(|&&s| s != 21)
        .map(|&s| if s > 21 { s - 1 } else { s })
        .collect();
    let done = check_accounted(&handled, n, 0, &items)?;
    ensure!(
        done == 20,
        "b died in the hold, after the first 20: {handled:?}"
    );
    // Exactly what b had not taken: the hold in hand was confirmed, so it is not reported.
    ensure!(
        rep == (22..=n + 1).collect::<BTreeSet<u64>>(),
        "reported {} numbers, from {:?} to {:?}",
        rep.len(),
        rep.first(),
        rep.last()
    );
    ensure!(cn.losses().iter().all(|r| r.node.as_str() == "b"));
    ensure!(from_c.unconfirmed() == 0, "{}", from_c.unconfirmed());
    eprintln!(
        "handled {done} of {n}; {} reported lost",
        cn.stats().messages_lost_reported
    );
    drop((svc, from_c));
    c.shutdown();
    Ok(())
}

#[test]
fn a_partition_past_the_idle_timeout_reports_the_unconfirmed_and_traffic_flows_again() -> Result<()>
{
    let c = killable_cluster(&["a", "b"])?;
    let (a, b) = (c.node("a"), c.node("b"));
    let slow = b.spawn(Slow::default())?;
    let from_a = a.resolve::<Slow>(slow.addr())?;
    let n = 600;
    let mut refused_at_once = Vec::new();
    block_on(async {
        for i in 1..=200 {
            from_a.tell(SlowMsg::Item(i))?;
        }
        c.cut("a", "b");
        // Sent into the cut, on the dying connection, until a counts b lost; from then on a
        // tell fails at once (`PeerLost`) and its number is given back.
        for i in 201..=400 {
            match from_a.tell(SlowMsg::Item(i)) {
                Ok(()) => {}
                Err(DeliveryError::PeerLost { .. }) => refused_at_once.push(i),
                Err(e) => return Err(e.into()),
            }
            if i % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    wait_for(SECS_10, "a counts b lost", || !a.is_connected("b"))?;
    c.heal("a", "b");
    c.wait_connected(SECS_10)?;
    let handled = block_on(async {
        for i in 401..=n {
            from_a.tell_wait(SlowMsg::Item(i)).await?;
        }
        // Everything sent after the heal arrives: no window waits for what was declared lost.
        let mut handled = Vec::new();
        for _ in 0..500 {
            handled = from_a.ask(SlowMsg::Items, SECS_10).await?;
            if handled.last() == Some(&n) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok::<_, anyhow::Error>(handled)
    })?;
    // Item i went out as number i minus the items refused at once before it.
    let rep = reported(a, slow.id(), from_a.sender_id());
    let sent: Vec<u64> = (1..=n).filter(|i| !refused_at_once.contains(i)).collect();
    ensure!(
        !handled.iter().any(|i| refused_at_once.contains(i)),
        "an item refused at once was handled"
    );
    let items_reported: BTreeSet<u64> = sent
        .iter()
        .enumerate()
        .filter(|(k, _)| rep.contains(&(*k as u64 + 1)))
        .map(|(_, i)| *i)
        .collect();
    let done = check_accounted(
        &handled,
        n,
        0,
        &items_reported
            .iter()
            .copied()
            .chain(refused_at_once.iter().copied())
            .collect(),
    )?;
    ensure!(
        (401..=n).all(|i| handled.contains(&i)),
        "traffic after the heal was held up"
    );
    eprintln!(
        "handled {done} of {n}; reported {} (a partition may report messages that were handled: their confirmation was what went missing)",
        rep.len()
    );
    c.shutdown();
    Ok(())
}

/// Once a peer is declared lost, nothing waits for it unreported: a tell to a service there
/// fails at once with `PeerLost`, an ask with `NodeLost` (not at its timeout); and once the
/// peer is back, the same handle delivers again.
#[test]
fn sends_to_a_lost_peer_fail_at_once_and_flow_again_when_it_is_back() -> Result<()> {
    let c = killable_cluster(&["a", "b"])?;
    let (a, b) = (c.node("a"), c.node("b"));
    let name = "lost-peer";
    let svc = b.spawn(Tally { name: name.into() })?;
    let from_a = a.resolve::<Tally>(svc.addr())?;
    block_on(from_a.tell_wait(SlowMsg::Item(1)))?;
    wait_for(SECS_10, "the first item handled and confirmed", || {
        tally(name) == vec![1] && from_a.unconfirmed() == 0
    })?;
    c.cut("a", "b");
    wait_for(SECS_10, "a counts b lost", || !a.is_connected("b"))?;
    let told = from_a.tell(SlowMsg::Item(2));
    ensure!(
        matches!(&told, Err(DeliveryError::PeerLost { node }) if node.as_str() == "b"),
        "a tell to a lost peer: {told:?}"
    );
    let asked = block_on(from_a.ask(SlowMsg::Items, Duration::from_secs(3)));
    ensure!(
        matches!(&asked, Err(AskError::NodeLost { node }) if node.as_str() == "b"),
        "an ask to a lost peer: {asked:?}"
    );
    c.heal("a", "b");
    c.wait_connected(SECS_10)?;
    let items = block_on(async {
        from_a.tell_wait(SlowMsg::Item(3)).await?;
        from_a.ask(SlowMsg::Items, SECS_10).await
    })?;
    ensure!(items == vec![1, 3], "after the heal: {items:?}");
    ensure!(
        reported(a, svc.id(), from_a.sender_id()).is_empty(),
        "nothing was sent into the loss, so nothing is reported"
    );
    drop((svc, from_a));
    c.shutdown();
    Ok(())
}

/// A tally named `name` on a, with a handle on c, and `n` items queued behind a hold of
/// `hold_ms` sent from c.
fn tally_on_a_fed_from_c(
    c: &Cluster,
    name: &str,
    n: u64,
    hold_ms: u64,
) -> Result<(ServiceRef<Tally>, ServiceRef<Tally>)> {
    let svc = c.node("a").spawn(Tally { name: name.into() })?;
    let from_c = c.node("c").resolve::<Tally>(svc.addr())?;
    block_on(async {
        from_c.tell(SlowMsg::Hold { ms: hold_ms })?;
        for i in 1..=n {
            from_c.tell(SlowMsg::Item(i))?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let a = c.node("a");
    wait_for(SECS_10, "a has every item queued behind the hold", || {
        a.services()
            .iter()
            .any(|s| s.addr.id == svc.id() && s.mailbox_depth as u64 == n)
    })?;
    Ok((svc, from_c))
}

/// Asks `svc`'s node to move it to b from a thread of its own, left behind: the caller's node
/// dies and its call never returns.
fn migrate_to_b_in_the_background(svc: &ServiceRef<Tally>) {
    let mover = svc.clone();
    std::thread::spawn(move || block_on(mover.migrate("b", MigrateOptions::default())));
}

#[test]
fn a_copy_whose_source_dies_before_deciding_is_dropped_and_its_senders_told() -> Result<()> {
    let c = killable_cluster(&["a", "b", "c"])?;
    let (a, b) = (c.node("a"), c.node("b"));
    let n = 100;
    let (svc, from_c) = tally_on_a_fed_from_c(&c, "orphaned", n, 300)?;
    // b's answers never reach a: a never decides, b's copy waits.
    c.faults("b").cut(a.local_addr());
    migrate_to_b_in_the_background(&svc);
    wait_for(SECS_10, "b holds a prepared copy", || {
        b.services().iter().any(|s| s.addr.id == svc.id())
    })?;
    c.kill("a");
    // The source never answers: after prepared_orphan_ms the copy goes, reported.
    wait_for(SECS_10, "b drops the orphaned copy", || {
        b.stats().copies_orphaned == 1
    })?;
    ensure!(!b.services().iter().any(|s| s.addr.id == svc.id()));
    ensure!(b.events().iter().any(|e| e.kind == "copy-orphaned"));
    ensure!(b.migration_stats().arrived == 0, "the copy never ran");
    let cn = c.node("c");
    wait_for(SECS_10, "c is told about every message", || {
        let rep = reported(cn, svc.id(), from_c.sender_id());
        (2..=n + 1).all(|s| rep.contains(&s))
    })?;
    ensure!(
        tally("orphaned").is_empty(),
        "{:?} {:?} {:?}",
        tally("orphaned"),
        b.events(),
        b.migration_stats()
    );
    // Besides c's own declaration (a was lost), b refuses what the dropped copy held.
    wait_for(SECS_10, "b's refusals reach c", || {
        cn.losses()
            .iter()
            .any(|r| r.node.as_str() == "b" && r.reason.contains("was lost with node a"))
    })?;
    drop((svc, from_c));
    c.shutdown();
    Ok(())
}

/// A tally with 4,000 items queued moves a -> b with a's datagrams slowed, so the carried tail
/// is likely still streaming when `fault` strikes, right after the service starts at b. Then
/// every item must end up handled at b (once, in order) or reported to c, its sender.
fn carried_tail_then(name: &str, fault: impl FnOnce(&Cluster)) -> Result<()> {
    let c = killable_cluster(&["a", "b", "c"])?;
    let b = c.node("b");
    let n = 4_000;
    let (svc, from_c) = tally_on_a_fed_from_c(&c, name, n, 500)?;
    c.faults("a")
        .delay(Duration::from_millis(30), Duration::from_millis(5));
    migrate_to_b_in_the_background(&svc);
    wait_for(SECS_10, "the service starts at b", || {
        b.migration_stats().arrived == 1
    })?;
    fault(&c);
    let cn = c.node("c");
    let accounted = |rep: &BTreeSet<u64>| {
        // The hold is number 1, items are numbers 2.. .
        let shifted: BTreeSet<u64> = rep.iter().filter(|&&s| s > 1).map(|s| s - 1).collect();
        check_accounted(&tally(name), n, 0, &shifted)
    };
    // Settled: reports and refusals stream in.
    wait_for(
        Duration::from_secs(20),
        "every message accounted for",
        || accounted(&reported(cn, svc.id(), from_c.sender_id())).is_ok(),
    )?;
    let rep = reported(cn, svc.id(), from_c.sender_id());
    let done = accounted(&rep)?;
    eprintln!(
        "{name}: handled {done} of {n} at b; {} reported; b logged a cut stream: {}; a told senders of an unconfirmed tail: {}",
        rep.len(),
        b.events().iter().any(|e| e.kind == "snapshot-stream-cut"),
        c.node("a").events().iter().any(|e| e.kind == "carried-unconfirmed")
    );
    drop((svc, from_c));
    c.heal("a", "b");
    c.shutdown();
    Ok(())
}

#[test]
fn a_source_that_dies_right_after_commit_loses_nothing_unreported() -> Result<()> {
    carried_tail_then("source-dies", |c| c.kill("a"))
}

#[test]
fn a_target_that_dies_holding_a_prepared_copy_changes_nothing_at_the_source() -> Result<()> {
    let c = killable_cluster(&["a", "b"])?;
    let (a, b) = (c.node("a"), c.node("b"));
    let slow = a.spawn(Slow::default())?;
    block_on(async {
        slow.tell(SlowMsg::Hold { ms: 200 })?;
        for i in 1..=500 {
            slow.tell(SlowMsg::Item(i))?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    // b's Prepared never reaches a; b dies holding the copy.
    c.faults("b").cut(a.local_addr());
    let (report, handled) = block_on(async {
        let migrating = slow.migrate("b", MigrateOptions::default());
        let kill = async {
            for _ in 0..500 {
                if b.services().iter().any(|s| s.addr.id == slow.id()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            c.kill("b");
        };
        let (report, ()) = tokio::join!(migrating, kill);
        let handled = slow.ask(SlowMsg::Items, SECS_10).await?;
        Ok::<_, anyhow::Error>((crate::common::not_moved(report)?, handled))
    })?;
    // Failure before commit changes nothing: the service resumes at a with its whole queue.
    ensure!(
        matches!(
            report.aborted,
            Some(tern::AbortReason::LinkLost | tern::AbortReason::Deadline)
        ),
        "{report:?}"
    );
    ensure!(handled == (1..=500).collect::<Vec<_>>(), "{handled:?}");
    ensure!(a.location(slow.id()) == Some(a.name().clone()));
    ensure!(a.stats().messages_lost_reported == 0);
    c.shutdown();
    Ok(())
}

#[test]
fn a_carried_tail_cut_between_two_live_nodes_is_reported_to_its_senders() -> Result<()> {
    // Both live; only their connection dies (idle timeout), with the tail perhaps unsent.
    carried_tail_then("tail-cut", |c| c.cut("a", "b"))
}

/// A tell refused by a full mailbox is reported once: when the node that refused it dies
/// later, its declaration leaves out what was reported refused already, and reports the rest.
#[test]
fn a_refused_tell_is_not_reported_again_when_its_node_dies() -> Result<()> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let c = Cluster::builder()
        .node("a", &[])
        .node("b", &[])
        .limits(tern::Limits {
            mailbox_capacity: 8,
            ..crate::common::quick_to_notice()
        })
        .faults(seed)
        .setup(crate::common::register_test_kinds)
        .start()?;
    c.wait_connected(SECS_10)?;
    let (a, b) = (c.node("a"), c.node("b"));
    let svc = b.spawn(Slow::default())?;
    let from_a = a.resolve::<Slow>(svc.addr())?;
    // Busy with the hold, 8 queued behind it, then 4 refused: numbers 10..=13.
    from_a.tell(SlowMsg::Hold { ms: 5_000 })?;
    wait_for(SECS_10, "b holds", || {
        b.services()
            .iter()
            .any(|s| s.addr.id == svc.id() && s.mailbox_depth == 0)
            && from_a.unconfirmed() == 0
    })?;
    for i in 1..=12 {
        from_a.tell(SlowMsg::Item(i))?;
    }
    wait_for(SECS_10, "the four refusals reported", || {
        reported(a, svc.id(), from_a.sender_id()).len() == 4
    })?;
    c.kill("b");
    wait_for(SECS_10, "a declares what b took with it", || {
        a.losses().iter().any(|r| r.reason.contains("node lost"))
    })?;
    let mut times: std::collections::BTreeMap<u64, u32> = Default::default();
    for r in a.losses() {
        if r.service == svc.id() && r.sender == from_a.sender_id() {
            for seq in r.first_seq..=r.last_seq {
                *times.entry(seq).or_default() += 1;
            }
        }
    }
    ensure!(
        times.keys().copied().eq(2..=13) && times.values().all(|n| *n == 1),
        "each of 2..=13 reported once: {times:?}"
    );
    drop((svc, from_a));
    c.shutdown();
    Ok(())
}
