//! HTTP: routes, the connection pool with its bounded queue, JSON and NDJSON answers, and the
//! drain on SIGTERM. Queries run on blocking threads, one connection each.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::config::Config;
use crate::db::{Db, Params, QueryError};
use crate::metrics::Metrics;

pub struct App {
    config: Config,
    conns: Mutex<Vec<Db>>,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    draining: AtomicBool,
    metrics: Metrics,
    data_digest: Option<String>,
}

/// A connection on loan; it goes back to the pool when dropped, even after a panic.
struct Lease {
    app: Arc<App>,
    db: Option<Db>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(db) = self.db.take() {
            self.app
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(db);
        }
    }
}

impl Lease {
    fn db(&mut self) -> &mut Db {
        self.db
            .as_mut()
            .expect("a lease holds a connection until dropped")
    }
}

/// Takes one off a counter when dropped, also when the request's future is cancelled
/// (the client went away) at an await point.
struct Decrement<'a>(&'a AtomicUsize);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn error_body(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

impl App {
    pub fn new(config: Config, dbs: Vec<Db>) -> Arc<App> {
        Arc::new(App {
            permits: Arc::new(Semaphore::new(dbs.len())),
            conns: Mutex::new(dbs),
            waiting: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            metrics: Metrics::default(),
            data_digest: std::env::var("BAKEDB_DATA_DIGEST").ok(),
            config,
        })
    }

    /// A connection, waiting in a bounded queue; a full queue or a drain is a 503 at once,
    /// so a burst cannot pile up unbounded work (or memory) behind a few slow queries.
    async fn lease(self: &Arc<Self>) -> Result<Lease, Response> {
        if self.draining.load(Ordering::Relaxed) {
            self.metrics.rejected("draining");
            return Err(error_body(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "shutting down"}),
            ));
        }
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.config.queue {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    self.metrics.rejected("queue_full");
                    let mut response = error_body(
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"error": format!(
                            "busy: {} queries running and {} waiting; retry later",
                            self.config.pool_size, self.config.queue
                        )}),
                    );
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                    return Err(response);
                }
                // A client that gives up while queued drops this future: the guard gives
                // its place back even then.
                let _queued = Decrement(&self.waiting);
                let permit = Arc::clone(&self.permits).acquire_owned().await;
                permit.expect("the semaphore is never closed")
            }
        };
        let db = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .expect("a permit guarantees a free connection");
        Ok(Lease {
            app: Arc::clone(self),
            db: Some(db),
            _permit: permit,
        })
    }

    /// Counts the error and answers it with its status code.
    fn query_error(&self, e: QueryError) -> Response {
        let (status, kind, body) = describe(e);
        self.metrics.error(kind);
        error_body(status, body)
    }
}

/// Status code, metrics kind and JSON body of a failed query.
fn describe(e: QueryError) -> (StatusCode, &'static str, Value) {
    match e {
        QueryError::Invalid { message, offset } => (
            StatusCode::BAD_REQUEST,
            "invalid",
            json!({"error": message, "offset": offset}),
        ),
        QueryError::Denied { message, reason } => (
            StatusCode::FORBIDDEN,
            "denied",
            json!({"error": message, "reason": reason}),
        ),
        QueryError::Timeout { limit } => (
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            json!({"error": format!(
                "the query ran longer than {} ms and was interrupted (BAKEDB_QUERY_TIMEOUT_MS)",
                limit.as_millis()
            )}),
        ),
        QueryError::Failed { message } => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "failed",
            json!({"error": message}),
        ),
    }
}

#[derive(Deserialize)]
struct QueryBody {
    sql: String,
    #[serde(default)]
    params: Option<Value>,
}

fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/x-ndjson"))
}

async fn query_get(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(mut q): Query<HashMap<String, String>>,
) -> Response {
    let Some(sql) = q.remove("sql") else {
        return error_body(
            StatusCode::BAD_REQUEST,
            json!({"error": "missing sql: /v1/query?sql=SELECT...&params=[...]"}),
        );
    };
    let params = match q
        .remove("params")
        .map(|p| serde_json::from_str::<Value>(&p))
    {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(e)) => {
            return error_body(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("params is not JSON: {e}")}),
            );
        }
    };
    run_query(app, headers, sql, params).await
}

async fn query_post(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Json<QueryBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match body {
        Ok(Json(body)) => run_query(app, headers, body.sql, body.params).await,
        Err(rejection) => {
            let status = rejection.status();
            error_body(status, json!({"error": rejection.body_text()}))
        }
    }
}

async fn run_query(
    app: Arc<App>,
    headers: HeaderMap,
    sql: String,
    params: Option<Value>,
) -> Response {
    if sql.len() > app.config.max_request_bytes {
        return error_body(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("the query is longer than {} bytes (BAKEDB_MAX_REQUEST_BYTES)", app.config.max_request_bytes)}),
        );
    }
    let params = match Params::from_json(params) {
        Ok(p) => p,
        Err(e) => return app.query_error(e),
    };
    let mut lease = match app.lease().await {
        Ok(lease) => lease,
        Err(response) => return response,
    };
    let limit = app.config.query_timeout;
    if wants_ndjson(&headers) {
        return stream_query(app, lease, sql, params).await;
    }
    let max_rows = app.config.max_rows;
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(move || {
        let mut columns = Vec::new();
        let mut rows = Vec::new();
        let outcome = lease
            .db()
            .query(&sql, &params, limit, &mut |c| columns = c, &mut |row| {
                if rows.len() < max_rows {
                    rows.push(Value::Array(row));
                    true
                } else {
                    false
                }
            });
        outcome.map(|o| (columns, rows, o.truncated))
    })
    .await
    .expect("query thread panicked");
    match result {
        Ok((columns, rows, truncated)) => Json(json!({
            "columns": columns,
            "rows": rows,
            "truncated": truncated,
            "elapsed_ms": started.elapsed().as_secs_f64() * 1000.0,
        }))
        .into_response(),
        Err(e) => app.query_error(e),
    }
}

/// NDJSON: `{"columns": [...]}`, then one JSON array per row, then
/// `{"rows": n, "truncated": false, "elapsed_ms": x}` (or `{"error": ...}` if it failed
/// midway). Errors found before the first row get their status code as in JSON mode.
async fn stream_query(app: Arc<App>, mut lease: Lease, sql: String, params: Params) -> Response {
    let limit = app.config.query_timeout;
    let (head_tx, head_rx) = oneshot::channel::<Result<Vec<String>, QueryError>>();
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let started = Instant::now();
    let app_for_stream = Arc::clone(&app);
    tokio::task::spawn_blocking(move || {
        let mut head_tx = Some(head_tx);
        let line = |v: Value| {
            let mut bytes = serde_json::to_vec(&v).expect("json");
            bytes.push(b'\n');
            Ok(Bytes::from(bytes))
        };
        let result = lease.db().query(
            &sql,
            &params,
            limit,
            &mut |columns| {
                if let Some(h) = head_tx.take() {
                    let _ = tx.blocking_send(line(json!({ "columns": columns })));
                    let _ = h.send(Ok(columns));
                }
            },
            // A client that went away closes the channel: stop reading rows.
            &mut |row| tx.blocking_send(line(Value::Array(row))).is_ok(),
        );
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        match (result, head_tx.take()) {
            (Err(e), Some(h)) => {
                let _ = h.send(Err(e));
            }
            (Err(e), None) => {
                // The 200 and the first rows are already out: the last line carries the
                // error, and the metrics count it like any other failed query.
                let (_, kind, mut body) = describe(e);
                app_for_stream.metrics.error(kind);
                body["elapsed_ms"] = json!(elapsed_ms);
                let _ = tx.blocking_send(line(body));
            }
            (Ok(outcome), _) => {
                let _ = tx.blocking_send(line(json!({
                    "rows": outcome.rows, "truncated": outcome.truncated, "elapsed_ms": elapsed_ms,
                })));
            }
        }
    });
    match head_rx.await {
        Ok(Ok(_)) => {
            let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
            ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
        }
        Ok(Err(e)) => app.query_error(e),
        Err(_) => error_body(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": "the query thread ended without an answer"}),
        ),
    }
}

async fn schema(State(app): State<Arc<App>>) -> Response {
    let mut lease = match app.lease().await {
        Ok(lease) => lease,
        Err(response) => return response,
    };
    let result = tokio::task::spawn_blocking(move || lease.db().schema())
        .await
        .expect("schema thread panicked");
    match result {
        Ok(schema) => Json(schema).into_response(),
        Err(e) => app.query_error(e),
    }
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    if app.draining.load(Ordering::Relaxed) {
        return error_body(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "draining"}),
        );
    }
    Json(json!({
        "status": "ok",
        "database": app.config.database.display().to_string(),
        "data_digest": app.data_digest,
    }))
    .into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

async fn record(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let route: &'static str = match request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str())
    {
        Some("/healthz") => "/healthz",
        Some("/v1/query") => "/v1/query",
        Some("/v1/schema") => "/v1/schema",
        Some("/metrics") => "/metrics",
        _ => "other",
    };
    app.metrics.in_flight.fetch_add(1, Ordering::AcqRel);
    let _in_flight = Decrement(&app.metrics.in_flight);
    let started = Instant::now();
    let response = next.run(request).await;
    app.metrics.request(
        route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/schema", get(schema))
        .route("/v1/query", get(query_get).post(query_post))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), record))
        .layer(DefaultBodyLimit::max(app.config.max_request_bytes))
        .with_state(app)
}

/// Serve until SIGTERM or SIGINT, then stop accepting, let queries in flight finish (at
/// most `drain`), and return.
pub async fn serve(app: Arc<App>) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(app.config.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", app.config.listen))?;
    eprintln!(
        "bakedb-serve: serving {} read-only on http://{} ({} connections, queue {}, {} ms per query, {} rows per answer)",
        app.config.database.display(),
        listener.local_addr().map_or(app.config.listen, |a| a),
        app.config.pool_size,
        app.config.queue,
        app.config.query_timeout.as_millis(),
        app.config.max_rows
    );
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let drain = app.config.drain;
    let shutdown_app = Arc::clone(&app);
    let shutdown = async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        shutdown_app.draining.store(true, Ordering::Relaxed);
        let in_flight = shutdown_app.metrics.in_flight.load(Ordering::Relaxed);
        eprintln!(
            "bakedb-serve: draining: no new connections, {in_flight} request{} in flight",
            if in_flight == 1 { "" } else { "s" }
        );
        let _ = stop_tx.send(());
    };
    let server = axum::serve(listener, router(Arc::clone(&app))).with_graceful_shutdown(shutdown);
    let server = tokio::spawn(async move { server.await });
    // The drain deadline starts at the signal, not at start-up.
    let deadline = async move {
        if stop_rx.await.is_ok() {
            tokio::time::sleep(drain).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => {
            result.map_err(|e| format!("server task: {e}"))?.map_err(|e| format!("serving: {e}"))?;
            eprintln!("bakedb-serve: stopped");
        }
        _ = deadline => {
            eprintln!(
                "bakedb-serve: stopped after {} ms with requests still in flight (BAKEDB_DRAIN_MS)",
                drain.as_millis()
            );
        }
    }
    Ok(())
}
