//! Progress of the pipeline's stages, for the systemd watchdog.
//!
//! Each stage (the ingest stage, the forwarder, every source's thread or tasks) holds a
//! [`Beat`]. Before a unit of work it says how long that work may take ([`Beat::busy`],
//! [`Beat::busy_for`]); before it waits for input or for another stage, for as long as that
//! takes, it says so ([`Beat::idle`]). A stage that stays busy past its allowance is wedged
//! (a deadlock, a loop that never ends, a call that never returns): the watchdog then stops
//! sending `WATCHDOG=1`, and systemd restarts the daemon (`WatchdogSec=`). An idle stage is
//! never wedged: a reader that sends nothing, an upstream with nothing to take.
//!
//! The spool thread is checked apart, by asking it for its figures (see
//! [`crate::service::spawn_watchdog`]).

use crate::metrics::mono_ms;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Work allowance before the watchdog is set up: the unit's `WatchdogSec=30`.
const DEFAULT_ALLOWANCE_MS: u64 = 30_000;

/// Every stage's [`Beat`], and the work allowance: systemd's watchdog interval
/// (`WATCHDOG_USEC`), since a stage busy for longer than that could not have been pinged for.
#[derive(Debug)]
pub struct Progress {
    beats: Mutex<Vec<Arc<Beat>>>,
    allowance_ms: Arc<AtomicU64>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            beats: Mutex::default(),
            allowance_ms: Arc::new(AtomicU64::new(DEFAULT_ALLOWANCE_MS)),
        }
    }
}

/// A stage that made no progress within its allowance: its name, and how long it has been
/// busy.
#[derive(Debug, Clone, PartialEq)]
pub struct Wedged {
    pub stage: String,
    pub busy_for: Duration,
}

impl Progress {
    /// The beat of stage `name` (`ingest`, `forwarder`, `source <name>`…), registered for
    /// [`Progress::wedged`]. A stage started again (a source or the forwarder restarted by a
    /// reload) gets a new beat that replaces the old one, which is no longer checked (an old
    /// stage that was aborted never retires its beat).
    pub fn beat(&self, name: &str) -> Arc<Beat> {
        let beat = Arc::new(Beat {
            name: name.to_string(),
            since_ms: AtomicU64::new(mono_ms()),
            allowance_ms: AtomicU64::new(IDLE),
            base_ms: self.allowance_ms.clone(),
            fault: fault_for(name),
        });
        if let Ok(mut v) = self.beats.lock() {
            v.retain(|b| b.allowance_ms.load(Ordering::Relaxed) != RETIRED && b.name != name);
            v.push(beat.clone());
        }
        beat
    }

    /// Set the work allowance (the watchdog interval).
    pub fn set_allowance(&self, d: Duration) {
        self.allowance_ms
            .store((d.as_millis() as u64).max(1), Ordering::Relaxed);
    }

    /// The stages busy past their allowance now.
    pub fn wedged(&self) -> Vec<Wedged> {
        let now = mono_ms();
        let Ok(v) = self.beats.lock() else {
            return Vec::new();
        };
        v.iter()
            .filter_map(|b| {
                let allowance = b.allowance_ms.load(Ordering::Acquire);
                if allowance == IDLE || allowance == RETIRED {
                    return None;
                }
                let busy = now.saturating_sub(b.since_ms.load(Ordering::Acquire));
                (busy > allowance).then(|| Wedged {
                    stage: b.name.clone(),
                    busy_for: Duration::from_millis(busy),
                })
            })
            .collect()
    }
}

/// `allowance_ms` of a stage waiting for input or for another stage.
const IDLE: u64 = 0;
/// `allowance_ms` of a stage that has ended.
const RETIRED: u64 = u64::MAX;

/// One stage's progress: when its current unit of work began and how long it may take.
#[derive(Debug)]
pub struct Beat {
    name: String,
    since_ms: AtomicU64,
    allowance_ms: AtomicU64,
    base_ms: Arc<AtomicU64>,
    /// Dev and test builds: the file whose existence wedges this stage (tests of the watchdog).
    fault: Option<std::path::PathBuf>,
}

impl Beat {
    /// Work begins that ends within the watchdog interval.
    pub fn busy(&self) {
        self.busy_for(Duration::ZERO);
    }

    /// Work begins that ends within `extra` (a request's timeout, a retry's wait) plus the
    /// watchdog interval.
    pub fn busy_for(&self, extra: Duration) {
        let allowance = self
            .base_ms
            .load(Ordering::Relaxed)
            .saturating_add(extra.as_millis() as u64)
            .min(RETIRED - 1);
        self.since_ms.store(mono_ms(), Ordering::Release);
        self.allowance_ms.store(allowance, Ordering::Release);
    }

    /// Waiting for input, or for another stage (which is checked on its own), for as long
    /// as that takes.
    pub fn idle(&self) {
        self.allowance_ms.store(IDLE, Ordering::Release);
    }

    /// The stage has ended (a source stopped): no longer checked.
    pub fn retire(&self) {
        self.allowance_ms.store(RETIRED, Ordering::Release);
    }

    /// Dev and test builds (not release), for the watchdog's tests: while the file named by
    /// `SCANGATE_FAULT_WEDGE=<stage>@<file>` exists, an async stage stops here for good.
    /// Nothing in release builds.
    pub async fn fault_point(&self) {
        if self.faulted() {
            tracing::warn!(stage = %self.name, "Fault injection: this stage is wedged");
            std::future::pending::<()>().await;
        }
    }

    /// [`Beat::fault_point`] for a stage on a thread of its own.
    pub fn fault_point_blocking(&self) {
        if self.faulted() {
            tracing::warn!(stage = %self.name, "Fault injection: this stage is wedged");
            loop {
                std::thread::park();
            }
        }
    }

    fn faulted(&self) -> bool {
        cfg!(scangate_fault_injection) && self.fault.as_ref().is_some_and(|f| f.exists())
    }
}

/// The trigger file of `SCANGATE_FAULT_WEDGE=<stage>@<file>` for stage `name` (dev and test builds).
fn fault_for(name: &str) -> Option<std::path::PathBuf> {
    if !cfg!(scangate_fault_injection) {
        return None;
    }
    let spec = std::env::var("SCANGATE_FAULT_WEDGE").ok()?;
    let (stage, file) = spec.split_once('@')?;
    (stage == name).then(|| std::path::PathBuf::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn busy_past_its_allowance_is_wedged_idle_never() {
        let p = Progress::default();
        p.set_allowance(Duration::from_secs(2));
        let a = p.beat("ingest");
        let b = p.beat("forwarder");
        a.busy();
        b.idle();
        tokio::time::advance(Duration::from_millis(1900)).await;
        assert!(p.wedged().is_empty());
        tokio::time::advance(Duration::from_millis(200)).await;
        let w = p.wedged();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].stage, "ingest");
        // A wait announced in advance stretches the allowance.
        a.busy_for(Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(p.wedged().is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(p.wedged().len(), 1);
        // An idle stage, however long, and a retired one, are not wedged.
        a.idle();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(p.wedged().is_empty());
        a.busy();
        a.retire();
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(p.wedged().is_empty());
        // A retired beat is forgotten when the next one is made.
        let _c = p.beat("source x");
        assert_eq!(p.beats.lock().unwrap().len(), 2);
        // A stage started again replaces its old beat, even one left busy (aborted).
        let old = p.beat("forwarder2");
        old.busy();
        let _new = p.beat("forwarder2");
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(p.wedged().is_empty());
    }
}
