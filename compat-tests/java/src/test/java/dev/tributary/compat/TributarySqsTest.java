package dev.tributary.compat;

import org.junit.jupiter.api.extension.RegisterExtension;

/** {@link SqsCompatTests} against Tributary's SQS gateway (its own server). */
class TributarySqsTest extends SqsCompatTests {
    @RegisterExtension
    static final TributaryExtension TRIBUTARY = new TributaryExtension("--sqs-listen");

    @Override
    protected String address() {
        return TRIBUTARY.address("sqs");
    }
}
