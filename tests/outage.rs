//! An upstream outage while 50,000 events are committed, then recovery: every event delivered
//! once by event_id, in commit order as far as batches in flight at once allow (fifo).

mod common;

use common::ingest::{wait_until, Ingest};
use common::{config, Rig};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_events_during_an_outage_are_all_delivered_once_in_order() {
    let mut ingest = Ingest::start().await;
    let url = ingest.base_url();
    ingest.stop().await; // connection refused from now on
    let rig = Rig::new(|d| config(d, &url, "bag-events", "batch_max_events = 1000")).await;
    rig.commit("o", 50_000, 500).await;
    assert_eq!(rig.backlog().await, 50_000);
    wait_until(
        "the forwarder notices the outage",
        Duration::from_secs(10),
        || rig.metrics.upstream_down.get() == 1,
    )
    .await;
    assert_eq!(rig.metrics.delivered.get(), 0);

    ingest.restart().await;
    let back = tokio::time::Instant::now();
    wait_until("all 50,000 delivered", Duration::from_secs(120), || {
        rig.metrics.delivered.get() == 50_000
    })
    .await;
    eprintln!(
        "backlog of 50,000 delivered {:?} after the upstream came back",
        back.elapsed()
    );
    assert_eq!(rig.backlog().await, 0);
    ingest.with(|s| {
        assert_eq!(s.events.len(), 50_000);
        assert_eq!(s.duplicates, 0, "a clean outage needs no resends");
        let seqs: Vec<usize> = s
            .events
            .iter()
            .map(|e| e["seq"].as_u64().unwrap() as usize - 1)
            .collect();
        // fifo: commit order, as far as batches in flight at once allow (16 of 1,000).
        common::assert_order_within(&seqs, 16 * 1000);
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert!(
            sorted.iter().enumerate().all(|(i, s)| i == *s),
            "seq 1..=50,000 each once"
        );
    });
    rig.shutdown().await;
}
