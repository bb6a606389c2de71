//! Connection metrics, per listener: how many are open, how many were accepted, and how many
//! the accept loop closed before a gateway saw them (and why).

/// Counts an accepted connection in `tributary_connections{listener=...}` and
/// `tributary_connections_accepted_total`; the registry does, from its registration on
/// (a handshake in progress holds a socket too).
pub(crate) fn count_accepted(listener: &'static str) {
    metrics::gauge!("tributary_connections", "listener" => listener).increment(1.0);
    metrics::counter!("tributary_connections_accepted_total", "listener" => listener).increment(1);
}

/// Counts the end of a connection [`count_accepted`] counted.
pub(crate) fn count_ended(listener: &'static str) {
    metrics::gauge!("tributary_connections", "listener" => listener).decrement(1.0);
}

/// Counts a connection closed before its gateway served it, in
/// `tributary_connections_dropped_total{listener=...,reason=...}`.
pub(crate) fn count_dropped(listener: &'static str, reason: &'static str) {
    metrics::counter!(
        "tributary_connections_dropped_total",
        "listener" => listener,
        "reason" => reason
    )
    .increment(1);
}

/// Messages and payload bytes a connection takes in and hands out, per listener (and its
/// protocol), in `tributary_messages_{in,out}_total` and `tributary_message_bytes_{in,out}_total`.
/// The counters are looked up once per connection: counting a message is an atomic add.
#[derive(Clone)]
pub struct Traffic {
    messages_in: metrics::Counter,
    bytes_in: metrics::Counter,
    messages_out: metrics::Counter,
    bytes_out: metrics::Counter,
}

impl Traffic {
    /// The counters of `listener` (its protocol is the name up to the first `-`: `mqtt-ws`
    /// counts for `mqtt`).
    pub fn new(listener: &'static str) -> Self {
        let protocol = protocol_of(listener);
        Self {
            messages_in: metrics::counter!("tributary_messages_in_total", "listener" => listener, "protocol" => protocol),
            bytes_in: metrics::counter!("tributary_message_bytes_in_total", "listener" => listener, "protocol" => protocol),
            messages_out: metrics::counter!("tributary_messages_out_total", "listener" => listener, "protocol" => protocol),
            bytes_out: metrics::counter!("tributary_message_bytes_out_total", "listener" => listener, "protocol" => protocol),
        }
    }

    /// `n` messages of `bytes` payload bytes in all, received from the client.
    pub fn received(&self, n: u64, bytes: usize) {
        self.messages_in.increment(n);
        self.bytes_in.increment(bytes as u64);
    }

    /// `n` messages of `bytes` payload bytes in all, sent to the client.
    pub fn sent(&self, n: u64, bytes: usize) {
        self.messages_out.increment(n);
        self.bytes_out.increment(bytes as u64);
    }
}

/// The [`Traffic`] of each listener a gateway serves, looked up once per listener rather
/// than once per connection: a connection then holds one pointer, not four counter handles
/// (each an allocation of its own).
#[derive(Default)]
pub struct TrafficByListener {
    listeners: std::sync::Mutex<Vec<(&'static str, std::sync::Arc<Traffic>)>>,
}

impl TrafficByListener {
    pub fn get(&self, listener: &'static str) -> std::sync::Arc<Traffic> {
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, t)) = listeners.iter().find(|(l, _)| *l == listener) {
            return t.clone();
        }
        let traffic = std::sync::Arc::new(Traffic::new(listener));
        listeners.push((listener, traffic.clone()));
        traffic
    }
}

/// The protocol of a listener name (`kafka-tls` -> `kafka`).
pub(crate) fn protocol_of(listener: &'static str) -> &'static str {
    listener.split('-').next().unwrap_or(listener)
}
