//! Local HTTP for operators and technicians: `/` (the status page), `/events` (its live
//! view, server-sent events), `/health`, `/metrics` (Prometheus text), `/status` (JSON).
//! Loopback by default; read-only.

use crate::app::Running;
use crate::config::Config;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

#[derive(Clone)]
struct Ctx {
    running: Running,
    /// The sources and upstream in effect (a reload changes them).
    view: tokio::sync::watch::Receiver<View>,
    gateway: String,
    admin: crate::config::AdminConfig,
    token: Option<Result<String, String>>,
}

/// What the admin pages say of the configuration in effect: it follows reloads.
#[derive(Debug, Clone)]
pub struct View {
    /// Name, location and kind (`serial`, `mqtt`, `replay`) of each source.
    sources: Vec<(String, String, &'static str)>,
    /// Sources with a connection (serial ports, MQTT brokers): /health reports them down.
    serial: Vec<String>,
    /// `{"kind", "target", …}` of the upstream, for `/status`.
    upstream: serde_json::Value,
}

impl View {
    pub fn of(cfg: &Config) -> View {
        View {
            upstream: upstream_json(&cfg.upstream),
            sources: cfg
                .sources
                .iter()
                .map(|s| {
                    let kind = match s.kind {
                        crate::config::SourceKind::Serial { .. } => "serial",
                        crate::config::SourceKind::Mqtt(_) => "mqtt",
                        crate::config::SourceKind::Replay { .. } => "replay",
                    };
                    (s.name.clone(), s.location.clone(), kind)
                })
                .collect(),
            serial: cfg
                .sources
                .iter()
                .filter(|s| {
                    matches!(
                        s.kind,
                        crate::config::SourceKind::Serial { .. }
                            | crate::config::SourceKind::Mqtt(_)
                    )
                })
                .map(|s| s.name.clone())
                .collect(),
        }
    }
}

/// What `/status` says the upstream is: its kind and where events go (no credentials: the
/// config keeps them in files).
pub fn upstream_json(u: &crate::config::UpstreamConfig) -> serde_json::Value {
    match &u.sink {
        crate::config::Sink::Http => serde_json::json!({"kind": "http", "target": u.endpoint}),
        crate::config::Sink::RedisStreams(r) => serde_json::json!({
            "kind": "redis-streams",
            "target": r.url,
            "stream": r.stream,
            "dlq_stream": r.dlq_stream,
        }),
    }
}

/// The token a request must carry, read from `[admin] token_file` at start (None: no token
/// asked; a new token takes a restart). A file that cannot be read refuses every request
/// rather than opening the listener.
pub fn admin_token(cfg: &Config) -> Option<Result<String, String>> {
    let path = cfg.admin.token_file.as_ref()?;
    Some(match crate::config::read_named_text(path) {
        Ok(t) if !t.trim().is_empty() && t.trim().bytes().all(|b| b.is_ascii_graphic()) => {
            Ok(t.trim().to_string())
        }
        Ok(t) if t.trim().is_empty() => Err(format!("{} is empty", path.display())),
        Ok(_) => Err(format!(
            "{}: a token is one word of visible ASCII characters (it travels in an HTTP header)",
            path.display()
        )),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    })
}

/// Admin connections open at once: a client opening thousands (the listener may face a
/// network) cannot take the file handles the readers and the upstream need. More wait in the
/// kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 32;

/// A connection that sends nothing for this long is closed (it holds one of the
/// [`MAX_CONNECTIONS`]).
pub const IDLE_CLOSE: std::time::Duration = std::time::Duration::from_secs(10);

/// The admin listener, bounded: see [`MAX_CONNECTIONS`], [`IDLE_CLOSE`].
struct Bounded {
    inner: tokio::net::TcpListener,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
}

impl axum::serve::Listener for Bounded {
    type Io = Guarded;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Guarded, std::net::SocketAddr) {
        loop {
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                // The semaphore is never closed; fall back to the plain listener.
                std::future::pending::<()>().await;
                continue;
            };
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    return (
                        Guarded {
                            stream,
                            _permit: permit,
                            idle: Box::pin(tokio::time::sleep(IDLE_CLOSE)),
                        },
                        addr,
                    )
                }
                Err(e) => {
                    tracing::debug!(error = %e, "Admin listener accept failed");
                    drop(permit);
                    // Out of file handles, say: give the process a moment.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

/// An admin connection holding its slot, closed after [`IDLE_CLOSE`] without a byte in either
/// direction (a client that opens a connection and sends nothing is dropped; a status page's
/// live view, which the gateway writes to every second, stays).
struct Guarded {
    stream: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl tokio::io::AsyncRead for Guarded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.stream).poll_read(cx, buf) {
            std::task::Poll::Ready(r) => {
                if buf.filled().len() > before {
                    let next = tokio::time::Instant::now() + IDLE_CLOSE;
                    self.idle.as_mut().reset(next);
                }
                std::task::Poll::Ready(r)
            }
            std::task::Poll::Pending => match self.idle.as_mut().poll(cx) {
                std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "admin connection idle",
                ))),
                std::task::Poll::Pending => std::task::Poll::Pending,
            },
        }
    }
}

impl tokio::io::AsyncWrite for Guarded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            let next = tokio::time::Instant::now() + IDLE_CLOSE;
            self.idle.as_mut().reset(next);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Equal, in time independent of where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(
    State(c): State<Ctx>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match &c.token {
        None => next.run(req).await,
        Some(Err(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "admin token file unreadable; see the log",
        )
            .into_response(),
        Some(Ok(token)) => {
            // The status page cannot set a header on its live view (EventSource), so the
            // token may also come as `?token=` (the page passes on its own).
            let query =
                axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(
                    req.uri(),
                )
                .ok()
                .and_then(|q| q.0.get("token").cloned())
                .unwrap_or_default();
            let query = query.as_str();
            let given = req
                .headers()
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                // The scheme is case-insensitive (RFC 9110).
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map_or(query, |(_, t)| t.trim());
            if same(given.as_bytes(), token.as_bytes()) {
                next.run(req).await
            } else {
                (
                    StatusCode::UNAUTHORIZED,
                    [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
                    "a bearer token is required",
                )
                    .into_response()
            }
        }
    }
}

/// Serve the admin HTTP on `listener`; `view` follows the configuration in effect.
pub async fn serve(
    listener: tokio::net::TcpListener,
    running: Running,
    cfg: Config,
    view: tokio::sync::watch::Receiver<View>,
) {
    let ctx = Ctx {
        running,
        view,
        gateway: cfg.gateway.id.clone(),
        admin: cfg.admin.clone(),
        token: admin_token(&cfg).map(|t| {
            t.inspect_err(|e| tracing::error!(error = %e, "Admin token file unusable: every admin request is refused"))
        }),
    };
    let app = Router::new()
        .route("/", get(page))
        .route("/events", get(events))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route_layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            require_token,
        ))
        .with_state(ctx);
    let bounded = Bounded {
        inner: listener,
        permits: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
    };
    if let Err(e) = axum::serve(bounded, app).await {
        tracing::error!(error = %e, "Admin HTTP server stopped");
    }
}

/// 200 `{"status":"ok"}`, or 503 with every reason the gateway needs attention.
async fn health(State(c): State<Ctx>) -> impl IntoResponse {
    let mut reasons: Vec<String> = Vec::new();
    match tokio::time::timeout(std::time::Duration::from_secs(2), c.running.spool.stats()).await {
        Ok(Ok(_)) => {}
        _ => reasons.push("spool not responding".into()),
    }
    let m = &c.running.metrics;
    if m.spool_quarantined.get() == 1 {
        reasons.push(
            "a corrupt spool file was moved aside and its events are not sent: run `scangate spool salvage`".into(),
        );
    }
    if m.spool_blocked.get() == 1 {
        reasons.push("spool locked by another process: new reads are held".into());
    }
    if m.spool_wal_blocked.get() == 1 {
        reasons.push(format!(
            "the spool's write-ahead log is {} bytes and growing: another process holds a read transaction on the spool (close it)",
            m.spool_wal_bytes.get()
        ));
    }
    if m.spool_disk_full.get() == 1 {
        reasons.push("disk full: new reads are refused".into());
    }
    if m.upstream_misconfigured.get() == 1 {
        reasons.push("upstream misconfigured (redirect, HTML page, 401/403 or 404/405; Redis: credentials refused or a Cluster node): see `scangate status`".into());
    }
    if m.upstream_rejecting_all.get() == 1 {
        reasons.push("upstream refuses every event with the same answer (misconfiguration)".into());
    }
    // Durations on a clock that only moves forward: a wall-clock step (NTP) must not fake or
    // hide an outage.
    let now = crate::metrics::mono_ms() + 1;
    let since = m.upstream_down_since_ms.get();
    if m.upstream_down.get() == 1
        && since > 0
        && now.saturating_sub(since) >= c.admin.upstream_down_after.as_millis() as u64
    {
        reasons.push(format!(
            "upstream failing for {} s: events wait in the spool (see `scangate status` for the last error)",
            now.saturating_sub(since) / 1000
        ));
    }
    let serial = c.view.borrow().serial.clone();
    for name in &serial {
        let h = m.source(name);
        if h.connected.get() == 1 {
            continue;
        }
        // Never connected: counted from the start of the pipeline.
        let since = match h.since_mono.get() {
            0 => m.started_ms.get(),
            s => s,
        };
        let down = now.saturating_sub(since);
        if since > 0 && down >= c.admin.source_down_after.as_millis() as u64 {
            reasons.push(format!(
                "source {name} disconnected for {} s ({})",
                down / 1000,
                h.last_error().unwrap_or_else(|| "not opened yet".into())
            ));
        }
    }
    if reasons.is_empty() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ok"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "degraded", "reasons": reasons})),
        )
    }
}

async fn metrics(State(c): State<Ctx>) -> impl IntoResponse {
    (
        [("content-type", crate::metrics::EXPOSITION_CONTENT_TYPE)],
        c.running.metrics.render(),
    )
}

async fn status(State(c): State<Ctx>) -> impl IntoResponse {
    Json(snapshot(&c).await)
}

/// Status pages connected to `/events` at most at once (each costs a spool query per update).
pub const MAX_LIVE_CLIENTS: u64 = 8;

/// Least time between two updates of one live view, ms.
const LIVE_MIN_MS: u64 = 100;

/// The status page: everything it needs is in this one document (no CDN: the gateway may be
/// offline), with the current state embedded so it shows at once; it then follows
/// `/events`.
async fn page(State(c): State<Ctx>) -> impl IntoResponse {
    let snap = snapshot(&c).await.to_string();
    // Inside a <script> element: no "</script>" or "<!--" can come out of a tag's text.
    let snap = snap
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026");
    let html = include_str!("status.html").replace("/*SNAPSHOT*/null", &snap);
    (
        [
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-store"),
            (
                "content-security-policy",
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            ),
        ],
        html,
    )
}

/// The live view: a `status` event with the page's data (as `/status`) at once, then again
/// whenever a source shows a new read (at most every [`LIVE_MIN_MS`]) and at least every
/// second. Pushed by the gateway: pages do not poll.
async fn events(State(c): State<Ctx>) -> axum::response::Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let m = c.running.metrics.clone();
    if !m.admin_live_clients.inc_below(MAX_LIVE_CLIENTS) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many status pages open; close one",
        )
            .into_response();
    }
    // The slot is given back when the stream ends (the page closed, the connection lost).
    struct Leave(std::sync::Arc<crate::metrics::Metrics>);
    impl Drop for Leave {
        fn drop(&mut self) {
            self.0.admin_live_clients.sub(1);
        }
    }
    let leave = Leave(m.clone());
    let stream = futures_util::stream::unfold((c, leave, true), |(c, leave, first)| async move {
        if !first {
            let m = c.running.metrics.clone();
            let shown = m.reads_shown.notified();
            tokio::select! {
                _ = shown => {}
                _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            }
            tokio::time::sleep(std::time::Duration::from_millis(LIVE_MIN_MS)).await;
        }
        let data = snapshot(&c).await.to_string();
        let ev: Result<Event, std::convert::Infallible> =
            Ok(Event::default().event("status").data(data));
        Some((ev, (c, leave, false)))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// What `/status`, the status page and its live view show.
async fn snapshot(c: &Ctx) -> serde_json::Value {
    // Never longer than /health waits: a spool locked by another process must not hang the
    // page (it then says so).
    let s = tokio::time::timeout(std::time::Duration::from_secs(2), c.running.spool.stats())
        .await
        .ok()
        .and_then(|r| r.ok());
    let m = &c.running.metrics;
    let view = c.view.borrow().clone();
    serde_json::json!({
        "now_ms": crate::event::wall_now_ms(),
        "gateway_id": c.gateway,
        "upstream": view.upstream,
        "sources": view.sources.iter().map(|(n, l, kind)| {
            let mut v = m.source(n).json(n);
            v["location"] = l.as_str().into();
            v["kind"] = (*kind).into();
            v
        }).collect::<Vec<_>>(),
        "reads": m.reads_in.get(),
        "committed": m.spool_committed.get(),
        "delivered": m.delivered.get(),
        "duplicates_skipped": m.upstream_duplicates.get(),
        "backlog": s.as_ref().map(|s| s.backlog),
        "oldest_committed_ms": s.as_ref().and_then(|s| s.oldest_committed_ms),
        "dead_letters": s.as_ref().map(|s| s.dead_letters),
        "last_delivery_ms": s.as_ref().and_then(|s| s.last_delivery_ms),
        "last_upstream_error": s.as_ref().and_then(|s| s.last_error.clone()),
        "upstream_down": m.upstream_down.get() == 1,
        "upstream_rejecting_all": m.upstream_rejecting_all.get() == 1,
        "spool_quarantined": m.spool_quarantined.get() == 1,
        "spool_blocked": m.spool_blocked.get() == 1,
        "spool_not_responding": s.is_none(),
        "dropped": m.dropped_total(),
        "suppression": {
            "reads": m.suppress_reads.get(),
            "below_floor": m.suppress_below_floor.get(),
            "suppressed": m.suppress_suppressed.get(),
            "passes_emitted": m.suppress_passes.get(),
            "forced_closes": m.suppress_forced.get(),
            "moves": m.suppress_moves.get(),
            "tracked": m.suppress_tracked.get(),
        },
        "clock_unsynced": m.clock_unsynced.get() == 1,
        "delivery_held_for_clock": m.delivery_held_for_clock.get() == 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A status page's live view only receives: the gateway's writes keep its connection
    /// open; a connection silent both ways is closed after IDLE_CLOSE.
    #[tokio::test(start_paused = true)]
    async fn writes_keep_a_connection_open_silence_closes_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let permit = std::sync::Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap();
        let mut g = Guarded {
            stream: server,
            _permit: permit,
            idle: Box::pin(tokio::time::sleep(IDLE_CLOSE)),
        };
        // 30 s of the gateway writing every 3 s, the client silent: still open.
        for _ in 0..10 {
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
            g.write_all(b"data: x\n\n").await.unwrap();
        }
        let mut buf = [0u8; 64];
        let n = client.read(&mut buf).await.unwrap();
        assert!(n > 0);
        let r = tokio::time::timeout(std::time::Duration::from_secs(1), g.read(&mut buf)).await;
        assert!(
            r.is_err(),
            "no read error while writes keep it alive: {r:?}"
        );
        // Then silence both ways: closed after IDLE_CLOSE.
        let e = g.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
    }
}
