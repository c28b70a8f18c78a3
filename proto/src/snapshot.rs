//! The tables of a snapshot: a service's receive windows, send counters, address book and
//! pending timers, cut into `SnapTables` frames by the source and put back together, within
//! bounds, by the target.
//!
//! They do not travel in the header: a service that heard from many senders (up to
//! [`SENDERS_MAX`]), sent to many receivers, holds a large book or many timers has tables far
//! larger than one frame, and a window holding early messages can alone be larger than one.
//! The source cuts them by an estimate of their encoded size that is never below it
//! ([`tables_frames`]); a window cut in two continues in the next entry with the same sender,
//! which the target merges ([`TablesIn`]).

use serde::{Deserialize, Serialize};

use crate::ids::{ServiceAddr, ServiceId};
use crate::inbox::{SENDERS_MAX, WINDOW_HELD_MAX};
use crate::wire::{CarriedMsg, TimerWire, WindowWire};

/// Send counters a snapshot may carry (receivers the service has sent to). A counter cannot be
/// dropped (the receiver's window expects the next number), so a snapshot with more is
/// refused by the target.
pub const SEND_SEQS_MAX: usize = 1 << 20;
/// Book entries a snapshot may carry (the target's `book_edges_max` applies when they are
/// learned).
pub const BOOK_MAX: usize = 1 << 20;
/// Timers a snapshot may carry (the target's per-service bound applies when it restores).
pub const TIMERS_MAX: usize = 1 << 16;

/// Upper bound of an entry's encoded size without its early messages: an array header, a
/// service id (two u64), a u64 and two array headers.
const WINDOW_BYTES: usize = 48;
/// Upper bound of a send counter's encoded size.
const SEND_SEQ_BYTES: usize = 32;
/// Upper bound of a skipped number's encoded size.
const SKIPPED_BYTES: usize = 9;

/// Upper bound of a book entry's encoded size.
fn entry_bytes((role, addr): &(String, ServiceAddr)) -> usize {
    64 + role.len() + addr.kind.name.len() + addr.node.as_str().len()
}

/// Upper bound of a timer's encoded size.
fn timer_bytes(t: &TimerWire) -> usize {
    16 + t.msg.len()
}

/// Upper bound of a carried message's encoded size.
pub fn carried_bytes(m: &CarriedMsg) -> usize {
    let names = m.ask.as_ref().map_or(0, |(n, _)| n.as_str().len())
        + m.origin.as_ref().map_or(0, |n| n.as_str().len());
    64 + names + m.msg.len()
}

/// A snapshot's tables, or one `SnapTables` frame's part of them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tables {
    /// Receive windows; one window's early messages may continue in the next entry.
    pub windows: Vec<WindowWire>,
    /// Per receiver, the last number the service used as a sender.
    pub send_seqs: Vec<(ServiceId, u64)>,
    /// The address book.
    pub book: Vec<(String, ServiceAddr)>,
    /// Pending timers.
    pub timers: Vec<TimerWire>,
}

impl Tables {
    fn is_empty(&self) -> bool {
        self.windows.is_empty()
            && self.send_seqs.is_empty()
            && self.book.is_empty()
            && self.timers.is_empty()
    }
}

/// Cuts `all` into frames of at most about `budget_bytes` each (a single early message or
/// timer larger than that goes alone). The frames carry everything, in order; a window's
/// early messages may be split over consecutive entries of its sender.
pub fn tables_frames(all: Tables, budget_bytes: usize) -> Vec<Tables> {
    let mut frames = Vec::new();
    let mut cur = Tables::default();
    let mut used = 0usize;
    let flush = |cur: &mut Tables, used: &mut usize, frames: &mut Vec<Tables>| {
        if !cur.is_empty() {
            frames.push(std::mem::take(cur));
        }
        *used = 0;
    };
    for w in all.windows {
        let head = WINDOW_BYTES + w.skipped.len() * SKIPPED_BYTES;
        if used + head > budget_bytes {
            flush(&mut cur, &mut used, &mut frames);
        }
        used += head;
        let mut entry = WindowWire {
            from: w.from,
            next: w.next,
            early: Vec::new(),
            skipped: w.skipped,
            taken: w.taken,
        };
        for m in w.early {
            let b = carried_bytes(&m);
            if used + b > budget_bytes && (!entry.early.is_empty() || !cur.is_empty()) {
                // The entry goes in this frame; the rest of its window continues in the next.
                cur.windows.push(std::mem::replace(
                    &mut entry,
                    WindowWire {
                        from: w.from,
                        next: w.next,
                        early: Vec::new(),
                        skipped: Vec::new(),
                        taken: w.taken,
                    },
                ));
                flush(&mut cur, &mut used, &mut frames);
                used = WINDOW_BYTES;
            }
            used += b;
            entry.early.push(m);
        }
        cur.windows.push(entry);
    }
    for s in all.send_seqs {
        if used + SEND_SEQ_BYTES > budget_bytes {
            flush(&mut cur, &mut used, &mut frames);
        }
        used += SEND_SEQ_BYTES;
        cur.send_seqs.push(s);
    }
    for e in all.book {
        let b = entry_bytes(&e);
        if used + b > budget_bytes && !cur.is_empty() {
            flush(&mut cur, &mut used, &mut frames);
        }
        used += b;
        cur.book.push(e);
    }
    for t in all.timers {
        let b = timer_bytes(&t);
        if used + b > budget_bytes && !cur.is_empty() {
            flush(&mut cur, &mut used, &mut frames);
        }
        used += b;
        cur.timers.push(t);
    }
    flush(&mut cur, &mut used, &mut frames);
    frames
}

/// Why the target refuses a snapshot's tables.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TablesError {
    /// More windows than an inbox keeps.
    #[error("too many senders: more than {max} receive windows")]
    TooManySenders {
        /// [`SENDERS_MAX`].
        max: usize,
    },
    /// More send counters than a snapshot may carry.
    #[error("too many send counters: more than {max}")]
    TooManySendSeqs {
        /// [`SEND_SEQS_MAX`].
        max: usize,
    },
    /// More early messages in one window than a window holds.
    #[error("a window holds more than {max} early messages")]
    WindowTooFull {
        /// [`WINDOW_HELD_MAX`].
        max: usize,
    },
    /// The early messages, book entries and timers exceed the bytes the target allows.
    #[error("early messages, book and timers exceed {max} bytes")]
    TooManyBytes {
        /// The target's bound.
        max: usize,
    },
    /// More book entries than a snapshot may carry.
    #[error("too many book entries: more than {max}")]
    TooManyBookEntries {
        /// [`BOOK_MAX`].
        max: usize,
    },
    /// More timers than a snapshot may carry.
    #[error("too many timers: more than {max}")]
    TooManyTimers {
        /// [`TIMERS_MAX`].
        max: usize,
    },
    /// More `SnapTables` frames than the header announced.
    #[error("more tables frames than the {announced} announced")]
    TooManyFrames {
        /// What the header said.
        announced: u32,
    },
}

/// The target's side: collects `SnapTables` frames within bounds.
#[derive(Debug)]
pub struct TablesIn {
    /// What arrived so far; consecutive window entries of one sender are merged.
    pub tables: Tables,
    left: u32,
    announced: u32,
    bytes: usize,
    bytes_max: usize,
}

impl TablesIn {
    /// Expects `frames` frames whose early messages, book entries and timers add up to at most
    /// `bytes_max`.
    pub fn new(frames: u32, bytes_max: usize) -> Self {
        TablesIn {
            tables: Tables::default(),
            left: frames,
            announced: frames,
            bytes: 0,
            bytes_max,
        }
    }

    /// True once every announced frame has arrived.
    pub fn is_complete(&self) -> bool {
        self.left == 0
    }

    fn count(&mut self, bytes: usize) -> Result<(), TablesError> {
        self.bytes += bytes;
        if self.bytes > self.bytes_max {
            return Err(TablesError::TooManyBytes {
                max: self.bytes_max,
            });
        }
        Ok(())
    }

    /// Takes one frame.
    pub fn add(&mut self, part: Tables) -> Result<(), TablesError> {
        if self.left == 0 {
            return Err(TablesError::TooManyFrames {
                announced: self.announced,
            });
        }
        self.left -= 1;
        for w in part.windows {
            let bytes: usize = w.early.iter().map(carried_bytes).sum();
            self.count(bytes)?;
            let windows = &mut self.tables.windows;
            match windows.last_mut() {
                Some(last) if last.from == w.from => {
                    last.early.extend(w.early);
                    last.skipped.extend(w.skipped);
                    if last.early.len() > WINDOW_HELD_MAX
                        || last.skipped.len() > 2 * WINDOW_HELD_MAX
                    {
                        return Err(TablesError::WindowTooFull {
                            max: WINDOW_HELD_MAX,
                        });
                    }
                }
                _ => {
                    if windows.len() >= SENDERS_MAX {
                        return Err(TablesError::TooManySenders { max: SENDERS_MAX });
                    }
                    if w.early.len() > WINDOW_HELD_MAX || w.skipped.len() > 2 * WINDOW_HELD_MAX {
                        return Err(TablesError::WindowTooFull {
                            max: WINDOW_HELD_MAX,
                        });
                    }
                    windows.push(w);
                }
            }
        }
        if self.tables.send_seqs.len() + part.send_seqs.len() > SEND_SEQS_MAX {
            return Err(TablesError::TooManySendSeqs { max: SEND_SEQS_MAX });
        }
        self.tables.send_seqs.extend(part.send_seqs);
        if self.tables.book.len() + part.book.len() > BOOK_MAX {
            return Err(TablesError::TooManyBookEntries { max: BOOK_MAX });
        }
        let bytes = part.book.iter().map(entry_bytes).sum();
        self.count(bytes)?;
        self.tables.book.extend(part.book);
        if self.tables.timers.len() + part.timers.len() > TIMERS_MAX {
            return Err(TablesError::TooManyTimers { max: TIMERS_MAX });
        }
        let bytes = part.timers.iter().map(timer_bytes).sum();
        self.count(bytes)?;
        self.tables.timers.extend(part.timers);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{KindKey, NodeName};
    use crate::wire::{decode, encode_frame, Frame, FrameReader};

    fn sender(i: u64) -> ServiceId {
        ServiceId::from_parts(u64::MAX - i, u64::MAX - i)
    }

    fn msg(from: ServiceId, seq: u64, len: usize) -> CarriedMsg {
        CarriedMsg {
            from: Some(from),
            seq,
            ask: Some((NodeName::new("an-asking-node"), u64::MAX)),
            origin: Some(NodeName::new("an-origin-node")),
            msg: vec![0xc0; len],
        }
    }

    fn all_kinds(frame_max: usize) -> Tables {
        let mut windows = Vec::new();
        for i in 0..500u64 {
            let from = sender(i);
            let early = match i % 7 {
                0 => (0..40).map(|k| msg(from, 100 + k, 300)).collect(),
                1 => vec![msg(from, 9, frame_max - 200)],
                _ => Vec::new(),
            };
            windows.push(WindowWire {
                from,
                next: 1 + i,
                early,
                skipped: if i % 5 == 0 {
                    vec![u64::MAX; 3]
                } else {
                    vec![]
                },
                taken: i,
            });
        }
        Tables {
            windows,
            send_seqs: (0..700u64).map(|i| (sender(i), u64::MAX - i)).collect(),
            book: (0..400u64)
                .map(|i| {
                    (
                        format!("a-rather-long-role-name-{i}"),
                        ServiceAddr {
                            id: sender(i),
                            kind: KindKey::new("a-kind-with-a-long-name", u32::MAX),
                            node: NodeName::new("a-node-with-a-long-name"),
                        },
                    )
                })
                .collect(),
            timers: (0..100u64)
                .map(|i| TimerWire {
                    after_us: u64::MAX - i,
                    msg: vec![0xc0; if i == 3 { frame_max - 100 } else { 200 }],
                })
                .collect(),
        }
    }

    /// Every frame fits the bound, and what the target puts back together is what was cut.
    #[test]
    fn tables_cut_to_fit_a_frame_come_back_whole() {
        let frame_max = 4096;
        let all = all_kinds(frame_max);
        let frames = tables_frames(all.clone(), frame_max / 2);
        let mut input = TablesIn::new(frames.len() as u32, usize::MAX);
        for part in frames {
            let mut buf = Vec::new();
            encode_frame(&mut buf, &Frame::SnapTables(part), frame_max).expect("each frame fits");
            let mut reader = FrameReader::new(frame_max);
            reader.push(&buf);
            let body = reader.next_frame().expect("splits").expect("whole");
            let Frame::SnapTables(part) = decode(body).expect("decodes") else {
                panic!("not a tables frame");
            };
            input.add(part).expect("within bounds");
        }
        assert!(input.is_complete());
        let got = input.tables;
        assert_eq!(got.send_seqs, all.send_seqs);
        assert_eq!(got.book, all.book);
        assert_eq!(
            got.timers.iter().map(|t| t.after_us).collect::<Vec<_>>(),
            all.timers.iter().map(|t| t.after_us).collect::<Vec<_>>()
        );
        assert_eq!(got.windows.len(), all.windows.len());
        for (got, want) in got.windows.iter().zip(&all.windows) {
            assert_eq!((got.from, got.next), (want.from, want.next));
            assert_eq!(got.skipped, want.skipped);
            let seqs = |w: &WindowWire| w.early.iter().map(|m| m.seq).collect::<Vec<_>>();
            assert_eq!(seqs(got), seqs(want));
        }
    }

    #[test]
    fn the_target_refuses_tables_past_its_bounds() {
        let mut t = TablesIn::new(1, 1000);
        let from = sender(1);
        let big = Tables {
            windows: vec![WindowWire {
                from,
                next: 1,
                early: vec![msg(from, 2, 2000)],
                skipped: vec![],
                taken: 0,
            }],
            ..Tables::default()
        };
        assert_eq!(t.add(big), Err(TablesError::TooManyBytes { max: 1000 }));
        let mut t = TablesIn::new(1, 1000);
        let timers = Tables {
            timers: vec![TimerWire {
                after_us: 1,
                msg: vec![0; 2000],
            }],
            ..Tables::default()
        };
        assert_eq!(t.add(timers), Err(TablesError::TooManyBytes { max: 1000 }));
        let mut t = TablesIn::new(1, usize::MAX);
        t.add(Tables::default()).expect("one announced");
        assert_eq!(
            t.add(Tables::default()),
            Err(TablesError::TooManyFrames { announced: 1 })
        );
        let mut t = TablesIn::new(1, usize::MAX);
        let many = Tables {
            windows: (0..=SENDERS_MAX as u64)
                .map(|i| WindowWire {
                    from: sender(i),
                    next: 1,
                    early: vec![],
                    skipped: vec![],
                    taken: 0,
                })
                .collect(),
            ..Tables::default()
        };
        assert_eq!(
            t.add(many),
            Err(TablesError::TooManySenders { max: SENDERS_MAX })
        );
    }
}
