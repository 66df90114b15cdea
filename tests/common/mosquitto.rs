//! A real `mosquitto` broker (Debian's, installed by `.ci/run`) on a free loopback port, with
//! its own config and persistence directory, started, stopped and restarted by the test; and a
//! real MQTT publisher (rumqttc) to feed it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

pub struct Mosquitto {
    pub port: u16,
    pub dir: tempfile::TempDir,
    conf: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// Start a broker as README recommends for a gateway: persistence on, no limit on queued
    /// messages, a window of 1000 unacknowledged messages per client. `extra`: more lines.
    pub fn start(extra: &str) -> Mosquitto {
        let port = super::daemon::free_port();
        let dir = tempfile::tempdir().expect("tempdir");
        let conf = dir.path().join("mosquitto.conf");
        // Run as root (CI), mosquitto switches to its own user, which cannot write the test's
        // directory (its log, its persistence file): it stays root.
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            "user root\n"
        } else {
            ""
        };
        std::fs::write(
            &conf,
            format!(
                "{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nautosave_interval 0\nmax_queued_messages 0\nmax_inflight_messages 1000\nlog_dest file {}\n{extra}\n",
                dir.path().display(),
                dir.path().join("mosquitto.log").display()
            ),
        )
        .expect("write mosquitto.conf");
        let mut m = Mosquitto {
            port,
            dir,
            conf,
            child: None,
        };
        m.spawn();
        m
    }

    fn spawn(&mut self) {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {} within 20 s: {}",
                self.port,
                self.log()
            );
            // Polled (with a deadline) until it listens: it starts in milliseconds.
            std::thread::yield_now();
        }
    }

    /// Stop it as systemd would (SIGTERM: it saves its persistence file) and wait for the exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Start it again on the same port, with what it saved.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A QoS 1 publisher with a persistent session (what it has not had acknowledged is sent
/// again after a broker restart). Publishes run on its own task; `acked()` counts PUBACKs.
pub struct Publisher {
    pub client: rumqttc::AsyncClient,
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub async fn connect(port: u16, id: &str) -> Publisher {
        Self::connect_as(port, id, None).await
    }

    /// [`Publisher::connect`] with a user name and password.
    pub async fn connect_as(port: u16, id: &str, login: Option<(&str, &str)>) -> Publisher {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        if let Some((u, p)) = login {
            o.set_credentials(u, p);
        }
        o.set_clean_session(false)
            .set_keep_alive(Duration::from_secs(10))
            .set_max_packet_size(32 << 20, 32 << 20)
            .set_inflight(200);
        let (client, mut ev) = rumqttc::AsyncClient::new(o, 1000);
        let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let a = acked.clone();
        let task = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    // The broker restarts: rumqttc reconnects at the next poll.
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Publisher {
            client,
            acked,
            task,
        }
    }

    pub async fn send(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish request");
    }

    /// A retained message (the broker keeps it and sends it at every new subscription).
    pub async fn send_retained(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, true, payload.into())
            .await
            .expect("publish request");
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Wait until the broker acknowledged `n` publishes.
    pub async fn wait_acked(&self, n: u64, deadline: Duration) {
        let end = Instant::now() + deadline;
        while self.acked() < n {
            assert!(
                Instant::now() < end,
                "the broker acknowledged {} of {n} publishes within {deadline:?}",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An Impinj IoT tag inventory event (REFERENCE-READERS.md §6 shape).
pub fn impinj_event(epc: &str, antenna: u16, rssi_cdbm: i32) -> String {
    format!(
        r#"{{"timestamp":"2026-11-30T10:00:00.123456789Z","hostname":"impinj-13-f8-f5","eventType":"tagInventory","tagInventoryEvent":{{"epcHex":"{epc}","antennaPort":{antenna},"peakRssiCdbm":{rssi_cdbm},"transmitPowerCdbm":3000}}}}"#
    )
}

/// A Zebra IoT Connector tag data event (REFERENCE-READERS.md §7 shape).
pub fn zebra_event(id_hex: &str, antenna: u16, rssi: i32) -> String {
    format!(
        r#"{{"type":"SIMPLE","timestamp":"2026-11-30T10:00:00.000+0000","data":{{"MAC":"C4:7D:CC:FF:FF:FF","antenna":{antenna},"eventNum":1,"format":"epc","idHex":"{id_hex}","peakRssi":{rssi},"reads":1}}}}"#
    )
}
