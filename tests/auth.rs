//! The shared core token, through the real binary: the core's gRPC API refuses calls without
//! it, a split gateway sends it, the core will not listen beyond loopback without one, and
//! the admin API bound beyond loopback wants it for everything but the health check and the
//! console's files, and its writes want it everywhere.

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::mqtt_raw::{packet, read_exact, string};
use common::{Server, free_port_args, http_get_with, http_request, run_expect_failure};
use tributary_gateway_common::{CoreClient, error_code};
use tributary_proto::v1::{ErrorCode, ListNamespacesRequest};

const TOKEN: &str = "test-token-0123456789abcdef";

/// `mode` with every listener on a free loopback port or off, then `extra` flags (a flag
/// already there gets the new value).
fn args(mode: &str, dir: &tempfile::TempDir, extra: &[&str]) -> Vec<String> {
    let mut a = vec![mode.to_string()];
    a.extend(free_port_args(&dir.path().join("data")));
    let mut extra = extra.iter().map(|s| s.to_string()).peekable();
    while let Some(flag) = extra.next() {
        let value = extra.next_if(|v| !v.starts_with("--"));
        match (a.iter().position(|x| *x == flag), value) {
            (Some(i), Some(v)) => a[i + 1] = v,
            (_, v) => a.extend(std::iter::once(flag).chain(v)),
        }
    }
    a
}

/// A core (split mode) on loopback that requires [`TOKEN`].
fn core_with_token() -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&args("core", &dir, &["--core-token", TOKEN]));
    (dir, server)
}

fn client(core: SocketAddr, token: Option<&str>) -> CoreClient {
    CoreClient::connect_lazy_with_token(&format!("http://{core}"), token).unwrap()
}

#[tokio::test]
async fn a_core_with_a_token_refuses_calls_without_it_and_serves_calls_with_it() {
    let (_dir, core) = core_with_token();
    for token in [None, Some("not-the-token-0123456789")] {
        let status = client(core.core, token)
            .admin
            .list_namespaces(ListNamespacesRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        assert_eq!(error_code(&status), ErrorCode::Unauthenticated);
    }
    let ok = client(core.core, Some(TOKEN))
        .admin
        .list_namespaces(ListNamespacesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(ok.namespaces.iter().any(|n| n.name == "default"));

    // Refusals are counted by reason; the admin API on loopback needs no token.
    let (status, metrics) = http_get_with(core.admin.unwrap(), "/metrics", &[]);
    assert_eq!(status, 200);
    for reason in ["missing_token", "wrong_token"] {
        let line =
            format!("tributary_auth_refusals_total{{listener=\"core\",reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&line), "no {line} in:\n{metrics}");
    }
}

// --- MQTT 3.1.1 on a raw socket, enough for one round trip ---

#[test]
fn a_split_gateway_with_the_token_serves_a_round_trip_and_one_without_it_stops() {
    let (_dir, core) = core_with_token();
    let url = format!("http://{}", core.core);
    let gateway = Server::start(&[
        "gateway".into(),
        "mqtt".into(),
        "--core".into(),
        url.clone(),
        "--core-token".into(),
        TOKEN.into(),
        "--mqtt-listen".into(),
        "127.0.0.1:0".into(),
        "--mqtt-ws-listen".into(),
        "off".into(),
    ]);
    let mut s = TcpStream::connect(gateway.mqtt.unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut connect = string("MQTT");
    connect.extend([4, 0x02, 0, 60]);
    connect.extend(string("auth-round-trip"));
    s.write_all(&packet(0x10, &connect)).unwrap();
    assert_eq!(read_exact(&mut s, 4), [0x20, 2, 0, 0], "CONNACK accepted");
    let mut subscribe = vec![0, 1];
    subscribe.extend(string("auth/t"));
    subscribe.push(0);
    s.write_all(&packet(0x82, &subscribe)).unwrap();
    assert_eq!(read_exact(&mut s, 5), [0x90, 3, 0, 1, 0], "SUBACK QoS 0");
    let mut publish = string("auth/t");
    publish.extend_from_slice(b"hello");
    s.write_all(&packet(0x30, &publish)).unwrap();
    assert_eq!(
        read_exact(&mut s, 2 + publish.len()),
        packet(0x30, &publish),
        "the message came back through the core"
    );
    drop(s);
    drop(gateway);

    for token in [None, Some("not-the-token-0123456789")] {
        let mut a: Vec<String> = vec![
            "gateway".into(),
            "mqtt".into(),
            "--core".into(),
            url.clone(),
            "--mqtt-listen".into(),
            "127.0.0.1:0".into(),
            "--mqtt-ws-listen".into(),
            "off".into(),
        ];
        if let Some(t) = token {
            a.extend(["--core-token".into(), t.into()]);
        }
        let (_, stderr) = run_expect_failure(&a);
        let line = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line in:\n{stderr}"));
        assert!(
            line.contains("refused this gateway (UNAUTHENTICATED") && line.contains(&url),
            "{line}"
        );
        if token.is_none() {
            assert!(line.contains("core_token"), "{line}");
        }
    }
}

#[test]
fn the_core_will_not_listen_beyond_loopback_without_a_token_unless_told_to() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = run_expect_failure(&args("core", &dir, &["--core-listen", "0.0.0.0:0"]));
    assert_ne!(code, 0);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("error: the core gRPC API (core_listen = 0.0.0.0:0)")
            && stderr.contains("set core_token")
            && stderr.contains("--core-insecure"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "refused before touching data"
    );

    // Accepting the risk explicitly starts it (with a warning).
    let server = Server::start(&args(
        "core",
        &dir,
        &["--core-listen", "0.0.0.0:0", "--core-insecure"],
    ));
    assert!(server.core.ip().is_unspecified());
}

#[test]
fn the_admin_api_beyond_loopback_wants_the_token_except_for_health_and_console_files() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&args(
        "core",
        &dir,
        &["--admin-listen", "0.0.0.0:0", "--core-token", TOKEN],
    ));
    // Beyond loopback is about the bind address: reached through 127.0.0.1, still guarded.
    let admin = SocketAddr::from(([127, 0, 0, 1], server.admin.unwrap().port()));
    let bearer = format!("Bearer {TOKEN}");
    let (status, body) = http_get_with(admin, "/healthz", &[]);
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // The console's files hold no data: served without the token (the console then asks
    // for it when the API answers 401).
    for path in ["/", "/console/app.js", "/favicon.ico"] {
        assert_eq!(http_get_with(admin, path, &[]).0, 200, "{path}");
    }
    for path in [
        "/metrics",
        "/api/v1/streams",
        "/api/v1/namespaces",
        "/api/v1/queues",
        "/nope",
    ] {
        let (status, body) = http_get_with(admin, path, &[]);
        assert_eq!(status, 401, "{path}: {body}");
        assert!(body.contains("UNAUTHENTICATED"), "{body}");
        let (status, _) = http_get_with(
            admin,
            path,
            &[("Authorization", "Bearer wrong-token-0123456789")],
        );
        assert_eq!(status, 401, "{path}");
    }
    let (status, body) = http_get_with(admin, "/api/v1/namespaces", &[("Authorization", &bearer)]);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("default"), "{body}");
    // A write: refused without the token, let through (to a 404 here) with it.
    let purge = "/api/v1/queues/default/nope/purge";
    assert_eq!(http_request(admin, "POST", purge, &[], "").0, 401);
    let (status, body) = http_request(admin, "POST", purge, &[("Authorization", &bearer)], "");
    assert_eq!(status, 404, "{body}");
    let (status, metrics) = http_get_with(admin, "/metrics", &[("Authorization", &bearer)]);
    assert_eq!(status, 200);
    for (reason, n) in [("missing_token", 6), ("wrong_token", 5)] {
        let line =
            format!("tributary_auth_refusals_total{{listener=\"admin\",reason=\"{reason}\"}} {n}");
        assert!(metrics.contains(&line), "no {line} in:\n{metrics}");
    }
}
