//! `tern-demo`: Tern Media on four devices.
//!
//! ```text
//! tern-demo                         the whole scenario in one process; prints the timeline
//! tern-demo --json                  the same, one JSON object on stdout
//! tern-demo --serve 8080            the scenario, then keeps the cluster up with the dashboard
//! tern-demo node --config demo-apps/devices/tv.toml    one device as its own process
//! ```
//!
//! Exits non-zero if anything was lost, duplicated or reordered, or an ask went unanswered.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tern_demo::app::Pace;
use tern_demo::dashboard::{self, Dashboard};
use tern_demo::device::DeviceConfig;
use tern_demo::scenario::{self, ScenarioOptions};
use tern_demo::timeline;

#[derive(Parser)]
#[command(
    name = "tern-demo",
    about = "Tern Media: a media app that moves between devices while it plays"
)]
struct Args {
    /// Print one JSON object instead of the timeline.
    #[arg(long)]
    json: bool,
    /// After the scenario, keep the cluster running (the music playing) and serve the live
    /// dashboard until Ctrl-C: on PORT of 127.0.0.1, or on ADDR:PORT.
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = dashboard_addr)]
    serve: Option<std::net::SocketAddr>,
    /// Milliseconds between two steps of the scenario.
    #[arg(long, default_value_t = 1_500)]
    step_gap_ms: u64,
    #[command(subcommand)]
    command: Option<Cmd>,
}

/// Where the dashboard listens: a port alone is on the loopback address, so nothing beyond
/// this device reaches it unless asked for.
fn dashboard_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is neither a port nor an address with a port"))
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs one device as its own process, from a TOML file.
    Node {
        /// The device's configuration.
        #[arg(long)]
        config: PathBuf,
        /// Also serve the live dashboard (it sees the whole cluster through this device): on
        /// PORT of 127.0.0.1, or on ADDR:PORT.
        #[arg(long, value_name = "[ADDR:]PORT", value_parser = dashboard_addr)]
        serve: Option<std::net::SocketAddr>,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Logs go to stderr: stdout carries the timeline or the JSON.
    tern_harness::init_tracing_stderr();
    let result = match &args.command {
        None => embedded(&args),
        Some(Cmd::Node { config, serve }) => device(config, *serve),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tern-demo: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the scenario with every device in this process. True when the verdict is clean.
fn embedded(args: &Args) -> Result<bool> {
    let opts = ScenarioOptions {
        step_gap_ms: args.step_gap_ms,
        ..ScenarioOptions::default()
    };
    let cluster = scenario::devices().start()?;
    cluster.wait_connected(std::time::Duration::from_secs(10))?;
    if !args.json {
        println!(
            "Tern Media: four devices in one process, on loopback over QUIC with mutual TLS\n"
        );
        for n in cluster.nodes() {
            println!(
                "  {:<6} {:<22} {}",
                n.name().to_string(),
                n.local_addr().to_string(),
                n.capabilities().join(", ")
            );
        }
        println!();
    }
    let json = args.json;
    let (app, outcome) = scenario::run(&cluster, opts, |m| {
        if !json {
            print!("{}", timeline::moment(m));
        }
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        print!("{}", timeline::verdict(&outcome));
    }
    if let Some(addr) = args.serve {
        // The music plays on while the dashboard is up.
        let at = cluster.node("car");
        app.play(at, opts.pace)?;
        // The dashboard enters at the car and reads the other devices over admin connections.
        let admin = cluster
            .ca
            .issue_role(scenario::DASHBOARD, tern::certs::Role::Admin)?;
        let dash = Dashboard::new(at.clone(), Some(admin), Some(app));
        dash.record_steps(&outcome.steps);
        actix_web::rt::System::new().block_on(dashboard::serve(
            dash,
            addr,
            |_, url| {
                eprintln!("\nDashboard: {url}  (Ctrl-C stops the cluster)");
            },
            stop_signal(),
        ))?;
    }
    cluster.shutdown();
    Ok(outcome.is_clean())
}

/// Runs one device until Ctrl-C (or SIGTERM), printing what its node notices; with `serve`,
/// also the dashboard. The device that started the app stops it first and prints the audit;
/// true unless that audit found something wrong.
fn device(path: &std::path::Path, serve: Option<std::net::SocketAddr>) -> Result<bool> {
    let cfg = DeviceConfig::load(path)?;
    let (node, app) = tern_demo::device::start(&cfg, Pace::default())?;
    let started_here = app.clone();
    println!(
        "{} listening on {}  capabilities: {}",
        node.name(),
        node.local_addr(),
        cfg.node.capabilities.join(", ")
    );
    if let Some(app) = &app {
        for (name, addr) in app.services() {
            println!("  {name:<10} {} started here", addr.id);
        }
    }
    if started_here.is_some() {
        println!(
            "Ctrl-C stops the app, prints its audit, then stops this device; stop the other \
             devices after this one."
        );
    } else {
        println!(
            "Ctrl-C stops this device (drain it first with `tern drain {}`).",
            cfg.node.name
        );
    }
    let reloader = {
        let (node, cfg) = (node.clone(), cfg.clone());
        async move {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                let Ok(mut hup) = signal(SignalKind::hangup()) else {
                    return;
                };
                while hup.recv().await.is_some() {
                    match cfg.reload(&node) {
                        Ok(what) => println!("[{}] reload: {what}", node.name()),
                        Err(e) => eprintln!("[{}] reload failed: {e:#}", node.name()),
                    }
                }
            }
        }
    };
    let printer = {
        let node = node.clone();
        async move {
            let mut seen = 0;
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
            loop {
                tick.tick().await;
                let last = seen;
                for e in node.events().into_iter().filter(|e| e.n > last) {
                    seen = e.n;
                    println!("[{}] {:<18} {}", node.name(), e.kind, e.detail);
                }
            }
        }
    };
    let verdict = actix_web::rt::System::new().block_on(async {
        let printing = actix_web::rt::spawn(printer);
        let reloading = actix_web::rt::spawn(reloader);
        let served = match serve {
            Some(addr) => {
                let dash = Dashboard::new(node.clone(), cfg.dashboard_identity()?, app);
                dashboard::serve(
                    dash,
                    addr,
                    |_, url| println!("Dashboard: {url}"),
                    stop_signal(),
                )
                .await
            }
            None => {
                stop_signal().await;
                Ok(())
            }
        };
        printing.abort();
        reloading.abort();
        served?;
        let Some(app) = &started_here else {
            return Ok(true);
        };
        // Wherever the services run now, they answer through this node.
        println!("{}: stopping Tern Media and reading its checks", cfg.node.name);
        let audit = app
            .finish(&node, std::time::Duration::from_secs(10))
            .await
            .context("auditing Tern Media (its services must still be running: stop this device before the others)")?;
        print!("{}", timeline::audit_verdict(&audit));
        Ok::<bool, anyhow::Error>(audit.is_clean())
    });
    println!("{}: stopping", cfg.node.name);
    node.shutdown();
    verdict
}

/// Ctrl-C, or SIGTERM on Unix.
async fn stop_signal() {
    tern::runner::stop_signal().await
}

#[cfg(test)]
mod tests {
    use super::dashboard_addr;

    #[test]
    fn a_port_alone_serves_on_the_loopback_address_and_nonsense_says_why() {
        assert_eq!(
            dashboard_addr("8080"),
            Ok("127.0.0.1:8080".parse().unwrap())
        );
        assert_eq!(
            dashboard_addr("0.0.0.0:9"),
            Ok("0.0.0.0:9".parse().unwrap())
        );
        let bad = dashboard_addr("tv:80").unwrap_err();
        assert!(bad.contains("neither a port nor an address"), "{bad}");
    }
}
