//! Tern behaves predictably around its guarantees: the user's placement decisions win, every
//! call that moves services fails the same way, a handle inside a handler sends as the
//! service, and services can be found by name across moves and node loss.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tern::{
    AbortReason, Ctx, Error, MigrateOptions, MigrationReport, NameError, NodeName, NotMoved,
    PlanOptions, Service,
};
use tern_harness::{block_on, wait_for, wait_until, Cluster};
use tern_proto::placement::Unfit;

use crate::common::{not_moved, register_test_kinds, Slow, SlowMsg, SECS_10};

/// Lyrics are better on a big screen and need a display.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Lyrics {
    /// Outcomes of the moves it asked for, as they came back to it.
    outcomes: Vec<String>,
    /// The handled items, in order.
    items: Vec<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
enum LyricsMsg {
    Item(u64),
    GoTo(String),
    Moved(Result<MigrationReport, NotMoved>),
    Report(tern::ReplyTo<(Vec<String>, Vec<u64>)>),
    /// Sends `n` to the service in its book under `"sink"`, through a handle.
    Forward(u64),
    /// Asks the book entry `role` (which may not exist) and reports the error.
    AskRole(String, tern::ReplyTo<String>),
    Stop,
    /// Moves with `ctx.migrate` and hands the returned future to a task that waits for it.
    GoAndWait(String),
    /// What that task saw.
    Waited(String),
}

impl Service for Lyrics {
    type Msg = LyricsMsg;
    const KIND: &'static str = "test-lyrics";
    const VERSION: u32 = 1;
    const REQUIRES: &'static [&'static str] = &["display"];
    const PREFERS: &'static [&'static str] = &["big-screen"];

    async fn handle(&mut self, msg: LyricsMsg, ctx: &mut Ctx<Self>) {
        match msg {
            LyricsMsg::Item(i) => self.items.push(i),
            LyricsMsg::GoTo(node) => {
                ctx.migrate_then(node, MigrateOptions::default(), LyricsMsg::Moved)
            }
            LyricsMsg::Moved(Ok(r)) => self.outcomes.push(format!("moved to {}", r.to)),
            LyricsMsg::Moved(Err(why)) => self.outcomes.push(format!("not moved: {why}")),
            LyricsMsg::Report(r) => {
                let _ = ctx.reply(r, (self.outcomes.clone(), self.items.clone()));
            }
            LyricsMsg::Forward(n) => {
                // Through a handle, not `ctx.tell`: numbered as this service all the same.
                let sent = ctx
                    .book_ref::<Slow>("sink")
                    .and_then(|sink| sink.tell(SlowMsg::Item(n)));
                if let Err(e) = sent {
                    self.outcomes.push(format!("forward failed: {e}"));
                }
            }
            LyricsMsg::AskRole(role, r) => {
                let got = ctx
                    .ask_role::<Slow, Vec<u64>>(&role, SlowMsg::Items, SECS_10)
                    .await;
                let said = match got {
                    Ok(items) => format!("{items:?}"),
                    Err(e) => e.to_string(),
                };
                let _ = ctx.reply(r, said);
            }
            LyricsMsg::Stop => ctx.stop(),
            LyricsMsg::GoAndWait(node) => {
                let moving = ctx.migrate(node, MigrateOptions::default());
                let me = ctx.myself();
                actix_rt::spawn(async move {
                    let seen = match moving.await {
                        Ok(r) => format!("waited: moved to {}", r.to),
                        Err(e) => format!("waited: {e}"),
                    };
                    let _ = me.tell(LyricsMsg::Waited(seen));
                });
            }
            LyricsMsg::Waited(seen) => self.outcomes.push(seen),
        }
    }
}

fn register(n: &tern::NodeHandle) {
    n.register::<Lyrics>();
}

/// phone (display), tv (display, big-screen), speaker (no display); each runs the test kinds
/// and the lyrics (a node added later gets only the test kinds).
fn household() -> Result<Cluster> {
    let c = ["phone", "tv", "speaker"]
        .into_iter()
        .fold(Cluster::builder(), |b, n| b.node_setup(n, register))
        .node("phone", &["display"])
        .node("tv", &["display", "big-screen"])
        .node("speaker", &["speaker"])
        .setup(register_test_kinds)
        .start()?;
    c.wait_members(SECS_10)?;
    Ok(c)
}

fn report(lyrics: &tern::ServiceRef<Lyrics>) -> Result<(Vec<String>, Vec<u64>), tern::AskError> {
    block_on(lyrics.ask(LyricsMsg::Report, SECS_10))
}

#[test]
fn the_users_moves_win_and_nothing_moves_unasked() -> Result<()> {
    let c = household()?;
    let (phone, tv) = (c.node("phone"), c.node("tv"));
    // On the phone, which lacks its preferred big screen: before, the first gossip round
    // moved it to the tv by itself. Now only the rebalancer (off by default) weighs that.
    let lyrics = phone.spawn(Lyrics::default())?;
    phone.set_capabilities(&["display", "touch"]);
    let change = phone.stats().capability_changes;
    wait_for(
        SECS_10,
        "the phone's re-placement round for that change",
        || phone.stats().capability_changes_handled >= change,
    )?;
    assert_eq!(phone.location(lyrics.id()), Some(NodeName::new("phone")));
    assert!(!phone.events().iter().any(|e| e.kind == "re-placed"));
    // The user moves it to the tv, then back to the phone: the user's word holds there,
    // even against a rebalancer that would bring it to its big screen.
    block_on(lyrics.migrate("tv", MigrateOptions::default()))?;
    let back = block_on(lyrics.migrate("phone", MigrateOptions::default()))?;
    assert_eq!(back.to.as_str(), "phone");
    assert!(phone.is_held(lyrics.id()));
    // No cool-down: a round whose move the phone refused (held) would otherwise keep the
    // service out of the rounds below for a while.
    let cfg = tern::RebalancerConfig {
        cooldown_ms: 0,
        ..tern::RebalancerConfig::default()
    };
    let round = block_on(tv.rebalance_now(&cfg));
    // Either the tv knew of the hold from gossip and planned nothing for it, or it did not yet
    // and the phone, which runs it, refused.
    assert!(
        round
            .moves
            .iter()
            .all(|(m, outcome)| m.service != lyrics.id()
                || outcome.as_deref().is_some_and(|o| o.contains("held"))),
        "the rebalancer left the held service alone: {round:?}"
    );
    assert_eq!(phone.location(lyrics.id()), Some(NodeName::new("phone")));
    wait_for(SECS_10, "the tv to hear of the hold", || {
        tv.members()
            .iter()
            .any(|m| m.info.name.as_str() == "phone" && m.info.held.contains(&lyrics.id()))
    })?;
    let round = block_on(tv.rebalance_now(&cfg));
    assert!(
        round.moves.iter().all(|(m, _)| m.service != lyrics.id()),
        "knowing of the hold, it plans nothing for it: {round:?}"
    );
    // Released, the rebalancer may bring it to the big screen.
    assert!(phone.release(lyrics.id())?, "it was held");
    wait_for(SECS_10, "the tv to hear it is released", || {
        tv.members()
            .iter()
            .any(|m| m.info.name.as_str() == "phone" && !m.info.held.contains(&lyrics.id()))
    })?;
    let round = block_on(tv.rebalance_now(&cfg));
    let moved = round
        .moves
        .iter()
        .find(|(m, _)| m.service == lyrics.id())
        .unwrap_or_else(|| panic!("released, it moves for its preference: {round:?}"));
    assert_eq!(moved.0.to.as_str(), "tv", "{round:?}");
    assert!(moved.1.is_none(), "{round:?}");
    wait_for(SECS_10, "the lyrics on the tv", || {
        tv.location(lyrics.id()) == Some(NodeName::new("tv"))
    })?;
    assert!(
        !tv.is_held(lyrics.id()),
        "a move the user did not ask for holds nothing"
    );
    block_on(lyrics.tell_wait(LyricsMsg::Item(1)))?;
    assert_eq!(report(&lyrics)?.1, vec![1]);
    c.shutdown();
    Ok(())
}

#[test]
fn a_move_to_a_node_that_cannot_take_it_is_refused_before_anything_freezes() -> Result<()> {
    let mut c = household()?;
    let (phone, tv, speaker) = (
        c.node("phone").clone(),
        c.node("tv").clone(),
        c.node("speaker").clone(),
    );
    let lyrics = phone.spawn(Lyrics::default())?;
    block_on(lyrics.tell_wait(LyricsMsg::Item(1)))?;
    // No display on the speaker: before, the move went through and the lyrics stayed there.
    let r = not_moved(block_on(phone.migrate(
        lyrics.id(),
        "speaker",
        MigrateOptions::default(),
    )))?;
    match &r.aborted {
        Some(AbortReason::Unfit(Unfit::LacksCapability { node, missing })) => {
            assert_eq!(
                (node.as_str(), missing.as_slice()),
                ("speaker", &["display".to_string()][..])
            )
        }
        other => panic!("expected the missing display, got {other:?}"),
    }
    assert_eq!(r.frozen_after_us, 0, "nothing froze: {r:?}");
    assert_eq!(phone.location(lyrics.id()), Some(NodeName::new("phone")));
    // Draining: before, `migrate` committed right after the drain.
    let drained = block_on(tv.drain());
    assert!(drained.failed.is_empty(), "{drained:?}");
    // (A move the phone asks for before it hears of the drain is refused by the tv itself,
    // after the freeze: `frames` tests that path.)
    wait_for(SECS_10, "the phone to hear the tv drains", || {
        phone
            .members()
            .iter()
            .any(|m| m.info.name.as_str() == "tv" && m.info.draining)
    })?;
    let r = not_moved(block_on(phone.migrate(
        lyrics.id(),
        "tv",
        MigrateOptions::default(),
    )))?;
    assert!(
        matches!(&r.aborted, Some(AbortReason::Unfit(Unfit::Draining { node })) if node.as_str() == "tv"),
        "{r:?}"
    );
    // The error says what is missing, in words.
    let e = block_on(phone.migrate(lyrics.id(), "tv", MigrateOptions::default()))
        .expect_err("still draining");
    assert!(e.to_string().contains("node tv is draining"), "{e}");
    // Forced, it goes where it was told, and the speaker has no kind to force.
    let forced = MigrateOptions {
        force: true,
        ..MigrateOptions::default()
    };
    let moved = block_on(phone.migrate(lyrics.id(), "tv", forced))?;
    assert_eq!(moved.to.as_str(), "tv");
    // A laptop joins the running cluster without the lyrics kind: it cannot run it, forced or
    // not, and the plan leaves it out (before, `plan` proposed nodes that never registered a
    // kind, and `place` then aborted).
    c.add_node("laptop", &["display", "big-screen"], register_test_kinds)?;
    c.wait_members(SECS_10)?;
    let r = not_moved(block_on(tv.migrate(lyrics.id(), "laptop", forced)))?;
    assert!(
        matches!(&r.aborted, Some(AbortReason::Unfit(Unfit::LacksKind { node, .. })) if node.as_str() == "laptop"),
        "{r:?}"
    );
    let plan = tv.plan(&[lyrics.id()], &PlanOptions::default())?;
    assert!(
        plan.stays
            .iter()
            .chain(&plan.moves)
            .flat_map(|m| &m.reasons)
            .any(|why| why == "laptop: has not registered kind test-lyrics@1"),
        "{plan:?}"
    );
    // Forced onto the speaker, which lacks the display: the user's word.
    let moved = block_on(tv.migrate(lyrics.id(), "speaker", forced))?;
    assert_eq!(moved.to.as_str(), "speaker");
    // Messages kept flowing in order through all of it.
    block_on(lyrics.tell_wait(LyricsMsg::Item(2)))?;
    wait_until_items(&lyrics, &[1, 2])?;
    drop((phone, tv, speaker));
    c.shutdown();
    Ok(())
}

fn wait_until_items(lyrics: &tern::ServiceRef<Lyrics>, want: &[u64]) -> Result<()> {
    block_on(wait_until(SECS_10, "the items in order", || async {
        lyrics
            .ask(LyricsMsg::Report, SECS_10)
            .await
            .is_ok_and(|(_, items)| items == want)
    }))
}
#[test]
fn migrate_place_and_ctx_migrate_fail_the_same_way_with_the_report() -> Result<()> {
    // The tv refuses every snapshot (none fits its snapshot_bytes_max): nothing tells that
    // before the freeze.
    let tiny = tern::Limits {
        snapshot_bytes_max: 1,
        ..tern::Limits::default()
    };
    let c = Cluster::builder()
        .node("phone", &["display"])
        .node("tv", &["display", "big-screen"])
        .node("watch", &["display"])
        .node("speaker", &["speaker"])
        .node_limits("tv", tiny)
        .setup(|n| {
            register_test_kinds(n);
            register(n);
        })
        .start()?;
    c.wait_members(SECS_10)?;
    let phone = c.node("phone");
    let lyrics = phone.spawn(Lyrics::default())?;
    // `place` with a plan nobody can carry out: nothing moves, the error lists why.
    let to = |node: &str| PlanOptions {
        to: Some(node.into()),
        ..PlanOptions::default()
    };
    match block_on(phone.place(&[lyrics.id()], &to("speaker"))) {
        Err(Error::NotMoved(n)) => {
            assert!(n.reports.is_empty(), "{n:?}");
            assert_eq!(n.refused.len(), 1, "{n:?}");
            assert!(
                n.to_string().contains("speaker: lacks required display"),
                "{n}"
            );
        }
        other => panic!("expected the refused plan, got {other:?}"),
    }
    // `place` whose target refuses after the freeze (before: `Ok` with `committed: false`).
    match block_on(phone.place(&[lyrics.id()], &to("tv"))) {
        Err(Error::NotMoved(n)) => {
            let r = &n.reports[0];
            assert_eq!(
                (r.service, r.from.as_str(), r.to.as_str()),
                (lyrics.id(), "phone", "tv")
            );
            assert!(
                matches!(&r.aborted, Some(AbortReason::Refused(w)) if w.contains("snapshot_bytes_max")),
                "{r:?}"
            );
        }
        other => panic!("expected the target's refusal, got {other:?}"),
    }
    // `ctx.migrate`: the outcome comes back to the service, moved or not (before, it went only
    // to the event log), wherever it runs then.
    for to in ["nowhere", "speaker", "watch"] {
        block_on(lyrics.tell_wait(LyricsMsg::GoTo(to.into())))?;
    }
    block_on(wait_until(SECS_10, "the three outcomes", || async {
        lyrics
            .ask(LyricsMsg::Report, SECS_10)
            .await
            .is_ok_and(|(o, _)| o.len() == 3)
    }))?;
    // And the future `ctx.migrate` returns, waited for by a task of the service's.
    block_on(lyrics.tell_wait(LyricsMsg::GoAndWait("speaker".into())))?;
    block_on(wait_until(SECS_10, "the waited outcome", || async {
        lyrics
            .ask(LyricsMsg::Report, SECS_10)
            .await
            .is_ok_and(|(o, _)| o.len() == 4)
    }))?;
    let (outcomes, _) = report(&lyrics)?;
    assert!(
        outcomes[3].starts_with("waited: ") && outcomes[3].contains("lacks required display"),
        "{outcomes:?}"
    );
    // The three moves run as their own tasks: their outcomes come back in whatever order they
    // end.
    let first_three = &outcomes[..3];
    let one = |what: &dyn Fn(&String) -> bool| first_three.iter().filter(|o| what(o)).count() == 1;
    assert!(one(&|o| o.contains("not a known peer")), "{outcomes:?}");
    assert!(
        one(&|o| o.contains("node speaker lacks required display")),
        "{outcomes:?}"
    );
    assert!(one(&|o| o == "moved to watch"), "{outcomes:?}");
    assert_eq!(
        c.node("watch").location(lyrics.id()),
        Some(NodeName::new("watch"))
    );
    c.shutdown();
    Ok(())
}

#[test]
fn a_handle_inside_a_handler_sends_as_the_service_and_a_missing_role_is_named() -> Result<()> {
    let c = household()?;
    let (phone, tv, speaker) = (c.node("phone"), c.node("tv"), c.node("speaker"));
    let sink = speaker.spawn(Slow::default())?;
    let lyrics = phone.spawn(Lyrics::default())?;
    phone.book_insert(&lyrics, "sink", sink.addr())?;
    let n = 200u64;
    block_on(async {
        for i in 1..=n / 2 {
            lyrics.tell_wait(LyricsMsg::Forward(i)).await?;
        }
        // It moves while it forwards: its messages keep their order (one channel).
        lyrics.migrate("tv", MigrateOptions::default()).await?;
        for i in n / 2 + 1..=n {
            lyrics.tell_wait(LyricsMsg::Forward(i)).await?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let want: Vec<u64> = (1..=n).collect();
    block_on(wait_until(
        SECS_10,
        "every forwarded item, in order",
        || async {
            sink.ask(SlowMsg::Items, SECS_10)
                .await
                .is_ok_and(|h| h == want)
        },
    ))?;
    // The sink heard two senders: the lyrics service (from the phone, then from the tv, on
    // one channel) and this test's asks. Before, the handle sent as the phone's client and
    // then as the tv's: two more.
    let windows = speaker
        .services()
        .into_iter()
        .find(|s| s.addr.id == sink.id())
        .map(|s| s.sender_windows);
    assert_eq!(windows, Some(2), "senders seen by the sink");
    assert!(report(&lyrics)?.0.is_empty(), "no forward failed");
    // A role the book does not have is named (before: "service <its own id> is not known").
    let why = block_on(lyrics.ask(|r| LyricsMsg::AskRole("playlist".into(), r), SECS_10))?;
    assert!(
        why.contains("has no entry \"playlist\" in its book"),
        "{why}"
    );
    let _ = tv;
    c.shutdown();
    Ok(())
}

#[test]
fn names_find_a_service_across_moves_and_go_with_it_or_its_node() -> Result<()> {
    let c = crate::common::killable_cluster(&["a", "b", "c", "d"])?;
    for n in c.nodes() {
        register(n);
    }
    let (a, b, d) = (c.node("a"), c.node("b"), c.node("d"));
    let board = a.spawn(Slow::default())?;
    a.register_name("board", board.id())?;
    // Another service cannot take the name; the holder may register it again.
    let other = a.spawn(Slow::default())?;
    match a.register_name("board", other.id()) {
        Err(Error::Name(NameError::Taken { holder, .. })) => assert_eq!(holder, board.id()),
        r => panic!("expected the name to be taken, got {r:?}"),
    }
    a.register_name("board", board.id())?;
    // Only where the service runs.
    match d.register_name("board2", board.id()) {
        Err(Error::Name(NameError::NotHere { node, .. })) => assert_eq!(node.as_str(), "d"),
        r => panic!("expected the service not to run on d, got {r:?}"),
    }
    // Found from another node, as a typed handle.
    wait_for(SECS_10, "d to learn the name", || {
        d.lookup::<Slow>("board").is_ok()
    })?;
    let from_d = d.lookup::<Slow>("board")?;
    match d.lookup::<Lyrics>("board") {
        Err(Error::Delivery(tern::DeliveryError::KindMismatch { .. })) => {}
        r => panic!("expected a kind mismatch, got {:?}", r.map(|h| h.id())),
    }
    block_on(from_d.tell_wait(SlowMsg::Item(1)))?;
    // The name moves with the service; a node elsewhere finds it there.
    block_on(board.migrate("b", MigrateOptions::default()))?;
    wait_for(SECS_10, "d to hear the name from b", || {
        d.members().iter().any(|m| {
            m.info.name.as_str() == "b"
                && m.info
                    .names
                    .iter()
                    .any(|(n, id)| n == "board" && *id == board.id())
        })
    })?;
    let again = d.lookup::<Slow>("board")?;
    assert_eq!(again.id(), board.id());
    block_on(again.tell_wait(SlowMsg::Item(2)))?;
    block_on(from_d.tell_wait(SlowMsg::Item(3)))?;
    let handled = block_on(again.ask(SlowMsg::Items, SECS_10))?;
    assert_eq!(
        handled,
        vec![1, 2, 3],
        "one service, reached by either handle, in order"
    );
    // An unregistered name goes, and so do the names of a service that stops.
    let scratch = b.spawn(Slow::default())?;
    b.register_name("scratch", scratch.id())?;
    let stops = b.spawn(Lyrics::default())?;
    b.register_name("stops", stops.id())?;
    wait_for(SECS_10, "d to learn both names", || {
        d.lookup::<Slow>("scratch").is_ok() && d.lookup::<Lyrics>("stops").is_ok()
    })?;
    assert!(b.unregister_name("scratch", scratch.id()));
    block_on(stops.tell_wait(LyricsMsg::Stop))?;
    wait_for(SECS_10, "both names to go", || {
        d.lookup::<Slow>("scratch").is_err() && d.lookup::<Lyrics>("stops").is_err()
    })?;
    assert!(
        b.lookup::<Lyrics>("stops").is_err(),
        "gone at once where it ran"
    );
    // Its node is lost: the name goes with it, and is free again.
    c.kill("b");
    wait_for(SECS_10, "the name to go with b", || {
        matches!(
            d.lookup::<Slow>("board"),
            Err(Error::Name(NameError::Unknown { .. }))
        )
    })?;
    let successor = d.spawn(Slow::default())?;
    d.register_name("board", successor.id())?;
    wait_for(SECS_10, "a to find the new board", || {
        a.lookup::<Slow>("board")
            .is_ok_and(|h| h.id() == successor.id())
    })?;
    c.shutdown();
    Ok(())
}
