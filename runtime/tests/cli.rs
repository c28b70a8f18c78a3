//! The `tern` command line as a user runs it: the built binary, certificates it made itself,
//! and nodes started from those files. Each command's exit status, its `--json` output and
//! (for errors) its message and hint are checked against what the nodes themselves report.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tern::certs::{ClusterCa, NodeIdentity};
use tern::{Ctx, Node, NodeConfig, NodeHandle, Service};

/// Counts what it is told; enough state to see it move.
#[derive(Default, Serialize, Deserialize)]
struct Counter {
    total: u64,
}

impl Service for Counter {
    type Msg = u64;
    const KIND: &'static str = "counter";
    const VERSION: u32 = 1;

    async fn handle(&mut self, n: u64, _: &mut Ctx<Self>) {
        self.total += n;
    }
}

/// A fresh folder under the test's output folder.
fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

/// Runs `tern ARGS` with the certificates in `certs` and the entry node `node`.
fn tern(certs: &Path, node: SocketAddr, args: &[&str]) -> Output {
    tern_as(certs, "admin", &node.to_string(), args)
}

/// Runs `tern ARGS` as admin `who`, entering at `node` (`ADDR` or `NAME@ADDR`).
fn tern_as(certs: &Path, who: &str, node: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--certs", &certs.display().to_string()])
        .args(["--node", node, "--as", who])
        .args(args)
        .env_remove("TERN_NODE")
        .env_remove("TERN_CERTS")
        .output()
        .expect("the tern binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs a command that must succeed and returns its standard output as JSON.
fn json(certs: &Path, node: SocketAddr, args: &[&str]) -> Value {
    let out = tern(certs, node, args);
    assert!(
        out.status.success(),
        "tern {args:?} failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("tern {args:?} printed no JSON ({e}): {}", text(&out.stdout)))
}

/// Runs a command that must fail with status 2; returns its standard error.
fn fails(certs: &Path, node: SocketAddr, args: &[&str]) -> String {
    failed(tern(certs, node, args), args)
}

/// [`fails`], as admin `who`.
fn fails_as(certs: &Path, who: &str, node: SocketAddr, args: &[&str]) -> String {
    failed(tern_as(certs, who, &node.to_string(), args), args)
}

/// [`fails`], entering at `node` given as `NAME@ADDR`.
fn fails_at(certs: &Path, node: &str, args: &[&str]) -> String {
    failed(tern_as(certs, "admin", node, args), args)
}

/// `out` must be a failure with status 2; returns its standard error.
fn failed(out: Output, args: &[&str]) -> String {
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "tern {args:?} should fail: {}{err}",
        text(&out.stdout)
    );
    err
}

/// `tern ca` in `dir`; panics unless it succeeds.
fn ca(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("ca")
        .args(args)
        .args(["--dir", &dir.display().to_string()])
        .output()
        .expect("the tern binary runs");
    assert!(
        out.status.success(),
        "tern ca {args:?}: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn start(certs: &Path, name: &str) -> NodeHandle {
    let (cert, key, ca) = NodeIdentity::paths(certs, name);
    let identity = NodeIdentity::load(&cert, &key, &ca).expect("the certificate tern issued");
    let mut cfg = NodeConfig::new(identity, "127.0.0.1:0".parse().expect("an address"));
    // Admin access is closed by default: these nodes let in the admin certificate `admin`.
    cfg.admins = vec!["admin".into()];
    let node = Node::start(cfg).expect("a node");
    node.register::<Counter>();
    node
}

/// Where `tern ps --json` says the one counter runs.
fn counter_node(certs: &Path, entry: SocketAddr) -> String {
    let ps = json(certs, entry, &["--json", "ps"]);
    let counters: Vec<&Value> = ps
        .as_array()
        .expect("ps --json is a list")
        .iter()
        .filter(|e| e["info"]["addr"]["kind"]["name"] == "counter")
        .collect();
    assert_eq!(counters.len(), 1, "{ps}");
    counters[0]["node"]
        .as_str()
        .expect("a node name")
        .to_owned()
}

/// Membership comes by gossip: waits until the entry node lists every one of `names`.
fn joined(certs: &Path, entry: SocketAddr, names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let nodes = json(certs, entry, &["--json", "nodes"]);
        let listed: Vec<&str> = nodes
            .as_array()
            .expect("nodes --json is a list")
            .iter()
            .filter_map(|m| m["info"]["name"].as_str())
            .collect();
        if names.iter().all(|n| listed.contains(n)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not all of {names:?} joined: {nodes}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn tern_drives_a_cluster_made_from_its_own_certificates() {
    let certs = scratch("drive");
    assert!(ca(&certs, &["init"]).contains("cluster CA written"));
    for name in ["phone", "tv"] {
        assert!(ca(&certs, &["issue", name]).contains(&format!("node certificate for {name}")));
    }
    assert!(
        ca(&certs, &["issue", "admin", "--role", "admin"]).contains("admin certificate for admin")
    );
    // A second CA over the first would orphan every certificate: refused.
    let again = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["ca", "init", "--dir", &certs.display().to_string()])
        .output()
        .expect("the tern binary runs");
    assert_eq!(again.status.code(), Some(2));
    assert!(text(&again.stderr).contains("already holds a CA key"));

    let phone = start(&certs, "phone");
    let tv = start(&certs, "tv");
    phone.add_peer("tv", tv.local_addr()).expect("a peer");
    let counter = phone.spawn(Counter::default()).expect("a service");
    counter.tell(5).expect("a message");
    let entry = phone.local_addr();

    joined(&certs, entry, &["phone", "tv"]);

    // The table form names the columns and the service.
    let ps = tern(&certs, entry, &["ps"]);
    assert!(ps.status.success());
    let table = text(&ps.stdout);
    assert!(table.starts_with("KIND"), "{table}");
    assert!(
        table.contains("counter") && table.contains("phone"),
        "{table}"
    );
    assert_eq!(counter_node(&certs, entry), "phone");

    // A dry run names the tv and moves nothing.
    let plan = json(&certs, entry, &["--json", "plan", "counter", "--to", "tv"]);
    assert_eq!(plan["moves"][0]["to"], "tv", "{plan}");
    assert!(!plan["moves"][0]["reasons"]
        .as_array()
        .expect("reasons")
        .is_empty());
    assert_eq!(counter_node(&certs, entry), "phone");

    // The move, its report, and the node's own view afterwards.
    let report = json(
        &certs,
        entry,
        &["--json", "migrate", "counter", "--to", "tv"],
    );
    assert_eq!(report["committed"], true, "{report}");
    assert_eq!(report["members"][0]["to"], "tv", "{report}");
    assert!(tv.services().iter().any(|s| s.addr.id == counter.id()));
    assert_eq!(counter_node(&certs, entry), "tv");
    // Asked again, it has nothing to do and says so.
    let same = json(
        &certs,
        entry,
        &["--json", "migrate", "counter", "--to", "tv"],
    );
    assert_eq!(same["already_on"], "tv", "{same}");

    // The tree and the associations of a service on another node than the entry.
    let tree = json(&certs, entry, &["--json", "tree", "counter"]);
    assert_eq!(tree.as_array().map(Vec::len), Some(1), "{tree}");
    let assoc = tern(&certs, entry, &["assoc", "counter"]);
    assert!(assoc.status.success(), "{}", text(&assoc.stderr));
    assert!(text(&assoc.stdout).contains("on tv"));

    // Draining the tv sends the counter home, and the table says what moved.
    let drain = tern(&certs, entry, &["drain", "tv"]);
    assert!(drain.status.success(), "{}", text(&drain.stderr));
    let said = text(&drain.stdout);
    assert!(said.contains("tv: 1 moved, 0 pinned, 0 failed"), "{said}");
    assert_eq!(counter_node(&certs, entry), "phone");
    assert!(phone.services().iter().any(|s| s.addr.id == counter.id()));

    // Unknown names: a clear message, status 2, and the cluster untouched.
    let err = fails(&certs, entry, &["migrate", "nosuch", "--to", "tv"]);
    assert!(err.contains("nosuch"), "{err}");
    let err = fails(&certs, entry, &["migrate", "counter", "--to", "fridge"]);
    assert!(
        err.contains("unknown node \"fridge\"") && err.contains("phone"),
        "{err}"
    );
    assert_eq!(counter_node(&certs, entry), "phone");

    phone.shutdown();
    tv.shutdown();
}

#[test]
fn tern_errors_name_the_problem_and_what_to_do() {
    let certs = scratch("errors");
    ca(&certs, &["init"]);
    ca(&certs, &["issue", "phone"]);
    let phone = start(&certs, "phone");
    let entry = phone.local_addr();

    // No admin certificate yet: say which file and how to make it.
    let err = fails(&certs, entry, &["ps"]);
    assert!(err.contains("loading the admin certificate"), "{err}");
    assert!(
        err.contains("hint: issue one with `tern ca issue admin"),
        "{err}"
    );

    // A certificate from another cluster's CA: the node refuses it.
    let stranger = scratch("stranger");
    ClusterCa::new()
        .and_then(|ca| ca.write(&stranger).map(|()| ca))
        .and_then(|ca| ca.issue_role("admin", tern::certs::Role::Admin))
        .and_then(|id| id.write(&stranger))
        .expect("a second CA");
    let err = fails(&stranger, entry, &["ps"]);
    assert!(
        err.contains(
            "hint: the node and this admin certificate must come from the same cluster CA"
        ),
        "{err}"
    );

    // A node's certificate in the admin's place: it cannot drive the cluster.
    ca(&certs, &["issue", "admin"]);
    let err = fails(&certs, entry, &["ps"]);
    assert!(err.contains("is a node's"), "{err}");
    assert!(
        err.contains("hint: a node's certificate cannot drive the cluster"),
        "{err}"
    );

    // An admin certificate the node does not list: say how to let it in.
    ca(&certs, &["issue", "ops", "--role", "admin"]);
    let err = fails_as(&certs, "ops", entry, &["ps"]);
    assert!(
        err.contains("hint: the node lets in only the names in its admins list"),
        "{err}"
    );

    // An entry named for another node: the node answering there is refused.
    ca(&certs, &["issue", "admin", "--role", "admin"]);
    let err = fails_at(&certs, &format!("tv@{entry}"), &["ps"]);
    assert!(err.contains("expected node tv"), "{err}");
    assert!(err.contains("hint: another node answers at"), "{err}");

    // Nothing listening there: say so and how to point elsewhere.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").expect("a port");
    let nowhere = silent.local_addr().expect("its address");
    let err = fails(&certs, nowhere, &["ps"]);
    assert!(
        err.contains(&format!("is a node running at {nowhere}?")),
        "{err}"
    );
    drop(silent);

    // With the right certificate, the same node answers.
    assert!(json(&certs, entry, &["--json", "ps"]).is_array());
    phone.shutdown();
}

#[test]
fn certificates_are_issued_for_a_number_of_days() {
    let certs = scratch("days");
    ca(&certs, &["init"]);
    assert!(ca(&certs, &["issue", "watch", "--days", "30"]).contains("valid for 30 days"));
    assert!(ca(&certs, &["issue", "tv"]).contains("valid for 365 days"));
    let never = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["ca", "issue", "car", "--days", "0", "--dir"])
        .arg(&certs)
        .output()
        .expect("the tern binary runs");
    assert_eq!(never.status.code(), Some(2));
    assert!(
        text(&never.stderr).contains("1 to 3650 days"),
        "{}",
        text(&never.stderr)
    );
    let _ = std::fs::remove_dir_all(&certs);
}

/// Waits up to 20 s for `cond`.
/// Runs `f` to its end on an actix system of its own.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    actix_rt::System::new().block_on(f)
}

fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tern_ca_revoke_cuts_a_device_off_and_keeps_earlier_revocations() {
    let certs = scratch("revoke");
    ca(&certs, &["init"]);
    for name in ["phone", "tv", "watch"] {
        ca(&certs, &["issue", name]);
    }
    ca(&certs, &["issue", "admin", "--role", "admin"]);
    // The tv's first certificate, then a second one: revoking the name revokes both.
    let first_tv = {
        let (cert, key, ca_path) = NodeIdentity::paths(&certs, "tv");
        NodeIdentity::load(&cert, &key, &ca_path).expect("the tv's certificate")
    };
    ca(&certs, &["issue", "tv"]);
    let phone = start(&certs, "phone");
    let tv = start(&certs, "tv");
    let watch = start(&certs, "watch");
    for other in [&tv, &watch] {
        phone
            .add_peer(other.name().as_str(), other.local_addr())
            .expect("a peer");
    }
    eventually("the devices to connect", || {
        phone.is_connected("tv") && phone.is_connected("watch")
    });
    let entry = phone.local_addr();

    let out = tern(
        &certs,
        entry,
        &["ca", "revoke", "tv", "--dir", &certs.display().to_string()],
    );
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(said.contains("revocation list #1 written"), "{said}");
    assert!(said.contains("2 certificates revoked"), "{said}");
    assert!(said.contains("phone holds list #1 now"), "{said}");
    eventually("the phone to drop the tv", || !phone.is_connected("tv"));
    let held = phone.revocations().expect("a list");
    assert!(held.revokes(&first_tv.serial().expect("a serial")));
    assert!(held.revokes(&tv.identity().serial().expect("a serial")));

    // The next revocation keeps the first: list #2 revokes the tv's two and the watch's one.
    let out = tern(
        &certs,
        entry,
        &[
            "ca",
            "revoke",
            "watch",
            "--offline",
            "--dir",
            &certs.display().to_string(),
        ],
    );
    let said = text(&out.stdout);
    assert!(said.contains("revocation list #2 written"), "{said}");
    assert!(said.contains("3 certificates revoked"), "{said}");
    assert!(
        !said.contains("holds"),
        "--offline hands it to nobody: {said}"
    );
    assert!(phone.is_connected("watch"));
    let crl = tern::certs::load_crl(&certs.join(tern::certs::CRL_FILE)).expect("crl.pem");
    phone.install_revocations(&crl).expect("the CA's list");
    eventually("the phone to drop the watch", || {
        !phone.is_connected("watch")
    });

    // A name never issued: say so, write nothing.
    let out = tern(
        &certs,
        entry,
        &[
            "ca",
            "revoke",
            "fridge",
            "--dir",
            &certs.display().to_string(),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no certificate for fridge is on record"));
    for n in [phone, tv, watch] {
        n.shutdown();
    }
    let _ = std::fs::remove_dir_all(&certs);
}

#[test]
fn tern_pair_and_join_make_a_certificate_without_copying_keys() {
    use std::io::{BufRead, BufReader};
    let holder = scratch("pair-holder");
    let device = scratch("pair-device");
    ca(&holder, &["init"]);
    let mut pair = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["pair", "watch", "--listen", "127.0.0.1:0", "--dir"])
        .arg(&holder)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tern pair runs");
    let mut lines = BufReader::new(pair.stdout.take().expect("its output")).lines();
    let mut next = || {
        lines
            .next()
            .expect("a line from tern pair")
            .expect("readable output")
    };
    let offer = next();
    let code = offer
        .split("code ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .expect("the code")
        .to_owned();
    let at = next()
        .strip_prefix("listening on ")
        .expect("the address")
        .to_owned();
    assert!(next().contains(&format!("tern join watch --code {code}")));

    // A wrong code first: refused, logged by the holder, nothing written.
    let wrong: String = code
        .chars()
        .map(|c| {
            if c == 'A' {
                'B'
            } else if c == '-' {
                c
            } else {
                'A'
            }
        })
        .collect();
    let join = |code: &str| {
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["join", "watch", "--code", code, "--at", &at, "--dir"])
            .arg(&device)
            .output()
            .expect("tern join runs")
    };
    let refused = join(&wrong);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        text(&refused.stderr).contains("wrong code"),
        "{}",
        text(&refused.stderr)
    );
    assert!(next().contains("wrong code (2 wrong tries left)"));
    assert!(!device.join("watch.pem").exists());

    let joined = join(&code);
    assert!(joined.status.success(), "{}", text(&joined.stderr));
    assert!(text(&joined.stdout).contains("node certificate for watch"));
    assert!(next().contains("paired"));
    assert!(pair.wait().expect("tern pair ends").success());
    let (cert, key, ca_path) = NodeIdentity::paths(&device, "watch");
    let watch = NodeIdentity::load(&cert, &key, &ca_path).expect("the paired certificate");
    assert_eq!(watch.name().expect("a name").as_str(), "watch");
    // The holder noted it, so it can be revoked by name.
    let issued =
        std::fs::read_to_string(holder.join(tern::certs::ISSUED_FILE)).expect("issued.txt");
    assert!(issued.contains(" watch node"), "{issued}");
    // The holder's key stayed home; the device's key never left it.
    assert!(!holder.join("watch.key").exists());
    let _ = std::fs::remove_dir_all(&holder);
    let _ = std::fs::remove_dir_all(&device);
}

#[test]
fn tern_completions_prints_each_shells_script_without_a_cluster() {
    // No certificates and no node: completions need neither.
    let empty = scratch("completions");
    let nowhere = "127.0.0.1:9".parse().expect("an address");
    let commands = [
        "ca",
        "ps",
        "nodes",
        "tree",
        "assoc",
        "plan",
        "migrate",
        "names",
        "release",
        "drain",
        "top",
        "events",
        "metrics",
        "doctor",
        "pair",
        "join",
        "completions",
    ];
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = tern(&empty, nowhere, &["completions", shell]);
        assert!(
            out.status.success(),
            "tern completions {shell} failed: {}",
            text(&out.stderr)
        );
        let script = text(&out.stdout);
        for c in commands {
            assert!(script.contains(c), "{shell}'s script lacks `{c}`");
        }
        // Options of a subcommand are completed too (fish names them `-l tree`).
        assert!(
            script.contains("--tree") || script.contains("-l tree"),
            "{shell}'s script lacks `--tree`"
        );
    }
    let bash = text(&tern(&empty, nowhere, &["completions", "bash"]).stdout);
    assert!(bash.contains("complete -F _tern"), "{bash}");
    // An unknown shell is refused, with the ones there are.
    let out = tern(&empty, nowhere, &["completions", "tcsh"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("possible values") && err.contains("zsh"),
        "{err}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {}",
        text(&out.stdout)
    );
}

#[test]
fn tern_top_events_and_metrics_show_what_the_nodes_report() {
    use std::io::BufRead;
    let certs = scratch("watch");
    ca(&certs, &["init"]);
    for name in ["phone", "tv"] {
        ca(&certs, &["issue", name]);
    }
    ca(&certs, &["issue", "admin", "--role", "admin"]);
    let phone = start(&certs, "phone");
    let tv = start(&certs, "tv");
    phone.add_peer("tv", tv.local_addr()).expect("a peer");
    let entry = phone.local_addr();
    joined(&certs, entry, &["phone", "tv"]);
    let counter = phone.spawn(Counter::default()).expect("a service");
    let report = block_on(phone.migrate(counter.id(), "tv", tern::MigrateOptions::default()))
        .expect("the move");
    assert!(report.committed(), "{report:?}");

    // `top` over a span in which the counter is told all along: the tv handles, the phone
    // sends, the phone's one migration and its freeze.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let teller = {
        let (counter, stop) = (counter.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = counter.tell(1);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let top = json(&certs, entry, &["--json", "top", "--every-ms", "300"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    teller.join().expect("the teller");
    let line = |name: &str| {
        top["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["node"] == name)
            .unwrap_or_else(|| panic!("no line for {name}: {top}"))
            .clone()
    };
    let (p, t) = (line("phone"), line("tv"));
    assert_eq!(p["migrations"], 1, "{top}");
    let p50 = p["freeze_p50_us_at_most"].as_u64().expect("a freeze");
    assert!(
        report.freeze_us <= p50 && p50 < 2 * report.freeze_us.max(1),
        "{p50} bounds {} us",
        report.freeze_us
    );
    assert_eq!(t["migrations"], 0, "{top}");
    assert!(t["handled_per_s"].as_f64().expect("a rate") > 0.0, "{top}");
    assert!(p["out_per_s"].as_f64().expect("a rate") > 0.0, "{top}");
    assert_eq!(
        (t["services"].as_u64(), p["services"].as_u64()),
        (Some(1), Some(0))
    );
    let services = top["services"].as_array().expect("services");
    assert!(
        services
            .iter()
            .any(|s| s["id"] == counter.id().to_string() && s["node"] == "tv"),
        "{top}"
    );
    // The table form too.
    let table = text(&tern(&certs, entry, &["top", "--once", "--every-ms", "100"]).stdout);
    assert!(
        table.starts_with("NODE") && table.contains("tv") && table.contains("counter@1"),
        "{table}"
    );

    // `metrics` is what the phone's endpoint would serve.
    let metrics = text(&tern(&certs, entry, &["metrics"]).stdout);
    assert!(
        metrics.contains("tern_migrations_committed_total{node=\"phone\"} 1"),
        "{metrics}"
    );
    assert!(metrics.ends_with("# EOF\n"), "{metrics}");

    // `events` lists the move; `--follow` then prints the next one as it happens.
    let events = text(&tern(&certs, entry, &["events"]).stdout);
    assert!(
        events.contains(&format!("moved {} to tv", counter.id())),
        "{events}"
    );
    let mut follow = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--certs", &certs.display().to_string()])
        .args([
            "--node",
            &entry.to_string(),
            "events",
            "--follow",
            "--every-ms",
            "50",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tern events --follow");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().expect("its output");
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let wait_line = |what: &str| loop {
        match lines.recv_timeout(Duration::from_secs(20)) {
            Ok(l) if l.contains(what) => return l,
            Ok(_) => continue,
            Err(e) => panic!("no line with {what:?} from tern events --follow: {e}"),
        }
    };
    wait_line(&format!("moved {} to tv", counter.id()));
    // The counter comes back: the tv moves it, so the tv's log has it; the phone's gets a
    // second move when it goes out again.
    block_on(phone.migrate(counter.id(), "phone", tern::MigrateOptions::default()))
        .expect("the move back");
    block_on(phone.migrate(counter.id(), "tv", tern::MigrateOptions::default()))
        .expect("the move out again");
    let again = wait_line(&format!("moved {} to tv (epoch 3)", counter.id()));
    assert!(again.contains("migration"), "{again}");
    let _ = follow.kill();
    let _ = follow.wait();
    reader.join().expect("the reader");

    // `--follow` prints as it goes, `--json` one object: both at once is refused.
    let err = fails(&certs, entry, &["--json", "events", "--follow"]);
    assert!(err.contains("--follow"), "{err}");
    // Traffic still flows after all this watching.
    let handled = tv.stats().processed;
    counter.tell(2).expect("a message");
    eventually("the tv handles it", || tv.stats().processed > handled);
    phone.shutdown();
    tv.shutdown();
}

#[test]
fn tern_doctor_checks_certificates_nodes_and_links_with_hints() {
    let certs = scratch("doctor");
    ca(&certs, &["init"]);
    for name in ["phone", "tv"] {
        ca(&certs, &["issue", name]);
    }
    ca(&certs, &["issue", "admin", "--role", "admin"]);
    // An admin certificate ten days from its end, whose name the nodes do not list.
    ca(&certs, &["issue", "ops", "--role", "admin", "--days", "10"]);
    let phone = start(&certs, "phone");
    let tv = start(&certs, "tv");
    phone.add_peer("tv", tv.local_addr()).expect("a peer");
    let entry = phone.local_addr();
    joined(&certs, entry, &["phone", "tv"]);

    // All well: every check passes, in one JSON object.
    let report = json(&certs, entry, &["--json", "doctor"]);
    assert_eq!(report["failures"], 0, "{report}");
    let checks = report["checks"].as_array().expect("checks");
    for subject in ["phone", "tv", "phone clock", "tv clock", "tv certificate"] {
        let check = checks
            .iter()
            .find(|c| c["subject"] == subject)
            .unwrap_or_else(|| panic!("no check of {subject}: {report}"));
        assert_eq!(check["status"], "ok", "{check}");
    }
    // The text form, one line per check and a summary.
    let out = tern(&certs, entry, &["doctor"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("ok    tv: answered in"), "{said}");
    assert!(said.contains("0 failed"), "{said}");

    // As ops: its certificate ends soon (a warning), and the nodes do not let it in (a
    // failure), each with what to do.
    let out = tern_as(&certs, "ops", &entry.to_string(), &["doctor"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let said = text(&out.stdout);
    assert!(
        said.contains("WARN") && said.contains("certificate valid for 9 more days"),
        "{said}"
    );
    assert!(said.contains("hint: renew it"), "{said}");
    assert!(said.contains("FAIL  entry"), "{said}");
    assert!(said.contains("admins list"), "{said}");

    // The tv leaves: its check fails, and so does the phone's link to it.
    tv.shutdown();
    eventually("the phone to see the tv gone", || {
        phone
            .members()
            .iter()
            .any(|m| m.info.name.as_str() == "tv" && m.status != tern::MemberStatus::Up)
    });
    let out = tern(&certs, entry, &["doctor"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let said = text(&out.stdout);
    assert!(said.contains("FAIL  tv: left"), "{said}");
    assert!(said.contains("WARN  phone -> tv: not connected"), "{said}");
    // No cluster at all: the entry fails with where to look.
    let nowhere: SocketAddr = "127.0.0.1:9".parse().expect("an address");
    let out = tern(&certs, nowhere, &["doctor"]);
    assert_eq!(out.status.code(), Some(1));
    let said = text(&out.stdout);
    assert!(said.contains("FAIL  entry 127.0.0.1:9"), "{said}");
    assert!(said.contains("hint:"), "{said}");
    phone.shutdown();
}
