//! What the API's doc examples share, so that each shows its call and not its setup: a counter
//! service, two connected nodes, and a service that runs an example's code in its handler (for
//! [`Ctx`]'s methods). Hidden from the documentation; not part of the API.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::certs::ClusterCa;
use crate::error::Error;
use crate::node::{Node, NodeConfig, NodeHandle};
use crate::service::{Ctx, ReplyTo, Service};

/// Adds what it is told; answers its total.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Counter {
    /// The sum so far.
    pub total: u64,
}

/// [`Counter`]'s messages.
#[derive(Debug, Serialize, Deserialize)]
pub enum CounterMsg {
    /// Adds `n`.
    Add(u64),
    /// Answers the total.
    Total(ReplyTo<u64>),
}

impl Service for Counter {
    type Msg = CounterMsg;
    const KIND: &'static str = "counter";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: CounterMsg, ctx: &mut Ctx<Self>) {
        match msg {
            CounterMsg::Add(n) => self.total += n,
            CounterMsg::Total(reply) => {
                let _ = ctx.reply(reply, self.total);
            }
        }
    }
}

/// Two nodes of a fresh cluster, `phone` and `tv`, on loopback, connected, with [`Counter`]
/// registered on both.
pub fn two_nodes() -> Result<(NodeHandle, NodeHandle), Error> {
    let ca = ClusterCa::new()?;
    let any = "127.0.0.1:0"
        .parse()
        .map_err(|e| Error::Config(format!("{e}")))?;
    let phone = Node::start(NodeConfig::new(ca.issue("phone")?, any))?;
    let tv = Node::start(NodeConfig::new(ca.issue("tv")?, any))?;
    for node in [&phone, &tv] {
        node.register::<Counter>().register::<Probe>();
    }
    phone.add_peer("tv", tv.local_addr())?;
    let started = Instant::now();
    while !(phone.is_connected("tv") && tv.is_connected("phone")) {
        if started.elapsed() > Duration::from_secs(10) {
            return Err(Error::Config(
                "phone and tv did not connect within 10 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((phone, tv))
}

/// Waits until `a` and `b` have each heard the other's gossip (its kinds), as placement's
/// plans need: a node plans only for the peers it knows can run a kind.
pub fn gossiped(a: &NodeHandle, b: &NodeHandle) -> Result<(), Error> {
    let knows = |x: &NodeHandle, y: &NodeHandle| {
        x.members()
            .iter()
            .any(|m| m.info.name == *y.name() && !m.info.kinds.is_empty())
    };
    // Registering again gossips at once.
    a.register::<Counter>();
    b.register::<Counter>();
    let started = Instant::now();
    while !(knows(a, b) && knows(b, a)) {
        if started.elapsed() > SECS_10 {
            return Err(Error::Config(
                "the two nodes did not hear each other's gossip within 10 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Runs `f` to its end on an actix system of its own.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    actix_rt::System::new().block_on(f)
}

/// Ten seconds: the examples' bound on an ask.
pub const SECS_10: Duration = Duration::from_secs(10);

/// The work a [`Probe`] runs in its handler.
type Job =
    Box<dyn for<'a> FnOnce(&'a mut Ctx<Probe>) -> Pin<Box<dyn Future<Output = ()> + 'a>> + Send>;

/// A service that runs, in its handler, the code an example gives it through [`inside`] or
/// [`inside_async`]: [`Ctx`]'s examples show each call as a handler of yours makes it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Probe {
    /// Jobs run so far.
    pub runs: u64,
}

/// A [`Probe`]'s message: the job (never sent to another node: it does not serialize).
#[derive(Default, Serialize, Deserialize)]
pub struct ProbeMsg {
    #[serde(skip)]
    job: Option<Job>,
}

impl Service for Probe {
    type Msg = ProbeMsg;
    const KIND: &'static str = "probe";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: ProbeMsg, ctx: &mut Ctx<Self>) {
        self.runs += 1;
        if let Some(job) = msg.job {
            job(ctx).await;
        }
    }
}

/// Runs `f` in the handler of a new [`Probe`] on `node` and gives back what it returns.
pub fn inside<R: Send + 'static>(
    node: &NodeHandle,
    f: impl FnOnce(&mut Ctx<Probe>) -> R + Send + 'static,
) -> Result<R, Error> {
    inside_async(node, move |ctx| {
        let r = f(ctx);
        Box::pin(async move { r })
    })
}

/// Runs the future `f` makes in the handler of a new [`Probe`] on `node` (awaited there, as
/// a handler awaits an ask), and gives back its output.
pub fn inside_async<R, F>(node: &NodeHandle, f: F) -> Result<R, Error>
where
    R: Send + 'static,
    F: for<'a> FnOnce(&'a mut Ctx<Probe>) -> Pin<Box<dyn Future<Output = R> + 'a>> + Send + 'static,
{
    let probe = node.spawn(Probe::default())?;
    let (tx, rx) = std::sync::mpsc::channel();
    let job: Job = Box::new(move |ctx| {
        Box::pin(async move {
            let _ = tx.send(f(ctx).await);
        })
    });
    probe.tell(ProbeMsg { job: Some(job) })?;
    rx.recv_timeout(SECS_10)
        .map_err(|_| Error::Config("the probe did not run its job within 10 s".into()))
}
