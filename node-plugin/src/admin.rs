//! The node plugin's HTTP endpoint: Prometheus metrics, pool state for the
//! CLI and benchmarks, and a health check for the DaemonSet's probes.
//!
//! - `GET /metrics`: OpenMetrics text.
//! - `GET /pools`: JSON array of [`PoolStats`] (with the misses of each
//!   pool's handler by reason).
//! - `GET /claims`: JSON array of [`ClaimInfo`] (claimed slots and their pods).
//! - `GET /healthz`: `ok` when ready (start-up recovery finished and
//!   upstream answers `Version`, [`crate::health`]); otherwise 503 with the
//!   reasons. The DaemonSet's readiness probe.
//! - `GET /livez`: `ok` whenever the endpoint serves. The DaemonSet's
//!   startup probe: a process that is up but whose containerd is down is
//!   not ready, yet restarting it would not help.
//!
//! That endpoint stays on loopback (`/claims` names pods). For in-cluster
//! Prometheus, [`bind_metrics`] serves `GET /metrics` alone on another
//! address, and requires `authorization: Bearer <token>` with the token read
//! from a file on every scrape (a rotated Secret takes effect at once).

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use axum::{
    extract::{Request, State},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing, Json, Router,
};

use crate::{
    health::Health,
    metrics::{Metrics, PoolState},
    pool::{ClaimInfo, PoolManager, PoolStats},
};

#[derive(Debug, Clone)]
struct AppState {
    pools: Option<Arc<PoolManager>>,
    metrics: Arc<Metrics>,
    registry: Arc<prometheus_client::registry::Registry>,
    health: Health,
}

fn pool_stats(state: &AppState) -> Vec<PoolStats> {
    state.pools.as_ref().map(|p| p.stats()).unwrap_or_default()
}

async fn get_metrics(State(state): State<AppState>) -> impl IntoResponse {
    for p in pool_stats(&state) {
        for (name, value) in [
            ("free", p.free),
            ("claimed", p.claimed),
            ("desired", p.desired),
        ] {
            let gauge = state.metrics.slots.get_or_create(&PoolState {
                pool: p.name.clone(),
                state: name,
            });
            gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }
    let mut body = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        return (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}"),
        )
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn get_pools(State(state): State<AppState>) -> Json<Vec<PoolStats>> {
    Json(pool_stats(&state))
}

async fn get_claims(State(state): State<AppState>) -> Json<Vec<ClaimInfo>> {
    Json(state.pools.as_ref().map(|p| p.claims()).unwrap_or_default())
}

async fn get_healthz(State(state): State<AppState>) -> (StatusCode, String) {
    let readiness = state.health.readiness();
    if readiness.ready {
        (StatusCode::OK, "ok".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, readiness.message)
    }
}

/// Binds `addr` and serves until `shutdown` resolves. Returns the bound
/// address (useful with port 0) and the serving future.
pub async fn bind(
    addr: SocketAddr,
    pools: Option<Arc<PoolManager>>,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let app = Router::new()
        .route("/metrics", routing::get(get_metrics))
        .route("/pools", routing::get(get_pools))
        .route("/claims", routing::get(get_claims))
        .route("/healthz", routing::get(get_healthz))
        .route("/livez", routing::get(|| async { "ok" }))
        .with_state(AppState::new(pools, metrics, health));
    serve_on(addr, app, "admin", shutdown).await
}

impl AppState {
    fn new(pools: Option<Arc<PoolManager>>, metrics: Arc<Metrics>, health: Health) -> Self {
        let registry = Arc::new(Metrics::registry(&metrics));
        AppState {
            pools,
            metrics,
            registry,
            health,
        }
    }
}

/// Binds `addr` for `app` (the `what` endpoint, for errors); returns the
/// bound address and the future serving until `shutdown`.
async fn serve_on(
    addr: SocketAddr,
    app: Router,
    what: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} endpoint on {addr}"))?;
    let bound = listener.local_addr()?;
    Ok((bound, async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }))
}

/// Answers 401 unless the request carries `authorization: Bearer <token>`
/// with the token now in `token_file`; 503 when that file cannot be read.
async fn require_token(token_file: Arc<PathBuf>, request: Request, next: Next) -> Response {
    let token = match crate::agent::Token::from_file(&token_file) {
        Ok(token) => token,
        Err(error) => {
            tracing::warn!(error = %error, "metrics token unreadable: scrape refused");
            return (StatusCode::SERVICE_UNAVAILABLE, "metrics token unavailable").into_response();
        }
    };
    let presented = request.headers().get(header::AUTHORIZATION).and_then(|v| {
        v.as_bytes()
            .strip_prefix(fast_sandbox_proto::token::BEARER_PREFIX.as_bytes())
    });
    match presented {
        Some(p) if token.matches(p) => next.run(request).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a valid `authorization: Bearer <token>` is required",
        )
            .into_response(),
    }
}

/// Binds `addr` and serves `GET /metrics` alone until `shutdown` resolves,
/// each request authenticated against `token_file` when one is given
/// (`config::metrics_settings` requires one off loopback).
pub async fn bind_metrics(
    addr: SocketAddr,
    token_file: Option<PathBuf>,
    pools: Option<Arc<PoolManager>>,
    metrics: Arc<Metrics>,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, impl Future<Output = std::io::Result<()>>)> {
    let mut app = Router::new()
        .route("/metrics", routing::get(get_metrics))
        .with_state(AppState::new(pools, metrics, health));
    if let Some(file) = token_file {
        let file = Arc::new(file);
        app = app.layer(middleware::from_fn(move |request, next| {
            require_token(file.clone(), request, next)
        }));
    }
    serve_on(addr, app, "metrics", shutdown).await
}

/// A plain HTTP/1.0 GET of `path` on the admin endpoint at `addr` (loopback):
/// the CLI's and the benchmarks' client.
pub async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let (status, body) = fetch(addr, path).await?;
    anyhow::ensure!(status == 200, "GET {path}: status {status}: {body}");
    Ok(body)
}

/// [`get`] that returns any status with its body.
pub async fn fetch(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    fetch_with(addr, path, "").await
}

/// [`fetch`] with `headers` (each line ending in `\r\n`) added.
pub async fn fetch_with(
    addr: SocketAddr,
    path: &str,
    headers: &str,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the admin endpoint {addr}"))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{headers}\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8(buf).context("admin endpoint answered non-UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    let line = head.lines().next().unwrap_or_default();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("GET {path}: malformed status line {line:?}"))?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metrics with one claim (hit) from pool `p`.
    fn one_hit() -> Arc<Metrics> {
        let metrics = Arc::new(Metrics::default());
        metrics
            .claims
            .get_or_create(&crate::metrics::PoolOutcome {
                pool: "p".into(),
                outcome: "hit",
            })
            .inc();
        metrics
    }

    #[tokio::test]
    async fn serves_health_pools_claims_and_metrics_on_loopback() {
        let metrics = one_hit();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, server) = bind(
            "127.0.0.1:0".parse().unwrap(),
            None,
            metrics,
            Health::ready(),
            async {
                let _ = rx.await;
            },
        )
        .await
        .unwrap();
        let server = tokio::spawn(server);
        assert_eq!(get(addr, "/healthz").await.unwrap(), "ok");
        assert_eq!(get(addr, "/livez").await.unwrap(), "ok");
        assert_eq!(get(addr, "/pools").await.unwrap(), "[]");
        assert_eq!(get(addr, "/claims").await.unwrap(), "[]");
        let text = get(addr, "/metrics").await.unwrap();
        assert!(
            text.contains("fast_sandbox_claims_total{pool=\"p\",outcome=\"hit\"} 1"),
            "{text}"
        );
        let err = get(addr, "/nope").await.unwrap_err().to_string();
        assert!(err.contains("404"), "{err}");
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn metrics_for_scrapers_need_the_current_bearer_token() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "first\n").unwrap();
        let metrics = one_hit();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, server) = bind_metrics(
            "127.0.0.1:0".parse().unwrap(),
            Some(token_file.clone()),
            None,
            metrics,
            Health::ready(),
            async {
                let _ = rx.await;
            },
        )
        .await
        .unwrap();
        let server = tokio::spawn(server);
        let bearer = |t: &str| format!("Authorization: Bearer {t}\r\n");

        let (status, body) = fetch(addr, "/metrics").await.unwrap();
        assert_eq!(status, 401, "unauthenticated: {body}");
        assert_eq!(
            fetch_with(addr, "/metrics", &bearer("wrong"))
                .await
                .unwrap()
                .0,
            401
        );
        let (status, body) = fetch_with(addr, "/metrics", &bearer("first"))
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert!(
            body.contains("fast_sandbox_claims_total{pool=\"p\",outcome=\"hit\"} 1"),
            "{body}"
        );
        // Only /metrics: pod names (/claims) never leave loopback.
        assert_eq!(
            fetch_with(addr, "/claims", &bearer("first"))
                .await
                .unwrap()
                .0,
            404
        );

        // Rotated without a restart: the old token stops working at once.
        std::fs::write(&token_file, "second").unwrap();
        assert_eq!(
            fetch_with(addr, "/metrics", &bearer("first"))
                .await
                .unwrap()
                .0,
            401
        );
        assert_eq!(
            fetch_with(addr, "/metrics", &bearer("second"))
                .await
                .unwrap()
                .0,
            200
        );
        // No token to check against: refused, not opened.
        std::fs::remove_file(&token_file).unwrap();
        assert_eq!(
            fetch_with(addr, "/metrics", &bearer("second"))
                .await
                .unwrap()
                .0,
            503
        );
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn healthz_follows_recovery_and_upstream() {
        let health = Health::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, server) = bind(
            "127.0.0.1:0".parse().unwrap(),
            None,
            Arc::new(Metrics::default()),
            health.clone(),
            async {
                let _ = rx.await;
            },
        )
        .await
        .unwrap();
        let server = tokio::spawn(server);

        let (status, body) = fetch(addr, "/healthz").await.unwrap();
        assert_eq!(status, 503);
        assert!(
            body.contains("recovery") && body.contains("not been checked"),
            "{body}"
        );
        assert_eq!(
            get(addr, "/livez").await.unwrap(),
            "ok",
            "alive while not ready"
        );

        health.set_upstream(Ok(()));
        let (status, body) = fetch(addr, "/healthz").await.unwrap();
        assert_eq!(status, 503, "recovery still running");
        assert!(
            body.contains("recovery") && !body.contains("upstream"),
            "{body}"
        );

        health.mark_recovered();
        assert_eq!(
            fetch(addr, "/healthz").await.unwrap(),
            (200, "ok".to_owned())
        );

        health.set_upstream(Err(tonic::Status::unavailable("connection refused")));
        let (status, body) = fetch(addr, "/healthz").await.unwrap();
        assert_eq!(status, 503);
        assert!(body.contains("connection refused"), "{body}");
        let err = get(addr, "/healthz").await.unwrap_err().to_string();
        assert!(
            err.contains("503") && err.contains("connection refused"),
            "{err}"
        );

        health.set_upstream(Ok(()));
        assert_eq!(get(addr, "/healthz").await.unwrap(), "ok", "ready again");
        tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
