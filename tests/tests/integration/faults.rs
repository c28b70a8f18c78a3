//! Migrations over a network that loses, delays, reorders and cuts datagrams (the harness's
//! fault-injecting socket). Each test prints its seed; `TERN_FAULT_SEED` replays one.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use tern::{AbortReason, Limits, MigrateOptions};
use tern_actors::{SeqSender, SeqSenderMsg, SeqSink, SinkMsg};
use tern_harness::{block_on, Cluster};

use crate::common::{register_test_kinds, Slow, SlowMsg, SECS_10};

fn seed() -> u64 {
    let seed = std::env::var("TERN_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("fault seed {seed} (replay with TERN_FAULT_SEED={seed})");
    seed
}

#[test]
fn migrations_under_loss_delay_and_reordering_keep_every_promise() -> Result<()> {
    let names = ["a", "b", "c"];
    let c = names
        .iter()
        .fold(Cluster::builder(), |b, n| b.node(n, &[]))
        .faults(seed())
        .setup(register_test_kinds)
        .start()?;
    c.wait_connected(SECS_10)?;
    for n in names {
        // 5% of datagrams lost; every one held 0.5 to 2.5 ms, so they also overtake each other.
        c.faults(n).drop_rate(0.05);
        c.faults(n)
            .delay(Duration::from_micros(500), Duration::from_millis(2));
    }
    let sink = c.node("a").spawn(SeqSink::default())?;
    let mut senders = Vec::new();
    for n in ["b", "c"] {
        let node = c.node(n);
        let s = node.spawn(SeqSender::new(&format!("from-{n}")))?;
        node.book_insert(s.addr(), "sink", sink.addr())?;
        senders.push(s);
    }
    let rounds = 20;
    block_on(async {
        let mut committed = 0;
        for round in 0..rounds {
            for s in &senders {
                s.tell(SeqSenderMsg::Tell { count: 150 })?;
                s.tell(SeqSenderMsg::Ask {
                    count: 2,
                    timeout_ms: 30_000,
                })?;
            }
            let to = names[(round + 1) % 3];
            let report = sink.migrate(to, MigrateOptions::default()).await?;
            // Under loss an attempt may time out; then the sink resumes where it was.
            assert!(
                report.committed() || report.aborted == Some(AbortReason::Deadline),
                "{report:?}"
            );
            committed += usize::from(report.committed());
        }
        assert!(committed >= rounds / 2, "{committed} of {rounds} committed");
        // Everything sent arrives, once, in order; every ask was answered.
        let mut sent = BTreeMap::new();
        for (s, n) in senders.iter().zip(["b", "c"]) {
            let mut progress = (0, 0);
            for _ in 0..600 {
                progress = s.ask(SeqSenderMsg::Progress, SECS_10).await?;
                if progress.0 >= rounds as u64 * 152 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(progress, (rounds as u64 * 152, 0), "sender on {n}");
            sent.insert(format!("from-{n}"), progress.0);
        }
        let mut v = tern_actors::Verdict::default();
        for _ in 0..600 {
            v = sink.ask(SinkMsg::Report, SECS_10).await?.verdict(&sent);
            if v.received >= rounds as u64 * 304 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(v.is_clean() && v.received == rounds as u64 * 304, "{v:?}");
        Ok::<_, anyhow::Error>(())
    })?;
    let counts: Vec<_> = names.iter().map(|n| c.faults(n).counts()).collect();
    assert!(
        counts.iter().map(|k| k.dropped).sum::<u64>() > 0 && counts.iter().all(|k| k.delayed > 0),
        "the faults really happened: {counts:?}"
    );
    c.shutdown();
    Ok(())
}

/// Nodes a and b on fault-injecting sockets, with `limits`.
fn two_faulty_nodes(limits: Limits) -> Result<Cluster> {
    let c = Cluster::builder()
        .node("a", &[])
        .node("b", &[])
        .limits(limits)
        .faults(seed())
        .setup(register_test_kinds)
        .start()?;
    c.wait_connected(SECS_10)?;
    Ok(c)
}

fn two_nodes_with_a_short_deadline() -> Result<Cluster> {
    two_faulty_nodes(Limits {
        migration_deadline_ms: 800,
        ..Limits::default()
    })
}

#[test]
fn a_cut_before_commit_aborts_the_service_resumes_and_after_healing_it_moves() -> Result<()> {
    let c = two_nodes_with_a_short_deadline()?;
    let (a, b) = (c.node("a"), c.node("b"));
    let slow = a.spawn(Slow::default())?;
    block_on(async {
        for i in 1..=50 {
            slow.tell(SlowMsg::Item(i))?;
        }
        c.cut("a", "b");
        let report = crate::common::not_moved(slow.migrate("b", MigrateOptions::default()).await)?;
        assert_eq!(report.aborted, Some(AbortReason::Deadline), "{report:?}");
        for i in 51..=100 {
            slow.tell(SlowMsg::Item(i))?;
        }
        let handled = slow.ask(SlowMsg::Items, SECS_10).await?;
        assert_eq!(
            handled,
            (1..=100).collect::<Vec<_>>(),
            "resumed at a, in order"
        );
        c.heal("a", "b");
        let report = slow.migrate("b", MigrateOptions::default()).await?;
        assert!(report.committed(), "{report:?}");
        for i in 101..=150 {
            slow.tell_wait(SlowMsg::Item(i)).await?;
        }
        let handled = slow.ask(SlowMsg::Items, SECS_10).await?;
        assert_eq!(handled, (1..=150).collect::<Vec<_>>());
        Ok::<_, anyhow::Error>(())
    })?;
    assert_eq!(b.location(slow.id()), Some(b.name().clone()));
    assert_eq!(
        b.migration_stats().arrived,
        1,
        "the cut attempt never ran at b"
    );
    c.shutdown();
    Ok(())
}

#[test]
fn a_one_way_cut_stops_that_way_only() -> Result<()> {
    let c = two_nodes_with_a_short_deadline()?;
    let (a, b) = (c.node("a"), c.node("b"));
    let slow = a.spawn(Slow::default())?;
    // Nothing a sends reaches b; b still reaches a.
    c.faults("a").cut(b.local_addr());
    block_on(async {
        let report = crate::common::not_moved(slow.migrate("b", MigrateOptions::default()).await)?;
        assert_eq!(report.aborted, Some(AbortReason::Deadline), "{report:?}");
        let from_b = b.resolve::<Slow>(slow.addr())?;
        for i in 1..=20 {
            from_b.tell(SlowMsg::Item(i))?;
        }
        // The messages arrive at a; the answer cannot come back until the cut heals.
        let mut handled = Vec::new();
        for _ in 0..200 {
            handled = slow.ask(SlowMsg::Items, SECS_10).await?;
            if handled.len() == 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(handled, (1..=20).collect::<Vec<_>>());
        c.faults("a").heal(b.local_addr());
        let report = slow.migrate("b", MigrateOptions::default()).await?;
        assert!(report.committed(), "{report:?}");
        Ok::<_, anyhow::Error>(())
    })?;
    assert!(c.faults("a").counts().cut > 0);
    c.shutdown();
    Ok(())
}

/// Two nodes whose connections count a peer lost after 600 ms of silence.
fn two_nodes_that_notice_silence_fast() -> Result<Cluster> {
    two_faulty_nodes(Limits {
        idle_timeout_ms: 600,
        keep_alive_ms: 150,
        ..Limits::default()
    })
}

#[test]
fn asks_to_a_node_that_falls_silent_fail_promptly_with_node_lost() -> Result<()> {
    let c = two_nodes_that_notice_silence_fast()?;
    let (a, b) = (c.node("a"), c.node("b"));
    let slow = b.spawn(Slow::default())?;
    let from_a = a.resolve::<Slow>(slow.addr())?;
    let (result, waited) = block_on(async {
        // The service is busy, so the ask is pending when b goes silent.
        from_a.tell(SlowMsg::Hold { ms: 3_000 })?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let asking = from_a.ask(SlowMsg::Items, Duration::from_secs(30));
        let silence = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.faults("b").kill();
        };
        let (result, ()) = tokio::join!(asking, silence);
        Ok::<_, anyhow::Error>((result, started.elapsed()))
    })?;
    match result {
        Err(tern::AskError::NodeLost { node }) => assert_eq!(node.as_str(), "b"),
        other => panic!("expected NodeLost, got {other:?}"),
    }
    // Told within a few idle timeouts, not at the ask's 30 s timeout.
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    // Logged just after the waiters are woken.
    tern_harness::wait_for(SECS_10, "a logs the failed asks", || {
        a.events().iter().any(|e| e.kind == "asks-failed")
    })?;
    c.shutdown();
    Ok(())
}

#[test]
fn a_killed_node_is_noticed_its_asks_fail_and_once_restarted_it_takes_migrations_again(
) -> Result<()> {
    let mut c = two_nodes_that_notice_silence_fast()?;
    let gone = c.node("b").spawn(Slow::default())?;
    let from_a = c.node("a").resolve::<Slow>(gone.addr())?;
    c.kill("b");
    let err = block_on(from_a.ask(SlowMsg::Items, Duration::from_secs(30)));
    assert!(
        matches!(&err, Err(tern::AskError::NodeLost { node }) if node.as_str() == "b"),
        "{err:?}"
    );
    tern_harness::wait_for(SECS_10, "a notices b is gone", || {
        !c.node("a").is_connected("b")
    })?;
    drop(gone);
    c.restart("b")?;
    c.wait_connected(SECS_10)?;
    // The new b is a node like any other: a service moves there and back.
    let slow = c.node("a").spawn(Slow::default())?;
    block_on(async {
        for i in 1..=20 {
            slow.tell(SlowMsg::Item(i))?;
        }
        let report = slow.migrate("b", MigrateOptions::default()).await?;
        assert!(report.committed(), "{report:?}");
        let report = slow.migrate("a", MigrateOptions::default()).await?;
        assert!(report.committed(), "{report:?}");
        let handled = slow.ask(SlowMsg::Items, SECS_10).await?;
        assert_eq!(handled, (1..=20).collect::<Vec<_>>());
        Ok::<_, anyhow::Error>(())
    })?;
    c.shutdown();
    Ok(())
}

/// A name is bound to one key while it is connected. The same device rebooting (same
/// certificate, same address) is taken back at once, before its old connection has even timed
/// out; a new key under the same name is refused while the old connection lives, and gets in
/// only once that connection is gone. Traffic flows after each.
#[test]
fn a_connected_name_keeps_its_key_until_its_connection_is_gone() -> Result<()> {
    // Long enough that the old connection is still up when the restarted node dials.
    let mut c = two_faulty_nodes(Limits {
        idle_timeout_ms: 5_000,
        keep_alive_ms: 500,
        ..Limits::default()
    })?;
    let ups = |c: &Cluster| c.node("a").stats().connections_up;

    // The same device reboots: back at once, the old connection replaced.
    let before = ups(&c);
    c.kill("b");
    c.restart("b")?;
    tern_harness::wait_for(SECS_10, "a to take the rebooted b", || ups(&c) > before)?;
    let on_b = c.node("b").spawn(Slow::default())?;
    let from_a = c.node("a").resolve::<Slow>(on_b.addr())?;
    block_on(async {
        from_a.tell(SlowMsg::Item(1))?;
        assert_eq!(from_a.ask(SlowMsg::Items, SECS_10).await?, vec![1]);
        Ok::<_, anyhow::Error>(())
    })?;
    drop((on_b, from_a));

    // Another key under b's name while the old connection lives: refused, with a reason.
    let refused = c.node("a").stats().connections_refused;
    let before = ups(&c);
    c.kill("b");
    c.restart_with_new_certificate("b")?;
    let collision = || {
        c.node("a")
            .events()
            .into_iter()
            .rev()
            .find(|e| e.kind == "connection-refused" && e.detail.contains("name collision"))
            .map(|e| e.detail)
    };
    tern_harness::wait_for(SECS_10, "a to refuse the new key", || {
        c.node("a").stats().connections_refused > refused && collision().is_some()
    })?;
    let detail = collision().unwrap_or_default();
    assert!(detail.contains("another key"), "{detail}");
    // Once the old connection has timed out, the new key is b's.
    tern_harness::wait_for(Duration::from_secs(30), "the new b to get in", || {
        ups(&c) > before && c.node("b").is_connected("a")
    })?;
    let on_b = c.node("b").spawn(Slow::default())?;
    let from_a = c.node("a").resolve::<Slow>(on_b.addr())?;
    block_on(async {
        from_a.tell(SlowMsg::Item(2))?;
        assert_eq!(from_a.ask(SlowMsg::Items, SECS_10).await?, vec![2]);
        Ok::<_, anyhow::Error>(())
    })?;
    drop((on_b, from_a));
    c.shutdown();
    Ok(())
}
