package dev.tributary.compat;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
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
import java.util.concurrent.ExecutionException;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.function.BooleanSupplier;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.ListTransactionsOptions;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.TransactionDescription;
import org.apache.kafka.clients.admin.TransactionListing;
import org.apache.kafka.clients.admin.TransactionState;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.clients.producer.RecordMetadata;
import org.apache.kafka.common.KafkaException;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.errors.InvalidProducerEpochException;
import org.apache.kafka.common.errors.ProducerFencedException;
import org.apache.kafka.common.serialization.StringDeserializer;
import org.apache.kafka.common.serialization.StringSerializer;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;

/**
 * Kafka transactions (issue 15) with the Java client (kafka-clients): commit and abort seen
 * through a read_committed consumer, zombie fencing, and consume-transform-produce with
 * {@code sendOffsetsToTransaction} counted end to end, exactly once. Run against Tributary by
 * {@link KafkaTransactionsTest} and against Apache Kafka by {@link ApacheKafkaTransactionsTest}.
 *
 * <p>Commit and abort markers are written after {@code commitTransaction()} /
 * {@code abortTransaction()} return, so "the transactions are over" is polled: the
 * read_committed end offsets (the last stable offsets) equal the read_uncommitted ones (the
 * high watermarks). Every wait polls a condition with a deadline.
 */
abstract class KafkaTransactionsCompatTests {
    static final Duration WAIT = Duration.ofSeconds(30);
    static final int PARTITIONS = 3;

    private final String run = UUID.randomUUID().toString().substring(0, 8);

    /** HOST:PORT of the broker under test. */
    protected abstract String bootstrap();

    private Properties clientProps() {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap());
        return p;
    }

    private KafkaProducer<String, String> transactionalProducer(String transactionalId) {
        Properties p = clientProps();
        p.put(ProducerConfig.TRANSACTIONAL_ID_CONFIG, transactionalId);
        p.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, "30000");
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        KafkaProducer<String, String> producer = new KafkaProducer<>(p);
        producer.initTransactions();
        return producer;
    }

    private KafkaProducer<String, String> plainProducer() {
        Properties p = clientProps();
        p.put(ProducerConfig.ACKS_CONFIG, "all");
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        return new KafkaProducer<>(p);
    }

    private KafkaConsumer<String, String> consumer(String group, String isolation) {
        Properties p = clientProps();
        if (group != null) {
            p.put(ConsumerConfig.GROUP_ID_CONFIG, group);
        }
        p.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, isolation);
        p.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
        p.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
        p.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        p.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, StringDeserializer.class.getName());
        return new KafkaConsumer<>(p);
    }

    private static <T> T get(Future<T> f) throws Exception {
        return f.get(WAIT.toMillis(), TimeUnit.MILLISECONDS);
    }

    private static void waitUntil(BooleanSupplier cond, Duration timeout, String what)
            throws InterruptedException {
        long deadline = System.nanoTime() + timeout.toNanos();
        while (!cond.getAsBoolean()) {
            if (System.nanoTime() > deadline) {
                fail("timed out after " + timeout.toSeconds() + " s waiting for " + what);
            }
            Thread.sleep(50); // poll interval, not synchronisation: the loop checks the condition
        }
    }

    private static List<TopicPartition> partitions(String topic, int n) {
        List<TopicPartition> tps = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            tps.add(new TopicPartition(topic, i));
        }
        return tps;
    }

    private void createTopic(String topic, int partitions) throws Exception {
        try (Admin admin = Admin.create(clientProps())) {
            get(admin.createTopics(List.of(new NewTopic(topic, partitions, (short) 1))).all());
        }
    }

    /** End offsets as a consumer with this isolation level is told (ListOffsets latest). */
    private Map<TopicPartition, Long> endOffsets(List<TopicPartition> tps, String isolation) {
        try (KafkaConsumer<String, String> c = consumer(null, isolation)) {
            return c.endOffsets(tps, WAIT);
        }
    }

    /** Polls until no transaction is open in {@code tps}; returns the high watermarks. */
    private Map<TopicPartition, Long> waitStable(List<TopicPartition> tps) throws InterruptedException {
        Map<TopicPartition, Long> hw = new HashMap<>();
        waitUntil(() -> {
            Map<TopicPartition, Long> u = endOffsets(tps, "read_uncommitted");
            Map<TopicPartition, Long> c = endOffsets(tps, "read_committed");
            hw.clear();
            hw.putAll(u);
            return u.equals(c);
        }, Duration.ofSeconds(60), "last stable offsets = high watermarks (markers written) in " + tps);
        return hw;
    }

    /** Every record from offset 0 until the consumer's positions reach {@code ends}. */
    private List<ConsumerRecord<String, String>> readTo(Map<TopicPartition, Long> ends, String isolation) {
        List<ConsumerRecord<String, String>> got = new ArrayList<>();
        try (KafkaConsumer<String, String> c = consumer(null, isolation)) {
            List<TopicPartition> tps = new ArrayList<>(ends.keySet());
            c.assign(tps);
            c.seekToBeginning(tps);
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(60);
            while (true) {
                boolean done = true;
                for (TopicPartition tp : tps) {
                    done &= c.position(tp, WAIT) >= ends.get(tp);
                }
                if (done) {
                    break;
                }
                if (System.nanoTime() > deadline) {
                    fail(isolation + ": read " + got.size() + " records in 60 s, ends " + ends);
                }
                c.poll(Duration.ofMillis(200)).forEach(got::add);
            }
        }
        return got;
    }

    /** The values read, per key, in the order read; checks no record is read twice. */
    private static Map<String, List<String>> valuesByKey(List<ConsumerRecord<String, String>> records) {
        Set<String> seen = new HashSet<>();
        Map<String, List<String>> out = new HashMap<>();
        for (ConsumerRecord<String, String> r : records) {
            assertTrue(seen.add(r.partition() + "/" + r.offset()), "record delivered twice: " + r);
            out.computeIfAbsent(r.key(), k -> new ArrayList<>()).add(r.value());
        }
        return out;
    }

    private static Map<String, List<String>> expectedByKey(List<ProducerRecord<String, String>> records) {
        Map<String, List<String>> out = new HashMap<>();
        for (ProducerRecord<String, String> r : records) {
            out.computeIfAbsent(r.key(), k -> new ArrayList<>()).add(r.value());
        }
        return out;
    }

    private static List<ProducerRecord<String, String>> records(String topic, String tag, int from, int to) {
        List<ProducerRecord<String, String>> out = new ArrayList<>();
        for (int i = from; i < to; i++) {
            String key = tag + "-key-" + (i % 10);
            out.add(new ProducerRecord<>(topic, key, key + ":" + (i / 10)));
        }
        return out;
    }

    private static Map<TopicPartition, Long> sendAll(KafkaProducer<String, String> producer,
            List<ProducerRecord<String, String>> records) throws Exception {
        List<Future<RecordMetadata>> futures = new ArrayList<>();
        for (ProducerRecord<String, String> r : records) {
            futures.add(producer.send(r));
        }
        Map<TopicPartition, Long> count = new HashMap<>();
        for (Future<RecordMetadata> f : futures) {
            RecordMetadata md = get(f);
            count.merge(new TopicPartition(md.topic(), md.partition()), 1L, Long::sum);
        }
        return count;
    }

    @Test
    @Timeout(120)
    void commitAbortCommitSeenByReadCommitted() throws Exception {
        String topic = "java-txn-" + run;
        createTopic(topic, PARTITIONS);
        List<TopicPartition> tps = partitions(topic, PARTITIONS);
        List<ProducerRecord<String, String>> committed = records(topic, "c", 0, 300);
        List<ProducerRecord<String, String>> aborted = records(topic, "x", 0, 200);
        Map<TopicPartition, Long> markers = new HashMap<>();
        Map<TopicPartition, Long> written = new HashMap<>();
        try (KafkaProducer<String, String> producer = transactionalProducer("java-txn-" + run)) {
            for (int t = 0; t < 3; t++) {
                List<ProducerRecord<String, String>> batch = t == 1 ? aborted
                        : committed.subList(t == 0 ? 0 : 150, t == 0 ? 150 : 300);
                producer.beginTransaction();
                Map<TopicPartition, Long> sent = sendAll(producer, batch);
                sent.forEach((tp, n) -> {
                    written.merge(tp, n, Long::sum);
                    markers.merge(tp, 1L, Long::sum);
                });
                if (t == 1) {
                    producer.abortTransaction();
                } else {
                    producer.commitTransaction();
                }
            }
        }
        Map<TopicPartition, Long> hw = waitStable(tps);
        for (TopicPartition tp : tps) {
            long want = written.getOrDefault(tp, 0L) + markers.getOrDefault(tp, 0L);
            assertEquals(want, hw.get(tp), "high watermark of " + tp
                    + ": records + one marker per transaction that wrote there");
        }

        Map<String, List<String>> readCommitted = valuesByKey(readTo(hw, "read_committed"));
        assertEquals(expectedByKey(committed), readCommitted,
                "read_committed: every committed record once, in order per key, no aborted one");
        Map<String, List<String>> everything = new HashMap<>(expectedByKey(committed));
        everything.putAll(expectedByKey(aborted));
        assertEquals(everything, valuesByKey(readTo(hw, "read_uncommitted")),
                "read_uncommitted: committed and aborted records");
    }

    @Test
    @Timeout(120)
    void openTransactionIsInvisibleToReadCommittedUntilCommit() throws Exception {
        String topic = "java-lso-" + run;
        createTopic(topic, 1);
        TopicPartition tp = new TopicPartition(topic, 0);
        try (KafkaProducer<String, String> producer = transactionalProducer("java-lso-" + run);
                KafkaConsumer<String, String> c = consumer(null, "read_committed")) {
            producer.beginTransaction();
            sendAll(producer, records(topic, "o", 0, 10));
            assertEquals(Map.of(tp, 0L), endOffsets(List.of(tp), "read_committed"));
            assertEquals(Map.of(tp, 10L), endOffsets(List.of(tp), "read_uncommitted"));
            c.assign(List.of(tp));
            c.seekToBeginning(List.of(tp));
            // Polls until a fetch response told the consumer the last stable offset (its lag
            // is known): it must be 0, with nothing delivered and the position still at 0.
            List<String> values = new ArrayList<>();
            waitUntil(() -> {
                c.poll(Duration.ofMillis(200)).forEach(r -> values.add(r.value()));
                return c.currentLag(tp).isPresent();
            }, Duration.ofSeconds(30), "a read_committed fetch response");
            assertEquals(List.of(), values, "read_committed saw an open transaction's records");
            assertEquals(0L, c.position(tp, WAIT), "read_committed position past an open transaction");
            assertEquals(0L, c.currentLag(tp).getAsLong(), "lag to the last stable offset");
            producer.commitTransaction();
            waitUntil(() -> {
                c.poll(Duration.ofMillis(200)).forEach(r -> values.add(r.value()));
                return values.size() >= 10;
            }, Duration.ofSeconds(60), "the committed records");
            List<String> want = new ArrayList<>();
            records(topic, "o", 0, 10).forEach(r -> want.add(r.value()));
            assertEquals(want, values);
        }
        assertEquals(Map.of(tp, 11L), waitStable(List.of(tp)), "10 records and the commit marker");
    }

    /**
     * A zombie that commits right after its successor's initTransactions: EndTxn with the old
     * epoch, ProducerFencedException.
     */
    @Test
    @Timeout(120)
    void zombieCommitIsFenced() throws Exception {
        zombie(false);
    }

    /**
     * A zombie that sends after its successor's initTransactions. Apache Kafka answers the
     * Produce with INVALID_PRODUCER_EPOCH, which kafka-clients 4.1 treats as abortable: the
     * send and the commit fail with InvalidProducerEpochException, and the abort (EndTxn with
     * the old epoch) with ProducerFencedException. PRODUCER_FENCED on the Produce would make
     * every one of them ProducerFencedException, also accepted.
     */
    @Test
    @Timeout(120)
    void zombieSendIsFenced() throws Exception {
        zombie(true);
    }

    private void zombie(boolean sendAfterFence) throws Exception {
        String topic = "java-fence-" + run + (sendAfterFence ? "-send" : "-commit");
        createTopic(topic, PARTITIONS);
        List<TopicPartition> tps = partitions(topic, PARTITIONS);
        String tid = "java-zombie-" + run + (sendAfterFence ? "-send" : "-commit");
        List<ProducerRecord<String, String>> fresh = records(topic, "f", 0, 100);
        KafkaProducer<String, String> zombie = transactionalProducer(tid);
        try {
            zombie.beginTransaction();
            sendAll(zombie, records(topic, "z", 0, 100));
            try (KafkaProducer<String, String> successor = transactionalProducer(tid)) {
                // The successor's InitProducerId bumped the epoch and aborted the zombie's
                // transaction.
                if (sendAfterFence) {
                    Future<RecordMetadata> late = zombie.send(new ProducerRecord<>(topic, "z-key-0", "late"));
                    ExecutionException sendFailed = assertThrows(ExecutionException.class, () -> get(late));
                    assertTrue(sendFailed.getCause() instanceof ProducerFencedException
                                    || sendFailed.getCause() instanceof InvalidProducerEpochException,
                            "the zombie's send failed with " + sendFailed.getCause());
                    KafkaException commitFailed = assertThrows(KafkaException.class, zombie::commitTransaction,
                            "the zombie committed");
                    assertTrue(commitFailed instanceof ProducerFencedException
                                    || commitFailed instanceof InvalidProducerEpochException,
                            "the zombie's commit failed with " + commitFailed);
                    assertThrows(ProducerFencedException.class, zombie::abortTransaction,
                            "the zombie's abort");
                } else {
                    assertThrows(ProducerFencedException.class, zombie::commitTransaction,
                            "the zombie committed");
                }
                assertThrows(ProducerFencedException.class, zombie::beginTransaction,
                        "the zombie began a new transaction");

                successor.beginTransaction();
                sendAll(successor, fresh);
                successor.commitTransaction();
            }
        } finally {
            zombie.close(Duration.ofSeconds(10));
        }
        Map<TopicPartition, Long> hw = waitStable(tps);
        List<ConsumerRecord<String, String>> all = readTo(hw, "read_uncommitted");
        assertEquals(100, all.stream().filter(r -> r.key().startsWith("z-")).count(),
                "the zombie's acked records in the log");
        assertEquals(expectedByKey(fresh), valuesByKey(readTo(hw, "read_committed")),
                "read_committed: the successor's records only");
    }

    /**
     * Input topic to output topic, each poll's records one transaction with the consumed
     * offsets ({@code sendOffsetsToTransaction}). Every third transaction is aborted and the
     * consumer rewinds to the group's committed offsets, as an application does. The group's
     * committed offsets move only on commit; at the end the output holds every input record
     * exactly once (counted per value) in order per key, and the group is committed at the
     * input's end.
     */
    @Test
    @Timeout(180)
    void consumeTransformProduceExactlyOnce() throws Exception {
        String in = "java-ctp-in-" + run;
        String out = "java-ctp-out-" + run;
        String group = "java-ctp-" + run;
        createTopic(in, PARTITIONS);
        createTopic(out, PARTITIONS);
        List<TopicPartition> inTps = partitions(in, PARTITIONS);
        List<ProducerRecord<String, String>> input = records(in, "i", 0, 1000);
        try (KafkaProducer<String, String> p = plainProducer()) {
            sendAll(p, input);
        }
        Map<TopicPartition, Long> inEnd = new HashMap<>(endOffsets(inTps, "read_uncommitted"));
        inEnd.values().removeIf(o -> o == 0L); // a partition no key hashed to: nothing to commit

        int aborts = 0;
        int commits = 0;
        try (Admin admin = Admin.create(clientProps());
                KafkaProducer<String, String> producer = transactionalProducer("java-ctp-" + run);
                KafkaConsumer<String, String> c = consumer(group, "read_committed")) {
            c.subscribe(List.of(in));
            Map<TopicPartition, Long> committed = new HashMap<>();
            long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(150);
            int batch = 0;
            while (!committed.equals(inEnd)) {
                if (System.nanoTime() > deadline) {
                    fail("group committed " + committed + " after 150 s, input ends at " + inEnd);
                }
                var records = c.poll(Duration.ofMillis(300));
                if (records.isEmpty()) {
                    continue;
                }
                Map<TopicPartition, OffsetAndMetadata> next = new HashMap<>();
                producer.beginTransaction();
                for (ConsumerRecord<String, String> r : records) {
                    producer.send(new ProducerRecord<>(out, r.key(), r.value()));
                    next.put(new TopicPartition(r.topic(), r.partition()), new OffsetAndMetadata(r.offset() + 1));
                }
                producer.sendOffsetsToTransaction(next, c.groupMetadata());
                producer.flush();
                assertEquals(committed, groupOffsets(admin, group, inTps), "offsets moved before the commit");
                if (++batch % 3 == 2) {
                    producer.abortTransaction();
                    aborts++;
                    assertEquals(committed, groupOffsets(admin, group, inTps), "offsets of an aborted transaction");
                    // Rewind to what the group committed (the beginning where nothing is).
                    for (TopicPartition tp : c.assignment()) {
                        Long o = committed.get(tp);
                        if (o == null) {
                            c.seekToBeginning(List.of(tp));
                        } else {
                            c.seek(tp, o);
                        }
                    }
                } else {
                    producer.commitTransaction();
                    commits++;
                    next.forEach((tp, o) -> committed.put(tp, o.offset()));
                    Map<TopicPartition, Long> want = new HashMap<>(committed);
                    waitUntil(() -> want.equals(groupOffsets(admin, group, inTps)), WAIT,
                            "the group's committed offsets " + want);
                }
            }
        }
        assertTrue(aborts > 0 && commits > 0, "aborts " + aborts + ", commits " + commits);

        List<TopicPartition> outTps = partitions(out, PARTITIONS);
        Map<TopicPartition, Long> hw = waitStable(outTps);
        Map<String, Integer> counts = new HashMap<>();
        List<ConsumerRecord<String, String>> output = readTo(hw, "read_committed");
        output.forEach(r -> counts.merge(r.value(), 1, Integer::sum));
        assertEquals(input.size(), output.size(), "output records (read_committed)");
        for (ProducerRecord<String, String> r : input) {
            assertEquals(1, counts.getOrDefault(r.value(), 0), "copies of " + r.value() + " in the output");
        }
        assertEquals(expectedByKey(input), valuesByKey(output), "output order per key");
        assertFalse(readTo(hw, "read_uncommitted").size() <= input.size(),
                "read_uncommitted does not see the aborted transactions' records");
    }

    /** The group's committed offsets (OffsetFetch without requireStable; none = absent). */
    private static Map<TopicPartition, Long> groupOffsets(Admin admin, String group, List<TopicPartition> tps) {
        try {
            Map<TopicPartition, OffsetAndMetadata> m =
                    get(admin.listConsumerGroupOffsets(group).partitionsToOffsetAndMetadata());
            Map<TopicPartition, Long> out = new HashMap<>();
            m.forEach((tp, o) -> {
                if (o != null && tps.contains(tp)) {
                    out.put(tp, o.offset());
                }
            });
            return out;
        } catch (Exception e) {
            throw new AssertionError("listConsumerGroupOffsets(" + group + ") failed", e);
        }
    }
    @Test
    @Timeout(120)
    void adminDescribesAndListsTransactions() throws Exception {
        String topic = "txn-admin-" + run;
        String txnId = "txn-admin-id-" + run;
        createTopic(topic, PARTITIONS);
        try (KafkaProducer<String, String> producer = transactionalProducer(txnId);
                Admin admin = Admin.create(clientProps())) {
            producer.beginTransaction();
            get(producer.send(new ProducerRecord<>(topic, 1, "k", "v")));
            TransactionDescription open = get(admin.describeTransactions(List.of(txnId)).description(txnId));
            assertEquals(TransactionState.ONGOING, open.state());
            assertTrue(open.topicPartitions().contains(new TopicPartition(topic, 1)), open.toString());
            assertTrue(open.transactionStartTimeMs().isPresent(), open.toString());
            assertTrue(open.producerId() >= 0, open.toString());
            ListTransactionsOptions ongoing = new ListTransactionsOptions()
                    .filterStates(List.of(TransactionState.ONGOING));
            boolean listed = false;
            for (TransactionListing l : get(admin.listTransactions(ongoing).all())) {
                listed |= l.transactionalId().equals(txnId) && l.producerId() == open.producerId();
            }
            assertTrue(listed, "the open transaction is listed as ONGOING");
            producer.commitTransaction();
            waitUntil(() -> {
                try {
                    return get(admin.describeTransactions(List.of(txnId)).description(txnId)).state()
                            == TransactionState.COMPLETE_COMMIT;
                } catch (Exception e) {
                    return false;
                }
            }, WAIT, txnId + " described as COMPLETE_COMMIT");
            ExecutionException unknown = assertThrows(ExecutionException.class,
                    () -> get(admin.describeTransactions(List.of("no-such-" + run)).description("no-such-" + run)));
            assertTrue(unknown.getCause() instanceof org.apache.kafka.common.errors.TransactionalIdNotFoundException,
                    unknown.toString());
        }
    }
}
