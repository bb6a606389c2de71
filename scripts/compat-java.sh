#!/usr/bin/env bash
# Protocol compatibility tests with the Java clients (compat-tests/java: kafka-clients,
# com.rabbitmq:amqp-client, Eclipse Paho MQTT v3, AWS SDK v2 sqs, rocketmq-client), a Maven
# project run with JUnit 5.
#
#   TRIBUTARY_BIN=target/debug/tributary scripts/compat-java.sh [MVN ARGS...]
#   e.g. scripts/compat-java.sh -Dtest='*Amqp*'
#
# Needs java (17) and mvn; the dependencies come from Maven Central into ~/.m2. The tests start
# the tributary binary themselves (one server per test class, on free loopback ports; logs in
# compat-tests/java/target/tributary-logs/). The AMQP and MQTT tests also run against RabbitMQ
# and Mosquitto, which this script installs from Debian when missing (scripts/brokers.sh),
# starts on free loopback ports and stops on exit; the SQS tests against ElasticMQ (its jars
# from Maven Central into ~/.cache/tributary), started the same way; the Kafka transaction tests
# against Apache Kafka (one KRaft node, its jars from Maven Central into ~/.cache/tributary;
# KAFKA_REFERENCE=off leaves it out and those reference tests are skipped); the RocketMQ tests
# against Apache RocketMQ (one NameServer and one broker, its jars from Maven Central into
# ~/.cache/tributary; ROCKETMQ_REFERENCE=off leaves it out the same way).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"

for tool in java mvn; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "compat-java.sh: $tool not found (needs a JDK 17 and Maven; Debian: apt-get install openjdk-17-jdk-headless maven)" >&2
        exit 2
    fi
done
if [[ -z "${TRIBUTARY_BIN:-}" ]]; then
    echo "compat-java.sh: set TRIBUTARY_BIN to a built tributary binary (e.g. TRIBUTARY_BIN=target/debug/tributary)" >&2
    exit 2
fi
if [[ ! -f "$TRIBUTARY_BIN" || ! -x "$TRIBUTARY_BIN" ]]; then
    echo "compat-java.sh: TRIBUTARY_BIN=$TRIBUTARY_BIN is not an executable file" >&2
    exit 2
fi
bin="$(cd "$(dirname "$TRIBUTARY_BIN")" && pwd)/$(basename "$TRIBUTARY_BIN")"

# shellcheck source=scripts/brokers.sh
source "$root/scripts/brokers.sh"
work="$(mktemp -d /tmp/tributary-compat-java.XXXXXX)"
brokers_init "$work"
cleanup() {
    set +e
    brokers_stop
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

brokers_install mosquitto rabbitmq-server elasticmq
mosquitto_start
elasticmq_start
kafka_ref=""
if [[ ! "${KAFKA_REFERENCE:-}" =~ ^(off|0|false|no)$ ]]; then
    brokers_install kafka
    echo "== apache kafka starting"
    kafka_start
    kafka_ref="127.0.0.1:$k_port"
fi
rocketmq_ref=""
if [[ ! "${ROCKETMQ_REFERENCE:-}" =~ ^(off|0|false|no)$ ]]; then
    brokers_install rocketmq
    echo "== apache rocketmq starting"
    rocketmq_start
    rocketmq_ref="$r_namesrv"
fi
echo "== rabbitmq-server starting"
rabbitmq_start

reports="$root/compat-tests/java/target/surefire-reports"
rm -rf "$reports" # the summary below is of this run only
echo "== mvn test compat-tests/java ($bin; RabbitMQ 127.0.0.1:$r_port, Mosquitto 127.0.0.1:$m_port, ElasticMQ 127.0.0.1:$e_port, Apache Kafka ${kafka_ref:-off}, Apache RocketMQ ${rocketmq_ref:-off})"
start=$SECONDS
rc=0
# Not exec: the trap stops the reference brokers afterwards.
mvn -B -q -f "$root/compat-tests/java/pom.xml" test \
    -Dtributary.bin="$bin" \
    -Dreference.amqp="127.0.0.1:$r_port" \
    -Dreference.mqtt="127.0.0.1:$m_port" \
    -Dreference.sqs="127.0.0.1:$e_port" \
    -Dreference.kafka="$kafka_ref" \
    -Dreference.rocketmq="$rocketmq_ref" \
    "$@" || rc=$?
# mvn -q prints only failures: one line per test class from the surefire reports.
python3 - "$reports" <<'EOF'
import glob, os, sys
import xml.etree.ElementTree as ET
for path in sorted(glob.glob(os.path.join(sys.argv[1], "TEST-*.xml"))):
    s = ET.parse(path).getroot()
    n, f, e, k = (int(s.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
    print(f"{s.get('name').rsplit('.', 1)[-1]:<20} {n - f - e - k:>2} passed {f + e:>2} failed "
          f"{k:>2} skipped {float(s.get('time', 0)):6.1f} s")
EOF
echo "== compat-tests/java: exit $rc after $((SECONDS - start)) s (server logs in compat-tests/java/target/tributary-logs/)"
exit "$rc"
