//! `tributary users ...`: users kept in the core, which every gateway process logs in.
//!
//! The password never leaves this process: it is read from stdin and turned into salted
//! credentials here (as `tributary passwd` does); the core stores only those.

use serde_json::json;
use tributary_gateway_common::auth::{ScramCredential, ScramHash};
use tributary_proto::v1;

use super::args::PasswordArgs;
use super::table::Table;
use super::{CliError, Output, UsersCommand, connect_home};
use crate::config::Settings;

pub async fn run(settings: &Settings, command: UsersCommand) -> Result<Output, CliError> {
    match command {
        UsersCommand::List { .. } => list(settings).await,
        UsersCommand::Add {
            name,
            namespaces,
            password,
            ..
        } => {
            refuse_config_user(settings, &name)?;
            let credentials = credentials(&password, &read_password()?)?;
            let version = put_user(
                settings,
                v1::PutUserRequest {
                    user: Some(v1::UserRecord {
                        name: name.clone(),
                        credentials,
                        namespaces: namespaces.clone(),
                        mechanisms: Vec::new(),
                    }),
                    must_not_exist: true,
                    ..Default::default()
                },
            )
            .await?;
            Ok(Output {
                table: Table::line(format!("added user {name}")),
                json: json!({ "name": name, "namespaces": namespaces, "version": version }),
            })
        }
        UsersCommand::Passwd { name, password, .. } => {
            refuse_config_user(settings, &name)?;
            let credentials = credentials(&password, &read_password()?)?;
            let version = put_user(
                settings,
                v1::PutUserRequest {
                    user: Some(v1::UserRecord {
                        name: name.clone(),
                        credentials,
                        ..Default::default()
                    }),
                    must_exist: true,
                    keep_namespaces: true,
                    ..Default::default()
                },
            )
            .await?;
            Ok(Output {
                table: Table::line(format!("changed the password of {name}")),
                json: json!({ "name": name, "version": version }),
            })
        }
        UsersCommand::Delete { name, .. } => {
            refuse_config_user(settings, &name)?;
            let ctx = connect_home(settings).await?;
            let r = ctx
                .client
                .admin
                .clone()
                .delete_user(v1::DeleteUserRequest {
                    name: name.clone(),
                    only_mechanisms: Vec::new(),
                })
                .await
                .map_err(|s| ctx.status(s))?
                .into_inner();
            Ok(Output {
                table: Table::line(format!("deleted user {name}")),
                json: json!({ "name": name, "version": r.version }),
            })
        }
    }
}

/// Stores a user in the core; returns the users' new version.
async fn put_user(settings: &Settings, request: v1::PutUserRequest) -> Result<u64, CliError> {
    let ctx = connect_home(settings).await?;
    let r = ctx
        .client
        .admin
        .clone()
        .put_user(request)
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner();
    Ok(r.version)
}

async fn list(settings: &Settings) -> Result<Output, CliError> {
    let ctx = connect_home(settings).await?;
    let users = ctx
        .client
        .admin
        .clone()
        .list_users(v1::ListUsersRequest::default())
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner()
        .users;
    let mut table = Table::new(&["USER", "SOURCE", "MECHANISMS", "NAMESPACES"]);
    let mut rows = Vec::new();
    for u in &users {
        let shadowed = settings.users.contains(&u.name);
        table.row(vec![
            u.name.clone(),
            if shadowed {
                "core (the config file's wins)".into()
            } else {
                "core".into()
            },
            u.mechanisms.join(", "),
            u.namespaces.join(", "),
        ]);
        rows.push(json!({
            "name": u.name,
            "source": "core",
            "mechanisms": u.mechanisms,
            "namespaces": u.namespaces,
        }));
    }
    // The config file this command was given: the server's, when run with the same file.
    for name in settings.users.names() {
        table.row(vec![
            name.clone(),
            "config".into(),
            String::new(),
            String::new(),
        ]);
        rows.push(json!({ "name": name, "source": "config" }));
    }
    Ok(Output {
        table,
        json: json!({ "users": rows }),
    })
}

/// A name the config file defines is the file's: the core's user would never log in.
fn refuse_config_user(settings: &Settings, name: &str) -> Result<(), CliError> {
    if settings.users.contains(name) {
        return Err(CliError::Usage(format!(
            "user {name} is defined in the config file ([[users]]); change it there"
        )));
    }
    Ok(())
}

fn read_password() -> Result<String, CliError> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| CliError::Usage(format!("cannot read the password from stdin: {e}")))?;
    let password = line.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err(CliError::Usage(
            "empty password (give it on stdin, e.g. `echo secret | tributary users add alice`)"
                .into(),
        ));
    }
    Ok(password.to_string())
}

fn credentials(args: &PasswordArgs, password: &str) -> Result<Vec<String>, CliError> {
    // Kafka refuses SCRAM iterations below 4096 (and above 16384) in its own tools.
    if !(4096..=16384).contains(&args.iterations) {
        return Err(CliError::Usage(format!(
            "--iterations must be 4096 to 16384, got {}",
            args.iterations
        )));
    }
    let mechanisms = if args.mechanisms.is_empty() {
        vec!["SCRAM-SHA-256".to_string(), "SCRAM-SHA-512".to_string()]
    } else {
        args.mechanisms.clone()
    };
    let mut out: Vec<String> = Vec::new();
    for m in &mechanisms {
        let hash = ScramHash::from_mechanism(m).ok_or_else(|| {
            CliError::Usage(format!(
                "unknown mechanism {m} (SCRAM-SHA-256 and SCRAM-SHA-512 are)"
            ))
        })?;
        let text = ScramCredential::derive(hash, password, args.iterations).to_text();
        if !out.iter().any(|c| c.starts_with(&format!("{m}$"))) {
            out.push(text);
        }
    }
    Ok(out)
}
