//! Shared test helpers: the ingest server and a rig running the real spool + forwarder.
#![allow(dead_code)]

pub mod daemon;
pub mod frames;
pub mod ingest;
pub mod mosquitto;
pub mod redis_server;

use scangate::config::{Config, UpstreamConfig};
use scangate::event::{EventBody, ReadKind};
use scangate::forward::Forwarder;
use scangate::metrics::Metrics;
use scangate::spool::actor::{self, SpoolHandle};
use scangate::spool::{Spool, SpoolOptions};
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A full config from TOML fragments (the upstream url and extra `[upstream]` keys).
pub fn config(state_dir: &Path, url: &str, profile: &str, upstream_extra: &str) -> Config {
    let text = format!(
        "[gateway]\nid = \"gw-test\"\nsite = \"SITE1\"\nstate_dir = \"{}\"\n[[source]]\nname = \"s\"\nkind = \"replay\"\nprotocol = \"lines\"\nfile = \"x.cap\"\n[upstream]\nurl = \"{url}\"\nprofile = \"{profile}\"\nretry_min_ms = 10\nretry_max_ms = 100\nbatch_max_delay_ms = 20\n{upstream_extra}\n[admin]\nlisten = \"off\"\n",
        state_dir.display()
    );
    Config::parse(&text, state_dir).unwrap_or_else(|e| panic!("test config invalid: {e:?}"))
}

/// Run the real pipeline in this process on `sources` (TOML `[[source]]` tables, replays)
/// against `url` until every source has ended and the spool is empty. State in `dir/state`.
pub async fn run_until_idle(dir: &Path, sources: &str, url: &str) -> scangate::app::RunSummary {
    let text = format!(
        "[gateway]\nid = \"gw-test\"\nstate_dir = \"{}\"\n[spool]\ncommit_interval_ms = 5\n{sources}\n[upstream]\nurl = \"{url}\"\nprofile = \"bag-events\"\nbatch_max_delay_ms = 10\n[admin]\nlisten = \"off\"\n",
        dir.join("state").display()
    );
    let cfg = Config::parse(&text, dir).unwrap_or_else(|e| panic!("test config invalid: {e:?}"));
    scangate::app::run(
        cfg,
        Arc::default(),
        CancellationToken::new(),
        scangate::app::RunOptions {
            exit_when_idle: true,
            ..Default::default()
        },
        |_| {},
    )
    .await
    .expect("pipeline run")
}

pub fn body(tag: &str, ms: i64) -> EventBody {
    EventBody {
        kind: ReadKind::BagTag,
        tag: tag.to_string(),
        source: "belt".into(),
        location: "PTY_SORT_3".into(),
        device: "SCANNER_3".into(),
        scan_type: Some("sortation".into()),
        antenna: Some(1),
        rssi_cdbm: Some(-6150),
        read_count: 1,
        first_seen_ms: ms,
        last_seen_ms: ms,
        symbology: None,
        value: None,
        clock: Default::default(),
    }
}

pub struct Rig {
    pub dir: tempfile::TempDir,
    pub spool: SpoolHandle,
    pub metrics: Arc<Metrics>,
    thread: Option<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Rig {
    /// Open a spool in a temp dir; start the forwarder with `upstream` unless None.
    pub async fn new(make: impl FnOnce(&Path) -> Config) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = make(dir.path());
        Self::open(dir, cfg.upstream.clone(), true).await
    }

    pub async fn open(dir: tempfile::TempDir, upstream: UpstreamConfig, forward: bool) -> Rig {
        let metrics = Arc::new(Metrics::default());
        let (spool, _) =
            Spool::open(dir.path(), SpoolOptions::default(), metrics.clone()).expect("open spool");
        let (handle, thread) = actor::spawn(spool).expect("spawn spool");
        let stop = CancellationToken::new();
        let task = if forward {
            let f = Forwarder::new(
                upstream,
                "gw-test".into(),
                "SITE1".into(),
                handle.clone(),
                metrics.clone(),
            )
            .expect("forwarder");
            Some(tokio::spawn(f.run(stop.clone())))
        } else {
            None
        };
        Rig {
            dir,
            spool: handle,
            metrics,
            thread: Some(thread),
            stop,
            task,
        }
    }

    /// Commit events with tags `prefix-0 .. prefix-(n-1)`, in groups of `group`.
    pub async fn commit(&self, prefix: &str, n: usize, group: usize) {
        let mut i = 0;
        while i < n {
            let k = group.min(n - i);
            let bodies = (i..i + k)
                .map(|j| body(&format!("{prefix}-{j}"), 1_763_289_000_000 + j as i64))
                .collect();
            self.spool.append(bodies).await.expect("append");
            i += k;
        }
    }

    pub async fn backlog(&self) -> u64 {
        self.spool.stats().await.expect("stats").backlog
    }

    pub async fn shutdown(mut self) -> tempfile::TempDir {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        let Rig {
            dir, spool, thread, ..
        } = self;
        drop(spool);
        if let Some(t) = thread {
            tokio::task::spawn_blocking(move || t.join())
                .await
                .expect("join")
                .expect("spool thread");
        }
        dir
    }
}

/// The order rule with batches in flight at once (README, "Order"): events are sent and
/// acknowledged in commit order, and an event never arrives before one committed `window`
/// or more positions earlier (`window` = `max_in_flight` × `batch_max_events`). `arrived`:
/// commit positions (0-based) in arrival order, each once. Panics naming the first breach.
pub fn assert_order_within(arrived: &[usize], window: usize) {
    let mut seen = vec![false; arrived.iter().max().map_or(0, |m| m + 1)];
    let mut lowest_missing = 0;
    for (i, &p) in arrived.iter().enumerate() {
        assert!(
            p < lowest_missing + window,
            "arrival {i}: position {p} arrived before position {lowest_missing} (window {window})"
        );
        seen[p] = true;
        while seen.get(lowest_missing) == Some(&true) {
            lowest_missing += 1;
        }
    }
}

/// A xorshift generator seeded from the clock (the seed is printed, so a failing run can be
/// reproduced): a fixed seed would try the same moments every run.
pub fn random_moments(what: &str) -> impl FnMut() -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("{what} seed {seed}");
    let mut rng = seed | 1;
    move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    }
}
