//! Tracing plumbing: the subscriber a node's threads log to, and a migration's trace context.
//!
//! A node's threads (its actix system, its store's writer, its discovery) log to the subscriber
//! that was the default on the thread that started them: a program's global subscriber, or one
//! a test set for its own thread with `tracing::subscriber::set_default`, so that several nodes
//! in one process can report to different places.
//!
//! With the `otel` feature, a migration's span on its source and its span on its target belong
//! to one OpenTelemetry trace: the source writes its span's context (W3C Trace Context: trace
//! id, span id, flags) in the snapshot header, and the target's span takes it as its parent.
//! Spans reach OpenTelemetry through a `tracing-opentelemetry` layer the application installs
//! (see the crate root's `otel` module); without one, or without the feature, no context is
//! carried. A peer's context is only ever used to attribute the target's spans.

use tern_proto::wire::TraceContext;

/// Whether this build carries trace contexts (the `otel` feature): without it a snapshot's
/// writer does not even look its span up.
pub(crate) const CARRIES: bool = cfg!(feature = "otel");

/// The subscriber the current thread logs to, for a thread it starts; None when there is
/// none yet (the new thread then follows the global default, whenever one is installed).
pub(crate) fn current_dispatch() -> Option<tracing::Dispatch> {
    tracing::dispatcher::get_default(|d| {
        (!d.is::<tracing::subscriber::NoSubscriber>()).then(|| d.clone())
    })
}

/// Spawns a thread named `name` that logs where the calling thread logs.
pub(crate) fn spawn<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    let dispatch = current_dispatch();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || within(dispatch.as_ref(), f))
}

/// Runs `f` with `dispatch` (a node's) as the thread's subscriber, so that the spans and events
/// it makes go where the node's others go; with None, where the thread's go.
pub(crate) fn within<T>(dispatch: Option<&tracing::Dispatch>, f: impl FnOnce() -> T) -> T {
    match dispatch {
        Some(d) => tracing::dispatcher::with_default(d, f),
        None => f(),
    }
}

/// The trace context to carry for `span` to a peer: None without the `otel` feature, without
/// an OpenTelemetry layer in the span's subscriber, or when the span is not sampled.
#[cfg(feature = "otel")]
pub(crate) fn context_of(span: &tracing::Span) -> Option<TraceContext> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| TraceContext {
        trace_id: sc.trace_id().to_bytes(),
        span_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
    })
}

/// The trace context to carry for `span` to a peer: none without the `otel` feature.
#[cfg(not(feature = "otel"))]
pub(crate) fn context_of(_span: &tracing::Span) -> Option<TraceContext> {
    None
}

/// Makes `span`, before it is first entered, a child of a peer's span `remote`. An invalid
/// context (all-zero ids) is ignored: the span starts a trace of its own.
#[cfg(feature = "otel")]
pub(crate) fn join(span: &tracing::Span, remote: Option<TraceContext>) {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let Some(remote) = remote.filter(TraceContext::is_valid) else {
        return;
    };
    let parent = SpanContext::new(
        TraceId::from_bytes(remote.trace_id),
        SpanId::from_bytes(remote.span_id),
        TraceFlags::new(remote.flags),
        true,
        TraceState::default(),
    );
    let cx = opentelemetry::Context::new().with_remote_span_context(parent);
    // No layer, or the span filtered out: nothing exports it, nothing to join.
    if let Err(e @ tracing_opentelemetry::SetParentError::AlreadyStarted) = span.set_parent(cx) {
        tracing::debug!(error = %e, "a migration's span could not join its trace");
    }
}

/// Makes `span` a child of a peer's span: nothing without the `otel` feature.
#[cfg(not(feature = "otel"))]
pub(crate) fn join(_span: &tracing::Span, _remote: Option<TraceContext>) {}

#[cfg(all(test, feature = "otel"))]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt as _;

    /// A peer's context is carried through and taken as the parent when valid; all-zero ids
    /// (a careless or lying peer) leave the span a trace of its own.
    #[test]
    fn a_valid_context_is_carried_and_joined_and_an_invalid_one_is_ignored() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        let dispatch = tracing::Dispatch::new(subscriber);
        let (carried, joined_id, alone_id) = within(Some(&dispatch), || {
            let source = tracing::info_span!("source");
            let carried = context_of(&source).expect("a sampled span's context");
            let joined = tracing::info_span!("joined");
            join(&joined, Some(carried));
            let alone = tracing::info_span!("alone");
            join(
                &alone,
                Some(TraceContext {
                    trace_id: [0; 16],
                    span_id: [0; 8],
                    flags: 1,
                }),
            );
            let ids = (context_of(&joined), context_of(&alone));
            (carried, ids.0, ids.1)
        });
        let joined_id = joined_id.expect("joined");
        assert_eq!(joined_id.trace_id, carried.trace_id);
        assert_ne!(joined_id.span_id, carried.span_id);
        let alone_id = alone_id.expect("alone");
        assert_ne!(alone_id.trace_id, carried.trace_id);
        let _ = provider.force_flush();
        let spans = exporter.get_finished_spans().expect("spans");
        let by_name = |n: &str| spans.iter().find(|s| s.name == n).expect(n).clone();
        assert_eq!(
            by_name("joined").parent_span_id,
            SpanId::from_bytes(carried.span_id)
        );
        assert_eq!(by_name("alone").parent_span_id, SpanId::INVALID);
        assert_ne!(by_name("alone").span_context.trace_id(), TraceId::INVALID);
        // Without an OpenTelemetry layer nothing is carried.
        let plain = tracing::Dispatch::new(tracing_subscriber::registry());
        within(Some(&plain), || {
            assert_eq!(context_of(&tracing::info_span!("plain")), None);
        });
    }
}
