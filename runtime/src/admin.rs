//! The admin connection: what the `tern` command line asks a node, and how.
//!
//! A client dials a node over QUIC with ALPN `tern-admin/1`, presenting an admin's or an
//! observer's certificate from the cluster CA (`tern ca issue ops --role admin`); the node
//! accepts it when the CA issued it and its name is in the node's admins
//! ([`NodeConfig::admins`](crate::NodeConfig::admins), empty by default: closed). An observer
//! may only read ([`AdminRequest::reads_only`]). The client accepts only a node's
//! certificate, and with [`AdminClient::connect_to`] only the node it meant. Each request goes on its own bidirectional stream: one
//! [`AdminRequest`], then zero or more [`AdminReply::Progress`] lines while the node works,
//! then one final reply. Messages are a 4-byte big-endian length and MessagePack; a request
//! is at most [`ADMIN_REQUEST_BYTES_MAX`] and a reply [`ADMIN_REPLY_BYTES_MAX`].
//!
//! ```no_run
//! # async fn demo(identity: tern::certs::NodeIdentity) -> Result<(), tern::Error> {
//! use tern::admin::{AdminClient, AdminReply, AdminRequest};
//! let client = AdminClient::connect("127.0.0.1:7101".parse().unwrap(), &identity).await?;
//! if let AdminReply::Ps { node, services } = client.request(&AdminRequest::Ps, |_| {}).await? {
//!     println!("{node} runs {} services", services.len());
//! }
//! # Ok(()) }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::error::Error;
use crate::members::Member;
use crate::migrate::MigrateOptions;
use crate::node::{NodeShared, ServiceInfo};
use crate::placement::{Association, DrainReport, Plan, PlanOptions};
use crate::tree::{GroupReport, TreeMember};
use tern_proto::ids::{NodeName, ServiceId};

/// Largest admin request, in bytes.
pub const ADMIN_REQUEST_BYTES_MAX: usize = 64 << 10;
/// Largest admin reply, in bytes.
pub const ADMIN_REPLY_BYTES_MAX: usize = 16 << 20;
/// How often a node reports progress while it works on a long request.
pub const ADMIN_PROGRESS_MS: u64 = 250;
/// How long a client waits for a node to answer its handshake.
pub const ADMIN_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Admin connections a node serves at once; more are refused.
pub const ADMIN_CONNECTIONS_MAX: usize = 64;
/// Requests a node serves on one admin connection before closing it.
pub const ADMIN_REQUESTS_PER_CONNECTION_MAX: u64 = 100_000;

/// In [`NodeConfig::admins`](crate::NodeConfig::admins): every admin and observer
/// certificate of the cluster.
pub const ADMINS_ANY: &str = "*";

/// What the command line can ask a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// The services this node runs.
    Ps,
    /// Every node this node knows, with capabilities, load and power.
    Nodes,
    /// The assembly tree rooted at a service.
    Tree {
        /// The root.
        service: ServiceId,
    },
    /// A service's associated services: declared and observed.
    Assoc {
        /// The service.
        service: ServiceId,
    },
    /// Where placement would put a service, and why (moves nothing).
    Plan {
        /// The service.
        service: ServiceId,
        /// Only this node may be chosen.
        to: Option<String>,
        /// Plan its whole assembly tree with it.
        tree: bool,
    },
    /// Moves a service (or its whole tree) to a node.
    Migrate {
        /// The service (the root, with `tree`).
        service: ServiceId,
        /// The node to take it.
        to: String,
        /// Move its whole assembly tree as one unit.
        tree: bool,
    },
    /// Drains this node: moves every movable service to the best peers.
    Drain,
    /// Every registered name this node knows of, with its service.
    Names,
    /// Hands a service that runs on this node back to automatic placement (an explicit move
    /// held it where it put it).
    Release {
        /// The service.
        service: ServiceId,
    },
    /// The node's figures: counters, migrations and freeze times, services, peers and
    /// channels (what `tern top` shows).
    Figures,
    /// The node's metrics as OpenMetrics text (what its metrics endpoint serves).
    Metrics,
    /// The node's events numbered after `after`, oldest first (what `tern events` shows).
    Events {
        /// The number of the last event already seen (0: from the oldest kept).
        after: u64,
    },
    /// Offers the cluster CA's revocation list (DER, as `tern ca revoke` writes it); the
    /// node installs it if it is the CA's and newer, and it spreads to every node.
    Revoke {
        /// The list.
        #[serde(with = "serde_bytes")]
        crl: Vec<u8>,
    },
}

impl AdminRequest {
    /// Whether the request only reads (what an observer may ask): it moves, spawns and
    /// stops nothing.
    pub fn reads_only(&self) -> bool {
        match self {
            AdminRequest::Ps
            | AdminRequest::Nodes
            | AdminRequest::Tree { .. }
            | AdminRequest::Assoc { .. }
            | AdminRequest::Plan { .. }
            | AdminRequest::Names
            | AdminRequest::Figures
            | AdminRequest::Metrics
            | AdminRequest::Events { .. } => true,
            AdminRequest::Migrate { .. }
            | AdminRequest::Drain
            | AdminRequest::Revoke { .. }
            | AdminRequest::Release { .. } => false,
        }
    }
}

/// A node's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AdminReply {
    /// A line of progress; the final reply follows.
    Progress(String),
    /// The node's services.
    Ps {
        /// The node answering.
        node: String,
        /// Its services.
        services: Vec<ServiceInfo>,
    },
    /// The nodes it knows, itself first.
    Nodes(Vec<Member>),
    /// A tree, root first.
    Tree(Vec<TreeMember>),
    /// Associations.
    Assoc(Vec<Association>),
    /// A plan.
    Plan(Plan),
    /// What a migration did (one member for a single service).
    Migrated(GroupReport),
    /// What a drain did.
    Drained(DrainReport),
    /// Registered names, sorted, each with its service.
    Names(Vec<(String, ServiceId)>),
    /// A release: whether the service was held.
    Released {
        /// It was held (and is not any more).
        was_held: bool,
    },
    /// The revocation list the node holds after a `Revoke`.
    Revocations {
        /// Its number.
        number: u64,
        /// How many certificates it revokes.
        revoked: usize,
        /// Whether the list offered was newer than the one held (and is now in force).
        newer: bool,
    },
    /// The node's figures.
    Figures(Box<crate::metrics::NodeFigures>),
    /// The node's metrics, as OpenMetrics text.
    Metrics(String),
    /// Events, oldest first.
    Events(Vec<crate::NodeEvent>),
    /// The request failed; why, in words.
    Error(String),
}

async fn write_msg<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
    bytes_max: usize,
) -> Result<(), Error> {
    let body = rmp_serde::to_vec_named(msg).map_err(|e| Error::Admin(format!("encoding: {e}")))?;
    if body.len() > bytes_max {
        return Err(Error::Admin(format!(
            "a message of {} bytes is over the {bytes_max}-byte bound",
            body.len()
        )));
    }
    let mut framed = Vec::with_capacity(4 + body.len());
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    send.write_all(&framed)
        .await
        .map_err(|e| Error::Admin(format!("sending: {e}")))
}

/// Reads one message; `None` at a clean end of stream.
async fn read_msg<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    bytes_max: usize,
) -> Result<Option<T>, Error> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(Error::Admin(format!("reading: {e}"))),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > bytes_max {
        return Err(Error::Admin(format!(
            "a message of {len} bytes is over the {bytes_max}-byte bound"
        )));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| Error::Admin(format!("reading: {e}")))?;
    rmp_serde::from_slice(&body)
        .map(Some)
        .map_err(|e| Error::Admin(format!("malformed message: {e}")))
}

/// Closes an admin connection with `reason` (the client sees it) and logs `detail`.
fn refuse(node: &NodeShared, conn: &quinn::Connection, reason: &str, detail: String) {
    conn.close(
        quinn::VarInt::from_u32(tern_proto::wire::code::REFUSED as u32),
        reason.as_bytes(),
    );
    tracing::warn!(refusal = %detail, "admin connection refused");
    // The event before the count: whoever sees the count finds the event.
    node.logs.event("connection-refused", detail);
    node.stats.connections_refused.inc();
}

/// Serves one admin connection until the client closes it.
pub(crate) async fn serve(
    node: Arc<NodeShared>,
    conn: quinn::Connection,
    who: NodeName,
    role: crate::certs::Role,
) {
    if !node
        .admins
        .iter()
        .any(|a| a == ADMINS_ANY || a.as_str() == who.as_str())
    {
        let why = format!(
            "{role} {who} at {}: not in this node's admins",
            conn.remote_address()
        );
        return refuse(&node, &conn, "not an admin of this node", why);
    }
    let open = node.admin_connections.fetch_add(1, Ordering::AcqRel);
    let _open = OpenAdmin(&node.admin_connections);
    if open >= ADMIN_CONNECTIONS_MAX {
        let why = format!("admin {who}: {ADMIN_CONNECTIONS_MAX} admin connections are open");
        return refuse(&node, &conn, "too many admin connections", why);
    }
    node.logs.event(
        "admin-connected",
        format!("{who} at {}", conn.remote_address()),
    );
    for _ in 0..ADMIN_REQUESTS_PER_CONNECTION_MAX {
        let Ok((mut send, mut recv)) = conn.accept_bi().await else {
            return;
        };
        // A certificate revoked while its connection was open asks nothing more.
        let cert = crate::tls::peer_cert(&conn);
        if let (Some(list), Some(cert)) = (node.trust.revocations(), cert) {
            if list.revokes_cert(&cert) {
                let why = format!("{role} {who}: certificate revoked");
                return refuse(&node, &conn, "certificate revoked", why);
            }
        }
        let reply = match read_msg::<AdminRequest>(&mut recv, ADMIN_REQUEST_BYTES_MAX).await {
            Ok(Some(req)) if role == crate::certs::Role::Observer && !req.reads_only() => {
                let what = format!("observer {who} asked {req:?}: an observer may only read");
                node.logs.event("admin-refused", what.clone());
                AdminReply::Error(what)
            }
            Ok(Some(req)) => {
                let span = tracing::info_span!("admin", node = %node.name(), admin = %who, ?req);
                answer(&node, req, &mut send).instrument(span).await
            }
            Ok(None) => AdminReply::Error("empty request".into()),
            Err(e) => AdminReply::Error(format!("bad request: {e}")),
        };
        let sent = match write_msg(&mut send, &reply, ADMIN_REPLY_BYTES_MAX).await {
            Err(Error::Admin(e)) if e.contains("bound") => {
                let why = AdminReply::Error(format!("the answer is too large: {e}"));
                write_msg(&mut send, &why, ADMIN_REPLY_BYTES_MAX).await
            }
            other => other,
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "admin reply not sent");
        }
        let _ = send.finish();
    }
    conn.close(
        quinn::VarInt::from_u32(0),
        b"enough requests on one connection",
    );
}

/// Counts one open admin connection until dropped.
struct OpenAdmin<'a>(&'a AtomicUsize);

impl Drop for OpenAdmin<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Runs `work`, sending a progress line every [`ADMIN_PROGRESS_MS`] until it ends.
async fn with_progress<T>(
    send: &mut quinn::SendStream,
    work: impl Future<Output = T>,
    mut line: impl FnMut(u64) -> String,
) -> T {
    let started = Instant::now();
    let mut work = std::pin::pin!(work);
    let mut tick = tokio::time::interval(Duration::from_millis(ADMIN_PROGRESS_MS));
    tick.tick().await;
    loop {
        tokio::select! {
            done = &mut work => return done,
            _ = tick.tick() => {
                let progress = AdminReply::Progress(line(started.elapsed().as_millis() as u64));
                let _ = write_msg(send, &progress, ADMIN_REPLY_BYTES_MAX).await;
            }
        }
    }
}

async fn answer(
    node: &Arc<NodeShared>,
    req: AdminRequest,
    send: &mut quinn::SendStream,
) -> AdminReply {
    let result: Result<AdminReply, Error> = match req {
        AdminRequest::Ps => Ok(AdminReply::Ps {
            node: node.name().to_string(),
            services: node.service_infos(),
        }),
        AdminRequest::Nodes => Ok(AdminReply::Nodes(node.members())),
        AdminRequest::Tree { service } => node.tree(service).map(AdminReply::Tree),
        AdminRequest::Names => Ok(AdminReply::Names(node.all_names())),
        AdminRequest::Figures => Ok(AdminReply::Figures(Box::new(
            crate::metrics::NodeFigures::of(node),
        ))),
        AdminRequest::Metrics => Ok(AdminReply::Metrics(
            crate::metrics::NodeFigures::of(node).to_openmetrics(),
        )),
        AdminRequest::Events { after } => Ok(AdminReply::Events(
            node.logs
                .events()
                .into_iter()
                .filter(|e| e.n > after)
                .collect(),
        )),
        AdminRequest::Release { service } => node
            .release(service)
            .map(|was_held| AdminReply::Released { was_held }),
        AdminRequest::Assoc { service } => Ok(AdminReply::Assoc(node.associated(service))),
        AdminRequest::Plan { service, to, tree } => {
            let opts = PlanOptions {
                to,
                tree,
                ..PlanOptions::default()
            };
            node.plan(&[service], &opts).map(AdminReply::Plan)
        }
        AdminRequest::Migrate { service, to, tree } => {
            let target = NodeName::new(&to);
            let opts = MigrateOptions::default();
            let line = |ms| format!("moving {service} to {to}: {ms} ms");
            if tree {
                with_progress(send, node.migrate_tree(service, target, opts), line)
                    .await
                    .map(AdminReply::Migrated)
            } else {
                with_progress(send, node.migrate(service, target, opts), line)
                    .await
                    .map(|r| {
                        AdminReply::Migrated(GroupReport {
                            committed: r.committed(),
                            freeze_us: r.freeze_us,
                            total_us: r.total_us,
                            members: vec![r],
                        })
                    })
            }
        }
        AdminRequest::Drain => {
            let at = node.clone();
            let drain = node.drain();
            let line = move |ms| {
                format!(
                    "draining {}: {} services left after {ms} ms",
                    at.name(),
                    at.local_services().len()
                )
            };
            Ok(AdminReply::Drained(with_progress(send, drain, line).await))
        }
        AdminRequest::Revoke { crl } => {
            node.install_revocations(&crl, "an admin")
                .and_then(|installed| {
                    let list = node
                        .trust
                        .revocations()
                        .ok_or_else(|| Error::Admin("no list after installing one".into()))?;
                    Ok(AdminReply::Revocations {
                        number: list.number(),
                        revoked: list.len(),
                        newer: installed == crate::trust::Installed::Newer,
                    })
                })
        }
    };
    result.unwrap_or_else(|e| AdminReply::Error(e.to_string()))
}

/// A connection from an admin (the command line) to one node.
pub struct AdminClient {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    node: NodeName,
}

impl AdminClient {
    /// Dials the node at `addr` with `identity` (a certificate from the cluster CA). Fails
    /// when nothing answers within [`ADMIN_CONNECT_TIMEOUT_MS`], or when either side refuses
    /// the other's certificate.
    pub async fn connect(
        addr: SocketAddr,
        identity: &crate::certs::NodeIdentity,
    ) -> Result<AdminClient, Error> {
        Self::dial(addr, identity, None).await
    }

    /// Like [`connect`](Self::connect), but the node answering must be `node`: a device that
    /// took over another's address (or a gossiped address that lied) is refused during the
    /// handshake.
    pub async fn connect_to(
        addr: SocketAddr,
        identity: &crate::certs::NodeIdentity,
        node: &NodeName,
    ) -> Result<AdminClient, Error> {
        Self::dial(addr, identity, Some(node)).await
    }

    async fn dial(
        addr: SocketAddr,
        identity: &crate::certs::NodeIdentity,
        expect: Option<&NodeName>,
    ) -> Result<AdminClient, Error> {
        let role = identity.role()?;
        if !role.may_administer() {
            let name = identity.name()?;
            return Err(Error::Admin(format!(
                "{name}'s certificate is a {role}'s; admin connections need an admin's or an \
                 observer's certificate (`tern ca issue NAME --role admin`)"
            )));
        }
        let bind: SocketAddr = if addr.is_ipv6() {
            "[::]:0"
                .parse()
                .map_err(|_| Error::Admin("bad bind address".into()))?
        } else {
            "0.0.0.0:0"
                .parse()
                .map_err(|_| Error::Admin("bad bind address".into()))?
        };
        let mut endpoint =
            quinn::Endpoint::client(bind).map_err(|e| Error::io("opening a UDP socket", e))?;
        endpoint.set_default_client_config(crate::tls::admin_client_config(identity, expect)?);
        // The node's name is read from its certificate; this one only fills the handshake.
        let connecting = endpoint
            .connect(addr, "tern-node")
            .map_err(|e| Error::Admin(format!("dialing {addr}: {e}")))?;
        let conn =
            match tokio::time::timeout(Duration::from_millis(ADMIN_CONNECT_TIMEOUT_MS), connecting)
                .await
            {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(Error::Admin(format!("connecting to {addr}: {e}"))),
                Err(_) => {
                    return Err(Error::Admin(format!(
                        "no answer from {addr} within {ADMIN_CONNECT_TIMEOUT_MS} ms"
                    )))
                }
            };
        let node = crate::tls::peer_name(&conn)?;
        Ok(AdminClient {
            endpoint,
            conn,
            node,
        })
    }

    /// The node at the other end, as its certificate names it.
    pub fn node(&self) -> &NodeName {
        &self.node
    }

    /// Sends `req` and waits for the final reply, calling `progress` with each progress line.
    /// A reply of [`AdminReply::Error`] comes back as [`Error::Admin`].
    pub async fn request(
        &self,
        req: &AdminRequest,
        mut progress: impl FnMut(&str),
    ) -> Result<AdminReply, Error> {
        let closed = |e: Error| match self.conn.close_reason() {
            Some(why) => Error::Admin(format!("{} closed the connection: {why}", self.node)),
            None => e,
        };
        let (mut send, mut recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| Error::Admin(format!("{} closed the connection: {e}", self.node)))?;
        write_msg(&mut send, req, ADMIN_REQUEST_BYTES_MAX)
            .await
            .map_err(closed)?;
        let _ = send.finish();
        loop {
            let reply = read_msg::<AdminReply>(&mut recv, ADMIN_REPLY_BYTES_MAX)
                .await
                .map_err(closed)?;
            match reply {
                Some(AdminReply::Progress(line)) => progress(&line),
                Some(AdminReply::Error(e)) => return Err(Error::Admin(e)),
                Some(reply) => return Ok(reply),
                None => {
                    return Err(Error::Admin(format!(
                        "{} ended the answer early",
                        self.node
                    )))
                }
            }
        }
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.conn.close(quinn::VarInt::from_u32(0), b"done");
        self.endpoint.wait_idle().await;
    }
}

/// One service somewhere in the cluster, as [`survey`] found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// The node that runs it.
    pub node: String,
    /// What that node says about it.
    pub info: ServiceInfo,
}

/// The cluster as seen through one node: its members, every service of every member that
/// answered, and the members that did not (with why).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Survey {
    /// Every node the entry node knows, itself first.
    pub nodes: Vec<Member>,
    /// Every service of the nodes that answered.
    pub services: Vec<ServiceEntry>,
    /// Nodes that could not be asked, and why.
    pub unreachable: Vec<(String, String)>,
}

impl Survey {
    /// The service `query` names: its full id, a unique start of its id (4 characters or
    /// more), or a kind (`player` or `player@1`) with exactly one service. The error says
    /// what matched, or that nothing did.
    pub fn find(&self, query: &str) -> Result<&ServiceEntry, Error> {
        let by_id: Option<ServiceId> = query.parse().ok();
        let matches: Vec<&ServiceEntry> = self
            .services
            .iter()
            .filter(|s| {
                let id = s.info.addr.id;
                let kind = &s.info.addr.kind;
                Some(id) == by_id
                    || (query.len() >= 4 && id.to_string().starts_with(query))
                    || kind.name == query
                    || kind.to_string() == query
            })
            .collect();
        match matches.as_slice() {
            [one] => Ok(one),
            [] => {
                let mut why = format!(
                    "unknown service {query:?}: no service on the {} node(s) that answered has \
                     that id or kind; `tern ps` lists them",
                    self.nodes.len() - self.unreachable.len()
                );
                if !self.unreachable.is_empty() {
                    let names: Vec<&str> =
                        self.unreachable.iter().map(|(n, _)| n.as_str()).collect();
                    why.push_str(&format!(" ({} did not answer)", names.join(", ")));
                }
                Err(Error::Admin(why))
            }
            many => Err(Error::Admin(format!(
                "{query:?} names {} services: {}; give one's id",
                many.len(),
                many.iter()
                    .map(|s| format!("{} ({} on {})", s.info.addr.id, s.info.addr.kind, s.node))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Where node `name` listens, if the survey knows.
    pub fn addr_of(&self, name: &str) -> Option<SocketAddr> {
        self.nodes
            .iter()
            .find(|m| m.info.name.as_str() == name)
            .and_then(|m| m.info.addr)
    }
}

/// Asks `entry`'s node for the members, then asks `req` of every member that is up (dialing
/// each with `identity`, except `entry`'s own node): the members, and each one's answer by
/// name, in the members' order.
pub async fn ask_every_node(
    entry: &AdminClient,
    identity: &crate::certs::NodeIdentity,
    req: &AdminRequest,
) -> Result<(Vec<Member>, Vec<(String, Result<AdminReply, Error>)>), Error> {
    let AdminReply::Nodes(nodes) = entry.request(&AdminRequest::Nodes, |_| {}).await? else {
        return Err(Error::Admin(format!(
            "{} answered Nodes with something else",
            entry.node()
        )));
    };
    let mut answers = Vec::with_capacity(nodes.len());
    for m in &nodes {
        let asked = if &m.info.name == entry.node() {
            entry.request(req, |_| {}).await
        } else if m.status != crate::MemberStatus::Up {
            Err(Error::Admin(format!("{:?}", m.status).to_lowercase()))
        } else if let Some(addr) = m.info.addr {
            match AdminClient::connect_to(addr, identity, &m.info.name).await {
                Ok(c) => {
                    let r = c.request(req, |_| {}).await;
                    c.close().await;
                    r
                }
                Err(e) => Err(e),
            }
        } else {
            Err(Error::Admin("no address known".into()))
        };
        answers.push((m.info.name.to_string(), asked));
    }
    Ok((nodes, answers))
}

/// Asks `entry`'s node for the members, then every member that is up for its services
/// (dialing each with `identity`, except `entry`'s own node).
pub async fn survey(
    entry: &AdminClient,
    identity: &crate::certs::NodeIdentity,
) -> Result<Survey, Error> {
    let (nodes, answers) = ask_every_node(entry, identity, &AdminRequest::Ps).await?;
    let mut services = Vec::new();
    let mut unreachable = Vec::new();
    for (name, asked) in answers {
        match asked {
            Ok(AdminReply::Ps { services: s, .. }) => {
                services.extend(s.into_iter().map(|info| ServiceEntry {
                    node: name.clone(),
                    info,
                }))
            }
            Ok(other) => unreachable.push((name, format!("unexpected answer {other:?}"))),
            Err(e) => unreachable.push((name, e.to_string())),
        }
    }
    Ok(Survey {
        nodes,
        services,
        unreachable,
    })
}
