//! `tern doctor`: checks what `tern` and the cluster need, one line per check, each problem
//! with a hint: the certificate `tern` uses, the entry node, and every member (reachable,
//! answering, its clock against this machine's, its certificate's lifetime, its links).

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde::Serialize;
use tern::admin::{AdminClient, AdminReply, AdminRequest};
use tern::certs::{NodeIdentity, Role};
use tern::MemberStatus;

use super::printable;

/// A certificate with fewer days left than this is a warning.
const CERT_DAYS_WARN: i64 = 30;
/// A clock further off than this (ms) is a warning: logs and reports disagree.
const CLOCK_WARN_MS: i64 = 2_000;
/// A clock further off than this (ms) fails: certificates are judged by each device's clock.
const CLOCK_FAIL_MS: i64 = 60_000;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

/// One check.
#[derive(Debug, Serialize)]
pub struct Check {
    /// What was checked: a file, a node.
    pub subject: String,
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about it, for a warning or a failure.
    pub hint: Option<String>,
}

/// What `tern doctor --json` prints.
#[derive(Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub warnings: usize,
    pub failures: usize,
}

struct Checks(Vec<Check>);

impl Checks {
    fn ok(&mut self, subject: impl Into<String>, detail: impl Into<String>) {
        self.push(subject, Status::Ok, detail, None);
    }

    fn bad(
        &mut self,
        subject: impl Into<String>,
        status: Status,
        detail: impl Into<String>,
        hint: impl Into<String>,
    ) {
        self.push(subject, status, detail, Some(hint.into()));
    }

    fn push(
        &mut self,
        subject: impl Into<String>,
        status: Status,
        detail: impl Into<String>,
        hint: Option<String>,
    ) {
        self.0.push(Check {
            subject: subject.into(),
            status,
            detail: detail.into(),
            hint,
        });
    }
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Days from now until `not_after` (s since the epoch), rounded down.
fn days_left(not_after: i64) -> i64 {
    (not_after * 1_000 - now_unix_ms()).div_euclid(86_400_000)
}

/// The certificate `tern` uses: loads, is an admin's or observer's, in date, from the CA.
fn check_own_certificate(c: &mut Checks, certs: &Path, who: &str) -> Option<NodeIdentity> {
    let (cert, key, ca) = NodeIdentity::paths(certs, who);
    let subject = cert.display().to_string();
    let identity = match NodeIdentity::load(&cert, &key, &ca) {
        Ok(id) => id,
        Err(e) => {
            c.bad(
                subject,
                Status::Fail,
                format!(
                    "cannot be loaded with {} and {}: {e}",
                    key.display(),
                    ca.display()
                ),
                format!(
                    "issue one with `tern ca issue {who} --role admin --dir {}` on the device \
                     that holds the CA, or pass --certs DIR and --as NAME",
                    certs.display()
                ),
            );
            return None;
        }
    };
    match identity.role() {
        Ok(Role::Admin | Role::Observer) => {}
        Ok(role) => c.bad(
            subject.clone(),
            Status::Fail,
            format!("is a {role}'s certificate"),
            format!(
                "a node's certificate cannot drive the cluster: issue an admin certificate \
                 with `tern ca issue admin --role admin --dir {}`",
                certs.display()
            ),
        ),
        Err(e) => c.bad(
            subject.clone(),
            Status::Fail,
            e.to_string(),
            "issue a new certificate with `tern ca issue`",
        ),
    }
    match tern::certs::check_signed_by(&identity.cert_der, &identity.ca_der) {
        Ok(()) => c.ok(
            ca.display().to_string(),
            format!("the cluster CA signed {subject}"),
        ),
        Err(e) => c.bad(
            ca.display().to_string(),
            Status::Fail,
            format!("{subject}: {e}"),
            "the certificate and ca.pem must come from the same cluster CA: copy that CA's \
             ca.pem, or issue the certificate again with it",
        ),
    }
    match tern::certs::validity_of(&identity.cert_der) {
        Ok((not_before, _)) if not_before * 1_000 > now_unix_ms() => c.bad(
            subject,
            Status::Fail,
            "is not valid yet",
            "this machine's clock is behind the CA's: set it right (NTP)",
        ),
        Ok((_, not_after)) => certificate_days(c, subject, "valid", not_after),
        Err(e) => c.bad(subject, Status::Fail, e.to_string(), "issue a new one"),
    }
    Some(identity)
}

/// A check of a certificate's days left.
fn certificate_days(c: &mut Checks, subject: String, what: &str, not_after: i64) {
    let days = days_left(not_after);
    let renew = "renew it with `tern ca issue NAME --days N` (a node takes a renewed \
                 certificate on SIGHUP)";
    if days < 0 {
        c.bad(
            subject,
            Status::Fail,
            format!("certificate expired {} days ago", -days),
            renew,
        );
    } else if days < CERT_DAYS_WARN {
        c.bad(
            subject,
            Status::Warn,
            format!("certificate {what} for {days} more days"),
            renew,
        );
    } else {
        c.ok(subject, format!("certificate {what} for {days} more days"));
    }
}

/// Asks `client` for its figures; the answer and the round trip.
async fn figures_of(client: &AdminClient) -> Result<(tern::NodeFigures, Duration, i64)> {
    let asked_at = now_unix_ms();
    let started = Instant::now();
    let reply = client.request(&AdminRequest::Figures, |_| {}).await?;
    let rtt = started.elapsed();
    let AdminReply::Figures(f) = reply else {
        anyhow::bail!("unexpected answer {reply:?}");
    };
    Ok((*f, rtt, asked_at))
}

/// One member: answers, its clock, its certificate, its links.
fn check_member(c: &mut Checks, name: &str, answer: Result<(tern::NodeFigures, Duration, i64)>) {
    let (f, rtt, asked_at) = match answer {
        Ok(a) => a,
        Err(e) => {
            c.bad(
                name,
                Status::Fail,
                format!("did not answer: {e:#}"),
                format!(
                    "is {name} running, and is its UDP port reachable from here? `tern nodes` \
                     shows the address the cluster knows; its admins list must name this \
                     certificate"
                ),
            );
            return;
        }
    };
    c.ok(name, format!("answered in {} ms", rtt.as_millis()));
    // The node read its clock somewhere within the round trip: take the middle.
    let skew = f.clock_unix_ms as i64 - (asked_at + rtt.as_millis() as i64 / 2);
    let hint = format!(
        "set {name}'s clock and this machine's right (NTP): certificates are judged by each \
         device's clock, and a device far off refuses certificates that are fine"
    );
    let ahead = if skew >= 0 { "ahead of" } else { "behind" };
    let said = format!("clock {} ms {ahead} this machine's", skew.abs());
    if skew.abs() > CLOCK_FAIL_MS {
        c.bad(format!("{name} clock"), Status::Fail, said, hint);
    } else if skew.abs() > CLOCK_WARN_MS {
        c.bad(format!("{name} clock"), Status::Warn, said, hint);
    } else {
        c.ok(format!("{name} clock"), said);
    }
    match f.certificate_not_after_unix {
        Some(not_after) => certificate_days(c, format!("{name} certificate"), "valid", not_after),
        None => c.bad(
            format!("{name} certificate"),
            Status::Warn,
            "its lifetime could not be read",
            "check it with `openssl x509 -noout -dates`",
        ),
    }
    for p in f.peers.iter().filter(|p| !p.connected) {
        c.bad(
            format!("{name} -> {}", p.name),
            Status::Warn,
            format!(
                "not connected{}",
                p.last_error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
            format!(
                "{name} cannot reach {}: check the network between the two devices (UDP), \
                 and that both certificates come from the same CA and are not revoked",
                p.name
            ),
        );
    }
}

/// `tern doctor`. True when nothing failed.
pub async fn doctor(args: &super::Args) -> Result<bool> {
    let json = args.json;
    let mut c = Checks(Vec::new());
    if let Some(identity) = check_own_certificate(&mut c, &args.certs, &args.admin) {
        check_cluster(&mut c, &identity, args).await;
    }
    let report = Report {
        warnings: c.0.iter().filter(|k| k.status == Status::Warn).count(),
        failures: c.0.iter().filter(|k| k.status == Status::Fail).count(),
        checks: c.0,
    };
    if json {
        super::print_json(&report)?;
    } else {
        for k in &report.checks {
            let tag = match k.status {
                Status::Ok => "ok  ",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            println!(
                "{}",
                printable(&format!("{tag}  {}: {}", k.subject, k.detail))
            );
            if let Some(hint) = &k.hint {
                println!("{}", printable(&format!("      hint: {hint}")));
            }
        }
        println!(
            "{} checks: {} failed, {} warnings",
            report.checks.len(),
            report.failures,
            report.warnings
        );
    }
    Ok(report.failures == 0)
}

/// The entry node, then every member it knows.
async fn check_cluster(c: &mut Checks, identity: &NodeIdentity, args: &super::Args) {
    let addr = args.node.addr;
    let entry = match super::connect(addr, args.node.name.as_ref(), identity).await {
        Ok(e) => e,
        Err(e) => {
            let hint = super::hint(&format!("{e:#}"), args).unwrap_or_else(|| {
                format!("is a node running at {addr}? pass --node ADDR (or set TERN_NODE)")
            });
            c.bad(
                format!("entry {addr}"),
                Status::Fail,
                format!("{e:#}"),
                hint,
            );
            return;
        }
    };
    let subject = format!("entry {addr}");
    let nodes = match entry.request(&AdminRequest::Nodes, |_| {}).await {
        Ok(AdminReply::Nodes(n)) => n,
        Ok(other) => {
            let hint = "the node and this tern are from different builds of Tern";
            c.bad(
                subject,
                Status::Fail,
                format!("unexpected answer {other:?}"),
                hint,
            );
            return;
        }
        Err(e) => {
            let hint = super::hint(&e.to_string(), args)
                .unwrap_or_else(|| "try again; then read the node's log".to_owned());
            c.bad(subject, Status::Fail, e.to_string(), hint);
            return;
        }
    };
    c.ok(
        subject,
        format!(
            "{} answers there, and knows {} members",
            entry.node(),
            nodes.len()
        ),
    );
    for m in &nodes {
        let name = m.info.name.to_string();
        let answer = if &m.info.name == entry.node() {
            figures_of(&entry).await
        } else if m.status != MemberStatus::Up {
            c.bad(
                name.clone(),
                Status::Fail,
                format!(
                    "{} (as {} last heard)",
                    format!("{:?}", m.status).to_lowercase(),
                    entry.node()
                ),
                format!("{name} left or was lost: start it again, or forget it by restarting the others"),
            );
            continue;
        } else if let Some(at) = m.info.addr {
            match AdminClient::connect_to(at, identity, &m.info.name).await {
                Ok(client) => {
                    let a = figures_of(&client).await;
                    client.close().await;
                    a
                }
                Err(e) => Err(e.into()),
            }
        } else {
            Err(anyhow::anyhow!("no address known for it"))
        };
        check_member(c, &name, answer);
    }
    entry.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_far_off_fails_and_a_little_off_warns() {
        let figures = |skew_ms: i64| {
            let mut f: tern::NodeFigures = serde_json::from_value(serde_json::json!({
                "node": "tv", "stats": tern::NodeStats::default(),
                "migrations": tern::MigrationStats::default(), "services": [], "peers": [],
                "channels": [],
            }))
            .expect("figures");
            f.clock_unix_ms = (now_unix_ms() + skew_ms) as u64;
            f.certificate_not_after_unix = Some(now_unix_ms() / 1_000 + 10 * 86_400);
            f
        };
        for (skew, want) in [
            (0, Status::Ok),
            (10_000, Status::Warn),
            (-120_000, Status::Fail),
        ] {
            let mut c = Checks(Vec::new());
            check_member(
                &mut c,
                "tv",
                Ok((figures(skew), Duration::ZERO, now_unix_ms())),
            );
            let clock =
                c.0.iter()
                    .find(|k| k.subject == "tv clock")
                    .expect("a clock check");
            assert_eq!(clock.status, want, "{skew} ms: {clock:?}");
            let cert =
                c.0.iter()
                    .find(|k| k.subject == "tv certificate")
                    .expect("a cert check");
            assert_eq!(cert.status, Status::Warn, "10 days left: {cert:?}");
            assert!(cert
                .hint
                .as_deref()
                .is_some_and(|h| h.contains("tern ca issue")));
        }
    }
}
