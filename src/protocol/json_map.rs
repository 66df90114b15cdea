//! `json`: a generic mapping of JSON payloads to reads by JSON pointer (RFC 6901), for
//! readers without their own decoder and for sensors.
//!
//! `[source.json]` names where each field is: `tag`, `rssi` (dBm), `antenna`, `timestamp`
//! (RFC 3339 or unix seconds / ms), `value`, `sensor_type`, `unit`, `device`, and `items` (an
//! array of events inside each message). `sensor_type`, `unit` and `device` may be constants
//! instead (any text not starting with `/`). A message whose `value` is a number is a sensor
//! reading (the tag, when mapped, is its sensor id); otherwise `tag` must be there and the
//! message is a tag read.

use super::payload::{each_event, hex_id, name_field, number_in, tag_item, timestamp_ms, Item};
use super::Decoded;
use crate::event::{Read, ReadKind, SensorMeta};
use serde_json::Value;

/// Where the fields of an event are (pointers such as `/data/id`), from `[source.json]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JsonMapping {
    /// Pointer to an array of events inside each message (unset: the message is the event,
    /// or an array of events).
    pub items: Option<String>,
    pub tag: Option<String>,
    /// Pointer to the RSSI, in dBm.
    pub rssi: Option<String>,
    pub antenna: Option<String>,
    pub timestamp: Option<String>,
    /// Pointer to a sensor's numeric value.
    pub value: Option<String>,
    pub sensor_type: Option<Field>,
    pub unit: Option<Field>,
    pub device: Option<Field>,
    /// What a tag read is: `epc` (the tag must be hex; the default), `barcode`, `em4100` or
    /// `text`.
    pub tag_kind: Option<ReadKind>,
}

/// A text field: a pointer into the event, or a constant.
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    Pointer(String),
    Constant(String),
}

impl Field {
    /// A config value: text starting with `/` is a pointer, anything else a constant.
    pub fn parse(s: &str) -> Field {
        if s.starts_with('/') {
            Field::Pointer(s.to_string())
        } else {
            Field::Constant(s.to_string())
        }
    }

    fn get(&self, event: &Value) -> Option<String> {
        match self {
            Field::Pointer(p) => name_field(event.pointer(p)),
            Field::Constant(c) => Some(c.clone()),
        }
    }
}

/// Longest text tag (barcode or text kind), bytes: as the `lines` decoder allows.
const TEXT_TAG_MAX: usize = 4096;

impl JsonMapping {
    /// Decode one payload; never panics.
    pub fn decode(&self, payload: &[u8], out: &mut Vec<Item>) {
        each_event(
            payload,
            |v, out| match &self.items {
                None => self.event(v, out),
                Some(p) => match v.pointer(p) {
                    Some(Value::Array(a)) => {
                        if a.is_empty() {
                            out.push(Item::frame("no_tag"));
                        }
                        for e in a.iter().take(super::payload::EVENTS_MAX) {
                            self.event(e, out)
                        }
                    }
                    Some(_) => out.push(Item::skipped("bad_field", 0)),
                    None => out.push(Item::skipped("no_items", 0)),
                },
            },
            out,
        );
    }

    fn event(&self, v: &Value, out: &mut Vec<Item>) {
        let at = |p: &Option<String>| {
            p.as_deref()
                .and_then(|p| v.pointer(p))
                .filter(|x| !x.is_null())
        };
        let reader_ms = at(&self.timestamp).and_then(timestamp_ms);
        let antenna = match at(&self.antenna).map(|a| number_in(a, 0, u16::MAX as i64)) {
            None => None,
            Some(Ok(a)) => Some(a as u16),
            Some(Err(_)) => {
                out.push(Item::skipped("bad_field", 0));
                return;
            }
        };
        let rssi = match at(&self.rssi) {
            None => None,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(f) if (-150.0..=150.0).contains(&f) => Some(f as f32),
                _ => {
                    out.push(Item::skipped("bad_field", 0));
                    return;
                }
            },
            Some(_) => {
                out.push(Item::skipped("bad_field", 0));
                return;
            }
        };
        let tag_text = match at(&self.tag) {
            None => None,
            Some(Value::String(s)) => Some(s.trim().to_string()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(_) => {
                out.push(Item::skipped("bad_field", 0));
                return;
            }
        };
        if let Some(value) = at(&self.value) {
            let Some(value) = value.as_f64().filter(|f| f.is_finite()) else {
                out.push(Item::skipped("bad_value", 0));
                return;
            };
            let tag = tag_text
                .filter(|t| !t.is_empty() && t.len() <= 256 && !t.chars().any(char::is_control));
            let meta = SensorMeta {
                sensor_type: self.sensor_type.as_ref().and_then(|f| f.get(v)),
                unit: self.unit.as_ref().and_then(|f| f.get(v)),
                device: self.device.as_ref().and_then(|f| f.get(v)),
            };
            out.push(Item {
                decoded: Decoded::Read(Read {
                    kind: ReadKind::Sensor,
                    tag: tag.or_else(|| meta.device.clone()).unwrap_or_default(),
                    antenna,
                    rssi_dbm: rssi,
                    rssi_raw: None,
                    symbology: None,
                    value: Some(value),
                    sensor: Some(Box::new(meta)),
                }),
                reader_ms,
            });
            return;
        }
        let Some(text) = tag_text else {
            out.push(if self.value.is_some() {
                Item::frame("no_value")
            } else {
                Item::frame("no_tag")
            });
            return;
        };
        let kind = self.tag_kind.unwrap_or(ReadKind::Epc);
        let tag = match kind {
            ReadKind::Epc | ReadKind::Em4100 => hex_id(&text),
            _ => (!text.is_empty()
                && text.len() <= TEXT_TAG_MAX
                && !text.chars().any(char::is_control))
            .then_some(text),
        };
        let Some(tag) = tag else {
            out.push(Item::skipped("bad_tag", 0));
            return;
        };
        out.push(tag_item(kind, tag, antenna, rssi, reader_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(m: &JsonMapping, p: &str) -> Vec<Item> {
        let mut out = Vec::new();
        m.decode(p.as_bytes(), &mut out);
        out
    }

    #[test]
    fn tags_by_pointer_inside_items() {
        let m = JsonMapping {
            items: Some("/reads".into()),
            tag: Some("/id".into()),
            rssi: Some("/sig/dbm".into()),
            antenna: Some("/ant".into()),
            timestamp: Some("/t".into()),
            ..Default::default()
        };
        let out = reading(
            &m,
            r#"{"reads":[{"id":"e280aa","sig":{"dbm":-61.5},"ant":2,"t":1700000000123},{"id":"E280BB"}]}"#,
        );
        assert_eq!(out.len(), 2);
        assert!(
            matches!(&out[0].decoded, Decoded::Read(r) if r.tag == "E280AA" && r.rssi_dbm == Some(-61.5) && r.antenna == Some(2))
        );
        assert_eq!(out[0].reader_ms, Some(1_700_000_000_123));
        assert!(
            matches!(&out[1].decoded, Decoded::Read(r) if r.tag == "E280BB" && r.antenna.is_none())
        );
        assert!(matches!(
            reading(&m, r#"{"reads":5}"#)[0].decoded,
            Decoded::Skipped {
                reason: "bad_field",
                ..
            }
        ));
        assert!(matches!(
            reading(&m, r#"{"other":5}"#)[0].decoded,
            Decoded::Skipped {
                reason: "no_items",
                ..
            }
        ));
        assert!(matches!(
            reading(&m, r#"{"reads":[{"id":"nothex"}]}"#)[0].decoded,
            Decoded::Skipped {
                reason: "bad_tag",
                ..
            }
        ));
        assert!(matches!(
            reading(&m, r#"{"reads":[{"id":"E2","ant":-1}]}"#)[0].decoded,
            Decoded::Skipped {
                reason: "bad_field",
                ..
            }
        ));
    }

    #[test]
    fn sensors_with_constants_and_pointers() {
        let m = JsonMapping {
            tag: Some("/sensor".into()),
            value: Some("/v".into()),
            sensor_type: Some(Field::parse("temperature")),
            unit: Some(Field::parse("/u")),
            device: Some(Field::parse("/dev")),
            ..Default::default()
        };
        let out = reading(
            &m,
            r#"{"sensor":"belt-3-temp","v":25.5,"u":"C","dev":"plc-7"}"#,
        );
        let Decoded::Read(r) = &out[0].decoded else {
            panic!("{out:?}")
        };
        assert_eq!(
            (r.kind, r.tag.as_str(), r.value),
            (ReadKind::Sensor, "belt-3-temp", Some(25.5))
        );
        let s = r.sensor.as_deref().unwrap();
        assert_eq!(s.sensor_type.as_deref(), Some("temperature"));
        assert_eq!(s.unit.as_deref(), Some("C"));
        assert_eq!(s.device.as_deref(), Some("plc-7"));
        assert!(matches!(
            reading(&m, r#"{"v":"warm"}"#)[0].decoded,
            Decoded::Skipped {
                reason: "bad_value",
                ..
            }
        ));
        assert_eq!(
            reading(&m, r#"{"x":1}"#)[0].decoded,
            Decoded::Frame { what: "no_value" }
        );
    }
}
