//! `scangate demo`: the real pipeline with no hardware and nothing to install. Two RFID portals
//! on one baggage belt, 3 m apart with overlapping fields, read by readers of two makes (a
//! text-mode reader and a "BB … 7E" module; `hardware-fixtures/portal/demo/`, 10 bags, ~40
//! reads/s per reader per tag), are replayed into the real suppression stage (one arbitration
//! group: each bag gives one event at portal A, then one at portal B, with its read count and
//! peak RSSI), the real spool (in a temporary directory) and the real forwarder, which sends
//! gzip batches to a small bag-events ingest endpoint on loopback inside this process. That
//! endpoint is down (503) for a few seconds mid-run, to show the backlog building up and
//! replaying by itself. Ends when everything is delivered; Ctrl-C ends early.

use crate::app::{self, RunOptions};
use crate::config::Config;
use crate::metrics::Metrics;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use std::collections::HashSet;
use std::io::{IsTerminal, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Portal A's reader (text mode: `EPC,RSSI,ANTENNA` lines).
pub const CAPTURE_A: &str = include_str!("../hardware-fixtures/portal/demo/a.cap");
/// Portal B's reader ("BB … 7E" module).
pub const CAPTURE_B: &str = include_str!("../hardware-fixtures/portal/demo/b.cap");

/// A scan event as the ingest endpoint received it.
#[derive(Debug, Clone)]
pub struct Scan {
    pub bag_id: String,
    pub location: String,
    pub read_count: u64,
    pub signal_strength: Option<i64>,
    pub first_seen: String,
}

#[derive(Default)]
struct Received {
    ids: HashSet<String>,
    scans: Vec<Scan>,
    events: u64,
    duplicates: u64,
    batches: u64,
    refused: u64,
    bytes: u64,
}

#[derive(Clone)]
struct Endpoint {
    rx: Arc<Mutex<Received>>,
    started: Instant,
    outage: (Duration, Duration),
}

async fn batch(
    State(ep): State<Endpoint>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let t = ep.started.elapsed();
    let Ok(mut r) = ep.rx.lock() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, String::new());
    };
    if t >= ep.outage.0 && t < ep.outage.1 {
        r.refused += 1;
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "{\"detail\":\"demo outage\"}".into(),
        );
    }
    let mut raw = Vec::new();
    let gz = headers.get("content-encoding").is_some_and(|v| v == "gzip");
    let ok = if gz {
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut raw)
            .is_ok()
    } else {
        raw.extend_from_slice(&body);
        true
    };
    let parsed: Option<serde_json::Value> = if ok {
        serde_json::from_slice(&raw).ok()
    } else {
        None
    };
    let Some(events) = parsed
        .as_ref()
        .and_then(|v| v.get("events"))
        .and_then(|e| e.as_array())
    else {
        return (
            StatusCode::BAD_REQUEST,
            "{\"detail\":\"invalid body\"}".into(),
        );
    };
    r.batches += 1;
    r.bytes += body.len() as u64;
    let (mut ingested, mut dups) = (0, 0);
    for e in events {
        let id = e
            .get("event_id")
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string();
        if r.ids.insert(id) {
            ingested += 1;
            let text = |k: &str| {
                e.get(k)
                    .and_then(|x| x.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            r.scans.push(Scan {
                bag_id: text("bag_id"),
                location: text("location"),
                read_count: e.get("read_count").and_then(|x| x.as_u64()).unwrap_or(0),
                signal_strength: e.get("signal_strength").and_then(|x| x.as_i64()),
                first_seen: text("first_seen"),
            });
        } else {
            dups += 1;
        }
    }
    r.events += ingested;
    r.duplicates += dups;
    (StatusCode::OK, format!("{{\"status\":\"success\",\"total_events\":{},\"ingested_events\":{ingested},\"duplicates_filtered\":{dups}}}", events.len()))
}

/// Run the demo. `speed` scales the capture's recorded timing.
pub async fn run(speed: f64, shutdown: CancellationToken) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("scangate-demo-")
        .tempdir()?;
    let capture_a = dir.path().join("portal-a.cap");
    std::fs::write(&capture_a, CAPTURE_A)?;
    let capture_b = dir.path().join("portal-b.cap");
    std::fs::write(&capture_b, CAPTURE_B)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let outage = (
        Duration::from_secs_f64(2.0 / speed * 2.0),
        Duration::from_secs_f64(5.0 / speed * 2.0),
    );
    let ep = Endpoint {
        rx: Arc::new(Mutex::new(Received::default())),
        started: Instant::now(),
        outage,
    };
    let router = Router::new()
        .route("/api/v1/events/batch", post(batch))
        .with_state(ep.clone());
    let server = tokio::spawn(async move { axum::serve(listener, router).await });

    let toml = format!(
        r#"[gateway]
id = "demo-gw"
site = "PTY"
state_dir = "{state}"
[spool]
sync = "full"
[suppress]
mode = "aggregate"
window_ms = 2000
[[source]]
name = "portal-a"
kind = "replay"
protocol = "lines"
fields = ["tag", "rssi", "antenna"]
separator = ","
file = "{file_a}"
speed = {speed}
group = "belt-3"
location = "PTY_SORT3_PORTAL_A"
device = "PORTAL_A_READER"
scan_type = "sortation"
[[source]]
name = "portal-b"
kind = "replay"
protocol = "uhf-bb"
file = "{file_b}"
speed = {speed}
group = "belt-3"
location = "PTY_SORT3_PORTAL_B"
device = "PORTAL_B_READER"
scan_type = "sortation"
[upstream]
url = "http://{addr}"
profile = "bag-events"
batch_max_events = 50
batch_max_delay_ms = 300
retry_max_ms = 500
[admin]
listen = "off"
"#,
        state = dir.path().join("state").display(),
        file_a = capture_a.display(),
        file_b = capture_b.display(),
    );
    let cfg = Config::parse(&toml, dir.path())
        .map_err(|e| anyhow::anyhow!("demo config invalid: {e:?}"))?;
    let metrics = Arc::new(Metrics::default());

    eprintln!(
        "scangate demo: two overlapping RFID portals on one belt (10 bags, two reader makes), replayed at {speed}x"
    );
    eprintln!(
        "  spool:    {}",
        dir.path().join("state/spool.db").display()
    );
    eprintln!("  upstream: http://{addr}/api/v1/events/batch (in-process; down {:.1}s–{:.1}s to show the backlog replay)", outage.0.as_secs_f64(), outage.1.as_secs_f64());
    let tty = std::io::stderr().is_terminal();
    let m = metrics.clone();
    let rx = ep.rx.clone();
    let started = Instant::now();
    let progress = tokio::spawn(async move {
        let mut last = (0u64, started);
        loop {
            tokio::time::sleep(Duration::from_millis(if tty { 250 } else { 1000 })).await;
            let (got, dups) = rx
                .lock()
                .map(|r| (r.events, r.duplicates))
                .unwrap_or_default();
            let now = Instant::now();
            let rate =
                (m.reads_in.get() - last.0) as f64 / now.duration_since(last.1).as_secs_f64();
            last = (m.reads_in.get(), now);
            let line = format!(
                "  t={:>5.1}s reads {:>5} ({:>4.0}/s) | open passes {:>2} | events {:>3} | delivered {:>3} in {} batches (upstream has {got}, dups {dups}) | backlog {:>3} | upstream {}",
                started.elapsed().as_secs_f64(),
                m.reads_in.get(),
                rate,
                m.suppress_tracked.get(),
                m.spool_committed.get(),
                m.delivered.get(),
                m.batches_ok.get(),
                m.spool_backlog.get(),
                if m.upstream_down.get() == 1 { "DOWN" } else { "up" },
            );
            if tty {
                eprint!("\r{line}   ");
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
        }
    });

    let summary = app::run(
        cfg,
        metrics.clone(),
        shutdown,
        RunOptions {
            grace: Duration::from_secs(5),
            exit_when_idle: true,
            ..Default::default()
        },
        |_| {},
    )
    .await?;
    progress.abort();
    server.abort();
    if tty {
        eprintln!();
    }
    let r = ep
        .rx
        .lock()
        .map_err(|_| anyhow::anyhow!("demo endpoint state poisoned"))?;
    let elapsed = started.elapsed().as_secs_f64();
    println!("scangate demo finished in {elapsed:.1}s");
    println!(
        "  frames in:            {} ({} bytes)",
        metrics.frames_in.get(),
        metrics.bytes_in.get()
    );
    println!("  reads decoded:        {}", metrics.reads_in.get());
    let events = metrics.suppress_passes.get();
    println!(
        "  passes (events):      {} from {} reads: {:.0} reads per event ({} folded into open passes, {} moved to the next portal)",
        events,
        metrics.suppress_reads.get(),
        metrics.suppress_reads.get() as f64 / events.max(1) as f64,
        metrics.suppress_suppressed.get(),
        metrics.suppress_moves.get()
    );
    println!(
        "  skipped (bad bytes):  {}",
        metrics.dropped("control_bytes")
            + metrics.dropped("line_noise")
            + metrics.dropped("invalid_utf8")
            + metrics.dropped("line_too_long")
    );
    println!(
        "  events committed:     {} in {} group commits (sync = full)",
        metrics.spool_committed.get(),
        metrics.spool_commits.get()
    );
    println!(
        "  refused while down:   {} requests (HTTP 503), events kept in the spool",
        r.refused
    );
    println!(
        "  delivered:            {} events in {} gzip batches ({} bytes on the wire)",
        metrics.delivered.get(),
        r.batches,
        r.bytes
    );
    println!(
        "  upstream received:    {} unique events, {} duplicates",
        r.events, r.duplicates
    );
    println!(
        "  left in spool:        {} (dead letters: {})",
        summary.backlog_left, summary.dead_letters
    );
    let mut scans = r.scans.clone();
    scans.sort_by(|a, b| a.first_seen.cmp(&b.first_seen));
    println!("  events as the upstream received them (one per bag per portal):");
    println!(
        "    {:<26} {:<20} {:>10} {:>9}  first seen",
        "bag_id (EPC)", "location", "read_count", "peak dBm"
    );
    for s in &scans {
        println!(
            "    {:<26} {:<20} {:>10} {:>9}  {}",
            s.bag_id,
            s.location,
            s.read_count,
            s.signal_strength.map_or("-".into(), |v| v.to_string()),
            s.first_seen
        );
    }
    Ok(())
}
