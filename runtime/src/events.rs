//! The event log and the loss log: what a node noticed, and what it told its senders was lost.
//! One of `NodeShared`'s subsystems; each log is bounded (`events_max`, `losses_max`: the
//! oldest entry goes first) and its lock is a leaf (nothing else is locked while it is held).

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tern_proto::ids::{NodeName, ServiceId};

use crate::stats::Stats;
use crate::sync::lock;

/// Bytes of an event's detail or a loss report's reason kept: past this the text is cut (at a
/// character boundary) and says how much was cut. Much of it can come from peers (their
/// refusal reasons, protocol errors, names), and each log keeps thousands of entries.
pub const EVENT_TEXT_BYTES_MAX: usize = 1024;

/// `text` cut to [`EVENT_TEXT_BYTES_MAX`] bytes, saying how much was cut.
fn capped(mut text: String) -> String {
    if text.len() <= EVENT_TEXT_BYTES_MAX {
        return text;
    }
    let mut end = EVENT_TEXT_BYTES_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = text.len() - end;
    text.truncate(end);
    text.push_str(&format!("... ({cut} bytes cut)"));
    text
}

/// Something a node noticed that an operator may want to see: refusals, protocol errors,
/// peers coming and going. Kept in a bounded log (`events_max`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEvent {
    /// Position in the node's event sequence.
    pub n: u64,
    /// Short kind, e.g. `connection-refused`, `protocol-error`, `refused`.
    pub kind: String,
    /// What happened.
    pub detail: String,
}

/// Messages this node sent that will not be handled, or may not have been: numbers
/// `first_seq..=last_seq` of `sender`'s channel to `service`.
///
/// Two causes. A node they went to (or that hosted their service) was lost before the service
/// confirmed taking them: some of them may still have been handled (the confirmation is what
/// went missing), but none is delivered after the report, because the receiver is told to
/// stop waiting for them. Or a node refused a message it had first accepted (its service
/// stopped, its copy was orphaned, it was forwarded somewhere full): that one was not handled;
/// except `Unconfirmed`, a migration's carried message whose stream failed after the commit,
/// which the target may have handled.
///
/// ```no_run
/// # fn demo(node: tern::NodeHandle) {
/// for loss in node.losses() {
///     eprintln!("{} messages to {} lost with {}", loss.messages, loss.service, loss.node);
/// }
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LossReport {
    /// The receiving service.
    pub service: ServiceId,
    /// The sending service, or the sender id of a handle's channel (see
    /// [`ServiceRef::sender_id`](crate::ServiceRef::sender_id)).
    pub sender: ServiceId,
    /// First number declared lost.
    pub first_seq: u64,
    /// Last number declared lost.
    pub last_seq: u64,
    /// How many: `last_seq - first_seq + 1`.
    pub messages: u64,
    /// The node that was lost, or that refused.
    pub node: NodeName,
    /// Why, in words.
    pub reason: String,
}

/// The node's two logs.
pub(crate) struct Logs {
    /// Events, with the number of the last one recorded.
    events: Mutex<(u64, VecDeque<NodeEvent>)>,
    events_max: usize,
    /// Declared losses, newest last.
    losses: Mutex<VecDeque<LossReport>>,
    losses_max: usize,
}

impl Logs {
    /// Empty logs keeping at most `events_max` events and `losses_max` loss reports.
    pub fn new(events_max: usize, losses_max: usize) -> Self {
        Logs {
            events: Mutex::new((0, VecDeque::new())),
            events_max,
            losses: Mutex::new(VecDeque::new()),
            losses_max,
        }
    }

    /// Records an event.
    pub fn event(&self, kind: &str, detail: String) {
        let mut ev = lock(&self.events);
        ev.0 += 1;
        let n = ev.0;
        if ev.1.len() >= self.events_max {
            ev.1.pop_front();
        }
        ev.1.push_back(NodeEvent {
            n,
            kind: kind.to_owned(),
            detail: capped(detail),
        });
    }

    /// The events kept, oldest first.
    pub fn events(&self) -> Vec<NodeEvent> {
        lock(&self.events).1.iter().cloned().collect()
    }

    /// Keeps a loss report, counted in `stats` (after it is kept: whoever sees the count finds
    /// the report).
    pub fn record_loss(&self, mut r: LossReport, stats: &Stats) {
        let messages = r.messages;
        r.reason = capped(std::mem::take(&mut r.reason));
        {
            let mut log = lock(&self.losses);
            if log.len() >= self.losses_max {
                log.pop_front();
            }
            log.push_back(r);
        }
        stats.messages_lost_reported.add(messages);
        stats.loss_reports.inc();
    }

    /// The loss reports kept, oldest first.
    pub fn losses(&self) -> Vec<LossReport> {
        lock(&self.losses).iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer's megabyte of text (a refusal reason, a protocol error) is kept as a kilobyte
    /// that says how much was cut; multi-byte characters are never split.
    #[test]
    fn event_texts_are_capped_at_a_character_boundary() {
        let logs = Logs::new(4, 4);
        logs.event("refused-by-peer", "é".repeat(512 * 1024));
        let detail = &logs.events()[0].detail;
        assert!(
            detail.len() <= EVENT_TEXT_BYTES_MAX + 32,
            "{}",
            detail.len()
        );
        assert!(
            detail.ends_with("... (1047552 bytes cut)"),
            "{}",
            &detail[1000..]
        );
        logs.event("short", "as is".into());
        assert_eq!(logs.events()[1].detail, "as is");
    }

    #[test]
    fn both_logs_keep_their_newest_entries_within_their_bounds() {
        let logs = Logs::new(2, 1);
        for k in ["a", "b", "c"] {
            logs.event(k, String::new());
        }
        let kept: Vec<_> = logs.events().into_iter().map(|e| (e.n, e.kind)).collect();
        assert_eq!(kept, vec![(2, "b".to_string()), (3, "c".to_string())]);
        let stats = Stats::default();
        for first_seq in [1, 5] {
            logs.record_loss(
                LossReport {
                    service: ServiceId::from_parts(1, 1),
                    sender: ServiceId::from_parts(1, 2),
                    first_seq,
                    last_seq: first_seq + 1,
                    messages: 2,
                    node: NodeName::new("b"),
                    reason: "test".into(),
                },
                &stats,
            );
        }
        assert_eq!(logs.losses().len(), 1);
        assert_eq!(logs.losses()[0].first_seq, 5);
        let s = stats.snapshot();
        assert_eq!((s.messages_lost_reported, s.loss_reports), (4, 2));
    }
}
