//! The protocol core: pure state machines and tables with no I/O, no clock and no threads.
//! The node drives them; tests drive them directly.

pub mod directory;
pub mod migration;
pub mod placement;
pub mod seq;
pub mod traffic;
