"""A queue chooses its log store backend with the `x-tributary-storage` argument
(docs/storage.md): with an object store configured beside the local log, a queue declared with
`x-tributary-storage: opendal` keeps its messages in the bucket, one without stays on the local
log, both survive kill -9, and a backend the server does not have is refused with 406.
RabbitMQ ignores x-arguments it does not know, so the same declarations work there; what they
choose is Tributary's alone, hence no reference run.
"""

from __future__ import annotations

import pathlib
import signal

import pytest

from amqpcompat import PRECONDITION_FAILED
from amqphelpers import PERSISTENT, channel_error, get_all
from test_restart import reconnect

pytestmark = pytest.mark.tributary_only(reason="Tributary's storage backends")


def _wal_files(bucket: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in bucket.rglob("*") if p.is_file() and "wal" in str(p.relative_to(bucket))]


def test_queues_live_on_the_backend_they_declare(make_tributary, amqp, uid, tmp_path):
    bucket = tmp_path / "bucket"
    d = make_tributary("standalone", config=(
        'storage = "local"\nopendal_ack = "shared"\nopendal_upload_interval_ms = 10\n'
        f'[opendal]\nscheme = "fs"\nroot = "{bucket}"\n'))
    ch = amqp(d.broker()).channel()
    hot, cold = f"{uid}-hot", f"{uid}-cold"
    ch.queue_declare(hot, durable=True)
    ch.queue_declare(cold, durable=True, arguments={"x-tributary-storage": "opendal"})
    ch.confirm_delivery()
    want = [b"m%d" % i for i in range(50)]
    for b in want:
        ch.basic_publish("", hot, b, properties=PERSISTENT)
    assert _wal_files(bucket) == [], "a local queue's messages reached the object store"
    for b in want:
        ch.basic_publish("", cold, b, properties=PERSISTENT)
    assert _wal_files(bucket), "confirmed messages of an opendal queue, but no WAL object"

    # The same declaration again is equivalent; another backend is not (406, as any
    # x-argument that differs).
    ch.queue_declare(cold, durable=True, arguments={"x-tributary-storage": "opendal"})
    with channel_error(PRECONDITION_FAILED):
        ch.queue_declare(cold, durable=True, arguments={"x-tributary-storage": "local"})
    ch = amqp(d.broker()).channel()
    with channel_error(PRECONDITION_FAILED, "not configured"):
        ch.queue_declare(f"{uid}-nowhere", durable=True,
                         arguments={"x-tributary-storage": "hdfs"})

    d.restart_core(signal.SIGKILL)
    ch = reconnect(d, amqp, cold).channel()
    for q in (hot, cold):
        assert [m.body for m in get_all(ch, q)] == want, q
