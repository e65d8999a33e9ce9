//! HTTP: routes, the connection pool with its bounded queue, JSON and NDJSON answers. Queries
//! run on blocking threads, one connection each.
//!
//! Memory: an answer is written straight into its buffer (encode.rs) under
//! BAKEDB_MAX_RESPONSE_BYTES, and every byte of every answer, from the moment it is encoded
//! until hyper has written it to the socket and dropped it, holds a permit of one semaphore
//! (`answers`). Slow or stalled clients therefore cannot pile up answers in memory: once the
//! budget is spent, new queries wait for room until their deadline and then answer 503.

use std::cell::RefCell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::config::Config;
use crate::db::{Control, Db, Job, Params, QueryError, Stop};
use crate::encode::{self, Capped};
use crate::metrics::Metrics;

pub struct App {
    pub config: Config,
    conns: Mutex<Vec<Db>>,
    /// What stops each connection's statement, for the end of the drain.
    controls: Vec<Arc<Control>>,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    pub draining: AtomicBool,
    /// Bytes of answers in memory, all requests together (see the module comment).
    answers: Arc<Semaphore>,
    pub metrics: Metrics,
    data_digest: Option<String>,
}

/// All answers together may hold this many times the largest answer per read connection:
/// one being built, the rest on their way to clients.
const ANSWERS_PER_CONNECTION: usize = 4;
/// NDJSON rows are sent in pieces of about this size, or at once when the client is waiting.
const STREAM_BATCH: usize = 32 << 10;

/// A connection on loan; it goes back to the pool when dropped, even after a panic.
struct Lease {
    app: Arc<App>,
    db: Option<Db>,
    job: Job,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(mut db) = self.db.take() {
            db.end_job();
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

/// Stops the lease's statement when dropped: a request's future is dropped when its client
/// hangs up, and nobody is left to read what the statement would produce. Harmless once the
/// statement is over: its job id is never used again.
struct StopOnDrop(Job);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop(Stop::ClientGone);
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

/// Bytes of an answer and the budget they hold, released when hyper drops the last of them.
struct Held {
    bytes: Vec<u8>,
    _budget: Vec<OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

fn error_body(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

impl App {
    pub fn new(config: Config, dbs: Vec<Db>) -> Arc<App> {
        let budget = config
            .max_response_bytes
            .saturating_mul(ANSWERS_PER_CONNECTION * dbs.len())
            .min(Semaphore::MAX_PERMITS);
        Arc::new(App {
            permits: Arc::new(Semaphore::new(dbs.len())),
            controls: dbs.iter().map(Db::control).collect(),
            conns: Mutex::new(dbs),
            waiting: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            answers: Arc::new(Semaphore::new(budget)),
            metrics: Metrics::default(),
            data_digest: std::env::var("BAKEDB_DATA_DIGEST").ok(),
            config,
        })
    }

    /// Stops every statement running now; how many there were.
    pub fn interrupt_all(&self, why: Stop) -> usize {
        self.controls
            .iter()
            .filter(|control| control.stop_current(why))
            .count()
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
        let mut db = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .expect("a permit guarantees a free connection");
        let job = db.begin_job();
        Ok(Lease {
            app: Arc::clone(self),
            db: Some(db),
            job,
            _permit: permit,
        })
    }

    /// Counts a failed query by kind. Called where the query ends, which is also where a
    /// query whose client went away ends.
    fn count(&self, e: &QueryError) {
        self.metrics.error(describe(e).1);
    }
}

/// Status code, metrics kind and JSON body of a failed query.
fn describe(e: &QueryError) -> (StatusCode, &'static str, Value) {
    match e {
        QueryError::Invalid { message, offset } => (
            StatusCode::BAD_REQUEST,
            "invalid",
            json!({"error": message, "offset": offset}),
        ),
        QueryError::TooLarge { message } => (
            StatusCode::BAD_REQUEST,
            "too_large",
            json!({"error": message}),
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
        // Nobody reads this answer; 499 is what the request metrics call it (nginx's code for
        // a client that closed the connection).
        QueryError::ClientGone => (
            StatusCode::from_u16(499).expect("499 is a valid status code"),
            "cancelled",
            json!({"error": "the client went away; the query was stopped"}),
        ),
        QueryError::ShuttingDown => (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutdown",
            json!({"error": "the server is shutting down: the query was interrupted at the end of the drain (BAKEDB_DRAIN_MS)"}),
        ),
        QueryError::OutOfMemory { message } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "memory",
            json!({"error": message}),
        ),
        QueryError::Busy { message } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            json!({"error": message}),
        ),
        QueryError::Failed { message } => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "failed",
            json!({"error": message}),
        ),
    }
}

/// The answer to a failed query (counted already).
fn error_response(e: &QueryError) -> Response {
    let (status, _, body) = describe(e);
    let mut response = error_body(status, body);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
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
        Err(e) => {
            app.count(&e);
            return error_response(&e);
        }
    };
    let lease = match app.lease().await {
        Ok(lease) => lease,
        Err(response) => return response,
    };
    let stop = StopOnDrop(lease.job.clone());
    if wants_ndjson(&headers) {
        return stream_query(app, lease, stop, sql, params).await;
    }
    let limit = app.config.query_timeout;
    let cap = app.config.max_response_bytes;
    // Room for the largest answer before it is built; what it does not use is given back.
    let room = match tokio::time::timeout(
        limit,
        Arc::clone(&app.answers).acquire_many_owned(cap as u32),
    )
    .await
    {
        Ok(room) => room.expect("the semaphore is never closed"),
        Err(_) => {
            let e = no_room();
            app.count(&e);
            return error_response(&e);
        }
    };
    let max_rows = app.config.max_rows;
    let counting = Arc::clone(&app);
    let result = tokio::task::spawn_blocking(move || {
        let mut lease = lease;
        let mut room = room;
        let started = Instant::now();
        let mut out = Vec::new();
        let result = json_answer(
            lease.db(),
            &sql,
            &params,
            limit,
            max_rows,
            &mut Capped::new(&mut out, cap),
            started,
        );
        drop(lease);
        match result {
            Ok(()) => {
                if let Some(unused) = room.split(room.num_permits().saturating_sub(out.capacity()))
                {
                    drop(unused);
                }
                Ok(Bytes::from_owner(Held {
                    bytes: out,
                    _budget: vec![room],
                }))
            }
            Err(e) => {
                counting.count(&e);
                Err(e)
            }
        }
    })
    .await
    .expect("query thread panicked");
    drop(stop);
    match result {
        Ok(bytes) => (
            [(header::CONTENT_TYPE, "application/json")],
            Body::from(bytes),
        )
            .into_response(),
        Err(e) => error_response(&e),
    }
}

fn no_room() -> QueryError {
    QueryError::Busy {
        message: format!(
            "busy: answers waiting for slow clients fill the memory set aside for answers \
             ({ANSWERS_PER_CONNECTION} x BAKEDB_MAX_RESPONSE_BYTES per read connection); retry later"
        ),
    }
}

/// `{"columns":[...],"rows":[...],"truncated":...,"elapsed_ms":...}`, written row by row into
/// `out`. Stops at `max_rows` or when the next row would not fit (`truncated`); a first row
/// that does not fit on its own is an error, since no part of it can be answered.
fn json_answer(
    db: &mut Db,
    sql: &str,
    params: &Params,
    limit: Duration,
    max_rows: usize,
    out: &mut Capped<'_>,
    started: Instant,
) -> Result<(), QueryError> {
    // Room for the last part, `],"truncated":false,"elapsed_ms":1234567.890}`.
    const TAIL: usize = 64;
    let cap = out.cap();
    out.set_cap(cap - TAIL);
    let too_large = |what: &str| QueryError::TooLarge {
        message: format!(
            "{what} is larger than {cap} bytes of JSON, the largest answer (BAKEDB_MAX_RESPONSE_BYTES)"
        ),
    };
    // The head is written with the first row, or at the end when there is none: the
    // column names come with either.
    let head = |out: &mut Capped<'_>, columns: &[&str]| -> Result<(), QueryError> {
        let names = json!(columns).to_string();
        [&br#"{"columns":"#[..], names.as_bytes(), br#","rows":["#]
            .iter()
            .try_for_each(|part| out.put(part))
            .map_err(|_| too_large("the list of column names"))
    };
    let mut rows = 0;
    let mut head_written = false;
    let outcome = db.query(sql, params, limit, &mut |_| Ok(()), &mut |row| {
        if !head_written {
            head(out, &row.as_ref().column_names().collect::<Vec<_>>())?;
            head_written = true;
        }
        if rows == max_rows {
            return Ok(false);
        }
        let before = out.len();
        let n = row.as_ref().column_count();
        let fits = (rows == 0 || out.put(b",").is_ok()) && encode::put_row(out, row, n).is_ok();
        if !fits {
            out.truncate(before);
            return if rows == 0 {
                Err(too_large("the first row"))
            } else {
                Ok(false)
            };
        }
        rows += 1;
        Ok(true)
    })?;
    if !head_written {
        let names: Vec<&str> = outcome.columns.iter().map(String::as_str).collect();
        head(out, &names)?;
    }
    out.set_cap(cap);
    let tail = format!(
        r#"],"truncated":{},"elapsed_ms":{}}}"#,
        outcome.truncated,
        serde_json::to_string(&(started.elapsed().as_secs_f64() * 1000.0)).unwrap_or_default()
    );
    out.put(tail.as_bytes())
        .map_err(|_| too_large("the answer"))
}

/// Sends NDJSON from the blocking query thread: batches lines, takes their room from the
/// answers budget and from the stream's own window, and waits for a slow client only until
/// `deadline`. A client that hung up is reported as ClientGone.
struct LineSender {
    tx: mpsc::Sender<Bytes>,
    handle: Handle,
    answers: Arc<Semaphore>,
    /// One stream holds at most this many bytes at once, so a single slow client cannot
    /// take the whole budget.
    window: Arc<Semaphore>,
    window_bytes: usize,
    batch: Vec<u8>,
}

impl LineSender {
    fn acquire(
        &self,
        semaphore: &Arc<Semaphore>,
        n: usize,
        deadline: tokio::time::Instant,
    ) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n).ok()?;
        if let Ok(permit) = Arc::clone(semaphore).try_acquire_many_owned(n) {
            return Some(permit);
        }
        self.handle
            .block_on(tokio::time::timeout_at(
                deadline,
                Arc::clone(semaphore).acquire_many_owned(n),
            ))
            .ok()?
            .ok()
    }

    /// Only the column names can make a line longer than the window: rows are capped below
    /// it.
    fn fits(&self, line: &[u8]) -> Result<(), QueryError> {
        if line.len() > self.window_bytes {
            return Err(QueryError::TooLarge {
                message: format!(
                    "the list of column names is larger than {} bytes of JSON (BAKEDB_MAX_RESPONSE_BYTES)",
                    self.window_bytes
                ),
            });
        }
        Ok(())
    }

    /// Adds a line; sends the batch when it is big or the client is waiting for more.
    fn push(
        &mut self,
        line: &[u8],
        deadline: tokio::time::Instant,
        limit: Duration,
    ) -> Result<(), QueryError> {
        self.fits(line)?;
        if !self.batch.is_empty() && self.batch.len() + line.len() > self.window_bytes {
            self.flush(deadline, limit)?;
        }
        self.batch.extend_from_slice(line);
        // An empty channel means the body is waiting: send now rather than make a slow query's
        // rows wait for a full batch.
        if self.batch.len() >= STREAM_BATCH || self.tx.capacity() == self.tx.max_capacity() {
            self.flush(deadline, limit)?;
        }
        Ok(())
    }

    fn flush(&mut self, deadline: tokio::time::Instant, limit: Duration) -> Result<(), QueryError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        if self.tx.is_closed() {
            return Err(QueryError::ClientGone);
        }
        let n = self.batch.len();
        let timeout = || QueryError::Timeout { limit };
        let window = self
            .acquire(&self.window, n, deadline)
            .ok_or_else(timeout)?;
        let global = self
            .acquire(&self.answers, n, deadline)
            .ok_or_else(timeout)?;
        let bytes = Bytes::from_owner(Held {
            bytes: std::mem::take(&mut self.batch),
            _budget: vec![window, global],
        });
        match self.tx.try_send(bytes) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(QueryError::ClientGone),
            Err(mpsc::error::TrySendError::Full(bytes)) => {
                match self
                    .handle
                    .block_on(tokio::time::timeout_at(deadline, self.tx.send(bytes)))
                {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(QueryError::ClientGone),
                    Err(_) => Err(timeout()),
                }
            }
        }
    }

    /// Sends what is batched and the last `lines` from an async task, so that a client slow
    /// to read the end of its stream holds no blocking thread (they are few: one per read
    /// connection and four more). Gives up at `deadline`.
    fn finish(self, lines: Vec<Vec<u8>>, deadline: tokio::time::Instant) {
        let LineSender {
            tx,
            handle,
            answers,
            window,
            window_bytes,
            batch,
        } = self;
        // Pieces no larger than the window (the last lines are short; the batch is within
        // it already).
        let mut pieces = vec![batch];
        for line in lines {
            let last = pieces.last_mut().expect("there is a first piece");
            if last.len() + line.len() <= window_bytes {
                last.extend_from_slice(&line);
            } else {
                pieces.push(line);
            }
        }
        handle.spawn(async move {
            for piece in pieces.into_iter().filter(|p| !p.is_empty()) {
                let Ok(n) = u32::try_from(piece.len()) else {
                    return;
                };
                let room = async {
                    let window = Arc::clone(&window).acquire_many_owned(n).await.ok()?;
                    let global = Arc::clone(&answers).acquire_many_owned(n).await.ok()?;
                    Some(vec![window, global])
                };
                let Ok(Some(budget)) = tokio::time::timeout_at(deadline, room).await else {
                    return;
                };
                let bytes = Bytes::from_owner(Held {
                    bytes: piece,
                    _budget: budget,
                });
                if !matches!(
                    tokio::time::timeout_at(deadline, tx.send(bytes)).await,
                    Ok(Ok(()))
                ) {
                    return;
                }
            }
        });
    }
}

/// The body of an NDJSON answer: what the query thread sends; stops the statement when the
/// client goes away.
struct Lines {
    rx: mpsc::Receiver<Bytes>,
    _stop: StopOnDrop,
}

impl tokio_stream::Stream for Lines {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|line| line.map(Ok))
    }
}

/// NDJSON: `{"columns": [...]}`, then one JSON array per row, then
/// `{"rows": n, "truncated": false, "elapsed_ms": x}` (or `{"error": ...}` if it failed
/// midway). Errors found before the statement runs (syntax, denied, bad parameters) get their
/// status code as in JSON mode.
async fn stream_query(
    app: Arc<App>,
    mut lease: Lease,
    stop: StopOnDrop,
    sql: String,
    params: Params,
) -> Response {
    let limit = app.config.query_timeout;
    let cap = app.config.max_response_bytes;
    let client_timeout = app.config.client_timeout;
    let (head_tx, head_rx) = oneshot::channel::<Result<(), QueryError>>();
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    // A row's line is at most `cap` bytes and its newline.
    let window_bytes = (cap + 1).max(2 * STREAM_BATCH);
    let mut sender = LineSender {
        tx,
        handle: Handle::current(),
        answers: Arc::clone(&app.answers),
        window: Arc::new(Semaphore::new(window_bytes)),
        window_bytes,
        batch: Vec::new(),
    };
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let app_for_stream = Arc::clone(&app);
    tokio::task::spawn_blocking(move || {
        let mut head_tx = Some(head_tx);
        // Both callbacks send; one at a time.
        let sending = RefCell::new(&mut sender);
        let mut line = Vec::new();
        let result = lease.db().query(
            &sql,
            &params,
            limit,
            // The status goes out once the statement is prepared: from then on a stream's
            // errors (its time limit, a row too large) arrive as its last line.
            &mut |columns| {
                let mut text = json!({ "columns": columns }).to_string().into_bytes();
                text.push(b'\n');
                let mut sender = sending.borrow_mut();
                sender.fits(&text)?;
                if let Some(head) = head_tx.take() {
                    let _ = head.send(Ok(()));
                }
                sender.push(&text, deadline, limit)
            },
            &mut |row| {
                line.clear();
                let n = row.as_ref().column_count();
                let mut capped = Capped::new(&mut line, cap);
                encode::put_row(&mut capped, row, n).map_err(|_| QueryError::TooLarge {
                    message: format!(
                        "a row is larger than {cap} bytes of JSON, the largest NDJSON line (BAKEDB_MAX_RESPONSE_BYTES)"
                    ),
                })?;
                line.push(b'\n');
                sending.borrow_mut().push(&line, deadline, limit)?;
                Ok(true)
            },
        );
        drop(lease);
        // The last line may wait for the client as long as any write may.
        let last_deadline = tokio::time::Instant::now() + client_timeout;
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        match result {
            Err(e) => {
                app_for_stream.count(&e);
                match head_tx.take() {
                    Some(head) => {
                        let _ = head.send(Err(e));
                    }
                    None if matches!(e, QueryError::ClientGone) => {}
                    None => {
                        // The 200 and the column names are already out: the last line
                        // carries the error.
                        let (_, _, mut body) = describe(&e);
                        body["elapsed_ms"] = json!(elapsed_ms);
                        let mut text = body.to_string().into_bytes();
                        text.push(b'\n');
                        sender.finish(vec![text], last_deadline);
                    }
                }
            }
            Ok(outcome) => {
                let mut text = json!({
                    "rows": outcome.rows, "truncated": outcome.truncated, "elapsed_ms": elapsed_ms,
                })
                .to_string()
                .into_bytes();
                text.push(b'\n');
                sender.finish(vec![text], last_deadline);
            }
        }
    });
    match head_rx.await {
        Ok(Ok(())) => {
            let body = Body::from_stream(Lines { rx, _stop: stop });
            ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
        }
        Ok(Err(e)) => error_response(&e),
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
        Err(e) => {
            app.count(&e);
            error_response(&e)
        }
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

/// Counts a request whose client hung up before it was answered as 499, so it shows in
/// /metrics like any other.
struct Unanswered<'a> {
    app: &'a App,
    route: &'static str,
    started: Instant,
    answered: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.app
                .metrics
                .request(self.route, 499, self.started.elapsed().as_secs_f64());
        }
    }
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
    let mut unanswered = Unanswered {
        app: &app,
        route,
        started: Instant::now(),
        answered: false,
    };
    let response = next.run(request).await;
    unanswered.answered = true;
    app.metrics.request(
        route,
        response.status().as_u16(),
        unanswered.started.elapsed().as_secs_f64(),
    );
    response
}

/// Reads the request body before any handler sees it: a Content-Length over the limit is
/// refused before a byte of the body is read (a client announcing 10 GB would otherwise keep
/// the connection waiting for it), and a body that trickles in is cut off after
/// BAKEDB_CLIENT_TIMEOUT_MS (hyper times out request heads, not bodies).
async fn read_body(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let limit = app.config.max_request_bytes;
    let too_large = || {
        let mut response = error_body(
            StatusCode::PAYLOAD_TOO_LARGE,
            json!({"error": format!("the request body is larger than {limit} bytes (BAKEDB_MAX_REQUEST_BYTES)")}),
        );
        // The unread body is still on its way: this connection cannot carry another request.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        response
    };
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return too_large();
    }
    let (parts, body) = request.into_parts();
    let timeout = app.config.client_timeout;
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => {
            next.run(Request::from_parts(parts, Body::from(collected.to_bytes())))
                .await
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => too_large(),
        Ok(Err(e)) => error_body(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("reading the request body: {e}")}),
        ),
        Err(_) => {
            let mut response = error_body(
                StatusCode::REQUEST_TIMEOUT,
                json!({"error": format!(
                    "the request body did not arrive within {} ms (BAKEDB_CLIENT_TIMEOUT_MS)",
                    timeout.as_millis()
                )}),
            );
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        }
    }
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/schema", get(schema))
        .route("/v1/query", get(query_get).post(query_post))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), read_body))
        .layer(middleware::from_fn_with_state(Arc::clone(&app), record))
        .layer(DefaultBodyLimit::max(app.config.max_request_bytes))
        .with_state(app)
}
