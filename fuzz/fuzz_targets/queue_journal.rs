//! A queue's state journal as read back at start-up: arbitrary bytes decoded as journal
//! batches and replayed, then the rebuilt state used. It must end (no loop over a huge
//! offset) and never panic; a bad journal is reported as corruption.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tributary_core::fuzzing::queue_journal(data);
});
