#!/usr/bin/env bash
# The cluster mode end to end (issue 18):
#
#   1. docker-compose.yml (the design card, with the Dockerfile) is validated by Debian's
#      docker-compose, which checks a file without a Docker engine (none runs here); installed
#      with apt-get when missing;
#   2. compat-tests/cluster runs scripts/cluster.sh (etcd or PostgreSQL, moto's S3, three core
#      nodes in network namespaces, one gateway of each protocol) and fails it over under Kafka,
#      MQTT and AMQP clients: kill -9, a network cut and SIGTERM of the serving node; once with
#      etcd and once with PostgreSQL. Then the same events with every node serving its share
#      of six shards (`cluster.sh up --shards 6`), on the first store named; six topics of one
#      namespace spread over them (`--scheme stream`, test_topics_spread.py); and the same with
#      a Kafka gateway beside each node, whose partition leaders follow the shard owners
#      through a kill -9 and the node's return (`--kafka-per-node`, test_kafka_leaders.py).
#      The takeover times and read-back counts are printed.
#
#   TRIBUTARY_BIN=target/debug/tributary scripts/test-cluster.sh [etcd|postgres ...] [-- PYTEST ARGS]
#
# Needs root (or sudo) for apt-get and for the network namespaces; without them cluster.sh
# runs everything on 127.0.0.1 and a cut is SIGSTOP of the node (see scripts/cluster.sh).
# The stores come from Debian (etcd-server, postgresql) and PyPI (moto, in
# ~/.cache/tributary/venv-s3), the clients from compat-tests/requirements.txt (the venv of
# scripts/compat.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/stores.sh
source scripts/stores.sh
section() { echo "== [$((SECONDS / 60))m$((SECONDS % 60))s] $*"; }

metas=()
pytest_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        etcd|postgres) metas+=("$1"); shift ;;
        --) shift; pytest_args=("$@"); break ;;
        *) echo "test-cluster.sh: unknown argument $1 (etcd, postgres, -- PYTEST ARGS)" >&2; exit 2 ;;
    esac
done
[[ ${#metas[@]} -gt 0 ]] || metas=(etcd postgres)

if [[ -z "${TRIBUTARY_BIN:-}" || ! -x "${TRIBUTARY_BIN:-}" ]]; then
    echo "test-cluster.sh: set TRIBUTARY_BIN to a built tributary binary" >&2
    exit 2
fi
TRIBUTARY_BIN="$(cd "$(dirname "$TRIBUTARY_BIN")" && pwd)/$(basename "$TRIBUTARY_BIN")"
export TRIBUTARY_BIN

section "docker-compose.yml and Dockerfile (docker-compose config, no engine)"
if ! command -v docker-compose >/dev/null 2>&1; then
    echo "== installing docker-compose from Debian"
    as_root apt-get update -qq
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            docker-compose >/dev/null; then
        echo "test-cluster.sh: Debian's docker-compose is not installable here; docker-compose.yml is not validated" >&2
        exit 1
    fi
fi
# The file requires the S3 keys from the environment (it refuses to start without them).
S3_ACCESS_KEY=check S3_SECRET_KEY=check docker-compose -f docker-compose.yml config -q
services=$(S3_ACCESS_KEY=check S3_SECRET_KEY=check docker-compose -f docker-compose.yml config --services | sort | tr '\n' ' ')
want="core1 core2 core3 etcd gateway-amqp gateway-kafka gateway-mqtt gateway-rocketmq gateway-sqs minio minio-bucket "
if [[ "$services" != "$want" ]]; then
    echo "test-cluster.sh: docker-compose.yml has services '$services', expected '$want'" >&2
    exit 1
fi
compose=$(S3_ACCESS_KEY=check S3_SECRET_KEY=check docker-compose -f docker-compose.yml config)
for n in 1 2 3; do
    if ! grep -q -- "- core$n$" <<<"$compose"; then
        echo "test-cluster.sh: core$n does not run 'tributary core --cluster-node core$n'" >&2
        exit 1
    fi
done
if ! grep -q 'TRIBUTARY_CORE: http://core1:7400,http://core2:7400,http://core3:7400' <<<"$compose"; then
    echo "test-cluster.sh: the gateways are not given the three nodes" >&2
    exit 1
fi
if ! grep -q '^FROM rust:1.95' Dockerfile || ! grep -q 'cargo build --release' Dockerfile; then
    echo "test-cluster.sh: Dockerfile does not build in rust:1.95 with cargo build --release" >&2
    exit 1
fi
echo "docker-compose.yml: valid, services $services"

section "stores and clients"
stores_install etcd postgres s3
scripts/compat.sh --setup-only
venv="${TRIBUTARY_VENV:-$HOME/.cache/tributary/venv}"

report=$(mktemp "${TMPDIR:-/tmp}/tributary-cluster-report.XXXXXX")
trap 'rm -f "$report"' EXIT
section "compat-tests/cluster with meta = ${metas[*]} ($TRIBUTARY_BIN)"
rc=0
TRIBUTARY_CLUSTER_METAS="${metas[*]}" TRIBUTARY_CLUSTER_REPORT="$report" \
    TRIBUTARY_CLUSTER_SHARD_METAS="${TRIBUTARY_CLUSTER_SHARD_METAS:-${metas[0]}}" \
    "$venv/bin/python" -m pytest -q compat-tests/cluster "${pytest_args[@]}" || rc=$?
section "cluster failover outcomes"
cat "$report"
exit "$rc"
