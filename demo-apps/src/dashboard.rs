//! The live dashboard (`tern-demo --serve ADDR`): one small page, no build step, fed by
//! Server-Sent Events.
//!
//! - `GET /` the page (`dashboard.html`, compiled in);
//! - `GET /api/state` one [`Snapshot`] as JSON;
//! - `GET /events` a [`Snapshot`] every [`PUSH_MS`] as Server-Sent Events;
//! - `POST /api/migrate` `{"service": ID, "to": NODE}` moves a service (its whole tree if it
//!   has children) and answers with the report;
//! - `POST /api/drain` `{"node": NODE}` drains a device and answers with the report.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tern::{MigrateOptions, MigrationReport, NodeHandle, ServiceId};

use crate::app::MediaApp;
use crate::media::Audit;
use crate::scenario::Step;

/// The page.
const PAGE: &str = include_str!("dashboard.html");
/// How often the page gets a new snapshot, in milliseconds.
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
}

/// The dashboard's view of a cluster running in this process.
pub struct Dashboard {
    nodes: Vec<NodeHandle>,
    app: MediaApp,
    started: Instant,
    migrations: Mutex<(u64, VecDeque<MigrationView>)>,
    counters: Mutex<Counters>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Dashboard {
    /// A dashboard over `nodes` (every device, in this process) running `app`.
    pub fn new(nodes: Vec<NodeHandle>, app: MediaApp) -> Arc<Dashboard> {
        Arc::new(Dashboard {
            nodes,
            app,
            started: Instant::now(),
            migrations: Mutex::new((0, VecDeque::new())),
            counters: Mutex::new(Counters::default()),
        })
    }

    fn name_of(&self, id: ServiceId, kind: &str) -> String {
        self.app
            .name_of(id)
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
        for s in steps {
            let id = self
                .app
                .services()
                .into_iter()
                .find(|(n, _)| *n == s.service)
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

    /// What the page draws now.
    pub fn snapshot(&self) -> Snapshot {
        let mut devices = Vec::new();
        let mut services = Vec::new();
        let mut at: BTreeMap<ServiceId, String> = BTreeMap::new();
        let mut rates: BTreeMap<(ServiceId, ServiceId), f64> = BTreeMap::new();
        for node in &self.nodes {
            let me = node.members().into_iter().find(|m| m.local);
            let (load, power, draining) = me.map_or_else(
                || (Default::default(), String::new(), false),
                |m| (m.info.load, m.info.power.to_string(), m.info.draining),
            );
            let local = node.services();
            devices.push(DeviceView {
                name: node.name().to_string(),
                capabilities: node.capabilities(),
                services: local.len() as u64,
                backlog: local.iter().map(|s| s.mailbox_depth as u64).sum(),
                memory_bytes: load.memory_bytes,
                power,
                draining,
            });
            for s in local {
                at.insert(s.addr.id, node.name().to_string());
                services.push(ServiceView {
                    id: s.addr.id.to_string(),
                    name: self.name_of(s.addr.id, &s.addr.kind.name),
                    node: node.name().to_string(),
                    epoch: s.epoch,
                    depth: s.mailbox_depth as u64,
                    parent: s.parent.map(|p| p.to_string()),
                });
            }
            for e in node.traffic() {
                let r = rates.entry((e.from, e.to)).or_insert(0.0);
                *r = r.max(e.msgs_per_s);
            }
        }
        services.sort_by(|a, b| a.name.cmp(&b.name));
        let mut channels = Vec::new();
        let mut drawn = std::collections::BTreeSet::new();
        for node in &self.nodes {
            for s in node.services() {
                for (role, target) in node.book(s.addr.id) {
                    let (from, to) = (s.addr.id, target.id);
                    let (Some(a), Some(b)) = (at.get(&from), at.get(&to)) else {
                        continue;
                    };
                    if !drawn.insert((from, to)) {
                        continue;
                    }
                    let both = rates.get(&(from, to)).copied().unwrap_or(0.0)
                        + rates.get(&(to, from)).copied().unwrap_or(0.0);
                    channels.push(ChannelView {
                        from: from.to_string(),
                        to: to.to_string(),
                        msgs_per_s: both,
                        local: a == b,
                        child: role.starts_with(tern::CHILD_ROLE_PREFIX),
                    });
                }
            }
        }
        let mut counters = lock(&self.counters).clone();
        let m = lock(&self.migrations);
        counters.migrations = m.1.iter().filter(|v| v.committed).count() as u64;
        Snapshot {
            devices,
            services,
            channels,
            counters,
            migrations: m.1.iter().cloned().collect(),
        }
    }

    fn node(&self, name: &str) -> Option<&NodeHandle> {
        self.nodes.iter().find(|n| n.name().as_str() == name)
    }

    /// The device running `id`.
    fn host_of(&self, id: ServiceId) -> Option<&NodeHandle> {
        self.nodes
            .iter()
            .find(|n| n.services().iter().any(|s| s.addr.id == id))
    }

    /// Reads the services' counters once (while traffic flows).
    async fn refresh_counters(&self) {
        let node = self
            .nodes
            .iter()
            .find(|n| !n.members().iter().any(|m| m.local && m.info.draining))
            .or(self.nodes.first());
        let Some(node) = node else { return };
        let read: Result<Audit> = self.app.audit_so_far(node).await;
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

    /// Moves `id` to `to` (with its tree when it has children).
    pub async fn migrate(&self, id: ServiceId, to: &str) -> Result<Vec<MigrationReport>, String> {
        if self.node(to).is_none() {
            return Err(format!("unknown device {to:?}"));
        }
        let host = self
            .host_of(id)
            .ok_or_else(|| format!("no device runs service {id}"))?;
        let has_children = !host.children(id).is_empty();
        let reports = if has_children {
            host.migrate_tree(id, to, MigrateOptions::default())
                .await
                .map(|g| g.members)
        } else {
            host.migrate(id, to, MigrateOptions::default())
                .await
                .map(|r| vec![r])
        }
        .map_err(|e| e.to_string())?;
        for r in &reports {
            self.record(r);
        }
        Ok(reports)
    }

    /// Drains device `name`.
    pub async fn drain(&self, name: &str) -> Result<tern::DrainReport, String> {
        let node = self
            .node(name)
            .ok_or_else(|| format!("unknown device {name:?}"))?;
        let report = node.drain().await;
        for r in &report.moved {
            self.record(r);
        }
        Ok(report)
    }
}

#[derive(Deserialize)]
struct MigrateBody {
    service: String,
    to: String,
}

#[derive(Deserialize)]
struct DrainBody {
    node: String,
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
/// Calls `on_listening` with the bound address (port 0 picks a free one).
pub async fn serve(
    dashboard: Arc<Dashboard>,
    addr: SocketAddr,
    on_listening: impl FnOnce(SocketAddr),
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let data = web::Data::from(dashboard.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(web::JsonConfig::default().limit(BODY_BYTES_MAX))
            .route("/", web::get().to(page))
            .route("/api/state", web::get().to(state))
            .route("/events", web::get().to(events))
            .route("/api/migrate", web::post().to(migrate))
            .route("/api/drain", web::post().to(drain))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1)
    .bind(addr)
    .with_context(|| format!("binding the dashboard to {addr}"))?;
    let bound = server.addrs().first().copied().unwrap_or(addr);
    on_listening(bound);
    let server = server.run();
    let handle = server.handle();
    let poller = dashboard.clone();
    let counters = actix_web::rt::spawn(async move {
        loop {
            poller.refresh_counters().await;
            tokio::time::sleep(Duration::from_millis(AUDIT_MS)).await;
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
