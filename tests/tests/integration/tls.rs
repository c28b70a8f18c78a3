//! Only holders of a certificate from the cluster CA get in, and a refusal is visible.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use tern::certs::{ClusterCa, NodeIdentity};
use tern::{Node, NodeConfig};
use tern_actors::{SeqSink, SinkMsg};
use tern_harness::{block_on, wait_for};

use crate::common::{connected, register_test_kinds, SECS_10};

#[test]
fn a_node_with_a_certificate_from_another_ca_cannot_connect() -> Result<()> {
    let c = connected(&["a"])?;
    let a = c.node("a");
    let sink = a.spawn(SeqSink::default())?;

    // Mallory trusts the cluster CA (so it would accept a's certificate) but its own
    // certificate comes from another CA.
    let other = ClusterCa::new()?;
    let forged = other.issue("mallory")?;
    let mallory_id = NodeIdentity {
        ca_der: c.ca.cert_der().to_vec(),
        ..forged
    };
    let mallory = Node::start(NodeConfig::new(mallory_id, "127.0.0.1:0".parse()?))?;
    register_test_kinds(&mallory);
    mallory.add_peer("a", a.local_addr())?;

    wait_for(SECS_10, "a to refuse mallory, in its event log", || {
        a.events().iter().any(|e| e.kind == "connection-refused")
    })?;
    assert!(a.stats().connections_refused >= 1);
    let refusal = a
        .events()
        .into_iter()
        .find(|e| e.kind == "connection-refused")
        .expect("the refusal is in a's event log");
    assert!(
        refusal.detail.to_lowercase().contains("certificate"),
        "refusal names the certificate: {}",
        refusal.detail
    );
    wait_for(SECS_10, "mallory to see its dial fail", || {
        mallory.peers().iter().any(|p| p.last_error.is_some())
    })?;
    assert!(!mallory.is_connected("a"));
    assert!(!a.is_connected("mallory"));

    // Whatever mallory queues for a never arrives.
    let far = mallory.resolve::<SeqSink>(sink.addr())?;
    far.tell(SinkMsg::Record {
        sender: "mallory".into(),
        seq: 1,
    })?;
    std::thread::sleep(Duration::from_millis(600));
    let report = block_on(sink.ask(SinkMsg::Report, SECS_10))?;
    let verdict = report.verdict(&BTreeMap::from([("mallory".to_string(), 1)]));
    assert_eq!(verdict.received, 0);
    assert!(a.stats().received_remote == 0);
    mallory.shutdown();
    c.shutdown();
    Ok(())
}

#[test]
fn dialing_an_address_under_the_wrong_name_fails() -> Result<()> {
    let c = connected(&["a"])?;
    let a = c.node("a");
    // A member of the cluster believes node b listens where a does: a's certificate names a,
    // so the dial must fail instead of talking to the wrong node.
    let eve = Node::start(NodeConfig::new(c.ca.issue("eve")?, "127.0.0.1:0".parse()?))?;
    eve.add_peer("b", a.local_addr())?;
    wait_for(SECS_10, "eve's dial to fail", || {
        eve.peers().iter().any(|p| p.last_error.is_some())
    })?;
    let err = eve.peers()[0].last_error.clone().unwrap_or_default();
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(!eve.is_connected("b"));
    assert!(
        eve.add_peer("eve", a.local_addr()).is_err(),
        "a node is not its own peer"
    );
    eve.shutdown();
    c.shutdown();
    Ok(())
}

#[test]
fn each_pair_of_nodes_keeps_exactly_one_connection_when_both_dial() -> Result<()> {
    // The harness introduces every node to every other, so every pair dials both ways at once.
    let c = connected(&["a", "b", "c", "d"])?;
    // Let any duplicate dial finish its handshake and be turned down.
    std::thread::sleep(Duration::from_millis(300));
    for n in c.nodes() {
        let s = n.stats();
        assert_eq!(
            s.connections_up,
            3,
            "{} brought up {} connections for 3 peers: {:?}",
            n.name(),
            s.connections_up,
            n.events()
        );
        assert_eq!(s.peers_connected, 3);
        assert!(
            !n.events().iter().any(|e| e.kind == "peer-down"),
            "{:?}",
            n.events()
        );
    }
    c.shutdown();
    Ok(())
}

/// Waits until `node` has refused a connection and returns what its event log says.
fn refusal_on(node: &tern::NodeHandle, before: u64) -> Result<String> {
    // The counter moves just before the event is logged: wait for both.
    let last = || {
        node.events()
            .into_iter()
            .rev()
            .find(|e| e.kind == "connection-refused")
            .map(|e| e.detail)
    };
    wait_for(SECS_10, "a refused connection", || {
        node.stats().connections_refused > before && last().is_some()
    })?;
    Ok(last().unwrap_or_default())
}

/// Sends one record as `sender` from `from` to the sink and checks, after a while, that
/// nothing from `sender` ever arrived.
fn nothing_arrives_from(
    from: &tern::NodeHandle,
    sink: &tern::ServiceRef<SeqSink>,
    sender: &str,
) -> Result<()> {
    let far = from.resolve::<SeqSink>(sink.addr())?;
    let _ = far.tell(SinkMsg::Record {
        sender: sender.into(),
        seq: 1,
    });
    std::thread::sleep(Duration::from_millis(600));
    let report = block_on(sink.ask(SinkMsg::Report, SECS_10))?;
    let verdict = report.verdict(&BTreeMap::from([(sender.to_string(), 1)]));
    assert_eq!(verdict.received, 0, "{verdict:?}");
    Ok(())
}

#[test]
fn a_peer_without_a_client_certificate_is_refused() -> Result<()> {
    let c = connected(&["a"])?;
    let a = c.node("a");
    let before = a.stats().connections_refused;
    // A client that trusts the cluster CA but presents no certificate of its own.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(
        c.ca.cert_der().to_vec(),
    ))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![tern_proto::wire::ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let sent = block_on(async {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(quic)));
        // The client's side of the handshake may finish before the server has checked it;
        // whatever it then tries fails.
        let attempt = async {
            let conn = endpoint.connect(a.local_addr(), "a")?.await?;
            let (mut send, _recv) = conn.open_bi().await?;
            send.write_all(b"hello?").await?;
            send.finish()?;
            conn.closed().await;
            anyhow::Ok(())
        };
        let r = tokio::time::timeout(SECS_10, attempt).await;
        endpoint.close(0u32.into(), b"done");
        anyhow::Ok(r)
    })?;
    let detail = refusal_on(a, before)?;
    assert!(detail.contains("certificate"), "{detail}");
    assert!(sent.is_ok(), "the connection ends rather than hangs");
    assert_eq!(a.stats().received_remote, 0);
    assert_eq!(a.stats().peers_connected, 0);
    c.shutdown();
    Ok(())
}

#[test]
fn an_expired_certificate_is_refused_with_a_reason_that_says_so() -> Result<()> {
    let c = connected(&["a"])?;
    let a = c.node("a");
    let sink = a.spawn(SeqSink::default())?;
    let before = a.stats().connections_refused;
    let day = Duration::from_secs(24 * 3600);
    let now = std::time::SystemTime::now();
    let old = c.ca.issue_valid("old", now - 30 * day..now - day)?;
    let node = Node::start(NodeConfig::new(old, "127.0.0.1:0".parse()?))?;
    register_test_kinds(&node);
    node.add_peer("a", a.local_addr())?;
    let detail = refusal_on(a, before)?;
    assert!(detail.to_lowercase().contains("expired"), "{detail}");
    assert!(!a.is_connected("old"));
    nothing_arrives_from(&node, &sink, "old")?;
    // Nor can it push a migration: it has no connection to push one on.
    assert_eq!(a.migration_stats().arrived, 0);
    assert!(
        c.ca.issue_valid("old", now..now).is_err(),
        "an empty span is refused"
    );
    node.shutdown();
    c.shutdown();
    Ok(())
}

#[test]
fn a_second_holder_of_a_connected_nodes_name_is_refused_and_the_first_stays() -> Result<()> {
    let c = connected(&["a", "c"])?;
    let (a, cc) = (c.node("a"), c.node("c"));
    let sink = cc.spawn(SeqSink::default())?;
    let before = cc.stats().connections_refused;
    // A valid certificate from the cluster CA, but for a name already connected.
    let twin = Node::start(NodeConfig::new(c.ca.issue("a")?, "127.0.0.1:0".parse()?))?;
    register_test_kinds(&twin);
    twin.add_peer("c", cc.local_addr())?;
    let detail = refusal_on(cc, before)?;
    assert!(detail.contains("name collision"), "{detail}");
    assert!(detail.contains(&a.local_addr().to_string()), "{detail}");
    // The real a keeps its connection and its traffic.
    assert!(cc.is_connected("a") && a.is_connected("c"));
    nothing_arrives_from(&twin, &sink, "twin")?;
    let from_a = a.resolve::<SeqSink>(sink.addr())?;
    block_on(async {
        for seq in 1..=10 {
            from_a
                .tell_wait(SinkMsg::Record {
                    sender: "a".into(),
                    seq,
                })
                .await?;
        }
        let r = from_a.ask(SinkMsg::Report, SECS_10).await?;
        assert!(r
            .verdict(&BTreeMap::from([("a".to_string(), 10)]))
            .is_clean());
        Ok::<_, anyhow::Error>(())
    })?;
    twin.shutdown();
    c.shutdown();
    Ok(())
}

/// A peer that completes TLS and then says nothing holds a connection slot only for
/// `handshake_timeout_ms`: then the node closes it with a reason, and keeps serving.
#[test]
fn a_peer_that_never_says_hello_is_closed_at_the_handshake_timeout() -> Result<()> {
    let limits = tern::Limits {
        handshake_timeout_ms: 1_000,
        ..tern::Limits::default()
    };
    let c = crate::common::connected_with(&["a", "b"], limits)?;
    let (a, b) = (c.node("a"), c.node("b"));
    let before = a.stats().connections_refused;
    let id = c.ca.issue("mute")?;
    let closed = block_on(async {
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(tern::tls::client_config(&id)?);
        let conn = endpoint.connect(a.local_addr(), "a")?.await?;
        // No stream, no hello: the node gives up on its own.
        let why = tokio::time::timeout(SECS_10, conn.closed()).await;
        endpoint.close(0u32.into(), b"done");
        anyhow::Ok(why.is_ok())
    })?;
    assert!(closed, "the node closes the connection");
    let detail = refusal_on(a, before)?;
    assert!(detail.contains("no hello in time"), "{detail}");
    assert!(!a.is_connected("mute"));
    // The node still serves its peers.
    let sink = a.spawn(SeqSink::default())?;
    let from_b = b.resolve::<SeqSink>(sink.addr())?;
    block_on(async {
        from_b
            .tell_wait(SinkMsg::Record {
                sender: "b".into(),
                seq: 1,
            })
            .await?;
        let r = from_b.ask(SinkMsg::Report, SECS_10).await?;
        assert!(r
            .verdict(&BTreeMap::from([("b".to_string(), 1)]))
            .is_clean());
        anyhow::Ok(())
    })?;
    c.shutdown();
    Ok(())
}
