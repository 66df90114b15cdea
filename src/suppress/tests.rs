//! The suppressor with `now` passed in: unit scenarios and property tests.

use super::*;
use proptest::prelude::*;

fn rule(mode: Mode, window_ms: u32) -> Rule {
    Rule {
        mode,
        window_ms,
        offset_cdb: 0,
        floor_cdbm: None,
    }
}

fn settings(rules: Vec<Rule>) -> Settings {
    Settings {
        max_pass_ms: 60_000,
        max_tracked: 10_000,
        zone_margin_cdb: 300,
        zone_dwell_ms: 150,
        fade_cdb_per_s: 2000,
        rules,
    }
}

fn rd(tag: &str, zone: u16, rssi: f32, at_ms: i64) -> ReadIn<'_> {
    ReadIn {
        tag,
        kind: ReadKind::Epc,
        group: 0,
        zone,
        reader: zone,
        rule: 0,
        rssi_dbm: Some(rssi),
        symbology: 0,
        at_ms,
    }
}

#[test]
fn aggregate_emits_one_pass_when_the_window_runs_out() {
    let mut s = Suppressor::new(settings(vec![rule(Mode::Aggregate, 500)]));
    let mut out = Vec::new();
    for i in 0..50 {
        let rssi = -70.0 + (i as f32 - 25.0).abs() * -0.5 + 20.0;
        s.read(&rd("E200AA", 1, rssi, 1000 + i * 20), &mut out);
    }
    assert!(out.is_empty());
    s.tick(1000 + 49 * 20 + 499, &mut out);
    assert!(out.is_empty(), "not quiet long enough yet");
    s.tick(1000 + 49 * 20 + 500, &mut out);
    assert_eq!(out.len(), 1);
    let p = &out[0];
    assert_eq!(p.tag, "E200AA");
    assert_eq!(p.read_count, 50);
    assert_eq!((p.first_ms, p.last_ms), (1000, 1980));
    assert_eq!(p.peak_cdbm, Some(-5000), "the peak at the middle read");
    assert_eq!(p.end, End::Quiet);
    assert_eq!(s.tracked(), 0);
    let c = s.counters();
    assert_eq!((c.reads_in, c.suppressed, c.passes), (50, 49, 1));
}

#[test]
fn a_parked_tag_gives_one_pass_per_max_pass() {
    let mut cfg = settings(vec![rule(Mode::Aggregate, 1000)]);
    cfg.max_pass_ms = 60_000;
    let mut s = Suppressor::new(cfg);
    let mut out = Vec::new();
    // Ten minutes, a read every 100 ms.
    for i in 0..6000 {
        s.read(&rd("3000PARKED", 1, -55.0, i * 100), &mut out);
        s.tick(i * 100, &mut out);
    }
    s.flush(&mut out);
    assert_eq!(
        out.len(),
        10,
        "{:?}",
        out.iter().map(|p| p.read_count).collect::<Vec<_>>()
    );
    assert!(out[..9].iter().all(|p| p.end == End::MaxPass));
    assert!(out.iter().all(|p| p.last_ms - p.first_ms < 60_000));
    assert_eq!(out.iter().map(|p| p.read_count).sum::<u32>(), 6000);
}

#[test]
fn first_mode_emits_at_once_and_swallows_the_rest() {
    let mut s = Suppressor::new(settings(vec![rule(Mode::First, 300)]));
    let mut out = Vec::new();
    s.read(&rd("0125728359", 1, -60.0, 0), &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].read_count, out[0].end), (1, End::First));
    for t in [50, 100, 150] {
        s.read(&rd("0125728359", 1, -60.0, t), &mut out);
    }
    s.tick(449, &mut out);
    assert_eq!(out.len(), 1, "the rest of the pass is swallowed");
    s.tick(450, &mut out);
    assert_eq!(out.len(), 1, "and its end emits nothing");
    s.read(&rd("0125728359", 1, -60.0, 500), &mut out);
    assert_eq!(out.len(), 2, "a new pass after the window");
}

#[test]
fn off_mode_emits_every_read() {
    let mut s = Suppressor::new(settings(vec![rule(Mode::Off, 300)]));
    let mut out = Vec::new();
    for t in 0..5 {
        s.read(&rd("AA", 1, -60.0, t), &mut out);
    }
    assert_eq!(out.len(), 5);
    assert!(out
        .iter()
        .all(|p| p.read_count == 1 && p.end == End::Single));
    assert_eq!(s.tracked(), 0);
}

#[test]
fn calibration_and_the_floor() {
    let mut r = rule(Mode::Aggregate, 300);
    r.offset_cdb = -400;
    r.floor_cdbm = Some(-7000);
    let mut s = Suppressor::new(settings(vec![r]));
    let mut out = Vec::new();
    s.read(&rd("AA", 1, -67.0, 0), &mut out); // -71 after calibration: below the floor
    s.read(&rd("AA", 1, -60.0, 10), &mut out); // -64
    s.flush(&mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].read_count, 1);
    assert_eq!(out[0].peak_cdbm, Some(-6400));
    assert_eq!(s.counters().below_floor, 1);
}

/// A bag on a belt read without a gap from portal A (zone 1) into portal B (zone 2), fields
/// overlapping: two passes, A then B.
#[test]
fn a_pass_moves_to_the_next_portal() {
    let mut s = Suppressor::new(settings(vec![rule(Mode::Aggregate, 500)]));
    let mut out = Vec::new();
    // 3 s; the bag is under A at 0.75 s and under B at 2.25 s; reads every 25 ms from the
    // portal(s) whose field it is in, RSSI falling 10 dB per metre from the portal (belt at
    // 1 m/s, portals 1.5 m apart, fields 1 m each way).
    let mut t = 0;
    while t <= 3000 {
        let x = t as f32 / 1000.0;
        for (zone, centre) in [(1u16, 0.75f32), (2, 2.25)] {
            let d = (x - centre).abs();
            if d <= 1.0 {
                s.read(&rd("BAG1", zone, -45.0 - 10.0 * d, t), &mut out);
            }
        }
        t += 25;
        s.tick(t, &mut out);
    }
    s.tick(10_000, &mut out);
    let zones: Vec<u16> = out.iter().map(|p| p.zone).collect();
    assert_eq!(zones, [1, 2], "{out:#?}");
    assert_eq!(out[0].end, End::Moved);
    assert!(out[0].first_ms < out[1].first_ms);
    assert_eq!(out[0].peak_cdbm, Some(-4500));
    assert_eq!(out[1].peak_cdbm, Some(-4500));
    assert_eq!(
        out.iter().map(|p| p.read_count as u64).sum::<u64>(),
        s.counters().reads_in
    );
}

/// Two antennas on both sides of one belt map to one zone: one pass, whichever antenna
/// reads stronger.
#[test]
fn two_antennas_of_one_zone_are_one_pass() {
    let mut s = Suppressor::new(settings(vec![rule(Mode::Aggregate, 500)]));
    let mut out = Vec::new();
    for i in 0..40 {
        let mut left = rd("BAG2", 7, -50.0 - (i % 5) as f32, i * 20);
        left.reader = 1;
        let mut right = rd("BAG2", 7, -48.0 - (i % 3) as f32, i * 20 + 5);
        right.reader = 2;
        s.read(&left, &mut out);
        s.read(&right, &mut out);
    }
    s.flush(&mut out);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].zone, out[0].reader, out[0].read_count), (7, 2, 80));
    assert_eq!(out[0].peak_cdbm, Some(-4800));
}

/// Overlapping readers at one portal (no move: the other reader is weaker): the pass goes
/// to the zone of the strongest peak; a tie goes to more reads.
#[test]
fn the_strongest_zone_wins_and_ties_go_to_more_reads() {
    let mut s = Suppressor::new(settings(vec![rule(Mode::Aggregate, 500)]));
    let mut out = Vec::new();
    s.read(&rd("T", 1, -60.0, 0), &mut out);
    s.read(&rd("T", 2, -58.0, 10), &mut out);
    s.read(&rd("T", 1, -61.0, 20), &mut out);
    s.flush(&mut out);
    assert_eq!(out[0].zone, 2, "the strongest peak");
    let mut s = Suppressor::new(settings(vec![rule(Mode::Aggregate, 500)]));
    out.clear();
    s.read(&rd("T", 1, -60.0, 0), &mut out);
    s.read(&rd("T", 2, -60.0, 10), &mut out);
    s.read(&rd("T", 2, -65.0, 20), &mut out);
    s.flush(&mut out);
    assert_eq!(out[0].zone, 2, "same peak, more reads");
}

#[test]
fn a_full_table_closes_the_longest_idle_pass_early() {
    let mut cfg = settings(vec![rule(Mode::Aggregate, 10_000)]);
    cfg.max_tracked = 100;
    let mut s = Suppressor::new(cfg);
    let mut out = Vec::new();
    for i in 0..1000i64 {
        s.read(&rd(&format!("{i:08X}"), 1, -60.0, i), &mut out);
        assert!(s.tracked() <= 100);
    }
    assert_eq!(out.len(), 900);
    assert!(out.iter().all(|p| p.end == End::Forced));
    assert_eq!(out[0].tag, "00000000", "the longest idle goes first");
    assert_eq!(s.counters().forced, 900);
    s.flush(&mut out);
    assert_eq!(out.len(), 1000, "never dropped");
}

#[test]
fn text_tags_and_long_epcs_are_kept_exactly() {
    let mut s = Suppressor::new(settings(vec![rule(Mode::Aggregate, 100)]));
    let mut out = Vec::new();
    let long = "E2".repeat(31);
    for tag in ["0125728359", "abc", "ABC", &long, "", "E2801160"] {
        s.read(&rd(tag, 1, -60.0, 0), &mut out);
        s.read(&rd(tag, 1, -60.0, 1), &mut out);
    }
    s.flush(&mut out);
    let tags: Vec<&str> = out.iter().map(|p| p.tag.as_str()).collect();
    assert_eq!(
        tags,
        ["0125728359", "abc", "ABC", long.as_str(), "", "E2801160"]
    );
    assert!(out.iter().all(|p| p.read_count == 2));
}

#[derive(Debug, Clone)]
struct Op {
    tag: u8,
    zone: u16,
    rssi: i8,
    dt: u16,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(
        (0u8..40, 0u16..4, -90i8..-30, 0u16..400).prop_map(|(tag, zone, rssi, dt)| Op {
            tag,
            zone,
            rssi,
            dt,
        }),
        1..3000,
    )
}

/// An admitted read: tag, zone, calibrated RSSI (centi-dBm), time.
type Admitted = (String, u16, i16, i64);

fn run(ops: &[Op], cfg: Settings) -> (Vec<Pass>, Vec<Admitted>, Suppressor) {
    let max = cfg.max_tracked;
    let mut s = Suppressor::new(cfg);
    let mut out = Vec::new();
    let mut admitted = Vec::new();
    let mut t = 0i64;
    for op in ops {
        t += op.dt as i64;
        let tag = format!("E200{:04X}", op.tag);
        s.read(&rd(&tag, op.zone, op.rssi as f32, t), &mut out);
        admitted.push((tag, op.zone, op.rssi as i16 * 100, t));
        if op.dt % 7 == 0 {
            s.tick(t, &mut out);
        }
        assert!(s.tracked() <= max);
    }
    s.flush(&mut out);
    (out, admitted, s)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Every admitted read is in exactly one pass (with moves and forced closes too), and
    /// the table never holds more than `max_tracked`.
    #[test]
    fn every_read_is_counted_in_exactly_one_pass(ops in ops(), max in 1usize..50) {
        let mut cfg = settings(vec![rule(Mode::Aggregate, 500)]);
        cfg.max_tracked = max;
        cfg.max_pass_ms = 5_000;
        let (out, admitted, s) = run(&ops, cfg);
        prop_assert_eq!(out.iter().map(|p| p.read_count as usize).sum::<usize>(), admitted.len());
        prop_assert_eq!(s.tracked(), 0);
        prop_assert_eq!(s.counters().passes as usize, out.len());
        // Passes of one tag follow one another: a new one starts no earlier than the previous
        // one started, and after it ended unless it moved (overlapping fields: the new zone's
        // first read can precede the old zone's last).
        let mut last: std::collections::HashMap<&str, &Pass> = Default::default();
        for p in &out {
            if let Some(prev) = last.get(p.tag.as_str()) {
                prop_assert!(p.first_ms >= prev.first_ms, "{:?} then {:?}", prev, p);
                if prev.end != End::Moved {
                    prop_assert!(p.first_ms > prev.last_ms || prev.end == End::Forced, "{:?} then {:?}", prev, p);
                }
            }
            last.insert(&p.tag, p);
        }
    }

    /// Without moves (one zone per tag's reads, or a margin no zone reaches), each pass
    /// holds exactly the reads of its tag between its first and last read, its count is
    /// theirs, and its peak is their maximum, at the zone that read it.
    #[test]
    fn the_winner_has_the_peak_of_its_pass(ops in ops()) {
        let mut cfg = settings(vec![rule(Mode::Aggregate, 500)]);
        cfg.zone_margin_cdb = i16::MAX;
        cfg.max_pass_ms = 1_000_000;
        let (out, admitted, _) = run(&ops, cfg);
        for p in &out {
            let mine: Vec<_> = admitted
                .iter()
                .filter(|(t, _, _, at)| *t == p.tag && *at >= p.first_ms && *at <= p.last_ms)
                .collect();
            prop_assert_eq!(mine.len(), p.read_count as usize, "{:?}", p);
            let peak = mine.iter().map(|r| r.2).max().unwrap();
            prop_assert_eq!(p.peak_cdbm, Some(peak), "{:?}", p);
            prop_assert!(mine.iter().any(|r| r.2 == peak && r.1 == p.zone), "{:?}", p);
        }
    }
}
