//! Which log partitions the core may delete at start-up.
//!
//! A stream, queue or shared body log is made partitions first, then its metadata record;
//! it is deleted record first, then partitions. A crash between the two leaves partitions
//! that no record names. They used to be deleted at the next start, on the reasoning that
//! the metadata is the truth; but a metadata store that is empty or not the right one (a
//! wrong `meta_url` or `meta_namespace`, an emptied data directory holding the redb store
//! while the log lives in an object store) made that start delete every partition in the
//! log: acknowledged data lost because of a configuration mistake.
//!
//! So each create and delete first writes an intent naming the id
//! (`logintent/<stream id>`), and removes it once done. At start-up only partitions with
//! an intent are deleted. Partitions that nothing names and no intent covers are left
//! alone with a warning, and the id counter is moved past them so that a new stream
//! never opens one of them as its own. A start whose metadata store holds no stream,
//! queue or body log at all while the log holds such partitions is refused: that is the
//! wrong store far more often than a crash.

use std::collections::{BTreeSet, HashSet};

use tracing::warn;
use tributary_storage::PartitionKey;

use crate::Core;
use crate::error::{CoreError, CoreResult};
use crate::meta;

/// `logintent/<stream id as 20 digits>`: a create or delete of that id's partitions is
/// under way.
const LOG_INTENT: &str = "logintent";

/// What an intent was written for (kept in its value, for whoever reads the store).
#[derive(Clone, Copy, Debug)]
pub(crate) enum LogChange {
    Create,
    Delete,
}

fn intent_key(id: u64) -> Vec<u8> {
    meta::key(LOG_INTENT, &[&format!("{id:020}")])
}

impl Core {
    /// Records that `id`'s partitions are about to be made or deleted.
    pub(crate) async fn begin_log_change(&self, id: u64, change: LogChange) -> CoreResult<()> {
        let what: &[u8] = match change {
            LogChange::Create => b"create",
            LogChange::Delete => b"delete",
        };
        self.inner.meta.put(&intent_key(id), what).await?;
        Ok(())
    }

    /// The change of `id`'s partitions is complete (its record written or deleted).
    pub(crate) async fn end_log_change(&self, id: u64) -> CoreResult<()> {
        self.inner.meta.delete(&intent_key(id)).await?;
        Ok(())
    }

    async fn log_intents(&self) -> CoreResult<HashSet<u64>> {
        let mut ids = HashSet::new();
        for (key, _) in self
            .inner
            .meta
            .scan_prefix(&meta::key(LOG_INTENT, &[]), usize::MAX)
            .await?
        {
            let part = meta::parts(LOG_INTENT, &key).remove(0);
            let id = part
                .parse()
                .map_err(|_| CoreError::Corrupt(format!("log intent key '{part}'")))?;
            ids.insert(id);
        }
        Ok(ids)
    }

    /// Before anything is written at start-up: refuses a metadata store that names nothing
    /// while the log holds partitions no intent explains (see the module's comment).
    pub(crate) async fn check_log_has_metadata(&self, record_prefixes: &[&str]) -> CoreResult<()> {
        for prefix in record_prefixes {
            if !self
                .inner
                .meta
                .scan_prefix(&meta::key(prefix, &[]), 1)
                .await?
                .is_empty()
            {
                return Ok(());
            }
        }
        let intents = self.log_intents().await?;
        let unexplained: Vec<PartitionKey> = self
            .inner
            .log
            .list_partitions()
            .await?
            .into_iter()
            .filter(|k| !intents.contains(&k.stream_id))
            .collect();
        if let Some(first) = unexplained.first() {
            return Err(CoreError::LogWithoutMetadata {
                partitions: unexplained.len(),
                example: first.to_string(),
            });
        }
        Ok(())
    }

    /// Once every record is loaded (`known` holds the partitions they name): deletes the
    /// partitions of interrupted creates and deletes, leaves the rest alone, drops the
    /// intents that are done with, and moves the id counter past every partition in the log.
    pub(crate) async fn reconcile_log_partitions(
        &self,
        known: &HashSet<PartitionKey>,
    ) -> CoreResult<()> {
        let intents = self.log_intents().await?;
        let known_ids: HashSet<u64> = known.iter().map(|k| k.stream_id).collect();
        let mut unexplained = BTreeSet::new();
        let mut highest = 0;
        for key in self.inner.log.list_partitions().await? {
            highest = highest.max(key.stream_id);
            if known.contains(&key) {
                continue;
            }
            // A partition beyond its stream's count is from an interrupted CreatePartitions
            // (the record is written last), and holds nothing acknowledged.
            if intents.contains(&key.stream_id) || known_ids.contains(&key.stream_id) {
                warn!(partition = %key, "removing a partition of an interrupted create or delete");
                self.inner.log.delete_partition(key).await?;
            } else {
                unexplained.insert(key);
            }
        }
        if let Some(first) = unexplained.first() {
            warn!(
                partitions = unexplained.len(),
                example = %first,
                "the log holds partitions that no stream or queue in the metadata store names; they are left alone (another deployment's, or metadata lost): remove them by hand once you know they are not needed"
            );
        }
        for id in intents {
            self.end_log_change(id).await?;
        }
        self.raise_counter_to("stream_id", highest).await
    }
}
