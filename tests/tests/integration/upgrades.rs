//! App updates across devices: a service moves from a device running its kind's version 1 to
//! one running version 2, which upgrades its state, its queue, its timers and the messages
//! devices still on version 1 send it; it never moves back to version 1; placement prefers
//! the newest version.

use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tern::{read_older, AbortReason, Ctx, MigrateOptions, PlanOptions, ReplyTo, Service, Upgrade};
use tern_harness::{block_on, wait_for, Cluster};

use crate::common::SECS_10;

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
    wait_for(SECS_10, "gossip of the kinds", || {
        [a, b, cc].iter().all(|n| {
            n.members()
                .iter()
                .filter(|m| m.info.kinds.iter().any(|k| k.kind.name == "tally"))
                .count()
                == 3
        })
    })?;
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
