//! Process-wide counters and gauges, rendered as Prometheus text on `/metrics`.
//! Every drop is counted with a reason (`scangate_dropped_total{reason="…"}`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1)
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn sub(&self, n: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    /// Add one unless the value is already `max` or more (atomically); true when added.
    pub fn inc_below(&self, max: u64) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                (v < max).then_some(v + 1)
            })
            .is_ok()
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    /// Woken when a source keeps a read for the status page (its live view).
    pub reads_shown: tokio::sync::Notify,
    /// Status pages connected to `/events` now.
    pub admin_live_clients: Gauge,
    pub frames_in: Counter,
    pub bytes_in: Counter,
    pub reads_in: Counter,
    pub spool_committed: Counter,
    pub spool_commits: Counter,
    /// Groups of reads the ingest stage handed to the spool (several may share one
    /// transaction).
    pub ingest_groups: Counter,
    /// Events the forwarder took straight from a commit, without reading the spool back.
    pub forward_handoff: Counter,
    pub spool_backlog: Gauge,
    pub spool_used_bytes: Gauge,
    /// Size of the spool's write-ahead log file, bytes.
    pub spool_wal_bytes: Gauge,
    /// 1 while the write-ahead log grows because checkpoints are blocked.
    pub spool_wal_blocked: Gauge,
    pub spool_corrupt_incidents: Counter,
    pub spool_corrupt_chunks: Counter,
    pub spool_disk_full: Gauge,
    /// 1 while another process holds a write lock on the spool (commits are retried).
    pub spool_blocked: Gauge,
    /// Dead letters deleted because their own bound (`dead_letter_max_bytes`) was reached.
    pub dead_letters_evicted: Counter,
    /// 1 while a spool file moved aside (corrupt) has not been salvaged or removed.
    pub spool_quarantined: Gauge,
    /// Reads decoded again from a port journal at start (read before a crash, not committed).
    pub journal_recovered: Counter,
    /// Reads a serial source holds while the pipeline is full (bounded; see `source::serial`).
    pub serial_held: Gauge,
    /// 1 while the upstream rejects every event with the same reason (a misconfiguration:
    /// nothing is dead-lettered).
    pub upstream_rejecting_all: Gauge,
    /// 1 while the upstream answers with a redirect, an HTML page, 401/403 or 404/405: kept,
    /// retried slowly, an operator must act.
    pub upstream_misconfigured: Gauge,
    pub delivered: Counter,
    pub batches_ok: Counter,
    pub batches_failed: Counter,
    pub dead_lettered: Counter,
    pub upstream_bytes_sent: Counter,
    pub upstream_auth_failures: Counter,
    /// Requests sent again at once on a new connection after failing on a reused one.
    pub upstream_fresh_retries: Counter,
    pub upstream_down: Gauge,
    /// Requests the forwarder may have in flight now (adaptive, `1..=max_in_flight`).
    pub upstream_concurrency_limit: Gauge,
    /// Requests in flight now.
    pub upstream_in_flight: Gauge,
    /// Mean round-trip time of recent requests, microseconds (0 before the first answer).
    pub upstream_rtt_us: Gauge,
    /// Batches throttled (429/503) while other requests were in flight: sent again after the
    /// server's wait with less concurrency, not an outage.
    pub upstream_throttled: Counter,
    /// When the upstream began failing, on [`mono_ms`]'s clock plus one (0 while it is not).
    pub upstream_down_since_ms: Gauge,
    /// When the pipeline started, on [`mono_ms`]'s clock plus one.
    pub started_ms: Gauge,
    pub sources_connected: Gauge,
    /// Repeat suppression (`crate::suppress`): reads taken, reads under the RSSI floor,
    /// reads folded into an open pass, passes emitted as events, passes closed early because
    /// the table was full, passes that moved to another zone, open passes now.
    pub suppress_reads: Counter,
    pub suppress_below_floor: Counter,
    pub suppress_suppressed: Counter,
    pub suppress_passes: Counter,
    pub suppress_forced: Counter,
    pub suppress_moves: Counter,
    pub suppress_tracked: Gauge,
    /// Open passes put back from the spool at start, and passes emitted then because they
    /// could not be put back (another boot, or their source left the config).
    pub suppress_restored: Counter,
    pub suppress_recovered_emitted: Counter,
    /// 1 while the wall clock is unsynced (before the build time): delivery is held.
    pub clock_unsynced: Gauge,
    /// 1 while the forwarder holds events because this boot's clock is unsynced.
    pub delivery_held_for_clock: Gauge,
    dropped: Mutex<BTreeMap<&'static str, u64>>,
    responses: Mutex<BTreeMap<u16, u64>>,
    /// Redis sink: error replies and failures by code (`io`, `timeout`, `auth`, `OOM`, …).
    redis_errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Redis sink: events its idempotency keys showed to be in the stream already.
    pub upstream_duplicates: Counter,
    /// Redis sink: connections made.
    pub redis_connects: Counter,
    /// Redis sink: times the script was loaded again after `NOSCRIPT`.
    pub redis_script_loads: Counter,
    /// Redis sink: dead letters recorded in / not recorded in `dlq_stream`.
    pub redis_dlq_recorded: Counter,
    pub redis_dlq_failed: Counter,
    /// Redis sink: settings of the server that put delivered events at risk (eviction, no
    /// persistence), as last found at connect; logged as WARN when they change.
    pub redis_server_risks: Gauge,
    /// Redis sink: how far the slowest consumer group of the stream is behind (lag + pending
    /// entries, as Redis reports them), after the last batch; 0 without trimming.
    pub redis_consumers_behind: Gauge,
    /// MQTT sources: messages received, acknowledged to the broker after their commit,
    /// received again (the broker's redelivery flag), handed over again after the spool
    /// refused them, waiting for their commit now; connections made.
    pub mqtt_messages: Counter,
    pub mqtt_acked: Counter,
    pub mqtt_redelivered: Counter,
    pub mqtt_resent: Counter,
    pub mqtt_unacked: Gauge,
    pub mqtt_connects: Counter,
    /// Sensor readings within the deadband of the last one emitted (no event of their own).
    pub suppress_deadband: Counter,
    /// Reads whose reader timestamp was not used (`reader_clock = "reader"`) because it was
    /// implausible (unsynced reader, or ahead of the gateway).
    pub reader_clock_rejected: Counter,
    sources: Mutex<Vec<(String, std::sync::Arc<SourceHealth>)>>,
    /// Configurations reloaded (SIGHUP) and applied.
    pub config_reloads: Counter,
    /// Reloads refused: the file was not valid (the running configuration stayed).
    pub config_reloads_failed: Counter,
    /// Every stage's progress, for the watchdog.
    pub progress: crate::service::progress::Progress,
}

/// A repeated warning said at most once per interval, with how many were held back since:
/// a broker sending garbage ten times a second gives one log line every ten seconds, not a
/// journal flooded (the counters have every one).
#[derive(Debug)]
pub struct LogThrottle {
    every: std::time::Duration,
    last: Option<tokio::time::Instant>,
    held: u64,
}

impl LogThrottle {
    pub fn new(every: std::time::Duration) -> Self {
        LogThrottle {
            every,
            last: None,
            held: 0,
        }
    }

    /// Some(number held back since the last one said) when this one is to be said.
    pub fn allow(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

/// Milliseconds on a clock that only moves forward (since this process first asked): for
/// durations that a wall-clock step (NTP syncing a box that booted in 1970) must not distort.
pub fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(tokio::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// The health of one source (a serial port, a replay), for `status` and `/metrics`.
/// Times are wall-clock unix milliseconds (0: never).
#[derive(Debug, Default)]
pub struct SourceHealth {
    /// 1 while the port is open.
    pub connected: Gauge,
    /// When the port was last opened or closed (wall clock, for display).
    pub since_ms: Gauge,
    /// The same on [`mono_ms`]'s clock (for durations), plus one (0: never).
    pub since_mono: Gauge,
    /// When the last valid frame arrived.
    pub last_frame_ms: Gauge,
    pub bytes: Counter,
    /// Valid frames (reads and other frames such as replies and keep-alives).
    pub frames: Counter,
    pub reads: Counter,
    /// Times the port was opened again after it closed.
    pub reopens: Counter,
    /// Skipped input by reason (bad checksum, garbage …): runs, not bytes.
    bad: Mutex<BTreeMap<&'static str, u64>>,
    /// Valid frames that are not reads, by kind (keep-alive, reply, no_tag, error …).
    other: Mutex<BTreeMap<&'static str, u64>>,
    /// The last reason the port closed or could not be opened.
    last_error: Mutex<Option<String>>,
    /// Reads by antenna port: slot 0 no port reported, slot p + 1 port p, the last slot every
    /// port from [`ANTENNA_PORTS`] up.
    antenna_reads: [Counter; ANTENNA_PORTS + 2],
    /// The last few reads, sampled (see [`SourceHealth::record_read`]), for the status page.
    recent: Mutex<std::collections::VecDeque<RecentRead>>,
    /// Start of the current sampling window (wall ms), reads kept in it, and a hash of the
    /// last tag kept.
    window_ms: std::sync::atomic::AtomicI64,
    kept_in_window: AtomicU64,
    last_tag_hash: AtomicU64,
}

/// Antenna ports counted one by one on the status page (0 to 15: readers have 1 to 8, a few
/// 16 with hubs); higher ports share one count.
pub const ANTENNA_PORTS: usize = 16;

/// Reads kept for the status page per sampling window ([`SAMPLE_MS`]) and source: several
/// tags read together (a pair on a belt, a multi-tag inventory) each show.
pub const KEPT_PER_WINDOW: u64 = 4;

/// Reads kept per source for the status page.
pub const RECENT_READS: usize = 8;

/// Sampling window of the reads kept for the status page, ms: at most [`KEPT_PER_WINDOW`]
/// reads of different tags per window and source, 80 a second (a technician aiming an antenna
/// watches reads one by one; at thousands a second every one would cost the hot path and
/// show nothing more).
pub const SAMPLE_MS: i64 = 50;

/// A read as the status page shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentRead {
    pub kind: &'static str,
    /// The tag, at most [`SHOWN_TAG_CHARS`] characters.
    pub tag: String,
    pub rssi_dbm: Option<f32>,
    pub antenna: Option<u16>,
    /// When it was read, wall clock, unix ms.
    pub at_ms: i64,
}

/// Longest tag shown on the status page, characters.
pub const SHOWN_TAG_CHARS: usize = 64;

impl SourceHealth {
    /// Count `read` (read at `wall_ms`) by antenna port and keep it for the status page: the
    /// first read of each [`SAMPLE_MS`] window, then up to [`KEPT_PER_WINDOW`] in all when
    /// their tag differs from the last one kept. True when it was kept.
    pub fn record_read(&self, read: &crate::event::Read, wall_ms: i64) -> bool {
        let slot = read
            .antenna
            .map_or(0, |a| (a as usize).min(ANTENNA_PORTS) + 1);
        self.antenna_reads[slot].inc();
        let start = self.window_ms.load(Ordering::Relaxed);
        // A new window after SAMPLE_MS, or when the clock stepped back.
        if wall_ms < start || wall_ms - start >= SAMPLE_MS {
            self.window_ms.store(wall_ms, Ordering::Relaxed);
            self.kept_in_window.store(0, Ordering::Relaxed);
        }
        let kept = self.kept_in_window.load(Ordering::Relaxed);
        if kept >= KEPT_PER_WINDOW {
            return false;
        }
        let hash = xxhash_rust::xxh3::xxh3_64(read.tag.as_bytes());
        if kept > 0 && hash == self.last_tag_hash.load(Ordering::Relaxed) {
            return false;
        }
        self.kept_in_window.store(kept + 1, Ordering::Relaxed);
        self.last_tag_hash.store(hash, Ordering::Relaxed);
        let mut tag: String = read.tag.chars().take(SHOWN_TAG_CHARS).collect();
        if tag.len() < read.tag.len() {
            tag.push('…');
        }
        let r = RecentRead {
            kind: read.kind.as_str(),
            tag,
            rssi_dbm: read.rssi_dbm,
            antenna: read.antenna,
            at_ms: wall_ms,
        };
        if let Ok(mut q) = self.recent.lock() {
            if q.len() == RECENT_READS {
                q.pop_front();
            }
            q.push_back(r);
        }
        true
    }

    /// The reads kept for the status page, oldest first.
    pub fn recent_reads(&self) -> Vec<RecentRead> {
        self.recent
            .lock()
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Reads by antenna port, for every port that has reads: (None, n) for reads without a
    /// port, (Some(p), n) for port p, and (Some([`ANTENNA_PORTS`]), n) for that port and
    /// every higher one together.
    pub fn antenna_reads(&self) -> Vec<(Option<usize>, u64)> {
        self.antenna_reads
            .iter()
            .enumerate()
            .map(|(i, c)| (i.checked_sub(1), c.get()))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub fn bad_frame(&self, reason: &'static str) {
        if let Ok(mut m) = self.bad.lock() {
            *m.entry(reason).or_default() += 1;
        }
    }

    pub fn bad_frames(&self) -> BTreeMap<&'static str, u64> {
        self.bad.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn other_frame(&self, what: &'static str) {
        if let Ok(mut m) = self.other.lock() {
            *m.entry(what).or_default() += 1;
        }
    }

    pub fn other_frames(&self) -> BTreeMap<&'static str, u64> {
        self.other.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn set_connected(&self, up: bool, now_ms: i64) {
        self.connected.set(up as u64);
        self.since_ms.set(now_ms.max(0) as u64);
        self.since_mono.set(mono_ms() + 1);
    }

    pub fn set_error(&self, e: Option<String>) {
        if let Ok(mut m) = self.last_error.lock() {
            *m = e;
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|m| m.clone())
    }

    /// As JSON for `/status` and `scangate status`.
    pub fn json(&self, name: &str) -> serde_json::Value {
        let ms = |g: &Gauge| (g.get() > 0).then(|| g.get());
        serde_json::json!({
            "name": name,
            "connected": self.connected.get() == 1,
            "since_ms": ms(&self.since_ms),
            "last_frame_ms": ms(&self.last_frame_ms),
            "bytes": self.bytes.get(),
            "frames": self.frames.get(),
            "reads": self.reads.get(),
            "reopens": self.reopens.get(),
            "bad_frames": self.bad_frames(),
            "other_frames": self.other_frames(),
            "last_error": self.last_error(),
            "antennas": self.antenna_reads().into_iter().map(|(port, reads)| serde_json::json!({"port": port, "and_above": port == Some(ANTENNA_PORTS), "reads": reads})).collect::<Vec<_>>(),
            "recent_reads": self.recent_reads(),
        })
    }
}

/// A per-source metric: name, type, help, value.
type PerSource = (
    &'static str,
    &'static str,
    &'static str,
    fn(&SourceHealth) -> u64,
);

/// A label value escaped for the text format (`\\`, `\"`, `\n`): `prometheus-client` writes
/// label values as given, and source names are a technician's text.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// The health record of source `name` (made on first use).
    pub fn source(&self, name: &str) -> std::sync::Arc<SourceHealth> {
        let Ok(mut v) = self.sources.lock() else {
            return Default::default();
        };
        if let Some((_, h)) = v.iter().find(|(n, _)| n == name) {
            return h.clone();
        }
        let h = std::sync::Arc::new(SourceHealth::default());
        v.push((name.to_string(), h.clone()));
        h
    }

    /// Every source's health, in the order they started.
    pub fn sources(&self) -> Vec<(String, std::sync::Arc<SourceHealth>)> {
        self.sources.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Count `n` dropped reads/events with `reason`.
    pub fn count_drop(&self, reason: &'static str, n: u64) {
        if let Ok(mut m) = self.dropped.lock() {
            *m.entry(reason).or_default() += n;
        }
    }

    pub fn dropped(&self, reason: &str) -> u64 {
        self.dropped
            .lock()
            .ok()
            .and_then(|m| m.get(reason).copied())
            .unwrap_or(0)
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.lock().map(|m| m.values().sum()).unwrap_or(0)
    }

    /// Count a Redis sink failure by `code`.
    pub fn redis_error(&self, code: &'static str) {
        if let Ok(mut m) = self.redis_errors.lock() {
            *m.entry(code).or_default() += 1;
        }
    }

    pub fn response(&self, status: u16) {
        if let Ok(mut m) = self.responses.lock() {
            *m.entry(status).or_default() += 1;
        }
    }

    /// `/metrics`: every counter and gauge in the OpenMetrics text format, written by the
    /// Prometheus project's `prometheus-client` (content type [`EXPOSITION_CONTENT_TYPE`]).
    /// Counters are named `scangate_<family>_total`; every family has HELP and TYPE lines.
    pub fn render(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Exposition(self.families())));
        let mut out = String::with_capacity(16 * 1024);
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            // Writing to a String cannot fail; an encoder error would be a bug of ours.
            tracing::warn!("Cannot encode the metrics");
        }
        out
    }

    /// Every metric family now, for [`Metrics::render`].
    fn families(&self) -> Vec<Family> {
        let mut out: Vec<Family> = Vec::with_capacity(128);
        let mut line = |name: &str, kind: &str, help: &str, v: u64| {
            out.push(Family::one(name, kind, help, v));
        };
        line(
            "frames_in_total",
            "counter",
            "Frames/records received from sources.",
            self.frames_in.get(),
        );
        line(
            "bytes_in_total",
            "counter",
            "Bytes received from sources.",
            self.bytes_in.get(),
        );
        line(
            "reads_total",
            "counter",
            "Reads decoded.",
            self.reads_in.get(),
        );
        for (name, kind, help, v) in [
            ("suppress_reads_total", "counter", "Reads taken by repeat suppression.", self.suppress_reads.get()),
            ("suppress_below_floor_total", "counter", "Reads dropped because their RSSI (after calibration) was under min_rssi_dbm.", self.suppress_below_floor.get()),
            ("suppress_suppressed_total", "counter", "Reads folded into a pass already open (no event of their own).", self.suppress_suppressed.get()),
            ("suppress_passes_total", "counter", "Passes emitted as events.", self.suppress_passes.get()),
            ("suppress_forced_closes_total", "counter", "Passes emitted early because max_tracked passes were open.", self.suppress_forced.get()),
            ("suppress_moves_total", "counter", "Passes that moved to a stronger zone (the old zone's pass was emitted).", self.suppress_moves.get()),
            ("suppress_tracked_passes", "gauge", "Open passes now.", self.suppress_tracked.get()),
            ("suppress_restored_total", "counter", "Open passes put back from the spool at start.", self.suppress_restored.get()),
            ("suppress_recovered_emitted_total", "counter", "Open passes found in the spool at start that were emitted at once (another boot, or their source or zone left the config).", self.suppress_recovered_emitted.get()),
            ("delivery_held_for_clock", "gauge", "1 while the forwarder holds events stamped on boot time because the wall clock is not synced (they are sent with true times once it is).", self.delivery_held_for_clock.get()),
            ("suppress_deadband_total", "counter", "Sensor readings within the deadband of the last one emitted (no event of their own).", self.suppress_deadband.get()),
            ("mqtt_messages_total", "counter", "MQTT messages received.", self.mqtt_messages.get()),
            ("mqtt_acked_total", "counter", "MQTT messages acknowledged to the broker after what they produced was committed.", self.mqtt_acked.get()),
            ("mqtt_redelivered_total", "counter", "MQTT messages the broker sent again (DUP flag): their reads may repeat.", self.mqtt_redelivered.get()),
            ("mqtt_resent_total", "counter", "MQTT messages handed over again because the spool refused them (kept unacknowledged meanwhile).", self.mqtt_resent.get()),
            ("mqtt_unacked", "gauge", "MQTT messages received and not yet acknowledged (waiting for their commit).", self.mqtt_unacked.get()),
            ("mqtt_connects_total", "counter", "MQTT connections made.", self.mqtt_connects.get()),
            ("reader_clock_rejected_total", "counter", "Reads whose reader timestamp was implausible and not used (reader_clock = \"reader\").", self.reader_clock_rejected.get()),
            ("config_reloads_total", "counter", "Configurations reloaded (SIGHUP) and applied.", self.config_reloads.get()),
            ("config_reloads_failed_total", "counter", "Reloads refused because the file was not valid (the running configuration stayed).", self.config_reloads_failed.get()),
            ("clock_unsynced", "gauge", "1 while the wall clock is before the build time (not synced): delivery is held, reads are stamped on boot time.", self.clock_unsynced.get()),
        ] {
            line(name, kind, help, v);
        }
        line(
            "spool_committed_total",
            "counter",
            "Events committed to the spool (accepted).",
            self.spool_committed.get(),
        );
        line(
            "spool_commits_total",
            "counter",
            "Spool transactions (group commits).",
            self.spool_commits.get(),
        );
        line(
            "ingest_groups_total",
            "counter",
            "Groups of reads handed to the spool by the ingest stage (a frame's reads are never split across groups).",
            self.ingest_groups.get(),
        );
        line(
            "forward_handoff_events_total",
            "counter",
            "Events forwarded straight from their commit, without reading the spool back.",
            self.forward_handoff.get(),
        );
        line(
            "spool_backlog_events",
            "gauge",
            "Events waiting for the upstream.",
            self.spool_backlog.get(),
        );
        line(
            "spool_used_bytes",
            "gauge",
            "Bytes used in the spool database.",
            self.spool_used_bytes.get(),
        );
        line(
            "spool_wal_bytes",
            "gauge",
            "Size of the spool's write-ahead log file (grows without bound while another process blocks checkpoints).",
            self.spool_wal_bytes.get(),
        );
        line(
            "spool_wal_blocked",
            "gauge",
            "1 while the spool's write-ahead log grows because checkpoints are blocked (another process holds a read transaction).",
            self.spool_wal_blocked.get(),
        );
        line(
            "spool_corrupt_incidents_total",
            "counter",
            "Corrupt spool files moved aside at startup.",
            self.spool_corrupt_incidents.get(),
        );
        line(
            "spool_corrupt_chunks_total",
            "counter",
            "Undecodable chunks moved to dead letters.",
            self.spool_corrupt_chunks.get(),
        );
        line(
            "spool_disk_full",
            "gauge",
            "1 while the spool's disk is full.",
            self.spool_disk_full.get(),
        );
        line(
            "spool_blocked",
            "gauge",
            "1 while another process holds a write lock on the spool (commits wait and retry).",
            self.spool_blocked.get(),
        );
        line(
            "spool_quarantined",
            "gauge",
            "1 while a corrupt spool file moved aside awaits `scangate spool salvage`.",
            self.spool_quarantined.get(),
        );
        line(
            "dead_letters_evicted_total",
            "counter",
            "Oldest dead letters deleted at their bound (dead_letter_max_bytes).",
            self.dead_letters_evicted.get(),
        );
        line(
            "journal_recovered_reads_total",
            "counter",
            "Reads recovered at start from a serial port journal (read before a crash, not yet committed).",
            self.journal_recovered.get(),
        );
        line(
            "serial_held_reads",
            "gauge",
            "Reads serial sources hold while the pipeline is full.",
            self.serial_held.get(),
        );
        line(
            "upstream_rejecting_all",
            "gauge",
            "1 while the upstream rejects every event with the same reason (kept, not dead-lettered).",
            self.upstream_rejecting_all.get(),
        );
        line(
            "upstream_misconfigured",
            "gauge",
            "1 while the upstream answers with a redirect, an HTML page, 401/403 or 404/405 (kept, retried slowly).",
            self.upstream_misconfigured.get(),
        );
        line(
            "delivered_total",
            "counter",
            "Events acknowledged by the upstream.",
            self.delivered.get(),
        );
        line(
            "batches_ok_total",
            "counter",
            "Batches the upstream accepted.",
            self.batches_ok.get(),
        );
        line(
            "batches_failed_total",
            "counter",
            "Batch attempts that failed and will be retried.",
            self.batches_failed.get(),
        );
        line(
            "dead_letters_total",
            "counter",
            "Events moved to dead letters.",
            self.dead_lettered.get(),
        );
        line(
            "upstream_bytes_sent_total",
            "counter",
            "Compressed request bytes sent.",
            self.upstream_bytes_sent.get(),
        );
        line(
            "upstream_auth_failures_total",
            "counter",
            "401/403 answers (nothing is deleted).",
            self.upstream_auth_failures.get(),
        );
        line(
            "upstream_fresh_connection_retries_total",
            "counter",
            "Requests sent again at once on a new connection after a reused keep-alive connection failed before any answer.",
            self.upstream_fresh_retries.get(),
        );
        line(
            "sources_connected",
            "gauge",
            "Serial ports currently open.",
            self.sources_connected.get(),
        );
        line(
            "upstream_down",
            "gauge",
            "1 while the upstream is failing.",
            self.upstream_down.get(),
        );
        line(
            "upstream_concurrency_limit",
            "gauge",
            "Requests the forwarder may have in flight now (adaptive, from 1 up to upstream.max_in_flight).",
            self.upstream_concurrency_limit.get(),
        );
        line(
            "upstream_in_flight",
            "gauge",
            "Requests in flight now.",
            self.upstream_in_flight.get(),
        );
        line(
            "upstream_rtt_microseconds",
            "gauge",
            "Mean round-trip time of recent upstream requests (0 before the first answer).",
            self.upstream_rtt_us.get(),
        );
        line(
            "upstream_throttled_total",
            "counter",
            "Batches throttled (429/503) while other requests were in flight, sent again with less concurrency.",
            self.upstream_throttled.get(),
        );
        line(
            "disk_write_bytes_total",
            "counter",
            "Bytes this process caused to be written to storage (/proc/self/io).",
            proc_write_bytes().unwrap_or(0),
        );
        line(
            "upstream_duplicates_total",
            "counter",
            "Events the upstream already had (Redis sink: idempotency key present), not added again.",
            self.upstream_duplicates.get(),
        );
        line(
            "redis_connects_total",
            "counter",
            "Connections made to Redis (Redis sink).",
            self.redis_connects.get(),
        );
        line(
            "redis_script_loads_total",
            "counter",
            "Times the delivery script was loaded again after NOSCRIPT (Redis sink).",
            self.redis_script_loads.get(),
        );
        line(
            "redis_dlq_recorded_total",
            "counter",
            "Dead letters recorded in the dead-letter stream (Redis sink).",
            self.redis_dlq_recorded.get(),
        );
        line(
            "admin_live_clients",
            "gauge",
            "Status pages connected to the live view (/events) now.",
            self.admin_live_clients.get(),
        );
        line(
            "redis_consumers_behind",
            "gauge",
            "Entries the slowest consumer group of the stream has not read or acknowledged (lag + pending, as Redis reports them), after the last batch.",
            self.redis_consumers_behind.get(),
        );
        line(
            "redis_server_risks",
            "gauge",
            "Settings of the Redis server that put delivered events at risk (eviction policy, no persistence), found at connect; see the log.",
            self.redis_server_risks.get(),
        );
        line(
            "redis_dlq_failed_total",
            "counter",
            "Dead letters that could not be recorded in the dead-letter stream (kept in the spool).",
            self.redis_dlq_failed.get(),
        );
        let mut dropped = Family::new(
            "dropped_total",
            "counter",
            "Reads or events dropped, by reason.",
        );
        if let Ok(m) = self.dropped.lock() {
            for (reason, v) in m.iter() {
                dropped.sample(vec![("reason", label(reason))], *v);
            }
        }
        out.push(dropped);
        let sources = self.sources();
        let per_source: [PerSource; 6] = [
            (
                "source_connected",
                "gauge",
                "1 while the source's port is open.",
                |h| h.connected.get(),
            ),
            (
                "source_bytes_total",
                "counter",
                "Bytes read from the source.",
                |h| h.bytes.get(),
            ),
            (
                "source_frames_total",
                "counter",
                "Valid frames decoded (reads, replies, keep-alives).",
                |h| h.frames.get(),
            ),
            (
                "source_reads_total",
                "counter",
                "Reads decoded from the source.",
                |h| h.reads.get(),
            ),
            (
                "source_reopens_total",
                "counter",
                "Times the source's port was opened again after it closed.",
                |h| h.reopens.get(),
            ),
            (
                "source_last_frame_seconds",
                "gauge",
                "Unix time of the last valid frame (0: none yet).",
                |h| h.last_frame_ms.get() / 1000,
            ),
        ];
        for (name, kind, help, get) in per_source {
            let mut f = Family::new(name, kind, help);
            for (n, h) in &sources {
                f.sample(vec![("source", label(n))], get(h));
            }
            out.push(f);
        }
        // Per source and reason (or kind): counters kept as maps.
        type ByKey = fn(&SourceHealth) -> BTreeMap<&'static str, u64>;
        let by_key: [(&str, &str, &str, ByKey); 2] = [
            (
                "source_bad_frames_total",
                "reason",
                "Input skipped by a source's decoder, by reason (runs of bytes).",
                SourceHealth::bad_frames,
            ),
            (
                "source_other_frames_total",
                "what",
                "Valid frames that carry no read (keep-alives, replies, error answers), by kind.",
                SourceHealth::other_frames,
            ),
        ];
        for (name, key, help, get) in by_key {
            let mut f = Family::new(name, "counter", help);
            for (n, h) in &sources {
                for (k, v) in get(h) {
                    f.sample(vec![("source", label(n)), (key, label(k))], v);
                }
            }
            out.push(f);
        }
        let mut redis = Family::new(
            "redis_errors_total",
            "counter",
            "Redis sink failures by code (io, timeout, auth, or the server's error code).",
        );
        if let Ok(m) = self.redis_errors.lock() {
            for (code, v) in m.iter() {
                redis.sample(vec![("code", label(code))], *v);
            }
        }
        out.push(redis);
        let mut responses = Family::new(
            "upstream_responses_total",
            "counter",
            "Upstream answers by HTTP status.",
        );
        if let Ok(m) = self.responses.lock() {
            for (status, v) in m.iter() {
                responses.sample(vec![("status", status.to_string())], *v);
            }
        }
        out.push(responses);
        out
    }
}

/// The content type of [`Metrics::render`]'s text (OpenMetrics 1.0, which Prometheus reads).
pub const EXPOSITION_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One metric family of `/metrics`: its name after `scangate_` (counters end in `_total`),
/// kind (`counter` or `gauge`), HELP text, and samples (labels, value).
#[derive(Debug)]
struct Family {
    name: String,
    counter: bool,
    help: String,
    samples: Vec<(Vec<(&'static str, String)>, u64)>,
}

impl Family {
    fn new(name: &str, kind: &str, help: &str) -> Family {
        Family {
            name: name.to_string(),
            counter: kind == "counter",
            help: help.to_string(),
            samples: Vec::new(),
        }
    }

    fn one(name: &str, kind: &str, help: &str, v: u64) -> Family {
        let mut f = Family::new(name, kind, help);
        f.sample(Vec::new(), v);
        f
    }

    fn sample(&mut self, labels: Vec<(&'static str, String)>, v: u64) {
        self.samples.push((labels, v));
    }
}

/// A scrape's [`Metrics`] as a `prometheus-client` collector.
#[derive(Debug)]
struct Exposition(Vec<Family>);

impl prometheus_client::collector::Collector for Exposition {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        use prometheus_client::metrics::MetricType;
        for f in &self.0 {
            // The encoder adds `_total` to a counter's samples (OpenMetrics).
            let family = format!("scangate_{}", f.name);
            let (name, kind) = match family.strip_suffix("_total") {
                Some(base) if f.counter => (base, MetricType::Counter),
                _ => (family.as_str(), MetricType::Gauge),
            };
            let mut d = encoder.encode_descriptor(name, &f.help, None, kind)?;
            match f.samples.as_slice() {
                // One unlabelled sample: encoded in place.
                [(labels, v)] if labels.is_empty() => {
                    if f.counter {
                        ConstCounter::new(*v).encode(d)?
                    } else {
                        ConstGauge::new(*v).encode(d)?
                    }
                }
                samples => {
                    for (labels, v) in samples {
                        let m = d.encode_family(labels)?;
                        if f.counter {
                            ConstCounter::new(*v).encode(m)?
                        } else {
                            ConstGauge::new(*v).encode(m)?
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// `write_bytes` of `/proc/<pid>/io`: bytes this process caused to be sent to storage.
pub fn proc_write_bytes() -> Option<u64> {
    proc_io_field("self", "write_bytes")
}

pub fn proc_io_field(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|r| r.trim_start_matches(':').trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Read, ReadKind};

    fn read(tag: &str, antenna: Option<u16>) -> Read {
        Read {
            kind: ReadKind::Epc,
            tag: tag.into(),
            antenna,
            rssi_dbm: Some(-61.5),
            rssi_raw: None,
            symbology: None,
            value: None,
            sensor: None,
        }
    }

    #[test]
    fn reads_kept_for_the_status_page_are_sampled_bounded_and_counted_by_antenna() {
        let h = SourceHealth::default();
        // 1,000 reads of one tag 1 ms apart: one kept per SAMPLE_MS window, the last
        // RECENT_READS of them.
        let mut kept = 0;
        for i in 0..1000i64 {
            kept += h.record_read(&read("SAME", Some((i % 3) as u16 + 1)), 10_000 + i) as i64;
        }
        assert_eq!(kept, 1000 / SAMPLE_MS);
        assert_eq!(h.recent_reads().len(), RECENT_READS);
        assert_eq!(h.recent_reads().last().unwrap().at_ms, 10_950);
        assert_eq!(
            h.antenna_reads(),
            vec![(Some(1), 334), (Some(2), 333), (Some(3), 333)]
        );
        // Two tags read together every 25 ms: both show (up to KEPT_PER_WINDOW a window).
        let h = SourceHealth::default();
        let mut n = 0;
        for i in 0..40i64 {
            n += h.record_read(&read("AAAA", Some(1)), 20_000 + 25 * i) as u64;
            n += h.record_read(&read("BBBB", Some(1)), 20_000 + 25 * i) as u64;
        }
        assert_eq!(n, 80, "pairs 25 ms apart: 4 a window, all kept");
        let tags: Vec<String> = h.recent_reads().into_iter().map(|r| r.tag).collect();
        assert!(tags.contains(&"AAAA".into()) && tags.contains(&"BBBB".into()));
        // Port 0 is a port; no port, and ports from ANTENNA_PORTS up, have their own counts.
        let h = SourceHealth::default();
        for (a, t) in [(Some(0), 1), (None, 2), (Some(16), 3), (Some(400), 4)] {
            h.record_read(&read("x", a), 30_000 + 100 * t);
        }
        assert_eq!(
            h.antenna_reads(),
            vec![(None, 1), (Some(0), 1), (Some(ANTENNA_PORTS), 2)]
        );
        // A long tag is cut, with a mark; a clock that stepped back starts a new window.
        assert!(h.record_read(&read(&"Z".repeat(500), Some(1)), 5_000));
        let t = h.recent_reads().last().unwrap().tag.clone();
        assert_eq!(t.chars().count(), SHOWN_TAG_CHARS + 1);
        assert!(t.ends_with('…'));
    }
}
