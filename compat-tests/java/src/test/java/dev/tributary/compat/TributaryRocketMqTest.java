package dev.tributary.compat;

import java.util.List;
import org.junit.jupiter.api.extension.RegisterExtension;

/**
 * {@link RocketMqCompatTests} against Tributary's RocketMQ gateway (its own server): the
 * NameServer listener ({@code --namesrv-listen}, printed as {@code listening rocketmq-namesrv
 * ADDR}) is what the clients are given; the broker listener ({@code --rocketmq-listen},
 * {@code listening rocketmq ADDR}) is what its routes name. The transaction check-back runs
 * every 2 s for half messages older than 1 s, as the reference is configured
 * (scripts/brokers.sh: transactionCheckInterval, transactionTimeOut).
 */
class TributaryRocketMqTest extends RocketMqCompatTests {
    @RegisterExtension
    static final TributaryExtension TRIBUTARY = new TributaryExtension(
            List.of("--namesrv-listen", "--rocketmq-listen"),
            List.of("--rocketmq-transaction-check-interval-ms", "2000",
                    "--rocketmq-transaction-timeout-ms", "1000"));

    @Override
    protected String namesrv() {
        return TRIBUTARY.address("rocketmq-namesrv");
    }
}
