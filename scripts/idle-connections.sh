#!/usr/bin/env bash
# Memory per idle connection: starts a Tributary server with one gateway listening, opens N
# idle client connections to it (MQTT: CONNECT 3.1.1 with keep-alive 0, clean session, and
# CONNACK read; Kafka: ApiVersions v0 and its answer), and prints the server's resident
# memory before and after, per 1,000 connections.
#
#   scripts/idle-connections.sh [mqtt|kafka] [N]      (default: mqtt 100000)
#
# The file limit is raised to the hard limit; N above what it allows is cut to fit, and the
# output says so (this project's CI machines allow 20,000 open files per process and cannot
# raise it). Clients are spread over processes of at most 15,000 connections each and over
# source addresses 127.0.0.2-127.0.0.251, so the ephemeral port range is no limit.
# TRIBUTARY_BIN picks the binary (default: the release build in the cargo target dir).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/brokers.sh

protocol="${1:-mqtt}"
want="${2:-100000}"
target_dir="${CARGO_TARGET_DIR:-$HOME/.cache/tributary/target}"
bin="${TRIBUTARY_BIN:-$target_dir/release/tributary}"
if [[ ! -x "$bin" ]]; then
    CARGO_TARGET_DIR="$target_dir" cargo build --release --bin tributary
fi
ulimit -n "$(ulimit -Hn)"
limit=$(ulimit -n)
n=$want
if (( n > limit - 200 )); then
    n=$((limit - 200))
    echo "open files are limited to $limit per process here (hard limit): $n connections instead of $want"
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

port=$(free_port)
listen=(--kafka-listen off --mqtt-listen off)
case "$protocol" in
    mqtt) listen=(--kafka-listen off --mqtt-listen "127.0.0.1:$port") ;;
    kafka) listen=(--kafka-listen "127.0.0.1:$port" --mqtt-listen off) ;;
    *) echo "protocol: mqtt or kafka" >&2; exit 2 ;;
esac
"$bin" --data-dir "$work/data" --core-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    "${listen[@]}" --mqtt-ws-listen off --amqp-listen off --sqs-listen off \
    --rocketmq-listen off --namesrv-listen off --log warn > "$work/stdout" 2> "$work/stderr" &
server=$!
pids+=("$server")
wait_tributary_ready "$work/stdout" "$server" "$work/stderr" || exit 1
rss() { awk '/VmRSS/ {print $2}' "/proc/$server/status"; }
before=$(rss)

cat > "$work/idle.py" <<'PYEOF'
import asyncio, sys
proto, port, first, count, spread = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                     int(sys.argv[4]), int(sys.argv[5]))
held = []
def hello(i):
    if proto == "mqtt":
        cid = f"idle-{i}".encode()
        body = b"\x00\x04MQTT\x04\x02\x00\x00" + len(cid).to_bytes(2, "big") + cid
        return bytes([0x10, len(body)]) + body
    head = (18).to_bytes(2, "big") + (0).to_bytes(2, "big") + i.to_bytes(4, "big") + b"\x00\x04idle"
    return len(head).to_bytes(4, "big") + head
async def one(i, gate):
    async with gate:
        # 4,000 per source address, from a different one each run: a bound source port
        # stays taken while the last run's connections sit in TIME_WAIT.
        src = f"127.0.0.{2 + (i // 4000 + spread) % 250}"
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
        w.write(hello(i))
        await w.drain()
        if proto == "mqtt":
            ack = await r.readexactly(4)
            assert ack[0] == 0x20 and ack[3] == 0, ack
        else:
            size = int.from_bytes(await r.readexactly(4), "big")
            await r.readexactly(size)
        held.append((r, w))
async def main():
    gate = asyncio.Semaphore(256)
    await asyncio.gather(*(one(i, gate) for i in range(first, first + count)))
    print("opened", len(held), flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
PYEOF
per_process=15000
spread=$((RANDOM % 250))
started=0
k=0
while (( started < n )); do
    count=$(( n - started < per_process ? n - started : per_process ))
    python3 "$work/idle.py" "$protocol" "$port" "$started" "$count" "$spread" > "$work/client.$k" 2>&1 &
    pids+=("$!")
    started=$((started + count))
    k=$((k + 1))
done
deadline=$((SECONDS + 600))
for ((j = 0; j < k; j++)); do
    until grep -q '^opened' "$work/client.$j" 2>/dev/null; do
        if ((SECONDS > deadline)) || grep -q Error "$work/client.$j"; then
            echo "client $j failed:" >&2
            tail -5 "$work/client.$j" >&2
            exit 1
        fi
        sleep 0.5
    done
done
# Let the server finish whatever each connection's opening left to do.
sleep 2
after=$(rss)
awk -v p="$protocol" -v n="$n" -v b="$before" -v a="$after" 'BEGIN {
    printf "%s: %d idle connections, server RSS %.1f MiB before, %.1f MiB after: %.2f MiB per 1,000 connections (%.1f KiB each)\n",
        p, n, b / 1024, a / 1024, (a - b) / 1024 / n * 1000, (a - b) / n
}'
