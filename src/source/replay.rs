//! `kind = "replay"`: play a capture file as if it came from a port or a topic, at recorded
//! speed, scaled, or as fast as possible. Streams the file line by line (captures can be large).

use super::capture::{self, CaptureKind};
use super::Feed;
use crate::config::{ReplaySpeed, SourceConfig};
use crate::protocol::{decode_all, Protocol};
use bytes::BytesMut;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use tokio::time::{sleep_until, Instant};
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot open capture {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Format {
        path: std::path::PathBuf,
        source: capture::CaptureError,
    },
    #[error("reading capture {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

pub async fn run_file(
    cfg: &SourceConfig,
    file: &Path,
    speed: &ReplaySpeed,
    repeat: u32,
    feed: Feed,
    shutdown: CancellationToken,
) -> Result<(), ReplayError> {
    let mut timeline = Timeline::default();
    for pass in 0..repeat {
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|source| ReplayError::Open {
                path: file.to_path_buf(),
                source,
            })?;
        let done = play(
            cfg,
            BufReader::new(f),
            file,
            speed,
            &feed,
            &shutdown,
            &mut timeline,
        )
        .await?;
        if !done {
            return Ok(());
        }
        tracing::debug!(source = %cfg.name, pass, "Replay pass finished");
    }
    tracing::info!(source = %cfg.name, file = %file.display(), "Replay finished");
    Ok(())
}

/// When a replay's reads happened: at the capture's own offsets from the replay's start,
/// whatever the speed, so repeat suppression sees a capture replayed faster than recorded
/// exactly as it was read (`scangate replay` of a field capture gives the field's passes).
/// Only when every source is a replay (`Feed::capture_time`); two replays in one group need
/// a speed factor (e.g. 20), not `max`: at `max` one file runs ahead of the other.
/// A repetition starts [`REPEAT_GAP_MS`] after the previous one's last read.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timeline {
    /// Boot time (ms) of offset 0, and the wall time then.
    mono: i64,
    wall: i64,
    /// Boot time of the last read placed.
    last: i64,
}

/// Replays of one run played in step: each waits before a record until every other replay
/// has reached the record's time, so the reads of several captures (two readers of one
/// portal) reach the suppression stage in time order at any speed, `max` included. They also
/// share the start of their timeline.
#[derive(Debug)]
pub struct ReplaySync {
    /// Per source index: the boot time of the record it is about to play (`i64::MAX`: done,
    /// or not a replay).
    progress: Vec<std::sync::atomic::AtomicI64>,
    moved: tokio::sync::Notify,
    base: std::sync::OnceLock<(i64, i64)>,
}

impl ReplaySync {
    /// For `sources` sources, of which those with `replay[i]` take part.
    pub fn new(replay: &[bool]) -> Self {
        ReplaySync {
            progress: replay
                .iter()
                .map(|r| std::sync::atomic::AtomicI64::new(if *r { i64::MIN } else { i64::MAX }))
                .collect(),
            moved: tokio::sync::Notify::new(),
            base: std::sync::OnceLock::new(),
        }
    }

    fn set(&self, me: usize, at: i64) {
        if let Some(p) = self.progress.get(me) {
            p.store(at, std::sync::atomic::Ordering::Release);
            self.moved.notify_waiters();
        }
    }

    /// Source `me` is done (for good).
    pub fn done(&self, me: usize) {
        self.set(me, i64::MAX);
    }

    /// Publish that `me` is at `at`, then wait until every other replay is there too.
    async fn step(&self, me: usize, at: i64, shutdown: &CancellationToken) -> bool {
        self.set(me, at);
        loop {
            let moved = self.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            let behind = self
                .progress
                .iter()
                .enumerate()
                .any(|(i, p)| i != me && p.load(std::sync::atomic::Ordering::Acquire) < at);
            if !behind {
                return true;
            }
            tokio::select! {
                _ = moved => {}
                _ = shutdown.cancelled() => return false,
            }
        }
    }
}

/// Quiet between two repetitions of a capture, ms: longer than any pass window in practice.
pub const REPEAT_GAP_MS: i64 = 60_000;

impl Timeline {
    fn start(&mut self, shared: Option<&ReplaySync>) {
        let now = crate::clock::boottime_ms();
        if self.last == 0 {
            if let Some(&(mono, wall)) =
                shared.map(|s| s.base.get_or_init(|| (now, crate::event::wall_now_ms())))
            {
                self.mono = mono;
                self.wall = wall;
                return;
            }
        }
        let mono = if self.last == 0 {
            now
        } else {
            now.max(self.last + REPEAT_GAP_MS)
        };
        self.wall = crate::event::wall_now_ms() + (mono - now);
        self.mono = mono;
    }

    fn at(&mut self, offset_ms: u64) -> (i64, i64) {
        let off = offset_ms.min(i64::MAX as u64 / 4) as i64;
        self.last = self.last.max(self.mono.saturating_add(off));
        (self.wall.saturating_add(off), self.mono.saturating_add(off))
    }
}

/// Play one capture. Returns false if stopped early (shutdown or pipeline gone).
pub async fn play<R: AsyncBufRead + Unpin>(
    cfg: &SourceConfig,
    reader: R,
    name: &Path,
    speed: &ReplaySpeed,
    feed: &Feed,
    shutdown: &CancellationToken,
    timeline: &mut Timeline,
) -> Result<bool, ReplayError> {
    let sync = feed.replay_sync.as_deref().filter(|_| feed.capture_time);
    timeline.start(sync);
    let mut at = timeline.at(0);
    let mut lines = reader.lines();
    let mut kind = None;
    let mut decoder = Protocol::new(&cfg.protocol);
    let mut buf = BytesMut::new();
    let start = Instant::now();
    let mut line_no = 0;
    let fmt_err = |source| ReplayError::Format {
        path: name.to_path_buf(),
        source,
    };
    loop {
        let line = match lines.next_line().await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(source) => {
                return Err(ReplayError::Io {
                    path: name.to_path_buf(),
                    source,
                })
            }
        };
        line_no += 1;
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let Some(k) = kind else {
            kind = Some(capture::parse_header(t).ok_or_else(|| {
                fmt_err(capture::CaptureError {
                    line: line_no,
                    message: "expected header `scangate-capture v1 serial|mqtt`".into(),
                })
            })?);
            continue;
        };
        let rec = capture::parse_record(k, &line, line_no).map_err(fmt_err)?;
        at = timeline.at(rec.offset_ms);
        // The other replays may go up to this record's time while this one waits for it (a
        // quiet stretch of its capture must not hold them back).
        if let Some(sync) = sync {
            sync.set(feed.source, at.1);
        }
        let due = match speed {
            ReplaySpeed::Max => None,
            ReplaySpeed::Recorded => Some(due_at(start, rec.offset_ms as f64 / 1000.0)),
            ReplaySpeed::Factor(f) => Some(due_at(start, rec.offset_ms as f64 / 1000.0 / f)),
        };
        if let Some(due) = due {
            tokio::select! {
                _ = sleep_until(due) => {}
                _ = shutdown.cancelled() => return Ok(false),
            }
        } else if shutdown.is_cancelled() {
            return Ok(false);
        }
        if let Some(sync) = sync {
            if !sync.step(feed.source, at.1, shutdown).await {
                return Ok(false);
            }
        }
        feed.metrics.frames_in.inc();
        feed.metrics.bytes_in.add(rec.bytes.len() as u64);
        feed.health.bytes.add(rec.bytes.len() as u64);
        let outputs = match k {
            // A serial capture is one byte stream: records may split frames anywhere.
            CaptureKind::Serial => {
                buf.extend_from_slice(&rec.bytes);
                let mut out = Vec::new();
                while let Ok(Some(d)) = decoder.decode(&mut buf) {
                    out.push(d);
                }
                out
            }
            // An MQTT payload is a complete message.
            CaptureKind::Mqtt => decode_all(&mut Protocol::new(&cfg.protocol), &rec.bytes, true),
        };
        for d in outputs {
            if !feed.push_at(d, feed.capture_time.then_some(at)).await {
                return Ok(false);
            }
        }
    }
    while let Ok(Some(d)) = decoder.decode_eof(&mut buf) {
        if !feed.push_at(d, feed.capture_time.then_some(at)).await {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Longest wait before one record, whatever the capture's offsets and the speed factor say
/// (an offset of 2^64 ms or a factor of 1e-300 must not overflow the clock).
pub const MAX_RECORD_WAIT: Duration = Duration::from_secs(86_400);

/// When a record `secs` after the start is due (never more than [`MAX_RECORD_WAIT`] away,
/// never a panic on NaN, infinite or huge values).
pub fn due_at(start: Instant, secs: f64) -> Instant {
    let d = Duration::try_from_secs_f64(secs)
        .unwrap_or(if secs > 0.0 {
            MAX_RECORD_WAIT
        } else {
            Duration::ZERO
        })
        .min(MAX_RECORD_WAIT);
    start.checked_add(d).unwrap_or(start)
}
