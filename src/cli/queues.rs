//! `tributary queues ...`.

use std::time::Duration;

use serde_json::json;
use tributary_proto::v1;

use super::table::Table;
use super::{CliError, Ctx, Output, QueuesCommand};

fn id(namespace: &str, name: &str) -> v1::QueueId {
    v1::QueueId {
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// How long `queues redrive` waits for its task before leaving it running.
const REDRIVE_WAIT: Duration = Duration::from_secs(60);

pub async fn run(ctx: &Ctx, command: QueuesCommand) -> Result<Output, CliError> {
    let mut admin = ctx.client.admin.clone();
    match command {
        QueuesCommand::List(common) => {
            let queues = admin
                .list_queues(v1::ListQueuesRequest {
                    namespace: common.namespace.clone(),
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner()
                .queues;
            let mut table = Table::new(&[
                "NAME",
                "READY",
                "LEASED",
                "DELAYED",
                "CONSUMERS",
                "DURABLE",
                "DEAD LETTERS TO",
            ]);
            for q in &queues {
                let config = q.config.clone().unwrap_or_default();
                table.row(vec![
                    q.id.as_ref().map(|i| i.name.clone()).unwrap_or_default(),
                    q.messages_ready.to_string(),
                    q.messages_leased.to_string(),
                    q.messages_delayed.to_string(),
                    q.consumers.to_string(),
                    q.durable.to_string(),
                    config
                        .dead_letter_queue
                        .or(config.dead_letter_address)
                        .unwrap_or_default(),
                ]);
            }
            let json = json!({ "queues": queues.iter().map(|q| json!({
                "name": q.id.as_ref().map(|i| i.name.clone()),
                "ready": q.messages_ready,
                "leased": q.messages_leased,
                "delayed": q.messages_delayed,
                "consumers": q.consumers,
                "durable": q.durable,
            })).collect::<Vec<_>>() });
            Ok(Output { table, json })
        }
        QueuesCommand::Declare {
            name,
            transient,
            dead_letter_queue,
            max_deliveries,
            common,
        } => {
            let declared = admin
                .declare_queue(v1::DeclareQueueRequest {
                    id: Some(id(&common.namespace, &name)),
                    config: Some(v1::QueueConfig {
                        dead_letter_queue,
                        max_delivery_count: max_deliveries,
                        ..Default::default()
                    }),
                    durable: !transient,
                    exclusive: false,
                    auto_delete: false,
                    passive: false,
                    owner: String::new(),
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            let _ = declared;
            Ok(Output {
                table: Table::line(format!("declared queue {name}")),
                json: json!({ "declared": name, "durable": !transient }),
            })
        }
        QueuesCommand::Purge { name, common } => {
            let purged = admin
                .purge_queue(v1::PurgeQueueRequest {
                    id: Some(id(&common.namespace, &name)),
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner()
                .messages_purged;
            Ok(Output {
                table: Table::line(format!("purged {purged} messages from {name}")),
                json: json!({ "queue": name, "purged": purged }),
            })
        }
        QueuesCommand::Redrive {
            name,
            to,
            to_address,
            key,
            common,
        } => {
            let mut queues = ctx.client.queues.clone();
            let task_id = queues
                .start_redrive(v1::StartRedriveRequest {
                    source: Some(id(&common.namespace, &name)),
                    destination: to.clone().unwrap_or_default(),
                    max_messages_per_second: 0,
                    destination_address: to_address.clone().unwrap_or_default(),
                    destination_key: key.clone().unwrap_or_default(),
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner()
                .task_id;
            // Polled until the task leaves RUNNING: the core reports progress, not completion.
            let deadline = tokio::time::Instant::now() + REDRIVE_WAIT;
            let task = loop {
                let task = queues
                    .list_redrives(v1::ListRedrivesRequest {
                        source: Some(id(&common.namespace, &name)),
                    })
                    .await
                    .map_err(|s| ctx.status(s))?
                    .into_inner()
                    .tasks
                    .into_iter()
                    .find(|t| t.task_id == task_id)
                    .ok_or_else(|| {
                        CliError::Refused(format!("redrive task {task_id} disappeared"))
                    })?;
                if task.status != "RUNNING" || tokio::time::Instant::now() >= deadline {
                    break task;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let json = json!({
                "task_id": task.task_id,
                "status": task.status,
                "moved": task.moved,
                "to_move": task.to_move,
                "failure": task.failure_reason,
            });
            if task.status == "FAILED" {
                return Err(CliError::Refused(format!(
                    "redrive of {name} failed after {} messages: {}",
                    task.moved, task.failure_reason
                )));
            }
            Ok(Output {
                table: Table::line(format!(
                    "redrive {} of {name}: {} ({} of {} moved)",
                    task.task_id, task.status, task.moved, task.to_move
                )),
                json,
            })
        }
    }
}
