//! The suppressor alone (criterion): reads per second with 100,000 tracked tags, and memory
//! per tracked tag (counted by a global allocator that tracks live bytes).
//!
//!     cargo bench --bench suppress

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use scangate::event::ReadKind;
use scangate::suppress::{Mode, ReadIn, Rule, Settings, Suppressor};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Live heap bytes of this process.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const TAGS: usize = 100_000;

fn settings() -> Settings {
    Settings {
        max_pass_ms: 60_000,
        max_tracked: TAGS,
        zone_margin_cdb: 300,
        zone_dwell_ms: 150,
        fade_cdb_per_s: 2000,
        rules: vec![Rule {
            mode: Mode::Aggregate,
            window_ms: 1000,
            offset_cdb: 0,
            floor_cdbm: None,
        }],
    }
}

fn tags() -> Vec<String> {
    (0..TAGS as u64)
        .map(|i| format!("E2801160{:016X}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        .collect()
}

fn suppress(c: &mut Criterion) {
    let tags = tags();
    // Memory: the suppressor with every tag tracked, less the suppressor empty of passes.
    let before = LIVE.load(Ordering::Relaxed);
    let mut s = Suppressor::new(settings());
    let mut out = Vec::new();
    for (i, t) in tags.iter().enumerate() {
        s.read(&read(t, i, 0), &mut out);
    }
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(s.tracked(), TAGS);
    println!(
        "memory: {} bytes for {} tracked tags = {:.1} bytes per tracked tag (slot {} B + table entry)",
        bytes,
        TAGS,
        bytes as f64 / TAGS as f64,
        Suppressor::slot_bytes()
    );

    // Throughput: reads of the tracked tags in a scrambled order, 4 zones, changing RSSI. The
    // reads are laid out one after another, as they arrive from the sources (each read's tag
    // is in a fresh buffer, not scattered over the heap).
    let order: Vec<usize> = (0..1_000_000u64)
        .map(|i| (i.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 20) as usize % TAGS)
        .collect();
    let stream: String = order.iter().map(|&i| tags[i].as_str()).collect();
    let width = tags[0].len();
    let mut g = c.benchmark_group("suppressor_100k_tracked");
    g.throughput(Throughput::Elements(order.len() as u64));
    g.sample_size(10);
    let mut now = 1i64;
    g.bench_function("reads", |b| {
        b.iter(|| {
            for k in 0..order.len() {
                let tag = &stream[k * width..(k + 1) * width];
                s.read(&read(tag, k, now + (k / 1000) as i64), &mut out);
            }
            now += 1000;
            out.clear();
        })
    });
    g.finish();
    assert_eq!(s.tracked(), TAGS, "no pass ended: every read was a repeat");

    // The same with change tracking on, as the daemon runs it: the changed passes are taken
    // (encoded into the pass log by the stage, not measured here) every 1,000 reads, a commit
    // group's worth.
    let before = LIVE.load(Ordering::Relaxed);
    let mut t = Suppressor::new(settings());
    t.track_changes();
    for (i, tag) in tags.iter().enumerate() {
        t.read(&read(tag, i, 0), &mut out);
    }
    let _ = t.snapshot();
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    println!(
        "memory with change tracking: {:.1} bytes per tracked tag",
        bytes as f64 / TAGS as f64
    );
    let mut g = c.benchmark_group("suppressor_100k_tracked_with_change_tracking");
    g.throughput(Throughput::Elements(order.len() as u64));
    g.sample_size(10);
    let mut now = 1i64;
    g.bench_function("reads", |b| {
        b.iter(|| {
            for k in 0..order.len() {
                let tag = &stream[k * width..(k + 1) * width];
                t.read(&read(tag, k, now + (k / 1000) as i64), &mut out);
                if k % 1000 == 999 {
                    std::hint::black_box(t.take_changes());
                }
            }
            now += 1000;
            out.clear();
        })
    });
    g.finish();
}

fn read(tag: &str, k: usize, at_ms: i64) -> ReadIn<'_> {
    ReadIn {
        tag,
        kind: ReadKind::Epc,
        group: 0,
        zone: (k % 4) as u16,
        reader: (k % 4) as u16,
        rule: 0,
        rssi_dbm: Some(-40.0 - (k % 37) as f32),
        symbology: 0,
        at_ms,
    }
}

criterion_group!(benches, suppress);
criterion_main!(benches);
