//! A stream as an address of the router (kind STREAM; AMQP's `x-stream` exchange): every
//! stream has one of its name in its namespace (docs/compat/mapping.md, "Streams as AMQP
//! exchanges").
//!
//! Publishing to it appends to the stream (the routing key as the record key, so one key
//! keeps its order in one partition). Its bindings are not followed when publishing:
//! records reach the bound queues from the stream, through the stream's forwarder
//! (topic_streams.rs), whoever appended them (Kafka, RocketMQ, MQTT, AMQP, the core API),
//! so that every queue sees the stream's order and nothing that is not in the stream.
//! Bindings are fanout: the binding key is ignored. They lead to queues, directly or
//! through other addresses; streams reached that way are skipped (a record read from a
//! stream appended to a stream could come back round for ever).
//!
//! The address is made with the stream (or, for a stream of an earlier version, when the
//! core opens) unless an address of that name exists already, and goes with the stream.
//! Deleting it on its own is refused.

use std::collections::BTreeSet;

use tracing::{debug, info};
use tributary_proto::v1::{self, AddressKind};

use super::{ADDRESS_KEY, AddressRecord, Target};
use crate::error::{CoreError, CoreResult};
use crate::meta::{self, to_json};
use crate::queues::EnqueueMode;
use crate::{Core, now_ms};

impl Core {
    /// Makes the stream's address, unless an address of that name exists. The caller holds
    /// the admin lock (or the core is opening).
    pub(crate) async fn ensure_stream_address(&self, ns: &str, name: &str) -> CoreResult<()> {
        if !self.inner.config.stream_exchanges || self.address(ns, name).is_ok() {
            return Ok(());
        }
        let record = AddressRecord {
            kind: AddressKind::Stream as i32,
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: Vec::new(),
            created_at_ms: now_ms(),
        };
        self.inner
            .meta
            .put(&meta::key(ADDRESS_KEY, &[ns, name]), &to_json(&record))
            .await?;
        self.open_address(ns, name, record, Vec::new())?;
        debug!(namespace = %ns, address = %name, "stream address made");
        Ok(())
    }

    /// Makes the addresses of the streams that have none (streams of an earlier version).
    pub(crate) async fn ensure_stream_addresses(&self) -> CoreResult<()> {
        let names: Vec<(String, String)> = self.inner.streams.read().keys().cloned().collect();
        for (ns, name) in names {
            self.ensure_stream_address(&ns, &name).await?;
        }
        Ok(())
    }

    /// Removes a deleted stream's address and its bindings. The caller holds the admin lock.
    pub(crate) async fn drop_stream_address(&self, ns: &str, name: &str) -> CoreResult<()> {
        if self.is_stream_address(ns, name) && self.drop_address(ns, name).await? {
            self.forget_target(ns, &Target::Address(name.to_string()))
                .await?;
            info!(namespace = %ns, address = %name, "stream address deleted with its stream");
        }
        Ok(())
    }

    pub(crate) fn is_stream_address(&self, ns: &str, name: &str) -> bool {
        self.address(ns, name)
            .is_ok_and(|a| a.record.kind == AddressKind::Stream as i32)
    }

    /// Whether the stream's address has bindings (its forwarder then reads the stream).
    pub(crate) fn stream_address_bound(&self, ns: &str, name: &str) -> bool {
        self.address(ns, name).is_ok_and(|a| {
            a.record.kind == AddressKind::Stream as i32 && !a.bindings.read().all.is_empty()
        })
    }

    /// Routes records read from stream `name` to the queues its address is bound to.
    pub(crate) async fn route_to_stream_bindings(
        &self,
        ns: &str,
        name: &str,
        mut records: Vec<v1::Record>,
    ) -> CoreResult<()> {
        let Ok(a) = self.address(ns, name) else {
            return Ok(());
        };
        let bindings: Vec<Target> = a
            .bindings
            .read()
            .all
            .iter()
            .map(|b| b.target.clone())
            .collect();
        for r in &mut records {
            let p = r.properties.get_or_insert_default();
            p.publish_address = name.to_string();
            p.address = String::from_utf8_lossy(&r.key).into_owned();
        }
        let keyed = bindings.iter().any(|t| matches!(t, Target::Address(_)));
        let mut groups: Vec<(BTreeSet<Target>, Vec<v1::Record>)> = Vec::new();
        for r in records {
            let mut targets = BTreeSet::new();
            for t in &bindings {
                match t {
                    Target::Address(next) => {
                        let key = r.properties.as_ref().map_or("", |p| p.address.as_str());
                        self.resolve(ns, next, key, &r.headers, &mut targets)?;
                    }
                    t => {
                        targets.insert(t.clone());
                    }
                }
            }
            targets.retain(|t| matches!(t, Target::Queue(_)));
            match groups.last_mut() {
                Some((last, rs)) if !keyed || *last == targets => rs.push(r),
                _ => groups.push((targets, vec![r])),
            }
        }
        for (targets, rs) in groups {
            for t in &targets {
                self.deliver_to(ns, t, rs.clone(), EnqueueMode::Internal)
                    .await?;
            }
        }
        Ok(())
    }
}

/// A binding of a stream address to a stream is refused (it could loop).
pub(super) fn check_binding(kind: i32, target: &Target) -> CoreResult<()> {
    if kind == AddressKind::Stream as i32 && matches!(target, Target::Stream(_)) {
        return Err(CoreError::InvalidArgument(
            "a stream's address binds to queues and addresses, not to streams".into(),
        ));
    }
    Ok(())
}
