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

# ---

all=(etcd redis)
stores=("$@")
[[ ${#stores[@]} -eq 0 ]] && stores=("${all[@]}")
for s in "${stores[@]}"; do
    declare -F "run_$s" >/dev/null || { echo "test-stores.sh: unknown store $s (known: ${all[*]})" >&2; exit 2; }
    echo "== $s"
    "run_$s"
done
echo "== stores ok: ${stores[*]}"
