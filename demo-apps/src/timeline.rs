//! How a run reads on a terminal.

use std::fmt::Write as _;

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
    let _ = writeln!(out, "\nWhat the sequence checks saw");
    for (stream, v) in &o.audit.streams {
        let _ = writeln!(
            out,
            "  {stream:<18} {:>6} received   {} lost   {} duplicated   {} reordered",
            v.received, v.lost, v.duplicated, v.reordered
        );
    }
    let _ = writeln!(
        out,
        "  asks               {:>6} sent       {} unanswered",
        o.asks_sent, o.asks_unanswered
    );
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
    let _ = writeln!(
        out,
        "Verdict: {} messages received, {} lost, {} duplicated, {} reordered, {} asks unanswered -> {}",
        o.received,
        o.lost,
        o.duplicated,
        o.reordered,
        o.asks_unanswered,
        if o.is_clean() { "OK" } else { "FAILED" }
    );
    out
}
