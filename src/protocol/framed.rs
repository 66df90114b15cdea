//! The resynchronising driver shared by the binary protocols.
//!
//! A [`Framing`] says where a frame can start, whether the bytes at the front are a complete,
//! valid frame, and what a valid frame means. [`Framed`] does the rest, the same way for
//! every protocol (REFERENCE-READERS.md, "General rules"):
//! - bytes that cannot start a frame are skipped at once;
//! - the checksum is validated before any length-derived field is trusted; after a failed
//!   candidate the search resumes one byte further on (never a whole claimed length);
//! - a run of skipped bytes is reported once, with the cause of its first byte, just before
//!   the next frame's output or when it reaches [`super::RUN_REPORT`] bytes: the report
//!   does not depend on how the bytes were split;
//! - at most one frame (a few hundred bytes) is held, waiting for its end.

use super::Decoded;
use bytes::{Buf, BytesMut};
use std::collections::VecDeque;
use tokio_util::codec::Decoder;

/// What the bytes at the front of the buffer are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Candidate {
    /// A frame may start here but its end has not arrived yet.
    NeedMore,
    /// No frame starts here: skip one byte, for this reason (`garbage`, `bad_checksum` …).
    Reject(&'static str),
    /// A complete frame with a valid checksum, this many bytes long.
    Frame(usize),
}

/// One binary framing: its header search, its frame check and its meaning.
pub trait Framing {
    /// How many bytes at the front of `src` cannot start a frame (0 when `src[0]` might).
    fn skip(&self, src: &[u8]) -> usize;
    /// Judge the candidate at `src[0]` (non-empty, not skippable).
    fn candidate(&self, src: &[u8]) -> Candidate;
    /// What a valid frame carries: reads, a [`Decoded::Frame`], or a `bad_record` skip.
    fn interpret(&self, frame: &[u8], out: &mut VecDeque<Decoded>);
}

/// A [`Framing`] as a `tokio_util` decoder.
#[derive(Debug)]
pub struct Framed<F> {
    framing: F,
    /// Outputs of the last frame not handed out yet (a frame may carry several reads).
    queue: VecDeque<Decoded>,
    /// The skipped run in progress: its length and the cause of its first byte.
    run: usize,
    reason: &'static str,
    /// Length of the last valid frame interpreted.
    last_frame: usize,
}

impl<F: Framing> Framed<F> {
    pub fn new(framing: F) -> Self {
        Framed {
            framing,
            queue: VecDeque::new(),
            run: 0,
            reason: "garbage",
            last_frame: 0,
        }
    }

    /// More reads of the last frame are still to come (a frame with several reads): the
    /// read just returned is not the frame's last.
    pub fn frame_pending(&self) -> bool {
        self.queue.iter().any(|d| matches!(d, Decoded::Read(_)))
    }

    /// Bytes of the last valid frame (consumed, just before the buffer's front while
    /// [`Framed::frame_pending`]).
    pub fn last_frame_len(&self) -> usize {
        self.last_frame
    }

    fn skipped(&mut self, reason: &'static str, n: usize) {
        if self.run == 0 {
            self.reason = reason;
        }
        self.run += n;
    }

    fn take_run(&mut self) -> Option<Decoded> {
        (self.run > 0).then(|| Decoded::Skipped {
            reason: self.reason,
            bytes: std::mem::take(&mut self.run),
        })
    }

    fn next(&mut self, src: &mut BytesMut) -> Option<Decoded> {
        loop {
            if let Some(d) = self.queue.pop_front() {
                return Some(d);
            }
            if self.run >= super::RUN_REPORT {
                return self.take_run();
            }
            let room = super::RUN_REPORT - self.run;
            let n = self.framing.skip(src).min(src.len()).min(room);
            if n > 0 {
                self.skipped("garbage", n);
                src.advance(n);
                continue;
            }
            if src.is_empty() {
                return None;
            }
            match self.framing.candidate(src) {
                Candidate::NeedMore => return None,
                Candidate::Reject(reason) => {
                    self.skipped(reason, 1);
                    src.advance(1);
                }
                Candidate::Frame(len) => {
                    // The run before a frame is reported first; the frame is judged again on
                    // the next call (only after skips, so rarely).
                    if let Some(run) = self.take_run() {
                        return Some(run);
                    }
                    let len = len.clamp(1, src.len());
                    self.last_frame = len;
                    self.framing.interpret(&src[..len], &mut self.queue);
                    src.advance(len);
                }
            }
        }
    }

    /// Decode as far as possible when no more bytes will complete the frame at the front:
    /// each incomplete candidate gives up its first byte (`truncated`) and the search goes
    /// on, so frames behind a bogus length are still found.
    fn drain(&mut self, src: &mut BytesMut, out: &mut Vec<Decoded>) {
        loop {
            if let Some(d) = self.next(src) {
                out.push(d);
                continue;
            }
            if src.is_empty() {
                break;
            }
            self.skipped("truncated", 1);
            src.advance(1);
        }
        out.extend(self.take_run());
    }

    /// See [`super::Protocol::idle`]. An incomplete candidate is given up only when a complete
    /// valid frame lies behind it (a bogus length byte holding frames back); with nothing
    /// valid behind it, it may be a real frame whose bytes come slowly (a serial-over-network
    /// link that stalls), and it keeps waiting.
    pub fn idle(&mut self, src: &mut BytesMut, out: &mut Vec<Decoded>) {
        loop {
            if let Some(d) = self.next(src) {
                out.push(d);
                continue;
            }
            let behind = (1..src.len()).any(|k| {
                let rest = &src[k..];
                self.framing.skip(rest) == 0
                    && matches!(self.framing.candidate(rest), Candidate::Frame(_))
            });
            if !behind {
                break;
            }
            self.skipped("truncated", 1);
            src.advance(1);
        }
        out.extend(self.take_run());
    }
}

impl<F: Framing> Decoder for Framed<F> {
    type Item = Decoded;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Decoded>, std::io::Error> {
        Ok(self.next(src))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Decoded>, std::io::Error> {
        if let Some(d) = self.next(src) {
            return Ok(Some(d));
        }
        let mut out = Vec::new();
        self.drain(src, &mut out);
        // `drain` may free several outputs: hand out the first, queue the rest.
        let mut it = out.into_iter();
        let first = it.next();
        self.queue.extend(it);
        Ok(first)
    }
}

/// Read a big-endian u16 at `i`, if present.
pub(crate) fn be16(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

#[cfg(test)]
mod tests {
    use crate::protocol::{decode_all, Decoded, Protocol, ProtocolKind, RUN_REPORT};

    /// A frame whose bytes come slowly (a serial-over-network link that stalls longer than
    /// the idle time between bytes) is not cut by the idle flush: nothing valid lies behind
    /// it, so it keeps waiting.
    #[test]
    fn idle_does_not_cut_a_frame_that_comes_slowly() {
        use tokio_util::codec::Decoder;
        let frame = b"\x0262E3086CED08\r\n\x03";
        let mut d = Protocol::of(ProtocolKind::Em4100);
        let mut buf = bytes::BytesMut::new();
        let mut out = Vec::new();
        for b in frame {
            buf.extend_from_slice(&[*b]);
            while let Some(x) = d.decode(&mut buf).unwrap() {
                out.push(x);
            }
            out.extend(d.idle(&mut buf));
        }
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(matches!(&out[0], Decoded::Read(r) if r.tag == "62E3086CED"));
    }

    /// A port that delivers nothing but garbage (a wrong baud rate) shows it: runs are
    /// reported every `RUN_REPORT` bytes, not only before a valid frame that never comes.
    #[test]
    fn garbage_only_is_reported_in_runs_of_bounded_size() {
        for kind in [
            ProtocolKind::Em4100,
            ProtocolKind::ThingMagic,
            ProtocolKind::UhfBb,
            ProtocolKind::Chafon,
        ] {
            let garbage = vec![0x00u8; 2 * RUN_REPORT + 100];
            // Not at end of input: the runs come out while more bytes may follow.
            let out = decode_all(&mut Protocol::of(kind), &garbage, false);
            assert_eq!(
                out,
                vec![
                    Decoded::Skipped {
                        reason: "garbage",
                        bytes: RUN_REPORT
                    };
                    2
                ],
                "{kind:?}"
            );
            // Idle reports the rest.
            let mut d = Protocol::of(kind);
            let mut buf = bytes::BytesMut::from(&garbage[..100]);
            use tokio_util::codec::Decoder;
            assert_eq!(d.decode(&mut buf).unwrap(), None);
            assert_eq!(
                d.idle(&mut buf),
                vec![Decoded::Skipped {
                    reason: "garbage",
                    bytes: 100
                }],
                "{kind:?}"
            );
        }
        // Line noise likewise.
        let mut d = Protocol::of(ProtocolKind::Lines);
        let mut buf = bytes::BytesMut::from(&[0xFFu8; 100][..]);
        use tokio_util::codec::Decoder;
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        assert_eq!(
            d.idle(&mut buf),
            vec![Decoded::Skipped {
                reason: "line_noise",
                bytes: 100
            }]
        );
    }
}
