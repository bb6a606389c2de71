# External storage servers (etcd, PostgreSQL, MariaDB, Redis, an S3 endpoint) for the storage
# adapters' tests and the compat runs on them. Sourced, not run: `source scripts/stores.sh`, then
#
#   stores_init "$workdir"        # where data and logs go
#   stores_install etcd redis     # installs what is missing (Debian packages, PyPI into a venv)
#   etcd_start                    # each NAME_start starts one fresh instance on a free loopback
#                                 # port and exports TRIBUTARY_TEST_<NAME>_URL
#   stores_stop                   # stops everything started (also from a trap)
#
# Servers listen on 127.0.0.1 unless STORES_HOST names another local address (scripts/cluster.sh
# gives one that its network namespaces reach); STORES_CLIENTS (a CIDR) lets PostgreSQL take
# password logins from there too.
#
# Each store lives in scripts/stores/NAME.sh and defines NAME_install, NAME_start and
# NAME_stop. Every server keeps its state under the work dir and never touches a system-wide
# instance.

# free_port, wait_port and as_root.
source "$(dirname "${BASH_SOURCE[0]}")/brokers.sh"

STORES_STARTED=()

stores_init() { # workdir
    STORES_DIR="$1"
    mkdir -p "$STORES_DIR"
}

stores_install() { # store...
    local s
    for s in "$@"; do
        declare -F "${s}_install" >/dev/null || { echo "stores_install: unknown store $s" >&2; return 2; }
        "${s}_install" || return 1
    done
}

# Debian packages, installed without starting their system services.
stores_apt() { # package...
    [[ $# -eq 0 ]] && return 0
    echo "== installing $* from Debian"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq \
        --no-install-recommends "$@" >/dev/null
    local pkg
    for pkg in "$@"; do as_root service "$pkg" stop >/dev/null 2>&1 || true; done
}

stores_started() { STORES_STARTED+=("$1"); }

# Stops the server whose pid a NAME_start wrote to a file: a crash test may have killed and
# restarted it, so it is not necessarily a child of this shell. SIGTERM, then SIGKILL after 5 s.
stores_kill_pidfile() { # pidfile
    local pid i
    [[ -f "$1" ]] || return 0
    pid=$(cat "$1")
    rm -f "$1"
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
}

stores_stop() {
    local s
    for s in "${STORES_STARTED[@]}"; do "${s}_stop" || true; done
    STORES_STARTED=()
}

for _store in "$(dirname "${BASH_SOURCE[0]}")"/stores/*.sh; do
    [[ -e "$_store" ]] && source "$_store"
done
unset _store
