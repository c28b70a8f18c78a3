//! Remote figures: Tern tells and asks between two nodes on loopback, against the same payloads
//! over a raw quinn stream (and a raw QUIC echo) with the same TLS and transport settings.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tern::certs::{ClusterCa, NodeIdentity};
use tern::{Ctx, ReplyTo, Service, ServiceAddr};
use tern_harness::{block_on, Cluster};

use crate::util::{median, percentiles, progress, round2, Latch, Scale};

/// Bytes of payload per message.
pub const PAYLOAD_BYTES: usize = 64;
/// Raw frame: 4-byte length, then the payload.
const RAW_FRAME_BYTES: usize = 4 + PAYLOAD_BYTES;

static REMOTE_DONE: Latch = Latch::new();

/// Counts payload messages and signals `done` at its target (the state of the benchmark's
/// sinks).
#[derive(Default, Serialize, Deserialize)]
pub struct PayloadCount {
    bytes: u64,
    count: u64,
    target: u64,
}

impl PayloadCount {
    /// Takes a target or a payload; gives back any other message.
    pub fn take(&mut self, msg: PayloadMsg, done: &Latch) -> Option<PayloadMsg> {
        match msg {
            PayloadMsg::Target(t) => {
                self.count = 0;
                self.target = t;
            }
            PayloadMsg::Payload(p) => {
                self.bytes += p.len() as u64;
                self.count += 1;
                if self.count == self.target {
                    done.signal();
                }
            }
            other => return Some(other),
        }
        None
    }
}

/// Counts payload messages; signals at `target`; answers echoes.
#[derive(Default, Serialize, Deserialize)]
pub struct PayloadSink(PayloadCount);

#[derive(Serialize, Deserialize)]
pub enum PayloadMsg {
    Target(u64),
    Payload(#[serde(with = "serde_bytes")] Vec<u8>),
    Echo {
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        reply: ReplyTo<serde_bytes::ByteBuf>,
    },
}

impl Service for PayloadSink {
    type Msg = PayloadMsg;
    const KIND: &'static str = "bench-payload-sink";
    const VERSION: u32 = 1;
    async fn handle(&mut self, msg: PayloadMsg, ctx: &mut Ctx<Self>) {
        if let Some(PayloadMsg::Echo { payload, reply }) = self.0.take(msg, &REMOTE_DONE) {
            let _ = ctx.reply(reply, serde_bytes::ByteBuf::from(payload));
        }
    }
}

/// Sends payloads to, or asks, the sink it is given.
#[derive(Default, Serialize, Deserialize)]
pub struct RemoteDriver;

#[derive(Serialize, Deserialize)]
pub enum RemoteDriverMsg {
    Tells {
        to: ServiceAddr,
        total: u64,
    },
    Asks {
        to: ServiceAddr,
        count: usize,
        reply: ReplyTo<Vec<u64>>,
    },
}

impl Service for RemoteDriver {
    type Msg = RemoteDriverMsg;
    const KIND: &'static str = "bench-remote-driver";
    const VERSION: u32 = 1;
    async fn handle(&mut self, msg: RemoteDriverMsg, ctx: &mut Ctx<Self>) {
        let to = match &msg {
            RemoteDriverMsg::Tells { to, .. } | RemoteDriverMsg::Asks { to, .. } => to.clone(),
        };
        let _ = ctx.book_insert("sink", to);
        let sink = match ctx.book_ref::<PayloadSink>("sink") {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tern-bench: driver cannot reach the sink: {e}");
                return;
            }
        };
        let payload = vec![7u8; PAYLOAD_BYTES];
        match msg {
            RemoteDriverMsg::Tells { total, .. } => {
                for _ in 0..total {
                    if let Err(e) = ctx
                        .tell_wait(&sink, PayloadMsg::Payload(payload.clone()))
                        .await
                    {
                        eprintln!("tern-bench: remote tell failed: {e}");
                        return;
                    }
                }
            }
            RemoteDriverMsg::Asks { count, reply, .. } => {
                let mut rtts = Vec::with_capacity(count);
                for _ in 0..count {
                    let t = Instant::now();
                    let p = payload.clone();
                    let res = ctx
                        .ask(
                            &sink,
                            |reply| PayloadMsg::Echo { payload: p, reply },
                            Duration::from_secs(5),
                        )
                        .await;
                    match res {
                        Ok(echo) if echo.len() == PAYLOAD_BYTES => {
                            rtts.push(t.elapsed().as_micros() as u64)
                        }
                        Ok(_) => eprintln!("tern-bench: echo of the wrong size"),
                        Err(e) => eprintln!("tern-bench: ask failed: {e}"),
                    }
                }
                let _ = ctx.reply(reply, rtts);
            }
        }
    }
}

fn tern_figures(scale: &Scale) -> Result<(Vec<f64>, u64, u64)> {
    let cluster = Cluster::builder()
        .node("bench-a", &[])
        .node("bench-b", &[])
        .setup(|n| {
            n.register::<PayloadSink>().register::<RemoteDriver>();
        })
        .start()?;
    cluster.wait_connected(Duration::from_secs(10))?;
    let (a, b) = (cluster.node("bench-a"), cluster.node("bench-b"));
    let sink = b.spawn(PayloadSink::default())?;
    let driver = a.spawn(RemoteDriver)?;

    let mut runs = Vec::new();
    let warm = scale.remote_msgs / 10;
    for (i, total) in std::iter::once(warm)
        .chain(std::iter::repeat_n(scale.remote_msgs, scale.repeats))
        .enumerate()
    {
        REMOTE_DONE.reset();
        sink.tell(PayloadMsg::Target(total))?;
        // Let the target land before timing starts.
        std::thread::sleep(Duration::from_millis(20));
        let t0 = Instant::now();
        driver.tell(RemoteDriverMsg::Tells {
            to: sink.addr().clone(),
            total,
        })?;
        let end = REMOTE_DONE.wait(Duration::from_secs(120), "tern remote tells")?;
        let rate = total as f64 / (end - t0).as_secs_f64();
        if i > 0 {
            progress(&format!("remote run {i}: tern {rate:.0} msgs/s"));
            runs.push(rate);
        }
    }
    let rtts = block_on(driver.ask(
        |reply| RemoteDriverMsg::Asks {
            to: sink.addr().clone(),
            count: scale.rtt_samples,
            reply,
        },
        Duration::from_secs(300),
    ))?;
    if rtts.len() != scale.rtt_samples {
        return Err(anyhow!(
            "{} of {} asks answered",
            rtts.len(),
            scale.rtt_samples
        ));
    }
    let (p50, p99) = percentiles(rtts);
    progress(&format!("tern ask rtt p50 {p50} us, p99 {p99} us"));
    cluster.shutdown();
    Ok((runs, p50, p99))
}

/// Runs `f` on a fresh thread with its own actix system (as a node would be).
fn on_thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T>>>> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || actix_rt::System::new().block_on(f()))
        .expect("spawning a benchmark thread")
}

fn endpoints(ca: &ClusterCa) -> Result<(NodeIdentity, NodeIdentity)> {
    Ok((ca.issue("raw-server")?, ca.issue("raw-client")?))
}

/// The same payloads, framed, over one raw quinn stream between two endpoints.
fn raw_throughput(ca: &ClusterCa, total: u64) -> Result<f64> {
    let (sid, cid) = endpoints(ca)?;
    REMOTE_DONE.reset();
    let (addr_tx, addr_rx) = mpsc::channel();
    let server = on_thread("raw-server", move || {
        Box::pin(async move {
            let ep = crate::util::raw_endpoint(Some(tern::tls::server_config(&sid)?))?;
            addr_tx.send(ep.local_addr()?)?;
            let conn = ep.accept().await.context("no connection")?.await?;
            let mut recv = conn.accept_uni().await?;
            let mut count = 0u64;
            let mut partial = 0usize;
            let mut checksum = 0u64;
            while let Some(chunk) = recv.read_chunk(64 * 1024, true).await? {
                // Walk the frames: a length prefix, then the payload.
                let mut at = 0usize;
                let bytes = &chunk.bytes;
                if partial > 0 {
                    let take = partial.min(bytes.len());
                    at += take;
                    partial -= take;
                    if partial == 0 {
                        count += 1;
                    }
                }
                while at < bytes.len() {
                    if bytes.len() - at >= RAW_FRAME_BYTES {
                        let len = u32::from_be_bytes([
                            bytes[at],
                            bytes[at + 1],
                            bytes[at + 2],
                            bytes[at + 3],
                        ]);
                        checksum = checksum.wrapping_add(len as u64 + bytes[at + 4] as u64);
                        at += RAW_FRAME_BYTES;
                        count += 1;
                    } else {
                        partial = RAW_FRAME_BYTES - (bytes.len() - at);
                        at = bytes.len();
                    }
                }
                if count >= total {
                    REMOTE_DONE.signal();
                }
            }
            std::hint::black_box(checksum);
            conn.close(0u32.into(), b"done");
            ep.wait_idle().await;
            Ok(count)
        })
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(10))?;
    let (ready_tx, ready_rx) = mpsc::channel();
    let client = on_thread("raw-client", move || {
        Box::pin(async move {
            let mut ep = crate::util::raw_endpoint(None)?;
            ep.set_default_client_config(tern::tls::client_config(&cid)?);
            let conn = ep.connect(addr, "raw-server")?.await?;
            let mut send = conn.open_uni().await?;
            let start = Instant::now();
            ready_tx.send(start)?;
            let payload = [7u8; PAYLOAD_BYTES];
            let mut buf = Vec::with_capacity(1024 * RAW_FRAME_BYTES);
            let mut sent = 0u64;
            while sent < total {
                buf.clear();
                while buf.len() + RAW_FRAME_BYTES <= 64 * 1024 && sent < total {
                    buf.extend_from_slice(&(PAYLOAD_BYTES as u32).to_be_bytes());
                    buf.extend_from_slice(&payload);
                    sent += 1;
                }
                send.write_all(&buf).await?;
            }
            send.finish()?;
            // Keep the connection until the server has read everything.
            let _ = tokio::time::timeout(Duration::from_secs(120), conn.closed()).await;
            Ok(())
        })
    });
    let t0 = ready_rx.recv_timeout(Duration::from_secs(10))?;
    let end = REMOTE_DONE.wait(Duration::from_secs(120), "raw quinn stream")?;
    let counted = server
        .join()
        .map_err(|_| anyhow!("raw server panicked"))??;
    // The server returned, so its endpoint is gone and the client's connection closes.
    let _ = client.join();
    if counted < total {
        return Err(anyhow!("raw server counted {counted} of {total} frames"));
    }
    Ok(total as f64 / (end - t0).as_secs_f64())
}

/// Round trips of one framed payload echoed over a raw QUIC stream.
fn raw_echo(ca: &ClusterCa, samples: usize) -> Result<(u64, u64)> {
    let (sid, cid) = endpoints(ca)?;
    let (addr_tx, addr_rx) = mpsc::channel();
    let server = on_thread("echo-server", move || {
        Box::pin(async move {
            let ep = crate::util::raw_endpoint(Some(tern::tls::server_config(&sid)?))?;
            addr_tx.send(ep.local_addr()?)?;
            let conn = ep.accept().await.context("no connection")?.await?;
            let (mut send, mut recv) = conn.accept_bi().await?;
            let mut frame = [0u8; RAW_FRAME_BYTES];
            while recv.read_exact(&mut frame).await.is_ok() {
                send.write_all(&frame).await?;
            }
            conn.close(0u32.into(), b"done");
            ep.wait_idle().await;
            Ok(())
        })
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(10))?;
    let client = on_thread("echo-client", move || {
        Box::pin(async move {
            let mut ep = crate::util::raw_endpoint(None)?;
            ep.set_default_client_config(tern::tls::client_config(&cid)?);
            let conn = ep.connect(addr, "raw-server")?.await?;
            let (mut send, mut recv) = conn.open_bi().await?;
            let mut frame = [7u8; RAW_FRAME_BYTES];
            frame[..4].copy_from_slice(&(PAYLOAD_BYTES as u32).to_be_bytes());
            let mut back = [0u8; RAW_FRAME_BYTES];
            let mut rtts = Vec::with_capacity(samples);
            for i in 0..samples + samples / 10 {
                let t = Instant::now();
                send.write_all(&frame).await?;
                recv.read_exact(&mut back).await?;
                if i >= samples / 10 {
                    rtts.push(t.elapsed().as_micros() as u64);
                }
            }
            send.finish()?;
            conn.close(0u32.into(), b"done");
            ep.wait_idle().await;
            Ok(rtts)
        })
    });
    let rtts = client
        .join()
        .map_err(|_| anyhow!("echo client panicked"))??;
    let _ = server.join();
    Ok(percentiles(rtts))
}

pub fn run(scale: &Scale) -> Result<Value> {
    let (tern_runs, ask_p50, ask_p99) = tern_figures(scale)?;
    let ca = ClusterCa::new()?;
    let mut raw_runs = Vec::new();
    raw_throughput(&ca, scale.remote_msgs / 10)?;
    for r in 0..scale.repeats {
        let rate = raw_throughput(&ca, scale.remote_msgs)?;
        progress(&format!("raw quinn run {}: {rate:.0} msgs/s", r + 1));
        raw_runs.push(rate);
    }
    // The nodes cannot run beside the raw endpoints without sharing the two cores, so the two
    // series run one after the other; run i of each is paired, and the ratio is the median of
    // the pairs' ratios.
    let ratio = crate::util::median_ratio(&tern_runs, &raw_runs);
    let tern_rate = median(tern_runs.clone());
    let raw_rate = median(raw_runs);
    let (echo_p50, echo_p99) = raw_echo(&ca, scale.rtt_samples)?;
    progress(&format!(
        "raw quic echo rtt p50 {echo_p50} us, p99 {echo_p99} us"
    ));
    let ractor = ractor_figures(scale)?;
    let mut out = json!({
        "payload_bytes": PAYLOAD_BYTES,
        "tern_tell_msgs_per_s": tern_rate.round(),
        "quinn_raw_msgs_per_s": raw_rate.round(),
        "ratio": round2(ratio),
        "tern_ask_rtt_us_p50": ask_p50,
        "tern_ask_rtt_us_p99": ask_p99,
        "quic_echo_rtt_us_p50": echo_p50,
        "quic_echo_rtt_us_p99": echo_p99,
        "ask_to_echo_p50_ratio": round2(ask_p50 as f64 / echo_p50.max(1) as f64),
        "messages_per_run": scale.remote_msgs,
        "rtt_samples": scale.rtt_samples,
    });
    if let (Some(map), Some(r)) = (out.as_object_mut(), ractor) {
        if let Some((rate, ratio)) = crate::util::peer_figures(&tern_runs, r.runs) {
            map.insert("ractor_cluster_tls_msgs_per_s".into(), json!(rate.round()));
            map.insert("tern_to_ractor_ratio".into(), json!(round2(ratio)));
        }
        map.insert("ractor_call_rtt_us_p50".into(), json!(r.call_p50_us));
        map.insert("ractor_call_rtt_us_p99".into(), json!(r.call_p99_us));
        map.insert(
            "ask_to_ractor_call_p50_ratio".into(),
            json!(round2(ask_p50 as f64 / r.call_p50_us.max(1) as f64)),
        );
    }
    Ok(out)
}

/// ractor_cluster's casts and calls, when the bench is built with the `peers` feature.
#[cfg(feature = "peers")]
fn ractor_figures(scale: &Scale) -> Result<Option<RactorFigures>> {
    let r = crate::peers::ractor_remote(scale.remote_msgs, scale.repeats, scale.rtt_samples)?;
    progress(&format!(
        "ractor_cluster call rtt p50 {} us, p99 {} us",
        r.call_p50_us, r.call_p99_us
    ));
    Ok(Some(r))
}

#[cfg(not(feature = "peers"))]
fn ractor_figures(_scale: &Scale) -> Result<Option<RactorFigures>> {
    Ok(None)
}

/// What the ractor_cluster runs measured.
#[cfg_attr(not(feature = "peers"), allow(dead_code))]
pub struct RactorFigures {
    /// Casts per second, one figure per run.
    pub runs: Vec<f64>,
    pub call_p50_us: u64,
    pub call_p99_us: u64,
}
