//! The real binary: a real pseudo-terminal as the serial port, a real HTTP server, real
//! signals.

mod common;

use common::daemon::{free_port, metric, pty_pair, wait_metric, write_config, Daemon};
use common::ingest::{wait_until, Ingest};
use serialport::SerialPort;
use std::io::Write;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_pty_lines_to_ingest_end_to_end_then_sigterm_exits_zero() {
    let ingest = Ingest::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut master, slave) = pty_pair();
    let slave_path = slave.name().expect("pty name");
    let admin = free_port();
    let sources = format!("[[source]]\nname = \"belt\"\nkind = \"serial\"\nprotocol = \"lines\"\npath = \"{slave_path}\"\nbaud = 115200\nlocation = \"PTY_BELT_1\"\nscan_type = \"sortation\"\n");
    let cfg = write_config(
        dir.path(),
        &dir.path().join("state"),
        &sources,
        &ingest.base_url(),
        "",
        Some(admin),
    );
    let mut d = Daemon::spawn(&cfg, &dir.path().join("log"));
    let connected = wait_metric(admin, "scangate_sources_connected", 1, T).await;
    assert!(
        connected,
        "daemon never opened the pty; log:\n{}",
        d.log_text()
    );

    let mut wire = Vec::new();
    for i in 0..200 {
        wire.extend_from_slice(format!("0125{:06}\r\n", i).as_bytes());
        if i == 100 {
            // Line noise, then a line with a control byte inside: the noise is skipped, the
            // line dropped.
            wire.extend_from_slice(b"\xff\x00\x07gar\x01bage\r\n");
        }
    }
    // Write in odd-sized pieces: frames split anywhere.
    for piece in wire.chunks(37) {
        master.write_all(piece).unwrap();
    }
    master.flush().unwrap();
    wait_until("200 reads delivered", T, || ingest.unique() == 200).await;
    ingest.with(|s| {
        let e = s.events.iter().find(|e| e["seq"] == 1).expect("seq 1");
        assert_eq!(e["bag_id"], "0125000000");
        assert_eq!(e["location"], "PTY_BELT_1");
        assert_eq!(e["scan_type"], "sortation");
        assert_eq!(e["device_id"], "belt");
        // Commit order (`seq`) is serial order; batches in flight at once may arrive out of
        // order, so the events are compared in `seq` order.
        let mut by_seq: Vec<(u64, &str)> = s
            .events
            .iter()
            .map(|e| (e["seq"].as_u64().unwrap(), e["bag_id"].as_str().unwrap()))
            .collect();
        by_seq.sort_unstable();
        let tags: Vec<&str> = by_seq.iter().map(|(_, t)| *t).collect();
        let want: Vec<String> = (0..200).map(|i| format!("0125{i:06}")).collect();
        assert_eq!(tags, want, "serial order is kept");
    });
    assert_eq!(
        metric(admin, "scangate_dropped_total{reason=\"control_bytes\"}").await,
        Some(1),
        "the garbage line is counted"
    );
    assert_eq!(
        metric(admin, "scangate_dropped_total{reason=\"line_noise\"}").await,
        Some(1),
        "the noise before it is counted"
    );
    d.sigterm();
    let status = d.wait_exit(Duration::from_secs(15)).await;
    assert!(
        status.success(),
        "SIGTERM must drain and exit 0: {status:?}\n{}",
        d.log_text()
    );
    drop(slave);
}

/// Unplug and replug: the port's device goes away (its pseudo-terminal is closed) and comes
/// back as a different device behind the same stable name (as `/dev/serial/by-id/…` links
/// do). The source notices the hang-up, reopens with backoff, and reads from the new device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplugged_serial_port_is_reopened_when_it_comes_back() {
    let ingest = Ingest::start().await;
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("ttyBELT");
    let (mut master, slave) = pty_pair();
    std::os::unix::fs::symlink(slave.name().unwrap(), &link).unwrap();
    let admin = free_port();
    let sources = format!(
        "[[source]]\nname = \"belt\"\nkind = \"serial\"\nprotocol = \"lines\"\npath = \"{}\"\nbaud = 115200\n",
        link.display()
    );
    let cfg = write_config(
        dir.path(),
        &dir.path().join("state"),
        &sources,
        &ingest.base_url(),
        "",
        Some(admin),
    );
    let mut d = Daemon::spawn(&cfg, &dir.path().join("log"));
    let connected = |want: u64| wait_metric(admin, "scangate_sources_connected", want, T);
    assert!(connected(1).await, "never opened; log:\n{}", d.log_text());
    for i in 0..10 {
        master
            .write_all(format!("0125{i:06}\r\n").as_bytes())
            .unwrap();
    }
    wait_until("first device's reads", T, || ingest.unique() == 10).await;

    // Unplug.
    drop(master);
    drop(slave);
    assert!(
        connected(0).await,
        "hang-up not noticed; log:\n{}",
        d.log_text()
    );
    // Replug as another device under the same name.
    let (mut master, slave) = pty_pair();
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(slave.name().unwrap(), &link).unwrap();
    assert!(connected(1).await, "never reopened; log:\n{}", d.log_text());
    for i in 10..20 {
        master
            .write_all(format!("0125{i:06}\r\n").as_bytes())
            .unwrap();
    }
    wait_until("second device's reads", T, || ingest.unique() == 20).await;
    assert!(d.log_text().contains("reopening"), "{}", d.log_text());
    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(15)).await.success());
    drop(slave);
}

fn capture(lines: usize, step_ms: u64) -> String {
    let mut s = String::from("scangate-capture v1 serial\n");
    for i in 0..lines {
        s.push_str(&format!("{} text BAG{:07}\\r\\n\n", i as u64 * step_ms, i));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_flushes_the_spool_and_loses_nothing() {
    let ingest = Ingest::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("long.cap");
    std::fs::write(&cap, capture(20_000, 1)).unwrap();
    let state = dir.path().join("state");
    let sources = format!("[[source]]\nname = \"r\"\nkind = \"replay\"\nprotocol = \"lines\"\nfile = \"{}\"\nspeed = \"recorded\"\n", cap.display());
    let cfg = write_config(dir.path(), &state, &sources, &ingest.base_url(), "", None);
    let mut d = Daemon::spawn(&cfg, &dir.path().join("log"));
    wait_until("some events delivered", T, || ingest.unique() >= 300).await;
    d.sigterm();
    let status = d.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}\n{}", d.log_text());
    assert!(d.log_text().contains("Stopped"), "{}", d.log_text());
    // Every committed seq is either delivered or still in the spool: nothing lost.
    let conn = scangate::spool::Spool::open_read_only(&state).unwrap();
    let stats = scangate::spool::stats_of(&conn).unwrap();
    let committed = stats.next_seq - 1;
    let delivered = ingest.unique() as u64;
    assert!(committed >= 300);
    assert_eq!(
        delivered + stats.backlog,
        committed,
        "delivered {delivered} + backlog {} != committed {committed}",
        stats.backlog
    );
    assert!(committed < 20_000, "stopped mid-stream");
}

/// A replay source of 50 reads played at full speed, and the state dir beside it.
fn short_replay(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    let cap = dir.join("short.cap");
    std::fs::write(&cap, capture(50, 0)).unwrap();
    let sources = format!("[[source]]\nname = \"r\"\nkind = \"replay\"\nprotocol = \"lines\"\nfile = \"{}\"\nspeed = \"max\"\n", cap.display());
    (dir.join("state"), sources)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_command_reports_backlog_and_last_upstream_error() {
    let dir = tempfile::tempdir().unwrap();
    let (state, sources) = short_replay(dir.path());
    // Nothing listens on this port: the upstream is down.
    let cfg = write_config(
        dir.path(),
        &state,
        &sources,
        &format!("http://127.0.0.1:{}", free_port()),
        "",
        None,
    );
    let mut d = Daemon::spawn(&cfg, &dir.path().join("log"));
    let mut out = String::new();
    for _ in 0..1500 {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_scangate"))
            .args(["status", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        out = String::from_utf8_lossy(&o.stdout).to_string();
        if out.contains("backlog:         50 events") && out.contains("connection failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(out.contains("backlog:         50 events"), "{out}");
    assert!(out.contains("upstream error:  connection failed"), "{out}");
    assert!(out.contains("last delivery:   never"), "{out}");
    d.sigterm();
    assert!(d.wait_exit(Duration::from_secs(15)).await.success());
}

#[test]
fn demo_runs_the_whole_pipeline_and_delivers_everything() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scangate"))
        .args(["demo", "--speed", "20"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |name: &str| -> u64 {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in\n{stdout}"));
        line.split(':')
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // 10 bags, each through portal A then portal B (hardware-fixtures/portal/demo/labels.tsv):
    // 20 pass events out of ~2,800 reads.
    let committed = field("events committed");
    assert_eq!(committed, 20, "one event per bag per portal\n{stdout}");
    assert!(field("reads decoded") > 2000, "{stdout}");
    assert_eq!(field("delivered"), committed);
    assert_eq!(field("upstream received"), committed);
    assert_eq!(field("left in spool"), 0);
    // The table: every bag once at A, then once at B, in that order.
    let labels = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/hardware-fixtures/portal/demo/labels.tsv"
    ))
    .unwrap();
    let rows: Vec<(&str, &str)> = stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (tag, loc) = (w.next()?, w.next()?);
            loc.starts_with("PTY_SORT3_PORTAL_").then_some((tag, loc))
        })
        .collect();
    assert_eq!(rows.len(), 20, "{stdout}");
    for line in labels.lines() {
        let mut f = line.split('\t');
        let (tag, zone) = (f.next().unwrap(), f.next().unwrap());
        let want = format!("PTY_SORT3_PORTAL_{zone}");
        assert_eq!(
            rows.iter().filter(|(t, l)| *t == tag && *l == want).count(),
            1,
            "{tag} at {want}\n{stdout}"
        );
    }
    for (tag, _) in &rows {
        let at: Vec<&str> = rows
            .iter()
            .filter(|(t, _)| t == tag)
            .map(|(_, l)| *l)
            .collect();
        assert_eq!(
            at,
            ["PTY_SORT3_PORTAL_A", "PTY_SORT3_PORTAL_B"],
            "{tag}: A then B"
        );
    }
}

/// Regression (review): a SIGTERM while a request waited on a server that never answers took
/// longer than the grace period and blamed the spool ("is it locked by another process?"):
/// the abandoned forwarder still held the spool's handle. Now it is stopped at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_request_that_never_ends_exits_within_the_grace_period() {
    // Accepts connections and reads nothing, answers nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let held = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = held.clone();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = silent.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            keep.lock().unwrap().push(sock);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (state, sources) = short_replay(dir.path());
    let cfg = write_config(
        dir.path(),
        &state,
        &sources,
        &url,
        "timeout_ms = 60000",
        None,
    );
    let mut d = Daemon::spawn_with(&cfg, &dir.path().join("log"), &["--grace-secs", "2"]);
    wait_until("a request is in flight", T, || {
        accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1
    })
    .await;
    let t0 = tokio::time::Instant::now();
    d.sigterm();
    let status = d.wait_exit(Duration::from_secs(30)).await;
    let took = t0.elapsed();
    let log = d.log_text();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(
        took < Duration::from_secs(4),
        "took {took:?} with a 2 s grace\n{log}"
    );
    assert!(!log.contains("locked by another process"), "{log}");
    assert!(log.contains("forwarder did not stop"), "{log}");
    // Nothing lost: the 50 events are still in the spool.
    let conn = scangate::spool::Spool::open_read_only(&state).unwrap();
    assert_eq!(scangate::spool::stats_of(&conn).unwrap().backlog, 50);
    drop(held);
}
