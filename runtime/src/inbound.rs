//! What the node does with the frames a peer sends: the transport hands each incoming
//! stream's frames to a [`Frames`] sink made here, and knows nothing of services. Data frames
//! go to mailboxes (a waiting sender's frame holds its stream until there is room), snapshot
//! frames to the migration driver, control frames to the subsystems they concern.

use std::sync::Arc;

use crate::error::DeliveryError;
use crate::mailbox::{Meta, Slot};
use crate::migrate::{self, SnapRecv};
use crate::node::{reply_from_wire, NodeShared};
use crate::precopy::PreIn;
use crate::senders::Claim;
use crate::sync::lock;
use crate::transport::{encode_scratch, Flow, PeerLink, StreamKind, StreamSink};
use tern_proto::ids::ServiceId;
use tern_proto::wire::{self, Frame, WireError};

/// One incoming stream's state: the last service it delivered to (a stopped service's closed
/// mailbox still answers `Stopped`, so the cache never hides a change), and the snapshot it
/// carries, once it turns out to carry one.
pub(crate) struct Frames {
    node: Arc<NodeShared>,
    link: Arc<PeerLink>,
    kind: StreamKind,
    target: Option<(ServiceId, Arc<dyn Slot>)>,
    snap: Option<SnapRecv>,
    /// What was copied ahead of a snapshot, once the stream turns out to carry it.
    pre: Option<PreIn>,
}

/// A sink for a new stream from `link`.
pub(crate) fn open_stream(
    node: &Arc<NodeShared>,
    link: &Arc<PeerLink>,
    kind: StreamKind,
) -> Box<dyn StreamSink> {
    Box::new(Frames {
        node: node.clone(),
        link: link.clone(),
        kind,
        target: None,
        snap: None,
        pre: None,
    })
}

impl StreamSink for Frames {
    fn frame(&mut self, body: &[u8], done: usize) -> Result<Flow, WireError> {
        handle_frame(
            &self.node,
            &self.link,
            (self.kind, body),
            &mut self.target,
            (&mut self.snap, &mut self.pre),
            done,
        )
    }

    fn carries_snapshot(&self) -> bool {
        self.snap.is_some() || self.pre.is_some()
    }

    fn due_by(&self) -> Option<std::time::Instant> {
        match &self.snap {
            Some(r) => r.state_due_by(),
            None => self.pre.as_ref().and_then(|p| p.due_by()),
        }
    }

    fn overdue(&mut self) {
        if self.snap.is_none() {
            if let Some(p) = self.pre.as_mut().filter(|p| p.due_by().is_some()) {
                let reason = "too slow: no snapshot after its pre-copy within \
                              precopy_deadline_ms and migration_deadline_ms"
                    .to_string();
                p.give_up(&self.node, &self.link.name, reason);
            }
            return;
        }
        migrate::snapshot_overdue(&self.node, &self.link.name, &mut self.snap);
    }

    fn ended(&mut self) {
        migrate::snapshot_stream_ended(&self.node, &self.link.name, &mut self.snap);
    }
}

/// Tells the sending node that a message was not accepted: a failed ask, or a `Refused` tell.
fn refuse_message(
    node: &NodeShared,
    link: &PeerLink,
    (to, from, seq, ask): (ServiceId, Option<ServiceId>, u64, Option<u64>),
    reason: DeliveryError,
) {
    node.stats.refused_from_peers.inc();
    tracing::debug!(peer = %link.name, %reason, "message refused");
    let answer = match ask {
        Some(ask) => Frame::Reply {
            ask,
            result: wire::ReplyBody::Refused(reason),
        },
        None => Frame::Refused {
            to,
            from,
            seq,
            reason,
        },
    };
    if let Err(e) = link.push_ctrl(&answer) {
        node.logs
            .event("refusal-lost", format!("to {}: {e}", link.name));
    }
}

/// Checks a claim about sender `from` in a frame for `to` (`crate::senders`): `None` to go
/// on, `Some(flow)` to hold the stream for an answer, or the refusal (already logged and
/// counted).
fn claim(
    node: &Arc<NodeShared>,
    link: &PeerLink,
    (to, from): (ServiceId, ServiceId),
    handed: bool,
    done: usize,
) -> Result<Option<Flow>, ()> {
    match node.sender_claim(&link.name, (to, from), handed, done) {
        Claim::Take => Ok(None),
        Claim::Hold(flow) => Ok(Some(flow)),
        Claim::Refuse(r) => {
            node.refuse_claim(&link.name, &r);
            Err(())
        }
    }
}

/// Holds the stream until `slot` has room, then goes on from message `done`.
fn until_room(slot: Arc<dyn Slot>, done: usize) -> Flow {
    Flow::Held {
        done,
        until: Box::pin(async move { slot.room().await }),
    }
}

/// Holds the stream until `slot`'s window for `from` has room, then goes on from `done`.
fn until_window_room(slot: Arc<dyn Slot>, done: usize, from: ServiceId) -> Flow {
    Flow::Held {
        done,
        until: Box::pin(async move { slot.window_room(from).await }),
    }
}

/// Where a waiting sender's message that could not go on right now must wait, if anywhere.
fn wait_for(
    node: &NodeShared,
    (to, from): (ServiceId, Option<ServiceId>),
    e: &DeliveryError,
    done: usize,
) -> Option<Flow> {
    match e {
        DeliveryError::MailboxFull { .. } => node.slot(to).map(|s| until_room(s, done)),
        DeliveryError::WindowFull { .. } => {
            let from = from?;
            node.slot(to).map(|s| until_window_room(s, done, from))
        }
        DeliveryError::Backpressure {
            node: at,
            bytes_max,
        } => node.links.get(at).map(|onward| {
            // Forwarded by a tombstone: the link onwards is full; wait for it to drain.
            let bytes = bytes_max / 2;
            Flow::Held {
                done,
                until: Box::pin(async move { onward.data_drained_to(bytes).await }),
            }
        }),
        _ => None,
    }
}

fn handle_frame(
    node: &Arc<NodeShared>,
    link: &Arc<PeerLink>,
    (kind, body): (StreamKind, &[u8]),
    target: &mut Option<(ServiceId, Arc<dyn Slot>)>,
    (snap, pre): (&mut Option<SnapRecv>, &mut Option<PreIn>),
    done: usize,
) -> Result<Flow, WireError> {
    let frame = wire::decode(body)?;
    match (kind, frame) {
        (_, f)
            if pre.is_some()
                && snap.is_none()
                && !matches!(f, Frame::PreState { .. } | Frame::SnapBegin(_)) =>
        {
            return Err(WireError::Unexpected {
                kind: f.kind(),
                stream: "pre-copy",
            })
        }
        (_, f)
            if snap.is_some()
                && !matches!(
                    f,
                    Frame::SnapTables(_)
                        | Frame::SnapState { .. }
                        | Frame::SnapCarried { .. }
                        | Frame::SnapLeftovers { .. }
                        | Frame::SnapEnd
                ) =>
        {
            return Err(WireError::Unexpected {
                kind: f.kind(),
                stream: "snapshot",
            })
        }
        (
            StreamKind::Data,
            f @ (Frame::SnapBegin(_)
            | Frame::SnapTables(_)
            | Frame::SnapState { .. }
            | Frame::SnapCarried { .. }
            | Frame::SnapLeftovers { .. }
            | Frame::SnapEnd),
        ) => {
            migrate::snapshot_frame(node, &link.name, (snap, pre), f)?;
        }
        (StreamKind::Data, f @ (Frame::PreBegin { .. } | Frame::PreState { .. })) => {
            let room = migrate::Room::from_peer(node, &link.name);
            crate::precopy::pre_frame(node, &link.name, pre, room, f)?;
        }
        (
            StreamKind::Data,
            Frame::Deliver {
                to,
                from,
                seq,
                ask,
                wait,
                msg,
            },
        ) => {
            if let Some(sender) = from {
                match claim(node, link, (to, sender), false, 0) {
                    Ok(None) => {}
                    Ok(Some(flow)) => return Ok(flow),
                    Err(()) => {
                        let reason = DeliveryError::NotSpeaker {
                            id: to,
                            sender,
                            node: link.name.clone(),
                        };
                        refuse_message(node, link, (to, from, seq, ask), reason);
                        return Ok(Flow::Done);
                    }
                }
            }
            match node.deliver_remote(
                target,
                &link.name,
                to,
                (
                    Meta {
                        from,
                        seq,
                        ask,
                        keep: false,
                    },
                    wait,
                ),
                msg,
            ) {
                Ok(()) => node.stats.received_remote.inc(),
                Err(reason) => match wait
                    .then(|| wait_for(node, (to, from), &reason, 0))
                    .flatten()
                {
                    Some(flow) => return Ok(flow),
                    None => refuse_message(node, link, (to, from, seq, ask), reason),
                },
            }
        }
        (
            StreamKind::Data,
            Frame::DeliverBatch {
                to,
                from,
                first_seq,
                wait,
                msgs,
            },
        ) => {
            if from.is_some() && first_seq.checked_add(msgs.len() as u64).is_none() {
                return Err(WireError::Malformed {
                    detail: format!("batch numbers run past {}", u64::MAX),
                });
            }
            if let Some(sender) = from {
                match claim(node, link, (to, sender), false, done) {
                    Ok(None) => {}
                    Ok(Some(flow)) => return Ok(flow),
                    Err(()) => {
                        for i in done..msgs.len() {
                            let reason = DeliveryError::NotSpeaker {
                                id: to,
                                sender,
                                node: link.name.clone(),
                            };
                            let seq = first_seq + i as u64;
                            refuse_message(node, link, (to, from, seq, None), reason);
                        }
                        return Ok(Flow::Done);
                    }
                }
            }
            let seq_of = |i: usize| {
                if from.is_some() {
                    first_seq + i as u64
                } else {
                    first_seq
                }
            };
            // One at a time through the forwarding path, when the service is not (or no
            // longer) here. A waiting sender's message that finds the mailbox full holds the
            // stream as usual.
            let one_by_one = |from_index: usize,
                              target: &mut Option<(ServiceId, Arc<dyn Slot>)>|
             -> Option<Flow> {
                for (i, m) in msgs.iter().enumerate().skip(from_index) {
                    let meta = Meta {
                        from,
                        seq: seq_of(i),
                        ask: None,
                        keep: false,
                    };
                    match node.deliver_remote(target, &link.name, to, (meta, wait), m) {
                        Ok(()) => node.stats.received_remote.inc(),
                        Err(reason) => match wait
                            .then(|| wait_for(node, (to, from), &reason, i))
                            .flatten()
                        {
                            Some(flow) => return Some(flow),
                            None => refuse_message(node, link, (to, from, seq_of(i), None), reason),
                        },
                    }
                }
                None
            };
            let slot = match node.cached_slot(target, to) {
                Ok(slot) => slot.clone(),
                Err(_) => {
                    return Ok(one_by_one(done, target).unwrap_or(Flow::Done));
                }
            };
            let mut next = done;
            while next < msgs.len() {
                let (stop, reason) =
                    slot.deliver_run((from, first_seq, &link.name), wait, &msgs, next);
                node.stats.received_remote.add((stop - next) as u64);
                match reason {
                    None => break,
                    Some(DeliveryError::MailboxFull { .. }) if wait => {
                        return Ok(until_room(slot, stop))
                    }
                    Some(DeliveryError::WindowFull { .. }) if wait && from.is_some() => {
                        let from = from.unwrap_or(to);
                        return Ok(until_window_room(slot, stop, from));
                    }
                    Some(DeliveryError::Moved { .. } | DeliveryError::Stopped { .. }) => {
                        *target = None;
                        return Ok(one_by_one(stop, target).unwrap_or(Flow::Done));
                    }
                    Some(reason) => {
                        // This one is refused; the rest may still fit (a bad message, or room
                        // freed meanwhile on another thread).
                        refuse_message(node, link, (to, from, seq_of(stop), None), reason);
                        next = stop + 1;
                    }
                }
            }
        }
        (
            StreamKind::Data,
            Frame::Forward {
                to,
                origin,
                wait,
                accepted,
                msg,
            },
        ) => {
            // Only a node that had the service hands on what reached it there.
            match claim(node, link, (to, msg.from.unwrap_or(to)), true, 0) {
                Ok(None) => {}
                Ok(Some(flow)) => return Ok(flow),
                Err(()) => return Ok(Flow::Done),
            }
            if let Err(reason) = migrate::on_forward(node, to, &origin, (accepted, wait), &msg) {
                match wait
                    .then(|| wait_for(node, (to, msg.from), &reason, 0))
                    .flatten()
                {
                    Some(flow) => return Ok(flow),
                    None => migrate::refuse_carried(node, to, &msg, reason),
                }
            }
        }
        (
            _,
            Frame::Skipped {
                to,
                from,
                seq,
                hops,
            },
        ) => match claim(node, link, (to, from), hops > 0, 0) {
            Ok(None) => migrate::on_skipped(node, to, from, (seq, hops)),
            Ok(Some(flow)) => return Ok(flow),
            Err(()) => {}
        },
        (StreamKind::Data, Frame::Fence { service, epoch }) => {
            node.driver.on_fence(node, &link.name, service, epoch);
        }
        (StreamKind::Data, Frame::Gap { to, from, through }) => {
            match claim(node, link, (to, from), false, 0) {
                Ok(None) => node.apply_gap(to, from, through),
                Ok(Some(flow)) => return Ok(flow),
                Err(()) => {}
            }
        }
        (
            StreamKind::Data,
            Frame::Closed {
                to,
                from,
                last,
                hops,
            },
        ) => match claim(node, link, (to, from), hops > 0, 0) {
            Ok(None) => node.apply_closed(to, from, last, hops),
            Ok(Some(flow)) => return Ok(flow),
            Err(()) => {}
        },
        (StreamKind::Control, Frame::PreApplied { mig, id, bytes }) => {
            node.driver.pre_applied(&link.name, mig, id, bytes);
        }
        (StreamKind::Control, Frame::Handled { marks }) => {
            // Only the marks the peer may give count, as traffic too.
            let taken: Vec<_> = marks
                .into_iter()
                .filter(|m| node.settle_from(&link.name, *m))
                .collect();
            // What local senders sent to services there: outgoing traffic.
            let mut traffic = lock(&node.traffic);
            for (to, from, seq) in taken {
                traffic.observe(from, to, seq);
            }
        }
        (StreamKind::Control, Frame::Revocations { crl }) => {
            if let Err(e) = node.install_revocations(crl, link.name.as_str()) {
                node.refuse_claim(
                    &link.name,
                    &tern_proto::claims::ClaimRefused {
                        claim: "revocations",
                        detail: e.to_string(),
                    },
                );
            }
        }
        (StreamKind::Control, Frame::WhoSpeaks { sender }) => {
            let answer = node.speaker_answer(sender);
            let reply = Frame::Speaker {
                sender,
                answer,
                asked: true,
            };
            if let Err(e) = link.push_ctrl(&reply) {
                node.logs
                    .event("speaker-answer-lost", format!("to {}: {e}", link.name));
            }
        }
        (
            StreamKind::Control,
            Frame::Speaker {
                sender,
                answer,
                asked,
            },
        ) => {
            if !asked {
                node.speaker_told(sender, &link.name, answer);
            } else if let Err(r) = node.speaker_answered(sender, &link.name, answer) {
                node.refuse_claim(&link.name, &r);
            }
        }
        (StreamKind::Control, Frame::Replica(msg)) => {
            node.on_replica(&link.name, msg);
        }
        (StreamKind::Control, Frame::Members { nodes }) => {
            node.on_members(&link.name, nodes);
        }
        (StreamKind::Control, Frame::Mig(msg)) => {
            migrate::on_control(node, link, msg);
        }
        (_, Frame::Reply { ask, result }) => {
            if !node.complete_ask(ask, reply_from_wire(result)) {
                node.logs.event(
                    "late-reply",
                    format!("from {}: ask {ask} is no longer waiting", link.name),
                );
            }
        }
        (
            _,
            Frame::Refused {
                to,
                from,
                seq,
                reason,
            },
        ) => {
            tracing::warn!(peer = %link.name, %to, ?from, seq, %reason, "message refused by peer");
            node.logs.event(
                "refused-by-peer",
                format!("{}: message {seq} to {to}: {reason}", link.name),
            );
            let waits = match (&reason, from) {
                (DeliveryError::UnknownService { node: at, .. }, Some(from)) => {
                    node.refusal_waits(to, from, seq, at, &reason, None)
                }
                _ => false,
            };
            if let (Some(from), false) = (from, waits) {
                node.record_loss(crate::LossReport {
                    service: to,
                    sender: from,
                    first_seq: seq,
                    last_seq: seq,
                    messages: 1,
                    node: link.name.clone(),
                    reason: reason.to_string(),
                });
                if let DeliveryError::UnknownService { node: at, .. } = &reason {
                    node.not_known_at(to, at);
                }
                // Wherever it was refused, its number must not hold up the live window.
                node.skip_refused(to, from, seq);
            }
            // Counted last: whoever sees the count finds the event and the loss report.
            node.stats.refused_by_peers.inc();
        }
        (StreamKind::Control, Frame::BookSync { edges }) => {
            for edge in edges {
                node.peer_book_change(&link.name, edge, true)
                    .map_err(|detail| WireError::Malformed { detail })?;
            }
        }
        (StreamKind::Control, Frame::BookChange { edge, added }) => {
            node.peer_book_change(&link.name, edge, added)
                .map_err(|detail| WireError::Malformed { detail })?;
        }
        (StreamKind::Control, Frame::Spawn { req, kind, state }) => {
            // A spawn brings a state of the peer's choosing, as a migration does.
            let policy = &node.limits.migration_peers;
            let allowed = tern_proto::claims::allowed("spawn", policy, &link.name).and_then(|()| {
                tern_proto::claims::kind_allowed(
                    &node.limits.kind_rules,
                    &kind.name,
                    tern_proto::claims::KindRight::Push,
                    &link.name,
                )
            });
            if let Err(refusal) = &allowed {
                node.refuse_claim(&link.name, refusal);
            }
            let result = match allowed
                .map_err(|r| r.detail)
                .and_then(|()| node.restore(&kind, state).map_err(|e| e.to_string()))
            {
                Ok(addr) => encode_scratch(&addr, |bytes| {
                    link.push_ctrl(&Frame::Reply {
                        ask: req,
                        result: wire::ReplyBody::Value(bytes),
                    })
                }),
                Err(e) => {
                    node.logs
                        .event("spawn-refused", format!("from {}: {e}", link.name));
                    link.push_ctrl(&Frame::Reply {
                        ask: req,
                        result: wire::ReplyBody::Failed(e),
                    })
                }
            };
            if let Err(e) = result {
                node.logs
                    .event("spawn-answer-lost", format!("to {}: {e}", link.name));
            }
        }
        (_, Frame::ProtocolError { code, detail }) => {
            node.stats.protocol_errors_reported.inc();
            tracing::warn!(peer = %link.name, code, %detail, "peer reported a protocol error");
            node.logs.event(
                "protocol-error-reported",
                format!("{} says ({code}): {detail}", link.name),
            );
        }
        (k, f) => {
            return Err(WireError::Unexpected {
                kind: f.kind(),
                stream: k.name(),
            })
        }
    }
    Ok(Flow::Done)
}
