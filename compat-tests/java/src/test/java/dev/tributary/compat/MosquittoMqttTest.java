package dev.tributary.compat;

import org.junit.jupiter.api.BeforeEach;

/**
 * {@link MqttCompatTests} against the reference broker, Mosquitto, at the system property
 * {@code reference.mqtt} (HOST:PORT; scripts/compat-java.sh starts one). Skipped without it.
 */
class MosquittoMqttTest extends MqttCompatTests {
    @BeforeEach
    void needsReference() {
        Reference.require("reference.mqtt", "Mosquitto");
    }

    @Override
    protected String address() {
        return Reference.address("reference.mqtt");
    }
}
