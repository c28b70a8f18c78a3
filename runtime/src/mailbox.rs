//! The runtime-owned mailbox: a bounded queue the runtime can read back as data.
//!
//! actix keeps its queued envelopes to itself; a service that must migrate with its queue needs
//! a queue the runtime owns. Pushing never blocks and never drops: a full mailbox is an error to
//! the sender, who may also wait for room.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use tokio::sync::Notify;

use crate::error::DeliveryError;
use crate::ids::{KindKey, NodeName, ServiceId};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of the runtime's locks leaves plain data behind (queues,
    // tables); carrying on is better than poisoning every later sender.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Where the answer to a queued request goes.
#[derive(Clone, Debug)]
pub(crate) struct AskOrigin {
    /// Node waiting for the reply.
    pub node: NodeName,
    /// Ask id on that node.
    pub ask: u64,
}

/// Who sent a message and where it stands in that sender's channel to the receiver; the ask id
/// (on the sender's node) when it is a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Meta {
    pub from: Option<ServiceId>,
    pub seq: u64,
    pub ask: Option<u64>,
}

/// One queued message with its channel metadata.
#[derive(Debug)]
pub(crate) struct Envelope<M> {
    pub from: Option<ServiceId>,
    pub seq: u64,
    pub ask: Option<AskOrigin>,
    pub origin: Option<NodeName>,
    pub msg: M,
}

impl<M> Envelope<M> {
    /// An envelope for `msg`; `asker` is the node waiting on `meta.ask`, `origin` the node it came
    /// from (`None` when local).
    pub fn new(meta: Meta, asker: &NodeName, origin: Option<&NodeName>, msg: M) -> Self {
        Envelope {
            from: meta.from,
            seq: meta.seq,
            ask: meta.ask.map(|ask| AskOrigin {
                node: asker.clone(),
                ask,
            }),
            origin: origin.cloned(),
            msg,
        }
    }
}

struct State<M> {
    queue: VecDeque<Envelope<M>>,
    closed: bool,
}

/// A bounded, runtime-owned queue for one service.
pub(crate) struct Mailbox<M> {
    pub id: ServiceId,
    pub kind: KindKey,
    pub capacity: usize,
    state: Mutex<State<M>>,
    ready: Notify,
    space: Notify,
    space_waiters: AtomicUsize,
}

impl<M> Mailbox<M> {
    pub fn new(id: ServiceId, kind: KindKey, capacity: usize) -> Self {
        assert!(capacity > 0, "mailbox capacity must be positive");
        Mailbox {
            id,
            kind,
            capacity,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                closed: false,
            }),
            ready: Notify::new(),
            space: Notify::new(),
            space_waiters: AtomicUsize::new(0),
        }
    }

    /// Queues `env`, or hands it back with the reason it was not taken.
    // The envelope comes back by value on refusal so that it is never lost; boxing it would
    // allocate on the path that is already under pressure.
    #[allow(clippy::result_large_err)]
    pub fn push(&self, env: Envelope<M>) -> Result<(), (DeliveryError, Envelope<M>)> {
        {
            let mut st = lock(&self.state);
            if st.closed {
                return Err((DeliveryError::Stopped { id: self.id }, env));
            }
            if st.queue.len() >= self.capacity {
                return Err((
                    DeliveryError::MailboxFull {
                        id: self.id,
                        capacity: self.capacity,
                    },
                    env,
                ));
            }
            st.queue.push_back(env);
            debug_assert!(st.queue.len() <= self.capacity);
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Queues `env`, waiting for room while the mailbox is full.
    pub async fn push_wait(&self, env: Envelope<M>) -> Result<(), DeliveryError> {
        // Fast path: room now, no waiter bookkeeping.
        let mut env = match self.push(env) {
            Ok(()) => return Ok(()),
            Err((DeliveryError::MailboxFull { .. }, back)) => back,
            Err((e, _)) => return Err(e),
        };
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.space_waiters.fetch_add(1, Ordering::SeqCst);
            let res = self.push(env);
            match res {
                Ok(()) => {
                    self.space_waiters.fetch_sub(1, Ordering::SeqCst);
                    return Ok(());
                }
                Err((DeliveryError::MailboxFull { .. }, back)) => {
                    env = back;
                    notified.await;
                    self.space_waiters.fetch_sub(1, Ordering::SeqCst);
                }
                Err((e, _)) => {
                    self.space_waiters.fetch_sub(1, Ordering::SeqCst);
                    return Err(e);
                }
            }
        }
    }

    /// Returns once the mailbox has room (or is closed).
    pub async fn wait_room(&self) {
        loop {
            let notified = self.space.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.space_waiters.fetch_add(1, Ordering::SeqCst);
            let room = {
                let st = lock(&self.state);
                st.closed || st.queue.len() < self.capacity
            };
            if !room {
                notified.await;
            }
            self.space_waiters.fetch_sub(1, Ordering::SeqCst);
            if room {
                return;
            }
        }
    }

    /// Takes the oldest message. Senders waiting for room are woken once the queue is down to
    /// half its capacity, so each wake-up lets a run of messages in rather than one.
    pub fn pop(&self) -> Option<Envelope<M>> {
        let (env, left) = {
            let mut st = lock(&self.state);
            let env = st.queue.pop_front();
            (env, st.queue.len())
        };
        if env.is_some()
            && left <= self.capacity / 2
            && self.space_waiters.load(Ordering::SeqCst) > 0
        {
            self.space.notify_waiters();
        }
        env
    }

    /// Waits until a push may have happened.
    pub async fn wait_ready(&self) {
        self.ready.notified().await
    }

    pub fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Closes the mailbox and returns what was still queued, oldest first.
    pub fn close(&self) -> Vec<Envelope<M>> {
        let rest = {
            let mut st = lock(&self.state);
            st.closed = true;
            st.queue.drain(..).collect()
        };
        self.ready.notify_one();
        self.space.notify_waiters();
        rest
    }

    pub fn len(&self) -> usize {
        lock(&self.state).queue.len()
    }
}

/// A local service seen without its types: what the node needs to route bytes from the network
/// to it and to find it again by type.
pub(crate) trait Slot: Send + Sync + 'static {
    fn kind(&self) -> &KindKey;
    fn depth(&self) -> usize;
    fn capacity(&self) -> usize;
    /// Decodes `bytes` as the service's message type and queues it.
    fn deliver_bytes(
        &self,
        meta: Meta,
        origin: &NodeName,
        bytes: &[u8],
    ) -> Result<(), DeliveryError>;
    /// Decodes and queues `msgs[start..]` (numbered from `first_seq + start` when `from` is a
    /// service) under one lock, stopping at the first that cannot be taken. Returns the index of
    /// the first message not queued, with the reason, or `msgs.len()` and `None`.
    fn deliver_run(
        &self,
        sender: (Option<ServiceId>, u64, &NodeName),
        msgs: &[&serde_bytes::Bytes],
        start: usize,
    ) -> (usize, Option<DeliveryError>);
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
    /// Resolves once the mailbox has room or is closed.
    fn room(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>>;
}

impl<M: DeserializeOwned + Send + 'static> Slot for Mailbox<M> {
    fn kind(&self) -> &KindKey {
        &self.kind
    }

    fn depth(&self) -> usize {
        self.len()
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn deliver_bytes(
        &self,
        meta: Meta,
        origin: &NodeName,
        bytes: &[u8],
    ) -> Result<(), DeliveryError> {
        let msg: M = rmp_serde::from_slice(bytes).map_err(|e| DeliveryError::BadMessage {
            id: self.id,
            kind: self.kind.clone(),
            detail: e.to_string(),
        })?;
        self.push(Envelope::new(meta, origin, Some(origin), msg))
            .map_err(|(e, _)| e)
    }

    fn deliver_run(
        &self,
        (from, first_seq, origin): (Option<ServiceId>, u64, &NodeName),
        msgs: &[&serde_bytes::Bytes],
        start: usize,
    ) -> (usize, Option<DeliveryError>) {
        let mut next = start;
        let stopped = {
            let mut st = lock(&self.state);
            loop {
                if next == msgs.len() {
                    break None;
                }
                if st.closed {
                    break Some(DeliveryError::Stopped { id: self.id });
                }
                if st.queue.len() >= self.capacity {
                    break Some(DeliveryError::MailboxFull {
                        id: self.id,
                        capacity: self.capacity,
                    });
                }
                let msg: M = match rmp_serde::from_slice(msgs[next]) {
                    Ok(m) => m,
                    Err(e) => {
                        break Some(DeliveryError::BadMessage {
                            id: self.id,
                            kind: self.kind.clone(),
                            detail: e.to_string(),
                        })
                    }
                };
                // The caller checked that the numbering does not overflow.
                let seq = if from.is_some() {
                    first_seq + next as u64
                } else {
                    first_seq
                };
                st.queue.push_back(Envelope {
                    from,
                    seq,
                    ask: None,
                    origin: Some(origin.clone()),
                    msg,
                });
                next += 1;
            }
        };
        if next > start {
            self.ready.notify_one();
        }
        (next, stopped)
    }

    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }

    fn room(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + '_>> {
        Box::pin(self.wait_room())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(n: u32) -> Envelope<u32> {
        Envelope {
            from: None,
            seq: n as u64,
            ask: None,
            origin: None,
            msg: n,
        }
    }

    #[test]
    fn bounded_fifo_and_close_returns_rest() {
        let mb = Mailbox::new(ServiceId::from_parts(0, 1), KindKey::new("k", 1), 2);
        mb.push(env(1)).unwrap();
        mb.push(env(2)).unwrap();
        let (e, back) = mb.push(env(3)).unwrap_err();
        assert!(matches!(e, DeliveryError::MailboxFull { capacity: 2, .. }));
        assert_eq!(back.msg, 3, "a refused message is handed back, not dropped");
        assert_eq!(mb.pop().unwrap().msg, 1);
        mb.push(env(3)).unwrap();
        let rest: Vec<u32> = mb.close().into_iter().map(|e| e.msg).collect();
        assert_eq!(rest, vec![2, 3]);
        assert!(matches!(
            mb.push(env(4)),
            Err((DeliveryError::Stopped { .. }, _))
        ));
    }
}
