//! Pairing a new device by code over loopback: the right code gets a certificate the cluster
//! accepts; a wrong, replayed, expired or spent code, or another name, is refused; every try
//! is reported.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tern::certs::{ClusterCa, Role};
use tern::pairing::{join, PairOutcome, PairingOffer, PairingServer, PAIR_TRIES_MAX};
use tern::{Node, NodeConfig};
use tern_harness::{block_on, wait_for};

use crate::common::{connected, register_test_kinds, Slow, SlowMsg, SECS_10};

/// The cluster's CA, as the device that holds it would load it.
fn holder_ca(c: &tern_harness::Cluster, what: &str) -> Result<Arc<ClusterCa>> {
    let dir = std::env::temp_dir().join(format!("tern-pair-{what}-{}", std::process::id()));
    c.ca.write(&dir)?;
    let ca = ClusterCa::load(&dir)?;
    std::fs::remove_dir_all(&dir)?;
    Ok(Arc::new(ca))
}

/// One try: the server answers while the device joins with `code` as `name`.
async fn try_join(
    server: &mut PairingServer,
    name: &str,
    code: &str,
) -> Result<(PairOutcome, Result<tern::certs::NodeIdentity, tern::Error>)> {
    let at = server.local_addr();
    let (attempt, joined) = tokio::join!(server.answer_one(), join(at, name, code));
    Ok((attempt?.outcome, joined))
}

fn refusal(joined: Result<tern::certs::NodeIdentity, tern::Error>) -> String {
    match joined {
        Ok(id) => panic!("joined as {:?}", id.name()),
        Err(e) => e.to_string(),
    }
}

/// A code that is not this one, in the same form.
fn wrong(code: &str) -> String {
    let swap = |c: char| if c == '2' { '3' } else { '2' };
    code.chars()
        .enumerate()
        .map(|(i, c)| if i == 0 { swap(c) } else { c })
        .collect()
}

#[test]
fn a_device_pairs_by_code_and_joins_the_cluster() -> Result<()> {
    let c = connected(&["a", "b"])?;
    let ca = holder_ca(&c, "pairs")?;
    let watch_id = block_on(async {
        let mut server = PairingServer::bind(
            "127.0.0.1:0".parse()?,
            ca.clone(),
            PairingOffer::node("watch"),
        )
        .await?;
        let code = server.code().to_string();
        assert_eq!(code.len(), tern::pairing::PAIR_CODE_CHARS + 1, "{code}");

        // A wrong code: refused, and the code survives.
        let (outcome, joined) = try_join(&mut server, "watch", &wrong(&code)).await?;
        assert_eq!(
            outcome,
            PairOutcome::WrongCode {
                tries_left: PAIR_TRIES_MAX - 1
            }
        );
        assert!(refusal(joined).contains("wrong code"));
        // Another name than the offer's: refused.
        let (outcome, joined) = try_join(&mut server, "car", &code).await?;
        assert_eq!(outcome, PairOutcome::WrongName("car".into()));
        assert!(refusal(joined).contains("this code is for watch, not car"));

        // The right code, typed loosely: a node certificate for the watch, its key made here.
        let (outcome, joined) =
            try_join(&mut server, "watch", &code.to_lowercase().replace('-', " ")).await?;
        assert!(matches!(outcome, PairOutcome::Paired { .. }), "{outcome:?}");
        let watch_id = joined?;
        assert_eq!(watch_id.name()?.as_str(), "watch");
        assert_eq!(watch_id.role()?, Role::Node);
        assert_eq!(watch_id.ca_der, ca.cert_der());

        // The same code again (a replay): refused.
        let (outcome, joined) = try_join(&mut server, "watch", &code).await?;
        assert_eq!(outcome, PairOutcome::AlreadyUsed);
        assert!(refusal(joined).contains("used already"));
        Ok::<_, anyhow::Error>(watch_id)
    })?;

    // The paired device joins the cluster and carries traffic.
    let watch = Node::start(NodeConfig::new(watch_id, "127.0.0.1:0".parse()?))?;
    register_test_kinds(&watch);
    watch.add_peer("a", c.node("a").local_addr())?;
    wait_for(SECS_10, "the watch to join", || {
        c.node("a").is_connected("watch") && c.node("b").is_connected("watch")
    })?;
    let on_watch = watch.spawn(Slow::default())?;
    let from_a = c.node("a").resolve::<Slow>(on_watch.addr())?;
    let items = block_on(async {
        from_a.tell_wait(SlowMsg::Item(1)).await?;
        from_a.tell_wait(SlowMsg::Item(2)).await?;
        Ok::<_, anyhow::Error>(from_a.ask(SlowMsg::Items, SECS_10).await?)
    })?;
    assert_eq!(items, vec![1, 2]);
    watch.shutdown();
    c.shutdown();
    Ok(())
}

#[test]
fn expired_and_spent_codes_are_refused_even_when_right() -> Result<()> {
    let c = connected(&["a"])?;
    let ca = holder_ca(&c, "refused")?;
    let offer = PairingOffer {
        ttl: Duration::ZERO,
        ..PairingOffer::node("tv")
    };
    block_on(async {
        let mut expired = PairingServer::bind("127.0.0.1:0".parse()?, ca.clone(), offer).await?;
        let code = expired.code().to_string();
        let (outcome, joined) = try_join(&mut expired, "tv", &code).await?;
        assert_eq!(outcome, PairOutcome::Expired);
        assert!(refusal(joined).contains("expired"));

        let mut spent =
            PairingServer::bind("127.0.0.1:0".parse()?, ca, PairingOffer::node("tv")).await?;
        let code = spent.code().to_string();
        for left in (0..PAIR_TRIES_MAX).rev() {
            let (outcome, _) = try_join(&mut spent, "tv", &wrong(&code)).await?;
            assert_eq!(outcome, PairOutcome::WrongCode { tries_left: left });
        }
        let (outcome, joined) = try_join(&mut spent, "tv", &code).await?;
        assert_eq!(outcome, PairOutcome::Spent);
        assert!(refusal(joined).contains("too many wrong tries"));
        assert!(!spent.is_paired());
        // Not a code at all: the device says so before dialing.
        assert!(join(spent.local_addr(), "tv", "12").await.is_err());
        Ok::<_, anyhow::Error>(())
    })?;
    c.shutdown();
    Ok(())
}
