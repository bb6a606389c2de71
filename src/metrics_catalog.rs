//! Every metric the process exports, in one list: name, type and help text.
//!
//! [`register`] describes each one (`# HELP` / `# TYPE`) and creates its series at zero when
//! the Prometheus recorder is installed, so the first scrape of `/metrics` lists every metric,
//! before any traffic. A metric whose labels take a fixed set of values starts with one series
//! per value; one whose label values are only known at run time (listener names, queue
//! reasons) starts with a single unlabeled zero series, which sums away.
//!
//! `tests/metrics.rs` greps the workspace for `metrics::counter!` / `gauge!` / `histogram!`
//! names and fails on any that is not in this list (and so not described).

/// The kind of a metric, as Prometheus types it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric.
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Label sets to create at start; empty = one unlabeled series.
    pub series: &'static [&'static [(&'static str, &'static str)]],
}

const fn m(name: &'static str, kind: Kind, help: &'static str) -> Metric {
    Metric {
        name,
        kind,
        help,
        series: &[],
    }
}

/// Every metric any crate in the workspace records.
pub const METRICS: &[Metric] = &[
    // Streams (Kafka and the core's stream API).
    m(
        "tributary_records_in_total",
        Kind::Counter,
        "Records appended to streams.",
    ),
    m(
        "tributary_bytes_in_total",
        Kind::Counter,
        "Bytes of records appended to streams.",
    ),
    m(
        "tributary_records_out_total",
        Kind::Counter,
        "Records read from streams.",
    ),
    m(
        "tributary_bytes_out_total",
        Kind::Counter,
        "Bytes of records read from streams.",
    ),
    m(
        "tributary_kafka_produced_bytes_total",
        Kind::Counter,
        "Bytes of record batches produced through the Kafka gateway.",
    ),
    // Transactions.
    Metric {
        name: "tributary_transactions_completed_total",
        kind: Kind::Counter,
        help: "Transactions the coordinator completed (markers written in every partition), per outcome.",
        series: &[&[("outcome", "commit")], &[("outcome", "abort")]],
    },
    m(
        "tributary_transactions_timed_out_total",
        Kind::Counter,
        "Transactions aborted by the coordinator because they outlived their timeout.",
    ),
    m(
        "tributary_staged_transactions_total",
        Kind::Counter,
        "Staged transactions opened (StageMessages without a transaction id).",
    ),
    Metric {
        name: "tributary_staged_transactions_completed_total",
        kind: Kind::Counter,
        help: "Staged transactions ended, per outcome: commit, rollback, or discard (rolled back after max_checks check-backs without an answer).",
        series: &[
            &[("outcome", "commit")],
            &[("outcome", "rollback")],
            &[("outcome", "discard")],
        ],
    },
    m(
        "tributary_staged_transaction_checks_total",
        Kind::Counter,
        "Check-backs of staged transactions handed out by ClaimStagedChecks.",
    ),
    // Storage.
    m(
        "tributary_storage_fsync_seconds",
        Kind::Histogram,
        "Time one fsync of the local storage took, in seconds.",
    ),
    m(
        "tributary_storage_segments_shipped_total",
        Kind::Counter,
        "Sealed segments the object-store log uploaded (storage = opendal).",
    ),
    m(
        "tributary_storage_segment_upload_seconds",
        Kind::Histogram,
        "Time one segment upload to the object store took, in seconds.",
    ),
    m(
        "tributary_storage_wal_objects_total",
        Kind::Counter,
        "WAL objects written to the object store (opendal_ack = shared).",
    ),
    m(
        "tributary_storage_wal_bytes_total",
        Kind::Counter,
        "Bytes of WAL objects written to the object store (opendal_ack = shared).",
    ),
    m(
        "tributary_storage_wal_upload_seconds",
        Kind::Histogram,
        "Time one WAL object upload took, in seconds (opendal_ack = shared).",
    ),
    m(
        "tributary_storage_appends_refused_total",
        Kind::Counter,
        "Appends refused at once because the object store had stored nothing for the acknowledgement limit (opendal_ack = shared; nothing was written).",
    ),
    m(
        "tributary_storage_cold_read_seconds",
        Kind::Histogram,
        "Time one read from a segment in the object store (below the local cache) took, in seconds.",
    ),
    Metric {
        name: "tributary_storage_object_errors_total",
        kind: Kind::Counter,
        help: "Failed object-store operations of the object-store log, by operation (op: wal_put, ship); each is retried.",
        series: &[&[("op", "wal_put")], &[("op", "ship")]],
    },
    // Gateway listeners.
    m(
        "tributary_connections",
        Kind::Gauge,
        "Open gateway connections, per listener.",
    ),
    m(
        "tributary_connections_accepted_total",
        Kind::Counter,
        "Gateway connections accepted, per listener.",
    ),
    m(
        "tributary_connections_dropped_total",
        Kind::Counter,
        "Gateway connections closed before a gateway served them, per listener and reason (limit, handshake_timeout, handshake_failed).",
    ),
    m(
        "tributary_auth_refusals_total",
        Kind::Counter,
        "Authentication refusals, per listener and reason: core and admin API calls without the right token (missing_token, malformed_header, wrong_token, no_core_token), and protocol logins (bad_credentials, anonymous, mechanism, malformed, guest_remote, vhost).",
    ),
    m(
        "tributary_messages_in_total",
        Kind::Counter,
        "Messages received from clients, per listener and protocol (Kafka records produced, MQTT PUBLISH, AMQP basic.publish, SQS messages sent).",
    ),
    m(
        "tributary_message_bytes_in_total",
        Kind::Counter,
        "Payload bytes of the messages received from clients, per listener and protocol.",
    ),
    m(
        "tributary_messages_out_total",
        Kind::Counter,
        "Messages sent to clients, per listener and protocol (Kafka records fetched, MQTT PUBLISH, AMQP deliveries and basic.get-ok).",
    ),
    m(
        "tributary_message_bytes_out_total",
        Kind::Counter,
        "Payload bytes of the messages sent to clients, per listener and protocol.",
    ),
    m(
        "tributary_tls_reloads_total",
        Kind::Counter,
        "Reloads of the TLS certificate (on SIGHUP or a change of its files), per result (ok, error: the certificate in use stays).",
    ),
    m(
        "tributary_kafka_authorization_denied_total",
        Kind::Counter,
        "Kafka requests (or parts of one: a topic, a group) refused by the ACL authorizer, per resource type and operation.",
    ),
    // Timers.
    m(
        "tributary_timers_pending",
        Kind::Gauge,
        "Durable timers scheduled and not yet fired.",
    ),
    m(
        "tributary_timers_fired_total",
        Kind::Counter,
        "Durable timers fired.",
    ),
    m(
        "tributary_timers_dropped_total",
        Kind::Counter,
        "Durable timers dropped when fired because their message could not be enqueued.",
    ),
    // MQTT sessions.
    Metric {
        name: "tributary_session_dropped_total",
        kind: Kind::Counter,
        help: "MQTT messages dropped, per reason: queue_full (a session over mqtt_max_queued), slow_subscriber (a QoS 0 subscriber that took nothing for a second).",
        series: &[
            &[("reason", "queue_full")],
            &[("reason", "slow_subscriber")],
        ],
    },
    m(
        "tributary_session_publishes_paced_total",
        Kind::Counter,
        "MQTT QoS 1/2 publishes whose acknowledgement waited for a subscriber with over 1,000 messages queued (flow control: publishers go at their subscribers' pace).",
    ),
    // Queues (AMQP and the queue API).
    m(
        "tributary_queue_enqueued_total",
        Kind::Counter,
        "Messages enqueued on queues.",
    ),
    m(
        "tributary_queue_transient_dropped_total",
        Kind::Counter,
        "Transient (non-durable) queue messages dropped because the process restarted.",
    ),
    m(
        "tributary_queue_dead_lettered_total",
        Kind::Counter,
        "Queue messages dead-lettered, per reason.",
    ),
    m(
        "tributary_queue_discarded_total",
        Kind::Counter,
        "Dead-lettered queue messages discarded: no dead-letter target, or it does not exist or routes nowhere, or (dead_letter_expired = false, SQS retention) past their TTL.",
    ),
    // SQS gateway.
    m(
        "tributary_sqs_requests_total",
        Kind::Counter,
        "SQS requests per action and outcome (ok, or the SQS error code answered).",
    ),
    // RocketMQ gateway.
    m(
        "tributary_rocketmq_bad_frames_total",
        Kind::Counter,
        "RocketMQ connections closed because a frame or header did not decode.",
    ),
    m(
        "tributary_rocketmq_unsupported_requests_total",
        Kind::Counter,
        "RocketMQ requests answered REQUEST_CODE_NOT_SUPPORTED.",
    ),
    m(
        "tributary_rocketmq_messages_pulled_total",
        Kind::Counter,
        "Messages RocketMQ pulls returned.",
    ),
    m(
        "tributary_rocketmq_unreadable_batches_total",
        Kind::Counter,
        "Batches a RocketMQ pull skipped because they are in a format nobody decodes (or a malformed Kafka batch), each also logged.",
    ),
    m(
        "tributary_mapping_undeliverable_total",
        Kind::Counter,
        "Records read from a stream for MQTT subscribers, the queues bound to the stream's address or its delay target that could not be delivered (undecodable batch, a session refusing; records held for a delay target are retried), each logged (rate-limited); see docs/compat/mapping.md.",
    ),
    m(
        "tributary_delayed_records_total",
        Kind::Counter,
        "Records of delay lines (streams with a delay_target) scheduled for their target.",
    ),
    m(
        "tributary_session_dead_letters_total",
        Kind::Counter,
        "QoS 1/2 messages MQTT sessions dropped, on their way to mqtt_dead_letter_address, by outcome: routed, failed (the address refused; logged, rate-limited), overflow (too many waiting).",
    ),
    m(
        "tributary_rocketmq_delayed_messages_total",
        Kind::Counter,
        "RocketMQ messages sent with a delay level or delivery time (scheduled on the core's timers).",
    ),
    m(
        "tributary_rocketmq_retries_scheduled_total",
        Kind::Counter,
        "Messages a RocketMQ consumer sent back, scheduled on its group's retry topic.",
    ),
    m(
        "tributary_rocketmq_dead_lettered_total",
        Kind::Counter,
        "Messages sent back past maxReconsumeTimes, put on the group's %DLQ% topic.",
    ),
    m(
        "tributary_rocketmq_half_messages_total",
        Kind::Counter,
        "RocketMQ half (transactional) messages staged in the core.",
    ),
    m(
        "tributary_rocketmq_transactions_ended_total",
        Kind::Counter,
        "RocketMQ half messages committed or rolled back by END_TRANSACTION, per outcome.",
    ),
    m(
        "tributary_rocketmq_transaction_checks_total",
        Kind::Counter,
        "CHECK_TRANSACTION_STATE requests sent to producers for unresolved half messages.",
    ),
    m(
        "tributary_rocketmq_transactions_discarded_total",
        Kind::Counter,
        "RocketMQ half messages rolled back after transaction_check_max unanswered checks.",
    ),
];

/// Describes every metric in [`METRICS`] and creates its series, on the installed recorder.
pub fn register() {
    for metric in METRICS {
        let name = metric.name;
        let help = metric.help;
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
        let unlabeled: &[&[(&str, &str)]] = &[&[]];
        let series = if metric.series.is_empty() {
            unlabeled
        } else {
            metric.series
        };
        for labels in series {
            let labels: Vec<metrics::Label> = labels
                .iter()
                .map(|(k, v)| metrics::Label::new(*k, *v))
                .collect();
            // Touching a handle registers the series (at zero) without changing it.
            match metric.kind {
                Kind::Counter => drop(metrics::counter!(name, labels)),
                Kind::Gauge => drop(metrics::gauge!(name, labels)),
                Kind::Histogram => drop(metrics::histogram!(name, labels)),
            }
        }
    }
}
