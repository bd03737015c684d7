//! `redirector run`: the agent.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use redirector::agent::{self, AgentConfig, Source};
use redirector::datapath::{AttachMode, MapSizes};
use redirector::interfaces::InterfaceGlobs;
use redirector::model::Ipv4Cidr;
use redirector::source::kube::Connection;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = AgentConfig {
        map_sizes: args.map_sizes(),
        source: args.source(),
        node_name: args.node_name.clone(),
        healthz_bind_address: args.healthz_bind_address.0,
        metrics_bind_address: args.metrics_bind_address.0,
        interfaces: args.interfaces,
        bpffs: args.bpffs,
        service_cidr: args.service_cidr,
        attach_mode: args.tc_attach,
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
    /// Range ClusterIPs are allocated from; unused addresses in it are refused.
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cidr: Ipv4Cidr,
    /// Service map capacity (service ports plus endpoint slots).
    #[arg(long, default_value_t = MapSizes::default().services)]
    pub max_service_entries: u32,
    /// Backend map capacity (endpoints summed over service ports).
    #[arg(long, default_value_t = MapSizes::default().backends)]
    pub max_backends: u32,
    /// Where to serve /healthz and /livez ("" to disable); kube-proxy's default.
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: BindAddress,
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
    /// Connection table capacity (two entries per flow; oldest evicted).
    #[arg(long, default_value_t = MapSizes::default().flows)]
    pub max_flow_entries: u32,
}

impl RunArgs {
    pub fn source(&self) -> Source {
        match &self.manifests {
            Some(dir) => Source::Manifests(dir.clone()),
            None => Source::Kubernetes {
                connection: Connection {
                    kubeconfig: self.kubeconfig.clone(),
                    api_server: self.api_server.clone(),
                },
                service_proxy_name: self.service_proxy_name.clone(),
            },
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
