//! Wire profiles: events → request body JSON, exactly as the upstream contracts define them,
//! then `[upstream.fields]` renames (top-level event keys) and constants.
//!
//! JSON is written directly (no intermediate `serde_json::Value`): encoding is on the hot path
//! of every event, and this costs a fraction of a microsecond per event.

use crate::config::{FieldMapping, Profile};
use crate::event::{write_rfc3339_ms, ReadKind, SpooledEvent};
use uuid::Uuid;

/// Which `event_type` a batch carries (the bag-events contract allows one per batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchType {
    Scan,
    Sensor,
}

pub fn batch_type(e: &SpooledEvent) -> BatchType {
    if e.body.kind == ReadKind::Sensor {
        BatchType::Sensor
    } else {
        BatchType::Scan
    }
}

/// Stable key of a batch: UUIDv5 over its event ids. The same events give the same key on
/// every retry; it is sent as `Idempotency-Key` and as the collect profile's `batch_id`.
pub fn batch_key(events: &[SpooledEvent]) -> Uuid {
    const NS: Uuid = Uuid::from_u128(0x6a1c_3f0e_5b7d_4c2a_9e11_0d5c_a7f3_2b60);
    let mut bytes = Vec::with_capacity(events.len() * 16);
    for e in events {
        bytes.extend_from_slice(e.event_id.as_bytes());
    }
    Uuid::new_v5(&NS, &bytes)
}

pub struct Encoder {
    pub profile: Profile,
    pub gateway_id: String,
    pub site: String,
    pub event_type: String,
    pub fields: FieldMapping,
}

/// A JSON string literal: unescaped runs are copied whole; `"`, `\\` and control characters
/// are escaped (RFC 8259 section 7).
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let b = s.as_bytes();
    out.reserve(b.len() + 2);
    out.push(b'"');
    let mut run = 0;
    for (i, &c) in b.iter().enumerate() {
        if c >= 0x20 && c != b'"' && c != b'\\' {
            continue;
        }
        out.extend_from_slice(&b[run..i]);
        run = i + 1;
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(c >> 4) as usize],
                HEX[(c & 15) as usize],
            ]),
        }
    }
    out.extend_from_slice(&b[run..]);
    out.push(b'"');
}

/// Writes one JSON object, applying renames to its keys.
struct Obj<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
    rename: &'a [(String, String)],
}

impl<'a> Obj<'a> {
    fn open(out: &'a mut Vec<u8>, rename: &'a [(String, String)]) -> Self {
        out.push(b'{');
        Obj {
            out,
            first: true,
            rename,
        }
    }
    /// `k` is one of this module's field names (plain ASCII, nothing to escape); a rename
    /// comes from the config and is escaped.
    fn key(&mut self, k: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        match self.rename.iter().find(|(from, _)| from == k) {
            Some((_, to)) => push_json_str(self.out, to),
            None => {
                debug_assert!(k
                    .bytes()
                    .all(|c| c.is_ascii_graphic() && c != b'"' && c != b'\\'));
                self.out.push(b'"');
                self.out.extend_from_slice(k.as_bytes());
                self.out.push(b'"');
            }
        }
        self.out.push(b':');
    }
    fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        push_json_str(self.out, v);
    }
    fn opt_str(&mut self, k: &str, v: Option<&str>) {
        if let Some(v) = v {
            self.str(k, v);
        }
    }
    fn int(&mut self, k: &str, v: i64) {
        self.key(k);
        self.out
            .extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
    }
    fn time(&mut self, k: &str, ms: i64) {
        self.key(k);
        self.out.push(b'"');
        write_rfc3339_ms(self.out, ms);
        self.out.push(b'"');
    }
    /// A timestamp already formatted (with its quotes) by [`quoted_time`].
    fn time_raw(&mut self, k: &str, quoted: &[u8]) {
        self.key(k);
        self.out.extend_from_slice(quoted);
    }
    fn uuid(&mut self, k: &str, id: &Uuid) {
        self.key(k);
        let mut buf = [0u8; 36];
        self.out.push(b'"');
        self.out
            .extend_from_slice(id.hyphenated().encode_lower(&mut buf).as_bytes());
        self.out.push(b'"');
    }
    fn raw(&mut self, k: &str, v: &str) {
        self.key(k);
        self.out.extend_from_slice(v.as_bytes());
    }
    fn close(self) {
        self.out.push(b'}');
    }
}

fn fmt_f64(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

const NO_RENAME: &[(String, String)] = &[];

/// `"2025-11-16T10:30:00.123Z"` with quotes: formatted once per event, used for the
/// `timestamp` and `first_seen` fields (and `last_seen` when equal).
fn quoted_time(ms: i64) -> Vec<u8> {
    let mut v = Vec::with_capacity(26);
    v.push(b'"');
    write_rfc3339_ms(&mut v, ms);
    v.push(b'"');
    v
}

impl Encoder {
    /// The request body for `events` (all of one [`BatchType`]).
    pub fn encode(&self, events: &[SpooledEvent], key: Uuid) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(events, key, &mut out);
        out
    }

    /// Encode into `out` (cleared first; its capacity is reused).
    pub fn encode_into(&self, events: &[SpooledEvent], key: Uuid, out: &mut Vec<u8>) {
        out.clear();
        out.reserve(128 + events.len() * 480);
        match self.profile {
            Profile::BagEvents => {
                let kind = events.first().map(batch_type).unwrap_or(BatchType::Scan);
                out.extend_from_slice(b"{\"events\":[");
                for (i, e) in events.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    self.bag_event(out, e);
                }
                out.extend_from_slice(b"],\"source_system\":");
                push_json_str(out, &self.gateway_id);
                out.extend_from_slice(b",\"event_type\":");
                push_json_str(
                    out,
                    if kind == BatchType::Sensor {
                        "sensor"
                    } else {
                        "scan"
                    },
                );
                out.push(b'}');
            }
            Profile::Collect => {
                out.extend_from_slice(b"{\"batch_id\":");
                push_json_str(out, &key.to_string());
                out.extend_from_slice(b",\"events\":[");
                for (i, e) in events.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    self.collect_event(out, e);
                }
                out.extend_from_slice(b"],\"metadata\":");
                let mut m = Obj::open(out, NO_RENAME);
                m.str("source", "scangate");
                m.str("version", env!("CARGO_PKG_VERSION"));
                m.str("gateway_id", &self.gateway_id);
                m.close();
                out.push(b'}');
            }
        }
    }

    fn constants(&self, o: &mut Obj<'_>) {
        for (k, v) in &self.fields.constant {
            o.str(k, v);
        }
    }

    fn bag_event(&self, out: &mut Vec<u8>, e: &SpooledEvent) {
        let b = &e.body;
        let first = quoted_time(b.first_seen_ms);
        let mut o = Obj::open(out, &self.fields.rename);
        o.uuid("event_id", &e.event_id);
        o.time_raw("timestamp", &first);
        if b.kind == ReadKind::Sensor {
            o.str("sensor_id", &b.tag);
            o.str("location", &b.location);
            o.str("device_id", &b.device);
            o.raw(
                "value",
                &b.value.map(fmt_f64).unwrap_or_else(|| "null".into()),
            );
        } else {
            o.str("bag_id", &b.tag);
            o.str("location", &b.location);
            o.str("device_id", &b.device);
            o.str(
                "scan_type",
                b.scan_type.as_deref().unwrap_or(b.kind.default_scan_type()),
            );
            // The contract's signal_strength is an integer: peak RSSI in dBm, rounded.
            match b.rssi_cdbm {
                Some(c) => o.int("signal_strength", ((c as f64) / 100.0).round() as i64),
                None => o.raw("signal_strength", "null"),
            }
            o.int("read_count", b.read_count as i64);
            match b.antenna {
                Some(a) => o.int("antenna", a as i64),
                None => o.raw("antenna", "null"),
            }
            o.str("tag_kind", b.kind.as_str());
            o.opt_str("symbology", b.symbology.as_deref());
        }
        o.time_raw("first_seen", &first);
        if b.last_seen_ms == b.first_seen_ms {
            o.time_raw("last_seen", &first);
        } else {
            o.time("last_seen", b.last_seen_ms);
        }
        o.str("gateway_id", &self.gateway_id);
        o.int("seq", e.seq as i64);
        if b.clock_unsynced() {
            o.raw("clock_unsynced", "true");
        }
        self.constants(&mut o);
        o.close();
    }

    fn collect_event(&self, out: &mut Vec<u8>, e: &SpooledEvent) {
        let b = &e.body;
        let mut o = Obj::open(out, &self.fields.rename);
        o.uuid("event_id", &e.event_id);
        o.str("learner_id", &b.tag);
        o.str("tenant_id", &self.site);
        o.str("event_type", &self.event_type);
        o.time("timestamp", b.first_seen_ms);
        o.str("source_service", &self.gateway_id);
        o.key("event_data");
        {
            let mut d = Obj::open(o.out, NO_RENAME);
            d.str("tag_kind", b.kind.as_str());
            d.str("location", &b.location);
            d.str("device_id", &b.device);
            d.str("source", &b.source);
            d.str(
                "scan_type",
                b.scan_type.as_deref().unwrap_or(b.kind.default_scan_type()),
            );
            if let Some(a) = b.antenna {
                d.int("antenna", a as i64);
            }
            if let Some(r) = b.rssi_dbm() {
                d.raw("rssi_dbm", &fmt_f64(r));
            }
            d.int("read_count", b.read_count as i64);
            d.time("first_seen", b.first_seen_ms);
            d.time("last_seen", b.last_seen_ms);
            d.opt_str("symbology", b.symbology.as_deref());
            if let Some(v) = b.value {
                d.raw("value", &fmt_f64(v));
            }
            d.close();
        }
        o.key("metadata");
        {
            let mut m = Obj::open(o.out, NO_RENAME);
            m.str("gateway_id", &self.gateway_id);
            m.int("seq", e.seq as i64);
            m.uuid("boot_id", &e.boot_id);
            if b.clock_unsynced() {
                m.raw("clock_unsynced", "true");
            }
            m.close();
        }
        self.constants(&mut o);
        o.close();
    }
}

#[cfg(test)]
mod tests {
    proptest::proptest! {
        #[test]
        fn json_strings_round_trip(s in "\\PC*|[\\x00-\\x7f]*") {
            let mut out = Vec::new();
            super::push_json_str(&mut out, &s);
            let back: String = serde_json::from_slice(&out).unwrap();
            proptest::prop_assert_eq!(back, s);
        }
    }

    use super::*;
    use crate::event::{event_id, EventBody, Loc};

    pub fn sample(seq: u64, kind: ReadKind) -> SpooledEvent {
        SpooledEvent {
            loc: Loc {
                chunk: 1,
                idx: seq as u32,
            },
            seq,
            committed_ms: 1_763_289_000_000,
            event_id: event_id(9, seq, 1_763_289_000_000),
            boot_id: Uuid::nil(),
            body: EventBody {
                kind,
                tag: "0125728359".into(),
                source: "belt".into(),
                location: "PTY_SORT_\"3\"".into(),
                device: "RFID_1".into(),
                scan_type: None,
                antenna: Some(2),
                rssi_cdbm: Some(-5260),
                read_count: 3,
                first_seen_ms: 1_763_289_000_000,
                last_seen_ms: 1_763_289_000_500,
                symbology: None,
                value: None,
            },
        }
    }

    fn enc(profile: Profile) -> Encoder {
        Encoder {
            profile,
            gateway_id: "gw1".into(),
            site: "PTY".into(),
            event_type: "interaction".into(),
            fields: FieldMapping::default(),
        }
    }

    #[test]
    fn bag_events_envelope_and_scan_fields() {
        let evs = vec![sample(1, ReadKind::BagTag), sample(2, ReadKind::Epc)];
        let v: serde_json::Value =
            serde_json::from_slice(&enc(Profile::BagEvents).encode(&evs, batch_key(&evs))).unwrap();
        assert_eq!(v["source_system"], "gw1");
        assert_eq!(v["event_type"], "scan");
        let e = &v["events"][0];
        assert_eq!(e["event_id"], evs[0].event_id.to_string());
        assert_eq!(e["bag_id"], "0125728359");
        assert_eq!(e["location"], "PTY_SORT_\"3\"");
        assert_eq!(e["scan_type"], "barcode");
        assert_eq!(v["events"][1]["scan_type"], "rfid");
        assert_eq!(e["signal_strength"], -53);
        assert_eq!(e["read_count"], 3);
        assert_eq!(e["timestamp"], "2025-11-16T10:30:00.000Z");
        assert_eq!(e["last_seen"], "2025-11-16T10:30:00.500Z");
        assert_eq!(e["seq"], 1);
    }

    #[test]
    fn collect_envelope_and_mapping() {
        let evs = vec![sample(7, ReadKind::Epc)];
        let mut en = enc(Profile::Collect);
        en.fields.rename.push(("learner_id".into(), "tag".into()));
        en.fields.constant.push(("airport".into(), "PTY".into()));
        let key = batch_key(&evs);
        let v: serde_json::Value = serde_json::from_slice(&en.encode(&evs, key)).unwrap();
        assert_eq!(v["batch_id"], key.to_string());
        let e = &v["events"][0];
        assert_eq!(e["tag"], "0125728359");
        assert!(e.get("learner_id").is_none());
        assert_eq!(e["tenant_id"], "PTY");
        assert_eq!(e["event_type"], "interaction");
        assert_eq!(e["airport"], "PTY");
        assert_eq!(e["event_data"]["rssi_dbm"], -52.6);
        assert_eq!(e["metadata"]["seq"], 7);
    }

    #[test]
    fn batch_key_is_stable_and_content_dependent() {
        let a = vec![sample(1, ReadKind::Epc), sample(2, ReadKind::Epc)];
        assert_eq!(batch_key(&a), batch_key(&a.clone()));
        assert_ne!(batch_key(&a), batch_key(&a[..1]));
    }

    #[test]
    fn control_chars_are_escaped() {
        let mut out = Vec::new();
        push_json_str(&mut out, "a\u{1d}b\"\\");
        let s: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(s, "a\u{1d}b\"\\");
    }
}
