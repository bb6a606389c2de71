//! `GET /api/v1/overview`: the totals the console charts. The counters are the ones the
//! process already exports on `/metrics` (read back from the same Prometheus recorder, so
//! the two never disagree: messages and bytes per protocol, stream records, queue and
//! connection counters), plus the MQTT broker's own totals and a count of each kind of
//! object. Rates are the client's business: it polls and takes differences.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AdminState;

/// One sample of the Prometheus text format: metric name, labels, value.
#[derive(Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, String)>,
    value: f64,
}

/// Reads the samples of a Prometheus text exposition, skipping comments and lines it does
/// not understand (it reads what our own recorder wrote, nothing else).
fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let (series, value) = line.rsplit_once(' ')?;
        let value: f64 = value.parse().ok()?;
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
            None => (series, Vec::new()),
        };
        Some(Sample {
            name,
            labels,
            value,
        })
    })
}

/// `a="x",b="y \"q\""` -> [(a, x), (b, y "q")].
fn parse_labels(s: &str) -> Option<Vec<(&str, String)>> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((key.trim_start_matches(','), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Some(out)
}

/// What the overview reads from the metrics: totals of a few counters; per listener, open
/// and accepted connections; per protocol, messages and payload bytes in and out.
#[derive(Debug, Default, PartialEq)]
struct FromMetrics {
    totals: BTreeMap<&'static str, f64>,
    /// listener -> (open, accepted)
    listeners: BTreeMap<String, (f64, f64)>,
    /// protocol -> [messages in, bytes in, messages out, bytes out]
    protocols: BTreeMap<String, [f64; 4]>,
}

/// The per-protocol counters the gateways keep, in the order of [`FromMetrics::protocols`].
const PER_PROTOCOL: [&str; 4] = [
    "tributary_messages_in_total",
    "tributary_message_bytes_in_total",
    "tributary_messages_out_total",
    "tributary_message_bytes_out_total",
];

/// The counters summed into `totals`, by the name the overview gives them.
const TOTALS: &[(&str, &str)] = &[
    ("stream_records_in", "tributary_records_in_total"),
    ("stream_bytes_in", "tributary_bytes_in_total"),
    ("stream_records_out", "tributary_records_out_total"),
    ("stream_bytes_out", "tributary_bytes_out_total"),
    ("queue_enqueued", "tributary_queue_enqueued_total"),
    ("queue_dead_lettered", "tributary_queue_dead_lettered_total"),
    ("auth_refusals", "tributary_auth_refusals_total"),
];

fn from_metrics(text: &str) -> FromMetrics {
    let mut out = FromMetrics::default();
    for (key, _) in TOTALS {
        out.totals.insert(key, 0.0);
    }
    for s in samples(text) {
        if let Some((key, _)) = TOTALS.iter().find(|(_, name)| *name == s.name) {
            *out.totals.entry(key).or_default() += s.value;
            continue;
        }
        if let Some(i) = PER_PROTOCOL.iter().position(|name| *name == s.name) {
            // The unlabeled zero series made at start sums away here too.
            if let Some((_, protocol)) = s.labels.iter().find(|(k, _)| *k == "protocol") {
                out.protocols.entry(protocol.clone()).or_default()[i] += s.value;
            }
            continue;
        }
        let open = s.name == "tributary_connections";
        if !open && s.name != "tributary_connections_accepted_total" {
            continue;
        }
        // The unlabeled zero series made at start sums away; only listeners count.
        let Some((_, listener)) = s.labels.iter().find(|(k, _)| *k == "listener") else {
            continue;
        };
        let entry = out.listeners.entry(listener.clone()).or_default();
        if open {
            entry.0 += s.value;
        } else {
            entry.1 += s.value;
        }
    }
    out
}

pub(super) async fn overview(State(s): State<AdminState>) -> Response {
    s.prometheus.run_upkeep();
    let mut m = from_metrics(&s.prometheus.render());
    // No Kafka listener in this process has counted anything (none served a client yet, or
    // this is a split deployment's core, whose gateways count in their own processes): the
    // streams' counters stand for Kafka (they also count the core API's appends and fetches).
    if !m.protocols.contains_key("kafka") {
        let t = |k: &str| m.totals.get(k).copied().unwrap_or(0.0);
        let streams = [
            t("stream_records_in"),
            t("stream_bytes_in"),
            t("stream_records_out"),
            t("stream_bytes_out"),
        ];
        m.protocols.insert("kafka".into(), streams);
    }
    let mqtt = s.core.session_totals();
    let sessions = s.core.list_sessions();
    let namespaces = s.core.list_namespaces();
    let (mut queues, mut addresses) = (0usize, 0usize);
    for ns in &namespaces {
        queues += s.core.list_queues(&ns.name).await.map_or(0, |q| q.len());
        addresses += s.core.list_addresses(&ns.name).len();
    }
    let (streams, storage_bytes) = match s.core.list_all_streams().await {
        Ok(list) => (
            list.len(),
            list.iter()
                .flat_map(|s| &s.partition_info)
                .map(|p| p.size_bytes)
                .sum::<i64>(),
        ),
        Err(_) => (0, 0),
    };
    // Counters are integers; the text format writes them as floats.
    let mut totals: serde_json::Map<String, serde_json::Value> = m
        .totals
        .iter()
        .map(|(k, v)| (k.to_string(), json!(*v as u64)))
        .collect();
    for (k, v) in [
        ("mqtt_messages_in", mqtt.messages_in),
        ("mqtt_messages_out", mqtt.messages_out),
        ("mqtt_bytes_in", mqtt.bytes_in),
        ("mqtt_bytes_out", mqtt.bytes_out),
    ] {
        totals.insert(k.into(), json!(v));
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Json(json!({
        "time_ms": now_ms,
        "version": env!("CARGO_PKG_VERSION"),
        "totals": totals,
        "protocols": m.protocols.iter().map(|(name, v)| json!({
            "protocol": name,
            "messages_in": v[0] as u64,
            "bytes_in": v[1] as u64,
            "messages_out": v[2] as u64,
            "bytes_out": v[3] as u64,
        })).collect::<Vec<_>>(),
        "listeners": m.listeners.iter().map(|(name, (open, accepted))| json!({
            "listener": name,
            "connections": *open as u64,
            "accepted": *accepted as u64,
        })).collect::<Vec<_>>(),
        "counts": {
            "namespaces": namespaces.len(),
            "streams": streams,
            "queues": queues,
            "addresses": addresses,
            "sessions": sessions.len(),
            "sessions_connected": sessions.iter().filter(|s| s.connected).count(),
        },
        "storage_bytes": storage_bytes,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_totals_and_listeners_from_the_exposition() {
        let text = "\
# HELP tributary_records_in_total Records appended to streams.
# TYPE tributary_records_in_total counter
tributary_records_in_total 7
tributary_queue_dead_lettered_total 0
tributary_queue_dead_lettered_total{reason=\"rejected\"} 2
tributary_queue_dead_lettered_total{reason=\"expired\"} 1
tributary_connections 0
tributary_connections{listener=\"amqp\"} 3
tributary_connections_accepted_total{listener=\"amqp\"} 5
tributary_connections_accepted_total{listener=\"we \\\"ird\\\",x\"} 1
tributary_auth_refusals_total{listener=\"admin\",reason=\"missing_token\"} 4
tributary_messages_in_total 0
tributary_messages_in_total{listener=\"amqp\",protocol=\"amqp\"} 6
tributary_messages_in_total{listener=\"amqp-tls\",protocol=\"amqp\"} 1
tributary_message_bytes_out_total{listener=\"mqtt\",protocol=\"mqtt\"} 99
garbage line
";
        let m = from_metrics(text);
        assert_eq!(m.totals["stream_records_in"], 7.0);
        assert_eq!(m.totals["queue_dead_lettered"], 3.0);
        assert_eq!(m.totals["auth_refusals"], 4.0);
        assert_eq!(m.totals["stream_bytes_out"], 0.0);
        assert_eq!(m.listeners["amqp"], (3.0, 5.0));
        assert_eq!(m.listeners["we \"ird\",x"], (0.0, 1.0));
        assert_eq!(m.listeners.len(), 2);
        assert_eq!(m.protocols["amqp"], [7.0, 0.0, 0.0, 0.0]);
        assert_eq!(m.protocols["mqtt"], [0.0, 0.0, 0.0, 99.0]);
        assert_eq!(m.protocols.len(), 2);
    }

    #[test]
    fn label_parsing_handles_escapes_and_several_labels() {
        assert_eq!(
            parse_labels("a=\"x\",b=\"y \\\"q\\\"\""),
            Some(vec![("a", "x".to_string()), ("b", "y \"q\"".to_string())])
        );
        assert_eq!(parse_labels("a=\"unterminated"), None);
    }
}
