//! The Redis Streams sink against a real `redis-server` on loopback (started and stopped by
//! each test): the contract's entry fields, a consumer group seeing each event once,
//! idempotent resends, an outage with a restart on the same port, a refused password, failover
//! (`READONLY`), `OOM`, `NOSCRIPT`, a stream of the wrong type, and events refused alone.

mod common;

use common::ingest::wait_until;
use common::redis_server::{field, RedisServer};
use common::Rig;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

const STREAM: &str = "baggage_events";

/// A stream entry as XREADGROUP gives it: id and fields.
type Entry = (String, Vec<(String, String)>);

fn redis_rig_config(dir: &std::path::Path, url: &str, extra: &str) -> scangate::config::Config {
    common::config(
        dir,
        url,
        "bag-events",
        &format!(
            "kind = \"redis-streams\"\n{}auth_retry_ms = 200\n{extra}",
            if extra.contains("batch_max_events") {
                ""
            } else {
                "batch_max_events = 100\n"
            }
        ),
    )
}

/// event_id → how many entries carry it.
fn ids_in(entries: &[Vec<(String, String)>]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for e in entries {
        *m.entry(field(e, "event_id").expect("event_id field").to_string())
            .or_default() += 1;
    }
    m
}

/// Wait until the spool's last upstream error contains `needle` (the forwarder records it
/// just after the metrics move), and return it.
async fn error_containing(rig: &Rig, needle: &str) -> String {
    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let e = rig
            .spool
            .stats()
            .await
            .unwrap()
            .last_error
            .unwrap_or_default();
        if e.contains(needle) {
            return e;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the last upstream error never said {needle:?}; it says {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait until the sink has counted an error with `code` (and, with `outage`, the forwarder
/// has declared the upstream down).
async fn counted(rig: &Rig, code: &str, outage: bool) {
    let label = format!("scangate_redis_errors_total{{code=\"{code}\"}}");
    wait_until(&format!("{code} counted"), Duration::from_secs(30), || {
        rig.metrics.render().contains(&label) && (!outage || rig.metrics.upstream_down.get() == 1)
    })
    .await;
}

/// Read up to `count` new entries as consumer `consumer` of group `baggage_processors`.
fn read_group(c: &mut redis::Connection, consumer: &str, count: usize) -> Vec<Entry> {
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("baggage_processors")
        .arg(consumer)
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query(c)
        .unwrap();
    let batch: Vec<(String, Vec<Entry>)> = match reply {
        redis::Value::Nil => Vec::new(),
        v => redis::from_redis_value(v).unwrap(),
    };
    batch.into_iter().next().map(|(_, m)| m).unwrap_or_default()
}

async fn drained(rig: &Rig, what: &str, deadline: Duration) {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if rig.backlog().await == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for: {what} (backlog {})",
            rig.backlog().await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_with_the_contract_fields_and_a_consumer_group_sees_each_once() {
    let redis = RedisServer::start("");
    // The consumers' group exists before the gateway writes (as contract 000 sets it up).
    redis.run(&[
        "XGROUP",
        "CREATE",
        STREAM,
        "baggage_processors",
        "$",
        "MKSTREAM",
    ]);
    let url = redis.url();
    let rig = Rig::new(|d| redis_rig_config(d, &url, "")).await;
    rig.commit("BAG", 2_000, 250).await;
    drained(&rig, "2,000 events in the stream", Duration::from_secs(30)).await;

    let entries = redis.entries(STREAM);
    assert_eq!(entries.len(), 2_000, "one entry per event");
    let ids = ids_in(&entries);
    assert_eq!(ids.len(), 2_000);
    let mut tags = HashSet::new();
    for e in &entries {
        assert_eq!(field(e, "event_type"), Some("scan"));
        let data: serde_json::Value =
            serde_json::from_str(field(e, "data").expect("data field")).expect("data is JSON");
        assert_eq!(data["event_id"].as_str(), field(e, "event_id"));
        assert_eq!(data["location"], "PTY_SORT_3");
        assert_eq!(data["device_id"], "SCANNER_3");
        assert_eq!(data["scan_type"], "sortation");
        // -61.50 dBm, rounded to the contract's integer.
        assert_eq!(data["signal_strength"], -62);
        assert_eq!(data["read_count"], 1);
        assert!(data["timestamp"].as_str().unwrap().ends_with('Z'));
        tags.insert(data["bag_id"].as_str().unwrap().to_string());
    }
    assert_eq!(tags.len(), 2_000, "every tag once");

    // A consumer of the group reads each event once.
    let mut c = redis.conn();
    let mut seen: HashMap<String, usize> = HashMap::new();
    loop {
        let msgs = read_group(&mut c, "worker-1", 500);
        if msgs.is_empty() {
            break;
        }
        for (id, fields) in msgs {
            *seen
                .entry(field(&fields, "event_id").unwrap().to_string())
                .or_default() += 1;
            let _: i64 = redis::cmd("XACK")
                .arg(STREAM)
                .arg("baggage_processors")
                .arg(&id)
                .query(&mut c)
                .unwrap();
        }
    }
    assert_eq!(seen.len(), 2_000);
    assert!(
        seen.values().all(|&n| n == 1),
        "a consumer saw an event twice"
    );
    assert_eq!(rig.metrics.delivered.get(), 2_000);
    assert_eq!(rig.metrics.upstream_duplicates.get(), 0);
    // This test server persists nothing (save "", no AOF): said at connect.
    assert_eq!(rig.metrics.redis_server_risks.get(), 1);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fields_shape_writes_each_event_field_as_an_entry_field() {
    let redis = RedisServer::start("");
    let url = redis.url();
    let rig = Rig::new(|d| {
        redis_rig_config(
            d,
            &url,
            "entry = \"fields\"\nstream = \"bags\"\nmaxlen = 0\n[upstream.fields.constant]\nhandler_id = \"AGT_123\"\n",
        )
    })
    .await;
    rig.commit("BAG", 300, 100).await;
    drained(&rig, "300 events in the stream", Duration::from_secs(30)).await;
    let entries = redis.entries("bags");
    assert_eq!(entries.len(), 300);
    for e in &entries {
        assert!(field(e, "bag_id").unwrap().starts_with("BAG-"));
        assert_eq!(field(e, "location"), Some("PTY_SORT_3"));
        assert_eq!(field(e, "signal_strength"), Some("-62"));
        assert_eq!(field(e, "read_count"), Some("1"));
        assert_eq!(field(e, "handler_id"), Some("AGT_123"));
        assert!(field(e, "data").is_none());
        // A null (no symbology) is left out, not written as "null".
        assert!(e.iter().all(|(_, v)| v != "null"), "{e:?}");
    }
    rig.shutdown().await;
}

/// The same batch sent again (a lost answer, a timeout, a kill before the spool recorded the
/// delivery) adds nothing: the idempotency keys skip every event already in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_again_adds_nothing_twice() {
    use scangate::forward::redis::{BatchEncoder, RedisSender};
    let redis = RedisServer::start("");
    let dir = tempfile::tempdir().unwrap();
    let cfg = redis_rig_config(dir.path(), &redis.url(), "idempotency_ttl_s = 300");
    let scangate::config::Sink::RedisStreams(rc) = &cfg.upstream.sink else {
        panic!("not a redis sink")
    };
    let metrics = std::sync::Arc::new(scangate::metrics::Metrics::default());
    let sender = RedisSender::new(&cfg.upstream, rc, "gw-test".into(), metrics.clone()).unwrap();
    let mut enc = scangate::forward::profile::Encoder::new(
        scangate::config::Profile::BagEvents,
        "gw-test".into(),
        "SITE1".into(),
        "interaction".into(),
        Default::default(),
    );
    let mut benc = BatchEncoder::new(rc);
    let events: Vec<_> = (0..200u64)
        .map(|i| {
            let ms = 1_763_289_000_000 + i as i64;
            scangate::event::SpooledEvent {
                loc: scangate::event::Loc {
                    chunk: 1,
                    idx: i as u32,
                },
                seq: i + 1,
                committed_ms: ms,
                event_id: scangate::event::event_id(42, i + 1, ms),
                boot_id: uuid::Uuid::nil(),
                body: common::body(&format!("T{i}"), ms),
            }
        })
        .collect();
    let first = benc.encode(&mut enc, &events[..100]);
    assert_eq!(
        sender.send(&first, true).await,
        scangate::forward::outcome::Outcome::Delivered
    );
    assert_eq!(redis.xlen(STREAM), 100);
    // Again: nothing added, every event counted as a duplicate.
    assert_eq!(
        sender.send(&first, true).await,
        scangate::forward::outcome::Outcome::Delivered
    );
    assert_eq!(redis.xlen(STREAM), 100);
    assert_eq!(metrics.upstream_duplicates.get(), 100);
    // Half old, half new: only the new half is added.
    let overlap = benc.encode(&mut enc, &events[50..150]);
    sender.send(&overlap, true).await;
    assert_eq!(redis.xlen(STREAM), 150);
    assert_eq!(metrics.upstream_duplicates.get(), 150);
    assert_eq!(ids_in(&redis.entries(STREAM)).len(), 150);
    // Each key lives idempotency_ttl_s.
    let key = format!("{{{STREAM}}}:seen:{}", events[0].event_id);
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query(&mut redis.conn())
        .unwrap();
    assert!((290..=300).contains(&ttl), "TTL of {key}: {ttl}");
    // The stream is trimmed approximately (MAXLEN ~ 100000 by default): the argument is sent.
    let info: redis::Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(STREAM)
        .query(&mut redis.conn())
        .unwrap();
    assert!(format!("{info:?}").contains("length"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_for_a_while_keeps_the_backlog_and_delivers_it_after_a_restart() {
    let mut redis = RedisServer::start("");
    let url = redis.url();
    let rig = Rig::new(|d| redis_rig_config(d, &url, "")).await;
    rig.commit("A", 200, 100).await;
    drained(&rig, "the first events delivered", Duration::from_secs(30)).await;
    let before = ids_in(&redis.entries(STREAM));
    assert_eq!(before.len(), 200);

    redis.stop();
    rig.commit("B", 1_000, 100).await;
    wait_until(
        "the sink notices the outage",
        Duration::from_secs(30),
        || rig.metrics.upstream_down.get() == 1,
    )
    .await;
    assert_eq!(
        rig.backlog().await,
        1_000,
        "everything kept while Redis is down"
    );

    // Back on the same port (empty: this test server keeps no data across restarts).
    redis.restart();
    drained(
        &rig,
        "the backlog delivered after the restart",
        Duration::from_secs(60),
    )
    .await;
    let after = ids_in(&redis.entries(STREAM));
    assert_eq!(after.len(), 1_000);
    assert!(after.values().all(|&n| n == 1));
    assert!(after.keys().all(|k| !before.contains_key(k)));
    assert_eq!(rig.metrics.upstream_down.get(), 0);
    assert!(rig
        .metrics
        .render()
        .contains("scangate_redis_errors_total{code=\"io\"}"));
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_keeps_everything_raises_the_alarm_and_a_corrected_file_delivers() {
    let redis = RedisServer::start("requirepass s3cret-pw");
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("redis-password");
    std::fs::write(&pw, "wrong\n").unwrap();
    let pw_toml = format!("password_file = \"{}\"", pw.display());
    let rig = Rig::new(|d| redis_rig_config(d, &url, &pw_toml)).await;
    rig.commit("BAG", 300, 100).await;
    wait_until(
        "the misconfiguration alarm",
        Duration::from_secs(30),
        || rig.metrics.upstream_misconfigured.get() == 1,
    )
    .await;
    assert_eq!(rig.backlog().await, 300, "nothing deleted");
    assert_eq!(redis.xlen(STREAM), 0);
    assert!(rig
        .metrics
        .render()
        .contains("scangate_redis_errors_total{code=\"auth\"}"));
    // The error names what to fix.
    error_containing(&rig, "password_file").await;
    assert_eq!(rig.spool.stats().await.unwrap().dead_letters, 0);

    // The technician fixes the file: the next attempt (auth_retry_ms) re-reads it.
    std::fs::write(&pw, "s3cret-pw\n").unwrap();
    drained(
        &rig,
        "delivery with the corrected password",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(redis.xlen(STREAM), 300);
    assert_eq!(rig.metrics.upstream_misconfigured.get(), 0);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_during_a_failover_and_oom_keep_everything_until_redis_accepts_again() {
    let redis = RedisServer::start("");
    let url = redis.url();
    let rig = Rig::new(|d| redis_rig_config(d, &url, "")).await;
    rig.commit("A", 100, 100).await;
    drained(&rig, "first events", Duration::from_secs(30)).await;

    // The server becomes a replica (of a primary that does not answer): writes are READONLY.
    redis.run(&[
        "REPLICAOF",
        "127.0.0.1",
        &common::daemon::free_port().to_string(),
    ]);
    rig.commit("B", 300, 100).await;
    counted(&rig, "READONLY", true).await;
    assert_eq!(rig.backlog().await, 300);
    // Promoted again (the failover is over).
    redis.run(&["REPLICAOF", "NO", "ONE"]);
    drained(&rig, "delivery after the failover", Duration::from_secs(30)).await;
    assert_eq!(redis.xlen(STREAM), 400);

    // Out of memory (maxmemory below what is used, no eviction): kept, backed off.
    redis.run(&["CONFIG", "SET", "maxmemory", "1"]);
    rig.commit("C", 300, 100).await;
    counted(&rig, "OOM", true).await;
    assert_eq!(rig.backlog().await, 300);
    let err = error_containing(&rig, "out of memory").await;
    assert!(err.contains("OOM"), "{err}");
    assert!(
        err.contains("out of memory") && err.contains("OOM"),
        "{err}"
    );
    redis.run(&["CONFIG", "SET", "maxmemory", "0"]);
    drained(
        &rig,
        "delivery once memory is free",
        Duration::from_secs(30),
    )
    .await;
    let ids = ids_in(&redis.entries(STREAM));
    assert_eq!(ids.len(), 700);
    assert!(ids.values().all(|&n| n == 1));
    assert_eq!(rig.spool.stats().await.unwrap().dead_letters, 0);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noscript_after_a_script_flush_loads_the_script_again() {
    let redis = RedisServer::start("");
    let url = redis.url();
    let rig = Rig::new(|d| redis_rig_config(d, &url, "")).await;
    rig.commit("A", 100, 100).await;
    drained(&rig, "first events", Duration::from_secs(30)).await;
    let loads = rig.metrics.redis_script_loads.get();
    assert!(loads >= 1, "a fresh server has no script: loaded once");
    redis.run(&["SCRIPT", "FLUSH"]);
    rig.commit("B", 100, 100).await;
    drained(&rig, "events after SCRIPT FLUSH", Duration::from_secs(30)).await;
    assert_eq!(rig.metrics.redis_script_loads.get(), loads + 1);
    assert_eq!(redis.xlen(STREAM), 200);
    assert_eq!(rig.metrics.upstream_down.get(), 0, "not an outage");
    rig.shutdown().await;
}

/// A key of the wrong type where the stream should be refuses every event: a
/// misconfiguration (alarm, nothing dead-lettered), delivered once the key is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_key_of_the_wrong_type_is_an_alarm_not_dead_letters() {
    let redis = RedisServer::start("");
    redis.run(&["SET", STREAM, "not a stream"]);
    let url = redis.url();
    let rig = Rig::new(|d| redis_rig_config(d, &url, "")).await;
    rig.commit("A", 50, 50).await;
    wait_until("rejecting-all alarm", Duration::from_secs(30), || {
        rig.metrics.upstream_rejecting_all.get() == 1
    })
    .await;
    let stats = rig.spool.stats().await.unwrap();
    assert_eq!(stats.dead_letters, 0);
    assert_eq!(stats.backlog, 50);
    error_containing(&rig, "WRONGTYPE").await;
    redis.run(&["DEL", STREAM]);
    drained(
        &rig,
        "delivery once the key is a stream",
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(redis.xlen(STREAM), 50);
    assert_eq!(rig.spool.stats().await.unwrap().dead_letters, 0);
    rig.shutdown().await;
}

/// Events the server refuses alone while it accepts others are dead-lettered with its reason,
/// and recorded in the dead-letter stream; the others arrive once. (Here an ACL lets the
/// gateway's user write the idempotency keys of event ids ending in 0–e only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_refused_alone_are_dead_lettered_and_recorded_in_the_dlq_stream() {
    let redis = RedisServer::start(
        "user gw on >gw-pw ~baggage_events ~baggage_events:dlq ~{baggage_events}:seen:*[0-9a-e] +@all",
    );
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "gw-pw").unwrap();
    let extra = format!("username = \"gw\"\npassword_file = \"{}\"", pw.display());
    let rig = Rig::new(|d| redis_rig_config(d, &url, &extra)).await;
    rig.commit("A", 400, 100).await;
    drained(&rig, "every event settled", Duration::from_secs(60)).await;
    let stats = rig.spool.stats().await.unwrap();
    let in_stream = ids_in(&redis.entries(STREAM));
    assert!(in_stream.values().all(|&n| n == 1));
    assert!(in_stream.keys().all(|k| !k.ends_with('f')));
    let refused = 400 - in_stream.len() as u64;
    assert!(refused > 0, "some ids end in f (1 in 16)");
    assert_eq!(stats.dead_letters, refused);
    let dlq = redis.entries("baggage_events:dlq");
    assert_eq!(dlq.len() as u64, refused, "one record per dead letter");
    for e in &dlq {
        assert!(field(e, "event_id").unwrap().ends_with('f'));
        assert!(field(e, "reason").unwrap().contains("NOPERM"), "{e:?}");
        assert_eq!(field(e, "gateway_id"), Some("gw-test"));
        assert!(field(e, "data").unwrap().contains("\"bag_id\""));
    }
    rig.shutdown().await;
}

/// `kill -9` of the real binary at random moments while it delivers into Redis, 20 rounds,
/// restarting on the same spool: every event it accepted (every seq below the spool's
/// next_seq) is in the stream exactly once. Batches sent again after a kill (delivered, not
/// yet acknowledged in the spool) are skipped by their idempotency keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_delivery_every_accepted_event_is_in_the_stream_exactly_once() {
    use common::daemon::{write_config, Daemon};
    const ROUNDS: usize = 20;
    let redis = RedisServer::start("");
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("feed.cap");
    let mut text = String::from("scangate-capture v1 serial\n");
    for i in 0..4000u64 {
        text.push_str(&format!("{} text BAG{:07}\\r\\n\n", i / 4, i));
    }
    std::fs::write(&cap, text).unwrap();
    let state = dir.path().join("state");
    let sources = format!("[[source]]\nname = \"r\"\nkind = \"replay\"\nprotocol = \"lines\"\nfile = \"{}\"\nspeed = \"recorded\"\nrepeat = 1000\n", cap.display());
    // Several batches in flight: a kill lands between a script's return and the spool's
    // acknowledgement often.
    let extra = "kind = \"redis-streams\"\nmax_in_flight = 8";
    let cfg = write_config(dir.path(), &state, &sources, &redis.url(), extra, None);
    let log = dir.path().join("log");
    let mut next = common::random_moments("redis kill -9 test");
    for round in 0..ROUNDS {
        let d = Daemon::spawn(&cfg, &log);
        let before = redis.xlen(STREAM);
        wait_until(
            "the daemon delivers in this round",
            Duration::from_secs(30),
            || redis.xlen(STREAM) > before,
        )
        .await;
        // A random moment of its commit/deliver cycle.
        let delay = Duration::from_micros(next() % 300_000);
        tokio::time::sleep(delay).await;
        d.kill9();
        eprintln!(
            "round {round}: killed after +{delay:?}, stream has {}",
            redis.xlen(STREAM)
        );
    }

    // Final incarnation: no new input, drain, stop cleanly.
    let empty = dir.path().join("empty.cap");
    std::fs::write(&empty, "scangate-capture v1 serial\n").unwrap();
    let sources = format!(
        "[[source]]\nname = \"r\"\nkind = \"replay\"\nprotocol = \"lines\"\nfile = \"{}\"\n",
        empty.display()
    );
    let admin = common::daemon::free_port();
    let cfg = write_config(
        dir.path(),
        &state,
        &sources,
        &redis.url(),
        extra,
        Some(admin),
    );
    // Last incarnations, no new input, until one stops (SIGTERM) with nothing left in the
    // spool: passes restored from the suppression log become events as the daemon starts
    // (a first incarnation can see the spool empty before they are committed).
    for attempt in 0.. {
        assert!(
            attempt < 4,
            "the spool never ended empty after a clean stop"
        );
        let mut d = Daemon::spawn(&cfg, &log);
        // Drained: up (/metrics answers only after the suppression state is restored), no
        // pass open, the spool empty, the stream holding every event it accepted.
        let end = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let open = common::daemon::metric(admin, "scangate_suppress_tracked_passes").await;
            let spool = scangate::spool::Spool::open_read_only(&state)
                .ok()
                .and_then(|c| scangate::spool::stats_of(&c).ok());
            if open == Some(0)
                && spool
                    .as_ref()
                    .is_some_and(|s| s.backlog == 0 && redis.xlen(STREAM) >= s.next_seq - 1)
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < end,
                "not drained within 60 s: open passes {open:?}, spool {spool:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // /status and /metrics show the sink like the HTTP forwarder.
        let status: serde_json::Value = serde_json::from_str(
            &reqwest::get(format!("http://127.0.0.1:{admin}/status"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(status["upstream"]["kind"], "redis-streams");
        assert_eq!(status["upstream"]["stream"], STREAM);
        assert_eq!(status["upstream"]["target"], redis.url());
        assert!(status["backlog"].is_u64());
        assert!(
            common::daemon::metric(admin, "scangate_redis_connects_total")
                .await
                .is_some_and(|n| n >= 1)
        );
        d.sigterm();
        let status = d.wait_exit(Duration::from_secs(15)).await;
        if !status.success() {
            let log = d.log_text();
            panic!(
                "the last incarnation exited with {status:?}; log tail:\n{}",
                &log[log.len().saturating_sub(3000)..]
            );
        }
        let conn = scangate::spool::Spool::open_read_only(&state).unwrap();
        if scangate::spool::stats_of(&conn).unwrap().backlog == 0 {
            break;
        }
    }

    // Everything ever accepted, the last incarnation's own events included (passes restored
    // from the suppression log are emitted at start).
    let conn = scangate::spool::Spool::open_read_only(&state).unwrap();
    let stats = scangate::spool::stats_of(&conn).unwrap();
    assert_eq!(stats.backlog, 0);
    let accepted = stats.next_seq - 1;
    drop(conn);
    let entries = redis.entries(STREAM);
    let mut by_seq: HashMap<u64, usize> = HashMap::new();
    for e in &entries {
        let data: serde_json::Value = serde_json::from_str(field(e, "data").unwrap()).unwrap();
        *by_seq.entry(data["seq"].as_u64().unwrap()).or_default() += 1;
    }
    let missing: Vec<u64> = (1..=accepted).filter(|s| !by_seq.contains_key(s)).collect();
    assert!(
        missing.is_empty(),
        "lost {} accepted events, first: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let twice: Vec<(&u64, &usize)> = by_seq.iter().filter(|(_, &n)| n > 1).collect();
    assert!(
        twice.is_empty(),
        "{} events in the stream more than once, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
    assert_eq!(entries.len() as u64, accepted);
    // Resends did happen (the keys skipped them): the keys outnumber nothing, one per event.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{{{STREAM}}}:seen:*"))
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(keys.len() as u64, accepted);
    // `scangate status` (the daemon stopped: read from the spool) names the sink.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_scangate"))
        .args(["status", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "upstream:        redis-streams {} stream {STREAM}, dead letters also in {STREAM}:dlq",
            redis.url()
        )),
        "{text}"
    );
    assert!(text.contains("backlog:         0 events"), "{text}");
    eprintln!("accepted {accepted} events over {ROUNDS} kill -9 rounds; each once in the stream");
}

/// A server that stops answering (paused clients) makes requests time out; the batch goes
/// again with the same idempotency keys, so whatever the first attempt added is not added
/// twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_times_out_and_the_resend_adds_nothing_twice() {
    let redis = RedisServer::start("");
    let url = redis.url();
    let rig = Rig::new(|d| redis_rig_config(d, &url, "timeout_ms = 300")).await;
    rig.commit("A", 100, 100).await;
    drained(&rig, "first events", Duration::from_secs(30)).await;
    // Every client paused for 1.5 s: the script calls wait and time out at 300 ms.
    redis.run(&["CLIENT", "PAUSE", "1500", "WRITE"]);
    rig.commit("B", 500, 100).await;
    counted(&rig, "timeout", false).await;
    drained(&rig, "delivery after the pause", Duration::from_secs(30)).await;
    let ids = ids_in(&redis.entries(STREAM));
    assert_eq!(ids.len(), 600);
    assert!(ids.values().all(|&n| n == 1), "an event added twice");
    assert_eq!(redis.xlen(STREAM), 600);
    rig.shutdown().await;
}

/// A TLS-only redis-server with `server_pem`/`server_key` as its certificate, requiring a
/// client certificate (made here); the `[upstream]` lines for a gateway to reach it: the
/// client certificate and key, and `ca_file` (the server's certificate) when `with_ca`.
struct TlsRedis {
    redis: RedisServer,
    _dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    ccert: std::path::PathBuf,
    ckey: std::path::PathBuf,
}

impl TlsRedis {
    fn start(server_pem: String, server_key: String) -> TlsRedis {
        let dir = tempfile::tempdir().unwrap();
        let client = rcgen::generate_simple_self_signed(vec!["gw-test".to_string()]).unwrap();
        let w = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let cert = w("server.pem", &server_pem);
        let key = w("server.key", &server_key);
        // The server checks clients against the client's (self-signed) certificate.
        let ccert = w("client.pem", &client.cert.pem());
        let ckey = w("client.key", &client.signing_key.serialize_pem());
        let redis = RedisServer::start_tls(
            "",
            (&cert, &key, &ccert),
            redis::TlsCertificates {
                client_tls: Some(redis::ClientTlsConfig {
                    client_cert: client.cert.pem().into_bytes(),
                    client_key: client.signing_key.serialize_pem().into_bytes(),
                }),
                root_cert: Some(server_pem.into_bytes()),
            },
        );
        TlsRedis {
            redis,
            _dir: dir,
            cert,
            ccert,
            ckey,
        }
    }

    fn upstream(&self, with_ca: bool) -> String {
        let ca = if with_ca {
            format!("ca_file = \"{}\"\n", self.cert.display())
        } else {
            String::new()
        };
        format!(
            "{ca}client_cert_file = \"{}\"\nclient_key_file = \"{}\"",
            self.ccert.display(),
            self.ckey.display()
        )
    }
}

/// `rediss://` with a private CA (`ca_file`) and a client certificate the server requires;
/// without the CA the server's certificate is not trusted: kept, retried, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_a_client_certificate() {
    let server = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let tls = TlsRedis::start(server.cert.pem(), server.signing_key.serialize_pem());
    let url = tls.redis.url();
    assert!(url.starts_with("rediss://"));
    let rig = Rig::new(|d| redis_rig_config(d, &url, &tls.upstream(true))).await;
    rig.commit("A", 300, 100).await;
    drained(&rig, "delivery over TLS", Duration::from_secs(30)).await;
    assert_eq!(tls.redis.xlen(STREAM), 300);
    rig.shutdown().await;

    // The same without the private CA: the certificate is not trusted, nothing is lost.
    let rig = Rig::new(|d| redis_rig_config(d, &url, &tls.upstream(false))).await;
    rig.commit("B", 100, 100).await;
    wait_until(
        "the TLS failure is an outage",
        Duration::from_secs(30),
        || rig.metrics.upstream_down.get() == 1,
    )
    .await;
    let stats = rig.spool.stats().await.unwrap();
    assert_eq!(stats.backlog, 100);
    assert_eq!(stats.dead_letters, 0);
    assert_eq!(tls.redis.xlen(STREAM), 300);
    // The error names the certificate.
    error_containing(&rig, "certificate").await;
    rig.shutdown().await;
}

/// A box without an RTC (or before NTP) sees every certificate as not valid yet: the error
/// blames the gateway's clock, as for HTTP, and keeps everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_not_valid_yet_blames_the_gateways_clock() {
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2099, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let server = params.self_signed(&key).unwrap();
    let tls = TlsRedis::start(server.pem(), key.serialize_pem());
    let url = tls.redis.url();
    let rig = Rig::new(|d| redis_rig_config(d, &url, &tls.upstream(true))).await;
    rig.commit("A", 50, 50).await;
    wait_until("an outage", Duration::from_secs(30), || {
        rig.metrics.upstream_down.get() == 1
    })
    .await;
    let stats = rig.spool.stats().await.unwrap();
    assert_eq!(stats.backlog, 50);
    let err = error_containing(&rig, "not valid yet").await;
    assert!(
        err.starts_with("TLS: the server's certificate is not valid yet by this gateway's clock"),
        "{err}"
    );
    rig.shutdown().await;
}

/// Settings the server refuses while connecting (a password for a server that has none, a
/// database it does not have) are a misconfiguration, not refused events: nothing is
/// bisected or dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_refused_while_connecting_are_a_misconfiguration() {
    let redis = RedisServer::start("databases 4");
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "not-needed").unwrap();
    for (url, extra, says) in [
        (
            redis.url(),
            format!("password_file = \"{}\"", pw.display()),
            "check username and password_file",
        ),
        (
            format!("{}/9", redis.url()),
            String::new(),
            "DB index is out of range (while connecting",
        ),
    ] {
        let rig = Rig::new(|d| redis_rig_config(d, &url, &extra)).await;
        rig.commit("A", 30, 30).await;
        wait_until(
            "the misconfiguration alarm",
            Duration::from_secs(30),
            || rig.metrics.upstream_misconfigured.get() == 1,
        )
        .await;
        let stats = rig.spool.stats().await.unwrap();
        assert_eq!(stats.backlog, 30);
        assert_eq!(stats.dead_letters, 0);
        assert_eq!(rig.metrics.upstream_rejecting_all.get(), 0);
        error_containing(&rig, says).await;
        rig.shutdown().await;
    }
    assert_eq!(redis.xlen(STREAM), 0);
}

/// A server that may evict keys when full (contract 000's own example sets allkeys-lru) or
/// persists nothing puts delivered events at risk: counted (and logged) at connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn risky_server_settings_are_named_at_connect() {
    let redis = RedisServer::start("maxmemory-policy allkeys-lru\nappendonly yes");
    let url = redis.url();
    let rig = Rig::new(|d| redis_rig_config(d, &url, "")).await;
    rig.commit("A", 10, 10).await;
    drained(&rig, "delivered", Duration::from_secs(30)).await;
    assert_eq!(
        rig.metrics.redis_server_risks.get(),
        1,
        "eviction only (AOF on)"
    );
    rig.shutdown().await;
    redis.run(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    let rig = Rig::new(|d| redis_rig_config(d, &url, "")).await;
    rig.commit("B", 10, 10).await;
    drained(&rig, "delivered", Duration::from_secs(30)).await;
    assert_eq!(rig.metrics.redis_server_risks.get(), 0);
    rig.shutdown().await;
}

/// A write refusal of the server as a whole (too few replicas) right after deliveries keeps
/// every event: nothing is dead-lettered (the HTTP rule that one event refused just after
/// a success is a bad event does not hold for Redis, whose refusals are hardly ever about an
/// event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_of_the_whole_server_after_deliveries_dead_letters_nothing() {
    let redis = RedisServer::start("");
    let url = redis.url();
    let rig = Rig::new(|d| redis_rig_config(d, &url, "batch_max_events = 10")).await;
    rig.commit("A", 50, 10).await;
    drained(&rig, "first events", Duration::from_secs(30)).await;
    redis.run(&["CONFIG", "SET", "min-replicas-to-write", "1"]);
    rig.commit("B", 50, 10).await;
    counted(&rig, "NOREPLICAS", true).await;
    let stats = rig.spool.stats().await.unwrap();
    assert_eq!(stats.dead_letters, 0);
    assert_eq!(stats.backlog, 50);
    error_containing(&rig, "replicas").await;
    redis.run(&["CONFIG", "SET", "min-replicas-to-write", "0"]);
    drained(
        &rig,
        "delivery once writes are accepted",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(ids_in(&redis.entries(STREAM)).len(), 100);
    assert_eq!(rig.spool.stats().await.unwrap().dead_letters, 0);
    rig.shutdown().await;
}

/// A password file that is missing while Redis requires a password: the credentials alarm,
/// nothing bisected; the file written later is read at the next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_password_file_is_the_credentials_alarm_until_it_appears() {
    let redis = RedisServer::start("requirepass s3cret");
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("not-yet");
    let extra = format!("password_file = \"{}\"", pw.display());
    let rig = Rig::new(|d| redis_rig_config(d, &url, &extra)).await;
    rig.commit("A", 100, 100).await;
    wait_until("the credentials alarm", Duration::from_secs(30), || {
        rig.metrics.upstream_misconfigured.get() == 1
    })
    .await;
    assert_eq!(rig.metrics.upstream_rejecting_all.get(), 0);
    assert_eq!(rig.backlog().await, 100);
    std::fs::write(&pw, "s3cret\n").unwrap();
    drained(
        &rig,
        "delivery once the file exists",
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(redis.xlen(STREAM), 100);
    rig.shutdown().await;
}

/// A connection the server closed while idle (its `timeout`, a NAT) is replaced and the batch
/// sent again at once: not an outage, no warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_while_idle_is_replaced_quietly() {
    let redis = RedisServer::start("");
    let url = redis.url();
    let rig = Rig::new(|d| redis_rig_config(d, &url, "")).await;
    for round in 0..5 {
        rig.commit(&format!("R{round}"), 20, 20).await;
        drained(&rig, "delivered", Duration::from_secs(30)).await;
        // What an idle timeout does to the gateway's connection.
        redis.run(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"]);
    }
    assert_eq!(redis.xlen(STREAM), 100);
    assert_eq!(rig.metrics.batches_failed.get(), 0, "no failure recorded");
    assert_eq!(rig.spool.stats().await.unwrap().last_error, None);
    assert!(rig.metrics.upstream_fresh_retries.get() >= 4);
    rig.shutdown().await;
}

/// Trimming is the stream's retention (`maxlen`); how far the slowest consumer group is
/// behind is reported after every batch, so a backlog about to push unread entries out shows
/// (`scangate_redis_consumers_behind`, and a WARN when it crosses `maxlen`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn how_far_the_consumer_groups_are_behind_is_reported() {
    let redis = RedisServer::start("");
    redis.run(&[
        "XGROUP",
        "CREATE",
        STREAM,
        "baggage_processors",
        "$",
        "MKSTREAM",
    ]);
    let url = redis.url();
    let rig = Rig::new(|d| {
        redis_rig_config(
            d,
            &url,
            "maxlen = 5000\nmax_in_flight = 1\nbatch_max_events = 500",
        )
    })
    .await;
    rig.commit("A", 3_000, 500).await;
    drained(&rig, "delivered", Duration::from_secs(30)).await;
    assert_eq!(
        rig.metrics.redis_consumers_behind.get(),
        3_000,
        "nothing read yet"
    );
    // A consumer reads 1,000 and acknowledges 600 of them.
    let read = read_group(&mut redis.conn(), "w1", 1_000);
    assert_eq!(read.len(), 1_000);
    let ids: Vec<String> = read.iter().map(|(id, _)| id.clone()).take(600).collect();
    let mut ack = redis::cmd("XACK");
    ack.arg(STREAM).arg("baggage_processors").arg(&ids);
    let _: i64 = ack.query(&mut redis.conn()).unwrap();
    rig.commit("B", 500, 500).await;
    drained(&rig, "delivered", Duration::from_secs(30)).await;
    // 2,000 + 500 unread, 400 pending.
    assert_eq!(rig.metrics.redis_consumers_behind.get(), 2_900);
    assert_eq!(ids_in(&redis.entries(STREAM)).len(), 3_500);
    rig.shutdown().await;
}

/// A user whose ACL lets it call the script but not load it: once the script is gone from
/// the server, a misconfiguration (nothing dead-lettered), not refused events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_without_script_load_is_a_misconfiguration() {
    let redis = RedisServer::start("user gw on >gw-pw ~* &* +@all -script");
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "gw-pw").unwrap();
    // Loaded by an administrator: the gateway can call it.
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(scangate::forward::redis::SCRIPT)
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(sha.len(), 40);
    let url = redis.url();
    let extra = format!("username = \"gw\"\npassword_file = \"{}\"", pw.display());
    let rig = Rig::new(|d| redis_rig_config(d, &url, &extra)).await;
    rig.commit("A", 50, 50).await;
    drained(
        &rig,
        "delivered with the loaded script",
        Duration::from_secs(30),
    )
    .await;
    redis.run(&["SCRIPT", "FLUSH"]);
    rig.commit("B", 50, 50).await;
    wait_until(
        "the misconfiguration alarm",
        Duration::from_secs(30),
        || rig.metrics.upstream_misconfigured.get() == 1,
    )
    .await;
    let stats = rig.spool.stats().await.unwrap();
    assert_eq!(stats.dead_letters, 0);
    assert_eq!(stats.backlog, 50);
    error_containing(&rig, "SCRIPT LOAD").await;
    rig.shutdown().await;
}
