//! Proxies on 127.0.0.1 in front of a server, to test that clients retry and resume. Both
//! stop when dropped.
//!
//! - [`DroppingProxy`] (TCP) cuts connections: after a number of bytes from the client, the
//!   connection carrying them is shut down both ways, as a network or a load balancer
//!   dropping an upload half-way.
//! - [`FaultProxy`] (HTTP/1.1) answers the first N requests that match a method and a path
//!   pattern itself, with 429 (Retry-After: 1) or 503 as an overloaded registry or its load
//!   balancer would, and forwards everything else; it counts both, so a test can tell the
//!   client retried.
//! - [`ClosingListener`] (TCP) is no proxy at all: it accepts every connection and closes it
//!   at once, a registry as unreachable as a closed port whose client's tries can be counted.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use crate::http::{self, RequestHead};

pub struct DroppingProxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

struct State {
    /// Client bytes forwarded so far, over all connections.
    forwarded: AtomicU64,
    /// The next cut happens once `forwarded` passes this.
    next_cut: AtomicU64,
    /// Bytes between cuts (after the first at `first_cut`).
    every: u64,
    cuts_left: AtomicU64,
    cuts: AtomicU64,
    stop: AtomicBool,
}

impl DroppingProxy {
    /// Forward to `upstream`; cut the connection in which the client's bytes pass
    /// `first_cut`, then every `every` bytes after that, `cuts` times in all.
    pub fn start(upstream: SocketAddr, first_cut: u64, every: u64, cuts: u64) -> DroppingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            forwarded: AtomicU64::new(0),
            next_cut: AtomicU64::new(first_cut),
            every: every.max(1),
            cuts_left: AtomicU64::new(cuts),
            cuts: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let accept_state = state.clone();
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if accept_state.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let state = accept_state.clone();
                std::thread::spawn(move || relay(client, server, state));
            }
        });
        DroppingProxy {
            addr,
            state,
            accept: Some(accept),
        }
    }

    /// HOST:PORT of the proxy, for a docker:// reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// How many connections it has cut.
    pub fn cuts(&self) -> u64 {
        self.state.cuts.load(Ordering::SeqCst)
    }
}

/// Accepts connections on 127.0.0.1 and closes each at once, counting them.
pub struct ClosingListener {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl ClosingListener {
    pub fn start() -> ClosingListener {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the closing listener");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counted, stopped) = (accepted.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                // Counted before the close: a client that saw the close finds it counted.
                counted.fetch_add(1, Ordering::SeqCst);
                drop(conn);
            }
        });
        ClosingListener {
            addr,
            accepted,
            stop,
            accept: Some(accept),
        }
    }

    /// HOST:PORT, for a docker:// reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted (and closed) so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for ClosingListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Server to client as it comes; client to server counted, and cut when the count passes
/// the next cut.
fn relay(mut client: TcpStream, mut server: TcpStream, state: Arc<State>) {
    let (Ok(mut client_back), Ok(mut server_back)) = (client.try_clone(), server.try_clone())
    else {
        return;
    };
    let down = std::thread::spawn(move || {
        let _ = std::io::copy(&mut server_back, &mut client_back);
        let _ = client_back.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let total = state.forwarded.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        let cut_at = state.next_cut.load(Ordering::SeqCst);
        if total > cut_at
            && state
                .cuts_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                .is_ok()
        {
            state.next_cut.store(total + state.every, Ordering::SeqCst);
            state.cuts.fetch_add(1, Ordering::SeqCst);
            // Part of this read goes through, as when a connection breaks mid-request.
            let _ = server.write_all(&buf[..n / 2]);
            let _ = server.shutdown(Shutdown::Both);
            let _ = client.shutdown(Shutdown::Both);
            break;
        }
        if server.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = server.shutdown(Shutdown::Write);
    let _ = down.join();
}

impl Drop for DroppingProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Requests a [`FaultProxy`] answers itself: the first `times` whose method is `method` and
/// whose target (path and query) matches `pattern`, where `*` stands for any run of
/// characters (`/` included: repository names have them).
#[derive(Clone, Debug)]
pub struct Fault {
    pub method: String,
    pub pattern: String,
    pub status: u16,
    /// Seconds for a Retry-After header, if any.
    pub retry_after: Option<u64>,
    pub times: u64,
}

impl Fault {
    /// 429 Too Many Requests with `Retry-After: 1`, `times` times.
    pub fn too_many_requests(method: &str, pattern: &str, times: u64) -> Fault {
        Fault {
            method: method.to_owned(),
            pattern: pattern.to_owned(),
            status: 429,
            retry_after: Some(1),
            times,
        }
    }

    /// 503 Service Unavailable without Retry-After (the client's own backoff), `times` times.
    pub fn unavailable(method: &str, pattern: &str, times: u64) -> Fault {
        Fault {
            method: method.to_owned(),
            pattern: pattern.to_owned(),
            status: 503,
            retry_after: None,
            times,
        }
    }

    /// No fault: only counts the matching requests, all forwarded.
    pub fn count(method: &str, pattern: &str) -> Fault {
        Fault {
            times: 0,
            ..Fault::unavailable(method, pattern, 0)
        }
    }

    fn matches(&self, head: &RequestHead) -> bool {
        head.method.eq_ignore_ascii_case(&self.method) && glob(&self.pattern, &head.target)
    }

    /// The answer, as distribution words its errors.
    fn response(&self, head_only: bool) -> Vec<u8> {
        let (reason, code) = match self.status {
            429 => ("Too Many Requests", "TOOMANYREQUESTS"),
            503 => ("Service Unavailable", "UNAVAILABLE"),
            _ => ("Injected Fault", "UNKNOWN"),
        };
        let body = format!(
            r#"{{"errors":[{{"code":"{code}","message":"injected by the test's fault proxy"}}]}}"#
        );
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: application/json\r\nDocker-Distribution-Api-Version: registry/2.0\r\nContent-Length: {}\r\n",
            self.status,
            body.len()
        );
        if let Some(secs) = self.retry_after {
            out.push_str(&format!("Retry-After: {secs}\r\n"));
        }
        out.push_str("\r\n");
        if !head_only {
            out.push_str(&body);
        }
        out.into_bytes()
    }
}

/// `*` matches any run of characters, everything else itself.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<FaultState>,
    accept: Option<JoinHandle<()>>,
}

struct FaultState {
    faults: Vec<Fault>,
    /// Per fault: requests answered with it.
    answered: Vec<AtomicU64>,
    /// Per fault: matching requests forwarded (after its `times`, or any for a count).
    forwarded: Vec<AtomicU64>,
    stop: AtomicBool,
}

impl FaultProxy {
    /// Forward to `upstream` from a free port, answering what `faults` say.
    pub fn start(upstream: SocketAddr, faults: Vec<Fault>) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fault proxy");
        FaultProxy::serve(listener, upstream, faults)
    }

    /// The same on `addr` (e.g. one a client was told about while nothing listened there).
    pub fn start_on(addr: SocketAddr, upstream: SocketAddr, faults: Vec<Fault>) -> FaultProxy {
        let listener = TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("binding the fault proxy to {addr}: {e}"));
        FaultProxy::serve(listener, upstream, faults)
    }

    fn serve(listener: TcpListener, upstream: SocketAddr, faults: Vec<Fault>) -> FaultProxy {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(FaultState {
            answered: faults.iter().map(|_| AtomicU64::new(0)).collect(),
            forwarded: faults.iter().map(|_| AtomicU64::new(0)).collect(),
            faults,
            stop: AtomicBool::new(false),
        });
        let accept_state = state.clone();
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if accept_state.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let state = accept_state.clone();
                std::thread::spawn(move || {
                    let _ = fault_connection(client, upstream, &state);
                });
            }
        });
        FaultProxy {
            addr,
            state,
            accept: Some(accept),
        }
    }

    /// HOST:PORT of the proxy, for a docker:// reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests fault number `i` (in the order given) answered.
    pub fn answered(&self, i: usize) -> u64 {
        self.state.answered[i].load(Ordering::SeqCst)
    }

    /// How many requests matching fault number `i` went through to the server.
    pub fn forwarded(&self, i: usize) -> u64 {
        self.state.forwarded[i].load(Ordering::SeqCst)
    }
}

/// One client connection: requests a fault takes are answered here (the connection kept, as
/// a registry keeps it); the first other one is forwarded on a connection of its own with
/// `Connection: close`, so the server closes it after its answer and the rest of this
/// connection is relayed byte for byte, without parsing the server's framing.
fn fault_connection(
    client: TcpStream,
    upstream: SocketAddr,
    state: &FaultState,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client_out = client.try_clone()?;
    loop {
        let first = reader.fill_buf()?.first().copied();
        match first {
            None => return Ok(()),
            // Not HTTP (a TLS ClientHello from a client trying HTTPS first): the server
            // answers it as it would without the proxy.
            Some(b) if !b.is_ascii_uppercase() => {
                return relay_rest(reader, client_out, upstream, None);
            }
            Some(_) => {}
        }
        let Some(head) = http::read_request(&mut reader)? else {
            return Ok(());
        };
        let taken = state.faults.iter().enumerate().find(|(i, f)| {
            f.matches(&head)
                && state.answered[*i]
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        (n < f.times).then_some(n + 1)
                    })
                    .is_ok()
        });
        if let Some((_, fault)) = taken {
            // The body is read first: a client still sending it would not see the answer.
            http::discard_body(&head, &mut reader)?;
            client_out.write_all(&fault.response(head.method == "HEAD"))?;
            if head
                .header("connection")
                .is_some_and(|c| c.eq_ignore_ascii_case("close"))
            {
                return Ok(());
            }
            continue;
        }
        for (i, f) in state.faults.iter().enumerate() {
            if f.matches(&head) {
                state.forwarded[i].fetch_add(1, Ordering::SeqCst);
            }
        }
        return relay_rest(reader, client_out, upstream, Some(&head));
    }
}

/// The rest of a client connection to a connection of its own to `upstream`, byte for byte
/// after `head` (sent with `Connection: close`), until the server closes it.
fn relay_rest(
    mut reader: BufReader<TcpStream>,
    mut client_out: TcpStream,
    upstream: SocketAddr,
    head: Option<&RequestHead>,
) -> std::io::Result<()> {
    let mut server = TcpStream::connect(upstream)?;
    if let Some(head) = head {
        server.write_all(&head.bytes_with_connection("close"))?;
    }
    let mut server_back = server.try_clone()?;
    let down = std::thread::spawn(move || {
        let _ = std::io::copy(&mut server_back, &mut client_out);
        let _ = client_out.shutdown(Shutdown::Both);
    });
    // What the reader holds already (the start of a body) goes first.
    let _ = std::io::copy(&mut reader, &mut server);
    let _ = server.shutdown(Shutdown::Write);
    let _ = down.join();
    Ok(())
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_targets() {
        assert!(glob("/v2/*/blobs/uploads/", "/v2/a/b/blobs/uploads/"));
        assert!(!glob(
            "/v2/*/blobs/uploads/",
            "/v2/a/blobs/uploads/?mount=x"
        ));
        assert!(glob(
            "/v2/*/blobs/uploads/*digest=*",
            "/v2/a/blobs/uploads/u?_state=s&digest=sha256:1"
        ));
        assert!(glob("*", ""));
        assert!(glob("/v2/", "/v2/"));
        assert!(!glob("/v2/", "/v2/x"));
        assert!(!glob("/v2/*/manifests/*", "/v2/a/blobs/sha256:1"));
        assert!(glob("a*a", "aa"));
        assert!(!glob("a*a", "a"));
    }

    /// A server that answers every request 200 with its own target, one per connection.
    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut out = conn;
                if let Ok(Some(head)) = http::read_request(&mut reader) {
                    let _ = http::discard_body(&head, &mut reader);
                    let _ = write!(
                        out,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                        head.target.len(),
                        head.target
                    );
                }
            }
        });
        addr
    }

    #[test]
    fn first_matching_requests_get_the_fault_and_the_rest_go_through() {
        let proxy = FaultProxy::start(
            echo_server(),
            vec![
                Fault::too_many_requests("PUT", "/v2/*/manifests/*", 2),
                Fault::count("GET", "/v2/*"),
            ],
        );
        let put = |body: &[u8]| {
            http::request(proxy.addr(), "PUT", "/v2/a/manifests/v1", &[], body).unwrap()
        };
        let first = put(b"{}");
        assert_eq!(first.status, 429);
        assert_eq!(first.header("retry-after"), Some("1"));
        assert!(first.text().contains("TOOMANYREQUESTS"), "{}", first.text());
        assert_eq!(put(&[7u8; 100_000]).status, 429);
        let third = put(b"{}");
        assert_eq!(
            (third.status, third.text().as_str()),
            (200, "/v2/a/manifests/v1")
        );
        assert_eq!(http::get(proxy.addr(), "/v2/x").status, 200);
        assert_eq!((proxy.answered(0), proxy.forwarded(0)), (2, 1));
        assert_eq!((proxy.answered(1), proxy.forwarded(1)), (0, 1));
    }
}
