//! The SQS gateway with the AWS SDK for Rust (`aws-sdk-sqs`) and raw query-protocol requests:
//! a standard queue end to end, SigV4 keys enforced, a long poll on one gateway woken by a
//! send through another, and messages surviving `kill -9` of the server, in-flight ones
//! coming back after their visibility timeout.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName};
use common::{Server, free_port_args};

fn sqs_args(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = free_port_args(dir);
    let i = a.iter().position(|x| x == "--sqs-listen").unwrap();
    a[i + 1] = "127.0.0.1:0".into();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn client(server: &Server, key: &str, secret: &str) -> Client {
    let addr = server.listening["sqs"];
    let conf = aws_sdk_sqs::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(key, secret, None, None, "test"))
        .endpoint_url(format!("http://{addr}"))
        .build();
    Client::from_conf(conf)
}

async fn create(c: &Client, name: &str, visibility_s: u32) -> String {
    c.create_queue()
        .queue_name(name)
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            visibility_s.to_string(),
        )
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap()
}

fn attr(data_type: &str, text: Option<&str>, bin: Option<&[u8]>) -> MessageAttributeValue {
    let mut b = MessageAttributeValue::builder().data_type(data_type);
    if let Some(t) = text {
        b = b.string_value(t);
    }
    if let Some(x) = bin {
        b = b.binary_value(Blob::new(x));
    }
    b.build().unwrap()
}

#[tokio::test]
async fn the_rust_sdk_sends_receives_and_deletes_with_attributes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&sqs_args(dir.path(), &[]));
    let c = client(&server, "AKIDANY", "any");
    let url = create(&c, "rust-sdk", 30).await;
    assert!(url.ends_with("/000000000000/rust-sdk"), "{url}");
    let sent = c
        .send_message()
        .queue_url(&url)
        .message_body("hello")
        .message_attributes("color", attr("String", Some("red"), None))
        .message_attributes("count", attr("Number", Some("42"), None))
        .message_attributes("raw", attr("Binary", None, Some(&[0, 1, 2])))
        .send()
        .await
        .unwrap();
    assert_eq!(
        sent.md5_of_message_body(),
        Some("5d41402abc4b2a76b9719d911017c592")
    );
    assert!(sent.md5_of_message_attributes().is_some());
    let got = c
        .receive_message()
        .queue_url(&url)
        .max_number_of_messages(10)
        .message_attribute_names("All")
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .unwrap();
    let msgs = got.messages();
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.body(), Some("hello"));
    assert_eq!(m.message_id(), sent.message_id());
    assert_eq!(
        m.md5_of_message_attributes(),
        sent.md5_of_message_attributes()
    );
    let attrs = m.message_attributes().unwrap();
    assert_eq!(attrs["color"].string_value(), Some("red"));
    assert_eq!(attrs["count"].data_type(), "Number");
    assert_eq!(attrs["raw"].binary_value().unwrap().as_ref(), &[0, 1, 2]);
    let sys = m.attributes().unwrap();
    assert_eq!(
        sys[&MessageSystemAttributeName::ApproximateReceiveCount],
        "1"
    );
    assert_eq!(sys[&MessageSystemAttributeName::SenderId], "AKIDANY");
    // Counted in the listener's traffic: one message of 5 bytes in, and out.
    let admin = server.admin.unwrap();
    tokio::task::spawn_blocking(move || {
        let labels = "{listener=\"sqs\",protocol=\"sqs\"}";
        common::wait_metric(admin, &format!("tributary_messages_in_total{labels}"), 1.0);
        common::wait_metric(
            admin,
            &format!("tributary_message_bytes_in_total{labels}"),
            5.0,
        );
        common::wait_metric(admin, &format!("tributary_messages_out_total{labels}"), 1.0);
    })
    .await
    .unwrap();
    // Leased: invisible to a second receive, counted as not visible.
    let again = c.receive_message().queue_url(&url).send().await.unwrap();
    assert!(again.messages().is_empty());
    let counts = c
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::All)
        .send()
        .await
        .unwrap();
    let counts = counts.attributes().unwrap();
    assert_eq!(
        counts[&QueueAttributeName::ApproximateNumberOfMessagesNotVisible],
        "1"
    );
    c.delete_message()
        .queue_url(&url)
        .receipt_handle(m.receipt_handle().unwrap())
        .send()
        .await
        .unwrap();
    let counts = c
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap();
    assert_eq!(
        counts.attributes().unwrap()[&QueueAttributeName::ApproximateNumberOfMessagesNotVisible],
        "0"
    );
    // A queue that does not exist: QueueDoesNotExist, as the SDK models it.
    let err = c
        .get_queue_url()
        .queue_name("no-such-queue")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(err.is_queue_does_not_exist(), "{err:?}");
}

#[tokio::test]
async fn sigv4_keys_are_enforced_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tributary.toml");
    std::fs::write(
        &config,
        "[[sqs_credentials]]\naccess_key_id = \"AKIDGOOD\"\nsecret_access_key = \"good-secret\"\n",
    )
    .unwrap();
    let server = Server::start(&sqs_args(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    ));
    let good = client(&server, "AKIDGOOD", "good-secret");
    create(&good, "signed", 30).await;
    for (key, secret, code) in [
        ("AKIDGOOD", "wrong-secret", "SignatureDoesNotMatch"),
        ("AKIDNOBODY", "good-secret", "InvalidClientTokenId"),
    ] {
        let err = client(&server, key, secret)
            .list_queues()
            .send()
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(code), "{key}: {err:?}");
    }
    // An unsigned request: refused too.
    let addr = server.listening["sqs"];
    let (status, body) = form_post(addr, "/", "Action=ListQueues");
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("<Code>MissingAuthenticationToken</Code>"),
        "{body}"
    );
}

/// One HTTP/1.0 form POST (the query protocol); answers status and body.
fn form_post(addr: std::net::SocketAddr, path: &str, form: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!(
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

#[test]
fn the_query_protocol_answers_in_xml() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&sqs_args(dir.path(), &[]));
    let addr = server.listening["sqs"];
    let (status, body) = form_post(
        addr,
        "/",
        "Action=CreateQueue&QueueName=xmlq&Attribute.1.Name=DelaySeconds&Attribute.1.Value=0&Version=2012-11-05",
    );
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(&format!(
            "<QueueUrl>http://{addr}/000000000000/xmlq</QueueUrl>"
        )),
        "{body}"
    );
    // The legacy form: the queue URL is the path.
    let (status, body) = form_post(
        addr,
        "/000000000000/xmlq",
        "Action=SendMessage&MessageBody=a%3Cb&MessageAttribute.1.Name=k&MessageAttribute.1.Value.DataType=String&MessageAttribute.1.Value.StringValue=v",
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<MD5OfMessageBody>"), "{body}");
    let (status, body) = form_post(
        addr,
        "/",
        &format!(
            "Action=ReceiveMessage&QueueUrl=http%3A%2F%2F{addr}%2F000000000000%2Fxmlq&MessageAttributeName.1=All&AttributeName.1=ApproximateReceiveCount"
        ),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<Body>a&lt;b</Body>"), "{body}");
    assert!(
        body.contains("<MessageAttribute><Name>k</Name><Value><DataType>String</DataType><StringValue>v</StringValue></Value></MessageAttribute>"),
        "{body}"
    );
    assert!(
        body.contains(
            "<Attribute><Name>ApproximateReceiveCount</Name><Value>1</Value></Attribute>"
        ),
        "{body}"
    );
    let (status, body) = form_post(
        addr,
        "/000000000000/nope",
        "Action=GetQueueAttributes&AttributeName.1=All",
    );
    assert_eq!(status, 400);
    assert!(
        body.contains("<Code>AWS.SimpleQueueService.NonExistentQueue</Code>"),
        "{body}"
    );
    let (status, body) = form_post(addr, "/", "Action=Explode");
    assert_eq!(status, 400);
    assert!(body.contains("<Code>InvalidAction</Code>"), "{body}");
}

#[tokio::test]
async fn a_long_poll_on_one_gateway_wakes_on_a_send_through_another() {
    let dir = tempfile::tempdir().unwrap();
    let core = Server::start(&{
        let mut a = vec!["core".to_string()];
        a.extend(free_port_args(&dir.path().join("core")));
        a
    });
    let gateway = |name: &str| {
        let mut a = vec!["gateway".to_string(), "sqs".to_string()];
        a.extend(sqs_args(&dir.path().join(name), &["--core"]));
        a.push(format!("http://{}", core.core));
        Server::start(&a)
    };
    let (g1, g2) = (gateway("g1"), gateway("g2"));
    let (c1, c2) = (client(&g1, "a", "b"), client(&g2, "a", "b"));
    let url = create(&c1, "across", 30).await;
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let got = c1
            .receive_message()
            .queue_url(url)
            .wait_time_seconds(20)
            .send()
            .await
            .unwrap();
        (started.elapsed(), got.messages().to_vec())
    });
    // The receive is parked on gateway 1 before the send goes through gateway 2: the
    // queue counts one consumer while a long poll waits.
    let url2 = c2
        .get_queue_url()
        .queue_name("across")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let mut api = common::queue_api::api(&core).await;
    api.wait_info("across", "the long poll to start", |i| i.consumers == 1)
        .await;
    c2.send_message()
        .queue_url(&url2)
        .message_body("wake up")
        .send()
        .await
        .unwrap();
    let (took, msgs) = waiting.await.unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].body(), Some("wake up"));
    assert!(took < Duration::from_secs(15), "woken after {took:?}");
}

#[tokio::test]
async fn messages_survive_kill_9_and_in_flight_ones_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let args = sqs_args(dir.path(), &[]);
    let server = Server::start(&args);
    let c = client(&server, "a", "b");
    let url = create(&c, "durable", 3).await;
    let mut sent = BTreeSet::new();
    for i in 0..20 {
        let body = format!("m{i}");
        c.send_message()
            .queue_url(&url)
            .message_body(&body)
            .send()
            .await
            .unwrap();
        sent.insert(body);
    }
    // Five in flight, two of them deleted. Their leases end no earlier than this.
    let leased_until = Instant::now() + Duration::from_secs(3);
    let got = c
        .receive_message()
        .queue_url(&url)
        .max_number_of_messages(5)
        .send()
        .await
        .unwrap();
    let in_flight = got.messages().to_vec();
    assert_eq!(in_flight.len(), 5);
    for m in &in_flight[..2] {
        c.delete_message()
            .queue_url(&url)
            .receipt_handle(m.receipt_handle().unwrap())
            .send()
            .await
            .unwrap();
        sent.remove(m.body().unwrap());
    }
    server.kill9();

    let server = Server::start(&args);
    let c = client(&server, "a", "b");
    let url = c
        .get_queue_url()
        .queue_name("durable")
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < sent.len() {
        assert!(Instant::now() < deadline, "got {seen:?} of {sent:?}");
        let got = c
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(5)
            .send()
            .await
            .unwrap();
        for m in got.messages() {
            let body = m.body().unwrap().to_string();
            if in_flight.iter().any(|f| f.body() == Some(body.as_str())) {
                assert!(
                    Instant::now() >= leased_until,
                    "{body} came back before its visibility timeout"
                );
            }
            assert!(seen.insert(body), "received twice");
        }
    }
    assert_eq!(seen, sent, "every sent and undeleted message, once");
}
