//! Tells and asks across nodes; per-sender order; unknown services and kinds.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use tern::{AskError, DeliveryError, Error, KindKey, ServiceAddr, ServiceId, ServiceRef};
use tern_actors::{KvMsg, KvStore, SeqSender, SeqSenderMsg, SeqSink, SinkMsg};
use tern_harness::{block_on, wait_for, Cluster};

use crate::common::{connected, Slow, SECS_10};

#[test]
fn asks_and_tells_across_three_nodes_keep_per_sender_order() -> Result<()> {
    let c = connected(&["a", "b", "c"])?;
    let (a, b) = (c.node("a"), c.node("b"));
    let sink_b = b.spawn(SeqSink::default())?;
    let sink_c = c.node("c").spawn(SeqSink::default())?;
    let to_b = a.spawn(SeqSender::new("a->b"))?;
    let to_c = a.spawn(SeqSender::new("a->c"))?;
    a.book_insert(to_b.addr(), "sink", sink_b.addr())?;
    a.book_insert(to_c.addr(), "sink", sink_c.addr())?;

    block_on(async {
        // Services on a tell and ask services on b and c.
        for s in [&to_b, &to_c] {
            s.tell(SeqSenderMsg::Tell { count: 10_000 })?;
            s.tell(SeqSenderMsg::Ask {
                count: 200,
                timeout_ms: 10_000,
            })?;
        }
        // A handle outside any service does the same, interleaved with them.
        let remote_b: ServiceRef<SeqSink> = a.resolve(sink_b.addr())?;
        assert!(!remote_b.is_local());
        for seq in 1..=10_000 {
            remote_b
                .tell_wait(SinkMsg::Record {
                    sender: "ext".into(),
                    seq,
                })
                .await?;
        }
        for seq in 10_001..=10_100 {
            let echo = remote_b
                .ask(
                    |reply| SinkMsg::RecordAsk {
                        sender: "ext".into(),
                        seq,
                        reply,
                    },
                    SECS_10,
                )
                .await?;
            assert_eq!(echo, seq, "each ask gets its own answer");
        }
        for s in [&to_b, &to_c] {
            let (sent, failed) = s
                .ask(SeqSenderMsg::Progress, Duration::from_secs(60))
                .await?;
            assert_eq!((sent, failed), (10_200, 0));
        }
        let report_b = remote_b.ask(SinkMsg::Report, SECS_10).await?;
        let verdict_b = report_b.verdict(&BTreeMap::from([
            ("a->b".to_string(), 10_200),
            ("ext".to_string(), 10_100),
        ]));
        assert!(verdict_b.is_clean(), "{verdict_b:?}");
        assert_eq!(verdict_b.received, 20_300);
        let report_c = a
            .resolve::<SeqSink>(sink_c.addr())?
            .ask(SinkMsg::Report, SECS_10)
            .await?;
        let verdict_c = report_c.verdict(&BTreeMap::from([("a->c".to_string(), 10_200)]));
        assert!(verdict_c.is_clean(), "{verdict_c:?}");
        assert_eq!(verdict_c.received, 10_200);
        Ok::<_, anyhow::Error>(())
    })?;
    assert!(b.stats().received_remote >= 20_300);
    assert_eq!(a.stats().refused_by_peers, 0);
    c.shutdown();
    Ok(())
}

#[test]
fn kv_store_answers_local_and_remote_asks_alike() -> Result<()> {
    let c = connected(&["a", "b"])?;
    let kv = c.node("b").spawn(KvStore::default())?;
    let local = kv.clone();
    let remote: ServiceRef<KvStore> = c.node("a").resolve(kv.addr())?;
    block_on(async {
        for (h, key) in [(&local, "from-b"), (&remote, "from-a")] {
            let prev = h
                .ask(
                    |r| KvMsg::Put {
                        key: key.into(),
                        value: key.as_bytes().to_vec(),
                        reply: Some(r),
                    },
                    SECS_10,
                )
                .await?;
            assert_eq!(prev, Ok(None));
        }
        for h in [&local, &remote] {
            let v = h
                .ask(
                    |r| KvMsg::Get {
                        key: "from-a".into(),
                        reply: r,
                    },
                    SECS_10,
                )
                .await?;
            assert_eq!(v.as_deref(), Some(&b"from-a"[..]));
            assert_eq!(h.ask(KvMsg::Len, SECS_10).await?, 2);
        }
        Ok::<_, anyhow::Error>(())
    })?;
    c.shutdown();
    Ok(())
}

#[test]
fn unknown_services_and_kinds_get_errors_not_hangs() -> Result<()> {
    let c = Cluster::start(&["a", "b"], |n| {
        tern_actors::register_all(n);
        if n.name().as_str() == "a" {
            n.register::<Slow>();
        }
    })?;
    c.wait_connected(SECS_10)?;
    let (a, b) = (c.node("a"), c.node("b"));
    let ghost = |node: &tern::NodeHandle| ServiceAddr {
        id: ServiceId::from_parts(0xdead, 1),
        kind: KindKey::new("seq-sink", 1),
        node: node.name().clone(),
    };

    // Local: refused when the handle is made.
    let err = a.resolve::<SeqSink>(&ghost(a)).unwrap_err();
    assert!(matches!(err, DeliveryError::UnknownService { .. }), "{err}");

    block_on(async {
        // Remote ask: the far node answers with an error; the ask does not wait out its timeout.
        let far = a.resolve::<SeqSink>(&ghost(b))?;
        let err = far
            .ask(SinkMsg::Report, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(
            matches!(err, AskError::Delivery(DeliveryError::UnknownService { ref node, .. }) if node.as_str() == "b"),
            "{err}"
        );
        // Remote tell: refused asynchronously, counted and logged on the sender's node.
        far.tell(SinkMsg::Record {
            sender: "x".into(),
            seq: 1,
        })?;
        Ok::<_, anyhow::Error>(())
    })?;
    wait_for(SECS_10, "tell refusal to come back", || {
        a.stats().refused_by_peers == 1
    })?;
    assert!(a
        .events()
        .iter()
        .any(|e| e.kind == "refused-by-peer" && e.detail.contains("not known")));
    assert_eq!(b.stats().refused_from_peers, 2);

    // Kinds: a kind b has not registered is refused by b; locally too; a typed handle of the
    // wrong kind is refused.
    let err = block_on(b.spawn_on(a.name(), &Slow::default(), SECS_10));
    assert!(err.is_ok(), "a has Slow registered: {err:?}");
    let err = block_on(a.spawn_on(b.name(), &Slow::default(), SECS_10)).unwrap_err();
    assert!(
        matches!(&err, Error::Remote { node, detail } if node.as_str() == "b" && detail.contains("not registered")),
        "{err}"
    );
    assert!(matches!(
        b.spawn(Slow::default()),
        Err(Error::UnknownKind { .. })
    ));
    let sink = b.spawn(SeqSink::default())?;
    assert!(matches!(
        a.resolve::<KvStore>(sink.addr()),
        Err(DeliveryError::KindMismatch { .. })
    ));

    // spawn_on works for a registered kind, and the result answers.
    let remote_sink = block_on(a.spawn_on(b.name(), &SeqSink::default(), SECS_10))?;
    assert_eq!(remote_sink.addr().node, *b.name());
    let report = block_on(remote_sink.ask(SinkMsg::Report, SECS_10))?;
    assert!(report.senders.is_empty());
    c.shutdown();
    Ok(())
}

/// Always has a message queued once started: each `Spin` tells itself the next.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct Spinner {
    spins: u64,
    spinning: bool,
}

#[derive(serde::Serialize, serde::Deserialize)]
enum SpinMsg {
    Start,
    Spin,
    Stop,
    Spins(tern::ReplyTo<u64>),
}

impl tern::Service for Spinner {
    type Msg = SpinMsg;
    const KIND: &'static str = "test-spinner";
    const VERSION: u32 = 1;
    async fn handle(&mut self, msg: SpinMsg, ctx: &mut tern::Ctx<Self>) {
        match msg {
            SpinMsg::Start => {
                self.spinning = true;
                let _ = ctx.tell(&ctx.myself(), SpinMsg::Spin);
            }
            SpinMsg::Spin => {
                self.spins += 1;
                if self.spinning {
                    let _ = ctx.tell(&ctx.myself(), SpinMsg::Spin);
                }
            }
            SpinMsg::Stop => self.spinning = false,
            SpinMsg::Spins(reply) => {
                let _ = ctx.reply(reply, self.spins);
            }
        }
    }
}

/// A service that never runs out of messages takes its thread in turns: the node's other
/// services, local and remote askers, and new spawns are all served while it spins, and it
/// keeps spinning meanwhile. (Were its turn unbounded, nothing else on its node would run.)
#[test]
fn a_service_that_never_runs_out_of_messages_leaves_its_node_serving_the_others() -> Result<()> {
    let c = Cluster::builder()
        .node("a", &[])
        .node("b", &[])
        .setup(|n| {
            crate::common::register_test_kinds(n);
            n.register::<Spinner>();
        })
        .start()?;
    c.wait_connected(SECS_10)?;
    let (a, b) = (c.node("a"), c.node("b"));
    let spinner = a.spawn(Spinner::default())?;
    let kv = a.spawn(KvStore::default())?;
    let kv_from_b: ServiceRef<KvStore> = b.resolve(kv.addr())?;
    spinner.tell(SpinMsg::Start)?;
    let spins = || block_on(spinner.ask(SpinMsg::Spins, SECS_10));
    wait_for(SECS_10, "the spinner to spin", || {
        spins().is_ok_and(|n| n > 10_000)
    })?;

    let before = spins()?;
    block_on(async {
        for i in 0..50u8 {
            // A local asker, and one on b whose asks and answers cross a's network.
            let put = |reply| KvMsg::Put {
                key: format!("k{i}"),
                value: vec![i],
                reply,
            };
            let previous = kv.ask(|r| put(Some(r)), SECS_10).await?;
            assert!(matches!(previous, Ok(None)), "k{i} was new");
            let got = kv_from_b
                .ask(
                    |reply| KvMsg::Get {
                        key: format!("k{i}"),
                        reply,
                    },
                    SECS_10,
                )
                .await?;
            assert_eq!(got, Some(vec![i]));
        }
        Ok::<_, anyhow::Error>(())
    })?;
    // A service started on a's thread while it spins answers too.
    let late = a.spawn(SeqSink::default())?;
    let report = block_on(late.ask(SinkMsg::Report, SECS_10))?;
    assert!(report.senders.is_empty());
    let during = spins()?;
    assert!(
        during > before,
        "the spinner went on: {before} then {during}"
    );

    // Stopped, it goes quiet, and traffic flows as before.
    spinner.tell(SpinMsg::Stop)?;
    // A spin queued before the stop was handled may be behind the first ask; a second ask,
    // sent once the first is answered, is behind that spin.
    spins()?;
    let settled = spins()?;
    assert_eq!(spins()?, settled, "no spin after the stop was handled");
    let got = block_on(kv_from_b.ask(
        |reply| KvMsg::Get {
            key: "k7".into(),
            reply,
        },
        SECS_10,
    ))?;
    assert_eq!(got, Some(vec![7]));
    c.shutdown();
    Ok(())
}
