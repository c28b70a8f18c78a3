//! Tern demo v1: three devices (phone, tv, car) in one process, on loopback over QUIC with
//! mutual TLS, running services that talk across them. Prints what happened and a verdict;
//! exits non-zero if anything was lost, duplicated or reordered.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tern::ServiceRef;
use tern_actors::{KvMsg, KvStore, SeqSender, SeqSenderMsg, SeqSink, SinkMsg};
use tern_harness::{block_on, Cluster};

const TELLS_PER_SENDER: u64 = 20_000;
const ASKS_PER_SENDER: u64 = 500;
const TIMEOUT: Duration = Duration::from_secs(30);

fn main() -> Result<()> {
    let started = Instant::now();
    println!("Tern demo: three devices on loopback, QUIC with mutual TLS, one fresh cluster CA\n");
    let cluster = Cluster::builder()
        .node("phone", &["display", "speaker", "input", "battery"])
        .node("tv", &["display", "speaker"])
        .node("car", &["display", "speaker", "input"])
        .setup(tern_actors::register_all)
        .start()?;
    for n in cluster.nodes() {
        println!(
            "  {:<6} listening on {}  capabilities: {}",
            n.name(),
            n.local_addr(),
            n.capabilities().join(", ")
        );
    }
    cluster.wait_connected(Duration::from_secs(10))?;
    println!(
        "  full mesh of connections up after {} ms\n",
        started.elapsed().as_millis()
    );

    let (phone, tv, car) = (
        cluster.node("phone"),
        cluster.node("tv"),
        cluster.node("car"),
    );
    // The tv plays: a sink that checks every command arrives once and in order.
    let player = tv.spawn(SeqSink::default())?;
    // The car keeps the listener's profile.
    let profile = car.spawn(KvStore::default())?;
    // The phone's remote and the car's dashboard send commands to the player.
    let remote = phone.spawn(SeqSender::new("phone-remote"))?;
    let dash = car.spawn(SeqSender::new("car-dashboard"))?;
    phone.book_insert(remote.addr(), "sink", player.addr())?;
    car.book_insert(dash.addr(), "sink", player.addr())?;
    println!("Services");
    for (what, addr) in [
        ("player (sequence-checking sink)", player.addr()),
        ("profile (key-value store)", profile.addr()),
        ("remote (sender)", remote.addr()),
        ("dashboard (sender)", dash.addr()),
    ] {
        println!("  {:<34} {} on {}", what, addr.id, addr.node);
    }

    let outcome = block_on(async {
        let t0 = Instant::now();
        for s in [&remote, &dash] {
            s.tell(SeqSenderMsg::Tell {
                count: TELLS_PER_SENDER,
            })?;
            s.tell(SeqSenderMsg::Ask {
                count: ASKS_PER_SENDER,
                timeout_ms: TIMEOUT.as_millis() as u64,
            })?;
        }
        // Meanwhile the phone writes and reads the profile on the car.
        let profile_from_phone: ServiceRef<KvStore> = phone.resolve(profile.addr())?;
        let mut rtts = Vec::new();
        for i in 0..200u32 {
            let t = Instant::now();
            let key = format!("track-{}", i % 20);
            profile_from_phone
                .ask(
                    |r| KvMsg::Put {
                        key,
                        value: i.to_be_bytes().to_vec(),
                        reply: Some(r),
                    },
                    TIMEOUT,
                )
                .await?
                .map_err(|e| anyhow::anyhow!("profile refused a put: {e:?}"))?;
            rtts.push(t.elapsed().as_micros() as u64);
        }
        let keys = profile_from_phone.ask(KvMsg::Len, TIMEOUT).await?;
        let mut sent = BTreeMap::new();
        for (s, name) in [(&remote, "phone-remote"), (&dash, "car-dashboard")] {
            let (n, failed) = s.ask(SeqSenderMsg::Progress, TIMEOUT).await?;
            if failed != 0 {
                bail!("{name} saw {failed} failed sends");
            }
            sent.insert(name.to_string(), n);
        }
        let elapsed = t0.elapsed();
        let report = player.ask(SinkMsg::Report, TIMEOUT).await?;
        rtts.sort_unstable();
        Ok((sent, report, elapsed, keys, rtts))
    });
    let (sent, report, elapsed, keys, rtts) = outcome?;

    let total: u64 = sent.values().sum();
    println!("\nTraffic");
    for (name, n) in &sent {
        println!(
            "  {name:<14} -> player on tv: {n} commands ({TELLS_PER_SENDER} tells, {ASKS_PER_SENDER} asks answered)"
        );
    }
    println!(
        "  {total} commands in {} ms ({:.0} per second)",
        elapsed.as_millis(),
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  phone -> profile on car: 200 puts answered, {keys} keys; ask round trip p50 {} us, max {} us",
        rtts[rtts.len() / 2],
        rtts[rtts.len() - 1]
    );

    println!("\nAssociations of the player, as the car sees them");
    for (holder, role) in car.associations(player.id()).held_by {
        println!("  {:?} holds it as {role:?}", holder);
    }

    println!("\nNodes");
    for n in cluster.nodes() {
        let s = n.stats();
        println!(
            "  {:<6} services {}  sent local {}  sent remote {}  received remote {}  processed {}  refused {}  protocol errors {}",
            n.name(),
            s.services_live,
            s.sent_local,
            s.sent_remote,
            s.received_remote,
            s.processed,
            s.refused_to_senders + s.refused_from_peers + s.refused_by_peers,
            s.protocol_errors
        );
    }

    let verdict = report.verdict(&sent);
    println!(
        "\nVerdict: {} received, {} lost, {} duplicated, {} reordered -> {}",
        verdict.received,
        verdict.lost,
        verdict.duplicated,
        verdict.reordered,
        if verdict.is_clean() { "OK" } else { "FAILED" }
    );
    cluster.shutdown();
    if !verdict.is_clean() || verdict.received != total {
        bail!("the player did not get every command exactly once and in order");
    }
    Ok(())
}
