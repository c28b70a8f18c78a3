//! Sleeping services: an idle service's runner ends and its state waits on its node's thread
//! (`Limits::sleep_after_idle_ms`); a message, an ask, a move or a timer's end wakes it with
//! its state, its order and its numbering as they were.

use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tern::{Ctx, Limits, MigrateOptions, ReplyTo, Service};
use tern_actors::{SeqSender, SeqSenderMsg, SeqSink, SinkMsg};
use tern_harness::{block_on, wait_for, wait_until, Cluster};

use crate::common::{register_test_kinds, SECS_10};

/// Keeps what it is told, counts its starts, and can set a timer.
#[derive(Default, Serialize, Deserialize)]
struct Napper {
    items: Vec<u64>,
    starts: u32,
    rang: u32,
}

#[derive(Serialize, Deserialize)]
enum NapMsg {
    Item(u64),
    Items(ReplyTo<(Vec<u64>, u32, u32)>),
    Alarm { ms: u64 },
    Ring,
}

impl Service for Napper {
    type Msg = NapMsg;
    const KIND: &'static str = "test-napper";
    const VERSION: u32 = 1;

    fn started(&mut self, _ctx: &mut Ctx<Self>) {
        self.starts += 1;
    }

    async fn handle(&mut self, msg: NapMsg, ctx: &mut Ctx<Self>) {
        match msg {
            NapMsg::Item(i) => self.items.push(i),
            NapMsg::Items(r) => {
                let _ = ctx.reply(r, (self.items.clone(), self.starts, self.rang));
            }
            NapMsg::Alarm { ms } => {
                let _ = ctx.schedule(Duration::from_millis(ms), NapMsg::Ring);
            }
            NapMsg::Ring => self.rang += 1,
        }
    }
}

/// Services sleep after 20 to 40 ms idle.
fn sleepy() -> Limits {
    Limits {
        sleep_after_idle_ms: 20,
        ..Limits::default()
    }
}

fn cluster(names: &[&str], limits: Limits) -> Result<Cluster> {
    let c = names
        .iter()
        .fold(Cluster::builder(), |b, n| b.node(n, &[]))
        .limits(limits)
        .setup(|n| {
            register_test_kinds(n);
            n.register::<Napper>();
        })
        .start()?;
    c.wait_connected(SECS_10)?;
    Ok(c)
}

fn asleep(node: &tern::NodeHandle, n: u64) -> Result<()> {
    wait_for(
        SECS_10,
        &format!("{n} services asleep on {}", node.name()),
        || node.stats().services_asleep == n,
    )
}

#[test]
fn an_idle_service_sleeps_and_messages_wake_it_with_its_state_in_order() -> Result<()> {
    let c = cluster(&["a", "b"], sleepy())?;
    let (a, b) = (c.node("a"), c.node("b"));
    let nap = a.spawn(Napper::default())?;
    // From outside any service, and from another node: both wake it.
    let from_b = b.resolve::<Napper>(nap.addr())?;
    block_on(async {
        for i in 1..=3 {
            nap.tell(NapMsg::Item(i))?;
        }
        asleep(a, 1)?;
        let slept = a.stats().services_slept;
        assert!(slept >= 1, "{:?}", a.stats());
        // Woken by a tell; the next ones queue behind it whether or not it is awake yet.
        for i in 4..=200 {
            nap.tell(NapMsg::Item(i))?;
        }
        let (items, starts, _) = nap.ask(NapMsg::Items, SECS_10).await?;
        assert_eq!(items, (1..=200).collect::<Vec<_>>(), "in order, each once");
        assert_eq!(starts, 1, "waking is not starting again");
        assert!(a.stats().services_woken >= 1);
        // Asleep again, then woken by an ask from the other node.
        asleep(a, 1)?;
        for i in 201..=300 {
            from_b.tell_wait(NapMsg::Item(i)).await?;
        }
        let (items, starts, _) = from_b.ask(NapMsg::Items, SECS_10).await?;
        assert_eq!(items, (1..=300).collect::<Vec<_>>());
        assert_eq!(starts, 1);
        assert!(a.stats().services_slept > slept, "it slept again");
        Ok::<_, anyhow::Error>(())
    })?;
    c.shutdown();
    Ok(())
}

#[test]
fn a_sleeping_sender_keeps_its_numbering_when_woken() -> Result<()> {
    // The sender sleeps between its rounds, with its channel's numbers in its sleeping
    // state: numbering that started again would be dropped by the sink's window as copies.
    let c = cluster(&["a", "b"], sleepy())?;
    let (a, b) = (c.node("a"), c.node("b"));
    let sink = b.spawn(SeqSink::default())?;
    let sender = a.spawn(SeqSender::new("x"))?;
    a.book_insert(sender.addr(), "sink", sink.addr())?;
    block_on(async {
        for round in 1..=3u64 {
            sender.tell(SeqSenderMsg::Tell { count: 100 })?;
            wait_until(SECS_10, "the sink to take the round", || async {
                sink.ask(SinkMsg::Report, SECS_10)
                    .await
                    .is_ok_and(|r| r.received() == 100 * round)
            })
            .await?;
            // Both asleep before the next round.
            asleep(a, 1)?;
            asleep(b, 1)?;
        }
        let report = sink.ask(SinkMsg::Report, SECS_10).await?;
        let sent = std::collections::BTreeMap::from([("x".to_string(), 300)]);
        let v = report.verdict(&sent);
        assert!(v.is_clean(), "{v:?}");
        assert_eq!(v.received, 300);
        // And traffic still flows after the last sleep.
        sender.tell(SeqSenderMsg::Tell { count: 10 })?;
        wait_until(SECS_10, "ten more", || async {
            sink.ask(SinkMsg::Report, SECS_10)
                .await
                .is_ok_and(|r| r.received() == 310)
        })
        .await?;
        Ok::<_, anyhow::Error>(())
    })?;
    c.shutdown();
    Ok(())
}

#[test]
fn a_sleeping_service_moves_when_asked_and_sleeps_again_at_its_target() -> Result<()> {
    let c = cluster(&["a", "b"], sleepy())?;
    let (a, b) = (c.node("a"), c.node("b"));
    let nap = a.spawn(Napper::default())?;
    block_on(async {
        for i in 1..=50 {
            nap.tell(NapMsg::Item(i))?;
        }
        asleep(a, 1)?;
        let report = a.migrate(nap.id(), "b", MigrateOptions::default()).await?;
        assert!(report.committed(), "{report:?}");
        assert!(a.services().iter().all(|s| s.addr.id != nap.id()));
        asleep(b, 1)?;
        // Traffic flows to it where it is now, and wakes it there.
        for i in 51..=100 {
            nap.tell_wait(NapMsg::Item(i)).await?;
        }
        let (items, starts, _) = nap.ask(NapMsg::Items, SECS_10).await?;
        assert_eq!(items, (1..=100).collect::<Vec<_>>());
        // Started on each node that ran it (`Service::started`), not at each wake.
        assert_eq!(starts, 2);
        assert_eq!(nap.location().as_str(), "b");
        Ok::<_, anyhow::Error>(())
    })?;
    c.shutdown();
    Ok(())
}

#[test]
fn a_service_with_a_timer_pending_stays_awake_until_it_fires() -> Result<()> {
    let c = cluster(&["a"], sleepy())?;
    let a = c.node("a");
    let nap = a.spawn(Napper::default())?;
    let other = a.spawn(Napper::default())?;
    block_on(async {
        // Long enough for several sweeps to ask it to sleep.
        nap.tell(NapMsg::Alarm { ms: 300 })?;
        other.tell(NapMsg::Item(1))?;
        // The other one sleeps; the one with the timer does not (it would never ring).
        asleep(a, 1)?;
        wait_until(SECS_10, "the alarm to ring", || async {
            nap.ask(NapMsg::Items, SECS_10)
                .await
                .is_ok_and(|(_, _, rang)| rang == 1)
        })
        .await?;
        // Rung, nothing pending: it sleeps too.
        asleep(a, 2)?;
        Ok::<_, anyhow::Error>(())
    })?;
    c.shutdown();
    Ok(())
}
