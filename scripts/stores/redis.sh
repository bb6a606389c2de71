# Redis (Debian redis-server, 7.0) for the Redis metadata store, in its durable configuration:
# the append-only file on and fsynced before every answer. Defines redis_install, redis_start,
# redis_stop (see scripts/stores.sh).
#
# Like etcd_start, redis_start leaves $STORES_DIR/redis/start.sh and pid and exports
# TRIBUTARY_TEST_REDIS_CTL for the crash test.

redis_install() {
    [[ -x /usr/bin/redis-server ]] || stores_apt redis-server
}

redis_start() {
    redis_stop
    local d="$STORES_DIR/redis" port
    rm -rf "$d"
    mkdir -p "$d/data"
    port=$(free_port)
    # appendfsync always: Redis fsyncs the AOF before answering, the only setting under which an
    # acknowledged txn survives a machine crash. --save "": no RDB snapshots, the AOF is the
    # persistence. The file is passed on the command line, so no system config is read.
    cat > "$d/start.sh" <<SH
#!/usr/bin/env bash
cd "$d"
nohup /usr/bin/redis-server --bind 127.0.0.1 --port $port --dir "$d/data" \\
    --appendonly yes --appendfsync always --save "" \\
    --daemonize no --logfile "$d/redis.log" >> "$d/redis.log" 2>&1 < /dev/null &
echo \$! > "$d/pid"
SH
    chmod +x "$d/start.sh"
    "$d/start.sh"
    if ! wait_port 127.0.0.1 "$port" 30; then
        tail -20 "$d/redis.log" >&2
        return 1
    fi
    stores_started redis
    export TRIBUTARY_TEST_REDIS_URL="redis://127.0.0.1:$port"
    export TRIBUTARY_TEST_REDIS_CTL="$d"
    echo "== redis $(/usr/bin/redis-server --version | awk '{print $3}' | cut -d= -f2) on $TRIBUTARY_TEST_REDIS_URL (pid $(cat "$d/pid"))"
}

redis_stop() {
    stores_kill_pidfile "$STORES_DIR/redis/pid"
}
