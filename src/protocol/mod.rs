//! Reader protocols: bytes (or an MQTT payload) → [`Read`]s.
//!
//! Every decoder is a `tokio_util::codec::Decoder` that accepts bytes split anywhere,
//! resynchronises after garbage, never panics, and reports what it skipped as a
//! [`Decoded::Skipped`] item (with a reason for the drop counter) instead of an error, so a
//! stream never ends because of bad input. `Ok(None)` means "need more bytes".
//!
//! How to add a protocol:
//! 1. a new file `src/protocol/<name>.rs` with a `Decoder<Item = Decoded, Error = io::Error>`,
//!    byte-array unit tests next to it;
//! 2. one arm in [`Protocol`] (and in `config::ProtocolKind`);
//! 3. one fixture folder `hardware-fixtures/<name>/` with captures and expected reads;
//! 4. a fuzz target in `fuzz/fuzz_targets/`.

pub mod lines;

use crate::config::ProtocolKind;
use crate::event::Read;
use bytes::BytesMut;
use tokio_util::codec::Decoder;

/// One decoder output: a read, or bytes that were skipped and why.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Read(Read),
    Skipped { reason: &'static str, bytes: usize },
}

/// The closed registry of decoders.
#[derive(Debug)]
pub enum Protocol {
    Lines(lines::LinesDecoder),
}

impl Protocol {
    pub fn new(kind: ProtocolKind) -> Self {
        match kind {
            ProtocolKind::Lines => Protocol::Lines(lines::LinesDecoder::default()),
        }
    }
}

impl Decoder for Protocol {
    type Item = Decoded;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Decoded>, std::io::Error> {
        match self {
            Protocol::Lines(d) => d.decode(src),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Decoded>, std::io::Error> {
        match self {
            Protocol::Lines(d) => d.decode_eof(src),
        }
    }
}

/// Decode a complete byte buffer (a replay record or an MQTT payload) into outputs.
pub fn decode_all(proto: &mut Protocol, bytes: &[u8], eof: bool) -> Vec<Decoded> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Ok(Some(d)) = proto.decode(&mut buf) {
        out.push(d);
    }
    if eof {
        while let Ok(Some(d)) = proto.decode_eof(&mut buf) {
            out.push(d);
        }
    }
    out
}
