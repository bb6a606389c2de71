//! The SQS actions, each a few core calls: queues are the core's queues, a send is an
//! `Enqueue`, a receive a `Receive` (the core holds a long poll until a message is ready,
//! so a send through any gateway wakes it), a delete an `Ack` of the receipt handle (the
//! core's lease id, valid through any gateway), a visibility change a `ChangeLease`, and a
//! message move task a core redrive.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tracing::warn;
use tributary_gateway_common::{CoreClient, Traffic, error_code};
use tributary_proto::v1::{self, ErrorCode};

use crate::attributes::{self as qattr, extra};
use crate::error::{SqsError, SqsResult};
use crate::message::{self, Attribute};
use crate::names::{Identity, check_queue_name};
use crate::params::Params;

/// Entries of a batch, at most.
const MAX_BATCH: usize = 10;
/// A batch's messages together, at most (SQS's limit since 2025).
const MAX_BATCH_BYTES: usize = 1_048_576;
/// How long a queue's configuration is trusted before it is read again from the core: a
/// SetQueueAttributes through another gateway takes effect here within this time.
const CONFIG_TTL: Duration = Duration::from_secs(1);
/// FIFO receive attempts remembered (ReceiveRequestAttemptId), for five minutes each.
const MAX_ATTEMPTS: usize = 10_000;
const ATTEMPT_TTL: Duration = Duration::from_secs(300);

/// Every action this gateway knows (also the metrics' `action` label values).
pub const ACTIONS: &[&str] = &[
    "CreateQueue",
    "GetQueueUrl",
    "ListQueues",
    "DeleteQueue",
    "GetQueueAttributes",
    "SetQueueAttributes",
    "PurgeQueue",
    "SendMessage",
    "SendMessageBatch",
    "ReceiveMessage",
    "DeleteMessage",
    "DeleteMessageBatch",
    "ChangeMessageVisibility",
    "ChangeMessageVisibilityBatch",
    "TagQueue",
    "UntagQueue",
    "ListQueueTags",
    "ListDeadLetterSourceQueues",
    "StartMessageMoveTask",
    "ListMessageMoveTasks",
    "CancelMessageMoveTask",
    "AddPermission",
    "RemovePermission",
];

const SYSTEM_ATTRIBUTE_NAMES: &[&str] = &[
    "All",
    "SenderId",
    "SentTimestamp",
    "ApproximateReceiveCount",
    "ApproximateFirstReceiveTimestamp",
    "SequenceNumber",
    "MessageDeduplicationId",
    "MessageGroupId",
    "AWSTraceHeader",
    "DeadLetterQueueSourceArn",
];

/// Header keeping a FIFO message's deduplication id as sent when the core deduplicates by
/// another key (DeduplicationScope messageGroup).
const DEDUP_ID_HEADER: &str = "sqs.deduplication-id";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A random (version 4) UUID: SQS's message ids and request ids.
pub(crate) fn random_uuid() -> String {
    let b: [u8; 16] = rand::random();
    let hex: String = b
        .iter()
        .enumerate()
        .map(|(i, b)| match i {
            6 => format!("{:02x}", (b & 0x0f) | 0x40),
            8 => format!("{:02x}", (b & 0x3f) | 0x80),
            _ => format!("{b:02x}"),
        })
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A core error as SQS says it.
pub fn core_error(status: &tonic::Status) -> SqsError {
    match error_code(status) {
        ErrorCode::QueueNotFound | ErrorCode::NamespaceNotFound => SqsError::no_queue(),
        ErrorCode::QueueExists => SqsError::queue_name_exists(status.message()),
        ErrorCode::InvalidArgument | ErrorCode::InvalidConfig | ErrorCode::RecordTooLarge => {
            SqsError::invalid_parameter_value(status.message())
        }
        ErrorCode::ShuttingDown => SqsError::unavailable("The service is shutting down."),
        ErrorCode::Conflict | ErrorCode::ResourceLocked => {
            SqsError::invalid_parameter_value(status.message())
        }
        ErrorCode::Unauthenticated => SqsError::access_denied(status.message()),
        code => {
            warn!(?code, message = status.message(), "core call failed");
            SqsError::internal("We encountered an internal error. Please try again.")
        }
    }
}

/// One request's context beyond its parameters.
pub struct Call<'a> {
    pub params: &'a Params,
    /// What queue URLs start with (`http://host:port`, from the request's Host).
    pub base: &'a str,
    /// The request's path: the queue URL of the legacy query form, which names the queue
    /// by where it is sent.
    pub path: &'a str,
    /// SenderId: the access key id, or the account id of an unsigned request.
    pub sender: &'a str,
    /// The connection's listener's message counters.
    pub traffic: &'a Traffic,
}

struct CachedConfig {
    at: Instant,
    config: Arc<v1::QueueConfig>,
}

/// The SQS service over one core.
pub struct Service {
    pub client: CoreClient,
    pub identity: Identity,
    configs: Mutex<HashMap<String, CachedConfig>>,
    attempts: Mutex<HashMap<(String, String), (Instant, Value)>>,
}

impl Service {
    pub fn new(client: CoreClient, identity: Identity) -> Self {
        Self {
            client,
            identity,
            configs: Mutex::new(HashMap::new()),
            attempts: Mutex::new(HashMap::new()),
        }
    }

    fn qid(&self, name: &str) -> Option<v1::QueueId> {
        Some(v1::QueueId {
            namespace: self.identity.namespace.clone(),
            name: name.to_string(),
        })
    }

    fn url(&self, call: &Call<'_>, name: &str) -> String {
        self.identity.url(call.base, name)
    }

    /// The queue the request names: its QueueUrl, else (legacy query form) its path.
    fn queue_name(&self, call: &Call<'_>) -> SqsResult<String> {
        match call.params.str("QueueUrl")? {
            Some(url) => self.identity.name_of_url(url),
            None if call.path.trim_matches('/').is_empty() => Err(SqsError::missing("QueueUrl")),
            None => self.identity.name_of_url(call.path),
        }
    }

    async fn info(&self, name: &str) -> SqsResult<v1::QueueInfo> {
        let r = self
            .client
            .admin
            .clone()
            .declare_queue(v1::DeclareQueueRequest {
                id: self.qid(name),
                passive: true,
                ..Default::default()
            })
            .await
            .map_err(|e| core_error(&e))?;
        let info = r.into_inner().queue.unwrap_or_default();
        self.remember(name, info.config.clone().unwrap_or_default());
        Ok(info)
    }

    fn remember(&self, name: &str, config: v1::QueueConfig) {
        self.configs.lock().insert(
            name.to_string(),
            CachedConfig {
                at: Instant::now(),
                config: Arc::new(config),
            },
        );
    }

    fn forget(&self, name: &str) {
        self.configs.lock().remove(name);
    }

    /// The queue's configuration, read from the core at most once per [`CONFIG_TTL`].
    async fn config(&self, name: &str) -> SqsResult<Arc<v1::QueueConfig>> {
        if let Some(c) = self.configs.lock().get(name)
            && c.at.elapsed() < CONFIG_TTL
        {
            return Ok(c.config.clone());
        }
        let info = self.info(name).await?;
        Ok(Arc::new(info.config.unwrap_or_default()))
    }

    /// A core call on a queue failed: a queue that is gone is forgotten.
    fn queue_error(&self, name: &str, status: &tonic::Status) -> SqsError {
        let e = core_error(status);
        if e.shape == "QueueDoesNotExist" {
            self.forget(name);
        }
        e
    }

    pub async fn dispatch(&self, action: &str, call: &Call<'_>) -> SqsResult<Value> {
        match action {
            "CreateQueue" => self.create_queue(call).await,
            "GetQueueUrl" => self.get_queue_url(call).await,
            "ListQueues" => self.list_queues(call).await,
            "DeleteQueue" => self.delete_queue(call).await,
            "GetQueueAttributes" => self.get_queue_attributes(call).await,
            "SetQueueAttributes" => self.set_queue_attributes(call).await,
            "PurgeQueue" => self.purge_queue(call).await,
            "SendMessage" => self.send_message(call).await,
            "SendMessageBatch" => self.send_message_batch(call).await,
            "ReceiveMessage" => self.receive_message(call).await,
            "DeleteMessage" => self.delete_message(call).await,
            "DeleteMessageBatch" => self.delete_message_batch(call).await,
            "ChangeMessageVisibility" => self.change_visibility(call).await,
            "ChangeMessageVisibilityBatch" => self.change_visibility_batch(call).await,
            "TagQueue" => self.tag_queue(call).await,
            "UntagQueue" => self.untag_queue(call).await,
            "ListQueueTags" => self.list_queue_tags(call).await,
            "ListDeadLetterSourceQueues" => self.list_dead_letter_sources(call).await,
            "StartMessageMoveTask" => self.start_move_task(call).await,
            "ListMessageMoveTasks" => self.list_move_tasks(call).await,
            "CancelMessageMoveTask" => self.cancel_move_task(call).await,
            "AddPermission" | "RemovePermission" => Err(SqsError::unsupported_operation(format!(
                "{action} is not supported: Tributary grants access with the keys in sqs_credentials, not queue policies."
            ))),
            _ => Err(SqsError::invalid_action(format!(
                "The action {action} is not valid for this endpoint."
            ))),
        }
    }

    // ---- queues ----

    async fn check_dead_letter_target(&self, dlq: &str, fifo: bool) -> SqsResult<()> {
        let bad = |why: &str| {
            SqsError::invalid_parameter_value(format!(
                "Value {} for parameter RedrivePolicy is invalid. Reason: {why}.",
                self.identity.arn(dlq)
            ))
        };
        match self.info(dlq).await {
            Ok(info) => {
                let dlq_fifo = info.config.and_then(|c| c.fifo) == Some(true);
                if dlq_fifo != fifo {
                    return Err(bad(
                        "Dead-letter queue must be same type of queue as the source",
                    ));
                }
                Ok(())
            }
            Err(e) if e.shape == "QueueDoesNotExist" => {
                Err(bad("Dead-letter target does not exist"))
            }
            Err(e) => Err(e),
        }
    }

    async fn create_queue(&self, call: &Call<'_>) -> SqsResult<Value> {
        let p = call.params;
        let name = p.required_str("QueueName")?;
        let attrs = p.string_map("Attributes")?;
        let fifo = match attrs.get("FifoQueue") {
            Some(v) => match v.trim().to_ascii_lowercase().as_str() {
                "true" => true,
                "false" => false,
                _ => {
                    return Err(SqsError::invalid_attribute_value(format!(
                        "Invalid value for the parameter FifoQueue: {v}."
                    )));
                }
            },
            None => false,
        };
        check_queue_name(name, fifo)?;
        let mut tags = p.string_map("tags")?;
        tags.extend(p.string_map("Tags")?);
        let url = json!({"QueueUrl": self.url(call, name)});
        match self.info(name).await {
            Ok(existing) => return self.same_queue(name, &existing, &attrs).map(|()| url),
            Err(e) if e.shape == "QueueDoesNotExist" => {}
            Err(e) => return Err(e),
        }
        let mut c = qattr::defaults(fifo);
        if let Some(dlq) = qattr::apply(&self.identity, &mut c, &attrs, true)? {
            self.check_dead_letter_target(&dlq, fifo).await?;
        }
        qattr::set_tags(&mut c, &tags)?;
        qattr::touch(&mut c, now_ms() / 1000);
        let declared = self
            .client
            .admin
            .clone()
            .declare_queue(v1::DeclareQueueRequest {
                id: self.qid(name),
                config: Some(c),
                durable: true,
                ..Default::default()
            })
            .await;
        match declared {
            Ok(_) => {
                self.forget(name);
                Ok(url)
            }
            // Created meanwhile through another gateway (or an AMQP client).
            Err(s) if error_code(&s) == ErrorCode::QueueExists => {
                let existing = self.info(name).await?;
                self.same_queue(name, &existing, &attrs).map(|()| url)
            }
            Err(s) => Err(core_error(&s)),
        }
    }

    fn same_queue(
        &self,
        name: &str,
        existing: &v1::QueueInfo,
        attrs: &BTreeMap<String, String>,
    ) -> SqsResult<()> {
        let c = existing.config.clone().unwrap_or_default();
        if qattr::agree(&self.identity, &c, attrs) {
            Ok(())
        } else {
            Err(SqsError::queue_name_exists(format!(
                "A queue already exists with the same name and a different value for attribute(s) {}: {name}",
                attrs.keys().cloned().collect::<Vec<_>>().join(", ")
            )))
        }
    }

    async fn get_queue_url(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = call.params.required_str("QueueName")?;
        if let Some(owner) = call.params.str("QueueOwnerAWSAccountId")?
            && owner != self.identity.account_id
        {
            return Err(SqsError::no_queue());
        }
        self.info(name).await?;
        Ok(json!({"QueueUrl": self.url(call, name)}))
    }

    async fn all_queues(&self) -> SqsResult<Vec<v1::QueueInfo>> {
        let r = self
            .client
            .admin
            .clone()
            .list_queues(v1::ListQueuesRequest {
                namespace: self.identity.namespace.clone(),
            })
            .await
            .map_err(|e| core_error(&e))?;
        let mut queues: Vec<v1::QueueInfo> = r
            .into_inner()
            .queues
            .into_iter()
            // A connection's own queue (AMQP exclusive) is nobody else's business.
            .filter(|q| !q.exclusive)
            .collect();
        queues.sort_by(|a, b| name_of(a).cmp(name_of(b)));
        Ok(queues)
    }

    /// A page of queue names after NextToken (a name), MaxResults long when given.
    fn page(&self, call: &Call<'_>, names: Vec<String>, list_key: &str) -> SqsResult<Value> {
        let p = call.params;
        let max = p.int_in("MaxResults", 1, 1000)?;
        let after = p.str("NextToken")?.map(str::to_string);
        let mut rest: Vec<String> = names
            .into_iter()
            .filter(|n| after.as_ref().is_none_or(|a| n > a))
            .collect();
        let mut out = Map::new();
        let limit = max.unwrap_or(1000) as usize;
        let more = rest.len() > limit;
        rest.truncate(limit);
        if more
            && max.is_some()
            && let Some(last) = rest.last()
        {
            out.insert("NextToken".into(), Value::String(last.clone()));
        }
        if !rest.is_empty() || list_key == "queueUrls" {
            out.insert(
                list_key.into(),
                Value::Array(
                    rest.iter()
                        .map(|n| Value::String(self.url(call, n)))
                        .collect(),
                ),
            );
        }
        Ok(Value::Object(out))
    }

    async fn list_queues(&self, call: &Call<'_>) -> SqsResult<Value> {
        let prefix = call.params.str("QueueNamePrefix")?.unwrap_or("");
        let names = self
            .all_queues()
            .await?
            .iter()
            .map(|q| name_of(q).to_string())
            .filter(|n| n.starts_with(prefix))
            .collect();
        self.page(call, names, "QueueUrls")
    }

    async fn delete_queue(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = self.queue_name(call)?;
        self.client
            .admin
            .clone()
            .delete_queue(v1::DeleteQueueRequest {
                id: self.qid(&name),
                ..Default::default()
            })
            .await
            .map_err(|e| self.queue_error(&name, &e))?;
        self.forget(&name);
        Ok(json!({}))
    }

    async fn get_queue_attributes(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = self.queue_name(call)?;
        let names = call.params.strings("AttributeNames")?;
        let info = self.info(&name).await?;
        let attrs = qattr::select(qattr::all(&self.identity, &info), &names)?;
        if attrs.is_empty() {
            return Ok(json!({}));
        }
        Ok(json!({"Attributes": attrs}))
    }

    async fn update(&self, name: &str, config: v1::QueueConfig) -> SqsResult<()> {
        self.client
            .admin
            .clone()
            .update_queue(v1::UpdateQueueRequest {
                id: self.qid(name),
                config: Some(config),
            })
            .await
            .map_err(|e| self.queue_error(name, &e))?;
        self.forget(name);
        Ok(())
    }

    async fn set_queue_attributes(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = self.queue_name(call)?;
        if call.params.get("Attributes").is_none() {
            return Err(SqsError::missing("Attributes"));
        }
        let attrs = call.params.string_map("Attributes")?;
        let info = self.info(&name).await?;
        let mut c = info.config.unwrap_or_default();
        if let Some(dlq) = qattr::apply(&self.identity, &mut c, &attrs, false)? {
            self.check_dead_letter_target(&dlq, c.fifo == Some(true))
                .await?;
        }
        qattr::touch(&mut c, now_ms() / 1000);
        self.update(&name, c).await?;
        Ok(json!({}))
    }

    async fn purge_queue(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = self.queue_name(call)?;
        self.client
            .admin
            .clone()
            .purge_queue(v1::PurgeQueueRequest {
                id: self.qid(&name),
            })
            .await
            .map_err(|e| self.queue_error(&name, &e))?;
        Ok(json!({}))
    }

    async fn tag_queue(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = self.queue_name(call)?;
        if call.params.get("Tags").is_none() {
            return Err(SqsError::missing("Tags"));
        }
        let tags = call.params.string_map("Tags")?;
        let mut c = self.info(&name).await?.config.unwrap_or_default();
        qattr::set_tags(&mut c, &tags)?;
        self.update(&name, c).await?;
        Ok(json!({}))
    }

    async fn untag_queue(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = self.queue_name(call)?;
        if call.params.get("TagKeys").is_none() {
            return Err(SqsError::missing("TagKeys"));
        }
        let keys = call.params.strings("TagKeys")?;
        let mut c = self.info(&name).await?.config.unwrap_or_default();
        for k in keys {
            c.extra.remove(&format!("{}{k}", qattr::EXTRA_TAG));
        }
        self.update(&name, c).await?;
        Ok(json!({}))
    }

    async fn list_queue_tags(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = self.queue_name(call)?;
        let tags = qattr::tags(&self.info(&name).await?.config.unwrap_or_default());
        if tags.is_empty() {
            return Ok(json!({}));
        }
        Ok(json!({"Tags": tags}))
    }

    async fn list_dead_letter_sources(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = self.queue_name(call)?;
        self.info(&name).await?;
        let names = self
            .all_queues()
            .await?
            .iter()
            .filter(|q| {
                q.config
                    .as_ref()
                    .and_then(|c| c.dead_letter_queue.as_deref())
                    == Some(name.as_str())
            })
            .map(|q| name_of(q).to_string())
            .collect();
        self.page(call, names, "queueUrls")
    }

    // ---- message move tasks ----

    async fn start_move_task(&self, call: &Call<'_>) -> SqsResult<Value> {
        let p = call.params;
        let source = self
            .identity
            .name_of_arn("SourceArn", p.required_str("SourceArn")?)?;
        let destination = match p.str("DestinationArn")? {
            Some(arn) => {
                let d = self.identity.name_of_arn("DestinationArn", arn)?;
                self.info(&d).await?;
                d
            }
            None => String::new(),
        };
        let rate = p.int_in("MaxNumberOfMessagesPerSecond", 1, 500)?;
        self.info(&source).await?;
        let is_dlq = self.all_queues().await?.iter().any(|q| {
            q.config
                .as_ref()
                .and_then(|c| c.dead_letter_queue.as_deref())
                == Some(source.as_str())
        });
        if !is_dlq {
            return Err(SqsError::invalid_parameter_value(
                "Source queue must be configured as a Dead Letter Queue.",
            ));
        }
        let r = self
            .client
            .queues
            .clone()
            .start_redrive(v1::StartRedriveRequest {
                source: self.qid(&source),
                destination,
                max_messages_per_second: rate.unwrap_or(0) as u32,
                ..Default::default()
            })
            .await
            .map_err(|e| self.queue_error(&source, &e))?;
        Ok(json!({"TaskHandle": r.into_inner().task_id}))
    }

    async fn list_move_tasks(&self, call: &Call<'_>) -> SqsResult<Value> {
        let p = call.params;
        let source_arn = p.required_str("SourceArn")?;
        let source = self.identity.name_of_arn("SourceArn", source_arn)?;
        let max = p.int_in("MaxResults", 1, 10)?.unwrap_or(1) as usize;
        let r = self
            .client
            .queues
            .clone()
            .list_redrives(v1::ListRedrivesRequest {
                source: self.qid(&source),
            })
            .await
            .map_err(|e| self.queue_error(&source, &e))?;
        let mut tasks = r.into_inner().tasks;
        tasks.sort_by_key(|t| std::cmp::Reverse(t.started_at_ms));
        let results: Vec<Value> = tasks
            .iter()
            .take(max)
            .map(|t| {
                let mut m = Map::new();
                if t.status == "RUNNING" {
                    m.insert("TaskHandle".into(), json!(t.task_id));
                }
                m.insert("Status".into(), json!(t.status));
                m.insert("SourceArn".into(), json!(source_arn));
                if !t.destination.is_empty() {
                    m.insert(
                        "DestinationArn".into(),
                        json!(self.identity.arn(&t.destination)),
                    );
                }
                m.insert("ApproximateNumberOfMessagesMoved".into(), json!(t.moved));
                m.insert("ApproximateNumberOfMessagesToMove".into(), json!(t.to_move));
                if !t.failure_reason.is_empty() {
                    m.insert("FailureReason".into(), json!(t.failure_reason));
                }
                m.insert("StartedTimestamp".into(), json!(t.started_at_ms));
                Value::Object(m)
            })
            .collect();
        Ok(json!({"Results": results}))
    }

    async fn cancel_move_task(&self, call: &Call<'_>) -> SqsResult<Value> {
        let handle = call.params.required_str("TaskHandle")?;
        let r = self
            .client
            .queues
            .clone()
            .cancel_redrive(v1::CancelRedriveRequest {
                task_id: handle.to_string(),
            })
            .await
            .map_err(|e| match error_code(&e) {
                ErrorCode::InvalidArgument => SqsError::resource_not_found(
                    "The resource that you specified for the TaskHandle parameter does not exist.",
                ),
                _ => core_error(&e),
            })?;
        let moved = r.into_inner().task.map_or(0, |t| t.moved);
        Ok(json!({"ApproximateNumberOfMessagesMoved": moved}))
    }

    // ---- messages ----

    /// One message of a send, checked against its queue, as a core record, with what the
    /// answer says of it.
    fn build_message(
        &self,
        config: &v1::QueueConfig,
        p: &Params,
        sender: &str,
        now: i64,
    ) -> SqsResult<(v1::Record, Map<String, Value>, usize)> {
        let fifo = config.fifo == Some(true);
        let body = match p.str("MessageBody")? {
            Some(b) if !b.is_empty() => b,
            _ => return Err(SqsError::missing("MessageBody")),
        };
        message::check_text("the message body", body)?;
        let attrs =
            message::parse_attributes("message attribute", &p.object("MessageAttributes")?)?;
        let system = message::parse_attributes(
            "message system attribute",
            &p.object("MessageSystemAttributes")?,
        )?;
        if let Some(a) = system.iter().find(|a| a.name != "AWSTraceHeader") {
            return Err(SqsError::invalid_parameter_value(format!(
                "Message system attribute name '{}' is invalid.",
                a.name
            )));
        }
        if let Some(a) = system.iter().find(|a| a.data_type != "String") {
            return Err(SqsError::invalid_parameter_value(format!(
                "Message system attribute '{}' must have the type String.",
                a.name
            )));
        }
        let size = body.len() + attrs.iter().map(Attribute::size).sum::<usize>();
        let max_size = extra(config, "MaximumMessageSize")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(qattr::DEFAULT_MAX_MESSAGE_SIZE as usize);
        if size > max_size {
            return Err(SqsError::invalid_parameter_value(format!(
                "One or more parameters are invalid. Reason: Message must be shorter than {max_size} bytes."
            )));
        }
        let delay = p.int_in("DelaySeconds", 0, 900)?;
        if fifo && delay.is_some_and(|d| d > 0) {
            return Err(SqsError::bad_value(
                "DelaySeconds",
                delay.unwrap_or(0),
                "The request include parameter that is not valid for this queue type",
            ));
        }
        let group = p.str("MessageGroupId")?;
        let dedup = p.str("MessageDeduplicationId")?;
        for (what, v) in [("MessageGroupId", group), ("MessageDeduplicationId", dedup)] {
            if let Some(v) = v
                && (v.is_empty() || v.len() > 128 || !v.bytes().all(|b| b.is_ascii_graphic()))
            {
                return Err(SqsError::bad_value(
                    what,
                    v,
                    "It can contain only alphanumeric characters and punctuation, and be 1 to 128 long",
                ));
            }
        }
        let mut headers = message::headers(&attrs, &system);
        let (group, dedup_key) = if fifo {
            let group = group.ok_or_else(|| SqsError::missing("MessageGroupId"))?;
            let dedup_id = match dedup {
                Some(d) => d.to_string(),
                None if extra(config, "ContentBasedDeduplication") == Some("true") => {
                    sha256_hex(&[body.as_bytes()])
                }
                None => {
                    return Err(SqsError::invalid_parameter_value(
                        "The queue should either have ContentBasedDeduplication enabled or MessageDeduplicationId provided explicitly",
                    ));
                }
            };
            let key = if extra(config, "DeduplicationScope") == Some("messageGroup") {
                headers.push(v1::Header {
                    name: DEDUP_ID_HEADER.into(),
                    value: Bytes::from(dedup_id.clone()),
                });
                sha256_hex(&[group.as_bytes(), b"\0", dedup_id.as_bytes()])
            } else {
                dedup_id
            };
            (group.to_string(), key)
        } else {
            if dedup.is_some() {
                return Err(SqsError::bad_value(
                    "MessageDeduplicationId",
                    dedup.unwrap_or(""),
                    "The request includes a parameter that is not valid for this queue type",
                ));
            }
            (group.unwrap_or("").to_string(), String::new())
        };
        let message_id = random_uuid();
        let record = v1::Record {
            value: Bytes::from(body.to_string()),
            headers,
            timestamp_ms: now,
            properties: Some(v1::SystemProperties {
                message_id: message_id.clone(),
                message_group: group,
                dedup_id: dedup_key,
                deliver_at_ms: delay.filter(|d| *d > 0).map_or(0, |d| now + d * 1000),
                origin_protocol: "sqs".into(),
                user_id: sender.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut answer = Map::new();
        answer.insert("MessageId".into(), json!(message_id));
        answer.insert(
            "MD5OfMessageBody".into(),
            json!(message::md5_hex(body.as_bytes())),
        );
        if let Some(md5) = message::attributes_md5(&attrs) {
            answer.insert("MD5OfMessageAttributes".into(), json!(md5));
        }
        if let Some(md5) = message::attributes_md5(&system) {
            answer.insert("MD5OfMessageSystemAttributes".into(), json!(md5));
        }
        Ok((record, answer, size))
    }

    async fn enqueue(
        &self,
        name: &str,
        records: Vec<v1::Record>,
    ) -> SqsResult<v1::EnqueueResponse> {
        self.client
            .enqueue(v1::EnqueueRequest {
                queue: self.qid(name),
                records,
            })
            .await
            .map_err(|e| self.queue_error(name, &e))
    }

    /// SequenceNumber of a FIFO message: its position in the queue, as SQS's 20 digits.
    fn sequence_number(id: i64) -> String {
        format!("{:020}", id.max(0))
    }

    async fn send_message(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = self.queue_name(call)?;
        let config = self.config(&name).await?;
        let (record, mut answer, _) =
            self.build_message(&config, call.params, call.sender, now_ms())?;
        let bytes = record.value.len();
        let r = self.enqueue(&name, vec![record]).await?;
        call.traffic.received(1, bytes);
        if config.fifo == Some(true)
            && let Some(id) = r.message_ids.first().filter(|id| **id >= 0)
        {
            answer.insert("SequenceNumber".into(), json!(Self::sequence_number(*id)));
        }
        Ok(Value::Object(answer))
    }

    /// Batch entries checked as a whole: present, at most ten, ids well formed and distinct.
    fn batch_entries(p: &Params) -> SqsResult<Vec<Params>> {
        let entries = p.entries("Entries")?;
        if entries.is_empty() {
            return Err(SqsError::empty_batch_request(
                "There should be at least one SendMessageBatchRequestEntry in the request.",
            ));
        }
        if entries.len() > MAX_BATCH {
            return Err(SqsError::too_many_entries(format!(
                "Maximum number of entries per request are {MAX_BATCH}. You have sent {}.",
                entries.len()
            )));
        }
        let mut seen = HashSet::new();
        for e in &entries {
            let id = e.required_str("Id")?;
            if id.is_empty()
                || id.len() > 80
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(SqsError::invalid_batch_entry_id(
                    "A batch entry id can only contain alphanumeric characters, hyphens and underscores. It can be at most 80 letters long.",
                ));
            }
            if !seen.insert(id.to_string()) {
                return Err(SqsError::batch_entry_ids_not_distinct(format!(
                    "Id {id} repeated."
                )));
            }
        }
        Ok(entries)
    }

    fn failed(id: &str, e: &SqsError) -> Value {
        json!({"Id": id, "SenderFault": e.sender, "Code": e.code, "Message": e.message})
    }

    async fn send_message_batch(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = self.queue_name(call)?;
        let entries = Self::batch_entries(call.params)?;
        let config = self.config(&name).await?;
        let now = now_ms();
        let mut failed = Vec::new();
        let mut ok = Vec::new();
        let mut total = 0;
        for e in &entries {
            let id = e.required_str("Id")?.to_string();
            match self.build_message(&config, e, call.sender, now) {
                Ok((record, mut answer, size)) => {
                    total += size;
                    answer.insert("Id".into(), json!(id));
                    ok.push((record, answer));
                }
                Err(err) => failed.push(Self::failed(&id, &err)),
            }
        }
        if total > MAX_BATCH_BYTES {
            return Err(SqsError::batch_request_too_long(format!(
                "Batch requests cannot be longer than {MAX_BATCH_BYTES} bytes. You have sent {total} bytes."
            )));
        }
        let mut successful = Vec::new();
        if !ok.is_empty() {
            let (records, answers): (Vec<_>, Vec<_>) = ok.into_iter().unzip();
            let bytes = records.iter().map(|r| r.value.len()).sum();
            let n = records.len() as u64;
            let r = self.enqueue(&name, records).await?;
            call.traffic.received(n, bytes);
            for (i, mut a) in answers.into_iter().enumerate() {
                if config.fifo == Some(true)
                    && let Some(id) = r.message_ids.get(i).filter(|id| **id >= 0)
                {
                    a.insert("SequenceNumber".into(), json!(Self::sequence_number(*id)));
                }
                successful.push(Value::Object(a));
            }
        }
        Ok(json!({"Successful": successful, "Failed": failed}))
    }

    async fn receive_message(&self, call: &Call<'_>) -> SqsResult<Value> {
        let p = call.params;
        let name = self.queue_name(call)?;
        let max = p.int("MaxNumberOfMessages")?.unwrap_or(1);
        if !(1..=10).contains(&max) {
            return Err(SqsError::bad_value(
                "MaxNumberOfMessages",
                max,
                "Must be between 1 and 10, if provided",
            ));
        }
        let visibility = p.int_in("VisibilityTimeout", 0, 43_200)?;
        let wait = p.int_in("WaitTimeSeconds", 0, 20)?;
        let mut system_names = p.strings("AttributeNames")?;
        system_names.extend(p.strings("MessageSystemAttributeNames")?);
        if let Some(n) = system_names
            .iter()
            .find(|n| !SYSTEM_ATTRIBUTE_NAMES.contains(&n.as_str()))
        {
            return Err(SqsError::invalid_attribute_name(format!(
                "Unknown Attribute {n}."
            )));
        }
        let attribute_names = p.strings("MessageAttributeNames")?;
        let attempt = p.str("ReceiveRequestAttemptId")?;
        let config = self.config(&name).await?;
        let fifo = config.fifo == Some(true);
        if let Some(a) = attempt {
            if a.is_empty() || a.len() > 128 || !a.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(SqsError::bad_value(
                    "ReceiveRequestAttemptId",
                    a,
                    "It can contain only alphanumeric characters and punctuation, and be 1 to 128 long",
                ));
            }
            if fifo && let Some(v) = self.attempt(&name, a) {
                return Ok(v);
            }
        }
        let wait_s = wait.unwrap_or_else(|| {
            extra(&config, "ReceiveMessageWaitTimeSeconds")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        });
        let leased = self
            .client
            .receive(v1::ReceiveRequest {
                queue: self.qid(&name),
                max_messages: max as u32,
                // The core takes 0 as "the queue's default"; SQS's 0 is "visible again at
                // once", which a lease of one millisecond is.
                visibility_timeout_ms: visibility.map_or(0, |s| (s * 1000).max(1)),
                wait_time_ms: (wait_s * 1000) as i32,
                consumer: call.sender.to_string(),
                // Written before the answer (a killed process loses no lease), not waited
                // on for the fsync: only an OS crash could show a received message again
                // before its visibility timeout, which at-least-once delivery allows.
                no_wait_durable: true,
            })
            .await
            .map_err(|e| self.queue_error(&name, &e))?
            .messages;
        let now = now_ms();
        call.traffic.sent(
            leased.len() as u64,
            leased
                .iter()
                .map(|m| m.record.as_ref().map_or(0, |r| r.value.len()))
                .sum(),
        );
        let messages: Vec<Value> = leased
            .iter()
            .map(|m| self.render_message(m, fifo, &system_names, &attribute_names, now))
            .collect();
        let answer = if messages.is_empty() {
            json!({})
        } else {
            json!({"Messages": messages})
        };
        if fifo
            && let Some(a) = attempt
            && !messages.is_empty()
        {
            self.remember_attempt(&name, a, answer.clone());
        }
        Ok(answer)
    }

    fn attempt(&self, queue: &str, id: &str) -> Option<Value> {
        let mut attempts = self.attempts.lock();
        let key = (queue.to_string(), id.to_string());
        match attempts.get(&key) {
            Some((at, v)) if at.elapsed() < ATTEMPT_TTL => Some(v.clone()),
            Some(_) => {
                attempts.remove(&key);
                None
            }
            None => None,
        }
    }

    fn remember_attempt(&self, queue: &str, id: &str, answer: Value) {
        let mut attempts = self.attempts.lock();
        if attempts.len() >= MAX_ATTEMPTS {
            attempts.retain(|_, (at, _)| at.elapsed() < ATTEMPT_TTL);
            if attempts.len() >= MAX_ATTEMPTS {
                return;
            }
        }
        attempts.insert(
            (queue.to_string(), id.to_string()),
            (Instant::now(), answer),
        );
    }

    fn render_message(
        &self,
        m: &v1::LeasedMessage,
        fifo: bool,
        system_names: &[String],
        attribute_names: &[String],
        now: i64,
    ) -> Value {
        let record = m.record.clone().unwrap_or_default();
        let props = record.properties.clone().unwrap_or_default();
        let body = String::from_utf8_lossy(&record.value).into_owned();
        let mut out = Map::new();
        let message_id = if props.message_id.is_empty() {
            m.message_id.to_string()
        } else {
            props.message_id.clone()
        };
        out.insert("MessageId".into(), json!(message_id));
        out.insert("ReceiptHandle".into(), json!(m.lease_id));
        out.insert("MD5OfBody".into(), json!(message::md5_hex(body.as_bytes())));
        let want = |n: &str| system_names.iter().any(|s| s == "All" || s == n);
        let mut sys = Map::new();
        if want("SenderId") {
            let sender = if props.user_id.is_empty() {
                self.identity.account_id.clone()
            } else {
                props.user_id.clone()
            };
            sys.insert("SenderId".into(), json!(sender));
        }
        if want("SentTimestamp") {
            sys.insert(
                "SentTimestamp".into(),
                json!(record.timestamp_ms.to_string()),
            );
        }
        if want("ApproximateReceiveCount") {
            sys.insert(
                "ApproximateReceiveCount".into(),
                json!(m.delivery_count.to_string()),
            );
        }
        // The core keeps no first-receive time: it is known only at the first receive.
        if want("ApproximateFirstReceiveTimestamp") && m.delivery_count <= 1 {
            sys.insert(
                "ApproximateFirstReceiveTimestamp".into(),
                json!(now.to_string()),
            );
        }
        if fifo {
            if want("SequenceNumber") {
                sys.insert(
                    "SequenceNumber".into(),
                    json!(Self::sequence_number(m.message_id)),
                );
            }
            if want("MessageGroupId") {
                sys.insert("MessageGroupId".into(), json!(props.message_group));
            }
            if want("MessageDeduplicationId") {
                let dedup = record
                    .headers
                    .iter()
                    .find(|h| h.name == DEDUP_ID_HEADER)
                    .map_or(props.dedup_id.clone(), |h| {
                        String::from_utf8_lossy(&h.value).into_owned()
                    });
                sys.insert("MessageDeduplicationId".into(), json!(dedup));
            }
        } else if want("MessageGroupId") && !props.message_group.is_empty() {
            sys.insert("MessageGroupId".into(), json!(props.message_group));
        }
        let system = message::system_attributes_of(&record);
        if want("AWSTraceHeader")
            && let Some(t) = system.iter().find(|a| a.name == "AWSTraceHeader")
        {
            sys.insert(
                "AWSTraceHeader".into(),
                json!(String::from_utf8_lossy(&t.value)),
            );
        }
        if want("DeadLetterQueueSourceArn") && !props.dead_letter_queue.is_empty() {
            sys.insert(
                "DeadLetterQueueSourceArn".into(),
                json!(self.identity.arn(&props.dead_letter_queue)),
            );
        }
        if !sys.is_empty() {
            out.insert("Attributes".into(), Value::Object(sys));
        }
        out.insert("Body".into(), json!(body));
        if !attribute_names.is_empty() {
            let chosen: Vec<Attribute> = message::attributes_of(&record)
                .into_iter()
                .filter(|a| message::selected(attribute_names, &a.name))
                .collect();
            if let Some(md5) = message::attributes_md5(&chosen) {
                out.insert("MD5OfMessageAttributes".into(), json!(md5));
                let map: Map<String, Value> = chosen
                    .iter()
                    .map(|a| (a.name.clone(), a.to_json()))
                    .collect();
                out.insert("MessageAttributes".into(), Value::Object(map));
            }
        }
        Value::Object(out)
    }

    /// A receipt handle as the core makes them (three hexadecimal parts); anything else is
    /// refused before it reaches the core.
    fn check_handle(handle: &str) -> SqsResult<()> {
        let parts: Vec<&str> = handle.split('-').collect();
        if parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 16 && p.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            Ok(())
        } else {
            Err(SqsError::receipt_handle_is_invalid(format!(
                "The input receipt handle \"{}\" is not a valid receipt handle.",
                handle.escape_debug()
            )))
        }
    }

    async fn ack(&self, name: &str, handles: Vec<String>) -> SqsResult<()> {
        self.client
            .ack(v1::AckRequest {
                queue: self.qid(name),
                lease_ids: handles,
                // As for receives: a delete lost to an OS crash delivers the message again,
                // it never loses one.
                no_wait_durable: true,
            })
            .await
            .map_err(|e| self.queue_error(name, &e))?;
        Ok(())
    }

    async fn delete_message(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = self.queue_name(call)?;
        let handle = call.params.required_str("ReceiptHandle")?;
        Self::check_handle(handle)?;
        // A handle whose lease is over deletes nothing and is no error, as in SQS: the
        // message will be received again.
        self.ack(&name, vec![handle.to_string()]).await?;
        Ok(json!({}))
    }

    async fn delete_message_batch(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = self.queue_name(call)?;
        let entries = Self::batch_entries(call.params)?;
        let mut failed = Vec::new();
        let mut ok = Vec::new();
        for e in &entries {
            let id = e.required_str("Id")?;
            match e
                .required_str("ReceiptHandle")
                .and_then(|h| Self::check_handle(h).map(|()| h))
            {
                Ok(h) => ok.push((id.to_string(), h.to_string())),
                Err(err) => failed.push(Self::failed(id, &err)),
            }
        }
        if !ok.is_empty() {
            self.ack(&name, ok.iter().map(|(_, h)| h.clone()).collect())
                .await?;
        }
        let successful: Vec<Value> = ok.iter().map(|(id, _)| json!({"Id": id})).collect();
        Ok(json!({"Successful": successful, "Failed": failed}))
    }

    async fn change_lease(&self, name: &str, handle: &str, seconds: i64) -> SqsResult<()> {
        Self::check_handle(handle)?;
        self.client
            .change_lease(v1::ChangeLeaseRequest {
                queue: self.qid(name),
                lease_ids: vec![handle.to_string()],
                visibility_timeout_ms: seconds * 1000,
            })
            .await
            .map_err(|e| match error_code(&e) {
                ErrorCode::LeaseExpired => SqsError::bad_value(
                    "ReceiptHandle",
                    handle,
                    "Message does not exist or is not available for visibility timeout change",
                ),
                _ => self.queue_error(name, &e),
            })?;
        Ok(())
    }

    fn visibility(p: &Params) -> SqsResult<i64> {
        p.int_in("VisibilityTimeout", 0, 43_200)?
            .ok_or_else(|| SqsError::missing("VisibilityTimeout"))
    }

    async fn change_visibility(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = self.queue_name(call)?;
        let handle = call.params.required_str("ReceiptHandle")?;
        let seconds = Self::visibility(call.params)?;
        self.change_lease(&name, handle, seconds).await?;
        Ok(json!({}))
    }

    async fn change_visibility_batch(&self, call: &Call<'_>) -> SqsResult<Value> {
        let name = self.queue_name(call)?;
        let entries = Self::batch_entries(call.params)?;
        let mut failed = Vec::new();
        let mut successful = Vec::new();
        for e in &entries {
            let id = e.required_str("Id")?;
            let outcome = match (e.required_str("ReceiptHandle"), Self::visibility(e)) {
                (Ok(h), Ok(s)) => self.change_lease(&name, h, s).await,
                (Err(err), _) | (_, Err(err)) => Err(err),
            };
            match outcome {
                Ok(()) => successful.push(json!({"Id": id})),
                Err(err) if err.shape == "QueueDoesNotExist" => return Err(err),
                Err(err) => failed.push(Self::failed(id, &err)),
            }
        }
        Ok(json!({"Successful": successful, "Failed": failed}))
    }
}

fn name_of(q: &v1::QueueInfo) -> &str {
    q.id.as_ref().map_or("", |i| i.name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_uuids_and_handles_are_checked() {
        let id = random_uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, random_uuid());
        assert!(Service::check_handle("1a-0-3").is_ok());
        for bad in ["", "x", "1-2", "1-2-3-4", "g-1-1", "1--1", &"f".repeat(40)] {
            assert_eq!(
                Service::check_handle(bad).unwrap_err().code,
                "ReceiptHandleIsInvalid",
                "{bad}"
            );
        }
        assert_eq!(Service::sequence_number(42), "00000000000000000042");
    }
}
