//! # Tern
//!
//! An actor runtime for multi-device applications: every service is an actor whose state is a
//! serde value, hosted behind a runtime-owned mailbox on a node (one per device), reachable
//! through the same typed handle whether it runs on this node or another, over QUIC with mutual
//! TLS.
//!
//! Start at [`Service`] (writing a service), [`Node`] (running a node) and [`ServiceRef`]
//! (talking to a service). `runtime/examples/` holds programs to copy. The protocol itself
//! (wire frames, windows, the migration core, the directory) is the crate `tern-proto`, with no
//! I/O; this crate drives it.

#![warn(missing_docs)]

pub mod admin;
mod books;
pub mod certs;
pub mod discovery;
#[doc(hidden)]
pub mod doc_support;
mod error;
mod events;
mod handle;
mod host;
mod inbound;
mod limits;
mod mailbox;
mod members;
pub mod metrics;
mod migrate;
mod names;
mod node;
pub mod pairing;
mod placement;
mod placing;
mod precopy;
mod registry;
mod replicas;
mod replies;
mod reports;
pub mod runner;
mod senders;
mod service;
mod stats;
mod store;
mod sync;
pub mod tls;
mod trace;
mod tracked;
mod transport;
mod tree;
pub mod trust;

/// OpenTelemetry traces (cargo feature `otel`).
///
/// Tern's spans are `tracing` spans: a program exports them through OpenTelemetry by adding a
/// `tracing-opentelemetry` layer, with the tracer of the SDK and exporter it chooses, to its
/// subscriber. With this feature, a migration's span on its source (`migration`) and its span on
/// the target (`migration-in`) are one trace: the source carries its span's context in the
/// snapshot header, and the target's span is its child. A call to
/// [`NodeHandle::migrate`] made inside a span of the program's own makes the migration part
/// of that span's trace.
///
/// The two crates are re-exported so that a program uses the versions Tern was built with.
/// A node's threads log to the subscriber that was the default on the thread that started
/// it, so several nodes in one process (a test) can each report to their own.
///
/// ```
/// use opentelemetry::trace::TracerProvider as _;
/// use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
/// use tern::otel::tracing_opentelemetry;
/// use tracing_subscriber::layer::SubscriberExt as _;
/// # use tern::doc_support::{block_on, two_nodes, Counter};
///
/// let exporter = InMemorySpanExporter::default(); // OTLP, Jaeger, ... in a real program
/// let provider = SdkTracerProvider::builder()
///     .with_simple_exporter(exporter.clone())
///     .build();
/// let subscriber = tracing_subscriber::registry()
///     .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("my-app")));
/// let _default = tracing::subscriber::set_default(subscriber);
///
/// let (phone, tv) = two_nodes()?; // started here: their threads report to this subscriber
/// let counter = phone.spawn(Counter::default())?;
/// block_on(phone.migrate(counter.id(), "tv", tern::MigrateOptions::default()))?;
/// # drop(counter);
/// # phone.shutdown();
/// # tv.shutdown();
/// provider.force_flush()?;
///
/// let spans = exporter.get_finished_spans()?;
/// let source = spans.iter().find(|s| s.name == "migration").expect("the source's span");
/// let target = spans.iter().find(|s| s.name == "migration-in").expect("the target's span");
/// assert_eq!(target.span_context.trace_id(), source.span_context.trace_id());
/// assert_eq!(target.parent_span_id, source.span_context.span_id());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[cfg(feature = "otel")]
pub mod otel {
    pub use opentelemetry;
    pub use tracing_opentelemetry;
}

pub use error::{AskError, DeliveryError, Error};
pub use handle::ServiceRef;
pub use members::{Member, MemberInfo, MemberStatus, NodeLoad, Power};
pub use metrics::NodeFigures;
pub use migrate::{MigrateOptions, MigrationReport, MigrationStats};
pub use node::{
    bind_udp, Limits, LossReport, Node, NodeConfig, NodeEvent, NodeHandle, PeerConfig, ServiceInfo,
    SocketWrap, UDP_BUFFER_BYTES,
};
pub use placement::{
    Association, DrainReport, PlaceReport, Plan, PlanOptions, PlannedMove, RebalanceRound,
    RebalancerConfig,
};
pub use replicas::{
    ReplicaInfo, StandbyInfo, StoredInfo, STANDBY_BYTES_MAX, STANDBY_BYTES_PER_PEER_MAX,
    STANDBY_SERVICES_MAX, STANDBY_SERVICES_PER_PEER_MAX,
};
pub use replies::{REPEAT_ASKERS_MAX, REPLIES_KEPT_MAX, REPLY_BYTES_KEPT_MAX};
pub use reports::NotMoved;
pub use service::{
    read_older, write_older, Ctx, Downgrade, Migration, ReplyTo, Restart, Service, TimerId, Upgrade,
};
pub use stats::NodeStats;
pub use tern_proto::directory::{Associations, BookEdge};
pub use tern_proto::ids::{KindKey, KindName, NodeName, ServiceAddr, ServiceId};
pub use tern_proto::migration::AbortReason;
pub use tern_proto::names::NameError;
pub use tern_proto::placement::{AffinityPolicy, Needs, Policy};
pub use tern_proto::traffic::EdgeRate;
pub use tracked::{Precopy, Tracked, TrackedMap, PRECOPY_MIN_BYTES};
pub use transport::{LinkFigures, PeerStatus};
pub use tree::{
    child_role, GroupReport, TreeMember, CHILD_ROLE_PREFIX, GROUP_MEMBERS_MAX, TREE_MEMBERS_MAX,
};
