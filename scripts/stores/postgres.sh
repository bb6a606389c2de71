# PostgreSQL for the PostgreSQL metadata store's tests. Sourced by scripts/stores.sh.
#
#   postgres_install   # Debian's postgresql when no server binaries are installed
#   postgres_start     # a fresh cluster under $STORES_DIR/postgres on a free loopback port;
#                      # exports TRIBUTARY_TEST_POSTGRES_URL (a user with a password, its database)
#   postgres_kill      # kill -9 of the server and its backends (crash tests)
#   postgres_restart   # starts the server again on the same data directory and port
#   postgres_stop
#
# PostgreSQL refuses to run as root: as root the cluster is owned by and run as the `postgres`
# system user (Debian's package creates it). fsync stays on (the durable configuration).

postgres_bin_dir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [[ -n "$d" && -x "$d/postgres" ]] && echo "$d"
}

postgres_install() {
    postgres_bin_dir >/dev/null || stores_apt postgresql
    postgres_bin_dir >/dev/null || { echo "postgres_install: no server binaries after install" >&2; return 1; }
}

# Runs a command as the cluster's owner, in its directory.
postgres_as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        (cd "$PG_DIR" && exec setpriv --reuid=postgres --regid=postgres --init-groups "$@")
    else
        (cd "$PG_DIR" && exec "$@")
    fi
}

postgres_start() {
    postgres_stop
    local bin d
    bin=$(postgres_bin_dir) || { echo "postgres_start: PostgreSQL is not installed" >&2; return 1; }
    d="$STORES_DIR/postgres"
    rm -rf "$d"
    mkdir -p "$d"
    if [[ $(id -u) -eq 0 ]]; then
        # The postgres user must reach its directory: open the work dir for traversal only.
        chmod o+x "$STORES_DIR"
        chown postgres: "$d"
    fi
    PG_PORT=$(free_port)
    PG_BIN="$bin"
    PG_DIR="$d"
    PG_USER=tributary
    PG_PASSWORD="test-$RANDOM$RANDOM"
    postgres_as_owner mkdir -p "$d/data" "$d/socket"
    # Host connections need the password (the tests check that a wrong one is refused); the
    # socket, in a directory only the owner can enter, is trusted for the setup below.
    postgres_as_owner "$bin/initdb" -D "$d/data" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 --locale=C >"$d/initdb.log" 2>&1 \
        || { cat "$d/initdb.log" >&2; return 1; }
    local host="${STORES_HOST:-127.0.0.1}" listen=127.0.0.1
    if [[ "$host" != 127.0.0.1 ]]; then listen+=",$host"; fi
    # STORES_CLIENTS (a CIDR): host connections from there are let in too, with the password.
    if [[ -n "${STORES_CLIENTS:-}" ]]; then
        echo "host all all $STORES_CLIENTS scram-sha-256" >> "$d/data/pg_hba.conf"
    fi
    cat >> "$d/data/postgresql.conf" <<EOF
listen_addresses = '$listen'
port = $PG_PORT
unix_socket_directories = '$d/socket'
fsync = on
synchronous_commit = on
max_connections = 100
logging_collector = off
EOF
    postgres_launch || return 1
    postgres_as_owner "$bin/psql" -h "$d/socket" -p "$PG_PORT" -U postgres -d postgres -q \
        -v ON_ERROR_STOP=1 >"$d/setup.log" 2>&1 <<EOF || { cat "$d/setup.log" >&2; return 1; }
CREATE USER $PG_USER PASSWORD '$PG_PASSWORD';
CREATE DATABASE tributary OWNER $PG_USER;
EOF
    export TRIBUTARY_TEST_POSTGRES_URL="postgres://$PG_USER:$PG_PASSWORD@$host:$PG_PORT/tributary"
    stores_started postgres
}

# Starts the server on the existing cluster and waits until it accepts connections.
postgres_launch() {
    local as_owner=()
    [[ $(id -u) -eq 0 ]] && as_owner=(setpriv --reuid=postgres --regid=postgres --init-groups)
    # The subshell execs, so $! is the postmaster's pid.
    (cd "$PG_DIR" && exec "${as_owner[@]}" "$PG_BIN/postgres" -D "$PG_DIR/data") \
        >>"$PG_DIR/server.log" 2>&1 &
    PG_PID=$!
    local deadline=$((SECONDS + 60))
    until postgres_as_owner "$PG_BIN/pg_isready" -q -h "$PG_DIR/socket" -p "$PG_PORT"; do
        if ((SECONDS > deadline)) || ! kill -0 "$PG_PID" 2>/dev/null; then
            echo "postgres did not start; its log:" >&2
            tail -n 30 "$PG_DIR/server.log" >&2
            return 1
        fi
        sleep 0.2
    done
}

postgres_restart() { postgres_launch; }

# A crash: SIGKILL to the postmaster and every process it started, then wait for them to go.
postgres_kill() {
    [[ -n "${PG_PID:-}" ]] || return 0
    local pids
    pids="$PG_PID $(ps -o pid= --ppid "$PG_PID" | tr '\n' ' ')"
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null
    wait "$PG_PID" 2>/dev/null || true
    local p deadline=$((SECONDS + 20))
    for p in $pids; do
        while kill -0 "$p" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    done
    PG_PID=""
}

postgres_stop() {
    [[ -n "${PG_PID:-}" ]] || return 0
    # Fast shutdown: the postmaster's SIGINT.
    kill -INT "$PG_PID" 2>/dev/null
    local deadline=$((SECONDS + 30))
    while kill -0 "$PG_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -0 "$PG_PID" 2>/dev/null && postgres_kill
    wait "$PG_PID" 2>/dev/null || true
    PG_PID=""
}
