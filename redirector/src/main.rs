//! The `redirector` binary: parse the command line, set up logging, run the
//! command.

mod cli;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    cli::logging::init(cli.log_format);
    cli.command.run()
}
