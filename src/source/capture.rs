//! Capture files (`hardware-fixtures/**/*.cap`): what a port or topic delivered, with times.
//! The format is specified in `hardware-fixtures/README.md`:
//!
//! ```text
//! scangate-capture v1 serial        (or: scangate-capture v1 mqtt)
//! # comment lines anywhere
//! <offset_ms> hex <hex bytes, spaces allowed>
//! <offset_ms> text <text with \r \n \t \\ \xHH escapes>
//! <offset_ms> <topic> hex|text <payload>      (mqtt captures)
//! ```

use std::fmt::Write as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureKind {
    Serial,
    Mqtt,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub offset_ms: u64,
    pub topic: Option<String>,
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("capture line {line}: {message}")]
pub struct CaptureError {
    pub line: usize,
    pub message: String,
}

fn err(line: usize, message: impl Into<String>) -> CaptureError {
    CaptureError {
        line,
        message: message.into(),
    }
}

pub fn parse_header(line: &str) -> Option<CaptureKind> {
    match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["scangate-capture", "v1", "serial"] => Some(CaptureKind::Serial),
        ["scangate-capture", "v1", "mqtt"] => Some(CaptureKind::Mqtt),
        _ => None,
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

pub fn unescape(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            let c = *b.get(i + 1)?;
            match c {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'\\' => out.push(b'\\'),
                b'x' => {
                    let h = std::str::from_utf8(b.get(i + 2..i + 4)?).ok()?;
                    out.push(u8::from_str_radix(h, 16).ok()?);
                    i += 2;
                }
                _ => return None,
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Escape bytes for a `text` record (printable ASCII kept, the rest as escapes).
pub fn escape(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &c in bytes {
        match c {
            b'\r' => s.push_str("\\r"),
            b'\n' => s.push_str("\\n"),
            b'\t' => s.push_str("\\t"),
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7E => s.push(c as char),
            _ => {
                let _ = write!(s, "\\x{c:02x}");
            }
        }
    }
    s
}

/// Parse one record line (not the header, not a comment). `line_no` is for messages.
pub fn parse_record(kind: CaptureKind, line: &str, line_no: usize) -> Result<Record, CaptureError> {
    let line = line.trim_end_matches(['\r', '\n']);
    let (offset, rest) = line
        .split_once(' ')
        .ok_or_else(|| err(line_no, "expected `<offset_ms> ...`"))?;
    let offset_ms: u64 = offset.parse().map_err(|_| {
        err(
            line_no,
            format!("\"{offset}\" is not an offset in milliseconds"),
        )
    })?;
    let (topic, rest) = match kind {
        CaptureKind::Serial => (None, rest),
        CaptureKind::Mqtt => {
            let (t, r) = rest
                .split_once(' ')
                .ok_or_else(|| err(line_no, "expected `<offset_ms> <topic> hex|text <payload>`"))?;
            (Some(t.to_string()), r)
        }
    };
    let (enc, payload) = rest.split_once(' ').unwrap_or((rest, ""));
    let bytes = match enc {
        "hex" => unhex(payload).ok_or_else(|| err(line_no, "invalid hex payload"))?,
        "text" => unescape(payload).ok_or_else(|| {
            err(
                line_no,
                "invalid escape in text payload (use \\r \\n \\t \\\\ \\xHH)",
            )
        })?,
        other => {
            return Err(err(
                line_no,
                format!("unknown encoding \"{other}\" (use hex or text)"),
            ))
        }
    };
    Ok(Record {
        offset_ms,
        topic,
        bytes,
    })
}

/// Parse a whole capture held in memory (fixtures, tests, the built-in demo).
pub fn parse(text: &str) -> Result<(CaptureKind, Vec<Record>), CaptureError> {
    let mut kind = None;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        match kind {
            None => {
                kind = Some(parse_header(t).ok_or_else(|| {
                    err(
                    i + 1,
                    "expected header `scangate-capture v1 serial` or `scangate-capture v1 mqtt`",
                )
                })?)
            }
            Some(k) => out.push(parse_record(k, line, i + 1)?),
        }
    }
    Ok((kind.ok_or_else(|| err(1, "empty capture: no header"))?, out))
}

/// [`parse`], but a last record line that is cut short (a recording that ended on a full disk
/// or a killed process) is left out with a warning instead of failing the whole capture.
pub fn parse_recording(
    text: &str,
) -> Result<(CaptureKind, Vec<Record>, Option<CaptureError>), CaptureError> {
    match parse(text) {
        Ok((k, r)) => Ok((k, r, None)),
        Err(e) => {
            let last = text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty() && !l.trim().starts_with('#'))
                .map(|(i, _)| i + 1)
                .last();
            if last != Some(e.line) || e.line <= 1 {
                return Err(e);
            }
            let head: String = text
                .lines()
                .take(e.line - 1)
                .flat_map(|l| [l, "\n"])
                .collect();
            let (k, r) = parse(&head)?;
            Ok((k, r, Some(e)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_cut_in_its_last_line_keeps_the_rest() {
        let text = "scangate-capture v1 serial\n0 hex 02 36\n5 hex 02 3";
        assert!(parse(text).is_err());
        let (_, recs, warning) = parse_recording(text).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(warning.map(|w| w.line), Some(3));
        // A bad line elsewhere is still an error.
        assert!(parse_recording("scangate-capture v1 serial\n0 hex 0\n5 hex 02").is_err());
    }

    #[test]
    fn serial_and_mqtt_records() {
        let (k, r) =
            parse("scangate-capture v1 serial\n# c\n0 text 0125728359\\r\\n\n15 hex 02 36 03\n")
                .unwrap();
        assert_eq!(k, CaptureKind::Serial);
        assert_eq!(r[0].bytes, b"0125728359\r\n");
        assert_eq!(
            r[1],
            Record {
                offset_ms: 15,
                topic: None,
                bytes: vec![2, 0x36, 3]
            }
        );
        let (_, m) = parse("scangate-capture v1 mqtt\n5 readers/1 text {\"a\":1}\n").unwrap();
        assert_eq!(m[0].topic.as_deref(), Some("readers/1"));
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            parse("scangate-capture v1 serial\nx text a\n")
                .unwrap_err()
                .line,
            2
        );
        assert!(parse("hello\n").is_err());
    }

    #[test]
    fn escape_roundtrips() {
        let b = b"\x02A\\b\r\n\xff".to_vec();
        assert_eq!(unescape(&escape(&b)).unwrap(), b);
    }
}
