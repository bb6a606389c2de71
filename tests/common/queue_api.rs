//! A plain tonic client of the core's Admin, Queues and Streams services, with the calls
//! the queue engine and router tests make.

use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tributary_proto::v1::{
    self, admin_client::AdminClient, queues_client::QueuesClient, streams_client::StreamsClient,
};

use super::Server;

pub struct Api {
    pub admin: AdminClient<Channel>,
    pub queues: QueuesClient<Channel>,
    pub streams: StreamsClient<Channel>,
}

pub async fn api(server: &Server) -> Api {
    let channel = Channel::from_shared(format!("http://{}", server.core))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Api {
        admin: AdminClient::new(channel.clone()),
        queues: QueuesClient::new(channel.clone()),
        streams: StreamsClient::new(channel),
    }
}

pub fn qid(name: &str) -> Option<v1::QueueId> {
    Some(v1::QueueId {
        namespace: "default".into(),
        name: name.into(),
    })
}

/// A leased message's value as text.
pub fn text(m: &v1::LeasedMessage) -> String {
    String::from_utf8(m.record.as_ref().unwrap().value.to_vec()).unwrap()
}

impl Api {
    pub async fn declare(&mut self, name: &str, config: v1::QueueConfig) -> v1::QueueInfo {
        self.admin
            .declare_queue(v1::DeclareQueueRequest {
                id: qid(name),
                config: Some(config),
                durable: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .queue
            .unwrap()
    }

    pub async fn info(&mut self, name: &str) -> v1::QueueInfo {
        self.admin
            .declare_queue(v1::DeclareQueueRequest {
                id: qid(name),
                passive: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .queue
            .unwrap()
    }

    pub async fn send(&mut self, queue: &str, records: Vec<v1::Record>) -> v1::EnqueueResponse {
        self.queues
            .enqueue(v1::EnqueueRequest {
                queue: qid(queue),
                records,
            })
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn receive(
        &mut self,
        queue: &str,
        max: u32,
        visibility_ms: i64,
        wait_ms: i32,
    ) -> Vec<v1::LeasedMessage> {
        self.queues
            .receive(v1::ReceiveRequest {
                queue: qid(queue),
                max_messages: max,
                visibility_timeout_ms: visibility_ms,
                wait_time_ms: wait_ms,
                consumer: String::new(),
                no_wait_durable: false,
            })
            .await
            .unwrap()
            .into_inner()
            .messages
    }

    pub async fn ack(&mut self, queue: &str, leases: &[&v1::LeasedMessage]) -> Vec<String> {
        self.queues
            .ack(v1::AckRequest {
                queue: qid(queue),
                lease_ids: leases.iter().map(|m| m.lease_id.clone()).collect(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .expired
    }

    /// Receives until `n` messages came or `limit` passed (long polls, no sleeps).
    pub async fn receive_n(
        &mut self,
        queue: &str,
        n: usize,
        visibility_ms: i64,
        limit: Duration,
    ) -> Vec<v1::LeasedMessage> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            out.extend(
                self.receive(queue, (n - out.len()) as u32, visibility_ms, 2_000)
                    .await,
            );
        }
        out
    }
}

impl Api {
    /// Receives and acks exactly `n` messages (long polls; fails after 20 s).
    pub async fn receive_all(&mut self, queue: &str, n: usize) -> Vec<v1::LeasedMessage> {
        let got = self
            .receive_n(queue, n, 60_000, Duration::from_secs(20))
            .await;
        assert_eq!(got.len(), n, "only {} of {n} from {queue}", got.len());
        let leases: Vec<&v1::LeasedMessage> = got.iter().collect();
        assert!(self.ack(queue, &leases).await.is_empty());
        got
    }

    /// Polls the queue's counts until `cond` holds, failing after 20 s (for state the core
    /// reaches on its own time, such as the end of a subscription it has not noticed yet).
    pub async fn wait_info(
        &mut self,
        queue: &str,
        what: &str,
        cond: impl Fn(&v1::QueueInfo) -> bool,
    ) -> v1::QueueInfo {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let info = self.info(queue).await;
            if cond(&info) {
                return info;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything ready in the queue now, received and acked, as text.
    pub async fn drain(&mut self, queue: &str) -> Vec<String> {
        let got = self.receive(queue, 100, 30_000, 0).await;
        if !got.is_empty() {
            let leases: Vec<&v1::LeasedMessage> = got.iter().collect();
            assert!(self.ack(queue, &leases).await.is_empty());
        }
        got.iter().map(text).collect()
    }
}
