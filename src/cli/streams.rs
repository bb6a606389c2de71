//! `tributary streams ...`.

use std::io::BufRead;

use serde_json::{Value, json};
use tributary_proto::v1;

use super::records::{self, Shown};
use super::table::Table;
use super::{CliError, Ctx, Output, StreamsCommand};

fn id(namespace: &str, name: &str) -> v1::StreamId {
    v1::StreamId {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn stream_json(s: &v1::StreamInfo) -> Value {
    let config = s.config.clone().unwrap_or_default();
    json!({
        "namespace": s.id.as_ref().map(|i| i.namespace.clone()),
        "name": s.id.as_ref().map(|i| i.name.clone()),
        "partitions": s.partitions,
        "config": {
            "retention.ms": config.retention_ms,
            "retention.bytes": config.retention_bytes,
            "max.message.bytes": config.max_message_bytes,
            "cleanup.policy": config.cleanup_policy,
        },
        "partition_info": s.partition_info.iter().map(|p| json!({
            "partition": p.partition,
            "start_offset": p.start_offset,
            "end_offset": p.end_offset,
            "size_bytes": p.size_bytes,
        })).collect::<Vec<_>>(),
    })
}

/// `KEY=VALUE` configs as a stream config.
fn parse_configs(configs: &[String]) -> Result<v1::StreamConfig, CliError> {
    let mut config = v1::StreamConfig::default();
    for c in configs {
        let (key, value) = c
            .split_once('=')
            .ok_or_else(|| CliError::Usage(format!("--topic-config {c}: expected KEY=VALUE")))?;
        let number = || {
            value
                .parse::<i64>()
                .map_err(|_| CliError::Usage(format!("--topic-config {c}: {key} takes a number")))
        };
        match key {
            "retention.ms" => config.retention_ms = Some(number()?),
            "retention.bytes" => config.retention_bytes = Some(number()?),
            "max.message.bytes" => config.max_message_bytes = Some(number()?),
            "cleanup.policy" => config.cleanup_policy = Some(value.into()),
            other => {
                return Err(CliError::Usage(format!(
                    "--topic-config {c}: unknown config {other} (retention.ms, retention.bytes, \
                     max.message.bytes, cleanup.policy)"
                )));
            }
        }
    }
    Ok(config)
}

pub async fn run(ctx: &Ctx, command: StreamsCommand) -> Result<Output, CliError> {
    let mut admin = ctx.client.admin.clone();
    match command {
        StreamsCommand::List(common) => {
            let streams = admin
                .list_streams(v1::ListStreamsRequest {
                    namespace: common.namespace.clone(),
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner()
                .streams;
            let mut table = Table::new(&["NAME", "PARTITIONS", "MESSAGES", "BYTES"]);
            for s in &streams {
                let messages: i64 = s
                    .partition_info
                    .iter()
                    .map(|p| p.end_offset - p.start_offset)
                    .sum();
                let bytes: i64 = s.partition_info.iter().map(|p| p.size_bytes).sum();
                table.row(vec![
                    s.id.as_ref().map(|i| i.name.clone()).unwrap_or_default(),
                    s.partitions.to_string(),
                    messages.to_string(),
                    bytes.to_string(),
                ]);
            }
            Ok(Output {
                table,
                json: json!({ "streams": streams.iter().map(stream_json).collect::<Vec<_>>() }),
            })
        }
        StreamsCommand::Describe { name, common } => {
            let stream = ctx
                .client
                .for_stream(&name)
                .admin
                .describe_stream(v1::DescribeStreamRequest {
                    id: Some(id(&common.namespace, &name)),
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner()
                .stream
                .unwrap_or_default();
            let mut table = Table::new(&["PARTITION", "START", "END", "BYTES"]);
            for p in &stream.partition_info {
                table.row(vec![
                    p.partition.to_string(),
                    p.start_offset.to_string(),
                    p.end_offset.to_string(),
                    p.size_bytes.to_string(),
                ]);
            }
            Ok(Output {
                table,
                json: stream_json(&stream),
            })
        }
        StreamsCommand::Create {
            name,
            partitions,
            configs,
            common,
        } => {
            let config = parse_configs(&configs)?;
            let stream = ctx
                .client
                .for_stream(&name)
                .admin
                .create_stream(v1::CreateStreamRequest {
                    id: Some(id(&common.namespace, &name)),
                    partitions,
                    config: Some(config),
                    if_not_exists: false,
                    validate_only: false,
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner()
                .stream
                .unwrap_or_default();
            Ok(Output {
                table: Table::line(format!("created stream {name} ({partitions} partitions)")),
                json: stream_json(&stream),
            })
        }
        StreamsCommand::Delete { name, common } => {
            ctx.client
                .for_stream(&name)
                .admin
                .delete_stream(v1::DeleteStreamRequest {
                    id: Some(id(&common.namespace, &name)),
                })
                .await
                .map_err(|s| ctx.status(s))?;
            Ok(Output {
                table: Table::line(format!("deleted stream {name}")),
                json: json!({ "deleted": name }),
            })
        }
        StreamsCommand::Produce {
            name,
            values,
            partition,
            key,
            common,
        } => {
            let values = if values.is_empty() {
                std::io::stdin()
                    .lock()
                    .lines()
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| CliError::Usage(format!("reading stdin: {e}")))?
            } else {
                values
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            let records: Vec<v1::Record> = values
                .iter()
                .map(|v| v1::Record {
                    key: key
                        .clone()
                        .map(|k| k.into_bytes().into())
                        .unwrap_or_default(),
                    value: v.clone().into_bytes().into(),
                    headers: vec![],
                    timestamp_ms: now,
                    properties: None,
                })
                .collect();
            let count = records.len();
            let appended = ctx
                .client
                .for_stream(&name)
                .streams
                .append(v1::AppendRequest {
                    stream: Some(id(&common.namespace, &name)),
                    partition,
                    batch: Some(v1::RecordBatch {
                        record_count: count as u32,
                        max_timestamp_ms: now,
                        records,
                        ..Default::default()
                    }),
                    auto_create: false,
                    defer_durable: false,
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            Ok(Output {
                table: Table::line(format!(
                    "produced {count} records to {name}/{partition} at offset {}",
                    appended.base_offset
                )),
                json: json!({
                    "stream": name,
                    "partition": partition,
                    "records": count,
                    "base_offset": appended.base_offset,
                }),
            })
        }
        StreamsCommand::Consume {
            name,
            partition,
            offset,
            count,
            common,
        } => {
            let shown = consume(ctx, &common.namespace, &name, partition, &offset, count).await?;
            let mut table = Table::new(&["OFFSET", "TIMESTAMP", "KEY", "VALUE"]);
            for r in &shown {
                table.row(vec![
                    r.offset.to_string(),
                    r.timestamp_ms.to_string(),
                    r.key.as_deref().map(records::text).unwrap_or_default(),
                    r.value.as_deref().map(records::text).unwrap_or_default(),
                ]);
            }
            Ok(Output {
                table,
                json: json!({ "records": shown.iter().map(Shown::json).collect::<Vec<_>>() }),
            })
        }
    }
}

/// The offset `spec` names in a partition: earliest, latest or a number.
pub async fn resolve_offset(
    ctx: &Ctx,
    stream: &v1::StreamId,
    partition: u32,
    spec: &str,
) -> Result<i64, CliError> {
    let which = match spec {
        "earliest" => v1::list_offsets_request::Spec::Earliest(true),
        "latest" => v1::list_offsets_request::Spec::Latest(true),
        n => {
            return n.parse().map_err(|_| {
                CliError::Usage(format!("offset {n}: expected earliest, latest or a number"))
            });
        }
    };
    Ok(ctx
        .client
        .for_stream(&stream.name)
        .streams
        .list_offsets(v1::ListOffsetsRequest {
            stream: Some(stream.clone()),
            partition,
            spec: Some(which),
            read_committed: false,
        })
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner()
        .offset)
}

/// Up to `count` records of a partition from `offset`, stopping at its end (no waiting).
async fn consume(
    ctx: &Ctx,
    namespace: &str,
    name: &str,
    partition: u32,
    offset: &str,
    count: usize,
) -> Result<Vec<Shown>, CliError> {
    let stream = id(namespace, name);
    let mut next = resolve_offset(ctx, &stream, partition, offset).await?;
    let mut shown = Vec::new();
    while shown.len() < count {
        let fetched = ctx
            .client
            .for_stream(name)
            .streams
            .fetch(v1::FetchRequest {
                partitions: vec![v1::FetchPartition {
                    stream: Some(stream.clone()),
                    partition,
                    offset: next,
                    max_bytes: 1 << 20,
                }],
                max_bytes: 1 << 20,
                min_bytes: 0,
                max_wait_ms: 0,
                read_committed: false,
            })
            .await
            .map_err(|s| ctx.status(s))?
            .into_inner();
        let Some(p) = fetched.partitions.into_iter().next() else {
            break;
        };
        if p.error != 0 {
            let code = v1::ErrorCode::try_from(p.error).unwrap_or(v1::ErrorCode::Internal);
            return Err(CliError::Refused(format!(
                "{}: {}",
                code.as_str_name(),
                p.error_message
            )));
        }
        let before = next;
        for batch in &p.batches {
            if batch.control.is_some() {
                // A transaction marker: not a record anyone sent.
                next = next.max(batch.base_offset + 1);
                continue;
            }
            for r in records::decode(batch).map_err(CliError::Refused)? {
                if r.offset >= next && shown.len() < count {
                    next = r.offset + 1;
                    shown.push(r);
                }
            }
        }
        if next == before {
            // Nothing more before the partition's end.
            break;
        }
    }
    Ok(shown)
}
