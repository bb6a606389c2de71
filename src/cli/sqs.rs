//! SQS queues in the JSON the aws CLI prints: `tributary import sqs` reads it (queues with
//! their attributes, redrive policies and tags, onto core queues), `tributary export sqs`
//! writes it for the queues of a namespace, so the same file moves queues from SQS (or
//! ElasticMQ) to Tributary and from one Tributary to another.
//!
//! Accepted input:
//! - `{"QueueUrls": [...]}` (`aws sqs list-queues`): names only, no attributes (reported);
//! - `[{"QueueUrl": ..., "Attributes": {...}, "Tags": {...}}, ...]`, one object per queue
//!   (`aws sqs get-queue-attributes --attribute-names All` and `list-queue-tags` per queue;
//!   README has the loop), which is also what `export sqs` writes;
//! - one `{"Attributes": {...}}` (`aws sqs get-queue-attributes` of one queue), named by
//!   `--name` when it has no QueueUrl.
//!
//! Namespaces: the account id of an SQS queue URL is not a namespace name anyone chose, so
//! every queue of a file goes to `--namespace` (default `default`); a file with queues of
//! several accounts is refused (import each account with its own `--namespace`). The account
//! and region are kept on the queue (`sqs.account`, `sqs.region`) for `export sqs`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::{Value, json};
use tributary_proto::v1;

use super::table::Table;
use super::{CliError, Ctx, Output};

/// `extra` key prefix of the SQS attributes the core has no field for, kept as SQS printed
/// them so a future SQS gateway (and `export sqs`) reads them back.
const EXTRA: &str = "sqs.";
const EXTRA_TAG: &str = "sqs.tag.";
const EXTRA_ACCOUNT: &str = "sqs.account";
const EXTRA_REGION: &str = "sqs.region";
/// What `export sqs` writes for a queue imported without an account or region.
const DEFAULT_ACCOUNT: &str = "000000000000";
const DEFAULT_REGION: &str = "us-east-1";
/// SQS FIFO queues deduplicate over five minutes.
const FIFO_DEDUP_WINDOW_MS: i64 = 5 * 60 * 1000;

/// Why a file cannot be imported at all (attribute-level problems are report rows).
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error(
        "not what the aws CLI prints ({{\"QueueUrls\": [...]}}, [{{\"QueueUrl\", \"Attributes\", \"Tags\"}}, ...] or {{\"Attributes\": {{...}}}}): {0}"
    )]
    NotAwsJson(#[from] serde_json::Error),
    #[error("--name names one queue; the file has {0}")]
    NameForMany(usize),
    #[error("a queue with no QueueUrl, no QueueArn attribute and no --name")]
    NoName,
    #[error(
        "queues of {} accounts ({}): import each account's queues with its own --namespace",
        .0.len(),
        .0.join(", ")
    )]
    ManyAccounts(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Input {
    Urls {
        #[serde(rename = "QueueUrls")]
        queue_urls: Vec<String>,
    },
    Many(Vec<Entry>),
    One(Entry),
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Entry {
    #[serde(rename = "QueueUrl", default)]
    queue_url: Option<String>,
    #[serde(rename = "Attributes", default)]
    attributes: BTreeMap<String, Value>,
    #[serde(rename = "Tags", default)]
    tags: BTreeMap<String, String>,
    /// Set for a `list-queues` entry: there were no attributes to read.
    #[serde(skip)]
    url_only: bool,
}

/// Where an SQS queue lives, from its URL (`https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`,
/// or ElasticMQ's `http://host:9324/ACCOUNT/NAME`) or ARN (`arn:aws:sqs:REGION:ACCOUNT:NAME`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Location {
    pub name: String,
    pub account: Option<String>,
    pub region: Option<String>,
}

fn from_url(url: &str) -> Option<Location> {
    let path = url.split_once("://").map_or(url, |(_, rest)| rest);
    let mut parts = path.split('/');
    let host = parts.next()?;
    let rest: Vec<&str> = parts.filter(|p| !p.is_empty()).collect();
    let name = rest.last()?.to_string();
    let account = (rest.len() >= 2).then(|| rest[rest.len() - 2].to_string());
    let region = host
        .strip_prefix("sqs.")
        .and_then(|h| h.split('.').next())
        .filter(|r| !r.is_empty())
        .map(str::to_string);
    Some(Location {
        name,
        account,
        region,
    })
}

fn from_arn(arn: &str) -> Option<Location> {
    let parts: Vec<&str> = arn.split(':').collect();
    if parts.len() != 6 || parts[0] != "arn" || parts[2] != "sqs" {
        return None;
    }
    Some(Location {
        name: parts[5].to_string(),
        account: Some(parts[4].to_string()).filter(|a| !a.is_empty()),
        region: Some(parts[3].to_string()).filter(|r| !r.is_empty()),
    })
}

/// One attribute (or tag) of one queue and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttrRow {
    pub attribute: String,
    pub value: String,
    /// carried (a core setting), stored (in the queue's free-form attributes, for the SQS
    /// gateway; the core does not act on it), not carried, ignored (read-only state).
    pub outcome: &'static str,
    pub detail: String,
}

/// What one queue becomes.
#[derive(Debug, Clone)]
pub struct Plan {
    pub location: Location,
    pub config: v1::QueueConfig,
    /// The dead-letter queue of its redrive policy.
    pub dead_letter_queue: Option<String>,
    pub rows: Vec<AttrRow>,
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn seconds(v: &str, max: i64) -> Result<i64, String> {
    match v.trim().parse::<i64>() {
        Ok(n) if (0..=max).contains(&n) => Ok(n * 1000),
        _ => Err(format!("expected whole seconds 0..={max}")),
    }
}

/// The core queue for one queue of the input.
pub fn plan(entry: &Entry, name: Option<&str>) -> Result<Plan, InputError> {
    let attrs = &entry.attributes;
    let from_arn_attr = attrs
        .get("QueueArn")
        .and_then(|a| from_arn(&text(a)))
        .unwrap_or_default();
    let from_url_attr = entry
        .queue_url
        .as_deref()
        .and_then(from_url)
        .unwrap_or_default();
    let location = Location {
        name: name
            .map(str::to_string)
            .or(Some(from_url_attr.name.clone()).filter(|n| !n.is_empty()))
            .or(Some(from_arn_attr.name.clone()).filter(|n| !n.is_empty()))
            .ok_or(InputError::NoName)?,
        account: from_url_attr.account.or(from_arn_attr.account),
        region: from_url_attr.region.or(from_arn_attr.region),
    };
    let mut c = v1::QueueConfig::default();
    let mut rows = Vec::new();
    let mut dead_letter_queue = None;
    let fifo = location.name.ends_with(".fifo");
    if entry.url_only {
        rows.push(AttrRow {
            attribute: "Attributes".into(),
            value: String::new(),
            outcome: "not carried",
            detail: "`aws sqs list-queues` prints no attributes: the queue gets the defaults (see README for the loop that prints them)".into(),
        });
    }
    if fifo {
        c.fifo = Some(true);
        c.dedup_window_ms = Some(FIFO_DEDUP_WINDOW_MS);
    }
    for (attribute, v) in attrs {
        let value = text(v);
        let row = |outcome, detail: &str| AttrRow {
            attribute: attribute.clone(),
            value: value.clone(),
            outcome,
            detail: detail.to_string(),
        };
        let store = |c: &mut v1::QueueConfig, detail: &str| {
            c.extra.insert(format!("{EXTRA}{attribute}"), value.clone());
            row("stored", detail)
        };
        let r = match attribute.as_str() {
            "VisibilityTimeout" => match seconds(&value, 43_200) {
                Ok(ms) => {
                    c.visibility_timeout_ms = Some(ms);
                    row("carried", "lease length (visibility_timeout_ms)")
                }
                Err(e) => row("not carried", &e),
            },
            "DelaySeconds" => match seconds(&value, 900) {
                Ok(ms) => {
                    c.delivery_delay_ms = Some(ms);
                    row("carried", "delivery delay (delivery_delay_ms)")
                }
                Err(e) => row("not carried", &e),
            },
            "MessageRetentionPeriod" => match seconds(&value, 1_209_600) {
                // SQS deletes a message past its retention, never dead-letters it: the
                // core's TTL with dead_letter_expired off does the same.
                Ok(ms) => {
                    c.message_ttl_ms = Some(ms);
                    c.dead_letter_expired = Some(false);
                    row(
                        "carried",
                        "message TTL (message_ttl_ms), expired messages discarded (dead_letter_expired = false)",
                    )
                }
                Err(e) => row("not carried", &e),
            },
            "FifoQueue" => match (value.as_str(), fifo) {
                ("true", true) | ("false", false) => row(
                    "carried",
                    if fifo {
                        "FIFO (fifo, 5-minute dedup window)"
                    } else {
                        "standard queue"
                    },
                ),
                _ => row(
                    "not carried",
                    "contradicts the name (a FIFO queue's name ends in .fifo): the name decides",
                ),
            },
            "RedrivePolicy" => match redrive(&value) {
                Ok((target, max)) => {
                    if target.account.is_some()
                        && location.account.is_some()
                        && target.account != location.account
                    {
                        row(
                            "not carried",
                            &format!(
                                "the dead-letter queue is in account {}, another namespace: import it there and set it with `tributary queues declare`",
                                target.account.as_deref().unwrap_or("")
                            ),
                        )
                    } else {
                        c.dead_letter_queue = Some(target.name.clone());
                        c.max_delivery_count = Some(max);
                        dead_letter_queue = Some(target.name.clone());
                        row(
                            "carried",
                            &format!(
                                "dead_letter_queue {} after {max} receives (max_delivery_count)",
                                target.name
                            ),
                        )
                    }
                }
                Err(e) => row("not carried", &e),
            },
            "ReceiveMessageWaitTimeSeconds" => store(
                &mut c,
                "the default long-poll wait is the SQS gateway's: the core has no such setting",
            ),
            "MaximumMessageSize" => store(
                &mut c,
                "the core has no per-queue size limit: the SQS gateway enforces it",
            ),
            "ContentBasedDeduplication" | "DeduplicationScope" | "FifoThroughputLimit" => store(
                &mut c,
                "how the SQS gateway fills in dedup ids and message groups: the core has no such setting",
            ),
            "RedriveAllowPolicy" => store(
                &mut c,
                "which queues may use this one as their dead-letter queue: not enforced by the core",
            ),
            "KmsMasterKeyId" | "KmsDataKeyReusePeriodSeconds" | "SqsManagedSseEnabled" => {
                if value == "false" {
                    row("ignored", "encryption off")
                } else {
                    row(
                        "not carried",
                        "Tributary has no per-queue encryption: encryption at rest is the storage's (disk or object store)",
                    )
                }
            }
            "Policy" => row(
                "not carried",
                "access policies have no equivalent: Tributary's access is the config file's users and ACLs",
            ),
            "QueueArn"
            | "ApproximateNumberOfMessages"
            | "ApproximateNumberOfMessagesNotVisible"
            | "ApproximateNumberOfMessagesDelayed"
            | "CreatedTimestamp"
            | "LastModifiedTimestamp" => {
                row("ignored", "read-only state (messages are not carried)")
            }
            _ => row("not carried", "an attribute Tributary does not know"),
        };
        rows.push(r);
    }
    for (k, v) in &entry.tags {
        c.extra.insert(format!("{EXTRA_TAG}{k}"), v.clone());
        rows.push(AttrRow {
            attribute: format!("tag:{k}"),
            value: v.clone(),
            outcome: "stored",
            detail: "tags have no meaning to the core".into(),
        });
    }
    if let Some(a) = &location.account {
        c.extra.insert(EXTRA_ACCOUNT.into(), a.clone());
    }
    if let Some(r) = &location.region {
        c.extra.insert(EXTRA_REGION.into(), r.clone());
    }
    Ok(Plan {
        location,
        config: c,
        dead_letter_queue,
        rows,
    })
}

/// RedrivePolicy: `{"deadLetterTargetArn": "arn:...", "maxReceiveCount": 5}` (the count is a
/// string in older CLI output).
fn redrive(value: &str) -> Result<(Location, u32), String> {
    let v: Value = serde_json::from_str(value).map_err(|e| format!("not JSON: {e}"))?;
    let target = v
        .get("deadLetterTargetArn")
        .and_then(Value::as_str)
        .and_then(from_arn)
        .ok_or("no deadLetterTargetArn ARN")?;
    let max = match v.get("maxReceiveCount") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .filter(|n| (1..=1000).contains(n))
    .ok_or("maxReceiveCount must be 1..=1000")?;
    Ok((target, max as u32))
}

/// The queues of an input file, each with its entry.
fn entries(text: &str, name: Option<&str>) -> Result<Vec<Entry>, InputError> {
    let input: Input = serde_json::from_str(text)?;
    let out = match input {
        Input::Urls { queue_urls } => queue_urls
            .into_iter()
            .map(|u| Entry {
                queue_url: Some(u),
                url_only: true,
                ..Default::default()
            })
            .collect(),
        Input::Many(v) => v,
        Input::One(e) => vec![e],
    };
    if name.is_some() && out.len() != 1 {
        return Err(InputError::NameForMany(out.len()));
    }
    Ok(out)
}

/// The order to declare in: every dead-letter queue of the file before the queues that
/// use it.
fn declare_order(plans: &[Plan]) -> Vec<usize> {
    let index: BTreeMap<&str, usize> = plans
        .iter()
        .enumerate()
        .map(|(i, p)| (p.location.name.as_str(), i))
        .collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for start in 0..plans.len() {
        // Follow the chain of dead-letter queues down, then declare back up (a cycle, which
        // SQS allows, stops at a queue already on the way).
        let mut chain = Vec::new();
        let mut at = Some(start);
        while let Some(i) = at {
            if done.contains(&i) || chain.contains(&i) {
                break;
            }
            chain.push(i);
            at = plans[i]
                .dead_letter_queue
                .as_deref()
                .and_then(|d| index.get(d).copied());
        }
        for i in chain.into_iter().rev() {
            if done.insert(i) {
                out.push(i);
            }
        }
    }
    out
}

/// Creates the queues of `path` in `namespace` (with no `ctx`, only plans them).
pub async fn import(
    ctx: Option<&Ctx>,
    path: &std::path::Path,
    namespace: &str,
    name: Option<&str>,
) -> Result<Output, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let entries =
        entries(&text, name).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    let plans = entries
        .iter()
        .map(|e| plan(e, name))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    let accounts: BTreeSet<&str> = plans
        .iter()
        .filter_map(|p| p.location.account.as_deref())
        .collect();
    if accounts.len() > 1 {
        let e = InputError::ManyAccounts(accounts.into_iter().map(str::to_string).collect());
        return Err(CliError::Usage(format!("{}: {e}", path.display())));
    }
    // A namespace other than the default one is made if missing, as `import rabbitmq`
    // does for vhosts.
    let mut namespace_created = false;
    if let Some(ctx) = ctx
        && namespace != "default"
    {
        namespace_created = ctx
            .client
            .admin
            .clone()
            .create_namespace(v1::CreateNamespaceRequest {
                name: namespace.into(),
                labels: Default::default(),
                if_not_exists: true,
            })
            .await
            .map_err(|s| ctx.status(s))?
            .into_inner()
            .created;
    }
    let names: BTreeSet<&str> = plans.iter().map(|p| p.location.name.as_str()).collect();
    let mut table = Table::new(&["QUEUE", "ATTRIBUTE", "VALUE", "OUTCOME", "DETAIL"]);
    let mut queues = Vec::new();
    let mut failed = 0;
    for i in declare_order(&plans) {
        let p = &plans[i];
        let q = &p.location.name;
        let mut notes = Vec::new();
        if let Some(d) = &p.dead_letter_queue
            && !names.contains(d.as_str())
        {
            notes.push(format!(
                "its dead-letter queue {d} is not in the file: dead letters are dropped until it is declared"
            ));
        }
        let (outcome, detail) = match ctx {
            None => ("would create", String::new()),
            Some(ctx) => match ctx
                .client
                .admin
                .clone()
                .declare_queue(v1::DeclareQueueRequest {
                    id: Some(v1::QueueId {
                        namespace: namespace.into(),
                        name: q.clone(),
                    }),
                    config: Some(p.config.clone()),
                    durable: true,
                    ..Default::default()
                })
                .await
            {
                Ok(r) if r.get_ref().created => ("created", String::new()),
                Ok(_) => ("exists", "the same settings: left as it is".into()),
                Err(s) if s.code() == tonic::Code::AlreadyExists => {
                    failed += 1;
                    (
                        "failed",
                        "a queue of that name exists with other settings: left as it is".into(),
                    )
                }
                Err(s) => {
                    failed += 1;
                    ("failed", ctx.status(s).to_string())
                }
            },
        };
        let detail = std::iter::once(detail)
            .chain(notes)
            .filter(|d| !d.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        table.row(vec![
            q.clone(),
            String::new(),
            String::new(),
            outcome.into(),
            detail.clone(),
        ]);
        for r in &p.rows {
            table.row(vec![
                q.clone(),
                r.attribute.clone(),
                r.value.clone(),
                r.outcome.into(),
                r.detail.clone(),
            ]);
        }
        queues.push(json!({
            "queue": q,
            "outcome": outcome,
            "detail": detail,
            "attributes": p.rows.iter().map(|r| json!({
                "attribute": r.attribute,
                "value": r.value,
                "outcome": r.outcome,
                "detail": r.detail,
            })).collect::<Vec<_>>(),
        }));
    }
    if failed > 0 {
        return Err(CliError::Refused(format!(
            "{failed} queues failed to import:\n{}",
            table.render()
        )));
    }
    Ok(Output {
        table,
        json: json!({
            "dry_run": ctx.is_none(),
            "namespace": namespace,
            "namespace_created": namespace_created,
            "failed": failed,
            "queues": queues,
        }),
    })
}

/// The SQS form of one core queue, and the settings SQS has no attribute for.
pub fn render(q: &v1::QueueInfo) -> (Value, Vec<String>) {
    let name = q.id.as_ref().map_or("", |i| i.name.as_str());
    let c = q.config.clone().unwrap_or_default();
    let account = c
        .extra
        .get(EXTRA_ACCOUNT)
        .map_or(DEFAULT_ACCOUNT, String::as_str);
    let region = c
        .extra
        .get(EXTRA_REGION)
        .map_or(DEFAULT_REGION, String::as_str);
    let arn = |queue: &str| format!("arn:aws:sqs:{region}:{account}:{queue}");
    let mut attrs = serde_json::Map::new();
    let mut tags = serde_json::Map::new();
    let mut left_out = Vec::new();
    let secs = |ms: i64| (ms / 1000).to_string();
    attrs.insert("QueueArn".into(), arn(name).into());
    if let Some(ms) = c.visibility_timeout_ms {
        attrs.insert("VisibilityTimeout".into(), secs(ms).into());
    }
    if let Some(ms) = c.delivery_delay_ms {
        attrs.insert("DelaySeconds".into(), secs(ms).into());
    }
    if let Some(ms) = c.message_ttl_ms {
        attrs.insert("MessageRetentionPeriod".into(), secs(ms).into());
    }
    if c.fifo == Some(true) {
        attrs.insert("FifoQueue".into(), "true".into());
    }
    if let Some(dlq) = &c.dead_letter_queue {
        let max = c.max_delivery_count.unwrap_or(1);
        attrs.insert(
            "RedrivePolicy".into(),
            json!({"deadLetterTargetArn": arn(dlq), "maxReceiveCount": max})
                .to_string()
                .into(),
        );
    } else if c.max_delivery_count.is_some() {
        left_out.push("max_delivery_count without a dead-letter queue".into());
    }
    for (k, v) in &c.extra {
        if let Some(tag) = k.strip_prefix(EXTRA_TAG) {
            tags.insert(tag.into(), v.clone().into());
        } else if let Some(attr) = k.strip_prefix(EXTRA)
            && k != EXTRA_ACCOUNT
            && k != EXTRA_REGION
        {
            attrs.insert(attr.into(), v.clone().into());
        }
    }
    // What AMQP (or the core) set that SQS has no attribute for.
    for (what, set) in [
        ("max_length", c.max_length.is_some()),
        ("max_length_bytes", c.max_length_bytes.is_some()),
        ("expires_ms", c.expires_ms.is_some()),
        ("dead_letter_address", c.dead_letter_address.is_some()),
        ("max_priority", c.max_priority.is_some()),
        (
            "single_active_consumer",
            c.single_active_consumer == Some(true),
        ),
    ] {
        if set {
            left_out.push(what.to_string());
        }
    }
    let url = format!("https://sqs.{region}.amazonaws.com/{account}/{name}");
    (
        json!({"QueueUrl": url, "Attributes": attrs, "Tags": tags}),
        left_out,
    )
}

/// The queues of `namespace` as `import sqs` reads them, and per queue what SQS cannot hold.
pub async fn export(ctx: &Ctx, namespace: &str) -> Result<(Value, Vec<String>), CliError> {
    let mut queues = ctx
        .client
        .admin
        .clone()
        .list_queues(v1::ListQueuesRequest {
            namespace: namespace.into(),
        })
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner()
        .queues;
    queues.sort_by(|a, b| {
        let n = |q: &v1::QueueInfo| q.id.as_ref().map(|i| i.name.clone()).unwrap_or_default();
        n(a).cmp(&n(b))
    });
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for q in &queues {
        // Exclusive queues belong to one AMQP connection: not something to move.
        if q.exclusive {
            continue;
        }
        let (v, left_out) = render(q);
        if !left_out.is_empty() {
            notes.push(format!(
                "{}: no SQS attribute for {}",
                q.id.as_ref().map_or("", |i| i.name.as_str()),
                left_out.join(", ")
            ));
        }
        out.push(v);
    }
    Ok((Value::Array(out), notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(v: Value) -> Entry {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn attributes_map_to_the_core_queue() {
        let e = entry(json!({
            "QueueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/orders.fifo",
            "Attributes": {
                "VisibilityTimeout": "45", "DelaySeconds": "2", "MessageRetentionPeriod": "600",
                "FifoQueue": "true", "ContentBasedDeduplication": "true",
                "RedrivePolicy": "{\"deadLetterTargetArn\":\"arn:aws:sqs:eu-west-1:123456789012:dead.fifo\",\"maxReceiveCount\":\"4\"}",
                "KmsMasterKeyId": "alias/aws/sqs", "Policy": "{}", "ApproximateNumberOfMessages": "7",
                "ReceiveMessageWaitTimeSeconds": "20"
            },
            "Tags": {"team": "payments"}
        }));
        let p = plan(&e, None).unwrap();
        assert_eq!(p.location.name, "orders.fifo");
        assert_eq!(p.location.account.as_deref(), Some("123456789012"));
        assert_eq!(p.location.region.as_deref(), Some("eu-west-1"));
        let c = &p.config;
        assert_eq!(c.visibility_timeout_ms, Some(45_000));
        assert_eq!(c.delivery_delay_ms, Some(2_000));
        assert_eq!(c.fifo, Some(true));
        assert_eq!(c.dedup_window_ms, Some(FIFO_DEDUP_WINDOW_MS));
        assert_eq!(c.dead_letter_queue.as_deref(), Some("dead.fifo"));
        assert_eq!(c.max_delivery_count, Some(4));
        // Retention is a TTL whose expired messages are discarded, not dead-lettered.
        assert_eq!(c.message_ttl_ms, Some(600_000));
        assert_eq!(c.dead_letter_expired, Some(false));
        assert_eq!(c.extra["sqs.ReceiveMessageWaitTimeSeconds"], "20");
        assert_eq!(c.extra["sqs.tag.team"], "payments");
        let outcome = |a: &str| p.rows.iter().find(|r| r.attribute == a).unwrap().outcome;
        assert_eq!(outcome("KmsMasterKeyId"), "not carried");
        assert_eq!(outcome("Policy"), "not carried");
        assert_eq!(outcome("ApproximateNumberOfMessages"), "ignored");
        assert_eq!(outcome("RedrivePolicy"), "carried");
        assert_eq!(outcome("ContentBasedDeduplication"), "stored");
    }

    #[test]
    fn the_three_input_forms() {
        let urls = entries(
            r#"{"QueueUrls": ["http://localhost:9324/000000000000/a", "http://localhost:9324/000000000000/b"]}"#,
            None,
        )
        .unwrap();
        assert_eq!(urls.len(), 2);
        let p = plan(&urls[1], None).unwrap();
        assert_eq!(p.location.name, "b");
        assert_eq!(p.rows[0].outcome, "not carried", "no attributes: said so");
        let one = entries(
            r#"{"Attributes": {"VisibilityTimeout": "5"}}"#,
            Some("solo"),
        )
        .unwrap();
        let p = plan(&one[0], Some("solo")).unwrap();
        assert_eq!(p.config.visibility_timeout_ms, Some(5000));
        assert!(plan(&one[0], None).is_err(), "no name anywhere");
        assert!(entries("[1, 2]", None).is_err());
    }

    #[test]
    fn dead_letter_queues_are_declared_first_and_retention_without_one_is_a_ttl() {
        let src = entry(
            json!({"QueueUrl": "https://sqs.us-east-1.amazonaws.com/1/src",
            "Attributes": {"RedrivePolicy": "{\"deadLetterTargetArn\":\"arn:aws:sqs:us-east-1:1:mid\",\"maxReceiveCount\":3}"}}),
        );
        let mid = entry(
            json!({"QueueUrl": "https://sqs.us-east-1.amazonaws.com/1/mid",
            "Attributes": {"RedrivePolicy": "{\"deadLetterTargetArn\":\"arn:aws:sqs:us-east-1:1:last\",\"maxReceiveCount\":3}"}}),
        );
        let last = entry(
            json!({"QueueUrl": "https://sqs.us-east-1.amazonaws.com/1/last",
            "Attributes": {"MessageRetentionPeriod": "60"}}),
        );
        let plans: Vec<Plan> = [src, mid, last]
            .iter()
            .map(|e| plan(e, None).unwrap())
            .collect();
        assert_eq!(declare_order(&plans), vec![2, 1, 0]);
        assert_eq!(plans[2].config.message_ttl_ms, Some(60_000));
        // Another account's dead-letter queue is another namespace: reported.
        let other = entry(
            json!({"QueueUrl": "https://sqs.us-east-1.amazonaws.com/1/x",
            "Attributes": {"RedrivePolicy": "{\"deadLetterTargetArn\":\"arn:aws:sqs:us-east-1:2:y\",\"maxReceiveCount\":3}"}}),
        );
        let p = plan(&other, None).unwrap();
        assert_eq!(p.config.dead_letter_queue, None);
        assert_eq!(p.rows[0].outcome, "not carried");
    }

    #[test]
    fn a_rendered_queue_plans_back_to_the_same_config() {
        let e = entry(json!({
            "QueueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/jobs",
            "Attributes": {"VisibilityTimeout": "45", "DelaySeconds": "2",
                "RedrivePolicy": "{\"deadLetterTargetArn\":\"arn:aws:sqs:eu-west-1:123456789012:dead\",\"maxReceiveCount\":4}",
                "MessageRetentionPeriod": "600", "MaximumMessageSize": "1024"},
            "Tags": {"team": "x"}
        }));
        let p = plan(&e, None).unwrap();
        let info = v1::QueueInfo {
            id: Some(v1::QueueId {
                namespace: "default".into(),
                name: "jobs".into(),
            }),
            config: Some(p.config.clone()),
            ..Default::default()
        };
        let (v, left_out) = render(&info);
        assert!(left_out.is_empty(), "{left_out:?}");
        let back = plan(&entry(v), None).unwrap();
        assert_eq!(back.config, p.config);
        assert_eq!(back.location, p.location);
    }
}
