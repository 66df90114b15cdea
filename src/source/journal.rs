//! Per-port journals: the bytes each serial port returned, kept in the page cache until the
//! reads decoded from them are committed, so that a process crash (`kill -9`, an abort, the
//! OOM killer) loses nothing that was already read from a port (DESIGN.md, guarantee 1).
//!
//! Owns: `<state_dir>/journal/<source>.<base>.jnl` files, the record format, recovery and
//! deletion. Does not own: what is committed (the spool records, in each commit's own
//! transaction, how far each source's journal is committed: `meta` key `journal:<source>`).
//!
//! How it works:
//! - Each journal file is mapped into memory (`MAP_SHARED`: its pages are the page cache) and
//!   the port is read *directly into the mapping*: once `read(2)` has copied the bytes, they
//!   are in the file, and a process crash at any later instant cannot lose them. (Reading into
//!   a buffer and then writing it leaves a window between the two calls in which a kill loses
//!   the bytes: the crash test hit it.) No fsync: the page cache survives a process crash, and
//!   power loss is what the spool's fsynced commit covers.
//! - Before each read the record header is stored in the mapping as *pending* with the
//!   largest length the read may return, then the read, then the header is marked *done* with
//!   the length read. Record: `[len u32][state u32][wall ms i64]` and
//!   the bytes (little-endian). A pending record found at start was read (or not) when the
//!   process died: its bytes up to the last non-zero one are taken (a read that did not
//!   happen left zeros; at worst NUL line noise at the end of the read is not recovered).
//! - A position is a count of payload bytes since the source's first journal. Each read carries
//!   the position just after its frame; the spool commits the highest position of each source
//!   in a group with the group.
//! - On start, the bytes after the committed position are decoded again (with the wall time
//!   of the read that brought them) and go into the pipeline before the port is opened.
//! - A file is closed after [`FILE_MAX_BYTES`] or [`FILE_MAX_AGE`] and deleted once everything
//!   in it is settled (committed, or consumed without producing a read). Files deleted within
//!   the kernel's writeback delay (30 s by default) are never written to flash at all.
//!
//! Invariants: positions only grow; a damaged record ends its file's recovery; nothing here can
//! stop a port from being read (a journal that cannot be written is logged and bypassed).

use std::fs::OpenOptions;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A journal file is closed once it holds this many payload bytes.
pub const FILE_MAX_BYTES: u64 = 1 << 20;
/// ... or once it is this old (so that settled bytes are deleted before the kernel writes
/// them back to flash).
pub const FILE_MAX_AGE: Duration = Duration::from_secs(5);
/// Largest single read into the journal.
pub const READ_MAX: usize = 16 * 1024;
/// Record header: length, state, wall time.
const HEADER: usize = 16;
/// Size of a journal file: room for [`FILE_MAX_BYTES`] and one more largest read.
const FILE_SIZE: usize = FILE_MAX_BYTES as usize + 64 * HEADER + READ_MAX + HEADER;
const PENDING: u32 = 1;
const DONE: u32 = 2;

/// How far each source's journal is committed, shared by the spool thread (which sets it after
/// each commit) and the serial threads (which delete settled files). MQTT sources use the same
/// marks for message positions, and are told of every settled group in order ([`Settled`]),
/// since they acknowledge messages to the broker.
#[derive(Debug, Default)]
pub struct JournalMarks(Vec<Mark>);

#[derive(Debug)]
struct Mark {
    name: Arc<str>,
    pos: AtomicU64,
    /// The position of the last read a serial source's run handed over (set as the run ends).
    handed: AtomicU64,
    /// An MQTT source's receiver of settled positions.
    settled: Option<tokio::sync::mpsc::UnboundedSender<Settled>>,
}

/// What became of a commit group that carried a source's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Committed: everything handed over up to this position is durable.
    Committed(u64),
    /// Refused by the spool (full with `when_full = "reject"`, disk full): what was handed
    /// over up to this position and not committed before is not in the spool.
    Refused(u64),
}

impl JournalMarks {
    /// Marks for `names`, starting at the committed positions the spool recorded.
    pub fn new(names: &[Arc<str>], committed: &[(String, u64)]) -> Self {
        Self::with_settled(names, committed, Vec::new())
    }

    /// [`JournalMarks::new`], with sources told of each settled group through their sender.
    pub fn with_settled(
        names: &[Arc<str>],
        committed: &[(String, u64)],
        mut settled: Vec<(Arc<str>, tokio::sync::mpsc::UnboundedSender<Settled>)>,
    ) -> Self {
        JournalMarks(
            names
                .iter()
                .map(|n| {
                    let c = committed
                        .iter()
                        .find(|(k, _)| **k == **n)
                        .map_or(0, |(_, v)| *v);
                    let tx = settled
                        .iter()
                        .position(|(k, _)| k == n)
                        .map(|i| settled.swap_remove(i).1);
                    Mark {
                        name: n.clone(),
                        pos: AtomicU64::new(c),
                        handed: AtomicU64::new(0),
                        settled: tx,
                    }
                })
                .collect(),
        )
    }

    /// The committed position of `name` (0 when unknown).
    pub fn get(&self, name: &str) -> u64 {
        self.0
            .iter()
            .find(|m| *m.name == *name)
            .map_or(0, |m| m.pos.load(Ordering::Acquire))
    }

    /// Record, as a serial source's run ends, the position of the last read it handed over to
    /// the pipeline (never moves back).
    pub fn set_handed(&self, name: &str, pos: u64) {
        if let Some(m) = self.0.iter().find(|m| *m.name == *name) {
            m.handed.fetch_max(pos, Ordering::AcqRel);
        }
    }

    /// The position of the last read a finished run of `name` handed over (0 when none).
    pub fn handed(&self, name: &str) -> u64 {
        self.0
            .iter()
            .find(|m| *m.name == *name)
            .map_or(0, |m| m.handed.load(Ordering::Acquire))
    }

    /// Record a committed position (never moves back).
    pub fn set(&self, name: &str, pos: u64) {
        if let Some(m) = self.0.iter().find(|m| *m.name == *name) {
            m.pos.fetch_max(pos, Ordering::AcqRel);
            if let Some(tx) = &m.settled {
                let _ = tx.send(Settled::Committed(pos));
            }
        }
    }

    /// `name` acknowledges what it hands over once it is committed (an MQTT source).
    pub fn acknowledges(&self, name: &str) -> bool {
        self.0
            .iter()
            .any(|m| *m.name == *name && m.settled.is_some())
    }

    /// The spool refused a group holding reads up to `pos`. A serial source's bytes are
    /// settled all the same (a port cannot be paused: the reads are dropped and counted); an
    /// MQTT source is told, keeps those messages unacknowledged and hands them over again.
    pub fn refuse(&self, name: &str, pos: u64) {
        if let Some(m) = self.0.iter().find(|m| *m.name == *name) {
            match &m.settled {
                Some(tx) => {
                    let _ = tx.send(Settled::Refused(pos));
                }
                None => {
                    m.pos.fetch_max(pos, Ordering::AcqRel);
                }
            }
        }
    }
}

/// One source's journal, written by its reader thread.
pub struct Journal {
    dir: PathBuf,
    prefix: String,
    /// The current file, mapped.
    map: Option<memmap2::MmapMut>,
    /// Offset of the next record in the current file.
    off: usize,
    /// Position of the current file's first payload byte.
    base: u64,
    /// Position after the last journaled byte.
    end: u64,
    opened: tokio::time::Instant,
    /// Closed files not yet deleted: (first position, end position, path).
    closed: Vec<(u64, u64, PathBuf)>,
    /// Journaling failed: logged once until a new file works again.
    failing: bool,
    /// Reads go here while no file can be mapped.
    fallback: Vec<u8>,
    /// The current file.
    path: PathBuf,
}

/// A file name prefix that is safe for any source name: the name's bytes in hex, or for a
/// long name (whose hex would pass the file system's 255-byte name limit) `h` and a 128-bit
/// hash of it.
fn prefix_of(source: &str) -> String {
    if source.len() > 48 {
        return format!("h{:032x}", xxhash_rust::xxh3::xxh3_128(source.as_bytes()));
    }
    let mut s = String::with_capacity(source.len() * 2);
    for b in source.bytes() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Journal files in `dir` that belong to none of `sources` (a source renamed or removed from
/// the config): `(source name, or its hash for a long name; files; bytes)`. Their reads are
/// not recovered by anyone; the daemon warns at start rather than deleting them.
pub fn orphans(dir: &Path, sources: &[&str]) -> Vec<(String, usize, u64)> {
    let known: Vec<String> = sources.iter().map(|s| prefix_of(s)).collect();
    let mut found: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.ends_with(".jnl") {
            continue;
        }
        let Some((prefix, _)) = name.split_once('.') else {
            continue;
        };
        if known.iter().any(|k| k == prefix) {
            continue;
        }
        let e = found.entry(prefix.to_string()).or_default();
        e.0 += 1;
        e.1 += entry.metadata().map_or(0, |m| m.len());
    }
    found
        .into_iter()
        .map(|(prefix, (files, bytes))| {
            let decoded = (!prefix.starts_with('h'))
                .then(|| crate::config::unhex(&prefix))
                .flatten()
                .and_then(|b| String::from_utf8(b).ok());
            (decoded.unwrap_or(prefix), files, bytes)
        })
        .collect()
}

/// Allocate `len` bytes of `f` (`posix_fallocate`).
fn allocate(f: &std::fs::File, len: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: posix_fallocate only reads its integer arguments; the descriptor is open.
    let r = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// A journal file's name: `<prefix>.<first position>.jnl`, or `….brk.jnl` for a file that
/// starts a new byte stream (the port was reopened: what came before it is not continued).
fn path_of(dir: &Path, prefix: &str, base: u64, brk: bool) -> PathBuf {
    let brk = if brk { ".brk" } else { "" };
    dir.join(format!("{prefix}.{base:020}{brk}.jnl"))
}

/// Positions beyond this (from a file name on disk) are not ours: such files are skipped.
/// (Positions are stored as SQLite integers; a journal never reaches 2^62 bytes.)
const MAX_POS: u64 = 1 << 62;

/// The journal files of `prefix` in `dir`, by first position: (position, starts a new
/// stream, path).
fn files_of(dir: &Path, prefix: &str) -> Vec<(u64, bool, PathBuf)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in rd.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_suffix(".jnl"))
        else {
            continue;
        };
        let (rest, brk) = match rest.strip_suffix(".brk") {
            Some(r) => (r, true),
            None => (rest, false),
        };
        match rest.parse::<u64>() {
            Ok(base) if base < MAX_POS => out.push((base, brk, entry.path())),
            _ => {
                tracing::warn!(path = %entry.path().display(), "Ignoring a journal file whose name is not one scangate writes")
            }
        }
    }
    out.sort();
    out
}

fn header(data: &[u8], at: usize) -> Option<(usize, u32, i64)> {
    let h = data.get(at..at + HEADER)?;
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    let mut wall = [0u8; 8];
    wall.copy_from_slice(&h[8..16]);
    Some((word(0) as usize, word(4), i64::from_le_bytes(wall)))
}

/// The reads recorded in one journal file's bytes: (wall ms, payload), in order, up to the
/// first record that is empty, damaged, or was pending when the process died (its bytes up to
/// the last non-zero one are included).
pub fn parse_records(data: &[u8]) -> Vec<(i64, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some((len, state, wall)) = header(data, at) {
        if len == 0 || len > READ_MAX {
            break;
        }
        let Some(payload) = data.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        match state {
            DONE => out.push((wall, payload)),
            PENDING => {
                if let Some(last) = payload.iter().rposition(|&b| b != 0) {
                    out.push((wall, &payload[..=last]));
                }
                break;
            }
            _ => break,
        }
        at += HEADER + len;
    }
    out
}

fn put_header(map: &mut [u8], at: usize, len: usize, state: u32, wall_ms: i64) {
    if let Some(h) = map.get_mut(at..at + HEADER) {
        h[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        h[8..16].copy_from_slice(&wall_ms.to_le_bytes());
        h[4..8].copy_from_slice(&state.to_le_bytes());
    }
}

impl Journal {
    /// Open the journal of `source` in `dir`, calling `recover(bytes, wall_ms, end_pos,
    /// new_stream)` for every byte after `committed`, in order, before it returns;
    /// `new_stream` is true for the first bytes after the port was reopened (a frame cut by
    /// the reopening must not be joined to what follows). Journaling goes on from the
    /// end of what exists (or from `committed`, if the files are gone).
    pub fn open(
        dir: &Path,
        source: &str,
        committed: u64,
        mut recover: impl FnMut(&[u8], i64, u64, bool),
    ) -> std::io::Result<Journal> {
        std::fs::create_dir_all(dir)?;
        let prefix = prefix_of(source);
        let mut closed = Vec::new();
        let mut end = committed;
        for (base, brk, path) in files_of(dir, &prefix) {
            let mut new_stream = brk;
            let data = match std::fs::read(&path) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "Cannot read a port journal file; skipping it");
                    continue;
                }
            };
            let mut pos = base;
            for (wall_ms, bytes) in parse_records(&data) {
                // Positions come from a file name on disk: never trust them to be sane.
                let rec_end = pos.saturating_add(bytes.len() as u64);
                if rec_end > committed {
                    let from = committed.saturating_sub(pos) as usize;
                    if let Some(tail) = bytes.get(from..) {
                        recover(tail, wall_ms, rec_end, std::mem::take(&mut new_stream));
                    }
                } else {
                    // A break before committed bytes is behind us already.
                    new_stream = false;
                }
                pos = rec_end;
            }
            if pos == base {
                // Nothing recoverable in it.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            end = end.max(pos);
            closed.push((base, pos, path));
        }
        let end = end.min(MAX_POS);
        let mut j = Journal {
            dir: dir.to_path_buf(),
            prefix,
            map: None,
            off: 0,
            base: end,
            end,
            opened: tokio::time::Instant::now(),
            closed,
            failing: false,
            fallback: Vec::new(),
            path: PathBuf::new(),
        };
        j.start_file(false)?;
        Ok(j)
    }

    fn start_file(&mut self, brk: bool) -> std::io::Result<()> {
        self.map = None;
        let path = path_of(&self.dir, &self.prefix, self.end, brk);
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        // Allocated, not sparse: a store into a hole of a mapped file that the disk cannot
        // back kills the process with SIGBUS (a full disk). With the blocks allocated up front
        // a full disk is an error here, and the journal is bypassed instead.
        allocate(&f, FILE_SIZE)?;
        // SAFETY: the file is this journal's own, in the state directory, opened and sized
        // here; no other process writes it while it is mapped (one scangate per state
        // directory, enforced by the spool lock), and it is only read back after this process
        // ended.
        let map = unsafe { memmap2::MmapMut::map_mut(&f)? };
        self.map = Some(map);
        self.path = path;
        self.off = 0;
        self.base = self.end;
        self.opened = tokio::time::Instant::now();
        Ok(())
    }

    /// Position after the last journaled byte.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// One `read(2)` of up to `want` bytes from `port`, straight into the journal. Returns
    /// the bytes, the position after them and the wall time they were received. `Ok` with
    /// an empty slice: the port returned nothing (its read timer ran out, or it hung up).
    /// Journal trouble is logged and bypassed: the bytes are then read into memory (and only
    /// then can a crash lose them).
    pub fn read_from(
        &mut self,
        port: &mut impl Read,
        want: usize,
    ) -> std::io::Result<(&[u8], u64, i64)> {
        let want = want.clamp(1, READ_MAX);
        if self.map.is_none() || self.off + 2 * HEADER + want > FILE_SIZE {
            if let Err(e) = self.rotate() {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::error!(dir = %self.dir.display(), error = %e, "Cannot write the port journal: reads still flow, but a crash now may lose the reads in flight");
                }
            } else if std::mem::take(&mut self.failing) {
                tracing::info!(dir = %self.dir.display(), "Port journal writable again");
            }
        }
        let Some(map) = self.map.as_mut() else {
            self.fallback.resize(want, 0);
            let n = port.read(&mut self.fallback[..want])?;
            self.end = self.end.saturating_add(n as u64);
            return Ok((&self.fallback[..n], self.end, crate::event::wall_now_ms()));
        };
        let at = self.off;
        // Pending first: from the read on, a crash finds the bytes (see the module docs). The
        // region after `at` has never been written, so it holds zeros beyond what is read.
        put_header(map, at, want, PENDING, crate::event::wall_now_ms());
        let n = match port.read(&mut map[at + HEADER..at + HEADER + want]) {
            Ok(n) => n,
            Err(e) => {
                put_header(map, at, 0, 0, 0);
                return Err(e);
            }
        };
        let wall_ms = crate::event::wall_now_ms();
        if n == 0 {
            put_header(map, at, 0, 0, 0);
            return Ok((&[], self.end, wall_ms));
        }
        put_header(map, at, n, DONE, wall_ms);
        self.off = at + HEADER + n;
        self.end = self.end.saturating_add(n as u64);
        Ok((&map[at + HEADER..at + HEADER + n], self.end, wall_ms))
    }

    /// Close the current file when it is full or old, and delete every closed file whose
    /// bytes all lie before `settled` (committed, or consumed by the decoder without a read
    /// still in flight).
    pub fn maintain(&mut self, settled: u64) {
        let full = self.end.saturating_sub(self.base) >= FILE_MAX_BYTES;
        let old = self.end > self.base && self.opened.elapsed() >= FILE_MAX_AGE;
        if full || old {
            if let Err(e) = self.rotate() {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::error!(dir = %self.dir.display(), error = %e, "Cannot start a new port journal file");
                }
            }
        }
        self.closed.retain(|(_, end, path)| {
            if *end <= settled {
                if let Err(e) = std::fs::remove_file(path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %path.display(), error = %e, "Cannot delete a settled journal file");
                        return true;
                    }
                }
                false
            } else {
                true
            }
        });
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.rotate_to(false)
    }

    /// The port was reopened: what follows is a new byte stream. A new file marks the break,
    /// so that recovery never joins a frame cut by the reopening to the bytes after it.
    pub fn new_stream(&mut self) {
        if let Err(e) = self.rotate_to(true) {
            tracing::error!(dir = %self.dir.display(), error = %e, "Cannot start a new port journal file");
        }
    }

    fn rotate_to(&mut self, brk: bool) -> std::io::Result<()> {
        if self.map.take().is_some() {
            let path = std::mem::take(&mut self.path);
            if self.end > self.base {
                self.closed.push((self.base, self.end, path));
            } else {
                let _ = std::fs::remove_file(path);
            }
        }
        self.start_file(brk)
    }

    /// Files (closed and current) of this journal: for tests and status.
    pub fn files(&self) -> usize {
        self.closed.len() + usize::from(self.map.is_some())
    }
}

#[cfg(test)]
mod tests {

    /// A source renamed in the config leaves its journal behind: it is found (by its old
    /// name) so the daemon can warn; journals of configured sources are not.
    #[test]
    fn journals_of_sources_no_longer_configured_are_found() {
        let dir = tempfile::tempdir().unwrap();
        for (source, bytes) in [
            ("old-belt", 100usize),
            ("belt", 50),
            (&"x".repeat(60)[..], 10),
        ] {
            std::fs::write(
                path_of(dir.path(), &prefix_of(source), 0, false),
                vec![0; bytes],
            )
            .unwrap();
        }
        let found = orphans(dir.path(), &["belt"]);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found.contains(&("old-belt".to_string(), 1, 100)),
            "{found:?}"
        );
        assert!(found
            .iter()
            .any(|(n, f, b)| n.starts_with('h') && *f == 1 && *b == 10));
        assert!(orphans(dir.path(), &["belt", "old-belt", &"x".repeat(60)]).is_empty());
    }

    use super::*;

    fn recovered(dir: &Path, committed: u64) -> (Vec<u8>, Vec<(i64, u64)>) {
        let mut bytes = Vec::new();
        let mut marks = Vec::new();
        Journal::open(dir, "belt/1", committed, |b, w, end, _| {
            bytes.extend_from_slice(b);
            marks.push((w, end));
        })
        .unwrap();
        (bytes, marks)
    }

    /// One read of `bytes`: (position after it, wall time recorded).
    fn append(j: &mut Journal, bytes: &[u8]) -> (u64, i64) {
        let mut src = bytes;
        let (got, end, wall) = j.read_from(&mut src, bytes.len()).unwrap();
        assert_eq!(got, bytes);
        (end, wall)
    }

    #[test]
    fn uncommitted_bytes_come_back_with_their_wall_time_and_positions() {
        let dir = tempfile::tempdir().unwrap();
        let (w1, w2);
        {
            let mut j = Journal::open(dir.path(), "belt/1", 0, |_, _, _, _| panic!()).unwrap();
            let (e1, a) = append(&mut j, b"0125000001\r\n01250");
            let (e2, b) = append(&mut j, b"00002\r\n");
            assert_eq!((e1, e2), (17, 24));
            (w1, w2) = (a, b);
        }
        assert!(w1 > 1_700_000_000_000 && w2 >= w1, "wall time of each read");
        // Nothing committed: everything.
        let (b, m) = recovered(dir.path(), 0);
        assert_eq!(b, b"0125000001\r\n0125000002\r\n");
        assert_eq!(m, [(w1, 17), (w2, 24)]);
        // Committed up to the first frame's end: the rest only, cut inside a record.
        let (b, m) = recovered(dir.path(), 12);
        assert_eq!(b, b"0125000002\r\n");
        assert_eq!(m, [(w1, 17), (w2, 24)]);
        // Everything committed: nothing.
        let (b, _) = recovered(dir.path(), 24);
        assert!(b.is_empty());
    }

    /// A process killed between a read and marking it done: the bytes are in the file, found
    /// from the pending header. One killed before its read: nothing (zeros) is recovered.
    #[test]
    fn a_read_pending_at_a_crash_is_recovered_and_an_unread_one_is_not() {
        let mut file = vec![0u8; 4096];
        put_header(&mut file, 0, 5, DONE, 7);
        file[HEADER..HEADER + 5].copy_from_slice(b"AAAA\n");
        let at = HEADER + 5;
        put_header(&mut file, at, 100, PENDING, 8);
        file[at + HEADER..at + HEADER + 5].copy_from_slice(b"BBB\r\n");
        let recs = parse_records(&file);
        assert_eq!(recs, [(7, &b"AAAA\n"[..]), (8, &b"BBB\r\n"[..])]);
        // Pending, but the read never happened.
        file[at + HEADER..at + HEADER + 5].fill(0);
        assert_eq!(parse_records(&file), [(7, &b"AAAA\n"[..])]);
    }

    /// A long source name still gives a valid file name; a file name with an absurd position
    /// (from disk) is survived.
    #[test]
    fn long_names_and_absurd_positions_are_survived() {
        let dir = tempfile::tempdir().unwrap();
        let long = "Förderband-Nord-Scanner-Eingang-".repeat(4);
        let mut j = Journal::open(dir.path(), &long, 0, |_, _, _, _| {}).unwrap();
        append(&mut j, b"X1\n");
        drop(j);
        let mut n = 0;
        Journal::open(dir.path(), &long, 0, |b, _, _, _| n += b.len()).unwrap();
        assert_eq!(n, 3);
        // A file claiming to start near u64::MAX is not one we wrote: ignored, and the
        // positions do not wrap.
        let p = path_of(dir.path(), &prefix_of("s"), u64::MAX - 5, false);
        let mut data = vec![0u8; 64];
        put_header(&mut data, 0, 10, DONE, 1);
        data[HEADER..HEADER + 10].copy_from_slice(b"0123456789");
        std::fs::write(&p, &data).unwrap();
        let mut got = 0;
        let j = Journal::open(dir.path(), "s", 0, |b, _, _, _| got += b.len()).unwrap();
        assert_eq!((got, j.end()), (0, 0));
    }

    /// A port reopened between two reads: recovery says so, so that a frame cut by the
    /// reopening is not joined to the bytes after it (a made-up tag).
    #[test]
    fn a_reopened_port_starts_a_new_stream_in_recovery() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(dir.path(), "s", 0, |_, _, _, _| {}).unwrap();
            append(&mut j, b"ABCDEF");
            j.new_stream();
            append(&mut j, b"0125000009\r\n");
        }
        let mut seen = Vec::new();
        Journal::open(dir.path(), "s", 0, |b, _, _, fresh| {
            seen.push((b.to_vec(), fresh))
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                (b"ABCDEF".to_vec(), false),
                (b"0125000009\r\n".to_vec(), true)
            ]
        );
    }

    #[test]
    fn any_damage_ends_parsing_without_a_panic() {
        let mut file = vec![0u8; 2048];
        put_header(&mut file, 0, 5, DONE, 7);
        file[HEADER..HEADER + 5].copy_from_slice(b"AAAA\n");
        for cut in 0..64 {
            let _ = parse_records(&file[..cut]);
        }
        // Garbage of every byte value, and absurd lengths.
        let junk: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        let _ = parse_records(&junk);
        let mut big = vec![0xFFu8; 64];
        big[4..8].copy_from_slice(&DONE.to_le_bytes());
        assert!(parse_records(&big).is_empty());
    }

    #[test]
    fn settled_files_are_deleted_and_positions_continue_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = vec![b'x'; READ_MAX];
        let mut j = Journal::open(dir.path(), "s", 0, |_, _, _, _| {}).unwrap();
        for _ in 0..200 {
            append(&mut j, &chunk);
            j.maintain(0);
        }
        let end = j.end();
        assert_eq!(j.files(), 4, "three closed files of 1 MiB and the open one");
        j.maintain(2 * FILE_MAX_BYTES + 1);
        assert_eq!(j.files(), 2, "the first two are settled");
        j.maintain(end - 1);
        assert_eq!(j.files(), 1, "only the open file is left");
        drop(j);
        let mut n = 0;
        let j = Journal::open(dir.path(), "s", end, |_, _, _, _| n += 1).unwrap();
        assert_eq!(n, 0);
        assert_eq!(j.end(), end);
    }
}
