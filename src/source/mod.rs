//! Sources: where raw bytes come from. Each source runs as one task, decodes with its
//! protocol and pushes [`SourceRead`]s into the pipeline's bounded read channel.
//!
//! Backpressure per kind:
//! - serial: never waits (a UART cannot be paused): if the read channel is full the read is
//!   dropped and counted (`reason="pipeline_full"`);
//! - replay: waits (a file can be paused), so a replay never loses a read.

pub mod capture;
pub mod replay;
pub mod serial;

use crate::config::{SourceConfig, SourceKind};
use crate::event::Read;
use crate::metrics::Metrics;
use crate::protocol::Decoded;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One decoded read with the index of its source (into `Config::sources`).
#[derive(Debug, Clone)]
pub struct SourceRead {
    pub source: usize,
    pub read: Read,
    pub wall_ms: i64,
}

/// The sending side a source uses, with its policy when the pipeline is full.
#[derive(Clone)]
pub struct Feed {
    pub source: usize,
    pub name: Arc<str>,
    pub tx: mpsc::Sender<SourceRead>,
    pub metrics: Arc<Metrics>,
    pub can_wait: bool,
}

impl Feed {
    /// Hand decoder output to the pipeline. Returns false once the pipeline is gone.
    pub async fn push(&self, d: Decoded) -> bool {
        match d {
            Decoded::Skipped { reason, bytes } => {
                self.metrics.count_drop(reason, 1);
                tracing::debug!(source = %self.name, reason, bytes, "Skipped bytes that are not a valid frame");
                true
            }
            Decoded::Read(read) => {
                self.metrics.reads_in.inc();
                let r = SourceRead {
                    source: self.source,
                    read,
                    wall_ms: crate::event::wall_now_ms(),
                };
                if self.can_wait {
                    self.tx.send(r).await.is_ok()
                } else {
                    match self.tx.try_send(r) {
                        Ok(()) => true,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            self.metrics.count_drop("pipeline_full", 1);
                            true
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => false,
                    }
                }
            }
        }
    }
}

/// Run one source until `shutdown` (or, for a replay, until the capture is played).
pub async fn run(
    index: usize,
    cfg: SourceConfig,
    tx: mpsc::Sender<SourceRead>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let feed = Feed {
        source: index,
        name: Arc::from(cfg.name.as_str()),
        tx,
        metrics,
        can_wait: matches!(cfg.kind, SourceKind::Replay { .. }),
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
