//! Any bytes as a stream, cut into pieces by its first byte: the splitter gives frames no
//! larger than its limit or an error, and holds no more than a frame and a piece.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::wire::{decode, FrameReader, FRAME_HEADER_BYTES};

const LIMIT: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece).max(1);
    let mut r = FrameReader::new(LIMIT);
    for chunk in stream.chunks(piece) {
        r.push(chunk);
        loop {
            match r.next_frame() {
                Ok(Some(body)) => {
                    assert!(body.len() <= LIMIT);
                    let _ = decode(body);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(r.buffered() <= LIMIT + FRAME_HEADER_BYTES + piece);
    }
    let _ = r.finish();
});
