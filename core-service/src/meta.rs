//! How the core lays out its metadata in the [`MetaStore`](tributary_storage::MetaStore),
//! and the serialised records it keeps there.
//!
//! Keys are `<kind>/` followed by NUL-separated name parts, so that names may contain any
//! printable character (AMQP's default vhost is "/") and prefix scans stay exact.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tributary_proto::v1;

use crate::error::{CoreError, CoreResult};

pub fn key(kind: &str, parts: &[&str]) -> Vec<u8> {
    let mut k =
        Vec::with_capacity(kind.len() + 1 + parts.iter().map(|p| p.len() + 1).sum::<usize>());
    k.extend_from_slice(kind.as_bytes());
    k.push(b'/');
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            k.push(0);
        }
        k.extend_from_slice(p.as_bytes());
    }
    k
}

/// The prefix under which every key that starts with these parts lives.
pub fn prefix(kind: &str, parts: &[&str]) -> Vec<u8> {
    let mut k = key(kind, parts);
    if !parts.is_empty() {
        k.push(0);
    }
    k
}

/// Splits the name parts back out of a key.
pub fn parts(kind: &str, key: &[u8]) -> Vec<String> {
    let rest = &key[kind.len() + 1..];
    rest.split(|b| *b == 0)
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect()
}

pub const NAMESPACE: &str = "ns";
pub const STREAM: &str = "stream";
pub const OFFSET: &str = "offset";
pub const GROUP: &str = "group";
pub const PRODUCER_SNAPSHOT: &str = "pstate";
pub const PRODUCER_EPOCH: &str = "producer";
pub const TRANSACTIONAL_ID: &str = "txnid";
/// A partition's aborted-transaction index: `txnaborted/<stream id>\0<partition>\0<marker offset>`.
pub const TXN_ABORTED: &str = "txnaborted";
pub const TIMER_DUE: &str = "timer";
pub const TIMER_BY_ID: &str = "timerid";
pub const TIMER_FIRING: &str = "timerfiring";
pub const COUNTER: &str = "counter";
/// A staged transaction: `staged/<ns>\0<transaction id>` (staged.rs).
pub const STAGED: &str = "staged";
/// A staged transaction's next check-back: `stagedcheck/<ns>\0<due ms>\0<transaction id>`.
pub const STAGED_CHECK: &str = "stagedcheck";
/// When an ended staged transaction's outcome is forgotten: `stagedgc/<ms>\0<ns>\0<id>`.
pub const STAGED_GC: &str = "stagedgc";

/// A stable 64-bit hash (FNV-1a): the same bytes give the same value across restarts and
/// versions (key-to-partition placement, timer ids derived from names).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Checks a namespace, stream or group name.
pub fn validate_name(what: &str, name: &str) -> CoreResult<()> {
    if name.is_empty() || name.len() > 255 {
        return Err(CoreError::InvalidArgument(format!(
            "{what} name must be 1 to 255 bytes, got {}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(CoreError::InvalidArgument(format!(
            "{what} name '{}' contains control characters",
            name.escape_debug()
        )));
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NamespaceRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub created_at_ms: i64,
}

impl NamespaceRecord {
    pub fn to_proto(&self) -> v1::Namespace {
        v1::Namespace {
            name: self.name.clone(),
            labels: self.labels.clone().into_iter().collect(),
            created_at_ms: self.created_at_ms,
        }
    }
}

/// A stream's explicitly set configs; unset ones follow the server defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSettings {
    pub retention_ms: Option<i64>,
    pub retention_bytes: Option<i64>,
    pub max_message_bytes: Option<i64>,
    pub cleanup_policy: Option<String>,
    pub extra: BTreeMap<String, String>,
    /// The storage backend asked for at creation (the one used is `StreamRecord::backend`).
    #[serde(default)]
    pub storage: Option<String>,
    /// The stream this one is a delay line for (`StreamConfig.delay_target`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_target: Option<String>,
}

impl StreamSettings {
    pub fn from_proto(c: &v1::StreamConfig) -> Self {
        Self {
            retention_ms: c.retention_ms,
            retention_bytes: c.retention_bytes,
            max_message_bytes: c.max_message_bytes,
            cleanup_policy: c.cleanup_policy.clone(),
            extra: c.extra.clone().into_iter().collect(),
            storage: c.storage.clone(),
            delay_target: c.delay_target.clone(),
        }
    }

    pub fn validate(&self) -> CoreResult<()> {
        if let Some(v) = self.retention_ms.filter(|v| *v < -1) {
            return Err(CoreError::InvalidConfig(format!(
                "retention_ms must be -1 or >= 0, got {v}"
            )));
        }
        if let Some(v) = self.retention_bytes.filter(|v| *v < -1) {
            return Err(CoreError::InvalidConfig(format!(
                "retention_bytes must be -1 or >= 0, got {v}"
            )));
        }
        if let Some(v) = self
            .max_message_bytes
            .filter(|v| !(1..=(1 << 30)).contains(v))
        {
            return Err(CoreError::InvalidConfig(format!(
                "max_message_bytes must be 1..=1073741824, got {v}"
            )));
        }
        if let Some(target) = &self.delay_target {
            validate_name("delay target", target)
                .map_err(|e| CoreError::InvalidConfig(e.to_string()))?;
        }
        match self.cleanup_policy.as_deref() {
            None | Some("delete") => Ok(()),
            Some("compact") | Some("compact,delete") | Some("delete,compact") => Err(
                CoreError::Unsupported("cleanup_policy 'compact' (log compaction)".into()),
            ),
            Some(other) => Err(CoreError::InvalidConfig(format!(
                "cleanup_policy must be 'delete', got '{other}'"
            ))),
        }
    }
}

/// Server-wide defaults for stream configs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamDefaults {
    pub retention_ms: i64,
    pub retention_bytes: i64,
    pub max_message_bytes: i64,
}

impl Default for StreamDefaults {
    fn default() -> Self {
        // Kafka's defaults: 7 days, unlimited size, 1 MiB + batch overhead.
        Self {
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            max_message_bytes: 1_048_588,
        }
    }
}

/// The configs in force for a stream: its settings over the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveConfig {
    pub retention_ms: i64,
    pub retention_bytes: i64,
    pub max_message_bytes: i64,
    pub cleanup_policy: String,
}

impl EffectiveConfig {
    pub fn resolve(s: &StreamSettings, d: &StreamDefaults) -> Self {
        Self {
            retention_ms: s.retention_ms.unwrap_or(d.retention_ms),
            retention_bytes: s.retention_bytes.unwrap_or(d.retention_bytes),
            max_message_bytes: s.max_message_bytes.unwrap_or(d.max_message_bytes),
            cleanup_policy: s.cleanup_policy.clone().unwrap_or_else(|| "delete".into()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamRecord {
    pub namespace: String,
    pub name: String,
    pub id: u64,
    pub uuid: String,
    pub partitions: u32,
    pub settings: StreamSettings,
    pub created_at_ms: i64,
    /// The log store backend its partitions were created on; `None` for a stream created
    /// before backends could be chosen, or on a store with a single backend (the default).
    #[serde(default)]
    pub backend: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OffsetRecord {
    pub offset: i64,
    pub metadata: String,
    pub commit_time_ms: i64,
    pub leader_epoch: i32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRecord {
    pub created_at_ms: i64,
    pub protocol_type: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ProducerIdRecord {
    pub producer_id: i64,
    pub epoch: i32,
}

pub fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("metadata records always serialise")
}

pub fn from_json<T: for<'de> Deserialize<'de>>(what: &str, raw: &[u8]) -> CoreResult<T> {
    serde_json::from_slice(raw)
        .map_err(|e| CoreError::Corrupt(format!("unreadable {what} record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_prefixes_do_not_overlap() {
        let k = key(OFFSET, &["/", "g", "orders", "0000000003"]);
        assert_eq!(parts(OFFSET, &k), vec!["/", "g", "orders", "0000000003"]);
        let p = prefix(OFFSET, &["/", "g"]);
        assert!(k.starts_with(&p));
        assert!(!key(OFFSET, &["/", "g2", "x"]).starts_with(&p));
    }
}
