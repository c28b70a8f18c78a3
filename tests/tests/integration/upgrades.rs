//! App updates across devices: a service moves from a device running its kind's version 1 to
//! one running version 2, which upgrades its state, its queue, its timers and the messages
//! devices still on version 1 send it; it moves back to version 1 only when version 2 declares
//! a downgrade, and then every newer sender writes version 1 for it; placement prefers the
//! newest version.

use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tern::{
    read_older, write_older, AbortReason, Ctx, Downgrade, MigrateOptions, PlanOptions, ReplyTo,
    Service, Upgrade,
};
use tern_harness::{block_on, wait_for, Cluster};

use crate::common::SECS_10;

/// Waits until every one of `nodes` has heard from each of them that it runs `kind` (the
/// version each runs travels with it).
fn kind_gossiped(nodes: &[&tern::NodeHandle], kind: &str) -> Result<()> {
    wait_for(SECS_10, "gossip of the kinds", || {
        nodes.iter().all(|n| {
            n.members()
                .iter()
                .filter(|m| m.info.kinds.iter().any(|k| k.kind.name == kind))
                .count()
                == nodes.len()
        })
    })
}

/// Version 1 of a tally: a total.
#[derive(Default, Serialize, Deserialize)]
pub struct TallyV1 {
    total: u64,
}

#[derive(Serialize, Deserialize)]
pub enum TallyMsgV1 {
    Add(u64),
    /// Holds the handler for `ms` (so that what comes next queues up).
    Hold(u64),
    /// Adds `n` after `ms`, from a timer.
    Later {
        ms: u64,
        n: u64,
    },
    Get(ReplyTo<u64>),
}

impl Service for TallyV1 {
    type Msg = TallyMsgV1;
    const KIND: &'static str = "tally";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: TallyMsgV1, ctx: &mut Ctx<Self>) {
        match msg {
            TallyMsgV1::Add(n) => self.total += n,
            TallyMsgV1::Hold(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            TallyMsgV1::Later { ms, n } => {
                let _ = ctx.schedule(Duration::from_millis(ms), TallyMsgV1::Add(n));
            }
            TallyMsgV1::Get(r) => {
                let _ = ctx.reply(r, self.total);
            }
        }
    }
}

/// Version 2: counts the additions too, those written by version 1 apart, and says which
/// version its state was upgraded from. Its `Add` is a struct variant: version 1's bytes do
/// not read as version 2's.
#[derive(Serialize, Deserialize)]
pub struct Tally {
    total: u64,
    additions: u64,
    by_v1: u64,
    upgraded_from: Option<u32>,
}

#[derive(Serialize, Deserialize)]
pub enum TallyMsg {
    Add {
        n: u64,
        written_by: u32,
    },
    Hold(u64),
    Later {
        ms: u64,
        n: u64,
    },
    Get(ReplyTo<u64>),
    /// Additions, how many of them version 1 wrote, and where the state came from.
    Details(ReplyTo<(u64, u64, Option<u32>)>),
}

fn from_v1(msg: TallyMsgV1) -> TallyMsg {
    match msg {
        TallyMsgV1::Add(n) => TallyMsg::Add { n, written_by: 1 },
        TallyMsgV1::Hold(ms) => TallyMsg::Hold(ms),
        TallyMsgV1::Later { ms, n } => TallyMsg::Later { ms, n },
        TallyMsgV1::Get(r) => TallyMsg::Get(r),
    }
}

impl Service for Tally {
    type Msg = TallyMsg;
    const KIND: &'static str = "tally";
    const VERSION: u32 = 2;
    const UPGRADES: &'static [Upgrade<Self>] = &[Upgrade {
        from: 1,
        state: |bytes| {
            let old: TallyV1 = read_older(bytes)?;
            Ok(Tally {
                total: old.total,
                additions: 0,
                by_v1: 0,
                upgraded_from: Some(1),
            })
        },
        msg: |bytes| read_older(bytes).map(from_v1),
    }];

    async fn handle(&mut self, msg: TallyMsg, ctx: &mut Ctx<Self>) {
        match msg {
            TallyMsg::Add { n, written_by } => {
                self.total += n;
                self.additions += 1;
                self.by_v1 += u64::from(written_by == 1);
            }
            TallyMsg::Hold(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            TallyMsg::Later { ms, n } => {
                let add = TallyMsg::Add { n, written_by: 2 };
                let _ = ctx.schedule(Duration::from_millis(ms), add);
            }
            TallyMsg::Get(r) => {
                let _ = ctx.reply(r, self.total);
            }
            TallyMsg::Details(r) => {
                let _ = ctx.reply(r, (self.additions, self.by_v1, self.upgraded_from));
            }
        }
    }
}

/// Nodes `v1` run version 1 of the tally, nodes `v2` version 2.
fn mixed(v1: &[&'static str], v2: &[&'static str]) -> Result<Cluster> {
    let mut b = Cluster::builder();
    for n in v1 {
        b = b.node(n, &[]).node_setup(n, |node| {
            node.register::<TallyV1>();
        });
    }
    for n in v2 {
        b = b.node(n, &[]).node_setup(n, |node| {
            node.register::<Tally>();
        });
    }
    let c = b.start()?;
    c.wait_connected(SECS_10)?;
    Ok(c)
}

#[test]
fn a_move_to_the_next_version_upgrades_state_queue_timers_and_older_devices_messages() -> Result<()>
{
    let c = mixed(&["a", "c"], &["b"])?;
    let (a, b, cc) = (c.node("a"), c.node("b"), c.node("c"));
    // Every node has heard which version the others run (b upgrades by what c runs).
    kind_gossiped(&[a, b, cc], "tally")?;
    let tally = a.spawn(TallyV1::default())?;
    block_on(async {
        for n in 1..=10 {
            tally.tell(TallyMsgV1::Add(n))?;
        }
        // A timer set by version 1 fires at version 2 (long after the freeze that follows
        // the hold). The answer says version 1 handled the first ten and set the timer.
        tally.tell(TallyMsgV1::Later {
            ms: 1_500,
            n: 1_000,
        })?;
        assert_eq!(tally.ask(TallyMsgV1::Get, SECS_10).await?, 55);
        // What queues behind the hold is carried in the snapshot, written by version 1.
        tally.tell(TallyMsgV1::Hold(200))?;
        for n in 11..=20 {
            tally.tell(TallyMsgV1::Add(n))?;
        }
        // The plan for it names the device with the newest version, and says so.
        let plan = a.plan(&[tally.id()], &PlanOptions::default())?;
        let m = &plan.moves[0];
        assert_eq!(m.to.as_str(), "b", "{plan:?}");
        assert!(
            m.reasons
                .iter()
                .any(|r| r.contains("runs tally@2, the newest")),
            "{plan:?}"
        );
        let report = a
            .migrate(tally.id(), "b", MigrateOptions::default())
            .await?;
        assert!(report.committed(), "{report:?}");
        assert!(report.carried > 0, "messages travelled: {report:?}");
        anyhow::Ok(())
    })?;
    let info = b
        .services()
        .into_iter()
        .find(|s| s.addr.id == tally.id())
        .expect("the tally runs on b");
    assert_eq!(info.addr.kind.to_string(), "tally@2");

    // c still runs version 1: its messages and asks are upgraded on arrival. (Its handle is
    // made once c knows where the tally went: a handle made from the address it had, before
    // c heard of the move, reaches a, which has forgotten it once every node fenced.)
    wait_for(SECS_10, "c to hear where the tally went", || {
        cc.members().iter().any(|m| {
            m.info.name.as_str() == "b" && m.info.services.iter().any(|s| s.0 == tally.id())
        })
    })?;
    let from_c = cc.resolve::<TallyV1>(tally.addr())?;
    let here = b.resolve::<Tally>(&info.addr)?;
    block_on(async {
        from_c.tell_wait(TallyMsgV1::Add(100)).await?;
        here.tell(TallyMsg::Add {
            n: 5_000,
            written_by: 2,
        })?;
        anyhow::Ok(())
    })?;
    // 1..=20, 100, 5,000 and the timer's 1,000.
    wait_for(SECS_10, "the timer to fire at version 2", || {
        block_on(from_c.ask(TallyMsgV1::Get, SECS_10)).ok() == Some(210 + 100 + 5_000 + 1_000)
    })?;
    let (additions, by_v1, upgraded_from) = block_on(here.ask(TallyMsg::Details, SECS_10))?;
    assert_eq!(upgraded_from, Some(1), "the state came from version 1");
    // Made at version 2: the ten carried, c's, b's own and the timer's; version 1 wrote all
    // but b's (the first ten were handled at version 1, before the move).
    assert_eq!((additions, by_v1), (13, 12));

    // Back to version 1: refused before anything freezes, saying why; forcing does not help.
    for force in [false, true] {
        let opts = MigrateOptions {
            force,
            ..MigrateOptions::default()
        };
        let err =
            block_on(b.migrate(tally.id(), "a", opts)).expect_err("no move to an older version");
        let tern::Error::NotMoved(not) = &err else {
            panic!("expected a refusal, got {err}");
        };
        match &not.reports[0].aborted {
            Some(AbortReason::Unfit(u)) => {
                let why = u.to_string();
                assert!(why.contains("runs tally@1, older than tally@2"), "{why}");
            }
            other => panic!("expected unfit, got {other:?}"),
        }
    }
    // Traffic still flows from both versions.
    block_on(async {
        from_c.tell_wait(TallyMsgV1::Add(1)).await?;
        here.tell_wait(TallyMsg::Add {
            n: 1,
            written_by: 2,
        })
        .await?;
        assert_eq!(from_c.ask(TallyMsgV1::Get, SECS_10).await?, 6_312);
        anyhow::Ok(())
    })?;
    assert!(b.services().iter().any(|s| s.addr.id == tally.id()));
    c.shutdown();
    Ok(())
}

#[test]
fn a_version_without_an_upgrade_from_the_services_version_refuses_it() -> Result<()> {
    /// Version 3 reads nothing older.
    #[derive(Default, Serialize, Deserialize)]
    struct TallyV3 {
        total: u64,
    }
    impl Service for TallyV3 {
        type Msg = u64;
        const KIND: &'static str = "tally";
        const VERSION: u32 = 3;
        async fn handle(&mut self, n: u64, _: &mut Ctx<Self>) {
            self.total += n;
        }
    }
    let c = Cluster::builder()
        .node("a", &[])
        .node("b", &[])
        .node_setup("a", |n| {
            n.register::<TallyV1>();
        })
        .node_setup("b", |n| {
            n.register::<TallyV3>();
        })
        .start()?;
    c.wait_connected(SECS_10)?;
    let (a, b) = (c.node("a"), c.node("b"));
    let tally = a.spawn(TallyV1::default())?;
    // Before gossip says what b runs, b's own check refuses; after, a's. Either says why.
    let err = block_on(a.migrate(tally.id(), "b", MigrateOptions::default()))
        .expect_err("b cannot read version 1");
    let text = err.to_string();
    assert!(
        text.contains("tally@3") && text.contains("no upgrade from version 1"),
        "{text}"
    );
    assert!(a.services().iter().any(|s| s.addr.id == tally.id()));
    assert!(b.services().is_empty());
    block_on(async {
        tally.tell_wait(TallyMsgV1::Add(7)).await?;
        assert_eq!(tally.ask(TallyMsgV1::Get, SECS_10).await?, 7);
        anyhow::Ok(())
    })?;
    c.shutdown();
    Ok(())
}

/// Version 1 of a meter: a total, and the marks of one stream, which must come in order.
#[derive(Default, Serialize, Deserialize)]
pub struct MeterV1 {
    total: u64,
    marks: u64,
    out_of_order: u64,
    /// Makes the state large enough for the freeze to take a while.
    pad: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
pub enum MeterMsgV1 {
    Add(u64),
    Mark(u64),
    Hold(u64),
    /// Total, marks and marks out of order.
    Get(ReplyTo<(u64, u64, u64)>),
}

/// Version 1's messages as version 2 writes them: the same variants, a reply token borrowed
/// (serde writes `&T` as `T`; a token is not cloned).
#[derive(Serialize)]
enum MeterMsgV1Out<'a> {
    Add(u64),
    Mark(u64),
    Hold(u64),
    Get(&'a ReplyTo<(u64, u64, u64)>),
}

fn mark(marks: &mut u64, out_of_order: &mut u64, m: u64) {
    if m != *marks + 1 {
        *out_of_order += 1;
    }
    *marks = m;
}

impl Service for MeterV1 {
    type Msg = MeterMsgV1;
    const KIND: &'static str = "meter";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: MeterMsgV1, ctx: &mut Ctx<Self>) {
        match msg {
            MeterMsgV1::Add(n) => self.total += n,
            MeterMsgV1::Mark(m) => mark(&mut self.marks, &mut self.out_of_order, m),
            MeterMsgV1::Hold(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            MeterMsgV1::Get(r) => {
                let _ = ctx.reply(r, (self.total, self.marks, self.out_of_order));
            }
        }
    }
}

/// Version 2 says who wrote each addition, can reset (which version 1 cannot), sets timers,
/// and writes version 1 (a downgrade) as well as reading it.
#[derive(Default, Serialize, Deserialize)]
pub struct Meter {
    total: u64,
    marks: u64,
    out_of_order: u64,
    upgraded_from: Option<u32>,
    pad: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
pub enum MeterMsg {
    Add {
        n: u64,
        by: String,
    },
    /// A struct variant: version 1's mark does not read as this one, nor this one as it.
    Mark {
        m: u64,
    },
    Hold(u64),
    /// Adds `n` after `ms`, from a timer.
    Later {
        ms: u64,
        n: u64,
    },
    Reset,
    Get(ReplyTo<(u64, u64, u64)>),
    UpgradedFrom(ReplyTo<Option<u32>>),
}

impl Service for Meter {
    type Msg = MeterMsg;
    const KIND: &'static str = "meter";
    const VERSION: u32 = 2;
    const UPGRADES: &'static [Upgrade<Self>] = &[Upgrade {
        from: 1,
        state: |bytes| {
            let old: MeterV1 = read_older(bytes)?;
            Ok(Meter {
                total: old.total,
                marks: old.marks,
                out_of_order: old.out_of_order,
                upgraded_from: Some(1),
                pad: old.pad,
            })
        },
        msg: |bytes| {
            Ok(match read_older(bytes)? {
                MeterMsgV1::Add(n) => MeterMsg::Add { n, by: "v1".into() },
                MeterMsgV1::Mark(m) => MeterMsg::Mark { m },
                MeterMsgV1::Hold(ms) => MeterMsg::Hold(ms),
                MeterMsgV1::Get(r) => MeterMsg::Get(r),
            })
        },
    }];
    const DOWNGRADES: &'static [Downgrade<Self>] = &[Downgrade {
        to: 1,
        state: |s| {
            write_older(&MeterV1 {
                total: s.total,
                marks: s.marks,
                out_of_order: s.out_of_order,
                pad: s.pad.clone(),
            })
        },
        msg: |m| match m {
            MeterMsg::Add { n, .. } => write_older(&MeterMsgV1Out::Add(*n)),
            MeterMsg::Mark { m } => write_older(&MeterMsgV1Out::Mark(*m)),
            MeterMsg::Hold(ms) => write_older(&MeterMsgV1Out::Hold(*ms)),
            // Version 1 has no timers of its own: it gets the addition now.
            MeterMsg::Later { n, .. } => write_older(&MeterMsgV1Out::Add(*n)),
            MeterMsg::Reset => Err("version 1 cannot reset".into()),
            MeterMsg::Get(r) => write_older(&MeterMsgV1Out::Get(r)),
            MeterMsg::UpgradedFrom(_) => Err("version 1 does not know".into()),
        },
    }];

    async fn handle(&mut self, msg: MeterMsg, ctx: &mut Ctx<Self>) {
        match msg {
            MeterMsg::Add { n, .. } => self.total += n,
            MeterMsg::Mark { m } => mark(&mut self.marks, &mut self.out_of_order, m),
            MeterMsg::Hold(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            MeterMsg::Later { ms, n } => {
                let add = MeterMsg::Add {
                    n,
                    by: "timer".into(),
                };
                let _ = ctx.schedule(Duration::from_millis(ms), add);
            }
            MeterMsg::Reset => {
                self.total = 0;
                self.marks = 0;
                self.out_of_order = 0;
            }
            MeterMsg::Get(r) => {
                let _ = ctx.reply(r, (self.total, self.marks, self.out_of_order));
            }
            MeterMsg::UpgradedFrom(r) => {
                let _ = ctx.reply(r, self.upgraded_from);
            }
        }
    }
}

#[test]
fn a_kind_that_writes_its_older_version_moves_back_to_it_and_every_sender_writes_that_version(
) -> Result<()> {
    // a and c run version 2, b still runs version 1.
    let c = Cluster::builder()
        .node("a", &[])
        .node("b", &[])
        .node("c", &[])
        .node_setup("a", |n| {
            n.register::<Meter>();
        })
        .node_setup("b", |n| {
            n.register::<MeterV1>();
        })
        .node_setup("c", |n| {
            n.register::<Meter>();
        })
        .start()?;
    c.wait_connected(SECS_10)?;
    let (a, b, cc) = (
        c.node("a").clone(),
        c.node("b").clone(),
        c.node("c").clone(),
    );
    kind_gossiped(&[&a, &b, &cc], "meter")?;
    // A few MiB of state: the freeze lasts long enough for c's marks to reach a during it.
    let meter = a.spawn(Meter {
        pad: vec![7; 4 << 20],
        ..Meter::default()
    })?;
    let from_c = cc.resolve::<Meter>(meter.addr())?;
    let add = |n: u64| MeterMsg::Add { n, by: "a".into() };
    let marks = std::cell::Cell::new(0);
    block_on(async {
        for n in 1..=10 {
            meter.tell(add(n))?;
        }
        // A timer set at version 2, pending when the service moves: it travels written as
        // version 1's message (an addition), due at the same time.
        meter.tell(MeterMsg::Later {
            ms: 1_500,
            n: 1_000,
        })?;
        assert_eq!(meter.ask(MeterMsg::Get, SECS_10).await?.0, 55);
        // Queued behind the hold: carried in the snapshot, written as version 1's.
        meter.tell(MeterMsg::Hold(200))?;
        for n in 11..=20 {
            meter.tell(add(n))?;
        }
        // Placement never picks the older version while a newer one can take the service;
        // an explicit move goes to b.
        let plan = a.plan(&[meter.id()], &PlanOptions::default())?;
        assert!(plan.moves.iter().all(|m| m.to.as_str() != "b"), "{plan:?}");
        // c streams marks throughout the move and for a while after it: into a's queue (the
        // snapshot carries them), into its leftovers during the freeze, through its tombstone
        // until c hears where the service went, and to b; each path writes version 1 for b
        // (docs/migration.md has the counts of each seen here).
        let moved = std::cell::Cell::new(false);
        let sending = async {
            // From near the end of the hold, so that the queue has room during the freeze.
            tokio::time::sleep(Duration::from_millis(150)).await;
            let mut m = 0;
            let mut after = 0;
            while after < 300 {
                m += 1;
                from_c.tell_wait(MeterMsg::Mark { m }).await?;
                after += u64::from(moved.get());
                // About 8 a millisecond, so that some are on the way at every step of the
                // move (at most 30,000, so that the test stays short).
                if m % 8 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                if m == 30_000 {
                    break;
                }
            }
            anyhow::Ok(m)
        };
        let migrating = async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            let report = a.migrate(meter.id(), "b", MigrateOptions::default()).await;
            moved.set(true);
            report
        };
        let (sent, report) = tokio::join!(sending, migrating);
        marks.set(sent?);
        let report = report?;
        assert!(report.committed(), "{report:?}");
        assert!(report.carried > 0, "messages travelled: {report:?}");
        anyhow::Ok(())
    })?;
    let marks = marks.get();
    let info = b
        .services()
        .into_iter()
        .find(|s| s.addr.id == meter.id())
        .expect("the meter runs on b");
    assert_eq!(info.addr.kind.to_string(), "meter@1");

    // b's own handle is of version 1; a's and c's of version 2, written as version 1's.
    let here = b.resolve::<MeterV1>(&info.addr)?;
    block_on(async {
        meter.tell_wait(add(100)).await?;
        here.tell_wait(MeterMsgV1::Add(5_000)).await?;
        from_c.tell_wait(MeterMsg::Mark { m: marks + 1 }).await?;
        // What version 1 cannot hold is refused to its sender, saying why.
        let err = from_c
            .tell(MeterMsg::Reset)
            .expect_err("version 1 cannot reset");
        assert!(err.to_string().contains("version 1 cannot reset"), "{err}");
        anyhow::Ok(())
    })?;
    // 1..=20, 100, 5,000 and the timer's 1,000; c's marks in order, once each.
    wait_for(SECS_10, "the timer to fire at version 1", || {
        block_on(from_c.ask(MeterMsg::Get, SECS_10)).ok() == Some((6_310, marks + 1, 0))
    })?;
    assert_eq!(
        block_on(here.ask(MeterMsgV1::Get, SECS_10))?,
        (6_310, marks + 1, 0)
    );

    // And forward again: back to version 2 on c, upgraded on arrival.
    let report = block_on(b.migrate(meter.id(), "c", MigrateOptions::default()))?;
    assert!(report.committed(), "{report:?}");
    block_on(async {
        from_c.tell_wait(MeterMsg::Mark { m: marks + 2 }).await?;
        here.tell_wait(MeterMsgV1::Add(1)).await?;
        meter.tell_wait(add(2)).await?;
        assert_eq!(from_c.ask(MeterMsg::UpgradedFrom, SECS_10).await?, Some(1));
        anyhow::Ok(())
    })?;
    // b's and a's additions come from other senders than c's ask: they are waited for.
    wait_for(SECS_10, "every addition at version 2", || {
        block_on(from_c.ask(MeterMsg::Get, SECS_10)).ok() == Some((6_313, marks + 2, 0))
    })?;
    c.shutdown();
    Ok(())
}

/// Version 1 of a kind whose version 2 can hold what version 1 cannot: a note.
#[derive(Default, Serialize, Deserialize)]
pub struct NoteV1 {
    total: u64,
}

#[derive(Serialize, Deserialize)]
pub enum NoteMsgV1 {
    Add(u64),
    Get(ReplyTo<u64>),
}

impl Service for NoteV1 {
    type Msg = NoteMsgV1;
    const KIND: &'static str = "note";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: NoteMsgV1, ctx: &mut Ctx<Self>) {
        match msg {
            NoteMsgV1::Add(n) => self.total += n,
            NoteMsgV1::Get(r) => {
                let _ = ctx.reply(r, self.total);
            }
        }
    }
}

/// Version 2: a total and perhaps a note. It writes version 1 only while it holds no note.
#[derive(Default, Serialize, Deserialize)]
pub struct Note {
    total: u64,
    note: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub enum NoteMsg {
    Add(u64),
    Note(String),
    Clear,
    /// Holds the handler for `ms` (so that what comes next queues up).
    Hold(u64),
    Get(ReplyTo<u64>),
}

/// Version 1's messages as version 2 writes them (a reply token borrowed).
#[derive(Serialize)]
enum NoteMsgV1Out<'a> {
    Add(u64),
    Get(&'a ReplyTo<u64>),
}

impl Service for Note {
    type Msg = NoteMsg;
    const KIND: &'static str = "note";
    const VERSION: u32 = 2;
    const UPGRADES: &'static [Upgrade<Self>] = &[Upgrade {
        from: 1,
        state: |bytes| {
            let old: NoteV1 = read_older(bytes)?;
            Ok(Note {
                total: old.total,
                note: None,
            })
        },
        msg: |bytes| {
            Ok(match read_older(bytes)? {
                NoteMsgV1::Add(n) => NoteMsg::Add(n),
                NoteMsgV1::Get(r) => NoteMsg::Get(r),
            })
        },
    }];
    const DOWNGRADES: &'static [Downgrade<Self>] = &[Downgrade {
        to: 1,
        state: |s| match &s.note {
            Some(_) => Err("version 1 has no notes".into()),
            None => write_older(&NoteV1 { total: s.total }),
        },
        msg: |m| match m {
            NoteMsg::Add(n) => write_older(&NoteMsgV1Out::Add(*n)),
            NoteMsg::Get(r) => write_older(&NoteMsgV1Out::Get(r)),
            NoteMsg::Note(_) | NoteMsg::Clear | NoteMsg::Hold(_) => {
                Err("version 1 has no notes".into())
            }
        },
    }];

    async fn handle(&mut self, msg: NoteMsg, ctx: &mut Ctx<Self>) {
        match msg {
            NoteMsg::Add(n) => self.total += n,
            NoteMsg::Note(s) => self.note = Some(s),
            NoteMsg::Clear => self.note = None,
            NoteMsg::Hold(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            NoteMsg::Get(r) => {
                let _ = ctx.reply(r, self.total);
            }
        }
    }
}

#[test]
fn a_state_its_older_version_cannot_hold_stays_where_it_runs_and_moves_once_it_can() -> Result<()> {
    let c = Cluster::builder()
        .node("a", &[])
        .node("b", &[])
        .node_setup("a", |n| {
            n.register::<Note>();
        })
        .node_setup("b", |n| {
            n.register::<NoteV1>();
        })
        .start()?;
    c.wait_connected(SECS_10)?;
    let (a, b) = (c.node("a").clone(), c.node("b").clone());
    kind_gossiped(&[&a, &b], "note")?;
    let note = a.spawn(Note::default())?;
    block_on(async {
        for n in 1..=10 {
            note.tell(NoteMsg::Add(n))?;
        }
        note.tell(NoteMsg::Note("kept at version 2".into()))?;
        // The note is held (the ask comes after it from the same sender).
        assert_eq!(note.ask(NoteMsg::Get, SECS_10).await?, 55);
        // Queued behind the hold when the service freezes: the failed snapshot leaves them
        // where they are, each to be handled once.
        note.tell(NoteMsg::Hold(100))?;
        for n in 11..=20 {
            note.tell(NoteMsg::Add(n))?;
        }
        // b is fit (version 2 declares a downgrade to its version 1), so the move is tried;
        // the state cannot be written as version 1's, so it stops before the service leaves.
        let report =
            crate::common::not_moved(a.migrate(note.id(), "b", MigrateOptions::default()).await)?;
        assert!(
            matches!(
                &report.aborted,
                Some(AbortReason::Snapshot(why))
                    if why.contains("downgrading to version 1") && why.contains("no notes")
            ),
            "{report:?}"
        );
        // Still on a, at version 2: every addition once, and traffic flows.
        note.tell_wait(NoteMsg::Add(100)).await?;
        assert_eq!(note.ask(NoteMsg::Get, SECS_10).await?, 310);
        // Without its note, the state is version 1's to hold: it moves.
        note.tell_wait(NoteMsg::Clear).await?;
        assert_eq!(note.ask(NoteMsg::Get, SECS_10).await?, 310);
        let report = a.migrate(note.id(), "b", MigrateOptions::default()).await?;
        assert!(report.committed(), "{report:?}");
        note.tell_wait(NoteMsg::Add(1_000)).await?;
        anyhow::Ok(())
    })?;
    let info = b
        .services()
        .into_iter()
        .find(|s| s.addr.id == note.id())
        .expect("the note runs on b");
    assert_eq!(info.addr.kind.to_string(), "note@1");
    // b's own handle is another sender than a's addition: the total is waited for.
    let here = b.resolve::<NoteV1>(&info.addr)?;
    wait_for(SECS_10, "every addition, once, at version 1", || {
        block_on(here.ask(NoteMsgV1::Get, SECS_10)).ok() == Some(1_310)
    })?;
    assert!(a.services().iter().all(|s| s.addr.id != note.id()));
    c.shutdown();
    Ok(())
}
