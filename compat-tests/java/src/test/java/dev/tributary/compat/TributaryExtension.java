package dev.tributary.compat;

import java.util.List;
import org.junit.jupiter.api.extension.AfterAllCallback;
import org.junit.jupiter.api.extension.AfterEachCallback;
import org.junit.jupiter.api.extension.BeforeAllCallback;
import org.junit.jupiter.api.extension.BeforeEachCallback;
import org.junit.jupiter.api.extension.ExtensionContext;

/**
 * One tributary server per test class. Register it on a static field:
 *
 * <pre>
 * &#64;RegisterExtension
 * static final TributaryExtension TRIBUTARY = new TributaryExtension("--amqp-listen");
 * </pre>
 *
 * The server starts before the class's first test and stops (SIGTERM, then SIGKILL) after its
 * last; each test fails if the server is not running before or after it. Its log is
 * {@code target/tributary-logs/CLASS.log}.
 */
public final class TributaryExtension
        implements BeforeAllCallback, AfterAllCallback, BeforeEachCallback, AfterEachCallback {
    private final List<String> listen;
    private final List<String> extraArgs;
    private TributaryServer server;

    public TributaryExtension(String... listen) {
        this(List.of(listen), List.of());
    }

    /** @param extraArgs further server arguments (e.g. a gateway's timing flags) */
    public TributaryExtension(List<String> listen, List<String> extraArgs) {
        this.listen = List.copyOf(listen);
        this.extraArgs = List.copyOf(extraArgs);
    }

    @Override
    public void beforeAll(ExtensionContext context) throws Exception {
        server = new TributaryServer(context.getRequiredTestClass().getSimpleName(), listen, extraArgs)
                .start();
    }

    @Override
    public void afterAll(ExtensionContext context) throws Exception {
        if (server != null) {
            TributaryServer s = server;
            server = null;
            s.close();
        }
    }

    @Override
    public void beforeEach(ExtensionContext context) {
        checkAlive("before this test");
    }

    @Override
    public void afterEach(ExtensionContext context) {
        checkAlive("during this test");
    }

    private void checkAlive(String when) {
        if (server == null) {
            throw new IllegalStateException("tributary server not started");
        }
        if (!server.alive()) {
            throw new IllegalStateException("tributary died " + when + " (exit "
                    + server.exitCode().map(String::valueOf).orElse("?") + ")\n" + server.logTail());
        }
    }

    public TributaryServer server() {
        if (server == null) {
            throw new IllegalStateException("tributary server not started");
        }
        return server;
    }

    /** HOST:PORT of the named listener ("kafka", "amqp", "mqtt", ...). */
    public String address(String listenerName) {
        return server().address(listenerName);
    }
}
