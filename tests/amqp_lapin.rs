//! lapin, the Rust AMQP 0-9-1 client, against the real binary: publisher confirms, a
//! consumer with prefetch and manual acks, properties and headers carried, a nack with
//! requeue redelivered, basic.get, and queue.delete's message count. The Python (pika) and
//! Java suites cover the protocol in depth, against RabbitMQ too; this keeps lapin's own
//! framing and state machine in the loop (the bench no longer uses it).

mod common;

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};

use common::{Server, free_port_args};

const MESSAGES: u32 = 50;

#[tokio::test]
async fn lapin_publishes_with_confirms_and_consumes_with_acks() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(&dir.path().join("data"));
    let at = args.iter().position(|a| a == "--amqp-listen").unwrap();
    args[at + 1] = "127.0.0.1:0".into();
    let server = Server::start(&args);
    let addr = server.listening["amqp"];
    let uri = format!("amqp://guest:guest@{addr}/%2f");
    let connection = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .unwrap();

    let publisher = connection.create_channel().await.unwrap();
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let declared = publisher
        .queue_declare(
            "lapin-q".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(declared.message_count(), 0);
    for i in 0..MESSAGES {
        let mut headers = FieldTable::default();
        headers.insert("n".into(), AMQPValue::LongUInt(i));
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("text/plain".into())
            .with_message_id(format!("m{i}").into())
            .with_headers(headers);
        let confirm = publisher
            .basic_publish(
                "".into(),
                "lapin-q".into(),
                BasicPublishOptions::default(),
                format!("body {i}").as_bytes(),
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(confirm, Confirmation::Ack(None), "message {i}");
    }

    let consumer_channel = connection.create_channel().await.unwrap();
    consumer_channel
        .basic_qos(10, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = consumer_channel
        .basic_consume(
            "lapin-q".into(),
            "lapin-c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..MESSAGES {
        let delivery = tokio::time::timeout(std::time::Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(delivery.data, format!("body {i}").as_bytes());
        assert!(!delivery.redelivered);
        let p = &delivery.properties;
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(
            p.content_type().as_ref().map(ShortString::as_str),
            Some("text/plain")
        );
        assert_eq!(
            p.message_id().as_ref().map(ShortString::as_str),
            Some(format!("m{i}").as_str())
        );
        let headers = p.headers().as_ref().unwrap();
        assert_eq!(
            headers.inner().get(&ShortString::from("n")),
            Some(&AMQPValue::LongUInt(i))
        );
        if i + 1 == MESSAGES {
            // The last one goes back once and comes again, marked redelivered.
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .unwrap();
        } else {
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    let again = tokio::time::timeout(std::time::Duration::from_secs(10), consumer.next())
        .await
        .expect("the nacked message again within 10 s")
        .unwrap()
        .unwrap();
    assert!(again.redelivered);
    assert_eq!(again.data, format!("body {}", MESSAGES - 1).as_bytes());
    again.ack(BasicAckOptions::default()).await.unwrap();

    let getter = connection.create_channel().await.unwrap();
    let empty = getter
        .basic_get("lapin-q".into(), BasicGetOptions::default())
        .await
        .unwrap();
    assert!(empty.is_none(), "every message was acked");
    let deleted = getter
        .queue_delete("lapin-q".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(deleted, 0);
    connection.close(200, "OK".into()).await.unwrap();
}

#[tokio::test]
async fn a_refused_login_is_counted_per_listener_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(&dir.path().join("data"));
    let at = args.iter().position(|a| a == "--amqp-listen").unwrap();
    args[at + 1] = "127.0.0.1:0".into();
    let server = Server::start(&args);
    let addr = server.listening["amqp"];
    let admin = server.admin.unwrap();
    for _ in 0..3 {
        let refused = Connection::connect(
            &format!("amqp://guest:wrong@{addr}/%2f"),
            ConnectionProperties::default(),
        )
        .await;
        assert!(refused.is_err(), "a wrong password was let in");
    }
    let series = "tributary_auth_refusals_total{listener=\"amqp\",reason=\"bad_credentials\"}";
    tokio::task::spawn_blocking(move || common::wait_metric(admin, series, 3.0))
        .await
        .unwrap();
}
