//! Arbitrary bytes as one Kafka request frame (after the size prefix): decoding must return
//! a value or an error, never panic, whatever the API key, version or body.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tributary_gateway_kafka::decode_frame(bytes::Bytes::copy_from_slice(data));
});
