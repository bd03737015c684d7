//! What the sources warn of: objects that are valid but will not do what they
//! seem to. Each variant names the object it is about and carries the field
//! at fault, so callers (and tests) can tell them apart without reading text.

use std::fmt;
use std::path::PathBuf;

use super::endpoints::{SERVICE_NAME_LABEL, SLICE_CONTROLLER};
use super::service_cidrs::LeftOut;
use crate::model::{Frontend, Ipv4Cidr, NamespacedName};
use redirector_common::config::MAX_SERVICE_CIDRS;

/// The kinds of object a source reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    Service,
    Pod,
    Endpoints,
    EndpointSlice,
    Node,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Service => "Service",
            ObjectKind::Pod => "Pod",
            ObjectKind::Endpoints => "Endpoints",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
        })
    }
}

/// The object a warning is about: `Kind namespace/name` (`Kind name` for
/// cluster-scoped kinds, whose namespace is empty), and for the manifest
/// source the file that defines it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceObject {
    pub kind: ObjectKind,
    pub name: NamespacedName,
    pub file: Option<PathBuf>,
}

impl SourceObject {
    /// A Service seen through the Kubernetes API.
    pub fn service(name: NamespacedName) -> Self {
        Self {
            kind: ObjectKind::Service,
            name,
            file: None,
        }
    }
}

impl fmt::Display for SourceObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name.name)?;
        } else {
            write!(f, "{} {}", self.kind, self.name)?;
        }
        match &self.file {
            Some(file) => write!(f, " ({})", file.display()),
            None => Ok(()),
        }
    }
}

/// Something a source ignores or cannot program, logged as it happens.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Warning {
    /// The same object in two places; the later one is used, as with
    /// `kubectl apply`.
    #[error("{object}: also defined in {}; using the later definition", earlier.display())]
    DefinedTwice { object: SourceObject, earlier: PathBuf },
    /// Hand-written Endpoints of a Service with a selector, which the
    /// endpoints controller would overwrite.
    #[error(
        "{endpoints}: ignored, because Service {service} has a selector and Kubernetes would overwrite it \
         from the Pods"
    )]
    EndpointsOfSelectorService {
        endpoints: SourceObject,
        service: NamespacedName,
    },
    /// A copy of a controller-owned slice of a Service with a selector.
    #[error(
        "{slice}: ignored, because it is managed by {SLICE_CONTROLLER}, which would rewrite it from the \
         Pods of Service {service}"
    )]
    ControllerSliceOfSelectorService {
        slice: SourceObject,
        service: NamespacedName,
    },
    /// An endpoint port (`name`, `protocol`) that no port of the Service takes.
    #[error("{object}: port name {port_name:?} ({protocol}) matches no port of Service {service}; ignored")]
    UnmatchedPort {
        object: SourceObject,
        port_name: String,
        protocol: String,
        service: NamespacedName,
    },
    /// `spec.clusterIP` is IPv6, which the datapath does not handle.
    #[error("{service}: IPv6 clusterIP {cluster_ip} is not supported; not programmed")]
    Ipv6ClusterIp {
        service: SourceObject,
        cluster_ip: String,
    },
    /// `spec.clusterIP` is not an address.
    #[error("{service}: invalid clusterIP {cluster_ip:?}; not programmed")]
    InvalidClusterIp {
        service: SourceObject,
        cluster_ip: String,
    },
    /// No `spec.clusterIP`, and the service CIDR has no address left for it.
    #[error("{service}: no free address left in service CIDR {service_cidr}; not programmed")]
    ServiceCidrFull {
        service: SourceObject,
        service_cidr: Ipv4Cidr,
    },
    /// A `spec.ports[].port` over SCTP, which the datapath does not
    /// translate: the TC path would have to recompute SCTP's CRC32c over the
    /// whole packet to rewrite a port, and the socket path serves only the
    /// node's own processes (see the README's semantics table).
    #[error(
        "{service}: port {port}/SCTP is not programmed (the datapath translates only TCP and UDP); \
         SCTP packets to the clusterIP on port {port} are passed on untranslated, as to any address"
    )]
    SctpPort { service: SourceObject, port: i32 },
    /// A frontend another Service holds already; the first keeps it, as
    /// kube-proxy does.
    #[error("{service}: {frontend} is already used by Service {holder}; ignored")]
    FrontendTaken {
        service: SourceObject,
        frontend: Frontend,
        holder: NamespacedName,
    },
    /// Endpoints or an EndpointSlice whose Service does not exist.
    #[error("{object}: no Service {service} in its namespace; ignored")]
    NoSuchService {
        object: SourceObject,
        service: NamespacedName,
    },
    /// An EndpointSlice without the label naming its Service.
    #[error("{slice}: no {SERVICE_NAME_LABEL} label; ignored")]
    NoServiceNameLabel { slice: SourceObject },
    /// A `spec.cidrs[index]` of a ServiceCIDR (cluster-scoped: no namespace)
    /// that is not a CIDR.
    #[error(
        "ServiceCIDR {name}: spec.cidrs[{index}] {value:?} is not a CIDR; ignored (the other service \
         ranges apply)"
    )]
    InvalidServiceCidr {
        name: String,
        index: usize,
        value: String,
    },
    /// More service ranges than the datapath holds: those left out are not
    /// checked, so traffic to their unused addresses is routed onward.
    #[error(
        "the datapath holds {MAX_SERVICE_CIDRS} service ranges; unused addresses of {} are not dropped",
        left_out.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
    )]
    ServiceCidrsLeftOut { left_out: Vec<LeftOut> },
}
