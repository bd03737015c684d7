use anyhow::Context;
use clap::Parser;
use redirector::agent::{self, AgentConfig};
use redirector::cli::{self, Cli, Command};

fn main() -> anyhow::Result<()> {
    // Milliseconds: start-up and programming steps are timed from the log.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    match Cli::parse().command {
        Command::Run(args) => {
            let config = AgentConfig {
                map_sizes: args.map_sizes(),
                source: args.source(),
                healthz_bind_address: args.healthz_bind_address.0,
                metrics_bind_address: args.metrics_bind_address.0,
                interfaces: args.interfaces,
                bpffs: args.bpffs,
                service_cidr: args.service_cidr,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(agent::run(config))
                .context("redirector run")
        }
        Command::Counters { bpffs } => cli::print_counters(&bpffs).context("redirector counters"),
        Command::View(view) => cli::view(view).map_err(anyhow::Error::from),
        Command::Cleanup { bpffs } => {
            let removed = redirector::datapath::cleanup(&bpffs)
                .with_context(|| format!("removing redirector's pins under {}", bpffs.display()))?;
            println!("removed {removed} pins under {}", bpffs.display());
            Ok(())
        }
    }
}
