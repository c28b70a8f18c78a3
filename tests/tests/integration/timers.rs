//! Timers: a service sends itself messages later; they fire in due order, not early, can be
//! cancelled, and are bounded per service.

use std::time::{Duration, Instant};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tern::{Ctx, Limits, ReplyTo, Service, TimerId};
use tern_harness::{block_on, wait_until, Cluster};

use crate::common::SECS_10;

#[derive(Default, Serialize, Deserialize)]
struct Clock {
    /// (name, milliseconds from scheduling to firing, milliseconds asked for)
    fired: Vec<(String, u64, u64)>,
    last: Option<TimerId>,
    #[serde(skip)]
    scheduled_at: Vec<(String, Option<Instant>)>,
}

#[derive(Serialize, Deserialize)]
enum ClockMsg {
    Schedule {
        name: String,
        delay_ms: u64,
        reply: ReplyTo<bool>,
    },
    Fire {
        name: String,
        delay_ms: u64,
    },
    CancelLast(ReplyTo<bool>),
    Fired(ReplyTo<Vec<(String, u64, u64)>>),
}

impl Service for Clock {
    type Msg = ClockMsg;
    const KIND: &'static str = "test-clock";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: ClockMsg, ctx: &mut Ctx<Self>) {
        match msg {
            ClockMsg::Schedule {
                name,
                delay_ms,
                reply,
            } => {
                let fire = ClockMsg::Fire {
                    name: name.clone(),
                    delay_ms,
                };
                let ok = match ctx.schedule(Duration::from_millis(delay_ms), fire) {
                    Ok(id) => {
                        self.last = Some(id);
                        self.scheduled_at.push((name, Some(Instant::now())));
                        true
                    }
                    Err(_) => false,
                };
                let _ = ctx.reply(reply, ok);
            }
            ClockMsg::Fire { name, delay_ms } => {
                let since = self
                    .scheduled_at
                    .iter()
                    .find(|(n, _)| *n == name)
                    .and_then(|(_, t)| *t)
                    .map_or(0, |t| t.elapsed().as_millis() as u64);
                self.fired.push((name, since, delay_ms));
            }
            ClockMsg::CancelLast(reply) => {
                let done = self.last.is_some_and(|id| ctx.cancel(id));
                let _ = ctx.reply(reply, done);
            }
            ClockMsg::Fired(reply) => {
                let _ = ctx.reply(reply, self.fired.clone());
            }
        }
    }
}

fn schedule(name: &str, delay_ms: u64) -> impl FnOnce(ReplyTo<bool>) -> ClockMsg {
    let name = name.to_owned();
    move |reply| ClockMsg::Schedule {
        name,
        delay_ms,
        reply,
    }
}

#[test]
fn timers_fire_in_due_order_not_early_and_can_be_cancelled() -> Result<()> {
    let c = Cluster::builder()
        .node("a", &[])
        .setup(|n| {
            n.register::<Clock>();
        })
        .start()?;
    let clock = c.node("a").spawn(Clock::default())?;
    block_on(async {
        for (name, ms) in [("c", 300), ("a", 50), ("b", 150)] {
            assert!(clock.ask(schedule(name, ms), SECS_10).await?);
        }
        // The last one scheduled ("b") is cancelled; a second cancel finds nothing.
        assert!(clock.ask(ClockMsg::CancelLast, SECS_10).await?);
        assert!(!clock.ask(ClockMsg::CancelLast, SECS_10).await?);
        // Two firings: "a" and "c" (were the cancelled "b" to fire, it would come before "c").
        wait_until(SECS_10, "two timers to fire", || async {
            clock
                .ask(ClockMsg::Fired, SECS_10)
                .await
                .is_ok_and(|f| f.len() >= 2)
        })
        .await?;
        let fired = clock.ask(ClockMsg::Fired, SECS_10).await?;
        let names: Vec<&str> = fired.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, vec!["a", "c"]);
        for (name, waited, asked) in &fired {
            assert!(
                waited >= asked,
                "{name} fired after {waited} ms, asked {asked}"
            );
        }
        Ok::<_, anyhow::Error>(())
    })?;
    c.shutdown();
    Ok(())
}

#[test]
fn timers_are_bounded_per_service() -> Result<()> {
    let c = Cluster::builder()
        .node("a", &[])
        .limits(Limits {
            timers_per_service_max: 4,
            ..Limits::default()
        })
        .setup(|n| {
            n.register::<Clock>();
        })
        .start()?;
    let clock = c.node("a").spawn(Clock::default())?;
    block_on(async {
        let mut accepted = 0;
        for i in 0..6 {
            if clock
                .ask(schedule(&format!("t{i}"), 60_000), SECS_10)
                .await?
            {
                accepted += 1;
            }
        }
        assert_eq!(accepted, 4, "the fifth and sixth are refused");
        Ok::<_, anyhow::Error>(())
    })?;
    c.shutdown();
    Ok(())
}
