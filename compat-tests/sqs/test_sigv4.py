"""SigV4 verification (Tributary only: ElasticMQ accepts any signature). With access keys in
the config file, a request signed with a configured key is served, one signed with a wrong
secret is refused with SignatureDoesNotMatch and one with an unknown key id with
InvalidClientTokenId, in both wire protocols."""

from __future__ import annotations

import datetime
import urllib.error
import urllib.parse
import urllib.request

import botocore.auth
import botocore.awsrequest
import botocore.credentials
import pytest

from sqscompat import (
    ACCESS_KEY, API_VERSION, REGION, SECRET_KEY, Answer, expect_error, http_post, json_call,
    query, receive_n, xml_error,
)

pytestmark = pytest.mark.tributary_only("ElasticMQ does not verify signatures")

CONFIG = f"""
sqs_region = "{REGION}"
sqs_account_id = "000000000000"

[[sqs_credentials]]
access_key_id = "{ACCESS_KEY}"
secret_access_key = "{SECRET_KEY}"
"""


@pytest.fixture(scope="module")
def signed(make_module_tributary):
    return make_module_tributary("standalone", config=CONFIG).broker()


def _signed_query(endpoint: str, action: str, params: dict, key: str, secret: str):
    """A query-protocol form POST signed with SigV4 by botocore's signer."""
    body = urllib.parse.urlencode({"Action": action, "Version": API_VERSION, **params})
    req = botocore.awsrequest.AWSRequest(
        method="POST", url=endpoint + "/", data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    botocore.auth.SigV4Auth(botocore.credentials.Credentials(key, secret), "sqs",
                            REGION).add_auth(req)
    return http_post(endpoint + "/", body.encode(), dict(req.headers.items()))


def test_good_key_is_served(signed, uid):
    sqs = signed.client()
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="signed")
    assert receive_n(sqs, url, 1)[0]["Body"] == "signed"


def test_wrong_secret(signed, uid):
    good = signed.client()
    url = good.create_queue(QueueName=uid)["QueueUrl"]
    bad = signed.client(secret_key="not-the-secret")
    e = expect_error("SignatureDoesNotMatch", bad.send_message, QueueUrl=url,
                     MessageBody="forged")
    assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    expect_error("SignatureDoesNotMatch", bad.list_queues)
    r = good.receive_message(QueueUrl=url, WaitTimeSeconds=1)
    assert not r.get("Messages"), "a request with a bad signature was carried out"


def test_unknown_key(signed, uid):
    good = signed.client()
    url = good.create_queue(QueueName=uid)["QueueUrl"]
    stranger = signed.client(access_key="AKIDUNKNOWN0000000", secret_key=SECRET_KEY)
    e = expect_error("InvalidClientTokenId", stranger.send_message, QueueUrl=url,
                     MessageBody="stranger")
    assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert not good.receive_message(QueueUrl=url, WaitTimeSeconds=1).get("Messages")


def test_unsigned_request_refused(signed, uid):
    url = signed.client().create_queue(QueueName=uid)["QueueUrl"]
    a = json_call(signed.endpoint, "SendMessage", {"QueueUrl": url, "MessageBody": "anon"})
    assert a.status in (400, 403), a
    a = query(signed.endpoint, "SendMessage", {"QueueUrl": url, "MessageBody": "anon"})
    assert a.status in (400, 403), a
    assert not signed.client().receive_message(QueueUrl=url, WaitTimeSeconds=1).get(
        "Messages")


def test_query_protocol_signed(signed, uid):
    a = _signed_query(signed.endpoint, "CreateQueue", {"QueueName": uid},
                      ACCESS_KEY, SECRET_KEY)
    assert a.status == 200, a
    assert a.xml().findtext("CreateQueueResult/QueueUrl") == signed.queue_url(uid)
    a = _signed_query(signed.endpoint, "GetQueueUrl", {"QueueName": uid},
                      ACCESS_KEY, "wrong")
    assert a.status == 403, a
    assert xml_error(a)[1] == "SignatureDoesNotMatch"
    a = _signed_query(signed.endpoint, "GetQueueUrl", {"QueueName": uid},
                      "AKIDUNKNOWN0000000", SECRET_KEY)
    assert a.status == 403, a
    assert xml_error(a)[1] == "InvalidClientTokenId"


def test_tampered_body(signed, uid):
    url = signed.client().create_queue(QueueName=uid)["QueueUrl"]
    body = urllib.parse.urlencode({"Action": "SendMessage", "Version": API_VERSION,
                                   "QueueUrl": url, "MessageBody": "original"})
    req = botocore.awsrequest.AWSRequest(
        method="POST", url=signed.endpoint + "/", data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    botocore.auth.SigV4Auth(botocore.credentials.Credentials(ACCESS_KEY, SECRET_KEY), "sqs",
                            REGION).add_auth(req)
    tampered = body.replace("original", "tampered").encode()
    a = http_post(signed.endpoint + "/", tampered, dict(req.headers.items()))
    assert a.status == 403, a
    assert xml_error(a)[1] == "SignatureDoesNotMatch"
    assert not signed.client().receive_message(QueueUrl=url, WaitTimeSeconds=1).get(
        "Messages")


def _presigned_get(endpoint: str, params: dict, key: str, secret: str,
                   expires: int = 300) -> str:
    """A query-protocol GET with the SigV4 signature in the query string (presigned)."""
    url = endpoint + "/?" + urllib.parse.urlencode(
        {"Action": params.pop("Action"), "Version": API_VERSION, **params})
    req = botocore.awsrequest.AWSRequest(method="GET", url=url)
    botocore.auth.SigV4QueryAuth(botocore.credentials.Credentials(key, secret), "sqs",
                                 REGION, expires=expires).add_auth(req)
    return req.url


def _get(url: str) -> Answer:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def test_presigned_query_string(signed, uid):
    signed.client().create_queue(QueueName=uid)
    a = _get(_presigned_get(signed.endpoint, {"Action": "GetQueueUrl", "QueueName": uid},
                            ACCESS_KEY, SECRET_KEY))
    assert a.status == 200, a
    assert a.xml().findtext("GetQueueUrlResult/QueueUrl") == signed.queue_url(uid)
    a = _get(_presigned_get(signed.endpoint, {"Action": "GetQueueUrl", "QueueName": uid},
                            ACCESS_KEY, "wrong"))
    assert a.status == 403, a
    assert xml_error(a)[1] == "SignatureDoesNotMatch"


def test_clock_skew_beyond_15_minutes(signed, uid, monkeypatch):
    url = signed.client().create_queue(QueueName=uid)["QueueUrl"]
    skewed = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=20)
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda remove_tzinfo=True: skewed.replace(tzinfo=None)
                        if remove_tzinfo else skewed)
    body = urllib.parse.urlencode({"Action": "SendMessage", "Version": API_VERSION,
                                   "QueueUrl": url, "MessageBody": "old"})
    req = botocore.awsrequest.AWSRequest(
        method="POST", url=signed.endpoint + "/", data=body,
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"})
    botocore.auth.SigV4Auth(botocore.credentials.Credentials(ACCESS_KEY, SECRET_KEY), "sqs",
                            REGION).add_auth(req)
    monkeypatch.undo()
    assert req.headers["X-Amz-Date"] == skewed.strftime("%Y%m%dT%H%M%SZ")
    a = http_post(signed.endpoint + "/", body.encode(), dict(req.headers.items()))
    assert a.status in (400, 403), a
    assert xml_error(a)[1] in ("SignatureDoesNotMatch", "RequestExpired",
                               "RequestTimeTooSkewed"), a.body
    assert not signed.client().receive_message(QueueUrl=url, WaitTimeSeconds=1).get(
        "Messages")
