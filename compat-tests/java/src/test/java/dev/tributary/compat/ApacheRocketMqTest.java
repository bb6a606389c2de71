package dev.tributary.compat;

import org.junit.jupiter.api.BeforeEach;

/**
 * {@link RocketMqCompatTests} against the reference broker, Apache RocketMQ (one NameServer and
 * one broker, scripts/brokers.sh), at the NameServer given by the system property
 * {@code reference.rocketmq} (HOST:PORT; scripts/compat-java.sh starts one). Skipped without it.
 */
class ApacheRocketMqTest extends RocketMqCompatTests {
    @BeforeEach
    void needsReference() {
        Reference.require("reference.rocketmq", "Apache RocketMQ");
    }

    @Override
    protected String namesrv() {
        return Reference.address("reference.rocketmq");
    }
}
