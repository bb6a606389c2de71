#!/usr/bin/env bash
# Protocol compatibility tests with the clients users run (compat-tests/).
#
#   TRIBUTARY_BIN=target/release/tributary scripts/compat.sh [kafka|mqtt|amqp|sqs|cross] [PYTEST ARGS...]
#   TRIBUTARY_BIN=target/release/tributary scripts/compat.sh rocketmq-rust [CARGO TEST ARGS...]
#   scripts/compat.sh --setup-only        # only create/refresh the venv
#
# Creates a Python venv at ${TRIBUTARY_VENV:-$HOME/.cache/tributary/venv} when missing and
# installs compat-tests/requirements.txt into it whenever that file changed since the last
# install (a sha256 stamp is kept inside the venv). Then runs pytest on compat-tests/<protocol>
# against the binary named by TRIBUTARY_BIN (required; the tests start it themselves on free
# loopback ports). Needs only python3 (3.11) with venv + pip; the client wheels come from PyPI.
# `mqtt` also runs every scenario against Mosquitto, the reference broker (MOSQUITTO_BIN,
# default /usr/sbin/mosquitto; Debian/Ubuntu: apt-get install mosquitto). `amqp` runs every
# scenario against RabbitMQ too (RABBITMQ_SERVER_BIN, default
# /usr/lib/rabbitmq/bin/rabbitmq-server; apt-get install rabbitmq-server; AMQP_REFERENCE=off
# skips it). `kafka` runs the scenarios on a shared deployment against Apache Kafka as well
# (its jars fetched from Maven Central into ~/.cache/tributary; needs java 17+ and mvn;
# KAFKA_REFERENCE=off skips it). `sqs` runs every scenario against ElasticMQ too
# (org.elasticmq:elasticmq-server_2.13 and its jars fetched from Maven Central into
# ~/.cache/tributary; needs java 17+ and mvn; SQS_REFERENCE=off skips it).
# `cross` runs the cross-protocol scenarios (one protocol in, another out; no reference broker
# serves several protocols from one store, except RabbitMQ with its MQTT plugin for MQTT and
# AMQP through amq.topic, which runs unless AMQP_REFERENCE=off). `rocketmq-rust` needs no venv: it runs `cargo test` in compat-tests/rocketmq-rust (the Rust
# client rocketmq-client-rust, a project of its own with its own Cargo.lock) against the binary,
# building into $CARGO_TARGET_DIR when set; ROCKETMQ_NAMESRV=HOST:PORT aims it at another broker.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

venv="${TRIBUTARY_VENV:-$HOME/.cache/tributary/venv}"
requirements="$root/compat-tests/requirements.txt"
python="${PYTHON:-python3}"

setup_only=0
protocol=kafka
if [[ $# -gt 0 ]]; then
    case "$1" in
        --setup-only) setup_only=1; shift ;;
        kafka|mqtt|amqp|sqs|cross|rocketmq-rust) protocol="$1"; shift ;;
        -*) ;; # pytest arguments; protocol stays kafka
        *) echo "compat.sh: unknown protocol '$1' (known: kafka, mqtt, amqp, sqs, cross, rocketmq-rust)" >&2; exit 2 ;;
    esac
fi

if [[ "$protocol" == rocketmq-rust ]]; then
    if [[ -z "${ROCKETMQ_NAMESRV:-}" ]]; then
        if [[ -z "${TRIBUTARY_BIN:-}" || ! -x "${TRIBUTARY_BIN:-}" ]]; then
            echo "compat.sh: set TRIBUTARY_BIN to a built tributary binary (or ROCKETMQ_NAMESRV to a running NameServer)" >&2
            exit 2
        fi
        TRIBUTARY_BIN="$(cd "$(dirname "$TRIBUTARY_BIN")" && pwd)/$(basename "$TRIBUTARY_BIN")"
        export TRIBUTARY_BIN
    fi
    echo "== cargo test compat-tests/rocketmq-rust (${ROCKETMQ_NAMESRV:-$TRIBUTARY_BIN})"
    cd "$root/compat-tests/rocketmq-rust"
    exec cargo test --locked "$@"
fi

setup_venv() {
    if [[ ! -x "$venv/bin/python" ]]; then
        if ! "$python" -c 'import venv, ensurepip' >/dev/null 2>&1; then
            echo "compat.sh: $python cannot create a venv (python3-venv missing?); installing it" >&2
            if command -v apt-get >/dev/null 2>&1; then
                apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            fi
        fi
        echo "== creating venv $venv"
        mkdir -p "$(dirname "$venv")"
        "$python" -m venv "$venv"
    fi
    local want have stamp="$venv/.tributary-requirements.sha256"
    want="$(sha256sum "$requirements" | cut -d' ' -f1)"
    have="$(cat "$stamp" 2>/dev/null || true)"
    if [[ "$want" != "$have" ]]; then
        echo "== pip install -r compat-tests/requirements.txt"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
        echo "$want" >"$stamp"
    fi
}

setup_venv
if [[ $setup_only -eq 1 ]]; then
    echo "== venv ready: $venv"
    exit 0
fi

if [[ -z "${TRIBUTARY_BIN:-}" ]]; then
    echo "compat.sh: set TRIBUTARY_BIN to a built tributary binary (e.g. cargo build --release; TRIBUTARY_BIN=target/release/tributary)" >&2
    exit 2
fi
if [[ ! -f "$TRIBUTARY_BIN" || ! -x "$TRIBUTARY_BIN" ]]; then
    echo "compat.sh: TRIBUTARY_BIN=$TRIBUTARY_BIN is not an executable file" >&2
    exit 2
fi
TRIBUTARY_BIN="$(cd "$(dirname "$TRIBUTARY_BIN")" && pwd)/$(basename "$TRIBUTARY_BIN")"
export TRIBUTARY_BIN

# The Kafka suite runs its scenarios against Apache Kafka too: its jars come from Maven
# Central (java and mvn needed) unless KAFKA_REFERENCE=off.
if [[ "$protocol" == kafka ]] && [[ ! "${KAFKA_REFERENCE:-}" =~ ^(off|0|false|no)$ ]]; then
    # shellcheck source=scripts/brokers.sh
    source "$root/scripts/brokers.sh"
    brokers_install kafka
    export KAFKA_REFERENCE_HOME="$kafka_home"
fi

# The SQS suite runs its scenarios against ElasticMQ too: its jars come from Maven Central
# (java and mvn needed) unless SQS_REFERENCE=off; the fixtures start it on a free port.
if [[ "$protocol" == sqs ]] && [[ ! "${SQS_REFERENCE:-}" =~ ^(off|0|false|no)$ ]]; then
    # shellcheck source=scripts/brokers.sh
    source "$root/scripts/brokers.sh"
    brokers_install elasticmq
    export ELASTICMQ_HOME="$elasticmq_home"
fi

# Test files or node ids among the arguments narrow the run to them; otherwise the whole suite.
targets=("compat-tests/$protocol")
for arg in "$@"; do
    if [[ "$arg" == compat-tests/* ]]; then targets=(); break; fi
done
echo "== pytest compat-tests/$protocol ($TRIBUTARY_BIN)"
exec "$venv/bin/python" -m pytest -q "${targets[@]}" "$@"
