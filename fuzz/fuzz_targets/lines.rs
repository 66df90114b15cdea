//! The lines decoder on arbitrary bytes, fed in arbitrary pieces: never panics, always
//! consumes its input, and splitting does not change the result.
#![no_main]
use libfuzzer_sys::fuzz_target;
use scangate::config::ProtocolKind;
use scangate::protocol::{decode_all, Protocol};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let whole = decode_all(&mut Protocol::new(ProtocolKind::Lines), data, false);
    let cut = data.first().map(|b| *b as usize % (data.len() + 1)).unwrap_or(0);
    let mut d = Protocol::new(ProtocolKind::Lines);
    let mut buf = bytes::BytesMut::from(&data[..cut]);
    let mut out = Vec::new();
    while let Ok(Some(x)) = d.decode(&mut buf) {
        out.push(x);
    }
    buf.extend_from_slice(&data[cut..]);
    while let Ok(Some(x)) = d.decode(&mut buf) {
        out.push(x);
    }
    assert_eq!(out, whole);
});
