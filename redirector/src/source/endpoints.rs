//! kube-proxy's endpoint rules, in one place for every source.
//!
//! A Service port is programmed with the endpoints kube-proxy would use: the
//! ready ones, or, only while none is ready, the ones that are terminating but
//! still serving (so connections drain gracefully instead of being refused).
//! Candidates come from EndpointSlices (a live cluster) or from whatever a
//! source derives them from (Pods, legacy Endpoints in manifest files).

use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{Service, ServicePort as K8sServicePort};
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{Endpoint, Frontend, Protocol, ServiceInfo, ServicePort, ServicePortName};

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The label the EndpointSlice controller puts on the slices it owns (and
/// rewrites from Pods, so hand-written copies of them do not count).
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The EndpointSlice controller, as [`MANAGED_BY_LABEL`] names it.
pub const SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// Namespace of an object whose manifest leaves it out, as `kubectl apply` does.
pub const DEFAULT_NAMESPACE: &str = "default";

/// An endpoint's state, as in discovery/v1 `EndpointConditions`: `None` means
/// "unknown", which counts as ready/serving and as not terminating.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conditions {
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
}

impl Conditions {
    pub fn is_ready(&self) -> bool {
        self.ready.unwrap_or(true)
    }

    pub fn is_serving(&self) -> bool {
        self.serving.unwrap_or(true)
    }

    pub fn is_terminating(&self) -> bool {
        self.terminating.unwrap_or(false)
    }
}

impl From<&EndpointConditions> for Conditions {
    fn from(c: &EndpointConditions) -> Self {
        Self {
            ready: c.ready,
            serving: c.serving,
            terminating: c.terminating,
        }
    }
}

/// One possible endpoint of a service port, with its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub endpoint: Endpoint,
    pub conditions: Conditions,
}

/// The endpoints new flows may use: the ready candidates; only when none is
/// ready, the serving-and-terminating ones; never the others. Sorted, without
/// duplicates.
pub fn select_endpoints(candidates: &[Candidate]) -> Vec<Endpoint> {
    let pick = |keep: fn(&Conditions) -> bool| {
        let mut chosen: Vec<Endpoint> = candidates
            .iter()
            .filter(|c| keep(&c.conditions))
            .map(|c| c.endpoint)
            .collect();
        chosen.sort_unstable();
        chosen.dedup();
        chosen
    };
    let ready = pick(Conditions::is_ready);
    if !ready.is_empty() {
        return ready;
    }
    pick(|c| c.is_serving() && c.is_terminating())
}

/// Kubernetes' protocol spelling to ours; absent means TCP. `None` for
/// protocols the datapath does not handle (SCTP) or does not know.
pub fn parse_protocol(protocol: Option<&str>) -> Option<Protocol> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// A port number from the API (an `i32`), if it is a usable port.
pub fn port_number(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&p| p != 0)
}

/// A Service port the datapath can program (TCP or UDP, valid number).
#[derive(Clone, Copy, Debug)]
pub struct ProgrammablePort<'a> {
    pub spec: &'a K8sServicePort,
    /// The port's `name`, empty when unnamed.
    pub name: &'a str,
    pub port: u16,
    pub protocol: Protocol,
}

/// The Service's ports the datapath can program, in spec order.
pub fn programmable_ports(service: &Service) -> impl Iterator<Item = ProgrammablePort<'_>> {
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    ports.iter().filter_map(|spec| {
        Some(ProgrammablePort {
            spec,
            name: spec.name.as_deref().unwrap_or(""),
            port: port_number(spec.port)?,
            protocol: parse_protocol(spec.protocol.as_deref())?,
        })
    })
}

/// What a Service's `spec.clusterIP` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterIp {
    /// Headless (`None`) or `type: ExternalName`: there is no virtual IP to program.
    NoVirtualIp,
    /// Not set: the API server (or the manifest source) allocates one.
    Unset,
    V4(Ipv4Addr),
    /// IPv6, which the datapath does not handle.
    V6(String),
    /// Not an address at all.
    Invalid(String),
}

pub fn cluster_ip(service: &Service) -> ClusterIp {
    let Some(spec) = service.spec.as_ref() else {
        return ClusterIp::Unset;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return ClusterIp::NoVirtualIp;
    }
    match spec.cluster_ip.as_deref() {
        None | Some("") => ClusterIp::Unset,
        Some("None") => ClusterIp::NoVirtualIp,
        Some(ip) => match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => ClusterIp::V4(v4),
            Ok(IpAddr::V6(_)) => ClusterIp::V6(ip.to_owned()),
            Err(_) => ClusterIp::Invalid(ip.to_owned()),
        },
    }
}

/// `metadata.namespace`, defaulted.
pub fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|ns| !ns.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}

/// Whether `slice` belongs to the Service `namespace/name`.
pub fn slice_belongs_to(slice: &EndpointSlice, namespace: &str, name: &str) -> bool {
    namespace_of(&slice.metadata) == namespace
        && slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(String::as_str)
            == Some(name)
}

/// What [`slice_candidates`] reads of an EndpointSlice, so the API type and
/// the watch cache's compact copy share one rule.
pub trait SliceView {
    /// `addressType`.
    fn address_type(&self) -> &str;
    /// `ports`.
    fn ports(&self) -> &[EndpointPort];
    /// Each endpoint's first address and its conditions.
    fn endpoints(&self) -> impl Iterator<Item = (Option<&str>, Option<&EndpointConditions>)>;
}

impl SliceView for EndpointSlice {
    fn address_type(&self) -> &str {
        &self.address_type
    }
    fn ports(&self) -> &[EndpointPort] {
        self.ports.as_deref().unwrap_or_default()
    }
    fn endpoints(&self) -> impl Iterator<Item = (Option<&str>, Option<&EndpointConditions>)> {
        self.endpoints
            .iter()
            .flatten()
            .map(|ep| (ep.addresses.first().map(String::as_str), ep.conditions.as_ref()))
    }
}

/// Candidates for the service port called `port_name` (empty when unnamed)
/// from `slices`, which should all belong to the Service. Slice ports match by
/// name and protocol; an endpoint uses its first address, as kube-proxy does.
pub fn slice_candidates<S: SliceView>(port_name: &str, protocol: Protocol, slices: &[&S]) -> Vec<Candidate> {
    let mut out = Vec::new();
    for slice in slices.iter().filter(|s| s.address_type() == "IPv4") {
        let matching = slice.ports().iter().filter(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && parse_protocol(p.protocol.as_deref()) == Some(protocol)
        });
        // A port without a number means "all ports", which a service port
        // cannot map to; kube-proxy skips it too.
        for port in matching.filter_map(|p| p.port.and_then(port_number)) {
            for (address, conditions) in slice.endpoints() {
                let Some(addr) = address.and_then(|a| a.parse::<Ipv4Addr>().ok()) else {
                    continue;
                };
                out.push(Candidate {
                    endpoint: Endpoint { addr, port },
                    conditions: conditions.map(Conditions::from).unwrap_or_default(),
                });
            }
        }
    }
    out
}

/// Datapath entries for `service` at `cluster_ip`, one per programmable port,
/// with endpoints selected from `candidates_for(port)`. A port without
/// endpoints is still listed, with none, so the datapath refuses it.
pub fn entries_with<'a>(
    service: &'a Service,
    cluster_ip: Ipv4Addr,
    mut candidates_for: impl FnMut(&ProgrammablePort<'a>) -> Vec<Candidate>,
) -> Vec<(Frontend, ServicePort)> {
    let namespace = namespace_of(&service.metadata);
    let name = service.metadata.name.as_deref().unwrap_or("");
    programmable_ports(service)
        .map(|port| {
            let frontend = Frontend {
                addr: cluster_ip,
                port: port.port,
                protocol: port.protocol,
            };
            let service_port = ServicePort {
                name: ServicePortName {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    port: port.name.to_owned(),
                },
                endpoints: select_endpoints(&candidates_for(&port)),
                info: service_info(service, &port),
            };
            (frontend, service_port)
        })
        .collect()
}

/// What `redirector describe` shows about one port of `service`.
pub fn service_info(service: &Service, port: &ProgrammablePort<'_>) -> ServiceInfo {
    let spec = service.spec.as_ref();
    let target_port = match &port.spec.target_port {
        Some(IntOrString::Int(n)) if *n != 0 => n.to_string(),
        Some(IntOrString::String(s)) if !s.is_empty() => s.clone(),
        _ => port.port.to_string(),
    };
    ServiceInfo {
        labels: service.metadata.labels.clone().unwrap_or_default(),
        selector: spec.and_then(|s| s.selector.clone()).filter(|s| !s.is_empty()),
        service_type: spec
            .and_then(|s| s.type_.clone())
            .unwrap_or_else(|| "ClusterIP".into()),
        session_affinity: spec
            .and_then(|s| s.session_affinity.clone())
            .unwrap_or_else(|| "None".into()),
        target_port,
        port_index: spec
            .and_then(|s| s.ports.as_ref())
            .and_then(|ports| ports.iter().position(|p| std::ptr::eq(p, port.spec)))
            .unwrap_or(0),
        created: service
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Datapath entries for `service` at `cluster_ip` from the EndpointSlices
    /// labelled with its name in its namespace (`slices` may hold others; they are
    /// ignored). Slices are merged, so ports split across slices all count.
    fn service_entries(
        service: &Service,
        cluster_ip: Ipv4Addr,
        slices: &[EndpointSlice],
    ) -> Vec<(Frontend, ServicePort)> {
        let namespace = namespace_of(&service.metadata);
        let name = service.metadata.name.as_deref().unwrap_or("");
        let own: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|s| slice_belongs_to(s, namespace, name))
            .collect();
        entries_with(service, cluster_ip, |port| {
            slice_candidates(port.name, port.protocol, &own)
        })
    }

    fn ep(last: u8, port: u16) -> Endpoint {
        Endpoint {
            addr: Ipv4Addr::new(10, 0, 0, last),
            port,
        }
    }

    fn cand(last: u8, ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>) -> Candidate {
        Candidate {
            endpoint: ep(last, 80),
            conditions: Conditions {
                ready,
                serving,
                terminating,
            },
        }
    }

    #[test]
    fn selection_rules() {
        let t = Some(true);
        let f = Some(false);
        let n = None;
        let cases: &[(&str, Vec<Candidate>, Vec<Endpoint>)] = &[
            ("no candidates", vec![], vec![]),
            (
                "ready ones are used",
                vec![cand(2, t, t, f), cand(1, t, t, f)],
                vec![ep(1, 80), ep(2, 80)],
            ),
            (
                "missing conditions count as ready",
                vec![cand(1, n, n, n)],
                vec![ep(1, 80)],
            ),
            (
                "terminating ones are ignored while some are ready",
                vec![cand(1, t, t, f), cand(2, f, t, t)],
                vec![ep(1, 80)],
            ),
            (
                "serving terminating ones when none is ready",
                vec![cand(1, f, t, t), cand(2, f, f, t), cand(3, f, n, t)],
                vec![ep(1, 80), ep(3, 80)],
            ),
            (
                "unready, not serving: never",
                vec![cand(1, f, f, f), cand(2, f, f, n)],
                vec![],
            ),
            (
                "unready, serving, not terminating: never",
                vec![cand(1, f, t, f), cand(2, f, t, n)],
                vec![],
            ),
            (
                "duplicates collapse",
                vec![cand(1, t, t, f), cand(1, n, n, n)],
                vec![ep(1, 80)],
            ),
        ];
        for (what, candidates, want) in cases {
            assert_eq!(&select_endpoints(candidates), want, "{what}");
        }
    }

    fn service(yaml: &str) -> Service {
        yaml_serde::from_str(yaml).expect("test Service parses")
    }

    fn slices(yaml: &str) -> Vec<EndpointSlice> {
        yaml_serde::Deserializer::from_str(yaml)
            .map(|doc| serde::Deserialize::deserialize(doc).expect("test EndpointSlice parses"))
            .collect()
    }

    const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports:
    - {name: http, port: 80, targetPort: 8080}
    - {name: dns, port: 53, protocol: UDP}
    - {name: sig, port: 9000, protocol: SCTP}
"#;

    const SLICES: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
  - {name: http, port: 8080, protocol: TCP}
endpoints:
  - addresses: [10.0.0.2, 10.0.0.200]
  - addresses: [10.0.0.1]
    conditions: {ready: true}
  - addresses: [10.0.0.3]
    conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-def
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
  - {name: dns, port: 5353, protocol: UDP}
  - {name: dns, port: 5354, protocol: TCP}
endpoints:
  - addresses: [10.0.0.4]
    conditions: {ready: false, serving: true, terminating: true}
  - addresses: [10.0.0.1]
    conditions: {ready: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: other
  namespace: shop
  labels: {kubernetes.io/service-name: other}
addressType: IPv4
ports: [{name: http, port: 1}]
endpoints: [{addresses: [10.9.9.9]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-elsewhere
  namespace: elsewhere
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 1}]
endpoints: [{addresses: [10.9.9.9]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-v6
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ["fd00::1"]}]
"#;

    #[test]
    fn service_entries_merge_slices_by_port_name() {
        let svc = service(SERVICE);
        let ip = Ipv4Addr::new(10, 96, 0, 10);
        // What an operator sees is checked elsewhere; here, what is forwarded.
        let got: Vec<_> = service_entries(&svc, ip, &slices(SLICES))
            .into_iter()
            .map(|(fe, port)| {
                (
                    fe,
                    ServicePort {
                        info: ServiceInfo::default(),
                        ..port
                    },
                )
            })
            .collect();
        let name = |port: &str| ServicePortName {
            namespace: "shop".into(),
            name: "web".into(),
            port: port.into(),
        };
        let want = vec![
            (
                Frontend {
                    addr: ip,
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                ServicePort {
                    name: name("http"),
                    endpoints: vec![ep(1, 8080), ep(2, 8080)],
                    info: ServiceInfo::default(),
                },
            ),
            (
                Frontend {
                    addr: ip,
                    port: 53,
                    protocol: Protocol::Udp,
                },
                ServicePort {
                    name: name("dns"),
                    endpoints: vec![ep(1, 5353)],
                    info: ServiceInfo::default(),
                },
            ),
        ];
        assert_eq!(
            got, want,
            "first address only, ready beats terminating, protocol and name must match, SCTP and foreign slices ignored"
        );
    }

    #[test]
    fn unnamed_ports_match_unnamed_slice_ports() {
        let svc = service(
            "apiVersion: v1\nkind: Service\nmetadata: {name: solo}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}",
        );
        let cases: &[(&str, &str, Vec<Endpoint>)] = &[
            ("name absent", "ports: [{port: 8080}]", vec![ep(1, 8080)]),
            ("name empty", "ports: [{name: '', port: 8080}]", vec![ep(1, 8080)]),
            ("name set", "ports: [{name: http, port: 8080}]", vec![]),
            ("port number absent", "ports: [{name: ''}]", vec![]),
        ];
        for (what, ports, want) in cases {
            let yaml = format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s\n  labels: {{kubernetes.io/service-name: solo}}\naddressType: IPv4\n{ports}\nendpoints: [{{addresses: [10.0.0.1]}}]\n"
            );
            let got = service_entries(&svc, Ipv4Addr::new(10, 96, 0, 1), &slices(&yaml));
            assert_eq!(got.len(), 1, "{what}: one entry for the one port");
            assert_eq!(&got[0].1.endpoints, want, "{what}");
            assert_eq!(got[0].1.name.namespace, "default", "{what}: namespace defaults");
            assert_eq!(got[0].1.name.port, "", "{what}: unnamed port");
        }
    }

    #[test]
    fn cluster_ip_classification() {
        let cases = [
            ("clusterIP: 10.96.0.5", ClusterIp::V4(Ipv4Addr::new(10, 96, 0, 5))),
            ("clusterIP: None", ClusterIp::NoVirtualIp),
            ("clusterIP: ''", ClusterIp::Unset),
            ("type: ClusterIP", ClusterIp::Unset),
            (
                "{type: ExternalName, externalName: example.com}",
                ClusterIp::NoVirtualIp,
            ),
            ("clusterIP: 'fd00::5'", ClusterIp::V6("fd00::5".into())),
            ("clusterIP: nope", ClusterIp::Invalid("nope".into())),
        ];
        for (spec, want) in cases {
            let svc = service(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec:\n  {spec}\n"
            ));
            assert_eq!(cluster_ip(&svc), want, "spec {spec}");
        }
    }
}
