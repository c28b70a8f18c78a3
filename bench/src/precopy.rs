//! Pre-copy figures: the freeze and total time of a service that moves while a writer changes
//! 1% of its state per second, with its state copied ahead ([`tern::Precopy`]) and, in the
//! same run, the same data and writes in a kind that moves its whole state in the freeze; and
//! the same for a group move of that service with a small one (`group`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use serde_json::{json, Value};
use tern::{Ctx, MigrateOptions, Precopy, ReplyTo, Service, ServiceRef, TrackedMap};
use tern_harness::{block_on, Cluster};

use crate::util::{percentiles, progress, round2, Scale};

/// Bytes per entry: the writes replace whole entries, so what changes is what the writer
/// writes, nothing more.
const ENTRY_BYTES: usize = 4 << 10;

#[derive(Serialize, Deserialize)]
enum PageMsg {
    /// Replace entry `at`.
    Write { at: u32, bytes: ByteBuf },
    /// Writes handled.
    Writes(ReplyTo<u64>),
}

/// The state in a [`TrackedMap`], copied ahead when it moves (whatever its size: the bench
/// measures where copying ahead starts to pay).
#[derive(Serialize, Deserialize)]
struct Pages {
    pages: TrackedMap<u32, ByteBuf>,
    writes: u64,
}

impl Service for Pages {
    type Msg = PageMsg;
    const KIND: &'static str = "bench-pages";
    const VERSION: u32 = 1;
    const PRECOPY: Option<Precopy<Self>> = Some(Precopy {
        part: |s| &mut s.pages,
        empty: || Box::new(TrackedMap::<u32, ByteBuf>::new()),
        min_bytes: 0,
    });

    async fn handle(&mut self, msg: PageMsg, ctx: &mut Ctx<Self>) {
        self.writes = page_msg(
            msg,
            self.writes,
            |at, b| {
                self.pages.insert(at, b);
            },
            ctx,
        );
    }
}

/// The same data and writes in a plain map: the whole state moves in the freeze.
#[derive(Serialize, Deserialize)]
struct PlainPages {
    pages: BTreeMap<u32, ByteBuf>,
    writes: u64,
}

impl Service for PlainPages {
    type Msg = PageMsg;
    const KIND: &'static str = "bench-plain-pages";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: PageMsg, ctx: &mut Ctx<Self>) {
        self.writes = page_msg(
            msg,
            self.writes,
            |at, b| {
                self.pages.insert(at, b);
            },
            ctx,
        );
    }
}

/// Handles `msg` for a store that has handled `writes` writes and puts entries with `put`;
/// the writes handled after it.
fn page_msg<S: Service>(
    msg: PageMsg,
    writes: u64,
    put: impl FnOnce(u32, ByteBuf),
    ctx: &mut Ctx<S>,
) -> u64 {
    match msg {
        PageMsg::Write { at, bytes } => {
            put(at, bytes);
            writes + 1
        }
        PageMsg::Writes(r) => {
            let _ = ctx.reply(r, writes);
            writes
        }
    }
}

fn entries(state_bytes: usize) -> BTreeMap<u32, ByteBuf> {
    (0..(state_bytes / ENTRY_BYTES) as u32)
        .map(|i| (i, ByteBuf::from(vec![i as u8; ENTRY_BYTES])))
        .collect()
}

/// One case's samples: freeze, total, bytes copied ahead.
#[derive(Default)]
struct Samples {
    freeze: Vec<u64>,
    total: Vec<u64>,
    ahead: Vec<u64>,
}

/// Moves `svc` back and forth `runs` times between a and b while a writer replaces entries
/// at `writes_per_s`; checks every write was handled once.
fn moves<S: Service<Msg = PageMsg>>(
    c: &Cluster,
    svc: &ServiceRef<S>,
    count: u32,
    writes_per_s: u64,
    runs: usize,
) -> Result<Samples> {
    moves_by(svc, count, writes_per_s, runs, async |from, to| {
        let report = c
            .node(from)
            .migrate(svc.id(), to, MigrateOptions::default())
            .await?;
        if !report.committed() {
            bail!("{} did not move: {report:?}", S::KIND);
        }
        Ok((report.freeze_us, report.total_us, report.precopied_bytes))
    })
}

/// As [`moves`], with `small` moving in one group with `svc` (a group's freeze and total).
fn group_moves<S: Service<Msg = PageMsg>>(
    c: &Cluster,
    (svc, small): (&ServiceRef<S>, &ServiceRef<Pages>),
    count: u32,
    writes_per_s: u64,
    runs: usize,
) -> Result<Samples> {
    moves_by(svc, count, writes_per_s, runs, async |from, to| {
        let group = c
            .node(from)
            .migrate_group(
                &[(svc.id(), to), (small.id(), to)],
                MigrateOptions::default(),
            )
            .await?;
        Ok((
            group.freeze_us,
            group.total_us,
            group.members[0].precopied_bytes,
        ))
    })
}

/// Moves back and forth `runs` times between a and b with `migrate` (from, to: the freeze,
/// the total and the bytes copied ahead) while a writer replaces entries of `svc` at
/// `writes_per_s`; checks every write was handled once.
fn moves_by<S: Service<Msg = PageMsg>>(
    svc: &ServiceRef<S>,
    count: u32,
    writes_per_s: u64,
    runs: usize,
    migrate: impl AsyncFn(&'static str, &'static str) -> Result<(u64, u64, u64)>,
) -> Result<Samples> {
    let mut s = Samples::default();
    let every = Duration::from_micros(1_000_000 / writes_per_s.max(1));
    let mut sent = 0u64;
    block_on(async {
        for run in 0..runs {
            let (from, to) = if run % 2 == 0 { ("a", "b") } else { ("b", "a") };
            let done = std::cell::Cell::new(false);
            let moving = async {
                // The writer runs a moment before the move too: the state is being changed.
                tokio::time::sleep((every * 4).min(Duration::from_millis(100))).await;
                let r = migrate(from, to).await;
                done.set(true);
                r
            };
            let writing = async {
                let mut tick = tokio::time::interval(every);
                while !done.get() {
                    tick.tick().await;
                    let at = (sent.wrapping_mul(2_654_435_761) % u64::from(count)) as u32;
                    let bytes = ByteBuf::from(vec![sent as u8; ENTRY_BYTES]);
                    svc.tell_wait(PageMsg::Write { at, bytes }).await?;
                    sent += 1;
                }
                Ok::<(), anyhow::Error>(())
            };
            let (moved, wrote) = tokio::join!(moving, writing);
            wrote?;
            let (freeze, total, ahead) = moved?;
            s.freeze.push(freeze);
            s.total.push(total);
            s.ahead.push(ahead);
        }
        let handled = svc.ask(PageMsg::Writes, Duration::from_secs(60)).await?;
        if handled != sent {
            bail!("{} handled {handled} of {sent} writes", S::KIND);
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(s)
}

pub fn run(scale: &Scale) -> Result<Value> {
    let quick = scale.repeats < 5 || scale.local_msgs < 10_000_000;
    let c = Cluster::builder()
        .node("a", &[])
        .node("b", &[])
        .setup(|n| {
            n.register::<Pages>().register::<PlainPages>();
        })
        .start()?;
    c.wait_connected(Duration::from_secs(10))?;
    let mut cases = Vec::new();
    for (state_bytes, runs) in [
        (4usize << 10, 10usize),
        (64 << 10, 10),
        (256 << 10, 10),
        (1 << 20, 10),
        (64 << 20, 6),
    ] {
        let runs = if quick { (runs / 2).max(3) } else { runs };
        // 1% of the state per second, in whole entries.
        let writes_per_s = ((state_bytes / 100) / ENTRY_BYTES).max(1) as u64;
        let count = (state_bytes / ENTRY_BYTES) as u32;
        progress(&format!(
            "pre-copy: {state_bytes} bytes, {writes_per_s} writes of {ENTRY_BYTES} bytes per second, {runs} runs each way"
        ));
        let ahead = c.node("a").spawn(Pages {
            pages: entries(state_bytes).into_iter().collect(),
            writes: 0,
        })?;
        let pre = moves(&c, &ahead, count, writes_per_s, runs)?;
        let whole = c.node("a").spawn(PlainPages {
            pages: entries(state_bytes),
            writes: 0,
        })?;
        let full = moves(&c, &whole, count, writes_per_s, runs)?;
        cases.push(compared(
            json!({
                "state_bytes": state_bytes,
                "writes_per_s": writes_per_s,
                "write_bytes": ENTRY_BYTES,
                "runs": runs,
            }),
            pre,
            full,
        ));
    }
    let group = group_case(&c, if quick { 3 } else { 6 })?;
    c.shutdown();
    Ok(json!({ "cases": cases, "group": group }))
}

/// A group move of a 64 MiB service written at 1% per second with a 4 KiB one, copied ahead
/// and, in the same run, with the large one moving whole in the freeze.
fn group_case(c: &Cluster, runs: usize) -> Result<Value> {
    let state_bytes = 64usize << 20;
    let writes_per_s = ((state_bytes / 100) / ENTRY_BYTES) as u64;
    let count = (state_bytes / ENTRY_BYTES) as u32;
    progress(&format!(
        "pre-copy in a group: {state_bytes} bytes and 4 KiB, {runs} runs each way"
    ));
    let small = || {
        c.node("a").spawn(Pages {
            pages: entries(ENTRY_BYTES).into_iter().collect(),
            writes: 0,
        })
    };
    let ahead = c.node("a").spawn(Pages {
        pages: entries(state_bytes).into_iter().collect(),
        writes: 0,
    })?;
    let pre = group_moves(c, (&ahead, &small()?), count, writes_per_s, runs)?;
    let whole = c.node("a").spawn(PlainPages {
        pages: entries(state_bytes),
        writes: 0,
    })?;
    let full = group_moves(c, (&whole, &small()?), count, writes_per_s, runs)?;
    Ok(compared(
        json!({
            "state_bytes": state_bytes,
            "members": 2,
            "writes_per_s": writes_per_s,
            "write_bytes": ENTRY_BYTES,
            "runs": runs,
        }),
        pre,
        full,
    ))
}

/// `case` (a JSON object) with the figures of `pre` (copied ahead) against `full` (whole).
fn compared(case: Value, pre: Samples, full: Samples) -> Value {
    let (freeze_p50, freeze_p99) = percentiles(pre.freeze);
    let (total_p50, _) = percentiles(pre.total);
    let (ahead_p50, _) = percentiles(pre.ahead);
    let (full_freeze_p50, full_freeze_p99) = percentiles(full.freeze);
    let (full_total_p50, _) = percentiles(full.total);
    let mut case = case;
    if let Value::Object(m) = &mut case {
        m.extend(
            json!({
                "freeze_us_p50": freeze_p50,
                "freeze_us_p99": freeze_p99,
                "total_us_p50": total_p50,
                "precopied_bytes_p50": ahead_p50,
                "full_copy_freeze_us_p50": full_freeze_p50,
                "full_copy_freeze_us_p99": full_freeze_p99,
                "full_copy_total_us_p50": full_total_p50,
                "freeze_vs_full_copy": round2(freeze_p50 as f64 / full_freeze_p50.max(1) as f64),
                "total_vs_full_copy": round2(total_p50 as f64 / full_total_p50.max(1) as f64),
            })
            .as_object()
            .cloned()
            .unwrap_or_default(),
        );
    }
    case
}
