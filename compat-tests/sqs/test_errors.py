"""Bad input answered with AWS's error codes (boto3 where it sends the request, raw AWS JSON
1.0 requests for what boto3 refuses to send); the server keeps serving afterwards."""

from __future__ import annotations

import pytest

from sqscompat import (
    attrs, expect_error, json_call, json_error_type, receive_n, receive_none,
)


@pytest.mark.differs("elasticmq", "ignores unknown attribute names")
def test_unknown_attribute_name_on_get(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    e = expect_error("InvalidAttributeName", sqs.get_queue_attributes, QueueUrl=url,
                     AttributeNames=["NoSuchAttribute"])
    assert isinstance(e, sqs.exceptions.InvalidAttributeName)


@pytest.mark.differs("elasticmq", "ignores unknown attribute names (creates the queue)")
def test_unknown_attribute_name_on_create(sqs, uid):
    expect_error("InvalidAttributeName", sqs.create_queue, QueueName=uid,
                 Attributes={"NoSuchAttribute": "1"})
    expect_error(("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"),
                 sqs.get_queue_url, QueueName=uid)


@pytest.mark.differs("elasticmq", "accepts VisibilityTimeout 50000 and DelaySeconds 901")
def test_attribute_value_out_of_range(sqs, uid):
    expect_error("InvalidAttributeValue", sqs.create_queue, QueueName=uid,
                 Attributes={"VisibilityTimeout": "50000"})
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    expect_error("InvalidAttributeValue", sqs.set_queue_attributes, QueueUrl=url,
                 Attributes={"DelaySeconds": "901"})
    assert attrs(sqs, url, "DelaySeconds")["DelaySeconds"] == "0"


@pytest.mark.parametrize("name", ["has space", "x" * 81, "dot.notfifo", "sl/ash"])
def test_invalid_queue_name(sqs, name):
    # AWS answers InvalidParameterValue; ElasticMQ InvalidAttributeName. Both refuse.
    expect_error(("InvalidParameterValue", "InvalidAttributeName"), sqs.create_queue,
                 QueueName=name)
    assert not any(u.endswith("/" + name) for u in sqs.list_queues().get("QueueUrls", []))


def test_message_delay_out_of_range(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    expect_error("InvalidParameterValue", sqs.send_message, QueueUrl=url, MessageBody="x",
                 DelaySeconds=901)
    receive_none(sqs, url)


@pytest.mark.differs("elasticmq", "answers InvalidAttributeValue, AWS InvalidParameterValue")
def test_wait_time_out_of_range(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    expect_error("InvalidParameterValue", sqs.receive_message, QueueUrl=url,
                 WaitTimeSeconds=21)


@pytest.mark.differs("elasticmq", "answers InvalidAttributeValue (message InvalidMessageContents)")
def test_invalid_characters_in_body(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    e = expect_error("InvalidMessageContents", sqs.send_message, QueueUrl=url,
                     MessageBody="bad \u0000 byte")
    assert isinstance(e, sqs.exceptions.InvalidMessageContents)
    expect_error("InvalidMessageContents", sqs.send_message, QueueUrl=url,
                 MessageBody="bad \ufffe char")
    receive_none(sqs, url)
    sqs.send_message(QueueUrl=url, MessageBody="good")
    assert receive_n(sqs, url, 1)[0]["Body"] == "good"


@pytest.mark.differs("elasticmq", "answers InvalidAttributeValue, AWS MissingParameter")
def test_empty_body(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    expect_error(("MissingParameter", "InvalidParameterValue"), sqs.send_message,
                 QueueUrl=url, MessageBody="")


@pytest.mark.differs("elasticmq", "answers InvalidAttributeValue (message MessageTooLong), "
                     "AWS InvalidParameterValue")
def test_oversize_message(sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    expect_error("InvalidParameterValue", sqs.send_message, QueueUrl=url,
                 MessageBody="x" * (1024 * 1024 + 1))
    receive_none(sqs, url)


@pytest.mark.differs("elasticmq", "ignores MaximumMessageSize")
def test_message_larger_than_queue_maximum(sqs, uid):
    url = sqs.create_queue(QueueName=uid, Attributes={"MaximumMessageSize": "1024"})[
        "QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="x" * 1024)
    expect_error("InvalidParameterValue", sqs.send_message, QueueUrl=url,
                 MessageBody="x" * 1025)
    assert receive_n(sqs, url, 1)[0]["Body"] == "x" * 1024


@pytest.mark.differs("elasticmq", "answers HTTP 500 (text/plain) to a JSON request without a "
                     "required parameter")
def test_missing_parameter_json(broker, sqs, uid):
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    a = json_call(broker.endpoint, "SendMessage", {"QueueUrl": url})  # no MessageBody
    assert a.status == 400, a
    assert json_error_type(a) == "MissingParameter", a.body
    a = json_call(broker.endpoint, "CreateQueue", {})  # no QueueName
    assert a.status == 400, a
    assert json_error_type(a) == "MissingParameter", a.body


def test_malformed_json(broker):
    a = json_call(broker.endpoint, "ListQueues", b"{not json")
    assert a.status == 400, a
    assert a.json().get("__type"), a.body


def test_unknown_json_action(broker):
    a = json_call(broker.endpoint, "FrobnicateQueue", {})
    assert a.status == 400, a
    assert json_error_type(a) in ("InvalidAction", "UnknownOperationException"), a.body


def test_server_serves_after_bad_input(broker, sqs, uid):
    json_call(broker.endpoint, "SendMessage", b"\xff\xfe garbage")
    json_call(broker.endpoint, "FrobnicateQueue", b"[]")
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="still here")
    assert receive_n(sqs, url, 1)[0]["Body"] == "still here"
