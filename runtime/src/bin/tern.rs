//! `tern`: the command line for any Tern cluster.
//!
//! ```text
//! tern ca init [--dir certs]              a cluster CA (ca.pem, ca.key owner-only)
//! tern ca issue NAME [--dir certs] [--days 365] [--role node|admin|observer]
//!                                         a certificate for node (or admin) NAME
//! tern ca revoke NAME [--dir certs] [--offline]
//!                                         revoke NAME's certificates (certs/crl.pem) and
//!                                         hand the list to --node, which spreads it
//! tern pair NAME [--role node] [--listen 0.0.0.0:7190] [--minutes 5] [--dir certs]
//!                                         offer NAME a certificate for a one-time code
//! tern join NAME --code CODE --at ADDR [--dir certs]
//!                                         on the new device: get it with the code
//! tern ps                                 services, where they run, epochs, mailbox depth
//! tern nodes                              nodes: capabilities, load, power
//! tern tree SERVICE                       an assembly tree
//! tern assoc SERVICE                      a service's associated services
//! tern plan SERVICE [--to NODE] [--tree]  where placement would put it, and why
//! tern migrate SERVICE --to NODE [--tree] move it (or its tree) and print the report
//! tern drain NODE                         move everything off NODE
//! tern top [--once] [--every-ms 1000]     rates, migrations and freezes of every node;
//!                                         the deepest mailboxes; the busiest channels
//! tern events [--follow]                  the entry node's events, then each new one
//! tern metrics                            the entry node's metrics (OpenMetrics text)
//! tern doctor                             the admin certificate, the entry node and every
//!                                         member (answers, clock, certificates, links), with
//!                                         a hint for each problem
//! tern completions SHELL                  the completion script for bash, zsh, fish,
//!                                         elvish or powershell, on stdout
//! ```
//!
//! Every command but `ca`, `pair`, `join`, `completions` (and `doctor`, which checks it) talks to a node over an admin connection (QUIC, mutual TLS,
//! ALPN `tern-admin/1`) as `--as NAME` (default `admin`: an admin or observer certificate in
//! `--certs`), entering the cluster at `--node [NAME@]ADDR` (or `TERN_NODE`; with a name, the
//! node answering must be that one). Nodes reached through the entry must be the ones the
//! entry named. SERVICE is an id, the start of one, or a kind with one service.

// The watching commands (`top`, `events`, `metrics`), in their own file.
#[path = "tern/watch.rs"]
mod watch;
// `tern doctor`.
#[path = "tern/doctor.rs"]
mod doctor;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use tern::admin::{survey, AdminClient, AdminReply, AdminRequest, Survey};
use tern::certs::{ClusterCa, NodeIdentity, Role};
use tern::GroupReport;
use tern::NodeName;

#[derive(Parser)]
#[command(
    name = "tern",
    about = "Drive a Tern cluster: certificates, services, placement, migration"
)]
struct Args {
    /// A node to enter the cluster through: ADDR, or NAME@ADDR to refuse any other node
    /// answering there.
    #[arg(
        long,
        global = true,
        env = "TERN_NODE",
        default_value = "127.0.0.1:7101"
    )]
    node: Entry,
    /// The folder with the cluster CA and the admin certificate.
    #[arg(long, global = true, env = "TERN_CERTS", default_value = "certs")]
    certs: PathBuf,
    /// The admin certificate's name (NAME.pem and NAME.key in --certs).
    #[arg(long = "as", global = true, default_value = "admin")]
    admin: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The cluster CA and certificates.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Lists every service: where it runs, its epoch and mailbox depth.
    Ps,
    /// Lists every node: capabilities, load, power.
    Nodes,
    /// Shows the assembly tree rooted at SERVICE.
    Tree {
        /// Id, start of an id, or kind.
        service: String,
    },
    /// Lists SERVICE's associated services: declared in books and observed in traffic.
    Assoc {
        /// Id, start of an id, or kind.
        service: String,
    },
    /// Shows where placement would put SERVICE, and why; moves nothing.
    Plan {
        /// Id, start of an id, or kind.
        service: String,
        /// Only consider this node.
        #[arg(long)]
        to: Option<String>,
        /// Plan its whole assembly tree.
        #[arg(long)]
        tree: bool,
    },
    /// Moves SERVICE (or its whole tree) to NODE and prints the report.
    Migrate {
        /// Id, start of an id, or kind.
        service: String,
        /// The node to take it.
        #[arg(long)]
        to: String,
        /// Move its whole assembly tree as one unit.
        #[arg(long)]
        tree: bool,
    },
    /// Lists every registered name the entry node knows of, with its service.
    Names,
    /// Hands SERVICE back to automatic placement (a `migrate` held it where it put it).
    Release {
        /// Id, start of an id, or kind.
        service: String,
    },
    /// Moves every movable service off NODE, then NODE takes no more.
    Drain {
        /// The node.
        #[arg(value_name = "NODE")]
        target: String,
    },
    /// On the device that holds the CA: shows a one-time code for which NAME's new device
    /// gets its certificate (`tern join`), without copying key files.
    Pair {
        /// The new device's name.
        name: String,
        /// Its certificate's role.
        #[arg(long, default_value = "node")]
        role: Role,
        /// Days its certificate is valid.
        #[arg(long, default_value_t = tern::certs::CERT_DAYS_DEFAULT)]
        days: u64,
        /// Where to wait for the new device (TCP).
        #[arg(long, default_value = "0.0.0.0:7190")]
        listen: SocketAddr,
        /// Minutes the code is good for.
        #[arg(long, default_value_t = 5)]
        minutes: u64,
        /// Where the CA is.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
    /// Every node's handled, incoming and outgoing message rates, migrations and median
    /// freeze; the services with the deepest mailboxes; the busiest channels. Redrawn every
    /// interval until interrupted.
    Top {
        /// The interval the rates are measured over (ms).
        #[arg(long, default_value_t = 1000)]
        every_ms: u64,
        /// One view (two readings an interval apart), then exit.
        #[arg(long)]
        once: bool,
    },
    /// The entry node's recent events (refusals, protocol errors, peers, migrations).
    Events {
        /// Then print each new event as it comes, until the node goes away or Ctrl-C.
        #[arg(long, short)]
        follow: bool,
        /// How often to ask for new events when following (ms).
        #[arg(long, default_value_t = 500)]
        every_ms: u64,
    },
    /// The entry node's metrics, as its Prometheus endpoint serves them (OpenMetrics text).
    Metrics,
    /// Checks the admin certificate, the entry node and every member (answers, clock,
    /// certificate lifetime, links), with a hint for each problem. Exit status 1 when a check
    /// fails.
    Doctor,
    /// Prints the completion script of SHELL for these commands on stdout, for example
    /// `tern completions bash > ~/.local/share/bash-completion/completions/tern`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// On the new device: gets NAME's certificate from `tern pair` with its code; the key is
    /// made here and never leaves.
    Join {
        /// This device's name (as `tern pair` was told).
        name: String,
        /// The code `tern pair` shows.
        #[arg(long)]
        code: String,
        /// Where `tern pair` waits.
        #[arg(long)]
        at: SocketAddr,
        /// Where to write the certificate, its key and the CA's certificate.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum CaCmd {
    /// Creates a cluster CA (ca.pem, ca.key) in DIR.
    Init {
        /// Where to write it.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
    /// Issues a certificate for NAME (a node, or an admin) from the CA in DIR.
    Issue {
        /// The node's (or admin's) name.
        name: String,
        /// Where the CA is and the certificate goes.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Days the certificate is valid (1 to 3650).
        #[arg(long, default_value_t = tern::certs::CERT_DAYS_DEFAULT)]
        days: u64,
        /// What it may do: `node` joins the cluster; `admin` drives it with `tern`;
        /// `observer` may only read.
        #[arg(long, default_value = "node")]
        role: Role,
    },
    /// Revokes every certificate issued to NAME: writes the CA's new revocation list
    /// (crl.pem in DIR) and hands it to the entry node (--node), which passes it to every
    /// node; they disconnect NAME within seconds and refuse it from then on.
    Revoke {
        /// The node's (or admin's) name.
        name: String,
        /// Where the CA is and the list goes.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Only write the list (hand it to a node later: its device file's `crl`, or run
        /// this again while one is reachable).
        #[arg(long)]
        offline: bool,
    },
}

/// Where `tern` enters the cluster: an address, and the node expected there if named.
#[derive(Clone)]
struct Entry {
    name: Option<NodeName>,
    addr: SocketAddr,
}

impl std::str::FromStr for Entry {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, addr) = match s.split_once('@') {
            Some((name, addr)) => {
                tern::certs::check_node_name(name).map_err(|e| e.to_string())?;
                (Some(NodeName::new(name)), addr)
            }
            None => (None, s),
        };
        let addr = addr
            .parse()
            .map_err(|e| format!("{addr:?} is not an address like 127.0.0.1:7101: {e}"))?;
        Ok(Entry { name, addr })
    }
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(n) => write!(f, "{n}@{}", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// Prints a line with [`printable`]: names, reasons and event details can come from other
/// devices, and must not drive the terminal.
macro_rules! out {
    ($($arg:tt)*) => {
        println!("{}", printable(&format!($($arg)*)))
    };
}

/// `text` with every control character but newlines and tabs, and every character that
/// reorders text on screen, written as an escape (`\u{1b}`).
fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let reorders = matches!(c, '\u{200e}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if (c.is_control() && c != '\n' && c != '\t') || reorders {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tern: {e:#}");
            if let Some(hint) = hint(&format!("{e:#}"), &args) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(2)
        }
    }
}

/// What to do about an error, when the message says what went wrong.
fn hint(error: &str, args: &Args) -> Option<String> {
    let e = error.to_lowercase();
    if e.contains("loading the admin certificate") {
        Some(format!(
            "issue one with `tern ca issue {} --dir {}`",
            args.admin,
            args.certs.display()
        ))
    } else if e.contains("no answer from") || e.contains("timed out") {
        Some(format!(
            "is a node running at {}? Start one with `tern-demo node --config FILE`, or pass \
             --node ADDR (or set TERN_NODE)",
            args.node
        ))
    } else if e.contains("is a node's") {
        Some(format!(
            "a node's certificate cannot drive the cluster: issue an admin certificate with \
             `tern ca issue admin --role admin --dir {}` and use it (`--as admin`, the default)",
            args.certs.display()
        ))
    } else if e.contains("expected node") {
        Some(format!(
            "another node answers at {}: check the address, or the name before the @",
            args.node.addr
        ))
    } else if e.contains("not an admin") {
        Some(format!(
            "the node lets in only the names in its admins list (none by default): add \
             {:?} to it",
            args.admin
        ))
    } else if e.contains("certificate") || e.contains("alert") {
        Some(format!(
            "the node and this admin certificate must come from the same cluster CA: run \
             `tern ca issue {} --role admin --dir {}` with that CA",
            args.admin,
            args.certs.display(),
        ))
    } else {
        None
    }
}

fn run(args: &Args) -> Result<bool> {
    if let Cmd::Completions { shell } = &args.command {
        let mut cmd = <Args as clap::CommandFactory>::command();
        clap_complete::generate(*shell, &mut cmd, "tern", &mut std::io::stdout());
        return Ok(true);
    }
    if let Cmd::Ca(CaCmd::Revoke { name, dir, offline }) = &args.command {
        return revoke(args, name, dir, *offline);
    }
    if let Cmd::Ca(ca) = &args.command {
        return ca_command(ca).map(|()| true);
    }
    if let Cmd::Pair {
        name,
        role,
        days,
        listen,
        minutes,
        dir,
    } = &args.command
    {
        let offer = tern::pairing::PairingOffer {
            name: name.clone(),
            role: *role,
            days: *days,
            ttl: std::time::Duration::from_secs(minutes.saturating_mul(60)),
        };
        return runtime()?.block_on(pair(offer, *listen, dir));
    }
    if let Cmd::Join {
        name,
        code,
        at,
        dir,
    } = &args.command
    {
        let id = runtime()?.block_on(tern::pairing::join(*at, name, code))?;
        id.write(dir)?;
        let (cert, key, _) = NodeIdentity::paths(dir, name);
        out!(
            "{} certificate for {name}: {} and {} (owner-only; the key was made here)",
            id.role()?,
            cert.display(),
            key.display()
        );
        return Ok(true);
    }
    if let Cmd::Doctor = &args.command {
        return runtime()?.block_on(doctor::doctor(args));
    }
    let identity = load_identity(&args.certs, &args.admin)?;
    let rt = runtime()?;
    rt.block_on(cluster_command(args, &identity))
}

fn ca_command(cmd: &CaCmd) -> Result<()> {
    match cmd {
        CaCmd::Revoke { .. } => unreachable!("handled with a connection, in `revoke`"),
        CaCmd::Init { dir } => {
            if dir.join("ca.key").exists() {
                bail!(
                    "{} already holds a CA key; remove it first or pick another --dir",
                    dir.display()
                );
            }
            ClusterCa::new()?.write(dir)?;
            out!(
                "cluster CA written to {} (ca.pem, ca.key owner-only)",
                dir.display()
            );
        }
        CaCmd::Issue {
            name,
            dir,
            days,
            role,
        } => {
            let ca = ClusterCa::load(dir).with_context(|| {
                format!(
                    "no CA in {} (run `tern ca init --dir {}` first)",
                    dir.display(),
                    dir.display()
                )
            })?;
            let id = ca.issue_role_for_days(name, *role, *days)?;
            id.write(dir)?;
            ClusterCa::record_issued(dir, &id.cert_der)?;
            let (cert, key, _) = NodeIdentity::paths(dir, name);
            out!(
                "{role} certificate for {name}: {} and {} (owner-only), valid for {days} days",
                cert.display(),
                key.display()
            );
        }
    }
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `tern pair`: shows the code, answers tries until a device pairs or the code is over.
/// True when a device paired.
async fn pair(offer: tern::pairing::PairingOffer, listen: SocketAddr, dir: &Path) -> Result<bool> {
    use tern::pairing::{PairOutcome, PairingServer};
    let ca = ClusterCa::load(dir)
        .with_context(|| format!("no CA in {} (pairing needs the CA's key)", dir.display()))?;
    let (name, role, minutes) = (offer.name.clone(), offer.role, offer.ttl.as_secs() / 60);
    let mut server = PairingServer::bind(listen, std::sync::Arc::new(ca), offer).await?;
    let code = server.code().to_string();
    out!("pairing {name} ({role}): code {code}, good for {minutes} minutes, one device");
    out!("listening on {}", server.local_addr());
    out!(
        "on the new device: tern join {name} --code {code} --at ADDRESS:{}",
        server.local_addr().port()
    );
    let _ = std::io::stdout().flush();
    loop {
        let left = server
            .deadline()
            .saturating_duration_since(std::time::Instant::now());
        let Ok(attempt) = tokio::time::timeout(left, server.answer_one()).await else {
            out!("the code expired; no device paired");
            return Ok(false);
        };
        let attempt = attempt?;
        out!("try from {attempt}");
        let _ = std::io::stdout().flush();
        match attempt.outcome {
            PairOutcome::Paired { .. } => {
                if let Some(cert) = server.issued() {
                    ClusterCa::record_issued(dir, cert)?;
                }
                out!(
                    "{name} paired; its certificate is noted in {}",
                    dir.display()
                );
                return Ok(true);
            }
            PairOutcome::Spent => return Ok(false),
            PairOutcome::WrongCode { tries_left: 0 } => {
                out!("too many wrong tries: the code is spent");
                return Ok(false);
            }
            _ => {}
        }
    }
}

/// `tern ca revoke`: writes the new list, then hands it to the entry node. False when the
/// list was written but no node took it.
fn revoke(args: &Args, name: &str, dir: &Path, offline: bool) -> Result<bool> {
    let ca = ClusterCa::load(dir)
        .with_context(|| format!("no CA in {} (revocation needs the CA's key)", dir.display()))?;
    let (crl, list) = ca.revoke_in(dir, name)?;
    let path = dir.join(tern::certs::CRL_FILE);
    out!(
        "revocation list #{} written to {}: {} certificates revoked ({name}'s among them)",
        list.number(),
        path.display(),
        list.len()
    );
    if offline {
        return Ok(true);
    }
    let identity = load_identity(&args.certs, &args.admin)?;
    let rt = runtime()?;
    let sent = rt.block_on(async {
        let entry = connect(args.node.addr, args.node.name.as_ref(), &identity).await?;
        let reply = entry.request(&AdminRequest::Revoke { crl }, |_| {}).await;
        let node = entry.node().clone();
        entry.close().await;
        Ok::<_, anyhow::Error>((node, reply?))
    });
    match sent {
        Ok((node, AdminReply::Revocations { number, newer, .. })) => {
            if newer {
                out!("{node} holds list #{number} now and passes it to every node");
            } else {
                out!("{node} already held list #{number} or a newer one");
            }
            Ok(true)
        }
        Ok((node, other)) => bail!("{node} answered the revocation with {other:?}"),
        Err(e) => {
            eprintln!(
                "{}",
                printable(&format!(
                    "tern: warning: the list is written, but no node took it: {e:#}\n\
                     hint: run `tern ca revoke {name}` again with --node pointing at a running \
                     node, or give the file to a device (`crl` in its device file)"
                ))
            );
            Ok(false)
        }
    }
}

fn load_identity(dir: &Path, name: &str) -> Result<NodeIdentity> {
    let (cert, key, ca) = NodeIdentity::paths(dir, name);
    NodeIdentity::load(&cert, &key, &ca).with_context(|| {
        format!(
            "loading the admin certificate {} (with {} and {})",
            cert.display(),
            key.display(),
            ca.display()
        )
    })
}

/// Sends `req` and waits for the reply, printing the node's progress lines on stderr
/// (rewritten in place on a terminal, one per line otherwise; none with `--json`).
async fn with_progress(
    client: &AdminClient,
    req: &AdminRequest,
    json: bool,
) -> Result<AdminReply, tern::Error> {
    let tty = std::io::stderr().is_terminal();
    let reply = client
        .request(req, |line| {
            if json {
                return;
            }
            let mut err = std::io::stderr();
            if tty {
                let _ = write!(err, "\r\x1b[2K{line}");
            } else {
                let _ = writeln!(err, "{line}");
            }
            let _ = err.flush();
        })
        .await;
    if tty && !json {
        eprint!("\r\x1b[2K");
    }
    reply
}

/// An admin connection to `addr`; with `expect`, only the node of that name may answer.
async fn connect(
    addr: SocketAddr,
    expect: Option<&NodeName>,
    identity: &NodeIdentity,
) -> Result<AdminClient> {
    match expect {
        Some(name) => AdminClient::connect_to(addr, identity, name)
            .await
            .with_context(|| format!("connecting to node {name} at {addr}")),
        None => AdminClient::connect(addr, identity)
            .await
            .with_context(|| format!("connecting to the node at {addr}")),
    }
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    std::println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn warn_unreachable(s: &Survey) {
    for (node, why) in &s.unreachable {
        eprintln!(
            "{}",
            printable(&format!(
                "tern: warning: node {node} did not answer ({why}); its services are not listed"
            ))
        );
    }
}

async fn cluster_command(args: &Args, identity: &NodeIdentity) -> Result<bool> {
    let entry = connect(args.node.addr, args.node.name.as_ref(), identity).await?;
    let outcome = match &args.command {
        Cmd::Ca(_)
        | Cmd::Pair { .. }
        | Cmd::Join { .. }
        | Cmd::Completions { .. }
        | Cmd::Doctor => {
            unreachable!("handled before connecting")
        }
        Cmd::Top { every_ms, once } => {
            let every = std::time::Duration::from_millis((*every_ms).max(100));
            watch::top(&entry, identity, every, *once, args.json).await?
        }
        Cmd::Events { follow, every_ms } => {
            let every = std::time::Duration::from_millis((*every_ms).max(50));
            watch::events(&entry, every, *follow, args.json).await?
        }
        Cmd::Metrics => watch::metrics(&entry).await?,
        Cmd::Ps => {
            let s = survey(&entry, identity).await?;
            warn_unreachable(&s);
            if args.json {
                print_json(&s.services)?;
            } else {
                out!(
                    "{:<12} {:<33} {:<8} {:>5} {:>9}  PARENT",
                    "KIND",
                    "ID",
                    "NODE",
                    "EPOCH",
                    "MAILBOX"
                );
                for e in &s.services {
                    let i = &e.info;
                    out!(
                        "{:<12} {:<33} {:<8} {:>5} {:>9}  {}",
                        i.addr.kind.to_string(),
                        i.addr.id.to_string(),
                        e.node,
                        i.epoch,
                        format!("{}/{}", i.mailbox_depth, i.mailbox_capacity),
                        i.parent
                            .map(|p| p.to_string())
                            .unwrap_or_else(|| "-".into())
                    );
                }
            }
            true
        }
        Cmd::Nodes => {
            let AdminReply::Nodes(nodes) = entry.request(&AdminRequest::Nodes, |_| {}).await?
            else {
                bail!("unexpected answer to nodes");
            };
            if args.json {
                print_json(&nodes)?;
            } else {
                out!(
                    "{:<8} {:<22} {:<6} {:>8} {:>7} {:>9} {:<10} CAPABILITIES",
                    "NODE",
                    "ADDRESS",
                    "STATUS",
                    "SERVICES",
                    "BACKLOG",
                    "MEMORY",
                    "POWER"
                );
                for m in &nodes {
                    let i = &m.info;
                    out!(
                        "{:<8} {:<22} {:<6} {:>8} {:>7} {:>8}M {:<10} {}{}",
                        i.name.to_string(),
                        i.addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
                        format!("{:?}", m.status).to_lowercase(),
                        i.load.services,
                        i.load.backlog,
                        i.load.memory_bytes >> 20,
                        i.power.to_string(),
                        i.capabilities.join(","),
                        if i.draining { "  (draining)" } else { "" }
                    );
                }
            }
            true
        }
        Cmd::Tree { service } => {
            let s = survey(&entry, identity).await?;
            let found = s.find(service)?;
            let client = client_for(&s, &found.node, &entry, identity).await?;
            let AdminReply::Tree(tree) = client
                .request(
                    &AdminRequest::Tree {
                        service: found.info.addr.id,
                    },
                    |_| {},
                )
                .await?
            else {
                bail!("unexpected answer to tree");
            };
            if args.json {
                print_json(&tree)?;
            } else {
                for m in &tree {
                    out!(
                        "{}{} {} on {}",
                        "  ".repeat(m.depth as usize),
                        m.addr.kind,
                        m.addr.id,
                        m.addr.node
                    );
                }
            }
            true
        }
        Cmd::Assoc { service } => {
            let s = survey(&entry, identity).await?;
            let found = s.find(service)?;
            let client = client_for(&s, &found.node, &entry, identity).await?;
            let AdminReply::Assoc(assoc) = client
                .request(
                    &AdminRequest::Assoc {
                        service: found.info.addr.id,
                    },
                    |_| {},
                )
                .await?
            else {
                bail!("unexpected answer to assoc");
            };
            if args.json {
                print_json(&assoc)?;
            } else {
                out!(
                    "{} {} on {}",
                    found.info.addr.kind,
                    found.info.addr.id,
                    found.node
                );
                out!(
                    "  {:<12} {:<33} {:<8} {:<5} {:>8} {:>8}  DECLARED",
                    "KIND",
                    "PEER",
                    "NODE",
                    "DIR",
                    "OUT/s",
                    "IN/s"
                );
                for a in &assoc {
                    out!(
                        "  {:<12} {:<33} {:<8} {:<5} {:>8.1} {:>8.1}  {}",
                        a.kind
                            .as_ref()
                            .map(|k| k.to_string())
                            .unwrap_or_else(|| "-".into()),
                        a.peer.to_string(),
                        a.node
                            .as_ref()
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| "?".into()),
                        a.direction(),
                        a.out_msgs_per_s,
                        a.in_msgs_per_s,
                        a.declared.join(", ")
                    );
                }
            }
            true
        }
        Cmd::Plan { service, to, tree } => {
            let s = survey(&entry, identity).await?;
            let found = s.find(service)?;
            let req = AdminRequest::Plan {
                service: found.info.addr.id,
                to: to.clone(),
                tree: *tree,
            };
            let AdminReply::Plan(plan) = entry.request(&req, |_| {}).await? else {
                bail!("unexpected answer to plan");
            };
            if args.json {
                print_json(&plan)?;
            } else {
                out!("policy: {}", plan.policy);
                for (verb, list) in [("move", &plan.moves), ("stay", &plan.stays)] {
                    for m in list {
                        out!(
                            "{verb:<5} {} {}: {} -> {} (score {:.2})",
                            m.kind,
                            m.service,
                            m.from,
                            m.to,
                            m.score
                        );
                        out!("      why: {}", m.reasons.join("; "));
                    }
                }
                for (id, why) in &plan.refused {
                    out!("refused {id}: {why}");
                }
            }
            plan.refused.is_empty()
        }
        Cmd::Migrate { service, to, tree } => {
            let s = survey(&entry, identity).await?;
            let found = s.find(service)?;
            if found.node == *to {
                // Nothing to move: the command asks for a state that already holds.
                if args.json {
                    print_json(&serde_json::json!({
                        "service": found.info.addr.id.to_string(),
                        "already_on": to,
                    }))?;
                } else {
                    out!(
                        "{} {} already runs on {to}: nothing to do",
                        found.info.addr.kind,
                        found.info.addr.id
                    );
                }
                entry.close().await;
                return Ok(true);
            }
            if !s.nodes.iter().any(|m| m.info.name.as_str() == to) {
                let known: Vec<String> = s.nodes.iter().map(|m| m.info.name.to_string()).collect();
                bail!("unknown node {to:?}: the cluster has {}", known.join(", "));
            }
            let client = client_for(&s, &found.node, &entry, identity).await?;
            if !args.json {
                eprintln!(
                    "moving {} {} from {} to {}{}",
                    found.info.addr.kind,
                    found.info.addr.id,
                    found.node,
                    to,
                    if *tree { " with its tree" } else { "" }
                );
            }
            let req = AdminRequest::Migrate {
                service: found.info.addr.id,
                to: to.clone(),
                tree: *tree,
            };
            let AdminReply::Migrated(report) = with_progress(&client, &req, args.json).await?
            else {
                bail!("unexpected answer to migrate");
            };
            if args.json {
                print_json(&report)?;
            } else {
                print_group(&report, &s);
            }
            report.committed
        }
        Cmd::Names => {
            let AdminReply::Names(names) = entry.request(&AdminRequest::Names, |_| {}).await?
            else {
                bail!("unexpected answer to names");
            };
            if args.json {
                print_json(&names)?;
            } else {
                for (name, id) in &names {
                    out!("{name:<24} {id}");
                }
            }
            true
        }
        Cmd::Release { service } => {
            let s = survey(&entry, identity).await?;
            let found = s.find(service)?;
            let client = client_for(&s, &found.node, &entry, identity).await?;
            let reply = client
                .request(
                    &AdminRequest::Release {
                        service: found.info.addr.id,
                    },
                    |_| {},
                )
                .await?;
            let AdminReply::Released { was_held } = reply else {
                bail!("unexpected answer to release");
            };
            if args.json {
                print_json(&serde_json::json!({
                    "service": found.info.addr.id,
                    "node": found.node,
                    "was_held": was_held,
                }))?;
            } else if was_held {
                out!(
                    "{} {} on {}: released to placement",
                    found.info.addr.kind,
                    found.info.addr.id,
                    found.node
                );
            } else {
                out!(
                    "{} {} on {}: was not held",
                    found.info.addr.kind,
                    found.info.addr.id,
                    found.node
                );
            }
            true
        }
        Cmd::Drain { target: node } => {
            let s = survey(&entry, identity).await?;
            let client = client_for(&s, node, &entry, identity).await?;
            let reply = with_progress(&client, &AdminRequest::Drain, args.json).await?;
            let AdminReply::Drained(report) = reply else {
                bail!("unexpected answer to drain");
            };
            if args.json {
                print_json(&report)?;
            } else {
                for r in &report.moved {
                    out!(
                        "moved  {} {} -> {}  freeze {} us  carried {}  forwarded {}  rebuilt {}",
                        kind_of(&s, r.service),
                        r.service,
                        r.to,
                        r.freeze_us,
                        r.carried,
                        r.forwarded,
                        r.rebuilt
                    );
                }
                for id in &report.pinned {
                    out!("pinned {} {id} stays", kind_of(&s, *id));
                }
                for (id, why) in &report.failed {
                    out!("FAILED {} {id}: {why}", kind_of(&s, *id));
                }
                out!(
                    "{node}: {} moved, {} pinned, {} failed",
                    report.moved.len(),
                    report.pinned.len(),
                    report.failed.len()
                );
            }
            report.failed.is_empty()
        }
    };
    entry.close().await;
    Ok(outcome)
}

/// An admin connection to node `name`: the entry's own, or a new one.
async fn client_for<'a>(
    s: &Survey,
    name: &str,
    entry: &'a AdminClient,
    identity: &NodeIdentity,
) -> Result<ClientRef<'a>> {
    if entry.node().as_str() == name {
        return Ok(ClientRef::Entry(entry));
    }
    let addr = s.addr_of(name).ok_or_else(|| {
        let known: Vec<String> = s.nodes.iter().map(|m| m.info.name.to_string()).collect();
        anyhow!(
            "unknown node {name:?}: {} knows {}",
            entry.node(),
            known.join(", ")
        )
    })?;
    let name = NodeName::new(name);
    Ok(ClientRef::Own(connect(addr, Some(&name), identity).await?))
}

/// A borrowed or owned admin connection.
enum ClientRef<'a> {
    Entry(&'a AdminClient),
    Own(AdminClient),
}

impl std::ops::Deref for ClientRef<'_> {
    type Target = AdminClient;
    fn deref(&self) -> &AdminClient {
        match self {
            ClientRef::Entry(c) => c,
            ClientRef::Own(c) => c,
        }
    }
}

fn kind_of(s: &Survey, id: tern::ServiceId) -> String {
    s.services
        .iter()
        .find(|e| e.info.addr.id == id)
        .map(|e| e.info.addr.kind.to_string())
        .unwrap_or_else(|| "service".into())
}

fn print_group(report: &GroupReport, s: &Survey) {
    for r in &report.members {
        match &r.aborted {
            None => out!(
                "moved {} {}: {} -> {}  epoch {}  freeze {} us  total {} us  snapshot {} bytes  carried {}  forwarded {}  rebuilt {}",
                kind_of(s, r.service),
                r.service,
                r.from,
                r.to,
                r.epoch,
                r.freeze_us,
                r.total_us,
                r.snapshot_bytes,
                r.carried,
                r.forwarded,
                r.rebuilt
            ),
            Some(why) => out!(
                "NOT moved {} {}: stays on {} ({why})",
                kind_of(s, r.service),
                r.service,
                r.from
            ),
        }
    }
    if report.members.len() > 1 {
        out!(
            "{} services {}; group freeze window {} us, total {} us",
            report.members.len(),
            if report.committed {
                "moved together"
            } else {
                "stayed (all or none)"
            },
            report.freeze_us,
            report.total_us
        );
    }
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn text_from_other_devices_cannot_drive_the_terminal() {
        assert_eq!(printable("tv: moved"), "tv: moved");
        assert_eq!(printable("a\x1b[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("x\r\u{7}y"), "x\\u{d}\\u{7}y");
        assert_eq!(printable("evil\u{202e}gpj.exe"), "evil\\u{202e}gpj.exe");
        assert_eq!(printable("two\nlines\tok"), "two\nlines\tok");
    }
}
