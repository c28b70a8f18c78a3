//! Integration tests over real QUIC on loopback. One test binary, one module per subject.

mod admin;
mod books;
mod browser;
mod common;
mod crashes;
mod decisions;
mod demo;
mod faults;
mod frames;
mod hostile;
mod layers;
mod limits;
mod liveness;
mod mailbox;
mod messaging;
mod migration;
mod pairing;
mod panics;
mod placement;
mod precopy;
mod replicas;
mod revocation;
mod sim;
mod timers;
mod tls;
mod trees;
