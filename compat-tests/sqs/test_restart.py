"""Tributary only: kill -9 of the process holding the data (standalone, and the core of a
split deployment) with messages sent and some in flight; after a restart on the same data
directory every message sent and not deleted is received again (the in-flight ones once
their visibility timeout ran out), and a deleted one never. Plus long polling and receipt
handles across two SQS gateways on one core."""

from __future__ import annotations

import threading
import time

import pytest

from sqscompat import QUIET_S, attrs, receive_n, receive_none, wait_for

pytestmark = pytest.mark.tributary_only("kill -9 and split deployments are Tributary's")


def _client_when_up(broker):
    sqs = broker.client()

    def up():
        try:
            sqs.list_queues()
            return True
        except Exception:
            return False
    wait_for(up, timeout=30, what="the SQS gateway to serve again")
    return sqs


@pytest.mark.parametrize("mode", ["standalone", "split"])
def test_kill9_keeps_sent_messages(make_tributary, uid, mode):
    d = make_tributary(mode)
    sqs = d.broker().client()
    url = sqs.create_queue(QueueName=uid, Attributes={"VisibilityTimeout": "45"})["QueueUrl"]
    fifo = sqs.create_queue(QueueName=uid + ".fifo", Attributes={
        "FifoQueue": "true", "ContentBasedDeduplication": "true"})["QueueUrl"]
    bodies = [f"m{i:02d}" for i in range(20)]
    for b in bodies:
        sqs.send_message(QueueUrl=url, MessageBody=b)
    for i in range(5):
        sqs.send_message(QueueUrl=fifo, MessageBody=f"f{i}", MessageGroupId="g")
    # 8 received: 4 deleted (gone for good), 4 left in flight for 4 s.
    got = receive_n(sqs, url, 8, VisibilityTimeout=4)
    deleted = {m["Body"] for m in got[:4]}
    for m in got[:4]:
        sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    in_flight = {m["Body"] for m in got[4:]}
    assert len(deleted) == 4 and len(in_flight) == 4

    d.restart_core()
    sqs = _client_when_up(d.broker())
    assert sqs.get_queue_url(QueueName=uid)["QueueUrl"].endswith(f"/{uid}")
    url = sqs.get_queue_url(QueueName=uid)["QueueUrl"]
    fifo = sqs.get_queue_url(QueueName=uid + ".fifo")["QueueUrl"]
    assert attrs(sqs, url, "VisibilityTimeout")["VisibilityTimeout"] == "45"

    after = receive_n(sqs, url, 16, timeout=30, VisibilityTimeout=60)
    seen = [m["Body"] for m in after]
    assert sorted(seen) == sorted(set(bodies) - deleted), seen
    assert in_flight <= set(seen)
    for m in after:
        sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
    receive_none(sqs, url)
    # FIFO order survives too.
    f = receive_n(sqs, fifo, 5, VisibilityTimeout=60)
    assert [m["Body"] for m in f] == [f"f{i}" for i in range(5)]


def test_kill9_keeps_dedup_and_delays(make_tributary, uid):
    d = make_tributary("standalone")
    sqs = d.broker().client()
    fifo = sqs.create_queue(QueueName=uid + ".fifo",
                            Attributes={"FifoQueue": "true"})["QueueUrl"]
    sqs.send_message(QueueUrl=fifo, MessageBody="once", MessageGroupId="g",
                     MessageDeduplicationId="d1")
    std = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message(QueueUrl=std, MessageBody="delayed", DelaySeconds=3)
    d.restart_core()
    sqs = _client_when_up(d.broker())
    fifo = sqs.get_queue_url(QueueName=uid + ".fifo")["QueueUrl"]
    std = sqs.get_queue_url(QueueName=uid)["QueueUrl"]
    # The dedup window outlives the crash.
    sqs.send_message(QueueUrl=fifo, MessageBody="once", MessageGroupId="g",
                     MessageDeduplicationId="d1")
    got = receive_n(sqs, fifo, 1, VisibilityTimeout=60)
    assert [m["Body"] for m in got] == ["once"]
    receive_none(sqs, fifo)
    assert receive_n(sqs, std, 1, timeout=20)[0]["Body"] == "delayed"


def test_long_poll_across_two_gateways(make_tributary, uid):
    d = make_tributary("split-2gw")
    a = d.broker(0).client()
    b = d.broker(1).client()
    a.create_queue(QueueName=uid)
    url_a = a.get_queue_url(QueueName=uid)["QueueUrl"]
    url_b = b.get_queue_url(QueueName=uid)["QueueUrl"]
    assert url_b == d.broker(1).queue_url(uid)
    out: dict = {}

    def poll():
        t0 = time.monotonic()
        try:
            out["r"] = a.receive_message(QueueUrl=url_a, WaitTimeSeconds=15,
                                         MaxNumberOfMessages=1)
        except Exception as e:
            out["error"] = e
        out["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    t.join(QUIET_S * 2)
    assert t.is_alive(), f"the long poll returned early: {out}"
    sent = time.monotonic()
    b.send_message(QueueUrl=url_b, MessageBody="via the other gateway")
    t.join(20)
    assert not t.is_alive()
    assert "error" not in out, out
    assert [m["Body"] for m in out["r"].get("Messages", [])] == ["via the other gateway"]
    assert time.monotonic() - sent < 3.0, out["elapsed"]
    # The receipt handle from gateway 0 works through gateway 1.
    b.delete_message(QueueUrl=url_b, ReceiptHandle=out["r"]["Messages"][0]["ReceiptHandle"])
    assert attrs(a, url_a)["ApproximateNumberOfMessagesNotVisible"] == "0"
    receive_none(a, url_a)


def test_visibility_across_two_gateways(make_tributary, uid):
    d = make_tributary("split-2gw")
    a = d.broker(0).client()
    b = d.broker(1).client()
    url_a = a.create_queue(QueueName=uid)["QueueUrl"]
    url_b = b.get_queue_url(QueueName=uid)["QueueUrl"]
    a.send_message(QueueUrl=url_a, MessageBody="one")
    m = receive_n(a, url_a, 1, VisibilityTimeout=60)[0]
    receive_none(b, url_b)  # in flight through gateway 0: invisible through gateway 1
    b.change_message_visibility(QueueUrl=url_b, ReceiptHandle=m["ReceiptHandle"],
                                VisibilityTimeout=0)
    again = receive_n(b, url_b, 1)[0]
    assert again["MessageId"] == m["MessageId"]
