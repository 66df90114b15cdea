//! The technician's status page (`/` of the admin listener) in a real headless browser
//! (Debian's `chromium`, installed by `.ci/run`): a read written to a real pty shows on the
//! page within a second, through the live view (`/events`), and a screenshot of the page at a
//! phone's size is saved.

mod common;

use common::daemon::{free_port, pty_pair, wait_metric, write_config, Daemon};
use common::ingest::Ingest;
use serialport::SerialPort;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// Headless Chromium as the probe of this machine kind starts it (root: no sandbox; no
/// background networking on a closed network), with its own profile directory.
fn chromium(profile: &std::path::Path) -> Command {
    let mut c = Command::new("chromium");
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .stdin(Stdio::null())
    .stderr(Stdio::null());
    c
}

/// A page open in headless Chromium, driven over the DevTools protocol (what Playwright and
/// Puppeteer speak), so the test reads the live page while it runs.
struct Browser {
    child: std::process::Child,
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Browser {
    /// Open `url` in a window of `width` × `height` CSS pixels.
    async fn open(url: &str, profile: &std::path::Path, width: u32, height: u32) -> Browser {
        let port = free_port();
        let child = chromium(profile)
            .arg(format!("--remote-debugging-port={port}"))
            .arg(format!("--window-size={width},{height}"))
            .arg(url)
            .stdout(Stdio::null())
            .spawn()
            .expect("chromium (apt-get install chromium)");
        // The page's DevTools socket, once Chromium lists it.
        let end = tokio::time::Instant::now() + T;
        let ws_url = loop {
            let list = reqwest::get(format!("http://127.0.0.1:{port}/json/list")).await;
            if let Ok(r) = list {
                let v: serde_json::Value =
                    serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or_default();
                if let Some(u) = v.as_array().and_then(|a| {
                    a.iter()
                        .find(|t| t["type"] == "page")
                        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                }) {
                    break u.to_string();
                }
            }
            assert!(
                tokio::time::Instant::now() < end,
                "Chromium never listed the page"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
            .await
            .expect("DevTools websocket");
        Browser {
            child,
            ws,
            next_id: 1,
        }
    }

    /// Call a DevTools method and return its result.
    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        use futures_util::{SinkExt, StreamExt};
        let id = self.next_id;
        self.next_id += 1;
        let msg = serde_json::json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::Text(msg.into()))
            .await
            .unwrap();
        loop {
            let m = tokio::time::timeout(T, self.ws.next())
                .await
                .expect("DevTools answer")
                .expect("DevTools socket open")
                .unwrap();
            if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["id"] == id {
                    return v["result"].clone();
                }
            }
        }
    }

    /// Evaluate a JavaScript expression in the page; its value.
    async fn eval(&mut self, expression: &str) -> serde_json::Value {
        let r = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({"expression": expression, "returnByValue": true}),
            )
            .await;
        r["result"]["value"].clone()
    }

    /// Wait (polling every 20 ms, at most `T`) until `expression` is true in the page.
    async fn wait_for(&mut self, what: &str, expression: &str) {
        let end = tokio::time::Instant::now() + T;
        while self.eval(expression).await != serde_json::Value::Bool(true) {
            assert!(
                tokio::time::Instant::now() < end,
                "timed out waiting for: {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn screenshot(&mut self) -> Vec<u8> {
        use base64::Engine;
        let r = self
            .call(
                "Page.captureScreenshot",
                serde_json::json!({"format": "png"}),
            )
            .await;
        base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway (the real binary) reading a pty with the lines protocol, its admin listener on
/// a free port, delivering to a loopback ingest server; started and its port open.
struct Gateway {
    d: Daemon,
    master: serialport::TTYPort,
    admin: u16,
    cfg: std::path::PathBuf,
    state: std::path::PathBuf,
    dir: tempfile::TempDir,
    _slave: serialport::TTYPort,
    _ingest: Ingest,
}

impl Gateway {
    async fn start() -> Gateway {
        let ingest = Ingest::start().await;
        let dir = tempfile::tempdir().unwrap();
        let (master, slave) = pty_pair();
        let slave_path = slave.name().expect("pty name");
        let admin = free_port();
        let state = dir.path().join("state");
        let sources = format!("[[source]]\nname = \"belt\"\nkind = \"serial\"\nprotocol = \"lines\"\npath = \"{slave_path}\"\nbaud = 115200\nlocation = \"PTY_BELT_1\"\n");
        let cfg = write_config(
            dir.path(),
            &state,
            &sources,
            &ingest.base_url(),
            "",
            Some(admin),
        );
        let d = Daemon::spawn(&cfg, &dir.path().join("log"));
        assert!(
            wait_metric(admin, "scangate_sources_connected", 1, T).await,
            "daemon never opened the pty; log:\n{}",
            d.log_text()
        );
        Gateway {
            d,
            master,
            admin,
            cfg,
            state,
            dir,
            _slave: slave,
            _ingest: ingest,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.admin)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_read_from_a_pty_within_a_second_and_a_screenshot_is_saved() {
    let mut g = Gateway::start().await;
    // A phone on the gateway's Wi-Fi.
    let url = g.url("");
    let mut b = Browser::open(&url, &g.dir.path().join("chromium"), 412, 915).await;
    b.wait_for(
        "the page follows the live view",
        "document.getElementById('live').textContent === 'live'",
    )
    .await;
    assert!(
        b.eval("document.body.innerText.includes('PTY_BELT_1')")
            .await
            == true,
        "the page shows the reader"
    );
    assert_eq!(
        b.eval("document.querySelector('[data-source=belt] h2 span.ok') !== null")
            .await,
        true,
        "shown as connected"
    );

    // A bag tag read at the pty appears on the open page, without a reload.
    g.master.write_all(b"0125123456\r\n").unwrap();
    b.wait_for(
        "the read on the page",
        "document.querySelector('tr.read[data-tag=\"0125123456\"]') !== null",
    )
    .await;
    let after = b
        .eval("Number(document.querySelector('tr.read[data-tag=\"0125123456\"]').dataset.shownAfterMs)")
        .await
        .as_f64()
        .unwrap();
    assert!(
        (0.0..1000.0).contains(&after),
        "shown {after} ms after it was read"
    );
    // Reads per antenna and the delivery summary are there too.
    assert_eq!(
        b.eval("document.getElementById('sum').innerText.includes('dead letters')")
            .await,
        true
    );

    // `scangate status` asks the running daemon for the same data.
    let out = Command::new(env!("CARGO_BIN_EXE_scangate"))
        .args(["status", "--config"])
        .arg(&g.cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("  read 0125123456"), "{text}");
    assert!(text.contains("reads by antenna: no port 1"), "{text}");

    let png = b.screenshot().await;
    assert!(png.len() > 2_000, "a screenshot of {} bytes", png.len());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    // Kept beside the test's build output for a person to look at.
    let keep = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&keep, &png).unwrap();
    assert!(std::fs::metadata(&keep).unwrap().len() > 2_000);
    drop(b);
    drop(g);
}

/// The page embeds what a reader sent without ever interpreting it as markup: a tag made of
/// HTML and script is shown as text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_made_of_markup_is_shown_as_text() {
    let mut g = Gateway::start().await;
    let admin = g.admin;
    let evil = "</script><img src=x onerror=alert(1)>";
    g.master
        .write_all(format!("{evil}\r\n").as_bytes())
        .unwrap();
    assert!(wait_metric(admin, "scangate_reads_total", 1, T).await);
    let html = reqwest::get(format!("http://127.0.0.1:{admin}/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The embedded state carries it escaped; the document has exactly its own two scripts.
    assert!(!html.contains(evil));
    assert_eq!(html.matches("</script>").count(), 2);
    let mut b = Browser::open(&g.url(""), &g.dir.path().join("chromium"), 800, 600).await;
    b.wait_for(
        "the read on the page",
        "document.querySelectorAll('tr.read').length > 0",
    )
    .await;
    assert_eq!(
        b.eval("document.querySelector('tr.read td.tag').textContent")
            .await,
        evil,
        "shown as text"
    );
    assert_eq!(
        b.eval("document.querySelectorAll('img').length").await,
        0,
        "no element made from the tag"
    );
    drop(b);
    drop(g);
}

/// A spool locked by another process does not hang the page or `/status`: they answer
/// within the time `/health` waits, and say the spool is not responding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_spool_does_not_hang_the_page() {
    let mut g = Gateway::start().await;
    let admin = g.admin;
    // Another process holds the spool's write lock; a read makes the gateway want it.
    let c = rusqlite::Connection::open(g.state.join("spool.db")).unwrap();
    c.execute_batch("BEGIN EXCLUSIVE").unwrap();
    g.master.write_all(b"0125000001\r\n").unwrap();
    assert!(wait_metric(admin, "scangate_spool_blocked", 1, T).await);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(8))
        .build()
        .unwrap();
    for path in ["status", ""] {
        let t = tokio::time::Instant::now();
        let body = client
            .get(format!("http://127.0.0.1:{admin}/{path}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("/{path} did not answer: {e}"))
            .text()
            .await
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "/{path} took {:?}",
            t.elapsed()
        );
        assert!(
            body.contains("\"spool_not_responding\":true"),
            "/{path}: {}",
            &body[..body.len().min(400)]
        );
    }
    c.execute_batch("COMMIT").unwrap();
    drop(c);
    assert!(wait_metric(admin, "scangate_spool_blocked", 0, T).await);
    g.d.sigterm();
    assert!(g.d.wait_exit(T).await.success());
}

/// A page refused its live view (8 pages already open) tries again by itself and goes live
/// once a slot is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_refused_for_too_many_pages_goes_live_once_one_closes() {
    let g = Gateway::start().await;
    let admin = g.admin;
    // Eight live views held open by this test.
    let mut held = Vec::new();
    for _ in 0..8 {
        let r = reqwest::get(format!("http://127.0.0.1:{admin}/events"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        held.push(r);
    }
    assert!(wait_metric(admin, "scangate_admin_live_clients", 8, T).await);
    let r = reqwest::get(format!("http://127.0.0.1:{admin}/events"))
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "a ninth is refused");
    let mut b = Browser::open(&g.url(""), &g.dir.path().join("chromium"), 800, 600).await;
    b.wait_for(
        "the page says it is not live",
        "document.getElementById('live').textContent === 'reconnecting…'",
    )
    .await;
    drop(held);
    b.wait_for(
        "the page live once slots are free",
        "document.getElementById('live').textContent === 'live'",
    )
    .await;
    drop(b);
    drop(g);
}
