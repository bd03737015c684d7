//! What the agent reports about itself: `/healthz` and `/livez` with
//! kube-proxy's meaning, and Prometheus `/metrics` with kube-proxy's names
//! where they exist.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::datapath::Maps;
use crate::datapath::record::Snapshot;

/// Bucket bounds (seconds) shared by the duration histograms, as kube-proxy's
/// sync histograms (exponential from 1 ms).
const BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192, 16.384,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, value: Duration) {
        let secs = value.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(self.counts.iter_mut()) {
            if secs <= *bound {
                *count += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in BUCKETS.iter().zip(self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Default)]
struct State {
    sync_duration: Histogram,
    programming_latency: Histogram,
    last_sync: Option<SystemTime>,
    last_sync_ok: bool,
    sync_errors: u64,
    service_ports: usize,
}

/// Shared between the sync loop (writer) and the HTTP endpoints (readers).
#[derive(Clone, Default)]
pub struct Metrics {
    state: Arc<Mutex<State>>,
}

impl Metrics {
    /// Records one sync: how long it took, how long since the oldest change
    /// it covers was observed, and whether every service port was programmed.
    pub fn record_sync(&self, took: Duration, latency: Duration, service_ports: usize, errors: usize) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.sync_duration.observe(took);
        s.programming_latency.observe(latency);
        s.last_sync = Some(SystemTime::now());
        s.last_sync_ok = errors == 0;
        s.sync_errors += errors as u64;
        s.service_ports = service_ports;
    }

    /// kube-proxy's meaning: healthy once the rules were synced and the last
    /// sync succeeded.
    pub fn healthy(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.last_sync.is_some() && s.last_sync_ok
    }

    fn health_body(&self) -> String {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let last = s.last_sync.map(rfc3339).unwrap_or_default();
        format!(
            "{{\"lastUpdated\": \"{last}\",\"currentTime\": \"{}\"}}",
            rfc3339(SystemTime::now())
        )
    }

    /// Prometheus text exposition; datapath counters are read from `maps`.
    pub fn render(&self, maps: Option<&Maps>) -> String {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = String::new();
        s.sync_duration.render(
            &mut out,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
        );
        s.programming_latency.render(
            &mut out,
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds (change observed to maps written)",
        );
        let last = s
            .last_sync
            .map(|t| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64());
        let _ = writeln!(
            out,
            "# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds The last time proxy rules were \
             successfully synced\n# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge\n\
             kubeproxy_sync_proxy_rules_last_timestamp_seconds {}",
            last.unwrap_or(0.0)
        );
        let _ = writeln!(
            out,
            "# HELP redirector_sync_errors_total Service ports that could not be programmed, summed over \
             syncs\n# TYPE redirector_sync_errors_total counter\nredirector_sync_errors_total {}",
            s.sync_errors
        );
        let _ = writeln!(
            out,
            "# HELP redirector_service_ports Service ports in the desired state\n# TYPE \
             redirector_service_ports gauge\nredirector_service_ports {}",
            s.service_ports
        );
        if let Some(maps) = maps {
            render_datapath(&mut out, maps);
        }
        if let Some(Ok(totals)) = maps.map(Maps::counter_totals) {
            let _ = writeln!(
                out,
                "# HELP redirector_packets_total Packets seen by the datapath, by verdict\n# TYPE \
                 redirector_packets_total counter"
            );
            for (label, value) in redirector_common::counters::LABELS.iter().zip(totals) {
                let _ = writeln!(out, "redirector_packets_total{{verdict=\"{label}\"}} {value}");
            }
        }
        out
    }
}

/// Per service port traffic, map occupancy and drift, read from the maps.
fn render_datapath(out: &mut String, maps: &Maps) {
    let Ok(snapshot) = Snapshot::from_maps(maps) else {
        return;
    };
    let series = [
        (
            "redirector_service_packets_total",
            "Packets sent on to an endpoint, per service port",
        ),
        (
            "redirector_service_bytes_total",
            "Bytes sent on to an endpoint, per service port",
        ),
        (
            "redirector_service_new_flows_total",
            "Flows started (endpoint selections), per service port",
        ),
    ];
    for (index, (name, help)) in series.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for port in &snapshot.ports {
            let (ns, svc, port_name) = port.record.as_ref().map_or(("", "", ""), |r| {
                (r.namespace.as_str(), r.name.as_str(), r.port.as_str())
            });
            let value = [port.stats.packets, port.stats.bytes, port.stats.new_flows][index];
            let _ = writeln!(
                out,
                "{name}{{namespace=\"{ns}\",service=\"{svc}\",port=\"{port_name}\",frontend=\"{}\"}} {value}",
                port.frontend
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP redirector_map_entries Entries in use per map\n# TYPE redirector_map_entries gauge\n\
         # HELP redirector_map_capacity Maximum entries per map\n# TYPE redirector_map_capacity gauge"
    );
    for (map, used, capacity) in maps.occupancy() {
        let _ = writeln!(out, "redirector_map_entries{{map=\"{map}\"}} {used}");
        let _ = writeln!(out, "redirector_map_capacity{{map=\"{map}\"}} {capacity}");
    }
    let drifting =
        snapshot.ports.iter().filter(|p| p.drift().is_some()).count() + snapshot.unprogrammed.len();
    let _ = writeln!(
        out,
        "# HELP redirector_drift_service_ports Service ports whose maps differ from what the agent wants\n\
         # TYPE redirector_drift_service_ports gauge\nredirector_drift_service_ports {drifting}"
    );
}

/// A response: status line, content type, body.
type Response = (&'static str, &'static str, String);

/// Serves `/healthz` and `/livez`.
pub async fn serve_health(addr: SocketAddr, metrics: Metrics) -> std::io::Result<()> {
    serve(addr, move |path| match path {
        Some("/healthz" | "/livez") if metrics.healthy() => {
            ("200 OK", "application/json", metrics.health_body())
        }
        Some("/healthz" | "/livez") => (
            "503 Service Unavailable",
            "application/json",
            metrics.health_body(),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    })
    .await
}

/// Serves `/metrics`; `maps` are the pinned maps, read per scrape.
pub async fn serve_metrics(addr: SocketAddr, metrics: Metrics, maps: Option<Maps>) -> std::io::Result<()> {
    serve(addr, move |path| match path {
        Some("/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            metrics.render(maps.as_ref()),
        ),
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    })
    .await
}

/// Answers each GET on `addr` with `handler(path)`, one task per connection.
async fn serve(
    addr: SocketAddr,
    handler: impl Fn(Option<&str>) -> Response + Send + Sync + 'static,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let path = read_path(&mut conn).await;
                let (status, content_type, body) = handler(path.as_deref());
                respond(&mut conn, status, content_type, &body).await;
            });
        }
    });
    Ok(())
}

/// The path of a GET request (query dropped), or `None` for anything else.
async fn read_path(conn: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf[len..]))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = std::str::from_utf8(&buf[..len]).ok()?;
    let mut parts = head.lines().next()?.split_whitespace();
    (parts.next()? == "GET").then_some(())?;
    Some(parts.next()?.split('?').next()?.to_owned())
}

async fn respond(conn: &mut tokio::net::TcpStream, status: &str, content_type: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes()).await;
    let _ = conn.write_all(body.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// `2006-01-02T15:04:05Z` for a UTC time.
fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_rfc3339() {
        for (secs, expected) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_798_761_599, "2026-12-31T23:59:59Z"),
        ] {
            assert_eq!(
                rfc3339(UNIX_EPOCH + Duration::from_secs(secs)),
                expected,
                "{secs} seconds"
            );
        }
    }

    #[test]
    fn health_follows_the_last_sync() {
        let m = Metrics::default();
        assert!(!m.healthy(), "not healthy before the first sync");
        m.record_sync(Duration::from_millis(3), Duration::from_millis(5), 4, 0);
        assert!(m.healthy(), "healthy after a successful sync");
        m.record_sync(Duration::from_millis(3), Duration::from_millis(5), 4, 1);
        assert!(
            !m.healthy(),
            "unhealthy when the last sync left a service unprogrammed"
        );
        let text = m.render(None);
        for needle in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count 2",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.008\"} 2",
            "redirector_sync_errors_total 1",
        ] {
            assert!(text.contains(needle), "metrics contain {needle:?}:\n{text}");
        }
    }
}
