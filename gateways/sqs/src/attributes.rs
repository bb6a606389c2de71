//! Queue attributes and the core queue configuration they are kept in. What the core's
//! queue engine acts on goes in its fields (visibility, delay, retention, FIFO, dedup
//! window, dead-letter queue and receive limit); what only this gateway reads goes in the
//! configuration's `extra` map under `sqs.<Attribute>` (tags under `sqs.tag.<key>`), the
//! names `tributary import sqs` uses too.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use tributary_proto::v1;

use crate::error::{SqsError, SqsResult};
use crate::names::Identity;

pub const EXTRA: &str = "sqs.";
pub const EXTRA_TAG: &str = "sqs.tag.";
const LAST_MODIFIED: &str = "sqs.LastModifiedTimestamp";
pub const DEFAULT_VISIBILITY_S: i64 = 30;
pub const DEFAULT_RETENTION_S: i64 = 345_600;
pub const DEFAULT_MAX_MESSAGE_SIZE: i64 = 1_048_576;
/// SQS FIFO queues drop a resent deduplication id for five minutes.
pub const FIFO_DEDUP_WINDOW_MS: i64 = 5 * 60 * 1000;
const MAX_TAGS: usize = 50;

/// Every attribute GetQueueAttributes knows, in SQS's order.
pub const ALL: &[&str] = &[
    "QueueArn",
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
    "CreatedTimestamp",
    "LastModifiedTimestamp",
    "VisibilityTimeout",
    "MaximumMessageSize",
    "MessageRetentionPeriod",
    "DelaySeconds",
    "ReceiveMessageWaitTimeSeconds",
    "RedrivePolicy",
    "RedriveAllowPolicy",
    "FifoQueue",
    "ContentBasedDeduplication",
    "DeduplicationScope",
    "FifoThroughputLimit",
    "SqsManagedSseEnabled",
];

const FIFO_ONLY: &[&str] = &[
    "ContentBasedDeduplication",
    "DeduplicationScope",
    "FifoThroughputLimit",
];

fn seconds(name: &str, v: &str, min: i64, max: i64) -> SqsResult<i64> {
    match v.trim().parse::<i64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(SqsError::invalid_attribute_value(format!(
            "Invalid value for the parameter {name}: {v} is not an integer from {min} to {max}."
        ))),
    }
}

fn boolean(name: &str, v: &str) -> SqsResult<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(SqsError::invalid_attribute_value(format!(
            "Invalid value for the parameter {name}: {v} is not true or false."
        ))),
    }
}

/// A queue's configuration as CreateQueue starts it: SQS's defaults, explicit, so that
/// every attribute reads back what SQS would say.
pub fn defaults(fifo: bool) -> v1::QueueConfig {
    v1::QueueConfig {
        visibility_timeout_ms: Some(DEFAULT_VISIBILITY_S * 1000),
        delivery_delay_ms: Some(0),
        message_ttl_ms: Some(DEFAULT_RETENTION_S * 1000),
        dead_letter_expired: Some(false),
        fifo: fifo.then_some(true),
        dedup_window_ms: fifo.then_some(FIFO_DEDUP_WINDOW_MS),
        ..Default::default()
    }
}

/// What a RedrivePolicy asks for: (dead-letter queue name, maxReceiveCount).
fn redrive(id: &Identity, v: &str) -> SqsResult<(String, u32)> {
    let bad = |why: &str| {
        SqsError::invalid_attribute_value(format!(
            "Value {v} for parameter RedrivePolicy is invalid. Reason: {why}."
        ))
    };
    let parsed: Value = serde_json::from_str(v).map_err(|_| bad("Invalid JSON"))?;
    let arn = parsed
        .get("deadLetterTargetArn")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            bad("Redrive policy does not contain mandatory attribute: deadLetterTargetArn")
        })?;
    let count = parsed
        .get("maxReceiveCount")
        .and_then(crate::params::as_int)
        .ok_or_else(|| {
            bad("Redrive policy does not contain mandatory attribute: maxReceiveCount")
        })?;
    if !(1..=1000).contains(&count) {
        return Err(bad("Invalid value for maxReceiveCount: must be 1 to 1000"));
    }
    let name = id
        .name_of_arn("RedrivePolicy", arn)
        .map_err(|_| bad("Dead-letter target does not exist"))?;
    Ok((name, count as u32))
}

fn redrive_allow(v: &str) -> SqsResult<()> {
    let bad = |why: &str| {
        SqsError::invalid_attribute_value(format!(
            "Value {v} for parameter RedriveAllowPolicy is invalid. Reason: {why}."
        ))
    };
    let parsed: Value = serde_json::from_str(v).map_err(|_| bad("Invalid JSON"))?;
    match parsed.get("redrivePermission").and_then(Value::as_str) {
        Some("allowAll" | "denyAll") => Ok(()),
        Some("byQueue") => match parsed.get("sourceQueueArns").and_then(Value::as_array) {
            Some(a) if (1..=10).contains(&a.len()) => Ok(()),
            _ => Err(bad("byQueue needs 1 to 10 sourceQueueArns")),
        },
        _ => Err(bad(
            "redrivePermission must be allowAll, denyAll or byQueue",
        )),
    }
}

/// Applies settable attributes to `c` (CreateQueue's, or SetQueueAttributes' on a queue
/// that exists when `!creating`). Returns the dead-letter queue a RedrivePolicy names, for
/// the caller to check it exists.
pub fn apply(
    id: &Identity,
    c: &mut v1::QueueConfig,
    attrs: &BTreeMap<String, String>,
    creating: bool,
) -> SqsResult<Option<String>> {
    let fifo = c.fifo == Some(true);
    let mut dlq = None;
    for (name, v) in attrs {
        let extra = |c: &mut v1::QueueConfig, value: String| {
            c.extra.insert(format!("{EXTRA}{name}"), value);
        };
        if FIFO_ONLY.contains(&name.as_str()) && !fifo {
            return Err(SqsError::invalid_attribute_name(format!(
                "Unknown Attribute {name}."
            )));
        }
        match name.as_str() {
            "VisibilityTimeout" => {
                c.visibility_timeout_ms = Some(seconds(name, v, 0, 43_200)? * 1000);
            }
            "DelaySeconds" => c.delivery_delay_ms = Some(seconds(name, v, 0, 900)? * 1000),
            "MessageRetentionPeriod" => {
                c.message_ttl_ms = Some(seconds(name, v, 60, 1_209_600)? * 1000);
                c.dead_letter_expired = Some(false);
            }
            "MaximumMessageSize" => {
                extra(c, seconds(name, v, 1024, 1_048_576)?.to_string());
            }
            "ReceiveMessageWaitTimeSeconds" => extra(c, seconds(name, v, 0, 20)?.to_string()),
            "RedrivePolicy" if v.trim().is_empty() => {
                c.dead_letter_queue = None;
                c.max_delivery_count = None;
            }
            "RedrivePolicy" => {
                let (q, count) = redrive(id, v)?;
                c.dead_letter_queue = Some(q.clone());
                c.max_delivery_count = Some(count);
                dlq = Some(q);
            }
            "RedriveAllowPolicy" if v.trim().is_empty() => {
                c.extra.remove(&format!("{EXTRA}{name}"));
            }
            "RedriveAllowPolicy" => {
                redrive_allow(v)?;
                extra(c, v.clone());
            }
            "FifoQueue" => {
                let want = boolean(name, v)?;
                if want != fifo {
                    return Err(if creating {
                        SqsError::invalid_attribute_value(
                            "Invalid value for the parameter FifoQueue: a FIFO queue's name ends in .fifo, and only a FIFO queue's does.",
                        )
                    } else {
                        SqsError::invalid_attribute_value(
                            "Invalid value for the parameter FifoQueue: a queue cannot change type.",
                        )
                    });
                }
            }
            "ContentBasedDeduplication" | "SqsManagedSseEnabled" => {
                extra(c, boolean(name, v)?.to_string());
            }
            "DeduplicationScope" => match v.as_str() {
                "messageGroup" | "queue" => extra(c, v.clone()),
                _ => {
                    return Err(SqsError::invalid_attribute_value(format!(
                        "Invalid value for the parameter DeduplicationScope: {v} (messageGroup or queue)."
                    )));
                }
            },
            "FifoThroughputLimit" => match v.as_str() {
                "perQueue" | "perMessageGroupId" => extra(c, v.clone()),
                _ => {
                    return Err(SqsError::invalid_attribute_value(format!(
                        "Invalid value for the parameter FifoThroughputLimit: {v} (perQueue or perMessageGroupId)."
                    )));
                }
            },
            "KmsMasterKeyId" | "KmsDataKeyReusePeriodSeconds" => {
                return Err(SqsError::invalid_attribute_value(format!(
                    "{name}: KMS encryption is not supported by Tributary; data at rest is protected by its storage (disk or object store encryption)."
                )));
            }
            "Policy" => {
                return Err(SqsError::invalid_attribute_value(
                    "Policy: queue access policies are not supported by Tributary; access is granted by the keys in sqs_credentials.",
                ));
            }
            _ => {
                return Err(SqsError::invalid_attribute_name(format!(
                    "Unknown Attribute {name}."
                )));
            }
        }
    }
    let get = |k: &str| c.extra.get(&format!("{EXTRA}{k}")).map(String::as_str);
    if get("FifoThroughputLimit") == Some("perMessageGroupId")
        && get("DeduplicationScope") == Some("queue")
    {
        return Err(SqsError::invalid_attribute_value(
            "Invalid value for the parameter FifoThroughputLimit: perMessageGroupId needs DeduplicationScope messageGroup.",
        ));
    }
    Ok(dlq)
}

pub fn touch(c: &mut v1::QueueConfig, now_s: i64) {
    c.extra.insert(LAST_MODIFIED.into(), now_s.to_string());
}

/// Every attribute of a queue.
pub fn all(id: &Identity, info: &v1::QueueInfo) -> BTreeMap<&'static str, String> {
    let c = info.config.clone().unwrap_or_default();
    let name = info.id.as_ref().map_or("", |i| i.name.as_str());
    let fifo = c.fifo == Some(true);
    let extra = |k: &str| c.extra.get(&format!("{EXTRA}{k}")).cloned();
    let created_s = info.created_at_ms / 1000;
    let mut m = BTreeMap::new();
    m.insert("QueueArn", id.arn(name));
    m.insert(
        "ApproximateNumberOfMessages",
        info.messages_ready.to_string(),
    );
    m.insert(
        "ApproximateNumberOfMessagesNotVisible",
        info.messages_leased.to_string(),
    );
    m.insert(
        "ApproximateNumberOfMessagesDelayed",
        info.messages_delayed.to_string(),
    );
    m.insert("CreatedTimestamp", created_s.to_string());
    m.insert(
        "LastModifiedTimestamp",
        // The gateway stamps the config before the core stamps the queue's
        // creation, so a create straddling a second boundary would report a
        // modification before the creation without the max.
        c.extra
            .get(LAST_MODIFIED)
            .and_then(|s| s.parse::<i64>().ok())
            .map_or(created_s, |m| m.max(created_s))
            .to_string(),
    );
    m.insert(
        "VisibilityTimeout",
        (c.visibility_timeout_ms
            .unwrap_or(DEFAULT_VISIBILITY_S * 1000)
            / 1000)
            .to_string(),
    );
    m.insert(
        "MaximumMessageSize",
        extra("MaximumMessageSize").unwrap_or(DEFAULT_MAX_MESSAGE_SIZE.to_string()),
    );
    // A queue another protocol declared without a TTL keeps its messages for ever; SQS
    // has no word for that, so its longest retention is what it reads.
    m.insert(
        "MessageRetentionPeriod",
        c.message_ttl_ms
            .map_or(1_209_600, |ms| ms / 1000)
            .to_string(),
    );
    m.insert(
        "DelaySeconds",
        (c.delivery_delay_ms.unwrap_or(0) / 1000).to_string(),
    );
    m.insert(
        "ReceiveMessageWaitTimeSeconds",
        extra("ReceiveMessageWaitTimeSeconds").unwrap_or("0".into()),
    );
    if let (Some(q), Some(n)) = (&c.dead_letter_queue, c.max_delivery_count) {
        m.insert(
            "RedrivePolicy",
            json!({"deadLetterTargetArn": id.arn(q), "maxReceiveCount": n}).to_string(),
        );
    }
    if let Some(p) = extra("RedriveAllowPolicy") {
        m.insert("RedriveAllowPolicy", p);
    }
    m.insert(
        "SqsManagedSseEnabled",
        extra("SqsManagedSseEnabled").unwrap_or("false".into()),
    );
    if fifo {
        m.insert("FifoQueue", "true".into());
        m.insert(
            "ContentBasedDeduplication",
            extra("ContentBasedDeduplication").unwrap_or("false".into()),
        );
        m.insert(
            "DeduplicationScope",
            extra("DeduplicationScope").unwrap_or("queue".into()),
        );
        m.insert(
            "FifoThroughputLimit",
            extra("FifoThroughputLimit").unwrap_or("perQueue".into()),
        );
    }
    m
}

/// The attributes GetQueueAttributes was asked for (`All`, or names; an unknown one is an
/// error, as in SQS).
pub fn select(
    all: BTreeMap<&'static str, String>,
    names: &[String],
) -> SqsResult<BTreeMap<String, String>> {
    for n in names {
        if n != "All" && !ALL.contains(&n.as_str()) {
            return Err(SqsError::invalid_attribute_name(format!(
                "Unknown Attribute {n}."
            )));
        }
    }
    Ok(all
        .into_iter()
        .filter(|(k, _)| names.iter().any(|n| n == "All" || n == k))
        .map(|(k, v)| (k.to_string(), v))
        .collect())
}

/// Whether `attrs` (a CreateQueue's) agree with a queue that exists: applied to its
/// configuration, they change nothing.
pub fn agree(id: &Identity, existing: &v1::QueueConfig, attrs: &BTreeMap<String, String>) -> bool {
    let mut c = existing.clone();
    apply(id, &mut c, attrs, true).is_ok() && c == *existing
}

pub fn tags(c: &v1::QueueConfig) -> BTreeMap<String, String> {
    c.extra
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(EXTRA_TAG)
                .map(|t| (t.to_string(), v.clone()))
        })
        .collect()
}

pub fn set_tags(c: &mut v1::QueueConfig, tags: &BTreeMap<String, String>) -> SqsResult<()> {
    for (k, v) in tags {
        if k.is_empty() || k.len() > 128 || v.len() > 256 {
            return Err(SqsError::invalid_parameter_value(format!(
                "Tag '{k}' is invalid: keys are 1 to 128 characters, values at most 256."
            )));
        }
        c.extra.insert(format!("{EXTRA_TAG}{k}"), v.clone());
    }
    if self::tags(c).len() > MAX_TAGS {
        return Err(SqsError::invalid_parameter_value(format!(
            "Too many tags: a queue has at most {MAX_TAGS}."
        )));
    }
    Ok(())
}

/// An extra setting of this gateway (`MaximumMessageSize`, `ContentBasedDeduplication`, ...).
pub fn extra<'a>(c: &'a v1::QueueConfig, name: &str) -> Option<&'a str> {
    c.extra.get(&format!("{EXTRA}{name}")).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            region: "us-east-1".into(),
            account_id: "000000000000".into(),
            namespace: "default".into(),
        }
    }

    fn attrs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn attributes_map_onto_the_core_config_and_back() {
        let id = id();
        let mut c = defaults(false);
        let dlq = apply(
            &id,
            &mut c,
            &attrs(&[
                ("VisibilityTimeout", "45"),
                ("DelaySeconds", "3"),
                ("MessageRetentionPeriod", "600"),
                ("MaximumMessageSize", "2048"),
                (
                    "RedrivePolicy",
                    r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:000000000000:dlq","maxReceiveCount":"3"}"#,
                ),
            ]),
            true,
        )
        .unwrap();
        assert_eq!(dlq.as_deref(), Some("dlq"));
        assert_eq!(c.visibility_timeout_ms, Some(45_000));
        assert_eq!(c.max_delivery_count, Some(3));
        assert_eq!(c.dead_letter_expired, Some(false));
        let info = v1::QueueInfo {
            id: Some(v1::QueueId {
                namespace: "default".into(),
                name: "q".into(),
            }),
            config: Some(c.clone()),
            ..Default::default()
        };
        let all = all(&id, &info);
        assert_eq!(all["VisibilityTimeout"], "45");
        assert_eq!(all["MaximumMessageSize"], "2048");
        assert_eq!(
            all["RedrivePolicy"],
            r#"{"deadLetterTargetArn":"arn:aws:sqs:us-east-1:000000000000:dlq","maxReceiveCount":3}"#
        );
        assert!(!all.contains_key("FifoQueue"));
        assert!(agree(&id, &c, &attrs(&[("VisibilityTimeout", "45")])));
        assert!(!agree(&id, &c, &attrs(&[("VisibilityTimeout", "46")])));
        let sel = select(all.clone(), &["DelaySeconds".into()]).unwrap();
        assert_eq!(sel.len(), 1);
        assert_eq!(
            select(all, &["Nope".into()]).unwrap_err().code,
            "InvalidAttributeName"
        );
    }

    #[test]
    fn bad_attributes_get_sqs_errors() {
        let id = id();
        for (k, v, code) in [
            ("VisibilityTimeout", "43201", "InvalidAttributeValue"),
            ("DelaySeconds", "x", "InvalidAttributeValue"),
            ("MessageRetentionPeriod", "59", "InvalidAttributeValue"),
            ("RedrivePolicy", "{", "InvalidAttributeValue"),
            (
                "RedrivePolicy",
                r#"{"maxReceiveCount":1}"#,
                "InvalidAttributeValue",
            ),
            ("ContentBasedDeduplication", "true", "InvalidAttributeName"),
            ("Nope", "1", "InvalidAttributeName"),
            ("FifoQueue", "true", "InvalidAttributeValue"),
            ("Policy", "{}", "InvalidAttributeValue"),
        ] {
            let mut c = defaults(false);
            let e = apply(&id, &mut c, &attrs(&[(k, v)]), true).unwrap_err();
            assert_eq!(e.code, code, "{k}={v}");
        }
        let mut c = defaults(true);
        assert!(
            apply(
                &id,
                &mut c,
                &attrs(&[("ContentBasedDeduplication", "true")]),
                true
            )
            .is_ok()
        );
        assert!(
            apply(
                &id,
                &mut c,
                &attrs(&[
                    ("FifoThroughputLimit", "perMessageGroupId"),
                    ("DeduplicationScope", "queue")
                ]),
                true
            )
            .is_err()
        );
    }
}
