//! One device as its own process: `tern-demo node --config demo-apps/devices/tv.toml`.
//!
//! ```toml
//! name = "tv"                       # must match the name in the certificate
//! listen = "127.0.0.1:7102"
//! capabilities = ["display", "speaker"]
//! ca = "certs/ca.pem"               # paths are relative to the current folder
//! cert = "certs/tv.pem"
//! key = "certs/tv.key"
//! # battery_percent = 80            # a device on battery (none: plugged in)
//! # start_app = true                # spawn Tern Media here and start playing
//! admins = ["admin"]                # admin certificates that may use `tern` on it (none: closed)
//! dashboard_cert = "certs/admin.pem" # the admin certificate `--serve` reads other devices with
//! dashboard_key = "certs/admin.key"
//! crl = "certs/crl.pem"             # the CA's revocation list, read at start and on SIGHUP
//!                                   # with the certificate (none yet: no file)
//!
//! [[peers]]
//! name = "phone"
//! addr = "127.0.0.1:7101"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tern::certs::NodeIdentity;
use tern::{Node, NodeConfig, NodeHandle, PeerConfig, Power};

use crate::app::{MediaApp, Pace};

/// A peer to dial.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    /// Its name, as in its certificate.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// A device file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The device's name; its certificate must name the same.
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
    /// This device's certificate.
    pub cert: PathBuf,
    /// This device's private key.
    pub key: PathBuf,
    /// Battery level, when on battery.
    #[serde(default)]
    pub battery_percent: Option<u8>,
    /// Spawn Tern Media here and start playing.
    #[serde(default)]
    pub start_app: bool,
    /// Admin and observer certificates that may open admin connections (empty: none may;
    /// `"*"`: every one the cluster CA issued).
    #[serde(default)]
    pub admins: Vec<String>,
    /// The admin (or observer) certificate a dashboard served by this device (`--serve`)
    /// reads the other devices with; without it, the dashboard shows this device only.
    #[serde(default)]
    pub dashboard_cert: Option<PathBuf>,
    /// That certificate's key.
    #[serde(default)]
    pub dashboard_key: Option<PathBuf>,
    /// The cluster CA's revocation list (`tern ca revoke` writes it), read at start and on
    /// SIGHUP when the file exists.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

impl DeviceConfig {
    /// Reads and checks a device file.
    pub fn load(path: &Path) -> Result<DeviceConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the device file {}", path.display()))?;
        let cfg: DeviceConfig =
            toml::from_str(&text).with_context(|| format!("in {}", path.display()))?;
        if cfg.battery_percent.is_some_and(|p| p > 100) {
            bail!("{}: battery_percent is over 100", path.display());
        }
        Ok(cfg)
    }

    /// The node configuration: loads the certificate and checks it names this device.
    pub fn node_config(&self) -> Result<NodeConfig> {
        let identity = NodeIdentity::load(&self.cert, &self.key, &self.ca).with_context(|| {
            format!(
                "loading {}'s certificate ({}, {}, {}); make them with `tern ca init` and \
                 `tern ca issue {}`",
                self.name,
                self.cert.display(),
                self.key.display(),
                self.ca.display(),
                self.name
            )
        })?;
        let named = identity.name()?;
        if named.as_str() != self.name {
            bail!(
                "{} is {named}'s certificate, not {}'s",
                self.cert.display(),
                self.name
            );
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
        Ok(cfg)
    }

    /// The revocation list the file names, when that file exists.
    fn revocation_list(&self) -> Result<Option<Vec<u8>>> {
        match &self.crl {
            Some(path) if path.exists() => Ok(Some(tern::certs::load_crl(path)?)),
            _ => Ok(None),
        }
    }

    /// Reads the certificate and the revocation list again and gives them to the running
    /// `node` (what SIGHUP does): a renewed certificate takes effect for new connections,
    /// and a newer list disconnects the devices it revokes. Says what changed.
    pub fn reload(&self, node: &NodeHandle) -> Result<String> {
        let identity = self.node_config()?.identity;
        let mut said = Vec::new();
        if identity.cert_der != node.identity().cert_der {
            node.reload_identity(identity)?;
            said.push(format!("certificate {} reloaded", self.cert.display()));
        }
        if let Some(crl) = self.revocation_list()? {
            if node.install_revocations(&crl)? == tern::trust::Installed::Newer {
                said.push("a newer revocation list installed".to_owned());
            }
        }
        if said.is_empty() {
            said.push("nothing new".to_owned());
        }
        Ok(said.join("; "))
    }

    /// The admin certificate a dashboard on this device uses, if the file names one.
    pub fn dashboard_identity(&self) -> Result<Option<NodeIdentity>> {
        let (cert, key) = match (&self.dashboard_cert, &self.dashboard_key) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            _ => bail!(
                "{}: dashboard_cert and dashboard_key go together",
                self.name
            ),
        };
        let id = NodeIdentity::load(cert, key, &self.ca).with_context(|| {
            format!(
                "loading the dashboard's certificate {}; make it with `tern ca issue NAME \
                 --role admin`",
                cert.display()
            )
        })?;
        let role = id.role()?;
        if !role.may_administer() {
            bail!(
                "{} is a {role}'s certificate; the dashboard needs an admin's or an observer's",
                cert.display()
            );
        }
        Ok(Some(id))
    }
}

/// Starts the device's node with the Tern Media kinds, its power, and the app if it starts
/// here. Returns the node and the app it started.
pub fn start(cfg: &DeviceConfig, pace: Pace) -> Result<(NodeHandle, Option<MediaApp>)> {
    let node = Node::start(cfg.node_config()?)
        .with_context(|| format!("starting {} on {}", cfg.name, cfg.listen))?;
    crate::media::register(&node);
    if let Some(percent) = cfg.battery_percent {
        node.set_power(Power::Battery { percent });
    }
    let app = if cfg.start_app {
        let app = MediaApp::spawn(&node, pace)?;
        app.play(&node, pace)?;
        Some(app)
    } else {
        None
    };
    Ok((node, app))
}
