package dev.tributary.compat;

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.time.LocalTime;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.HashMap;
import java.util.LinkedHashSet;
import java.util.List;
import java.util.Map;
import java.util.Optional;
import java.util.Set;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.regex.Matcher;
import java.util.regex.Pattern;
import java.util.stream.Stream;

/**
 * One standalone tributary process on free loopback ports, in its own temporary data
 * directory. {@link #start()} reads stdout until {@code ready} (collecting the
 * {@code listening NAME ADDR} lines), then a daemon thread keeps draining stdout into the log
 * so the server never blocks on a full pipe. stderr (the server's log) goes straight into
 * {@code ${tributary.logs}/NAME.log}.
 */
public final class TributaryServer implements AutoCloseable {
    static final long READY_TIMEOUT_MS = 60_000;
    static final long STOP_TIMEOUT_MS = 10_000;
    private static final Pattern LISTENING = Pattern.compile("^listening (\\S+) (\\S+)\\s*$");
    private static final String EOF = "\u0000eof";

    /** Every listener flag a build may have; each one not wanted is turned off. */
    private static final List<String> LISTENER_FLAGS = List.of(
            "--core-listen", "--admin-listen", "--kafka-listen", "--kafka-tls-listen",
            "--mqtt-listen", "--mqtt-ws-listen", "--mqtt-tls-listen", "--amqp-listen",
            "--amqp-tls-listen", "--sqs-listen", "--rocketmq-listen", "--namesrv-listen");

    /** Servers still running, killed by a shutdown hook if the JVM exits without afterAll. */
    private static final Set<Process> LIVE = java.util.Collections.synchronizedSet(new LinkedHashSet<>());

    static {
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            synchronized (LIVE) {
                LIVE.forEach(Process::destroyForcibly);
            }
        }, "tributary-server-reaper"));
    }

    private final String name;
    private final Path binary;
    private final List<String> listen;
    private final List<String> extraArgs;
    private final Path logFile;
    private Path dataDir;
    private Process process;
    private final Map<String, String> listeners = new HashMap<>();

    /**
     * @param name a name for the log file (the test class)
     * @param listen the listener flags to open on 127.0.0.1:0 (e.g. "--kafka-listen"); every
     *     other listener flag the binary knows is set to {@code off}
     */
    public TributaryServer(String name, List<String> listen) {
        this(name, listen, List.of());
    }

    /**
     * @param extraArgs further arguments for the server (e.g. {@code --kafka-sasl --config F})
     */
    public TributaryServer(String name, List<String> listen, List<String> extraArgs) {
        this.name = name;
        this.binary = binary();
        this.listen = List.copyOf(listen);
        this.extraArgs = List.copyOf(extraArgs);
        String logs = System.getProperty("tributary.logs", "");
        Path dir = Path.of(logs.isBlank() ? "target/tributary-logs" : logs);
        this.logFile = dir.resolve(name + ".log").toAbsolutePath();
    }

    /** The binary named by the system property {@code tributary.bin}; fails clearly if unusable. */
    public static Path binary() {
        String prop = System.getProperty("tributary.bin", "");
        if (prop.isBlank()) {
            throw new IllegalStateException(
                    "system property tributary.bin is not set: run through scripts/compat-java.sh "
                            + "(TRIBUTARY_BIN=...) or pass -Dtributary.bin=/path/to/tributary to mvn");
        }
        Path p = Path.of(prop).toAbsolutePath();
        if (!Files.isRegularFile(p) || !Files.isExecutable(p)) {
            throw new IllegalStateException("tributary.bin=" + p + " is not an executable file");
        }
        return p;
    }

    private Set<String> knownFlags() throws IOException, InterruptedException {
        Process help = new ProcessBuilder(binary.toString(), "--help")
                .redirectErrorStream(true)
                .redirectInput(ProcessBuilder.Redirect.PIPE)
                .start();
        help.getOutputStream().close();
        String out = new String(help.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
        if (!help.waitFor(30, TimeUnit.SECONDS)) {
            help.destroyForcibly();
            throw new IllegalStateException(binary + " --help did not finish");
        }
        Set<String> flags = new LinkedHashSet<>();
        Matcher m = Pattern.compile("--[a-z0-9-]+").matcher(out);
        while (m.find()) {
            flags.add(m.group());
        }
        return flags;
    }

    public TributaryServer start() throws Exception {
        Files.createDirectories(logFile.getParent());
        Files.deleteIfExists(logFile); // one server per class and run: the log of this run only
        dataDir = Files.createTempDirectory("tributary-java-" + name + "-");
        Set<String> known = knownFlags();
        List<String> argv = new ArrayList<>(List.of(binary.toString(), "--data-dir", dataDir.toString()));
        for (String flag : LISTENER_FLAGS) {
            if (known.contains(flag)) {
                argv.add(flag);
                argv.add(listen.contains(flag) ? "127.0.0.1:0" : "off");
            }
        }
        for (String flag : listen) {
            if (!known.contains(flag)) {
                throw new IllegalStateException(binary + " has no " + flag + " flag");
            }
        }
        // The first rebalance of a new consumer group would otherwise wait for more members.
        if (known.contains("--group-initial-rebalance-delay-ms")) {
            argv.addAll(List.of("--group-initial-rebalance-delay-ms", "0"));
        }
        argv.addAll(extraArgs);
        appendLog("=== " + LocalTime.now() + " start: " + String.join(" ", argv) + "\n");

        ProcessBuilder pb = new ProcessBuilder(argv)
                .redirectInput(ProcessBuilder.Redirect.PIPE)
                .redirectError(ProcessBuilder.Redirect.appendTo(logFile.toFile()));
        pb.environment().remove("TRIBUTARY_BIN");
        pb.environment().putIfAbsent("TRIBUTARY_LOG", "info");
        process = pb.start();
        process.getOutputStream().close();
        LIVE.add(process);

        BlockingQueue<String> lines = new LinkedBlockingQueue<>();
        Thread pump = new Thread(() -> pump(process, lines), "tributary-stdout-" + name);
        pump.setDaemon(true);
        pump.start();

        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(READY_TIMEOUT_MS);
        while (true) {
            long left = deadline - System.nanoTime();
            if (left <= 0) {
                kill();
                throw new IllegalStateException(
                        name + ": tributary printed no `ready` within " + READY_TIMEOUT_MS + " ms\n" + logTail());
            }
            String line = lines.poll(Math.min(left, TimeUnit.MILLISECONDS.toNanos(500)), TimeUnit.NANOSECONDS);
            if (line == null) {
                continue;
            }
            if (line.equals(EOF)) {
                boolean exited = process.waitFor(5, TimeUnit.SECONDS);
                String code = exited ? String.valueOf(process.exitValue()) : "?";
                kill();
                throw new IllegalStateException(
                        name + ": tributary exited (code " + code + ") before `ready`\n" + logTail());
            }
            Matcher m = LISTENING.matcher(line);
            if (m.matches()) {
                listeners.put(m.group(1), m.group(2));
            } else if (line.strip().equals("ready")) {
                return this;
            }
        }
    }

    /** Copies stdout into the log for the process's whole life; lines also go to {@code lines}. */
    private void pump(Process p, BlockingQueue<String> lines) {
        try (BufferedReader r = new BufferedReader(
                new InputStreamReader(p.getInputStream(), StandardCharsets.UTF_8))) {
            String line;
            while ((line = r.readLine()) != null) {
                appendLog("[stdout] " + line + "\n");
                lines.add(line);
            }
        } catch (IOException e) {
            appendLog("[stdout] read failed: " + e + "\n");
        } finally {
            lines.add(EOF);
        }
    }

    private synchronized void appendLog(String s) {
        try (OutputStream out = Files.newOutputStream(
                logFile, StandardOpenOption.CREATE, StandardOpenOption.APPEND)) {
            out.write(s.getBytes(StandardCharsets.UTF_8));
        } catch (IOException e) {
            System.err.println("cannot write " + logFile + ": " + e);
        }
    }

    /** The address of the {@code listening NAME ADDR} line for {@code listenerName}. */
    public String address(String listenerName) {
        String a = listeners.get(listenerName);
        if (a == null) {
            throw new IllegalStateException(
                    name + ": tributary printed no `listening " + listenerName + " ADDR` line (got "
                            + listeners + ")");
        }
        return a;
    }

    public boolean alive() {
        return process != null && process.isAlive();
    }

    public Optional<Integer> exitCode() {
        return process == null || process.isAlive() ? Optional.empty() : Optional.of(process.exitValue());
    }

    public Path logFile() {
        return logFile;
    }

    public String logTail() {
        try {
            List<String> all = Files.readAllLines(logFile, StandardCharsets.UTF_8);
            List<String> tail = all.subList(Math.max(0, all.size() - 60), all.size());
            return "--- last " + tail.size() + " lines of " + logFile + ":\n" + String.join("\n", tail);
        } catch (IOException e) {
            return "(" + logFile + " unreadable: " + e + ")";
        }
    }

    private void kill() {
        if (process != null) {
            process.destroyForcibly();
            try {
                process.waitFor(STOP_TIMEOUT_MS, TimeUnit.MILLISECONDS);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
            LIVE.remove(process);
        }
    }

    /**
     * SIGTERM (Process.destroy), then SIGKILL if the server has not exited within
     * {@link #STOP_TIMEOUT_MS}; removes the data directory. Throws if the graceful stop
     * failed (timeout or non-zero exit), after cleaning up.
     */
    @Override
    public void close() throws Exception {
        String problem = null;
        if (process != null) {
            if (process.isAlive()) {
                process.destroy();
                if (!process.waitFor(STOP_TIMEOUT_MS, TimeUnit.MILLISECONDS)) {
                    problem = "did not exit within " + STOP_TIMEOUT_MS + " ms of SIGTERM; killed";
                    kill();
                } else if (process.exitValue() != 0) {
                    problem = "exited with code " + process.exitValue() + " after SIGTERM";
                }
            }
            LIVE.remove(process);
            appendLog("=== " + LocalTime.now() + " stopped\n");
        }
        if (dataDir != null) {
            try (Stream<Path> walk = Files.walk(dataDir)) {
                walk.sorted(Comparator.reverseOrder()).forEach(p -> p.toFile().delete());
            }
        }
        if (problem != null) {
            throw new IllegalStateException(name + ": tributary " + problem + "\n" + logTail());
        }
    }
}
