//! Free TCP ports on 127.0.0.1.

use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

/// A TCP port that was free a moment ago on 127.0.0.1: bound to port 0, read, released. Another
/// process may take it before the caller binds it; a caller that can tell retries.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// An address on 127.0.0.1 nothing listens on right now, for a server on the host network
/// to take. It is below the kernel's ephemeral range, so that the outgoing connections of
/// tests running meanwhile (a load test makes thousands) cannot take it before the server
/// binds it; and never handed out twice by this process.
pub fn free_addr() -> SocketAddr {
    use std::hash::BuildHasher;
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    if ephemeral_low > 11_000 {
        let random = std::collections::hash_map::RandomState::new();
        for attempt in 0..1000u32 {
            let port =
                10_000 + (random.hash_one(attempt) % u64::from(ephemeral_low - 10_000)) as u16;
            if handed_out.contains(&port) {
                continue;
            }
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
                handed_out.push(port);
                return listener.local_addr().unwrap();
            }
        }
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}
