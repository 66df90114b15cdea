//! The spool: a durable, bounded queue of committed events in one SQLite file.
//!
//! Owns: the file (`<state_dir>/spool.db`), its schema and migrations, group commits, seq and
//! event-id assignment, acknowledgement, dead letters, the size bound and integrity recovery.
//! Does not own: when to commit (the pipeline's group timer) or what to send (the forwarder).
//!
//! Layout (schema version 1):
//! - `chunks`: one row per group commit; `data` is a zstd-compressed postcard list of events.
//!   One row per *event* costs ~690 bytes of disk writes per event (insert, checkpoint and
//!   delete each rewrite pages); one row per commit costs a few tens of bytes.
//! - `chunk_done`: a bitmap per partially delivered chunk. It lives in its own table because
//!   updating the chunk row itself would rewrite its whole overflow chain. A chunk (and its
//!   bitmap) is deleted when every event in it is delivered or dead-lettered.
//! - `dead_letters`: one row per event the upstream refused for good, with status and reason.
//! - `meta`: salt (for event ids), next seq, upstream state for `scangate status`, and the
//!   committed position of each serial port's journal (`journal:<source>`, written in the
//!   same transaction as the events read from it).
//! - Beside the file, `spool.id`: the salt and a reservation of seqs ([`Identity`]), so that a
//!   fresh spool after a quarantine keeps both.
//!
//! Bounds: the backlog (chunks) by `max_bytes` with `when_full`; dead letters by their own
//! `dead_letter_max_bytes` (oldest deleted, counted). A write lock held by another process is
//! waited out (retried, one WARN, one INFO), never a dropped group.
//!
//! Invariants:
//! - An event is *accepted* when `append` returns Ok: its transaction is committed (with
//!   `sync = full`, the WAL is fsynced). Only `ack`, `dead_letter` (which moves it) and the
//!   `drop_oldest` eviction (counted) remove it.
//! - Reads never load more than the requested batch plus one decoded chunk into memory.
//! - A chunk that cannot be decoded is moved whole into `dead_letters` (raw bytes kept).

pub mod actor;
pub mod chunk;

use crate::config::{SyncMode, WhenFull};
use crate::event::{event_id, EventBody, Loc, SpooledEvent};
use crate::metrics::Metrics;
use chunk::{ChunkData, Record};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use uuid::Uuid;

const SCHEMA_VERSION: i64 = 2;
/// Size of `spool.reserve`, a preallocated file released when the disk is full so that
/// acknowledgements, evictions and dead-lettering (which must write WAL frames to free space)
/// still work. Appends never use it: the reserve exists to get data *out* of a full spool.
pub const RESERVE_BYTES: usize = 512 * 1024;
/// Small pages: every commit rewrites a few non-overflow pages (table leaf, meta), so their
/// size is paid per commit; blobs use overflow pages either way.
const PAGE_SIZE: u32 = 1024;
/// A write-ahead log larger than this means checkpoints are blocked (normally it is truncated
/// to 4 MiB, `journal_size_limit`, after each one).
pub const WAL_NORMAL: u64 = 8 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// Bound of the live backlog (chunks), in bytes of the file. Dead letters are not counted
    /// here: they have their own bound.
    pub max_bytes: u64,
    pub when_full: WhenFull,
    pub sync: SyncMode,
    /// Bound of the dead letters, in bytes (bodies and reasons). Beyond it the oldest dead
    /// letters are deleted (counted `scangate_dead_letters_evicted_total`, logged).
    pub dead_letter_max_bytes: u64,
    /// The gateway id, mixed into every event id: two gateways made from one SD card image (a
    /// copied state directory) never share ids as long as their gateway ids differ.
    pub gateway_id: String,
    /// The clock whose offset (wall − boot time) is recorded per boot, so events stamped on
    /// boot time while the wall clock was unsynced can be re-based (`crate::clock`).
    pub clock: Arc<dyn crate::clock::Clock>,
    /// Set when a commit carrying pass-log rows failed: the suppression stage then writes a
    /// snapshot next (`crate::suppress::stage`).
    pub pass_log_lost: Arc<std::sync::atomic::AtomicBool>,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            max_bytes: 512 * 1024 * 1024,
            when_full: WhenFull::DropOldest,
            sync: SyncMode::Full,
            dead_letter_max_bytes: 64 * 1024 * 1024,
            gateway_id: String::new(),
            clock: Arc::new(crate::clock::SystemClock),
            pass_log_lost: Arc::default(),
        }
    }
}

impl SpoolOptions {
    /// The spool options of a validated config.
    pub fn of(cfg: &crate::config::Config) -> Self {
        SpoolOptions {
            max_bytes: cfg.spool.max_bytes,
            when_full: cfg.spool.when_full,
            sync: cfg.spool.sync,
            dead_letter_max_bytes: cfg.spool.dead_letter_max_bytes,
            gateway_id: cfg.gateway.id.clone(),
            ..SpoolOptions::default()
        }
    }
}

/// The spool's identity, kept beside it in `spool.id` so that it outlives a spool file that
/// had to be moved aside: the salt of its event ids, and a reservation of seq numbers (the
/// spool never commits a seq at or above `seq_reserved` without first moving the reservation
/// on, so a fresh spool started after a quarantine continues above every seq ever used, even
/// when the damaged file's header cannot be read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub salt: u64,
    pub seq_reserved: u64,
}

/// Seqs reserved at once in `spool.id`: one small fsynced write per this many events.
pub const SEQ_BLOCK: u64 = 1 << 20;

impl Identity {
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("spool.id")
    }

    /// The identity file, or None when it is missing or unreadable.
    pub fn load(state_dir: &Path) -> Option<Identity> {
        let text = std::fs::read_to_string(Self::path_in(state_dir)).ok()?;
        let mut salt = None;
        let mut seq = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("salt", v)) => salt = v.trim().parse::<u64>().ok(),
                Some(("seq_reserved", v)) => seq = v.trim().parse::<u64>().ok(),
                _ => {}
            }
        }
        Some(Identity {
            salt: salt?,
            seq_reserved: seq?,
        })
    }

    /// Write it atomically and durably (temporary file, fsync, rename, fsync of the directory).
    pub fn store(&self, state_dir: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = state_dir.join("spool.id.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            write!(
                f,
                "# scangate spool identity: do not copy to another gateway\nsalt={}\nseq_reserved={}\n",
                self.salt, self.seq_reserved
            )?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, Self::path_in(state_dir))?;
        std::fs::File::open(state_dir)?.sync_all()
    }
}

/// The salt event ids are made with: the spool's own salt, keyed by the gateway id.
pub fn id_salt(salt: u64, gateway_id: &str) -> u64 {
    if gateway_id.is_empty() {
        salt
    } else {
        salt ^ xxhash_rust::xxh3::xxh3_64(gateway_id.as_bytes())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot use state directory {path}: {source} (it must exist or be creatable, and be writable by the scangate user)")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot open spool {path}: {source} (is state_dir writable and on a local filesystem?)"
    )]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("another scangate (or `scangate spool` command) is using {path}; stop it first (the lock is {path}/spool.lock)")]
    Locked { path: PathBuf },
    #[error("{0}")]
    Other(String),
    #[error("spool is full (max_bytes = {max_bytes}) and when_full = \"reject\"")]
    Full { max_bytes: u64 },
    #[error("the disk holding the spool is full; new events are refused until space is freed")]
    DiskFull,
    #[error("spool is read-only: {0}")]
    ReadOnly(rusqlite::Error),
    #[error("spool database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot encode events: {0}")]
    Encode(#[from] postcard::Error),
}

/// What happened when the spool was opened.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// A corrupt file was found and moved here; a fresh spool was created.
    pub moved_aside: Option<(PathBuf, String)>,
    pub created: bool,
    pub backlog: u64,
    /// Moved-aside files not yet salvaged (see [`quarantined`]).
    pub quarantined: Vec<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub backlog: u64,
    pub chunks: u64,
    pub oldest_committed_ms: Option<i64>,
    pub dead_letters: u64,
    pub next_seq: u64,
    pub used_bytes: u64,
    pub file_bytes: u64,
    pub last_delivery_ms: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<i64>,
    pub corrupt_incidents: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub id: i64,
    pub seq: u64,
    pub event_id: String,
    pub committed_ms: i64,
    pub failed_ms: i64,
    pub status: Option<u16>,
    pub reason: String,
    /// None for a corrupt chunk (its raw bytes are kept in `raw`).
    pub body: Option<EventBody>,
    pub raw: Vec<u8>,
}

/// What `scangate spool salvage` recovered from a moved-aside file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SalvageReport {
    /// Undelivered events queued again.
    pub events: u64,
    /// Events the old file already had as delivered (not re-sent).
    pub already_delivered: u64,
    pub dead_letters: u64,
    /// Rows or chunks that could not be read (damaged pages).
    pub unreadable_rows: u64,
    /// The old file's salt is this spool's: the events keep their original event ids.
    pub same_ids: bool,
}

/// Run `f` (a command that opens the spool, such as `status` or `spool requeue`) so that it
/// leaves no file in `state_dir` the daemon cannot use: when run as root, every file it
/// created there (SQLite's `-wal`/`-shm`, the lock, the reserve) is given to the owner of the
/// state directory (the daemon's user). Files that existed before keep their owner.
pub fn keeping_owner<T>(state_dir: &Path, f: impl FnOnce() -> T) -> T {
    use std::os::unix::fs::MetadataExt;
    let list = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let owner = std::fs::metadata(state_dir)
        .ok()
        .map(|m| (m.uid(), m.gid()));
    let before = list(state_dir);
    let out = f();
    if let (true, Some((uid, gid))) = (root, owner) {
        if uid != 0 {
            for p in list(state_dir) {
                if !before.contains(&p) {
                    if let Err(e) = std::os::unix::fs::chown(&p, Some(uid), Some(gid)) {
                        tracing::warn!(path = %p.display(), error = %e, "Cannot give a new state file to the state directory's owner");
                    }
                }
            }
        }
    }
    out
}

/// Spool files moved aside as corrupt and not yet salvaged (`spool.db.corrupt-*`).
pub fn quarantined(state_dir: &Path) -> Vec<PathBuf> {
    // `spool.db.corrupt-<time>`; its `-wal`/`-shm` and the `.salvaged` ones do not count.
    let mut out: Vec<PathBuf> = std::fs::read_dir(state_dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        n.starts_with("spool.db.corrupt-")
                            && !n.ends_with("-wal")
                            && !n.ends_with("-shm")
                            && !n.contains(".salvaged")
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

pub struct AppendResult {
    pub first_seq: u64,
    pub count: usize,
    pub chunk: i64,
    /// Events evicted (drop_oldest) to make room for this commit.
    pub evicted: u64,
}

/// The chunk being read, decoded once. Records are moved out as they are read (no copy per
/// event); a read that starts before `next` decodes the chunk again.
struct DecodedChunk {
    id: i64,
    first_seq: u64,
    created_ms: i64,
    boot: Uuid,
    /// Records not yet read, starting at index `next`.
    records: std::vec::IntoIter<Record>,
    next: usize,
}

pub struct Spool {
    conn: Connection,
    path: PathBuf,
    state_dir: PathBuf,
    opts: SpoolOptions,
    /// The salts event ids are made with, by the first chunk id each applies to
    /// ([`id_salt`] of the stored salt and the gateway id at the time of the commit): a
    /// changed gateway id gives new events new ids and leaves committed events theirs.
    salts: Vec<(i64, u64)>,
    /// Chunks whose events keep a salt other than their epoch's (requeued dead letters and
    /// salvaged events keep the ids they were committed with): (chunk id, salt), `meta` keys
    /// `salt_chunk:<id>`.
    salt_overrides: Vec<(i64, u64)>,
    identity: Identity,
    /// Bytes held by dead letters (bodies, reasons and a row's overhead): counted against
    /// `dead_letter_max_bytes`, not against `max_bytes`.
    dl_bytes: u64,
    /// An acknowledgement could not be written and was dropped: the forwarder must read its
    /// events again (see [`Spool::take_acks_lost`]).
    acks_lost: bool,
    next_seq: u64,
    /// Chunk ids come from this counter, never from SQLite's rowid choice: SQLite reuses the
    /// id of a deleted newest row, and a reused id would hide a new chunk behind a reader's
    /// cursor.
    next_chunk: i64,
    boot_id: Uuid,
    /// Pass-log rows to write with the next commit (blob, snapshot).
    pass_rows: Vec<(Vec<u8>, bool)>,
    /// This boot's clock offset is in `meta`.
    offset_recorded: bool,
    page_size: u64,
    used_bytes: u64,
    /// Size of the write-ahead log file (`spool.db-wal`) at the last measure.
    wal_bytes: u64,
    cache: Option<DecodedChunk>,
    codec: chunk::Codec,
    metrics: Arc<Metrics>,
    reserve: PathBuf,
    /// Held for the spool's lifetime: one process per state directory.
    _lock: std::fs::File,
    /// Commits since the reserve was released (it is recreated every so often, not per commit).
    reserve_missing_commits: Option<u32>,
    /// An acknowledgement relaxed `synchronous` and could not set it back: appends set it
    /// back before they commit (they never commit without their fsync).
    relaxed_sync: bool,
    /// When `last_delivery_ms` was last written (see [`Spool::ack`]).
    delivery_noted_ms: i64,
    /// Acknowledgements taken by [`Spool::ack_later`] and not yet written: the next append
    /// writes them in its own transaction, or [`Spool::flush_acks`] on their own.
    acks: Vec<Loc>,
    /// The latest of `acks` (None when there are none): a read after it cannot return them.
    acks_max: Option<Loc>,
}

fn is_code(e: &rusqlite::Error, code: ErrorCode) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == code)
}

fn classify(e: rusqlite::Error) -> SpoolError {
    if is_code(&e, ErrorCode::DiskFull) {
        SpoolError::DiskFull
    } else if is_code(&e, ErrorCode::ReadOnly) || is_code(&e, ErrorCode::CannotOpen) {
        SpoolError::ReadOnly(e)
    } else {
        SpoolError::Sqlite(e)
    }
}

/// The id salts of a spool (`meta` keys `salt_from:<first chunk>`), adding one from
/// `next_chunk` on when the gateway id (hence the salt) changed. A spool written before salts
/// were keyed by the gateway id keeps its plain salt for the chunks it already has.
fn salt_epochs(
    conn: &Connection,
    salt: u64,
    gateway_id: &str,
    next_chunk: i64,
    created: bool,
) -> rusqlite::Result<Vec<(i64, u64)>> {
    let mut epochs = read_salt_epochs(conn)?;
    let want = id_salt(salt, gateway_id);
    let mut add = Vec::new();
    if epochs.is_empty() && !created && next_chunk > 1 {
        add.push((0, salt));
    }
    if epochs.last().or(add.last()).map(|e| e.1) != Some(want) {
        add.push((
            if epochs.is_empty() && add.is_empty() {
                0
            } else {
                next_chunk
            },
            want,
        ));
    }
    if !add.is_empty() {
        let tx = conn.unchecked_transaction()?;
        for (from, s) in &add {
            meta_set(&tx, &format!("salt_from:{from}"), *s as i64)?;
        }
        tx.commit()?;
        epochs.extend(add);
    }
    Ok(epochs)
}

/// The salt of chunk `chunk` among `epochs` (first chunk id, salt), sorted.
fn epoch_salt(epochs: &[(i64, u64)], chunk: i64) -> Option<u64> {
    epochs
        .iter()
        .rev()
        .find(|(from, _)| *from <= chunk)
        .or(epochs.first())
        .map(|e| e.1)
}

/// The salt epochs stored in a spool (`meta` keys `salt_from:<first chunk>`), in order.
fn read_salt_epochs(conn: &Connection) -> rusqlite::Result<Vec<(i64, u64)>> {
    let mut q = conn.prepare("SELECT key, value FROM meta WHERE key LIKE 'salt_from:%'")?;
    let rows = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut epochs = Vec::new();
    for row in rows {
        let (k, v) = row?;
        if let Some(from) = k
            .strip_prefix("salt_from:")
            .and_then(|f| f.parse::<i64>().ok())
        {
            epochs.push((from, v as u64));
        }
    }
    epochs.sort_unstable();
    Ok(epochs)
}

/// Move a SQLite file with its `-wal` and `-shm` files, when they exist.
fn move_with_sidecars(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    for ext in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{ext}", from.display()));
        if side.exists() {
            let _ = std::fs::rename(&side, format!("{}{ext}", to.display()));
        }
    }
    Ok(())
}

/// The per-chunk salts (`meta` keys `salt_chunk:<id>`) of chunks that still exist; those of
/// chunks gone (delivered) are deleted.
fn salt_overrides_of(conn: &Connection) -> rusqlite::Result<Vec<(i64, u64)>> {
    conn.execute(
        "DELETE FROM meta WHERE key LIKE 'salt_chunk:%' AND CAST(substr(key, 12) AS INTEGER) NOT IN (SELECT id FROM chunks)",
        [],
    )?;
    let mut q = conn.prepare("SELECT key, value FROM meta WHERE key LIKE 'salt_chunk:%'")?;
    let rows = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (k, v) = row?;
        if let Some(id) = k.strip_prefix("salt_chunk:").and_then(|i| i.parse().ok()) {
            out.push((id, v as u64));
        }
    }
    Ok(out)
}

/// Another connection holds the lock the write needs.
fn is_busy(e: &SpoolError) -> bool {
    matches!(e, SpoolError::Sqlite(e) if is_code(e, ErrorCode::DatabaseBusy) || is_code(e, ErrorCode::DatabaseLocked))
}

/// Bytes the dead letters hold, as counted against `dead_letter_max_bytes`.
const DL_BYTES_SQL: &str =
    "SELECT COALESCE(SUM(length(body) + length(reason) + 64), 0) FROM dead_letters";

fn meta_get<T: rusqlite::types::FromSql>(
    conn: &Connection,
    key: &str,
) -> rusqlite::Result<Option<T>> {
    conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
        .optional()
}

fn meta_set(conn: &Connection, key: &str, value: impl rusqlite::ToSql) -> rusqlite::Result<()> {
    conn.prepare_cached("INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")?.execute(params![key, value])?;
    Ok(())
}

enum Check {
    Healthy,
    /// Not a database, or damaged: move it aside.
    Corrupt(String),
}

/// What every event of one chunk shares. [`ChunkBase::event`] is the one place a stored record
/// becomes a [`SpooledEvent`], for events read back and for events handed over at commit.
struct ChunkBase {
    salt: u64,
    chunk: i64,
    first_seq: u64,
    created_ms: i64,
    boot: Uuid,
}

impl ChunkBase {
    fn event(
        &self,
        idx: usize,
        seq_delta: i64,
        committed_delta: i64,
        body: EventBody,
    ) -> SpooledEvent {
        let seq = (self.first_seq as i64 + seq_delta) as u64;
        let committed_ms = self.created_ms + committed_delta;
        SpooledEvent {
            loc: Loc {
                chunk: self.chunk,
                idx: idx as u32,
            },
            seq,
            committed_ms,
            event_id: event_id(self.salt, seq, committed_ms),
            boot_id: self.boot,
            body,
        }
    }
}

/// Take the one-process-per-state-dir lock. A process that forked a moment ago (any
/// `Command::spawn` in this or a previous owner) holds a copy of the descriptor until its exec
/// closes it, so a refusal is retried for up to half a second before it means "another
/// scangate runs here".
fn take_lock(lock: &std::fs::File) -> bool {
    for _ in 0..50 {
        if lock.try_lock().is_ok() {
            return true;
        }
        #[allow(clippy::disallowed_methods)] // a bounded pause between lock attempts
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    false
}

/// Check an existing file. Only SQLite's own verdict (not a database, corrupt, or a failed
/// `quick_check`) counts as corruption; any other error (busy, permissions, I/O) is returned
/// so that a healthy spool is never moved aside by mistake.
fn check_existing(path: &Path) -> Result<Check, rusqlite::Error> {
    let corrupt = |e: &rusqlite::Error| {
        is_code(e, ErrorCode::NotADatabase) || is_code(e, ErrorCode::DatabaseCorrupt)
    };
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    match conn.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)) {
        Ok(res) if res == "ok" => Ok(Check::Healthy),
        Ok(res) => Ok(Check::Corrupt(format!("quick_check: {res}"))),
        Err(e) if corrupt(&e) => Ok(Check::Corrupt(e.to_string())),
        Err(e) => Err(e),
    }
}

impl Spool {
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("spool.db")
    }

    /// Open (or create) the spool in `state_dir`. A corrupt file is moved aside with a
    /// timestamp and a fresh spool is created; the report says so (the caller logs ERROR).
    pub fn open(
        state_dir: &Path,
        opts: SpoolOptions,
        metrics: Arc<Metrics>,
    ) -> Result<(Spool, OpenReport), SpoolError> {
        std::fs::create_dir_all(state_dir).map_err(|source| SpoolError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = Self::path_in(state_dir);
        let mut report = OpenReport::default();
        let mut carried_seq = None;
        let mut carried_salt: Option<u64> = None;
        let lock_path = state_dir.join("spool.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| SpoolError::StateDir {
                path: state_dir.to_path_buf(),
                source,
            })?;
        if !take_lock(&lock) {
            return Err(SpoolError::Locked {
                path: state_dir.to_path_buf(),
            });
        }
        if path.exists() {
            let verdict = check_existing(&path).map_err(|source| SpoolError::Open {
                path: path.clone(),
                source,
            })?;
            if let Check::Corrupt(reason) = verdict {
                // Best effort: learn the old seq so seq stays monotonic for this gateway.
                let old = Connection::open(&path).ok();
                carried_seq = old
                    .as_ref()
                    .and_then(|c| meta_get::<i64>(c, "next_seq").ok().flatten());
                carried_salt = old
                    .as_ref()
                    .and_then(|c| meta_get::<i64>(c, "salt").ok().flatten())
                    .map(|v| v as u64);
                drop(old);
                let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string()
                    .replace(':', "");
                let aside = path.with_file_name(format!("spool.db.corrupt-{stamp}"));
                move_with_sidecars(&path, &aside).map_err(|source| SpoolError::StateDir {
                    path: state_dir.to_path_buf(),
                    source,
                })?;
                metrics.spool_corrupt_incidents.inc();
                report.moved_aside = Some((aside, reason));
            }
        }
        let conn = Connection::open(&path).map_err(|source| SpoolError::Open {
            path: path.clone(),
            source,
        })?;
        // Every statement on the hot path is prepared once (`prepare_cached`).
        conn.set_prepared_statement_cache_capacity(48);
        let open_err = |source| SpoolError::Open {
            path: path.clone(),
            source,
        };
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update(None, "page_size", PAGE_SIZE)
            .map_err(open_err)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(SpoolError::Open {
                path: path.clone(),
                source: rusqlite::Error::InvalidQuery,
            });
        }
        let sync = match opts.sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(open_err)?;
        // Keep memory small and flat: the backlog is never cached wholesale.
        conn.pragma_update(None, "cache_size", -256)
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_size_limit", 4 * 1024 * 1024)
            .map_err(open_err)?;

        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(open_err)?;
        if version > SCHEMA_VERSION {
            return Err(SpoolError::Open { path: path.clone(), source: rusqlite::Error::InvalidParameterName(format!("schema version {version} is newer than this scangate understands ({SCHEMA_VERSION}); upgrade scangate")) });
        }
        let known = Identity::load(state_dir);
        if version == 1 {
            migrate_to_2(&conn).map_err(classify)?;
        }
        if version == 0 {
            report.created = true;
            migrate_to_1(&conn).map_err(classify)?;
            migrate_to_2(&conn).map_err(classify)?;
            // After a quarantine the fresh spool keeps the identity: the same salt (so
            // `spool salvage` re-sends the old events with their original ids) and seqs above
            // every one reserved before.
            let salt = carried_salt.or(known.map(|k| k.salt)).unwrap_or_else(|| {
                u64::from_le_bytes(Uuid::new_v4().as_bytes()[..8].try_into().unwrap_or([7; 8]))
            });
            let next = carried_seq
                .unwrap_or(1)
                .max(known.map_or(1, |k| k.seq_reserved as i64));
            let tx = conn.unchecked_transaction()?;
            meta_set(&tx, "salt", salt as i64)?;
            meta_set(&tx, "next_seq", next)?;
            meta_set(&tx, "created_ms", crate::event::wall_now_ms())?;
            if report.moved_aside.is_some() {
                meta_set(&tx, "corrupt_incidents", 1)?;
            }
            tx.commit().map_err(classify)?;
        }
        let salt = meta_get::<i64>(&conn, "salt")?.unwrap_or(0) as u64;
        let next_seq = meta_get::<i64>(&conn, "next_seq")?.unwrap_or(1) as u64;
        let identity = Identity {
            salt,
            seq_reserved: known
                .filter(|k| k.salt == salt)
                .map_or(0, |k| k.seq_reserved),
        };
        let dl_bytes: i64 = conn
            .prepare_cached(DL_BYTES_SQL)?
            .query_row([], |r| r.get(0))?;
        let page_size: i64 = conn
            .prepare_cached("PRAGMA page_size")?
            .query_row([], |r| r.get(0))?;
        let max_id: i64 = conn
            .prepare_cached("SELECT COALESCE(MAX(id), 0) FROM chunks")?
            .query_row([], |r| r.get(0))?;
        let next_chunk = meta_get::<i64>(&conn, "next_chunk")?
            .unwrap_or(1)
            .max(max_id + 1);
        let salts = salt_epochs(&conn, salt, &opts.gateway_id, next_chunk, report.created)
            .map_err(classify)?;
        let salt_overrides = salt_overrides_of(&conn).map_err(classify)?;
        let mut spool = Spool {
            conn,
            path,
            state_dir: state_dir.to_path_buf(),
            opts,
            salts,
            salt_overrides,
            identity,
            dl_bytes: dl_bytes.max(0) as u64,
            acks_lost: false,
            next_seq,
            next_chunk,
            boot_id: crate::event::boot_id(),
            page_size: page_size as u64,
            used_bytes: 0,
            wal_bytes: 0,
            cache: None,
            codec: chunk::Codec::default(),
            metrics,
            reserve: state_dir.join("spool.reserve"),
            _lock: lock,
            reserve_missing_commits: None,
            relaxed_sync: false,
            delivery_noted_ms: i64::MIN / 2,
            acks: Vec::new(),
            acks_max: None,
            pass_rows: Vec::new(),
            offset_recorded: false,
        };
        if !spool.make_reserve() {
            spool.reserve_missing_commits = Some(0);
        }
        // Reserve seqs (and record the salt) before the first commit.
        spool.reserve_seqs(spool.next_seq);
        spool.refresh_used()?;
        let aside = quarantined(state_dir);
        spool
            .metrics
            .spool_quarantined
            .set(u64::from(!aside.is_empty()));
        report.quarantined = aside;
        report.backlog = spool.backlog()?;
        spool.metrics.spool_backlog.set(report.backlog);
        Ok((spool, report))
    }

    /// Open an existing spool read-only, for `scangate status` / `spool stats` while the daemon runs.
    pub fn open_read_only(state_dir: &Path) -> Result<Connection, SpoolError> {
        let path = Self::path_in(state_dir);
        Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|source| SpoolError::Open { path, source })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Make sure every seq below `upto` is covered by the reservation in `spool.id`. A failure
    /// (a full or read-only disk) is logged, never fatal: it only weakens the guarantee that a
    /// fresh spool after a quarantine with an unreadable header continues above the old seqs.
    fn reserve_seqs(&mut self, upto: u64) {
        if upto < self.identity.seq_reserved {
            return;
        }
        let stored_salt = meta_get::<i64>(&self.conn, "salt")
            .ok()
            .flatten()
            .map_or(self.identity.salt, |v| v as u64);
        let next = Identity {
            salt: stored_salt,
            seq_reserved: upto.saturating_add(SEQ_BLOCK),
        };
        match next.store(&self.state_dir) {
            Ok(()) => self.identity = next,
            Err(e) => {
                tracing::error!(path = %Identity::path_in(&self.state_dir).display(), error = %e, "Cannot record the spool identity (salt and seq reservation)")
            }
        }
    }

    /// The salt of the events of chunk `chunk`.
    fn salt_for(&self, chunk: i64) -> u64 {
        if let Some((_, s)) = self.salt_overrides.iter().find(|(c, _)| *c == chunk) {
            return *s;
        }
        epoch_salt(&self.salts, chunk).unwrap_or(0)
    }

    /// The spool's identity (salt and seq reservation, as in `spool.id`).
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// True once after an acknowledgement was dropped because it could not be written: its
    /// events are still in the spool and must be read (and sent) again.
    pub fn take_acks_lost(&mut self) -> bool {
        std::mem::take(&mut self.acks_lost)
    }

    /// Create the reserve file if it is missing. False when the disk has no room for it.
    fn make_reserve(&self) -> bool {
        if std::fs::metadata(&self.reserve).is_ok_and(|m| m.len() >= RESERVE_BYTES as u64) {
            return true;
        }
        let res = (|| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&self.reserve)?;
            f.write_all(&vec![0u8; RESERVE_BYTES])?;
            f.sync_all()
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&self.reserve);
        }
        res.is_ok()
    }

    /// Release the reserve (disk full). True if there was one to release.
    fn release_reserve(&mut self) -> bool {
        if std::fs::remove_file(&self.reserve).is_ok() {
            tracing::warn!(path = %self.reserve.display(), "Disk full: released the spool's emergency reserve so deliveries can still be recorded");
            self.reserve_missing_commits = Some(0);
            true
        } else {
            false
        }
    }

    /// Run a write that frees space (ack, eviction, dead letter); on a full disk, release the
    /// reserve and try once more.
    fn freeing<T>(
        &mut self,
        mut f: impl FnMut(&mut Self) -> Result<T, SpoolError>,
    ) -> Result<T, SpoolError> {
        match f(self) {
            Err(SpoolError::DiskFull) if self.release_reserve() => f(self),
            other => other,
        }
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    fn refresh_used(&mut self) -> rusqlite::Result<()> {
        let pages: i64 = self
            .conn
            .prepare_cached("PRAGMA page_count")?
            .query_row([], |r| r.get(0))?;
        let free: i64 = self
            .conn
            .prepare_cached("PRAGMA freelist_count")?
            .query_row([], |r| r.get(0))?;
        self.used_bytes = (pages - free).max(0) as u64 * self.page_size;
        self.metrics.spool_used_bytes.set(self.used_bytes);
        self.measure_wal();
        Ok(())
    }

    /// The write-ahead log stays under ~4 MiB (`journal_size_limit`) while checkpoints
    /// complete. Another process holding a read transaction on the spool (an open `sqlite3`
    /// shell, a backup tool) blocks them and the log grows without bound: its size is a
    /// metric and a WARN (once, until it shrinks again), measured after every commit and at
    /// every stats request (so a quiet gateway clears it too).
    fn measure_wal(&mut self) {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        let mut bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
        if bytes > WAL_NORMAL && self.checkpoint_if_free() {
            bytes = std::fs::metadata(&wal).map_or(0, |m| m.len());
        }
        self.wal_bytes = bytes;
        self.metrics.spool_wal_bytes.set(bytes);
        let blocked = self.metrics.spool_wal_blocked.get() == 1;
        if bytes > WAL_NORMAL && !blocked {
            self.metrics.spool_wal_blocked.set(1);
            tracing::warn!(wal_bytes = bytes, path = %self.path.display(), "The spool's write-ahead log keeps growing: checkpoints cannot complete because another process holds a read transaction on the spool (an open sqlite3 shell or a backup tool?). Close it: the log uses disk that max_bytes does not bound");
        } else if bytes <= WAL_NORMAL / 2 && blocked {
            self.metrics.spool_wal_blocked.set(0);
            tracing::info!(
                wal_bytes = bytes,
                "The spool's write-ahead log is checkpointed again"
            );
        }
    }

    /// Checkpoint the whole write-ahead log and truncate it, if no other process holds it (a
    /// passive checkpoint that copies every frame proves that); never waits. True when done.
    fn checkpoint_if_free(&mut self) -> bool {
        let done = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })
            .is_ok_and(|(busy, log, copied)| busy == 0 && copied >= log);
        if !done {
            return false;
        }
        let _ = self.conn.busy_timeout(std::time::Duration::ZERO);
        let truncated = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
            .is_ok_and(|busy| busy == 0);
        let _ = self.conn.busy_timeout(std::time::Duration::from_secs(5));
        truncated
    }

    pub fn backlog(&self) -> rusqlite::Result<u64> {
        backlog_of(&self.conn)
    }

    /// Commit `bodies` as one chunk (one transaction). Ok means accepted (durable per `sync`).
    pub fn append(
        &mut self,
        bodies: Vec<EventBody>,
        now_ms: i64,
    ) -> Result<AppendResult, SpoolError> {
        self.append_inner(&bodies, now_ms, &[])
    }

    /// [`Spool::append`], also returning the committed events exactly as
    /// [`Spool::read_after`] would return them, so the caller can forward them without reading
    /// the chunk back. `keep(chunk, count)` is asked after the commit; when it says no, the
    /// events are not built (a forwarder that is behind reads them back later).
    pub fn append_events(
        &mut self,
        bodies: Vec<EventBody>,
        now_ms: i64,
        keep: impl FnOnce(i64, usize) -> bool,
    ) -> Result<(AppendResult, Option<Vec<SpooledEvent>>), SpoolError> {
        self.append_marked(bodies, now_ms, &[], keep)
    }

    /// [`Spool::append_events`], also recording in the same transaction how far each source's
    /// journal is committed (`marks`: source name, journal position after its last read in
    /// this group; see `source::journal`).
    pub fn append_marked(
        &mut self,
        bodies: Vec<EventBody>,
        now_ms: i64,
        marks: &[(Arc<str>, u64)],
        keep: impl FnOnce(i64, usize) -> bool,
    ) -> Result<(AppendResult, Option<Vec<SpooledEvent>>), SpoolError> {
        let r = self.append_inner(&bodies, now_ms, marks)?;
        if bodies.is_empty() || !keep(r.chunk, bodies.len()) {
            return Ok((r, None));
        }
        let base = ChunkBase {
            salt: self.salt_for(r.chunk),
            chunk: r.chunk,
            first_seq: r.first_seq,
            created_ms: now_ms,
            boot: self.boot_id,
        };
        let events = bodies
            .into_iter()
            .enumerate()
            .map(|(i, body)| base.event(i, i as i64, 0, body))
            .collect();
        Ok((r, Some(events)))
    }

    fn append_inner(
        &mut self,
        bodies: &[EventBody],
        now_ms: i64,
        marks: &[(Arc<str>, u64)],
    ) -> Result<AppendResult, SpoolError> {
        let count = bodies.len();
        let first_seq = self.next_seq;
        self.reserve_seqs(first_seq + count as u64);
        let blob = if count == 0 {
            Vec::new()
        } else {
            self.codec.encode_fresh(*self.boot_id.as_bytes(), bodies)?
        };
        let chunk = self.insert_chunk(
            first_seq,
            now_ms,
            &blob,
            count,
            first_seq + count as u64,
            &[],
            marks,
            None,
        )?;
        Ok(AppendResult {
            first_seq,
            count,
            chunk: chunk.0,
            evicted: chunk.1,
        })
    }

    /// Insert one chunk row (and advance next_seq / delete requeued dead letters) in one
    /// transaction, making room first per `when_full`. Returns (chunk id, events evicted).
    #[allow(clippy::too_many_arguments)]
    fn insert_chunk(
        &mut self,
        first_seq: u64,
        created_ms: i64,
        blob: &[u8],
        count: usize,
        next_seq: u64,
        requeued: &[i64],
        marks: &[(Arc<str>, u64)],
        salt: Option<u64>,
    ) -> Result<(i64, u64), SpoolError> {
        let need = blob.len() as u64 + 2 * self.page_size;
        let mut evicted = 0;
        if count > 0 && self.live_bytes() + need > self.opts.max_bytes {
            match self.opts.when_full {
                WhenFull::Reject => {
                    self.metrics.count_drop("spool_full", count as u64);
                    return Err(SpoolError::Full {
                        max_bytes: self.opts.max_bytes,
                    });
                }
                WhenFull::DropOldest => {
                    // Delivered events must not be counted as evicted.
                    self.flush_acks_or_log(created_ms);
                    let target = self.opts.max_bytes.saturating_sub(need);
                    evicted = self.freeing(|sp| sp.evict_until(target))?;
                }
            }
        }
        let mut attempt = 0;
        let mut blocked: Option<(u32, tokio::time::Instant)> = None;
        loop {
            match self.try_insert(
                first_seq, created_ms, blob, count, next_seq, requeued, marks, salt,
            ) {
                Ok(id) => {
                    if let Some((tries, since)) = blocked {
                        self.metrics.spool_blocked.set(0);
                        tracing::info!(waited = ?since.elapsed(), tries, "Spool is writable again; the held reads are committed");
                    }
                    // Committed: bookkeeping that fails from here on is logged, never
                    // reported as a failed append (the events are accepted).
                    if let Err(e) = self.refresh_used() {
                        tracing::warn!(error = %e, "Cannot measure the spool after a commit");
                    }
                    if let Some(n) = self.reserve_missing_commits {
                        if n % 256 == 0 && self.make_reserve() {
                            self.reserve_missing_commits = None;
                        } else {
                            self.reserve_missing_commits = Some(n.wrapping_add(1));
                        }
                    }
                    self.metrics.spool_committed.add(count as u64);
                    self.metrics.spool_commits.inc();
                    self.metrics.spool_backlog.add(count as u64);
                    return Ok((id, evicted));
                }
                Err(e) if is_busy(&e) => {
                    // Another process holds a write lock on the file (an open `sqlite3`
                    // shell, a backup): keep trying; the callers hold or wait meanwhile.
                    let (tries, _) = blocked.get_or_insert((0, tokio::time::Instant::now()));
                    if *tries == 0 {
                        self.metrics.spool_blocked.set(1);
                        tracing::warn!(path = %self.path.display(), error = %e, "Spool is locked by another process; holding new reads until it is released (close any sqlite3 shell or backup holding it)");
                    }
                    *tries += 1;
                    let pause = std::time::Duration::from_millis(50 * u64::from((*tries).min(10)));
                    #[allow(clippy::disallowed_methods)] // the spool thread has nothing else to do
                    std::thread::sleep(pause);
                }
                Err(SpoolError::DiskFull)
                    if attempt == 0 && self.opts.when_full == WhenFull::DropOldest =>
                {
                    // Freed pages are reused in place: evicting the oldest chunks can make
                    // room even on a full disk.
                    attempt += 1;
                    // Delivered events must not be counted as evicted.
                    self.flush_acks_or_log(created_ms);
                    let target = self.live_bytes().saturating_sub(need.max(64 * 1024));
                    let n = self.freeing(|sp| sp.evict_until(target)).unwrap_or(0);
                    if n == 0 {
                        return Err(SpoolError::DiskFull);
                    }
                    evicted += n;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn restore_sync(&mut self) -> rusqlite::Result<()> {
        if self.relaxed_sync {
            self.conn
                .prepare_cached("PRAGMA synchronous = FULL")?
                .execute([])?;
            self.relaxed_sync = false;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn try_insert(
        &mut self,
        first_seq: u64,
        created_ms: i64,
        blob: &[u8],
        count: usize,
        next_seq: u64,
        requeued: &[i64],
        marks: &[(Arc<str>, u64)],
        salt: Option<u64>,
    ) -> Result<i64, SpoolError> {
        let id = self.next_chunk;
        // A salt other than the epoch's for this chunk (events that keep their ids).
        let salt = salt.filter(|s| Some(*s) != epoch_salt(&self.salts, id));
        self.restore_sync().map_err(classify)?;
        let note = self.delivery_due(created_ms);
        let tx = self.conn.transaction().map_err(classify)?;
        if count > 0 {
            tx.prepare_cached("INSERT INTO chunks(id, first_seq, count, created_ms, data) VALUES (?1, ?2, ?3, ?4, ?5)")?.execute(params![id, first_seq as i64, count as i64, created_ms, blob])
                .map_err(classify)?;
            // Both counters sit in the small meta table: one page rewritten per commit.
            meta_set(&tx, "next_chunk", id + 1).map_err(classify)?;
            meta_set(&tx, "next_seq", next_seq as i64).map_err(classify)?;
        }
        for (source, pos) in marks {
            meta_set(&tx, &format!("journal:{source}"), *pos as i64).map_err(classify)?;
        }
        for (blob, snapshot) in &self.pass_rows {
            tx.prepare_cached("INSERT INTO pass_log(data) VALUES (?1)")?
                .execute([blob])
                .map_err(classify)?;
            if *snapshot {
                let id = tx.last_insert_rowid();
                tx.prepare_cached("DELETE FROM pass_log WHERE id < ?1")?
                    .execute([id])
                    .map_err(classify)?;
            }
        }
        let offset = if self.offset_recorded {
            None
        } else {
            self.opts.clock.offset()
        };
        if let Some(off) = offset {
            record_offset(&tx, self.boot_id, off)?;
        }
        if let (Some(salt), true) = (salt, count > 0) {
            meta_set(&tx, &format!("salt_chunk:{id}"), salt as i64).map_err(classify)?;
        }
        for dl in requeued {
            tx.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?
                .execute([dl])
                .map_err(classify)?;
        }
        // Acknowledgements waiting to be written ride along: no transaction of their own.
        // A failure to mark them never costs the append: they are dropped, as a failed
        // [`Spool::ack`] is (the events are sent again).
        let acked = if self.acks.is_empty() {
            None
        } else {
            match mark_done(&tx, &self.acks) {
                Ok(done) => {
                    if note {
                        meta_set(&tx, "last_delivery_ms", created_ms).map_err(classify)?;
                    }
                    Some((done, note))
                }
                Err(SpoolError::DiskFull) => return Err(SpoolError::DiskFull),
                Err(e) => {
                    tracing::error!(error = %e, "Cannot record delivery in the spool; events will be resent");
                    self.acks.clear();
                    self.acks_max = None;
                    self.acks_lost = true;
                    None
                }
            }
        };
        tx.commit().map_err(classify)?;
        self.pass_rows.clear();
        if offset.is_some() {
            self.offset_recorded = true;
        }
        if let (Some(salt), true) = (salt, count > 0) {
            self.salt_overrides.push((id, salt));
        }
        if count > 0 {
            self.next_chunk = id + 1;
            self.next_seq = self.next_seq.max(next_seq);
        }
        if let Some(((n, deleted), note)) = acked {
            self.acks.clear();
            self.acks_max = None;
            if let Err(e) = self.acked(n, deleted, note.then_some(created_ms)) {
                tracing::warn!(error = %e, "Cannot update the spool's accounting after a commit");
            }
        }
        Ok(id)
    }

    /// Bytes that count against `max_bytes`: the file but the dead letters. A write-ahead log
    /// grown by blocked checkpoints is reported (metric, WARN, `/health`) but not counted:
    /// evicting events cannot shrink it, so counting it would destroy the backlog for nothing.
    /// `max_bytes` of the spool's config.
    pub fn max_bytes(&self) -> u64 {
        self.opts.max_bytes
    }

    /// Full with `when_full = "reject"`: a group that adds no event but would acknowledge
    /// MQTT messages is refused too (see `actor`), so the broker keeps them while full.
    pub fn refusing(&self) -> bool {
        self.opts.when_full == WhenFull::Reject
            && self.live_bytes() + 2 * self.page_size > self.opts.max_bytes
    }

    fn live_bytes(&self) -> u64 {
        self.used_bytes.saturating_sub(self.dl_bytes)
    }

    /// Pass-log rows (`crate::suppress::stage`) to write in the next commit's transaction. If
    /// that commit fails they are dropped and `pass_log_lost` is set.
    pub fn stage_pass_rows(&mut self, rows: Vec<(Vec<u8>, bool)>) {
        self.pass_rows.extend(rows);
    }

    /// Drop staged pass-log rows that could not be committed (and say so).
    pub fn drop_pass_rows(&mut self) {
        if !self.pass_rows.is_empty() {
            self.pass_rows.clear();
            self.opts
                .pass_log_lost
                .store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Every row of the pass log, oldest first (the first is a snapshot unless the log was
    /// never compacted).
    pub fn pass_log_rows(&self) -> Result<Vec<Vec<u8>>, SpoolError> {
        let mut q = self.conn.prepare("SELECT data FROM pass_log ORDER BY id")?;
        let rows = q
            .query_map([], |r| r.get::<_, Vec<u8>>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The recorded clock offsets (wall − boot time, ms) by kernel boot id.
    pub fn boot_offsets(&self) -> Result<std::collections::HashMap<[u8; 16], i64>, SpoolError> {
        let mut q = self
            .conn
            .prepare("SELECT key, value FROM meta WHERE key LIKE 'clock_offset:%'")?;
        let rows = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let (key, off) = row?;
            if let Some(id) = key
                .strip_prefix("clock_offset:")
                .and_then(|h| Uuid::parse_str(h).ok())
            {
                out.insert(*id.as_bytes(), off);
            }
        }
        Ok(out)
    }

    /// The committed journal position of every source (`source::journal`): name → position.
    pub fn journal_marks(&self) -> Result<Vec<(String, u64)>, SpoolError> {
        let mut q = self
            .conn
            .prepare("SELECT key, value FROM meta WHERE key LIKE 'journal:%'")?;
        let rows = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (k, v) = row?;
            if let Some(name) = k.strip_prefix("journal:") {
                out.push((name.to_string(), v.max(0) as u64));
            }
        }
        Ok(out)
    }

    /// Delete the oldest chunks until used bytes ≤ target (approximately). Returns the number
    /// of undelivered events evicted, counted as dropped with reason "evicted".
    fn evict_until(&mut self, target: u64) -> Result<u64, SpoolError> {
        let mut evicted = 0u64;
        let mut used = self.live_bytes();
        let tx = self.conn.transaction().map_err(classify)?;
        {
            let mut q = tx.prepare("SELECT c.id, c.count, length(c.data), COALESCE(d.done, 0) FROM chunks c LEFT JOIN chunk_done d ON d.chunk_id = c.id ORDER BY c.id")?;
            let mut rows = q.query([])?;
            let mut victims = Vec::new();
            while used > target {
                let Some(row) = rows.next()? else { break };
                let (id, count, len, done): (i64, i64, i64, i64) =
                    (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
                victims.push(id);
                used = used.saturating_sub(len as u64 + 64);
                evicted += (count - done).max(0) as u64;
            }
            drop(rows);
            for id in victims {
                tx.prepare_cached("DELETE FROM chunks WHERE id = ?1")?
                    .execute([id])
                    .map_err(classify)?;
                tx.prepare_cached("DELETE FROM chunk_done WHERE chunk_id = ?1")?
                    .execute([id])
                    .map_err(classify)?;
            }
        }
        tx.commit().map_err(classify)?;
        self.cache = None;
        if evicted > 0 {
            self.metrics.count_drop("evicted", evicted);
            self.metrics.spool_backlog.sub(evicted);
            tracing::warn!(
                events = evicted,
                max_bytes = self.opts.max_bytes,
                "Spool full: evicted the oldest undelivered events (when_full = \"drop_oldest\")"
            );
        }
        self.refresh_used()?;
        Ok(evicted)
    }

    /// The decoded chunk `id`, positioned at or before record `from`.
    fn load_chunk(
        &mut self,
        id: i64,
        from: usize,
    ) -> Result<Option<&mut DecodedChunk>, SpoolError> {
        if self.cache.as_ref().map(|c| (c.id, c.next <= from)) != Some((id, true)) {
            let row: Option<(i64, i64, Vec<u8>)> = self
                .conn
                .prepare_cached("SELECT first_seq, created_ms, data FROM chunks WHERE id = ?1")?
                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            let Some((first_seq, created_ms, blob)) = row else {
                return Ok(None);
            };
            match self.codec.decode(&blob) {
                Ok(data) => {
                    self.cache = Some(DecodedChunk {
                        id,
                        first_seq: first_seq as u64,
                        created_ms,
                        boot: Uuid::from_bytes(data.boot_id),
                        records: data.records.into_iter(),
                        next: 0,
                    })
                }
                Err(e) => {
                    tracing::error!(chunk = id, error = %e, "Spool chunk cannot be decoded; moved to dead letters with its raw bytes");
                    self.quarantine_chunk(id, first_seq, created_ms, &blob, &e.to_string())?;
                    return Ok(None);
                }
            }
        }
        Ok(self.cache.as_mut())
    }

    fn quarantine_chunk(
        &mut self,
        id: i64,
        first_seq: i64,
        created_ms: i64,
        blob: &[u8],
        reason: &str,
    ) -> Result<(), SpoolError> {
        let count: i64 = self
            .conn
            .prepare_cached("SELECT count FROM chunks WHERE id = ?1")?
            .query_row([id], |r| r.get(0))?;
        let tx = self.conn.transaction().map_err(classify)?;
        tx.prepare_cached("INSERT INTO dead_letters(seq, event_id, committed_ms, failed_ms, status, reason, body) VALUES (?1, '', ?2, ?3, NULL, ?4, ?5)")?.execute(params![first_seq, created_ms, crate::event::wall_now_ms(), format!("corrupt chunk ({count} events): {reason}"), blob],
        )
        .map_err(classify)?;
        tx.prepare_cached("DELETE FROM chunks WHERE id = ?1")?
            .execute([id])
            .map_err(classify)?;
        tx.prepare_cached("DELETE FROM chunk_done WHERE chunk_id = ?1")?
            .execute([id])
            .map_err(classify)?;
        let mut dl = self.dl_bytes + blob.len() as u64 + reason.len() as u64 + 96;
        let trimmed = trim_dead_letters(&tx, &mut dl, self.opts.dead_letter_max_bytes)?;
        tx.commit().map_err(classify)?;
        self.dl_bytes = dl;
        self.note_trimmed(trimmed);
        self.metrics.spool_corrupt_chunks.inc();
        self.metrics.spool_backlog.sub(count as u64);
        Ok(())
    }

    fn done_bits(&self, chunk: i64) -> rusqlite::Result<Vec<u8>> {
        Ok(self
            .conn
            .prepare_cached("SELECT bits FROM chunk_done WHERE chunk_id = ?1")?
            .query_row([chunk], |r| r.get(0))
            .optional()?
            .unwrap_or_default())
    }

    /// Up to `max` undelivered events after `after` (exclusive), in commit order, from chunks
    /// with id ≥ `min_chunk`.
    pub fn read_after(
        &mut self,
        after: Option<Loc>,
        min_chunk: i64,
        max: usize,
    ) -> Result<Vec<SpooledEvent>, SpoolError> {
        // A reader acknowledges what it has read, so pending acknowledgements normally lie
        // before its cursor; any that do not are written first.
        if self.acks_max > after {
            self.flush_acks(crate::event::wall_now_ms())?;
        }
        let mut out = Vec::new();
        let mut next_id = after.map(|l| l.chunk).unwrap_or(i64::MIN).max(min_chunk);
        let mut first = true;
        while out.len() < max {
            let id: Option<i64> = if first && after.is_some_and(|a| a.chunk >= min_chunk) {
                Some(next_id)
            } else {
                self.conn
                    .prepare_cached("SELECT id FROM chunks WHERE id >= ?1 ORDER BY id LIMIT 1")?
                    .query_row([next_id], |r| r.get(0))
                    .optional()?
            };
            let start_idx = if first {
                after
                    .filter(|a| a.chunk >= min_chunk)
                    .map(|a| a.idx + 1)
                    .unwrap_or(0)
            } else {
                0
            };
            first = false;
            let Some(id) = id else { break };
            next_id = id + 1;
            let bits = self.done_bits(id)?;
            let salt = self.salt_for(id);
            let from = start_idx as usize;
            let Some(c) = self.load_chunk(id, from)? else {
                continue;
            };
            let base = ChunkBase {
                salt,
                chunk: c.id,
                first_seq: c.first_seq,
                created_ms: c.created_ms,
                boot: c.boot,
            };
            if c.next < from {
                c.records.nth(from - c.next - 1);
                c.next = from;
            }
            while out.len() < max {
                let Some(rec) = c.records.next() else { break };
                let i = c.next;
                c.next += 1;
                if bit(&bits, i) {
                    continue;
                }
                out.push(base.event(i, rec.seq_delta, rec.committed_delta, rec.body));
            }
        }
        Ok(out)
    }

    /// Id of the newest chunk (0 when empty).
    pub fn head_chunk(&self) -> rusqlite::Result<i64> {
        self.conn
            .prepare_cached("SELECT COALESCE(MAX(id), 0) FROM chunks")?
            .query_row([], |r| r.get(0))
    }

    /// Mark events delivered; chunks whose events are all done are deleted.
    pub fn ack(&mut self, locs: &[Loc], now_ms: i64) -> Result<(), SpoolError> {
        self.freeing(|sp| sp.ack_once(locs, now_ms))
    }

    /// An acknowledgement is committed without its own fsync (`synchronous = NORMAL` for this
    /// transaction): losing one to a power cut only means its events are sent again (same
    /// event ids), and the next append's fsync of the WAL makes it durable anyway. This saves
    /// one flash flush per delivered batch.
    fn ack_once(&mut self, locs: &[Loc], now_ms: i64) -> Result<(), SpoolError> {
        let relax = self.opts.sync == SyncMode::Full;
        if relax {
            self.relaxed_sync = true;
            self.conn
                .prepare_cached("PRAGMA synchronous = NORMAL")?
                .execute([])?;
        }
        let note_delivery = self.delivery_due(now_ms);
        // Delivered events were placed in time: this boot's clock offset is known now.
        let offset = if self.offset_recorded {
            None
        } else {
            self.opts.clock.offset()
        };
        let boot = self.boot_id;
        let result = (|| {
            let tx = self.conn.transaction().map_err(classify)?;
            let done = mark_done(&tx, locs)?;
            if note_delivery {
                meta_set(&tx, "last_delivery_ms", now_ms).map_err(classify)?;
            }
            if let Some(off) = offset {
                record_offset(&tx, boot, off)?;
            }
            tx.commit().map_err(classify)?;
            Ok::<(u64, bool), SpoolError>(done)
        })();
        if result.is_ok() && offset.is_some() {
            self.offset_recorded = true;
        }
        if relax {
            if let Err(e) = self.restore_sync() {
                tracing::error!(error = %e, "Cannot set synchronous = FULL back after an acknowledgement; the next append will");
            }
        }
        let (n, deleted) = result?;
        self.acked(n, deleted, note_delivery.then_some(now_ms))
    }

    /// `last_delivery_ms` (for `scangate status`) is written at most once a second: it is one
    /// more page in the WAL per acknowledgement otherwise.
    fn delivery_due(&self, now_ms: i64) -> bool {
        now_ms - self.delivery_noted_ms >= 1000 || now_ms < self.delivery_noted_ms
    }

    /// After acknowledgements were committed: `n` events newly done, `deleted` when a chunk
    /// went with them, `noted` when `last_delivery_ms` was written.
    fn acked(&mut self, n: u64, deleted: bool, noted: Option<i64>) -> Result<(), SpoolError> {
        if let Some(t) = noted {
            self.delivery_noted_ms = t;
        }
        self.metrics.spool_backlog.sub(n);
        // Only a deleted chunk frees pages or can be the chunk being read.
        if deleted {
            self.after_delete()?;
        }
        Ok(())
    }

    /// Take an acknowledgement now and write it later: with the next append (in its
    /// transaction, which is fsynced anyway), or by [`Spool::flush_acks`]. Until then the
    /// events count as undelivered on disk; a crash before the write only means they are sent
    /// again with the same event ids. Reads that could return them write them first.
    pub fn ack_later(&mut self, locs: &[Loc]) {
        self.acks.extend_from_slice(locs);
        self.acks_max = self.acks_max.max(locs.iter().max().copied());
    }

    /// [`Spool::flush_acks`] where its failure must not stop the caller (it only means the
    /// events are sent again).
    pub fn flush_acks_or_log(&mut self, now_ms: i64) {
        if let Err(e) = self.flush_acks(now_ms) {
            tracing::error!(error = %e, "Cannot record delivery in the spool; events will be resent");
        }
    }

    /// Acknowledgements taken by [`Spool::ack_later`] and not yet written.
    pub fn acks_pending(&self) -> usize {
        self.acks.len()
    }

    /// Write the acknowledgements taken by [`Spool::ack_later`] in a transaction of their own.
    /// On an error they are dropped, as a failed [`Spool::ack`] is: the events stay in the
    /// spool and are sent again.
    pub fn flush_acks(&mut self, now_ms: i64) -> Result<(), SpoolError> {
        if self.acks.is_empty() {
            return Ok(());
        }
        let locs = std::mem::take(&mut self.acks);
        self.acks_max = None;
        let r = self.ack(&locs, now_ms);
        if r.is_err() {
            self.acks_lost = true;
        }
        // Keep the allocation for the next ones.
        self.acks = locs;
        self.acks.clear();
        r
    }

    /// Move events to the dead-letter table with the upstream's status and reason.
    pub fn dead_letter(
        &mut self,
        items: &[(SpooledEvent, Option<u16>, String)],
        now_ms: i64,
    ) -> Result<(), SpoolError> {
        self.freeing(|sp| sp.dead_letter_once(items, now_ms))
    }

    fn dead_letter_once(
        &mut self,
        items: &[(SpooledEvent, Option<u16>, String)],
        now_ms: i64,
    ) -> Result<(), SpoolError> {
        let tx = self.conn.transaction().map_err(classify)?;
        let mut added = 0u64;
        {
            let mut ins = tx.prepare_cached("INSERT INTO dead_letters(seq, event_id, committed_ms, failed_ms, status, reason, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?;
            for (ev, status, reason) in items {
                let body = postcard::to_stdvec(&ev.body)?;
                added += (body.len() + reason.len() + 64) as u64;
                ins.execute(params![
                    ev.seq as i64,
                    ev.event_id.to_string(),
                    ev.committed_ms,
                    now_ms,
                    status.map(i64::from),
                    reason,
                    body
                ])
                .map_err(classify)?;
            }
        }
        let locs: Vec<Loc> = items.iter().map(|(e, _, _)| e.loc).collect();
        let (n, _) = mark_done(&tx, &locs)?;
        let mut dl = self.dl_bytes + added;
        let trimmed = trim_dead_letters(&tx, &mut dl, self.opts.dead_letter_max_bytes)?;
        tx.commit().map_err(classify)?;
        self.dl_bytes = dl;
        self.note_trimmed(trimmed);
        self.metrics.spool_backlog.sub(n);
        self.metrics.dead_lettered.add(items.len() as u64);
        if let Err(e) = self.after_delete() {
            tracing::warn!(error = %e, "Cannot update the spool's accounting after dead-lettering");
        }
        Ok(())
    }

    fn note_trimmed(&self, trimmed: u64) {
        if trimmed > 0 {
            self.metrics.dead_letters_evicted.add(trimmed);
            tracing::warn!(
                dead_letters = trimmed,
                dead_letter_max_bytes = self.opts.dead_letter_max_bytes,
                "Dead letters at their bound: the oldest were deleted (export them with `scangate spool export` to keep them)"
            );
        }
    }

    fn after_delete(&mut self) -> Result<(), SpoolError> {
        if let Some(c) = &self.cache {
            let exists: Option<i64> = self
                .conn
                .prepare_cached("SELECT id FROM chunks WHERE id = ?1")?
                .query_row([c.id], |r| r.get(0))
                .optional()?;
            if exists.is_none() {
                self.cache = None;
            }
        }
        self.refresh_used()?;
        Ok(())
    }

    /// Record the upstream's state for `scangate status` (call on state changes only).
    pub fn set_upstream_error(
        &mut self,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<(), SpoolError> {
        let tx = self.conn.transaction().map_err(classify)?;
        match error {
            Some(e) => {
                meta_set(&tx, "last_error", e)?;
                meta_set(&tx, "last_error_ms", now_ms)?;
            }
            None => {
                tx.prepare_cached("DELETE FROM meta WHERE key IN ('last_error', 'last_error_ms')")?
                    .execute([])?;
            }
        }
        tx.commit().map_err(classify)?;
        Ok(())
    }

    /// Re-send every decodable event of a spool file that was moved aside (corrupt), with its
    /// original seq and commit time (so its original event id, when the file's salt is this
    /// spool's, which it is for a file moved aside by this version), and copy its dead
    /// letters. Damaged rows and chunks are skipped and counted; delivered events (done bits)
    /// are not re-sent. The file is renamed `<file>.salvaged` afterwards. Seqs above the
    /// salvaged ones stay unique: `next_seq` is raised past them.
    pub fn salvage(&mut self, file: &Path, now_ms: i64) -> Result<SalvageReport, SpoolError> {
        let old = Connection::open_with_flags(
            file,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| SpoolError::Open {
            path: file.to_path_buf(),
            source,
        })?;
        let _ = old.busy_timeout(std::time::Duration::from_secs(5));
        let mut report = SalvageReport::default();
        let old_salt = meta_get::<i64>(&old, "salt")
            .ok()
            .flatten()
            .map(|v| v as u64);
        let own_salt = meta_get::<i64>(&self.conn, "salt")?.map(|v| v as u64);
        // The old file's salts by chunk; when its header cannot be read, this spool's (a file
        // moved aside from this state directory shares its history).
        let old_epochs: Vec<(i64, u64)> = read_salt_epochs(&old)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| self.salts.clone());
        let old_salt_for = |chunk: i64| epoch_salt(&old_epochs, chunk);
        // An unreadable header: a file moved aside from this state directory shares its
        // identity (`spool.id`), so the salt is this spool's.
        report.same_ids = old_salt.is_none() || old_salt == own_salt;
        // Chunk ids: a scan stops at the first damaged page, so every id up to the highest
        // one known (from the scan, the table's last row, or the header's counter) is also
        // looked up on its own: a damaged page costs only the rows on it.
        let mut scanned: Vec<i64> = Vec::new();
        if let Ok(mut q) = old.prepare("SELECT id FROM chunks ORDER BY id") {
            if let Ok(rows) = q.query_map([], |r| r.get::<_, i64>(0)) {
                for r in rows {
                    match r {
                        Ok(id) => scanned.push(id),
                        Err(_) => break,
                    }
                }
            }
        }
        let last = [
            scanned.last().copied(),
            old.query_row("SELECT MAX(id) FROM chunks", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .ok()
            .flatten(),
            meta_get::<i64>(&old, "next_chunk")
                .ok()
                .flatten()
                .map(|n| n - 1),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(0);
        let probe_from = scanned.last().map_or(1, |l| l + 1);
        let ids = scanned.into_iter().chain(probe_from..=last);
        for id in ids {
            let row: rusqlite::Result<(i64, i64, Vec<u8>)> = old.query_row(
                "SELECT first_seq, created_ms, data FROM chunks WHERE id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            );
            let (first_seq, created_ms, blob) = match row {
                Ok(r) => r,
                // Never existed or deleted (delivered): nothing to salvage.
                Err(rusqlite::Error::QueryReturnedNoRows) => continue,
                Err(_) => {
                    report.unreadable_rows += 1;
                    continue;
                }
            };
            let Ok(data) = self.codec.decode(&blob) else {
                report.unreadable_rows += 1;
                continue;
            };
            let bits: Vec<u8> = old
                .query_row(
                    "SELECT bits FROM chunk_done WHERE chunk_id = ?1",
                    [id],
                    |r| r.get(0),
                )
                .unwrap_or_default();
            let mut records = Vec::new();
            let mut max_seq = 0u64;
            for (i, rec) in data.records.into_iter().enumerate() {
                if bit(&bits, i) {
                    report.already_delivered += 1;
                    continue;
                }
                let seq = (first_seq + rec.seq_delta) as u64;
                max_seq = max_seq.max(seq);
                let committed_ms = created_ms + rec.committed_delta;
                records.push(Record {
                    seq_delta: seq as i64 - first_seq,
                    committed_delta: committed_ms - now_ms,
                    body: rec.body,
                });
            }
            if records.is_empty() {
                continue;
            }
            let n = records.len();
            let blob = self.codec.encode(&ChunkData {
                boot_id: data.boot_id,
                records,
            })?;
            let next = self.next_seq.max(max_seq + 1);
            self.reserve_seqs(next);
            self.insert_chunk(
                first_seq as u64,
                now_ms,
                &blob,
                n,
                next,
                &[],
                &[],
                old_salt_for(id),
            )?;
            report.events += n as u64;
        }
        // Dead letters: copied as they are.
        if let Ok(mut q) = old.prepare("SELECT seq, event_id, committed_ms, failed_ms, status, reason, body FROM dead_letters ORDER BY id") {
            let rows = q.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Vec<u8>>(6)?,
                ))
            });
            if let Ok(rows) = rows {
                for row in rows {
                    let Ok((seq, eid, cms, fms, st, reason, body)) = row else {
                        report.unreadable_rows += 1;
                        continue;
                    };
                    self.conn
                        .prepare_cached("INSERT INTO dead_letters(seq, event_id, committed_ms, failed_ms, status, reason, body) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")?
                        .execute(params![seq, eid, cms, fms, st, reason, body])
                        .map_err(classify)?;
                    self.dl_bytes += (body.len() + reason.len() + 64) as u64;
                    report.dead_letters += 1;
                }
            }
        }
        drop(old);
        let done = PathBuf::from(format!("{}.salvaged", file.display()));
        move_with_sidecars(file, &done).map_err(|source| SpoolError::StateDir {
            path: file.to_path_buf(),
            source,
        })?;
        if let Err(e) = self.refresh_used() {
            tracing::warn!(error = %e, "Cannot measure the spool after salvage");
        }
        self.metrics.spool_backlog.add(report.events);
        Ok(report)
    }

    pub fn stats(&mut self) -> Result<Stats, SpoolError> {
        self.measure_wal();
        let mut s = stats_of(&self.conn)?;
        s.used_bytes = self.used_bytes;
        Ok(s)
    }

    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        dead_letters_of(&self.conn, limit)
    }

    /// Put dead letters back into the queue with their original seq and event id (so an
    /// ingest API that de-duplicates by event_id still sees each event once). `ids = None`
    /// requeues all. Corrupt-chunk entries cannot be requeued and are left in place.
    pub fn requeue(&mut self, ids: Option<&[i64]>, now_ms: i64) -> Result<usize, SpoolError> {
        // A page of dead letters at a time: memory stays bounded however many there are.
        const PAGE: usize = 1000;
        let mut done = 0;
        let mut after = 0i64;
        loop {
            let page = dead_letters_page(&self.conn, after, PAGE)?;
            let Some(last) = page.last() else { break };
            after = last.id;
            let chosen: Vec<DeadLetter> = page
                .into_iter()
                .filter(|d| d.body.is_some() && ids.is_none_or(|ids| ids.contains(&d.id)))
                .collect();
            // Each event keeps the id it was committed with: find the salt that made it.
            let mut candidates: Vec<u64> = self.salts.iter().map(|e| e.1).collect();
            candidates.extend(self.salt_overrides.iter().map(|e| e.1));
            candidates.dedup();
            let salt_of = |d: &DeadLetter| {
                candidates
                    .iter()
                    .copied()
                    .find(|s| event_id(*s, d.seq, d.committed_ms).to_string() == d.event_id)
            };
            let mut rest = chosen;
            while !rest.is_empty() {
                let salt = salt_of(&rest[0]);
                let n = rest.iter().take_while(|d| salt_of(d) == salt).count();
                let tail = rest.split_off(n);
                let group = std::mem::replace(&mut rest, tail);
                done += self.requeue_group(group, now_ms, salt)?;
            }
        }
        let dl: i64 = self
            .conn
            .prepare_cached(DL_BYTES_SQL)?
            .query_row([], |r| r.get(0))?;
        self.dl_bytes = dl.max(0) as u64;
        Ok(done)
    }

    /// Requeue consecutive dead letters as one chunk whose events keep `salt` (their ids).
    fn requeue_group(
        &mut self,
        group: Vec<DeadLetter>,
        now_ms: i64,
        salt: Option<u64>,
    ) -> Result<usize, SpoolError> {
        let base_seq = group[0].seq;
        let base_ms = now_ms;
        let records: Vec<Record> = group
            .iter()
            .filter_map(|d| {
                d.body.clone().map(|body| Record {
                    seq_delta: d.seq as i64 - base_seq as i64,
                    committed_delta: d.committed_ms - base_ms,
                    body,
                })
            })
            .collect();
        let data = ChunkData {
            boot_id: *self.boot_id.as_bytes(),
            records,
        };
        let blob = self.codec.encode(&data)?;
        let dl_ids: Vec<i64> = group.iter().map(|d| d.id).collect();
        let next = self.next_seq;
        self.insert_chunk(
            base_seq,
            base_ms,
            &blob,
            group.len(),
            next,
            &dl_ids,
            &[],
            salt,
        )?;
        Ok(group.len())
    }
}

/// Delete the oldest dead letters until `dl_bytes` (updated) is within `max`. Returns how many.
/// The raw bytes of a corrupt chunk (no event id) are never deleted here: they are the only
/// trace of what was lost, for an operator to inspect.
fn trim_dead_letters(
    tx: &rusqlite::Transaction<'_>,
    dl_bytes: &mut u64,
    max: u64,
) -> Result<u64, SpoolError> {
    let mut trimmed = 0;
    while *dl_bytes > max {
        let oldest: Option<(i64, i64)> = tx
            .prepare_cached("SELECT id, length(body) + length(reason) + 64 FROM dead_letters WHERE event_id != '' ORDER BY id LIMIT 1")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((id, size)) = oldest else {
            *dl_bytes = 0;
            break;
        };
        tx.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?
            .execute([id])
            .map_err(classify)?;
        *dl_bytes = dl_bytes.saturating_sub(size.max(0) as u64);
        trimmed += 1;
    }
    Ok(trimmed)
}

fn bit(bits: &[u8], i: usize) -> bool {
    bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Set done bits for `locs`; delete chunks that become fully done. Returns newly-done events
/// and whether a chunk was deleted.
fn mark_done(tx: &rusqlite::Transaction<'_>, locs: &[Loc]) -> Result<(u64, bool), SpoolError> {
    let mut deleted = false;
    let mut sorted = locs.to_vec();
    sorted.sort_unstable();
    let mut newly = 0u64;
    let mut i = 0;
    while i < sorted.len() {
        let chunk = sorted[i].chunk;
        let mut j = i;
        while j < sorted.len() && sorted[j].chunk == chunk {
            j += 1;
        }
        let count: Option<i64> = tx
            .prepare_cached("SELECT count FROM chunks WHERE id = ?1")?
            .query_row([chunk], |r| r.get(0))
            .optional()?;
        if let Some(count) = count {
            let count = count as usize;
            let mut bits: Vec<u8> = tx
                .prepare_cached("SELECT bits FROM chunk_done WHERE chunk_id = ?1")?
                .query_row([chunk], |r| r.get(0))
                .optional()?
                .unwrap_or_default();
            bits.resize(count.div_ceil(8), 0);
            for l in &sorted[i..j] {
                let k = l.idx as usize;
                if k < count && !bit(&bits, k) {
                    bits[k / 8] |= 1 << (k % 8);
                    newly += 1;
                }
            }
            let done = (0..count).filter(|&k| bit(&bits, k)).count();
            if done == count {
                deleted = true;
                tx.prepare_cached("DELETE FROM chunks WHERE id = ?1")?
                    .execute([chunk])
                    .map_err(classify)?;
                tx.prepare_cached("DELETE FROM chunk_done WHERE chunk_id = ?1")?
                    .execute([chunk])
                    .map_err(classify)?;
            } else {
                tx.prepare_cached("INSERT INTO chunk_done(chunk_id, bits, done) VALUES (?1, ?2, ?3) ON CONFLICT(chunk_id) DO UPDATE SET bits = excluded.bits, done = excluded.done")?.execute(params![chunk, bits, done as i64],
                )
                .map_err(classify)?;
            }
        }
        i = j;
    }
    Ok((newly, deleted))
}

/// Clock offsets kept for past boots, at most (one small `meta` row each): events of a boot
/// further back whose times were not re-based are sent as `unsynced`.
const BOOT_OFFSETS_MAX: i64 = 64;

/// Record this boot's clock offset (wall − boot time, ms), keeping at most
/// [`BOOT_OFFSETS_MAX`] boots.
fn record_offset(tx: &rusqlite::Transaction<'_>, boot: Uuid, off: i64) -> Result<(), SpoolError> {
    let key = format!("clock_offset:{}", boot.simple());
    let n: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM meta WHERE key LIKE 'clock_offset:%'")?
        .query_row([], |r| r.get(0))?;
    let known = meta_get::<i64>(tx, &key)?.is_some();
    if n >= BOOT_OFFSETS_MAX && !known {
        tx.prepare_cached(
            "DELETE FROM meta WHERE key IN (SELECT key FROM meta WHERE key LIKE 'clock_offset:%' AND key <> ?1 LIMIT ?2)",
        )?
        .execute(params![key, n - BOOT_OFFSETS_MAX + 1])
        .map_err(classify)?;
    }
    meta_set(tx, &key, off).map_err(classify)?;
    Ok(())
}

/// Version 2: the suppression stage's pass log (`crate::suppress::stage`), and chunks of
/// format 2 (events with a `clock` mark; format 1 is still read).
fn migrate_to_2(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "BEGIN;
         CREATE TABLE IF NOT EXISTS pass_log(id INTEGER PRIMARY KEY, data BLOB NOT NULL);
         PRAGMA user_version = 2;
         COMMIT;",
    )
}

fn migrate_to_1(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "BEGIN;
         CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS chunks(
             id INTEGER PRIMARY KEY,
             first_seq INTEGER NOT NULL,
             count INTEGER NOT NULL,
             created_ms INTEGER NOT NULL,
             data BLOB NOT NULL);
         CREATE TABLE IF NOT EXISTS chunk_done(
             chunk_id INTEGER PRIMARY KEY,
             bits BLOB NOT NULL,
             done INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS dead_letters(
             id INTEGER PRIMARY KEY,
             seq INTEGER NOT NULL,
             event_id TEXT NOT NULL,
             committed_ms INTEGER NOT NULL,
             failed_ms INTEGER NOT NULL,
             status INTEGER,
             reason TEXT NOT NULL,
             body BLOB NOT NULL);
         PRAGMA user_version = 1;
         COMMIT;",
    )
}

pub fn backlog_of(conn: &Connection) -> rusqlite::Result<u64> {
    let n: i64 = conn.prepare_cached("SELECT COALESCE(SUM(c.count - COALESCE(d.done, 0)), 0) FROM chunks c LEFT JOIN chunk_done d ON d.chunk_id = c.id")?.query_row([], |r| r.get(0))?;
    Ok(n.max(0) as u64)
}

/// Statistics from any connection (the daemon's, or a read-only one for `scangate status`).
pub fn stats_of(conn: &Connection) -> Result<Stats, SpoolError> {
    let backlog = backlog_of(conn)?;
    let (chunks, oldest): (i64, Option<i64>) = conn
        .prepare_cached("SELECT COUNT(*), MIN(created_ms) FROM chunks")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let dead: i64 = conn
        .prepare_cached("SELECT COUNT(*) FROM dead_letters")?
        .query_row([], |r| r.get(0))?;
    let page_size: i64 = conn
        .prepare_cached("PRAGMA page_size")?
        .query_row([], |r| r.get(0))?;
    let pages: i64 = conn
        .prepare_cached("PRAGMA page_count")?
        .query_row([], |r| r.get(0))?;
    let free: i64 = conn
        .prepare_cached("PRAGMA freelist_count")?
        .query_row([], |r| r.get(0))?;
    Ok(Stats {
        backlog,
        chunks: chunks as u64,
        oldest_committed_ms: oldest,
        dead_letters: dead as u64,
        next_seq: meta_get::<i64>(conn, "next_seq")?.unwrap_or(1) as u64,
        used_bytes: ((pages - free).max(0) * page_size) as u64,
        file_bytes: (pages * page_size) as u64,
        last_delivery_ms: meta_get(conn, "last_delivery_ms")?,
        last_error: meta_get(conn, "last_error")?,
        last_error_ms: meta_get(conn, "last_error_ms")?,
        corrupt_incidents: meta_get::<i64>(conn, "corrupt_incidents")?.unwrap_or(0) as u64,
    })
}

fn dead_letter_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    let raw: Vec<u8> = r.get(7)?;
    let event_id: String = r.get(2)?;
    let body = if event_id.is_empty() {
        None
    } else {
        postcard::from_bytes::<EventBody>(&raw).ok()
    };
    Ok(DeadLetter {
        id: r.get(0)?,
        seq: r.get::<_, i64>(1)? as u64,
        event_id,
        committed_ms: r.get(3)?,
        failed_ms: r.get(4)?,
        status: r.get::<_, Option<i64>>(5)?.map(|s| s as u16),
        reason: r.get(6)?,
        raw: if body.is_some() { Vec::new() } else { raw },
        body,
    })
}

/// The oldest `limit` dead letters (oldest first).
pub fn dead_letters_of(conn: &Connection, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
    dead_letters_page(conn, 0, limit)
}

/// Up to `limit` dead letters with id > `after`, oldest first: pages of a listing or export
/// that never holds more than one page in memory.
pub fn dead_letters_page(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> Result<Vec<DeadLetter>, SpoolError> {
    let mut q = conn.prepare_cached("SELECT id, seq, event_id, committed_ms, failed_ms, status, reason, body FROM dead_letters WHERE id > ?1 ORDER BY id LIMIT ?2")?;
    let rows = q.query_map(
        params![after, limit.min(i64::MAX as usize) as i64],
        dead_letter_row,
    )?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// The newest `limit` dead letters, oldest first.
pub fn newest_dead_letters(conn: &Connection, limit: usize) -> Result<Vec<DeadLetter>, SpoolError> {
    let mut q = conn.prepare_cached("SELECT id, seq, event_id, committed_ms, failed_ms, status, reason, body FROM dead_letters ORDER BY id DESC LIMIT ?1")?;
    let rows = q.query_map([limit.min(i64::MAX as usize) as i64], dead_letter_row)?;
    let mut v = rows.collect::<Result<Vec<_>, _>>()?;
    v.reverse();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ReadKind;

    fn body(tag: &str) -> EventBody {
        EventBody {
            kind: ReadKind::Barcode,
            tag: tag.into(),
            source: "s".into(),
            location: "L".into(),
            device: "d".into(),
            scan_type: None,
            antenna: None,
            rssi_cdbm: None,
            read_count: 1,
            first_seen_ms: 1,
            last_seen_ms: 1,
            symbology: None,
            value: None,
            clock: Default::default(),
        }
    }

    fn synchronous(sp: &Spool) -> i64 {
        sp.conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    }

    /// One clock offset per boot, and no more than `BOOT_OFFSETS_MAX` boots: a gateway that
    /// reboots every day for years does not grow its `meta` table without bound.
    #[test]
    fn clock_offsets_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sp, _) = Spool::open(dir.path(), SpoolOptions::default(), Arc::default()).unwrap();
        let mut last = Uuid::nil();
        for i in 0..200u128 {
            last = Uuid::from_u128(i + 1);
            let tx = sp.conn.transaction().unwrap();
            record_offset(&tx, last, i as i64).unwrap();
            tx.commit().unwrap();
        }
        let offsets = sp.boot_offsets().unwrap();
        assert_eq!(offsets.len() as i64, BOOT_OFFSETS_MAX);
        assert_eq!(offsets.get(last.as_bytes()), Some(&199));
        // The same boot again replaces its own row.
        let tx = sp.conn.transaction().unwrap();
        record_offset(&tx, last, 7).unwrap();
        tx.commit().unwrap();
        assert_eq!(sp.boot_offsets().unwrap().get(last.as_bytes()), Some(&7));
        assert_eq!(sp.boot_offsets().unwrap().len() as i64, BOOT_OFFSETS_MAX);
    }

    #[test]
    fn an_ack_relaxes_fsync_only_for_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sp, _) = Spool::open(dir.path(), SpoolOptions::default(), Arc::default()).unwrap();
        assert_eq!(synchronous(&sp), 2, "FULL");
        sp.append(vec![body("a"), body("b")], 1).unwrap();
        let evs = sp.read_after(None, 0, 10).unwrap();
        sp.ack(&[evs[0].loc], 2).unwrap();
        assert_eq!(synchronous(&sp), 2, "FULL again after the ack");
        // Had it not been set back, the next append would set it before committing.
        sp.conn
            .execute_batch("PRAGMA synchronous = NORMAL")
            .unwrap();
        sp.relaxed_sync = true;
        sp.append(vec![body("c")], 3).unwrap();
        assert_eq!(synchronous(&sp), 2, "appends always commit with FULL");
        assert_eq!(sp.backlog().unwrap(), 2);
    }
}
