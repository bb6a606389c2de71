#!/usr/bin/env bash
# The storage adapters against real servers: installs what is missing (Debian packages), starts
# fresh instances on free loopback ports under a scratch directory, runs the adapters' tests
# with TRIBUTARY_REQUIRE_STORES=1 (a missing server fails them instead of skipping), and stops
# everything on exit. Works on a fresh Debian machine as root (or with sudo for apt-get).
#
#   scripts/test-stores.sh          # every store below
#   scripts/test-stores.sh sql      # only PostgreSQL and MariaDB
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stores.sh

# --- SQL metadata stores: PostgreSQL and MariaDB (storage-adapters/src/sql_meta.rs) --------

# A crash check for one store (postgres | mariadb): writers acknowledge create-if-absent txns
# into an ack file until the server is killed with SIGKILL; the server restarts on the same
# data directory, the writing process's store must work again by itself, and every
# acknowledged key must be there.
sql_stores_crash_check() { # store test-module
    local store="$1" module="$2" acks="$STORES_DIR/$1.acks" pid
    echo "== $store: kill -9 under writes, restart, read back"
    : > "$acks"
    # In a process group of its own (cargo and the test binary), so cleanup can end both.
    TRIBUTARY_TEST_PHASE=write TRIBUTARY_TEST_ACK_FILE="$acks" setsid \
        cargo test -q -p tributary-storage --locked --test sql_meta -- --exact "$module::crash_phase" --nocapture &
    pid=$!
    sql_stores_writer=$pid
    local deadline=$((SECONDS + 120))
    while (($(wc -l < "$acks") < 300)) && kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.2
    done
    "${store}_kill"
    echo "$store: $(wc -l < "$acks") writes acknowledged before the kill"
    # The write phase keeps its store and waits for the server to come back.
    sleep 2
    "${store}_restart"
    wait "$pid" || { echo "$store: the write phase failed" >&2; return 1; }
    sql_stores_writer=""
    TRIBUTARY_TEST_PHASE=verify TRIBUTARY_TEST_ACK_FILE="$acks" \
        cargo test -q -p tributary-storage --locked --test sql_meta -- --exact "$module::crash_phase" --nocapture
}

sql_stores_test() {
    stores_install postgres mariadb
    postgres_start
    mariadb_start
    export TRIBUTARY_REQUIRE_STORES=1
    echo "== PostgreSQL and MariaDB metadata stores"
    cargo test -p tributary-storage --locked --test sql_meta
    sql_stores_crash_check postgres postgres
    sql_stores_crash_check mariadb mysql
}

# A write phase still running when the script stops (it would wait for its server).
sql_stores_writer=""
sql_stores_cleanup() {
    if [[ -n "$sql_stores_writer" ]]; then kill -- "-$sql_stores_writer" 2>/dev/null || true; fi
}

# --- main -----------------------------------------------------------------------------------

stores_workdir=$(mktemp -d /tmp/tributary-stores.XXXXXX)
stores_init "$stores_workdir"
trap 'sql_stores_cleanup; stores_stop; rm -rf "$stores_workdir"' EXIT

case "${1:-all}" in
    sql | all) sql_stores_test ;;
    *) echo "usage: $0 [all|sql]" >&2; exit 2 ;;
esac
