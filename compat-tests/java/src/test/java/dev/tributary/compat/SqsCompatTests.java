package dev.tributary.compat;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.net.URI;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.stream.Collectors;
import java.util.stream.IntStream;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;
import software.amazon.awssdk.auth.credentials.AwsBasicCredentials;
import software.amazon.awssdk.auth.credentials.StaticCredentialsProvider;
import software.amazon.awssdk.core.SdkBytes;
import software.amazon.awssdk.http.urlconnection.UrlConnectionHttpClient;
import software.amazon.awssdk.regions.Region;
import software.amazon.awssdk.services.sqs.SqsClient;
import software.amazon.awssdk.services.sqs.model.ChangeMessageVisibilityRequest;
import software.amazon.awssdk.services.sqs.model.CreateQueueRequest;
import software.amazon.awssdk.services.sqs.model.DeleteMessageRequest;
import software.amazon.awssdk.services.sqs.model.GetQueueAttributesRequest;
import software.amazon.awssdk.services.sqs.model.GetQueueUrlRequest;
import software.amazon.awssdk.services.sqs.model.Message;
import software.amazon.awssdk.services.sqs.model.MessageAttributeValue;
import software.amazon.awssdk.services.sqs.model.MessageSystemAttributeName;
import software.amazon.awssdk.services.sqs.model.QueueAttributeName;
import software.amazon.awssdk.services.sqs.model.QueueDoesNotExistException;
import software.amazon.awssdk.services.sqs.model.ReceiveMessageRequest;
import software.amazon.awssdk.services.sqs.model.SendMessageBatchRequestEntry;
import software.amazon.awssdk.services.sqs.model.SendMessageBatchResponse;
import software.amazon.awssdk.services.sqs.model.SendMessageRequest;
import software.amazon.awssdk.services.sqs.model.SendMessageResponse;

/**
 * SQS scenarios with the AWS SDK for Java v2 ({@code software.amazon.awssdk:sqs}, AWS JSON 1.0,
 * the JDK's HttpURLConnection client). The SDK checks MD5OfMessageBody and
 * MD5OfMessageAttributes of every send and receive itself (its MD5 interceptor, on by default):
 * a wrong digest fails the call. The same tests run against Tributary ({@link TributarySqsTest})
 * and ElasticMQ ({@link ElasticMqSqsTest}); every queue name carries this test's prefix and
 * the queues are deleted afterwards.
 */
abstract class SqsCompatTests {
    static final long WAIT_MS = 15_000;

    /** HOST:PORT of the SQS endpoint under test. */
    protected abstract String address();

    private final String prefix = "java-" + UUID.randomUUID().toString().substring(0, 8) + "-";
    private final List<String> queueUrls = new ArrayList<>();
    private SqsClient sqs;

    @BeforeEach
    void client() {
        sqs = SqsClient.builder()
                .endpointOverride(URI.create("http://" + address()))
                .region(Region.US_EAST_1)
                .credentialsProvider(StaticCredentialsProvider.create(
                        AwsBasicCredentials.create("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")))
                .httpClient(UrlConnectionHttpClient.builder()
                        .socketTimeout(Duration.ofSeconds(30))
                        .connectionTimeout(Duration.ofSeconds(10))
                        .build())
                .overrideConfiguration(o -> o.retryStrategy(b -> b.maxAttempts(1)))
                .build();
    }

    @AfterEach
    void cleanUp() {
        if (sqs == null) {
            return;
        }
        for (String url : queueUrls) {
            try {
                sqs.deleteQueue(b -> b.queueUrl(url));
            } catch (RuntimeException e) {
                // already gone, or the server is down: reported by the test itself
            }
        }
        sqs.close();
    }

    private String createQueue(String name, Map<QueueAttributeName, String> attributes) {
        String url = sqs.createQueue(CreateQueueRequest.builder()
                .queueName(prefix + name).attributes(attributes).build()).queueUrl();
        queueUrls.add(url);
        return url;
    }

    private String arn(String url) {
        return sqs.getQueueAttributes(GetQueueAttributesRequest.builder().queueUrl(url)
                .attributeNames(QueueAttributeName.QUEUE_ARN).build())
                .attributes().get(QueueAttributeName.QUEUE_ARN);
    }

    /** Long-polls until {@code n} messages arrived (or fails after WAIT_MS). */
    private List<Message> receive(String url, int n, int visibility) {
        List<Message> got = new ArrayList<>();
        long deadline = System.nanoTime() + Duration.ofMillis(WAIT_MS).toNanos();
        while (got.size() < n && System.nanoTime() < deadline) {
            got.addAll(sqs.receiveMessage(ReceiveMessageRequest.builder().queueUrl(url)
                    .maxNumberOfMessages(Math.min(10, n - got.size()))
                    .waitTimeSeconds(2)
                    .visibilityTimeout(visibility)
                    .messageAttributeNames("All")
                    .messageSystemAttributeNames(MessageSystemAttributeName.ALL)
                    .build()).messages());
        }
        assertEquals(n, got.size(), "messages received within " + WAIT_MS + " ms: " + got);
        return got;
    }

    private void assertEmpty(String url) {
        List<Message> left = sqs.receiveMessage(b -> b.queueUrl(url).waitTimeSeconds(0)
                .maxNumberOfMessages(10)).messages();
        assertTrue(left.isEmpty(), "unexpected messages: " + left);
    }

    @Test
    @Timeout(60)
    void sendReceiveDeleteWithAttributesCheckedBySdk() {
        String url = createQueue("std", Map.of());
        Map<String, MessageAttributeValue> attrs = Map.of(
                "s", MessageAttributeValue.builder().dataType("String").stringValue("caf\u00e9").build(),
                "n", MessageAttributeValue.builder().dataType("Number").stringValue("42.5").build(),
                "b", MessageAttributeValue.builder().dataType("Binary")
                        .binaryValue(SdkBytes.fromByteArray(new byte[] {0, 1, (byte) 0xfe})).build());
        SendMessageResponse sent = sqs.sendMessage(SendMessageRequest.builder().queueUrl(url)
                .messageBody("hello from java \u4e2d").messageAttributes(attrs).build());
        assertNotNull(sent.messageId());
        assertNotNull(sent.md5OfMessageAttributes());
        Message m = receive(url, 1, 30).get(0);
        assertEquals("hello from java \u4e2d", m.body());
        assertEquals(sent.messageId(), m.messageId());
        assertEquals(attrs, m.messageAttributes());
        assertEquals("1", m.attributes().get(MessageSystemAttributeName.APPROXIMATE_RECEIVE_COUNT));
        sqs.deleteMessage(DeleteMessageRequest.builder().queueUrl(url)
                .receiptHandle(m.receiptHandle()).build());
        assertEmpty(url);
        Map<QueueAttributeName, String> qa = sqs.getQueueAttributes(b -> b.queueUrl(url)
                .attributeNames(QueueAttributeName.ALL)).attributes();
        assertEquals("0", qa.get(QueueAttributeName.APPROXIMATE_NUMBER_OF_MESSAGES_NOT_VISIBLE));
    }

    @Test
    @Timeout(60)
    void batchSend() {
        String url = createQueue("batch", Map.of());
        List<SendMessageBatchRequestEntry> entries = IntStream.range(0, 10)
                .mapToObj(i -> SendMessageBatchRequestEntry.builder().id("e" + i)
                        .messageBody("body " + i)
                        .messageAttributes(Map.of("i", MessageAttributeValue.builder()
                                .dataType("Number").stringValue(String.valueOf(i)).build()))
                        .build())
                .collect(Collectors.toList());
        SendMessageBatchResponse r = sqs.sendMessageBatch(b -> b.queueUrl(url).entries(entries));
        assertTrue(r.failed().isEmpty(), r.failed().toString());
        assertEquals(10, r.successful().size());
        List<Message> got = receive(url, 10, 60);
        assertEquals(IntStream.range(0, 10).mapToObj(i -> "body " + i).sorted().collect(Collectors.toList()),
                got.stream().map(Message::body).sorted().collect(Collectors.toList()));
        for (Message m : got) {
            assertEquals(m.body().substring(5), m.messageAttributes().get("i").stringValue());
        }
    }

    @Test
    @Timeout(60)
    void visibilityChangeToZeroRedelivers() {
        String url = createQueue("vis", Map.of());
        sqs.sendMessage(b -> b.queueUrl(url).messageBody("again"));
        Message first = receive(url, 1, 600).get(0);
        assertEmpty(url);
        sqs.changeMessageVisibility(ChangeMessageVisibilityRequest.builder().queueUrl(url)
                .receiptHandle(first.receiptHandle()).visibilityTimeout(0).build());
        Message second = receive(url, 1, 600).get(0);
        assertEquals(first.messageId(), second.messageId());
        assertEquals("2", second.attributes().get(MessageSystemAttributeName.APPROXIMATE_RECEIVE_COUNT));
    }

    @Test
    @Timeout(90)
    void fifoOrderPerGroup() {
        String url = createQueue("order.fifo", Map.of(
                QueueAttributeName.FIFO_QUEUE, "true",
                QueueAttributeName.CONTENT_BASED_DEDUPLICATION, "true"));
        for (int i = 0; i < 6; i++) {
            for (String g : List.of("a", "b")) {
                String body = g + i;
                SendMessageResponse r = sqs.sendMessage(b -> b.queueUrl(url).messageBody(body)
                        .messageGroupId(g));
                assertNotNull(r.sequenceNumber());
            }
        }
        // A duplicate body within the window is dropped (content-based deduplication).
        sqs.sendMessage(b -> b.queueUrl(url).messageBody("a0").messageGroupId("a"));
        List<Message> got = new ArrayList<>();
        long deadline = System.nanoTime() + Duration.ofMillis(WAIT_MS).toNanos();
        while (got.size() < 12 && System.nanoTime() < deadline) {
            List<Message> batch = sqs.receiveMessage(b -> b.queueUrl(url).maxNumberOfMessages(10)
                    .waitTimeSeconds(1).messageSystemAttributeNames(MessageSystemAttributeName.ALL))
                    .messages();
            for (Message m : batch) {
                sqs.deleteMessage(b -> b.queueUrl(url).receiptHandle(m.receiptHandle()));
            }
            got.addAll(batch);
        }
        assertEquals(12, got.size(), got.toString());
        for (String g : List.of("a", "b")) {
            List<String> bodies = got.stream()
                    .filter(m -> g.equals(m.attributes().get(MessageSystemAttributeName.MESSAGE_GROUP_ID)))
                    .map(Message::body).collect(Collectors.toList());
            assertEquals(IntStream.range(0, 6).mapToObj(i -> g + i).collect(Collectors.toList()), bodies);
        }
        assertEmpty(url);
    }

    @Test
    @Timeout(90)
    void deadLetterQueueAfterMaxReceiveCount() {
        String dlq = createQueue("dlq", Map.of());
        String policy = "{\"deadLetterTargetArn\":\"" + arn(dlq) + "\",\"maxReceiveCount\":\"1\"}";
        String src = createQueue("src", Map.of(QueueAttributeName.REDRIVE_POLICY, policy));
        sqs.sendMessage(b -> b.queueUrl(src).messageBody("poison"));
        Message m = receive(src, 1, 1).get(0);
        assertEquals("poison", m.body());
        // Not deleted: once its visibility runs out, the next receive moves it to the DLQ.
        List<Message> dead = new ArrayList<>();
        long deadline = System.nanoTime() + Duration.ofMillis(WAIT_MS).toNanos();
        while (dead.isEmpty() && System.nanoTime() < deadline) {
            List<Message> again = sqs.receiveMessage(b -> b.queueUrl(src).waitTimeSeconds(1)).messages();
            assertTrue(again.isEmpty(), "received past maxReceiveCount: " + again);
            dead.addAll(sqs.receiveMessage(b -> b.queueUrl(dlq).waitTimeSeconds(1)).messages());
        }
        assertFalse(dead.isEmpty(), "the message never reached the dead-letter queue");
        assertEquals("poison", dead.get(0).body());
        assertEquals(m.messageId(), dead.get(0).messageId());
        assertEquals(List.of(src), sqs.listDeadLetterSourceQueues(b -> b.queueUrl(dlq)).queueUrls());
    }

    @Test
    @Timeout(30)
    void missingQueueIsQueueDoesNotExistException() {
        QueueDoesNotExistException e = assertThrows(QueueDoesNotExistException.class,
                () -> sqs.getQueueUrl(GetQueueUrlRequest.builder().queueName(prefix + "missing").build()));
        assertEquals(400, e.statusCode());
        assertThrows(QueueDoesNotExistException.class,
                () -> sqs.sendMessage(b -> b.queueUrl("http://" + address() + "/000000000000/"
                        + prefix + "missing").messageBody("x")));
    }
}
