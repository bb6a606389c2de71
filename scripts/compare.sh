#!/usr/bin/env bash
# Side-by-side benchmark: the same workloads against Tributary and the reference brokers
# (Mosquitto for MQTT, RabbitMQ for AMQP 0-9-1, Apache Kafka for Kafka, whose acks=all runs
# also stand against the disk's fsync'd bandwidth, ElasticMQ for SQS, Apache RocketMQ for
# RocketMQ), A B A B for --rounds rounds, then a table of medians and ratios and an SVG chart.
#
#   scripts/compare.sh [--rounds 3] [--duration 10] [--only mqtt,amqp,kafka,sqs,rocketmq,cross] [--out DIR] [--quick] [--no-pin]
#
# On a machine with two cores or more, the load generator runs on core 0 and the broker under
# test (every thread of it, and of its child processes) on core 1 (taskset), so that neither
# takes the other's CPU and the ratios do not depend on the scheduler; --no-pin shares them.
#
# Builds the release binary, installs mosquitto and rabbitmq-server from Debian when missing
# and Apache Kafka's, ElasticMQ's and Apache RocketMQ's jars from Maven Central (needs java
# and mvn), starts every broker on free loopback ports, stops everything it started (also on
# Ctrl-C), and writes DIR/results.jsonl (one `tributary bench --json` report per line),
# DIR/failures.txt, DIR/table.md and DIR/chart.svg (DIR defaults to target/compare/<date>).
# A workload whose gateway Tributary does not have yet is run against the reference only and
# marked so. `cross` workloads (one protocol in, another out: MQTT publishers into a Kafka
# topic read by a Kafka consumer group) run on Tributary only: no reference broker does it.
# The table also has each broker's CPU time per delivered message (read from /proc for the
# --broker-pid process, for RabbitMQ the Erlang VM from its pid file) and its ratio to
# Tributary's: where the load generator shares the machine's cores, throughput ratios are
# bounded by the generator's own CPU, while CPU per message compares the brokers' cost directly.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

rounds=3
duration=10
only="mqtt,amqp,kafka,sqs,rocketmq,cross"
out=""
quick=0
pin=1
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --duration) duration="$2"; shift 2 ;;
        --only) only="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --quick) quick=1; rounds=1; duration=3; shift ;;
        --no-pin) pin=0; shift ;;
        -h|--help) sed -n 2,25p "$0"; exit 0 ;;
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
# shellcheck source=scripts/brokers.sh
source "$root/scripts/brokers.sh"
work="$(mktemp -d /tmp/tributary-compare.XXXXXX)"
brokers_init "$work"
t_pid=""
cleanup() {
    set +e
    brokers_stop
    tributary_stop
    rm -rf "$work"
}
trap cleanup EXIT
# A signal ends the run: a trap that only cleaned up would let the script go on (and start
# the brokers it just stopped again), unseen, beside the next run.
trap 'exit 130' INT TERM

# 1,000 idle connections per workload plus the active ones, for the bench and every broker.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "== building release"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tributary/target}"
cargo build --release --locked --bin tributary --features bench >/dev/null
bin="$CARGO_TARGET_DIR/release/tributary"

pkgs=()
if wants mqtt; then pkgs+=(mosquitto); fi
if wants amqp; then pkgs+=(rabbitmq-server); fi
if wants kafka; then pkgs+=(kafka); fi
if wants sqs; then pkgs+=(elasticmq); fi
if wants rocketmq; then pkgs+=(rocketmq); fi
if [[ ${#pkgs[@]} -gt 0 ]]; then brokers_install "${pkgs[@]}"; fi

# The disk's fsync'd sequential write bandwidth, in the directory Tributary writes to: 512 MiB
# with one fdatasync at the end (dd conv=fdatasync). Measured next to every Kafka produce run,
# because a shared disk's bandwidth moves between runs.
measure_disk() {
    dd if=/dev/zero of="$work/dd.bin" bs=1M count=512 conv=fdatasync 2>&1 \
        | awk '/copied/ { v=$(NF-1); u=$NF; if (u ~ /^GB/) v*=1000; if (u ~ /^kB/) v/=1000; print v }'
    rm -f "$work/dd.bin"
}

# --- Tributary ----------------------------------------------------------------------------
# Started fresh (empty data dir) for every run, like Mosquitto: a process keeps the memory it
# once used, and an earlier run's data would sit in the page cache.
# No limit on an MQTT session's queue, as Mosquitto here (max_queued_messages 0): the bench
# fails on any lost message, and what is measured is how each broker keeps queues short.
tributary_start() {
    tributary_stop
    rm -rf "$work/tributary"
    mkdir -p "$work/tributary"
    t_kafka=$(free_port); t_mqtt=$(free_port); t_amqp=$(free_port); t_sqs=$(free_port)
    t_rocketmq=$(free_port); t_namesrv=$(free_port)
    "$bin" --data-dir "$work/tributary/data" --core-listen 127.0.0.1:0 \
        --admin-listen 127.0.0.1:0 --kafka-listen "127.0.0.1:$t_kafka" \
        --mqtt-listen "127.0.0.1:$t_mqtt" --mqtt-ws-listen off --amqp-listen "127.0.0.1:$t_amqp" \
        --sqs-listen "127.0.0.1:$t_sqs" \
        --rocketmq-listen "127.0.0.1:$t_rocketmq" --namesrv-listen "127.0.0.1:$t_namesrv" \
        --log warn \
        --mqtt-max-queued 100000000 \
        > "$work/tributary/stdout" 2> "$work/tributary/stderr" &
    t_pid=$!
    wait_tributary_ready "$work/tributary/stdout" "$t_pid" "$work/tributary/stderr" || exit 1
}
tributary_stop() {
    if [[ -n "$t_pid" ]]; then kill "$t_pid" 2>/dev/null; wait "$t_pid" 2>/dev/null || true; fi
    t_pid=""
}
cores=$(nproc)
if (( pin )) && [[ $cores -lt 2 || -z "$(command -v taskset)" ]]; then
    echo "one core or no taskset: the load generator and the brokers share the CPU"
    pin=0
fi
bench_cpu=()
if (( pin )); then
    bench_cpu=(taskset -c 0)
    # Every broker started from here on (they are children of this shell) starts on core 1,
    # so each sizes its threads for the one core it has (tokio workers, JVM and Erlang
    # schedulers) instead of being moved there with threads for two.
    taskset -p -c 1 $$ > /dev/null
fi
echo "== starting tributary (to see which gateways this build has)"
tributary_start
has_gateway() { grep -q "^listening $1 " "$work/tributary/stdout"; }

# --- RabbitMQ (Mosquitto is started fresh for every run, below) ----------------------------
if wants amqp; then
    echo "== starting rabbitmq-server"
    rabbitmq_start
fi
# ElasticMQ boots once too, and its JVM is warmed up with 20 s of unmeasured traffic (cold,
# it serves a fraction of its warm rate); every SQS run creates its own queue and deletes it.
if wants sqs; then
    echo "== starting elasticmq (and warming its JIT up)"
    elasticmq_start
    for warm in "--batch 10 --duration 12" "--duration 4" "--batch 10 --fifo --duration 4"; do
        # shellcheck disable=SC2086
        "$bin" bench sqs --target "$e_url" --producers 4 --consumers 8 $warm > /dev/null 2>&1 || true
    done
fi
# Apache RocketMQ (NameServer and broker, two JVMs) also boots once and is warmed up like
# ElasticMQ: 15 s of unmeasured traffic, so its JIT has compiled the send and pull paths.
# Every run creates its own topic and deletes it. Tributary starts fresh for every run.
if wants rocketmq; then
    echo "== starting apache rocketmq (and warming its JIT up)"
    rocketmq_start
    "$bin" bench rocketmq --target "$r_namesrv" --producers 4 --consumers 2 --duration 15 \
        > /dev/null 2>&1 || true
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
    # Many publishers and subscribers on one topic, and one publisher to 1,000 subscribers,
    # unpaced: whether publishers are slowed to their subscribers' pace (flow control) or
    # queues and latency grow.
    workloads+=("mqtt-qos1-10x10-1topic|mqtt|--producers 10 --consumers 10 --topics 1 --qos 1")
    workloads+=("mqtt-fanout-1x1000|mqtt|--producers 1 --consumers 1000 --topics 1 --qos 1")
fi
if wants amqp; then
    workloads+=("amqp-confirms-4x4|amqp|--producers 4 --consumers 4 --topics 4 --qos 1 --prefetch 100")
    # 1 publisher -> durable fanout exchange -> 10 durable queues, one consumer each: msg/s
    # counts deliveries (10 per publish); the JSON's sent_per_sec has the publishes.
    workloads+=("amqp-fanout-1x10|amqp|--producers 1 --consumers 10 --fanout 10 --qos 1 --prefetch 100")
fi
if wants kafka; then
    workloads+=("kafka-acks-all|kafka|--producers 4 --consumers 2 --acks all")
    workloads+=("kafka-acks-all-20k/s|kafka|--producers 4 --consumers 2 --acks all --rate 20000 --connections $idle")
    workloads+=("kafka-consume-from-start|kafka|--producers 4 --consumers 2 --acks all --from-start")
    workloads+=("kafka-transactional-100ms|kafka|--producers 4 --consumers 2 --acks all --transactional --commit-ms 100")
fi

if wants sqs; then
    # Send / receive / delete loops, one request in flight per client, long polling (20 s).
    # Consumers make two requests (receive, delete) per batch to the producers' one, so there
    # are twice as many. Unpaced runs measure throughput; the paced one latency at a load both
    # brokers sustain.
    workloads+=("sqs-single-4x8|sqs|--producers 4 --consumers 8")
    workloads+=("sqs-batch10-4x8|sqs|--producers 4 --consumers 8 --batch 10")
    workloads+=("sqs-fifo-batch10-4x8|sqs|--producers 4 --consumers 8 --batch 10 --fifo --groups 8")
    workloads+=("sqs-single-500/s|sqs|--producers 4 --consumers 8 --rate 500")
fi
if wants rocketmq; then
    # SEND_MESSAGE_V2 round robin over 8 queues (128 sends in flight per producer) and
    # long-polled PULL_MESSAGE per queue, as the kafka ones: unpaced throughput, and latency
    # at a load both brokers sustain.
    workloads+=("rocketmq-send-pull-4x2|rocketmq|--producers 4 --consumers 2 --partitions 8")
    workloads+=("rocketmq-send-pull-20k/s|rocketmq|--producers 4 --consumers 2 --partitions 8 --rate 20000")
fi
if wants cross; then
    # IoT ingestion: 100 MQTT publishers (QoS 1) into one Kafka topic of 6 partitions, read
    # by a consumer group of 4 (the topic is the stream; docs/compat/mapping.md).
    workloads+=("mqtt-into-kafka-100x4|cross|--producers 100 --consumers 4 --qos 1 --partitions 6")
    workloads+=("mqtt-into-kafka-100x4-10k/s|cross|--producers 100 --consumers 4 --qos 1 --partitions 6 --rate 10000")
fi

# Moves every thread of a process and of its descendants to core 1 (threads made later
# inherit it from the thread that makes them).
pin_broker() { # pid
    (( pin )) && [[ -n "$1" && "$1" != 0 ]] || return 0
    local p
    for p in "$1" $(pgrep -P "$1" 2>/dev/null); do
        taskset -a -p -c 1 "$p" > /dev/null 2>&1 || true
        if [[ "$p" != "$1" ]]; then pin_broker "$p"; fi
    done
}

run_one() { # label protocol broker target pid flags...
    local label="$1" protocol="$2" broker="$3" target="$4" pid="$5"
    shift 5
    local line
    echo "   $label on $broker"
    pin_broker "$pid"
    # shellcheck disable=SC2068
    if line=$("${bench_cpu[@]}" "$bin" bench "$protocol" --target "$target" --size 1024 --duration "$duration" \
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
            mqtt|amqp)
                if has_gateway "$protocol"; then
                    tributary_start
                    port_var="t_$protocol"
                    run_one "$label" "$protocol" tributary "127.0.0.1:${!port_var}" "$t_pid" $flags
                elif (( round == 1 )); then
                    echo "$label on tributary: no ${protocol^^} gateway in this build" \
                        | tee -a "$failures" >&2
                fi
                if [[ "$protocol" == mqtt ]]; then
                    # A fresh Mosquitto for every run: it keeps the memory it once used, so a
                    # reused broker reports nothing for the next run's connections.
                    mosquitto_start
                    run_one "$label" mqtt mosquitto "127.0.0.1:$m_port" "$m_pid" $flags
                else
                    run_one "$label" amqp rabbitmq "127.0.0.1:$r_port" "${r_pid:-0}" $flags
                fi ;;
            sqs)
                if has_gateway sqs; then
                    tributary_start
                    run_one "$label" sqs tributary "http://127.0.0.1:$t_sqs" "$t_pid" $flags
                    tributary_stop
                elif (( round == 1 )); then
                    echo "$label on tributary: no SQS gateway in this build" \
                        | tee -a "$failures" >&2
                fi
                run_one "$label" sqs elasticmq "$e_url" "$e_pid" $flags ;;
            kafka)
                tributary_start
                run_one "$label" kafka tributary "127.0.0.1:$t_kafka" "$t_pid" $flags
                # The target: acks=all produce at >= 70% of the disk's fsync'd bandwidth.
                # Apache Kafka, fresh for every run like Tributary. It acknowledges acks=all
                # once the (single) replica has the batch in its page cache: no fsync, which
                # Tributary does before every acknowledgement.
                tributary_stop
                kafka_start
                run_one "$label" kafka apache-kafka "127.0.0.1:$k_port" "$k_pid" $flags
                kafka_stop
                if [[ "$label" == kafka-acks-all ]]; then
                    disk_mb=$(measure_disk)
                    echo "   disk (dd fsync): $disk_mb MB/s"
                    printf '{"protocol":"disk","broker":"disk (dd fsync)","label":"%s","mb_per_sec":%s}\n' \
                        "$label" "$disk_mb" >> "$results"
                fi ;;
            cross)
                tributary_start
                run_one "$label" mqtt tributary "127.0.0.1:$t_mqtt" "$t_pid" $flags \
                    --kafka-consumers "127.0.0.1:$t_kafka"
                tributary_stop ;;
            rocketmq)
                if has_gateway rocketmq-namesrv; then
                    tributary_start
                    run_one "$label" rocketmq tributary "127.0.0.1:$t_namesrv" "$t_pid" $flags
                    tributary_stop
                elif (( round == 1 )); then
                    echo "$label on tributary: no RocketMQ gateway in this build" \
                        | tee -a "$failures" >&2
                fi
                # The broker JVM's CPU (the NameServer only answers the route look-ups).
                run_one "$label" rocketmq apache-rocketmq "$r_namesrv" "$rb_pid" $flags ;;
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
if (( pin )); then echo "pinned: the load generator on core 0, each broker on core 1 (taskset)"; fi
echo "machine: $cores cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)," \
    "$(uname -sr); mosquitto $(/usr/sbin/mosquitto -h 2>/dev/null | awk 'NR==1 {print $3}')," \
    "rabbitmq $(dpkg-query -W -f='${Version}' rabbitmq-server 2>/dev/null || echo '?')," \
    "apache kafka $kafka_version (acks=all without fsync; Tributary fsyncs before acking)," \
    "elasticmq $elasticmq_version (in memory)," \
    "apache rocketmq ${rocketmq_version:-?} (ASYNC_MASTER, ASYNC_FLUSH; store on tmpfs when /dev/shm is writable)"
