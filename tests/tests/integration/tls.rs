//! Only holders of a certificate from the cluster CA get in, and a refusal is visible.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use tern::certs::{ClusterCa, NodeIdentity};
use tern::{Node, NodeConfig};
use tern_actors::{SeqSink, SinkMsg};
use tern_harness::{block_on, wait_for, Cluster};

use crate::common::{register_test_kinds, SECS_10};

#[test]
fn a_node_with_a_certificate_from_another_ca_cannot_connect() -> Result<()> {
    let c = Cluster::start(&["a"], register_test_kinds)?;
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

    wait_for(SECS_10, "a to refuse mallory", || {
        a.stats().connections_refused >= 1
    })?;
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
    let c = Cluster::start(&["a"], register_test_kinds)?;
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
    let c = Cluster::start(&["a", "b", "c", "d"], register_test_kinds)?;
    c.wait_connected(SECS_10)?;
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
