//! The live dashboard (`tern-demo --serve ADDR`, or `tern-demo node --config F --serve ADDR`):
//! one small page, no build step, fed by Server-Sent Events.
//!
//! - `GET /` the page (`dashboard.html`, compiled in);
//! - `GET /api/state` one [`Snapshot`] as JSON;
//! - `GET /events` a [`Snapshot`] every [`PUSH_MS`] as Server-Sent Events;
//! - `POST /api/migrate` `{"service": ID, "to": NODE}` moves a service (its whole tree if it
//!   has children) and answers with the report;
//! - `POST /api/drain` `{"node": NODE}` drains a device and answers with the report.
//!
//! Every request must carry the token made at start (`?token=` or the `X-Tern-Token` header;
//! [`serve`] hands the whole URL to its caller, which prints it), must name the dashboard by an
//! address or `localhost` in its `Host` header (a page elsewhere cannot reach it through a DNS
//! name it controls), and, when it has an `Origin`, come from the dashboard's own page.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tern::admin::{AdminClient, AdminReply, AdminRequest};
use tern::certs::NodeIdentity;
use tern::{MigrateOptions, MigrationReport, NodeHandle, ServiceId};

use crate::app::MediaApp;
use crate::media::Audit;
use crate::scenario::Step;

/// The page.
const PAGE: &str = include_str!("dashboard.html");
/// How often the cluster is read and the page gets a new snapshot, in milliseconds.
pub const PUSH_MS: u64 = 500;
/// How often the counters are read from the services, in milliseconds.
const AUDIT_MS: u64 = 1_000;
/// Migrations the dashboard remembers.
const MIGRATIONS_KEPT: usize = 64;
/// Largest request body accepted, in bytes.
const BODY_BYTES_MAX: usize = 4 << 10;

/// A device column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceView {
    /// Its name.
    pub name: String,
    /// What it offers.
    pub capabilities: Vec<String>,
    /// Services it runs.
    pub services: u64,
    /// Messages queued in its services' mailboxes.
    pub backlog: u64,
    /// Resident memory, in bytes.
    pub memory_bytes: u64,
    /// Power, in words.
    pub power: String,
    /// True while it drains.
    pub draining: bool,
}

/// A service box.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceView {
    /// Its id.
    pub id: String,
    /// Its name in the app, or its kind.
    pub name: String,
    /// Its kind's name.
    pub kind: String,
    /// Its address.
    pub addr: tern::ServiceAddr,
    /// The device running it.
    pub node: String,
    /// Its epoch.
    pub epoch: u64,
    /// Messages in its mailbox.
    pub depth: u64,
    /// Its parent's id, in an assembly tree.
    pub parent: Option<String>,
}

/// A channel line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelView {
    /// Sender's id.
    pub from: String,
    /// Receiver's id.
    pub to: String,
    /// Observed messages per second.
    pub msgs_per_s: f64,
    /// True when both ends run on one device (an in-memory queue); false for a QUIC stream.
    pub local: bool,
    /// True for a parent-child link in an assembly tree.
    pub child: bool,
}

/// One migration, as the page animates it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationView {
    /// Its number on this dashboard, from 1.
    pub n: u64,
    /// Service id.
    pub service: String,
    /// Service name.
    pub name: String,
    /// From device.
    pub from: String,
    /// To device.
    pub to: String,
    /// Freeze, in microseconds.
    pub freeze_us: u64,
    /// True when it moved.
    pub committed: bool,
    /// Why not, when it did not.
    pub aborted: Option<String>,
}

/// Messages and checks, over every stream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    /// Distinct numbered messages received.
    pub received: u64,
    /// Numbers a receiver skipped (still missing).
    pub lost: u64,
    /// Copies received.
    pub duplicated: u64,
    /// Numbers received after a later one.
    pub reordered: u64,
    /// Asks sent.
    pub asks_sent: u64,
    /// Asks without an answer.
    pub asks_unanswered: u64,
    /// Migrations committed.
    pub migrations: u64,
    /// When the counters were read, in ms since the dashboard started; 0 before the first.
    pub read_at_ms: u64,
    /// The last read's error, if it failed.
    pub error: Option<String>,
}

/// What the page draws.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Device columns.
    pub devices: Vec<DeviceView>,
    /// Service boxes.
    pub services: Vec<ServiceView>,
    /// Channel lines.
    pub channels: Vec<ChannelView>,
    /// Counters.
    pub counters: Counters,
    /// Recent migrations, oldest first.
    pub migrations: Vec<MigrationView>,
    /// Devices whose services could not be read, and why.
    pub unreachable: Vec<(String, String)>,
}

/// The dashboard's view of a cluster, through one node of it (`entry`): membership and books
/// from that node, each device's services over an admin connection (the entry's own directly),
/// moves through the entry (which routes them to wherever the service runs).
pub struct Dashboard {
    entry: NodeHandle,
    identity: Option<NodeIdentity>,
    app: Mutex<Option<MediaApp>>,
    started: Instant,
    migrations: Mutex<(u64, VecDeque<MigrationView>)>,
    counters: Mutex<Counters>,
    current: Mutex<Snapshot>,
    clients: tokio::sync::Mutex<BTreeMap<String, AdminClient>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Dashboard {
    /// A dashboard entering the cluster at `entry`, asking the other devices with
    /// `identity` (an admin's or an observer's certificate from the cluster CA, which the
    /// devices list in their admins; without one, only the entry's own services are shown).
    /// When `app` is `None`, the app is found by its services' kinds.
    pub fn new(
        entry: NodeHandle,
        identity: Option<NodeIdentity>,
        app: Option<MediaApp>,
    ) -> Arc<Dashboard> {
        Arc::new(Dashboard {
            entry,
            identity,
            app: Mutex::new(app),
            started: Instant::now(),
            migrations: Mutex::new((0, VecDeque::new())),
            counters: Mutex::new(Counters::default()),
            current: Mutex::new(Snapshot {
                devices: Vec::new(),
                services: Vec::new(),
                channels: Vec::new(),
                counters: Counters::default(),
                migrations: Vec::new(),
                unreachable: Vec::new(),
            }),
            clients: tokio::sync::Mutex::new(BTreeMap::new()),
        })
    }

    fn name_of(&self, id: ServiceId, kind: &str) -> String {
        lock(&self.app)
            .as_ref()
            .and_then(|a| a.name_of(id))
            .map_or_else(|| kind.to_owned(), str::to_owned)
    }

    /// Remembers a migration for the page.
    pub fn record(&self, r: &MigrationReport) {
        let name = self.name_of(r.service, "service");
        self.record_view(
            r.service.to_string(),
            name,
            r.from.to_string(),
            r.to.to_string(),
            r.freeze_us,
            r.aborted.as_ref().map(|a| a.to_string()),
        );
    }

    /// Remembers the scenario's moves.
    pub fn record_steps(&self, steps: &[Step]) {
        let app = lock(&self.app).clone();
        for s in steps {
            let id = app
                .as_ref()
                .and_then(|a| a.services().into_iter().find(|(n, _)| *n == s.service))
                .map_or_else(String::new, |(_, a)| a.id.to_string());
            self.record_view(
                id,
                s.service.clone(),
                s.from.clone(),
                s.to.clone(),
                s.freeze_us,
                s.aborted.clone(),
            );
        }
    }

    fn record_view(
        &self,
        service: String,
        name: String,
        from: String,
        to: String,
        freeze_us: u64,
        aborted: Option<String>,
    ) {
        let mut m = lock(&self.migrations);
        m.0 += 1;
        let view = MigrationView {
            n: m.0,
            service,
            name,
            from,
            to,
            freeze_us,
            committed: aborted.is_none(),
            aborted,
        };
        if m.1.len() == MIGRATIONS_KEPT {
            m.1.pop_front();
        }
        m.1.push_back(view);
    }

    /// What the page draws, as last refreshed.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = lock(&self.current).clone();
        s.counters = lock(&self.counters).clone();
        let m = lock(&self.migrations);
        s.counters.migrations = m.1.iter().filter(|v| v.committed).count() as u64;
        s.migrations = m.1.iter().cloned().collect();
        s
    }

    /// The certificate for admin connections to the other devices.
    fn admin_identity(&self) -> Result<&NodeIdentity, String> {
        self.identity.as_ref().ok_or_else(|| {
            "the dashboard has no admin certificate to ask other devices with \
             (dashboard_cert in the device file)"
                .to_owned()
        })
    }

    /// The services of member `m`: the entry's own directly, the others' over a (cached)
    /// admin connection.
    async fn services_of(&self, m: &tern::Member) -> Result<Vec<tern::ServiceInfo>, String> {
        if m.local {
            return Ok(self.entry.services());
        }
        let name = m.info.name.to_string();
        let addr = m.info.addr.ok_or("no address known")?;
        let mut clients = self.clients.lock().await;
        if !clients.contains_key(&name) {
            let c = AdminClient::connect_to(addr, self.admin_identity()?, &m.info.name)
                .await
                .map_err(|e| e.to_string())?;
            clients.insert(name.clone(), c);
        }
        let Some(client) = clients.get(&name) else {
            return Err("no connection".into());
        };
        match client.request(&AdminRequest::Ps, |_| {}).await {
            Ok(AdminReply::Ps { services, .. }) => Ok(services),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => {
                // Dial again next time.
                clients.remove(&name);
                Err(e.to_string())
            }
        }
    }

    /// Reads the cluster once: devices, services, channels.
    async fn refresh(&self) {
        let members = self.entry.members();
        let mut devices = Vec::new();
        let mut services = Vec::new();
        let mut unreachable = Vec::new();
        let mut at: BTreeMap<ServiceId, String> = BTreeMap::new();
        let mut rates: BTreeMap<(ServiceId, ServiceId), f64> = BTreeMap::new();
        for m in &members {
            let name = m.info.name.to_string();
            for e in &m.info.edges {
                let r = rates.entry((e.from, e.to)).or_insert(0.0);
                *r = r.max(e.msgs_per_s);
            }
            let local = if m.status == tern::MemberStatus::Up {
                self.services_of(m).await
            } else {
                Err(format!("{:?}", m.status).to_lowercase())
            };
            let local = local.unwrap_or_else(|e| {
                unreachable.push((name.clone(), e));
                Vec::new()
            });
            devices.push(DeviceView {
                name: name.clone(),
                capabilities: m.info.capabilities.clone(),
                services: local.len() as u64,
                backlog: local.iter().map(|s| s.mailbox_depth as u64).sum(),
                memory_bytes: m.info.load.memory_bytes,
                power: m.info.power.to_string(),
                draining: m.info.draining,
            });
            for s in local {
                at.insert(s.addr.id, name.clone());
                services.push(ServiceView {
                    id: s.addr.id.to_string(),
                    name: self.name_of(s.addr.id, &s.addr.kind.name),
                    kind: s.addr.kind.name.to_string(),
                    node: name.clone(),
                    epoch: s.epoch,
                    depth: s.mailbox_depth as u64,
                    parent: s.parent.map(|p| p.to_string()),
                    addr: s.addr,
                });
            }
        }
        for e in self.entry.traffic() {
            let r = rates.entry((e.from, e.to)).or_insert(0.0);
            *r = r.max(e.msgs_per_s);
        }
        devices.sort_by_key(|d| {
            DEVICE_ORDER
                .iter()
                .position(|n| *n == d.name)
                .unwrap_or(usize::MAX)
        });
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let mut channels = Vec::new();
        for (from, a) in &at {
            // The entry's copy of the books is cluster-wide.
            for (role, target) in self.entry.book(*from) {
                let Some(b) = at.get(&target.id) else {
                    continue;
                };
                let both = rates.get(&(*from, target.id)).copied().unwrap_or(0.0)
                    + rates.get(&(target.id, *from)).copied().unwrap_or(0.0);
                channels.push(ChannelView {
                    from: from.to_string(),
                    to: target.id.to_string(),
                    msgs_per_s: both,
                    local: a == b,
                    child: role.starts_with(tern::CHILD_ROLE_PREFIX),
                });
            }
        }
        self.find_app(&services);
        let mut current = lock(&self.current);
        current.devices = devices;
        current.services = services;
        current.channels = channels;
        current.unreachable = unreachable;
    }

    /// Finds the app by its kinds when it was not given (one service of each).
    fn find_app(&self, services: &[ServiceView]) {
        let mut app = lock(&self.app);
        if app.is_some() {
            return;
        }
        let one = |kind: &str| {
            let mut of_kind = services.iter().filter(|s| s.kind == kind);
            match (of_kind.next(), of_kind.next()) {
                (Some(s), None) => Some(s.addr.clone()),
                _ => None,
            }
        };
        if let (Some(player), Some(lyrics), Some(playlist), Some(remote), Some(scrobbler)) = (
            one("player"),
            one("lyrics"),
            one("playlist"),
            one("remote"),
            one("scrobbler"),
        ) {
            *app = Some(MediaApp {
                player,
                lyrics,
                playlist,
                remote,
                scrobbler,
            });
        }
    }

    /// Reads the services' counters once (while traffic flows).
    async fn refresh_counters(&self) {
        let Some(app) = lock(&self.app).clone() else {
            return;
        };
        let read: Result<Audit> = app.audit_so_far(&self.entry).await;
        let mut c = lock(&self.counters);
        c.read_at_ms = self.started.elapsed().as_millis() as u64;
        match read {
            Ok(a) => {
                let t = a.total();
                c.received = t.received;
                c.lost = t.lost;
                c.duplicated = t.duplicated;
                c.reordered = t.reordered;
                c.asks_sent = a.asks_sent;
                c.asks_unanswered = a.asks_unanswered;
                c.error = None;
            }
            Err(e) => c.error = Some(format!("{e:#}")),
        }
    }

    /// Moves `id` to `to` (with its tree when it has children), through the entry node.
    pub async fn migrate(&self, id: ServiceId, to: &str) -> Result<Vec<MigrationReport>, String> {
        if !self
            .entry
            .members()
            .iter()
            .any(|m| m.info.name.as_str() == to)
        {
            return Err(format!("unknown device {to:?}"));
        }
        let has_children = !self.entry.children(id).is_empty();
        let reports = if has_children {
            self.entry
                .migrate_tree(id, to, MigrateOptions::default())
                .await
                .map(|g| g.members)
        } else {
            self.entry
                .migrate(id, to, MigrateOptions::default())
                .await
                .map(|r| vec![r])
        }
        .map_err(|e| e.to_string())?;
        for r in &reports {
            self.record(r);
        }
        Ok(reports)
    }

    /// Drains device `name` (the entry itself, or another over an admin connection).
    pub async fn drain(&self, name: &str) -> Result<tern::DrainReport, String> {
        let member = self
            .entry
            .members()
            .into_iter()
            .find(|m| m.info.name.as_str() == name)
            .ok_or_else(|| format!("unknown device {name:?}"))?;
        let report = if member.local {
            self.entry.drain().await
        } else {
            let addr = member.info.addr.ok_or("no address known")?;
            let client = AdminClient::connect_to(addr, self.admin_identity()?, &member.info.name)
                .await
                .map_err(|e| e.to_string())?;
            let reply = client.request(&AdminRequest::Drain, |_| {}).await;
            client.close().await;
            match reply.map_err(|e| e.to_string())? {
                AdminReply::Drained(r) => r,
                other => return Err(format!("unexpected answer {other:?}")),
            }
        };
        for r in &report.moved {
            self.record(r);
        }
        Ok(report)
    }
}

/// Columns in the demo's order; other devices after them.
const DEVICE_ORDER: [&str; 4] = ["phone", "tv", "car", "watch"];

#[derive(Deserialize)]
struct MigrateBody {
    service: String,
    to: String,
}

#[derive(Deserialize)]
struct DrainBody {
    node: String,
}

/// Who may use the dashboard: the holder of the token made at start, through the
/// dashboard's own address.
struct Access {
    token: String,
    /// The port the dashboard listens on (known once bound).
    port: std::sync::atomic::AtomicU16,
}

/// 128 bits from the OS's randomness (through the standard library's keyed hasher, whose keys
/// are drawn from it).
fn new_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    (0..2u64)
        .map(|i| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(i);
            format!("{:016x}", h.finish())
        })
        .collect()
}

/// `host` (a `Host` header, or an origin without its scheme) names this dashboard: an IP
/// address or `localhost`, with the dashboard's port.
fn host_allowed(host: &str, port: u16) -> bool {
    let Some((name, p)) = host.rsplit_once(':') else {
        return false;
    };
    let literal = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    p.parse::<u16>().ok() == Some(port)
        && (name == "localhost" || literal.parse::<IpAddr>().is_ok())
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Why `req` may not use the dashboard, as the answer to give, if it may not.
fn refused(req: &HttpRequest, access: &Access) -> Option<HttpResponse> {
    let text = |h: header::HeaderName| req.headers().get(h).and_then(|v| v.to_str().ok());
    let port = access.port.load(std::sync::atomic::Ordering::Acquire);
    if !text(header::HOST).is_some_and(|h| host_allowed(h, port)) {
        return Some(
            HttpResponse::Forbidden().body("the dashboard answers only to its own address"),
        );
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let own = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(|h| host_allowed(h, port));
        if !own {
            return Some(HttpResponse::Forbidden().body("requests from other pages are refused"));
        }
    }
    let token = text(header::HeaderName::from_static("x-tern-token"))
        .map(str::to_owned)
        .or_else(|| {
            web::Query::<TokenQuery>::from_query(req.query_string())
                .ok()
                .and_then(|q| q.into_inner().token)
        });
    if !token.is_some_and(|t| same(&t, &access.token)) {
        return Some(HttpResponse::Unauthorized().body(
            "open the dashboard with the URL it printed when it started (it carries a token)",
        ));
    }
    None
}

/// Every request goes through [`refused`] first.
async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let no = match req.app_data::<web::Data<Access>>() {
        Some(access) => refused(req.request(), access),
        None => Some(HttpResponse::InternalServerError().finish()),
    };
    match no {
        Some(answer) => Ok(req.into_response(answer).map_into_right_body()),
        None => next.call(req).await.map(|r| r.map_into_left_body()),
    }
}

async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(PAGE)
}

async fn state(d: web::Data<Dashboard>) -> HttpResponse {
    HttpResponse::Ok().json(d.snapshot())
}

async fn events(d: web::Data<Dashboard>) -> HttpResponse {
    let d = d.into_inner();
    let ticks = futures_util::stream::unfold(
        (d, tokio::time::interval(Duration::from_millis(PUSH_MS))),
        |(d, mut tick)| async move {
            tick.tick().await;
            let body = serde_json::to_string(&d.snapshot())
                .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }).to_string());
            let event = web::Bytes::from(format!("data: {body}\n\n"));
            Some((Ok::<_, actix_web::Error>(event), (d, tick)))
        },
    );
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(ticks)
}

async fn migrate(d: web::Data<Dashboard>, body: web::Json<MigrateBody>) -> HttpResponse {
    let Ok(id) = body.service.parse::<ServiceId>() else {
        return HttpResponse::BadRequest().body(format!("{:?} is not a service id", body.service));
    };
    match d.migrate(id, &body.to).await {
        Ok(reports) => HttpResponse::Ok().json(reports),
        Err(e) => HttpResponse::Conflict().body(e),
    }
}

async fn drain(d: web::Data<Dashboard>, body: web::Json<DrainBody>) -> HttpResponse {
    match d.drain(&body.node).await {
        Ok(report) => HttpResponse::Ok().json(report),
        Err(e) => HttpResponse::Conflict().body(e),
    }
}

/// Serves the dashboard on `addr` until the process is stopped (or `stop` resolves).
/// Calls `on_listening` with the bound address (port 0 picks a free one) and the URL to open,
/// which carries the token every request needs.
pub async fn serve(
    dashboard: Arc<Dashboard>,
    addr: SocketAddr,
    on_listening: impl FnOnce(SocketAddr, &str),
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let data = web::Data::from(dashboard.clone());
    let access = web::Data::new(Access {
        token: new_token(),
        port: std::sync::atomic::AtomicU16::new(addr.port()),
    });
    let server = HttpServer::new({
        let access = access.clone();
        move || {
            App::new()
                .wrap(from_fn(guard))
                .app_data(access.clone())
                .app_data(data.clone())
                .app_data(web::JsonConfig::default().limit(BODY_BYTES_MAX))
                .route("/", web::get().to(page))
                .route("/api/state", web::get().to(state))
                .route("/events", web::get().to(events))
                .route("/api/migrate", web::post().to(migrate))
                .route("/api/drain", web::post().to(drain))
        }
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .bind(addr)
    .with_context(|| format!("binding the dashboard to {addr}"))?;
    let bound = server.addrs().first().copied().unwrap_or(addr);
    access
        .port
        .store(bound.port(), std::sync::atomic::Ordering::Release);
    on_listening(bound, &format!("http://{bound}/?token={}", access.token));
    let server = server.run();
    let handle = server.handle();
    let poller = dashboard.clone();
    let counters = actix_web::rt::spawn(async move {
        let mut last_audit: Option<Instant> = None;
        loop {
            poller.refresh().await;
            if last_audit.is_none_or(|t| t.elapsed() >= Duration::from_millis(AUDIT_MS)) {
                poller.refresh_counters().await;
                last_audit = Some(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(PUSH_MS)).await;
        }
    });
    let mut server = std::pin::pin!(server);
    let mut stop = std::pin::pin!(stop);
    tokio::select! {
        r = &mut server => r.context("the dashboard's server")?,
        _ = &mut stop => {
            // The server must be polled while it stops.
            let ((), r) = tokio::join!(handle.stop(true), &mut server);
            r.context("the dashboard's server")?;
        }
    }
    counters.abort();
    Ok(())
}
