//! Logging under systemd, through the real binary: with `JOURNAL_STREAM` set, every line goes
//! to the journal's socket (`/run/systemd/journal/socket`, bound here by the test as journald
//! would) in the journal's native protocol, with each field of the line as a journal field.
//! CI runs as root on a machine without journald. Where journald runs, the socket is its own
//! and this test cannot take its place: it says so and checks nothing.

mod common;

use common::daemon::{pty_pair, write_config, Daemon};
use common::ingest::{wait_until, Ingest};
use serialport::SerialPort;
use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SOCKET: &str = "/run/systemd/journal/socket";
const T: Duration = Duration::from_secs(30);

/// One journal entry of the native protocol: `KEY=value\n`, or `KEY\n` + 64-bit LE length +
/// bytes + `\n` for values with a newline.
fn parse(mut b: &[u8]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    while !b.is_empty() {
        let nl = b.iter().position(|&c| c == b'\n').unwrap_or(b.len());
        let line = &b[..nl];
        if let Some(eq) = line.iter().position(|&c| c == b'=') {
            out.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            b = &b[(nl + 1).min(b.len())..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &b[(nl + 1).min(b.len())..];
            if rest.len() < 8 {
                break;
            }
            let n = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let v = &rest[8..(8 + n).min(rest.len())];
            out.insert(key, String::from_utf8_lossy(v).into_owned());
            b = &rest[(8 + n + 1).min(rest.len())..];
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_entries_carry_each_field() {
    let path = std::path::Path::new(SOCKET);
    if path.exists() {
        let live = UnixDatagram::unbound()
            .and_then(|s| s.connect(path))
            .is_ok();
        if live {
            eprintln!("journald runs here ({SOCKET}): this test needs the socket to itself");
            return;
        }
        // Left by an earlier run of this test that failed.
        std::fs::remove_file(path).expect("remove a stale journal socket");
    }
    std::fs::create_dir_all(path.parent().unwrap())
        .expect("make /run/systemd/journal (as root, as CI runs)");
    let sock = UnixDatagram::bind(path).expect("bind the journal socket (as root, as CI runs)");
    let entries: Arc<Mutex<Vec<HashMap<String, String>>>> = Arc::default();
    let got = entries.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = sock.recv(&mut buf) {
            got.lock().unwrap().push(parse(&buf[..n]));
        }
    });
    let ingest = Ingest::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_master, slave) = pty_pair();
    let sources = format!(
        "[[source]]\nname = \"dock\"\nkind = \"serial\"\nprotocol = \"uhf-bb\"\npath = \"{}\"\n",
        slave.name().unwrap()
    );
    let cfg = write_config(
        dir.path(),
        &dir.path().join("state"),
        &sources,
        &ingest.base_url(),
        "",
        None,
    );
    let d = Daemon::spawn_env(
        &cfg,
        &dir.path().join("stderr.log"),
        &[],
        &[("JOURNAL_STREAM", "0:0"), ("SCANGATE_LOG", "info")],
    );
    wait_until("the port's opening in the journal", T, || {
        entries.lock().unwrap().iter().any(|e| {
            e.get("MESSAGE")
                .is_some_and(|m| m.starts_with("Serial port open"))
        })
    })
    .await;
    let e = entries
        .lock()
        .unwrap()
        .iter()
        .find(|e| {
            e.get("MESSAGE")
                .is_some_and(|m| m.starts_with("Serial port open"))
        })
        .cloned()
        .unwrap();
    // A field of its own, and in the human text too.
    assert_eq!(e.get("SOURCE").map(String::as_str), Some("dock"), "{e:?}");
    assert!(e["MESSAGE"].contains("source=dock"), "{e:?}");
    // INFO is "notice" (5) in systemd-journal-logger's mapping (WARN 4, ERROR 3).
    assert_eq!(e.get("PRIORITY").map(String::as_str), Some("5"), "{e:?}");
    assert_eq!(
        e.get("SYSLOG_IDENTIFIER").map(String::as_str),
        Some("scangate"),
        "{e:?}"
    );
    // Nothing of it on stderr: the journal has it.
    assert!(
        !d.log_text().contains("Serial port open"),
        "{}",
        d.log_text()
    );
    d.sigterm();
    drop(slave);
    let _ = std::fs::remove_file(path);
}
