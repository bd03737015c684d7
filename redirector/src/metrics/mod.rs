//! What the agent reports about itself: `/healthz` and `/livez` with
//! kube-proxy's meaning, and Prometheus `/metrics` with kube-proxy's names
//! where they exist.

mod exposition;
mod server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::net::TcpListener;

use self::exposition::Exposition;
use self::server::{Limits, Reply};
use crate::conntrack::SweepReport;
use crate::datapath::Maps;
use redirector_common::conntrack::FlowState;

/// Bucket bounds (seconds) shared by the duration histograms, as kube-proxy's
/// sync histograms (exponential from 1 ms).
const BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192, 16.384,
];

struct Inner {
    sync_duration: Histogram,
    programming_latency: Histogram,
    sync_errors: Counter,
    service_ports: Gauge,
    health: Mutex<Health>,
    conntrack_sweep_duration: Histogram,
    conntrack_expired: Counter,
    conntrack_early_dropped: Counter,
    /// Flows by state after the last sweep (none before the first).
    conntrack_flows: Mutex<BTreeMap<FlowState, usize>>,
}

#[derive(Default)]
struct Health {
    last_sync: Option<SystemTime>,
    last_sync_ok: bool,
}

/// Shared between the sync loop (writer) and the HTTP endpoints (readers).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                sync_duration: Histogram::new(BUCKETS),
                programming_latency: Histogram::new(BUCKETS),
                sync_errors: Counter::default(),
                service_ports: Gauge::default(),
                health: Mutex::default(),
                conntrack_sweep_duration: Histogram::new(BUCKETS),
                conntrack_expired: Counter::default(),
                conntrack_early_dropped: Counter::default(),
                conntrack_flows: Mutex::default(),
            }),
        }
    }
}

impl Metrics {
    /// Records one sync: how long it took, how long since the oldest change
    /// it covers was observed, and whether every service port was programmed.
    pub fn record_sync(&self, took: Duration, latency: Duration, service_ports: usize, errors: usize) {
        let m = &self.inner;
        m.sync_duration.observe(took.as_secs_f64());
        m.programming_latency.observe(latency.as_secs_f64());
        m.sync_errors.inc_by(errors as u64);
        m.service_ports.set(service_ports as i64);
        let mut health = self.health();
        health.last_sync = Some(SystemTime::now());
        health.last_sync_ok = errors == 0;
    }

    /// Records one sweep of the connection table.
    pub fn record_sweep(&self, took: Duration, report: &SweepReport) {
        let m = &self.inner;
        m.conntrack_sweep_duration.observe(took.as_secs_f64());
        m.conntrack_expired.inc_by(report.expired as u64);
        m.conntrack_early_dropped.inc_by(report.early_dropped as u64);
        *m.conntrack_flows.lock().unwrap_or_else(|e| e.into_inner()) = report.flows.clone();
    }

    /// kube-proxy's meaning: healthy once the rules were synced and the last
    /// sync succeeded.
    pub fn healthy(&self) -> bool {
        let health = self.health();
        health.last_sync.is_some() && health.last_sync_ok
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.inner.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn health_body(&self) -> String {
        let last = self.health().last_sync.map(rfc3339).unwrap_or_default();
        format!(
            "{{\"lastUpdated\": \"{last}\",\"currentTime\": \"{}\"}}",
            rfc3339(SystemTime::now())
        )
    }

    /// Seconds since the epoch of the last sync, 0 before the first.
    fn last_sync_seconds(&self) -> f64 {
        self.health().last_sync.map_or(0.0, |t| {
            t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
        })
    }
}

/// Serves `/healthz` and `/livez`.
pub async fn serve_health(addr: SocketAddr, metrics: Metrics) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    server::spawn(listener, Limits::default(), move |method, path| {
        health_reply(&metrics, method, path)
    });
    Ok(())
}

/// Serves `/metrics`; `maps` are the pinned maps, read per scrape.
pub async fn serve_metrics(addr: SocketAddr, metrics: Metrics, maps: Option<Maps>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let exposition = Exposition::new(metrics, maps);
    server::spawn(listener, Limits::default(), move |method, path| {
        metrics_reply(&exposition, method, path)
    });
    Ok(())
}

fn health_reply(metrics: &Metrics, method: &Method, path: &str) -> Reply {
    match (method, path) {
        (&Method::GET, "/healthz" | "/livez") => {
            let status = if metrics.healthy() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, "application/json", metrics.health_body())
        }
        _ => not_found(),
    }
}

fn metrics_reply(exposition: &Exposition, method: &Method, path: &str) -> Reply {
    match (method, path) {
        (&Method::GET, "/metrics") => (StatusCode::OK, exposition::CONTENT_TYPE, exposition.render()),
        _ => not_found(),
    }
}

fn not_found() -> Reply {
    (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_owned())
}

/// `2006-01-02T15:04:05Z` for a UTC time.
fn rfc3339(t: SystemTime) -> String {
    let at = jiff::Timestamp::try_from(t).unwrap_or_default();
    // Precision 0 truncates to whole seconds.
    format!("{at:.0}")
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
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_999)),
            "1970-01-01T00:00:01Z",
            "fractions are truncated"
        );
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
        let text = Exposition::new(m, None).render();
        for needle in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count 2",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.008\"} 2",
            "redirector_sync_errors_total 1",
        ] {
            assert!(text.contains(needle), "metrics contain {needle:?}:\n{text}");
        }
    }

    #[test]
    fn health_endpoints_answer_as_kube_proxys() {
        let m = Metrics::default();
        for path in ["/healthz", "/livez"] {
            let (status, content_type, body) = health_reply(&m, &Method::GET, path);
            assert_eq!(
                status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{path} before the first sync"
            );
            assert_eq!(content_type, "application/json");
            assert!(
                body.starts_with("{\"lastUpdated\": \"\",\"currentTime\": \""),
                "{body}"
            );
        }
        m.record_sync(Duration::ZERO, Duration::ZERO, 1, 0);
        let (status, _, body) = health_reply(&m, &Method::GET, "/healthz");
        assert_eq!(status, StatusCode::OK, "after a successful sync");
        let last = body
            .strip_prefix("{\"lastUpdated\": \"")
            .and_then(|rest| rest.split_once('"'))
            .map(|(last, _)| last)
            .unwrap_or_default();
        assert!(
            last.parse::<jiff::Timestamp>().is_ok(),
            "lastUpdated {last:?} in {body}"
        );
        for (method, path) in [(Method::GET, "/metrics"), (Method::POST, "/healthz")] {
            assert_eq!(
                health_reply(&m, &method, path),
                (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_owned()),
                "{method} {path}"
            );
        }
    }

    #[test]
    fn metrics_page_keeps_the_names_types_and_help_texts() {
        let m = Metrics::default();
        m.record_sync(Duration::from_millis(3), Duration::from_millis(5), 7, 2);
        let exposition = Exposition::new(m, None);
        let (status, content_type, text) = metrics_reply(&exposition, &Method::GET, "/metrics");
        assert_eq!(status, StatusCode::OK);
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        for line in [
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds SyncProxyRules latency in seconds",
            "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"} 0",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"16.384\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 1",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1",
            "# HELP kubeproxy_network_programming_duration_seconds In Cluster Network Programming Latency \
             in seconds (change observed to maps written)",
            "# TYPE kubeproxy_network_programming_duration_seconds histogram",
            "# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds The last time proxy rules were \
             successfully synced",
            "# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
            "# HELP redirector_sync_errors_total Service ports that could not be programmed, summed over syncs",
            "# TYPE redirector_sync_errors_total counter",
            "redirector_sync_errors_total 2",
            "# HELP redirector_service_ports Service ports in the desired state",
            "# TYPE redirector_service_ports gauge",
            "redirector_service_ports 7",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in:\n{text}");
        }
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("kubeproxy_sync_proxy_rules_duration_seconds_bucket"))
            .count();
        assert_eq!(
            buckets,
            BUCKETS.len() + 1,
            "kube-proxy's buckets and +Inf:\n{text}"
        );
        let last: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("kubeproxy_sync_proxy_rules_last_timestamp_seconds "))
            .and_then(|v| v.parse().ok())
            .unwrap_or_default();
        assert!(last > 1e9, "the last sync's time: {last}");
        assert_eq!(
            metrics_reply(&exposition, &Method::GET, "/healthz").0,
            StatusCode::NOT_FOUND
        );
    }
}
