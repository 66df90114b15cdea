//! MQTT sources against a real `mosquitto` on loopback (started, stopped and restarted by each
//! test) and the real `scangate` binary: each payload protocol end to end, `kill -9` while
//! 20,000 QoS 1 messages are published, a broker restart while messages flow, and malformed,
//! oversize and garbage payloads.

mod common;

use common::daemon::{free_port, metric, write_config, Daemon};
use common::ingest::{wait_until, Ingest};
use common::mosquitto::{impinj_event, zebra_event, Mosquitto, Publisher};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

/// One MQTT source with a topic per protocol.
fn source(broker: &Mosquitto, extra: &str) -> String {
    format!(
        r#"[[source]]
name = "dock"
kind = "mqtt"
broker = "{}"
topics = [{{ filter = "impinj/+/events", protocol = "impinj-iot" }}, {{ filter = "zebra/#", protocol = "zebra-iotc" }}, {{ filter = "sensors/#", protocol = "json" }}, {{ filter = "raw/#", protocol = "lines" }}]
location = "DOCK_3"
suppress = "off"
broker_max_inflight = 1000
reconnect_min_ms = 50
reconnect_max_ms = 500
{extra}
[source.antennas]
2 = "DOCK_3_OUT"
[source.json]
tag = "/sensor"
value = "/v"
sensor_type = "/type"
unit = "/unit"
"#,
        broker.url()
    )
}

/// A test's gateway: a config for `sources` (TOML under `[spool]`) in a temporary directory,
/// the ingest server it forwards to, and its admin port.
struct Gateway {
    ingest: Ingest,
    dir: tempfile::TempDir,
    admin: u16,
    cfg: std::path::PathBuf,
}

impl Gateway {
    async fn new(sources: &str) -> Gateway {
        let ingest = Ingest::start().await;
        let dir = tempfile::tempdir().unwrap();
        let admin = free_port();
        let cfg = write_config(
            dir.path(),
            &dir.path().join("state"),
            sources,
            &ingest.base_url(),
            "",
            Some(admin),
        );
        Gateway {
            ingest,
            dir,
            admin,
            cfg,
        }
    }

    fn log(&self) -> std::path::PathBuf {
        self.dir.path().join("log")
    }

    fn spawn(&self) -> Daemon {
        Daemon::spawn(&self.cfg, &self.log())
    }
}

fn events(ingest: &Ingest) -> Vec<Value> {
    ingest.with(|s| s.events.clone())
}

fn field<'a>(e: &'a Value, k: &str) -> &'a Value {
    e.get(k).unwrap_or(&Value::Null)
}

/// Tag (bag_id) → how many events carry it.
fn tag_counts(ingest: &Ingest) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in events(ingest) {
        if let Some(t) = e.get("bag_id").and_then(|t| t.as_str()) {
            *m.entry(t.to_string()).or_default() += 1;
        }
    }
    m
}

async fn wait_connected(admin: u16, n: u64) {
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    while metric(admin, "scangate_mqtt_connects_total")
        .await
        .unwrap_or(0)
        < n
    {
        assert!(
            tokio::time::Instant::now() < end,
            "no MQTT connection within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Each protocol's messages arrive at the ingest server with the right tag, RSSI, antenna and
/// location; sensor readings as sensor events with their type and unit, thinned by the
/// deadband.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_protocol_end_to_end() {
    let broker = Mosquitto::start("");
    let gw = Gateway::new(&source(&broker, "deadband = 0.5\nheartbeat_ms = 3600000")).await;
    let (ingest, admin) = (&gw.ingest, gw.admin);
    let _d = gw.spawn();
    wait_connected(admin, 1).await;
    let p = Publisher::connect(broker.port, "test-pub-e2e").await;
    p.send(
        "impinj/r700-1/events",
        impinj_event("E2801190A5021F80055817CA", 1, -2650),
    )
    .await;
    // Zebra: lowercase id, an array, and two objects concatenated with no separator.
    p.send(
        "zebra/fx9600/data",
        format!(
            "[{}]{}",
            zebra_event("7eda9038051002710002c0ae", 2, -60),
            zebra_event("7EDA9038051002710002C0AF", 1, -71)
        ),
    )
    .await;
    for v in [21.5, 21.6, 21.9, 23.0, 22.8] {
        p.send(
            "sensors/belt-3",
            format!(r#"{{"sensor":"belt-3-temp","v":{v},"type":"temperature","unit":"C"}}"#),
        )
        .await;
    }
    wait_until(
        "3 scans and 2 sensor events",
        Duration::from_secs(30),
        || events(ingest).len() >= 5,
    )
    .await;
    let evs = events(ingest);
    let by_tag = |t: &str| {
        evs.iter()
            .find(|e| field(e, "bag_id") == t)
            .unwrap_or_else(|| panic!("no event for {t}: {evs:?}"))
    };
    let i = by_tag("E2801190A5021F80055817CA");
    // bag-events: signal_strength is the peak RSSI in whole dBm (−26.50 → −27 rounds away).
    assert_eq!(field(i, "signal_strength"), -27);
    assert_eq!(field(i, "antenna"), 1);
    assert_eq!(field(i, "location"), "DOCK_3");
    assert_eq!(field(i, "device_id"), "dock");
    let z = by_tag("7EDA9038051002710002C0AE");
    assert_eq!(
        (
            field(z, "signal_strength"),
            field(z, "antenna"),
            field(z, "location")
        ),
        (
            &Value::from(-60),
            &Value::from(2),
            &Value::from("DOCK_3_OUT")
        )
    );
    let z2 = by_tag("7EDA9038051002710002C0AF");
    assert_eq!(
        (field(z2, "antenna"), field(z2, "location")),
        (&Value::from(1), &Value::from("DOCK_3"))
    );
    // Deadband 0.5: 21.5 (first), 21.6 and 21.9 within it, 23.0 beyond, 22.8 within.
    let sensors: Vec<&Value> = evs
        .iter()
        .filter(|e| e.get("sensor_id").is_some())
        .collect();
    let values: Vec<f64> = sensors
        .iter()
        .map(|e| field(e, "value").as_f64().unwrap())
        .collect();
    assert_eq!(values, vec![21.5, 23.0], "{sensors:?}");
    assert_eq!(field(sensors[0], "sensor_type"), "temperature");
    assert_eq!(field(sensors[0], "unit"), "C");
    assert_eq!(field(sensors[0], "sensor_id"), "belt-3-temp");
    assert_eq!(field(sensors[0], "location"), "DOCK_3");
    assert_eq!(
        metric(admin, "scangate_suppress_deadband_total").await,
        Some(3)
    );
    let envelopes = ingest.with(|s| s.envelopes.clone());
    assert!(envelopes.iter().any(|e| field(e, "event_type") == "sensor"));
    // Every message was acknowledged once committed.
    assert_eq!(metric(admin, "scangate_mqtt_messages_total").await, Some(7));
    wait_until_metric(admin, "scangate_mqtt_acked_total", 7).await;
    assert_eq!(metric(admin, "scangate_mqtt_unacked").await, Some(0));
}

async fn wait_until_metric(admin: u16, name: &str, want: u64) {
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let v = metric(admin, name).await;
        if v == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{name} stayed {v:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `kill -9` of the real process at random moments while 20,000 QoS 1 messages are published;
/// each restart takes the persistent session back. Every message's tag reaches the ingest
/// server: repeats are allowed (and counted), loss is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_20000_qos1_messages_are_published_loses_none() {
    const N: usize = 20_000;
    let broker = Mosquitto::start("");
    let gw = Gateway::new(&source(&broker, "")).await;
    let (ingest, admin, cfg) = (&gw.ingest, gw.admin, &gw.cfg);
    let log = gw.log();
    let mut daemon = Some(Daemon::spawn(cfg, &log));
    wait_connected(admin, 1).await;
    let publisher = Publisher::connect(broker.port, "test-pub-kill").await;
    let client = publisher.client.clone();
    let publishing = tokio::spawn(async move {
        for i in 0..N {
            let epc = format!("E280{i:020X}");
            client
                .publish(
                    "impinj/r700-1/events",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    impinj_event(&epc, 1 + (i % 4) as u16, -4000 - (i % 900) as i32),
                )
                .await
                .expect("publish");
            if i % 500 == 499 {
                // Spread over a few seconds, so kills land while messages flow.
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        }
    });
    let mut next = common::random_moments("mqtt kill -9");
    let mut kills = 0;
    while !publishing.is_finished() || kills < 3 {
        tokio::time::sleep(Duration::from_millis(50 + next() % 600)).await;
        if let Some(d) = daemon.take() {
            d.kill9();
            kills += 1;
        }
        daemon = Some(Daemon::spawn(cfg, &log));
        if kills >= 8 {
            break;
        }
    }
    publishing.await.unwrap();
    publisher
        .wait_acked(N as u64, Duration::from_secs(60))
        .await;
    let want: HashSet<String> = (0..N).map(|i| format!("E280{i:020X}")).collect();
    let end = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let got = tag_counts(ingest);
        let missing = want.iter().filter(|t| !got.contains_key(*t)).count();
        if missing == 0 {
            let repeats: usize = got.values().map(|n| n - 1).sum();
            eprintln!("{kills} kills: {N} messages, every tag arrived; {repeats} repeated");
            assert!(
                got.keys().all(|t| want.contains(t)),
                "a tag nobody published"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{missing} of {N} tags never arrived after {kills} kills; log:\n{}",
            daemon.as_ref().map(|d| d.log_text()).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        kills >= 3,
        "the test must kill at least 3 times, killed {kills}"
    );
}

/// The broker restarts while messages flow: scangate reconnects by itself and nothing the
/// broker acknowledged to the publisher is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_while_messages_flow_loses_none() {
    const N: usize = 5_000;
    let mut broker = Mosquitto::start("");
    let gw = Gateway::new(&source(&broker, "")).await;
    let (ingest, admin) = (&gw.ingest, gw.admin);
    let d = gw.spawn();
    wait_connected(admin, 1).await;
    let publisher = Publisher::connect(broker.port, "test-pub-restart").await;
    let client = publisher.client.clone();
    let publishing = tokio::spawn(async move {
        for i in 0..N {
            client
                .publish(
                    "zebra/fx9600/data",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    zebra_event(&format!("AB{i:022X}"), 1, -55),
                )
                .await
                .expect("publish");
            if i % 250 == 249 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    publisher
        .wait_acked(N as u64 / 3, Duration::from_secs(30))
        .await;
    broker.restart();
    publishing.await.unwrap();
    wait_until_metric_at_least(admin, "scangate_mqtt_connects_total", 2).await;
    publisher
        .wait_acked(N as u64, Duration::from_secs(60))
        .await;
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let got = tag_counts(ingest);
        let missing = (0..N)
            .filter(|i| !got.contains_key(&format!("AB{i:022X}")))
            .count();
        if missing == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{missing} of {N} tags lost across a broker restart; log:\n{}\nbroker:\n{}",
            d.log_text(),
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_until_metric_at_least(admin: u16, name: &str, want: u64) {
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    while metric(admin, name).await.unwrap_or(0) < want {
        assert!(
            tokio::time::Instant::now() < end,
            "{name} stayed below {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Malformed JSON, wrong types, a 10 MB payload, binary garbage and a 50 KB valid reader
/// batch: the bad ones are counted and acknowledged (so a persistent session does not send
/// them again), the batch arrives whole, the connection is never torn down, and a restart
/// finds nothing left over at the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversize_and_garbage_payloads_are_counted_and_acknowledged() {
    let broker = Mosquitto::start("");
    let gw = Gateway::new(&source(&broker, "")).await;
    let (ingest, admin, cfg) = (&gw.ingest, gw.admin, &gw.cfg);
    let log = gw.log();
    let mut d = Daemon::spawn(cfg, &log);
    wait_connected(admin, 1).await;
    let p = Publisher::connect(broker.port, "test-pub-bad").await;
    let topic = "impinj/r700-1/events";
    p.send(topic, r#"{"tagInventoryEvent":{"epcHex":"E2"#).await;
    p.send(
        topic,
        r#"{"tagInventoryEvent":{"epcHex":12,"antennaPort":1}}"#,
    )
    .await;
    p.send(
        topic,
        r#"{"tagInventoryEvent":{"epcHex":"E280","antennaPort":"one"}}"#,
    )
    .await;
    p.send(topic, vec![b'['; 10 * 1024 * 1024]).await;
    p.send(topic, (0..=255u8).cycle().take(4096).collect::<Vec<u8>>())
        .await;
    p.send("sensors/x", r#"{"sensor":"s","v":"warm"}"#).await;
    // A 50 KB batch of 300 events, as the webhook form posts them.
    let batch: Vec<String> = (0..300)
        .map(|i| impinj_event(&format!("E200{i:020X}"), 1, -5000))
        .collect();
    let batch = format!("[{}]", batch.join(","));
    assert!(batch.len() > 50_000, "{}", batch.len());
    p.send(topic, batch).await;
    p.send(topic, impinj_event("E2FFFFFFFFFFFFFFFFFFFFFF", 3, -3000))
        .await;
    // A payload of 131,000 lines: the first 100,000 are reads, the rest counted; the source
    // goes on (it once jammed: one message's reads overflowed a commit).
    let lines: Vec<u8> = (0..131_000u32)
        .flat_map(|i| format!("{i:07}\n").into_bytes())
        .collect();
    p.send("raw/scanner", lines).await;
    // Retained: live now (one read), then sent again by the broker at the next subscription.
    p.send_retained(topic, impinj_event("E2DDDDDDDDDDDDDDDDDDDDDD", 1, -3000))
        .await;
    p.wait_acked(10, Duration::from_secs(30)).await;
    wait_until_metric(admin, "scangate_mqtt_acked_total", 10).await;
    // The lines beyond a message's bounds are counted: the 31,000 past 100,000 decoded as one
    // run of skipped bytes, and the decoded ones past 8 MiB of reads one by one.
    let over = metric(admin, "scangate_dropped_total{reason=\"too_many_reads\"}")
        .await
        .unwrap_or(0) as usize;
    assert!((2..100_000).contains(&over), "{over}");
    let want = 302 + 100_000 - (over - 1);
    let end = tokio::time::Instant::now() + Duration::from_secs(60);
    // (Counted without copying the events: there are about 100,000.)
    while ingest.unique() < want {
        assert!(
            tokio::time::Instant::now() < end,
            "{} of {want} events arrived; log:\n{}",
            ingest.unique(),
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(tag_counts(ingest).len(), want);
    assert_eq!(metric(admin, "scangate_mqtt_unacked").await, Some(0));
    assert_eq!(
        metric(admin, "scangate_mqtt_connects_total").await,
        Some(1),
        "a bad payload tore the connection down"
    );
    for (reason, n) in [
        ("bad_json", 2),
        ("bad_epc", 1),
        ("bad_field", 1),
        ("payload_too_large", 1),
        ("bad_value", 1),
    ] {
        assert_eq!(
            metric(
                admin,
                &format!("scangate_dropped_total{{reason=\"{reason}\"}}")
            )
            .await,
            Some(n),
            "{reason}"
        );
    }
    let text = d.log_text();
    assert!(text.contains("max_payload_bytes"), "{text}");
    // Rate-limited: seven bad payloads in a burst give one line about their content.
    assert_eq!(
        text.matches("is not what its protocol expects").count(),
        1,
        "{text}"
    );
    // A restart finds nothing left at the broker: only the new message comes. The config
    // no longer has the zebra topic: the session's old subscription still brings its
    // messages, which are counted and acknowledged, not decoded with another protocol.
    d.sigterm();
    d.wait_exit(Duration::from_secs(20)).await;
    let text = std::fs::read_to_string(cfg).unwrap();
    std::fs::write(
        cfg,
        text.replace("{ filter = \"zebra/#\", protocol = \"zebra-iotc\" }, ", ""),
    )
    .unwrap();
    let d2 = Daemon::spawn(cfg, &log);
    wait_connected(admin, 1).await;
    p.send(topic, impinj_event("E2EEEEEEEEEEEEEEEEEEEEEE", 1, -3000))
        .await;
    wait_until(
        "the message after the restart",
        Duration::from_secs(30),
        || tag_counts(ingest).contains_key("E2EEEEEEEEEEEEEEEEEEEEEE"),
    )
    .await;
    p.send(
        "zebra/fx9600/data",
        zebra_event("7EDA0000000000000000FFFF", 1, -60),
    )
    .await;
    // The retained message came again, was skipped as not a live read, and acknowledged.
    wait_until_metric(admin, "scangate_mqtt_acked_total", 3).await;
    assert_eq!(metric(admin, "scangate_mqtt_messages_total").await, Some(3));
    assert_eq!(
        metric(
            admin,
            "scangate_dropped_total{reason=\"unsubscribed_topic\"}"
        )
        .await,
        Some(1)
    );
    assert!(!tag_counts(ingest).contains_key("7EDA0000000000000000FFFF"));
    assert_eq!(tag_counts(ingest).get("E2DDDDDDDDDDDDDDDDDDDDDD"), Some(&1));
    let status = reqwest::get(format!("http://127.0.0.1:{admin}/status"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(status.contains("\"retained\":1"), "{status}");
    drop(d2);
}

/// A backlog the broker queued while scangate was stopped drains whole at the next start, at
/// full speed. Regression: held messages stopped the decoder taking more, which stopped the
/// connection polling, which is what sends acknowledgements: the drain stalled for good after
/// ~14,000 messages (the broker sends a resumed session's queue far past its window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_queued_at_the_broker_drains_whole() {
    const N: usize = 60_000;
    let broker = Mosquitto::start("");
    let gw = Gateway::new(&source(&broker, "").replace("broker_max_inflight = 1000\n", "")).await;
    let (ingest, admin, cfg) = (&gw.ingest, gw.admin, &gw.cfg);
    let log = gw.log();
    // The session first, then the backlog while scangate is stopped.
    let mut d = Daemon::spawn(cfg, &log);
    wait_connected(admin, 1).await;
    d.sigterm();
    d.wait_exit(Duration::from_secs(20)).await;
    let p = Publisher::connect(broker.port, "test-pub-backlog").await;
    for i in 0..N {
        p.send(
            "impinj/r700-1/events",
            impinj_event(&format!("E2B0{i:020X}"), 1, -4500),
        )
        .await;
    }
    p.wait_acked(N as u64, Duration::from_secs(60)).await;
    let d = Daemon::spawn(cfg, &log);
    let end = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let committed = metric(admin, "scangate_spool_committed_total")
            .await
            .unwrap_or(0);
        if committed >= N as u64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the backlog stalled: {committed} of {N} committed; log:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_until_metric(admin, "scangate_mqtt_acked_total", N as u64).await;
    assert_eq!(
        metric(admin, "scangate_spool_committed_total").await,
        Some(N as u64)
    );
    wait_until("every tag delivered", Duration::from_secs(60), || {
        tag_counts(ingest).len() == N
    })
    .await;
}

/// mqtts:// with a private CA, a client certificate the broker requires, and a user whose
/// password file is wrong at first: the refusal is named (health, log) and nothing starts;
/// once the file is right, the next reconnect reads it and messages flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificate_and_a_password_fixed_while_running() {
    let certs = tempfile::tempdir().unwrap();
    let w = |name: &str, text: &str| {
        let p = certs.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let server = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let client = rcgen::generate_simple_self_signed(vec!["gw-test".to_string()]).unwrap();
    let server_pem = w("server.pem", &server.cert.pem());
    let server_key = w("server.key", &server.signing_key.serialize_pem());
    let client_pem = w("client.pem", &client.cert.pem());
    let client_key = w("client.key", &client.signing_key.serialize_pem());
    let passwords = certs.path().join("passwords");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-c", "-b"])
        .arg(&passwords)
        .args(["gateway", "s3cret"])
        .status()
        .expect("mosquitto_passwd");
    assert!(made.success());
    // The TLS listener (the gateway's), then a plain one for the test's publisher.
    let plain = free_port();
    let broker = Mosquitto::start(&format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\nallow_anonymous false\npassword_file {}\nlistener {plain} 127.0.0.1",
        client_pem.display(),
        server_pem.display(),
        server_key.display(),
        passwords.display()
    ));
    let ingest = Ingest::start().await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("mqtt.pass");
    std::fs::write(&password_file, "not-it\n").unwrap();
    let admin = free_port();
    let src = format!(
        "[[source]]\nname = \"secure\"\nkind = \"mqtt\"\nbroker = \"mqtts://127.0.0.1:{}\"\ntopics = [\"impinj/+/events\"]\nprotocol = \"impinj-iot\"\nsuppress = \"off\"\nusername = \"gateway\"\npassword_file = \"{}\"\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\nreconnect_min_ms = 50\nreconnect_max_ms = 300\n",
        broker.port,
        password_file.display(),
        server_pem.display(),
        client_pem.display(),
        client_key.display()
    );
    let cfg = write_config(
        dir.path(),
        &dir.path().join("state"),
        &src,
        &ingest.base_url(),
        "",
        Some(admin),
    );
    let d = Daemon::spawn(&cfg, &dir.path().join("log"));
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let text = match reqwest::get(format!("http://127.0.0.1:{admin}/status")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.contains("refused the user name or password") && text.contains("\"kind\":\"mqtt\"")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the refused password is not reported: {text}\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(admin, "scangate_mqtt_connects_total").await, Some(0));
    assert!(d
        .log_text()
        .contains("check `username` and `password_file`"));
    std::fs::write(&password_file, "s3cret\n").unwrap();
    wait_connected(admin, 1).await;
    let p = Publisher::connect_as(plain, "test-pub-tls", Some(("gateway", "s3cret"))).await;
    p.send(
        "impinj/r1/events",
        impinj_event("E2A1A1A1A1A1A1A1A1A1A1A1", 1, -5000),
    )
    .await;
    wait_until("a message over TLS", Duration::from_secs(30), || {
        tag_counts(&ingest).contains_key("E2A1A1A1A1A1A1A1A1A1A1A1")
    })
    .await;
}

/// The spool is full with `when_full = "reject"` while the upstream is down: the refused
/// messages stay unacknowledged and are handed over again (backpressure to the broker), and
/// once the upstream drains the spool every message's tag arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_with_reject_keeps_messages_at_the_broker() {
    full_spool(true).await;
}

/// `suppress_off`: with repeat suppression on, a pass that ends while the spool is full has
/// its event refused after its reads' messages were acknowledged (README, known limit), so
/// only the `off` case can promise every tag.
async fn full_spool(suppress_off: bool) {
    const N: usize = 20_000;
    let broker = Mosquitto::start("");
    let mut src = source(&broker, "");
    if !suppress_off {
        src = src.replace("suppress = \"off\"\n", "window_ms = 300\n");
    }
    let gw = Gateway::new(&format!(
        "max_bytes = \"1 MiB\"\nwhen_full = \"reject\"\n{src}"
    ))
    .await;
    let (ingest, admin) = (&gw.ingest, gw.admin);
    ingest.with(|s| s.down = true);
    let d = gw.spawn();
    wait_connected(admin, 1).await;
    let p = Publisher::connect(broker.port, "test-pub-full").await;
    // EPCs of 120 random hex digits: they do not compress, 1 MiB holds far fewer than N.
    let mut rng = common::random_moments("full spool tags");
    let tags: Vec<String> = (0..N)
        .map(|_| (0..8).map(|_| format!("{:015X}", rng() >> 4)).collect())
        .collect();
    for t in &tags {
        p.send("impinj/r1/events", impinj_event(t, 1, -5000)).await;
    }
    p.wait_acked(N as u64, Duration::from_secs(60)).await;
    wait_until_metric_at_least(admin, "scangate_mqtt_resent_total", 1).await;
    let unacked = metric(admin, "scangate_mqtt_unacked").await.unwrap_or(0);
    assert!(unacked > 0, "refused messages were acknowledged");
    assert!(d
        .log_text()
        .contains("The spool refused reads of MQTT messages"));
    ingest.with(|s| s.down = false);
    let end = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let got = tag_counts(ingest);
        let missing = tags.iter().filter(|t| !got.contains_key(*t)).count();
        if missing == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{missing} of {N} tags lost to a full spool; log:\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A reload that starts the MQTT source again while QoS 1 messages flow: nothing lost, nothing
/// delivered twice. The stopping run waits for what it handed over to be committed and
/// acknowledges it before it disconnects (else the broker would send it again, as new events),
/// and the new run resumes the persistent session. 300 ms commits keep hundreds of messages in
/// flight at each stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_restarting_the_source_while_messages_flow_lose_and_repeat_none() {
    const N: usize = 6_000;
    let broker = Mosquitto::start("");
    let ingest = Ingest::start().await;
    let dir = tempfile::tempdir().unwrap();
    let admin = free_port();
    let cfg = dir.path().join("scangate.toml");
    let write = |keep_alive_s: u32| {
        let text = format!(
            "[gateway]\nid = \"gw-mqtt-reload\"\nstate_dir = \"{}\"\n[spool]\ncommit_interval_ms = 300\n\
             {}\n[upstream]\nurl = \"{}\"\nprofile = \"bag-events\"\nbatch_max_delay_ms = 20\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n",
            dir.path().join("state").display(),
            source(&broker, &format!("keep_alive_s = {keep_alive_s}")),
            ingest.base_url()
        );
        std::fs::write(&cfg, text).unwrap();
    };
    write(30);
    let d = Daemon::spawn(&cfg, &dir.path().join("log"));
    wait_connected(admin, 1).await;
    let publisher = Publisher::connect(broker.port, "test-pub-reload").await;
    let client = publisher.client.clone();
    let publishing = tokio::spawn(async move {
        for i in 0..N {
            client
                .publish(
                    "zebra/fx9600/data",
                    rumqttc::QoS::AtLeastOnce,
                    false,
                    zebra_event(&format!("AC{i:022X}"), 1, -55),
                )
                .await
                .expect("publish");
            // A fleet's pace, about 2,500 messages/s (a load, not a wait for something).
            if i % 50 == 49 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    for round in 1..=3u64 {
        publisher
            .wait_acked(round * N as u64 / 5, Duration::from_secs(60))
            .await;
        write(30 + round as u32);
        d.signal("-HUP");
        wait_until_metric_at_least(admin, "scangate_config_reloads_total", round).await;
    }
    publishing.await.unwrap();
    publisher
        .wait_acked(N as u64, Duration::from_secs(60))
        .await;
    wait_until("every message delivered", Duration::from_secs(60), || {
        let got = tag_counts(&ingest);
        (0..N).all(|i| got.contains_key(&format!("AC{i:022X}")))
    })
    .await;
    let got = tag_counts(&ingest);
    let twice: Vec<_> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} of {N} messages delivered more than once, e.g. {:?}; log:\n{}",
        twice.len(),
        twice.iter().take(3).collect::<Vec<_>>(),
        d.log_text()
    );
    assert_eq!(
        d.log_text().matches("Source started again").count(),
        3,
        "{}",
        d.log_text()
    );
}
