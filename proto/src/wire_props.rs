//! Property tests of everything a peer can send: the frame splitter, the frame decoder (data,
//! control and migration frames) and the snapshot header. Whatever the bytes, decoding gives a
//! frame or an error, never a panic, and never makes room for more than the input can fill.
//!
//! The largest single allocation is measured by a counting allocator that only this test
//! binary (the library's unit tests) uses, per thread, while a decode runs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;

use crate::ids::{KindKey, NodeName, ServiceAddr, ServiceId};
use crate::wire::{
    self, encode_frame, CarriedMsg, Frame, FrameReader, MigMsg, SnapHeader, TimerWire,
    TraceContext, WindowWire,
};

struct Counting;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; the bookkeeping touches only
// const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(bytes: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(bytes)));
        }
    });
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the largest single allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let out = f();
    TRACKING.with(|t| t.set(false));
    (out, LARGEST.with(|l| l.get()))
}

/// What a decode may set aside for `input` bytes: serde never reserves more than about 1 MiB
/// for a sequence on the strength of its announced length, and everything else is filled from
/// the input.
fn allocation_bound(input: usize) -> usize {
    (1 << 20) + 64 * input
}

const FRAME_MAX: usize = 64 << 10;

fn service() -> impl Strategy<Value = ServiceId> {
    (any::<u64>(), any::<u64>()).prop_map(|(a, b)| ServiceId::from_parts(a, b))
}

fn name() -> impl Strategy<Value = NodeName> {
    "[a-z]{1,8}".prop_map(|s| NodeName::new(&s))
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

fn carried() -> impl Strategy<Value = CarriedMsg> {
    (
        proptest::option::of(service()),
        any::<u64>(),
        proptest::option::of((name(), any::<u64>())),
        proptest::option::of(name()),
        bytes(64),
    )
        .prop_map(|(from, seq, ask, origin, msg)| CarriedMsg {
            from,
            seq,
            ask,
            origin,
            msg,
        })
}

fn header() -> impl Strategy<Value = SnapHeader> {
    (
        (
            any::<u64>(),
            service(),
            "[a-z-]{1,12}",
            any::<u32>(),
            any::<u64>(),
        ),
        (proptest::option::of(service()), any::<u64>(), any::<u64>()),
        proptest::collection::vec((any::<u64>(), bytes(16)), 0..3),
        proptest::collection::vec((service(), any::<u64>()), 0..3),
        proptest::collection::vec(
            (
                service(),
                any::<u64>(),
                proptest::collection::vec(carried(), 0..2),
            ),
            0..2,
        ),
        proptest::collection::vec(("[a-z]{1,6}", service(), name()), 0..3),
    )
        .prop_map(
            |(
                (mig, id, kind, version, epoch),
                (parent, state_bytes, n),
                timers,
                seqs,
                wins,
                book,
            )| {
                SnapHeader {
                    mig,
                    id,
                    kind: KindKey::new(&kind, version),
                    epoch,
                    parent,
                    state_bytes,
                    carried: n,
                    timers: timers
                        .into_iter()
                        .map(|(after_us, msg)| TimerWire { after_us, msg })
                        .collect(),
                    send_seqs: seqs,
                    tables: n as u32,
                    windows: wins
                        .into_iter()
                        .map(|(from, next, early)| WindowWire {
                            from,
                            next,
                            early,
                            skipped: vec![next.wrapping_add(1)],
                            taken: next.wrapping_sub(1),
                        })
                        .collect(),
                    book: book
                        .into_iter()
                        .map(|(role, id, node)| {
                            (
                                role,
                                ServiceAddr {
                                    id,
                                    kind: KindKey::new("k", 1),
                                    node,
                                },
                            )
                        })
                        .collect(),
                    custody: vec![NodeName::new("a"), NodeName::new("b")],
                    held: true,
                    forced: false,
                    names: vec!["board".into()],
                    replies: vec![crate::wire::KeptReply {
                        from: ServiceId::from_parts(3, 4),
                        seq: state_bytes,
                        value: vec![0x91, 0x07],
                    }],
                    outputs: vec![crate::wire::KeptOutput {
                        to: ServiceId::from_parts(5, 6),
                        seq: state_bytes + 1,
                        msg: vec![0x92, 0x01, 0x02],
                    }],
                    precopied: n % 2 == 0,
                    trace: (n % 3 == 0).then_some(TraceContext {
                        trace_id: [n as u8; 16],
                        span_id: [7; 8],
                        flags: 1,
                    }),
                }
            },
        )
}

fn mig_msg() -> impl Strategy<Value = MigMsg> {
    prop_oneof![
        (name(), any::<u64>()).prop_map(|(source, n)| MigMsg::Prepared { source, n }),
        (name(), any::<u64>(), "[ -~]{0,40}").prop_map(|(source, n, reason)| MigMsg::Refused {
            source,
            n,
            reason
        }),
        (name(), any::<u64>()).prop_map(|(source, n)| MigMsg::Commit { source, n }),
        (name(), any::<u64>()).prop_map(|(source, n)| MigMsg::CommitAck { source, n }),
        (name(), any::<u64>()).prop_map(|(source, n)| MigMsg::Abort { source, n }),
        (name(), any::<u64>()).prop_map(|(source, n)| MigMsg::Query { source, n }),
        (service(), name(), any::<u64>()).prop_map(|(service, node, epoch)| MigMsg::Located {
            service,
            node,
            epoch
        }),
        (service(), name(), any::<u64>()).prop_map(|(service, node, epoch)| MigMsg::Moved {
            service,
            node,
            epoch
        }),
        (any::<u64>(), service(), name(), any::<[bool; 3]>()).prop_map(
            |(req, service, to, [drain, force, hold])| MigMsg::Request {
                req,
                service,
                to,
                drain,
                force,
                hold,
                spare_held: !hold,
            }
        ),
        (any::<u64>(), "[a-z-]{1,12}", any::<u32>(), any::<bool>()).prop_map(
            |(req, kind, version, forced)| MigMsg::CanTake {
                req,
                kind: KindKey::new(&kind, version),
                forced,
            }
        ),
        (name(), any::<u64>(), any::<u64>()).prop_map(|(source, n, after_start_us)| {
            MigMsg::Serving {
                source,
                n,
                after_start_us,
            }
        }),
    ]
}

/// An owned frame of the kinds a peer sends after the handshake.
#[derive(Debug, Clone)]
enum Owned {
    Deliver(
        ServiceId,
        Option<ServiceId>,
        u64,
        Option<u64>,
        bool,
        Vec<u8>,
    ),
    Forward(ServiceId, NodeName, bool, bool, CarriedMsg),
    Skipped(ServiceId, ServiceId, u64, u8),
    Fence(ServiceId, u64),
    Handled(Vec<(ServiceId, ServiceId, u64)>),
    Gap(ServiceId, ServiceId, u64),
    Closed(ServiceId, ServiceId, u64, u8),
    Revocations(Vec<u8>),
    WhoSpeaks(ServiceId),
    Speaker(ServiceId, crate::speakers::SpeakerAnswer, bool),
    Mig(MigMsg),
    Begin(SnapHeader),
    State(Vec<u8>),
    Carried(Vec<CarriedMsg>),
    Leftovers(Vec<CarriedMsg>, Vec<(ServiceId, u64)>),
    End,
    PreBegin(u64, ServiceId, KindKey),
    PreState(Vec<u8>),
    PreApplied(u64, ServiceId, u64),
}

impl Owned {
    fn frame(&self) -> Frame<'_> {
        match self {
            Owned::Deliver(to, from, seq, ask, wait, msg) => Frame::Deliver {
                to: *to,
                from: *from,
                seq: *seq,
                ask: *ask,
                wait: *wait,
                msg,
            },
            Owned::Forward(to, origin, wait, accepted, msg) => Frame::Forward {
                to: *to,
                origin: origin.clone(),
                wait: *wait,
                accepted: *accepted,
                msg: msg.clone(),
            },
            Owned::Skipped(to, from, seq, hops) => Frame::Skipped {
                to: *to,
                from: *from,
                seq: *seq,
                hops: *hops,
            },
            Owned::Fence(service, epoch) => Frame::Fence {
                service: *service,
                epoch: *epoch,
            },
            Owned::Handled(marks) => Frame::Handled {
                marks: marks.clone(),
            },
            Owned::Gap(to, from, through) => Frame::Gap {
                to: *to,
                from: *from,
                through: *through,
            },
            Owned::Closed(to, from, last, hops) => Frame::Closed {
                to: *to,
                from: *from,
                last: *last,
                hops: *hops,
            },
            Owned::Mig(m) => Frame::Mig(m.clone()),
            Owned::Begin(h) => Frame::SnapBegin(Box::new(h.clone())),
            Owned::State(b) => Frame::SnapState { bytes: b },
            Owned::Carried(msgs) => Frame::SnapCarried { msgs: msgs.clone() },
            Owned::Leftovers(msgs, skipped) => Frame::SnapLeftovers {
                msgs: msgs.clone(),
                skipped: skipped.clone(),
            },
            Owned::End => Frame::SnapEnd,
            Owned::PreBegin(mig, id, kind) => Frame::PreBegin {
                mig: *mig,
                id: *id,
                kind: kind.clone(),
            },
            Owned::PreState(b) => Frame::PreState { bytes: b },
            Owned::PreApplied(mig, id, bytes) => Frame::PreApplied {
                mig: *mig,
                id: *id,
                bytes: *bytes,
            },
            Owned::Revocations(b) => Frame::Revocations { crl: b },
            Owned::WhoSpeaks(sender) => Frame::WhoSpeaks { sender: *sender },
            Owned::Speaker(sender, answer, asked) => Frame::Speaker {
                sender: *sender,
                answer: answer.clone(),
                asked: *asked,
            },
        }
    }
}

fn owned() -> impl Strategy<Value = Owned> {
    prop_oneof![
        (
            service(),
            proptest::option::of(service()),
            any::<u64>(),
            proptest::option::of(any::<u64>()),
            any::<bool>(),
            bytes(64)
        )
            .prop_map(|(to, from, seq, ask, wait, msg)| Owned::Deliver(
                to, from, seq, ask, wait, msg
            )),
        (service(), name(), any::<bool>(), any::<bool>(), carried())
            .prop_map(|(to, o, w, a, m)| Owned::Forward(to, o, w, a, m)),
        (service(), service(), any::<u64>(), any::<u8>())
            .prop_map(|(t, f, s, h)| Owned::Skipped(t, f, s, h)),
        (service(), any::<u64>()).prop_map(|(s, e)| Owned::Fence(s, e)),
        proptest::collection::vec((service(), service(), any::<u64>()), 0..8)
            .prop_map(Owned::Handled),
        (service(), service(), any::<u64>()).prop_map(|(t, f, s)| Owned::Gap(t, f, s)),
        (service(), service(), any::<u64>(), any::<u8>())
            .prop_map(|(t, f, l, h)| Owned::Closed(t, f, l, h)),
        mig_msg().prop_map(Owned::Mig),
        header().prop_map(Owned::Begin),
        bytes(256).prop_map(Owned::State),
        bytes(256).prop_map(Owned::Revocations),
        service().prop_map(Owned::WhoSpeaks),
        (
            service(),
            prop_oneof![
                Just(crate::speakers::SpeakerAnswer::Here),
                Just(crate::speakers::SpeakerAnswer::Gone),
                Just(crate::speakers::SpeakerAnswer::Unknown),
                name().prop_map(crate::speakers::SpeakerAnswer::Moved),
            ],
            any::<bool>()
        )
            .prop_map(|(s, a, k)| Owned::Speaker(s, a, k)),
        proptest::collection::vec(carried(), 0..4).prop_map(Owned::Carried),
        (
            proptest::collection::vec(carried(), 0..3),
            proptest::collection::vec((service(), any::<u64>()), 0..3)
        )
            .prop_map(|(m, s)| Owned::Leftovers(m, s)),
        Just(Owned::End),
        (any::<u64>(), service(), "[a-z-]{1,12}", any::<u32>())
            .prop_map(|(m, s, k, v)| Owned::PreBegin(m, s, KindKey::new(&k, v))),
        bytes(256).prop_map(Owned::PreState),
        (any::<u64>(), service(), any::<u64>()).prop_map(|(m, s, b)| Owned::PreApplied(m, s, b)),
    ]
}

fn encoded(o: &Owned) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&mut out, &o.frame(), FRAME_MAX).expect("generated frames fit");
    out
}

/// A damage done to an encoded frame body.
#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Cut(usize),
    /// A MessagePack length marker announcing ~4 billion items or bytes, written at a place.
    HugeLength(usize, u8),
    Insert(usize, Vec<u8>),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, x)| Damage::Flip(at, x)),
        any::<usize>().prop_map(Damage::Cut),
        (
            any::<usize>(),
            prop_oneof![Just(0xc6u8), Just(0xdb), Just(0xdd), Just(0xdf)]
        )
            .prop_map(|(at, marker)| Damage::HugeLength(at, marker)),
        (any::<usize>(), bytes(8)).prop_map(|(at, b)| Damage::Insert(at, b)),
    ]
}

fn apply(body: &mut Vec<u8>, d: &Damage) {
    if body.is_empty() {
        return;
    }
    match d {
        Damage::Flip(at, x) => {
            let i = at % body.len();
            body[i] ^= x;
        }
        Damage::Cut(at) => body.truncate(at % body.len()),
        Damage::HugeLength(at, marker) => {
            let i = at % body.len();
            body.splice(i..i, [*marker, 0xff, 0xff, 0xff, 0xf0]);
        }
        Damage::Insert(at, b) => {
            let i = at % body.len();
            body.splice(i..i, b.iter().copied());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Any bytes at all: a frame or an error, and no more room made than the input can fill.
    #[test]
    fn decoding_arbitrary_bytes_never_panics_or_over_allocates(body in bytes(4096)) {
        let (res, largest) = largest_allocation(|| wire::decode(&body).map(|f| f.kind()));
        prop_assert!(largest <= allocation_bound(body.len()), "{largest} bytes for {} ({res:?})", body.len());
    }

    /// Every frame a peer may send reads back as itself.
    #[test]
    fn every_frame_kind_round_trips(o in owned()) {
        let bytes = encoded(&o);
        let mut r = FrameReader::new(FRAME_MAX);
        r.push(&bytes);
        let body = r.next_frame().expect("well formed").expect("complete");
        let back = wire::decode(body).expect("decodes");
        prop_assert_eq!(format!("{:?}", back), format!("{:?}", o.frame()));
        prop_assert_eq!(r.buffered(), 0);
    }

    /// Real frames, damaged: flipped bits, cut short, bytes inserted, and MessagePack markers
    /// announcing four billion elements or bytes. Still a frame or an error, within bounds.
    #[test]
    fn damaged_frames_give_errors_not_panics(o in owned(), hurts in proptest::collection::vec(damage(), 1..4)) {
        let frame = encoded(&o);
        let mut body = frame[wire::FRAME_HEADER_BYTES..].to_vec();
        for d in &hurts {
            apply(&mut body, d);
        }
        let (res, largest) = largest_allocation(|| wire::decode(&body).map(|f| f.kind()));
        prop_assert!(largest <= allocation_bound(body.len()), "{largest} bytes for {} ({res:?})", body.len());
    }

    /// A stream of frames and junk, cut into arbitrary pieces: the splitter gives back exactly
    /// the frames before the first bad header, refuses a header over the limit without making
    /// room for it, and never holds more than one frame plus one piece.
    #[test]
    fn the_splitter_holds_at_most_a_frame_and_a_piece(
        frames in proptest::collection::vec(owned(), 0..6),
        junk in bytes(64),
        cuts in proptest::collection::vec(1usize..700, 1..20),
    ) {
        let mut stream = Vec::new();
        for o in &frames {
            stream.extend(encoded(o));
        }
        stream.extend(&junk);
        let mut r = FrameReader::new(FRAME_MAX);
        let (mut at, mut seen, mut failed) = (0, 0, false);
        let mut cut = cuts.iter().cycle();
        while at < stream.len() && !failed {
            let n = (*cut.next().expect("cycle")).min(stream.len() - at);
            let piece = &stream[at..at + n];
            at += n;
            let (_, largest) = largest_allocation(|| r.push(piece));
            prop_assert!(largest <= 2 * (FRAME_MAX + wire::FRAME_HEADER_BYTES + n), "{largest}");
            loop {
                match r.next_frame() {
                    Ok(Some(body)) => {
                        prop_assert!(body.len() <= FRAME_MAX);
                        if seen < frames.len() {
                            prop_assert!(wire::decode(body).is_ok());
                        }
                        seen += 1;
                    }
                    Ok(None) => break,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            prop_assert!(r.buffered() <= FRAME_MAX + wire::FRAME_HEADER_BYTES + n);
        }
        prop_assert!(seen >= frames.len(), "{seen} of {} frames before the junk", frames.len());
    }
}

#[test]
fn a_four_gib_length_prefix_is_refused_from_five_bytes() {
    let mut r = FrameReader::new(FRAME_MAX);
    let ((), largest) =
        largest_allocation(|| r.push(&[0xff, 0xff, 0xff, 0xff, wire::WIRE_VERSION]));
    assert!(largest < 1024, "{largest}");
    assert!(matches!(
        r.next_frame(),
        Err(wire::WireError::TooLarge { .. })
    ));
}
