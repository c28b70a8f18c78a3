//! Any bytes as a migration control message or a snapshot header on their own (not only
//! inside a frame): a value or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::wire::{MigMsg, SnapHeader};

fuzz_target!(|data: &[u8]| {
    let _ = rmp_serde::from_slice::<MigMsg>(data);
    if let Ok(h) = rmp_serde::from_slice::<SnapHeader>(data) {
        // A decoded header re-encodes: nothing in it is half-built.
        let _ = rmp_serde::to_vec(&h);
    }
});
