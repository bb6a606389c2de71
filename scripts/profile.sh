#!/usr/bin/env bash
# Where the broker's CPU goes under one workload: a fresh release server on core 1, the load
# generator on core 0 (as compare.sh), `perf record` sampling the server's CPU clock (the
# software event: hardware counters are not available on every VM) with call graphs, then
# the hottest functions by self time and by time including callees.
#
#   scripts/profile.sh <workload> [seconds]      workloads: kafka-acks-all, mqtt-qos1-100x100, mqtt-qos1-10x10-1topic,
#                                                 amqp-confirms-4x4, mqtt-fanout-1x1000
#
# Writes target/profile/<workload>/{perf.data,self.txt,children.txt}. Needs perf (Debian's
# linux-perf) and taskset. PROFILE_CALL_GRAPH replaces perf's `-g` (frame pointers, which the
# release build mostly lacks): PROFILE_CALL_GRAPH="--call-graph dwarf,16384" gives callers.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/brokers.sh

workload="${1:?workload}"
seconds="${2:-10}"
case "$workload" in
    kafka-acks-all) protocol=kafka; flags=(--producers 4 --consumers 2 --acks all) ;;
    mqtt-qos1-100x100) protocol=mqtt; flags=(--producers 100 --consumers 100 --topics 100 --qos 1) ;;
    mqtt-qos1-10x10-1topic) protocol=mqtt; flags=(--producers 10 --consumers 10 --topics 1 --qos 1) ;;
    mqtt-fanout-1x1000) protocol=mqtt; flags=(--producers 1 --consumers 1000 --topics 1 --qos 1) ;;
    amqp-confirms-4x4) protocol=amqp; flags=(--producers 4 --consumers 4 --topics 4 --qos 1 --prefetch 100) ;;
    *) echo "unknown workload '$workload'" >&2; exit 2 ;;
esac
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tributary/target}"
cargo build --release --locked --bin tributary --features bench >/dev/null
bin="$CARGO_TARGET_DIR/release/tributary"
out="target/profile/$workload"
mkdir -p "$out"
work=$(mktemp -d)
server=""
cleanup() {
    if [[ -n "$server" ]]; then kill "$server" 2>/dev/null || true; fi
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"

port=$(free_port)
listen=(--kafka-listen off --mqtt-listen off --amqp-listen off)
case "$protocol" in
    kafka) listen=(--kafka-listen "127.0.0.1:$port" --mqtt-listen off --amqp-listen off) ;;
    mqtt) listen=(--kafka-listen off --mqtt-listen "127.0.0.1:$port" --amqp-listen off) ;;
    amqp) listen=(--kafka-listen off --mqtt-listen off --amqp-listen "127.0.0.1:$port") ;;
esac
taskset -c 1 "$bin" --data-dir "$work/data" --core-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    "${listen[@]}" --mqtt-ws-listen off --sqs-listen off --rocketmq-listen off \
    --namesrv-listen off --log warn --mqtt-max-queued 100000000 \
    > "$work/stdout" 2> "$work/stderr" &
server=$!
wait_tributary_ready "$work/stdout" "$server" "$work/stderr" || exit 1

taskset -c 0 "$bin" bench "$protocol" --target "127.0.0.1:$port" --size 1024 \
    --duration "$((seconds + 2))" --warmup 1 --broker-pid "$server" "${flags[@]}" \
    > "$out/bench.txt" 2>&1 &
load=$!
# Past the warm-up, for the run's steady part.
sleep 2
perf record -q -e cpu-clock -F 999 ${PROFILE_CALL_GRAPH:--g} -p "$server" -o "$out/perf.data" -- sleep "$seconds" \
    2> "$work/perf.err" || { cat "$work/perf.err" >&2; exit 1; }
wait "$load" || true
perf report -i "$out/perf.data" --stdio --no-children --percent-limit 1 -g none \
    --sort symbol 2>/dev/null | grep -v '^$' > "$out/self.txt"
perf report -i "$out/perf.data" --stdio --children --percent-limit 3 -g none \
    --sort symbol 2>/dev/null | grep -v '^$' > "$out/children.txt"
echo "== $workload: bench"
grep -E 'msg/s|p99|cpu' "$out/bench.txt" | head -8 || true
echo "== self time (top 25)"
grep -v '^#' "$out/self.txt" | head -25
echo "== including callees (top 30)"
grep -v '^#' "$out/children.txt" | head -30
