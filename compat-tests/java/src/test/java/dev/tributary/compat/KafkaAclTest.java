package dev.tributary.compat;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Collection;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.UUID;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.NewTopic;
import org.apache.kafka.clients.admin.ScramCredentialInfo;
import org.apache.kafka.clients.admin.ScramMechanism;
import org.apache.kafka.clients.admin.UserScramCredentialDeletion;
import org.apache.kafka.clients.admin.UserScramCredentialUpsertion;
import org.apache.kafka.clients.admin.UserScramCredentialsDescription;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.KafkaFuture;
import org.apache.kafka.common.acl.AccessControlEntry;
import org.apache.kafka.common.acl.AccessControlEntryFilter;
import org.apache.kafka.common.acl.AclBinding;
import org.apache.kafka.common.acl.AclBindingFilter;
import org.apache.kafka.common.acl.AclOperation;
import org.apache.kafka.common.acl.AclPermissionType;
import org.apache.kafka.common.errors.ClusterAuthorizationException;
import org.apache.kafka.common.errors.ResourceNotFoundException;
import org.apache.kafka.common.errors.SaslAuthenticationException;
import org.apache.kafka.common.errors.TopicAuthorizationException;
import org.apache.kafka.common.resource.PatternType;
import org.apache.kafka.common.resource.ResourcePattern;
import org.apache.kafka.common.resource.ResourcePatternFilter;
import org.apache.kafka.common.resource.ResourceType;
import org.apache.kafka.common.serialization.StringSerializer;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;

/**
 * Kafka ACLs with the Java client: the Admin API's createAcls / describeAcls / deleteAcls
 * against a server with SASL and the authorizer on ({@code admin} is a super user), and a
 * producer that gets TopicAuthorizationException until a prefixed WRITE is granted.
 */
class KafkaAclTest {
    static final Map<String, String> USERS = new LinkedHashMap<>(
            Map.of("admin", "admin-secret", "alice", "alice-secret"));
    static TributaryServer server;

    @BeforeAll
    static void start() throws Exception {
        StringBuilder cfg = new StringBuilder("kafka_super_users = [\"admin\"]\n");
        for (Map.Entry<String, String> u : USERS.entrySet()) {
            cfg.append("[[users]]\nname = \"").append(u.getKey()).append("\"\n")
                    .append(credentials(u.getValue())).append("\n");
        }
        Path file = Files.createTempFile("tributary-kafka-acl-", ".toml");
        Files.writeString(file, cfg);
        server = new TributaryServer("KafkaAclTest", List.of("--kafka-listen"),
                List.of("--kafka-sasl", "--kafka-authorizer", "--config", file.toString())).start();
    }

    @AfterAll
    static void stop() throws Exception {
        if (server != null) {
            server.close();
        }
    }

    /** The `credentials = [...]` line `tributary passwd` prints for a password on stdin. */
    static String credentials(String password) throws Exception {
        Process p = new ProcessBuilder(TributaryServer.binary().toString(), "passwd")
                .redirectError(ProcessBuilder.Redirect.DISCARD).start();
        p.getOutputStream().write((password + "\n").getBytes(StandardCharsets.UTF_8));
        p.getOutputStream().close();
        String out = new String(p.getInputStream().readAllBytes(), StandardCharsets.UTF_8);
        assertTrue(p.waitFor(60, TimeUnit.SECONDS), "tributary passwd did not exit");
        return out.lines().filter(l -> l.startsWith("credentials")).findFirst()
                .orElseThrow(() -> new IllegalStateException("no credentials line in: " + out));
    }

    private final String run = UUID.randomUUID().toString().substring(0, 8);

    static Properties props(String user) {
        return props(user, USERS.get(user));
    }

    static Properties props(String user, String password) {
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, server.address("kafka"));
        p.put("security.protocol", "SASL_PLAINTEXT");
        p.put("sasl.mechanism", "SCRAM-SHA-512");
        p.put("sasl.jaas.config", "org.apache.kafka.common.security.scram.ScramLoginModule required"
                + " username=\"" + user + "\" password=\"" + password + "\";");
        return p;
    }

    static <T> T get(KafkaFuture<T> f) throws Exception {
        return f.get(30, TimeUnit.SECONDS);
    }

    static KafkaProducer<String, String> producer(String user, boolean idempotent) {
        Properties p = props(user);
        p.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, String.valueOf(idempotent));
        if (!idempotent) {
            p.put(ProducerConfig.ACKS_CONFIG, "1");
        }
        p.put(ProducerConfig.MAX_BLOCK_MS_CONFIG, "10000");
        p.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, "15000");
        p.put(ProducerConfig.REQUEST_TIMEOUT_MS_CONFIG, "10000");
        p.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        p.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, StringSerializer.class.getName());
        return new KafkaProducer<>(p);
    }

    /** The exception a send ends with (thrown at once or through its future). */
    static Throwable sendFailure(KafkaProducer<String, String> p, String topic) {
        try {
            p.send(new ProducerRecord<>(topic, "k", "v")).get(30, TimeUnit.SECONDS);
            return null;
        } catch (ExecutionException e) {
            return e.getCause();
        } catch (Exception e) {
            return e;
        }
    }

    @Test
    @Timeout(120)
    void createDescribeDeleteAclsAndAProducerRefusedThenAllowed() throws Exception {
        String topic = "java-" + run + "-orders";
        try (Admin admin = Admin.create(props("admin"))) {
            get(admin.createTopics(List.of(new NewTopic(topic, 1, (short) 1))).all());

            try (KafkaProducer<String, String> p = producer("alice", false)) {
                Throwable t = sendFailure(p, topic);
                assertInstanceOf(TopicAuthorizationException.class, t, String.valueOf(t));
            }

            AclBinding write = new AclBinding(
                    new ResourcePattern(ResourceType.TOPIC, "java-" + run, PatternType.PREFIXED),
                    new AccessControlEntry("User:alice", "*", AclOperation.WRITE, AclPermissionType.ALLOW));
            get(admin.createAcls(List.of(write)).all());
            AclBindingFilter alices = new AclBindingFilter(ResourcePatternFilter.ANY,
                    new AccessControlEntryFilter("User:alice", null, AclOperation.ANY, AclPermissionType.ANY));
            Collection<AclBinding> described = get(admin.describeAcls(alices).values());
            assertEquals(List.of(write), List.copyOf(described));
            AclBindingFilter matching = new AclBindingFilter(
                    new ResourcePatternFilter(ResourceType.TOPIC, topic, PatternType.MATCH),
                    AccessControlEntryFilter.ANY);
            assertEquals(List.of(write), List.copyOf(get(admin.describeAcls(matching).values())));

            // The default (idempotent) producer: WRITE on a topic also lets it init its id.
            try (KafkaProducer<String, String> p = producer("alice", true)) {
                assertEquals(0L, p.send(new ProducerRecord<>(topic, "k", "v")).get(30, TimeUnit.SECONDS).offset());
            }

            Collection<AclBinding> deleted = get(admin.deleteAcls(List.of(alices)).all());
            assertEquals(List.of(write), List.copyOf(deleted));
            assertTrue(get(admin.describeAcls(AclBindingFilter.ANY).values()).isEmpty());
        }
        try (KafkaProducer<String, String> p = producer("alice", false)) {
            Throwable t = sendFailure(p, topic);
            assertInstanceOf(TopicAuthorizationException.class, t, String.valueOf(t));
        }
    }

    @Test
    @Timeout(60)
    void aclAdministrationNeedsTheCluster() throws Exception {
        try (Admin alice = Admin.create(props("alice"))) {
            ExecutionException e = assertThrows(ExecutionException.class,
                    () -> alice.describeAcls(AclBindingFilter.ANY).values().get(30, TimeUnit.SECONDS));
            assertInstanceOf(ClusterAuthorizationException.class, e.getCause());
            AclBinding b = new AclBinding(
                    new ResourcePattern(ResourceType.TOPIC, "x", PatternType.LITERAL),
                    new AccessControlEntry("User:alice", "*", AclOperation.ALL, AclPermissionType.ALLOW));
            e = assertThrows(ExecutionException.class,
                    () -> alice.createAcls(List.of(b)).all().get(30, TimeUnit.SECONDS));
            assertInstanceOf(ClusterAuthorizationException.class, e.getCause());
        }
    }

    /** Whether a SASL/SCRAM-SHA-512 login as {@code user} succeeds (a cluster description). */
    static boolean logsIn(String user, String password) throws Exception {
        Properties p = props(user, password);
        p.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "10000");
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "5000");
        try (Admin a = Admin.create(p)) {
            a.describeCluster().clusterId().get(15, TimeUnit.SECONDS);
            return true;
        } catch (ExecutionException e) {
            if (e.getCause() instanceof SaslAuthenticationException) {
                return false;
            }
            throw e;
        }
    }

    /** Polls (bounded) until a login as {@code user} succeeds or fails as wanted. */
    static void awaitLogin(String user, String password, boolean want) throws Exception {
        long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(20);
        while (logsIn(user, password) != want) {
            assertTrue(System.nanoTime() < deadline, user + " login never became " + want);
            Thread.sleep(100);
        }
    }

    @Test
    @Timeout(120)
    void scramUsersAddedAndDeletedThroughTheAdminApi() throws Exception {
        String user = "java-" + run + "-carol";
        try (Admin admin = Admin.create(props("admin"))) {
            get(admin.alterUserScramCredentials(List.of(
                    new UserScramCredentialUpsertion(user,
                            new ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192), "carol-pw"))).all());
            awaitLogin(user, "carol-pw", true);
            assertTrue(!logsIn(user, "wrong"));
            UserScramCredentialsDescription d = get(admin.describeUserScramCredentials(List.of(user)).description(user));
            assertEquals(List.of(new ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 8192)),
                    d.credentialInfos());
            assertTrue(get(admin.describeUserScramCredentials().users()).contains(user));

            get(admin.alterUserScramCredentials(List.of(
                    new UserScramCredentialDeletion(user, ScramMechanism.SCRAM_SHA_512))).all());
            awaitLogin(user, "carol-pw", false);
            ExecutionException e = assertThrows(ExecutionException.class,
                    () -> admin.describeUserScramCredentials(List.of(user)).description(user)
                            .get(30, TimeUnit.SECONDS));
            assertInstanceOf(ResourceNotFoundException.class, e.getCause());
        }
        try (Admin alice = Admin.create(props("alice"))) {
            ExecutionException e = assertThrows(ExecutionException.class,
                    () -> alice.describeUserScramCredentials().all().get(30, TimeUnit.SECONDS));
            assertInstanceOf(ClusterAuthorizationException.class, e.getCause());
            e = assertThrows(ExecutionException.class,
                    () -> alice.alterUserScramCredentials(List.of(new UserScramCredentialUpsertion(
                            user, new ScramCredentialInfo(ScramMechanism.SCRAM_SHA_256, 4096), "x")))
                            .all().get(30, TimeUnit.SECONDS));
            assertInstanceOf(ClusterAuthorizationException.class, e.getCause());
        }
    }
}
