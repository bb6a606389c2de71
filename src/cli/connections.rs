//! `tributary connections list|close ID`: the client connections of a running process.
//!
//! Connections live where the gateways run, not in the core, so this asks a process's admin
//! HTTP API (`--admin URL`: the standalone server's, or a gateway process's own admin
//! listener in split mode) rather than the core gRPC API the other commands use. Writes
//! (close) send the core token, as the admin API always wants for them.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::table::Table;
use super::{CliError, ConnectionsCommand, Output};
use crate::config::Settings;

/// Bounds one admin API request: a close waits up to 5 s for the connection to end.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(settings: &Settings, command: ConnectionsCommand) -> Result<Output, CliError> {
    let token = settings.core_token.as_ref().map(|t| t.expose().to_string());
    match command {
        ConnectionsCommand::List(api) => {
            let body = request(&api.admin, "GET", "/api/v1/connections", token.as_deref()).await?;
            let mut table = Table::new(&[
                "ID",
                "LISTENER",
                "PEER",
                "TLS",
                "USER",
                "CLIENT",
                "NAMESPACE",
                "CONNECTED AT MS",
            ]);
            let empty = Vec::new();
            for c in body["connections"].as_array().unwrap_or(&empty) {
                let text = |k: &str| match &c[k] {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    v => v.to_string(),
                };
                table.row(vec![
                    text("id"),
                    text("listener"),
                    text("peer"),
                    if c["tls"] == true { "yes" } else { "no" }.into(),
                    text("user"),
                    text("client_id"),
                    text("namespace"),
                    text("connected_at_ms"),
                ]);
            }
            Ok(Output { table, json: body })
        }
        ConnectionsCommand::Close { id, api } => {
            let path = format!("/api/v1/connections/{id}/close");
            let body = request(&api.admin, "POST", &path, token.as_deref()).await?;
            let line = if body["ended"] == true {
                format!("closed connection {id}")
            } else {
                format!("asked connection {id} to close; it had not ended when the server answered")
            };
            Ok(Output {
                table: Table::line(line),
                json: body,
            })
        }
    }
}

/// One request to the admin API over HTTP/1.0 (the server closes the connection after its
/// answer, so the body is what is read until then); answers the JSON body of a 2xx.
async fn request(
    admin: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<Value, CliError> {
    let Some(rest) = admin.strip_prefix("http://") else {
        return Err(CliError::Usage(format!(
            "--admin {admin}: give http://HOST:PORT (the CLI does not speak HTTPS to the admin API yet)"
        )));
    };
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(CliError::Usage(format!(
            "--admin {admin}: give http://HOST:PORT"
        )));
    }
    let unreachable = |message: String| CliError::AdminUnreachable {
        admin: admin.to_string(),
        message,
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {host}\r\nAccept: application/json\r\nContent-Length: 0\r\n"
        );
        if let Some(token) = token {
            req.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        req.push_str("\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok::<_, CliError>(answer)
    };
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer within {REQUEST_TIMEOUT:?}")))??;
    let (status, body) = parse(&answer).ok_or_else(|| {
        unreachable("the answer is not HTTP: is --admin the admin listener?".into())
    })?;
    let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let message = || {
        json["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
    };
    match status {
        200..=299 => Ok(json),
        401 => Err(CliError::Unauthenticated(message())),
        _ => Err(CliError::Refused(format!(
            "{}: {}",
            json["error"].as_str().unwrap_or("HTTP"),
            message()
        ))),
    }
}

/// The status code and body of an HTTP/1.x answer.
fn parse(answer: &[u8]) -> Option<(u16, &[u8])> {
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&answer[..end]).ok()?;
    let status = head
        .lines()
        .next()?
        .strip_prefix("HTTP/1.")?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()?;
    Some((status, &answer[end + 4..]))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_status_and_body() {
        let answer =
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n\r\n{\"error\":\"X\"}";
        assert_eq!(parse(answer), Some((404, &b"{\"error\":\"X\"}"[..])));
        assert_eq!(parse(b"SSH-2.0-OpenSSH\r\n"), None);
    }
}
