//! The Redis Streams sink (`[upstream] kind = "redis-streams"`): each batch is one call of a
//! server-side Lua script that adds to the stream only the events whose idempotency key is
//! not set yet, and sets the key (with a TTL) for each event it adds. A batch sent again
//! (after a timeout, a lost answer, a `kill -9` before the spool recorded the delivery) adds
//! nothing twice while the keys live. The spool acknowledges a batch only after the script
//! returned for it.
//!
//! The stream and entry shape follow contract 000 (`baggage_events`, approximate trimming at
//! 100,000 entries, a dead-letter stream `baggage_events:dlq`); idempotency keys live 24 h by
//! default as contract 002 keeps them.
//!
//! Outcomes follow the HTTP forwarder's rules (the forwarder drives both, see
//! `crate::forward`): a connection that fails or times out, `LOADING`, `BUSY`, `OOM`,
//! `READONLY` (a failover in progress: the connection is dropped and made again, to reach the
//! new primary behind the same address), `MASTERDOWN`, `TRYAGAIN`, `MISCONF` keep everything
//! and retry with backoff; `NOSCRIPT` (a restarted server or `SCRIPT FLUSH`) loads the script
//! again at once; a refused password (`WRONGPASS`, `NOAUTH`) keeps everything, raises the
//! misconfiguration alarm and retries at `auth_retry_ms`, re-reading `password_file`; a Redis
//! Cluster redirection (`MOVED`, `ASK`, `CROSSSLOT`) is a misconfiguration (one server or a
//! proxy in front of a cluster is supported, see README); any other error refuses the batch:
//! it is bisected, an event refused alone while others pass is dead-lettered with the
//! server's reason (and recorded in `dlq_stream`), and everything refused is an alarm, not
//! dead letters.

use super::outcome::Outcome;
use crate::config::{EntryShape, RedisConfig, UpstreamConfig};
use crate::event::SpooledEvent;
use crate::metrics::Metrics;
use redis::aio::MultiplexedConnection;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The script run for every batch.
///
/// `KEYS[1]` is the stream, `KEYS[2..]` one idempotency key per event (declared, so ACLs and
/// cluster slot checks see every key the script touches). `ARGV[1]` is the `MAXLEN ~` bound
/// (0: no trimming), `ARGV[2]` the keys' TTL in seconds, then for each event the number of its
/// field/value pairs followed by the pairs. Returns the number of entries added (the others
/// were already there). For each event, `SET key 1 NX EX ttl` is the check: a key that was
/// not there yet is set, and the entry added; if the entry cannot be added, the key is
/// deleted again, so no event is ever marked seen without its entry. An error stops the script
/// with that error: the entries added before it keep their keys, so the batch sent again
/// skips them. With trimming on, it also returns how far the slowest consumer group is
/// behind (`{added, lag + pending}`): trimming is the stream's retention and does not wait
/// for consumers (Redis cannot tell reliably what a group has not read once entries were
/// trimmed or deleted: its `lag` goes unknown or stale), so scangate warns when a batch is
/// about to push unread entries out (see the README). (Two calls per event: checking with EXISTS and setting the key after the XADD
/// was three, and drained a backlog about a third slower.)
pub const SCRIPT: &str = r#"-- scangate: idempotent XADD of one batch
local maxlen = tonumber(ARGV[1])
local ttl = ARGV[2]
local added = 0
local a = 3
for i = 2, #KEYS do
  local n = tonumber(ARGV[a])
  local new = redis.pcall('SET', KEYS[i], '1', 'NX', 'EX', ttl)
  if type(new) == 'table' and new.err then
    return redis.error_reply(new.err)
  end
  if new then
    local id
    if n == 3 and maxlen > 0 then
      id = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', ARGV[a + 1],
        ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6])
    else
      local args
      if maxlen > 0 then
        args = {KEYS[1], 'MAXLEN', '~', ARGV[1], '*'}
      else
        args = {KEYS[1], '*'}
      end
      for j = a + 1, a + 2 * n do
        args[#args + 1] = ARGV[j]
      end
      id = redis.pcall('XADD', unpack(args))
    end
    if type(id) == 'table' and id.err then
      redis.call('DEL', KEYS[i])
      return redis.error_reply(id.err)
    end
    added = added + 1
  end
  a = a + 1 + 2 * n
end
if maxlen > 0 then
  -- How far the slowest consumer group is behind (lag + pending, as Redis 7 reports them;
  -- 0 where it cannot say): a warning, not a gate (see the docs above).
  local behind = 0
  local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
  if type(groups) == 'table' and not groups.err then
    for _, g in ipairs(groups) do
      local pending, lag = 0, 0
      for k = 1, #g - 1, 2 do
        if g[k] == 'pending' then pending = tonumber(g[k + 1]) or 0
        elseif g[k] == 'lag' then lag = tonumber(g[k + 1]) or 0 end
      end
      if pending + lag > behind then behind = pending + lag end
    end
  end
  return {added, behind}
end
return added
"#;

/// One batch, ready to send: the `EVALSHA` command with every key and argument, and the
/// number of events in it.
pub struct Batch {
    cmd: redis::Cmd,
    events: usize,
    /// Bytes of entry data (what `batch_max_bytes` bounds).
    pub bytes: usize,
}

/// Turns events into [`Batch`]es: entry fields per [`EntryShape`], from the bag-events JSON
/// object of each event (the same object the HTTP sink sends, `[upstream.fields]` applied).
pub struct BatchEncoder {
    cfg: RedisConfig,
    sha: String,
    maxlen: String,
    ttl: String,
    json: Vec<u8>,
}

impl BatchEncoder {
    pub fn new(cfg: &RedisConfig) -> Self {
        BatchEncoder {
            sha: redis::Script::new(SCRIPT).get_hash().to_string(),
            maxlen: cfg.maxlen.to_string(),
            ttl: cfg.idempotency_ttl.as_secs().max(1).to_string(),
            cfg: cfg.clone(),
            json: Vec::with_capacity(512),
        }
    }

    /// The batch for `events`, encoded by `enc` (a bag-events encoder).
    pub fn encode(&mut self, enc: &mut super::profile::Encoder, events: &[SpooledEvent]) -> Batch {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha)
            .arg(events.len() + 1)
            .arg(&self.cfg.stream);
        let mut key = String::with_capacity(self.cfg.idempotency_prefix.len() + 36);
        for e in events {
            key.clear();
            key.push_str(&self.cfg.idempotency_prefix);
            key.push_str(
                e.event_id
                    .as_hyphenated()
                    .encode_lower(&mut uuid::Uuid::encode_buffer()),
            );
            cmd.arg(key.as_str());
        }
        cmd.arg(&self.maxlen).arg(&self.ttl);
        let mut bytes = 0;
        let mut id = uuid::Uuid::encode_buffer();
        for e in events {
            self.json.clear();
            enc.encode_event(e, &mut self.json);
            bytes += self.json.len();
            match self.cfg.entry {
                EntryShape::Json => {
                    let kind = match super::profile::batch_type(e) {
                        super::profile::BatchType::Sensor => "sensor",
                        super::profile::BatchType::Scan => "scan",
                    };
                    cmd.arg(3)
                        .arg("event_id")
                        .arg(&*e.event_id.as_hyphenated().encode_lower(&mut id))
                        .arg("event_type")
                        .arg(kind)
                        .arg("data")
                        .arg(self.json.as_slice());
                }
                EntryShape::Fields => {
                    // The encoder writes a JSON object of scalars: its fields become the
                    // entry's. Parsed back rather than written twice: one source of truth
                    // for the field names, renames and constants.
                    let fields: Vec<(String, String)> = match serde_json::from_slice::<
                        serde_json::Map<String, serde_json::Value>,
                    >(&self.json)
                    {
                        Ok(m) => m
                            .into_iter()
                            .filter_map(|(k, v)| match v {
                                serde_json::Value::Null => None,
                                serde_json::Value::String(s) => Some((k, s)),
                                v => Some((k, v.to_string())),
                            })
                            .collect(),
                        // Never happens (the encoder writes valid JSON); the event still
                        // goes, whole, as `data`.
                        Err(_) => vec![(
                            "data".into(),
                            String::from_utf8_lossy(&self.json).into_owned(),
                        )],
                    };
                    cmd.arg(fields.len());
                    for (k, v) in fields {
                        cmd.arg(k).arg(v);
                    }
                }
            }
        }
        Batch {
            cmd,
            events: events.len(),
            bytes,
        }
    }
}

/// Sends batches to Redis on one multiplexed connection (requests in flight are pipelined on
/// it), made again after a connection error, a timeout or `READONLY`.
pub struct RedisSender {
    client: RwLock<redis::Client>,
    info: redis::ConnectionInfo,
    tls: Option<redis::TlsCertificates>,
    cfg: RedisConfig,
    conn_config: redis::AsyncConnectionConfig,
    /// The current connection and its generation (to drop only the one that failed).
    conn: tokio::sync::Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: AtomicU64,
    metrics: Arc<Metrics>,
    gateway_id: String,
    /// What [`server_risks`] last found (warned when it changes).
    risks: std::sync::Mutex<Vec<String>>,
    /// A consumer group was last seen so far behind that trimming removes unread entries.
    trimming_unread: std::sync::atomic::AtomicBool,
}

/// Settings of a Redis server that put delivered events at risk, from its `INFO` text and its
/// `save` setting (`CONFIG GET save`; None when the server does not say): eviction
/// (`allkeys-*` may evict the stream itself; `volatile-*` the idempotency keys, which lets a
/// resend through twice) and no persistence at all (a restart loses the stream).
pub fn server_risks(info: &str, save: Option<&str>) -> Vec<String> {
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    let mut out = Vec::new();
    match field("maxmemory_policy") {
        Some(p) if p.starts_with("allkeys-") => out.push(format!("maxmemory-policy is {p}: when Redis is full it may evict the stream itself, losing events scangate has delivered; use noeviction (scangate keeps events while Redis answers OOM)")),
        Some(p) if p.starts_with("volatile-") => out.push(format!("maxmemory-policy is {p}: when Redis is full it evicts idempotency keys, and a batch sent again can then add events twice; use noeviction")),
        _ => {}
    }
    let aof = field("aof_enabled") == Some("1");
    if field("aof_enabled").is_some() && !aof && save.is_some_and(|s| s.trim().is_empty()) {
        out.push("Redis persists nothing (no AOF, no snapshot rules): if it restarts, the stream and every event scangate delivered into it are gone; contract 000 asks for appendonly yes".into());
    }
    out
}

/// A failed script call: the call itself, or loading the script for it.
enum Failure {
    Call(redis::RedisError),
    Load(redis::RedisError),
}

/// `text` on one line (a server's error may span several; a log line must not).
fn one_line(text: &str) -> String {
    text.split(['\r', '\n'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why the sink cannot be set up (a file named by the config cannot be read).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read {what} {path}: {source}")]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("upstream.url: {0}")]
    Url(redis::RedisError),
}

/// The Redis password, from `password_file`; an empty file is no password, like a missing
/// one.
fn read_password(path: &std::path::Path) -> Option<String> {
    let pw = super::read_secret(
        path,
        "the Redis password file",
        "connecting without a password",
    )?;
    if pw.is_empty() {
        tracing::error!(path = %path.display(), "The Redis password file is empty; connecting without a password");
        return None;
    }
    Some(pw)
}

impl RedisSender {
    pub fn new(
        up: &UpstreamConfig,
        cfg: &RedisConfig,
        gateway_id: String,
        metrics: Arc<Metrics>,
    ) -> Result<Self, SetupError> {
        use redis::IntoConnectionInfo;
        let info = cfg
            .url
            .as_str()
            .into_connection_info()
            .map_err(SetupError::Url)?;
        let read = |what: &'static str, p: &std::path::Path| {
            crate::config::read_small_file(p, crate::config::NAMED_FILE_MAX_BYTES).map_err(
                |source| SetupError::File {
                    what,
                    path: p.to_path_buf(),
                    source,
                },
            )
        };
        let tls = if cfg.url.starts_with("rediss://") {
            let client_tls = match (&cfg.client_cert_file, &cfg.client_key_file) {
                (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                    client_cert: read("client certificate", c)?,
                    client_key: read("client key", k)?,
                }),
                _ => None,
            };
            let root_cert = match &up.ca_file {
                Some(ca) => Some(read("CA file", ca)?),
                None => None,
            };
            Some(redis::TlsCertificates {
                client_tls,
                root_cert,
            })
        } else {
            None
        };
        let conn_config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(up.timeout.min(Duration::from_secs(5))))
            .set_response_timeout(Some(up.timeout));
        let sender = RedisSender {
            client: RwLock::new(redis::Client::open("redis://127.0.0.1").map_err(SetupError::Url)?),
            info,
            tls,
            cfg: cfg.clone(),
            conn_config,
            conn: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            metrics,
            gateway_id,
            risks: std::sync::Mutex::new(Vec::new()),
            trimming_unread: std::sync::atomic::AtomicBool::new(false),
        };
        sender.reload_credentials()?;
        Ok(sender)
    }

    /// Build the client again with the password file's current content (after a refused
    /// password, and at start). The next request connects anew.
    pub fn reload_credentials(&self) -> Result<(), SetupError> {
        let mut settings = self.info.redis_settings().clone();
        if let Some(u) = &self.cfg.username {
            settings = settings.set_username(u);
        }
        if let Some(pw) = self.cfg.password_file.as_deref().and_then(read_password) {
            settings = settings.set_password(pw);
        }
        let info = self.info.clone().set_redis_settings(settings);
        let client = match &self.tls {
            Some(t) => redis::Client::build_with_tls(info, t.clone()),
            None => redis::Client::open(info),
        }
        .map_err(SetupError::Url)?;
        if let Ok(mut c) = self.client.write() {
            *c = client;
        }
        if let Ok(mut c) = self.conn.try_lock() {
            *c = None;
        }
        Ok(())
    }

    /// The connection (its generation, itself, and whether it was made just now), made if
    /// there is none. Err: the outcome of failing to connect.
    async fn connection(&self) -> Result<(u64, MultiplexedConnection, bool), Outcome> {
        let mut slot = self.conn.lock().await;
        if let Some((g, c)) = slot.as_ref() {
            return Ok((*g, c.clone(), false));
        }
        let client = match self.client.read() {
            Ok(c) => c.clone(),
            Err(_) => {
                return Err(Outcome::Retry {
                    status: None,
                    reason: "internal: the Redis client lock is poisoned".into(),
                })
            }
        };
        match client
            .get_multiplexed_async_connection_with_config(&self.conn_config)
            .await
        {
            Ok(mut c) => {
                let g = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
                self.metrics.redis_connects.inc();
                if let Err(e) = self.check_server(&mut c).await {
                    // A server that wants a password scangate does not have (a password
                    // file missing or empty) answers the first command with NOAUTH.
                    return Err(self.classify(&e).0);
                }
                *slot = Some((g, c.clone()));
                Ok((g, c, true))
            }
            Err(e) => {
                let (o, _) = self.classify(&e);
                let o = match o {
                    Outcome::Retry { status, reason }
                        if reason.starts_with(super::TIMEOUT)
                            && self.cfg.url.starts_with("rediss://") =>
                    {
                        Outcome::Retry {
                            status,
                            reason: format!("{reason} (rediss:// needs the server's TLS port: is this a plain Redis port?)"),
                        }
                    }
                    o => o,
                };
                // Refused while connecting (AUTH, HELLO, SELECT): never about a batch, so not
                // a refusal to bisect; an ERR there means the settings are wrong (a password
                // for a server without one, a database number it does not have).
                let settings =
                    e.code() == Some("ERR") && !e.to_string().contains("max number of clients");
                Err(match o {
                    Outcome::Rejected { reason, .. } | Outcome::Retry { reason, .. }
                        if settings =>
                    {
                        Outcome::Misconfigured {
                            status: 421,
                            reason: format!(
                                "{reason} (while connecting: check url, username and password_file)"
                            ),
                        }
                    }
                    o => o,
                })
            }
        }
    }

    /// Record how far the slowest consumer group is behind, and warn (once per change of
    /// state) when adding batches of `n` pushes entries it has not read out of the stream.
    fn consumers_behind(&self, behind: u64, n: u64) {
        self.metrics.redis_consumers_behind.set(behind);
        let trimming = behind + n > self.cfg.maxlen;
        let was = self.trimming_unread.swap(trimming, Ordering::Relaxed);
        if trimming && !was {
            tracing::warn!(stream = %self.cfg.stream, behind, maxlen = self.cfg.maxlen, "Redis: a consumer group is so far behind that trimming (maxlen) removes entries it has not read; raise maxlen, speed the consumers up, or set maxlen = 0 and trim after XACK");
        } else if !trimming && was {
            tracing::info!(stream = %self.cfg.stream, behind, "Redis: the consumer groups are within maxlen again");
        }
    }

    /// Warn (once per change) about server settings that put delivered events at risk. An
    /// `INFO` the server refuses (an ACL, a managed service) is skipped; Err only when the
    /// server asks for credentials.
    async fn check_server(&self, c: &mut MultiplexedConnection) -> redis::RedisResult<()> {
        let info: redis::RedisResult<String> = redis::cmd("INFO")
            .arg("memory")
            .arg("persistence")
            .query_async(c)
            .await;
        let info = match info {
            Ok(i) => i,
            Err(e) if is_auth(&e) => return Err(e),
            Err(_) => return Ok(()),
        };
        // ["save", "<rules>"]; refused on managed services (then not judged).
        let save: Option<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("save")
            .query_async(c)
            .await
            .ok();
        let save = save.and_then(|v| v.get(1).cloned());
        let risks = server_risks(&info, save.as_deref());
        self.metrics.redis_server_risks.set(risks.len() as u64);
        let Ok(mut last) = self.risks.lock() else {
            return Ok(());
        };
        if *last != risks {
            for r in &risks {
                tracing::warn!(url = %self.cfg.url, "Redis: {r}");
            }
            *last = risks;
        }
        Ok(())
    }

    /// Forget connection `generation` (a newer one is kept).
    async fn drop_connection(&self, generation: u64) {
        let mut slot = self.conn.lock().await;
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
    }

    /// Send one batch; every failure is an [`Outcome`] (see the module's docs). `healthy`:
    /// the upstream is believed up, so a reused connection that turns out closed (an idle
    /// timeout of the server or a NAT) is replaced and the batch sent again at once, quietly.
    pub async fn send(&self, batch: &Batch, healthy: bool) -> Outcome {
        let mut again = healthy;
        loop {
            let (generation, mut conn, fresh) = match self.connection().await {
                Ok(c) => c,
                Err(o) => return o,
            };
            let e = match self.call(batch, &mut conn).await {
                Ok(o) => return o,
                Err(e) => e,
            };
            let (o, drop) = match &e {
                Failure::Call(e) => self.classify(e),
                Failure::Load(e) => match self.classify(e) {
                    // Loading the script is not about the batch: an ACL without SCRIPT LOAD.
                    (Outcome::Rejected { reason, .. }, d) => (
                        Outcome::Misconfigured {
                            status: 421,
                            reason: format!("cannot load the delivery script: {reason} (the user needs EVALSHA and SCRIPT LOAD)"),
                        },
                        d,
                    ),
                    o => o,
                },
            };
            if drop {
                self.drop_connection(generation).await;
            }
            let closed = match &e {
                Failure::Call(e) | Failure::Load(e) => {
                    (e.is_io_error() || e.is_connection_dropped()) && !e.is_timeout()
                }
            };
            if closed && !fresh && std::mem::take(&mut again) {
                tracing::debug!(
                    "Redis connection was closed while idle; sending again on a new one"
                );
                self.metrics.upstream_fresh_retries.inc();
                continue;
            }
            return o;
        }
    }

    /// The script call for `batch` (loading the script once if the server lacks it).
    async fn call(
        &self,
        batch: &Batch,
        conn: &mut MultiplexedConnection,
    ) -> Result<Outcome, Failure> {
        let mut loaded = false;
        loop {
            let r: redis::RedisResult<redis::Value> = batch.cmd.query_async(conn).await;
            match r {
                Ok(v) => {
                    self.metrics.upstream_bytes_sent.add(batch.bytes as u64);
                    let added = match v {
                        redis::Value::Int(n) => n,
                        redis::Value::Array(ref a)
                            if matches!(
                                a.as_slice(),
                                [redis::Value::Int(_), redis::Value::Int(_)]
                            ) =>
                        {
                            let (added, behind) = match a.as_slice() {
                                [redis::Value::Int(x), redis::Value::Int(b)] => (*x, *b),
                                _ => (0, 0),
                            };
                            self.consumers_behind(behind.max(0) as u64, batch.events as u64);
                            added
                        }
                        other => {
                            self.metrics.redis_error("unexpected_reply");
                            return Ok(Outcome::Retry {
                                status: None,
                                reason: one_line(&format!("Redis: the script answered {other:?}, not a count of entries added: is this a Redis 5+ server?")),
                            });
                        }
                    };
                    let dup = (batch.events as i64 - added).max(0) as u64;
                    self.metrics.upstream_duplicates.add(dup);
                    return Ok(Outcome::Delivered);
                }
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                        && !loaded =>
                {
                    // A restarted server, a failover or SCRIPT FLUSH: load it and send again.
                    loaded = true;
                    self.metrics.redis_script_loads.inc();
                    let load: redis::RedisResult<String> = redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(SCRIPT)
                        .query_async(conn)
                        .await;
                    load.map_err(Failure::Load)?;
                }
                Err(e) => return Err(Failure::Call(e)),
            }
        }
    }

    /// The outcome of an error, and whether the connection must be made again.
    fn classify(&self, e: &redis::RedisError) -> (Outcome, bool) {
        classify(e, &self.metrics)
    }

    /// Record dead letters in `dlq_stream` (best effort: they are in the spool's dead-letter
    /// table already). Each entry: `event_id`, `reason`, `gateway_id`, and `data`, the event's
    /// JSON (left out if the server refuses the entry with it).
    pub async fn record_dead_letters(
        &self,
        items: &[(SpooledEvent, String)],
        enc: &mut super::profile::Encoder,
    ) {
        let Some(dlq) = &self.cfg.dlq_stream else {
            return;
        };
        let Ok((generation, mut conn, _)) = self.connection().await else {
            tracing::warn!(stream = %dlq, n = items.len(), "Cannot reach Redis to record dead letters in the dead-letter stream; they are kept in the spool (`scangate spool dead-letters`)");
            self.metrics.redis_dlq_failed.add(items.len() as u64);
            return;
        };
        let mut json = Vec::new();
        for (e, reason) in items {
            json.clear();
            enc.encode_event(e, &mut json);
            let id = e.event_id.to_string();
            let entry = |with_data: bool| {
                let mut c = redis::cmd("XADD");
                c.arg(dlq);
                if self.cfg.maxlen > 0 {
                    c.arg("MAXLEN").arg("~").arg(self.cfg.maxlen);
                }
                c.arg("*")
                    .arg("event_id")
                    .arg(&id)
                    .arg("reason")
                    .arg(reason)
                    .arg("gateway_id")
                    .arg(&self.gateway_id);
                if with_data {
                    c.arg("data").arg(json.as_slice());
                }
                c
            };
            let r: redis::RedisResult<redis::Value> = entry(true).query_async(&mut conn).await;
            let r = match r {
                Err(e) if !e.is_io_error() && !e.is_timeout() => {
                    entry(false).query_async::<redis::Value>(&mut conn).await
                }
                r => r,
            };
            if let Err(err) = r {
                tracing::warn!(stream = %dlq, event_id = %e.event_id, error = %err, "Cannot record a dead letter in the dead-letter stream; it is kept in the spool");
                self.metrics.redis_dlq_failed.inc();
                if err.is_io_error() || err.is_timeout() {
                    self.drop_connection(generation).await;
                    return;
                }
            } else {
                self.metrics.redis_dlq_recorded.inc();
            }
        }
    }
}

/// The server asks for (other) credentials.
fn is_auth(e: &redis::RedisError) -> bool {
    let text = e.to_string();
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
        || text.contains("WRONGPASS")
        || text.contains("NOAUTH")
        // Redis closes a connection that sends a large command before AUTH with this.
        || text.contains("unauthenticated")
}

/// An `ERR` about the size of a command or value (so about the events in it).
fn is_about_size(text: &str) -> bool {
    let t = text.to_ascii_lowercase();
    t.contains("exceeds maximum")
        || t.contains("invalid bulk length")
        || t.contains("too large")
        || t.contains("too big")
}

/// Error codes counted by name in `scangate_redis_errors_total` (others as `other`: a server
/// must not grow the label set without bound).
const CODES: &[&str] = &[
    "ERR",
    "WRONGTYPE",
    "NOPERM",
    "OOM",
    "BUSY",
    "MISCONF",
    "NOREPLICAS",
    "LOADING",
    "READONLY",
    "MASTERDOWN",
    "TRYAGAIN",
    "NOSCRIPT",
    "EXECABORT",
    "DENIED",
];

/// The outcome of a Redis error, and whether the connection must be made again (it failed,
/// timed out, or reached a replica). Counts the error by code in `metrics`.
///
/// Only `ERR`, `WRONGTYPE` and `NOPERM` refuse a batch (it is bisected, see the module's
/// docs); every other error keeps it and retries: hardly any Redis error is about one event.
pub fn classify(e: &redis::RedisError, metrics: &Metrics) -> (Outcome, bool) {
    use redis::{ErrorKind as K, ServerErrorKind as S};
    let code = e.code().unwrap_or("").to_string();
    // The server's own words ("NOPERM this user has no permissions …"), as redis-cli shows
    // them; the client's rendering otherwise; on one line.
    let text = one_line(&match (e.code(), e.detail()) {
        (Some(c), Some(d)) => format!("{c} {d}"),
        _ => e.to_string(),
    });
    let retry = |reason: String, drop: bool| {
        (
            Outcome::Retry {
                status: None,
                reason,
            },
            drop,
        )
    };
    if e.is_timeout() {
        metrics.redis_error("timeout");
        return retry(
            format!("{}: Redis did not answer in time ({text})", super::TIMEOUT),
            true,
        );
    }
    if is_auth(e) {
        metrics.redis_error("auth");
        return (
            Outcome::Unauthorized {
                status: 401,
                reason: format!("Redis refused the credentials ({text})"),
            },
            true,
        );
    }
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        metrics.redis_error("io");
        if let Some(o) = super::clock_suspect(&text) {
            return (o, true);
        }
        return retry(format!("connection failed: Redis: {text}"), true);
    }
    if matches!(e.kind(), K::Parse | K::UnexpectedReturnType) {
        metrics.redis_error("not_redis");
        return (
            Outcome::Misconfigured {
                status: 421,
                reason: format!("the server at url does not answer as Redis does (an HTTP or TLS port? rediss:// for a TLS port): {text}"),
            },
            true,
        );
    }
    metrics.redis_error(
        CODES
            .iter()
            .find(|c| **c == code)
            .copied()
            .unwrap_or(match e.kind() {
                K::Server(S::Moved | S::Ask | S::CrossSlot | S::ClusterDown) => "cluster",
                _ => "other",
            }),
    );
    match e.kind() {
        K::Server(S::BusyLoading) => retry(format!("Redis is loading its dataset (restarted): {text}"), false),
        K::Server(S::TryAgain) => retry(format!("Redis asks to try again: {text}"), false),
        // A failover: reach the new primary on a new connection.
        K::Server(S::ReadOnly | S::MasterDown) => retry(
            format!("Redis is read-only or has no primary (a failover in progress?): {text}"),
            true,
        ),
        K::Server(S::NoScript | S::ExecAbort) | K::Io | K::Client => {
            retry(format!("Redis: {text}"), true)
        }
        K::Server(S::Moved | S::Ask | S::CrossSlot | S::ClusterDown) => (
            Outcome::Misconfigured {
                status: 421,
                reason: format!("Redis answers as a Cluster node ({text}): scangate writes to one Redis server (or a proxy in front of a cluster); point url at the primary or the proxy"),
            },
            false,
        ),
        K::InvalidClientConfig => (
            Outcome::Misconfigured {
                status: 421,
                reason: format!("Redis client configuration: {text}"),
            },
            false,
        ),
        K::Server(S::ResponseError) if text.contains("max number of clients") => retry(
            format!("Redis has no room for another client (maxclients): {text}"),
            true,
        ),
        // An ERR about the size of what was sent (an event larger than the server takes):
        // bisected, and an event refused alone while others pass is a dead letter.
        K::Server(S::ResponseError) if is_about_size(&text) => (
            Outcome::Rejected {
                status: 400,
                reason: format!("Redis refused: {text}"),
            },
            false,
        ),
        // Any other ERR (a proxy's "ERR Connection timed out", a script error of a
        // Redis-compatible server): keep and retry; the reason shows it.
        K::Server(S::ResponseError) => retry(format!("Redis: {text}"), false),
        // A key the ACL does not allow: maybe only some events' keys (bisected).
        K::Server(S::NoPerm) => (
            Outcome::Rejected {
                status: 400,
                reason: format!("Redis refused: {text}"),
            },
            false,
        ),
        K::Extension if code == "WRONGTYPE" => (
            Outcome::Rejected {
                status: 400,
                reason: format!("Redis refused: {text}"),
            },
            false,
        ),
        K::Extension if code == "OOM" => retry(
            format!("Redis is out of memory (maxmemory; consumers behind, maxlen or idempotency_ttl_s too large?): {text}"),
            false,
        ),
        K::Extension if code == "BUSY" => {
            retry(format!("Redis is busy running another script: {text}"), false)
        }
        K::Extension if code == "MISCONF" => retry(
            format!("Redis cannot persist and refuses writes: {text}"),
            false,
        ),
        K::Extension if code == "NOREPLICAS" => retry(
            format!("Redis has too few replicas to accept writes (min-replicas-to-write): {text}"),
            false,
        ),
        // Anything else (a code this build does not know): keep, back off, retry.
        _ => retry(format!("Redis: {text}"), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error a server reply line gives (as the client parses it).
    fn err(reply: &str) -> redis::RedisError {
        redis::parse_redis_value(format!("-{reply}\r\n").as_bytes())
            .and_then(|v| v.extract_error())
            .expect_err("an error reply")
    }

    #[test]
    fn every_server_error_class_has_its_outcome() {
        let m = Metrics::default();
        let retry = |o: &Outcome| matches!(o, Outcome::Retry { .. });
        for (reply, want, reconnect, code) in [
            ("LOADING Redis is loading the dataset in memory", retry as fn(&Outcome) -> bool, false, "LOADING"),
            ("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.", retry, false, "BUSY"),
            ("OOM command not allowed when used memory > 'maxmemory'.", retry, false, "OOM"),
            ("TRYAGAIN Multiple keys request during rehashing of slot", retry, false, "TRYAGAIN"),
            ("READONLY You can't write against a read only replica.", retry, true, "READONLY"),
            ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", retry, true, "MASTERDOWN"),
            ("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.", retry, false, "MISCONF"),
            ("NOSCRIPT No matching script. Please use EVAL.", retry, true, "NOSCRIPT"),
            ("WRONGPASS invalid username-password pair or user is disabled.", |o: &Outcome| matches!(o, Outcome::Unauthorized { .. }), true, "auth"),
            ("NOAUTH Authentication required.", |o: &Outcome| matches!(o, Outcome::Unauthorized { .. }), true, "auth"),
            ("MOVED 3999 127.0.0.1:6381", |o: &Outcome| matches!(o, Outcome::Misconfigured { .. }), false, "cluster"),
            ("CROSSSLOT Keys in request don't hash to the same slot", |o: &Outcome| matches!(o, Outcome::Misconfigured { .. }), false, "cluster"),
            ("WRONGTYPE Operation against a key holding the wrong kind of value", |o: &Outcome| matches!(o, Outcome::Rejected { .. }), false, "WRONGTYPE"),
            ("NOPERM this user has no permissions to access one of the keys used as arguments", |o: &Outcome| matches!(o, Outcome::Rejected { .. }), false, "NOPERM"),
            ("ERR Error running script (call to f_x): @user_script:1: some refusal", retry, false, "ERR"),
            ("ERR Connection timed out", retry, false, "ERR"),
            ("ERR string exceeds maximum allowed size (proto-max-bulk-len)", |o: &Outcome| matches!(o, Outcome::Rejected { .. }), false, "ERR"),
            ("ERR Protocol error: invalid bulk length", |o: &Outcome| matches!(o, Outcome::Rejected { .. }), false, "ERR"),
            ("SOMETHINGNEW a code this client does not know", retry, false, "other"),
            ("NOREPLICAS Not enough good replicas to write.", retry, false, "NOREPLICAS"),
            ("ERR max number of clients reached", retry, true, "ERR"),
            ("ERR Protocol error: unauthenticated multibulk length", |o: &Outcome| matches!(o, Outcome::Unauthorized { .. }), true, "auth"),
        ] {
            let (o, drop) = classify(&err(reply), &m);
            assert!(want(&o), "{reply}: {o:?}");
            assert_eq!(drop, reconnect, "{reply}: reconnect");
            assert!(
                m.render()
                    .contains(&format!("scangate_redis_errors_total{{code=\"{code}\"}}")),
                "{reply}: counted as {code}"
            );
            // The server's own words reach the reason (and so the log and `status`).
            if let Outcome::Retry { reason, .. }
            | Outcome::Rejected { reason, .. }
            | Outcome::Unauthorized { reason, .. }
            | Outcome::Misconfigured { reason, .. } = &o
            {
                let word = reply.split_whitespace().nth(1).unwrap_or_default();
                assert!(reason.contains(word), "{reply}: {reason}");
            }
        }
    }

    #[test]
    fn eviction_and_no_persistence_are_named() {
        let info = "# Memory\r\nused_memory:100\r\nmaxmemory_policy:allkeys-lru\r\n# Persistence\r\nloading:0\r\nrdb_saves:0\r\nrdb_last_save_time:1764567000\r\nrdb_last_bgsave_time_sec:-1\r\naof_enabled:0\r\n";
        let r = server_risks(info, Some(""));
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0].contains("allkeys-lru") && r[0].contains("noeviction"));
        assert!(r[1].contains("appendonly"));
        let r = server_risks(&info.replace("allkeys-lru", "volatile-ttl"), None);
        assert_eq!(r.len(), 1, "no save setting known: persistence not judged");
        assert!(r[0].contains("idempotency keys"));
        let safe = info.replace("allkeys-lru", "noeviction");
        assert!(server_risks(&safe, Some("3600 1 300 100")).is_empty());
        assert!(server_risks(&safe.replace("aof_enabled:0", "aof_enabled:1"), Some("")).is_empty());
        assert!(
            server_risks("", Some("")).is_empty(),
            "an INFO without the fields says nothing"
        );
    }

    #[test]
    fn the_script_is_what_the_batches_call() {
        let cfg = RedisConfig {
            url: "redis://127.0.0.1".into(),
            username: None,
            password_file: None,
            client_cert_file: None,
            client_key_file: None,
            stream: "s".into(),
            maxlen: 7,
            dlq_stream: None,
            entry: EntryShape::Json,
            idempotency_ttl: Duration::from_secs(300),
            idempotency_prefix: "{s}:seen:".into(),
        };
        let enc = BatchEncoder::new(&cfg);
        // EVALSHA names the script by its SHA-1 (lower-case hex), as SCRIPT LOAD returns it.
        assert_eq!(enc.sha.len(), 40);
        assert!(enc
            .sha
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(enc.maxlen, "7");
        assert_eq!(enc.ttl, "300");
    }
}
