//! File mode: a directory of Kubernetes manifests stands in for the API
//! server, and this module for the controllers that would act on them.
//!
//! Services, Pods, Endpoints and EndpointSlices are read from `*.yaml`,
//! `*.yml` and `*.json` files (multi-document YAML; JSON is read as YAML,
//! which it is). [`ManifestStore::desired`] then does what the endpoints
//! controllers, the cluster IP allocator and kube-proxy would do with them.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;

use super::endpoints::{
    self as rules, Candidate, ClusterIp, Conditions, ProgrammablePort, SERVICE_NAME_LABEL, namespace_of,
};
use crate::model::{Desired, Endpoint, Ipv4Cidr, fnv1a};

/// The label the EndpointSlice controller puts on the slices it owns (and
/// rewrites from Pods, so hand-written copies of them do not count).
const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
const SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// Which object in a file an error is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectId {
    pub kind: Option<String>,
    pub namespace: String,
    pub name: Option<String>,
    /// 1-based position of the YAML document in its file.
    pub document: usize,
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.kind, &self.name) {
            (Some(kind), Some(name)) => write!(f, "{kind} {}/{name}", self.namespace),
            (Some(kind), None) => write!(f, "{kind} in document {}", self.document),
            (None, _) => write!(f, "document {}", self.document),
        }
    }
}

/// Why (part of) the manifest directory could not be used. Every variant
/// names the file; the affected file keeps its last good objects.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot list manifest directory {}: {error}", dir.display())]
    ListDir { dir: PathBuf, error: std::io::Error },
    #[error("cannot read {}: {error}", path.display())]
    ReadFile { path: PathBuf, error: std::io::Error },
    /// Not YAML; the message carries line and column.
    #[error("{}: document {document}: {error}", path.display())]
    Syntax {
        path: PathBuf,
        document: usize,
        error: yaml_serde::Error,
    },
    #[error("{}: document {document}: expected a Kubernetes object (a mapping with apiVersion and kind)", path.display())]
    NotAnObject { path: PathBuf, document: usize },
    /// Does not fit the Kubernetes schema; the message carries the field path,
    /// line and column.
    #[error("{}: {object}: {error}", path.display())]
    Decode {
        path: PathBuf,
        object: ObjectId,
        error: yaml_serde::Error,
    },
    /// Fits the schema but Kubernetes would reject it.
    #[error("{}: {object}: {field}: {reason}", path.display())]
    Invalid {
        path: PathBuf,
        object: ObjectId,
        field: String,
        reason: String,
    },
}

#[derive(Clone, Debug)]
enum Object {
    Service(Box<Service>),
    Pod(Box<Pod>),
    Endpoints(Box<Endpoints>),
    EndpointSlice(Box<EndpointSlice>),
}

impl Object {
    fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Endpoints(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
        }
    }
}

/// The objects of a manifest directory, per file, as last read successfully.
#[derive(Debug, Default)]
pub struct ManifestStore {
    files: BTreeMap<PathBuf, Vec<Object>>,
}

impl ManifestStore {
    /// Re-reads every manifest file in `dir` (not recursive). A file with any
    /// error keeps its previous objects (none if it is new); files that are
    /// gone are dropped. If `dir` itself cannot be listed nothing changes, so a
    /// passing hiccup does not withdraw every service.
    pub fn reload(&mut self, dir: &Path) -> Vec<ManifestError> {
        let paths = match manifest_files(dir) {
            Ok(paths) => paths,
            Err(error) => {
                return vec![ManifestError::ListDir {
                    dir: dir.to_owned(),
                    error,
                }];
            }
        };
        let mut errors = Vec::new();
        self.files.retain(|path, _| paths.contains(path));
        for path in paths {
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    // Removed since the listing.
                    self.files.remove(&path);
                    continue;
                }
                Err(error) => {
                    errors.push(ManifestError::ReadFile { path, error });
                    continue;
                }
            };
            match parse_file(&path, &text) {
                Ok(objects) => {
                    self.files.insert(path, objects);
                }
                Err(mut file_errors) => errors.append(&mut file_errors),
            }
        }
        errors
    }

    /// What the datapath should hold, and warnings (each naming the object)
    /// about manifests that are valid but will not do what they seem to.
    /// Services without a clusterIP get one from `service_cidr`.
    pub fn desired(&self, service_cidr: Ipv4Cidr) -> (Desired, Vec<String>) {
        let mut warnings = Vec::new();
        let index = Index::build(&self.files, &mut warnings);
        let cluster_ips = assign_cluster_ips(&index.services, service_cidr);
        let mut desired = Desired::new();

        for (key, found) in &index.services {
            let service = found.object;
            let who = found.describe("Service", key);
            let service_name = format!("Service {}/{}", key.0, key.1);
            let spec = service.spec.as_ref();
            let selector = spec.and_then(|s| s.selector.as_ref()).filter(|s| !s.is_empty());
            let service_ports = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
            let port_ids: BTreeSet<PortId> = service_ports
                .iter()
                .map(|p| port_id(&p.name, &p.protocol))
                .collect();

            let manual = index.endpoints.get(key);
            if let (Some(_), Some(ep)) = (selector, manual) {
                warnings.push(format!(
                    "{}: ignored, because {service_name} has a selector and Kubernetes would overwrite it from the Pods",
                    ep.describe("Endpoints", key)
                ));
            }
            let manual = manual.filter(|_| selector.is_none());
            if let Some(ep) = manual {
                let subsets = ep.object.subsets.iter().flatten();
                let ports = subsets
                    .flat_map(|s| s.ports.iter().flatten())
                    .map(|p| port_id(&p.name, &p.protocol));
                let subject = ep.describe("Endpoints", key);
                warn_unmatched(ports, &port_ids, &subject, &service_name, &mut warnings);
            }

            let mut slices = Vec::new();
            for (slice_key, slice) in &index.slices {
                if !rules::slice_belongs_to(slice.object, &key.0, &key.1) {
                    continue;
                }
                let labels = slice.object.metadata.labels.as_ref();
                let controller_owned = labels
                    .and_then(|l| l.get(MANAGED_BY_LABEL))
                    .is_some_and(|m| m == SLICE_CONTROLLER);
                if selector.is_some() && controller_owned {
                    warnings.push(format!(
                        "{}: ignored, because it is managed by {SLICE_CONTROLLER}, which would rewrite it from the Pods of {service_name}",
                        slice.describe("EndpointSlice", slice_key)
                    ));
                    continue;
                }
                let ports = slice
                    .object
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| port_id(&p.name, &p.protocol));
                let subject = slice.describe("EndpointSlice", slice_key);
                warn_unmatched(ports, &port_ids, &subject, &service_name, &mut warnings);
                slices.push(slice.object);
            }

            let ip = match rules::cluster_ip(service) {
                ClusterIp::NoVirtualIp => {
                    log::debug!("{who}: headless or ExternalName; nothing to program");
                    continue;
                }
                ClusterIp::V6(ip) => {
                    warnings.push(format!(
                        "{who}: IPv6 clusterIP {ip} is not supported; not programmed"
                    ));
                    continue;
                }
                ClusterIp::Invalid(ip) => {
                    // Rejected when the file was read; kept for completeness.
                    warnings.push(format!("{who}: invalid clusterIP {ip:?}; not programmed"));
                    continue;
                }
                ClusterIp::V4(_) | ClusterIp::Unset => match cluster_ips.get(key) {
                    Some(&ip) => ip,
                    None => {
                        warnings.push(format!(
                            "{who}: no free address left in service CIDR {service_cidr}; not programmed"
                        ));
                        continue;
                    }
                },
            };
            for port in service_ports
                .iter()
                .filter(|p| p.protocol.as_deref() == Some("SCTP"))
            {
                warnings.push(format!(
                    "{who}: port {}/SCTP is not supported; not programmed",
                    port.port
                ));
            }

            let pods: Vec<&Pod> = index
                .pods
                .iter()
                .filter(|((ns, _), _)| *ns == key.0)
                .map(|(_, p)| p.object)
                .collect();
            let publish_not_ready = spec.and_then(|s| s.publish_not_ready_addresses).unwrap_or(false);
            let entries = rules::entries_with(service, ip, |port| {
                let mut candidates = rules::slice_candidates(port.name, port.protocol, &slices);
                match (selector, manual) {
                    (Some(selector), _) => {
                        candidates.extend(pod_candidates(&pods, selector, port, publish_not_ready))
                    }
                    (None, Some(ep)) => candidates.extend(endpoints_candidates(ep.object, port)),
                    (None, None) => {}
                }
                candidates
            });
            for (frontend, service_port) in entries {
                match desired.get(&frontend) {
                    Some(taken) => warnings.push(format!(
                        "{who}: {frontend} is already used by {}; ignored",
                        taken.name
                    )),
                    None => {
                        desired.insert(frontend, service_port);
                    }
                }
            }
        }

        for (key, ep) in &index.endpoints {
            if !index.services.contains_key(key) {
                warnings.push(format!(
                    "{}: no Service {}/{} in its namespace; ignored",
                    ep.describe("Endpoints", key),
                    key.0,
                    key.1
                ));
            }
        }
        for (key, slice) in &index.slices {
            let labels = slice.object.metadata.labels.as_ref();
            match labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) {
                None => warnings.push(format!(
                    "{}: no {SERVICE_NAME_LABEL} label; ignored",
                    slice.describe("EndpointSlice", key)
                )),
                Some(service) if !index.services.contains_key(&(key.0.clone(), service.clone())) => warnings
                    .push(format!(
                        "{}: no Service {}/{service} in its namespace; ignored",
                        slice.describe("EndpointSlice", key),
                        key.0
                    )),
                Some(_) => {}
            }
        }
        (desired, warnings)
    }
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

/// Warns once per endpoint port of `subject` that no service port takes.
fn warn_unmatched<'a>(
    ports: impl Iterator<Item = PortId<'a>>,
    service_ports: &BTreeSet<PortId<'_>>,
    subject: &str,
    service: &str,
    warnings: &mut Vec<String>,
) {
    let unmatched: BTreeSet<PortId> = ports.filter(|p| !service_ports.contains(p)).collect();
    for (name, protocol) in unmatched {
        warnings.push(format!(
            "{subject}: port name {name:?} ({protocol}) matches no port of {service}; ignored"
        ));
    }
}

/// `*.yaml`, `*.yml` and `*.json` files directly in `dir`, sorted. Hidden
/// files are left out: editors and atomic writers use them as scratch space.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let wanted = ["yaml", "yml", "json"].iter().any(|ext| {
            path.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case(ext))
        });
        // `metadata` follows symlinks (ConfigMap volumes are made of them); a
        // dangling one counts as absent.
        if wanted && !name.starts_with('.') && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// All objects of one file, or every error found in it.
fn parse_file(path: &Path, text: &str) -> Result<Vec<Object>, Vec<ManifestError>> {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    // The same text twice: generic values to learn kind and name, typed
    // decoding straight from the text so errors carry field path and line.
    let typed_docs = yaml_serde::Deserializer::from_str(text);
    for (i, (generic, typed)) in yaml_serde::Deserializer::from_str(text)
        .zip(typed_docs)
        .enumerate()
    {
        let document = i + 1;
        let path = path.to_owned();
        let value = match yaml_serde::Value::deserialize(generic) {
            Ok(value) => value,
            Err(error) => {
                // The parser cannot find the next document after a syntax error.
                errors.push(ManifestError::Syntax {
                    path,
                    document,
                    error,
                });
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        if !value.is_mapping() {
            errors.push(ManifestError::NotAnObject { path, document });
            continue;
        }
        let text_at =
            |v: &yaml_serde::Value, key: &str| v.get(key).and_then(|v| v.as_str()).map(str::to_owned);
        let metadata = value.get("metadata").cloned().unwrap_or_default();
        let mut object = ObjectId {
            kind: text_at(&value, "kind"),
            namespace: text_at(&metadata, "namespace")
                .filter(|ns| !ns.is_empty())
                .unwrap_or_else(|| rules::DEFAULT_NAMESPACE.to_owned()),
            name: text_at(&metadata, "name").filter(|n| !n.is_empty()),
            document,
        };
        let invalid = |object: &ObjectId, field: &str, reason: &str| ManifestError::Invalid {
            path: path.clone(),
            object: object.clone(),
            field: field.to_owned(),
            reason: reason.to_owned(),
        };
        let (Some(kind), Some(api_version)) = (object.kind.clone(), text_at(&value, "apiVersion")) else {
            let field = if object.kind.is_none() {
                "kind"
            } else {
                "apiVersion"
            };
            errors.push(invalid(&object, field, "is required"));
            continue;
        };
        let decoded = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => decode(typed).map(|o| Object::Service(Box::new(o))),
            ("v1", "Pod") => decode(typed).map(|o| Object::Pod(Box::new(o))),
            ("v1", "Endpoints") => decode(typed).map(|o| Object::Endpoints(Box::new(o))),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                decode(typed).map(|o| Object::EndpointSlice(Box::new(o)))
            }
            _ => {
                log::debug!(
                    "{}: {object}: skipping {api_version} {kind}, which redirector does not use",
                    path.display()
                );
                continue;
            }
        };
        let decoded = match decoded {
            Ok(decoded) => decoded,
            Err(error) => {
                errors.push(ManifestError::Decode { path, object, error });
                continue;
            }
        };
        // The typed metadata is authoritative (YAML may spell a name as a number).
        let meta = decoded.metadata();
        object.namespace = namespace_of(meta).to_owned();
        object.name = meta.name.clone().filter(|n| !n.is_empty());
        let mut problems = Problems::default();
        if object.name.is_none() {
            problems.push("metadata.name", "is required".to_owned());
        }
        match &decoded {
            Object::Service(service) => validate_service(service, &mut problems),
            Object::Pod(pod) => validate_pod(pod, &mut problems),
            Object::Endpoints(endpoints) => validate_endpoints(endpoints, &mut problems),
            Object::EndpointSlice(slice) => validate_slice(slice, &mut problems),
        }
        if problems.0.is_empty() {
            objects.push(decoded);
        }
        errors.extend(
            problems
                .0
                .into_iter()
                .map(|(field, reason)| invalid(&object, &field, &reason)),
        );
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(errors)
    }
}

fn decode<'de, T: Deserialize<'de>>(doc: yaml_serde::Deserializer<'de>) -> Result<T, yaml_serde::Error> {
    T::deserialize(doc)
}

/// Validation failures of one object: (field path, reason).
#[derive(Default)]
struct Problems(Vec<(String, String)>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, reason: String) {
        self.0.push((field.into(), reason));
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

/// (namespace, name)
type Key = (String, String);

/// An object and the file it came from.
struct Found<'a, T> {
    path: &'a Path,
    object: &'a T,
}

impl<T> Found<'_, T> {
    fn describe(&self, kind: &str, key: &Key) -> String {
        format!("{kind} {}/{} ({})", key.0, key.1, self.path.display())
    }
}

/// Every object by kind and namespace/name; a later definition (by file
/// name, then position) replaces an earlier one, as with `kubectl apply`.
struct Index<'a> {
    services: BTreeMap<Key, Found<'a, Service>>,
    pods: BTreeMap<Key, Found<'a, Pod>>,
    endpoints: BTreeMap<Key, Found<'a, Endpoints>>,
    slices: BTreeMap<Key, Found<'a, EndpointSlice>>,
}

impl<'a> Index<'a> {
    fn build(files: &'a BTreeMap<PathBuf, Vec<Object>>, warnings: &mut Vec<String>) -> Self {
        let mut index = Index {
            services: BTreeMap::new(),
            pods: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            slices: BTreeMap::new(),
        };
        for (path, objects) in files {
            for object in objects {
                match object {
                    Object::Service(o) => add(&mut index.services, "Service", path, o, &o.metadata, warnings),
                    Object::Pod(o) => add(&mut index.pods, "Pod", path, o, &o.metadata, warnings),
                    Object::Endpoints(o) => {
                        add(&mut index.endpoints, "Endpoints", path, o, &o.metadata, warnings)
                    }
                    Object::EndpointSlice(o) => {
                        add(&mut index.slices, "EndpointSlice", path, o, &o.metadata, warnings)
                    }
                }
            }
        }
        index
    }
}

fn add<'a, T>(
    map: &mut BTreeMap<Key, Found<'a, T>>,
    kind: &str,
    path: &'a Path,
    object: &'a T,
    meta: &ObjectMeta,
    warnings: &mut Vec<String>,
) {
    let key = (
        namespace_of(meta).to_owned(),
        meta.name.clone().unwrap_or_default(),
    );
    let found = Found { path, object };
    if let Some(earlier) = map.get(&key) {
        warnings.push(format!(
            "{}: also defined in {}; using the later definition",
            found.describe(kind, &key),
            earlier.path.display()
        ));
    }
    map.insert(key, found);
}

/// Cluster IPs for every Service that has or needs one. Explicit addresses
/// are reserved first; the rest start at a hash of their name and probe
/// upwards, in name order, so the result depends only on the set of Services.
fn assign_cluster_ips(
    services: &BTreeMap<Key, Found<'_, Service>>,
    cidr: Ipv4Cidr,
) -> BTreeMap<Key, Ipv4Addr> {
    let mut assigned = BTreeMap::new();
    let mut taken = HashSet::new();
    for (key, found) in services {
        if let ClusterIp::V4(ip) = rules::cluster_ip(found.object) {
            taken.insert(ip);
            assigned.insert(key.clone(), ip);
        }
    }
    // Neither the network address nor the last one, as Kubernetes' allocator.
    let usable = cidr.size().saturating_sub(2);
    for (key, found) in services {
        if usable == 0 || rules::cluster_ip(found.object) != ClusterIp::Unset {
            continue;
        }
        let start = fnv1a(format!("{}/{}", key.0, key.1).as_bytes()) % usable;
        let free = (0..usable)
            .filter_map(|step| cidr.nth(1 + (start + step) % usable))
            .find(|ip| !taken.contains(ip));
        if let Some(ip) = free {
            taken.insert(ip);
            assigned.insert(key.clone(), ip);
        }
    }
    assigned
}

/// What the endpoints controller would derive for `port` from the Pods of the
/// Service's namespace.
fn pod_candidates(
    pods: &[&Pod],
    selector: &BTreeMap<String, String>,
    port: &ProgrammablePort<'_>,
    publish_not_ready: bool,
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
        out.push(Candidate {
            endpoint: Endpoint { addr, port: target },
            conditions: Conditions {
                ready: Some((ready || publish_not_ready) && !terminating),
                serving: Some(ready),
                terminating: Some(terminating),
            },
        });
    }
    out
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
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Frontend, Protocol, ServicePortName};

    /// A scratch manifest directory, removed afterwards.
    struct Dir(PathBuf);

    impl Dir {
        fn new(test: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("redirector-manifests-{}-{test}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).expect("creating scratch dir");
            Dir(path)
        }

        fn write(&self, file: &str, text: &str) {
            std::fs::write(self.0.join(file), text).expect("writing manifest");
        }

        fn remove(&self, file: &str) {
            std::fs::remove_file(self.0.join(file)).expect("removing manifest");
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cidr() -> Ipv4Cidr {
        "10.96.0.0/16".parse().expect("test CIDR")
    }

    /// Loads `files` into a fresh store, insisting they are valid.
    fn load(test: &str, files: &[(&str, &str)]) -> ManifestStore {
        let dir = Dir::new(test);
        for (name, text) in files {
            dir.write(name, text);
        }
        let mut store = ManifestStore::default();
        let errors = store.reload(&dir.0);
        assert!(errors.is_empty(), "{test}: unexpected errors: {errors:#?}");
        store
    }

    fn desired(test: &str, files: &[(&str, &str)]) -> (Desired, Vec<String>) {
        load(test, files).desired(cidr())
    }

    fn ep(ip: &str, port: u16) -> Endpoint {
        Endpoint {
            addr: ip.parse().expect("test IP"),
            port,
        }
    }

    fn frontend(ip: &str, port: u16, protocol: Protocol) -> Frontend {
        Frontend {
            addr: ip.parse().expect("test IP"),
            port,
            protocol,
        }
    }

    fn endpoints_at(desired: &Desired, ip: &str, port: u16, protocol: Protocol) -> Option<Vec<Endpoint>> {
        desired
            .get(&frontend(ip, port, protocol))
            .map(|sp| sp.endpoints.clone())
    }

    /// A Pod manifest; `ports` are container ports (name, number, protocol).
    fn pod(name: &str, ip: Option<&str>, phase: &str, ready: &str, ports: &[(&str, u16, &str)]) -> String {
        let ports: String = ports
            .iter()
            .map(|(n, p, proto)| format!("        - {{name: {n}, containerPort: {p}, protocol: {proto}}}\n"))
            .collect();
        let ip = ip.map(|ip| format!("  podIP: {ip}\n")).unwrap_or_default();
        format!(
            "---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: shop
  labels:
    app: web
    tier: front
spec:
  containers:
    - name: main
      image: nginx
      ports:
{ports}status:
  phase: {phase}
{ip}  conditions:
    - type: Initialized
      status: \"True\"
    - type: Ready
      status: \"{ready}\"
"
        )
    }

    const WEB_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.0.10
  selector:
    app: web
  ports:
    - name: http
      port: 80
      targetPort: web
    - name: metrics
      port: 9100
      targetPort: 9101
    - name: dns
      port: 53
      protocol: UDP
"#;

    #[test]
    fn selector_service_uses_running_ready_pods() {
        let running = |name: &str, ip: &str| pod(name, Some(ip), "Running", "True", &[("web", 8080, "TCP")]);
        let cases: Vec<(&str, Vec<String>, Vec<Endpoint>)> = vec![
            (
                "running and ready",
                vec![running("a", "10.1.0.1")],
                vec![ep("10.1.0.1", 9101)],
            ),
            (
                "not running",
                vec![
                    pod("a", Some("10.1.0.1"), "Pending", "True", &[]),
                    running("b", "10.1.0.2"),
                ],
                vec![ep("10.1.0.2", 9101)],
            ),
            (
                "not ready",
                vec![
                    pod("a", Some("10.1.0.1"), "Running", "False", &[]),
                    running("b", "10.1.0.2"),
                ],
                vec![ep("10.1.0.2", 9101)],
            ),
            (
                "no IP",
                vec![pod("a", None, "Running", "True", &[]), running("b", "10.1.0.2")],
                vec![ep("10.1.0.2", 9101)],
            ),
            (
                "labels must all match",
                vec![
                    running("a", "10.1.0.1").replace("app: web", "app: api"),
                    running("b", "10.1.0.2"),
                ],
                vec![ep("10.1.0.2", 9101)],
            ),
            (
                "same namespace only",
                vec![
                    running("a", "10.1.0.1").replace("namespace: shop", "namespace: other"),
                    running("b", "10.1.0.2"),
                ],
                vec![ep("10.1.0.2", 9101)],
            ),
            ("no pods", vec![], vec![]),
        ];
        for (what, pods, want) in cases {
            let pods = pods.concat();
            let (desired, warnings) = desired(
                "selector",
                &[("pods.yaml", pods.as_str()), ("svc.yaml", WEB_SERVICE)],
            );
            assert_eq!(
                endpoints_at(&desired, "10.96.0.10", 9100, Protocol::Tcp),
                Some(want),
                "{what}: metrics endpoints"
            );
            assert!(
                warnings.is_empty(),
                "{what}: no warnings expected, got {warnings:?}"
            );
        }
    }

    #[test]
    fn named_target_port_is_resolved_per_pod() {
        let pods = [
            pod(
                "a",
                Some("10.1.0.1"),
                "Running",
                "True",
                &[("web", 8080, "TCP"), ("dns", 5353, "UDP")],
            ),
            pod("b", Some("10.1.0.2"), "Running", "True", &[("web", 8081, "TCP")]),
            pod(
                "c",
                Some("10.1.0.3"),
                "Running",
                "True",
                &[("admin", 8080, "TCP")],
            ),
            pod("d", Some("10.1.0.4"), "Running", "True", &[("web", 8082, "UDP")]),
        ]
        .concat();
        let (desired, _) = desired("named", &[("all.yaml", &format!("{WEB_SERVICE}{pods}"))]);
        let cases = [
            (
                "name maps to different numbers per pod; pods without it (or with it on another protocol) are left out",
                80,
                Protocol::Tcp,
                vec![ep("10.1.0.1", 8080), ep("10.1.0.2", 8081)],
            ),
            (
                "numeric targetPort applies to every pod",
                9100,
                Protocol::Tcp,
                vec![
                    ep("10.1.0.1", 9101),
                    ep("10.1.0.2", 9101),
                    ep("10.1.0.3", 9101),
                    ep("10.1.0.4", 9101),
                ],
            ),
            (
                "absent targetPort means the service port",
                53,
                Protocol::Udp,
                vec![
                    ep("10.1.0.1", 53),
                    ep("10.1.0.2", 53),
                    ep("10.1.0.3", 53),
                    ep("10.1.0.4", 53),
                ],
            ),
        ];
        for (what, port, protocol, want) in cases {
            assert_eq!(
                endpoints_at(&desired, "10.96.0.10", port, protocol),
                Some(want),
                "{what}"
            );
        }
        let name = desired
            .get(&frontend("10.96.0.10", 80, Protocol::Tcp))
            .map(|sp| sp.name.clone());
        let want = ServicePortName {
            namespace: "shop".into(),
            name: "web".into(),
            port: "http".into(),
        };
        assert_eq!(name, Some(want), "service port name");
    }

    const PLAIN_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: shop
spec:
  clusterIP: 10.96.0.20
  ports:
    - name: sql
      port: 5432
    - name: stats
      port: 9187
      targetPort: 9999
"#;

    #[test]
    fn selectorless_service_from_endpoints() {
        let endpoints = r#"
apiVersion: v1
kind: Endpoints
metadata:
  name: db
  namespace: shop
subsets:
  - addresses:
      - ip: 192.168.1.1
      - ip: 192.168.1.2
    notReadyAddresses:
      - ip: 192.168.1.9
    ports:
      - name: sql
        port: 5432
      - name: stats
        port: 9187
  - addresses:
      - ip: 192.168.1.3
    ports:
      - name: sql
        port: 6432
"#;
        let (desired, warnings) = desired(
            "endpoints",
            &[("db.yaml", &format!("{PLAIN_SERVICE}---{endpoints}"))],
        );
        let cases = [
            (
                "sql: addresses x ports of every subset, notReadyAddresses unused",
                5432,
                vec![
                    ep("192.168.1.1", 5432),
                    ep("192.168.1.2", 5432),
                    ep("192.168.1.3", 6432),
                ],
            ),
            (
                "stats: endpoint port taken as is; targetPort is for selectors",
                9187,
                vec![ep("192.168.1.1", 9187), ep("192.168.1.2", 9187)],
            ),
        ];
        for (what, port, want) in cases {
            assert_eq!(
                endpoints_at(&desired, "10.96.0.20", port, Protocol::Tcp),
                Some(want),
                "{what}"
            );
        }
        assert!(warnings.is_empty(), "no warnings expected, got {warnings:?}");
    }

    #[test]
    fn selectorless_service_from_slices_split_by_port() {
        let slices = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-sql
  namespace: shop
  labels:
    kubernetes.io/service-name: db
addressType: IPv4
ports:
  - name: sql
    port: 5432
    protocol: TCP
endpoints:
  - addresses: ["192.168.2.1"]
    conditions: {ready: true}
  - addresses: ["192.168.2.2"]
    conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-stats
  namespace: shop
  labels:
    kubernetes.io/service-name: db
addressType: IPv4
ports:
  - name: stats
    port: 9000
endpoints:
  - addresses: ["192.168.2.3"]
    conditions: {ready: false, serving: true, terminating: true}
  - addresses: ["192.168.2.4"]
    conditions: {ready: false, serving: false, terminating: true}
"#;
        let (desired, warnings) = desired("slices", &[("db.yaml", PLAIN_SERVICE), ("slices.yaml", slices)]);
        let cases = [
            ("sql: ready endpoint only", 5432, vec![ep("192.168.2.1", 5432)]),
            (
                "stats: none ready, so the serving terminating one",
                9187,
                vec![ep("192.168.2.3", 9000)],
            ),
        ];
        for (what, port, want) in cases {
            assert_eq!(
                endpoints_at(&desired, "10.96.0.20", port, Protocol::Tcp),
                Some(want),
                "{what}"
            );
        }
        assert!(warnings.is_empty(), "no warnings expected, got {warnings:?}");
    }

    #[test]
    fn warnings_name_the_object() {
        let orphan = r#"
apiVersion: v1
kind: Endpoints
metadata: {name: ghost, namespace: shop}
subsets: [{addresses: [{ip: 192.168.1.1}], ports: [{port: 80}]}]
"#;
        let shadowed = r#"
apiVersion: v1
kind: Endpoints
metadata: {name: web, namespace: shop}
subsets: [{addresses: [{ip: 192.168.1.1}], ports: [{name: http, port: 80}]}]
"#;
        let bad_port_endpoints = r#"
apiVersion: v1
kind: Endpoints
metadata: {name: db, namespace: shop}
subsets: [{addresses: [{ip: 192.168.1.1}], ports: [{name: sql, port: 5432}, {name: mysql, port: 3306}]}]
"#;
        let bad_port_slice = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-x
  namespace: shop
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: sql, port: 5432, protocol: UDP}]
endpoints: [{addresses: [192.168.1.5]}]
"#;
        let cases = [
            (
                "Endpoints without Service",
                orphan,
                "Endpoints shop/ghost (",
                "no Service shop/ghost",
            ),
            (
                "Endpoints of a selector Service",
                shadowed,
                "Endpoints shop/web (",
                "has a selector",
            ),
            (
                "Endpoints port name unknown",
                bad_port_endpoints,
                "Endpoints shop/db (",
                "\"mysql\" (TCP) matches no port",
            ),
            (
                "EndpointSlice port unknown",
                bad_port_slice,
                "EndpointSlice shop/db-x (",
                "\"sql\" (UDP) matches no port",
            ),
        ];
        for (what, extra, object, message) in cases {
            let (desired, warnings) = desired(
                "warnings",
                &[
                    ("svc.yaml", &format!("{WEB_SERVICE}---{PLAIN_SERVICE}")),
                    ("extra.yaml", extra),
                ],
            );
            assert_eq!(warnings.len(), 1, "{what}: exactly one warning, got {warnings:?}");
            assert!(
                warnings[0].contains(object),
                "{what}: warning {:?} should name {object:?}",
                warnings[0]
            );
            assert!(
                warnings[0].contains("extra.yaml"),
                "{what}: warning {:?} should name the file",
                warnings[0]
            );
            assert!(
                warnings[0].contains(message),
                "{what}: warning {:?} should say {message:?}",
                warnings[0]
            );
            assert_eq!(
                endpoints_at(&desired, "10.96.0.10", 80, Protocol::Tcp),
                Some(vec![]),
                "{what}: hand-written Endpoints never feed a selector Service"
            );
        }
    }

    fn service(name: &str, spec: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: apps\nspec:\n{spec}"
        )
    }

    #[test]
    fn cluster_ips_are_allocated_stably_inside_the_cidr() {
        let mut services: Vec<String> = (0..12)
            .map(|i| service(&format!("svc{i}"), "  ports: [{port: 80}]\n"))
            .collect();
        services.push(service(
            "fixed",
            "  clusterIP: 10.96.7.1\n  ports: [{port: 80}]\n",
        ));
        let cidr: Ipv4Cidr = "10.96.7.0/28".parse().expect("test CIDR");
        let first_half = services[..6].concat();
        let second_half = services[6..].concat();

        let layouts = [
            [("a.yaml", first_half.as_str()), ("b.yaml", second_half.as_str())],
            [("a.yaml", second_half.as_str()), ("b.yaml", first_half.as_str())],
        ];
        let mut results = Vec::new();
        for (i, files) in layouts.iter().enumerate() {
            let store = load("alloc", files);
            let (one, warnings) = store.desired(cidr);
            let (two, _) = store.desired(cidr);
            assert_eq!(one, two, "layout {i}: same result when asked twice");
            assert!(
                warnings.is_empty(),
                "layout {i}: no warnings expected, got {warnings:?}"
            );
            results.push(one);
        }
        assert_eq!(
            results[0], results[1],
            "independent of which file holds which Service"
        );

        let ips: Vec<Ipv4Addr> = results[0].keys().map(|f| f.addr).collect();
        let distinct: BTreeSet<Ipv4Addr> = ips.iter().copied().collect();
        assert_eq!(distinct.len(), 13, "every Service has its own address: {ips:?}");
        for ip in &ips {
            assert!(cidr.contains(*ip), "{ip} inside {cidr}");
            assert_ne!(*ip, Ipv4Addr::new(10, 96, 7, 0), "network address skipped");
            assert_ne!(*ip, Ipv4Addr::new(10, 96, 7, 15), "last address skipped");
        }
        let fixed = results[0].values().filter(|sp| sp.name.name == "fixed").count();
        assert_eq!(fixed, 1, "explicit clusterIP kept");
        assert!(
            results[0]
                .get(&frontend("10.96.7.1", 80, Protocol::Tcp))
                .is_some_and(|sp| sp.name.name == "fixed"),
            "explicit clusterIP never handed to another Service"
        );
    }

    #[test]
    fn cluster_ip_allocation_runs_out() {
        let services: String = ["a", "b", "c"]
            .map(|n| service(n, "  ports: [{port: 80}]\n"))
            .concat();
        let cidr: Ipv4Cidr = "10.96.7.0/30".parse().expect("test CIDR");
        let (desired, warnings) = load("exhausted", &[("s.yaml", &services)]).desired(cidr);
        let ips: BTreeSet<Ipv4Addr> = desired.keys().map(|f| f.addr).collect();
        let want: BTreeSet<Ipv4Addr> = [Ipv4Addr::new(10, 96, 7, 1), Ipv4Addr::new(10, 96, 7, 2)].into();
        assert_eq!(ips, want, "the two usable addresses of a /30 are used");
        assert_eq!(
            warnings.len(),
            1,
            "one Service left without an address: {warnings:?}"
        );
        assert!(
            warnings[0].contains("Service apps/"),
            "warning names the Service: {:?}",
            warnings[0]
        );
    }

    #[test]
    fn what_is_programmed() {
        let cases: &[(&str, String, Vec<Frontend>, &str)] = &[
            (
                "headless",
                service(
                    "h",
                    "  clusterIP: None\n  selector: {app: x}\n  ports: [{port: 80}]\n",
                ),
                vec![],
                "",
            ),
            (
                "ExternalName",
                service(
                    "e",
                    "  type: ExternalName\n  externalName: db.example.com\n  ports: [{port: 80}]\n",
                ),
                vec![],
                "",
            ),
            (
                "TCP and UDP, not SCTP",
                service(
                    "m",
                    "  clusterIP: 10.96.0.30\n  ports:\n  - {name: a, port: 53, protocol: UDP}\n  - {name: b, port: 53}\n  - {name: c, port: 36412, protocol: SCTP}\n",
                ),
                vec![
                    frontend("10.96.0.30", 53, Protocol::Tcp),
                    frontend("10.96.0.30", 53, Protocol::Udp),
                ],
                "Service apps/m (",
            ),
            (
                "explicit clusterIP outside the CIDR",
                service("o", "  clusterIP: 172.16.0.1\n  ports: [{port: 80}]\n"),
                vec![frontend("172.16.0.1", 80, Protocol::Tcp)],
                "",
            ),
            (
                "NodePort has a cluster IP too",
                service(
                    "n",
                    "  type: NodePort\n  clusterIP: 10.96.0.31\n  ports: [{port: 80, nodePort: 30080}]\n",
                ),
                vec![frontend("10.96.0.31", 80, Protocol::Tcp)],
                "",
            ),
        ];
        for (what, yaml, want, warning) in cases {
            let (desired, warnings) = desired("programmed", &[("s.yaml", yaml)]);
            let got: Vec<Frontend> = desired.keys().copied().collect();
            assert_eq!(&got, want, "{what}: frontends");
            assert!(
                desired.values().all(|sp| sp.endpoints.is_empty()),
                "{what}: no endpoints, yet still programmed (to refuse)"
            );
            if warning.is_empty() {
                assert!(
                    warnings.is_empty(),
                    "{what}: no warnings expected, got {warnings:?}"
                );
            } else {
                assert_eq!(
                    warnings.len(),
                    1,
                    "{what}: one warning expected, got {warnings:?}"
                );
                assert!(
                    warnings[0].contains(warning),
                    "{what}: {:?} names {warning:?}",
                    warnings[0]
                );
            }
        }
    }

    #[test]
    fn documents_and_files() {
        let mixed = r#"
# a comment-only document
---
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec: {}
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: knative, namespace: shop}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {a: b}
---
"#;
        let json = r#"{
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "json", "namespace": "shop"},
    "spec": {"clusterIP": "10.96.0.40", "ports": [{"port": 443, "targetPort": 8443}]}
}"#;
        let store = load(
            "documents",
            &[
                ("mixed.yml", mixed),
                ("svc.json", json),
                ("web.yaml", WEB_SERVICE),
                ("notes.txt", "not: [a manifest"),
                (".hidden.yaml", "not: [a manifest"),
            ],
        );
        let (desired, warnings) = store.desired(cidr());
        let services: BTreeSet<String> = desired.values().map(|sp| sp.name.name.clone()).collect();
        let want: BTreeSet<String> = ["json".to_owned(), "web".to_owned()].into();
        assert_eq!(
            services, want,
            "only v1 Services from *.yaml/*.yml/*.json; other kinds and files skipped"
        );
        assert!(warnings.is_empty(), "no warnings expected, got {warnings:?}");
    }

    #[test]
    fn errors_name_file_object_and_field() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                "malformed YAML",
                "apiVersion: v1\nkind: Service\nmetadata: {name: [x\n",
                &["bad.yaml", "document 1", "line"],
            ),
            (
                "wrong type",
                "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports:\n  - port: eighty\n",
                &["bad.yaml", "Service shop/web", "spec.ports[0].port", "line 6"],
            ),
            (
                "port out of range",
                "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: 70000}]}\n",
                &["bad.yaml", "Service shop/web", "spec.ports[0].port", "70000"],
            ),
            (
                "protocol",
                "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, protocol: ICMP}]}\n",
                &["Service default/web", "spec.ports[0].protocol", "ICMP"],
            ),
            (
                "clusterIP",
                "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n",
                &["Service default/web", "spec.clusterIP", "10.96.0.300"],
            ),
            (
                "targetPort number",
                "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, targetPort: 65536}]}\n",
                &["Service default/web", "spec.ports[0].targetPort", "65536"],
            ),
            (
                "targetPort name",
                "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, targetPort: Web_Port}]}\n",
                &["Service default/web", "spec.ports[0].targetPort", "Web_Port"],
            ),
            (
                "unnamed ports",
                "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}, {name: b, port: 81}]}\n",
                &["Service default/web", "spec.ports[0].name", "more than one port"],
            ),
            (
                "pod IP",
                "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.1.2}\n",
                &["Pod shop/p", "status.podIP", "10.1.2"],
            ),
            (
                "slice address",
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: [{addresses: [\"fd00::1\"]}]\n",
                &["EndpointSlice default/s", "endpoints[0].addresses[0]"],
            ),
            (
                "missing name",
                "apiVersion: v1\nkind: Service\nspec: {ports: [{port: 80}]}\n",
                &["Service in document 1", "metadata.name"],
            ),
            (
                "missing kind",
                "apiVersion: v1\nmetadata: {name: x}\n",
                &["bad.yaml", "document 1", "kind"],
            ),
            (
                "not an object",
                "- just\n- a list\n",
                &["bad.yaml", "document 1", "expected a Kubernetes object"],
            ),
            (
                "second document",
                "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 0}]}\n",
                &["Service default/web", "spec.ports[0].port"],
            ),
        ];
        for (what, text, needles) in cases {
            let dir = Dir::new("errors");
            dir.write("bad.yaml", text);
            let mut store = ManifestStore::default();
            let errors = store.reload(&dir.0);
            assert_eq!(errors.len(), 1, "{what}: one error expected, got {errors:#?}");
            let message = errors[0].to_string();
            for needle in *needles {
                assert!(
                    message.contains(needle),
                    "{what}: {message:?} should contain {needle:?}"
                );
            }
            assert!(
                store.desired(cidr()).0.is_empty(),
                "{what}: nothing from an invalid file"
            );
        }
    }

    enum Action<'a> {
        Write(&'a str, &'a str),
        Remove(&'a str),
    }

    #[test]
    fn last_good_state_is_kept_and_vanished_files_dropped() {
        use Action::{Remove, Write};
        let dir = Dir::new("lifecycle");
        let mut store = ManifestStore::default();
        let broken_web = WEB_SERVICE.replace("port: 80\n", "port: 80000\n");
        // (what, actions, expected errors, web programmed, db programmed)
        let steps: &[(&str, &[Action], usize, bool, bool)] = &[
            (
                "both files good",
                &[Write("web.yaml", WEB_SERVICE), Write("db.yaml", PLAIN_SERVICE)],
                0,
                true,
                true,
            ),
            (
                "web.yaml becomes invalid: its last good state stays",
                &[Write("web.yaml", &broken_web)],
                1,
                true,
                true,
            ),
            (
                "web.yaml becomes unparseable: still kept",
                &[Write("web.yaml", "kind: [\n")],
                1,
                true,
                true,
            ),
            ("db.yaml removed: dropped", &[Remove("db.yaml")], 1, true, false),
            (
                "web.yaml removed while broken: dropped",
                &[Remove("web.yaml")],
                0,
                false,
                false,
            ),
        ];
        for (what, actions, want_errors, want_web, want_db) in steps {
            for action in *actions {
                match action {
                    Write(file, text) => dir.write(file, text),
                    Remove(file) => dir.remove(file),
                }
            }
            let errors = store.reload(&dir.0);
            assert_eq!(errors.len(), *want_errors, "{what}: errors {errors:#?}");
            for error in &errors {
                assert!(
                    error.to_string().contains("web.yaml"),
                    "{what}: {error} names the file"
                );
            }
            let (desired, _) = store.desired(cidr());
            assert_eq!(
                endpoints_at(&desired, "10.96.0.10", 80, Protocol::Tcp).is_some(),
                *want_web,
                "{what}: web programmed"
            );
            assert_eq!(
                endpoints_at(&desired, "10.96.0.20", 5432, Protocol::Tcp).is_some(),
                *want_db,
                "{what}: db programmed"
            );
        }

        dir.write("web.yaml", WEB_SERVICE);
        assert!(store.reload(&dir.0).is_empty(), "web.yaml good again");
        let errors = store.reload(&dir.0.join("nope"));
        assert!(
            matches!(errors.as_slice(), [ManifestError::ListDir { .. }]),
            "a missing directory is reported: {errors:#?}"
        );
        let (desired, _) = store.desired(cidr());
        assert!(
            endpoints_at(&desired, "10.96.0.10", 80, Protocol::Tcp).is_some(),
            "an unlistable directory changes nothing"
        );
    }

    #[test]
    fn duplicate_definitions_and_frontends_warn() {
        let copy = WEB_SERVICE.replace("targetPort: web", "targetPort: 8080");
        let clash = WEB_SERVICE.replace("name: web\n", "name: web2\n");
        let cases = [
            (
                "same Service in two files: the later file wins",
                copy.as_str(),
                "a.yaml; using the later definition",
                1,
                8080,
            ),
            (
                "two Services on one frontend: the first keeps it",
                clash.as_str(),
                "already used by shop/web",
                3,
                9000,
            ),
        ];
        for (what, second, warning, count, port) in cases {
            let pod = pod("a", Some("10.1.0.1"), "Running", "True", &[("web", 9000, "TCP")]);
            let (desired, warnings) = desired(
                "duplicates",
                &[("a.yaml", WEB_SERVICE), ("b.yaml", second), ("p.yaml", &pod)],
            );
            assert_eq!(warnings.len(), count, "{what}: warnings {warnings:?}");
            assert!(
                warnings.iter().any(|w| w.contains(warning)),
                "{what}: {warnings:?} should say {warning:?}"
            );
            let want = vec![ep("10.1.0.1", port)];
            assert_eq!(
                endpoints_at(&desired, "10.96.0.10", 80, Protocol::Tcp),
                Some(want),
                "{what}"
            );
        }
    }

    #[test]
    fn selector_service_endpoints_follow_pod_state() {
        let terminating = pod("t", Some("10.1.0.9"), "Running", "True", &[("web", 8080, "TCP")]).replace(
            "  namespace: shop\n",
            "  namespace: shop\n  deletionTimestamp: \"2025-01-01T00:00:00Z\"\n",
        );
        let ready = pod("r", Some("10.1.0.1"), "Running", "True", &[("web", 8080, "TCP")]);
        let unready = pod("u", Some("10.1.0.2"), "Running", "False", &[("web", 8080, "TCP")]);
        let publish = WEB_SERVICE.replace("  selector:", "  publishNotReadyAddresses: true\n  selector:");
        let cases = [
            (
                "terminating ignored while another is ready",
                WEB_SERVICE,
                vec![&ready, &terminating],
                vec![ep("10.1.0.1", 8080)],
            ),
            (
                "terminating but serving used when nothing is ready",
                WEB_SERVICE,
                vec![&unready, &terminating],
                vec![ep("10.1.0.9", 8080)],
            ),
            (
                "publishNotReadyAddresses",
                publish.as_str(),
                vec![&unready],
                vec![ep("10.1.0.2", 8080)],
            ),
        ];
        for (what, svc, pods, want) in cases {
            let pods: String = pods.into_iter().map(String::as_str).collect();
            let (desired, _) = desired("podstate", &[("svc.yaml", svc), ("pods.yaml", &pods)]);
            assert_eq!(
                endpoints_at(&desired, "10.96.0.10", 80, Protocol::Tcp),
                Some(want),
                "{what}"
            );
        }
    }
}
