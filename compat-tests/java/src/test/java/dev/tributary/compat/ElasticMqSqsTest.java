package dev.tributary.compat;

import org.junit.jupiter.api.BeforeAll;

/**
 * {@link SqsCompatTests} against the reference SQS server, ElasticMQ, at the system property
 * {@code reference.sqs} (HOST:PORT; scripts/compat-java.sh starts one). Skipped without it.
 */
class ElasticMqSqsTest extends SqsCompatTests {
    @BeforeAll
    static void needsReference() {
        Reference.require("reference.sqs", "ElasticMQ");
    }

    @Override
    protected String address() {
        return Reference.address("reference.sqs");
    }
}
