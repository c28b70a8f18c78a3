//! What the API's doc examples share, so that each shows its call and not its setup: a counter
//! service and two connected nodes. Hidden from the documentation; not part of the API.

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
    phone.register::<Counter>();
    tv.register::<Counter>();
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

/// Runs `f` to its end on an actix system of its own.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    actix_rt::System::new().block_on(f)
}
