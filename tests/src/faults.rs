//! Fault injection under QUIC: a UDP socket wrapper each harness node runs on, controlled from
//! tests through [`Faults`]. It acts on the datagrams a node sends: drop a fraction of them,
//! hold them back for a delay with jitter, cut the way to some peers (one direction: only
//! this node's sends; both: cut both nodes), or drop everything (a node that dies without a
//! goodbye). Every random choice comes from one seeded generator per node, so a run's fault
//! decisions follow from its seed.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// What a node's socket does to what it sends.
#[derive(Debug, Clone, Default)]
struct Plan {
    /// Fraction of datagrams dropped, 0.0 to 1.0.
    drop_rate: f64,
    /// Extra delay for every datagram, and up to this much more at random.
    delay: Duration,
    jitter: Duration,
    /// Destinations nothing reaches.
    cut: BTreeSet<SocketAddr>,
    /// Nothing leaves at all.
    dead: bool,
}

/// Counts of what the wrapper did, for a run's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Datagrams passed on at once.
    pub sent: u64,
    /// Dropped at random.
    pub dropped: u64,
    /// Dropped because their destination was cut, or the node dead.
    pub cut: u64,
    /// Held back and sent later.
    pub delayed: u64,
}

struct State {
    plan: Plan,
    rng: u64,
    counts: FaultCounts,
    /// Datagrams held back right now, at most `HELD_MAX`.
    held: usize,
}

/// Datagrams one socket holds back at once; past this a datagram to delay is dropped instead
/// (and counted as dropped), as a full router queue would.
pub const HELD_MAX: usize = 16_384;

impl State {
    /// xorshift64*: small, fast and fully determined by the seed.
    fn next(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn chance(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The control for one node's socket. Cheap to clone; every clone acts on the same socket.
#[derive(Clone)]
pub struct Faults {
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for Faults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("Faults")
            .field("plan", &st.plan)
            .field("counts", &st.counts)
            .finish()
    }
}

impl Faults {
    /// A control whose random choices follow from `seed` (0 is replaced by a fixed non-zero
    /// value, which the generator needs).
    pub fn new(seed: u64) -> Self {
        Faults {
            state: Arc::new(Mutex::new(State {
                plan: Plan::default(),
                rng: if seed == 0 {
                    0x9e37_79b9_7f4a_7c15
                } else {
                    seed
                },
                counts: FaultCounts::default(),
                held: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops each datagram this node sends with probability `rate` (clamped to 0..=1).
    pub fn drop_rate(&self, rate: f64) {
        self.lock().plan.drop_rate = rate.clamp(0.0, 1.0);
    }

    /// Holds every datagram back for `delay` plus up to `jitter` (so datagrams also reorder).
    pub fn delay(&self, delay: Duration, jitter: Duration) {
        let mut st = self.lock();
        st.plan.delay = delay;
        st.plan.jitter = jitter;
    }

    /// Nothing this node sends reaches `to` (one direction; cut the other node's socket too
    /// for both).
    pub fn cut(&self, to: SocketAddr) {
        self.lock().plan.cut.insert(to);
    }

    /// Undoes [`cut`](Self::cut) for `to`.
    pub fn heal(&self, to: SocketAddr) {
        self.lock().plan.cut.remove(&to);
    }

    /// Nothing leaves this node any more: it is gone without a goodbye.
    pub fn kill(&self) {
        self.lock().plan.dead = true;
    }

    /// Back to a clean network: no drops, no delay, no cuts, alive.
    pub fn clear(&self) {
        self.lock().plan = Plan::default();
    }

    /// What the wrapper has done so far.
    pub fn counts(&self) -> FaultCounts {
        self.lock().counts
    }

    /// The wrapper for a node's socket, for [`tern::NodeConfig::socket_wrap`].
    pub fn wrap(&self) -> tern::SocketWrap {
        let faults = self.clone();
        tern::SocketWrap(Arc::new(move |inner| {
            Arc::new(FaultySocket {
                inner,
                faults: faults.clone(),
            }) as Arc<dyn AsyncUdpSocket>
        }))
    }
}

/// What to do with one datagram.
enum Fate {
    Send,
    Drop,
    Later(Duration),
}

struct FaultySocket {
    inner: Arc<dyn AsyncUdpSocket>,
    faults: Faults,
}

impl fmt::Debug for FaultySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultySocket")
            .field("inner", &self.inner)
            .finish()
    }
}

impl FaultySocket {
    fn fate(&self, to: SocketAddr) -> Fate {
        let mut st = self.faults.lock();
        if st.plan.dead || st.plan.cut.contains(&to) {
            st.counts.cut += 1;
            return Fate::Drop;
        }
        if st.plan.drop_rate > 0.0 && st.chance() < st.plan.drop_rate {
            st.counts.dropped += 1;
            return Fate::Drop;
        }
        if st.plan.delay.is_zero() && st.plan.jitter.is_zero() {
            st.counts.sent += 1;
            return Fate::Send;
        }
        if st.held >= HELD_MAX {
            st.counts.dropped += 1;
            return Fate::Drop;
        }
        st.held += 1;
        let jitter_ns = st.plan.jitter.as_nanos() as u64;
        let extra = if jitter_ns == 0 {
            0
        } else {
            st.next() % jitter_ns
        };
        st.counts.delayed += 1;
        Fate::Later(st.plan.delay + Duration::from_nanos(extra))
    }
}

impl AsyncUdpSocket for FaultySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        match self.fate(transmit.destination) {
            Fate::Send => self.inner.try_send(transmit),
            // A lost datagram is what UDP does anyway: report it sent.
            Fate::Drop => Ok(()),
            Fate::Later(after) => {
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    self.faults.lock().held -= 1;
                    return self.inner.try_send(transmit);
                };
                let faults = self.faults.clone();
                let (inner, to, ecn, src_ip) = (
                    self.inner.clone(),
                    transmit.destination,
                    transmit.ecn,
                    transmit.src_ip,
                );
                let contents = transmit.contents.to_vec();
                rt.spawn(async move {
                    tokio::time::sleep(after).await;
                    // A full socket buffer later is a loss, as on a real network.
                    let _ = inner.try_send(&Transmit {
                        destination: to,
                        ecn,
                        contents: &contents,
                        segment_size: None,
                        src_ip,
                    });
                    faults.lock().held -= 1;
                });
                Ok(())
            }
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// One datagram per send, so each gets its own fate.
    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
