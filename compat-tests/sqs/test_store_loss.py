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

import concurrent.futures
import time

import botocore.exceptions
import pytest

from store_loss import OUTAGES, Producer, check_outcome, report_file, run_outage, store_loss  # noqa: F401

pytestmark = [pytest.mark.tributary_only(reason="the stores under Tributary are cut"),
              pytest.mark.timeout(300)]

# Requests in flight at once (one worker thread and pooled connection each).
WORKERS = 8
# Longer than the server's 10 s limit on an append, so a send cut off by the store is
# answered by the server rather than by this timeout (a timeout counts as a failure too).
READ_TIMEOUT_S = 30.0


def _failure(e: BaseException) -> str:
    """How a failed SendMessage is reported: `http STATUS CODE` for an answer, else the
    client's own error (timeout, connection)."""
    if isinstance(e, botocore.exceptions.ClientError):
        r = e.response
        return f"http {r['ResponseMetadata'].get('HTTPStatusCode')} {r['Error'].get('Code')}"
    return f"client: {type(e).__name__}"


class Boto3Producer(Producer):
    """SendMessage calls on a pool of WORKERS threads sharing one boto3 client; `send` only
    starts one when a worker is free (False otherwise), `service` collects the answers."""

    def __init__(self, broker, url: str):
        super().__init__()
        self.url = url
        self.client = broker.client(read_timeout=READ_TIMEOUT_S)
        self.pool = concurrent.futures.ThreadPoolExecutor(WORKERS)
        self.pending: dict[concurrent.futures.Future, int] = {}

    def send(self, i: int) -> bool:
        if len(self.pending) >= WORKERS:
            return False
        f = self.pool.submit(self.client.send_message, QueueUrl=self.url, MessageBody=f"id-{i}")
        self.pending[f] = i
        return True

    def service(self, secs: float):
        if not self.pending:
            time.sleep(secs)
            return
        done, _ = concurrent.futures.wait(self.pending, timeout=secs,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        for f in done:
            i = self.pending.pop(f)
            e = f.exception()
            if e is None:
                assert f.result().get("MessageId"), f"no MessageId for id {i}: {f.result()}"
                self.acked_now(i)
            else:
                self.gave_up(i, _failure(e))

    def in_flight(self) -> int:
        return len(self.pending)

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def _receive_all(client, url: str, want: set[int], deadline_s: float = 60.0) -> list[int]:
    """Every id in the queue, duplicates included: receives (hiding what it got for longer
    than the test runs) until all of `want` came and a receive came back empty, or nothing
    new came for 10 s, or the deadline."""
    got: list[int] = []
    end = time.monotonic() + deadline_s
    last_new = time.monotonic()
    while time.monotonic() < end and time.monotonic() - last_new < 10:
        r = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                   VisibilityTimeout=600)
        msgs = r.get("Messages", [])
        if not msgs and want <= set(got):
            break
        if msgs:
            last_new = time.monotonic()
        got.extend(int(m["Body"][3:]) for m in msgs)
    return got


@pytest.mark.parametrize("outage", OUTAGES)
def test_store_loss(store_loss, make_tributary, uid, outage):  # noqa: F811
    d = make_tributary("standalone")
    server = d.processes[0]
    pid = server.proc.pid
    broker = d.broker()
    url = broker.client().create_queue(QueueName=f"{uid}-q")["QueueUrl"]
    p = Boto3Producer(broker, url)
    try:
        o = run_outage(p, store_loss, outage, alive=lambda: server.alive())
    finally:
        p.close()
    assert server.alive() and server.proc.pid == pid, "the server was restarted"
    consumed = _receive_all(broker.client(), url, set(o.acked_ids))
    check_outcome("sqs (boto3)", o, consumed, "s3", report_file())
    # A send the server could not store is its fault (5xx) or unanswered (the client's
    # timeout); a 4xx would tell the client not to retry a request that was fine.
    wrong = {k for k in o.errors if not (k.startswith("http 5") or k.startswith("client: "))}
    assert not wrong, f"sends refused with a client error: {wrong}: {o.summary()}"
    if outage.startswith("s3-"):
        # The server answers with an error (not only the client's own timeouts).
        told = {k for k in o.errors_in_cut if k.startswith("http 5")}
        assert told, f"no 5xx answer during the cut: {o.summary()}"
