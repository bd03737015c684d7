//! The `/metrics` page: the agent's own metrics and, read from the pinned
//! maps at each scrape, the datapath's counters, occupancy and drift.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, prometheus_text};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use redirector_common::conntrack::FlowState;
use redirector_common::counters;

use super::Metrics;
use crate::datapath::Maps;
use crate::datapath::record::Snapshot;

/// `Content-Type` of [`Exposition::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Renders the Prometheus text format (0.0.4) for one agent.
pub struct Exposition {
    registry: Registry,
}

impl Exposition {
    /// `maps` are the pinned maps, read per scrape.
    pub fn new(metrics: Metrics, maps: Option<Maps>) -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape { metrics, maps }));
        Self { registry }
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail, nor can the collector.
        let _ = prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

/// Encodes every family itself rather than registering metrics: a
/// registered metric's help text gets a `.` appended, and the help texts
/// stay as they were.
struct Scrape {
    metrics: Metrics,
    maps: Option<Maps>,
}

impl fmt::Debug for Scrape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scrape")
            .field("maps", &self.maps.is_some())
            .finish_non_exhaustive()
    }
}

/// One service port's series.
#[derive(EncodeLabelSet)]
struct ServicePortLabels {
    namespace: String,
    service: String,
    port: String,
    frontend: String,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let agent = &self.metrics.inner;
        encode_one(
            &mut encoder,
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            &agent.sync_duration,
        )?;
        encode_one(
            &mut encoder,
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            &agent.programming_latency,
        )?;
        encode_one(
            &mut encoder,
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            &ConstGauge::new(self.metrics.last_programmed_seconds()),
        )?;
        encode_one(
            &mut encoder,
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            &ConstGauge::new(self.metrics.last_queued_seconds()),
        )?;
        encode_one(
            &mut encoder,
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            &agent.endpoint_changes,
        )?;
        encode_one(
            &mut encoder,
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            &agent.service_changes,
        )?;
        let (endpoints_pending, services_pending) = self.metrics.pending();
        encode_one(
            &mut encoder,
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            &ConstGauge::new(endpoints_pending),
        )?;
        encode_one(
            &mut encoder,
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            &ConstGauge::new(services_pending),
        )?;
        encode_one(
            &mut encoder,
            "redirector_sync_errors",
            "Service ports that could not be programmed, summed over syncs",
            &agent.sync_errors,
        )?;
        encode_one(
            &mut encoder,
            "redirector_service_ports",
            "Service ports in the desired state",
            &agent.service_ports,
        )?;
        encode_one(
            &mut encoder,
            "redirector_conntrack_sweep_duration_seconds",
            "How long one sweep of the connection table took",
            &agent.conntrack_sweep_duration,
        )?;
        encode_one(
            &mut encoder,
            "redirector_conntrack_expired",
            "Flows removed from the connection table after their state's timeout",
            &agent.conntrack_expired,
        )?;
        encode_one(
            &mut encoder,
            "redirector_conntrack_early_drops",
            "Unanswered flows removed to make room in a nearly full connection table",
            &agent.conntrack_early_dropped,
        )?;
        {
            let flows = agent
                .conntrack_flows
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let mut family = encoder.encode_descriptor(
                "redirector_conntrack_flows",
                "Flows in the connection table at the last sweep, by state",
                None,
                MetricType::Gauge,
            )?;
            for state in FlowState::ALL {
                let count = flows.get(&state).copied().unwrap_or(0) as i64;
                ConstGauge::new(count).encode(family.encode_family(&[("state", state.name())])?)?;
            }
        }
        if let Some(maps) = &self.maps {
            encode_datapath(&mut encoder, maps)?;
            if let Ok(totals) = maps.counter_totals() {
                let mut family = encoder.encode_descriptor(
                    "redirector_packets",
                    "Packets seen by the datapath, by verdict",
                    None,
                    MetricType::Counter,
                )?;
                for (label, value) in counters::LABELS.iter().zip(totals) {
                    ConstCounter::new(value).encode(family.encode_family(&[("verdict", *label)])?)?;
                }
            }
        }
        Ok(())
    }
}

/// A family of one unlabelled series. Counter names leave out `_total`: the
/// encoder appends it.
fn encode_one(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> fmt::Result {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// Per service port traffic, map occupancy and drift, read from the maps;
/// nothing when they cannot be read.
fn encode_datapath(encoder: &mut DescriptorEncoder, maps: &Maps) -> fmt::Result {
    let Ok(snapshot) = Snapshot::from_maps(maps) else {
        return Ok(());
    };
    let series = [
        (
            "redirector_service_packets",
            "Packets sent on to an endpoint, per service port",
        ),
        (
            "redirector_service_bytes",
            "Bytes sent on to an endpoint, per service port",
        ),
        (
            "redirector_service_new_flows",
            "Flows started (endpoint selections), per service port",
        ),
    ];
    for (index, (name, help)) in series.into_iter().enumerate() {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for port in &snapshot.ports {
            let record = port.record.as_ref();
            let labels = ServicePortLabels {
                namespace: record.map(|r| r.namespace.clone()).unwrap_or_default(),
                service: record.map(|r| r.name.clone()).unwrap_or_default(),
                port: record.map(|r| r.port.clone()).unwrap_or_default(),
                frontend: port.frontend.to_string(),
            };
            let value = [port.stats.packets, port.stats.bytes, port.stats.new_flows][index];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
    }
    let occupancy = maps.occupancy();
    let mut entries = encoder.encode_descriptor(
        "redirector_map_entries",
        "Entries in use per map",
        None,
        MetricType::Gauge,
    )?;
    for (map, used, _) in &occupancy {
        ConstGauge::new(*used).encode(entries.encode_family(&[("map", *map)])?)?;
    }
    let mut capacity = encoder.encode_descriptor(
        "redirector_map_capacity",
        "Maximum entries per map",
        None,
        MetricType::Gauge,
    )?;
    for (map, _, max_entries) in &occupancy {
        ConstGauge::new(*max_entries).encode(capacity.encode_family(&[("map", *map)])?)?;
    }
    let drifting =
        snapshot.ports.iter().filter(|p| p.drift().is_some()).count() + snapshot.unprogrammed.len();
    encode_one(
        encoder,
        "redirector_drift_service_ports",
        "Service ports whose maps differ from what the agent wants",
        &ConstGauge::new(drifting),
    )
}
