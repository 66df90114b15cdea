//! Local HTTP for operators and technicians: `/health`, `/metrics` (Prometheus text),
//! `/status` (JSON). Loopback by default; read-only.

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
    sources: Vec<(String, String)>,
    gateway: String,
}

pub async fn serve(listener: tokio::net::TcpListener, running: Running, cfg: Config) {
    let ctx = Ctx {
        running,
        sources: cfg
            .sources
            .iter()
            .map(|s| (s.name.clone(), s.location.clone()))
            .collect(),
        gateway: cfg.gateway.id.clone(),
    };
    let app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(ctx);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "Admin HTTP server stopped");
    }
}

async fn health(State(c): State<Ctx>) -> impl IntoResponse {
    match tokio::time::timeout(std::time::Duration::from_secs(2), c.running.spool.stats()).await {
        Ok(Ok(_)) => (StatusCode::OK, "ok\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "spool not responding\n"),
    }
}

async fn metrics(State(c): State<Ctx>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        c.running.metrics.render(),
    )
}

async fn status(State(c): State<Ctx>) -> impl IntoResponse {
    let s = c.running.spool.stats().await.ok();
    let m = &c.running.metrics;
    Json(serde_json::json!({
        "gateway_id": c.gateway,
        "sources": c.sources.iter().map(|(n, l)| serde_json::json!({"name": n, "location": l})).collect::<Vec<_>>(),
        "reads": m.reads_in.get(),
        "committed": m.spool_committed.get(),
        "delivered": m.delivered.get(),
        "backlog": s.as_ref().map(|s| s.backlog),
        "oldest_committed_ms": s.as_ref().and_then(|s| s.oldest_committed_ms),
        "dead_letters": s.as_ref().map(|s| s.dead_letters),
        "last_delivery_ms": s.as_ref().and_then(|s| s.last_delivery_ms),
        "last_upstream_error": s.as_ref().and_then(|s| s.last_error.clone()),
        "upstream_down": m.upstream_down.get() == 1,
        "dropped": m.dropped_total(),
    }))
}
