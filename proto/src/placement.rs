//! Where a unit lives in a cluster serving shards: the same function on every core node and
//! gateway, so that a gateway can name the shard of a call and a node can refuse a unit its
//! placement gives to another shard.
//!
//! The deployment fixes a [`Scheme`] once, with its shard count. Under [`Scheme::Namespace`]
//! every unit of a namespace is in the namespace's shard, its *home*. Under [`Scheme::Stream`]
//! streams are placed by `(namespace, stream)` and every other unit stays at home (design:
//! docs/design/intra-namespace-spreading.md).

/// Metadata key naming the unit a call is about, `stream/<name>`, next to the namespace
/// header. Under [`Scheme::Stream`] a node serving shards routes the call by both; otherwise
/// (and for calls without it) by the namespace alone.
pub const UNIT_METADATA: &str = "tributary-unit";

/// Response metadata from a node serving shards of a deployment that spreads streams:
/// `<scheme>/<shards>` (`stream/16`), so that a gateway can split a call over several streams
/// (a Kafka Fetch) by shard. Absent under [`Scheme::Namespace`], where one namespace's calls
/// all go to one shard.
pub const PLACEMENT_METADATA: &str = "tributary-placement";

/// The value of [`PLACEMENT_METADATA`].
pub fn placement_value(scheme: Scheme, shards: u32) -> String {
    format!("{scheme}/{shards}")
}

/// Reads a [`PLACEMENT_METADATA`] value.
pub fn parse_placement(value: &str) -> Option<(Scheme, u32)> {
    let (scheme, shards) = value.split_once('/')?;
    Some((
        Scheme::parse(scheme)?,
        shards.parse().ok().filter(|&n| n > 0)?,
    ))
}

/// The prefix of a stream's unit name in [`UNIT_METADATA`].
pub const STREAM_UNIT: &str = "stream/";

/// How a deployment places units over its shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scheme {
    /// Every unit at its namespace's shard.
    #[default]
    Namespace,
    /// Streams by `(namespace, stream)`, everything else at the namespace's shard.
    Stream,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Namespace => "namespace",
            Self::Stream => "stream",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "namespace" => Some(Self::Namespace),
            "stream" => Some(Self::Stream),
            _ => None,
        }
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// FNV-1a, 64 bits: stable across versions and platforms (the standard library's hasher is
/// not), and placement must never change under a running deployment.
pub fn fnv1a<'a>(bytes: impl IntoIterator<Item = &'a u8>) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// The shard of a namespace (its home), of `shards`.
pub fn shard_of(namespace: &str, shards: u32) -> u32 {
    (fnv1a(namespace.as_bytes()) % u64::from(shards.max(1))) as u32
}

/// The shard of `unit` (as in [`UNIT_METADATA`]; `None` for the namespace itself) in
/// `namespace`, under `scheme`.
pub fn shard_of_unit(scheme: Scheme, namespace: &str, unit: Option<&str>, shards: u32) -> u32 {
    match (scheme, unit) {
        (Scheme::Stream, Some(unit)) if unit.starts_with(STREAM_UNIT) => {
            let key = namespace
                .as_bytes()
                .iter()
                .chain(b"\0")
                .chain(unit.as_bytes());
            (fnv1a(key) % u64::from(shards.max(1))) as u32
        }
        _ => shard_of(namespace, shards),
    }
}

/// The unit name of a stream, for [`UNIT_METADATA`].
pub fn stream_unit(name: &str) -> String {
    format!("{STREAM_UNIT}{name}")
}

/// The shard one core serves and how the deployment places units: what a core checks before
/// it creates a unit, so that it never holds one its placement gives to another shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub shard: u32,
    pub shards: u32,
    pub scheme: Scheme,
}

impl Placement {
    /// Whether this shard is the namespace's home, where every unit but (under
    /// [`Scheme::Stream`]) streams lives.
    pub fn is_home_of(&self, namespace: &str) -> bool {
        shard_of(namespace, self.shards) == self.shard
    }

    /// Whether the stream `name` of `namespace` lives in this shard.
    pub fn holds_stream(&self, namespace: &str, name: &str) -> bool {
        shard_of_unit(
            self.scheme,
            namespace,
            Some(&stream_unit(name)),
            self.shards,
        ) == self.shard
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_spread_over_shards_the_same_way_everywhere() {
        // Fixed values: a change here moves every deployment's namespaces.
        assert_eq!(shard_of("default", 16), 14);
        assert_eq!(shard_of("tenant-1", 16), 11);
        assert_eq!(shard_of("vhost-a", 16), 1);
        let mut per_shard = [0usize; 8];
        for n in 0..800 {
            per_shard[shard_of(&format!("tenant-{n}"), 8) as usize] += 1;
        }
        assert!(
            per_shard.iter().all(|&c| (60..=140).contains(&c)),
            "{per_shard:?}"
        );
        assert_eq!(shard_of("anything", 1), 0);
    }

    #[test]
    fn streams_spread_only_under_the_stream_scheme() {
        // Fixed values, as above.
        assert_eq!(
            shard_of_unit(Scheme::Stream, "default", Some("stream/events"), 16),
            2
        );
        assert_eq!(
            shard_of_unit(Scheme::Stream, "default", Some("stream/payments"), 16),
            0
        );
        // The namespace's own shard is unchanged by the scheme, and so is every unit but
        // streams, and every unit under the namespace scheme.
        for scheme in [Scheme::Namespace, Scheme::Stream] {
            assert_eq!(shard_of_unit(scheme, "default", None, 16), 14);
            assert_eq!(shard_of_unit(scheme, "default", Some("queue/q"), 16), 14);
        }
        assert_eq!(
            shard_of_unit(Scheme::Namespace, "default", Some("stream/orders"), 16),
            14
        );
        let mut per_shard = [0usize; 8];
        for n in 0..800 {
            let unit = stream_unit(&format!("topic-{n}"));
            per_shard[shard_of_unit(Scheme::Stream, "default", Some(&unit), 8) as usize] += 1;
        }
        assert!(
            per_shard.iter().all(|&c| (60..=140).contains(&c)),
            "{per_shard:?}"
        );
    }

    #[test]
    fn a_placement_holds_what_the_function_places_in_its_shard() {
        let home = Placement {
            shard: 14,
            shards: 16,
            scheme: Scheme::Stream,
        };
        assert!(home.is_home_of("default"));
        assert!(!home.holds_stream("default", "payments"));
        let payments = Placement { shard: 0, ..home };
        assert!(payments.holds_stream("default", "payments"));
        assert!(!payments.is_home_of("default"));
        let namespace = Placement {
            scheme: Scheme::Namespace,
            ..home
        };
        assert!(namespace.holds_stream("default", "payments"));
        assert!(Scheme::parse("stream") == Some(Scheme::Stream));
        assert_eq!(
            parse_placement(&placement_value(Scheme::Stream, 16)),
            Some((Scheme::Stream, 16))
        );
        assert_eq!(parse_placement("stream/0"), None);
        assert!(Scheme::parse("partition").is_none());
    }
}
