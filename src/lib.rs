//! # scangate — architecture
//!
//! An edge gateway daemon: raw reader frames in, clean durable de-duplicated events out to a
//! central ingest API.
//!
//! ```text
//!  sources ──reads──► ingest (group commit) ──groups──► spool thread ◄──► forwarder ──HTTP──► upstream
//!                                                                                  └─Redis (XADD)─► stream
//!  serial, replay     suppression stage:      SQLite    (one owner)    batches, gzip, clock,
//!  (+ decoder each)   passes, zones, floor;   events +                 outcome → ack / dead letter
//!                     pass log, timer         pass log
//! ```
//!
//! ## Tasks and channels
//! | stage | runs as | input | capacity | when full |
//! |---|---|---|---|---|
//! | source (serial) | one OS thread per port (reads paced by the device's rate, each straight into the port's journal) | the port | kernel tty buffer (4 KiB + the driver's) | must never happen: the thread never waits on the pipeline; while the read channel is full it holds reads up to [`source::serial::HOLD_MAX`] bytes (then drops, counted `pipeline_full`) |
//! | source (replay) | tokio task per file | the file | — | waits (a file can be paused) |
//! | ingest | one tokio task, woken per group, not per read | read channel | [`app::READ_CHANNEL`] = 8192 reads | serial threads hold their reads; replay waits |
//! | spool | one OS thread (blocking SQLite) | command channel | [`spool::actor::COMMAND_CAPACITY`] = 4 commands | ingest waits; its read channel absorbs the burst |
//! | forwarder | one tokio task | the spool (pull), or just-committed chunks handed over when caught up ([`spool::actor::Handoff`], consecutive chunks, ≤ 8,192 events queued; beyond that it reads back) | the batch being filled, and up to `max_in_flight` (≤ 64) batches sent and not yet settled, each ≤ 1000 events with its compressed body | — |
//! | admin | axum on loopback | HTTP | — | — |
//!
//! The async runtime has one worker: the async stages are light, and the heavy work (ports,
//! SQLite) has threads of its own.
//!
//! ## Invariants
//! - An event is *accepted* when its spool transaction commits (fsync with `sync = "full"`).
//!   From then on only a 2xx/207 outcome, a dead letter, or a counted `drop_oldest` eviction
//!   removes it (`spool` docs).
//! - A process crash loses nothing read from a port: each read lands in the port's journal
//!   (a mapped file in the page cache) by `read(2)` itself; the spool commits each source's
//!   journal position with the events; the uncommitted tail is decoded again at start
//!   ([`source::journal`]).
//! - `seq` never repeats for a gateway, even after a corrupt spool is moved aside: the salt
//!   and a seq reservation live in `spool.id` beside the spool. A moved-aside file is reported
//!   (`/health`, `status`) until `scangate spool salvage` re-sends its events.
//! - Dead letters have their own bound (`dead_letter_max_bytes`) and never count against the
//!   backlog's `max_bytes`. A spool locked by another process is retried, never a dropped
//!   group.
//! - An acknowledgement is taken at once and written with the next commit's transaction, or
//!   on its own after [`spool::actor::ACK_DELAY`] when no commit comes, and before the spool
//!   thread ends. One lost to a crash only means its events are sent again with the same ids;
//!   one that cannot be written makes the forwarder read the spool from its start again.
//! - `seq` and `event_id` (UUIDv7) are fixed at commit; retries and replays resend the same ids
//!   (`event` docs).
//! - With several batches in flight, the spool is acknowledged in commit order (`fifo`: never
//!   past an earlier batch not yet settled; see `forward` and the README's "Order").
//! - Memory is bounded: channels are bounded, the forwarder holds at most `max_in_flight`
//!   batches besides the one it fills, the spool decodes
//!   one chunk at a time; the backlog lives only on disk. In bytes, while the spool cannot
//!   commit (locked, or slower than the input), reads wait in: each serial thread's hold
//!   ([`source::serial::HOLD_MAX`], 2 MiB), the read channel ([`source::CHANNEL_MAX_BYTES`],
//!   1 MiB, besides its 8,192 reads), the ingest group ([`app::GROUP_MAX_BYTES`], 1 MiB) and
//!   the spool's command queue (4 groups): under 10 MB whatever the size of the reads.
//! - Bad input never stops the daemon: decoders skip and count; a corrupt spool is moved aside;
//!   a full disk refuses new events (counted) and recovers by itself.
//! - Shutdown cancels the sources only; each later stage ends when its input closes
//!   ([`app`] docs), within a grace period. Open passes stay open in the pass log and go on
//!   at the next start; when every source ended by itself (replays) they are emitted.
//! - One event per pass: the open passes' state is committed in the same transaction as the
//!   events of ended passes and the ports' journal positions, so a crash neither loses,
//!   repeats, splits nor miscounts a pass ([`suppress::stage`]). Open passes are bounded by
//!   `max_tracked` (the longest idle is emitted early).
//! - Reads are stamped on `CLOCK_BOOTTIME`; events read while the wall clock was unsynced are
//!   held and re-based once it syncs; no 1970 timestamp is sent ([`clock`]).
//!
//! ## Modules
//! - [`config`]: TOML → validated [`config::Config`], every error with line and column.
//! - [`event`]: reads, event bodies, ids. [`clock`]: wall and boot time, re-basing.
//! - [`suppress`]: passes and zone arbitration ([`suppress::Suppressor`]) and the pipeline
//!   stage around it with its durable pass log ([`suppress::stage`]).
//! - [`protocol`]: one decoder per reader protocol.
//! - [`source`]: serial and replay sources, port journals, capture format.
//! - [`spool`]: SQLite spool (chunks, acks, dead letters) and its owner thread.
//! - [`forward`]: batching, wire profiles, compression, response handling, backoff; the
//!   Redis Streams sink ([`forward::redis`]: one idempotent script call per batch).
//! - [`app`]: wiring and the shutdown sequence. [`admin`]: local HTTP. [`service`]: systemd,
//!   logging, signals. [`demo`]: the no-hardware demonstration.

#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod app;
pub mod clock;
pub mod config;
pub mod demo;
pub mod event;
pub mod forward;
pub mod metrics;
pub mod protocol;
pub mod reload;
pub mod service;
pub mod sniff;
pub mod source;
pub mod spool;
pub mod suppress;
