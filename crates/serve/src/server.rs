//! Client connections: the accept loop, the cap on open connections, time limits for slow
//! clients, closing without losing the last answer, and the drain on SIGTERM.
//!
//! hyper serves each connection (HTTP/1.1, axum's router as the service); axum::serve has no
//! settings, so the loop is here. What keeps the server reachable when clients misbehave:
//!
//! - A request head must arrive within BAKEDB_CLIENT_TIMEOUT_MS, which also bounds how long a
//!   keep-alive connection may sit idle (hyper's header_read_timeout starts again after every
//!   answer); api.rs gives the body the same time, and a write of the answer that makes no
//!   progress for that long ends the connection.
//! - At most BAKEDB_MAX_CONNECTIONS connections are open (config.rs keeps that below the
//!   descriptor limit). At the cap the connection that has been idle the longest, which
//!   includes one still sending its first head, is closed to make room: a flood of slow
//!   clients (slowloris) evicts itself while a health check, whose request arrives with its
//!   connection, is answered.
//! - A connection is closed gracefully: after the last answer the server shuts down its side
//!   and reads what the client still sends for a moment ("lingering close", as nginx does),
//!   so a client whose request was refused half-way (a 431 for a 10 MB request line, a 413
//!   for a body announced too large) reads the answer instead of a connection reset.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::time::Sleep;
use tower::ServiceExt;

use crate::api::{self, App};
use crate::db::Stop;

/// hyper's read buffer, which bounds a request head: the longest URI hyper accepts is 64 KiB
/// (414 beyond), and a head that does not fit at all (a 10 MB request line) is answered 431.
const HEAD_BUFFER: usize = 96 << 10;
/// How long a closed connection is read from and discarded, at most, and how long without a
/// byte from the client before that stops.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_IDLE: Duration = Duration::from_millis(500);

/// The open connections, for the cap.
struct Clients {
    slots: Arc<Semaphore>,
    max: usize,
    open: Mutex<HashMap<u64, Arc<Client>>>,
    next_id: AtomicU64,
    /// Woken when a connection becomes idle, so a full accept loop can evict it.
    idle: Notify,
    epoch: Instant,
}

struct Client {
    id: u64,
    /// Requests being answered (an answer is finished when hyper drops its body).
    busy: AtomicUsize,
    /// When it last became idle (or connected), in nanoseconds since `Clients::epoch`.
    idle_since: AtomicU64,
    evicted: std::sync::atomic::AtomicBool,
    evict: Notify,
}

impl Clients {
    fn new(max: usize) -> Clients {
        Clients {
            slots: Arc::new(Semaphore::new(max)),
            max,
            open: Mutex::default(),
            next_id: AtomicU64::new(0),
            idle: Notify::new(),
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Client>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self) -> Arc<Client> {
        let client = Arc::new(Client {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(self.now()),
            evicted: Default::default(),
            evict: Notify::new(),
        });
        self.open().insert(client.id, Arc::clone(&client));
        client
    }

    fn unregister(&self, client: &Client) {
        self.open().remove(&client.id);
    }

    /// Closes the connection idle the longest; false if every connection is answering.
    fn evict_one(&self) -> bool {
        let open = self.open();
        let oldest = open
            .values()
            .filter(|c| c.busy.load(Ordering::Acquire) == 0 && !c.evicted.load(Ordering::Relaxed))
            .min_by_key(|c| c.idle_since.load(Ordering::Relaxed));
        match oldest {
            Some(client) => {
                client.evicted.store(true, Ordering::Relaxed);
                client.evict.notify_one();
                true
            }
            None => false,
        }
    }

    fn count(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// A request being answered on a connection; dropped with the answer's body.
struct Busy {
    client: Arc<Client>,
    clients: Arc<Clients>,
}

impl Busy {
    fn new(client: &Arc<Client>, clients: &Arc<Clients>) -> Busy {
        client.busy.fetch_add(1, Ordering::AcqRel);
        Busy {
            client: Arc::clone(client),
            clients: Arc::clone(clients),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.client
            .idle_since
            .store(self.clients.now(), Ordering::Relaxed);
        if self.client.busy.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.clients.idle.notify_one();
        }
    }
}

/// An answer's body that marks its connection busy until hyper drops it.
struct TrackedBody {
    body: Body,
    _busy: Busy,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The router as hyper's service for one connection.
#[derive(Clone)]
struct Service {
    router: Router,
    client: Arc<Client>,
    clients: Arc<Clients>,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let busy = Busy::new(&self.client, &self.clients);
        let router = self.router.clone();
        Box::pin(async move {
            let response = router.oneshot(request.map(Body::new)).await?;
            Ok(response.map(|body| TrackedBody { body, _busy: busy }))
        })
    }
}

/// The client's socket as hyper sees it: a write that makes no progress for `stall_limit`
/// fails (a client that stops reading would otherwise hold its answer, and the memory of it,
/// forever), and when hyper is done with it the socket is handed back for a lingering close.
struct ClientIo {
    stream: Option<TcpStream>,
    stall_limit: Duration,
    stall: Option<Pin<Box<Sleep>>>,
    back: Option<oneshot::Sender<TcpStream>>,
}

impl ClientIo {
    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(
            self.stream
                .as_mut()
                .expect("the stream is there until drop"),
        )
    }

    /// Passes a write's result through, failing it once it has been pending too long.
    fn progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                self.stall = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let limit = self.stall_limit;
                let stall = self
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                ready!(stall.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the client read nothing of its answer for {} ms (BAKEDB_CLIENT_TIMEOUT_MS)",
                        limit.as_millis()
                    ),
                )))
            }
        }
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        if let (Some(stream), Some(back)) = (self.stream.take(), self.back.take()) {
            let _ = back.send(stream);
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = self.stream().poll_write(cx, buf);
        self.progress(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = self.stream().poll_write_vectored(cx, bufs);
        self.progress(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = self.stream().poll_flush(cx);
        self.progress(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

/// Reads and discards what the client still sends after the answer, until it closes, stays
/// quiet for LINGER_IDLE, or LINGER has passed. Closing with unread bytes in the socket makes
/// the kernel send a reset, which can destroy the answer before the client has read it.
async fn linger(mut stream: TcpStream) {
    // hyper may have shut down the write side already; again is harmless.
    let _ = std::future::poll_fn(|cx| Pin::new(&mut stream).poll_shutdown(cx)).await;
    let end = tokio::time::Instant::now() + LINGER;
    let mut buf = [0u8; 4096];
    loop {
        let wait = end.min(tokio::time::Instant::now() + LINGER_IDLE);
        match tokio::time::timeout_at(wait, stream.readable()).await {
            Ok(Ok(())) => match stream.try_read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            },
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// hyper's error for a client that was too slow: its head (hyper's own timeout) or reading
/// its answer (ClientIo's).
fn timed_out(e: &hyper::Error) -> bool {
    if e.is_timeout() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if err
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        {
            return true;
        }
        source = err.source();
    }
    false
}

async fn connection(
    app: Arc<App>,
    service: Service,
    stream: TcpStream,
    slot: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) {
    let client = Arc::clone(&service.client);
    let clients = Arc::clone(&service.clients);
    let _ = stream.set_nodelay(true);
    let (back_tx, back_rx) = oneshot::channel();
    let io = ClientIo {
        stream: Some(stream),
        stall_limit: app.config.client_timeout,
        stall: None,
        back: Some(back_tx),
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.client_timeout)
        .max_buf_size(HEAD_BUFFER)
        // Queue answers' bytes instead of copying them into hyper's buffer: a large answer
        // then exists once in memory, under the budget api.rs accounts it in.
        .writev(true);
    // Boxed, not pinned on the stack: it must be dropped below to get the socket back.
    let mut conn = Box::pin(builder.serve_connection(TokioIo::new(io), service));
    let mut draining = *stop.borrow();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    let evicted = loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result
                    && timed_out(&e)
                {
                    app.metrics.connection_closed("timeout");
                }
                break false;
            }
            () = client.evict.notified() => {
                // A request may have arrived since it was picked: that one is answered.
                if client.busy.load(Ordering::Acquire) > 0 {
                    client.evicted.store(false, Ordering::Relaxed);
                    continue;
                }
                app.metrics.connection_closed("evicted");
                break true;
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    // Dropping hyper's connection drops ClientIo, which hands the socket back.
    drop(conn);
    // An evicted connection makes room now; during the drain every moment counts.
    if !evicted
        && !*stop.borrow()
        && let Ok(stream) = back_rx.await
    {
        linger(stream).await;
    }
    clients.unregister(&client);
    drop(slot);
    app.metrics
        .connections_open
        .store(clients.count(), Ordering::Relaxed);
}

/// A future that ends at SIGTERM or SIGINT. The handlers are installed now, before the
/// server says it is serving: a signal right after that line must drain, not kill.
fn stop_signal() -> Result<impl Future<Output = ()>, String> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("handling SIGTERM: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("handling SIGINT: {e}"))?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Serve until SIGTERM or SIGINT, then stop accepting, let queries in flight finish, and
/// return by `drain` after the signal: statements still running shortly before then are
/// interrupted (their clients get a 503), so the process exits on time.
pub async fn serve(app: Arc<App>) -> Result<(), String> {
    let listener = TcpListener::bind(app.config.listen)
        .await
        .map_err(|e| format!("listening on {}: {e}", app.config.listen))?;
    let signal = stop_signal()?;
    tokio::pin!(signal);
    let max = app.config.max_connections;
    eprintln!(
        "bakedb-serve: serving {}{} read-only on http://{} ({} connections, queue {}, {} ms per query, {} rows per answer, {} client connections)",
        app.config.database.display(),
        match app.config.patches.len() {
            0 => String::new(),
            1 => " with 1 patch".into(),
            n => format!(" with {n} patches"),
        },
        listener.local_addr().map_or(app.config.listen, |a| a),
        app.config.pool_size,
        app.config.queue,
        app.config.query_timeout.as_millis(),
        app.config.max_rows,
        max,
    );
    app.metrics.connections_max.store(max, Ordering::Relaxed);
    let clients = Arc::new(Clients::new(max));
    let router = api::router(Arc::clone(&app));
    let (stop_tx, stop_rx) = watch::channel(false);
    'accept: loop {
        // A slot first. At the cap, evict the connection idle the longest and wait for its
        // slot; if every connection is answering, wait until one finishes an answer.
        let slot = loop {
            if let Ok(slot) = Arc::clone(&clients.slots).try_acquire_owned() {
                break slot;
            }
            let idle = clients.idle.notified();
            clients.evict_one();
            tokio::select! {
                slot = Arc::clone(&clients.slots).acquire_owned() => {
                    break slot.expect("the semaphore is never closed");
                }
                () = idle => {}
                () = &mut signal => break 'accept,
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    drop(slot);
                    // Out of descriptors all the same (the system-wide limit, or descriptors
                    // the cap does not count): make room and pause rather than spin.
                    // Anything else (a connection reset before it was accepted) concerns
                    // that connection only.
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) {
                        eprintln!("bakedb-serve: accepting a connection: {e}");
                        clients.evict_one();
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
            },
            () = &mut signal => break,
        };
        let service = Service {
            router: router.clone(),
            client: clients.register(),
            clients: Arc::clone(&clients),
        };
        app.metrics
            .connections_open
            .store(clients.count(), Ordering::Relaxed);
        tokio::spawn(connection(
            Arc::clone(&app),
            service,
            stream,
            slot,
            stop_rx.clone(),
        ));
    }

    // The drain deadline starts at the signal.
    let deadline = tokio::time::Instant::now() + app.config.drain;
    app.draining.store(true, Ordering::Relaxed);
    drop(listener);
    let in_flight = app.metrics.in_flight.load(Ordering::Relaxed);
    eprintln!(
        "bakedb-serve: draining: no new connections, {in_flight} request{} in flight",
        if in_flight == 1 { "" } else { "s" }
    );
    let _ = stop_tx.send(true);
    let all_closed = async {
        let _ = clients.slots.acquire_many(max as u32).await;
    };
    tokio::pin!(all_closed);
    // Statements still running this long before the deadline are interrupted, so that their
    // clients get an answer and the process is gone by the deadline.
    let grace = (app.config.drain / 4).min(Duration::from_millis(500));
    tokio::select! {
        () = &mut all_closed => {
            eprintln!("bakedb-serve: stopped");
            return Ok(());
        }
        () = tokio::time::sleep_until(deadline - grace) => {}
    }
    let interrupted = app.interrupt_all(Stop::ShuttingDown);
    let queries = format!(
        "{interrupted} quer{} interrupted",
        if interrupted == 1 { "y" } else { "ies" }
    );
    tokio::select! {
        () = &mut all_closed => eprintln!(
            "bakedb-serve: stopped at the end of the drain (BAKEDB_DRAIN_MS={}); {queries}",
            app.config.drain.as_millis()
        ),
        () = tokio::time::sleep_until(deadline) => eprintln!(
            "bakedb-serve: stopped after {} ms with requests still in flight (BAKEDB_DRAIN_MS); {queries}",
            app.config.drain.as_millis()
        ),
    }
    Ok(())
}
