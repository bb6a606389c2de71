//! SQS-compatible gateway: AWS JSON 1.0 (`X-Amz-Target: AmazonSQS.<Action>`) and the query
//! protocol (form POST, XML answers) over HTTP/1.1, SigV4-verified, serving SQS queues that
//! are core queues (the core's queue engine gives visibility, delays, dead letters, FIFO
//! groups and deduplication; this crate translates).
pub mod sigv4;
