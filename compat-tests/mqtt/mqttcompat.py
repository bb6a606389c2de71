"""Helpers shared by the MQTT scenarios: the broker under test and a synchronous wrapper
around a paho-mqtt client (paho runs its network loop in a thread; every wait here is for a
condition, with a deadline)."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

import mqttraw

MQTTv31 = mqtt.MQTTv31
MQTTv311 = mqtt.MQTTv311
MQTTv5 = mqtt.MQTTv5

PROTOCOL_NAMES = {MQTTv31: "v31", MQTTv311: "v311", MQTTv5: "v5"}
LEVEL = {MQTTv31: 3, MQTTv311: 4, MQTTv5: 5}

WAIT_S = 10.0
# Bulk waits give up when nothing moved for this long (a lost message never comes).
STALL_S = 5.0
# How long a scenario listens to prove that something does NOT arrive. Only used for that:
# positive outcomes are always waited for as conditions.
QUIET_S = 0.5

BROKERS = ["tributary", "mosquitto"]


@dataclasses.dataclass
class Broker:
    """An MQTT endpoint under test."""

    kind: str  # "tributary" or "mosquitto"
    host: str
    port: int
    server: object = None  # the process/deployment behind it

    @property
    def is_tributary(self) -> bool:
        return self.kind == "tributary"

    def raw(self, timeout: float = 5.0) -> mqttraw.RawClient:
        return mqttraw.RawClient(self.host, self.port, timeout)

    def __str__(self):
        return f"{self.kind}@{self.host}:{self.port}"


def wait_until(cond: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def props(packet_type=PacketTypes.PUBLISH, **values) -> Properties:
    p = Properties(packet_type)
    for k, v in values.items():
        setattr(p, k, v)
    return p


def rc_value(rc) -> int:
    return rc.value if isinstance(rc, ReasonCode) else int(rc)


@dataclasses.dataclass
class Connack:
    session_present: bool
    reason: int  # MQTT 5 reason code (paho maps 3.1.1 return codes onto them)
    properties: Properties | None


@dataclasses.dataclass
class Disconnect:
    reason: int
    from_server: bool  # a DISCONNECT packet (MQTT 5) came before the close
    properties: Properties | None


class Client:
    """A paho client whose calls block until the broker has answered."""

    def __init__(
        self,
        broker: Broker,
        client_id: str,
        protocol: int = MQTTv311,
        clean: bool = True,
        max_inflight: int = 100,
    ):
        self.broker = broker
        self.client_id = client_id
        self.protocol = protocol
        self.clean = clean
        kw = {} if protocol == MQTTv5 else {"clean_session": clean}
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=protocol,
            reconnect_on_failure=False,  # a taken-over client must not fight back
            **kw,
        )
        self.c.max_inflight_messages_set(max_inflight)
        self.c.max_queued_messages_set(0)
        self.cond = threading.Condition()
        self.messages: list[mqtt.MQTTMessage] = []
        self.connack: Connack | None = None
        self.disconnected: Disconnect | None = None
        self._subacks: dict[int, list[int]] = {}
        self._unsubacks: dict[int, list[int]] = {}
        self._pubacks: dict[int, int] = {}
        self._loop = False
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self.c.on_publish = self._on_publish

    @property
    def v5(self) -> bool:
        return self.protocol == MQTTv5

    # -- callbacks (paho's thread) -----------------------------------------------------

    def _on_connect(self, c, userdata, flags, reason, properties):
        with self.cond:
            self.connack = Connack(bool(flags.session_present), rc_value(reason), properties)
            self.cond.notify_all()

    def _on_disconnect(self, c, userdata, flags, reason, properties):
        with self.cond:
            self.disconnected = Disconnect(
                rc_value(reason), bool(flags.is_disconnect_packet_from_server), properties
            )
            self.cond.notify_all()

    def _on_message(self, c, userdata, msg):
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def _on_subscribe(self, c, userdata, mid, reason_codes, properties):
        with self.cond:
            self._subacks[mid] = [rc_value(r) for r in reason_codes]
            self.cond.notify_all()

    def _on_unsubscribe(self, c, userdata, mid, reason_codes, properties):
        with self.cond:
            self._unsubacks[mid] = [rc_value(r) for r in reason_codes]
            self.cond.notify_all()

    def _on_publish(self, c, userdata, mid, reason, properties):
        with self.cond:
            self._pubacks[mid] = rc_value(reason)
            self.cond.notify_all()

    # -- waiting -------------------------------------------------------------------------

    def wait(self, cond: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition",
             progress: Callable[[], int] | None = None, stall: float = STALL_S):
        """Waits for `cond`. With `progress` (a count that grows while things move), gives
        up early once it has not grown for `stall` seconds."""
        deadline = time.monotonic() + timeout
        last = progress() if progress else None
        moved = checked = time.monotonic()
        with self.cond:
            while not cond():
                now = time.monotonic()
                if progress is not None and now - checked >= 0.5:
                    checked = now
                    p = progress()
                    if p != last:
                        last, moved = p, now
                    elif now - moved > stall:
                        raise AssertionError(
                            f"{self.client_id}: no progress for {stall}s waiting for {what} "
                            f"(stuck at {p})"
                        )
                remaining = deadline - now
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.client_id}: timed out after {timeout}s waiting for {what}"
                    )
                self.cond.wait(min(remaining, 0.2))

    # -- operations ----------------------------------------------------------------------

    def connect(
        self,
        *,
        keepalive: int = 60,
        session_expiry: int | None = None,
        properties: Properties | None = None,
        will: tuple | None = None,
        will_properties: Properties | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = WAIT_S,
        check: bool = True,
    ) -> Connack | None:
        """Connects and waits for CONNACK (or the close). With `check`, it must accept."""
        if will is not None:
            topic, payload, qos, retain = will
            self.c.will_set(topic, payload, qos, retain, properties=will_properties)
        if username is not None:
            self.c.username_pw_set(username, password)
        if self.v5 and session_expiry is not None:
            properties = properties or Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry
        kw = {"clean_start": self.clean} if self.v5 else {}
        with self.cond:
            self.connack = None
            self.disconnected = None
        self.c.connect(self.broker.host, self.broker.port, keepalive, properties=properties, **kw)
        self.c.loop_start()
        self._loop = True
        self.wait(lambda: self.connack is not None or self.disconnected is not None,
                  timeout, "CONNACK")
        if check:
            assert self.connack is not None, (
                f"{self.client_id}: connection closed without CONNACK: {self.disconnected}"
            )
            assert self.connack.reason == 0, f"{self.client_id}: CONNACK refused: {self.connack}"
        return self.connack

    def subscribe(
        self,
        filter_: str | list,
        qos: int = 0,
        *,
        no_local: bool = False,
        retain_as_published: bool = False,
        retain_handling: int = 0,
        sub_id: int | None = None,
        timeout: float = WAIT_S,
    ) -> list[int]:
        """SUBSCRIBE; returns the SUBACK codes (granted QoS or failure codes)."""
        properties = None
        if sub_id is not None:
            properties = props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=sub_id)
        if self.v5:
            opts = SubscribeOptions(
                qos=qos,
                noLocal=no_local,
                retainAsPublished=retain_as_published,
                retainHandling=retain_handling,
            )
            if isinstance(filter_, list):
                rc, mid = self.c.subscribe(
                    [(f, SubscribeOptions(qos=q)) for f, q in filter_], properties=properties
                )
            else:
                rc, mid = self.c.subscribe(filter_, options=opts, properties=properties)
        else:
            rc, mid = self.c.subscribe(filter_ if isinstance(filter_, list) else filter_, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe not sent: {rc}"
        self.wait(lambda: mid in self._subacks or self.disconnected is not None, timeout,
                  f"SUBACK for {filter_}")
        assert mid in self._subacks, f"connection closed instead of SUBACK: {self.disconnected}"
        return self._subacks[mid]

    def unsubscribe(self, filter_: str | list[str], timeout: float = WAIT_S) -> list[int]:
        rc, mid = self.c.unsubscribe(filter_)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"unsubscribe not sent: {rc}"
        self.wait(lambda: mid in self._unsubacks, timeout, f"UNSUBACK for {filter_}")
        return self._unsubacks[mid]

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
        *,
        wait: bool = True,
        timeout: float = WAIT_S,
    ) -> int | mqtt.MQTTMessageInfo:
        """PUBLISH; with `wait`, blocks until PUBACK/PUBCOMP (QoS 0: until written) and
        returns its reason code, else returns paho's MQTTMessageInfo."""
        info = self.c.publish(topic, payload, qos, retain, properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish not queued: {info.rc}"
        if not wait:
            return info
        self.wait(lambda: info.mid in self._pubacks, timeout, f"acknowledgement of {topic}")
        return self._pubacks.pop(info.mid)

    def wait_published(self, infos: list, timeout: float = 60.0):
        """Waits until every publish in `infos` was acknowledged (PUBACK/PUBCOMP)."""
        mids = [i.mid for i in infos]
        self.wait(lambda: all(m in self._pubacks for m in mids), timeout,
                  f"{len(mids)} acknowledgements",
                  progress=lambda: sum(m in self._pubacks for m in mids))
        return [self._pubacks.pop(m) for m in mids]

    def wait_messages(self, n: int, timeout: float = WAIT_S, topic: str | None = None,
                      stall: float = STALL_S):
        """Waits until at least n messages (on `topic`, if given) arrived; returns them all.
        Gives up early when nothing arrives for `stall` seconds."""
        def picked():
            return [m for m in self.messages if topic is None or m.topic == topic]
        self.wait(lambda: len(picked()) >= n, timeout,
                  f"{n} messages{' on ' + topic if topic else ''} (have {len(picked())})",
                  progress=lambda: len(self.messages), stall=stall)
        with self.cond:
            return picked()

    def received(self, topic: str | None = None) -> list:
        with self.cond:
            return [m for m in self.messages if topic is None or m.topic == topic]

    def wait_disconnected(self, timeout: float = WAIT_S) -> Disconnect:
        self.wait(lambda: self.disconnected is not None, timeout, "the connection to close")
        return self.disconnected

    def disconnect(self, reason: int | None = None, properties: Properties | None = None,
                   timeout: float = WAIT_S):
        """A normal DISCONNECT (optionally with an MQTT 5 reason code and properties)."""
        rc = ReasonCode(PacketTypes.DISCONNECT, identifier=reason) if reason is not None else None
        self.c.disconnect(reasoncode=rc, properties=properties)
        self.wait(lambda: self.disconnected is not None, timeout, "DISCONNECT to complete")
        self.stop()

    def drop(self):
        """Ends the TCP connection without DISCONNECT (as a crashing client would)."""
        sock = self.c.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.wait(lambda: self.disconnected is not None, WAIT_S, "the dropped connection")
        self.stop()

    def stop(self):
        if self._loop:
            self.c.loop_stop()
            self._loop = False

    def close(self):
        """Teardown: disconnect if still connected, stop the network thread, and release the
        client's sockets. paho keeps its wake-up socket pair until the object is garbage
        collected; with hundreds of clients in a run, descriptor numbers pass 1023, where
        the select() in paho's network thread fails and the client silently stops reading
        (a CONNACK that never arrives)."""
        try:
            if self.c.is_connected():
                self.c.disconnect()
                self.wait(lambda: self.disconnected is not None, 2.0, "disconnect")
        except Exception:
            pass
        try:
            self.stop()
        except Exception:
            pass
        try:
            self.c._reset_sockets()
        except Exception:
            pass


# Rounds of the subscribe-then-publish scenarios.
ROUNDS = 50


def subscribe_then_publish(sub_broker: Broker, pub_broker: Broker, mq, uid: str, publisher: str,
                           protocol: int = MQTTv311):
    """ROUNDS times: a new client subscribes; once its SUBACK is in, another client publishes
    (QoS 0) on its own connection; the subscriber must get that message. The publisher is
    one client that stays connected, or a new one per round that DISCONNECTs, or goes away
    without DISCONNECT, right after its PUBLISH."""
    steady = None
    if publisher == "connected":
        steady = mq(pub_broker, f"{uid}-p", protocol)
        steady.connect()
    for i in range(ROUNDS):
        topic = f"{uid}/r/{i}"
        sub = mq(sub_broker, f"{uid}-s{i}", protocol)
        sub.connect()
        assert sub.subscribe(topic, 0) == [0]
        pub = steady
        if pub is None:
            pub = mq(pub_broker, f"{uid}-p{i}", protocol)
            pub.connect()
        pub.publish(topic, b"%d" % i, qos=0)  # returns once written to the socket
        if publisher == "disconnects":
            pub.disconnect()
        elif publisher == "drops":
            pub.drop()
        msgs = sub.wait_messages(1, topic=topic)
        assert [m.payload for m in msgs] == [b"%d" % i], f"round {i}"
        sub.disconnect()
        sub.close()
        if pub is not steady:
            pub.close()
