//! `em4100`: 125 kHz readers in ASCII mode (ID Innovations ID-12LA / ID-20LA / ID-3LA,
//! RDM6300 / RDM630 and clones). Output only; the reader sends a frame while a card is in the
//! field (the RDM6300 every 50–65 ms, so suppression downstream matters).
//!
//! Frame (REFERENCE-READERS.md §2; Seeed RDM630 wiki, ID-12 datasheet format line):
//! `02` · 10 ASCII hex (1 version byte + 4 id bytes) · 2 ASCII hex (XOR of those 5 bytes) ·
//! `03` (RDM6300, 14 bytes) or `0D 0A 03` (ID-xxLA, 16 bytes).
//!
//! The read's tag is the 10 hex characters, uppercased (kind `em4100`). Skipped and counted:
//! bytes outside frames (`garbage`, e.g. power-up noise), a wrong trailer (`bad_frame`),
//! non-hex characters such as the `;D` checksum of some clones (`not_hex`), and a checksum
//! that does not match (`bad_checksum`): such frames are never "fixed".

use super::framed::{Candidate, Framing};
use super::Decoded;
use crate::event::{Read, ReadKind};
use std::collections::VecDeque;

const STX: u8 = 0x02;
const ETX: u8 = 0x03;

#[derive(Debug, Default, Clone, Copy)]
pub struct Em4100;

fn hex_val(c: u8) -> Option<u8> {
    (c as char).to_digit(16).map(|d| d as u8)
}

fn hex_byte(pair: &[u8]) -> Option<u8> {
    Some(hex_val(pair[0])? << 4 | hex_val(pair[1])?)
}

impl Framing for Em4100 {
    fn skip(&self, src: &[u8]) -> usize {
        memchr::memchr(STX, src).unwrap_or(src.len())
    }

    fn candidate(&self, src: &[u8]) -> Candidate {
        let Some(&t) = src.get(13) else {
            return Candidate::NeedMore;
        };
        let len = match t {
            ETX => 14,
            b'\r' => match src.get(14..16) {
                None if src.len() == 14 || src[14] == b'\n' => return Candidate::NeedMore,
                Some([b'\n', ETX]) => 16,
                _ => return Candidate::Reject("bad_frame"),
            },
            _ => return Candidate::Reject("bad_frame"),
        };
        let mut bytes = [0u8; 6];
        for (i, pair) in src[1..13].chunks_exact(2).enumerate() {
            match hex_byte(pair) {
                Some(b) => bytes[i] = b,
                None => return Candidate::Reject("not_hex"),
            }
        }
        if bytes[..5].iter().fold(0, |a, b| a ^ b) != bytes[5] {
            return Candidate::Reject("bad_checksum");
        }
        Candidate::Frame(len)
    }

    fn interpret(&self, frame: &[u8], out: &mut VecDeque<Decoded>) {
        let tag = String::from_utf8_lossy(&frame[1..11]).to_ascii_uppercase();
        out.push_back(Decoded::Read(Read {
            kind: ReadKind::Em4100,
            tag,
            antenna: None,
            rssi_dbm: None,
            rssi_raw: None,
            symbology: None,
            value: None,
            sensor: None,
        }));
    }
}

#[cfg(test)]
mod tests {
    use crate::protocol::{decode_all, Decoded, Protocol, ProtocolKind};

    fn run(bytes: &[u8]) -> Vec<Decoded> {
        decode_all(&mut Protocol::of(ProtocolKind::Em4100), bytes, true)
    }

    fn tags(out: &[Decoded]) -> Vec<String> {
        out.iter()
            .filter_map(|d| match d {
                Decoded::Read(r) => Some(r.tag.clone()),
                _ => None,
            })
            .collect()
    }

    /// Seeed RDM630 wiki: card 62E3086CED, checksum 62^E3^08^6C^ED = 08.
    const RDM6300: &[u8] = b"\x0262E3086CED08\x03";
    /// The same card in ID-12LA form (CR LF before ETX).
    const ID12: &[u8] = b"\x0262E3086CED08\r\n\x03";

    #[test]
    fn both_trailers_from_the_reference() {
        for f in [RDM6300, ID12] {
            let out = run(f);
            assert_eq!(out.len(), 1, "{out:?}");
            match &out[0] {
                Decoded::Read(r) => {
                    assert_eq!(r.tag, "62E3086CED");
                    assert_eq!(r.kind, crate::event::ReadKind::Em4100);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn lowercase_hex_is_read_uppercase() {
        assert_eq!(tags(&run(b"\x0262e3086ced08\x03")), ["62E3086CED"]);
    }

    #[test]
    fn bad_checksum_not_hex_and_bad_trailer_are_skipped_with_their_reason() {
        let cases: [(&[u8], &str); 3] = [
            (b"\x0262E3086CED09\x03", "bad_checksum"),
            (b"\x0262E3086CED;D\x03", "not_hex"),
            (b"\x0262E3086CED08\x04", "bad_frame"),
        ];
        for (frame, reason) in cases {
            let mut input = frame.to_vec();
            input.extend_from_slice(RDM6300);
            let out = run(&input);
            assert_eq!(
                out[0],
                Decoded::Skipped {
                    reason,
                    bytes: frame.len()
                },
                "{frame:?}"
            );
            assert_eq!(tags(&out), ["62E3086CED"]);
        }
    }

    #[test]
    fn power_up_garbage_and_a_frame_cut_by_a_new_stx() {
        let mut input = vec![0x00, 0xFF, 0x80, b'1'];
        input.extend_from_slice(b"\x0262E30");
        input.extend_from_slice(ID12);
        input.extend_from_slice(b"\xff\xfe");
        let out = run(&input);
        assert_eq!(
            out,
            vec![
                Decoded::Skipped {
                    reason: "garbage",
                    bytes: 10
                },
                out[1].clone(),
                Decoded::Skipped {
                    reason: "garbage",
                    bytes: 2
                },
            ]
        );
        assert_eq!(tags(&out), ["62E3086CED"]);
    }

    #[test]
    fn a_half_frame_at_the_end_is_truncated() {
        let mut input = RDM6300.to_vec();
        input.extend_from_slice(b"\x0262E3");
        let out = run(&input);
        assert_eq!(
            out[1],
            Decoded::Skipped {
                reason: "truncated",
                bytes: 5
            }
        );
    }
}
