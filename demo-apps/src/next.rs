//! Tern Media's next version, for rolling updates: version 2 of the player remembers the
//! last tracks it played and reports them in its status. Its messages are version 1's; its
//! state is version 1's player with the history beside it, so a version-1 player moving to a
//! device running this version is upgraded on arrival ([`tern::Service::UPGRADES`]). Every
//! other kind is unchanged.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use tern::{read_older, Ctx, Service, Upgrade};

use crate::media::{self, PlayerMsg};

/// Tracks a version-2 player remembers.
pub const HISTORY_MAX: usize = 8;

/// Registers Tern Media's next version on a node: version 2 of the player (which takes
/// version 1's players too), and the other kinds as they were.
pub fn register(node: &tern::NodeHandle) {
    node.register::<Player>()
        .register::<media::Lyrics>()
        .register::<media::Playlist>()
        .register::<media::Remote>()
        .register::<media::Scrobbler>();
}

/// Version 2 of the player: version 1's, and the last tracks played.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Player {
    player: media::Player,
    history: VecDeque<String>,
}

impl Player {
    /// A stopped player, as [`media::Player::new`].
    pub fn new(tick_ms: u64) -> Self {
        Player {
            player: media::Player::new(tick_ms),
            history: VecDeque::new(),
        }
    }
}

impl Service for Player {
    type Msg = PlayerMsg;
    const KIND: &'static str = "player";
    const VERSION: u32 = 2;
    const REQUIRES: &'static [&'static str] = media::Player::REQUIRES;
    const REPLICAS: u8 = media::Player::REPLICAS;
    const UPGRADES: &'static [Upgrade<Self>] = &[Upgrade {
        from: 1,
        state: |bytes| {
            Ok(Player {
                player: read_older(bytes)?,
                history: VecDeque::new(),
            })
        },
        msg: read_older,
    }];

    async fn handle(&mut self, msg: PlayerMsg, ctx: &mut Ctx<Self>) {
        if let PlayerMsg::Status(reply) = msg {
            let mut status = self.player.status();
            status.history = self.history.iter().cloned().collect();
            let _ = ctx.reply(reply, status);
            return;
        }
        let before = self.player.title().map(str::to_owned);
        self.player.on(msg, ctx).await;
        if let Some(done) = before.filter(|b| Some(b.as_str()) != self.player.title()) {
            if self.history.len() == HISTORY_MAX {
                self.history.pop_front();
            }
            self.history.push_back(done);
        }
    }
}
