//! The tables of a snapshot: a service's receive windows and send counters, cut into
//! `SnapTables` frames by the source and put back together, within bounds, by the target.
//!
//! They do not travel in the header: a service that heard from many senders (up to
//! [`SENDERS_MAX`]) or sent to many receivers has tables far larger than one frame, and a
//! window holding early messages can alone be larger than one. The source cuts them by an
//! estimate of their encoded size that is never below it ([`tables_frames`]); a window cut in
//! two continues in the next entry with the same sender, which the target merges
//! ([`TablesIn`]).

use crate::ids::ServiceId;
use crate::inbox::{SENDERS_MAX, WINDOW_HELD_MAX};
use crate::wire::{CarriedMsg, WindowWire};

/// Send counters a snapshot may carry (receivers the service has sent to). A counter cannot be
/// dropped (the receiver's window expects the next number), so a snapshot with more is
/// refused by the target.
pub const SEND_SEQS_MAX: usize = 1 << 20;

/// Upper bound of an entry's encoded size without its early messages: an array header, a
/// service id (two u64), a u64 and two array headers.
const WINDOW_BYTES: usize = 48;
/// Upper bound of a send counter's encoded size.
const SEND_SEQ_BYTES: usize = 32;
/// Upper bound of a skipped number's encoded size.
const SKIPPED_BYTES: usize = 9;

/// Upper bound of a carried message's encoded size.
pub fn carried_bytes(m: &CarriedMsg) -> usize {
    let names = m.ask.as_ref().map_or(0, |(n, _)| n.as_str().len())
        + m.origin.as_ref().map_or(0, |n| n.as_str().len());
    64 + names + m.msg.len()
}

/// One `SnapTables` frame's content.
pub type TablesFrame = (Vec<WindowWire>, Vec<(ServiceId, u64)>);

/// Cuts windows and send counters into frames of at most about `budget_bytes` each (a single
/// early message larger than that goes alone). The frames carry every window and counter, in
/// order; a window's early messages may be split over consecutive entries of its sender.
pub fn tables_frames(
    windows: Vec<WindowWire>,
    send_seqs: Vec<(ServiceId, u64)>,
    budget_bytes: usize,
) -> Vec<TablesFrame> {
    let mut frames = Vec::new();
    let mut cur: TablesFrame = (Vec::new(), Vec::new());
    let mut used = 0usize;
    let flush = |cur: &mut TablesFrame, used: &mut usize, frames: &mut Vec<TablesFrame>| {
        if !cur.0.is_empty() || !cur.1.is_empty() {
            frames.push(std::mem::take(cur));
        }
        *used = 0;
    };
    for w in windows {
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
        };
        for m in w.early {
            let b = carried_bytes(&m);
            if used + b > budget_bytes && (!entry.early.is_empty() || !cur.0.is_empty()) {
                // The entry goes in this frame; the rest of its window continues in the next.
                cur.0.push(std::mem::replace(
                    &mut entry,
                    WindowWire {
                        from: w.from,
                        next: w.next,
                        early: Vec::new(),
                        skipped: Vec::new(),
                    },
                ));
                flush(&mut cur, &mut used, &mut frames);
                used = WINDOW_BYTES;
            }
            used += b;
            entry.early.push(m);
        }
        cur.0.push(entry);
    }
    for s in send_seqs {
        if used + SEND_SEQ_BYTES > budget_bytes {
            flush(&mut cur, &mut used, &mut frames);
        }
        used += SEND_SEQ_BYTES;
        cur.1.push(s);
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
    /// The early messages exceed the bytes the target allows.
    #[error("early messages exceed {max} bytes")]
    TooManyBytes {
        /// The target's bound.
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
    /// Windows so far; consecutive entries of one sender are merged.
    pub windows: Vec<WindowWire>,
    /// Send counters so far.
    pub send_seqs: Vec<(ServiceId, u64)>,
    left: u32,
    announced: u32,
    early_bytes: usize,
    early_bytes_max: usize,
}

impl TablesIn {
    /// Expects `frames` frames whose early messages add up to at most `early_bytes_max`.
    pub fn new(frames: u32, early_bytes_max: usize) -> Self {
        TablesIn {
            windows: Vec::new(),
            send_seqs: Vec::new(),
            left: frames,
            announced: frames,
            early_bytes: 0,
            early_bytes_max,
        }
    }

    /// True once every announced frame has arrived.
    pub fn is_complete(&self) -> bool {
        self.left == 0
    }

    /// Takes one frame.
    pub fn add(
        &mut self,
        windows: Vec<WindowWire>,
        send_seqs: Vec<(ServiceId, u64)>,
    ) -> Result<(), TablesError> {
        if self.left == 0 {
            return Err(TablesError::TooManyFrames {
                announced: self.announced,
            });
        }
        self.left -= 1;
        for w in windows {
            for m in &w.early {
                self.early_bytes += carried_bytes(m);
            }
            if self.early_bytes > self.early_bytes_max {
                return Err(TablesError::TooManyBytes {
                    max: self.early_bytes_max,
                });
            }
            match self.windows.last_mut() {
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
                    if self.windows.len() >= SENDERS_MAX {
                        return Err(TablesError::TooManySenders { max: SENDERS_MAX });
                    }
                    if w.early.len() > WINDOW_HELD_MAX || w.skipped.len() > 2 * WINDOW_HELD_MAX {
                        return Err(TablesError::WindowTooFull {
                            max: WINDOW_HELD_MAX,
                        });
                    }
                    self.windows.push(w);
                }
            }
        }
        if self.send_seqs.len() + send_seqs.len() > SEND_SEQS_MAX {
            return Err(TablesError::TooManySendSeqs { max: SEND_SEQS_MAX });
        }
        self.send_seqs.extend(send_seqs);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::NodeName;
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

    /// Every frame fits the bound, and what the target puts back together is what was cut.
    #[test]
    fn tables_cut_to_fit_a_frame_come_back_whole() {
        let frame_max = 4096;
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
            });
        }
        let send_seqs: Vec<_> = (0..700u64).map(|i| (sender(i), u64::MAX - i)).collect();
        let frames = tables_frames(windows.clone(), send_seqs.clone(), frame_max / 2);
        let mut input = TablesIn::new(frames.len() as u32, usize::MAX);
        for (w, s) in frames {
            let mut buf = Vec::new();
            encode_frame(
                &mut buf,
                &Frame::SnapTables {
                    windows: w,
                    send_seqs: s,
                },
                frame_max,
            )
            .expect("each frame fits");
            let mut reader = FrameReader::new(frame_max);
            reader.push(&buf);
            let body = reader.next_frame().expect("splits").expect("whole");
            let Frame::SnapTables { windows, send_seqs } = decode(body).expect("decodes") else {
                panic!("not a tables frame");
            };
            input.add(windows, send_seqs).expect("within bounds");
        }
        assert!(input.is_complete());
        assert_eq!(input.send_seqs, send_seqs);
        assert_eq!(input.windows.len(), windows.len());
        for (got, want) in input.windows.iter().zip(&windows) {
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
        assert_eq!(
            t.add(
                vec![WindowWire {
                    from,
                    next: 1,
                    early: vec![msg(from, 2, 2000)],
                    skipped: vec![],
                }],
                vec![],
            ),
            Err(TablesError::TooManyBytes { max: 1000 })
        );
        let mut t = TablesIn::new(1, usize::MAX);
        t.add(vec![], vec![]).expect("one announced");
        assert_eq!(
            t.add(vec![], vec![]),
            Err(TablesError::TooManyFrames { announced: 1 })
        );
        let mut t = TablesIn::new(1, usize::MAX);
        let many = (0..=SENDERS_MAX as u64)
            .map(|i| WindowWire {
                from: sender(i),
                next: 1,
                early: vec![],
                skipped: vec![],
            })
            .collect();
        assert_eq!(
            t.add(many, vec![]),
            Err(TablesError::TooManySenders { max: SENDERS_MAX })
        );
    }
}
