//! Driving a cluster from outside, as the `tern` command line does: an admin certificate from
//! the cluster CA, an admin connection to one node, the services of every node, and a
//! migration with its report.
//!
//! Run with `cargo run -p tern --example admin`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern::admin::{survey, AdminClient, AdminReply, AdminRequest};
use tern::certs::{ClusterCa, Role};
use tern::{Ctx, Node, NodeConfig, Service};

/// A service that counts what it is told.
#[derive(Default, Serialize, Deserialize)]
struct Counter {
    total: u64,
}

impl Service for Counter {
    type Msg = u64;
    const KIND: &'static str = "counter";
    const VERSION: u32 = 1;

    async fn handle(&mut self, n: u64, _: &mut Ctx<Self>) {
        self.total += n;
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ca = ClusterCa::new()?;
    // Admin access is closed by default: each node names the admin certificates it lets in.
    let start = |name: &str| -> Result<tern::NodeHandle, tern::Error> {
        let mut cfg = NodeConfig::new(ca.issue(name)?, "127.0.0.1:0".parse().expect("an address"));
        cfg.admins = vec!["admin".into()];
        Node::start(cfg)
    };
    let phone = start("phone")?;
    let tv = start("tv")?;
    for node in [&phone, &tv] {
        node.register::<Counter>();
    }
    phone.add_peer("tv", tv.local_addr())?;
    let counter = phone.spawn(Counter::default())?;
    counter.tell(42)?;

    // An admin holds an admin certificate from the cluster CA, under a name the nodes list.
    let admin = ca.issue_role("admin", Role::Admin)?;
    let phone_addr = phone.local_addr();
    actix_rt::System::new().block_on(async {
        let client = AdminClient::connect(phone_addr, &admin).await?;
        // Wait until the phone knows the tv (membership comes by gossip).
        for _ in 0..100 {
            if let AdminReply::Nodes(nodes) = client.request(&AdminRequest::Nodes, |_| {}).await? {
                if nodes.len() == 2 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let cluster = survey(&client, &admin).await?;
        for s in &cluster.services {
            println!(
                "{} {} on {} (epoch {})",
                s.info.addr.kind, s.info.addr.id, s.node, s.info.epoch
            );
        }
        let found = cluster.find("counter")?;
        let req = AdminRequest::Migrate {
            service: found.info.addr.id,
            to: "tv".into(),
            tree: false,
        };
        let reply = client
            .request(&req, |progress| println!("  {progress}"))
            .await?;
        if let AdminReply::Migrated(report) = reply {
            let r = &report.members[0];
            println!(
                "moved to {}: committed {}, epoch {}, freeze {} us",
                r.to, report.committed, r.epoch, r.freeze_us
            );
        }
        client.close().await;
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;
    phone.shutdown();
    tv.shutdown();
    Ok(())
}
