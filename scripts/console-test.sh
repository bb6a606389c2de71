#!/usr/bin/env bash
# End-to-end tests of the web console in headless Chromium.
#
#   TRIBUTARY_BIN=target/debug/tributary scripts/console-test.sh [NODE --test ARGS...]
#
# Installs what it needs when missing: Debian's chromium (scripts/brokers.sh), the compat
# venv's Python clients (scripts/compat.sh --setup-only) and playwright-core from
# compat-tests/console/package-lock.json (`npm ci`, cache in ~/.npm; Playwright downloads no
# browser: the tests launch /usr/bin/chromium). Then starts the binary on free loopback ports
# with a fresh core_token, makes real client traffic (compat-tests/console/traffic.py: Kafka,
# MQTT and AMQP with a dead letter) and runs compat-tests/console/console.test.mjs (node's
# test runner) against the console. The server is stopped by its PID afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

if [[ -z "${TRIBUTARY_BIN:-}" || ! -x "${TRIBUTARY_BIN}" ]]; then
    echo "console-test.sh: set TRIBUTARY_BIN to a built tributary binary (cargo build; TRIBUTARY_BIN=target/debug/tributary)" >&2
    exit 2
fi
TRIBUTARY_BIN="$(cd "$(dirname "$TRIBUTARY_BIN")" && pwd)/$(basename "$TRIBUTARY_BIN")"

# shellcheck source=scripts/brokers.sh
source scripts/brokers.sh
brokers_install chromium
if ! command -v npm >/dev/null 2>&1; then
    echo "== installing nodejs and npm from Debian"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
# playwright-core 1.65 wants Node.js 20 or later (Debian 12's own nodejs is 18).
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if ((node_major < 20)); then
    echo "console-test.sh: Node.js $(node --version) is too old for playwright-core 1.65; install Node.js 20 or later" >&2
    exit 1
fi
scripts/compat.sh --setup-only >/dev/null
venv="${TRIBUTARY_VENV:-$HOME/.cache/tributary/venv}"

echo "== npm ci (compat-tests/console)"
(cd compat-tests/console &&
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --cache "$HOME/.npm" --prefer-offline >/dev/null)

work="$(mktemp -d "${TMPDIR:-/tmp}/tributary-console.XXXXXX")"
pid=""
cleanup() {
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

token="$(python3 -c 'import secrets; print(secrets.token_hex(24))')"
args=(--data-dir "$work/data" --core-token "$token")
for flag in --core-listen --admin-listen --kafka-listen --mqtt-listen --amqp-listen; do
    args+=("$flag" 127.0.0.1:0)
done
for flag in --mqtt-ws-listen --mqtt-tls-listen --mqtt-wss-listen --kafka-tls-listen \
    --amqp-tls-listen --sqs-listen --rocketmq-listen --namesrv-listen; do
    args+=("$flag" off)
done
TRIBUTARY_LOG="${TRIBUTARY_LOG:-warn}" "$TRIBUTARY_BIN" "${args[@]}" >"$work/stdout" 2>"$work/stderr" &
pid=$!

deadline=$((SECONDS + 60))
until grep -qx ready "$work/stdout"; do
    if ! kill -0 "$pid" 2>/dev/null || ((SECONDS > deadline)); then
        echo "console-test.sh: tributary did not become ready" >&2
        cat "$work/stdout" "$work/stderr" >&2
        exit 1
    fi
    sleep 0.1
done
addr() { sed -n "s/^listening $1 //p" "$work/stdout" | head -1; }
admin="$(addr admin)"

echo "== client traffic (Kafka, MQTT, AMQP)"
"$venv/bin/python" compat-tests/console/traffic.py --kafka "$(addr kafka)" --mqtt "$(addr mqtt)" \
    --amqp "$(addr amqp)" --out "$work/scenario.json" >/dev/null

echo "== console in headless Chromium ($admin)"
status=0
# CONSOLE_BURST: how the overview test makes traffic while it watches the rate chart;
# CONSOLE_HOLD: the AMQP connection the connections test closes.
TRIBUTARY_ADMIN="http://$admin" TRIBUTARY_TOKEN="$token" CONSOLE_SCENARIO="$work/scenario.json" \
    CONSOLE_BURST="$venv/bin/python $root/compat-tests/console/traffic.py --burst $(addr mqtt)" \
    CONSOLE_HOLD="$venv/bin/python $root/compat-tests/console/traffic.py --hold-amqp $(addr amqp)" \
    CHROMIUM_BIN="${CHROMIUM_BIN:-/usr/bin/chromium}" \
    node --test --test-concurrency=1 "$@" "$root/compat-tests/console/console.test.mjs" || status=$?
if [[ $status -ne 0 ]]; then
    echo "---- tributary stderr (last 80 lines)" >&2
    tail -n 80 "$work/stderr" >&2
fi
exit $status
