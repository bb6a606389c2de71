//! The MQTT gateway against bad input on a raw socket: every case ends in the reaction the
//! specification gives (a CONNACK refusal, a DISCONNECT reason, or a closed connection),
//! and a well-behaved client on the same server keeps working throughout.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::mqtt_raw::{packet, read_exact, remaining_length, string};
use common::{Server, free_port_args};

fn start() -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut args = free_port_args(dir.path());
    let i = args.iter().position(|a| a == "--mqtt-listen").unwrap();
    args[i + 1] = "127.0.0.1:0".into();
    let server = Server::start(&args);
    assert!(server.mqtt.is_some(), "no 'listening mqtt' line");
    (server, dir)
}

fn connect(level: u8, client_id: &str) -> Vec<u8> {
    let mut body = string("MQTT");
    body.extend([level, 0x02, 0, 60]);
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend(string(client_id));
    packet(0x10, &body)
}

fn publish_qos0(level: u8, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic);
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x30, &body)
}

fn open(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads until the server closes; returns everything it sent. Fails if it stays open.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        assert!(Instant::now() < deadline, "server kept the connection open");
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("server kept the connection open (got {got:02x?})")
            }
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn connected(addr: SocketAddr, level: u8, id: &str) -> TcpStream {
    let mut s = open(addr);
    s.write_all(&connect(level, id)).unwrap();
    let head = read_exact(&mut s, 2);
    assert_eq!(head[0], 0x20, "CONNACK expected, got {head:02x?}");
    let rest = read_exact(&mut s, head[1] as usize);
    assert_eq!(rest[1], 0, "CONNACK refused: {rest:02x?}");
    s
}

/// A subscriber on `probe/#` that must still get a message after each bad client.
struct Probe {
    sub: TcpStream,
    publisher: TcpStream,
    n: u8,
}

impl Probe {
    fn new(addr: SocketAddr) -> Self {
        let mut sub = connected(addr, 4, "probe-sub");
        let mut body = vec![0, 1];
        body.extend(string("probe/#"));
        body.push(0);
        sub.write_all(&packet(0x82, &body)).unwrap();
        let suback = read_exact(&mut sub, 5);
        assert_eq!(suback, [0x90, 3, 0, 1, 0]);
        let publisher = connected(addr, 4, "probe-pub");
        Probe {
            sub,
            publisher,
            n: 0,
        }
    }

    fn check(&mut self) {
        self.n += 1;
        let msg = publish_qos0(4, "probe/x", &[self.n]);
        self.publisher.write_all(&msg).unwrap();
        let got = read_exact(&mut self.sub, msg.len());
        assert_eq!(got, msg, "the well-behaved client stopped getting messages");
    }
}

#[test]
fn bad_packets_get_the_reaction_the_spec_gives_and_nobody_else_is_affected() {
    let (server, _dir) = start();
    let addr = server.mqtt.unwrap();
    let mut probe = Probe::new(addr);

    // A packet before CONNECT: closed without an answer.
    let mut s = open(addr);
    s.write_all(&publish_qos0(4, "a", b"x")).unwrap();
    assert_eq!(read_until_closed(&mut s), b"");
    probe.check();

    // Not MQTT at all.
    let mut s = open(addr);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_until_closed(&mut s), b"");
    probe.check();

    // Unknown protocol level: CONNACK 0x01 (unacceptable protocol version), then closed.
    let mut s = open(addr);
    s.write_all(&connect(6, "lvl6")).unwrap();
    assert_eq!(read_until_closed(&mut s), [0x20, 2, 0, 1]);
    probe.check();

    // A second CONNECT is a protocol violation: closed (3.1.1) / DISCONNECT 0x82 (5.0).
    let mut s = connected(addr, 4, "twice4");
    s.write_all(&connect(4, "twice4")).unwrap();
    assert_eq!(read_until_closed(&mut s), b"");
    let mut s = connected(addr, 5, "twice5");
    s.write_all(&connect(5, "twice5")).unwrap();
    assert_eq!(read_until_closed(&mut s), [0xE0, 2, 0x82, 0]);
    probe.check();

    // A wildcard in a PUBLISH topic: closed / DISCONNECT 0x90 (Topic Name invalid).
    let mut s = connected(addr, 4, "wild4");
    s.write_all(&publish_qos0(4, "a/+/b", b"x")).unwrap();
    assert_eq!(read_until_closed(&mut s), b"");
    let mut s = connected(addr, 5, "wild5");
    s.write_all(&publish_qos0(5, "a/#", b"x")).unwrap();
    assert_eq!(read_until_closed(&mut s), [0xE0, 2, 0x90, 0]);
    probe.check();

    // Reserved flag bits on SUBSCRIBE (must be 0010): malformed.
    let mut s = connected(addr, 4, "flags");
    let mut body = vec![0, 1];
    body.extend(string("a"));
    body.push(0);
    s.write_all(&packet(0x80, &body)).unwrap();
    assert_eq!(read_until_closed(&mut s), b"");
    probe.check();

    // QoS 3 in a PUBLISH: malformed.
    let mut s = connected(addr, 5, "qos3");
    let mut body = string("a");
    body.extend([0, 1, 0]);
    s.write_all(&packet(0x36, &body)).unwrap();
    let got = read_until_closed(&mut s);
    assert!(got.is_empty() || got[..3] == [0xE0, 2, 0x81], "{got:02x?}");
    probe.check();

    // Invalid UTF-8 in a topic: malformed.
    let mut s = connected(addr, 4, "utf8");
    let body = [0u8, 2, 0xC3, 0x28, b'x'];
    s.write_all(&packet(0x30, &body)).unwrap();
    assert_eq!(read_until_closed(&mut s), b"");
    probe.check();

    // A remaining length over the limit (here 5 length bytes): malformed, closed.
    let mut s = connected(addr, 4, "len");
    s.write_all(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]).unwrap();
    assert_eq!(read_until_closed(&mut s), b"");
    probe.check();

    // A packet over the gateway's Maximum Packet Size (16 MiB): refused before it is read.
    let mut s = connected(addr, 5, "big");
    let mut head = vec![0x30];
    head.extend(remaining_length(200 << 20));
    s.write_all(&head).unwrap();
    assert_eq!(read_until_closed(&mut s), [0xE0, 2, 0x95, 0]);
    probe.check();

    // Truncated CONNECT then silence and EOF: nothing breaks.
    let mut s = open(addr);
    s.write_all(&connect(4, "trunc")[..7]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut s), b"");
    probe.check();
}

#[test]
fn keep_alive_is_enforced_at_one_and_a_half_times() {
    let (server, _dir) = start();
    let addr = server.mqtt.unwrap();
    let mut s = open(addr);
    let mut body = string("MQTT");
    body.extend([4, 0x02, 0, 1]); // keep-alive 1 s
    body.extend(string("ka"));
    s.write_all(&packet(0x10, &body)).unwrap();
    assert_eq!(read_exact(&mut s, 4), [0x20, 2, 0, 0]);
    let started = Instant::now();
    assert_eq!(read_until_closed(&mut s), b"");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1400),
        "closed after {waited:?}, before 1.5 x keep-alive"
    );
}

#[test]
fn enhanced_authentication_is_refused_with_its_reason_codes() {
    let (server, _dir) = start();
    let addr = server.mqtt.unwrap();
    // CONNECT 5.0 with Authentication Method "SCRAM-SHA-1": CONNACK 0x8C, then closed.
    let mut body = string("MQTT");
    body.extend([5, 0x02, 0, 60]);
    let method = string("SCRAM-SHA-1");
    body.push(1 + method.len() as u8);
    body.push(0x15);
    body.extend(method);
    body.extend(string("auth"));
    let mut s = open(addr);
    s.write_all(&packet(0x10, &body)).unwrap();
    let got = read_until_closed(&mut s);
    assert!(
        got.len() >= 4 && got[0] == 0x20 && got[3] == 0x8C,
        "{got:02x?}"
    );

    // AUTH on a connection that did not ask for it: DISCONNECT 0x82 (protocol error).
    let mut s = connected(addr, 5, "auth2");
    s.write_all(&packet(0xF0, &[0x18, 0])).unwrap();
    assert_eq!(read_until_closed(&mut s), [0xE0, 2, 0x82, 0]);
}
