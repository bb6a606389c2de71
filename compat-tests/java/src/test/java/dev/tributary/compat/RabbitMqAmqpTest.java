package dev.tributary.compat;

import org.junit.jupiter.api.BeforeEach;

/**
 * {@link AmqpCompatTests} against the reference broker, RabbitMQ, at the system property
 * {@code reference.amqp} (HOST:PORT; scripts/compat-java.sh starts one). Skipped without it.
 */
class RabbitMqAmqpTest extends AmqpCompatTests {
    @BeforeEach
    void needsReference() {
        Reference.require("reference.amqp", "RabbitMQ");
    }

    @Override
    protected String address() {
        return Reference.address("reference.amqp");
    }
}
