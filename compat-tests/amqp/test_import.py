"""`tributary import rabbitmq`: definitions exported by a real RabbitMQ node
(`rabbitmqctl export_definitions`) imported into Tributary, then used by pika as on RabbitMQ:
the vhost, its exchanges, queues with their arguments and bindings exist; the user logs in
with the password it had on RabbitMQ (its hash was carried); a redeclare with the same
arguments is accepted; routing and dead-lettering work; the policy is reported as not
carried.
"""

from __future__ import annotations

import json
import subprocess

import pika
import pytest

from conftest import tributary_bin

PASSWORD = "imported-Pa55"


def _rabbit_setup(rabbitmq_server, vhost: str, user: str):
    ctl = rabbitmq_server.ctl
    ctl("add_vhost", vhost)
    ctl("add_user", user, PASSWORD)
    ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    ctl("set_policy", "-p", vhost, "imp-limit", "^imp\\.q$", '{"max-length": 1000}',
        "--apply-to", "queues")
    b = rabbitmq_server.broker()
    conn = pika.BlockingConnection(b.params(user=user, password=PASSWORD, virtual_host=vhost))
    ch = conn.channel()
    ch.exchange_declare("imp.topic", "topic", durable=True)
    ch.exchange_declare("imp.dlx", "fanout", durable=True)
    ch.queue_declare("imp.q", durable=True,
                     arguments={"x-message-ttl": 60000, "x-dead-letter-exchange": "imp.dlx"})
    ch.queue_declare("imp.dead", durable=True)
    ch.queue_bind("imp.q", "imp.topic", "orders.*")
    ch.queue_bind("imp.dead", "imp.dlx", "")
    conn.close()


def _import(core_addr: str, defs, config_out, *extra: str) -> dict:
    out = subprocess.run(
        [tributary_bin(), "import", "rabbitmq", str(defs), "--core", f"http://{core_addr}",
         "--config-out", str(config_out), "--json", *extra],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_definitions_exported_by_rabbitmq_import_and_work(rabbitmq_server, make_tributary,
                                                         tmp_path, uid):
    vhost, user = f"imp-{uid}", f"u-{uid}"
    _rabbit_setup(rabbitmq_server, vhost, user)
    defs = tmp_path / "definitions.json"
    rabbitmq_server.ctl("export_definitions", str(defs))
    assert json.loads(defs.read_text())["queues"], "RabbitMQ exported no queues"

    d = make_tributary("split", config="")
    # A dry run reports and creates nothing.
    dry = subprocess.run(
        [tributary_bin(), "import", "rabbitmq", str(defs), "--dry-run", "--json"],
        capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert any(r["kind"] == "queue" and r["name"] == "imp.q" and r["outcome"] == "would create"
               for r in json.loads(dry.stdout)["rows"])

    report = _import(d.core_addr, defs, d.config)
    rows = {(r["kind"], r["vhost"], r["name"]): r for r in report["rows"]}
    assert report["failed"] == 0
    for kind, name in [("exchange", "imp.topic"), ("exchange", "imp.dlx"),
                       ("queue", "imp.q"), ("queue", "imp.dead")]:
        assert rows[(kind, vhost, name)]["outcome"] == "created", rows.get((kind, vhost, name))
    assert rows[("policy", vhost, "imp-limit")]["outcome"] == "not carried"
    assert "imp.q" in rows[("policy", vhost, "imp-limit")]["detail"]
    assert rows[("user", "", user)]["outcome"] == "config"
    # RabbitMQ's default guest/guest is not carried (it would log in from anywhere).
    assert rows[("user", "", "guest")]["outcome"] == "not carried"
    assert '"guest"' not in d.config.read_text()
    # Importing again changes nothing.
    again = _import(d.core_addr, defs, d.config)
    assert all(r["outcome"] != "created" or r["kind"] == "binding" for r in again["rows"])

    # The config snippet (users, permissions, vhosts) in place: restart and log in as the user.
    d.stop_clean()
    d.start()
    b = d.broker()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(b.params(user=user, password="wrong", virtual_host=vhost))
    conn = pika.BlockingConnection(b.params(user=user, password=PASSWORD, virtual_host=vhost))
    ch = conn.channel()
    ch.queue_declare("imp.q", passive=True)
    # The same arguments as on RabbitMQ: equivalent, accepted.
    ch.queue_declare("imp.q", durable=True,
                     arguments={"x-message-ttl": 60000, "x-dead-letter-exchange": "imp.dlx"})
    ch.basic_publish("imp.topic", "orders.new", b"routed")
    method, _, body = _get(ch, "imp.q")
    assert body == b"routed"
    ch.basic_reject(method.delivery_tag, requeue=False)
    _, _, dead = _get(ch, "imp.dead")
    assert dead == b"routed"
    # Other arguments than the declared ones: refused as on RabbitMQ.
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare("imp.q", durable=True, arguments={"x-message-ttl": 5})
    assert e.value.reply_code == 406
    conn.close()


def _get(ch, queue: str, attempts: int = 200):
    """basic.get until a message is there (a routed message is enqueued asynchronously to
    the publish on the default non-confirm channel)."""
    import time
    for _ in range(attempts):
        method, props, body = ch.basic_get(queue)
        if method is not None:
            return method, props, body
        time.sleep(0.05)
    raise AssertionError(f"no message in {queue}")
