//! The migration kit (`tern_harness::kit`) finds what it is meant to find: nothing in a sound
//! service, with and without faults; a field serde leaves out; a timer whose effect is kept
//! outside what moves. And its README example is the guide's, which runs as a doc test.

use std::time::Duration;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tern::{Ctx, ReplyTo, Service, TimerId};
use tern_harness::kit::{Finding, MigrationKit};

/// Keeps every word in order, and counts the ticks its timers make (a count: where a timer
/// falls among the messages is not the same in two copies, so the order of ticks is not kept).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Journal {
    lines: Vec<String>,
    ticks: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
enum JournalMsg {
    Write(u64),
    Tick(u64),
    Read(ReplyTo<(Vec<String>, Vec<u64>)>),
}

impl Service for Journal {
    type Msg = JournalMsg;
    const KIND: &'static str = "kit-journal";
    const VERSION: u32 = 1;
    async fn handle(&mut self, msg: JournalMsg, ctx: &mut Ctx<Self>) {
        match msg {
            JournalMsg::Write(n) => {
                self.lines.push(format!("w{n}"));
                if n % 40 == 0 {
                    let _ = ctx.schedule(Duration::from_millis(30), JournalMsg::Tick(n));
                }
            }
            JournalMsg::Tick(n) => {
                self.ticks.push(n);
                self.ticks.sort_unstable();
            }
            JournalMsg::Read(r) => {
                let _ = ctx.reply(r, (self.lines.clone(), self.ticks.clone()));
            }
        }
    }
}

#[test]
fn a_sound_service_moved_under_load_and_faults_shows_nothing_broken() -> Result<()> {
    let report = MigrationKit::new(Journal::default(), JournalMsg::Write, JournalMsg::Read)
        .messages(400)
        .moves(5)
        .ask_every(50)
        .faults(11, 0.02)
        .run()?;
    report.assert_clean();
    assert_eq!(report.moves, 5, "{report}");
    assert_eq!(report.path.len(), 6, "{report}");
    assert!(report.asks_answered >= 8, "{report}");
    assert!(report.to_string().contains("nothing broke"));
    Ok(())
}

/// Counts words, and keeps a cache serde leaves out: the cache is part of what it answers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Leaky {
    words: u64,
    #[serde(skip)]
    cache: Vec<u64>,
}

#[derive(Serialize, Deserialize)]
enum LeakyMsg {
    Word(u64),
    Read(ReplyTo<(u64, Vec<u64>)>),
}

impl Service for Leaky {
    type Msg = LeakyMsg;
    const KIND: &'static str = "kit-leaky";
    const VERSION: u32 = 1;
    async fn handle(&mut self, msg: LeakyMsg, ctx: &mut Ctx<Self>) {
        match msg {
            LeakyMsg::Word(n) => {
                self.words += 1;
                self.cache.push(n);
            }
            LeakyMsg::Read(r) => {
                let _ = ctx.reply(r, (self.words, self.cache.clone()));
            }
        }
    }
}

#[test]
fn a_field_serde_leaves_out_is_found_and_said() -> Result<()> {
    let start = Leaky {
        words: 0,
        cache: vec![7],
    };
    let report = MigrationKit::new(start, LeakyMsg::Word, LeakyMsg::Read)
        .messages(60)
        .moves(2)
        .run()?;
    assert!(!report.is_clean());
    assert!(
        matches!(report.findings.first(), Some(Finding::StateRoundTrip(_))),
        "{report}"
    );
    assert!(
        report
            .findings
            .iter()
            .any(|f| matches!(f, Finding::Diverged { .. })),
        "{report}"
    );
    let said = report.to_string();
    assert!(said.contains("#[serde(skip)]"), "{said}");
    assert!(said.contains("ended different"), "{said}");
    Ok(())
}

/// Arms an alarm on its first message; the alarm counts only if it is the one armed, and which
/// one is armed is kept outside the state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Alarm {
    rang: u64,
    #[serde(skip)]
    armed: Option<TimerId>,
}

#[derive(Serialize, Deserialize)]
enum AlarmMsg {
    Poke(u64),
    Ring,
    Read(ReplyTo<u64>),
}

impl Service for Alarm {
    type Msg = AlarmMsg;
    const KIND: &'static str = "kit-alarm";
    const VERSION: u32 = 1;
    async fn handle(&mut self, msg: AlarmMsg, ctx: &mut Ctx<Self>) {
        match msg {
            AlarmMsg::Poke(1) => {
                self.armed = ctx
                    .schedule(Duration::from_millis(3_000), AlarmMsg::Ring)
                    .ok();
            }
            AlarmMsg::Poke(_) => {}
            AlarmMsg::Ring => {
                if self.armed.take().is_some() {
                    self.rang += 1;
                }
            }
            AlarmMsg::Read(r) => {
                let _ = ctx.reply(r, self.rang);
            }
        }
    }
}

#[test]
fn a_timer_whose_effect_did_not_move_is_named() -> Result<()> {
    // The asks every 5 messages make sure the first poke was handled before the move.
    let report = MigrationKit::new(Alarm::default(), AlarmMsg::Poke, AlarmMsg::Read)
        .messages(20)
        .moves(1)
        .ask_every(5)
        .run()?;
    assert_eq!(report.findings.len(), 1, "{report}");
    assert!(
        matches!(&report.findings[0], Finding::TimerLost { moved, .. } if moved == "0"),
        "{report}"
    );
    assert!(
        report.to_string().contains("a timer did not come back"),
        "{report}"
    );
    Ok(())
}

/// The README's example of the kit is the one in docs/harness.md, which runs as a doc test.
#[test]
fn the_readme_kit_example_is_the_guides() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md"))?;
    let guide = std::fs::read_to_string(root.join("docs/harness.md"))?;
    let start = readme
        .find("```rust\nuse tern_harness::kit::MigrationKit;")
        .expect("the README shows the kit");
    let end = start + 8 + readme[start + 8..].find("```").expect("the block ends");
    let block = &readme[start..end];
    assert!(block.len() > 200, "{block}");
    assert!(
        guide.contains(block),
        "docs/harness.md lacks the README's example:\n{block}"
    );
    Ok(())
}
