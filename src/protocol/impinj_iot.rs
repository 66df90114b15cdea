//! `impinj-iot`: Impinj R700 / R720 IoT device interface events (MQTT, also its HTTP stream
//! and webhook bodies).
//!
//! Facts (REFERENCE-READERS.md §6, from Impinj's IoT device interface docs): each event is an
//! object `{"timestamp": RFC 3339 UTC up to ns, "hostname": …, "eventType": …,
//! "tagInventoryEvent": {…}}`; `eventType` is missing from some firmware, so a tag event is
//! recognised by its `tagInventoryEvent` key. Its fields are all optional: `epcHex`, else
//! `epc` (base64 of the EPC bytes); `antennaPort` (1-based); `peakRssiCdbm` (hundredths of a
//! dBm: −5400 is −54.00 dBm). The MQTT payload form is not documented: an object, an array
//! of them (the webhook's form) and NDJSON (the HTTP stream's form) are all accepted.
//!
//! Other events (`antennaConnectedEvent`, `inventoryStatusEvent`, `gpiTransitionEvent`,
//! `overflowEvent` …) are frames without a read (`status`); an `overflowEvent` means the reader
//! itself dropped reads and is counted as `reader_overflow`. The `hostname` is not used: an
//! event's `device_id` is its source's `device` (one `[[source]]` per reader).

use super::payload::{each_event, hex_id, int_field, tag_item, timestamp_ms, Item};
use crate::event::ReadKind;
use base64::Engine;
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
    let Some(tag_event) = obj.get("tagInventoryEvent") else {
        if obj.contains_key("overflowEvent") {
            out.push(Item::frame("reader_overflow"));
        } else if obj.keys().any(|k| k.ends_with("Event")) {
            out.push(Item::frame("status"));
        } else {
            out.push(Item::skipped("not_an_event", 0));
        }
        return;
    };
    if !tag_event.is_object() {
        out.push(Item::skipped("bad_field", 0));
        return;
    }
    let reader_ms = obj.get("timestamp").and_then(timestamp_ms);
    let tag = match (tag_event.get("epcHex"), tag_event.get("epc")) {
        (Some(Value::String(h)), _) => hex_id(h),
        (Some(_), _) => None,
        (None, Some(Value::String(b))) => base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .ok()
            .filter(|b| !b.is_empty() && b.len() * 2 <= super::payload::TAG_HEX_MAX)
            .map(|b| super::hex_upper(&b)),
        (None, Some(_)) => None,
        (None, None) => {
            out.push(Item::frame("no_tag"));
            return;
        }
    };
    let Some(tag) = tag else {
        out.push(Item::skipped("bad_epc", 0));
        return;
    };
    // Antenna ports are 1-based; 0 and beyond u16 are wrong.
    let antenna = int_field(tag_event, "antennaPort", 1, u16::MAX as i64);
    // ±150 dBm is far beyond any receiver; larger values are not centi-dBm.
    let rssi = int_field(tag_event, "peakRssiCdbm", -15_000, 15_000);
    let (Ok(antenna), Ok(rssi)) = (antenna, rssi) else {
        out.push(Item::skipped("bad_field", 0));
        return;
    };
    out.push(tag_item(
        ReadKind::Epc,
        tag,
        antenna.map(|a| a as u16),
        rssi.map(|c| c as f32 / 100.0),
        reader_ms,
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

    /// The example of REFERENCE-READERS.md §6 (Impinj's Protected Mode example README).
    #[test]
    fn reference_example() {
        let out = reads(
            r#"{"timestamp":"2021-07-09T23:35:59.278427551Z","hostname":"impinj-13-f8-f5","tagInventoryEvent":{"epcHex":"E2801190A5021F80055817CA","antennaPort":1,"peakRssiCdbm":-2650,"transmitPowerCdbm":3000,"tagAccessPasswordWriteResponse":{"response":"success"},"tagSecurityModesWriteResponse":{"response":"success"}}}"#,
        );
        assert_eq!(out.len(), 1);
        let Decoded::Read(r) = &out[0].decoded else {
            panic!("{out:?}")
        };
        assert_eq!(r.tag, "E2801190A5021F80055817CA");
        assert_eq!(r.antenna, Some(1));
        assert_eq!(r.rssi_dbm, Some(-26.5));
        assert_eq!(out[0].reader_ms, Some(1_625_873_759_278));
    }

    #[test]
    fn base64_epc_arrays_ndjson_and_other_events() {
        // 0xE2 0x80 0x11 → "4oAR"
        let out = reads(
            "[{\"tagInventoryEvent\":{\"epc\":\"4oAR\"}},{\"antennaConnectedEvent\":{}}]\n{\"overflowEvent\":{}}\r\n{\"tagInventoryEvent\":{}}",
        );
        assert!(
            matches!(&out[0].decoded, Decoded::Read(r) if r.tag == "E28011" && r.antenna.is_none())
        );
        assert_eq!(out[1].decoded, Decoded::Frame { what: "status" });
        assert_eq!(
            out[2].decoded,
            Decoded::Frame {
                what: "reader_overflow"
            }
        );
        assert_eq!(out[3].decoded, Decoded::Frame { what: "no_tag" });
    }

    #[test]
    fn wrong_types_are_counted_not_read() {
        for p in [
            r#"{"tagInventoryEvent":{"epcHex":"XYZ"}}"#,
            r#"{"tagInventoryEvent":{"epcHex":12}}"#,
            r#"{"tagInventoryEvent":{"epc":"!!"}}"#,
            r#"{"tagInventoryEvent":{"epcHex":"E280","antennaPort":"1"}}"#,
            r#"{"tagInventoryEvent":{"epcHex":"E280","antennaPort":0}}"#,
            r#"{"tagInventoryEvent":{"epcHex":"E280","peakRssiCdbm":-99999999}}"#,
            r#"{"tagInventoryEvent":"E280"}"#,
            r#"{"hello":1}"#,
            r#"17"#,
        ] {
            let out = reads(p);
            assert!(
                matches!(
                    out[..],
                    [Item {
                        decoded: Decoded::Skipped { .. },
                        ..
                    }]
                ),
                "{p}: {out:?}"
            );
        }
    }
}
