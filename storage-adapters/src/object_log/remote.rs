//! Shipped segments: uploading a sealed cache segment and reading batches back with ranged
//! reads guided by its sparse index.

use ::opendal::Operator;
use bytes::Bytes;
use tokio::sync::OnceCell;

use super::layout::SegmentName;
use crate::local::LocalSegment;
use crate::local::segment::{FRAME_HEADER, FrameProblem, decode_frame, decode_index, parse_header};
use crate::{PartitionKey, StoredBatch};

/// Bytes fetched per ranged read beyond what the caller asked for, so a read that starts
/// at a sparse index entry before `from` still ends with whole batches.
const READ_SLACK: u64 = 256 * 1024;

pub(crate) struct RemoteSegment {
    pub key: PartitionKey,
    pub name: SegmentName,
    /// `(offset, position)` entries; empty when the index object is missing (reads then
    /// start at the segment's first byte).
    index: OnceCell<Vec<(i64, u64)>>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RemoteError {
    #[error("{0}")]
    Store(#[from] ::opendal::Error),
    #[error("cannot read the cached segment {path}: {source}")]
    Cache {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("segment {path} is damaged at byte {position}: {reason}")]
    Damaged {
        path: String,
        position: u64,
        reason: String,
    },
}

/// Uploads a sealed cache segment and its index. The segment goes first: a segment without
/// its index is still readable, an index without a segment is ignored.
pub(crate) async fn upload(
    op: &Operator,
    key: PartitionKey,
    name: &SegmentName,
    seg: &LocalSegment,
) -> Result<(), RemoteError> {
    let read = |path: std::path::PathBuf| async move {
        let shown = path.display().to_string();
        tokio::task::spawn_blocking(move || std::fs::read(&path))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map_err(|source| RemoteError::Cache {
                path: shown,
                source,
            })
    };
    let body = read(seg.path.clone()).await?;
    op.write(&name.log_path(key), body).await?;
    if let Some(index) = &seg.index_path
        && let Ok(raw) = read(index.clone()).await
    {
        op.write(&name.index_path(key), raw).await?;
    }
    Ok(())
}

impl RemoteSegment {
    pub fn new(key: PartitionKey, name: SegmentName) -> Self {
        Self {
            key,
            name,
            index: OnceCell::new(),
        }
    }

    async fn index(&self, op: &Operator) -> &[(i64, u64)] {
        self.index
            .get_or_init(|| async {
                match op.read(&self.name.index_path(self.key)).await {
                    Ok(raw) => decode_index(&raw.to_bytes())
                        .filter(|ix| ix.size == self.name.size && ix.end_offset == self.name.end)
                        .map(|ix| ix.entries)
                        .unwrap_or_default(),
                    Err(_) => Vec::new(),
                }
            })
            .await
    }

    async fn range(&self, op: &Operator, from: u64, to: u64) -> Result<Bytes, RemoteError> {
        let to = to.min(self.name.size);
        Ok(op
            .read_with(&self.name.log_path(self.key))
            .range(from..to)
            .await?
            .to_bytes())
    }

    fn damaged(&self, position: u64, reason: impl Into<String>) -> RemoteError {
        RemoteError::Damaged {
            path: self.name.log_path(self.key),
            position,
            reason: reason.into(),
        }
    }

    /// Batches from the one holding `from`, up to `max_bytes` of payload (at least one).
    pub async fn read(
        &self,
        op: &Operator,
        from: i64,
        max_bytes: usize,
    ) -> Result<Vec<StoredBatch>, RemoteError> {
        let index = self.index(op).await;
        let mut pos = match index.partition_point(|(o, _)| *o <= from) {
            0 => 0,
            i => index[i - 1].1,
        };
        let mut out: Vec<StoredBatch> = Vec::new();
        let mut total = 0usize;
        while pos < self.name.size {
            let want = (max_bytes as u64).saturating_sub(total as u64) + READ_SLACK;
            let buf = self.range(op, pos, pos + want).await?;
            let mut at = 0usize;
            loop {
                match decode_frame(&buf.slice(at..)) {
                    Ok((header, batch)) => {
                        at += header.total_len() as usize;
                        if header.next_offset() <= from {
                            continue;
                        }
                        if !out.is_empty() && total + batch.payload.len() > max_bytes {
                            return Ok(out);
                        }
                        total += batch.payload.len();
                        out.push(batch);
                        if total >= max_bytes {
                            return Ok(out);
                        }
                    }
                    Err(FrameProblem::Truncated) => break,
                    Err(FrameProblem::Invalid(why)) => {
                        return Err(self.damaged(pos + at as u64, why));
                    }
                    Err(FrameProblem::Io(e)) => {
                        return Err(self.damaged(pos + at as u64, e.to_string()));
                    }
                }
            }
            if at == 0 {
                // A frame larger than the window: fetch exactly that frame.
                let head = self.range(op, pos, pos + FRAME_HEADER as u64).await?;
                let raw: &[u8; FRAME_HEADER] = head
                    .get(..FRAME_HEADER)
                    .and_then(|h| h.try_into().ok())
                    .ok_or_else(|| self.damaged(pos, "the segment ends inside a frame header"))?;
                let header = parse_header(raw).map_err(|why| self.damaged(pos, why))?;
                let whole = self.range(op, pos, pos + header.total_len()).await?;
                let (header, batch) = decode_frame(&whole).map_err(|p| match p {
                    FrameProblem::Invalid(why) => self.damaged(pos, why),
                    _ => self.damaged(pos, "the segment ends inside a frame"),
                })?;
                pos += header.total_len();
                if header.next_offset() > from {
                    total += batch.payload.len();
                    out.push(batch);
                    if total >= max_bytes {
                        return Ok(out);
                    }
                }
                continue;
            }
            pos += at as u64;
        }
        Ok(out)
    }

    /// The base offset of the first batch whose max timestamp is at least `ts`.
    pub async fn offset_for_timestamp(
        &self,
        op: &Operator,
        ts: i64,
    ) -> Result<Option<i64>, RemoteError> {
        let mut from = self.name.base;
        while from < self.name.end {
            let batches = self.read(op, from, 1 << 20).await?;
            let Some(last) = batches.last() else {
                return Ok(None);
            };
            from = last.next_offset();
            if let Some(b) = batches.iter().find(|b| b.max_timestamp_ms >= ts) {
                return Ok(Some(b.base_offset));
            }
        }
        Ok(None)
    }
}
