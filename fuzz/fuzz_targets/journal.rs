//! The port-journal record parser on arbitrary file contents (torn, damaged, garbage):
//! never a panic, records only from inside the file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let total: usize = scangate::source::journal::parse_records(data)
        .iter()
        .map(|(_, b)| b.len())
        .sum();
    assert!(total <= data.len());
});
