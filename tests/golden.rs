//! Golden tests: every capture in `hardware-fixtures/` decodes to its `.expected` reads, both
//! as recorded and with the bytes re-split at random points.

use proptest::prelude::*;
use scangate::config::ProtocolKind;
use scangate::protocol::{Decoded, Protocol};
use scangate::source::capture::{self, escape, CaptureKind};
use std::path::{Path, PathBuf};
use tokio_util::codec::Decoder;

fn captures() -> Vec<(PathBuf, ProtocolKind)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("hardware-fixtures");
    let mut out = Vec::new();
    for (folder, proto) in [
        ("lines", ProtocolKind::Lines),
        ("demo", ProtocolKind::Lines),
    ] {
        for e in std::fs::read_dir(root.join(folder)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "cap") {
                out.push((p, proto));
            }
        }
    }
    assert!(out.len() >= 2);
    out
}

fn render(d: &Decoded) -> String {
    match d {
        Decoded::Read(r) => format!(
            "{}\t{}\t{}",
            r.kind.as_str(),
            escape(r.tag.as_bytes()),
            r.symbology.as_deref().unwrap_or("-")
        ),
        Decoded::Skipped { reason, .. } => format!("skip\t{reason}"),
    }
}

fn decode_records(proto: ProtocolKind, records: &[Vec<u8>]) -> Vec<String> {
    let mut d = Protocol::new(proto);
    let mut buf = bytes::BytesMut::new();
    let mut out = Vec::new();
    for r in records {
        buf.extend_from_slice(r);
        while let Some(x) = d.decode(&mut buf).unwrap() {
            out.push(render(&x));
        }
    }
    while let Some(x) = d.decode_eof(&mut buf).unwrap() {
        out.push(render(&x));
    }
    out
}

fn load(p: &Path) -> (Vec<Vec<u8>>, Vec<String>) {
    let (kind, recs) = capture::parse(&std::fs::read_to_string(p).unwrap()).unwrap();
    assert_eq!(kind, CaptureKind::Serial);
    let expected: Vec<String> = std::fs::read_to_string(p.with_extension("expected"))
        .unwrap_or_else(|_| panic!("{} needs a .expected file", p.display()))
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    (recs.into_iter().map(|r| r.bytes).collect(), expected)
}

#[test]
fn every_capture_decodes_to_its_expected_reads() {
    for (p, proto) in captures() {
        let (records, expected) = load(&p);
        assert_eq!(decode_records(proto, &records), expected, "{}", p.display());
    }
}

proptest! {
    #[test]
    fn captures_decode_the_same_when_resplit(cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..20)) {
        for (p, proto) in captures() {
            let (records, expected) = load(&p);
            let all: Vec<u8> = records.concat();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(all.len() + 1)).collect();
            points.sort_unstable();
            let mut pieces = Vec::new();
            let mut last = 0;
            for q in points.into_iter().chain(std::iter::once(all.len())) {
                pieces.push(all[last..q].to_vec());
                last = q;
            }
            prop_assert_eq!(decode_records(proto, &pieces), expected);
        }
    }
}
