package dev.tributary.compat;

import org.junit.jupiter.api.extension.RegisterExtension;

/**
 * {@link KafkaTransactionsCompatTests} against Tributary's Kafka gateway (its own server).
 * Fails until transactions land (issue 15: the gateway refuses transactional ids today).
 */
class KafkaTransactionsTest extends KafkaTransactionsCompatTests {
    @RegisterExtension
    static final TributaryExtension TRIBUTARY = new TributaryExtension("--kafka-listen");

    @Override
    protected String bootstrap() {
        return TRIBUTARY.address("kafka");
    }
}
