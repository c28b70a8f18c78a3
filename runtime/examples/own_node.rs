//! One device of your own app as its own process: `cargo run --example own_node -- tv.toml`.
//! The node file names the node, its address, capabilities, peers and certificates (see
//! `tern::runner`); `tern ps`, `tern migrate` and `tern drain` then drive it like any node.

use serde::{Deserialize, Serialize};
use tern::{Ctx, Service};

/// The app's own kind: a note board that keeps what it is told.
#[derive(Default, Serialize, Deserialize)]
struct Board {
    notes: Vec<String>,
}

#[derive(Serialize, Deserialize)]
enum BoardMsg {
    Note(String),
}

impl Service for Board {
    type Msg = BoardMsg;
    const KIND: &'static str = "board";
    const VERSION: u32 = 1;
    const REQUIRES: &'static [&'static str] = &["display"];

    async fn handle(&mut self, msg: BoardMsg, _ctx: &mut Ctx<Self>) {
        match msg {
            BoardMsg::Note(n) => self.notes.push(n),
        }
    }
}

fn main() -> Result<(), tern::Error> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: own_node NODE_FILE.toml");
        std::process::exit(2);
    };
    tern::runner::run(path.as_ref(), |node| {
        node.register::<Board>();
    })
}
