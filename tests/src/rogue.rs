//! A rogue node: a member of the cluster with a valid certificate from its CA that speaks raw
//! frames, so a test can send a node anything at all, lies included, and read what it answers.
//!
//! ```no_run
//! use tern_harness::rogue::{Answer, Rogue};
//! use tern_proto::wire::{code, Frame, MigMsg};
//! # fn main() -> anyhow::Result<()> {
//! let cluster = tern_harness::Cluster::builder().node("a", &[]).start()?;
//! tern_harness::block_on(async {
//!     let mut rogue = Rogue::connect(&cluster, "mallory", "a").await?;
//!     let abort = MigMsg::Abort { source: "a".into(), n: 1 };
//!     rogue.send_ctrl(&Frame::Mig(abort)).await?;
//!     match rogue.answer().await? {
//!         Answer::ProtocolError(c, _) => assert_eq!(c, code::CLAIM_REFUSED),
//!         other => anyhow::bail!("{other:?}"),
//!     }
//!     Ok::<_, anyhow::Error>(())
//! })?;
//! # Ok(()) }
//! ```

use anyhow::{bail, Context, Result};
use tern::DeliveryError;
use tern_proto::wire::{self, encode_frame, Frame, FrameReader, MigMsg, ReplyBody};

use crate::Cluster;

/// Largest frame a rogue sends or reads.
pub const ROGUE_FRAME_BYTES_MAX: usize = 16 << 20;

/// The ask id of [`Rogue::send_data_and_wait`]'s barrier.
pub const BARRIER_ASK: u64 = 0xba77;

/// How long a rogue waits for an answer.
const ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A hand-driven peer on one connection to one node.
pub struct Rogue {
    /// The connection (open streams of its own on it).
    pub conn: quinn::Connection,
    /// The control stream, after the handshake.
    pub ctrl_send: quinn::SendStream,
    ctrl_recv: quinn::RecvStream,
    reader: FrameReader,
    name: String,
    _endpoint: quinn::Endpoint,
}

/// What the node said back, owned.
#[derive(Debug)]
pub enum Answer {
    /// A protocol error: code and detail.
    ProtocolError(u16, String),
    /// A `Refused` tell.
    RefusedTell,
    /// An ask answered with a delivery error.
    Refused(u64, DeliveryError),
    /// An ask that failed.
    Failed(u64, String),
    /// An ask answered with a value.
    Value(u64),
}

/// A frame on the control stream, owned.
#[derive(Debug)]
pub enum RogueFrame {
    /// The handshake's answer.
    Welcome,
    /// An answer.
    Answer(Answer),
    /// A migration message.
    Mig(MigMsg),
    /// A replication message.
    Replica(tern_proto::replica::ReplicaMsg),
    /// Anything else, by kind.
    Other(&'static str),
}

/// A snapshot header for attempt `n` of a made-up service of `kind` (id `0x5eed-n`), with
/// `state_bytes` of state and `carried` queued messages to follow, and nothing else.
pub fn snap_header(
    n: u64,
    kind: tern::KindKey,
    state_bytes: u64,
    carried: u64,
) -> wire::SnapHeader {
    wire::SnapHeader {
        mig: n,
        id: tern::ServiceId::from_parts(0x5eed, n),
        kind,
        epoch: 1,
        parent: None,
        state_bytes,
        carried,
        timers: vec![],
        send_seqs: vec![],
        windows: vec![],
        tables: 0,
        book: vec![],
        custody: vec![],
        held: false,
        forced: false,
        names: vec![],
        replies: vec![],
        outputs: vec![],
        precopied: false,
        trace: None,
    }
}

/// `f`, framed.
pub fn frame(f: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&mut out, f, ROGUE_FRAME_BYTES_MAX).expect("test frames encode");
    out
}

impl Rogue {
    /// Connects to node `to` with a certificate for `name` from the cluster's CA, and shakes
    /// hands.
    pub async fn connect(c: &Cluster, name: &str, to: &str) -> Result<Rogue> {
        Rogue::connect_to(&c.ca, name, c.node(to)).await
    }

    /// As [`connect`](Self::connect), to any node of the CA's cluster (one started outside
    /// the [`Cluster`] too).
    pub async fn connect_to(
        ca: &tern::certs::ClusterCa,
        name: &str,
        to: &tern::NodeHandle,
    ) -> Result<Rogue> {
        let id = ca.issue(name)?;
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(tern::tls::client_config(&id)?);
        let conn = endpoint
            .connect(to.local_addr(), to.name().as_str())?
            .await?;
        let (mut ctrl_send, ctrl_recv) = conn.open_bi().await?;
        ctrl_send
            .write_all(&frame(&Frame::Hello { caps: vec![] }))
            .await?;
        let mut rogue = Rogue {
            conn,
            ctrl_send,
            ctrl_recv,
            reader: FrameReader::new(ROGUE_FRAME_BYTES_MAX),
            name: name.to_string(),
            _endpoint: endpoint,
        };
        match rogue.next_ctrl().await? {
            Some(RogueFrame::Welcome) => Ok(rogue),
            other => bail!("expected welcome, got {other:?}"),
        }
    }

    /// Sends `frames` on a data stream of their own, followed by an ask (id [`BARRIER_ASK`])
    /// to a service that does not exist, and waits for its refusal: a stream is read in
    /// order, so by then the node has dealt with every frame before it.
    pub async fn send_data_and_wait(&mut self, frames: &[u8]) -> Result<()> {
        let mut all = frames.to_vec();
        all.extend(frame(&Frame::Deliver {
            to: tern::ServiceId::from_parts(9, 9),
            from: None,
            seq: 1,
            ask: Some(BARRIER_ASK),
            wait: false,
            msg: &[0xc0],
        }));
        self.send_uni(&all).await?;
        loop {
            if let Answer::Refused(BARRIER_ASK, _) = self.answer().await? {
                return Ok(());
            }
        }
    }

    /// Moves a service of `kind` with `state` (MessagePack) to the node, as a migration the
    /// rogue decides (attempt `n`): the rogue is then a node that had custody of it. Returns
    /// its id once the node has prepared the copy (paused: arrivals wait for the start); it
    /// runs once [`commit`](Self::commit) is read.
    pub async fn prepare_service(
        &mut self,
        n: u64,
        kind: tern::KindKey,
        state: &[u8],
    ) -> Result<tern::ServiceId> {
        let mut header = snap_header(n, kind, state.len() as u64, 0);
        header.id = tern::ServiceId::from_parts(0x5eed_0000, n);
        let id = header.id;
        let mut s = frame(&Frame::SnapBegin(Box::new(header)));
        s.extend(frame(&Frame::SnapState { bytes: state }));
        s.extend(frame(&Frame::SnapEnd));
        self.send_uni(&s).await?;
        match self.mig().await? {
            MigMsg::Prepared { n: m, .. } if m == n => {}
            other => bail!("expected Prepared for attempt {n}, got {other:?}"),
        }
        Ok(id)
    }

    /// Commits attempt `n` (see [`prepare_service`](Self::prepare_service)).
    pub async fn commit(&mut self, n: u64) -> Result<()> {
        let source = tern::NodeName::new(&self.name);
        self.send_ctrl(&Frame::Mig(MigMsg::Commit { source, n }))
            .await
    }

    /// The next frame on the control stream; None when it ended.
    pub async fn next_ctrl(&mut self) -> Result<Option<RogueFrame>> {
        loop {
            if let Some(body) = self.reader.next_frame()? {
                let f = wire::decode(body)?;
                return Ok(Some(match f {
                    Frame::Welcome { .. } => RogueFrame::Welcome,
                    Frame::ProtocolError { code, detail } => {
                        RogueFrame::Answer(Answer::ProtocolError(code, detail))
                    }
                    Frame::Reply { ask, result } => RogueFrame::Answer(match result {
                        ReplyBody::Refused(e) => Answer::Refused(ask, e),
                        ReplyBody::Failed(s) => Answer::Failed(ask, s),
                        ReplyBody::Value(_) => Answer::Value(ask),
                    }),
                    Frame::Refused { .. } => RogueFrame::Answer(Answer::RefusedTell),
                    Frame::Mig(m) => RogueFrame::Mig(m),
                    Frame::Replica(r) => RogueFrame::Replica(r),
                    other => RogueFrame::Other(other.kind()),
                }));
            }
            match self.ctrl_recv.read_chunk(65536, true).await? {
                Some(chunk) => self.reader.push(&chunk.bytes),
                None => return Ok(None),
            }
        }
    }

    /// The next frame on the control stream that `pick` takes, skipping anything else.
    pub async fn next_picked<T>(
        &mut self,
        what: &str,
        pick: impl Fn(RogueFrame) -> Option<T>,
    ) -> Result<T> {
        let wait = async {
            loop {
                match self.next_ctrl().await? {
                    Some(f) => {
                        if let Some(t) = pick(f) {
                            return Ok(t);
                        }
                    }
                    None => bail!("control stream ended"),
                }
            }
        };
        tokio::time::timeout(ANSWER_WAIT, wait)
            .await
            .with_context(|| format!("no {what} in time"))?
    }

    /// The next answer on the control stream.
    pub async fn answer(&mut self) -> Result<Answer> {
        self.next_picked("answer", |f| match f {
            RogueFrame::Answer(a) => Some(a),
            _ => None,
        })
        .await
    }

    /// The next migration message on the control stream.
    pub async fn mig(&mut self) -> Result<MigMsg> {
        self.next_picked("migration message", |f| match f {
            RogueFrame::Mig(m) => Some(m),
            _ => None,
        })
        .await
    }

    /// Sends a request the node answers whatever it made of what this rogue sent before on
    /// the control stream (a `Spawn` of a kind no node registers), and waits for its answer:
    /// once it came, everything sent before was read. Returns the answers that came first.
    pub async fn barrier(&mut self) -> Result<Vec<Answer>> {
        const BARRIER_REQ: u64 = u64::MAX;
        self.send_ctrl(&Frame::Spawn {
            req: BARRIER_REQ,
            kind: tern::KindKey::new("no-such-kind", 1),
            state: &[0xc0],
        })
        .await?;
        let mut before = Vec::new();
        loop {
            match self.answer().await? {
                Answer::Failed(BARRIER_REQ, _) => return Ok(before),
                other => before.push(other),
            }
        }
    }

    /// Closes the connection and waits until the node was told (the rogue's runtime may end
    /// right after; without this the node would wait for its idle timeout).
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"rogue done");
        self._endpoint.wait_idle().await;
    }

    /// Sends `f` on the control stream.
    pub async fn send_ctrl(&mut self, f: &Frame<'_>) -> Result<()> {
        self.ctrl_send.write_all(&frame(f)).await?;
        Ok(())
    }

    /// Opens a unidirectional stream and leaves it open, for frames sent over time.
    pub async fn open_uni(&self) -> Result<quinn::SendStream> {
        Ok(self.conn.open_uni().await?)
    }

    /// Sends `bytes` on a unidirectional stream of their own (a data or snapshot stream).
    pub async fn send_uni(&self, bytes: &[u8]) -> Result<()> {
        let mut s = self.conn.open_uni().await?;
        s.write_all(bytes).await?;
        s.finish()?;
        Ok(())
    }
}
