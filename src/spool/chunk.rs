//! On-disk encoding of one group commit: `[format byte][zstd(postcard(ChunkData))]`.
//!
//! Per event only what cannot be derived is stored: seq and commit time as small deltas from
//! the chunk's base, and the body. The event id is recomputed from (salt, seq, commit time).

use crate::event::EventBody;
use serde::{Deserialize, Serialize};

/// Format 1: bodies without the `clock` field ([`crate::event::EventBodyV1`]); read only.
pub const FORMAT_ZSTD_POSTCARD_V1: u8 = 1;
/// Format 2 (written now): [`EventBody`] with `clock`.
pub const FORMAT_ZSTD_POSTCARD_V2: u8 = 2;
/// zstd level for chunks: level 1 is ~3x faster than 3 and costs a few bytes per event.
const ZSTD_LEVEL: i32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// seq - chunk.first_seq (requeued dead letters keep their old seq, so it can be negative).
    pub seq_delta: i64,
    /// committed_ms - chunk.created_ms.
    pub committed_delta: i64,
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkData {
    pub boot_id: [u8; 16],
    pub records: Vec<Record>,
}

#[derive(Deserialize)]
struct RecordV1 {
    seq_delta: i64,
    committed_delta: i64,
    body: crate::event::EventBodyV1,
}

/// A chunk of format 1.
#[derive(Deserialize)]
struct ChunkDataV1 {
    boot_id: [u8; 16],
    records: Vec<RecordV1>,
}

/// A fresh group serialised straight from its bodies, byte for byte what
/// `ChunkData { boot_id, records: [Record { seq_delta: i, committed_delta: 0, body }] }` gives,
/// without moving every body into a `Record` first.
#[derive(Serialize)]
struct FreshChunk<'a> {
    boot_id: [u8; 16],
    records: FreshRecords<'a>,
}

struct FreshRecords<'a>(&'a [EventBody]);

#[derive(Serialize)]
struct RecordRef<'a> {
    seq_delta: i64,
    committed_delta: i64,
    body: &'a EventBody,
}

impl Serialize for FreshRecords<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().enumerate().map(|(i, body)| RecordRef {
            seq_delta: i as i64,
            committed_delta: 0,
            body,
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("unknown chunk format byte {0}")]
    Format(u8),
    #[error("empty chunk blob")]
    Empty,
    #[error("decompression failed: {0}")]
    Zstd(std::io::Error),
    #[error("decoding failed: {0}")]
    Postcard(#[from] postcard::Error),
}

/// Upper bound of a decompressed chunk: a corrupt header must not make us allocate gigabytes.
pub const MAX_RAW: usize = 64 * 1024 * 1024;

/// Reusable zstd contexts. Creating them per chunk costs a large allocation (and its page
/// faults) per commit and per read; the spool keeps one of these for its lifetime.
pub struct Codec {
    comp: Option<zstd::bulk::Compressor<'static>>,
    decomp: Option<zstd::bulk::Decompressor<'static>>,
    /// Encoding buffers kept between commits (no regrowing and copying per commit), dropped
    /// when a large commit has grown them past [`KEEP_BUFFER`].
    raw: Vec<u8>,
    packed: Vec<u8>,
}

/// Largest encoding buffer kept between commits.
const KEEP_BUFFER: usize = 256 * 1024;

impl Default for Codec {
    fn default() -> Self {
        Codec {
            comp: zstd::bulk::Compressor::new(ZSTD_LEVEL).ok(),
            decomp: zstd::bulk::Decompressor::new().ok(),
            raw: Vec::new(),
            packed: Vec::new(),
        }
    }
}

impl Codec {
    pub fn encode(&mut self, data: &ChunkData) -> Result<Vec<u8>, postcard::Error> {
        self.encode_value(data)
    }

    /// The chunk of a fresh group: `bodies` get seqs `first_seq + i`, all committed now.
    pub fn encode_fresh(
        &mut self,
        boot_id: [u8; 16],
        bodies: &[EventBody],
    ) -> Result<Vec<u8>, postcard::Error> {
        self.encode_value(&FreshChunk {
            boot_id,
            records: FreshRecords(bodies),
        })
    }

    fn encode_value<T: Serialize>(&mut self, data: &T) -> Result<Vec<u8>, postcard::Error> {
        let mut raw = std::mem::take(&mut self.raw);
        raw.clear();
        let raw = postcard::to_extend(data, raw)?;
        // Never write a chunk the decoder would refuse: the callers bound a chunk far below
        // this (`app::GROUP_MAX_BYTES`, `actor::MERGE_MAX_BYTES`), so this only guards them.
        if raw.len() > MAX_RAW {
            return Err(postcard::Error::SerializeBufferFull);
        }
        let mut packed = std::mem::take(&mut self.packed);
        packed.clear();
        packed.reserve(zstd::zstd_safe::compress_bound(raw.len()));
        let n = match self.comp.as_mut() {
            Some(c) => c.compress_to_buffer(&raw, &mut packed),
            None => zstd::bulk::compress_to_buffer(&raw, &mut packed, ZSTD_LEVEL),
        };
        // Compressing into memory cannot fail for I/O reasons; map the impossible error anyway.
        let n = n.map_err(|_| postcard::Error::SerializeBufferFull)?;
        let mut out = Vec::with_capacity(n + 1);
        out.push(FORMAT_ZSTD_POSTCARD_V2);
        out.extend_from_slice(&packed[..n]);
        if raw.capacity() <= KEEP_BUFFER {
            self.raw = raw;
        }
        if packed.capacity() <= KEEP_BUFFER {
            self.packed = packed;
        }
        Ok(out)
    }

    pub fn decode(&mut self, blob: &[u8]) -> Result<ChunkData, ChunkError> {
        let (&fmt, rest) = blob.split_first().ok_or(ChunkError::Empty)?;
        if fmt != FORMAT_ZSTD_POSTCARD_V1 && fmt != FORMAT_ZSTD_POSTCARD_V2 {
            return Err(ChunkError::Format(fmt));
        }
        // Size the output from the frame header (the compressor always writes it), so a read
        // does not map a worst-case buffer.
        let cap = zstd::zstd_safe::get_frame_content_size(rest)
            .ok()
            .flatten()
            .map_or(MAX_RAW, |n| (n as usize).min(MAX_RAW));
        let raw = match self.decomp.as_mut() {
            Some(d) => d.decompress(rest, cap),
            None => zstd::bulk::decompress(rest, cap),
        }
        .map_err(ChunkError::Zstd)?;
        if fmt == FORMAT_ZSTD_POSTCARD_V1 {
            let old: ChunkDataV1 = postcard::from_bytes(&raw)?;
            return Ok(ChunkData {
                boot_id: old.boot_id,
                records: old
                    .records
                    .into_iter()
                    .map(|r| Record {
                        seq_delta: r.seq_delta,
                        committed_delta: r.committed_delta,
                        body: r.body.into(),
                    })
                    .collect(),
            });
        }
        Ok(postcard::from_bytes(&raw)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: the encoder had no size cap while the decoder refused chunks over
    /// `MAX_RAW`, so a large enough group was committed and could never be read back.
    #[test]
    fn every_chunk_the_encoder_writes_the_decoder_reads() {
        let mut c = Codec::default();
        let body = |tag: String| crate::event::EventBody {
            kind: crate::event::ReadKind::Barcode,
            tag,
            source: "s".into(),
            location: "l".into(),
            device: "d".into(),
            scan_type: None,
            antenna: None,
            rssi_cdbm: None,
            read_count: 1,
            first_seen_ms: 0,
            last_seen_ms: 0,
            symbology: None,
            value: None,
            clock: Default::default(),
        };
        // Just under the cap: written and read back.
        let n = MAX_RAW / 4200 - 16;
        let near: Vec<_> = (0..n)
            .map(|i| body(format!("{i:08}{}", "q".repeat(4088))))
            .collect();
        let blob = c.encode_fresh([0; 16], &near).unwrap();
        assert_eq!(c.decode(&blob).unwrap().records.len(), n);
        // Over it: refused at encoding, never written unreadable.
        let over: Vec<_> = (0..n + 400)
            .map(|i| body(format!("{i:08}{}", "q".repeat(4088))))
            .collect();
        assert!(c.encode_fresh([0; 16], &over).is_err());
    }
    use crate::event::{EventBody, ReadKind};

    fn chunk(n: usize, salt: &str) -> ChunkData {
        ChunkData {
            boot_id: [7; 16],
            records: (0..n)
                .map(|i| Record {
                    seq_delta: i as i64,
                    committed_delta: 0,
                    body: EventBody {
                        kind: ReadKind::Barcode,
                        tag: format!("{salt}-{i:08}"),
                        source: "belt".into(),
                        location: "HALL".into(),
                        device: "r1".into(),
                        scan_type: None,
                        antenna: Some(1),
                        rssi_cdbm: Some(-5000 - i as i32),
                        read_count: 1,
                        first_seen_ms: i as i64,
                        last_seen_ms: i as i64,
                        symbology: None,
                        value: None,
                        clock: Default::default(),
                    },
                })
                .collect(),
        }
    }

    #[test]
    fn one_codec_encodes_chunks_of_any_size_in_turn() {
        let mut c = Codec::default();
        // Large (beyond the kept buffer size), small, medium, empty, small again.
        for (n, salt) in [(5000, "a"), (3, "b"), (400, "c"), (0, "d"), (1, "e")] {
            let data = chunk(n, salt);
            let blob = c.encode(&data).unwrap();
            assert_eq!(blob[0], FORMAT_ZSTD_POSTCARD_V2);
            assert_eq!(c.decode(&blob).unwrap(), data);
            assert!(c.raw.capacity() <= KEEP_BUFFER && c.packed.capacity() <= KEEP_BUFFER);
        }
    }

    #[test]
    fn a_fresh_group_encodes_exactly_as_its_records() {
        let mut c = Codec::default();
        for n in [0, 1, 300] {
            let data = chunk(n, "f");
            let bodies: Vec<EventBody> = data.records.iter().map(|r| r.body.clone()).collect();
            let fresh = c.encode_fresh(data.boot_id, &bodies).unwrap();
            assert_eq!(fresh, c.encode(&data).unwrap());
            assert_eq!(c.decode(&fresh).unwrap(), data);
        }
    }

    #[test]
    fn decoded_names_share_one_allocation() {
        let mut c = Codec::default();
        let blob = c.encode(&chunk(50, "n")).unwrap();
        let data = c.decode(&blob).unwrap();
        let (a, b) = (&data.records[0].body, &data.records[49].body);
        assert!(std::sync::Arc::ptr_eq(&a.location, &b.location));
        assert!(std::sync::Arc::ptr_eq(&a.source, &b.source));
        assert!(std::sync::Arc::ptr_eq(&a.device, &b.device));
        assert_eq!(&*a.location, "HALL");
    }

    /// Spools written before the `clock` field (format 1) are still read: their events come
    /// back whole, marked by the old rule (a time before 2024 was an unsynced clock).
    #[test]
    fn chunks_of_format_1_are_still_read() {
        #[derive(Serialize)]
        struct OldRecord {
            seq_delta: i64,
            committed_delta: i64,
            body: crate::event::EventBodyV1,
        }
        #[derive(Serialize)]
        struct OldChunk {
            boot_id: [u8; 16],
            records: Vec<OldRecord>,
        }
        let new = chunk(3, "old");
        let old = OldChunk {
            boot_id: new.boot_id,
            records: new
                .records
                .iter()
                .map(|r| OldRecord {
                    seq_delta: r.seq_delta,
                    committed_delta: r.committed_delta,
                    body: crate::event::EventBodyV1 {
                        kind: r.body.kind,
                        tag: r.body.tag.clone(),
                        source: r.body.source.clone(),
                        location: r.body.location.clone(),
                        device: r.body.device.clone(),
                        scan_type: r.body.scan_type.clone(),
                        antenna: r.body.antenna,
                        rssi_cdbm: r.body.rssi_cdbm,
                        read_count: r.body.read_count,
                        first_seen_ms: r.body.first_seen_ms,
                        last_seen_ms: r.body.last_seen_ms,
                        symbology: r.body.symbology.clone(),
                        value: r.body.value,
                    },
                })
                .collect(),
        };
        let mut blob = vec![FORMAT_ZSTD_POSTCARD_V1];
        blob.extend(zstd::bulk::compress(&postcard::to_stdvec(&old).unwrap(), 1).unwrap());
        let back = Codec::default().decode(&blob).unwrap();
        assert_eq!(back.records.len(), 3);
        for (b, n) in back.records.iter().zip(&new.records) {
            // The test chunk's times are tiny: an unsynced clock by the old rule.
            let want = EventBody {
                clock: crate::clock::ClockMark::Unsynced,
                ..n.body.clone()
            };
            assert_eq!(b.body, want);
        }
    }
}
