//! Adaptive request concurrency: how many batches may be in flight to the upstream at once.
//!
//! The rule follows Vector's adaptive request concurrency (AIMD, additive increase and
//! multiplicative decrease, on observed round-trip time and back-pressure answers), written
//! for the forwarder's own bookkeeping:
//!
//! - The limit starts at 1 and never leaves `1..=max_in_flight`.
//! - Answers are taken in windows of `limit` answers (about one round trip at full use).
//! - At the end of a window:
//!   - back-pressure in it (429, 503, a timeout) halves the limit;
//!   - otherwise a window mean RTT above the past mean plus a tolerance takes 10 % off (the
//!     server queues our requests: more of them only adds latency);
//!   - otherwise, if the limit was in full use during the window, it grows by one; until the
//!     first decrease it doubles instead (a slow start, as TCP's), so a far-away upstream
//!     gets its concurrency within a few round trips. The slow start begins again when the
//!     upstream comes back after an outage ([`Limiter::after_outage`]).
//! - Latency is judged against a base RTT: the mean of the last window with one request at a
//!   time (which queues nothing of ours: the link's own RTT), or a lower window mean since.
//!   A slower route is learned when the limit has eased down to 1. (Comparing with a moving
//!   mean instead lets the limit creep up one queued request at a time.) The tolerance
//!   is 2.5 mean deviations of the window means, within 10 % to 50 % of the base, and at least 1 ms
//!   (loopback RTTs are sub-millisecond and jittery). The RTT reported is an exponentially
//!   weighted mean of the window means (weight 0.4 for the newest).
//!
//! Pure and synchronous: the forwarder feeds it and reads [`Limiter::limit`].

use std::time::Duration;

/// Weight of the newest window in the past RTT mean.
const ALPHA: f64 = 0.4;
/// Deviations above the past mean that still count as flat latency.
const DEVIATIONS: f64 = 2.5;
/// A tolerance of at least this share of the past mean.
const MIN_TOLERANCE_SHARE: f64 = 0.1;
/// A tolerance of at most this share of the base (else the deviation a saw-tooth of the limit
/// itself causes would let the limit creep up).
const MAX_TOLERANCE_SHARE: f64 = 0.5;
/// A tolerance of at least this, seconds.
const MIN_TOLERANCE_S: f64 = 0.001;

/// The AIMD concurrency limit. See the module docs.
#[derive(Debug, Clone)]
pub struct Limiter {
    limit: usize,
    max: usize,
    /// Past mean RTT and mean deviation, seconds (None before the first window closes).
    past: Option<(f64, f64)>,
    /// Base RTT, seconds (see the module docs).
    base: f64,
    win_sum: f64,
    win_n: usize,
    /// Answers of the window whose RTT counts.
    win_timed: usize,
    win_full: bool,
    win_backpressure: bool,
    /// No decrease yet: grow by doubling.
    slow_start: bool,
    /// The last window closed with back-pressure.
    last_halved: bool,
}

/// What the limiter did at the end of a window (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Same,
    Up,
    /// Latency grew: 10 % off.
    Eased,
    /// Back-pressure: halved.
    Halved,
}

impl Limiter {
    /// A limiter that starts at 1 with `max` (≥ 1; `max_in_flight`) as its ceiling.
    pub fn new(max: usize) -> Self {
        Limiter {
            limit: 1,
            max: max.max(1),
            past: None,
            base: f64::INFINITY,
            win_sum: 0.0,
            win_n: 0,
            win_timed: 0,
            win_full: false,
            win_backpressure: false,
            slow_start: true,
            last_halved: false,
        }
    }

    /// The upstream came back after an outage: grow by doubling again (from the limit kept),
    /// so the backlog gets its concurrency within a few round trips; the first decrease ends
    /// it as at the start. Not after an outage of back-pressure (the last window was
    /// throttled): doubling into a server that just said "too many" only repeats it.
    pub fn after_outage(&mut self) {
        if !self.last_halved {
            self.slow_start = true;
        }
    }

    /// Requests that may be in flight now.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The past mean round-trip time (None before the first window closed).
    pub fn rtt(&self) -> Option<Duration> {
        self.past.map(|(m, _)| Duration::from_secs_f64(m))
    }

    /// An answer that took `rtt`; `in_flight` requests (this one included) were unresolved
    /// when it was sent; `backpressure` for 429, 503 or a timeout.
    pub fn on_answer(&mut self, rtt: Duration, in_flight: usize, backpressure: bool) -> Change {
        self.on_outcome(Some(rtt).filter(|_| !backpressure), in_flight, backpressure)
    }

    /// An answer whose time says nothing about the link (a refused connection, an error page:
    /// answered at once): counted in its window, not in the RTT.
    pub fn on_other(&mut self, in_flight: usize) -> Change {
        self.on_outcome(None, in_flight, false)
    }

    fn on_outcome(
        &mut self,
        rtt: Option<Duration>,
        in_flight: usize,
        backpressure: bool,
    ) -> Change {
        if backpressure {
            self.win_backpressure = true;
        }
        if let Some(rtt) = rtt {
            self.win_sum += rtt.as_secs_f64();
            self.win_timed += 1;
        }
        self.win_n += 1;
        if in_flight >= self.limit {
            self.win_full = true;
        }
        // Back-pressure acts at once (the next requests would meet it too); other windows
        // close after `limit` answers.
        if self.win_backpressure || self.win_n >= self.limit {
            self.close_window()
        } else {
            Change::Same
        }
    }

    fn close_window(&mut self) -> Change {
        let mean = (self.win_timed > 0).then(|| self.win_sum / self.win_timed as f64);
        let at_one = self.limit == 1;
        let change = if self.win_backpressure {
            self.limit = (self.limit / 2).max(1);
            Change::Halved
        } else {
            match (mean, self.past) {
                (Some(m), Some((_, dev)))
                    if m > self.base
                        + (DEVIATIONS * dev)
                            .min(MAX_TOLERANCE_SHARE * self.base)
                            .max(MIN_TOLERANCE_SHARE * self.base)
                            .max(MIN_TOLERANCE_S) =>
                {
                    let eased = ((self.limit as f64) * 0.9).floor() as usize;
                    self.limit = eased.clamp(1, self.max);
                    Change::Eased
                }
                _ if self.win_full && self.limit < self.max => {
                    let step = if self.slow_start { self.limit } else { 1 };
                    self.limit = (self.limit + step).min(self.max);
                    Change::Up
                }
                _ => Change::Same,
            }
        };
        if matches!(change, Change::Eased | Change::Halved) {
            self.slow_start = false;
        }
        self.last_halved = change == Change::Halved;
        if let Some(m) = mean {
            // One request at a time queues nothing of ours: that is the link's own RTT.
            self.base = if at_one { m } else { self.base.min(m) };
            self.past = Some(match self.past {
                None => (m, 0.0),
                Some((past, dev)) => (
                    past + ALPHA * (m - past),
                    dev + ALPHA * ((m - past).abs() - dev),
                ),
            });
        }
        self.win_sum = 0.0;
        self.win_n = 0;
        self.win_timed = 0;
        self.win_full = false;
        self.win_backpressure = false;
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// Feed `answers` answers at full use with this RTT; the final limit.
    fn run(l: &mut Limiter, answers: usize, mut rtt: impl FnMut(usize) -> Duration) -> usize {
        for _ in 0..answers {
            let n = l.limit();
            l.on_answer(rtt(n), n, false);
        }
        l.limit()
    }

    #[test]
    fn starts_at_one_and_grows_to_the_ceiling_while_latency_is_flat() {
        let mut l = Limiter::new(16);
        assert_eq!(l.limit(), 1);
        let end = run(&mut l, 2_000, |_| ms(50));
        assert_eq!(end, 16);
        assert_eq!(l.rtt(), Some(ms(50)));
    }

    #[test]
    fn a_slow_start_doubles_per_round_trip_until_the_first_decrease() {
        let mut l = Limiter::new(64);
        let mut limits = vec![l.limit()];
        // One window is `limit` answers: one round trip at full use.
        for _ in 0..6 {
            let n = l.limit();
            run(&mut l, n, |_| ms(50));
            limits.push(l.limit());
        }
        assert_eq!(limits, [1, 2, 4, 8, 16, 32, 64]);
        l.on_answer(ms(50), 64, true);
        assert_eq!(l.limit(), 32);
        run(&mut l, 32, |_| ms(50));
        assert_eq!(l.limit(), 33, "one at a time after a decrease");
    }

    #[test]
    fn after_an_outage_it_doubles_again() {
        let mut l = Limiter::new(128);
        run(&mut l, 400, |_| ms(50));
        assert_eq!(l.limit(), 128);
        // Latency grew once: eased, the slow start is over.
        run(&mut l, 128, |_| ms(100));
        assert_eq!(l.limit(), 115);
        l.after_outage();
        run(&mut l, 115, |_| ms(50));
        assert_eq!(l.limit(), 128, "doubled (capped), not one more");
    }

    #[test]
    fn no_slow_start_after_an_outage_of_back_pressure() {
        let mut l = Limiter::new(64);
        run(&mut l, 200, |_| ms(50));
        l.on_answer(ms(50), 64, true);
        assert_eq!(l.limit(), 32);
        l.after_outage();
        run(&mut l, 32, |_| ms(50));
        assert_eq!(l.limit(), 33);
    }

    #[test]
    fn refused_connections_do_not_teach_a_base_rtt() {
        // Regression: connections refused in a millisecond at the start of an outage became
        // the base RTT, and after the outage every 50 ms window looked like queueing.
        let mut l = Limiter::new(16);
        run(&mut l, 100, |_| ms(50));
        for _ in 0..20 {
            l.on_other(l.limit());
        }
        l.after_outage();
        let before = l.limit();
        let n = l.limit();
        run(&mut l, n, |_| ms(50));
        assert!(
            l.limit() > before || l.limit() == 16,
            "{before} → {}",
            l.limit()
        );
    }

    #[test]
    fn does_not_grow_when_the_limit_is_not_used() {
        let mut l = Limiter::new(16);
        for _ in 0..1000 {
            // One request at a time although 1 more would be allowed after the first window.
            l.on_answer(ms(50), 0, false);
        }
        assert_eq!(l.limit(), 1);
    }

    #[test]
    fn halves_on_back_pressure_and_never_goes_below_one() {
        let mut l = Limiter::new(16);
        run(&mut l, 2_000, |_| ms(20));
        assert_eq!(l.limit(), 16);
        assert_eq!(l.on_answer(ms(20), 16, true), Change::Halved);
        assert_eq!(l.limit(), 8);
        for _ in 0..10 {
            l.on_answer(ms(20), 8, true);
        }
        assert_eq!(l.limit(), 1);
    }

    #[test]
    fn settles_below_a_server_that_throttles_above_a_concurrency() {
        // The server answers 429 to more than 4 requests at once: the limit saw-tooths at or
        // below 4 and never runs away.
        let mut l = Limiter::new(32);
        let mut over = 0;
        let mut decreased = false;
        for _ in 0..5_000 {
            let n = l.limit();
            let throttled = n > 4;
            if throttled {
                over += 1;
            }
            decreased |= l.on_answer(ms(50), n, throttled) == Change::Halved;
            // The slow start overshoots once (4 → 8), then it stays at or one above the limit.
            assert!(l.limit() <= if decreased { 5 } else { 8 });
        }
        // A probe above the limit every few round trips (2 → 5 takes three, then the halving),
        // not a storm of 429s: this server refuses every request while more than 4 are open.
        assert!(over <= 5_000 / 8, "{over} answers over the limit");
    }

    #[test]
    fn eases_off_when_latency_grows_with_concurrency() {
        // A server whose RTT grows with the requests it is given past 3 (it queues them):
        // more concurrency only adds latency, so the limit stays near 3.
        let mut l = Limiter::new(64);
        let end = run(&mut l, 20_000, |n| {
            ms(if n <= 3 { 10 } else { 10 * n as u64 / 3 })
        });
        assert!((2..=6).contains(&end), "limit {end}");
    }

    #[test]
    fn a_slower_route_is_learned_and_the_limit_grows_again() {
        let mut l = Limiter::new(16);
        run(&mut l, 2_000, |_| ms(10));
        assert_eq!(l.limit(), 16);
        // The route changes: every answer now takes 40 ms, whatever the concurrency.
        let end = run(&mut l, 5_000, |_| ms(40));
        assert_eq!(end, 16);
    }

    #[test]
    fn jittery_sub_millisecond_rtts_still_grow() {
        let mut l = Limiter::new(8);
        let mut x: u64 = 7;
        let end = run(&mut l, 5_000, |_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            Duration::from_micros(200 + (x >> 33) % 600)
        });
        assert_eq!(end, 8);
    }

    #[test]
    fn a_ceiling_of_zero_is_one() {
        let mut l = Limiter::new(0);
        run(&mut l, 100, |_| ms(1));
        assert_eq!(l.limit(), 1);
    }
}
