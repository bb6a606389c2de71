//! The RocketMQ gateway at the wire: bad input gets the broker's errors or a closed
//! connection (never a panic, never another connection hurt), and what it acknowledged
//! survives `kill -9` of the server, delayed messages included. The client here is a raw
//! Remoting client over the gateway's own frame codec; the Java client's scenarios are in
//! compat-tests/java (RocketMqCompatTests).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{Server, free_port_args};
use tributary_gateway_rocketmq::codes::{request as rq, response as rs};
use tributary_gateway_rocketmq::frame::{self, Command, SerializeType};
use tributary_gateway_rocketmq::message::{self, StoredMessage};

fn args(dir: &Path) -> Vec<String> {
    let mut a = free_port_args(dir);
    for flag in ["--rocketmq-listen", "--namesrv-listen"] {
        let i = a.iter().position(|x| x == flag).unwrap();
        a[i + 1] = "127.0.0.1:0".into();
    }
    a
}

struct Client {
    s: TcpStream,
    buf: BytesMut,
    opaque: i32,
}

impl Client {
    fn connect(addr: SocketAddr) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
        Client {
            s,
            buf: BytesMut::new(),
            opaque: 0,
        }
    }

    fn read_frame(&mut self) -> Option<Command> {
        loop {
            if let Some(c) = frame::decode(&mut self.buf).expect("the server's frames decode") {
                return Some(c);
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Sends a request and returns its response (requests the server sends meanwhile are
    /// skipped).
    fn call(&mut self, mut cmd: Command) -> Command {
        self.opaque += 1;
        cmd.opaque = self.opaque;
        self.s.write_all(&cmd.encode()).unwrap();
        loop {
            let r = self
                .read_frame()
                .expect("a response before the connection closed");
            if r.is_response() && r.opaque == self.opaque {
                return r;
            }
        }
    }

    /// True when the server closes the connection within the read timeout.
    fn closed(&mut self) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut b = [0u8; 1024];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) => {
                    return matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                    );
                }
            }
        }
    }
}

fn send(c: &mut Client, topic: &str, queue: i32, body: &str, props: &[(&str, &str)]) -> Command {
    let props: Vec<(String, String)> = props
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    c.call(
        Command::request(rq::SEND_MESSAGE, 0)
            .with_ext("producerGroup", "wire_pg")
            .with_ext("topic", topic)
            .with_ext("defaultTopic", "TBW102")
            .with_ext("defaultTopicQueueNums", 4)
            .with_ext("queueId", queue)
            .with_ext("sysFlag", 0)
            .with_ext("bornTimestamp", 1)
            .with_ext("flag", 0)
            .with_ext("properties", message::encode_properties(&props))
            .with_body(Bytes::from(body.to_string())),
    )
}

fn pull(
    c: &mut Client,
    topic: &str,
    queue: i32,
    offset: i64,
    suspend_ms: i64,
) -> (Command, Vec<StoredMessage>) {
    let r = c.call(
        Command::request(rq::PULL_MESSAGE, 0)
            .with_ext("consumerGroup", "wire_cg")
            .with_ext("topic", topic)
            .with_ext("queueId", queue)
            .with_ext("queueOffset", offset)
            .with_ext("maxMsgNums", 1000)
            .with_ext("sysFlag", if suspend_ms > 0 { 2 | 4 } else { 4 })
            .with_ext("commitOffset", 0)
            .with_ext("suspendTimeoutMillis", suspend_ms)
            .with_ext("subscription", "*")
            .with_ext("subVersion", 0)
            .with_ext("expressionType", "TAG"),
    );
    let msgs = if r.code == rs::SUCCESS {
        message::decode_stored(r.body.clone()).unwrap()
    } else {
        Vec::new()
    };
    (r, msgs)
}

#[test]
fn bad_frames_close_only_their_own_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&args(dir.path()));
    let broker = server.listening["rocketmq"];
    let mut healthy = Client::connect(server.listening["rocketmq-namesrv"]);
    let route = Command::request(rq::GET_ROUTEINFO_BY_TOPIC, 0).with_ext("topic", "TBW102");
    assert_eq!(healthy.call(route.clone()).code, rs::SUCCESS);

    let mut frames: Vec<(&str, Vec<u8>)> = Vec::new();
    // An unknown serialize type.
    frames.push(("serialize type 9", [0, 0, 0, 4, 9, 0, 0, 0].to_vec()));
    // Above the 16 MiB frame limit (nothing is allocated for it).
    frames.push(("oversized", [0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0].to_vec()));
    // A header length beyond the frame.
    frames.push((
        "header length",
        [0, 0, 0, 8, 0, 0, 0, 100, 1, 2, 3, 4].to_vec(),
    ));
    // Not JSON.
    let mut bad_json = vec![0, 0, 0, 9, 0, 0, 0, 5];
    bad_json.extend_from_slice(b"{nope");
    frames.push(("malformed JSON header", bad_json));
    // A binary header cut inside its fixed fields.
    frames.push((
        "truncated binary header",
        [0, 0, 0, 7, 1, 0, 0, 3, 0, 10, 0].to_vec(),
    ));
    for (what, bytes) in frames {
        let mut c = Client::connect(broker);
        c.s.write_all(&bytes).unwrap();
        assert!(c.closed(), "{what}: the connection should be closed");
        assert_eq!(
            healthy.call(route.clone()).code,
            rs::SUCCESS,
            "after {what}"
        );
    }
}

#[test]
fn unknown_codes_and_missing_fields_get_the_brokers_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&args(dir.path()));
    let mut c = Client::connect(server.listening["rocketmq"]);

    let r = c.call(Command::request(9999, 0));
    assert_eq!(r.code, rs::REQUEST_CODE_NOT_SUPPORTED);
    assert!(r.remark.unwrap().contains("9999"));

    let r = c.call(Command::request(rq::SEND_MESSAGE, 0).with_ext("producerGroup", "g"));
    assert_eq!(r.code, rs::SYSTEM_ERROR);
    assert!(
        r.remark.unwrap().contains("topic"),
        "names the missing field"
    );

    let r = c.call(Command::request(rq::HEART_BEAT, 0).with_body(&b"not json"[..]));
    assert_eq!(r.code, rs::SYSTEM_ERROR);

    let r = c.call(
        Command::request(rq::GET_MAX_OFFSET, 0)
            .with_ext("topic", "t")
            .with_ext("queueId", "zero"),
    );
    assert_eq!(r.code, rs::SYSTEM_ERROR);
    assert!(r.remark.unwrap().contains("queueId"));

    let r = send(&mut c, "bad/topic", 0, "x", &[]);
    assert_eq!(r.code, rs::SYSTEM_ERROR);
    assert!(r.remark.unwrap().contains("illegal characters"));

    let r = c.call(
        Command::request(rq::PULL_MESSAGE, 0)
            .with_ext("consumerGroup", "g")
            .with_ext("topic", "never_created")
            .with_ext("queueId", 0)
            .with_ext("queueOffset", 0),
    );
    assert_eq!(r.code, rs::TOPIC_NOT_EXIST);

    // SQL92 filters are refused as a broker without enablePropertyFilter refuses them.
    let r = c.call(
        Command::request(rq::CHECK_CLIENT_CONFIG, 0).with_body(
            &br#"{"clientId":"c","group":"g","subscriptionData":{"expressionType":"SQL92","subString":"a > 1"}}"#[..],
        ),
    );
    assert_eq!(r.code, rs::SYSTEM_ERROR);
    assert!(r.remark.unwrap().contains("SQL92"));

    // The binary header encoding: answered in kind.
    let mut binary = Command::request(rq::GET_ROUTEINFO_BY_TOPIC, 0).with_ext("topic", "TBW102");
    binary.serialize = SerializeType::RocketMq;
    let r = c.call(binary);
    assert_eq!(
        (r.code, r.serialize),
        (rs::SUCCESS, SerializeType::RocketMq)
    );
    let route: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(route["queueDatas"][0]["writeQueueNums"], 8);
}

/// Sends in a thread until killed; returns what was acknowledged: (queue, offset, body).
fn send_until_killed(addr: SocketAddr, topic: String, acked: mpsc::Sender<(i32, i64, String)>) {
    std::thread::spawn(move || {
        let mut c = Client::connect(addr);
        for i in 0.. {
            let body = format!("m-{i}");
            let mut cmd = Command::request(rq::SEND_MESSAGE, 0)
                .with_ext("producerGroup", "pg")
                .with_ext("topic", &topic)
                .with_ext("queueId", i % 4)
                .with_ext("sysFlag", 0)
                .with_ext("bornTimestamp", 1)
                .with_ext("flag", 0)
                .with_ext("properties", "")
                .with_body(Bytes::from(body.clone()));
            c.opaque += 1;
            cmd.opaque = c.opaque;
            if c.s.write_all(&cmd.encode()).is_err() {
                return;
            }
            let Some(r) = c.read_frame() else { return };
            if r.code != rs::SUCCESS {
                return;
            }
            let offset: i64 = r.ext["queueOffset"].parse().unwrap();
            if acked.send((i % 4, offset, body)).is_err() {
                return;
            }
        }
    });
}

#[test]
fn acknowledged_sends_and_delays_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let a = args(dir.path());
    let server = Server::start(&a);
    let broker = server.listening["rocketmq"];
    let mut c = Client::connect(broker);
    let r = c.call(
        Command::request(rq::UPDATE_AND_CREATE_TOPIC, 0)
            .with_ext("topic", "crash_t")
            .with_ext("readQueueNums", 4)
            .with_ext("writeQueueNums", 4),
    );
    assert_eq!(r.code, rs::SUCCESS, "{:?}", r.remark);
    // A delayed message (level 1: 1 s) and a committed offset, acknowledged before the kill.
    let r = send(&mut c, "crash_delay", 0, "late", &[("DELAY", "1")]);
    assert_eq!(r.code, rs::SUCCESS, "{:?}", r.remark);
    let r = c.call(
        Command::request(rq::UPDATE_CONSUMER_OFFSET, 0)
            .with_ext("consumerGroup", "crash_cg")
            .with_ext("topic", "crash_t")
            .with_ext("queueId", 2)
            .with_ext("commitOffset", 0),
    );
    assert_eq!(r.code, rs::SUCCESS, "{:?}", r.remark);

    let (tx, rx) = mpsc::channel();
    send_until_killed(broker, "crash_t".into(), tx);
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.len() < 200 {
        let left = deadline.saturating_duration_since(Instant::now());
        acked.push(rx.recv_timeout(left).expect("sends are acknowledged"));
    }
    server.kill9();
    acked.extend(rx.try_iter());

    let server = Server::start(&a);
    let mut c = Client::connect(server.listening["rocketmq"]);
    for queue in 0..4 {
        let mut stored = std::collections::HashMap::new();
        let mut offset = 0;
        loop {
            let (r, msgs) = pull(&mut c, "crash_t", queue, offset, 0);
            if msgs.is_empty() {
                break;
            }
            for m in msgs {
                stored.insert(
                    m.queue_offset,
                    String::from_utf8_lossy(&m.body).into_owned(),
                );
            }
            offset = r.ext["nextBeginOffset"].parse().unwrap();
        }
        for (q, off, body) in acked.iter().filter(|a| a.0 == queue) {
            assert_eq!(stored.get(off), Some(body), "queue {q} offset {off} lost");
        }
    }
    let r = c.call(
        Command::request(rq::QUERY_CONSUMER_OFFSET, 0)
            .with_ext("consumerGroup", "crash_cg")
            .with_ext("topic", "crash_t")
            .with_ext("queueId", 2),
    );
    assert_eq!(
        (r.code, r.ext.get("offset").map(String::as_str)),
        (rs::SUCCESS, Some("0"))
    );
    // The delayed message arrives after the restart (a long-polled pull waits for it).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, msgs) = pull(&mut c, "crash_delay", 0, 0, 5_000);
        if let Some(m) = msgs.first() {
            assert_eq!(&m.body[..], b"late");
            assert_eq!(
                message::get(&m.properties, "DELAY"),
                None,
                "the delay is consumed"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the delayed message never arrived"
        );
    }
}

fn heartbeat(
    c: &mut Client,
    client_id: &str,
    producer: Option<&str>,
    consumer: Option<(&str, &str)>,
) {
    let producers: Vec<serde_json::Value> = producer
        .map(|g| serde_json::json!({ "groupName": g }))
        .into_iter()
        .collect();
    let consumers: Vec<serde_json::Value> = consumer
        .map(|(g, topic)| {
            serde_json::json!({
                "groupName": g,
                "consumeType": "CONSUME_PASSIVELY",
                "messageModel": "CLUSTERING",
                "consumeFromWhere": "CONSUME_FROM_LAST_OFFSET",
                "subscriptionDataSet": [{ "topic": topic, "subString": "*", "expressionType": "TAG" }],
            })
        })
        .into_iter()
        .collect();
    let body = serde_json::json!({
        "clientID": client_id,
        "producerDataSet": producers,
        "consumerDataSet": consumers,
    });
    let r =
        c.call(Command::request(rq::HEART_BEAT, 0).with_body(serde_json::to_vec(&body).unwrap()));
    assert_eq!(r.code, rs::SUCCESS, "{:?}", r.remark);
}

fn create_topic(c: &mut Client, topic: &str, queues: u32) {
    let r = c.call(
        Command::request(rq::UPDATE_AND_CREATE_TOPIC, 0)
            .with_ext("topic", topic)
            .with_ext("readQueueNums", queues)
            .with_ext("writeQueueNums", queues),
    );
    assert_eq!(r.code, rs::SUCCESS, "{:?}", r.remark);
}

/// Every message body of queue 0 of `topic`, from offset 0.
fn bodies(c: &mut Client, topic: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let (r, msgs) = pull(c, topic, 0, offset, 0);
        if msgs.is_empty() {
            return out;
        }
        out.extend(
            msgs.iter()
                .map(|m| String::from_utf8_lossy(&m.body).into_owned()),
        );
        offset = r.ext["nextBeginOffset"].parse().unwrap();
    }
}

#[test]
fn half_messages_survive_kill_9_and_are_checked_back_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(dir.path());
    a.extend(
        [
            "--rocketmq-transaction-check-interval-ms",
            "300",
            "--rocketmq-transaction-timeout-ms",
            "100",
        ]
        .map(String::from),
    );
    let server = Server::start(&a);
    let mut c = Client::connect(server.listening["rocketmq"]);
    create_topic(&mut c, "txn_t", 1);
    // Three half messages: committed, checked back then committed, rolled back.
    let mut ids = std::collections::HashMap::new();
    for name in ["commit", "checked", "rollback"] {
        let props = message::encode_properties(&[
            ("TRAN_MSG".into(), "true".into()),
            ("PGROUP".into(), "tx_pg".into()),
            ("UNIQ_KEY".into(), format!("U-{name}")),
        ]);
        let r = c.call(
            Command::request(rq::SEND_MESSAGE, 0)
                .with_ext("producerGroup", "tx_pg")
                .with_ext("topic", "txn_t")
                .with_ext("queueId", 0)
                .with_ext("sysFlag", 4)
                .with_ext("bornTimestamp", 1)
                .with_ext("flag", 0)
                .with_ext("properties", props)
                .with_body(Bytes::from(name)),
        );
        assert_eq!(r.code, rs::SUCCESS, "{:?}", r.remark);
        ids.insert(name, r.ext["transactionId"].clone());
    }
    assert!(
        bodies(&mut c, "txn_t").is_empty(),
        "half messages are invisible"
    );
    server.kill9();

    let server = Server::start(&a);
    let mut c = Client::connect(server.listening["rocketmq"]);
    heartbeat(&mut c, "tx_client", Some("tx_pg"), None);
    let end = |id: &str, how: i32, from_check: bool| {
        Command::request(rq::END_TRANSACTION, 0)
            .with_ext("producerGroup", "tx_pg")
            .with_ext("tranStateTableOffset", 0)
            .with_ext("commitLogOffset", 0)
            .with_ext("commitOrRollback", how)
            .with_ext("fromTransactionCheck", from_check)
            .with_ext("transactionId", id)
    };
    assert_eq!(c.call(end(&ids["commit"], 8, false)).code, rs::SUCCESS);
    assert_eq!(c.call(end(&ids["rollback"], 12, false)).code, rs::SUCCESS);
    // The "checked" one is asked about (the check schedule survived the kill); answer commit.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "no check-back for the unresolved half message"
        );
        let Some(req) = c.read_frame() else {
            panic!("connection closed")
        };
        if req.code != rq::CHECK_TRANSACTION_STATE {
            continue;
        }
        let half = message::decode_stored(req.body.clone()).unwrap();
        assert_eq!(half.len(), 1);
        assert_eq!(message::get(&half[0].properties, "PGROUP"), Some("tx_pg"));
        if req.ext["transactionId"] == ids["checked"] {
            assert_eq!(&half[0].body[..], b"checked");
            assert_eq!(req.ext["msgId"], "U-checked");
            let r = c.call(end(&ids["checked"], 8, true));
            assert_eq!(r.code, rs::SUCCESS, "{:?}", r.remark);
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut got = bodies(&mut c, "txn_t");
        got.sort();
        if got == ["checked", "commit"] {
            break;
        }
        assert!(
            !got.contains(&"rollback".to_string()),
            "a rolled-back message: {got:?}"
        );
        assert!(
            Instant::now() < deadline,
            "committed messages missing: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Ending one the other way now is refused; the same way again is fine.
    assert_eq!(
        c.call(end(&ids["commit"], 12, false)).code,
        rs::SYSTEM_ERROR
    );
    assert_eq!(c.call(end(&ids["commit"], 8, false)).code, rs::SUCCESS);
}

#[test]
fn two_gateways_in_front_of_one_core_are_one_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let core = Server::start(&{
        let mut a = vec!["core".to_string()];
        a.extend(free_port_args(&dir.path().join("core")));
        a
    });
    let gateway = |name: &str| {
        let mut a = vec!["gateway".to_string(), "rocketmq".to_string()];
        a.extend(args(&dir.path().join(name)));
        a.extend(["--core".to_string(), format!("http://{}", core.core)]);
        Server::start(&a)
    };
    let (g1, g2) = (gateway("g1"), gateway("g2"));
    let (b1, b2) = (g1.listening["rocketmq"], g2.listening["rocketmq"]);
    // Either NameServer lists both brokers (under one broker name), once both renewed
    // their lease (at start).
    let mut ns = Client::connect(g2.listening["rocketmq-namesrv"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = ns.call(Command::request(rq::GET_BROKER_CLUSTER_INFO, 0));
        let info: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let addrs: Vec<String> = info["brokerAddrTable"]["tributary"]["brokerAddrs"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        if addrs.contains(&b1.to_string()) && addrs.contains(&b2.to_string()) {
            break;
        }
        assert!(Instant::now() < deadline, "brokers listed: {addrs:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A consumer group with a member on each gateway: both gateways list both.
    let (mut c1, mut c2) = (Client::connect(b1), Client::connect(b2));
    create_topic(&mut c1, "two_t", 2);
    heartbeat(&mut c1, "client-1", None, Some(("two_cg", "two_t")));
    heartbeat(&mut c2, "client-2", None, Some(("two_cg", "two_t")));
    for c in [&mut c1, &mut c2] {
        let r = c.call(
            Command::request(rq::GET_CONSUMER_LIST_BY_GROUP, 0).with_ext("consumerGroup", "two_cg"),
        );
        let list: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            list["consumerIdList"],
            serde_json::json!(["client-1", "client-2"])
        );
    }
    // A long-polled pull on one gateway wakes on a send through the other; the offset one
    // commits is the other's.
    let waiting = std::thread::spawn(move || {
        let (_, msgs) = pull(&mut c1, "two_t", 0, 0, 20_000);
        (c1, msgs)
    });
    let r = send(&mut c2, "two_t", 0, "across", &[]);
    assert_eq!(r.code, rs::SUCCESS, "{:?}", r.remark);
    let (mut c1, msgs) = waiting.join().unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(&msgs[0].body[..], b"across");
    let r = c1.call(
        Command::request(rq::UPDATE_CONSUMER_OFFSET, 0)
            .with_ext("consumerGroup", "two_cg")
            .with_ext("topic", "two_t")
            .with_ext("queueId", 0)
            .with_ext("commitOffset", 1),
    );
    assert_eq!(r.code, rs::SUCCESS);
    let r = c2.call(
        Command::request(rq::QUERY_CONSUMER_OFFSET, 0)
            .with_ext("consumerGroup", "two_cg")
            .with_ext("topic", "two_t")
            .with_ext("queueId", 0),
    );
    assert_eq!(r.ext["offset"], "1");
    // A client that leaves one gateway leaves the group on the other too.
    drop(c1);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c2.call(
            Command::request(rq::GET_CONSUMER_LIST_BY_GROUP, 0).with_ext("consumerGroup", "two_cg"),
        );
        let list: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        if list["consumerIdList"] == serde_json::json!(["client-2"]) {
            break;
        }
        assert!(Instant::now() < deadline, "still listed: {list}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn admin_lookups_timers_and_request_reply() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&args(dir.path()));
    let broker = server.listening["rocketmq"];
    let mut c = Client::connect(broker);
    // Topic admin: create, grow, list, refuse to shrink.
    create_topic(&mut c, "adm_t", 2);
    create_topic(&mut c, "adm_t", 4);
    let r = c.call(Command::request(rq::GET_ALL_TOPIC_CONFIG, 0));
    let table: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(table["topicConfigTable"]["adm_t"]["writeQueueNums"], 4);
    let r = c.call(
        Command::request(rq::UPDATE_AND_CREATE_TOPIC, 0)
            .with_ext("topic", "adm_t")
            .with_ext("readQueueNums", 2)
            .with_ext("writeQueueNums", 2),
    );
    assert_eq!(r.code, rs::SYSTEM_ERROR);

    // Lookups: by time, earliest store time, by id, by unique key.
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let r = send(
        &mut c,
        "adm_t",
        1,
        "first",
        &[("UNIQ_KEY", "UK-1"), ("KEYS", "k1 k2")],
    );
    let offset_msg_id = r.ext["msgId"].clone();
    let (_, position) = message::parse_message_id(&offset_msg_id).unwrap();
    let q = |code: i32| {
        Command::request(code, 0)
            .with_ext("topic", "adm_t")
            .with_ext("queueId", 1)
    };
    let r = c.call(q(rq::SEARCH_OFFSET_BY_TIMESTAMP).with_ext("timestamp", before));
    assert_eq!(r.ext["offset"], "0");
    let r = c.call(q(rq::SEARCH_OFFSET_BY_TIMESTAMP).with_ext("timestamp", before + 3_600_000));
    assert_eq!(
        r.ext["offset"], "1",
        "past the last message: the max offset"
    );
    let r = c.call(q(rq::GET_EARLIEST_MSG_STORETIME));
    let stored: i64 = r.ext["timestamp"].parse().unwrap();
    assert!(stored >= before, "{stored} < {before}");
    let r = c.call(Command::request(rq::VIEW_MESSAGE_BY_ID, 0).with_ext("offset", position));
    assert_eq!(r.code, rs::SUCCESS, "{:?}", r.remark);
    assert_eq!(
        &message::decode_stored(r.body).unwrap()[0].body[..],
        b"first"
    );
    for (key, unique) in [("k2", false), ("UK-1", true)] {
        let mut query = Command::request(rq::QUERY_MESSAGE, 0)
            .with_ext("topic", "adm_t")
            .with_ext("key", key)
            .with_ext("maxNum", 32)
            .with_ext("beginTimestamp", 0)
            .with_ext("endTimestamp", i64::MAX);
        if unique {
            query = query.with_ext("_UNIQUE_KEY_QUERY", "true");
        }
        let r = c.call(query);
        assert_eq!(r.code, rs::SUCCESS, "{key}: {:?}", r.remark);
        assert_eq!(message::decode_stored(r.body).unwrap().len(), 1, "{key}");
    }

    // RocketMQ 5's delivery time (TIMER_DELAY_MS) on the core's timers.
    let r = send(&mut c, "adm_t", 0, "timed", &[("TIMER_DELAY_MS", "300")]);
    assert_eq!(r.code, rs::SUCCESS, "{:?}", r.remark);
    assert!(bodies(&mut c, "adm_t").is_empty(), "not before its time");
    let (_, msgs) = pull(&mut c, "adm_t", 0, 0, 10_000);
    assert_eq!(msgs.len(), 1);
    assert_eq!(&msgs[0].body[..], b"timed");

    // Request-reply: a reply is pushed to the requesting client on its connection.
    let mut requester = Client::connect(broker);
    heartbeat(&mut requester, "req-client", Some("req_pg"), None);
    let replier = std::thread::spawn(move || {
        let props = message::encode_properties(&[
            ("REPLY_TO_CLIENT".into(), "req-client".into()),
            ("CORRELATION_ID".into(), "corr-1".into()),
            ("MSG_TYPE".into(), "reply".into()),
        ]);
        c.call(
            Command::request(rq::SEND_REPLY_MESSAGE, 0)
                .with_ext("producerGroup", "rep_pg")
                .with_ext("topic", "DefaultCluster_REPLY_TOPIC")
                .with_ext("queueId", 0)
                .with_ext("sysFlag", 0)
                .with_ext("bornTimestamp", 1)
                .with_ext("flag", 0)
                .with_ext("properties", props)
                .with_body(&b"the answer"[..]),
        )
    });
    let push = loop {
        let f = requester.read_frame().expect("the reply is pushed");
        if f.code == rq::PUSH_REPLY_MESSAGE_TO_CLIENT {
            break f;
        }
    };
    assert_eq!(&push.body[..], b"the answer");
    assert!(push.ext["properties"].contains("corr-1"));
    requester
        .s
        .write_all(&push.response(rs::SUCCESS).encode())
        .unwrap();
    let r = replier.join().unwrap();
    assert_eq!(r.code, rs::SUCCESS, "{:?}", r.remark);

    // Deleting the topic removes its route.
    let mut c = Client::connect(broker);
    let r = c.call(Command::request(rq::DELETE_TOPIC_IN_BROKER, 0).with_ext("topic", "adm_t"));
    assert_eq!(r.code, rs::SUCCESS);
    let mut ns = Client::connect(server.listening["rocketmq-namesrv"]);
    let r = ns.call(Command::request(rq::GET_ROUTEINFO_BY_TOPIC, 0).with_ext("topic", "adm_t"));
    assert_eq!(r.code, rs::TOPIC_NOT_EXIST);
}
