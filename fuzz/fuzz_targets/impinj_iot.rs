//! The Impinj IoT payload decoder on arbitrary bytes: no panic, every output item is a valid
//! read (hex EPC, antenna ≥ 1, RSSI within ±150 dBm), and the same payload always gives the
//! same items.
#![no_main]
use libfuzzer_sys::fuzz_target;
use scangate::protocol::payload::Item;
use scangate::protocol::Decoded;

fuzz_target!(|data: &[u8]| {
    let mut out: Vec<Item> = Vec::new();
    scangate::protocol::impinj_iot::decode(data, &mut out);
    assert!(!out.is_empty(), "every payload gives at least one item");
    for it in &out {
        if let Decoded::Read(r) = &it.decoded {
            assert!(!r.tag.is_empty() && r.tag.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase()));
            assert!(r.antenna.is_none_or(|a| a >= 1));
            assert!(r.rssi_dbm.is_none_or(|d| (-150.0..=150.0).contains(&d)));
        }
    }
    let mut again = Vec::new();
    scangate::protocol::impinj_iot::decode(data, &mut again);
    assert_eq!(out, again);
});
