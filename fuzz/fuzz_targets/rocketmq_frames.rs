//! RocketMQ Remoting: the frame and header decoders (JSON and binary headers) over
//! arbitrary bytes, then the batch and properties decoders over each decoded body. None may
//! panic; a frame that decodes must encode and decode back to itself.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tributary_gateway_rocketmq::{frame, message};

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(cmd)) = frame::decode(&mut buf) {
        let _ = message::decode_batch(cmd.body.clone());
        if let Ok(s) = std::str::from_utf8(&cmd.body) {
            let _ = message::decode_properties(s);
        }
        let mut again = BytesMut::from(&cmd.encode()[..]);
        let back = frame::decode(&mut again).expect("re-encoded frame decodes");
        assert_eq!(back.as_ref().map(|c| c.code), Some(cmd.code));
    }
    let _ = message::decode_batch(Bytes::copy_from_slice(data));
});
