//! Arbitrary bytes as what a client sends on a fresh MQTT connection: version detection on
//! CONNECT, then packets of that version. Decoding must end in a packet or an error, never
//! a panic or an unbounded allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tributary_gateway_mqtt::decode_stream(data);
});
