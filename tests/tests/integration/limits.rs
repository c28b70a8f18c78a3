//! Node limits at their bounds: each has a defined behaviour, an error that says which limit,
//! and the node goes on (docs/limits.md lists them all).

use std::collections::BTreeMap;

use anyhow::Result;
use tern::{AbortReason, Error, Limits, MigrateOptions, NodeHandle};
use tern_actors::{SeqSink, SinkMsg};
use tern_harness::{block_on, wait_for, Cluster};

use crate::common::{connected, register_test_kinds, Burst, BurstMsg, Slow, SlowMsg, SECS_10};

#[test]
fn a_full_service_table_refuses_spawns_and_migrations_and_the_service_stays_put() -> Result<()> {
    let tight = Limits {
        services_max: 1,
        events_max: 8,
        ..Limits::default()
    };
    let c = Cluster::builder()
        .node("a", &[])
        .node("b", &[])
        .node_limits("b", tight)
        .setup(register_test_kinds)
        .start()?;
    c.wait_connected(SECS_10)?;
    let (a, b) = (c.node("a"), c.node("b"));
    let _resident = b.spawn(Slow::default())?;
    match b.spawn(Slow::default()) {
        Err(Error::Limit { what, max: 1 }) => assert!(what.contains("services"), "{what}"),
        other => panic!(
            "expected the services limit, got {:?}",
            other.map(|s| s.id())
        ),
    }
    let mover = a.spawn(Slow::default())?;
    block_on(async {
        for round in 0..12u64 {
            mover.tell(SlowMsg::Item(round))?;
            let report = crate::common::not_moved(
                a.migrate(mover.id(), "b", MigrateOptions::default()).await,
            )?;
            match &report.aborted {
                Some(AbortReason::Refused(why)) => {
                    assert!(why.contains("services on this node"), "{why}")
                }
                other => panic!("expected a refusal for the full table, got {other:?}"),
            }
        }
        // Still at a, with every message handled in order.
        let handled = mover.ask(SlowMsg::Items, SECS_10).await?;
        assert_eq!(handled, (0..12).collect::<Vec<_>>());
        Ok::<_, anyhow::Error>(())
    })?;
    // Twelve refusals and more were logged on b; the log kept the newest eight.
    let events = b.events();
    assert_eq!(events.len(), 8, "{events:?}");
    assert!(events.iter().any(|e| e.kind == "migration-refused"));
    assert_eq!(b.migration_stats().refused_in.values().sum::<u64>(), 12);
    c.shutdown();
    Ok(())
}

#[test]
fn the_tombstone_table_forgets_its_oldest_past_its_bound() -> Result<()> {
    let c = Cluster::builder()
        .node("a", &[])
        .node("b", &[])
        .node("c", &[])
        .node_limits(
            "a",
            Limits {
                tombstones_max: 2,
                ..Limits::default()
            },
        )
        .setup(register_test_kinds)
        .start()?;
    c.wait_connected(SECS_10)?;
    let a = c.node("a").clone();
    // c is known and gone, so no tombstone on a is ever fenced away: only the bound acts.
    c.node("c").shutdown();
    wait_for(SECS_10, "a sees c down", || !a.is_connected("c"))?;
    let movers: Vec<_> = (0..5)
        .map(|_| a.spawn(Slow::default()))
        .collect::<Result<_, _>>()?;
    block_on(async {
        for m in &movers {
            let r = a.migrate(m.id(), "b", MigrateOptions::default()).await?;
            assert!(r.committed(), "{r:?}");
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let s = a.migration_stats();
    assert_eq!((s.tombstones, s.committed), (2, 5), "{s:?}");
    // The services themselves are fine at b, whatever a remembers.
    block_on(async {
        for m in &movers {
            m.tell_wait(SlowMsg::Item(1)).await?;
            let h = m.ask(SlowMsg::Items, SECS_10).await?;
            assert_eq!(h, vec![1]);
        }
        Ok::<_, anyhow::Error>(())
    })?;
    c.shutdown();
    Ok(())
}

/// A sender that stops leaves no receive window behind: its node tells each receiver its last
/// number, and the window goes once everything it sent is in, also when the receiver moved
/// while their messages were on their way. Every message arrives once, in order, and traffic
/// flows on afterwards.
#[test]
fn stopped_senders_leave_no_window_behind_even_across_a_move() -> Result<()> {
    let c = connected(&["a", "b", "c"])?;
    let (a, b, cn) = (
        c.node("a").clone(),
        c.node("b").clone(),
        c.node("c").clone(),
    );
    let sink = b.spawn(SeqSink::default())?;
    let windows = |n: &NodeHandle| {
        n.services()
            .into_iter()
            .find(|s| s.addr.id == sink.id())
            .map(|s| s.sender_windows)
    };
    let mut sent = BTreeMap::new();
    let mut burst = |n: &NodeHandle, name: String, count: u64| -> Result<()> {
        let s = n.spawn(Burst { name: name.clone() })?;
        n.book_insert(s.addr(), "sink", sink.addr())?;
        s.tell(BurstMsg::Go { count })?;
        sent.insert(name, count);
        Ok(())
    };
    // Remote senders on a, local ones on b; the sink moves to c while they send.
    for i in 0..8 {
        burst(&a, format!("a{i}"), 300)?;
    }
    for i in 0..4 {
        burst(&b, format!("b{i}"), 300)?;
    }
    block_on(async {
        let r = b.migrate(sink.id(), "c", MigrateOptions::default()).await?;
        assert!(r.committed(), "{r:?}");
        Ok::<_, anyhow::Error>(())
    })?;
    wait_for(SECS_10, "every stopped sender's window at c to go", || {
        windows(&cn) == Some(0)
    })?;
    // A sender that comes after is served, and its window goes too.
    burst(&a, "late".into(), 50)?;
    let total: u64 = sent.values().sum();
    let report = |sink: &tern::ServiceRef<SeqSink>| block_on(sink.ask(SinkMsg::Report, SECS_10));
    wait_for(SECS_10, "every message at the sink", || {
        report(&sink).is_ok_and(|r| r.received() >= total)
    })?;
    let verdict = report(&sink)?.verdict(&sent);
    assert!(
        verdict.is_clean() && verdict.received == total,
        "{verdict:?}"
    );
    // What stays is the window of the handle that asked for the reports: it has not stopped.
    wait_for(SECS_10, "the late sender's window to go", || {
        windows(&cn) == Some(1)
    })?;
    c.shutdown();
    Ok(())
}

#[test]
fn the_peer_table_is_bounded() -> Result<()> {
    let c = Cluster::builder()
        .node("a", &[])
        .node_limits(
            "a",
            Limits {
                peers_max: 1,
                ..Limits::default()
            },
        )
        .setup(register_test_kinds)
        .start()?;
    let a = c.node("a");
    a.add_peer("x", "127.0.0.1:9".parse()?)?;
    match a.add_peer("y", "127.0.0.1:9".parse()?) {
        Err(Error::Limit { what, max: 1 }) => assert!(what.contains("peer"), "{what}"),
        other => panic!("expected the peers limit, got {other:?}"),
    }
    c.shutdown();
    Ok(())
}
