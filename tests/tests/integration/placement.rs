//! Placement over real QUIC: membership through seeds, split placement by capability (all or
//! none), drain under load, capability changes, and the rebalancer converging.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Result};
use tern::{
    Limits, MemberStatus, NodeHandle, PlanOptions, Power, RebalancerConfig, ServiceId, ServiceRef,
};
use tern_actors::{Chatter, ChatterMsg};
use tern_harness::{block_on, wait_for, Cluster};

use crate::common::{
    connected, register_test_kinds, tally, DisplayRelay, Relay, RelayMsg, SpeakerRelay, SECS_10,
};
use crate::trees::{check_tallies, relay_tree};

/// Feeds items `1..=n` to `root` from another thread, a little at a time.
fn feed(root: ServiceRef<Relay>, n: u64) -> std::thread::JoinHandle<Result<()>> {
    std::thread::spawn(move || {
        block_on(async {
            for i in 1..=n {
                root.tell_wait(RelayMsg::Item(i)).await?;
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            Ok(())
        })
    })
}

fn wait_tally(name: &str, n: u64) -> Result<()> {
    wait_for(
        Duration::from_secs(30),
        &format!("{name} to handle {n}"),
        || tally(name).len() as u64 >= n,
    )
}

fn ensure_exact(name: &str, n: u64) -> Result<()> {
    let got = tally(name);
    ensure!(
        got == (1..=n).collect::<Vec<_>>(),
        "{name} handled {} items, not 1..={n} once each in order",
        got.len()
    );
    Ok(())
}

#[test]
fn nodes_joining_through_one_seed_learn_each_other_and_notice_a_leaver() -> Result<()> {
    let c = Cluster::builder()
        .node("hub", &[])
        .node("tv", &["display", "speaker"])
        .node("car", &["display", "speaker", "input"])
        .unconnected()
        .setup(register_test_kinds)
        .start()?;
    let (hub, tv, car) = (c.node("hub"), c.node("tv"), c.node("car"));
    // tv and car know only the hub.
    tv.add_peer("hub", hub.local_addr())?;
    car.add_peer("hub", hub.local_addr())?;
    wait_for(SECS_10, "tv and car to find each other", || {
        tv.is_connected("car") && car.is_connected("tv")
    })?;
    wait_for(
        SECS_10,
        "every node to know every node's capabilities",
        || {
            [hub, tv, car].iter().all(|n| {
                let m = n.members();
                m.len() == 3
                    && m.iter()
                        .any(|x| x.info.name.as_str() == "car" && x.info.capabilities.len() == 3)
            })
        },
    )?;
    // Power and load spread too.
    car.set_power(Power::Battery { percent: 55 });
    let _s = car.spawn(Relay {
        name: "m.car".into(),
    })?;
    wait_for(
        SECS_10,
        "the hub to see the car's battery and service",
        || {
            hub.members().iter().any(|m| {
                m.info.name.as_str() == "car"
                    && m.info.power == Power::Battery { percent: 55 }
                    && m.info.load.services == 1
            })
        },
    )?;
    let tv_addr = tv.local_addr();
    let _ = tv_addr;
    tv.shutdown();
    wait_for(SECS_10, "the hub to see that tv left", || {
        hub.members()
            .iter()
            .any(|m| m.info.name.as_str() == "tv" && m.status == MemberStatus::Left)
    })?;
    c.shutdown();
    Ok(())
}

/// A tree on `a`: root relay, one child needing a speaker, one needing a display.
fn media_tree(a: &NodeHandle, prefix: &str) -> Result<(ServiceRef<Relay>, ServiceId, ServiceId)> {
    let root = a.spawn(Relay {
        name: format!("{prefix}root"),
    })?;
    let spk = a.spawn(SpeakerRelay {
        name: format!("{prefix}spk"),
    })?;
    let disp = a.spawn(DisplayRelay {
        name: format!("{prefix}disp"),
    })?;
    a.adopt(root.id(), spk.addr())?;
    a.adopt(root.id(), disp.addr())?;
    Ok((root, spk.id(), disp.id()))
}

#[test]
fn a_split_tree_lands_where_its_members_fit_or_does_not_move_at_all() -> Result<()> {
    let c = Cluster::builder()
        .node("a", &[])
        .node("speaker", &["speaker"])
        .node("screen", &["display"])
        .setup(register_test_kinds)
        .start()?;
    c.wait_connected(SECS_10)?;
    let a = c.node("a");
    wait_for(SECS_10, "a to know every node's capabilities", || {
        a.members().len() == 3
    })?;
    let (root, spk, disp) = media_tree(a, "split.")?;
    let plan = a.plan(
        &[root.id()],
        &PlanOptions {
            tree: true,
            exclude: vec!["a".into()],
            ..PlanOptions::default()
        },
    )?;
    let to: BTreeMap<ServiceId, String> = plan
        .moves
        .iter()
        .map(|m| (m.service, m.to.to_string()))
        .collect();
    assert_eq!(
        to.get(&spk).map(String::as_str),
        Some("speaker"),
        "{plan:?}"
    );
    assert_eq!(
        to.get(&disp).map(String::as_str),
        Some("screen"),
        "{plan:?}"
    );
    let spk_reasons = &plan
        .moves
        .iter()
        .find(|m| m.service == spk)
        .unwrap()
        .reasons;
    assert!(
        spk_reasons
            .iter()
            .any(|r| r.contains("lacks required speaker")),
        "the reasons say why the other nodes lost: {spk_reasons:?}"
    );
    // Nothing moved for the plan.
    assert_eq!(a.migration_stats().started, 0);

    let n = 1_000;
    let feeder = feed(root.clone(), n);
    std::thread::sleep(Duration::from_millis(20));
    let placed = block_on(a.place(
        &[root.id()],
        &PlanOptions {
            tree: true,
            exclude: vec!["a".into()],
            ..PlanOptions::default()
        },
    ))?;
    assert_eq!(placed.groups.len(), 1, "one source, one group");
    assert!(placed.groups[0].committed, "{placed:?}");
    feeder.join().expect("feeder")?;
    for name in ["split.root", "split.spk", "split.disp"] {
        wait_tally(name, n)?;
        ensure_exact(name, n)?;
    }
    let where_is = |id: ServiceId| a.location(id).map(|n| n.to_string());
    assert_eq!(where_is(spk).as_deref(), Some("speaker"));
    assert_eq!(where_is(disp).as_deref(), Some("screen"));

    // The screen turns its display off (its display service moves... nowhere: no other node
    // has one, so it stays and the node says so). Then a second tree, on the speaker node,
    // needs a display nobody offers: refused before anything freezes.
    let screen = c.node("screen");
    screen.set_capabilities(&[]);
    let spk_node = c.node("speaker");
    wait_for(
        SECS_10,
        "the speaker node to see the screen lose its display",
        || {
            spk_node
                .members()
                .iter()
                .any(|m| m.info.name.as_str() == "screen" && m.info.capabilities.is_empty())
        },
    )?;
    wait_for(
        SECS_10,
        "the screen to say its display service is stuck",
        || screen.events().iter().any(|e| e.kind == "placement-stuck"),
    )?;
    let started = spk_node.migration_stats().started;
    let (root2, _, _) = media_tree(spk_node, "nofit.")?;
    let err = block_on(spk_node.place(
        &[root2.id()],
        &PlanOptions {
            tree: true,
            ..PlanOptions::default()
        },
    ))
    .unwrap_err();
    assert!(err.to_string().contains("lacks required display"), "{err}");
    assert_eq!(
        spk_node.migration_stats().started,
        started,
        "nothing was frozen"
    );
    assert_eq!(
        spk_node.services().len(),
        4,
        "the three new members and split.spk stay"
    );
    c.shutdown();
    Ok(())
}

#[test]
fn a_display_turning_off_moves_the_services_that_need_it() -> Result<()> {
    let c = Cluster::builder()
        .node("phone", &["display", "speaker"])
        .node("tv", &["display", "speaker"])
        .setup(register_test_kinds)
        .start()?;
    c.wait_connected(SECS_10)?;
    let (phone, tv) = (c.node("phone"), c.node("tv"));
    wait_for(SECS_10, "membership", || {
        phone.members().len() == 2 && tv.members().len() == 2
    })?;
    let lyrics = phone.spawn(DisplayRelay {
        name: "cap.lyrics".into(),
    })?;
    let music = phone.spawn(SpeakerRelay {
        name: "cap.music".into(),
    })?;
    phone.set_capabilities(&["speaker"]);
    wait_for(SECS_10, "the display service to move to the tv", || {
        tv.services().iter().any(|s| s.addr.id == lyrics.id())
    })?;
    assert!(
        phone.services().iter().any(|s| s.addr.id == music.id()),
        "the speaker service had no reason to move"
    );
    // The event is logged after the move it reports: wait for it as for the move.
    wait_for(SECS_10, "the re-placement event", || {
        phone.events().iter().any(|e| e.kind == "re-placed")
    })?;
    c.shutdown();
    Ok(())
}

#[test]
fn drain_under_load_moves_everything_movable_and_reports_pinned() -> Result<()> {
    let c = Cluster::builder()
        .node("phone", &["display", "speaker", "input"])
        .node("tv", &["display", "speaker"])
        .node("car", &["display", "speaker", "input"])
        .setup(register_test_kinds)
        .start()?;
    c.wait_connected(SECS_10)?;
    let phone = c.node("phone");
    wait_for(SECS_10, "membership", || phone.members().len() == 3)?;
    // A tree of five, four singles, and one pinned single.
    let tree = relay_tree(phone, "drain.t", 5, 2)?;
    let singles: Vec<ServiceRef<Relay>> = (0..4)
        .map(|i| {
            phone.spawn(Relay {
                name: format!("drain.s{i}"),
            })
        })
        .collect::<Result<_, _>>()?;
    let pinned = phone.spawn(Relay {
        name: "drain.pinned".into(),
    })?;
    phone.pin(pinned.id(), true);
    let n = 800;
    let mut feeders = vec![feed(tree[0].clone(), n)];
    for s in &singles {
        feeders.push(feed(s.clone(), n));
    }
    feeders.push(feed(pinned.clone(), n));
    std::thread::sleep(Duration::from_millis(20));
    let report = block_on(phone.drain());
    assert_eq!(report.pinned, vec![pinned.id()]);
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.moved.len(), 9, "{report:?}");
    // Each move counts where it went before gossip says so: the singles do not all follow the
    // tree to one node.
    let to: std::collections::BTreeSet<&str> = report.moved.iter().map(|m| m.to.as_str()).collect();
    assert_eq!(to.len(), 2, "spread over tv and car: {report:?}");
    for f in feeders {
        f.join().expect("feeder")?;
    }
    check_tallies_when_done("drain.t", 5, n)?;
    for i in 0..4 {
        wait_tally(&format!("drain.s{i}"), n)?;
        ensure_exact(&format!("drain.s{i}"), n)?;
    }
    wait_tally("drain.pinned", n)?;
    ensure_exact("drain.pinned", n)?;
    let left: Vec<ServiceId> = phone.services().iter().map(|s| s.addr.id).collect();
    assert_eq!(left, vec![pinned.id()], "only the pinned service stays");
    // A draining node takes nothing: migrate asks are refused by placement elsewhere, and
    // a pinned service refuses to move even when asked.
    let err =
        block_on(phone.migrate(pinned.id(), "tv", tern::MigrateOptions::default())).unwrap_err();
    assert!(err.to_string().contains("pinned"), "{err}");
    c.shutdown();
    Ok(())
}

fn check_tallies_when_done(prefix: &str, members: usize, n: u64) -> Result<()> {
    wait_for(
        Duration::from_secs(30),
        "the tree to handle every item",
        || (0..members).all(|i| tally(&format!("{prefix}{i}")).len() as u64 >= n),
    )?;
    check_tallies(prefix, members, n)
}

#[test]
fn the_rebalancer_brings_chatty_pairs_together_without_oscillating() -> Result<()> {
    let limits = Limits {
        mailbox_capacity: 4096,
        ..Limits::default()
    };
    let c = Cluster::builder()
        .node("n1", &[])
        .node("n2", &[])
        .node("n3", &[])
        .limits(limits)
        .setup(register_test_kinds)
        .start()?;
    c.wait_connected(SECS_10)?;
    let nodes = [c.node("n1"), c.node("n2"), c.node("n3")];
    wait_for(SECS_10, "membership", || {
        nodes.iter().all(|n| n.members().len() == 3)
    })?;
    // Six pairs, each split across two nodes: all traffic starts cross-node.
    let pairs = 6;
    let mut all = Vec::new();
    for k in 0..pairs {
        let x = nodes[k % 3].spawn(Chatter::new(10))?;
        let y = nodes[(k + 1) % 3].spawn(Chatter::new(10))?;
        nodes[k % 3].book_insert(x.addr(), "peer", y.addr())?;
        nodes[(k + 1) % 3].book_insert(y.addr(), "peer", x.addr())?;
        all.push(x);
        all.push(y);
    }
    for s in &all {
        s.tell(ChatterMsg::Start)?;
    }
    let cfg = RebalancerConfig {
        interval_ms: 1_000,
        max_moves_per_round: 4,
        cooldown_ms: 60_000,
        load_tolerance: 0.25,
        min_gain_msgs_per_s: 5.0,
    };
    // Let the traffic be observed and gossiped before the first round.
    wait_for(SECS_10, "n1 to see the pairs' traffic", || {
        nodes[0]
            .associated(all[0].id())
            .iter()
            .any(|a| a.observed && a.in_msgs_per_s > 20.0)
    })?;
    std::thread::sleep(Duration::from_millis(1_500));
    for n in &nodes {
        n.set_rebalancer(Some(cfg.clone()));
    }
    // Wait for three rounds in a row without a move after at least one with moves.
    let settled = wait_for(Duration::from_secs(40), "the rebalancer to settle", || {
        let rounds = nodes[0].rebalance_rounds();
        rounds.iter().any(|r| !r.moves.is_empty())
            && rounds.len() >= 4
            && rounds.iter().rev().take(3).all(|r| r.moves.is_empty())
    });
    if settled.is_err() {
        for r in nodes[0].rebalance_rounds() {
            eprintln!("{r:?}");
        }
    }
    settled?;
    for n in &nodes {
        n.set_rebalancer(None);
    }
    let rounds = nodes[0].rebalance_rounds();
    assert!(
        nodes[1].rebalance_rounds().is_empty() && nodes[2].rebalance_rounds().is_empty(),
        "one leader"
    );
    let before = rounds[0].cross_node_fraction_before;
    let moves: Vec<_> = rounds.iter().flat_map(|r| r.moves.iter()).collect();
    let mut per_service: BTreeMap<ServiceId, usize> = BTreeMap::new();
    for (m, outcome) in &moves {
        assert!(outcome.is_none(), "every move committed: {outcome:?}");
        *per_service.entry(m.service).or_default() += 1;
    }
    assert!(
        per_service.values().all(|n| *n == 1),
        "no service moved twice: {per_service:?}"
    );
    // Where each service runs now, from where it was put.
    let at: BTreeMap<ServiceId, String> = all
        .iter()
        .map(|s| {
            let node = nodes
                .iter()
                .find(|n| n.services().iter().any(|x| x.addr.id == s.id()))
                .map(|n| n.name().to_string())
                .unwrap_or_default();
            (s.id(), node)
        })
        .collect();
    let split = (0..pairs)
        .filter(|k| at[&all[2 * k].id()] != at[&all[2 * k + 1].id()])
        .count();
    let after = split as f64 / pairs as f64;
    eprintln!(
        "rebalancer: cross-node fraction {before:.2} -> {after:.2} in {} migrations over {} rounds ({} services)",
        moves.len(),
        rounds.len(),
        all.len()
    );
    assert!(before >= 0.8, "the workload starts cross-node: {before}");
    assert!(after <= 0.2, "after: {after} ({at:?})");
    assert!(moves.len() <= all.len());
    let per_node: BTreeMap<&String, usize> = at.values().fold(BTreeMap::new(), |mut m, n| {
        *m.entry(n).or_default() += 1;
        m
    });
    assert!(
        per_node.values().all(|n| *n <= 5),
        "within the load tolerance: {per_node:?}"
    );
    c.shutdown();
    Ok(())
}

/// A pin is kept where the service runs and holds whoever asks: a peer's `migrate`, a peer's
/// group request. (Before, only the hosting node's own calls checked it.)
#[test]
fn a_pin_holds_against_requests_from_peers() -> Result<()> {
    let c = connected(&["a", "b", "c"])?;
    let (a, b) = (c.node("a"), c.node("b"));
    let pinned = b.spawn(Relay {
        name: "pin.held".into(),
    })?;
    let free = b.spawn(Relay {
        name: "pin.free".into(),
    })?;
    b.pin(pinned.id(), true);
    let id = pinned.id();
    wait_for(SECS_10, "a knows where it runs", || {
        a.resolve::<Relay>(pinned.addr()).is_ok()
    })?;
    let err = block_on(a.migrate(id, "c", tern::MigrateOptions::default()))
        .expect_err("a pinned service refuses a peer's request");
    assert!(err.to_string().contains("pinned"), "{err}");
    let group = block_on(a.migrate_group(
        &[(free.id(), "c"), (id, "c")],
        tern::MigrateOptions::default(),
    ));
    assert!(
        group.as_ref().map_or(true, |g| !g.committed),
        "a group with a pinned member does not move: {group:?}"
    );
    let here: Vec<ServiceId> = b.services().iter().map(|s| s.addr.id).collect();
    assert!(here.contains(&id) && here.contains(&free.id()), "{here:?}");
    b.pin(id, false);
    let report = block_on(a.migrate(id, "c", tern::MigrateOptions::default()))?;
    assert!(report.aborted.is_none(), "unpinned, it moves: {report:?}");
    c.shutdown();
    Ok(())
}

/// A battery at or below `drain_below_percent` drains the node; back on mains it takes
/// services again (placement moves one there), while a drain a user asked for outlives the
/// power coming back.
#[test]
fn a_node_drained_for_its_battery_takes_services_again_once_charged() -> Result<()> {
    let c = connected(&["phone", "tv"])?;
    let (phone, tv) = (c.node("phone"), c.node("tv"));
    c.wait_members(SECS_10)?;
    let draining_seen = |by: &NodeHandle, name: &str, want: bool| {
        by.members()
            .iter()
            .any(|m| m.info.name.as_str() == name && m.info.draining == want)
    };
    let relay = phone.spawn(Relay {
        name: "m.phone".into(),
    })?;
    phone.set_power(Power::Battery { percent: 8 });
    wait_for(SECS_10, "the drain to move the service to the tv", || {
        phone.last_drain().is_some() && relay.location().as_str() == "tv"
    })?;
    ensure!(
        draining_seen(tv, "phone", true),
        "the tv does not see the drain"
    );
    // A move to a draining node is refused.
    ensure!(
        block_on(relay.migrate("phone", tern::MigrateOptions::default())).is_err(),
        "moved to a draining node"
    );
    phone.set_power(Power::Plugged);
    wait_for(
        SECS_10,
        "the tv to see the phone take services again",
        || draining_seen(tv, "phone", false),
    )?;
    ensure!(
        phone.events().iter().any(|e| e.kind == "power-restored"),
        "no power-restored event"
    );
    let moved = block_on(relay.migrate("phone", tern::MigrateOptions::default()))?;
    ensure!(moved.to.as_str() == "phone", "{moved:?}");
    block_on(relay.tell_wait(RelayMsg::Item(1)))?;
    // A drain the user asks for stays, whatever the power does, even one asked for while
    // the battery drained the node already.
    phone.set_power(Power::Battery { percent: 5 });
    wait_for(SECS_10, "the second drain to move the service", || {
        relay.location().as_str() == "tv"
    })?;
    let _ = block_on(phone.drain());
    // (The power's effect on the drain is made inside `set_power`: nothing to wait for.)
    phone.set_power(Power::Plugged);
    ensure!(
        phone
            .members()
            .iter()
            .any(|m| m.info.name.as_str() == "phone" && m.info.draining),
        "power ended a drain the user asked for"
    );
    c.shutdown();
    Ok(())
}
