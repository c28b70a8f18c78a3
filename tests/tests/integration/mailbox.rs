//! Full mailboxes: the sender always sees an error, and nothing is dropped without one.

use anyhow::Result;
use tern::{AskError, DeliveryError, Limits, ServiceRef};
use tern_harness::{block_on, wait_for, Cluster};

use crate::common::{connected_with, register_test_kinds, Slow, SlowMsg, SECS_10};

const CAPACITY: usize = 8;

fn small_mailboxes() -> Limits {
    Limits {
        mailbox_capacity: CAPACITY,
        ..Limits::default()
    }
}

/// Starts a hold on `slow` and waits until the service has taken it (its mailbox is empty).
fn hold(node: &tern::NodeHandle, slow: &ServiceRef<Slow>, ms: u64) -> Result<()> {
    slow.tell(SlowMsg::Hold { ms })?;
    wait_for(SECS_10, "the hold to start", || {
        node.services()
            .iter()
            .any(|s| s.addr.id == slow.id() && s.mailbox_depth == 0)
    })
}

/// Nodes a and b with small mailboxes, a slow service on a, and b's handle to it.
fn slow_on_a_seen_from_b() -> Result<(Cluster, ServiceRef<Slow>, ServiceRef<Slow>)> {
    let c = connected_with(&["a", "b"], small_mailboxes())?;
    let slow = c.node("a").spawn(Slow::default())?;
    let far = c.node("b").resolve(slow.addr())?;
    Ok((c, slow, far))
}

#[test]
fn full_local_mailbox_refuses_with_an_error_and_drops_nothing() -> Result<()> {
    let c = Cluster::builder()
        .node("a", &[])
        .limits(small_mailboxes())
        .setup(register_test_kinds)
        .start()?;
    let a = c.node("a");
    let slow = a.spawn(Slow::default())?;
    hold(a, &slow, 400)?;
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 1..=20 {
        match slow.tell(SlowMsg::Item(i)) {
            Ok(()) => accepted.push(i),
            Err(DeliveryError::MailboxFull { capacity, .. }) => {
                assert_eq!(capacity, CAPACITY);
                refused += 1;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(accepted, (1..=CAPACITY as u64).collect::<Vec<_>>());
    assert_eq!(refused, 20 - CAPACITY);
    block_on(async {
        // Waiting senders get in as room frees up.
        for i in 100..=110 {
            slow.tell_wait(SlowMsg::Item(i)).await?;
            accepted.push(i);
        }
        let handled = slow.ask(SlowMsg::Items, SECS_10).await?;
        assert_eq!(
            handled, accepted,
            "every accepted message handled, in order"
        );
        Ok::<_, anyhow::Error>(())
    })?;
    assert_eq!(a.stats().refused_to_senders, (20 - CAPACITY) as u64);
    c.shutdown();
    Ok(())
}

#[test]
fn full_remote_mailbox_refusals_reach_the_sender() -> Result<()> {
    let (c, slow, far) = slow_on_a_seen_from_b()?;
    let (a, b) = (c.node("a"), c.node("b"));
    hold(a, &slow, 1_000)?;
    for i in 1..=20 {
        far.tell(SlowMsg::Item(i))?;
    }
    let refused = (20 - CAPACITY) as u64;
    wait_for(SECS_10, "refusals to come back to b", || {
        b.stats().refused_by_peers == refused
    })?;
    assert_eq!(a.stats().refused_from_peers, refused);
    assert!(b
        .events()
        .iter()
        .any(|e| e.kind == "refused-by-peer" && e.detail.contains("full")));
    block_on(async {
        // An ask into the full mailbox waits for room within its timeout: a short one expires.
        let err = far
            .ask(SlowMsg::Items, std::time::Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, AskError::Timeout { .. }), "{err}");
        let handled = far.ask(SlowMsg::Items, SECS_10).await?;
        assert_eq!(handled, (1..=CAPACITY as u64).collect::<Vec<_>>());
        Ok::<_, anyhow::Error>(())
    })?;
    c.shutdown();
    Ok(())
}

#[test]
fn waiting_remote_senders_are_held_not_refused() -> Result<()> {
    let (c, slow, far) = slow_on_a_seen_from_b()?;
    let (a, b) = (c.node("a"), c.node("b"));
    hold(a, &slow, 300)?;
    block_on(async {
        for i in 1..=40 {
            far.tell_wait(SlowMsg::Item(i)).await?;
        }
        let handled = far.ask(SlowMsg::Items, SECS_10).await?;
        assert_eq!(handled, (1..=40).collect::<Vec<_>>());
        Ok::<_, anyhow::Error>(())
    })?;
    assert!(a.stats().deliveries_held >= 1, "{:?}", a.stats());
    assert_eq!(a.stats().refused_from_peers, 0);
    assert_eq!(b.stats().refused_by_peers, 0);
    c.shutdown();
    Ok(())
}
