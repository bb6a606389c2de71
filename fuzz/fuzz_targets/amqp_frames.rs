//! Arbitrary bytes as what an AMQP client sends after the handshake: frames cut by the
//! gateway's reader, method payloads and content-header properties decoded. It must end in
//! frames or an error, never a panic or an allocation beyond frame_max.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tributary_gateway_amqp::decode_stream(data);
});
