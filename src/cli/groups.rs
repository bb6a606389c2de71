//! `tributary groups ...`.

use serde_json::json;
use tributary_proto::v1;

use super::streams::resolve_offset;
use super::table::Table;
use super::{CliError, Ctx, GroupsCommand, Output};

/// Where `--to` puts a partition's committed offset.
enum Target {
    Earliest,
    Latest,
    Timestamp(i64),
    Offset(i64),
}

fn parse_target(to: &str) -> Result<Target, CliError> {
    let number = |n: &str| {
        n.parse::<i64>()
            .map_err(|_| CliError::Usage(format!("--to {to}: {n} is not a number")))
    };
    match to.split_once(':') {
        None if to == "earliest" => Ok(Target::Earliest),
        None if to == "latest" => Ok(Target::Latest),
        Some(("timestamp", ms)) => Ok(Target::Timestamp(number(ms)?)),
        Some(("offset", n)) => Ok(Target::Offset(number(n)?)),
        _ => Err(CliError::Usage(format!(
            "--to {to}: expected earliest, latest, timestamp:MILLISECONDS or offset:N"
        ))),
    }
}

pub async fn run(ctx: &Ctx, command: GroupsCommand) -> Result<Output, CliError> {
    match command {
        GroupsCommand::List(common) => {
            let groups = ctx
                .client
                .admin
                .clone()
                .list_groups(v1::ListGroupsRequest {
                    namespace: common.namespace.clone(),
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner()
                .groups;
            let mut table = Table::new(&["GROUP", "STATE", "PROTOCOL", "COMMITTED PARTITIONS"]);
            for g in &groups {
                table.row(vec![
                    g.group.clone(),
                    g.state.clone(),
                    g.protocol_type.clone(),
                    g.committed_partitions.to_string(),
                ]);
            }
            let json = json!({ "groups": groups.iter().map(|g| json!({
                "group": g.group,
                "state": g.state,
                "protocol_type": g.protocol_type,
                "committed_partitions": g.committed_partitions,
            })).collect::<Vec<_>>() });
            Ok(Output { table, json })
        }
        GroupsCommand::Describe { group, common } => {
            let described = describe(ctx, &common.namespace, &group).await?;
            let committed = ctx
                .client
                .offsets
                .clone()
                .fetch_offsets(v1::FetchOffsetsRequest {
                    namespace: common.namespace.clone(),
                    group: group.clone(),
                    partitions: vec![],
                    require_stable: false,
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner()
                .offsets;
            let mut table = Table::new(&["STREAM", "PARTITION", "COMMITTED", "END", "LAG"]);
            let mut partitions = Vec::new();
            for c in &committed {
                let Some(stream) = &c.stream else { continue };
                let end = resolve_offset(ctx, stream, c.partition, "latest").await?;
                // Nothing committed: everything still in the log is to read.
                let from = if c.offset < 0 {
                    resolve_offset(ctx, stream, c.partition, "earliest").await?
                } else {
                    c.offset
                };
                let lag = (end - from).max(0);
                table.row(vec![
                    stream.name.clone(),
                    c.partition.to_string(),
                    c.offset.to_string(),
                    end.to_string(),
                    lag.to_string(),
                ]);
                partitions.push(json!({
                    "stream": stream.name,
                    "partition": c.partition,
                    "committed": c.offset,
                    "end": end,
                    "lag": lag,
                }));
            }
            let json = json!({
                "group": group,
                "state": described.state,
                "protocol_type": described.protocol_type,
                "members": described.members.iter().map(|m| json!({
                    "member_id": m.member_id,
                    "client_id": m.client_id,
                    "client_host": m.client_host,
                })).collect::<Vec<_>>(),
                "partitions": partitions,
            });
            Ok(Output { table, json })
        }
        GroupsCommand::ResetOffsets {
            group,
            stream,
            to,
            dry_run,
            common,
        } => {
            let target = parse_target(&to)?;
            let described = describe(ctx, &common.namespace, &group).await?;
            if !described.members.is_empty() {
                return Err(CliError::Refused(format!(
                    "group {group} has {} active members: stop its consumers first (offsets \
                     are only reset in an empty group)",
                    described.members.len()
                )));
            }
            let id = v1::StreamId {
                namespace: common.namespace.clone(),
                name: stream.clone(),
            };
            let info = ctx
                .client
                .for_stream(&stream)
                .admin
                .describe_stream(v1::DescribeStreamRequest {
                    id: Some(id.clone()),
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner()
                .stream
                .unwrap_or_default();
            let mut offsets = Vec::new();
            for p in &info.partition_info {
                let offset = match target {
                    Target::Earliest => p.start_offset,
                    Target::Latest => p.end_offset,
                    Target::Offset(n) => n.clamp(p.start_offset, p.end_offset),
                    Target::Timestamp(ms) => {
                        let found = ctx
                            .client
                            .for_stream(&stream)
                            .streams
                            .list_offsets(v1::ListOffsetsRequest {
                                stream: Some(id.clone()),
                                partition: p.partition,
                                spec: Some(v1::list_offsets_request::Spec::TimestampMs(ms)),
                                read_committed: false,
                            })
                            .await
                            .map_err(|s| ctx.status(s))?
                            .into_inner()
                            .offset;
                        // No record at or after the time: the end, as Kafka's tools do.
                        if found < 0 { p.end_offset } else { found }
                    }
                };
                offsets.push(v1::CommittedOffset {
                    stream: Some(id.clone()),
                    partition: p.partition,
                    offset,
                    metadata: String::new(),
                    commit_time_ms: 0,
                    leader_epoch: -1,
                });
            }
            let mut table = Table::new(&["STREAM", "PARTITION", "NEW OFFSET"]);
            for o in &offsets {
                table.row(vec![
                    stream.clone(),
                    o.partition.to_string(),
                    o.offset.to_string(),
                ]);
            }
            let json = json!({
                "group": group,
                "stream": stream,
                "dry_run": dry_run,
                "offsets": offsets.iter().map(|o| json!({"partition": o.partition, "offset": o.offset})).collect::<Vec<_>>(),
            });
            if !dry_run {
                ctx.client
                    .offsets
                    .clone()
                    .commit_offsets(v1::CommitOffsetsRequest {
                        namespace: common.namespace.clone(),
                        group: group.clone(),
                        offsets,
                        generation: None,
                        member_id: String::new(),
                    })
                    .await
                    .map_err(|s| ctx.status(s))?;
            }
            Ok(Output { table, json })
        }
    }
}

/// The group's state and members; a group that does not exist reads as empty.
async fn describe(
    ctx: &Ctx,
    namespace: &str,
    group: &str,
) -> Result<v1::DescribeGroupResponse, CliError> {
    Ok(ctx
        .client
        .groups
        .clone()
        .describe_group(v1::DescribeGroupRequest {
            namespace: namespace.into(),
            group: group.into(),
        })
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner())
}
