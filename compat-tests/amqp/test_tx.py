"""Transactions (tx class): publishes and acks made in a transaction take effect on
tx.commit and are discarded by tx.rollback; commit and rollback need tx.select first."""

import pika
import pytest

from amqpcompat import PRECONDITION_FAILED, queue_count, wait_count
from amqphelpers import channel_error, declare, get_all, get, publish


def test_publishes_visible_only_after_commit(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    watcher = amqp(broker).channel()
    ch.tx_select()
    publish(ch, q, ["a", "b", "c"])
    # A synchronous method on the tx channel: the broker has read the publishes before it.
    ch.queue_declare(q, passive=True)
    assert queue_count(watcher, q) == 0, "uncommitted publishes are not in the queue"
    assert get(watcher, q) is None
    ch.tx_commit()
    assert queue_count(watcher, q) == 3, "all visible once commit-ok arrived"
    # The channel stays transactional: the next batch waits for the next commit.
    publish(ch, q, ["d"])
    ch.queue_declare(q, passive=True)
    assert queue_count(watcher, q) == 3
    ch.tx_commit()
    assert [m.body for m in get_all(watcher, q)] == [b"a", b"b", b"c", b"d"]


def test_rollback_discards_publishes(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    ch.tx_select()
    publish(ch, q, ["x1", "x2", "x3"])
    ch.tx_rollback()
    ch.tx_commit()  # an empty transaction
    assert queue_count(ch, q) == 0
    publish(ch, q, ["kept"])
    ch.tx_commit()
    assert [m.body for m in get_all(ch, q)] == [b"kept"]


def test_acks_applied_on_commit(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, ["m1", "m2", "m3"])
    wait_count(ch, q, 3)
    ch.tx_select()
    got = [get(ch, q) for _ in range(3)]
    ch.basic_ack(got[0].tag)
    ch.basic_ack(got[1].tag)
    ch.tx_commit()
    ch.close()  # m3 was never acked and comes back
    left = get_all(conn.channel(), q)
    assert [(m.body, m.redelivered) for m in left] == [(b"m3", True)]


def test_acks_undone_by_rollback(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, ["m1", "m2"])
    wait_count(ch, q, 2)
    ch.tx_select()
    got = [get(ch, q) for _ in range(2)]
    ch.basic_ack(got[1].tag, multiple=True)
    ch.tx_rollback()
    # Still unacked (not in the queue, not gone) until the channel closes.
    assert queue_count(ch, q) == 0
    ch.close()
    left = get_all(conn.channel(), q)
    assert [(m.body, m.redelivered) for m in left] == [(b"m1", True), (b"m2", True)]


def test_reject_in_transaction_applied_on_commit(broker, amqp, uid):
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, ["drop", "requeue"])
    wait_count(ch, q, 2)
    ch.tx_select()
    drop, requeue = get(ch, q), get(ch, q)
    ch.basic_reject(drop.tag, requeue=False)
    ch.basic_nack(requeue.tag, requeue=True)
    ch.queue_declare(q, passive=True)
    assert queue_count(ch, q) == 0, "nothing requeued before commit"
    ch.tx_commit()
    m = get(ch, q, auto_ack=True)
    assert (m.body, m.redelivered) == (b"requeue", True)
    assert get(ch, q) is None, "the rejected one is gone"


def test_publish_and_ack_in_one_transaction(broker, amqp, uid):
    """A consume-transform-produce step: the ack of the input and the publish of the
    output are committed together."""
    conn = amqp(broker)
    ch = conn.channel()
    qin, qout = declare(ch, f"{uid}-in"), declare(ch, f"{uid}-out")
    publish(ch, qin, ["job"])
    wait_count(ch, qin, 1)
    ch.tx_select()
    job = get(ch, qin)
    ch.basic_publish("", qout, b"result of " + job.body,
                     properties=pika.BasicProperties(correlation_id="1"))
    ch.basic_ack(job.tag)
    ch.tx_commit()
    ch.close()
    ch2 = conn.channel()
    assert queue_count(ch2, qin) == 0
    assert [m.body for m in get_all(ch2, qout)] == [b"result of job"]


def test_commit_without_select_fails(broker, amqp, uid):
    ch = amqp(broker).channel()
    with channel_error(PRECONDITION_FAILED):
        ch.tx_commit()


def test_rollback_without_select_fails(broker, amqp, uid):
    ch = amqp(broker).channel()
    with channel_error(PRECONDITION_FAILED):
        ch.tx_rollback()


def fanout_to(ch, uid, n: int):
    """A fanout exchange bound to `n` new queues: (exchange, queues)."""
    x = f"{uid}-fan"
    ch.exchange_declare(x, "fanout")
    qs = [declare(ch, f"{uid}-q{i}") for i in range(n)]
    for q in qs:
        ch.queue_bind(q, x)
    return x, qs


def test_fanout_publish_commit_reaches_every_queue_and_rollback_none(broker, amqp, uid):
    ch = amqp(broker).channel()
    x, qs = fanout_to(ch, uid, 3)
    watcher = amqp(broker).channel()
    ch.tx_select()
    ch.basic_publish(x, "", b"rolled-1")
    ch.basic_publish(x, "", b"rolled-2")
    ch.tx_rollback()
    ch.basic_publish(x, "", b"one")
    ch.basic_publish(x, "", b"two")
    ch.queue_declare(qs[0], passive=True)
    assert [queue_count(watcher, q) for q in qs] == [0, 0, 0], "nothing before commit"
    ch.tx_commit()
    # Every queue has both once commit-ok arrived, in order, and nothing rolled back.
    for q in qs:
        assert [m.body for m in get_all(watcher, q)] == [b"one", b"two"], q


def test_unroutable_mandatory_publish_returned_at_commit(broker, amqp, uid):
    """RabbitMQ routes a publish in a transaction when the commit delivers it: a mandatory
    one that reaches no queue comes back (basic.return) before commit-ok, not at publish
    time, and a rolled-back one never."""
    conn = amqp(broker)
    ch = conn.channel()
    x = f"{uid}-direct"
    ch.exchange_declare(x, "direct")
    q = declare(ch, f"{uid}-q")
    ch.queue_bind(q, x, routing_key="bound")
    returned = []
    ch.add_on_return_callback(lambda _ch, method, _props, body: returned.append(
        (method.reply_code, method.routing_key, body)))
    ch.tx_select()
    ch.basic_publish(x, "nowhere", b"rolled", mandatory=True)
    ch.tx_rollback()
    ch.basic_publish(x, "nowhere", b"lost", mandatory=True)
    ch.basic_publish(x, "bound", b"kept", mandatory=True)
    ch.queue_declare(q, passive=True)
    conn.process_data_events(time_limit=0)
    assert returned == [], "nothing returned before the commit"
    ch.tx_commit()
    conn.process_data_events(time_limit=0)
    assert returned == [(312, "nowhere", b"lost")]
    assert [m.body for m in get_all(ch, q)] == [b"kept"]


def test_ack_rolled_back_stays_unacked_and_a_later_commit_acks_it(broker, amqp, uid):
    """tx.rollback undoes an ack: the delivery is unacked on the channel again (RabbitMQ
    does not redeliver it then), and the next commit's ack settles it for good."""
    conn = amqp(broker)
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    publish(ch, q, ["m1"])
    wait_count(ch, q, 1)
    ch.tx_select()
    m = get(ch, q)
    ch.basic_ack(m.tag)
    ch.tx_rollback()
    assert get(ch, q) is None, "still out, not redelivered"
    ch.basic_ack(m.tag)
    ch.tx_commit()
    ch.close()
    ch2 = conn.channel()
    assert queue_count(ch2, q) == 0
    assert get(ch2, q) is None, "the committed ack holds after the channel closed"


def test_fanout_publish_and_ack_commit_together(broker, amqp, uid):
    """consume-transform-produce over several queues: the input's ack and the output's
    fanout copies in one commit; before it none of them, after it all."""
    conn = amqp(broker)
    ch = conn.channel()
    x, outs = fanout_to(ch, uid, 2)
    qin = declare(ch, f"{uid}-in")
    publish(ch, qin, ["job1", "job2"])
    wait_count(ch, qin, 2)
    watcher = amqp(broker).channel()
    ch.tx_select()
    jobs = [get(ch, qin), get(ch, qin)]
    for j in jobs:
        ch.basic_publish(x, "", b"done " + j.body)
    ch.basic_ack(jobs[1].tag, multiple=True)
    ch.queue_declare(qin, passive=True)
    assert [queue_count(watcher, q) for q in outs] == [0, 0]
    ch.tx_commit()
    for q in outs:
        assert [m.body for m in get_all(watcher, q)] == [b"done job1", b"done job2"], q
    ch.close()
    # The acks were committed: nothing comes back when the channel closes.
    assert queue_count(watcher, qin) == 0
    assert get(watcher, qin) is None


@pytest.mark.differs("tributary", "one tx.commit is one staged transaction of the core: at most "
                     "10 000 publishes (RabbitMQ: no limit); a larger commit is refused with "
                     "406 and nothing of it applies")
def test_a_transaction_of_10001_publishes_commits(broker, amqp, uid):
    ch = amqp(broker).channel()
    q = declare(ch, f"{uid}-q")
    ch.tx_select()
    publish(ch, q, [b"m"] * 10_001)
    ch.tx_commit()
    assert queue_count(ch, q) == 10_001


@pytest.mark.tributary_only(reason="RabbitMQ has no limit on a transaction's size (the "
                            "scenario above runs on both)")
def test_too_large_a_transaction_is_refused_whole(make_tributary, amqp, uid):
    """Tributary's refusal of a transaction over its limit: 406 at tx.commit, and not one of
    its publishes applied."""
    conn = amqp(make_tributary("standalone").broker())
    ch = conn.channel()
    q = declare(ch, f"{uid}-q")
    ch.tx_select()
    publish(ch, q, [b"m"] * 10_001)
    with channel_error(PRECONDITION_FAILED, "too large"):
        ch.tx_commit()
    assert queue_count(conn.channel(), q) == 0


def test_ack_of_a_delivery_whose_queue_was_deleted_commits(broker, amqp, uid):
    """The queue goes while one of its deliveries is unacked in a transaction: the commit
    still succeeds (the ack settles nothing) and takes the transaction's publishes along."""
    conn = amqp(broker)
    ch = conn.channel()
    gone = declare(ch, f"{uid}-gone")
    out = declare(ch, f"{uid}-out")
    publish(ch, gone, ["m"])
    wait_count(ch, gone, 1)
    ch.tx_select()
    m = get(ch, gone)
    conn.channel().queue_delete(gone)
    ch.basic_publish("", out, b"kept")
    ch.basic_ack(m.tag)
    ch.tx_commit()
    assert [x.body for x in get_all(ch, out)] == [b"kept"]
