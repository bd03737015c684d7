//! Command-line interface: one module per command. Each command's `run` is
//! the binary's edge, where errors get their context.

mod cleanup;
mod conntrack;
mod counters;
mod describe;
mod env;
mod explain;
mod get;
pub mod logging;
mod run;
mod views;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "redirector",
    version,
    about = "eBPF service redirector for Kubernetes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr (the level is set with RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t)]
    pub log_format: logging::LogFormat,
}

#[derive(Subcommand)]
pub enum Command {
    /// Program and attach the datapath, and keep it in sync with the manifests.
    Run(Box<run::RunArgs>),
    /// Print the datapath's packet counters (summed over CPUs).
    Counters(counters::CountersArgs),
    /// List services or endpoints as the datapath holds them (like kubectl get).
    Get(get::GetArgs),
    /// Show one service as programmed, with traffic and drift (like kubectl describe).
    Describe(describe::DescribeArgs),
    /// The service environment variables a pod created in the namespace would get.
    Env(env::EnvArgs),
    /// What the loaded program would do with a new connection (no packet sent, no state left).
    Explain(explain::ExplainArgs),
    /// List or delete the connection table's flows (like conntrack -L / -D).
    Conntrack(conntrack::ConntrackArgs),
    /// Detach the datapath from every interface and free its maps (what a
    /// stopped agent leaves in place so restarts are hitless).
    Cleanup(cleanup::CleanupArgs),
}

impl Command {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Command::Run(args) => run::run(*args),
            Command::Counters(args) => counters::run(args),
            Command::Get(args) => get::run(args),
            Command::Describe(args) => describe::run(args),
            Command::Env(args) => env::run(args),
            Command::Explain(args) => explain::run(args),
            Command::Conntrack(args) => conntrack::run(args),
            Command::Cleanup(args) => cleanup::run(args),
        }
    }
}

// Where an agent pinned its maps and program; every command but `run` only
// reads it. (A plain comment: clap would take a doc comment as help text.)
#[derive(clap::Args, Clone)]
pub struct BpffsArg {
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
}
