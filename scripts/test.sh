#!/usr/bin/env bash
# The project's test command (README.md "Run the tests"; .ci/run calls exactly this).
# Needs the Rust toolchain and python3; cargo fetches the crates, scripts/compat.sh the Python
# clients (venv); mosquitto (the MQTT reference broker), rabbitmq-server and chromium (the
# console's end-to-end tests) come from Debian, playwright-core from npm (cache in ~/.npm), Apache
# Kafka, Apache RocketMQ and ElasticMQ (the Kafka, RocketMQ and SQS references) from Maven Central.
set -euo pipefail
cd "$(dirname "$0")/.."
# Each section says how long the run has taken so far (the CI run must stay under 45 min).
section() { echo "== [$((SECONDS / 60))m$((SECONDS % 60))s] $*"; }

section "cargo fmt --check"
cargo fmt --all -- --check
section "cargo clippy -D warnings"
# hdfs too, so the HDFS backend (a cargo feature no default build has) keeps compiling.
cargo clippy --workspace --all-targets --locked --features bench,hdfs -- -D warnings
# The server without the load generators (what `cargo run --release` builds) must stay clean too.
cargo clippy --locked --bin tributary -- -D warnings
section "cargo test"
cargo test --workspace --locked --features bench
section "protocol compatibility scenarios (real client libraries)"
cargo build --locked --bin tributary --features bench
section "scripts/compat.sh kafka"
TRIBUTARY_BIN="${CARGO_TARGET_DIR:-target}/debug/tributary" scripts/compat.sh kafka
# The MQTT scenarios also run against Mosquitto (installed from Debian when missing).
(source scripts/brokers.sh && brokers_install mosquitto)
section "scripts/compat.sh mqtt"
TRIBUTARY_BIN="${CARGO_TARGET_DIR:-target}/debug/tributary" scripts/compat.sh mqtt
# The AMQP scenarios also run against RabbitMQ (installed from Debian when missing).
(source scripts/brokers.sh && brokers_install rabbitmq-server)
section "scripts/compat.sh amqp"
TRIBUTARY_BIN="${CARGO_TARGET_DIR:-target}/debug/tributary" scripts/compat.sh amqp
# The SQS scenarios also run against ElasticMQ (its jars fetched from Maven Central by the script).
section "scripts/compat.sh sqs"
TRIBUTARY_BIN="${CARGO_TARGET_DIR:-target}/debug/tributary" scripts/compat.sh sqs
# Across protocols: one protocol in, another out (no reference broker does this).
section "scripts/compat.sh cross"
TRIBUTARY_BIN="${CARGO_TARGET_DIR:-target}/debug/tributary" scripts/compat.sh cross
# The RocketMQ scenarios with the Rust client (rocketmq-client-rust, a cargo project of its own).
section "scripts/compat.sh rocketmq-rust"
TRIBUTARY_BIN="${CARGO_TARGET_DIR:-target}/debug/tributary" scripts/compat.sh rocketmq-rust
# The Java clients (kafka-clients, amqp-client, Paho MQTT, rocketmq-client; java 17 and mvn,
# ~/.m2 from Maven Central), AMQP, MQTT, Kafka transactions and RocketMQ also against RabbitMQ,
# Mosquitto, Apache Kafka and Apache RocketMQ (started by the script).
section "scripts/compat-java.sh"
TRIBUTARY_BIN="${CARGO_TARGET_DIR:-target}/debug/tributary" scripts/compat-java.sh
section "storage adapters on real servers (etcd, Redis, PostgreSQL, MariaDB from Debian; S3 from moto), and protocol scenarios on S3 + etcd"
TRIBUTARY_BIN="${CARGO_TARGET_DIR:-target}/debug/tributary" scripts/test-stores.sh
section "cluster failover: docker-compose.yml checked, 3 core nodes on etcd and on PostgreSQL (scripts/test-cluster.sh)"
TRIBUTARY_BIN="${CARGO_TARGET_DIR:-target}/debug/tributary" scripts/test-cluster.sh
section "web console end to end in headless Chromium (chromium from Debian, playwright-core from npm)"
TRIBUTARY_BIN="${CARGO_TARGET_DIR:-target}/debug/tributary" scripts/console-test.sh
section "tributary bench mqtt|amqp|sqs against Mosquitto, RabbitMQ (Debian) and ElasticMQ (Maven Central)"
TRIBUTARY_BIN="${CARGO_TARGET_DIR:-target}/debug/tributary" scripts/bench-smoke.sh
