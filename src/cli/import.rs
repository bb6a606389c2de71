//! `tributary import rabbitmq definitions.json`: a RabbitMQ node's definitions (as
//! `rabbitmqctl export_definitions` or the management API's `GET /api/definitions` write
//! them) carried into Tributary.
//!
//! Exchanges, queues (with their x-arguments) and bindings go to the core through the AMQP
//! gateway's own mapping (`tributary_gateway_amqp::definitions`), vhosts become namespaces.
//! Users (with their password hashes), vhost access and the vhost list belong to the config
//! file, so they are written as a config snippet (`--config-out`). What Tributary cannot
//! carry is reported row by row, never dropped silently.

use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};
use serde::Deserialize;
use serde_json::{Value, json};
use tributary_gateway_amqp::definitions;
use tributary_gateway_common::auth::PasswordHash;
use tributary_proto::v1;

use super::table::Table;
use super::{CliError, Ctx, Output};

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct Definitions {
    users: Vec<User>,
    vhosts: Vec<Vhost>,
    permissions: Vec<Permission>,
    topic_permissions: Vec<Value>,
    parameters: Vec<Value>,
    global_parameters: Vec<Named>,
    policies: Vec<Policy>,
    queues: Vec<Queue>,
    exchanges: Vec<Exchange>,
    bindings: Vec<Binding>,
}

#[derive(Debug, Deserialize)]
struct User {
    name: String,
    #[serde(default)]
    password_hash: String,
    #[serde(default)]
    hashing_algorithm: String,
}

#[derive(Debug, Deserialize)]
struct Vhost {
    name: String,
}

#[derive(Debug, Deserialize)]
struct Permission {
    user: String,
    vhost: String,
    #[serde(default)]
    configure: String,
    #[serde(default)]
    write: String,
    #[serde(default)]
    read: String,
}

#[derive(Debug, Deserialize)]
struct Named {
    name: String,
}

#[derive(Debug, Deserialize)]
struct Policy {
    vhost: String,
    name: String,
    pattern: String,
    #[serde(default)]
    definition: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct Queue {
    name: String,
    vhost: String,
    #[serde(default = "yes")]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    arguments: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct Exchange {
    name: String,
    vhost: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "yes")]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    internal: bool,
    #[serde(default)]
    arguments: serde_json::Map<String, Value>,
}

#[derive(Debug, Deserialize)]
struct Binding {
    source: String,
    vhost: String,
    destination: String,
    destination_type: String,
    #[serde(default)]
    routing_key: String,
    #[serde(default)]
    arguments: serde_json::Map<String, Value>,
}

fn yes() -> bool {
    true
}

/// One line of the report.
struct Row {
    kind: &'static str,
    vhost: String,
    name: String,
    /// created, exists, would create, failed, not carried, config.
    outcome: &'static str,
    detail: String,
}

/// A JSON value as the AMQP field value a client would have sent.
fn amqp_value(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(a) => {
            let mut arr = FieldArray::default();
            for item in a {
                arr.push(amqp_value(item));
            }
            AMQPValue::FieldArray(arr)
        }
        Value::Object(o) => AMQPValue::FieldTable(table(o)),
    }
}

fn table(args: &serde_json::Map<String, Value>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in args {
        t.insert(k.as_str().into(), amqp_value(v));
    }
    t
}

/// Imports `path`; with `dry_run`, checks everything and changes nothing.
pub async fn rabbitmq(
    ctx: Option<&Ctx>,
    path: &std::path::Path,
    dry_run: bool,
    config_out: Option<&std::path::Path>,
) -> Result<Output, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let defs: Definitions = serde_json::from_str(&text).map_err(|e| {
        CliError::Usage(format!(
            "{} is not RabbitMQ definitions JSON: {e}",
            path.display()
        ))
    })?;
    let mut rows = Vec::new();
    let outcome = |created: bool| if created { "created" } else { "exists" };

    // Vhosts: a namespace each ("/" is the default namespace, which always exists).
    let mut vhosts: Vec<String> = defs.vhosts.iter().map(|v| v.name.clone()).collect();
    if vhosts.is_empty() {
        vhosts.push("/".into());
    }
    for vhost in &vhosts {
        if vhost == "/" {
            continue;
        }
        let row = |outcome, detail: String| Row {
            kind: "vhost",
            vhost: vhost.clone(),
            name: vhost.clone(),
            outcome,
            detail,
        };
        match ctx {
            None => rows.push(row("would create", "namespace".into())),
            Some(ctx) => match ctx
                .client
                .admin
                .clone()
                .create_namespace(v1::CreateNamespaceRequest {
                    name: vhost.clone(),
                    labels: Default::default(),
                    if_not_exists: true,
                })
                .await
            {
                Ok(r) => rows.push(row(outcome(r.into_inner().created), "namespace".into())),
                Err(s) => rows.push(row("failed", ctx.status(s).to_string())),
            },
        }
    }

    for x in &defs.exchanges {
        let row = |outcome, detail: String| Row {
            kind: "exchange",
            vhost: x.vhost.clone(),
            name: x.name.clone(),
            outcome,
            detail,
        };
        if x.name.is_empty() || x.name.starts_with("amq.") {
            continue;
        }
        let req = match definitions::exchange(
            &x.vhost,
            &x.name,
            &x.kind,
            x.durable,
            x.auto_delete,
            x.internal,
            &table(&x.arguments),
        ) {
            Ok(r) => r,
            Err(e) => {
                rows.push(row("failed", e));
                continue;
            }
        };
        match ctx {
            None => rows.push(row("would create", x.kind.clone())),
            Some(ctx) => match ctx.client.admin.clone().declare_address(req).await {
                Ok(r) => rows.push(row(outcome(r.into_inner().created), x.kind.clone())),
                Err(s) => rows.push(row("failed", ctx.status(s).to_string())),
            },
        }
    }

    for q in &defs.queues {
        let row = |outcome, detail: String| Row {
            kind: "queue",
            vhost: q.vhost.clone(),
            name: q.name.clone(),
            outcome,
            detail,
        };
        let args_text = if q.arguments.is_empty() {
            String::new()
        } else {
            Value::Object(q.arguments.clone()).to_string()
        };
        let req = match definitions::queue(
            &q.vhost,
            &q.name,
            q.durable,
            q.auto_delete,
            &table(&q.arguments),
        ) {
            Ok(r) => r,
            Err(e) => {
                rows.push(row("failed", e));
                continue;
            }
        };
        match ctx {
            None => rows.push(row("would create", args_text)),
            Some(ctx) => match ctx.client.admin.clone().declare_queue(req).await {
                Ok(r) => rows.push(row(outcome(r.into_inner().created), args_text)),
                Err(s) => rows.push(row("failed", ctx.status(s).to_string())),
            },
        }
    }

    for b in &defs.bindings {
        let name = format!(
            "{} -> {} {} ({})",
            b.source, b.destination_type, b.destination, b.routing_key
        );
        let row = |outcome, detail: String| Row {
            kind: "binding",
            vhost: b.vhost.clone(),
            name: name.clone(),
            outcome,
            detail,
        };
        let binding = match definitions::binding(
            &b.vhost,
            &b.source,
            b.destination_type == "queue",
            &b.destination,
            &b.routing_key,
            &table(&b.arguments),
        ) {
            Ok(r) => r,
            Err(e) => {
                rows.push(row("failed", e));
                continue;
            }
        };
        match ctx {
            None => rows.push(row("would create", String::new())),
            Some(ctx) => match ctx
                .client
                .admin
                .clone()
                .bind(v1::BindRequest {
                    binding: Some(binding),
                })
                .await
            {
                Ok(_) => rows.push(row("created", String::new())),
                Err(s) => rows.push(row("failed", ctx.status(s).to_string())),
            },
        }
    }

    // Policies: Tributary has none. A policy's settings (DLX, TTL, max-length...) apply to
    // the queues its pattern matches only in RabbitMQ; baked into the queues' arguments they
    // would make every client's redeclare without them fail (406), so they are reported.
    for p in &defs.policies {
        let matching: Vec<&str> = match regex_lite_match(&p.pattern) {
            Some(m) => defs
                .queues
                .iter()
                .filter(|q| q.vhost == p.vhost && m(&q.name))
                .map(|q| q.name.as_str())
                .collect(),
            None => vec![],
        };
        rows.push(Row {
            kind: "policy",
            vhost: p.vhost.clone(),
            name: p.name.clone(),
            outcome: "not carried",
            detail: format!(
                "Tributary has no policies: declare {} as queue arguments (x-{}) in the clients; queues it matches: {}",
                Value::Object(p.definition.clone()),
                p.definition.keys().cloned().collect::<Vec<_>>().join(", x-"),
                if matching.is_empty() {
                    "none found".to_string()
                } else {
                    matching.join(", ")
                }
            ),
        });
    }
    for (kind, n) in [
        ("topic_permission", defs.topic_permissions.len()),
        ("parameter", defs.parameters.len()),
    ] {
        if n > 0 {
            rows.push(Row {
                kind,
                vhost: String::new(),
                name: format!("{n} entries"),
                outcome: "not carried",
                detail: "no equivalent in Tributary (federation, shovels, topic authorisation)"
                    .into(),
            });
        }
    }
    for g in defs
        .global_parameters
        .iter()
        .filter(|g| g.name != "internal_cluster_id")
    {
        rows.push(Row {
            kind: "global_parameter",
            vhost: String::new(),
            name: g.name.clone(),
            outcome: "not carried",
            detail: "no equivalent in Tributary".into(),
        });
    }

    // Users, vhost access and the vhost list: a config snippet.
    let mut snippet = String::from(
        "# From `tributary import rabbitmq`: merge into the config file, then restart.\n",
    );
    snippet.push_str(&format!(
        "amqp_vhosts = [{}]\n",
        vhosts
            .iter()
            .map(|v| toml_string(v))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for u in &defs.users {
        match PasswordHash::from_rabbitmq(&u.password_hash, &u.hashing_algorithm) {
            // RabbitMQ's default user: carried, it would become a guest/guest login from
            // anywhere on every protocol. Tributary's AMQP gateway has its own guest/guest,
            // loopback only, as RabbitMQ's.
            Ok(hash) if u.name == "guest" && hash.verify_password("guest") => rows.push(Row {
                kind: "user",
                vhost: String::new(),
                name: u.name.clone(),
                outcome: "not carried",
                detail: "RabbitMQ's default guest/guest: Tributary's own guest user (AMQP, loopback only) stands in for it".into(),
            }),
            Ok(hash) => {
                snippet.push_str(&format!(
                    "\n[[users]]\nname = {}\ncredentials = [{}]\n",
                    toml_string(&u.name),
                    toml_string(&hash.to_text())
                ));
                rows.push(Row {
                    kind: "user",
                    vhost: String::new(),
                    name: u.name.clone(),
                    outcome: "config",
                    detail: "password hash kept (plain-password logins; for Kafka SCRAM run `tributary passwd`)".into(),
                });
            }
            Err(e) => rows.push(Row {
                kind: "user",
                vhost: String::new(),
                name: u.name.clone(),
                outcome: "not carried",
                detail: format!("{e}: give the user a credential with `tributary passwd`"),
            }),
        }
    }
    let skipped_users: Vec<&str> = rows
        .iter()
        .filter(|r| r.kind == "user" && r.outcome == "not carried")
        .map(|r| r.name.as_str())
        .collect::<Vec<_>>();
    let skipped_users: std::collections::HashSet<String> =
        skipped_users.into_iter().map(str::to_string).collect();
    for p in &defs.permissions {
        if skipped_users.contains(&p.user) {
            rows.push(Row {
                kind: "permission",
                vhost: p.vhost.clone(),
                name: p.user.clone(),
                outcome: "not carried",
                detail: "its user is not carried".into(),
            });
            continue;
        }
        let patterns = [&p.configure, &p.write, &p.read];
        let full = patterns.iter().all(|r| r.as_str() == ".*");
        let none = patterns.iter().all(|r| r.is_empty());
        let (outcome, detail) = if none {
            // Empty patterns grant nothing in RabbitMQ: no entry, no access.
            (
                "not carried",
                "grants nothing in RabbitMQ (empty patterns): no access given".to_string(),
            )
        } else if full {
            snippet.push_str(&format!(
                "\n[[amqp_permissions]]\nuser = {}\nvhost = {}\n",
                toml_string(&p.user),
                toml_string(&p.vhost)
            ));
            ("config", "access to the vhost".to_string())
        } else {
            // Narrower than the whole vhost in RabbitMQ; Tributary's permission is the whole
            // vhost, so the entry is written commented out: granting it is the operator's call.
            snippet.push_str(&format!(
                "\n# Narrower in RabbitMQ (configure {:?}, write {:?}, read {:?}); Tributary grants the whole vhost:\n# [[amqp_permissions]]\n# user = {}\n# vhost = {}\n",
                p.configure,
                p.write,
                p.read,
                toml_string(&p.user),
                toml_string(&p.vhost)
            ));
            (
                "config (commented out)",
                format!(
                    "the configure/write/read patterns ({:?} {:?} {:?}) are narrower than a whole vhost, which is all Tributary grants: the entry is written commented out",
                    p.configure, p.write, p.read
                ),
            )
        };
        rows.push(Row {
            kind: "permission",
            vhost: p.vhost.clone(),
            name: p.user.clone(),
            outcome,
            detail,
        });
    }
    if let Some(out) = config_out {
        std::fs::write(out, &snippet)
            .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", out.display())))?;
    }

    let failed = rows.iter().filter(|r| r.outcome == "failed").count();
    let mut table = Table::new(&["KIND", "VHOST", "NAME", "OUTCOME", "DETAIL"]);
    for r in &rows {
        table.row(vec![
            r.kind.into(),
            r.vhost.clone(),
            r.name.clone(),
            r.outcome.into(),
            r.detail.clone(),
        ]);
    }
    let json = json!({
        "dry_run": dry_run,
        "failed": failed,
        "rows": rows.iter().map(|r| json!({
            "kind": r.kind,
            "vhost": r.vhost,
            "name": r.name,
            "outcome": r.outcome,
            "detail": r.detail,
        })).collect::<Vec<_>>(),
        "config": snippet,
    });
    if failed > 0 {
        // The report still goes out (stdout), the exit code says something failed.
        let rendered = table.render();
        return Err(CliError::Refused(format!(
            "{failed} definitions failed to import:\n{rendered}"
        )));
    }
    Ok(Output { table, json })
}

/// A TOML basic string (the toml crate's quoting: control characters escaped as TOML wants).
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// RabbitMQ policy patterns are regular expressions; the common ones are `^prefix`, `.*`,
/// `^name$` and plain names. Those are matched here (to list the affected queues in the
/// report); anything else is listed as "none found" rather than guessed.
fn regex_lite_match(pattern: &str) -> Option<impl Fn(&str) -> bool> {
    let anchored_start = pattern.starts_with('^');
    let body = pattern.trim_start_matches('^');
    let anchored_end = body.ends_with('$') && !body.ends_with("\\$");
    let body = body.trim_end_matches('$');
    let (body, any_tail) = match body.strip_suffix(".*") {
        Some(b) => (b, true),
        None => (body, false),
    };
    // Escaped punctuation (`\.`) is literal; any other metacharacter is not matched here.
    let mut literal = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e) if !e.is_ascii_alphanumeric() => literal.push(e),
                _ => return None,
            },
            c if ".*+?()[]{}|^$".contains(c) => return None,
            c => literal.push(c),
        }
    }
    let body = literal;
    Some(move |name: &str| {
        let end_ok = |rest: &str| any_tail || !anchored_end || rest.is_empty();
        if anchored_start {
            name.strip_prefix(body.as_str()).is_some_and(end_ok)
        } else if anchored_end && !any_tail {
            name.ends_with(body.as_str())
        } else {
            name.contains(body.as_str())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_patterns_that_are_matched() {
        let m = regex_lite_match("^orders").unwrap();
        assert!(m("orders.eu") && !m("my.orders"));
        let m = regex_lite_match(".*").unwrap();
        assert!(m("anything"));
        let m = regex_lite_match("^exact$").unwrap();
        assert!(m("exact") && !m("exact.not"));
        assert!(regex_lite_match("^(a|b)").is_none());
        let m = regex_lite_match("^imp\\.q$").unwrap();
        assert!(m("imp.q") && !m("impxq") && !m("imp.q2"));
    }

    #[test]
    fn json_arguments_become_the_field_values_a_client_sends() {
        let args: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"x-message-ttl": 60000, "x-dead-letter-exchange": "dlx", "x-single-active-consumer": true}"#).unwrap();
        let t = table(&args);
        assert_eq!(
            t.inner().get("x-message-ttl"),
            Some(&AMQPValue::LongLongInt(60000))
        );
        assert_eq!(
            t.inner().get("x-dead-letter-exchange"),
            Some(&AMQPValue::LongString("dlx".into()))
        );
        let req = definitions::queue("/", "q", true, false, &t).unwrap();
        let c = req.config.unwrap();
        assert_eq!(c.message_ttl_ms, Some(60000));
        assert_eq!(c.dead_letter_address.as_deref(), Some("dlx"));
        assert_eq!(req.id.unwrap().namespace, "default");
    }
}
