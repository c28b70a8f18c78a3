//! A peer can send anything: malformed, truncated, oversize, unknown and misplaced frames all
//! get a clear error back, and the node keeps serving everyone else.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tern::{DeliveryError, KindKey, MigrateOptions, ServiceId};
use tern_actors::{SeqSink, SinkMsg};
use tern_harness::rogue::{frame, Answer, Rogue};
use tern_harness::{block_on, wait_until, Cluster};
use tern_proto::wire::{self, code, encode_frame, Frame, MigMsg, ReplyBody, SnapHeader};

use crate::common::{connected, connected_with, Slow, SlowMsg, SECS_10};

const MAX: usize = 16 << 20;

/// A body that is valid MessagePack but names a frame kind no node knows.
fn unknown_kind() -> Vec<u8> {
    #[derive(Serialize)]
    enum Alien {
        Teleport { to: u32 },
    }
    let body = rmp_serde::to_vec(&Alien::Teleport { to: 7 }).expect("encodes");
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.push(wire::WIRE_VERSION);
    out.extend_from_slice(&body);
    out
}

/// A batch frame of two MessagePack nils from `from` to `to`, numbered from `first_seq`.
fn two_nil_batch(to: ServiceId, from: ServiceId, first_seq: u64) -> Result<Vec<u8>> {
    let mut batch = Vec::new();
    let mut tail = wire::start_batch(&mut batch, (to, Some(from), first_seq, false, &[0xc0]), MAX)?;
    assert!(wire::append_to_batch(&mut batch, &mut tail, &[0xc0], MAX));
    Ok(batch)
}

pub(crate) fn expect_protocol_error(a: Answer, want: u16, mentions: &str) {
    match a {
        Answer::ProtocolError(code, detail) => {
            assert_eq!(code, want, "{detail}");
            assert!(
                detail.contains(mentions),
                "{detail:?} should mention {mentions:?}"
            );
        }
        other => panic!("expected protocol error {want}, got {other:?}"),
    }
}

#[test]
fn hostile_frames_get_errors_and_the_node_keeps_serving() -> Result<()> {
    let c = connected(&["a", "b"])?;
    let a = c.node("a");
    let sink = a.spawn(SeqSink::default())?;
    let from_b = c.node("b").resolve::<SeqSink>(sink.addr())?;

    block_on(async {
        let mut p = Rogue::connect(&c, "probe", "a").await?;

        // Valid length, body not a frame.
        p.send_uni(&[0, 0, 0, 3, wire::WIRE_VERSION, 0xc1, 0xc1, 0xc1])
            .await?;
        expect_protocol_error(p.answer().await?, code::MALFORMED, "malformed");

        // A frame kind nobody knows.
        p.send_uni(&unknown_kind()).await?;
        expect_protocol_error(p.answer().await?, code::MALFORMED, "Teleport");

        // A 4 GiB length prefix: refused from the header alone.
        p.send_uni(&[0xff, 0xff, 0xff, 0xff, wire::WIRE_VERSION, 1, 2, 3])
            .await?;
        expect_protocol_error(p.answer().await?, code::TOO_LARGE, "4294967295");

        // A frame cut short by the end of its stream.
        let whole = frame(&Frame::Reject {
            reason: "x".repeat(100),
        });
        p.send_uni(&whole[..40]).await?;
        expect_protocol_error(p.answer().await?, code::TRUNCATED, "40 of");

        // Another wire version.
        p.send_uni(&[0, 0, 0, 1, 99, 0xc0]).await?;
        expect_protocol_error(p.answer().await?, code::WRONG_VERSION, "99");

        // A known frame on the wrong stream.
        p.send_uni(&frame(&Frame::Hello { caps: vec![] })).await?;
        expect_protocol_error(p.answer().await?, code::UNEXPECTED, "hello");

        // A request for a service that does not exist: refused, not left hanging.
        let ghost = ServiceId::from_parts(1, 1);
        p.send_uni(&frame(&Frame::Deliver {
            to: ghost,
            from: None,
            seq: 1,
            ask: Some(77),
            wait: false,
            msg: &[0xc0],
        }))
        .await?;
        match p.answer().await? {
            Answer::Refused(77, DeliveryError::UnknownService { id, .. }) => assert_eq!(id, ghost),
            other => panic!("expected refusal of ask 77, got {other:?}"),
        }

        // A message that is not the service's message type.
        p.send_uni(&frame(&Frame::Deliver {
            to: sink.id(),
            from: None,
            seq: 1,
            ask: Some(78),
            wait: false,
            msg: &[0x93, 1, 2, 3],
        }))
        .await?;
        match p.answer().await? {
            Answer::Refused(78, DeliveryError::BadMessage { .. }) => {}
            other => panic!("expected bad-message refusal of ask 78, got {other:?}"),
        }

        // A batch whose numbers would run past u64::MAX: a clear error, not an overflow, and none
        // of it is delivered.
        let batch = two_nil_batch(sink.id(), ServiceId::from_parts(5, 5), u64::MAX)?;
        p.send_uni(&batch).await?;
        expect_protocol_error(p.answer().await?, code::MALFORMED, "run past");

        // A batch of two messages that are not the sink's type: each is refused on its own.
        let batch = two_nil_batch(sink.id(), ServiceId::from_parts(5, 6), 1)?;
        p.send_uni(&batch).await?;
        for _ in 0..2 {
            assert!(matches!(p.answer().await?, Answer::RefusedTell));
        }

        // A spawn of a kind the node does not have.
        let spawn = frame(&Frame::Spawn {
            req: 79,
            kind: KindKey::new("nope", 1),
            state: &[0xc0],
        });
        p.ctrl_send.write_all(&spawn).await?;
        match p.answer().await? {
            Answer::Failed(79, detail) => assert!(detail.contains("not registered"), "{detail}"),
            other => panic!("expected spawn failure 79, got {other:?}"),
        }

        // Garbage on the control stream itself is answered too, then the connection closes.
        p.ctrl_send.write_all(&[0xff, 0xff, 0xff, 0xff, 1]).await?;
        expect_protocol_error(p.answer().await?, code::TOO_LARGE, "frame_bytes_max");
        let closed = tokio::time::timeout(SECS_10, p.conn.closed()).await;
        assert!(
            closed.is_ok(),
            "a broken control stream ends the connection"
        );

        // Meanwhile the node still serves its other peer.
        for seq in 1..=100 {
            from_b.tell(SinkMsg::Record {
                sender: "b".into(),
                seq,
            })?;
        }
        let report = from_b.ask(SinkMsg::Report, SECS_10).await?;
        assert_eq!(report.senders["b"].received, 100);
        let echo = from_b
            .ask(
                |reply| SinkMsg::RecordAsk {
                    sender: "b".into(),
                    seq: 101,
                    reply,
                },
                Duration::from_secs(5),
            )
            .await?;
        assert_eq!(echo, 101);
        Ok::<_, anyhow::Error>(())
    })?;
    let stats = a.stats();
    assert!(stats.protocol_errors >= 7, "{stats:?}");
    assert!(stats.refused_from_peers >= 2, "{stats:?}");
    assert!(a.events().iter().any(|e| e.kind == "protocol-error"));
    c.shutdown();
    Ok(())
}

fn snap_header(n: u64, kind: KindKey, state_bytes: u64, carried: u64) -> SnapHeader {
    tern_harness::rogue::snap_header(n, kind, state_bytes, carried)
}

fn begin(h: SnapHeader) -> Vec<u8> {
    frame(&Frame::SnapBegin(Box::new(h)))
}

/// The node's refusal of attempt `n`, with its reason.
pub(crate) fn refusal(m: MigMsg, want_n: u64) -> String {
    match m {
        MigMsg::Refused { n, reason, .. } if n == want_n => reason,
        other => panic!("expected the refusal of attempt {want_n}, got {other:?}"),
    }
}

#[test]
fn hostile_snapshot_streams_get_errors_or_refusals_and_nothing_is_installed() -> Result<()> {
    let c = connected(&["a", "b"])?;
    let a = c.node("a");
    let sink = a.spawn(SeqSink::default())?;
    let from_b = c.node("b").resolve::<SeqSink>(sink.addr())?;
    let slow = KindKey::new("test-slow", 1);
    let valid_state = rmp_serde::to_vec(&Slow::default())?;

    block_on(async {
        let mut p = Rogue::connect(&c, "probe", "a").await?;

        // State before any header.
        p.send_uni(&frame(&Frame::SnapState { bytes: &[1, 2, 3] }))
            .await?;
        expect_protocol_error(p.answer().await?, code::MALFORMED, "before its header");

        // More state than the header announced.
        let mut s = begin(snap_header(1, slow.clone(), 4, 0));
        s.extend(frame(&Frame::SnapState { bytes: &[0; 8] }));
        p.send_uni(&s).await?;
        expect_protocol_error(
            p.answer().await?,
            code::MALFORMED,
            "longer than the 4 bytes",
        );

        // Two headers on one stream.
        let mut s = begin(snap_header(2, slow.clone(), 4, 0));
        s.extend(begin(snap_header(3, slow.clone(), 4, 0)));
        p.send_uni(&s).await?;
        expect_protocol_error(p.answer().await?, code::UNEXPECTED, "snap-begin");

        // A message frame inside a snapshot stream.
        let mut s = begin(snap_header(4, slow.clone(), 4, 0));
        s.extend(frame(&Frame::Deliver {
            to: sink.id(),
            from: None,
            seq: 1,
            ask: None,
            wait: false,
            msg: &[0xc0],
        }));
        p.send_uni(&s).await?;
        expect_protocol_error(p.answer().await?, code::UNEXPECTED, "deliver");

        // A terabyte of state announced: refused from the header, nothing allocated.
        p.send_uni(&begin(snap_header(5, slow.clone(), 1 << 40, 0)))
            .await?;
        let why = refusal(p.mig().await?, 5);
        assert!(why.contains("snapshot_bytes_max"), "{why}");

        // A billion carried messages announced.
        p.send_uni(&begin(snap_header(6, slow.clone(), 4, 1_000_000_000)))
            .await?;
        let why = refusal(p.mig().await?, 6);
        assert!(why.contains("snapshot_carried_max"), "{why}");

        // A kind the node does not have.
        p.send_uni(&begin(snap_header(7, KindKey::new("nope", 1), 4, 0)))
            .await?;
        let why = refusal(p.mig().await?, 7);
        assert!(why.contains("nope"), "{why}");

        // A newer version of a kind the node runs (test-slow@2, where it runs version 1),
        // forced: refused at the header, forced or not, saying why.
        let mut newer = snap_header(10, KindKey::new("test-slow", 2), 4, 0);
        newer.forced = true;
        p.send_uni(&begin(newer)).await?;
        let why = refusal(p.mig().await?, 10);
        assert!(
            why.contains("runs test-slow@1, older than test-slow@2"),
            "{why}"
        );

        // State that is not the kind's state.
        let mut s = begin(snap_header(8, slow.clone(), 3, 0));
        s.extend(frame(&Frame::SnapState {
            bytes: &[0xc1, 0xc1, 0xc1],
        }));
        s.extend(frame(&Frame::SnapEnd));
        p.send_uni(&s).await?;
        let why = refusal(p.mig().await?, 8);
        assert!(why.contains("restore failed"), "{why}");

        // A well-formed snapshot is prepared, and still never runs without the source's
        // commit; the probe says abort and the copy goes.
        let h = snap_header(9, slow.clone(), valid_state.len() as u64, 0);
        let id9 = h.id;
        let mut s = begin(h);
        s.extend(frame(&Frame::SnapState {
            bytes: &valid_state,
        }));
        s.extend(frame(&Frame::SnapEnd));
        p.send_uni(&s).await?;
        match p.mig().await? {
            MigMsg::Prepared { n: 9, .. } => {}
            other => panic!("expected Prepared for attempt 9, got {other:?}"),
        }
        let abort = frame(&Frame::Mig(MigMsg::Abort {
            source: tern::NodeName::new("probe"),
            n: 9,
        }));
        p.ctrl_send.write_all(&abort).await?;
        // Waited for here, not with the blocking helper: the probe's connection runs on this
        // thread and must get its Abort out.
        wait_until(SECS_10, "the aborted copy to go", || async {
            a.services().iter().all(|s| s.addr.id != id9)
        })
        .await?;

        // Meanwhile the node serves its other peer as before.
        for seq in 1..=100 {
            from_b.tell(SinkMsg::Record {
                sender: "b".into(),
                seq,
            })?;
        }
        let report = from_b.ask(SinkMsg::Report, SECS_10).await?;
        assert_eq!(report.senders["b"].received, 100);
        Ok::<_, anyhow::Error>(())
    })?;
    // None of the hostile attempts left a service behind.
    let ours = a
        .services()
        .iter()
        .filter(|s| s.addr.id.prefix() == 0x5eed)
        .count();
    assert_eq!(ours, 0);
    let m = a.migration_stats();
    assert_eq!(m.arrived, 0, "{m:?}");
    assert!(m.refused_in.values().sum::<u64>() >= 5, "{m:?}");
    assert!(a.stats().protocol_errors >= 4);
    c.shutdown();
    Ok(())
}

/// A service on b with an 800 KiB state: a real migration that needs room at a.
fn big_on_b(c: &Cluster) -> Result<tern::ServiceRef<Slow>> {
    Ok(c.node("b").spawn(Slow {
        handled: (0..100_000).collect(),
    })?)
}

/// `big` (from [`big_on_b`]), wherever it went, still has every item it had.
fn kept_every_item(c: &Cluster, big: &tern::ServiceRef<Slow>) -> Result<()> {
    let from_b = c.node("b").resolve::<Slow>(big.addr())?;
    assert_eq!(
        block_on(from_b.ask(SlowMsg::Items, SECS_10))?.len(),
        100_000
    );
    Ok(())
}

#[test]
fn snapshot_states_get_room_as_their_bytes_arrive_within_the_nodes_budget() -> Result<()> {
    let budget = 1 << 20;
    let limits = tern::Limits {
        snapshot_bytes_in_max: budget,
        ..tern::Limits::default()
    };
    let c = connected_with(&["a", "b"], limits)?;
    let slow = KindKey::new("test-slow", 1);
    let chunk = vec![0u8; 700 << 10];
    block_on(async {
        let mut p = Rogue::connect(&c, "probe", "a").await?;
        // Two snapshots that each announce 200 MiB and send 700 KiB: no room is made on the
        // header's word, and the second no longer fits the budget.
        let mut first = p.conn.open_uni().await?;
        let mut s = begin(snap_header(1, slow.clone(), 200 << 20, 0));
        s.extend(frame(&Frame::SnapState { bytes: &chunk }));
        first.write_all(&s).await?;
        let mut s = begin(snap_header(2, slow.clone(), 200 << 20, 0));
        s.extend(frame(&Frame::SnapState { bytes: &chunk }));
        p.send_uni(&s).await?;
        // The streams are read side by side: whichever comes second is refused.
        match p.mig().await? {
            MigMsg::Refused {
                n: 1 | 2, reason, ..
            } => {
                assert!(reason.contains("snapshot_bytes_in_max"), "{reason}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        // The open stream gives up, and the rogue goes: every room is given back.
        first.reset(quinn::VarInt::from_u32(0))?;
        p.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    // Real migrations still find room (an 800 KiB state fits once the first room is back).
    let big = big_on_b(&c)?;
    tern_harness::wait_for(SECS_10, "the budget to be given back", || {
        let report = block_on(
            c.node("b")
                .migrate(big.id(), "a", MigrateOptions::default()),
        );
        matches!(report, Ok(r) if r.aborted.is_none())
    })?;
    kept_every_item(&c, &big)?;
    c.shutdown();
    Ok(())
}

/// One peer's snapshots hold at most its share of the node's room: a rogue that fills its
/// share is refused more, while an honest peer's migration still finds room at once.
#[test]
fn one_peer_cannot_take_the_whole_snapshot_budget() -> Result<()> {
    let limits = tern::Limits {
        snapshot_bytes_in_max: 4 << 20,
        snapshot_bytes_in_per_peer_max: 1 << 20,
        ..tern::Limits::default()
    };
    let c = connected_with(&["a", "b"], limits)?;
    let slow = KindKey::new("test-slow", 1);
    let big = big_on_b(&c)?;
    let chunk = vec![0u8; 700 << 10];
    block_on(async {
        let mut p = Rogue::connect(&c, "probe", "a").await?;
        let mut first = p.conn.open_uni().await?;
        let mut s = begin(snap_header(1, slow.clone(), 200 << 20, 0));
        s.extend(frame(&Frame::SnapState { bytes: &chunk }));
        first.write_all(&s).await?;
        let mut s = begin(snap_header(2, slow.clone(), 200 << 20, 0));
        s.extend(frame(&Frame::SnapState { bytes: &chunk }));
        p.send_uni(&s).await?;
        let why = match p.mig().await? {
            MigMsg::Refused {
                n: 1 | 2, reason, ..
            } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert!(why.contains("snapshot_bytes_in_per_peer_max"), "{why}");
        assert!(why.contains("from probe"), "{why}");
        // The rogue still holds its share on an open stream; b's 800 KiB state fits at once.
        let report = c
            .node("b")
            .migrate(big.id(), "a", MigrateOptions::default())
            .await?;
        assert!(report.aborted.is_none(), "{report:?}");
        first.reset(quinn::VarInt::from_u32(0))?;
        p.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    kept_every_item(&c, &big)?;
    c.shutdown();
    Ok(())
}

#[test]
fn a_snapshot_whose_state_does_not_come_in_time_is_refused_and_gives_its_room_back() -> Result<()> {
    let limits = tern::Limits {
        snapshot_bytes_in_max: 1 << 20,
        migration_deadline_ms: 600,
        ..tern::Limits::default()
    };
    let c = connected_with(&["a", "b"], limits)?;
    let slow = KindKey::new("test-slow", 1);
    let big = big_on_b(&c)?;
    block_on(async {
        let mut p = Rogue::connect(&c, "probe", "a").await?;
        // 700 KiB of a 1 MiB state, then nothing, on a stream left open.
        let mut stalled = p.conn.open_uni().await?;
        let mut s = begin(snap_header(1, slow.clone(), 1 << 20, 0));
        s.extend(frame(&Frame::SnapState {
            bytes: &vec![0u8; 700 << 10],
        }));
        stalled.write_all(&s).await?;
        let why = refusal(p.mig().await?, 1);
        assert!(why.contains("too slow"), "{why}");
        // The rogue is still there, its stream still open, and the room is back: a real
        // migration of an 800 KiB state fits at once.
        let report = c
            .node("b")
            .migrate(big.id(), "a", MigrateOptions::default())
            .await?;
        assert!(report.aborted.is_none(), "{report:?}");
        drop(stalled);
        p.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    kept_every_item(&c, &big)?;
    c.shutdown();
    Ok(())
}

/// A snapshot may carry only as many queued messages as its header announced: one more is a
/// protocol error, nothing it carried past the count is held, and the node keeps serving.
#[test]
fn a_snapshot_carrying_more_than_it_announced_is_cut_off() -> Result<()> {
    let c = connected(&["a", "b"])?;
    let slow = KindKey::new("test-slow", 1);
    let state = rmp_serde::to_vec(&Slow::default())?;
    let errors_before = c.node("a").stats().protocol_errors;
    block_on(async {
        let mut p = Rogue::connect(&c, "probe", "a").await?;
        let carried = |seq| -> Result<wire::CarriedMsg> {
            Ok(wire::CarriedMsg {
                from: Some(ServiceId::from_parts(0x5eed, 99)),
                seq,
                ask: None,
                origin: Some(tern::NodeName::new("probe")),
                msg: rmp_serde::to_vec(&crate::common::SlowMsg::Item(seq))?,
            })
        };
        let mut s = begin(snap_header(11, slow.clone(), state.len() as u64, 1));
        s.extend(frame(&Frame::SnapState { bytes: &state }));
        s.extend(frame(&Frame::SnapCarried {
            msgs: (1..=3).map(carried).collect::<Result<Vec<_>>>()?,
        }));
        p.send_uni(&s).await?;
        p.barrier().await?;
        p.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    tern_harness::wait_for(SECS_10, "the protocol error", || {
        c.node("a").stats().protocol_errors > errors_before
    })?;
    assert!(c
        .node("a")
        .events()
        .iter()
        .any(|e| e.detail.contains("more than the 1 the header announced")));
    // An honest migration still goes through and its service still takes messages.
    let moved = c.node("b").spawn(Slow::default())?;
    let report = block_on(
        c.node("b")
            .migrate(moved.id(), "a", MigrateOptions::default()),
    )?;
    assert!(report.aborted.is_none(), "{report:?}");
    let from_b = c.node("b").resolve::<Slow>(moved.addr())?;
    block_on(from_b.tell_wait(SlowMsg::Item(5)))?;
    assert_eq!(block_on(from_b.ask(SlowMsg::Items, SECS_10))?, vec![5]);
    c.shutdown();
    Ok(())
}

/// A snapshot stream whose framing breaks after the state and part of the carried queue: the
/// copy runs once its source commits, with what arrived, instead of waiting for the rest of
/// its queue for ever (before, a framing error left it gated: nothing it held, and nothing
/// sent to it, was ever handled).
#[test]
fn a_snapshot_stream_whose_framing_breaks_leaves_no_copy_gated() -> Result<()> {
    let c = connected(&["a", "b"])?;
    let a = c.node("a");
    let slow = KindKey::new("test-slow", 1);
    let state = rmp_serde::to_vec(&Slow::default())?;
    block_on(async {
        let mut p = Rogue::connect(&c, "probe", "a").await?;
        let h = snap_header(10, slow.clone(), state.len() as u64, 2);
        let addr = tern::ServiceAddr {
            id: h.id,
            kind: slow.clone(),
            node: a.name().clone(),
        };
        let mut s = begin(h);
        s.extend(frame(&Frame::SnapState { bytes: &state }));
        s.extend(frame(&Frame::SnapCarried {
            msgs: vec![wire::CarriedMsg {
                from: Some(ServiceId::from_parts(0x5eed, 99)),
                seq: 1,
                ask: None,
                origin: Some(tern::NodeName::new("probe")),
                msg: rmp_serde::to_vec(&crate::common::SlowMsg::Item(7))?,
            }],
        }));
        // The second carried message never comes: a length no frame may have.
        s.extend(u32::MAX.to_be_bytes());
        s.extend([0u8; 8]);
        p.send_uni(&s).await?;
        match p.mig().await? {
            MigMsg::Prepared { n: 10, .. } => {}
            other => bail!("expected Prepared for attempt 10, got {other:?}"),
        }
        let commit = frame(&Frame::Mig(MigMsg::Commit {
            source: tern::NodeName::new("probe"),
            n: 10,
        }));
        p.ctrl_send.write_all(&commit).await?;
        let h = a.resolve::<Slow>(&addr)?;
        let items = h
            .ask(crate::common::SlowMsg::Items, SECS_10)
            .await
            .context("the committed copy never ran")?;
        assert_eq!(items, vec![7], "it ran with what arrived");
        Ok::<_, anyhow::Error>(())
    })?;
    assert!(a.stats().protocol_errors >= 1);
    c.shutdown();
    Ok(())
}

/// The book a snapshot carries is read at the target: an entry the target never heard of (its
/// `BookChange` missed) is there once the copy runs, pointing from the service's new place.
#[test]
fn a_snapshot_brings_its_book_to_a_target_that_missed_it() -> Result<()> {
    let c = connected(&["a", "b"])?;
    let a = c.node("a");
    let slow = KindKey::new("test-slow", 1);
    let state = rmp_serde::to_vec(&Slow::default())?;
    let friend = tern::ServiceAddr {
        id: ServiceId::from_parts(0x5eed, 77),
        kind: slow.clone(),
        node: tern::NodeName::new("b"),
    };
    let mut h = snap_header(11, slow.clone(), state.len() as u64, 0);
    h.tables = 1;
    let id = h.id;
    block_on(async {
        let mut p = Rogue::connect(&c, "probe", "a").await?;
        let mut s = begin(h);
        s.extend(frame(&Frame::SnapTables(tern_proto::snapshot::Tables {
            book: vec![("friend".to_string(), friend.clone())],
            ..Default::default()
        })));
        s.extend(frame(&Frame::SnapState { bytes: &state }));
        s.extend(frame(&Frame::SnapEnd));
        p.send_uni(&s).await?;
        match p.mig().await? {
            MigMsg::Prepared { n: 11, .. } => {}
            other => bail!("expected Prepared for attempt 11, got {other:?}"),
        }
        p.ctrl_send
            .write_all(&frame(&Frame::Mig(MigMsg::Commit {
                source: tern::NodeName::new("probe"),
                n: 11,
            })))
            .await?;
        wait_until(SECS_10, "the committed copy to run", || async {
            a.services().iter().any(|s| s.addr.id == id)
        })
        .await?;
        Ok::<_, anyhow::Error>(())
    })?;
    assert_eq!(a.book(id), vec![("friend".to_string(), friend)]);
    c.shutdown();
    Ok(())
}

/// Frames of at most this many bytes, far below a snapshot's tables in the tests below.
const SMALL_FRAME: usize = 32 << 10;

/// Nodes a and b with frames of at most [`SMALL_FRAME`] bytes.
fn small_frames() -> Result<Cluster> {
    connected_with(
        &["a", "b"],
        tern::Limits {
            frame_bytes_max: SMALL_FRAME,
            ..tern::Limits::default()
        },
    )
}

/// A service that heard from more senders than its windows fit in one frame still moves
/// (the windows follow the header in frames of their own), and its windows arrive whole: a
/// copy of a number it took is dropped at the new place, the next number is handled.
#[test]
fn a_service_with_more_senders_than_a_frame_holds_moves_with_its_windows() -> Result<()> {
    const SENDERS: u64 = 6_000;
    let c = small_frames()?;
    let a = c.node("a");
    let sink = a.spawn(SeqSink::default())?;
    let to = sink.id();
    let sender = |i: u64| ServiceId::from_parts(0x7e57_0000_0000_0000 | i, u64::MAX - i);
    let record = |seq: u64| -> Result<Vec<u8>> {
        Ok(rmp_serde::to_vec(&SinkMsg::Record {
            sender: "probe".into(),
            seq,
        })?)
    };
    let tell = |from: ServiceId, tern_seq: u64, body: &[u8]| -> Result<Vec<u8>> {
        let mut out = Vec::new();
        wire::start_batch(
            &mut out,
            (to, Some(from), tern_seq, true, body),
            SMALL_FRAME,
        )?;
        Ok(out)
    };
    let report = block_on(async {
        let p = Rogue::connect(&c, "probe", "a").await?;
        // One message from each of many senders: one window each at the sink.
        let mut stream = Vec::new();
        for i in 0..SENDERS {
            stream.extend(tell(sender(i), 1, &record(i + 1)?)?);
        }
        p.send_uni(&stream).await?;
        wait_until(SECS_10, "every sender's message handled", || async {
            sink.ask(SinkMsg::Report, SECS_10).await.is_ok_and(|r| {
                r.senders
                    .get("probe")
                    .is_some_and(|r| r.received == SENDERS)
            })
        })
        .await?;

        let report = a.migrate(to, "b", Default::default()).await?;
        assert!(report.committed(), "moved: {report:?}");

        // Through the tombstone at a: a copy of sender 17's first message (dropped by its
        // window at b), then its second (handled).
        let mut again = tell(sender(17), 1, &record(1_000_000)?)?;
        again.extend(tell(sender(17), 2, &record(SENDERS + 1)?)?);
        p.send_uni(&again).await?;
        // The probe stays connected until the messages are through.
        let from_b = c.node("b").resolve::<SeqSink>(sink.addr())?;
        let report = || async { from_b.ask(SinkMsg::Report, SECS_10).await };
        wait_until(SECS_10, "sender 17's messages at b", || async {
            report()
                .await
                .is_ok_and(|r| r.senders.get("probe").is_some_and(|r| r.received > SENDERS))
        })
        .await?;
        Ok::<_, anyhow::Error>(report().await?)
    })?;
    let probe = &report.senders["probe"];
    assert_eq!(
        (probe.received, probe.next),
        (SENDERS + 1, SENDERS + 2),
        "received and next: the copy was dropped, the next number handled"
    );
    assert!(probe.missing.is_empty() && probe.duplicated == 0);
    c.shutdown();
    Ok(())
}

/// A service whose book is far larger than a frame still moves: the book follows the header
/// in frames of its own (timers too), and arrives whole.
#[test]
fn a_service_with_a_book_larger_than_a_frame_moves_with_it() -> Result<()> {
    const ENTRIES: usize = 2_000;
    let c = small_frames()?;
    let (a, b) = (c.node("a"), c.node("b"));
    let svc = a.spawn(Slow::default())?;
    let other = a.spawn(Slow::default())?;
    for i in 0..ENTRIES {
        a.book_insert(
            svc.addr(),
            &format!("a-rather-long-role-name-{i}"),
            other.addr(),
        )?;
    }
    let report = block_on(a.migrate(svc.id(), "b", Default::default()))?;
    assert!(report.committed(), "moved: {report:?}");
    assert_eq!(b.book(svc.id()).len(), ENTRIES);
    // And it runs there.
    let from_a = a.resolve::<Slow>(svc.addr())?;
    block_on(from_a.tell_wait(SlowMsg::Item(1)))?;
    let items = block_on(from_a.ask(SlowMsg::Items, SECS_10))?;
    assert_eq!(items, vec![1]);
    c.shutdown();
    Ok(())
}

/// A timer too large for any frame cannot travel: the migration aborts with a reason that
/// says so (not as a lost link), the service runs on where it was, and the timer still rings
/// there.
#[test]
fn a_timer_larger_than_a_frame_aborts_the_move_with_its_reason() -> Result<()> {
    let c = small_frames()?;
    let a = c.node("a");
    let alarm = a.spawn(crate::common::Alarm::default())?;
    let report = block_on(async {
        alarm
            .tell_wait(crate::common::AlarmMsg::SetPadded {
                after_ms: 300,
                tag: 7,
                pad_bytes: 48 << 10,
            })
            .await?;
        // Answered after the timer is set (one sender's messages are handled in order).
        alarm.ask(crate::common::AlarmMsg::Fired, SECS_10).await?;
        crate::common::not_moved(a.migrate(alarm.id(), "b", Default::default()).await)
    })?;
    match &report.aborted {
        Some(tern::AbortReason::Stream(why)) => {
            assert!(
                why.contains("frame_bytes_max") || why.contains("too large"),
                "{why}"
            )
        }
        other => panic!("expected a stream failure, got {other:?}: {report:?}"),
    }
    assert!(a.is_connected("b"), "the link stays up");
    block_on(wait_until(SECS_10, "the timer to ring at a", || async {
        alarm
            .ask(crate::common::AlarmMsg::Fired, SECS_10)
            .await
            .is_ok_and(|f| {
                f.iter()
                    .any(|(tag, node, _)| *tag == 7 && node.as_str() == "a")
            })
    }))?;
    c.shutdown();
    Ok(())
}

/// A peer cannot answer an ask it never saw. Ask ids come from a keyed hash of a counter, so a
/// probe that sends forged replies for the first 10,000 ids (where counted ids would be) while
/// a's ask to a busy service on b waits completes nothing: the ask gets the service's own
/// answer, and a keeps serving.
#[test]
fn a_peer_cannot_answer_an_ask_it_never_saw() -> Result<()> {
    let c = connected(&["a", "b"])?;
    let slow = c.node("b").spawn(Slow::default())?;
    let from_a = c.node("a").resolve::<Slow>(slow.addr())?;
    let forged = rmp_serde::to_vec(&vec![666u64])?;
    let answer = block_on(async {
        from_a.tell_wait(SlowMsg::Hold { ms: 1_000 }).await?;
        from_a.tell_wait(SlowMsg::Item(7)).await?;
        let mut p = Rogue::connect(&c, "probe", "a").await?;
        let forge = async {
            let mut frames = Vec::new();
            for ask in 0..10_000u64 {
                let reply = Frame::Reply {
                    ask,
                    result: ReplyBody::Value(&forged),
                };
                encode_frame(&mut frames, &reply, MAX)?;
            }
            p.ctrl_send.write_all(&frames).await?;
            Ok::<_, anyhow::Error>(())
        };
        let (asked, forged) = tokio::join!(from_a.ask(SlowMsg::Items, SECS_10), forge);
        forged?;
        Ok::<_, anyhow::Error>(asked?)
    })?;
    assert_eq!(
        answer,
        vec![7],
        "the service's own answer, not the forged one"
    );
    // a still answers.
    let again = block_on(from_a.ask(SlowMsg::Items, SECS_10))?;
    assert_eq!(again, vec![7]);
    c.shutdown();
    Ok(())
}
