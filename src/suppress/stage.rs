//! The suppression stage of the pipeline: the ingest task hands it every read and commits what
//! it returns (events: one per pass) together with what changed in the open passes.
//!
//! Owns: the mapping from the config to the suppressor's indices (one arbitration group per
//! `group`, or per source; one zone per location; one reader per source and antenna; one rule
//! per source), the conversion of a pass's boot-time stamps into the event's wall times and
//! `clock` mark (see `crate::clock`), and the pass log written to the spool.
//!
//! **Durability.** In `aggregate` and `first` mode the state of every open pass touched by a
//! commit group is written in that group's transaction ([`Stage::log_row`]), as one row of
//! the spool's `pass_log` table (a delta: passes opened or updated, keys of passes closed),
//! and from time to time a snapshot of every open pass replaces the rows before it. The
//! events of passes that ended go into the same transaction's chunk, and so do the journal
//! positions of the serial ports the reads came from. After a crash the spool's rows give
//! exactly the open passes as of the last commit, and the port journals give back the reads
//! that came after it: [`Stage::recover`] puts the passes back, the reads replay into them,
//! and nothing is emitted twice or lost. Passes saved in another boot (their boot-time stamps
//! mean nothing now), or whose source, group or zone left the config, are emitted at once,
//! completed from what was stored.
//!
//! Rows are self-contained (each names the groups, sources, zones and symbologies it uses),
//! so a changed config never misreads them.

use super::{
    Changes, Counters, Mode, Pass, ReadIn, Rule, SavedPass, SavedZone, Settings, Suppressor,
};
use crate::clock::{Clock, ClockMark};
use crate::config::{Config, ProtocolKind, SuppressMode};
use crate::event::{EventBody, ReadKind};
use crate::metrics::Metrics;
use crate::source::SourceRead;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;

/// Readers (source, antenna) interned at most; reads of further antennas are attributed to
/// their source without an antenna.
const READERS_MAX: usize = 60_000;
/// Symbologies interned at most (AIM identifiers: a few dozen exist).
const SYMBOLOGIES_MAX: usize = 254;
/// A snapshot is written once the deltas since the last one hold [`SNAPSHOT_FACTOR`] times
/// more bytes than it did (and at least this many), or after [`SNAPSHOT_ROWS`] rows: recovery
/// reads a bounded amount, and snapshots cost a quarter of what the deltas cost.
const SNAPSHOT_MIN_BYTES: usize = 64 * 1024;
/// ... more than this many times the last snapshot's bytes.
const SNAPSHOT_FACTOR: usize = 4;
/// While reads queue up (a burst), snapshots wait, up to this many bytes of deltas.
const SNAPSHOT_DEFER_MAX_BYTES: usize = 16 * 1024 * 1024;
const SNAPSHOT_ROWS: u32 = 1000;
/// The check of a pass-log row (CRC-32C, little-endian after the zstd frame).
const ROW_CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// A wall-clock step larger than this is logged.
const STEP_LOG_MS: i64 = 2000;

/// One source as the stage sees it.
struct Src {
    name: Arc<str>,
    device: Arc<str>,
    scan_type: Option<Arc<str>>,
    zone: u16,
    /// Antenna port → zone.
    antennas: Vec<(u16, u16)>,
    group: u16,
    /// Antenna → interned reader (a reader has a handful of antennas: a scan beats a hash).
    readers: Vec<(Option<u16>, u16)>,
    /// Sensor deadband (value units) and heartbeat (ms).
    deadband: f64,
    heartbeat_ms: i64,
}

/// One row of the spool's pass log (postcard, zstd; see the module docs).
#[derive(Debug, Default, Serialize, Deserialize)]
struct LogRow {
    /// Kernel boot id of the process that wrote it (boot-time stamps belong to it).
    boot: [u8; 16],
    /// True: `passes` is every open pass, and the rows before it are void.
    snapshot: bool,
    /// Row-local names: groups, sources, zones.
    names: Vec<String>,
    /// Row-local readers: (source name index, antenna).
    readers: Vec<(u16, Option<u16>)>,
    symbologies: Vec<String>,
    /// `group`, `rule` (the source), zones, readers and `symbology` index the tables above
    /// (`symbology` 0: none, else index + 1).
    passes: Vec<SavedPass>,
    /// (group name index, tag).
    closed: Vec<(u16, String)>,
}

/// A stored pass with its indices resolved to names.
#[derive(Debug, Clone)]
struct NamedPass {
    p: SavedPass,
    group: String,
    source: String,
    zones: [Option<String>; 3],
    readers: [Option<(String, Option<u16>)>; 3],
    symbology: Option<String>,
    boot: [u8; 16],
}

/// Row-local name tables being built.
/// (A row names a few groups, sources and zones: a scan beats a hash.)
#[derive(Default)]
struct Tables {
    names: Vec<String>,
    readers: Vec<(u16, Option<u16>)>,
    symbologies: Vec<String>,
}

impl Tables {
    fn name(&mut self, n: &str) -> u16 {
        if let Some(i) = self.names.iter().position(|x| x == n) {
            return i as u16;
        }
        self.names.push(n.to_string());
        (self.names.len() - 1) as u16
    }

    fn reader(&mut self, source: u16, antenna: Option<u16>) -> u16 {
        if let Some(i) = self.readers.iter().position(|r| *r == (source, antenna)) {
            return i as u16;
        }
        self.readers.push((source, antenna));
        (self.readers.len() - 1) as u16
    }
}

/// What [`Stage::recover`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Passes put back into the suppressor.
    pub restored: usize,
    /// Passes emitted at once (see the module docs).
    pub emitted: usize,
}

/// The suppression stage: see the module docs.
pub struct Stage {
    sup: Suppressor,
    srcs: Vec<Src>,
    /// Rule (= source) modes.
    modes: Vec<Mode>,
    zones: Vec<Arc<str>>,
    zone_index: HashMap<Arc<str>, u16>,
    groups: Vec<Arc<str>>,
    group_index: HashMap<Arc<str>, u16>,
    readers: Vec<(u16, Option<u16>)>,
    reader_index: HashMap<(u16, Option<u16>), u16>,
    symbologies: Vec<String>,
    passes: Vec<Pass>,
    clock: Arc<dyn Clock>,
    /// wall − boot time while the wall clock is synced.
    offset: Option<i64>,
    /// Boot time since which this process has seen the clock synced (`i64::MIN`: synced
    /// when it started).
    synced_since: Option<i64>,
    boot: [u8; 16],
    seen: Counters,
    metrics: Arc<Metrics>,
    /// Write the pass log.
    durable: bool,
    rows_since_snapshot: u32,
    bytes_since_snapshot: usize,
    last_snapshot_bytes: usize,
    need_snapshot: bool,
    /// Ticks wait until the reads recovered from port journals have been taken (they are
    /// older than now and belong to passes that are still open).
    hold_ticks: bool,
    /// Reads at or before this boot time were recovered with no known time (see
    /// `SourceRead::time_unknown`): passes that began then are marked `unsynced`.
    unsure_until: i64,
    /// A `first`-mode event is waiting: the group is committed now, not at its deadline.
    urgent: bool,
    /// Latest read time seen (boot-time ms): a replay running faster than recorded is ahead
    /// of the clock, and its passes end on its own timeline.
    latest: i64,
    codec: zstd::bulk::Compressor<'static>,
    /// Sensors' last emitted value and when (boot ms), by source and sensor (id and type).
    sensors: HashMap<(u16, Box<str>), (f64, i64)>,
    /// The sensors' keys in the order they were first seen (for forgetting when full).
    sensor_order: std::collections::VecDeque<(u16, Box<str>)>,
}

/// Sensors whose last value is remembered for the deadband; beyond it the one emitted longest
/// ago is forgotten (its next reading is emitted whatever its value).
const SENSORS_MAX: usize = 10_000;

fn cdb(db: f64) -> i64 {
    (db * 100.0).round() as i64
}

impl Stage {
    /// The stage for `cfg`. `durable`: keep the pass log (the daemon); off for tools that do
    /// not commit.
    pub fn new(cfg: &Config, clock: Arc<dyn Clock>, metrics: Arc<Metrics>, durable: bool) -> Self {
        let sc = &cfg.suppress;
        let mut zones: Vec<Arc<str>> = Vec::new();
        let mut zone_index: HashMap<Arc<str>, u16> = HashMap::new();
        let mut zone = |name: &str| -> u16 {
            if let Some(i) = zone_index.get(name) {
                return *i;
            }
            let a: Arc<str> = Arc::from(name);
            let i = zones.len() as u16;
            zones.push(a.clone());
            zone_index.insert(a, i);
            i
        };
        let mut groups: Vec<Arc<str>> = Vec::new();
        let mut group_index: HashMap<Arc<str>, u16> = HashMap::new();
        let mut srcs = Vec::new();
        let mut rules = Vec::new();
        let mut modes = Vec::new();
        for s in &cfg.sources {
            let gname: Arc<str> = match &s.group {
                Some(g) => Arc::from(format!("group:{g}")),
                None => Arc::from(format!("source:{}", s.name)),
            };
            let group = match group_index.get(&gname) {
                Some(g) => *g,
                None => {
                    let g = groups.len() as u16;
                    groups.push(gname.clone());
                    group_index.insert(gname, g);
                    g
                }
            };
            let mode = match s.suppress.mode.unwrap_or(sc.mode) {
                SuppressMode::Aggregate => Mode::Aggregate,
                SuppressMode::First => Mode::First,
                SuppressMode::Off => Mode::Off,
            };
            let window = s
                .suppress
                .window
                // A barcode scanner; a text-mode RFID reader (a `fields` template) is RFID.
                .unwrap_or(
                    if s.protocol.kind == ProtocolKind::Lines && s.protocol.lines.fields.is_none() {
                        sc.barcode_window
                    } else {
                        sc.window
                    },
                );
            let floor = s.suppress.min_rssi_dbm.or(sc.min_rssi_dbm);
            rules.push(Rule {
                mode,
                window_ms: window.as_millis().min(u32::MAX as u128) as u32,
                offset_cdb: cdb(s.suppress.rssi_offset_db).clamp(-32767, 32767) as i16,
                floor_cdbm: floor.map(|f| cdb(f).clamp(-32767, 32767) as i16),
            });
            modes.push(mode);
            srcs.push(Src {
                name: Arc::from(s.name.as_str()),
                device: Arc::from(s.device.as_str()),
                scan_type: s.scan_type.as_deref().map(Arc::from),
                zone: zone(&s.location),
                antennas: s
                    .antenna_locations
                    .iter()
                    .map(|(a, l)| (*a, zone(l)))
                    .collect(),
                group,
                readers: Vec::new(),
                deadband: s.deadband,
                heartbeat_ms: s.heartbeat.as_millis().min(i64::MAX as u128) as i64,
            });
        }
        let settings = Settings {
            max_pass_ms: sc.max_pass.as_millis().min(u32::MAX as u128) as u32,
            max_tracked: sc.max_tracked,
            zone_margin_cdb: cdb(sc.zone_margin_db).clamp(0, 32767) as i16,
            zone_dwell_ms: sc.zone_dwell.as_millis().min(u32::MAX as u128) as u32,
            fade_cdb_per_s: cdb(sc.zone_fade_db_per_s).clamp(0, u32::MAX as i64) as u32,
            rules,
        };
        let mut sup = Suppressor::new(settings);
        if durable {
            sup.track_changes();
        }
        let offset = clock.offset();
        metrics.clock_unsynced.set(u64::from(offset.is_none()));
        Stage {
            sup,
            srcs,
            modes,
            zones,
            zone_index,
            groups,
            group_index,
            readers: Vec::new(),
            reader_index: HashMap::new(),
            symbologies: Vec::new(),
            passes: Vec::new(),
            synced_since: offset.map(|_| i64::MIN),
            offset,
            clock,
            boot: *crate::event::boot_id().as_bytes(),
            seen: Counters::default(),
            metrics,
            durable,
            rows_since_snapshot: 0,
            bytes_since_snapshot: 0,
            last_snapshot_bytes: 0,
            need_snapshot: true,
            hold_ticks: false,
            latest: i64::MIN,
            urgent: false,
            unsure_until: i64::MIN,
            // Level 1 as for chunks; a context that cannot be made (out of memory) fails
            // here once, at start, not per commit.
            codec: zstd::bulk::Compressor::new(1)
                .unwrap_or_else(|_| zstd::bulk::Compressor::default()),
            sensors: HashMap::new(),
            sensor_order: std::collections::VecDeque::new(),
        }
    }

    /// Hold ticks until [`Stage::release_ticks`] (recovered journal reads are on their way).
    pub fn hold_ticks(&mut self) {
        self.hold_ticks = true;
    }

    pub fn release_ticks(&mut self) {
        self.hold_ticks = false;
    }

    fn reader(&mut self, source: u16, antenna: Option<u16>) -> u16 {
        if let Some((_, r)) = self
            .srcs
            .get(source as usize)
            .and_then(|s| s.readers.iter().find(|(a, _)| *a == antenna))
        {
            return *r;
        }
        let r = self.intern_reader(source, antenna);
        if let Some(s) = self.srcs.get_mut(source as usize) {
            if s.readers.len() < 64 {
                s.readers.push((antenna, r));
            }
        }
        r
    }

    fn intern_reader(&mut self, source: u16, antenna: Option<u16>) -> u16 {
        if let Some(r) = self.reader_index.get(&(source, antenna)) {
            return *r;
        }
        let key = if self.readers.len() >= READERS_MAX {
            (source, None)
        } else {
            (source, antenna)
        };
        if let Some(r) = self.reader_index.get(&key) {
            return *r;
        }
        let r = self.readers.len() as u16;
        self.readers.push(key);
        self.reader_index.insert(key, r);
        r
    }

    fn symbology(&mut self, s: Option<&str>) -> u8 {
        let Some(s) = s else { return 0 };
        if let Some(i) = self.symbologies.iter().position(|x| x == s) {
            return i as u8 + 1;
        }
        if self.symbologies.len() >= SYMBOLOGIES_MAX {
            return 0;
        }
        self.symbologies.push(s.to_string());
        self.symbologies.len() as u8
    }

    /// Take one read; events of passes that ended are appended to `out`.
    pub fn read(&mut self, r: SourceRead, out: &mut Vec<EventBody>) {
        let Some(src) = self.srcs.get(r.source) else {
            return;
        };
        if r.time_unknown {
            self.unsure_until = self.unsure_until.max(r.mono_ms);
        }
        // Sensor readings are not passes: one event each (deadband is the MQTT sources').
        if r.read.kind == ReadKind::Sensor || self.modes.get(r.source) == Some(&Mode::Off) {
            if let (Some(rssi), Mode::Off) = (r.read.rssi_dbm, self.modes[r.source]) {
                // `off` still honours the floor and the calibration.
                let rule = self.sup.rule(r.source as u16);
                let c = (rssi as f64 * 100.0).round() as i64 + rule.offset_cdb as i64;
                if rule.floor_cdbm.is_some_and(|f| c < f as i64) {
                    self.metrics.suppress_reads.inc();
                    self.metrics.suppress_below_floor.inc();
                    self.metrics.count_drop("below_rssi_floor", 1);
                    return;
                }
            }
            self.metrics.suppress_reads.inc();
            if r.read.kind == ReadKind::Sensor && !self.sensor_moved(&r) {
                self.metrics.suppress_deadband.inc();
                return;
            }
            let src = &self.srcs[r.source];
            self.metrics.suppress_passes.inc();
            let zone = r
                .read
                .antenna
                .and_then(|a| src.antennas.iter().find(|(p, _)| *p == a))
                .map_or(src.zone, |(_, z)| *z);
            let (first, clock) = self.wall(r.mono_ms);
            let calibrated = r.read.rssi_dbm.map(|d| {
                (d as f64 * 100.0).round() as i32 + self.sup.rule(r.source as u16).offset_cdb as i32
            });
            // A sensor event's scan_type slot holds its sensor_type, symbology its unit.
            let (device, scan_type, symbology) = match r.read.sensor {
                Some(meta) => (
                    meta.device
                        .map_or_else(|| src.device.clone(), |d| Arc::from(d.as_str())),
                    meta.sensor_type
                        .map(|t| crate::event::intern(&t))
                        .or_else(|| src.scan_type.clone()),
                    meta.unit,
                ),
                None => (src.device.clone(), src.scan_type.clone(), r.read.symbology),
            };
            out.push(EventBody {
                kind: r.read.kind,
                tag: r.read.tag,
                source: src.name.clone(),
                location: self.zones[zone as usize].clone(),
                device,
                scan_type,
                antenna: r.read.antenna,
                rssi_cdbm: calibrated,
                read_count: 1,
                first_seen_ms: first,
                last_seen_ms: first,
                symbology,
                value: r.read.value,
                clock,
            });
            return;
        }
        let zone = r
            .read
            .antenna
            .and_then(|a| src.antennas.iter().find(|(p, _)| *p == a))
            .map_or(src.zone, |(_, z)| *z);
        let group = src.group;
        self.latest = self.latest.max(r.mono_ms);
        let reader = self.reader(r.source as u16, r.read.antenna);
        let symbology = self.symbology(r.read.symbology.as_deref());
        let rin = ReadIn {
            tag: &r.read.tag,
            kind: r.read.kind,
            group,
            zone,
            reader,
            rule: r.source as u16,
            rssi_dbm: r.read.rssi_dbm,
            symbology,
            at_ms: r.mono_ms,
        };
        let mut passes = std::mem::take(&mut self.passes);
        self.sup.read(&rin, &mut passes);
        for p in passes.drain(..) {
            self.urgent |= p.end == super::End::First;
            out.push(self.body(p));
        }
        self.passes = passes;
    }

    /// Deadband of sensor readings: true when this reading is to be emitted (its sensor's
    /// first, a move beyond the source's `deadband` from the last one emitted, or the
    /// `heartbeat` passed since), and then remembered as the last one emitted.
    fn sensor_moved(&mut self, r: &SourceRead) -> bool {
        let Some(src) = self.srcs.get(r.source) else {
            return true;
        };
        let Some(value) = r.read.value else {
            return true;
        };
        let resent = r.resent;
        let (deadband, heartbeat) = (src.deadband, src.heartbeat_ms);
        // One sensor: its id, type, unit and device (two devices reporting the same id, or one
        // id in two units, are different series).
        let meta = r.read.sensor.as_deref();
        let key = (
            r.source as u16,
            format!(
                "{}\u{0}{}\u{0}{}\u{0}{}",
                r.read.tag,
                meta.and_then(|m| m.sensor_type.as_deref()).unwrap_or(""),
                meta.and_then(|m| m.unit.as_deref()).unwrap_or(""),
                meta.and_then(|m| m.device.as_deref()).unwrap_or("")
            )
            .into_boxed_str(),
        );
        let now = r.mono_ms;
        if let Some((last, at)) = self.sensors.get_mut(&key) {
            // Times of readings handed over together may be out of order by a millisecond
            // (each is placed from the wall clock): a reading "before" the last one emitted
            // is judged by its value only.
            let emit =
                resent || (value - *last).abs() > deadband || now.saturating_sub(*at) >= heartbeat;
            if emit {
                *last = value;
                *at = now;
            }
            return emit;
        }
        // Full: the sensor seen first is forgotten (in O(1): sensors come and go rarely).
        if self.sensors.len() >= SENSORS_MAX {
            if let Some(oldest) = self.sensor_order.pop_front() {
                self.sensors.remove(&oldest);
            }
        }
        self.sensor_order.push_back(key.clone());
        self.sensors.insert(key, (value, now));
        true
    }

    /// True once since a `first`-mode event was emitted: its group should be committed at
    /// once (that mode is chosen for latency).
    pub fn take_urgent(&mut self) -> bool {
        std::mem::take(&mut self.urgent)
    }

    /// End the passes whose window ran out, and follow the wall clock (once per group).
    pub fn tick(&mut self, out: &mut Vec<EventBody>) {
        self.follow_clock();
        if self.hold_ticks {
            self.publish();
            return;
        }
        let now = self.clock.boot_ms().max(self.latest);
        let mut passes = std::mem::take(&mut self.passes);
        self.sup.tick(now, &mut passes);
        for p in passes.drain(..) {
            out.push(self.body(p));
        }
        self.passes = passes;
        self.publish();
    }

    /// Emit every open pass (end of input: demo, replay).
    pub fn flush(&mut self, out: &mut Vec<EventBody>) {
        self.follow_clock();
        let mut passes = std::mem::take(&mut self.passes);
        self.sup.flush(&mut passes);
        for p in passes.drain(..) {
            out.push(self.body(p));
        }
        self.passes = passes;
        self.publish();
    }

    fn follow_clock(&mut self) {
        let now = self.clock.offset();
        match (self.offset, now) {
            (None, Some(_)) => {
                tracing::info!(wall_ms = self.clock.wall_ms(), "The wall clock is synced now: reads taken while it was not are re-based to true wall time (clock = \"rebased\") and delivery resumes");
                self.synced_since = Some(self.clock.boot_ms());
            }
            (Some(_), None) => {
                tracing::warn!(wall_ms = self.clock.wall_ms(), "The wall clock went back before this build's date: reads are stamped on boot time until it is right again, and delivery waits");
            }
            (Some(a), Some(b)) if (a - b).abs() > STEP_LOG_MS => {
                tracing::warn!(step_ms = b - a, "The wall clock stepped; events read before the step keep the times of the clock then");
            }
            _ => {}
        }
        self.offset = now;
        self.metrics.clock_unsynced.set(u64::from(now.is_none()));
    }

    fn publish(&mut self) {
        let c = self.sup.counters();
        let m = &self.metrics;
        let s = &self.seen;
        m.suppress_reads.add(c.reads_in - s.reads_in);
        m.suppress_below_floor.add(c.below_floor - s.below_floor);
        if c.below_floor > s.below_floor {
            m.count_drop("below_rssi_floor", c.below_floor - s.below_floor);
        }
        m.suppress_suppressed.add(c.suppressed - s.suppressed);
        m.suppress_passes.add(c.passes - s.passes);
        m.suppress_forced.add(c.forced - s.forced);
        m.suppress_moves.add(c.moves - s.moves);
        m.suppress_tracked.set(self.sup.tracked() as u64);
        self.seen = c;
    }

    /// Wall time and clock mark of boot time `mono`.
    fn wall(&self, mono: i64) -> (i64, ClockMark) {
        match self.offset {
            Some(off) if mono <= self.unsure_until => (mono + off, ClockMark::Unsynced),
            Some(off) => {
                let mark = match self.synced_since {
                    Some(since) if mono >= since => ClockMark::Synced,
                    _ => ClockMark::Rebased,
                };
                (mono + off, mark)
            }
            None => (mono, ClockMark::Mono),
        }
    }

    fn body(&self, p: Pass) -> EventBody {
        let (source, antenna) = self
            .readers
            .get(p.reader as usize)
            .copied()
            .unwrap_or((0, None));
        let src = &self.srcs[(source as usize).min(self.srcs.len() - 1)];
        let (first, clock) = self.wall(p.first_ms);
        let (last, _) = self.wall(p.last_ms);
        EventBody {
            kind: p.kind,
            tag: p.tag,
            source: src.name.clone(),
            location: self
                .zones
                .get(p.zone as usize)
                .cloned()
                .unwrap_or_else(|| src.name.clone()),
            device: src.device.clone(),
            scan_type: src.scan_type.clone(),
            antenna,
            rssi_cdbm: p.peak_cdbm.map(i32::from),
            read_count: p.read_count,
            first_seen_ms: first,
            last_seen_ms: last,
            symbology: p
                .symbology
                .checked_sub(1)
                .and_then(|i| self.symbologies.get(i as usize).cloned()),
            value: None,
            clock,
        }
    }

    /// Open passes now.
    pub fn tracked(&self) -> usize {
        self.sup.tracked()
    }

    /// What the suppressor counted.
    pub fn counters(&self) -> Counters {
        self.sup.counters()
    }

    /// The spool failed to commit a row: the next one is a snapshot (deltas after a lost
    /// one would not add up).
    pub fn row_lost(&mut self) {
        self.need_snapshot = true;
    }

    /// The pass-log row for the group being committed (None: nothing changed, or the stage
    /// is not durable). `(blob, snapshot)`. `busy`: reads are queueing up; a snapshot (which
    /// encodes every open pass) then waits for the burst to pass, within bounds.
    pub fn log_row(&mut self, busy: bool) -> Option<(Vec<u8>, bool)> {
        if !self.durable {
            return None;
        }
        let due = self.rows_since_snapshot >= SNAPSHOT_ROWS
            || self.bytes_since_snapshot
                > (SNAPSHOT_FACTOR * self.last_snapshot_bytes).max(SNAPSHOT_MIN_BYTES);
        let snapshot = self.need_snapshot
            || (due && (!busy || self.bytes_since_snapshot > SNAPSHOT_DEFER_MAX_BYTES));
        let changes = if snapshot {
            Changes {
                open: self.sup.snapshot(),
                closed: Vec::new(),
            }
        } else {
            let c = self.sup.take_changes();
            if c.open.is_empty() && c.closed.is_empty() {
                return None;
            }
            c
        };
        let row = self.row_of(changes, snapshot);
        let raw = match postcard::to_stdvec(&row) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "Cannot encode the open passes; writing a snapshot next");
                self.need_snapshot = true;
                return None;
            }
        };
        let blob = match self.codec.compress(&raw) {
            // A CRC-32C of the encoded row follows the frame: a row damaged on flash (small
            // rows are stored almost verbatim) is refused instead of decoding into another
            // tag or wrong numbers.
            Ok(mut b) => {
                b.extend_from_slice(&ROW_CRC.checksum(&raw).to_le_bytes());
                b
            }
            Err(e) => {
                tracing::error!(error = %e, "Cannot compress the open passes; writing a snapshot next");
                self.need_snapshot = true;
                return None;
            }
        };
        if snapshot {
            self.need_snapshot = false;
            self.rows_since_snapshot = 0;
            self.bytes_since_snapshot = 0;
            self.last_snapshot_bytes = blob.len();
        } else {
            self.rows_since_snapshot += 1;
            self.bytes_since_snapshot += blob.len();
        }
        Some((blob, snapshot))
    }

    fn row_of(&self, c: Changes, snapshot: bool) -> LogRow {
        let mut t = Tables::default();
        let zone = |t: &mut Tables, z: &SavedZone| -> SavedZone {
            if z.zone == super::NO_ZONE {
                return *z;
            }
            let name = self.zones.get(z.zone as usize).map_or("", |n| &**n);
            let zi = t.name(name);
            let (src, ant) = self
                .readers
                .get(z.reader as usize)
                .copied()
                .unwrap_or((0, None));
            let sname = self.srcs.get(src as usize).map_or("", |s| &*s.name);
            let si = t.name(sname);
            let ri = t.reader(si, ant);
            SavedZone {
                zone: zi,
                reader: ri,
                ..*z
            }
        };
        let mut passes = Vec::with_capacity(c.open.len());
        for mut p in c.open {
            p.group = t.name(self.groups.get(p.group as usize).map_or("", |g| &**g));
            p.rule = t.name(self.srcs.get(p.rule as usize).map_or("", |s| &*s.name));
            p.hold = zone(&mut t, &p.hold);
            p.merged = zone(&mut t, &p.merged);
            p.chal = zone(&mut t, &p.chal);
            if let Some(sym) = p
                .symbology
                .checked_sub(1)
                .and_then(|i| self.symbologies.get(i as usize))
            {
                let i = match t.symbologies.iter().position(|s| s == sym) {
                    Some(i) => i,
                    None => {
                        t.symbologies.push(sym.clone());
                        t.symbologies.len() - 1
                    }
                };
                p.symbology = (i + 1).min(255) as u8;
            } else {
                p.symbology = 0;
            }
            passes.push(p);
        }
        let closed = c
            .closed
            .into_iter()
            .map(|(g, tag)| {
                (
                    t.name(self.groups.get(g as usize).map_or("", |g| &**g)),
                    tag,
                )
            })
            .collect();
        LogRow {
            boot: self.boot,
            snapshot,
            names: t.names,
            readers: t.readers,
            symbologies: t.symbologies,
            passes,
            closed,
        }
    }

    /// Put back the open passes stored in `rows` (the spool's pass log, oldest first). Passes
    /// that cannot go back (see the module docs) are emitted into `out` at once, with their
    /// stored boot-time stamps re-based by `boot_offsets` (boot id → wall − boot time, as the
    /// spool recorded them) or, without one, marked `unsynced`. The next log row is a
    /// snapshot. Rows that cannot be read are skipped (logged): what they held is in the
    /// ports' journals only if it was not committed, so this may lose open passes of a
    /// damaged spool, never committed events.
    pub fn recover(
        &mut self,
        rows: &[Vec<u8>],
        boot_offsets: &HashMap<[u8; 16], i64>,
        out: &mut Vec<EventBody>,
    ) -> Recovered {
        let mut open: HashMap<(String, String), NamedPass> = HashMap::new();
        for blob in rows {
            let row: LogRow = match blob
                .len()
                .checked_sub(4)
                .map(|n| blob.split_at(n))
                .and_then(|(frame, crc)| {
                    let raw = zstd::bulk::decompress(frame, 256 << 20).ok()?;
                    (ROW_CRC.checksum(&raw).to_le_bytes() == crc).then_some(raw)
                })
                .and_then(|raw| postcard::from_bytes(&raw).ok())
            {
                Some(r) => r,
                None => {
                    tracing::error!(bytes = blob.len(), "A row of the spool's pass log cannot be read; the open passes it held are not restored");
                    continue;
                }
            };
            if row.snapshot {
                open.clear();
            }
            let name = |i: u16| row.names.get(i as usize).cloned().unwrap_or_default();
            for (g, tag) in &row.closed {
                open.remove(&(name(*g), tag.clone()));
            }
            for p in &row.passes {
                let zone = |z: &SavedZone| -> (Option<String>, Option<(String, Option<u16>)>) {
                    if z.zone == super::NO_ZONE {
                        return (None, None);
                    }
                    let reader = row
                        .readers
                        .get(z.reader as usize)
                        .map(|(s, a)| (name(*s), *a));
                    (Some(name(z.zone)), reader)
                };
                let (hz, hr) = zone(&p.hold);
                let (mz, mr) = zone(&p.merged);
                let (cz, cr) = zone(&p.chal);
                let key = (name(p.group), p.tag.clone());
                open.insert(
                    key,
                    NamedPass {
                        p: p.clone(),
                        group: name(p.group),
                        source: name(p.rule),
                        zones: [hz, mz, cz],
                        readers: [hr, mr, cr],
                        symbology: p
                            .symbology
                            .checked_sub(1)
                            .and_then(|i| row.symbologies.get(i as usize).cloned()),
                        boot: row.boot,
                    },
                );
            }
        }
        let mut all: Vec<NamedPass> = open.into_values().collect();
        all.sort_by_key(|n| n.p.last_ms());
        let mut done = Recovered::default();
        let mut early = Vec::new();
        for n in all {
            if !n.p.is_consistent() {
                tracing::error!(tag = %n.p.tag, "An open pass in the spool's pass log does not hold together (a damaged row?); it is dropped");
                continue;
            }
            // A pass whose reads lie ahead of now (a replay's capture time, or a damaged row)
            // cannot go on: it would hold back the ending of every later pass.
            let now = self.clock.boot_ms();
            match self.map_back(&n) {
                Some(p) if n.boot == self.boot && p.last_ms() <= now => {
                    self.sup.restore(&p, &mut early);
                    done.restored += 1;
                }
                _ => {
                    out.push(self.emit_named(&n, boot_offsets));
                    done.emitted += 1;
                }
            }
        }
        for p in early {
            out.push(self.body(p));
        }
        self.need_snapshot = true;
        self.metrics.suppress_restored.add(done.restored as u64);
        self.metrics
            .suppress_recovered_emitted
            .add(done.emitted as u64);
        self.metrics.suppress_tracked.set(self.sup.tracked() as u64);
        done
    }

    /// A stored pass in this config's indices, if every name it uses still exists.
    fn map_back(&mut self, n: &NamedPass) -> Option<SavedPass> {
        let group = *self.group_index.get(n.group.as_str())?;
        let source = self.srcs.iter().position(|s| *s.name == *n.source)? as u16;
        if self.srcs[source as usize].group != group {
            return None;
        }
        let mut p = n.p.clone();
        p.group = group;
        p.rule = source;
        let mut zones = [p.hold, p.merged, p.chal];
        for (k, z) in zones.iter_mut().enumerate() {
            if z.zone == super::NO_ZONE {
                continue;
            }
            z.zone = *self.zone_index.get(n.zones[k].as_deref()?)?;
            let (rs, ra) = n.readers[k].as_ref()?;
            let rsrc = self.srcs.iter().position(|s| *s.name == **rs)? as u16;
            z.reader = self.reader(rsrc, *ra);
        }
        [p.hold, p.merged, p.chal] = zones;
        p.symbology = self.symbology(n.symbology.as_deref());
        Some(p)
    }

    /// The event of a stored pass that cannot be put back: every read of it, at its
    /// strongest zone.
    fn emit_named(&self, n: &NamedPass, boot_offsets: &HashMap<[u8; 16], i64>) -> EventBody {
        let p = &n.p;
        let zs = [p.hold, p.merged, p.chal];
        let mut win = 0;
        for k in 1..3 {
            let (a, b) = (&zs[k], &zs[win]);
            if a.zone != super::NO_ZONE
                && (b.zone == super::NO_ZONE
                    || (a.peak, a.count, std::cmp::Reverse(a.first))
                        > (b.peak, b.count, std::cmp::Reverse(b.first)))
            {
                win = k;
            }
        }
        let location = n.zones[win].clone().unwrap_or_default();
        let (rsrc, antenna) = n.readers[win].clone().unwrap_or((n.source.clone(), None));
        let src = self.srcs.iter().find(|s| *s.name == *rsrc);
        let (first, last, clock) = if n.boot == self.boot {
            match self.offset {
                Some(_) => {
                    let (first, clock) = self.wall(p.first_ms);
                    (first, self.wall(p.last_ms()).0, clock)
                }
                None => (p.first_ms, p.last_ms(), ClockMark::Mono),
            }
        } else {
            match boot_offsets.get(&n.boot) {
                Some(off) => (p.first_ms + off, p.last_ms() + off, ClockMark::Rebased),
                // Its boot never had a synced clock: placed in time at sending.
                None => (0, 0, ClockMark::Unsynced),
            }
        };
        EventBody {
            kind: p.kind,
            tag: p.tag.clone(),
            source: Arc::from(rsrc.as_str()),
            location: Arc::from(location.as_str()),
            device: src.map_or_else(|| Arc::from(rsrc.as_str()), |s| s.device.clone()),
            scan_type: src.and_then(|s| s.scan_type.clone()),
            antenna,
            rssi_cdbm: (zs[win].peak != super::NONE).then_some(zs[win].peak as i32),
            read_count: p.count,
            first_seen_ms: first,
            last_seen_ms: last,
            symbology: n.symbology.clone(),
            value: None,
            clock,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Read;
    use proptest::prelude::*;

    thread_local! {
        /// Boot time now for [`Fixed`]: the time of the last read made (see `source_read`).
        static NOW: std::cell::Cell<i64> = const { std::cell::Cell::new(1_000) };
    }

    /// Wall and boot time move together with the reads: the stage's clock offset does not
    /// drift during a test, and "now" is the last read's time.
    #[derive(Debug)]
    struct Fixed;
    impl Clock for Fixed {
        fn wall_ms(&self) -> i64 {
            1_800_000_000_000 + NOW.with(|n| n.get())
        }
        fn boot_ms(&self) -> i64 {
            NOW.with(|n| n.get())
        }
    }

    fn config(extra_source: &str) -> Config {
        let text = format!(
            "[gateway]\nid = \"gw\"\nstate_dir = \"/tmp/x\"\n[suppress]\nwindow_ms = 500\nmax_pass_ms = 5000\nmax_tracked = 64\n\
             [[source]]\nname = \"a\"\nkind = \"serial\"\nprotocol = \"uhf-bb\"\npath = \"/dev/ttyFAKE0\"\ngroup = \"belt\"\nlocation = \"A\"\n\
             [[source]]\nname = \"b\"\nkind = \"serial\"\nprotocol = \"uhf-bb\"\npath = \"/dev/ttyFAKE1\"\ngroup = \"belt\"\nlocation = \"B\"\n[source.antennas]\n2 = \"B2\"\n{extra_source}\
             [upstream]\nurl = \"http://127.0.0.1:9\"\nprofile = \"bag-events\"\n"
        );
        Config::parse(&text, std::path::Path::new("/")).unwrap()
    }

    fn stage(cfg: &Config) -> Stage {
        Stage::new(cfg, Arc::new(Fixed), Arc::default(), true)
    }

    /// Sensor readings: the first is emitted; then one beyond `deadband` of the last emitted,
    /// or one `heartbeat_ms` after it; per sensor (id and type); with the reading's type, unit
    /// and device on the event.
    #[test]
    fn sensor_deadband_and_heartbeat() {
        let cfg = config(
            "[[source]]\nname = \"s\"\nkind = \"replay\"\nprotocol = \"lines\"\nfile = \"/x.cap\"\ndeadband = 0.5\nheartbeat_ms = 10000\nlocation = \"HALL\"\n",
        );
        let mut st = stage(&cfg);
        let reading = |id: &str, kind: &str, v: f64, at: i64| SourceRead {
            source: 2,
            read: Read {
                kind: ReadKind::Sensor,
                tag: id.into(),
                antenna: None,
                rssi_dbm: None,
                rssi_raw: None,
                symbology: None,
                value: Some(v),
                sensor: Some(Box::new(crate::event::SensorMeta {
                    sensor_type: Some(kind.into()),
                    unit: Some("C".into()),
                    device: Some("plc-7".into()),
                })),
            },
            wall_ms: at,
            mono_ms: at,
            time_unknown: false,
            journal_end: 0,
            frame_more: false,
            resent: false,
        };
        let mut out = Vec::new();
        for (id, kind, v, at) in [
            ("t1", "temperature", 20.0, 1_000),
            ("t1", "temperature", 20.3, 999), // placed a millisecond earlier: within
            ("t1", "temperature", 20.4, 2_000), // within 0.5
            ("t1", "temperature", 19.6, 3_000), // within 0.5 of 20.0
            ("t1", "humidity", 20.2, 3_500),  // another sensor type: its first
            ("t1", "temperature", 20.6, 4_000), // beyond
            ("t1", "temperature", 20.7, 13_999), // within, heartbeat not yet
            ("t1", "temperature", 20.7, 14_000), // heartbeat since 20.6 at 4,000
            ("t2", "temperature", 20.7, 14_001), // another sensor id
        ] {
            st.read(reading(id, kind, v, at), &mut out);
        }
        // A reading handed over again after the spool refused it is not a repeat of itself.
        let mut again = reading("t2", "temperature", 20.7, 14_001);
        again.resent = true;
        st.read(again, &mut out);
        // The same id, type and value from another device is another sensor.
        let mut other = reading("t1", "temperature", 20.7, 14_002);
        if let Some(m) = other.read.sensor.as_mut() {
            m.device = Some("plc-8".into());
        }
        st.read(other, &mut out);
        let got: Vec<(String, Option<f64>, i64)> = out
            .iter()
            .map(|b| (b.tag.clone(), b.value, b.first_seen_ms - 1_800_000_000_000))
            .collect();
        assert_eq!(
            got,
            vec![
                ("t1".into(), Some(20.0), 1_000),
                ("t1".into(), Some(20.2), 3_500),
                ("t1".into(), Some(20.6), 4_000),
                ("t1".into(), Some(20.7), 14_000),
                ("t2".into(), Some(20.7), 14_001),
                ("t2".into(), Some(20.7), 14_001),
                ("t1".into(), Some(20.7), 14_002),
            ]
        );
        let b = &out[1];
        assert_eq!(b.scan_type.as_deref(), Some("humidity"));
        assert_eq!(
            (b.symbology.as_deref(), &*b.device, &*b.location),
            (Some("C"), "plc-7", "HALL")
        );
    }

    /// (source, tag, RSSI dBm, antenna, ms since the previous read)
    type R = (usize, u8, i8, u16, u16);

    fn source_read(r: &R, at: i64) -> SourceRead {
        NOW.with(|n| n.set(n.get().max(at)));
        SourceRead {
            source: r.0,
            read: Read {
                kind: ReadKind::Epc,
                tag: format!("E2{:022X}", r.1),
                antenna: Some(r.3),
                rssi_dbm: Some(r.2 as f32),
                rssi_raw: None,
                symbology: None,
                value: None,
                sensor: None,
            },
            wall_ms: at,
            mono_ms: at,
            time_unknown: false,
            journal_end: 0,
            frame_more: false,
            resent: false,
        }
    }

    type Ev = (String, String, u32, Option<i32>, i64, i64);

    fn key(b: &EventBody) -> Ev {
        (
            b.tag.clone(),
            b.location.to_string(),
            b.read_count,
            b.rssi_cdbm,
            b.first_seen_ms,
            b.last_seen_ms,
        )
    }

    /// The spool's side of the pass log: rows kept in order, a snapshot voids the ones before.
    fn keep(rows: &mut Vec<Vec<u8>>, row: Option<(Vec<u8>, bool)>) {
        if let Some((blob, snapshot)) = row {
            if snapshot {
                rows.clear();
            }
            rows.push(blob);
        }
    }

    /// Run `reads` in commit groups of `group`; returns the events. With `crash_after`, the
    /// stage dies after that many groups (everything committed so far kept: events and pass-log
    /// rows) and a new one recovers from the rows and takes the remaining reads.
    fn run(cfg: &Config, reads: &[R], group: usize, crash_after: Option<usize>) -> Vec<Ev> {
        NOW.with(|n| n.set(10_000));
        let mut s = stage(cfg);
        s.release_ticks();
        let mut rows = Vec::new();
        let mut events = Vec::new();
        let mut t = 10_000i64;
        for (g, chunk) in reads.chunks(group.max(1)).enumerate() {
            if crash_after == Some(g) {
                let mut fresh = stage(cfg);
                let mut out = Vec::new();
                fresh.recover(&rows, &HashMap::new(), &mut out);
                fresh.release_ticks();
                events.extend(out.iter().map(key));
                s = fresh;
            }
            let mut out = Vec::new();
            for r in chunk {
                t += r.4 as i64;
                s.read(source_read(r, t), &mut out);
            }
            s.tick(&mut out);
            keep(&mut rows, s.log_row(false));
            events.extend(out.iter().map(key));
        }
        let mut out = Vec::new();
        s.flush(&mut out);
        events.extend(out.iter().map(key));
        events.sort();
        events
    }

    fn read() -> impl Strategy<Value = R> {
        (0usize..2, 0u8..40, -80i8..-30, 1u16..3, 0u16..120)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// A crash between any two commits changes nothing: the passes restored from the
        /// pass log go on exactly as if the stage had never stopped (long inputs: hundreds to
        /// thousands of reads, tables forced to close passes early).
        #[test]
        fn a_restart_from_the_pass_log_changes_no_event(
            reads in proptest::collection::vec(read(), 200..2000),
            group in 1usize..40,
            cut in 0usize..100,
        ) {
            let cfg = config("");
            let whole = run(&cfg, &reads, group, None);
            let groups = reads.len().div_ceil(group);
            let crashed = run(&cfg, &reads, group, Some(cut % groups.max(1)));
            prop_assert_eq!(whole, crashed);
        }
    }

    /// Passes saved by another boot cannot go on (their boot times mean nothing now): they are
    /// emitted at once, with their reads, re-based by that boot's recorded offset.
    #[test]
    fn passes_of_another_boot_are_emitted_at_once() {
        let cfg = config("");
        let mut s = stage(&cfg);
        let mut out = Vec::new();
        for k in 0..5 {
            s.read(
                source_read(&(0, 7, -50 - k, 1, 0), 20_000 + k as i64),
                &mut out,
            );
        }
        let (row, snapshot) = s.log_row(false).unwrap();
        assert!(snapshot && out.is_empty());
        let mut fresh = stage(&cfg);
        fresh.boot = [9; 16];
        let mut offsets = HashMap::new();
        offsets.insert(s.boot, 1_000_000);
        let mut got = Vec::new();
        let r = fresh.recover(&[row], &offsets, &mut got);
        assert_eq!(
            r,
            Recovered {
                restored: 0,
                emitted: 1
            }
        );
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].read_count, 5);
        assert_eq!(got[0].first_seen_ms, 1_020_000);
        assert_eq!(got[0].clock, ClockMark::Rebased);
        assert_eq!(fresh.tracked(), 0);
    }

    /// A pass whose source left the config is emitted from what was stored, at its zone.
    #[test]
    fn passes_of_a_removed_source_are_emitted_at_once() {
        let with_c = config(
            "[[source]]\nname = \"c\"\nkind = \"serial\"\nprotocol = \"uhf-bb\"\npath = \"/dev/ttyFAKE2\"\nlocation = \"C\"\n",
        );
        let mut s = stage(&with_c);
        let mut out = Vec::new();
        s.read(source_read(&(2, 3, -40, 1, 0), 30_000), &mut out);
        s.read(source_read(&(0, 4, -40, 1, 0), 30_001), &mut out);
        let (row, _) = s.log_row(false).unwrap();
        let mut fresh = stage(&config(""));
        let mut got = Vec::new();
        let r = fresh.recover(&[row], &HashMap::new(), &mut got);
        assert_eq!(
            r,
            Recovered {
                restored: 1,
                emitted: 1
            }
        );
        assert_eq!(&*got[0].location, "C");
        assert_eq!(got[0].read_count, 1);
        assert_eq!(fresh.tracked(), 1, "the pass of source a goes on");
    }

    /// A damaged pass-log row is skipped (logged), never a panic.
    #[test]
    fn a_damaged_row_is_skipped() {
        let cfg = config("");
        let mut s = stage(&cfg);
        let mut out = Vec::new();
        s.read(source_read(&(0, 1, -40, 1, 0), 40_000), &mut out);
        let (row, _) = s.log_row(false).unwrap();
        let mut bad = row.clone();
        let n = bad.len();
        bad[n / 2] ^= 0xFF;
        for rows in [
            vec![bad],
            vec![vec![]],
            vec![vec![0x28, 0xB5, 0x2F, 0xFD, 1, 2, 3]],
        ] {
            let mut fresh = stage(&cfg);
            fresh.recover(&rows, &HashMap::new(), &mut out);
        }
        let mut fresh = stage(&cfg);
        assert_eq!(fresh.recover(&[row], &HashMap::new(), &mut out).restored, 1);
    }

    /// A row that decodes but holds numbers the suppressor never leaves (a byte flipped on
    /// flash inside a row stored almost verbatim) is not restored: restoring it made the next
    /// read of that tag overflow its read count (a panic in debug builds, a wrong count in
    /// release).
    #[test]
    fn a_decodable_row_with_impossible_numbers_is_not_restored() {
        let cfg = config("");
        let mut s = stage(&cfg);
        let mut out = Vec::new();
        for k in 0..5 {
            s.read(source_read(&(0, 9, -50, 1, 0), 50_000 + k), &mut out);
        }
        let good = s.sup.snapshot();
        let mut t = Tables::default();
        let bad_rows: Vec<Vec<u8>> = [
            |p: &mut SavedPass| p.count = u32::MAX,
            |p: &mut SavedPass| p.hold.count = 1000,
            |p: &mut SavedPass| p.chal_last = p.last + 1,
            |p: &mut SavedPass| p.first_ms = i64::MAX - 1,
            |p: &mut SavedPass| p.hold.zone = super::super::NO_ZONE,
        ]
        .iter()
        .map(|damage| {
            let mut p = good[0].clone();
            p.group = t.name("group:belt");
            p.rule = t.name("a");
            let z = t.name("A");
            let r = t.reader(p.rule, Some(1));
            p.hold.zone = z;
            p.hold.reader = r;
            damage(&mut p);
            let row = LogRow {
                boot: s.boot,
                snapshot: true,
                names: t.names.clone(),
                readers: t.readers.clone(),
                symbologies: Vec::new(),
                passes: vec![p],
                closed: Vec::new(),
            };
            let raw = postcard::to_stdvec(&row).unwrap();
            let mut blob = zstd::bulk::compress(&raw, 1).unwrap();
            blob.extend_from_slice(&ROW_CRC.checksum(&raw).to_le_bytes());
            blob
        })
        .collect();
        for row in bad_rows {
            let mut fresh = stage(&cfg);
            fresh.release_ticks();
            let mut got = Vec::new();
            let r = fresh.recover(&[row], &HashMap::new(), &mut got);
            assert_eq!(r, Recovered::default(), "dropped, not restored");
            for k in 0..3 {
                fresh.read(source_read(&(0, 9, -50, 1, 0), 50_010 + k), &mut got);
            }
            fresh.flush(&mut got);
            assert_eq!(got.len(), 1);
            assert_eq!(got[0].read_count, 3);
        }
    }

    /// Any single byte of a row changed (flash damage) makes the row unreadable: it never
    /// restores a pass of another tag or with other numbers. (Small rows are stored almost
    /// verbatim by zstd: before the row's CRC, one changed byte of a tag restored, and later
    /// sent, a pass of a tag never read.)
    #[test]
    fn a_row_with_any_byte_changed_is_refused() {
        let cfg = config("");
        let mut s = stage(&cfg);
        let mut out = Vec::new();
        for k in 0..10 {
            s.read(source_read(&(0, 0xDD, -50, 1, 0), 60_000 + k), &mut out);
        }
        let (row, _) = s.log_row(false).unwrap();
        let mut intact = stage(&cfg);
        assert_eq!(
            intact
                .recover(std::slice::from_ref(&row), &HashMap::new(), &mut out)
                .restored,
            1
        );
        for i in 0..row.len() {
            for flip in [0x01u8, 0x80] {
                let mut bad = row.clone();
                bad[i] ^= flip;
                let mut fresh = stage(&cfg);
                let r = fresh.recover(&[bad], &HashMap::new(), &mut out);
                assert_eq!(r, Recovered::default(), "byte {i} ^ {flip:#x} was taken");
            }
        }
    }

    /// A stored pass whose reads lie ahead of now (a replay's capture time, or a damaged row)
    /// is emitted at start, not restored: restored, it held back the ending of every later
    /// pass until the clock reached it.
    #[test]
    fn a_pass_from_the_future_is_emitted_not_restored() {
        #[derive(Debug)]
        struct Early;
        impl Clock for Early {
            fn wall_ms(&self) -> i64 {
                1_800_000_000_000
            }
            fn boot_ms(&self) -> i64 {
                500
            }
        }
        let cfg = config("");
        let mut s = stage(&cfg);
        let mut out = Vec::new();
        s.read(source_read(&(0, 0xEE, -50, 1, 0), 90_000), &mut out);
        let (row, _) = s.log_row(false).unwrap();
        let mut fresh = Stage::new(&cfg, Arc::new(Early), Arc::default(), true);
        fresh.boot = s.boot;
        let mut got = Vec::new();
        let r = fresh.recover(&[row], &HashMap::new(), &mut got);
        assert_eq!(
            r,
            Recovered {
                restored: 0,
                emitted: 1
            }
        );
        assert_eq!(fresh.tracked(), 0);
        assert_eq!(got[0].read_count, 1);
    }
}
