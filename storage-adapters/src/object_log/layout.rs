//! Object names and formats of the object-store log.
//!
//! ```text
//! partitions/<stream>-<partition>.meta          incarnation u64, start offset i64, crc32c
//! segments/<stream>-<partition>/<base>-<end>-<bytes>-<max ts hex>.log
//!                                               a sealed local segment, byte for byte
//! segments/<stream>-<partition>/<same stem>.idx its sparse index (optional: reads scan)
//! wal/<sequence>.wal                            "TRBWAL01", then entries (shared ack only)
//! wal/<sequence>-<epoch>.wal                    the same, written by a cluster node in that
//!                                               fencing epoch
//! segments/<stream>-<partition>/<stem>-<epoch>.log  the same, shipped by a cluster node
//! epochs/<epoch>.start                          the first WAL sequence of that epoch, then
//!                                               the shipped end of each partition (text)
//! ```
//!
//! A cluster node taking over at epoch E writes `epochs/E.start` before any object of its
//! own. A WAL object of an earlier epoch at or after the recorded sequence, or a segment of an
//! earlier epoch ending past the recorded end of its partition, was written by a node that had
//! lost its lease (paused past it, then resumed): it is never read.
//!
//! Every fact needed to rebuild is in the names and the small marker objects, so a restart
//! on an empty cache lists three prefixes and reads the markers and the few WAL objects.
//! A WAL entry is `stream u64, partition u32, incarnation u64` (little-endian) followed by
//! one frame in the segment format (its own length and CRC32C). The incarnation ties WAL
//! entries and markers to one life of a partition, so entries of a deleted partition are
//! never replayed into a new one with the same key.

use std::collections::{BTreeMap, HashMap};

use bytes::{BufMut, Bytes, BytesMut};

use crate::PartitionKey;
use crate::local::segment::{FrameProblem, decode_frame, encode_frame};

pub(crate) const WAL_MAGIC: &[u8; 8] = b"TRBWAL01";
const WAL_ENTRY_KEY: usize = 8 + 4 + 8;

pub(crate) fn marker_path(key: PartitionKey) -> String {
    format!("partitions/{key}.meta")
}

pub(crate) fn segments_dir(key: PartitionKey) -> String {
    format!("segments/{key}/")
}

/// A WAL object's name; epoch 0 (not a cluster node) keeps the name without one.
pub(crate) fn wal_path(seq: u64, epoch: u64) -> String {
    if epoch == 0 {
        format!("wal/{seq:020}.wal")
    } else {
        format!("wal/{seq:020}-{epoch:020}.wal")
    }
}

/// (sequence, epoch) of a WAL object.
pub(crate) fn parse_wal_name(path: &str) -> Option<(u64, u64)> {
    let stem = path.strip_prefix("wal/")?.strip_suffix(".wal")?;
    match stem.split_once('-') {
        None => Some((stem.parse().ok()?, 0)),
        Some((seq, epoch)) => Some((seq.parse().ok()?, epoch.parse().ok()?)),
    }
}

pub(crate) fn epoch_start_path(epoch: u64) -> String {
    format!("epochs/{epoch:020}.start")
}

pub(crate) fn parse_epoch_start_name(path: &str) -> Option<u64> {
    path.strip_prefix("epochs/")?
        .strip_suffix(".start")?
        .parse()
        .ok()
}

/// What a cluster node recorded when its epoch began: the first WAL sequence it may use, and
/// how far each partition's shipped segments reached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EpochStart {
    pub first_seq: u64,
    /// `None`: the marker was cut short (its writer died writing it, before serving), so it
    /// fences WAL objects but no segment.
    pub shipped_ends: Option<HashMap<PartitionKey, i64>>,
}

impl EpochStart {
    /// The first sequence, one `<partition> <end>` line per partition, then `end`: a store
    /// without atomic writes may keep a marker cut short, which the last line tells.
    pub fn encode(&self) -> String {
        let mut ends: Vec<_> = self.shipped_ends.iter().flatten().collect();
        ends.sort();
        let mut out = format!("{}\n", self.first_seq);
        for (key, end) in ends {
            out.push_str(&format!("{key} {end}\n"));
        }
        out.push_str("end\n");
        out
    }

    /// `None` only when not even the first sequence is readable.
    pub fn decode(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        let (first, rest) = (lines.next()?, lines.collect::<Vec<_>>());
        let first_seq = first.trim().parse().ok()?;
        let shipped_ends = match rest.split_last() {
            Some((&"end", ends)) => ends
                .iter()
                .map(|line| {
                    let (key, end) = line.split_once(' ')?;
                    Some((parse_partition(key)?, end.trim().parse().ok()?))
                })
                .collect::<Option<HashMap<_, _>>>(),
            _ => None,
        };
        Some(Self {
            first_seq,
            shipped_ends,
        })
    }
}

/// Whether a WAL object of `epoch` at `seq` was written after a later epoch began.
pub(crate) fn fenced_out(seq: u64, epoch: u64, starts: &BTreeMap<u64, EpochStart>) -> bool {
    starts
        .range(epoch + 1..)
        .any(|(_, start)| seq >= start.first_seq)
}

/// Whether a segment shipped in `name.epoch` reaches past what a later epoch found shipped
/// when it began: shipped after that takeover, by a node that had lost its lease.
pub(crate) fn segment_fenced_out(
    key: PartitionKey,
    name: &SegmentName,
    starts: &BTreeMap<u64, EpochStart>,
) -> bool {
    starts.range(name.epoch + 1..).any(|(_, start)| {
        start
            .shipped_ends
            .as_ref()
            .is_some_and(|ends| ends.get(&key).is_none_or(|shipped| name.end > *shipped))
    })
}

pub(crate) fn parse_partition(name: &str) -> Option<PartitionKey> {
    let (s, p) = name.split_once('-')?;
    Some(PartitionKey::new(s.parse().ok()?, p.parse().ok()?))
}

pub(crate) fn parse_marker_name(path: &str) -> Option<PartitionKey> {
    parse_partition(path.strip_prefix("partitions/")?.strip_suffix(".meta")?)
}

/// What a partition's marker object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Marker {
    pub incarnation: u64,
    pub start_offset: i64,
}

impl Marker {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(20);
        v.extend_from_slice(&self.incarnation.to_le_bytes());
        v.extend_from_slice(&self.start_offset.to_le_bytes());
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    pub fn decode(raw: &[u8]) -> Option<Self> {
        if raw.len() != 20 || crc32c::crc32c(&raw[..16]).to_le_bytes() != raw[16..20] {
            return None;
        }
        Some(Self {
            incarnation: u64::from_le_bytes(raw[..8].try_into().ok()?),
            start_offset: i64::from_le_bytes(raw[8..16].try_into().ok()?),
        })
    }
}

/// A sealed segment as named in the object store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentName {
    pub base: i64,
    pub end: i64,
    pub size: u64,
    pub max_ts: i64,
    /// The shipping cluster node's fencing epoch (0: not a cluster node, and not named).
    pub epoch: u64,
}

impl SegmentName {
    fn stem(&self, key: PartitionKey) -> String {
        let epoch = if self.epoch == 0 {
            String::new()
        } else {
            format!("-{:020}", self.epoch)
        };
        format!(
            "{}{:020}-{:020}-{}-{:016x}{epoch}",
            segments_dir(key),
            self.base,
            self.end,
            self.size,
            self.max_ts as u64
        )
    }

    pub fn log_path(&self, key: PartitionKey) -> String {
        format!("{}.log", self.stem(key))
    }

    pub fn index_path(&self, key: PartitionKey) -> String {
        format!("{}.idx", self.stem(key))
    }

    /// Parses `segments/<key>/<stem>.log`; other names give `None`.
    pub fn parse(path: &str) -> Option<(PartitionKey, Self)> {
        let rest = path.strip_prefix("segments/")?;
        let (dir, file) = rest.split_once('/')?;
        let key = parse_partition(dir)?;
        let stem = file.strip_suffix(".log")?;
        let mut parts = stem.split('-');
        let name = Self {
            base: parts.next()?.parse().ok()?,
            end: parts.next()?.parse().ok()?,
            size: parts.next()?.parse().ok()?,
            max_ts: u64::from_str_radix(parts.next()?, 16).ok()? as i64,
            epoch: match parts.next() {
                None => 0,
                Some(e) => e.parse().ok()?,
            },
        };
        (parts.next().is_none() && name.end > name.base).then_some((key, name))
    }
}

/// One batch of one partition inside a WAL object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WalEntry {
    pub key: PartitionKey,
    pub incarnation: u64,
    pub base_offset: i64,
    pub record_count: u32,
    pub max_ts: i64,
    pub payload: Bytes,
}

impl WalEntry {
    pub fn end_offset(&self) -> i64 {
        self.base_offset + i64::from(self.record_count)
    }
}

pub(crate) fn encode_wal(entries: &[WalEntry]) -> Bytes {
    let size: usize = entries
        .iter()
        .map(|e| WAL_ENTRY_KEY + 64 + e.payload.len())
        .sum();
    let mut out = BytesMut::with_capacity(WAL_MAGIC.len() + size);
    out.put_slice(WAL_MAGIC);
    for e in entries {
        out.put_u64_le(e.key.stream_id);
        out.put_u32_le(e.key.partition);
        out.put_u64_le(e.incarnation);
        out.put_slice(&encode_frame(
            e.base_offset,
            e.record_count,
            e.max_ts,
            &e.payload,
        ));
    }
    out.freeze()
}

/// Decodes a WAL object; an object that fails its checks is refused whole (it was written
/// in one PUT, so damage means the store returned something else than was written).
pub(crate) fn decode_wal(raw: Bytes) -> Result<Vec<WalEntry>, String> {
    if raw.len() < WAL_MAGIC.len() || &raw[..WAL_MAGIC.len()] != WAL_MAGIC {
        return Err("not a WAL object (bad magic)".into());
    }
    let mut pos = WAL_MAGIC.len();
    let mut out = Vec::new();
    while pos < raw.len() {
        if raw.len() - pos < WAL_ENTRY_KEY {
            return Err(format!("entry header cut at byte {pos}"));
        }
        let k = &raw[pos..pos + WAL_ENTRY_KEY];
        let key = PartitionKey::new(
            u64::from_le_bytes(k[..8].try_into().expect("8 bytes")),
            u32::from_le_bytes(k[8..12].try_into().expect("4 bytes")),
        );
        let incarnation = u64::from_le_bytes(k[12..20].try_into().expect("8 bytes"));
        pos += WAL_ENTRY_KEY;
        let (header, batch) = decode_frame(&raw.slice(pos..)).map_err(|p| match p {
            FrameProblem::Truncated => format!("frame cut at byte {pos}"),
            FrameProblem::Invalid(why) => format!("bad frame at byte {pos}: {why}"),
            FrameProblem::Io(e) => e.to_string(),
        })?;
        pos += header.total_len() as usize;
        out.push(WalEntry {
            key,
            incarnation,
            base_offset: batch.base_offset,
            record_count: batch.record_count,
            max_ts: batch.max_timestamp_ms,
            payload: batch.payload,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let key = PartitionKey::new(7, 3);
        let seg = SegmentName {
            base: 100,
            end: 250,
            size: 4096,
            max_ts: i64::MIN,
            epoch: 0,
        };
        assert_eq!(
            SegmentName::parse(&seg.log_path(key)),
            Some((key, seg.clone()))
        );
        let fenced = SegmentName {
            epoch: 4,
            ..seg.clone()
        };
        assert_eq!(
            SegmentName::parse(&fenced.log_path(key)),
            Some((key, fenced.clone()))
        );
        assert_eq!(SegmentName::parse(&seg.index_path(key)), None);
        let neg = SegmentName {
            max_ts: -5,
            ..seg.clone()
        };
        assert_eq!(SegmentName::parse(&neg.log_path(key)).unwrap().1, neg);
        assert_eq!(parse_marker_name(&marker_path(key)), Some(key));
        assert_eq!(parse_wal_name(&wal_path(42, 0)), Some((42, 0)));
        assert_eq!(parse_wal_name(&wal_path(42, 7)), Some((42, 7)));
        assert_eq!(parse_wal_name("wal/x.wal"), None);
        assert_eq!(parse_epoch_start_name(&epoch_start_path(3)), Some(3));
        let m = Marker {
            incarnation: 9,
            start_offset: 77,
        };
        assert_eq!(Marker::decode(&m.encode()), Some(m));
        let mut bad = m.encode();
        bad[3] ^= 1;
        assert_eq!(Marker::decode(&bad), None);
    }

    #[test]
    fn objects_of_an_epoch_written_after_a_later_one_began_are_fenced_out() {
        // Epoch 1 wrote 0..=9; epoch 2 began at 10 and epoch 3 at 15.
        let start = |first_seq| EpochStart {
            first_seq,
            shipped_ends: Some(HashMap::new()),
        };
        let starts = BTreeMap::from([(2, start(10)), (3, start(15))]);
        assert!(!fenced_out(9, 1, &starts));
        assert!(fenced_out(10, 1, &starts), "epoch 1 after epoch 2 began");
        assert!(!fenced_out(12, 2, &starts));
        assert!(fenced_out(15, 2, &starts), "epoch 2 after epoch 3 began");
        assert!(fenced_out(16, 1, &starts));
        assert!(!fenced_out(16, 3, &starts));
        assert!(!fenced_out(3, 0, &BTreeMap::new()));
    }

    #[test]
    fn segments_past_what_a_later_epoch_found_shipped_are_fenced_out() {
        let (a, b) = (PartitionKey::new(1, 0), PartitionKey::new(2, 0));
        let start = EpochStart {
            first_seq: 10,
            shipped_ends: Some(HashMap::from([(a, 100)])),
        };
        assert_eq!(EpochStart::decode(&start.encode()), Some(start.clone()));
        // Cut short: the sequence still fences WAL objects; no segment is fenced by it.
        let torn = EpochStart::decode("7\n1-0 10").unwrap();
        assert_eq!((torn.first_seq, torn.shipped_ends), (7, None));
        assert!(!segment_fenced_out(
            b,
            &SegmentName {
                base: 0,
                end: 10,
                size: 1,
                max_ts: 0,
                epoch: 1
            },
            &BTreeMap::from([(2, EpochStart::decode("7\n").unwrap())])
        ));
        assert_eq!(EpochStart::decode("x"), None);
        let starts = BTreeMap::from([(2, start)]);
        let seg = |base, end, epoch| SegmentName {
            base,
            end,
            size: 1,
            max_ts: 0,
            epoch,
        };
        assert!(!segment_fenced_out(a, &seg(50, 100, 1), &starts));
        assert!(segment_fenced_out(a, &seg(100, 150, 1), &starts));
        assert!(
            segment_fenced_out(b, &seg(0, 10, 1), &starts),
            "nothing was shipped for b"
        );
        assert!(
            !segment_fenced_out(a, &seg(100, 150, 2), &starts),
            "epoch 2's own"
        );
        assert!(!segment_fenced_out(a, &seg(0, 100, 0), &starts));
    }

    #[test]
    fn wal_round_trip_and_damage() {
        let entries = vec![
            WalEntry {
                key: PartitionKey::new(1, 0),
                incarnation: 5,
                base_offset: 10,
                record_count: 2,
                max_ts: 1000,
                payload: Bytes::from_static(b"hello"),
            },
            WalEntry {
                key: PartitionKey::new(2, 4),
                incarnation: 6,
                base_offset: 0,
                record_count: 1,
                max_ts: -1,
                payload: Bytes::new(),
            },
        ];
        let raw = encode_wal(&entries);
        assert_eq!(decode_wal(raw.clone()).unwrap(), entries);
        for cut in [3, WAL_MAGIC.len() + 5, raw.len() - 1] {
            assert!(decode_wal(raw.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut flipped = raw.to_vec();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x40;
        assert!(decode_wal(Bytes::from(flipped)).is_err());
        assert_eq!(decode_wal(Bytes::from_static(WAL_MAGIC)).unwrap(), vec![]);
    }
}
