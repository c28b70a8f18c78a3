//! Typed, location-transparent handles to services.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::error::{AskError, DeliveryError};
use crate::ids::{ServiceAddr, ServiceId};
use crate::mailbox::{Envelope, Mailbox, Meta};
use crate::node::NodeShared;
use crate::service::{ReplyTo, Service};
use crate::transport::PeerLink;

pub(crate) enum Route<M> {
    Local(Arc<Mailbox<M>>),
    Remote(Arc<PeerLink>),
}

impl<M> Clone for Route<M> {
    fn clone(&self) -> Self {
        match self {
            Route::Local(m) => Route::Local(m.clone()),
            Route::Remote(l) => Route::Remote(l.clone()),
        }
    }
}

/// A typed handle to a service: the same code sends to it whether it runs on this node or on
/// another.
///
/// ```no_run
/// # use std::time::Duration;
/// # use serde::{Deserialize, Serialize};
/// # use tern::{Ctx, ReplyTo, Service, ServiceRef};
/// # #[derive(Serialize, Deserialize)] struct Counter { total: u64 }
/// # #[derive(Serialize, Deserialize)] enum CounterMsg { Add(u64), Get(ReplyTo<u64>) }
/// # impl Service for Counter { type Msg = CounterMsg; const KIND: &'static str = "counter";
/// #   const VERSION: u32 = 1; async fn handle(&mut self, _m: CounterMsg, _c: &mut Ctx<Self>) {} }
/// async fn use_it(counter: ServiceRef<Counter>) -> Result<u64, tern::AskError> {
///     counter.tell(CounterMsg::Add(2))?;
///     counter.ask(CounterMsg::Get, Duration::from_secs(1)).await
/// }
/// ```
pub struct ServiceRef<S: Service> {
    addr: ServiceAddr,
    pub(crate) node: Arc<NodeShared>,
    route: Route<S::Msg>,
}

impl<S: Service> Clone for ServiceRef<S> {
    fn clone(&self) -> Self {
        ServiceRef {
            addr: self.addr.clone(),
            node: self.node.clone(),
            route: self.route.clone(),
        }
    }
}

impl<S: Service> fmt::Debug for ServiceRef<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceRef({:?})", self.addr)
    }
}

impl<S: Service> ServiceRef<S> {
    pub(crate) fn new(addr: ServiceAddr, node: Arc<NodeShared>, route: Route<S::Msg>) -> Self {
        ServiceRef { addr, node, route }
    }

    /// The service's id.
    pub fn id(&self) -> ServiceId {
        self.addr.id
    }

    /// The service's address: id, kind and node. Serializable; turn it back into a handle with
    /// [`NodeHandle::resolve`](crate::NodeHandle::resolve).
    pub fn addr(&self) -> &ServiceAddr {
        &self.addr
    }

    /// True when the service runs on the node this handle belongs to.
    pub fn is_local(&self) -> bool {
        matches!(self.route, Route::Local(_))
    }

    /// Sends `msg`. Fails at once when a local mailbox is full, the service stopped, or the link
    /// to a remote node has no room; a remote refusal comes back asynchronously (counted in
    /// `refused_by_peers` and logged in the node's events).
    pub fn tell(&self, msg: S::Msg) -> Result<(), DeliveryError> {
        self.send(Meta::default(), msg)
    }

    /// Like [`tell`](Self::tell), but waits while the mailbox or the link is full.
    pub async fn tell_wait(&self, msg: S::Msg) -> Result<(), DeliveryError> {
        self.send_wait(Meta::default(), msg).await
    }

    /// Sends a request made by `make` around a reply handle, and waits up to `timeout` for the
    /// answer. A full mailbox makes the request wait for room within the same timeout.
    pub async fn ask<R: DeserializeOwned + Send + 'static>(
        &self,
        make: impl FnOnce(ReplyTo<R>) -> S::Msg,
        timeout: Duration,
    ) -> Result<R, AskError> {
        self.ask_from(Meta::default(), make, timeout).await
    }

    fn envelope(&self, meta: Meta, msg: S::Msg) -> Envelope<S::Msg> {
        Envelope::new(meta, self.node.name(), None, msg)
    }

    fn count(&self, res: &Result<(), DeliveryError>) {
        match res {
            Ok(()) if self.is_local() => self.node.stats.sent_local.inc(),
            Ok(()) => self.node.stats.sent_remote.inc(),
            Err(_) => self.node.stats.refused_to_senders.inc(),
        }
    }

    pub(crate) fn send(&self, meta: Meta, msg: S::Msg) -> Result<(), DeliveryError> {
        let res = match &self.route {
            Route::Local(mb) => mb.push(self.envelope(meta, msg)).map_err(|(e, _)| e),
            Route::Remote(link) => link.send_deliver(self.addr.id, meta, &msg),
        };
        self.count(&res);
        res
    }

    pub(crate) async fn send_wait(&self, meta: Meta, msg: S::Msg) -> Result<(), DeliveryError> {
        let res = match &self.route {
            Route::Local(mb) => mb.push_wait(self.envelope(meta, msg)).await,
            Route::Remote(link) => link.send_deliver_wait(self.addr.id, meta, &msg).await,
        };
        self.count(&res);
        res
    }

    pub(crate) async fn ask_from<R: DeserializeOwned + Send + 'static>(
        &self,
        meta: Meta,
        make: impl FnOnce(ReplyTo<R>) -> S::Msg,
        timeout: Duration,
    ) -> Result<R, AskError> {
        let (ask, rx) = self.node.asks.open(self.addr.node.clone())?;
        self.node.stats.asks_started.inc();
        let msg = make(ReplyTo::new(self.node.name().clone(), ask));
        let deadline = tokio::time::Instant::now() + timeout;
        let sent = tokio::time::timeout_at(
            deadline,
            self.send_wait(
                Meta {
                    ask: Some(ask),
                    ..meta
                },
                msg,
            ),
        )
        .await;
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.node.asks.cancel(ask);
                return Err(e.into());
            }
            Err(_) => {
                self.node.asks.cancel(ask);
                self.node.stats.asks_timed_out.inc();
                return Err(AskError::Timeout {
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
        }
        let payload = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(payload)) => payload,
            Ok(Err(_)) => {
                return Err(AskError::NodeLost {
                    node: self.addr.node.clone(),
                })
            }
            Err(_) => {
                self.node.asks.cancel(ask);
                self.node.stats.asks_timed_out.inc();
                return Err(AskError::Timeout {
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
        };
        self.node.stats.asks_answered.inc();
        payload.into_typed()
    }
}

/// What arrives for a pending ask.
pub(crate) enum ReplyPayload {
    Local(Box<dyn Any + Send>),
    Bytes(Vec<u8>),
    Refused(DeliveryError),
    Failed(String),
}

impl ReplyPayload {
    pub(crate) fn into_typed<R: DeserializeOwned + 'static>(self) -> Result<R, AskError> {
        match self {
            ReplyPayload::Local(b) => {
                b.downcast::<R>()
                    .map(|b| *b)
                    .map_err(|_| AskError::BadReply {
                        detail: format!("reply is not a {}", std::any::type_name::<R>()),
                    })
            }
            ReplyPayload::Bytes(bytes) => {
                rmp_serde::from_slice(&bytes).map_err(|e| AskError::BadReply {
                    detail: e.to_string(),
                })
            }
            ReplyPayload::Refused(e) => Err(AskError::Delivery(e)),
            ReplyPayload::Failed(detail) => Err(AskError::BadReply { detail }),
        }
    }
}
