//! The commands that watch a running cluster: `tern top`, `tern events` and `tern metrics`.
//! They read the same figures a node's metrics endpoint exports ([`tern::NodeFigures`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;
use tern::admin::{ask_every_node, AdminClient, AdminReply, AdminRequest};
use tern::certs::NodeIdentity;
use tern::{NodeEvent, NodeFigures};

use super::printable;

/// Rows of each table `tern top` prints.
const TOP_ROWS: usize = 10;

/// One node's line in `tern top`.
#[derive(Debug, Serialize)]
pub struct NodeLine {
    pub node: String,
    pub services: u64,
    pub asleep: u64,
    /// Messages handled per second over the interval.
    pub handled_per_s: f64,
    /// Messages from peers taken in per second.
    pub in_per_s: f64,
    /// Messages sent to peers per second.
    pub out_per_s: f64,
    /// Migrations this node committed as a source, in all.
    pub migrations: u64,
    /// Of those, committed during the interval.
    pub migrations_new: u64,
    /// The bound of the freeze-histogram bucket holding the median freeze (µs), if any.
    pub freeze_p50_us_at_most: Option<u64>,
    pub peers_connected: u64,
}

/// One service in `tern top`.
#[derive(Debug, Serialize)]
pub struct ServiceLine {
    pub kind: String,
    pub id: String,
    pub node: String,
    pub mailbox_depth: usize,
    pub mailbox_capacity: usize,
    pub epoch: u64,
}

/// One channel in `tern top`.
#[derive(Debug, Serialize)]
pub struct ChannelLine {
    pub from: String,
    pub to: String,
    pub msgs_per_s: f64,
}

/// What `tern top --json` prints: one interval's view of the cluster.
#[derive(Debug, Serialize)]
pub struct Top {
    pub interval_ms: u64,
    pub nodes: Vec<NodeLine>,
    /// The services with the deepest mailboxes.
    pub services: Vec<ServiceLine>,
    /// The busiest channels.
    pub channels: Vec<ChannelLine>,
    /// Nodes that did not answer, with why.
    pub unreachable: Vec<(String, String)>,
}

/// Every node's figures, and the nodes that did not give them.
async fn gather(
    entry: &AdminClient,
    identity: &NodeIdentity,
) -> Result<(Vec<NodeFigures>, Vec<(String, String)>)> {
    let (_, answers) = ask_every_node(entry, identity, &AdminRequest::Figures).await?;
    let mut figures = Vec::new();
    let mut unreachable = Vec::new();
    for (name, answer) in answers {
        match answer {
            Ok(AdminReply::Figures(f)) => figures.push(*f),
            Ok(other) => unreachable.push((name, format!("unexpected answer {other:?}"))),
            Err(e) => unreachable.push((name, e.to_string())),
        }
    }
    Ok((figures, unreachable))
}

/// The bound of the bucket that holds the median of `histogram` (`(bound, count)` pairs).
fn median_bound(histogram: &[(u64, u64)]) -> Option<u64> {
    let total: u64 = histogram.iter().map(|(_, n)| n).sum();
    let mut seen = 0;
    for &(bound, n) in histogram {
        seen += n;
        if total > 0 && seen * 2 >= total {
            return Some(bound);
        }
    }
    None
}

/// The view between two readings `interval` apart (a node missing from `before` is shown
/// with its totals as its rates' numerators over the same interval).
fn top_of(
    before: &[NodeFigures],
    now: &[NodeFigures],
    interval: Duration,
    unreachable: Vec<(String, String)>,
) -> Top {
    let secs = interval.as_secs_f64().max(1e-3);
    let rate = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    let mut nodes = Vec::new();
    let mut services = Vec::new();
    let mut channels: BTreeMap<(String, String), f64> = BTreeMap::new();
    for f in now {
        let b = before.iter().find(|b| b.node == f.node);
        let (s, bs) = (&f.stats, b.map(|b| &b.stats));
        nodes.push(NodeLine {
            node: f.node.to_string(),
            services: s.services_live,
            asleep: s.services_asleep,
            handled_per_s: rate(bs.map_or(0, |b| b.processed), s.processed),
            in_per_s: rate(bs.map_or(0, |b| b.received_remote), s.received_remote),
            out_per_s: rate(bs.map_or(0, |b| b.sent_remote), s.sent_remote),
            migrations: f.migrations.committed,
            migrations_new: f
                .migrations
                .committed
                .saturating_sub(b.map_or(0, |b| b.migrations.committed)),
            freeze_p50_us_at_most: median_bound(&f.migrations.freeze_us_histogram),
            peers_connected: s.peers_connected,
        });
        for i in &f.services {
            services.push(ServiceLine {
                kind: i.addr.kind.to_string(),
                id: i.addr.id.to_string(),
                node: f.node.to_string(),
                mailbox_depth: i.mailbox_depth,
                mailbox_capacity: i.mailbox_capacity,
                epoch: i.epoch,
            });
        }
        // A channel between two nodes is seen by both: keep the larger rate.
        for c in &f.channels {
            let e = channels
                .entry((c.from.to_string(), c.to.to_string()))
                .or_default();
            *e = e.max(c.msgs_per_s);
        }
    }
    services.sort_by(|a, b| {
        b.mailbox_depth
            .cmp(&a.mailbox_depth)
            .then_with(|| a.id.cmp(&b.id))
    });
    services.truncate(TOP_ROWS);
    let mut channels: Vec<ChannelLine> = channels
        .into_iter()
        .map(|((from, to), msgs_per_s)| ChannelLine {
            from,
            to,
            msgs_per_s,
        })
        .collect();
    channels.sort_by(|a, b| b.msgs_per_s.total_cmp(&a.msgs_per_s));
    channels.truncate(TOP_ROWS);
    Top {
        interval_ms: interval.as_millis() as u64,
        nodes,
        services,
        channels,
        unreachable,
    }
}

fn print_top(top: &Top) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "{:<10} {:>8} {:>6} {:>10} {:>9} {:>9} {:>10} {:>12} {:>5}",
        "NODE",
        "SERVICES",
        "ASLEEP",
        "HANDLED/S",
        "IN/S",
        "OUT/S",
        "MIGRATED",
        "FREEZE P50",
        "PEERS"
    ));
    for n in &top.nodes {
        line(format!(
            "{:<10} {:>8} {:>6} {:>10.0} {:>9.0} {:>9.0} {:>10} {:>12} {:>5}",
            n.node,
            n.services,
            n.asleep,
            n.handled_per_s,
            n.in_per_s,
            n.out_per_s,
            if n.migrations_new > 0 {
                format!("{} (+{})", n.migrations, n.migrations_new)
            } else {
                n.migrations.to_string()
            },
            n.freeze_p50_us_at_most
                .map(|us| format!("<= {us} us"))
                .unwrap_or_else(|| "-".into()),
            n.peers_connected
        ));
    }
    line(String::new());
    line(format!(
        "{:<14} {:<33} {:<10} {:>13} {:>5}",
        "KIND", "ID", "NODE", "MAILBOX", "EPOCH"
    ));
    for s in &top.services {
        line(format!(
            "{:<14} {:<33} {:<10} {:>13} {:>5}",
            s.kind,
            s.id,
            s.node,
            format!("{}/{}", s.mailbox_depth, s.mailbox_capacity),
            s.epoch
        ));
    }
    if !top.channels.is_empty() {
        line(String::new());
        line(format!("{:<33}    {:<33} {:>9}", "FROM", "TO", "MSGS/S"));
        for c in &top.channels {
            line(format!(
                "{:<33} -> {:<33} {:>9.1}",
                c.from, c.to, c.msgs_per_s
            ));
        }
    }
    for (node, why) in &top.unreachable {
        line(format!("node {node} did not answer: {why}"));
    }
    printable(&out)
}

/// `tern top`: the cluster's nodes, services and channels, with rates over `every`. Once
/// (or with `--json`): two readings `every` apart, one view. Otherwise a new view every
/// `every` until interrupted (the screen redrawn on a terminal).
pub async fn top(
    entry: &AdminClient,
    identity: &NodeIdentity,
    every: Duration,
    once: bool,
    json: bool,
) -> Result<bool> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let (mut before, _) = gather(entry, identity).await?;
    let mut at = Instant::now();
    loop {
        tokio::time::sleep(every.saturating_sub(at.elapsed())).await;
        let (now, unreachable) = gather(entry, identity).await?;
        let interval = at.elapsed();
        at = Instant::now();
        let view = top_of(&before, &now, interval, unreachable);
        if json {
            super::print_json(&view)?;
            return Ok(view.unreachable.is_empty());
        }
        let text = print_top(&view);
        let mut stdout = std::io::stdout();
        if tty && !once {
            write!(stdout, "\x1b[2J\x1b[H")?;
        }
        write!(stdout, "{text}")?;
        if !once && !tty {
            writeln!(stdout)?;
        }
        stdout.flush()?;
        if once {
            return Ok(view.unreachable.is_empty());
        }
        before = now;
    }
}

fn print_events(events: &[NodeEvent]) -> Result<()> {
    let mut stdout = std::io::stdout();
    for e in events {
        writeln!(
            stdout,
            "{}",
            printable(&format!("#{:<6} {:<22} {}", e.n, e.kind, e.detail))
        )?;
    }
    stdout.flush()?;
    Ok(())
}

/// `tern events`: the entry node's kept events; with `follow`, then each new one as it comes
/// (asked every `every`) until the node goes away or the command is interrupted. Says so when
/// events came faster than the node keeps them.
pub async fn events(
    entry: &AdminClient,
    every: Duration,
    follow: bool,
    json: bool,
) -> Result<bool> {
    if follow && json {
        bail!(
            "--follow prints events as they come, --json one object: use one of them \
             (`tern events --json` prints the events kept now)"
        );
    }
    let (mut after, mut first) = (0, true);
    loop {
        let reply = match entry.request(&AdminRequest::Events { after }, |_| {}).await {
            Ok(r) => r,
            Err(e) if !first => {
                eprintln!(
                    "{}",
                    printable(&format!("tern: {} went away: {e}", entry.node()))
                );
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        let AdminReply::Events(events) = reply else {
            bail!("unexpected answer to events: {reply:?}");
        };
        if json {
            super::print_json(&events)?;
            return Ok(true);
        }
        if let Some(oldest) = events.first() {
            if !first && oldest.n > after + 1 {
                println!(
                    "... {} events came and went between two looks (the node keeps the last \
                     `events_max`)",
                    oldest.n - after - 1
                );
            }
        }
        print_events(&events)?;
        if let Some(last) = events.last() {
            after = last.n;
        }
        if !follow {
            return Ok(true);
        }
        first = false;
        tokio::time::sleep(every).await;
    }
}

/// `tern metrics`: the entry node's metrics as its endpoint serves them.
pub async fn metrics(entry: &AdminClient) -> Result<bool> {
    let reply = entry.request(&AdminRequest::Metrics, |_| {}).await?;
    let AdminReply::Metrics(text) = reply else {
        bail!("unexpected answer to metrics: {reply:?}");
    };
    print!("{}", printable(&text));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::median_bound;

    #[test]
    fn the_median_is_in_the_bucket_where_half_the_count_is_reached() {
        assert_eq!(median_bound(&[]), None);
        assert_eq!(median_bound(&[(1024, 1)]), Some(1024));
        assert_eq!(median_bound(&[(512, 1), (1024, 1), (4096, 1)]), Some(1024));
        assert_eq!(median_bound(&[(512, 3), (1024, 1)]), Some(512));
    }
}
