//! tern-bench: Tern's figures, each measured against a baseline doing the same work in the
//! same run. `--json` prints one JSON object on stdout (progress goes to stderr); `--quick`
//! keeps the whole run under a minute.

mod local;
mod migration;
#[cfg(feature = "peers")]
mod peers;
mod placement;
mod precopy;
mod remote;
mod replicas;
mod scale;
mod util;

use anyhow::Result;
use serde_json::json;

/// The sections, in the order they run.
const SECTIONS: [&str; 7] = [
    "local",
    "remote",
    "migration",
    "precopy",
    "placement",
    "replicas",
    "scale",
];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    #[cfg(feature = "peers")]
    if let [first, dir] = args.as_slice() {
        if first == peers::RACTOR_SINK_ARG {
            tern_harness::init_tracing_stderr();
            return peers::ractor_sink_main(std::path::Path::new(dir));
        }
    }
    if let [first, mode, n] = args.as_slice() {
        if first == local::FOOTPRINT_ARG {
            tern_harness::init_tracing_stderr();
            return local::footprint_main(mode, n);
        }
    }
    let mut json_out = false;
    let mut quick = false;
    let mut only: Option<String> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => json_out = true,
            "--quick" => quick = true,
            "--only" => match it.next() {
                Some(s) if SECTIONS.contains(&s.as_str()) => only = Some(s.clone()),
                other => anyhow::bail!(
                    "--only takes one of {SECTIONS:?}, not {other:?}; usage: tern-bench [--json] [--quick] [--only SECTION]"
                ),
            },
            bad => anyhow::bail!(
                "unknown argument {bad:?}; usage: tern-bench [--json] [--quick] [--only SECTION]"
            ),
        }
    }
    let runs = |section: &str| only.as_deref().is_none_or(|o| o == section);
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

    let mut out = serde_json::Map::new();
    if runs("local") {
        out.insert("local".into(), local::run(&scale)?);
    }
    if runs("remote") {
        out.insert("remote".into(), remote::run(&scale)?);
    }
    if runs("migration") {
        out.insert("migration".into(), migration::run(&scale)?);
    }
    if runs("precopy") {
        out.insert("precopy".into(), precopy::run(&scale)?);
    }
    if runs("placement") {
        let (tree, placement) = placement::run(&scale)?;
        out.insert("tree".into(), tree);
        out.insert("placement".into(), placement);
    }
    if runs("replicas") {
        out.insert("replicas".into(), replicas::run(&scale)?);
    }
    if runs("scale") {
        out.insert("scale".into(), scale::run(&scale)?);
    }
    out.insert(
        "run".into(),
        json!({
            "quick": quick,
            "only": only,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "seconds": started.elapsed().as_secs_f64(),
            // ractor_cluster and kameo are measured only in a build with `--features peers`.
            "peers_built": cfg!(feature = "peers"),
        }),
    );
    let out = serde_json::Value::Object(out);
    if json_out {
        println!("{}", serde_json::to_string(&out)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    Ok(())
}
