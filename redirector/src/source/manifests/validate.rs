//! What the API server would reject: the checks a manifest passes before its
//! objects are used.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::read::Object;

/// One thing Kubernetes would reject.
#[derive(Debug)]
pub(super) struct Problem {
    /// The field's path, such as `spec.ports[0].port`.
    pub field: String,
    pub reason: String,
}

/// What Kubernetes would reject in `object`; none when it is valid.
pub(super) fn problems(object: &Object) -> Vec<Problem> {
    let mut problems = Problems::default();
    if object.metadata().name.as_deref().is_none_or(str::is_empty) {
        problems.push("metadata.name", "is required".to_owned());
    }
    match object {
        Object::Service(service) => validate_service(service, &mut problems),
        Object::Pod(pod) => validate_pod(pod, &mut problems),
        Object::Endpoints(endpoints) => validate_endpoints(endpoints, &mut problems),
        Object::EndpointSlice(slice) => validate_slice(slice, &mut problems),
        // Only its name and labels are read; any value of either is valid.
        Object::Node(_) => {}
    }
    problems.0
}

/// Validation failures of one object.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, reason: String) {
        self.0.push(Problem {
            field: field.into(),
            reason,
        });
    }

    fn port(&mut self, field: String, port: i32) {
        if !(1..=65535).contains(&port) {
            self.push(field, format!("must be between 1 and 65535, got {port}"));
        }
    }

    fn protocol(&mut self, field: String, protocol: Option<&str>) {
        match protocol {
            None | Some("TCP" | "UDP" | "SCTP") => {}
            Some(other) => self.push(field, format!("must be TCP, UDP or SCTP, got {other:?}")),
        }
    }

    fn ip(&mut self, field: String, ip: &str) {
        if ip.parse::<IpAddr>().is_err() {
            self.push(field, format!("must be an IP address, got {ip:?}"));
        }
    }
}

/// Kubernetes' IANA_SVC_NAME: what a named targetPort must look like.
fn is_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

/// The API server's bound on `sessionAffinityConfig.clientIP.timeoutSeconds`.
const MAX_AFFINITY_TIMEOUT_SECONDS: i32 = 86_400;

fn validate_service(service: &Service, problems: &mut Problems) {
    let Some(spec) = &service.spec else { return };
    if let Some(t) = spec.type_.as_deref()
        && !matches!(t, "ClusterIP" | "NodePort" | "LoadBalancer" | "ExternalName")
    {
        problems.push(
            "spec.type",
            format!("must be ClusterIP, NodePort, LoadBalancer or ExternalName, got {t:?}"),
        );
    }
    if let Some(ip) = spec.cluster_ip.as_deref()
        && !ip.is_empty()
        && ip != "None"
        && ip.parse::<IpAddr>().is_err()
    {
        problems.push(
            "spec.clusterIP",
            format!("must be an IP address, \"None\" or empty, got {ip:?}"),
        );
    }
    if let Some(affinity) = spec.session_affinity.as_deref()
        && !matches!(affinity, "None" | "ClientIP")
    {
        problems.push(
            "spec.sessionAffinity",
            format!("must be None or ClientIP, got {affinity:?}"),
        );
    }
    if let Some(timeout) = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        && !(1..=MAX_AFFINITY_TIMEOUT_SECONDS).contains(&timeout)
    {
        problems.push(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
            format!("must be between 1 and {MAX_AFFINITY_TIMEOUT_SECONDS} (a day), got {timeout}"),
        );
    }
    for (field, value, allowed) in [
        (
            "spec.internalTrafficPolicy",
            &spec.internal_traffic_policy,
            &["Cluster", "Local"][..],
        ),
        (
            "spec.externalTrafficPolicy",
            &spec.external_traffic_policy,
            &["Cluster", "Local"][..],
        ),
        (
            "spec.trafficDistribution",
            &spec.traffic_distribution,
            &["PreferClose", "PreferSameZone", "PreferSameNode"][..],
        ),
    ] {
        if let Some(value) = value
            && !allowed.contains(&value.as_str())
        {
            problems.push(
                field,
                format!("must be one of {}, got {value:?}", allowed.join(", ")),
            );
        }
    }
    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    for (i, port) in ports.iter().enumerate() {
        let at = |field: &str| format!("spec.ports[{i}].{field}");
        problems.port(at("port"), port.port);
        problems.protocol(at("protocol"), port.protocol.as_deref());
        match &port.target_port {
            // Kubernetes defaults 0 and "" to `port`.
            None | Some(IntOrString::Int(0)) => {}
            Some(IntOrString::Int(n)) => problems.port(at("targetPort"), *n),
            Some(IntOrString::String(s)) if s.is_empty() || is_port_name(s) => {}
            Some(IntOrString::String(s)) => problems.push(
                at("targetPort"),
                format!("must be a port number or a port name (up to 15 lowercase letters, digits and '-'), got {s:?}"),
            ),
        }
        let name = port.name.as_deref().unwrap_or("");
        if ports.len() > 1 && name.is_empty() {
            problems.push(
                at("name"),
                "is required when a Service has more than one port".to_owned(),
            );
        } else if !names.insert(name) {
            problems.push(at("name"), format!("duplicate port name {name:?}"));
        }
        let protocol = port.protocol.as_deref().unwrap_or("TCP");
        if !numbers.insert((port.port, protocol)) {
            problems.push(at("port"), format!("duplicate port {}/{protocol}", port.port));
        }
    }
}

fn validate_pod(pod: &Pod, problems: &mut Problems) {
    for (i, container) in pod.spec.iter().flat_map(|s| &s.containers).enumerate() {
        for (j, port) in container.ports.iter().flatten().enumerate() {
            let at = |field: &str| format!("spec.containers[{i}].ports[{j}].{field}");
            problems.port(at("containerPort"), port.container_port);
            problems.protocol(at("protocol"), port.protocol.as_deref());
        }
    }
    let Some(status) = &pod.status else { return };
    if let Some(ip) = status.pod_ip.as_deref() {
        problems.ip("status.podIP".to_owned(), ip);
    }
    for (i, ip) in status.pod_ips.iter().flatten().enumerate() {
        problems.ip(format!("status.podIPs[{i}].ip"), &ip.ip);
    }
}

fn validate_endpoints(endpoints: &Endpoints, problems: &mut Problems) {
    for (i, subset) in endpoints.subsets.iter().flatten().enumerate() {
        for (j, address) in subset.addresses.iter().flatten().enumerate() {
            problems.ip(format!("subsets[{i}].addresses[{j}].ip"), &address.ip);
        }
        for (j, address) in subset.not_ready_addresses.iter().flatten().enumerate() {
            problems.ip(format!("subsets[{i}].notReadyAddresses[{j}].ip"), &address.ip);
        }
        for (j, port) in subset.ports.iter().flatten().enumerate() {
            problems.port(format!("subsets[{i}].ports[{j}].port"), port.port);
            problems.protocol(
                format!("subsets[{i}].ports[{j}].protocol"),
                port.protocol.as_deref(),
            );
        }
    }
}

fn validate_slice(slice: &EndpointSlice, problems: &mut Problems) {
    let parses: fn(&str) -> bool = match slice.address_type.as_str() {
        "IPv4" => |a| a.parse::<Ipv4Addr>().is_ok(),
        "IPv6" => |a| a.parse::<Ipv6Addr>().is_ok(),
        "FQDN" => |_| true,
        other => {
            problems.push(
                "addressType",
                format!("must be IPv4, IPv6 or FQDN, got {other:?}"),
            );
            |_| true
        }
    };
    for (i, endpoint) in slice.endpoints.iter().flatten().enumerate() {
        if endpoint.addresses.is_empty() {
            problems.push(
                format!("endpoints[{i}].addresses"),
                "must hold at least one address".to_owned(),
            );
        }
        for (j, address) in endpoint.addresses.iter().enumerate() {
            if !parses(address) {
                problems.push(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("must be an {} address, got {address:?}", slice.address_type),
                );
            }
        }
    }
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        if let Some(number) = port.port {
            problems.port(format!("ports[{i}].port"), number);
        }
        problems.protocol(format!("ports[{i}].protocol"), port.protocol.as_deref());
    }
}
