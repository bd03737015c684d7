//! The benchmark suite (`cargo xtask bench [--quick] [--services N,N,…]`).
//!
//! Seven lanes (client netns → node netns → server netns over veth), all
//! built at once: bare, bare + conntrack, kube-proxy's iptables ruleset
//! through iptables-legacy and iptables-nft, kube-proxy's nftables ruleset,
//! the redirector's TC programs, and its socket programs (`--socket-lb=all`,
//! clients in the lane's test cgroup: child processes, see [`client`]). For
//! each number of services N, every lane is programmed with N
//! services × E endpoints, checked (the right backend answers), then measured
//! in interleaved rounds (A B C … A B C …):
//!
//! - B1 new-connection latency (connect, and connect + request/response +
//!   RST close), target service last and at random positions;
//! - B2 the same to the plain pod IP (the tax on traffic that is no service);
//! - B3 connection rate at saturation and machine CPU per connection;
//! - B4 request/response round trips and single-stream throughput on an
//!   established connection.
//!
//! Then B5 (BPF_PROG_TEST_RUN per-packet cost), B6 (programming: agent vs
//! kube-proxy's rulesets), B7 (agent RSS, map memory) and B9 (a connection
//! flood with idle connections open: the sweeper). Every figure is the
//! median over rounds with min–max; ratios are taken per round, in the same
//! run. Output: `<out>/report.md`, `report.json`, `connect_latency.png`.
//!
//! `bench --agent PATH [--out DIR] [--quick] [--services N,N,…] [--rounds R]
//!        [--endpoints E] [--skip lanes,b5,b6,b6-rulesets,b9]`

mod chart;
mod client;
mod flood;
mod measure;
mod programming;
mod progress;
mod progrun;
mod report;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde::Serialize;
use testbed::lanes::{Lane, LaneKind, LaneOptions, ServiceSet};
use testbed::require_root;

use measure::{ConnectBatch, EstablishedResult, RateResult, Rng};
use progress::Progress;

/// The benchmark suite: redirector against bare and kube-proxy lanes (root).
#[derive(Debug, Parser)]
#[command(name = "bench")]
struct Args {
    /// The release redirector binary to measure.
    #[arg(long, value_name = "PATH")]
    agent: PathBuf,
    /// Where report.md, report.json and connect_latency.png are written.
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    out: PathBuf,
    /// Small N and short batches: for the trends, not for the absolute figures.
    #[arg(long)]
    quick: bool,
    /// The numbers of services to measure at (instead of the run's own).
    #[arg(long, value_name = "N,N,…", value_delimiter = ',', value_parser = at_least::<1>)]
    services: Option<Vec<usize>>,
    /// Measurement rounds per lane and N.
    #[arg(long, value_name = "R", value_parser = at_least::<1>)]
    rounds: Option<usize>,
    /// Endpoints per service (at least 2, so that selection runs).
    #[arg(long, value_name = "E", value_parser = at_least::<2>)]
    endpoints: Option<usize>,
    /// Parts of the run to leave out.
    #[arg(
        long,
        value_name = "PART,…",
        value_delimiter = ',',
        value_parser = ["lanes", "b5", "b6", "b6-rulesets", "b9"],
    )]
    skip: Vec<String>,
}

/// A count of at least `MIN`.
fn at_least<const MIN: usize>(text: &str) -> Result<usize, String> {
    let n: usize = text.parse().map_err(|e| format!("{e}"))?;
    if n < MIN {
        return Err(format!("must be at least {MIN}"));
    }
    Ok(n)
}

/// What a run does; `quick` and full differ only in these numbers.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub quick: bool,
    pub services: Vec<usize>,
    pub endpoints: usize,
    pub rounds: usize,
    /// New connections per B1/B2 batch.
    pub samples: usize,
    /// kube-proxy lanes run up to this N.
    pub kube_proxy_max: usize,
    pub rate_seconds: f64,
    pub rate_threads: usize,
    pub round_trips: usize,
    pub stream_bytes: u64,
    pub load_cap_seconds: f64,
    pub b5: progrun::Config,
    pub b6: programming::Config,
    pub b9: flood::Config,
    pub skip: BTreeSet<String>,
}

impl Config {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                quick,
                services: vec![100, 1_000, 5_000],
                endpoints: 2,
                rounds: 5,
                samples: 100,
                kube_proxy_max: 30_000,
                rate_seconds: 0.5,
                rate_threads: 4,
                round_trips: 500,
                stream_bytes: 256 << 20,
                load_cap_seconds: 60.0,
                b5: progrun::Config {
                    services: vec![1, 1_000, 10_000],
                    endpoints: 2,
                    flows_per_round: 2_000,
                    rounds: 5,
                    repeat: 10_000,
                },
                b6: programming::Config {
                    services: 1_000,
                    endpoints: 10,
                    changes: 30,
                    kube_proxy_changes: 3,
                    burst: 200,
                    load_cap: Duration::from_secs(120),
                },
                b9: flood::Config {
                    seconds: 30.0,
                    ..flood::Config::default()
                },
                skip: BTreeSet::new(),
            }
        } else {
            Self {
                quick,
                services: vec![1_000, 10_000, 30_000, 100_000],
                endpoints: 2,
                rounds: 5,
                samples: 500,
                kube_proxy_max: 30_000,
                rate_seconds: 1.0,
                rate_threads: 4,
                round_trips: 1_000,
                stream_bytes: 1 << 30,
                load_cap_seconds: 150.0,
                b5: progrun::Config {
                    services: vec![1, 1_000, 10_000, 100_000],
                    endpoints: 2,
                    flows_per_round: 10_000,
                    rounds: 5,
                    repeat: 100_000,
                },
                b6: programming::Config {
                    services: 10_000,
                    endpoints: 10,
                    changes: 100,
                    kube_proxy_changes: 10,
                    burst: 1_000,
                    load_cap: Duration::from_secs(180),
                },
                b9: flood::Config::default(),
                skip: BTreeSet::new(),
            }
        }
    }
}

/// One measurement round of one lane at one N.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Round {
    pub last: ConnectBatch,
    pub random: ConnectBatch,
    pub pod: ConnectBatch,
    pub rate: RateResult,
    pub established: EstablishedResult,
}

/// One lane at one N.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LaneStep {
    pub lane: LaneKindName,
    pub services: usize,
    pub load_seconds: Option<f64>,
    pub load_how: Option<String>,
    /// Why the lane was not measured at this N.
    pub skipped: Option<String>,
    /// The correctness check: None when it passed.
    pub check_error: Option<String>,
    pub checked: bool,
    pub rounds: Vec<Round>,
    /// bpf run-time statistics under saturation: ns per program run, runs.
    pub bpf_stats: Option<(f64, u64)>,
    pub bpf_stats_error: Option<String>,
    pub footprint: Option<programming::Footprint>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LaneKindName(pub &'static str);

#[derive(Clone, Debug, Default, Serialize)]
pub struct Meta {
    pub started_unix: u64,
    pub kernel: String,
    pub cpus: usize,
    pub seconds: f64,
    pub iptables: String,
    pub nft: String,
    /// `git describe` of the tree measured (with -dirty for local changes).
    pub tree: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub config: Config,
    pub meta: Meta,
    pub steps: Vec<LaneStep>,
    pub b5: Option<progrun::B5>,
    pub b6: Option<programming::B6>,
    pub b9: Option<flood::B9>,
    pub notes: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some(client::LANE_CLIENT) {
        return client::main(&argv[2..]);
    }
    let Args {
        agent,
        out,
        quick,
        services,
        rounds,
        endpoints,
        skip,
    } = Args::parse();
    if !agent.exists() {
        bail!("agent binary {} does not exist", agent.display());
    }
    require_root();
    let mut config = Config::new(quick);
    if let Some(mut s) = services {
        s.sort_unstable();
        s.dedup();
        config.services = s;
    }
    if let Some(r) = rounds {
        config.rounds = r;
    }
    if let Some(e) = endpoints {
        config.endpoints = e;
    }
    config.skip = skip.into_iter().collect();
    for tool in ["iptables-legacy-restore", "iptables-nft-restore", "nft"] {
        let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        if !found {
            bail!("{tool} is missing: `cargo xtask setup` installs iptables and nftables");
        }
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let started = Instant::now();
    let meta = Meta {
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        seconds: 0.0,
        iptables: tool_version("iptables-legacy", "--version"),
        nft: tool_version("nft", "--version"),
        tree: std::process::Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map_or_else(
                || "unknown".into(),
                |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
            ),
    };
    let progress = Progress::new();
    progress.log(&format!(
        "{} run: N = {:?}, {} endpoints, {} rounds, {} connections per batch",
        if quick { "quick" } else { "full" },
        config.services,
        config.endpoints,
        config.rounds,
        config.samples
    ));
    let mut results = Results {
        config: config.clone(),
        meta,
        steps: Vec::new(),
        b5: None,
        b6: None,
        b9: None,
        notes: Vec::new(),
    };
    if !config.skip.contains("lanes") {
        run_lanes(&config, &agent, &mut results, &progress)?;
    }
    if !config.skip.contains("b5") {
        progress.log("B5: BPF_PROG_TEST_RUN");
        results.b5 = Some(progrun::run(&config.b5, &progress));
    }
    if !config.skip.contains("b6") {
        let rulesets = !config.skip.contains("b6-rulesets");
        results.b6 = Some(programming::run(&agent, &config.b6, rulesets, &progress));
    }
    if !config.skip.contains("b9") {
        results.b9 = Some(flood::run(&config.b9, &agent, &progress));
    }
    results.meta.seconds = started.elapsed().as_secs_f64();
    let json = serde_json::to_string_pretty(&results)?;
    std::fs::write(out.join("report.json"), json)?;
    let markdown = report::markdown(&results);
    std::fs::write(out.join("report.md"), &markdown)?;
    // The figures are in the reports already: a chart that fails costs only itself.
    if let Err(e) = report::chart(&results, &out.join("connect_latency.png")) {
        progress.log(&format!("no chart: {:#}", anyhow::Error::new(e)));
    }
    progress.log(&format!(
        "done in {:.0}s: {}/report.md, report.json, connect_latency.png",
        results.meta.seconds,
        out.display()
    ));
    Ok(())
}

fn tool_version(tool: &str, arg: &str) -> String {
    std::process::Command::new(tool)
        .arg(arg)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn run_lanes(
    config: &Config,
    agent: &Path,
    results: &mut Results,
    progress: &Progress,
) -> anyhow::Result<()> {
    let max = config.services.iter().copied().max().unwrap_or(1);
    let options = LaneOptions {
        agent: Some(agent.to_owned()),
        max_services: max,
        endpoints: config.endpoints,
    };
    // Steps: building each lane; at each N, programming each lane, its three
    // measurements per round (connections, rate, established), the cross-check.
    let built = LaneKind::BENCH.len() as u64;
    let per_n = built * (1 + 3 * config.rounds as u64) + 1;
    progress.stage("lanes", built + per_n * config.services.len() as u64);
    progress.log("building the lanes");
    let mut lanes = Vec::new();
    for kind in LaneKind::BENCH {
        progress.doing(format!("building {}", kind.name()));
        let lane =
            Lane::new(kind, &options).map_err(|e| anyhow::anyhow!("building lane {}: {e}", kind.name()))?;
        lanes.push(lane);
        progress.advance(1);
    }
    let set = ServiceSet::new(max, config.endpoints);
    let cap = Duration::from_secs_f64(config.load_cap_seconds);
    // A lane that failed to load at some N is not tried at larger N.
    let mut dead: Vec<Option<String>> = vec![None; lanes.len()];
    for (done_n, &n) in (1..).zip(&config.services) {
        progress.log(&format!("N = {n}: programming the lanes"));
        let mut steps: Vec<LaneStep> = Vec::new();
        for (k, lane) in lanes.iter_mut().enumerate() {
            progress.doing(format!("N = {n}: programming {}", lane.kind.name()));
            let mut step = LaneStep {
                lane: LaneKindName(lane.kind.name()),
                services: n,
                ..Default::default()
            };
            let kube_proxy = matches!(
                lane.kind,
                LaneKind::IptablesLegacy | LaneKind::IptablesNft | LaneKind::Nftables
            );
            if let Some(why) = &dead[k] {
                step.skipped = Some(why.clone());
            } else if kube_proxy && n > config.kube_proxy_max {
                step.skipped = Some(format!(
                    "kube-proxy lanes run up to {} services",
                    config.kube_proxy_max
                ));
            } else {
                match lane.program(&set, n, cap) {
                    Ok(p) => {
                        step.load_seconds = Some(p.took.as_secs_f64());
                        step.load_how = Some(p.how);
                        progress.log(&format!(
                            "  {}: {n} services loaded in {:.2}s",
                            lane.kind.name(),
                            p.took.as_secs_f64()
                        ));
                    }
                    Err(e) => {
                        progress.log(&format!(
                            "  {}: loading {n} services failed: {e}",
                            lane.kind.name()
                        ));
                        let why = format!("loading {n} services failed: {e}");
                        step.skipped = Some(why.clone());
                        dead[k] = Some(format!("not tried: {why}"));
                    }
                }
            }
            if step.skipped.is_none() {
                let random = Rng::new(n as u64 ^ 0x5eed).below(n);
                step.checked = true;
                if let Err(e) = client::check(lane, n, random) {
                    progress.log(&format!("  {}: correctness check FAILED: {e}", lane.kind.name()));
                    step.check_error = Some(e);
                }
            }
            if lane.kind == LaneKind::Redirector && step.skipped.is_none() {
                step.footprint = Some(match lane.agent_pid() {
                    Some(pid) => programming::footprint(pid, lane.fixture.bpffs.path(), n, config.endpoints),
                    None => programming::pinned_footprint(lane.fixture.bpffs.path(), n, config.endpoints),
                });
            }
            steps.push(step);
            progress.advance(1);
        }
        let active: Vec<usize> = (0..lanes.len())
            .filter(|&k| steps[k].skipped.is_none() && steps[k].check_error.is_none())
            .collect();
        progress.log(&format!(
            "N = {n}: {} rounds over {} lanes ({})",
            config.rounds,
            active.len(),
            active
                .iter()
                .map(|&k| lanes[k].kind.name())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let batch_cap = Duration::from_secs(30);
        for round in 0..config.rounds {
            let doing = |what: &str, lane: &Lane| {
                progress.doing(format!(
                    "N = {n}, round {}/{}: {what}, {}",
                    round + 1,
                    config.rounds,
                    lane.kind.name()
                ));
            };
            // The same random positions for every lane in a round.
            let mut rng = Rng::new((n as u64) << 8 | round as u64);
            let positions: Vec<usize> = (0..config.samples).map(|_| rng.below(n)).collect();
            let mut this_round: Vec<Round> = vec![Round::default(); lanes.len()];
            for &k in &active {
                let lane = &lanes[k];
                doing("new connections", lane);
                let last = vec![lane.target(n - 1); config.samples];
                this_round[k].last = client::connect_batch(lane, last, batch_cap);
                let random = positions.iter().map(|&i| lane.target(i)).collect();
                this_round[k].random = client::connect_batch(lane, random, batch_cap);
                let pod = vec![lane.pod_target(); config.samples];
                this_round[k].pod = client::connect_batch(lane, pod, batch_cap);
                progress.advance(1);
            }
            for &k in &active {
                let lane = &lanes[k];
                doing("connection rate", lane);
                this_round[k].rate = client::saturate(
                    lane,
                    lane.target(n - 1),
                    config.rate_threads,
                    Duration::from_secs_f64(config.rate_seconds),
                );
                progress.advance(1);
            }
            for &k in &active {
                let lane = &lanes[k];
                doing("established connection", lane);
                this_round[k].established =
                    client::established(lane, lane.target(n - 1), config.round_trips, config.stream_bytes);
                progress.advance(1);
            }
            for &k in &active {
                steps[k].rounds.push(this_round[k].clone());
            }
            let summary: Vec<String> = active
                .iter()
                .map(|&k| format!("{} {:.1}", lanes[k].kind.name(), this_round[k].last.connect.p50))
                .collect();
            progress.log(&format!(
                "  round {}: connect p50 µs (target last): {}",
                round + 1,
                summary.join(", ")
            ));
        }
        // Cross-check the program's cost under real traffic.
        if let Some(k) = active
            .iter()
            .copied()
            .find(|&k| lanes[k].kind == LaneKind::Redirector)
        {
            let lane = &lanes[k];
            progress.doing(format!("N = {n}: cross-checking the program's cost"));
            match lane.agent_pid() {
                Some(pid) => {
                    let (client, target) = (lane.client.clone(), lane.target(n - 1));
                    let threads = config.rate_threads;
                    let secs = config.rate_seconds;
                    match progrun::cross_check(pid, || {
                        measure::saturate(&client, target, threads, Duration::from_secs_f64(secs));
                    }) {
                        Ok(v) => steps[k].bpf_stats = Some(v),
                        Err(e) => steps[k].bpf_stats_error = Some(e),
                    }
                }
                None => steps[k].bpf_stats_error = Some("no agent process found: not cross-checked".into()),
            }
        }
        results.steps.extend(steps);
        // Lanes not measured at this N skip their steps.
        progress.reach(built + per_n * done_n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::Args;

    #[test]
    fn flags_parse_as_xtask_and_the_docs_spell_them() {
        Args::command().debug_assert();
        let args = Args::try_parse_from([
            "bench",
            "--agent",
            "target/release/redirector",
            "--out",
            "/tmp/out",
            "--quick",
            "--services",
            "1000,100",
            "--rounds",
            "3",
            "--endpoints",
            "4",
            "--skip",
            "lanes,b6-rulesets,b9",
        ])
        .expect("valid flags");
        assert_eq!(args.agent.to_str(), Some("target/release/redirector"));
        assert_eq!(args.out.to_str(), Some("/tmp/out"));
        assert!(args.quick);
        assert_eq!(args.services, Some(vec![1000, 100]));
        assert_eq!((args.rounds, args.endpoints), (Some(3), Some(4)));
        assert_eq!(args.skip, ["lanes", "b6-rulesets", "b9"]);
        let defaults = Args::try_parse_from(["bench", "--agent", "a"]).expect("only --agent is required");
        assert_eq!(defaults.out.to_str(), Some("target/bench"));
        assert!(!defaults.quick && defaults.services.is_none() && defaults.skip.is_empty());
    }

    #[test]
    fn bad_flags_are_refused() {
        for bad in [
            &["bench"][..],
            &["bench", "--agent", "a", "--services", "100,0"],
            &["bench", "--agent", "a", "--rounds", "0"],
            &["bench", "--agent", "a", "--endpoints", "1"],
            &["bench", "--agent", "a", "--skip", "b7"],
            &["bench", "--agent", "a", "--bogus"],
        ] {
            assert!(Args::try_parse_from(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
