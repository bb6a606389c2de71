"""boto3 SendMessage producing continuously for the store-loss and cluster scenarios (not a
test module), and reading a queue back."""

from __future__ import annotations

import concurrent.futures
import time

import botocore.exceptions

from store_loss import Producer


def failure(e: BaseException) -> str:
    """How a failed SendMessage is reported: `http STATUS CODE` for an answer, else the
    client's own error (timeout, connection)."""
    if isinstance(e, botocore.exceptions.ClientError):
        r = e.response
        return f"http {r['ResponseMetadata'].get('HTTPStatusCode')} {r['Error'].get('Code')}"
    return f"client: {type(e).__name__}"


class Boto3Producer(Producer):
    """SendMessage calls on a pool of `workers` threads sharing one boto3 client (give it one
    without retries, so that each request's own answer counts); `send` only starts one when a
    worker is free (False otherwise), `service` collects the answers."""

    name = "sqs (boto3, standard queue)"

    def __init__(self, client, url: str, workers: int):
        super().__init__()
        self.client = client
        self.url = url
        self.workers = workers
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.pending: dict[concurrent.futures.Future, int] = {}

    def send(self, i: int) -> bool:
        if len(self.pending) >= self.workers:
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
                self.gave_up(i, failure(e))

    def in_flight(self) -> int:
        return len(self.pending)

    def close(self):
        self.pool.shutdown(wait=True, cancel_futures=True)


def receive_all(client, url: str, want: set[int], stall_s: float = 10.0,
                deadline_s: float = 60.0) -> list[int]:
    """Every id in the queue, duplicates included: receives (hiding what it got for longer
    than the test runs) until all of `want` came and a receive came back empty, or nothing
    new came for `stall_s`, or the deadline."""
    got: list[int] = []
    end = time.monotonic() + deadline_s
    last_new = time.monotonic()
    while time.monotonic() < end and time.monotonic() - last_new < stall_s:
        r = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
                                   VisibilityTimeout=900)
        msgs = r.get("Messages", [])
        if not msgs and want <= set(got):
            break
        if msgs:
            last_new = time.monotonic()
        got.extend(int(m["Body"][3:]) for m in msgs)
    return got
