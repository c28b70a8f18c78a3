//! The dashboard in a real headless Chromium, driven over WebDriver (chromedriver): the page
//! shows the devices and services, a click moves the player's tree, the box moves, a drain
//! button empties a device, and the counters stay at zero. A screenshot is saved under the
//! test's output folder (`target/tmp/browser/dashboard.png`).
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Without them the
//! test says so and passes, unless `TERN_REQUIRE_BROWSER` is set, as `.ci/run` sets it: there
//! it fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use tern_demo::app::{MediaApp, Pace};
use tern_demo::dashboard::{self, Dashboard};
use tern_demo::scenario;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One HTTP/1.1 exchange with chromedriver (JSON in, JSON out).
fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver may keep the connection open: read the header, then the body it announces.
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 << 10];
    let payload = loop {
        let n = s.read(&mut buf)?;
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, rest)) = text.split_once("\r\n\r\n") {
            let lower = head.to_ascii_lowercase();
            let length = lower
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            match length {
                Some(len) if rest.len() >= len => break rest[..len].to_owned(),
                None if lower.contains("transfer-encoding: chunked")
                    && rest.ends_with("0\r\n\r\n") =>
                {
                    break dechunk(rest)?
                }
                None if n == 0 => break rest.to_owned(),
                _ => {}
            }
        }
        if n == 0 {
            bail!("{method} {path}: the connection closed early: {text:?}");
        }
    };
    let v: Value =
        serde_json::from_str(&payload).with_context(|| format!("{method} {path}: {payload}"))?;
    if let Some(err) = v["value"].get("error") {
        bail!("{method} {path}: {err}: {}", v["value"]["message"]);
    }
    Ok(v["value"].clone())
}

fn dechunk(mut rest: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, tail) = rest
            .split_once("\r\n")
            .ok_or_else(|| anyhow!("bad chunk"))?;
        let n = usize::from_str_radix(size.trim(), 16)?;
        if n == 0 {
            return Ok(out);
        }
        out.push_str(tail.get(..n).ok_or_else(|| anyhow!("short chunk"))?);
        rest = tail.get(n + 2..).unwrap_or("");
    }
}

/// Standard base64, as WebDriver sends screenshots.
fn base64(text: &str) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => bail!("not base64: {c}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    profile: PathBuf,
}

impl Browser {
    fn start(profile: PathBuf) -> Result<Browser> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
            profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while http(addr, "GET", "/status", None).map_or(true, |v| v["ready"] != true) {
            if Instant::now() > deadline {
                bail!("chromedriver did not get ready");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,820",
        ];
        let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", b.profile.display()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args}
        }}});
        let v = http(addr, "POST", "/session", Some(&caps))?;
        b.session = v["sessionId"]
            .as_str()
            .ok_or_else(|| anyhow!("no session id in {v}"))?
            .to_owned();
        Ok(b)
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        http(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
    }

    fn script(&self, js: &str) -> Result<Value> {
        self.call(
            "POST",
            "/execute/sync",
            Some(&json!({"script": js, "args": []})),
        )
    }

    fn click(&self, css: &str) -> Result<()> {
        let found = self.call(
            "POST",
            "/element",
            Some(&json!({"using": "css selector", "value": css})),
        )?;
        let id = found[ELEMENT]
            .as_str()
            .ok_or_else(|| anyhow!("{css}: {found}"))?;
        self.call("POST", &format!("/element/{id}/click"), Some(&json!({})))?;
        Ok(())
    }

    /// Waits until `js` (a function body returning a value) returns true.
    fn wait(&self, what: &str, js: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.script(js)? == Value::Bool(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let page = self.script("return document.body.innerText")?;
                bail!("timed out waiting for {what}; the page shows:\n{page}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&self, to: &Path) -> Result<()> {
        let png = self.call("GET", "/screenshot", None)?;
        let bytes = base64(png.as_str().ok_or_else(|| anyhow!("no screenshot"))?)?;
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::write(to, bytes)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", "", None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A counter's value on the page.
fn counter_is_zero(name: &str) -> String {
    format!("(document.querySelector('#c-{name}') || {{dataset: {{}}}}).dataset.value === '0'")
}

/// Waits until service `name`'s box sits in `node`'s column, then checks that the node itself
/// runs it.
fn lands(
    browser: &Browser,
    cluster: &tern_harness::Cluster,
    name: &str,
    service: &tern::ServiceAddr,
    node: &str,
) -> Result<()> {
    browser.wait(
        &format!("the {name} on the {node}"),
        &format!(
            "const b = document.querySelector('#svc-{name}'); \
             return b.dataset.node === '{node}' && document.querySelector('#dev-{node}').contains(b)"
        ),
    )?;
    assert!(
        cluster
            .node(node)
            .services()
            .iter()
            .any(|s| s.addr.id == service.id),
        "the page shows the {name} on the {node}, the node does not run it"
    );
    Ok(())
}

#[test]
fn dashboard_in_a_real_browser_migrates_and_stays_clean() -> Result<()> {
    if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
        if std::env::var_os("TERN_REQUIRE_BROWSER").is_some() {
            bail!("{CHROMEDRIVER} or {CHROMIUM} is missing (apt-get install chromium chromium-driver)");
        }
        eprintln!("browser test not run: install chromium and chromium-driver to run it");
        return Ok(());
    }
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&out)?;

    let cluster = scenario::devices().start()?;
    cluster.wait_connected(Duration::from_secs(10))?;
    scenario::wait_for_members(&cluster, Duration::from_secs(10))?;
    let phone = cluster.node("phone");
    let app = MediaApp::spawn(phone, Pace::default())?;
    app.play(phone, Pace::default())?;
    // The dashboard enters at the car and reads the other devices over admin connections, as
    // it does in one process per device.
    let dash = Dashboard::new(
        cluster.node("car").clone(),
        Some(
            cluster
                .ca
                .issue_role(scenario::DASHBOARD, tern::certs::Role::Admin)?,
        ),
        Some(app.clone()),
    );
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(dashboard::serve(
            dash,
            "127.0.0.1:0".parse().expect("an address"),
            move |_, url| {
                let _ = addr_tx.send(url.to_owned());
            },
            async move {
                let _ = stop_rx.await;
            },
        ))
    });
    let url = addr_rx.recv_timeout(Duration::from_secs(10))?;

    let browser = Browser::start(out.join(format!("profile-{}", std::process::id())))?;
    browser.call("POST", "/url", Some(&json!({ "url": url })))?;
    // Four device columns, five service boxes, everything on the phone.
    browser.wait(
        "the devices and services",
        "return document.querySelectorAll('.device').length === 4 \
         && document.querySelectorAll('.svc').length === 5 \
         && [...document.querySelectorAll('.svc')].every(b => b.dataset.node === 'phone')",
    )?;
    browser.wait(
        "channel lines",
        "return document.querySelectorAll('#wires path').length >= 4",
    )?;

    // Pick the player, then "move here" on the tv: its tree goes, the boxes move.
    browser.click("#svc-player")?;
    browser.click("#to-tv")?;
    lands(&browser, &cluster, "player", &app.player, "tv")?;
    lands(&browser, &cluster, "lyrics", &app.lyrics, "tv")?;
    // The charts: one freeze bar per move (the player and its child), whose freezes add up
    // to what the phone's metrics count, and a line per busy channel.
    browser.wait(
        "two freeze bars",
        "return document.querySelectorAll('#freezes rect').length === 2",
    )?;
    let bars = browser
        .script(
            "return [...document.querySelectorAll('#freezes rect')] \
             .reduce((sum, r) => sum + Number(r.dataset.freezeUs), 0)",
        )?
        .as_u64()
        .unwrap_or(0);
    assert!(bars > 0);
    assert_eq!(bars, cluster.node("phone").migration_stats().freeze_us_sum);
    browser.wait(
        "rate lines for the busy channels",
        "return [...document.querySelectorAll('#rates polyline')] \
         .filter(l => Number(l.dataset.last) > 0).length >= 3 \
         && document.querySelectorAll('#rates-legend span').length >= 3",
    )?;
    // The remote's channel to the player is remote now (dashed); the child link local.
    browser.wait(
        "remote channel lines",
        "return document.querySelectorAll('#wires path.remote').length >= 1",
    )?;

    // Drag the remote onto the watch. ChromeDriver's pointer actions do not start HTML5 drags,
    // so the gesture is replayed as the DragEvents Chromium would fire, sharing one
    // DataTransfer: the page's own dragstart and drop handlers pick the service and migrate it.
    browser.script(
        "const dt = new DataTransfer(); \
         const fire = (el, type) => el.dispatchEvent( \
             new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: dt})); \
         const from = document.querySelector('#svc-remote'); \
         const to = document.querySelector('#dev-watch'); \
         fire(from, 'dragstart'); fire(to, 'dragenter'); fire(to, 'dragover'); \
         fire(to, 'drop'); fire(from, 'dragend'); return true;",
    )?;
    lands(&browser, &cluster, "remote", &app.remote, "watch")?;

    // Drain the phone from its button: what is left leaves it.
    browser.click("#drain-phone")?;
    browser.wait(
        "the phone to be empty",
        "return [...document.querySelectorAll('.svc')].every(b => b.dataset.node !== 'phone') \
         && document.querySelector('#dev-phone').classList.contains('draining')",
    )?;

    // Counters read after the moves show traffic and nothing wrong.
    let received_now: u64 = browser
        .script("return Number(document.querySelector('#c-received').dataset.value)")?
        .as_u64()
        .unwrap_or(0);
    browser.wait(
        "the counters to move on",
        &format!(
            "return Number(document.querySelector('#c-received').dataset.value) > {received_now}"
        ),
    )?;
    let zero = ["lost", "duplicated", "reordered", "unanswered"]
        .map(counter_is_zero)
        .join(" && ");
    browser.wait("counters at zero", &format!("return {zero}"))?;
    assert_eq!(
        browser.script("return document.querySelector('#verdict').textContent")?,
        json!("nothing lost")
    );
    // Let the last animation and the next snapshot land before the picture.
    std::thread::sleep(Duration::from_millis(1_500));
    let shot = out.join("dashboard.png");
    browser.screenshot(&shot)?;
    eprintln!("screenshot: {}", shot.display());
    drop(browser);

    let _ = stop_tx.send(());
    server
        .join()
        .map_err(|_| anyhow!("the dashboard thread panicked"))??;
    // The final word: nothing lost, duplicated or reordered over the whole run.
    let audit = tern_harness::block_on(app.finish(cluster.node("car"), Duration::from_secs(10)))?;
    assert!(audit.is_clean(), "{audit:?}");
    cluster.shutdown();
    Ok(())
}

/// The status of one raw HTTP/1.1 request to `addr` with `headers` (the Host header included).
fn status_of(
    addr: SocketAddr,
    request_line: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<u16> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = format!("{request_line} HTTP/1.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!(
        "Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    s.write_all(req.as_bytes())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    let line = String::from_utf8_lossy(&head).into_owned();
    line.get(9..12)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status in {line:?}"))
}

#[test]
fn the_dashboard_answers_only_its_token_through_its_own_address() -> Result<()> {
    let cluster = crate::common::connected(&["a", "b"])?;
    let dash = Dashboard::new(cluster.node("a").clone(), None, None);
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(dashboard::serve(
            dash,
            "127.0.0.1:0".parse().expect("an address"),
            move |addr, url| {
                let _ = url_tx.send((addr, url.to_owned()));
            },
            async move {
                let _ = stop_rx.await;
            },
        ))
    });
    let (addr, url) = url_rx.recv_timeout(Duration::from_secs(10))?;
    let token = url
        .split_once("token=")
        .map(|(_, t)| t.to_owned())
        .context("a token")?;
    let host = addr.to_string();
    let own = [("Host", host.as_str())];
    let with_token = format!("/api/state?token={token}");
    // The URL it printed works; the same without the token, or with another, does not.
    assert_eq!(
        status_of(addr, &format!("GET {with_token}"), &own, "")?,
        200
    );
    assert_eq!(status_of(addr, "GET /", &own, "")?, 401);
    assert_eq!(status_of(addr, "GET /events?token=0000", &own, "")?, 401);
    assert_eq!(
        status_of(
            addr,
            "GET /api/state",
            &[("Host", &host), ("X-Tern-Token", &token)],
            ""
        )?,
        200
    );
    // A page on another site that points its own DNS name at this address (DNS rebinding)
    // sends its own name as the Host: refused, token or not.
    let rebound = format!("evil.example:{}", addr.port());
    assert_eq!(
        status_of(
            addr,
            &format!("GET {with_token}"),
            &[("Host", &rebound)],
            ""
        )?,
        403
    );
    // A page on another site posting to the dashboard carries its own Origin: refused.
    let move_it = r#"{"service":"0000000000000001-0000000000000001","to":"b"}"#;
    assert_eq!(
        status_of(
            addr,
            &format!("POST /api/migrate?token={token}"),
            &[("Host", &host), ("Origin", "http://evil.example")],
            move_it
        )?,
        403
    );
    // From its own page it is heard (the service is unknown: a conflict, not a refusal).
    let origin = format!("http://{host}");
    assert_eq!(
        status_of(
            addr,
            &format!("POST /api/migrate?token={token}"),
            &[("Host", &host), ("Origin", &origin)],
            move_it
        )?,
        409
    );
    let _ = stop_tx.send(());
    server
        .join()
        .map_err(|_| anyhow!("the dashboard's thread panicked"))??;
    cluster.shutdown();
    Ok(())
}
