//! A loopback ingest server implementing both upstream contracts, for tests and benchmarks.
//!
//! - `POST /api/v1/events/batch` (bag-events) and `POST /api/v1/collect` (collect): envelope
//!   validation per contract, `Content-Encoding` gzip / zstd / identity, de-duplication by
//!   `event_id`, and a record of every request and every unique event.
//! - Behaviours a test can script: a queue of one-shot replies (any status, 207 with chosen
//!   rejections, 429/503 with Retry-After, slow answers, dropped connections), and standing
//!   rules (413 above a batch size, 422/400 for poison tags, 401 without the right token,
//!   "down" = 503 to everything). `stop()` / `restart()` make the port refuse connections.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::Value;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinSet;

#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    /// 207 rejecting these event ids (collect shape: `dlq_events` objects with `error`).
    Partial(Vec<String>),
    RetryAfter(u16, u64),
    Slow(Duration, Box<Reply>),
    /// Close the connection without answering.
    Drop,
    /// 207 rejecting the events at these 0-based positions, listed by `index` only
    /// (`{"rejected_count":n,"errors":[{"index":i}]}`); the others are ingested.
    PartialByIndex(Vec<usize>),
    /// Answer with exactly this, ingesting nothing: (status, content type, extra headers, body).
    Raw(u16, &'static str, Vec<(&'static str, String)>, String),
}

#[derive(Debug, Clone)]
pub struct RequestLog {
    pub at: tokio::time::Instant,
    pub path: String,
    pub status: u16,
    pub events: usize,
    pub encoding: Option<String>,
    pub idempotency_key: Option<String>,
    pub gateway: Option<String>,
    pub auth: Option<String>,
}

#[derive(Default)]
pub struct State {
    pub script: VecDeque<Reply>,
    pub max_batch: Option<usize>,
    /// Standing rule: 413 for a request whose decompressed body is larger than this (a server
    /// or proxy body limit).
    pub max_body: Option<usize>,
    pub poison: HashSet<String>,
    /// Tags answered with 413 (an event too large for the server's limit).
    pub poison_413: HashSet<String>,
    pub poison_status: u16,
    /// The poison answer echoes the refused events (a reason that differs per event).
    pub poison_echo: bool,
    /// Benchmark mode: parse only event_id, keep counts and the id set, store no events.
    pub light: bool,
    /// With `light`: the body is a plain JSON array of records (the reference peer's HTTP
    /// output, which has no event ids); count its elements.
    pub light_array: bool,
    pub light_count: u64,
    /// With `light`: (bag_id, event_id, arrival in unix µs) of every new event, when Some.
    pub arrivals: Option<Vec<(String, String, i64)>>,
    pub token: Option<String>,
    pub down: bool,
    /// Standing rule: answer every POST with `302 Location: <this>` (and `GET` of any other
    /// path with a 200 HTML page, as a portal would).
    pub redirect: Option<String>,
    /// Standing rule: answer every POST with a 200 HTML page (a captive portal).
    pub html: bool,
    /// Standing rule: every answer takes this long (a slow or far-away server).
    pub delay: Option<Duration>,
    /// Standing rule: a request that arrives while this many are being answered gets 429
    /// (no Retry-After), as a server with a concurrency limit answers.
    pub max_concurrent: Option<usize>,
    /// Requests being answered now, and the most seen at once.
    pub active: usize,
    pub peak_active: usize,
    /// Standing rule: a batch holding this tag is answered with the status, as many times as
    /// the count says (then it is accepted).
    pub fail_tag: Option<(String, u16, u32)>,
    /// Unique events in arrival order.
    pub events: Vec<Value>,
    pub seen: HashMap<String, u32>,
    /// The tag first seen with each event id.
    pub first_tag: HashMap<String, String>,
    /// Different events that arrived with the same event id (the upstream drops them).
    pub id_collisions: u64,
    pub duplicates: u64,
    pub requests: Vec<RequestLog>,
    pub envelopes: Vec<Value>,
}

impl State {
    pub fn unique(&self) -> usize {
        self.events.len()
    }
}

pub struct Ingest {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<State>>,
    tasks: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug)]
struct DropConnection;
impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scripted connection drop")
    }
}
impl std::error::Error for DropConnection {}

fn json(status: u16, v: Value) -> Result<Response<Full<Bytes>>, DropConnection> {
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())))
        .expect("valid response"))
}

fn decode_body(encoding: Option<&str>, body: &[u8]) -> Result<Vec<u8>, String> {
    match encoding {
        None | Some("identity") => Ok(body.to_vec()),
        Some("gzip") => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .map_err(|e| format!("bad gzip: {e}"))?;
            Ok(out)
        }
        Some("zstd") => zstd::stream::decode_all(body).map_err(|e| format!("bad zstd: {e}")),
        Some(other) => Err(format!("unsupported encoding {other}")),
    }
}

/// Contract validation. Err = (status, detail).
fn validate(path: &str, v: &Value) -> Result<Vec<Value>, (u16, String)> {
    let events = v
        .get("events")
        .and_then(|e| e.as_array())
        .ok_or((422, "events: field required".to_string()))?;
    if path.ends_with("/collect") {
        if v.get("batch_id").and_then(|b| b.as_str()).is_none() {
            return Err((400, "batch_id required".into()));
        }
        if events.is_empty() || events.len() > 1000 {
            return Err((
                413,
                format!("batch must hold 1-1000 events, got {}", events.len()),
            ));
        }
        for e in events {
            for k in ["event_id", "learner_id", "tenant_id", "timestamp"] {
                if e.get(k).and_then(|x| x.as_str()).is_none() {
                    return Err((400, format!("{k} required")));
                }
            }
            let t = e.get("event_type").and_then(|x| x.as_str()).unwrap_or("");
            if !["interaction", "progress", "assessment", "error", "system"].contains(&t) {
                return Err((400, format!("invalid event_type {t}")));
            }
            if !e.get("event_data").is_some_and(|d| d.is_object()) {
                return Err((400, "event_data must be an object".into()));
            }
        }
    } else {
        if v.get("source_system").and_then(|s| s.as_str()).is_none() {
            return Err((422, "source_system: field required".into()));
        }
        let et = v.get("event_type").and_then(|s| s.as_str()).unwrap_or("");
        if et != "scan" && et != "sensor" {
            return Err((422, format!("event_type: invalid {et}")));
        }
        for e in events {
            for k in ["event_id", "timestamp", "location"] {
                if e.get(k).and_then(|x| x.as_str()).is_none() {
                    return Err((422, format!("{k}: field required")));
                }
            }
            if et == "sensor" && !e.get("value").is_some_and(|x| x.is_number()) {
                return Err((422, "value: must be a number".into()));
            }
            if et == "scan" {
                if e.get("bag_id").and_then(|x| x.as_str()).is_none() {
                    return Err((422, "bag_id: field required".into()));
                }
                if !e.get("read_count").is_some_and(|x| x.is_u64()) {
                    return Err((422, "read_count: must be an integer".into()));
                }
                if !e
                    .get("signal_strength")
                    .is_some_and(|x| x.is_null() || x.is_i64())
                {
                    return Err((422, "signal_strength: must be an integer".into()));
                }
            }
        }
    }
    Ok(events.clone())
}

fn tag_of(e: &Value) -> String {
    e.get("bag_id")
        .or_else(|| e.get("learner_id"))
        .and_then(|x| x.as_str())
        .unwrap_or_default()
        .to_string()
}

async fn handle(
    state: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, DropConnection> {
    let path = req.uri().path().to_string();
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let encoding = header("content-encoding");
    let mut log = RequestLog {
        at: tokio::time::Instant::now(),
        path: path.clone(),
        status: 0,
        events: 0,
        encoding: encoding.clone(),
        idempotency_key: header("idempotency-key"),
        gateway: header("x-gateway-id"),
        auth: header("authorization"),
    };
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|_| DropConnection)?
        .to_bytes();

    // Counted while answered (every exit, a dropped connection included).
    struct Active(Arc<Mutex<State>>);
    impl Drop for Active {
        fn drop(&mut self) {
            if let Ok(mut st) = self.0.lock() {
                st.active = st.active.saturating_sub(1);
            }
        }
    }
    let over_limit = {
        let mut st = state.lock().expect("state");
        st.active += 1;
        st.peak_active = st.peak_active.max(st.active);
        st.max_concurrent.is_some_and(|m| st.active > m)
    };
    let _active = Active(state.clone());
    let delay = state.lock().expect("state").delay;
    if let Some(d) = delay {
        tokio::time::sleep(d).await;
    }
    if over_limit {
        let mut st = state.lock().expect("state");
        log.status = 429;
        st.requests.push(log);
        return json(
            429,
            serde_json::json!({"detail": "too many concurrent requests"}),
        );
    }
    let page = |status: u16| {
        Ok(Response::builder()
            .status(status)
            .header("content-type", "text/html; charset=utf-8")
            .body(Full::new(Bytes::from_static(
                b"<!DOCTYPE html><html><body>Please log in</body></html>",
            )))
            .expect("valid"))
    };
    {
        let mut st = state.lock().expect("state");
        if let Some(to) = st.redirect.clone() {
            let status = if path == to { 200 } else { 302 };
            let mut l = log.clone();
            l.status = status;
            st.requests.push(l);
            if status == 200 {
                return page(200);
            }
            return Ok(Response::builder()
                .status(302)
                .header("location", to)
                .body(Full::new(Bytes::new()))
                .expect("valid"));
        }
        if st.html {
            let mut l = log.clone();
            l.status = 200;
            st.requests.push(l);
            return page(200);
        }
    }
    let mut scripted = state.lock().expect("state").script.pop_front();
    while let Some(Reply::Slow(d, inner)) = scripted {
        tokio::time::sleep(d).await;
        scripted = Some(*inner);
    }
    let finish = |status: u16, log: &mut RequestLog, st: &mut State| {
        log.status = status;
        st.requests.push(log.clone());
    };
    match scripted {
        Some(Reply::Drop) => {
            let mut st = state.lock().expect("state");
            finish(0, &mut log, &mut st);
            return Err(DropConnection);
        }
        Some(Reply::Status(s)) if !(200..300).contains(&s) => {
            finish(s, &mut log, &mut state.lock().expect("state"));
            return json(s, serde_json::json!({"detail": format!("scripted {s}")}));
        }
        Some(Reply::Raw(s, ct, headers, text)) => {
            finish(s, &mut log, &mut state.lock().expect("state"));
            let mut b = Response::builder().status(s).header("content-type", ct);
            for (k, v) in headers {
                b = b.header(k, v);
            }
            return Ok(b.body(Full::new(Bytes::from(text))).expect("valid"));
        }
        Some(Reply::RetryAfter(s, secs)) => {
            finish(s, &mut log, &mut state.lock().expect("state"));
            return Ok(Response::builder()
                .status(s)
                .header("retry-after", secs.to_string())
                .body(Full::new(Bytes::from_static(b"{}")))
                .expect("valid"));
        }
        _ => {}
    }
    if path != "/api/v1/events/batch" && path != "/api/v1/collect" {
        finish(404, &mut log, &mut state.lock().expect("state"));
        return json(404, serde_json::json!({"detail": "Not Found"}));
    }
    if state.lock().expect("state").light {
        return light(state, encoding.as_deref(), &body);
    }
    let mut st = state.lock().expect("state");
    if st.down {
        finish(503, &mut log, &mut st);
        return json(503, serde_json::json!({"detail": "Service unavailable"}));
    }
    if let Some(t) = &st.token {
        if log.auth.as_deref() != Some(&format!("Bearer {t}")) {
            finish(401, &mut log, &mut st);
            return json(401, serde_json::json!({"detail": "Not authenticated"}));
        }
    }
    let raw = match decode_body(encoding.as_deref(), &body) {
        Ok(r) => r,
        Err(e) => {
            finish(400, &mut log, &mut st);
            return json(400, serde_json::json!({"detail": e}));
        }
    };
    if st.max_body.is_some_and(|m| raw.len() > m) {
        finish(413, &mut log, &mut st);
        return json(
            413,
            serde_json::json!({"detail": "Request Entity Too Large"}),
        );
    }
    let v: Value = match serde_json::from_slice(&raw) {
        Ok(v) => v,
        Err(e) => {
            finish(400, &mut log, &mut st);
            return json(
                400,
                serde_json::json!({"detail": format!("invalid JSON: {e}")}),
            );
        }
    };
    let events = match validate(&path, &v) {
        Ok(e) => e,
        Err((s, d)) => {
            finish(s, &mut log, &mut st);
            return json(s, serde_json::json!({"detail": d}));
        }
    };
    log.events = events.len();
    if let Some(max) = st.max_batch {
        if events.len() > max {
            finish(413, &mut log, &mut st);
            return json(
                413,
                serde_json::json!({"detail": format!("batch too large (> {max})")}),
            );
        }
    }
    if !st.poison_413.is_empty() && events.iter().any(|e| st.poison_413.contains(&tag_of(e))) {
        finish(413, &mut log, &mut st);
        return json(
            413,
            serde_json::json!({"detail": "Request Entity Too Large"}),
        );
    }
    let fail = st.fail_tag.as_ref().and_then(|(tag, status, left)| {
        (*left > 0 && events.iter().any(|e| tag_of(e) == *tag)).then_some(*status)
    });
    if let Some(status) = fail {
        if let Some(f) = st.fail_tag.as_mut() {
            f.2 -= 1;
        }
        finish(status, &mut log, &mut st);
        return json(
            status,
            serde_json::json!({"detail": "scripted failure for a tag"}),
        );
    }
    if !st.poison.is_empty() && events.iter().any(|e| st.poison.contains(&tag_of(e))) {
        let s = if st.poison_status == 0 {
            422
        } else {
            st.poison_status
        };
        finish(s, &mut log, &mut st);
        if st.poison_echo {
            // FastAPI style: the reason echoes the refused input, so it differs per event.
            let input: Vec<Value> = events.iter().map(|e| e["bag_id"].clone()).collect();
            return json(
                s,
                serde_json::json!({"detail": [{"msg": "Field required", "input": input}]}),
            );
        }
        return json(s, serde_json::json!({"detail": "poison tag in batch"}));
    }
    let rejected: Vec<String> = match &scripted {
        Some(Reply::Partial(ids)) => ids.clone(),
        Some(Reply::PartialByIndex(ix)) => ix
            .iter()
            .filter_map(|&i| events.get(i))
            .map(|e| e["event_id"].as_str().unwrap_or_default().to_string())
            .collect(),
        _ => Vec::new(),
    };
    let mut ingested = 0;
    let mut dups = 0;
    for e in &events {
        let id = e
            .get("event_id")
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string();
        if rejected.contains(&id) {
            continue;
        }
        let n = st.seen.entry(id.clone()).or_default();
        *n += 1;
        if *n == 1 {
            st.first_tag.insert(id, tag_of(e));
            st.events.push(e.clone());
            ingested += 1;
        } else {
            if st.first_tag.get(&id).is_some_and(|t| *t != tag_of(e)) {
                // Two different events with one id: the upstream drops the second.
                st.id_collisions += 1;
            }
            dups += 1;
        }
    }
    st.duplicates += dups;
    let mut env = v.clone();
    if let Some(o) = env.as_object_mut() {
        o.remove("events");
    }
    st.envelopes.push(env);
    if let Some(Reply::PartialByIndex(ix)) = &scripted {
        finish(207, &mut log, &mut st);
        let errors: Vec<Value> = ix
            .iter()
            .map(|i| serde_json::json!({"index": i, "message": "rejected by position"}))
            .collect();
        return json(
            207,
            serde_json::json!({"rejected_count": ix.len(), "errors": errors}),
        );
    }
    if !rejected.is_empty() {
        finish(207, &mut log, &mut st);
        let dlq: Vec<Value> = rejected
            .iter()
            .map(|id| serde_json::json!({"event_id": id, "error": "schema: learner unknown"}))
            .collect();
        return json(
            207,
            serde_json::json!({"batch_id": v.get("batch_id"), "accepted_count": ingested, "rejected_count": rejected.len(), "dlq_events": dlq, "warnings": []}),
        );
    }
    let status = match scripted {
        Some(Reply::Status(s)) => s,
        _ => 200,
    };
    finish(status, &mut log, &mut st);
    json(
        status,
        serde_json::json!({"status": "success", "total_events": events.len(), "ingested_events": ingested, "duplicates_filtered": dups}),
    )
}

#[derive(serde::Deserialize)]
struct LightEnv {
    events: Vec<LightEvent>,
}

#[derive(serde::Deserialize)]
struct LightEvent {
    event_id: String,
    #[serde(default)]
    bag_id: Option<String>,
}

fn light(
    state: Arc<Mutex<State>>,
    encoding: Option<&str>,
    body: &[u8],
) -> Result<Response<Full<Bytes>>, DropConnection> {
    if state.lock().expect("state").light_array {
        let records = decode_body(encoding, body)
            .ok()
            .and_then(|raw| serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&raw).ok());
        let Some(records) = records else {
            return json(400, serde_json::json!({"detail": "bad body"}));
        };
        state.lock().expect("state").light_count += records.len() as u64;
        return json(200, serde_json::json!({"status": "success"}));
    }
    let parsed = decode_body(encoding, body)
        .ok()
        .and_then(|raw| serde_json::from_slice::<LightEnv>(&raw).ok());
    let Some(env) = parsed else {
        return json(400, serde_json::json!({"detail": "bad body"}));
    };
    let mut st = state.lock().expect("state");
    if st.down {
        return json(503, serde_json::json!({"detail": "down"}));
    }
    let n = env.events.len();
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    for e in env.events {
        let c = st.seen.entry(e.event_id.clone()).or_default();
        *c += 1;
        if *c == 1 {
            st.light_count += 1;
            if let Some(a) = st.arrivals.as_mut() {
                a.push((e.bag_id.unwrap_or_default(), e.event_id, now_us));
            }
        } else {
            st.duplicates += 1;
        }
    }
    json(
        200,
        serde_json::json!({"status": "success", "total_events": n}),
    )
}

/// Serve HTTP/1 connections from `listener` (behind TLS when an acceptor is given) until the
/// task is aborted; aborting it drops every open connection too.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    state: Arc<Mutex<State>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    let mut conns = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let st = state.clone();
        let tls = tls.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
            let http = hyper::server::conn::http1::Builder::new();
            match tls {
                None => {
                    let _ = http
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                }
                // A client that does not trust us aborts the handshake: nothing to serve.
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                            .await;
                    }
                }
            }
        });
        while conns.try_join_next().is_some() {}
    }
}

impl Ingest {
    pub async fn start() -> Ingest {
        Self::start_on(
            "127.0.0.1:0".parse().expect("addr"),
            Arc::new(Mutex::new(State::default())),
        )
        .await
    }

    async fn start_on(addr: SocketAddr, state: Arc<Mutex<State>>) -> Ingest {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_reuseaddr(true).expect("reuseaddr");
        sock.bind(addr).expect("bind ingest port");
        let listener = sock.listen(1024).expect("listen");
        let addr = listener.local_addr().expect("local addr");
        let tasks = tokio::spawn(accept_loop(listener, state.clone(), None));
        Ingest {
            addr,
            state,
            tasks: Some(tasks),
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The same server behind TLS with the given certificate chain and key (PEM).
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> Ingest {
        let certs: Vec<_> = rustls::pki_types::pem::PemObject::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .expect("cert pem");
        let key =
            rustls::pki_types::pem::PemObject::from_pem_slice(key_pem.as_bytes()).expect("key pem");
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server cert");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let tasks = tokio::spawn(accept_loop(listener, state.clone(), Some(acceptor)));
        Ingest {
            addr,
            state,
            tasks: Some(tasks),
        }
    }

    /// Refuse connections (listener and open connections closed).
    pub async fn stop(&mut self) {
        if let Some(t) = self.tasks.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listen again on the same port, keeping the recorded state.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut again = Self::start_on(self.addr, self.state.clone()).await;
        self.tasks = again.tasks.take();
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().expect("state"))
    }

    pub fn unique(&self) -> usize {
        self.with(|s| s.unique())
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if let Some(t) = self.tasks.take() {
            t.abort();
        }
    }
}

/// Poll `cond` every 10 ms until it holds or `deadline` passes (then panic with `what`).
pub async fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + deadline;
    while !cond() {
        if tokio::time::Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
