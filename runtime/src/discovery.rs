//! Discovery on a home network: once [`NodeHandle::start_discovery`] is called (or
//! `discovery = true` in a node file), a node announces itself by mDNS/DNS-SD (service type [`SERVICE_TYPE`], its name as the
//! instance, its QUIC port, and in a TXT record the fingerprint of its cluster CA) and browses
//! for the others; each node it finds becomes a peer it dials, by the name announced.
//!
//! An announcement is a hint, never trusted: the connection it leads to is authenticated by
//! mutual TLS as any other (the certificate must come from the cluster CA and name the node
//! announced, so a device announcing another's name is refused at the handshake).
//! Announcements of another cluster (another CA fingerprint) are ignored, as are names no
//! certificate can carry, and an announcement never re-addresses a peer that is connected
//! (a liar could otherwise point a working link at itself). The peer table's bound
//! (`Limits::peers_max`) holds as for any peer. The mDNS daemon (`mdns-sd`) runs on a thread of
//! its own; a node's events say what was found (`discovered`) and ignored
//! (`discovery-ignored`).

use std::net::{IpAddr, SocketAddr};

use tern_proto::ids::NodeName;

use crate::error::Error;
use crate::node::NodeHandle;

/// The DNS-SD service type Tern nodes announce.
pub const SERVICE_TYPE: &str = "_tern._udp.local.";
/// The TXT key of the cluster CA's fingerprint.
const CA_KEY: &str = "ca";

/// The fingerprint of a cluster CA certificate: SHA-256 of its DER, in hex (the first 16
/// bytes, which is enough to tell clusters apart; it is public, like the certificate).
pub fn ca_fingerprint(ca_der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, ca_der);
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How often the discovery thread looks whether its node stopped (ms).
const STOP_CHECK_MS: u64 = 250;

/// Discovery.
impl NodeHandle {
    /// Announces this node by mDNS/DNS-SD and dials every node of its cluster found the same
    /// way, until the node stops (see the module [`discovery`](crate::discovery)): devices on
    /// one network find each other with no address given, then authenticate by mutual TLS
    /// as any peer. A node file turns it on with `discovery = true`.
    ///
    /// ```no_run
    /// use tern::{certs::ClusterCa, Node, NodeConfig};
    /// let ca = ClusterCa::new()?;
    /// let tv = Node::start(NodeConfig::new(ca.issue("tv")?, "0.0.0.0:7102".parse().unwrap()))?;
    /// tv.start_discovery()?;
    /// // ... the phone, started the same way on the same network, becomes a peer.
    /// # Ok::<(), tern::Error>(())
    /// ```
    pub fn start_discovery(&self) -> Result<(), Error> {
        start(self)
    }
}

/// Starts announcing `node` and browsing for the others; the work ends when the node stops.
fn start(node: &NodeHandle) -> Result<(), Error> {
    let failed = |what: &str, e: mdns_sd::Error| Error::Discovery(format!("{what}: {e}"));
    let daemon = mdns_sd::ServiceDaemon::new().map_err(|e| failed("starting mDNS", e))?;
    let name = node.name().to_string();
    let fingerprint = ca_fingerprint(&node.identity().ca_der);
    let listen = node.local_addr();
    let host = format!("{name}.tern.local.");
    let props = [(CA_KEY, fingerprint.as_str())];
    let info = if listen.ip().is_unspecified() {
        mdns_sd::ServiceInfo::new(SERVICE_TYPE, &name, &host, "", listen.port(), &props[..])
            .map(|i| i.enable_addr_auto())
    } else {
        mdns_sd::ServiceInfo::new(
            SERVICE_TYPE,
            &name,
            &host,
            listen.ip(),
            listen.port(),
            &props[..],
        )
    }
    .map_err(|e| failed("describing this node", e))?;
    daemon
        .register(info)
        .map_err(|e| failed("announcing this node", e))?;
    let events = daemon
        .browse(SERVICE_TYPE)
        .map_err(|e| failed("browsing", e))?;
    // The thread holds the node weakly: a stopped node is not kept alive by its discovery.
    let shared = std::sync::Arc::downgrade(&node.shared);
    let me = node.name().clone();
    crate::trace::spawn(format!("tern-{name}-discovery"), move || {
        let wait = std::time::Duration::from_millis(STOP_CHECK_MS);
        loop {
            let Some(node) = shared.upgrade() else { break };
            if node.stopping.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            match events.recv_timeout(wait) {
                Ok(mdns_sd::ServiceEvent::ServiceResolved(found)) => {
                    heard(&node, &me, &fingerprint, &found)
                }
                Err(_) if events.is_disconnected() => break,
                Ok(_) | Err(_) => {}
            }
        }
        if let Err(e) = daemon.shutdown() {
            tracing::debug!(error = %e, "discovery: the mDNS daemon was already stopping");
        }
    })
    .map_err(|e| Error::io("starting the discovery thread", e))?;
    tracing::info!(node = %name, %listen, "discovery: announcing and browsing by mDNS");
    Ok(())
}

/// One resolved announcement.
fn heard(
    node: &std::sync::Arc<crate::node::NodeShared>,
    me: &NodeName,
    fingerprint: &str,
    found: &mdns_sd::ServiceInfo,
) {
    let full = found.get_fullname();
    let Some(name) = full.strip_suffix(&format!(".{SERVICE_TYPE}")) else {
        return;
    };
    if name == me.as_str() {
        return;
    }
    let ignore = |why: String| {
        node.logs
            .event("discovery-ignored", format!("{name:?}: {why}"));
    };
    if found.get_property_val_str(CA_KEY) != Some(fingerprint) {
        return ignore("another cluster (its CA is not this node's)".into());
    }
    if let Err(e) = crate::certs::check_node_name(name) {
        return ignore(format!("not a node name: {e}"));
    }
    let peer = NodeName::new(name);
    if node.links.get(&peer).is_some_and(|l| l.is_connected()) {
        // Connected already, and authenticated: an announcement never re-addresses it.
        return;
    }
    // IPv4 first (a link-local IPv6 address needs its interface, which the record lacks).
    let mut addrs: Vec<IpAddr> = found.get_addresses().iter().copied().collect();
    addrs.sort_by_key(|a| (a.is_ipv6(), *a));
    let Some(ip) = addrs.first() else {
        return ignore("no address announced".into());
    };
    let addr = SocketAddr::new(*ip, found.get_port());
    // Made as a peer only heard of: the first to give its place to a configured or
    // connecting one when the table is full, and forgotten if it never connects.
    match node.links.insert_heard(&peer, addr, &node.limits) {
        Ok(_) => node.logs.event(
            "discovered",
            format!("{name} at {addr}, by mDNS; dialing it"),
        ),
        Err(e) => ignore(format!("at {addr}: {e}")),
    }
}
