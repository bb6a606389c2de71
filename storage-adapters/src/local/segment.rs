//! On-disk format of one log segment and its index.
//!
//! A segment file `<base offset, 20 digits>.log` is a sequence of frames:
//!
//! ```text
//! u32 frame_len      bytes after this field
//! u32 crc32c         of every byte after this field
//! u8  version        1
//! i64 base_offset
//! u32 record_count
//! i64 max_timestamp_ms
//! ..  payload        frame_len - 25 bytes
//! ```
//! (integers little-endian). A sealed segment also has `<base>.index`: a header with the
//! segment's end offset, max timestamp and byte size, then sparse `(offset, position)`
//! entries, all under one CRC. The index is a cache: when it is missing or disagrees with the
//! segment, the segment is scanned instead.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};

use crate::{StorageError, StoredBatch};

pub(crate) const FRAME_PREFIX: usize = 8; // frame_len + crc
pub(crate) const FRAME_HEADER: usize = FRAME_PREFIX + 1 + 8 + 4 + 8;
pub(crate) const FORMAT_VERSION: u8 = 1;
/// Frames larger than this are refused on append and treated as corruption on read.
pub(crate) const MAX_FRAME: usize = 1 << 30;
const INDEX_MAGIC: &[u8; 8] = b"TRBIDX01";

pub(crate) fn segment_path(dir: &Path, base: i64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

pub(crate) fn index_path(dir: &Path, base: i64) -> PathBuf {
    dir.join(format!("{base:020}.index"))
}

pub(crate) fn encode_frame(
    base_offset: i64,
    record_count: u32,
    max_ts: i64,
    payload: &[u8],
) -> BytesMut {
    let mut buf = BytesMut::with_capacity(FRAME_HEADER + payload.len());
    let frame_len = (FRAME_HEADER - 4 + payload.len()) as u32;
    buf.extend_from_slice(&frame_len.to_le_bytes());
    buf.extend_from_slice(&[0u8; 4]);
    buf.extend_from_slice(&[FORMAT_VERSION]);
    buf.extend_from_slice(&base_offset.to_le_bytes());
    buf.extend_from_slice(&record_count.to_le_bytes());
    buf.extend_from_slice(&max_ts.to_le_bytes());
    buf.extend_from_slice(payload);
    let crc = crc32c::crc32c(&buf[FRAME_PREFIX..]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// Header fields of a frame, read without its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameHeader {
    pub frame_len: u32,
    pub crc: u32,
    pub base_offset: i64,
    pub record_count: u32,
    pub max_ts: i64,
}

impl FrameHeader {
    pub fn total_len(&self) -> u64 {
        4 + u64::from(self.frame_len)
    }
    pub fn payload_len(&self) -> usize {
        self.frame_len as usize - (FRAME_HEADER - 4)
    }
    pub fn next_offset(&self) -> i64 {
        self.base_offset + i64::from(self.record_count)
    }
}

/// Why a frame could not be read at a position.
#[derive(Debug)]
pub(crate) enum FrameProblem {
    /// The file ends inside the frame.
    Truncated,
    /// The frame is complete but wrong (length, version or CRC).
    Invalid(String),
    Io(std::io::Error),
}

pub(crate) fn parse_header(raw: &[u8; FRAME_HEADER]) -> Result<FrameHeader, String> {
    let frame_len = u32::from_le_bytes(raw[0..4].try_into().unwrap());
    if (frame_len as usize) < FRAME_HEADER - 4 || frame_len as usize > MAX_FRAME {
        return Err(format!("frame length {frame_len} out of bounds"));
    }
    if raw[8] != FORMAT_VERSION {
        return Err(format!("unknown frame version {}", raw[8]));
    }
    let header = FrameHeader {
        frame_len,
        crc: u32::from_le_bytes(raw[4..8].try_into().unwrap()),
        base_offset: i64::from_le_bytes(raw[9..17].try_into().unwrap()),
        record_count: u32::from_le_bytes(raw[17..21].try_into().unwrap()),
        max_ts: i64::from_le_bytes(raw[21..29].try_into().unwrap()),
    };
    if header.record_count == 0 {
        return Err("frame with zero records".into());
    }
    Ok(header)
}

pub(crate) fn read_header(
    file: &File,
    pos: u64,
    file_len: u64,
) -> Result<FrameHeader, FrameProblem> {
    if pos + FRAME_HEADER as u64 > file_len {
        return Err(FrameProblem::Truncated);
    }
    let mut raw = [0u8; FRAME_HEADER];
    file.read_exact_at(&mut raw, pos)
        .map_err(FrameProblem::Io)?;
    let header = parse_header(&raw).map_err(FrameProblem::Invalid)?;
    if pos + header.total_len() > file_len {
        return Err(FrameProblem::Truncated);
    }
    Ok(header)
}

/// Reads a whole frame and checks its CRC.
pub(crate) fn read_frame(
    file: &File,
    pos: u64,
    file_len: u64,
) -> Result<(FrameHeader, StoredBatch), FrameProblem> {
    let header = read_header(file, pos, file_len)?;
    let mut buf = vec![0u8; header.total_len() as usize - FRAME_PREFIX];
    file.read_exact_at(&mut buf, pos + FRAME_PREFIX as u64)
        .map_err(FrameProblem::Io)?;
    let crc = crc32c::crc32c(&buf);
    if crc != header.crc {
        return Err(FrameProblem::Invalid(format!(
            "CRC32C mismatch (stored {:#010x}, computed {crc:#010x})",
            header.crc
        )));
    }
    let payload = Bytes::from(buf).slice(FRAME_HEADER - FRAME_PREFIX..);
    Ok((
        header,
        StoredBatch {
            base_offset: header.base_offset,
            record_count: header.record_count,
            max_timestamp_ms: header.max_ts,
            payload,
        },
    ))
}

/// Decodes the frame at the start of `buf` (a segment or object read into memory) and
/// checks its CRC; `Truncated` when `buf` ends inside it.
pub(crate) fn decode_frame(buf: &Bytes) -> Result<(FrameHeader, StoredBatch), FrameProblem> {
    if buf.len() < FRAME_HEADER {
        return Err(FrameProblem::Truncated);
    }
    let raw: &[u8; FRAME_HEADER] = buf[..FRAME_HEADER].try_into().expect("length checked");
    let header = parse_header(raw).map_err(FrameProblem::Invalid)?;
    let total = header.total_len() as usize;
    if buf.len() < total {
        return Err(FrameProblem::Truncated);
    }
    let crc = crc32c::crc32c(&buf[FRAME_PREFIX..total]);
    if crc != header.crc {
        return Err(FrameProblem::Invalid(format!(
            "CRC32C mismatch (stored {:#010x}, computed {crc:#010x})",
            header.crc
        )));
    }
    Ok((
        header,
        StoredBatch {
            base_offset: header.base_offset,
            record_count: header.record_count,
            max_timestamp_ms: header.max_ts,
            payload: buf.slice(FRAME_HEADER..total),
        },
    ))
}

/// What a sealed segment's index file says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SealedIndex {
    pub end_offset: i64,
    pub max_ts: i64,
    pub size: u64,
    pub entries: Vec<(i64, u64)>,
}

pub(crate) fn encode_index(index: &SealedIndex) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + index.entries.len() * 16);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&[0u8; 4]); // crc placeholder
    out.extend_from_slice(&index.end_offset.to_le_bytes());
    out.extend_from_slice(&index.max_ts.to_le_bytes());
    out.extend_from_slice(&index.size.to_le_bytes());
    for (offset, pos) in &index.entries {
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&pos.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out[12..]);
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}

pub(crate) fn decode_index(raw: &[u8]) -> Option<SealedIndex> {
    if raw.len() < 36 || &raw[..8] != INDEX_MAGIC || !(raw.len() - 36).is_multiple_of(16) {
        return None;
    }
    let crc = u32::from_le_bytes(raw[8..12].try_into().ok()?);
    if crc32c::crc32c(&raw[12..]) != crc {
        return None;
    }
    let end_offset = i64::from_le_bytes(raw[12..20].try_into().ok()?);
    let max_ts = i64::from_le_bytes(raw[20..28].try_into().ok()?);
    let size = u64::from_le_bytes(raw[28..36].try_into().ok()?);
    let entries = raw[36..]
        .chunks_exact(16)
        .map(|c| {
            (
                i64::from_le_bytes(c[..8].try_into().unwrap()),
                u64::from_le_bytes(c[8..].try_into().unwrap()),
            )
        })
        .collect();
    Some(SealedIndex {
        end_offset,
        max_ts,
        size,
        entries,
    })
}

pub(crate) fn corrupt(path: &Path, position: u64, reason: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        path: path.to_path_buf(),
        position,
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_crc_detects_flips() {
        let frame = encode_frame(42, 3, 1_700_000_000_000, b"hello");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, &frame).unwrap();
        let file = File::open(&path).unwrap();
        let (h, b) = read_frame(&file, 0, frame.len() as u64).unwrap();
        assert_eq!(
            (h.base_offset, h.record_count, h.max_ts),
            (42, 3, 1_700_000_000_000)
        );
        assert_eq!(&b.payload[..], b"hello");
        for i in 0..frame.len() {
            let mut bad = frame.to_vec();
            bad[i] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            let file = File::open(&path).unwrap();
            assert!(
                read_frame(&file, 0, bad.len() as u64).is_err(),
                "flip at byte {i} undetected"
            );
        }
        assert!(matches!(
            read_frame(&file, 0, frame.len() as u64 - 1),
            Err(FrameProblem::Truncated) | Err(FrameProblem::Invalid(_))
        ));
    }

    #[test]
    fn index_round_trip_and_rejects_damage() {
        let idx = SealedIndex {
            end_offset: 10,
            max_ts: 5,
            size: 999,
            entries: vec![(0, 0), (4, 512)],
        };
        let raw = encode_index(&idx);
        assert_eq!(decode_index(&raw), Some(idx));
        let mut bad = raw.clone();
        bad[40] ^= 1;
        assert_eq!(decode_index(&bad), None);
        assert_eq!(decode_index(&raw[..raw.len() - 1]), None);
    }
}
