//! Per-stage CPU cost per event (criterion): decode (lines), spool commit (sync = full, one
//! group of 1000), spool read-back, JSON encoding (bag-events), compression of a 1000-event
//! batch at the levels the defaults were chosen from.
//!
//!     cargo bench --bench stages
//!
//! Each benchmark processes 1000 events per iteration; criterion reports time per iteration,
//! so µs per event = reported ms.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use scangate::config::{Compression, FieldMapping, Profile, ProtocolKind, SyncMode};
use scangate::event::{EventBody, ReadKind};
use scangate::forward::profile::{batch_key, Encoder};
use scangate::forward::{compress, BodyCompressor};
use scangate::metrics::Metrics;
use scangate::protocol::{decode_all, Protocol};
use scangate::spool::{Spool, SpoolOptions};
use std::sync::Arc;

const N: usize = 1000;

/// ~98-byte JSON-line reader frames, like the reference peer's job.
pub fn frame(i: usize) -> String {
    let s = format!(
        "{{\"epc\":\"E2801160600002{:010X}\",\"ant\":{},\"rssi\":-{}.5,\"ts\":{}}}",
        i * 7919 % 5000,
        i % 4 + 1,
        40 + i % 30,
        1_763_289_000_000u64 + i as u64
    );
    format!("{s:<96}\r\n")
}

fn bodies() -> Vec<EventBody> {
    (0..N)
        .map(|i| EventBody {
            kind: ReadKind::Barcode,
            tag: frame(i).trim_end().to_string(),
            source: "belt-3".into(),
            location: "PTY_SORTATION_3".into(),
            device: "RFID_READER_003".into(),
            scan_type: None,
            antenna: Some((i % 4 + 1) as u16),
            rssi_cdbm: Some(-5250),
            read_count: 1,
            first_seen_ms: 1_763_289_000_000 + i as i64,
            last_seen_ms: 1_763_289_000_000 + i as i64,
            symbology: None,
            value: None,
            clock: Default::default(),
        })
        .collect()
}

fn stages(c: &mut Criterion) {
    let mut g = c.benchmark_group("per_1000_events");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(30);

    let wire: Vec<u8> = (0..N).flat_map(|i| frame(i).into_bytes()).collect();
    g.bench_function("decode_lines", |b| {
        b.iter(|| decode_all(&mut Protocol::of(ProtocolKind::Lines), &wire, false))
    });

    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = Spool::open(
        dir.path(),
        SpoolOptions {
            sync: SyncMode::Full,
            ..Default::default()
        },
        Arc::new(Metrics::default()),
    )
    .unwrap();
    let bs = bodies();
    g.bench_function("spool_commit_sync_full", |b| {
        b.iter_batched(
            || bs.clone(),
            |x| spool.append(x, 1_763_289_000_000).unwrap(),
            BatchSize::SmallInput,
        )
    });
    // Part of the commit: postcard + zstd-1 of the group (the chunk row's blob).
    let mut codec = scangate::spool::chunk::Codec::default();
    g.bench_function("spool_encode_chunk", |b| {
        b.iter(|| codec.encode_fresh([7; 16], &bs).unwrap().len())
    });
    g.bench_function("spool_read_back", |b| {
        b.iter(|| spool.read_after(None, 0, N).unwrap())
    });

    let rdir = tempfile::tempdir().unwrap();
    let (mut rspool, _) = Spool::open(
        rdir.path(),
        SpoolOptions::default(),
        Arc::new(Metrics::default()),
    )
    .unwrap();
    rspool.append(bodies(), 1_763_289_000_000).unwrap();
    let events = rspool.read_after(None, 0, N).unwrap();
    assert_eq!(events.len(), N);
    let mut enc = Encoder::new(
        Profile::BagEvents,
        "gw1".into(),
        "PTY".into(),
        "interaction".into(),
        FieldMapping::default(),
    );
    let key = batch_key(&events);
    let mut buf = Vec::new();
    g.bench_function("encode_bag_events_json", |b| {
        b.iter(|| {
            enc.encode_into(&events, key, &mut buf);
            buf.len()
        })
    });
    // Part of the above: the tags (JSON text from the reader, a quote every few bytes).
    let tags: Vec<String> = events.iter().map(|e| e.body.tag.clone()).collect();
    g.bench_function("escape_tags_json", |b| {
        b.iter(|| {
            buf.clear();
            for t in &tags {
                scangate::forward::profile::push_json_str(&mut buf, t);
            }
            buf.len()
        })
    });
    let json = enc.encode(&events, key);
    eprintln!("JSON per event: {} bytes", json.len() / N);
    for (name, c) in [
        ("gzip_1", Compression::Gzip(1)),
        ("gzip_2", Compression::Gzip(2)),
        ("gzip_3", Compression::Gzip(3)),
        ("gzip_6", Compression::Gzip(6)),
        ("zstd_1", Compression::Zstd(1)),
        ("zstd_3", Compression::Zstd(3)),
    ] {
        eprintln!(
            "{name}: {} bytes per event compressed",
            compress(&json, c).unwrap().len() / N
        );
        // As the forwarder does: one compressor, reused batch after batch.
        let mut comp = BodyCompressor::new(c);
        g.bench_function(format!("compress_{name}"), |b| {
            b.iter(|| comp.compress(&json))
        });
    }
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
