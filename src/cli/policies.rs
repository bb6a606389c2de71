//! RabbitMQ policies applied to imported queues, the way RabbitMQ resolves them: of the
//! policies of the queue's vhost whose `apply-to` covers the queue and whose `pattern` (a
//! regular expression, searched anywhere in the name) matches, the one with the highest
//! priority applies; an operator policy is resolved the same way on its own. Then, key by
//! key (RabbitMQ's `rabbit_queue_type_util:args_policy_lookup` and
//! `rabbit_policies:merge_policy_value`):
//! - `message-ttl`, `expires`, `max-length`, `max-length-bytes`, `delivery-limit`: the
//!   smallest of the queue argument, the policy and the operator policy;
//! - `dead-letter-exchange`, `dead-letter-routing-key`, `overflow`: the queue argument if the
//!   queue has one, else the policy's.
//!
//! Tributary has no policies of its own: the result is baked into the queue once, at import.
//! A queue declared later is matched by nothing.

use regex::Regex;
use serde::Deserialize;
use serde_json::{Map, Value};

#[derive(Debug, Clone, Deserialize)]
pub struct Policy {
    pub vhost: String,
    pub name: String,
    pub pattern: String,
    #[serde(rename = "apply-to", default = "all")]
    pub apply_to: String,
    #[serde(default)]
    pub priority: i64,
    #[serde(default, deserialize_with = "definition")]
    pub definition: Map<String, Value>,
}

fn all() -> String {
    "all".into()
}

/// A definition is an object, except in the operator policies RabbitMQ 3.10 exports, where
/// it is a list of `[key, value]` pairs (an Erlang property list written as it is).
fn definition<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        Object(Map<String, Value>),
        Pairs(Vec<(String, Value)>),
    }
    Ok(match Form::deserialize(d)? {
        Form::Object(m) => m,
        Form::Pairs(pairs) => pairs.into_iter().collect(),
    })
}

/// What Tributary does with one key of a policy definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRule {
    /// The smallest value wins.
    Min,
    /// The smallest wins, on quorum queues only (RabbitMQ ignores it on classic queues).
    MinQuorum,
    /// The queue's own argument wins over the policy.
    ArgumentWins,
    /// Not carried, for this reason.
    NotCarried(&'static str),
}

pub fn rule(key: &str) -> KeyRule {
    match key {
        "message-ttl" | "expires" | "max-length" | "max-length-bytes" => KeyRule::Min,
        "delivery-limit" => KeyRule::MinQuorum,
        "dead-letter-exchange" | "dead-letter-routing-key" | "overflow" => KeyRule::ArgumentWins,
        k if k.starts_with("ha-") => KeyRule::NotCarried(
            "classic mirroring has no meaning in Tributary: a queue is stored once, by the core's storage",
        ),
        "federation-upstream" | "federation-upstream-set" => {
            KeyRule::NotCarried("Tributary has no federation")
        }
        "queue-master-locator"
        | "queue-leader-locator"
        | "initial-cluster-size"
        | "target-group-size" => KeyRule::NotCarried(
            "replica placement has no meaning in Tributary: the core owns every queue",
        ),
        "queue-mode" | "queue-version" | "max-in-memory-length" | "max-in-memory-bytes" => {
            KeyRule::NotCarried(
                "memory/storage layout has no meaning in Tributary: messages are always in the log",
            )
        }
        "dead-letter-strategy" => KeyRule::NotCarried(
            "Tributary dead-letters in the core, once; at-least-once dead-lettering is not a setting",
        ),
        "max-age" | "stream-max-segment-size-bytes" => {
            KeyRule::NotCarried("stream queues are not imported (Kafka clients read streams)")
        }
        "alternate-exchange" => {
            KeyRule::NotCarried("alternate exchanges are not supported by the AMQP gateway")
        }
        _ => KeyRule::NotCarried("not a setting Tributary knows"),
    }
}

/// A compiled policy.
pub struct Compiled<'a> {
    pub policy: &'a Policy,
    regex: Option<Regex>,
    /// Why the pattern cannot be matched (the regex crate has no look-around, for one).
    pub pattern_error: Option<String>,
}

impl<'a> Compiled<'a> {
    pub fn new(policy: &'a Policy) -> Self {
        match Regex::new(&policy.pattern) {
            Ok(r) => Self {
                policy,
                regex: Some(r),
                pattern_error: None,
            },
            Err(e) => Self {
                policy,
                regex: None,
                pattern_error: Some(e.to_string().lines().last().unwrap_or("").to_string()),
            },
        }
    }

    /// Whether RabbitMQ would consider this policy for a queue of `queue_type`.
    fn covers(&self, vhost: &str, name: &str, queue_type: &str) -> bool {
        let p = self.policy;
        let applies = match p.apply_to.as_str() {
            "queues" | "all" => true,
            "classic_queues" => queue_type == "classic",
            "quorum_queues" => queue_type == "quorum",
            _ => false,
        };
        p.vhost == vhost && applies && self.regex.as_ref().is_some_and(|r| r.is_match(name))
    }
}

/// The policy RabbitMQ applies to a queue: the highest priority among those that match (of
/// equal priorities RabbitMQ leaves the choice open; the first in the file is taken).
pub fn choose<'a, 'b>(
    policies: &'b [Compiled<'a>],
    vhost: &str,
    name: &str,
    queue_type: &str,
) -> Option<&'b Compiled<'a>> {
    let mut best: Option<&Compiled> = None;
    for c in policies
        .iter()
        .filter(|c| c.covers(vhost, name, queue_type))
    {
        if best.is_none_or(|b| c.policy.priority > b.policy.priority) {
            best = Some(c);
        }
    }
    best
}

/// The queue's type as RabbitMQ names it in `apply-to`.
pub fn queue_type(arguments: &Map<String, Value>) -> &str {
    arguments
        .get("x-queue-type")
        .and_then(Value::as_str)
        .unwrap_or("classic")
}

/// One key of a policy and what became of it for one queue.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Set on the queue (the value it now has).
    Carried(Value),
    /// The queue's own argument stays (why).
    Kept(String),
    NotCarried(String),
}

/// The queue arguments with a policy (and an operator policy) merged in, and per key of each
/// what became of it. `arguments` are the queue's declared x-arguments.
pub struct Merged {
    pub arguments: Map<String, Value>,
    /// (policy name, key, outcome), policies first, then the operator policy.
    pub keys: Vec<(String, String, Outcome)>,
}

impl Merged {
    /// The keys set on the queue by the policies, as a policy definition (for the report and
    /// for `export rabbitmq`).
    pub fn carried(&self) -> Map<String, Value> {
        let mut m = Map::new();
        for (_, k, o) in &self.keys {
            if let Outcome::Carried(v) = o {
                m.insert(k.clone(), v.clone());
            }
        }
        m
    }
}

pub fn merge(
    arguments: &Map<String, Value>,
    policy: Option<&Policy>,
    operator: Option<&Policy>,
) -> Merged {
    let quorum = queue_type(arguments) == "quorum";
    let mut out = arguments.clone();
    let mut keys = Vec::new();
    for (p, is_operator) in [(policy, false), (operator, true)] {
        let Some(p) = p else { continue };
        for (key, value) in &p.definition {
            let x = format!("x-{key}");
            let outcome = match rule(key) {
                KeyRule::NotCarried(why) => Outcome::NotCarried(why.into()),
                KeyRule::MinQuorum if !quorum => Outcome::NotCarried(
                    "RabbitMQ applies it to quorum queues only; this one is classic".into(),
                ),
                KeyRule::Min | KeyRule::MinQuorum => match value.as_i64() {
                    None => Outcome::NotCarried(format!("{value} is not an integer")),
                    Some(v) => match out.get(&x).and_then(Value::as_i64) {
                        Some(have) if have <= v => Outcome::Kept(format!(
                            "the queue's {} {have} is smaller (the smallest wins)",
                            if arguments.contains_key(&x) {
                                "argument"
                            } else {
                                "policy value"
                            }
                        )),
                        _ => {
                            // An operator policy's smaller value replaces the policy's.
                            for (_, k, o) in keys.iter_mut() {
                                if *k == *key && matches!(o, Outcome::Carried(_)) {
                                    *o = Outcome::Kept(format!(
                                        "the operator policy {}'s {v} is smaller",
                                        p.name
                                    ));
                                }
                            }
                            out.insert(x, Value::from(v));
                            Outcome::Carried(Value::from(v))
                        }
                    },
                },
                KeyRule::ArgumentWins if is_operator => {
                    Outcome::NotCarried("RabbitMQ's operator policies do not set it".into())
                }
                KeyRule::ArgumentWins => match arguments.get(&x) {
                    Some(have) => {
                        Outcome::Kept(format!("the queue argument {x}={have} wins over a policy"))
                    }
                    None => {
                        out.insert(x, value.clone());
                        Outcome::Carried(value.clone())
                    }
                },
            };
            keys.push((p.name.clone(), key.clone(), outcome));
        }
    }
    Merged {
        arguments: out,
        keys,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(name: &str, pattern: &str, priority: i64, definition: Value) -> Policy {
        Policy {
            vhost: "v".into(),
            name: name.into(),
            pattern: pattern.into(),
            apply_to: "queues".into(),
            priority,
            definition: definition.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn the_matching_policy_with_the_highest_priority_applies() {
        let ps = [
            policy("low", ".*", 0, json!({})),
            policy("high", "^orders\\.", 5, json!({})),
            policy("other", "^pay", 9, json!({})),
        ];
        let compiled: Vec<_> = ps.iter().map(Compiled::new).collect();
        let pick = |name: &str| choose(&compiled, "v", name, "classic").map(|c| &*c.policy.name);
        assert_eq!(pick("orders.eu"), Some("high"));
        assert_eq!(pick("my.orders.eu"), Some("low"), "unanchored search");
        assert_eq!(pick("payments"), Some("other"));
        assert_eq!(
            choose(&compiled, "elsewhere", "orders.eu", "classic").map(|_| ()),
            None
        );
        // apply-to: quorum queues only.
        let mut q = policy("q", ".*", 0, json!({}));
        q.apply_to = "quorum_queues".into();
        let exchanges = Policy {
            apply_to: "exchanges".into(),
            ..policy("x", ".*", 0, json!({}))
        };
        let ps = [q, exchanges];
        let compiled: Vec<_> = ps.iter().map(Compiled::new).collect();
        assert!(choose(&compiled, "v", "a", "classic").is_none());
        assert_eq!(
            choose(&compiled, "v", "a", "quorum").map(|c| &*c.policy.name),
            Some("q")
        );
        // RabbitMQ's common "everything but amq." pattern uses look-ahead: reported, not guessed.
        let ha = policy("ha", "^(?!amq\\.).*", 0, json!({}));
        assert!(Compiled::new(&ha).pattern_error.is_some());
    }

    #[test]
    fn a_definition_may_be_a_list_of_pairs() {
        let p: Policy = serde_json::from_value(json!({"vhost": "v", "name": "op",
            "pattern": "^a", "apply-to": "queues", "priority": 0,
            "definition": [["max-length", 100], ["expires", 5]]}))
        .unwrap();
        assert_eq!(p.definition["max-length"], 100);
        assert_eq!(p.definition["expires"], 5);
    }

    #[test]
    fn limits_take_the_smallest_and_arguments_win_for_the_rest() {
        let args = json!({"x-max-length": 10, "x-dead-letter-exchange": "mine"});
        let args = args.as_object().unwrap();
        let p = policy(
            "p",
            ".*",
            0,
            json!({"max-length": 100, "message-ttl": 5000, "dead-letter-exchange": "theirs",
                   "overflow": "reject-publish", "ha-mode": "all", "delivery-limit": 3}),
        );
        let op = policy(
            "op",
            ".*",
            0,
            json!({"message-ttl": 1000, "max-length": 50}),
        );
        let m = merge(args, Some(&p), Some(&op));
        assert_eq!(m.arguments["x-max-length"], 10);
        assert_eq!(m.arguments["x-message-ttl"], 1000);
        assert_eq!(m.arguments["x-dead-letter-exchange"], "mine");
        assert_eq!(m.arguments["x-overflow"], "reject-publish");
        assert!(
            !m.arguments.contains_key("x-delivery-limit"),
            "classic queue"
        );
        let carried = m.carried();
        assert_eq!(carried["message-ttl"], 1000);
        assert_eq!(carried["overflow"], "reject-publish");
        assert!(!carried.contains_key("max-length"));
        let outcome = |pol: &str, key: &str| {
            m.keys
                .iter()
                .find(|(p, k, _)| p == pol && k == key)
                .map(|(_, _, o)| o.clone())
                .unwrap()
        };
        assert!(matches!(outcome("p", "ha-mode"), Outcome::NotCarried(_)));
        assert!(matches!(outcome("p", "max-length"), Outcome::Kept(_)));
        assert!(matches!(
            outcome("p", "dead-letter-exchange"),
            Outcome::Kept(_)
        ));
        assert!(matches!(outcome("op", "max-length"), Outcome::Kept(_)));
        assert!(
            matches!(outcome("p", "message-ttl"), Outcome::Kept(_)),
            "the operator's is smaller"
        );
        assert_eq!(outcome("op", "message-ttl"), Outcome::Carried(json!(1000)));
        // On a quorum queue delivery-limit applies.
        let quorum = json!({"x-queue-type": "quorum"});
        let m = merge(quorum.as_object().unwrap(), Some(&p), None);
        assert_eq!(m.arguments["x-delivery-limit"], 3);
    }
}
