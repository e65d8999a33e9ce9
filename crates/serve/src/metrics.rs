//! Prometheus text-format metrics from plain atomics: requests by route and status (499: the
//! client hung up first), a latency histogram, query errors by kind, rejected requests by
//! reason, requests in flight, and client connections (open, the cap, closed by the server).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    connections_closed: Mutex<BTreeMap<&'static str, u64>>,
    buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    /// Sum of latencies in microseconds.
    latency_sum_us: AtomicU64,
    pub in_flight: AtomicUsize,
    pub connections_open: AtomicUsize,
    pub connections_max: AtomicUsize,
}

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    *map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_insert(0) += 1;
}

impl Metrics {
    pub fn request(&self, route: &'static str, status: u16, seconds: f64) {
        bump(&self.requests, (route, status));
        for (i, bound) in BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    pub fn error(&self, kind: &'static str) {
        bump(&self.errors, kind);
    }

    pub fn rejected(&self, reason: &'static str) {
        bump(&self.rejected, reason);
    }

    /// A client connection the server closed: `evicted` to make room at the cap, `timeout`
    /// for a client too slow to send its request or read its answer.
    pub fn connection_closed(&self, reason: &'static str) {
        bump(&self.connections_closed, reason);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP bakedb_requests_total HTTP requests answered, by route and status."
        );
        let _ = writeln!(out, "# TYPE bakedb_requests_total counter");
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "bakedb_requests_total{{route=\"{route}\",code=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP bakedb_request_duration_seconds Time from request to the end of the answer."
        );
        let _ = writeln!(out, "# TYPE bakedb_request_duration_seconds histogram");
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "bakedb_request_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "bakedb_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "bakedb_request_duration_seconds_sum {}",
            self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "bakedb_request_duration_seconds_count {count}");
        let _ = writeln!(
            out,
            "# HELP bakedb_query_errors_total Queries that failed, by kind (invalid, too_large, denied, timeout, cancelled, shutdown, memory, busy, failed)."
        );
        let _ = writeln!(out, "# TYPE bakedb_query_errors_total counter");
        for (kind, n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "bakedb_query_errors_total{{kind=\"{kind}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP bakedb_rejected_total Requests turned away before running, by reason (queue_full, draining)."
        );
        let _ = writeln!(out, "# TYPE bakedb_rejected_total counter");
        for (reason, n) in self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(out, "bakedb_rejected_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP bakedb_in_flight Requests being answered now.");
        let _ = writeln!(out, "# TYPE bakedb_in_flight gauge");
        let _ = writeln!(
            out,
            "bakedb_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP bakedb_connections_open Client connections open now."
        );
        let _ = writeln!(out, "# TYPE bakedb_connections_open gauge");
        let _ = writeln!(
            out,
            "bakedb_connections_open {}",
            self.connections_open.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP bakedb_connections_max Client connections allowed at once (BAKEDB_MAX_CONNECTIONS)."
        );
        let _ = writeln!(out, "# TYPE bakedb_connections_max gauge");
        let _ = writeln!(
            out,
            "bakedb_connections_max {}",
            self.connections_max.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP bakedb_connections_closed_total Client connections the server closed, by reason (evicted, timeout)."
        );
        let _ = writeln!(out, "# TYPE bakedb_connections_closed_total counter");
        for (reason, n) in self
            .connections_closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "bakedb_connections_closed_total{{reason=\"{reason}\"}} {n}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative_and_counts_add_up() {
        let m = Metrics::default();
        m.request("/v1/query", 200, 0.002);
        m.request("/v1/query", 200, 0.3);
        m.request("/healthz", 200, 0.0001);
        m.error("timeout");
        m.rejected("queue_full");
        m.connection_closed("evicted");
        let text = m.render();
        for line in [
            "bakedb_requests_total{route=\"/v1/query\",code=\"200\"} 2",
            "bakedb_requests_total{route=\"/healthz\",code=\"200\"} 1",
            "bakedb_request_duration_seconds_bucket{le=\"0.0005\"} 1",
            "bakedb_request_duration_seconds_bucket{le=\"0.0025\"} 2",
            "bakedb_request_duration_seconds_bucket{le=\"0.5\"} 3",
            "bakedb_request_duration_seconds_bucket{le=\"+Inf\"} 3",
            "bakedb_request_duration_seconds_count 3",
            "bakedb_query_errors_total{kind=\"timeout\"} 1",
            "bakedb_rejected_total{reason=\"queue_full\"} 1",
            "bakedb_in_flight 0",
            "bakedb_connections_closed_total{reason=\"evicted\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
