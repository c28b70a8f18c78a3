//! Revocation and certificate rotation: a lost device is cut off within seconds and stays
//! out, a forged or stale list changes nothing, and a node replaces its certificate while it
//! runs.

use std::time::{Duration, Instant};

use anyhow::Result;
use tern::admin::{AdminClient, AdminReply, AdminRequest};
use tern::certs::Role;
use tern::trust::Installed;
use tern_harness::rogue::Rogue;
use tern_harness::{block_on, wait_for, Cluster};
use tern_proto::wire::Frame;

use crate::common::{register_test_kinds, takes_in_order, Slow, SlowMsg, SECS_10};

/// Nodes `names` with the test kinds, every pair connected, letting admin `ops` in.
fn cluster(names: &[&str]) -> Result<Cluster> {
    let c = names
        .iter()
        .fold(Cluster::builder(), |b, n| b.node(n, &[]))
        .admins(&["ops"])
        .setup(register_test_kinds)
        .start()?;
    c.wait_connected(SECS_10)?;
    Ok(c)
}

/// The certificate a node presents to a new connection, read by dialing it.
fn presented_serial(c: &Cluster, to: &str) -> Result<Vec<u8>> {
    block_on(async {
        let rogue = Rogue::connect(c, "probe", to).await?;
        let der = rogue
            .conn
            .peer_identity()
            .and_then(|i| {
                i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|certs| certs.first().map(|c| c.to_vec()))
            .ok_or_else(|| anyhow::anyhow!("{to} presented no certificate"))?;
        rogue.close().await;
        Ok(tern::certs::serial_of(&der)?)
    })
}

/// A device's certificate is revoked through one node by an admin: every node holds the list
/// within seconds and disconnects the device, whose services' senders get loss reports; the
/// device cannot connect again with that certificate; the others keep working; and the real
/// device, given a new certificate, joins again.
#[test]
fn a_revoked_device_is_cut_off_within_seconds_and_cannot_rejoin() -> Result<()> {
    let mut c = cluster(&["a", "b", "c"])?;
    let (a, b) = (c.node("a").clone(), c.node("b").clone());
    let lost = c.node("c").identity();
    // A service on the device, busy, with messages from a waiting for it.
    let on_c = c.node("c").spawn(Slow::default())?;
    let from_a = a.resolve::<Slow>(on_c.addr())?;
    from_a.tell(SlowMsg::Hold { ms: 30_000 })?;
    for i in 1..=5 {
        from_a.tell(SlowMsg::Item(i))?;
    }
    wait_for(SECS_10, "the messages to reach c", || {
        c.node("c").services().iter().any(|s| s.mailbox_depth >= 5)
    })?;
    drop(on_c);

    let crl = c.ca.revocation_list(&[lost.serial()?], 1)?;
    let ops = c.ca.issue_role("ops", Role::Admin)?;
    let started = Instant::now();
    let reply = block_on(async {
        let admin = AdminClient::connect_to(a.local_addr(), &ops, a.name()).await?;
        let r = admin.request(&AdminRequest::Revoke { crl }, |_| {}).await?;
        admin.close().await;
        Ok::<_, anyhow::Error>(r)
    })?;
    assert_eq!(
        reply,
        AdminReply::Revocations {
            number: 1,
            revoked: 1,
            newer: true
        }
    );
    wait_for(SECS_10, "every node to drop c", || {
        !a.is_connected("c") && !b.is_connected("c")
    })?;
    let cut_off = started.elapsed();
    eprintln!(
        "c cut off everywhere {} ms after the revocation",
        cut_off.as_millis()
    );
    // b had the list from a, not from anyone's hand.
    assert_eq!(b.revocations().map(|r| r.number()), Some(1));
    assert!(b
        .events()
        .iter()
        .any(|e| e.kind == "revocations" && e.detail.contains("from a")));
    // The senders to c's service hear that their messages may be lost.
    wait_for(SECS_10, "loss reports for c's service", || {
        let reported: u64 = a
            .losses()
            .iter()
            .filter(|l| l.node.as_str() == "c")
            .map(|l| l.messages)
            .sum();
        reported >= 5
    })?;

    // c tries again with the revoked certificate: refused at the handshake, every time.
    let refused_before = a.stats().connections_refused;
    c.node("c").add_peer("a", a.local_addr())?;
    let waited = wait_for(SECS_10, "a to refuse c's certificate", || {
        a.stats().connections_refused > refused_before
    });
    if waited.is_err() {
        eprintln!("a: {:#?}\nc: {:#?}", a.events(), c.node("c").events());
    }
    waited?;
    assert!(!a.is_connected("c") && !c.node("c").is_connected("a"));

    // The rest of the cluster keeps working.
    let on_b = b.spawn(Slow::default())?;
    let to_b = a.resolve::<Slow>(on_b.addr())?;
    takes_in_order(&to_b, 1, &[1])?;

    // The real device, with a new certificate, joins again and learns the list.
    c.restart_with_new_certificate("c")?;
    wait_for(SECS_10, "the new c to join", || {
        a.is_connected("c") && b.is_connected("c")
    })?;
    let c_new = c.node("c").clone();
    wait_for(SECS_10, "the new c to learn the list", || {
        c_new.revocations().map(|r| r.number()) == Some(1)
    })?;
    let on_new_c = c_new.spawn(Slow::default())?;
    let to_new_c = a.resolve::<Slow>(on_new_c.addr())?;
    takes_in_order(&to_new_c, 7, &[7])?;
    c.shutdown();
    Ok(())
}

/// A list another CA signed, bytes that are no list, and an older list change nothing: the
/// forgeries are refused as claims, the stale one ignored, and traffic goes on.
#[test]
fn a_forged_or_stale_revocation_list_changes_nothing() -> Result<()> {
    let c = cluster(&["a", "b"])?;
    let (a, b) = (c.node("a"), c.node("b"));
    let b_serial = b.identity().serial()?;
    assert_eq!(
        a.install_revocations(&c.ca.revocation_list(&[], 5)?)?,
        Installed::Newer
    );
    let other = tern::certs::ClusterCa::new()?;
    let forged = other.revocation_list(std::slice::from_ref(&b_serial), 99)?;
    let stale = c.ca.revocation_list(std::slice::from_ref(&b_serial), 4)?;
    let on_b = b.spawn(Slow::default())?;
    let to_b = a.resolve::<Slow>(on_b.addr())?;
    takes_in_order(&to_b, 1, &[1])?;
    block_on(async {
        let mut rogue = Rogue::connect(&c, "mallory", "a").await?;
        for crl in [&forged[..], b"not a list", &stale[..]] {
            rogue.send_ctrl(&Frame::Revocations { crl }).await?;
        }
        rogue.barrier().await?;
        rogue.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    // Two refusals (the forgery and the junk); the stale list is simply not newer.
    let refused: Vec<String> = a
        .events()
        .into_iter()
        .filter(|e| e.kind == "claim-refused" && e.detail.contains("mallory"))
        .map(|e| e.detail)
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused[0].contains("is not the cluster CA's"),
        "{refused:?}"
    );
    assert!(refused[1].contains("unreadable"), "{refused:?}");
    assert_eq!(a.revocations().map(|r| r.number()), Some(5));
    assert!(a.revocations().is_some_and(|r| !r.revokes(&b_serial)));
    // By hand, the same: the forgery is an error, the stale list is not newer.
    assert!(a.install_revocations(&forged).is_err());
    assert_eq!(a.install_revocations(&stale)?, Installed::NotNewer);
    assert!(a.is_connected("b"));
    takes_in_order(&to_b, 2, &[1, 2])?;
    c.shutdown();
    Ok(())
}

/// A node replaces its certificate while it runs: new connections get the new one, and once
/// the old one is revoked the node is disconnected only to come back with the new one. A
/// certificate for another name, role or CA is refused.
#[test]
fn a_node_replaces_its_certificate_without_restarting() -> Result<()> {
    let c = cluster(&["a", "b"])?;
    let (a, b) = (c.node("a"), c.node("b"));
    let old = a.identity();
    let renewed = c.ca.issue_for_days("a", 30)?;
    for wrong in [
        c.ca.issue("z")?,
        c.ca.issue_role("a", Role::Admin)?,
        tern::certs::ClusterCa::new()?.issue("a")?,
    ] {
        assert!(a.reload_identity(wrong).is_err());
    }
    assert_eq!(presented_serial(&c, "a")?, old.serial()?);
    a.reload_identity(renewed.clone())?;
    assert_eq!(presented_serial(&c, "a")?, renewed.serial()?);
    assert_eq!(a.identity().serial()?, renewed.serial()?);

    // The connection a made with the old certificate goes when it is revoked; a comes back
    // with the new one at once.
    b.install_revocations(&c.ca.revocation_list(&[old.serial()?], 1)?)?;
    let on_b = b.spawn(Slow::default())?;
    wait_for(
        Duration::from_secs(15),
        "a to be back with its new certificate",
        || a.is_connected("b") && b.is_connected("a") && a.revocations().is_some(),
    )?;
    let to_b = a.resolve::<Slow>(on_b.addr())?;
    takes_in_order(&to_b, 1, &[1])?;
    assert!(b
        .events()
        .iter()
        .any(|e| e.kind == "peer-revoked" && e.detail.starts_with("a:")));
    c.shutdown();
    Ok(())
}
