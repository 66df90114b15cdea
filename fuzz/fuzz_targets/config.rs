//! The config loader on arbitrary text: a list of located errors or a config, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Err(errors) = scangate::config::Config::parse(s, std::path::Path::new("/etc/scangate")) {
            assert!(!errors.is_empty());
            assert!(errors.iter().all(|e| e.line >= 1 && e.column >= 1));
        }
    }
});
