//! tern-bench: Tern's figures, each measured against a baseline doing the same work in the
//! same run. `--json` prints one JSON object on stdout (progress goes to stderr); `--quick`
//! keeps the whole run under a minute.

mod local;
mod migration;
mod placement;
mod remote;
mod replicas;
mod util;

use anyhow::Result;
use serde_json::json;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json_out = args.iter().any(|a| a == "--json");
    let quick = args.iter().any(|a| a == "--quick");
    if let Some(bad) = args.iter().find(|a| *a != "--json" && *a != "--quick") {
        anyhow::bail!("unknown argument {bad:?}; usage: tern-bench [--json] [--quick]");
    }
    let scale = if quick {
        util::Scale::quick()
    } else {
        util::Scale::full()
    };
    // Logs go to stderr: `--json` prints one object on stdout and nothing else (a node's
    // warnings, such as losses declared when a phase's nodes stop, used to land there).
    tern_harness::init_tracing_stderr();
    let started = std::time::Instant::now();
    util::start_clock();

    let local = local::run(&scale)?;
    let remote = remote::run(&scale)?;
    let migration = migration::run(&scale)?;
    let (tree, placement) = placement::run(&scale)?;
    let replicas = replicas::run(&scale)?;

    let out = json!({
        "local": local,
        "remote": remote,
        "migration": migration,
        "tree": tree,
        "placement": placement,
        "replicas": replicas,
        "run": {
            "quick": quick,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "seconds": started.elapsed().as_secs_f64(),
        }
    });
    if json_out {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
