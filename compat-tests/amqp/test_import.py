"""`tributary import rabbitmq`: definitions exported by a real RabbitMQ node
(`rabbitmqctl export_definitions`) imported into Tributary, then used by pika as on RabbitMQ:
the vhost, its exchanges, queues with their arguments and bindings exist; the user logs in
with the password it had on RabbitMQ (its hash was carried); a redeclare with the same
arguments is accepted; routing and dead-lettering work; the policy RabbitMQ applied is
applied at import (and a redeclare without its keys is still equivalent).

A policy with DLX, message-ttl and max-length set by rabbitmqctl is carried: the same
scenario (max-length drops the oldest to the DLX, expired messages go there too) passes on
RabbitMQ, on Tributary after the import, and on RabbitMQ again after `tributary export
rabbitmq` and `rabbitmqctl import_definitions`. What pika declared on Tributary, exported,
is accepted by RabbitMQ and routes there; a user with a RabbitMQ password hash logs in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess

import pika
import pytest

from tributary_process import tributary_bin

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
    limit = rows[("policy", vhost, "imp-limit")]
    assert limit["outcome"] == "applied", limit
    assert limit["policy"]["queues"]["imp.q"]["max-length"] == {"carried": 1000}
    assert "at import" in limit["detail"]
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


POLICY_TTL_MS = 2000


def _policy_scenario(b, vhost: str, user: str, password: str):
    """pol.q holds at most 2 messages and keeps them POLICY_TTL_MS; both the oldest dropped
    for length and the expired ones go to pol.dlx, bound to pol.dead. Nothing in the
    queue's own arguments says so: the policy does."""
    conn = pika.BlockingConnection(b.params(user=user, password=password, virtual_host=vhost))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_purge("pol.dead")
    for body in (b"a", b"b", b"c"):
        ch.basic_publish("", "pol.q", body)
    # Confirmed, so enqueued: the first went out for length (well before the TTL).
    assert ch.queue_declare("pol.q", passive=True).method.message_count == 2
    _, props, dead = _get(ch, "pol.dead")
    assert dead == b"a"
    assert props.headers["x-death"][0]["reason"] == "maxlen"
    expired = []
    for _ in range(2):
        _, props, body = _get(ch, "pol.dead", attempts=int(POLICY_TTL_MS / 50) + 200)
        assert props.headers["x-death"][0]["reason"] == "expired"
        expired.append(body)
    assert expired == [b"b", b"c"]
    assert ch.queue_declare("pol.q", passive=True).method.message_count == 0
    # A client declaring the queue as it always did (no arguments) is not refused.
    ch.queue_declare("pol.q", durable=True)
    conn.close()


def test_policy_with_dlx_ttl_and_max_length_is_carried(rabbitmq_server, make_tributary,
                                                     tmp_path, uid):
    vhost, user = f"pol-{uid}", f"pu-{uid}"
    ctl = rabbitmq_server.ctl
    ctl("add_vhost", vhost)
    ctl("add_user", user, PASSWORD)
    ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    ctl("set_policy", "-p", vhost, "pol", "^pol\\.q$",
        json.dumps({"dead-letter-exchange": "pol.dlx", "message-ttl": POLICY_TTL_MS,
                    "max-length": 2, "ha-mode": "all"}),
        "--apply-to", "queues", "--priority", "1")
    # An operator policy's cap above the policy's: the smaller (the policy's 2) holds.
    ctl("set_operator_policy", "-p", vhost, "op-cap", "^pol\\.", '{"max-length": 100}',
        "--apply-to", "queues")
    rb = rabbitmq_server.broker()
    conn = pika.BlockingConnection(rb.params(user=user, password=PASSWORD, virtual_host=vhost))
    ch = conn.channel()
    ch.exchange_declare("pol.dlx", "fanout", durable=True)
    ch.queue_declare("pol.q", durable=True)
    ch.queue_declare("pol.dead", durable=True)
    ch.queue_bind("pol.dead", "pol.dlx", "")
    conn.close()
    defs = tmp_path / "definitions.json"
    ctl("export_definitions", str(defs))

    # The reference: RabbitMQ itself.
    _policy_scenario(rb, vhost, user, PASSWORD)

    d = make_tributary("split", config="")
    report = _import(d.core_addr, defs, d.config)
    rows = {(r["kind"], r["vhost"], r["name"]): r for r in report["rows"]}
    pol = rows[("policy", vhost, "pol")]
    assert pol["outcome"] == "applied", pol
    carried = pol["policy"]["queues"]["pol.q"]
    assert carried["dead-letter-exchange"] == {"carried": "pol.dlx"}
    assert carried["message-ttl"] == {"carried": POLICY_TTL_MS}
    assert carried["max-length"] == {"carried": 2}
    assert "mirroring" in carried["ha-mode"]["not_carried"]
    assert "ha-mode" in pol["detail"] and "at import" in pol["detail"]
    op = rows[("operator_policy", vhost, "op-cap")]
    assert "kept" in op["policy"]["queues"]["pol.q"]["max-length"], op
    d.stop_clean()
    d.start()
    _policy_scenario(d.broker(), vhost, user, PASSWORD)

    # Exported from Tributary into a fresh RabbitMQ vhost: the policy comes back as a policy
    # RabbitMQ accepts and applies, and the scenario passes there too.
    back_vhost = f"{vhost}-back"
    exported = _export(d.core_addr, "--config", str(d.config))
    assert not any(n.startswith(f"user {user}:") for n in exported["not_exported"]), exported
    doc = _rename_vhost(exported["document"], vhost, back_vhost)
    back = tmp_path / "exported.json"
    back.write_text(json.dumps(doc))
    ctl("import_definitions", str(back))
    policies = ctl("list_policies", "-p", back_vhost, "--formatter", "json").stdout
    assert any(p["name"] == "pol" for p in json.loads(policies)), policies
    _policy_scenario(rb, back_vhost, user, PASSWORD)


def _export(core_addr: str, *extra: str) -> dict:
    out = subprocess.run(
        [tributary_bin(), "export", "rabbitmq", "--core", f"http://{core_addr}", "--json",
         *extra],
        capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _rename_vhost(defs: dict, old: str, new: str) -> dict:
    """The definitions of vhost `old` only, moved to vhost `new` (so that importing them
    into the session's RabbitMQ touches nothing another test uses)."""
    out = {}
    for key, items in defs.items():
        if key == "users":
            out[key] = items
        elif key == "vhosts":
            out[key] = [{**v, "name": new} for v in items if v["name"] == old]
        elif isinstance(items, list):
            out[key] = [{**i, "vhost": new} for i in items if i.get("vhost") == old]
        else:
            out[key] = items
    return out


def _rabbit_hash(password: str) -> str:
    """A RabbitMQ SHA-256 password hash (4-byte salt, sha256(salt + password)), as the
    config file takes it."""
    salt = os.urandom(4)
    digest = hashlib.sha256(salt + password.encode()).digest()
    return "RABBITMQ-SHA-256$" + base64.b64encode(salt + digest).decode()


def test_tributary_export_is_imported_by_rabbitmq_and_routes(rabbitmq_server, make_tributary,
                                                            tmp_path, uid):
    vhost, user = f"exp-{uid}", f"eu-{uid}"
    config = (f'amqp_vhosts = ["/", "{vhost}"]\n'
              f'[[users]]\nname = "{user}"\ncredentials = ["{_rabbit_hash(PASSWORD)}"]\n'
              f'[[amqp_permissions]]\nuser = "{user}"\nvhost = "{vhost}"\n')
    d = make_tributary("split", config=config)
    conn = pika.BlockingConnection(
        d.broker().params(user=user, password=PASSWORD, virtual_host=vhost))
    ch = conn.channel()
    ch.exchange_declare("exp.topic", "topic", durable=True)
    ch.exchange_declare("exp.headers", "headers", durable=True)
    ch.exchange_declare("exp.unbound", "direct", durable=True)
    args = {"x-message-ttl": 60000, "x-max-length": 10, "x-overflow": "reject-publish"}
    ch.queue_declare("exp.q", durable=True, arguments=args)
    ch.queue_declare("exp.h", durable=True)
    ch.queue_bind("exp.q", "exp.topic", "orders.*")
    ch.queue_bind("exp.h", "exp.headers", "", arguments={"x-match": "all", "kind": "invoice"})
    conn.close()

    exported = _export(d.core_addr, "--config", str(d.config))
    doc = exported["document"]
    assert {"name": vhost} in doc["vhosts"]
    assert [u["name"] for u in doc["users"]] == [user]
    file = tmp_path / "exported.json"
    file.write_text(json.dumps(doc))
    rabbitmq_server.ctl("import_definitions", str(file))

    # On RabbitMQ, as the user whose hash came from Tributary's config.
    rb = rabbitmq_server.broker()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        pika.BlockingConnection(rb.params(user=user, password="wrong", virtual_host=vhost))
    conn = pika.BlockingConnection(rb.params(user=user, password=PASSWORD, virtual_host=vhost))
    ch = conn.channel()
    ch.confirm_delivery()
    ch.exchange_declare("exp.unbound", "direct", passive=True)
    # The same arguments: equivalent on RabbitMQ, other ones refused.
    ch.queue_declare("exp.q", durable=True, arguments=args)
    ch.basic_publish("exp.topic", "orders.new", b"routed")
    ch.basic_publish("exp.headers", "", b"invoice",
                     pika.BasicProperties(headers={"kind": "invoice"}))
    ch.basic_publish("exp.headers", "", b"other", pika.BasicProperties(headers={"kind": "x"}))
    assert _get(ch, "exp.q")[2] == b"routed"
    assert _get(ch, "exp.h")[2] == b"invoice"
    assert ch.queue_declare("exp.h", passive=True).method.message_count == 0
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as e:
        ch.queue_declare("exp.q", durable=True, arguments={"x-message-ttl": 5})
    assert e.value.reply_code == 406
    conn.close()
