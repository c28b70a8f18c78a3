//! A node's figures as OpenMetrics text (what Prometheus scrapes), and the endpoint that
//! serves them.
//!
//! The text is made on each scrape from one [`NodeFigures`], the same figures `tern top` and
//! the demo's dashboard read: [`NodeHandle::stats`], [`NodeHandle::migration_stats`],
//! [`NodeHandle::services`], [`NodeHandle::peers`] and [`NodeHandle::traffic`]. The exposition format is written by the
//! Prometheus project's own client (`prometheus-client`); this module only says which figure is
//! which metric. Every series carries the label `node`.
//!
//! The endpoint ([`NodeHandle::serve_metrics`]) is plain HTTP on the address it is given: it
//! answers `GET /metrics` and nothing else, reads at most [`REQUEST_BYTES_MAX`] of a request,
//! serves at most [`SCRAPES_MAX`] scrapes at a time and drops a client that has not sent its
//! request within [`REQUEST_TIMEOUT_MS`]. It exposes figures, not control: anyone who can
//! reach the address can read them, so bind it where only the scraper reaches (loopback, a
//! management network).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use serde::{Deserialize, Serialize};
use tern_proto::ids::NodeName;
use tern_proto::traffic::EdgeRate;

use crate::error::Error;
use crate::migrate::MigrationStats;
use crate::node::{NodeHandle, NodeShared, ServiceInfo};
use crate::stats::NodeStats;
use crate::transport::PeerStatus;

/// The most bytes of a request the endpoint reads before it answers `431`.
pub const REQUEST_BYTES_MAX: usize = 8 << 10;
/// Scrapes served at once; a connection beyond them is closed at once.
pub const SCRAPES_MAX: usize = 8;
/// How long a client has to send its whole request (ms).
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A node's figures, read at once: what one scrape exports, what `tern top` and the demo's
/// dashboard show ([`NodeHandle::figures`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeFigures {
    /// The node.
    pub node: NodeName,
    /// Its counters and gauges.
    pub stats: NodeStats,
    /// Its migrations: counts, aborts by reason, the freeze histogram.
    pub migrations: MigrationStats,
    /// Its services.
    pub services: Vec<ServiceInfo>,
    /// Its peers and their links.
    pub peers: Vec<PeerStatus>,
    /// The channels touching its services, busiest first, with their smoothed rates.
    pub channels: Vec<EdgeRate>,
    /// The node's clock when it read these figures (ms since the Unix epoch): `tern doctor`
    /// compares it with its own.
    #[serde(default)]
    pub clock_unix_ms: u64,
    /// When the node's certificate stops being valid (s since the Unix epoch).
    #[serde(default)]
    pub certificate_not_after_unix: Option<i64>,
}

impl NodeFigures {
    /// Reads `node`'s figures.
    pub(crate) fn of(node: &NodeShared) -> Self {
        NodeFigures {
            node: node.name().clone(),
            stats: node.snapshot_stats(),
            migrations: node.driver.stats(),
            services: node.service_infos(),
            peers: node.links.all().iter().map(|l| l.status()).collect(),
            channels: node.traffic(),
            clock_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            certificate_not_after_unix: crate::certs::validity_of(&node.trust.identity().cert_der)
                .ok()
                .map(|(_, not_after)| not_after),
        }
    }

    /// The figures as OpenMetrics text (what [`NodeHandle::metrics`] returns).
    pub fn to_openmetrics(&self) -> String {
        let mut registry = Registry::with_prefix_and_labels(
            "tern",
            [(Cow::Borrowed("node"), Cow::Owned(self.node.to_string()))].into_iter(),
        );
        registry.register_collector(Box::new(self.clone()));
        let mut text = String::new();
        // Writing into a String cannot fail; a metric that could not be encoded would be a
        // bug in this module, reported in the text rather than by a panic.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
            tracing::error!(error = %e, "metrics: the exposition could not be encoded");
            text = format!("# the exposition could not be encoded: {e}\n# EOF\n");
        }
        text
    }
}

/// A doc comment as one line of help text.
fn help(doc: &str) -> String {
    doc.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let m = e.encode_descriptor(name, help, unit, g.metric_type())?;
    g.encode(m)
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(value);
    let m = e.encode_descriptor(name, help, None, c.metric_type())?;
    c.encode(m)
}

/// One metric with a series per item, each with its labels.
fn family<T, L: prometheus_client::encoding::EncodeLabelSet>(
    e: &mut DescriptorEncoder,
    (name, help, unit, kind): (&str, &str, Option<&Unit>, MetricType),
    items: &[T],
    series: impl Fn(&T) -> Option<(L, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, unit, kind)?;
    for item in items {
        let Some((labels, value)) = series(item) else {
            continue;
        };
        let fam = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(value).encode(fam)?,
            _ => ConstGauge::new(value).encode(fam)?,
        }
    }
    Ok(())
}

impl Collector for NodeFigures {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        for (name, doc, value) in s.counters() {
            counter(&mut e, name, &help(doc), value)?;
        }
        for (name, doc, value) in [
            (
                "services_live",
                "Services running on the node.",
                s.services_live,
            ),
            (
                "services_asleep",
                "Of those, the services asleep.",
                s.services_asleep,
            ),
            (
                "peers_connected",
                "Peers with an established connection.",
                s.peers_connected,
            ),
            ("book_edges", "Book edges known cluster-wide.", s.book_edges),
            (
                "asks_pending",
                "Asks waiting for a reply on this node.",
                s.asks_pending,
            ),
        ] {
            gauge(&mut e, name, doc, None, value as f64)?;
        }
        self.encode_migrations(&mut e)?;
        self.encode_services(&mut e)?;
        self.encode_channels(&mut e)?;
        self.encode_peers(&mut e)
    }
}

impl NodeFigures {
    fn encode_migrations(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.migrations;
        for (name, doc, value) in [
            (
                "migrations_started",
                "Migrations asked of this node as a source.",
                m.started,
            ),
            ("migrations_committed", "Of those, committed.", m.committed),
            (
                "migrations_arrived",
                "Services that arrived here and started.",
                m.arrived,
            ),
            (
                "tombstone_forwards",
                "Messages forwarded by tombstones on this node.",
                m.tombstone_forwards,
            ),
            (
                "channels_rebuilt",
                "Address-book entries rewritten on this node by channel rebuilds.",
                m.rebuilt,
            ),
        ] {
            counter(e, name, doc, value)?;
        }
        gauge(
            e,
            "tombstones",
            "Tombstones kept.",
            None,
            m.tombstones as f64,
        )?;
        gauge(
            e,
            "migrations_in_flight",
            "Migrations from this node not yet ended.",
            None,
            m.in_flight.len() as f64,
        )?;
        let aborted: Vec<_> = m.aborted.iter().collect();
        family(
            e,
            (
                "migrations_aborted",
                "Migrations from this node aborted, by reason.",
                None,
                MetricType::Counter,
            ),
            &aborted,
            |(reason, n)| Some(([("reason", reason.as_str())], **n as f64)),
        )?;
        let refused: Vec<_> = m.refused_in.iter().collect();
        family(
            e,
            (
                "snapshots_refused",
                "Snapshots this node refused as a target, by reason.",
                None,
                MetricType::Counter,
            ),
            &refused,
            |(reason, n)| Some(([("reason", reason.as_str())], **n as f64)),
        )?;
        // The buckets of `freeze_us_histogram` are each counted alone; the encoder adds them
        // up into the cumulative `le` buckets, and the last, `+Inf`, takes what is left.
        let buckets: Vec<(f64, u64)> = m
            .freeze_us_histogram
            .iter()
            .map(|&(le_us, n)| match le_us {
                u64::MAX => (f64::MAX, n),
                le_us => (le_us as f64 / 1e6, n),
            })
            .chain(
                m.freeze_us_histogram
                    .last()
                    .filter(|(le_us, _)| *le_us != u64::MAX)
                    .map(|_| (f64::MAX, 0)),
            )
            .collect();
        let buckets = if buckets.is_empty() {
            vec![(f64::MAX, 0)]
        } else {
            buckets
        };
        let mut h = e.encode_descriptor(
            "migration_freeze",
            "Freeze times of the migrations this node committed as their source.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        h.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            m.freeze_us_sum as f64 / 1e6,
            m.committed,
            &buckets,
            None,
        )
    }

    fn encode_services(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = |i: &ServiceInfo| {
            [
                ("service", Cow::Owned(i.addr.id.to_string())),
                ("kind", Cow::Owned(i.addr.kind.to_string())),
            ]
        };
        family(
            e,
            (
                "service_mailbox_depth",
                "Messages queued for a service.",
                None,
                MetricType::Gauge,
            ),
            &self.services,
            |i| Some((labels(i), i.mailbox_depth as f64)),
        )?;
        family(
            e,
            (
                "service_mailbox_capacity",
                "A service's mailbox bound.",
                None,
                MetricType::Gauge,
            ),
            &self.services,
            |i| Some((labels(i), i.mailbox_capacity as f64)),
        )?;
        family(
            e,
            (
                "service_epoch",
                "How many times a service has migrated.",
                None,
                MetricType::Gauge,
            ),
            &self.services,
            |i| Some((labels(i), i.epoch as f64)),
        )
    }

    fn encode_channels(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let labels = |c: &EdgeRate| [("from", c.from.to_string()), ("to", c.to.to_string())];
        family(
            e,
            (
                "channel_messages_per_second",
                "Messages per second on a channel touching this node's services, smoothed over \
                 the last few seconds.",
                None,
                MetricType::Gauge,
            ),
            &self.channels,
            |c| Some((labels(c), c.msgs_per_s)),
        )?;
        family(
            e,
            (
                "channel_messages",
                "Messages counted on a channel since this node began to track it.",
                None,
                MetricType::Counter,
            ),
            &self.channels,
            |c| Some((labels(c), c.total_msgs as f64)),
        )
    }

    fn encode_peers(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let peer = |p: &PeerStatus| [("peer", p.name.to_string())];
        let link = |p: &PeerStatus| p.link.map(|l| (peer(p), l));
        family(
            e,
            (
                "peer_connected",
                "1 while a connection to the peer is up.",
                None,
                MetricType::Gauge,
            ),
            &self.peers,
            |p| Some((peer(p), if p.connected { 1.0 } else { 0.0 })),
        )?;
        family(
            e,
            (
                "peer_queued",
                "Bytes of frames queued for the peer, not yet written to its connection.",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            ),
            &self.peers,
            |p| Some((peer(p), p.queued_bytes as f64)),
        )?;
        family(
            e,
            (
                "peer_rtt",
                "Smoothed round-trip time of the connection to the peer.",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            ),
            &self.peers,
            |p| link(p).map(|(l, f)| (l, f.rtt_us as f64 / 1e6)),
        )?;
        family(
            e,
            (
                "peer_congestion_window",
                "Congestion window of the connection to the peer.",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            ),
            &self.peers,
            |p| link(p).map(|(l, f)| (l, f.cwnd_bytes as f64)),
        )?;
        for (name, doc, pick) in [
            (
                "peer_sent_bytes",
                "UDP payload bytes sent on the current connection to the peer.",
                (|f| f.sent_bytes) as fn(&crate::transport::LinkFigures) -> u64,
            ),
            (
                "peer_received_bytes",
                "UDP payload bytes received on the current connection from the peer.",
                |f| f.received_bytes,
            ),
            (
                "peer_sent_packets",
                "Packets sent on the current connection to the peer.",
                |f| f.sent_packets,
            ),
            (
                "peer_lost_packets",
                "Packets QUIC declared lost on the current connection to the peer.",
                |f| f.lost_packets,
            ),
            (
                "peer_congestion_events",
                "Congestion events on the current connection to the peer.",
                |f| f.congestion_events,
            ),
        ] {
            family(
                e,
                (name, doc, None, MetricType::Counter),
                &self.peers,
                |p| link(p).map(|(l, f)| (l, pick(&f) as f64)),
            )?;
        }
        Ok(())
    }
}

/// The node's figures and its metrics endpoint.
impl NodeHandle {
    /// The node's figures as OpenMetrics text, as [`serve_metrics`](Self::serve_metrics)
    /// serves them: the counters of [`stats`](Self::stats) (`tern_<name>_total`), its
    /// gauges, the migration counters and the freeze-time histogram
    /// (`tern_migration_freeze_seconds`), each service's mailbox depth and each peer's link
    /// figures. Every series is labelled with the node's name. docs/observability.md lists
    /// them all.
    ///
    /// ```
    /// use tern::{certs::ClusterCa, Node, NodeConfig};
    /// let ca = ClusterCa::new()?;
    /// let node = Node::start(NodeConfig::new(ca.issue("phone")?, "127.0.0.1:0".parse().unwrap()))?;
    /// let text = node.metrics();
    /// assert!(text.contains("tern_services_live{node=\"phone\"} 0"));
    /// assert!(text.ends_with("# EOF\n"));
    /// node.shutdown();
    /// # Ok::<(), tern::Error>(())
    /// ```
    pub fn metrics(&self) -> String {
        self.figures().to_openmetrics()
    }

    /// The node's figures read at once: its counters, migrations, services, peers and
    /// channels, as [`metrics`](Self::metrics) exports them and `tern top` shows them.
    ///
    /// ```
    /// use tern::{certs::ClusterCa, Node, NodeConfig};
    /// let ca = ClusterCa::new()?;
    /// let node = Node::start(NodeConfig::new(ca.issue("phone")?, "127.0.0.1:0".parse().unwrap()))?;
    /// let f = node.figures();
    /// assert_eq!(f.node.as_str(), "phone");
    /// assert_eq!((f.stats.services_live, f.migrations.committed), (0, 0));
    /// node.shutdown();
    /// # Ok::<(), tern::Error>(())
    /// ```
    pub fn figures(&self) -> NodeFigures {
        NodeFigures::of(&self.shared)
    }

    /// Serves [`metrics`](Self::metrics) over HTTP at `GET /metrics` on `addr` (port 0 lets
    /// the OS choose) until the node stops, for Prometheus or any OpenMetrics scraper; the
    /// address bound. Only figures are served, never control, but anyone who reaches the
    /// address reads them: bind loopback or a management network. A node file sets it with
    /// `metrics_listen`.
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use tern::{certs::ClusterCa, Node, NodeConfig};
    /// let ca = ClusterCa::new()?;
    /// let node = Node::start(NodeConfig::new(ca.issue("phone")?, "127.0.0.1:0".parse().unwrap()))?;
    /// let at = node.serve_metrics("127.0.0.1:0".parse().unwrap())?;
    /// let mut scrape = std::net::TcpStream::connect(at).unwrap();
    /// scrape.write_all(b"GET /metrics HTTP/1.1\r\nhost: phone\r\n\r\n").unwrap();
    /// let mut answer = String::new();
    /// scrape.read_to_string(&mut answer).unwrap();
    /// assert!(answer.starts_with("HTTP/1.1 200 OK"));
    /// assert!(answer.contains("tern_peers_connected{node=\"phone\"} 0"));
    /// node.shutdown();
    /// # Ok::<(), tern::Error>(())
    /// ```
    pub fn serve_metrics(&self, addr: SocketAddr) -> Result<SocketAddr, Error> {
        serve(self, addr)
    }
}

/// What a request asked for, once its head has been read.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics,
    NotFound,
    NotAllowed,
    Malformed,
    TooLarge,
}

/// Reads a request's head (up to the blank line) and says what it asks for.
fn parse_request(head: &[u8]) -> Asked {
    let Ok(text) = std::str::from_utf8(head) else {
        return Asked::Malformed;
    };
    let Some(line) = text.lines().next() else {
        return Asked::Malformed;
    };
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Asked::Malformed;
    };
    if parts.next().is_some() || !version.starts_with("HTTP/1.") {
        return Asked::Malformed;
    }
    if method != "GET" {
        return Asked::NotAllowed;
    }
    let path = target.split('?').next().unwrap_or(target);
    if path == "/metrics" {
        Asked::Metrics
    } else {
        Asked::NotFound
    }
}

async fn read_head(stream: &mut tokio::net::TcpStream) -> Asked {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return parse_request(&buf[..end]);
        }
        if buf.len() >= REQUEST_BYTES_MAX {
            return Asked::TooLarge;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Asked::Malformed,
            Ok(n) => buf.extend_from_slice(&chunk[..n.min(REQUEST_BYTES_MAX + 4 - buf.len())]),
        }
    }
}

async fn answer(node: NodeHandle, mut stream: tokio::net::TcpStream) {
    let timeout = std::time::Duration::from_millis(REQUEST_TIMEOUT_MS);
    let asked = tokio::time::timeout(timeout, read_head(&mut stream))
        .await
        .unwrap_or(Asked::Malformed);
    let (status, content_type, body) = match asked {
        Asked::Metrics => ("200 OK", CONTENT_TYPE, node.metrics()),
        Asked::NotFound => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only /metrics is served here\n".to_owned(),
        ),
        Asked::NotAllowed => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "only GET is served here\n".to_owned(),
        ),
        Asked::TooLarge => (
            "431 Request Header Fields Too Large",
            "text/plain; charset=utf-8",
            format!("a request's head is at most {REQUEST_BYTES_MAX} bytes\n"),
        ),
        Asked::Malformed => (
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "not an HTTP/1 request\n".to_owned(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let written = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    if let Ok(Err(e)) = tokio::time::timeout(timeout, written).await {
        tracing::debug!(error = %e, "metrics: a scraper went away mid-answer");
    }
}

/// Binds `addr` and serves the node's metrics there on the node's own thread until the node
/// stops; the address bound.
pub(crate) fn serve(node: &NodeHandle, addr: SocketAddr) -> Result<SocketAddr, Error> {
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| Error::io("binding the metrics address", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("setting up the metrics listener", e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::io("reading the metrics address", e))?;
    let node2 = node.clone();
    let started = node.shared.spawn_task(async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "metrics: the listener could not start");
                return;
            }
        };
        tracing::info!(addr = %bound, "metrics: serving /metrics");
        let busy = Arc::new(AtomicUsize::new(0));
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accepting a scraper failed");
                    continue;
                }
            };
            if busy.fetch_add(1, Ordering::AcqRel) >= SCRAPES_MAX {
                busy.fetch_sub(1, Ordering::AcqRel);
                tracing::debug!(%peer, "metrics: too many scrapes at once; closed");
                continue;
            }
            let (node, busy) = (node2.clone(), busy.clone());
            actix_rt::spawn(async move {
                answer(node, stream).await;
                busy.fetch_sub(1, Ordering::AcqRel);
            });
        }
    });
    if !started {
        return Err(Error::Stopped);
    }
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_get_of_metrics_is_served() {
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nhost: x"),
            Asked::Metrics
        );
        assert_eq!(parse_request(b"GET /metrics?x=1 HTTP/1.0"), Asked::Metrics);
        assert_eq!(parse_request(b"GET / HTTP/1.1"), Asked::NotFound);
        assert_eq!(parse_request(b"POST /metrics HTTP/1.1"), Asked::NotAllowed);
        assert_eq!(parse_request(b"GET /metrics"), Asked::Malformed);
        assert_eq!(parse_request(b"GET /metrics SPDY/3"), Asked::Malformed);
        assert_eq!(parse_request(&[0xff, 0xfe]), Asked::Malformed);
    }

    #[test]
    fn help_is_one_line() {
        assert_eq!(
            help(" Messages\n queued for\n a peer node.\n"),
            "Messages queued for a peer node."
        );
    }
}
