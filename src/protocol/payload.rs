//! What the MQTT payload protocols share: one message → JSON values → reads.
//!
//! A payload protocol decodes one whole message (an MQTT payload) at a time, unlike the byte
//! stream decoders beside it. Its output is the same [`Decoded`] items, each with the time the
//! reader itself put on it (when it did). The JSON is parsed by serde_json (its recursion
//! limit of 128 keeps deeply nested input from overflowing the stack); a payload may hold one
//! object, an array of them, or several values one after another (with or without whitespace
//! between, as Zebra's IoT Connector sends them), in any mix.

use super::Decoded;
use serde_json::Value;

/// One item of a decoded payload, with the reader's own timestamp (unix ms) when it sent one
/// that could be parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub decoded: Decoded,
    pub reader_ms: Option<i64>,
}

impl Item {
    pub fn skipped(reason: &'static str, bytes: usize) -> Item {
        Item {
            decoded: Decoded::Skipped { reason, bytes },
            reader_ms: None,
        }
    }

    pub fn frame(what: &'static str) -> Item {
        Item {
            decoded: Decoded::Frame { what },
            reader_ms: None,
        }
    }
}

/// A tag read item (no symbology, no sensor fields).
pub fn tag_item(
    kind: crate::event::ReadKind,
    tag: String,
    antenna: Option<u16>,
    rssi_dbm: Option<f32>,
    reader_ms: Option<i64>,
) -> Item {
    Item {
        decoded: Decoded::Read(crate::event::Read {
            kind,
            tag,
            antenna,
            rssi_dbm,
            rssi_raw: None,
            symbology: None,
            value: None,
            sensor: None,
        }),
        reader_ms,
    }
}

/// Most events one payload may give: a 10 MB array of tiny objects must not become millions
/// of reads held at once. Events past it are one `too_many_events` item.
pub const EVENTS_MAX: usize = 100_000;

/// Every top-level JSON value of `payload`, arrays flattened one level (an array of events),
/// passed to `each`. Input that is not JSON ends the walk with one `bad_json` item (what came
/// before it stays decoded); an empty or all-whitespace payload is one `empty` item.
pub fn each_event(
    payload: &[u8],
    mut each: impl FnMut(&Value, &mut Vec<Item>),
    out: &mut Vec<Item>,
) {
    if payload.iter().all(u8::is_ascii_whitespace) {
        out.push(Item::skipped("empty", payload.len()));
        return;
    }
    let mut n = 0usize;
    let mut stream = serde_json::Deserializer::from_slice(payload).into_iter::<Value>();
    loop {
        let at = stream.byte_offset();
        match stream.next() {
            None => break,
            Some(Ok(v)) => {
                let items: &[Value] = match &v {
                    Value::Array(a) => a,
                    other => std::slice::from_ref(other),
                };
                for e in items {
                    if n >= EVENTS_MAX {
                        out.push(Item::skipped("too_many_events", payload.len() - at));
                        return;
                    }
                    n += 1;
                    each(e, out);
                }
            }
            Some(Err(_)) => {
                out.push(Item::skipped("bad_json", payload.len() - at));
                return;
            }
        }
    }
}

/// A hex tag id (EPC, TID) normalised to uppercase, or None when it is empty, too long
/// (more than [`TAG_HEX_MAX`] digits) or not hex. Odd lengths are allowed (some readers trim
/// a leading zero).
pub fn hex_id(s: &str) -> Option<String> {
    let s = s.trim();
    if s.is_empty() || s.len() > TAG_HEX_MAX || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(s.to_ascii_uppercase())
}

/// Longest tag id accepted, in hex digits: 496 bits, the longest EPC Gen2 allows, plus room
/// for a TID.
pub const TAG_HEX_MAX: usize = 128;

/// A reader's timestamp → unix ms. Accepts RFC 3339 (`2021-07-09T23:35:59.278427551Z`, an
/// offset with or without its colon: Zebra sends `+0000`), and numbers as unix time in
/// seconds (below 10^11) or milliseconds. None for anything else, or a time outside years
/// 1970–9999.
pub fn timestamp_ms(v: &Value) -> Option<i64> {
    let ms = match v {
        Value::String(s) => {
            let s = s.trim();
            chrono::DateTime::parse_from_rfc3339(s)
                .or_else(|_| chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z"))
                .ok()?
                .timestamp_millis()
        }
        Value::Number(n) => {
            let f = n.as_f64()?;
            if !f.is_finite() {
                return None;
            }
            if f.abs() < 1e11 {
                (f * 1000.0).round() as i64
            } else {
                f.round() as i64
            }
        }
        _ => return None,
    };
    (0..=253_402_300_799_999).contains(&ms).then_some(ms)
}

/// A field of the wrong type, or out of its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadField;

/// An integer field: Ok(None) when absent or null, Err when present with another type or
/// outside `lo..=hi`.
pub fn int_field(obj: &Value, key: &str, lo: i64, hi: i64) -> Result<Option<i64>, BadField> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => number_in(v, lo, hi).map(Some),
    }
}

/// A JSON number (an integer, or a float with no fraction) within `lo..=hi`.
pub fn number_in(v: &Value, lo: i64, hi: i64) -> Result<i64, BadField> {
    let n = match v {
        Value::Number(n) => match n.as_i64() {
            Some(i) => i,
            None => {
                let f = n.as_f64().ok_or(BadField)?;
                if f.fract() != 0.0 || !f.is_finite() || f.abs() > 1e15 {
                    return Err(BadField);
                }
                f as i64
            }
        },
        _ => return Err(BadField),
    };
    if (lo..=hi).contains(&n) {
        Ok(n)
    } else {
        Err(BadField)
    }
}

/// A short text field for a name (device, sensor type, unit): at most 128 characters
/// without control characters; anything else is None.
pub fn name_field(v: Option<&Value>) -> Option<String> {
    let s = v?.as_str()?.trim();
    (!s.is_empty() && s.chars().count() <= 128 && !s.chars().any(char::is_control))
        .then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn timestamps_of_both_vendors_and_numbers() {
        assert_eq!(
            timestamp_ms(&json!("2021-07-09T23:35:59.278427551Z")),
            Some(1_625_873_759_278)
        );
        assert_eq!(
            timestamp_ms(&json!("2023-02-24T10:14:42.851+0000")),
            Some(1_677_233_682_851)
        );
        assert_eq!(
            timestamp_ms(&json!("2023-02-24T12:14:42.851+0200")),
            Some(1_677_233_682_851)
        );
        assert_eq!(
            timestamp_ms(&json!("2023-02-24T10:14:42+00:00")),
            Some(1_677_233_682_000)
        );
        assert_eq!(timestamp_ms(&json!(1_677_233_682)), Some(1_677_233_682_000));
        assert_eq!(
            timestamp_ms(&json!(1_677_233_682_851i64)),
            Some(1_677_233_682_851)
        );
        assert_eq!(timestamp_ms(&json!("yesterday")), None);
        assert_eq!(timestamp_ms(&json!(-5)), None);
        assert_eq!(timestamp_ms(&json!(true)), None);
        assert_eq!(timestamp_ms(&json!(1e300)), None);
    }

    #[test]
    fn values_objects_arrays_and_concatenations() {
        let count = |p: &[u8]| {
            let mut out = Vec::new();
            let mut n = 0;
            each_event(p, |_, _| n += 1, &mut out);
            (n, out)
        };
        assert_eq!(count(br#"{"a":1}"#).0, 1);
        assert_eq!(count(br#"[{"a":1},{"a":2}]"#).0, 2);
        assert_eq!(count(br#"{"a":1}{"a":2} {"a":3}"#).0, 3);
        assert_eq!(count(b"{\"a\":1}\n[{\"a\":2}]\r\n").0, 2);
        let (n, out) = count(br#"{"a":1}{"a":"#);
        assert_eq!(n, 1);
        assert!(matches!(
            out[..],
            [Item {
                decoded: Decoded::Skipped {
                    reason: "bad_json",
                    bytes: 5
                },
                ..
            }]
        ));
        assert!(matches!(
            count(b" \r\n").1[..],
            [Item {
                decoded: Decoded::Skipped {
                    reason: "empty",
                    ..
                },
                ..
            }]
        ));
        let deep = "[".repeat(100_000);
        assert!(matches!(
            count(deep.as_bytes()).1[..],
            [Item {
                decoded: Decoded::Skipped {
                    reason: "bad_json",
                    ..
                },
                ..
            }]
        ));
    }

    #[test]
    fn numbers_and_hex() {
        assert_eq!(number_in(&json!(3), 0, 10), Ok(3));
        assert_eq!(number_in(&json!(3.0), 0, 10), Ok(3));
        assert_eq!(number_in(&json!(3.5), 0, 10), Err(BadField));
        assert_eq!(number_in(&json!("3"), 0, 10), Err(BadField));
        assert_eq!(number_in(&json!(11), 0, 10), Err(BadField));
        assert_eq!(hex_id("e2801190a5"), Some("E2801190A5".into()));
        assert_eq!(hex_id("E28G"), None);
        assert_eq!(hex_id(""), None);
        assert_eq!(hex_id(&"A".repeat(129)), None);
    }
}
