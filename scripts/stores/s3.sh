# An S3 endpoint for the object-store log: moto's server (PyPI `moto[server]`, in a venv of its
# own under ~/.cache/tributary), in memory. Defines s3_install, s3_start, s3_stop (see
# scripts/stores.sh). s3_start creates the bucket `tributary` and exports
# TRIBUTARY_TEST_S3_ENDPOINT (http://127.0.0.1:PORT), TRIBUTARY_TEST_S3_BUCKET and the
# dummy credentials moto accepts. Its data lives in the server process: a restart of moto
# empties it (restarts of Tributary keep it). s3_auth_start (below) starts a second one that
# checks keys.

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
    local d="$STORES_DIR/s3" port host="${STORES_HOST:-127.0.0.1}"
    mkdir -p "$d"
    port=$(free_port)
    nohup "$S3_VENV/bin/moto_server" -H "$host" -p "$port" >> "$d/moto.log" 2>&1 < /dev/null &
    echo $! > "$d/pid"
    if ! wait_port "$host" "$port" 60; then
        tail -20 "$d/moto.log" >&2
        return 1
    fi
    stores_started s3
    export TRIBUTARY_TEST_S3_ENDPOINT="http://$host:$port"
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

# A second moto server that checks credentials (s3_auth_start, s3_auth_stop): moto accepts any
# keys unless told to enforce IAM (`POST /moto-api/reset-auth` with a count of requests still
# let through). s3_auth_start creates the bucket `tributary` and an IAM user allowed s3:*, then
# turns enforcement on, and exports TRIBUTARY_TEST_S3_AUTH_ENDPOINT, _ACCESS_KEY and
# _SECRET_KEY (that user's key). From then on an unknown key id is answered 403
# InvalidAccessKeyId and a wrong secret 403 SignatureDoesNotMatch.
#
# moto 5.2.6 rebuilds the signed request from the raw URL without percent-encoding the query,
# as AWS's canonical request does: a correct signature over `?delimiter=/` (OpenDAL's listing,
# sent unencoded) never matches. The launcher below encodes the query the AWS way before moto
# computes its signature; nothing else of moto changes.
s3_auth_start() {
    s3_auth_stop
    local d="$STORES_DIR/s3-auth" port
    mkdir -p "$d"
    port=$(free_port)
    cat > "$d/moto_auth.py" <<'PY'
import sys
import urllib.parse

from moto.iam import access_control

_create_aws_request = access_control.IAMRequestBase._create_aws_request


def _aws_encoded_query(self):
    path, sep, query = self._path.partition("?")
    if sep:
        def enc(s):
            return urllib.parse.quote(urllib.parse.unquote(s), safe="-_.~")
        pairs = (p.partition("=") for p in query.split("&") if p)
        self._path = path + "?" + "&".join(f"{enc(k)}={enc(v)}" for k, _, v in pairs)
    return _create_aws_request(self)


access_control.IAMRequestBase._create_aws_request = _aws_encoded_query

from moto.server import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
PY
    nohup "$S3_VENV/bin/python" "$d/moto_auth.py" -H 127.0.0.1 -p "$port" >> "$d/moto.log" 2>&1 < /dev/null &
    echo $! > "$d/pid"
    if ! wait_port 127.0.0.1 "$port" 60; then
        tail -20 "$d/moto.log" >&2
        return 1
    fi
    stores_started s3_auth
    export TRIBUTARY_TEST_S3_AUTH_ENDPOINT="http://127.0.0.1:$port"
    local keys
    keys=$("$S3_VENV/bin/python" - "$TRIBUTARY_TEST_S3_AUTH_ENDPOINT" <<'PY'
import json
import sys
import urllib.request

import boto3

endpoint = sys.argv[1]
kw = dict(endpoint_url=endpoint, region_name="us-east-1",
          aws_access_key_id="setup", aws_secret_access_key="setup")
boto3.client("s3", **kw).create_bucket(Bucket="tributary")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="tributary")
iam.put_user_policy(UserName="tributary", PolicyName="s3", PolicyDocument=json.dumps({
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="tributary")["AccessKey"]
# From now on every request must be signed with a key of an IAM user, permitted by its policy.
urllib.request.urlopen(urllib.request.Request(
    endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
    headers={"Content-Type": "text/plain"}), timeout=10).read()
print(key["AccessKeyId"], key["SecretAccessKey"])
PY
)
    read -r TRIBUTARY_TEST_S3_AUTH_ACCESS_KEY TRIBUTARY_TEST_S3_AUTH_SECRET_KEY <<< "$keys"
    export TRIBUTARY_TEST_S3_AUTH_ACCESS_KEY TRIBUTARY_TEST_S3_AUTH_SECRET_KEY
    echo "== S3 with IAM enforced (moto $S3_MOTO_VERSION) on $TRIBUTARY_TEST_S3_AUTH_ENDPOINT, bucket tributary (pid $(cat "$d/pid"))"
}

s3_auth_stop() {
    stores_kill_pidfile "$STORES_DIR/s3-auth/pid"
}
