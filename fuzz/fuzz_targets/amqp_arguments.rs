//! Arbitrary bytes as the field tables and content-header properties an AMQP client's
//! methods carry to the gateway's broker (queue x-arguments, exchange and binding
//! arguments, message properties): parsed and mapped onto the core's model, and a record
//! made of them turned back into a delivery. It must end in a value or an error, never a
//! panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tributary_gateway_amqp::decode_arguments(data);
});
