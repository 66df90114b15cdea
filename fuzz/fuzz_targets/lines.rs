//! The lines decoder on arbitrary bytes (plain, and with a prefix/suffix and a field
//! template, chosen by the first byte): no panic, all input consumed, split-invariant.
#![no_main]
#[path = "../common/decoder.rs"]
mod decoder;
use libfuzzer_sys::fuzz_target;
use scangate::config::{ProtocolConfig, ProtocolKind};
use scangate::protocol::lines::Field;

fuzz_target!(|data: &[u8]| {
    let mut cfg = ProtocolConfig::from(ProtocolKind::Lines);
    if data.first().is_some_and(|b| b & 1 == 1) {
        cfg.lines.prefix = vec![0x02];
        cfg.lines.suffix = vec![0x03];
        cfg.lines.fields = Some(vec![Field::Tag, Field::Rssi, Field::Antenna]);
        cfg.lines.separator = ",".into();
    }
    decoder::check(&cfg, data);
});
