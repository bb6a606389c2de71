//! Starting the real `tributary` binary as a child process on free ports.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tributary_gateway_common::CoreClient;

pub mod mqtt_raw;
pub mod queue_api;

pub const BIN: &str = env!("CARGO_BIN_EXE_tributary");

/// Flags that put every listener on a free loopback port.
pub fn free_port_args(data_dir: &Path) -> Vec<String> {
    let mut args = vec!["--data-dir".to_string(), data_dir.display().to_string()];
    for flag in ["--core-listen", "--admin-listen"] {
        args.extend([flag.to_string(), "127.0.0.1:0".into()]);
    }
    for flag in [
        "--kafka-listen",
        "--mqtt-listen",
        "--mqtt-ws-listen",
        "--mqtt-tls-listen",
        "--mqtt-wss-listen",
        "--kafka-tls-listen",
        "--amqp-tls-listen",
        "--amqp-listen",
        "--sqs-listen",
        "--rocketmq-listen",
        "--namesrv-listen",
    ] {
        args.extend([flag.to_string(), "off".into()]);
    }
    args
}

pub struct Server {
    pub child: Child,
    /// The core listener; 0.0.0.0:0 for a gateway process, which has none.
    pub core: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub kafka: Option<SocketAddr>,
    pub mqtt: Option<SocketAddr>,
    /// Every `listening NAME ADDR` line, by NAME (amqp, kafka-tls, ...).
    pub listening: std::collections::HashMap<String, SocketAddr>,
}

impl Server {
    /// Starts the binary and waits (bounded) for its `ready` line.
    pub fn start(args: &[String]) -> Server {
        let mut child = Command::new(BIN)
            .args(args)
            .env("TRIBUTARY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tributary");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut core, mut admin, mut kafka, mut mqtt) = (None, None, None, None);
        let mut listening = std::collections::HashMap::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "tributary did not print 'ready' (status {:?})",
                        child.wait().ok()
                    );
                }
            };
            if let Some((name, addr)) = line
                .strip_prefix("listening ")
                .and_then(|rest| rest.split_once(' '))
                && let Ok(addr) = addr.parse()
            {
                listening.insert(name.to_string(), addr);
            }
            if let Some(a) = line.strip_prefix("listening core ") {
                core = Some(a.parse().unwrap());
            } else if let Some(a) = line.strip_prefix("listening admin ") {
                admin = Some(a.parse().unwrap());
            } else if let Some(a) = line.strip_prefix("listening kafka ") {
                kafka = Some(a.parse().unwrap());
            } else if let Some(a) = line.strip_prefix("listening mqtt ") {
                mqtt = Some(a.parse().unwrap());
            } else if line == "ready" {
                break;
            }
        }
        Server {
            child,
            core: core.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
            admin,
            kafka,
            mqtt,
            listening,
        }
    }

    pub fn client(&self) -> CoreClient {
        CoreClient::connect_lazy(&format!("http://{}", self.core)).unwrap()
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    /// Sends a signal by name and waits for the exit, failing after `limit`.
    pub fn signal_and_wait(mut self, signal: &str, limit: Duration) -> ExitStatus {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("tributary did not exit within {limit:?} of SIG{signal}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion, expecting it to fail; returns (exit code, stderr).
/// Runs the CLI against the core at `core` (comma-separated for several nodes).
pub fn cli(core: &str, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .args(["--core", core])
        .env("TRIBUTARY_LOG", "warn")
        .output()
        .unwrap()
}

/// [`cli`] with `stdin` written to its standard input (a password, say).
pub fn cli_stdin(core: &str, args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .args(args)
        .args(["--core", core])
        .env("TRIBUTARY_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

pub fn run_expect_failure(args: &[String]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("TRIBUTARY_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A plain HTTP/1.0 GET, enough for the admin API. Returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get_with(addr, path, &[])
}

/// One HTTP/1.0 request with a body (the admin API's writes); answers status and body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A GET with extra headers over HTTP/1.0. Returns (status, body).
pub fn http_get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    http_request(addr, "GET", path, headers, "")
}

/// The value of one series (`name{labels}`) in the admin listener's `/metrics`.
pub fn metric(admin: SocketAddr, series: &str) -> Option<f64> {
    let (_, body) = http_get(admin, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// Polls `/metrics` until `series` reads `want`, failing after 10 s. Blocking: from async
/// tests, call it in `spawn_blocking`.
pub fn wait_metric(admin: SocketAddr, series: &str, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = metric(admin, series);
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} = {got:?}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sizes of the files under `dir` (recursively) whose extension is `ext`.
pub fn file_sizes_with_extension(dir: &Path, ext: &str) -> Vec<u64> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut sizes = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            sizes.extend(file_sizes_with_extension(&path, ext));
        } else if path.extension().is_some_and(|x| x == ext) {
            sizes.push(e.metadata().map_or(0, |m| m.len()));
        }
    }
    sizes
}
