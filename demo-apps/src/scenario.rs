//! The Tern Media scenario, every device in one process on loopback.
//!
//! Everything starts on the phone. The user walks into the living room: the player's tree
//! moves to the tv. The user gets in the car: it moves to the car. The phone's battery runs
//! low: the phone drains to the best devices. The user puts on the watch: it takes the remote.
//! The phone is plugged in and the user plays on it: the player moves back to the phone, and
//! checkpoints to its standby, the car. Then the phone dies without warning: the car takes the
//! player over from its last checkpoint and the music goes on. Commands and position updates
//! flow the whole time; the audit at the end proves nothing was lost, duplicated or reordered.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tern::{
    MigrationReport, NodeHandle, PlaceReport, PlanOptions, PlannedMove, Power, ServiceAddr,
};
use tern_harness::{Cluster, ClusterBuilder};

use crate::app::{MediaApp, Pace};
use crate::media::Audit;

/// The demo's devices and their capabilities.
pub const DEVICES: [(&str, &[&str]); 4] = [
    ("phone", &["display", "speaker", "input", "battery"]),
    ("tv", &["display", "speaker"]),
    ("car", &["display", "speaker", "input"]),
    ("watch", &["display", "input", "small-memory"]),
];

/// How the scenario runs.
#[derive(Debug, Clone, Copy)]
pub struct ScenarioOptions {
    /// Time between two steps, in milliseconds: traffic flows the whole time.
    pub step_gap_ms: u64,
    /// The app's pace.
    pub pace: Pace,
}

impl Default for ScenarioOptions {
    fn default() -> Self {
        ScenarioOptions {
            step_gap_ms: 1_500,
            pace: Pace::default(),
        }
    }
}

/// One service moved (or not) by one step of the scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The scenario step, e.g. `living-room`.
    pub step: String,
    /// The service's name (`player`, `lyrics`, ...).
    pub service: String,
    /// Where it ran.
    pub from: String,
    /// Where it was sent.
    pub to: String,
    /// True when it moved.
    pub committed: bool,
    /// Why it did not move, when it did not.
    pub aborted: Option<String>,
    /// From the freeze at the source until the target handled its next message, in
    /// microseconds.
    pub freeze_us: u64,
    /// Queued messages carried in the snapshot.
    pub carried: u64,
    /// Messages that arrived during the freeze and were forwarded.
    pub forwarded: u64,
    /// Address-book entries rewritten at the source at commit.
    pub rebuilt: u64,
    /// Its epoch after the step.
    pub epoch: u64,
    /// Why placement chose `to`.
    pub reasons: Vec<String>,
}

/// Something that happened, as the timeline prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Moment {
    /// Milliseconds since the app started.
    pub at_ms: u64,
    /// The step's id.
    pub step: String,
    /// What happened, in words.
    pub what: String,
    /// The moves it made.
    pub moves: Vec<Step>,
}

/// The phone's death, as the scenario saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failover {
    /// The device that took the player over.
    pub to: String,
    /// The player's epoch there.
    pub epoch: u64,
    /// From the kill until that device was seen running the player (looked at every 10 ms),
    /// in microseconds.
    pub took_us: u64,
    /// The remote's commands the player had taken when the new copy first answered a status
    /// ask (the audit's count at the end is higher when traffic went on).
    pub commands_at_takeover: u64,
}

/// The whole run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Every move, in order.
    pub steps: Vec<Step>,
    /// Messages sent and never received, over every stream.
    pub lost: u64,
    /// Messages received more than once.
    pub duplicated: u64,
    /// Messages received after a later one of the same sender.
    pub reordered: u64,
    /// Asks that got no answer.
    pub asks_unanswered: u64,
    /// Asks sent.
    pub asks_sent: u64,
    /// Distinct numbered messages received, over every stream.
    pub received: u64,
    /// Per stream.
    pub audit: Audit,
    /// Where each service ended.
    pub placement: Vec<(String, String)>,
    /// The timeline.
    pub timeline: Vec<Moment>,
    /// Milliseconds from start to verdict.
    pub elapsed_ms: u64,
    /// The phone's death and the player's takeover.
    pub failover: Failover,
}

impl Outcome {
    /// True when nothing was lost, duplicated or reordered, every ask was answered and every
    /// move committed.
    pub fn is_clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.reordered == 0
            && self.asks_unanswered == 0
            && self.steps.iter().all(|s| s.committed)
    }
}

/// A cluster builder with the demo's four devices, the Tern Media kinds registered. Each
/// device runs on a socket that can be killed (the phone dies in the scenario); nothing else is
/// injected.
pub fn devices() -> ClusterBuilder {
    DEVICES
        .iter()
        .fold(Cluster::builder(), |b, (name, caps)| b.node(name, caps))
        .admins(&[DASHBOARD])
        .faults(1)
        .setup(crate::media::register)
}

/// The admin certificate's name the in-process demo's dashboard uses; every device lists it.
pub const DASHBOARD: &str = "dashboard";

/// Waits until every node knows every other node's capabilities (placement needs them).
pub fn wait_for_members(cluster: &Cluster, timeout: Duration) -> Result<()> {
    let n = cluster.nodes().len();
    tern_harness::wait_for(timeout, "every device to know the others", || {
        cluster.nodes().iter().all(|node| {
            node.members()
                .iter()
                .filter(|m| !m.info.capabilities.is_empty())
                .count()
                == n
        })
    })
}

/// Turns a move's report and its planned reasons into a [`Step`].
pub fn step_of(app: &MediaApp, step: &str, r: &MigrationReport, plans: &[PlannedMove]) -> Step {
    Step {
        step: step.to_owned(),
        service: app
            .name_of(r.service)
            .map_or_else(|| r.service.to_string(), str::to_owned),
        from: r.from.to_string(),
        to: r.to.to_string(),
        committed: r.committed(),
        aborted: r.aborted.as_ref().map(|a| a.to_string()),
        freeze_us: r.freeze_us,
        carried: r.carried,
        forwarded: r.forwarded,
        rebuilt: r.rebuilt,
        epoch: r.epoch,
        reasons: plans
            .iter()
            .find(|p| p.service == r.service)
            .map(|p| p.reasons.clone())
            .unwrap_or_default(),
    }
}

/// The steps of a `place` call.
fn steps_of_place(app: &MediaApp, step: &str, report: &PlaceReport) -> Vec<Step> {
    report
        .groups
        .iter()
        .flat_map(|g| g.members.iter())
        .map(|r| step_of(app, step, r, &report.plan.moves))
        .collect()
}

/// Moves `id` (with its tree, if `tree`) to `to` through `via`, as step `step`.
async fn place_step(
    app: &MediaApp,
    via: &NodeHandle,
    (id, tree): (tern::ServiceId, bool),
    to: &str,
    step: &str,
) -> Result<Vec<Step>> {
    let opts = PlanOptions {
        to: Some(to.to_owned()),
        tree,
        ..PlanOptions::default()
    };
    let report = via
        .place(&[id], &opts)
        .await
        .with_context(|| format!("step {step}: moving {id} to {to}"))?;
    Ok(steps_of_place(app, step, &report))
}

/// Waits, without blocking the runtime, until `ready` holds (looked at every 10 ms), or fails
/// naming `what` after `timeout`.
async fn until(timeout: Duration, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Where each of the app's services runs now, as `node` knows.
pub fn placement(app: &MediaApp, node: &NodeHandle) -> Vec<(String, String)> {
    app.services()
        .into_iter()
        .map(|(name, addr): (&str, &ServiceAddr)| {
            let at = node
                .location(addr.id)
                .map_or_else(|| addr.node.to_string(), |n| n.to_string());
            (name.to_owned(), at)
        })
        .collect()
}

/// Runs the scenario on `cluster` (the four [`DEVICES`], connected). Calls `on_moment` as each
/// step ends, so a caller can print the timeline as it happens.
pub fn run(
    cluster: &Cluster,
    opts: ScenarioOptions,
    mut on_moment: impl FnMut(&Moment),
) -> Result<(MediaApp, Outcome)> {
    let started = Instant::now();
    let (phone, tv, car) = (
        cluster.node("phone"),
        cluster.node("tv"),
        cluster.node("car"),
    );
    wait_for_members(cluster, Duration::from_secs(10))?;
    let app = MediaApp::spawn(phone, opts.pace)?;
    app.play(phone, opts.pace)?;
    let mut timeline = Vec::new();
    let mut record = |step: &str, what: String, moves: Vec<Step>| {
        let m = Moment {
            at_ms: started.elapsed().as_millis() as u64,
            step: step.to_owned(),
            what,
            moves,
        };
        on_moment(&m);
        timeline.push(m);
    };
    record(
        "start",
        format!(
            "Everything starts on the phone: the player (lyrics as its child), the playlist, \
             the remote and the scrobbler. The remote sends {} commands every {} ms and asks \
             the player's status every {} commands; the player moves on every {} ms and asks the \
             playlist for each next track.",
            opts.pace.burst, opts.pace.command_period_ms, opts.pace.status_every, opts.pace.tick_ms
        ),
        Vec::new(),
    );
    let gap = Duration::from_millis(opts.step_gap_ms);

    let outcome = tern_harness::block_on(async {
        tokio::time::sleep(gap).await;
        let moved = place_step(&app, phone, (app.player.id, true), "tv", "living-room").await?;
        record(
            "living-room",
            "The user walks into the living room and plays on the tv: the player's tree \
             (player and lyrics) moves there as one unit."
                .to_owned(),
            moved,
        );

        tokio::time::sleep(gap).await;
        let moved = place_step(&app, tv, (app.player.id, true), "car", "car").await?;
        record(
            "car",
            "The user gets in the car: the player's tree follows to the car.".to_owned(),
            moved,
        );

        tokio::time::sleep(gap).await;
        phone.set_power(Power::Battery { percent: 8 });
        let deadline = Instant::now() + Duration::from_secs(30);
        let drained = loop {
            if let Some(d) = phone.last_drain() {
                break d;
            }
            if Instant::now() >= deadline {
                bail!("the phone's drain did not end within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut moves: Vec<Step> = drained
            .moved
            .iter()
            .map(|r| step_of(&app, "battery-low", r, &drained.plans))
            .collect();
        for (id, why) in &drained.failed {
            moves.push(Step {
                step: "battery-low".to_owned(),
                service: app
                    .name_of(*id)
                    .map_or_else(|| id.to_string(), str::to_owned),
                from: "phone".to_owned(),
                to: String::new(),
                committed: false,
                aborted: Some(why.clone()),
                freeze_us: 0,
                carried: 0,
                forwarded: 0,
                rebuilt: 0,
                epoch: 0,
                reasons: Vec::new(),
            });
        }
        record(
            "battery-low",
            format!(
                "The phone's battery falls to 8% (at or below {}% a device drains): the phone \
                 stops taking services and each of its services moves to the best device.",
                phone.limits().drain_below_percent
            ),
            moves,
        );

        tokio::time::sleep(gap).await;
        let moved = place_step(&app, car, (app.remote.id, true), "watch", "watch").await?;
        record(
            "watch",
            "The user puts on the watch: the watch takes the remote.".to_owned(),
            moved,
        );

        tokio::time::sleep(gap).await;
        phone.set_power(Power::Plugged);
        until(
            Duration::from_secs(10),
            "the car to hear the phone takes services again",
            || {
                car.members()
                    .iter()
                    .any(|m| m.info.name.as_str() == "phone" && !m.info.draining)
            },
        )
        .await?;
        let moved = place_step(&app, car, (app.player.id, false), "phone", "phone-back").await?;
        let player_id = app.player.id;
        let mut standby = None;
        until(
            Duration::from_secs(10),
            "a standby to hold the player's checkpoint",
            || {
                standby = phone
                    .replica(player_id)
                    .filter(|r| r.acked >= 1)
                    .and_then(|r| r.standby);
                standby.is_some()
            },
        )
        .await?;
        let standby = standby.map_or_else(String::new, |s| s.to_string());
        record(
            "phone-back",
            format!(
                "The phone is plugged in and charges: it takes services again. The user plays \
                 on the phone: the player alone moves there (the lyrics stay on the car's \
                 display). The player is replicated: on the phone it checkpoints its state, \
                 timers, counters and unconfirmed messages to a standby on another device, \
                 the {standby}."
            ),
            moved,
        );

        tokio::time::sleep(gap).await;
        let killed = Instant::now();
        cluster.kill("phone");
        let mut took = None;
        until(
            Duration::from_secs(30),
            "another device to take the player over",
            || {
                took = ["car", "tv", "watch"]
                    .into_iter()
                    .find_map(|n| cluster.node(n).replica(player_id).map(|r| (n, r.epoch)));
                took.is_some()
            },
        )
        .await?;
        let took_us = killed.elapsed().as_micros() as u64;
        let (at, epoch) = took.unwrap_or_default();
        let status = cluster
            .node(at)
            .resolve::<crate::media::Player>(&app.player)?
            .ask(crate::media::PlayerMsg::Status, crate::media::ASK_TIMEOUT)
            .await
            .context("asking the player that took over for its status")?;
        let failover = Failover {
            to: at.to_owned(),
            epoch,
            took_us,
            commands_at_takeover: status.commands,
        };
        record(
            "phone-dies",
            format!(
                "The phone dies without warning: no drain, no goodbye. The {at}, the player's \
                 standby, waits out the phone's lease, wins the vote, and runs the player from \
                 its last checkpoint at epoch {epoch}, {} ms after the phone died; it first \
                 sends again what the phone had sent and not seen confirmed. The remote's \
                 unconfirmed commands follow the player there, and the music goes on.",
                took_us / 1_000
            ),
            vec![Step {
                step: "phone-dies".to_owned(),
                service: "player".to_owned(),
                from: "phone".to_owned(),
                to: at.to_owned(),
                committed: true,
                aborted: None,
                freeze_us: took_us,
                carried: 0,
                forwarded: 0,
                rebuilt: 0,
                epoch,
                reasons: vec![format!(
                    "taken over by its standby from its last checkpoint; freeze_us is from \
                     the phone's death until the {at} was seen running it"
                )],
            }],
        );

        tokio::time::sleep(gap).await;
        let audit = app.finish(car, Duration::from_secs(10)).await?;
        Ok::<_, anyhow::Error>((audit, failover))
    });
    let (audit, failover) = outcome?;
    let total = audit.total();
    let steps: Vec<Step> = timeline.iter().flat_map(|m| m.moves.clone()).collect();
    let outcome = Outcome {
        steps,
        lost: total.lost,
        duplicated: total.duplicated,
        reordered: total.reordered,
        asks_unanswered: audit.asks_unanswered,
        asks_sent: audit.asks_sent,
        received: total.received,
        placement: placement(&app, car),
        audit,
        timeline,
        elapsed_ms: started.elapsed().as_millis() as u64,
        failover,
    };
    Ok((app, outcome))
}
