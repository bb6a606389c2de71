package dev.tributary.compat;

import org.junit.jupiter.api.BeforeEach;

/**
 * {@link KafkaTransactionsCompatTests} against the reference broker, Apache Kafka (one KRaft
 * node), at the system property {@code reference.kafka} (HOST:PORT; scripts/compat-java.sh
 * starts one). Skipped without it.
 */
class ApacheKafkaTransactionsTest extends KafkaTransactionsCompatTests {
    @BeforeEach
    void needsReference() {
        Reference.require("reference.kafka", "Apache Kafka");
    }

    @Override
    protected String bootstrap() {
        return Reference.address("reference.kafka");
    }
}
