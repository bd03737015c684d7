//! What the agent reports about itself: `/healthz` and `/livez` with
//! kube-proxy's meaning, and Prometheus `/metrics` with kube-proxy's names
//! where they exist. The registry is prometheus-client's; what the datapath
//! holds (per-port traffic, counters, occupancy, drift) is read from the
//! pinned maps at each scrape.

mod http;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hyper::StatusCode;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use http::Limits;

use redirector_common::service::ServiceStats;

use crate::datapath::Maps;
use crate::datapath::record::Snapshot;

/// Bucket bounds (seconds) shared by the duration histograms, as kube-proxy's
/// sync histograms (exponential from 1 ms).
const BUCKETS: [f64; 15] = [
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096, 8.192, 16.384,
];

/// When the last sync ended, and whether it programmed every service port.
#[derive(Default)]
struct Health {
    last_sync: Option<SystemTime>,
    last_sync_ok: bool,
}

struct Families {
    sync_duration: Histogram,
    programming_latency: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    sync_errors: Counter,
    service_ports: Gauge,
}

/// Shared between the sync loop (writer) and the HTTP endpoints (readers).
#[derive(Clone)]
pub struct Metrics {
    families: Arc<Families>,
    health: Arc<Mutex<Health>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            families: Arc::new(Families {
                sync_duration: Histogram::new(BUCKETS),
                programming_latency: Histogram::new(BUCKETS),
                last_sync: Gauge::default(),
                sync_errors: Counter::default(),
                service_ports: Gauge::default(),
            }),
            health: Arc::default(),
        }
    }
}

impl Metrics {
    /// Records one sync: how long it took, how long since the oldest change
    /// it covers was observed, and whether every service port was programmed.
    pub fn record_sync(&self, took: Duration, latency: Duration, service_ports: usize, errors: usize) {
        let f = &self.families;
        f.sync_duration.observe(took.as_secs_f64());
        f.programming_latency.observe(latency.as_secs_f64());
        f.sync_errors.inc_by(errors as u64);
        f.service_ports.set(service_ports as i64);
        let now = SystemTime::now();
        f.last_sync
            .set(now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64());
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.last_sync = Some(now);
        health.last_sync_ok = errors == 0;
    }

    /// kube-proxy's meaning: healthy once the rules were synced and the last
    /// sync succeeded.
    pub fn healthy(&self) -> bool {
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.last_sync.is_some() && health.last_sync_ok
    }

    fn health_body(&self) -> String {
        let last = self.health.lock().unwrap_or_else(|e| e.into_inner()).last_sync;
        format!(
            "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"}}",
            last.map(rfc3339).unwrap_or_default(),
            rfc3339(SystemTime::now())
        )
    }

    /// The registry a scrape encodes: the agent's own families, and the
    /// datapath's read from `maps` at scrape time.
    fn registry(&self, maps: Option<Maps>) -> Registry {
        let f = &self.families;
        let mut registry = Registry::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            f.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds (change observed to maps written)",
            f.programming_latency.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            f.last_sync.clone(),
        );
        registry.register(
            "redirector_sync_errors",
            "Service ports that could not be programmed, summed over syncs",
            f.sync_errors.clone(),
        );
        registry.register(
            "redirector_service_ports",
            "Service ports in the desired state",
            f.service_ports.clone(),
        );
        if let Some(maps) = maps {
            registry.register_collector(Box::new(DatapathCollector(maps)));
        }
        registry
    }

    /// Prometheus text exposition (format 0.0.4) of a fresh registry.
    pub fn render(&self, maps: Option<Maps>) -> String {
        encode(&self.registry(maps))
    }
}

fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}

/// Which figure of a service port's statistics a family shows.
type StatsField = fn(&ServiceStats) -> u64;

/// The datapath's families, read from the pinned maps at each scrape.
struct DatapathCollector(Maps);

impl fmt::Debug for DatapathCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatapathCollector")
    }
}

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let maps = &self.0;
        if let Ok(snapshot) = Snapshot::from_maps(maps) {
            let series: [(&str, &str, StatsField); 3] = [
                (
                    "redirector_service_packets",
                    "Packets sent on to an endpoint, per service port",
                    |s| s.packets,
                ),
                (
                    "redirector_service_bytes",
                    "Bytes sent on to an endpoint, per service port",
                    |s| s.bytes,
                ),
                (
                    "redirector_service_new_flows",
                    "Flows started (endpoint selections), per service port",
                    |s| s.new_flows,
                ),
            ];
            for (name, help, value) in series {
                let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
                for port in &snapshot.ports {
                    let (ns, svc, port_name) = port.record.as_ref().map_or(("", "", ""), |r| {
                        (r.namespace.as_str(), r.name.as_str(), r.port.as_str())
                    });
                    let labels = [
                        ("namespace", ns.to_owned()),
                        ("service", svc.to_owned()),
                        ("port", port_name.to_owned()),
                        ("frontend", port.frontend.to_string()),
                    ];
                    ConstCounter::new(value(&port.stats)).encode(family.encode_family(&labels)?)?;
                }
            }
            let drifting =
                snapshot.ports.iter().filter(|p| p.drift().is_some()).count() + snapshot.unprogrammed.len();
            let gauge = ConstGauge::new(drifting as i64);
            gauge.encode(encoder.encode_descriptor(
                "redirector_drift_service_ports",
                "Service ports whose maps differ from what the agent wants",
                None,
                gauge.metric_type(),
            )?)?;
        }
        let occupancy = maps.occupancy();
        for (name, help, pick) in [
            (
                "redirector_map_entries",
                "Entries in use per map",
                (|(_, used, _)| *used as i64) as fn(&(&str, usize, u32)) -> i64,
            ),
            (
                "redirector_map_capacity",
                "Maximum entries per map",
                |(_, _, capacity)| i64::from(*capacity),
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for entry in &occupancy {
                ConstGauge::new(pick(entry)).encode(family.encode_family(&[("map", entry.0)])?)?;
            }
        }
        if let Ok(totals) = maps.counter_totals() {
            let mut family = encoder.encode_descriptor(
                "redirector_packets",
                "Packets seen by the datapath, by verdict",
                None,
                MetricType::Counter,
            )?;
            for (label, value) in redirector_common::counters::LABELS.iter().zip(totals) {
                ConstCounter::new(value).encode(family.encode_family(&[("verdict", *label)])?)?;
            }
        }
        Ok(())
    }
}

/// Serves `/healthz` and `/livez`; returns the address bound.
pub async fn serve_health(addr: SocketAddr, metrics: Metrics, limits: Limits) -> std::io::Result<SocketAddr> {
    http::serve(addr, limits, move |path| match path {
        "/healthz" | "/livez" if metrics.healthy() => {
            (StatusCode::OK, "application/json", metrics.health_body())
        }
        "/healthz" | "/livez" => (
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            metrics.health_body(),
        ),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_owned()),
    })
    .await
}

/// Serves `/metrics`; `maps` are the pinned maps, read per scrape (no maps,
/// no datapath families). Returns the address bound.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: Metrics,
    maps: Option<Maps>,
    limits: Limits,
) -> std::io::Result<SocketAddr> {
    let registry = metrics.registry(maps);
    http::serve(addr, limits, move |path| match path {
        "/metrics" => (
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            encode(&registry),
        ),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_owned()),
    })
    .await
}

/// `2006-01-02T15:04:05Z` for a UTC time.
fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
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
