//! Command-line interface.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::agent::Source;
use crate::datapath::{self, MapSizes, Maps};
use crate::interfaces::InterfaceGlobs;
use crate::model::{Ipv4Cidr, Protocol};
use crate::source::kube::Connection;

#[derive(Parser)]
#[command(
    name = "redirector",
    version,
    about = "eBPF service redirector for Kubernetes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Program and attach the datapath, and keep it in sync with the manifests.
    Run(Box<RunArgs>),
    /// Print the datapath's packet counters (summed over CPUs).
    Counters {
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// Read-only views of the live datapath.
    #[command(flatten)]
    View(View),
    /// Detach the datapath from every interface and free its maps (what a
    /// stopped agent leaves in place so restarts are hitless).
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

/// The read-only views: they print what an agent pinned and change nothing.
#[derive(Subcommand)]
pub enum View {
    /// List services or endpoints as the datapath holds them (like kubectl get).
    Get {
        #[command(subcommand)]
        what: GetWhat,
    },
    /// Show one service as programmed, with traffic and drift (like kubectl describe).
    Describe {
        #[command(subcommand)]
        what: DescribeWhat,
    },
    /// The service environment variables a pod created in the namespace would get.
    Env {
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
    /// What the loaded program would do with a new connection (no packet sent, no state left).
    Explain {
        /// Client address, IP[:PORT] (port default 40000).
        #[arg(long, value_parser = parse_from)]
        from: SocketAddrV4,
        /// Destination, IP:PORT[/tcp|udp] (default tcp).
        #[arg(long, value_parser = parse_to)]
        to: (SocketAddrV4, Protocol),
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

/// Which namespaces, and how to print.
#[derive(Args, Clone)]
pub struct ListArgs {
    #[arg(short, long, default_value = "default")]
    pub namespace: String,
    /// All namespaces.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Output format: table (default) or json.
    #[arg(short, long, default_value = "table", value_parser = ["table", "json"])]
    pub output: String,
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
}

#[derive(Subcommand)]
pub enum GetWhat {
    #[command(visible_alias = "svc")]
    Services(ListArgs),
    #[command(visible_alias = "ep")]
    Endpoints {
        /// Only this service.
        name: Option<String>,
        #[command(flatten)]
        list: ListArgs,
    },
}

#[derive(Subcommand)]
pub enum DescribeWhat {
    #[command(visible_alias = "svc")]
    Service {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("invalid address {input:?}: expected {expected}")]
pub struct AddressError {
    input: String,
    expected: &'static str,
}

fn parse_from(s: &str) -> Result<SocketAddrV4, AddressError> {
    let err = || AddressError {
        input: s.to_owned(),
        expected: "an IPv4 address with an optional :PORT, e.g. 10.244.0.5:40000",
    };
    if let Ok(addr) = s.parse::<SocketAddrV4>() {
        return Ok(addr);
    }
    s.parse::<std::net::Ipv4Addr>()
        .map(|ip| SocketAddrV4::new(ip, 40000))
        .map_err(|_| err())
}

fn parse_to(s: &str) -> Result<(SocketAddrV4, Protocol), AddressError> {
    let err = || AddressError {
        input: s.to_owned(),
        expected: "IP:PORT with an optional /tcp or /udp, e.g. 10.96.0.10:80/tcp",
    };
    let (addr, proto) = match s.rsplit_once('/') {
        Some((addr, "tcp" | "TCP")) => (addr, Protocol::Tcp),
        Some((addr, "udp" | "UDP")) => (addr, Protocol::Udp),
        Some(_) => return Err(err()),
        None => (s, Protocol::Tcp),
    };
    Ok((addr.parse().map_err(|_| err())?, proto))
}

/// Runs a read-only view, printing its output.
pub fn view(view: View) -> Result<(), crate::inspect::InspectError> {
    use crate::datapath::record::Snapshot;
    use crate::inspect::{self, Scope};
    let scope = |l: &ListArgs| {
        if l.all_namespaces {
            Scope::All
        } else {
            Scope::Namespace(l.namespace.clone())
        }
    };
    let now = std::time::SystemTime::now();
    let out = match view {
        View::Get {
            what: GetWhat::Services(list),
        } => {
            let snapshot = Snapshot::read(&list.bpffs)?;
            if list.output == "json" {
                format!("{:#}\n", inspect::services_json(&snapshot, &scope(&list), None))
            } else {
                inspect::get_services(&snapshot, &scope(&list), now)
            }
        }
        View::Get {
            what: GetWhat::Endpoints { name, list },
        } => {
            let snapshot = Snapshot::read(&list.bpffs)?;
            if list.output == "json" {
                format!(
                    "{:#}\n",
                    inspect::services_json(&snapshot, &scope(&list), name.as_deref())
                )
            } else {
                inspect::get_endpoints(&snapshot, &scope(&list), name.as_deref(), now)
            }
        }
        View::Describe {
            what:
                DescribeWhat::Service {
                    name,
                    namespace,
                    bpffs,
                },
        } => inspect::describe_service(&Snapshot::read(&bpffs)?, &namespace, &name, &bpffs)?,
        View::Env { namespace, bpffs } => inspect::env(&Snapshot::read(&bpffs)?, &namespace),
        View::Explain {
            from,
            to: (to, protocol),
            bpffs,
        } => {
            let snapshot = Snapshot::read(&bpffs)?;
            let run = inspect::run_explain(&bpffs, from, to, protocol)?;
            inspect::explain(&snapshot, from, to, protocol, &run)
        }
    };
    print!("{out}");
    Ok(())
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
    /// This node's name (recorded for topology-aware routing; informational for now).
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

/// `redirector counters`: one `name value` line per counter.
pub fn print_counters(bpffs: &std::path::Path) -> Result<(), datapath::maps::MapsError> {
    let maps = Maps::from_pins(&datapath::maps_pin_dir(bpffs))?;
    let totals = maps.counter_totals()?;
    for (label, value) in redirector_common::counters::LABELS.iter().zip(totals) {
        println!("{label} {value}");
    }
    Ok(())
}
