package dev.tributary.compat;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.BuiltinExchangeType;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.DefaultConsumer;
import com.rabbitmq.client.Envelope;
import com.rabbitmq.client.GetResponse;
import com.rabbitmq.client.MessageProperties;
import com.rabbitmq.client.Return;
import com.rabbitmq.client.ShutdownSignalException;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;

/**
 * AMQP 0-9-1 scenarios with the RabbitMQ Java client (com.rabbitmq:amqp-client). The same
 * tests run against Tributary ({@link TributaryAmqpTest}) and RabbitMQ ({@link RabbitMqAmqpTest});
 * every queue and exchange name carries this run's prefix, and the tests delete what they
 * declared, so runs do not collide on a shared reference broker.
 */
abstract class AmqpCompatTests {
    static final long WAIT_MS = 10_000;
    static final int PRECONDITION_FAILED = 406;
    static final int NO_ROUTE = 312;
    static final long POLL_MS = 20;

    /** HOST:PORT of the broker under test. */
    protected abstract String address();

    private final String prefix = "java-" + UUID.randomUUID().toString().substring(0, 8) + "-";
    private final List<Connection> connections = new ArrayList<>();
    private final List<String> queues = new ArrayList<>();
    private final List<String> exchanges = new ArrayList<>();

    private Connection connect() throws Exception {
        String[] hp = address().split(":");
        ConnectionFactory f = new ConnectionFactory();
        f.setHost(hp[0]);
        f.setPort(Integer.parseInt(hp[1]));
        f.setUsername("guest");
        f.setPassword("guest");
        f.setVirtualHost("/");
        f.setConnectionTimeout((int) WAIT_MS);
        f.setHandshakeTimeout((int) WAIT_MS);
        f.setChannelRpcTimeout((int) WAIT_MS);
        f.setAutomaticRecoveryEnabled(false);
        f.setTopologyRecoveryEnabled(false);
        Connection c = f.newConnection("tributary-compat-java");
        connections.add(c);
        return c;
    }

    private String queue(String name) {
        queues.add(prefix + name);
        return prefix + name;
    }

    private String exchange(String name) {
        exchanges.add(prefix + name);
        return prefix + name;
    }

    @AfterEach
    void cleanUp() throws Exception {
        try {
            if (!queues.isEmpty() || !exchanges.isEmpty()) {
                Channel ch = connect().createChannel();
                for (String q : queues) {
                    ch.queueDelete(q);
                }
                for (String e : exchanges) {
                    ch.exchangeDelete(e);
                }
            }
        } finally {
            for (Connection c : connections) {
                if (c.isOpen()) {
                    c.abort((int) WAIT_MS);
                }
            }
        }
    }

    private static byte[] utf8(String s) {
        return s.getBytes(StandardCharsets.UTF_8);
    }

    private static String text(byte[] b) {
        return new String(b, StandardCharsets.UTF_8);
    }

    /** basic.get until a message arrives or the deadline passes. */
    private static GetResponse waitGet(Channel ch, String q, boolean autoAck) throws Exception {
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(WAIT_MS);
        while (true) {
            GetResponse r = ch.basicGet(q, autoAck);
            if (r != null) {
                return r;
            }
            if (System.nanoTime() > deadline) {
                fail("no message in " + q + " within " + WAIT_MS + " ms");
            }
            Thread.sleep(POLL_MS); // the poll interval: basic.get has nothing to wait on
        }
    }

    @Test
    @Timeout(60)
    void guestLoginAndConfirmCapabilities() throws Exception {
        Connection c = connect();
        assertTrue(c.isOpen());
        Object caps = c.getServerProperties().get("capabilities");
        assertInstanceOf(Map.class, caps, "server properties: " + c.getServerProperties());
        assertEquals(Boolean.TRUE, ((Map<?, ?>) caps).get("publisher_confirms"), "capabilities: " + caps);
        assertEquals(Boolean.TRUE, ((Map<?, ?>) caps).get("basic.nack"), "capabilities: " + caps);
    }

    @Test
    @Timeout(90)
    void confirmedPersistentPublishThenPrefetchConsumeInOrder() throws Exception {
        final int n = 500;
        final int prefetch = 50;
        String q = queue("durable");
        Connection c = connect();
        Channel pub = c.createChannel();
        AMQP.Queue.DeclareOk ok = pub.queueDeclare(q, true, false, false, null);
        assertEquals(q, ok.getQueue());
        assertEquals(0, ok.getMessageCount());
        pub.confirmSelect();
        for (int i = 0; i < n; i++) {
            pub.basicPublish("", q, MessageProperties.PERSISTENT_TEXT_PLAIN, utf8("m-" + i));
        }
        pub.waitForConfirmsOrDie(WAIT_MS * 3);
        assertEquals(n, pub.queueDeclarePassive(q).getMessageCount(), "ready after confirms");

        Channel sub = c.createChannel();
        sub.basicQos(prefetch);
        record Delivery(Envelope envelope, AMQP.BasicProperties props, String body) {}
        BlockingQueue<Delivery> deliveries = new LinkedBlockingQueue<>();
        sub.basicConsume(q, false, new DefaultConsumer(sub) {
            @Override
            public void handleDelivery(String tag, Envelope env, AMQP.BasicProperties props, byte[] body) {
                deliveries.add(new Delivery(env, props, text(body)));
            }
        });
        List<Delivery> got = new ArrayList<>();
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
        while (got.size() < n) {
            Delivery d = deliveries.poll(Math.max(1, deadline - System.nanoTime()), TimeUnit.NANOSECONDS);
            if (d == null) {
                fail("received " + got.size() + " of " + n + " within 60 s");
            }
            got.add(d);
            if (got.size() == prefetch) {
                // Nothing acked yet: the broker stops at the prefetch window, so exactly
                // n - prefetch messages are still ready.
                assertEquals(n - prefetch, pub.queueDeclarePassive(q).getMessageCount(),
                        "ready messages with " + prefetch + " unacked deliveries (basic.qos " + prefetch + ")");
                assertTrue(deliveries.isEmpty(), "more than " + prefetch + " unacked deliveries");
                for (Delivery u : got) {
                    sub.basicAck(u.envelope().getDeliveryTag(), false);
                }
            } else if (got.size() > prefetch) {
                sub.basicAck(d.envelope().getDeliveryTag(), false);
            }
        }
        for (int i = 0; i < n; i++) {
            Delivery d = got.get(i);
            assertEquals("m-" + i, d.body(), "delivery " + i);
            assertFalse(d.envelope().isRedeliver(), "delivery " + i + " flagged redelivered");
            assertEquals(2, d.props().getDeliveryMode(), "delivery mode of delivery " + i);
        }
        assertEquals(0, pub.queueDeclarePassive(q).getMessageCount());
    }

    @Test
    @Timeout(60)
    void basicGetOnAnEmptyQueueIsNull() throws Exception {
        String q = queue("get");
        Channel ch = connect().createChannel();
        ch.queueDeclare(q, false, false, false, null);
        assertNull(ch.basicGet(q, true), "basic.get on a new queue");
        ch.confirmSelect();
        ch.basicPublish("", q, null, utf8("one"));
        ch.waitForConfirmsOrDie(WAIT_MS);
        GetResponse r = ch.basicGet(q, true);
        assertNotNull(r, "basic.get after a confirmed publish");
        assertEquals("one", text(r.getBody()));
        assertEquals(0, r.getMessageCount(), "message-count of get-ok");
        assertNull(ch.basicGet(q, true), "basic.get once the only message was taken");
    }

    @Test
    @Timeout(60)
    void txCommitsAFanoutPublishAndAnAckTogetherAndRollbackUndoesBoth() throws Exception {
        String ex = exchange("tx-fan");
        String in = queue("tx-in");
        String out1 = queue("tx-out1");
        String out2 = queue("tx-out2");
        Connection c = connect();
        Channel ch = c.createChannel();
        ch.exchangeDeclare(ex, BuiltinExchangeType.FANOUT, false);
        for (String q : List.of(in, out1, out2)) {
            ch.queueDeclare(q, false, false, false, null);
        }
        ch.queueBind(out1, ex, "");
        ch.queueBind(out2, ex, "");
        ch.basicPublish("", in, null, utf8("job"));
        Channel watcher = c.createChannel();
        ch.txSelect();
        GetResponse job = waitGet(ch, in, false);
        long tag = job.getEnvelope().getDeliveryTag();

        // Rolled back: no copy anywhere, the ack undone (the job still unacked on ch).
        ch.basicPublish(ex, "", null, utf8("rolled back"));
        ch.basicAck(tag, false);
        ch.txRollback();
        assertEquals(0, watcher.messageCount(out1));
        assertEquals(0, watcher.messageCount(out2));
        assertNull(ch.basicGet(in, false), "the job is not back in its queue after the rollback");

        // Committed: both copies and the ack, all there once commit-ok arrived.
        ch.basicPublish(ex, "", null, utf8("done job"));
        ch.basicAck(tag, false);
        ch.txCommit();
        for (String q : List.of(out1, out2)) {
            GetResponse r = watcher.basicGet(q, true);
            assertNotNull(r, "no copy in " + q + " after commit-ok");
            assertEquals("done job", text(r.getBody()));
            assertNull(watcher.basicGet(q, true), q + " holds more than the committed copy");
        }
        ch.close();
        assertNull(watcher.basicGet(in, true), "the committed ack did not hold after close");
    }

    @Test
    @Timeout(60)
    void topicBindingStarMatchesExactlyOneWord() throws Exception {
        String ex = exchange("topic");
        String q = queue("topic");
        Channel ch = connect().createChannel();
        ch.exchangeDeclare(ex, BuiltinExchangeType.TOPIC, false);
        ch.queueDeclare(q, false, false, false, null);
        ch.queueBind(q, ex, "a.*");
        BlockingQueue<Return> returns = new LinkedBlockingQueue<>();
        ch.addReturnListener(returns::add);
        ch.confirmSelect();
        // a.b.c first: had it been routed it would be the first message of the queue.
        ch.basicPublish(ex, "a.b.c", true, null, utf8("a.b.c"));
        ch.basicPublish(ex, "a.b", true, null, utf8("a.b"));
        ch.waitForConfirmsOrDie(WAIT_MS);
        // The spec sends basic.return before the basic.ack of an unroutable mandatory message.
        Return r = returns.poll(WAIT_MS, TimeUnit.MILLISECONDS);
        assertNotNull(r, "no basic.return for a.b.c");
        assertTrue(returns.isEmpty(), "more than one basic.return: " + returns);
        assertEquals("a.b.c", r.getRoutingKey());
        assertEquals(NO_ROUTE, r.getReplyCode());
        assertEquals("a.b.c", text(r.getBody()));
        GetResponse g = ch.basicGet(q, true);
        assertNotNull(g, "a.b was not routed by a.*");
        assertEquals("a.b", text(g.getBody()));
        assertEquals("a.b", g.getEnvelope().getRoutingKey());
        assertNull(ch.basicGet(q, true), "a.*-bound queue holds more than a.b");
    }

    @Test
    @Timeout(60)
    void rejectedMessageIsDeadLetteredWithXDeath() throws Exception {
        String dlx = exchange("dlx");
        String dlq = queue("dlq");
        String src = queue("src");
        Channel ch = connect().createChannel();
        ch.exchangeDeclare(dlx, BuiltinExchangeType.FANOUT, false);
        ch.queueDeclare(dlq, false, false, false, null);
        ch.queueBind(dlq, dlx, "");
        ch.queueDeclare(src, false, false, false, Map.of("x-dead-letter-exchange", dlx));
        ch.confirmSelect();
        ch.basicPublish("", src, MessageProperties.TEXT_PLAIN, utf8("doomed"));
        ch.waitForConfirmsOrDie(WAIT_MS);
        GetResponse m = waitGet(ch, src, false);
        assertEquals("doomed", text(m.getBody()));
        ch.basicReject(m.getEnvelope().getDeliveryTag(), false);

        GetResponse dead = waitGet(ch, dlq, true);
        assertEquals("doomed", text(dead.getBody()));
        Map<String, Object> headers = dead.getProps().getHeaders();
        assertNotNull(headers, "dead-lettered message has no headers");
        Object xDeath = headers.get("x-death");
        assertInstanceOf(List.class, xDeath, "x-death header: " + headers);
        List<?> deaths = (List<?>) xDeath;
        assertEquals(1, deaths.size(), "x-death: " + deaths);
        Map<?, ?> death = (Map<?, ?>) deaths.get(0);
        assertEquals(1L, ((Number) death.get("count")).longValue(), "x-death: " + death);
        assertEquals("rejected", String.valueOf(death.get("reason")), "x-death: " + death);
        assertEquals(src, String.valueOf(death.get("queue")), "x-death: " + death);
        assertEquals("", String.valueOf(death.get("exchange")), "x-death: " + death);
        assertInstanceOf(List.class, death.get("routing-keys"), "x-death: " + death);
        assertEquals(List.of(src), ((List<?>) death.get("routing-keys")).stream().map(String::valueOf).toList(),
                "x-death: " + death);
        assertInstanceOf(java.util.Date.class, death.get("time"), "x-death: " + death);
        assertEquals("rejected", String.valueOf(headers.get("x-first-death-reason")), "headers: " + headers);
        assertEquals(src, String.valueOf(headers.get("x-first-death-queue")), "headers: " + headers);
        assertNull(ch.basicGet(src, true), "the rejected message is still in its queue");
    }

    @Test
    @Timeout(60)
    void redeclaringAQueueWithOtherArgumentsIs406() throws Exception {
        String q = queue("args");
        Connection c = connect();
        Channel ch = c.createChannel();
        ch.queueDeclare(q, true, false, false, Map.of("x-max-length", 10));
        IOException e = assertThrows(IOException.class,
                () -> ch.queueDeclare(q, true, false, false, Map.of("x-max-length", 20)));
        ShutdownSignalException sse = assertInstanceOf(ShutdownSignalException.class, e.getCause(),
                "cause of " + e);
        assertFalse(sse.isHardError(), "a connection error, not a channel error: " + sse);
        AMQP.Channel.Close close = assertInstanceOf(AMQP.Channel.Close.class, sse.getReason());
        assertEquals(PRECONDITION_FAILED, close.getReplyCode(), close.getReplyText());
        assertFalse(ch.isOpen(), "the channel is still open");
        assertTrue(c.isOpen(), "the connection was closed");
        // The queue keeps its first arguments, and the connection still works.
        Channel again = c.createChannel();
        assertEquals(0, again.queueDeclare(q, true, false, false, Map.of("x-max-length", 10)).getMessageCount());
    }
}
