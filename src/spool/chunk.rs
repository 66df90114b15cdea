//! On-disk encoding of one group commit: `[format byte][zstd(postcard(ChunkData))]`.
//!
//! Per event only what cannot be derived is stored: seq and commit time as small deltas from
//! the chunk's base, and the body. The event id is recomputed from (salt, seq, commit time).

use crate::event::EventBody;
use serde::{Deserialize, Serialize};

pub const FORMAT_ZSTD_POSTCARD_V1: u8 = 1;
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
const MAX_RAW: usize = 64 * 1024 * 1024;

/// Reusable zstd contexts. Creating them per chunk costs a large allocation (and its page
/// faults) per commit and per read; the spool keeps one of these for its lifetime.
pub struct Codec {
    comp: Option<zstd::bulk::Compressor<'static>>,
    decomp: Option<zstd::bulk::Decompressor<'static>>,
}

impl Default for Codec {
    fn default() -> Self {
        Codec {
            comp: zstd::bulk::Compressor::new(ZSTD_LEVEL).ok(),
            decomp: zstd::bulk::Decompressor::new().ok(),
        }
    }
}

impl Codec {
    pub fn encode(&mut self, data: &ChunkData) -> Result<Vec<u8>, postcard::Error> {
        let raw = postcard::to_stdvec(data)?;
        let compressed = match self.comp.as_mut() {
            Some(c) => c.compress(&raw),
            None => zstd::bulk::compress(&raw, ZSTD_LEVEL),
        };
        // Compressing into memory cannot fail for I/O reasons; map the impossible error anyway.
        let compressed = compressed.map_err(|_| postcard::Error::SerializeBufferFull)?;
        let mut out = Vec::with_capacity(compressed.len() + 1);
        out.push(FORMAT_ZSTD_POSTCARD_V1);
        out.extend_from_slice(&compressed);
        Ok(out)
    }

    pub fn decode(&mut self, blob: &[u8]) -> Result<ChunkData, ChunkError> {
        let (&fmt, rest) = blob.split_first().ok_or(ChunkError::Empty)?;
        if fmt != FORMAT_ZSTD_POSTCARD_V1 {
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
        Ok(postcard::from_bytes(&raw)?)
    }
}
