//! Shared pieces: run sizes, a completion latch, percentiles, memory readings.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// How much work each measurement does.
pub struct Scale {
    pub local_msgs: u64,
    pub idle_services: u64,
    pub remote_msgs: u64,
    pub rtt_samples: usize,
    pub repeats: usize,
}

impl Scale {
    pub fn quick() -> Self {
        Scale {
            local_msgs: 4_000_000,
            idle_services: 100_000,
            remote_msgs: 2_000_000,
            rtt_samples: 5_000,
            repeats: 5,
        }
    }
    pub fn full() -> Self {
        Scale {
            local_msgs: 10_000_000,
            idle_services: 100_000,
            remote_msgs: 5_000_000,
            rtt_samples: 20_000,
            repeats: 5,
        }
    }
}

/// A one-shot completion signal shared by a consumer on another thread and the timer.
pub struct Latch {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Latch {
    pub const fn new() -> Self {
        Latch {
            done: Mutex::new(false),
            cv: Condvar::new(),
        }
    }
    pub fn reset(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = false;
    }
    pub fn is_done(&self) -> bool {
        *self.done.lock().unwrap_or_else(|p| p.into_inner())
    }
    pub fn signal(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_all();
    }
    /// Waits for the signal; the instant it was seen.
    pub fn wait(&self, timeout: Duration, what: &str) -> Result<Instant> {
        let guard = self.done.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, res) = self
            .cv
            .wait_timeout_while(guard, timeout, |done| !*done)
            .unwrap_or_else(|p| p.into_inner());
        if res.timed_out() && !*guard {
            bail!("{what} did not finish within {timeout:?}");
        }
        Ok(Instant::now())
    }
}

/// The median of `runs`.
pub fn median(mut runs: Vec<f64>) -> f64 {
    runs.sort_by(|a, b| a.total_cmp(b));
    runs[runs.len() / 2]
}

/// The median of the ratios of paired runs: run i of `a` over run i of `b`.
pub fn median_ratio(a: &[f64], b: &[f64]) -> f64 {
    median(a.iter().zip(b).map(|(x, y)| x / y).collect())
}

/// A peer's median rate and Tern's ratio to it (the median of paired runs), if it ran.
pub fn peer_figures(tern_runs: &[f64], peer_runs: Vec<f64>) -> Option<(f64, f64)> {
    if peer_runs.len() != tern_runs.len() || peer_runs.is_empty() {
        return None;
    }
    let ratio = median_ratio(tern_runs, &peer_runs);
    Some((median(peer_runs), ratio))
}

/// (p50, p99) of microsecond samples.
pub fn percentiles(mut us: Vec<u64>) -> (u64, u64) {
    us.sort_unstable();
    let n = us.len();
    (us[n / 2], us[(n * 99 / 100).min(n - 1)])
}

/// Resident memory of this process in bytes, from /proc/self/statm.
pub fn resident_bytes() -> Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc/self/statm: {statm:?}"))?
        .parse()?;
    Ok(pages * 4096)
}

static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Marks the start of the run, for the times in progress lines.
pub fn start_clock() {
    let _ = STARTED.set(Instant::now());
}

pub fn progress(msg: &str) {
    let t = STARTED.get().map_or(0.0, |s| s.elapsed().as_secs_f64());
    eprintln!("tern-bench [{t:6.1}s]: {msg}");
}

pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// A raw quinn endpoint on loopback, on the same kind of socket a node uses
/// ([`tern::bind_udp`]), so that a baseline and Tern differ only in what runs above quinn.
pub fn raw_endpoint(server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint> {
    let udp = tern::bind_udp("127.0.0.1:0".parse()?)?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        udp,
        std::sync::Arc::new(quinn::TokioRuntime),
    )?)
}
