//! Property tests of the binary reader decoders, against frames built by a second
//! implementation (`common::frames`: the vendors' own CRC algorithms):
//! - streams of valid frames of random EPCs (0–62 bytes), RSSI and antennas, with runs of
//!   garbage between them (up to ~64 KiB in all), split at random points, decode to exactly
//!   the reads that were framed (a zero-length EPC is a frame, not a read), and every garbage
//!   byte is counted as skipped;
//! - arbitrary bytes up to 64 KiB never panic, are consumed completely at end of input, and
//!   decode the same however they are split.

mod common;

use common::frames;
use proptest::prelude::*;
use scangate::config::{ProtocolConfig, ProtocolKind};
use scangate::protocol::{Decoded, Protocol};
use tokio_util::codec::Decoder;

/// What a test frame must decode to: tag, RSSI (dBm or raw), antenna.
type Want = (String, Option<f32>, Option<i32>, Option<u16>);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// Build one frame of `kind` for a random tag, and what it must decode to.
fn frame(kind: ProtocolKind, epc: &[u8], rssi: i8, antenna: u8) -> (Vec<u8>, Want) {
    match kind {
        ProtocolKind::Em4100 => {
            let mut id = [0u8; 5];
            for (i, b) in epc.iter().take(5).enumerate() {
                id[i] = *b;
            }
            (
                frames::em4100(id, antenna.is_multiple_of(2)),
                (hex(&id), None, None, None),
            )
        }
        ProtocolKind::UhfBb => (
            frames::uhf_bb_notice(rssi, epc),
            (hex(epc), Some(rssi as f32), None, None),
        ),
        ProtocolKind::ThingMagic => (
            frames::tm_streamed(rssi, antenna, epc),
            (hex(epc), Some(rssi as f32), None, Some(antenna as u16)),
        ),
        ProtocolKind::Chafon => {
            let raw = rssi.unsigned_abs();
            (
                frames::chafon_realtime(antenna, epc, raw),
                (hex(epc), None, Some(raw as i32), Some(antenna as u16)),
            )
        }
        ProtocolKind::Lines => unreachable!(),
    }
}

/// A byte that cannot start a frame of `kind`.
fn inert(kind: ProtocolKind, b: u8) -> u8 {
    match kind {
        ProtocolKind::Em4100 if b == 0x02 => 0x00,
        ProtocolKind::UhfBb if b == 0xBB => 0x00,
        ProtocolKind::ThingMagic if b == 0xFF => 0x00,
        ProtocolKind::Chafon => b % 5,
        _ => b,
    }
}

/// Decode `pieces` in order, then end of input.
fn decode(kind: ProtocolKind, pieces: &[&[u8]]) -> (Vec<Decoded>, usize) {
    let mut d = Protocol::new(&ProtocolConfig::from(kind));
    let mut buf = bytes::BytesMut::new();
    let mut out = Vec::new();
    for p in pieces {
        buf.extend_from_slice(p);
        while let Some(x) = d.decode(&mut buf).unwrap() {
            out.push(x);
        }
    }
    while let Some(x) = d.decode_eof(&mut buf).unwrap() {
        out.push(x);
    }
    (out, buf.len())
}

fn split<'a>(data: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
    points.sort_unstable();
    let mut pieces = Vec::new();
    let mut last = 0;
    for p in points.into_iter().chain(std::iter::once(data.len())) {
        pieces.push(&data[last..p]);
        last = p;
    }
    pieces
}

const BINARY: [ProtocolKind; 4] = [
    ProtocolKind::Em4100,
    ProtocolKind::UhfBb,
    ProtocolKind::ThingMagic,
    ProtocolKind::Chafon,
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn framed_reads_with_garbage_between_decode_exactly(
        items in proptest::collection::vec(
            (
                proptest::collection::vec(any::<u8>(), 0..=62),
                -100i8..-20,
                1u8..=4,
                proptest::collection::vec(any::<u8>(), 0..300),
            ),
            1..200,
        ),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
    ) {
        for kind in BINARY {
            let mut stream = Vec::new();
            let mut want = Vec::new();
            let mut garbage = 0;
            for (epc, rssi, antenna, junk) in &items {
                // A Chafon frame's length byte limits its EPC to 250 bytes; all fit.
                let (f, w) = frame(kind, epc, *rssi, *antenna);
                stream.extend(f);
                // A zero-length EPC is a counted frame (`empty_epc`), not a read.
                if !w.0.is_empty() {
                    want.push(w);
                }
                stream.extend(junk.iter().map(|b| inert(kind, *b)));
                garbage += junk.len();
            }
            let (out, left) = decode(kind, &split(&stream, &cuts));
            prop_assert_eq!(left, 0);
            let got: Vec<Want> = out
                .iter()
                .filter_map(|d| match d {
                    Decoded::Read(r) => Some((r.tag.clone(), r.rssi_dbm, r.rssi_raw, r.antenna)),
                    _ => None,
                })
                .collect();
            prop_assert_eq!(&got, &want, "{:?}", kind);
            let skipped: usize = out
                .iter()
                .map(|d| match d {
                    Decoded::Skipped { reason, bytes } => {
                        assert_eq!(*reason, "garbage");
                        *bytes
                    }
                    _ => 0,
                })
                .sum();
            prop_assert_eq!(skipped, garbage, "{:?}", kind);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_up_to_64_kib_never_panic_and_split_the_same(
        data in proptest::collection::vec(any::<u8>(), 0..65_536),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        for kind in BINARY.into_iter().chain([ProtocolKind::Lines]) {
            let (whole, left) = decode(kind, &[&data]);
            prop_assert_eq!(left, 0, "{:?}: input left over at end", kind);
            let skipped: usize = whole
                .iter()
                .map(|d| match d {
                    Decoded::Skipped { bytes, .. } => *bytes,
                    _ => 0,
                })
                .sum();
            prop_assert!(skipped <= data.len());
            let (pieces, _) = decode(kind, &split(&data, &cuts));
            prop_assert_eq!(pieces, whole, "{:?}", kind);
        }
    }
}

/// Bursts as the readers send them while reading continuously, with frames from several
/// readers' captures of the reference (REFERENCE-READERS.md) between generated ones.
#[test]
fn reference_frames_decode_among_generated_ones() {
    let sparkfun: &[u8] = &[
        0xFF, 0x28, 0x22, 0x00, 0x00, 0x10, 0x00, 0x1B, 0x01, 0xFF, 0x01, 0x01, 0xC4, 0x11, 0x0E,
        0x16, 0x40, 0x00, 0x00, 0x01, 0x27, 0x00, 0x00, 0x05, 0x00, 0x00, 0x0F, 0x00, 0x80, 0x30,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x15, 0x45, 0xE9, 0x4A,
        0x56, 0x1D,
    ];
    // The generated frames' CRC agrees with the vendor's for the reference frame.
    assert_eq!(frames::tm_crc(&sparkfun[1..45]), 0x561D);
    assert_eq!(frames::tm_crc(&[0x00, 0x03]), 0x1D0C);
    let mut stream = frames::tm_streamed(-51, 2, &[0xE2; 12]);
    stream.extend_from_slice(sparkfun);
    stream.extend(frames::tm_frame(0x22, 0x0400, &[]));
    let (out, _) = decode(ProtocolKind::ThingMagic, &[&stream]);
    assert_eq!(out.len(), 3, "{out:?}");
    assert!(
        matches!(&out[1], Decoded::Read(r) if r.tag == "000000000000000000001545" && r.antenna == Some(1))
    );
    assert_eq!(out[2], Decoded::Frame { what: "keepalive" });
}
