//! The admin connection the `tern` command line uses, against devices started from TOML
//! files as `tern-demo node` starts them: every request, and every way one can be refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Result;
use tern::admin::{survey, AdminClient, AdminReply, AdminRequest};
use tern::certs::{ClusterCa, NodeIdentity, Role};
use tern::NodeHandle;
use tern_demo::app::{MediaApp, Pace};
use tern_demo::device::{self, DeviceConfig};
use tern_harness::{block_on, wait_for, wait_until};

use crate::common::{Slow, SlowMsg, SECS_10};

/// A fresh folder under the system's temporary folder.
fn scratch(what: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "tern-{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Writes a device file the way a user would and loads it.
fn device_file(
    dir: &Path,
    name: &str,
    caps: &[&str],
    peers: &[(&str, std::net::SocketAddr)],
    extra: &str,
) -> Result<DeviceConfig> {
    let mut text = format!(
        "name = \"{name}\"\nlisten = \"127.0.0.1:0\"\ncapabilities = [{}]\n\
         ca = \"{d}/ca.pem\"\ncert = \"{d}/{name}.pem\"\nkey = \"{d}/{name}.key\"\n{extra}\n",
        caps.iter()
            .map(|c| format!("\"{c}\""))
            .collect::<Vec<_>>()
            .join(", "),
        d = dir.display()
    );
    for (peer, addr) in peers {
        text.push_str(&format!(
            "\n[[peers]]\nname = \"{peer}\"\naddr = \"{addr}\"\n"
        ));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text)?;
    DeviceConfig::load(&path)
}

struct Devices {
    dir: PathBuf,
    phone: NodeHandle,
    tv: NodeHandle,
    app: MediaApp,
    admin: NodeIdentity,
}

/// A phone running Tern Media and a tv, each from its own device file, and an admin
/// certificate, all from one CA written to disk as `tern ca` writes them.
fn devices(phone_extra: &str) -> Result<Devices> {
    let dir = scratch("admin")?;
    let ca = ClusterCa::new()?;
    ca.write(&dir)?;
    for name in ["phone", "tv"] {
        ca.issue(name)?.write(&dir)?;
    }
    ca.issue_role("admin", Role::Admin)?.write(&dir)?;
    // Admin access is closed by default; the devices let `admin` in unless told otherwise.
    let admins = if phone_extra.contains("admins") {
        ""
    } else {
        "admins = [\"admin\"]"
    };
    let extra = format!("start_app = true\nbattery_percent = 70\n{admins}\n{phone_extra}");
    let phone_cfg = device_file(&dir, "phone", &["display", "speaker", "input"], &[], &extra)?;
    let (phone, app) = device::start(&phone_cfg, Pace::default())?;
    let tv_cfg = device_file(
        &dir,
        "tv",
        &["display", "speaker"],
        &[("phone", phone.local_addr())],
        "admins = [\"admin\"]",
    )?;
    let (tv, none) = device::start(&tv_cfg, Pace::default())?;
    assert!(none.is_none());
    wait_for(SECS_10, "phone and tv to know each other", || {
        phone.members().len() == 2 && tv.members().len() == 2
    })?;
    let (cert, key, ca_path) = NodeIdentity::paths(&dir, "admin");
    let admin = NodeIdentity::load(&cert, &key, &ca_path)?;
    Ok(Devices {
        dir,
        phone,
        tv,
        app: app.expect("the phone starts the app"),
        admin,
    })
}

impl Devices {
    fn stop(self) {
        self.phone.shutdown();
        self.tv.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn admin_requests_drive_devices_started_from_files() -> Result<()> {
    let d = devices("")?;
    let app = d.app.clone();
    block_on(async {
        let client = AdminClient::connect(d.phone.local_addr(), &d.admin).await?;
        assert_eq!(client.node().as_str(), "phone");

        // ps across the cluster, through the phone: the app's five services on the phone.
        let s = survey(&client, &d.admin).await?;
        assert!(s.unreachable.is_empty(), "{:?}", s.unreachable);
        assert_eq!(s.nodes.len(), 2);
        assert_eq!(s.services.len(), 5);
        let player = s.find("player")?;
        assert_eq!((player.node.as_str(), player.info.epoch), ("phone", 0));
        assert_eq!(
            s.find(&app.player.id.to_string())?.info.addr.id,
            app.player.id
        );
        assert_eq!(s.find("lyrics@1")?.info.addr.id, app.lyrics.id);
        let prefix = &app.player.id.to_string()[..20];
        let ambiguous = s.find(prefix).unwrap_err().to_string();
        assert!(ambiguous.contains("names 5 services"), "{ambiguous}");
        let unknown = s.find("jukebox").unwrap_err().to_string();
        assert!(unknown.contains("unknown service \"jukebox\""), "{unknown}");

        // tree and plan: the lyrics hang under the player; the tv could take both.
        let AdminReply::Tree(tree) = client
            .request(
                &AdminRequest::Tree {
                    service: app.player.id,
                },
                |_| {},
            )
            .await?
        else {
            panic!("tree")
        };
        assert_eq!(tree.len(), 2);
        assert_eq!(tree[1].addr.id, app.lyrics.id);
        let plan_req = AdminRequest::Plan {
            service: app.player.id,
            to: Some("tv".into()),
            tree: true,
        };
        let AdminReply::Plan(plan) = client.request(&plan_req, |_| {}).await? else {
            panic!("plan")
        };
        assert_eq!(plan.moves.len(), 2, "{plan:?}");
        assert!(plan
            .moves
            .iter()
            .all(|m| m.to.as_str() == "tv" && !m.reasons.is_empty()));

        // migrate --tree: both move, with a report; ps on the tv then shows epoch 1.
        let mut lines = Vec::new();
        let req = AdminRequest::Migrate {
            service: app.player.id,
            to: "tv".into(),
            tree: true,
        };
        let AdminReply::Migrated(report) =
            client.request(&req, |l| lines.push(l.to_owned())).await?
        else {
            panic!("migrate")
        };
        assert!(report.committed, "{report:?}");
        assert_eq!(report.members.len(), 2);
        let tv = AdminClient::connect(d.tv.local_addr(), &d.admin).await?;
        let AdminReply::Ps { node, services } = tv.request(&AdminRequest::Ps, |_| {}).await? else {
            panic!("ps")
        };
        assert_eq!(node, "tv");
        let on_tv: Vec<_> = services.iter().map(|s| (s.addr.id, s.epoch)).collect();
        assert!(on_tv.contains(&(app.player.id, 1)) && on_tv.contains(&(app.lyrics.id, 1)));

        // assoc, asked of the tv: the remote holds the player, and talks to it.
        wait_for(SECS_10, "traffic to be observed", || {
            d.tv.associated(app.player.id)
                .iter()
                .any(|a| a.peer == app.remote.id && a.observed)
        })?;
        let AdminReply::Assoc(assoc) = tv
            .request(
                &AdminRequest::Assoc {
                    service: app.player.id,
                },
                |_| {},
            )
            .await?
        else {
            panic!("assoc")
        };
        let remote = assoc
            .iter()
            .find(|a| a.peer == app.remote.id)
            .expect("remote");
        assert!(
            remote.declared.iter().any(|d| d == "held as player"),
            "{remote:?}"
        );

        // drain the phone: what is left goes to the tv, with progress while it works.
        let AdminReply::Drained(drained) = client
            .request(&AdminRequest::Drain, |l| lines.push(l.to_owned()))
            .await?
        else {
            panic!("drain")
        };
        // The remote needs an input, which the tv lacks: it cannot leave.
        assert_eq!(drained.moved.len(), 2, "{drained:?}");
        assert_eq!(drained.failed.len(), 1, "{drained:?}");
        assert_eq!(drained.failed[0].0, app.remote.id);
        // The nodes table says the phone is draining.
        let AdminReply::Nodes(nodes) = tv.request(&AdminRequest::Nodes, |_| {}).await? else {
            panic!("nodes")
        };
        wait_for(SECS_10, "the tv to hear the phone drains", || {
            d.tv.members()
                .iter()
                .any(|m| m.info.name.as_str() == "phone" && m.info.draining)
        })?;
        assert_eq!(nodes.len(), 2);

        // A move to a node nobody knows is reported as not done, and why; a bad id is an
        // error. The connection keeps working after both.
        let AdminReply::Migrated(to_fridge) = client
            .request(
                &AdminRequest::Migrate {
                    service: app.player.id,
                    to: "fridge".into(),
                    tree: false,
                },
                |_| {},
            )
            .await?
        else {
            panic!("migrate")
        };
        assert!(!to_fridge.committed);
        assert_eq!(
            to_fridge.members[0].aborted,
            Some(tern::AbortReason::UnknownNode)
        );
        let no_such = client
            .request(
                &AdminRequest::Tree {
                    service: tern::ServiceId::from_parts(1, 1),
                },
                |_| {},
            )
            .await;
        assert!(no_such.is_err(), "{no_such:?}");
        assert!(matches!(
            client.request(&AdminRequest::Ps, |_| {}).await?,
            AdminReply::Ps { .. }
        ));
        client.close().await;
        tv.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    d.stop();
    Ok(())
}

/// Dials until the node admits the connection (a closed one is counted off when its task
/// notices).
async fn wait_until_admitted(addr: std::net::SocketAddr, id: &NodeIdentity) -> Result<AdminClient> {
    let deadline = std::time::Instant::now() + SECS_10;
    loop {
        let c = AdminClient::connect(addr, id).await?;
        match c.request(&AdminRequest::Nodes, |_| {}).await {
            Ok(_) => return Ok(c),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "not admitted yet");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

#[test]
fn admin_connections_refuse_strangers_and_bad_requests() -> Result<()> {
    let d = devices("admins = [\"ops\"]")?;
    let phone_addr = d.phone.local_addr();
    let tv_addr = d.tv.local_addr();
    block_on(async {
        // A certificate from another CA: the node refuses it at the handshake.
        let other = ClusterCa::new()?;
        let stranger = NodeIdentity {
            ca_der: d.admin.ca_der.clone(),
            ..other.issue_role("admin", Role::Admin)?
        };
        let refused = match AdminClient::connect(tv_addr, &stranger).await {
            Ok(c) => c.request(&AdminRequest::Ps, |_| {}).await.map(|_| ()),
            Err(e) => Err(e),
        };
        let why = refused.expect_err("a stranger gets in").to_string();
        assert!(
            why.to_lowercase().contains("certificate") || why.contains("alert"),
            "{why}"
        );

        // The cluster's own admin certificate, but the phone only lets "ops" in.
        let not_listed = match AdminClient::connect(phone_addr, &d.admin).await {
            Ok(c) => c.request(&AdminRequest::Ps, |_| {}).await.map(|_| ()),
            Err(e) => Err(e),
        };
        let why = not_listed
            .expect_err("admin is not on the phone's list")
            .to_string();
        assert!(
            why.contains("not an admin") || why.contains("closed"),
            "{why}"
        );

        // Malformed and oversize requests on a raw admin stream: a clear error back, and the
        // node answers the next request on the same connection.
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(tern::tls::admin_client_config(&d.admin, None)?);
        let conn = endpoint.connect(tv_addr, "tern-node")?.await?;
        for (bytes, expect) in [
            (vec![0, 0, 0, 3, 0xc1, 0xc1, 0xc1], "malformed"),
            ((1u32 << 30).to_be_bytes().to_vec(), "bound"),
            (vec![0, 0, 0, 2, 0x81, 0xa3], "malformed"),
        ] {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&bytes).await?;
            send.finish()?;
            let answer = recv.read_to_end(1 << 20).await?;
            assert!(answer.len() > 4);
            let reply: AdminReply = rmp_serde::from_slice(&answer[4..])?;
            match reply {
                AdminReply::Error(e) => assert!(e.contains(expect), "{e}"),
                other => panic!("{other:?}"),
            }
        }
        let client = AdminClient::connect(tv_addr, &d.admin).await?;
        assert!(matches!(
            client.request(&AdminRequest::Nodes, |_| {}).await?,
            AdminReply::Nodes(_)
        ));

        // Admin connections are bounded: with the bound open (the raw one and `client` among
        // them), the next is closed with the reason; once one closes, a new one gets in.
        let mut open = Vec::new();
        for _ in 0..tern::admin::ADMIN_CONNECTIONS_MAX - 2 {
            let c = AdminClient::connect(tv_addr, &d.admin).await?;
            c.request(&AdminRequest::Nodes, |_| {}).await?;
            open.push(c);
        }
        let one_too_many = match AdminClient::connect(tv_addr, &d.admin).await {
            Ok(c) => c.request(&AdminRequest::Nodes, |_| {}).await.map(|_| ()),
            Err(e) => Err(e),
        };
        let why = one_too_many.expect_err("past the bound").to_string();
        assert!(why.contains("too many admin connections"), "{why}");
        if let Some(c) = open.pop() {
            c.close().await;
        }
        let again = wait_until_admitted(tv_addr, &d.admin).await?;
        again.close().await;
        // Dropping a client closes its connection without waiting for the close to drain.
        drop(open);
        client.close().await;
        conn.close(0u32.into(), b"done");
        Ok::<_, anyhow::Error>(())
    })?;
    // Both refusals are in the nodes' logs; the nodes kept running.
    wait_for(Duration::from_secs(5), "the refusals to be logged", || {
        d.tv.events().iter().any(|e| e.kind == "connection-refused")
            && d.phone
                .events()
                .iter()
                .any(|e| e.kind == "connection-refused" && e.detail.contains("admins"))
    })?;
    assert!(d.tv.is_connected("phone"));
    d.stop();
    Ok(())
}

/// A long migration reports progress while it works: the service is busy with a 900 ms
/// message, and its freeze waits for the message in hand, so the node sends progress lines
/// before the report.
#[test]
fn a_long_migration_reports_progress_then_the_report() -> Result<()> {
    let d = devices("")?;
    for node in [&d.phone, &d.tv] {
        node.register::<Slow>();
    }
    let busy = d.phone.spawn(Slow::default())?;
    busy.tell(SlowMsg::Hold { ms: 900 })?;
    busy.tell(SlowMsg::Item(7))?;
    let id = busy.id();
    block_on(async {
        let client = AdminClient::connect(d.phone.local_addr(), &d.admin).await?;
        let mut lines = Vec::new();
        let req = AdminRequest::Migrate {
            service: id,
            to: "tv".into(),
            tree: false,
        };
        let AdminReply::Migrated(report) =
            client.request(&req, |l| lines.push(l.to_owned())).await?
        else {
            panic!("migrate")
        };
        assert!(report.committed, "{report:?}");
        assert!(lines.len() >= 2, "{lines:?}");
        assert!(
            lines[0].starts_with(&format!("moving {id} to tv: ")),
            "{lines:?}"
        );
        client.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    // The item queued behind the busy message moved with it and was handled once, on the tv.
    let on_tv: tern::ServiceRef<Slow> = d.tv.resolve(busy.addr())?;
    let items = block_on(on_tv.ask(SlowMsg::Items, SECS_10))?;
    assert_eq!(items, vec![7]);
    d.stop();
    Ok(())
}

/// A device file that is malformed, has an unknown key, an impossible battery, missing
/// certificates, or another device's certificate is refused with an error that names the
/// problem; nothing starts.
#[test]
fn bad_device_files_get_clear_errors() -> Result<()> {
    let dir = scratch("devfile")?;
    let ca = ClusterCa::new()?;
    ca.write(&dir)?;
    ca.issue("tv")?.write(&dir)?;
    let d = dir.display();
    let base = format!(
        "listen = \"127.0.0.1:0\"\nca = \"{d}/ca.pem\"\ncert = \"{d}/tv.pem\"\nkey = \"{d}/tv.key\"\n"
    );
    let cases = [
        ("malformed", "name = \"tv\n".to_owned(), "malformed.toml"),
        (
            "unknown key",
            format!("name = \"tv\"\n{base}speakers = 2\n"),
            "speakers",
        ),
        (
            "battery",
            format!("name = \"tv\"\n{base}battery_percent = 140\n"),
            "over 100",
        ),
        (
            "no address",
            format!("name = \"tv\"\n{}", base.replace("127.0.0.1:0", "tv")),
            "listen",
        ),
    ];
    for (what, text, expect) in cases {
        let path = dir.join(format!("{}.toml", what.replace(' ', "-")));
        std::fs::write(&path, text)?;
        let err = format!("{:#}", DeviceConfig::load(&path).expect_err(what));
        assert!(err.contains(expect), "{what}: {err}");
    }
    // Loads, but the certificate is missing, or names another device.
    std::fs::write(dir.join("radio.toml"), format!("name = \"radio\"\n{base}"))?;
    let radio = DeviceConfig::load(&dir.join("radio.toml"))?;
    let err = format!("{:#}", radio.node_config().expect_err("tv's certificate"));
    assert!(err.contains("is tv's certificate, not radio's"), "{err}");
    let missing = base
        .replace("tv.pem", "car.pem")
        .replace("tv.key", "car.key");
    std::fs::write(dir.join("car.toml"), format!("name = \"car\"\n{missing}"))?;
    let car = DeviceConfig::load(&dir.join("car.toml"))?;
    let err = format!("{:#}", car.node_config().expect_err("no certificate"));
    assert!(err.contains("tern ca issue car"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The error from dialing `addr` raw (ALPN and certificate of the caller's choice), or from
/// the first stream on it: the node closes a connection its role does not allow.
async fn raw_refusal(cfg: quinn::ClientConfig, addr: std::net::SocketAddr, sni: &str) -> String {
    let mut endpoint = match quinn::Endpoint::client("127.0.0.1:0".parse().expect("an address")) {
        Ok(e) => e,
        Err(e) => return format!("no endpoint: {e}"),
    };
    endpoint.set_default_client_config(cfg);
    let conn = match endpoint.connect(addr, sni) {
        Ok(c) => match c.await {
            Ok(c) => c,
            Err(e) => return e.to_string(),
        },
        Err(e) => return e.to_string(),
    };
    // The node closes the connection once it reads the certificate's role.
    let why = conn.closed().await.to_string();
    endpoint.wait_idle().await;
    why
}

/// A certificate's role decides which connections it opens: a node's never an admin
/// connection, an admin's never a node's, an observer's only reads; admin access is closed
/// unless a node lists the name; and a client that names the node it means refuses any other.
/// Each refusal is logged, and the devices keep working.
#[test]
fn roles_decide_what_a_certificate_may_open() -> Result<()> {
    let d = devices("admins = [\"admin\", \"wall\"]")?;
    let ca = ClusterCa::load(&d.dir)?;
    let (cert, key, ca_path) = NodeIdentity::paths(&d.dir, "tv");
    let tv_node = NodeIdentity::load(&cert, &key, &ca_path)?;
    let wall = ca.issue_role("wall", Role::Observer)?;
    let ops = ca.issue_role("ops", Role::Admin)?;
    let (phone_addr, tv_addr) = (d.phone.local_addr(), d.tv.local_addr());
    let services_before = d.phone.services().len();

    // An admin's certificate cannot start a node.
    let err = match tern::Node::start(tern::NodeConfig::new(ops.clone(), "127.0.0.1:0".parse()?)) {
        Ok(_) => panic!("an admin certificate ran a node"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("a node needs a node certificate"), "{err}");

    block_on(async {
        // A device's stolen certificate cannot drive the cluster: the client says so before
        // dialing, and a client that does not check is closed by the node.
        let err = match AdminClient::connect(phone_addr, &tv_node).await {
            Ok(_) => panic!("a node certificate opened an admin connection"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("is a node's"), "{err}");
        let why = raw_refusal(
            tern::tls::admin_client_config(&tv_node, None)?,
            phone_addr,
            "phone",
        )
        .await;
        assert!(why.contains("cannot open an admin connection"), "{why}");

        // An admin's certificate cannot join as a node and host services.
        let why = raw_refusal(tern::tls::client_config(&ops)?, phone_addr, "phone").await;
        assert!(why.contains("cannot open a node connection"), "{why}");

        // An observer reads, and is refused anything that moves.
        let observer = AdminClient::connect_to(phone_addr, &wall, d.phone.name()).await?;
        assert!(matches!(
            observer.request(&AdminRequest::Ps, |_| {}).await?,
            AdminReply::Ps { .. }
        ));
        for req in [
            AdminRequest::Migrate {
                service: d.app.player.id,
                to: "tv".into(),
                tree: true,
            },
            AdminRequest::Drain,
        ] {
            match observer.request(&req, |_| {}).await {
                Err(e) => assert!(e.to_string().contains("an observer may only read"), "{e}"),
                Ok(other) => panic!("an observer's {req:?} was answered {other:?}"),
            }
        }
        observer.close().await;

        // Names a node does not list stay out: the tv lists only `admin`, and a node that
        // lists nobody (the default) lets nobody in.
        for (addr, who) in [(tv_addr, &wall), (tv_addr, &ops), (phone_addr, &ops)] {
            let refused = match AdminClient::connect(addr, who).await {
                Ok(c) => c.request(&AdminRequest::Ps, |_| {}).await.map(|_| ()),
                Err(e) => Err(e),
            };
            let why = refused.expect_err("an unlisted admin got in").to_string();
            assert!(why.contains("not an admin"), "{why}");
        }
        let closed = tern::Node::start(tern::NodeConfig::new(
            ca.issue("fridge")?,
            "127.0.0.1:0".parse()?,
        ))?;
        let refused = match AdminClient::connect(closed.local_addr(), &d.admin).await {
            Ok(c) => c.request(&AdminRequest::Ps, |_| {}).await.map(|_| ()),
            Err(e) => Err(e),
        };
        closed.shutdown();
        let why = refused
            .expect_err("a node with no admins let one in")
            .to_string();
        assert!(why.contains("not an admin"), "{why}");

        // A client that names the node it means refuses another answering at that address.
        let err = match AdminClient::connect_to(phone_addr, &d.admin, d.tv.name()).await {
            Ok(_) => panic!("the phone passed for the tv"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("expected node tv"), "{err}");

        // The listed admin still drives the phone.
        let admin = AdminClient::connect_to(phone_addr, &d.admin, d.phone.name()).await?;
        assert!(matches!(
            admin.request(&AdminRequest::Nodes, |_| {}).await?,
            AdminReply::Nodes(_)
        ));
        admin.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    wait_for(SECS_10, "the refusals to be logged", || {
        let events = d.phone.events();
        let logged = |what: &str| events.iter().any(|e| e.detail.contains(what));
        logged("a certificate of role node cannot open an admin connection")
            && logged("a certificate of role admin cannot open a node connection")
            && logged("an observer may only read")
    })?;
    // Nothing moved, and the app's traffic kept flowing: every stream checks out.
    assert_eq!(d.phone.services().len(), services_before);
    assert!(d.phone.is_connected("tv"));
    let audit = block_on(d.app.finish(&d.phone, SECS_10))?;
    assert!(audit.total().is_clean(), "{audit:?}");
    d.stop();
    Ok(())
}

#[test]
fn the_node_runner_runs_an_apps_own_kinds_and_tern_drives_them() -> Result<()> {
    let dir = scratch("runner")?;
    let ca = ClusterCa::new()?;
    ca.write(&dir)?;
    for name in ["desk", "tablet"] {
        ca.issue(name)?.write(&dir)?;
    }
    ca.issue_role("admin", Role::Admin)?.write(&dir)?;
    // The app's own kind, in node files a user writes, run by the library's runner.
    let register = |n: &NodeHandle| {
        n.register::<Slow>();
    };
    let desk = device_file(&dir, "desk", &["display"], &[], "admins = [\"admin\"]")?
        .node
        .start(register)?;
    let tablet_file = device_file(
        &dir,
        "tablet",
        &["display"],
        &[("desk", desk.local_addr())],
        "admins = [\"admin\"]",
    )?;
    let tablet = tablet_file.node.start(register)?;
    wait_for(SECS_10, "desk and tablet to know each other", || {
        desk.members().len() == 2 && tablet.members().len() == 2
    })?;
    let notes = desk.spawn(Slow::default())?;
    let (cert, key, ca_path) = NodeIdentity::paths(&dir, "admin");
    let admin = NodeIdentity::load(&cert, &key, &ca_path)?;
    block_on(async {
        notes.tell_wait(SlowMsg::Item(1)).await?;
        // What `tern migrate ID --to tablet` sends.
        let client = AdminClient::connect(desk.local_addr(), &admin).await?;
        let req = AdminRequest::Migrate {
            service: notes.id(),
            to: "tablet".into(),
            tree: false,
        };
        let AdminReply::Migrated(report) = client.request(&req, |_| {}).await? else {
            panic!("migrate")
        };
        assert!(report.committed, "{report:?}");
        client.close().await;
        notes.tell_wait(SlowMsg::Item(2)).await?;
        assert_eq!(notes.ask(SlowMsg::Items, SECS_10).await?, vec![1, 2]);
        // `tern release` on the node it runs on: the move held it there; once released, no
        // longer.
        let on_tablet = AdminClient::connect(tablet.local_addr(), &admin).await?;
        let release = AdminRequest::Release {
            service: notes.id(),
        };
        let first = on_tablet.request(&release, |_| {}).await?;
        assert_eq!(first, AdminReply::Released { was_held: true });
        let again = on_tablet.request(&release, |_| {}).await?;
        assert_eq!(again, AdminReply::Released { was_held: false });
        // `tern names` at the desk lists a name registered on the tablet.
        tablet.register_name("notes", notes.id())?;
        let client = AdminClient::connect(desk.local_addr(), &admin).await?;
        wait_until(SECS_10, "the desk to list the tablet's name", || async {
            matches!(
                client.request(&AdminRequest::Names, |_| {}).await,
                Ok(AdminReply::Names(names)) if names == vec![("notes".to_string(), notes.id())]
            )
        })
        .await?;
        client.close().await;
        on_tablet.close().await;
        Ok::<_, anyhow::Error>(())
    })?;
    assert_eq!(
        tablet.location(notes.id()),
        Some(tern::NodeName::new("tablet"))
    );
    // `run` refuses keys it does not know (an app with settings reads them itself).
    let path = dir.join("tablet.toml");
    std::fs::write(
        &path,
        "start_ap = true\n".to_owned() + &std::fs::read_to_string(&path)?,
    )?;
    let err = tern::runner::run(&path, register).expect_err("a misspelt key");
    assert!(err.to_string().contains("unknown keys start_ap"), "{err}");
    desk.shutdown();
    tablet.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
