package dev.tributary.compat;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collection;
import java.util.Collections;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeSet;
import java.util.UUID;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.function.BooleanSupplier;
import java.util.stream.Collectors;
import java.util.stream.IntStream;
import org.apache.rocketmq.client.ClientConfig;
import org.apache.rocketmq.client.QueryResult;
import org.apache.rocketmq.client.consumer.DefaultLitePullConsumer;
import org.apache.rocketmq.client.consumer.DefaultMQPushConsumer;
import org.apache.rocketmq.client.consumer.listener.ConsumeConcurrentlyStatus;
import org.apache.rocketmq.client.consumer.listener.ConsumeOrderlyStatus;
import org.apache.rocketmq.client.consumer.listener.MessageListenerConcurrently;
import org.apache.rocketmq.client.consumer.listener.MessageListenerOrderly;
import org.apache.rocketmq.client.producer.DefaultMQProducer;
import org.apache.rocketmq.client.producer.LocalTransactionState;
import org.apache.rocketmq.client.producer.SendCallback;
import org.apache.rocketmq.client.producer.SendResult;
import org.apache.rocketmq.client.producer.SendStatus;
import org.apache.rocketmq.client.producer.TransactionListener;
import org.apache.rocketmq.client.producer.TransactionMQProducer;
import org.apache.rocketmq.client.producer.TransactionSendResult;
import org.apache.rocketmq.common.TopicConfig;
import org.apache.rocketmq.common.consumer.ConsumeFromWhere;
import org.apache.rocketmq.common.message.Message;
import org.apache.rocketmq.common.message.MessageExt;
import org.apache.rocketmq.common.message.MessageQueue;
import org.apache.rocketmq.remoting.RPCHook;
import org.apache.rocketmq.remoting.protocol.RemotingCommand;
import org.apache.rocketmq.remoting.protocol.body.ClusterInfo;
import org.apache.rocketmq.remoting.protocol.heartbeat.MessageModel;
import org.apache.rocketmq.remoting.protocol.route.BrokerData;
import org.apache.rocketmq.remoting.protocol.route.QueueData;
import org.apache.rocketmq.remoting.protocol.route.TopicRouteData;
import org.apache.rocketmq.tools.admin.DefaultMQAdminExt;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.TestInstance;
import org.junit.jupiter.api.Timeout;

/**
 * RocketMQ over its Remoting protocol with the Java client (rocketmq-client: DefaultMQProducer,
 * TransactionMQProducer, DefaultMQPushConsumer, DefaultLitePullConsumer; rocketmq-tools'
 * DefaultMQAdminExt for topics and queries). Every client is given the NameServer address only;
 * the brokers come from the routes it serves. Run against Tributary by
 * {@link TributaryRocketMqTest} and against Apache RocketMQ by {@link ApacheRocketMqTest}.
 *
 * <p>Each test creates its own topic ({@value #QUEUES} queues, through the admin's
 * UPDATE_AND_CREATE_TOPIC on every broker of the cluster) and groups, named with a random
 * suffix, and waits until the NameServer serves the topic's route. Every wait polls a condition
 * with a deadline. The clients poll the NameServer every second, heartbeat every second and
 * rebalance every second (RocketMQ's defaults: 30 s, 30 s, 20 s), so routes of topics the broker
 * creates itself (retry, dead-letter) and a transactional producer's membership are seen in
 * time.
 *
 * <p>The transaction check-back scenario needs the broker to check a half message within seconds:
 * the reference runs with {@code transactionCheckInterval=2000} and {@code transactionTimeOut=1000}
 * (scripts/brokers.sh), Tributary with the equivalent flags (see {@link TributaryRocketMqTest}).
 */
@TestInstance(TestInstance.Lifecycle.PER_CLASS) // one admin client for the class: its shutdown takes seconds
abstract class RocketMqCompatTests {
    static final Duration WAIT = Duration.ofSeconds(30);
    static final int QUEUES = 4;

    static {
        // A push consumer rebalances every 20 s by default (and at once only on its start and
        // when the broker says the group changed): the route of its group's retry topic, which
        // the broker creates on the first heartbeat, would otherwise be picked up that late.
        System.setProperty("rocketmq.client.rebalance.waitInterval", "1000");
    }

    private final String run = UUID.randomUUID().toString().replace("-", "").substring(0, 10);
    private final AtomicInteger clients = new AtomicInteger();
    /** Shut down after each test, last started first. */
    private final List<Runnable> shutdowns = new ArrayList<>();
    private DefaultMQAdminExt admin;

    private static final boolean TRACE = Boolean.getBoolean("rocketmq.compat.trace");
    private final long t0 = System.nanoTime();

    /** With -Drocketmq.compat.trace=true: the steps of each test, timed, on stderr. */
    void mark(String what) {
        if (TRACE) {
            System.err.printf("[%6d ms] %s%n", TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - t0), what);
        }
    }

    /** HOST:PORT of the NameServer under test. */
    protected abstract String namesrv();

    /**
     * With tracing on, records the Remoting request codes this test's clients send (and the
     * requests brokers send them: "<-"), in first-seen order; printed after the test.
     */
    private final Set<String> requestCodes = Collections.synchronizedSet(new java.util.LinkedHashSet<>());
    private static final Map<Integer, String> CODE_NAMES = new HashMap<>();

    static {
        for (java.lang.reflect.Field f : org.apache.rocketmq.remoting.protocol.RequestCode.class.getFields()) {
            if (java.lang.reflect.Modifier.isStatic(f.getModifiers()) && f.getType() == int.class) {
                try {
                    CODE_NAMES.putIfAbsent(f.getInt(null), f.getName());
                } catch (IllegalAccessException e) {
                    throw new IllegalStateException(e);
                }
            }
        }
    }

    private RPCHook hook() {
        if (!TRACE) {
            return null;
        }
        return new RPCHook() {
            @Override
            public void doBeforeRequest(String remoteAddr, RemotingCommand request) {
                // Requests from a broker are handled on the client's executor threads.
                boolean incoming = Thread.currentThread().getName().startsWith("NettyClientPublicExecutor");
                requestCodes.add((incoming ? "<-" : "") + CODE_NAMES.getOrDefault(request.getCode(), "?")
                        + "(" + request.getCode() + ")");
            }

            @Override
            public void doAfterResponse(String remoteAddr, RemotingCommand request, RemotingCommand response) {}
        };
    }

    @AfterEach
    void shutdownClients() {
        List<Runnable> all = new ArrayList<>(shutdowns);
        Collections.reverse(all);
        shutdowns.clear();
        for (Runnable r : all) {
            try {
                r.run();
            } catch (RuntimeException e) {
                System.err.println("rocketmq client shutdown: " + e);
            }
        }
        if (TRACE) {
            mark("request codes: " + String.join(" ", requestCodes));
            requestCodes.clear();
        }
    }

    // ---------------------------------------------------------------- helpers

    private String name(String what) {
        return "tributary_" + what + "_" + run;
    }

    private void onShutdown(String what, Runnable shutdown) {
        shutdowns.add(() -> {
            long t = System.nanoTime();
            shutdown.run();
            mark(what + " shutdown took " + TimeUnit.NANOSECONDS.toMillis(System.nanoTime() - t) + " ms");
        });
    }

    private <C extends ClientConfig> C configure(C client) {
        client.setNamesrvAddr(namesrv());
        client.setInstanceName("compat-" + run + "-" + clients.incrementAndGet());
        client.setPollNameServerInterval(1000);
        client.setHeartbeatBrokerInterval(1000);
        return client;
    }

    private DefaultMQProducer producer(String group) throws Exception {
        DefaultMQProducer p = configure(new DefaultMQProducer(group, hook()));
        p.setRetryTimesWhenSendFailed(0); // a failed send fails the test, not a silent retry
        p.start();
        onShutdown("producer " + group, p::shutdown);
        return p;
    }

    /** A push consumer subscribed to {@code topic}; the caller sets its listener and starts it. */
    private DefaultMQPushConsumer pushConsumer(String group, String topic, String expression)
            throws Exception {
        DefaultMQPushConsumer c = configure(new DefaultMQPushConsumer(group, hook()));
        c.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET);
        c.subscribe(topic, expression);
        onShutdown("push consumer " + group, c::shutdown);
        return c;
    }

    private DefaultLitePullConsumer litePull(String group) {
        DefaultLitePullConsumer c = configure(new DefaultLitePullConsumer(group, hook()));
        c.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET);
        c.setPollTimeoutMillis(500);
        onShutdown("lite pull consumer " + group, c::shutdown);
        return c;
    }

    private DefaultMQAdminExt admin() throws Exception {
        if (admin == null) {
            DefaultMQAdminExt a = configure(new DefaultMQAdminExt(hook()));
            a.setAdminExtGroup("tributary_admin_" + run);
            a.start();
            admin = a;
        }
        return admin;
    }

    @AfterAll
    void shutdownAdmin() {
        if (admin != null) {
            admin.shutdown();
            admin = null;
        }
    }

    /**
     * Creates {@code topic} with {@link #QUEUES} read and write queues on every master broker of
     * every cluster the NameServer knows, then waits until the NameServer serves its route.
     */
    private String createTopic(String what) throws Exception {
        String topic = name(what);
        DefaultMQAdminExt admin = admin();
        ClusterInfo cluster = admin.examineBrokerClusterInfo();
        List<String> masters = new ArrayList<>();
        for (BrokerData b : cluster.getBrokerAddrTable().values()) {
            String addr = b.getBrokerAddrs().get(0L);
            if (addr != null) {
                masters.add(addr);
            }
        }
        assertFalse(masters.isEmpty(), "the NameServer knows no master broker: " + cluster.getBrokerAddrTable());
        TopicConfig config = new TopicConfig(topic, QUEUES, QUEUES);
        for (String addr : masters) {
            admin.createAndUpdateTopicConfig(addr, config);
        }
        await("route of " + topic + " with " + QUEUES + " queues per broker", WAIT, () -> {
            try {
                TopicRouteData route = admin.examineTopicRouteInfo(topic);
                List<QueueData> qs = route.getQueueDatas();
                return qs != null && qs.size() == masters.size()
                        && qs.stream().allMatch(q -> q.getReadQueueNums() == QUEUES && q.getWriteQueueNums() == QUEUES);
            } catch (Exception e) {
                return false; // TOPIC_NOT_EXIST until the broker has registered it
            }
        });
        mark("created " + topic);
        return topic;
    }

    static void await(String what, Duration timeout, BooleanSupplier condition) throws InterruptedException {
        long deadline = System.nanoTime() + timeout.toNanos();
        while (!condition.getAsBoolean()) {
            if (System.nanoTime() > deadline) {
                fail("timed out after " + timeout.toMillis() + " ms waiting for " + what);
            }
            Thread.sleep(50);
        }
    }

    /** Polls {@code consumer} until {@code done} holds for what it returned; returns everything. */
    static List<MessageExt> pollUntil(DefaultLitePullConsumer consumer, String what,
            java.util.function.Predicate<List<MessageExt>> done) throws InterruptedException {
        List<MessageExt> got = new ArrayList<>();
        long deadline = System.nanoTime() + WAIT.toNanos();
        while (!done.test(got)) {
            if (System.nanoTime() > deadline) {
                fail("timed out after " + WAIT.toMillis() + " ms polling for " + what + "; got "
                        + got.size() + ": " + bodies(got));
            }
            got.addAll(consumer.poll(500));
        }
        return got;
    }

    static String body(MessageExt m) {
        return new String(m.getBody(), StandardCharsets.UTF_8);
    }

    static List<String> bodies(Collection<MessageExt> ms) {
        return ms.stream().map(RocketMqCompatTests::body).collect(Collectors.toList());
    }

    static Message message(String topic, String tags, String keys, String body) {
        return new Message(topic, tags, keys, body.getBytes(StandardCharsets.UTF_8));
    }

    static void assertSent(SendResult r) {
        assertNotNull(r, "send result");
        assertEquals(SendStatus.SEND_OK, r.getSendStatus(), "send status of " + r);
        assertNotNull(r.getMsgId(), "message id of " + r);
        assertNotNull(r.getMessageQueue(), "queue of " + r);
    }

    // ---------------------------------------------------------------- scenarios

    @Test
    @Timeout(90)
    void syncSendThenLitePullKeepsBodyKeysTagsAndProperties() throws Exception {
        String topic = createTopic("sync");
        DefaultMQProducer producer = producer(name("sync_pg"));
        int n = 20;
        Map<String, SendResult> sent = new HashMap<>();
        for (int i = 0; i < n; i++) {
            Message m = message(topic, i % 2 == 0 ? "TagA" : "TagB", "key-" + i + " alt-" + i, "body-" + i);
            m.putUserProperty("idx", Integer.toString(i));
            m.putUserProperty("note", "caf\u00e9 \u2713 " + i);
            SendResult r = producer.send(m);
            assertSent(r);
            assertEquals(topic, r.getMessageQueue().getTopic());
            sent.put("body-" + i, r);
        }
        assertEquals(n, sent.values().stream().map(SendResult::getMsgId).distinct().count(), "distinct message ids");

        DefaultLitePullConsumer consumer = litePull(name("sync_cg"));
        consumer.subscribe(topic, "*");
        consumer.start();
        List<MessageExt> got = pollUntil(consumer, n + " messages", l -> l.size() >= n);
        assertEquals(n, got.size(), "one consumer, no rebalance: each message once; got " + bodies(got));
        for (MessageExt m : got) {
            String b = body(m);
            assertTrue(sent.containsKey(b), "unexpected " + b);
            int i = Integer.parseInt(m.getUserProperty("idx"));
            assertEquals("body-" + i, b);
            assertEquals(topic, m.getTopic());
            assertEquals(i % 2 == 0 ? "TagA" : "TagB", m.getTags(), "tags of " + b);
            assertEquals("key-" + i + " alt-" + i, m.getKeys(), "keys of " + b);
            assertEquals("caf\u00e9 \u2713 " + i, m.getUserProperty("note"), "property of " + b);
            assertEquals(sent.get(b).getMsgId(), m.getMsgId(), "message id of " + b);
            assertEquals(sent.get(b).getMessageQueue().getQueueId(), m.getQueueId(), "queue of " + b);
            assertEquals(sent.get(b).getQueueOffset(), m.getQueueOffset(), "queue offset of " + b);
            assertEquals(0, m.getReconsumeTimes());
            assertTrue(m.getBornTimestamp() > 0 && m.getStoreTimestamp() >= m.getBornTimestamp() - 1000,
                    "born " + m.getBornTimestamp() + " store " + m.getStoreTimestamp());
        }
    }

    @Test
    @Timeout(90)
    void asyncAndOnewaySendsReachAPushConsumer() throws Exception {
        String topic = createTopic("async");
        Set<String> got = ConcurrentHashMap.newKeySet();
        AtomicInteger deliveries = new AtomicInteger();
        DefaultMQPushConsumer consumer = pushConsumer(name("async_cg"), topic, "*");
        consumer.registerMessageListener((MessageListenerConcurrently) (msgs, ctx) -> {
            for (MessageExt m : msgs) {
                got.add(body(m));
                deliveries.incrementAndGet();
            }
            return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
        });
        consumer.start();

        DefaultMQProducer producer = producer(name("async_pg"));
        int n = 10;
        CountDownLatch acked = new CountDownLatch(n);
        List<Object> outcomes = new CopyOnWriteArrayList<>();
        for (int i = 0; i < n; i++) {
            producer.send(message(topic, "async", "a" + i, "async-" + i), new SendCallback() {
                @Override
                public void onSuccess(SendResult r) {
                    outcomes.add(r.getSendStatus());
                    acked.countDown();
                }

                @Override
                public void onException(Throwable e) {
                    outcomes.add(e);
                    acked.countDown();
                }
            });
        }
        for (int i = 0; i < n; i++) {
            producer.sendOneway(message(topic, "oneway", "o" + i, "oneway-" + i));
        }
        assertTrue(acked.await(WAIT.toMillis(), TimeUnit.MILLISECONDS), "async send callbacks");
        assertEquals(Collections.nCopies(n, SendStatus.SEND_OK), outcomes, "async send outcomes");

        Set<String> want = new TreeSet<>();
        IntStream.range(0, n).forEach(i -> {
            want.add("async-" + i);
            want.add("oneway-" + i);
        });
        await("all " + want.size() + " messages at the push consumer", WAIT, () -> got.containsAll(want));
        assertEquals(want, new TreeSet<>(got));
    }

    @Test
    @Timeout(90)
    void batchSendStoresTenMessagesInOneQueueInOrder() throws Exception {
        String topic = createTopic("batch");
        DefaultMQProducer producer = producer(name("batch_pg"));
        List<Message> batch = new ArrayList<>();
        for (int i = 0; i < 10; i++) {
            Message m = message(topic, "batch", "b" + i, "batch-" + i);
            m.putUserProperty("idx", Integer.toString(i));
            batch.add(m);
        }
        SendResult r = producer.send(batch);
        assertSent(r);
        // (The ids of a batch's result are not those the messages are stored with: rocketmq-client
        // 5.3.3 gives the messages new unique ids after the result's were taken.)
        assertEquals(10, r.getMsgId().split(",").length, "one id per message: " + r.getMsgId());

        DefaultLitePullConsumer consumer = litePull(name("batch_cg"));
        consumer.subscribe(topic, "*");
        consumer.start();
        mark("batch consumer started");
        List<MessageExt> got = pollUntil(consumer, "10 batched messages", l -> l.size() >= 10);
        mark("batch consumed");
        assertEquals(10, got.size(), "each once: " + bodies(got));
        got.sort((a, b) -> Long.compare(a.getQueueOffset(), b.getQueueOffset()));
        for (int i = 0; i < 10; i++) {
            MessageExt m = got.get(i);
            assertEquals("batch-" + i, body(m), "batch order");
            assertEquals("b" + i, m.getKeys());
            assertEquals("batch", m.getTags());
            assertEquals(Integer.toString(i), m.getUserProperty("idx"));
            assertEquals(r.getMessageQueue().getQueueId(), m.getQueueId(), "a batch goes to one queue");
            assertEquals(r.getQueueOffset() + i, m.getQueueOffset(), "consecutive offsets from the result's");
        }
    }

    @Test
    @Timeout(90)
    void tagExpressionDeliversOnlyMatchingTags() throws Exception {
        String topic = createTopic("tags");
        DefaultMQProducer producer = producer(name("tags_pg"));
        MessageQueue q0 = new MessageQueue(topic, producer.fetchPublishMessageQueues(topic).get(0).getBrokerName(), 0);
        // One queue, so when the last message comes back every earlier one has been filtered.
        List<String> want = new ArrayList<>();
        String[] tags = {"TagA", "TagB", "TagC"};
        for (int i = 0; i < 12; i++) {
            String tag = tags[i % 3];
            assertSent(producer.send(message(topic, tag, "t" + i, tag + "-" + i), q0));
            if (!tag.equals("TagC")) {
                want.add(tag + "-" + i);
            }
        }
        assertSent(producer.send(message(topic, "TagA", "last", "TagA-last"), q0));
        want.add("TagA-last");

        DefaultLitePullConsumer consumer = litePull(name("tags_cg"));
        consumer.subscribe(topic, "TagA || TagB");
        consumer.start();
        mark("tags consumer started");
        List<MessageExt> got = pollUntil(consumer, "TagA-last", l -> bodies(l).contains("TagA-last"));
        mark("tags consumed");
        assertEquals(want, bodies(got), "only TagA and TagB, in queue order");
        assertTrue(got.stream().allMatch(m -> m.getTags().equals("TagA") || m.getTags().equals("TagB")));
    }

    @Test
    @Timeout(90)
    void orderlyConsumerSeesEachOrderInSequence() throws Exception {
        String topic = createTopic("order");
        DefaultMQProducer producer = producer(name("order_pg"));
        int orders = 4;
        int steps = 6;
        for (int step = 0; step < steps; step++) {
            for (int order = 0; order < orders; order++) {
                Message m = message(topic, "order", "order-" + order, order + ":" + step);
                SendResult r = producer.send(m, (mqs, msg, arg) -> mqs.get((Integer) arg % mqs.size()), order);
                assertSent(r);
                assertEquals(order % QUEUES, r.getMessageQueue().getQueueId(), "selected queue");
            }
        }
        Map<Integer, List<Integer>> seen = new ConcurrentHashMap<>();
        AtomicInteger total = new AtomicInteger();
        DefaultMQPushConsumer consumer = pushConsumer(name("order_cg"), topic, "*");
        consumer.registerMessageListener((MessageListenerOrderly) (msgs, ctx) -> {
            for (MessageExt m : msgs) {
                String[] parts = body(m).split(":");
                seen.computeIfAbsent(Integer.parseInt(parts[0]), k -> new CopyOnWriteArrayList<>())
                        .add(Integer.parseInt(parts[1]));
                total.incrementAndGet();
            }
            return ConsumeOrderlyStatus.SUCCESS;
        });
        consumer.start();
        await(orders * steps + " ordered messages", WAIT, () -> total.get() >= orders * steps);
        List<Integer> sequence = IntStream.range(0, steps).boxed().collect(Collectors.toList());
        for (int order = 0; order < orders; order++) {
            assertEquals(sequence, seen.get(order), "steps of order " + order);
        }
        assertEquals(orders * steps, total.get(), "each once");
    }

    @Test
    @Timeout(90)
    void broadcastingDeliversEveryMessageToEveryConsumerOfTheGroup() throws Exception {
        String topic = createTopic("bcast");
        String group = name("bcast_cg");
        List<Set<String>> got = List.of(ConcurrentHashMap.newKeySet(), ConcurrentHashMap.newKeySet());
        for (Set<String> into : got) {
            DefaultMQPushConsumer c = pushConsumer(group, topic, "*");
            c.setMessageModel(MessageModel.BROADCASTING);
            c.registerMessageListener((MessageListenerConcurrently) (msgs, ctx) -> {
                msgs.forEach(m -> into.add(body(m)));
                return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
            });
            c.start();
        }
        DefaultMQProducer producer = producer(name("bcast_pg"));
        Set<String> want = new TreeSet<>();
        for (int i = 0; i < 12; i++) {
            assertSent(producer.send(message(topic, "b", "k" + i, "bcast-" + i)));
            want.add("bcast-" + i);
        }
        await("every message at both consumers", WAIT, () -> got.get(0).containsAll(want) && got.get(1).containsAll(want));
        assertEquals(want, new TreeSet<>(got.get(0)));
        assertEquals(want, new TreeSet<>(got.get(1)));
    }

    @Test
    @Timeout(90)
    void clusteringSplitsQueuesAndDeliversEachMessageOnce() throws Exception {
        String topic = createTopic("cluster");
        String group = name("cluster_cg");
        List<DefaultMQPushConsumer> consumers = new ArrayList<>();
        List<Map<String, Integer>> got = List.of(new ConcurrentHashMap<>(), new ConcurrentHashMap<>());
        List<Set<Integer>> queuesSeen = List.of(ConcurrentHashMap.newKeySet(), ConcurrentHashMap.newKeySet());
        for (int i = 0; i < 2; i++) {
            Map<String, Integer> into = got.get(i);
            Set<Integer> queues = queuesSeen.get(i);
            DefaultMQPushConsumer c = pushConsumer(group, topic, "*");
            c.registerMessageListener((MessageListenerConcurrently) (msgs, ctx) -> {
                for (MessageExt m : msgs) {
                    into.merge(body(m), 1, Integer::sum);
                    queues.add(m.getQueueId());
                }
                return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
            });
            c.start();
            consumers.add(c);
        }
        // Rebalance-free from here on: both members own disjoint halves of the queues.
        await("both consumers owning disjoint queues that cover the topic", WAIT, () -> {
            Set<Integer> a = assigned(consumers.get(0), topic);
            Set<Integer> b = assigned(consumers.get(1), topic);
            Set<Integer> all = new HashSet<>(a);
            all.addAll(b);
            return !a.isEmpty() && !b.isEmpty() && all.size() == QUEUES && a.size() + b.size() == QUEUES;
        });
        Set<Integer> ownedA = assigned(consumers.get(0), topic);
        Set<Integer> ownedB = assigned(consumers.get(1), topic);

        DefaultMQProducer producer = producer(name("cluster_pg"));
        Set<String> want = new TreeSet<>();
        for (int i = 0; i < 40; i++) {
            assertSent(producer.send(message(topic, "c", "k" + i, "cluster-" + i)));
            want.add("cluster-" + i);
        }
        await("every message at one of the consumers", WAIT, () -> {
            Set<String> all = new HashSet<>(got.get(0).keySet());
            all.addAll(got.get(1).keySet());
            return all.containsAll(want);
        });
        Set<String> overlap = new TreeSet<>(got.get(0).keySet());
        overlap.retainAll(got.get(1).keySet());
        assertEquals(Set.of(), overlap, "messages both members received");
        for (Map<String, Integer> counts : got) {
            counts.forEach((b, c) -> assertEquals(1, c, b + " deliveries"));
        }
        assertFalse(got.get(0).isEmpty(), "first member got nothing");
        assertFalse(got.get(1).isEmpty(), "second member got nothing");
        assertEquals(assigned(consumers.get(0), topic), ownedA, "first member's queues changed");
        assertEquals(assigned(consumers.get(1), topic), ownedB, "second member's queues changed");
        assertTrue(ownedA.containsAll(queuesSeen.get(0)), "first member got from " + queuesSeen.get(0) + ", owns " + ownedA);
        assertTrue(ownedB.containsAll(queuesSeen.get(1)), "second member got from " + queuesSeen.get(1) + ", owns " + ownedB);
    }

    /** The queue ids of {@code topic} the push consumer's rebalance has given it. */
    private static Set<Integer> assigned(DefaultMQPushConsumer c, String topic) {
        return c.getDefaultMQPushConsumerImpl().getRebalanceImpl().getProcessQueueTable().entrySet().stream()
                .filter(e -> e.getKey().getTopic().equals(topic) && !e.getValue().isDropped())
                .map(e -> e.getKey().getQueueId())
                .collect(Collectors.toCollection(TreeSet::new));
    }

    @Test
    @Timeout(90)
    void delayLevelTwoIsDeliveredAboutFiveSecondsAfterSend() throws Exception {
        String topic = createTopic("delay");
        Map<String, Long> arrived = new ConcurrentHashMap<>();
        DefaultMQPushConsumer consumer = pushConsumer(name("delay_cg"), topic, "*");
        consumer.registerMessageListener((MessageListenerConcurrently) (msgs, ctx) -> {
            msgs.forEach(m -> arrived.putIfAbsent(body(m), System.nanoTime()));
            return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
        });
        consumer.start();
        DefaultMQProducer producer = producer(name("delay_pg"));
        Message delayed = message(topic, "d", "delayed", "delayed");
        delayed.setDelayTimeLevel(2); // 5 s in the default messageDelayLevel
        long sentAt = System.nanoTime();
        assertSent(producer.send(delayed));
        // A message sent after it, undelayed, arrives first: the consumer is live.
        assertSent(producer.send(message(topic, "d", "now", "now")));
        await("the undelayed message", WAIT, () -> arrived.containsKey("now"));
        assertFalse(arrived.containsKey("delayed"), "the delayed message came before the undelayed one");
        await("the delayed message", Duration.ofSeconds(20), () -> arrived.containsKey("delayed"));
        long ms = TimeUnit.NANOSECONDS.toMillis(arrived.get("delayed") - sentAt);
        assertTrue(ms >= 4500, "delay level 2 (5 s) delivered after " + ms + " ms");
        assertTrue(ms <= 15000, "delay level 2 (5 s) delivered after " + ms + " ms");
    }

    @Test
    @Timeout(90)
    void reconsumeLaterRetriesThenDeadLetters() throws Exception {
        String topic = createTopic("retry");
        String group = name("retry_cg");
        List<Integer> reconsumeTimes = new CopyOnWriteArrayList<>();
        List<String> retryTopics = new CopyOnWriteArrayList<>();
        DefaultMQPushConsumer consumer = pushConsumer(group, topic, "*");
        consumer.setMaxReconsumeTimes(1);
        consumer.registerMessageListener((MessageListenerConcurrently) (msgs, ctx) -> {
            for (MessageExt m : msgs) {
                mark("delivery reconsumeTimes=" + m.getReconsumeTimes() + " topic=" + m.getTopic());
                reconsumeTimes.add(m.getReconsumeTimes());
                retryTopics.add(m.getProperty("RETRY_TOPIC") == null ? m.getTopic() : m.getProperty("RETRY_TOPIC"));
            }
            ctx.setDelayLevelWhenNextConsume(1); // retry after 1 s
            return ConsumeConcurrentlyStatus.RECONSUME_LATER;
        });
        consumer.start();
        // The retry topic's queue, or the redelivery waits for a later rebalance.
        await("the consumer to own the queue of %RETRY%" + group, WAIT,
                () -> !assigned(consumer, "%RETRY%" + group).isEmpty());
        mark("retry queue assigned");
        DefaultMQProducer producer = producer(name("retry_pg"));
        SendResult sent = producer.send(message(topic, "r", "poison", "poison"));
        assertSent(sent);
        await("a first delivery and one retry", WAIT, () -> reconsumeTimes.size() >= 2);
        assertEquals(List.of(0, 1), reconsumeTimes.subList(0, 2), "reconsume times of the deliveries");

        String dlq = "%DLQ%" + group;
        DefaultLitePullConsumer reader = litePull(name("dlq_reader"));
        reader.start();
        List<MessageQueue> queues = new ArrayList<>();
        await("the route of " + dlq, WAIT, () -> {
            try {
                queues.addAll(reader.fetchMessageQueues(dlq));
                return !queues.isEmpty();
            } catch (Exception e) {
                return false;
            }
        });
        mark("dlq route " + queues);
        reader.assign(queues);
        List<MessageExt> dead = pollUntil(reader, "the message in " + dlq, l -> !l.isEmpty());
        assertEquals(List.of("poison"), bodies(dead));
        assertEquals("poison", dead.get(0).getKeys());
        assertEquals(sent.getMsgId(), dead.get(0).getMsgId(), "the same message id in the DLQ");
        assertEquals(2, reconsumeTimes.size(), "deliveries after dead-lettering: " + reconsumeTimes);
    }

    /** Decides by the message's "decision" property; the check-back says COMMIT for UNKNOW ones. */
    static final class Decisions implements TransactionListener {
        final Map<String, Long> checkedAt = new ConcurrentHashMap<>();
        final List<String> checked = new CopyOnWriteArrayList<>();

        @Override
        public LocalTransactionState executeLocalTransaction(Message msg, Object arg) {
            return LocalTransactionState.valueOf(msg.getUserProperty("decision"));
        }

        @Override
        public LocalTransactionState checkLocalTransaction(MessageExt msg) {
            String b = body(msg);
            checked.add(b);
            checkedAt.putIfAbsent(b, System.nanoTime());
            return b.startsWith("rollback") ? LocalTransactionState.ROLLBACK_MESSAGE : LocalTransactionState.COMMIT_MESSAGE;
        }
    }

    @Test
    @Timeout(90)
    void transactionsCommitRollbackAndCheckBack() throws Exception {
        String topic = createTopic("txn");
        Map<String, Long> arrived = new ConcurrentHashMap<>();
        DefaultMQPushConsumer consumer = pushConsumer(name("txn_cg"), topic, "*");
        consumer.registerMessageListener((MessageListenerConcurrently) (msgs, ctx) -> {
            msgs.forEach(m -> arrived.putIfAbsent(body(m), System.nanoTime()));
            return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
        });
        consumer.start();

        TransactionMQProducer producer = configure(new TransactionMQProducer(name("txn_pg"), hook()));
        Decisions decisions = new Decisions();
        producer.setTransactionListener(decisions);
        producer.start();
        onShutdown("transaction producer", producer::shutdown);

        Map<String, LocalTransactionState> expect = Map.of(
                "commit", LocalTransactionState.COMMIT_MESSAGE,
                "rollback", LocalTransactionState.ROLLBACK_MESSAGE,
                "unknown", LocalTransactionState.UNKNOW);
        for (String b : List.of("commit", "rollback", "unknown")) {
            Message m = message(topic, "txn", b, b);
            m.putUserProperty("decision", expect.get(b).name());
            TransactionSendResult r = producer.sendMessageInTransaction(m, null);
            assertSent(r);
            assertEquals(expect.get(b), r.getLocalTransactionState(), "local state of " + b);
            assertNotNull(r.getTransactionId(), "transaction id of " + b);
        }
        long unknownSentAt = System.nanoTime();
        // On the same connection after the rollback's END_TRANSACTION: when it has been
        // delivered, the rollback has been decided.
        assertSent(producer.send(message(topic, "txn", "marker", "marker")));

        await("the committed message and the marker", WAIT, () -> arrived.containsKey("commit") && arrived.containsKey("marker"));
        await("the UNKNOW message, committed by the check-back", WAIT, () -> arrived.containsKey("unknown"));
        assertFalse(arrived.containsKey("rollback"), "the rolled back message was delivered");
        assertTrue(decisions.checkedAt.containsKey("unknown"), "no check-back for the UNKNOW message");
        assertTrue(decisions.checkedAt.get("unknown") <= arrived.get("unknown"), "delivered before its check-back");
        long checkAfter = TimeUnit.NANOSECONDS.toMillis(decisions.checkedAt.get("unknown") - unknownSentAt);
        assertTrue(checkAfter >= 500, "checked back " + checkAfter + " ms after the send, within the "
                + "transaction timeout (1 s)");
        // (Apache RocketMQ 5 may also check back committed and rolled back ones: it records
        // END_TRANSACTION outcomes in batches, every transactionOpBatchInterval, 3 s.)
        mark("checked back: " + decisions.checked);
        assertFalse(arrived.containsKey("rollback"), "the rolled back message was delivered");
    }

    @Test
    @Timeout(90)
    void queryByKeyAndById() throws Exception {
        String topic = createTopic("query");
        DefaultMQProducer producer = producer(name("query_pg"));
        String key = "order-" + run;
        long before = System.currentTimeMillis() - 60_000;
        SendResult r = producer.send(message(topic, "q", key, "find me"));
        assertSent(r);
        assertSent(producer.send(message(topic, "q", "other-" + run, "not me")));
        DefaultMQAdminExt admin = admin();
        List<MessageExt> found = new ArrayList<>();
        // The broker indexes keys asynchronously after the write.
        await("a query by key to find the message", WAIT, () -> {
            try {
                QueryResult q = admin.queryMessage(topic, key, 32, before, System.currentTimeMillis() + 60_000);
                found.clear();
                found.addAll(q.getMessageList());
                return !found.isEmpty();
            } catch (Exception e) {
                return false;
            }
        });
        mark("query found");
        assertEquals(List.of("find me"), bodies(found), "messages with key " + key);
        assertEquals(r.getMsgId(), found.get(0).getMsgId());
        MessageExt byId = admin.viewMessage(topic, r.getMsgId());
        assertEquals("find me", body(byId), "view by message id");
        assertEquals(key, byId.getKeys());
        // The offset message id names the broker's address and the message's place in its store.
        assertNotNull(r.getOffsetMsgId(), "offset message id");
        MessageExt byOffsetId = admin.viewMessage(topic, r.getOffsetMsgId());
        assertEquals("find me", body(byOffsetId), "view by offset message id " + r.getOffsetMsgId());
        assertEquals(r.getMsgId(), byOffsetId.getMsgId());
    }

    @Test
    @Timeout(90)
    void offsetForTimestampThenSeekReadsWhatWasSentAfter() throws Exception {
        String topic = createTopic("time");
        DefaultMQProducer producer = producer(name("time_pg"));
        MessageQueue q0 = new MessageQueue(topic, producer.fetchPublishMessageQueues(topic).get(0).getBrokerName(), 0);
        for (int i = 0; i < 5; i++) {
            assertSent(producer.send(message(topic, "t", "before" + i, "before-" + i), q0));
        }
        // Every "before" was stored by now (the send returned); the next millisecond on, only "after".
        long last = System.currentTimeMillis();
        while (System.currentTimeMillis() <= last) {
            Thread.onSpinWait();
        }
        long ts = System.currentTimeMillis();
        Long firstAfter = null;
        for (int i = 0; i < 5; i++) {
            SendResult r = producer.send(message(topic, "t", "after" + i, "after-" + i), q0);
            assertSent(r);
            if (firstAfter == null) {
                firstAfter = r.getQueueOffset();
            }
        }
        DefaultLitePullConsumer consumer = litePull(name("time_cg"));
        consumer.setAutoCommit(false);
        consumer.start();
        consumer.assign(List.of(q0));
        // rocketmq-client starts a pull at assign() (from the first offset here), and a seek
        // made while that pull is in flight can be overtaken by its answer (its task checks
        // the seek offset after the new task has already taken it): the whole queue came
        // first, or only it, in about one CI run in ten. So the whole queue is read first;
        // from then on every pull in flight is past the end, and the seek's own pull is the
        // only one that can bring messages.
        List<String> afters = List.of("after-0", "after-1", "after-2", "after-3", "after-4");
        List<String> wholeQueue = new java.util.ArrayList<>(List.of("before-0", "before-1", "before-2", "before-3", "before-4"));
        wholeQueue.addAll(afters);
        List<MessageExt> all = pollUntil(consumer, "the whole queue from the first offset",
            l -> l.size() >= wholeQueue.size());
        assertEquals(wholeQueue, bodies(all), "from the first offset");
        long offset = consumer.offsetForTimestamp(q0, ts);
        assertEquals(firstAfter.longValue(), offset, "offset for " + ts);
        consumer.seek(q0, offset);
        List<MessageExt> got = pollUntil(consumer, "the 5 messages after the timestamp", l -> l.size() >= 5);
        assertEquals(afters, bodies(got), "from the seek on");
    }

    @Test
    @Timeout(90)
    void committedOffsetsResumeTheGroupWhereItStopped() throws Exception {
        String topic = createTopic("resume");
        String group = name("resume_cg");
        DefaultMQProducer producer = producer(name("resume_pg"));
        Set<String> first = new TreeSet<>();
        Set<String> second = new TreeSet<>();
        for (int i = 0; i < 10; i++) {
            assertSent(producer.send(message(topic, "r", "f" + i, "first-" + i)));
            first.add("first-" + i);
        }
        Set<String> gotFirst = ConcurrentHashMap.newKeySet();
        DefaultMQPushConsumer c1 = pushConsumer(group, topic, "*");
        c1.registerMessageListener((MessageListenerConcurrently) (msgs, ctx) -> {
            msgs.forEach(m -> gotFirst.add(body(m)));
            return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
        });
        c1.start();
        await("the first half", WAIT, () -> gotFirst.containsAll(first));
        mark("first half consumed");
        c1.shutdown(); // commits the consumed offsets
        mark("c1 shut down");

        for (int i = 0; i < 10; i++) {
            assertSent(producer.send(message(topic, "r", "s" + i, "second-" + i)));
            second.add("second-" + i);
        }
        List<String> gotSecond = new CopyOnWriteArrayList<>();
        DefaultMQPushConsumer c2 = pushConsumer(group, topic, "*");
        c2.registerMessageListener((MessageListenerConcurrently) (msgs, ctx) -> {
            msgs.forEach(m -> gotSecond.add(body(m)));
            return ConsumeConcurrentlyStatus.CONSUME_SUCCESS;
        });
        c2.start();
        mark("c2 started");
        await("the second half after the restart", WAIT, () -> gotSecond.containsAll(second));
        mark("second half consumed");
        // At least once: a tail of the first half may come again, never the whole of it.
        assertFalse(gotSecond.contains("first-0"), "the group started over: " + gotSecond);
        List<String> again = gotSecond.stream().filter(first::contains).collect(Collectors.toList());
        assertTrue(again.size() < first.size(), "the whole first half again: " + again);
        if (!again.isEmpty()) {
            System.err.println("committed offsets: redelivered after the restart " + again);
        }
    }
}
