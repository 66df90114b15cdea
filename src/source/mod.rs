//! Sources: where raw bytes come from. Each source runs as one task, decodes with its
//! protocol and pushes [`SourceRead`]s into the pipeline's bounded read channel.
//!
//! Backpressure per kind:
//! - serial: never waits (a UART cannot be paused): while the read channel is full its reads
//!   are held in the reader thread (up to [`serial::HOLD_MAX`] bytes of reads) and the port keeps being
//!   read; only beyond that bound is a read dropped and counted (`reason="pipeline_full"`).
//!   Every byte read is journaled first ([`journal`]), so a crash loses none of it;
//! - replay: waits (a file can be paused), so a replay never loses a read.
//!
//! The ingest stage drains the read channel once per commit interval rather than waking for
//! every read; a source that sees the channel filling past the group size wakes it early
//! ([`Feed::wake_if_high`]), so a burst cannot overflow the channel between two commits.

pub mod capture;
pub mod journal;
pub mod mqtt;
pub mod replay;
pub mod serial;

use crate::config::{SourceConfig, SourceKind};
use crate::event::Read;
use crate::metrics::Metrics;
use crate::protocol::Decoded;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// Bytes of reads the read channel may hold at once (besides its count bound,
/// `app::READ_CHANNEL`): a source finding it full holds (serial) or waits (replay). Keeps the
/// channel's memory small even when every read is a 4 KiB line.
pub const CHANNEL_MAX_BYTES: usize = 1 << 20;

/// The read channel's byte budget, shared by the sources (which add) and the ingest stage
/// (which subtracts and wakes waiting sources).
#[derive(Debug, Default)]
pub struct Budget {
    bytes: std::sync::atomic::AtomicUsize,
    drained: Notify,
}

impl Budget {
    fn full(&self) -> bool {
        self.bytes.load(std::sync::atomic::Ordering::Acquire) >= CHANNEL_MAX_BYTES
    }

    /// The ingest stage took these reads out of the channel.
    pub fn taken(&self, bytes: usize) {
        let before = self
            .bytes
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |b| Some(b.saturating_sub(bytes)),
            )
            .unwrap_or(0);
        // Only a crossing below the bound can release a waiting source.
        if before >= CHANNEL_MAX_BYTES && before.saturating_sub(bytes) < CHANNEL_MAX_BYTES {
            self.drained.notify_waiters();
        }
    }

    fn put(&self, bytes: usize) {
        self.bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One decoded read with the index of its source (into `Config::sources`).
#[derive(Debug, Clone)]
pub struct SourceRead {
    pub source: usize,
    pub read: Read,
    /// Wall clock when the bytes were read, unix ms (possibly unsynced).
    pub wall_ms: i64,
    /// The same instant on `CLOCK_BOOTTIME`, ms (see `crate::clock`): the suppressor's time.
    pub mono_ms: i64,
    /// Recovered from a journal across a step of the wall clock: when it was read is not
    /// known (`mono_ms` is when it was recovered); its event is marked `unsynced`.
    pub time_unknown: bool,
    /// Journal position just after the read's frame (0: the source keeps no journal). The
    /// spool commits it with the read (see [`journal`]).
    pub journal_end: u64,
    /// More reads of the same frame follow (a frame with several reads). Such a read carries
    /// the frame's *start* as `journal_end`, and the ingest stage does not end a commit group
    /// before the frame's last read, so a crash neither loses nor repeats part of a frame.
    pub frame_more: bool,
    /// Handed over again after the spool refused it (an MQTT message kept unacknowledged):
    /// the deadband does not judge it a repeat of the reading it was (never committed).
    pub resent: bool,
}

impl SourceRead {
    /// What the read costs in memory, roughly: its strings and the struct.
    pub fn size(&self) -> usize {
        96 + self.read.tag.len() + self.read.symbology.as_ref().map_or(0, String::len)
    }
}

/// The sending side a source uses, with its policy when the pipeline is full.
#[derive(Clone)]
pub struct Feed {
    pub source: usize,
    pub name: Arc<str>,
    pub tx: mpsc::Sender<SourceRead>,
    pub metrics: Arc<Metrics>,
    /// Wakes the ingest stage before its commit timer (see [`Feed::wake_if_high`]).
    pub wake: Arc<Notify>,
    /// Reads queued in the channel at which the ingest stage is woken early.
    pub high_water: usize,
    /// Longest pause between reads of a device (the pause follows the device's rate; see
    /// `source::serial`), so one read carries several frames.
    pub read_coalesce: Duration,
    /// Where port journals live and how far each is committed (serial sources).
    pub journal: Option<(std::path::PathBuf, Arc<journal::JournalMarks>)>,
    /// The read channel's byte budget.
    pub budget: Arc<Budget>,
    /// This source's health record (frames, bad frames by reason, connection).
    pub health: Arc<crate::metrics::SourceHealth>,
    /// Serial sources still recovering their port journal (see [`Pipe::recovering`]).
    pub recovering: Arc<AtomicUsize>,
    /// This feed has already reported its recovery done.
    pub recovered: Arc<std::sync::atomic::AtomicBool>,
    /// The source is in `first` mode (chosen for latency): every hand-over wakes the ingest
    /// stage, which commits a first read's event at once.
    pub eager: bool,
    /// See [`Pipe::capture_time`].
    pub capture_time: bool,
    /// See [`Pipe::replay_sync`].
    pub replay_sync: Option<Arc<replay::ReplaySync>>,
}

impl Feed {
    /// This serial source has handed over every read recovered from its journal (called
    /// once; later calls do nothing).
    pub fn recovery_done(&self) {
        if !self.recovered.swap(true, Ordering::AcqRel) {
            let _ = self
                .recovering
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }

    pub(crate) fn read_of(&self, d: Decoded, wall_ms: i64, journal_end: u64) -> Option<SourceRead> {
        match d {
            Decoded::Skipped { reason, bytes } => {
                self.metrics.count_drop(reason, 1);
                self.health.bad_frame(reason);
                tracing::debug!(source = %self.name, reason, bytes, "Skipped bytes that are not a valid frame");
                None
            }
            Decoded::Frame { what } => {
                self.health.frames.inc();
                self.health.other_frame(what);
                self.health.last_frame_ms.set(wall_ms.max(0) as u64);
                tracing::trace!(source = %self.name, what, "Frame without a read");
                None
            }
            Decoded::Read(read) => {
                self.metrics.reads_in.inc();
                self.health.frames.inc();
                self.health.reads.inc();
                self.health.last_frame_ms.set(wall_ms.max(0) as u64);
                if self.health.record_read(&read, wall_ms) {
                    self.metrics.reads_shown.notify_waiters();
                }
                // Reads recovered from a journal carry the wall time of their read: their boot
                // time is as far back as that (exact while the wall clock did not step). A
                // read stamped by an unsynced clock and recovered after it synced (or the
                // other way round) has no known age: it is placed now and marked.
                let now = crate::event::wall_now_ms();
                let boot = crate::clock::boottime_ms();
                let same_clock = crate::clock::plausible(wall_ms) == crate::clock::plausible(now);
                let (mono_ms, time_unknown) = if same_clock {
                    (boot - (now - wall_ms).clamp(0, boot.max(0)), false)
                } else {
                    (boot, true)
                };
                Some(SourceRead {
                    source: self.source,
                    read,
                    wall_ms,
                    mono_ms,
                    time_unknown,
                    journal_end,
                    frame_more: false,
                    resent: false,
                })
            }
        }
    }

    /// Put a read into the channel if it has room (by count and by bytes), without waiting.
    // The read comes back in the error so the caller can hold it: boxing it would cost an
    // allocation per read on the hot path to shrink a value that is moved, not copied.
    #[allow(clippy::result_large_err)]
    pub fn try_put(&self, r: SourceRead) -> Result<(), mpsc::error::TrySendError<SourceRead>> {
        if self.budget.full() {
            self.wake.notify_one();
            return Err(mpsc::error::TrySendError::Full(r));
        }
        // Counted before the send: the ingest stage may take the read out (and subtract it)
        // before this thread runs again.
        let size = r.size();
        self.budget.put(size);
        self.tx.try_send(r).inspect_err(|_| self.budget.taken(size))
    }

    /// Hand decoder output to the pipeline, waiting while the read channel is full (a source
    /// that can be paused). Returns false once the pipeline is gone.
    pub async fn push(&self, d: Decoded) -> bool {
        self.push_at(d, None).await
    }

    /// [`Feed::push`] of a read that happened at `at` (wall ms, boot-time ms) rather than now
    /// (a replay's capture time).
    pub async fn push_at(&self, d: Decoded, at: Option<(i64, i64)>) -> bool {
        let wall_ms = at.map_or_else(crate::event::wall_now_ms, |(w, _)| w);
        let Some(mut r) = self.read_of(d, wall_ms, 0) else {
            return true;
        };
        if let Some((_, mono)) = at {
            r.mono_ms = mono;
        }
        self.send(r).await
    }

    /// Hand a read to the pipeline, waiting while the read channel is full (by count or by
    /// bytes). Returns false once the pipeline is gone.
    pub async fn send(&self, mut r: SourceRead) -> bool {
        loop {
            // Registered before the check, so a drain in between is not missed.
            let drained = self.budget.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            match self.try_put(r) {
                Ok(()) => {
                    self.wake_if_high();
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
                Err(mpsc::error::TrySendError::Full(back)) if self.budget.full() => {
                    r = back;
                    self.wake.notify_one();
                    drained.await;
                }
                Err(mpsc::error::TrySendError::Full(back)) => {
                    self.wake.notify_one();
                    let size = back.size();
                    self.budget.put(size);
                    let ok = self.tx.send(back).await.is_ok();
                    if !ok {
                        self.budget.taken(size);
                    }
                    return ok;
                }
            }
        }
    }

    /// From a source thread (not the runtime): hand over a read, waiting while the channel is
    /// full. For reads that can wait (recovered from a journal before the port is open, or
    /// held reads at shutdown); bounded by what the journal or the hold holds, so the byte
    /// budget is not waited for. Returns false once the pipeline is gone.
    pub fn send_blocking(&self, r: SourceRead) -> bool {
        let size = r.size();
        self.budget.put(size);
        let ok = match self.tx.try_send(r) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(r)) => {
                self.wake.notify_one();
                self.tx.blocking_send(r).is_ok()
            }
        };
        if !ok {
            self.budget.taken(size);
        }
        ok
    }

    /// After handing over a burst: wake the ingest stage if a group's worth of reads waits.
    pub fn wake_if_high(&self) {
        if self.eager || self.tx.max_capacity() - self.tx.capacity() >= self.high_water {
            self.wake.notify_one();
        }
    }
}

/// Asks a source thread to stop; dropping it asks too.
pub struct Stop(std::sync::mpsc::Sender<()>);

/// The source thread's side of [`Stop`]: an interruptible pause.
pub struct Stopped(std::sync::mpsc::Receiver<()>);

impl Stop {
    pub fn new() -> (Stop, Stopped) {
        let (tx, rx) = std::sync::mpsc::channel();
        (Stop(tx), Stopped(rx))
    }

    pub fn stop(self) {
        let _ = self.0.send(());
    }
}

impl Stopped {
    /// Pause for `d`; true if a stop was asked for (now or during the pause).
    pub fn wait(&self, d: Duration) -> bool {
        !matches!(
            self.0.recv_timeout(d),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        )
    }

    pub fn is_stopped(&self) -> bool {
        !matches!(self.0.try_recv(), Err(std::sync::mpsc::TryRecvError::Empty))
    }
}

/// MQTT sources' receivers of settled positions, by source index, with the last position the
/// source used (0 at start): a source started again by a reload takes its receiver back and
/// numbers its messages after every position its previous run handed over.
pub type SettledReceivers = Vec<(usize, mpsc::UnboundedReceiver<journal::Settled>, u64)>;

/// The pipeline's input, shared by every source.
#[derive(Clone)]
pub struct Pipe {
    pub tx: mpsc::Sender<SourceRead>,
    pub wake: Arc<Notify>,
    pub high_water: usize,
    pub read_coalesce: Duration,
    /// Port journal directory and committed positions (see [`journal`]).
    pub journal: Option<(std::path::PathBuf, Arc<journal::JournalMarks>)>,
    /// The read channel's byte budget.
    pub budget: Arc<Budget>,
    /// Serial sources that have not yet handed over the reads recovered from their port
    /// journals: until none has, the suppression stage does not end passes by time (those
    /// reads are older than now and belong to passes still open).
    pub recovering: Arc<AtomicUsize>,
    /// `[suppress] mode` is `first` (a source's own `suppress` overrides it): see
    /// [`Feed::eager`].
    pub first_mode: bool,
    /// Every source is a replay: replays place reads at the capture's own times (see
    /// `replay::Timeline`). With a live source beside them they use the time of reading, so
    /// that one timeline ends every pass.
    pub capture_time: bool,
    /// With several replays in capture time: plays them in step (see
    /// [`replay::ReplaySync`]).
    pub replay_sync: Option<Arc<replay::ReplaySync>>,
    /// MQTT sources' receivers of settled positions, by source index (each taken once).
    pub settled: Arc<std::sync::Mutex<SettledReceivers>>,
    /// Set by an MQTT source to end the ingest stage's group at once (see `mqtt`).
    pub commit_now: Arc<std::sync::atomic::AtomicBool>,
    pub gateway_id: Arc<str>,
}

/// Run one source until `shutdown` (or, for a replay, until the capture is played).
pub async fn run(
    index: usize,
    cfg: SourceConfig,
    pipe: Pipe,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let eager = cfg
        .suppress
        .mode
        .map_or(pipe.first_mode, |m| m == crate::config::SuppressMode::First);
    let settled_slot = pipe.settled.clone();
    let settled = pipe.settled.lock().ok().and_then(|mut v| {
        let i = v.iter().position(|(s, _, _)| *s == index)?;
        let (_, rx, used) = v.swap_remove(i);
        Some((rx, used))
    });
    let start_pos = pipe
        .journal
        .as_ref()
        .map_or(0, |(_, marks)| marks.get(&cfg.name))
        .max(settled.as_ref().map_or(0, |(_, used)| *used));
    let commit_now = pipe.commit_now.clone();
    let gateway_id = pipe.gateway_id.clone();
    let feed = Feed {
        source: index,
        name: Arc::from(cfg.name.as_str()),
        tx: pipe.tx,
        health: metrics.source(&cfg.name),
        metrics,
        wake: pipe.wake,
        high_water: pipe.high_water,
        // A source in `first` mode is there for latency: its reads are not held back to fill
        // larger hand-overs.
        read_coalesce: if eager {
            pipe.read_coalesce.min(Duration::from_millis(1))
        } else {
            pipe.read_coalesce
        },
        journal: pipe.journal,
        budget: pipe.budget,
        recovering: pipe.recovering,
        recovered: Arc::default(),
        eager,
        capture_time: pipe.capture_time,
        replay_sync: pipe.replay_sync,
    };
    // Whatever way the source ends, it no longer holds the stage (or other replays) back.
    struct Done(Feed);
    impl Drop for Done {
        fn drop(&mut self) {
            self.0.recovery_done();
            if let Some(s) = &self.0.replay_sync {
                s.done(self.0.source);
            }
        }
    }
    let done = Done(feed.clone());
    if !matches!(cfg.kind, SourceKind::Serial { .. }) {
        done.0.recovery_done();
    }
    match &cfg.kind {
        SourceKind::Serial { path, port, init } => {
            serial::run(&cfg, path, *port, init, feed, shutdown).await
        }
        SourceKind::Replay {
            file,
            speed,
            repeat,
        } => {
            if let Err(e) = replay::run_file(&cfg, file, speed, *repeat, feed, shutdown).await {
                tracing::error!(source = %cfg.name, error = %e, "Replay source stopped");
            }
        }
        SourceKind::Mqtt(m) => {
            let Some((settled, _)) = settled else {
                tracing::error!(source = %cfg.name, "MQTT source has no commit reports (internal wiring); not started");
                return;
            };
            let wiring = mqtt::Wiring {
                settled,
                start_pos,
                commit_now,
                gateway_id,
            };
            let (settled, used) = mqtt::run(&cfg, m, feed, wiring, shutdown).await;
            // For a start again (reload).
            if let Ok(mut v) = settled_slot.lock() {
                v.push((index, settled, used));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ReadKind;

    fn feed(tx: mpsc::Sender<SourceRead>, budget: Arc<Budget>) -> Feed {
        Feed {
            source: 0,
            name: "s".into(),
            tx,
            metrics: Arc::default(),
            wake: Arc::default(),
            high_water: 100,
            read_coalesce: Duration::from_millis(1),
            journal: None,
            budget,
            health: Arc::default(),
            recovering: Arc::default(),
            recovered: Arc::default(),
            eager: false,
            capture_time: false,
            replay_sync: None,
        }
    }

    fn read(len: usize) -> SourceRead {
        SourceRead {
            source: 0,
            read: Read {
                kind: ReadKind::Barcode,
                tag: "x".repeat(len),
                antenna: None,
                rssi_dbm: None,
                rssi_raw: None,
                symbology: None,
                value: None,
                sensor: None,
            },
            wall_ms: 0,
            mono_ms: 0,
            time_unknown: false,
            journal_end: 1,
            frame_more: false,
            resent: false,
        }
    }

    /// The read channel holds at most about `CHANNEL_MAX_BYTES` of reads, whatever their
    /// size (8,192 reads of 4 KiB lines would be 32 MB); taking reads out makes room again.
    #[tokio::test]
    async fn the_read_channel_is_bounded_by_bytes() {
        let (tx, mut rx) = mpsc::channel(100_000);
        let budget = Arc::new(Budget::default());
        let f = feed(tx, budget.clone());
        let mut n = 0;
        while f.try_put(read(4096)).is_ok() {
            n += 1;
        }
        assert!(
            n * 4096 <= CHANNEL_MAX_BYTES + 4096 && n * 4096 >= CHANNEL_MAX_BYTES / 2,
            "{n}"
        );
        let mut small = 0;
        while f.try_put(read(10)).is_ok() {
            small += 1;
        }
        assert_eq!(small, 0, "full is full, also for small reads");
        // A waiting source (replay) goes on once the ingest stage takes reads out.
        let waiter = {
            let f = f.clone();
            tokio::spawn(async move { f.push(crate::protocol::Decoded::Read(read(10).read)).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        for _ in 0..n / 2 {
            let r = rx.recv().await.unwrap();
            budget.taken(r.size());
        }
        assert!(waiter.await.unwrap());
    }
}
