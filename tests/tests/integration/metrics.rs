//! The metrics endpoint, scraped over HTTP as Prometheus would: the figures match what the
//! node's own calls say, a migration shows in the freeze histogram, bad requests get a clear
//! answer and the endpoint (and the node) keep serving.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;

use anyhow::{bail, Context as _, Result};
use tern_harness::{block_on, wait_for};

use crate::common::{connected, Slow, SlowMsg, SECS_10};

/// Sends `request` to the endpoint and returns the status line and the body.
fn http(at: SocketAddr, request: &[u8]) -> Result<(String, String)> {
    let mut s = std::net::TcpStream::connect(at)?;
    s.set_read_timeout(Some(SECS_10))?;
    s.write_all(request)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of head in {answer:?}"))?;
    let status = head.lines().next().unwrap_or_default().to_owned();
    Ok((status, body.to_owned()))
}

/// One scrape, as `series -> value`, where a series is the name with its labels as written.
fn scrape(at: SocketAddr) -> Result<BTreeMap<String, f64>> {
    let (status, body) = http(at, b"GET /metrics HTTP/1.1\r\nhost: test\r\n\r\n")?;
    if status != "HTTP/1.1 200 OK" {
        bail!("scrape answered {status}: {body}");
    }
    if !body.ends_with("# EOF\n") {
        bail!("an OpenMetrics exposition ends with # EOF: {body}");
    }
    let mut out = BTreeMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("a sample line without a value: {line:?}"))?;
        let value: f64 = value
            .parse()
            .with_context(|| format!("a sample that is not a number: {line:?}"))?;
        out.insert(series.to_owned(), value);
    }
    Ok(out)
}

fn get(m: &BTreeMap<String, f64>, series: &str) -> Result<f64> {
    m.get(series).copied().with_context(|| {
        let near: Vec<_> = m.keys().filter(|k| k.starts_with(&series[..8])).collect();
        format!("no series {series}; similar: {near:?}")
    })
}

#[test]
fn a_scrape_shows_the_nodes_figures_and_a_migrations_freeze() -> Result<()> {
    let c = connected(&["a", "b"])?;
    let (a, b) = (c.node("a"), c.node("b"));
    let at = a.serve_metrics("127.0.0.1:0".parse()?)?;
    let slow = a.spawn(Slow::default())?;
    // A second service, held, with five messages waiting behind the hold.
    let held = a.spawn(Slow::default())?;
    let report = block_on(async {
        for i in 1..=100 {
            slow.tell(SlowMsg::Item(i))?;
        }
        held.tell(SlowMsg::Hold { ms: 600_000 })?;
        for i in 1..=5 {
            held.tell(SlowMsg::Item(i))?;
        }
        let report = a
            .migrate(slow.id(), "b", tern::MigrateOptions::default())
            .await?;
        anyhow::Ok(report)
    })?;
    assert!(report.committed(), "{report:?}");
    wait_for(SECS_10, "the held service's five waiting", || {
        a.services()
            .iter()
            .any(|s| s.addr.id == held.id() && s.mailbox_depth == 5)
    })?;

    let before = a.stats();
    let m = scrape(at)?;
    let after = a.stats();
    // Counters are the node's own, under their own names.
    let sent_local = get(&m, "tern_sent_local_total{node=\"a\"}")?;
    assert!(
        before.sent_local as f64 <= sent_local && sent_local <= after.sent_local as f64,
        "{sent_local} is what stats() says"
    );
    assert!(sent_local >= 106.0, "every tell was counted");
    assert_eq!(get(&m, "tern_services_live{node=\"a\"}")?, 1.0);
    assert_eq!(get(&m, "tern_peers_connected{node=\"a\"}")?, 1.0);
    // The migration: one committed, its freeze in the histogram, in seconds.
    assert_eq!(get(&m, "tern_migrations_committed_total{node=\"a\"}")?, 1.0);
    assert_eq!(
        get(&m, "tern_migration_freeze_seconds_count{node=\"a\"}")?,
        1.0
    );
    let sum = get(&m, "tern_migration_freeze_seconds_sum{node=\"a\"}")?;
    assert!(
        (sum - report.freeze_us as f64 / 1e6).abs() < 1e-9,
        "the sum is the one freeze: {sum} s against {} us",
        report.freeze_us
    );
    assert_eq!(
        get(
            &m,
            "tern_migration_freeze_seconds_bucket{node=\"a\",le=\"+Inf\"}"
        )?,
        1.0
    );
    let bound = report.freeze_us.next_power_of_two();
    let le = format!(
        "tern_migration_freeze_seconds_bucket{{node=\"a\",le=\"{}\"}}",
        bound as f64 / 1e6
    );
    assert_eq!(get(&m, &le)?, 1.0, "the freeze is at most {bound} us");
    // The held service's mailbox, and the link to b.
    let depth = format!(
        "tern_service_mailbox_depth{{node=\"a\",service=\"{}\",kind=\"test-slow@1\"}}",
        held.id()
    );
    assert_eq!(get(&m, &depth)?, 5.0);
    assert_eq!(get(&m, "tern_peer_connected{node=\"a\",peer=\"b\"}")?, 1.0);
    assert!(get(&m, "tern_peer_rtt_seconds{node=\"a\",peer=\"b\"}")? > 0.0);
    assert!(get(&m, "tern_peer_sent_bytes_total{node=\"a\",peer=\"b\"}")? > 0.0);

    // Traffic still flows to the moved service, and the next scrape sees it.
    block_on(async {
        for i in 101..=200 {
            slow.tell_wait(SlowMsg::Item(i)).await?;
        }
        let handled = slow.ask(SlowMsg::Items, SECS_10).await?;
        assert_eq!(handled, (1..=200).collect::<Vec<_>>());
        anyhow::Ok(())
    })?;
    let later = scrape(at)?;
    assert!(
        get(&later, "tern_sent_remote_total{node=\"a\"}")? >= 100.0,
        "tells to the moved service went to b"
    );
    assert_eq!(
        get(&later, "tern_migrations_arrived_total{node=\"a\"}")?,
        0.0
    );
    assert_eq!(b.migration_stats().arrived, 1);
    c.shutdown();
    Ok(())
}

#[test]
fn bad_requests_get_a_clear_answer_and_the_endpoint_serves_on() -> Result<()> {
    let c = connected(&["a"])?;
    let a = c.node("a");
    let at = a.serve_metrics("127.0.0.1:0".parse()?)?;
    let (status, _) = http(at, b"POST /metrics HTTP/1.1\r\n\r\n")?;
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    let (status, _) = http(at, b"GET /admin HTTP/1.1\r\n\r\n")?;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _) = http(at, b"\x16\x03\x01 not http at all\r\n\r\n")?;
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    // A head that never ends is cut off at the bound, not read forever.
    let mut long = b"GET /metrics HTTP/1.1\r\nx: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 64 << 10));
    let (status, body) = http(at, &long)?;
    assert_eq!(
        status, "HTTP/1.1 431 Request Header Fields Too Large",
        "{body}"
    );
    // A second endpoint on a taken address is refused with the reason.
    let taken = a.serve_metrics(at).expect_err("the address is taken");
    assert!(taken.to_string().contains("metrics"), "{taken}");
    // The endpoint and the node carry on.
    let m = scrape(at)?;
    assert_eq!(get(&m, "tern_services_live{node=\"a\"}")?, 0.0);
    let slow = a.spawn(Slow::default())?;
    block_on(async {
        slow.tell(SlowMsg::Item(7))?;
        assert_eq!(slow.ask(SlowMsg::Items, SECS_10).await?, vec![7]);
        anyhow::Ok(())
    })?;
    // The scrape catches up with the handler's count (bumped once the handler returns).
    wait_for(SECS_10, "two messages processed, as scraped", || {
        scrape(at).is_ok_and(|m| get(&m, "tern_processed_total{node=\"a\"}").ok() == Some(2.0))
    })?;
    c.shutdown();
    Ok(())
}
