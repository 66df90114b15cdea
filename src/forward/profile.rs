//! Wire profiles: events → request body JSON, exactly as the upstream contracts define them,
//! then `[upstream.fields]` renames (top-level event keys) and constants.
//!
//! JSON is written directly (no intermediate `serde_json::Value`): encoding is on the hot path
//! of every event. Every string goes through serde_json's escaper ([`push_json_str`]); only
//! the envelope, keys and numbers are written here.

use crate::config::{FieldMapping, Profile};
use crate::event::{write_rfc3339_ms, ReadKind, SpooledEvent};
use std::sync::Arc;
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

/// Stable key of a batch: a UUIDv5 of the 128-bit XXH3 digest of its event ids. The same
/// events give the same key on every retry; it is sent as `Idempotency-Key` and as the collect
/// profile's `batch_id`. (SHA-1 over every id cost ~25 µs per 500-event batch; XXH3 hashes
/// them in well under one, and 128 bits keep accidental collisions out of reach.)
pub fn batch_key(events: &[SpooledEvent]) -> Uuid {
    const NS: Uuid = Uuid::from_u128(0x6a1c_3f0e_5b7d_4c2a_9e11_0d5c_a7f3_2b60);
    let mut bytes = Vec::with_capacity(events.len() * 16);
    for e in events {
        bytes.extend_from_slice(e.event_id.as_bytes());
    }
    let digest = xxhash_rust::xxh3::xxh3_128(&bytes);
    Uuid::new_v5(&NS, &digest.to_le_bytes())
}

/// The keys a profile writes at the top level of each event, before `[upstream.fields]`
/// renames. A constant or a rename target must not be one of them (after renames): it would
/// write a key twice, and an `event_id`, `seq` or `timestamp` constant would give every event
/// the same identity, which an idempotent upstream drops as duplicates.
pub fn event_keys(profile: Profile) -> &'static [&'static str] {
    match profile {
        Profile::BagEvents => &[
            "event_id",
            "timestamp",
            "sensor_id",
            "location",
            "device_id",
            "value",
            "sensor_type",
            "unit",
            "bag_id",
            "scan_type",
            "signal_strength",
            "read_count",
            "antenna",
            "tag_kind",
            "symbology",
            "first_seen",
            "last_seen",
            "gateway_id",
            "seq",
            "clock",
        ],
        Profile::Collect => &[
            "event_id",
            "learner_id",
            "tenant_id",
            "event_type",
            "timestamp",
            "source_service",
            "event_data",
            "metadata",
        ],
    }
}

/// The field names this module writes. Each has its JSON key (`"name":`, after
/// `[upstream.fields]` renames) written once, in [`Encoder::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum K {
    EventId,
    Timestamp,
    SensorId,
    Location,
    DeviceId,
    Value,
    BagId,
    ScanType,
    SignalStrength,
    ReadCount,
    Antenna,
    TagKind,
    Symbology,
    FirstSeen,
    LastSeen,
    GatewayId,
    Seq,
    Clock,
    LearnerId,
    TenantId,
    EventType,
    SourceService,
    EventData,
    Metadata,
    Source,
    RssiDbm,
    BootId,
    Version,
    SensorType,
    Unit,
}

impl K {
    const ALL: [K; 30] = [
        K::EventId,
        K::Timestamp,
        K::SensorId,
        K::Location,
        K::DeviceId,
        K::Value,
        K::BagId,
        K::ScanType,
        K::SignalStrength,
        K::ReadCount,
        K::Antenna,
        K::TagKind,
        K::Symbology,
        K::FirstSeen,
        K::LastSeen,
        K::GatewayId,
        K::Seq,
        K::Clock,
        K::LearnerId,
        K::TenantId,
        K::EventType,
        K::SourceService,
        K::EventData,
        K::Metadata,
        K::Source,
        K::RssiDbm,
        K::BootId,
        K::Version,
        K::SensorType,
        K::Unit,
    ];

    fn name(self) -> &'static str {
        match self {
            K::EventId => "event_id",
            K::Timestamp => "timestamp",
            K::SensorId => "sensor_id",
            K::Location => "location",
            K::DeviceId => "device_id",
            K::Value => "value",
            K::BagId => "bag_id",
            K::ScanType => "scan_type",
            K::SignalStrength => "signal_strength",
            K::ReadCount => "read_count",
            K::Antenna => "antenna",
            K::TagKind => "tag_kind",
            K::Symbology => "symbology",
            K::FirstSeen => "first_seen",
            K::LastSeen => "last_seen",
            K::GatewayId => "gateway_id",
            K::Seq => "seq",
            K::Clock => "clock",
            K::LearnerId => "learner_id",
            K::TenantId => "tenant_id",
            K::EventType => "event_type",
            K::SourceService => "source_service",
            K::EventData => "event_data",
            K::Metadata => "metadata",
            K::Source => "source",
            K::RssiDbm => "rssi_dbm",
            K::BootId => "boot_id",
            K::SensorType => "sensor_type",
            K::Unit => "unit",
            K::Version => "version",
        }
    }
}

/// `,"key":` for every [`K`], indexed by `K as usize` (the comma is skipped for an object's
/// first key).
struct Keys(Vec<Vec<u8>>);

impl Keys {
    fn new(rename: &[(String, String)]) -> Self {
        Keys(
            K::ALL
                .iter()
                .map(|k| {
                    let mut v = vec![b','];
                    match rename.iter().find(|(from, _)| from == k.name()) {
                        Some((_, to)) => push_json_str(&mut v, to),
                        None => push_json_str(&mut v, k.name()),
                    }
                    v.push(b':');
                    v
                })
                .collect(),
        )
    }
}

/// Names (location, device, scan type) as JSON string literals, remembered by allocation: the
/// events of a batch share a handful of `Arc<str>` names (the pipeline's, or the spool's
/// shared copies), so each is escaped once rather than once per event.
#[derive(Default)]
struct NameCache(Vec<(Arc<str>, Vec<u8>)>);

/// Names remembered at once (a gateway has a few sources, each with a few names).
const NAME_CACHE_MAX: usize = 16;

impl NameCache {
    fn get(&mut self, name: &Arc<str>) -> &[u8] {
        let i = match self.0.iter().position(|(n, _)| Arc::ptr_eq(n, name)) {
            Some(i) => i,
            None => {
                if self.0.len() == NAME_CACHE_MAX {
                    self.0.remove(0);
                }
                let mut json = Vec::with_capacity(name.len() + 2);
                push_json_str(&mut json, name);
                self.0.push((name.clone(), json));
                self.0.len() - 1
            }
        };
        &self.0[i].1
    }
}

/// `,"location":…,"device_id":…,"scan_type":…` of the bag-events scan events, remembered per
/// (location, device, scan type) allocation: one copy per event instead of six.
#[derive(Default)]
struct PlaceCache(Vec<(Place, Vec<u8>)>);

/// The names a [`PlaceCache`] segment is written from; held so that the allocations compared
/// by address stay alive.
#[derive(Clone)]
struct Place {
    location: Arc<str>,
    device: Arc<str>,
    scan_type: Result<Arc<str>, &'static str>,
}

impl Place {
    fn same(&self, b: &crate::event::EventBody) -> bool {
        Arc::ptr_eq(&self.location, &b.location)
            && Arc::ptr_eq(&self.device, &b.device)
            && match (&self.scan_type, &b.scan_type) {
                (Ok(a), Some(t)) => Arc::ptr_eq(a, t),
                (Err(d), None) => *d == b.kind.default_scan_type(),
                _ => false,
            }
    }
}

impl PlaceCache {
    fn get(&mut self, keys: &Keys, b: &crate::event::EventBody) -> &[u8] {
        let i = match self.0.iter().position(|(p, _)| p.same(b)) {
            Some(i) => i,
            None => {
                if self.0.len() == NAME_CACHE_MAX {
                    self.0.remove(0);
                }
                let place = Place {
                    location: b.location.clone(),
                    device: b.device.clone(),
                    scan_type: b.scan_type.clone().ok_or(b.kind.default_scan_type()),
                };
                let mut seg = Vec::new();
                for (k, v) in [
                    (K::Location, &*place.location),
                    (K::DeviceId, &*place.device),
                    (
                        K::ScanType,
                        place.scan_type.as_deref().unwrap_or_else(|d| d),
                    ),
                ] {
                    seg.extend_from_slice(&keys.0[k as usize]);
                    push_json_str(&mut seg, v);
                }
                self.0.push((place, seg));
                self.0.len() - 1
            }
        };
        &self.0[i].1
    }
}

/// Request bodies of one wire profile, with `[upstream.fields]` applied.
pub struct Encoder {
    profile: Profile,
    pub gateway_id: String,
    site: String,
    event_type: String,
    keys: Keys,
    /// Keys of the nested objects (`event_data`, `metadata`), which renames do not touch.
    plain: Keys,
    gateway_json: Vec<u8>,
    /// `,"name":"value"` of every `[upstream.fields]` constant, written once.
    constants_json: Vec<u8>,
    names: NameCache,
    places: PlaceCache,
    /// The last second formatted by [`Encoder::time`]: consecutive events share it.
    second: (i64, [u8; 24]),
}

/// A JSON string literal (RFC 8259 section 7), written by serde_json's escaper (table-driven;
/// a hand-written one wrote past its buffer on a 504-byte scan, see the regression tests).
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a `Vec` cannot fail: serde_json's only errors here are I/O errors.
    if serde_json::to_writer(&mut *out, s).is_err() {
        out.extend_from_slice(b"\"\"");
    }
}

/// Writes one JSON object with precomputed keys.
struct Obj<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
    keys: &'a Keys,
}

impl<'a> Obj<'a> {
    fn open(out: &'a mut Vec<u8>, keys: &'a Keys) -> Self {
        out.push(b'{');
        Obj {
            out,
            first: true,
            keys,
        }
    }
    fn key(&mut self, k: K) {
        let key = &self.keys.0[k as usize][usize::from(self.first)..];
        self.first = false;
        self.out.extend_from_slice(key);
    }
    /// A value already in JSON (a literal, a cached string, a number).
    fn json(&mut self, k: K, v: &[u8]) {
        self.key(k);
        self.out.extend_from_slice(v);
    }
    fn str(&mut self, k: K, v: &str) {
        self.key(k);
        push_json_str(self.out, v);
    }
    fn opt_str(&mut self, k: K, v: Option<&str>) {
        if let Some(v) = v {
            self.str(k, v);
        }
    }
    fn int(&mut self, k: K, v: i64) {
        self.json(k, itoa::Buffer::new().format(v).as_bytes());
    }
    fn uuid(&mut self, k: K, id: &Uuid) {
        let mut buf = [0u8; 38];
        buf[0] = b'"';
        id.hyphenated().encode_lower(&mut buf[1..37]);
        buf[37] = b'"';
        self.json(k, &buf);
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

impl Encoder {
    pub fn new(
        profile: Profile,
        gateway_id: String,
        site: String,
        event_type: String,
        fields: FieldMapping,
    ) -> Self {
        let mut gateway_json = Vec::new();
        push_json_str(&mut gateway_json, &gateway_id);
        let mut constants_json = Vec::new();
        for (k, v) in &fields.constant {
            constants_json.push(b',');
            push_json_str(&mut constants_json, k);
            constants_json.push(b':');
            push_json_str(&mut constants_json, v);
        }
        Encoder {
            profile,
            keys: Keys::new(&fields.rename),
            plain: Keys::new(&[]),
            gateway_id,
            site,
            event_type,
            gateway_json,
            constants_json,
            names: NameCache::default(),
            places: PlaceCache::default(),
            second: (i64::MIN, [0; 24]),
        }
    }

    /// The request body for `events` (all of one [`BatchType`]).
    pub fn encode(&mut self, events: &[SpooledEvent], key: Uuid) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(events, key, &mut out);
        out
    }

    /// Encode into `out` (cleared first; its capacity is reused).
    pub fn encode_into(&mut self, events: &[SpooledEvent], key: Uuid, out: &mut Vec<u8>) {
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
                out.extend_from_slice(&self.gateway_json);
                out.extend_from_slice(if kind == BatchType::Sensor {
                    b",\"event_type\":\"sensor\"}"
                } else {
                    b",\"event_type\":\"scan\"}"
                });
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
                let mut m = Obj::open(out, &self.plain);
                m.str(K::Source, "scangate");
                m.str(K::Version, env!("CARGO_PKG_VERSION"));
                m.json(K::GatewayId, &self.gateway_json);
                m.close();
                out.push(b'}');
            }
        }
    }

    /// One event's JSON object as the bag-events profile writes it inside `events`
    /// (`[upstream.fields]` applied), appended to `out`: a stream entry's `data`.
    pub fn encode_event(&mut self, e: &SpooledEvent, out: &mut Vec<u8>) {
        self.bag_event(out, e);
    }

    /// `"2025-11-16T10:30:00.123Z"` with its quotes; the date and time to the second are
    /// formatted once per second of events.
    fn time(second: &mut (i64, [u8; 24]), ms: i64) -> [u8; 26] {
        /// 9999-12-31T23:59:59.999Z, the last instant RFC 3339 can write.
        const MAX_MS: i64 = 253_402_300_799_999;
        let mut q = [0u8; 26];
        q[0] = b'"';
        q[25] = b'"';
        let mut v = Vec::new();
        if !(0..=MAX_MS).contains(&ms) {
            // Clamped by the formatter: format it whole.
            write_rfc3339_ms(&mut v, ms);
            q[1..25].copy_from_slice(&v[..24]);
            return q;
        }
        let s = ms / 1000;
        if second.0 != s {
            write_rfc3339_ms(&mut v, s * 1000);
            second.1.copy_from_slice(&v[..24]);
            second.0 = s;
        }
        q[1..25].copy_from_slice(&second.1);
        let milli = ms % 1000;
        q[21] = b'0' + (milli / 100) as u8;
        q[22] = b'0' + (milli / 10 % 10) as u8;
        q[23] = b'0' + (milli % 10) as u8;
        q
    }

    fn bag_event(&mut self, out: &mut Vec<u8>, e: &SpooledEvent) {
        let b = &e.body;
        let first = Self::time(&mut self.second, b.first_seen_ms);
        let mut o = Obj::open(out, &self.keys);
        o.uuid(K::EventId, &e.event_id);
        o.json(K::Timestamp, &first);
        if b.kind == ReadKind::Sensor {
            o.str(K::SensorId, &b.tag);
            o.json(K::Location, self.names.get(&b.location));
            o.json(K::DeviceId, self.names.get(&b.device));
            let value = b.value.map(fmt_f64);
            o.json(K::Value, value.as_deref().unwrap_or("null").as_bytes());
            // The contract's sensor_type (kept in the scan_type slot) and the unit.
            match &b.scan_type {
                Some(t) => o.json(K::SensorType, self.names.get(t)),
                None => o.json(K::SensorType, b"null"),
            }
            o.opt_str(K::Unit, b.symbology.as_deref());
        } else {
            o.str(K::BagId, &b.tag);
            // location, device_id, scan_type
            o.out.extend_from_slice(self.places.get(o.keys, b));
            // The contract's signal_strength is an integer: peak RSSI in dBm, rounded.
            match b.rssi_cdbm {
                Some(c) => o.int(K::SignalStrength, ((c as f64) / 100.0).round() as i64),
                None => o.json(K::SignalStrength, b"null"),
            }
            o.int(K::ReadCount, b.read_count as i64);
            match b.antenna {
                Some(a) => o.int(K::Antenna, a as i64),
                None => o.json(K::Antenna, b"null"),
            }
            o.str(K::TagKind, b.kind.as_str());
            o.opt_str(K::Symbology, b.symbology.as_deref());
        }
        o.json(K::FirstSeen, &first);
        if b.last_seen_ms == b.first_seen_ms {
            o.json(K::LastSeen, &first);
        } else {
            o.json(K::LastSeen, &Self::time(&mut self.second, b.last_seen_ms));
        }
        o.json(K::GatewayId, &self.gateway_json);
        o.int(K::Seq, e.seq as i64);
        o.str(K::Clock, b.clock.as_str());
        // Never the first key: event_id is.
        o.out.extend_from_slice(&self.constants_json);
        o.close();
    }

    fn collect_event(&mut self, out: &mut Vec<u8>, e: &SpooledEvent) {
        let b = &e.body;
        let first = Self::time(&mut self.second, b.first_seen_ms);
        let last = Self::time(&mut self.second, b.last_seen_ms);
        let mut o = Obj::open(out, &self.keys);
        o.uuid(K::EventId, &e.event_id);
        o.str(K::LearnerId, &b.tag);
        o.str(K::TenantId, &self.site);
        o.str(K::EventType, &self.event_type);
        o.json(K::Timestamp, &first);
        o.json(K::SourceService, &self.gateway_json);
        o.key(K::EventData);
        {
            let mut d = Obj::open(o.out, &self.plain);
            d.str(K::TagKind, b.kind.as_str());
            d.json(K::Location, self.names.get(&b.location));
            d.json(K::DeviceId, self.names.get(&b.device));
            d.json(K::Source, self.names.get(&b.source));
            let sensor = b.kind == ReadKind::Sensor;
            match (&b.scan_type, sensor) {
                (Some(t), false) => d.json(K::ScanType, self.names.get(t)),
                (None, false) => d.str(K::ScanType, b.kind.default_scan_type()),
                (Some(t), true) => d.json(K::SensorType, self.names.get(t)),
                (None, true) => {}
            }
            if let Some(a) = b.antenna {
                d.int(K::Antenna, a as i64);
            }
            if let Some(r) = b.rssi_dbm() {
                d.json(K::RssiDbm, fmt_f64(r).as_bytes());
            }
            d.int(K::ReadCount, b.read_count as i64);
            d.json(K::FirstSeen, &first);
            d.json(K::LastSeen, &last);
            d.opt_str(
                if sensor { K::Unit } else { K::Symbology },
                b.symbology.as_deref(),
            );
            if let Some(v) = b.value {
                d.json(K::Value, fmt_f64(v).as_bytes());
            }
            d.close();
        }
        o.key(K::Metadata);
        {
            let mut m = Obj::open(o.out, &self.plain);
            m.json(K::GatewayId, &self.gateway_json);
            m.int(K::Seq, e.seq as i64);
            m.uuid(K::BootId, &e.boot_id);
            m.str(K::Clock, b.clock.as_str());
            m.close();
        }
        // Never the first key: event_id is.
        o.out.extend_from_slice(&self.constants_json);
        o.close();
    }
}

#[cfg(test)]
mod tests {
    proptest::proptest! {
        /// Strings as long as the field sends (thousands of bytes), of every byte class:
        /// proptest's `*` alone stops at 32 characters.
        #[test]
        fn json_strings_round_trip(
            chars in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::char::range('\u{0}', '\u{7f}'),
                    proptest::char::any(),
                    proptest::strategy::Just('"'),
                    proptest::strategy::Just('\\'),
                ],
                0..5000,
            )
        ) {
            let s: String = chars.into_iter().collect();
            let mut out = b"x".to_vec();
            super::push_json_str(&mut out, &s);
            let back: String = serde_json::from_slice(&out[1..]).unwrap();
            proptest::prop_assert_eq!(back, s);
        }
    }

    /// Regression: a 504-byte line (503 × `A` and a quote) made the old hand-written escaper
    /// write past its stack buffer and abort the daemon at every restart.
    #[test]
    fn a_long_tag_ending_in_a_quote_is_encoded_intact() {
        for n in [240, 247, 248, 249, 255, 256, 503, 504, 4095] {
            for tail in ["\"", "\u{1}", "\\\"\u{1f}\n"] {
                let tag = format!("{}{tail}", "A".repeat(n));
                let mut e = sample(1, ReadKind::Barcode);
                e.body.tag = tag.clone();
                for profile in [Profile::BagEvents, Profile::Collect] {
                    let evs = vec![e.clone()];
                    let v: serde_json::Value =
                        serde_json::from_slice(&enc(profile).encode(&evs, batch_key(&evs)))
                            .unwrap();
                    let got = &v["events"][0][if profile == Profile::Collect {
                        "learner_id"
                    } else {
                        "bag_id"
                    }];
                    assert_eq!(got, &serde_json::Value::String(tag.clone()));
                }
            }
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
                clock: Default::default(),
            },
        }
    }

    fn enc(profile: Profile) -> Encoder {
        enc_with(profile, FieldMapping::default())
    }

    fn enc_with(profile: Profile, fields: FieldMapping) -> Encoder {
        Encoder::new(
            profile,
            "gw1".into(),
            "PTY".into(),
            "interaction".into(),
            fields,
        )
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
        let mut fields = FieldMapping::default();
        fields.rename.push(("learner_id".into(), "tag".into()));
        fields.constant.push(("airport".into(), "PTY".into()));
        let mut en = enc_with(Profile::Collect, fields);
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
    fn event_keys_lists_every_top_level_key_written() {
        for profile in [Profile::BagEvents, Profile::Collect] {
            let mut sensor = sample(2, ReadKind::Sensor);
            sensor.body.value = Some(1.5);
            let mut e = sample(1, ReadKind::Barcode);
            e.body.symbology = Some("]E0".into());
            e.body.first_seen_ms = 5;
            for evs in [vec![e], vec![sensor]] {
                let v: serde_json::Value =
                    serde_json::from_slice(&enc(profile).encode(&evs, batch_key(&evs))).unwrap();
                for k in v["events"][0].as_object().unwrap().keys() {
                    assert!(
                        event_keys(profile).contains(&k.as_str()),
                        "{profile:?}: {k}"
                    );
                }
            }
        }
    }

    #[test]
    fn batch_key_is_stable_and_content_dependent() {
        let a = vec![sample(1, ReadKind::Epc), sample(2, ReadKind::Epc)];
        assert_eq!(batch_key(&a), batch_key(&a.clone()));
        assert_ne!(batch_key(&a), batch_key(&a[..1]));
        // Order matters, and every id counts.
        let b = vec![a[1].clone(), a[0].clone()];
        assert_ne!(batch_key(&a), batch_key(&b));
        let mut c = a.clone();
        c[1].event_id = event_id(9, 3, 1_763_289_000_000);
        assert_ne!(batch_key(&a), batch_key(&c));
        assert_eq!(batch_key(&a).get_version_num(), 5);
    }

    #[test]
    fn escapes_at_every_position_of_a_word() {
        for len in 0..40 {
            for at in 0..len {
                for c in ['"', '\\', '\n', '\u{1}', '\u{1f}', '\u{7f}', 'é'] {
                    let mut s: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
                    s.replace_range(at..at + 1, &c.to_string());
                    let mut out = Vec::new();
                    push_json_str(&mut out, &s);
                    let back: String = serde_json::from_slice(&out).unwrap();
                    assert_eq!(back, s);
                    let want = serde_json::to_string(&s).unwrap();
                    assert_eq!(String::from_utf8(out).unwrap(), want, "{s:?}");
                }
            }
        }
        // Longer than the stack buffer, escapes throughout.
        let s: String = (0..2000)
            .map(|i| if i % 7 == 0 { '"' } else { 'x' })
            .collect();
        let mut out = Vec::new();
        push_json_str(&mut out, &s);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            serde_json::to_string(&s).unwrap()
        );
    }

    #[test]
    fn control_chars_are_escaped() {
        let mut out = Vec::new();
        push_json_str(&mut out, "a\u{1d}b\"\\");
        let s: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(s, "a\u{1d}b\"\\");
    }

    /// The body as the contracts describe it, built independently with `serde_json`.
    fn expected(
        en: &Encoder,
        fields: &FieldMapping,
        evs: &[SpooledEvent],
        key: Uuid,
    ) -> serde_json::Value {
        use crate::event::rfc3339_ms;
        use serde_json::{json, Map, Value};
        let num = |v: Option<f64>| {
            v.filter(|v| v.is_finite())
                .map_or(Value::Null, |v| json!(v))
        };
        let rename = |k: &str| {
            fields
                .rename
                .iter()
                .find(|(f, _)| f == k)
                .map_or(k.to_string(), |(_, t)| t.clone())
        };
        let finish = |pairs: Vec<(&str, Value)>| {
            let mut m = Map::new();
            for (k, v) in pairs {
                m.insert(rename(k), v);
            }
            for (k, v) in &fields.constant {
                m.insert(k.clone(), json!(v));
            }
            Value::Object(m)
        };
        let scan_type = |e: &SpooledEvent| {
            e.body
                .scan_type
                .as_deref()
                .unwrap_or(e.body.kind.default_scan_type())
                .to_string()
        };
        match en.profile {
            Profile::BagEvents => {
                let events: Vec<Value> = evs
                    .iter()
                    .map(|e| {
                        let b = &e.body;
                        let mut p = vec![
                            ("event_id", json!(e.event_id.to_string())),
                            ("timestamp", json!(rfc3339_ms(b.first_seen_ms))),
                        ];
                        if b.kind == ReadKind::Sensor {
                            p.push(("sensor_id", json!(b.tag)));
                            p.push(("location", json!(&*b.location)));
                            p.push(("device_id", json!(&*b.device)));
                            p.push(("value", num(b.value)));
                            p.push(("sensor_type", json!(b.scan_type.as_deref())));
                            if let Some(u) = &b.symbology {
                                p.push(("unit", json!(u)));
                            }
                        } else {
                            p.push(("bag_id", json!(b.tag)));
                            p.push(("location", json!(&*b.location)));
                            p.push(("device_id", json!(&*b.device)));
                            p.push(("scan_type", json!(scan_type(e))));
                            p.push((
                                "signal_strength",
                                b.rssi_cdbm.map_or(Value::Null, |c| {
                                    json!((c as f64 / 100.0).round() as i64)
                                }),
                            ));
                            p.push(("read_count", json!(b.read_count)));
                            p.push(("antenna", json!(b.antenna)));
                            p.push(("tag_kind", json!(b.kind.as_str())));
                            if let Some(s) = &b.symbology {
                                p.push(("symbology", json!(s)));
                            }
                        }
                        p.push(("first_seen", json!(rfc3339_ms(b.first_seen_ms))));
                        p.push(("last_seen", json!(rfc3339_ms(b.last_seen_ms))));
                        p.push(("gateway_id", json!(en.gateway_id)));
                        p.push(("seq", json!(e.seq)));
                        p.push(("clock", json!(b.clock.as_str())));
                        finish(p)
                    })
                    .collect();
                let sensor = evs.first().map(batch_type) == Some(BatchType::Sensor);
                json!({
                    "events": events,
                    "source_system": en.gateway_id,
                    "event_type": if sensor { "sensor" } else { "scan" },
                })
            }
            Profile::Collect => {
                let events: Vec<Value> = evs
                    .iter()
                    .map(|e| {
                        let b = &e.body;
                        let mut data = json!({
                            "tag_kind": b.kind.as_str(),
                            "location": &*b.location,
                            "device_id": &*b.device,
                            "source": &*b.source,
                            "scan_type": scan_type(e),
                            "read_count": b.read_count,
                            "first_seen": rfc3339_ms(b.first_seen_ms),
                            "last_seen": rfc3339_ms(b.last_seen_ms),
                        });
                        if let Some(a) = b.antenna {
                            data["antenna"] = json!(a);
                        }
                        if let Some(r) = b.rssi_dbm() {
                            data["rssi_dbm"] = num(Some(r));
                        }
                        if let Some(s) = &b.symbology {
                            data["symbology"] = json!(s);
                        }
                        if b.kind == ReadKind::Sensor {
                            if let Some(m) = data.as_object_mut() {
                                m.remove("scan_type");
                                if let Some(t) = &b.scan_type {
                                    m.insert("sensor_type".into(), json!(&**t));
                                }
                                if let Some(u) = m.remove("symbology") {
                                    m.insert("unit".into(), u);
                                }
                            }
                        }
                        if let Some(v) = b.value {
                            data["value"] = num(Some(v));
                        }
                        let mut meta = json!({
                            "gateway_id": en.gateway_id,
                            "seq": e.seq,
                            "boot_id": e.boot_id.to_string(),
                        });
                        meta["clock"] = json!(b.clock.as_str());
                        finish(vec![
                            ("event_id", json!(e.event_id.to_string())),
                            ("learner_id", json!(b.tag)),
                            ("tenant_id", json!(en.site)),
                            ("event_type", json!(en.event_type)),
                            ("timestamp", json!(rfc3339_ms(b.first_seen_ms))),
                            ("source_service", json!(en.gateway_id)),
                            ("event_data", data),
                            ("metadata", meta),
                        ])
                    })
                    .collect();
                json!({
                    "batch_id": key.to_string(),
                    "events": events,
                    "metadata": {"source": "scangate", "version": env!("CARGO_PKG_VERSION"), "gateway_id": en.gateway_id},
                })
            }
        }
    }

    /// JSON does not tell `2` from `2.0`: compare numbers by value.
    fn numbers_as_f64(v: serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::Number(n) => serde_json::json!(n.as_f64()),
            Value::Array(a) => Value::Array(a.into_iter().map(numbers_as_f64).collect()),
            Value::Object(o) => {
                Value::Object(o.into_iter().map(|(k, v)| (k, numbers_as_f64(v))).collect())
            }
            other => other,
        }
    }

    fn arb_event() -> impl proptest::strategy::Strategy<Value = (SpooledEvent, usize, usize)> {
        use proptest::prelude::*;
        let kind = prop_oneof![
            Just(ReadKind::Epc),
            Just(ReadKind::Em4100),
            Just(ReadKind::Barcode),
            Just(ReadKind::BagTag),
            Just(ReadKind::Text),
        ];
        let time = prop_oneof![
            1_700_000_000_000i64..1_700_000_005_000,
            -5_000i64..5_000,
            253_402_300_790_000i64..253_402_300_810_000,
        ];
        (
            (
                kind,
                "\\PC{0,20}|[\\x00-\\x7f]{0,40}",
                0usize..20,
                0usize..20,
            ),
            (
                proptest::option::of(0u16..9),
                proptest::option::of(-12_000i32..0),
                0u32..50,
                time,
                0i64..3000,
            ),
            (
                proptest::option::of("\\PC{0,4}"),
                proptest::option::of(prop_oneof![Just("rfid".to_string()), "[a-z\"]{1,6}"]),
                0u64..1 << 40,
            ),
        )
            .prop_map(
                |((kind, tag, loc, dev), (antenna, rssi, count, first, dur), (sym, st, seq))| {
                    let mut e = sample(seq, kind);
                    e.body.tag = tag;
                    e.body.antenna = antenna;
                    e.body.rssi_cdbm = rssi;
                    e.body.read_count = count;
                    e.body.first_seen_ms = first;
                    e.body.last_seen_ms = if dur % 3 == 0 { first } else { first + dur };
                    e.body.symbology = sym;
                    e.body.scan_type = st.map(|s| Arc::from(s.as_str()));
                    (e, loc, dev)
                },
            )
    }

    proptest::proptest! {
        #[test]
        fn bodies_are_exactly_what_the_contracts_describe(
            batches in proptest::collection::vec(proptest::collection::vec(arb_event(), 1..30), 1..4),
            sensors in proptest::bool::ANY,
            collect in proptest::bool::ANY,
            renamed in proptest::bool::ANY,
        ) {
            // A pool of shared names, more than the name cache holds, some with equal text in
            // different allocations.
            let pool: Vec<Arc<str>> = (0..20)
                .map(|i| Arc::from(format!("HALL \"{}\"\u{7}", i % 17).as_str()))
                .collect();
            let mut fields = FieldMapping::default();
            if renamed {
                fields.rename.push(("bag_id".into(), "tag \"id\"".into()));
                fields.rename.push(("learner_id".into(), "tag".into()));
                fields.rename.push(("location".into(), "zone".into()));
                fields.rename.push(("scan_type".into(), "how".into()));
                fields.constant.push(("airport".into(), "P\"TY".into()));
            }
            let profile = if collect { Profile::Collect } else { Profile::BagEvents };
            let mut en = enc_with(profile, fields.clone());
            // One encoder for every batch: its caches carry over.
            for batch in batches {
                let evs: Vec<SpooledEvent> = batch
                    .into_iter()
                    .map(|(mut e, loc, dev)| {
                        e.body.location = pool[loc].clone();
                        e.body.device = pool[dev].clone();
                        if sensors && !collect {
                            e.body.kind = ReadKind::Sensor;
                            e.body.value = Some(e.body.read_count as f64 * 0.25 - 3.0);
                        }
                        e
                    })
                    .collect();
                let key = batch_key(&evs);
                let body = en.encode(&evs, key);
                let got: serde_json::Value = serde_json::from_slice(&body).unwrap();
                proptest::prop_assert_eq!(numbers_as_f64(got), numbers_as_f64(expected(&en, &fields, &evs, key)));
            }
        }
    }
}
