//! Kafka topics in the text `kafka-topics.sh --describe` prints: `tributary import kafka`
//! reads it (topics with their partition counts and configs, through the Kafka gateway's own
//! config mapping), `tributary export kafka` writes it for the streams of a namespace, so
//! the same file moves topics from Kafka to Tributary and from one Tributary to another.

use serde_json::json;
use tributary_proto::v1;

use super::table::Table;
use super::{CliError, Ctx, Output};

/// One topic of a describe listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    pub name: String,
    pub partitions: u32,
    pub configs: Vec<(String, String)>,
}

/// The topics of `kafka-topics.sh --describe` output: its `Topic: ... PartitionCount: ...`
/// lines (the per-partition lines, indented, are skipped).
pub fn parse(text: &str) -> Result<Vec<Topic>, String> {
    let mut topics = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with(char::is_whitespace) || !line.starts_with("Topic:") {
            continue;
        }
        let field = |key: &str| {
            line.split('\t')
                .map(str::trim)
                .find_map(|f| f.strip_prefix(key))
                .map(str::trim)
        };
        let name = field("Topic:").unwrap_or_default().to_string();
        let partitions = field("PartitionCount:")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("line {}: no PartitionCount for topic '{name}'", n + 1))?;
        let mut configs: Vec<(String, String)> = Vec::new();
        // `Configs: a=1,cleanup.policy=compact,delete`: a piece without `=` continues the
        // value before it (list-valued configs print their commas as they are).
        for piece in field("Configs:").unwrap_or_default().split(',') {
            match piece.split_once('=') {
                Some((k, v)) => configs.push((k.trim().to_string(), v.trim().to_string())),
                None if !piece.trim().is_empty() => match configs.last_mut() {
                    Some((_, v)) => {
                        v.push(',');
                        v.push_str(piece.trim());
                    }
                    None => return Err(format!("line {}: bad Configs entry '{piece}'", n + 1)),
                },
                None => {}
            }
        }
        topics.push(Topic {
            name,
            partitions,
            configs,
        });
    }
    if topics.is_empty() {
        return Err(
            "no `Topic: ... PartitionCount: ...` line (is this kafka-topics.sh --describe output?)"
                .into(),
        );
    }
    Ok(topics)
}

/// The describe text of `streams`.
pub fn render(streams: &[v1::StreamInfo]) -> String {
    let mut out = String::new();
    for s in streams {
        let name = s.id.as_ref().map_or("", |i| i.name.as_str());
        let c = s.config.clone().unwrap_or_default();
        let mut configs = Vec::new();
        if let Some(v) = c.cleanup_policy {
            configs.push(format!("cleanup.policy={v}"));
        }
        if let Some(v) = c.max_message_bytes {
            configs.push(format!("max.message.bytes={v}"));
        }
        if let Some(v) = c.retention_bytes {
            configs.push(format!("retention.bytes={v}"));
        }
        if let Some(v) = c.retention_ms {
            configs.push(format!("retention.ms={v}"));
        }
        let mut extra: Vec<_> = c.extra.iter().collect();
        extra.sort();
        configs.extend(extra.into_iter().map(|(k, v)| format!("{k}={v}")));
        out.push_str(&format!(
            "Topic: {name}\tTopicId: {}\tPartitionCount: {}\tReplicationFactor: 1\tConfigs: {}\n",
            s.uuid,
            s.partitions,
            configs.join(",")
        ));
        for p in 0..s.partitions {
            out.push_str(&format!(
                "\tTopic: {name}\tPartition: {p}\tLeader: 0\tReplicas: 0\tIsr: 0\n"
            ));
        }
    }
    out
}

/// Creates the topics of `path` in `namespace` (or, with no `ctx`, only checks them).
pub async fn import(
    ctx: Option<&Ctx>,
    path: &std::path::Path,
    namespace: &str,
) -> Result<Output, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let topics = parse(&text).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    let mut table = Table::new(&["TOPIC", "PARTITIONS", "OUTCOME", "DETAIL"]);
    let mut rows = Vec::new();
    let mut failed = 0;
    for t in &topics {
        let mut config = v1::StreamConfig::default();
        let mut not_carried = Vec::new();
        for (k, v) in &t.configs {
            if let Err(e) = tributary_gateway_kafka::apply_topic_config(&mut config, k, v) {
                not_carried.push(format!("{k}={v} ({e})"));
            }
        }
        let (outcome, detail) = match ctx {
            None => ("would create", String::new()),
            Some(ctx) => match ctx
                .client
                .for_stream(&t.name)
                .admin
                .create_stream(v1::CreateStreamRequest {
                    id: Some(v1::StreamId {
                        namespace: namespace.into(),
                        name: t.name.clone(),
                    }),
                    partitions: t.partitions,
                    config: Some(config),
                    if_not_exists: false,
                    validate_only: false,
                })
                .await
            {
                Ok(_) => ("created", String::new()),
                Err(s) if s.code() == tonic::Code::AlreadyExists => {
                    ("exists", "left as it is".to_string())
                }
                Err(s) => {
                    failed += 1;
                    ("failed", ctx.status(s).to_string())
                }
            },
        };
        let detail = if not_carried.is_empty() {
            detail
        } else {
            format!("{detail} not carried: {}", not_carried.join("; "))
                .trim()
                .to_string()
        };
        table.row(vec![
            t.name.clone(),
            t.partitions.to_string(),
            outcome.into(),
            detail.clone(),
        ]);
        rows.push(json!({
            "topic": t.name,
            "partitions": t.partitions,
            "outcome": outcome,
            "detail": detail,
        }));
    }
    if failed > 0 {
        return Err(CliError::Refused(format!(
            "{failed} topics failed to import:\n{}",
            table.render()
        )));
    }
    Ok(Output {
        table,
        json: json!({ "failed": failed, "topics": rows }),
    })
}

/// The streams of `namespace` in describe text (the table) and as JSON.
pub async fn export(ctx: &Ctx, namespace: &str) -> Result<(String, serde_json::Value), CliError> {
    let streams = ctx
        .client
        .admin
        .clone()
        .list_streams(v1::ListStreamsRequest {
            namespace: namespace.into(),
        })
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner()
        .streams;
    let text = render(&streams);
    let topics = parse(&text).unwrap_or_default();
    let json = json!({ "topics": topics.iter().map(|t| json!({
        "topic": t.name,
        "partitions": t.partitions,
        "configs": t.configs.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
    })).collect::<Vec<_>>() });
    Ok((text, json))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What kafka-topics.sh --describe prints (Apache Kafka 3.x), tabs and all.
    const DESCRIBE: &str = "Topic: orders\tTopicId: 3Hx1\tPartitionCount: 3\tReplicationFactor: 1\tConfigs: cleanup.policy=compact,delete,retention.ms=86400000,segment.bytes=1073741824\n\tTopic: orders\tPartition: 0\tLeader: 1\tReplicas: 1\tIsr: 1\n\tTopic: orders\tPartition: 1\tLeader: 1\tReplicas: 1\tIsr: 1\n\tTopic: orders\tPartition: 2\tLeader: 1\tReplicas: 1\tIsr: 1\nTopic: logs\tTopicId: 9aZ\tPartitionCount: 1\tReplicationFactor: 3\tConfigs: \n\tTopic: logs\tPartition: 0\tLeader: 2\tReplicas: 2,3,1\tIsr: 2,3,1\n";

    #[test]
    fn describe_output_parses_with_list_valued_configs() {
        let topics = parse(DESCRIBE).unwrap();
        assert_eq!(topics.len(), 2);
        assert_eq!(topics[0].name, "orders");
        assert_eq!(topics[0].partitions, 3);
        assert_eq!(
            topics[0].configs,
            vec![
                ("cleanup.policy".into(), "compact,delete".into()),
                ("retention.ms".into(), "86400000".into()),
                ("segment.bytes".into(), "1073741824".into()),
            ]
        );
        assert_eq!(topics[1].name, "logs");
        assert!(topics[1].configs.is_empty());
        assert!(parse("nothing here").is_err());
    }

    #[test]
    fn rendered_streams_parse_back() {
        let stream = v1::StreamInfo {
            id: Some(v1::StreamId::new("default", "t")),
            uuid: "u".into(),
            partitions: 2,
            config: Some(v1::StreamConfig {
                retention_ms: Some(1000),
                cleanup_policy: Some("delete".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = render(&[stream]);
        let back = parse(&text).unwrap();
        assert_eq!(back[0].partitions, 2);
        assert_eq!(
            back[0].configs,
            vec![
                ("cleanup.policy".into(), "delete".into()),
                ("retention.ms".into(), "1000".into())
            ]
        );
    }
}
