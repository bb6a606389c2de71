//! MQTT flow control: a subscriber that falls behind (over 1,000 QoS 1 messages queued behind
//! its window) holds up the PUBACKs of the publishes that reach it, so publishers go at their
//! subscribers' pace. Acknowledgements stay in order, and nothing is lost.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::mqtt_raw::{packet, read_exact, string};
use common::{Server, free_port_args, metric};

const TOPIC: &str = "paced/t";

fn connected(addr: SocketAddr, client_id: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    // Bounds every read: a held acknowledgement is released within half a second.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut body = string("MQTT");
    body.extend([4, 0x02, 0, 60]);
    body.extend(string(client_id));
    s.write_all(&packet(0x10, &body)).unwrap();
    let connack = read_exact(&mut s, 4);
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK");
    s
}

/// One packet: (first byte, body).
fn read_packet(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let first = read_exact(s, 1)[0];
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = read_exact(s, 1)[0];
        len |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (first, body)
}

fn publish_qos1(id: u16, seq: u32) -> Vec<u8> {
    let mut body = string(TOPIC);
    body.extend(id.to_be_bytes());
    body.extend(seq.to_be_bytes());
    packet(0x32, &body)
}

/// Sends publishes `from..=to` (packet id = sequence number), then reads their PUBACKs, which
/// must come in the order of the publishes.
fn publish_range(p: &mut TcpStream, from: u32, to: u32) {
    let mut out = Vec::new();
    for seq in from..=to {
        out.extend(publish_qos1(seq as u16, seq));
    }
    p.write_all(&out).unwrap();
    for seq in from..=to {
        let (first, body) = read_packet(p);
        assert_eq!(first, 0x40, "PUBACK");
        assert_eq!(
            u16::from_be_bytes([body[0], body[1]]),
            seq as u16,
            "PUBACKs in order"
        );
    }
}

#[test]
fn a_lagging_subscriber_holds_its_publishers_acknowledgements_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(dir.path());
    let i = args.iter().position(|a| a == "--mqtt-listen").unwrap();
    args[i + 1] = "127.0.0.1:0".into();
    let server = Server::start(&args);
    let addr = server.mqtt.unwrap();
    let admin = server.admin.unwrap();

    let mut sub = connected(addr, "slow-sub");
    let mut body = vec![0, 1];
    body.extend(string(TOPIC));
    body.push(1);
    sub.write_all(&packet(0x82, &body)).unwrap();
    assert_eq!(read_exact(&mut sub, 5), [0x90, 3, 0, 1, 1], "SUBACK QoS 1");

    // The subscriber reads nothing: its window (1,000 in flight for 3.1.1) fills, then its
    // queue. Past 1,000 queued, each publish's PUBACK waits for it (here: until the bound).
    let mut publisher = connected(addr, "fast-pub");
    let total: u32 = 2_400;
    publish_range(&mut publisher, 1, 1_000);
    publish_range(&mut publisher, 1_001, 1_999);
    assert_eq!(
        metric(admin, "tributary_session_publishes_paced_total"),
        Some(0.0),
        "no publish is held while the subscriber has under 1,000 queued"
    );
    // From the 2,000th on, the subscriber has 1,000 queued behind its 1,000 in flight.
    publish_range(&mut publisher, 2_000, total);
    assert_eq!(
        metric(admin, "tributary_session_publishes_paced_total"),
        Some(f64::from(total - 1_999)),
        "every publish that found the subscriber 1,000 behind was held"
    );

    // The subscriber catches up: every message, once and in order.
    for seq in 1..=total {
        let (first, body) = read_packet(&mut sub);
        assert_eq!(first & 0xf6, 0x32, "PUBLISH QoS 1, got {first:#x}");
        let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
        let id = &body[2 + topic_len..4 + topic_len];
        let payload = &body[4 + topic_len..];
        assert_eq!(payload, seq.to_be_bytes(), "message {seq} in order");
        sub.write_all(&packet(0x40, id)).unwrap();
    }
    // And a publisher is not paced by a subscriber that keeps up.
    let before = metric(admin, "tributary_session_publishes_paced_total").unwrap();
    publish_range(&mut publisher, total + 1, total + 10);
    for _ in 0..10 {
        let (_, body) = read_packet(&mut sub);
        let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
        sub.write_all(&packet(0x40, &body[2 + topic_len..4 + topic_len]))
            .unwrap();
    }
    assert_eq!(
        metric(admin, "tributary_session_publishes_paced_total"),
        Some(before)
    );
}
