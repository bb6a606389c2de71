//! A queue's configuration: what `DeclareQueue` may set, its checks, and what it means to
//! the queue's state ([`Policy`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tributary_proto::v1;

use super::state::Policy;
use crate::error::{CoreError, CoreResult};

/// Longest lease (SQS's 12 hours).
pub const MAX_VISIBILITY_MS: i64 = 12 * 3600 * 1000;
/// Lease length when neither the request nor the queue gives one (SQS's 30 s).
pub const DEFAULT_VISIBILITY_MS: i64 = 30_000;
/// Longest dedup window (one day).
pub const MAX_DEDUP_WINDOW_MS: i64 = 24 * 3600 * 1000;
/// Longest dedup id (SQS's 128 characters).
pub const MAX_DEDUP_ID: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Overflow {
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSettings {
    pub message_ttl_ms: Option<i64>,
    pub expires_ms: Option<i64>,
    pub max_length: Option<i64>,
    /// Value bytes of the ready messages at most (a queue record written before this field
    /// existed has none).
    #[serde(default)]
    pub max_length_bytes: Option<i64>,
    pub overflow: Option<Overflow>,
    pub dead_letter_queue: Option<String>,
    pub dead_letter_address: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    pub max_priority: Option<u32>,
    pub single_active_consumer: Option<bool>,
    pub visibility_timeout_ms: Option<i64>,
    pub max_delivery_count: Option<u32>,
    pub fifo: Option<bool>,
    pub dedup_window_ms: Option<i64>,
    pub delivery_delay_ms: Option<i64>,
    /// `Some(false)`: expired messages are discarded even with a dead-letter target.
    #[serde(default)]
    pub dead_letter_expired: Option<bool>,
    pub extra: BTreeMap<String, String>,
    /// The storage backend asked for at declaration (the one used is `QueueRecord::backend`).
    #[serde(default)]
    pub storage: Option<String>,
}

fn at_least(what: &str, v: Option<i64>, min: i64, max: i64) -> CoreResult<()> {
    match v {
        Some(v) if v < min || v > max => Err(CoreError::InvalidConfig(format!(
            "{what} must be {min}..={max}, got {v}"
        ))),
        _ => Ok(()),
    }
}

impl QueueSettings {
    pub fn from_proto(c: &v1::QueueConfig) -> CoreResult<Self> {
        let overflow = match c.overflow.as_deref() {
            None => None,
            Some("drop-head") => Some(Overflow::DropHead),
            Some("reject-publish") => Some(Overflow::RejectPublish),
            Some("reject-publish-dlx") => Some(Overflow::RejectPublishDlx),
            Some(other) => {
                return Err(CoreError::InvalidConfig(format!(
                    "overflow must be drop-head, reject-publish or reject-publish-dlx, got '{other}'"
                )));
            }
        };
        let s = Self {
            message_ttl_ms: c.message_ttl_ms,
            expires_ms: c.expires_ms,
            max_length: c.max_length,
            max_length_bytes: c.max_length_bytes,
            overflow,
            dead_letter_queue: c.dead_letter_queue.clone().filter(|q| !q.is_empty()),
            dead_letter_address: c.dead_letter_address.clone(),
            dead_letter_routing_key: c.dead_letter_routing_key.clone(),
            max_priority: c.max_priority,
            single_active_consumer: c.single_active_consumer,
            visibility_timeout_ms: c.visibility_timeout_ms,
            max_delivery_count: c.max_delivery_count,
            fifo: c.fifo,
            dedup_window_ms: c.dedup_window_ms,
            delivery_delay_ms: c.delivery_delay_ms,
            dead_letter_expired: c.dead_letter_expired,
            extra: c.extra.clone().into_iter().collect(),
            storage: c.storage.clone(),
        };
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> CoreResult<()> {
        at_least("message_ttl_ms", self.message_ttl_ms, 0, i64::MAX / 4)?;
        at_least("expires_ms", self.expires_ms, 1, i64::MAX / 4)?;
        at_least("max_length", self.max_length, 0, i64::MAX)?;
        at_least("max_length_bytes", self.max_length_bytes, 0, i64::MAX)?;
        at_least(
            "visibility_timeout_ms",
            self.visibility_timeout_ms,
            0,
            MAX_VISIBILITY_MS,
        )?;
        at_least(
            "dedup_window_ms",
            self.dedup_window_ms,
            0,
            MAX_DEDUP_WINDOW_MS,
        )?;
        at_least("delivery_delay_ms", self.delivery_delay_ms, 0, i64::MAX / 4)?;
        if let Some(p) = self.max_priority.filter(|p| *p > 255) {
            return Err(CoreError::InvalidConfig(format!(
                "max_priority must be 0..=255, got {p}"
            )));
        }
        if self.max_delivery_count == Some(0) {
            return Err(CoreError::InvalidConfig(
                "max_delivery_count must be at least 1".into(),
            ));
        }
        if self.fifo == Some(true) && self.max_priority.is_some() {
            return Err(CoreError::InvalidConfig(
                "a FIFO queue cannot have priorities".into(),
            ));
        }
        Ok(())
    }

    pub fn to_proto(&self) -> v1::QueueConfig {
        v1::QueueConfig {
            message_ttl_ms: self.message_ttl_ms,
            expires_ms: self.expires_ms,
            max_length: self.max_length,
            max_length_bytes: self.max_length_bytes,
            overflow: self.overflow.map(|o| {
                match o {
                    Overflow::DropHead => "drop-head",
                    Overflow::RejectPublish => "reject-publish",
                    Overflow::RejectPublishDlx => "reject-publish-dlx",
                }
                .to_string()
            }),
            dead_letter_address: self.dead_letter_address.clone(),
            dead_letter_queue: self.dead_letter_queue.clone(),
            dead_letter_routing_key: self.dead_letter_routing_key.clone(),
            max_priority: self.max_priority,
            single_active_consumer: self.single_active_consumer,
            visibility_timeout_ms: self.visibility_timeout_ms,
            max_delivery_count: self.max_delivery_count,
            fifo: self.fifo,
            dedup_window_ms: self.dedup_window_ms,
            extra: self.extra.clone().into_iter().collect(),
            delivery_delay_ms: self.delivery_delay_ms,
            dead_letter_expired: self.dead_letter_expired,
            storage: self.storage.clone(),
        }
    }

    pub(crate) fn policy(&self) -> Policy {
        Policy {
            fifo: self.fifo == Some(true),
            max_priority: self.max_priority.unwrap_or(0).min(255) as u8,
            message_ttl_ms: self.message_ttl_ms,
            max_deliveries: self.max_delivery_count,
        }
    }

    pub fn visibility_ms(&self) -> i64 {
        self.visibility_timeout_ms.unwrap_or(DEFAULT_VISIBILITY_MS)
    }

    /// 0 (no dedup) unless set; a gateway sets its protocol's window (SQS FIFO: 5 minutes).
    pub fn dedup_window_ms(&self) -> i64 {
        self.dedup_window_ms.unwrap_or(0)
    }
}
