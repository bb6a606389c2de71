"""Queue management: CreateQueue, GetQueueUrl, ListQueues, DeleteQueue, attributes, tags,
PurgeQueue (boto3, AWS JSON 1.0)."""

from __future__ import annotations

import pytest

from sqscompat import ACCOUNT, attrs, expect_error, receive_n, receive_none, wait_for

# boto3 reports the query protocol's code when the server sends x-amzn-query-error as AWS
# does ("CODE;Sender"), else the JSON error name; test_protocols.py checks the header itself.
NOT_FOUND = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")
ALREADY_EXISTS = ("QueueAlreadyExists", "QueueNameExists")


def test_create_get_url_delete(broker, sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    assert url == broker.queue_url(uid)
    assert url.endswith(f"/{ACCOUNT}/{uid}")
    assert sqs.get_queue_url(QueueName=uid)["QueueUrl"] == url
    a = attrs(sqs, url, "QueueArn")
    assert a["QueueArn"] == broker.queue_arn(uid)
    sqs.delete_queue(QueueUrl=url)
    # Deletion may take a moment to show (AWS: up to 60 s); the queue must go.
    def gone():
        try:
            sqs.get_queue_url(QueueName=uid)
            return False
        except sqs.exceptions.QueueDoesNotExist:
            return True
    wait_for(gone, what="the deleted queue to go")


def test_get_url_of_missing_queue(sqs, uid):
    e = expect_error(NOT_FOUND, sqs.get_queue_url, QueueName=uid + "-missing")
    assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert isinstance(e, sqs.exceptions.QueueDoesNotExist)


def test_create_is_idempotent_with_same_attributes(sqs, uid):
    a = {"VisibilityTimeout": "45", "DelaySeconds": "2"}
    url1 = sqs.create_queue(QueueName=uid, Attributes=a)["QueueUrl"]
    url2 = sqs.create_queue(QueueName=uid, Attributes=a)["QueueUrl"]
    assert url1 == url2
    # No attributes at all is not "different attributes" for a queue with defaults.
    url3 = sqs.create_queue(QueueName=uid + "d")["QueueUrl"]
    assert sqs.create_queue(QueueName=uid + "d")["QueueUrl"] == url3


def test_create_with_different_attributes_is_refused(sqs, uid):
    sqs.create_queue(QueueName=uid, Attributes={"VisibilityTimeout": "45"})
    e = expect_error(ALREADY_EXISTS, sqs.create_queue, QueueName=uid,
                     Attributes={"VisibilityTimeout": "46"})
    assert isinstance(e, sqs.exceptions.QueueNameExists)
    # The queue keeps its attributes.
    url = sqs.get_queue_url(QueueName=uid)["QueueUrl"]
    assert attrs(sqs, url, "VisibilityTimeout")["VisibilityTimeout"] == "45"


def test_list_queues_prefix(broker, sqs, uid):
    names = [f"{uid}-{i}" for i in range(3)]
    for n in names:
        sqs.create_queue(QueueName=n)
    sqs.create_queue(QueueName="other" + uid)
    r = sqs.list_queues(QueueNamePrefix=uid)
    assert sorted(r["QueueUrls"]) == sorted(broker.queue_url(n) for n in names)
    assert broker.queue_url("other" + uid) in sqs.list_queues()["QueueUrls"]
    # A prefix nothing has.
    assert not sqs.list_queues(QueueNamePrefix=uid + "zzz").get("QueueUrls")


@pytest.mark.differs("elasticmq", "ignores MaxResults and never pages ListQueues")
def test_list_queues_pages(broker, sqs, uid):
    names = [f"{uid}-{i}" for i in range(5)]
    for n in names:
        sqs.create_queue(QueueName=n)
    # Pages of 2 with NextToken cover the same five, each once.
    seen: list[str] = []
    token = None
    pages = 0
    while True:
        kw = {"QueueNamePrefix": uid, "MaxResults": 2}
        if token:
            kw["NextToken"] = token
        r = sqs.list_queues(**kw)
        page = r.get("QueueUrls", [])
        assert len(page) <= 2
        seen.extend(page)
        pages += 1
        token = r.get("NextToken")
        if not token:
            break
        assert pages < 10, "NextToken never ends"
    assert sorted(seen) == sorted(broker.queue_url(n) for n in names)
    assert pages >= 3


def test_get_all_attributes_defaults(broker, sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    a = attrs(sqs, url)
    assert a["VisibilityTimeout"] == "30"
    assert a["DelaySeconds"] == "0"
    assert a["ReceiveMessageWaitTimeSeconds"] == "0"
    assert a["ApproximateNumberOfMessages"] == "0"
    assert a["ApproximateNumberOfMessagesNotVisible"] == "0"
    assert a["ApproximateNumberOfMessagesDelayed"] == "0"
    assert a["QueueArn"] == broker.queue_arn(uid)
    assert int(a["CreatedTimestamp"]) > 1_600_000_000
    assert int(a["LastModifiedTimestamp"]) >= int(a["CreatedTimestamp"])
    assert "FifoQueue" not in a


def test_get_single_attributes(sqs, uid):
    url = sqs.create_queue(QueueName=uid, Attributes={"VisibilityTimeout": "17"})["QueueUrl"]
    a = attrs(sqs, url, "VisibilityTimeout", "DelaySeconds")
    assert a == {"VisibilityTimeout": "17", "DelaySeconds": "0"}


def test_set_attributes(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.set_queue_attributes(QueueUrl=url, Attributes={
        "VisibilityTimeout": "99", "DelaySeconds": "3", "ReceiveMessageWaitTimeSeconds": "4"})
    a = attrs(sqs, url)
    assert a["VisibilityTimeout"] == "99"
    assert a["DelaySeconds"] == "3"
    assert a["ReceiveMessageWaitTimeSeconds"] == "4"
    assert int(a["LastModifiedTimestamp"]) >= int(a["CreatedTimestamp"])


@pytest.mark.differs("elasticmq", "ignores MessageRetentionPeriod and MaximumMessageSize "
                     "(logs 'Ignored attribute') and does not list them")
def test_retention_and_maximum_size_attributes(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    a = attrs(sqs, url)
    assert a["MessageRetentionPeriod"] == "345600"
    assert int(a["MaximumMessageSize"]) in (262144, 1048576)  # AWS raised it to 1 MiB in 2025
    sqs.set_queue_attributes(QueueUrl=url, Attributes={
        "MessageRetentionPeriod": "3600", "MaximumMessageSize": "2048"})
    a = attrs(sqs, url, "MessageRetentionPeriod", "MaximumMessageSize")
    assert a == {"MessageRetentionPeriod": "3600", "MaximumMessageSize": "2048"}


def test_approximate_counters_move(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    for i in range(3):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
    wait_for(lambda: attrs(sqs, url)["ApproximateNumberOfMessages"] == "3",
             what="3 visible messages")
    a = attrs(sqs, url)
    assert a["ApproximateNumberOfMessagesNotVisible"] == "0"
    got = receive_n(sqs, url, 2, VisibilityTimeout=60)
    assert len(got) == 2
    a = attrs(sqs, url)
    assert a["ApproximateNumberOfMessages"] == "1"
    assert a["ApproximateNumberOfMessagesNotVisible"] == "2"
    sqs.delete_message(QueueUrl=url, ReceiptHandle=got[0]["ReceiptHandle"])
    a = attrs(sqs, url)
    assert a["ApproximateNumberOfMessagesNotVisible"] == "1"
    assert a["ApproximateNumberOfMessages"] == "1"


def test_approximate_delayed_counter(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="later", DelaySeconds=60)
    sqs.send_message(QueueUrl=url, MessageBody="now")
    wait_for(lambda: attrs(sqs, url)["ApproximateNumberOfMessages"] == "1",
             what="1 visible message")
    a = attrs(sqs, url)
    assert a["ApproximateNumberOfMessagesDelayed"] == "1"
    delayed = sqs.create_queue(QueueName=uid + "-q", Attributes={"DelaySeconds": "60"})[
        "QueueUrl"]
    sqs.send_message(QueueUrl=delayed, MessageBody="x")
    a = attrs(sqs, delayed)
    assert a["ApproximateNumberOfMessagesDelayed"] == "1"
    assert a["ApproximateNumberOfMessages"] == "0"


def test_purge(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    for i in range(5):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
    receive_n(sqs, url, 1, VisibilityTimeout=60)  # one in flight: purged too
    sqs.purge_queue(QueueUrl=url)
    wait_for(lambda: attrs(sqs, url)["ApproximateNumberOfMessages"] == "0",
             what="the purge")
    receive_none(sqs, url)
    # The queue still works after a purge.
    sqs.send_message(QueueUrl=url, MessageBody="after")
    assert receive_n(sqs, url, 1)[0]["Body"] == "after"


def test_tags(sqs, uid):
    url = sqs.create_queue(QueueName=uid, tags={"team": "core", "env": "test"})["QueueUrl"]
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "core", "env": "test"}
    sqs.tag_queue(QueueUrl=url, Tags={"env": "prod", "cost": "42"})
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {
        "team": "core", "env": "prod", "cost": "42"}
    sqs.untag_queue(QueueUrl=url, TagKeys=["team", "cost"])
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"env": "prod"}
    sqs.untag_queue(QueueUrl=url, TagKeys=["env"])
    assert not sqs.list_queue_tags(QueueUrl=url).get("Tags")


def test_operations_on_deleted_queue(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.delete_queue(QueueUrl=url)
    wait_for(lambda: uid not in " ".join(sqs.list_queues(QueueNamePrefix=uid)
                                         .get("QueueUrls", [])), what="the queue to go")
    e = expect_error(NOT_FOUND, sqs.send_message, QueueUrl=url, MessageBody="x")
    assert isinstance(e, sqs.exceptions.QueueDoesNotExist)
    expect_error(NOT_FOUND, sqs.receive_message, QueueUrl=url)
    expect_error(NOT_FOUND, sqs.get_queue_attributes, QueueUrl=url, AttributeNames=["All"])
