//! `uhf-bb`: the "BB … 7E" UHF modules of the MagicRF M100 / QM100 family (YRM100, JRD-4035,
//! R200, EL-UHF-RMT01 …).
//!
//! Frame (REFERENCE-READERS.md §4; MagicRF M100 firmware manual as restated in public
//! drivers): `BB` · type (`00` command, `01` response, `02` notice) · command · PL (u16
//! big-endian) · parameter[PL] · checksum · `7E`. The checksum is the low 8 bits of the sum of
//! type … last parameter byte. `BB` and `7E` occur inside parameters, so frames are found by
//! PL and the checksum, never by searching for `7E`.
//!
//! Tag notice (type `02`, command `22`): RSSI (i8, dBm, at the chip input, antenna gain not
//! included: M100 manual) · PC (2) · EPC (PL − 5) · tag CRC (2). Responses and errors are valid
//! frames but not reads: `reply`, `no_tag` (error code `15`, normal while polling), `error`.
//! The modules have one antenna port, so reads carry no antenna.

use super::framed::{be16, Candidate, Framing};
use super::{epc_read, Decoded};
use std::collections::VecDeque;

const HEADER: u8 = 0xBB;
const END: u8 = 0x7E;
/// Longest parameter accepted. A tag notice is at most 5 + 62 bytes (a 496-bit EPC); replies
/// are shorter still. A larger PL in a candidate is garbage, so one stray `BB` never holds
/// more than ~1 KiB of the stream back.
pub const MAX_PL: usize = 1024;

#[derive(Debug, Default, Clone, Copy)]
pub struct UhfBb;

impl Framing for UhfBb {
    fn skip(&self, src: &[u8]) -> usize {
        memchr::memchr(HEADER, src).unwrap_or(src.len())
    }

    fn candidate(&self, src: &[u8]) -> Candidate {
        let Some(&kind) = src.get(1) else {
            return Candidate::NeedMore;
        };
        if kind > 2 {
            return Candidate::Reject("garbage");
        }
        let Some(pl) = be16(src, 3) else {
            return Candidate::NeedMore;
        };
        let pl = pl as usize;
        if pl > MAX_PL {
            return Candidate::Reject("garbage");
        }
        let len = pl + 7;
        if src.len() < len {
            return Candidate::NeedMore;
        }
        if src[len - 1] != END {
            return Candidate::Reject("garbage");
        }
        let sum = src[1..len - 2].iter().fold(0u8, |a, &b| a.wrapping_add(b));
        if sum != src[len - 2] {
            return Candidate::Reject("bad_checksum");
        }
        Candidate::Frame(len)
    }

    fn interpret(&self, frame: &[u8], out: &mut VecDeque<Decoded>) {
        let (kind, cmd) = (frame[1], frame[2]);
        let param = &frame[5..frame.len() - 2];
        out.push_back(match (kind, cmd) {
            (0x02, 0x22) => {
                if param.len() < 5 {
                    Decoded::Skipped {
                        reason: "bad_record",
                        bytes: frame.len(),
                    }
                } else {
                    let rssi = param[0] as i8;
                    epc_read(&param[3..param.len() - 2], Some(rssi as f32), None)
                }
            }
            (0x01, 0xFF) if param == [0x15] => Decoded::Frame { what: "no_tag" },
            (0x01, 0xFF) => Decoded::Frame { what: "error" },
            (0x01, _) => Decoded::Frame { what: "reply" },
            (0x00, _) => Decoded::Frame { what: "command" },
            _ => Decoded::Frame { what: "notice" },
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::protocol::{decode_all, Decoded, Protocol, ProtocolKind};

    fn run(bytes: &[u8]) -> Vec<Decoded> {
        decode_all(&mut Protocol::of(ProtocolKind::UhfBb), bytes, true)
    }

    /// MagicRF M100/QM100 manual example, reproduced in many public drivers.
    const NOTICE: &[u8] = &[
        0xBB, 0x02, 0x22, 0x00, 0x11, 0xC9, 0x34, 0x00, 0x30, 0x75, 0x1F, 0xEB, 0x70, 0x5C, 0x59,
        0x04, 0xE3, 0xD5, 0x0D, 0x70, 0x3A, 0x76, 0xEF, 0x7E,
    ];

    fn notice(rssi: u8, epc: &[u8]) -> Vec<u8> {
        let pl = epc.len() + 5;
        let mut f = vec![
            0xBB,
            0x02,
            0x22,
            (pl >> 8) as u8,
            pl as u8,
            rssi,
            0x30,
            0x00,
        ];
        f.extend_from_slice(epc);
        f.extend_from_slice(&[0x12, 0x34]);
        let sum = f[1..].iter().fold(0u8, |a, &b| a.wrapping_add(b));
        f.extend_from_slice(&[sum, 0x7E]);
        f
    }

    #[test]
    fn the_manual_example_notice() {
        let out = run(NOTICE);
        match &out[..] {
            [Decoded::Read(r)] => {
                assert_eq!(r.tag, "30751FEB705C5904E3D50D70");
                assert_eq!(r.rssi_dbm, Some(-55.0));
                assert_eq!(r.antenna, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn replies_and_errors_are_frames_not_reads() {
        let out = run(&[
            0xBB, 0x01, 0xFF, 0x00, 0x01, 0x15, 0x16, 0x7E, // no tag
            0xBB, 0x01, 0x28, 0x00, 0x01, 0x00, 0x2A, 0x7E, // stop answer
            0xBB, 0x01, 0xFF, 0x00, 0x01, 0x17, 0x18, 0x7E, // another error
            0xBB, 0x00, 0x22, 0x00, 0x00, 0x22, 0x7E, // single inventory command
        ]);
        let whats: Vec<_> = out
            .iter()
            .map(|d| match d {
                Decoded::Frame { what } => *what,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(whats, ["no_tag", "reply", "error", "command"]);
    }

    #[test]
    fn bb_and_7e_inside_the_payload_and_odd_epc_lengths() {
        for epc in [
            &[][..],
            &[0xBB, 0x7E, 0xBB, 0x7E],
            &[0x7E; 8],
            &[0xBB; 16],
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
        ] {
            let mut input = vec![0xBB, 0x7E, 0x00];
            input.extend(notice(0xC4, epc));
            input.extend_from_slice(NOTICE);
            let out = run(&input);
            let reads: Vec<_> = out
                .iter()
                .filter_map(|d| match d {
                    Decoded::Read(r) => Some((r.tag.clone(), r.rssi_dbm)),
                    _ => None,
                })
                .collect();
            if epc.is_empty() {
                // No identity: a counted frame, not a read.
                assert_eq!(out[1], Decoded::Frame { what: "empty_epc" });
                assert_eq!(reads.len(), 1, "{out:?}");
            } else {
                assert_eq!(reads.len(), 2, "{epc:?}: {out:?}");
                assert_eq!(reads[0].0, crate::protocol::hex_upper(epc));
                assert_eq!(reads[0].1, Some(-60.0));
            }
            assert_eq!(
                out[0],
                Decoded::Skipped {
                    reason: "garbage",
                    bytes: 3
                }
            );
        }
    }

    #[test]
    fn a_corrupted_checksum_skips_and_resynchronises() {
        let mut bad = NOTICE.to_vec();
        bad[10] ^= 0x01;
        let mut input = NOTICE.to_vec();
        input.extend(&bad);
        input.extend_from_slice(NOTICE);
        let out = run(&input);
        assert!(matches!(out[0], Decoded::Read(_)));
        assert_eq!(
            out[1],
            Decoded::Skipped {
                reason: "bad_checksum",
                bytes: NOTICE.len()
            }
        );
        assert!(matches!(out[2], Decoded::Read(_)));
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn a_short_notice_is_a_bad_record() {
        // 0x02 + 0x22 + 0x00 + 0x02 + 0xC4 + 0x30 = 0x11A: checksum 0x1A.
        let f = [0xBB, 0x02, 0x22, 0x00, 0x02, 0xC4, 0x30, 0x1A, 0x7E];
        assert_eq!(
            run(&f),
            vec![Decoded::Skipped {
                reason: "bad_record",
                bytes: 9
            }]
        );
    }
}
