//! `lines`: ASCII scanners (barcode, and text-mode RFID readers). One read per line, ended by
//! CR, LF or CRLF (a CRLF pair is one terminator, even when split across reads).
//!
//! Interpretation of a line, after stripping an STX (0x02) prefix and ETX (0x03) suffix:
//! - an AIM symbology identifier (`]` + 2 chars) is removed and kept as `symbology`;
//! - exactly 10 ASCII digits is an IATA bag-tag licence plate (no check digit exists);
//! - anything else printable is a barcode. GS (0x1D) inside GS1 data is kept.
//!
//! Options (`[[source]]` keys, REFERENCE-READERS.md §1):
//! - `prefix` / `suffix` (hex bytes, e.g. `"02"` / `"03"`): stripped when present. A
//!   configured suffix also ends a record, for scanners that send `STX data ETX` without CR/LF.
//! - `fields` + `separator`: a template for text-mode RFID readers that print one read per
//!   line, e.g. `fields = ["tag", "rssi", "antenna"]`, `separator = ","` for
//!   `E2801190A5021F80055817CA,-61.5,2`. Names: `tag` (required), `rssi` (dBm), `antenna`, and
//!   `-` for a column to ignore. A tag in hex is an EPC (uppercased), anything else text. A
//!   line that does not fit the template is skipped as `bad_fields`.
//!
//! Skipped (counted, never fatal): empty lines, lines over [`MAX_LINE`] bytes (resync at the
//! next terminator), lines with other control bytes or invalid UTF-8.

use super::Decoded;
use crate::event::{Read, ReadKind};
use bytes::{Buf, BytesMut};
use tokio_util::codec::Decoder;

/// Longest accepted line. Longer input is garbage or a missing terminator.
pub const MAX_LINE: usize = 4096;

/// Line noise: what an idle, floating or mis-clocked line delivers between frames (NUL, 0xFF,
/// other control bytes, and 0xFE, which like 0xFF never occurs in UTF-8). STX (a frame prefix)
/// and the terminators are not noise.
fn is_noise(b: u8) -> bool {
    // Bytes that can never start a UTF-8 character (continuation bytes 0x80-0xBF, 0xC0, 0xC1,
    // 0xF5-0xFF) cannot begin a frame either.
    (b < 0x20 && !matches!(b, 0x02 | b'\r' | b'\n'))
        || matches!(b, 0x7F | 0x80..=0xC1 | 0xF5..=0xFF)
}

/// Noise at the end of a line (before its terminator): control bytes only (a multi-byte
/// character's last byte is a continuation byte, so those stay).
fn is_trailing_noise(b: u8) -> bool {
    (b < 0x20 && !matches!(b, 0x03 | 0x1D)) || b == 0x7F
}

/// One column of a `fields` template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Tag,
    /// Signal strength in dBm.
    Rssi,
    /// Antenna port as the reader labels it.
    Antenna,
    /// A column that is not used.
    Ignore,
}

impl Field {
    /// The template names of the config file.
    pub const NAMES: [&'static str; 4] = ["tag", "rssi", "antenna", "-"];

    pub fn parse(name: &str) -> Option<Field> {
        match name {
            "tag" => Some(Field::Tag),
            "rssi" => Some(Field::Rssi),
            "antenna" => Some(Field::Antenna),
            "-" => Some(Field::Ignore),
            _ => None,
        }
    }
}

/// The `lines` settings of a source. The default is plain lines with STX/ETX stripped.
#[derive(Debug, Clone, PartialEq)]
pub struct LinesOptions {
    pub prefix: Vec<u8>,
    pub suffix: Vec<u8>,
    /// The column template; `None` for barcodes and bag tags.
    pub fields: Option<Vec<Field>>,
    /// Between the template's columns (default ",").
    pub separator: String,
}

impl Default for LinesOptions {
    fn default() -> Self {
        LinesOptions {
            prefix: Vec::new(),
            suffix: Vec::new(),
            fields: None,
            separator: ",".into(),
        }
    }
}

#[derive(Debug, Default)]
pub struct LinesDecoder {
    opts: LinesOptions,
    /// The previous terminator was CR: an LF right after it belongs to it.
    after_cr: bool,
    /// Skipping an over-long line until its terminator.
    discarding: usize,
    /// Noise bytes skipped at the start of a line, reported (as one `line_noise` skip) when
    /// the line's first real byte arrives, so the report does not depend on how the bytes
    /// were split.
    noise: usize,
}

impl LinesDecoder {
    /// The line is idle: report noise still pending (a port that sends only noise shows it).
    pub fn idle(&mut self) -> Option<Decoded> {
        (self.noise > 0).then(|| Decoded::Skipped {
            reason: "line_noise",
            bytes: std::mem::take(&mut self.noise),
        })
    }

    pub fn new(opts: LinesOptions) -> Self {
        LinesDecoder {
            opts,
            ..Default::default()
        }
    }

    fn interpret(&self, line: &[u8]) -> Decoded {
        let mut l = line;
        if let Some(rest) = l.strip_prefix(self.opts.prefix.as_slice()) {
            l = rest;
        }
        if let Some(rest) = l.strip_suffix(self.opts.suffix.as_slice()) {
            l = rest;
        }
        while let Some((&0x02, rest)) = l.split_first() {
            l = rest;
        }
        while let Some((&last, rest)) = l.split_last() {
            if last == 0x03 || is_trailing_noise(last) {
                l = rest;
            } else {
                break;
            }
        }
        if l.is_empty() {
            return Decoded::Skipped {
                reason: "empty_line",
                bytes: line.len(),
            };
        }
        if l.iter()
            .any(|&b| (b < 0x20 && b != 0x1D && b != b'\t') || b == 0x7F)
        {
            return Decoded::Skipped {
                reason: "control_bytes",
                bytes: line.len(),
            };
        }
        let Ok(text) = std::str::from_utf8(l) else {
            return Decoded::Skipped {
                reason: "invalid_utf8",
                bytes: line.len(),
            };
        };
        let text = text.trim_matches(|c| c == ' ' || c == '\t');
        if let Some(fields) = &self.opts.fields {
            return self.template(fields, text, line.len());
        }
        let (symbology, data) =
            if text.len() >= 3 && text.starts_with(']') && text.is_char_boundary(3) {
                (Some(text[..3].to_string()), &text[3..])
            } else {
                (None, text)
            };
        if data.is_empty() {
            return Decoded::Skipped {
                reason: "empty_line",
                bytes: line.len(),
            };
        }
        let kind = if data.len() == 10 && data.bytes().all(|b| b.is_ascii_digit()) {
            ReadKind::BagTag
        } else {
            ReadKind::Barcode
        };
        Decoded::Read(Read {
            kind,
            tag: data.to_string(),
            antenna: None,
            rssi_dbm: None,
            symbology,
            value: None,
            sensor: None,
            rssi_raw: None,
        })
    }

    /// A line of a text-mode RFID reader, by the `fields` template.
    fn template(&self, fields: &[Field], text: &str, bytes: usize) -> Decoded {
        let bad = Decoded::Skipped {
            reason: "bad_fields",
            bytes,
        };
        let mut parts = text.split(self.opts.separator.as_str());
        let (mut tag, mut rssi, mut antenna) = (None, None, None);
        for f in fields {
            let Some(part) = parts.next() else {
                return bad;
            };
            let part = part.trim();
            match f {
                Field::Tag if !part.is_empty() => tag = Some(part),
                Field::Rssi => match part.parse::<f32>() {
                    Ok(v) if (-200.0..=50.0).contains(&v) => rssi = Some(v),
                    _ => return bad,
                },
                Field::Antenna => match part.parse::<u16>() {
                    Ok(v) => antenna = Some(v),
                    _ => return bad,
                },
                Field::Ignore => {}
                Field::Tag => return bad,
            }
        }
        let Some(tag) = tag else { return bad };
        let hex = tag.len().is_multiple_of(2) && tag.bytes().all(|b| b.is_ascii_hexdigit());
        Decoded::Read(Read {
            kind: if hex { ReadKind::Epc } else { ReadKind::Text },
            tag: if hex {
                tag.to_ascii_uppercase()
            } else {
                tag.to_string()
            },
            antenna,
            rssi_dbm: rssi,
            rssi_raw: None,
            symbology: None,
            value: None,
            sensor: None,
        })
    }

    /// Where the record at the front of `src` ends: `(length, terminator length)`, by CR, LF
    /// or the configured suffix (which stays part of the record, to be stripped).
    fn record_end(&self, src: &[u8]) -> Option<(usize, usize)> {
        let term = memchr::memchr2(b'\r', b'\n', src);
        let suffix = (!self.opts.suffix.is_empty())
            .then(|| memchr::memmem::find(src, &self.opts.suffix))
            .flatten()
            .map(|p| p + self.opts.suffix.len());
        match (term, suffix) {
            (Some(t), Some(s)) if s <= t => Some((s, 0)),
            (Some(t), _) => Some((t, 1)),
            (None, Some(s)) => Some((s, 0)),
            (None, None) => None,
        }
    }
}

impl Decoder for LinesDecoder {
    type Item = Decoded;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Decoded>, std::io::Error> {
        loop {
            if self.after_cr && src.first() == Some(&b'\n') {
                src.advance(1);
            }
            if !src.is_empty() {
                self.after_cr = false;
            }
            // Noise before a frame (e.g. NULs from a floating line) is skipped and counted,
            // never joined to the frame that follows it.
            if self.discarding == 0 {
                let lead = self.opts.prefix.first().copied();
                let room = super::RUN_REPORT - self.noise;
                let n = src
                    .iter()
                    .take(room)
                    .take_while(|&&b| is_noise(b) && Some(b) != lead)
                    .count();
                src.advance(n);
                self.noise += n;
                if src.is_empty() && self.noise < super::RUN_REPORT {
                    return Ok(None);
                }
                if self.noise > 0 {
                    let bytes = std::mem::take(&mut self.noise);
                    return Ok(Some(Decoded::Skipped {
                        reason: "line_noise",
                        bytes,
                    }));
                }
            }
            let Some((pos, term)) = self.record_end(src) else {
                if src.len() > MAX_LINE {
                    // No terminator in sight: drop what we have and keep discarding until one.
                    self.discarding += src.len();
                    src.clear();
                }
                return Ok(None);
            };
            // The line is read in place and then skipped (`advance` moves a cursor; splitting
            // the buffer per line would share it and count references per frame).
            self.after_cr = term == 1 && src[pos] == b'\r';
            let out = if self.discarding > 0 {
                let bytes = self.discarding + pos;
                self.discarding = 0;
                Some(Decoded::Skipped {
                    reason: "line_too_long",
                    bytes,
                })
            } else if pos > MAX_LINE {
                Some(Decoded::Skipped {
                    reason: "line_too_long",
                    bytes: pos,
                })
            } else if pos == 0 {
                // A bare terminator (e.g. "\n\n"): nothing to report.
                None
            } else {
                Some(self.interpret(&src[..pos]))
            };
            src.advance(pos + term);
            if out.is_some() {
                return Ok(out);
            }
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Decoded>, std::io::Error> {
        if let Some(d) = self.decode(src)? {
            return Ok(Some(d));
        }
        if self.noise > 0 {
            let bytes = std::mem::take(&mut self.noise);
            return Ok(Some(Decoded::Skipped {
                reason: "line_noise",
                bytes,
            }));
        }
        if src.is_empty() {
            return Ok(None);
        }
        let line = src.split();
        if self.discarding > 0 || line.len() > MAX_LINE {
            let bytes = self.discarding + line.len();
            self.discarding = 0;
            return Ok(Some(Decoded::Skipped {
                reason: "line_too_long",
                bytes,
            }));
        }
        Ok(Some(self.interpret(&line)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode_all, Protocol};
    use proptest::prelude::*;

    fn reads(bytes: &[u8]) -> Vec<Decoded> {
        decode_all(&mut Protocol::Lines(LinesDecoder::default()), bytes, false)
    }

    fn tag(d: &Decoded) -> (&str, ReadKind, Option<&str>) {
        match d {
            Decoded::Read(r) => (r.tag.as_str(), r.kind, r.symbology.as_deref()),
            other => panic!("expected a read, got {other:?}"),
        }
    }

    #[test]
    fn iata_bag_tag_and_aim_ean13_from_reference() {
        let out = reads(b"0125728359\r\n]E04006381333931\r\n");
        assert_eq!(out.len(), 2);
        assert_eq!(tag(&out[0]), ("0125728359", ReadKind::BagTag, None));
        assert_eq!(
            tag(&out[1]),
            ("4006381333931", ReadKind::Barcode, Some("]E0"))
        );
    }

    #[test]
    fn cr_lf_and_crlf_are_each_one_terminator() {
        let out = reads(b"A1\rB2\nC3\r\nD4\r\n");
        let tags: Vec<_> = out.iter().map(|d| tag(d).0.to_string()).collect();
        assert_eq!(tags, ["A1", "B2", "C3", "D4"]);
    }

    #[test]
    fn crlf_split_across_chunks_is_one_terminator() {
        let mut d = LinesDecoder::default();
        let mut buf = BytesMut::from(&b"ABC\r"[..]);
        assert!(matches!(
            d.decode(&mut buf).unwrap(),
            Some(Decoded::Read(_))
        ));
        buf.extend_from_slice(b"\nDEF\n");
        let next = d.decode(&mut buf).unwrap().unwrap();
        assert_eq!(tag(&next).0, "DEF");
        assert_eq!(d.decode(&mut buf).unwrap(), None);
    }

    #[test]
    fn stx_etx_stripped_and_gs_kept() {
        let out = reads(b"\x02]C1010012345678902\x1d10ABC\x03\r\n");
        let (t, _, sym) = tag(&out[0]);
        assert_eq!(t, "010012345678902\x1d10ABC");
        assert_eq!(sym, Some("]C1"));
    }

    #[test]
    fn garbage_is_skipped_with_a_reason_and_decoding_resumes() {
        let mut input = vec![0xFFu8, 0x00, 0x07, b'\n'];
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
        input.extend_from_slice(b"\n0125728359\n");
        let out = reads(&input);
        assert!(matches!(
            out[0],
            Decoded::Skipped {
                reason: "line_noise",
                bytes: 3
            }
        ));
        assert!(matches!(
            out[1],
            Decoded::Skipped {
                reason: "line_too_long",
                ..
            }
        ));
        assert_eq!(tag(&out[2]).0, "0125728359");
    }

    /// Regression: 16 NULs from an idle line joined the next scan, which was then dropped as
    /// `control_bytes`.
    #[test]
    fn nul_noise_before_a_scan_is_skipped_and_the_scan_read() {
        let mut input = vec![0u8; 16];
        input.extend_from_slice(b"0125000005\r\n");
        for cut in 0..input.len() {
            let mut d = LinesDecoder::default();
            let mut buf = BytesMut::from(&input[..cut]);
            let mut out = Vec::new();
            while let Some(x) = d.decode(&mut buf).unwrap() {
                out.push(x);
            }
            buf.extend_from_slice(&input[cut..]);
            while let Some(x) = d.decode(&mut buf).unwrap() {
                out.push(x);
            }
            assert_eq!(out.len(), 2, "cut at {cut}: {out:?}");
            assert_eq!(
                out[0],
                Decoded::Skipped {
                    reason: "line_noise",
                    bytes: 16
                }
            );
            assert_eq!(tag(&out[1]), ("0125000005", ReadKind::BagTag, None));
        }
        // Bytes that cannot start UTF-8, repeated STX, trailing NUL: the scan is still read.
        for input in [
            &b"\xf8\x800125000006\r\n"[..],
            b"\x80\x80\x800125000006\r\n",
            b"\xc0\xc10125000006\r\n",
            b"\x02\x02\x020125000006\r\n",
            b"0125000006\x00\r\n",
        ] {
            let out = reads(input);
            assert_eq!(tag(out.last().unwrap()).0, "0125000006", "{input:?}");
        }
        // Thousands of noise bytes (longer than a line) still do not swallow the scan.
        let mut long = vec![0xFFu8; 3 * MAX_LINE];
        long.extend_from_slice(b"\x00\x13ABC123\n");
        let out = reads(&long);
        assert_eq!(tag(out.last().unwrap()).0, "ABC123");
    }

    fn with(opts: LinesOptions, bytes: &[u8]) -> Vec<Decoded> {
        decode_all(&mut Protocol::Lines(LinesDecoder::new(opts)), bytes, true)
    }

    #[test]
    fn a_configured_suffix_ends_a_record_without_cr_lf() {
        let opts = LinesOptions {
            prefix: vec![0x02],
            suffix: vec![0x03],
            ..Default::default()
        };
        let out = with(
            opts,
            b"\x020125728359\x03\x02]E04006381333931\x03\r\n\x02ABC\x03",
        );
        let tags: Vec<_> = out.iter().map(|d| tag(d).0.to_string()).collect();
        assert_eq!(tags, ["0125728359", "4006381333931", "ABC"]);
        // A text prefix and a two-byte suffix.
        let opts = LinesOptions {
            prefix: b"RD:".to_vec(),
            suffix: b"#;".to_vec(),
            ..Default::default()
        };
        let out = with(opts, b"RD:0125728359#;RD:X1#;\nX2\n");
        let tags: Vec<_> = out.iter().map(|d| tag(d).0.to_string()).collect();
        assert_eq!(tags, ["0125728359", "X1", "X2"]);
    }

    #[test]
    fn a_field_template_gives_epc_rssi_and_antenna() {
        let opts = LinesOptions {
            fields: Some(vec![Field::Tag, Field::Rssi, Field::Antenna]),
            separator: ",".into(),
            ..Default::default()
        };
        let out = with(
            opts,
            b"e2801190a5021f80055817ca,-61.5,2\r\nE200,-70,1\r\nE200,strong,1\r\nE200,-70\r\nNOT HEX,-50,3\r\n",
        );
        let r = |i: usize| match &out[i] {
            Decoded::Read(r) => (r.tag.clone(), r.kind, r.rssi_dbm, r.antenna),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            r(0),
            (
                "E2801190A5021F80055817CA".into(),
                ReadKind::Epc,
                Some(-61.5),
                Some(2)
            )
        );
        assert_eq!(r(1), ("E200".into(), ReadKind::Epc, Some(-70.0), Some(1)));
        for i in [2, 3] {
            assert!(
                matches!(
                    out[i],
                    Decoded::Skipped {
                        reason: "bad_fields",
                        ..
                    }
                ),
                "{:?}",
                out[i]
            );
        }
        assert_eq!(
            r(4),
            ("NOT HEX".into(), ReadKind::Text, Some(-50.0), Some(3))
        );
        // Ignored columns and a tab separator.
        let opts = LinesOptions {
            fields: Some(vec![Field::Ignore, Field::Antenna, Field::Tag]),
            separator: "\t".into(),
            ..Default::default()
        };
        let out = with(opts, b"2026-11-30T10:00:00\t4\t3000AABB\n");
        match &out[..] {
            [Decoded::Read(r)] => assert_eq!((r.tag.as_str(), r.antenna), ("3000AABB", Some(4))),
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn any_chunking_decodes_like_the_whole(
            lines in proptest::collection::vec(
                proptest::collection::vec(prop_oneof![8 => 0x20u8..0x7F, 1 => any::<u8>()], 0..6000),
                0..12,
            ),
            cuts in proptest::collection::vec(0usize..80_000, 0..10),
        ) {
            let whole: Vec<u8> = lines.iter().flat_map(|l| l.iter().copied().chain(*b"\r\n")).collect();
            let expected = reads(&whole);
            let mut d = LinesDecoder::default();
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(whole.len())).collect();
            points.push(whole.len());
            points.sort_unstable();
            let mut last = 0;
            for p in points {
                buf.extend_from_slice(&whole[last..p]);
                last = p;
                while let Some(x) = d.decode(&mut buf).unwrap() { out.push(x); }
            }
            prop_assert_eq!(out, expected);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = decode_all(&mut Protocol::Lines(LinesDecoder::default()), &bytes, true);
        }
    }
}
