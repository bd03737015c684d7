//! `redirector cleanup`: remove every pin an agent left (as `kube-proxy --cleanup`).

use anyhow::Context;
use clap::Args;

use super::BpffsArg;

#[derive(Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pins: BpffsArg,
}

pub fn run(args: CleanupArgs) -> anyhow::Result<()> {
    let bpffs = &args.pins.bpffs;
    let removed = redirector::datapath::cleanup(bpffs)
        .with_context(|| format!("removing redirector's pins under {}", bpffs.display()))?;
    println!("removed {removed} pins under {}", bpffs.display());
    Ok(())
}
