//! Trees and placement: the freeze window of a 100-member assembly tree moved as one unit
//! (against a single service's freeze in the same run), and the rebalancer on a synthetic
//! workload that starts with every pair of talking services split across nodes.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tern::{Ctx, MigrateOptions, NodeHandle, RebalancerConfig, Service, ServiceRef};
use tern_actors::{Chatter, ChatterMsg};
use tern_harness::{block_on, wait_for, Cluster};

use crate::util::{percentiles, progress, Scale};

/// A tree member: a little state, counts what it is told.
#[derive(Serialize, Deserialize)]
struct Member {
    label: String,
    got: u64,
}

impl Service for Member {
    type Msg = u64;
    const KIND: &'static str = "bench-member";
    const VERSION: u32 = 1;

    async fn handle(&mut self, _: u64, _: &mut Ctx<Self>) {
        self.got += 1;
    }
}

const TREE_MEMBERS: usize = 100;

fn tree(node: &NodeHandle) -> Result<Vec<ServiceRef<Member>>> {
    let mut all = vec![node.spawn(Member {
        label: "m0".into(),
        got: 0,
    })?];
    let mut parent = 0;
    while all.len() < TREE_MEMBERS {
        for _ in 0..4 {
            if all.len() >= TREE_MEMBERS {
                break;
            }
            let child = node.spawn(Member {
                label: format!("m{}", all.len()),
                got: 0,
            })?;
            node.adopt(all[parent].id(), child.addr())?;
            all.push(child);
        }
        parent += 1;
    }
    Ok(all)
}

fn trees(scale: &Scale) -> Result<Value> {
    let c = Cluster::builder()
        .node("a", &[])
        .node("b", &[])
        .setup(|n| {
            n.register::<Member>();
        })
        .start()?;
    c.wait_connected(Duration::from_secs(10))?;
    let members = tree(c.node("a"))?;
    let single = c.node("a").spawn(Member {
        label: "single".into(),
        got: 0,
    })?;
    let moves = 2 * scale.repeats + 1;
    let (mut freeze, mut total, mut single_freeze) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..moves {
        let (from, to) = if i % 2 == 0 { ("a", "b") } else { ("b", "a") };
        let r = block_on(c.node(from).migrate_tree(
            members[0].id(),
            to,
            MigrateOptions::default(),
        ))?;
        if !r.committed {
            bail!("tree move {i} did not commit: {:?}", r.aborted());
        }
        if r.members.len() != TREE_MEMBERS {
            bail!("tree move {i} moved {} members", r.members.len());
        }
        freeze.push(r.freeze_us);
        total.push(r.total_us);
        let s = block_on(
            c.node(from)
                .migrate(single.id(), to, MigrateOptions::default()),
        )?;
        if !s.committed() {
            bail!("single move {i} did not commit: {:?}", s.aborted);
        }
        single_freeze.push(s.freeze_us);
    }
    let (freeze_p50, freeze_p99) = percentiles(freeze);
    let (total_p50, _) = percentiles(total);
    let (single_p50, _) = percentiles(single_freeze);
    progress(&format!(
        "tree of {TREE_MEMBERS}: freeze p50 {freeze_p50} us, total p50 {total_p50} us; one service: freeze p50 {single_p50} us"
    ));
    c.shutdown();
    Ok(json!({
        "members": TREE_MEMBERS,
        "moves": moves,
        "freeze_us_p50": freeze_p50,
        "freeze_us_p99": freeze_p99,
        "total_us_p50": total_p50,
        "single_freeze_us_p50": single_p50,
        "freeze_ratio_to_single": crate::util::round2(freeze_p50 as f64 / single_p50.max(1) as f64),
        "target_freeze_us_p50": 10_000,
    }))
}

/// splitmix64, for a seeded placement.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const PAIRS: usize = 12;
const PLACEMENT_NODES: [&str; 3] = ["p1", "p2", "p3"];

fn split_fraction(c: &Cluster, pairs: &[(ServiceRef<Chatter>, ServiceRef<Chatter>)]) -> f64 {
    let at = |id| {
        PLACEMENT_NODES
            .iter()
            .find(|n| c.node(n).services().iter().any(|s| s.addr.id == id))
            .copied()
    };
    let split = pairs
        .iter()
        .filter(|(x, y)| at(x.id()) != at(y.id()))
        .count();
    split as f64 / pairs.len() as f64
}

fn rebalancer() -> Result<Value> {
    let mut b = Cluster::builder();
    for n in PLACEMENT_NODES {
        b = b.node(n, &[]);
    }
    let c = b.setup(tern_actors::register_all).start()?;
    c.wait_connected(Duration::from_secs(10))?;
    let nodes: Vec<&NodeHandle> = PLACEMENT_NODES.iter().map(|n| c.node(n)).collect();
    wait_for(Duration::from_secs(10), "membership", || {
        nodes
            .iter()
            .all(|n| n.members().len() == PLACEMENT_NODES.len())
    })?;
    // Every pair split across two different nodes, chosen at random (seeded).
    let mut rng = 0x7e4e_u64;
    let mut pairs = Vec::new();
    for _ in 0..PAIRS {
        let i = (next(&mut rng) % 3) as usize;
        let j = (i + 1 + (next(&mut rng) % 2) as usize) % 3;
        let x = nodes[i].spawn(Chatter::new(10))?;
        let y = nodes[j].spawn(Chatter::new(10))?;
        nodes[i].book_insert(x.addr(), "peer", y.addr())?;
        nodes[j].book_insert(y.addr(), "peer", x.addr())?;
        x.tell(ChatterMsg::Start)?;
        y.tell(ChatterMsg::Start)?;
        pairs.push((x, y));
    }
    let before = split_fraction(&c, &pairs);
    // Rates need a few seconds of windows, and a gossip round, to be seen by the planner.
    std::thread::sleep(Duration::from_millis(3_500));
    let cfg = RebalancerConfig {
        interval_ms: 1_000,
        max_moves_per_round: 8,
        cooldown_ms: 600_000,
        load_tolerance: 0.25,
        min_gain_msgs_per_s: 5.0,
    };
    let mut migrations = 0;
    let mut rounds = 0;
    let mut observed_before = None;
    for _ in 0..10 {
        let round = block_on(nodes[0].rebalance_now(&cfg));
        rounds += 1;
        observed_before.get_or_insert(round.cross_node_fraction_before);
        let committed = round.moves.iter().filter(|(_, o)| o.is_none()).count();
        migrations += committed;
        if round.moves.is_empty() {
            break;
        }
        // Let the new locations be gossiped before the next round.
        std::thread::sleep(Duration::from_millis(1_500));
    }
    let after = split_fraction(&c, &pairs);
    let mut per_node = BTreeMap::new();
    for n in &nodes {
        per_node.insert(n.name().to_string(), n.services().len());
    }
    progress(&format!(
        "rebalancer: {PAIRS} pairs, cross-node fraction {before:.2} -> {after:.2} with {migrations} migrations in {rounds} rounds; per node {per_node:?}"
    ));
    c.shutdown();
    Ok(json!({
        "services": 2 * PAIRS,
        "cross_node_fraction_before": before,
        "cross_node_fraction_observed_before": observed_before.unwrap_or(0.0),
        "cross_node_fraction_after": after,
        "migrations": migrations,
        "rounds": rounds,
        "services_per_node": per_node,
        "target_after": 0.2,
    }))
}

pub fn run(scale: &Scale) -> Result<(Value, Value)> {
    progress("trees");
    let t = trees(scale)?;
    progress("placement");
    let p = rebalancer()?;
    Ok((t, p))
}
