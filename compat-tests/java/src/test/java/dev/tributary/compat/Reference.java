package dev.tributary.compat;

import static org.junit.jupiter.api.Assumptions.assumeTrue;

/** The reference brokers given as system properties (HOST:PORT) by scripts/compat-java.sh. */
final class Reference {
    private Reference() {}

    /** Skips the calling test (an assumption) when {@code property} is not set. */
    static void require(String property, String broker) {
        assumeTrue(!System.getProperty(property, "").isBlank(),
                broker + " reference not given (-D" + property + "=HOST:PORT): skipped");
    }

    static String address(String property) {
        String a = System.getProperty(property, "");
        if (!a.matches("[^:]+:\\d+")) {
            throw new IllegalStateException(property + "=" + a + " is not HOST:PORT");
        }
        return a;
    }
}
