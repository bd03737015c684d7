//! Compact Services and EndpointSlices for the watch caches: only the fields
//! kube-proxy's rules (and the reflector) read are parsed and kept.
//!
//! The generated API types are large even when mostly empty (one discovery/v1
//! `Endpoint` is 352 bytes before its strings), and a cache holds every
//! object of the cluster: at 10k Services × 10 endpoints the full types cost
//! about 45 MiB of the agent's heap. Unknown fields (managedFields,
//! annotations, status, targetRef) are skipped while parsing, which also
//! makes the initial lists cheaper to decode. Of a slice's annotations only
//! `endpoints.kubernetes.io/last-change-trigger-time` is kept, for the
//! network programming latency.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::SystemTime;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{ClientIPConfig, Service, ServicePort, ServiceSpec, SessionAffinityConfig};
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointHints, EndpointPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::Deserialize;

use super::endpoints::{SERVICE_NAME_LABEL, SliceEndpoint, SliceView};

/// The metadata fields read by the proxy and by the watcher's cache.
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaFields {
    name: Option<String>,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    resource_version: Option<String>,
    uid: Option<String>,
    creation_timestamp: Option<Time>,
    deletion_timestamp: Option<Time>,
    /// Slices only: the one annotation read (the others are skipped
    /// while parsing).
    annotations: Option<TriggerAnnotation>,
}

/// The EndpointSlice controller's annotation saying when the change a slice
/// reflects (a Pod or Service update) happened.
#[derive(Default, Deserialize)]
struct TriggerAnnotation {
    #[serde(rename = "endpoints.kubernetes.io/last-change-trigger-time")]
    trigger_time: Option<String>,
}

impl From<MetaFields> for ObjectMeta {
    fn from(m: MetaFields) -> Self {
        ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            labels: m.labels,
            resource_version: m.resource_version,
            uid: m.uid,
            creation_timestamp: m.creation_timestamp,
            deletion_timestamp: m.deletion_timestamp,
            ..ObjectMeta::default()
        }
    }
}

/// A Service as the proxy sees it. Its labels and selector are kept as
/// pairs: a one-entry label map costs half a kilobyte.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(from = "ServiceFields")]
pub struct CompactService {
    pub metadata: ObjectMeta,
    labels: Vec<(String, String)>,
    spec: Option<CompactServiceSpec>,
}

#[derive(Clone, Debug, Default)]
struct CompactServiceSpec {
    type_: Option<String>,
    cluster_ip: Option<String>,
    ports: Option<Vec<ServicePort>>,
    selector: Vec<(String, String)>,
    session_affinity: Option<String>,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    affinity_timeout: Option<i32>,
    policies: Option<Box<PolicyFields>>,
}

/// The fields that change which endpoints a node uses; rarely set, so kept
/// behind one pointer.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicyFields {
    internal_traffic_policy: Option<String>,
    external_traffic_policy: Option<String>,
    traffic_distribution: Option<String>,
    #[serde(rename = "externalIPs")]
    external_ips: Option<Vec<String>>,
}

impl PolicyFields {
    fn is_empty(&self) -> bool {
        self.internal_traffic_policy.is_none()
            && self.external_traffic_policy.is_none()
            && self.traffic_distribution.is_none()
            && self.external_ips.as_ref().is_none_or(Vec::is_empty)
    }
}

#[derive(Deserialize)]
struct ServiceFields {
    #[serde(default)]
    metadata: MetaFields,
    #[serde(default)]
    spec: Option<SpecFields>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecFields {
    #[serde(rename = "type")]
    type_: Option<String>,
    #[serde(rename = "clusterIP")]
    cluster_ip: Option<String>,
    ports: Option<Vec<ServicePort>>,
    selector: Option<BTreeMap<String, String>>,
    session_affinity: Option<String>,
    session_affinity_config: Option<SessionAffinityConfig>,
    #[serde(flatten)]
    policies: PolicyFields,
}

impl From<ServiceFields> for CompactService {
    fn from(mut fields: ServiceFields) -> Self {
        let labels = fields.metadata.labels.take().unwrap_or_default();
        CompactService {
            metadata: fields.metadata.into(),
            labels: labels.into_iter().collect(),
            spec: fields.spec.map(|s| CompactServiceSpec {
                type_: s.type_,
                cluster_ip: s.cluster_ip,
                ports: s.ports,
                selector: s.selector.unwrap_or_default().into_iter().collect(),
                session_affinity: s.session_affinity,
                affinity_timeout: s
                    .session_affinity_config
                    .and_then(|c| c.client_ip)
                    .and_then(|c| c.timeout_seconds),
                policies: (!s.policies.is_empty()).then(|| Box::new(s.policies)),
            }),
        }
    }
}

/// `Some(map)` of `pairs`, `None` when there are none.
fn map_of(pairs: &[(String, String)]) -> Option<BTreeMap<String, String>> {
    (!pairs.is_empty()).then(|| pairs.iter().cloned().collect())
}

impl CompactService {
    /// The API type with the kept fields, for the rules shared with the
    /// manifest source (built per use: it lives only while one Service is
    /// turned into entries).
    pub fn to_api(&self) -> Service {
        Service {
            metadata: ObjectMeta {
                labels: map_of(&self.labels),
                ..self.metadata.clone()
            },
            spec: self.spec.as_ref().map(|s| {
                let policies = s.policies.as_deref().cloned().unwrap_or_default();
                ServiceSpec {
                    type_: s.type_.clone(),
                    cluster_ip: s.cluster_ip.clone(),
                    ports: s.ports.clone(),
                    selector: map_of(&s.selector),
                    session_affinity: s.session_affinity.clone(),
                    session_affinity_config: s.affinity_timeout.map(|timeout| SessionAffinityConfig {
                        client_ip: Some(ClientIPConfig {
                            timeout_seconds: Some(timeout),
                        }),
                    }),
                    internal_traffic_policy: policies.internal_traffic_policy,
                    external_traffic_policy: policies.external_traffic_policy,
                    traffic_distribution: policies.traffic_distribution,
                    external_ips: policies.external_ips,
                    ..ServiceSpec::default()
                }
            }),
            status: None,
        }
    }
}

/// An EndpointSlice as the proxy sees it. Of its labels only the Service's
/// name is kept (a label map costs half a kilobyte even with one entry).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(from = "SliceFields")]
pub struct CompactSlice {
    pub metadata: ObjectMeta,
    service_name: Option<String>,
    address_type: String,
    ports: Option<Vec<EndpointPort>>,
    endpoints: Option<Vec<CompactEndpoint>>,
    /// `endpoints.kubernetes.io/last-change-trigger-time`, if set and an
    /// RFC 3339 time.
    trigger_time: Option<SystemTime>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SliceFields {
    #[serde(default)]
    metadata: MetaFields,
    #[serde(default)]
    address_type: String,
    #[serde(default)]
    ports: Option<Vec<EndpointPort>>,
    #[serde(default)]
    endpoints: Option<Vec<CompactEndpoint>>,
}

impl From<SliceFields> for CompactSlice {
    fn from(mut fields: SliceFields) -> Self {
        let service_name = fields
            .metadata
            .labels
            .take()
            .and_then(|mut labels| labels.remove(SERVICE_NAME_LABEL));
        // As kube-proxy's `getLastChangeTriggerTime`: an unparsable value is
        // as none.
        let trigger_time = fields
            .metadata
            .annotations
            .take()
            .and_then(|a| a.trigger_time)
            .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
            .map(SystemTime::from);
        CompactSlice {
            metadata: fields.metadata.into(),
            service_name,
            address_type: fields.address_type,
            ports: fields.ports,
            endpoints: fields.endpoints,
            trigger_time,
        }
    }
}

impl CompactSlice {
    /// The Service it belongs to: its `kubernetes.io/service-name` label.
    pub fn service_name(&self) -> Option<&str> {
        self.service_name.as_deref()
    }

    /// When the change this version of the slice reflects happened
    /// (`endpoints.kubernetes.io/last-change-trigger-time`).
    pub fn trigger_time(&self) -> Option<SystemTime> {
        self.trigger_time
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CompactEndpoint {
    /// Only the first address is used (as kube-proxy does); all are kept so
    /// the object reads as it was written.
    #[serde(default)]
    addresses: Vec<String>,
    conditions: Option<EndpointConditions>,
    node_name: Option<String>,
    zone: Option<String>,
    hints: Option<EndpointHints>,
}

impl SliceView for CompactSlice {
    fn address_type(&self) -> &str {
        &self.address_type
    }
    fn ports(&self) -> &[EndpointPort] {
        self.ports.as_deref().unwrap_or_default()
    }
    fn endpoints(&self) -> impl Iterator<Item = SliceEndpoint<'_>> {
        self.endpoints.iter().flatten().map(|ep| SliceEndpoint {
            address: ep.addresses.first().map(String::as_str),
            conditions: ep.conditions.as_ref(),
            node_name: ep.node_name.as_deref(),
            zone: ep.zone.as_deref(),
            hints: ep.hints.as_ref(),
        })
    }
}

macro_rules! namespaced_resource {
    ($type:ty, $kind:literal, $group:literal, $version:literal, $plural:literal) => {
        impl kube::Resource for $type {
            type DynamicType = ();
            type Scope = NamespaceResourceScope;
            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

namespaced_resource!(CompactService, "Service", "", "v1", "services");
namespaced_resource!(
    CompactSlice,
    "EndpointSlice",
    "discovery.k8s.io",
    "v1",
    "endpointslices"
);

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::Resource;

    use super::*;
    use crate::model::Protocol;
    use crate::source::endpoints::slice_candidates;

    const SERVICE: &str = r#"{
      "apiVersion": "v1", "kind": "Service",
      "metadata": {"name": "web", "namespace": "shop", "uid": "u1", "resourceVersion": "7",
                   "labels": {"app": "web"}, "annotations": {"a": "b"},
                   "creationTimestamp": "2026-11-27T00:00:00Z",
                   "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
      "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
               "selector": {"app": "web"}, "sessionAffinity": "ClientIP",
               "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
               "externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local",
               "trafficDistribution": "PreferClose", "externalIPs": ["192.0.2.1"],
               "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web", "nodePort": 30080}]},
      "status": {"loadBalancer": {}}
    }"#;

    const SLICE: &str = r#"{
      "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
      "metadata": {"name": "web-abc", "namespace": "shop", "resourceVersion": "8",
                   "labels": {"kubernetes.io/service-name": "web"},
                   "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-11-27T10:00:01Z",
                                   "other": "x"}},
      "addressType": "IPv4",
      "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
      "endpoints": [
        {"addresses": ["10.244.1.5"], "conditions": {"ready": true, "serving": true, "terminating": false},
         "nodeName": "n1", "zone": "a", "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop"},
         "hints": {"forZones": [{"name": "a"}], "forNodes": [{"name": "n1"}]}},
        {"addresses": ["10.244.2.6"], "conditions": {"ready": false, "serving": true, "terminating": true}}
      ]
    }"#;

    #[test]
    fn a_compact_service_keeps_what_the_rules_read() {
        let compact: CompactService = serde_json::from_str(SERVICE).expect("parses");
        let full: Service = serde_json::from_str(SERVICE).expect("parses");
        let api = compact.to_api();
        let spec = api.spec.as_ref().expect("spec");
        let want = full.spec.as_ref().expect("spec");
        assert_eq!(spec.type_, want.type_, "type");
        assert_eq!(spec.cluster_ip, want.cluster_ip, "clusterIP");
        assert_eq!(spec.ports, want.ports, "ports");
        assert_eq!(spec.selector, want.selector, "selector");
        assert_eq!(spec.session_affinity, want.session_affinity, "sessionAffinity");
        assert_eq!(
            spec.session_affinity_config, want.session_affinity_config,
            "sessionAffinityConfig"
        );
        assert_eq!(
            crate::source::endpoints::client_ip_affinity(&api),
            Some(crate::model::ClientIpAffinity { timeout_seconds: 600 }),
            "the affinity the datapath gets"
        );
        assert_eq!(
            spec.internal_traffic_policy, want.internal_traffic_policy,
            "internalTrafficPolicy"
        );
        assert_eq!(
            spec.external_traffic_policy, want.external_traffic_policy,
            "externalTrafficPolicy"
        );
        assert_eq!(
            spec.traffic_distribution, want.traffic_distribution,
            "trafficDistribution"
        );
        assert_eq!(spec.external_ips, want.external_ips, "externalIPs");
        assert_eq!(api.metadata.labels, full.metadata.labels, "labels");
        let meta = compact.meta();
        assert_eq!(meta.name.as_deref(), Some("web"), "name");
        assert_eq!(meta.namespace.as_deref(), Some("shop"), "namespace");
        assert_eq!(
            meta.resource_version.as_deref(),
            Some("7"),
            "resourceVersion (watch bookkeeping)"
        );
        assert_eq!(meta.uid.as_deref(), Some("u1"), "uid");
        assert_eq!(
            meta.creation_timestamp, full.metadata.creation_timestamp,
            "creationTimestamp (AGE)"
        );
        assert_eq!(meta.annotations, None, "annotations are not kept");
        assert_eq!(meta.managed_fields, None, "managedFields are not kept");
        assert_eq!(
            <CompactService as Resource>::url_path(&(), Some("shop")),
            "/api/v1/namespaces/shop/services"
        );
    }

    #[test]
    fn a_compact_slice_gives_the_same_candidates_as_the_full_one() {
        let compact: CompactSlice = serde_json::from_str(SLICE).expect("parses");
        let full: EndpointSlice = serde_json::from_str(SLICE).expect("parses");
        assert_eq!(
            slice_candidates("http", Protocol::Tcp, &[&compact]),
            slice_candidates("http", Protocol::Tcp, &[&full]),
            "candidates from the compact and the full slice"
        );
        assert_eq!(
            slice_candidates("http", Protocol::Tcp, &[&compact]).len(),
            2,
            "both endpoints are candidates"
        );
        assert_eq!(compact.service_name(), Some("web"), "the Service's name label");
        assert_eq!(
            compact.trigger_time(),
            Some(SystemTime::from(
                "2026-11-27T10:00:01Z"
                    .parse::<k8s_openapi::jiff::Timestamp>()
                    .expect("a time")
            )),
            "the trigger time annotation"
        );
        assert_eq!(compact.meta().annotations, None, "no annotation map is kept");
        for (annotation, why) in [("", "absent"), ("\"yesterday\"", "not a time")] {
            let json = SLICE.replace(
                "\"2026-11-27T10:00:01Z\"",
                if annotation.is_empty() { "null" } else { annotation },
            );
            let slice: CompactSlice = serde_json::from_str(&json).expect("parses");
            assert_eq!(slice.trigger_time(), None, "trigger time {why}");
        }
        assert_eq!(compact.meta().name.as_deref(), Some("web-abc"), "name");
        assert_eq!(
            compact.meta().resource_version.as_deref(),
            Some("8"),
            "resourceVersion"
        );
        assert_eq!(
            <CompactSlice as Resource>::url_path(&(), None),
            "/apis/discovery.k8s.io/v1/endpointslices"
        );
    }
}
