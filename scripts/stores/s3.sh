# An S3 endpoint for the object-store log: moto's server (PyPI `moto[server]`, in a venv of its
# own under ~/.cache/tributary), in memory. Defines s3_install, s3_start, s3_stop (see
# scripts/stores.sh). s3_start creates the bucket `tributary` and exports
# TRIBUTARY_TEST_S3_ENDPOINT (http://127.0.0.1:PORT), TRIBUTARY_TEST_S3_BUCKET and the
# dummy credentials moto accepts. Its data lives in the server process: a restart of moto
# empties it (restarts of Tributary keep it).

S3_VENV="${TRIBUTARY_S3_VENV:-$HOME/.cache/tributary/venv-s3}"
S3_MOTO_VERSION="5.2.6"

s3_install() {
    if [[ -x "$S3_VENV/bin/moto_server" ]]; then return 0; fi
    echo "== installing moto[server] $S3_MOTO_VERSION into $S3_VENV"
    python3 -m venv "$S3_VENV"
    "$S3_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "moto[server]==$S3_MOTO_VERSION"
}

s3_start() {
    s3_stop
    local d="$STORES_DIR/s3" port
    mkdir -p "$d"
    port=$(free_port)
    nohup "$S3_VENV/bin/moto_server" -H 127.0.0.1 -p "$port" >> "$d/moto.log" 2>&1 < /dev/null &
    echo $! > "$d/pid"
    if ! wait_port 127.0.0.1 "$port" 60; then
        tail -20 "$d/moto.log" >&2
        return 1
    fi
    stores_started s3
    export TRIBUTARY_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
    export TRIBUTARY_TEST_S3_BUCKET=tributary
    export TRIBUTARY_TEST_S3_ACCESS_KEY=test TRIBUTARY_TEST_S3_SECRET_KEY=test
    # Path-style PUT of the bucket: moto creates it in us-east-1 without a body.
    "$S3_VENV/bin/python" - "$TRIBUTARY_TEST_S3_ENDPOINT" <<'PY'
import sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/tributary", method="PUT")
urllib.request.urlopen(req, timeout=10).read()
PY
    echo "== S3 (moto $S3_MOTO_VERSION) on $TRIBUTARY_TEST_S3_ENDPOINT, bucket tributary (pid $(cat "$d/pid"))"
}

s3_stop() {
    stores_kill_pidfile "$STORES_DIR/s3/pid"
}
