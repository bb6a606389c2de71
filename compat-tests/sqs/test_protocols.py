"""The two wire protocols by hand: the query protocol (form POST, `Action=...&Version=
2012-11-05`, XML answers and the XML ErrorResponse) that older SDKs and scripts send, and the
error shape of AWS JSON 1.0 (`__type` and the `x-amzn-query-error` header the SDKs read)."""

from __future__ import annotations

import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET

import pytest

from sqscompat import (
    json_call, json_error_type, md5_hex, md5_of_attributes, query, receive_n, xml_error,
)


def _text(root, path: str) -> str:
    v = root.findtext(path)
    assert v is not None, f"{path} missing in the answer"
    return v


def test_query_queue_lifecycle(broker, uid):
    a = query(broker.endpoint, "CreateQueue", {
        "QueueName": uid, "Attribute.1.Name": "VisibilityTimeout",
        "Attribute.1.Value": "40"})
    assert a.status == 200, a
    root = a.xml()
    assert root.tag == "CreateQueueResponse"
    url = _text(root, "CreateQueueResult/QueueUrl")
    assert url == broker.queue_url(uid)
    assert root.findtext("ResponseMetadata/RequestId")

    a = query(broker.endpoint, "GetQueueUrl", {"QueueName": uid})
    assert a.status == 200, a
    assert _text(a.xml(), "GetQueueUrlResult/QueueUrl") == url

    a = query(broker.endpoint, "ListQueues", {"QueueNamePrefix": uid})
    assert a.status == 200, a
    assert [e.text for e in a.xml().findall("ListQueuesResult/QueueUrl")] == [url]

    a = query(broker.endpoint, "GetQueueAttributes", {
        "QueueUrl": url, "AttributeName.1": "VisibilityTimeout", "AttributeName.2": "QueueArn"})
    assert a.status == 200, a
    got = {e.findtext("Name"): e.findtext("Value")
           for e in a.xml().findall("GetQueueAttributesResult/Attribute")}
    assert got == {"VisibilityTimeout": "40", "QueueArn": broker.queue_arn(uid)}

    a = query(broker.endpoint, "SetQueueAttributes", {
        "QueueUrl": url, "Attribute.1.Name": "DelaySeconds", "Attribute.1.Value": "1"})
    assert a.status == 200, a
    assert a.xml().find(".//RequestId") is not None, a.body

    a = query(broker.endpoint, "DeleteQueue", {"QueueUrl": url})
    assert a.status == 200, a
    assert a.xml().find(".//RequestId") is not None, a.body


@pytest.mark.differs("elasticmq", "answers actions without a result in a <wrapper name=...> "
                     "element instead of <ActionResponse>")
def test_query_empty_answers_are_named(broker, uid):
    url = broker.client().create_queue(QueueName=uid)["QueueUrl"]
    a = query(broker.endpoint, "SetQueueAttributes", {
        "QueueUrl": url, "Attribute.1.Name": "DelaySeconds", "Attribute.1.Value": "1"})
    assert a.status == 200, a
    assert a.xml().tag == "SetQueueAttributesResponse"
    assert a.xml().findtext("ResponseMetadata/RequestId")
    a = query(broker.endpoint, "PurgeQueue", {"QueueUrl": url})
    assert a.status == 200, a
    assert a.xml().tag == "PurgeQueueResponse"
    a = query(broker.endpoint, "DeleteQueue", {"QueueUrl": url})
    assert a.status == 200, a
    assert a.xml().tag == "DeleteQueueResponse"


def test_query_send_receive_delete(broker, uid):
    url = broker.client().create_queue(QueueName=uid)["QueueUrl"]
    body = "query <body> & \u00e9"
    mattrs = {
        "s": {"DataType": "String", "StringValue": "v"},
        "n": {"DataType": "Number", "StringValue": "7"},
        "b": {"DataType": "Binary", "BinaryValue": b"\x01\x02"},
    }
    a = query(broker.endpoint, "SendMessage", {
        "QueueUrl": url, "MessageBody": body,
        "MessageAttribute.1.Name": "s", "MessageAttribute.1.Value.DataType": "String",
        "MessageAttribute.1.Value.StringValue": "v",
        "MessageAttribute.2.Name": "n", "MessageAttribute.2.Value.DataType": "Number",
        "MessageAttribute.2.Value.StringValue": "7",
        "MessageAttribute.3.Name": "b", "MessageAttribute.3.Value.DataType": "Binary",
        "MessageAttribute.3.Value.BinaryValue": "AQI=",
    })
    assert a.status == 200, a
    r = a.xml().find("SendMessageResult")
    assert r.findtext("MD5OfMessageBody") == md5_hex(body)
    assert r.findtext("MD5OfMessageAttributes") == md5_of_attributes(mattrs)
    msg_id = _text(r, "MessageId")

    a = query(broker.endpoint, "ReceiveMessage", {
        "QueueUrl": url, "WaitTimeSeconds": "5", "MaxNumberOfMessages": "1",
        "AttributeName.1": "All", "MessageAttributeName.1": "All"})
    assert a.status == 200, a
    msgs = a.xml().findall("ReceiveMessageResult/Message")
    assert len(msgs) == 1
    m = msgs[0]
    assert m.findtext("Body") == body
    assert m.findtext("MessageId") == msg_id
    assert m.findtext("MD5OfBody") == md5_hex(body)
    assert m.findtext("MD5OfMessageAttributes") == md5_of_attributes(mattrs)
    sys_attrs = {e.findtext("Name"): e.findtext("Value") for e in m.findall("Attribute")}
    assert sys_attrs["ApproximateReceiveCount"] == "1"
    user = {e.findtext("Name"): e.find("Value") for e in m.findall("MessageAttribute")}
    assert user["b"].findtext("BinaryValue") == "AQI="
    assert user["n"].findtext("DataType") == "Number"
    assert user["s"].findtext("StringValue") == "v"

    a = query(broker.endpoint, "DeleteMessage", {
        "QueueUrl": url, "ReceiptHandle": _text(m, "ReceiptHandle")})
    assert a.status == 200, a
    a = query(broker.endpoint, "ReceiveMessage", {"QueueUrl": url})
    assert a.xml().findall("ReceiveMessageResult/Message") == []


def test_query_to_queue_url_path(broker, uid):
    # Older SDKs post to the queue URL itself and leave QueueUrl out.
    url = broker.client().create_queue(QueueName=uid)["QueueUrl"]
    a = query(url, "SendMessage", {"MessageBody": "by path"})
    assert a.status == 200, a
    got = receive_n(broker.client(), url, 1)
    assert got[0]["Body"] == "by path"


def test_query_batch(broker, uid):
    url = broker.client().create_queue(QueueName=uid)["QueueUrl"]
    a = query(broker.endpoint, "SendMessageBatch", {
        "QueueUrl": url,
        "SendMessageBatchRequestEntry.1.Id": "one",
        "SendMessageBatchRequestEntry.1.MessageBody": "first",
        "SendMessageBatchRequestEntry.2.Id": "two",
        "SendMessageBatchRequestEntry.2.MessageBody": "second",
    })
    assert a.status == 200, a
    ok = a.xml().findall("SendMessageBatchResult/SendMessageBatchResultEntry")
    assert sorted(e.findtext("Id") for e in ok) == ["one", "two"]
    for e in ok:
        assert e.findtext("MD5OfMessageBody") == md5_hex(
            "first" if e.findtext("Id") == "one" else "second")
    got = receive_n(broker.client(), url, 2)
    assert sorted(m["Body"] for m in got) == ["first", "second"]


def test_query_error_nonexistent_queue(broker, uid):
    a = query(broker.endpoint, "GetQueueUrl", {"QueueName": uid + "-missing"})
    assert a.status == 400, a
    assert xml_error(a)[1] == "AWS.SimpleQueueService.NonExistentQueue"
    assert a.xml().findtext("RequestId") or a.xml().findtext("ResponseMetadata/RequestId")
    assert a.xml().findtext("Error/Message")


@pytest.mark.differs("elasticmq", "puts the JSON error name (com.amazonaws.sqs#...) in <Type>, "
                     "AWS Sender or Receiver")
def test_query_error_type(broker, uid):
    a = query(broker.endpoint, "GetQueueUrl", {"QueueName": uid + "-missing"})
    assert xml_error(a) == ("Sender", "AWS.SimpleQueueService.NonExistentQueue")
    a = query(broker.endpoint, "FrobnicateQueue", {})
    assert xml_error(a) == ("Sender", "InvalidAction")


def test_query_error_already_exists(broker, uid):
    query(broker.endpoint, "CreateQueue", {
        "QueueName": uid, "Attribute.1.Name": "DelaySeconds", "Attribute.1.Value": "1"})
    a = query(broker.endpoint, "CreateQueue", {
        "QueueName": uid, "Attribute.1.Name": "DelaySeconds", "Attribute.1.Value": "2"})
    assert a.status == 400, a
    assert xml_error(a)[1] == "QueueAlreadyExists"


def test_query_missing_parameter(broker, uid):
    url = broker.client().create_queue(QueueName=uid)["QueueUrl"]
    a = query(broker.endpoint, "SendMessage", {"QueueUrl": url})
    assert a.status == 400, a
    assert xml_error(a)[1] == "MissingParameter"


def test_query_unknown_action(broker):
    a = query(broker.endpoint, "FrobnicateQueue", {})
    assert a.status == 400, a
    assert xml_error(a)[1] == "InvalidAction"


def test_json_error_shape(broker, uid):
    a = json_call(broker.endpoint, "GetQueueUrl", {"QueueName": uid + "-missing"})
    assert a.status == 400, a
    assert json_error_type(a) == "QueueDoesNotExist", a.body
    assert a.json().get("message") or a.json().get("Message"), a.body


QUERY_ERROR_HEADER = ("sends x-amzn-query-error as the JSON error name (com.amazonaws.sqs#...), "
                      "not AWS's 'QUERY-CODE;Sender', so boto3 reports other codes than AWS's")


@pytest.mark.differs("elasticmq", QUERY_ERROR_HEADER)
def test_json_query_error_header(broker, uid):
    a = json_call(broker.endpoint, "GetQueueUrl", {"QueueName": uid + "-missing"})
    assert a.status == 400, a
    # The header the SDKs use to report the query protocol's code (awsQueryCompatible).
    assert a.headers.get("x-amzn-query-error") == \
        "AWS.SimpleQueueService.NonExistentQueue;Sender", a.headers


@pytest.mark.differs("elasticmq", QUERY_ERROR_HEADER)
def test_json_error_shape_already_exists(broker, uid):
    json_call(broker.endpoint, "CreateQueue", {"QueueName": uid,
                                               "Attributes": {"DelaySeconds": "1"}})
    a = json_call(broker.endpoint, "CreateQueue", {"QueueName": uid,
                                                   "Attributes": {"DelaySeconds": "2"}})
    assert a.status == 400, a
    assert json_error_type(a) == "QueueNameExists", a.body
    assert a.headers.get("x-amzn-query-error") == "QueueAlreadyExists;Sender", a.headers


@pytest.mark.differs("elasticmq", "answers Content-Type application/json")
@pytest.mark.parametrize("action", ["ListQueues", "GetQueueUrl"])
def test_json_content_type(broker, uid, action):
    body = {"QueueName": uid} if action == "GetQueueUrl" else {}
    if action == "GetQueueUrl":
        broker.client().create_queue(QueueName=uid)
    a = json_call(broker.endpoint, action, body)
    assert a.status == 200, a
    assert isinstance(a.json(), dict)
    assert a.headers["content-type"].startswith("application/x-amz-json-1.0"), a.headers
    a = json_call(broker.endpoint, "GetQueueUrl", {"QueueName": uid + "-missing"})
    assert a.status == 400, a
    assert a.headers["content-type"].startswith("application/x-amz-json-1.0"), a.headers


def test_query_batch_delete_and_visibility_with_entry_errors(broker, uid):
    sqs = broker.client()
    url = sqs.create_queue(QueueName=uid)["QueueUrl"]
    for i in range(2):
        sqs.send_message(QueueUrl=url, MessageBody=f"m{i}")
    got = receive_n(sqs, url, 2, VisibilityTimeout=600)
    a = query(broker.endpoint, "ChangeMessageVisibilityBatch", {
        "QueueUrl": url,
        "ChangeMessageVisibilityBatchRequestEntry.1.Id": "c1",
        "ChangeMessageVisibilityBatchRequestEntry.1.ReceiptHandle": got[0]["ReceiptHandle"],
        "ChangeMessageVisibilityBatchRequestEntry.1.VisibilityTimeout": "0",
    })
    assert a.status == 200, a
    ok = a.xml().findall(
        "ChangeMessageVisibilityBatchResult/ChangeMessageVisibilityBatchResultEntry")
    assert [e.findtext("Id") for e in ok] == ["c1"]
    again = receive_n(sqs, url, 1, VisibilityTimeout=600)[0]
    assert again["MessageId"] == got[0]["MessageId"]
    a = query(broker.endpoint, "DeleteMessageBatch", {
        "QueueUrl": url,
        "DeleteMessageBatchRequestEntry.1.Id": "d1",
        "DeleteMessageBatchRequestEntry.1.ReceiptHandle": again["ReceiptHandle"],
        "DeleteMessageBatchRequestEntry.2.Id": "d2",
        "DeleteMessageBatchRequestEntry.2.ReceiptHandle": got[1]["ReceiptHandle"],
        "DeleteMessageBatchRequestEntry.3.Id": "bad",
        "DeleteMessageBatchRequestEntry.3.ReceiptHandle": "not-a-receipt-handle",
    })
    assert a.status == 200, a
    root = a.xml()
    ok = root.findall("DeleteMessageBatchResult/DeleteMessageBatchResultEntry")
    assert sorted(e.findtext("Id") for e in ok) == ["d1", "d2"]
    failed = root.findall("DeleteMessageBatchResult/BatchResultErrorEntry")
    assert [e.findtext("Id") for e in failed] == ["bad"]
    assert failed[0].findtext("Code") == "ReceiptHandleIsInvalid"
    assert failed[0].findtext("SenderFault") == "true"
    a = query(broker.endpoint, "GetQueueAttributes", {
        "QueueUrl": url, "AttributeName.1": "All"})
    got_attrs = {e.findtext("Name"): e.findtext("Value")
                 for e in a.xml().findall("GetQueueAttributesResult/Attribute")}
    assert got_attrs["ApproximateNumberOfMessages"] == "0"
    assert got_attrs["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_query_tags(broker, uid):
    url = broker.client().create_queue(QueueName=uid)["QueueUrl"]
    a = query(broker.endpoint, "TagQueue", {"QueueUrl": url, "Tag.1.Key": "team",
                                            "Tag.1.Value": "core"})
    assert a.status == 200, a
    a = query(broker.endpoint, "ListQueueTags", {"QueueUrl": url})
    assert a.status == 200, a
    tags = {e.findtext("Key"): e.findtext("Value")
            for e in a.xml().findall("ListQueueTagsResult/Tag")}
    assert tags == {"team": "core"}


def test_query_get_request(broker, uid):
    # The query protocol over GET, parameters in the query string.
    broker.client().create_queue(QueueName=uid)
    url = broker.endpoint + "/?" + urllib.parse.urlencode(
        {"Action": "GetQueueUrl", "Version": "2012-11-05", "QueueName": uid})
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        root = ET.fromstring(r.read())
    for el in root.iter():
        el.tag = el.tag.split("}", 1)[-1]
    assert root.findtext("GetQueueUrlResult/QueueUrl") == broker.queue_url(uid)
