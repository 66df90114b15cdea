//! Reader protocols: bytes (or an MQTT payload) → [`Read`]s.
//!
//! Every decoder is a `tokio_util::codec::Decoder` that accepts bytes split anywhere,
//! resynchronises after garbage, never panics, never holds more than one frame's worth of
//! bytes, and reports what it skipped as a [`Decoded::Skipped`] item (with a reason for the
//! drop counter) instead of an error, so a stream never ends because of bad input. Valid
//! frames that carry no read (replies, keep-alives, error answers) are [`Decoded::Frame`]s.
//! `Ok(None)` means "need more bytes". The output does not depend on how the bytes were split.
//!
//! How to add a protocol:
//! 1. a new file `src/protocol/<name>.rs` with a `Decoder<Item = Decoded, Error = io::Error>`
//!    (binary framings implement [`framed::Framing`] and get resynchronisation for free),
//!    byte-array unit tests next to it;
//! 2. one arm in [`Protocol`] (and in `config::ProtocolKind`);
//! 3. one fixture folder `hardware-fixtures/<name>/` with captures and expected reads;
//! 4. a fuzz target in `fuzz/fuzz_targets/`.

pub mod chafon;
pub mod em4100;
pub mod framed;
pub mod impinj_iot;
pub mod json_map;
pub mod lines;
pub mod payload;
pub mod thingmagic;
pub mod uhf_bb;
pub mod zebra_iotc;

pub use crate::config::{ProtocolConfig, ProtocolKind};
use crate::event::Read;
use bytes::BytesMut;
use tokio_util::codec::Decoder;

/// One decoder output: a read, a valid frame that is not a read, or bytes that were skipped
/// and why.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Read(Read),
    /// A frame with a valid checksum that carries no tag read: `what` names it (`reply`,
    /// `keepalive`, `heartbeat`, `no_tag`, `error`, `status`, `command`, `notice`,
    /// `empty_epc`).
    Frame {
        what: &'static str,
    },
    /// Bytes that were not a valid frame. A run of skipped bytes with nothing decoded in
    /// between is one item (at most [`RUN_REPORT`] bytes, so a port delivering only garbage
    /// shows it); `reason` is the cause of its first byte (`garbage`, `bad_checksum`,
    /// `truncated`, or a decoder's own). A valid frame whose content does not add up is its
    /// own item (`bad_record`).
    Skipped {
        reason: &'static str,
        bytes: usize,
    },
}

/// Longest run of skipped bytes reported as one item: a wrong baud rate delivers nothing but
/// garbage, and its count must show without waiting for a valid frame. A count of bytes, so the
/// report does not depend on how the bytes were split.
pub const RUN_REPORT: usize = 4096;

/// The closed registry of decoders.
#[derive(Debug)]
pub enum Protocol {
    Lines(lines::LinesDecoder),
    Em4100(framed::Framed<em4100::Em4100>),
    ThingMagic(framed::Framed<thingmagic::ThingMagic>),
    UhfBb(framed::Framed<uhf_bb::UhfBb>),
    Chafon(framed::Framed<chafon::Chafon>),
}

impl Protocol {
    /// A decoder for a source's protocol settings.
    pub fn new(cfg: &ProtocolConfig) -> Self {
        match cfg.kind {
            ProtocolKind::Lines => Protocol::Lines(lines::LinesDecoder::new(cfg.lines.clone())),
            ProtocolKind::Em4100 => Protocol::Em4100(framed::Framed::new(em4100::Em4100)),
            ProtocolKind::ThingMagic => {
                Protocol::ThingMagic(framed::Framed::new(thingmagic::ThingMagic))
            }
            ProtocolKind::UhfBb => Protocol::UhfBb(framed::Framed::new(uhf_bb::UhfBb)),
            ProtocolKind::Chafon => Protocol::Chafon(framed::Framed::new(chafon::Chafon {
                family: cfg.chafon_family,
                raw_rssi_offset_db: cfg.raw_rssi_offset_db,
            })),
        }
    }

    /// A decoder with the protocol's default settings.
    pub fn of(kind: ProtocolKind) -> Self {
        Self::new(&ProtocolConfig::from(kind))
    }

    /// Outputs of the frame just decoded are still to come (a frame with several reads, e.g.
    /// a Chafon inventory answer): until its last output, the frame's bytes are not settled
    /// in the port journal.
    pub fn frame_pending(&self) -> bool {
        match self {
            Protocol::Lines(_) => false,
            Protocol::Em4100(d) => d.frame_pending(),
            Protocol::ThingMagic(d) => d.frame_pending(),
            Protocol::UhfBb(d) => d.frame_pending(),
            Protocol::Chafon(d) => d.frame_pending(),
        }
    }

    /// Bytes of the last frame decoded (0 for `lines`).
    pub fn last_frame_len(&self) -> usize {
        match self {
            Protocol::Lines(_) => 0,
            Protocol::Em4100(d) => d.last_frame_len(),
            Protocol::ThingMagic(d) => d.last_frame_len(),
            Protocol::UhfBb(d) => d.last_frame_len(),
            Protocol::Chafon(d) => d.last_frame_len(),
        }
    }

    /// The line has been idle long enough that a frame in progress cannot be completed (a
    /// reader sends a frame's bytes back to back): give up the candidate frame at the front
    /// of `src`, so a bogus length byte in garbage does not hold the frames behind it until
    /// more bytes arrive, and report skipped bytes still pending. Returns what that frees.
    /// Serial sources call it when a read times out; replays never do (their output must not
    /// depend on timing).
    pub fn idle(&mut self, src: &mut BytesMut) -> Vec<Decoded> {
        let mut out = Vec::new();
        match self {
            Protocol::Lines(d) => out.extend(d.idle()),
            Protocol::Em4100(d) => d.idle(src, &mut out),
            Protocol::ThingMagic(d) => d.idle(src, &mut out),
            Protocol::UhfBb(d) => d.idle(src, &mut out),
            Protocol::Chafon(d) => d.idle(src, &mut out),
        }
        out
    }
}

impl Decoder for Protocol {
    type Item = Decoded;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Decoded>, std::io::Error> {
        match self {
            Protocol::Lines(d) => d.decode(src),
            Protocol::Em4100(d) => d.decode(src),
            Protocol::ThingMagic(d) => d.decode(src),
            Protocol::UhfBb(d) => d.decode(src),
            Protocol::Chafon(d) => d.decode(src),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Decoded>, std::io::Error> {
        match self {
            Protocol::Lines(d) => d.decode_eof(src),
            Protocol::Em4100(d) => d.decode_eof(src),
            Protocol::ThingMagic(d) => d.decode_eof(src),
            Protocol::UhfBb(d) => d.decode_eof(src),
            Protocol::Chafon(d) => d.decode_eof(src),
        }
    }
}

/// Decode a complete byte buffer (a replay record or an MQTT payload) into outputs.
pub fn decode_all(proto: &mut Protocol, bytes: &[u8], eof: bool) -> Vec<Decoded> {
    decode_at_most(proto, bytes, eof, usize::MAX).0
}

/// [`decode_all`], stopping after `max` outputs; also returns the bytes left undecoded then
/// (0 when everything was decoded).
pub fn decode_at_most(
    proto: &mut Protocol,
    bytes: &[u8],
    eof: bool,
    max: usize,
) -> (Vec<Decoded>, usize) {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while out.len() < max {
        match proto.decode(&mut buf) {
            Ok(Some(d)) => out.push(d),
            _ => break,
        }
    }
    if eof {
        while out.len() < max {
            match proto.decode_eof(&mut buf) {
                Ok(Some(d)) => out.push(d),
                _ => break,
            }
        }
    }
    let left = if out.len() >= max { buf.len() } else { 0 };
    (out, left)
}

/// Uppercase hex of `bytes` (EPCs and ids are reported this way).
pub fn hex_upper(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 0xF) as usize] as char);
    }
    s
}

/// An EPC read (kind `epc`) with what the reader reported beside it. A zero-length EPC (it
/// occurs: REFERENCE-READERS.md) identifies nothing: it is the frame `empty_epc`, counted,
/// not a read.
pub(crate) fn epc_read(epc: &[u8], rssi_dbm: Option<f32>, antenna: Option<u16>) -> Decoded {
    if epc.is_empty() {
        return Decoded::Frame { what: "empty_epc" };
    }
    Decoded::Read(Read {
        kind: crate::event::ReadKind::Epc,
        tag: hex_upper(epc),
        antenna,
        rssi_dbm,
        rssi_raw: None,
        symbology: None,
        value: None,
        sensor: None,
    })
}
