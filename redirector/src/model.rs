//! The service model: what the datapath should do, independent of where the
//! objects came from (manifest files or the Kubernetes API).

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use redirector_common::proto;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proto::TCP,
            Protocol::Udp => proto::UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            proto::TCP => Some(Protocol::Tcp),
            proto::UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// Kubernetes' spelling (`TCP`, `UDP`).
    pub fn as_k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// Where clients send: a service address, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.protocol)
    }
}

/// Where packets go: an endpoint address and the port it listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

/// `namespace/name`: which Service is meant (Kubernetes' `NamespacedName`;
/// the manifest source keys its other objects by it too).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `namespace/name:port-name`, kube-proxy's name for a service port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port: String,
}

impl ServicePortName {
    /// The Service the port belongs to.
    pub fn service(&self) -> NamespacedName {
        NamespacedName {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port)
        }
    }
}

/// One programmed service port: its name, and the endpoints new flows may pick
/// (sorted, without duplicates; empty means "refuse" or "drop", as
/// `no_endpoints` says).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: ServicePortName,
    pub endpoints: Vec<Endpoint>,
    /// The port's other endpoints that are still serving (sorted): terminating
    /// ones while some are ready, and those topology or the Local policy
    /// leave out. New flows never pick them; flows already on one (picked
    /// while it was in `endpoints`) keep it while it serves, as kube-proxy
    /// clears a UDP endpoint's conntrack entries only once it stops serving
    /// or goes.
    pub also_serving: Vec<Endpoint>,
    /// What new flows get while `endpoints` is empty; always
    /// [`NoEndpoints::Reject`] when it is not, so equal behaviour compares equal.
    pub no_endpoints: NoEndpoints,
    /// `sessionAffinity: ClientIP`: a client's new connections keep the
    /// endpoint its last one used.
    pub affinity: Option<ClientIpAffinity>,
    /// What operators see about it (`redirector get`/`describe`); not used
    /// for forwarding.
    pub info: ServiceInfo,
}

/// `sessionAffinity: ClientIP` with its timeout
/// (`sessionAffinityConfig.clientIP.timeoutSeconds`, default 10800): until a
/// client has opened no connection for that long, its new ones go to the
/// endpoint its last one used, as kube-proxy's `recent` match does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ClientIpAffinity {
    pub timeout_seconds: u32,
}

impl ClientIpAffinity {
    /// The API server's default timeout.
    pub const DEFAULT_TIMEOUT_SECONDS: u32 = 10_800;
}

/// What kube-proxy does with new connections to a service port that has no
/// endpoint to send them to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum NoEndpoints {
    /// No usable endpoint anywhere: refused (REJECT, ICMP port unreachable),
    /// so clients fail at once.
    #[default]
    Reject,
    /// `internalTrafficPolicy: Local` while the endpoints are all on other
    /// nodes: dropped silently, as kube-proxy's "has no local endpoints" DROP.
    Drop,
}

/// The node an agent runs on, as far as choosing endpoints goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeTopology {
    /// `--node-name`. Without it no endpoint is local (kube-proxy with an
    /// empty hostname does the same).
    pub name: Option<String>,
    /// The Node's `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
}

/// The parts of a Service that explain a service port to an operator.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceInfo {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// `None` for a Service without selector (endpoints written by hand).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// `ClusterIP`, `NodePort`, `LoadBalancer`.
    #[serde(default)]
    pub service_type: String,
    /// `None` or `ClientIP`.
    #[serde(default)]
    pub session_affinity: String,
    /// With `ClientIP`: the timeout in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_seconds: Option<u32>,
    /// The port's `targetPort` as written: a number or a container port name.
    #[serde(default)]
    pub target_port: String,
    /// Position of the port in `spec.ports` (the first one names `*_SERVICE_PORT`).
    #[serde(default)]
    pub port_index: usize,
    /// `metadata.creationTimestamp` (RFC 3339), for AGE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// `spec.internalTrafficPolicy`, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    /// `spec.externalTrafficPolicy`, when set (it governs node ports and
    /// external addresses, which the datapath does not serve).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_traffic_policy: Option<String>,
    /// `spec.trafficDistribution`, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<String>,
    /// Which topology hints this node followed when choosing the endpoints.
    #[serde(default, skip_serializing_if = "TopologyMode::is_none")]
    pub topology: TopologyMode,
    /// The node the endpoints were chosen for, and its zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Endpoints exist, none on this node, and the policy is Local: new
    /// connections are dropped ([`NoEndpoints::Drop`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_local_endpoints: bool,
}

/// Which endpoints a node prefers, from the hints the EndpointSlice
/// controller wrote (kube-proxy's `topologyModeFromHints`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TopologyMode {
    /// Every ready endpoint, wherever it is.
    #[default]
    None,
    /// The endpoints hinted for this node's zone (`hints.forZones`).
    PreferSameZone,
    /// The endpoints hinted for this node (`hints.forNodes`).
    PreferSameNode,
}

impl TopologyMode {
    pub fn is_none(&self) -> bool {
        *self == TopologyMode::None
    }
}

impl fmt::Display for TopologyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TopologyMode::None => "none",
            TopologyMode::PreferSameZone => "PreferSameZone",
            TopologyMode::PreferSameNode => "PreferSameNode",
        })
    }
}

/// Everything the datapath should hold, keyed by frontend.
pub type Desired = BTreeMap<Frontend, ServicePort>;

/// An IPv4 prefix such as `10.96.0.0/12`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid IPv4 CIDR {input:?}: expected ADDRESS/PREFIX-LENGTH such as 10.96.0.0/12")]
pub struct CidrParseError {
    input: String,
}

impl Ipv4Cidr {
    pub fn mask(&self) -> u32 {
        if self.prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix_len))
        }
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.addr) & self.mask()
    }

    /// Number of addresses in the prefix.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix_len))
    }

    /// The address `offset` places after the network address.
    pub fn nth(&self, offset: u64) -> Option<Ipv4Addr> {
        (offset < self.size()).then(|| Ipv4Addr::from((u32::from(self.addr) & self.mask()) + offset as u32))
    }
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = CidrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || CidrParseError { input: s.to_owned() };
        let (addr, len) = s.split_once('/').ok_or_else(err)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| err())?;
        let prefix_len: u8 = len.parse().map_err(|_| err())?;
        if prefix_len > 32 {
            return Err(err());
        }
        Ok(Self { addr, prefix_len })
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// 64-bit FNV-1a: a hash that, unlike std's, is fixed forever, so allocated
/// cluster IPs and record digests survive upgrades.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::fnv1a;

    #[test]
    fn fnv1a_is_the_standard_one() {
        let cases: [(&str, u64); 3] = [
            ("", 0xcbf2_9ce4_8422_2325),
            ("a", 0xaf63_dc4c_8601_ec8c),
            ("foobar", 0x8594_4171_f739_67e8),
        ];
        for (input, want) in cases {
            assert_eq!(fnv1a(input.as_bytes()), want, "FNV-1a 64 of {input:?}");
        }
    }
}
