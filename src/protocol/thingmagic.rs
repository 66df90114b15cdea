//! `thingmagic`: the ThingMagic / JADAK Mercury embedded-module serial protocol (M6e, M6e Nano,
//! M7e; the SparkFun Simultaneous RFID Reader). Default port 115,200 8N1.
//!
//! Module → host frame (REFERENCE-READERS.md §3; MercuryAPI `serial_reader_l3.c`):
//! `FF` · LEN · opcode · status (u16) · data[LEN] · CRC (u16, big-endian). The CRC covers LEN
//! … last data byte. It is ThingMagic's nibble-wise CRC (`tm_crc`: init 0xFFFF, poly 0x1021),
//! which equals a standard CRC-16 with poly 0x1021, init 0x1D0F, no reflection, computed over
//! all covered bytes but the last two and then XORed with those two read big-endian (test
//! vector: the version command `FF 00 03 1D 0C`). Every `FF` is a candidate; one that fails
//! the CRC is skipped by one byte (`bad_checksum`).
//!
//! Tag reads come from:
//! - continuous reading (opcode `22` in the reply, option bit `0x10`): data = option ·
//!   search flags (2) · metadata flags (2) · response type (`01` = one tag record follows);
//! - the tag buffer (opcode `29`): data = metadata flags (2) · read options · tag count ·
//!   records.
//!
//! A record has the metadata fields that its flags select, in this fixed order: `0x0001` read
//! count (u8) · `0x0002` RSSI (i8, dBm) · `0x0004` antenna (u8: TX port in the high nibble, RX
//! port in the low; `0x11` = port 1) · `0x0008` frequency (u24, kHz) · `0x0010` timestamp
//! (u32, ms) · `0x0020` phase (u16) · `0x0040` protocol (u8) · `0x0080` embedded data (u16 bit
//! count, then the bytes) · `0x0100` GPIO (u8); then the EPC bit count (u16, including PC and
//! tag CRC), PC (2), [XPC words when the PC's XI bit `0x0200` is set: MercuryAPI], EPC, tag
//! CRC (2). Antenna: the TX port (as the module labels its ports; the low nibble when the high
//! one is 0).
//!
//! Not reads: `keepalive` (opcode `22`, status `0400` "no tags found", about once a second
//! while reading continuously), `status` (opcode `22` without a tag record), `reply` (any other
//! answer), `error` (any other non-zero status, e.g. `0504` temperature throttling).
//!
//! To start continuous reading (SparkFun `startReading()`, captured from URA transport logs)
//! put in the source's `init` (hex): `FF 03 9A 01 0C 00 A3 5D` (read filter off), then
//! `FF 10 2F 00 00 01 22 00 00 05 07 22 10 00 1B 03 E8 01 FF DD 2B` (all metadata). Set the
//! region first if the module has none (e.g. NA2: `FF 01 97 0D 4B B0`).

use super::framed::{be16, Candidate, Framing};
use super::{epc_read, Decoded};
use std::collections::VecDeque;

const HEADER: u8 = 0xFF;

/// CRC-16 poly 0x1021, init 0x1D0F, not reflected: ThingMagic's CRC once the last two bytes
/// are XORed in (see the module docs).
const TM_CRC: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::Algorithm {
    width: 16,
    poly: 0x1021,
    init: 0x1D0F,
    refin: false,
    refout: false,
    xorout: 0,
    check: 0xE5CC,
    residue: 0,
});

/// ThingMagic's CRC over `covered` (at least 2 bytes).
pub fn tm_crc(covered: &[u8]) -> u16 {
    let n = covered.len().saturating_sub(2);
    let tail = be16(covered, n).unwrap_or(0);
    TM_CRC.checksum(&covered[..n]) ^ tail
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ThingMagic;

/// Parse one tag record at `b[*i..]` with `flags`; `None` when it does not fit.
fn record(b: &[u8], i: &mut usize, flags: u16) -> Option<Decoded> {
    if flags & !0x01FF != 0 {
        // A metadata field this decoder does not know: its size is unknown, so the record
        // cannot be read reliably.
        return None;
    }
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(*i..*i + n)?;
        *i += n;
        Some(s)
    };
    let mut rssi = None;
    let mut antenna = None;
    if flags & 0x0001 != 0 {
        take(1)?;
    }
    if flags & 0x0002 != 0 {
        rssi = Some(take(1)?[0] as i8 as f32);
    }
    if flags & 0x0004 != 0 {
        let a = take(1)?[0];
        let port = if a >> 4 != 0 { a >> 4 } else { a & 0x0F };
        antenna = Some(port as u16);
    }
    if flags & 0x0008 != 0 {
        take(3)?;
    }
    if flags & 0x0010 != 0 {
        take(4)?;
    }
    if flags & 0x0020 != 0 {
        take(2)?;
    }
    if flags & 0x0040 != 0 {
        take(1)?;
    }
    if flags & 0x0080 != 0 {
        let bits = take(2)?;
        let bits = u16::from_be_bytes([bits[0], bits[1]]) as usize;
        take(bits.div_ceil(8))?;
    }
    if flags & 0x0100 != 0 {
        take(1)?;
    }
    let bits = take(2)?;
    let bytes = u16::from_be_bytes([bits[0], bits[1]]) as usize / 8;
    // PC (2) and tag CRC (2) are part of the count.
    let mut epc_len = bytes.checked_sub(4)?;
    let pc = take(2)?;
    if pc[0] & 0x02 != 0 {
        // XI: an XPC_W1 word follows the PC, and XPC_W2 when XPC_W1's XEB bit is set.
        let w1 = take(2)?;
        epc_len = epc_len.checked_sub(2)?;
        if w1[0] & 0x80 != 0 {
            take(2)?;
            epc_len = epc_len.checked_sub(2)?;
        }
    }
    let epc = take(epc_len)?;
    let epc = epc_read(epc, rssi, antenna);
    take(2)?;
    Some(epc)
}

impl Framing for ThingMagic {
    fn skip(&self, src: &[u8]) -> usize {
        memchr::memchr(HEADER, src).unwrap_or(src.len())
    }

    fn candidate(&self, src: &[u8]) -> Candidate {
        let Some(&len) = src.get(1) else {
            return Candidate::NeedMore;
        };
        let total = len as usize + 7;
        if src.len() < total {
            return Candidate::NeedMore;
        }
        if Some(tm_crc(&src[1..total - 2])) != be16(src, total - 2) {
            return Candidate::Reject("bad_checksum");
        }
        Candidate::Frame(total)
    }

    fn interpret(&self, frame: &[u8], out: &mut VecDeque<Decoded>) {
        let op = frame[2];
        let status = u16::from_be_bytes([frame[3], frame[4]]);
        let data = &frame[5..frame.len() - 2];
        let bad = Decoded::Skipped {
            reason: "bad_record",
            bytes: frame.len(),
        };
        match (op, status) {
            (0x22, 0x0400) => out.push_back(Decoded::Frame { what: "keepalive" }),
            (_, s) if s != 0 => out.push_back(Decoded::Frame { what: "error" }),
            (0x22, _) => {
                if data.len() > 8 && data[0] & 0x10 != 0 && data[5] == 0x01 {
                    let flags = u16::from_be_bytes([data[3], data[4]]);
                    let mut i = 6;
                    out.push_back(record(data, &mut i, flags).unwrap_or(bad));
                } else {
                    out.push_back(Decoded::Frame { what: "status" });
                }
            }
            (0x29, _) => {
                let parsed = (|| {
                    let flags = be16(data, 0)?;
                    let count = *data.get(3)?;
                    let mut i = 4;
                    (0..count)
                        .map(|_| record(data, &mut i, flags))
                        .collect::<Option<Vec<_>>>()
                })();
                match parsed {
                    Some(reads) if reads.is_empty() => {
                        out.push_back(Decoded::Frame { what: "no_tag" })
                    }
                    Some(reads) => out.extend(reads),
                    None => out.push_back(bad),
                }
            }
            _ => out.push_back(Decoded::Frame { what: "reply" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode_all, Protocol, ProtocolKind};

    fn run(bytes: &[u8]) -> Vec<Decoded> {
        decode_all(&mut Protocol::of(ProtocolKind::ThingMagic), bytes, true)
    }

    fn frame(op: u8, status: u16, data: &[u8]) -> Vec<u8> {
        let mut f = vec![
            0xFF,
            data.len() as u8,
            op,
            (status >> 8) as u8,
            status as u8,
        ];
        f.extend_from_slice(data);
        let crc = tm_crc(&f[1..]);
        f.extend_from_slice(&crc.to_be_bytes());
        f
    }

    /// SparkFun library `parseResponse()` comment (@ d52c969): a streamed tag record with all
    /// metadata.
    const SPARKFUN: &[u8] = &[
        0xFF, 0x28, 0x22, 0x00, 0x00, 0x10, 0x00, 0x1B, 0x01, 0xFF, 0x01, 0x01, 0xC4, 0x11, 0x0E,
        0x16, 0x40, 0x00, 0x00, 0x01, 0x27, 0x00, 0x00, 0x05, 0x00, 0x00, 0x0F, 0x00, 0x80, 0x30,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x15, 0x45, 0xE9, 0x4A,
        0x56, 0x1D,
    ];

    #[test]
    fn crc_test_vectors_from_the_reference() {
        // The version command and SparkFun's write example (host → module frames).
        assert_eq!(tm_crc(&[0x00, 0x03]), 0x1D0C);
        let w = [
            0x0A, 0x24, 0x03, 0xE8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0x00, 0xEE,
        ];
        assert_eq!(tm_crc(&w), 0x589D);
        assert_eq!(tm_crc(&SPARKFUN[1..SPARKFUN.len() - 2]), 0x561D);
    }

    #[test]
    fn the_sparkfun_streamed_record() {
        match &run(SPARKFUN)[..] {
            [Decoded::Read(r)] => {
                assert_eq!(r.tag, "000000000000000000001545");
                assert_eq!(r.rssi_dbm, Some(-60.0));
                assert_eq!(r.antenna, Some(1));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keepalive_ack_and_errors_are_frames() {
        let mut input = frame(0x22, 0x0400, &[]);
        // The continuous-read start acknowledgement (REFERENCE-READERS.md §3).
        input.extend_from_slice(&[
            0xFF, 0x04, 0x2F, 0x00, 0x00, 0x01, 0x22, 0x00, 0x00, 0x6D, 0xC3,
        ]);
        input.extend(frame(0x22, 0x0504, &[]));
        input.extend(frame(0x22, 0x0000, &[0x10, 0x00, 0x1B, 0x01, 0xFF, 0x02]));
        let whats: Vec<_> = run(&input)
            .into_iter()
            .map(|d| match d {
                Decoded::Frame { what } => what,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(whats, ["keepalive", "reply", "error", "status"]);
    }

    /// The tag buffer with RSSI + antenna only, an antenna on port 2, EPCs of 4, 12 and 0
    /// bytes, and an XPC word that is not part of the EPC.
    #[test]
    fn buffered_records_with_other_metadata() {
        let mut data = vec![0x00, 0x06, 0x00, 0x04];
        let rec = |rssi: u8, ant: u8, pc: [u8; 2], xpc: &[u8], epc: &[u8]| {
            let bits = ((epc.len() + xpc.len() + 4) * 8) as u16;
            let mut r = vec![rssi, ant];
            r.extend_from_slice(&bits.to_be_bytes());
            r.extend_from_slice(&pc);
            r.extend_from_slice(xpc);
            r.extend_from_slice(epc);
            r.extend_from_slice(&[0xAB, 0xCD]);
            r
        };
        data.extend(rec(0xC4, 0x22, [0x10, 0x00], &[], &[1, 2, 3, 4]));
        data.extend(rec(0xB0, 0x11, [0x30, 0x00], &[], &[0xE2; 12]));
        data.extend(rec(0xD0, 0x44, [0x00, 0x00], &[], &[]));
        data.extend(rec(
            0xD8,
            0x33,
            [0x12, 0x00],
            &[0x80, 0x00, 0x00, 0x01],
            &[9; 4],
        ));
        let out = run(&frame(0x29, 0, &data));
        // The zero-length EPC identifies nothing: a counted frame, not a read.
        assert_eq!(out[2], Decoded::Frame { what: "empty_epc" });
        let reads: Vec<_> = out
            .iter()
            .filter_map(|d| match d {
                Decoded::Read(r) => Some((r.tag.clone(), r.rssi_dbm.unwrap(), r.antenna.unwrap())),
                _ => None,
            })
            .collect();
        assert_eq!(
            reads,
            [
                ("01020304".to_string(), -60.0, 2),
                ("E2".repeat(12), -80.0, 1),
                ("09090909".to_string(), -40.0, 3),
            ]
        );
    }

    #[test]
    fn a_record_longer_than_its_frame_is_a_bad_record() {
        let f = frame(0x29, 0, &[0x00, 0x00, 0x00, 0x01, 0x00, 0x80, 0x30, 0x00]);
        assert_eq!(
            run(&f),
            vec![Decoded::Skipped {
                reason: "bad_record",
                bytes: f.len()
            }]
        );
    }

    #[test]
    fn ff_in_garbage_and_a_corrupted_frame_resynchronise() {
        let mut input = vec![0x13, 0xFF, 0xFF, 0x05, 0xFF];
        input.extend_from_slice(SPARKFUN);
        let mut bad = SPARKFUN.to_vec();
        bad[20] ^= 0x40;
        input.extend(&bad);
        input.extend_from_slice(SPARKFUN);
        let out = run(&input);
        assert_eq!(
            out[0],
            Decoded::Skipped {
                reason: "garbage",
                bytes: 5
            }
        );
        assert!(matches!(out[1], Decoded::Read(_)));
        assert_eq!(
            out[2],
            Decoded::Skipped {
                reason: "bad_checksum",
                bytes: SPARKFUN.len()
            }
        );
        assert!(matches!(out[3], Decoded::Read(_)));
        assert_eq!(out.len(), 4);
    }
}
