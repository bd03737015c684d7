//! What the agent reports about itself: `/healthz` and `/livez` with
//! kube-proxy's meaning, and Prometheus `/metrics` with kube-proxy's names
//! where they exist.

mod exposition;
mod health;
mod server;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use tokio::net::TcpListener;

use self::exposition::Exposition;
pub use self::health::{DEFAULT_TIMEOUT as DEFAULT_HEALTH_TIMEOUT, TO_BE_DELETED_TAINT};
use self::health::{HealthState, Verdict};
use self::server::{Limits, Reply};
use crate::conntrack::SweepReport;
use crate::datapath::Maps;
use crate::model::NamespacedName;
use redirector_common::conntrack::FlowState;

/// Bucket bounds (seconds) shared by the duration histograms, as kube-proxy's
/// sync histograms (exponential from 1 ms).
const BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192, 16.384,
];

/// kube-proxy's `network_programming_duration_seconds` buckets: 0, 0.25 s,
/// 0.5 s, every second to 59 s, every 5 s to 115 s, every 30 s to 5 min.
fn programming_buckets() -> impl Iterator<Item = f64> {
    [0.0, 0.25, 0.5]
        .into_iter()
        .chain((1..=59).map(f64::from))
        .chain((60..=115).step_by(5).map(f64::from))
        .chain((120..=300).step_by(30).map(f64::from))
}

struct Inner {
    sync_duration: Histogram,
    programming_latency: Histogram,
    sync_errors: Counter,
    service_ports: Gauge,
    health: Mutex<HealthState>,
    /// Trigger times before this are not observed: kube-proxy's
    /// `trackerStartTime` (the initial list would report the age of the
    /// cluster's slices).
    started: SystemTime,
    queue: Mutex<Queue>,
    endpoint_changes: Counter,
    service_changes: Counter,
    conntrack_sweep_duration: Histogram,
    conntrack_expired: Counter,
    conntrack_early_dropped: Counter,
    /// Flows by state after the last sweep (none before the first).
    conntrack_flows: Mutex<BTreeMap<FlowState, usize>>,
}

/// Changes queued by the watchers and not yet taken by a sync.
#[derive(Default)]
struct Queue {
    /// EndpointSlice changes (kube-proxy counts each one).
    endpoints: i64,
    /// Services with a change waiting, and how many (kube-proxy counts the
    /// Services).
    services: HashMap<NamespacedName, u32>,
}

/// Shared between the sync loop (writer) and the HTTP endpoints (readers).
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(DEFAULT_HEALTH_TIMEOUT)
    }
}

impl Metrics {
    /// `health_timeout`: how long a queued change may wait for a sync before
    /// the agent reports itself unhealthy (`--healthz-timeout`).
    pub fn new(health_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                sync_duration: Histogram::new(BUCKETS),
                programming_latency: Histogram::new(programming_buckets()),
                sync_errors: Counter::default(),
                service_ports: Gauge::default(),
                health: Mutex::new(HealthState::new(health_timeout)),
                started: SystemTime::now(),
                queue: Mutex::default(),
                endpoint_changes: Counter::default(),
                service_changes: Counter::default(),
                conntrack_sweep_duration: Histogram::new(BUCKETS),
                conntrack_expired: Counter::default(),
                conntrack_early_dropped: Counter::default(),
                conntrack_flows: Mutex::default(),
            }),
        }
    }

    /// A change the maps must follow was observed (a relist, a node or
    /// range change, a manifest reload); called as it is observed, so a
    /// stuck sync loop still shows.
    pub fn queued(&self) {
        self.health().queued(Instant::now(), SystemTime::now());
    }

    /// A Service changed (`kubeproxy_sync_proxy_rules_service_changes_*`).
    pub fn service_change_queued(&self, service: &NamespacedName) {
        self.inner.service_changes.inc();
        *self.queue().services.entry(service.clone()).or_default() += 1;
        self.queued();
    }

    /// An EndpointSlice changed (`kubeproxy_sync_proxy_rules_endpoint_changes_*`).
    pub fn endpoint_change_queued(&self) {
        self.inner.endpoint_changes.inc();
        self.queue().endpoints += 1;
        self.queued();
    }

    /// A sync took a Service change off the queue.
    pub fn service_change_taken(&self, service: &NamespacedName) {
        let mut queue = self.queue();
        if let Some(count) = queue.services.get_mut(service) {
            *count -= 1;
            if *count == 0 {
                queue.services.remove(service);
            }
        }
    }

    /// A sync took an EndpointSlice change off the queue.
    pub fn endpoint_change_taken(&self) {
        let mut queue = self.queue();
        queue.endpoints = (queue.endpoints - 1).max(0);
    }

    /// Records one sync that began at `started`: how long it took, the
    /// service ports in the maps, and how many could not be programmed.
    pub fn record_sync(&self, started: Instant, service_ports: usize, errors: usize) {
        let m = &self.inner;
        m.sync_duration.observe(started.elapsed().as_secs_f64());
        m.sync_errors.inc_by(errors as u64);
        m.service_ports.set(service_ports as i64);
        self.health().synced(started, errors == 0, SystemTime::now());
    }

    /// An EndpointSlice change whose `endpoints.kubernetes.io/last-change-trigger-time`
    /// is `trigger` is now in the maps (kube-proxy's network programming
    /// latency). Trigger times from before the agent started are not
    /// observed, as kube-proxy's; a trigger in the future (clock skew
    /// between the control plane and this node) counts as 0.
    pub fn observe_programmed(&self, trigger: SystemTime) {
        if trigger <= self.inner.started {
            return;
        }
        let latency = SystemTime::now().duration_since(trigger).unwrap_or_default();
        self.inner.programming_latency.observe(latency.as_secs_f64());
    }

    /// This node's Node is (not) being deleted or tainted for deletion.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.health().set_node_eligible(eligible);
    }

    /// Records one sweep of the connection table.
    pub fn record_sweep(&self, took: Duration, report: &SweepReport) {
        let m = &self.inner;
        m.conntrack_sweep_duration.observe(took.as_secs_f64());
        m.conntrack_expired.inc_by(report.expired as u64);
        m.conntrack_early_dropped.inc_by(report.early_dropped as u64);
        *m.conntrack_flows.lock().unwrap_or_else(|e| e.into_inner()) = report.flows.clone();
    }

    fn verdict(&self) -> Verdict {
        self.health().verdict(Instant::now())
    }

    fn health(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.inner.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.inner.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seconds since the epoch of the last sync without errors, 0 before
    /// the first.
    fn last_programmed_seconds(&self) -> f64 {
        epoch_seconds(self.health().last_programmed())
    }

    /// Seconds since the epoch of the last queued change, 0 before the first.
    fn last_queued_seconds(&self) -> f64 {
        epoch_seconds(self.health().last_queued())
    }

    /// The pending gauges: EndpointSlice changes and Services.
    fn pending(&self) -> (i64, i64) {
        let queue = self.queue();
        (queue.endpoints, queue.services.len() as i64)
    }
}

fn epoch_seconds(t: Option<SystemTime>) -> f64 {
    t.map_or(0.0, |t| {
        t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
    })
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

/// kube-proxy's bodies: `lastUpdated` is the current time while healthy
/// (its compatibility rule), else the last sync that counts for the probe;
/// `/healthz` adds `nodeEligible`.
fn health_reply(metrics: &Metrics, method: &Method, path: &str) -> Reply {
    if method != Method::GET {
        return not_found();
    }
    let verdict = metrics.verdict();
    let now = SystemTime::now();
    let (healthy, last, eligible) = match path {
        "/healthz" => (
            verdict.healthz,
            metrics.health().last_programmed(),
            Some(verdict.node_eligible),
        ),
        "/livez" => (verdict.livez, metrics.health().last_synced(), None),
        _ => return not_found(),
    };
    let last = if healthy { Some(now) } else { last };
    let mut body = format!(
        "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"",
        last.map(rfc3339).unwrap_or_default(),
        rfc3339(now)
    );
    if let Some(eligible) = eligible {
        body.push_str(&format!(", \"nodeEligible\": {eligible}"));
    }
    body.push('}');
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, "application/json", body)
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
    fn sync_metrics_follow_the_syncs() {
        let m = Metrics::default();
        m.record_sync(Instant::now(), 4, 0);
        m.record_sync(Instant::now(), 4, 1);
        let text = Exposition::new(m, None).render();
        for needle in [
            "kubeproxy_sync_proxy_rules_duration_seconds_count 2",
            "redirector_sync_errors_total 1",
            "kubeproxy_network_programming_duration_seconds_count 0",
        ] {
            assert!(text.contains(needle), "metrics contain {needle:?}:\n{text}");
        }
    }

    #[test]
    fn programming_latency_counts_from_the_trigger_time() {
        let mut m = Metrics::default();
        let now = SystemTime::now();
        // The agent started 10 s ago.
        let started = now - Duration::from_secs(10);
        Arc::get_mut(&mut m.inner).expect("the only handle").started = started;
        m.observe_programmed(started - Duration::from_secs(5));
        m.observe_programmed(now - Duration::from_millis(1_700));
        m.observe_programmed(now + Duration::from_secs(30));
        let text = Exposition::new(m, None).render();
        for needle in [
            // The trigger before the agent started is not observed.
            "kubeproxy_network_programming_duration_seconds_count 2",
            // 1.7 s ago lands in le=2 but not le=1; a future one at 0.
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0\"} 1",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"} 1",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"2\"} 2",
        ] {
            assert!(text.contains(needle), "metrics contain {needle:?}:\n{text}");
        }
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("kubeproxy_network_programming_duration_seconds_bucket"))
            .count();
        assert_eq!(
            buckets,
            3 + 59 + 12 + 7 + 1,
            "kube-proxy's programming buckets and +Inf:\n{text}"
        );
    }

    #[test]
    fn change_counters_and_pending_gauges_follow_kube_proxys() {
        let m = Metrics::default();
        let web = NamespacedName {
            namespace: "default".into(),
            name: "web".into(),
        };
        let db = NamespacedName {
            namespace: "default".into(),
            name: "db".into(),
        };
        m.service_change_queued(&web);
        m.service_change_queued(&web);
        m.service_change_queued(&db);
        m.endpoint_change_queued();
        m.endpoint_change_queued();
        let gauge = |text: &str, name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} in:\n{text}"))
        };
        let text = Exposition::new(m.clone(), None).render();
        for (name, value) in [
            ("kubeproxy_sync_proxy_rules_service_changes_total", 3.0),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_total", 2.0),
            ("kubeproxy_sync_proxy_rules_service_changes_pending", 2.0),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_pending", 2.0),
        ] {
            assert_eq!(gauge(&text, name), value, "{name}");
        }
        assert!(
            gauge(&text, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") > 1e9,
            "the last queued change's time"
        );
        m.service_change_taken(&web);
        m.endpoint_change_taken();
        let text = Exposition::new(m.clone(), None).render();
        assert_eq!(
            gauge(&text, "kubeproxy_sync_proxy_rules_service_changes_pending"),
            2.0,
            "web still has a change waiting"
        );
        assert_eq!(
            gauge(&text, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
            1.0,
            "one slice change left"
        );
        m.service_change_taken(&web);
        m.service_change_taken(&db);
        m.endpoint_change_taken();
        let text = Exposition::new(m, None).render();
        assert_eq!(
            gauge(&text, "kubeproxy_sync_proxy_rules_service_changes_pending"),
            0.0,
            "all taken"
        );
        assert_eq!(
            gauge(&text, "kubeproxy_sync_proxy_rules_service_changes_total"),
            3.0,
            "totals never go down"
        );
    }

    /// `lastUpdated` in a body.
    fn last_updated(body: &str) -> &str {
        body.strip_prefix("{\"lastUpdated\": \"")
            .and_then(|rest| rest.split_once('"'))
            .map(|(last, _)| last)
            .unwrap_or_else(|| panic!("no lastUpdated in {body}"))
    }

    #[test]
    fn health_endpoints_answer_as_kube_proxys() {
        let m = Metrics::new(Duration::ZERO);
        for path in ["/healthz", "/livez"] {
            let (status, content_type, body) = health_reply(&m, &Method::GET, path);
            assert_eq!(status, StatusCode::OK, "{path}: healthy while starting: {body}");
            assert_eq!(content_type, "application/json");
            assert!(
                last_updated(&body).parse::<jiff::Timestamp>().is_ok(),
                "{path}: lastUpdated is the current time while healthy: {body}"
            );
        }
        let (_, _, body) = health_reply(&m, &Method::GET, "/healthz");
        assert!(body.ends_with(", \"nodeEligible\": true}"), "{body}");
        let (_, _, body) = health_reply(&m, &Method::GET, "/livez");
        assert!(!body.contains("nodeEligible"), "/livez leaves it out: {body}");

        // With a zero timeout, a queued change is late at once.
        m.queued();
        for path in ["/healthz", "/livez"] {
            let (status, _, body) = health_reply(&m, &Method::GET, path);
            assert_eq!(
                status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{path}: a change waits: {body}"
            );
            assert_eq!(last_updated(&body), "", "{path}: never synced: {body}");
        }
        m.record_sync(Instant::now(), 1, 1);
        let (status, _, body) = health_reply(&m, &Method::GET, "/livez");
        assert_eq!(status, StatusCode::OK, "the loop took the change: {body}");
        let (status, _, body) = health_reply(&m, &Method::GET, "/healthz");
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "a service port was left out: {body}"
        );
        m.record_sync(Instant::now(), 1, 0);
        let (status, _, body) = health_reply(&m, &Method::GET, "/healthz");
        assert_eq!(status, StatusCode::OK, "everything programmed: {body}");

        m.set_node_eligible(false);
        let (status, _, body) = health_reply(&m, &Method::GET, "/healthz");
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "node being deleted: {body}"
        );
        assert!(body.ends_with(", \"nodeEligible\": false}"), "{body}");
        assert!(
            last_updated(&body).parse::<jiff::Timestamp>().is_ok(),
            "lastUpdated is the last successful sync: {body}"
        );
        assert_eq!(
            health_reply(&m, &Method::GET, "/livez").0,
            StatusCode::OK,
            "/livez ignores node eligibility"
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
        // Begun 3 ms ago.
        let started = Instant::now() - Duration::from_millis(3);
        m.record_sync(started, 7, 2);
        m.record_sync(started, 7, 0);
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
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.016\"} 2",
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 2",
            "kubeproxy_sync_proxy_rules_duration_seconds_count 2",
            "# HELP kubeproxy_network_programming_duration_seconds In Cluster Network Programming Latency \
             in seconds",
            "# TYPE kubeproxy_network_programming_duration_seconds histogram",
            "# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds The last time proxy rules were \
             successfully synced",
            "# TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge",
            "# HELP kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds The last time a sync of proxy \
             rules was queued",
            "# TYPE kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds gauge",
            "# HELP kubeproxy_sync_proxy_rules_endpoint_changes_total Cumulative proxy rules Endpoint changes",
            "# TYPE kubeproxy_sync_proxy_rules_endpoint_changes_total counter",
            "# HELP kubeproxy_sync_proxy_rules_service_changes_total Cumulative proxy rules Service changes",
            "# TYPE kubeproxy_sync_proxy_rules_service_changes_total counter",
            "# HELP kubeproxy_sync_proxy_rules_endpoint_changes_pending Pending proxy rules Endpoint changes",
            "# TYPE kubeproxy_sync_proxy_rules_endpoint_changes_pending gauge",
            "# HELP kubeproxy_sync_proxy_rules_service_changes_pending Pending proxy rules Service changes",
            "# TYPE kubeproxy_sync_proxy_rules_service_changes_pending gauge",
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
        assert!(last > 1e9, "the last successful sync's time: {last}");
        assert_eq!(
            metrics_reply(&exposition, &Method::GET, "/healthz").0,
            StatusCode::NOT_FOUND
        );
    }
}
