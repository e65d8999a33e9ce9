//! A TCP proxy on 127.0.0.1 in front of a server, that cuts connections: after a number of
//! bytes from the client, the connection carrying them is shut down both ways, as a network
//! or a load balancer dropping an upload half-way. Used to test that clients retry and
//! resume. Stopped when dropped.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

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
