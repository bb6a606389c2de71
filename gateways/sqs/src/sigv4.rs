//! AWS Signature Version 4 verification for the SQS gateway: the `Authorization` header form
//! and presigned query strings.
//!
//! The canonical request is rebuilt from the request as it arrived on the wire. SQS is not S3,
//! so the path is normalised (dot segments and empty segments removed) and then percent-encoded
//! once more: the SDKs sign the already-encoded path encoded again, so `%3A` on the wire is
//! `%253A` in the canonical request. Query names and values are decoded and re-encoded with the
//! AWS unreserved set, which makes `+`, `%20` and lower-case escapes from different clients
//! canonicalise alike.
//!
//! Error codes and messages follow what AWS answers for SQS (a clock skew past 15 minutes is
//! `SignatureDoesNotMatch` with the "Signature expired" message, not `RequestExpired`).

use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const ALGORITHM: &str = "AWS4-HMAC-SHA256";
const TERMINATOR: &str = "aws4_request";
const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// How far a request's timestamp may be from our clock, either way (AWS's 15 minutes).
pub const MAX_SKEW_SECS: i64 = 15 * 60;
/// The longest a presigned URL may live (AWS's limit: the signing key is valid for 7 days).
pub const MAX_PRESIGN_EXPIRES_SECS: i64 = 7 * 24 * 3600;
/// Echoed request parts in error messages are cut to this many bytes, so a huge header does
/// not become a huge error answer.
const ECHO_LIMIT: usize = 256;

/// The parts of an HTTP request a signature covers, as received (raw, not decoded).
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    pub method: &'a str,
    /// Raw path as on the request line, e.g. `/000000000000/q1`.
    pub path: &'a str,
    /// Raw query string without `?`, may be empty.
    pub query: &'a str,
    /// Must include `host` (for HTTP/2, the caller adds it from `:authority`).
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// Who signed a request that verified, and the scope they signed for; the caller checks the
/// region and service against its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub access_key_id: String,
    pub region: String,
    pub service: String,
}

impl Verified {
    /// The answer AWS gives a signature scoped to another region or service. Separate from
    /// [`verify`] because whether to insist is the gateway's choice: clients pointed at a
    /// local endpoint often sign for whatever region their profile names.
    pub fn check_scope(&self, region: &str, service: &str) -> Result<(), SigV4Error> {
        if self.region != region {
            return Err(SigV4Error::BadScope(format!(
                "Credential should be scoped to a valid region, not '{}'.",
                echo(&self.region)
            )));
        }
        if self.service != service {
            return Err(SigV4Error::BadScope(format!(
                "Credential should be scoped to correct service: '{service}'."
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigV4Error {
    /// No signature at all (neither an `Authorization` header nor `X-Amz-Algorithm`).
    #[error("Request is missing Authentication Token")]
    MissingAuthenticationToken,
    /// A signature is there but lacks parts or is malformed.
    #[error("{0}")]
    IncompleteSignature(String),
    /// The access key id is not one we know.
    #[error("The security token included in the request is invalid.")]
    InvalidClientTokenId,
    /// The signature is well formed but wrong.
    #[error(
        "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
    )]
    SignatureDoesNotMatch,
    /// The request's time is too far from ours, or a presigned URL has expired.
    #[error("{0}")]
    Expired(String),
    /// The credential scope is wrong (terminator, or a date that is not the request's);
    /// AWS answers these as `SignatureDoesNotMatch` with a message saying why.
    #[error("{0}")]
    BadScope(String),
}

impl SigV4Error {
    pub fn aws_code(&self) -> &'static str {
        match self {
            Self::MissingAuthenticationToken => "MissingAuthenticationToken",
            Self::IncompleteSignature(_) => "IncompleteSignature",
            Self::InvalidClientTokenId => "InvalidClientTokenId",
            Self::SignatureDoesNotMatch | Self::Expired(_) | Self::BadScope(_) => {
                "SignatureDoesNotMatch"
            }
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::IncompleteSignature(_) => StatusCode::BAD_REQUEST,
            Self::MissingAuthenticationToken
            | Self::InvalidClientTokenId
            | Self::SignatureDoesNotMatch
            | Self::Expired(_)
            | Self::BadScope(_) => StatusCode::FORBIDDEN,
        }
    }
}

/// Whether the request carries a signature at all (Authorization header or X-Amz-Algorithm
/// query parameter).
pub fn is_signed(req: &SignedRequest) -> bool {
    req.headers.contains_key(http::header::AUTHORIZATION) || has_presign_algorithm(req.query)
}

/// Verifies the request's signature against `secret_for(access_key_id)`; `now` is the clock
/// for the skew and expiry checks.
pub fn verify(
    req: &SignedRequest,
    secret_for: impl Fn(&str) -> Option<String>,
    now: SystemTime,
) -> Result<Verified, SigV4Error> {
    let now = unix_seconds(now);
    let auth = parse_auth(req)?;
    let cred = parse_credential(&auth.credential)?;

    let scope_date = &auth.timestamp_text[..8];
    if cred.date != scope_date {
        return Err(SigV4Error::BadScope(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{}' != '{}', from '{}'.",
            echo(cred.date),
            scope_date,
            auth.timestamp_text
        )));
    }

    check_time(auth.timestamp, auth.expires, now)?;

    let secret = secret_for(cred.access_key_id).ok_or(SigV4Error::InvalidClientTokenId)?;

    let canonical = canonical_request(req, &auth);
    let string_to_sign = format!(
        "{ALGORITHM}\n{}\n{}/{}/{}/{TERMINATOR}\n{}",
        auth.timestamp_text,
        cred.date,
        cred.region,
        cred.service,
        hex(&Sha256::digest(&canonical))
    );

    // A signature that is not 64 hex digits cannot match; it is not a malformed request in
    // AWS's eyes, just a wrong signature.
    let provided = decode_hex_32(&auth.signature).ok_or(SigV4Error::SignatureDoesNotMatch)?;
    let key = signing_key(&secret, cred.date, cred.region, cred.service);
    let mut mac = hmac_new(&key);
    mac.update(string_to_sign.as_bytes());
    mac.verify_slice(&provided)
        .map_err(|_| SigV4Error::SignatureDoesNotMatch)?;

    Ok(Verified {
        access_key_id: cred.access_key_id.to_string(),
        region: cred.region.to_string(),
        service: cred.service.to_string(),
    })
}

/// The access key id a signed request claims, without verifying anything: for a gateway that
/// accepts any signature (no keys configured) but still reports who sent a message.
pub fn claimed_access_key_id(req: &SignedRequest) -> Option<String> {
    let auth = parse_auth(req).ok()?;
    let cred = parse_credential(&auth.credential).ok()?;
    Some(cred.access_key_id.to_string())
}

/// The signing key: HMAC chain over the date, region, service and terminator.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let mut k = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    k = hmac(&k, region.as_bytes());
    k = hmac(&k, service.as_bytes());
    hmac(&k, TERMINATOR.as_bytes())
}

fn hmac_new(key: &[u8]) -> HmacSha256 {
    match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        // HMAC takes keys of any length; this arm exists only because the API is fallible.
        Err(_) => unreachable!("HMAC-SHA256 accepts any key length"),
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = hmac_new(key);
    m.update(data);
    m.finalize().into_bytes().into()
}

/// Where the signature parts came from, once parsed.
struct Auth {
    credential: String,
    signed_headers: Vec<String>,
    signature: String,
    /// The request time in ISO-8601 basic format, exactly as it goes into the string to sign.
    timestamp_text: String,
    timestamp: i64,
    /// `X-Amz-Expires` of a presigned URL; `None` for the header form.
    expires: Option<i64>,
    presigned: bool,
}

fn parse_auth(req: &SignedRequest) -> Result<Auth, SigV4Error> {
    let mut auth_headers = req.headers.get_all(http::header::AUTHORIZATION).iter();
    let header = auth_headers.next();
    let presigned = has_presign_algorithm(req.query);
    match (header, presigned) {
        (Some(_), true) => Err(incomplete(
            "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter or the Authorization header should be specified",
        )),
        (Some(h), false) => {
            if auth_headers.next().is_some() {
                return Err(incomplete("Only one Authorization header is allowed."));
            }
            parse_auth_header(req, h.as_bytes())
        }
        (None, true) => parse_presigned(req),
        (None, false) => Err(SigV4Error::MissingAuthenticationToken),
    }
}

fn parse_auth_header(req: &SignedRequest, raw: &[u8]) -> Result<Auth, SigV4Error> {
    let value = std::str::from_utf8(raw)
        .map_err(|_| incomplete("Authorization header is not valid UTF-8."))?
        .trim();
    let (algorithm, rest) = match value.split_once([' ', '\t']) {
        Some((a, r)) => (a, r),
        None => (value, ""),
    };
    if algorithm != ALGORITHM {
        return Err(incomplete(&format!(
            "Unsupported AWS 'algorithm': '{}'. Only '{ALGORITHM}' is supported.",
            echo(algorithm)
        )));
    }

    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, val)) = part.split_once('=') else {
            return Err(incomplete(&format!(
                "'{}' not a valid key=value pair (missing equal-sign) in Authorization header: '{}'.",
                echo(part),
                echo(value)
            )));
        };
        let slot = match key.trim() {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed_headers,
            "Signature" => &mut signature,
            // AWS ignores unknown components; so do we.
            _ => continue,
        };
        if slot.is_some() {
            return Err(incomplete(&format!(
                "Duplicate '{}' in Authorization header: '{}'.",
                echo(key.trim()),
                echo(value)
            )));
        }
        *slot = Some(val.trim().to_string());
    }

    let date = timestamp_from_headers(req.headers)?;
    let mut missing = String::new();
    for (name, present) in [
        ("Credential", credential.is_some()),
        ("Signature", signature.is_some()),
        ("SignedHeaders", signed_headers.is_some()),
    ] {
        if !present {
            missing.push_str(&format!(
                "Authorization header requires '{name}' parameter. "
            ));
        }
    }
    if date.is_none() {
        missing.push_str(
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header. ",
        );
    }
    if !missing.is_empty() {
        missing.push_str(&format!("Authorization={}", echo(value)));
        return Err(SigV4Error::IncompleteSignature(missing));
    }
    let (timestamp_text, timestamp) = date.unwrap_or_default();
    Ok(Auth {
        credential: credential.unwrap_or_default(),
        signed_headers: parse_signed_headers(signed_headers.as_deref().unwrap_or_default())?,
        signature: signature.unwrap_or_default(),
        timestamp_text,
        timestamp,
        expires: None,
        presigned: false,
    })
}

/// The request time from `X-Amz-Date`, else `Date`; `None` if neither is present.
fn timestamp_from_headers(headers: &HeaderMap) -> Result<Option<(String, i64)>, SigV4Error> {
    if let Some(v) = headers.get("x-amz-date") {
        let text = String::from_utf8_lossy(v.as_bytes());
        let t = parse_iso_basic(&text).ok_or_else(|| bad_date(&text))?;
        return Ok(Some((text.into_owned(), t)));
    }
    if let Some(v) = headers.get(http::header::DATE) {
        let text = String::from_utf8_lossy(v.as_bytes());
        let t = parse_http_date(&text).ok_or_else(|| {
            incomplete(&format!(
                "Date header must be an RFC 7231 IMF-fixdate. Got '{}'.",
                echo(&text)
            ))
        })?;
        // The string to sign always carries the ISO-8601 basic form, whichever header gave it.
        return Ok(Some((format_iso_basic(t), t)));
    }
    Ok(None)
}

fn parse_presigned(req: &SignedRequest) -> Result<Auth, SigV4Error> {
    let mut params: [Option<String>; 6] = Default::default();
    const NAMES: [&str; 6] = [
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Signature",
    ];
    for (name, value) in query_pairs(req.query) {
        let name = percent_decode(name);
        if let Some(i) = NAMES.iter().position(|n| n.as_bytes() == name.as_slice()) {
            if params[i].is_some() {
                return Err(incomplete(&format!(
                    "Duplicate query parameter '{}'.",
                    NAMES[i]
                )));
            }
            params[i] = Some(String::from_utf8_lossy(&percent_decode(value)).into_owned());
        }
    }
    let missing: Vec<&str> = NAMES
        .iter()
        .zip(&params)
        .filter(|(_, v)| v.is_none())
        .map(|(n, _)| *n)
        .collect();
    if !missing.is_empty() {
        return Err(incomplete(&format!(
            "AWS query-string parameters must include {}. Re-examine the query-string parameters.",
            missing
                .iter()
                .map(|n| format!("'{n}'"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let [
        algorithm,
        credential,
        date,
        expires,
        signed_headers,
        signature,
    ] = params.map(Option::unwrap_or_default);
    if algorithm != ALGORITHM {
        return Err(incomplete(&format!(
            "Unsupported AWS 'algorithm': '{}'. Only '{ALGORITHM}' is supported.",
            echo(&algorithm)
        )));
    }
    let timestamp = parse_iso_basic(&date).ok_or_else(|| bad_date(&date))?;
    let expires = match expires.parse::<i64>() {
        Ok(n) if (0..=MAX_PRESIGN_EXPIRES_SECS).contains(&n) => n,
        _ => {
            return Err(incomplete(&format!(
                "X-Amz-Expires must be a whole number of seconds from 0 to {MAX_PRESIGN_EXPIRES_SECS}, got '{}'.",
                echo(&expires)
            )));
        }
    };
    Ok(Auth {
        credential,
        signed_headers: parse_signed_headers(&signed_headers)?,
        signature,
        timestamp_text: date,
        timestamp,
        expires: Some(expires),
        presigned: true,
    })
}

fn parse_signed_headers(list: &str) -> Result<Vec<String>, SigV4Error> {
    let names: Vec<String> = list
        .split(';')
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    if names.iter().any(String::is_empty) {
        return Err(incomplete(&format!(
            "SignedHeaders must be a non-empty, semicolon-separated list of header names, got '{}'.",
            echo(list)
        )));
    }
    // Without the host signed, a signature could be replayed against another endpoint.
    if !names.iter().any(|n| n == "host") {
        return Err(incomplete(
            "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization.",
        ));
    }
    Ok(names)
}

struct Credential<'a> {
    access_key_id: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
}

fn parse_credential(credential: &str) -> Result<Credential<'_>, SigV4Error> {
    let parts: Vec<&str> = credential.split('/').collect();
    let [access_key_id, date, region, service, terminator] = parts[..] else {
        return Err(incomplete(&format!(
            "Credential must have exactly 5 slash-delimited elements, e.g. keyid/date/region/service/term, got '{}'",
            echo(credential)
        )));
    };
    if terminator != TERMINATOR {
        return Err(SigV4Error::BadScope(format!(
            "Credential should be scoped with a valid terminator: '{TERMINATOR}', not '{}'.",
            echo(terminator)
        )));
    }
    Ok(Credential {
        access_key_id,
        date,
        region,
        service,
    })
}

fn check_time(timestamp: i64, expires: Option<i64>, now: i64) -> Result<(), SigV4Error> {
    if timestamp > now.saturating_add(MAX_SKEW_SECS) {
        return Err(SigV4Error::Expired(format!(
            "Signature not yet current: {} is still later than {} ({} + 15 min.)",
            format_iso_basic(timestamp),
            format_iso_basic(now.saturating_add(MAX_SKEW_SECS)),
            format_iso_basic(now)
        )));
    }
    match expires {
        // A presigned URL may be used long after it was made, until it expires.
        Some(expires) => {
            let end = timestamp.saturating_add(expires);
            if now > end {
                return Err(SigV4Error::Expired(format!(
                    "Signature expired: {} is now earlier than {} ({} + {expires} s X-Amz-Expires)",
                    format_iso_basic(end),
                    format_iso_basic(now),
                    format_iso_basic(timestamp)
                )));
            }
        }
        None => {
            if timestamp < now.saturating_sub(MAX_SKEW_SECS) {
                return Err(SigV4Error::Expired(format!(
                    "Signature expired: {} is now earlier than {} ({} - 15 min.)",
                    format_iso_basic(timestamp),
                    format_iso_basic(now.saturating_sub(MAX_SKEW_SECS)),
                    format_iso_basic(now)
                )));
            }
        }
    }
    Ok(())
}

/// The canonical request (bytes: header values need not be UTF-8).
fn canonical_request(req: &SignedRequest, auth: &Auth) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + req.path.len() + req.query.len());
    out.extend_from_slice(req.method.as_bytes());
    out.push(b'\n');
    canonical_uri(req.path, &mut out);
    out.push(b'\n');
    canonical_query(req.query, auth.presigned, &mut out);
    out.push(b'\n');
    for name in &auth.signed_headers {
        out.extend_from_slice(name.as_bytes());
        out.push(b':');
        let mut first = true;
        for value in req.headers.get_all(name.as_str()) {
            if !first {
                out.push(b',');
            }
            first = false;
            push_trimmed(value.as_bytes(), &mut out);
        }
        out.push(b'\n');
    }
    out.push(b'\n');
    out.extend_from_slice(auth.signed_headers.join(";").as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload_hash(req).as_bytes());
    out
}

fn payload_hash(req: &SignedRequest) -> String {
    // The header's claim is used only for the one literal that means "not covered"; any other
    // claimed hash is replaced by the body's real one, so a body that does not match the
    // claim fails the signature rather than being trusted.
    if req
        .headers
        .get("x-amz-content-sha256")
        .map(|v| v.as_bytes())
        == Some(UNSIGNED_PAYLOAD.as_bytes())
    {
        return UNSIGNED_PAYLOAD.to_string();
    }
    hex(&Sha256::digest(req.body))
}

/// Leading and trailing spaces removed and runs of spaces made one, as the spec says (only
/// the space character: the SDKs leave tabs and other whitespace inside values alone).
fn push_trimmed(value: &[u8], out: &mut Vec<u8>) {
    let is_ws = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ws(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ws(b))
        .map_or(start, |i| i + 1);
    let mut prev_space = false;
    for &b in &value[start..end] {
        if b == b' ' {
            if !prev_space {
                out.push(b);
            }
            prev_space = true;
        } else {
            out.push(b);
            prev_space = false;
        }
    }
}

/// The path normalised (RFC 3986 dot segments removed, empty segments dropped) and each byte
/// outside the unreserved set and `/` percent-encoded, the raw `%` of existing escapes
/// included: non-S3 services sign the wire path encoded a second time.
fn canonical_uri(path: &str, out: &mut Vec<u8>) {
    let mut segments: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let ends_dir = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    out.push(b'/');
    for (i, seg) in segments.iter().enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        uri_encode(seg.as_bytes(), out);
    }
    if ends_dir && !segments.is_empty() {
        out.push(b'/');
    }
}

/// Query parameters decoded, re-encoded with the unreserved set, sorted by name then value;
/// a presigned URL's own signature is left out.
fn canonical_query(query: &str, presigned: bool, out: &mut Vec<u8>) {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = query_pairs(query)
        .map(|(n, v)| (percent_decode(n), percent_decode(v)))
        .filter(|(n, _)| !(presigned && n == b"X-Amz-Signature"))
        .map(|(n, v)| {
            let (mut en, mut ev) = (Vec::new(), Vec::new());
            uri_encode(&n, &mut en);
            uri_encode(&v, &mut ev);
            (en, ev)
        })
        .collect();
    pairs.sort();
    for (i, (n, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        out.extend_from_slice(n);
        out.push(b'=');
        out.extend_from_slice(v);
    }
}

fn has_presign_algorithm(query: &str) -> bool {
    query_pairs(query).any(|(name, _)| percent_decode(name) == b"X-Amz-Algorithm")
}

/// Raw (still encoded) name/value pairs; a pair without `=` has an empty value, empty pairs
/// (`a=1&&b=2`) are skipped.
fn query_pairs(query: &str) -> impl Iterator<Item = (&[u8], &[u8])> {
    query
        .as_bytes()
        .split(|b| *b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.iter().position(|b| *b == b'=') {
            Some(i) => (&p[..i], &p[i + 1..]),
            None => (p, &p[p.len()..]),
        })
}

/// `%XX` escapes decoded and `+` read as a space (form encoding, which some clients use in
/// query strings); a `%` not followed by two hex digits stays as it is.
fn percent_decode(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'%' if i + 2 < raw.len() => match (hex_val(raw[i + 1]), hex_val(raw[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

fn uri_encode(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if is_unreserved(b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

fn decode_hex_32(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = hex_val(b[2 * i])? << 4 | hex_val(b[2 * i + 1])?;
    }
    Some(out)
}

fn incomplete(msg: &str) -> SigV4Error {
    SigV4Error::IncompleteSignature(msg.to_string())
}

fn bad_date(text: &str) -> SigV4Error {
    incomplete(&format!(
        "Date must be in ISO-8601 'basic format'. Got '{}'. See http://en.wikipedia.org/wiki/ISO_8601",
        echo(text)
    ))
}

/// A request part for an error message, cut short (at a char boundary) if long.
fn echo(s: &str) -> &str {
    if s.len() <= ECHO_LIMIT {
        return s;
    }
    let mut end = ECHO_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// `YYYYMMDDTHHMMSSZ` to Unix seconds.
fn parse_iso_basic(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        b[r].iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    civil_to_unix(
        num(0..4)?,
        num(4..6)?,
        num(6..8)?,
        num(9..11)?,
        num(11..13)?,
        num(13..15)?,
    )
}

/// An RFC 7231 IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) to Unix seconds.
fn parse_http_date(s: &str) -> Option<i64> {
    let b = s.trim().as_bytes();
    if b.len() != 29 || &b[3..5] != b", " || &b[25..] != b" GMT" {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        b[r].iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    const MONTHS: [&[u8]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == &b[8..11])? as i64 + 1;
    if b[7] != b' ' || b[11] != b' ' || b[16] != b' ' || b[19] != b':' || b[22] != b':' {
        return None;
    }
    civil_to_unix(
        num(12..16)?,
        month,
        num(5..7)?,
        num(17..19)?,
        num(20..22)?,
        num(23..25)?,
    )
}

fn civil_to_unix(y: i64, m: i64, d: i64, hh: i64, mm: i64, ss: i64) -> Option<i64> {
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&m)
        || d < 1
        || d > days_in_month[(m - 1) as usize]
        || hh > 23
        || mm > 59
        || ss > 59
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm), valid for any year we can parse.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

fn format_iso_basic(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    // Civil from days (the inverse of the above).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use aws_credential_types::Credentials;
    use aws_sigv4::http_request::{
        PayloadChecksumKind, SignableBody, SignableRequest, SignatureLocation, SigningSettings,
        sign,
    };
    use aws_sigv4::sign::v4;
    use http::HeaderValue;

    const AKID: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    /// 2015-08-30T12:36:00Z, the test suite's signing time.
    const SUITE_TIME: u64 = 1_440_938_160;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn secrets(akid: &str) -> Option<String> {
        (akid == AKID).then(|| SECRET.to_string())
    }

    /// An owned request: `target` is the request-line target (`/path?query`).
    struct Req {
        method: String,
        path: String,
        query: String,
        headers: HeaderMap,
        body: Vec<u8>,
    }

    impl Req {
        fn new(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Self {
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let mut map = HeaderMap::new();
            for (n, v) in headers {
                map.append(
                    http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            Self {
                method: method.into(),
                path: path.into(),
                query: query.into(),
                headers: map,
                body: body.to_vec(),
            }
        }

        fn signed(&self) -> SignedRequest<'_> {
            SignedRequest {
                method: &self.method,
                path: &self.path,
                query: &self.query,
                headers: &self.headers,
                body: &self.body,
            }
        }

        fn verify_at(&self, now: SystemTime) -> Result<Verified, SigV4Error> {
            verify(&self.signed(), secrets, now)
        }

        fn set(&mut self, name: &'static str, value: &str) {
            self.headers
                .insert(name, HeaderValue::from_str(value).unwrap());
        }
    }

    fn suite_auth(signed_headers: &str, signature: &str) -> String {
        format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders={signed_headers}, Signature={signature}"
        )
    }

    fn ok(v: Result<Verified, SigV4Error>) -> Verified {
        match v {
            Ok(v) => v,
            Err(e) => panic!("expected a verified request, got {e:?}: {e}"),
        }
    }

    fn err(v: Result<Verified, SigV4Error>) -> SigV4Error {
        match v {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e,
        }
    }

    type Headers = &'static [(&'static str, &'static str)];
    /// (name, method, target, headers other than host/x-amz-date/authorization, body, signed
    /// headers, signature).
    type HeaderCase = (
        &'static str,
        &'static str,
        &'static str,
        Headers,
        &'static str,
        &'static str,
        &'static str,
    );
    /// (name, method, target with the presigning parameters, headers other than host, body).
    type PresignedCase = (
        &'static str,
        &'static str,
        &'static str,
        Headers,
        &'static str,
    );

    /// Cases of the AWS SigV4 test suite, header form.
    #[test]
    fn aws_test_suite_header_form() {
        let cases: &[HeaderCase] = &[
            (
                "get-vanilla",
                "GET",
                "/",
                &[],
                "",
                "host;x-amz-date",
                "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
            (
                "get-vanilla-query-order-key-case",
                "GET",
                "/?Param2=value2&Param1=value1",
                &[],
                "",
                "host;x-amz-date",
                "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
            ),
            (
                "get-vanilla-query-order-encoded",
                "GET",
                "/?Param-3=Value3&Param=Value2&%E1%88%B4=Value1",
                &[],
                "",
                "host;x-amz-date",
                "371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac",
            ),
            (
                "get-vanilla-query-unreserved",
                "GET",
                "/?-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz=-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                &[],
                "",
                "host;x-amz-date",
                "9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197",
            ),
            (
                "get-vanilla-utf8-query (sent encoded)",
                "GET",
                "/?%E1%88%B4=bar",
                &[],
                "",
                "host;x-amz-date",
                "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04",
            ),
            (
                "get-header-value-trim",
                "GET",
                "/",
                &[("My-Header1", " value1"), ("My-Header2", "\"a   b   c\"")],
                "",
                "host;my-header1;my-header2;x-amz-date",
                "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
            ),
            (
                "get-header-key-duplicate",
                "GET",
                "/",
                &[
                    ("My-Header1", "value2"),
                    ("My-Header1", "value2"),
                    ("My-Header1", "value1"),
                ],
                "",
                "host;my-header1;x-amz-date",
                "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea",
            ),
            (
                "get-slashes-normalized",
                "GET",
                "//example//",
                &[],
                "",
                "host;x-amz-date",
                "9a624bd73a37c9a373b5312afbebe7a714a789de108f0bdfe846570885f57e84",
            ),
            (
                "get-relative-relative-normalized",
                "GET",
                "/example1/example2/../..",
                &[],
                "",
                "host;x-amz-date",
                "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
            (
                "get-slash-dot-slash-normalized",
                "GET",
                "/./",
                &[],
                "",
                "host;x-amz-date",
                "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
            (
                "get-slash-pointless-dot-normalized",
                "GET",
                "/./example",
                &[],
                "",
                "host;x-amz-date",
                "ef75d96142cf21edca26f06005da7988e4f8dc83a165a80865db7089db637ec5",
            ),
            (
                "post-vanilla-query",
                "POST",
                "/?Param1=value1",
                &[],
                "",
                "host;x-amz-date",
                "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
            ),
            (
                "post-header-value-case",
                "POST",
                "/",
                &[("My-Header1", "VALUE1")],
                "",
                "host;my-header1;x-amz-date",
                "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d",
            ),
            (
                "post-sts-header-before",
                "POST",
                "/",
                &[(
                    "X-Amz-Security-Token",
                    "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==",
                )],
                "",
                "host;x-amz-date;x-amz-security-token",
                "85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead",
            ),
            (
                "post-x-www-form-urlencoded",
                "POST",
                "/",
                &[
                    ("Content-Type", "application/x-www-form-urlencoded"),
                    ("Content-Length", "13"),
                    (
                        "x-amz-content-sha256",
                        "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e",
                    ),
                ],
                "Param1=value1",
                "content-length;content-type;host;x-amz-content-sha256;x-amz-date",
                "d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b",
            ),
        ];
        for (name, method, target, extra, body, signed, sig) in cases {
            let mut headers = vec![
                ("Host", "example.amazonaws.com"),
                ("X-Amz-Date", "20150830T123600Z"),
            ];
            headers.extend_from_slice(extra);
            let auth = suite_auth(signed, sig);
            headers.push(("Authorization", &auth));
            let req = Req::new(method, target, &headers, body.as_bytes());
            match req.verify_at(at(SUITE_TIME)) {
                Ok(v) => assert_eq!(
                    v,
                    Verified {
                        access_key_id: AKID.into(),
                        region: "us-east-1".into(),
                        service: "service".into()
                    },
                    "{name}"
                ),
                Err(e) => panic!("{name}: {e:?}"),
            }
            // The same request with one signature digit changed must fail.
            let bad_sig = format!(
                "{}{}",
                if sig.starts_with('0') { "1" } else { "0" },
                &sig[1..]
            );
            let auth = suite_auth(signed, &bad_sig);
            let mut req = req;
            req.set("authorization", &auth);
            assert_eq!(
                req.verify_at(at(SUITE_TIME)),
                Err(SigV4Error::SignatureDoesNotMatch),
                "{name}"
            );
        }
    }

    /// The suite's presigned (query-string) forms.
    #[test]
    fn aws_test_suite_presigned() {
        let cases: &[PresignedCase] = &[
            (
                "get-vanilla",
                "GET",
                "/?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20150830%2Fus-east-1%2Fservice%2Faws4_request&X-Amz-Date=20150830T123600Z&X-Amz-SignedHeaders=host&X-Amz-Expires=3600&X-Amz-Signature=e93c787ed7f371d5c6b165c1b38ede9550f4dce4144713e844b25b7192d3865d",
                &[],
                "",
            ),
            (
                "get-vanilla-query-order-key-case",
                "GET",
                "/?Param2=value2&Param1=value1&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20150830%2Fus-east-1%2Fservice%2Faws4_request&X-Amz-Date=20150830T123600Z&X-Amz-SignedHeaders=host&X-Amz-Expires=3600&X-Amz-Signature=86012e2c9ad4d77369f5d81c11f75158aae4f895a085212cc6d3f923d300bed5",
                &[],
                "",
            ),
            (
                "get-header-value-trim",
                "GET",
                "/?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20150830%2Fus-east-1%2Fservice%2Faws4_request&X-Amz-Date=20150830T123600Z&X-Amz-SignedHeaders=host%3Bmy-header1%3Bmy-header2&X-Amz-Expires=3600&X-Amz-Signature=e7bb0fd515e125e1aec2ecc4c0c17484fb06f6846b927c35e46005dd3df3acd4",
                &[("My-Header1", "value1"), ("My-Header2", "\"a   b   c\"")],
                "",
            ),
            (
                "post-x-www-form-urlencoded",
                "POST",
                "/?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20150830%2Fus-east-1%2Fservice%2Faws4_request&X-Amz-Date=20150830T123600Z&X-Amz-SignedHeaders=content-length%3Bcontent-type%3Bhost&X-Amz-Expires=3600&X-Amz-Signature=89a40deed0f26f9461242825a082d2222717248abc7ab41f552ad84a94ad46e9",
                &[
                    ("Content-Type", "application/x-www-form-urlencoded"),
                    ("Content-Length", "13"),
                ],
                "Param1=value1",
            ),
        ];
        for (name, method, target, extra, body) in cases {
            let mut headers = vec![("Host", "example.amazonaws.com")];
            headers.extend_from_slice(extra);
            let req = Req::new(method, target, &headers, body.as_bytes());
            assert!(is_signed(&req.signed()), "{name}");
            ok(req.verify_at(at(SUITE_TIME + 3599)));
            // Past X-Amz-Expires it has expired, however good the signature.
            let e = err(req.verify_at(at(SUITE_TIME + 3601)));
            assert!(matches!(e, SigV4Error::Expired(_)), "{name}: {e:?}");
            assert_eq!(e.aws_code(), "SignatureDoesNotMatch");
            assert_eq!(e.status(), StatusCode::FORBIDDEN);
        }
    }

    /// The path on the wire is encoded once more for the canonical request (non-S3 rule):
    /// the suite's `double-url-encode` case, `%3A` on the wire signed as `%253A`.
    #[test]
    fn aws_test_suite_double_url_encoded_path() {
        let req = Req::new(
            "POST",
            "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-west-2%3A892717189312%3Afunction%3Amy-rusty-fun/invocations",
            &[
                ("Host", "lambda.us-east-2.amazonaws.com"),
                ("X-Amz-Date", "20210511T154045Z"),
                (
                    "Authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20210511/us-east-2/lambda/aws4_request, SignedHeaders=host;x-amz-date, Signature=4b93abbcc68be32bd64c18e2c71150660ab4c29bbd6c32a383a7517a88fc1804",
                ),
            ],
            b"",
        );
        let v = ok(req.verify_at(at(1_620_747_645)));
        assert_eq!(
            (v.region.as_str(), v.service.as_str()),
            ("us-east-2", "lambda")
        );
    }

    #[test]
    fn canonical_uri_rules() {
        let uri = |p: &str| {
            let mut out = Vec::new();
            canonical_uri(p, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(uri(""), "/");
        assert_eq!(uri("/"), "/");
        assert_eq!(uri("/000000000000/q1"), "/000000000000/q1");
        assert_eq!(uri("/a%20b/c%3Ad"), "/a%2520b/c%253Ad");
        assert_eq!(uri("/a b/é"), "/a%20b/%C3%A9");
        assert_eq!(uri("//a//b//"), "/a/b/");
        assert_eq!(uri("/a/./b/../c"), "/a/c");
        assert_eq!(uri("/a/b/.."), "/a/");
        assert_eq!(uri("/../../x"), "/x");
        assert_eq!(uri("/-._~"), "/-._~");
        assert_eq!(uri("relative"), "/relative");
    }

    #[test]
    fn canonical_query_rules() {
        let q = |s: &str, presigned: bool| {
            let mut out = Vec::new();
            canonical_query(s, presigned, &mut out);
            String::from_utf8(out).unwrap()
        };
        assert_eq!(q("", false), "");
        assert_eq!(q("b=2&a=1&a=0", false), "a=0&a=1&b=2");
        assert_eq!(q("flag&x=", false), "flag=&x=");
        assert_eq!(q("a=1&&b=2&", false), "a=1&b=2");
        assert_eq!(
            q("k=a+b&k2=a%20b&k3=a%2bb", false),
            "k=a%20b&k2=a%20b&k3=a%2Bb"
        );
        assert_eq!(q("x=%zz%4", false), "x=%25zz%254");
        assert_eq!(q("p=/a:b", false), "p=%2Fa%3Ab");
        assert_eq!(q("X-Amz-Signature=ab&c=d", true), "c=d");
        assert_eq!(q("X-Amz-Signature=ab&c=d", false), "X-Amz-Signature=ab&c=d");
        // Sorting is on the encoded names: '%' (0x25) sorts before letters.
        assert_eq!(q("B=1&%41=2&_=3", false), "A=2&B=1&_=3");
    }

    #[test]
    fn header_value_trimming() {
        let t = |v: &[u8]| {
            let mut out = Vec::new();
            push_trimmed(v, &mut out);
            out
        };
        assert_eq!(t(b"  a   b  c  "), b"a b c");
        assert_eq!(t(b""), b"");
        assert_eq!(t(b"   "), b"");
        assert_eq!(t(b"a\tb"), b"a\tb");
        assert_eq!(t(b"\xff  \xfe"), b"\xff \xfe");
    }

    /// AWS's published example of a derived signing key (the IAM example of the SigV4 docs).
    #[test]
    fn signing_key_derivation() {
        assert_eq!(
            hex(&signing_key(SECRET, "20120215", "us-east-1", "iam")),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(parse_iso_basic("20150830T123600Z"), Some(SUITE_TIME as i64));
        assert_eq!(format_iso_basic(SUITE_TIME as i64), "20150830T123600Z");
        assert_eq!(parse_iso_basic("19700101T000000Z"), Some(0));
        assert_eq!(parse_iso_basic("20240229T235959Z"), Some(1_709_251_199));
        assert_eq!(parse_iso_basic("20230229T000000Z"), None);
        assert_eq!(parse_iso_basic("20150830T123600"), None);
        assert_eq!(parse_iso_basic("2015-08-30T12:36"), None);
        assert_eq!(parse_iso_basic("20151330T123600Z"), None);
        assert_eq!(parse_iso_basic("20150830T243600Z"), None);
        assert_eq!(parse_iso_basic("2015083éT12360Z"), None);
        assert_eq!(
            parse_http_date("Sun, 30 Aug 2015 12:36:00 GMT"),
            Some(SUITE_TIME as i64)
        );
        assert_eq!(parse_http_date("Sun, 30 Aug 2015 12:36:00 UTC"), None);
        assert_eq!(parse_http_date("Sun, 30 Foo 2015 12:36:00 GMT"), None);
        assert_eq!(parse_http_date("Sunday, 30-Aug-15 12:36:00 GMT"), None);
        for t in [0i64, 951_782_400, 4_102_444_799, -86_400] {
            assert_eq!(parse_iso_basic(&format_iso_basic(t)).unwrap_or(i64::MIN), t);
        }
        // Whatever the clock says, formatting it must not panic.
        format_iso_basic(i64::MAX);
        format_iso_basic(i64::MIN);
    }

    // ---- Round trips with the AWS SDK's own signer ----

    struct Signer {
        akid: &'static str,
        secret: &'static str,
        region: &'static str,
        service: &'static str,
        time: SystemTime,
        settings: SigningSettings,
    }

    impl Signer {
        fn sqs(time: SystemTime) -> Self {
            Self {
                akid: AKID,
                secret: SECRET,
                region: "us-east-1",
                service: "sqs",
                time,
                settings: SigningSettings::default(),
            }
        }

        /// Signs `method url` with these headers (host is added from the URL) and body, and
        /// returns the request as the gateway would see it.
        fn sign(&self, method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Req {
            let uri: http::Uri = url.parse().unwrap();
            let host = uri.authority().unwrap().to_string();
            let mut all: Vec<(&str, &str)> = vec![("host", &host)];
            all.extend_from_slice(headers);
            let identity = Credentials::new(self.akid, self.secret, None, None, "test").into();
            let params = v4::SigningParams::builder()
                .identity(&identity)
                .region(self.region)
                .name(self.service)
                .time(self.time)
                .settings(self.settings.clone())
                .build()
                .unwrap()
                .into();
            let signable =
                SignableRequest::new(method, url, all.iter().copied(), SignableBody::Bytes(body))
                    .unwrap();
            let (instructions, _) = sign(signable, &params).unwrap().into_parts();
            let mut request = http::Request::builder().method(method).uri(url);
            for (n, v) in &all {
                request = request.header(*n, *v);
            }
            let mut request = request.body(()).unwrap();
            instructions.apply_to_request_http1x(&mut request);
            Req {
                method: method.into(),
                path: request.uri().path().into(),
                query: request.uri().query().unwrap_or("").into(),
                headers: request.headers().clone(),
                body: body.to_vec(),
            }
        }
    }

    fn now() -> SystemTime {
        at(1_764_934_200) // 2025-12-05T11:30:00Z
    }

    const JSON_SEND: &str = r#"{"QueueUrl":"http://localhost:9324/000000000000/q1","MessageBody":"hello wörld","MessageAttributes":{"a":{"DataType":"String","StringValue":"x  y"}}}"#;

    fn boto3_json_send(signer: &Signer) -> Req {
        signer.sign(
            "POST",
            "http://localhost:9324/",
            &[
                ("content-type", "application/x-amz-json-1.0"),
                ("x-amz-target", "AmazonSQS.SendMessage"),
                ("x-amzn-query-mode", "true"),
                (
                    "user-agent",
                    "Boto3/1.35.0 md/Botocore#1.35.0 ua/2.0 os/linux",
                ),
                ("content-length", &JSON_SEND.len().to_string()),
            ],
            JSON_SEND.as_bytes(),
        )
    }

    #[test]
    fn sdk_signed_json_request_verifies() {
        let req = boto3_json_send(&Signer::sqs(now()));
        assert!(is_signed(&req.signed()));
        let v = ok(req.verify_at(now()));
        assert_eq!(
            v,
            Verified {
                access_key_id: AKID.into(),
                region: "us-east-1".into(),
                service: "sqs".into()
            }
        );
    }

    #[test]
    fn scope_checks() {
        let mut signer = Signer::sqs(now());
        signer.region = "eu-west-1";
        let v = ok(boto3_json_send(&signer).verify_at(now()));
        assert_eq!(v.check_scope("eu-west-1", "sqs"), Ok(()));
        let e = v.check_scope("us-east-1", "sqs").unwrap_err();
        assert_eq!(
            (e.aws_code(), e.status(), e.to_string().as_str()),
            (
                "SignatureDoesNotMatch",
                StatusCode::FORBIDDEN,
                "Credential should be scoped to a valid region, not 'eu-west-1'."
            )
        );
        let e = v.check_scope("eu-west-1", "sns").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Credential should be scoped to correct service: 'sns'."
        );
    }

    #[test]
    fn sdk_signed_query_protocol_form_post_verifies() {
        let body = b"Action=SendMessage&Version=2012-11-05&MessageBody=a+b%26c%3D%F0%9F%98%80&DelaySeconds=0";
        for kind in [
            PayloadChecksumKind::NoHeader,
            PayloadChecksumKind::XAmzSha256,
        ] {
            let mut signer = Signer::sqs(now());
            signer.settings.payload_checksum_kind = kind;
            let req = signer.sign(
                "POST",
                "http://localhost:9324/000000000000/q1",
                &[
                    (
                        "content-type",
                        "application/x-www-form-urlencoded; charset=utf-8",
                    ),
                    ("content-length", &body.len().to_string()),
                ],
                body,
            );
            ok(req.verify_at(now()));
        }
    }

    #[test]
    fn sdk_signed_paths_and_queries_needing_encoding_verify() {
        for url in [
            "http://localhost:9324/000000000000/my%20queue%3A1.fifo",
            "http://localhost:9324/000000000000/a%2Fb/./c/../d",
            "http://localhost:9324//000000000000//q1",
            "http://localhost:9324/000000000000/q%C3%A9?Action=GetQueueUrl&QueueName=a%20b%2Bc&Empty=&Z=%7E%21",
            "http://localhost:9324/?Action=ListQueues&QueueNamePrefix=x&Action=again",
        ] {
            let req = Signer::sqs(now()).sign("GET", url, &[], b"");
            if let Err(e) = req.verify_at(now()) {
                panic!("{url}: {e:?} ({} ? {})", req.path, req.query);
            }
        }
    }

    #[test]
    fn sdk_presigned_get_verifies_until_it_expires() {
        let mut signer = Signer::sqs(now());
        signer.settings.signature_location = SignatureLocation::QueryParams;
        signer.settings.expires_in = Some(Duration::from_secs(300));
        let req = signer.sign(
            "GET",
            "http://localhost:9324/000000000000/q1?Action=ReceiveMessage&MaxNumberOfMessages=10",
            &[],
            b"",
        );
        assert!(req.query.contains("X-Amz-Signature="));
        assert!(!req.headers.contains_key("authorization"));
        assert!(is_signed(&req.signed()));
        let v = ok(req.verify_at(now()));
        assert_eq!(v.service, "sqs");
        // A presigned URL is not bound by the 15-minute skew, only by its expiry.
        ok(req.verify_at(now() + Duration::from_secs(300)));
        let e = err(req.verify_at(now() + Duration::from_secs(301)));
        assert!(matches!(e, SigV4Error::Expired(_)), "{e:?}");
        // But one dated well in the future is refused.
        let e = err(req.verify_at(now() - Duration::from_secs(16 * 60)));
        assert!(matches!(e, SigV4Error::Expired(_)), "{e:?}");
        assert!(
            e.to_string().starts_with("Signature not yet current"),
            "{e}"
        );

        // A changed parameter breaks the signature.
        let mut tampered = Req::new("GET", "/", &[], b"");
        tampered.path = req.path.clone();
        tampered.query = req
            .query
            .replace("MaxNumberOfMessages=10", "MaxNumberOfMessages=1");
        tampered.headers = req.headers.clone();
        assert_eq!(
            tampered.verify_at(now()),
            Err(SigV4Error::SignatureDoesNotMatch)
        );
    }

    #[test]
    fn claimed_key_is_read_without_verifying() {
        let mut signer = Signer::sqs(now());
        signer.akid = "AKIDUNKNOWN";
        let req = boto3_json_send(&signer);
        assert_eq!(
            claimed_access_key_id(&req.signed()).as_deref(),
            Some("AKIDUNKNOWN")
        );
        signer.settings.signature_location = SignatureLocation::QueryParams;
        signer.settings.expires_in = Some(Duration::from_secs(60));
        let req = signer.sign("GET", "http://localhost:9324/?Action=ListQueues", &[], b"");
        assert_eq!(
            claimed_access_key_id(&req.signed()).as_deref(),
            Some("AKIDUNKNOWN")
        );
        let req = Req::new("GET", "/", &[("Host", "h")], b"");
        assert_eq!(claimed_access_key_id(&req.signed()), None);
    }

    /// Requests captured from botocore 1.44 (boto3's signer) at 2026-12-05T09:43:19Z with the
    /// suite's example key: an SQS client's JSON SendMessage as sent (the Host header added
    /// as urllib3 adds it), a query-protocol form POST to a path with an escape (signed by its
    /// SigV4Auth, which encodes the path again), and a presigned GET (SigV4QueryAuth).
    #[test]
    fn botocore_signed_requests_verify() {
        let when = at(1_796_463_799);
        let json_body = r#"{"QueueUrl": "http://localhost:9324/000000000000/q1", "MessageBody": "hello w\u00f6rld  +&=", "MessageAttributes": {"a": {"DataType": "String", "StringValue": "x"}}}"#;
        let json = Req::new(
            "POST",
            "/",
            &[
                ("Host", "localhost:9324"),
                ("X-Amz-Target", "AmazonSQS.SendMessage"),
                ("Content-Type", "application/x-amz-json-1.0"),
                ("x-amzn-query-mode", "true"),
                (
                    "User-Agent",
                    "Botocore/1.44.18 ua/2.1 os/linux#6.18.44-fc-v1272 md/arch#x86_64 lang/python#3.11.7 md/pyimpl#CPython m/E,Z,N,e,b cfg/retry-mode#standard",
                ),
                ("X-Amz-Date", "20261205T094319Z"),
                (
                    "Authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261205/us-east-1/sqs/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target;x-amzn-query-mode, Signature=e21fd2bb755cd2b5b37ef24e1fccfa617519ce000aa1a796491dba9234cfbb08",
                ),
                (
                    "amz-sdk-invocation-id",
                    "fbcf87f7-c5ed-444c-91dc-56cb1c791cc3",
                ),
                ("amz-sdk-request", "attempt=1; max=3"),
                ("Content-Length", "165"),
            ],
            json_body.as_bytes(),
        );
        assert_eq!(ok(json.verify_at(when)).service, "sqs");

        let form = Req::new(
            "POST",
            "/000000000000/q%201",
            &[
                ("Host", "localhost:9324"),
                (
                    "Content-Type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                ),
                ("X-Amz-Date", "20261205T094319Z"),
                (
                    "Authorization",
                    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261205/us-east-1/sqs/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=047b1cf80ef71e7aa1762d402560adbfe7c45880365b0efb77512518b7510bf5",
                ),
                ("Content-Length", "59"),
            ],
            b"Action=SendMessage&MessageBody=a%20b%2Bc&Version=2012-11-05",
        );
        ok(form.verify_at(when));
        // Signed over the path encoded once more; the single-encoded reading must not pass.
        let mut single = form;
        single.path = "/000000000000/q 1".into();
        assert_eq!(
            single.verify_at(when),
            Err(SigV4Error::SignatureDoesNotMatch)
        );

        let presigned = Req::new(
            "GET",
            "/000000000000/q1?Action=ReceiveMessage&MaxNumberOfMessages=10&AttributeName.1=All&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20261205%2Fus-east-1%2Fsqs%2Faws4_request&X-Amz-Date=20261205T094319Z&X-Amz-Expires=300&X-Amz-SignedHeaders=host&X-Amz-Signature=419491ef9c06ce3f0337a23d77acc26f59d9b7f22038a912a8526fb254c28daa",
            &[("Host", "localhost:9324")],
            b"",
        );
        ok(presigned.verify_at(when + Duration::from_secs(300)));
        assert!(matches!(
            presigned.verify_at(when + Duration::from_secs(301)),
            Err(SigV4Error::Expired(_))
        ));
    }

    #[test]
    fn wrong_secret_does_not_match() {
        let mut signer = Signer::sqs(now());
        signer.secret = "not-the-secret";
        let req = boto3_json_send(&signer);
        let e = err(req.verify_at(now()));
        assert_eq!(e, SigV4Error::SignatureDoesNotMatch);
        assert_eq!(e.aws_code(), "SignatureDoesNotMatch");
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
    }

    #[test]
    fn unknown_access_key_is_invalid_client_token() {
        let mut signer = Signer::sqs(now());
        signer.akid = "AKIDUNKNOWN";
        let e = err(boto3_json_send(&signer).verify_at(now()));
        assert_eq!(e, SigV4Error::InvalidClientTokenId);
        assert_eq!(e.aws_code(), "InvalidClientTokenId");
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            e.to_string(),
            "The security token included in the request is invalid."
        );
    }

    #[test]
    fn clock_skew_past_15_minutes_is_refused() {
        let req = boto3_json_send(&Signer::sqs(now()));
        ok(req.verify_at(now() + Duration::from_secs(15 * 60)));
        ok(req.verify_at(now() - Duration::from_secs(15 * 60)));
        let e = err(req.verify_at(now() + Duration::from_secs(15 * 60 + 1)));
        assert_eq!(e.aws_code(), "SignatureDoesNotMatch");
        assert_eq!(e.status(), StatusCode::FORBIDDEN);
        assert_eq!(
            e.to_string(),
            "Signature expired: 20251205T113000Z is now earlier than 20251205T113001Z (20251205T114501Z - 15 min.)"
        );
        let e = err(req.verify_at(now() - Duration::from_secs(15 * 60 + 1)));
        assert_eq!(e.aws_code(), "SignatureDoesNotMatch");
        assert_eq!(
            e.to_string(),
            "Signature not yet current: 20251205T113000Z is still later than 20251205T112959Z (20251205T111459Z + 15 min.)"
        );
    }

    #[test]
    fn tampered_body_does_not_match() {
        let mut req = boto3_json_send(&Signer::sqs(now()));
        req.body = JSON_SEND.replace("hello", "jello").into_bytes();
        assert_eq!(req.verify_at(now()), Err(SigV4Error::SignatureDoesNotMatch));
    }

    #[test]
    fn claimed_body_hash_is_checked_against_the_body() {
        let mut signer = Signer::sqs(now());
        signer.settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        let mut req = boto3_json_send(&signer);
        ok(req.verify_at(now()));
        // The header still claims the signed body's hash; the body is another one.
        req.body.push(b' ');
        assert_eq!(req.verify_at(now()), Err(SigV4Error::SignatureDoesNotMatch));
    }

    #[test]
    fn unsigned_payload_header_leaves_the_body_out() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("localhost:9324"));
        headers.insert("x-amz-date", HeaderValue::from_static("20251205T113000Z"));
        headers.insert(
            "x-amz-content-sha256",
            HeaderValue::from_static("UNSIGNED-PAYLOAD"),
        );
        // Built by hand from the spec, independently of the code under test's canonicaliser.
        let canonical = "POST\n/000000000000/q1\n\nhost:localhost:9324\nx-amz-content-sha256:UNSIGNED-PAYLOAD\nx-amz-date:20251205T113000Z\n\nhost;x-amz-content-sha256;x-amz-date\nUNSIGNED-PAYLOAD";
        let sig = hand_sign(canonical, "20251205T113000Z", "sqs");
        headers.insert(
            "authorization",
            HeaderValue::from_str(&format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251205/us-east-1/sqs/aws4_request, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={sig}"
            ))
            .unwrap(),
        );
        for body in [&b""[..], b"anything at all"] {
            let req = SignedRequest {
                method: "POST",
                path: "/000000000000/q1",
                query: "",
                headers: &headers,
                body,
            };
            ok(verify(&req, secrets, now()));
        }
    }

    fn hand_sign(canonical: &str, amz_date: &str, service: &str) -> String {
        let sts = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{}/us-east-1/{service}/aws4_request\n{}",
            &amz_date[..8],
            hex(&Sha256::digest(canonical.as_bytes()))
        );
        hex(&hmac(
            &signing_key(SECRET, &amz_date[..8], "us-east-1", service),
            sts.as_bytes(),
        ))
    }

    #[test]
    fn date_header_instead_of_x_amz_date() {
        let canonical = "GET\n/\nAction=ListQueues\ndate:Fri, 05 Dec 2025 11:30:00 GMT\nhost:localhost:9324\n\ndate;host\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let sig = hand_sign(canonical, "20251205T113000Z", "sqs");
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251205/us-east-1/sqs/aws4_request, SignedHeaders=date;host, Signature={sig}"
        );
        let req = Req::new(
            "GET",
            "/?Action=ListQueues",
            &[
                ("Host", "localhost:9324"),
                ("Date", "Fri, 05 Dec 2025 11:30:00 GMT"),
                ("Authorization", &auth),
            ],
            b"",
        );
        ok(req.verify_at(now()));
        let mut bad = req;
        bad.set("date", "Fri, 05 Dec 2025 11:30:01 GMT");
        assert_eq!(bad.verify_at(now()), Err(SigV4Error::SignatureDoesNotMatch));
        bad.set("date", "yesterday");
        assert_eq!(err(bad.verify_at(now())).aws_code(), "IncompleteSignature");
    }

    #[test]
    fn signed_header_changed_does_not_match() {
        let mut req = boto3_json_send(&Signer::sqs(now()));
        req.set("x-amz-target", "AmazonSQS.DeleteQueue");
        assert_eq!(req.verify_at(now()), Err(SigV4Error::SignatureDoesNotMatch));

        let mut req = boto3_json_send(&Signer::sqs(now()));
        req.headers
            .append("x-amz-target", HeaderValue::from_static("x"));
        assert_eq!(req.verify_at(now()), Err(SigV4Error::SignatureDoesNotMatch));

        let mut req = boto3_json_send(&Signer::sqs(now()));
        req.set("host", "elsewhere:9324");
        assert_eq!(req.verify_at(now()), Err(SigV4Error::SignatureDoesNotMatch));

        let mut req = boto3_json_send(&Signer::sqs(now()));
        req.method = "PUT".into();
        assert_eq!(req.verify_at(now()), Err(SigV4Error::SignatureDoesNotMatch));

        let mut req = boto3_json_send(&Signer::sqs(now()));
        req.path = "/000000000000/q1".into();
        assert_eq!(req.verify_at(now()), Err(SigV4Error::SignatureDoesNotMatch));

        let mut req = boto3_json_send(&Signer::sqs(now()));
        req.query = "Action=PurgeQueue".into();
        assert_eq!(req.verify_at(now()), Err(SigV4Error::SignatureDoesNotMatch));
    }

    #[test]
    fn unsigned_header_changed_still_verifies() {
        let mut req = boto3_json_send(&Signer::sqs(now()));
        // The SDK's signer leaves user-agent out of SignedHeaders.
        req.set("user-agent", "something else entirely");
        req.set("x-forwarded-for", "10.1.2.3");
        ok(req.verify_at(now()));
    }

    fn auth_req(auth: &str) -> Req {
        Req::new(
            "POST",
            "/",
            &[
                ("Host", "localhost:9324"),
                ("X-Amz-Date", "20251205T113000Z"),
                ("Authorization", auth),
            ],
            b"",
        )
    }

    const GOOD_SIG: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn malformed_authorization_headers() {
        let incomplete = [
            "",
            "AWS4-HMAC-SHA256",
            "AWS4-HMAC-SHA256 ",
            "AWS AKIDEXAMPLE:c2lnbmF0dXJl",
            "AWS4-HMAC-SHA1 Credential=AKIDEXAMPLE/20251205/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251205/us-east-1/sqs/aws4_request, SignedHeaders=host",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251205/us-east-1/sqs/aws4_request, Signature=00",
            "AWS4-HMAC-SHA256 SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 Credential= AKIDEXAMPLE/20251205/us-east-1/sqs/aws4_request SignedHeaders=host Signature=00",
            "AWS4-HMAC-SHA256 Credential AKIDEXAMPLE/20251205/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251205/us-east-1/sqs/aws4_request/x, SignedHeaders=host, Signature=00",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251205/us-east-1/sqs/aws4_request, SignedHeaders=host;;x-amz-date, Signature=00",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251205/us-east-1/sqs/aws4_request, SignedHeaders=, Signature=00",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251205/us-east-1/sqs/aws4_request, SignedHeaders=x-amz-date, Signature=00",
            "AWS4-HMAC-SHA256 Credential=a/b/c/d/aws4_request, Credential=a/b/c/d/aws4_request, SignedHeaders=host, Signature=00",
        ];
        for auth in incomplete {
            let e = err(auth_req(auth).verify_at(now()));
            assert!(
                matches!(e, SigV4Error::IncompleteSignature(_)),
                "{auth:?}: {e:?}"
            );
            assert_eq!(e.aws_code(), "IncompleteSignature");
            assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        }

        let e = err(auth_req("AWS4-HMAC-SHA256 SignedHeaders=host").verify_at(now()));
        assert_eq!(
            e.to_string(),
            "Authorization header requires 'Credential' parameter. Authorization header requires 'Signature' parameter. Authorization=AWS4-HMAC-SHA256 SignedHeaders=host"
        );

        // Scope problems are answered as a signature that does not match, saying why.
        let scope = [
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251205/us-east-1/sqs/aws5_request, SignedHeaders=host;x-amz-date, Signature={GOOD_SIG}"
            ),
            format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251204/us-east-1/sqs/aws4_request, SignedHeaders=host;x-amz-date, Signature={GOOD_SIG}"
            ),
        ];
        for auth in &scope {
            let e = err(auth_req(auth).verify_at(now()));
            assert!(matches!(e, SigV4Error::BadScope(_)), "{auth:?}: {e:?}");
            assert_eq!(e.aws_code(), "SignatureDoesNotMatch");
            assert_eq!(e.status(), StatusCode::FORBIDDEN);
        }

        // Signatures that are not 64 hex digits are just wrong signatures.
        for sig in [
            "",
            "zz",
            "0123",
            &GOOD_SIG.replace('0', "g"),
            &format!("{GOOD_SIG}00"),
        ] {
            let auth = format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251205/us-east-1/sqs/aws4_request, SignedHeaders=host;x-amz-date, Signature={sig}"
            );
            assert_eq!(
                auth_req(&auth).verify_at(now()),
                Err(SigV4Error::SignatureDoesNotMatch),
                "{sig:?}"
            );
        }

        // A missing or unparseable date.
        let mut req = auth_req(&format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251205/us-east-1/sqs/aws4_request, SignedHeaders=host;x-amz-date, Signature={GOOD_SIG}"
        ));
        req.set("x-amz-date", "2025-12-05T11:30:00Z");
        assert_eq!(err(req.verify_at(now())).aws_code(), "IncompleteSignature");
        req.headers.remove("x-amz-date");
        let e = err(req.verify_at(now()));
        assert!(
            e.to_string()
                .contains("requires existence of either a 'X-Amz-Date' or a 'Date' header"),
            "{e}"
        );
    }

    #[test]
    fn unsigned_and_doubly_signed_requests() {
        let req = Req::new("GET", "/?Action=ListQueues", &[("Host", "h")], b"");
        assert!(!is_signed(&req.signed()));
        let e = err(req.verify_at(now()));
        assert_eq!(e, SigV4Error::MissingAuthenticationToken);
        assert_eq!(e.aws_code(), "MissingAuthenticationToken");
        assert_eq!(e.status(), StatusCode::FORBIDDEN);

        // Both mechanisms at once is ambiguous.
        let req = Req::new(
            "GET",
            "/?X-Amz-Algorithm=AWS4-HMAC-SHA256",
            &[("Host", "h"), ("Authorization", "AWS4-HMAC-SHA256 x=y")],
            b"",
        );
        assert!(is_signed(&req.signed()));
        assert_eq!(err(req.verify_at(now())).aws_code(), "IncompleteSignature");

        // Two Authorization headers.
        let req = Req::new(
            "GET",
            "/",
            &[
                ("Host", "h"),
                ("Authorization", "a"),
                ("Authorization", "b"),
            ],
            b"",
        );
        assert_eq!(err(req.verify_at(now())).aws_code(), "IncompleteSignature");

        // An encoded parameter name counts.
        let req = Req::new("GET", "/?X-Amz-%41lgorithm=x", &[("Host", "h")], b"");
        assert!(is_signed(&req.signed()));
    }

    #[test]
    fn malformed_presigned_queries() {
        let base = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20251205%2Fus-east-1%2Fsqs%2Faws4_request&X-Amz-Date=20251205T113000Z&X-Amz-Expires=300&X-Amz-SignedHeaders=host&X-Amz-Signature=00";
        let check = |query: String, code: &str| {
            let req = Req::new("GET", &format!("/?{query}"), &[("Host", "h")], b"");
            let e = err(req.verify_at(now()));
            assert_eq!(e.aws_code(), code, "{query}: {e:?}");
        };
        check(base.to_string(), "SignatureDoesNotMatch");
        for name in [
            "Credential",
            "Date",
            "Expires",
            "SignedHeaders",
            "Signature",
        ] {
            let q: Vec<&str> = base
                .split('&')
                .filter(|p| !p.starts_with(&format!("X-Amz-{name}=")))
                .collect();
            check(q.join("&"), "IncompleteSignature");
        }
        check(
            base.replace("Expires=300", "Expires=604801"),
            "IncompleteSignature",
        );
        check(
            base.replace("Expires=300", "Expires=-1"),
            "IncompleteSignature",
        );
        check(
            base.replace("Expires=300", "Expires=soon"),
            "IncompleteSignature",
        );
        check(
            base.replace("20251205T113000Z", "20251205"),
            "IncompleteSignature",
        );
        check(
            base.replace("HMAC-SHA256", "HMAC-SHA1"),
            "IncompleteSignature",
        );
        check(
            format!("{base}&X-Amz-Date=20251205T113000Z"),
            "IncompleteSignature",
        );
        check(
            base.replace("AKIDEXAMPLE", "NOBODY"),
            "InvalidClientTokenId",
        );
    }

    /// Arbitrary mutations of a valid request must end in a result, never a panic (the fuzz
    /// target explores this further).
    #[test]
    fn mutated_requests_never_panic() {
        let good = boto3_json_send(&Signer::sqs(now()));
        let auth = good.headers["authorization"].as_bytes().to_vec();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let mut a = auth.clone();
            for _ in 0..(next() % 4 + 1) {
                let i = (next() as usize) % a.len();
                match next() % 3 {
                    0 => a[i] = (next() % 256) as u8,
                    1 => {
                        a.remove(i);
                    }
                    _ => a.insert(i, b"=,/ ;%\x80"[(next() % 7) as usize]),
                }
            }
            let Ok(value) = HeaderValue::from_bytes(&a) else {
                continue;
            };
            let mut req = Req::new("POST", "/", &[], b"");
            req.headers = good.headers.clone();
            req.body = good.body.clone();
            req.headers.insert("authorization", value);
            if next() % 2 == 0 {
                req.query = String::from_utf8_lossy(&a).replace(['#', ' '], "&");
            }
            let _ = req.verify_at(now());
        }
        // Huge values.
        let big = "A".repeat(1 << 20);
        let mut req = auth_req(&format!(
            "AWS4-HMAC-SHA256 Credential={big}/20251205/us-east-1/sqs/aws4_request, SignedHeaders=host;{big}, Signature={big}"
        ));
        req.path = format!("/{}", "%".repeat(1 << 16));
        req.query = format!("{big}={big}&%=%&&=");
        let e = err(req.verify_at(now()));
        assert!(e.to_string().len() < 4096);
        // The same with a known key, so the huge and invalid names reach the canonicaliser.
        req.set(
            "authorization",
            &format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251205/us-east-1/sqs/aws4_request, SignedHeaders=host;{big};bad name;a(b);:authority;{}x, Signature={GOOD_SIG}",
                "x;".repeat(50_000)
            ),
        );
        assert_eq!(req.verify_at(now()), Err(SigV4Error::SignatureDoesNotMatch));
        // Non-UTF-8 header values.
        let mut req = auth_req("x");
        req.headers.insert(
            "authorization",
            HeaderValue::from_bytes(b"AWS4-HMAC-SHA256 Credential=\xff\xfe").unwrap(),
        );
        assert_eq!(err(req.verify_at(now())).aws_code(), "IncompleteSignature");
        req.headers
            .insert("x-amz-date", HeaderValue::from_bytes(b"\xff\xfe").unwrap());
        let _ = req.verify_at(now());
        // Clocks at the ends of time.
        let _ = good.verify_at(UNIX_EPOCH);
        let _ = good.verify_at(UNIX_EPOCH - Duration::from_secs(1 << 40));
        let _ = good.verify_at(UNIX_EPOCH + Duration::from_secs(1 << 50));
    }
}
