//! `redirector run`: the agent.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use redirector::agent::{self, AgentConfig, Source};
use redirector::conntrack::Timeouts;
use redirector::datapath::socket::SocketLb;
use redirector::datapath::{AttachMode, MapSizes};
use redirector::interfaces::InterfaceGlobs;
use redirector::model::Ipv4Cidr;
use redirector::source::kube::Connection;
use redirector::source::service_cidrs::DEFAULT_SERVICE_CIDR;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = AgentConfig {
        map_sizes: args.map_sizes(),
        source: args.source(),
        conntrack_timeouts: args.conntrack_timeouts(),
        node_name: args.node_name.clone(),
        healthz_bind_address: args.healthz_bind_address.0,
        healthz_timeout: args.healthz_timeout.0,
        metrics_bind_address: args.metrics_bind_address.0,
        interfaces: args.interfaces,
        bpffs: args.bpffs,
        attach_mode: args.tc_attach,
        socket_lb: args.socket_lb,
        cgroup_root: args.cgroup_root,
        conntrack_sweep_interval: args.conntrack_sweep_interval.0,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(agent::run(config))
        .context("redirector run")
}

#[derive(Args)]
pub struct RunArgs {
    /// Directory of Kubernetes YAML (Service, Pod, Endpoints, EndpointSlice).
    /// Without it, Services and EndpointSlices are watched from the Kubernetes API.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// kubeconfig for the API (default: in-cluster config, else KUBECONFIG, else ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// API server address, overriding the config's (never a ClusterIP this agent programs).
    #[arg(long)]
    pub api_server: Option<String>,
    /// This node's name: endpoints whose nodeName it is are local (internalTrafficPolicy: Local,
    /// PreferSameNode), and its Node's zone label selects zone hints.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Serve Services labelled service.kubernetes.io/service-proxy-name=<this> (and only those).
    #[arg(long)]
    pub service_proxy_name: Option<String>,
    /// Interfaces to attach to (node side of pod interfaces), comma-separated globs.
    #[arg(long, value_parser = InterfaceGlobs::parse)]
    pub interfaces: InterfaceGlobs,
    /// bpffs mount for the pinned maps; mounted if it is not one yet.
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Service range: unused addresses in it are dropped. With --manifests
    /// (default 10.96.0.0/12) it is also where missing clusterIPs are
    /// allocated from. On the API, the ServiceCIDR objects give the ranges;
    /// this one is used only if the API server does not serve them (< 1.33).
    #[arg(long)]
    pub service_cidr: Option<Ipv4Cidr>,
    /// Service map capacity (service ports plus endpoint slots).
    #[arg(long, default_value_t = MapSizes::default().services)]
    pub max_service_entries: u32,
    /// Backend map capacity (endpoints summed over service ports).
    #[arg(long, default_value_t = MapSizes::default().backends)]
    pub max_backends: u32,
    /// Where to serve /healthz and /livez ("" to disable); kube-proxy's default.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: BindAddress,
    /// How long a change may wait for its sync before /livez fails, and for
    /// every service port of it to be programmed before /healthz fails
    /// (kube-proxy: twice its 30s sync period).
    #[arg(long, default_value = "1m")]
    pub healthz_timeout: GoDuration,
    /// Where to serve Prometheus /metrics ("" to disable); kube-proxy's default.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: BindAddress,
    /// Service port capacity (per-port statistics and records; IDs stay below it).
    #[arg(long, default_value_t = MapSizes::default().service_ports)]
    pub max_service_ports: u32,
    /// How the programs are attached: tcx links (Linux >= 6.6), netlink TC
    /// filters at a fixed priority and handle (older kernels), or auto.
    /// Either way they stay attached when the agent exits.
    #[arg(long, default_value = "auto")]
    pub tc_attach: AttachMode,
    /// Connect-time translation (cgroup socket programs) for the sockets of
    /// the host network namespace (host), of every network namespace (all),
    /// or none (off). Pods are translated per packet unless `all` translated
    /// their sockets already.
    #[arg(long, default_value = "host")]
    pub socket_lb: SocketLb,
    /// The cgroup the socket programs attach to, and so serve with all
    /// below it (default: the cgroup v2 mount found in /proc/mounts).
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Connection table capacity (two entries per flow). A full table
    /// refuses new flows; it never evicts an open one.
    #[arg(long, default_value_t = MapSizes::default().flows)]
    pub max_flow_entries: u32,
    /// Idle time after which an established TCP flow ends (kube-proxy's flag).
    #[arg(long, default_value = "24h")]
    pub conntrack_tcp_timeout_established: GoDuration,
    /// Idle time after which a TCP flow one side closed ends (kube-proxy's flag).
    #[arg(long, default_value = "1h")]
    pub conntrack_tcp_timeout_close_wait: GoDuration,
    /// Idle time after which a TCP flow without a complete handshake ends
    /// (the kernel's default).
    #[arg(long, default_value = "2m")]
    pub conntrack_tcp_timeout_syn_sent: GoDuration,
    /// Idle time after which a TCP flow both sides closed ends (the kernel's default).
    #[arg(long, default_value = "2m")]
    pub conntrack_tcp_timeout_time_wait: GoDuration,
    /// Idle time after which a reset TCP flow ends (the kernel's default).
    #[arg(long, default_value = "10s")]
    pub conntrack_tcp_timeout_close: GoDuration,
    /// Idle time after which a UDP flow ends (kube-proxy's flag; the kernel's default).
    #[arg(long, default_value = "30s")]
    pub conntrack_udp_timeout: GoDuration,
    /// The same for a UDP flow answered and still going after 2 s (kube-proxy's flag).
    #[arg(long, default_value = "2m")]
    pub conntrack_udp_timeout_stream: GoDuration,
    /// How often ended flows are removed from the connection table.
    #[arg(long, default_value = "10s")]
    pub conntrack_sweep_interval: GoDuration,
}

impl RunArgs {
    pub fn source(&self) -> Source {
        match &self.manifests {
            Some(dir) => Source::Manifests {
                dir: dir.clone(),
                service_cidr: self.service_cidr.unwrap_or(DEFAULT_SERVICE_CIDR),
            },
            None => Source::Kubernetes {
                connection: Connection {
                    kubeconfig: self.kubeconfig.clone(),
                    api_server: self.api_server.clone(),
                },
                service_proxy_name: self.service_proxy_name.clone(),
                service_cidr: self.service_cidr,
            },
        }
    }

    pub fn conntrack_timeouts(&self) -> Timeouts {
        Timeouts {
            tcp_syn_sent: self.conntrack_tcp_timeout_syn_sent.0,
            tcp_established: self.conntrack_tcp_timeout_established.0,
            tcp_close_wait: self.conntrack_tcp_timeout_close_wait.0,
            tcp_time_wait: self.conntrack_tcp_timeout_time_wait.0,
            tcp_close: self.conntrack_tcp_timeout_close.0,
            udp: self.conntrack_udp_timeout.0,
            udp_stream: self.conntrack_udp_timeout_stream.0,
        }
    }

    pub fn map_sizes(&self) -> MapSizes {
        MapSizes {
            services: self.max_service_entries,
            backends: self.max_backends,
            flows: self.max_flow_entries,
            service_ports: self.max_service_ports,
            ..MapSizes::default()
        }
    }
}

/// A duration as kube-proxy's flags write it (`24h0m0s`, `1h`, `90s`, `250ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoDuration(pub std::time::Duration);

impl std::str::FromStr for GoDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parsed: jiff::SignedDuration = s
            .parse()
            .map_err(|e| format!("{s:?} is not a duration like 24h0m0s, 90s or 250ms: {e}"))?;
        std::time::Duration::try_from(parsed)
            .map(Self)
            .map_err(|_| format!("{s:?}: a duration cannot be negative"))
    }
}

/// `IP:PORT` to listen on, or empty for "off".
#[derive(Clone, Copy, Debug)]
pub struct BindAddress(pub Option<SocketAddr>);

impl std::str::FromStr for BindAddress {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            Ok(Self(None))
        } else {
            s.parse().map(|a| Self(Some(a)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_read_as_kube_proxy_writes_them() {
        for (text, seconds) in [
            ("24h0m0s", 86_400.0),
            ("1h", 3_600.0),
            ("90s", 90.0),
            ("250ms", 0.25),
            ("2m", 120.0),
        ] {
            let parsed: GoDuration = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(parsed.0.as_secs_f64(), seconds, "{text}");
        }
        for bad in ["", "soon", "-5s"] {
            assert!(bad.parse::<GoDuration>().is_err(), "{bad:?} is refused");
        }
    }
}
