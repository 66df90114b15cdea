//! Domain types shared by every stage: a [`Read`] (one observation from a reader), the
//! [`EventBody`] that the spool stores, and the [`SpooledEvent`] the forwarder sends.
//!
//! Owns: identifiers (`seq`, `event_id`), wall-clock sanity, the boot id.
//! Does not own: how events are encoded on disk (`spool::chunk`) or on the wire (`forward::profile`).
//!
//! Invariants:
//! - `seq` is assigned once, by the spool, at commit; it never repeats within a spool.
//! - `event_id` is a UUIDv7 derived from (spool salt keyed by the gateway id at commit, seq,
//!   commit time): it is fixed at commit and recomputed identically on every retry, replay or
//!   restart, also after the gateway is renamed, so it never needs to be stored per event (16
//!   incompressible bytes per event saved on flash). Two gateways made from one image commit
//!   different ids from then on.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use uuid::Uuid;

/// Wall times earlier than this (2024-01-01T00:00:00Z) are treated as "clock not synced yet":
/// ARM boxes without an RTC boot in 1970 until NTP catches up.
pub const PLAUSIBLE_WALL_MS: i64 = 1_704_067_200_000;

/// What kind of thing was read. Closed set; the wire profiles map it to `scan_type`/`event_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReadKind {
    /// UHF Gen2 EPC (uppercase hex).
    Epc,
    /// 125 kHz EM4100 id (uppercase hex).
    Em4100,
    /// A barcode other than a bag tag.
    Barcode,
    /// An IATA 10-digit bag tag licence plate.
    BagTag,
    /// A sensor reading (`value` is set).
    Sensor,
    /// Free text from a reader in ASCII mode that matched nothing more specific.
    Text,
}

impl ReadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ReadKind::Epc => "epc",
            ReadKind::Em4100 => "em4100",
            ReadKind::Barcode => "barcode",
            ReadKind::BagTag => "bag_tag",
            ReadKind::Sensor => "sensor",
            ReadKind::Text => "text",
        }
    }

    /// The `scan_type` of the bag-events contract when the source does not configure one.
    pub fn default_scan_type(self) -> &'static str {
        match self {
            ReadKind::Epc | ReadKind::Em4100 => "rfid",
            ReadKind::Sensor => "sensor",
            _ => "barcode",
        }
    }
}

/// One observation, as a decoder produced it. Source-level context (source name, location,
/// device) is attached by the pipeline, not by the decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct Read {
    pub kind: ReadKind,
    /// Normalised tag id (uppercase hex for RFID, the digits/text for barcodes).
    pub tag: String,
    pub antenna: Option<u16>,
    /// Signal strength in dBm when the reader reports it (each decoder converts its
    /// reader's unit and cites the conversion).
    pub rssi_dbm: Option<f32>,
    /// The reader's own signal-strength value when it has no known dBm conversion (e.g. a
    /// Chafon RSSI byte), shown by `sniff`, not forwarded.
    pub rssi_raw: Option<i32>,
    /// AIM symbology identifier (`]E0` …) when the scanner sent one.
    pub symbology: Option<String>,
    /// Sensor value (kind = Sensor).
    pub value: Option<f64>,
    /// What a sensor reading is (kind = Sensor): its type, unit and the device that sent it.
    /// Boxed: tag reads, the hot path, carry one null pointer.
    pub sensor: Option<Box<SensorMeta>>,
}

/// The context of a sensor reading, from its payload (see `protocol::json_map`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SensorMeta {
    /// The bag-events contract's `sensor_type` (`temperature`, `humidity` …).
    pub sensor_type: Option<String>,
    /// The value's unit as the sensor names it (`C`, `%RH` …); forwarded as `unit`.
    pub unit: Option<String>,
    /// The device that sent the reading, when the payload names it (else the source's
    /// `device`).
    pub device: Option<String>,
}

/// What the spool stores for one event: everything but the identifiers, which the spool
/// assigns at commit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBody {
    pub kind: ReadKind,
    pub tag: String,
    /// Shared: the same few names repeat on every event of a source (and are decoded into one
    /// shared allocation, see [`intern`]).
    #[serde(deserialize_with = "de_name")]
    pub source: Arc<str>,
    #[serde(deserialize_with = "de_name")]
    pub location: Arc<str>,
    #[serde(deserialize_with = "de_name")]
    pub device: Arc<str>,
    /// A scan's `scan_type`; for a sensor event, its `sensor_type`.
    #[serde(deserialize_with = "de_opt_name")]
    pub scan_type: Option<Arc<str>>,
    pub antenna: Option<u16>,
    /// Peak RSSI in centi-dBm (-5250 = -52.5 dBm): integers compress and compare exactly.
    pub rssi_cdbm: Option<i32>,
    pub read_count: u32,
    /// Wall clock, unix milliseconds.
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// A barcode's AIM symbology identifier; for a sensor event, the value's unit.
    pub symbology: Option<String>,
    pub value: Option<f64>,
    /// How `first_seen_ms`/`last_seen_ms` were obtained (see `crate::clock`); `Mono`: they
    /// are boot-time ms of the chunk's boot, not yet re-based.
    pub clock: crate::clock::ClockMark,
}

impl EventBody {
    pub fn rssi_dbm(&self) -> Option<f64> {
        self.rssi_cdbm.map(|c| c as f64 / 100.0)
    }
}

/// [`EventBody`] as chunks of format 1 stored it (before the `clock` field): times below
/// [`PLAUSIBLE_WALL_MS`] came from an unsynced wall clock.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBodyV1 {
    pub kind: ReadKind,
    pub tag: String,
    #[serde(deserialize_with = "de_name")]
    pub source: Arc<str>,
    #[serde(deserialize_with = "de_name")]
    pub location: Arc<str>,
    #[serde(deserialize_with = "de_name")]
    pub device: Arc<str>,
    #[serde(deserialize_with = "de_opt_name")]
    pub scan_type: Option<Arc<str>>,
    pub antenna: Option<u16>,
    pub rssi_cdbm: Option<i32>,
    pub read_count: u32,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub symbology: Option<String>,
    pub value: Option<f64>,
}

impl From<EventBodyV1> for EventBody {
    fn from(b: EventBodyV1) -> Self {
        EventBody {
            clock: if b.first_seen_ms < PLAUSIBLE_WALL_MS {
                crate::clock::ClockMark::Unsynced
            } else {
                crate::clock::ClockMark::Synced
            },
            kind: b.kind,
            tag: b.tag,
            source: b.source,
            location: b.location,
            device: b.device,
            scan_type: b.scan_type,
            antenna: b.antenna,
            rssi_cdbm: b.rssi_cdbm,
            read_count: b.read_count,
            first_seen_ms: b.first_seen_ms,
            last_seen_ms: b.last_seen_ms,
            symbology: b.symbology,
            value: b.value,
        }
    }
}

/// Names recently decoded on this thread (most recent first), at most [`INTERN_MAX`].
const INTERN_MAX: usize = 32;

thread_local! {
    static NAMES: std::cell::RefCell<Vec<Arc<str>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The shared copy of a source, location or device name. A chunk read back from the spool
/// holds thousands of events that name the same few places; decoding each name into its own
/// allocation cost three allocations and frees per event. The table is per thread (the spool
/// thread decodes) and bounded: names beyond `INTERN_MAX` distinct ones are still shared
/// while they are among the most recent.
pub fn intern(name: &str) -> Arc<str> {
    NAMES.with(|names| {
        let mut names = names.borrow_mut();
        if let Some(i) = names.iter().position(|n| **n == *name) {
            let hit = names[i].clone();
            if i > 0 {
                names[..=i].rotate_right(1);
            }
            return hit;
        }
        let fresh: Arc<str> = Arc::from(name);
        if names.len() == INTERN_MAX {
            names.pop();
        }
        names.insert(0, fresh.clone());
        fresh
    })
}

struct NameVisitor;

impl serde::de::Visitor<'_> for NameVisitor {
    type Value = Arc<str>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a name")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Arc<str>, E> {
        Ok(intern(v))
    }
}

fn de_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
    d.deserialize_str(NameVisitor)
}

fn de_opt_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Arc<str>>, D::Error> {
    struct Opt;
    impl<'de> serde::de::Visitor<'de> for Opt {
        type Value = Option<Arc<str>>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an optional name")
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            de_name(d).map(Some)
        }
    }
    d.deserialize_option(Opt)
}

/// Where an event lives in the spool: chunk row id and index inside the chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Loc {
    pub chunk: i64,
    pub idx: u32,
}

/// A committed event as read back from the spool.
#[derive(Debug, Clone, PartialEq)]
pub struct SpooledEvent {
    pub loc: Loc,
    pub seq: u64,
    pub committed_ms: i64,
    pub event_id: Uuid,
    pub boot_id: Uuid,
    pub body: EventBody,
}

/// splitmix64 finaliser: a bijection on u64, so distinct inputs give distinct outputs.
fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The event id of `seq` in a spool with `salt`, committed at `committed_ms`.
///
/// UUIDv7 (RFC 9562): 48-bit unix ms, then 74 "random" bits. Here those bits are a keyed
/// bijection of `seq`, so two events of one spool never share an id, even within one
/// millisecond, and the id is reproducible from what the spool already stores.
pub fn event_id(salt: u64, seq: u64, committed_ms: i64) -> Uuid {
    let a = mix64(salt ^ seq);
    let b = mix64(a ^ salt.rotate_left(17));
    let mut rand = [0u8; 10];
    rand[..8].copy_from_slice(&a.to_be_bytes());
    rand[8..].copy_from_slice(&b.to_be_bytes()[..2]);
    let ms = committed_ms.max(0) as u64;
    uuid::Builder::from_unix_timestamp_millis(ms, &rand).into_uuid()
}

/// Current wall time in unix milliseconds.
pub fn wall_now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds, e.g. `2025-11-16T10:30:00.123Z`.
pub fn rfc3339_ms(ms: i64) -> String {
    let mut out = Vec::with_capacity(24);
    write_rfc3339_ms(&mut out, ms);
    String::from_utf8(out).unwrap_or_default()
}

/// Append `YYYY-MM-DDTHH:MM:SS.mmmZ` for unix milliseconds `ms` (clamped to 1970..9999) without
/// allocating: it runs three times per event on the forwarder's hot path.
pub fn write_rfc3339_ms(out: &mut Vec<u8>, ms: i64) {
    let ms = ms.clamp(0, 253_402_300_799_999);
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    // Civil-from-days (H. Hinnant), valid for the whole clamped range.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    let two = |out: &mut Vec<u8>, v: i64| {
        out.extend_from_slice(&[b'0' + (v / 10) as u8, b'0' + (v % 10) as u8])
    };
    two(out, y / 100);
    two(out, y % 100);
    out.push(b'-');
    two(out, m);
    out.push(b'-');
    two(out, d);
    out.push(b'T');
    two(out, h);
    out.push(b':');
    two(out, mi);
    out.push(b':');
    two(out, s);
    out.push(b'.');
    out.extend_from_slice(&[
        b'0' + (milli / 100) as u8,
        b'0' + (milli / 10 % 10) as u8,
        b'0' + (milli % 10) as u8,
    ]);
    out.push(b'Z');
}

/// The kernel's boot id (random per boot), or a random id where the kernel has none.
pub fn boot_id() -> Uuid {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .and_then(|s| Uuid::parse_str(s.trim()).ok())
        .unwrap_or_else(Uuid::new_v4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn event_ids_are_v7_stable_and_distinct_within_one_ms() {
        let a = event_id(42, 1, 1_700_000_000_000);
        let b = event_id(42, 2, 1_700_000_000_000);
        assert_ne!(a, b);
        assert_eq!(a, event_id(42, 1, 1_700_000_000_000));
        assert_eq!(a.get_version_num(), 7);
        assert_ne!(a, event_id(43, 1, 1_700_000_000_000), "salt must matter");
        let (secs, _) = a.get_timestamp().expect("v7 has a timestamp").to_unix();
        assert_eq!(secs, 1_700_000_000);
    }

    #[test]
    fn interned_names_are_shared_and_bounded() {
        let a = intern("HALL-A");
        assert!(Arc::ptr_eq(&a, &intern("HALL-A")));
        assert_eq!(&*intern("HALL-B"), "HALL-B");
        for i in 0..INTERN_MAX {
            intern(&format!("other-{i}"));
        }
        // Pushed out by newer names: a new allocation with the same text.
        let again = intern("HALL-A");
        assert!(!Arc::ptr_eq(&a, &again));
        assert_eq!(again, a);
        NAMES.with(|n| assert_eq!(n.borrow().len(), INTERN_MAX));
    }

    #[test]
    fn rfc3339_has_millis_and_zulu() {
        assert_eq!(rfc3339_ms(1_763_289_000_123), "2025-11-16T10:30:00.123Z");
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    proptest::proptest! {
        #[test]
        fn rfc3339_matches_humantime(ms in 0i64..253_402_300_799_999) {
            let t = UNIX_EPOCH + Duration::from_millis(ms as u64);
            proptest::prop_assert_eq!(rfc3339_ms(ms), humantime::format_rfc3339_millis(t).to_string());
        }
    }
}
