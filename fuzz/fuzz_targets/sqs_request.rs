//! The SQS gateway's request parsers (AWS JSON 1.0 bodies and query-protocol forms) and the
//! parameter checks behind them, on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tributary_gateway_sqs::fuzz_request(data);
});
