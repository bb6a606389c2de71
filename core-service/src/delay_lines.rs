//! Delay lines: a stream whose config names a `delay_target` holds what is appended to it
//! and appends each record again to the target stream at its delivery time
//! (`properties.deliver_at_ms`; at once when unset), exactly once. This is how Kafka
//! producers delay records (the gateway maps a header onto `deliver_at_ms`,
//! docs/compat/mapping.md): the produce is answered with the record's offset in the delay
//! line, and consumers of the target see the record when it is due.
//!
//! A delay line's forwarder (topic_streams.rs, one per partition) turns the committed
//! records it reads into durable timers (timers.rs), one per run of records due at the same
//! time, and stores its position in the same metadata transaction: a crash never schedules
//! a record twice or skips one, and the timer service appends each batch exactly once.
//! Delay lines do not chain: a target may not be a delay line itself, so a record is
//! delayed once and cannot loop.

use tributary_proto::v1;
use tributary_storage::{Op, PartitionKey};

use crate::error::{CoreError, CoreResult};
use crate::meta::StreamSettings;
use crate::timers::schedule_ops;
use crate::{Core, now_ms};

/// The longest delay kept: a record due later is delivered after this long.
pub(crate) const MAX_DELAY_MS: i64 = 366 * 24 * 3600 * 1000;
/// Timers written per metadata transaction (etcd allows 128 operations in one, by default).
const TIMERS_PER_TXN: usize = 40;

/// A record of a delay line and its offset there.
pub(crate) struct DelayedRecord {
    pub offset: i64,
    pub record: v1::Record,
}

impl Core {
    /// Refuses a delay target that would make a chain or a loop: the stream itself, a
    /// target that is a delay line, or a stream that is some delay line's target.
    pub(crate) fn check_delay_target(
        &self,
        ns: &str,
        name: &str,
        settings: &StreamSettings,
    ) -> CoreResult<()> {
        let Some(target) = &settings.delay_target else {
            return Ok(());
        };
        self.refuse_when_spread("a delay line (delay_target)")?;
        if target == name {
            return Err(CoreError::InvalidConfig(format!(
                "stream '{name}' cannot be its own delay target"
            )));
        }
        if let Some(next) = self.delay_target_of(ns, target) {
            return Err(CoreError::InvalidConfig(format!(
                "delay target '{target}' is a delay line itself (for '{next}'): delay lines do not chain"
            )));
        }
        let streams = self.inner.streams.read();
        if let Some(line) = streams.values().find(|h| {
            let r = h.record.read();
            r.namespace == ns && r.settings.delay_target.as_deref() == Some(name)
        }) {
            return Err(CoreError::InvalidConfig(format!(
                "stream '{name}' is the delay target of '{}', so it cannot be a delay line",
                line.record.read().name
            )));
        }
        Ok(())
    }

    /// The stream `ns/name` is a delay line for (its `delay_target`), if it is one.
    pub(crate) fn delay_target_of(&self, ns: &str, name: &str) -> Option<String> {
        let h = self
            .stream(&v1::StreamId::new(ns.to_string(), name.to_string()))
            .ok()?;
        h.record.read().settings.delay_target.clone()
    }

    /// Schedules the records of one batch of a delay line (those at or past `from`), and
    /// stores the forwarder's position with them: `next` once the last is scheduled.
    /// `Conflict` when another forwarder of the partition scheduled them first.
    pub(crate) async fn schedule_delayed(
        &self,
        ns: &str,
        source: PartitionKey,
        target: &str,
        records: Vec<DelayedRecord>,
        next: i64,
        position_key: &[u8],
    ) -> CoreResult<()> {
        let target_id = v1::StreamId::new(ns.to_string(), target.to_string());
        let handle = self.stream(&target_id).map_err(|_| {
            CoreError::StreamNotFound(format!("delay target '{target}' (in namespace '{ns}')"))
        })?;
        if handle.record.read().settings.delay_target.is_some() {
            return Err(CoreError::InvalidConfig(format!(
                "delay target '{target}' is a delay line itself"
            )));
        }
        let partition = source.partition % handle.record.read().partitions.max(1);
        let now = now_ms();
        let timers = group_by_due(records, now)
            .into_iter()
            .map(|(due, offset, records)| v1::Timer {
                id: format!(
                    "delay-{:016x}-{:08x}-{offset:020}",
                    source.stream_id, source.partition
                ),
                due_at_ms: due,
                namespace: ns.to_string(),
                action: Some(v1::timer::Action::Append(v1::AppendRequest {
                    stream: Some(target_id.clone()),
                    partition,
                    batch: Some(v1::RecordBatch {
                        record_count: records.len() as u32,
                        max_timestamp_ms: records.iter().map(|r| r.timestamp_ms).max().unwrap_or(0),
                        records,
                        ..Default::default()
                    }),
                    auto_create: false,
                    defer_durable: false,
                })),
            })
            .collect::<Vec<_>>();
        let chunks: Vec<&[v1::Timer]> = timers.chunks(TIMERS_PER_TXN).collect();
        if chunks.is_empty() {
            // Nothing to schedule (markers, aborted records): only the position moves.
            self.inner
                .meta
                .put(position_key, next.to_string().as_bytes())
                .await?;
            return Ok(());
        }
        for (i, chunk) in chunks.iter().enumerate() {
            // The first offset the next chunk starts with, or the batch's end.
            let position = match chunks.get(i + 1) {
                Some(c) => offset_of(&c[0]),
                None => next,
            };
            let mut checks = Vec::with_capacity(chunk.len());
            let mut ops = Vec::with_capacity(chunk.len() * 2 + 1);
            for t in *chunk {
                schedule_ops(t, &mut checks, &mut ops);
            }
            ops.push(Op::Put {
                key: position_key.to_vec(),
                value: position.to_string().into_bytes(),
            });
            if !self.inner.meta.txn(checks, ops).await? {
                return Err(CoreError::Conflict(
                    "these delayed records were scheduled by another forwarder".into(),
                ));
            }
            metrics::gauge!("tributary_timers_pending").increment(chunk.len() as f64);
            metrics::counter!("tributary_delayed_records_total")
                .increment(chunk.iter().map(record_count).sum::<u64>());
            self.inner.timers_changed.notify_one();
        }
        Ok(())
    }
}

fn offset_of(t: &v1::Timer) -> i64 {
    t.id.rsplit('-')
        .next()
        .and_then(|o| o.parse().ok())
        .unwrap_or(0)
}

fn record_count(t: &v1::Timer) -> u64 {
    match &t.action {
        Some(v1::timer::Action::Append(a)) => {
            a.batch.as_ref().map_or(0, |b| b.records.len() as u64)
        }
        _ => 0,
    }
}

/// When a record is due: its `deliver_at_ms`, at once when unset or past, and at most
/// [`MAX_DELAY_MS`] from `now`.
pub(crate) fn due_at(record: &v1::Record, now: i64) -> i64 {
    let at = record.properties.as_ref().map_or(0, |p| p.deliver_at_ms);
    at.clamp(now, now.saturating_add(MAX_DELAY_MS))
}

/// Runs of consecutive records due at the same time: (due, first offset, records). Records
/// due at once all share `now`, so an undelayed batch makes one timer.
fn group_by_due(records: Vec<DelayedRecord>, now: i64) -> Vec<(i64, i64, Vec<v1::Record>)> {
    let mut groups: Vec<(i64, i64, Vec<v1::Record>)> = Vec::new();
    for d in records {
        let due = due_at(&d.record, now);
        match groups.last_mut() {
            Some((g_due, _, g)) if *g_due == due => g.push(d.record),
            _ => groups.push((due, d.offset, vec![d.record])),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(at: i64) -> v1::Record {
        v1::Record {
            properties: Some(v1::SystemProperties {
                deliver_at_ms: at,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn delivery_times_are_clamped_to_now_and_a_year() {
        let now = 1_000_000;
        assert_eq!(due_at(&rec(0), now), now);
        assert_eq!(due_at(&rec(5), now), now);
        assert_eq!(due_at(&rec(now + 7), now), now + 7);
        assert_eq!(due_at(&rec(i64::MAX), now), now + MAX_DELAY_MS);
        assert_eq!(due_at(&v1::Record::default(), now), now);
    }

    #[test]
    fn consecutive_records_due_together_share_a_timer() {
        let now = 1_000;
        let records = [0, 0, 2_000, 2_000, 0, 3_000]
            .into_iter()
            .enumerate()
            .map(|(i, at)| DelayedRecord {
                offset: 10 + i as i64,
                record: rec(at),
            })
            .collect();
        let groups: Vec<(i64, i64, usize)> = group_by_due(records, now)
            .into_iter()
            .map(|(due, first, r)| (due, first, r.len()))
            .collect();
        assert_eq!(
            groups,
            vec![
                (1_000, 10, 2),
                (2_000, 12, 2),
                (1_000, 14, 1),
                (3_000, 15, 1)
            ]
        );
    }
}
