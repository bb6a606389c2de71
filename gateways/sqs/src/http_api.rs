//! One HTTP request in, one answer out: which wire protocol it speaks, whether its
//! signature holds, which action it asks for, and the answer (or error) in that protocol's
//! form.

use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::Value;
use tracing::{info, warn};

use crate::Credential;
use crate::actions::{ACTIONS, Call, Service};
use crate::error::SqsError;
use crate::params::Params;
use crate::render;
use crate::sigv4::{self, SignedRequest};
use tributary_gateway_common::Traffic;

/// Largest request body: ten messages of 1 MiB cannot be sent in one batch anyway (SQS
/// caps a batch at 1 MiB), but their encoding (base64 binary attributes, form escapes)
/// takes more than the payload.
const MAX_BODY: usize = 4 << 20;
const JSON_TYPE: &str = "application/x-amz-json-1.0";
const TARGET_PREFIX: &str = "AmazonSQS.";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Json,
    Query,
}

pub struct Api {
    service: Service,
    credentials: Vec<Credential>,
}

impl Api {
    pub fn new(service: Service, credentials: Vec<Credential>) -> Self {
        Self {
            service,
            credentials,
        }
    }

    pub async fn handle(&self, req: Request<Incoming>, traffic: &Traffic) -> Response<Full<Bytes>> {
        let rid = crate::actions::random_uuid();
        let (parts, body) = req.into_parts();
        let protocol = if parts.headers.contains_key("x-amz-target") {
            Protocol::Json
        } else {
            Protocol::Query
        };
        let body = match Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let err = if e.is::<http_body_util::LengthLimitError>() {
                    SqsError::request_too_large(format!(
                        "The request body is larger than {MAX_BODY} bytes."
                    ))
                } else {
                    // The client went away mid-body: nobody reads this answer.
                    SqsError::serialization("The request body could not be read.")
                };
                return self.error(protocol, &err, &rid);
            }
        };
        let (action, outcome) = self.run(protocol, &parts, &body, traffic).await;
        let label = ACTIONS
            .iter()
            .find(|a| **a == action)
            .copied()
            .unwrap_or("unknown");
        match outcome {
            Ok(v) => {
                metrics::counter!("tributary_sqs_requests_total", "action" => label, "outcome" => "ok")
                    .increment(1);
                self.answer(protocol, label, &v, &rid)
            }
            Err(e) => {
                metrics::counter!("tributary_sqs_requests_total", "action" => label, "outcome" => e.code)
                    .increment(1);
                if e.sender {
                    info!(action = %action.escape_debug(), code = e.code, message = %e.message, "SQS request refused");
                } else {
                    warn!(action = %action.escape_debug(), code = e.code, message = %e.message, "SQS request failed");
                }
                self.error(protocol, &e, &rid)
            }
        }
    }

    /// The action's name and its outcome.
    async fn run(
        &self,
        protocol: Protocol,
        parts: &http::request::Parts,
        body: &Bytes,
        traffic: &Traffic,
    ) -> (String, Result<Value, SqsError>) {
        let query = parts.uri.query().unwrap_or("");
        let (action, params) = match protocol {
            Protocol::Json => {
                let target = parts
                    .headers
                    .get("x-amz-target")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let Some(action) = target.strip_prefix(TARGET_PREFIX) else {
                    return (
                        target.to_string(),
                        Err(SqsError::invalid_action(format!(
                            "The target {} is not an SQS operation.",
                            target.escape_debug()
                        ))),
                    );
                };
                match Params::from_json(body) {
                    Ok(p) => (action.to_string(), p),
                    Err(e) => return (action.to_string(), Err(e)),
                }
            }
            Protocol::Query => {
                let mut fields: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
                    .into_owned()
                    .collect();
                let form = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
                if form || (parts.method == http::Method::POST && !body.is_empty()) {
                    fields.extend(form_urlencoded::parse(body).into_owned());
                }
                let action = fields
                    .iter()
                    .find(|(k, _)| k == "Action")
                    .map(|(_, v)| v.clone());
                let Some(action) = action else {
                    return (
                        String::new(),
                        Err(SqsError::missing_parameter(
                            "The request must contain the parameter Action.",
                        )),
                    );
                };
                match Params::from_form(&fields) {
                    Ok(p) => (action, p),
                    Err(e) => return (action, Err(e)),
                }
            }
        };
        let signed = SignedRequest {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query,
            headers: &parts.headers,
            body,
        };
        let sender = match self.authenticate(&signed) {
            Ok(s) => s,
            Err(e) => return (action, Err(e)),
        };
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        let base = format!("http://{host}");
        let call = Call {
            params: &params,
            base: &base,
            path: parts.uri.path(),
            sender: &sender,
            traffic,
        };
        let outcome = self.service.dispatch(&action, &call).await;
        (action, outcome)
    }

    /// Who sent the request: the verified access key id, or (no keys configured) whatever
    /// key it claims, else the account id.
    fn authenticate(&self, req: &SignedRequest<'_>) -> Result<String, SqsError> {
        if self.credentials.is_empty() {
            return Ok(sigv4::claimed_access_key_id(req)
                .unwrap_or_else(|| self.service.identity.account_id.clone()));
        }
        let secret_for = |id: &str| {
            self.credentials
                .iter()
                .find(|c| c.access_key_id == id)
                .map(|c| c.secret_access_key.clone())
        };
        sigv4::verify(req, secret_for, SystemTime::now())
            .map(|v| v.access_key_id)
            .map_err(|e| SqsError::auth(e.aws_code(), e.status(), e.to_string()))
    }

    fn answer(
        &self,
        protocol: Protocol,
        action: &str,
        v: &Value,
        rid: &str,
    ) -> Response<Full<Bytes>> {
        let (body, content_type) = match protocol {
            Protocol::Json => (v.to_string(), JSON_TYPE),
            Protocol::Query => (render::xml_response(action, v, rid), "text/xml"),
        };
        respond(StatusCode::OK, content_type, body, rid, None)
    }

    fn error(&self, protocol: Protocol, e: &SqsError, rid: &str) -> Response<Full<Bytes>> {
        let query_error = format!("{};{}", e.code, e.fault());
        match protocol {
            Protocol::Json => respond(
                e.status,
                JSON_TYPE,
                render::json_error(e),
                rid,
                Some(&query_error),
            ),
            Protocol::Query => respond(e.status, "text/xml", render::xml_error(e, rid), rid, None),
        }
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: String,
    rid: &str,
    query_error: Option<&str>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(rid) {
        h.insert("x-amzn-requestid", v);
    }
    if let Some(q) = query_error.and_then(|q| HeaderValue::from_str(q).ok()) {
        h.insert("x-amzn-query-error", q);
    }
    r
}
