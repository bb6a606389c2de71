"""FIFO queues: `.fifo` names, MessageGroupId required, order per group with one group's
messages not handed out while an earlier batch of it is in flight, deduplication by
MessageDeduplicationId and by ContentBasedDeduplication, SequenceNumber."""

from __future__ import annotations

import hashlib
import json

import pytest

from sqscompat import attrs, delete_all, expect_error, receive_n, receive_none


def _fifo(sqs, uid, **attributes) -> str:
    a = {"FifoQueue": "true", **{k: str(v) for k, v in attributes.items()}}
    return sqs.create_queue(QueueName=uid + ".fifo", Attributes=a)["QueueUrl"]


def test_fifo_attributes(sqs, uid):
    url = _fifo(sqs, uid, ContentBasedDeduplication="true")
    a = attrs(sqs, url)
    assert a["FifoQueue"] == "true"
    assert a["ContentBasedDeduplication"] == "true"


def test_fifo_name_needs_suffix(sqs, uid):
    expect_error(("InvalidParameterValue", "InvalidAttributeName", "InvalidAttributeValue"),
                 sqs.create_queue, QueueName=uid, Attributes={"FifoQueue": "true"})


def test_group_id_required(sqs, uid):
    url = _fifo(sqs, uid)
    expect_error("MissingParameter", sqs.send_message, QueueUrl=url, MessageBody="x",
                 MessageDeduplicationId="d1")


def test_dedup_id_required_without_content_based(sqs, uid):
    url = _fifo(sqs, uid)
    expect_error("InvalidParameterValue", sqs.send_message, QueueUrl=url, MessageBody="x",
                 MessageGroupId="g")


def test_order_per_group_and_sequence_numbers(sqs, uid):
    url = _fifo(sqs, uid, ContentBasedDeduplication="true")
    seqs = []
    for i in range(10):
        for g in ("a", "b"):
            r = sqs.send_message(QueueUrl=url, MessageBody=f"{g}{i}", MessageGroupId=g)
            assert r["SequenceNumber"].isdigit()
            seqs.append(int(r["SequenceNumber"]))
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    got = []
    for _ in range(40):
        r = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                MessageSystemAttributeNames=["All"])
        msgs = r.get("Messages", [])
        got.extend(msgs)
        delete_all(sqs, url, msgs)
        if len(got) >= 20:
            break
    assert len(got) == 20
    for g in ("a", "b"):
        mine = [m for m in got if m["Attributes"]["MessageGroupId"] == g]
        assert [m["Body"] for m in mine] == [f"{g}{i}" for i in range(10)]
        nums = [int(m["Attributes"]["SequenceNumber"]) for m in mine]
        assert nums == sorted(nums)
    receive_none(sqs, url)


def test_group_blocked_while_in_flight(sqs, uid):
    url = _fifo(sqs, uid, ContentBasedDeduplication="true")
    for i in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=f"g{i}", MessageGroupId="g")
    sqs.send_message(QueueUrl=url, MessageBody="other", MessageGroupId="h")
    first = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=2,
                                VisibilityTimeout=60)["Messages"][0]
    group = "g" if first["Body"].startswith("g") else "h"
    # While the first message of its group is in flight, nothing else of that group comes.
    r = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                            VisibilityTimeout=60, MessageSystemAttributeNames=["All"])
    for m in r.get("Messages", []):
        assert m["Attributes"]["MessageGroupId"] != group, m
    if group == "g":
        assert first["Body"] == "g0"
    # Once deleted, the group's next message follows.
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"])
    if group == "g":
        nxt = receive_n(sqs, url, 1, VisibilityTimeout=60)[0]
        assert nxt["Body"] == "g1"


def test_failed_message_blocks_then_redelivers_in_order(sqs, uid):
    url = _fifo(sqs, uid, ContentBasedDeduplication="true")
    for i in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}", MessageGroupId="g")
    first = receive_n(sqs, url, 1, VisibilityTimeout=1)[0]
    assert first["Body"] == "m0"
    # Not deleted: after its visibility timeout the same message comes again, before m1.
    again = receive_n(sqs, url, 1, timeout=15, VisibilityTimeout=60,
                      MessageSystemAttributeNames=["ApproximateReceiveCount"])
    assert again[0]["Body"] == "m0"
    assert again[0]["Attributes"]["ApproximateReceiveCount"] == "2"


def test_dedup_by_id(sqs, uid):
    url = _fifo(sqs, uid)
    sqs.send_message(QueueUrl=url, MessageBody="one", MessageGroupId="g",
                     MessageDeduplicationId="same")
    # The duplicate is accepted (no error) and not delivered.
    sqs.send_message(QueueUrl=url, MessageBody="two", MessageGroupId="g",
                     MessageDeduplicationId="same")
    sqs.send_message(QueueUrl=url, MessageBody="three", MessageGroupId="g",
                     MessageDeduplicationId="other")
    got = receive_n(sqs, url, 2, VisibilityTimeout=60)
    assert [m["Body"] for m in got] == ["one", "three"]
    receive_none(sqs, url)


@pytest.mark.differs("tributary", "a deduplicated FIFO send is accepted and dropped, but answered "
                     "with a new MessageId and no SequenceNumber: the core's dedup window keeps "
                     "ids, not the first send's answer (docs/compat/sqs.md)")
def test_duplicate_send_answers_the_original(sqs, uid):
    url = _fifo(sqs, uid)
    r1 = sqs.send_message(QueueUrl=url, MessageBody="one", MessageGroupId="g",
                          MessageDeduplicationId="same")
    r2 = sqs.send_message(QueueUrl=url, MessageBody="two", MessageGroupId="g",
                          MessageDeduplicationId="same")
    # SQS answers a duplicate with the first send's message id and sequence number.
    assert r2["MessageId"] == r1["MessageId"]
    assert r2["SequenceNumber"] == r1["SequenceNumber"]


def test_dedup_content_based(sqs, uid):
    url = _fifo(sqs, uid, ContentBasedDeduplication="true")
    r1 = sqs.send_message(QueueUrl=url, MessageBody="same body", MessageGroupId="g")
    sqs.send_message(QueueUrl=url, MessageBody="same body", MessageGroupId="g")
    sqs.send_message(QueueUrl=url, MessageBody="other body", MessageGroupId="g")
    got = receive_n(sqs, url, 2, VisibilityTimeout=60,
                    MessageSystemAttributeNames=["MessageDeduplicationId"])
    assert [m["Body"] for m in got] == ["same body", "other body"]
    receive_none(sqs, url)
    # The deduplication id is the SHA-256 of the body, hex.
    assert got[0]["Attributes"]["MessageDeduplicationId"] == hashlib.sha256(
        b"same body").hexdigest()
    assert got[0]["MessageId"] == r1["MessageId"]


def test_dedup_after_delete_still_within_window(sqs, uid):
    url = _fifo(sqs, uid)
    sqs.send_message(QueueUrl=url, MessageBody="x", MessageGroupId="g",
                     MessageDeduplicationId="d")
    delete_all(sqs, url, receive_n(sqs, url, 1))
    sqs.send_message(QueueUrl=url, MessageBody="x again", MessageGroupId="g",
                     MessageDeduplicationId="d")
    receive_none(sqs, url)


def test_fifo_batch(sqs, uid):
    url = _fifo(sqs, uid)
    r = sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": f"e{i}", "MessageBody": f"b{i}", "MessageGroupId": "g",
         "MessageDeduplicationId": f"d{i}"} for i in range(5)])
    assert not r.get("Failed")
    assert len(r["Successful"]) == 5
    got = receive_n(sqs, url, 5, VisibilityTimeout=60)
    assert [m["Body"] for m in got] == [f"b{i}" for i in range(5)]


@pytest.mark.differs("elasticmq", "leaves SequenceNumber out of SendMessageBatch results")
def test_fifo_batch_sequence_numbers(sqs, uid):
    url = _fifo(sqs, uid, ContentBasedDeduplication="true")
    r = sqs.send_message_batch(QueueUrl=url, Entries=[
        {"Id": f"e{i}", "MessageBody": f"b{i}", "MessageGroupId": "g"} for i in range(3)])
    nums = [int(e["SequenceNumber"]) for e in sorted(r["Successful"], key=lambda e: e["Id"])]
    assert nums == sorted(nums) and len(set(nums)) == 3


def test_fifo_refuses_per_message_delay(sqs, uid):
    url = _fifo(sqs, uid, ContentBasedDeduplication="true")
    expect_error("InvalidParameterValue", sqs.send_message, QueueUrl=url, MessageBody="x",
                 MessageGroupId="g", DelaySeconds=5)


def test_receive_request_attempt_id(sqs, uid):
    attempt = "attempt-1"
    url = _fifo(sqs, uid, ContentBasedDeduplication="true")
    for i in range(2):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}", MessageGroupId="g")
    a = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=2,
                            ReceiveRequestAttemptId=attempt, VisibilityTimeout=60)
    b = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=2,
                            ReceiveRequestAttemptId=attempt, VisibilityTimeout=60)
    # A retried attempt answers the same messages (with the same receipt handles).
    assert [m["MessageId"] for m in a["Messages"]] == [m["MessageId"] for m in b["Messages"]]
    assert a["Messages"][0]["Body"] == "m0"


def test_fifo_dead_letter_unblocks_the_group(broker, sqs, uid):
    dlq = sqs.create_queue(QueueName=uid + "-dlq.fifo",
                           Attributes={"FifoQueue": "true"})["QueueUrl"]
    policy = json.dumps({"deadLetterTargetArn": broker.queue_arn(uid + "-dlq.fifo"),
                         "maxReceiveCount": "1"})
    url = _fifo(sqs, uid, ContentBasedDeduplication="true", RedrivePolicy=policy)
    sqs.send_message(QueueUrl=url, MessageBody="poison", MessageGroupId="g")
    sqs.send_message(QueueUrl=url, MessageBody="next", MessageGroupId="g")
    first = receive_n(sqs, url, 1, VisibilityTimeout=1)[0]
    assert first["Body"] == "poison"
    # Not deleted: it goes to the DLQ, and the group goes on with the next message.
    nxt = receive_n(sqs, url, 1, timeout=20, VisibilityTimeout=60)[0]
    assert nxt["Body"] == "next"
    dead = receive_n(sqs, dlq, 1, timeout=10)[0]
    assert dead["Body"] == "poison"


@pytest.mark.differs("elasticmq", "accepts a standard dead-letter queue for a FIFO queue")
def test_fifo_dlq_must_be_fifo(broker, sqs, uid):
    sqs.create_queue(QueueName=uid + "-std-dlq")
    policy = json.dumps({"deadLetterTargetArn": broker.queue_arn(uid + "-std-dlq"),
                         "maxReceiveCount": "1"})
    expect_error(("InvalidParameterValue", "InvalidAttributeValue"), sqs.create_queue,
                 QueueName=uid + ".fifo",
                 Attributes={"FifoQueue": "true", "RedrivePolicy": policy})


@pytest.mark.differs("elasticmq", "does not keep DeduplicationScope and FifoThroughputLimit")
def test_fifo_throughput_attributes(sqs, uid):
    url = _fifo(sqs, uid, DeduplicationScope="messageGroup",
                FifoThroughputLimit="perMessageGroupId")
    a = attrs(sqs, url, "DeduplicationScope", "FifoThroughputLimit")
    assert a == {"DeduplicationScope": "messageGroup",
                 "FifoThroughputLimit": "perMessageGroupId"}


@pytest.mark.differs("elasticmq", "deduplicates queue-wide whatever DeduplicationScope says")
def test_dedup_scope_message_group(sqs, uid):
    url = _fifo(sqs, uid, DeduplicationScope="messageGroup",
                FifoThroughputLimit="perMessageGroupId")
    # The same deduplication id in two groups: two messages; again in one group: one.
    sqs.send_message(QueueUrl=url, MessageBody="a", MessageGroupId="g1",
                     MessageDeduplicationId="same")
    sqs.send_message(QueueUrl=url, MessageBody="b", MessageGroupId="g2",
                     MessageDeduplicationId="same")
    sqs.send_message(QueueUrl=url, MessageBody="c", MessageGroupId="g1",
                     MessageDeduplicationId="same")
    got = receive_n(sqs, url, 2, VisibilityTimeout=60)
    assert sorted(m["Body"] for m in got) == ["a", "b"]
    receive_none(sqs, url)
