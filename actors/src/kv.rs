use serde::{Deserialize, Serialize};
use tern::{Ctx, Precopy, ReplyTo, Service, TrackedMap};

/// A key-value store holding at most `bytes_max` bytes of keys and values.
///
/// Its entries are a [`TrackedMap`]: when it moves, they travel while it still serves, and
/// its freeze carries only the entries written since they were sent ([`Precopy`]).
///
/// ```
/// let kv = tern_actors::KvStore::with_limit(1 << 20);
/// assert_eq!(kv.bytes(), 0);
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvStore {
    entries: TrackedMap<String, serde_bytes::ByteBuf>,
    bytes: usize,
    bytes_max: usize,
}

impl Default for KvStore {
    fn default() -> Self {
        KvStore::with_limit(64 << 20)
    }
}

impl KvStore {
    /// An empty store bounded to `bytes_max` bytes.
    pub fn with_limit(bytes_max: usize) -> Self {
        KvStore {
            entries: TrackedMap::new(),
            bytes: 0,
            bytes_max,
        }
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn put(&mut self, key: String, value: Vec<u8>) -> Result<Option<Vec<u8>>, KvError> {
        let old_bytes = self.entries.get(&key).map_or(0, |v| key.len() + v.len());
        let new_total = self.bytes - old_bytes + key.len() + value.len();
        if new_total > self.bytes_max {
            return Err(KvError::Full {
                bytes_max: self.bytes_max,
            });
        }
        self.bytes = new_total;
        Ok(self
            .entries
            .insert(key, serde_bytes::ByteBuf::from(value))
            .map(|v| v.into_vec()))
    }

    fn delete(&mut self, key: &str) -> Option<Vec<u8>> {
        let old = self.entries.remove(key)?;
        self.bytes -= key.len() + old.len();
        Some(old.into_vec())
    }
}

/// Why a put was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvError {
    /// The store would exceed its bound.
    Full {
        /// The bound.
        bytes_max: usize,
    },
}

/// Messages of [`KvStore`].
#[derive(Debug, Serialize, Deserialize)]
pub enum KvMsg {
    /// Sets `key`; the reply, if asked for, holds the previous value.
    Put {
        /// Key.
        key: String,
        /// Value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// Where to answer, if anywhere.
        reply: Option<ReplyTo<Result<Option<Vec<u8>>, KvError>>>,
    },
    /// Reads `key`.
    Get {
        /// Key.
        key: String,
        /// Where to answer.
        reply: ReplyTo<Option<Vec<u8>>>,
    },
    /// Removes `key`; the reply, if asked for, holds the removed value.
    Delete {
        /// Key.
        key: String,
        /// Where to answer, if anywhere.
        reply: Option<ReplyTo<Option<Vec<u8>>>>,
    },
    /// Number of keys.
    Len(ReplyTo<usize>),
}

impl Service for KvStore {
    type Msg = KvMsg;
    const KIND: &'static str = "kv";
    const VERSION: u32 = 1;
    const PRECOPY: Option<Precopy<Self>> = Some(Precopy {
        part: |kv| &mut kv.entries,
        empty: || Box::new(TrackedMap::<String, serde_bytes::ByteBuf>::new()),
        min_bytes: tern::PRECOPY_MIN_BYTES,
    });

    async fn handle(&mut self, msg: KvMsg, ctx: &mut Ctx<Self>) {
        let sent = match msg {
            KvMsg::Put { key, value, reply } => {
                let res = self.put(key, value);
                reply.map(|r| ctx.reply(r, res))
            }
            KvMsg::Get { key, reply } => {
                let v = self.entries.get(&key).map(|v| v.to_vec());
                Some(ctx.reply(reply, v))
            }
            KvMsg::Delete { key, reply } => {
                let old = self.delete(&key);
                reply.map(|r| ctx.reply(r, old))
            }
            KvMsg::Len(reply) => Some(ctx.reply(reply, self.entries.len())),
        };
        if let Some(Err(e)) = sent {
            tracing::warn!(error = %e, "kv reply not delivered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounting_and_bound() {
        let mut kv = KvStore::with_limit(10);
        assert_eq!(kv.put("a".into(), vec![1; 4]).unwrap(), None);
        assert_eq!(kv.bytes(), 5);
        assert_eq!(kv.put("a".into(), vec![2; 2]).unwrap(), Some(vec![1; 4]));
        assert_eq!(kv.bytes(), 3);
        assert_eq!(
            kv.put("b".into(), vec![0; 9]),
            Err(KvError::Full { bytes_max: 10 })
        );
        assert_eq!(kv.delete("a"), Some(vec![2; 2]));
        assert_eq!(kv.bytes(), 0);
    }
}
