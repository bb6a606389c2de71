//! `tributary import rabbitmq definitions.json`: a RabbitMQ node's definitions (as
//! `rabbitmqctl export_definitions` or the management API's `GET /api/definitions` write
//! them) carried into Tributary.
//!
//! Exchanges, queues (with their x-arguments) and bindings go to the core through the AMQP
//! gateway's own mapping (`tributary_gateway_amqp::definitions`), vhosts become namespaces.
//! Users (with their password hashes), vhost access and the vhost list belong to the config
//! file, so they are written as a config snippet (`--config-out`). Policies are applied to
//! the queues they match, once, here (`policies`). What Tributary cannot carry is reported
//! row by row, never dropped silently.

use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};
use serde::Deserialize;
use serde_json::{Value, json};
use tributary_gateway_amqp::definitions;
use tributary_gateway_common::auth::PasswordHash;
use tributary_proto::v1;

use super::policies::{self, Compiled, Outcome, Policy};
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
    /// Operator policies, if a file lists them on their own; RabbitMQ 3.10 exports them as
    /// runtime parameters of component `operator_policy` (see [`operator_policies`]).
    operator_policies: Vec<Policy>,
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
    /// created, exists, would create, failed, not carried, config, applied, would apply.
    outcome: &'static str,
    detail: String,
    /// More for the JSON report (a policy's keys per queue).
    data: Option<Value>,
}

/// A JSON value as the AMQP field value a client would have sent.
pub(super) fn amqp_value(v: &Value) -> AMQPValue {
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
            data: None,
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
            data: None,
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

    // Policies: Tributary has none, so each queue gets, once, what the policy RabbitMQ
    // applies to it sets (see `policies`); per policy, what it carried where.
    let compiled: Vec<Compiled> = defs.policies.iter().map(Compiled::new).collect();
    let operator_list = operator_policies(&defs, &mut rows);
    let compiled_operator: Vec<Compiled> = operator_list.iter().map(Compiled::new).collect();
    // Per policy (operator policies after the others, by index): queue -> key -> outcome.
    let mut applied: Vec<std::collections::BTreeMap<String, Vec<(String, Outcome)>>> =
        vec![Default::default(); compiled.len() + compiled_operator.len()];
    for q in &defs.queues {
        let args_text = if q.arguments.is_empty() {
            String::new()
        } else {
            Value::Object(q.arguments.clone()).to_string()
        };
        let qtype = policies::queue_type(&q.arguments);
        let policy = policies::choose(&compiled, &q.vhost, &q.name, qtype);
        let operator = policies::choose(&compiled_operator, &q.vhost, &q.name, qtype);
        let merged = policies::merge(
            &q.arguments,
            policy.map(|c| c.policy),
            operator.map(|c| c.policy),
        );
        let carried = merged.carried();
        // The policies that set something on the queue (what the queue records, and what
        // `export rabbitmq` writes back as one policy).
        let names: Vec<&str> = [policy, operator]
            .into_iter()
            .flatten()
            .map(|c| c.policy.name.as_str())
            .filter(|name| {
                merged
                    .keys
                    .iter()
                    .any(|(p, _, o)| p == name && matches!(o, Outcome::Carried(_)))
            })
            .collect();
        let plain = definitions::queue(
            &q.vhost,
            &q.name,
            q.durable,
            q.auto_delete,
            &table(&q.arguments),
        );
        let with_policy = if carried.is_empty() {
            None
        } else {
            Some(definitions::queue_with_policy(
                &q.vhost,
                &q.name,
                q.durable,
                q.auto_delete,
                &table(&q.arguments),
                &table(&merged.arguments),
                &names.join("+"),
                &Value::Object(carried.clone()).to_string(),
            ))
        };
        // What each matched policy's keys became for this queue; when the merge is refused
        // (a policy's dead-letter-routing-key with no dead-letter exchange, say), none of
        // them is carried, and the queue is imported with its own arguments.
        let matched = policy_indexes(&compiled, policy, &compiled_operator, operator);
        let (req, policy_note) = match (plain, with_policy) {
            (Err(e), _) => {
                rows.push(queue_row(q, "failed", e));
                continue;
            }
            (Ok(plain), Some(Err(e))) => {
                for (i, c) in matched {
                    applied[i].insert(
                        q.name.clone(),
                        c.policy
                            .definition
                            .keys()
                            .map(|k| (k.clone(), Outcome::NotCarried(e.clone())))
                            .collect(),
                    );
                }
                (
                    plain,
                    format!("policy {} not applied: {e}", names.join("+")),
                )
            }
            (Ok(plain), with) => {
                for (i, c) in matched {
                    applied[i].insert(
                        q.name.clone(),
                        merged
                            .keys
                            .iter()
                            .filter(|(p, _, _)| *p == c.policy.name)
                            .map(|(_, k, o)| (k.clone(), o.clone()))
                            .collect(),
                    );
                }
                match with {
                    Some(Ok(with)) => (
                        with,
                        format!("policy {}: {}", names.join("+"), Value::Object(carried)),
                    ),
                    _ => (plain, String::new()),
                }
            }
        };
        let detail = [args_text, policy_note]
            .into_iter()
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        match ctx {
            None => rows.push(queue_row(q, "would create", detail)),
            Some(ctx) => match ctx.client.admin.clone().declare_queue(req).await {
                Ok(r) => rows.push(queue_row(q, outcome(r.into_inner().created), detail)),
                Err(s) => rows.push(queue_row(q, "failed", ctx.status(s).to_string())),
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
            data: None,
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

    // Per policy: the keys carried into which queue, the ones not carried and why. A policy
    // is applied once, here: a queue declared later is matched by nothing.
    let all = compiled
        .iter()
        .map(|c| (c, "policy"))
        .chain(compiled_operator.iter().map(|c| (c, "operator_policy")));
    for (i, (c, kind)) in all.enumerate() {
        rows.push(policy_row(c, kind, &applied[i], ctx.is_none()));
    }
    for (kind, n) in [
        ("topic_permission", defs.topic_permissions.len()),
        (
            "parameter",
            defs.parameters
                .iter()
                .filter(|p| p["component"] != OPERATOR_POLICY)
                .count(),
        ),
    ] {
        if n > 0 {
            rows.push(Row {
                kind,
                vhost: String::new(),
                name: format!("{n} entries"),
                outcome: "not carried",
                detail: "no equivalent in Tributary (federation, shovels, topic authorisation)"
                    .into(),
                data: None,
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
            data: None,
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
                data: None,
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
                    data: None,
                });
            }
            Err(e) => rows.push(Row {
                kind: "user",
                vhost: String::new(),
                name: u.name.clone(),
                outcome: "not carried",
                detail: format!("{e}: give the user a credential with `tributary passwd`"),
                data: None,
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
                data: None,
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
            data: None,
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
            "policy": r.data,
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

/// The runtime-parameter component RabbitMQ keeps operator policies under.
const OPERATOR_POLICY: &str = "operator_policy";

/// The operator policies of a definitions file: its `operator_policies`, and its runtime
/// parameters of component `operator_policy` (`{"vhost", "component", "name", "value":
/// {"pattern", "definition", "priority", "apply-to"}}`).
fn operator_policies(defs: &Definitions, rows: &mut Vec<Row>) -> Vec<Policy> {
    let mut out = defs.operator_policies.clone();
    for p in defs
        .parameters
        .iter()
        .filter(|p| p["component"] == OPERATOR_POLICY)
    {
        let mut v = p["value"].clone();
        if let Value::Object(m) = &mut v {
            m.insert("vhost".into(), p["vhost"].clone());
            m.insert("name".into(), p["name"].clone());
        }
        match serde_json::from_value::<Policy>(v) {
            Ok(policy) => out.push(policy),
            Err(e) => rows.push(Row {
                kind: "operator_policy",
                vhost: p["vhost"].as_str().unwrap_or_default().into(),
                name: p["name"].as_str().unwrap_or_default().into(),
                outcome: "not carried",
                detail: format!("not an operator policy as RabbitMQ writes one: {e}"),
                data: None,
            }),
        }
    }
    out
}

fn queue_row(q: &Queue, outcome: &'static str, detail: String) -> Row {
    Row {
        kind: "queue",
        vhost: q.vhost.clone(),
        name: q.name.clone(),
        outcome,
        detail,
        data: None,
    }
}

/// The indexes in `applied` of the policy and operator policy chosen for a queue.
fn policy_indexes<'a, 'b>(
    compiled: &'b [Compiled<'a>],
    policy: Option<&'b Compiled<'a>>,
    operator: &'b [Compiled<'a>],
    op: Option<&'b Compiled<'a>>,
) -> Vec<(usize, &'b Compiled<'a>)> {
    let index = |all: &[Compiled], c: &Compiled| all.iter().position(|x| std::ptr::eq(x, c));
    let mut out = Vec::new();
    if let Some(c) = policy
        && let Some(i) = index(compiled, c)
    {
        out.push((i, c));
    }
    if let Some(c) = op
        && let Some(i) = index(operator, c)
    {
        out.push((compiled.len() + i, c));
    }
    out
}

/// The report row of one policy: per queue it applies to, the keys carried (with the
/// value the queue got), the keys the queue's own arguments beat, and the keys not carried
/// with the reason.
fn policy_row(
    c: &Compiled,
    kind: &'static str,
    applied: &std::collections::BTreeMap<String, Vec<(String, Outcome)>>,
    dry_run: bool,
) -> Row {
    let p = c.policy;
    let mut carried: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    let mut kept: Vec<String> = Vec::new();
    let mut not_carried: std::collections::BTreeMap<&str, String> = Default::default();
    let mut data = serde_json::Map::new();
    for (queue, keys) in applied {
        let mut per_queue = serde_json::Map::new();
        for (key, o) in keys {
            match o {
                Outcome::Carried(v) => {
                    carried.entry(queue).or_default().push(format!("{key}={v}"));
                    per_queue.insert(key.clone(), json!({"carried": v}));
                }
                Outcome::Kept(why) => {
                    kept.push(format!("{key} on {queue} ({why})"));
                    per_queue.insert(key.clone(), json!({"kept": why}));
                }
                Outcome::NotCarried(why) => {
                    not_carried.insert(key, why.clone());
                    per_queue.insert(key.clone(), json!({"not_carried": why}));
                }
            }
        }
        data.insert(queue.clone(), Value::Object(per_queue));
    }
    let mut parts = Vec::new();
    if let Some(e) = &c.pattern_error {
        parts.push(format!(
            "pattern {:?} cannot be matched here ({e}): applied to no queue",
            p.pattern
        ));
    } else if applied.is_empty() {
        parts.push(format!(
            "pattern {:?} (apply-to {}) matches no imported queue",
            p.pattern, p.apply_to
        ));
    }
    if !carried.is_empty() {
        parts.push(format!(
            "carried into {}",
            carried
                .iter()
                .map(|(q, keys)| format!("{q} ({})", keys.join(", ")))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !kept.is_empty() {
        parts.push(format!("not needed: {}", kept.join("; ")));
    }
    let unmatched_reason = "not carried: the policy applies to no imported queue";
    for key in p.definition.keys() {
        if applied.is_empty() {
            not_carried
                .entry(key)
                .or_insert_with(|| match policies::rule(key) {
                    policies::KeyRule::NotCarried(why) => why.to_string(),
                    _ => unmatched_reason.to_string(),
                });
        }
    }
    if !not_carried.is_empty() {
        parts.push(format!(
            "not carried: {}",
            not_carried
                .iter()
                .map(|(k, why)| format!("{k} ({why})"))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    parts.push(
        "applied once, at import: queues declared later are not matched (Tributary has no policies)"
            .into(),
    );
    let outcome = match (carried.is_empty(), dry_run) {
        (false, false) => "applied",
        (false, true) => "would apply",
        (true, _) => "not carried",
    };
    Row {
        kind,
        vhost: p.vhost.clone(),
        name: p.name.clone(),
        outcome,
        detail: parts.join("; "),
        data: Some(json!({
            "pattern": p.pattern,
            "apply_to": p.apply_to,
            "priority": p.priority,
            "queues": data,
            "not_carried": not_carried,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
