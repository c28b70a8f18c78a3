//! Reusable migratable services for Tern.
//!
//! - [`KvStore`]: a bounded key-value store.
//! - [`SeqSink`]: records, per sender, the sequence numbers it sees and reports gaps,
//!   duplicates and reorderings. Migration and chaos tests use it as their referee.
//! - [`SeqSender`]: sends numbered messages to the sink in its book under `"sink"`.
//! - [`Chatter`]: pings the service in its book under `"peer"` at a steady rate.
//!
//! Each kind must be registered on every node that may run it:
//!
//! ```no_run
//! # fn f(node: &tern::NodeHandle) {
//! node.register::<tern_actors::KvStore>()
//!     .register::<tern_actors::SeqSink>()
//!     .register::<tern_actors::SeqSender>();
//! # }
//! ```

mod chatter;
mod kv;
mod seq;

pub use chatter::{Chatter, ChatterMsg};
pub use kv::{KvError, KvMsg, KvStore};
pub use seq::{SenderReport, SeqSender, SeqSenderMsg, SeqSink, SinkMsg, SinkReport, Verdict};

/// Registers every kind of this crate on `node`.
pub fn register_all(node: &tern::NodeHandle) {
    node.register::<KvStore>()
        .register::<SeqSink>()
        .register::<SeqSender>()
        .register::<Chatter>();
}
