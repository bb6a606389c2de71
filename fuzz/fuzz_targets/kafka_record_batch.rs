//! Arbitrary bytes as the records of one partition in a Produce request: batch splitting
//! and header checks must never panic, nor must decoding them into envelope records (what
//! the MQTT forwarder does with a stored Kafka batch, tributary-mapping).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    let _ = tributary_gateway_kafka::batch::split_batches(bytes.clone());
    let _ = tributary_mapping::kafka::decode_batch(&bytes);
});
