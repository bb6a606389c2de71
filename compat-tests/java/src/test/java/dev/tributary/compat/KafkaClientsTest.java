package dev.tributary.compat;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import java.time.Duration;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.ListOffsetsResult.ListOffsetsResultInfo;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.OffsetSpec;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.TopicPartitionInfo;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;
import org.junit.jupiter.api.extension.RegisterExtension;

/** The Apache Kafka Java client (kafka-clients) against Tributary's Kafka gateway. */
class KafkaClientsTest {
    @RegisterExtension
    static final TributaryExtension TRIBUTARY = new TributaryExtension("--kafka-listen");

    static final Duration WAIT = Duration.ofSeconds(30);
    static final int RECORDS = 1000;
    static final int KEYS = 10;
    static final int PARTITIONS = 3;

    private final String run = UUID.randomUUID().toString().substring(0, 8);

    private String bootstrap() {
        return TRIBUTARY.address("kafka");
    }

    private Properties clientProps() {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap());
        return p;
    }

    private KafkaConsumer<String, String> consumer(String group) {
        Properties p = clientProps();
        p.put(ConsumerConfig.GROUP_ID_CONFIG, group);
        p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        return new KafkaConsumer<>(p);
    }

    private static <T> T get(org.apache.kafka.common.KafkaFuture<T> f) throws Exception {
        return f.get(WAIT.toMillis(), TimeUnit.MILLISECONDS);
    }

    @Test
    @Timeout(120)
    void adminIdempotentProduceGroupConsumeCommitAndListOffsets() throws Exception {
        String topic = "java-kafka-" + run;
        String group = "java-group-" + run;
        List<TopicPartition> tps = new ArrayList<>();
        for (int i = 0; i < PARTITIONS; i++) {
            tps.add(new TopicPartition(topic, i));
        }

        try (Admin admin = Admin.create(clientProps())) {
            // -- AdminClient: create, then describe.
            get(admin.createTopics(List.of(new NewTopic(topic, PARTITIONS, (short) 1))).all());
            TopicDescription d = get(admin.describeTopics(List.of(topic)).allTopicNames()).get(topic);
            assertNotNull(d, "describeTopics has no " + topic);
            assertEquals(topic, d.name());
            assertEquals(PARTITIONS, d.partitions().size(), d.toString());
            for (int i = 0; i < PARTITIONS; i++) {
                TopicPartitionInfo info = d.partitions().get(i);
                assertEquals(i, info.partition());
                assertNotNull(info.leader(), "partition " + i + " has no leader: " + d);
                assertEquals(1, info.replicas().size(), d.toString());
            }

            // -- An idempotent producer (acks=all), every future waited for.
            Properties pp = clientProps();
            pp.put(ProducerConfig.ACKS_CONFIG, "all");
            pp.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
            pp.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
            pp.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
            Map<String, Integer> partitionOfKey = new HashMap<>();
            Map<Integer, List<Long>> offsetsOfPartition = new HashMap<>();
            try (KafkaProducer<String, String> producer = new KafkaProducer<>(pp)) {
                List<Future<RecordMetadata>> futures = new ArrayList<>();
                for (int i = 0; i < RECORDS; i++) {
                    String key = "key-" + (i % KEYS);
                    futures.add(producer.send(new ProducerRecord<>(topic, key, key + ":" + (i / KEYS))));
                }
                for (int i = 0; i < RECORDS; i++) {
                    RecordMetadata md = futures.get(i).get(WAIT.toMillis(), TimeUnit.MILLISECONDS);
                    String key = "key-" + (i % KEYS);
                    Integer before = partitionOfKey.putIfAbsent(key, md.partition());
                    assertTrue(before == null || before == md.partition(), key + " went to two partitions");
                    offsetsOfPartition.computeIfAbsent(md.partition(), k -> new ArrayList<>()).add(md.offset());
                }
            }
            Map<Integer, Long> written = new HashMap<>();
            for (int i = 0; i < PARTITIONS; i++) {
                List<Long> offsets = offsetsOfPartition.getOrDefault(i, List.of());
                List<Long> expected = new ArrayList<>();
                for (long o = 0; o < offsets.size(); o++) {
                    expected.add(o);
                }
                // One producer, one new topic: each partition's offsets are 0..n-1 in send order.
                assertEquals(expected, offsets, "offsets of partition " + i);
                written.put(i, (long) offsets.size());
            }

            // -- A group member reads everything: per key in send order, no duplicates.
            Map<TopicPartition, Long> endOffsets = new HashMap<>();
            for (TopicPartition tp : tps) {
                endOffsets.put(tp, written.get(tp.partition()));
            }
            Map<String, List<Integer>> seqsOfKey = new HashMap<>();
            Set<String> seen = new HashSet<>();
            try (KafkaConsumer<String, String> c = consumer(group)) {
                c.subscribe(List.of(topic));
                long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
                int received = 0;
                while (received < RECORDS) {
                    if (System.nanoTime() > deadline) {
                        fail("consumed " + received + " of " + RECORDS + " records within 60 s");
                    }
                    for (ConsumerRecord<String, String> r : c.poll(Duration.ofMillis(500))) {
                        received++;
                        assertTrue(seen.add(r.partition() + "/" + r.offset()),
                                "record delivered twice: " + r);
                        assertEquals(partitionOfKey.get(r.key()), r.partition(), "partition of " + r.key());
                        String[] kv = r.value().split(":");
                        assertEquals(r.key(), kv[0]);
                        seqsOfKey.computeIfAbsent(r.key(), k -> new ArrayList<>()).add(Integer.parseInt(kv[1]));
                    }
                }
                assertEquals(RECORDS, received);
                List<Integer> inOrder = new ArrayList<>();
                for (int s = 0; s < RECORDS / KEYS; s++) {
                    inOrder.add(s);
                }
                assertEquals(KEYS, seqsOfKey.size(), seqsOfKey.keySet().toString());
                seqsOfKey.forEach((k, seqs) -> assertEquals(inOrder, seqs, "records of " + k));
                c.commitSync(WAIT);
                Map<TopicPartition, OffsetAndMetadata> committed = c.committed(new HashSet<>(tps), WAIT);
                for (TopicPartition tp : tps) {
                    assertNotNull(committed.get(tp), "no committed offset for " + tp);
                    assertEquals(endOffsets.get(tp), committed.get(tp).offset(), "committed offset of " + tp);
                }
            }

            // -- A second member of the group, after the commit, starts at the committed offsets.
            try (KafkaConsumer<String, String> c = consumer(group)) {
                c.subscribe(List.of(topic));
                List<ConsumerRecord<String, String>> extra = new ArrayList<>();
                long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(30);
                while (c.assignment().size() < PARTITIONS) {
                    if (System.nanoTime() > deadline) {
                        fail("second consumer not assigned all partitions within 30 s: " + c.assignment());
                    }
                    c.poll(Duration.ofMillis(200)).forEach(extra::add);
                }
                for (TopicPartition tp : tps) {
                    assertEquals(endOffsets.get(tp), c.position(tp, WAIT), "position of " + tp);
                }
                c.poll(Duration.ofMillis(500)).forEach(extra::add);
                assertEquals(List.of(), extra, "the second consumer got records already committed");
            }

            // -- listOffsets: earliest 0, latest = what was written.
            Map<TopicPartition, OffsetSpec> earliest = new HashMap<>();
            Map<TopicPartition, OffsetSpec> latest = new HashMap<>();
            for (TopicPartition tp : tps) {
                earliest.put(tp, OffsetSpec.earliest());
                latest.put(tp, OffsetSpec.latest());
            }
            Map<TopicPartition, ListOffsetsResultInfo> e = get(admin.listOffsets(earliest).all());
            Map<TopicPartition, ListOffsetsResultInfo> l = get(admin.listOffsets(latest).all());
            long total = 0;
            for (TopicPartition tp : tps) {
                assertEquals(0L, e.get(tp).offset(), "earliest offset of " + tp);
                assertEquals(endOffsets.get(tp), l.get(tp).offset(), "latest offset of " + tp);
                total += l.get(tp).offset();
            }
            assertEquals(RECORDS, total);
        }
    }
}
