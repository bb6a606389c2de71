"""Dead-letter queues: RedrivePolicy moves a message after maxReceiveCount receives,
ListDeadLetterSourceQueues, and a message move task (StartMessageMoveTask) back to the
source, listed by ListMessageMoveTasks."""

from __future__ import annotations

import json

import pytest

from sqscompat import attrs, expect_error, receive_n, receive_none, wait_for


def _dlq_pair(sqs, broker, uid, max_receives: int = 2):
    dlq = sqs.create_queue(QueueName=uid + "-dlq")["QueueUrl"]
    policy = json.dumps({"deadLetterTargetArn": broker.queue_arn(uid + "-dlq"),
                         "maxReceiveCount": str(max_receives)})
    src = sqs.create_queue(QueueName=uid, Attributes={"RedrivePolicy": policy})["QueueUrl"]
    return src, dlq


def _redrive_to_dlq(sqs, src, dlq, body: str, max_receives: int = 2) -> dict:
    """Receives `body` max_receives times from src (each visibility timeout 1 s running out),
    then waits for it in the DLQ."""
    first = None
    for i in range(max_receives):
        m = receive_n(sqs, src, 1, timeout=15, VisibilityTimeout=1,
                      MessageSystemAttributeNames=["ApproximateReceiveCount"])[0]
        assert m["Body"] == body
        assert m["Attributes"]["ApproximateReceiveCount"] == str(i + 1)
        first = first or m
    # The next receive attempt finds the count exhausted: the message goes to the DLQ.
    dead = None
    deadline_msgs: list = []
    for _ in range(20):
        r = sqs.receive_message(QueueUrl=src, WaitTimeSeconds=1, VisibilityTimeout=1)
        deadline_msgs.extend(r.get("Messages", []))
        d = sqs.receive_message(QueueUrl=dlq, WaitTimeSeconds=1, VisibilityTimeout=30,
                                MessageSystemAttributeNames=["All"])
        if d.get("Messages"):
            dead = d["Messages"][0]
            break
    assert dead is not None, "the message never reached the dead-letter queue"
    assert not deadline_msgs, f"received more than maxReceiveCount times: {deadline_msgs}"
    assert dead["Body"] == body
    assert dead["MessageId"] == first["MessageId"]
    return dead


def test_redrive_after_max_receive_count(broker, sqs, uid):
    src, dlq = _dlq_pair(sqs, broker, uid)
    sqs.send_message(QueueUrl=src, MessageBody="poison")
    _redrive_to_dlq(sqs, src, dlq, "poison")
    receive_none(sqs, src)
    assert attrs(sqs, src)["ApproximateNumberOfMessages"] == "0"
    policy = json.loads(attrs(sqs, src, "RedrivePolicy")["RedrivePolicy"])
    assert policy["deadLetterTargetArn"] == broker.queue_arn(uid + "-dlq")
    assert int(policy["maxReceiveCount"]) == 2


def test_deleted_message_is_not_redriven(broker, sqs, uid):
    src, dlq = _dlq_pair(sqs, broker, uid, max_receives=1)
    sqs.send_message(QueueUrl=src, MessageBody="fine")
    m = receive_n(sqs, src, 1)[0]
    sqs.delete_message(QueueUrl=src, ReceiptHandle=m["ReceiptHandle"])
    r = sqs.receive_message(QueueUrl=dlq, WaitTimeSeconds=1)
    assert not r.get("Messages")


def test_list_dead_letter_source_queues(broker, sqs, uid):
    src, dlq = _dlq_pair(sqs, broker, uid)
    policy = attrs(sqs, src, "RedrivePolicy")["RedrivePolicy"]
    src2 = sqs.create_queue(QueueName=uid + "-b",
                            Attributes={"RedrivePolicy": policy})["QueueUrl"]
    sqs.create_queue(QueueName=uid + "-unrelated")
    r = sqs.list_dead_letter_source_queues(QueueUrl=dlq)
    assert sorted(r["queueUrls"]) == sorted([src, src2])


def test_set_redrive_policy_later(broker, sqs, uid):
    dlq = sqs.create_queue(QueueName=uid + "-dlq")["QueueUrl"]
    src = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.set_queue_attributes(QueueUrl=src, Attributes={"RedrivePolicy": json.dumps({
        "deadLetterTargetArn": broker.queue_arn(uid + "-dlq"), "maxReceiveCount": 1})})
    sqs.send_message(QueueUrl=src, MessageBody="once")
    _redrive_to_dlq(sqs, src, dlq, "once", max_receives=1)


def test_message_move_task_back_to_source(broker, sqs, uid):
    src, dlq = _dlq_pair(sqs, broker, uid, max_receives=1)
    for i in range(3):
        sqs.send_message(QueueUrl=src, MessageBody=f"m{i}")
    got = receive_n(sqs, src, 3, VisibilityTimeout=1)
    assert sorted(m["Body"] for m in got) == ["m0", "m1", "m2"]
    # All three reach the DLQ once their visibility runs out and a receive looks again.
    def in_dlq():
        sqs.receive_message(QueueUrl=src, WaitTimeSeconds=1)
        return attrs(sqs, dlq)["ApproximateNumberOfMessages"] == "3"
    wait_for(in_dlq, timeout=20, what="3 messages in the dead-letter queue")
    dlq_arn = broker.queue_arn(uid + "-dlq")
    task = sqs.start_message_move_task(SourceArn=dlq_arn)
    assert task["TaskHandle"]

    def moved():
        return attrs(sqs, src)["ApproximateNumberOfMessages"] == "3" and \
            attrs(sqs, dlq)["ApproximateNumberOfMessages"] == "0"
    wait_for(moved, timeout=20, what="the move task to bring the 3 messages back")
    back = receive_n(sqs, src, 3, VisibilityTimeout=60)
    assert sorted(m["Body"] for m in back) == ["m0", "m1", "m2"]

    tasks = wait_for(lambda: [t for t in sqs.list_message_move_tasks(
        SourceArn=dlq_arn)["Results"] if t.get("Status") == "COMPLETED"],
        what="a COMPLETED move task")
    t = tasks[0]
    assert t["SourceArn"] == dlq_arn
    assert t["ApproximateNumberOfMessagesMoved"] == 3
    assert t.get("DestinationArn") in (None, broker.queue_arn(uid))


def test_message_move_task_to_explicit_destination(broker, sqs, uid):
    src, dlq = _dlq_pair(sqs, broker, uid, max_receives=1)
    other = sqs.create_queue(QueueName=uid + "-other")["QueueUrl"]
    sqs.send_message(QueueUrl=src, MessageBody="elsewhere")
    dead = _redrive_to_dlq(sqs, src, dlq, "elsewhere", max_receives=1)
    # The DLQ receive above left it in flight for 30 s: release it for the move.
    sqs.change_message_visibility(QueueUrl=dlq, ReceiptHandle=dead["ReceiptHandle"],
                                  VisibilityTimeout=0)
    sqs.start_message_move_task(SourceArn=broker.queue_arn(uid + "-dlq"),
                                DestinationArn=broker.queue_arn(uid + "-other"))
    m = receive_n(sqs, other, 1, timeout=20)[0]
    assert m["Body"] == "elsewhere"
    receive_none(sqs, src)


@pytest.mark.differs("elasticmq", "answers HTTP 500 or 503 without an error code")
def test_move_task_from_a_queue_that_is_no_dlq(broker, sqs, uid):
    sqs.create_queue(QueueName=uid)
    with pytest.raises(sqs.exceptions.ClientError) as ei:
        sqs.start_message_move_task(SourceArn=broker.queue_arn(uid))
    assert ei.value.response["Error"]["Code"] in (
        "InvalidParameterValue", "UnsupportedOperation", "ResourceNotFoundException")


def test_redrive_policy_to_missing_queue(broker, sqs, uid):
    policy = json.dumps({"deadLetterTargetArn": broker.queue_arn(uid + "-nowhere"),
                         "maxReceiveCount": "3"})
    expect_error(("InvalidParameterValue", "AWS.SimpleQueueService.NonExistentQueue",
                  "QueueDoesNotExist"),
                 sqs.create_queue, QueueName=uid, Attributes={"RedrivePolicy": policy})


@pytest.mark.differs("elasticmq", "does not keep RedriveAllowPolicy")
def test_redrive_allow_policy(broker, sqs, uid):
    allow = {"redrivePermission": "byQueue", "sourceQueueArns": [broker.queue_arn(uid + "-src")]}
    url = sqs.create_queue(QueueName=uid, Attributes={
        "RedriveAllowPolicy": json.dumps(allow)})["QueueUrl"]
    got = json.loads(attrs(sqs, url, "RedriveAllowPolicy")["RedriveAllowPolicy"])
    assert got == allow


def test_dead_letter_source_arn_attribute(broker, sqs, uid):
    src, dlq = _dlq_pair(sqs, broker, uid, max_receives=1)
    sqs.send_message(QueueUrl=src, MessageBody="marked")
    dead = _redrive_to_dlq(sqs, src, dlq, "marked", max_receives=1)
    assert dead["Attributes"]["DeadLetterQueueSourceArn"] == broker.queue_arn(uid)


@pytest.mark.differs("elasticmq", "forgets a cancelled task: ListMessageMoveTasks lists nothing")
def test_cancel_message_move_task(broker, sqs, uid):
    src, dlq = _dlq_pair(sqs, broker, uid, max_receives=1)
    sqs.send_message_batch(QueueUrl=src, Entries=[
        {"Id": f"e{i}", "MessageBody": f"m{i}"} for i in range(10)])
    receive_n(sqs, src, 10, VisibilityTimeout=1)

    def in_dlq():
        sqs.receive_message(QueueUrl=src, WaitTimeSeconds=1)
        return attrs(sqs, dlq)["ApproximateNumberOfMessages"] == "10"
    wait_for(in_dlq, timeout=20, what="10 messages in the dead-letter queue")
    dlq_arn = broker.queue_arn(uid + "-dlq")
    handle = sqs.start_message_move_task(SourceArn=dlq_arn,
                                         MaxNumberOfMessagesPerSecond=1)["TaskHandle"]
    r = sqs.cancel_message_move_task(TaskHandle=handle)
    assert r["ApproximateNumberOfMessagesMoved"] < 10
    task = wait_for(lambda: [t for t in sqs.list_message_move_tasks(SourceArn=dlq_arn)[
        "Results"] if t.get("Status") in ("CANCELLED", "CANCELLING")], what="a cancelled task")
    assert task[0]["ApproximateNumberOfMessagesMoved"] < 10
    # What was not moved is still in the DLQ.
    wait_for(lambda: [t for t in sqs.list_message_move_tasks(SourceArn=dlq_arn)["Results"]
                      if t.get("Status") == "CANCELLED"], what="the task CANCELLED")
    a = int(attrs(sqs, dlq)["ApproximateNumberOfMessages"])
    b = int(attrs(sqs, src)["ApproximateNumberOfMessages"])
    assert a > 0 and a + b == 10
