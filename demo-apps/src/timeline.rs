//! How a run reads on a terminal.

use std::fmt::Write as _;

use crate::media::Audit;
use crate::scenario::{Moment, Outcome};

/// Text width the timeline wraps to.
const WIDTH: usize = 96;

/// Wraps `text` to [`WIDTH`], each line starting with `indent`.
fn wrap(text: &str, indent: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        if !line.is_empty() && indent.len() + line.len() + 1 + word.len() > WIDTH {
            let _ = writeln!(out, "{indent}{line}");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() {
        let _ = writeln!(out, "{indent}{line}");
    }
    out
}

/// Microseconds as milliseconds with one decimal.
pub fn ms(us: u64) -> String {
    format!("{}.{} ms", us / 1_000, (us % 1_000) / 100)
}

/// One moment of the timeline.
pub fn moment(m: &Moment) -> String {
    let mut out = String::new();
    let at = format!("{:>3}.{:02} s  ", m.at_ms / 1_000, (m.at_ms % 1_000) / 10);
    let body = wrap(&m.what, &" ".repeat(at.len()));
    out.push_str(&at);
    out.push_str(body.trim_start());
    for s in &m.moves {
        if s.committed {
            let _ = writeln!(
                out,
                "            {:<10} {:>5} → {:<6} freeze {:>9}   carried {:>3}   forwarded {:>3}   rebuilt {:>2}   epoch {}",
                s.service,
                s.from,
                s.to,
                ms(s.freeze_us),
                s.carried,
                s.forwarded,
                s.rebuilt,
                s.epoch
            );
        } else {
            let _ = writeln!(
                out,
                "            {:<10} {:>5} → {:<6} NOT MOVED: {}",
                s.service,
                s.from,
                s.to,
                s.aborted.as_deref().unwrap_or("no reason given")
            );
        }
        if !s.reasons.is_empty() {
            out.push_str(&wrap(
                &format!("why: {}", s.reasons.join("; ")),
                "                       ",
            ));
        }
    }
    out
}

/// The closing part: the audit and the verdict.
pub fn verdict(o: &Outcome) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\nWhere everything ended");
    for (service, node) in &o.placement {
        let _ = writeln!(out, "  {service:<10} on {node}");
    }
    out.push_str(&checks(&o.audit));
    let moved = o.steps.iter().filter(|s| s.committed).count();
    let carried: u64 = o.steps.iter().map(|s| s.carried).sum();
    let forwarded: u64 = o.steps.iter().map(|s| s.forwarded).sum();
    let _ = writeln!(
        out,
        "\n{moved} of {} moves committed, {carried} queued messages carried, {forwarded} forwarded, in {}.{:02} s.",
        o.steps.len(),
        o.elapsed_ms / 1_000,
        (o.elapsed_ms % 1_000) / 10
    );
    out.push_str(&verdict_line(
        [
            o.received,
            o.lost,
            o.duplicated,
            o.reordered,
            o.asks_unanswered,
        ],
        o.is_clean(),
    ));
    out
}

/// `Verdict: ...` from [received, lost, duplicated, reordered, asks unanswered].
fn verdict_line(n: [u64; 5], ok: bool) -> String {
    format!(
        "Verdict: {} messages received, {} lost, {} duplicated, {} reordered, {} asks unanswered -> {}\n",
        n[0],
        n[1],
        n[2],
        n[3],
        n[4],
        if ok { "OK" } else { "FAILED" }
    )
}

/// What the services' sequence checks saw, stream by stream, and the asks.
pub fn checks(audit: &Audit) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\nWhat the sequence checks saw");
    for (stream, v) in &audit.streams {
        let _ = writeln!(
            out,
            "  {stream:<18} {:>6} received   {} lost   {} duplicated   {} reordered",
            v.received, v.lost, v.duplicated, v.reordered
        );
    }
    let _ = writeln!(
        out,
        "  asks               {:>6} sent       {} unanswered",
        audit.asks_sent, audit.asks_unanswered
    );
    out
}

/// The final word on an audit taken when the app stops outside the scenario (a device that
/// started it in multi-process mode).
pub fn audit_verdict(audit: &Audit) -> String {
    let t = audit.total();
    let mut out = checks(audit);
    out.push_str(&verdict_line(
        [
            t.received,
            t.lost,
            t.duplicated,
            t.reordered,
            audit.asks_unanswered,
        ],
        audit.is_clean(),
    ));
    out
}
