//! Arbitrary bytes as a request to the SQS gateway's SigV4 verifier: the method, path, query,
//! headers and body a client controls, and a clock. Verification must end in `Ok` or an
//! error that knows its AWS code, never a panic; a known access key is configured so that
//! inputs get past the key lookup into canonicalisation and the HMAC.
//!
//! Layout: 8 bytes of clock (seconds from 2015-08-30, so the suite's dates are near), then
//! lines: method, path, query, `name:value` header lines up to an empty line, and the rest
//! is the body. Header lines that are not valid HTTP are dropped, as hyper would refuse them.
#![no_main]
use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use tributary_gateway_sqs::sigv4::{SignedRequest, is_signed, verify};

fuzz_target!(|data: &[u8]| {
    let Some((clock, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    // Up to ±2^31 s around the suite's date, wide enough for every expiry branch.
    let offset = i64::from(i32::from_le_bytes([clock[0], clock[1], clock[2], clock[3]]));
    let base = UNIX_EPOCH + Duration::from_secs(1_440_938_160);
    let now = if offset >= 0 {
        base + Duration::from_secs(offset.unsigned_abs())
    } else {
        base - Duration::from_secs(offset.unsigned_abs())
    };

    let mut lines = rest.splitn(4, |b| *b == b'\n');
    let method = String::from_utf8_lossy(lines.next().unwrap_or_default());
    let path = String::from_utf8_lossy(lines.next().unwrap_or_default());
    let query = String::from_utf8_lossy(lines.next().unwrap_or_default());
    let mut tail = lines.next().unwrap_or_default();

    let mut headers = HeaderMap::new();
    while !tail.is_empty() {
        let (line, after) = match tail.iter().position(|b| *b == b'\n') {
            Some(i) => (&tail[..i], &tail[i + 1..]),
            None => (tail, &tail[tail.len()..]),
        };
        tail = after;
        if line.is_empty() {
            break;
        }
        if let Some(colon) = line.iter().position(|b| *b == b':')
            && let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(&line[..colon]),
                HeaderValue::from_bytes(&line[colon + 1..]),
            )
        {
            headers.append(name, value);
        }
    }

    let req = SignedRequest {
        method: &method,
        path: &path,
        query: &query,
        headers: &headers,
        body: tail,
    };
    let signed = is_signed(&req);
    let secret_for = |akid: &str| {
        (akid == "AKIDEXAMPLE").then(|| "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".to_string())
    };
    match verify(&req, secret_for, now) {
        Ok(v) => {
            assert!(signed);
            let _ = v.check_scope("us-east-1", "sqs");
        }
        Err(e) => {
            let _ = (e.aws_code(), e.status(), e.to_string());
        }
    }
});
