//! The property every decoder target checks: on arbitrary bytes the decoder never panics,
//! consumes everything at end of input, and splitting the bytes anywhere (at up to three
//! points chosen by the input) does not change its output.
use scangate::config::ProtocolConfig;
use scangate::protocol::{decode_all, Decoded, Protocol};
use tokio_util::codec::Decoder;

pub fn check(cfg: &ProtocolConfig, data: &[u8]) {
    let mut whole_dec = Protocol::new(cfg);
    let mut buf = bytes::BytesMut::from(data);
    let mut whole = Vec::new();
    while let Ok(Some(x)) = whole_dec.decode(&mut buf) {
        whole.push(x);
    }
    while let Ok(Some(x)) = whole_dec.decode_eof(&mut buf) {
        whole.push(x);
    }
    assert!(buf.is_empty(), "bytes left after end of input");
    let skipped: usize = whole
        .iter()
        .map(|d| match d {
            Decoded::Skipped { bytes, .. } => *bytes,
            _ => 0,
        })
        .sum();
    assert!(skipped <= data.len());
    let mut cuts: Vec<usize> = data
        .iter()
        .take(3)
        .map(|b| *b as usize * 131 % (data.len() + 1))
        .collect();
    cuts.sort_unstable();
    let mut d = Protocol::new(cfg);
    let mut buf = bytes::BytesMut::new();
    let mut out = Vec::new();
    let mut last = 0;
    for c in cuts.into_iter().chain(std::iter::once(data.len())) {
        buf.extend_from_slice(&data[last..c]);
        last = c;
        while let Ok(Some(x)) = d.decode(&mut buf) {
            out.push(x);
        }
    }
    while let Ok(Some(x)) = d.decode_eof(&mut buf) {
        out.push(x);
    }
    assert_eq!(out, whole);
    // The one-shot helper agrees.
    assert_eq!(decode_all(&mut Protocol::new(cfg), data, true), whole);
}
