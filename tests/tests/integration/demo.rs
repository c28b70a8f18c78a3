//! The Tern Media demo: the scripted scenario end to end, and its checks.

use std::collections::BTreeMap;

use tern_actors::SinkReport;
use tern_demo::media::Audit;
use tern_demo::scenario::{self, ScenarioOptions};

/// The whole scenario, with short gaps between steps: every move commits, the services end
/// where the story says, the player survives the phone's death (its standby on the car takes
/// it over and traffic goes on), and every stream arrives whole, once and in order.
#[test]
fn scenario_moves_everything_and_loses_nothing() -> anyhow::Result<()> {
    let cluster = scenario::devices().start()?;
    cluster.wait_connected(std::time::Duration::from_secs(10))?;
    let opts = ScenarioOptions {
        step_gap_ms: 400,
        ..ScenarioOptions::default()
    };
    let (_app, outcome) = scenario::run(&cluster, opts, |_| {})?;
    cluster.shutdown();

    let moves: Vec<(&str, &str, &str, &str)> = outcome
        .steps
        .iter()
        .map(|s| {
            (
                s.step.as_str(),
                s.service.as_str(),
                s.from.as_str(),
                s.to.as_str(),
            )
        })
        .collect();
    assert!(outcome.steps.iter().all(|s| s.committed), "{moves:?}");
    for expected in [
        ("living-room", "player", "phone", "tv"),
        ("living-room", "lyrics", "phone", "tv"),
        ("car", "player", "tv", "car"),
        ("car", "lyrics", "tv", "car"),
        ("phone-back", "player", "car", "phone"),
        ("phone-dies", "player", "phone", "car"),
    ] {
        assert!(moves.contains(&expected), "{expected:?} not in {moves:?}");
    }
    // The drain places the remote by affinity from gossiped traffic, which can lag a move:
    // it may already have put the remote on the watch, and then the watch step moves nothing.
    let remote_moves: Vec<_> = moves.iter().filter(|m| m.1 == "remote").collect();
    assert!(
        moves.contains(&("watch", "remote", "car", "watch"))
            || remote_moves == [&("battery-low", "remote", "phone", "watch")],
        "{moves:?}"
    );
    // The drain moved the phone's three services, none back to the phone, with reasons.
    let drained: Vec<_> = outcome
        .steps
        .iter()
        .filter(|s| s.step == "battery-low")
        .collect();
    assert_eq!(drained.len(), 3, "{moves:?}");
    assert!(drained.iter().all(|s| s.from == "phone" && s.to != "phone"));
    assert!(drained.iter().all(|s| !s.reasons.is_empty()));
    // Back on the phone, the player moved alone: its child stayed on the car.
    assert_eq!(
        moves.iter().filter(|m| m.0 == "phone-back").count(),
        1,
        "{moves:?}"
    );
    // The phone died with the player on it: the car took it over at a newer epoch, and the
    // remote's commands went on reaching it (the audit below finds none lost).
    let back = outcome
        .steps
        .iter()
        .find(|s| s.step == "phone-back")
        .map(|s| s.epoch)
        .unwrap_or_default();
    assert_eq!(outcome.failover.to, "car");
    assert!(outcome.failover.epoch > back, "{:?}", outcome.failover);
    let commands = outcome.audit.streams["remote→player"].received;
    assert!(
        commands > outcome.failover.commands_at_takeover,
        "{commands} commands in all, {} when the car took over",
        outcome.failover.commands_at_takeover
    );
    let ended: BTreeMap<_, _> = outcome.placement.iter().cloned().collect();
    assert_eq!(ended["player"], "car");
    assert_eq!(ended["lyrics"], "car");
    assert_eq!(ended["remote"], "watch");
    assert!(ended.values().all(|n| n != "phone"), "{ended:?}");

    // Every stream carried traffic through the moves, and the checks found nothing wrong.
    assert_eq!(outcome.audit.streams.len(), 4);
    for (stream, v) in &outcome.audit.streams {
        assert!(v.received > 0, "{stream}: nothing received");
    }
    assert!(outcome.asks_sent > 0);
    assert_eq!(
        (
            outcome.lost,
            outcome.duplicated,
            outcome.reordered,
            outcome.asks_unanswered
        ),
        (0, 0, 0, 0),
        "{:?}",
        outcome.audit
    );
    assert!(outcome.is_clean());
    // The JSON the demo prints has the keys its users read.
    let json = serde_json::to_value(&outcome)?;
    for key in [
        "steps",
        "lost",
        "duplicated",
        "reordered",
        "asks_unanswered",
    ] {
        assert!(json.get(key).is_some(), "{key}");
    }
    for key in [
        "service",
        "from",
        "to",
        "freeze_us",
        "carried",
        "forwarded",
        "rebuilt",
    ] {
        assert!(json["steps"][0].get(key).is_some(), "steps[0].{key}");
    }
    Ok(())
}

/// The audit is not a formality: a missing number is lost, a repeated one duplicated, a
/// late one reordered, an unanswered ask counted, and the outcome is then not clean.
#[test]
fn audit_catches_loss_duplication_and_reordering() {
    let mut seen = SinkReport::default();
    for n in [1, 2, 4, 3, 5, 5, 7] {
        seen.record("remote", n);
    }
    let mut audit = Audit::default();
    audit.stream("remote→player", "remote", 8, &seen);
    let v = audit.total();
    // 6 and 8 never came; 3 came after 4; 5 came twice.
    assert_eq!(
        (v.lost, v.duplicated, v.reordered, v.received),
        (2, 1, 1, 6)
    );
    assert!(!audit.is_clean());
    let mut clean = SinkReport::default();
    (1..=3).for_each(|n| clean.record("player", n));
    let mut audit = Audit::default();
    audit.stream("player→lyrics", "player", 3, &clean);
    assert!(audit.is_clean());
    audit.asks_unanswered = 1;
    assert!(!audit.is_clean());
}

/// The player's status, asked through `via`.
fn status_via(
    cluster: &tern_harness::Cluster,
    app: &tern_demo::app::MediaApp,
    via: &str,
) -> anyhow::Result<tern_demo::media::PlayerStatus> {
    use tern_demo::media::{Player, PlayerMsg, ASK_TIMEOUT};
    let player = cluster.node(via).resolve::<Player>(&app.player)?;
    Ok(tern_harness::block_on(
        player.ask(PlayerMsg::Status, ASK_TIMEOUT),
    )?)
}

/// Waits until the music goes on: the position or the track moves, and the remote's
/// commands keep arriving.
fn still_plays(
    cluster: &tern_harness::Cluster,
    app: &tern_demo::app::MediaApp,
    via: &str,
) -> anyhow::Result<()> {
    let before = status_via(cluster, app, via)?;
    tern_harness::wait_for(
        std::time::Duration::from_secs(20),
        "the music to go on",
        || {
            status_via(cluster, app, via).is_ok_and(|now| {
                (now.position_ms != before.position_ms || now.track != before.track)
                    && now.commands > before.commands
            })
        },
    )
}

/// A rolling update of Tern Media across the three devices with a speaker, while it plays:
/// each device in turn is drained and restarted with the app's next version (version 2 of the
/// player); the player moves to an updated device, is upgraded there on arrival and goes on
/// with its state (position, volume, the commands it counted) and a version-2 feature (the
/// tracks it played); it is never moved back to a device still on version 1; and every
/// stream arrives whole, once and in order.
#[test]
fn a_rolling_update_moves_the_player_to_its_next_version_while_it_plays() -> anyhow::Result<()> {
    use std::time::Duration;
    use tern_demo::app::{MediaApp, Pace};
    let devices = ["phone", "tv", "car"];
    let mut cluster = scenario::DEVICES
        .iter()
        .filter(|(name, _)| devices.contains(name))
        .fold(tern_harness::Cluster::builder(), |b, (name, caps)| {
            b.node(name, caps)
        })
        .setup(tern_demo::media::register)
        .start()?;
    cluster.wait_connected(Duration::from_secs(10))?;
    scenario::wait_for_members(&cluster, Duration::from_secs(10))?;
    let pace = Pace::default();
    let app = MediaApp::spawn(cluster.node("phone"), pace)?;
    app.play(cluster.node("phone"), pace)?;
    still_plays(&cluster, &app, "phone")?;

    // The tv and the car first: nothing of the app runs there (the player's standby may).
    for device in ["tv", "car"] {
        let report = tern_harness::block_on(cluster.node(device).drain());
        assert!(report.failed.is_empty(), "{report:?}");
        cluster.restart_updated(device, tern_demo::next::register)?;
        cluster.wait_connected(Duration::from_secs(10))?;
        scenario::wait_for_members(&cluster, Duration::from_secs(10))?;
        still_plays(&cluster, &app, "phone")?;
    }
    // Both updated devices say they run player@2 and read version 1's.
    let phone = cluster.node("phone");
    tern_harness::wait_for(
        Duration::from_secs(10),
        "gossip of the updated kinds",
        || {
            phone
                .members()
                .iter()
                .filter(|m| {
                    m.info
                        .kinds
                        .iter()
                        .any(|k| k.kind.to_string() == "player@2" && k.reads == [1])
                })
                .count()
                == 2
        },
    )?;
    // The user moves the player to the tv (placement alone would keep it with the services
    // it talks to, all on the phone).
    let to = tern::NodeName::new("tv");
    let before = status_via(&cluster, &app, "phone")?;
    let report = tern_harness::block_on(phone.migrate(
        app.player.id,
        to.as_str(),
        tern::MigrateOptions::default(),
    ))?;
    assert!(report.committed(), "{report:?}");
    let upgraded = cluster
        .node(to.as_str())
        .services()
        .into_iter()
        .find(|s| s.addr.id == app.player.id)
        .expect("the player runs on the updated device");
    assert_eq!(upgraded.addr.kind.to_string(), "player@2");
    // Its state came along: the commands it counted, and it plays on, now remembering tracks.
    let after = status_via(&cluster, &app, "phone")?;
    assert!(
        after.commands >= before.commands,
        "{before:?} then {after:?}"
    );
    still_plays(&cluster, &app, "phone")?;
    tern_harness::wait_for(Duration::from_secs(20), "a track in the history", || {
        status_via(&cluster, &app, "phone").is_ok_and(|s| !s.history.is_empty())
    })?;
    // Never back to the phone while it runs version 1.
    let back = tern_harness::block_on(cluster.node(to.as_str()).migrate(
        app.player.id,
        "phone",
        tern::MigrateOptions::default(),
    ));
    let err = back
        .expect_err("version 1 cannot take player@2")
        .to_string();
    assert!(err.contains("older than player@2"), "{err}");

    // Last, the phone: its services move to the updated devices, then it is updated too.
    let report = tern_harness::block_on(cluster.node("phone").drain());
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(!report.moved.is_empty(), "{report:?}");
    let via = to.as_str().to_owned();
    cluster.restart_updated("phone", tern_demo::next::register)?;
    cluster.wait_connected(Duration::from_secs(10))?;
    scenario::wait_for_members(&cluster, Duration::from_secs(10))?;
    still_plays(&cluster, &app, &via)?;

    let audit = tern_harness::block_on(app.finish(cluster.node(&via), Duration::from_secs(20)))?;
    cluster.shutdown();
    for (stream, v) in &audit.streams {
        assert!(v.received > 0, "{stream}: nothing received");
    }
    assert!(audit.is_clean(), "{audit:?}");
    Ok(())
}
