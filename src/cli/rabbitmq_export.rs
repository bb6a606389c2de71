//! `tributary export rabbitmq`: the core's namespaces, addresses, queues and bindings as
//! RabbitMQ definitions (what `rabbitmqctl import_definitions` reads), through the AMQP
//! gateway's own mapping run backwards (`tributary_gateway_amqp::definitions`). Users and
//! their vhost access come from the config file; a user is written only with a RabbitMQ
//! password hash (one `import rabbitmq` carried), since a SCRAM credential cannot be turned
//! into one. What cannot be written is listed, never dropped silently.

use amq_protocol::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use tributary_gateway_amqp::definitions;
use tributary_proto::v1;

use super::{CliError, Ctx};
use crate::config::Settings;

/// The vhost of a namespace (the inverse of the gateway's `namespace_of`).
fn vhost_of(namespace: &str) -> String {
    if namespace == "default" {
        "/".into()
    } else {
        namespace.into()
    }
}

/// A field value as JSON, as RabbitMQ writes arguments in its definitions.
fn json_value(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ShortString(s) => Value::String(s.as_str().into()),
        AMQPValue::Void => Value::Null,
        other => Value::String(format!("{other:?}")),
    }
}

fn json_table(t: &FieldTable) -> Value {
    let mut m: Vec<(String, Value)> = t
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), json_value(v)))
        .collect();
    m.sort_by(|a, b| a.0.cmp(&b.0));
    Value::Object(m.into_iter().collect())
}

/// The definitions, and one line per thing left out with the reason.
pub async fn export(ctx: &Ctx, settings: &Settings) -> Result<(Value, Vec<String>), CliError> {
    let mut admin = ctx.client.admin.clone();
    let mut notes = Vec::new();
    let mut namespaces: Vec<String> = admin
        .list_namespaces(v1::ListNamespacesRequest {})
        .await
        .map_err(|s| ctx.status(s))?
        .into_inner()
        .namespaces
        .into_iter()
        .map(|n| n.name)
        .collect();
    namespaces.sort();
    let mut vhosts: Vec<String> = namespaces.iter().map(|n| vhost_of(n)).collect();
    for v in &settings.amqp_vhosts {
        if !vhosts.contains(v) {
            vhosts.push(v.clone());
        }
    }
    let (mut exchanges, mut queues, mut bindings) = (Vec::new(), Vec::new(), Vec::new());
    // (vhost, policy name, definition) -> queue names: one policy per group.
    let mut policies: std::collections::BTreeMap<(String, String, String), Vec<String>> =
        Default::default();
    for ns in &namespaces {
        let vhost = vhost_of(ns);
        let addresses = admin
            .list_addresses(v1::ListAddressesRequest {
                namespace: ns.clone(),
            })
            .await
            .map_err(|s| ctx.status(s))?
            .into_inner()
            .addresses;
        let mut exported = std::collections::HashSet::new();
        for a in &addresses {
            // The default exchange and amq.* are predeclared on every RabbitMQ vhost.
            if a.name.is_empty() || a.name.starts_with("amq.") {
                exported.insert(a.name.clone());
                continue;
            }
            let kind = v1::AddressKind::try_from(a.kind).unwrap_or_default();
            match definitions::exchange_of(kind, &a.arguments) {
                Some((kind, args)) => {
                    exported.insert(a.name.clone());
                    exchanges.push(json!({
                        "name": a.name,
                        "vhost": vhost,
                        "type": kind,
                        "durable": a.durable,
                        "auto_delete": a.auto_delete,
                        "internal": a.internal,
                        "arguments": json_table(&args),
                    }));
                }
                None if kind == v1::AddressKind::Stream => notes.push(format!(
                    "address {ns}/{}: a stream's own x-stream exchange (RabbitMQ has none): not exported, nor its bindings",
                    a.name
                )),
                None => notes.push(format!(
                    "address {ns}/{}: an MQTT topic tree, no exchange: not exported",
                    a.name
                )),
            }
        }
        let list = admin
            .list_queues(v1::ListQueuesRequest {
                namespace: ns.clone(),
            })
            .await
            .map_err(|s| ctx.status(s))?
            .into_inner()
            .queues;
        for q in &list {
            let name = q.id.as_ref().map_or("", |i| i.name.as_str()).to_string();
            if q.exclusive {
                notes.push(format!(
                    "queue {ns}/{name}: exclusive to one connection: not exported"
                ));
                continue;
            }
            let config = q.config.clone().unwrap_or_default();
            let args = definitions::queue_arguments(&config);
            // The queue, declared back from what is written, must come out the same:
            // settings no x-argument or policy carries (an SQS visibility timeout, say)
            // are left out, and said so.
            let policy = definitions::queue_policy(&config);
            let back = match policy {
                None => definitions::queue(&vhost, &name, q.durable, q.auto_delete, &args),
                Some((policy, definition)) => {
                    let mut effective = args.clone();
                    if let Ok(Value::Object(d)) = serde_json::from_str::<Value>(definition) {
                        for (k, v) in d {
                            effective.insert(
                                format!("x-{k}").as_str().into(),
                                super::import::amqp_value(&v),
                            );
                        }
                    }
                    definitions::queue_with_policy(
                        &vhost,
                        &name,
                        q.durable,
                        q.auto_delete,
                        &args,
                        &effective,
                        policy,
                        definition,
                    )
                }
            };
            let mut same = back.ok().and_then(|r| r.config).unwrap_or_default();
            let mut have = config.clone();
            // Free-form attributes of other protocols (sqs.*) are not RabbitMQ's to hold.
            have.extra.retain(|k, _| same.extra.contains_key(k));
            same.extra.retain(|k, _| have.extra.contains_key(k));
            if same != have {
                notes.push(format!(
                    "queue {ns}/{name}: settings with no RabbitMQ argument (set through another protocol or the core API) left out"
                ));
            }
            if let Some((policy, definition)) = policy {
                policies
                    .entry((vhost.clone(), policy.to_string(), definition.to_string()))
                    .or_default()
                    .push(name.clone());
            }
            queues.push(json!({
                "name": name,
                "vhost": vhost,
                "durable": q.durable,
                "auto_delete": q.auto_delete,
                "arguments": json_table(&args),
            }));
        }
        let list = admin
            .list_bindings(v1::ListBindingsRequest {
                namespace: ns.clone(),
                source_address: String::new(),
            })
            .await
            .map_err(|s| ctx.status(s))?
            .into_inner()
            .bindings;
        for b in &list {
            let (kind, destination) = match &b.destination {
                Some(v1::binding::Destination::Queue(q)) => ("queue", q),
                Some(v1::binding::Destination::Address(a)) => ("exchange", a),
                Some(v1::binding::Destination::Stream(s)) => {
                    notes.push(format!(
                        "binding {ns}/{} -> stream {s}: RabbitMQ binds no Kafka stream: not exported",
                        b.source_address
                    ));
                    continue;
                }
                None => continue,
            };
            // The default exchange's bindings are implicit; an MQTT tree's are not RabbitMQ's.
            if b.source_address.is_empty() || !exported.contains(&b.source_address) {
                continue;
            }
            bindings.push(json!({
                "source": b.source_address,
                "vhost": vhost,
                "destination": destination,
                "destination_type": kind,
                "routing_key": b.pattern,
                "arguments": json_table(&definitions::binding_arguments(b)),
            }));
        }
    }

    // Policies `import rabbitmq` applied: one per (policy, definition), matching exactly
    // the queues it was applied to (a RabbitMQ policy would also match queues declared
    // later; these patterns do not, which is what Tributary did).
    let mut out_policies = Vec::new();
    let mut seen_names: std::collections::HashMap<(String, String), usize> = Default::default();
    for ((vhost, name, definition), mut names) in policies {
        names.sort();
        let n = seen_names.entry((vhost.clone(), name.clone())).or_default();
        *n += 1;
        let policy_name = if *n == 1 {
            name.clone()
        } else {
            format!("{name}-{n}")
        };
        let pattern = format!(
            "^(?:{})$",
            names
                .iter()
                .map(|q| regex::escape(q))
                .collect::<Vec<_>>()
                .join("|")
        );
        out_policies.push(json!({
            "vhost": vhost,
            "name": policy_name,
            "pattern": pattern,
            "apply-to": "queues",
            "priority": 0,
            "definition": serde_json::from_str::<Value>(&definition).unwrap_or(json!({})),
        }));
    }

    let mut users = Vec::new();
    let mut exported_users = std::collections::HashSet::new();
    for name in settings.users.names() {
        match settings.users.password_hash(&name) {
            Some(hash) => {
                let (password_hash, algorithm) = hash.to_rabbitmq();
                users.push(json!({
                    "name": name,
                    "password_hash": password_hash,
                    "hashing_algorithm": algorithm,
                    "tags": [],
                    "limits": {},
                }));
                exported_users.insert(name);
            }
            None => notes.push(format!(
                "user {name}: no RabbitMQ password hash in the config (a SCRAM credential cannot be turned into one): not exported; add the user on RabbitMQ"
            )),
        }
    }
    let mut permissions = Vec::new();
    for p in &settings.amqp_permissions {
        if !exported_users.contains(&p.user) {
            notes.push(format!(
                "permission of {} on {}: its user is not exported",
                p.user, p.vhost
            ));
            continue;
        }
        permissions.push(json!({
            "user": p.user,
            "vhost": p.vhost,
            "configure": ".*",
            "write": ".*",
            "read": ".*",
        }));
    }
    let defs = json!({
        "users": users,
        "vhosts": vhosts.iter().map(|v| json!({"name": v})).collect::<Vec<_>>(),
        "permissions": permissions,
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": out_policies,
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    });
    Ok((defs, notes))
}
