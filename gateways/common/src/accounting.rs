//! Connection metrics, per listener: how many are open, how many were accepted, and how many
//! the accept loop closed before a gateway saw them (and why).

/// Counts a live connection in `tributary_connections{listener=...}` until dropped.
pub struct ConnectionGuard {
    listener: &'static str,
}

impl ConnectionGuard {
    pub fn new(listener: &'static str) -> Self {
        metrics::gauge!("tributary_connections", "listener" => listener).increment(1.0);
        metrics::counter!("tributary_connections_accepted_total", "listener" => listener)
            .increment(1);
        Self { listener }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        metrics::gauge!("tributary_connections", "listener" => self.listener).decrement(1.0);
    }
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
