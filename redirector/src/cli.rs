//! Command-line interface.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::datapath::{self, MapSizes, Maps};
use crate::interfaces::InterfaceGlobs;
use crate::model::Ipv4Cidr;

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
    Run(RunArgs),
    /// Print the datapath's packet counters (summed over CPUs).
    Counters {
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

#[derive(Args)]
pub struct RunArgs {
    /// Directory of Kubernetes YAML (Service, Pod, Endpoints, EndpointSlice).
    #[arg(long)]
    pub manifests: PathBuf,
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
    /// Connection table capacity (two entries per flow; oldest evicted).
    #[arg(long, default_value_t = MapSizes::default().flows)]
    pub max_flow_entries: u32,
}

impl RunArgs {
    pub fn map_sizes(&self) -> MapSizes {
        MapSizes {
            services: self.max_service_entries,
            backends: self.max_backends,
            flows: self.max_flow_entries,
            ..MapSizes::default()
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
