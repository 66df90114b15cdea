//! Golden tests: every capture in `hardware-fixtures/` decodes to its `.expected` reads, both
//! as recorded and with the bytes re-split at random points.

use proptest::prelude::*;
use scangate::config::{ChafonFamily, ProtocolConfig, ProtocolKind};
use scangate::protocol::{Decoded, Protocol};
use scangate::source::capture::{self, escape, CaptureKind};
use std::path::{Path, PathBuf};
use tokio_util::codec::Decoder;

/// Every capture with the decoder settings it is for: the folder names the protocol;
/// `chafon/*classic*` captures are from the classic (UHFReader18) family.
fn captures() -> Vec<(PathBuf, ProtocolConfig)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("hardware-fixtures");
    let mut out = Vec::new();
    for (folder, kind) in [
        ("lines", ProtocolKind::Lines),
        ("demo", ProtocolKind::Lines),
        ("em4100", ProtocolKind::Em4100),
        ("thingmagic", ProtocolKind::ThingMagic),
        ("uhf-bb", ProtocolKind::UhfBb),
        ("chafon", ProtocolKind::Chafon),
    ] {
        let mut n = 0;
        for e in std::fs::read_dir(root.join(folder)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "cap") {
                let mut cfg = ProtocolConfig::from(kind);
                if p.to_string_lossy().contains("classic") {
                    cfg.chafon_family = ChafonFamily::Classic;
                }
                out.push((p, cfg));
                n += 1;
            }
        }
        assert!(n >= 1, "{folder} has no capture");
    }
    out
}

/// One output as a line of an `.expected` file (hardware-fixtures/README.md).
fn render(d: &Decoded) -> String {
    match d {
        Decoded::Read(r) => {
            let mut line = format!(
                "{}\t{}\t{}",
                r.kind.as_str(),
                escape(r.tag.as_bytes()),
                r.symbology.as_deref().unwrap_or("-")
            );
            let rssi = match (r.rssi_dbm, r.rssi_raw) {
                (Some(dbm), _) => format!("{dbm:.1}"),
                (None, Some(raw)) => format!("raw:{raw}"),
                (None, None) => "-".into(),
            };
            let antenna = r.antenna.map_or("-".into(), |a| a.to_string());
            line.push_str(&format!("\t{rssi}\t{antenna}"));
            normalise(&line)
        }
        Decoded::Frame { what } => format!("frame\t{what}"),
        Decoded::Skipped { reason, .. } => format!("skip\t{reason}"),
    }
}

/// A line with its trailing `-` columns dropped (a read's RSSI and antenna columns may be
/// left out when empty), so expected and decoded lines compare in one form.
fn normalise(line: &str) -> String {
    let mut cols: Vec<&str> = line.split('\t').collect();
    while cols.len() > 3 && cols.last() == Some(&"-") {
        cols.pop();
    }
    cols.join("\t")
}

fn decode_records(proto: &ProtocolConfig, records: &[Vec<u8>]) -> Vec<String> {
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
        .map(normalise)
        .collect();
    (recs.into_iter().map(|r| r.bytes).collect(), expected)
}

#[test]
fn every_capture_decodes_to_its_expected_reads() {
    for (p, proto) in captures() {
        let (records, expected) = load(&p);
        assert_eq!(
            decode_records(&proto, &records),
            expected,
            "{}",
            p.display()
        );
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
            prop_assert_eq!(decode_records(&proto, &pieces), expected);
        }
    }
}
