//! Per-unit gauges, computed when `/metrics` is scraped: messages per queue and state,
//! consumers per queue, and consumer-group lag per partition.
//!
//! Why at scrape time rather than through the `metrics` recorder: these values already live
//! in the queue engine and the metadata store, and keeping a labelled gauge up to date on
//! every enqueue, lease and commit would put a registry update on each message's path (and
//! leave stale series behind deleted queues). A scrape reads them once, and a deleted queue
//! simply stops appearing. Bounded by [`MAX_SERIES`] per family, so a namespace with very
//! many queues cannot make a scrape unbounded.

use std::fmt::Write;

use tributary_core::Core;

/// Series per metric family at most; beyond it the rest are left out and
/// `tributary_metrics_series_truncated{family}` says so.
pub const MAX_SERIES: usize = 10_000;

/// The names this module exports, with their help text (the dashboard test checks them).
pub const FAMILIES: &[(&str, &str)] = &[
    (
        "tributary_queue_messages",
        "Messages in a queue, per state: ready (deliverable), leased (delivered, not settled), delayed (not yet due).",
    ),
    (
        "tributary_queue_consumers",
        "Consumers attached to a queue.",
    ),
    (
        "tributary_group_lag",
        "Records between a consumer group's committed offset and the end of the partition.",
    ),
];

/// Prometheus label value escaping (backslash, double quote, newline).
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str) {
    let help = FAMILIES
        .iter()
        .find(|(n, _)| *n == name)
        .map_or("", |(_, h)| h);
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} gauge");
}

/// The per-unit gauges of one core in Prometheus text format.
pub async fn render(core: &Core) -> String {
    let namespaces = core.list_namespaces().into_iter().map(|n| n.name).collect();
    render_units(&[(core.clone(), namespaces)]).await
}

/// The per-unit gauges of several cores (a cluster node's shard cores), each asked about
/// the namespaces listed beside it, in one exposition: each family's header once, its
/// series from every core after it.
pub async fn render_units(units: &[(Core, Vec<String>)]) -> String {
    let mut out = String::new();
    let mut truncated: Vec<&str> = Vec::new();

    let mut queues = Vec::new();
    'queues: for (core, namespaces) in units {
        for ns in namespaces {
            if let Ok(list) = core.list_queues(ns).await {
                queues.extend(list.into_iter().map(|q| (ns.clone(), q)));
            }
            if queues.len() >= MAX_SERIES {
                truncated.push("tributary_queue_messages");
                break 'queues;
            }
        }
    }
    queues.truncate(MAX_SERIES);
    header(&mut out, "tributary_queue_messages");
    for (ns, q) in &queues {
        let name = q.id.as_ref().map_or("", |i| i.name.as_str());
        for (state, value) in [
            ("ready", q.messages_ready),
            ("leased", q.messages_leased),
            ("delayed", q.messages_delayed),
        ] {
            let _ = writeln!(
                out,
                "tributary_queue_messages{{namespace=\"{}\",queue=\"{}\",state=\"{state}\"}} {value}",
                esc(ns),
                esc(name)
            );
        }
    }
    header(&mut out, "tributary_queue_consumers");
    for (ns, q) in &queues {
        let name = q.id.as_ref().map_or("", |i| i.name.as_str());
        let _ = writeln!(
            out,
            "tributary_queue_consumers{{namespace=\"{}\",queue=\"{}\"}} {}",
            esc(ns),
            esc(name),
            q.consumers
        );
    }

    header(&mut out, "tributary_group_lag");
    let mut series = 0;
    let mut namespaces: Vec<(&Core, &String)> = Vec::new();
    for (core, list) in units {
        namespaces.extend(list.iter().map(|ns| (core, ns)));
    }
    'groups: for (core, ns) in namespaces {
        let Ok(groups) = core.group_lags(ns).await else {
            continue;
        };
        for (g, lags) in groups {
            for l in lags {
                let Some(lag) = l.lag else { continue };
                let _ = writeln!(
                    out,
                    "tributary_group_lag{{namespace=\"{}\",group=\"{}\",stream=\"{}\",partition=\"{}\"}} {lag}",
                    esc(ns),
                    esc(&g.group),
                    esc(&l.stream),
                    l.partition
                );
                series += 1;
                if series >= MAX_SERIES {
                    truncated.push("tributary_group_lag");
                    break 'groups;
                }
            }
        }
    }
    if !truncated.is_empty() {
        let _ = writeln!(
            out,
            "# HELP tributary_metrics_series_truncated Per-unit metric families cut at {MAX_SERIES} series in this scrape."
        );
        let _ = writeln!(out, "# TYPE tributary_metrics_series_truncated gauge");
        for family in truncated {
            let _ = writeln!(
                out,
                "tributary_metrics_series_truncated{{family=\"{family}\"}} 1"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(esc("x\ny"), "x\\ny");
    }
}
