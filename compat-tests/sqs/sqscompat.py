"""Helpers shared by the SQS scenarios: the server under test (an HTTP endpoint), boto3
clients for it, raw requests in both wire protocols (AWS JSON 1.0 and the query protocol with
its XML answers), the MD5 digests the SDKs check, and waiting helpers. Every wait is for a
condition with a deadline; a fixed sleep is only used to prove that something does NOT happen
(QUIET_S)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

import boto3
import botocore.config
import botocore.exceptions
import pytest

BROKERS = ["tributary", "elasticmq"]

REGION = "us-east-1"
ACCOUNT = "000000000000"
API_VERSION = "2012-11-05"

# Keys every client signs with unless a test gives others. Without configured keys Tributary
# accepts any signature (as ElasticMQ does).
ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"

WAIT_S = 10.0
# How long a scenario waits to prove that something does NOT happen (a long poll still
# pending, a delayed message not yet visible). Only used for that.
QUIET_S = 0.5
HTTP_TIMEOUT_S = 30.0


@dataclasses.dataclass
class Broker:
    """An SQS endpoint under test."""

    kind: str  # "tributary" or "elasticmq"
    endpoint: str  # http://HOST:PORT
    server: object = None  # the process/deployment behind it

    @property
    def is_tributary(self) -> bool:
        return self.kind == "tributary"

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY,
               read_timeout: float = HTTP_TIMEOUT_S):
        """A boto3 SQS client (AWS JSON 1.0) for this endpoint; no retries, so the first
        answer is the one a test sees."""
        return boto3.client(
            "sqs",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=botocore.config.Config(
                retries={"total_max_attempts": 1, "mode": "standard"},
                connect_timeout=10,
                read_timeout=read_timeout,
                max_pool_connections=20,
            ),
        )

    def queue_url(self, name: str) -> str:
        return f"{self.endpoint}/{ACCOUNT}/{name}"

    def queue_arn(self, name: str) -> str:
        return f"arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"


# -- raw requests ---------------------------------------------------------------------------


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body) if self.body else {}

    def xml(self) -> ET.Element:
        return strip_ns(ET.fromstring(self.body))


def http_post(url: str, body: bytes, headers: dict) -> Answer:
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def query(url: str, action: str, params: dict | None = None) -> Answer:
    """A query-protocol request (form POST, `Action=...&Version=2012-11-05`) to `url` (the
    endpoint or a queue URL), unsigned."""
    form = {"Action": action, "Version": API_VERSION, **(params or {})}
    return http_post(url, urllib.parse.urlencode(form).encode(),
                     {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})


def json_call(endpoint: str, action: str, body: dict | bytes) -> Answer:
    """An AWS JSON 1.0 request (`X-Amz-Target: AmazonSQS.<action>`), unsigned."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http_post(endpoint + "/", data, {
        "Content-Type": "application/x-amz-json-1.0",
        "X-Amz-Target": f"AmazonSQS.{action}",
    })


def strip_ns(root: ET.Element) -> ET.Element:
    for el in root.iter():
        if isinstance(el.tag, str) and "}" in el.tag:
            el.tag = el.tag.split("}", 1)[1]
    return root


def xml_error(answer: Answer) -> tuple[str, str]:
    """(Type, Code) of a query-protocol ErrorResponse."""
    root = answer.xml()
    assert root.tag == "ErrorResponse", answer.body
    err = root.find("Error")
    assert err is not None, answer.body
    return err.findtext("Type"), err.findtext("Code")


def json_error_type(answer: Answer) -> str:
    """The error name of an AWS JSON 1.0 error (`__type` without its namespace)."""
    t = answer.json().get("__type", "")
    return t.rsplit("#", 1)[-1]


# -- errors ---------------------------------------------------------------------------------


def error_code(exc: botocore.exceptions.ClientError) -> str:
    return exc.response["Error"]["Code"]


def expect_error(codes, fn, *args, **kw) -> botocore.exceptions.ClientError:
    """Calls fn and expects a ClientError whose code is one of `codes` (a string or a
    tuple: the JSON protocol's name and the query protocol's, which boto3 reports when the
    server sends x-amzn-query-error)."""
    if isinstance(codes, str):
        codes = (codes,)
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        fn(*args, **kw)
    assert error_code(ei.value) in codes, ei.value.response
    return ei.value


# -- digests the SDKs check -----------------------------------------------------------------


def md5_hex(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.md5(data).hexdigest()


def md5_of_attributes(attrs: dict) -> str:
    """MD5OfMessageAttributes as AWS computes it: for each attribute in name order, the
    length-prefixed (4-byte big-endian) name and data type, a transport byte (1 string,
    2 binary) and the length-prefixed value."""
    h = hashlib.md5()

    def put(b: bytes):
        h.update(struct.pack(">I", len(b)))
        h.update(b)

    for name in sorted(attrs):
        a = attrs[name]
        put(name.encode("utf-8"))
        put(a["DataType"].encode("utf-8"))
        if "BinaryValue" in a:
            h.update(b"\x02")
            put(a["BinaryValue"])
        else:
            h.update(b"\x01")
            put(a["StringValue"].encode("utf-8"))
    return h.hexdigest()


# -- waiting --------------------------------------------------------------------------------


def receive_n(client, url: str, n: int, timeout: float = WAIT_S, **kw) -> list[dict]:
    """Long-polls until `n` messages were received (or the deadline): the messages, in the
    order received. Fails when fewer arrive."""
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        r = client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=min(10, n - len(got)),
            WaitTimeSeconds=max(1, min(5, int(left))), **kw)
        got.extend(r.get("Messages", []))
    assert len(got) >= n, f"received {len(got)} of {n} messages within {timeout}s: {got}"
    return got


def receive_none(client, url: str, **kw) -> None:
    """Asserts that an immediate receive returns nothing."""
    r = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0, **kw)
    assert not r.get("Messages"), r["Messages"]


def delete_all(client, url: str, messages: list[dict]) -> None:
    for m in messages:
        client.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def attrs(client, url: str, *names: str) -> dict:
    return client.get_queue_attributes(
        QueueUrl=url, AttributeNames=list(names) or ["All"])["Attributes"]


def wait_for(cond, timeout: float = WAIT_S, what: str = "condition", interval: float = 0.1):
    """Polls `cond()` until truthy; returns its value, or fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {v!r})")
        time.sleep(interval)
