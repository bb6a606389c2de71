#!/usr/bin/env bash
# Short `tributary bench mqtt|amqp|sqs` runs against the reference brokers (Mosquitto, RabbitMQ,
# installed from Debian when missing; ElasticMQ from Maven Central, needs java and mvn) and
# against Tributary's own MQTT, AMQP and SQS gateways, checking that every expected delivery
# arrived. The Kafka bench is covered against
# Tributary itself by tests/bench_cli.rs.
#
#   TRIBUTARY_BIN=target/debug/tributary scripts/bench-smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
bin="${TRIBUTARY_BIN:?set TRIBUTARY_BIN to the tributary binary}"

# shellcheck source=scripts/brokers.sh
source "$root/scripts/brokers.sh"
work="$(mktemp -d /tmp/tributary-bench-smoke.XXXXXX)"
brokers_init "$work"
t_pid=""
cleanup() {
    set +e
    [[ -n "$t_pid" ]] && kill "$t_pid" 2>/dev/null && wait "$t_pid" 2>/dev/null
    brokers_stop
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

brokers_install mosquitto rabbitmq-server elasticmq
mosquitto_start
echo "== rabbitmq-server starting"
rabbitmq_start
elasticmq_start

failed=0
check() { # name protocol target flags...
    local name="$1" protocol="$2" target="$3"
    shift 3
    local json
    # shellcheck disable=SC2068
    if ! json=$(timeout 120 "$bin" bench "$protocol" --target "$target" --json $@ 2> "$work/err"); then
        echo "FAIL $name: $(tail -1 "$work/err")"
        failed=1
        return
    fi
    if python3 - "$json" <<'EOF'; then
import json, sys
r = json.loads(sys.argv[1])
ok = r["sent"] > 0 and r["received"] == r["expected"] and r["msgs_per_sec"] > 0
print(("ok  " if ok else "FAIL") + f' sent {r["sent"]} received {r["received"]} of '
      f'{r["expected"]} expected, {r["msgs_per_sec"]:.0f} msg/s, p99 {r["p99_ms"]:.1f} ms', end=" ")
sys.exit(0 if ok else 1)
EOF
        echo "$name"
    else
        echo "$name"
        failed=1
    fi
}

# Tributary standalone with only its MQTT, AMQP and SQS listeners, on free ports.
t_port=$(free_port)
ta_port=$(free_port)
ts_port=$(free_port)
tk_port=$(free_port)
mkdir -p "$work/tributary"
"$bin" --data-dir "$work/tributary/data" --core-listen off --admin-listen off \
    --kafka-listen "127.0.0.1:$tk_port" --mqtt-listen "127.0.0.1:$t_port" --mqtt-ws-listen off \
    --amqp-listen "127.0.0.1:$ta_port" --sqs-listen "127.0.0.1:$ts_port" --log warn \
    > "$work/tributary/stdout" 2> "$work/tributary/stderr" &
t_pid=$!
deadline=$((SECONDS + 60))
until grep -qx ready "$work/tributary/stdout" 2>/dev/null; do
    if ((SECONDS > deadline)) || ! kill -0 "$t_pid" 2>/dev/null; then
        echo "FAIL tributary did not start:"; cat "$work/tributary/stderr"; exit 1
    fi
    sleep 0.1
done

m="127.0.0.1:$m_port"
r="127.0.0.1:$r_port"
t="127.0.0.1:$t_port"
for target in "$m" "$t"; do
    name=mosquitto
    [[ "$target" == "$t" ]] && name=tributary
    check "$name mqtt qos0 4x4 on 2 topics" mqtt "$target" --producers 4 --consumers 4 --topics 2 --qos 0 --duration 2 --rate 2000
    check "$name mqtt qos1 4x4 on 2 topics" mqtt "$target" --producers 4 --consumers 4 --topics 2 --qos 1 --duration 2
    check "$name mqtt qos2 2x2" mqtt "$target" --producers 2 --consumers 2 --topics 2 --qos 2 --duration 2
    check "$name mqtt fan-out 1x50 + 50 idle" mqtt "$target" --producers 1 --consumers 50 --qos 1 --rate 100 --duration 2 --connections 50
done
# Across protocols (no reference broker): MQTT publishers into a Kafka topic, one group.
check "tributary mqtt into kafka 4 publishers, group of 2" mqtt "$t" --producers 4 --consumers 2 --qos 1 --duration 2 --partitions 2 --kafka-consumers "127.0.0.1:$tk_port"
ta="127.0.0.1:$ta_port"
for target in "$r" "$ta"; do
    name=rabbitmq
    [[ "$target" == "$ta" ]] && name=tributary
    check "$name amqp confirms 2x2 durable" amqp "$target" --producers 2 --consumers 2 --topics 2 --qos 1 --duration 2
    check "$name amqp no confirms transient 2x1" amqp "$target" --producers 2 --consumers 1 --qos 0 --transient --duration 2
done

ts="http://127.0.0.1:$ts_port"
for target in "$e_url" "$ts"; do
    name=elasticmq
    [[ "$target" == "$ts" ]] && name=tributary
    check "$name sqs single 2x2" sqs "$target" --producers 2 --consumers 2 --duration 2 --size 256 --wait 1
    check "$name sqs batch 10 2x4" sqs "$target" --producers 2 --consumers 4 --batch 10 --duration 2 --size 256 --wait 1
    check "$name sqs fifo batch 10 2x4, 3 groups" sqs "$target" --producers 2 --consumers 4 --batch 10 --fifo --groups 3 --duration 2 --size 256 --wait 1
done

# A broker that goes away mid-run: one error line and a non-zero exit, never a hang.
mosquitto_start
gone_port=$m_port
"$bin" bench mqtt --target "127.0.0.1:$gone_port" --producers 2 --consumers 2 --qos 1 \
    --duration 60 > "$work/gone.out" 2> "$work/gone.err" &
bench_pid=$!
# Running once all four of its connections are established.
deadline=$((SECONDS + 30))
until [[ $(python3 - "$gone_port" <<'EOF'
import sys
port = f"{int(sys.argv[1]):04X}"
n = 0
for line in open("/proc/net/tcp"):
    f = line.split()
    # local address ends in the broker's port, state 01 = ESTABLISHED
    if f[1].endswith(":" + port) and f[3] == "01":
        n += 1
print(n)
EOF
) -ge 4 ]]; do
    if ((SECONDS > deadline)); then echo "FAIL bench never connected to mosquitto"; failed=1; break; fi
    sleep 0.1
done
mosquitto_stop
start=$SECONDS
if wait "$bench_pid"; then
    echo "FAIL bench reported success after its broker was killed"
    failed=1
elif [[ -s "$work/gone.out" || $(wc -l < "$work/gone.err") -ne 1 ]]; then
    echo "FAIL expected one error line and no report, got:"; cat "$work/gone.err" "$work/gone.out"
    failed=1
else
    echo "ok   broker killed mid-run: exit after $((SECONDS - start)) s: $(cat "$work/gone.err")"
fi
exit "$failed"
