//! Per-port journals: the bytes each serial port returned, kept in the page cache until the
//! reads decoded from them are committed, so that a process crash (`kill -9`, an abort, the
//! OOM killer) loses nothing that was already read from a port (DESIGN.md, guarantee 1).
//!
//! Owns: `<state_dir>/journal/<source>.<base>.jnl` files, the record format, recovery and
//! deletion. Does not own: what is committed (the spool records, in each commit's own
//! transaction, how far each source's journal is committed: `meta` key `journal:<source>`).
//!
//! How it works:
//! - Every tty read is appended as one record before it is decoded: `[len u32][crc32 u32]
//!   [wall ms i64]` (little-endian) and the bytes. No fsync: the page cache survives a process
//!   crash, and power loss is what the spool's fsynced commit covers.
//! - A position is a count of payload bytes since the source's first journal. Each read carries
//!   the position just after its frame; the spool commits the highest position of each source
//!   in a group with the group.
//! - On start, the bytes after the committed position are decoded again (with the wall time
//!   of the read that brought them) and go into the pipeline before the port is opened.
//! - A file is closed after [`FILE_MAX_BYTES`] or [`FILE_MAX_AGE`] and deleted once everything
//!   in it is settled (committed, or consumed without producing a read). Files deleted within
//!   the kernel's writeback delay (30 s by default) are never written to flash at all.
//!
//! Invariants: positions only grow; a record that is torn or fails its checksum (power loss
//! mid-write) ends its file's recovery; nothing here can stop a port from being read (a
//! journal that cannot be written is logged and skipped).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A journal file is closed once it holds this many payload bytes.
pub const FILE_MAX_BYTES: u64 = 1 << 20;
/// ... or once it is this old (so that settled bytes are deleted before the kernel writes
/// them back to flash).
pub const FILE_MAX_AGE: Duration = Duration::from_secs(5);
/// Record header: length, CRC-32 of the payload, wall time.
const HEADER: usize = 16;
/// Largest record accepted when reading back (a tty read is at most a few KiB).
const RECORD_MAX: u32 = 1 << 20;

/// How far each source's journal is committed, shared by the spool thread (which sets it after
/// each commit) and the serial threads (which delete settled files).
#[derive(Debug, Default)]
pub struct JournalMarks(Vec<(Arc<str>, AtomicU64)>);

impl JournalMarks {
    /// Marks for `names`, starting at the committed positions the spool recorded.
    pub fn new(names: &[Arc<str>], committed: &[(String, u64)]) -> Self {
        JournalMarks(
            names
                .iter()
                .map(|n| {
                    let c = committed
                        .iter()
                        .find(|(k, _)| **k == **n)
                        .map_or(0, |(_, v)| *v);
                    (n.clone(), AtomicU64::new(c))
                })
                .collect(),
        )
    }

    /// The committed position of `name` (0 when unknown).
    pub fn get(&self, name: &str) -> u64 {
        self.0
            .iter()
            .find(|(n, _)| **n == *name)
            .map_or(0, |(_, v)| v.load(Ordering::Acquire))
    }

    /// Record a committed position (never moves back).
    pub fn set(&self, name: &str, pos: u64) {
        if let Some((_, v)) = self.0.iter().find(|(n, _)| **n == *name) {
            v.fetch_max(pos, Ordering::AcqRel);
        }
    }
}

/// One source's journal, written by its reader thread.
pub struct Journal {
    dir: PathBuf,
    prefix: String,
    file: Option<File>,
    /// Position of the current file's first payload byte.
    base: u64,
    /// Position after the last journaled byte.
    end: u64,
    opened: tokio::time::Instant,
    /// Closed files not yet deleted: (first position, end position, path).
    closed: Vec<(u64, u64, PathBuf)>,
    /// A write failed: logged once until one succeeds again.
    failing: bool,
}

/// A file name prefix that is safe for any source name: the name's bytes in hex.
fn prefix_of(source: &str) -> String {
    let mut s = String::with_capacity(source.len() * 2);
    for b in source.bytes() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The journal files of `prefix` in `dir`, by first position.
fn files_of(dir: &Path, prefix: &str) -> Vec<(u64, PathBuf)> {
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
        if let Ok(base) = rest.parse::<u64>() {
            out.push((base, entry.path()));
        }
    }
    out.sort();
    out
}

/// The records of one journal file: (wall ms, payload), stopping at the first torn or damaged
/// record.
pub fn read_records(path: &Path) -> std::io::Result<Vec<(i64, Vec<u8>)>> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut out = Vec::new();
    let mut at = 0usize;
    while let Some(h) = data.get(at..at + HEADER) {
        let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let (len, crc) = (word(0), word(4));
        let mut wall = [0u8; 8];
        wall.copy_from_slice(&h[8..16]);
        if len == 0 || len > RECORD_MAX {
            break;
        }
        let Some(payload) = data.get(at + HEADER..at + HEADER + len as usize) else {
            break;
        };
        let mut c = flate2::Crc::new();
        c.update(payload);
        if c.sum() != crc {
            break;
        }
        out.push((i64::from_le_bytes(wall), payload.to_vec()));
        at += HEADER + len as usize;
    }
    Ok(out)
}

impl Journal {
    /// Open the journal of `source` in `dir`, calling `recover(bytes, wall_ms, end_pos)` for
    /// every byte after `committed`, in order, before it returns. Journaling goes on from the
    /// end of what exists (or from `committed`, if the files are gone).
    pub fn open(
        dir: &Path,
        source: &str,
        committed: u64,
        mut recover: impl FnMut(&[u8], i64, u64),
    ) -> std::io::Result<Journal> {
        std::fs::create_dir_all(dir)?;
        let prefix = prefix_of(source);
        let mut closed = Vec::new();
        let mut end = committed;
        for (base, path) in files_of(dir, &prefix) {
            let records = match read_records(&path) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "Cannot read a port journal file; skipping it");
                    continue;
                }
            };
            // A file that starts before the previous one ended overlaps it (never written so):
            // positions are taken from the file's own base.
            let mut pos = base;
            for (wall_ms, bytes) in records {
                let rec_end = pos + bytes.len() as u64;
                if rec_end > committed {
                    let from = committed.saturating_sub(pos) as usize;
                    if let Some(tail) = bytes.get(from..) {
                        recover(tail, wall_ms, rec_end);
                    }
                }
                pos = rec_end;
            }
            if pos == base {
                // Nothing recoverable in it (empty, or torn at its first record).
                let _ = std::fs::remove_file(&path);
                continue;
            }
            end = end.max(pos);
            closed.push((base, pos, path));
        }
        let mut j = Journal {
            dir: dir.to_path_buf(),
            prefix,
            file: None,
            base: end,
            end,
            opened: tokio::time::Instant::now(),
            closed,
            failing: false,
        };
        j.start_file()?;
        Ok(j)
    }

    fn start_file(&mut self) -> std::io::Result<()> {
        let path = self
            .dir
            .join(format!("{}.{:020}.jnl", self.prefix, self.end));
        let f = OpenOptions::new().create(true).append(true).open(&path)?;
        self.file = Some(f);
        self.base = self.end;
        self.opened = tokio::time::Instant::now();
        Ok(())
    }

    /// Position after the last journaled byte.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Append one tty read. Returns the position after it. A failed write is logged (once
    /// until writes work again); the position still moves on, so positions stay consistent.
    pub fn append(&mut self, bytes: &[u8], wall_ms: i64) -> u64 {
        if bytes.is_empty() {
            return self.end;
        }
        let mut rec = Vec::with_capacity(HEADER + bytes.len());
        let mut c = flate2::Crc::new();
        c.update(bytes);
        rec.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        rec.extend_from_slice(&c.sum().to_le_bytes());
        rec.extend_from_slice(&wall_ms.to_le_bytes());
        rec.extend_from_slice(bytes);
        let written = match self.file.as_mut() {
            Some(f) => f.write_all(&rec),
            None => Err(std::io::Error::other("no journal file open")),
        };
        match written {
            Ok(()) => {
                if std::mem::take(&mut self.failing) {
                    tracing::info!(dir = %self.dir.display(), "Port journal writable again");
                }
                self.end += bytes.len() as u64;
            }
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::error!(dir = %self.dir.display(), error = %e, "Cannot write the port journal: reads still flow, but a crash now may lose the reads in flight");
                }
                // Bytes that are not in the file cannot be recovered: the next file starts
                // after them.
                self.end += bytes.len() as u64;
                let _ = self.rotate();
            }
        }
        self.end
    }

    /// Close the current file when it is full or old, and delete every closed file whose
    /// bytes all lie before `settled` (committed, or consumed by the decoder without a read
    /// still in flight).
    pub fn maintain(&mut self, settled: u64) {
        let full = self.end - self.base >= FILE_MAX_BYTES;
        let old = self.end > self.base && self.opened.elapsed() >= FILE_MAX_AGE;
        if full || old {
            let _ = self.rotate();
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
        if let Some(f) = self.file.take() {
            drop(f);
            let path = self
                .dir
                .join(format!("{}.{:020}.jnl", self.prefix, self.base));
            self.closed.push((self.base, self.end, path));
        }
        self.start_file()
    }

    /// Files (closed and current) of this journal: for tests and status.
    pub fn files(&self) -> usize {
        self.closed.len() + usize::from(self.file.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recovered(dir: &Path, committed: u64) -> (Vec<u8>, Vec<(i64, u64)>) {
        let mut bytes = Vec::new();
        let mut marks = Vec::new();
        Journal::open(dir, "belt/1", committed, |b, w, end| {
            bytes.extend_from_slice(b);
            marks.push((w, end));
        })
        .unwrap();
        (bytes, marks)
    }

    #[test]
    fn uncommitted_bytes_come_back_with_their_wall_time_and_positions() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(dir.path(), "belt/1", 0, |_, _, _| panic!()).unwrap();
            assert_eq!(j.append(b"0125000001\r\n01250", 10), 17);
            assert_eq!(j.append(b"00002\r\n", 11), 24);
        }
        // Nothing committed: everything.
        let (b, m) = recovered(dir.path(), 0);
        assert_eq!(b, b"0125000001\r\n0125000002\r\n");
        assert_eq!(m, [(10, 17), (11, 24)]);
        // Committed up to the first frame's end: the rest only, cut inside a record.
        let (b, m) = recovered(dir.path(), 12);
        assert_eq!(b, b"0125000002\r\n");
        assert_eq!(m, [(10, 17), (11, 24)]);
        // Everything committed: nothing.
        let (b, _) = recovered(dir.path(), 24);
        assert!(b.is_empty());
    }

    #[test]
    fn a_torn_or_damaged_tail_ends_recovery_without_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = {
            let mut j = Journal::open(dir.path(), "s", 0, |_, _, _| {}).unwrap();
            j.append(b"AAAA\n", 1);
            j.append(b"BBBB\n", 2);
            dir.path().join(format!("{}.{:020}.jnl", prefix_of("s"), 0))
        };
        let full = std::fs::read(&path).unwrap();
        for cut in 0..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let _ = read_records(&path).unwrap();
        }
        let mut bad = full.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xFF;
        std::fs::write(&path, &bad).unwrap();
        assert_eq!(read_records(&path).unwrap().len(), 1);
        // Garbage of every byte value.
        let junk: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        std::fs::write(&path, &junk).unwrap();
        let _ = read_records(&path).unwrap();
    }

    #[test]
    fn settled_files_are_deleted_and_positions_continue_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = vec![b'x'; 300 * 1024];
        let mut j = Journal::open(dir.path(), "s", 0, |_, _, _| {}).unwrap();
        for i in 0..8 {
            j.append(&chunk, i);
            j.maintain(0);
        }
        assert!(j.files() >= 3, "rotated at {FILE_MAX_BYTES} bytes");
        let end = j.end();
        j.maintain(end - 1);
        assert_eq!(
            j.files(),
            2,
            "all but the last closed file and the open one"
        );
        drop(j);
        let mut n = 0;
        let j = Journal::open(dir.path(), "s", end, |_, _, _| n += 1).unwrap();
        assert_eq!(n, 0);
        assert_eq!(j.end(), end);
    }
}
