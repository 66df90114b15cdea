//! The forwarder: committed events → batches → HTTP POST → outcome → ack / dead letter / retry.
//!
//! Owns: batching (count, bytes, age), the wire profile, compression, headers, the response
//! policy and backoff. Does not own: durability (events stay in the spool until an outcome
//! removes them, so a crash at any point only causes a resend with the same event ids).
//!
//! Several batches in flight: up to the adaptive limit of [`concurrency::Limiter`] (from 1 up
//! to `max_in_flight`), each request on its own task, each batch acknowledged as its answer
//! arrives. Anything but a delivery (or a throttle while others were in flight: the limit
//! halves and that batch goes again after the server's wait) *settles* the flights: every
//! request in flight is waited for, then every batch is settled in dispatch order through the
//! one-at-a-time path ([`Forwarder::deliver`]: bisecting, dead letters, backoff), whose first
//! batch is the probe while the upstream is down. New batches go out one at a time until a
//! delivery succeeds again.
//!
//! Order: batches are sent in commit order. `fifo` acknowledges them in commit order too: a
//! delivered batch waits, unacknowledged, for every earlier one to be settled, and no new
//! batch is sent while `max_in_flight` batches are unsettled. The upstream may therefore
//! receive a batch before the (at most `max_in_flight` − 1) batches sent just before it, never
//! before older ones: an event never arrives before one committed `max_in_flight` ×
//! `batch_max_events` or more events earlier. Events carry `seq` (commit order) and
//! `first_seen` to restore exact order; `max_in_flight = 1` sends one batch at a time in
//! strict order. `live-first` keeps two cursors: events committed after the forwarder
//! (re)gained the upstream are *live* and go first; older ones are *backlog* and go at
//! `backlog_max_eps` at most, each cursor in commit order, acknowledged as answers come.

pub mod concurrency;
pub mod outcome;
pub mod profile;
pub mod redis;

use crate::config::{Compression, Order, UpstreamConfig};
use crate::event::{Loc, SpooledEvent};
use crate::metrics::Metrics;
use crate::spool::actor::SpoolHandle;
use backon::BackoffBuilder;
use outcome::Outcome;
use profile::{batch_key, batch_type, Encoder};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio::task::JoinSet;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// `ca_file` cannot be read or holds no PEM certificate (`config::pem_certificates`), or
    /// one of its certificates is not X.509 DER.
    #[error("upstream: {0}")]
    Ca(String),
    #[error("cannot build the HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("Redis sink: {0}")]
    Redis(#[from] redis::SetupError),
}

/// Compresses request bodies, keeping the compressor's state (deflate window and hash
/// tables, zstd context: a few hundred KiB) from one batch to the next instead of allocating
/// and faulting it in again for every request.
pub struct BodyCompressor {
    kind: Compression,
    deflate: Option<flate2::Compress>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

/// gzip member header (RFC 1952): deflate, no flags, no mtime, OS unknown.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

impl BodyCompressor {
    pub fn new(kind: Compression) -> Self {
        BodyCompressor {
            kind,
            deflate: None,
            zstd: None,
        }
    }

    /// The compressed body (`Content-Encoding` per the kind). An error (none is expected from
    /// in-memory compression) is returned, never an empty or truncated body.
    pub fn compress(&mut self, body: &[u8]) -> std::io::Result<Vec<u8>> {
        match self.kind {
            Compression::None => Ok(body.to_vec()),
            Compression::Gzip(level) => {
                let d = self.deflate.get_or_insert_with(|| {
                    flate2::Compress::new(flate2::Compression::new(level), false)
                });
                d.reset();
                let mut out = Vec::with_capacity(body.len() / 4 + 64);
                out.extend_from_slice(&GZIP_HEADER);
                let start_in = d.total_in();
                loop {
                    let consumed =
                        usize::try_from(d.total_in() - start_in).map_err(std::io::Error::other)?;
                    if out.capacity() - out.len() < 1024 {
                        out.reserve(out.capacity() / 2 + 1024);
                    }
                    let rest = body.get(consumed..).ok_or_else(|| {
                        std::io::Error::other("deflate consumed more than its input")
                    })?;
                    let status = d
                        .compress_vec(rest, &mut out, flate2::FlushCompress::Finish)
                        .map_err(std::io::Error::other)?;
                    if status == flate2::Status::StreamEnd {
                        break;
                    }
                }
                let mut crc = flate2::Crc::new();
                crc.update(body);
                out.extend_from_slice(&crc.sum().to_le_bytes());
                // ISIZE: the input length modulo 2^32 (RFC 1952).
                out.extend_from_slice(&(body.len() as u32).to_le_bytes());
                Ok(out)
            }
            Compression::Zstd(level) => {
                let z = match &mut self.zstd {
                    Some(z) => z,
                    None => match zstd::bulk::Compressor::new(level) {
                        Ok(z) => self.zstd.insert(z),
                        Err(_) => return zstd::bulk::compress(body, level),
                    },
                };
                z.compress(body)
            }
        }
    }
}

/// Compress one body with a fresh compressor (tools and tests; the forwarder keeps one).
pub fn compress(body: &[u8], c: Compression) -> std::io::Result<Vec<u8>> {
    BodyCompressor::new(c).compress(body)
}

/// Events refused alone (400/422) with the same answer, and nothing delivered in between,
/// after which the upstream is taken to refuse everything (a schema change, plain HTTP to an
/// HTTPS port): a misconfiguration, kept and alarmed, not dead letters. A batch with one bad
/// event refuses it alone once and then delivers its neighbours; a few bad events in a row
/// stay below this.
pub const REFUSE_ALL_AFTER: usize = 5;

/// What a batch is sent as: a compressed request body, or a Redis script call.
#[derive(Clone)]
enum Payload {
    Http(bytes::Bytes),
    Redis(Arc<redis::Batch>),
}

/// Sends one batch and classifies the answer; shared by the requests in flight.
enum Sender {
    Http(HttpSender),
    Redis(Box<redis::RedisSender>),
}

impl Sender {
    async fn send(&self, body: Payload, key: uuid::Uuid, healthy: bool) -> Outcome {
        match (self, body) {
            (Sender::Http(h), Payload::Http(b)) => h.send(b, key, healthy).await,
            (Sender::Redis(r), Payload::Redis(b)) => r.send(&b, healthy).await,
            // Never: a forwarder makes payloads for its own sink only.
            _ => Outcome::Retry {
                status: None,
                reason: "internal: a payload for the other sink".into(),
            },
        }
    }
}

/// Sends one HTTP request and classifies its answer.
struct HttpSender {
    client: reqwest::Client,
    /// The same client without a connection pool: a request that failed on a reused
    /// keep-alive connection is sent again at once on a new one.
    fresh: reqwest::Client,
    endpoint: String,
    content_encoding: Option<&'static str>,
    gateway_id: String,
    /// Re-read from `token_file` after a 401/403.
    token: RwLock<Option<String>>,
    metrics: Arc<Metrics>,
}

impl HttpSender {
    /// Send one batch body; `healthy`: the upstream is believed up (a request that fails on a
    /// reused connection is then sent again at once on a new one).
    async fn send(&self, body: bytes::Bytes, key: uuid::Uuid, healthy: bool) -> Outcome {
        match self.send_with(&self.client, body.clone(), key).await {
            // Failed after connecting, before any answer (not a timeout): most likely a reused
            // keep-alive connection the server had closed. Once more, at once, on a new
            // connection, with the same Idempotency-Key: no outage, no warning.
            // Only while the upstream is believed healthy: against a failing server every
            // attempt would be doubled.
            Err(e) if !e.is_timeout() && !e.is_connect() && healthy => {
                tracing::debug!(error = %error_chain(&e), "Request failed on a reused connection; sending again on a new one");
                self.metrics.upstream_fresh_retries.inc();
                match self.send_with(&self.fresh, body, key).await {
                    Ok(o) => o,
                    Err(e) => request_error(&e),
                }
            }
            Err(e) => request_error(&e),
            Ok(o) => o,
        }
    }

    /// One request; `Err` when no answer came (the connection failed or timed out).
    async fn send_with(
        &self,
        client: &reqwest::Client,
        body: bytes::Bytes,
        key: uuid::Uuid,
    ) -> Result<Outcome, reqwest::Error> {
        let mut req = client
            .post(&self.endpoint)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", key.to_string())
            .header("X-Gateway-Id", &self.gateway_id);
        if let Some(enc) = self.content_encoding {
            req = req.header(reqwest::header::CONTENT_ENCODING, enc);
        }
        let token = self.token.read().ok().and_then(|t| t.clone());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let len = body.len() as u64;
        match req.body(body).send().await {
            Err(e) => Err(e),
            Ok(resp) => {
                self.metrics.upstream_bytes_sent.add(len);
                let status = resp.status().as_u16();
                let header = |name: reqwest::header::HeaderName| {
                    resp.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                };
                let retry_after = header(reqwest::header::RETRY_AFTER);
                let location = header(reqwest::header::LOCATION);
                let content_type = header(reqwest::header::CONTENT_TYPE);
                let date = header(reqwest::header::DATE);
                let mut body = Vec::new();
                let mut resp = resp;
                // Read at most 1 MiB of the answer: enough for any per-event report.
                loop {
                    match resp.chunk().await {
                        Ok(Some(c)) if body.len() < (1 << 20) => body.extend_from_slice(&c),
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) if (200..300).contains(&status) && status != 207 => {
                            tracing::debug!(error = %e, "Upstream answer body cut short after a 2xx status");
                            break;
                        }
                        Err(e) => {
                            return Ok(Outcome::Retry {
                                status: Some(status),
                                reason: format!("answer cut short: {}", error_chain(&e)),
                            })
                        }
                    }
                }
                body.truncate(1 << 20);
                Ok(outcome::classify(
                    &outcome::Answer {
                        status,
                        retry_after: retry_after.as_deref(),
                        location: location.as_deref(),
                        content_type: content_type.as_deref(),
                        date: date.as_deref(),
                        body: &body,
                    },
                    SystemTime::now(),
                ))
            }
        }
    }
}

/// Where a batch sent beside others stands.
enum FlightState {
    /// Its request is in flight (or waits on its task for a throttle's time to pass).
    InFlight,
    /// Delivered, success recorded; acknowledged in the spool when its turn comes (`fifo`:
    /// after every earlier batch is settled).
    Done,
    /// Answered with something other than a delivery: settled by [`Forwarder::deliver`].
    Failed(Outcome),
    /// Sent again when a slot is free (its failure went stale: the upstream answers again).
    Queued,
    /// Sent again through [`Forwarder::deliver`] in its turn: its request task ended without
    /// an answer, or it is larger than a size learned from a 413 since its body was made
    /// (`deliver` cuts it).
    Resend,
}

/// A batch ready to send: its events, encoded and compressed once.
struct Flight {
    events: Vec<SpooledEvent>,
    key: uuid::Uuid,
    body: Payload,
    state: FlightState,
    /// Times it was throttled beside other requests and sent again (see
    /// [`Forwarder::record_answer`]).
    throttled: u32,
}

/// An answer to a request in flight: the flight's id, the outcome, the round-trip time, and
/// how many requests were in flight when it was sent (itself included).
type Answered = (u64, Outcome, Duration, usize);

/// The batches sent and not yet settled, by dispatch order (ids increase).
#[derive(Default)]
struct Flights {
    next_id: u64,
    map: BTreeMap<u64, Flight>,
    set: JoinSet<Answered>,
    /// The rest of batches cut to the size learned from a 413, not yet sent: they go before
    /// any new batch, cut to the size known when their turn comes (a probe may raise it).
    held: std::collections::VecDeque<Vec<SpooledEvent>>,
}

pub struct Forwarder {
    cfg: UpstreamConfig,
    sender: Arc<Sender>,
    limiter: concurrency::Limiter,
    encoder: Encoder,
    /// Redis sink: turns events into script calls.
    redis_enc: Option<redis::BatchEncoder>,
    compressor: BodyCompressor,
    /// The JSON body, reused across batches (its capacity is kept).
    json: Vec<u8>,
    spool: SpoolHandle,
    metrics: Arc<Metrics>,
    /// The forwarder's progress, for the watchdog (`crate::service::progress`).
    beat: Arc<crate::service::progress::Beat>,
    /// Largest batch size known to pass after a 413 (None until a 413 is seen). A hint, not a
    /// verdict: after [`PROBE_AFTER`] deliveries at it, the next batches may be twice as
    /// large, until `batch_max_events` (then the hint is dropped) or another 413.
    max_ok: Option<usize>,
    /// Deliveries at the current `max_ok` since it was set or raised.
    ok_at_max: u32,
    /// Deliveries at `max_ok` before the next probe.
    probe_wait: u32,
    /// `max_ok` was raised by a probe that has not been answered yet.
    probing: bool,
    /// The event whose lone 413 is being confirmed (a single event is dead-lettered only when
    /// its 413 repeats).
    lone_413: Option<uuid::Uuid>,
    down_since: Option<Instant>,
    last_error: Option<String>,
    /// live-first: chunks with id ≥ this are live.
    live_floor: i64,
    /// `live_floor` moved (the upstream came back) from this floor.
    floor_moved: Option<i64>,
    /// Shutting down: a throttled batch is not sent again.
    stopping: bool,
    /// The last failure was a throttle (429/503): no slow start when it ends.
    throttle_outage: bool,
    /// Wall and boot time, to place events stamped on boot time ([`Forwarder::with_clock`]).
    clock: Arc<dyn crate::clock::Clock>,
    boot_offsets: std::collections::HashMap<[u8; 16], i64>,
    /// This boot's kernel id.
    boot: uuid::Uuid,
    clock_hold_logged: bool,
    /// Events the upstream refused alone (400/422), with status and reason, not yet settled
    /// (see [`REFUSE_ALL_AFTER`]).
    /// The last field: refused while the upstream was seen to accept other events in the same
    /// delivery (`delivered_in_call`), so refused for what it is; otherwise it is sent once more
    /// after the next success before it can be dead-lettered (a passing limit or outage).
    refused: Vec<(SpooledEvent, u16, String, bool)>,
    /// A delivery succeeded during the current [`Forwarder::deliver`] call.
    delivered_in_call: bool,
    /// The last answer that was not a refusal of single events was a success: the upstream
    /// accepts events (across calls; a failure clears it).
    accepted_recently: bool,
    /// Events refused alone in a row, nothing delivered in between (across calls).
    refused_streak: usize,
    /// The upstream refuses every event (see [`REFUSE_ALL_AFTER`]): alarmed, nothing
    /// dead-lettered, events tried one by one at `auth_retry`.
    rejecting_all: bool,
    /// The upstream accepted again after `rejecting_all`: `refused` goes out once more.
    retry_refused: bool,
    /// Events are still in the spool although the cursor passed them (a failed dead-letter or
    /// acknowledgement write): read from the start again.
    rewind: bool,
    backoff: backon::ExponentialBackoff,
}

/// Deliveries at a size learned from a 413 before batches twice as large are tried (doubled
/// after each 413, so a hard server limit costs a probe ever more rarely).
pub const PROBE_AFTER: u32 = 2;

/// How a failure that points at this gateway's clock begins.
const CLOCK_SUSPECT: &str = "TLS: the server's certificate is not valid yet";

/// How the reason of a request that timed out begins (a back-pressure signal).
const TIMEOUT: &str = "timeout";

/// A TLS failure because the server's certificate starts in the future (by this gateway's
/// clock): an outcome that says the clock is the likely culprit. None for other errors.
fn clock_suspect(error_text: &str) -> Option<Outcome> {
    if !(error_text.contains("NotValidYet") || error_text.contains("not valid yet")) {
        return None;
    }
    // A box without an RTC boots in 1970 until NTP syncs: every certificate looks like it
    // starts in the future. Said once (the reason stays the same until the date changes).
    let now = crate::event::rfc3339_ms(crate::event::wall_now_ms());
    let day = now.get(..10).unwrap_or(&now);
    Some(Outcome::Retry {
        status: None,
        // Without the error's own text: it names the current second, and a reason that
        // changes on every attempt would be logged on every attempt.
        reason: format!("{CLOCK_SUSPECT} by this gateway's clock (today is {day} here): the gateway's clock is probably wrong (no NTP sync yet, no RTC?); events are kept and sent once the clock is right"),
    })
}

/// The outcome of a request that got no answer.
fn request_error(e: &reqwest::Error) -> Outcome {
    let chain = error_chain(e);
    if let Some(o) = clock_suspect(&chain) {
        return o;
    }
    let what = if e.is_timeout() {
        TIMEOUT
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    Outcome::Retry {
        status: None,
        reason: format!("{what}: {}", error_chain(e)),
    }
}

fn read_token(path: &std::path::Path) -> Option<String> {
    match crate::config::bearer_token(path) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "Cannot use the upstream token file; sending without a token");
            None
        }
    }
}

/// The content of a secret file (a token, a password), trimmed like every secret file
/// scangate reads (an editor's newline, a stray space). None when it cannot be read: logged
/// as an error naming `what` and what happens `instead`.
fn read_secret(path: &std::path::Path, what: &str, instead: &str) -> Option<String> {
    match crate::config::read_named_text(path) {
        Ok(t) => Some(t.trim().to_string()),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "Cannot read {what}; {instead}");
            None
        }
    }
}

enum Wait {
    Shutdown,
    Done,
}

impl Forwarder {
    pub fn new(
        cfg: UpstreamConfig,
        gateway_id: String,
        site: String,
        spool: SpoolHandle,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ForwardError> {
        let builder = |pooled: bool| -> Result<reqwest::Client, ForwardError> {
            let mut b = reqwest::Client::builder()
                .timeout(cfg.timeout)
                .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
                .user_agent(concat!("scangate/", env!("CARGO_PKG_VERSION")))
                // A batch is only ever sent where the operator configured it: a 3xx is
                // classified (a misconfiguration), never followed.
                .redirect(reqwest::redirect::Policy::none())
                .pool_idle_timeout(cfg.pool_idle);
            if !pooled {
                b = b.pool_max_idle_per_host(0);
            }
            if let Some(ca) = &cfg.ca_file {
                for der in
                    crate::config::pem_certificates("ca_file", ca).map_err(ForwardError::Ca)?
                {
                    let cert = reqwest::Certificate::from_der(&der).map_err(|e| {
                        ForwardError::Ca(format!(
                            "ca_file {}: a certificate is not X.509: {e}",
                            ca.display()
                        ))
                    })?;
                    b = b.add_root_certificate(cert);
                }
            }
            b.build().map_err(ForwardError::Client)
        };
        let client = builder(true)?;
        let fresh = builder(false)?;
        let (sender, redis_enc) = match &cfg.sink {
            crate::config::Sink::Http => {
                let token = cfg.token_file.as_deref().and_then(read_token);
                let s = Sender::Http(HttpSender {
                    client,
                    fresh,
                    endpoint: cfg.endpoint.clone(),
                    content_encoding: cfg.compression.content_encoding(),
                    gateway_id: gateway_id.clone(),
                    token: RwLock::new(token),
                    metrics: metrics.clone(),
                });
                (s, None)
            }
            crate::config::Sink::RedisStreams(r) => (
                Sender::Redis(Box::new(redis::RedisSender::new(
                    &cfg,
                    r,
                    gateway_id.clone(),
                    metrics.clone(),
                )?)),
                Some(redis::BatchEncoder::new(r)),
            ),
        };
        let sender = Arc::new(sender);
        let limiter = concurrency::Limiter::new(cfg.max_in_flight);
        metrics.upstream_concurrency_limit.set(1);
        let encoder = Encoder::new(
            cfg.profile,
            gateway_id,
            site,
            cfg.event_type.clone(),
            cfg.fields.clone(),
        );
        let backoff = Self::new_backoff(&cfg);
        let compressor = BodyCompressor::new(cfg.compression);
        // Everything committed before the forwarder exists is backlog (live-first).
        let live_floor = *spool.committed().borrow() + 1;
        let beat = metrics.progress.beat("forwarder");
        Ok(Forwarder {
            beat,
            cfg,
            sender,
            limiter,
            encoder,
            redis_enc,
            compressor,
            json: Vec::new(),
            spool,
            metrics,
            max_ok: None,
            ok_at_max: 0,
            probe_wait: PROBE_AFTER,
            probing: false,
            lone_413: None,
            down_since: None,
            last_error: None,
            live_floor,
            floor_moved: None,
            stopping: false,
            throttle_outage: false,
            backoff,
            refused: Vec::new(),
            delivered_in_call: false,
            rejecting_all: false,
            retry_refused: false,
            accepted_recently: false,
            refused_streak: 0,
            rewind: false,
            clock: Arc::new(crate::clock::SystemClock),
            boot_offsets: Default::default(),
            boot: crate::event::boot_id(),
            clock_hold_logged: false,
        })
    }

    /// Use `clock` to place events stamped on boot time (see `crate::clock`), with the clock
    /// offsets the spool recorded for past boots.
    pub fn with_clock(
        mut self,
        clock: Arc<dyn crate::clock::Clock>,
        boot_offsets: std::collections::HashMap<[u8; 16], i64>,
    ) -> Self {
        self.clock = clock;
        self.boot_offsets = boot_offsets;
        self
    }

    /// Give every event of `batch` wall times (see `crate::clock`): events stamped on this
    /// boot's boot time are re-based with the clock's offset now, those of a past boot with
    /// the offset recorded for it, or, without one, stamped now and marked `unsynced`.
    /// False (nothing changed) while this boot's clock is unsynced and an event needs it.
    fn place_in_time(&self, batch: &mut [SpooledEvent]) -> bool {
        use crate::clock::ClockMark;
        let now = self.clock.offset();
        let wall = self.clock.wall_ms();
        let needs = |e: &SpooledEvent| match e.body.clock {
            ClockMark::Mono => true,
            ClockMark::Unsynced => !crate::clock::plausible(e.body.first_seen_ms),
            _ => false,
        };
        if !batch.iter().any(needs) {
            return true;
        }
        if now.is_none() {
            return false;
        }
        for e in batch.iter_mut().filter(|e| needs(e)) {
            let b = &mut e.body;
            let off = if b.clock == ClockMark::Mono {
                if e.boot_id == self.boot {
                    now
                } else {
                    self.boot_offsets.get(e.boot_id.as_bytes()).copied()
                }
            } else {
                None
            };
            match off {
                Some(off) => {
                    b.first_seen_ms += off;
                    b.last_seen_ms += off;
                    b.clock = ClockMark::Rebased;
                }
                None => {
                    b.first_seen_ms = wall;
                    b.last_seen_ms = wall;
                    b.clock = ClockMark::Unsynced;
                }
            }
        }
        true
    }

    /// What `events` are sent as. Ok(None): larger than `batch_max_bytes` and more than one
    /// event (to be split). Err: the body could not be compressed.
    fn payload(
        &mut self,
        events: &[SpooledEvent],
        key: uuid::Uuid,
    ) -> std::io::Result<Option<Payload>> {
        if let Some(r) = &mut self.redis_enc {
            let batch = r.encode(&mut self.encoder, events);
            if batch.bytes > self.cfg.batch_max_bytes && events.len() > 1 {
                return Ok(None);
            }
            return Ok(Some(Payload::Redis(Arc::new(batch))));
        }
        self.encoder.encode_into(events, key, &mut self.json);
        if self.json.len() > self.cfg.batch_max_bytes && events.len() > 1 {
            return Ok(None);
        }
        let z = self.compressor.compress(&self.json)?;
        Ok(Some(Payload::Http(bytes::Bytes::from(z))))
    }

    /// Count an HTTP answer by status (the Redis sink counts its own replies by code).
    fn count_response(&self, status: u16) {
        if matches!(*self.sender, Sender::Http(_)) {
            self.metrics.response(status);
        }
    }

    /// How an answer is named in messages: "HTTP 400", or "Redis" for the Redis sink.
    fn answer_name(&self, status: u16) -> String {
        match *self.sender {
            Sender::Http(_) => format!("HTTP {status}"),
            Sender::Redis(_) => "Redis refusing".into(),
        }
    }

    /// The status recorded with a dead letter: the HTTP status, none for the Redis sink.
    fn dead_status(&self, status: u16) -> Option<u16> {
        match *self.sender {
            Sender::Http(_) => Some(status),
            Sender::Redis(_) => None,
        }
    }

    fn new_backoff(cfg: &UpstreamConfig) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::default()
            .with_min_delay(cfg.retry_min)
            .with_max_delay(cfg.retry_max)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// The next retry wait: exponential from `retry_min_ms`, jittered, and never above
    /// `retry_max_ms` jitter included (at the cap, waits spread over the cap's upper half),
    /// so an upstream's return is noticed within `retry_max_ms`.
    fn next_wait(&mut self) -> Duration {
        let d = self.backoff.next().unwrap_or(self.cfg.retry_max);
        cap_jittered(d, self.cfg.retry_min, self.cfg.retry_max)
    }

    async fn pause(&self, d: Duration, shutdown: &CancellationToken) -> Wait {
        // The wait, then a request.
        self.beat.busy_for(d + self.cfg.timeout);
        tokio::select! {
            _ = sleep(d) => Wait::Done,
            _ = shutdown.cancelled() => Wait::Shutdown,
        }
    }

    /// A forwarder started again (reload) for the same upstream: the outage that was going on
    /// continues, with its start (`/health`'s clock) where the old forwarder had it.
    pub fn continuing_outage(mut self) -> Self {
        let since_ms = self.metrics.upstream_down_since_ms.get();
        if self.metrics.upstream_down.get() == 1 && since_ms > 0 {
            let ago = crate::metrics::mono_ms().saturating_sub(since_ms - 1);
            self.down_since = Instant::now().checked_sub(Duration::from_millis(ago));
        }
        self
    }

    /// Run until `shutdown` is cancelled. Requests in flight are allowed to finish (each
    /// bounded by `timeout_ms`) and what they delivered is acknowledged; everything not yet
    /// acknowledged stays in the spool.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut fl = Flights::default();
        if self.run_loop(&mut fl, &shutdown).await.is_err() {
            self.finish(&mut fl).await;
        }
        self.beat.retire();
    }

    /// The loop of [`Forwarder::run`]; Err on shutdown.
    async fn run_loop(&mut self, fl: &mut Flights, shutdown: &CancellationToken) -> Result<(), ()> {
        let mut committed = self.spool.committed();
        let mut cursor: Option<Loc> = None;
        // The exact next event when everything before it has been read (see `Handoff`).
        let mut next_fresh: Option<Loc> = None;
        let mut backlog_cursor: Option<Loc> = None;
        let mut tokens: f64 = 0.0;
        let mut last_refill = Instant::now();
        let mut partial_since: Option<Instant> = None;
        // live-first: the backlog's turn after a fresh batch.
        let mut backlog_turn = false;
        // Events read but not yet sent: a batch fills up across several commits without
        // reading (and decompressing) the same chunks again.
        let mut pending: Vec<SpooledEvent> = Vec::new();
        // live-first: ranges below `live_floor` that the live cursor took (see `floor_moved`).
        let mut live_taken: Vec<(Loc, Loc)> = Vec::new();
        loop {
            if shutdown.is_cancelled() {
                return Err(());
            }
            // At most a request (spool reads and writes are the spool's to answer).
            self.beat.busy_for(self.cfg.timeout);
            self.beat.fault_point().await;
            if self.spool.take_rewind() || std::mem::take(&mut self.rewind) {
                // Everything in flight is settled first: the cursors restart behind it.
                self.settle(fl, shutdown).await?;
                tracing::warn!("Reading the spool from its start again: some events could not be recorded as delivered or dead-lettered and are sent again (same event ids)");
                cursor = None;
                next_fresh = None;
                backlog_cursor = None;
                pending.clear();
                live_taken.clear();
                self.refused.clear();
                self.spool.want_fresh(None);
            }
            if let Some(old) = self.floor_moved.take() {
                // live-first: what piled up during the outage is backlog now, except what the
                // live cursor had already taken (sent, in flight, or pending): the backlog
                // cursor skips that range, so nothing goes twice.
                if let Some(c) = cursor.filter(|c| c.chunk >= old) {
                    live_taken.push((Loc { chunk: old, idx: 0 }, c));
                }
            }
            if fl.map.len() < self.limiter.limit() {
                if let Some(b) = fl.held.pop_front() {
                    self.dispatch(b, fl, shutdown).await?;
                    continue;
                }
            }
            let max = self.cfg.batch_max_events;
            let floor = if self.cfg.order == Order::LiveFirst {
                self.live_floor
            } else {
                0
            };
            let room = max - pending.len().min(max);
            // Nothing committed since everything was read: no need to ask the spool.
            let head = *committed.borrow_and_update();
            let nothing_new = next_fresh.is_some_and(|n| n.idx == 0 && head < n.chunk);
            let fresh = next_fresh
                .filter(|_| !nothing_new)
                .and_then(|n| self.spool.take_fresh(n, room));
            if let Some((mut more, after)) = fresh {
                // Handed over by the spool thread: exactly the events that follow the cursor.
                if let Some(last) = more.last().map(|e| e.loc) {
                    cursor = Some(last);
                }
                // live-first: below the floor is the backlog cursor's (as a read would skip).
                more.retain(|e| e.loc.chunk >= floor);
                next_fresh = Some(after);
                self.metrics.forward_handoff.add(more.len() as u64);
                if pending.is_empty() {
                    pending = more;
                } else {
                    pending.extend(more);
                }
            } else if room > 0 && !nothing_new {
                match self.spool.read_after_head(cursor, floor, room).await {
                    Ok((more, head)) => {
                        // Fewer than asked: everything committed up to `head` has been read.
                        next_fresh = (more.len() < room).then_some(Loc {
                            chunk: head + 1,
                            idx: 0,
                        });
                        self.spool.want_fresh(next_fresh);
                        if let Some(last) = more.last() {
                            cursor = Some(last.loc);
                        }
                        pending.extend(more);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "Cannot read from the spool");
                        if let Wait::Shutdown = self.pause(Duration::from_secs(1), shutdown).await {
                            return Err(());
                        }
                        continue;
                    }
                }
            }
            // A partial batch's age counts from when its first event was read, whatever the
            // loop did meanwhile (delivering backlog batches): fresh events go out within
            // `batch_max_delay_ms`.
            if pending.is_empty() {
                partial_since = None;
            } else if partial_since.is_none() {
                partial_since = Some(Instant::now());
            }
            let aged = partial_since.is_some_and(|t| t.elapsed() >= self.cfg.batch_max_delay);
            let live_first = self.cfg.order == Order::LiveFirst;
            if live_first {
                let now = Instant::now();
                let rate = self.cfg.backlog_max_eps as f64;
                tokens = (tokens + now.duration_since(last_refill).as_secs_f64() * rate)
                    .min(rate.max(max as f64));
                last_refill = now;
            }
            // Another batch may go out while fewer than the concurrency limit are unresolved
            // and no cut batch waits. live-first keeps one of them for fresh events.
            let limit = self.limiter.limit();
            let slot = fl.map.len() < limit && fl.held.is_empty();
            let backlog_slot = slot && (fl.map.len() + 1 < limit || fl.map.is_empty());
            let live_ready = !pending.is_empty()
                && (pending.len() >= max || aged || self.cfg.batch_max_delay.is_zero());
            // live-first: after a fresh batch the backlog gets its turn (within its budget), so
            // a steady live flow never starves it.
            if slot && live_ready && !(live_first && backlog_turn && tokens >= 1.0) {
                partial_since = None;
                let batch = std::mem::take(&mut pending);
                self.dispatch(batch, fl, shutdown).await?;
                backlog_turn = live_first;
                continue;
            }
            // live-first: spend the backlog budget while live traffic is not ready to go.
            if backlog_slot && live_first && tokens >= 1.0 {
                backlog_turn = false;
                let want = (tokens as usize).min(max);
                match self.spool.read_after(backlog_cursor, 0, want).await {
                    Ok(b) => {
                        // The last backlog event read, sent or skipped: the cursor moves past
                        // skipped ranges too.
                        let floor = self.live_floor;
                        let last_below =
                            b.iter().rev().find(|e| e.loc.chunk < floor).map(|e| e.loc);
                        let b: Vec<SpooledEvent> = b
                            .into_iter()
                            .filter(|e| {
                                e.loc.chunk < floor
                                    && !live_taken.iter().any(|(a, z)| *a <= e.loc && e.loc <= *z)
                            })
                            .collect();
                        if let Some(r) = last_below {
                            live_taken.retain(|(_, z)| *z > r);
                            backlog_cursor = Some(r);
                        }
                        if !b.is_empty() {
                            tokens -= b.len() as f64;
                            self.dispatch(b, fl, shutdown).await?;
                            continue;
                        }
                        if last_below.is_some() {
                            continue;
                        }
                        if live_ready {
                            continue;
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "Cannot read backlog from the spool"),
                }
            }
            // Wait for an answer, more events, the batch age, a throttled batch's turn, or
            // (live-first) the next backlog tokens.
            let mut wait = Duration::from_secs(3600);
            if let Some(since) = partial_since.filter(|_| slot) {
                wait = self.cfg.batch_max_delay.saturating_sub(since.elapsed());
            }
            if live_first && slot {
                wait = wait.min(Duration::from_millis(100));
            }
            // Waiting for answers (each request has its own timeout), commits or a timer.
            self.beat.idle();
            tokio::select! {
                _ = shutdown.cancelled() => return Err(()),
                Some(r) = fl.set.join_next(), if !fl.set.is_empty() => {
                    self.on_answer(r, fl, shutdown).await?;
                }
                r = committed.changed() => {
                    if r.is_err() {
                        // The spool is gone (the daemon stops): what is in flight is
                        // settled by `finish`; the rest stays in the spool.
                        return Err(());
                    }
                }
                _ = sleep(wait) => {}
            }
        }
    }

    /// Send `batch` beside the batches in flight, or, while the upstream fails, refusals are
    /// being sorted out or the batch cannot go as it is (too many bytes, the clock not set),
    /// through [`Forwarder::deliver`] once everything in flight is settled. Err on shutdown.
    async fn dispatch(
        &mut self,
        batch: Vec<SpooledEvent>,
        fl: &mut Flights,
        shutdown: &CancellationToken,
    ) -> Result<(), ()> {
        if batch.is_empty() {
            return Ok(());
        }
        // A probe of a larger size after a 413 goes alone: beside others, a limit still in
        // place would refuse a whole wave of them.
        let serial = self.down_since.is_some()
            || self.probing
            || self.rejecting_all
            || self.retry_refused
            || !self.refused.is_empty()
            || self.lone_413.is_some();
        let batch = if serial {
            batch
        } else {
            let room = self.limiter.limit().saturating_sub(fl.map.len()).max(1);
            match self.prepare(batch, room, &mut fl.held) {
                Ok(flights) => {
                    for f in flights {
                        let id = fl.next_id;
                        fl.next_id += 1;
                        fl.map.insert(id, f);
                        self.launch(fl, id, None);
                    }
                    // Encoding and compressing a batch takes a millisecond or more: let the
                    // ingest stage (same runtime worker) take its reads between batches, or
                    // a burst of dispatches would hold it off while the ports fill up.
                    tokio::task::yield_now().await;
                    return Ok(());
                }
                Err(batch) => batch,
            }
        };
        self.settle(fl, shutdown).await?;
        self.deliver(batch, None, shutdown).await
    }

    /// Encode and compress `batch` as the requests it needs (one per run of an event type, at
    /// most the size learned from a 413 each), at most `room` of them: the rest goes to the
    /// front of `held`, in order. Err with the batch when it must go through
    /// [`Forwarder::deliver`] (its clock is not set, a body over `batch_max_bytes`, a
    /// compression error).
    fn prepare(
        &mut self,
        mut batch: Vec<SpooledEvent>,
        room: usize,
        held: &mut std::collections::VecDeque<Vec<SpooledEvent>>,
    ) -> Result<Vec<Flight>, Vec<SpooledEvent>> {
        if !self.place_in_time(&mut batch) {
            return Err(batch);
        }
        let mut pieces = Vec::new();
        let mut rest: Vec<Vec<SpooledEvent>> = Vec::new();
        for mut run in split_runs(batch) {
            if pieces.len() >= room {
                rest.push(run);
                continue;
            }
            if let Some(cap) = self.max_ok {
                while run.len() > cap && pieces.len() + 1 < room {
                    let tail = run.split_off(cap);
                    pieces.push(std::mem::replace(&mut run, tail));
                }
                if run.len() > cap {
                    let tail = run.split_off(cap);
                    rest.push(tail);
                }
            }
            pieces.push(run);
        }

        let mut flights: Vec<Flight> = Vec::with_capacity(pieces.len());
        let mut failed = false;
        for events in pieces {
            let key = batch_key(&events);
            let body = if failed {
                None
            } else {
                self.payload(&events, key).ok().flatten()
            };
            failed |= body.is_none();
            flights.push(Flight {
                events,
                key,
                body: body.unwrap_or(Payload::Http(bytes::Bytes::new())),
                state: FlightState::InFlight,
                throttled: 0,
            });
        }
        if failed {
            let mut all: Vec<SpooledEvent> = flights.into_iter().flat_map(|f| f.events).collect();
            all.extend(rest.into_iter().flatten());
            return Err(all);
        }
        for r in rest.into_iter().rev() {
            held.push_front(r);
        }
        Ok(flights)
    }

    /// Start (or restart) the request of flight `id`, not before `not_before` (a throttle's
    /// wait, spent on the request's task).
    fn launch(&mut self, fl: &mut Flights, id: u64, not_before: Option<Instant>) {
        let Some(f) = fl.map.get_mut(&id) else {
            return;
        };
        f.state = FlightState::InFlight;
        let sender = self.sender.clone();
        let (body, key) = (f.body.clone(), f.key);
        let healthy = self.down_since.is_none();
        let in_flight = fl.set.len() + 1;
        fl.set.spawn(async move {
            if let Some(t) = not_before {
                tokio::time::sleep_until(t).await;
            }
            let t = Instant::now();
            let o = sender.send(body, key, healthy).await;
            (id, o, t.elapsed(), in_flight)
        });
        self.metrics.upstream_in_flight.set(fl.set.len() as u64);
    }

    /// Feed an answer to the concurrency limiter and record it on its flight. True when the
    /// flight needs settling (anything but a delivery, or a first short throttle that more
    /// concurrency may have caused: that batch goes again after the wait, on its own task).
    async fn record_answer(&mut self, a: Answered, fl: &mut Flights) -> bool {
        let (id, outcome, rtt, in_flight) = a;
        self.metrics.upstream_in_flight.set(fl.set.len() as u64);
        let backpressure = match &outcome {
            Outcome::Throttled { .. } => true,
            Outcome::Retry { reason, .. } => reason.starts_with(TIMEOUT),
            _ => false,
        };
        let before = self.limiter.limit();
        // Only a delivery's time is the link's: a refused connection or an error page comes
        // back at once and would teach a base RTT no delivery can meet.
        let change = if backpressure || matches!(outcome, Outcome::Delivered | Outcome::Partial(_))
        {
            self.limiter.on_answer(rtt, in_flight, backpressure)
        } else {
            self.limiter.on_other(in_flight)
        };
        if change != concurrency::Change::Same {
            tracing::debug!(?change, from = before, to = self.limiter.limit(), rtt = ?self.limiter.rtt(), "Request concurrency");
        }
        self.metrics
            .upstream_concurrency_limit
            .set(self.limiter.limit() as u64);
        if let Some(r) = self.limiter.rtt() {
            self.metrics.upstream_rtt_us.set(r.as_micros() as u64);
        }
        let Some((n, throttled)) = fl.map.get(&id).map(|f| (f.events.len(), f.throttled)) else {
            return false;
        };
        let state = match outcome {
            Outcome::Delivered => {
                self.on_success(200, n, false).await;
                FlightState::Done
            }
            // Throttled for the first time and briefly: fewer at once (the limiter halved)
            // and this one again after the server's wait (never sooner than retry_min),
            // without an outage (a sporadic 429 is not one). A batch throttled again, or asked
            // to wait longer than retry_max_ms, is an outage: settled one at a time, with
            // backoff, logged and shown.
            Outcome::Throttled {
                status,
                retry_after,
            } if throttled == 0 && self.down_since.is_none() && !self.stopping => {
                let wait = retry_after
                    .map_or(self.cfg.retry_min, |d| d.min(self.cfg.retry_after_max))
                    .max(self.cfg.retry_min);
                if wait <= self.cfg.retry_max {
                    self.count_response(status);
                    self.metrics.upstream_throttled.inc();
                    if let Some(f) = fl.map.get_mut(&id) {
                        f.throttled += 1;
                    }
                    self.launch(fl, id, Some(Instant::now() + wait));
                    return false;
                }
                FlightState::Failed(Outcome::Throttled {
                    status,
                    retry_after,
                })
            }
            other => FlightState::Failed(other),
        };
        let failed = matches!(state, FlightState::Failed(_));
        if let Some(f) = fl.map.get_mut(&id) {
            f.state = state;
        }
        failed
    }

    /// An answer while the loop runs: a delivery is acknowledged in its turn; a failure
    /// settles everything in flight. Err on shutdown.
    async fn on_answer(
        &mut self,
        r: Result<Answered, tokio::task::JoinError>,
        fl: &mut Flights,
        shutdown: &CancellationToken,
    ) -> Result<(), ()> {
        let failed = match r {
            Ok(a) => self.record_answer(a, fl).await,
            // The request task did not finish (it cannot panic: `send` returns every error
            // as an outcome); its flight is sent again through `deliver`.
            Err(_) => {
                self.mark_lost(fl);
                true
            }
        };
        if failed {
            self.settle(fl, shutdown).await
        } else {
            self.ack_done(fl).await;
            Ok(())
        }
    }

    /// Flights marked in flight whose task is gone.
    fn mark_lost(&self, fl: &mut Flights) {
        if fl.set.is_empty() {
            for f in fl.map.values_mut() {
                if matches!(f.state, FlightState::InFlight) {
                    f.state = FlightState::Resend;
                }
            }
        }
    }

    /// Acknowledge the delivered flights whose turn has come: all of them (live-first), or
    /// those with no unsettled flight before them (fifo).
    async fn ack_done(&mut self, fl: &mut Flights) {
        let fifo = self.cfg.order == Order::Fifo;
        let mut ids = Vec::new();
        for (id, f) in &fl.map {
            match f.state {
                FlightState::Done => ids.push(*id),
                _ if fifo => break,
                _ => {}
            }
        }
        let mut events = Vec::new();
        for id in ids {
            if let Some(f) = fl.map.remove(&id) {
                events.extend(f.events);
            }
        }
        self.ack(&events).await;
    }

    /// Settle every flight: wait for every request in flight, acknowledge the delivered ones
    /// in turn, and send the first unsettled batch through [`Forwarder::deliver`] (while the
    /// upstream is down, it is the probe, retried with backoff). Once it is settled the
    /// upstream answers again, so the other unsettled batches are sent again at once, beside
    /// each other (their old failures are stale), and the round repeats until none is left;
    /// then the cut batches waiting in `held` go through [`Forwarder::deliver`]. Nothing is
    /// acknowledged past an earlier batch that is not settled. Err on shutdown (the rest stays
    /// in the spool).
    async fn settle(&mut self, fl: &mut Flights, shutdown: &CancellationToken) -> Result<(), ()> {
        loop {
            // Queued batches go again as slots free, within the concurrency limit.
            while fl.set.len() < self.limiter.limit() {
                let queued = fl
                    .map
                    .iter()
                    .find(|(_, f)| matches!(f.state, FlightState::Queued))
                    .map(|(id, _)| *id);
                match queued {
                    Some(id) => self.launch(fl, id, None),
                    None => break,
                }
            }
            if !fl.set.is_empty() {
                let r = tokio::select! {
                    _ = shutdown.cancelled() => return Err(()),
                    r = fl.set.join_next() => r,
                };
                match r {
                    Some(Ok(a)) => {
                        self.record_answer(a, fl).await;
                    }
                    Some(Err(_)) | None => self.mark_lost(fl),
                }
                continue;
            }
            self.mark_lost(fl);
            self.metrics.upstream_in_flight.set(0);
            self.ack_done(fl).await;
            let first = fl
                .map
                .iter()
                .find(|(_, f)| !matches!(f.state, FlightState::Done))
                .map(|(id, _)| *id);
            let Some(first) = first else {
                break;
            };
            // A failure of the upstream as a whole (an error, a throttle, an error page) is
            // stale when a later batch of the same round was delivered: that batch is sent
            // again rather than waited out. An answer about the batch itself (207, 400/422,
            // 413) is its own and settles it.
            let delivered_after = fl
                .map
                .range(first + 1..)
                .any(|(_, f)| matches!(f.state, FlightState::Done));
            if let Some(f) = fl.map.remove(&first) {
                let outcome = match f.state {
                    FlightState::Failed(o) if is_about_the_batch(&o) || !delivered_after => {
                        Some((f.key, o))
                    }
                    _ => None,
                };
                self.deliver(f.events, outcome, shutdown).await?;
            }
            // The upstream answers again: the other failures of the upstream as a whole are
            // stale, and those batches go again, beside each other, within the concurrency
            // limit; a batch larger than a size learned from a 413 since is cut first
            // (through `deliver`), and answers about a batch itself settle it in its turn.
            let cap = self.max_ok;
            for f in fl.map.values_mut() {
                let about = matches!(&f.state, FlightState::Failed(o) if is_about_the_batch(o));
                if matches!(f.state, FlightState::Done) || about {
                    continue;
                }
                f.throttled = 0;
                f.state = if cap.is_some_and(|m| f.events.len() > m) {
                    FlightState::Resend
                } else {
                    FlightState::Queued
                };
            }
        }
        while let Some(b) = fl.held.pop_front() {
            self.deliver(b, None, shutdown).await?;
        }
        Ok(())
    }

    /// On shutdown: wait for the requests in flight (each bounded by `timeout_ms`; the daemon's
    /// grace period bounds the whole) and acknowledge what they delivered, in turn.
    async fn finish(&mut self, fl: &mut Flights) {
        self.stopping = true;
        while let Some(r) = fl.set.join_next().await {
            if let Ok(a) = r {
                self.record_answer(a, fl).await;
            }
        }
        self.ack_done(fl).await;
    }

    /// Deliver one batch to an outcome for every event (delivered or dead-lettered). Err only on
    /// shutdown: the remaining events stay in the spool.
    /// `first`: the answer already received for the batch with this key (sent beside others),
    /// taken as the first attempt's outcome.
    async fn deliver(
        &mut self,
        batch: Vec<SpooledEvent>,
        first: Option<(uuid::Uuid, Outcome)>,
        shutdown: &CancellationToken,
    ) -> Result<(), ()> {
        let mut first = first;
        let mut batch = batch;
        // Timestamps sent upstream are never 1970: wait for the clock.
        while !self.place_in_time(&mut batch) {
            self.metrics.delivery_held_for_clock.set(1);
            if !self.clock_hold_logged {
                self.clock_hold_logged = true;
                tracing::warn!(wall_ms = self.clock.wall_ms(), "Holding delivery: the wall clock is not set (before this build's date; no RTC and no NTP yet?). Reads are kept, stamped on boot time, and sent with true times once the clock syncs");
            }
            if let Wait::Shutdown = self.pause(Duration::from_secs(1), shutdown).await {
                return Err(());
            }
        }
        self.metrics.delivery_held_for_clock.set(0);
        if std::mem::take(&mut self.clock_hold_logged) {
            tracing::info!("The wall clock is set: delivery resumes");
        }
        let mut stack: Vec<(Vec<SpooledEvent>, bool)> = split_runs(batch)
            .into_iter()
            .rev()
            .map(|g| (g, false))
            .collect();
        self.delivered_in_call = false;
        while let Some((b, from_413)) = stack.pop() {
            if let Some(cap) = self.max_ok {
                if b.len() > cap {
                    // One piece of the learned size; the rest waits as one batch, so a size
                    // raised meanwhile (a probe) applies to it.
                    let mut b = b;
                    let rest = b.split_off(cap);
                    stack.push((rest, from_413));
                    stack.push((b, from_413));
                    continue;
                }
            }
            let key = batch_key(&b);
            let body = match self.payload(&b, key) {
                Ok(Some(p)) => p,
                Ok(None) => {
                    push_halves(&mut stack, b, from_413);
                    continue;
                }
                Err(e) => {
                    // Never an empty body: keep the batch and try again later.
                    tracing::error!(error = %e, "Cannot compress a batch; keeping it and retrying");
                    self.metrics.batches_failed.inc();
                    stack.push((b, from_413));
                    if let Wait::Shutdown = self.pause(self.cfg.retry_max, shutdown).await {
                        return Err(());
                    }
                    continue;
                }
            };
            loop {
                let outcome = match first.take_if(|(k, _)| *k == key) {
                    Some((_, o)) => o,
                    None => {
                        let healthy = self.down_since.is_none();
                        self.metrics.upstream_in_flight.set(1);
                        self.beat.busy_for(self.cfg.timeout);
                        let o = self.sender.send(body.clone(), key, healthy).await;
                        self.metrics.upstream_in_flight.set(0);
                        o
                    }
                };
                match outcome {
                    Outcome::Delivered => {
                        self.on_success(200, b.len(), from_413).await;
                        self.ack(&b).await;
                        self.requeue_refused(&mut stack);
                        break;
                    }
                    Outcome::Partial(partial) => {
                        let ids: Vec<uuid::Uuid> = b.iter().map(|e| e.event_id).collect();
                        match partial.matches(&ids) {
                            Some(rejected) => {
                                self.on_success(207, b.len(), from_413).await;
                                let mut dead = Vec::with_capacity(rejected.len());
                                let mut ok = Vec::with_capacity(b.len() - rejected.len());
                                for (i, e) in b.into_iter().enumerate() {
                                    match rejected.iter().find(|(j, _)| *j == i) {
                                        Some((_, reason)) => {
                                            dead.push((e, Some(207u16), reason.clone()))
                                        }
                                        None => ok.push(e),
                                    }
                                }
                                self.dead_letter(dead).await;
                                self.ack(&ok).await;
                                self.requeue_refused(&mut stack);
                            }
                            None if b.len() > 1 => {
                                self.count_response(207);
                                // Never acknowledged blindly: the halves are sent again and
                                // the idempotent upstream settles each event.
                                tracing::warn!(size = b.len(), "Upstream answered 207 in a shape that cannot be matched to the batch; sending it again in halves");
                                push_halves(&mut stack, b, from_413);
                            }
                            None => {
                                self.count_response(207);
                                let wait = self.next_wait();
                                self.on_failure("HTTP 207 for a single event that cannot be matched to it; keeping it and retrying", true).await;
                                if let Wait::Shutdown = self.pause(wait, shutdown).await {
                                    return Err(());
                                }
                                continue;
                            }
                        }
                        break;
                    }
                    Outcome::TooLarge => {
                        self.count_response(413);
                        if b.len() == 1 && self.lone_413 != Some(b[0].event_id) {
                            // Confirmed before it is dead-lettered: the 413 may have been a
                            // proxy's passing limit.
                            self.lone_413 = Some(b[0].event_id);
                            tracing::warn!(event_id = %b[0].event_id, "Upstream refuses a single event as too large (413); trying it once more");
                            stack.push((b, true));
                            if let Wait::Shutdown = self.pause(self.cfg.retry_min, shutdown).await {
                                return Err(());
                            }
                        } else if b.len() == 1 {
                            // Refused alone twice: held like any event refused alone (see
                            // `refuse_alone`): dead-lettered once other events are seen to
                            // pass, and never when everything is refused (a body limit set
                            // too low is a misconfiguration, not bad events).
                            self.lone_413 = None;
                            let reason = "HTTP 413: event too large even alone".to_string();
                            if self.refuse_alone(b, 413, reason, shutdown).await.is_err() {
                                return Err(());
                            }
                        } else {
                            let half = b.len().div_ceil(2);
                            let news = self.max_ok.is_none();
                            self.max_ok = Some(self.max_ok.map_or(half, |m| m.min(half)));
                            self.ok_at_max = 0;
                            if std::mem::take(&mut self.probing) {
                                // A probe met the limit again: probe less often.
                                self.probe_wait = self.probe_wait.saturating_mul(2).min(1024);
                            }
                            if news {
                                tracing::warn!(
                                    size = b.len(),
                                    next = half,
                                    "Upstream says the batch is too large (413); splitting"
                                );
                            } else {
                                // A limit known already (further halving, or a probe that
                                // met it again): not news.
                                tracing::debug!(
                                    size = b.len(),
                                    next = half,
                                    "413 again; splitting"
                                );
                            }
                            push_halves(&mut stack, b, true);
                        }
                        break;
                    }
                    Outcome::Rejected { status, reason } => {
                        self.count_response(status);
                        if b.len() == 1 {
                            if self
                                .refuse_alone(b, status, reason, shutdown)
                                .await
                                .is_err()
                            {
                                return Err(());
                            }
                        } else {
                            tracing::warn!(size = b.len(), status, reason = %reason, "Upstream rejects the batch; bisecting to find the refused events");
                            push_halves(&mut stack, b, from_413);
                        }
                        break;
                    }
                    Outcome::Unauthorized { status, reason }
                    | Outcome::Misconfigured { status, reason } => {
                        self.count_response(status);
                        self.metrics.upstream_misconfigured.set(1);
                        if matches!(status, 401 | 403) {
                            self.metrics.upstream_auth_failures.inc();
                        }
                        let redis = matches!(*self.sender, Sender::Redis(_));
                        let msg = match (matches!(status, 401 | 403), redis) {
                            (true, false) => format!("{reason} — check token_file; nothing is deleted, retrying every {:?}", self.cfg.auth_retry),
                            (true, true) => format!("{reason} — check username and password_file; nothing is deleted, retrying every {:?}", self.cfg.auth_retry),
                            (false, false) => format!("{reason} — check upstream url/path/profile; nothing is deleted, retrying every {:?}", self.cfg.auth_retry),
                            (false, true) => format!("{reason}; nothing is deleted, retrying every {:?}", self.cfg.auth_retry),
                        };
                        self.on_failure(&msg, true).await;
                        if let Wait::Shutdown = self.pause(self.cfg.auth_retry, shutdown).await {
                            return Err(());
                        }
                        match &*self.sender {
                            Sender::Http(h) => {
                                if let Some(p) = &self.cfg.token_file {
                                    let t = read_token(p);
                                    if let Ok(mut w) = h.token.write() {
                                        *w = t;
                                    }
                                }
                            }
                            Sender::Redis(r) => {
                                if let Err(e) = r.reload_credentials() {
                                    tracing::error!(error = %e, "Cannot set up the Redis client again");
                                }
                            }
                        }
                    }
                    Outcome::Throttled {
                        status,
                        retry_after,
                    } => {
                        self.count_response(status);
                        // Never below the backoff: `Retry-After: 0` or a date already past
                        // must not turn into a loop at retry_min_ms; a longer Retry-After is
                        // obeyed (up to retry_after_max_ms).
                        let backoff = self.next_wait();
                        let wait = match retry_after {
                            Some(d) => d.min(self.cfg.retry_after_max).max(backoff),
                            None => backoff,
                        }
                        .max(self.cfg.retry_min);
                        tracing::debug!(status, wait = ?wait, "Upstream asks to wait");
                        self.throttle_outage = true;
                        // The reason without the (jittered) wait: logged and recorded once
                        // per change of state, not per retry.
                        let reason = if retry_after.is_some() {
                            format!("HTTP {status} with Retry-After")
                        } else {
                            format!("HTTP {status}")
                        };
                        self.on_failure(&reason, false).await;
                        if let Wait::Shutdown = self.pause(wait, shutdown).await {
                            return Err(());
                        }
                    }
                    Outcome::Retry { status, reason } => {
                        if let Some(s) = status {
                            self.count_response(s);
                        }
                        let wait = self.next_wait();
                        self.throttle_outage = false;
                        // A clock problem is the operator's to fix: an ERROR, once per state.
                        let loud = reason.starts_with(CLOCK_SUSPECT);
                        self.on_failure(&reason, loud).await;
                        if let Wait::Shutdown = self.pause(wait, shutdown).await {
                            return Err(());
                        }
                    }
                }
            }
        }
        // Refused alone while others were delivered: refused for what they are. Otherwise they
        // wait for the next batch to tell a bad event from an upstream that refuses everything
        // (they stay in the spool meanwhile).
        if self.rejecting_all {
            // Kept for the next pass: read from the spool again (they were never acknowledged).
            self.refused.clear();
            self.rewind = true;
        } else if self.delivered_in_call
            || (self.accepted_recently
                && self.refused_streak < REFUSE_ALL_AFTER
                // Redis: hardly any refusal is about one event; an event is a dead letter
                // only once others pass beside it.
                && matches!(*self.sender, Sender::Http(_)))
        {
            // The upstream accepts other events (in this batch, or just before it, with no
            // failure since): these are refused for what they are. Waiting for another
            // success would leave them in the spool until the next scan, which may never come.
            for r in &mut self.refused {
                r.3 = true;
            }
            self.settle_refused().await;
        }
        Ok(())
    }

    /// After the upstream accepted again: the events it refused while it refused everything go
    /// out once more (refused alone now, they are dead-lettered).
    fn requeue_refused(&mut self, stack: &mut Vec<(Vec<SpooledEvent>, bool)>) {
        if std::mem::take(&mut self.retry_refused) && !self.refused.is_empty() {
            let held: Vec<SpooledEvent> = self.refused.drain(..).map(|(e, ..)| e).collect();
            stack.push((held, false));
        }
    }

    /// Dead-letter the events refused alone while other events passed (refused for what they
    /// are); the others stay held, to be sent once more (`retry_refused`).
    async fn settle_refused(&mut self) {
        if self.refused.is_empty() {
            return;
        }
        let (confirmed, held): (Vec<_>, Vec<_>) = self
            .refused
            .drain(..)
            .partition(|(.., confirmed)| *confirmed);
        self.refused = held;
        if !self.refused.is_empty() {
            self.retry_refused = true;
        }
        let items: Vec<(SpooledEvent, Option<u16>, String)> = confirmed
            .into_iter()
            .map(|(e, s, r, _)| {
                let status = self.dead_status(s);
                tracing::warn!(event_id = %e.event_id, status = ?status, reason = %r, "Upstream rejects an event; moved to dead letters");
                (e, status, r)
            })
            .collect();
        if !items.is_empty() {
            self.dead_letter(items).await;
        }
    }

    /// An event refused alone (400/422, or a 413 that repeated): dead-lettered only once it is
    /// refused while other events pass (one refused while nothing had passed is sent once
    /// more after the next success: a passing limit or outage is not a bad event). Enough
    /// events in a row refused alone, nothing accepted in between, whatever the statuses, is a
    /// misconfiguration: nothing is dead-lettered. Err on shutdown.
    async fn refuse_alone(
        &mut self,
        b: Vec<SpooledEvent>,
        status: u16,
        reason: String,
        shutdown: &CancellationToken,
    ) -> Result<(), ()> {
        let confirmed = self.delivered_in_call;
        let b_len = b.len();
        self.refused.extend(
            b.into_iter()
                .map(|e| (e, status, reason.clone(), confirmed)),
        );
        self.refused_streak += b_len;
        if !self.rejecting_all
            && !self.delivered_in_call
            && self.refused_streak.max(self.refused.len()) >= REFUSE_ALL_AFTER
        {
            self.rejecting_all = true;
            self.metrics.upstream_rejecting_all.set(1);
            let msg = format!("{} for every event, each refused alone ({reason}); this is a misconfiguration (upstream url, profile, schema or a body limit; for Redis the stream's type or the user's ACL), not bad events: nothing is dead-lettered, retrying every {:?}", self.answer_name(status), self.cfg.auth_retry);
            self.on_failure(&msg, true).await;
        }
        if self.rejecting_all {
            // Slowly, event by event: the refused ones stay in the spool, and the next events
            // show when the upstream accepts again.
            if let Wait::Shutdown = self.pause(self.cfg.auth_retry, shutdown).await {
                return Err(());
            }
        }
        Ok(())
    }

    async fn on_success(&mut self, status: u16, n: usize, from_413: bool) {
        self.delivered_in_call = true;
        // A single event that met a 413 passed when sent again (or other events passed
        // after it was settled): nothing is being confirmed any more.
        self.lone_413 = None;
        self.accepted_recently = true;
        self.refused_streak = 0;
        self.metrics.upstream_misconfigured.set(0);
        if std::mem::take(&mut self.rejecting_all) {
            // The upstream accepts again: what it refused meanwhile is sent again (see
            // `retry_refused`), not dead-lettered.
            self.metrics.upstream_rejecting_all.set(0);
            self.retry_refused = true;
        } else {
            self.settle_refused().await;
        }
        self.metrics.batches_ok.inc();
        self.count_response(status);
        if let Some(m) = self.max_ok {
            if from_413 && n > m {
                self.max_ok = Some(n);
                self.ok_at_max = 0;
            } else if n >= m {
                if std::mem::take(&mut self.probing) {
                    // A probe went through: the limit is gone or higher; probe on quickly.
                    self.probe_wait = PROBE_AFTER;
                    if m >= self.cfg.batch_max_events {
                        // Full-size batches pass again: the hint has served its purpose.
                        self.max_ok = None;
                    }
                }
                self.ok_at_max += 1;
                if self.max_ok.is_some() && self.ok_at_max >= self.probe_wait {
                    // Probe back up: the 413 may have come from one large event, or the limit
                    // may have been raised. The hint is dropped only once a full-size batch
                    // has passed, so a limit just below full size still slows the probes.
                    let next = m.saturating_mul(2).min(self.cfg.batch_max_events);
                    self.max_ok = Some(next);
                    self.probing = true;
                    self.ok_at_max = 0;
                    tracing::debug!(next, "Probing larger batches after a 413");
                }
            }
        }
        self.backoff = Self::new_backoff(&self.cfg);
        if let Some(since) = self.down_since.take() {
            if !std::mem::take(&mut self.throttle_outage) {
                self.limiter.after_outage();
            }
            self.metrics.upstream_down.set(0);
            self.metrics.upstream_down_since_ms.set(0);
            tracing::info!(down_for = ?since.elapsed(), "Upstream is accepting events again; delivering the backlog");
            self.last_error = None;
            self.spool.set_upstream_error(None).await;
            // What piled up during the outage is backlog now; what comes next is live.
            let old = std::mem::replace(&mut self.live_floor, *self.spool.committed().borrow() + 1);
            self.floor_moved.get_or_insert(old);
        }
    }

    async fn on_failure(&mut self, reason: &str, loud: bool) {
        self.accepted_recently = false;
        self.metrics.batches_failed.inc();
        self.metrics.upstream_down.set(1);
        if self.down_since.is_none() {
            self.down_since = Some(Instant::now());
            self.metrics
                .upstream_down_since_ms
                .set(crate::metrics::mono_ms() + 1);
        }
        if self.last_error.as_deref() != Some(reason) {
            if loud {
                tracing::error!(url = %self.cfg.endpoint, reason = %reason, "Upstream refuses our requests");
            } else {
                tracing::warn!(url = %self.cfg.endpoint, reason = %reason, "Upstream unavailable; events stay in the spool");
            }
            self.last_error = Some(reason.to_string());
            self.spool
                .set_upstream_error(Some(reason.to_string()))
                .await;
        }
    }

    async fn ack(&self, events: &[SpooledEvent]) {
        if events.is_empty() {
            return;
        }
        let locs: Vec<Loc> = events.iter().map(|e| e.loc).collect();
        match self.spool.ack(locs).await {
            Ok(()) => self.metrics.delivered.add(events.len() as u64),
            // The events were delivered but stay in the spool: they will be resent with the
            // same ids (a duplicate the upstream de-duplicates), never lost.
            Err(e) => {
                tracing::error!(error = %e, "Cannot record delivery in the spool; events will be resent")
            }
        }
    }

    async fn dead_letter(&mut self, items: Vec<(SpooledEvent, Option<u16>, String)>) {
        if items.is_empty() {
            return;
        }
        let record: Vec<(SpooledEvent, String)> = match &*self.sender {
            Sender::Redis(_) => items
                .iter()
                .map(|(e, _, r)| (e.clone(), r.clone()))
                .collect(),
            Sender::Http(_) => Vec::new(),
        };
        if let Err(e) = self.spool.dead_letter(items).await {
            // They are still in the spool: read from the start again and send them again.
            tracing::error!(error = %e, "Cannot move events to dead letters; they will be retried");
            self.rewind = true;
            return;
        }
        if let Sender::Redis(r) = &*self.sender {
            r.record_dead_letters(&record, &mut self.encoder).await;
        }
    }
}

/// A jittered wait `d` (backon adds up to 100 % of the delay as jitter) kept within
/// `[min, max]`: above `max` it is folded back into `[max / 2, max]`, keeping its spread.
fn cap_jittered(d: Duration, min: Duration, max: Duration) -> Duration {
    if d <= max {
        return d.max(min);
    }
    max.saturating_sub((d - max) / 2).clamp(min.min(max), max)
}

/// An answer about the batch itself (some of its events refused, or its size), not about the
/// upstream as a whole: it settles that batch whatever other batches were answered.
fn is_about_the_batch(o: &Outcome) -> bool {
    matches!(
        o,
        Outcome::Partial(_) | Outcome::Rejected { .. } | Outcome::TooLarge
    )
}

/// Split a batch into runs of one event type (one type per batch in the bag-events
/// contract), keeping order. Runs are split off in place: a batch of one type (the usual case)
/// is not copied.
fn split_runs(batch: Vec<SpooledEvent>) -> Vec<Vec<SpooledEvent>> {
    let mut groups: Vec<Vec<SpooledEvent>> = Vec::new();
    let mut rest = batch;
    while let Some(first) = rest.first() {
        let t = batch_type(first);
        let end = rest
            .iter()
            .position(|e| batch_type(e) != t)
            .unwrap_or(rest.len());
        let tail = rest.split_off(end);
        groups.push(std::mem::replace(&mut rest, tail));
    }
    groups
}

fn push_halves(
    stack: &mut Vec<(Vec<SpooledEvent>, bool)>,
    mut b: Vec<SpooledEvent>,
    from_413: bool,
) {
    let second = b.split_off(b.len().div_ceil(2));
    stack.push((second, from_413));
    stack.push((b, from_413));
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn bodies() -> Vec<Vec<u8>> {
        let json = |n: usize, salt: &str| {
            let mut v = b"{\"events\":[".to_vec();
            for i in 0..n {
                v.extend_from_slice(format!("{{\"tag\":\"{salt}{i:08}\",\"n\":{i}}},").as_bytes());
            }
            v.extend_from_slice(b"{}]}");
            v
        };
        // Different sizes in turn (the state must be reset between them), one that grows the
        // output buffer many times (incompressible), and an empty body.
        let mut noise = Vec::with_capacity(300_000);
        let mut x: u32 = 12345;
        for _ in 0..300_000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            noise.push((x >> 16) as u8);
        }
        vec![
            json(500, "a"),
            json(3, "b"),
            noise,
            Vec::new(),
            json(20_000, "c"),
        ]
    }

    #[test]
    fn retry_waits_never_exceed_retry_max_jitter_included() {
        let min = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        let cfg_backoff = || {
            backon::ExponentialBuilder::default()
                .with_min_delay(min)
                .with_max_delay(max)
                .with_factor(2.0)
                .with_jitter()
                .without_max_times()
                .build()
        };
        let mut waits = Vec::new();
        for _ in 0..50 {
            let mut b = cfg_backoff();
            for _ in 0..20 {
                let w = cap_jittered(b.next().unwrap(), min, max);
                assert!(w >= min && w <= max, "{w:?}");
                waits.push(w);
            }
        }
        // Still spread at the cap: not every late wait is exactly the cap.
        let late: std::collections::HashSet<_> = waits.iter().filter(|w| **w >= max / 2).collect();
        assert!(late.len() > 10);
        assert_eq!(cap_jittered(Duration::from_secs(9), max, max), max);
        assert_eq!(cap_jittered(Duration::ZERO, min, max), min);
    }

    #[test]
    fn a_reused_gzip_compressor_makes_valid_independent_members() {
        let mut c = BodyCompressor::new(Compression::Gzip(1));
        for body in bodies() {
            let z = c.compress(&body).unwrap();
            let mut d = flate2::read::GzDecoder::new(&z[..]);
            let mut back = Vec::new();
            d.read_to_end(&mut back).expect("a valid gzip member");
            assert_eq!(back, body);
            // Nothing after the member (one member per body, trailer included).
            let mut multi = flate2::read::MultiGzDecoder::new(&z[..]);
            let mut all = Vec::new();
            multi.read_to_end(&mut all).unwrap();
            assert_eq!(all.len(), body.len());
        }
    }

    #[test]
    fn a_reused_zstd_compressor_makes_valid_frames() {
        let mut c = BodyCompressor::new(Compression::Zstd(1));
        for body in bodies() {
            let z = c.compress(&body).unwrap();
            assert_eq!(zstd::stream::decode_all(&z[..]).unwrap(), body);
        }
    }
}
