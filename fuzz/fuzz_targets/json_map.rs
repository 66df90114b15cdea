//! The generic JSON mapping on arbitrary bytes, with a mapping that covers tags and sensors:
//! no panic; every sensor reading has a finite value; every tag read a valid tag.
#![no_main]
use libfuzzer_sys::fuzz_target;
use scangate::event::ReadKind;
use scangate::protocol::json_map::{Field, JsonMapping};
use scangate::protocol::Decoded;

fuzz_target!(|data: &[u8]| {
    let (sel, payload) = data.split_first().map_or((0u8, data), |(a, b)| (*a, b));
    let m = JsonMapping {
        items: (sel & 1 == 1).then(|| "/items".to_string()),
        tag: Some("/id".into()),
        rssi: Some("/rssi".into()),
        antenna: Some("/ant".into()),
        timestamp: Some("/ts".into()),
        value: (sel & 2 == 2).then(|| "/v".to_string()),
        sensor_type: Some(Field::parse("/type")),
        unit: Some(Field::parse("C")),
        device: Some(Field::parse("/dev")),
        tag_kind: (sel & 4 == 4).then_some(ReadKind::Barcode),
    };
    let mut out = Vec::new();
    m.decode(payload, &mut out);
    for it in &out {
        if let Decoded::Read(r) = &it.decoded {
            match r.kind {
                ReadKind::Sensor => assert!(r.value.is_some_and(f64::is_finite)),
                _ => assert!(!r.tag.is_empty() && !r.tag.chars().any(char::is_control)),
            }
        }
    }
});
