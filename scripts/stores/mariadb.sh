# MariaDB for the MySQL/MariaDB metadata store's tests. Sourced by scripts/stores.sh.
#
#   mariadb_install    # Debian's mariadb-server when mariadbd is missing
#   mariadb_start      # a fresh server under $STORES_DIR/mariadb on a free loopback port;
#                      # exports TRIBUTARY_TEST_MYSQL_URL (a user with a password, its database)
#   mariadb_kill       # kill -9 of the server (crash tests)
#   mariadb_restart    # starts the server again on the same data directory and port
#   mariadb_stop
#
# The server reads no option file (--no-defaults): every setting is on its command line. InnoDB
# flushes its log on every commit (innodb_flush_log_at_trx_commit=1, the durable default).
# max_allowed_packet keeps its 16 MiB default, so the tests see the adapter split large
# transactions into statements that fit.

mariadb_install() {
    command -v mariadbd >/dev/null || [[ -x /usr/sbin/mariadbd ]] || stores_apt mariadb-server
    [[ -x /usr/sbin/mariadbd ]] || command -v mariadbd >/dev/null \
        || { echo "mariadb_install: no mariadbd after install" >&2; return 1; }
}

mariadb_bin() { command -v mariadbd || echo /usr/sbin/mariadbd; }

mariadb_start() {
    mariadb_stop
    local d="$STORES_DIR/mariadb"
    rm -rf "$d"
    mkdir -p "$d/data"
    MY_DIR="$d"
    MY_PORT=$(free_port)
    MY_OS_USER=$(id -un)
    MY_PASSWORD="test-$RANDOM$RANDOM"
    # The OS user (root here) gets a socket-authenticated account for the setup below.
    mariadb-install-db --no-defaults --user="$MY_OS_USER" --datadir="$d/data" \
        --auth-root-authentication-method=socket --skip-test-db >"$d/install.log" 2>&1 \
        || { cat "$d/install.log" >&2; return 1; }
    mariadb_launch || return 1
    mariadb --no-defaults -S "$d/mysqld.sock" -u "$MY_OS_USER" >"$d/setup.log" 2>&1 <<EOF \
        || { cat "$d/setup.log" >&2; return 1; }
CREATE DATABASE tributary;
CREATE USER 'tributary'@'127.0.0.1' IDENTIFIED BY '$MY_PASSWORD';
GRANT ALL ON tributary.* TO 'tributary'@'127.0.0.1';
EOF
    export TRIBUTARY_TEST_MYSQL_URL="mysql://tributary:$MY_PASSWORD@127.0.0.1:$MY_PORT/tributary"
    stores_started mariadb
}

# Starts the server on the existing data directory and waits until it accepts connections.
mariadb_launch() {
    local d="$MY_DIR"
    "$(mariadb_bin)" --no-defaults --user="$MY_OS_USER" --datadir="$d/data" \
        --socket="$d/mysqld.sock" --pid-file="$d/mysqld.pid" --log-error="$d/server.log" \
        --port="$MY_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --innodb-flush-log-at-trx-commit=1 2>>"$d/server.log" &
    MY_PID=$!
    local deadline=$((SECONDS + 60))
    until mariadb-admin --no-defaults -S "$d/mysqld.sock" -u "$MY_OS_USER" ping >/dev/null 2>&1; do
        if ((SECONDS > deadline)) || ! kill -0 "$MY_PID" 2>/dev/null; then
            echo "mariadb did not start; its log:" >&2
            tail -n 30 "$d/server.log" >&2
            return 1
        fi
        sleep 0.2
    done
}

mariadb_restart() { mariadb_launch; }

mariadb_kill() {
    [[ -n "${MY_PID:-}" ]] || return 0
    kill -9 "$MY_PID" 2>/dev/null
    wait "$MY_PID" 2>/dev/null || true
    MY_PID=""
}

mariadb_stop() {
    [[ -n "${MY_PID:-}" ]] || return 0
    kill -TERM "$MY_PID" 2>/dev/null
    local deadline=$((SECONDS + 30))
    while kill -0 "$MY_PID" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
    kill -0 "$MY_PID" 2>/dev/null && mariadb_kill
    wait "$MY_PID" 2>/dev/null || true
    MY_PID=""
}
