use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tern::{Ctx, ReplyTo, Service};

/// Missing sequence numbers remembered per sender; gaps beyond are only counted.
const MISSING_MAX: usize = 65_536;
/// Senders tracked; messages of further senders are only counted.
const SENDERS_MAX: usize = 4096;

/// What a [`SeqSink`] knows about one sender.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderReport {
    /// Messages received, duplicates included.
    pub received: u64,
    /// The next sequence number expected (one past the highest seen). Sequences start at 1.
    pub next: u64,
    /// Messages seen twice or more.
    pub duplicated: u64,
    /// Messages that arrived after a later one from the same sender.
    pub reordered: u64,
    /// Sequence numbers below `next` never seen.
    pub missing: BTreeSet<u64>,
    /// Gaps that did not fit in `missing`.
    pub missing_overflow: u64,
}

impl SenderReport {
    /// Counts `seq` from this sender: in order, a gap (the numbers skipped become missing), a
    /// late one filling a gap (reordered), or a copy (duplicated).
    pub fn record(&mut self, seq: u64) {
        self.received += 1;
        if self.next == 0 {
            self.next = 1;
        }
        if seq == self.next {
            self.next += 1;
        } else if seq > self.next {
            for s in self.next..seq {
                if self.missing.len() < MISSING_MAX {
                    self.missing.insert(s);
                } else {
                    self.missing_overflow += 1;
                }
            }
            self.next = seq + 1;
        } else if self.missing.remove(&seq) {
            self.reordered += 1;
        } else {
            self.duplicated += 1;
        }
    }
}

/// The sink's whole report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkReport {
    /// Per sender name.
    pub senders: BTreeMap<String, SenderReport>,
    /// Messages from senders beyond the tracked bound.
    pub untracked: u64,
}

/// Lost, duplicated and reordered counts against what senders say they sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Messages sent and never received.
    pub lost: u64,
    /// Messages received more than once.
    pub duplicated: u64,
    /// Messages received after a later one of the same sender.
    pub reordered: u64,
    /// Distinct messages received.
    pub received: u64,
}

impl Verdict {
    /// True when nothing was lost, duplicated or reordered.
    pub fn is_clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.reordered == 0
    }
}

impl SinkReport {
    /// Counts `seq` from `sender` (see [`SenderReport::record`]); senders beyond the tracked
    /// bound are only counted, in `untracked`.
    pub fn record(&mut self, sender: &str, seq: u64) {
        let tracked = self.senders.len();
        match self.senders.get_mut(sender) {
            Some(r) => r.record(seq),
            None if tracked < SENDERS_MAX => {
                let mut r = SenderReport::default();
                r.record(seq);
                self.senders.insert(sender.to_owned(), r);
            }
            None => self.untracked += 1,
        }
    }

    /// Messages received from every sender, copies included.
    pub fn received(&self) -> u64 {
        self.senders.values().map(|r| r.received).sum::<u64>() + self.untracked
    }

    /// Compares with `sent`: per sender, the count of messages numbered 1..=n it sent.
    pub fn verdict(&self, sent: &BTreeMap<String, u64>) -> Verdict {
        let mut v = Verdict::default();
        for (name, &n) in sent {
            match self.senders.get(name) {
                None => v.lost += n,
                Some(r) => {
                    let seen_below_next =
                        r.next.saturating_sub(1) - r.missing.len() as u64 - r.missing_overflow;
                    let distinct = seen_below_next.min(n);
                    v.received += distinct;
                    v.lost += n - distinct;
                    v.duplicated += r.duplicated;
                    v.reordered += r.reordered;
                }
            }
        }
        v
    }
}

/// A referee service: records per sender the sequence numbers it is sent.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SeqSink {
    report: SinkReport,
}

/// Messages of [`SeqSink`].
#[derive(Debug, Serialize, Deserialize)]
pub enum SinkMsg {
    /// One numbered message.
    Record {
        /// Sender name.
        sender: String,
        /// Sequence number, from 1.
        seq: u64,
    },
    /// One numbered request; answered with `seq`.
    RecordAsk {
        /// Sender name.
        sender: String,
        /// Sequence number, from 1.
        seq: u64,
        /// Answer.
        reply: ReplyTo<u64>,
    },
    /// The report so far.
    Report(ReplyTo<SinkReport>),
}

impl Service for SeqSink {
    type Msg = SinkMsg;
    const KIND: &'static str = "seq-sink";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: SinkMsg, ctx: &mut Ctx<Self>) {
        match msg {
            SinkMsg::Record { sender, seq } => self.report.record(&sender, seq),
            SinkMsg::RecordAsk { sender, seq, reply } => {
                self.report.record(&sender, seq);
                if let Err(e) = ctx.reply(reply, seq) {
                    tracing::warn!(error = %e, "sink reply not delivered");
                }
            }
            SinkMsg::Report(reply) => {
                if let Err(e) = ctx.reply(reply, self.report.clone()) {
                    tracing::warn!(error = %e, "sink report not delivered");
                }
            }
        }
    }
}

/// Sends numbered messages to the [`SeqSink`] in its book under `"sink"`, as a service (so
/// each message carries the runtime's sender id and channel sequence too).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeqSender {
    name: String,
    sent: u64,
    asked: u64,
    failed: u64,
}

impl SeqSender {
    /// A sender reporting as `name` to the sink.
    pub fn new(name: &str) -> Self {
        SeqSender {
            name: name.to_owned(),
            sent: 0,
            asked: 0,
            failed: 0,
        }
    }
}

/// Messages of [`SeqSender`].
#[derive(Debug, Serialize, Deserialize)]
pub enum SeqSenderMsg {
    /// Send `count` more tells, waiting for room when the sink or link is full.
    Tell {
        /// How many.
        count: u64,
    },
    /// Send `count` more asks, one at a time, each answered before the next.
    Ask {
        /// How many.
        count: u64,
        /// Per-ask timeout.
        timeout_ms: u64,
    },
    /// Answers (messages numbered so far, failures).
    Progress(ReplyTo<(u64, u64)>),
}

impl Service for SeqSender {
    type Msg = SeqSenderMsg;
    const KIND: &'static str = "seq-sender";
    const VERSION: u32 = 1;

    async fn handle(&mut self, msg: SeqSenderMsg, ctx: &mut Ctx<Self>) {
        match msg {
            SeqSenderMsg::Tell { count } => {
                let sink = match ctx.book_ref::<SeqSink>("sink") {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "no sink in book");
                        self.failed += count;
                        return;
                    }
                };
                for _ in 0..count {
                    let seq = self.sent + self.asked + 1;
                    let m = SinkMsg::Record {
                        sender: self.name.clone(),
                        seq,
                    };
                    match ctx.tell_wait(&sink, m).await {
                        Ok(()) => self.sent += 1,
                        Err(e) => {
                            tracing::warn!(error = %e, "tell failed");
                            self.failed += 1;
                        }
                    }
                }
            }
            SeqSenderMsg::Ask { count, timeout_ms } => {
                let sink = match ctx.book_ref::<SeqSink>("sink") {
                    Ok(s) => s,
                    Err(_) => {
                        self.failed += count;
                        return;
                    }
                };
                for _ in 0..count {
                    let seq = self.sent + self.asked + 1;
                    let name = self.name.clone();
                    let res = ctx
                        .ask(
                            &sink,
                            |reply| SinkMsg::RecordAsk {
                                sender: name,
                                seq,
                                reply,
                            },
                            Duration::from_millis(timeout_ms),
                        )
                        .await;
                    match res {
                        Ok(echo) if echo == seq => self.asked += 1,
                        Ok(other) => {
                            tracing::error!(seq, other, "ask answered with the wrong sequence");
                            self.failed += 1;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "ask failed");
                            self.failed += 1;
                        }
                    }
                }
            }
            SeqSenderMsg::Progress(reply) => {
                let _ = ctx.reply(reply, (self.sent + self.asked, self.failed));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_gaps_reorders_and_duplicates() {
        let mut r = SenderReport::default();
        for s in [1, 2, 4, 3, 3, 6] {
            r.record(s);
        }
        assert_eq!(r.next, 7);
        assert_eq!(r.reordered, 1);
        assert_eq!(r.duplicated, 1);
        assert_eq!(r.missing, BTreeSet::from([5]));
        let report = SinkReport {
            senders: BTreeMap::from([("a".to_string(), r)]),
            untracked: 0,
        };
        let v = report.verdict(&BTreeMap::from([("a".to_string(), 8)]));
        // 1,2,3,4,6 seen; 5, 7 and 8 lost.
        assert_eq!(
            v,
            Verdict {
                lost: 3,
                duplicated: 1,
                reordered: 1,
                received: 5
            }
        );
        let clean = SinkReport::default().verdict(&BTreeMap::new());
        assert!(clean.is_clean());
    }
}
