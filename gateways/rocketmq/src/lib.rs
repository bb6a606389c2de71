//! The RocketMQ gateway: a NameServer and a broker speaking RocketMQ Remoting to unmodified
//! RocketMQ clients, over the core.
//!
//! A RocketMQ topic is a core stream and its queues are the stream's partitions, so Kafka
//! clients read what RocketMQ producers send and the other way round. Consumer offsets are
//! the core's committed offsets (group = consumer group); delays and retries are the core's
//! durable timers; half messages are the core's staged transactions. What the gateway keeps
//! itself is what RocketMQ's own broker keeps in memory: the connections of clients, their
//! subscriptions and queue locks.

mod admin;
mod appender;
mod clients;
pub mod codes;
mod conn;
mod envelope;
pub mod frame;
mod ids;
pub mod message;
mod namesrv;
mod pull;
mod reply;
mod send;
mod txn;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tributary_gateway_common::{Accepted, CoreClient};

pub use clients::Clients;

/// RocketMQ's delay levels (`messageDelayLevel`): level n waits `DELAY_LEVELS[n - 1]`.
pub const DELAY_LEVELS: [Duration; 18] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(120),
    Duration::from_secs(180),
    Duration::from_secs(240),
    Duration::from_secs(300),
    Duration::from_secs(360),
    Duration::from_secs(420),
    Duration::from_secs(480),
    Duration::from_secs(540),
    Duration::from_secs(600),
    Duration::from_secs(1200),
    Duration::from_secs(1800),
    Duration::from_secs(3600),
    Duration::from_secs(7200),
];

/// Everything the gateway is told at start-up.
#[derive(Debug, Clone)]
pub struct RocketMqConfig {
    /// Namespace in the core that holds the topics (the Kafka gateway's, by default).
    pub namespace: String,
    /// The broker address given to clients in routes and message ids.
    pub advertised: SocketAddr,
    pub broker_name: String,
    pub cluster_name: String,
    /// Create a topic on its first send (`autoCreateTopicEnable`).
    pub auto_create_topics: bool,
    /// Queues of an auto-created topic at most (the broker's `defaultTopicQueueNums`).
    pub default_queues: u32,
    /// `maxMessageSize`: larger bodies (after inflating) are refused.
    pub max_message_bytes: usize,
    /// How often unresolved half messages are checked back (`transactionCheckInterval`).
    pub transaction_check_interval: Duration,
    /// A half message is first checked this long after it was sent (`transactionTimeOut`).
    pub transaction_timeout: Duration,
    /// Checks without an answer before a half message is rolled back (`transactionCheckMax`).
    pub transaction_check_max: u32,
    /// This gateway has a broker listener: it renews a broker lease in the core so that
    /// every NameServer of the cluster lists it.
    pub serves_broker: bool,
}

impl RocketMqConfig {
    pub fn new(advertised: SocketAddr) -> Self {
        Self {
            namespace: "default".into(),
            advertised,
            broker_name: "tributary".into(),
            cluster_name: "DefaultCluster".into(),
            auto_create_topics: true,
            default_queues: 8,
            max_message_bytes: 4 * 1024 * 1024,
            transaction_check_interval: Duration::from_secs(60),
            transaction_timeout: Duration::from_secs(6),
            transaction_check_max: 15,
            serves_broker: true,
        }
    }
}

/// The gateway behind both listeners (NameServer and broker); any number of gateway
/// processes can front one core.
pub struct Gateway {
    pub(crate) config: RocketMqConfig,
    pub(crate) core: CoreClient,
    pub(crate) clients: Clients,
    /// Pulls skipping batches of other formats log once per interval, not once per batch.
    pub(crate) unreadable_log: RateLimitedLog,
    /// Sends to one queue coalesced into one append.
    pub(crate) appender: appender::Appender,
}

/// A log line allowed once per interval; the events in between are counted into it.
pub(crate) struct RateLimitedLog {
    interval: Duration,
    state: parking_lot::Mutex<(Option<std::time::Instant>, u64)>,
}

impl RateLimitedLog {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            state: parking_lot::Mutex::new((None, 0)),
        }
    }

    /// Counts one event; `Some(events since the last line)` when a line is due now.
    pub(crate) fn due(&self) -> Option<u64> {
        let mut s = self.state.lock();
        s.1 += 1;
        let now = std::time::Instant::now();
        if s.0
            .is_some_and(|last| now.duration_since(last) < self.interval)
        {
            return None;
        }
        let n = s.1;
        *s = (Some(now), 0);
        Some(n)
    }
}

impl Gateway {
    pub fn new(core: CoreClient, config: RocketMqConfig) -> Arc<Self> {
        let core = core.scoped(&config.namespace);
        Arc::new(Self {
            config,
            core,
            clients: Clients::default(),
            unreadable_log: RateLimitedLog::new(Duration::from_secs(10)),
            appender: Default::default(),
        })
    }

    /// The background work of a broker: checking back half messages nobody resolved,
    /// expiring clients that stopped heart-beating. Runs until `stop` turns true.
    pub async fn run_background(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut check = tokio::time::interval(self.config.transaction_check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut expire = tokio::time::interval(Duration::from_secs(10));
        expire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut lease = tokio::time::interval(clients::BROKER_TTL / 3);
        lease.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = check.tick() => txn::check_back(&self).await,
                _ = expire.tick() => clients::expire(&self).await,
                _ = lease.tick() => clients::register_broker(&self).await,
                _ = stopped(&mut stop) => return,
            }
        }
    }

    pub(crate) fn stream(&self, topic: &str) -> tributary_proto::v1::StreamId {
        tributary_proto::v1::StreamId {
            namespace: self.config.namespace.clone(),
            name: topic.to_string(),
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone); holds no borrow of the value
/// across an await, so the background task stays `Send`.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

impl<S> tributary_gateway_common::Gateway<S> for Gateway
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn serve_connection(self: Arc<Self>, conn: Accepted<S>, stop: watch::Receiver<bool>) {
        conn::serve_connection(self, conn, stop).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limited_log_counts_what_it_holds_back() {
        let log = RateLimitedLog::new(Duration::from_secs(3600));
        assert_eq!(log.due(), Some(1));
        assert_eq!(log.due(), None);
        assert_eq!(log.due(), None);
        let log = RateLimitedLog::new(Duration::ZERO);
        assert_eq!(log.due(), Some(1));
        assert_eq!(log.due(), Some(1));
    }
}
