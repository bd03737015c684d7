//! kube-proxy's endpoint rules, in one place for every source.
//!
//! A Service port is programmed with the endpoints kube-proxy would use on
//! this node (`pkg/proxy/topology.go`, `CategorizeEndpoints`):
//! - the ready ones, or, only while none is ready, the ones that are
//!   terminating but still serving (so connections drain gracefully instead
//!   of being refused);
//! - with `internalTrafficPolicy: Local`, only those on this node, with the
//!   same ready → serving-terminating fallback among them; when there are
//!   none here but some elsewhere, new flows are dropped, not refused;
//! - otherwise narrowed by topology hints: `hints.forNodes` when every ready
//!   endpoint has one and one names this node, else `hints.forZones` when
//!   every ready endpoint has one and one names this node's zone, else all.
//!
//! Candidates come from EndpointSlices (a live cluster) or from whatever a
//! source derives them from (Pods, legacy Endpoints in manifest files).

use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{Service, ServicePort as K8sServicePort};
use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointHints, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::{
    ClientIpAffinity, Endpoint, Frontend, NoEndpoints, NodeTopology, Protocol, ServiceInfo, ServicePort,
    ServicePortName, TopologyMode,
};

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The label the EndpointSlice controller puts on the slices it owns (and
/// rewrites from Pods, so hand-written copies of them do not count).
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The EndpointSlice controller, as [`MANAGED_BY_LABEL`] names it.
pub const SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// The Node label naming its zone: which zone hints a node follows, and the
/// `zone` the EndpointSlice controller gives the endpoints of its Pods.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

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

/// Where an endpoint runs, and whom the EndpointSlice controller hinted it
/// for (discovery/v1 `nodeName`, `zone`, `hints`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    pub node_name: Option<String>,
    pub zone: Option<String>,
    /// `hints.forZones[].name`.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`.
    pub node_hints: Vec<String>,
}

impl Placement {
    /// `nodeName` and `zone` as written, and the names of `hints`.
    pub fn new(node_name: Option<&str>, zone: Option<&str>, hints: Option<&EndpointHints>) -> Self {
        let hints = hints.cloned().unwrap_or_default();
        Self {
            node_name: node_name.map(str::to_owned),
            zone: zone.map(str::to_owned),
            zone_hints: hints.for_zones.into_iter().flatten().map(|z| z.name).collect(),
            node_hints: hints.for_nodes.into_iter().flatten().map(|n| n.name).collect(),
        }
    }
}

/// One possible endpoint of a service port, with its state and placement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub endpoint: Endpoint,
    pub conditions: Conditions,
    pub placement: Placement,
}

impl Candidate {
    /// Whether it runs on `node` (kube-proxy: `nodeName` equals a non-empty
    /// hostname).
    fn is_local(&self, node: &NodeTopology) -> bool {
        node.name
            .as_deref()
            .is_some_and(|name| !name.is_empty() && self.placement.node_name.as_deref() == Some(name))
    }

    fn is_serving_terminating(&self) -> bool {
        self.conditions.is_serving() && self.conditions.is_terminating()
    }
}

/// A Service's traffic policies as they bear on one of its ports
/// (kube-proxy's `ServicePort` `InternalPolicyLocal`, `ExternalPolicyLocal`,
/// `ExternallyAccessible`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficPolicies {
    /// `internalTrafficPolicy: Local`: traffic to the ClusterIP stays on its node.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`, for a port reachable from outside.
    pub external_local: bool,
    /// The port has a node port, or the Service external addresses.
    pub externally_accessible: bool,
}

impl TrafficPolicies {
    pub fn of(service: &Service, port: &K8sServicePort) -> Self {
        let spec = service.spec.as_ref();
        // kube-proxy counts load-balancer addresses too; they live in the
        // status, which the watch caches do not keep. A LoadBalancer
        // Service has node ports unless it opted out of them.
        let externally_accessible = port.node_port.is_some_and(|p| p != 0)
            || spec.is_some_and(|s| {
                s.type_.as_deref() == Some("LoadBalancer")
                    || s.external_ips.as_ref().is_some_and(|ips| !ips.is_empty())
            });
        let local = |policy: Option<&String>| policy.is_some_and(|p| p == "Local");
        Self {
            internal_local: local(spec.and_then(|s| s.internal_traffic_policy.as_ref())),
            external_local: externally_accessible
                && local(spec.and_then(|s| s.external_traffic_policy.as_ref())),
            externally_accessible,
        }
    }

    /// kube-proxy's `UsesClusterEndpoints`: traffic that may go anywhere
    /// (external traffic needs them even under a Local policy, for clients
    /// inside the cluster).
    fn uses_cluster(&self) -> bool {
        !self.internal_local || self.externally_accessible
    }

    /// kube-proxy's `UsesLocalEndpoints`.
    fn uses_local(&self) -> bool {
        self.internal_local || (self.external_local && self.externally_accessible)
    }
}

/// A service port's endpoints sorted by kube-proxy's rules for one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Categorized {
    /// For Cluster-policy traffic, topology applied; `None` when no traffic
    /// of the port uses the Cluster policy.
    pub cluster: Option<Vec<Endpoint>>,
    /// For Local-policy traffic: this node's; `None` when no traffic uses
    /// the Local policy.
    pub local: Option<Vec<Endpoint>>,
    /// Whether any endpoint anywhere could serve (ready, or serving and
    /// terminating), even if none is usable from this node.
    pub has_any: bool,
    /// The topology hints the Cluster set followed.
    pub topology: TopologyMode,
}

impl Categorized {
    /// What traffic to the ClusterIP uses (kube-proxy's internal traffic
    /// chain): the Local set under `internalTrafficPolicy: Local`, else the
    /// Cluster set; with none, DROP if endpoints exist elsewhere, else REJECT.
    pub fn internal(&self, policies: &TrafficPolicies) -> (Vec<Endpoint>, NoEndpoints) {
        let chosen = if policies.internal_local {
            &self.local
        } else {
            &self.cluster
        };
        let endpoints = chosen.clone().unwrap_or_default();
        let no_endpoints = if endpoints.is_empty() && self.has_any {
            NoEndpoints::Drop
        } else {
            NoEndpoints::Reject
        };
        (endpoints, no_endpoints)
    }
}

/// kube-proxy's `CategorizeEndpoints` for `node`. Candidates naming the same
/// endpoint count once: the first, unless a later one is local (the
/// EndpointSlice cache's rule).
pub fn categorize(candidates: &[Candidate], policies: &TrafficPolicies, node: &NodeTopology) -> Categorized {
    let mut unique: Vec<&Candidate> = Vec::with_capacity(candidates.len());
    for candidate in candidates {
        match unique.iter_mut().find(|c| c.endpoint == candidate.endpoint) {
            Some(seen) if candidate.is_local(node) => *seen = candidate,
            Some(_) => {}
            None => unique.push(candidate),
        }
    }
    let pick = |keep: &dyn Fn(&Candidate) -> bool| {
        let mut chosen: Vec<Endpoint> = unique.iter().filter(|c| keep(c)).map(|c| c.endpoint).collect();
        chosen.sort_unstable();
        chosen
    };
    let mut out = Categorized::default();
    if unique.is_empty() {
        return out;
    }
    if policies.uses_cluster() {
        let mode = topology_mode(&unique, node);
        let mut cluster = pick(&|c| c.conditions.is_ready() && available_for_topology(c, mode, node));
        // Topology never leaves the ready ones out altogether (the mode is
        // only chosen when some match), so nothing is ready anywhere.
        if cluster.is_empty() {
            cluster = pick(&Candidate::is_serving_terminating);
        }
        out.has_any = !cluster.is_empty();
        out.cluster = Some(cluster);
        out.topology = mode;
    }
    if policies.uses_local() {
        out.has_any |= unique
            .iter()
            .any(|c| c.conditions.is_ready() || c.is_serving_terminating());
        let local_ready = pick(&|c| c.is_local(node) && c.conditions.is_ready());
        out.local = Some(if local_ready.is_empty() {
            pick(&|c| c.is_local(node) && c.is_serving_terminating())
        } else {
            local_ready
        });
    }
    out
}

/// kube-proxy's `topologyModeFromHints`: node hints when every ready
/// endpoint has one and one names this node; else zone hints when every
/// ready endpoint has one and one names this node's zone; else none.
fn topology_mode(candidates: &[&Candidate], node: &NodeTopology) -> TopologyMode {
    let ready: Vec<&&Candidate> = candidates.iter().filter(|c| c.conditions.is_ready()).collect();
    if ready.is_empty() {
        return TopologyMode::None;
    }
    let names = |hints: &[String], name: Option<&str>| name.is_some_and(|n| hints.iter().any(|h| h == n));
    let all_have =
        |hints: fn(&Placement) -> &Vec<String>| ready.iter().all(|c| !hints(&c.placement).is_empty());
    let node_name = node.name.as_deref();
    if all_have(|p| &p.node_hints) && ready.iter().any(|c| names(&c.placement.node_hints, node_name)) {
        return TopologyMode::PreferSameNode;
    }
    let zone = node.zone.as_deref();
    if all_have(|p| &p.zone_hints) && ready.iter().any(|c| names(&c.placement.zone_hints, zone)) {
        return TopologyMode::PreferSameZone;
    }
    TopologyMode::None
}

/// kube-proxy's `availableForTopology`.
fn available_for_topology(candidate: &Candidate, mode: TopologyMode, node: &NodeTopology) -> bool {
    let named = |hints: &[String], name: &Option<String>| {
        name.as_deref().is_some_and(|n| hints.iter().any(|h| h == n))
    };
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => named(&candidate.placement.node_hints, &node.name),
        TopologyMode::PreferSameZone => named(&candidate.placement.zone_hints, &node.zone),
    }
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

/// What [`slice_candidates`] reads of one endpoint of an EndpointSlice.
#[derive(Clone, Copy, Debug)]
pub struct SliceEndpoint<'a> {
    /// The first address (kube-proxy uses only that one).
    pub address: Option<&'a str>,
    pub conditions: Option<&'a EndpointConditions>,
    pub node_name: Option<&'a str>,
    pub zone: Option<&'a str>,
    pub hints: Option<&'a EndpointHints>,
}

/// What [`slice_candidates`] reads of an EndpointSlice, so the API type and
/// the watch cache's compact copy share one rule.
pub trait SliceView {
    /// `addressType`.
    fn address_type(&self) -> &str;
    /// `ports`.
    fn ports(&self) -> &[EndpointPort];
    /// `endpoints`.
    fn endpoints(&self) -> impl Iterator<Item = SliceEndpoint<'_>>;
}

impl SliceView for EndpointSlice {
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
            for ep in slice.endpoints() {
                let Some(addr) = ep.address.and_then(|a| a.parse::<Ipv4Addr>().ok()) else {
                    continue;
                };
                out.push(Candidate {
                    endpoint: Endpoint { addr, port },
                    conditions: ep.conditions.map(Conditions::from).unwrap_or_default(),
                    placement: Placement::new(ep.node_name, ep.zone, ep.hints),
                });
            }
        }
    }
    out
}

/// Datapath entries for `service` at `cluster_ip`, one per programmable port,
/// with the endpoints `node` uses among `candidates_for(port)`. A port
/// without endpoints is still listed, with none, so the datapath refuses (or
/// drops) its traffic.
pub fn entries_with<'a>(
    service: &'a Service,
    cluster_ip: Ipv4Addr,
    node: &NodeTopology,
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
            let policies = TrafficPolicies::of(service, port.spec);
            let candidates = candidates_for(&port);
            let categorized = categorize(&candidates, &policies, node);
            let (endpoints, no_endpoints) = categorized.internal(&policies);
            let also_serving = also_serving(&candidates, &endpoints);
            let info = ServiceInfo {
                // The Local set ignores topology.
                topology: if policies.internal_local {
                    TopologyMode::None
                } else {
                    categorized.topology
                },
                node: node.name.clone(),
                zone: node.zone.clone(),
                no_local_endpoints: no_endpoints == NoEndpoints::Drop,
                affinity_timeout_seconds: client_ip_affinity(service).map(|a| a.timeout_seconds),
                ..service_info(service, &port)
            };
            let service_port = ServicePort {
                name: ServicePortName {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    port: port.name.to_owned(),
                },
                endpoints,
                also_serving,
                no_endpoints,
                affinity: client_ip_affinity(service),
                info,
            };
            (frontend, service_port)
        })
        .collect()
}

/// The serving endpoints among `candidates` that `chosen` (sorted) leaves
/// out, sorted and once each: those whose flows kube-proxy keeps.
fn also_serving(candidates: &[Candidate], chosen: &[Endpoint]) -> Vec<Endpoint> {
    let mut serving: Vec<Endpoint> = candidates
        .iter()
        .filter(|c| c.conditions.is_serving() && chosen.binary_search(&c.endpoint).is_err())
        .map(|c| c.endpoint)
        .collect();
    serving.sort_unstable();
    serving.dedup();
    serving
}

/// `sessionAffinity: ClientIP` and its timeout, as kube-proxy reads them (the
/// API server defaults the timeout; file mode gets the same default).
pub fn client_ip_affinity(service: &Service) -> Option<ClientIpAffinity> {
    let spec = service.spec.as_ref()?;
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .and_then(|t| u32::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(ClientIpAffinity::DEFAULT_TIMEOUT_SECONDS);
    Some(ClientIpAffinity {
        timeout_seconds: timeout,
    })
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
        internal_traffic_policy: spec.and_then(|s| s.internal_traffic_policy.clone()),
        external_traffic_policy: spec.and_then(|s| s.external_traffic_policy.clone()),
        traffic_distribution: spec.and_then(|s| s.traffic_distribution.clone()),
        ..ServiceInfo::default()
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
        entries_with(service, cluster_ip, &NodeTopology::default(), |port| {
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
            placement: Placement::default(),
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
        let cluster = TrafficPolicies::default();
        for (what, candidates, want) in cases {
            let (got, _) = categorize(candidates, &cluster, &NodeTopology::default()).internal(&cluster);
            assert_eq!(&got, want, "{what}");
        }
    }

    /// This node in the kube-proxy tables below.
    const NODE: &str = "node-1";

    /// An endpoint as kube-proxy's tests write one (`BaseEndpointInfo`):
    /// every condition false unless set.
    struct Ep(Candidate);

    fn at(addr: &str) -> Ep {
        let (ip, port) = addr.split_once(':').expect("ADDRESS:PORT");
        Ep(Candidate {
            endpoint: Endpoint {
                addr: ip.parse().expect("test address"),
                port: port.parse().expect("test port"),
            },
            conditions: Conditions {
                ready: Some(false),
                serving: Some(false),
                terminating: Some(false),
            },
            placement: Placement {
                node_name: Some("node-2".into()),
                ..Placement::default()
            },
        })
    }

    impl Ep {
        fn ready(mut self) -> Self {
            self.0.conditions.ready = Some(true);
            self.0.conditions.serving = Some(true);
            self
        }
        fn serving_terminating(mut self) -> Self {
            self.0.conditions.serving = Some(true);
            self.0.conditions.terminating = Some(true);
            self
        }
        fn local(mut self) -> Self {
            self.0.placement.node_name = Some(NODE.into());
            self
        }
        fn zones(mut self, zones: &[&str]) -> Self {
            self.0.placement.zone_hints = zones.iter().map(|z| (*z).to_owned()).collect();
            self
        }
        fn nodes(mut self, nodes: &[&str]) -> Self {
            self.0.placement.node_hints = nodes.iter().map(|n| (*n).to_owned()).collect();
            self
        }
    }

    struct Case {
        name: &'static str,
        zone: Option<&'static str>,
        policies: TrafficPolicies,
        endpoints: Vec<Ep>,
        cluster: Option<&'static [&'static str]>,
        local: Option<&'static [&'static str]>,
        has_any: bool,
    }

    const CLUSTER: TrafficPolicies = TrafficPolicies {
        internal_local: false,
        external_local: false,
        externally_accessible: false,
    };
    const ITP_LOCAL: TrafficPolicies = TrafficPolicies {
        internal_local: true,
        ..CLUSTER
    };
    /// A node port with externalTrafficPolicy: Local.
    const ETP_LOCAL: TrafficPolicies = TrafficPolicies {
        external_local: true,
        externally_accessible: true,
        ..CLUSTER
    };
    const NODE_PORT: TrafficPolicies = TrafficPolicies {
        externally_accessible: true,
        ..CLUSTER
    };

    /// kube-proxy's `TestCategorizeEndpoints` (pkg/proxy/topology_test.go),
    /// as of the release where hints are followed whatever the Service's
    /// annotations say, plus the node-hint cases of PreferSameNode.
    #[test]
    fn categorize_follows_kube_proxy() {
        let zone_a = Some("zone-a");
        let four_zoned = || {
            vec![
                at("10.1.2.3:80").zones(&["zone-a"]).ready(),
                at("10.1.2.4:80").zones(&["zone-b"]).ready(),
                at("10.1.2.5:80").zones(&["zone-c"]).ready(),
                at("10.1.2.6:80").zones(&["zone-a"]).ready(),
            ]
        };
        let cases = vec![
            Case {
                name: "zone hints: this zone's endpoints",
                zone: zone_a,
                policies: CLUSTER,
                endpoints: four_zoned(),
                cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "externalTrafficPolicy: Local, topology ignored for Local endpoints",
                zone: zone_a,
                policies: ETP_LOCAL,
                endpoints: vec![
                    at("10.1.2.3:80").zones(&["zone-a"]).ready().local(),
                    at("10.1.2.4:80").zones(&["zone-b"]).ready().local(),
                    at("10.1.2.5:80").zones(&["zone-c"]).ready(),
                    at("10.1.2.6:80").zones(&["zone-a"]).ready(),
                ],
                cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
                local: Some(&["10.1.2.3:80", "10.1.2.4:80"]),
                has_any: true,
            },
            Case {
                name: "internalTrafficPolicy: Local, topology ignored for Local endpoints",
                zone: zone_a,
                policies: TrafficPolicies {
                    internal_local: true,
                    ..NODE_PORT
                },
                endpoints: vec![
                    at("10.1.2.3:80").zones(&["zone-a"]).ready().local(),
                    at("10.1.2.4:80").zones(&["zone-b"]).ready().local(),
                    at("10.1.2.5:80").zones(&["zone-c"]).ready(),
                    at("10.1.2.6:80").zones(&["zone-a"]).ready(),
                ],
                cluster: Some(&["10.1.2.3:80", "10.1.2.6:80"]),
                local: Some(&["10.1.2.3:80", "10.1.2.4:80"]),
                has_any: true,
            },
            Case {
                name: "node without a zone label: no filtering",
                zone: None,
                policies: CLUSTER,
                endpoints: vec![at("10.1.2.3:80").zones(&["zone-a"]).ready()],
                cluster: Some(&["10.1.2.3:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "empty zone label: no filtering",
                zone: Some(""),
                policies: CLUSTER,
                endpoints: vec![at("10.1.2.3:80").zones(&["zone-a"]).ready()],
                cluster: Some(&["10.1.2.3:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "node in a different zone: no filtering",
                zone: Some("zone-b"),
                policies: CLUSTER,
                endpoints: vec![at("10.1.2.3:80").zones(&["zone-a"]).ready()],
                cluster: Some(&["10.1.2.3:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "unready endpoint",
                zone: zone_a,
                policies: CLUSTER,
                endpoints: vec![
                    at("10.1.2.3:80").zones(&["zone-a"]).ready(),
                    at("10.1.2.4:80").zones(&["zone-b"]).ready(),
                    at("10.1.2.5:80").zones(&["zone-c"]).ready(),
                    at("10.1.2.6:80").zones(&["zone-a"]),
                ],
                cluster: Some(&["10.1.2.3:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "only unready endpoints in this zone: no filtering",
                zone: zone_a,
                policies: CLUSTER,
                endpoints: vec![
                    at("10.1.2.3:80").zones(&["zone-a"]),
                    at("10.1.2.4:80").zones(&["zone-b"]).ready(),
                    at("10.1.2.5:80").zones(&["zone-c"]).ready(),
                    at("10.1.2.6:80").zones(&["zone-a"]),
                ],
                cluster: Some(&["10.1.2.4:80", "10.1.2.5:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "a ready endpoint without hints: no filtering",
                zone: zone_a,
                policies: CLUSTER,
                endpoints: vec![
                    at("10.1.2.3:80").zones(&["zone-a"]).ready(),
                    at("10.1.2.4:80").zones(&["zone-b"]).ready(),
                    at("10.1.2.5:80").ready(),
                    at("10.1.2.6:80").zones(&["zone-a"]).ready(),
                ],
                cluster: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.5:80", "10.1.2.6:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "multiple hints per endpoint: any naming this zone",
                zone: Some("zone-c"),
                policies: CLUSTER,
                endpoints: vec![
                    at("10.1.2.3:80").zones(&["zone-a", "zone-b", "zone-c"]).ready(),
                    at("10.1.2.4:80").zones(&["zone-b", "zone-c"]).ready(),
                    at("10.1.2.5:80").zones(&["zone-b", "zone-d"]).ready(),
                    at("10.1.2.6:80").zones(&["zone-c"]).ready(),
                ],
                cluster: Some(&["10.1.2.3:80", "10.1.2.4:80", "10.1.2.6:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "conflicting topology and localness",
                zone: zone_a,
                policies: ETP_LOCAL,
                endpoints: vec![
                    at("10.0.0.0:80").zones(&["zone-a"]).ready().local(),
                    at("10.0.0.1:80").zones(&["zone-b"]).ready().local(),
                    at("10.0.0.2:80").zones(&["zone-a"]).ready(),
                    at("10.0.0.3:80").zones(&["zone-b"]).ready(),
                ],
                cluster: Some(&["10.0.0.0:80", "10.0.0.2:80"]),
                local: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                has_any: true,
            },
            Case {
                name: "internalTrafficPolicy: Local, no endpoints",
                zone: None,
                policies: ITP_LOCAL,
                endpoints: vec![],
                cluster: None,
                local: None,
                has_any: false,
            },
            Case {
                name: "internalTrafficPolicy: Local, all endpoints remote",
                zone: None,
                policies: ITP_LOCAL,
                endpoints: vec![at("10.0.0.0:80").ready(), at("10.0.0.1:80").ready()],
                cluster: None,
                local: Some(&[]),
                has_any: true,
            },
            Case {
                name: "internalTrafficPolicy: Local, all endpoints local",
                zone: None,
                policies: ITP_LOCAL,
                endpoints: vec![
                    at("10.0.0.0:80").ready().local(),
                    at("10.0.0.1:80").ready().local(),
                ],
                cluster: None,
                local: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                has_any: true,
            },
            Case {
                name: "internalTrafficPolicy: Local, some endpoints local",
                zone: None,
                policies: ITP_LOCAL,
                endpoints: vec![at("10.0.0.0:80").ready().local(), at("10.0.0.1:80").ready()],
                cluster: None,
                local: Some(&["10.0.0.0:80"]),
                has_any: true,
            },
            Case {
                name: "Cluster policy, endpoints not ready",
                zone: None,
                policies: CLUSTER,
                endpoints: vec![at("10.0.0.0:80"), at("10.0.0.1:80")],
                cluster: Some(&[]),
                local: None,
                has_any: false,
            },
            Case {
                name: "Cluster policy, some endpoints ready",
                zone: None,
                policies: CLUSTER,
                endpoints: vec![at("10.0.0.0:80"), at("10.0.0.1:80").ready()],
                cluster: Some(&["10.0.0.1:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "Cluster policy, all endpoints terminating",
                zone: None,
                policies: CLUSTER,
                endpoints: vec![
                    at("10.0.0.0:80").serving_terminating().local(),
                    at("10.0.0.1:80").serving_terminating(),
                ],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "iTP: Local, eTP: Cluster, some endpoints local",
                zone: None,
                policies: TrafficPolicies {
                    internal_local: true,
                    ..NODE_PORT
                },
                endpoints: vec![at("10.0.0.0:80").ready().local(), at("10.0.0.1:80").ready()],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                local: Some(&["10.0.0.0:80"]),
                has_any: true,
            },
            Case {
                name: "iTP: Cluster, eTP: Local, some endpoints local",
                zone: None,
                policies: ETP_LOCAL,
                endpoints: vec![at("10.0.0.0:80").ready().local(), at("10.0.0.1:80").ready()],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                local: Some(&["10.0.0.0:80"]),
                has_any: true,
            },
            Case {
                name: "iTP: Local, eTP: Local, all endpoints remote",
                zone: None,
                policies: TrafficPolicies {
                    internal_local: true,
                    ..ETP_LOCAL
                },
                endpoints: vec![at("10.0.0.0:80").ready(), at("10.0.0.1:80").ready()],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                local: Some(&[]),
                has_any: true,
            },
            Case {
                name: "iTP: Local, eTP: Local, all endpoints remote and terminating",
                zone: None,
                policies: TrafficPolicies {
                    internal_local: true,
                    ..ETP_LOCAL
                },
                endpoints: vec![
                    at("10.0.0.0:80").serving_terminating(),
                    at("10.0.0.1:80").serving_terminating(),
                ],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                local: Some(&[]),
                has_any: true,
            },
            Case {
                name: "iTP: Cluster, eTP: Local, terminating endpoints: per-node fallback",
                zone: None,
                policies: ETP_LOCAL,
                endpoints: vec![
                    at("10.0.0.0:80").ready(),
                    at("10.0.0.1:80").local(),
                    at("10.0.0.2:80").serving_terminating().local(),
                    at("10.0.0.3:80").serving_terminating(),
                ],
                cluster: Some(&["10.0.0.0:80"]),
                local: Some(&["10.0.0.2:80"]),
                has_any: true,
            },
            Case {
                name: "iTP: Local, terminating endpoints: per-node fallback",
                zone: None,
                policies: ITP_LOCAL,
                endpoints: vec![
                    at("10.0.0.0:80").ready(),
                    at("10.0.0.1:80").local(),
                    at("10.0.0.2:80").serving_terminating().local(),
                ],
                cluster: None,
                local: Some(&["10.0.0.2:80"]),
                has_any: true,
            },
            Case {
                name: "externalTrafficPolicy ignored if not externally accessible",
                zone: None,
                policies: TrafficPolicies {
                    external_local: true,
                    ..CLUSTER
                },
                endpoints: vec![at("10.0.0.0:80").ready(), at("10.0.0.1:80").ready().local()],
                cluster: Some(&["10.0.0.0:80", "10.0.0.1:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "no cluster endpoints for an iTP: Local internal-only service",
                zone: None,
                policies: ITP_LOCAL,
                endpoints: vec![at("10.0.0.0:80").ready(), at("10.0.0.1:80").ready().local()],
                cluster: None,
                local: Some(&["10.0.0.1:80"]),
                has_any: true,
            },
            Case {
                name: "PreferSameNode: the endpoints hinted for this node",
                zone: zone_a,
                policies: CLUSTER,
                endpoints: vec![
                    at("10.1.2.3:80").zones(&["zone-a"]).nodes(&[NODE]).ready(),
                    at("10.1.2.4:80").zones(&["zone-a"]).nodes(&["node-2"]).ready(),
                    at("10.1.2.5:80").zones(&["zone-b"]).nodes(&["node-3"]).ready(),
                ],
                cluster: Some(&["10.1.2.3:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "PreferSameNode, none hinted for this node: zone hints",
                zone: zone_a,
                policies: CLUSTER,
                endpoints: vec![
                    at("10.1.2.4:80").zones(&["zone-a"]).nodes(&["node-2"]).ready(),
                    at("10.1.2.5:80").zones(&["zone-b"]).nodes(&["node-3"]).ready(),
                ],
                cluster: Some(&["10.1.2.4:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "PreferSameNode, a ready endpoint without node hint: zone hints",
                zone: zone_a,
                policies: CLUSTER,
                endpoints: vec![
                    at("10.1.2.3:80").zones(&["zone-a"]).nodes(&[NODE]).ready(),
                    at("10.1.2.4:80").zones(&["zone-a"]).ready(),
                    at("10.1.2.5:80").zones(&["zone-b"]).nodes(&["node-3"]).ready(),
                ],
                cluster: Some(&["10.1.2.3:80", "10.1.2.4:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "PreferSameNode, node hints only and none for this node: all",
                zone: zone_a,
                policies: CLUSTER,
                endpoints: vec![
                    at("10.1.2.4:80").nodes(&["node-2"]).ready(),
                    at("10.1.2.5:80").nodes(&["node-3"]).ready(),
                ],
                cluster: Some(&["10.1.2.4:80", "10.1.2.5:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "hinted endpoints not ready anywhere: serving-terminating ones, topology ignored",
                zone: zone_a,
                policies: CLUSTER,
                endpoints: vec![
                    at("10.1.2.3:80").zones(&["zone-a"]).serving_terminating(),
                    at("10.1.2.4:80").zones(&["zone-b"]).serving_terminating(),
                ],
                cluster: Some(&["10.1.2.3:80", "10.1.2.4:80"]),
                local: None,
                has_any: true,
            },
            Case {
                name: "the same endpoint twice: a local copy wins",
                zone: None,
                policies: ITP_LOCAL,
                endpoints: vec![at("10.0.0.0:80").ready(), at("10.0.0.0:80").ready().local()],
                cluster: None,
                local: Some(&["10.0.0.0:80"]),
                has_any: true,
            },
        ];
        let set = |addrs: &[&str]| -> Vec<Endpoint> {
            let mut v: Vec<Endpoint> = addrs.iter().map(|a| at(a).0.endpoint).collect();
            v.sort_unstable();
            v
        };
        for case in cases {
            let node = NodeTopology {
                name: Some(NODE.into()),
                zone: case.zone.map(str::to_owned),
            };
            let candidates: Vec<Candidate> = case.endpoints.into_iter().map(|e| e.0).collect();
            let got = categorize(&candidates, &case.policies, &node);
            assert_eq!(
                got.cluster,
                case.cluster.map(set),
                "{}: cluster endpoints",
                case.name
            );
            assert_eq!(got.local, case.local.map(set), "{}: local endpoints", case.name);
            assert_eq!(got.has_any, case.has_any, "{}: has any endpoints", case.name);
        }
    }

    /// What the ClusterIP does: kube-proxy's internal traffic chain and its
    /// filter rule (REJECT "has no endpoints", DROP "has no local endpoints").
    #[test]
    fn cluster_ip_uses_the_internal_policy() {
        let node = NodeTopology {
            name: Some(NODE.into()),
            zone: Some("zone-a".into()),
        };
        /// What, policies, endpoints, the ClusterIP's endpoints, its verdict without them.
        type Row = (
            &'static str,
            TrafficPolicies,
            Vec<Ep>,
            &'static [&'static str],
            NoEndpoints,
        );
        let cases: Vec<Row> = vec![
            (
                "Cluster: every ready endpoint",
                CLUSTER,
                vec![at("10.0.0.1:80").ready(), at("10.0.0.2:80").ready().local()],
                &["10.0.0.1:80", "10.0.0.2:80"],
                NoEndpoints::Reject,
            ),
            (
                "Cluster, none usable: refused",
                CLUSTER,
                vec![at("10.0.0.1:80")],
                &[],
                NoEndpoints::Reject,
            ),
            (
                "Local: this node's only",
                ITP_LOCAL,
                vec![at("10.0.0.1:80").ready(), at("10.0.0.2:80").ready().local()],
                &["10.0.0.2:80"],
                NoEndpoints::Reject,
            ),
            (
                "Local, endpoints only elsewhere: dropped",
                ITP_LOCAL,
                vec![at("10.0.0.1:80").ready()],
                &[],
                NoEndpoints::Drop,
            ),
            (
                "Local, only terminating endpoints elsewhere: dropped",
                ITP_LOCAL,
                vec![at("10.0.0.1:80").serving_terminating()],
                &[],
                NoEndpoints::Drop,
            ),
            (
                "Local, no usable endpoint anywhere: refused",
                ITP_LOCAL,
                vec![at("10.0.0.1:80"), at("10.0.0.2:80").local()],
                &[],
                NoEndpoints::Reject,
            ),
            (
                "Local, no endpoints: refused",
                ITP_LOCAL,
                vec![],
                &[],
                NoEndpoints::Reject,
            ),
            (
                "Local ignores zone hints",
                ITP_LOCAL,
                vec![
                    at("10.0.0.1:80").zones(&["zone-b"]).ready().local(),
                    at("10.0.0.2:80").zones(&["zone-a"]).ready(),
                ],
                &["10.0.0.1:80"],
                NoEndpoints::Reject,
            ),
            (
                "externalTrafficPolicy: Local does not narrow the ClusterIP",
                ETP_LOCAL,
                vec![at("10.0.0.1:80").ready(), at("10.0.0.2:80").ready().local()],
                &["10.0.0.1:80", "10.0.0.2:80"],
                NoEndpoints::Reject,
            ),
        ];
        for (what, policies, endpoints, want, want_verdict) in cases {
            let candidates: Vec<Candidate> = endpoints.into_iter().map(|e| e.0).collect();
            let (got, verdict) = categorize(&candidates, &policies, &node).internal(&policies);
            let want: Vec<Endpoint> = want.iter().map(|a| at(a).0.endpoint).collect();
            assert_eq!(got, want, "{what}: endpoints");
            assert_eq!(verdict, want_verdict, "{what}: without endpoints");
        }
    }

    #[test]
    fn policies_are_read_from_the_service() {
        let cases = [
            ("{ports: [{port: 80}]}", CLUSTER),
            ("{internalTrafficPolicy: Local, ports: [{port: 80}]}", ITP_LOCAL),
            ("{internalTrafficPolicy: Cluster, ports: [{port: 80}]}", CLUSTER),
            (
                "{externalTrafficPolicy: Local, ports: [{port: 80}]}",
                TrafficPolicies {
                    external_local: false,
                    ..CLUSTER
                },
            ),
            (
                "{type: NodePort, externalTrafficPolicy: Local, ports: [{port: 80, nodePort: 30080}]}",
                ETP_LOCAL,
            ),
            ("{externalIPs: [192.0.2.1], ports: [{port: 80}]}", NODE_PORT),
            (
                "{type: LoadBalancer, externalTrafficPolicy: Local, ports: [{port: 80}]}",
                ETP_LOCAL,
            ),
        ];
        for (spec, want) in cases {
            let svc = service(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nspec: {spec}\n"
            ));
            let port = &svc.spec.as_ref().and_then(|s| s.ports.as_ref()).expect("ports")[0];
            assert_eq!(TrafficPolicies::of(&svc, port), want, "spec {spec}");
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
                    no_endpoints: NoEndpoints::Reject,
                    affinity: None,
                    name: name("http"),
                    endpoints: vec![ep(1, 8080), ep(2, 8080)],
                    also_serving: vec![ep(3, 8080)],
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
                    no_endpoints: NoEndpoints::Reject,
                    affinity: None,
                    name: name("dns"),
                    endpoints: vec![ep(1, 5353)],
                    also_serving: vec![ep(4, 5353)],
                    info: ServiceInfo::default(),
                },
            ),
        ];
        assert_eq!(
            got, want,
            "first address only, ready beats terminating (which still serves), protocol and name must match, SCTP \
             and foreign slices ignored"
        );
    }

    /// `nodeName` and `hints` are read from slices, and the Service's
    /// policies and the node decide what the ClusterIP does.
    #[test]
    fn slices_placement_and_policies_reach_the_entries() {
        let slice = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
  - addresses: [10.0.0.1]
    nodeName: node-1
    zone: zone-a
    hints: {forZones: [{name: zone-a}], forNodes: [{name: node-1}]}
  - addresses: [10.0.0.2]
    nodeName: node-2
    zone: zone-b
    hints: {forZones: [{name: zone-b}], forNodes: [{name: node-2}]}
"#;
        let slices = slices(slice);
        let own: Vec<&EndpointSlice> = slices.iter().collect();
        let cases = [
            (
                "",
                Some("node-1"),
                None,
                vec![ep(1, 8080)],
                NoEndpoints::Reject,
                TopologyMode::PreferSameNode,
            ),
            (
                "",
                Some("node-3"),
                Some("zone-b"),
                vec![ep(2, 8080)],
                NoEndpoints::Reject,
                TopologyMode::PreferSameZone,
            ),
            (
                "",
                None,
                None,
                vec![ep(1, 8080), ep(2, 8080)],
                NoEndpoints::Reject,
                TopologyMode::None,
            ),
            (
                "internalTrafficPolicy: Local, ",
                Some("node-2"),
                None,
                vec![ep(2, 8080)],
                NoEndpoints::Reject,
                TopologyMode::None,
            ),
            (
                "internalTrafficPolicy: Local, ",
                Some("node-3"),
                Some("zone-a"),
                vec![],
                NoEndpoints::Drop,
                TopologyMode::None,
            ),
            (
                "internalTrafficPolicy: Local, ",
                None,
                None,
                vec![],
                NoEndpoints::Drop,
                TopologyMode::None,
            ),
        ];
        for (policy, node_name, zone, want, want_verdict, want_mode) in cases {
            let svc = service(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{{policy}clusterIP: 10.96.0.1, ports: [{{port: 80}}]}}\n"
            ));
            let node = NodeTopology {
                name: node_name.map(str::to_owned),
                zone: zone.map(str::to_owned),
            };
            let got = entries_with(&svc, Ipv4Addr::new(10, 96, 0, 1), &node, |port| {
                slice_candidates(port.name, port.protocol, &own)
            });
            let what = format!("{policy}node {node_name:?} in zone {zone:?}");
            assert_eq!(got.len(), 1, "{what}: one port");
            let port = &got[0].1;
            assert_eq!(port.endpoints, want, "{what}: endpoints");
            assert_eq!(port.no_endpoints, want_verdict, "{what}: without endpoints");
            assert_eq!(port.info.topology, want_mode, "{what}: topology shown");
            assert_eq!(port.info.node.as_deref(), node_name, "{what}: node shown");
        }
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
