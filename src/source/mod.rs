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
pub mod replay;
pub mod serial;

use crate::config::{SourceConfig, SourceKind};
use crate::event::Read;
use crate::metrics::Metrics;
use crate::protocol::Decoded;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// One decoded read with the index of its source (into `Config::sources`).
#[derive(Debug, Clone)]
pub struct SourceRead {
    pub source: usize,
    pub read: Read,
    pub wall_ms: i64,
    /// Journal position just after the read's frame (0: the source keeps no journal). The
    /// spool commits it with the read (see [`journal`]).
    pub journal_end: u64,
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
}

impl Feed {
    pub(crate) fn read_of(&self, d: Decoded, wall_ms: i64, journal_end: u64) -> Option<SourceRead> {
        match d {
            Decoded::Skipped { reason, bytes } => {
                self.metrics.count_drop(reason, 1);
                tracing::debug!(source = %self.name, reason, bytes, "Skipped bytes that are not a valid frame");
                None
            }
            Decoded::Read(read) => {
                self.metrics.reads_in.inc();
                Some(SourceRead {
                    source: self.source,
                    read,
                    wall_ms,
                    journal_end,
                })
            }
        }
    }

    /// Hand decoder output to the pipeline, waiting while the read channel is full (a source
    /// that can be paused). Returns false once the pipeline is gone.
    pub async fn push(&self, d: Decoded) -> bool {
        let wall_ms = crate::event::wall_now_ms();
        let Some(r) = self.read_of(d, wall_ms, 0) else {
            return true;
        };
        match self.tx.try_send(r) {
            Ok(()) => {
                self.wake_if_high();
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(r)) => {
                self.wake.notify_one();
                self.tx.send(r).await.is_ok()
            }
        }
    }

    /// From a source thread (not the runtime): hand over a read, waiting while the channel is
    /// full. For reads that can wait (recovered from a journal before the port is open, or
    /// held reads at shutdown). Returns false once the pipeline is gone.
    pub fn send_blocking(&self, r: SourceRead) -> bool {
        match self.tx.try_send(r) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(r)) => {
                self.wake.notify_one();
                self.tx.blocking_send(r).is_ok()
            }
        }
    }

    /// After handing over a burst: wake the ingest stage if a group's worth of reads waits.
    pub fn wake_if_high(&self) {
        if self.tx.max_capacity() - self.tx.capacity() >= self.high_water {
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

/// The pipeline's input, shared by every source.
#[derive(Clone)]
pub struct Pipe {
    pub tx: mpsc::Sender<SourceRead>,
    pub wake: Arc<Notify>,
    pub high_water: usize,
    pub read_coalesce: Duration,
    /// Port journal directory and committed positions (see [`journal`]).
    pub journal: Option<(std::path::PathBuf, Arc<journal::JournalMarks>)>,
}

/// Run one source until `shutdown` (or, for a replay, until the capture is played).
pub async fn run(
    index: usize,
    cfg: SourceConfig,
    pipe: Pipe,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let feed = Feed {
        source: index,
        name: Arc::from(cfg.name.as_str()),
        tx: pipe.tx,
        metrics,
        wake: pipe.wake,
        high_water: pipe.high_water,
        read_coalesce: pipe.read_coalesce,
        journal: pipe.journal,
    };
    match &cfg.kind {
        SourceKind::Serial { path, baud } => serial::run(&cfg, path, *baud, feed, shutdown).await,
        SourceKind::Replay {
            file,
            speed,
            repeat,
        } => {
            if let Err(e) = replay::run_file(&cfg, file, speed, *repeat, feed, shutdown).await {
                tracing::error!(source = %cfg.name, error = %e, "Replay source stopped");
            }
        }
    }
}
