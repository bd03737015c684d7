//! What the endpoints controllers, the cluster IP allocator and kube-proxy
//! would do with the objects of a manifest directory: Services get an
//! address, selectors pick Pods (a named targetPort resolved per Pod, the
//! Pod's node and that Node's zone recorded, hints written as
//! `trafficDistribution` asks), and selector-less Services take
//! hand-written Endpoints or EndpointSlices.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::read::Object;
use crate::model::{Desired, Endpoint, Ipv4Cidr, NamespacedName, NodeTopology, fnv1a};
use crate::source::endpoints::{
    self as rules, Candidate, ClusterIp, Conditions, MANAGED_BY_LABEL, Placement, ProgrammablePort,
    SERVICE_NAME_LABEL, SLICE_CONTROLLER, ZONE_LABEL, namespace_of,
};
use crate::source::{ObjectKind, SourceObject, Warning};

/// What the datapath should hold for `files`, and warnings about what will not
/// do what it seems to.
pub(super) fn desired(
    files: &BTreeMap<PathBuf, Vec<Object>>,
    service_cidr: Ipv4Cidr,
    node_name: Option<&str>,
) -> (Desired, Vec<Warning>) {
    let mut warnings = Vec::new();
    let index = Index::build(files, &mut warnings);
    let node = NodeTopology {
        name: node_name.map(str::to_owned),
        zone: node_name.and_then(|name| index.zone_of(name)).map(str::to_owned),
    };
    let cluster_ips = assign_cluster_ips(&index.services, service_cidr);
    let mut desired = Desired::new();

    for (name, found) in &index.services {
        let service = found.object;
        let who = found.source_object(ObjectKind::Service, name);
        let spec = service.spec.as_ref();
        let selector = spec.and_then(|s| s.selector.as_ref()).filter(|s| !s.is_empty());
        let service_ports = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
        let port_ids: BTreeSet<PortId> = service_ports
            .iter()
            .map(|p| port_id(&p.name, &p.protocol))
            .collect();

        let manual = index.endpoints.get(name);
        if let (Some(_), Some(ep)) = (selector, manual) {
            warnings.push(Warning::EndpointsOfSelectorService {
                endpoints: ep.source_object(ObjectKind::Endpoints, name),
                service: name.clone(),
            });
        }
        let manual = manual.filter(|_| selector.is_none());
        if let Some(ep) = manual {
            let subsets = ep.object.subsets.iter().flatten();
            let ports = subsets
                .flat_map(|s| s.ports.iter().flatten())
                .map(|p| port_id(&p.name, &p.protocol));
            let object = ep.source_object(ObjectKind::Endpoints, name);
            warn_unmatched(ports, &port_ids, &object, name, &mut warnings);
        }

        let mut slices = Vec::new();
        for (slice_name, slice) in &index.slices {
            if !rules::slice_belongs_to(slice.object, &name.namespace, &name.name) {
                continue;
            }
            let labels = slice.object.metadata.labels.as_ref();
            let controller_owned = labels
                .and_then(|l| l.get(MANAGED_BY_LABEL))
                .is_some_and(|m| m == SLICE_CONTROLLER);
            if selector.is_some() && controller_owned {
                warnings.push(Warning::ControllerSliceOfSelectorService {
                    slice: slice.source_object(ObjectKind::EndpointSlice, slice_name),
                    service: name.clone(),
                });
                continue;
            }
            let ports = slice
                .object
                .ports
                .iter()
                .flatten()
                .map(|p| port_id(&p.name, &p.protocol));
            let object = slice.source_object(ObjectKind::EndpointSlice, slice_name);
            warn_unmatched(ports, &port_ids, &object, name, &mut warnings);
            slices.push(slice.object);
        }

        let ip = match rules::cluster_ip(service) {
            ClusterIp::NoVirtualIp => {
                tracing::debug!("{who}: headless or ExternalName; nothing to program");
                continue;
            }
            ClusterIp::V6(cluster_ip) => {
                warnings.push(Warning::Ipv6ClusterIp {
                    service: who,
                    cluster_ip,
                });
                continue;
            }
            ClusterIp::Invalid(cluster_ip) => {
                // Rejected when the file was read; kept for completeness.
                warnings.push(Warning::InvalidClusterIp {
                    service: who,
                    cluster_ip,
                });
                continue;
            }
            ClusterIp::V4(_) | ClusterIp::Unset => match cluster_ips.get(name) {
                Some(&ip) => ip,
                None => {
                    warnings.push(Warning::ServiceCidrFull {
                        service: who,
                        service_cidr,
                    });
                    continue;
                }
            },
        };
        for port in service_ports
            .iter()
            .filter(|p| p.protocol.as_deref() == Some("SCTP"))
        {
            warnings.push(Warning::SctpPort {
                service: who.clone(),
                port: port.port,
            });
        }

        let pods: Vec<&Pod> = index
            .pods
            .iter()
            .filter(|(pod, _)| pod.namespace == name.namespace)
            .map(|(_, p)| p.object)
            .collect();
        let publish_not_ready = spec.and_then(|s| s.publish_not_ready_addresses).unwrap_or(false);
        let hints = Hinting::of(service);
        let entries = rules::entries_with(service, ip, &node, |port| {
            let mut candidates = rules::slice_candidates(port.name, port.protocol, &slices);
            match (selector, manual) {
                (Some(selector), _) => {
                    let mut derived = pod_candidates(&pods, selector, port, publish_not_ready, &index);
                    hints.apply(&mut derived);
                    candidates.extend(derived)
                }
                (None, Some(ep)) => candidates.extend(endpoints_candidates(ep.object, port)),
                (None, None) => {}
            }
            candidates
        });
        for (frontend, service_port) in entries {
            match desired.get(&frontend) {
                Some(taken) => warnings.push(Warning::FrontendTaken {
                    service: who.clone(),
                    frontend,
                    holder: taken.name.service(),
                }),
                None => {
                    desired.insert(frontend, service_port);
                }
            }
        }
    }

    for (name, ep) in &index.endpoints {
        if !index.services.contains_key(name) {
            warnings.push(Warning::NoSuchService {
                object: ep.source_object(ObjectKind::Endpoints, name),
                service: name.clone(),
            });
        }
    }
    for (name, slice) in &index.slices {
        let labels = slice.object.metadata.labels.as_ref();
        let object = || slice.source_object(ObjectKind::EndpointSlice, name);
        let Some(service) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            warnings.push(Warning::NoServiceNameLabel { slice: object() });
            continue;
        };
        let service = NamespacedName {
            namespace: name.namespace.clone(),
            name: service.clone(),
        };
        if !index.services.contains_key(&service) {
            warnings.push(Warning::NoSuchService {
                object: object(),
                service,
            });
        }
    }
    (desired, warnings)
}

/// A port's name and protocol, with Kubernetes' defaults ("" and TCP): what
/// endpoint ports are matched to service ports by.
type PortId<'a> = (&'a str, &'a str);

fn port_id<'a>(name: &'a Option<String>, protocol: &'a Option<String>) -> PortId<'a> {
    (
        name.as_deref().unwrap_or(""),
        protocol.as_deref().unwrap_or("TCP"),
    )
}

/// Warns once per endpoint port of `object` that no port of `service` takes.
fn warn_unmatched<'a>(
    ports: impl Iterator<Item = PortId<'a>>,
    service_ports: &BTreeSet<PortId<'_>>,
    object: &SourceObject,
    service: &NamespacedName,
    warnings: &mut Vec<Warning>,
) {
    let unmatched: BTreeSet<PortId> = ports.filter(|p| !service_ports.contains(p)).collect();
    for (port_name, protocol) in unmatched {
        warnings.push(Warning::UnmatchedPort {
            object: object.clone(),
            port_name: port_name.to_owned(),
            protocol: protocol.to_owned(),
            service: service.clone(),
        });
    }
}

/// An object and the file it came from.
struct Found<'a, T> {
    path: &'a Path,
    object: &'a T,
}

impl<T> Found<'_, T> {
    /// How warnings name it.
    fn source_object(&self, kind: ObjectKind, name: &NamespacedName) -> SourceObject {
        SourceObject {
            kind,
            name: name.clone(),
            file: Some(self.path.to_owned()),
        }
    }
}

/// Every object by kind and namespace/name; a later definition (by file
/// name, then position) replaces an earlier one, as with `kubectl apply`.
struct Index<'a> {
    services: BTreeMap<NamespacedName, Found<'a, Service>>,
    pods: BTreeMap<NamespacedName, Found<'a, Pod>>,
    endpoints: BTreeMap<NamespacedName, Found<'a, Endpoints>>,
    slices: BTreeMap<NamespacedName, Found<'a, EndpointSlice>>,
    /// Cluster-scoped: keyed with an empty namespace.
    nodes: BTreeMap<NamespacedName, Found<'a, Node>>,
}

impl<'a> Index<'a> {
    fn build(files: &'a BTreeMap<PathBuf, Vec<Object>>, warnings: &mut Vec<Warning>) -> Self {
        let mut index = Index {
            services: BTreeMap::new(),
            pods: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            slices: BTreeMap::new(),
            nodes: BTreeMap::new(),
        };
        for (path, objects) in files {
            for object in objects {
                let meta = object.metadata();
                match object {
                    Object::Service(o) => {
                        add(&mut index.services, ObjectKind::Service, path, o, meta, warnings)
                    }
                    Object::Pod(o) => add(&mut index.pods, ObjectKind::Pod, path, o, meta, warnings),
                    Object::Endpoints(o) => add(
                        &mut index.endpoints,
                        ObjectKind::Endpoints,
                        path,
                        o,
                        meta,
                        warnings,
                    ),
                    Object::EndpointSlice(o) => add(
                        &mut index.slices,
                        ObjectKind::EndpointSlice,
                        path,
                        o,
                        meta,
                        warnings,
                    ),
                    Object::Node(o) => add(&mut index.nodes, ObjectKind::Node, path, o, meta, warnings),
                }
            }
        }
        index
    }

    /// The zone label of Node `name`, if the manifests hold that Node.
    fn zone_of(&self, name: &str) -> Option<&'a str> {
        let key = NamespacedName {
            namespace: String::new(),
            name: name.to_owned(),
        };
        let labels = self.nodes.get(&key)?.object.metadata.labels.as_ref()?;
        labels.get(ZONE_LABEL).map(String::as_str)
    }
}

fn add<'a, T>(
    map: &mut BTreeMap<NamespacedName, Found<'a, T>>,
    kind: ObjectKind,
    path: &'a Path,
    object: &'a T,
    meta: &ObjectMeta,
    warnings: &mut Vec<Warning>,
) {
    let namespace = match kind {
        ObjectKind::Node => String::new(),
        _ => namespace_of(meta).to_owned(),
    };
    let name = NamespacedName {
        namespace,
        name: meta.name.clone().unwrap_or_default(),
    };
    let found = Found { path, object };
    if let Some(earlier) = map.get(&name) {
        warnings.push(Warning::DefinedTwice {
            object: found.source_object(kind, &name),
            earlier: earlier.path.to_owned(),
        });
    }
    map.insert(name, found);
}

/// Cluster IPs for every Service that has or needs one. Explicit addresses
/// are reserved first; the rest start at a hash of their name and probe
/// upwards, in name order, so the result depends only on the set of Services.
fn assign_cluster_ips(
    services: &BTreeMap<NamespacedName, Found<'_, Service>>,
    cidr: Ipv4Cidr,
) -> BTreeMap<NamespacedName, Ipv4Addr> {
    let mut assigned = BTreeMap::new();
    let mut taken = HashSet::new();
    for (name, found) in services {
        if let ClusterIp::V4(ip) = rules::cluster_ip(found.object) {
            taken.insert(ip);
            assigned.insert(name.clone(), ip);
        }
    }
    // Neither the network address nor the last one, as Kubernetes' allocator.
    let usable = cidr.size().saturating_sub(2);
    for (name, found) in services {
        if usable == 0 || rules::cluster_ip(found.object) != ClusterIp::Unset {
            continue;
        }
        let start = fnv1a(name.to_string().as_bytes()) % usable;
        let free = (0..usable)
            .filter_map(|step| cidr.nth(1 + (start + step) % usable))
            .find(|ip| !taken.contains(ip));
        if let Some(ip) = free {
            taken.insert(ip);
            assigned.insert(name.clone(), ip);
        }
    }
    assigned
}

/// What the endpoints controller would derive for `port` from the Pods of the
/// Service's namespace: each Pod's node, and that Node's zone when the
/// manifests hold it (hints are [`Hinting`]'s job).
fn pod_candidates(
    pods: &[&Pod],
    selector: &BTreeMap<String, String>,
    port: &ProgrammablePort<'_>,
    publish_not_ready: bool,
    index: &Index<'_>,
) -> Vec<Candidate> {
    let mut out = Vec::new();
    for pod in pods {
        let labels = pod.metadata.labels.as_ref();
        if !selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        {
            continue;
        }
        let Some(status) = &pod.status else { continue };
        if status.phase.as_deref() != Some("Running") {
            continue;
        }
        let Some(addr) = pod_ipv4(pod) else { continue };
        let Some(target) = target_port(pod, port) else {
            continue;
        };
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let node_name = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        out.push(Candidate {
            endpoint: Endpoint { addr, port: target },
            conditions: Conditions {
                ready: Some((ready || publish_not_ready) && !terminating),
                serving: Some(ready),
                terminating: Some(terminating),
            },
            placement: Placement::new(node_name, node_name.and_then(|n| index.zone_of(n)), None),
        });
    }
    out
}

/// The hints the EndpointSlice controller writes for a Service's endpoints
/// (`endpointslice/trafficdist`): with `trafficDistribution` PreferClose or
/// PreferSameZone, every ready endpoint is hinted for its own zone; with
/// PreferSameNode, also for its own node; otherwise none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hinting {
    None,
    Zone,
    ZoneAndNode,
}

impl Hinting {
    fn of(service: &Service) -> Self {
        let distribution = service
            .spec
            .as_ref()
            .and_then(|s| s.traffic_distribution.as_deref());
        match distribution {
            Some("PreferClose" | "PreferSameZone") => Hinting::Zone,
            Some("PreferSameNode") => Hinting::ZoneAndNode,
            _ => Hinting::None,
        }
    }

    fn apply(self, candidates: &mut [Candidate]) {
        for candidate in candidates {
            let placement = &mut candidate.placement;
            // The controller hints only endpoints whose `ready` is true.
            if self == Hinting::None || candidate.conditions.ready != Some(true) {
                placement.zone_hints.clear();
                placement.node_hints.clear();
                continue;
            }
            placement.zone_hints = placement.zone.iter().cloned().collect();
            placement.node_hints = match self {
                Hinting::ZoneAndNode => placement.node_name.iter().cloned().collect(),
                _ => Vec::new(),
            };
        }
    }
}

/// The Pod's IPv4 address: the primary one, or the first IPv4 one of a
/// dual-stack Pod.
fn pod_ipv4(pod: &Pod) -> Option<Ipv4Addr> {
    let status = pod.status.as_ref()?;
    let primary = status.pod_ip.iter();
    let all = status.pod_ips.iter().flatten().map(|ip| &ip.ip);
    primary.chain(all).find_map(|ip| ip.parse().ok())
}

/// Where `port` goes on `pod`: a numeric targetPort as is, a named one by the
/// Pod's container port of that name and protocol (so each Pod may differ).
fn target_port(pod: &Pod, port: &ProgrammablePort<'_>) -> Option<u16> {
    match &port.spec.target_port {
        None | Some(IntOrString::Int(0)) => Some(port.port),
        Some(IntOrString::Int(n)) => rules::port_number(*n),
        Some(IntOrString::String(name)) if name.is_empty() => Some(port.port),
        Some(IntOrString::String(name)) => {
            let containers = pod.spec.iter().flat_map(|s| &s.containers);
            containers.flat_map(|c| c.ports.iter().flatten()).find_map(|p| {
                (p.name.as_deref() == Some(name.as_str())
                    && rules::parse_protocol(p.protocol.as_deref()) == Some(port.protocol))
                .then(|| rules::port_number(p.container_port))
                .flatten()
            })
        }
    }
}

/// Ready candidates for `port` from a hand-written Endpoints object; its
/// notReadyAddresses are never used, so they are not candidates.
fn endpoints_candidates(endpoints: &Endpoints, port: &ProgrammablePort<'_>) -> Vec<Candidate> {
    let mut out = Vec::new();
    for subset in endpoints.subsets.iter().flatten() {
        let ports = subset.ports.iter().flatten().filter(|p| {
            p.name.as_deref().unwrap_or("") == port.name
                && rules::parse_protocol(p.protocol.as_deref()) == Some(port.protocol)
        });
        for number in ports.filter_map(|p| rules::port_number(p.port)) {
            for address in subset.addresses.iter().flatten() {
                if let Ok(addr) = address.ip.parse() {
                    out.push(Candidate {
                        endpoint: Endpoint { addr, port: number },
                        conditions: Conditions {
                            ready: Some(true),
                            ..Conditions::default()
                        },
                        // What the EndpointSlice mirroring controller copies.
                        placement: Placement::new(address.node_name.as_deref(), None, None),
                    });
                }
            }
        }
    }
    out
}
