#!/usr/bin/env bash
# The storage adapters' tests against real metadata servers, installed from Debian when missing
# and started on free loopback ports with their state under a temporary work dir:
#
#   scripts/test-stores.sh              # every store this script knows
#   scripts/test-stores.sh etcd redis   # some of them
#
# TRIBUTARY_REQUIRE_STORES=1 makes a test whose store URL is missing fail instead of skip, so a
# store that did not start cannot pass silently. Each store has its own run_<store> function;
# keep them separate so adapters can be added without touching each other's parts.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/stores.sh

work=$(mktemp -d "${TMPDIR:-/tmp}/tributary-stores.XXXXXX")
cleanup() {
    sql_stores_cleanup
    stores_stop
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
stores_init "$work"
export TRIBUTARY_REQUIRE_STORES=1

# --- etcd and Redis metadata stores (storage-adapters/src/{etcd,redis}_meta.rs) ---

run_etcd() {
    stores_install etcd
    etcd_start
    etcd_cluster_start
    cargo test -p tributary-storage --locked --test external_meta -- etcd --test-threads 1 --show-output
}

run_redis() {
    stores_install redis
    redis_start
    cargo test -p tributary-storage --locked --test external_meta -- redis --test-threads 1 --show-output
}

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

run_sql() {
    sql_stores_test
}

# ---

all=(etcd redis sql)
stores=("$@")
[[ ${#stores[@]} -eq 0 ]] && stores=("${all[@]}")
for s in "${stores[@]}"; do
    declare -F "run_$s" >/dev/null || { echo "test-stores.sh: unknown store $s (known: ${all[*]})" >&2; exit 2; }
    echo "== $s"
    "run_$s"
done
echo "== stores ok: ${stores[*]}"
