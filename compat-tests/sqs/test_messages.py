"""Messages on standard queues: send/receive/delete, batches, message attributes and their
MD5s, visibility timeouts and redelivery, long polling, delays (boto3, AWS JSON 1.0)."""

from __future__ import annotations

import threading
import time

import pytest

from sqscompat import (
    QUIET_S, attrs, delete_all, expect_error, md5_hex, md5_of_attributes, receive_n,
    receive_none,
)


def test_send_receive_delete(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    body = "hello, SQS \u00e9\u4e2d\U0001F600"
    sent = sqs.send_message(QueueUrl=url, MessageBody=body)
    assert sent["MD5OfMessageBody"] == md5_hex(body)
    assert sent["MessageId"]
    before = int(time.time() * 1000)
    got = receive_n(sqs, url, 1, MessageSystemAttributeNames=["All"])
    m = got[0]
    assert m["Body"] == body
    assert m["MessageId"] == sent["MessageId"]
    assert m["MD5OfBody"] == md5_hex(body)
    a = m["Attributes"]
    assert a["ApproximateReceiveCount"] == "1"
    assert int(a["SentTimestamp"]) <= before + 1000
    assert int(a["ApproximateFirstReceiveTimestamp"]) >= int(a["SentTimestamp"])
    assert a.get("SenderId")
    sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    got_attrs = attrs(sqs, url)
    assert got_attrs["ApproximateNumberOfMessages"] == "0"
    assert got_attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
    receive_none(sqs, url)


def test_many_messages_each_once(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    bodies = {f"m{i}" for i in range(25)}
    for b in sorted(bodies):
        sqs.send_message(QueueUrl=url, MessageBody=b)
    got = receive_n(sqs, url, 25, VisibilityTimeout=60)
    assert sorted(m["Body"] for m in got) == sorted(bodies)
    assert len({m["MessageId"] for m in got}) == 25
    delete_all(sqs, url, got)
    receive_none(sqs, url)


def test_max_number_of_messages(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    for i in range(12):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
    r = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=3, WaitTimeSeconds=2)
    assert 1 <= len(r["Messages"]) <= 3


@pytest.mark.differs("elasticmq", "answers InvalidAttributeValue, AWS InvalidParameterValue")
def test_max_number_of_messages_out_of_range(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    expect_error("InvalidParameterValue", sqs.receive_message, QueueUrl=url,
                 MaxNumberOfMessages=11)


def test_message_attributes_and_md5(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    mattrs = {
        "s": {"DataType": "String", "StringValue": "caf\u00e9"},
        "n": {"DataType": "Number", "StringValue": "-12.5e3"},
        "b": {"DataType": "Binary", "BinaryValue": b"\x00\x01\xfe\xff"},
        "custom": {"DataType": "String.json", "StringValue": '{"a":1}'},
    }
    sent = sqs.send_message(QueueUrl=url, MessageBody="with attributes",
                            MessageAttributes=mattrs)
    assert sent["MD5OfMessageBody"] == md5_hex("with attributes")
    assert sent["MD5OfMessageAttributes"] == md5_of_attributes(mattrs)
    m = receive_n(sqs, url, 1, MessageAttributeNames=["All"])[0]
    assert m["MD5OfBody"] == md5_hex("with attributes")
    assert m["MessageAttributes"] == mattrs
    assert m["MD5OfMessageAttributes"] == md5_of_attributes(mattrs)


ORDER_ATTRS = {
    "order.id": {"DataType": "String", "StringValue": "1"},
    "order.total": {"DataType": "Number", "StringValue": "3"},
    "user": {"DataType": "String", "StringValue": "ann"},
}


def test_message_attribute_names_select(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x", MessageAttributes=ORDER_ATTRS)
    m = receive_n(sqs, url, 1, MessageAttributeNames=["user"], VisibilityTimeout=0)[0]
    assert m["MessageAttributes"] == {"user": ORDER_ATTRS["user"]}
    # MD5OfMessageAttributes covers the attributes returned (what the SDKs check).
    assert m["MD5OfMessageAttributes"] == md5_of_attributes({"user": ORDER_ATTRS["user"]})
    m = receive_n(sqs, url, 1, VisibilityTimeout=0)[0]  # none asked for
    assert "MessageAttributes" not in m


@pytest.mark.differs("elasticmq", "ignores name prefixes (`order.*`) in MessageAttributeNames")
def test_message_attribute_name_prefix(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x", MessageAttributes=ORDER_ATTRS)
    m = receive_n(sqs, url, 1, MessageAttributeNames=["order.*"], VisibilityTimeout=0)[0]
    assert set(m["MessageAttributes"]) == {"order.id", "order.total"}


def test_batch_send_and_delete(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    entries = [{"Id": f"e{i}", "MessageBody": f"body {i}"} for i in range(10)]
    entries[3]["MessageAttributes"] = {"k": {"DataType": "String", "StringValue": "v"}}
    r = sqs.send_message_batch(QueueUrl=url, Entries=entries)
    assert not r.get("Failed")
    ok = {e["Id"]: e for e in r["Successful"]}
    assert set(ok) == {f"e{i}" for i in range(10)}
    for i in range(10):
        assert ok[f"e{i}"]["MD5OfMessageBody"] == md5_hex(f"body {i}")
    assert ok["e3"]["MD5OfMessageAttributes"] == md5_of_attributes(
        entries[3]["MessageAttributes"])
    got = receive_n(sqs, url, 10, VisibilityTimeout=60)
    assert sorted(m["Body"] for m in got) == sorted(f"body {i}" for i in range(10))
    d = sqs.delete_message_batch(QueueUrl=url, Entries=[
        {"Id": f"d{i}", "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)])
    assert not d.get("Failed")
    assert len(d["Successful"]) == 10
    wait_attrs = attrs(sqs, url)
    assert wait_attrs["ApproximateNumberOfMessages"] == "0"
    assert wait_attrs["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_batch_send_per_entry_failure(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    r = sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": "good1", "MessageBody": "fine"},
        {"Id": "bad", "MessageBody": "nul \u0000 here"},
        {"Id": "good2", "MessageBody": "also fine"},
    ])
    assert sorted(e["Id"] for e in r["Successful"]) == ["good1", "good2"]
    assert len(r["Failed"]) == 1
    f = r["Failed"][0]
    assert f["Id"] == "bad"
    assert f["SenderFault"] is True
    assert f["Code"]  # AWS: InvalidMessageContents; test_errors.py checks SendMessage's
    got = receive_n(sqs, url, 2)
    assert sorted(m["Body"] for m in got) == ["also fine", "fine"]


def test_batch_entry_ids_not_distinct(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    e = expect_error(("AWS.SimpleQueueService.BatchEntryIdsNotDistinct",
                      "BatchEntryIdsNotDistinct"),
                     sqs.send_message_batch, QueueUrl=url,
                     Entries=[{"Id": "a", "MessageBody": "1"}, {"Id": "a", "MessageBody": "2"}])
    assert isinstance(e, sqs.exceptions.BatchEntryIdsNotDistinct)
    receive_none(sqs, url)  # nothing of the refused batch was sent


def test_batch_too_many_entries(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    e = expect_error(("AWS.SimpleQueueService.TooManyEntriesInBatchRequest",
                      "TooManyEntriesInBatchRequest"),
                     sqs.send_message_batch, QueueUrl=url,
                     Entries=[{"Id": f"e{i}", "MessageBody": "x"} for i in range(11)])
    assert isinstance(e, sqs.exceptions.TooManyEntriesInBatchRequest)
    receive_none(sqs, url)


@pytest.mark.differs("elasticmq", "accepts an empty SendMessageBatch")
def test_batch_empty(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    e = expect_error(("AWS.SimpleQueueService.EmptyBatchRequest", "EmptyBatchRequest"),
                     sqs.send_message_batch, QueueUrl=url, Entries=[])
    assert isinstance(e, sqs.exceptions.EmptyBatchRequest)


def test_visibility_expiry_redelivers(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="again")
    first = receive_n(sqs, url, 1, VisibilityTimeout=1,
                      MessageSystemAttributeNames=["ApproximateReceiveCount"])[0]
    assert first["Attributes"]["ApproximateReceiveCount"] == "1"
    t0 = time.monotonic()
    # Invisible now; the long poll returns it once its visibility timeout ran out.
    second = receive_n(sqs, url, 1, timeout=15, VisibilityTimeout=30,
                       MessageSystemAttributeNames=["ApproximateReceiveCount"])[0]
    assert time.monotonic() - t0 >= 0.5
    assert second["MessageId"] == first["MessageId"]
    assert second["Attributes"]["ApproximateReceiveCount"] == "2"
    assert second["ReceiptHandle"] != first["ReceiptHandle"]
    # The newest receipt handle deletes it.
    sqs.delete_message(QueueUrl=url, ReceiptHandle=second["ReceiptHandle"])
    a = attrs(sqs, url)
    assert a["ApproximateNumberOfMessages"] == "0"
    assert a["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_queue_visibility_timeout_applies(sqs, uid):
    url = sqs.create_queue(QueueName=uid, Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="q")
    first = receive_n(sqs, url, 1)[0]
    second = receive_n(sqs, url, 1, timeout=15, VisibilityTimeout=30)[0]
    assert second["MessageId"] == first["MessageId"]


def test_change_visibility_to_zero_releases(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="release me")
    m = receive_n(sqs, url, 1, VisibilityTimeout=600)[0]
    receive_none(sqs, url)
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"],
                                  VisibilityTimeout=0)
    again = receive_n(sqs, url, 1, timeout=5,
                      MessageSystemAttributeNames=["ApproximateReceiveCount"])[0]
    assert again["MessageId"] == m["MessageId"]
    assert again["Attributes"]["ApproximateReceiveCount"] == "2"


def test_change_visibility_extends(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="keep")
    m = receive_n(sqs, url, 1, VisibilityTimeout=1)[0]
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"],
                                  VisibilityTimeout=600)
    # Past the original 1 s, a long poll still sees nothing.
    r = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2)
    assert not r.get("Messages"), r["Messages"]
    assert attrs(sqs, url)["ApproximateNumberOfMessagesNotVisible"] == "1"


def test_change_visibility_batch(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    for i in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
    got = receive_n(sqs, url, 3, VisibilityTimeout=600)
    r = sqs.change_message_visibility_batch(QueueUrl=url, Entries=[
        {"Id": f"c{i}", "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
        for i, m in enumerate(got)])
    assert not r.get("Failed")
    assert sorted(e["Id"] for e in r["Successful"]) == ["c0", "c1", "c2"]
    again = receive_n(sqs, url, 3, timeout=5)
    assert sorted(m["Body"] for m in again) == ["m0", "m1", "m2"]


@pytest.mark.differs("elasticmq", "accepts a VisibilityTimeout above 43200 s")
def test_change_visibility_out_of_range(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x")
    m = receive_n(sqs, url, 1, VisibilityTimeout=600)[0]
    expect_error("InvalidParameterValue", sqs.change_message_visibility, QueueUrl=url,
                 ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=50000)


def _receive_in_thread(sqs, url, wait: int):
    out: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            out["r"] = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=wait,
                                           MaxNumberOfMessages=1)
        except Exception as e:  # reported by the test
            out["error"] = e
        out["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_long_poll_woken_by_send(broker, uid):
    receiver = broker.client()
    sender = broker.client()
    url = sender.create_queue(QueueName=uid)["QueueUrl"]
    t, out = _receive_in_thread(receiver, url, 10)
    # The long poll holds while the queue is empty.
    t.join(QUIET_S * 2)
    assert t.is_alive(), f"the long poll returned early: {out}"
    sent_at = time.monotonic()
    sender.send_message(QueueUrl=url, MessageBody="wake up")
    t.join(15)
    assert not t.is_alive()
    assert "error" not in out, out
    assert [m["Body"] for m in out["r"].get("Messages", [])] == ["wake up"]
    # Woken by the send, well before WaitTimeSeconds.
    assert time.monotonic() - sent_at < 3.0, out["elapsed"]
    assert out["elapsed"] < 6.0, out["elapsed"]


def test_long_poll_times_out_empty(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    t0 = time.monotonic()
    r = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2)
    elapsed = time.monotonic() - t0
    assert not r.get("Messages")
    assert 1.5 <= elapsed < 6.0, elapsed


def test_queue_receive_wait_time_is_the_default(broker, uid):
    sqs = broker.client()
    url = sqs.create_queue(QueueName=uid, Attributes={
        "ReceiveMessageWaitTimeSeconds": "10"})["QueueUrl"]
    out: dict = {}

    def run():
        t0 = time.monotonic()
        out["r"] = sqs.receive_message(QueueUrl=url)  # no WaitTimeSeconds: the queue's 10
        out["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(QUIET_S * 2)
    assert t.is_alive(), f"the receive did not long-poll: {out}"
    broker.client().send_message(QueueUrl=url, MessageBody="x")
    t.join(15)
    assert [m["Body"] for m in out["r"]["Messages"]] == ["x"]
    assert out["elapsed"] < 8.0


def test_queue_delay(sqs, uid):
    url = sqs.create_queue(QueueName=uid, Attributes={"DelaySeconds": "2"})["QueueUrl"]
    t0 = time.monotonic()
    sqs.send_message(QueueUrl=url, MessageBody="delayed")
    receive_none(sqs, url)  # test_queues.py checks ApproximateNumberOfMessagesDelayed
    m = receive_n(sqs, url, 1, timeout=15)[0]
    assert m["Body"] == "delayed"
    assert time.monotonic() - t0 >= 1.5


def test_message_delay(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    t0 = time.monotonic()
    sqs.send_message(QueueUrl=url, MessageBody="later", DelaySeconds=2)
    sqs.send_message(QueueUrl=url, MessageBody="now")
    first = receive_n(sqs, url, 1, timeout=5, VisibilityTimeout=60)[0]
    assert first["Body"] == "now"
    second = receive_n(sqs, url, 1, timeout=15)[0]
    assert second["Body"] == "later"
    assert time.monotonic() - t0 >= 1.5


def test_batch_delay_per_entry(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": "late", "MessageBody": "late", "DelaySeconds": 2},
        {"Id": "now", "MessageBody": "now"}])
    first = receive_n(sqs, url, 1, timeout=5, VisibilityTimeout=60)[0]
    assert first["Body"] == "now"
    receive_none(sqs, url)
    assert receive_n(sqs, url, 1, timeout=15)[0]["Body"] == "late"


def test_invalid_receipt_handle(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    e = expect_error("ReceiptHandleIsInvalid", sqs.delete_message, QueueUrl=url,
                     ReceiptHandle="not-a-handle")
    assert isinstance(e, sqs.exceptions.ReceiptHandleIsInvalid)


def test_binary_attribute_roundtrip_base64(sqs, uid):
    # The JSON protocol carries Binary values base64-encoded; boto3 decodes them.
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    blob = bytes(range(256))
    sqs.send_message(QueueUrl=url, MessageBody="bin", MessageAttributes={
        "blob": {"DataType": "Binary", "BinaryValue": blob}})
    m = receive_n(sqs, url, 1, MessageAttributeNames=["blob"])[0]
    assert m["MessageAttributes"]["blob"]["BinaryValue"] == blob


@pytest.mark.parametrize("body", ["\t\n\r plain", "\ud7ff\ue000\ufffd", "\U00010000"])
def test_allowed_characters(sqs, uid, body):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody=body)
    assert receive_n(sqs, url, 1)[0]["Body"] == body


def test_one_message_wakes_one_of_two_long_polls(broker, uid):
    url = broker.client().create_queue(QueueName=uid)["QueueUrl"]
    polls = [_receive_in_thread(broker.client(), url, 10) for _ in range(2)]
    for t, out in polls:
        t.join(QUIET_S)
        assert t.is_alive(), f"a long poll returned early: {out}"
    sender = broker.client()
    sender.send_message(QueueUrl=url, MessageBody="only one")
    # Exactly one poll gets it; a second message then goes to the other.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and all(t.is_alive() for t, _ in polls):
        time.sleep(0.05)
    done = [out for t, out in polls if not t.is_alive()]
    assert len(done) >= 1, "no long poll was woken"
    bodies = [m["Body"] for out in done for m in out.get("r", {}).get("Messages", [])]
    assert bodies == ["only one"], done
    waiting = [(t, out) for t, out in polls if t.is_alive()]
    if waiting:
        sender.send_message(QueueUrl=url, MessageBody="second")
        t, out = waiting[0]
        t.join(10)
        assert not t.is_alive()
        assert [m["Body"] for m in out["r"]["Messages"]] == ["second"]


def test_delete_batch_per_entry_failure(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x")
    m = receive_n(sqs, url, 1, VisibilityTimeout=60)[0]
    r = sqs.delete_message_batch(QueueUrl=url, Entries=[
        {"Id": "good", "ReceiptHandle": m["ReceiptHandle"]},
        {"Id": "bad", "ReceiptHandle": "not-a-receipt-handle"}])
    assert [e["Id"] for e in r["Successful"]] == ["good"]
    assert len(r["Failed"]) == 1
    f = r["Failed"][0]
    assert f["Id"] == "bad"
    assert f["SenderFault"] is True
    assert f["Code"] == "ReceiptHandleIsInvalid"
    assert attrs(sqs, url)["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_system_attributes_on_receive(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x")
    m = receive_n(sqs, url, 1, MessageSystemAttributeNames=["SentTimestamp", "SenderId"])[0]
    assert set(m["Attributes"]) == {"SentTimestamp", "SenderId"}
    assert abs(int(m["Attributes"]["SentTimestamp"]) - time.time() * 1000) < 60_000


@pytest.mark.differs("elasticmq",
                     "leaves MD5OfMessageSystemAttributes out of the SendMessage answer")
def test_aws_trace_header_and_its_md5(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    trace = "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1"
    sent = sqs.send_message(QueueUrl=url, MessageBody="traced", MessageSystemAttributes={
        "AWSTraceHeader": {"DataType": "String", "StringValue": trace}})
    assert sent["MD5OfMessageSystemAttributes"] == md5_of_attributes(
        {"AWSTraceHeader": {"DataType": "String", "StringValue": trace}})
    m = receive_n(sqs, url, 1, MessageSystemAttributeNames=["AWSTraceHeader"])[0]
    assert m["Attributes"]["AWSTraceHeader"] == trace


_EAV = pytest.mark.differs("elasticmq", "answers InvalidAttributeValue, AWS InvalidParameterValue")


@pytest.mark.parametrize("bad", [
    pytest.param({f"a{i}": {"DataType": "String", "StringValue": "v"} for i in range(11)},
                 id="eleven", marks=_EAV),
    pytest.param({"x": {"DataType": "Strange", "StringValue": "v"}}, id="bad-type"),
    pytest.param({"AWS.reserved": {"DataType": "String", "StringValue": "v"}},
                 id="reserved-name",
                 marks=pytest.mark.differs("elasticmq", "accepts the reserved prefix AWS.")),
    pytest.param({"n": {"DataType": "Number", "StringValue": "not a number"}}, id="bad-number",
                 marks=_EAV),
    pytest.param({"e": {"DataType": "String", "StringValue": ""}}, id="empty-value",
                 marks=_EAV),
])
def test_invalid_message_attributes(sqs, uid, bad):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    expect_error("InvalidParameterValue", sqs.send_message, QueueUrl=url, MessageBody="x",
                 MessageAttributes=bad)
    receive_none(sqs, url)


@pytest.mark.differs("elasticmq", "answers InvalidAttributeValue (MessageTooLong), "
                     "AWS BatchRequestTooLong")
def test_batch_total_size_limit(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    # 10 x 110 KiB: each entry fits, the batch (1 MiB at most) does not.
    entries = [{"Id": f"e{i}", "MessageBody": "x" * (110 * 1024)} for i in range(10)]
    e = expect_error(("AWS.SimpleQueueService.BatchRequestTooLong", "BatchRequestTooLong"),
                     sqs.send_message_batch, QueueUrl=url, Entries=entries)
    assert isinstance(e, sqs.exceptions.BatchRequestTooLong)
    receive_none(sqs, url)


def test_one_mib_message(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    body = "y" * (1024 * 1024)
    sent = sqs.send_message(QueueUrl=url, MessageBody=body)
    assert sent["MD5OfMessageBody"] == md5_hex(body)
    m = receive_n(sqs, url, 1)[0]
    assert m["Body"] == body


def test_queue_url_with_another_host(broker, sqs, uid):
    # SDKs configured with AWS's URL forms still name the queue by its path.
    sqs.create_queue(QueueName=uid)
    url = f"https://sqs.us-east-1.amazonaws.com/000000000000/{uid}"
    sqs.send_message(QueueUrl=url, MessageBody="by path")
    assert receive_n(sqs, broker.queue_url(uid), 1)[0]["Body"] == "by path"


def _stale_and_fresh(sqs, url):
    """A message received twice: the first receipt handle (its lease over) and the second."""
    sqs.send_message(QueueUrl=url, MessageBody="twice")
    first = receive_n(sqs, url, 1, VisibilityTimeout=1)[0]
    second = receive_n(sqs, url, 1, timeout=15, VisibilityTimeout=60)[0]
    assert second["MessageId"] == first["MessageId"]
    return first["ReceiptHandle"], second["ReceiptHandle"]


@pytest.mark.differs("elasticmq", "answers ReceiptHandleIsInvalid to a stale receipt handle")
def test_delete_with_a_stale_receipt_handle_deletes_nothing(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    stale, fresh = _stale_and_fresh(sqs, url)
    # SQS: the request succeeds, but only the latest handle deletes the message.
    sqs.delete_message(QueueUrl=url, ReceiptHandle=stale)
    assert attrs(sqs, url)["ApproximateNumberOfMessagesNotVisible"] == "1"
    sqs.delete_message(QueueUrl=url, ReceiptHandle=fresh)
    a = attrs(sqs, url)
    assert a["ApproximateNumberOfMessagesNotVisible"] == "0"
    assert a["ApproximateNumberOfMessages"] == "0"


@pytest.mark.differs("elasticmq", "answers ReceiptHandleIsInvalid, AWS InvalidParameterValue "
                     "(message not available for visibility timeout change)")
def test_change_visibility_with_a_stale_receipt_handle(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    stale, fresh = _stale_and_fresh(sqs, url)
    expect_error("InvalidParameterValue", sqs.change_message_visibility, QueueUrl=url,
                 ReceiptHandle=stale, VisibilityTimeout=0)
    receive_none(sqs, url)  # the fresh lease holds
    sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=fresh, VisibilityTimeout=0)
    assert receive_n(sqs, url, 1)[0]["Body"] == "twice"


def test_message_attribute_names_all_patterns(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x", MessageAttributes=ORDER_ATTRS)
    for names in (["All"], [".*"]):
        m = receive_n(sqs, url, 1, MessageAttributeNames=names, VisibilityTimeout=0)[0]
        assert m["MessageAttributes"] == ORDER_ATTRS, names
