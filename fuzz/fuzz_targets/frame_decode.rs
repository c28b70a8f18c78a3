//! Any bytes as a frame body: a frame or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Ok(frame) = tern_proto::wire::decode(body) {
        // Whatever decoded can be written back within the limit it came in under.
        let mut out = Vec::new();
        let _ = tern_proto::wire::encode_frame(&mut out, &frame, 16 << 20);
    }
});
