//! Discovery by mDNS across two network namespaces joined by a veth pair the test makes (as
//! two devices on one home network): the nodes find each other with no address given,
//! authenticate as any peers, and a service moves between them; another cluster's node is
//! ignored, and an announcement that lies about a connected peer's address changes nothing.
//! Needs root (or CAP_NET_ADMIN) and `ip`; on a machine without them the test says so and
//! passes, unless `TERN_REQUIRE_NETNS` is set (CI sets it).

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use tern::certs::ClusterCa;
use tern::{MigrateOptions, Node, NodeConfig, NodeHandle};
use tern_harness::{block_on, wait_for};

use crate::common::{Slow, SlowMsg, SECS_10};

/// Two namespaces and the veth pair between them; removed on drop.
struct Netns {
    names: [String; 2],
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.names {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Namespaces `a` and `b` with 10.77.0.1/24 and 10.77.0.2/24 on the two ends of a veth pair.
fn make_netns() -> Result<Netns> {
    let id = std::process::id() % 100_000;
    let names = [format!("tern{id}a"), format!("tern{id}b")];
    ip(&["netns", "add", &names[0]])?;
    let ns = Netns {
        names: names.clone(),
    };
    ip(&["netns", "add", &names[1]])?;
    let (va, vb) = (format!("tv{id}a"), format!("tv{id}b"));
    ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
    for (n, (veth, addr)) in [(&va, "10.77.0.1/24"), (&vb, "10.77.0.2/24")]
        .into_iter()
        .enumerate()
    {
        ip(&["link", "set", veth, "netns", &names[n]])?;
        ip(&["-n", &names[n], "addr", "add", addr, "dev", veth])?;
        ip(&["-n", &names[n], "link", "set", veth, "up"])?;
        ip(&["-n", &names[n], "link", "set", "lo", "up"])?;
    }
    Ok(ns)
}

/// Runs `f` on a thread inside namespace `ns`: the threads it starts (a node's, its mDNS
/// daemon's) are in it too, and so are their sockets.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns(2) on this thread with a namespace file we hold open.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the namespace thread panicked"))?
}

fn node_in(ns: &str, ca: &ClusterCa, name: &str, ip: &str) -> Result<NodeHandle> {
    let identity = ca.issue(name)?;
    let listen = format!("{ip}:0").parse()?;
    in_netns(ns, move || {
        let node = Node::start(NodeConfig::new(identity, listen))?;
        node.register::<Slow>();
        node.start_discovery()?;
        Ok(node)
    })
}

#[test]
fn nodes_in_two_namespaces_find_each_other_by_mdns_and_work_together() -> Result<()> {
    let ns = match make_netns() {
        Ok(ns) => ns,
        Err(e) if std::env::var_os("TERN_REQUIRE_NETNS").is_none() => {
            eprintln!(
                "discovery test not run: this machine cannot make network namespaces and a \
                 veth pair (it needs root or CAP_NET_ADMIN, and `ip`): {e:#}"
            );
            return Ok(());
        }
        Err(e) => return Err(e.context("TERN_REQUIRE_NETNS is set")),
    };
    let ca = ClusterCa::new()?;
    let a = node_in(&ns.names[0], &ca, "a", "10.77.0.1")?;
    let b = node_in(&ns.names[1], &ca, "b", "10.77.0.2")?;
    // A node of another cluster on b's side announces too: a never dials it.
    let stranger = node_in(&ns.names[1], &ClusterCa::new()?, "c", "10.77.0.2")?;
    wait_for(
        Duration::from_secs(30),
        "a and b to find each other",
        || a.is_connected("b") && b.is_connected("a"),
    )?;
    // Whichever heard the other first dialed it (the other then finds it connected and
    // dials nothing): at least one of them says whom it found, at the address announced.
    let (a_events, b_events) = (a.events(), b.events());
    let found = |events: &[tern::NodeEvent], detail: &str| {
        events
            .iter()
            .any(|e| e.kind == "discovered" && e.detail.starts_with(detail))
    };
    assert!(
        found(&a_events, "b at 10.77.0.2:") || found(&b_events, "a at 10.77.0.1:"),
        "a: {a_events:?}\nb: {b_events:?}"
    );
    wait_for(SECS_10, "a to ignore the stranger", || {
        a.events()
            .iter()
            .any(|e| e.kind == "discovery-ignored" && e.detail.contains("another cluster"))
    })?;
    assert!(a.peers().iter().all(|p| p.name.as_str() != "c"));

    // A liar on b's side announces "ghost", with the cluster's fingerprint, at b's own
    // address: a dials it expecting a certificate named ghost, b's says b, and the handshake
    // refuses it. Nothing from the announcement is trusted; a and b carry on.
    let b_addr = b.local_addr();
    let fingerprint = tern::discovery::ca_fingerprint(&ca.issue("x")?.ca_der);
    let liar = in_netns(&ns.names[1], move || {
        announce("ghost", b_addr, &fingerprint)
    })?;
    wait_for(Duration::from_secs(30), "a to dial the ghost", || {
        let dialing = format!("ghost at {b_addr}, by mDNS; dialing it");
        a.events()
            .iter()
            .any(|e| e.kind == "discovered" && e.detail == dialing)
    })?;
    // b's certificate does not carry the name a dialed: the handshake fails (b sees a, from
    // a's address, abort it), and a never counts the ghost as connected. A link made from an announcement that
    // never connects is forgotten, so it may be gone from a's table by now.
    wait_for(
        Duration::from_secs(30),
        "the ghost refused at the handshake",
        || {
            b.events().iter().any(|e| {
                e.kind == "connection-refused"
                    && e.detail.starts_with("from 10.77.0.1:")
                    && e.detail.contains("not valid for name \"ghost\"")
            })
        },
    )?;
    assert!(!a.is_connected("ghost"));
    assert!(a.is_connected("b"));

    // They work together: a service moves from a to b, and answers there.
    let slow = a.spawn(Slow::default())?;
    block_on(async {
        for i in 1..=50 {
            slow.tell(SlowMsg::Item(i))?;
        }
        let report = a.migrate(slow.id(), "b", MigrateOptions::default()).await?;
        assert!(report.committed(), "{report:?}");
        for i in 51..=60 {
            slow.tell_wait(SlowMsg::Item(i)).await?;
        }
        assert_eq!(
            slow.ask(SlowMsg::Items, SECS_10).await?,
            (1..=60).collect::<Vec<_>>()
        );
        anyhow::Ok(())
    })?;
    assert!(b.services().iter().any(|s| s.addr.id == slow.id()));
    let _ = liar.shutdown();
    drop(slow);
    for n in [a, b, stranger] {
        n.shutdown();
    }
    drop(ns);
    Ok(())
}

/// An mDNS announcement of `name` at `addr` with `fingerprint`, as a node's would be: a
/// liar on the network. Announced until the daemon is dropped.
fn announce(
    name: &str,
    addr: std::net::SocketAddr,
    fingerprint: &str,
) -> Result<mdns_sd::ServiceDaemon> {
    let daemon = mdns_sd::ServiceDaemon::new()?;
    let info = mdns_sd::ServiceInfo::new(
        tern::discovery::SERVICE_TYPE,
        name,
        &format!("{name}.tern.local."),
        addr.ip(),
        addr.port(),
        &[("ca", fingerprint)][..],
    )?;
    daemon.register(info)?;
    Ok(daemon)
}
