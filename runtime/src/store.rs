//! (node layer) Local durability: with a data directory set ([`NodeConfig::data_dir`]), the
//! latest checkpoint of each replicated service the node runs (`tern_proto::replica::Stored`)
//! and the node's votes, in one redb file, `tern.redb`.
//!
//! - Checkpoints are written by one writer thread, a batch per transaction (the newest record
//!   of each service replaces any older one still waiting), each commit durable when it
//!   returns: a service's runner never waits for the disk.
//! - A record is removed durably before its service leaves (a move's freeze, a stop, a copy
//!   retiring), and a vote is written durably before it is sent: both go straight to the file,
//!   in order with the writer's batches, so a removed record is never written back by a batch
//!   that was waiting.
//! - The file is opened with redb's integrity check: a damaged or cut file fails the node's
//!   start with an error naming it; a record that does not decode is left out with an event,
//!   never resumed.
//!
//! [`NodeConfig::data_dir`]: crate::NodeConfig::data_dir

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tern_proto::ids::{IdMap, NodeName, ServiceId};
use tern_proto::replica::Stored;

use crate::error::Error;
use crate::sync::lock;

/// Checkpoints: service id (its two halves) to an encoded [`Stored`].
const CHECKPOINTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("checkpoints");
/// Votes: service id to the newest epoch granted and to whom (MessagePack).
const BALLOTS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("ballots");
/// The node's own numbers that must grow across its lives (`term_base`).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The file in the data directory.
pub const STORE_FILE: &str = "tern.redb";

/// Page cache the store may use.
const CACHE_BYTES: usize = 16 << 20;

/// What a store held when it was opened.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// Checkpoints of services this node ran.
    pub checkpoints: Vec<(ServiceId, Stored)>,
    /// Votes this node gave: service, epoch, holder.
    pub ballots: Vec<(ServiceId, u64, NodeName)>,
    /// Records that do not decode: left out, never resumed.
    pub unreadable: Vec<String>,
}

/// Waiting writes and the writer's state.
#[derive(Default)]
struct Queue {
    /// The newest encoded record of each service not written yet, with its checkpoint number.
    puts: IdMap<(u64, Vec<u8>)>,
    /// Per service, the number of the newest checkpoint written durably.
    durable: IdMap<u64>,
    /// Puts queued so far.
    queued: u64,
    /// Of those, how many were queued when the batch being written was taken.
    taken: u64,
    /// Of those, how many were queued when the last batch written was taken.
    written: u64,
    /// A batch is being written.
    busy: bool,
    closed: bool,
    /// Errors not yet reported as events (at most [`ERRORS_KEPT`]).
    errors: Vec<String>,
}

/// Write errors kept for the node to report.
const ERRORS_KEPT: usize = 16;

/// Called by the writer after each batch it wrote.
type OnWritten = Box<dyn Fn() + Send + Sync>;

struct Inner {
    path: PathBuf,
    on_written: Mutex<Option<OnWritten>>,
    db: Mutex<Option<Arc<redb::Database>>>,
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Held while a batch or a direct write goes to the file: writes land in the order taken.
    order: Mutex<()>,
}

/// A node's store (see the module's documentation).
pub(crate) struct Store {
    inner: Arc<Inner>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn key(id: ServiceId) -> (u64, u64) {
    (id.prefix(), id.counter())
}

fn store_error(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::Store {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

impl Store {
    /// Opens (or creates) the store in `dir` and reads what it holds.
    pub fn open(dir: &Path) -> Result<(Store, Loaded), Error> {
        std::fs::create_dir_all(dir).map_err(|cause| Error::Io {
            what: format!("creating data directory {}", dir.display()),
            cause,
        })?;
        let path = dir.join(STORE_FILE);
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .create(&path)
            .map_err(|e| store_error(&path, format!("cannot be opened: {e}")))?;
        // The tables exist from the first open on, so a read finds them.
        let txn = db.begin_write().map_err(|e| store_error(&path, e))?;
        txn.open_table(CHECKPOINTS)
            .map_err(|e| store_error(&path, e))?;
        txn.open_table(BALLOTS).map_err(|e| store_error(&path, e))?;
        txn.open_table(META).map_err(|e| store_error(&path, e))?;
        txn.commit().map_err(|e| store_error(&path, e))?;
        let loaded = read_all(&db).map_err(|e| store_error(&path, e))?;
        let inner = Arc::new(Inner {
            path,
            on_written: Mutex::new(None),
            db: Mutex::new(Some(Arc::new(db))),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            order: Mutex::new(()),
        });
        let writer = {
            let inner = inner.clone();
            crate::trace::spawn("tern-store".into(), move || write_loop(&inner)).map_err(
                |cause| Error::Io {
                    what: "starting the store's writer".into(),
                    cause,
                },
            )?
        };
        Ok((
            Store {
                inner,
                writer: Mutex::new(Some(writer)),
            },
            loaded,
        ))
    }

    /// Sets what the writer calls after each batch it wrote (the node confirms what waited
    /// for it).
    pub fn on_written(&self, f: impl Fn() + Send + Sync + 'static) {
        *lock(&self.inner.on_written) = Some(Box::new(f));
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Queues `record` as the newest checkpoint of `id` (written by the next batch).
    pub fn put(&self, id: ServiceId, record: &Stored) {
        match record.encode() {
            Ok(bytes) => {
                let mut q = lock(&self.inner.queue);
                if q.closed {
                    return;
                }
                q.puts.insert(id, (record.no, bytes));
                q.queued += 1;
                self.inner.wake.notify_all();
            }
            Err(e) => self
                .inner
                .error(format!("checkpoint of {id} not encoded: {e}")),
        }
    }

    /// Removes `id`'s checkpoint, durably, before returning (a waiting one is dropped).
    pub fn forget(&self, id: ServiceId) -> Result<(), String> {
        let _order = lock(&self.inner.order);
        {
            let mut q = lock(&self.inner.queue);
            q.puts.remove(&id);
            q.durable.remove(&id);
        }
        // A move removes the record at its freeze, and the service's leaving asks again: no
        // second durable commit (an fsync) for a record that is not there.
        if !self.inner.holds(id)? {
            return Ok(());
        }
        self.inner.write(|txn| {
            txn.open_table(CHECKPOINTS)?.remove(key(id))?;
            Ok(())
        })
    }

    /// Records, durably, that this node granted `service` at `epoch` to `holder`.
    pub fn grant(&self, service: ServiceId, epoch: u64, holder: &NodeName) -> Result<(), String> {
        let value = rmp_serde::to_vec(&(epoch, holder)).map_err(|e| e.to_string())?;
        let _order = lock(&self.inner.order);
        self.inner.write(|txn| {
            txn.open_table(BALLOTS)?
                .insert(key(service), value.as_slice())?;
            Ok(())
        })
    }

    /// The first grantor term of this life: above every term a former life on this directory
    /// used (`2^32` past the last base, which no life's supersedes reach), and at least
    /// `at_least` (the clock's reading, for a directory new to a node that ran before).
    pub fn next_term_base(&self, at_least: u64) -> Result<u64, String> {
        let _order = lock(&self.inner.order);
        let db = lock(&self.inner.db).clone().ok_or("the store is closed")?;
        let last = (|| -> Result<Option<u64>, redb::Error> {
            let txn = db.begin_read()?;
            let t = txn.open_table(META)?;
            let last = t.get("term_base")?.map(|v| v.value());
            Ok(last)
        })()
        .map_err(|e| e.to_string())?;
        let base = last.map_or(at_least, |l| at_least.max(l.saturating_add(1 << 32)));
        self.inner.write(|txn| {
            txn.open_table(META)?.insert("term_base", base)?;
            Ok(())
        })?;
        Ok(base)
    }

    /// Waits until every checkpoint queued before the call is written (or failed, or
    /// forgotten).
    pub fn flush(&self) {
        let mut q = lock(&self.inner.queue);
        let target = q.queued;
        while (q.busy || !q.puts.is_empty()) && !q.closed && q.written < target {
            q = self
                .inner
                .wake
                .wait(q)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// What the file holds now: each service's stored epoch and checkpoint number.
    pub fn stored(&self) -> Result<Vec<(ServiceId, u64, u64)>, String> {
        let db = lock(&self.inner.db).clone().ok_or("the store is closed")?;
        let loaded = read_all(&db).map_err(|e| e.to_string())?;
        Ok(loaded
            .checkpoints
            .into_iter()
            .map(|(id, s)| (id, s.epoch, s.no))
            .collect())
    }

    /// The number of `id`'s newest checkpoint written durably, if any.
    pub fn durable(&self, id: ServiceId) -> Option<u64> {
        lock(&self.inner.queue).durable.get(&id).copied()
    }

    /// Write errors since the last call.
    pub fn take_errors(&self) -> Vec<String> {
        std::mem::take(&mut lock(&self.inner.queue).errors)
    }

    /// Closes the store: `flush` first, or drop what waits (a node that halts, as a device
    /// losing power, writes nothing more). The file is free for another open once this
    /// returns.
    pub fn close(&self, flush: bool) {
        if flush {
            self.flush();
        }
        {
            let mut q = lock(&self.inner.queue);
            q.closed = true;
            q.puts = IdMap::default();
            self.inner.wake.notify_all();
        }
        if let Some(w) = lock(&self.writer).take() {
            let _ = w.join();
        }
        lock(&self.inner.db).take();
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close(true);
    }
}

impl Inner {
    fn error(&self, e: String) {
        let mut q = lock(&self.queue);
        if q.errors.len() < ERRORS_KEPT {
            q.errors.push(e);
        }
    }

    /// True when the file holds a checkpoint of `id` (a read: no commit).
    fn holds(&self, id: ServiceId) -> Result<bool, String> {
        let db = lock(&self.db).clone().ok_or("the store is closed")?;
        let read = || -> Result<bool, redb::Error> {
            let txn = db.begin_read()?;
            let held = txn.open_table(CHECKPOINTS)?.get(key(id))?.is_some();
            Ok(held)
        };
        read().map_err(|e| format!("{}: {e}", self.path.display()))
    }

    /// One durable write transaction (the caller holds `order`).
    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), String> {
        let db = lock(&self.db).clone().ok_or("the store is closed")?;
        let run = || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            f(&txn)?;
            txn.commit()?;
            Ok(())
        };
        run().map_err(|e| format!("{}: {e}", self.path.display()))
    }
}

/// The writer thread: one transaction per batch of waiting checkpoints.
fn write_loop(inner: &Inner) {
    loop {
        let _order;
        let batch = {
            let mut q = lock(&inner.queue);
            while q.puts.is_empty() && !q.closed {
                q = inner
                    .wake
                    .wait(q)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if q.closed {
                return;
            }
            // Taken under `order` (queue lock released first: `forget` takes them the other
            // way round).
            drop(q);
            _order = lock(&inner.order);
            let mut q = lock(&inner.queue);
            q.busy = true;
            q.taken = q.queued;
            std::mem::take(&mut q.puts)
        };
        let result = inner.write(|txn| {
            let mut t = txn.open_table(CHECKPOINTS)?;
            for (id, (_, bytes)) in batch.iter() {
                t.insert(key(*id), bytes.as_slice())?;
            }
            Ok(())
        });
        let mut q = lock(&inner.queue);
        match result {
            Ok(()) => {
                for (id, (no, _)) in batch.iter() {
                    q.durable.insert(*id, *no);
                }
            }
            Err(e) => {
                drop(q);
                inner.error(format!("checkpoints not written: {e}"));
                q = lock(&inner.queue);
            }
        }
        q.busy = false;
        q.written = q.taken;
        inner.wake.notify_all();
        drop(q);
        if let Some(f) = lock(&inner.on_written).as_ref() {
            f();
        }
    }
}

/// Everything the file holds.
fn read_all(db: &redb::Database) -> Result<Loaded, redb::Error> {
    let mut out = Loaded::default();
    let txn = db.begin_read()?;
    for row in txn.open_table(CHECKPOINTS)?.iter()? {
        let (k, v) = row?;
        let (hi, lo) = k.value();
        let id = ServiceId::from_parts(hi, lo);
        match Stored::decode(v.value()) {
            Ok(s) => out.checkpoints.push((id, s)),
            Err(e) => out.unreadable.push(format!("checkpoint of {id}: {e}")),
        }
    }
    for row in txn.open_table(BALLOTS)?.iter()? {
        let (k, v) = row?;
        let (hi, lo) = k.value();
        let id = ServiceId::from_parts(hi, lo);
        match rmp_serde::from_slice::<(u64, NodeName)>(v.value()) {
            Ok((epoch, holder)) => out.ballots.push((id, epoch, holder)),
            Err(e) => out.unreadable.push(format!("vote on {id}: {e}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_proto::ids::KindKey;
    use tern_proto::replica::CheckpointBody;

    fn dir(what: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tern-store-{what}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn record(epoch: u64, no: u64) -> Stored {
        let body = CheckpointBody {
            state: vec![7; 32],
            timers: Vec::new(),
            send_seqs: Vec::new(),
            taken: vec![(ServiceId::from_parts(9, 9), no)],
            book: Vec::new(),
            replies: Vec::new(),
            outputs: Vec::new(),
        };
        Stored {
            format: Stored::FORMAT,
            kind: KindKey::new("k", 1),
            epoch,
            no,
            voters: vec![NodeName::new("a")],
            body: rmp_serde::to_vec(&body).expect("encodes"),
        }
    }

    #[test]
    fn checkpoints_and_votes_survive_a_reopen_and_a_forgotten_one_stays_gone() {
        let d = dir("reopen");
        let (s1, s2) = (ServiceId::from_parts(1, 1), ServiceId::from_parts(1, 2));
        {
            let (store, loaded) = Store::open(&d).expect("opens");
            assert!(loaded.checkpoints.is_empty() && loaded.ballots.is_empty());
            store.put(s1, &record(0, 1));
            store.put(s1, &record(0, 2));
            store.put(s2, &record(3, 1));
            store.flush();
            assert_eq!((store.durable(s1), store.durable(s2)), (Some(2), Some(1)));
            store.forget(s2).expect("forgets");
            // A record queued and forgotten before its batch is never written.
            store.put(s2, &record(3, 2));
            store.forget(s2).expect("forgets");
            store.grant(s2, 4, &NodeName::new("b")).expect("grants");
            store.flush();
            assert_eq!(store.durable(s2), None);
            assert_eq!(store.stored().expect("reads"), vec![(s1, 0, 2)]);
            store.close(true);
        }
        let (store, loaded) = Store::open(&d).expect("opens again");
        assert_eq!(loaded.checkpoints, vec![(s1, record(0, 2))]);
        assert_eq!(loaded.ballots, vec![(s2, 4, NodeName::new("b"))]);
        assert!(loaded.unreadable.is_empty());
        drop(store);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn each_life_numbers_its_terms_above_the_last_even_if_the_clock_went_back() {
        let d = dir("terms");
        let first = {
            let (store, _) = Store::open(&d).expect("opens");
            store.next_term_base(1_000_000).expect("base")
        };
        assert_eq!(first, 1_000_000);
        let (store, _) = Store::open(&d).expect("opens again");
        // The clock went back: the base still grows.
        let second = store.next_term_base(5).expect("base");
        assert_eq!(second, 1_000_000 + (1 << 32));
        drop(store);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_damaged_or_cut_file_fails_the_open_with_its_name() {
        // Not a store at all.
        let d = dir("garbage");
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::write(d.join(STORE_FILE), vec![0x5a; 10_000]).expect("write");
        let e = Store::open(&d).err().expect("refused").to_string();
        assert!(e.contains("Not a redb database"), "{e}");
        assert!(e.contains(STORE_FILE), "{e}");
        let _ = std::fs::remove_dir_all(&d);

        // A real store, cut in half.
        let d = dir("cut");
        {
            let (store, _) = Store::open(&d).expect("opens");
            for i in 0..200 {
                store.put(ServiceId::from_parts(2, i), &record(1, i));
            }
            store.close(true);
        }
        let file = d.join(STORE_FILE);
        let len = std::fs::metadata(&file).expect("file").len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .expect("open");
        f.set_len(len / 2).expect("cut");
        drop(f);
        match Store::open(&d) {
            Err(e) => assert!(e.to_string().contains("truncated"), "{e}"),
            Ok((_, loaded)) => panic!(
                "a cut store opened with {} checkpoints",
                loaded.checkpoints.len()
            ),
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_record_that_does_not_decode_is_left_out_and_named() {
        let d = dir("record");
        let id = ServiceId::from_parts(3, 3);
        {
            let (store, _) = Store::open(&d).expect("opens");
            let _order = lock(&store.inner.order);
            store
                .inner
                .write(|txn| {
                    txn.open_table(CHECKPOINTS)?
                        .insert(key(id), [0xc1u8, 0x00].as_slice())?;
                    Ok(())
                })
                .expect("writes");
        }
        let (_store, loaded) = Store::open(&d).expect("opens");
        assert!(loaded.checkpoints.is_empty());
        assert_eq!(loaded.unreadable.len(), 1, "{:?}", loaded.unreadable);
        assert!(loaded.unreadable[0].contains(&id.to_string()));
        let _ = std::fs::remove_dir_all(&d);
    }
}
