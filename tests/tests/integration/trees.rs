//! Assembly trees over real QUIC: a tree moves as one unit (all members or none, one freeze
//! window), with nothing lost, duplicated or reordered, and its inner channels local again.

use std::time::Duration;

use anyhow::{ensure, Result};
use tern::{MigrateOptions, NodeHandle, ServiceRef};
use tern_harness::{block_on, wait_for, Cluster};

use crate::common::{
    connected, killable_cluster, register_test_kinds, tally, Relay, RelayMsg, SECS_10,
};

/// A tree of `members` relays on `node`, `fanout` children each, breadth first; its names
/// start with `prefix`. Returns the root and every member (root first).
pub fn relay_tree(
    node: &NodeHandle,
    prefix: &str,
    members: usize,
    fanout: usize,
) -> Result<Vec<ServiceRef<Relay>>> {
    let mut all: Vec<ServiceRef<Relay>> = vec![node.spawn(Relay {
        name: format!("{prefix}0"),
    })?];
    let mut parent = 0;
    while all.len() < members {
        for _ in 0..fanout {
            if all.len() >= members {
                break;
            }
            let child = node.spawn(Relay {
                name: format!("{prefix}{}", all.len()),
            })?;
            node.adopt(all[parent].id(), child.addr())?;
            all.push(child);
        }
        parent += 1;
    }
    Ok(all)
}

/// Every member of the tree named `prefix` handled items `1..=n`, once each, in order.
pub fn check_tallies(prefix: &str, members: usize, n: u64) -> Result<()> {
    for i in 0..members {
        let got = tally(&format!("{prefix}{i}"));
        ensure!(
            got == (1..=n).collect::<Vec<_>>(),
            "member {i} handled {} items, first differences: {:?}",
            got.len(),
            got.iter()
                .enumerate()
                .filter(|(k, v)| **v != *k as u64 + 1)
                .take(5)
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}

fn wait_tallies(prefix: &str, members: usize, n: u64) -> Result<()> {
    wait_for(
        Duration::from_secs(30),
        "every member to handle every item",
        || (0..members).all(|i| tally(&format!("{prefix}{i}")).len() as u64 >= n),
    )
}

#[test]
fn a_tree_of_twenty_moves_as_one_under_load_and_talks_locally_after() -> Result<()> {
    let c = connected(&["a", "b", "c"])?;
    let (a, b) = (c.node("a"), c.node("b"));
    let members = 20;
    let tree = relay_tree(a, "t20.", members, 3)?;
    let root = tree[0].clone();
    let listed = a.tree(root.id())?;
    assert_eq!(listed.len(), members);
    assert_eq!(listed[0].addr.id, root.id());
    assert!(listed[1..]
        .iter()
        .all(|m| m.parent.is_some() && m.depth >= 1));
    // The tree is known on every node (it lives in the books).
    wait_for(SECS_10, "c to know the tree", || {
        c.node("c").tree(root.id()).map(|t| t.len()).unwrap_or(0) == members
    })?;

    // Items flow down the tree while it moves.
    let n = 2_000u64;
    let feeder = {
        let root = root.clone();
        std::thread::spawn(move || {
            block_on(async {
                for i in 1..=n {
                    root.tell_wait(RelayMsg::Item(i)).await?;
                    if i % 100 == 0 {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                Ok::<_, anyhow::Error>(())
            })
        })
    };
    // Under load: the feed has begun.
    wait_for(SECS_10, "the root's first item", || {
        !tally("t20.0").is_empty()
    })?;
    let report = block_on(a.migrate_tree(root.id(), "b", MigrateOptions::default()))?;
    assert!(report.committed, "{report:?}");
    assert_eq!(report.members.len(), members);
    assert!(report.members.iter().all(|m| m.to.as_str() == "b"));
    assert!(report.freeze_us > 0 && report.total_us > 0);
    eprintln!(
        "tree of {members}: freeze window {} us, total {} us, carried {}, forwarded {}",
        report.freeze_us,
        report.total_us,
        report.carried(),
        report.forwarded()
    );
    feeder.join().expect("feeder thread")?;
    wait_tallies("t20.", members, n)?;
    check_tallies("t20.", members, n)?;
    assert_eq!(
        b.services()
            .iter()
            .filter(|s| s.addr.kind.name == "test-relay")
            .count(),
        members
    );
    assert!(a
        .services()
        .iter()
        .all(|s| s.addr.kind.name != "test-relay"));
    let on_b = b.tree(root.id())?;
    assert_eq!(on_b.len(), members);
    assert!(on_b.iter().all(|m| m.addr.node.as_str() == "b"), "{on_b:?}");

    // After the move, traffic inside the tree stays on b: b sends nothing to a peer.
    let before = b.stats();
    let more = 300u64;
    block_on(async {
        for i in n + 1..=n + more {
            root.tell_wait(RelayMsg::Item(i)).await?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    wait_tallies("t20.", members, n + more)?;
    check_tallies("t20.", members, n + more)?;
    let after = b.stats();
    let inner = (members as u64 - 1) * more;
    eprintln!(
        "after the move: b sent {} local and {} remote messages for {inner} intra-tree items",
        after.sent_local - before.sent_local,
        after.sent_remote - before.sent_remote
    );
    assert_eq!(
        after.sent_remote, before.sent_remote,
        "intra-tree traffic left b"
    );
    assert!(after.sent_local - before.sent_local >= inner);

    // Asked from a third node: the tree is read on the root's node and moves whole.
    let back = block_on(
        c.node("c")
            .migrate_tree(root.id(), "a", MigrateOptions::default()),
    )?;
    assert!(back.committed, "{:?}", back.aborted());
    assert_eq!(back.members.len(), members);
    assert_eq!(
        a.services()
            .iter()
            .filter(|s| s.addr.kind.name == "test-relay")
            .count(),
        members
    );
    c.shutdown();
    Ok(())
}

#[test]
fn a_tree_whose_member_is_refused_does_not_move_at_all() -> Result<()> {
    // c refuses every snapshot (none fits its snapshot_bytes_max), which nothing can tell
    // before the members freeze: one member sent there sinks the whole group.
    let tiny = tern::Limits {
        snapshot_bytes_max: 1,
        ..tern::Limits::default()
    };
    let c = Cluster::builder()
        .node("a", &[])
        .node("b", &[])
        .node("c", &[])
        .node_limits("c", tiny)
        .setup(register_test_kinds)
        .start()?;
    c.wait_connected(SECS_10)?;
    let a = c.node("a");
    let tree = relay_tree(a, "r5.", 5, 2)?;
    let n = 500u64;
    let feeder = {
        let root = tree[0].clone();
        std::thread::spawn(move || {
            block_on(async {
                for i in 1..=n {
                    root.tell_wait(RelayMsg::Item(i)).await?;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
    };
    wait_for(SECS_10, "the root's first item", || {
        !tally("r5.0").is_empty()
    })?;
    let moves: Vec<(tern::ServiceId, &str)> = tree
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id(), if i == 3 { "c" } else { "b" }))
        .collect();
    let members = crate::common::group_not_moved(block_on(
        a.migrate_group(&moves, MigrateOptions::default()),
    ))?;
    let report = tern::GroupReport::from_reports(members);
    assert!(!report.committed, "{report:?}");
    assert!(report.members.iter().all(|m| !m.committed()));
    let why = report.aborted().unwrap_or_default();
    assert!(
        why.contains("snapshot_bytes_max"),
        "the first reason is the refusal: {why}"
    );
    assert!(
        matches!(report.members[0].aborted, Some(tern::AbortReason::Group(_))),
        "{:?}",
        report.members[0].aborted
    );
    feeder.join().expect("feeder thread")?;
    wait_tallies("r5.", 5, n)?;
    check_tallies("r5.", 5, n)?;
    assert_eq!(
        a.services()
            .iter()
            .filter(|s| s.addr.kind.name == "test-relay")
            .count(),
        5,
        "every member still runs on a"
    );
    assert_eq!(c.node("b").migration_stats().arrived, 0);
    c.shutdown();
    Ok(())
}

#[test]
fn adoption_refuses_cycles_and_second_parents() -> Result<()> {
    let c = connected(&["a"])?;
    let a = c.node("a");
    let tree = relay_tree(a, "cy.", 3, 1)?; // a chain: 0 -> 1 -> 2
    let err = a.adopt(tree[2].id(), tree[0].addr()).unwrap_err();
    assert!(err.to_string().contains("cycle"), "{err}");
    let other = a.spawn(Relay {
        name: "cy.x".into(),
    })?;
    let err = a.adopt(other.id(), tree[1].addr()).unwrap_err();
    assert!(err.to_string().contains("parent"), "{err}");
    assert_eq!(a.children(tree[0].id()), vec![tree[1].id()]);
    c.shutdown();
    Ok(())
}

#[test]
fn a_tree_with_more_members_than_quics_default_stream_limit_moves() -> Result<()> {
    // Each member's snapshot stream stays open until the group commits: 150 of them at once
    // is over QUIC's default of 100 concurrent streams, which used to stall until the deadline.
    let c = connected(&["a", "b"])?;
    let members = 150;
    let tree = relay_tree(c.node("a"), "big.", members, 5)?;
    let report = block_on(
        c.node("a")
            .migrate_tree(tree[0].id(), "b", MigrateOptions::default()),
    )?;
    assert!(report.committed, "{:?}", report.aborted());
    assert_eq!(report.members.len(), members);
    block_on(tree[0].tell_wait(RelayMsg::Item(1)))?;
    wait_tallies("big.", members, 1)?;
    check_tallies("big.", members, 1)?;
    c.shutdown();
    Ok(())
}

/// A member lost with its node leaves the tree: the rest of it moves, and items flow down
/// what is left. A member on the lost node that parented a service here no longer holds it,
/// so that service can be adopted again. When the node comes back as a new incarnation, the
/// entry for the member it ran leaves the parent's book.
#[test]
fn a_tree_member_lost_with_its_node_leaves_the_tree_and_the_rest_moves() -> Result<()> {
    let mut c = killable_cluster(&["a", "b", "c"])?;
    let (a, b) = (c.node("a").clone(), c.node("b").clone());
    let tree = relay_tree(&a, "lost.", 3, 2)?;
    let root = tree[0].clone();
    // One more child of the root, on c; and a parent on c of a service on a.
    let on_c = {
        let far = c.node("c");
        let on_c = far.spawn(Relay {
            name: "lost.c".into(),
        })?;
        a.adopt(root.id(), on_c.addr())?;
        let orphan = a.spawn(Relay {
            name: "lost.orphan".into(),
        })?;
        far.adopt(on_c.id(), orphan.addr())?;
        wait_for(SECS_10, "a knows both edges", || {
            a.tree(root.id()).is_ok_and(|t| t.len() == 5)
        })?;
        (on_c.id(), orphan)
    };
    let (on_c, orphan) = on_c;
    // A restart is told apart from a cut by c's incarnation, which b learns from c's gossip.
    wait_for(SECS_10, "b knows c's incarnation", || {
        b.members().iter().any(|m| m.info.name.as_str() == "c")
    })?;
    c.kill("c");
    wait_for(SECS_10, "the member on c leaves the tree", || {
        a.tree(root.id()).is_ok_and(|t| t.len() == 3)
    })?;
    let report = block_on(a.migrate_tree(root.id(), "b", MigrateOptions::default()))?;
    assert!(report.committed, "{report:?}");
    assert_eq!(report.members.len(), 3);
    block_on(root.tell_wait(RelayMsg::Item(1)))?;
    wait_tallies("lost.", 3, 1)?;
    check_tallies("lost.", 3, 1)?;
    assert_eq!(
        b.services()
            .iter()
            .filter(|s| s.addr.kind.name == "test-relay")
            .count(),
        3
    );
    // The service whose parent was on c is free to join another tree. (b forgets the edge
    // when it counts c lost, which may come after a does.)
    wait_for(SECS_10, "b to let the service be adopted", || {
        b.adopt(root.id(), orphan.addr()).is_ok()
    })?;
    assert_eq!(b.tree(root.id())?.len(), 4);
    // c restarts empty: the root's entry for the member it ran goes.
    let role = tern::child_role(on_c);
    assert!(b.book(root.id()).iter().any(|(r, _)| *r == role));
    c.restart("c")?;
    wait_for(
        SECS_10,
        "the entry for the member c ran leaves the root's book",
        || !b.book(root.id()).iter().any(|(r, _)| *r == role),
    )?;
    assert_eq!(b.tree(root.id())?.len(), 4);
    c.shutdown();
    Ok(())
}

/// A node cut off, not dead: the edges its services held come back with its `BookSync` when
/// it reconnects, and its subtree is whole again.
#[test]
fn a_tree_edge_held_on_a_node_cut_off_comes_back_when_it_reconnects() -> Result<()> {
    let c = killable_cluster(&["a", "b"])?;
    let (a, b) = (c.node("a"), c.node("b"));
    let parent = b.spawn(Relay {
        name: "cut.0".into(),
    })?;
    let child = a.spawn(Relay {
        name: "cut.1".into(),
    })?;
    b.adopt(parent.id(), child.addr())?;
    wait_for(SECS_10, "a knows the edge", || {
        a.tree(parent.id()).is_ok_and(|t| t.len() == 2)
    })?;
    c.cut("a", "b");
    wait_for(SECS_10, "a forgets the edge held on b", || {
        !a.tree(parent.id()).is_ok_and(|t| t.len() == 2)
    })?;
    c.heal("a", "b");
    wait_for(SECS_10, "the edge back at a", || {
        a.tree(parent.id()).is_ok_and(|t| t.len() == 2)
    })?;
    // And it works: an item sent to the parent reaches the child.
    let from_a = a.resolve::<Relay>(parent.addr())?;
    block_on(from_a.tell_wait(RelayMsg::Item(1)))?;
    wait_tallies("cut.", 2, 1)?;
    check_tallies("cut.", 2, 1)?;
    c.shutdown();
    Ok(())
}
