package dev.tributary.compat;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import com.rabbitmq.client.AMQP;
import com.rabbitmq.client.Channel;
import com.rabbitmq.client.Connection;
import com.rabbitmq.client.ConnectionFactory;
import com.rabbitmq.client.DefaultConsumer;
import com.rabbitmq.client.Envelope;
import com.rabbitmq.client.LongString;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.Future;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;
import org.apache.rocketmq.client.consumer.DefaultLitePullConsumer;
import org.apache.rocketmq.client.producer.DefaultMQProducer;
import org.apache.rocketmq.client.producer.SendResult;
import org.apache.rocketmq.client.producer.SendStatus;
import org.apache.rocketmq.common.consumer.ConsumeFromWhere;
import org.apache.rocketmq.common.message.Message;
import org.apache.rocketmq.common.message.MessageExt;
import org.eclipse.paho.client.mqttv3.IMqttDeliveryToken;
import org.eclipse.paho.client.mqttv3.IMqttToken;
import org.eclipse.paho.client.mqttv3.MqttCallback;
import org.eclipse.paho.client.mqttv3.MqttClient;
import org.eclipse.paho.client.mqttv3.MqttConnectOptions;
import org.eclipse.paho.client.mqttv3.MqttMessage;
import org.eclipse.paho.client.mqttv3.persist.MemoryPersistence;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;
import org.junit.jupiter.api.extension.RegisterExtension;

/**
 * One store, several protocols (docs/compat/mapping.md): a Kafka topic is also the MQTT topic
 * of the same name, and the AMQP exchange of type {@code x-stream} of the same name on vhost
 * {@code /}. Records produced with kafka-clients reach Eclipse Paho (MQTT 3.1.1) subscribers
 * and queues bound with the RabbitMQ Java client; MQTT publishes and AMQP publishes to the
 * exchange are appended to the topic and read by a KafkaConsumer, with the MQTT topic or the
 * AMQP routing key as the record key.
 *
 * <p>These run against Tributary only: there is no reference broker for them, since no other
 * broker serves one store to Kafka, MQTT and AMQP clients at once. The Python clients'
 * version of these scenarios is in {@code compat-tests/cross/}.
 */
class CrossProtocolTest {
    @RegisterExtension
    static final TributaryExtension TRIBUTARY =
            new TributaryExtension(
                    "--kafka-listen", "--mqtt-listen", "--amqp-listen", "--namesrv-listen", "--rocketmq-listen");

    static final Duration WAIT = Duration.ofSeconds(30);

    private final String run = UUID.randomUUID().toString().substring(0, 8);
    private final List<AutoCloseable> closeables = new ArrayList<>();

    record Received(String topic, MqttMessage message) {
        String text() {
            return new String(message.getPayload(), StandardCharsets.UTF_8);
        }
    }

    record Delivery(Envelope envelope, AMQP.BasicProperties properties, byte[] body) {
        String text() {
            return new String(body, StandardCharsets.UTF_8);
        }
    }

    @AfterEach
    void cleanUp() {
        for (int i = closeables.size() - 1; i >= 0; i--) {
            try {
                closeables.get(i).close();
            } catch (Exception e) {
                // already closed, or the server went away: the extension reports that
            }
        }
        closeables.clear();
    }

    // -- Kafka

    private Properties kafkaProps() {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, TRIBUTARY.address("kafka"));
        return p;
    }

    private void createTopic(String topic, int partitions) throws Exception {
        try (Admin admin = Admin.create(kafkaProps())) {
            admin.createTopics(List.of(new NewTopic(topic, partitions, (short) 1)))
                    .all()
                    .get(WAIT.toMillis(), TimeUnit.MILLISECONDS);
        }
    }

    private KafkaProducer<String, String> producer(Map<String, String> extra) {
        Properties p = kafkaProps();
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.putAll(extra);
        KafkaProducer<String, String> producer = new KafkaProducer<>(p);
        closeables.add(producer);
        return producer;
    }

    /** Sends every record and waits for each acknowledgement, in send order. */
    private static List<RecordMetadata> sendAll(
            KafkaProducer<String, String> producer, List<ProducerRecord<String, String>> records)
            throws Exception {
        List<Future<RecordMetadata>> futures = new ArrayList<>();
        for (ProducerRecord<String, String> r : records) {
            futures.add(producer.send(r));
        }
        producer.flush();
        List<RecordMetadata> acked = new ArrayList<>();
        for (Future<RecordMetadata> f : futures) {
            acked.add(f.get(WAIT.toMillis(), TimeUnit.MILLISECONDS));
        }
        return acked;
    }

    /** Reads {@code n} records of {@code topic} from the start with a fresh group. */
    private List<ConsumerRecord<byte[], byte[]>> consume(String topic, int n) {
        Properties p = kafkaProps();
        p.put(ConsumerConfig.GROUP_ID_CONFIG, "java-cross-" + run + "-" + topic);
        p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
        List<ConsumerRecord<byte[], byte[]>> got = new ArrayList<>();
        try (KafkaConsumer<byte[], byte[]> c = new KafkaConsumer<>(p)) {
            c.subscribe(List.of(topic));
            long deadline = System.nanoTime() + WAIT.toNanos();
            while (got.size() < n) {
                if (System.nanoTime() > deadline) {
                    fail("read " + got.size() + " of " + n + " records of " + topic + " within " + WAIT);
                }
                c.poll(Duration.ofMillis(500)).forEach(got::add);
            }
        }
        assertEquals(n, got.size(), "records of " + topic + ": " + got);
        return got;
    }

    private static String utf8(byte[] b) {
        return b == null ? null : new String(b, StandardCharsets.UTF_8);
    }

    // -- MQTT

    private MqttClient mqtt(String name, BlockingQueue<Received> inbox) throws Exception {
        MqttClient c = new MqttClient(
                "tcp://" + TRIBUTARY.address("mqtt"), "java-" + run + "-" + name, new MemoryPersistence());
        c.setTimeToWait(WAIT.toMillis());
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
        MqttConnectOptions o = new MqttConnectOptions();
        o.setMqttVersion(MqttConnectOptions.MQTT_VERSION_3_1_1);
        o.setCleanSession(true);
        o.setConnectionTimeout((int) WAIT.toSeconds());
        o.setKeepAliveInterval(30);
        o.setAutomaticReconnect(false);
        o.setMaxInflight(250);
        c.connect(o);
        closeables.add(() -> {
            try {
                if (c.isConnected()) {
                    c.disconnect();
                }
            } finally {
                c.close();
            }
        });
        return c;
    }

    // -- AMQP

    private Channel amqpChannel() throws Exception {
        String[] hp = TRIBUTARY.address("amqp").split(":");
        ConnectionFactory f = new ConnectionFactory();
        f.setHost(hp[0]);
        f.setPort(Integer.parseInt(hp[1]));
        f.setUsername("guest");
        f.setPassword("guest");
        f.setVirtualHost("/");
        f.setConnectionTimeout((int) WAIT.toMillis());
        f.setHandshakeTimeout((int) WAIT.toMillis());
        f.setChannelRpcTimeout((int) WAIT.toMillis());
        f.setAutomaticRecoveryEnabled(false);
        f.setTopologyRecoveryEnabled(false);
        Connection c = f.newConnection("tributary-compat-java-cross");
        closeables.add(c);
        return c.createChannel();
    }

    // -- Tests

    @Test
    @Timeout(120)
    void kafkaRecordsReachMqttSubscribersOfTheSameTopicInKeyOrder() throws Exception {
        String topic = "plant-" + run;
        createTopic(topic, 3);

        BlockingQueue<Received> inbox = new LinkedBlockingQueue<>();
        MqttClient sub = mqtt("sub", inbox);
        IMqttToken t = sub.subscribeWithResponse(topic, 1);
        assertArrayEquals(new int[] {1}, t.getGrantedQos(), "granted QoS for " + topic);

        int n = 20;
        List<ProducerRecord<String, String>> records = new ArrayList<>();
        Map<String, List<String>> sentOfKey = new HashMap<>();
        for (int i = 0; i < n; i++) {
            String key = "k" + (i % 3);
            String value = "v" + i;
            ProducerRecord<String, String> r = new ProducerRecord<>(topic, key, value);
            r.headers().add("trace", ("t" + i).getBytes(StandardCharsets.UTF_8));
            records.add(r);
            sentOfKey.computeIfAbsent(key, k -> new ArrayList<>()).add(value);
        }
        KafkaProducer<String, String> producer = producer(Map.of(
                ProducerConfig.COMPRESSION_TYPE_CONFIG, "lz4", ProducerConfig.LINGER_MS_CONFIG, "5"));
        sendAll(producer, records);

        List<Received> got = new ArrayList<>();
        long deadline = System.nanoTime() + WAIT.toNanos();
        while (got.size() < n) {
            long left = deadline - System.nanoTime();
            Received r = left > 0 ? inbox.poll(left, TimeUnit.NANOSECONDS) : null;
            if (r == null) {
                fail("MQTT subscriber got " + got.size() + " of " + n + " records within " + WAIT + ": "
                        + got.stream().map(Received::text).toList());
            }
            got.add(r);
        }
        for (Received r : got) {
            assertEquals(topic, r.topic(), "topic of " + r.text());
            assertEquals(1, r.message().getQos(), "QoS of " + r.text());
        }
        List<String> want = new ArrayList<>();
        records.forEach(r -> want.add(r.value()));
        List<String> payloads = new ArrayList<>(got.stream().map(Received::text).toList());
        List<String> sortedGot = new ArrayList<>(payloads);
        List<String> sortedWant = new ArrayList<>(want);
        sortedGot.sort(null);
        sortedWant.sort(null);
        assertEquals(sortedWant, sortedGot, "payloads received over MQTT");
        // A key stays in one partition: its records arrive in the order produced.
        sentOfKey.forEach((key, values) -> assertEquals(
                values, payloads.stream().filter(values::contains).toList(), "order of " + key));
    }

    @Test
    @Timeout(120)
    void mqttPublishesAreAppendedWithTheTopicAsKey() throws Exception {
        String topic = "meters-" + run;
        createTopic(topic, 2);

        MqttClient pub = mqtt("pub", null);
        MqttMessage first = new MqttMessage("{\"kwh\": 1}".getBytes(StandardCharsets.UTF_8));
        first.setQos(1);
        MqttMessage second = new MqttMessage("second".getBytes(StandardCharsets.UTF_8));
        second.setQos(1);
        // MqttClient.publish blocks until the PUBACK: the append is durable by then.
        pub.publish(topic, first);
        pub.publish(topic, second);

        List<ConsumerRecord<byte[], byte[]>> got = consume(topic, 2);
        Map<String, ConsumerRecord<byte[], byte[]>> byValue = new HashMap<>();
        for (ConsumerRecord<byte[], byte[]> r : got) {
            byValue.put(utf8(r.value()), r);
            // The MQTT topic is the key: one topic's messages stay in one partition, in order.
            assertArrayEquals(topic.getBytes(StandardCharsets.UTF_8), r.key(),
                    "key of " + utf8(r.value()) + ": " + utf8(r.key()));
        }
        assertEquals(java.util.Set.of("{\"kwh\": 1}", "second"), byValue.keySet());
        assertEquals(got.get(0).partition(), got.get(1).partition(), "one key, one partition");
        assertEquals(List.of("{\"kwh\": 1}", "second"), got.stream().map(r -> utf8(r.value())).toList(),
                "publish order");
    }

    @Test
    @Timeout(120)
    void kafkaTopicsAreAmqpStreamExchangesBothWays() throws Exception {
        String topic = "ledger-" + run;
        createTopic(topic, 2);

        Channel ch = amqpChannel();
        // The exchange exists already: the topic made it.
        ch.exchangeDeclarePassive(topic);
        String queue = "java-" + run + "-audit";
        ch.queueDeclare(queue, true, false, false, null);
        closeables.add(() -> {
            try (Channel c = ch.getConnection().createChannel()) {
                c.queueDelete(queue);
            }
        });
        ch.queueBind(queue, topic, "");

        int n = 5;
        List<ProducerRecord<String, String>> records = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            ProducerRecord<String, String> r = new ProducerRecord<>(topic, "acct-" + (i % 2), "entry-" + i);
            r.headers().add("currency", "EUR".getBytes(StandardCharsets.UTF_8));
            records.add(r);
        }
        sendAll(producer(Map.of()), records);

        BlockingQueue<Delivery> deliveries = new LinkedBlockingQueue<>();
        ch.basicConsume(queue, true, new DefaultConsumer(ch) {
            @Override
            public void handleDelivery(
                    String tag, Envelope envelope, AMQP.BasicProperties properties, byte[] body) {
                deliveries.add(new Delivery(envelope, properties, body));
            }
        });
        List<Delivery> got = new ArrayList<>();
        long deadline = System.nanoTime() + WAIT.toNanos();
        while (got.size() < n) {
            long left = deadline - System.nanoTime();
            Delivery d = left > 0 ? deliveries.poll(left, TimeUnit.NANOSECONDS) : null;
            if (d == null) {
                fail("queue " + queue + " got " + got.size() + " of " + n + " records within " + WAIT + ": "
                        + got.stream().map(Delivery::text).toList());
            }
            got.add(d);
        }
        List<String> bodies = new ArrayList<>(got.stream().map(Delivery::text).toList());
        bodies.sort(null);
        assertEquals(List.of("entry-0", "entry-1", "entry-2", "entry-3", "entry-4"), bodies);
        for (Delivery d : got) {
            Map<String, Object> headers = d.properties().getHeaders();
            assertNotNull(headers, "no headers on " + d.text());
            Object currency = headers.get("currency");
            assertInstanceOf(LongString.class, currency, "currency header of " + d.text() + ": " + headers);
            assertEquals("EUR", currency.toString(), "currency header of " + d.text());
            assertEquals(topic, d.envelope().getExchange(), "exchange of " + d.text());
        }
        // acct-0's records are in one partition: they arrive in the order produced.
        assertEquals(List.of("entry-0", "entry-2", "entry-4"),
                got.stream().map(Delivery::text).filter(s -> List.of("entry-0", "entry-2", "entry-4").contains(s))
                        .toList());

        // -- The other way: a confirmed publish to the exchange is a record keyed by the routing key.
        Channel pubCh = amqpChannel();
        pubCh.confirmSelect();
        pubCh.basicPublish(topic, "desk-1", true,
                new AMQP.BasicProperties.Builder().deliveryMode(2).build(),
                "trade-1".getBytes(StandardCharsets.UTF_8));
        pubCh.waitForConfirmsOrDie(WAIT.toMillis());

        List<ConsumerRecord<byte[], byte[]>> all = consume(topic, n + 1);
        List<ConsumerRecord<byte[], byte[]>> trades = all.stream()
                .filter(r -> "trade-1".equals(utf8(r.value())))
                .toList();
        assertEquals(1, trades.size(), "records of the AMQP publish among " + all.size());
        assertEquals("desk-1", utf8(trades.get(0).key()), "key of the AMQP publish");
        for (ConsumerRecord<byte[], byte[]> r : all) {
            if (!"trade-1".equals(utf8(r.value()))) {
                Header h = r.headers().lastHeader("currency");
                assertTrue(h != null && "EUR".equals(utf8(h.value())), "currency of " + utf8(r.value()));
            }
        }
    }

    @Test
    @Timeout(120)
    void kafkaRecordsOnADelayLineReachTheTargetWhenDueWithAnIdempotentProducer() throws Exception {
        String target = "orders-" + run;
        String line = target + ".later";
        try (Admin admin = Admin.create(kafkaProps())) {
            admin.createTopics(List.of(
                            new NewTopic(target, 1, (short) 1),
                            new NewTopic(line, 1, (short) 1)
                                    .configs(Map.of("tributary.delay.target.topic", target))))
                    .all()
                    .get(WAIT.toMillis(), TimeUnit.MILLISECONDS);
        }
        long dueAt = System.currentTimeMillis() + 3000;
        ProducerRecord<String, String> late = new ProducerRecord<>(line, "k1", "late");
        late.headers().add("tributary.deliver-at-ms", Long.toString(dueAt).getBytes(StandardCharsets.UTF_8));
        ProducerRecord<String, String> now = new ProducerRecord<>(line, "k2", "now");
        // Java producers are idempotent by default; one batch mixes a delayed and an
        // undelayed record.
        KafkaProducer<String, String> producer = producer(Map.of(ProducerConfig.LINGER_MS_CONFIG, "20"));
        List<RecordMetadata> acked = sendAll(producer, List.of(late, now));
        // The produce answers with the offsets in the delay line.
        assertEquals(List.of(0L, 1L), acked.stream().map(RecordMetadata::offset).toList());
        assertEquals(line, acked.get(0).topic());

        List<ConsumerRecord<byte[], byte[]>> got = consume(target, 2);
        long readAt = System.currentTimeMillis();
        assertEquals(List.of("now", "late"), got.stream().map(r -> utf8(r.value())).toList());
        assertEquals("k1", utf8(got.get(1).key()));
        Header h = got.get(1).headers().lastHeader("tributary.deliver-at-ms");
        assertNotNull(h, "the delivery-time header travels with the record");
        assertTrue(readAt >= dueAt - 50, "read " + (dueAt - readAt) + " ms before it was due");
    }

    @Test
    @Timeout(120)
    void rocketMqSendsReachMqttSubscribersAndMqttPublishesReachRocketMqConsumers() throws Exception {
        String topic = "rmq-" + run;
        // A Kafka topic is a stream, which RocketMQ serves as a topic of the same name.
        createTopic(topic, 1);
        BlockingQueue<Received> inbox = new LinkedBlockingQueue<>();
        MqttClient sub = mqtt("rmq-sub", inbox);
        assertArrayEquals(new int[] {1}, sub.subscribeWithResponse(topic, 1).getGrantedQos());

        DefaultMQProducer producer = new DefaultMQProducer("cross_pg_" + run);
        producer.setNamesrvAddr(TRIBUTARY.address("rocketmq-namesrv"));
        producer.setInstanceName("cross-p-" + run);
        producer.setRetryTimesWhenSendFailed(0);
        producer.start();
        closeables.add(producer::shutdown);
        SendResult sent = producer.send(
                new Message(topic, "tagA", "key-1", "from-rocketmq".getBytes(StandardCharsets.UTF_8)));
        assertEquals(SendStatus.SEND_OK, sent.getSendStatus());
        Received got = inbox.poll(WAIT.toMillis(), TimeUnit.MILLISECONDS);
        assertNotNull(got, "the RocketMQ message never reached the MQTT subscriber");
        assertEquals(topic, got.topic());
        assertEquals("from-rocketmq", got.text());

        // The other way: an MQTT publish read by a RocketMQ consumer from the first offset.
        sub.publish(topic, "from-mqtt".getBytes(StandardCharsets.UTF_8), 1, false);
        DefaultLitePullConsumer consumer = new DefaultLitePullConsumer("cross_cg_" + run);
        consumer.setNamesrvAddr(TRIBUTARY.address("rocketmq-namesrv"));
        consumer.setInstanceName("cross-c-" + run);
        consumer.setConsumeFromWhere(ConsumeFromWhere.CONSUME_FROM_FIRST_OFFSET);
        consumer.setPollTimeoutMillis(500);
        consumer.subscribe(topic, "*");
        consumer.start();
        closeables.add(consumer::shutdown);
        List<MessageExt> read = new ArrayList<>();
        long deadline = System.nanoTime() + WAIT.toNanos();
        while (read.size() < 2) {
            if (System.nanoTime() > deadline) {
                fail("RocketMQ read " + read.size() + " of 2 messages of " + topic);
            }
            read.addAll(consumer.poll());
        }
        assertEquals(
                List.of("from-rocketmq", "from-mqtt"),
                read.stream().map(m -> utf8(m.getBody())).toList());
        assertEquals("tagA", read.get(0).getTags());
        assertEquals("key-1", read.get(0).getKeys());
    }
}
