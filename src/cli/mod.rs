//! `tributary streams|groups|queues|sessions|connections|import|export ...`: the admin CLI, in
//! the style of rpk and rabbitmqadmin, against the core gRPC API of a local or remote server
//! (`--core URL`, with the core token and TLS settings a split gateway uses); `connections`
//! asks a process's admin HTTP API instead (`--admin URL`), where the connections are.
//!
//! Output: an aligned table for people, or one JSON document with `--json`. Exit codes: 0 done,
//! 1 the core refused or failed the request (the message says why), 2 a bad argument, 3 the
//! core could not be reached, 4 the core refused the credentials.

pub mod args;
mod connections;
mod groups;
mod import;
mod kafka_topics;
mod policies;
mod queues;
mod rabbitmq_export;
mod records;
mod sessions;
mod sqs;
mod streams;
mod table;
mod users;

use std::process::ExitCode;

use serde_json::Value;
use tributary_gateway_common::{CoreClient, error_code};
use tributary_proto::v1::ErrorCode;

use crate::config::Settings;
pub use args::{
    AdminApi, Common, ConnectionsCommand, ExportCommand, GroupsCommand, ImportCommand,
    QueuesCommand, SessionsCommand, StreamsCommand, UsersCommand,
};

/// Why a command failed, and the exit code that says so.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Refused(String),
    #[error("cannot reach the core at {core}: {message}")]
    Unreachable { core: String, message: String },
    #[error("cannot reach the admin API at {admin}: {message}")]
    AdminUnreachable { admin: String, message: String },
    #[error(
        "the core refused the credentials: {0} (give --core-token-file, or the core's client certificate)"
    )]
    Unauthenticated(String),
}

impl CliError {
    fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            CliError::Refused(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Unreachable { .. } | CliError::AdminUnreachable { .. } => 3,
            CliError::Unauthenticated(_) => 4,
        })
    }

    /// The error of a failed core call, by its stable error code.
    fn from_status(core: &str, status: tonic::Status) -> Self {
        match error_code(&status) {
            ErrorCode::Unauthenticated => CliError::Unauthenticated(status.message().into()),
            _ if status.code() == tonic::Code::Unavailable
                || status.code() == tonic::Code::Unknown
                    && status.message().contains("transport") =>
            {
                CliError::Unreachable {
                    core: core.into(),
                    message: status.message().into(),
                }
            }
            code => CliError::Refused(format!("{}: {}", code.as_str_name(), status.message())),
        }
    }
}

/// What a command prints: a table (header, rows) and the same as JSON.
pub struct Output {
    pub table: table::Table,
    pub json: Value,
}

/// A connected client and the address it reaches, for error messages.
pub struct Ctx {
    pub client: CoreClient,
    pub core: String,
}

impl Ctx {
    pub fn status(&self, status: tonic::Status) -> CliError {
        CliError::from_status(&self.core, status)
    }
}

/// Which admin command to run.
pub enum AdminCommand {
    Streams(StreamsCommand),
    Groups(GroupsCommand),
    Queues(QueuesCommand),
    Sessions(SessionsCommand),
    Users(UsersCommand),
    Connections(ConnectionsCommand),
    Import(ImportCommand),
    Export(ExportCommand),
}

/// Runs one admin command to completion and prints its result.
pub fn run(settings: &Settings, command: AdminCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let json = match &command {
            AdminCommand::Streams(c) => c.common().json,
            AdminCommand::Groups(c) => c.common().json,
            AdminCommand::Queues(c) => c.common().json,
            AdminCommand::Sessions(c) => c.common().json,
            AdminCommand::Users(c) => c.json(),
            AdminCommand::Connections(c) => c.api().json,
            AdminCommand::Import(ImportCommand::Rabbitmq { json, .. }) => *json,
            AdminCommand::Import(ImportCommand::Kafka { common, .. })
            | AdminCommand::Import(ImportCommand::Sqs { common, .. }) => common.json,
            AdminCommand::Export(ExportCommand::Kafka(common)) => common.json,
            // Both exports are JSON documents already; --json adds what was left out.
            AdminCommand::Export(ExportCommand::Rabbitmq { json }) => *json,
            AdminCommand::Export(ExportCommand::Sqs(common)) => common.json,
        };
        let out = match command {
            AdminCommand::Streams(c) => {
                let ctx = connect_to(settings, &c.common().namespace).await?;
                streams::run(&ctx, c).await?
            }
            AdminCommand::Groups(c) => {
                let ctx = connect_to(settings, &c.common().namespace).await?;
                groups::run(&ctx, c).await?
            }
            AdminCommand::Queues(c) => {
                let ctx = connect_to(settings, &c.common().namespace).await?;
                queues::run(&ctx, c).await?
            }
            AdminCommand::Sessions(c) => {
                let ctx = connect_to(settings, &c.common().namespace).await?;
                sessions::run(&ctx, c).await?
            }
            AdminCommand::Users(c) => users::run(settings, c).await?,
            AdminCommand::Connections(c) => connections::run(settings, c).await?,
            AdminCommand::Import(ImportCommand::Rabbitmq {
                file,
                dry_run,
                config_out,
                ..
            }) => {
                // A dry run needs no server.
                let ctx = if dry_run {
                    None
                } else {
                    Some(connect(settings)?)
                };
                import::rabbitmq(ctx.as_ref(), &file, dry_run, config_out.as_deref()).await?
            }
            AdminCommand::Import(ImportCommand::Kafka {
                file,
                dry_run,
                common,
            }) => {
                let ctx = if dry_run {
                    None
                } else {
                    Some(connect_to(settings, &common.namespace).await?)
                };
                kafka_topics::import(ctx.as_ref(), &file, &common.namespace).await?
            }
            AdminCommand::Import(ImportCommand::Sqs {
                file,
                dry_run,
                name,
                common,
            }) => {
                let ctx = if dry_run {
                    None
                } else {
                    Some(connect_to(settings, &common.namespace).await?)
                };
                sqs::import(ctx.as_ref(), &file, &common.namespace, name.as_deref()).await?
            }
            AdminCommand::Export(ExportCommand::Rabbitmq { .. }) => {
                let (defs, notes) = rabbitmq_export::export(&connect(settings)?, settings).await?;
                document(defs, notes, json)
            }
            AdminCommand::Export(ExportCommand::Sqs(common)) => {
                let ctx = connect_to(settings, &common.namespace).await?;
                let (queues, notes) = sqs::export(&ctx, &common.namespace).await?;
                document(queues, notes, json)
            }
            AdminCommand::Export(ExportCommand::Kafka(common)) => {
                let ctx = connect_to(settings, &common.namespace).await?;
                let (text, json) = kafka_topics::export(&ctx, &common.namespace).await?;
                Output {
                    table: table::Table::text(text),
                    json,
                }
            }
        };
        Ok::<_, CliError>((json, out))
    });
    match outcome {
        Ok((true, out)) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&out.json).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok((false, out)) => {
            print!("{}", out.table.render());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// An exported document: as it is on stdout, with what was left out on stderr; with --json,
/// both in one document.
fn document(doc: Value, notes: Vec<String>, json: bool) -> Output {
    let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    if !json {
        for n in &notes {
            eprintln!("not exported: {n}");
        }
    }
    Output {
        table: table::Table::text(text),
        json: serde_json::json!({ "document": doc, "not_exported": notes }),
    }
}

/// A client for the commands about one namespace: its calls name the namespace, which a
/// cluster node serving shards routes by. A node that does not serve it answers as much
/// before running the call, and the client sends the call on to the next node itself
/// (`tributary_gateway_common::client`), so the command reaches the node that serves it.
async fn connect_to(settings: &Settings, namespace: &str) -> Result<Ctx, CliError> {
    let mut ctx = connect(settings)?;
    ctx.client = ctx.client.scoped(namespace);
    Ok(ctx)
}

/// A client for the users, which a cluster serving shards keeps in its home shard: an
/// unscoped call is sent on to the node that holds it in the same way.
pub(crate) async fn connect_home(settings: &Settings) -> Result<Ctx, CliError> {
    connect(settings)
}

fn connect(settings: &Settings) -> Result<Ctx, CliError> {
    let tls =
        crate::server::core_client_tls(settings).map_err(|e| CliError::Usage(e.to_string()))?;
    let client = CoreClient::connect_lazy_with(
        &settings.core,
        settings.core_token.as_ref().map(|t| t.expose()),
        tls.as_ref(),
    )
    .map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(Ctx {
        client,
        core: settings.core.clone(),
    })
}
