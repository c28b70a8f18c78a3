//! Running a node from a file, one process per device, with the app's own kinds registered:
//! the `tern` command line then drives it like any other node (`tern ps`, `tern migrate`,
//! `tern drain`).
//!
//! The node file (TOML):
//!
//! ```toml
//! name = "tv"                       # must match the name in the certificate
//! listen = "127.0.0.1:7102"
//! capabilities = ["display", "speaker"]
//! ca = "certs/ca.pem"               # paths are relative to the current folder
//! cert = "certs/tv.pem"
//! key = "certs/tv.key"
//! # battery_percent = 80            # a device on battery (none: plugged in)
//! admins = ["admin"]                # admin certificates that may use `tern` on it (none: closed)
//! # crl = "certs/crl.pem"           # the CA's revocation list, read at start and on SIGHUP
//! # data_dir = "data/tv"            # replicated services' checkpoints, resumed after a restart
//! # metrics_listen = "127.0.0.1:9464" # Prometheus scrapes GET /metrics here (none: not served)
//! # discovery = true                # find the cluster's other nodes by mDNS (no peers needed)
//!
//! [[peers]]
//! name = "phone"
//! addr = "127.0.0.1:7101"
//! ```
//!
//! Keys the runner does not know are the app's: [`NodeFile::app_settings`] reads them into the
//! app's own type (which should refuse keys it does not know either). [`run`] is for apps
//! with no settings of their own, and refuses a file with keys it does not know.
//!
//! ```no_run
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Serialize, Deserialize)] struct Board;
//! # impl tern::Service for Board {
//! #     type Msg = ();
//! #     const KIND: &'static str = "board";
//! #     const VERSION: u32 = 1;
//! #     async fn handle(&mut self, _m: (), _c: &mut tern::Ctx<Self>) {}
//! # }
//! fn main() -> Result<(), tern::Error> {
//!     let path = std::env::args().nth(1).unwrap_or_else(|| "tv.toml".into());
//!     // Until Ctrl-C or SIGTERM; SIGHUP reloads the certificate and the revocation list.
//!     tern::runner::run(path.as_ref(), |node| {
//!         node.register::<Board>();
//!     })
//! }
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::certs::NodeIdentity;
use crate::error::Error;
use crate::members::Power;
use crate::node::{Node, NodeConfig, NodeHandle, PeerConfig};

/// A peer to dial.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    /// Its name, as in its certificate.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// A node file: what the runner needs to start a node, and the app's settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct NodeFile {
    /// The node's name; its certificate must name the same.
    pub name: String,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// What the device offers.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Devices to dial (the rest are learned from them).
    #[serde(default)]
    pub peers: Vec<PeerEntry>,
    /// The cluster CA's certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
    /// Battery level, when on battery.
    #[serde(default)]
    pub battery_percent: Option<u8>,
    /// Admin and observer certificates that may open admin connections (empty: none may;
    /// `"*"`: every one the cluster CA issued).
    #[serde(default)]
    pub admins: Vec<String>,
    /// The cluster CA's revocation list (`tern ca revoke` writes it), read at start and on
    /// SIGHUP when the file exists.
    #[serde(default)]
    pub crl: Option<PathBuf>,
    /// Where the node keeps its replicated services' checkpoints and its votes
    /// ([`NodeConfig::data_dir`]); absent: nowhere, and a restart starts empty.
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Where the node serves its metrics for Prometheus ([`NodeHandle::serve_metrics`]);
    /// absent: not served.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// Announce the node and find the cluster's others by mDNS
    /// ([`NodeHandle::start_discovery`]); off when absent.
    #[serde(default)]
    pub discovery: bool,
    /// Every other key of the file: the app's settings ([`app_settings`](Self::app_settings)).
    #[serde(flatten)]
    pub app: toml::Table,
}

impl NodeFile {
    /// Reads and checks a node file.
    pub fn load(path: &Path) -> Result<NodeFile, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("reading the node file {}", path.display()), e))?;
        NodeFile::parse(&text, &path.display().to_string())
    }

    /// Reads a node file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<NodeFile, Error> {
        let file: NodeFile =
            toml::from_str(text).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        if file.battery_percent.is_some_and(|p| p > 100) {
            return Err(Error::Config(format!(
                "{origin}: battery_percent is over 100"
            )));
        }
        Ok(file)
    }

    /// The keys the runner does not know, read as the app's settings `T`.
    pub fn app_settings<T: DeserializeOwned>(&self) -> Result<T, Error> {
        self.app
            .clone()
            .try_into()
            .map_err(|e| Error::Config(format!("{}: {e}", self.name)))
    }

    /// The node configuration: loads the certificate and checks it names this node.
    pub fn node_config(&self) -> Result<NodeConfig, Error> {
        let identity = NodeIdentity::load(&self.cert, &self.key, &self.ca).map_err(|e| {
            Error::Config(format!(
                "loading {}'s certificate ({}, {}, {}): {e}; make them with `tern ca init` and \
                 `tern ca issue {}`",
                self.name,
                self.cert.display(),
                self.key.display(),
                self.ca.display(),
                self.name
            ))
        })?;
        let named = identity.name()?;
        if named.as_str() != self.name {
            return Err(Error::Config(format!(
                "{} is {named}'s certificate, not {}'s",
                self.cert.display(),
                self.name
            )));
        }
        let mut cfg = NodeConfig::new(identity, self.listen);
        cfg.capabilities = self.capabilities.clone();
        cfg.peers = self
            .peers
            .iter()
            .map(|p| PeerConfig {
                name: p.name.clone(),
                addr: p.addr,
            })
            .collect();
        cfg.admins = self.admins.clone();
        cfg.revocations = self.revocation_list()?;
        cfg.data_dir = self.data_dir.clone();
        Ok(cfg)
    }

    /// Starts the node: `register` registers the app's kinds (before any peer can ask for
    /// them), then the power is set.
    pub fn start(&self, register: impl FnOnce(&NodeHandle)) -> Result<NodeHandle, Error> {
        let node = Node::start(self.node_config()?)?;
        register(&node);
        if let Some(percent) = self.battery_percent {
            node.set_power(Power::Battery { percent });
        }
        if self.discovery {
            if let Err(e) = node.start_discovery() {
                node.shutdown();
                return Err(e);
            }
        }
        if let Some(addr) = self.metrics_listen {
            match node.serve_metrics(addr) {
                Ok(bound) => tracing::info!(%bound, "serving metrics at /metrics"),
                Err(e) => {
                    node.shutdown();
                    return Err(e);
                }
            }
        }
        Ok(node)
    }

    /// The revocation list the file names, when that file exists.
    fn revocation_list(&self) -> Result<Option<Vec<u8>>, Error> {
        match &self.crl {
            Some(path) if path.exists() => Ok(Some(crate::certs::load_crl(path)?)),
            _ => Ok(None),
        }
    }

    /// Reads the certificate and the revocation list again and gives them to the running
    /// `node` (what SIGHUP does): a renewed certificate takes effect for new connections,
    /// and a newer list disconnects the nodes it revokes. Says what changed.
    pub fn reload(&self, node: &NodeHandle) -> Result<String, Error> {
        let identity = self.node_config()?.identity;
        let mut said = Vec::new();
        if identity.cert_der != node.identity().cert_der {
            node.reload_identity(identity)?;
            said.push(format!("certificate {} reloaded", self.cert.display()));
        }
        if let Some(crl) = self.revocation_list()? {
            if node.install_revocations(&crl)? == crate::trust::Installed::Newer {
                said.push("a newer revocation list installed".to_owned());
            }
        }
        if said.is_empty() {
            said.push("nothing new".to_owned());
        }
        Ok(said.join("; "))
    }
}

/// Runs a node from the file at `path`, with the kinds `register` registers, until Ctrl-C or
/// SIGTERM; SIGHUP reloads its certificate and revocation list. What the node notices goes to
/// the log (`tracing`, on stderr), one line per event. The node drains nothing by itself on
/// the way out: `tern drain NAME` first moves its services away.
pub fn run(path: &Path, register: impl FnOnce(&NodeHandle)) -> Result<(), Error> {
    let file = NodeFile::load(path)?;
    if !file.app.is_empty() {
        let keys: Vec<&str> = file.app.keys().map(String::as_str).collect();
        return Err(Error::Config(format!(
            "{}: unknown keys {}",
            path.display(),
            keys.join(", ")
        )));
    }
    let node = file.start(register)?;
    tracing::info!(node = %node.name(), addr = %node.local_addr(), "node running");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::io("starting the runner's signal loop", e))?;
    rt.block_on(async {
        let mut seen = 0;
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
        let stop = stop_signal();
        tokio::pin!(stop);
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| Error::io("listening for SIGHUP", e))?;
        loop {
            #[cfg(unix)]
            let reload = hup.recv();
            #[cfg(not(unix))]
            let reload = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => {
                    let last = seen;
                    for e in node.events().into_iter().filter(|e| e.n > last) {
                        seen = e.n;
                        tracing::info!(node = %node.name(), kind = %e.kind, "{}", e.detail);
                    }
                }
                Some(()) = reload => match file.reload(&node) {
                    Ok(what) => tracing::info!(node = %node.name(), "reload: {what}"),
                    Err(e) => tracing::warn!(node = %node.name(), "reload failed: {e}"),
                },
            }
        }
        Ok::<(), Error>(())
    })?;
    tracing::info!(node = %node.name(), "stopping");
    node.shutdown();
    Ok(())
}

/// Completes on Ctrl-C, or SIGTERM on Unix: what a device's process stops on.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_file_keeps_the_apps_keys_apart_and_checks_its_own() {
        let text = r#"
            name = "tv"
            listen = "127.0.0.1:7102"
            capabilities = ["display"]
            ca = "ca.pem"
            cert = "tv.pem"
            key = "tv.key"
            start_app = true
            [[peers]]
            name = "phone"
            addr = "127.0.0.1:7101"
        "#;
        let f = NodeFile::parse(text, "tv.toml").unwrap();
        assert_eq!(f.peers[0].name, "phone");
        assert_eq!(f.data_dir, None);
        let with_data = format!("data_dir = \"data/tv\"\n{text}");
        let f2 = NodeFile::parse(&with_data, "tv.toml").unwrap();
        assert_eq!(f2.data_dir, Some(PathBuf::from("data/tv")));
        assert!(f2.app.get("data_dir").is_none(), "not an app setting");
        let with_metrics = format!("metrics_listen = \"127.0.0.1:9464\"\n{text}");
        let f3 = NodeFile::parse(&with_metrics, "tv.toml").unwrap();
        assert_eq!(f3.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(f3.app.get("metrics_listen").is_none(), "not an app setting");
        assert!(!f3.discovery);
        let f4 = NodeFile::parse(&format!("discovery = true\n{text}"), "tv.toml").unwrap();
        assert!(f4.discovery && f4.app.get("discovery").is_none());
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct App {
            start_app: bool,
        }
        assert!(f.app_settings::<App>().unwrap().start_app);
        let bad = NodeFile::parse(&text.replace("7102", "x"), "tv.toml").unwrap_err();
        assert!(bad.to_string().contains("tv.toml"), "{bad}");
        let over = format!("battery_percent = 101\n{text}");
        let bad = NodeFile::parse(&over, "tv.toml").unwrap_err();
        assert!(bad.to_string().contains("battery_percent"), "{bad}");
    }
}
