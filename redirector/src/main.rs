//! The `redirector` binary: parse the command line, run the command.

mod cli;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    // Milliseconds: start-up and programming steps are timed from the log.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    cli::Cli::parse().command.run()
}
