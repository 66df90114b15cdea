//! Decoder throughput per protocol (criterion): 1,000 frames per iteration, decoded from one
//! buffer as a serial source would (bytes in, reads out, each read's tag allocated).
//!
//!     cargo bench --bench decoders
//!
//! Throughput is reported in frames (elements) per second.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use scangate::config::{ProtocolConfig, ProtocolKind};
use scangate::protocol::lines::Field;
use scangate::protocol::{Decoded, Protocol};
use tokio_util::codec::Decoder;

#[path = "../tests/common/frames.rs"]
mod frames;

const N: u64 = 1000;

fn epc(i: u64) -> [u8; 12] {
    let mut e = [0xE2, 0x80, 0x11, 0x60, 0, 0, 0, 0, 0, 0, 0, 0];
    e[4..].copy_from_slice(&i.to_be_bytes());
    e
}

/// Decode all of `wire`; returns the number of reads (so nothing is optimised away).
fn decode(cfg: &ProtocolConfig, wire: &[u8]) -> usize {
    let mut d = Protocol::new(cfg);
    let mut buf = bytes::BytesMut::from(wire);
    let mut reads = 0;
    while let Ok(Some(x)) = d.decode(&mut buf) {
        reads += matches!(x, Decoded::Read(_)) as usize;
    }
    reads
}

fn decoders(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_1000_frames");
    g.throughput(Throughput::Elements(N));
    g.sample_size(50);
    let mut template = ProtocolConfig::from(ProtocolKind::Lines);
    template.lines.fields = Some(vec![Field::Tag, Field::Rssi, Field::Antenna]);
    let cases: Vec<(&str, ProtocolConfig, Vec<u8>)> = vec![
        (
            "lines_bag_tags",
            ProtocolKind::Lines.into(),
            (0..N)
                .flat_map(|i| format!("0125{:06}\r\n", i).into_bytes())
                .collect(),
        ),
        (
            "lines_rfid_template",
            template,
            (0..N)
                .flat_map(|i| {
                    format!("E2801160{:016X},-{}.5,{}\r\n", i, 40 + i % 30, i % 4 + 1).into_bytes()
                })
                .collect(),
        ),
        (
            "em4100",
            ProtocolKind::Em4100.into(),
            (0..N)
                .flat_map(|i| {
                    frames::em4100([0x62, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8], true)
                })
                .collect(),
        ),
        (
            "thingmagic",
            ProtocolKind::ThingMagic.into(),
            (0..N)
                .flat_map(|i| frames::tm_streamed(-50, (i % 4) as u8 + 1, &epc(i)))
                .collect(),
        ),
        (
            "uhf_bb",
            ProtocolKind::UhfBb.into(),
            (0..N)
                .flat_map(|i| frames::uhf_bb_notice(-50, &epc(i)))
                .collect(),
        ),
        (
            "chafon_realtime",
            ProtocolKind::Chafon.into(),
            (0..N)
                .flat_map(|i| frames::chafon_realtime((i % 4) as u8 + 1, &epc(i), 0x50))
                .collect(),
        ),
    ];
    for (name, cfg, wire) in &cases {
        assert_eq!(decode(cfg, wire), N as usize, "{name}");
        g.bench_function(*name, |b| b.iter(|| decode(cfg, wire)));
    }
    g.finish();
}

criterion_group!(benches, decoders);
criterion_main!(benches);
