# etcd (Debian etcd-server, 3.4) for the etcd metadata store: one single-member cluster.
# Defines etcd_install, etcd_start, etcd_stop (see scripts/stores.sh).
#
# etcd_start leaves $STORES_DIR/etcd/start.sh (starts the server again on the same port and data
# dir) and $STORES_DIR/etcd/pid, and exports TRIBUTARY_TEST_ETCD_CTL=$STORES_DIR/etcd: the
# crash test kills the server with SIGKILL and starts it again through them.

etcd_install() {
    [[ -x /usr/bin/etcd ]] && return 0
    stores_apt etcd-server || return 1
    # The package's service is called etcd, not etcd-server (which stores_apt stops): the tests
    # start their own instance, so a system one is not left running on 2379.
    as_root service etcd stop >/dev/null 2>&1 || true
}

etcd_start() {
    etcd_stop
    local d="$STORES_DIR/etcd" port peer host="${STORES_HOST:-127.0.0.1}"
    rm -rf "$d"
    mkdir -p "$d/data"
    port=$(free_port)
    peer=$(free_port)
    # --max-txn-ops and --max-request-bytes: the core writes some metadata changes as one txn
    # whose op count grows with the data (a group's committed offsets, a batch of timers); etcd's
    # defaults (128 ops, 1.5 MiB) would refuse those, and a refused txn is never split.
    # 10 MiB is the largest request etcd recommends.
    cat > "$d/start.sh" <<SH
#!/usr/bin/env bash
cd "$d"
nohup /usr/bin/etcd --name tributary-test --data-dir "$d/data" \\
    --listen-client-urls http://$host:$port --advertise-client-urls http://$host:$port \\
    --listen-peer-urls http://127.0.0.1:$peer --initial-advertise-peer-urls http://127.0.0.1:$peer \\
    --initial-cluster tributary-test=http://127.0.0.1:$peer \\
    --max-txn-ops 65536 --max-request-bytes 10485760 \\
    --logger zap --log-outputs stderr >> "$d/etcd.log" 2>&1 < /dev/null &
echo \$! > "$d/pid"
SH
    chmod +x "$d/start.sh"
    "$d/start.sh"
    if ! wait_port "$host" "$port" 30; then
        tail -20 "$d/etcd.log" >&2
        return 1
    fi
    stores_started etcd
    export TRIBUTARY_TEST_ETCD_URL="http://$host:$port"
    export TRIBUTARY_TEST_ETCD_CTL="$d"
    echo "== etcd $(/usr/bin/etcd --version | head -1 | awk '{print $3}') on $TRIBUTARY_TEST_ETCD_URL (pid $(cat "$d/pid"))"
}

etcd_stop() {
    stores_kill_pidfile "$STORES_DIR/etcd/pid"
}

# A three-member cluster for the failover test: exports TRIBUTARY_TEST_ETCD_CLUSTER_URLS (the
# members' client URLs, comma-separated) and TRIBUTARY_TEST_ETCD_CLUSTER_CTL (the directory with
# each member's pid in m0.pid, m1.pid, m2.pid).
etcd_cluster_start() {
    etcd_cluster_stop
    local d="$STORES_DIR/etcd-cluster" i init="" urls=""
    local -a client peer
    rm -rf "$d"
    mkdir -p "$d"
    for i in 0 1 2; do
        client[i]=$(free_port)
        peer[i]=$(free_port)
        init+="${init:+,}m$i=http://127.0.0.1:${peer[i]}"
        urls+="${urls:+,}http://127.0.0.1:${client[i]}"
    done
    # Each member from a subshell: not a job of this shell, so its kill -9 by the test is not
    # reported here.
    for i in 0 1 2; do
        (nohup /usr/bin/etcd --name "m$i" --data-dir "$d/m$i" \
            --listen-client-urls "http://127.0.0.1:${client[i]}" \
            --advertise-client-urls "http://127.0.0.1:${client[i]}" \
            --listen-peer-urls "http://127.0.0.1:${peer[i]}" \
            --initial-advertise-peer-urls "http://127.0.0.1:${peer[i]}" \
            --initial-cluster "$init" --initial-cluster-state new \
            --max-txn-ops 65536 --max-request-bytes 10485760 \
            --logger zap --log-outputs stderr >> "$d/m$i.log" 2>&1 < /dev/null &
            echo $! > "$d/m$i.pid")
    done
    for i in 0 1 2; do
        if ! wait_port 127.0.0.1 "${client[i]}" 30; then
            tail -20 "$d/m$i.log" >&2
            return 1
        fi
    done
    stores_started etcd_cluster
    export TRIBUTARY_TEST_ETCD_CLUSTER_URLS="$urls"
    export TRIBUTARY_TEST_ETCD_CLUSTER_CTL="$d"
    echo "== etcd cluster of three on $urls"
}

etcd_cluster_stop() {
    local i
    for i in 0 1 2; do stores_kill_pidfile "$STORES_DIR/etcd-cluster/m$i.pid"; done
}
