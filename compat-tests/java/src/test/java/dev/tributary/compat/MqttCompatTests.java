package dev.tributary.compat;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.UUID;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import org.eclipse.paho.client.mqttv3.IMqttDeliveryToken;
import org.eclipse.paho.client.mqttv3.IMqttToken;
import org.eclipse.paho.client.mqttv3.MqttCallback;
import org.eclipse.paho.client.mqttv3.MqttClient;
import org.eclipse.paho.client.mqttv3.MqttConnectOptions;
import org.eclipse.paho.client.mqttv3.MqttException;
import org.eclipse.paho.client.mqttv3.MqttMessage;
import org.eclipse.paho.client.mqttv3.persist.MemoryPersistence;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;

/**
 * MQTT 3.1.1 scenarios with Eclipse Paho (org.eclipse.paho.client.mqttv3). The same tests run
 * against Tributary ({@link TributaryMqttTest}) and Mosquitto ({@link MosquittoMqttTest});
 * topics and client ids carry this run's prefix so runs do not collide on a shared broker.
 */
abstract class MqttCompatTests {
    static final long WAIT_MS = 10_000;

    /** HOST:PORT of the broker under test. */
    protected abstract String address();

    private final String run = UUID.randomUUID().toString().substring(0, 8);
    private final List<MqttClient> clients = new ArrayList<>();
    private final List<String> retainedTopics = new ArrayList<>();

    record Received(String topic, MqttMessage message) {
        String text() {
            return new String(message.getPayload(), StandardCharsets.UTF_8);
        }
    }

    /** A Paho client whose arriving messages go to {@code inbox} (may be null). */
    private MqttClient client(String id, BlockingQueue<Received> inbox) throws Exception {
        MqttClient c = new MqttClient("tcp://" + address(), id, new MemoryPersistence());
        c.setTimeToWait(WAIT_MS);
        c.setCallback(new MqttCallback() {
            @Override
            public void connectionLost(Throwable cause) {}

            @Override
            public void messageArrived(String topic, MqttMessage message) {
                if (inbox != null) {
                    inbox.add(new Received(topic, message));
                }
            }

            @Override
            public void deliveryComplete(IMqttDeliveryToken token) {}
        });
        clients.add(c);
        return c;
    }

    private static MqttConnectOptions options(boolean cleanSession) {
        MqttConnectOptions o = new MqttConnectOptions();
        o.setMqttVersion(MqttConnectOptions.MQTT_VERSION_3_1_1);
        o.setCleanSession(cleanSession);
        o.setConnectionTimeout((int) (WAIT_MS / 1000));
        o.setKeepAliveInterval(30);
        o.setAutomaticReconnect(false);
        o.setMaxInflight(250);
        return o;
    }

    private String id(String name) {
        return "java-" + run + "-" + name;
    }

    private String topic(String name) {
        return "java/" + run + "/" + name;
    }

    private static MqttMessage message(String text, int qos, boolean retained) {
        MqttMessage m = new MqttMessage(text.getBytes(StandardCharsets.UTF_8));
        m.setQos(qos);
        m.setRetained(retained);
        return m;
    }

    private static Received next(BlockingQueue<Received> inbox, String what) throws InterruptedException {
        Received r = inbox.poll(WAIT_MS, TimeUnit.MILLISECONDS);
        if (r == null) {
            fail("no message within " + WAIT_MS + " ms: " + what);
        }
        return r;
    }

    private static void subscribe(MqttClient c, String topic, int qos) throws Exception {
        IMqttToken t = c.subscribeWithResponse(topic, qos);
        assertArrayEquals(new int[] {qos}, t.getGrantedQos(), "granted QoS for " + topic);
    }

    @AfterEach
    void cleanUp() throws Exception {
        try {
            if (!retainedTopics.isEmpty()) {
                MqttClient c = client(id("cleanup"), null);
                c.connect(options(true));
                for (String t : retainedTopics) {
                    c.publish(t, new byte[0], 1, true); // clears the retained message
                }
                c.disconnect();
            }
        } finally {
            for (MqttClient c : clients) {
                if (c.isConnected()) {
                    try {
                        c.disconnect(0);
                    } catch (MqttException e) {
                        c.disconnectForcibly(0, 0, false);
                    }
                }
                c.close(true);
            }
        }
    }

    @Test
    @Timeout(60)
    void qos1RoundTripOf200MessagesInOrder() throws Exception {
        final int n = 200;
        String t = topic("qos1");
        BlockingQueue<Received> inbox = new LinkedBlockingQueue<>();
        MqttClient sub = client(id("sub"), inbox);
        sub.connect(options(true));
        subscribe(sub, t, 1);
        MqttClient pub = client(id("pub"), null);
        pub.connect(options(true));
        for (int i = 0; i < n; i++) {
            pub.publish(t, message("m-" + i, 1, false)); // returns once PUBACK arrived
        }
        for (int i = 0; i < n; i++) {
            Received r = next(inbox, "message " + i + " of " + n);
            assertEquals(t, r.topic());
            assertEquals("m-" + i, r.text(), "message " + i);
            assertEquals(1, r.message().getQos(), "QoS of message " + i);
            assertFalse(r.message().isRetained(), "message " + i + " flagged retained");
            assertFalse(r.message().isDuplicate(), "message " + i + " flagged DUP");
        }
    }

    @Test
    @Timeout(60)
    void retainedMessageGoesToALaterSubscriber() throws Exception {
        String t = topic("retained");
        retainedTopics.add(t);
        MqttClient pub = client(id("pub"), null);
        pub.connect(options(true));
        pub.publish(t, message("kept", 1, true));

        BlockingQueue<Received> inbox = new LinkedBlockingQueue<>();
        MqttClient sub = client(id("late"), inbox);
        sub.connect(options(true));
        subscribe(sub, t, 1);
        Received r = next(inbox, "retained message on subscribe");
        assertEquals(t, r.topic());
        assertEquals("kept", r.text());
        assertTrue(r.message().isRetained(), "retained message delivered without the RETAIN flag");
        // A publish to an existing subscription is not flagged retained, even if it is kept.
        pub.publish(t, message("live", 1, true));
        Received live = next(inbox, "live publish");
        assertEquals("live", live.text());
        assertFalse(live.message().isRetained(), "live delivery flagged retained");
    }

    @Test
    @Timeout(60)
    void persistentSessionGetsQos1MessagesPublishedWhileAway() throws Exception {
        final int n = 20;
        String t = topic("session");
        String id = id("persistent");
        MqttClient first = client(id, null);
        IMqttToken ok = first.connectWithResult(options(false));
        assertFalse(ok.getSessionPresent(), "session present for a new client id");
        subscribe(first, t, 1);
        first.disconnect();

        MqttClient pub = client(id("pub"), null);
        pub.connect(options(true));
        for (int i = 0; i < n; i++) {
            pub.publish(t, message("away-" + i, 1, false));
        }

        BlockingQueue<Received> inbox = new LinkedBlockingQueue<>();
        MqttClient again = client(id, inbox); // callback set before connect: the queue comes at once
        ok = again.connectWithResult(options(false));
        assertTrue(ok.getSessionPresent(), "no session present on reconnect with cleanSession=false");
        for (int i = 0; i < n; i++) {
            Received r = next(inbox, "queued message " + i + " of " + n);
            assertEquals(t, r.topic());
            assertEquals("away-" + i, r.text(), "queued message " + i);
            assertEquals(1, r.message().getQos());
        }
        // The session keeps its subscription: a new publish arrives too.
        pub.publish(t, message("after", 1, false));
        assertEquals("after", next(inbox, "publish after reconnect").text());
        again.disconnect();
        // Drop the session (clean session connect) so the broker does not keep it.
        MqttClient clean = client(id, null);
        clean.connect(options(true));
        clean.disconnect();
    }

    @Test
    @Timeout(60)
    void willIsPublishedWhenTheConnectionDrops() throws Exception {
        String t = topic("will");
        BlockingQueue<Received> inbox = new LinkedBlockingQueue<>();
        MqttClient watcher = client(id("watcher"), inbox);
        watcher.connect(options(true));
        subscribe(watcher, t, 1);

        // A clean DISCONNECT discards the will.
        MqttClient polite = client(id("polite"), null);
        MqttConnectOptions po = options(true);
        po.setWill(t, "polite-will".getBytes(StandardCharsets.UTF_8), 1, false);
        polite.connect(po);
        polite.disconnect();

        MqttClient doomed = client(id("doomed"), null);
        MqttConnectOptions o = options(true);
        o.setWill(t, "doomed-will".getBytes(StandardCharsets.UTF_8), 1, false);
        doomed.connect(o);
        assertTrue(doomed.isConnected());
        // Closes the socket without sending DISCONNECT: the broker sees the connection drop.
        doomed.disconnectForcibly(0, WAIT_MS, false);
        assertFalse(doomed.isConnected());

        Received r = next(inbox, "will of the dropped client");
        assertEquals(t, r.topic());
        assertEquals("doomed-will", r.text(),
                "first message on the will topic (polite-will = will sent after a clean DISCONNECT)");
        assertEquals(1, r.message().getQos());
        assertTrue(inbox.isEmpty(), "more on the will topic: " + inbox);
    }
}
