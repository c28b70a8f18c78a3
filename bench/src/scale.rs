//! Scale figures: what an idle node costs as the cluster grows. Clusters of 5, 10, 20 and 40
//! nodes run in this process, fully connected, each node hosting the same number of idle
//! services; over a window the bench reads every node's frame bytes out and in (gossip and
//! the rest of the control traffic an idle cluster sends), its peers, and the process's
//! resident memory per node. The growth is fitted as a power of the node count.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tern::{Ctx, Service};
use tern_harness::Cluster;

use crate::util::{progress, resident_bytes, round2, Scale};

/// An idle service, listed in its node's gossip.
#[derive(Serialize, Deserialize)]
struct Quiet;

impl Service for Quiet {
    type Msg = ();
    const KIND: &'static str = "bench-quiet";
    const VERSION: u32 = 1;

    async fn handle(&mut self, _: (), _: &mut Ctx<Self>) {}
}

/// Services per node.
const SERVICES_PER_NODE: usize = 50;

struct Point {
    nodes: usize,
    out_per_node_per_s: f64,
    in_per_node_per_s: f64,
    peers_per_node: f64,
    resident_per_node: f64,
    start_s: f64,
}

fn measure(nodes: usize, window: Duration) -> Result<Point> {
    let before = resident_bytes()?;
    let t0 = Instant::now();
    let names: Vec<String> = (0..nodes).map(|i| format!("n{i:02}")).collect();
    let mut b = Cluster::builder();
    for n in &names {
        b = b.node(n, &[]);
    }
    let c = b
        .setup(|n| {
            n.register::<Quiet>();
        })
        .start()?;
    c.wait_members(Duration::from_secs(120))?;
    for n in c.nodes() {
        for _ in 0..SERVICES_PER_NODE {
            n.spawn(Quiet)?;
        }
    }
    let start_s = t0.elapsed().as_secs_f64();
    // Two gossip rounds, so every node lists every other's services, then the window.
    std::thread::sleep(Duration::from_secs(2));
    let read = |c: &Cluster| -> (u64, u64) {
        c.nodes().iter().fold((0, 0), |(o, i), n| {
            let s = n.stats();
            (o + s.bytes_out, i + s.bytes_in)
        })
    };
    let (out0, in0) = read(&c);
    let w0 = Instant::now();
    std::thread::sleep(window);
    let (out1, in1) = read(&c);
    let secs = w0.elapsed().as_secs_f64();
    let peers: usize = c
        .nodes()
        .iter()
        .map(|n| n.peers().iter().filter(|p| p.connected).count())
        .sum();
    if peers < nodes * (nodes - 1) {
        bail!(
            "{nodes} nodes: {peers} connected peers, not the {} of a full mesh",
            nodes * (nodes - 1)
        );
    }
    let resident = resident_bytes()?.saturating_sub(before);
    c.shutdown();
    Ok(Point {
        nodes,
        out_per_node_per_s: (out1 - out0) as f64 / secs / nodes as f64,
        in_per_node_per_s: (in1 - in0) as f64 / secs / nodes as f64,
        peers_per_node: peers as f64 / nodes as f64,
        resident_per_node: resident as f64 / nodes as f64,
        start_s,
    })
}

/// The exponent `k` of `y = a * n^k` through the first and last points.
fn exponent(points: &[Point], y: impl Fn(&Point) -> f64) -> f64 {
    let (Some(a), Some(b)) = (points.first(), points.last()) else {
        return 0.0;
    };
    let (ya, yb) = (y(a).max(1.0), y(b).max(1.0));
    (yb / ya).ln() / (b.nodes as f64 / a.nodes as f64).ln()
}

pub fn run(scale: &Scale) -> Result<Value> {
    let quick = scale.repeats < 5 || scale.local_msgs < 10_000_000;
    let window = Duration::from_secs(if quick { 3 } else { 10 });
    let mut points = Vec::new();
    for nodes in [5usize, 10, 20, 40] {
        progress(&format!(
            "scale: {nodes} nodes, {SERVICES_PER_NODE} services each, {window:?} window"
        ));
        points.push(measure(nodes, window)?);
    }
    let rows: Vec<Value> = points
        .iter()
        .map(|p| {
            json!({
                "nodes": p.nodes,
                "services_per_node": SERVICES_PER_NODE,
                "frame_bytes_out_per_node_per_s": p.out_per_node_per_s.round(),
                "frame_bytes_in_per_node_per_s": p.in_per_node_per_s.round(),
                "connected_peers_per_node": p.peers_per_node,
                "resident_bytes_per_node": p.resident_per_node.round(),
                "start_s": round2(p.start_s),
            })
        })
        .collect();
    Ok(json!({
        "points": rows,
        "window_s": window.as_secs(),
        "bytes_out_exponent": round2(exponent(&points, |p| p.out_per_node_per_s)),
        "resident_exponent": round2(exponent(&points, |p| p.resident_per_node)),
    }))
}
