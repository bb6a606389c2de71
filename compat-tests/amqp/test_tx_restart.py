"""tx across kill -9 (Tributary only: restarts of its own processes). A tx.commit is one
staged transaction of the core: once commit-ok arrived, its publishes and acks are all
there after the core is killed and restarted; a transaction not committed when the AMQP
gateway is killed is gone whole (RabbitMQ rolls back what a closed channel left
uncommitted), and the deliveries it had acked come back."""

import signal

import pika
import pytest

from amqpcompat import queue_count, wait_count
from amqphelpers import PERSISTENT, Inbox, declare, get, get_all, publish
from test_restart import reconnect, restart

pytestmark = pytest.mark.tributary_only(
    reason="kill -9 of the core or of the gateway, split deployments")


def durable_fanout(ch, uid, n: int):
    x = f"{uid}-fan"
    ch.exchange_declare(x, "fanout", durable=True)
    qs = [declare(ch, f"{uid}-q{i}", durable=True) for i in range(n)]
    for q in qs:
        ch.queue_bind(q, x)
    return x, qs


@pytest.mark.parametrize("mode", ["standalone", "split"])
def test_committed_publishes_and_acks_survive_kill_9_of_the_core(make_tributary, amqp, uid,
                                                                 mode):
    d = make_tributary(mode)
    conn = amqp(d.broker())
    ch = conn.channel()
    x, outs = durable_fanout(ch, uid, 2)
    qin = declare(ch, f"{uid}-in", durable=True)
    publish(ch, qin, ["job1", "job2"], props=PERSISTENT)
    wait_count(ch, qin, 2)
    ch.tx_select()
    job = get(ch, qin)
    ch.basic_publish(x, "", b"done " + job.body, properties=PERSISTENT)
    ch.basic_ack(job.tag)
    ch.tx_commit()
    # Killed right after commit-ok (the connection closed first, so that no consumer of
    # the old connection is left to take what comes back).
    conn.close()
    restart(d, mode)
    ch = reconnect(d, amqp, qin).channel()
    for q in outs:
        assert [m.body for m in get_all(ch, q)] == [b"done job1"], q
    # job1's ack was committed; job2 was never taken.
    left = get_all(ch, qin)
    assert [m.body for m in left] == [b"job2"]


def test_uncommitted_transaction_is_gone_when_the_gateway_is_killed(make_tributary, amqp,
                                                                    uid):
    d = make_tributary("split")
    conn = amqp(d.broker())
    ch = conn.channel()
    x, outs = durable_fanout(ch, uid, 2)
    qin = declare(ch, f"{uid}-in", durable=True)
    publish(ch, qin, ["job"], props=PERSISTENT)
    wait_count(ch, qin, 1)
    ch.tx_select()
    job = Inbox(ch, qin).wait(1)[0]
    ch.basic_publish(x, "", b"never", properties=PERSISTENT)
    ch.basic_ack(job.tag)
    # A synchronous method: the gateway has the publish and the ack in hand.
    ch.queue_declare(qin, passive=True)
    gw = d.gateways[0]
    gw.stop(signal.SIGKILL)
    d.addrs[0] = d._start_gateway(gw)
    ch = reconnect(d, amqp, qin).channel()
    for q in outs:
        assert queue_count(ch, q) == 0, q
    # The ack went with the transaction: the job is back once the core sees the
    # connection gone (its subscription ended with the killed gateway).
    wait_count(ch, qin, 1)
    m = get(ch, qin, auto_ack=True)
    assert (m.body, m.redelivered) == (b"job", True)
    with pytest.raises(pika.exceptions.AMQPError):
        conn.channel()
