"""Issue 17: a store lost during operation, with boto3 sending to a standard queue
continuously (SendMessage, several requests in flight on worker threads, no retries in the
client, so each request's own answer is what counts).

The log is on S3 (through a proxy the test cuts: connections refused, or a black hole) with
opendal_ack = shared, the metadata on etcd (SIGSTOP, or kill -9 and a restart). Each outage
lasts 15 s. Checked: nothing sent during an S3 cut is answered with a MessageId before S3
returns; a send that could not be stored is answered with a server error (5xx, which the SDKs
retry) or times out, never left hanging and never a 4xx that tells the client its request was
wrong; after the store returns, new sends are answered with a MessageId by the same server
process; every acknowledged message is received afterwards (a standard queue promises at
least once: duplicates are allowed and counted).

Run by `scripts/test-stores.sh store_loss`; skipped without its storage snippet.
"""

from __future__ import annotations

import pytest

from sqs_producer import Boto3Producer, receive_all
from store_loss import OUTAGES, check_outcome, report_file, run_outage, store_loss  # noqa: F401

pytestmark = [pytest.mark.tributary_only(reason="the stores under Tributary are cut"),
              pytest.mark.timeout(300)]

# Requests in flight at once (one worker thread and pooled connection each).
WORKERS = 8
# Longer than the server's 10 s limit on an append, so a send cut off by the store is
# answered by the server rather than by this timeout (a timeout counts as a failure too).
READ_TIMEOUT_S = 30.0


@pytest.mark.parametrize("outage", OUTAGES)
def test_store_loss(store_loss, make_tributary, uid, outage):  # noqa: F811
    d = make_tributary("standalone")
    server = d.processes[0]
    pid = server.proc.pid
    broker = d.broker()
    url = broker.client().create_queue(QueueName=f"{uid}-q")["QueueUrl"]
    p = Boto3Producer(broker.client(read_timeout=READ_TIMEOUT_S), url, WORKERS)
    try:
        o = run_outage(p, store_loss, outage, alive=lambda: server.alive())
    finally:
        p.close()
    assert server.alive() and server.proc.pid == pid, "the server was restarted"
    consumed = receive_all(broker.client(), url, set(o.acked_ids))
    check_outcome("sqs (boto3)", o, consumed, "s3", report_file())
    # A send the server could not store is its fault (5xx) or unanswered (the client's
    # timeout); a 4xx would tell the client not to retry a request that was fine.
    wrong = {k for k in o.errors if not (k.startswith("http 5") or k.startswith("client: "))}
    assert not wrong, f"sends refused with a client error: {wrong}: {o.summary()}"
    if outage.startswith("s3-"):
        # The server answers with an error (not only the client's own timeouts).
        told = {k for k in o.errors_in_cut if k.startswith("http 5")}
        assert told, f"no 5xx answer during the cut: {o.summary()}"
