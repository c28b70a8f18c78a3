//! Address books, the reverse index and associations across three nodes; assembly-tree edges.

use anyhow::Result;
use tern::{Associations, ServiceAddr, ServiceId};
use tern_actors::{KvStore, SeqSender, SeqSink};
use tern_harness::{block_on, wait_for, Cluster};

use crate::common::{connected, register_test_kinds, Parent, ParentMsg, SECS_10};

fn sorted(mut a: Associations) -> Associations {
    a.holds.sort();
    a.held_by.sort();
    a
}

fn expect_everywhere(c: &Cluster, id: ServiceId, want: &Associations, what: &str) -> Result<()> {
    let want = sorted(want.clone());
    for n in c.nodes() {
        wait_for(
            SECS_10,
            &format!("{what} as seen from {}", n.name()),
            || sorted(n.associations(id)) == want,
        )?;
    }
    Ok(())
}

#[test]
fn books_and_associations_are_right_on_every_node() -> Result<()> {
    let c = Cluster::builder()
        .node("a", &[])
        .node("b", &[])
        .node("c", &[])
        .setup(register_test_kinds)
        .unconnected()
        .start()?;
    let (a, b, cc) = (c.node("a"), c.node("b"), c.node("c"));
    let db = b.spawn(KvStore::default())?;
    let x = a.spawn(SeqSender::new("x"))?;
    let z = cc.spawn(SeqSink::default())?;
    // Entries made before the nodes know each other travel in the sync on connect.
    a.book_insert(x.addr(), "db", db.addr())?;
    b.book_insert(db.addr(), "owner", x.addr())?;
    c.connect_all()?;
    c.wait_connected(SECS_10)?;
    // Entries made afterwards travel as changes.
    cc.book_insert(z.addr(), "cache", db.addr())?;

    let a_x = x.addr().clone();
    let a_db = db.addr().clone();
    let a_z = z.addr().clone();
    expect_everywhere(
        &c,
        db.id(),
        &Associations {
            holds: vec![("owner".into(), a_x.clone())],
            held_by: vec![(a_x.clone(), "db".into()), (a_z.clone(), "cache".into())],
        },
        "associations of db",
    )?;
    expect_everywhere(
        &c,
        x.id(),
        &Associations {
            holds: vec![("db".into(), a_db.clone())],
            held_by: vec![(a_db.clone(), "owner".into())],
        },
        "associations of x",
    )?;
    assert_eq!(cc.book(x.id()), vec![("db".to_string(), a_db.clone())]);

    // A book lives on its holder's node: another node cannot write it.
    assert!(b.book_insert(x.addr(), "sneaky", db.addr()).is_err());

    // Replacing and removing entries spreads too.
    let db2 = b.spawn(KvStore::default())?;
    a.book_insert(x.addr(), "db", db2.addr())?;
    assert!(cc.book_remove(z.id(), "cache"));
    expect_everywhere(
        &c,
        db.id(),
        &Associations {
            holds: vec![("owner".into(), a_x.clone())],
            held_by: vec![],
        },
        "db after its holders let go",
    )?;
    expect_everywhere(
        &c,
        db2.id(),
        &Associations {
            holds: vec![],
            held_by: vec![(a_x.clone(), "db".into())],
        },
        "db2 after x took it",
    )?;
    for n in c.nodes() {
        let stats = n.stats();
        assert_eq!(
            stats.book_edges,
            2,
            "{} knows {} edges",
            n.name(),
            stats.book_edges
        );
    }
    c.shutdown();
    Ok(())
}

#[test]
fn context_reports_itself_and_records_children() -> Result<()> {
    let c = connected(&["a", "b"])?;
    let a = c.node("a");
    let parent = a.spawn(Parent::default())?;
    let (kid1, kid2, who): (ServiceAddr, ServiceAddr, _) = block_on(async {
        let k1 = parent.ask(ParentMsg::SpawnChild, SECS_10).await?;
        let k2 = parent.ask(ParentMsg::SpawnChild, SECS_10).await?;
        let who = parent.ask(ParentMsg::WhoAmI, SECS_10).await?;
        Ok::<_, anyhow::Error>((k1, k2, who))
    })?;
    assert_eq!(who.0, parent.id());
    assert_eq!(who.1.name, "test-parent");
    assert_eq!(who.1.version, 3);
    assert_eq!(who.2.as_str(), "a");
    let mut kids = a.children(parent.id());
    kids.sort();
    let mut want = vec![kid1.id, kid2.id];
    want.sort();
    assert_eq!(kids, want);
    assert_eq!(
        a.services()
            .iter()
            .filter(|s| s.parent == Some(parent.id()))
            .count(),
        2
    );
    // The parent put them in its book (and the tree holds them as `child:<id>`), and the
    // other node hears of it.
    wait_for(SECS_10, "b to learn the parent's book", || {
        c.node("b").associations(parent.id()).holds.len() == 4
    })?;
    let roles: Vec<String> = c
        .node("b")
        .associations(parent.id())
        .holds
        .into_iter()
        .map(|(role, _)| role)
        .collect();
    assert!(roles.contains(&tern::child_role(kid1.id)), "{roles:?}");
    assert!(roles.contains(&"child-1".to_string()), "{roles:?}");
    assert_eq!(
        c.node("b").children(parent.id()).len(),
        2,
        "the tree is known on b"
    );
    assert_eq!(kid1.kind, <KvStore as tern::Service>::kind_key());
    c.shutdown();
    Ok(())
}
