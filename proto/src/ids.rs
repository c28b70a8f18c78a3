//! Identifiers: services, nodes, kinds and the location-carrying [`ServiceAddr`].

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A cluster-unique service identifier.
///
/// The high half is a random prefix drawn once per node start, the low half a counter on that
/// node, so two nodes never mint the same id without coordinating.
///
/// ```
/// let id = tern_proto::ids::ServiceId::from_parts(7, 42);
/// assert_eq!(id.to_string(), "0000000000000007-000000000000002a");
/// ```
///
/// In human-readable formats (JSON, TOML) it is written as its display form, the same hex a
/// table prints; on the wire (MessagePack) as its two halves.
///
/// ```
/// let id = tern_proto::ids::ServiceId::from_parts(7, 42);
/// let json = serde_json::to_string(&id).unwrap();
/// assert_eq!(json, "\"0000000000000007-000000000000002a\"");
/// assert_eq!(serde_json::from_str::<tern_proto::ids::ServiceId>(&json).unwrap(), id);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId(u64, u64);

/// The wire form of a [`ServiceId`]: its two halves.
#[derive(Serialize, Deserialize)]
#[serde(rename = "ServiceId")]
struct IdHalves(u64, u64);

impl Serialize for ServiceId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            IdHalves(self.0, self.1).serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for ServiceId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            let IdHalves(hi, lo) = IdHalves::deserialize(d)?;
            Ok(ServiceId(hi, lo))
        }
    }
}

impl ServiceId {
    /// Builds an id from its prefix and counter halves.
    pub const fn from_parts(prefix: u64, counter: u64) -> Self {
        ServiceId(prefix, counter)
    }
    /// The node-start prefix half.
    pub const fn prefix(&self) -> u64 {
        self.0
    }
    /// The per-node counter half.
    pub const fn counter(&self) -> u64 {
        self.1
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{:016x}", self.0, self.1)
    }
}

/// Reads the form [`Display`](fmt::Display) writes: two 16-digit hex halves joined by `-`.
///
/// ```
/// let id: tern_proto::ids::ServiceId = "0000000000000007-000000000000002a".parse().unwrap();
/// assert_eq!(id, tern_proto::ids::ServiceId::from_parts(7, 42));
/// assert!("7-42-1".parse::<tern_proto::ids::ServiceId>().is_err());
/// ```
impl std::str::FromStr for ServiceId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not a service id (two hex halves joined by '-')"))?;
        let half = |h: &str| {
            if h.is_empty() || h.len() > 16 {
                return Err(format!(
                    "{s:?} is not a service id (halves of 1 to 16 hex digits)"
                ));
            }
            u64::from_str_radix(h, 16).map_err(|e| format!("{s:?} is not a service id: {e}"))
        };
        Ok(ServiceId(half(hi)?, half(lo)?))
    }
}

impl From<&ServiceAddr> for ServiceId {
    fn from(a: &ServiceAddr) -> Self {
        a.id
    }
}

impl fmt::Debug for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceId({self})")
    }
}

/// A name shared by reference counting: cheap to clone, compared, hashed, shown and
/// serialized as its string.
macro_rules! shared_name {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// Wraps a name.
            pub fn new(name: &str) -> Self {
                $name(Arc::from(name))
            }
            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::new(s)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Ok($name::new(&s))
            }
        }
    };
}

shared_name! {
    /// A node's name, as read from its certificate. Cheap to clone.
    NodeName
}

impl From<&String> for NodeName {
    fn from(s: &String) -> Self {
        NodeName::new(s)
    }
}

impl From<String> for NodeName {
    fn from(s: String) -> Self {
        NodeName::new(&s)
    }
}

impl From<&NodeName> for NodeName {
    fn from(n: &NodeName) -> Self {
        n.clone()
    }
}

shared_name! {
    /// A kind's name, e.g. `"kv"`. Cheap to clone: every address of a kind shares one copy
    /// when it comes from the node's table of registered kinds.
    KindName
}

impl std::ops::Deref for KindName {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for KindName {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for KindName {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

/// A registered service kind: name and version. Every node able to host a service must have
/// its kind compiled in and registered.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KindKey {
    /// The kind's name, e.g. `"kv"`.
    pub name: KindName,
    /// The kind's version; a version reads another's states and messages only when it
    /// declares an upgrade from it (`Service::UPGRADES` in crate `tern`).
    pub version: u32,
}

impl KindKey {
    /// Builds a key.
    pub fn new(name: &str, version: u32) -> Self {
        KindKey {
            name: KindName::new(name),
            version,
        }
    }
}

impl fmt::Display for KindKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

impl fmt::Debug for KindKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// Where a service is: its id, its kind and the node hosting it. Serializable, so it can sit in
/// service state, address books and messages.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceAddr {
    /// The service.
    pub id: ServiceId,
    /// Its registered kind.
    pub kind: KindKey,
    /// The node hosting it when this address was made.
    pub node: NodeName,
}

impl fmt::Debug for ServiceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}@{}", self.kind, self.id, self.node)
    }
}

/// A hasher for maps keyed by [`ServiceId`]: ids are a random prefix and a counter, so mixing
/// the two words with one multiplication spreads them well, at a fraction of SipHash's cost.
/// Not for keys a peer chooses to collide: only local tables and per-service counters use it.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

/// A `HashMap` keyed by [`ServiceId`] with [`IdHasher`].
pub type IdMap<V> =
    std::collections::HashMap<ServiceId, V, std::hash::BuildHasherDefault<IdHasher>>;
