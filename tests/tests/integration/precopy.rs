//! Pre-copy over real QUIC: a store written while it moves arrives with every write, its
//! freeze leaves the bulk behind, an abort before the freeze leaves it running untouched, and
//! hostile pre-copy streams get errors or refusals, and the target gives up a pre-copy that
//! outlasts its deadline. A group copies its large members ahead and freezes them together;
//! a refusal during its pre-copy leaves every member running untouched.

use std::cell::Cell;
use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tern::{AbortReason, Ctx, KindKey, MigrateOptions, Service, ServiceRef};
use tern_actors::{KvMsg, KvStore};
use tern_harness::rogue::{frame, snap_header, Rogue};
use tern_harness::{block_on, wait_until, Cluster};
use tern_proto::wire::{code, Frame};

use crate::frames::{expect_protocol_error, refusal};

use crate::common::{connected, connected_with, SECS_10};

/// Entries of 16 KiB the stores start with: 4 MiB, over `PRECOPY_MIN_BYTES`.
const ENTRIES: u64 = 256;

fn key(i: u64) -> String {
    format!("k{i:05}")
}

/// The value the `n`th write puts: 64 bytes naming `n`.
fn value(n: u64) -> Vec<u8> {
    n.to_le_bytes().repeat(8)
}

fn put(key: String, value: Vec<u8>) -> KvMsg {
    KvMsg::Put {
        key,
        value,
        reply: None,
    }
}

/// Fills `kv` with [`ENTRIES`] entries of 16 KiB; returns what it holds.
async fn fill(kv: &ServiceRef<KvStore>) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut held = BTreeMap::new();
    for i in 0..ENTRIES {
        let v = vec![i as u8; 16 << 10];
        kv.tell_wait(put(key(i), v.clone())).await?;
        held.insert(key(i), v);
    }
    // Handled, not only queued: the move copies them ahead instead of carrying the puts.
    assert_eq!(kv.ask(KvMsg::Len, SECS_10).await?, held.len());
    Ok(held)
}

/// One write of a stream of writes: mostly overwrites of existing keys, some new keys, every
/// seventh a delete.
async fn write(
    kv: &ServiceRef<KvStore>,
    n: u64,
    held: &mut BTreeMap<String, Vec<u8>>,
) -> Result<()> {
    let k = key((n * 37) % (ENTRIES + 40));
    if n % 7 == 0 {
        kv.tell_wait(KvMsg::Delete {
            key: k.clone(),
            reply: None,
        })
        .await?;
        held.remove(&k);
    } else {
        kv.tell_wait(put(k.clone(), value(n))).await?;
        held.insert(k, value(n));
    }
    Ok(())
}

/// `kv` holds exactly `held`.
async fn holds(kv: &ServiceRef<KvStore>, held: &BTreeMap<String, Vec<u8>>) -> Result<()> {
    assert_eq!(kv.ask(KvMsg::Len, SECS_10).await?, held.len());
    for i in 0..ENTRIES + 40 {
        let got = kv
            .ask(|reply| KvMsg::Get { key: key(i), reply }, SECS_10)
            .await?;
        assert_eq!(got.as_ref(), held.get(&key(i)), "entry {}", key(i));
    }
    Ok(())
}

/// Runs `moving` while writing to `kv` without a pause, numbering the writes from `first`;
/// returns what `moving` gave and how many writes went while it ran.
async fn while_writing<T>(
    kv: &ServiceRef<KvStore>,
    held: &mut BTreeMap<String, Vec<u8>>,
    first: u64,
    moving: impl std::future::Future<Output = T>,
) -> Result<(T, u64)> {
    let done = Cell::new(false);
    let moving = async {
        let r = moving.await;
        done.set(true);
        r
    };
    let writing = async {
        let mut n = first;
        while !done.get() {
            write(kv, n, held).await?;
            n += 1;
            // The move's own future gets its turns on this thread.
            tokio::task::yield_now().await;
        }
        Ok::<u64, anyhow::Error>(n - first)
    };
    let (moved, writes) = tokio::join!(moving, writing);
    Ok((moved, writes?))
}

/// Migrates `kv` to `to` while writing to it without a pause; returns the report and how many
/// writes went while the move ran.
async fn move_while_writing(
    c: &Cluster,
    kv: &ServiceRef<KvStore>,
    to: &str,
    held: &mut BTreeMap<String, Vec<u8>>,
    first: u64,
) -> Result<(tern::MigrationReport, u64)> {
    let moving = c.node("a").migrate(kv.id(), to, MigrateOptions::default());
    let (report, writes) = while_writing(kv, held, first, moving).await?;
    let report = match report {
        Ok(r) => r,
        Err(tern::Error::NotMoved(n)) if n.reports.len() == 1 => n.reports[0].clone(),
        Err(e) => return Err(e.into()),
    };
    Ok((report, writes))
}

#[test]
fn a_store_written_while_it_moves_arrives_with_every_write_and_its_freeze_leaves_the_bulk_behind(
) -> Result<()> {
    let c = connected(&["a", "b"])?;
    let kv = c.node("a").spawn(KvStore::default())?;
    block_on(async {
        let mut held = fill(&kv).await?;
        let (report, writes) = move_while_writing(&c, &kv, "b", &mut held, 1).await?;
        assert!(report.committed(), "{report:?}");
        assert!(writes > 0, "writes went on while it moved");
        // The entries went ahead (less those the writes removed or shrank first); the
        // snapshot carried the changes since and the writes that came during the freeze, not
        // the 4 MiB.
        assert!(report.precopied_bytes > 3 << 20, "copied ahead: {report:?}");
        assert!(
            report.snapshot_bytes < 1 << 20,
            "the freeze carries the changes only: {report:?}"
        );
        assert_eq!(kv.location().as_str(), "b");
        holds(&kv, &held).await?;
        // It serves on, and moves back the same way.
        for n in 100_000..100_200 {
            write(&kv, n, &mut held).await?;
        }
        holds(&kv, &held).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    assert_eq!(c.node("b").migration_stats().arrived, 1);
    c.shutdown();
    Ok(())
}

/// Moves `moves` from "a" as one group while writing to `kv` without a pause; returns every
/// member's report and how many writes went while the move ran.
async fn group_move_while_writing(
    c: &Cluster,
    moves: &[(tern::ServiceId, &str)],
    kv: &ServiceRef<KvStore>,
    held: &mut BTreeMap<String, Vec<u8>>,
    first: u64,
) -> Result<(Vec<tern::MigrationReport>, u64)> {
    let moving = c.node("a").migrate_group(moves, MigrateOptions::default());
    let (res, writes) = while_writing(kv, held, first, moving).await?;
    let reports = match res {
        Ok(r) => r.members,
        Err(tern::Error::NotMoved(n)) => n.reports,
        Err(e) => return Err(e.into()),
    };
    assert_eq!(reports.len(), moves.len());
    Ok((reports, writes))
}

/// A store with a few small entries: it copies nothing ahead, and moves whole in the freeze.
async fn small_store(kv: &ServiceRef<KvStore>) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut held = BTreeMap::new();
    for i in 0..3 {
        kv.tell_wait(put(key(i), value(i))).await?;
        held.insert(key(i), value(i));
    }
    assert_eq!(kv.ask(KvMsg::Len, SECS_10).await?, held.len());
    Ok(held)
}

#[test]
fn a_group_copies_its_large_member_ahead_and_every_member_arrives_with_every_write() -> Result<()> {
    let c = connected(&["a", "b", "c"])?;
    let big = c.node("a").spawn(KvStore::default())?;
    let small = c.node("a").spawn(KvStore::default())?;
    block_on(async {
        let mut held = fill(&big).await?;
        let small_held = small_store(&small).await?;
        let moves = [(big.id(), "b"), (small.id(), "c")];
        let (reports, writes) = group_move_while_writing(&c, &moves, &big, &mut held, 1).await?;
        assert!(
            reports.iter().all(|r| r.committed()),
            "the group moved: {reports:?}"
        );
        assert!(writes > 0, "writes went on while the group copied");
        assert!(
            reports[0].precopied_bytes > 3 << 20,
            "the large member went ahead: {:?}",
            reports[0]
        );
        assert!(
            reports[0].snapshot_bytes < 1 << 20,
            "its freeze carried the changes only: {:?}",
            reports[0]
        );
        assert_eq!(
            reports[1].precopied_bytes, 0,
            "the small member moved whole: {:?}",
            reports[1]
        );
        assert_eq!(big.location().as_str(), "b");
        assert_eq!(small.location().as_str(), "c");
        holds(&big, &held).await?;
        for (k, v) in &small_held {
            let got = small
                .ask(
                    |reply| KvMsg::Get {
                        key: k.clone(),
                        reply,
                    },
                    SECS_10,
                )
                .await?;
            assert_eq!(got.as_ref(), Some(v));
        }
        // Both serve on where they went.
        for n in 100_000..100_200 {
            write(&big, n, &mut held).await?;
        }
        holds(&big, &held).await?;
        small.tell_wait(put(key(9), value(9))).await?;
        assert_eq!(small.ask(KvMsg::Len, SECS_10).await?, small_held.len() + 1);
        Ok::<_, anyhow::Error>(())
    })?;
    assert_eq!(c.node("b").migration_stats().arrived, 1);
    assert_eq!(c.node("c").migration_stats().arrived, 1);
    c.shutdown();
    Ok(())
}

/// Nodes a, b and c, members of one another; b registers [`PlainKv`] under `KvStore`'s kind,
/// so it refuses pre-copies of it.
fn plain_b() -> Result<Cluster> {
    let c = Cluster::builder()
        .node("a", &[])
        .node("b", &[])
        .node("c", &[])
        .node_setup("a", tern_actors::register_all)
        .node_setup("b", |n| {
            n.register::<PlainKv>();
        })
        .node_setup("c", tern_actors::register_all)
        .start()?;
    c.wait_members(SECS_10)?;
    Ok(c)
}

#[test]
fn a_group_whose_precopy_is_refused_leaves_every_member_running_untouched() -> Result<()> {
    let c = plain_b()?;
    let big = c.node("a").spawn(KvStore::default())?;
    let small = c.node("a").spawn(KvStore::default())?;
    block_on(async {
        let mut held = fill(&big).await?;
        let small_held = small_store(&small).await?;
        // b takes stores that do not copy ahead only: it refuses the large member's pre-copy.
        let moves = [(big.id(), "b"), (small.id(), "c")];
        let (reports, _) = group_move_while_writing(&c, &moves, &big, &mut held, 1).await?;
        match &reports[0].aborted {
            Some(AbortReason::Refused(why)) => {
                assert!(why.contains("does not copy ahead"), "{why}")
            }
            other => panic!("expected b's refusal, got {other:?}"),
        }
        assert!(
            matches!(&reports[1].aborted, Some(AbortReason::Group(why)) if why.contains(&big.id().to_string())),
            "the other member names the one that failed: {:?}",
            reports[1]
        );
        for r in &reports {
            assert_eq!(
                r.frozen_after_us, 0,
                "no member froze: the refusal came during the pre-copy: {r:?}"
            );
        }
        assert_eq!(big.location().as_str(), "a");
        assert_eq!(small.location().as_str(), "a");
        holds(&big, &held).await?;
        assert_eq!(small.ask(KvMsg::Len, SECS_10).await?, small_held.len());
        // They move again, together, to a node that takes them.
        let moves = [(big.id(), "c"), (small.id(), "c")];
        let (reports, _) = group_move_while_writing(&c, &moves, &big, &mut held, 50_000).await?;
        assert!(reports.iter().all(|r| r.committed()), "{reports:?}");
        assert!(reports[0].precopied_bytes > 3 << 20, "{:?}", reports[0]);
        holds(&big, &held).await?;
        assert_eq!(small.ask(KvMsg::Len, SECS_10).await?, small_held.len());
        Ok::<_, anyhow::Error>(())
    })?;
    assert_eq!(c.node("b").migration_stats().arrived, 0);
    assert_eq!(c.node("c").migration_stats().arrived, 2);
    c.shutdown();
    Ok(())
}

/// A store of the same kind as [`KvStore`] that does not copy ahead: a node that registers it
/// refuses pre-copies of `kv`.
#[derive(Default, Serialize, Deserialize)]
struct PlainKv {
    entries: BTreeMap<String, Vec<u8>>,
}

impl Service for PlainKv {
    type Msg = KvMsg;
    const KIND: &'static str = "kv";
    const VERSION: u32 = 1;
    async fn handle(&mut self, _: KvMsg, _: &mut Ctx<Self>) {}
}

#[test]
fn a_precopy_the_target_refuses_leaves_the_store_running_untouched_and_it_moves_elsewhere(
) -> Result<()> {
    let c = plain_b()?;
    let kv = c.node("a").spawn(KvStore::default())?;
    block_on(async {
        let mut held = fill(&kv).await?;
        let (report, _) = move_while_writing(&c, &kv, "b", &mut held, 1).await?;
        match &report.aborted {
            Some(AbortReason::Refused(why)) => {
                assert!(why.contains("does not copy ahead"), "{why}")
            }
            other => panic!("expected b's refusal, got {other:?}"),
        }
        assert_eq!(
            report.frozen_after_us, 0,
            "it never froze: the refusal came during the pre-copy: {report:?}"
        );
        assert_eq!(kv.location().as_str(), "a");
        holds(&kv, &held).await?;
        // Tracking ended with the attempt: another move copies everything again, to a node
        // that takes it.
        let (report, _) = move_while_writing(&c, &kv, "c", &mut held, 50_000).await?;
        assert!(report.committed(), "{report:?}");
        assert!(report.precopied_bytes > 3 << 20, "{report:?}");
        holds(&kv, &held).await?;
        Ok::<_, anyhow::Error>(())
    })?;
    assert_eq!(
        c.node("a").migration_stats().aborted.get("refused"),
        Some(&1)
    );
    assert_eq!(c.node("b").migration_stats().arrived, 0);
    c.shutdown();
    Ok(())
}

#[test]
fn hostile_precopy_streams_get_errors_or_refusals_and_nothing_is_installed() -> Result<()> {
    let c = connected(&["a", "b"])?;
    let a = c.node("a");
    let kv_kind = <KvStore as Service>::kind_key();
    let id = |n: u64| tern::ServiceId::from_parts(0x5eed, n);
    let begin = |n: u64, kind: KindKey| {
        frame(&Frame::PreBegin {
            mig: n,
            id: id(n),
            kind,
        })
    };
    block_on(async {
        let mut p = Rogue::connect(&c, "probe", "a").await?;

        // Entries before any header.
        p.send_uni(&frame(&Frame::PreState { bytes: &[0x92] }))
            .await?;
        expect_protocol_error(p.answer().await?, code::MALFORMED, "before their header");

        // A kind the node does not have, and one that does not copy ahead.
        p.send_uni(&begin(1, KindKey::new("nope", 1))).await?;
        assert!(refusal(p.mig().await?, 1).contains("nope"));
        p.send_uni(&begin(2, KindKey::new("test-slow", 1))).await?;
        assert!(refusal(p.mig().await?, 2).contains("does not copy ahead"));

        // Entries that are not the kind's entries: refused, not a panic.
        let mut s = begin(3, kv_kind.clone());
        s.extend(frame(&Frame::PreState {
            bytes: &[0x92, 0xc1, 0xc1],
        }));
        p.send_uni(&s).await?;
        assert!(refusal(p.mig().await?, 3).contains("pre-copied entries"));

        // A message frame inside a pre-copy stream.
        let mut s = begin(4, kv_kind.clone());
        s.extend(frame(&Frame::SnapEnd));
        p.send_uni(&s).await?;
        expect_protocol_error(p.answer().await?, code::UNEXPECTED, "snap-end");

        // A snapshot that says it was copied ahead, with nothing ahead of it; and a pre-copy
        // followed by a snapshot of another attempt.
        let mut h = snap_header(5, kv_kind.clone(), 4, 0);
        h.precopied = true;
        p.send_uni(&frame(&Frame::SnapBegin(Box::new(h)))).await?;
        expect_protocol_error(p.answer().await?, code::MALFORMED, "without its pre-copy");
        let mut s = begin(6, kv_kind.clone());
        let mut h = snap_header(7, kv_kind.clone(), 4, 0);
        h.precopied = true;
        s.extend(frame(&Frame::SnapBegin(Box::new(h))));
        p.send_uni(&s).await?;
        expect_protocol_error(p.answer().await?, code::MALFORMED, "without its pre-copy");

        // Two pre-copy headers on one stream.
        let mut s = begin(8, kv_kind.clone());
        s.extend(begin(9, kv_kind.clone()));
        p.send_uni(&s).await?;
        expect_protocol_error(p.answer().await?, code::UNEXPECTED, "pre-begin");
        Ok::<_, anyhow::Error>(())
    })?;
    // The node serves on; nothing was installed.
    let kv = a.spawn(KvStore::default())?;
    block_on(async {
        kv.tell_wait(put("x".into(), vec![1])).await?;
        assert_eq!(kv.ask(KvMsg::Len, SECS_10).await?, 1);
        wait_until(SECS_10, "no probe copy", || async {
            a.services().iter().all(|s| s.addr.id.prefix() != 0x5eed)
        })
        .await
    })?;
    assert_eq!(a.migration_stats().arrived, 0);
    c.shutdown();
    Ok(())
}

/// Runs `probe` against node "a" of a two-node cluster with `limits`, giving it a rogue
/// connection and the framed header of pre-copy attempt 1 of a `KvStore`. Then checks that
/// "a" serves a new store and installed nothing.
fn after_the_probe_the_node_serves_on<F, Fut>(limits: tern::Limits, probe: F) -> Result<()>
where
    F: FnOnce(Rogue, Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let c = connected_with(&["a", "b"], limits)?;
    let a = c.node("a");
    let begin = frame(&Frame::PreBegin {
        mig: 1,
        id: tern::ServiceId::from_parts(0x5eed, 1),
        kind: <KvStore as Service>::kind_key(),
    });
    block_on(async { probe(Rogue::connect(&c, "probe", "a").await?, begin).await })?;
    let kv = a.spawn(KvStore::default())?;
    block_on(async {
        kv.tell_wait(put("x".into(), vec![1])).await?;
        assert_eq!(kv.ask(KvMsg::Len, SECS_10).await?, 1);
        Ok::<_, anyhow::Error>(())
    })?;
    assert_eq!(a.migration_stats().arrived, 0);
    c.shutdown();
    Ok(())
}

/// A pre-copy whose snapshot does not follow within `precopy_deadline_ms` +
/// `migration_deadline_ms` is given up by the target on its own (the stream's timer, not the
/// next chunk), refused to the source, and the node serves on.
#[test]
fn a_precopy_that_outlasts_its_deadline_is_refused_by_the_target_which_serves_on() -> Result<()> {
    let limits = tern::Limits {
        precopy_deadline_ms: 150,
        migration_deadline_ms: 150,
        ..tern::Limits::default()
    };
    after_the_probe_the_node_serves_on(limits, |mut p, mut first| async move {
        let mut s = p.open_uni().await?;
        first.extend(frame(&Frame::PreState { bytes: &[] }));
        s.write_all(&first).await?;
        // Applied: the pre-copy was admitted, and then it stalls, its stream left open.
        p.next_picked("pre-applied", |f| {
            matches!(f, tern_harness::rogue::RogueFrame::Other("pre-applied")).then_some(())
        })
        .await?;
        let reason = refusal(p.mig().await?, 1);
        assert!(reason.contains("too slow"), "{reason}");
        // Chunks after the refusal are dropped, not applied.
        s.write_all(&frame(&Frame::PreState { bytes: &[] })).await?;
        assert!(p.barrier().await?.is_empty());
        Ok(())
    })
}

/// A pre-copy that would pass `snapshot_bytes_max` is refused at the chunk that would pass
/// it, before that chunk is decoded, and the node serves on.
#[test]
fn a_precopy_over_the_snapshot_bound_is_refused_before_its_chunk_is_read() -> Result<()> {
    const MAX: usize = 64 << 10;
    let limits = tern::Limits {
        snapshot_bytes_max: MAX,
        ..tern::Limits::default()
    };
    after_the_probe_the_node_serves_on(limits, |mut p, mut s| async move {
        // Bytes that are no entries at all: read, they would be refused as malformed.
        let junk = vec![0xc1u8; MAX + 1];
        s.extend(frame(&Frame::PreState { bytes: &junk }));
        p.send_uni(&s).await?;
        let reason = refusal(p.mig().await?, 1);
        assert!(reason.contains("too large"), "{reason}");
        assert!(reason.contains("snapshot_bytes_max"), "{reason}");
        Ok(())
    })
}
