//! An assembly tree placed by capability: a player (needs a speaker) with a lyrics child
//! (needs a display) starts on the phone; the phone plans where they fit best, shows why, and
//! moves the whole tree as one unit. Then the phone drains.
//!
//! Run with `cargo run -p tern --example tree_placement`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern::certs::ClusterCa;
use tern::{Ctx, Node, NodeConfig, NodeHandle, PlanOptions, ReplyTo, Service};

/// Plays music: needs a speaker wherever it runs.
#[derive(Default, Serialize, Deserialize)]
struct Player {
    position_s: u64,
}

#[derive(Serialize, Deserialize)]
enum PlayerMsg {
    Tick,
    Position(ReplyTo<u64>),
}

impl Service for Player {
    type Msg = PlayerMsg;
    const KIND: &'static str = "player";
    const VERSION: u32 = 1;
    const REQUIRES: &'static [&'static str] = &["speaker"];

    async fn handle(&mut self, msg: PlayerMsg, ctx: &mut Ctx<Self>) {
        match msg {
            PlayerMsg::Tick => self.position_s += 1,
            PlayerMsg::Position(r) => {
                let _ = ctx.reply(r, self.position_s);
            }
        }
    }
}

/// Shows lyrics: needs a display, and would rather have a big one.
#[derive(Default, Serialize, Deserialize)]
struct Lyrics {
    line: u64,
}

impl Service for Lyrics {
    type Msg = u64;
    const KIND: &'static str = "lyrics";
    const VERSION: u32 = 1;
    const REQUIRES: &'static [&'static str] = &["display"];
    const PREFERS: &'static [&'static str] = &["big-screen"];

    async fn handle(&mut self, line: u64, _: &mut Ctx<Self>) {
        self.line = line;
    }
}

fn start(ca: &ClusterCa, name: &str, caps: &[&str]) -> Result<NodeHandle, tern::Error> {
    let mut cfg = NodeConfig::new(ca.issue(name)?, "127.0.0.1:0".parse().expect("an address"));
    cfg.capabilities = caps.iter().map(|c| c.to_string()).collect();
    let node = Node::start(cfg)?;
    node.register::<Player>().register::<Lyrics>();
    Ok(node)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let ca = ClusterCa::new()?;
    let phone = start(&ca, "phone", &["display", "speaker", "battery"])?;
    let tv = start(&ca, "tv", &["display", "speaker", "big-screen"])?;
    let speaker = start(&ca, "speaker", &["speaker"])?;
    // The phone knows only the tv; the speaker only the tv. Membership does the rest.
    phone.add_peer("tv", tv.local_addr())?;
    speaker.add_peer("tv", tv.local_addr())?;
    while phone.members().len() < 3 {
        std::thread::sleep(Duration::from_millis(100));
    }

    // A tree: the player and its lyrics child, both on the phone.
    let player = phone.spawn(Player::default())?;
    let lyrics = phone.spawn(Lyrics::default())?;
    phone.adopt(player.id(), lyrics.addr())?;
    for m in phone.tree(player.id())? {
        println!("tree: {} ({}) on {}", m.addr.id, m.addr.kind, m.addr.node);
    }

    // Where would they go if the phone were not an option? Nothing moves for a plan.
    let opts = PlanOptions {
        tree: true,
        exclude: vec!["phone".into()],
        ..PlanOptions::default()
    };
    let plan = phone.plan(&[player.id()], &opts)?;
    for m in &plan.moves {
        println!("plan: {} {} -> {}", m.kind, m.from, m.to);
        for r in &m.reasons {
            println!("        {r}");
        }
    }

    actix_rt::System::new().block_on(async {
        // Carry it out: one group migration, all or none.
        let placed = phone.place(&[player.id()], &opts).await?;
        for g in &placed.groups {
            println!(
                "moved {} services as one unit: committed {}, freeze window {} us",
                g.members.len(),
                g.committed,
                g.freeze_us
            );
        }
        player.tell(PlayerMsg::Tick)?;
        let pos = player
            .ask(PlayerMsg::Position, Duration::from_secs(5))
            .await?;
        println!("the player, now on {}, is at {pos} s", player.location());
        Ok::<_, Box<dyn std::error::Error>>(())
    })?;

    phone.shutdown();
    tv.shutdown();
    speaker.shutdown();
    Ok(())
}
