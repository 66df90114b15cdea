//! The `chafon` decoder on arbitrary bytes: no panic, all input consumed, split-invariant.
#![no_main]
#[path = "../common/decoder.rs"]
mod decoder;
use libfuzzer_sys::fuzz_target;
use scangate::config::{ProtocolConfig, ProtocolKind};

fuzz_target!(|data: &[u8]| {
    // Both answer layouts; the first byte picks one.
    let mut cfg = ProtocolConfig::from(ProtocolKind::Chafon);
    if data.first().is_some_and(|b| b & 1 == 1) {
        cfg.chafon_family = scangate::config::ChafonFamily::Classic;
    }
    decoder::check(&cfg, data);
});
