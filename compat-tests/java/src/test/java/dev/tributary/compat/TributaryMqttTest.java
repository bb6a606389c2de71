package dev.tributary.compat;

import org.junit.jupiter.api.extension.RegisterExtension;

/** {@link MqttCompatTests} against Tributary's MQTT gateway (its own server). */
class TributaryMqttTest extends MqttCompatTests {
    @RegisterExtension
    static final TributaryExtension TRIBUTARY = new TributaryExtension("--mqtt-listen");

    @Override
    protected String address() {
        return TRIBUTARY.address("mqtt");
    }
}
