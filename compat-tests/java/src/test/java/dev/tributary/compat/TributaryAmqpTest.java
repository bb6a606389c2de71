package dev.tributary.compat;

import org.junit.jupiter.api.extension.RegisterExtension;

/** {@link AmqpCompatTests} against Tributary's AMQP 0-9-1 gateway (its own server). */
class TributaryAmqpTest extends AmqpCompatTests {
    @RegisterExtension
    static final TributaryExtension TRIBUTARY = new TributaryExtension("--amqp-listen");

    @Override
    protected String address() {
        return TRIBUTARY.address("amqp");
    }
}
