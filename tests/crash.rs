//! Guarantee 1 under fire: `kill -9` the real binary at random moments while it commits and
//! forwards, 20+ rounds, restarting on the same spool. Every event it ever accepted (every seq
//! below the spool's next_seq) must reach the ingest server. Duplicates are allowed (and
//! counted); loss is not.

mod common;

use common::daemon::{write_config, Daemon};
use common::ingest::{wait_until, Ingest};
use std::collections::HashMap;
use std::time::Duration;

const ROUNDS: usize = 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_never_loses_an_accepted_event() {
    let ingest = Ingest::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("feed.cap");
    let mut text = String::from("scangate-capture v1 serial\n");
    for i in 0..4000u64 {
        text.push_str(&format!("{} text BAG{:07}\\r\\n\n", i / 2, i));
    }
    std::fs::write(&cap, text).unwrap();
    let state = dir.path().join("state");
    let sources = format!("[[source]]\nname = \"r\"\nkind = \"replay\"\nprotocol = \"lines\"\nfile = \"{}\"\nspeed = \"recorded\"\nrepeat = 1000\n", cap.display());
    let cfg = write_config(dir.path(), &state, &sources, &ingest.base_url(), "", None);
    let log = dir.path().join("log");

    // A fixed seed per run would hide nothing here; vary it and print it for reproduction.
    let mut next = common::random_moments("crash test");
    for round in 0..ROUNDS {
        let d = Daemon::spawn(&cfg, &log);
        // Wait until this incarnation is really working (new events arrive upstream) ...
        let before = ingest.unique();
        wait_until(
            "the daemon delivers in this round",
            Duration::from_secs(30),
            || ingest.unique() > before,
        )
        .await;
        // ... then kill it at a random moment of its commit/forward cycle.
        let delay = Duration::from_micros(next() % 300_000);
        tokio::time::sleep(delay).await;
        d.kill9();
        eprintln!(
            "round {round}: killed after +{delay:?}, upstream has {}",
            ingest.unique()
        );
    }

    // Final incarnation: no new input (empty replay), drain everything, then stop cleanly.
    let empty = dir.path().join("empty.cap");
    std::fs::write(&empty, "scangate-capture v1 serial\n").unwrap();
    let sources = format!(
        "[[source]]\nname = \"r\"\nkind = \"replay\"\nprotocol = \"lines\"\nfile = \"{}\"\n",
        empty.display()
    );
    let cfg = write_config(dir.path(), &state, &sources, &ingest.base_url(), "", None);
    let mut d = Daemon::spawn(&cfg, &log);
    let conn = scangate::spool::Spool::open_read_only(&state).unwrap();
    let accepted = scangate::spool::stats_of(&conn).unwrap().next_seq - 1;
    drop(conn);
    let seqs = || {
        ingest.with(|s| {
            s.events
                .iter()
                .filter_map(|e| e["seq"].as_u64())
                .collect::<std::collections::HashSet<u64>>()
        })
    };
    wait_until(
        "every accepted event delivered",
        Duration::from_secs(60),
        || seqs().len() as u64 >= accepted,
    )
    .await;
    // Events delivered by an earlier incarnation that was killed before its ack are already
    // upstream, so the ingest server can have every seq while the spool still resends them:
    // wait for the spool to be empty too (re-sent events count as duplicates).
    wait_until("the spool drained", Duration::from_secs(60), || {
        scangate::spool::Spool::open_read_only(&state)
            .ok()
            .and_then(|c| scangate::spool::stats_of(&c).ok())
            .is_some_and(|s| s.backlog == 0)
    })
    .await;
    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(15)).await.success());

    let got = seqs();
    let missing: Vec<u64> = (1..=accepted).filter(|s| !got.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "lost {} accepted events, first: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // One seq, one event id: retries resend the same id.
    let mut by_seq: HashMap<u64, String> = HashMap::new();
    ingest.with(|s| {
        for e in &s.events {
            let (seq, id) = (e["seq"].as_u64().unwrap(), e["event_id"].as_str().unwrap().to_string());
            if let Some(old) = by_seq.insert(seq, id.clone()) {
                panic!("seq {seq} arrived with two event ids: {old} and {id}");
            }
        }
        eprintln!("accepted {accepted} events over {ROUNDS} kill -9 rounds; duplicates re-sent and filtered by event_id: {}", s.duplicates);
    });
    let conn = scangate::spool::Spool::open_read_only(&state).unwrap();
    assert_eq!(scangate::spool::stats_of(&conn).unwrap().backlog, 0);
}

/// Guarantee 1 for reads in flight (the hardening issue's item 9): a pty fed frames at
/// 2,000/s, the upstream down now and then, `kill -9` at random moments (24 times), a restart
/// on the same state dir each time. Every frame written to the pty must reach the ingest
/// server: bytes read from the port but not yet committed come back from the port journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_serial_load_loses_no_frame_written_to_the_port() {
    serial_crash(
        "protocol = \"lines\"\nbaud = 115200",
        "",
        |i| {
            let mut burst = Vec::new();
            for k in i..i + 20 {
                burst.extend_from_slice(format!("CR{k:08}\r\n").as_bytes());
            }
            (burst, 20)
        },
        |i| format!("CR{i:08}"),
    )
    .await;
}

/// The same with a reader whose frames carry several reads (a Chafon inventory answer with
/// 10 EPCs) and commit groups smaller than a frame: a commit group never ends inside a frame,
/// so a crash neither loses the rest of a frame nor repeats its first reads (each tag arrives
/// under one event id only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_several_reads_per_frame_loses_and_repeats_none() {
    serial_crash(
        "protocol = \"chafon\"",
        "commit_max_events = 7\n",
        |i| {
            let mut burst = Vec::new();
            for f in 0..2 {
                let tags: Vec<(Vec<u8>, u8)> = (0..10)
                    .map(|k| ((i + f * 10 + k) as u32).to_be_bytes().to_vec())
                    .map(|e| (e, 0x50))
                    .collect();
                burst.extend(common::frames::chafon_inventory(0x03, 1, &tags));
            }
            (burst, 20)
        },
        |i| format!("{:08X}", i as u32),
    )
    .await;
}

/// `kill -9` rounds against a serial source: `source` is the protocol's TOML lines, `spool`
/// extra `[spool]` lines; `burst(i)` gives the bytes of reads `i..i+n` and `n`; `tag(i)` the
/// tag of read `i`.
async fn serial_crash(
    source: &str,
    spool: &str,
    burst: fn(u64) -> (Vec<u8>, u64),
    tag: fn(u64) -> String,
) {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let ingest = Ingest::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut master, slave) = common::daemon::pty_pair();
    let slave_path = serialport::SerialPort::name(&slave).expect("pty name");
    // While the daemon is dead (and on a loaded machine its restart takes a while), nobody
    // reads the tty and its buffer fills: the writer waits, as a reader's UART would stall,
    // rather than failing the run (serialport's default write timeout is 0).
    serialport::SerialPort::set_timeout(&mut master, Duration::from_secs(60)).expect("timeout");
    // The test keeps the slave open (without reading it) so the tty and its buffer live on
    // while the daemon is dead, as a real UART's driver does.
    let state = dir.path().join("state");
    let sources = format!("{spool}[[source]]\nname = \"belt\"\nkind = \"serial\"\n{source}\npath = \"{slave_path}\"\n");
    let cfg = write_config(dir.path(), &state, &sources, &ingest.base_url(), "", None);
    let log = dir.path().join("log");

    // The writer: 20 reads every 10 ms (2,000/s), until told to stop.
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, stop) = (written.clone(), stop.clone());
        std::thread::spawn(move || {
            let (_tx, pace) = std::sync::mpsc::channel::<()>();
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let (bytes, n) = burst(i);
                master.write_all(&bytes).expect("pty write");
                i += n;
                written.store(i, Ordering::Release);
                let _ = pace.recv_timeout(Duration::from_millis(10));
            }
            master
        })
    };

    let mut next = common::random_moments("serial crash test");
    let committed = || {
        scangate::spool::Spool::open_read_only(&state)
            .ok()
            .and_then(|c| scangate::spool::stats_of(&c).ok())
            .map_or(0, |s| s.next_seq)
    };
    for round in 0..ROUNDS {
        // The upstream is down for a third of the rounds: reads pile up in the spool.
        let down = next().is_multiple_of(3);
        ingest.with(|s| s.down = down);
        let d = Daemon::spawn(&cfg, &log);
        let before = committed();
        wait_until(
            "the daemon commits reads in this round",
            Duration::from_secs(30),
            || committed() > before,
        )
        .await;
        let delay = Duration::from_micros(next() % 300_000);
        tokio::time::sleep(delay).await;
        d.kill9();
        eprintln!(
            "round {round}: killed after +{delay:?} (upstream {}), written {}, upstream has {}",
            if down { "down" } else { "up" },
            written.load(Ordering::Acquire),
            ingest.unique()
        );
    }
    ingest.with(|s| s.down = false);
    let mut d = Daemon::spawn(&cfg, &log);
    stop.store(true, Ordering::Release);
    let master = writer.join().expect("writer");
    let total = written.load(Ordering::Acquire);
    let tags = || {
        ingest.with(|s| {
            s.events
                .iter()
                .filter_map(|e| e["bag_id"].as_str().map(str::to_string))
                .collect::<std::collections::HashSet<String>>()
        })
    };
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while (tags().len() as u64) < total && tokio::time::Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = tags();
    assert_eq!(
        ingest.with(|s| s.id_collisions),
        0,
        "two different events shared an event id"
    );
    let missing: Vec<u64> = (0..total).filter(|i| !got.contains(&tag(*i))).collect();
    // A read committed twice would arrive under two event ids.
    let repeated: Vec<String> = ingest.with(|s| {
        let mut ids: HashMap<&str, std::collections::HashSet<&str>> = HashMap::new();
        for e in &s.events {
            if let (Some(t), Some(id)) = (e["bag_id"].as_str(), e["event_id"].as_str()) {
                ids.entry(t).or_default().insert(id);
            }
        }
        ids.into_iter()
            .filter(|(_, v)| v.len() > 1)
            .map(|(t, _)| t.to_string())
            .collect()
    });
    let seq_gaps: Vec<u64> = ingest.with(|s| {
        let seqs: std::collections::HashSet<u64> =
            s.events.iter().filter_map(|e| e["seq"].as_u64()).collect();
        let max = seqs.iter().copied().max().unwrap_or(0);
        (1..=max).filter(|q| !seqs.contains(q)).collect()
    });
    assert!(
        missing.is_empty(),
        "{} of {total} frames written to the pty never arrived (first: {:?}); seqs missing upstream (committed, not delivered): {seq_gaps:?}; log:\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        d.log_text()
            .lines()
            .filter(|l| l.contains("Recovered") || l.contains("ERROR") || l.contains("journal") || l.contains("scangate starting") || l.contains("Serial port"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        got.len() as u64,
        total,
        "no frame arrives that was not written"
    );
    assert!(
        repeated.is_empty(),
        "{} reads were committed twice (e.g. {:?})",
        repeated.len(),
        &repeated[..repeated.len().min(5)]
    );
    eprintln!(
        "{total} frames over {ROUNDS} kill -9 rounds: all delivered; duplicates filtered by event_id: {}",
        ingest.with(|s| s.duplicates)
    );
    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(15)).await.success());
    drop((master, slave));
}

/// Issue 16's crash test: `kill -9` during passes (24 rounds at random moments), restarting on
/// the same state dir. A portal reader reports every tag 40 times (all of a tag's reads in one
/// write, tags 20 ms apart: several passes open at any moment). Every pass that had started
/// must arrive exactly once by event id, with all 40 of its reads counted: the open passes
/// come back from the spool's pass log and the reads after the last commit from the port
/// journal, so a crash neither loses nor repeats a pass, nor splits one, nor counts a read
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_passes_emits_every_pass_once_with_every_read() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    const READS: u64 = 40;
    let tag = |i: u64| format!("30{i:022X}");

    let ingest = Ingest::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut master, slave) = common::daemon::pty_pair();
    let slave_path = serialport::SerialPort::name(&slave).expect("pty name");
    // While the daemon is dead (and on a loaded machine its restart takes a while), nobody
    // reads the tty and its buffer fills: the writer waits, as a reader's UART would stall,
    // rather than failing the run (serialport's default write timeout is 0).
    serialport::SerialPort::set_timeout(&mut master, Duration::from_secs(60)).expect("timeout");
    let state = dir.path().join("state");
    // A window far longer than a restart takes: a pass cut by a kill goes on after it.
    let sources = format!("[[source]]\nname = \"portal\"\nkind = \"serial\"\nprotocol = \"lines\"\nbaud = 115200\nfields = [\"tag\", \"rssi\", \"antenna\"]\nseparator = \",\"\nwindow_ms = 3000\nlocation = \"GATE_7\"\npath = \"{slave_path}\"\n");
    let cfg = write_config(dir.path(), &state, &sources, &ingest.base_url(), "", None);
    let log = dir.path().join("log");

    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (written, stop) = (written.clone(), stop.clone());
        std::thread::spawn(move || {
            let (_tx, pace) = std::sync::mpsc::channel::<()>();
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let mut burst = Vec::new();
                for k in 0..READS {
                    // RSSI -70.0 .. -31.0: the peak is the 40th read's.
                    burst.extend_from_slice(format!("30{i:022X},-{}.0,1\r\n", 70 - k).as_bytes());
                }
                master.write_all(&burst).expect("pty write");
                i += 1;
                written.store(i, Ordering::Release);
                let _ = pace.recv_timeout(Duration::from_millis(20));
            }
            master
        })
    };
    let mut next = common::random_moments("pass crash test");
    let passes_committed = || {
        scangate::spool::Spool::open_read_only(&state)
            .ok()
            .and_then(|c| scangate::spool::stats_of(&c).ok())
            .map_or(0, |s| s.next_seq)
    };
    for round in 0..ROUNDS {
        let d = Daemon::spawn(&cfg, &log);
        let before = passes_committed();
        wait_until(
            "the daemon emits passes in this round",
            Duration::from_secs(30),
            || passes_committed() > before,
        )
        .await;
        let delay = Duration::from_micros(next() % 300_000);
        tokio::time::sleep(delay).await;
        d.kill9();
        eprintln!(
            "round {round}: killed after +{delay:?}, tags written {}, upstream has {}",
            written.load(Ordering::Acquire),
            ingest.unique()
        );
    }
    let mut d = Daemon::spawn(&cfg, &log);
    stop.store(true, Ordering::Release);
    let master = writer.join().expect("writer");
    let total = written.load(Ordering::Acquire);
    let events = || {
        ingest.with(|s| {
            let mut by_tag: HashMap<String, HashMap<String, u64>> = HashMap::new();
            for e in &s.events {
                if let (Some(t), Some(id), Some(n)) = (
                    e["bag_id"].as_str(),
                    e["event_id"].as_str(),
                    e["read_count"].as_u64(),
                ) {
                    by_tag
                        .entry(t.to_string())
                        .or_default()
                        .insert(id.to_string(), n);
                }
            }
            by_tag
        })
    };
    wait_until(
        "a pass of every tag written delivered",
        Duration::from_secs(60),
        || events().len() as u64 >= total,
    )
    .await;
    let got = events();
    let mut bad = Vec::new();
    for i in 0..total {
        match got.get(&tag(i)) {
            None => bad.push(format!("{}: no event", tag(i))),
            Some(ids) if ids.len() != 1 => {
                bad.push(format!("{}: {} events {:?}", tag(i), ids.len(), ids))
            }
            Some(ids) => {
                let n = *ids.values().next().unwrap();
                if n != READS {
                    bad.push(format!("{}: read_count {n}, not {READS}", tag(i)));
                }
            }
        }
    }
    assert_eq!(got.len() as u64, total, "no pass of a tag not written");
    assert!(
        bad.is_empty(),
        "{} of {total} passes wrong after {ROUNDS} kill -9 rounds, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(8)]
    );
    let peaks_ok = ingest.with(|s| {
        s.events
            .iter()
            .all(|e| e["signal_strength"].as_i64() == Some(-31) && e["location"] == "GATE_7")
    });
    assert!(
        peaks_ok,
        "every pass's peak is its strongest read, at its zone"
    );
    eprintln!(
        "{total} passes of {READS} reads over {ROUNDS} kill -9 rounds: each once, every read counted; duplicates filtered by event_id: {}",
        ingest.with(|s| s.duplicates)
    );
    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(15)).await.success());
    drop((master, slave));
}
