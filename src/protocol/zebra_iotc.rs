//! `zebra-iotc`: Zebra FX7500 / FX9600 / ATR7000 / FXR90 IoT Connector tag data events.
//!
//! Facts (REFERENCE-READERS.md §7, from Zebra's IoT Connector docs and reelyActive's
//! barnowl-zebra): an event is `{"data": {…}, "timestamp": …, "type": "SIMPLE" | "INVENTORY" |
//! "PORTAL" | …}`. `data` holds `eventNum` (always), `format` (`epc`, `tid` …), `idHex` (hex,
//! case not fixed), and with the mode's metadata on, `antenna` (int), `peakRssi` (int, dBm),
//! `reads` (times seen since the last report), `channel`, `phase`, `MAC`. One message holds
//! one object, an array of them, or several objects concatenated with no separator (`}{`):
//! all three are accepted. Timestamps carry a `±hhmm` offset without a colon. Management and
//! heartbeat events have no `idHex`: they are frames without a read (`no_tag`).

use super::payload::{each_event, hex_id, int_field, tag_item, timestamp_ms, Item};
use crate::event::ReadKind;
use serde_json::Value;

/// Decode one payload; never panics.
pub fn decode(payload: &[u8], out: &mut Vec<Item>) {
    each_event(payload, event, out);
}

fn event(v: &Value, out: &mut Vec<Item>) {
    let Some(obj) = v.as_object() else {
        out.push(Item::skipped("not_an_event", 0));
        return;
    };
    let data = match obj.get("data") {
        Some(d @ Value::Object(_)) => d,
        Some(_) => {
            out.push(Item::skipped("bad_field", 0));
            return;
        }
        None if obj.contains_key("type") || obj.contains_key("timestamp") => {
            out.push(Item::frame("no_tag"));
            return;
        }
        None => {
            out.push(Item::skipped("not_an_event", 0));
            return;
        }
    };
    let tag = match data.get("idHex") {
        None | Some(Value::Null) => {
            out.push(Item::frame("no_tag"));
            return;
        }
        Some(Value::String(h)) => hex_id(h),
        Some(_) => None,
    };
    let Some(tag) = tag else {
        out.push(Item::skipped("bad_epc", 0));
        return;
    };
    let antenna = int_field(data, "antenna", 1, u16::MAX as i64);
    let rssi = match data.get("peakRssi") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if (-150.0..=150.0).contains(&f) => Ok(Some(f as f32)),
            _ => Err(super::payload::BadField),
        },
        Some(_) => Err(super::payload::BadField),
    };
    let (Ok(antenna), Ok(rssi)) = (antenna, rssi) else {
        out.push(Item::skipped("bad_field", 0));
        return;
    };
    out.push(tag_item(
        ReadKind::Epc,
        tag,
        antenna.map(|a| a as u16),
        rssi,
        obj.get("timestamp").and_then(timestamp_ms),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Decoded;

    fn reads(p: &str) -> Vec<Item> {
        let mut out = Vec::new();
        decode(p.as_bytes(), &mut out);
        out
    }

    /// The shape of REFERENCE-READERS.md §7 (barnowl-zebra's simulated event).
    #[test]
    fn reference_example_single_array_and_concatenated() {
        let one = r#"{"type":"SIMPLE","timestamp":"2024-03-01T12:00:00.000+0000","data":{"MAC":"C4:7D:CC:FF:FF:FF","antenna":1,"eventNum":1,"format":"epc","idHex":"7EDA9038051002710002C0AE","peakRssi":-60,"reads":1}}"#;
        let out = reads(one);
        assert_eq!(out.len(), 1);
        let Decoded::Read(r) = &out[0].decoded else {
            panic!("{out:?}")
        };
        assert_eq!(r.tag, "7EDA9038051002710002C0AE");
        assert_eq!(r.antenna, Some(1));
        assert_eq!(r.rssi_dbm, Some(-60.0));
        assert_eq!(out[0].reader_ms, Some(1_709_294_400_000));
        let lower = one.replace("7EDA9038051002710002C0AE", "7eda9038051002710002c0ae");
        assert_eq!(reads(&format!("[{one},{lower}]")).len(), 2);
        let cat = reads(&format!("{one}{lower}{one}"));
        assert_eq!(cat.len(), 3);
        assert!(cat.iter().all(
            |i| matches!(&i.decoded, Decoded::Read(r) if r.tag == "7EDA9038051002710002C0AE")
        ));
    }

    #[test]
    fn heartbeats_and_wrong_types() {
        assert_eq!(
            reads(r#"{"type":"heartbeat","timestamp":"2024-03-01T12:00:00.000+0000"}"#)[0].decoded,
            Decoded::Frame { what: "no_tag" }
        );
        assert_eq!(
            reads(r#"{"data":{"eventNum":3}}"#)[0].decoded,
            Decoded::Frame { what: "no_tag" }
        );
        for p in [
            r#"{"data":{"idHex":"7EZZ"}}"#,
            r#"{"data":{"idHex":7}}"#,
            r#"{"data":{"idHex":"7E","antenna":"one"}}"#,
            r#"{"data":{"idHex":"7E","peakRssi":"-60"}}"#,
            r#"{"data":{"idHex":"7E","peakRssi":-6000}}"#,
            r#"{"data":"7E"}"#,
            r#"[1,2]"#,
        ] {
            assert!(
                reads(p)
                    .iter()
                    .all(|i| matches!(i.decoded, Decoded::Skipped { .. })),
                "{p}"
            );
        }
    }
}
