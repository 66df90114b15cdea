//! The wire encoder on arbitrary strings (tags, names, symbologies of every byte class and
//! length): the body is always valid JSON and every string comes back exactly, in both
//! profiles. Differential against serde_json's parser.
#![no_main]
use libfuzzer_sys::fuzz_target;
use scangate::config::{FieldMapping, Profile};
use scangate::event::{EventBody, Loc, ReadKind, SpooledEvent};
use scangate::forward::profile::{batch_key, Encoder};
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    // Split the input into up to four strings at 0xFF bytes (which never occur in UTF-8).
    let mut parts = data.split(|&b| b == 0xFF).map(|p| String::from_utf8_lossy(p).into_owned());
    let tag = parts.next().unwrap_or_default();
    let location: Arc<str> = parts.next().unwrap_or_default().as_str().into();
    let device: Arc<str> = parts.next().unwrap_or_default().as_str().into();
    let symbology = parts.next();
    let body = EventBody {
        kind: if tag.len() % 2 == 0 { ReadKind::Barcode } else { ReadKind::Epc },
        tag: tag.clone(),
        source: device.clone(),
        location: location.clone(),
        device: device.clone(),
        scan_type: None,
        antenna: Some(data.len() as u16),
        rssi_cdbm: Some(-(data.len() as i32)),
        read_count: 1,
        first_seen_ms: data.len() as i64 * 1_000_003,
        last_seen_ms: data.len() as i64 * 1_000_003 + 7,
        symbology: symbology.clone(),
        value: None,
                clock: Default::default(),
    };
    let ev = SpooledEvent {
        loc: Loc { chunk: 1, idx: 0 },
        seq: 1,
        committed_ms: 1,
        event_id: scangate::event::event_id(1, 1, 1),
        boot_id: uuid::Uuid::nil(),
        body,
    };
    let evs = vec![ev.clone(), ev];
    for profile in [Profile::BagEvents, Profile::Collect] {
        let mut en = Encoder::new(profile, device.to_string(), location.to_string(), "interaction".into(), FieldMapping::default());
        let body = en.encode(&evs, batch_key(&evs));
        let v: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        let e = &v["events"][1];
        match profile {
            Profile::BagEvents => {
                assert_eq!(e["bag_id"].as_str(), Some(tag.as_str()));
                assert_eq!(e["location"].as_str(), Some(&*location));
                assert_eq!(e["device_id"].as_str(), Some(&*device));
                assert_eq!(e["symbology"].as_str(), symbology.as_deref());
            }
            Profile::Collect => {
                assert_eq!(e["learner_id"].as_str(), Some(tag.as_str()));
                assert_eq!(e["event_data"]["location"].as_str(), Some(&*location));
            }
        }
    }
});
