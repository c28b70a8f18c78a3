//! One device as its own process: `tern-demo node --config demo-apps/devices/tv.toml`. A
//! device file is a node file of `tern::runner` (the node's keys) plus the demo's settings.
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

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tern::certs::NodeIdentity;
use tern::runner::NodeFile;
use tern::{NodeConfig, NodeHandle};

use crate::app::{MediaApp, Pace};

/// What a device file says beyond the node runner's keys ([`NodeFile`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoSettings {
    /// Spawn Tern Media here and start playing.
    #[serde(default)]
    pub start_app: bool,
    /// The admin (or observer) certificate a dashboard served by this device (`--serve`)
    /// reads the other devices with; without it, the dashboard shows this device only.
    #[serde(default)]
    pub dashboard_cert: Option<PathBuf>,
    /// That certificate's key.
    #[serde(default)]
    pub dashboard_key: Option<PathBuf>,
}

/// A device file: a node file for `tern::runner`, with the demo's own settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceConfig {
    /// The node: name, address, capabilities, peers, certificates, power, admins.
    pub node: NodeFile,
    /// The demo's settings.
    pub demo: DemoSettings,
}

impl DeviceConfig {
    /// Reads and checks a device file.
    pub fn load(path: &Path) -> Result<DeviceConfig> {
        let node = NodeFile::load(path)?;
        let demo = node
            .app_settings::<DemoSettings>()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(DeviceConfig { node, demo })
    }

    /// The node configuration: loads the certificate and checks it names this device.
    pub fn node_config(&self) -> Result<NodeConfig> {
        Ok(self.node.node_config()?)
    }

    /// Reads the certificate and the revocation list again and gives them to the running
    /// `node` (what SIGHUP does). Says what changed.
    pub fn reload(&self, node: &NodeHandle) -> Result<String> {
        Ok(self.node.reload(node)?)
    }

    /// The admin certificate a dashboard on this device uses, if the file names one.
    pub fn dashboard_identity(&self) -> Result<Option<NodeIdentity>> {
        let (cert, key) = match (&self.demo.dashboard_cert, &self.demo.dashboard_key) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            _ => bail!(
                "{}: dashboard_cert and dashboard_key go together",
                self.node.name
            ),
        };
        let id = NodeIdentity::load(cert, key, &self.node.ca).with_context(|| {
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

/// Starts the device's node through the node runner with the Tern Media kinds, and the app
/// if it starts here. Returns the node and the app it started.
pub fn start(cfg: &DeviceConfig, pace: Pace) -> Result<(NodeHandle, Option<MediaApp>)> {
    let node = cfg
        .node
        .start(crate::media::register)
        .with_context(|| format!("starting {} on {}", cfg.node.name, cfg.node.listen))?;
    let app = if cfg.demo.start_app {
        let app = MediaApp::spawn(&node, pace)?;
        app.play(&node, pace)?;
        Some(app)
    } else {
        None
    };
    Ok((node, app))
}
