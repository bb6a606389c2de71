#!/usr/bin/env bash
# Side-by-side benchmark: the same workloads against Tributary and the reference brokers
# (Mosquitto for MQTT, RabbitMQ for AMQP 0-9-1; Kafka against the disk's fsync'd bandwidth),
# A B A B for --rounds rounds, then a table of medians and ratios and an SVG chart.
#
#   scripts/compare.sh [--rounds 3] [--duration 10] [--only mqtt,amqp,kafka] [--out DIR] [--quick]
#
# Builds the release binary, installs mosquitto and rabbitmq-server from Debian when missing,
# starts every broker on free loopback ports, stops everything it started (also on Ctrl-C), and
# writes DIR/results.jsonl (one `tributary bench --json` report per line), DIR/failures.txt,
# DIR/table.md and DIR/chart.svg (DIR defaults to target/compare/<date>). A workload whose
# gateway Tributary does not have yet is run against the reference only and marked so.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

rounds=3
duration=10
only="mqtt,amqp,kafka"
out=""
quick=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --duration) duration="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --quick) quick=1; rounds=1; duration=3; shift ;;
        -h|--help) sed -n 2,13p "$0"; exit 0 ;;
        *) echo "compare.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
wants() { [[ ",$only," == *",$1,"* ]]; }

out="${out:-$root/target/compare/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
results="$out/results.jsonl"
failures="$out/failures.txt"
: > "$results"
: > "$failures"
work="$(mktemp -d /tmp/tributary-compare.XXXXXX)"

# 1,000 idle connections per workload plus the active ones, for the bench and every broker.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "== building release"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tributary/target}"
cargo build --release --locked --bin tributary >/dev/null
bin="$CARGO_TARGET_DIR/release/tributary"

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
need_pkgs=()
if wants mqtt && ! command -v mosquitto >/dev/null && [[ ! -x /usr/sbin/mosquitto ]]; then
    need_pkgs+=(mosquitto)
fi
if wants amqp && [[ ! -x /usr/sbin/rabbitmq-server ]]; then need_pkgs+=(rabbitmq-server); fi
if [[ ${#need_pkgs[@]} -gt 0 ]]; then
    echo "== installing ${need_pkgs[*]} from Debian"
    as_root apt-get update -qq
    # The packages' own services are not wanted: this script starts its own instances.
    as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq \
        --no-install-recommends "${need_pkgs[@]}" >/dev/null
    for svc in mosquitto rabbitmq-server; do
        as_root service "$svc" stop >/dev/null 2>&1 || true
    done
fi
mosquitto_bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pids=()
rabbit_node=""
rabbit_env=()
cleanup() {
    set +e
    if [[ -n "$rabbit_node" ]]; then
        env "${rabbit_env[@]}" timeout 60 rabbitmqctl -n "$rabbit_node" stop >/dev/null 2>&1
    fi
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
    # epmd is started by RabbitMQ on demand (on its own port here) and outlives it.
    if [[ -n "$rabbit_node" ]]; then
        env "${rabbit_env[@]}" epmd -kill >/dev/null 2>&1
    fi
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

wait_port() { # host port seconds
    local deadline=$((SECONDS + $3))
    until python3 -c "import socket,sys; socket.create_connection(('$1', $2), 1)" 2>/dev/null; do
        if (( SECONDS > deadline )); then return 1; fi
        sleep 0.2
    done
}

echo "== disk: fsync'd sequential write bandwidth (dd, 512 MiB, conv=fdatasync)"
disk_mb=$(dd if=/dev/zero of="$work/dd.bin" bs=1M count=512 conv=fdatasync 2>&1 \
    | awk '/copied/ { v=$(NF-1); u=$NF; if (u ~ /^GB/) v*=1000; if (u ~ /^kB/) v/=1000; print v }')
rm -f "$work/dd.bin"
echo "   ${disk_mb} MB/s"

# --- Tributary ----------------------------------------------------------------------------
echo "== starting tributary"
mkdir -p "$work/tributary"
t_kafka=$(free_port); t_mqtt=$(free_port); t_amqp=$(free_port)
"$bin" --data-dir "$work/tributary/data" --core-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --kafka-listen "127.0.0.1:$t_kafka" --mqtt-listen "127.0.0.1:$t_mqtt" \
    --amqp-listen "127.0.0.1:$t_amqp" --log warn \
    > "$work/tributary/stdout" 2> "$work/tributary/stderr" &
t_pid=$!
pids+=("$t_pid")
for _ in $(seq 100); do grep -qx ready "$work/tributary/stdout" 2>/dev/null && break; sleep 0.1; done
grep -qx ready "$work/tributary/stdout" || { cat "$work/tributary/stderr" >&2; exit 1; }
has_gateway() { grep -q "^listening $1 " "$work/tributary/stdout"; }

# --- Mosquitto ----------------------------------------------------------------------------
if wants mqtt; then
    echo "== starting mosquitto"
    m_port=$(free_port)
    mkdir -p "$work/mosquitto"
    # The bench fails on any lost message. Mosquitto's defaults drop under a max-rate run:
    # max_queued_messages 1000 drops for a subscriber that falls behind (even at QoS 1), and
    # max_inflight_messages 20 also bounds incoming QoS 2 (more in flight are dropped).
    cat > "$work/mosquitto/mosquitto.conf" <<EOF
listener $m_port 127.0.0.1
allow_anonymous true
max_queued_messages 0
max_inflight_messages 1000
max_connections -1
persistence false
log_dest stderr
log_type error
log_type warning
EOF
    "$mosquitto_bin" -c "$work/mosquitto/mosquitto.conf" 2> "$work/mosquitto/stderr" &
    m_pid=$!
    pids+=("$m_pid")
    wait_port 127.0.0.1 "$m_port" 20 || { cat "$work/mosquitto/stderr" >&2; exit 1; }
fi

# --- RabbitMQ -----------------------------------------------------------------------------
if wants amqp; then
    echo "== starting rabbitmq-server"
    r_port=$(free_port)
    rabbit_node="compare-$$@localhost"
    rd="$work/rabbitmq"
    mkdir -p "$rd"/{mnesia,log,home}
    printf 'listeners.tcp.1 = 127.0.0.1:%s\nloopback_users.guest = true\n' "$r_port" > "$rd/rabbitmq.conf"
    echo '[].' > "$rd/enabled_plugins"
    # Everything in the work dir, its own epmd port: nothing touches a system RabbitMQ.
    # /usr/lib/rabbitmq/bin/rabbitmq-server runs as the caller (the /usr/sbin wrapper switches
    # to the rabbitmq user when run as root).
    rabbit_env=(HOME="$rd/home" RABBITMQ_NODENAME="$rabbit_node"
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$r_port"
        RABBITMQ_DIST_PORT="$(free_port)" ERL_EPMD_PORT="$(free_port)"
        RABBITMQ_MNESIA_BASE="$rd/mnesia" RABBITMQ_LOG_BASE="$rd/log"
        RABBITMQ_CONFIG_FILE="$rd/rabbitmq.conf"
        RABBITMQ_ENABLED_PLUGINS_FILE="$rd/enabled_plugins" RABBITMQ_PID_FILE="$rd/rabbit.pid")
    env "${rabbit_env[@]}" /usr/lib/rabbitmq/bin/rabbitmq-server > "$rd/stdout" 2>&1 &
    pids+=("$!")
    if ! env "${rabbit_env[@]}" timeout 120 rabbitmqctl -n "$rabbit_node" await_startup \
            >/dev/null 2>&1; then
        tail -20 "$rd/stdout" >&2
        exit 1
    fi
    r_pid=$(cat "$rd/rabbit.pid")
fi

# --- Workloads ----------------------------------------------------------------------------
idle=1000
if (( quick )); then idle=100; fi
# label | protocol | bench flags
workloads=()
if wants mqtt; then
    # Unpaced runs measure throughput (their latency is mostly queueing); the paced one
    # measures latency at a load every broker sustains.
    workloads+=("mqtt-qos0-100x100|mqtt|--producers 100 --consumers 100 --topics 100 --qos 0 --connections $idle")
    workloads+=("mqtt-qos1-100x100|mqtt|--producers 100 --consumers 100 --topics 100 --qos 1 --connections $idle")
    workloads+=("mqtt-qos1-100x100-10k/s|mqtt|--producers 100 --consumers 100 --topics 100 --qos 1 --rate 10000")
    workloads+=("mqtt-fanout-1x1000-50/s|mqtt|--producers 1 --consumers 1000 --topics 1 --qos 1 --rate 50")
fi
if wants amqp; then
    workloads+=("amqp-confirms-4x4|amqp|--producers 4 --consumers 4 --topics 4 --qos 1 --prefetch 100")
fi
if wants kafka; then
    workloads+=("kafka-acks-all|kafka|--producers 4 --consumers 2 --acks all")
    workloads+=("kafka-consume-from-start|kafka|--producers 4 --consumers 2 --acks all --from-start")
fi

run_one() { # label protocol broker target pid flags...
    local label="$1" protocol="$2" broker="$3" target="$4" pid="$5"
    shift 5
    local line
    echo "   $label on $broker"
    # shellcheck disable=SC2068
    if line=$("$bin" bench "$protocol" --target "$target" --size 1024 --duration "$duration" \
            --warmup 1 --broker "$broker" --label "$label" --broker-pid "$pid" --json $@ \
            2> "$work/bench.err"); then
        echo "$line" >> "$results"
    else
        echo "$label on $broker: $(tail -1 "$work/bench.err")" | tee -a "$failures" >&2
    fi
}

for round in $(seq "$rounds"); do
    echo "== round $round of $rounds"
    for w in "${workloads[@]}"; do
        IFS='|' read -r label protocol flags <<< "$w"
        case "$protocol" in
            mqtt)
                if has_gateway mqtt; then
                    run_one "$label" mqtt tributary "127.0.0.1:$t_mqtt" "$t_pid" $flags
                elif (( round == 1 )); then
                    echo "$label on tributary: no MQTT gateway in this build" | tee -a "$failures" >&2
                fi
                run_one "$label" mqtt mosquitto "127.0.0.1:$m_port" "$m_pid" $flags ;;
            amqp)
                if has_gateway amqp; then
                    run_one "$label" amqp tributary "127.0.0.1:$t_amqp" "$t_pid" $flags
                elif (( round == 1 )); then
                    echo "$label on tributary: no AMQP gateway in this build" | tee -a "$failures" >&2
                fi
                run_one "$label" amqp rabbitmq "127.0.0.1:$r_port" "${r_pid:-0}" $flags ;;
            kafka)
                run_one "$label" kafka tributary "127.0.0.1:$t_kafka" "$t_pid" $flags
                if (( round == 1 )); then
                    printf '{"protocol":"disk","broker":"disk (dd fsync)","label":"%s","mb_per_sec":%s}\n' \
                        "$label" "$disk_mb" >> "$results"
                fi ;;
        esac
    done
done

echo
echo "== results ($out)"
"$bin" bench report "$results" --svg "$out/chart.svg"
"$bin" bench report "$results" --markdown > "$out/table.md"
if [[ -s "$failures" ]]; then
    echo
    echo "== not measured"
    cat "$failures"
fi
echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)," \
    "$(uname -sr); mosquitto $("$mosquitto_bin" -h 2>/dev/null | awk 'NR==1 {print $3}')," \
    "rabbitmq $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo '?')"
