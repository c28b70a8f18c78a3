//! The Tern multi-node harness: many nodes in one process, each on its own actix system and
//! thread, real QUIC on 127.0.0.1 with OS-chosen ports, one fresh cluster CA.
//!
//! ```no_run
//! use std::time::Duration;
//! let cluster = tern_harness::Cluster::builder()
//!     .node("phone", &["display", "speaker"])
//!     .node("tv", &["display"])
//!     .setup(tern_actors::register_all)
//!     .start()?;
//! cluster.wait_connected(Duration::from_secs(10))?;
//! let kv = cluster.node("tv").spawn(tern_actors::KvStore::default())?;
//! # let _ = kv;
//! cluster.shutdown();
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::future::Future;
use std::sync::Once;
use std::time::{Duration, Instant};

/// The guide `docs/harness.md`: its examples run as doc tests, so the page stays true.
#[doc = include_str!("../../docs/harness.md")]
#[cfg(doctest)]
pub struct HarnessGuide;

pub mod dataplane;
pub mod failover;
pub mod faults;
pub mod kit;
pub mod rogue;
pub mod sim;

use anyhow::{bail, Context as _, Result};
use tern::certs::ClusterCa;
use tern::{Limits, Node, NodeConfig, NodeHandle};

use crate::faults::Faults;

/// One node to start.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Node name (its certificate's).
    pub name: String,
    /// Capabilities.
    pub capabilities: Vec<String>,
    /// Limits.
    pub limits: Limits,
    /// Data directory ([`NodeConfig::data_dir`]); kept across [`Cluster::restart`].
    pub data_dir: Option<std::path::PathBuf>,
}

type Setup = Box<dyn Fn(&NodeHandle)>;

/// Builds a [`Cluster`].
#[derive(Default)]
pub struct ClusterBuilder {
    specs: Vec<NodeSpec>,
    setup: Option<Setup>,
    node_setups: Vec<(String, Setup)>,
    limits: Option<Limits>,
    node_limits: Vec<(String, Limits)>,
    unconnected: bool,
    faults_seed: Option<u64>,
    admins: Vec<String>,
}

impl ClusterBuilder {
    /// Adds a node.
    pub fn node(mut self, name: &str, capabilities: &[&str]) -> Self {
        self.specs.push(NodeSpec {
            name: name.to_owned(),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            limits: Limits::default(),
            data_dir: None,
        });
        self
    }

    /// Gives node `name` the data directory `dir` ([`NodeConfig::data_dir`]).
    pub fn node_data_dir(mut self, name: &str, dir: &std::path::Path) -> Self {
        for spec in self.specs.iter_mut().filter(|s| s.name == name) {
            spec.data_dir = Some(dir.to_path_buf());
        }
        self
    }

    /// Gives every node a data directory, `root/<name>` ([`NodeConfig::data_dir`]): a node
    /// restarted with [`Cluster::restart`] finds what it wrote there. The caller removes
    /// `root` when done.
    pub fn data_dirs(mut self, root: &std::path::Path) -> Self {
        for spec in &mut self.specs {
            spec.data_dir = Some(root.join(&spec.name));
        }
        self
    }

    /// Limits for every node.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Limits for node `name` only (applied after [`limits`](Self::limits)).
    pub fn node_limits(mut self, name: &str, limits: Limits) -> Self {
        self.node_limits.push((name.to_owned(), limits));
        self
    }

    /// Leaves the nodes unintroduced; [`Cluster::connect_all`] introduces them later.
    pub fn unconnected(mut self) -> Self {
        self.unconnected = true;
        self
    }

    /// Runs every node on a fault-injecting socket (see [`faults`]); node `i`'s random choices
    /// follow from `seed + i`. [`Cluster::faults`] controls them.
    pub fn faults(mut self, seed: u64) -> Self {
        self.faults_seed = Some(seed);
        self
    }

    /// Every node lets these admin and observer certificates in
    /// ([`NodeConfig::admins`]; none by default). Issue them with
    /// `cluster.ca.issue_role(name, Role::Admin)`.
    pub fn admins(mut self, names: &[&str]) -> Self {
        self.admins = names.iter().map(|n| n.to_string()).collect();
        self
    }

    /// Runs on every node once it is up (register kinds here).
    pub fn setup(mut self, f: impl Fn(&NodeHandle) + 'static) -> Self {
        self.setup = Some(Box::new(f));
        self
    }

    /// Runs on node `name` once it is up, after [`setup`](Self::setup): the kinds only this
    /// device has, say. Runs again when the node restarts.
    pub fn node_setup(mut self, name: &str, f: impl Fn(&NodeHandle) + 'static) -> Self {
        self.node_setups.push((name.to_owned(), Box::new(f)));
        self
    }

    /// Starts every node and introduces each to all the others.
    pub fn start(self) -> Result<Cluster> {
        init_tracing();
        let ca = ClusterCa::new()?;
        let mut nodes = Vec::new();
        let mut faults = Vec::new();
        let mut specs = Vec::new();
        for (i, mut spec) in self.specs.into_iter().enumerate() {
            if let Some(l) = &self.limits {
                spec.limits = l.clone();
            }
            if let Some((_, l)) = self.node_limits.iter().find(|(n, _)| *n == spec.name) {
                spec.limits = l.clone();
            }
            specs.push(spec.clone());
            let mut cfg = NodeConfig::new(ca.issue(&spec.name)?, "127.0.0.1:0".parse()?);
            cfg.capabilities = spec.capabilities;
            cfg.limits = spec.limits;
            cfg.admins = self.admins.clone();
            cfg.data_dir = spec.data_dir;
            if let Some(seed) = self.faults_seed {
                let f = Faults::new(seed.wrapping_add(i as u64));
                cfg.socket_wrap = Some(f.wrap());
                faults.push((spec.name.clone(), f));
            }
            let node = Node::start(cfg).with_context(|| format!("starting node {}", spec.name))?;
            run_setups(&node, &self.setup, &self.node_setups);
            nodes.push(node);
        }
        let cluster = Cluster {
            ca,
            nodes,
            faults,
            specs,
            setup: self.setup,
            node_setups: self.node_setups,
            updated: Vec::new(),
            faults_seed: self.faults_seed,
            admins: self.admins,
        };
        if !self.unconnected {
            cluster.connect_all()?;
        }
        Ok(cluster)
    }
}

/// Nodes running in this process.
pub struct Cluster {
    /// The cluster CA that issued every node's certificate.
    pub ca: ClusterCa,
    nodes: Vec<NodeHandle>,
    faults: Vec<(String, Faults)>,
    specs: Vec<NodeSpec>,
    setup: Option<Setup>,
    node_setups: Vec<(String, Setup)>,
    /// Nodes restarted as updated devices ([`Cluster::restart_updated`]): their setup from
    /// then on, in place of the cluster's and their own.
    updated: Vec<(String, Setup)>,
    faults_seed: Option<u64>,
    admins: Vec<String>,
}

/// The setup for every node, then node `node`'s own.
fn run_setups(node: &NodeHandle, all: &Option<Setup>, own: &[(String, Setup)]) {
    if let Some(setup) = all {
        setup(node);
    }
    for (_, setup) in own.iter().filter(|(n, _)| n == node.name().as_str()) {
        setup(node);
    }
}

impl Cluster {
    /// A builder.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// Starts nodes with the given names and no capabilities, with `setup` run on each.
    pub fn start(names: &[&str], setup: impl Fn(&NodeHandle) + 'static) -> Result<Cluster> {
        names
            .iter()
            .fold(Cluster::builder(), |b, n| b.node(n, &[]))
            .setup(setup)
            .start()
    }

    /// The node named `name`. Panics if there is none: a test naming a node it did not start
    /// is wrong.
    pub fn node(&self, name: &str) -> &NodeHandle {
        self.nodes
            .iter()
            .find(|n| n.name().as_str() == name)
            .unwrap_or_else(|| panic!("no node {name} in this cluster"))
    }

    /// The fault control of node `name`. Panics unless the cluster was built with
    /// [`ClusterBuilder::faults`] and has that node.
    pub fn faults(&self, name: &str) -> &Faults {
        self.faults
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, f)| f)
            .unwrap_or_else(|| panic!("node {name} runs on no fault-injecting socket"))
    }

    /// Cuts the way between nodes `a` and `b`, both directions.
    pub fn cut(&self, a: &str, b: &str) {
        self.faults(a).cut(self.node(b).local_addr());
        self.faults(b).cut(self.node(a).local_addr());
    }

    /// Heals the way between nodes `a` and `b`, both directions.
    pub fn heal(&self, a: &str, b: &str) {
        self.faults(a).heal(self.node(b).local_addr());
        self.faults(b).heal(self.node(a).local_addr());
    }

    /// Kills node `name` without a goodbye: its socket drops everything from now on (so not
    /// even its connection-close frames leave), and it halts: its services handle nothing
    /// more and its system ends at once. Its peers learn only through their idle timeout. Needs [`ClusterBuilder::faults`].
    pub fn kill(&self, name: &str) {
        self.faults(name).kill();
        self.node(name).halt();
    }

    /// Starts node `name` again after [`kill`](Self::kill), on the same address, with the
    /// same certificate, the same limits and setup, and a clean fault-injecting socket, as a
    /// device that rebooted. It has no services; its peers redial it. Handles the caller made
    /// on the old node must be dropped first (they keep its socket bound).
    pub fn restart(&mut self, name: &str) -> Result<()> {
        let identity = self.node(name).identity();
        self.restart_with(name, identity)
    }

    /// As [`restart`](Self::restart), with a fresh certificate (a new key) for the same name:
    /// a device that was given a new certificate, or another holder of the name.
    pub fn restart_with_new_certificate(&mut self, name: &str) -> Result<()> {
        let identity = self.ca.issue(name)?;
        self.restart_with(name, identity)
    }

    /// As [`restart`](Self::restart), as a device updated to its app's next version: `setup`
    /// (which registers the new versions of the app's kinds) runs in place of the cluster's
    /// setup and the node's own, at this start and the next ones. Drain the node first
    /// ([`NodeHandle::drain`]) for its services to move away before it stops.
    ///
    /// ```no_run
    /// # fn demo(mut cluster: tern_harness::Cluster) -> anyhow::Result<()> {
    /// let moved = tern_harness::block_on(cluster.node("tv").drain());
    /// assert!(moved.failed.is_empty());
    /// cluster.restart_updated("tv", tern_demo::next::register)?;
    /// # Ok(()) }
    /// ```
    pub fn restart_updated(
        &mut self,
        name: &str,
        setup: impl Fn(&NodeHandle) + 'static,
    ) -> Result<()> {
        self.updated.retain(|(n, _)| n != name);
        self.updated.push((name.to_owned(), Box::new(setup)));
        let identity = self.node(name).identity();
        self.restart_with(name, identity)
    }

    fn restart_with(&mut self, name: &str, identity: tern::certs::NodeIdentity) -> Result<()> {
        let i = self
            .nodes
            .iter()
            .position(|n| n.name().as_str() == name)
            .with_context(|| format!("no node {name} in this cluster"))?;
        let spec = self.specs[i].clone();
        // The old handle goes first: while anything holds the old node, its socket stays bound.
        // (So must every handle the test made on it.)
        let old = self.nodes.remove(i);
        let addr = old.local_addr();
        old.shutdown();
        drop(old);
        let mut cfg = NodeConfig::new(identity, addr);
        cfg.capabilities = spec.capabilities;
        cfg.limits = spec.limits;
        cfg.admins = self.admins.clone();
        cfg.data_dir = spec.data_dir;
        if let Some(seed) = self.faults_seed {
            let f = Faults::new(seed.wrapping_add(i as u64).wrapping_add(0x1000));
            cfg.socket_wrap = Some(f.wrap());
            if let Some(slot) = self.faults.iter_mut().find(|(n, _)| n == name) {
                slot.1 = f;
            }
        }
        let node = Node::start(cfg).with_context(|| format!("restarting node {name}"))?;
        match self.updated.iter().find(|(n, _)| n == name) {
            Some((_, updated)) => updated(&node),
            None => run_setups(&node, &self.setup, &self.node_setups),
        }
        for other in &self.nodes {
            node.add_peer(other.name().as_str(), other.local_addr())?;
        }
        self.nodes.insert(i, node);
        Ok(())
    }

    /// Starts node `name` with `capabilities` in the running cluster: the cluster's limits
    /// (those of its first node), the setup every node runs, then `setup`; it is introduced
    /// to every node (its peers learn of it as of any new member) and, on a cluster built
    /// with [`ClusterBuilder::faults`], runs on a fault-injecting socket too. Wait for it with
    /// [`wait_connected`](Self::wait_connected) or [`wait_members`](Self::wait_members).
    ///
    /// ```no_run
    /// # fn demo(mut cluster: tern_harness::Cluster) -> anyhow::Result<()> {
    /// let laptop = cluster.add_node("laptop", &["display", "keyboard"], |n| {
    ///     tern_actors::register_all(n);
    /// })?;
    /// # let _ = laptop;
    /// cluster.wait_members(std::time::Duration::from_secs(10))?;
    /// # Ok(()) }
    /// ```
    pub fn add_node(
        &mut self,
        name: &str,
        capabilities: &[&str],
        setup: impl Fn(&NodeHandle) + 'static,
    ) -> Result<&NodeHandle> {
        if self.nodes.iter().any(|n| n.name().as_str() == name) {
            bail!("node {name} is already in this cluster");
        }
        let spec = NodeSpec {
            name: name.to_owned(),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            limits: self
                .specs
                .first()
                .map_or_else(Limits::default, |s| s.limits.clone()),
            data_dir: None,
        };
        let i = self.specs.len();
        let mut cfg = NodeConfig::new(self.ca.issue(name)?, "127.0.0.1:0".parse()?);
        cfg.capabilities = spec.capabilities.clone();
        cfg.limits = spec.limits.clone();
        cfg.admins = self.admins.clone();
        if let Some(seed) = self.faults_seed {
            let f = Faults::new(seed.wrapping_add(i as u64));
            cfg.socket_wrap = Some(f.wrap());
            self.faults.push((name.to_owned(), f));
        }
        let node = Node::start(cfg).with_context(|| format!("starting node {name}"))?;
        self.node_setups.push((name.to_owned(), Box::new(setup)));
        run_setups(&node, &self.setup, &self.node_setups);
        for other in &self.nodes {
            node.add_peer(other.name().as_str(), other.local_addr())?;
        }
        self.specs.push(spec);
        self.nodes.push(node);
        Ok(&self.nodes[i])
    }

    /// Waits until membership has converged: every node sees every other one up, with the
    /// capabilities, registered kinds and drain state that node gives of itself. From then
    /// on placement and the checks before a move work from what each node is now (a
    /// connection alone does not say that: membership comes with gossip).
    pub fn wait_members(&self, timeout: Duration) -> Result<()> {
        self.wait_connected(timeout)?;
        let own = |n: &NodeHandle| n.members().into_iter().find(|m| m.local).map(|m| m.info);
        wait_for(timeout, "every node to see every other as it is", || {
            let selves: Vec<_> = self.nodes.iter().map(own).collect();
            self.nodes.iter().all(|a| {
                let seen = a.members();
                selves.iter().flatten().all(|me| {
                    me.name == *a.name()
                        || seen.iter().any(|m| {
                            m.info.name == me.name
                                && m.status == tern::MemberStatus::Up
                                && m.info.capabilities == me.capabilities
                                && m.info.kinds == me.kinds
                                && m.info.draining == me.draining
                        })
                })
            })
        })
    }

    /// Every node.
    pub fn nodes(&self) -> &[NodeHandle] {
        &self.nodes
    }

    /// Introduces every node to every other; they connect in the background.
    pub fn connect_all(&self) -> Result<()> {
        for a in &self.nodes {
            for b in &self.nodes {
                if a.name() != b.name() {
                    a.add_peer(b.name().as_str(), b.local_addr())?;
                }
            }
        }
        Ok(())
    }

    /// Waits until every node has a connection to every other.
    pub fn wait_connected(&self, timeout: Duration) -> Result<()> {
        wait_for(timeout, "full mesh of connections", || {
            self.nodes.iter().all(|a| {
                self.nodes
                    .iter()
                    .all(|b| a.name() == b.name() || a.is_connected(b.name().as_str()))
            })
        })
    }

    /// Stops every node, all at once (each lingers briefly so its peers see it close).
    pub fn shutdown(self) {
        std::thread::scope(|s| {
            for n in &self.nodes {
                s.spawn(|| n.shutdown());
            }
        });
    }
}

/// Polls `cond` every 5 ms until it holds, or fails after `timeout` naming `what`.
pub fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// [`wait_for`] inside async code (a [`block_on`] or a node's thread): awaits `cond` every
/// 5 ms until it holds, or fails after `timeout` naming `what`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut cond: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        actix_rt::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs `fut` to completion on a fresh actix system on this thread (so asks and timers work
/// from test code).
pub fn block_on<F: Future>(fut: F) -> F::Output {
    actix_rt::System::new().block_on(fut)
}

/// Installs a tracing subscriber once, filtered by `RUST_LOG` (default: warnings).
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(|| Eprint)
            .try_init();
    });
}

/// Writes logs with `eprint!`: a test's output capture takes them (as it takes `print!`), and
/// outside tests they go to stderr, never to stdout, where a program's `--json` object goes.
struct Eprint;

impl std::io::Write for Eprint {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        eprint!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// For binaries: installs a tracing subscriber writing to stderr, filtered by `RUST_LOG`
/// (default: warnings), so logs never mix with what a program prints on stdout. Call it before
/// starting a cluster ([`init_tracing`], which a cluster calls, writes where the test harness
/// captures, and that is stderr outside tests).
pub fn init_tracing_stderr() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
