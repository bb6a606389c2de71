//! Arbitrary bytes as the records of one partition in a Produce request: batch splitting
//! and header checks must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tributary_gateway_kafka::batch::split_batches(bytes::Bytes::copy_from_slice(data));
});
