//! Tern Media: the demo application's services.
//!
//! ```text
//!   remote ──Command──▶ player ──Position──▶ lyrics      (lyrics is the player's child)
//!                         │ ──ask Next───▶ playlist
//!                         └──Played──────▶ scrobbler
//! ```
//!
//! Every stream is numbered by its sender in the message itself, and every receiver checks
//! the numbers it gets with a [`SinkReport`] kept in its state, so the check travels with the
//! service when it migrates. [`Audit`] adds the receivers' reports up against what the senders
//! say they sent.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern::{Ctx, ReplyTo, Service};
use tern_actors::{SinkReport, Verdict};

/// How long a service waits for an answer before counting the ask as unanswered.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(10);
/// Played tracks a scrobbler keeps (it counts them all).
const SCROBBLES_KEPT: usize = 32;

/// Registers every Tern Media kind on a node.
pub fn register(node: &tern::NodeHandle) {
    node.register::<Player>()
        .register::<Lyrics>()
        .register::<Playlist>()
        .register::<Remote>()
        .register::<Scrobbler>();
}

/// One track.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Track {
    /// Title.
    pub title: String,
    /// Length in milliseconds.
    pub length_ms: u64,
}

/// A user command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// One step louder.
    VolumeUp,
    /// One step quieter.
    VolumeDown,
    /// Skip to the next track.
    Next,
}

/// What the player says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlayerStatus {
    /// The track playing.
    pub track: Option<String>,
    /// Position in the track, in milliseconds.
    pub position_ms: u64,
    /// Volume, 0 to 100.
    pub volume: u8,
    /// Commands taken.
    pub commands: u64,
    /// The last tracks played, oldest first (kept from the app's next version on: see
    /// [`crate::next`]; empty before).
    #[serde(default)]
    pub history: Vec<String>,
}

/// Messages of [`Player`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PlayerMsg {
    /// Starts playing: fetches the first track and starts the position timer.
    Play,
    /// The position timer.
    Tick,
    /// A numbered command from a remote.
    Command {
        /// The remote's number for it, from 1.
        n: u64,
        /// What to do.
        cmd: Command,
    },
    /// Asks for the status.
    Status(ReplyTo<PlayerStatus>),
    /// Stops the timer (the end of the demo).
    Finish,
    /// What the player sent and received so far.
    Totals(ReplyTo<PlayerTotals>),
}

/// What the player sent and received, for the audit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlayerTotals {
    /// Position updates sent to the lyrics.
    pub positions_sent: u64,
    /// Played records sent to the scrobbler.
    pub played_sent: u64,
    /// `Next` asks sent to the playlist.
    pub asks_sent: u64,
    /// Of those, the ones that got no answer.
    pub asks_unanswered: u64,
    /// The remote's commands, checked.
    pub commands: SinkReport,
}

/// Plays music: keeps the track, the position and the volume, advances the position with a
/// timer and tells its child, the lyrics, where it is. Needs a speaker. Replicated: its device
/// can die and the music goes on from its standby's checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Player {
    track: Option<Track>,
    position_ms: u64,
    volume: u8,
    tick_ms: u64,
    playing: bool,
    totals: PlayerTotals,
}

impl Player {
    /// A stopped player whose position advances every `tick_ms` once playing.
    pub fn new(tick_ms: u64) -> Self {
        Player {
            track: None,
            position_ms: 0,
            volume: 50,
            tick_ms: tick_ms.max(1),
            playing: false,
            totals: PlayerTotals::default(),
        }
    }

    /// The track playing.
    pub fn title(&self) -> Option<&str> {
        self.track.as_ref().map(|t| t.title.as_str())
    }

    /// What the player says about itself.
    pub fn status(&self) -> PlayerStatus {
        PlayerStatus {
            track: self.title().map(str::to_owned),
            position_ms: self.position_ms,
            volume: self.volume,
            commands: self.totals.commands.received(),
            history: Vec::new(),
        }
    }

    /// Asks the playlist for the next track; a missing answer is counted, and the player
    /// keeps the track it had.
    async fn next_track<S: Service<Msg = PlayerMsg>>(&mut self, ctx: &mut Ctx<S>) {
        if let Some(done) = self.track.take() {
            self.totals.played_sent += 1;
            let n = self.totals.played_sent;
            let played = ScrobblerMsg::Played {
                n,
                title: done.title.clone(),
            };
            if ctx.tell_role::<Scrobbler>("scrobbler", played).is_err() {
                tracing::warn!("player: scrobbler unreachable");
            }
            self.track = Some(done);
        }
        self.totals.asks_sent += 1;
        let n = self.totals.asks_sent;
        let answer =
            ask_role::<S, Playlist, _>(ctx, "playlist", |reply| PlaylistMsg::Next { n, reply })
                .await;
        match answer {
            Ok(track) => {
                self.track = Some(track);
                self.position_ms = 0;
            }
            Err(e) => {
                tracing::warn!(error = %e, "player: no next track");
                self.totals.asks_unanswered += 1;
            }
        }
    }
}

impl Service for Player {
    type Msg = PlayerMsg;
    const KIND: &'static str = "player";
    const VERSION: u32 = 1;
    const REQUIRES: &'static [&'static str] = &["speaker"];
    /// A standby on another device holds its latest checkpoint: the music survives the
    /// device it plays on.
    const REPLICAS: u8 = 1;

    async fn handle(&mut self, msg: PlayerMsg, ctx: &mut Ctx<Self>) {
        self.on(msg, ctx).await
    }
}

impl Player {
    /// Handles one message, for this version of the kind or a later one whose messages are
    /// the same ([`crate::next::Player`]).
    pub async fn on<S: Service<Msg = PlayerMsg>>(&mut self, msg: PlayerMsg, ctx: &mut Ctx<S>) {
        match msg {
            PlayerMsg::Play => {
                if !self.playing {
                    self.playing = true;
                    self.next_track(ctx).await;
                    let _ = ctx.schedule(Duration::from_millis(self.tick_ms), PlayerMsg::Tick);
                }
            }
            PlayerMsg::Tick => {
                if !self.playing {
                    return;
                }
                self.position_ms += self.tick_ms;
                let length = self.track.as_ref().map_or(0, |t| t.length_ms);
                if self.position_ms >= length {
                    self.next_track(ctx).await;
                }
                self.totals.positions_sent += 1;
                let position = LyricsMsg::Position {
                    n: self.totals.positions_sent,
                    title: self.track.as_ref().map(|t| t.title.clone()),
                    position_ms: self.position_ms,
                };
                if ctx
                    .tell_role::<Lyrics>(&lyrics_role(ctx), position)
                    .is_err()
                {
                    tracing::warn!("player: lyrics unreachable");
                }
                let _ = ctx.schedule(Duration::from_millis(self.tick_ms), PlayerMsg::Tick);
            }
            PlayerMsg::Command { n, cmd } => {
                self.totals.commands.record("remote", n);
                match cmd {
                    Command::VolumeUp => self.volume = self.volume.saturating_add(1).min(100),
                    Command::VolumeDown => self.volume = self.volume.saturating_sub(1),
                    Command::Next => self.next_track(ctx).await,
                }
            }
            PlayerMsg::Status(reply) => {
                let _ = ctx.reply(reply, self.status());
            }
            PlayerMsg::Finish => self.playing = false,
            PlayerMsg::Totals(reply) => {
                let _ = ctx.reply(reply, self.totals.clone());
            }
        }
    }
}

/// Asks the service `ctx`'s service holds under `role`, within [`ASK_TIMEOUT`]; any failure
/// (no such role, no answer) comes back in words, for the asker to count.
async fn ask_role<S: Service, T: Service, R: serde::de::DeserializeOwned + Send + 'static>(
    ctx: &mut Ctx<S>,
    role: &str,
    make: impl FnOnce(ReplyTo<R>) -> T::Msg,
) -> Result<R, String> {
    let target = ctx.book_ref::<T>(role).map_err(|e| e.to_string())?;
    ctx.ask(&target, make, ASK_TIMEOUT)
        .await
        .map_err(|e| e.to_string())
}

/// The book role under which a player holds its lyrics: its one child.
fn lyrics_role<S: Service>(ctx: &Ctx<S>) -> String {
    ctx.book()
        .into_iter()
        .find(|(role, addr)| {
            role.starts_with(tern::CHILD_ROLE_PREFIX) && addr.kind.name == "lyrics"
        })
        .map(|(role, _)| role)
        .unwrap_or_else(|| "lyrics".to_owned())
}

/// Messages of [`Lyrics`].
#[derive(Debug, Serialize, Deserialize)]
pub enum LyricsMsg {
    /// Where the player is.
    Position {
        /// The player's number for it, from 1.
        n: u64,
        /// The track.
        title: Option<String>,
        /// Position in the track, in milliseconds.
        position_ms: u64,
    },
    /// The positions seen, checked.
    Report(ReplyTo<SinkReport>),
}

/// Shows the line of the song at the player's position. Needs a display; a child of the
/// player in the assembly tree.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Lyrics {
    title: Option<String>,
    line: u64,
    positions: SinkReport,
}

impl Service for Lyrics {
    type Msg = LyricsMsg;
    const KIND: &'static str = "lyrics";
    const VERSION: u32 = 1;
    const REQUIRES: &'static [&'static str] = &["display"];

    async fn handle(&mut self, msg: LyricsMsg, ctx: &mut Ctx<Self>) {
        match msg {
            LyricsMsg::Position {
                n,
                title,
                position_ms,
            } => {
                self.positions.record("player", n);
                self.title = title;
                self.line = position_ms / 2_000;
            }
            LyricsMsg::Report(reply) => {
                let _ = ctx.reply(reply, self.positions.clone());
            }
        }
    }
}

/// Messages of [`Playlist`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PlaylistMsg {
    /// The player's numbered ask for the next track.
    Next {
        /// The player's number for it, from 1.
        n: u64,
        /// Where the track goes.
        reply: ReplyTo<Track>,
    },
    /// The asks seen, checked.
    Report(ReplyTo<SinkReport>),
}

/// The queue of tracks; it starts again at the top when it runs out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Playlist {
    tracks: Vec<Track>,
    next: usize,
    asks: SinkReport,
}

impl Playlist {
    /// A playlist of `tracks` (at least one is needed to play).
    pub fn new(tracks: Vec<Track>) -> Self {
        Playlist {
            tracks,
            next: 0,
            asks: SinkReport::default(),
        }
    }

    /// The demo's playlist: short tracks, so a few are played in a run.
    pub fn demo() -> Self {
        let titles = [
            ("Harbour Lights", 1_900),
            ("Long Way North", 2_300),
            ("Tern Over Water", 1_700),
            ("Salt and Signal", 2_100),
            ("Migration Song", 2_500),
        ];
        Playlist::new(
            titles
                .iter()
                .map(|&(t, ms)| Track {
                    title: t.to_owned(),
                    length_ms: ms,
                })
                .collect(),
        )
    }
}

impl Service for Playlist {
    type Msg = PlaylistMsg;
    const KIND: &'static str = "playlist";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: PlaylistMsg, ctx: &mut Ctx<Self>) {
        match msg {
            PlaylistMsg::Next { n, reply } => {
                self.asks.record("player", n);
                let track = if self.tracks.is_empty() {
                    Track {
                        title: "silence".to_owned(),
                        length_ms: 60_000,
                    }
                } else {
                    let t = self.tracks[self.next % self.tracks.len()].clone();
                    self.next = (self.next + 1) % self.tracks.len();
                    t
                };
                let _ = ctx.reply(reply, track);
            }
            PlaylistMsg::Report(reply) => {
                let _ = ctx.reply(reply, self.asks.clone());
            }
        }
    }
}

/// Messages of [`Remote`].
#[derive(Debug, Serialize, Deserialize)]
pub enum RemoteMsg {
    /// Starts sending `burst` commands every `period_ms`, and asking the player's status
    /// every `status_every`th command.
    Start {
        /// Time between bursts of commands, in milliseconds.
        period_ms: u64,
        /// Commands per burst (a user holding the volume key).
        burst: u64,
        /// Commands between two status asks (0: never ask).
        status_every: u64,
    },
    /// The command timer.
    Tick,
    /// Stops sending.
    Finish,
    /// What the remote sent so far.
    Totals(ReplyTo<RemoteTotals>),
}

/// What a remote sent, for the audit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteTotals {
    /// Commands sent to the player.
    pub commands_sent: u64,
    /// Status asks sent.
    pub asks_sent: u64,
    /// Of those, the ones that got no answer.
    pub asks_unanswered: u64,
    /// The last status the player gave.
    pub last_status: Option<PlayerStatus>,
}

/// The user's commands to the player. Needs an input.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Remote {
    period_ms: u64,
    burst: u64,
    status_every: u64,
    sending: bool,
    totals: RemoteTotals,
}

impl Service for Remote {
    type Msg = RemoteMsg;
    const KIND: &'static str = "remote";
    const VERSION: u32 = 1;
    const REQUIRES: &'static [&'static str] = &["input"];

    async fn handle(&mut self, msg: RemoteMsg, ctx: &mut Ctx<Self>) {
        match msg {
            RemoteMsg::Start {
                period_ms,
                burst,
                status_every,
            } => {
                self.period_ms = period_ms.max(1);
                self.burst = burst.max(1);
                self.status_every = status_every;
                if !self.sending {
                    self.sending = true;
                    let _ = ctx.schedule(Duration::from_millis(self.period_ms), RemoteMsg::Tick);
                }
            }
            RemoteMsg::Tick => {
                if !self.sending {
                    return;
                }
                let mut ask = false;
                for _ in 0..self.burst {
                    self.totals.commands_sent += 1;
                    let n = self.totals.commands_sent;
                    // Mostly volume, now and then a skip.
                    let cmd = match n % 97 {
                        0 => Command::Next,
                        k if k % 2 == 0 => Command::VolumeUp,
                        _ => Command::VolumeDown,
                    };
                    let msg = PlayerMsg::Command { n, cmd };
                    if let Err(e) = ctx.tell_role::<Player>("player", msg) {
                        tracing::warn!(error = %e, "remote: command not sent");
                    }
                    ask |= self.status_every > 0 && n % self.status_every == 0;
                }
                if ask {
                    self.totals.asks_sent += 1;
                    let status =
                        ask_role::<Self, Player, _>(ctx, "player", PlayerMsg::Status).await;
                    match status {
                        Ok(s) => self.totals.last_status = Some(s),
                        Err(e) => {
                            tracing::warn!(error = %e, "remote: status unanswered");
                            self.totals.asks_unanswered += 1;
                        }
                    }
                }
                let _ = ctx.schedule(Duration::from_millis(self.period_ms), RemoteMsg::Tick);
            }
            RemoteMsg::Finish => self.sending = false,
            RemoteMsg::Totals(reply) => {
                let _ = ctx.reply(reply, self.totals.clone());
            }
        }
    }
}

/// Messages of [`Scrobbler`].
#[derive(Debug, Serialize, Deserialize)]
pub enum ScrobblerMsg {
    /// A track the player finished or skipped.
    Played {
        /// The player's number for it, from 1.
        n: u64,
        /// The track.
        title: String,
    },
    /// The records seen, checked, and the last few titles.
    Report(ReplyTo<(SinkReport, Vec<String>)>),
}

/// Records what was played.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Scrobbler {
    recent: VecDeque<String>,
    played: SinkReport,
}

impl Service for Scrobbler {
    type Msg = ScrobblerMsg;
    const KIND: &'static str = "scrobbler";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: ScrobblerMsg, ctx: &mut Ctx<Self>) {
        match msg {
            ScrobblerMsg::Played { n, title } => {
                self.played.record("player", n);
                if self.recent.len() == SCROBBLES_KEPT {
                    self.recent.pop_front();
                }
                self.recent.push_back(title);
            }
            ScrobblerMsg::Report(reply) => {
                let recent = self.recent.iter().cloned().collect();
                let _ = ctx.reply(reply, (self.played.clone(), recent));
            }
        }
    }
}

/// Every stream's check, added up: what the senders sent against what the receivers saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// Per stream (`remote→player`, `player→lyrics`, ...): the verdict.
    pub streams: BTreeMap<String, Verdict>,
    /// Asks that got no answer (the player's `Next`, the remote's `Status`).
    pub asks_unanswered: u64,
    /// Asks sent.
    pub asks_sent: u64,
}

impl Audit {
    /// Adds one stream: `sent` numbered messages, checked by `seen` under sender `from`.
    pub fn stream(&mut self, name: &str, from: &str, sent: u64, seen: &SinkReport) {
        let sent_by = BTreeMap::from([(from.to_owned(), sent)]);
        self.streams.insert(name.to_owned(), seen.verdict(&sent_by));
    }

    /// Adds one stream as far as its receiver can tell while traffic flows: every number below
    /// the highest it has seen counts as sent (numbers still in flight are not counted yet).
    pub fn stream_so_far(&mut self, name: &str, from: &str, seen: &SinkReport) {
        let sent = seen
            .senders
            .get(from)
            .map_or(0, |r| r.next.saturating_sub(1));
        self.stream(name, from, sent, seen);
    }

    /// The sum over every stream.
    pub fn total(&self) -> Verdict {
        let mut t = Verdict::default();
        for v in self.streams.values() {
            t.lost += v.lost;
            t.duplicated += v.duplicated;
            t.reordered += v.reordered;
            t.received += v.received;
        }
        t
    }

    /// True when nothing was lost, duplicated or reordered and every ask was answered.
    pub fn is_clean(&self) -> bool {
        self.total().is_clean() && self.asks_unanswered == 0
    }
}
