//! The spool's owner thread. SQLite calls block (an fsync per commit), so the [`Spool`] lives
//! on a dedicated thread and async stages talk to it through a bounded command channel
//! ([`SpoolHandle`]). Consecutive queued appends are merged into one transaction.
//!
//! The thread ends when every handle is dropped, after finishing the queued commands: the
//! pipeline's shutdown drops the last sender, so the final group is always committed.

use super::{AppendResult, DeadLetter, Spool, SpoolError, Stats};
use crate::event::{wall_now_ms, EventBody, Loc, SpooledEvent};
use crate::source::journal::JournalMarks;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, watch};

/// Freshly committed events handed from the spool thread straight to a forwarder that has
/// read everything before them, so the steady state never reads a chunk back (no read
/// transaction, no decompression, no decoding). Only an optimisation: whenever the queue does
/// not start with exactly the events the forwarder needs next, it reads from the spool as
/// usual.
///
/// The queue holds the events of consecutive chunks, at most [`HANDOFF_MAX_EVENTS`] in all, in
/// one ring buffer (a take moves only the events taken). A chunk that does not follow the queue
/// (or the forwarder's position, when the queue is empty), or that would pass the bound, empties
/// the queue: the forwarder has fallen behind and reads back until it catches up again
/// ([`SpoolHandle::want_fresh`]).
#[derive(Default)]
pub struct Handoff {
    queue: Mutex<VecDeque<SpooledEvent>>,
    /// The chunk id the forwarder needs next from its start, or -1 when it is behind.
    wants_chunk: AtomicI64,
    /// Set by the spool thread when acknowledgements could not be written: their events are
    /// still in the spool, and the forwarder must read from the start again to send them
    /// (with the same ids) instead of only after its cursor.
    rewind: std::sync::atomic::AtomicBool,
}

/// Bound of the hand-over queue: one full merged commit. Beyond it a forwarder is behind by
/// more than a commit, and reading back costs less than holding the events.
pub const HANDOFF_MAX_EVENTS: usize = MERGE_MAX_EVENTS;

/// Capacity an emptied queue keeps: a burst's ring buffer (over four times this) is given
/// back, a steady state's is reused.
const HANDOFF_KEEP: usize = 1024;

impl Handoff {
    fn follows(&self, queue: &VecDeque<SpooledEvent>, chunk: i64) -> bool {
        match queue.back() {
            Some(last) => last.loc.chunk + 1 == chunk,
            None => self.wants_chunk.load(Ordering::Acquire) == chunk,
        }
    }

    fn give_up(&self, queue: &mut VecDeque<SpooledEvent>) {
        queue.clear();
        queue.shrink_to(HANDOFF_KEEP);
        self.wants_chunk.store(-1, Ordering::Release);
    }

    /// Whether chunk `chunk` of `n` events would be queued now. Asked before the committed
    /// events are built, so that a forwarder that is behind costs nothing here; when the answer
    /// is no, the queue is emptied (the forwarder reads back from its position).
    fn accepts(&self, chunk: i64, n: usize) -> bool {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let ok = n > 0 && self.follows(&queue, chunk) && queue.len() + n <= HANDOFF_MAX_EVENTS;
        if !ok && (!queue.is_empty() || self.wants_chunk.load(Ordering::Acquire) != -1) {
            self.give_up(&mut queue);
        }
        ok
    }

    /// Called by the spool thread after committing `events` (one chunk) that
    /// [`Handoff::accepts`] said would be queued. Checked again under the lock: the forwarder
    /// may have taken events or given up in between.
    fn offer(&self, events: Vec<SpooledEvent>) {
        let Some(chunk) = events.first().map(|e| e.loc.chunk) else {
            return;
        };
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if self.follows(&queue, chunk) && queue.len() + events.len() <= HANDOFF_MAX_EVENTS {
            queue.extend(events);
        } else {
            self.give_up(&mut queue);
        }
    }
}

/// Capacity of the command channel. Appends are whole groups, so 4 is plenty of slack; when it
/// is full the group timer's task waits, and its own bounded input absorbs the burst.
pub const COMMAND_CAPACITY: usize = 4;

/// Queued appends are merged into one transaction up to this many events: enough to catch up
/// after an fsync stall, small enough to bound the memory of one commit.
pub const MERGE_MAX_EVENTS: usize = 8192;

/// Queued appends are merged up to about this many bytes of events, so that one chunk always
/// stays far below what the chunk decoder accepts (`chunk::MAX_RAW`), whatever the tag sizes.
pub const MERGE_MAX_BYTES: usize = 4 * 1024 * 1024;

/// The size an event body takes in a chunk, roughly (its strings plus fixed fields).
pub fn body_size(b: &EventBody) -> usize {
    64 + b.tag.len() + b.symbology.as_ref().map_or(0, String::len)
}

/// How long acknowledgements may wait for an append to carry them (see [`Spool::ack_later`]):
/// with events coming in, an append always comes first (commits are at most a few tens of ms
/// apart); when reads stop, the acknowledgements are written on their own after this.
pub const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// Acknowledgements beyond this many are written at once, whatever comes next: a forwarder
/// draining a backlog (no appends) acknowledges ~300,000 events a second, and the pending
/// list is memory.
const ACKS_MAX: usize = MERGE_MAX_EVENTS;

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

pub enum Cmd {
    Append {
        bodies: Vec<EventBody>,
        /// Journal positions committed with these events (source name, position).
        marks: Vec<(Arc<str>, u64)>,
        /// Pass-log rows committed with them (`crate::suppress::stage`).
        pass_rows: Vec<(Vec<u8>, bool)>,
        reply: Option<Reply<AppendResult>>,
    },
    Read {
        after: Option<Loc>,
        min_chunk: i64,
        max: usize,
        reply: Reply<(Vec<SpooledEvent>, i64)>,
    },
    /// Taken at once and written later ([`Spool::ack_later`]): nothing to answer.
    Ack {
        locs: Vec<Loc>,
    },
    DeadLetter {
        items: Vec<(SpooledEvent, Option<u16>, String)>,
        reply: Reply<()>,
    },
    UpstreamError {
        error: Option<String>,
    },
    Stats {
        reply: Reply<Stats>,
    },
    DeadLetters {
        limit: usize,
        reply: Reply<Vec<DeadLetter>>,
    },
    HeadChunk {
        reply: Reply<i64>,
    },
}

#[derive(Clone)]
pub struct SpoolHandle {
    tx: mpsc::Sender<Cmd>,
    committed: watch::Receiver<i64>,
    handoff: Arc<Handoff>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("spool thread has stopped")]
    Closed,
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// A copy of an append error for each waiter of a merged transaction. The kinds the pipeline
/// acts on (full, disk full) are kept; anything else keeps its message.
fn same_error(e: &SpoolError) -> SpoolError {
    match e {
        SpoolError::Full { max_bytes } => SpoolError::Full {
            max_bytes: *max_bytes,
        },
        SpoolError::DiskFull => SpoolError::DiskFull,
        other => SpoolError::Other(other.to_string()),
    }
}

/// Start the spool thread. The returned watch carries the id of the newest committed chunk.
pub fn spawn(spool: Spool) -> std::io::Result<(SpoolHandle, std::thread::JoinHandle<()>)> {
    spawn_with(spool, Arc::default())
}

/// Merge journal marks: the highest position per source.
fn merge_marks(into: &mut Vec<(Arc<str>, u64)>, more: Vec<(Arc<str>, u64)>) {
    for (name, pos) in more {
        match into.iter_mut().find(|(n, _)| *n == name) {
            Some((_, p)) => *p = (*p).max(pos),
            None => into.push((name, pos)),
        }
    }
}

/// [`spawn`], publishing committed journal positions to `journal` after each commit.
pub fn spawn_with(
    mut spool: Spool,
    journal: Arc<JournalMarks>,
) -> std::io::Result<(SpoolHandle, std::thread::JoinHandle<()>)> {
    let (tx, mut rx) = mpsc::channel::<Cmd>(COMMAND_CAPACITY);
    let head = spool.head_chunk().unwrap_or(0);
    let (committed_tx, committed) = watch::channel(head);
    let handoff = Arc::new(Handoff {
        wants_chunk: AtomicI64::new(-1),
        ..Default::default()
    });
    let offer = handoff.clone();
    // The thread's own timer for the acknowledgement delay; commands still come from the
    // async side through the channel.
    let timer = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let join = std::thread::Builder::new().name("spool".into()).spawn(move || {
        let mut pending: Option<Cmd> = None;
        let mut refusing = false;
        // When the oldest acknowledgement not yet written was taken.
        let mut acks_since: Option<tokio::time::Instant> = None;
        let flush = |spool: &mut Spool| spool.flush_acks_or_log(wall_now_ms());
        loop {
            let cmd = match pending.take() {
                Some(c) => c,
                None => {
                    let next = match acks_since.filter(|_| spool.acks_pending() > 0) {
                        None => rx.blocking_recv(),
                        Some(since) => {
                            let due = since + ACK_DELAY;
                            let r = timer.block_on(async {
                                tokio::time::timeout_at(due, rx.recv()).await
                            });
                            match r {
                                Ok(c) => c,
                                Err(_) => {
                                    flush(&mut spool);
                                    acks_since = None;
                                    if spool.take_acks_lost() {
                                        offer.rewind.store(true, Ordering::Release);
                                        committed_tx.send_modify(|_| {});
                                    }
                                    continue;
                                }
                            }
                        }
                    };
                    match next {
                        Some(c) => c,
                        None => break,
                    }
                }
            };
            // Whatever reads the done state sees the acknowledgements taken so far.
            if !matches!(cmd, Cmd::Append { .. } | Cmd::Ack { .. } | Cmd::Read { .. }) {
                flush(&mut spool);
            }
            match cmd {
                Cmd::Append { mut bodies, mut marks, pass_rows, reply } => {
                    spool.stage_pass_rows(pass_rows);
                    // Merge appends that are already queued into this transaction.
                    let mut replies = vec![(reply, bodies.len())];
                    let mut size: usize = bodies.iter().map(body_size).sum();
                    while bodies.len() < MERGE_MAX_EVENTS && size < MERGE_MAX_BYTES {
                        match rx.try_recv() {
                            Ok(Cmd::Append { bodies: more, marks: more_marks, pass_rows, reply }) => {
                                spool.stage_pass_rows(pass_rows);
                                replies.push((reply, more.len()));
                                size += more.iter().map(body_size).sum::<usize>();
                                bodies.extend(more);
                                merge_marks(&mut marks, more_marks);
                            }
                            Ok(other) => {
                                pending = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    let total = bodies.len() as u64;
                    let keep = |chunk, n| offer.accepts(chunk, n);
                    // Full with `reject`: a group without events would still commit its
                    // positions, and an MQTT source would acknowledge messages whose reads
                    // joined open passes, whose events could then be refused. Refused too:
                    // the broker keeps those messages until there is room.
                    let hold = bodies.is_empty()
                        && marks.iter().any(|(n, _)| journal.acknowledges(n))
                        && spool.refusing();
                    let appended = if hold {
                        Err(SpoolError::Full {
                            max_bytes: spool.max_bytes(),
                        })
                    } else {
                        spool.append_marked(bodies, wall_now_ms(), &marks, keep)
                    };
                    let result = match appended {
                        Ok((r, events)) => {
                            if let Some(events) = events {
                                offer.offer(events);
                            }
                            Ok(r)
                        }
                        Err(e) => {
                            // The group's reads are dropped (and counted): they are settled, so
                            // their journal bytes must not stay (the journal would grow while
                            // the spool refuses) nor come back at the next start. The marks
                            // alone are committed (no size check applies to them), and
                            // published even if that fails too (a full disk).
                            if !marks.is_empty() {
                                if let Err(me) =
                                    spool.append_marked(Vec::new(), wall_now_ms(), &marks, |_, _| false)
                                {
                                    tracing::debug!(error = %me, "Cannot record journal positions of refused reads");
                                }
                                for (name, pos) in &marks {
                                    journal.refuse(name, *pos);
                                }
                            }
                            Err(e)
                        }
                    };
                    // Rows still staged were not committed: the stage must write a snapshot.
                    spool.drop_pass_rows();
                    if replies.iter().any(|(r, _)| r.is_none()) {
                        report_detached(&spool, &result, total, &mut refusing);
                    }
                    match result {
                        Ok(r) => {
                            tracing::trace!(first_seq = r.first_seq, count = r.count, chunk = r.chunk, marks = ?marks, "Committed");
                            for (name, pos) in &marks {
                                journal.set(name, *pos);
                            }
                            if r.count > 0 {
                                let _ = committed_tx.send(r.chunk);
                            }
                            let mut seq = r.first_seq;
                            let mut evicted = r.evicted;
                            for (reply, n) in replies {
                                if let Some(reply) = reply {
                                    let _ = reply.send(Ok(AppendResult { first_seq: seq, count: n, chunk: r.chunk, evicted }));
                                }
                                evicted = 0;
                                seq += n as u64;
                            }
                        }
                        Err(e) => {
                            // Every merged append shares the outcome: same kind, same message.
                            for reply in replies.into_iter().filter_map(|(r, _)| r) {
                                let _ = reply.send(Err(same_error(&e)));
                            }
                        }
                    }
                }
                Cmd::Read { after, min_chunk, max, reply } => {
                    let head = spool.next_chunk - 1;
                    let _ = reply.send(spool.read_after(after, min_chunk, max).map(|v| (v, head)));
                }
                Cmd::Ack { locs } => {
                    if spool.acks_pending() == 0 {
                        acks_since = Some(tokio::time::Instant::now());
                    }
                    spool.ack_later(&locs);
                    if spool.acks_pending() >= ACKS_MAX {
                        flush(&mut spool);
                    }
                }
                Cmd::DeadLetter { items, reply } => {
                    let _ = reply.send(spool.dead_letter(&items, wall_now_ms()));
                }
                Cmd::UpstreamError { error } => {
                    if let Err(e) = spool.set_upstream_error(error.as_deref(), wall_now_ms()) {
                        tracing::warn!(error = %e, "Could not record upstream state in the spool");
                    }
                }
                Cmd::Stats { reply } => {
                    let _ = reply.send(spool.stats());
                }
                Cmd::DeadLetters { limit, reply } => {
                    let _ = reply.send(spool.dead_letters(limit));
                }
                Cmd::HeadChunk { reply } => {
                    let _ = reply.send(spool.head_chunk().map_err(SpoolError::from));
                }
            }
            if spool.take_acks_lost() {
                offer.rewind.store(true, Ordering::Release);
                // Wake a forwarder that waits for commits: it has events to send again.
                committed_tx.send_modify(|_| {});
            }
        }
        flush(&mut spool);
        tracing::debug!("Spool thread finished");
    })?;
    Ok((
        SpoolHandle {
            tx,
            committed,
            handoff,
        },
        join,
    ))
}

/// The outcome of a commit nobody waits for (the ingest stage's groups): counted and logged
/// here, once per change of state.
fn report_detached(
    spool: &Spool,
    result: &Result<AppendResult, SpoolError>,
    n: u64,
    refusing: &mut bool,
) {
    let metrics = &spool.metrics;
    match result {
        Ok(_) => {
            if std::mem::take(refusing) {
                metrics.spool_disk_full.set(0);
                tracing::info!("Spool is accepting events again");
            }
        }
        Err(SpoolError::Full { max_bytes }) => {
            if !std::mem::replace(refusing, true) {
                tracing::error!(max_bytes, "Spool full with when_full = \"reject\": new reads are dropped until the upstream drains it");
            }
        }
        Err(SpoolError::DiskFull) => {
            metrics.count_drop("disk_full", n);
            metrics.spool_disk_full.set(1);
            if !std::mem::replace(refusing, true) {
                tracing::error!(
                    events = n,
                    "Disk full: reads are dropped until space is freed"
                );
            }
        }
        Err(e) => {
            metrics.count_drop("spool_error", n);
            tracing::error!(error = %e, events = n, "Spool commit failed; reads dropped");
        }
    }
}

impl SpoolHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, HandleError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| HandleError::Closed)?;
        Ok(rx.await.map_err(|_| HandleError::Closed)??)
    }

    /// Commit a group; resolves once it is durable (or refused).
    pub async fn append(&self, bodies: Vec<EventBody>) -> Result<AppendResult, HandleError> {
        self.call(|reply| Cmd::Append {
            bodies,
            marks: Vec::new(),
            pass_rows: Vec::new(),
            reply: Some(reply),
        })
        .await
    }

    /// Queue a group for commit without waiting for it; the spool thread counts and logs the
    /// outcome (refused for a full spool or disk: `scangate_dropped_total`, one log line per
    /// change of state). Waits only while the command queue is full.
    pub async fn append_detached(
        &self,
        bodies: Vec<EventBody>,
        marks: Vec<(Arc<str>, u64)>,
        pass_rows: Vec<(Vec<u8>, bool)>,
    ) -> Result<(), HandleError> {
        self.tx
            .send(Cmd::Append {
                bodies,
                marks,
                pass_rows,
                reply: None,
            })
            .await
            .map_err(|_| HandleError::Closed)
    }

    pub async fn read_after(
        &self,
        after: Option<Loc>,
        min_chunk: i64,
        max: usize,
    ) -> Result<Vec<SpooledEvent>, HandleError> {
        self.read_after_head(after, min_chunk, max)
            .await
            .map(|(v, _)| v)
    }

    /// [`SpoolHandle::read_after`], also returning the id of the newest committed chunk at the
    /// time of the read: when fewer than `max` events come back, everything up to that chunk
    /// has been read.
    pub async fn read_after_head(
        &self,
        after: Option<Loc>,
        min_chunk: i64,
        max: usize,
    ) -> Result<(Vec<SpooledEvent>, i64), HandleError> {
        self.call(|reply| Cmd::Read {
            after,
            min_chunk,
            max,
            reply,
        })
        .await
    }

    /// Tell the spool thread which events the caller needs next: `Some(loc)` when it has read
    /// everything before `loc` (then fresh commits from there on are handed over), `None` when
    /// it is behind. Queued chunks before `loc` are dropped.
    pub fn want_fresh(&self, next: Option<Loc>) {
        let handoff = &self.handoff;
        let mut queue = handoff.queue.lock().unwrap_or_else(|p| p.into_inner());
        let Some(next) = next else {
            handoff.give_up(&mut queue);
            return;
        };
        while queue.front().is_some_and(|e| e.loc < next) {
            queue.pop_front();
        }
        if queue.is_empty() {
            let chunk = if next.idx == 0 { next.chunk } else { -1 };
            handoff.wants_chunk.store(chunk, Ordering::Release);
        }
    }

    /// Take up to `room` handed-over events if they start exactly at `next`, across queued
    /// chunks. Returns them and the position that follows the last one taken.
    pub fn take_fresh(&self, next: Loc, room: usize) -> Option<(Vec<SpooledEvent>, Loc)> {
        let handoff = &self.handoff;
        let mut queue = handoff.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.front()?.loc != next || room == 0 {
            return None;
        }
        let n = room.min(queue.len());
        let out: Vec<SpooledEvent> = queue.drain(..n).collect();
        let after = match queue.front() {
            Some(e) => e.loc,
            None => {
                // Everything handed over so far is taken (whole chunks are queued, so the last
                // one taken ends its chunk): the next commit follows it.
                let chunk = out.last().map_or(next.chunk, |e| e.loc.chunk) + 1;
                handoff.wants_chunk.store(chunk, Ordering::Release);
                if queue.capacity() > 4 * HANDOFF_KEEP {
                    queue.shrink_to(HANDOFF_KEEP);
                }
                Loc { chunk, idx: 0 }
            }
        };
        Some((out, after))
    }

    /// Acknowledge delivered events. Returns once the spool thread's queue has taken the
    /// acknowledgement, without a reply: the thread writes it with its next commit (see
    /// [`Spool::ack_later`]), so a caller gains nothing by waiting, and a reply would cost the
    /// forwarder a wake-up per batch.
    pub async fn ack(&self, locs: Vec<Loc>) -> Result<(), HandleError> {
        self.tx
            .send(Cmd::Ack { locs })
            .await
            .map_err(|_| HandleError::Closed)
    }

    pub async fn dead_letter(
        &self,
        items: Vec<(SpooledEvent, Option<u16>, String)>,
    ) -> Result<(), HandleError> {
        self.call(|reply| Cmd::DeadLetter { items, reply }).await
    }

    pub async fn set_upstream_error(&self, error: Option<String>) {
        let _ = self.tx.send(Cmd::UpstreamError { error }).await;
    }

    pub async fn stats(&self) -> Result<Stats, HandleError> {
        self.call(|reply| Cmd::Stats { reply }).await
    }

    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, HandleError> {
        self.call(|reply| Cmd::DeadLetters { limit, reply }).await
    }

    pub async fn head_chunk(&self) -> Result<i64, HandleError> {
        self.call(|reply| Cmd::HeadChunk { reply }).await
    }

    /// True once after the spool thread could not write acknowledgements: the caller must read
    /// from the start of the spool again (the events are still there; see [`Handoff`]).
    pub fn take_rewind(&self) -> bool {
        self.handoff.rewind.swap(false, Ordering::AcqRel)
    }

    /// A receiver that changes whenever a chunk is committed (value: its id).
    pub fn committed(&self) -> watch::Receiver<i64> {
        self.committed.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ReadKind;

    fn chunk(id: i64, n: u32) -> Vec<SpooledEvent> {
        (0..n)
            .map(|idx| SpooledEvent {
                loc: Loc { chunk: id, idx },
                seq: 0,
                committed_ms: 0,
                event_id: uuid::Uuid::nil(),
                boot_id: uuid::Uuid::nil(),
                body: EventBody {
                    kind: ReadKind::Barcode,
                    tag: format!("{id}-{idx}"),
                    source: "s".into(),
                    location: "l".into(),
                    device: "d".into(),
                    scan_type: None,
                    antenna: None,
                    rssi_cdbm: None,
                    read_count: 1,
                    first_seen_ms: 0,
                    last_seen_ms: 0,
                    symbology: None,
                    value: None,
                    clock: Default::default(),
                },
            })
            .collect()
    }

    fn handle() -> SpoolHandle {
        let (tx, _rx) = mpsc::channel(1);
        let (_w, committed) = watch::channel(0);
        SpoolHandle {
            tx,
            committed,
            handoff: Arc::new(Handoff {
                wants_chunk: AtomicI64::new(-1),
                ..Default::default()
            }),
        }
    }

    fn locs(v: &[SpooledEvent]) -> Vec<(i64, u32)> {
        v.iter().map(|e| (e.loc.chunk, e.loc.idx)).collect()
    }

    #[test]
    fn consecutive_chunks_are_taken_across_chunk_boundaries() {
        let h = handle();
        // Behind: nothing is queued.
        h.handoff.offer(chunk(1, 3));
        assert!(h.take_fresh(Loc { chunk: 1, idx: 0 }, 10).is_none());
        h.want_fresh(Some(Loc { chunk: 2, idx: 0 }));
        h.handoff.offer(chunk(2, 3));
        h.handoff.offer(chunk(3, 4));
        // Not where the forwarder is: refused, queue kept.
        assert!(h.take_fresh(Loc { chunk: 2, idx: 1 }, 10).is_none());
        let (got, after) = h.take_fresh(Loc { chunk: 2, idx: 0 }, 5).unwrap();
        assert_eq!(locs(&got), [(2, 0), (2, 1), (2, 2), (3, 0), (3, 1)]);
        assert_eq!(after, Loc { chunk: 3, idx: 2 });
        // A new commit while part of chunk 3 is still queued joins the queue.
        h.handoff.offer(chunk(4, 1));
        let (got, after) = h.take_fresh(after, 10).unwrap();
        assert_eq!(locs(&got), [(3, 2), (3, 3), (4, 0)]);
        assert_eq!(after, Loc { chunk: 5, idx: 0 });
        // Queue empty: the next commit follows the last one taken.
        h.handoff.offer(chunk(5, 2));
        let (got, _) = h.take_fresh(after, 10).unwrap();
        assert_eq!(locs(&got), [(5, 0), (5, 1)]);
    }

    #[test]
    fn a_gap_or_an_overflow_empties_the_queue_until_the_forwarder_catches_up() {
        let h = handle();
        h.want_fresh(Some(Loc { chunk: 1, idx: 0 }));
        h.handoff.offer(chunk(1, 2));
        h.handoff.offer(chunk(3, 2)); // chunk 2 missing
        assert!(h.take_fresh(Loc { chunk: 1, idx: 0 }, 10).is_none());
        h.handoff.offer(chunk(4, 2)); // still behind: not queued
        assert!(h.take_fresh(Loc { chunk: 4, idx: 0 }, 10).is_none());

        // Caught up again (read back to chunk 4), then more than the bound is committed.
        h.want_fresh(Some(Loc { chunk: 5, idx: 0 }));
        h.handoff.offer(chunk(5, HANDOFF_MAX_EVENTS as u32 - 1));
        h.handoff.offer(chunk(6, 2));
        assert!(h.take_fresh(Loc { chunk: 5, idx: 0 }, 10).is_none());

        // Stale queued chunks are dropped when the forwarder says where it is.
        h.want_fresh(Some(Loc { chunk: 7, idx: 0 }));
        h.handoff.offer(chunk(7, 1));
        h.handoff.offer(chunk(8, 1));
        h.want_fresh(Some(Loc { chunk: 8, idx: 0 }));
        let (got, _) = h.take_fresh(Loc { chunk: 8, idx: 0 }, 10).unwrap();
        assert_eq!(locs(&got), [(8, 0)]);
        // Asked before the events are built: only a chunk that follows, within the bound.
        assert!(!h.handoff.accepts(10, 1), "chunk 9 is next");
        h.want_fresh(Some(Loc { chunk: 9, idx: 0 }));
        assert!(h.handoff.accepts(9, 1));
        assert!(!h.handoff.accepts(9, HANDOFF_MAX_EVENTS + 1));
        assert!(
            !h.handoff.accepts(9, 1),
            "an overflow gives up until the forwarder catches up"
        );
        h.want_fresh(Some(Loc { chunk: 9, idx: 0 }));
        // Behind: the queue is emptied at once.
        h.handoff.offer(chunk(9, 1));
        h.want_fresh(None);
        assert!(h.take_fresh(Loc { chunk: 9, idx: 0 }, 10).is_none());
    }
}
