//! `redirector counters`: one `name value` line per datapath counter.

use anyhow::Context;
use clap::Args;
use redirector::datapath::{Maps, maps_pin_dir};

use super::BpffsArg;

#[derive(Args)]
pub struct CountersArgs {
    #[command(flatten)]
    pins: BpffsArg,
}

pub fn run(args: CountersArgs) -> anyhow::Result<()> {
    let totals = Maps::from_pins(&maps_pin_dir(&args.pins.bpffs))
        .and_then(|maps| maps.counter_totals())
        .context("redirector counters")?;
    for (label, value) in redirector_common::counters::LABELS.iter().zip(totals) {
        println!("{label} {value}");
    }
    Ok(())
}
