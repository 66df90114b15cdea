//! The spool against a simple in-memory model, plus fault cases on real files and real
//! (small, mounted) filesystems.

mod common;

use common::body;
use proptest::prelude::*;
use scangate::config::{SyncMode, WhenFull};
use scangate::event::Loc;
use scangate::metrics::Metrics;
use scangate::spool::{Spool, SpoolError, SpoolOptions};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn opts() -> SpoolOptions {
    SpoolOptions {
        sync: SyncMode::Normal,
        ..SpoolOptions::default()
    }
}

fn open(dir: &Path) -> Spool {
    Spool::open(dir, opts(), Arc::new(Metrics::default()))
        .expect("open")
        .0
}

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    /// Read a batch of up to n after the model cursor.
    Read(usize),
    /// Ack the first k events of the last read batch (k as a fraction of 8).
    Ack(u8),
    /// The same, taken now and written later (`ack_later`): by the next append's transaction,
    /// `flush_acks`, or a read that could return them; lost on reopen.
    AckLater(u8),
    FlushAcks,
    /// Dead-letter the event at index i (mod len) of the last read batch.
    DeadLetter(usize),
    Reopen,
    Requeue,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..40).prop_map(Op::Append),
        3 => (1usize..60).prop_map(Op::Read),
        3 => (0u8..=8).prop_map(Op::Ack),
        3 => (0u8..=8).prop_map(Op::AckLater),
        1 => Just(Op::FlushAcks),
        1 => (0usize..100).prop_map(Op::DeadLetter),
        1 => Just(Op::Reopen),
        1 => Just(Op::Requeue),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    #[test]
    fn spool_matches_a_queue_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut sp = open(dir.path());
        // Model: pending (seq, tag) in delivery order; dead letters (seq, tag).
        let mut pending: VecDeque<(u64, String)> = VecDeque::new();
        let mut dead: Vec<(u64, String)> = Vec::new();
        // Acknowledged with ack_later and not yet written: still undelivered on disk.
        let mut deferred: Vec<(u64, String, Loc)> = Vec::new();
        let mut ids: HashMap<u64, uuid::Uuid> = HashMap::new();
        let mut next_tag = 0usize;
        let mut last_read: Vec<scangate::event::SpooledEvent> = Vec::new();
        let mut cursor: Option<Loc> = None;
        let mut last_seq = 0u64;
        for op in ops {
            match op {
                Op::Append(n) => {
                    let bodies: Vec<_> = (0..n).map(|i| body(&format!("t{}", next_tag + i), 1_700_000_000_000)).collect();
                    let r = sp.append(bodies, 1_763_289_000_000).unwrap();
                    prop_assert!(r.first_seq > last_seq, "seq must increase");
                    for i in 0..n {
                        pending.push_back((r.first_seq + i as u64, format!("t{}", next_tag + i)));
                    }
                    last_seq = r.first_seq + n as u64 - 1;
                    next_tag += n;
                    // Written in the append's transaction.
                    deferred.clear();
                }
                Op::Read(n) => {
                    // A read that could return acknowledged events writes them first.
                    if deferred.iter().any(|d| Some(d.2) > cursor) {
                        deferred.clear();
                    }
                    let b = sp.read_after(cursor, 0, n).unwrap();
                    for e in &b {
                        prop_assert!(pending.iter().any(|(s, t)| *s == e.seq && *t == e.body.tag), "read an event the model does not have pending: {} {}", e.seq, e.body.tag);
                        if let Some(old) = ids.insert(e.seq, e.event_id) {
                            prop_assert_eq!(old, e.event_id, "event_id must be stable");
                        }
                    }
                    let seqs: Vec<u64> = b.iter().map(|e| e.seq).collect();
                    let mut sorted = seqs.clone();
                    sorted.sort_unstable();
                    sorted.dedup();
                    prop_assert_eq!(sorted.len(), seqs.len(), "no event twice in a batch");
                    if let Some(l) = b.last() { cursor = Some(l.loc); }
                    last_read = b;
                }
                Op::Ack(k) => {
                    let k = last_read.len() * k as usize / 8;
                    let acked: Vec<_> = last_read.drain(..k).collect();
                    sp.ack(&acked.iter().map(|e| e.loc).collect::<Vec<_>>(), 0).unwrap();
                    pending.retain(|(s, _)| !acked.iter().any(|e| e.seq == *s));
                }
                Op::AckLater(k) => {
                    let k = last_read.len() * k as usize / 8;
                    let acked: Vec<_> = last_read.drain(..k).collect();
                    sp.ack_later(&acked.iter().map(|e| e.loc).collect::<Vec<_>>());
                    for e in &acked {
                        pending.retain(|(s, _)| *s != e.seq);
                        deferred.push((e.seq, e.body.tag.clone(), e.loc));
                    }
                }
                Op::FlushAcks => {
                    sp.flush_acks(0).unwrap();
                    deferred.clear();
                }
                Op::DeadLetter(i) => {
                    if !last_read.is_empty() {
                        let e = last_read.remove(i % last_read.len());
                        sp.dead_letter(&[(e.clone(), Some(422), "bad".into())], 0).unwrap();
                        pending.retain(|(s, _)| *s != e.seq);
                        dead.push((e.seq, e.body.tag.clone()));
                    }
                }
                Op::Reopen => {
                    drop(sp);
                    sp = open(dir.path());
                    // Never written: undelivered again.
                    pending.extend(deferred.drain(..).map(|(s, t, _)| (s, t)));
                    cursor = None;
                    last_read.clear();
                }
                Op::Requeue => {
                    let n = sp.requeue(None, 1_763_289_000_000).unwrap();
                    prop_assert_eq!(n, dead.len());
                    if n > 0 {
                        // Written with the requeued chunk.
                        deferred.clear();
                    }
                    for d in dead.drain(..) {
                        pending.push_back(d);
                    }
                    // Requeued events sit at the end of the queue: restart reading from the top.
                    cursor = None;
                    last_read.clear();
                }
            }
            // Invariants after every step. The backlog on disk still counts deferred acks.
            prop_assert_eq!(sp.backlog().unwrap(), (pending.len() + deferred.len()) as u64);
            prop_assert_eq!(sp.acks_pending(), deferred.len());
            if !deferred.is_empty() {
                // Reading from the start would write them; leave them for the next step.
                continue;
            }
            let all = sp.read_after(None, 0, usize::MAX).unwrap();
            let got: Vec<(u64, String)> = all.iter().map(|e| (e.seq, e.body.tag.clone())).collect();
            let mut want: Vec<(u64, String)> = pending.iter().cloned().collect();
            // Requeued events come after newer ones in commit order; compare as sets + per-chunk order.
            let mut got_sorted = got.clone();
            got_sorted.sort();
            want.sort();
            prop_assert_eq!(got_sorted, want);
            for e in &all {
                if let Some(old) = ids.insert(e.seq, e.event_id) {
                    prop_assert_eq!(old, e.event_id, "event_id must survive reopen and requeue");
                }
            }
            let dl = sp.dead_letters(usize::MAX).unwrap();
            let mut dl_got: Vec<(u64, String)> = dl.iter().map(|d| (d.seq, d.body.as_ref().unwrap().tag.clone())).collect();
            let mut dl_want = dead.clone();
            dl_got.sort();
            dl_want.sort();
            prop_assert_eq!(dl_got, dl_want);
        }
    }
}

/// Regression: SQLite reuses the rowid of a deleted newest row; a chunk committed after the
/// newest chunk was fully acknowledged must still be found after a cursor into the old one.
#[test]
fn regression_chunk_committed_after_newest_chunk_was_acked_is_not_hidden() {
    let dir = tempfile::tempdir().unwrap();
    let mut sp = open(dir.path());
    sp.append(vec![body("a", 1), body("b", 2)], 0).unwrap();
    let b = sp.read_after(None, 0, 10).unwrap();
    let cursor = b.last().map(|e| e.loc);
    sp.ack(&b.iter().map(|e| e.loc).collect::<Vec<_>>(), 0)
        .unwrap();
    sp.append(vec![body("c", 3)], 0).unwrap();
    let next = sp.read_after(cursor, 0, 10).unwrap();
    assert_eq!(
        next.iter().map(|e| e.body.tag.as_str()).collect::<Vec<_>>(),
        ["c"]
    );
    drop(sp);
    let mut sp = open(dir.path());
    assert_eq!(sp.read_after(None, 0, 10).unwrap().len(), 1);
}

#[test]
fn seq_and_event_ids_survive_restart_and_never_repeat() {
    let dir = tempfile::tempdir().unwrap();
    let mut sp = open(dir.path());
    sp.append(vec![body("a", 1)], 10).unwrap();
    let first = sp.read_after(None, 0, 1).unwrap().remove(0);
    sp.ack(&[first.loc], 0).unwrap();
    drop(sp);
    let mut sp = open(dir.path());
    let r = sp.append(vec![body("b", 2)], 10).unwrap();
    assert_eq!(
        r.first_seq,
        first.seq + 1,
        "seq continues after restart even with an empty spool"
    );
    let second = sp.read_after(None, 0, 1).unwrap().remove(0);
    assert_ne!(second.event_id, first.event_id);
}

fn corrupt_cases(garble: impl Fn(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut sp = open(dir.path());
        for i in 0..50 {
            sp.append((0..20).map(|j| body(&format!("x{i}-{j}"), 1)).collect(), 0)
                .unwrap();
        }
    }
    garble(&dir.path().join("spool.db"));
    let metrics = Arc::new(Metrics::default());
    let (mut sp, report) = Spool::open(dir.path(), opts(), metrics.clone())
        .expect("a corrupt spool must not stop the daemon");
    let (aside, reason) = report.moved_aside.expect("corruption must be reported");
    assert!(
        aside
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("spool.db.corrupt-"),
        "{aside:?}"
    );
    assert!(aside.exists(), "the corrupt file is kept for inspection");
    assert!(!reason.is_empty());
    assert_eq!(metrics.spool_corrupt_incidents.get(), 1);
    assert_eq!(
        sp.stats().unwrap().corrupt_incidents,
        1,
        "the incident is visible in status"
    );
    // The fresh spool works, and seq continues above every seq used before, even when the
    // damaged file's header cannot be read (the reservation in spool.id).
    let r = sp.append(vec![body("fresh", 1)], 0).unwrap();
    assert!(r.first_seq > 1000, "seq restarted at {}", r.first_seq);
    assert_eq!(report.quarantined, vec![aside.clone()]);
    assert_eq!(metrics.spool_quarantined.get(), 1);
    assert_eq!(sp.read_after(None, 0, 10).unwrap()[0].body.tag, "fresh");
}

#[test]
fn corrupt_file_of_garbage_is_moved_aside_and_a_fresh_spool_opened() {
    corrupt_cases(|p| {
        std::fs::write(
            p,
            b"this is not a database, it is a shopping list\n".repeat(200),
        )
        .unwrap()
    });
}

#[test]
fn corrupt_pages_inside_a_valid_file_are_detected() {
    corrupt_cases(|p| {
        // Checkpoint first so the data is in the main file, then scribble over b-tree pages.
        let c = rusqlite::Connection::open(p).unwrap();
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        drop(c);
        let mut bytes = std::fs::read(p).unwrap();
        for page in 1..bytes.len() / 1024 {
            let off = page * 1024;
            bytes[off..off + 16].copy_from_slice(&[0xAB; 16]);
        }
        std::fs::write(p, bytes).unwrap();
    });
}

#[test]
fn an_undecodable_chunk_goes_to_dead_letters_with_its_raw_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let mut sp = open(dir.path());
    sp.append(vec![body("ok1", 1)], 0).unwrap();
    sp.append(vec![body("bad", 1)], 0).unwrap();
    sp.append(vec![body("ok2", 1)], 0).unwrap();
    drop(sp);
    let c = rusqlite::Connection::open(dir.path().join("spool.db")).unwrap();
    c.execute("UPDATE chunks SET data = x'01deadbeef' WHERE id = 2", [])
        .unwrap();
    drop(c);
    let metrics = Arc::new(Metrics::default());
    let (mut sp, _) = Spool::open(dir.path(), opts(), metrics.clone()).unwrap();
    let tags: Vec<String> = sp
        .read_after(None, 0, 10)
        .unwrap()
        .into_iter()
        .map(|e| e.body.tag)
        .collect();
    assert_eq!(tags, ["ok1", "ok2"]);
    assert_eq!(metrics.spool_corrupt_chunks.get(), 1);
    let dl = sp.dead_letters(10).unwrap();
    assert_eq!(dl.len(), 1);
    assert!(dl[0].reason.contains("corrupt chunk"));
    assert_eq!(dl[0].raw, vec![0x01, 0xde, 0xad, 0xbe, 0xef]);
}

#[test]
fn max_bytes_drop_oldest_evicts_and_counts_reject_refuses() {
    for policy in [WhenFull::DropOldest, WhenFull::Reject] {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let o = SpoolOptions {
            max_bytes: 1 << 20,
            when_full: policy,
            sync: SyncMode::Normal,
            ..SpoolOptions::default()
        };
        let (mut sp, _) = Spool::open(dir.path(), o, metrics.clone()).unwrap();
        let mut accepted = 0u64;
        let mut refused = 0;
        for i in 0..800 {
            // Incompressible tags so the spool really fills.
            let bodies: Vec<_> = (0..50)
                .map(|j| {
                    body(
                        &format!(
                            "{:016x}{:032x}",
                            ((i * 50 + j) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                            uuid::Uuid::new_v4().as_u128()
                        ),
                        1,
                    )
                })
                .collect();
            match sp.append(bodies, 0) {
                Ok(_) => accepted += 50,
                Err(SpoolError::Full { .. }) => refused += 1,
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert!(sp.used_bytes() <= 1 << 20, "bounded: {}", sp.used_bytes());
        match policy {
            WhenFull::DropOldest => {
                assert_eq!(refused, 0);
                let evicted = metrics.dropped("evicted");
                assert!(evicted > 0);
                assert_eq!(
                    sp.backlog().unwrap(),
                    accepted - evicted,
                    "every event is either here or counted as evicted"
                );
                // The oldest went first: the newest event is still there.
                let all = sp.read_after(None, 0, usize::MAX).unwrap();
                assert_eq!(all.last().unwrap().seq, accepted);
            }
            WhenFull::Reject => {
                assert!(refused > 0);
                assert_eq!(metrics.dropped("spool_full"), refused * 50);
                assert_eq!(
                    sp.backlog().unwrap(),
                    accepted,
                    "nothing accepted is evicted under reject"
                );
            }
        }
    }
}

/// Events acknowledged with `ack_later` and not yet written are delivered: when drop_oldest
/// makes room, they are written first and never counted as evicted.
#[test]
fn drop_oldest_does_not_count_pending_acknowledgements_as_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let o = SpoolOptions {
        max_bytes: 1 << 20,
        when_full: WhenFull::DropOldest,
        sync: SyncMode::Normal,
        ..SpoolOptions::default()
    };
    let (mut sp, _) = Spool::open(dir.path(), o, metrics.clone()).unwrap();
    let incompressible = |i: usize| {
        (0..50)
            .map(|j| {
                let x = ((i * 50 + j) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                body(
                    &format!("{x:016x}{:032x}", uuid::Uuid::new_v4().as_u128()),
                    1,
                )
            })
            .collect::<Vec<_>>()
    };
    let (mut accepted, mut acked) = (0u64, 0u64);
    let mut i = 0;
    // Two chunks in, then the oldest 50 events still there acknowledged (pending until the
    // next append, which makes room by evicting the oldest), until the spool has been full for
    // a while.
    while metrics.dropped("evicted") < 500 && i < 4000 {
        for _ in 0..2 {
            sp.append(incompressible(i), 0).unwrap();
            accepted += 50;
            i += 1;
        }
        let oldest = sp.read_after(None, 0, 50).unwrap();
        sp.ack_later(&oldest.iter().map(|e| e.loc).collect::<Vec<_>>());
        acked += oldest.len() as u64;
    }
    assert!(i < 4000, "the spool never filled");
    sp.flush_acks(0).unwrap();
    let evicted = metrics.dropped("evicted");
    let left = sp.backlog().unwrap();
    assert_eq!(
        left + acked + evicted,
        accepted,
        "each event is left, delivered or evicted, never two of them ({left} left, {acked} acknowledged, {evicted} evicted)"
    );
}

/// Mount a small tmpfs (root only). Returns None, with a printed reason, where that is not possible.
fn mount_tmpfs(dir: &Path, opts: &str) -> Option<()> {
    if unsafe_is_root() {
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Some(());
        }
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (mount failed; a container without CAP_SYS_ADMIN?)"
        );
        None
    } else {
        eprintln!("SKIPPED: not root, cannot mount a small filesystem for the full-disk case");
        None
    }
}

fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn umount(dir: &Path) {
    let _ = Command::new("umount").arg(dir).status();
}

#[test]
fn full_disk_refuses_new_events_keeps_old_ones_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    if mount_tmpfs(dir.path(), "size=2m").is_none() {
        return;
    }
    let result = std::panic::catch_unwind(|| {
        let metrics = Arc::new(Metrics::default());
        let o = SpoolOptions {
            max_bytes: 1 << 30,
            when_full: WhenFull::Reject,
            sync: SyncMode::Full,
            ..SpoolOptions::default()
        };
        let (mut sp, _) = Spool::open(dir.path(), o, metrics).unwrap();
        let mut accepted = 0;
        let mut disk_full = false;
        for i in 0..2000 {
            let bodies: Vec<_> = (0..50)
                .map(|j| {
                    body(
                        &format!(
                            "{:032x}",
                            uuid::Uuid::new_v4().as_u128() ^ (i * 50 + j) as u128
                        ),
                        1,
                    )
                })
                .collect();
            match sp.append(bodies, 0) {
                Ok(_) => accepted += 50,
                Err(SpoolError::DiskFull) => {
                    disk_full = true;
                    break;
                }
                Err(e) => panic!("disk full must be reported as DiskFull, got: {e}"),
            }
        }
        assert!(disk_full, "a 2 MiB filesystem must fill up");
        // Still running: everything accepted is intact and readable.
        let all = sp.read_after(None, 0, usize::MAX).unwrap();
        assert_eq!(all.len(), accepted);
        // Refused again while full, not crashed.
        assert!(matches!(
            sp.append(vec![body("x", 1)], 0),
            Err(SpoolError::DiskFull)
        ));
        // Delivering frees pages inside the file; new events fit again.
        let locs: Vec<Loc> = all.iter().take(accepted / 2).map(|e| e.loc).collect();
        sp.ack(&locs, 0).unwrap();
        sp.append(vec![body("after-recovery", 1)], 0)
            .expect("space returned: accepting again");
        let all = sp.read_after(None, 0, usize::MAX).unwrap();
        assert_eq!(all.last().unwrap().body.tag, "after-recovery");
    });
    umount(dir.path());
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

#[test]
fn read_only_state_dir_is_a_clear_error_not_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    if mount_tmpfs(&state, "ro,size=1m").is_none() {
        return;
    }
    let err = Spool::open(&state, opts(), Arc::new(Metrics::default())).err();
    umount(&state);
    let err = err.expect("a read-only state dir cannot hold a spool");
    let msg = err.to_string();
    assert!(
        msg.contains(&state.display().to_string()),
        "the message names the directory: {msg}"
    );
    assert!(
        msg.contains("writable"),
        "the message says what to fix: {msg}"
    );
}

/// Regression guard: a spool in use by another process must be refused, never judged corrupt
/// and moved aside.
#[test]
fn a_second_user_of_the_same_state_dir_is_refused_and_nothing_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = open(dir.path());
    first.append(vec![body("kept", 1)], 0).unwrap();
    let err = Spool::open(dir.path(), opts(), Arc::new(Metrics::default()))
        .err()
        .expect("second opener refused");
    assert!(matches!(err, SpoolError::Locked { .. }), "{err}");
    assert!(err.to_string().contains("another scangate"), "{err}");
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains("corrupt"));
    assert!(!aside, "a busy spool must not be moved aside");
    assert_eq!(first.read_after(None, 0, 10).unwrap()[0].body.tag, "kept");
    drop(first);
    // Released with the first owner (also on kill -9: the kernel drops the lock).
    assert!(Spool::open(dir.path(), opts(), Arc::new(Metrics::default())).is_ok());
}

#[test]
fn events_returned_by_a_commit_are_exactly_what_reading_back_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mut sp = open(dir.path());
    sp.append(vec![body("before", 1)], 5).unwrap();
    let (r, fresh) = sp
        .append_events(
            (0..40).map(|i| body(&format!("t{i}"), i)).collect(),
            1_763_289_000_123,
            |_, n| n == 40,
        )
        .unwrap();
    let fresh = fresh.expect("kept");
    assert_eq!(fresh.len(), 40);
    assert_eq!(fresh[0].seq, r.first_seq);
    let first = sp.read_after(None, 0, 1).unwrap();
    let back = sp.read_after(Some(first[0].loc), 0, 100).unwrap();
    assert_eq!(back, fresh);
}

#[test]
fn a_chunk_read_in_pieces_and_again_from_earlier_gives_the_same_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut sp = open(dir.path());
    sp.append((0..40).map(|i| body(&format!("t{i}"), i)).collect(), 7)
        .unwrap();
    sp.append((40..50).map(|i| body(&format!("t{i}"), i)).collect(), 8)
        .unwrap();
    let all = sp.read_after(None, 0, 100).unwrap();
    assert_eq!(all.len(), 50);
    // Forward in pieces (each piece continues the decoded chunk)...
    let mut pieces = Vec::new();
    let mut after = None;
    loop {
        let got = sp.read_after(after, 0, 7).unwrap();
        let Some(last) = got.last() else { break };
        after = Some(last.loc);
        pieces.extend(got);
    }
    assert_eq!(pieces, all);
    // ...then back to positions already read: decoded again, not lost.
    assert_eq!(sp.read_after(Some(all[2].loc), 0, 5).unwrap(), all[3..8]);
    assert_eq!(sp.read_after(None, 0, 3).unwrap(), all[..3]);
    // Skipping ahead inside a chunk, then back.
    assert_eq!(sp.read_after(Some(all[30].loc), 0, 2).unwrap(), all[31..33]);
    assert_eq!(sp.read_after(Some(all[10].loc), 0, 2).unwrap(), all[11..13]);
    // Acked events in the middle are skipped, the rest kept in order.
    let acked: Vec<_> = all[12..20].iter().map(|e| e.loc).collect();
    sp.ack(&acked, 9).unwrap();
    let rest = sp.read_after(Some(all[10].loc), 0, 100).unwrap();
    let want: Vec<_> = all[11..12].iter().chain(&all[20..]).cloned().collect();
    assert_eq!(rest, want);
}

/// The spool thread takes an acknowledgement at once and writes it with the next append; when
/// no append comes, on its own after `ACK_DELAY`, where another reader of the file (`scangate
/// status`) sees it; and when the thread stops, before it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_reach_the_file_with_or_without_a_following_append() {
    use scangate::spool::{actor, backlog_of};
    let dir = tempfile::tempdir().unwrap();
    let (h, thread) = actor::spawn(open(dir.path())).unwrap();
    let bodies = |p: &str| {
        (0..10)
            .map(|i| body(&format!("{p}{i}"), 1))
            .collect::<Vec<_>>()
    };
    let on_disk = || backlog_of(&Spool::open_read_only(dir.path()).unwrap()).unwrap();

    // Followed by an append: written in its transaction.
    h.append(bodies("a")).await.unwrap();
    let (read, _) = h.read_after_head(None, 0, 10).await.unwrap();
    h.ack(read.iter().map(|e| e.loc).collect()).await.unwrap();
    h.append(bodies("b")).await.unwrap();
    assert_eq!(on_disk(), 10, "the append wrote the acknowledgements");

    // Nothing follows: written after the delay.
    let (read, _) = h
        .read_after_head(read.last().map(|e| e.loc), 0, 10)
        .await
        .unwrap();
    assert_eq!(read.len(), 10);
    h.ack(read[..4].iter().map(|e| e.loc).collect())
        .await
        .unwrap();
    common::ingest::wait_until(
        "acknowledgements written",
        std::time::Duration::from_secs(10),
        || on_disk() == 6,
    )
    .await;

    // Taken just before the thread stops: written before it ends.
    h.ack(read[4..].iter().map(|e| e.loc).collect())
        .await
        .unwrap();
    drop(h);
    thread.join().unwrap();
    assert_eq!(on_disk(), 0);
}

fn opts_for(gateway: &str) -> SpoolOptions {
    SpoolOptions {
        sync: SyncMode::Normal,
        gateway_id: gateway.into(),
        ..SpoolOptions::default()
    }
}

/// Regression: two gateways imaged from one SD card (a copied state dir) with different
/// gateway ids produced identical event ids for different events.
#[test]
fn a_copied_state_dir_under_another_gateway_id_never_repeats_event_ids() {
    let a = tempfile::tempdir().unwrap();
    let ids = |dir: &Path, gw: &str, tag: &str| {
        let (mut sp, _) = Spool::open(dir, opts_for(gw), Arc::default()).unwrap();
        sp.append((0..5).map(|i| body(&format!("{tag}{i}"), 1)).collect(), 7)
            .unwrap();
        let evs = sp.read_after(None, 0, 100).unwrap();
        evs.iter().map(|e| (e.seq, e.event_id)).collect::<Vec<_>>()
    };
    // The image: a spool that has already been used.
    {
        let (mut sp, _) = Spool::open(a.path(), opts_for("gw-1"), Arc::default()).unwrap();
        sp.append(vec![body("old", 1)], 7).unwrap();
    }
    let b = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(a.path()).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() && !f.ends_with("spool.lock") {
            std::fs::copy(&f, b.path().join(f.file_name().unwrap())).unwrap();
        }
    }
    let on_a = ids(a.path(), "gw-1", "a");
    let on_b = ids(b.path(), "gw-2", "b");
    // Same seqs, same commit time: the gateway id alone tells the ids apart.
    assert_eq!(
        on_a.iter().map(|x| x.0).collect::<Vec<_>>(),
        on_b.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    // The image's own event keeps its id (it was committed before the copy); every event
    // committed after the copy differs.
    assert_eq!(on_a[0], on_b[0]);
    for ((_, x), (_, y)) in on_a.iter().zip(&on_b).skip(1) {
        assert_ne!(x, y);
    }
}

/// Regression: dead letters shared `max_bytes` and were never evicted; an upstream that
/// refuses everything filled the spool with them and `reject` then refused every read.
#[test]
fn dead_letters_have_their_own_bound_and_never_push_out_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let o = SpoolOptions {
        max_bytes: 1 << 20,
        when_full: WhenFull::Reject,
        sync: SyncMode::Normal,
        dead_letter_max_bytes: 256 * 1024,
        ..SpoolOptions::default()
    };
    let (mut sp, _) = Spool::open(dir.path(), o, metrics.clone()).unwrap();
    let big = "Z".repeat(900);
    for round in 0..40 {
        sp.append(
            (0..50)
                .map(|i| body(&format!("{round}-{i}-{big}"), 1))
                .collect(),
            0,
        )
        .unwrap();
        let evs = sp.read_after(None, 0, 100).unwrap();
        let items: Vec<_> = evs
            .into_iter()
            .map(|e| (e, Some(422), "schema changed: field x unknown".to_string()))
            .collect();
        sp.dead_letter(&items, 5).unwrap();
    }
    // 2,000 events of ~1 KB were dead-lettered: 2 MB, twice max_bytes.
    let st = sp.stats().unwrap();
    assert!(st.dead_letters < 2000 && st.dead_letters > 0);
    assert!(metrics.dead_letters_evicted.get() > 0);
    let dl: u64 = sp
        .dead_letters(usize::MAX)
        .unwrap()
        .iter()
        .map(|d| {
            (postcard::to_stdvec(d.body.as_ref().unwrap()).unwrap().len() + d.reason.len() + 64)
                as u64
        })
        .sum();
    assert!(dl <= 256 * 1024, "dead letters hold {dl} bytes");
    // The live backlog is not pushed out: new events are still accepted.
    for i in 0..200 {
        sp.append(vec![body(&format!("live-{i}-{big}"), 1)], 0)
            .expect("live events must not be refused because of dead letters");
    }
    assert_eq!(sp.backlog().unwrap(), 200);
}

/// Requeue goes through the dead letters a page at a time and keeps every id.
#[test]
fn requeue_of_thousands_of_dead_letters_keeps_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let mut sp = open(dir.path());
    sp.append((0..2500).map(|i| body(&format!("d{i}"), 1)).collect(), 3)
        .unwrap();
    let evs = sp.read_after(None, 0, 3000).unwrap();
    let ids: Vec<(u64, uuid::Uuid)> = evs.iter().map(|e| (e.seq, e.event_id)).collect();
    let items: Vec<_> = evs
        .into_iter()
        .map(|e| (e, Some(400), "bad".to_string()))
        .collect();
    sp.dead_letter(&items, 5).unwrap();
    assert_eq!(sp.backlog().unwrap(), 0);
    assert_eq!(sp.requeue(None, 99).unwrap(), 2500);
    assert_eq!(sp.stats().unwrap().dead_letters, 0);
    let back = sp.read_after(None, 0, 3000).unwrap();
    let got: Vec<(u64, uuid::Uuid)> = back.iter().map(|e| (e.seq, e.event_id)).collect();
    assert_eq!(got, ids);
}

/// Regression: a spool file moved aside as corrupt was never sent. `salvage` re-sends its
/// undelivered, decodable events with their original ids and seqs; seq never repeats.
#[test]
fn salvage_resends_a_moved_aside_file_with_original_ids() {
    let dir = tempfile::tempdir().unwrap();
    let original: Vec<(u64, uuid::Uuid, String)>;
    {
        let mut sp = open(dir.path());
        for c in 0..10 {
            sp.append(
                (0..20).map(|i| body(&format!("c{c}-{i}"), 1)).collect(),
                50 + c,
            )
            .unwrap();
        }
        let evs = sp.read_after(None, 0, 1000).unwrap();
        // Half of the first chunk was delivered.
        let first: Vec<_> = evs[..10].iter().map(|e| e.loc).collect();
        sp.ack(&first, 60).unwrap();
        original = evs
            .iter()
            .map(|e| (e.seq, e.event_id, e.body.tag.clone()))
            .collect();
    }
    // As the daemon does with a corrupt file: moved aside; one chunk is damaged in it.
    let aside = dir.path().join("spool.db.corrupt-2026-11-30T120000Z");
    std::fs::rename(dir.path().join("spool.db"), &aside).unwrap();
    let c = rusqlite::Connection::open(&aside).unwrap();
    c.execute("UPDATE chunks SET data = x'01ffff' WHERE id = (SELECT id FROM chunks ORDER BY id LIMIT 1 OFFSET 2)", [])
        .unwrap();
    drop(c);
    let metrics = Arc::new(Metrics::default());
    let (mut sp, report) = Spool::open(dir.path(), opts(), metrics.clone()).unwrap();
    assert_eq!(
        report.quarantined,
        vec![aside.clone()],
        "reported until dealt with"
    );
    assert_eq!(metrics.spool_quarantined.get(), 1);
    let r = sp.salvage(&aside, 1000).unwrap();
    assert!(r.same_ids);
    assert_eq!(
        r.events, 170,
        "10 chunks of 20: half of one delivered, one damaged"
    );
    assert_eq!(r.already_delivered, 10);
    assert_eq!(r.unreadable_rows, 1);
    assert!(scangate::spool::quarantined(dir.path()).is_empty());
    let back = sp.read_after(None, 0, 1000).unwrap();
    let got: Vec<_> = back
        .iter()
        .map(|e| (e.seq, e.event_id, e.body.tag.clone()))
        .collect();
    let want: Vec<_> = original
        .iter()
        .enumerate()
        .filter(|(i, (_, _, t))| *i >= 10 && !t.starts_with("c2-"))
        .map(|(_, x)| x)
        .cloned()
        .collect();
    assert_eq!(got, want);
    // New events continue above every seq the old file used.
    let n = sp.append(vec![body("new", 1)], 2000).unwrap();
    assert!(n.first_seq > 200);
}

/// Regression: salvage collected chunk ids with one scan, which stops at the first damaged
/// page: every chunk after it was abandoned. Each id is looked up on its own.
#[test]
fn salvage_reads_past_a_damaged_page() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut sp = open(dir.path());
        for c in 0..200 {
            sp.append((0..10).map(|i| body(&format!("p{c}-{i}"), 1)).collect(), 50)
                .unwrap();
        }
    }
    let aside = dir.path().join("spool.db.corrupt-2026-11-30T130000Z");
    std::fs::rename(dir.path().join("spool.db"), &aside).unwrap();
    {
        let c = rusqlite::Connection::open(&aside).unwrap();
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }
    let mut bytes = std::fs::read(&aside).unwrap();
    let pages = bytes.len() / 1024;
    let page = pages * 2 / 5;
    for (i, b) in bytes[page * 1024..(page + 1) * 1024].iter_mut().enumerate() {
        *b = [0xde, 0xad, 0xbe, 0xef][i % 4];
    }
    std::fs::write(&aside, &bytes).unwrap();
    let (mut sp, _) = Spool::open(dir.path(), opts(), Arc::default()).unwrap();
    let r = sp.salvage(&aside, 1000).unwrap();
    // Only the chunks on the damaged page are lost; those after it are read.
    assert!(r.events >= 1800, "{r:?}");
    let back = sp.read_after(None, 0, 5000).unwrap();
    assert!(
        back.iter().any(|e| e.body.tag == "p199-9"),
        "the last chunk is salvaged"
    );
}

/// Regression: event ids were derived from the gateway id at send time, so renaming the
/// gateway gave every event already committed a new id (a batch whose 2xx was lost became a
/// duplicate the upstream cannot drop). Committed events keep their ids; new ones get the new
/// gateway's.
#[test]
fn renaming_the_gateway_keeps_the_ids_of_committed_events() {
    let dir = tempfile::tempdir().unwrap();
    let before: Vec<(u64, uuid::Uuid)> = {
        let (mut sp, _) = Spool::open(dir.path(), opts_for("gw-old"), Arc::default()).unwrap();
        sp.append((0..5).map(|i| body(&format!("r{i}"), 1)).collect(), 9)
            .unwrap();
        sp.read_after(None, 0, 10)
            .unwrap()
            .iter()
            .map(|e| (e.seq, e.event_id))
            .collect()
    };
    let (mut sp, _) = Spool::open(dir.path(), opts_for("gw-new"), Arc::default()).unwrap();
    let after: Vec<(u64, uuid::Uuid)> = sp
        .read_after(None, 0, 10)
        .unwrap()
        .iter()
        .map(|e| (e.seq, e.event_id))
        .collect();
    assert_eq!(after, before);
    // New events: the new gateway's salt (not what the old name would have given).
    sp.append(vec![body("n", 1)], 9).unwrap();
    let new = sp.read_after(None, 0, 10).unwrap().pop().unwrap();
    assert_eq!(new.seq, 6);
    drop(sp);
    // The same commit under the old name would have had another id: open a copy of the
    // state as it was, under the old name, and commit the same event there.
    let (mut again, _) = Spool::open(dir.path(), opts_for("gw-old"), Arc::default()).unwrap();
    let ids: Vec<uuid::Uuid> = again
        .read_after(None, 0, 10)
        .unwrap()
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(
        &ids[..5],
        &before.iter().map(|x| x.1).collect::<Vec<_>>()[..]
    );
    assert_eq!(
        ids[5], new.event_id,
        "committed under gw-new: keeps that id"
    );
    let next = again.append(vec![body("m", 1)], 9).unwrap();
    let m = again.read_after(None, 0, 10).unwrap().pop().unwrap();
    assert_eq!(m.seq, next.first_seq);
    assert_ne!(m.event_id, new.event_id);
}

/// Regression: reads refused by a full spool (`when_full = "reject"`) were dropped but their
/// journal positions were never recorded: the port journal grew while the spool refused, and
/// a restart decoded every refused read again. The positions are committed on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_positions_of_refused_reads_are_settled() {
    use scangate::source::journal::JournalMarks;
    let dir = tempfile::tempdir().unwrap();
    let o = SpoolOptions {
        max_bytes: 1 << 20,
        when_full: WhenFull::Reject,
        sync: SyncMode::Normal,
        ..SpoolOptions::default()
    };
    let (sp, _) = Spool::open(dir.path(), o.clone(), Arc::default()).unwrap();
    let belt: Arc<str> = Arc::from("belt");
    let marks = Arc::new(JournalMarks::new(std::slice::from_ref(&belt), &[]));
    let (h, thread) = scangate::spool::actor::spawn_with(sp, marks.clone()).unwrap();
    // Fill the spool until it refuses (incompressible tags).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut pos = 0u64;
    let mut refused = false;
    for _ in 0..400 {
        let bodies: Vec<_> = (0..100)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                body(
                    &format!(
                        "{x:016x}{:016x}{:016x}",
                        x.rotate_left(9),
                        x.rotate_left(31)
                    ),
                    1,
                )
            })
            .collect();
        pos += 100 * 60;
        if h.append(bodies).await.is_err() {
            refused = true;
            // The same group again, as the ingest stage sends it: with its journal mark.
            let more: Vec<_> = (0..400)
                .map(|i| body(&format!("{i:08}{}", "z".repeat(2000)), 1))
                .map(|mut b| {
                    x ^= x << 13;
                    b.tag.push_str(&format!("{x:016x}"));
                    b
                })
                .collect();
            h.append_detached(more, vec![(belt.clone(), pos)], Vec::new())
                .await
                .unwrap();
            break;
        }
    }
    assert!(refused, "the spool never filled");
    h.stats().await.unwrap(); // a round trip: the refused group has been handled
    assert_eq!(
        marks.get("belt"),
        pos,
        "settled in memory: journal files can go"
    );
    drop(h);
    thread.join().unwrap();
    let (sp, _) = Spool::open(dir.path(), o, Arc::default()).unwrap();
    assert_eq!(
        sp.journal_marks().unwrap(),
        vec![("belt".to_string(), pos)],
        "and in the spool: not decoded again at the next start"
    );
}

/// Another process holding a read transaction on the spool blocks checkpoints and the
/// write-ahead log grows without bound (1 MB to 14 MB in two minutes at 5,000 reads/s, silently):
/// its size is a metric, the growth is flagged (and counted against `max_bytes`), and it clears
/// once the reader lets go.
#[test]
fn a_wal_held_open_by_another_process_is_measured_and_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::default());
    let (mut sp, _) = Spool::open(dir.path(), opts(), metrics.clone()).unwrap();
    // Incompressible tags: each commit writes its size to the log.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut tag = || {
        (0..2000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'A' + (x % 26) as u8)
            })
            .collect::<String>()
    };
    sp.append(vec![body(&tag(), 1)], 0).unwrap();
    // "sqlite3 spool.db" left open inside a transaction.
    let reader = rusqlite::Connection::open(sp.path()).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
        .unwrap();
    let mut n = 0;
    while metrics.spool_wal_blocked.get() == 0 {
        let bodies = (0..50).map(|i| body(&tag(), i)).collect();
        sp.append(bodies, 0).unwrap();
        n += 1;
        assert!(n < 1000, "the log never grew past its normal size");
    }
    assert!(metrics.spool_wal_bytes.get() > scangate::spool::WAL_NORMAL);
    // Nothing is evicted for it: evicting events cannot shrink the log.
    assert_eq!(metrics.dropped("evicted"), 0);
    // The reader lets go: with no commit at all, the next measure (a stats request, as
    // /health and the watchdog make) checkpoints and truncates the log and clears the flag.
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    sp.stats().unwrap();
    assert_eq!(metrics.spool_wal_blocked.get(), 0);
    assert!(metrics.spool_wal_bytes.get() <= scangate::spool::WAL_NORMAL);
}
