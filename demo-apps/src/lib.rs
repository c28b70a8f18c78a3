//! Tern Media, the Tern demo: a media app whose services move between a phone, a tv, a car
//! and a watch while it plays.
//!
//! - [`media`]: the services (player, lyrics, playlist, remote, scrobbler) and the audit;
//! - [`next`]: the app's next version (version 2 of the player), for rolling updates;
//! - [`app`]: one running app: spawning, wiring, auditing;
//! - [`scenario`]: the scripted walk through the devices, in one process;
//! - [`device`]: one device as its own process, from a TOML file;
//! - [`timeline`]: how a run is printed;
//! - [`dashboard`]: the live dashboard (`--serve`).

pub mod app;
pub mod dashboard;
pub mod device;
pub mod media;
pub mod next;
pub mod scenario;
pub mod timeline;
