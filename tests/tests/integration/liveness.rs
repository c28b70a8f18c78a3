//! Liveness (DESIGN guarantee 10): a refusal anywhere (a full mailbox, a tombstone, a parked
//! copy, the leftovers of a move) never leaves a hole in a sender's numbering that the live
//! window waits on. After the faults stop, the sender's channel delivers again, and every
//! message it sent was handled once, in order, or reported to it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{ensure, Result};
use tern::{Limits, MigrateOptions, ServiceRef};
use tern_harness::{block_on, wait_for};

use crate::common::{connected_with, tally, SlowMsg, Tally, SECS_10};

/// The first hole of the protocol-core work: a tell refused at the source during a freeze
/// consumed its number there, the target (restored from the windows exported before) waited
/// for it for ever, and early messages piled up behind it until the window refused everything.
/// Now the number travels with the leftovers, and every refusal reported to the sender's node
/// is also skipped where the service runs.
#[test]
fn refused_tells_during_many_moves_leave_the_channel_working() -> Result<()> {
    let limits = Limits {
        // Small enough that plain tells are refused while the service moves.
        mailbox_capacity: 16,
        tombstones_max: 4,
        losses_max: 1_000_000,
        ..Limits::default()
    };
    let c = connected_with(&["a", "b", "c"], limits)?;
    let a = c.node("a");
    let name = "live.small";
    let svc = c.node("b").spawn(Tally { name: name.into() })?;
    let id = svc.id();
    let h: ServiceRef<Tally> = a.resolve(svc.addr())?;
    let sender = h.sender_id();

    // A sender that tells as fast as it can, without waiting; `accepted` lists the items its
    // channel took (numbered 1, 2, ... in that order: a number refused at once is given back).
    let done = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (h, done) = (h.clone(), done.clone());
        std::thread::spawn(move || {
            let mut accepted = Vec::new();
            let mut item = 0u64;
            while !done.load(Ordering::SeqCst) && item < 100_000 {
                item += 1;
                if h.tell(SlowMsg::Item(item)).is_ok() {
                    accepted.push(item);
                }
                // Paced (a load generator, not a wait for a condition): bursts of 32 are
                // enough to fill a 16-message mailbox while it moves, without burying the
                // nodes under refusals.
                if item % 32 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            accepted
        })
    };
    let mut at = "b";
    let mut committed = 0;
    for round in 0..30 {
        let to = if at == "b" { "c" } else { "b" };
        let report = block_on(c.node(at).migrate(id, to, MigrateOptions::default()))?;
        ensure!(report.aborted.is_none(), "round {round}: {report:?}");
        committed += 1;
        at = to;
    }
    done.store(true, Ordering::SeqCst);
    let accepted = feeder.join().expect("the feeder ends");
    ensure!(committed == 30 && !accepted.is_empty());

    // The channel works again: a waiting tell is handled, an ask is answered.
    let last = 1_000_000;
    block_on(async {
        h.tell_wait(SlowMsg::Item(last)).await?;
        let items = h.ask(SlowMsg::Items, SECS_10).await?;
        ensure!(items.last() == Some(&last), "the last tell came last");
        Ok(())
    })?;

    // Every accepted item was handled once, in order, or reported lost to the sender.
    let handled: Vec<u64> = tally(name).into_iter().filter(|i| *i != last).collect();
    ensure!(
        handled.windows(2).all(|w| w[0] < w[1]),
        "handled in order, once each"
    );
    let lost_seqs = || -> BTreeSet<u64> {
        a.losses()
            .iter()
            .filter(|l| l.service == id && l.sender == sender)
            .flat_map(|l| l.first_seq..=l.last_seq)
            .collect()
    };
    let handled_set: BTreeSet<u64> = handled.iter().copied().collect();
    wait_for(SECS_10, "every accepted item handled or reported", || {
        let lost = lost_seqs();
        accepted
            .iter()
            .enumerate()
            .all(|(k, item)| handled_set.contains(item) || lost.contains(&(k as u64 + 1)))
    })
    .map_err(|e| {
        let lost = lost_seqs();
        let missing: Vec<_> = accepted
            .iter()
            .enumerate()
            .filter(|(k, item)| !handled_set.contains(item) && !lost.contains(&(*k as u64 + 1)))
            .take(10)
            .collect();
        e.context(format!(
            "{} accepted, {} handled, {} reported; neither (first 10, as (seq-1, item)): {missing:?}",
            accepted.len(),
            handled.len(),
            lost.len()
        ))
    })?;
    let lost = lost_seqs();
    for (k, item) in accepted.iter().enumerate() {
        ensure!(
            !(handled_set.contains(item) && lost.contains(&(k as u64 + 1))),
            "item {item} was handled and also reported lost"
        );
    }
    c.shutdown();
    Ok(())
}
