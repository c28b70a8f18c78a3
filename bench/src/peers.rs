//! Peer actor runtimes as baselines, built only with the `peers` feature:
//! - ractor with ractor_cluster: remote casts and calls between two nodes on loopback over its
//!   TLS transport (mutual TLS 1.3 with the ring provider and the same certificates as Tern's
//!   nodes). ractor's process groups and registry are process-wide, so the two nodes are two
//!   processes: this binary runs the receiving node when started as [`RACTOR_SINK_ARG`].
//! - kameo: the local consumer of the `local` section, as a kameo actor.
//!
//! Each node or system runs on one thread (a current-thread tokio runtime), as each Tern node
//! and the actix baseline do.

use std::io::{BufRead as _, BufReader, Read as _};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use ractor::{ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::{IncomingEncryptionMode, NodeServer, RactorClusterMessage};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tern::certs::{ClusterCa, NodeIdentity};

use crate::remote::{RactorFigures, PAYLOAD_BYTES};
use crate::util::{percentiles, progress, Latch};

/// The first argument that makes this binary the receiving ractor node (internal).
pub const RACTOR_SINK_ARG: &str = "--ractor-sink-node";
/// Both ractor nodes' cookie (ractor_cluster's shared-secret handshake, inside TLS).
const COOKIE: &str = "tern-bench";
/// The process group the sink joins, through which the driver finds it.
const GROUP: &str = "tern-bench-sink";
/// Casts between two yields of the sending task, as in Tern's and actix's drivers.
const BATCH: u64 = 1_000;
const SINK_NAME: &str = "ractor-sink";
const DRIVER_NAME: &str = "ractor-driver";

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn roots(id: &NodeIdentity) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(id.ca_der.clone()))?;
    Ok(Arc::new(roots))
}

fn chain(id: &NodeIdentity) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        vec![CertificateDer::from(id.cert_der.clone())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_der.clone())),
    )
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The sink's side: TLS 1.3, a certificate from the cluster CA, clients must present one too.
fn server_tls(id: &NodeIdentity) -> Result<rustls::ServerConfig> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(id)?, provider())
            .build()?;
    let (certs, key) = chain(id);
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?)
}

/// The driver's side: trusts only the cluster CA and presents its own certificate.
fn client_tls(id: &NodeIdentity) -> Result<rustls::ClientConfig> {
    let (certs, key) = chain(id);
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(id)?)
        .with_client_auth_cert(certs, key)?)
}

/// A loopback port free at the time of asking (ractor_cluster's listener takes a port number).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[derive(RactorClusterMessage)]
pub enum SinkMsg {
    Payload(Vec<u8>),
    /// How many payloads arrived since the last `Take`.
    #[rpc]
    Take(RpcReplyPort<u64>),
    #[rpc]
    Echo(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

/// Counts payloads and answers echoes: `PayloadSink` of the remote section, in ractor.
struct RactorSink;

impl ractor::Actor for RactorSink {
    type Msg = SinkMsg;
    /// Payloads since the last take, and their bytes.
    type State = (u64, u64);
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ActorRef<SinkMsg>,
        _args: (),
    ) -> Result<(u64, u64), ActorProcessingErr> {
        Ok((0, 0))
    }

    async fn handle(
        &self,
        _myself: ActorRef<SinkMsg>,
        msg: SinkMsg,
        state: &mut (u64, u64),
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SinkMsg::Payload(p) => {
                state.0 += 1;
                state.1 += p.len() as u64;
            }
            SinkMsg::Take(reply) => {
                reply.send(std::mem::take(&mut state.0))?;
            }
            SinkMsg::Echo(p, reply) => reply.send(p)?,
        }
        Ok(())
    }
}

/// The receiving ractor node, run in a child process: loads its identity from `dir`, listens,
/// prints its port on stdout, and runs until its stdin closes.
pub fn ractor_sink_main(dir: &Path) -> Result<()> {
    let (cert, key, ca) = NodeIdentity::paths(dir, SINK_NAME);
    let id = NodeIdentity::load(&cert, &key, &ca)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(&id)?));
    runtime()?.block_on(async move {
        let port = free_port()?;
        let server = NodeServer::new(
            port,
            COOKIE.into(),
            SINK_NAME.into(),
            "localhost".into(),
            Some(IncomingEncryptionMode::Tls(acceptor)),
            None,
        )
        .with_listen_addr(LOOPBACK);
        let (node, _) = ractor::Actor::spawn(None, server, ())
            .await
            .map_err(|e| anyhow!("ractor sink node: {e}"))?;
        let (sink, _) = ractor::Actor::spawn(None, RactorSink, ())
            .await
            .map_err(|e| anyhow!("ractor sink: {e}"))?;
        ractor::pg::join(GROUP.into(), vec![sink.get_cell()]);
        println!("{port}");
        // The parent closes stdin when it is done with this node.
        tokio::task::spawn_blocking(|| {
            let mut rest = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut rest);
        })
        .await?;
        sink.stop(None);
        node.stop(None);
        Ok(())
    })
}

/// The child process running the sink node; closing its stdin ends it.
struct SinkProcess {
    child: Child,
    port: u16,
}

impl SinkProcess {
    fn start(dir: &Path) -> Result<Self> {
        let exe = std::env::current_exe().context("finding tern-bench's own executable")?;
        let mut child = Command::new(exe)
            .arg(RACTOR_SINK_ARG)
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the ractor sink node")?;
        let stdout = child.stdout.take().context("the sink node's stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let port = match line.trim().parse() {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                bail!("the ractor sink node printed {line:?} instead of its port");
            }
        };
        Ok(SinkProcess { child, port })
    }
}

impl Drop for SinkProcess {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// ractor_cluster, over TLS between two processes on loopback: `repeats` runs of `total` casts
/// of a 64-byte payload (after one warm-up run of a tenth), then `samples` echo calls.
pub fn ractor_remote(total: u64, repeats: usize, samples: usize) -> Result<RactorFigures> {
    let dir = std::env::temp_dir().join(format!("tern-bench-ractor-{}", std::process::id()));
    let ca = ClusterCa::new()?;
    ca.issue(SINK_NAME)?.write(&dir)?;
    let driver_id = ca.issue(DRIVER_NAME)?;
    let sink_node = SinkProcess::start(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let sink_node = sink_node?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(&driver_id)?));
    let port = sink_node.port;
    let figures = runtime()?.block_on(async move {
        let server = NodeServer::new(
            free_port()?,
            COOKIE.into(),
            DRIVER_NAME.into(),
            "localhost".into(),
            None,
            None,
        )
        .with_listen_addr(LOOPBACK);
        let (node, _) = ractor::Actor::spawn(None, server, ())
            .await
            .map_err(|e| anyhow!("ractor driver node: {e}"))?;
        ractor_cluster::client_connect_enc(
            &node,
            (LOOPBACK, port),
            connector,
            ServerName::try_from(SINK_NAME)?,
        )
        .await
        .map_err(|e| anyhow!("connecting to the ractor sink node: {e}"))?;
        let sink = find_sink().await?;
        let payload = vec![7u8; PAYLOAD_BYTES];
        let mut runs = Vec::new();
        take(&sink).await?;
        for (i, n) in std::iter::once(total / 10)
            .chain(std::iter::repeat_n(total, repeats))
            .enumerate()
        {
            let t0 = Instant::now();
            for k in 0..n {
                sink.cast(SinkMsg::Payload(payload.clone()))
                    .map_err(|e| anyhow!("ractor cast: {e}"))?;
                if k % BATCH == BATCH - 1 {
                    tokio::task::yield_now().await;
                }
            }
            // Casts and the call travel one session in order: the answer counts them all.
            let got = take(&sink).await?;
            let rate = n as f64 / t0.elapsed().as_secs_f64();
            if got != n {
                bail!("the ractor sink counted {got} of {n} casts");
            }
            if i > 0 {
                progress(&format!("ractor_cluster run {i}: {rate:.0} msgs/s"));
                runs.push(rate);
            }
        }
        let mut rtts = Vec::with_capacity(samples);
        for i in 0..samples + samples / 10 {
            let t = Instant::now();
            let back = call(&sink, |r| SinkMsg::Echo(payload.clone(), r)).await?;
            if back.len() != PAYLOAD_BYTES {
                bail!("a ractor echo of {} bytes", back.len());
            }
            if i >= samples / 10 {
                rtts.push(t.elapsed().as_micros() as u64);
            }
        }
        let (call_p50_us, call_p99_us) = percentiles(rtts);
        node.stop(None);
        Ok(RactorFigures {
            runs,
            call_p50_us,
            call_p99_us,
        })
    });
    drop(sink_node);
    figures
}

async fn call<T: Send + 'static>(
    sink: &ActorRef<SinkMsg>,
    msg: impl FnOnce(RpcReplyPort<T>) -> SinkMsg,
) -> Result<T> {
    match sink
        .call(msg, Some(Duration::from_secs(120)))
        .await
        .map_err(|e| anyhow!("ractor call: {e}"))?
    {
        ractor::rpc::CallResult::Success(v) => Ok(v),
        ractor::rpc::CallResult::Timeout => bail!("a ractor call timed out"),
        ractor::rpc::CallResult::SenderError => bail!("a ractor call's reply port was dropped"),
    }
}

async fn take(sink: &ActorRef<SinkMsg>) -> Result<u64> {
    call(sink, SinkMsg::Take).await
}

/// Waits until the sink node's process group reaches this node as a remote actor.
async fn find_sink() -> Result<ActorRef<SinkMsg>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let remote = ractor::pg::get_members(&GROUP.to_string())
            .into_iter()
            .find(|cell| !cell.get_id().is_local());
        if let Some(cell) = remote {
            return Ok(cell.into());
        }
        if Instant::now() > deadline {
            bail!("the ractor sink did not join this node's process group within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// kameo: the local section's consumer.

static KAMEO_DONE: Latch = Latch::new();

struct KameoSum {
    sum: u64,
    count: u64,
    target: u64,
}

impl kameo::Actor for KameoSum {
    type Args = Self;
    type Error = kameo::error::Infallible;
    async fn on_start(
        state: Self,
        _actor_ref: kameo::actor::ActorRef<Self>,
    ) -> Result<Self, Self::Error> {
        Ok(state)
    }
}

struct KameoAdd(u64);

impl kameo::message::Message<KameoAdd> for KameoSum {
    type Reply = ();
    async fn handle(&mut self, msg: KameoAdd, _ctx: &mut kameo::message::Context<Self, ()>) {
        self.sum = self.sum.wrapping_add(msg.0);
        self.count += 1;
        if self.count == self.target {
            KAMEO_DONE.signal();
        }
    }
}

/// `total` tells to a kameo actor from a task on the same thread, yielding every 1,000 as the
/// actix and Tern drivers do. kameo's default mailbox is bounded (64); its `tell` waits for
/// room, as Tern's `tell_wait` does.
pub fn kameo_local(total: u64) -> Result<f64> {
    use kameo::actor::Spawn as _;
    KAMEO_DONE.reset();
    let t0 = Instant::now();
    runtime()?.block_on(async move {
        let sum = KameoSum::spawn(KameoSum {
            sum: 0,
            count: 0,
            target: total,
        });
        for i in 0..total {
            sum.tell(KameoAdd(i))
                .await
                .map_err(|e| anyhow!("kameo tell: {e}"))?;
            if i % BATCH == BATCH - 1 {
                tokio::task::yield_now().await;
            }
        }
        while !KAMEO_DONE.is_done() {
            tokio::task::yield_now().await;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let end = KAMEO_DONE.wait(Duration::from_secs(60), "kameo local run")?;
    Ok(total as f64 / (end - t0).as_secs_f64())
}
