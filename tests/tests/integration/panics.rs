//! A handler that panics (DESIGN guarantee 11): the service stops and is unhosted, the message
//! in hand and every queued message fail at once to their senders and askers with
//! `ServicePanicked`, the node logs and counts it, and keeps serving everything else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};
use tern::{AskError, DeliveryError, MigrateOptions, ReplyTo, Restart, Service, ServiceRef};
use tern_harness::{block_on, wait_for, Cluster};

use crate::common::{register_test_kinds, Slow, SlowMsg, SECS_10};

/// Held until the test releases it, so that messages queue behind a known point. One test
/// uses it; the others never send `Wait`.
static RELEASE: AtomicBool = AtomicBool::new(false);
/// Set by the handler once it holds `Wait`.
static WAITING: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Fragile {
    added: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum FragileMsg {
    /// Busy until the test releases it.
    Wait,
    Add,
    /// Panics while answering nothing.
    Boom(ReplyTo<u64>),
    Total(ReplyTo<u64>),
}

impl Service for Fragile {
    type Msg = FragileMsg;
    const KIND: &'static str = "test-fragile";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: FragileMsg, ctx: &mut tern::Ctx<Self>) {
        match msg {
            FragileMsg::Wait => {
                WAITING.store(true, Ordering::SeqCst);
                while !RELEASE.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            FragileMsg::Add => self.added += 1,
            FragileMsg::Boom(_reply) => {
                // Across an await, as real handlers do.
                tokio::task::yield_now().await;
                panic!("the fragile service broke at {}", self.added);
            }
            FragileMsg::Total(r) => {
                let _ = ctx.reply(r, self.added);
            }
        }
    }
}

fn setup(node: &tern::NodeHandle) {
    register_test_kinds(node);
    node.register::<Fragile>();
}

fn panicked_reason(e: &AskError) -> bool {
    matches!(
        e,
        AskError::Delivery(DeliveryError::ServicePanicked { detail, .. })
            if detail.contains("the fragile service broke at 1")
    )
}

#[test]
fn a_panicking_handler_fails_its_queue_at_once_and_the_node_keeps_serving() -> Result<()> {
    let c = Cluster::start(&["a", "b"], setup)?;
    c.wait_connected(SECS_10)?;
    let (a, b) = (c.node("a"), c.node("b"));
    let fragile = b.spawn(Fragile::default())?;
    let id = fragile.id();
    let remote: ServiceRef<Fragile> = a.resolve(fragile.addr())?;
    let other = b.spawn(Slow::default())?;
    let other_from_a: ServiceRef<Slow> = a.resolve(other.addr())?;

    /// An ask on a thread of its own, so that it stays pending while the test goes on.
    fn ask_in_background(
        to: &ServiceRef<Fragile>,
        make: fn(ReplyTo<u64>) -> FragileMsg,
    ) -> std::thread::JoinHandle<Result<u64, AskError>> {
        let to = to.clone();
        std::thread::spawn(move || block_on(to.ask(make, Duration::from_secs(60))))
    }
    let depth = || {
        b.services()
            .iter()
            .find(|s| s.addr.id == id)
            .map(|s| s.mailbox_depth)
    };

    block_on(async {
        fragile.tell_wait(FragileMsg::Add).await?;
        fragile.tell_wait(FragileMsg::Wait).await
    })?;
    wait_for(SECS_10, "the service holds the wait", || {
        WAITING.load(Ordering::SeqCst) && depth() == Some(0)
    })?;
    // The depth counts the message in hand. Behind the wait: the ask that panics, then tells from both nodes and two asks.
    let boom = ask_in_background(&remote, FragileMsg::Boom);
    wait_for(SECS_10, "the panicking ask is queued", || {
        depth() == Some(1)
    })?;
    block_on(async {
        for _ in 0..5 {
            remote.tell_wait(FragileMsg::Add).await?;
            fragile.tell_wait(FragileMsg::Add).await?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let remote_total = ask_in_background(&remote, FragileMsg::Total);
    let local_total = ask_in_background(&fragile, FragileMsg::Total);
    wait_for(SECS_10, "everything is queued behind the panic", || {
        depth() == Some(13)
    })?;
    RELEASE.store(true, Ordering::SeqCst);

    // The asks fail with the panic's reason, not a timeout.
    for ask in [boom, remote_total, local_total] {
        let answer = ask.join().expect("the asking thread ends");
        ensure!(
            matches!(&answer, Err(e) if panicked_reason(e)),
            "{answer:?}"
        );
    }

    // Every tell behind it is reported to its sender's node: 5 from a, 5 from b.
    for (node, sender) in [(a, remote.sender_id()), (b, fragile.sender_id())] {
        wait_for(SECS_10, "the queued tells are reported lost", || {
            node.losses()
                .iter()
                .filter(|l| l.service == id && l.sender == sender && l.reason.contains("panicked"))
                .map(|l| l.messages)
                .sum::<u64>()
                == 5
        })?;
    }
    // The service is gone from the node, counted and logged with the panic's message.
    ensure!(!b.services().iter().any(|s| s.addr.id == id));
    ensure!(b.stats().services_panicked == 1);
    ensure!(b
        .events()
        .iter()
        .any(|e| e.kind == "panicked" && e.detail.contains("the fragile service broke at 1")));

    block_on(async {
        // New messages are refused, not queued for nobody.
        ensure!(fragile.tell(FragileMsg::Add).is_err());
        let late = remote.ask(FragileMsg::Total, SECS_10).await;
        ensure!(
            late.is_err() && !matches!(late, Err(AskError::Timeout { .. })),
            "{late:?}"
        );
        // Moving it is an error at once, not a hang.
        ensure!(b.migrate(id, "a", MigrateOptions::default()).await.is_err());
        // The node keeps serving: another service there answers, from both nodes.
        other_from_a.tell_wait(SlowMsg::Item(7)).await?;
        other.tell_wait(SlowMsg::Item(8)).await?;
        let mut items = other_from_a.ask(SlowMsg::Items, SECS_10).await?;
        // Two senders: no order between them.
        items.sort_unstable();
        ensure!(items == vec![7, 8], "{items:?}");
        Ok(())
    })?;
    c.shutdown();
    Ok(())
}

/// A service whose `started` panics never runs; one spawned after it on the same node does.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BadStart;

impl Service for BadStart {
    type Msg = ReplyTo<u64>;
    const KIND: &'static str = "test-bad-start";
    const VERSION: u32 = 1;

    fn started(&mut self, _ctx: &mut tern::Ctx<Self>) {
        panic!("cannot start");
    }

    async fn handle(&mut self, msg: ReplyTo<u64>, ctx: &mut tern::Ctx<Self>) {
        let _ = ctx.reply(msg, 1);
    }
}

#[test]
fn a_panic_in_started_is_reported_too() -> Result<()> {
    let c = Cluster::start(&["a"], |n| {
        register_test_kinds(n);
        n.register::<BadStart>();
    })?;
    let a = c.node("a");
    let bad = a.spawn(BadStart)?;
    wait_for(SECS_10, "the panic in started is counted", || {
        a.stats().services_panicked == 1
    })?;
    ensure!(!a.services().iter().any(|s| s.addr.id == bad.id()));
    let r = block_on(bad.ask(|r| r, SECS_10));
    ensure!(
        r.is_err() && !matches!(r, Err(AskError::Timeout { .. })),
        "{r:?}"
    );
    let slow = a.spawn(Slow::default())?;
    block_on(slow.tell_wait(SlowMsg::Item(1)))?;
    ensure!(block_on(slow.ask(SlowMsg::Items, SECS_10))? == vec![1]);
    c.shutdown();
    Ok(())
}

/// Like `Fragile`, restarted with a fresh state after a panic, twice within a minute at most.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Phoenix {
    added: u64,
}

impl Service for Phoenix {
    type Msg = FragileMsg;
    const KIND: &'static str = "test-phoenix";
    const VERSION: u32 = 1;
    const RESTART: Option<Restart<Self>> = Some(Restart {
        fresh: Phoenix::default,
        max_restarts: 2,
        within_ms: 60_000,
    });

    async fn handle(&mut self, msg: FragileMsg, ctx: &mut tern::Ctx<Self>) {
        match msg {
            FragileMsg::Wait => {}
            FragileMsg::Add => self.added += 1,
            FragileMsg::Boom(_reply) => panic!("the phoenix burnt at {}", self.added),
            FragileMsg::Total(r) => {
                let _ = ctx.reply(r, self.added);
            }
        }
    }
}

#[test]
fn a_kind_with_a_restart_policy_goes_on_fresh_until_its_budget_is_spent() -> Result<()> {
    let c = Cluster::start(&["a", "b"], |n| {
        register_test_kinds(n);
        n.register::<Phoenix>();
    })?;
    c.wait_connected(SECS_10)?;
    let (a, b) = (c.node("a"), c.node("b"));
    let phoenix = b.spawn(Phoenix::default())?;
    let remote: ServiceRef<Phoenix> = a.resolve(phoenix.addr())?;
    let burnt = |r: &Result<u64, AskError>, at: u64| {
        matches!(r, Err(AskError::Delivery(DeliveryError::ServicePanicked { detail, .. }))
            if detail.contains(&format!("the phoenix burnt at {at}")))
    };
    block_on(async {
        remote.tell_wait(FragileMsg::Add).await?;
        remote.tell_wait(FragileMsg::Add).await?;
        let boom = remote.ask(FragileMsg::Boom, SECS_10).await;
        ensure!(burnt(&boom, 2), "{boom:?}");
        // Queued behind the panic from the same sender: handled by the fresh state.
        remote.tell_wait(FragileMsg::Add).await?;
        ensure!(remote.ask(FragileMsg::Total, SECS_10).await? == 1);
        ensure!(b.stats().services_restarted == 1 && b.stats().services_panicked == 0);

        let boom = remote.ask(FragileMsg::Boom, SECS_10).await;
        ensure!(burnt(&boom, 1), "{boom:?}");
        ensure!(phoenix.ask(FragileMsg::Total, SECS_10).await? == 0);
        ensure!(b.stats().services_restarted == 2);

        // The third panic within the minute is past the budget: it stops for good.
        let boom = remote.ask(FragileMsg::Boom, SECS_10).await;
        ensure!(burnt(&boom, 0), "{boom:?}");
        let after = remote.ask(FragileMsg::Total, SECS_10).await;
        ensure!(
            after.is_err() && !matches!(after, Err(AskError::Timeout { .. })),
            "{after:?}"
        );
        Ok(())
    })?;
    ensure!(b.stats().services_restarted == 2 && b.stats().services_panicked == 1);
    ensure!(!b.services().iter().any(|s| s.addr.id == phoenix.id()));
    ensure!(b.events().iter().filter(|e| e.kind == "restarted").count() == 2);
    c.shutdown();
    Ok(())
}
