#!/usr/bin/env bash
# A local Tributary cluster (issue 18): a metadata store (etcd, or PostgreSQL), an S3 server
# (moto) for the log, three `tributary core --cluster-node coreN` nodes sharing both (one
# serves, the others stand by and take over when its lease is lost) and one gateway of each
# protocol in front of all three (`tributary gateway P --core URL1,URL2,URL3`).
#
#   scripts/cluster.sh up [--meta etcd|postgres] [--shards N] [--scheme namespace|stream]
#                         [--kafka-per-node]       # starts it; prints the gateways'
#                                                  # `listening <protocol> ADDR` lines, then `ready`
#   scripts/cluster.sh status                      # a line per node (active, standby, serving
#                                                  # shards, cut, exited) and per gateway
#   scripts/cluster.sh owner NAMESPACE             # with --shards: the node serving it
#   scripts/cluster.sh kill-core N                 # kill -9 of node N
#   scripts/cluster.sh stop-core N                 # SIGTERM: a clean stop hands the lease over
#   scripts/cluster.sh cut-core N                  # isolates node N from everything (see below)
#   scripts/cluster.sh heal-core N                 # undoes the cut
#   scripts/cluster.sh start-core N                # starts node N again (same ports and data dir)
#   scripts/cluster.sh down                        # stops everything, removes the namespaces
#
# Environment: TRIBUTARY_BIN (default $CARGO_TARGET_DIR/debug/tributary, else
# target/debug/tributary), TRIBUTARY_CLUSTER_DIR (state: pids, ports, logs, configs, the token;
# default /tmp/tributary-cluster), TRIBUTARY_CLUSTER_META (etcd or postgres; --meta wins),
# TRIBUTARY_CLUSTER_NETNS (auto, on or off), TRIBUTARY_LOG (the nodes' log level, info).
#
# The network. Each core node runs in a network namespace of its own (iproute2; needs root),
# joined to the root namespace by a veth pair: node N of cluster K is 10.201.K.(4N+2), the root
# side of its pair 10.201.K.(4N+1). The stores listen on 10.201.K.1, an address put on `lo` in
# the root namespace that every node reaches through its veth (the kernel's "dummy" link type is
# not available everywhere; an address on lo is). The gateways run in the root namespace, listen
# for clients on 127.0.0.1 (free ports) and reach the nodes at 10.201.K.(4N+2). `cut-core N`
# sets the node's end of its veth down: from the node, the stores and the gateways are
# unreachable (ENETUNREACH); from everyone else the node falls silent (packets to it are
# dropped, connections time out), as across a real partition. `heal-core N` sets it up again.
# K is the first cluster index free on this machine, so several state dirs can run at once.
#
# With `--shards N` (cluster_shards = N) every node serves its share of N shards at once
# instead of one serving and two standing by (docs/cluster.md, "Spreading units: shards"):
# `up` waits for all three to be ready, `status` says which shards each serves, and `owner NS`
# prints the number of the node serving namespace NS (every gateway's namespace is `default`;
# an AMQP virtual host is its own), asking each node's admin GET /api/v1/cluster/shards.
# `--scheme stream` (cluster_shard_scheme = "stream") also spreads one namespace's topics over
# the nodes, each placed by namespace and name (docs/cluster.md, "Spreading one namespace's
# topics").
#
# `--kafka-per-node` (with --shards) also starts a Kafka gateway for each node N, `kafka-N`,
# the three one fleet (`--kafka-broker-id N --kafka-broker-node coreN`, its `--core` naming
# node N first, then the others): clients are told that the partitions of the shards node N
# serves are led by broker N (docs/cluster.md). They run in the root namespace and listen on
# 127.0.0.1 like the other gateways; `up` prints a `listening kafka-N ADDR` line for each,
# after the `listening kafka` of the gateway in front of all three (no broker id), which stays.
#
# Without network namespaces (not root, `ip netns add` refused, or TRIBUTARY_CLUSTER_NETNS=off)
# everything listens on 127.0.0.1 and `cut-core N` is the closest honest thing: SIGSTOP of the
# node (it stops renewing its lease and answering, but cannot notice it lost the lease until
# `heal-core N` sends SIGCONT; then it must find its lease taken over and exit).
#
# Security: every node and gateway uses the core token generated into the state dir (mode
# 600); the nodes' core and admin listeners (beyond loopback in namespace mode) require it.
# The gateways' client listeners are on 127.0.0.1. etcd and moto have no authentication: they
# listen on 10.201.K.1, which only this machine routes to; PostgreSQL takes password logins
# from 10.201.K.0/24.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/stores.sh
source "$root/scripts/stores.sh"

STATE="${TRIBUTARY_CLUSTER_DIR:-/tmp/tributary-cluster}"
PROTOCOLS=(kafka mqtt amqp sqs rocketmq)
NODES=3
NET_LOCK=/run/lock/tributary-cluster.lock

die() { echo "cluster.sh: $*" >&2; exit 1; }
note() { echo "== $*" >&2; }

usage() {
    sed -n '7,19p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

find_bin() {
    local b="${TRIBUTARY_BIN:-}"
    if [[ -z "$b" ]]; then
        b="${CARGO_TARGET_DIR:-$root/target}/debug/tributary"
    fi
    [[ -x "$b" ]] || die "no tributary binary at $b (set TRIBUTARY_BIN)"
    echo "$(cd "$(dirname "$b")" && pwd)/$(basename "$b")"
}

# --- state ----------------------------------------------------------------------------------

state_file() { echo "$STATE/cluster.env"; }

save_state() {
    {
        declare -p BIN META SHARDS KAFKA_PER_NODE NET_MODE NET_INDEX SVC_ADDR CORE_URLS NODES
        declare -p node_addr node_host_addr node_ns node_if node_hif core_port admin_port
        declare -p PG_PID PG_DIR PG_BIN PG_PORT STORES_DIR
    } 2>/dev/null | sed 's/^declare -\([a-zA-Z-]*\) /declare -g\1 /; s/^declare -g- /declare -g /' > "$(state_file).tmp"
    mv "$(state_file).tmp" "$(state_file)"
}

load_state() {
    [[ -f "$(state_file)" ]] || die "no cluster in $STATE (run: scripts/cluster.sh up)"
    # shellcheck disable=SC1090
    source "$(state_file)"
}

check_node_arg() { # N
    if ! [[ "${1:-}" =~ ^[1-9]$ ]] || ((${1} > NODES)); then
        die "expected a node number 1..$NODES, got '${1:-}'"
    fi
}

pid_of() { # dir
    local p
    p=$(cat "$1/pid" 2>/dev/null) || return 1
    [[ -n "$p" ]] && echo "$p"
}

alive() { # pid
    local s
    s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n "$s" && "$s" != Z && "$s" != X ]]
}

node_alive() { # N
    local p
    p=$(pid_of "$STATE/core$1") && alive "$p"
}

# --- the network ------------------------------------------------------------------------------

netns_usable() {
    [[ $(id -u) -eq 0 ]] || return 1
    command -v ip >/dev/null || return 1
    local probe="trc-probe-$$"
    ip netns add "$probe" 2>/dev/null || return 1
    ip netns del "$probe" 2>/dev/null || true
}

# Picks the first free cluster index and creates the namespaces, the veth pairs and the stores'
# address, under a lock (two `up`s at once get different indexes).
net_setup() {
    mkdir -p "$(dirname "$NET_LOCK")"
    exec 9>"$NET_LOCK"
    flock 9
    local k n used
    used=$(ip netns list 2>/dev/null | awk '{print $1}'; ip -o -4 addr show dev lo | awk '{print $4}')
    NET_INDEX=""
    for k in $(seq 0 63); do
        if ! grep -q -e "^trc$k-" -e "^10\.201\.$k\.1/" <<<"$used"; then NET_INDEX=$k; break; fi
    done
    [[ -n "$NET_INDEX" ]] || { flock -u 9; die "no free cluster index (64 clusters' namespaces exist: ip netns list)"; }
    k=$NET_INDEX
    SVC_ADDR="10.201.$k.1"
    # Saved at once, so that `down` removes whatever was created if the rest fails.
    save_state
    ip addr add "$SVC_ADDR/32" dev lo
    for n in $(seq 1 "$NODES"); do
        node_ns[n]="trc$k-core$n"
        node_if[n]="trc${k}n$n"
        node_hif[n]="trc${k}n${n}h"
        node_host_addr[n]="10.201.$k.$((4 * n + 1))"
        node_addr[n]="10.201.$k.$((4 * n + 2))"
        save_state
        ip netns add "${node_ns[n]}"
        ip link add "${node_hif[n]}" type veth peer name "${node_if[n]}"
        ip link set "${node_if[n]}" netns "${node_ns[n]}"
        ip addr add "${node_host_addr[n]}/30" dev "${node_hif[n]}"
        ip link set "${node_hif[n]}" up
        ip -n "${node_ns[n]}" link set lo up
        ip -n "${node_ns[n]}" addr add "${node_addr[n]}/30" dev "${node_if[n]}"
        ip -n "${node_ns[n]}" link set "${node_if[n]}" up
        ip -n "${node_ns[n]}" route add default via "${node_host_addr[n]}"
    done
    flock -u 9
}

net_teardown() {
    [[ "${NET_MODE:-}" == netns ]] || return 0
    local n
    for n in $(seq 1 "$NODES"); do
        [[ -n "${node_ns[n]:-}" ]] || continue
        ip netns del "${node_ns[n]}" 2>/dev/null || true
        ip link del "${node_hif[n]}" 2>/dev/null || true
    done
    if [[ -n "${SVC_ADDR:-}" ]]; then ip addr del "$SVC_ADDR/32" dev lo 2>/dev/null || true; fi
}

node_is_cut() { [[ -f "$STATE/core$1/cut" ]]; }

# --- processes --------------------------------------------------------------------------------

# Every listener flag the binary knows but `keep`, each with `off`.
listeners_off() { # keep...
    local help f out=()
    help=$("$BIN" --help)
    for f in admin kafka kafka-tls mqtt mqtt-ws mqtt-tls mqtt-wss amqp amqp-tls sqs rocketmq namesrv; do
        grep -q -- "--$f-listen " <<<"$help" || continue
        [[ " $* " == *" --$f-listen "* ]] && continue
        out+=("--$f-listen" off)
    done
    echo "${out[@]}"
}

# Starts node N in the background (in its namespace). A wrapper shell records its pid in
# coreN/pid and, when it ends, its exit code in coreN/rc. stdout (its `listening` lines and
# `ready`) goes to coreN/stdout, rewritten at each start; its log (stderr) is appended to
# coreN/log, each start after a `=== ... start:` line whose byte offset is in coreN/log.mark.
node_start() { # N
    local n="$1" d="$STATE/core$1"
    mkdir -p "$d/data"
    rm -f "$d/pid" "$d/rc" "$d/cut"
    local off
    read -r -a off <<<"$(listeners_off --admin-listen)"
    local cmd=("$BIN" core --config "$STATE/cluster.toml" --data-dir "$d/data"
        --cluster-node "core$n" --core-token-file "$STATE/token"
        --core-listen "${node_addr[n]}:${core_port[n]}" --admin-listen "${node_addr[n]}:${admin_port[n]}"
        "${off[@]}")
    if [[ "$NET_MODE" == netns ]]; then cmd=(ip netns exec "${node_ns[n]}" "${cmd[@]}"); fi
    touch "$d/log"
    stat -c %s "$d/log" > "$d/log.mark"
    printf '=== %s start: %s\n' "$(date -u +%FT%T.%3NZ)" "${cmd[*]}" >> "$d/log"
    # shellcheck disable=SC2016
    TRIBUTARY_LOG="${TRIBUTARY_LOG:-info}" setsid nohup bash -c '
        d="$1"; shift
        "$@" >"$d/stdout" 2>>"$d/log" </dev/null &
        echo $! >"$d/pid.tmp" && mv "$d/pid.tmp" "$d/pid"
        wait $!
        echo $? >"$d/rc"' wrapper "$d" "${cmd[@]}" >/dev/null 2>&1 </dev/null &
    local deadline=$((SECONDS + 10))
    until [[ -s "$d/pid" ]]; do
        ((SECONDS < deadline)) || die "core$n: no pid after 10 s"
        sleep 0.05
    done
}

# The log of node N's current run.
node_log_since_start() { # N
    local d="$STATE/core$1"
    tail -c +$(($(cat "$d/log.mark" 2>/dev/null || echo 0) + 1)) "$d/log" 2>/dev/null
}

# Waits until node N serves (`ready`) or, with `any`, serves or stands by (its log says
# "standby" or "standing by"). Fails, with its log, when it exits first or after `secs`.
node_wait() { # N ready|any secs
    local n="$1" want="$2" d="$STATE/core$1" deadline=$((SECONDS + $3))
    while true; do
        if grep -qx ready "$d/stdout" 2>/dev/null; then return 0; fi
        if [[ "$want" == any ]] && node_log_since_start "$n" | grep -qiE "standby|standing by"; then return 0; fi
        if ! node_alive "$n"; then
            echo "cluster.sh: core$n exited (code $(cat "$d/rc" 2>/dev/null || echo '?')) before it was $want; its log:" >&2
            node_log_since_start "$n" | tail -n 30 >&2
            return 1
        fi
        if ((SECONDS > deadline)); then
            echo "cluster.sh: core$n not $want after $3 s; its log:" >&2
            node_log_since_start "$n" | tail -n 30 >&2
            return 1
        fi
        sleep 0.1
    done
}

# The gateways: one of each protocol, in front of all three nodes; with --kafka-per-node also
# kafka-1..kafka-N, one Kafka gateway per node. Each has its state in gateway-NAME.
gateway_names() {
    local n
    echo "${PROTOCOLS[@]}"
    if [[ "${KAFKA_PER_NODE:-0}" == 1 ]]; then
        for n in $(seq 1 "$NODES"); do echo "kafka-$n"; done
    fi
}

# A gateway's `listening` lines, named as `up` prints them (kafka-N for node N's Kafka gateway,
# whose own line says `kafka`).
gateway_listening() { # name
    local name="$1"
    grep '^listening ' "$STATE/gateway-$name/stdout" 2>/dev/null \
        | sed "s/^listening ${name%%-*} /listening $name /"
}

gateway_start() { # protocol | kafka-N
    local name="$1" p="${1%%-*}" d="$STATE/gateway-$1" keep=() fleet=() core="$CORE_URLS"
    mkdir -p "$d"
    if [[ "$name" == kafka-* ]]; then
        # Node N's Kafka broker: broker id N, beside coreN, which it asks first.
        local n="${name#kafka-}" m urls=()
        urls=("http://${node_addr[n]}:${core_port[n]}")
        for m in $(seq 1 "$NODES"); do
            ((m == n)) || urls+=("http://${node_addr[m]}:${core_port[m]}")
        done
        core=$(IFS=,; echo "${urls[*]}")
        fleet=(--kafka-broker-id "$n" --kafka-broker-node "core$n")
    fi
    case "$p" in
        kafka) keep=(--kafka-listen 127.0.0.1:0) ;;
        mqtt) keep=(--mqtt-listen 127.0.0.1:0) ;;
        amqp) keep=(--amqp-listen 127.0.0.1:0) ;;
        sqs) keep=(--sqs-listen 127.0.0.1:0) ;;
        rocketmq) keep=(--rocketmq-listen 127.0.0.1:0 --namesrv-listen 127.0.0.1:0) ;;
    esac
    local off
    read -r -a off <<<"$(listeners_off "${keep[@]}")"
    local cmd=("$BIN" gateway "$p" --core "$core" --core-token-file "$STATE/token" "${off[@]}" "${keep[@]}"
        "${fleet[@]}")
    printf '=== %s start: %s\n' "$(date -u +%FT%T.%3NZ)" "${cmd[*]}" >> "$d/log"
    TRIBUTARY_LOG="${TRIBUTARY_LOG:-info}" setsid nohup "${cmd[@]}" >"$d/stdout" 2>>"$d/log" </dev/null &
    echo $! > "$d/pid"
}

gateway_wait() { # name secs
    local p="$1" d="$STATE/gateway-$1" deadline=$((SECONDS + $2)) pid
    pid=$(pid_of "$d")
    until grep -qx ready "$d/stdout" 2>/dev/null; do
        if ! alive "$pid"; then
            echo "cluster.sh: gateway $p exited before ready; its log:" >&2
            tail -n 30 "$d/log" >&2
            return 1
        fi
        if ((SECONDS > deadline)); then
            echo "cluster.sh: gateway $p not ready after $2 s; its log:" >&2
            tail -n 30 "$d/log" >&2
            return 1
        fi
        sleep 0.1
    done
}

# SIGTERM, then SIGKILL after `secs`.
stop_pid() { # pid secs
    local pid="$1" deadline=$((SECONDS + $2))
    kill "$pid" 2>/dev/null || return 0
    while alive "$pid"; do
        if ((SECONDS > deadline)); then
            kill -9 "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    while alive "$pid"; do sleep 0.05; done
}

# --- commands ---------------------------------------------------------------------------------

cmd_up() {
    META="${TRIBUTARY_CLUSTER_META:-etcd}"
    local shards=0 scheme=namespace kafka_per_node=0
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --kafka-per-node) kafka_per_node=1; shift ;;
            --scheme) scheme="${2:-}"; shift 2 ;;
            --scheme=*) scheme="${1#--scheme=}"; shift ;;
            --meta) META="${2:-}"; shift 2 ;;
            --meta=*) META="${1#--meta=}"; shift ;;
            --shards) shards="${2:-}"; shift 2 ;;
            --shards=*) shards="${1#--shards=}"; shift ;;
            *) die "up: unknown argument $1" ;;
        esac
    done
    [[ "$META" == etcd || "$META" == postgres ]] || die "--meta must be etcd or postgres, not '$META'"
    [[ "$shards" =~ ^[0-9]+$ ]] && ((shards <= 4096)) || die "--shards must be 0 to 4096, not '$shards'"
    [[ "$scheme" == namespace || "$scheme" == stream ]] || die "--scheme must be namespace or stream, not '$scheme'"
    [[ "$scheme" == namespace ]] || ((shards > 0)) || die "--scheme $scheme places units on shards: give --shards N"
    ((kafka_per_node == 0 || shards > 0)) \
        || die "--kafka-per-node puts a Kafka broker beside each node serving shards: give --shards N"
    BIN=$(find_bin)
    grep -q -- --cluster-node <<<"$("$BIN" core --help)" \
        || die "$BIN has no --cluster-node (a build without cluster mode)"
    if ((kafka_per_node)); then
        grep -q -- --kafka-broker-node <<<"$("$BIN" gateway kafka --help)" \
            || die "$BIN has no --kafka-broker-node (a build from before Kafka leaders followed the shard owners)"
    fi
    if [[ -f "$(state_file)" ]]; then
        load_state
        local n p
        for n in $(seq 1 "$NODES"); do
            if node_alive "$n"; then die "a cluster runs in $STATE (core$n, pid $(pid_of "$STATE/core$n")); run: scripts/cluster.sh down"; fi
        done
        for p in $(gateway_names); do
            pid=$(pid_of "$STATE/gateway-$p") && alive "$pid" && die "a cluster runs in $STATE (gateway $p); run: scripts/cluster.sh down"
        done
        # What a killed `up` or test left: stores, namespaces.
        cmd_down >/dev/null 2>&1 || true
    fi
    BIN=$(find_bin)
    if [[ -d "$STATE" && ! -f "$STATE/token" && -n "$(ls -A "$STATE")" ]]; then
        die "$STATE is not empty and not a cluster's state dir: set TRIBUTARY_CLUSTER_DIR"
    fi
    rm -rf "$STATE"
    mkdir -p "$STATE"
    chmod 755 "$STATE"   # the postgres user traverses it to its data directory
    SHARDS="$shards"
    KAFKA_PER_NODE="$kafka_per_node"
    node_addr=() node_host_addr=() node_ns=() node_if=() node_hif=() core_port=() admin_port=()
    PG_PID="" PG_DIR="" PG_BIN="" PG_PORT="" NET_INDEX="" SVC_ADDR="127.0.0.1" CORE_URLS=""
    STORES_DIR="$STATE/stores"

    case "${TRIBUTARY_CLUSTER_NETNS:-auto}" in
        off|0|no|false) NET_MODE=loopback ;;
        on|1|yes|true) netns_usable || die "TRIBUTARY_CLUSTER_NETNS=on but 'ip netns add' is not possible here (root needed)"; NET_MODE=netns ;;
        auto) if netns_usable; then NET_MODE=netns; else NET_MODE=loopback; fi ;;
        *) die "TRIBUTARY_CLUSTER_NETNS must be auto, on or off" ;;
    esac
    save_state
    UP_DONE=0
    # shellcheck disable=SC2154
    trap 'if [[ $UP_DONE != 1 ]]; then echo "cluster.sh: up failed; stopping what started (logs stay in $STATE)" >&2; cmd_down >/dev/null 2>&1 || true; fi' EXIT

    local n p
    if [[ "$NET_MODE" == netns ]]; then
        net_setup
        note "network namespaces ${node_ns[*]}; stores on $SVC_ADDR"
    else
        for n in $(seq 1 "$NODES"); do node_addr[n]=127.0.0.1; done
        note "no network namespaces (TRIBUTARY_CLUSTER_NETNS=${TRIBUTARY_CLUSTER_NETNS:-auto}, uid $(id -u)): everything on 127.0.0.1; cut-core is SIGSTOP"
    fi

    # The core token: nodes require it, gateways send it.
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$STATE/token")

    # The stores, on the address the namespaces reach.
    stores_init "$STORES_DIR"
    local meta_url
    if [[ "$META" == etcd ]]; then
        stores_install etcd s3 >&2
        STORES_HOST="$SVC_ADDR" etcd_start >&2
        meta_url="$TRIBUTARY_TEST_ETCD_URL"
    else
        stores_install postgres s3 >&2
        STORES_HOST="$SVC_ADDR" STORES_CLIENTS="10.201.${NET_INDEX:-0}.0/24" postgres_start >&2
        meta_url="$TRIBUTARY_TEST_POSTGRES_URL"
        note "PostgreSQL $(basename "$(dirname "$PG_BIN")") on $SVC_ADDR:$PG_PORT (pid $PG_PID)"
    fi
    save_state
    STORES_HOST="$SVC_ADDR" s3_start >&2

    (umask 077 && cat > "$STATE/cluster.toml" <<TOML
# scripts/cluster.sh: what every core node of this cluster shares.
storage = "opendal"
opendal_ack = "shared"
meta = "$META"
meta_url = "$meta_url"
meta_namespace = "tributary_cluster"
cluster_shards = $SHARDS
cluster_shard_scheme = "$scheme"

[opendal]
scheme = "s3"
bucket = "$TRIBUTARY_TEST_S3_BUCKET"
endpoint = "$TRIBUTARY_TEST_S3_ENDPOINT"
region = "us-east-1"
access_key_id = "$TRIBUTARY_TEST_S3_ACCESS_KEY"
secret_access_key = "$TRIBUTARY_TEST_S3_SECRET_KEY"
disable_config_load = "true"
root = "/tributary-cluster"
TOML
)
    # Fixed ports per node: a standby binds its listeners only when it takes over.
    local urls=()
    for n in $(seq 1 "$NODES"); do
        core_port[n]=$(free_port)
        admin_port[n]=$(free_port)
        urls+=("http://${node_addr[n]}:${core_port[n]}")
    done
    CORE_URLS=$(IFS=,; echo "${urls[*]}")
    save_state

    if ((SHARDS > 0)); then
        # Every node serves at once, each its share.
        for n in $(seq 1 "$NODES"); do node_start "$n"; done
        for n in $(seq 1 "$NODES"); do node_wait "$n" ready 90; done
        # Ready once the shards have spread (every shard served, each node its quota), not
        # while they still move: a client's first call then meets a node that serves it.
        local deadline=$((SECONDS + 90)) served
        until shards_settled; do
            if ((SECONDS > deadline)); then
                for n in $(seq 1 "$NODES"); do served+=" core$n=[$(node_shards "$n")]"; done
                die "the $SHARDS shards did not spread over the nodes within 90 s:$served"
            fi
            sleep 0.2
        done
        note "core1..core$NODES serve $SHARDS shards between them"
    else
        # core1 first, so that it is the one serving; then the standbys.
        node_start 1
        node_wait 1 ready 90
        note "core1 serves on ${node_addr[1]}:${core_port[1]} (admin ${node_addr[1]}:${admin_port[1]})"
        for n in $(seq 2 "$NODES"); do node_start "$n"; done
        for n in $(seq 2 "$NODES"); do
            node_wait "$n" any 60
            if grep -qx ready "$STATE/core$n/stdout"; then die "core$n serves too, beside core1"; fi
        done
        note "core2..core$NODES stand by"
    fi

    for p in $(gateway_names); do gateway_start "$p"; done
    for p in $(gateway_names); do gateway_wait "$p" 60; done
    : > "$STATE/listeners"
    for p in $(gateway_names); do
        gateway_listening "$p" >> "$STATE/listeners" || true
    done
    UP_DONE=1
    cat "$STATE/listeners"
    echo ready
}

cmd_status() {
    load_state
    local n d pid role extra code
    for n in $(seq 1 "$NODES"); do
        d="$STATE/core$n"
        extra="core=${node_addr[n]}:${core_port[n]} admin=${node_addr[n]}:${admin_port[n]}"
        [[ "$NET_MODE" == netns ]] && extra+=" netns=${node_ns[n]}"
        if ! pid=$(pid_of "$d"); then
            role="never-started"
        elif ! alive "$pid"; then
            role="exited rc=$(cat "$d/rc" 2>/dev/null || echo '?')"
            node_is_cut "$n" && role+=" (cut)"
        elif node_is_cut "$n"; then
            role="cut"
        else
            code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 \
                "http://${node_addr[n]}:${admin_port[n]}/healthz" 2>/dev/null || true)
            if [[ "$code" == 200 ]] && ((${SHARDS:-0} > 0)); then
                role="serving-shards=$(node_shards "$n" | tr ' ' ',')"
            elif [[ "$code" == 200 ]]; then
                role=active
            elif grep -qx ready "$d/stdout" 2>/dev/null; then
                role="unhealthy(http ${code:-none})"
            elif grep -q '^listening ' "$d/stdout" 2>/dev/null; then
                role=starting
            else
                role=standby
            fi
        fi
        echo "core$n $role pid=${pid:-none} $extra"
    done
    local p
    for p in $(gateway_names); do
        d="$STATE/gateway-$p"
        if pid=$(pid_of "$d") && alive "$pid"; then role=running; else role=exited; fi
        echo "gateway $p $role pid=${pid:-none} $(gateway_listening "$p" | awk '{printf "%s=%s ", $2, $3}')"
    done
}

# Node N's view of the shards (GET /api/v1/cluster/shards), asking where NAMESPACE is.
node_shard_view() { # N [NAMESPACE]
    local n="$1" q=""
    [[ -n "${2:-}" ]] && q="?namespace=$2"
    curl -sf --max-time 1 -H "Authorization: Bearer $(cat "$STATE/token")" \
        "http://${node_addr[n]}:${admin_port[n]}/api/v1/cluster/shards$q" 2>/dev/null
}

# The shards node N serves, space-separated.
node_shards() { # N
    node_shard_view "$1" | python3 -c 'import json, sys; print(" ".join(str(s["shard"]) for s in json.load(sys.stdin)["served"]))' 2>/dev/null
}

# Every shard served by one node and each node serving its quota (the shard count split as
# evenly as it goes): nothing is about to move.
shards_settled() {
    local n views=()
    for n in $(seq 1 "$NODES"); do views+=("$(node_shards "$n")"); done
    python3 - "$SHARDS" "${views[@]}" <<'PY'
import sys
shards, views = int(sys.argv[1]), [v.split() for v in sys.argv[2:]]
served = sorted(int(s) for v in views for s in v)
low = shards // len(views)
sys.exit(0 if served == list(range(shards)) and all(low <= len(v) <= low + 1 for v in views) else 1)
PY
}

cmd_owner() { # NAMESPACE
    load_state
    ((${SHARDS:-0} > 0)) || die "owner: this cluster runs one active node (up --shards N spreads shards)"
    [[ -n "${1:-}" ]] || die "owner: name a namespace"
    local n found=()
    for n in $(seq 1 "$NODES"); do
        node_alive "$n" && ! node_is_cut "$n" || continue
        if node_shard_view "$n" "$1" | grep -q '"served_here":true'; then found+=("$n"); fi
    done
    # None while the shard moves; two would be a broken lease, which the caller reports.
    [[ ${#found[@]} -gt 0 ]] || die "owner: no node serves namespace $1 now"
    echo "${found[*]}"
}

cmd_kill_core() { # N
    load_state
    check_node_arg "${1:-}"
    local n="$1" pid deadline=$((SECONDS + 10))
    node_alive "$n" || die "core$n is not running"
    pid=$(pid_of "$STATE/core$n")
    kill -9 "$pid"
    until [[ -f "$STATE/core$n/rc" ]]; do
        ((SECONDS < deadline)) || die "core$n (pid $pid) still there 10 s after kill -9"
        sleep 0.05
    done
    echo "core$n killed (kill -9, pid $pid)"
}

cmd_stop_core() { # N
    load_state
    check_node_arg "${1:-}"
    local n="$1" pid
    node_alive "$n" || die "core$n is not running"
    pid=$(pid_of "$STATE/core$n")
    if [[ "$NET_MODE" == loopback ]] && node_is_cut "$n"; then kill -CONT "$pid" 2>/dev/null || true; fi
    stop_pid "$pid" 30
    local deadline=$((SECONDS + 5))
    until [[ -f "$STATE/core$n/rc" ]] || ((SECONDS > deadline)); do sleep 0.05; done
    echo "core$n stopped (SIGTERM, pid $pid, exit code $(cat "$STATE/core$n/rc" 2>/dev/null || echo '?'))"
}

cmd_cut_core() { # N
    load_state
    check_node_arg "${1:-}"
    local n="$1"
    node_is_cut "$n" && die "core$n is cut already"
    if [[ "$NET_MODE" == netns ]]; then
        ip -n "${node_ns[n]}" link set "${node_if[n]}" down
    else
        node_alive "$n" || die "core$n is not running (without namespaces a cut is SIGSTOP of the process)"
        kill -STOP "$(pid_of "$STATE/core$n")"
    fi
    date -u +%FT%T.%3NZ > "$STATE/core$n/cut"
    echo "core$n cut ($([[ "$NET_MODE" == netns ]] && echo "link ${node_if[n]} down in ${node_ns[n]}" || echo SIGSTOP))"
}

cmd_heal_core() { # N
    load_state
    check_node_arg "${1:-}"
    local n="$1"
    node_is_cut "$n" || die "core$n is not cut"
    if [[ "$NET_MODE" == netns ]]; then
        ip -n "${node_ns[n]}" link set "${node_if[n]}" up
        # The link going down took the default route with it.
        ip -n "${node_ns[n]}" route replace default via "${node_host_addr[n]}"
    else
        local pid
        if pid=$(pid_of "$STATE/core$n"); then kill -CONT "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$STATE/core$n/cut"
    echo "core$n healed"
}

cmd_start_core() { # N
    load_state
    check_node_arg "${1:-}"
    local n="$1"
    node_alive "$n" && die "core$n is running (pid $(pid_of "$STATE/core$n"))"
    node_is_cut "$n" && die "core$n is cut: heal-core $n first"
    node_start "$n"
    if ((${SHARDS:-0} > 0)); then
        node_wait "$n" ready 90
        echo "core$n started: serving shards"
        return
    fi
    node_wait "$n" any 90
    if grep -qx ready "$STATE/core$n/stdout"; then
        echo "core$n started: serving"
    else
        echo "core$n started: standby"
    fi
}

cmd_down() {
    if [[ ! -f "$(state_file)" ]]; then
        echo "no cluster in $STATE"
        return 0
    fi
    load_state
    local n p pid
    for p in $(gateway_names); do
        if pid=$(pid_of "$STATE/gateway-$p"); then stop_pid "$pid" 10; fi
    done
    # Standbys first, then the serving node (no takeover on the way down); a cut node as it is.
    local order=()
    for n in $(seq 1 "$NODES"); do
        if grep -qx ready "$STATE/core$n/stdout" 2>/dev/null; then order+=("$n"); else order=("$n" "${order[@]}"); fi
    done
    for n in "${order[@]}"; do
        pid=$(pid_of "$STATE/core$n") || continue
        if [[ "$NET_MODE" == loopback ]] && node_is_cut "$n"; then kill -CONT "$pid" 2>/dev/null || true; fi
        stop_pid "$pid" 10
    done
    STORES_DIR="${STORES_DIR:-$STATE/stores}"
    etcd_stop
    s3_stop
    if [[ -n "${PG_PID:-}" ]]; then postgres_stop; fi
    net_teardown
    rm -f "$(state_file)"
    echo "cluster in $STATE stopped (logs kept there)"
}

command_name="${1:-}"
[[ $# -gt 0 ]] && shift
case "$command_name" in
    up) cmd_up "$@" ;;
    status) cmd_status ;;
    owner) cmd_owner "$@" ;;
    kill-core) cmd_kill_core "$@" ;;
    stop-core) cmd_stop_core "$@" ;;
    cut-core) cmd_cut_core "$@" ;;
    heal-core) cmd_heal_core "$@" ;;
    start-core) cmd_start_core "$@" ;;
    down) cmd_down ;;
    *) usage ;;
esac
