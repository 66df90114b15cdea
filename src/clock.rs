//! Clocks: which wall time an event carries, and what to do when the wall clock is wrong.
//!
//! ARM boxes without a real-time clock boot in 1970 and keep that time until NTP syncs. A wall
//! clock earlier than the binary's build time (or than 2024-01-01, whichever is later) is
//! *unsynced*. Every read is also stamped on `CLOCK_BOOTTIME` (milliseconds since this boot,
//! counting suspend), which is right from the first instant; the kernel's boot id names the
//! boot it belongs to.
//!
//! - Clock synced: an event's times are wall times (`ClockMark::Synced`); a pass that began
//!   before the clock synced gets wall times computed from its boot-time stamps and the synced
//!   clock (`Rebased`).
//! - Clock unsynced: the event is committed with boot-time stamps (`Mono`) and the boot id of
//!   its chunk; nothing is sent while this boot's clock is unsynced. Once it syncs, the events
//!   are re-based (wall = boot time + the offset between the two clocks, measured now; the
//!   offset is recorded in the spool per boot, so events of a boot that ended are re-based
//!   after a restart too) and sent as `rebased`.
//! - Events of a past boot whose clock never synced cannot be placed in time: they are sent
//!   with the time they leave the gateway and marked `unsynced`. Timestamps sent upstream are
//!   never 1970.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicI64, Ordering};

/// The build time of this binary, unix ms (from `build.rs`).
pub const BUILD_MS: i64 = {
    let s = env!("SCANGATE_BUILD_UNIX").as_bytes();
    let mut v: i64 = 0;
    let mut i = 0;
    while i < s.len() {
        v = v * 10 + (s[i] - b'0') as i64;
        i += 1;
    }
    v * 1000
};

/// Wall times before this are unsynced: the later of 2024-01-01 and the build time.
pub const PLAUSIBLE_FROM_MS: i64 = if BUILD_MS > crate::event::PLAUSIBLE_WALL_MS {
    BUILD_MS
} else {
    crate::event::PLAUSIBLE_WALL_MS
};

/// True when `wall_ms` can be a real current time.
pub fn plausible(wall_ms: i64) -> bool {
    wall_ms >= PLAUSIBLE_FROM_MS
}

/// How an event's `first_seen_ms`/`last_seen_ms` were obtained (the upstream field `clock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum ClockMark {
    /// Wall times from a synced clock.
    #[default]
    Synced,
    /// Read while the clock was unsynced; wall times computed from boot time once it synced.
    Rebased,
    /// Read in a boot whose clock never synced: the times are when the event was sent.
    Unsynced,
    /// Not yet re-based: the times are `CLOCK_BOOTTIME` ms of the boot named by the event's
    /// chunk. Only ever stored, never sent.
    Mono,
}

impl ClockMark {
    /// The upstream value (`synced` | `rebased` | `unsynced`).
    pub fn as_str(self) -> &'static str {
        match self {
            ClockMark::Synced => "synced",
            ClockMark::Rebased => "rebased",
            ClockMark::Unsynced | ClockMark::Mono => "unsynced",
        }
    }
}

/// `CLOCK_BOOTTIME` in ms: monotonic, counts suspend, starts at boot.
pub fn boottime_ms() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`;
    // CLOCK_BOOTTIME exists on every Linux since 2.6.39.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    if rc != 0 {
        return crate::metrics::mono_ms() as i64;
    }
    // time_t and long are 32 bits on armv7: the conversion is not useless there.
    #[allow(clippy::useless_conversion)]
    let (s, ns) = (i64::from(ts.tv_sec), i64::from(ts.tv_nsec));
    s * 1000 + ns / 1_000_000
}

/// A source of wall time and boot time. The daemon uses [`SystemClock`]; tests inject a
/// [`ManualClock`] to boot "in 1970" and sync later.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Unix ms (possibly unsynced).
    fn wall_ms(&self) -> i64;
    /// `CLOCK_BOOTTIME` ms.
    fn boot_ms(&self) -> i64 {
        boottime_ms()
    }
    /// wall − boot time now, when the wall clock is synced.
    fn offset(&self) -> Option<i64> {
        let boot = self.boot_ms();
        let wall = self.wall_ms();
        plausible(wall).then_some(wall - boot)
    }
}

/// The system's clocks.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn wall_ms(&self) -> i64 {
        crate::event::wall_now_ms()
    }
}

/// A wall clock at a settable distance from the real one (boot time is real).
#[derive(Debug, Default)]
pub struct ManualClock {
    skew_ms: AtomicI64,
}

impl ManualClock {
    /// A clock `skew_ms` away from the system's wall clock (negative: behind).
    pub fn new(skew_ms: i64) -> Self {
        ManualClock {
            skew_ms: AtomicI64::new(skew_ms),
        }
    }

    /// A clock showing 1970-01-01 plus the time since boot, as a box without an RTC has.
    pub fn booted_in_1970() -> Self {
        Self::new(boottime_ms() - crate::event::wall_now_ms())
    }

    /// Set the distance from the system's wall clock (0: synced).
    pub fn set_skew(&self, skew_ms: i64) {
        self.skew_ms.store(skew_ms, Ordering::Release);
    }
}

impl Clock for ManualClock {
    fn wall_ms(&self) -> i64 {
        crate::event::wall_now_ms() + self.skew_ms.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_build_time_is_a_lower_bound_of_now() {
        assert!(plausible(BUILD_MS));
        assert!(plausible(crate::event::wall_now_ms()));
        assert!(!plausible(boottime_ms()));
        assert!(!plausible(BUILD_MS - 1));
    }

    #[test]
    fn a_manual_clock_boots_in_1970_and_syncs() {
        let c = ManualClock::booted_in_1970();
        assert!(c.offset().is_none());
        assert!(c.wall_ms() < 86_400_000 * 365);
        c.set_skew(0);
        let off = c.offset().expect("synced");
        assert!((off + c.boot_ms() - crate::event::wall_now_ms()).abs() < 1000);
    }
}
