//! The field tools on the real binary: `sniff --capture` (text and JSON), `sniff --port
//! --protocol auto` on a pty, and `record` → `sniff --capture` round trip.

mod common;

use common::daemon::pty_pair;
use common::frames;
use serialport::SerialPort;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

fn scangate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_scangate"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run scangate")
}

/// Wait (at most 10 s) until `record` has the port open: its header is written after the open.
fn recording_started(file: &std::path::Path) {
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(file).is_ok_and(|t| t.contains("# started")) {
        assert!(
            tokio::time::Instant::now() < end,
            "record never opened the port"
        );
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

fn fixture(p: &str) -> String {
    format!("{}/hardware-fixtures/{p}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn sniff_a_capture_as_json_lines() {
    let out = scangate(&[
        "sniff",
        "--capture",
        &fixture("thingmagic/reference-examples.cap"),
        "--protocol",
        "thingmagic",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let read = lines.iter().find(|v| v["tag"].is_string()).expect("a read");
    assert_eq!(read["kind"], "epc");
    assert_eq!(read["tag"], "000000000000000000001545");
    assert_eq!(read["rssi_dbm"], -60.0);
    assert_eq!(read["antenna"], 1);
    assert!(read["symbology"].is_null());
    // A skip as `skip, reason, bytes`.
    let out = scangate(&[
        "sniff",
        "--capture",
        &fixture("em4100/nasty.cap"),
        "--protocol",
        "em4100",
        "--json",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    let skip: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["skip"] == true)
        .expect("a skip");
    assert_eq!(skip["reason"], "garbage");
    assert!(skip["bytes"].as_u64().unwrap() > 0);
}

#[test]
fn sniff_a_capture_names_its_protocol() {
    for (cap, name) in [
        ("uhf-bb/burst-300-tags.cap", "uhf-bb (certain"),
        ("chafon/burst-300-tags.cap", "chafon (certain"),
        ("thingmagic/burst-300-tags.cap", "thingmagic (certain"),
        ("em4100/burst-100-cards.cap", "em4100 (certain"),
        // A line of noise in it: 94 % of its bytes are reads.
        ("lines/reference-examples.cap", "lines (likely"),
    ] {
        let out = scangate(&["sniff", "--capture", &fixture(cap)]);
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let first = text.lines().next().unwrap_or("");
        assert!(
            first.starts_with(&format!("protocol: {name}")),
            "{cap}: {first}"
        );
    }
}

/// `sniff --port --protocol auto` on a pty carrying ThingMagic frames: it names the protocol
/// and then shows the reads with RSSI and antenna.
#[test]
fn sniff_auto_on_a_live_port() {
    let (mut master, slave) = pty_pair();
    let path = slave.name().unwrap();
    let writer = std::thread::spawn(move || {
        // Frames keep coming for the listening window and the decoding after it.
        for i in 0..400u32 {
            let e = i.to_be_bytes();
            if master
                .write_all(&frames::tm_streamed(
                    -57,
                    3,
                    &[0xE2, 0x00, e[0], e[1], e[2], e[3]],
                ))
                .is_err()
            {
                break;
            }
            std::thread::park_timeout(Duration::from_millis(10));
        }
        master
    });
    let out = scangate(&[
        "sniff",
        "--port",
        &path,
        "--baud",
        "115200",
        "--listen-ms",
        "800",
        "--seconds",
        "1",
    ]);
    let _master = writer.join().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("match: protocol = \"thingmagic\", baud = 115200 (certain)"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("epc") && l.contains("-57.0 dBm") && l.contains("ant 3")),
        "{text}"
    );
    drop(slave);
}

/// `record` writes a capture that `sniff --capture` decodes to the same reads.
#[test]
fn record_then_sniff_the_recording() {
    let dir = tempfile::tempdir().unwrap();
    let (mut master, slave) = pty_pair();
    let path = slave.name().unwrap();
    let file = dir.path().join("field.cap");
    let mut child = Command::new(env!("CARGO_BIN_EXE_scangate"))
        .args([
            "record",
            "--port",
            &path,
            "--baud",
            "57600",
            "--seconds",
            "1.5",
            "--out",
        ])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    recording_started(&file);
    let mut want = Vec::new();
    for i in 0..50u8 {
        let epc = [0x30, 0x00, 0x11, i];
        master
            .write_all(&frames::chafon_realtime(i % 4 + 1, &epc, 0x40 + i))
            .unwrap();
        want.push(format!(
            "{:02X}{:02X}{:02X}{:02X}",
            epc[0], epc[1], epc[2], epc[3]
        ));
    }
    let status = child.wait().unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("scangate-capture v1 serial\n"), "{text}");
    assert!(text.contains("# settings: 57600 8N1"), "{text}");
    let out = scangate(&[
        "sniff",
        "--capture",
        file.to_str().unwrap(),
        "--protocol",
        "chafon",
        "--json",
    ]);
    let tags: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["tag"].as_str().map(str::to_string)
        })
        .collect();
    assert_eq!(tags, want);
    drop(slave);
}

/// A reader that hangs up while `record` runs (a USB unplug: every read returns nothing at
/// once) ends the recording with an error instead of spinning a core.
#[test]
fn record_stops_when_the_device_hangs_up() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let (_master, slave) = pty_pair();
    let path = slave.name().unwrap();
    let file = dir.path().join("gone.cap");
    let mut child = Command::new(env!("CARGO_BIN_EXE_scangate"))
        .args(["record", "--port", &path, "--seconds", "60", "--out"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    recording_started(&file);
    // SAFETY: TIOCVHANGUP on a descriptor this test owns; it takes no argument.
    let r = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCVHANGUP, 0) };
    if r != 0 {
        let _ = child.kill();
        let _ = child.wait();
        println!("SKIPPED: TIOCVHANGUP needs CAP_SYS_ADMIN (run as root)");
        return;
    }
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "record still running 10 s after the hang-up"
        );
        std::thread::park_timeout(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success());
    assert!(err.contains("hung up"), "{err}");
}
