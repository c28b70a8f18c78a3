//! OpenTelemetry traces (the `tern` crate's `otel` feature): a migration's span on its source
//! and its span on the target are one trace, the context carried in the snapshot header. Each
//! node reports to its own tracer provider and in-memory exporter (the SDK's), as two devices
//! would to their own collectors, so the only way the target's span can name the source's as
//! its parent is the context that travelled with the snapshot.

use anyhow::{Context as _, Result};
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use opentelemetry_sdk::Resource;
use tern::certs::ClusterCa;
use tern::{MigrateOptions, Node, NodeConfig, NodeHandle};
use tern_harness::{block_on, wait_for};
use tracing::Instrument as _;
use tracing_subscriber::layer::SubscriberExt as _;

use crate::common::{Slow, SlowMsg, SECS_10};

/// One node's own telemetry: a provider named after it, exporting to memory.
struct Telemetry {
    dispatch: tracing::Dispatch,
    exporter: InMemorySpanExporter,
    provider: SdkTracerProvider,
}

impl Telemetry {
    fn new(node: &str) -> Self {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_resource(
                Resource::builder()
                    .with_attribute(KeyValue::new("service.name", node.to_string()))
                    .build(),
            )
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("tern-traces-test")));
        Telemetry {
            dispatch: tracing::Dispatch::new(subscriber),
            exporter,
            provider,
        }
    }

    /// The spans named `name` whose attribute `key` is `value`, finished so far.
    fn spans(&self, name: &str, key: &str, value: &str) -> Vec<SpanData> {
        let _ = self.provider.force_flush();
        self.exporter
            .get_finished_spans()
            .unwrap_or_default()
            .into_iter()
            .filter(|s| {
                s.name == name
                    && s.attributes
                        .iter()
                        .any(|kv| kv.key.as_str() == key && kv.value.as_str() == value)
            })
            .collect()
    }

    /// The one finished span named `name` with `key` = `value`, once it has finished.
    fn one(&self, name: &str, key: &str, value: &str) -> Result<SpanData> {
        wait_for(SECS_10, &format!("span {name} with {key}={value}"), || {
            !self.spans(name, key, value).is_empty()
        })?;
        let mut found = self.spans(name, key, value);
        anyhow::ensure!(found.len() == 1, "{} spans {name}: {found:?}", found.len());
        found.pop().context("no span")
    }
}

/// A node started with `telemetry`'s subscriber as its own.
fn node(ca: &ClusterCa, name: &str, telemetry: &Telemetry) -> Result<NodeHandle> {
    let identity = ca.issue(name)?;
    let listen = "127.0.0.1:0".parse()?;
    let node = tracing::dispatcher::with_default(&telemetry.dispatch, || {
        Node::start(NodeConfig::new(identity, listen))
    })?;
    node.register::<Slow>();
    Ok(node)
}

/// The attribute `key` of `span`, as text.
fn attr(span: &SpanData, key: &str) -> String {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.as_str().into_owned())
        .unwrap_or_default()
}

#[test]
fn a_migration_is_one_trace_across_its_source_and_target_and_joins_the_callers_trace() -> Result<()>
{
    let (ta, tb) = (Telemetry::new("a"), Telemetry::new("b"));
    let ca = ClusterCa::new()?;
    let a = node(&ca, "a", &ta)?;
    let b = node(&ca, "b", &tb)?;
    a.add_peer("b", b.local_addr())?;
    wait_for(SECS_10, "a and b connected", || {
        a.is_connected("b") && b.is_connected("a")
    })?;

    // a to b, with a queue to carry.
    let slow = a.spawn(Slow::default())?;
    let service = slow.id().to_string();
    block_on(async {
        slow.tell(SlowMsg::Hold { ms: 50 })?;
        for i in 1..=20 {
            slow.tell(SlowMsg::Item(i))?;
        }
        let report = a.migrate(slow.id(), "b", MigrateOptions::default()).await?;
        anyhow::ensure!(report.committed(), "{report:?}");
        anyhow::Ok(())
    })?;
    let out = ta.one("migration", "to", "b")?;
    let arrived = tb.one("migration-in", "from", "a")?;
    assert_eq!(attr(&out, "service"), service);
    assert_eq!(attr(&arrived, "service"), service);
    assert_eq!(attr(&arrived, "node"), "b");
    assert_ne!(out.span_context.trace_id(), TraceId::INVALID);
    assert_eq!(
        arrived.span_context.trace_id(),
        out.span_context.trace_id(),
        "the target's span is in the source's trace"
    );
    assert_eq!(arrived.parent_span_id, out.span_context.span_id());
    assert!(arrived.parent_span_is_remote);
    assert!(
        arrived.events.iter().any(|e| e.name == "restored"),
        "{:?}",
        arrived.events
    );
    // It starts with the header, after the source's span began.
    assert!(arrived.start_time >= out.start_time);
    // The source's own span is a root: nothing called it from a trace.
    assert_eq!(out.parent_span_id, SpanId::INVALID);

    // Back from b to a, called inside a span of the caller's own (in b's subscriber, as a
    // program on b would): the move is part of the caller's trace, on both nodes.
    let request = tb.dispatch.clone();
    let root = tracing::dispatcher::with_default(&request, || {
        tracing::info_span!("user-request", what = "bring it back")
    });
    let root_trace = {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        root.context().span().span_context().trace_id()
    };
    block_on(async {
        let report = b
            .migrate(slow.id(), "a", MigrateOptions::default())
            .instrument(root.clone())
            .await?;
        anyhow::ensure!(report.committed(), "{report:?}");
        anyhow::Ok(())
    })?;
    drop(root);
    let back = tb.one("migration", "to", "a")?;
    let home = ta.one("migration-in", "from", "b")?;
    let request_span = tb.one("user-request", "what", "bring it back")?;
    assert_eq!(back.span_context.trace_id(), root_trace);
    assert_eq!(back.parent_span_id, request_span.span_context.span_id());
    assert_eq!(home.span_context.trace_id(), root_trace);
    assert_eq!(home.parent_span_id, back.span_context.span_id());
    assert_ne!(root_trace, out.span_context.trace_id(), "a move of its own");

    // Nothing was lost, and the service goes on answering on a.
    block_on(async {
        for i in 21..=30 {
            slow.tell_wait(SlowMsg::Item(i)).await?;
        }
        assert_eq!(
            slow.ask(SlowMsg::Items, SECS_10).await?,
            (1..=30).collect::<Vec<_>>()
        );
        anyhow::Ok(())
    })?;
    assert!(a.services().iter().any(|s| s.addr.id == slow.id()));
    drop(slow);
    for n in [a, b] {
        n.shutdown();
    }
    Ok(())
}
