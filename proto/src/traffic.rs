//! Observed traffic between services: messages and bytes per second per edge (sender ->
//! receiver), kept for at most `edges_max` edges (the heaviest stay: a new edge, when the
//! table is full, replaces the lightest one, as a top-K sketch does).
//!
//! Message counts are exact, not sampled: they come from the channel numbering (each sender
//! numbers its messages per receiver, so the last number taken is a running count). Sizes are
//! sampled (one message in [`SIZE_SAMPLE_EVERY`]) and bytes per second is the message rate
//! times the mean sampled size. No I/O and no clock: time comes in as milliseconds.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::ids::ServiceId;

/// One message in this many has its encoded size measured.
pub const SIZE_SAMPLE_EVERY: u64 = 256;

/// Rates below this (messages per second) with nothing new are forgotten at a roll.
const RATE_FORGET: f64 = 0.01;

#[derive(Clone, Debug)]
struct Edge {
    /// Last channel number seen; the next observation counts from it.
    last_seq: u64,
    /// Messages since the last roll.
    window_msgs: u64,
    /// Smoothed messages per second.
    msgs_per_s: f64,
    /// Mean sampled message size, in bytes (0 before any sample).
    size_bytes: f64,
    /// Messages seen in all, since the edge entered the table.
    total_msgs: u64,
}

/// One edge as reported.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EdgeRate {
    /// The sender.
    pub from: ServiceId,
    /// The receiver.
    pub to: ServiceId,
    /// Messages per second, smoothed over the last few seconds.
    pub msgs_per_s: f64,
    /// Bytes per second: the message rate times the mean sampled size (0 before a sample).
    pub bytes_per_s: f64,
    /// Messages counted since the edge entered the table.
    pub total_msgs: u64,
}

/// The bounded table of edges.
#[derive(Debug)]
pub struct TrafficSketch {
    edges: HashMap<(ServiceId, ServiceId), Edge>,
    edges_max: usize,
    last_roll_ms: u64,
    /// Edges replaced because the table was full.
    pub evicted: u64,
}

impl TrafficSketch {
    /// An empty table of at most `edges_max` edges.
    pub fn new(edges_max: usize) -> Self {
        TrafficSketch {
            edges: HashMap::new(),
            edges_max,
            last_roll_ms: 0,
            evicted: 0,
        }
    }

    /// Edges held.
    pub fn len(&self) -> usize {
        self.edges.len()
    }

    /// True when no edge is held.
    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }

    /// `to` has taken `from`'s messages up to number `seq`. The first observation of an edge
    /// only sets its baseline (a service that just arrived brings numbers from elsewhere).
    pub fn observe(&mut self, from: ServiceId, to: ServiceId, seq: u64) {
        if let Some(e) = self.edges.get_mut(&(from, to)) {
            if seq > e.last_seq {
                let n = seq - e.last_seq;
                e.window_msgs += n;
                e.total_msgs += n;
                e.last_seq = seq;
            }
            return;
        }
        if self.edges_max == 0 {
            return;
        }
        if self.edges.len() >= self.edges_max {
            // Replace the lightest edge.
            let lightest = self
                .edges
                .iter()
                .min_by(|a, b| weight(a.1).total_cmp(&weight(b.1)))
                .map(|(k, _)| *k);
            if let Some(k) = lightest {
                self.edges.remove(&k);
                self.evicted += 1;
            }
        }
        self.edges.insert(
            (from, to),
            Edge {
                last_seq: seq,
                window_msgs: 0,
                msgs_per_s: 0.0,
                size_bytes: 0.0,
                total_msgs: 0,
            },
        );
        debug_assert!(self.edges.len() <= self.edges_max);
    }

    /// A sampled message of `bytes` on the edge (ignored if the edge is not held).
    pub fn sample_size(&mut self, from: ServiceId, to: ServiceId, bytes: usize) {
        if let Some(e) = self.edges.get_mut(&(from, to)) {
            e.size_bytes = if e.size_bytes == 0.0 {
                bytes as f64
            } else {
                0.8 * e.size_bytes + 0.2 * bytes as f64
            };
        }
    }

    /// Closes the current window at `now_ms`: each rate becomes the mean of its old value and
    /// the window's; quiet, slow edges are forgotten.
    pub fn roll(&mut self, now_ms: u64) {
        let elapsed_ms = now_ms.saturating_sub(self.last_roll_ms);
        if elapsed_ms == 0 {
            return;
        }
        self.last_roll_ms = now_ms;
        let secs = elapsed_ms as f64 / 1000.0;
        self.edges.retain(|_, e| {
            let rate = e.window_msgs as f64 / secs;
            e.msgs_per_s = 0.5 * e.msgs_per_s + 0.5 * rate;
            let keep = e.window_msgs > 0 || e.msgs_per_s >= RATE_FORGET;
            e.window_msgs = 0;
            keep
        });
    }

    /// Forgets every edge of `id` (it left this node; its new node observes it now).
    pub fn forget(&mut self, id: ServiceId) {
        self.edges.retain(|(f, t), _| *f != id && *t != id);
    }

    /// The edges of `id`, in and out, heaviest first.
    pub fn edges_of(&self, id: ServiceId) -> Vec<EdgeRate> {
        let mut out: Vec<EdgeRate> = self
            .edges
            .iter()
            .filter(|((f, t), _)| *f == id || *t == id)
            .map(|(k, e)| rate_of(k, e))
            .collect();
        out.sort_by(|a, b| b.msgs_per_s.total_cmp(&a.msgs_per_s));
        out
    }

    /// Every edge held, heaviest first.
    pub fn all(&self) -> Vec<EdgeRate> {
        let mut out: Vec<EdgeRate> = self.edges.iter().map(|(k, e)| rate_of(k, e)).collect();
        out.sort_by(|a, b| b.msgs_per_s.total_cmp(&a.msgs_per_s));
        out
    }
}

fn weight(e: &Edge) -> f64 {
    e.msgs_per_s + e.window_msgs as f64
}

fn rate_of(k: &(ServiceId, ServiceId), e: &Edge) -> EdgeRate {
    EdgeRate {
        from: k.0,
        to: k.1,
        msgs_per_s: e.msgs_per_s,
        bytes_per_s: e.msgs_per_s * e.size_bytes,
        total_msgs: e.total_msgs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> ServiceId {
        ServiceId::from_parts(1, n)
    }

    #[test]
    fn counts_come_from_numbers_and_rates_from_windows() {
        let mut t = TrafficSketch::new(8);
        t.observe(id(1), id(2), 100); // baseline only
        t.observe(id(1), id(2), 150);
        t.observe(id(1), id(2), 140); // older mark: nothing
        t.sample_size(id(1), id(2), 40);
        t.roll(1000);
        let e = &t.edges_of(id(2))[0];
        assert_eq!(e.total_msgs, 50);
        assert!((e.msgs_per_s - 25.0).abs() < 1e-9, "{e:?}");
        assert!((e.bytes_per_s - 1000.0).abs() < 1e-9);
        t.observe(id(1), id(2), 250);
        t.roll(2000);
        assert!((t.edges_of(id(1))[0].msgs_per_s - 62.5).abs() < 1e-9);
        // Quiet: the rate halves each roll until it is forgotten.
        for s in 3..40 {
            t.roll(s * 1000);
        }
        assert!(t.is_empty());
    }

    #[test]
    fn a_full_table_keeps_the_heaviest_edges() {
        let mut t = TrafficSketch::new(3);
        for (k, n) in [(1, 1000), (2, 10), (3, 500)] {
            t.observe(id(k), id(100), 0);
            t.observe(id(k), id(100), n);
        }
        t.roll(1000);
        t.observe(id(4), id(100), 0);
        t.observe(id(4), id(100), 300);
        assert_eq!(t.len(), 3);
        assert_eq!(t.evicted, 1);
        let senders: Vec<ServiceId> = t.edges_of(id(100)).iter().map(|e| e.from).collect();
        assert!(!senders.contains(&id(2)), "the lightest went: {senders:?}");
        assert!(senders.contains(&id(1)) && senders.contains(&id(3)));
    }
}
