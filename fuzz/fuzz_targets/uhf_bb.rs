//! The `uhf_bb` decoder on arbitrary bytes: no panic, all input consumed, split-invariant.
#![no_main]
#[path = "../common/decoder.rs"]
mod decoder;
use libfuzzer_sys::fuzz_target;
use scangate::config::{ProtocolConfig, ProtocolKind};

fuzz_target!(|data: &[u8]| {
    decoder::check(&ProtocolConfig::from(ProtocolKind::UhfBb), data);
});
