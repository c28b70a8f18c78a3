//! Deterministic simulation of the protocol core: thousands of seeded runs with random delay,
//! loss, reordering and duplication of protocol messages, random migrations and refusals.
//!
//! `TERN_SIM_RUNS=100000 cargo test -p tern-harness --test integration sim -- --nocapture` runs
//! more; `TERN_SIM_SEED=1234` replays one seed.

use std::collections::BTreeMap;

use tern_harness::sim::{run, SimConfig, SimReport};

/// Runs per sweep: `default` unless `TERN_SIM_RUNS` says otherwise.
fn runs(default: u64) -> u64 {
    std::env::var("TERN_SIM_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sweep(base: u64, default_runs: u64, cfg: &SimConfig) -> Vec<SimReport> {
    if let Some(seed) = std::env::var("TERN_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return vec![run(seed, cfg).unwrap_or_else(|e| panic!("{e}"))];
    }
    (0..runs(default_runs))
        .map(|i| {
            let seed = base.wrapping_add(i);
            run(seed, cfg).unwrap_or_else(|e| {
                panic!("{e}\nreplay with TERN_SIM_SEED={seed} cargo test -p tern-harness --test integration sim")
            })
        })
        .collect()
}

fn summary(reports: &[SimReport]) -> (u64, BTreeMap<String, u64>, u64, u64) {
    let mut aborted = BTreeMap::new();
    let (mut committed, mut lost, mut handled) = (0, 0, 0);
    for r in reports {
        committed += r.committed;
        lost += r.lost;
        handled += r.handled;
        for (k, v) in &r.aborted {
            *aborted.entry(k.clone()).or_default() += v;
        }
    }
    (committed, aborted, lost, handled)
}

#[test]
fn migrations_under_loss_reorder_and_duplication_keep_every_promise() {
    let reports = sweep(0x7e57, 2_000, &SimConfig::default());
    let (committed, aborted, lost, handled) = summary(&reports);
    let refused: u64 = reports.iter().flat_map(|r| r.claims_refused.values()).sum();
    eprintln!(
        "sim: {} runs, {committed} migrations committed, aborted {aborted:?}, {lost} protocol messages lost, {handled} messages handled, {refused} stale locations refused",
        reports.len()
    );
    // The weather must actually have exercised the protocol.
    if reports.len() > 100 {
        assert!(committed > 0 && lost > 0 && aborted.contains_key("refused"));
    }
}

#[test]
fn a_calm_network_commits_every_migration_it_can() {
    let cfg = SimConfig {
        loss: 0.0,
        dup: 0.0,
        refuse: 0.0,
        ..SimConfig::default()
    };
    let reports = sweep(0xca1f, 500, &cfg);
    let (_, aborted, _, _) = summary(&reports);
    // Without loss or refusals nothing misses a deadline or is refused; the only aborts are
    // requests to the node it is already on or while it is already moving.
    assert!(
        aborted.keys().all(|k| k == "samenode" || k == "busy"),
        "{aborted:?}"
    );
}

#[test]
fn a_storm_with_many_nodes_and_services() {
    let cfg = SimConfig {
        nodes: 5,
        services: 4,
        migrations: 30,
        loss: 0.3,
        dup: 0.2,
        refuse: 0.2,
        ..SimConfig::default()
    };
    let reports = sweep(0x5707, 300, &cfg);
    assert!(reports.iter().all(|r| r.handled == r.sent));
}

#[test]
fn crashes_never_make_two_instances_or_leave_a_copy_waiting() {
    let cfg = SimConfig {
        nodes: 4,
        services: 3,
        migrations: 16,
        crashes: 1,
        ..SimConfig::default()
    };
    let reports = sweep(0xc4a5, 1_000, &cfg);
    let crashed: u64 = reports.iter().map(|r| r.crashed).sum();
    let orphaned: u64 = reports.iter().map(|r| r.orphaned).sum();
    let (committed, aborted, _, handled) = summary(&reports);
    eprintln!(
        "sim with crashes: {} runs, {crashed} nodes crashed, {orphaned} copies orphaned, {committed} migrations committed, aborted {aborted:?}, {handled} messages handled",
        reports.len()
    );
    // The crashes must actually have caught migrations in flight.
    if reports.len() > 100 {
        assert!(crashed > 0 && orphaned > 0 && aborted.contains_key("linklost"));
    }
}

/// Sums the pre-copy counts of `reports`: started, frozen, aborted in their rounds,
/// installed and checked.
fn precopies(reports: &[SimReport]) -> (u64, u64, u64, u64) {
    reports.iter().fold((0, 0, 0, 0), |a, r| {
        let p = r.precopies;
        (a.0 + p.0, a.1 + p.1, a.2 + p.2, a.3 + p.3)
    })
}

#[test]
fn precopies_keep_every_promise_and_an_abort_in_their_rounds_leaves_the_service_running() {
    let cfg = SimConfig {
        nodes: 4,
        services: 3,
        migrations: 12,
        precopy: 0.7,
        precopy_break: 0.02,
        ..SimConfig::default()
    };
    let reports = sweep(0x9ec0, 1_000, &cfg);
    let (started, frozen, aborted_early, checked) = precopies(&reports);
    let (committed, aborted, _, handled) = summary(&reports);
    eprintln!(
        "sim with pre-copy: {} runs, {started} pre-copies, {frozen} froze, {aborted_early} aborted in their rounds, {checked} pre-copied states installed and checked, {committed} migrations committed, aborted {aborted:?}, {handled} messages handled",
        reports.len()
    );
    assert!(reports.iter().all(|r| r.handled == r.sent));
    if reports.len() > 100 {
        assert!(started > 0 && frozen > 0 && aborted_early > 0 && checked > 0);
    }
}

#[test]
fn precopies_with_crashes_never_make_two_instances() {
    let cfg = SimConfig {
        nodes: 4,
        services: 3,
        migrations: 12,
        crashes: 1,
        precopy: 0.7,
        ..SimConfig::default()
    };
    let reports = sweep(0x9ec1, 500, &cfg);
    let (started, _, aborted_early, checked) = precopies(&reports);
    eprintln!(
        "sim with pre-copy and crashes: {} runs, {started} pre-copies, {aborted_early} aborted in their rounds, {checked} checked",
        reports.len()
    );
    if reports.len() > 100 {
        assert!(started > 0 && aborted_early > 0);
    }
}

#[test]
fn groups_commit_all_or_none_under_loss_and_refusals() {
    let cfg = SimConfig {
        nodes: 4,
        services: 4,
        migrations: 12,
        groups: 0.5,
        ..SimConfig::default()
    };
    let reports = sweep(0x9c0f, 1_000, &cfg);
    let asked: u64 = reports.iter().map(|r| r.groups.0).sum();
    let whole: u64 = reports.iter().map(|r| r.groups.1).sum();
    let none: u64 = reports.iter().map(|r| r.groups.2).sum();
    let (committed, aborted, _, handled) = summary(&reports);
    eprintln!(
        "sim with groups: {} runs, {asked} groups asked, {whole} committed whole, {none} aborted whole, {committed} member migrations committed, aborted {aborted:?}, {handled} messages handled",
        reports.len()
    );
    // Both outcomes must actually have happened, including aborts caused by one member.
    if reports.len() > 100 {
        assert!(whole > 0 && none > 0 && aborted.contains_key("group"));
    }
}

#[test]
fn groups_with_crashes_never_make_two_instances() {
    let cfg = SimConfig {
        nodes: 4,
        services: 4,
        migrations: 12,
        groups: 0.5,
        crashes: 1,
        ..SimConfig::default()
    };
    let reports = sweep(0x9c1f, 500, &cfg);
    let asked: u64 = reports.iter().map(|r| r.groups.0).sum();
    eprintln!(
        "sim with groups and crashes: {} runs, {asked} groups asked",
        reports.len()
    );
}

/// Groups whose members copy their state ahead: all members freeze in one step once every
/// copy caught up (the simulation fails a run where a group freezes part of its members), a
/// copy that breaks or a target that refuses during the rounds aborts the whole group with
/// every member running untouched, and each pre-copied state installed is its source's.
#[test]
fn groups_with_precopy_freeze_together_and_abort_whole() {
    let cfg = SimConfig {
        nodes: 4,
        services: 4,
        migrations: 12,
        groups: 0.5,
        precopy: 0.6,
        precopy_break: 0.02,
        ..SimConfig::default()
    };
    let reports = sweep(0x9c2f, 1_000, &cfg);
    let whole: u64 = reports.iter().map(|r| r.groups.1).sum();
    let none: u64 = reports.iter().map(|r| r.groups.2).sum();
    let (started, frozen, aborted_early, checked) = precopies(&reports);
    let (committed, aborted, _, handled) = summary(&reports);
    eprintln!(
        "sim with groups and pre-copy: {} runs, {whole} groups committed whole, {none} aborted whole, {started} pre-copies, {frozen} froze, {aborted_early} aborted in their rounds, {checked} checked, {committed} committed, aborted {aborted:?}, {handled} handled",
        reports.len()
    );
    assert!(reports.iter().all(|r| r.handled == r.sent));
    if reports.len() > 100 {
        assert!(whole > 0 && none > 0 && aborted.contains_key("group"));
        assert!(started > 0 && frozen > 0 && aborted_early > 0 && checked > 0);
    }
    // With crashes: never two live instances (checked in every step of every run).
    let crashing = SimConfig { crashes: 1, ..cfg };
    let reports = sweep(0x9c3f, 300, &crashing);
    eprintln!(
        "sim with groups, pre-copy and crashes: {} runs",
        reports.len()
    );
}

/// The data plane the node runs (`tern_proto::inbox::Inbox`), under moves, aborts, tiny
/// mailboxes, tombstone eviction and fences, and reordering: every message handled once in order or
/// reported, and every sender's channel delivers again once the moves stop. Senders that stop
/// leave no window behind (except where their close found nowhere to go).
#[test]
fn the_inbox_under_moves_and_refusals_keeps_every_channel_alive() {
    use tern_harness::dataplane::{run as run_dp, DataPlaneConfig};
    // The default weather, and a harsher one: four nodes, mailboxes of 2, no tombstones at
    // all (every message to a stale address is refused), more waiting senders.
    let harsh = DataPlaneConfig {
        nodes: 4,
        services: 3,
        capacity: 2,
        tombstones_max: 0,
        wait: 0.3,
        ..DataPlaneConfig::default()
    };
    // And one where tombstones are plenty and go only when every other node has fenced them,
    // and handlers panic now and then (restarted, their message reported).
    let fenced = DataPlaneConfig {
        tombstones_max: 64,
        panic: 0.05,
        stop: 0.05,
        ..DataPlaneConfig::default()
    };
    // And one where nodes crash and restart (those hosting no service): their links' traffic
    // lost, declared by the senders' ledgers, their senders dead.
    let crashy = DataPlaneConfig {
        nodes: 4,
        crashes: 3,
        tombstones_max: 8,
        ..DataPlaneConfig::default()
    };
    // And one with a rogue member that sends messages, skips, gaps and closes in honest
    // senders' names, as their own or as handed on: every lie refused, nothing changed.
    let lying = DataPlaneConfig {
        nodes: 4,
        services: 3,
        tombstones_max: 2,
        crashes: 1,
        lies: 40,
        ..DataPlaneConfig::default()
    };
    let cfgs = [DataPlaneConfig::default(), harsh, fenced, crashy, lying];
    let one = |seed: u64| {
        let cfg = &cfgs[(seed % 5) as usize];
        run_dp(seed, cfg).unwrap_or_else(|e| {
            panic!("{e}\nreplay with TERN_SIM_SEED={seed} cargo test -p tern-harness --test integration sim")
        })
    };
    if let Some(seed) = std::env::var("TERN_SIM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        one(seed);
        return;
    }
    let reports: Vec<_> = (0..runs(2_000)).map(|i| one(0xda7a_0000 + i)).collect();
    let total = |f: fn(&tern_harness::dataplane::DataPlaneReport) -> u64| -> u64 {
        reports.iter().map(f).sum()
    };
    let (sent, handled, reported) = (
        total(|r| r.sent),
        total(|r| r.handled),
        total(|r| r.reported),
    );
    let (committed, aborted) = (total(|r| r.committed), total(|r| r.aborted));
    eprintln!(
        "data plane sim: {} runs, {sent} sent, {handled} handled, {reported} reported, {committed} moves committed, {aborted} aborted, {} skips lost, {} handed on by tombstones, {} tombstones fenced out, {} handlers panicked, {} closes of stopped senders ({} lost), {} of their windows gone, {} nodes crashed, {} messages declared lost ({} of them handled), {} lost with their sender, {} gaps lost, {} refused with the report lost in a crash, {} services stopped when asked to freeze ({} skips found them gone), {} handled marks waited for their channel to point at their node, {} lies told ({} refused, {} about senders whose node crashed meanwhile)",
        reports.len(),
        total(|r| r.skips_lost),
        total(|r| r.handed_on),
        total(|r| r.unburied),
        total(|r| r.panicked),
        total(|r| r.closes),
        total(|r| r.closes_lost),
        total(|r| r.windows_retired),
        total(|r| r.crashed),
        total(|r| r.declared),
        total(|r| r.declared_handled),
        total(|r| r.lost_with_sender),
        total(|r| r.gaps_lost),
        total(|r| r.refusals_lost),
        total(|r| r.stopped),
        total(|r| r.skips_to_stopped),
        total(|r| r.marks_waited),
        total(|r| r.lies),
        total(|r| r.lies_refused),
        total(|r| r.lies_about_the_dead),
    );
    if reports.len() > 100 {
        // The weather must have produced refusals, moves, aborts, forwarding by tombstones,
        // and tombstones that every other node fenced.
        assert!(reported > 0 && committed > 0 && aborted > 0);
        assert!(total(|r| r.handed_on) > 0 && total(|r| r.unburied) > 0);
        assert!(total(|r| r.panicked) > 0);
        // Stopped senders' windows went: all but where a close was lost.
        let (closes, lost, gone) = (
            total(|r| r.closes),
            total(|r| r.closes_lost),
            total(|r| r.windows_retired),
        );
        // (Closes of a sender that died with its node afterwards are not counted as gone.)
        assert!(
            closes > 0 && gone > closes * 9 / 10,
            "{closes} closes, {lost} lost, {gone} gone"
        );
        assert!(total(|r| r.crashed) > 0 && total(|r| r.declared) > 0);
        assert!(total(|r| r.stopped) > 0);
        assert!(total(|r| r.lies) > 0);
    }
}

#[test]
fn a_lying_peer_changes_nothing() {
    let cfg = SimConfig {
        nodes: 4,
        services: 3,
        migrations: 12,
        liar: 0.3,
        ..SimConfig::default()
    };
    let reports = sweep(0x11a2, 1_000, &cfg);
    let mut refused: BTreeMap<&str, u64> = BTreeMap::new();
    let mut forged = 0;
    for r in &reports {
        // Every promise holds, lies or not: everything sent is handled, once, in order.
        assert_eq!(r.handled, r.sent, "seed {}", r.seed);
        forged += r.forged.0;
        for (k, v) in &r.forged.1 {
            *refused.entry(k).or_default() += v;
        }
    }
    eprintln!(
        "sim with a liar: {} runs, {forged} forgeries, refused {refused:?}",
        reports.len()
    );
    if reports.len() > 100 {
        for claim in [
            "location",
            "commit",
            "abort",
            "prepared",
            "refused",
            "commit-ack",
        ] {
            assert!(
                refused.get(claim).is_some_and(|n| *n > 0),
                "{claim}: {refused:?}"
            );
        }
    }
}

mod failover {
    //! Standby copies, leases and ballots (`tern_harness::failover`): crashes at any moment,
    //! one-way and two-way cuts between the voters, clocks at different rates.

    use tern_harness::failover::{run_failover, FailoverConfig, FailoverReport, Outputs};

    fn sweep(base: u64, default_runs: u64, cfg: &FailoverConfig) -> Vec<FailoverReport> {
        if let Some(seed) = std::env::var("TERN_SIM_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            return vec![run_failover(seed, cfg)];
        }
        (0..super::runs(default_runs))
            .map(|i| run_failover(base.wrapping_add(i), cfg))
            .collect()
    }

    fn total(reports: &[FailoverReport], f: impl Fn(&FailoverReport) -> u64) -> u64 {
        reports.iter().map(f).sum()
    }

    #[test]
    fn a_crash_at_any_moment_loses_duplicates_and_reorders_nothing() {
        let cfg = FailoverConfig {
            cuts: 0,
            crash: true,
            liveness: true,
            ..FailoverConfig::default()
        };
        let reports = sweep(0xfa11, 300, &cfg);
        let takeovers = total(&reports, |r| r.takeovers);
        let continued = total(&reports, |r| r.continued);
        let reexecuted = total(&reports, |r| r.reexecuted);
        eprintln!(
            "failover sim (crashes): {} runs, {takeovers} takeovers, {continued} primaries went on, {reexecuted} messages handled again, {} resent, {} checkpoints",
            reports.len(),
            total(&reports, |r| r.resent),
            total(&reports, |r| r.checkpoints)
        );
        if reports.len() > 50 {
            // The weather must have put both paths to work.
            assert!(takeovers > 0 && continued > 0 && reexecuted > 0);
        }
    }

    #[test]
    fn a_node_that_crashes_and_restarts_on_its_data_directory_never_makes_a_second_copy() {
        let cfg = FailoverConfig {
            cuts: 0,
            crash: true,
            restart: true,
            liveness: true,
            ..FailoverConfig::default()
        };
        let reports = sweep(0xd15c, 300, &cfg);
        let resumed = total(&reports, |r| r.resumed);
        let superseded = total(&reports, |r| r.superseded);
        eprintln!(
            "failover sim (crashes and restarts): {} runs, {resumed} copies resumed from disk, {superseded} stored checkpoints given up, {} takeovers, {} went on",
            reports.len(),
            total(&reports, |r| r.takeovers),
            total(&reports, |r| r.continued)
        );
        if reports.len() > 50 {
            // Both ends of a restart: the stored copy wins, or a newer one had the epoch.
            assert!(resumed > 0 && superseded > 0);
        }
    }

    #[test]
    fn cuts_a_crash_and_a_restart_together_keep_safety() {
        let cfg = FailoverConfig {
            restart: true,
            ..FailoverConfig::default()
        };
        let reports = sweep(0xd15d, 300, &cfg);
        eprintln!(
            "failover sim (cuts, a crash and a restart): {} runs, {} resumed, {} given up",
            reports.len(),
            total(&reports, |r| r.resumed),
            total(&reports, |r| r.superseded)
        );
    }

    #[test]
    fn one_way_and_two_way_cuts_never_leave_two_live_copies() {
        let cfg = FailoverConfig {
            cuts: 3,
            crash: false,
            liveness: true,
            ..FailoverConfig::default()
        };
        let reports = sweep(0xc07, 300, &cfg);
        let suspended = total(&reports, |r| r.suspended);
        eprintln!(
            "failover sim (cuts): {} runs, {} takeovers, {} went on, {suspended} lease losses",
            reports.len(),
            total(&reports, |r| r.takeovers),
            total(&reports, |r| r.continued)
        );
        if reports.len() > 50 {
            assert!(suspended > 0 && total(&reports, |r| r.takeovers) > 0);
        }
    }

    #[test]
    fn cuts_and_a_crash_together_keep_safety() {
        let cfg = FailoverConfig::default();
        let reports = sweep(0xbad, 300, &cfg);
        eprintln!(
            "failover sim (cuts and a crash): {} runs, {} takeovers, {} claims the running copy refused",
            reports.len(),
            total(&reports, |r| r.takeovers),
            total(&reports, |r| r.claims_refused)
        );
    }

    /// Outputs sent at once by a primary that crashes: what it had in flight dies with it, and
    /// the copy that takes over sends again what its checkpoint carried of the outputs not
    /// yet confirmed by the sink. Every output reaches the sink, once, in order (the end is
    /// quiet: no output missing).
    #[test]
    fn outputs_sent_at_once_survive_a_crash_that_loses_them_in_flight() {
        let cfg = FailoverConfig {
            senders: 1,
            cuts: 0,
            crash: true,
            liveness: true,
            outputs: Outputs::Immediate,
            ..FailoverConfig::default()
        };
        let reports = sweep(0x0c7, 300, &cfg);
        eprintln!(
            "failover sim (outputs at once, a crash): {} runs, {} lost in flight, {} outputs sent again from checkpoints, {} dropped as copies",
            reports.len(),
            total(&reports, |r| r.lost_in_flight),
            total(&reports, |r| r.outputs_resent),
            total(&reports, |r| r.outputs_dropped)
        );
        if reports.len() > 50 {
            assert!(total(&reports, |r| r.outputs_resent) > 0);
        }
    }

    #[test]
    fn outputs_sent_at_once_are_deduplicated_for_one_sender() {
        let cfg = FailoverConfig {
            senders: 1,
            cuts: 1,
            outputs: Outputs::Immediate,
            liveness: false,
            ..FailoverConfig::default()
        };
        let reports = sweep(0x0e7, 300, &cfg);
        eprintln!(
            "failover sim (outputs at once): {} runs, {} output copies dropped",
            reports.len(),
            total(&reports, |r| r.outputs_dropped)
        );
        if reports.len() > 50 {
            assert!(total(&reports, |r| r.outputs_dropped) > 0);
        }
    }
}
