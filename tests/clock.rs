//! Clock sanity (issue 16, item 7), in process with an injected clock: a gateway that booted
//! in 1970 (no RTC, no NTP yet) stamps its reads on boot time, sends nothing, and once the
//! clock syncs sends the events with true wall times, marked `rebased`; reads made after the
//! sync are `synced`. Timestamps sent upstream are never 1970.

mod common;

use common::ingest::{wait_until, Ingest};
use scangate::clock::{Clock, ManualClock};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn ms_of(rfc3339: &str) -> i64 {
    humantime::parse_rfc3339(rfc3339)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_read_before_the_clock_synced_are_rebased_and_sent_after() {
    let ingest = Ingest::start().await;
    let dir = tempfile::tempdir().unwrap();
    let early = dir.path().join("early.cap");
    // Three bags, five reads each, read at once.
    let mut text = String::from("scangate-capture v1 serial\n");
    for bag in 0..3 {
        for _ in 0..5 {
            text.push_str(&format!("0 text 000000000{bag}\\r\\n\n"));
        }
    }
    std::fs::write(&early, &text).unwrap();
    let toml = format!(
        "[gateway]\nid = \"gw-clock\"\nstate_dir = \"{}\"\n[spool]\ncommit_interval_ms = 5\n[suppress]\nbarcode_window_ms = 200\n[[source]]\nname = \"belt\"\nkind = \"replay\"\nprotocol = \"lines\"\nfile = \"{}\"\nspeed = \"max\"\n[upstream]\nurl = \"{}\"\nprofile = \"bag-events\"\nbatch_max_delay_ms = 10\nretry_min_ms = 20\nretry_max_ms = 100\n[admin]\nlisten = \"off\"\n",
        dir.path().join("state").display(),
        early.display(),
        ingest.base_url()
    );
    let cfg = scangate::config::Config::parse(&toml, dir.path()).unwrap();
    let clock = Arc::new(ManualClock::booted_in_1970());
    assert!(clock.offset().is_none(), "the injected clock is unsynced");
    let metrics = Arc::new(scangate::metrics::Metrics::default());
    let shutdown = CancellationToken::new();
    let opts = scangate::app::RunOptions {
        clock: clock.clone(),
        ..Default::default()
    };
    let real_start = scangate::event::wall_now_ms();
    let run = tokio::spawn(scangate::app::run(
        cfg,
        metrics.clone(),
        shutdown.clone(),
        opts,
        |_| {},
    ));
    // The three passes end (200 ms window) and are committed, stamped on boot time.
    wait_until("three passes committed", Duration::from_secs(20), || {
        metrics.spool_committed.get() == 3
    })
    .await;
    assert_eq!(metrics.clock_unsynced.get(), 1);
    // The forwarder has the events in hand and holds them.
    wait_until(
        "the forwarder holds the events",
        Duration::from_secs(20),
        || metrics.delivery_held_for_clock.get() == 1,
    )
    .await;
    assert_eq!(
        ingest.unique(),
        0,
        "nothing is sent while the clock says 1970"
    );

    // NTP syncs.
    clock.set_skew(0);
    let synced_at = scangate::event::wall_now_ms();
    wait_until("the held events delivered", Duration::from_secs(20), || {
        ingest.unique() == 3
    })
    .await;
    let events = ingest.with(|s| s.events.clone());
    for e in &events {
        assert_eq!(e["clock"], "rebased", "{e}");
        let first = ms_of(e["first_seen"].as_str().unwrap());
        assert!(
            first >= real_start - 1000 && first <= synced_at,
            "re-based to when the bag was really read: {e}"
        );
        assert_eq!(e["read_count"], 5, "{e}");
    }
    shutdown.cancel();
    run.await.unwrap().unwrap();

    // The offset of this boot is in the spool: a later run (another boot) re-bases its events.
    let conn = scangate::spool::Spool::open_read_only(&dir.path().join("state")).unwrap();
    let offsets: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM meta WHERE key LIKE 'clock_offset:%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(offsets, 1);
}

/// Reads made after the clock synced carry `synced` and their wall time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_read_with_a_synced_clock_are_marked_synced() {
    let ingest = Ingest::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("c.cap");
    std::fs::write(
        &cap,
        "scangate-capture v1 serial\n0 text 0000000042\\r\\n\n",
    )
    .unwrap();
    let before = scangate::event::wall_now_ms();
    let sources = format!(
        "[[source]]\nname = \"belt\"\nkind = \"replay\"\nprotocol = \"lines\"\nfile = \"{}\"\nspeed = \"max\"\n",
        cap.display()
    );
    let summary = common::run_until_idle(dir.path(), &sources, &ingest.base_url()).await;
    assert_eq!(summary.backlog_left, 0);
    let e = ingest.with(|s| s.events[0].clone());
    assert_eq!(e["clock"], "synced");
    let first = ms_of(e["first_seen"].as_str().unwrap());
    assert!(
        first >= before - 1000 && first <= scangate::event::wall_now_ms(),
        "{e}"
    );
}
