//! The Zebra IoT Connector payload decoder on arbitrary bytes: no panic, every read valid
//! (hex id in uppercase, antenna ≥ 1, RSSI within ±150 dBm), and a payload written twice in a
//! row (objects concatenated, as the connector sends them) gives its reads twice.
#![no_main]
use libfuzzer_sys::fuzz_target;
use scangate::protocol::payload::Item;
use scangate::protocol::Decoded;

fn reads(out: &[Item]) -> Vec<&scangate::event::Read> {
    out.iter()
        .filter_map(|i| match &i.decoded {
            Decoded::Read(r) => Some(r),
            _ => None,
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut out: Vec<Item> = Vec::new();
    scangate::protocol::zebra_iotc::decode(data, &mut out);
    for r in reads(&out) {
        assert!(!r.tag.is_empty() && r.tag.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase()));
        assert!(r.antenna.is_none_or(|a| a >= 1));
        assert!(r.rssi_dbm.is_none_or(|d| (-150.0..=150.0).contains(&d)));
    }
    // Valid JSON from end to end: doubled, it decodes to the same reads twice.
    let whole = serde_json::Deserializer::from_slice(data)
        .into_iter::<serde_json::Value>()
        .all(|v| v.is_ok());
    if whole && !out.iter().any(|i| matches!(i.decoded, Decoded::Skipped { reason: "too_many_events" | "empty", .. })) {
        let mut doubled = data.to_vec();
        doubled.push(b' ');
        doubled.extend_from_slice(data);
        let mut twice = Vec::new();
        scangate::protocol::zebra_iotc::decode(&doubled, &mut twice);
        let (a, b) = (reads(&out), reads(&twice));
        if a.len() * 2 <= scangate::protocol::payload::EVENTS_MAX {
            assert_eq!(b.len(), a.len() * 2);
        }
    }
});
