use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern::{Ctx, ReplyTo, Service};

/// Talks to the service in its book under `"peer"` every `every_ms` (a steady, synthetic
/// affinity), and counts what it hears. Placement tests and the rebalancer benchmark use it.
///
/// ```no_run
/// # fn f(phone: &tern::NodeHandle, tv: &tern::NodeHandle) -> Result<(), tern::Error> {
/// use tern_actors::{Chatter, ChatterMsg};
/// let x = phone.spawn(Chatter::new(10))?;
/// let y = tv.spawn(Chatter::new(10))?;
/// phone.book_insert(x.addr(), "peer", y.addr())?;
/// tv.book_insert(y.addr(), "peer", x.addr())?;
/// x.tell(ChatterMsg::Start)?;
/// y.tell(ChatterMsg::Start)?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Chatter {
    every_ms: u64,
    sent: u64,
    heard: u64,
    started: bool,
}

impl Chatter {
    /// A chatter that will ping its peer every `every_ms` once started.
    pub fn new(every_ms: u64) -> Self {
        Chatter {
            every_ms: every_ms.max(1),
            ..Chatter::default()
        }
    }
}

/// Messages of [`Chatter`].
#[derive(Debug, Serialize, Deserialize)]
pub enum ChatterMsg {
    /// Start pinging (a second start changes nothing).
    Start,
    /// The timer: ping the peer, schedule the next.
    Tick,
    /// A ping from the peer.
    Ping,
    /// Answers (pings sent, pings heard).
    Counts(ReplyTo<(u64, u64)>),
}

impl Service for Chatter {
    type Msg = ChatterMsg;
    const KIND: &'static str = "chatter";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: ChatterMsg, ctx: &mut Ctx<Self>) {
        match msg {
            ChatterMsg::Start => {
                if !self.started {
                    self.started = true;
                    let _ = ctx.schedule(Duration::from_millis(self.every_ms), ChatterMsg::Tick);
                }
            }
            ChatterMsg::Tick => {
                if let Ok(peer) = ctx.book_ref::<Chatter>("peer") {
                    if ctx.tell(&peer, ChatterMsg::Ping).is_ok() {
                        self.sent += 1;
                    }
                }
                let _ = ctx.schedule(Duration::from_millis(self.every_ms), ChatterMsg::Tick);
            }
            ChatterMsg::Ping => self.heard += 1,
            ChatterMsg::Counts(r) => {
                let _ = ctx.reply(r, (self.sent, self.heard));
            }
        }
    }
}
