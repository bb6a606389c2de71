//! TLS through the real binary, with certificates made at run time (a CA, server and client
//! certificates): the core gRPC API over TLS with required client certificates (a verified
//! client is served, one without a certificate or with one from another CA is not, and a
//! split gateway reaches such a core), the admin API over HTTPS, a certificate renewed on
//! disk served after SIGHUP and after a file change without a restart (and a broken one
//! refused, the old one kept and the failure counted), a replaced client CA file used after
//! SIGHUP and after a file change, and client certificates required on a
//! protocol listener.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mqtt_raw::{packet, string};
use common::{Server, free_port_args, http_get};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;
use tributary_gateway_common::CoreClient;
use tributary_gateway_common::client::CoreTls;
use tributary_proto::v1::ListNamespacesRequest;

/// A certificate authority that signs server and client certificates.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for localhost and 127.0.0.1 (server or client).
    fn leaf(&self, common_name: &str) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    // Written to a temporary name and renamed: a reader never sees half a file.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `--tls-cert` and `--tls-key` for `leaf`, written into `dir` as NAME.pem and NAME.key.
fn cert_flags(dir: &Path, name: &str, leaf: &Leaf) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        s(&write(dir, &format!("{name}.pem"), &leaf.cert_pem)),
        "--tls-key".into(),
        s(&write(dir, &format!("{name}.key"), &leaf.key_pem)),
    ]
}

/// An MQTT 3.1.1 CONNECT with a clean session.
fn mqtt_connect(client_id: &str) -> Vec<u8> {
    let mut body = string("MQTT");
    body.extend([4, 0x02, 0, 30]);
    body.extend(string(client_id));
    packet(0x10, &body)
}

fn sighup(server: &Server) {
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// Every listener off but the ones `on` names (at 127.0.0.1:0), then `extra` flags.
fn args(mode: &str, dir: &Path, on: &[&str], extra: &[String]) -> Vec<String> {
    // `gateway` is the MQTT gateway alone (`tributary gateway mqtt`).
    let mut a: Vec<String> = match mode {
        "gateway" => vec!["gateway".into(), "mqtt".into()],
        mode => vec![mode.to_string()],
    };
    a.extend(free_port_args(&dir.join("data")));
    for flag in on {
        match a.iter().position(|x| x == flag) {
            Some(i) => a[i + 1] = "127.0.0.1:0".into(),
            None => a.extend([flag.to_string(), "127.0.0.1:0".into()]),
        }
    }
    a.extend(extra.iter().cloned());
    a
}

fn connector(ca_pem: &str, client: Option<&Leaf>) -> TlsConnector {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![leaf.der.clone()],
                rustls_pki_types::PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(config))
}

/// The certificate the server at `addr` presents now.
async fn served_certificate(addr: SocketAddr, ca_pem: &str) -> CertificateDer<'static> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector(ca_pem, None)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// Polls until the server at `addr` presents `want` (a reload is asynchronous), failing
/// after 10 s.
async fn wait_for_certificate(addr: SocketAddr, ca_pem: &str, want: &CertificateDer<'static>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if served_certificate(addr, ca_pem).await == *want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn core_tls(ca: &Ca, client: Option<&Leaf>) -> CoreTls {
    CoreTls {
        ca_pem: Some(ca.pem().into_bytes()),
        identity_pem: client.map(|c| {
            (
                c.cert_pem.clone().into_bytes(),
                c.key_pem.clone().into_bytes(),
            )
        }),
    }
}

#[tokio::test]
async fn the_core_over_tls_serves_verified_clients_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("tributary test CA");
    let server = ca.leaf("core");
    let gateway = ca.leaf("gateway");
    let stranger = Ca::new("another CA").leaf("stranger");
    let cert = write(d, "core.pem", &server.cert_pem);
    let key = write(d, "core.key", &server.key_pem);
    let ca_file = write(d, "ca.pem", &ca.pem());
    let core = Server::start(&args(
        "core",
        d,
        &[],
        &[
            "--core-tls".into(),
            "--tls-cert".into(),
            s(&cert),
            "--tls-key".into(),
            s(&key),
            "--core-tls-client-ca".into(),
            s(&ca_file),
        ],
    ));
    let url = format!("https://127.0.0.1:{}", core.core.port());

    // A client certificate from the CA: served, no token needed.
    let verified =
        CoreClient::connect_lazy_with(&url, None, Some(&core_tls(&ca, Some(&gateway)))).unwrap();
    verified
        .admin
        .clone()
        .list_namespaces(ListNamespacesRequest {})
        .await
        .expect("a verified client is served");

    // No client certificate, one from another CA, or no TLS at all: refused.
    for (what, client) in [
        (
            "no client certificate",
            CoreClient::connect_lazy_with(&url, None, Some(&core_tls(&ca, None))).unwrap(),
        ),
        (
            "a certificate from another CA",
            CoreClient::connect_lazy_with(&url, None, Some(&core_tls(&ca, Some(&stranger))))
                .unwrap(),
        ),
        (
            "plaintext",
            CoreClient::connect_lazy(&format!("http://127.0.0.1:{}", core.core.port())).unwrap(),
        ),
    ] {
        let refused = client
            .admin
            .clone()
            .list_namespaces(ListNamespacesRequest {})
            .await;
        assert!(refused.is_err(), "{what}: served");
    }

    // A split gateway with its certificate reaches the core and serves MQTT.
    let gateway_args = args(
        "gateway",
        d,
        &["--mqtt-listen"],
        &[
            "--core".into(),
            url.clone(),
            "--core-ca".into(),
            s(&ca_file),
            "--core-client-cert".into(),
            s(&write(d, "gw.pem", &gateway.cert_pem)),
            "--core-client-key".into(),
            s(&write(d, "gw.key", &gateway.key_pem)),
        ],
    );
    let gw = Server::start(&gateway_args);
    let mqtt = gw.mqtt.expect("the gateway's MQTT listener");
    let mut conn = tokio::net::TcpStream::connect(mqtt).await.unwrap();
    // CONNECT v3.1.1, clean session, client id "tls-gw": the session lives in the core.
    conn.write_all(&mqtt_connect("tls-gw")).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut connack))
        .await
        .expect("CONNACK within 10 s")
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "accepted through the TLS core");
}

#[tokio::test]
async fn a_core_beyond_loopback_starts_with_client_certificates_and_no_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("tributary test CA");
    let server = ca.leaf("core");
    let mut a = args(
        "core",
        d,
        &[],
        &[
            "--core-tls".into(),
            "--tls-cert".into(),
            s(&write(d, "core.pem", &server.cert_pem)),
            "--tls-key".into(),
            s(&write(d, "core.key", &server.key_pem)),
            "--core-tls-client-ca".into(),
            s(&write(d, "ca.pem", &ca.pem())),
        ],
    );
    let at = a.iter().position(|x| x == "--core-listen").unwrap();
    a[at + 1] = "0.0.0.0:0".into();
    let core = Server::start(&a);
    let url = format!("https://127.0.0.1:{}", core.core.port());
    let anonymous = CoreClient::connect_lazy_with(&url, None, Some(&core_tls(&ca, None))).unwrap();
    assert!(
        anonymous
            .admin
            .clone()
            .list_namespaces(ListNamespacesRequest {})
            .await
            .is_err()
    );
}

#[tokio::test]
async fn the_admin_api_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("tributary test CA");
    let server = ca.leaf("admin");
    let node = Server::start(&args(
        "standalone",
        d,
        &[],
        &[
            "--admin-tls".into(),
            "--tls-cert".into(),
            s(&write(d, "s.pem", &server.cert_pem)),
            "--tls-key".into(),
            s(&write(d, "s.key", &server.key_pem)),
        ],
    ));
    let admin = node.admin.unwrap();
    let tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let mut tls = connector(&ca.pem(), None)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("ok\n"), "{response}");
    // Plain HTTP on the HTTPS port gets no HTTP answer (a TLS alert, then the close).
    let mut plain = tokio::net::TcpStream::connect(admin).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), plain.read_to_end(&mut answer))
        .await
        .expect("closed within 10 s");
    assert!(!answer.starts_with(b"HTTP/"), "plain HTTP served");
}

#[tokio::test]
async fn a_renewed_certificate_is_served_after_sighup_and_after_a_file_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("tributary test CA");
    let first = ca.leaf("first");
    let cert = write(d, "s.pem", &first.cert_pem);
    let key = write(d, "s.key", &first.key_pem);
    let node = Server::start(&args(
        "standalone",
        d,
        &["--mqtt-tls-listen"],
        &[
            "--tls-cert".into(),
            s(&cert),
            "--tls-key".into(),
            s(&key),
            // Files checked every 200 ms for the second half of the test.
            "--tls-reload-interval-ms".into(),
            "200".into(),
        ],
    ));
    let addr = node.listening["mqtt-tls"];
    assert_eq!(served_certificate(addr, &ca.pem()).await, first.der);

    // A key that does not belong to the certificate: refused, the first one stays.
    let second = ca.leaf("second");
    write(d, "s.pem", &second.cert_pem);
    sighup(&node);
    let admin = node.admin.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !http_get(admin, "/metrics").1.lines().any(|l| {
        l.starts_with("tributary_tls_reloads_total{result=\"error\"}") && !l.ends_with(" 0")
    }) {
        assert!(
            Instant::now() < deadline,
            "the failed reload was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served_certificate(addr, &ca.pem()).await, first.der);

    // The matching key: SIGHUP serves the second certificate.
    write(d, "s.key", &second.key_pem);
    sighup(&node);
    wait_for_certificate(addr, &ca.pem(), &second.der).await;

    // A third pair written to the files: picked up without a signal.
    let third = ca.leaf("third");
    write(d, "s.key", &third.key_pem);
    write(d, "s.pem", &third.cert_pem);
    wait_for_certificate(addr, &ca.pem(), &third.der).await;
    let metrics = http_get(admin, "/metrics").1;
    assert!(
        metrics.lines().any(
            |l| l.starts_with("tributary_tls_reloads_total{result=\"ok\"}") && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_protocol_listener_can_require_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("tributary test CA");
    let server = ca.leaf("server");
    let client = ca.leaf("client");
    let node = Server::start(&args(
        "standalone",
        d,
        &["--mqtt-tls-listen"],
        &[
            cert_flags(d, "s", &server),
            vec![
                "--tls-client-ca".into(),
                s(&write(d, "ca.pem", &ca.pem())),
                "--tls-client-auth".into(),
                "required".into(),
            ],
        ]
        .concat(),
    ));
    let addr = node.listening["mqtt-tls"];
    let connect = mqtt_connect("mtls");

    // With a certificate from the CA: CONNACK.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector(&ca.pem(), Some(&client))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);

    // Without one: the server ends the handshake (under TLS 1.3 the client may see it only
    // at its first read), and no CONNACK comes.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let refused = async {
        let mut tls = connector(&ca.pem(), None)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        tls.write_all(&connect).await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), refused)
        .await
        .expect("an answer within 10 s");
    assert!(
        outcome.is_err(),
        "served without a client certificate: {outcome:?}"
    );
}

/// An MQTT CONNECT over TLS with `client`'s certificate; whether a CONNACK came back.
async fn mqtt_tls_accepted(addr: SocketAddr, ca_pem: &str, client: &Leaf) -> bool {
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let mut tls = connector(ca_pem, Some(client))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await?;
        tls.write_all(&mqtt_connect("ca-reload")).await?;
        let mut connack = [0u8; 4];
        tls.read_exact(&mut connack).await?;
        Ok::<_, std::io::Error>(connack)
    };
    let outcome = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .expect("an answer within 10 s");
    matches!(outcome, Ok([0x20, 2, 0, 0]))
}

/// Polls (bounded) until `client` is served.
async fn until_accepted(addr: SocketAddr, ca_pem: &str, client: &Leaf, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !mqtt_tls_accepted(addr, ca_pem, client).await {
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_replaced_client_ca_is_used_after_sighup_and_after_a_file_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server_ca = Ca::new("server CA");
    let old_ca = Ca::new("old client CA");
    let new_ca = Ca::new("new client CA");
    let (old_client, new_client) = (old_ca.leaf("old"), new_ca.leaf("new"));
    let ca_pem = server_ca.pem();
    let start = |name: &str, interval_ms: &str| {
        let sub = d.join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let ca_file = write(&sub, "clients.pem", &old_ca.pem());
        let node = Server::start(&args(
            "standalone",
            &sub,
            &["--mqtt-tls-listen"],
            &[
                cert_flags(&sub, "s", &server_ca.leaf("server")),
                vec![
                    "--tls-client-ca".into(),
                    s(&ca_file),
                    "--tls-client-auth".into(),
                    "required".into(),
                    "--tls-reload-interval-ms".into(),
                    interval_ms.into(),
                ],
            ]
            .concat(),
        ));
        (node, sub)
    };

    // SIGHUP only (no periodic check): the file replaced changes nothing until the signal.
    let (node, sub) = start("sighup", "0");
    let addr = node.listening["mqtt-tls"];
    assert!(mqtt_tls_accepted(addr, &ca_pem, &old_client).await);
    assert!(!mqtt_tls_accepted(addr, &ca_pem, &new_client).await);
    write(&sub, "clients.pem", &new_ca.pem());
    assert!(
        !mqtt_tls_accepted(addr, &ca_pem, &new_client).await,
        "read again without SIGHUP"
    );
    sighup(&node);
    until_accepted(addr, &ca_pem, &new_client, "the new client CA after SIGHUP").await;
    assert!(!mqtt_tls_accepted(addr, &ca_pem, &old_client).await);

    // The periodic check: a replaced file is picked up without a signal or a restart.
    let (node, sub) = start("file-change", "100");
    let addr = node.listening["mqtt-tls"];
    assert!(!mqtt_tls_accepted(addr, &ca_pem, &new_client).await);
    write(
        &sub,
        "clients.pem",
        &format!("{}{}", old_ca.pem(), new_ca.pem()),
    );
    until_accepted(
        addr,
        &ca_pem,
        &new_client,
        "the new client CA after a file change",
    )
    .await;
    assert!(mqtt_tls_accepted(addr, &ca_pem, &old_client).await);
}
