//! Two nodes in one process, a service on one, asked and told from the other.
//!
//! Run with `cargo run -p tern --example two_nodes`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern::certs::ClusterCa;
use tern::{Ctx, Node, NodeConfig, ReplyTo, Service, ServiceRef};

/// A service is a plain struct: its fields are its state.
#[derive(Default, Serialize, Deserialize)]
struct Counter {
    total: u64,
}

/// Its messages are a serializable enum. A request carries a reply handle.
#[derive(Serialize, Deserialize)]
enum CounterMsg {
    Add(u64),
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // One CA for the cluster; each node gets a certificate naming it.
    let ca = ClusterCa::new()?;
    let phone = Node::start(NodeConfig::new(ca.issue("phone")?, "127.0.0.1:0".parse()?))?;
    let tv = Node::start(NodeConfig::new(ca.issue("tv")?, "127.0.0.1:0".parse()?))?;
    // Every node that may run a kind registers it.
    phone.register::<Counter>();
    tv.register::<Counter>();
    phone.add_peer("tv", tv.local_addr())?;

    // The counter runs on the tv; the phone gets a handle to it from its address.
    let on_tv = tv.spawn(Counter::default())?;
    let from_phone: ServiceRef<Counter> = phone.resolve(on_tv.addr())?;

    let total = actix_rt::System::new().block_on(async {
        for n in 1..=100 {
            // Same call whether the service is local or remote; waits if the mailbox is full.
            from_phone.tell_wait(CounterMsg::Add(n)).await?;
        }
        from_phone
            .ask(CounterMsg::Total, Duration::from_secs(5))
            .await
            .map_err(Box::<dyn std::error::Error>::from)
    })?;
    println!("the counter on the tv says {total}");
    assert_eq!(total, 5050);
    phone.shutdown();
    tv.shutdown();
    Ok(())
}
