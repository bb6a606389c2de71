//! The accept loop on loopback sockets. Each test runs on a current-thread runtime (the
//! `#[tokio::test]` default), which the checks below rely on twice: the metrics recorder is
//! the thread's, and a connection task does everything up to its end (answering the gateway,
//! giving back its slot, updating the metrics) in one poll, before the test task runs again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::rustls;

use crate::handshake::{Handshake, Plain};
use crate::listener::Listener;
use crate::tls::TlsAcceptor;
use crate::{Accepted, Gateway, serve};

/// Bounds every wait, so that a broken loop fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(5);

/// Counters and gauges by name and labels, as `name{key=value,...}`.
#[derive(Default)]
struct Recorded(Mutex<HashMap<String, Arc<AtomicU64>>>);

impl Recorded {
    fn slot(&self, key: &Key) -> Arc<AtomicU64> {
        let labels: Vec<_> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        self.0.lock().unwrap().entry(name).or_default().clone()
    }

    fn value(&self, name: &str) -> u64 {
        let all = self.0.lock().unwrap();
        all.get(name).map_or(0, |v| v.load(Ordering::SeqCst))
    }

    fn counter(&self, name: &str) -> u64 {
        self.value(name)
    }

    /// Gauges keep an f64's bits (metrics' own `GaugeFn for AtomicU64`).
    fn gauge(&self, name: &str) -> f64 {
        f64::from_bits(self.value(name))
    }
}

impl Recorder for Recorded {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.slot(key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.slot(key))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Served(SocketAddr),
    Ended(SocketAddr),
}

/// A gateway that reports each connection it is given, holds it until the client closes or
/// (unless deaf) the gateway stops, and reports that too.
struct Hold {
    events: mpsc::UnboundedSender<Event>,
    deaf: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Gateway<S> for Hold {
    async fn serve_connection(
        self: Arc<Self>,
        mut conn: Accepted<S>,
        mut stop: watch::Receiver<bool>,
    ) {
        let _ = self.events.send(Event::Served(conn.peer));
        let mut byte = [0u8; 1];
        tokio::select! {
            _ = conn.stream.read(&mut byte) => {}
            _ = stop.wait_for(|s| *s), if !self.deaf => {}
            () = conn.connection.close_requested(), if !self.deaf => {}
        }
        let _ = self.events.send(Event::Ended(conn.peer));
    }
}

/// One listener served by [`Hold`].
struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    served: JoinHandle<()>,
    events: mpsc::UnboundedReceiver<Event>,
}

async fn loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").await.unwrap()
}

fn start<H: Handshake>(listener: Listener<H>) -> Running
where
    Hold: Gateway<H::Stream>,
{
    start_with(listener, false)
}

fn start_with<H: Handshake>(listener: Listener<H>, deaf: bool) -> Running
where
    Hold: Gateway<H::Stream>,
{
    let addr = listener.socket.local_addr().unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let (events, events_rx) = mpsc::unbounded_channel();
    let gateway = Arc::new(Hold { events, deaf });
    let served = tokio::spawn(serve(listener, gateway, stop_rx));
    Running {
        addr,
        stop,
        served,
        events: events_rx,
    }
}

impl Running {
    async fn next(&mut self) -> Event {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("the gateway reports within the bound")
            .expect("the gateway is still there")
    }

    /// Stops the loop and waits (bounded) for `serve` to return.
    async fn stop(self) -> mpsc::UnboundedReceiver<Event> {
        self.stop.send_replace(true);
        tokio::time::timeout(WAIT, self.served)
            .await
            .expect("serve returns once its connections ended")
            .unwrap();
        self.events
    }
}

/// Waits (bounded) until the server closes `client`.
async fn closed_by_server(client: &mut TcpStream) {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(WAIT, client.read(&mut buf)).await {
            Err(_) => panic!("the server did not close the connection"),
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Polls `done` (bounded) for a state that nothing reports, such as a socket accepted but
/// still in its handshake.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {WAIT:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A TLS acceptor with no certificate: enough for handshakes that never get as far as one.
fn acceptor_without_certificate() -> TlsAcceptor {
    #[derive(Debug)]
    struct NoCertificate;
    impl rustls::server::ResolvesServerCert for NoCertificate {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            None
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NoCertificate));
    TlsAcceptor::from(Arc::new(config))
}

#[tokio::test]
async fn serves_and_counts_each_connection_then_stops() {
    let recorded = Recorded::default();
    let _recording = metrics::set_default_local_recorder(&recorded);
    let mut running = start(Listener::new(loopback().await, "t-serve", Plain));
    let addr = running.addr;
    let mut a = TcpStream::connect(addr).await.unwrap();
    let b = TcpStream::connect(addr).await.unwrap();
    let mut served = vec![running.next().await, running.next().await];
    served.sort_by_key(|e| format!("{e:?}"));
    let mut expected = vec![
        Event::Served(a.local_addr().unwrap()),
        Event::Served(b.local_addr().unwrap()),
    ];
    expected.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(served, expected, "each connection with its peer address");
    assert_eq!(
        recorded.gauge("tributary_connections{listener=t-serve}"),
        2.0
    );
    assert_eq!(
        recorded.counter("tributary_connections_accepted_total{listener=t-serve}"),
        2
    );

    // A client that leaves is no longer counted.
    drop(b);
    assert!(matches!(running.next().await, Event::Ended(_)));
    assert_eq!(
        recorded.gauge("tributary_connections{listener=t-serve}"),
        1.0
    );

    // Stopping tells the open connection, waits for it and closes the listening socket.
    let mut events = running.stop().await;
    assert_eq!(
        events.try_recv().unwrap(),
        Event::Ended(a.local_addr().unwrap())
    );
    closed_by_server(&mut a).await;
    assert_eq!(
        recorded.gauge("tributary_connections{listener=t-serve}"),
        0.0
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "nothing listens after the stop"
    );
}

#[tokio::test]
async fn stop_closes_a_connection_that_ignores_it_after_the_drain_timeout() {
    let recorded = Recorded::default();
    let _recording = metrics::set_default_local_recorder(&recorded);
    let drain = Duration::from_millis(200);
    let mut listener = Listener::new(loopback().await, "t-drain", Plain);
    listener.drain_timeout = drain;
    let mut running = start_with(listener, true);
    let mut client = TcpStream::connect(running.addr).await.unwrap();
    assert_eq!(
        running.next().await,
        Event::Served(client.local_addr().unwrap())
    );
    let stopping = Instant::now();
    let mut events = running.stop().await;
    assert!(
        stopping.elapsed() >= drain,
        "closed before the drain timeout"
    );
    closed_by_server(&mut client).await;
    assert!(events.try_recv().is_err(), "the gateway was cut short");
    assert_eq!(
        recorded.gauge("tributary_connections{listener=t-drain}"),
        0.0
    );
}

#[tokio::test]
async fn refuses_connections_beyond_the_limit_until_one_ends() {
    let recorded = Recorded::default();
    let _recording = metrics::set_default_local_recorder(&recorded);
    let mut listener = Listener::new(loopback().await, "t-limit", Plain);
    listener.max_connections = NonZeroUsize::new(1);
    let mut running = start(listener);

    let first = TcpStream::connect(running.addr).await.unwrap();
    let first_addr = first.local_addr().unwrap();
    assert_eq!(running.next().await, Event::Served(first_addr));
    let mut second = TcpStream::connect(running.addr).await.unwrap();
    closed_by_server(&mut second).await;
    assert_eq!(
        recorded.counter("tributary_connections_dropped_total{listener=t-limit,reason=limit}"),
        1
    );
    assert_eq!(
        recorded.counter("tributary_connections_accepted_total{listener=t-limit}"),
        1,
        "a refused connection is not counted as accepted"
    );

    // The place comes back when the first connection ends.
    drop(first);
    assert_eq!(running.next().await, Event::Ended(first_addr));
    let third = TcpStream::connect(running.addr).await.unwrap();
    assert_eq!(
        running.next().await,
        Event::Served(third.local_addr().unwrap())
    );
    running.stop().await;
}

#[tokio::test]
async fn drops_a_stalled_tls_handshake_after_its_timeout() {
    let recorded = Recorded::default();
    let _recording = metrics::set_default_local_recorder(&recorded);
    let timeout = Duration::from_millis(200);
    let mut listener = Listener::new(loopback().await, "t-tls", acceptor_without_certificate());
    listener.handshake_timeout = timeout;
    let running = start(listener);

    let started = Instant::now();
    let mut silent = TcpStream::connect(running.addr).await.unwrap();
    closed_by_server(&mut silent).await;
    assert!(
        started.elapsed() >= timeout,
        "closed after {:?}, before the timeout",
        started.elapsed()
    );
    assert_eq!(
        recorded.counter(
            "tributary_connections_dropped_total{listener=t-tls,reason=handshake_timeout}"
        ),
        1
    );
    // Counted while it held a socket, and no longer.
    assert_eq!(
        recorded.counter("tributary_connections_accepted_total{listener=t-tls}"),
        1
    );
    assert_eq!(recorded.gauge("tributary_connections{listener=t-tls}"), 0.0);

    // Bytes that are not TLS fail the handshake at once, counted apart.
    let mut plaintext = TcpStream::connect(running.addr).await.unwrap();
    plaintext
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    closed_by_server(&mut plaintext).await;
    assert_eq!(
        recorded
            .counter("tributary_connections_dropped_total{listener=t-tls,reason=handshake_failed}"),
        1
    );

    let mut events = running.stop().await;
    assert!(events.try_recv().is_err(), "the gateway saw no connection");
}

#[tokio::test]
async fn stop_does_not_wait_for_a_handshake_in_progress() {
    let recorded = Recorded::default();
    let _recording = metrics::set_default_local_recorder(&recorded);
    let mut listener = Listener::new(
        loopback().await,
        "t-tls-stop",
        acceptor_without_certificate(),
    );
    // Neither bound may be what ends it: `stop` waits less than either.
    listener.drain_timeout = 2 * WAIT;
    assert!(listener.handshake_timeout > WAIT);
    let running = start(listener);
    let mut silent = TcpStream::connect(running.addr).await.unwrap();
    until("the connection is accepted", || {
        recorded.gauge("tributary_connections{listener=t-tls-stop}") == 1.0
    })
    .await;
    running.stop().await;
    closed_by_server(&mut silent).await;
    assert_eq!(
        recorded.gauge("tributary_connections{listener=t-tls-stop}"),
        0.0
    );
}

#[tokio::test]
async fn lists_each_connection_and_closes_it_on_request() {
    let listener = Listener::new(loopback().await, "t-close", Plain);
    let registry = listener.connections.clone();
    let mut running = start(listener);
    let client = TcpStream::connect(running.addr).await.unwrap();
    let me = client.local_addr().unwrap();
    assert_eq!(running.next().await, Event::Served(me));
    let listed = registry.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].peer,
            listed[0].local,
            listed[0].listener,
            listed[0].tls
        ),
        (me, running.addr, "t-close", false)
    );
    let closing = registry.close(listed[0].id, "test").unwrap();
    // The gateway sees the close and ends the connection itself.
    assert_eq!(running.next().await, Event::Ended(me));
    assert!(closing.ended(WAIT).await);
    assert!(registry.list().is_empty());
    running.stop().await;
}

#[tokio::test]
async fn cuts_a_closed_connection_its_gateway_does_not_end_after_the_drain_timeout() {
    let drain = Duration::from_millis(200);
    let mut listener = Listener::new(loopback().await, "t-cut", Plain);
    listener.drain_timeout = drain;
    let registry = listener.connections.clone();
    let mut running = start_with(listener, true);
    let mut client = TcpStream::connect(running.addr).await.unwrap();
    assert_eq!(
        running.next().await,
        Event::Served(client.local_addr().unwrap())
    );
    let id = registry.list()[0].id;
    let asked = Instant::now();
    let closing = registry.close(id, "test").unwrap();
    assert!(closing.ended(WAIT).await, "cut within the bound");
    assert!(asked.elapsed() >= drain, "cut before the drain timeout");
    closed_by_server(&mut client).await;
    assert!(registry.list().is_empty());
    let mut events = running.stop().await;
    assert!(events.try_recv().is_err(), "the gateway was cut short");
}
