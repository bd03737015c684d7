//! Where B1's "random position" overhead goes: new connections on a bare lane
//! and on a redirector lane (agent, N services × 2 endpoints) to the same
//! service every time, to random services, and to random ones among ten,
//! with the kernel's BPF run-time statistics on while the redirector lane
//! runs. Prints, per round and pattern, both connect p50s, their ratio, and
//! the program's ns per run (four runs per connection: SYN, SYN-ACK, ACK, RST).
//!
//! `connect_probe --agent PATH [--services N] [--rounds R] [--connections C]`

use std::net::{SocketAddrV4, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use testbed::in_netns;
use testbed::lanes::{Lane, LaneKind, LaneOptions, ServiceSet, set_linger_zero};
use testbed::procfs::{enable_run_time_stats, prog_stats};

/// Where the redirector's connect overhead goes (root): bare vs redirector
/// lane, same, random and random-of-ten services.
#[derive(Debug, Parser)]
#[command(name = "connect_probe")]
struct Args {
    /// The release redirector binary.
    #[arg(long, value_name = "PATH")]
    agent: PathBuf,
    /// Services on each lane (at least 10: one pattern picks among ten).
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = at_least::<10>)]
    services: usize,
    /// Rounds of the three patterns.
    #[arg(long, value_name = "R", default_value_t = 4)]
    rounds: usize,
    /// New connections per pattern and lane.
    #[arg(long, value_name = "C", default_value_t = 400, value_parser = at_least::<1>)]
    connections: usize,
}

/// A count of at least `MIN`.
fn at_least<const MIN: usize>(text: &str) -> Result<usize, String> {
    let n: usize = text.parse().map_err(|e| format!("{e}"))?;
    if n < MIN {
        return Err(format!("must be at least {MIN}"));
    }
    Ok(n)
}

/// Connect p50 in µs over `targets`, each connection closed with RST.
fn connect_p50(client: &str, targets: Vec<SocketAddrV4>) -> anyhow::Result<f64> {
    in_netns(client, move || -> anyhow::Result<f64> {
        let mut samples = Vec::with_capacity(targets.len());
        for to in targets {
            let started = Instant::now();
            let stream = TcpStream::connect_timeout(&to.into(), Duration::from_secs(1))
                .with_context(|| format!("connecting to {to}"))?;
            samples.push(started.elapsed().as_secs_f64() * 1e6);
            set_linger_zero(&stream)?;
        }
        samples.sort_by(f64::total_cmp);
        Ok(samples[samples.len() / 2])
    })
}

fn main() -> anyhow::Result<()> {
    let Args {
        agent,
        services,
        rounds,
        connections,
    } = Args::parse();
    let options = LaneOptions {
        agent: Some(agent),
        max_services: services,
        endpoints: 2,
    };
    let set = ServiceSet::new(services, 2);
    let cap = Duration::from_secs(120);
    let mut bare = Lane::new(LaneKind::Bare, &options).map_err(anyhow::Error::msg)?;
    bare.program(&set, services, cap).map_err(anyhow::Error::msg)?;
    let mut redirector = Lane::new(LaneKind::Redirector, &options).map_err(anyhow::Error::msg)?;
    redirector
        .program(&set, services, cap)
        .map_err(anyhow::Error::msg)?;
    let pid = redirector.agent_pid().context("the agent process")?;

    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = move |below: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % below as u64) as usize
    };
    println!("{services} services x 2 endpoints, {connections} connections per pattern and lane");
    for round in 1..=rounds {
        for pattern in ["same service", "random", "random of 10"] {
            let picks: Vec<usize> = (0..connections)
                .map(|_| match pattern {
                    "same service" => services - 1,
                    "random" => random(services),
                    _ => random(10),
                })
                .collect();
            let bare_p50 = connect_p50(&bare.client, picks.iter().map(|&i| bare.target(i)).collect())?;
            let stats = enable_run_time_stats().context("enabling BPF run-time statistics")?;
            let before = prog_stats(pid).context("the agent holds no program fd")?;
            let ours = connect_p50(
                &redirector.client,
                picks.iter().map(|&i| redirector.target(i)).collect(),
            )?;
            let after = prog_stats(pid).context("the agent holds no program fd")?;
            drop(stats);
            let runs = after.1 - before.1;
            println!(
                "round {round} {pattern:>12}: connect p50 bare {bare_p50:.1} us, redirector {ours:.1} us \
                 (x{:.3}); program {:.0} ns per run over {runs} runs",
                ours / bare_p50,
                (after.0 - before.0) as f64 / runs.max(1) as f64
            );
        }
    }
    Ok(())
}
