//! One running Tern Media: where its services are, how to start it and how to audit it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tern::{NodeHandle, ServiceAddr, ServiceId};

use crate::media::{
    Audit, Lyrics, LyricsMsg, Player, PlayerMsg, PlayerTotals, Playlist, PlaylistMsg, Remote,
    RemoteMsg, RemoteTotals, Scrobbler, ScrobblerMsg, ASK_TIMEOUT,
};

/// How fast the app runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Pace {
    /// The player's position timer, in milliseconds.
    pub tick_ms: u64,
    /// Time between two bursts of remote commands, in milliseconds.
    pub command_period_ms: u64,
    /// Commands per burst.
    pub burst: u64,
    /// Commands between two status asks of the remote.
    pub status_every: u64,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            tick_ms: 20,
            command_period_ms: 10,
            burst: 8,
            status_every: 40,
        }
    }
}

/// The addresses of one Tern Media's five services.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MediaApp {
    /// The player (root of the assembly tree).
    pub player: ServiceAddr,
    /// The lyrics, the player's child.
    pub lyrics: ServiceAddr,
    /// The playlist.
    pub playlist: ServiceAddr,
    /// The remote.
    pub remote: ServiceAddr,
    /// The scrobbler.
    pub scrobbler: ServiceAddr,
}

impl MediaApp {
    /// Spawns the five services on `node` and wires their books: the remote holds the
    /// player; the player holds the playlist and the scrobbler, and the lyrics as its child.
    pub fn spawn(node: &NodeHandle, pace: Pace) -> Result<MediaApp> {
        let player = node.spawn(Player::new(pace.tick_ms))?;
        let lyrics = node.spawn(Lyrics::default())?;
        let playlist = node.spawn(Playlist::demo())?;
        let remote = node.spawn(Remote::default())?;
        let scrobbler = node.spawn(Scrobbler::default())?;
        node.adopt(player.id(), lyrics.addr())?;
        node.book_insert(player.addr(), "playlist", playlist.addr())?;
        node.book_insert(player.addr(), "scrobbler", scrobbler.addr())?;
        node.book_insert(remote.addr(), "player", player.addr())?;
        Ok(MediaApp {
            player: player.addr().clone(),
            lyrics: lyrics.addr().clone(),
            playlist: playlist.addr().clone(),
            remote: remote.addr().clone(),
            scrobbler: scrobbler.addr().clone(),
        })
    }

    /// Starts the music and the remote's commands.
    pub fn play(&self, node: &NodeHandle, pace: Pace) -> Result<()> {
        node.resolve::<Player>(&self.player)?
            .tell(PlayerMsg::Play)?;
        node.resolve::<Remote>(&self.remote)?
            .tell(RemoteMsg::Start {
                period_ms: pace.command_period_ms,
                burst: pace.burst,
                status_every: pace.status_every,
            })?;
        Ok(())
    }

    /// The services by name, player first.
    pub fn services(&self) -> [(&'static str, &ServiceAddr); 5] {
        [
            ("player", &self.player),
            ("lyrics", &self.lyrics),
            ("playlist", &self.playlist),
            ("remote", &self.remote),
            ("scrobbler", &self.scrobbler),
        ]
    }

    /// The name of service `id`, if it is one of the app's.
    pub fn name_of(&self, id: ServiceId) -> Option<&'static str> {
        self.services()
            .into_iter()
            .find(|(_, a)| a.id == id)
            .map(|(n, _)| n)
    }

    /// Stops the remote's commands and the player's timer, waits for what is in flight, and
    /// adds up every stream's check. Asks through `node`; waits up to `settle` for the
    /// receivers to see everything their senders sent before counting the rest as lost.
    pub async fn finish(&self, node: &NodeHandle, settle: Duration) -> Result<Audit> {
        let remote = node.resolve::<Remote>(&self.remote)?;
        let player = node.resolve::<Player>(&self.player)?;
        remote.tell(RemoteMsg::Finish)?;
        // The remote's last commands may still be on their way to the player: take the
        // remote's totals (after its Finish) and only then stop the player.
        let _ = remote.ask(RemoteMsg::Totals, ASK_TIMEOUT).await?;
        player.tell(PlayerMsg::Finish)?;
        let started = Instant::now();
        loop {
            let audit = self.audit(node).await?;
            if audit.total().is_clean() || started.elapsed() >= settle {
                return Ok(audit);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads every service's counters once and adds them up against what the senders sent.
    pub async fn audit(&self, node: &NodeHandle) -> Result<Audit> {
        self.read_counters(node, true).await
    }

    /// Like [`audit`](Self::audit) while traffic flows: messages still in flight are not
    /// counted as lost (only gaps a receiver has seen are).
    pub async fn audit_so_far(&self, node: &NodeHandle) -> Result<Audit> {
        self.read_counters(node, false).await
    }

    async fn read_counters(&self, node: &NodeHandle, against_senders: bool) -> Result<Audit> {
        let remote: RemoteTotals = node
            .resolve::<Remote>(&self.remote)?
            .ask(RemoteMsg::Totals, ASK_TIMEOUT)
            .await
            .context("asking the remote for its totals")?;
        let player: PlayerTotals = node
            .resolve::<Player>(&self.player)?
            .ask(PlayerMsg::Totals, ASK_TIMEOUT)
            .await
            .context("asking the player for its totals")?;
        let positions = node
            .resolve::<Lyrics>(&self.lyrics)?
            .ask(LyricsMsg::Report, ASK_TIMEOUT)
            .await
            .context("asking the lyrics for its report")?;
        let asks = node
            .resolve::<Playlist>(&self.playlist)?
            .ask(PlaylistMsg::Report, ASK_TIMEOUT)
            .await
            .context("asking the playlist for its report")?;
        let (played, _) = node
            .resolve::<Scrobbler>(&self.scrobbler)?
            .ask(ScrobblerMsg::Report, ASK_TIMEOUT)
            .await
            .context("asking the scrobbler for its report")?;
        let mut audit = Audit::default();
        let streams = [
            (
                "remote→player",
                "remote",
                remote.commands_sent,
                &player.commands,
            ),
            ("player→lyrics", "player", player.positions_sent, &positions),
            ("player→playlist", "player", player.asks_sent, &asks),
            ("player→scrobbler", "player", player.played_sent, &played),
        ];
        for (name, from, sent, seen) in streams {
            if against_senders {
                audit.stream(name, from, sent, seen);
            } else {
                audit.stream_so_far(name, from, seen);
            }
        }
        audit.asks_sent = remote.asks_sent + player.asks_sent;
        audit.asks_unanswered = remote.asks_unanswered + player.asks_unanswered;
        Ok(audit)
    }
}
