//! The node as the transport's host: `transport::Host` for `NodeShared`. It sits above both,
//! so that the transport names nothing of the node (its limits, counters, links, the frames'
//! handling, the admin connection) and the node layer nothing of the admin connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::events::Logs;
use crate::limits::Limits;
use crate::node::NodeShared;
use crate::stats::Stats;
use crate::transport::{Host, Links, PeerLink, StreamKind, StreamSink};
use tern_proto::ids::NodeName;
use tern_proto::wire::Frame;

/// Book edges per `BookSync` frame.
const BOOK_SYNC_EDGES_PER_FRAME: usize = 1024;

impl Host for NodeShared {
    fn name(&self) -> &NodeName {
        NodeShared::name(self)
    }

    fn limits(&self) -> &Limits {
        &self.limits
    }

    fn stats(&self) -> &Stats {
        &self.stats
    }

    fn logs(&self) -> &Logs {
        &self.logs
    }

    fn links(&self) -> &Links {
        &self.links
    }

    fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    fn dial_config(&self) -> quinn::ClientConfig {
        self.trust.client_config()
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    fn capabilities(&self) -> Vec<String> {
        NodeShared::capabilities(self)
    }

    /// The migration driver learns the peer, and the peer gets every book edge held here.
    fn link_up(&self, link: &PeerLink) {
        self.driver.add_peer(link.name.clone());
        self.replicas_link_up(link);
        // A peer that was away when the CA revoked a certificate learns it here.
        if let Some(list) = self.trust.revocations() {
            if let Err(e) = link.push_ctrl(&Frame::Revocations { crl: list.der() }) {
                self.logs
                    .event("revocations-unsent", format!("to {}: {e}", link.name));
            }
        }
        for chunk in self
            .books
            .edges_held_on(NodeShared::name(self))
            .chunks(BOOK_SYNC_EDGES_PER_FRAME)
        {
            if let Err(e) = link.push_ctrl(&Frame::BookSync {
                edges: chunk.to_vec(),
            }) {
                self.logs
                    .event("book-sync-lost", format!("to {}: {e}", link.name));
            }
        }
    }

    /// Membership, the migration driver, the delivery ledgers and the pending asks learn
    /// that `peer` is gone.
    fn link_down(self: &Arc<Self>, peer: &NodeName, left: bool) {
        self.member_down(peer, left);
        self.driver.link_lost(self, peer);
        self.speakers_link_lost(peer);
        self.replicas_link_lost(peer);
        // Channels pointing at it follow gossip first, so that the gaps the ledgers send go
        // where the services are.
        self.follow_gossip_away_from(peer);
        self.declare_lost(peer);
        // An ask to a replicated service whose standby may take it over keeps waiting: its
        // request is among the copies sent again, and the new copy answers.
        let failed = self.asks.fail_lost(peer, |id| {
            self.standby_named(id, peer)
                .map(|(standby, _)| standby)
                .or_else(|| self.driver.location(id).map(|(at, _)| at))
        });
        if failed > 0 {
            self.logs.event(
                "asks-failed",
                format!("{failed} pending asks: {peer} was lost"),
            );
        }
    }

    fn open_stream(
        self: &Arc<Self>,
        link: &Arc<PeerLink>,
        kind: StreamKind,
    ) -> Box<dyn StreamSink> {
        crate::inbound::open_stream(self, link, kind)
    }

    fn serve_admin(
        self: Arc<Self>,
        conn: quinn::Connection,
        name: NodeName,
        role: crate::certs::Role,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        Box::pin(crate::admin::serve(self, conn, name, role))
    }
}
