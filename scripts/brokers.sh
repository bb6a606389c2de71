# Reference brokers (Mosquitto, RabbitMQ) for scripts that compare or smoke-test against them.
# Sourced, not run: `source scripts/brokers.sh`, then
#
#   brokers_install mosquitto rabbitmq-server   # apt-get when missing (root or sudo)
#   brokers_install chromium                    # the browser of scripts/console-test.sh
#   brokers_init "$workdir"                     # where configs, data and logs go
#   mosquitto_start                             # sets m_port, m_pid (restarts if running)
#   rabbitmq_start                              # sets r_port, r_pid; up to ~2 min to boot
#   brokers_stop                                # stops everything started (also from a trap)
#
# Every broker listens on a free loopback port and keeps its state under the work dir, so
# nothing touches a system-wide instance.

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # host port seconds
    local deadline=$((SECONDS + $3))
    until python3 -c "import socket; socket.create_connection(('$1', $2), 1)" 2>/dev/null; do
        if ((SECONDS > deadline)); then return 1; fi
        sleep 0.2
    done
}

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

brokers_install() { # package...
    local need=() pkg
    for pkg in "$@"; do
        case "$pkg" in
            mosquitto) [[ -x /usr/sbin/mosquitto ]] || need+=(mosquitto) ;;
            rabbitmq-server) [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || need+=(rabbitmq-server) ;;
            # Not a broker: the headless browser the console's end-to-end tests drive.
            chromium) [[ -x /usr/bin/chromium ]] || need+=(chromium) ;;
            *) echo "brokers_install: unknown package $pkg" >&2; return 2 ;;
        esac
    done
    [[ ${#need[@]} -eq 0 ]] && return 0
    echo "== installing ${need[*]} from Debian"
    as_root apt-get update -qq
    # RUNLEVEL=1 keeps the packages from starting their system services: callers start their
    # own instances.
    as_root env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq \
        --no-install-recommends "${need[@]}" >/dev/null
    for pkg in "${need[@]}"; do as_root service "$pkg" stop >/dev/null 2>&1 || true; done
}

brokers_init() { # workdir
    brokers_dir="$1"
    m_pid=""
    r_pid=""
    rabbit_node=""
    rabbit_env=()
    mkdir -p "$brokers_dir"
}

mosquitto_start() {
    mosquitto_stop
    m_port=$(free_port)
    local d="$brokers_dir/mosquitto"
    mkdir -p "$d"
    # The benches fail on any lost message. Mosquitto's defaults drop under a max-rate run:
    # max_queued_messages 1000 drops for a subscriber that falls behind (even at QoS 1), and
    # max_inflight_messages 20 also bounds incoming QoS 2 (more in flight are dropped).
    cat > "$d/mosquitto.conf" <<EOF
listener $m_port 127.0.0.1
allow_anonymous true
max_queued_messages 0
max_inflight_messages 1000
max_connections -1
persistence false
log_dest stderr
log_type error
log_type warning
EOF
    /usr/sbin/mosquitto -c "$d/mosquitto.conf" 2>> "$d/stderr" &
    m_pid=$!
    wait_port 127.0.0.1 "$m_port" 20 || { cat "$d/stderr" >&2; return 1; }
}

mosquitto_stop() {
    if [[ -n "${m_pid:-}" ]]; then
        kill "$m_pid" 2>/dev/null
        wait "$m_pid" 2>/dev/null || true
        m_pid=""
    fi
}

# The /usr/sbin wrappers switch to the rabbitmq user (and its home and cookie) when run as
# root; the scripts under /usr/lib run as the caller with the environment given here.
rabbitmqctl_bin=/usr/lib/rabbitmq/bin/rabbitmqctl

rabbitmq_start() {
    local d="$brokers_dir/rabbitmq"
    mkdir -p "$d"/{mnesia,log,home}
    r_port=$(free_port)
    rabbit_node="tributary-ref-$$@localhost"
    printf 'listeners.tcp.1 = 127.0.0.1:%s\nloopback_users.guest = true\n' "$r_port" \
        > "$d/rabbitmq.conf"
    echo '[].' > "$d/enabled_plugins"
    rabbit_env=(HOME="$d/home" RABBITMQ_NODENAME="$rabbit_node"
        RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$r_port"
        RABBITMQ_DIST_PORT="$(free_port)" ERL_EPMD_PORT="$(free_port)"
        RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log"
        RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf"
        RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" RABBITMQ_PID_FILE="$d/rabbit.pid")
    env "${rabbit_env[@]}" /usr/lib/rabbitmq/bin/rabbitmq-server > "$d/stdout" 2>&1 &
    # `wait` returns once the pid file exists and the rabbit application has started.
    if ! env "${rabbit_env[@]}" timeout 150 "$rabbitmqctl_bin" -n "$rabbit_node" \
            wait "$d/rabbit.pid" --timeout 120 >/dev/null 2>&1; then
        tail -20 "$d/stdout" >&2
        return 1
    fi
    r_pid=$(cat "$d/rabbit.pid")
}

rabbitmq_stop() {
    if [[ -n "${rabbit_node:-}" ]]; then
        env "${rabbit_env[@]}" timeout 60 "$rabbitmqctl_bin" -n "$rabbit_node" stop \
            >/dev/null 2>&1
        # epmd is started by RabbitMQ on demand (on its own port here) and outlives it.
        env "${rabbit_env[@]}" epmd -kill >/dev/null 2>&1
        rabbit_node=""
    fi
}

brokers_stop() {
    mosquitto_stop
    rabbitmq_stop
}
