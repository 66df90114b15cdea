//! `chafon`: the "Len Adr Cmd Status Data CRC-16" UHF readers (Chafon UHFReader18 / CF-RU5102
//! / 5106 / 5202, UHFReader288 / 86, SID UR series, clones). Default port 57,600 8N1.
//!
//! Response frame (REFERENCE-READERS.md §5; Chafon UHFReader18 User's Manual V2.0):
//! Len · Adr · reCmd · Status · Data · CRC (LSB first). Len counts the bytes after it (CRC
//! included), at least 5. The CRC is CRC-16/MCRF4XX (preset 0xFFFF, reflected poly 0x8408,
//! no final XOR) over Len … last data byte. Every byte ≥ 5 is a candidate Len; one whose CRC
//! fails is skipped by one byte (`bad_checksum`); smaller bytes are `garbage`.
//!
//! Inventory answers (reCmd `01`; status `01` done, `02` scan time over, `03` more frames
//! follow, `04` buffer full) carry several EPCs per frame. Their layout depends on the
//! firmware family, which the frames do not tell, so it is configured (`family`):
//! - `classic` (UHFReader18, CF-RU5102): Num · Num × (EPC length, EPC). No antenna, no RSSI.
//! - `rssi` (UHFReader288 / 86, SID UR; the default): Ant · Num · Num × (len, data[len & 0x7F],
//!   RSSI). Bit 7 of len marks EPC+TID (FastID): the tag is then EPC and TID together.
//!
//! Real-time mode (reCmd `EE`, 288 family): status `00` · Ant · len · EPC · RSSI is a read,
//! status `28` a `heartbeat`. Ant is a bitmask (`01` ant 1, `02` ant 2, `04` ant 3, `08`
//! ant 4). Status `F8` (antenna error) is an `error`; other answers are `reply` / `status`.
//!
//! RSSI is one unsigned byte that the manuals call "signal strength" without a unit (observed
//! 0x40–0x6D, larger is stronger). It is kept raw (`rssi_raw`); dBm is given only when the
//! source configures `raw_rssi_offset_db` (dBm = raw + offset), a calibration against a
//! reader of known dBm.

use super::framed::{Candidate, Framing};
use super::Decoded;
use crate::config::ChafonFamily;
use crate::event::{Read, ReadKind};
use std::collections::VecDeque;

/// CRC-16/MCRF4XX from the `crc` catalogue (preset 0xFFFF, poly 0x8408 reflected, no xorout).
const CRC: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_MCRF4XX);

/// The CRC of `bytes` (Len … last data byte), as sent LSB first.
pub fn crc(bytes: &[u8]) -> u16 {
    CRC.checksum(bytes)
}

#[derive(Debug, Clone, Copy)]
pub struct Chafon {
    pub family: ChafonFamily,
    pub raw_rssi_offset_db: Option<f32>,
}

impl Chafon {
    fn read(&self, id: &[u8], raw: Option<u8>, ant_mask: Option<u8>) -> Decoded {
        if id.is_empty() {
            // No identity: counted, not a read (as `super::epc_read`).
            return Decoded::Frame { what: "empty_epc" };
        }
        let antenna = ant_mask.and_then(|m| match m {
            0x01 => Some(1),
            0x02 => Some(2),
            0x04 => Some(3),
            0x08 => Some(4),
            _ => None,
        });
        Decoded::Read(Read {
            kind: ReadKind::Epc,
            tag: super::hex_upper(id),
            antenna,
            rssi_dbm: raw.and_then(|r| self.raw_rssi_offset_db.map(|o| r as f32 + o)),
            rssi_raw: raw.map(i32::from),
            symbology: None,
            value: None,
            sensor: None,
        })
    }

    /// The reads of an inventory answer's data, or `None` when it does not add up.
    fn inventory(&self, data: &[u8]) -> Option<Vec<Decoded>> {
        let (ant, rest) = match self.family {
            ChafonFamily::Rssi => (Some(*data.first()?), data.get(1..)?),
            ChafonFamily::Classic => (None, data),
        };
        let (&num, mut rest) = rest.split_first()?;
        let mut reads = Vec::with_capacity(num as usize);
        for _ in 0..num {
            let (&len, r) = rest.split_first()?;
            let n = (len & 0x7F) as usize;
            let id = r.get(..n)?;
            rest = &r[n..];
            let raw = match self.family {
                ChafonFamily::Rssi => {
                    let (&raw, r) = rest.split_first()?;
                    rest = r;
                    Some(raw)
                }
                ChafonFamily::Classic => None,
            };
            reads.push(self.read(id, raw, ant));
        }
        rest.is_empty().then_some(reads)
    }
}

impl Framing for Chafon {
    fn skip(&self, src: &[u8]) -> usize {
        src.iter().take_while(|&&b| b < 5).count()
    }

    fn candidate(&self, src: &[u8]) -> Candidate {
        let total = src[0] as usize + 1;
        if src.len() < total {
            return Candidate::NeedMore;
        }
        // Over a frame and its own CRC (sent LSB first) the register ends at zero.
        if crc(&src[..total]) != 0 {
            return Candidate::Reject("bad_checksum");
        }
        Candidate::Frame(total)
    }

    fn interpret(&self, frame: &[u8], out: &mut VecDeque<Decoded>) {
        let (cmd, status) = (frame[2], frame[3]);
        let data = &frame[4..frame.len() - 2];
        let bad = Decoded::Skipped {
            reason: "bad_record",
            bytes: frame.len(),
        };
        match (cmd, status) {
            (_, 0xF8) => out.push_back(Decoded::Frame { what: "error" }),
            (0x01, 0x01..=0x04) => match self.inventory(data) {
                _ if data.is_empty() => out.push_back(Decoded::Frame { what: "no_tag" }),
                Some(reads) if reads.is_empty() => out.push_back(Decoded::Frame { what: "no_tag" }),
                Some(reads) => out.extend(reads),
                None => out.push_back(bad),
            },
            (0x01, _) => out.push_back(Decoded::Frame { what: "status" }),
            (0xEE, 0x00) => {
                let parsed = (|| {
                    let (&ant, rest) = data.split_first()?;
                    let (&len, rest) = rest.split_first()?;
                    let n = (len & 0x7F) as usize;
                    let id = rest.get(..n)?;
                    match rest.get(n..)? {
                        [raw] => Some(self.read(id, Some(*raw), Some(ant))),
                        _ => None,
                    }
                })();
                out.push_back(parsed.unwrap_or(bad));
            }
            (0xEE, 0x28) => out.push_back(Decoded::Frame { what: "heartbeat" }),
            (0xEE, _) => out.push_back(Decoded::Frame { what: "status" }),
            _ => out.push_back(Decoded::Frame { what: "reply" }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ProtocolConfig, ProtocolKind};
    use crate::protocol::{decode_all, Protocol};

    fn run(family: ChafonFamily, bytes: &[u8]) -> Vec<Decoded> {
        let mut cfg = ProtocolConfig::from(ProtocolKind::Chafon);
        cfg.chafon_family = family;
        decode_all(&mut Protocol::new(&cfg), bytes, true)
    }

    fn frame(cmd: u8, status: u8, data: &[u8]) -> Vec<u8> {
        let mut f = vec![(data.len() + 5) as u8, 0x00, cmd, status];
        f.extend_from_slice(data);
        let c = crc(&f);
        f.extend_from_slice(&c.to_le_bytes());
        f
    }

    /// wabson/chafon-rfid tests (@ 05b55f3): a 288-family inventory answer.
    const RSSI_EXAMPLE: &[u8] = &[
        0x15, 0x00, 0x01, 0x03, 0x01, 0x01, 0x0C, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x03, 0x13, 0x6B, 0xB1, 0xA5,
    ];
    /// The same tag from a UHFReader18 (classic family).
    const CLASSIC_EXAMPLE: &[u8] = &[
        0x13, 0x00, 0x01, 0x03, 0x01, 0x0C, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x03, 0x13, 0x3F, 0x39,
    ];

    fn reads(out: &[Decoded]) -> Vec<(String, Option<i32>, Option<u16>)> {
        out.iter()
            .map(|d| match d {
                Decoded::Read(r) => (r.tag.clone(), r.rssi_raw, r.antenna),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn crc_vectors_from_the_reference() {
        assert_eq!(crc(&[0x04, 0xFF, 0x01]).to_le_bytes(), [0x1B, 0xB4]);
        assert_eq!(crc(&[0x04, 0x00, 0x01]).to_le_bytes(), [0xDB, 0x4B]);
        assert_eq!(crc(&[0x05, 0x00, 0x76, 0x01]).to_le_bytes(), [0xEB, 0xD8]);
        assert_eq!(crc(RSSI_EXAMPLE), 0);
        assert_eq!(crc(CLASSIC_EXAMPLE), 0);
    }

    #[test]
    fn both_reference_examples_in_their_family() {
        assert_eq!(
            reads(&run(ChafonFamily::Rssi, RSSI_EXAMPLE)),
            [("000000000000000000000313".into(), Some(0x6B), Some(1))]
        );
        assert_eq!(
            reads(&run(ChafonFamily::Classic, CLASSIC_EXAMPLE)),
            [("000000000000000000000313".into(), None, None)]
        );
    }

    #[test]
    fn several_epcs_per_answer_and_real_time_frames() {
        let mut data = vec![0x04, 0x03];
        for (i, n) in [4usize, 12, 16].into_iter().enumerate() {
            data.push(n as u8);
            data.extend(std::iter::repeat_n(i as u8 + 0xA0, n));
            data.push(0x50 + i as u8);
        }
        let mut input = frame(0x01, 0x03, &data);
        input.extend(frame(0x01, 0x01, &[0x01, 0x00]));
        input.extend(frame(0xEE, 0x00, &[0x08, 0x02, 0xBE, 0xEF, 0x6D]));
        input.extend(frame(0xEE, 0x28, &[0, 0, 0, 1, 0x0F, 0, 0, 0, 9]));
        let out = run(ChafonFamily::Rssi, &input);
        assert_eq!(
            reads(&out[..3]),
            [
                ("A0".repeat(4), Some(0x50), Some(3)),
                ("A1".repeat(12), Some(0x51), Some(3)),
                ("A2".repeat(16), Some(0x52), Some(3)),
            ]
        );
        assert_eq!(out[3], Decoded::Frame { what: "no_tag" });
        assert_eq!(reads(&out[4..5]), [("BEEF".into(), Some(0x6D), Some(4))]);
        assert_eq!(out[5], Decoded::Frame { what: "heartbeat" });
    }

    #[test]
    fn dbm_only_with_a_configured_offset() {
        let mut cfg = ProtocolConfig::from(ProtocolKind::Chafon);
        cfg.raw_rssi_offset_db = Some(-140.0);
        let out = decode_all(&mut Protocol::new(&cfg), RSSI_EXAMPLE, true);
        match &out[..] {
            [Decoded::Read(r)] => assert_eq!(r.rssi_dbm, Some(107.0 - 140.0)),
            other => panic!("{other:?}"),
        }
        match &run(ChafonFamily::Rssi, RSSI_EXAMPLE)[..] {
            [Decoded::Read(r)] => assert_eq!(r.rssi_dbm, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_corruption_and_a_bogus_long_length() {
        let mut bad = RSSI_EXAMPLE.to_vec();
        bad[8] ^= 1;
        let mut input = vec![0x00, 0x01, 0x02];
        input.extend_from_slice(RSSI_EXAMPLE);
        input.extend(&bad);
        input.extend_from_slice(RSSI_EXAMPLE);
        let out = run(ChafonFamily::Rssi, &input);
        assert_eq!(
            out[0],
            Decoded::Skipped {
                reason: "garbage",
                bytes: 3
            }
        );
        assert!(matches!(out[1], Decoded::Read(_)));
        assert_eq!(
            out[2],
            Decoded::Skipped {
                reason: "bad_checksum",
                bytes: RSSI_EXAMPLE.len()
            }
        );
        assert!(matches!(out[3], Decoded::Read(_)));
        // A stray 0xC8 claims 200 bytes: the frame behind it waits until the line is idle.
        let mut d = Protocol::of(ProtocolKind::Chafon);
        let mut buf = bytes::BytesMut::from(&[0xC8][..]);
        buf.extend_from_slice(RSSI_EXAMPLE);
        use tokio_util::codec::Decoder;
        assert_eq!(d.decode(&mut buf).unwrap(), None);
        let freed = d.idle(&mut buf);
        assert_eq!(
            freed[0],
            Decoded::Skipped {
                reason: "truncated",
                bytes: 1
            }
        );
        assert_eq!(reads(&freed[1..]).len(), 1);
        assert!(buf.is_empty());
    }

    #[test]
    fn an_answer_that_does_not_add_up_is_a_bad_record() {
        let f = frame(0x01, 0x01, &[0x01, 0x02, 0x0C, 0xAA]);
        assert_eq!(
            run(ChafonFamily::Rssi, &f),
            vec![Decoded::Skipped {
                reason: "bad_record",
                bytes: f.len()
            }]
        );
    }
}
