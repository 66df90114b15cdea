//! The systemd watchdog, through the real binary: `WATCHDOG_USEC` set and a notify socket
//! this test owns. Pings go on while the gateway idles and while reads flow; they stop when
//! a stage is wedged (the dev build's `SCANGATE_FAULT_WEDGE=<stage>@<file>` stops that stage
//! for good once the file exists), and the stage is named in STATUS and the log.

mod common;

use common::daemon::{pty_pair, write_config, Daemon};
use common::frames;
use common::ingest::{wait_until, Ingest};
use serialport::SerialPort;
use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

const T: Duration = Duration::from_secs(30);

/// Everything the daemon sent to the notify socket, with when it arrived.
#[derive(Clone, Default)]
struct Notes(Arc<Mutex<Vec<(Instant, String)>>>);

impl Notes {
    fn listen(path: &std::path::Path) -> Notes {
        let sock = UnixDatagram::bind(path).expect("bind the notify socket");
        let notes = Notes::default();
        let out = notes.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                out.0.lock().unwrap().push((Instant::now(), text));
            }
        });
        notes
    }

    fn count(&self, what: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| t.lines().any(|l| l == what))
            .count()
    }

    /// Messages whose text contains `what`, in order.
    fn matching(&self, what: &str) -> Vec<(Instant, String)> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| t.contains(what))
            .cloned()
            .collect()
    }
}

/// A daemon reading a pty, under a 2 s watchdog, with `stage` wedged once `trigger` exists.
fn start(
    dir: &std::path::Path,
    ingest: &Ingest,
    slave: &str,
    stage: &str,
    trigger: &std::path::Path,
) -> (Daemon, Notes) {
    let sources = format!(
        "[[source]]\nname = \"dock\"\nkind = \"serial\"\nprotocol = \"uhf-bb\"\npath = \"{slave}\"\n"
    );
    let cfg = write_config(
        dir,
        &dir.join("state"),
        &sources,
        &ingest.base_url(),
        "timeout_ms = 1000\n",
        None,
    );
    let sock = dir.join("notify.sock");
    let notes = Notes::listen(&sock);
    let log = dir.join("daemon.log");
    let out = std::fs::File::create(&log).unwrap();
    // As systemd does: WATCHDOG_PID is the daemon's own pid (the shell's, kept by exec).
    let child = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" run --config \"$1\""])
        .arg(env!("CARGO_BIN_EXE_scangate"))
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock)
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("JOURNAL_STREAM")
        .env(
            "SCANGATE_FAULT_WEDGE",
            format!("{stage}@{}", trigger.display()),
        )
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn scangate");
    (Daemon { child, log }, notes)
}

/// Idle, then reads flowing, then `stage` wedged: pings go on, go on, then stop.
async fn pings_stop_when_wedged(stage: &str) {
    let ingest = Ingest::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut master, slave) = pty_pair();
    let trigger = dir.path().join("wedge");
    let (d, notes) = start(
        dir.path(),
        &ingest,
        slave.name().unwrap().as_str(),
        stage,
        &trigger,
    );
    wait_until("READY=1", T, || notes.count("READY=1") == 1).await;
    // Idle (no read at all) for well over the 2 s watchdog interval: an idle stage is not a
    // wedged one, so the pings (every second) go on.
    let idle_from = notes.count("WATCHDOG=1");
    let idle = tokio::time::timeout(T, async {
        while notes.count("WATCHDOG=1") < idle_from + 6 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        idle.is_ok(),
        "pings while idle; notes: {:?}\nlog:\n{}",
        notes.0.lock().unwrap(),
        d.log_text()
    );
    // Reads flow: delivered, and the pings go on.
    for i in 0..20u8 {
        master
            .write_all(&frames::uhf_bb_notice(-50, &[0xAB, i]))
            .unwrap();
    }
    wait_until("20 delivered", T, || ingest.unique() == 20).await;
    let flowing_from = notes.count("WATCHDOG=1");
    wait_until("pings while reads flow", T, || {
        notes.count("WATCHDOG=1") >= flowing_from + 2
    })
    .await;
    assert!(
        notes.matching("made no progress").is_empty(),
        "nothing is wedged yet"
    );
    // Wedge the stage, and give it work so that it reaches its fault point.
    std::fs::write(&trigger, b"").unwrap();
    for i in 0..5u8 {
        master
            .write_all(&frames::uhf_bb_notice(-50, &[0xCD, i]))
            .unwrap();
    }
    let said = format!("{stage} made no progress");
    wait_until("the wedged stage named in STATUS", T, || {
        !notes.matching(&said).is_empty()
    })
    .await;
    let first = notes.matching(&said)[0].0;
    // Three more checks (one a second): each says the stage is wedged, and no ping is sent.
    wait_until("three more checks", T, || notes.matching(&said).len() >= 4).await;
    let pings_after: Vec<_> = notes
        .matching("WATCHDOG=1")
        .into_iter()
        .filter(|(t, _)| *t > first)
        .collect();
    assert!(
        pings_after.is_empty(),
        "pings went on after {stage} was wedged: {pings_after:?}"
    );
    let log = d.log_text();
    assert!(
        log.contains("A stage made no progress within the watchdog interval")
            && log.contains(stage),
        "the wedged stage is named in the log:\n{log}"
    );
    drop(d);
    drop(slave);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_stops_when_the_forwarder_is_wedged() {
    pings_stop_when_wedged("forwarder").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_stops_when_a_source_thread_is_stuck() {
    pings_stop_when_wedged("source dock").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_stops_when_the_ingest_stage_is_wedged() {
    pings_stop_when_wedged("ingest").await;
}
