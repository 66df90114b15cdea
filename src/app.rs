//! Builds the pipeline from a validated [`Config`], runs it, and owns the shutdown sequence.
//!
//! Shutdown (SIGTERM/SIGINT, or "idle" in demo/replay mode): cancel the sources only; the read
//! channel closes when the last source ends; the ingest task commits its final group and ends;
//! the spool thread finishes its queue; then the forwarder is stopped (an in-flight request may
//! finish). Every step is bounded by the grace period, and stragglers are named in the log.

use crate::config::{Config, SpoolConfig};
use crate::event::EventBody;
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::source::journal::JournalMarks;
use crate::source::{self, SourceRead};
use crate::spool::actor::{self, SpoolHandle};
use crate::spool::{Spool, SpoolError, SpoolOptions};
use crate::suppress::stage::Stage;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;

/// Capacity of the read channel (sources → ingest). At 5,000 reads/s this is ~1.6 s of reads:
/// enough to ride out an fsync stall; when full, serial reads are dropped and counted.
pub const READ_CHANNEL: usize = 8192;

/// A group is committed once its events hold about this many bytes, whatever
/// `commit_max_events` says: chunks stay far below what the chunk decoder accepts.
pub const GROUP_MAX_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Forward(#[from] crate::forward::ForwardError),
    #[error("cannot start the spool thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot listen on admin address {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub grace: Duration,
    /// Stop by itself once every source has ended and the spool is empty (demo, `replay`);
    /// open passes are emitted when the sources end.
    pub exit_when_idle: bool,
    /// Wall and boot time (the system's; tests inject an unsynced clock).
    pub clock: Arc<dyn crate::clock::Clock>,
    /// Reload on SIGHUP (`scangate run`).
    pub reload: Option<Reload>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            grace: Duration::from_secs(10),
            exit_when_idle: false,
            clock: Arc::new(crate::clock::SystemClock),
            reload: None,
        }
    }
}

/// What a run did, for the demo summary and tests.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub backlog_left: u64,
    pub dead_letters: u64,
}

/// SIGHUP: the config file to read again, and the signal handler's wake-up.
#[derive(Debug, Clone)]
pub struct Reload {
    pub path: std::path::PathBuf,
    pub asked: Arc<tokio::sync::Notify>,
}

/// A source's task, as started.
struct RunningSource {
    name: String,
    /// Its index at start (the ingest stage's tables are by index).
    index: usize,
    stop: CancellationToken,
    /// Cancelled once the source's task has ended.
    done: CancellationToken,
    abort: tokio::task::AbortHandle,
}

/// What a reload may start again while the pipeline runs: the sources' tasks and the
/// forwarder (see [`crate::reload`]).
struct Live {
    /// The configuration in effect.
    cfg: Config,
    sources: JoinSet<()>,
    running: Vec<RunningSource>,
    pipe: Option<source::Pipe>,
    source_stop: CancellationToken,
    forward_stop: CancellationToken,
    forward_task: tokio::task::JoinHandle<()>,
    spool: SpoolHandle,
    metrics: Arc<Metrics>,
    clock: Arc<dyn crate::clock::Clock>,
    boot_offsets: std::collections::HashMap<[u8; 16], i64>,
    grace: Duration,
    /// What the admin pages show of the configuration in effect.
    admin_view: tokio::sync::watch::Sender<crate::admin::View>,
}

impl Live {
    fn start_source(
        &mut self,
        index: usize,
        cfg: crate::config::SourceConfig,
        pipe: &source::Pipe,
    ) {
        let stop = self.source_stop.child_token();
        let done = CancellationToken::new();
        let ended = done.clone();
        let name = cfg.name.clone();
        let run = source::run(index, cfg, pipe.clone(), self.metrics.clone(), stop.clone());
        let abort = self.sources.spawn(async move {
            run.await;
            ended.cancel();
        });
        self.running.push(RunningSource {
            name,
            index,
            stop,
            done,
            abort,
        });
    }

    /// Stop the sources `names` together (each may take a while to settle: an MQTT source
    /// acknowledges what was committed and waits for the broker to close its session), within
    /// one grace period; for each, its index at start, or None when it did not stop in time
    /// (or was not running).
    async fn stop_sources(&mut self, names: &[&str]) -> Vec<Option<usize>> {
        let stopping: Vec<Option<RunningSource>> = names
            .iter()
            .map(|name| {
                let k = self.running.iter().position(|r| r.name == *name)?;
                let r = self.running.remove(k);
                r.stop.cancel();
                Some(r)
            })
            .collect();
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut stopped = Vec::with_capacity(stopping.len());
        for r in stopping {
            let Some(r) = r else {
                stopped.push(None);
                continue;
            };
            if tokio::time::timeout_at(deadline, r.done.cancelled())
                .await
                .is_err()
            {
                r.abort.abort();
                tracing::error!(source = %r.name, "The source did not stop within the grace period; it is not started again: restart scangate (systemctl restart scangate)");
                stopped.push(None);
            } else {
                stopped.push(Some(r.index));
            }
        }
        stopped
    }

    /// Wait (at most the grace period) until the ingest stage has committed every read the
    /// stopped serial source `name` handed over. Its next run starts from the journal's
    /// committed position: what was handed over and not yet committed would be taken from the
    /// journal again, and sent twice (as new events, with new ids).
    async fn settle_handed(&self, name: &str) {
        let Some(pipe) = &self.pipe else { return };
        let Some((_, marks)) = &pipe.journal else {
            return;
        };
        let handed = marks.handed(name);
        let deadline = tokio::time::Instant::now() + self.grace;
        while marks.get(name) < handed {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(source = %name, handed, committed = marks.get(name), "The reads this source handed over before its restart are not yet committed (the spool refuses or is slow): the new run takes them from the port journal again, so some may be sent twice");
                return;
            }
            // The ingest stage commits its group at once rather than at its deadline.
            pipe.commit_now
                .store(true, std::sync::atomic::Ordering::Release);
            pipe.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Read `path` again; if valid, apply what can be applied now (see [`crate::reload`]), else
    /// keep everything as it runs and log every error with its line.
    async fn reload(&mut self, path: &std::path::Path) {
        crate::service::notify_reloading();
        tracing::info!(config = %path.display(), "SIGHUP: reading the configuration again");
        let new = match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                let n = match &e {
                    crate::config::ConfigError::Invalid { errors, .. } => {
                        for x in errors {
                            tracing::error!(config = %path.display(), line = x.line, column = x.column, key = %x.key, "{}", x.message);
                        }
                        errors.len()
                    }
                    crate::config::ConfigError::Read { .. } => {
                        tracing::error!(error = %e, "Cannot read the configuration");
                        1
                    }
                };
                tracing::error!(config = %path.display(), errors = n, "The configuration is not valid: nothing was changed, the running configuration stays in effect. Fix it (`scangate validate`) and reload again");
                self.metrics.config_reloads_failed.inc();
                crate::service::notify_ready(&format!(
                    "reload refused: {n} error(s) in {}; running the previous configuration",
                    path.display()
                ));
                return;
            }
        };
        let plan = crate::reload::plan(&self.cfg, &new);
        // The new forwarder is made first: if its settings cannot be used (a CA file that is
        // missing or not PEM), nothing is changed at all.
        let forwarder = match &plan.upstream {
            Some(up) => match Forwarder::new(
                up.clone(),
                self.cfg.gateway.id.clone(),
                self.cfg.gateway.site.clone(),
                self.spool.clone(),
                self.metrics.clone(),
            ) {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::error!(config = %path.display(), error = %e, "The new [upstream] settings cannot be used: nothing was changed, the running configuration stays in effect");
                    self.metrics.config_reloads_failed.inc();
                    crate::service::notify_ready(&format!(
                        "reload refused: [upstream] unusable ({e}); running the previous configuration"
                    ));
                    return;
                }
            },
            None => None,
        };
        if !plan.needs_restart.is_empty() {
            tracing::warn!(changes = %plan.needs_restart.join("; "), "Changed in the configuration, taking effect at the next start (systemctl restart scangate); until then these run as before");
        }
        let mut done: Vec<String> = Vec::new();
        let names: Vec<&str> = plan
            .stop
            .iter()
            .map(String::as_str)
            .chain(plan.restart.iter().map(|s| s.name.as_str()))
            .collect();
        let mut stopped = self.stop_sources(&names).await.into_iter();
        for name in &plan.stop {
            if stopped.next().flatten().is_some() {
                tracing::info!(source = %name, "Source removed from the configuration: stopped");
                done.push(format!("stopped {name}"));
            }
            self.cfg.sources.retain(|s| s.name != *name);
        }
        for s in &plan.restart {
            let Some(index) = stopped.next().flatten() else {
                continue;
            };
            self.settle_handed(&s.name).await;
            let Some(pipe) = self.pipe.take() else {
                tracing::error!(source = %s.name, "Every source had ended, so the pipeline no longer takes reads: restart scangate (systemctl restart scangate) to start this source");
                continue;
            };
            self.start_source(index, s.clone(), &pipe);
            self.pipe = Some(pipe);
            tracing::info!(source = %s.name, "Source started again with its new settings");
            done.push(format!("restarted {}", s.name));
            if let Some(c) = self.cfg.sources.iter_mut().find(|c| c.name == s.name) {
                *c = s.clone();
            }
        }
        if let (Some(up), Some(f)) = (&plan.upstream, forwarder) {
            // The old forwarder settles what it has in flight; the rest stays in the spool,
            // and the new one reads it from the start (same event ids).
            self.forward_stop.cancel();
            if tokio::time::timeout(self.grace, &mut self.forward_task)
                .await
                .is_err()
            {
                self.forward_task.abort();
                let _ = (&mut self.forward_task).await;
            }
            // Another server: the old one's state goes with it, the new one starts as up (its
            // first failure says otherwise). The same server keeps its outage and its clock.
            let same_server = up.endpoint == self.cfg.upstream.endpoint;
            if !same_server {
                for g in [
                    &self.metrics.upstream_down,
                    &self.metrics.upstream_down_since_ms,
                    &self.metrics.upstream_misconfigured,
                    &self.metrics.upstream_rejecting_all,
                ] {
                    g.set(0);
                }
                self.spool.set_upstream_error(None).await;
            }
            self.spool.want_fresh(None);
            let mut f = f.with_clock(self.clock.clone(), self.boot_offsets.clone());
            if same_server {
                f = f.continuing_outage();
            }
            self.forward_stop = CancellationToken::new();
            self.forward_task = tokio::spawn(f.run(self.forward_stop.clone()));
            self.cfg.upstream = up.clone();
            tracing::info!(upstream = %up.endpoint, "Forwarder started again with the new [upstream] settings");
            done.push("restarted the forwarder".into());
        }
        self.admin_view
            .send_replace(crate::admin::View::of(&self.cfg));
        self.metrics.config_reloads.inc();
        let summary = if done.is_empty() {
            "nothing to start again".to_string()
        } else {
            done.join(", ")
        };
        tracing::info!(applied = %summary, at_next_start = plan.needs_restart.len(), "Configuration reloaded");
        crate::service::notify_ready(&format!("reloaded: {summary}"));
    }
}

/// A running pipeline's handle for status pages and the demo's progress line.
#[derive(Clone)]
pub struct Running {
    pub spool: SpoolHandle,
    pub metrics: Arc<Metrics>,
}

/// Whether the suppression stage may end passes by time yet: not before every serial source
/// has handed over the reads recovered from its port journal, and the ingest stage has taken
/// every read queued at that moment (those reads are older than now and continue passes that
/// are still open). Released after [`TICK_HOLD_MAX`] whatever happens.
struct TickGate {
    recovering: Arc<std::sync::atomic::AtomicUsize>,
    /// Reads still to take before ticks are allowed (None: sources still recovering).
    left: Option<usize>,
    open: bool,
    since: Instant,
}

/// Longest hold of the suppression stage's ticks at start.
const TICK_HOLD_MAX: Duration = Duration::from_secs(10);

impl TickGate {
    fn took(&mut self) {
        if let Some(n) = self.left.as_mut() {
            *n = n.saturating_sub(1);
        }
    }

    /// Check before a tick; `queued`: reads in the channel and the carry now.
    fn allows(&mut self, queued: usize) -> bool {
        if self.open {
            return true;
        }
        if self.left.is_none() && self.recovering.load(std::sync::atomic::Ordering::Acquire) == 0 {
            self.left = Some(queued);
        }
        if self.left == Some(0) || self.since.elapsed() >= TICK_HOLD_MAX {
            self.open = true;
        }
        self.open
    }
}

/// Group commit: collect reads for up to `commit_interval` (or `commit_max_events` reads),
/// pass them through the suppression stage (`crate::suppress::stage`), then hand the events
/// of ended passes, the open passes' changes and the ports' journal positions to the spool
/// thread as one transaction, without waiting for its fsync, so the next group fills while
/// the previous one commits. The task wakes for the first read of a group, at its deadline,
/// and every commit interval while passes are open (to end them on time); it drains the
/// channel in between only when a source reports it filling
/// ([`crate::source::Feed::wake_if_high`]): a few wake-ups per commit, not one per read.
#[allow(clippy::too_many_arguments)]
async fn ingest(
    mut rx: mpsc::Receiver<SourceRead>,
    wake: Arc<tokio::sync::Notify>,
    commit_now: Arc<std::sync::atomic::AtomicBool>,
    budget: Arc<source::Budget>,
    spool: SpoolHandle,
    cfg: Config,
    mut stage: Stage,
    recovered: Vec<EventBody>,
    recovering: Arc<std::sync::atomic::AtomicUsize>,
    pass_log_lost: Arc<std::sync::atomic::AtomicBool>,
    flush_at_end: bool,
    stopping: CancellationToken,
    metrics: Arc<Metrics>,
) {
    use tokio::sync::mpsc::error::TryRecvError;
    let names: Vec<Arc<str>> = cfg
        .sources
        .iter()
        .map(|s| Arc::from(s.name.as_str()))
        .collect();
    let spool_cfg: SpoolConfig = cfg.spool.clone();
    let max = spool_cfg.commit_max_events;
    let mut gate = TickGate {
        recovering,
        left: None,
        open: false,
        since: Instant::now(),
    };
    stage.hold_ticks();
    // Journal positions of this group, per source (0: none), committed with it.
    let mut marks: Vec<u64> = vec![0; names.len()];
    // Sources whose last read was not its frame's last (`SourceRead::frame_more`): the group
    // does not end before the rest of that frame is in it.
    let mut mid_frame: Vec<bool> = vec![false; names.len()];
    // `carried`: the read came from `carry` (its bytes already left the channel's budget).
    // Returns the read's count against the group's bound.
    let accept = |read: SourceRead,
                  carried: bool,
                  stage: &mut Stage,
                  gate: &mut TickGate,
                  group: &mut Vec<EventBody>,
                  size: &mut usize,
                  marks: &mut Vec<u64>,
                  mid: &mut Vec<bool>| {
        if !carried {
            budget.taken(read.size());
        }
        gate.took();
        if let Some(m) = mid.get_mut(read.source) {
            *m = read.frame_more;
        }
        // Even a read folded into a pass moves its source's journal mark: the pass's state
        // is committed with the mark.
        if let Some(m) = marks.get_mut(read.source) {
            *m = (*m).max(read.journal_end);
        }
        let before = group.len();
        stage.read(read, group);
        for b in &group[before..] {
            *size += actor::body_size(b);
        }
    };
    // Reads taken from the channel while a full group waited for the rest of another
    // source's frame: they start the next group, in order.
    let mut carry: std::collections::VecDeque<SourceRead> = std::collections::VecDeque::new();
    let mut closed = false;
    // The passes taken back (or none) are written as a snapshot at once: damaged rows are
    // replaced even if no read comes.
    let mut pending: Vec<EventBody> = recovered;
    if let Some(row) = stage.log_row(false) {
        let events = std::mem::take(&mut pending);
        if spool
            .append_detached(events, Vec::new(), vec![row])
            .await
            .is_err()
        {
            tracing::error!("Spool is gone before the first commit");
            return;
        }
    }
    let tick_every = spool_cfg.commit_interval.max(Duration::from_millis(10));
    // A group takes at most its commit interval, plus the rest of a frame.
    let beat = metrics.progress.beat("ingest");
    let group_time = spool_cfg.commit_interval + FRAME_REST_MAX;
    loop {
        if closed && carry.is_empty() {
            break;
        }
        beat.busy_for(group_time);
        beat.fault_point().await;
        let mut group: Vec<EventBody> = std::mem::take(&mut pending);
        group.reserve(256);
        let mut size: usize = group.iter().map(actor::body_size).sum();
        let mut taken = 0usize;
        let first = match carry.pop_front() {
            Some(r) => Some((r, true)),
            None if !group.is_empty() => None,
            None => {
                // Idle: wake for the next read, or to end passes whose window runs out.
                let timer = tokio::time::sleep(tick_every);
                beat.idle();
                let first = tokio::select! {
                    r = rx.recv() => match r {
                        Some(r) => Some((r, false)),
                        None => {
                            closed = true;
                            None
                        }
                    },
                    _ = timer, if stage.tracked() > 0 => None,
                };
                beat.busy_for(group_time);
                first
            }
        };
        if let Some((first, carried)) = first {
            taken += 1;
            accept(
                first,
                carried,
                &mut stage,
                &mut gate,
                &mut group,
                &mut size,
                &mut marks,
                &mut mid_frame,
            );
            let deadline = Instant::now() + spool_cfg.commit_interval;
            loop {
                while taken < max && size < GROUP_MAX_BYTES {
                    let (read, carried) = match carry.pop_front() {
                        Some(r) => (r, true),
                        None => match rx.try_recv() {
                            Ok(r) => (r, false),
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => {
                                closed = true;
                                break;
                            }
                        },
                    };
                    taken += 1;
                    accept(
                        read,
                        carried,
                        &mut stage,
                        &mut gate,
                        &mut group,
                        &mut size,
                        &mut marks,
                        &mut mid_frame,
                    );
                }
                // A `first`-mode event goes out at once: that mode is chosen for latency
                // (the reads that came with it are in the group already).
                let full = taken >= max
                    || size >= GROUP_MAX_BYTES
                    || Instant::now() >= deadline
                    || stage.take_urgent()
                    || commit_now.swap(false, std::sync::atomic::Ordering::AcqRel);
                if !full && !closed {
                    tokio::select! {
                        _ = sleep_until(deadline) => {}
                        _ = wake.notified() => {}
                    }
                    continue;
                }
                // Full: the group ends once every source's frame in it is complete. Only
                // those sources' reads join it now (at most the rest of one frame each); any
                // other read waits for the next group.
                while mid_frame.contains(&true) {
                    if let Some(k) = carry
                        .iter()
                        .position(|r| mid_frame.get(r.source).copied().unwrap_or(false))
                    {
                        if let Some(read) = carry.remove(k) {
                            accept(
                                read,
                                true,
                                &mut stage,
                                &mut gate,
                                &mut group,
                                &mut size,
                                &mut marks,
                                &mut mid_frame,
                            );
                        }
                        continue;
                    }
                    let next = match rx.try_recv() {
                        Ok(r) => Some(r),
                        Err(TryRecvError::Disconnected) => {
                            closed = true;
                            None
                        }
                        // The rest of the frame is on its way from the source's thread.
                        Err(TryRecvError::Empty) => {
                            match tokio::time::timeout(FRAME_REST_MAX, rx.recv()).await {
                                Ok(Some(r)) => Some(r),
                                Ok(None) => {
                                    closed = true;
                                    None
                                }
                                Err(_) => None,
                            }
                        }
                    };
                    match next {
                        Some(read) if mid_frame.get(read.source).copied().unwrap_or(false) => {
                            accept(
                                read,
                                false,
                                &mut stage,
                                &mut gate,
                                &mut group,
                                &mut size,
                                &mut marks,
                                &mut mid_frame,
                            )
                        }
                        // Out of the channel's byte budget now (or the sources, finding it
                        // full, could not send the rest of the frame this group waits for).
                        // The carry holds what arrives while it waits: at most the sources'
                        // reads of ~1 s.
                        Some(read) => {
                            budget.taken(read.size());
                            carry.push_back(read);
                        }
                        None => {
                            if !closed {
                                tracing::warn!("A frame's remaining reads did not arrive within 1 s; committing the group without them");
                            }
                            mid_frame.iter_mut().for_each(|m| *m = false);
                        }
                    }
                }
                break;
            }
        }
        // End the passes whose window ran out (not while reads recovered from the port
        // journals are still coming: they continue open passes).
        if gate.allows(rx.len() + carry.len()) {
            stage.release_ticks();
        }
        if pass_log_lost.swap(false, std::sync::atomic::Ordering::AcqRel) {
            stage.row_lost();
        }
        // Every source ended by itself (replays: no read can come any more) or the run ends
        // when idle: the open passes are complete. On a stop they stay open in the pass log
        // and go on at the next start.
        if closed && carry.is_empty() && (flush_at_end || !stopping.is_cancelled()) {
            stage.flush(&mut group);
        } else {
            stage.tick(&mut group);
        }
        let row = stage.log_row(rx.len() + carry.len() >= max.min(READ_CHANNEL / 8));
        let n = group.len() as u64;
        let group_marks: Vec<(Arc<str>, u64)> = marks
            .iter_mut()
            .enumerate()
            .filter(|(_, m)| **m > 0)
            .map(|(i, m)| (names[i].clone(), std::mem::take(m)))
            .collect();
        if n == 0 && group_marks.is_empty() && row.is_none() {
            continue;
        }
        metrics.ingest_groups.inc();
        // Waiting for room in the spool thread's queue: the spool is checked on its own.
        beat.idle();
        let handed = spool
            .append_detached(group, group_marks, row.into_iter().collect())
            .await;
        beat.busy_for(group_time);
        if handed.is_err() {
            metrics.count_drop("spool_unavailable", n);
            tracing::error!(events = n, "Spool is gone; reads dropped");
            break;
        }
    }
    beat.retire();
}

/// How long a commit group waits past its deadline for the rest of a frame with several reads
/// (which the source's thread hands over back to back).
const FRAME_REST_MAX: Duration = Duration::from_secs(1);

/// Run the gateway until `shutdown` is cancelled (or, with `exit_when_idle`, until done).
/// `on_start` receives a handle once the spool is open and the sources are started.
pub async fn run(
    cfg: Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    opts: RunOptions,
    on_start: impl FnOnce(Running),
) -> Result<RunSummary, AppError> {
    let state_dir = cfg.gateway.state_dir.clone();
    let pass_log_lost: Arc<std::sync::atomic::AtomicBool> = Arc::default();
    let sopts = SpoolOptions {
        clock: opts.clock.clone(),
        pass_log_lost: pass_log_lost.clone(),
        ..SpoolOptions::of(&cfg)
    };
    metrics.started_ms.set(crate::metrics::mono_ms() + 1);
    let m = metrics.clone();
    let (spool, report) = tokio::task::spawn_blocking(move || Spool::open(&state_dir, sopts, m))
        .await
        .map_err(|e| AppError::Thread(std::io::Error::other(e)))??;
    if let Some((aside, reason)) = &report.moved_aside {
        tracing::error!(moved_to = %aside.display(), reason = %reason, "Spool file was corrupt: moved aside, started a fresh spool (same event ids and seqs continue). Its events are NOT being sent until you run `scangate spool salvage` on it (with the service stopped)");
    }
    for q in &report.quarantined {
        if report.moved_aside.as_ref().map(|(a, _)| a) != Some(q) {
            tracing::error!(file = %q.display(), "A spool file moved aside earlier still holds events that are not sent: stop the service and run `scangate spool salvage` on it");
        }
    }
    tracing::info!(path = %spool.path().display(), backlog = report.backlog, created = report.created, "Spool open");
    // Port journals: how far each serial source's journal is committed.
    let serial_names: Vec<Arc<str>> = cfg
        .sources
        .iter()
        .filter(|s| matches!(s.kind, crate::config::SourceKind::Serial { .. }))
        .map(|s| Arc::from(s.name.as_str()))
        .collect();
    let committed_marks = spool.journal_marks().unwrap_or_else(|e| {
        tracing::error!(error = %e, "Cannot read the journal positions from the spool; port journals are replayed from their start (duplicates, never loss)");
        Vec::new()
    });
    // MQTT sources keep positions in the same marks, and are told of every settled group.
    let mut marked_names = serial_names.clone();
    let mut settled_tx = Vec::new();
    let mut settled_rx = Vec::new();
    for (i, s) in cfg.sources.iter().enumerate() {
        if matches!(s.kind, crate::config::SourceKind::Mqtt(_)) {
            let name: Arc<str> = Arc::from(s.name.as_str());
            let (tx, rx) = mpsc::unbounded_channel();
            marked_names.push(name.clone());
            settled_tx.push((name, tx));
            settled_rx.push((i, rx, 0));
        }
    }
    let journal_marks = Arc::new(JournalMarks::with_settled(
        &marked_names,
        &committed_marks,
        settled_tx,
    ));
    // One folder per spool identity: journals left by another spool (a wiped state dir, a
    // journal directory shared by mistake) are never replayed into this one.
    let journal_dir = cfg
        .gateway
        .journal_dir
        .join(format!("{:016x}", spool.identity().salt));
    let names: Vec<&str> = serial_names.iter().map(|n| &**n).collect();
    for (source, files, bytes) in crate::source::journal::orphans(&journal_dir, &names) {
        tracing::warn!(source = %source, files, bytes, dir = %journal_dir.display(), "Port journal of a source that is not in the config (renamed or removed?): reads in it that were not committed are not recovered. Give the source its old name back to recover them, or delete its files");
    }
    // Open passes left by the last run (see `crate::suppress::stage`).
    let boot_offsets = spool.boot_offsets().unwrap_or_else(|e| {
        tracing::error!(error = %e, "Cannot read the recorded clock offsets from the spool; events of past boots read with an unsynced clock are sent as unsynced");
        Default::default()
    });
    let mut stage = Stage::new(&cfg, opts.clock.clone(), metrics.clone(), true);
    let mut recovered_events = Vec::new();
    match spool.pass_log_rows() {
        Ok(rows) if !rows.is_empty() => {
            let r = stage.recover(&rows, &boot_offsets, &mut recovered_events);
            tracing::info!(
                restored = r.restored,
                emitted = r.emitted,
                "Open passes of the last run taken back"
            );
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, "Cannot read the open passes of the last run from the spool; their reads are not emitted again")
        }
    }
    let (handle, spool_thread) =
        actor::spawn_with(spool, journal_marks.clone()).map_err(AppError::Thread)?;

    let forwarder = Forwarder::new(
        cfg.upstream.clone(),
        cfg.gateway.id.clone(),
        cfg.gateway.site.clone(),
        handle.clone(),
        metrics.clone(),
    )?
    .with_clock(opts.clock.clone(), boot_offsets.clone());
    let forward_stop = CancellationToken::new();
    let forward_task = tokio::spawn(forwarder.run(forward_stop.clone()));

    let admin_view = tokio::sync::watch::Sender::new(crate::admin::View::of(&cfg));
    let admin_task = match cfg.admin.listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AppError::Admin { addr, source })?;
            tracing::info!(addr = %addr, "Admin HTTP listening (/ status page, /events, /health, /metrics, /status)");
            Some(tokio::spawn(crate::admin::serve(
                listener,
                Running {
                    spool: handle.clone(),
                    metrics: metrics.clone(),
                },
                cfg.clone(),
                admin_view.subscribe(),
            )))
        }
        None => None,
    };

    let source_stop = shutdown.child_token();
    let (tx, rx) = mpsc::channel(READ_CHANNEL);
    let pipe = source::Pipe {
        tx,
        wake: Arc::new(tokio::sync::Notify::new()),
        high_water: cfg.spool.commit_max_events.min(READ_CHANNEL / 2),
        read_coalesce: (cfg.spool.commit_interval / 5)
            .clamp(Duration::from_millis(1), Duration::from_millis(10)),
        journal: Some((journal_dir, journal_marks)),
        budget: Arc::default(),
        recovering: Arc::new(std::sync::atomic::AtomicUsize::new(cfg.sources.len())),
        first_mode: cfg.suppress.mode == crate::config::SuppressMode::First,
        capture_time: cfg
            .sources
            .iter()
            .all(|s| matches!(s.kind, crate::config::SourceKind::Replay { .. })),
        settled: Arc::new(std::sync::Mutex::new(settled_rx)),
        commit_now: Arc::default(),
        gateway_id: Arc::from(cfg.gateway.id.as_str()),
        replay_sync: Some(Arc::new(crate::source::replay::ReplaySync::new(
            &cfg.sources
                .iter()
                .map(|s| matches!(s.kind, crate::config::SourceKind::Replay { .. }))
                .collect::<Vec<_>>(),
        ))),
    };
    // A panic of the ingest stage (a bug) stops the daemon (so systemd restarts it) instead
    // of leaving it up with nothing read: in release builds a panic aborts anyway.
    let ingest_inner = tokio::spawn(ingest(
        rx,
        pipe.wake.clone(),
        pipe.commit_now.clone(),
        pipe.budget.clone(),
        handle.clone(),
        cfg.clone(),
        stage,
        recovered_events,
        pipe.recovering.clone(),
        pass_log_lost,
        opts.exit_when_idle,
        source_stop.clone(),
        metrics.clone(),
    ));
    let ingest_task = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = ingest_inner.await {
                if e.is_panic() {
                    tracing::error!("The ingest stage stopped on an internal error; stopping the daemon (what was committed is kept; port journals hold the rest)");
                    shutdown.cancel();
                }
            }
        })
    };
    let mut live = Live {
        sources: JoinSet::new(),
        running: Vec::new(),
        pipe: None,
        source_stop: source_stop.clone(),
        forward_stop,
        forward_task,
        spool: handle.clone(),
        metrics: metrics.clone(),
        clock: opts.clock.clone(),
        boot_offsets,
        grace: opts.grace,
        cfg: cfg.clone(),
        admin_view,
    };
    for (i, s) in cfg.sources.iter().enumerate() {
        live.start_source(i, s.clone(), &pipe);
    }
    // Kept for the sources a reload starts again; dropped when stopping (the read channel
    // closes once the last source has ended).
    live.pipe = Some(pipe);
    on_start(Running {
        spool: handle.clone(),
        metrics: metrics.clone(),
    });
    crate::service::notify_ready(&format!("running; backlog {}", report.backlog));
    let watchdog = crate::service::spawn_watchdog(handle.clone(), metrics.clone());

    // Wait for a reason to stop, reloading on SIGHUP.
    let mut committed = handle.committed();
    let reload = opts.reload.clone();
    loop {
        // Asked of the spool thread itself (after the ingest stage's last group in its queue),
        // not read from the backlog gauge, which lags the last commit.
        if opts.exit_when_idle
            && live.sources.is_empty()
            && ingest_task.is_finished()
            && handle.stats().await.is_ok_and(|s| s.backlog == 0)
        {
            break;
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = live.sources.join_next(), if !live.sources.is_empty() => {
                // Every source ended by itself (replays played out): the read channel closes,
                // so the ingest stage completes the open passes and ends.
                if live.sources.is_empty() {
                    live.pipe = None;
                }
            }
            _ = async { match &reload { Some(r) => r.asked.notified().await, None => std::future::pending().await } } => {
                if let Some(r) = &reload {
                    // A stop asked for during a reload does not wait for it.
                    tokio::select! {
                        _ = live.reload(&r.path) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
            _ = committed.changed(), if opts.exit_when_idle => {}
            _ = tokio::time::sleep(Duration::from_millis(100)), if opts.exit_when_idle => {}
        }
    }
    // Nothing of `live` may outlive this: its spool handle would keep the spool thread from
    // finishing.
    let Live {
        mut sources,
        forward_stop,
        forward_task,
        pipe,
        spool,
        ..
    } = live;
    drop((pipe, spool));

    crate::service::notify_stopping();
    tracing::info!(grace = ?opts.grace, "Stopping: sources first, then the spool flushes, then the forwarder");
    let deadline = Instant::now() + opts.grace;
    source_stop.cancel();
    let sources_done = tokio::time::timeout_at(deadline, async {
        while sources.join_next().await.is_some() {}
    })
    .await;
    if sources_done.is_err() {
        tracing::warn!(
            left = sources.len(),
            "Sources did not stop within the grace period; aborting them"
        );
        sources.abort_all();
    }
    if tokio::time::timeout_at(deadline, ingest_task)
        .await
        .is_err()
    {
        tracing::warn!("The ingest stage did not flush within the grace period");
    }
    forward_stop.cancel();
    let mut forward_task = forward_task;
    if tokio::time::timeout_at(deadline, &mut forward_task)
        .await
        .is_err()
    {
        // Stopped, not left running: it holds the spool's handle, which the spool thread
        // waits for before its last acknowledgements are written.
        forward_task.abort();
        let _ = forward_task.await;
        tracing::warn!("The forwarder did not stop within the grace period (a request was in flight); it was stopped, its events stay in the spool");
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    let stats = handle.stats().await.ok();
    if let Some(a) = admin_task {
        a.abort();
        let _ = a.await;
    }
    drop(handle);
    drop(committed);
    // A spool held by another process's lock may not finish: what it holds from serial ports
    // is in their journals, and is committed at the next start.
    let joined = tokio::time::timeout_at(
        deadline.max(Instant::now() + Duration::from_secs(1)),
        tokio::task::spawn_blocking(move || spool_thread.join()),
    )
    .await;
    if joined.is_err() {
        tracing::warn!("The spool did not finish within the grace period (is it locked by another process?); stopping without it");
    }
    let summary = RunSummary {
        backlog_left: stats.as_ref().map(|s| s.backlog).unwrap_or(0),
        dead_letters: stats.as_ref().map(|s| s.dead_letters).unwrap_or(0),
    };
    tracing::info!(
        backlog = summary.backlog_left,
        dead_letters = summary.dead_letters,
        "Stopped"
    );
    Ok(summary)
}
