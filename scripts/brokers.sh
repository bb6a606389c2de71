# Reference brokers (Mosquitto, RabbitMQ, Apache Kafka, ElasticMQ, Apache RocketMQ) for scripts
# that compare or smoke-test against them. Sourced, not run: `source scripts/brokers.sh`, then
#
#   brokers_install mosquitto rabbitmq-server   # apt-get when missing (root or sudo)
#   brokers_install chromium                    # the browser of scripts/console-test.sh
#   brokers_install kafka                       # Apache Kafka's jars from Maven Central (mvn)
#   brokers_install elasticmq                   # ElasticMQ's jars from Maven Central (mvn)
#   brokers_install rocketmq                    # Apache RocketMQ's jars from Maven Central (mvn)
#   brokers_init "$workdir"                     # where configs, data and logs go
#   mosquitto_start                             # sets m_port, m_pid (restarts if running)
#   rabbitmq_start                              # sets r_port, r_pid; up to ~2 min to boot
#   kafka_start                                 # sets k_port, k_pid: one KRaft node, fresh
#   elasticmq_start                             # sets e_port, e_pid, e_url: SQS, in memory
#   rocketmq_start                              # sets r_namesrv (HOST:PORT), rn_pid, rb_pid:
#                                               # one NameServer and one broker, fresh
#   brokers_stop                                # stops everything started (also from a trap)
#
# Every broker listens on a free loopback port and keeps its state under the work dir, so
# nothing touches a system-wide instance.

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits until a starting tributary prints `ready` (every listener bound); on its exit or
# after 30 s, prints its stderr and fails.
wait_tributary_ready() { # stdout-file pid stderr-file
    local deadline=$((SECONDS + 30))
    until grep -qx ready "$1" 2>/dev/null; do
        if ((SECONDS > deadline)) || ! kill -0 "$2" 2>/dev/null; then
            cat "$3" >&2
            return 1
        fi
        sleep 0.1
    done
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
            # Not from Debian: Maven Central, into ~/.cache/tributary.
            kafka) kafka_install || return 1 ;;
            elasticmq) elasticmq_install || return 1 ;;
            rocketmq) rocketmq_install || return 1 ;;
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
    k_pid=""
    e_pid=""
    rn_pid=""
    rb_pid=""
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

# Apache Kafka, the broker itself from Maven Central (org.apache.kafka:kafka_2.13 and its
# runtime dependencies, copied once into ~/.cache/tributary), run as a single KRaft node
# (broker and controller in one JVM) with the machine's Java. Its defaults stay as they are
# (no fsync per write: the OS flushes), apart from what one node needs.
kafka_version=4.1.1
kafka_home="${TRIBUTARY_KAFKA_HOME:-$HOME/.cache/tributary/apache-kafka-$kafka_version}"

kafka_install() {
    [[ -f "$kafka_home/.complete" ]] && return 0
    if ! command -v mvn >/dev/null 2>&1 || ! command -v java >/dev/null 2>&1; then
        echo "brokers_install kafka: needs java (17+) and mvn" >&2
        return 2
    fi
    echo "== fetching Apache Kafka $kafka_version from Maven Central"
    local pom_dir
    pom_dir=$(mktemp -d /tmp/tributary-kafka-pom.XXXXXX)
    cat > "$pom_dir/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.tributary</groupId>
  <artifactId>apache-kafka-reference</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$kafka_version</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>2.24.3</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>2.24.3</version></dependency>
  </dependencies>
</project>
POM
    rm -rf "${kafka_home:?}"
    if ! mvn -q -B -f "$pom_dir/pom.xml" dependency:copy-dependencies \
            -DincludeScope=runtime -DoutputDirectory="$kafka_home/libs" >"$pom_dir/mvn.log" 2>&1; then
        tail -20 "$pom_dir/mvn.log" >&2
        rm -rf "$pom_dir"
        return 1
    fi
    rm -rf "$pom_dir"
    touch "$kafka_home/.complete"
}

kafka_start() {
    kafka_stop
    local d="$brokers_dir/kafka" controller cluster_id
    rm -rf "$d"
    mkdir -p "$d/data"
    k_port=$(free_port)
    controller=$(free_port)
    cluster_id=$(python3 -c 'import base64, uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')
    cat > "$d/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller
listeners=PLAINTEXT://127.0.0.1:$k_port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$k_port
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$d/data
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
PROPS
    cat > "$d/log4j2.properties" <<LOG
rootLogger.level=WARN
rootLogger.appenderRef.file.ref=file
appender.file.type=File
appender.file.name=file
appender.file.fileName=$d/server.log
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
LOG
    local java_opts=(-Xms1g -Xmx1g "-Dlog4j2.configurationFile=$d/log4j2.properties"
        -cp "$kafka_home/libs/*")
    if ! java "${java_opts[@]}" kafka.tools.StorageTool format -t "$cluster_id" \
            -c "$d/server.properties" > "$d/format.log" 2>&1; then
        cat "$d/format.log" >&2
        return 1
    fi
    java "${java_opts[@]}" kafka.Kafka "$d/server.properties" > "$d/stdout" 2>&1 &
    k_pid=$!
    if ! wait_port 127.0.0.1 "$k_port" 90; then
        tail -30 "$d/stdout" "$d/server.log" >&2 2>/dev/null
        return 1
    fi
}

kafka_stop() {
    if [[ -n "${k_pid:-}" ]]; then
        kill "$k_pid" 2>/dev/null
        # A clean shutdown takes a few seconds; past 30 s it is killed.
        timeout 30 tail --pid="$k_pid" -f /dev/null 2>/dev/null || kill -9 "$k_pid" 2>/dev/null
        wait "$k_pid" 2>/dev/null || true
        k_pid=""
    fi
}

# ElasticMQ, the reference SQS server (org.elasticmq:elasticmq-server_2.13 and its runtime
# dependencies from Maven Central, copied once into ~/.cache/tributary: the artifact is the
# server's main class only, not the fat jar of its releases), run with the machine's Java,
# in memory, with the region and account id Tributary's SQS gateway uses by default.
# Maven Central serves it, so moto's server (PyPI) is not needed as a fallback.
elasticmq_version=1.7.1
elasticmq_home="${TRIBUTARY_ELASTICMQ_HOME:-$HOME/.cache/tributary/elasticmq-$elasticmq_version}"

elasticmq_install() {
    [[ -f "$elasticmq_home/.complete" ]] && return 0
    if ! command -v mvn >/dev/null 2>&1 || ! command -v java >/dev/null 2>&1; then
        echo "brokers_install elasticmq: needs java (17+) and mvn" >&2
        return 2
    fi
    echo "== fetching ElasticMQ $elasticmq_version from Maven Central"
    local pom_dir
    pom_dir=$(mktemp -d /tmp/tributary-elasticmq-pom.XXXXXX)
    cat > "$pom_dir/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.tributary</groupId>
  <artifactId>elasticmq-reference</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.elasticmq</groupId><artifactId>elasticmq-server_2.13</artifactId><version>$elasticmq_version</version></dependency>
  </dependencies>
</project>
POM
    rm -rf "${elasticmq_home:?}"
    if ! mvn -q -B -f "$pom_dir/pom.xml" dependency:copy-dependencies \
            -DincludeScope=runtime -DoutputDirectory="$elasticmq_home/libs" >"$pom_dir/mvn.log" 2>&1; then
        tail -20 "$pom_dir/mvn.log" >&2
        rm -rf "$pom_dir"
        return 1
    fi
    rm -rf "$pom_dir"
    touch "$elasticmq_home/.complete"
}

# Writes ElasticMQ's config for `port` into `dir` (also used by compat-tests/sqs, which starts
# its own instance the same way).
elasticmq_config() { # dir port
    cat > "$1/elasticmq.conf" <<CONF
include classpath("application.conf")
node-address {
  protocol = http
  host = 127.0.0.1
  port = $2
  context-path = ""
}
rest-sqs {
  enabled = true
  bind-port = $2
  bind-hostname = "127.0.0.1"
  sqs-limits = strict
}
generate-node-address = false
aws {
  region = us-east-1
  accountId = 000000000000
}
CONF
}

elasticmq_start() {
    elasticmq_stop
    local d="$brokers_dir/elasticmq"
    rm -rf "$d"
    mkdir -p "$d"
    e_port=$(free_port)
    elasticmq_config "$d" "$e_port"
    java -Xms256m -Xmx512m "-Dconfig.file=$d/elasticmq.conf" \
        -cp "$elasticmq_home/libs/*" org.elasticmq.server.Main > "$d/stdout" 2>&1 &
    e_pid=$!
    e_url="http://127.0.0.1:$e_port"
    if ! wait_port 127.0.0.1 "$e_port" 60; then
        tail -30 "$d/stdout" >&2
        return 1
    fi
}

elasticmq_stop() {
    if [[ -n "${e_pid:-}" ]]; then
        kill "$e_pid" 2>/dev/null
        timeout 30 tail --pid="$e_pid" -f /dev/null 2>/dev/null || kill -9 "$e_pid" 2>/dev/null
        wait "$e_pid" 2>/dev/null || true
        e_pid=""
    fi
}

# Apache RocketMQ, the reference for the RocketMQ Remoting protocol: its NameServer and broker
# (org.apache.rocketmq:rocketmq-namesrv and rocketmq-broker with their runtime dependencies from
# Maven Central, copied once into ~/.cache/tributary), run with the machine's Java: one
# NameServer and one master broker, each in its own JVM, with their store and logs under the
# work dir. The broker's transaction check-back runs every 2 s for half-messages older than
# 1 s (RocketMQ's defaults are 60 s and 6 s), so the transaction tests finish in seconds.
rocketmq_version=5.3.3
rocketmq_home="${TRIBUTARY_ROCKETMQ_HOME:-$HOME/.cache/tributary/rocketmq-$rocketmq_version}"

rocketmq_install() {
    [[ -f "$rocketmq_home/.complete" ]] && return 0
    if ! command -v mvn >/dev/null 2>&1 || ! command -v java >/dev/null 2>&1; then
        echo "brokers_install rocketmq: needs java (17+) and mvn" >&2
        return 2
    fi
    echo "== fetching Apache RocketMQ $rocketmq_version from Maven Central"
    local pom_dir
    pom_dir=$(mktemp -d /tmp/tributary-rocketmq-pom.XXXXXX)
    cat > "$pom_dir/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.tributary</groupId>
  <artifactId>apache-rocketmq-reference</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.rocketmq</groupId><artifactId>rocketmq-namesrv</artifactId><version>$rocketmq_version</version></dependency>
    <dependency><groupId>org.apache.rocketmq</groupId><artifactId>rocketmq-broker</artifactId><version>$rocketmq_version</version></dependency>
  </dependencies>
</project>
POM
    rm -rf "${rocketmq_home:?}"
    if ! mvn -q -B -f "$pom_dir/pom.xml" dependency:copy-dependencies \
            -DincludeScope=runtime -DoutputDirectory="$rocketmq_home/libs" >"$pom_dir/mvn.log" 2>&1; then
        tail -20 "$pom_dir/mvn.log" >&2
        rm -rf "$pom_dir"
        return 1
    fi
    rm -rf "$pom_dir"
    touch "$rocketmq_home/.complete"
}

# A free loopback port P whose neighbours P-2 (the broker's "fast" Remoting channel) and P+1
# (its HA listener) are free too.
rocketmq_broker_port() {
    python3 - <<'PY'
import socket
for _ in range(200):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    try:
        for q in (p - 2, p + 1, p):
            t = socket.socket(); t.bind(("127.0.0.1", q)); t.close()
    except OSError:
        continue
    print(p)
    break
else:
    raise SystemExit("no free port with free neighbours")
PY
}

# Asks the NameServer at HOST:PORT for the cluster (Remoting request GET_BROKER_CLUSTER_INFO,
# code 106, JSON header); exits 0 when the broker address `want` is registered.
rocketmq_registered() { # namesrv want
    python3 - "$1" "$2" <<'PY'
import json, socket, struct, sys
host, port = sys.argv[1].rsplit(":", 1)
header = json.dumps({"code": 106, "flag": 0, "language": "JAVA", "opaque": 1,
                     "serializeTypeCurrentRPC": "JSON", "version": 0, "extFields": {}}).encode()
# Frame: total length (header length field + header + body), then the header length whose
# high byte is the serialization type (0: JSON), then the header; no body.
frame = struct.pack(">ii", 4 + len(header), len(header)) + header
buf = b""
try:
    with socket.create_connection((host, int(port)), 2) as s:
        s.settimeout(2)
        s.sendall(frame)
        while len(buf) < 4 or len(buf) < 4 + struct.unpack(">i", buf[:4])[0]:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
except OSError:
    sys.exit(1)
if len(buf) < 8:
    sys.exit(1)
hlen = struct.unpack(">i", buf[4:8])[0] & 0xFFFFFF
sys.exit(0 if sys.argv[2].encode() in buf[8 + hlen:] else 1)
PY
}

rocketmq_start() {
    rocketmq_stop
    local d="$brokers_dir/rocketmq" n_port b_port deadline
    rm -rf "$d"
    mkdir -p "$d/home"
    # The store goes on a tmpfs where there is one: the broker refuses every write while the
    # disk holding its store is 90% full or more (a hard cap, whatever the config says), and a
    # shared machine's disk may well be; the store of a test run is small and thrown away.
    rocketmq_store="$d/store"
    if [[ -d /dev/shm && -w /dev/shm ]]; then
        rocketmq_store=$(mktemp -d /dev/shm/tributary-rocketmq.XXXXXX)
    fi
    mkdir -p "$rocketmq_store"
    n_port=$(free_port)
    b_port=$(rocketmq_broker_port) || return 1
    printf 'listenPort=%s\n' "$n_port" > "$d/namesrv.conf"
    cat > "$d/broker.conf" <<CONF
brokerClusterName=TributaryReference
brokerName=broker-a
brokerId=0
brokerRole=ASYNC_MASTER
flushDiskType=ASYNC_FLUSH
namesrvAddr=127.0.0.1:$n_port
listenPort=$b_port
brokerIP1=127.0.0.1
storePathRootDir=$rocketmq_store
storePathCommitLog=$rocketmq_store/commitlog
mappedFileSizeCommitLog=67108864
autoCreateTopicEnable=true
autoCreateSubscriptionGroup=true
transactionCheckInterval=2000
transactionTimeOut=1000
CONF
    # user.home: where RocketMQ's own logback configs put their logs (home/logs/rocketmqlogs).
    local java_opts=(-Xms256m -Xmx512m -XX:+UseG1GC "-Duser.home=$d/home"
        "-Drocketmq.home.dir=$rocketmq_home" -cp "$rocketmq_home/libs/*")
    ROCKETMQ_HOME="$rocketmq_home" java "${java_opts[@]}" \
        org.apache.rocketmq.namesrv.NamesrvStartup -c "$d/namesrv.conf" > "$d/namesrv.stdout" 2>&1 &
    rn_pid=$!
    if ! wait_port 127.0.0.1 "$n_port" 60; then
        tail -30 "$d/namesrv.stdout" >&2
        return 1
    fi
    ROCKETMQ_HOME="$rocketmq_home" java "${java_opts[@]}" \
        org.apache.rocketmq.broker.BrokerStartup -c "$d/broker.conf" > "$d/broker.stdout" 2>&1 &
    rb_pid=$!
    r_namesrv="127.0.0.1:$n_port"
    deadline=$((SECONDS + 90))
    until rocketmq_registered "$r_namesrv" "127.0.0.1:$b_port"; do
        if ((SECONDS > deadline)) || ! kill -0 "$rb_pid" 2>/dev/null; then
            echo "rocketmq_start: the broker did not register with the NameServer" >&2
            tail -30 "$d/broker.stdout" >&2
            return 1
        fi
        sleep 0.5
    done
}

rocketmq_stop() {
    local pid
    # Both at once (nothing of the reference outlives the run); past 30 s, killed.
    for pid in "${rb_pid:-}" "${rn_pid:-}"; do
        [[ -n "$pid" ]] && kill "$pid" 2>/dev/null
    done
    for pid in "${rb_pid:-}" "${rn_pid:-}"; do
        [[ -n "$pid" ]] || continue
        timeout 30 tail --pid="$pid" -f /dev/null 2>/dev/null || kill -9 "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null || true
    done
    rb_pid=""
    rn_pid=""
    if [[ "${rocketmq_store:-}" == /dev/shm/tributary-rocketmq.* ]]; then
        rm -rf "$rocketmq_store"
    fi
    rocketmq_store=""
}

brokers_stop() {
    mosquitto_stop
    rabbitmq_stop
    kafka_stop
    elasticmq_stop
    rocketmq_stop
}
