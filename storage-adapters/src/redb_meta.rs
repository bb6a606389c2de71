//! The embedded metadata store: one redb table of byte keys and values.
//!
//! redb gives ACID transactions with fsync on commit, so every `txn` that returns is durable.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{Check, MetaStore, Op, Result, StorageError};

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("meta");

pub struct RedbMetaStore {
    db: Arc<Database>,
    path: PathBuf,
}

fn meta_err(path: &Path, what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Meta(format!("{what} in {}: {e}", path.display()))
}

impl RedbMetaStore {
    /// Opens or creates the database file. Call once per process and path.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| StorageError::io(format!("cannot create {}", dir.display()), e))?;
        }
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StorageError::Locked {
                path: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            },
            other => meta_err(&path, "cannot open the metadata database", other),
        })?;
        let txn = db
            .begin_write()
            .map_err(|e| meta_err(&path, "cannot begin", e))?;
        txn.open_table(TABLE)
            .map_err(|e| meta_err(&path, "cannot create table", e))?;
        txn.commit()
            .map_err(|e| meta_err(&path, "cannot commit", e))?;
        Ok(Self {
            db: Arc::new(db),
            path,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database, &Path) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || f(&db, &path))
            .await
            .map_err(|e| StorageError::Meta(e.to_string()))?
    }
}

#[async_trait]
impl MetaStore for RedbMetaStore {
    async fn get(&self, key: &[u8]) -> Result<Option<Bytes>> {
        let key = key.to_vec();
        self.blocking(move |db, path| {
            let txn = db
                .begin_read()
                .map_err(|e| meta_err(path, "cannot read", e))?;
            let table = txn
                .open_table(TABLE)
                .map_err(|e| meta_err(path, "cannot open table", e))?;
            let v = table
                .get(&key[..])
                .map_err(|e| meta_err(path, "cannot get", e))?;
            Ok(v.map(|v| Bytes::copy_from_slice(v.value())))
        })
        .await
    }

    async fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Bytes)>> {
        if start >= end {
            return Ok(Vec::new());
        }
        let (start, end) = (start.to_vec(), end.to_vec());
        self.blocking(move |db, path| {
            let txn = db
                .begin_read()
                .map_err(|e| meta_err(path, "cannot read", e))?;
            let table = txn
                .open_table(TABLE)
                .map_err(|e| meta_err(path, "cannot open table", e))?;
            let range = table
                .range(&start[..]..&end[..])
                .map_err(|e| meta_err(path, "cannot scan", e))?;
            let mut out = Vec::new();
            for item in range.take(limit) {
                let (k, v) = item.map_err(|e| meta_err(path, "cannot scan", e))?;
                out.push((k.value().to_vec(), Bytes::copy_from_slice(v.value())));
            }
            Ok(out)
        })
        .await
    }

    async fn txn(&self, checks: Vec<Check>, ops: Vec<Op>) -> Result<bool> {
        self.blocking(move |db, path| {
            let txn = db
                .begin_write()
                .map_err(|e| meta_err(path, "cannot begin", e))?;
            {
                let mut table = txn
                    .open_table(TABLE)
                    .map_err(|e| meta_err(path, "cannot open table", e))?;
                for check in &checks {
                    let current = table
                        .get(&check.key[..])
                        .map_err(|e| meta_err(path, "cannot get", e))?;
                    if current.as_ref().map(|v| v.value()) != check.value.as_deref() {
                        return Ok(false);
                    }
                }
                for op in &ops {
                    match op {
                        Op::Put { key, value } => {
                            table
                                .insert(&key[..], &value[..])
                                .map_err(|e| meta_err(path, "cannot put", e))?;
                        }
                        Op::Delete { key } => {
                            table
                                .remove(&key[..])
                                .map_err(|e| meta_err(path, "cannot delete", e))?;
                        }
                    }
                }
            }
            txn.commit()
                .map_err(|e| meta_err(path, "cannot commit", e))?;
            Ok(true)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cas_scan_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let db = RedbMetaStore::open(&path).unwrap();
            assert!(db.compare_and_set(b"a/1", None, Some(b"x")).await.unwrap());
            assert!(!db.compare_and_set(b"a/1", None, Some(b"y")).await.unwrap());
            assert!(
                db.compare_and_set(b"a/1", Some(b"x"), Some(b"z"))
                    .await
                    .unwrap()
            );
            db.put(b"a/2", b"two").await.unwrap();
            db.put(b"b/1", b"other").await.unwrap();
            let a = db.scan_prefix(b"a/", 100).await.unwrap();
            assert_eq!(a.len(), 2);
            assert_eq!(&a[0].1[..], b"z");
            // A failed check applies none of the ops.
            let applied = db
                .txn(
                    vec![Check {
                        key: b"a/2".to_vec(),
                        value: Some(b"nope".to_vec()),
                    }],
                    vec![Op::Delete {
                        key: b"b/1".to_vec(),
                    }],
                )
                .await
                .unwrap();
            assert!(!applied);
        }
        let db = RedbMetaStore::open(&path).unwrap();
        assert_eq!(&db.get(b"a/1").await.unwrap().unwrap()[..], b"z");
        assert_eq!(&db.get(b"b/1").await.unwrap().unwrap()[..], b"other");
        assert_eq!(db.scan_prefix(b"a/", 1).await.unwrap().len(), 1);
    }
}
