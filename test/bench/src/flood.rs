//! B9: a connection flood at saturation through the redirector lane while
//! idle established connections stay open. The flood's flows close with RST
//! and so end in CLOSE: the agent's sweeper must remove them fast enough
//! that new flows always find room, while the idle flows (ESTABLISHED, a
//! 24 h timeout) are never removed and still carry their connections after.
//!
//! The table is sized so the flood alone would fill it many times over: it
//! opens two entries per connection, and without the sweeper it is full
//! after `table_entries / (2 × rate)` seconds. To keep that well inside even
//! a quick run while the live share stays small, the CLOSE timeout and the
//! sweep interval are shortened by the agent's own flags (a flow lives at
//! most timeout + interval after its RST).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddrV4, TcpStream};
use std::time::{Duration, Instant};

use redirector::datapath::{self, maps::Maps};
use redirector_common::conntrack::FlowState;
use redirector_common::counters;
use serde::Serialize;
use testbed::http_get;
use testbed::in_netns;
use testbed::lanes::{AgentExtras, Lane, LaneOptions, Reply, ServiceSet};

use crate::measure::{self, RateResult};
use crate::progress::Progress;

const METRICS_PORT: u16 = 10249;
const IO_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    /// How long the flood lasts, seconds.
    pub seconds: f64,
    /// Idle established connections held open through it.
    pub idle: usize,
    pub services: usize,
    pub endpoints: usize,
    /// Client threads of the flood (as B3).
    pub threads: usize,
    /// `--max-flow-entries`: connection-table entries (two per flow).
    pub table_entries: u32,
    /// `--conntrack-tcp-timeout-close`, seconds.
    pub tcp_close_seconds: u32,
    /// `--conntrack-sweep-interval`, seconds.
    pub sweep_interval_seconds: u32,
}

impl Default for Config {
    /// The full run: 60 s of flood. Two entries per flow and at most
    /// close timeout + sweep interval (3 s) of closed flows alive: at the
    /// bench's rate (~35,000 connections/s) about 210,000 entries, 40% of
    /// the table, while without the sweeper the flood fills it in ~7.5 s.
    fn default() -> Self {
        Self {
            seconds: 60.0,
            idle: 1_000,
            services: 1_000,
            endpoints: 2,
            threads: 4,
            table_entries: 1 << 19,
            tcp_close_seconds: 2,
            sweep_interval_seconds: 1,
        }
    }
}

/// What the sweeper's metrics said.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SweepMetrics {
    pub sweeps: f64,
    pub sweep_seconds: f64,
    pub expired: f64,
    pub early_drops: f64,
    /// The upper bound of the highest histogram bucket any sweep fell in.
    pub slowest_bucket: Option<f64>,
    /// `redirector_conntrack_flows` by state at the last sweep.
    pub flows: BTreeMap<String, f64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct B9 {
    pub config: Option<Config>,
    pub error: Option<String>,
    pub flood: RateResult,
    pub flood_seconds: f64,
    /// Flows the datapath opened during the flood (its new-flow counter).
    pub flows_opened: u64,
    /// New flows the datapath dropped for a full table, or as clashes.
    pub dropped_full: u64,
    pub dropped_clash: u64,
    /// The agent's CPU time (user + system) over the flood, seconds.
    pub agent_cpu_seconds: f64,
    /// The sweeper's metrics over the flood (differences), and its flows by
    /// state at the first sweep after the flood.
    pub during: SweepMetrics,
    pub after: SweepMetrics,
    pub idle_opened: usize,
    /// Idle connections that answered after the flood, from the endpoint
    /// they first reached.
    pub idle_answered: usize,
    pub idle_first_failure: Option<String>,
}

pub fn run(config: &Config, agent: &std::path::Path, progress: &Progress) -> B9 {
    let mut result = B9 {
        config: Some(config.clone()),
        ..Default::default()
    };
    progress.stage("B9", 4);
    if let Err(e) = run_inner(config, agent, &mut result, progress) {
        progress.log(&format!("B9 failed: {e}"));
        result.error = Some(e);
    }
    result
}

fn run_inner(
    config: &Config,
    agent: &std::path::Path,
    result: &mut B9,
    progress: &Progress,
) -> Result<(), String> {
    progress.doing("B9: building the lane".into());
    let options = LaneOptions {
        agent: Some(agent.to_owned()),
        max_services: config.services,
        endpoints: config.endpoints,
    };
    let extras = AgentExtras {
        flow_entries: Some(config.table_entries),
        metrics_port: Some(METRICS_PORT),
        args: vec![
            "--conntrack-tcp-timeout-close".into(),
            format!("{}s", config.tcp_close_seconds),
            "--conntrack-sweep-interval".into(),
            format!("{}s", config.sweep_interval_seconds),
        ],
        // Each idle connection holds a server thread; the flood needs its own.
        server_threads: config.idle + 4 * config.threads,
    };
    let mut lane = Lane::new_redirector(&options, &extras).map_err(|e| format!("building the lane: {e}"))?;
    let set = ServiceSet::new(config.services, config.endpoints);
    lane.program(&set, config.services, Duration::from_secs(120))
        .map_err(|e| format!("programming {} services: {e}", config.services))?;
    progress.advance(1);

    progress.doing(format!("B9: opening {} idle connections", config.idle));
    let targets: Vec<SocketAddrV4> = (0..config.idle)
        .map(|i| lane.target(i % config.services))
        .collect();
    let mut idle = in_netns(
        &lane.client,
        move || -> Result<Vec<(TcpStream, Reply)>, String> {
            targets
                .into_iter()
                .map(|to| {
                    let mut stream = TcpStream::connect_timeout(&to.into(), IO_TIMEOUT)
                        .map_err(|e| format!("{to}: {e}"))?;
                    let reply = ask(&mut stream).map_err(|e| format!("{to}: {e}"))?;
                    Ok((stream, reply))
                })
                .collect()
        },
    )
    .map_err(|e| format!("opening the idle connections: {e}"))?;
    result.idle_opened = idle.len();
    progress.advance(1);

    let pid = lane.agent_pid().ok_or("the agent is not running")?;
    let maps = Maps::from_pins(&datapath::maps_pin_dir(lane.fixture.bpffs.path()))
        .map_err(|e| format!("opening the agent's maps: {e}"))?;
    let node = lane.fixture.node.clone();
    let scrape = || -> Result<String, String> {
        let (status, body) = http_get(
            &node,
            SocketAddrV4::new([127, 0, 0, 1].into(), METRICS_PORT),
            "/metrics",
        )
        .map_err(|e| format!("scraping /metrics: {e}"))?;
        (status == 200)
            .then_some(body)
            .ok_or(format!("/metrics answered {status}"))
    };
    let counters_now = || {
        maps.counter_totals()
            .map_err(|e| format!("reading the counters: {e}"))
    };

    progress.doing(format!("B9: flood for {:.0}s", config.seconds));
    let metrics_before = sweep_metrics(&scrape()?);
    let counters_before = counters_now()?;
    let cpu_before = process_cpu_seconds(pid)?;
    let started = Instant::now();
    // Every service in turn: nearly every connection is a new tuple. (To
    // one service, a client port's next connection would reuse its last
    // tuple and replace that closed flow in place: ~28,000 ephemeral ports
    // would bound the table without any sweeper.)
    let targets = (0..config.services).map(|i| lane.target(i)).collect();
    result.flood = measure::saturate_over(
        &lane.client,
        targets,
        config.threads,
        Duration::from_secs_f64(config.seconds),
    );
    result.flood_seconds = started.elapsed().as_secs_f64();
    result.agent_cpu_seconds = process_cpu_seconds(pid)? - cpu_before;
    let counters_after = counters_now()?;
    let metrics_after = sweep_metrics(&scrape()?);
    let delta = |i: u32| counters_after[i as usize] - counters_before[i as usize];
    result.flows_opened = delta(counters::FORWARD_NEW_FLOW);
    result.dropped_full = delta(counters::DROP_CT_FULL);
    result.dropped_clash = delta(counters::DROP_CT_CLASH);
    result.during = SweepMetrics {
        sweeps: metrics_after.sweeps - metrics_before.sweeps,
        sweep_seconds: metrics_after.sweep_seconds - metrics_before.sweep_seconds,
        expired: metrics_after.expired - metrics_before.expired,
        early_drops: metrics_after.early_drops - metrics_before.early_drops,
        slowest_bucket: metrics_after.slowest_bucket,
        flows: BTreeMap::new(),
    };
    progress.advance(1);

    // The table as the first sweep after the flood found it.
    progress.doing("B9: the next sweep, then the idle connections".into());
    let deadline = Instant::now() + Duration::from_secs(u64::from(config.sweep_interval_seconds) * 3 + 10);
    result.after = loop {
        let now = sweep_metrics(&scrape()?);
        if now.sweeps > metrics_after.sweeps {
            break now;
        }
        if Instant::now() > deadline {
            return Err("no sweep after the flood".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for (k, (stream, first)) in idle.iter_mut().enumerate() {
        match ask(stream) {
            Ok(reply) if reply.local == first.local => result.idle_answered += 1,
            Ok(reply) => {
                result.idle_first_failure.get_or_insert(format!(
                    "idle connection {k} was first answered at {}, now at {}",
                    first.local, reply.local
                ));
            }
            Err(e) => {
                result
                    .idle_first_failure
                    .get_or_insert(format!("idle connection {k} ({}): {e}", first.local));
            }
        }
    }
    progress.advance(1);
    progress.log(&format!(
        "B9: {:.0} connections/s for {:.0}s, {} flows opened ({:.1}x the table), agent CPU {:.2}s, \
         {}/{} idle connections answer",
        result.flood.connections_per_second,
        result.flood_seconds,
        result.flows_opened,
        (2 * result.flows_opened) as f64 / f64::from(config.table_entries),
        result.agent_cpu_seconds,
        result.idle_answered,
        result.idle_opened
    ));
    Ok(())
}

/// One request/answer on an open connection.
fn ask(stream: &mut TcpStream) -> std::io::Result<Reply> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&*stream).read_line(&mut line)?;
    Reply::parse(&line).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected answer {line:?}"),
        )
    })
}

/// User + system CPU time of process `pid` so far, all its threads.
fn process_cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("reading /proc/{pid}/stat: {e}"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let ticks = |i: usize| -> Result<f64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or(format!("/proc/{pid}/stat has no field {}", i + 3))
    };
    Ok((ticks(11)? + ticks(12)?) / measure::clock_ticks_per_second())
}

/// The sweeper's series in a /metrics text.
fn sweep_metrics(text: &str) -> SweepMetrics {
    let value = |series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let count = value("redirector_conntrack_sweep_duration_seconds_count");
    // The first bucket whose cumulative count holds every sweep.
    let slowest_bucket = (count > 0.0)
        .then(|| {
            text.lines()
                .filter_map(|l| l.strip_prefix("redirector_conntrack_sweep_duration_seconds_bucket{le=\""))
                .filter_map(|l| {
                    let (le, v) = l.split_once("\"}")?;
                    Some((le.parse::<f64>().ok()?, v.trim().parse::<f64>().ok()?))
                })
                .find(|&(_, cumulative)| cumulative >= count)
                .map(|(le, _)| le)
        })
        .flatten();
    SweepMetrics {
        sweeps: count,
        sweep_seconds: value("redirector_conntrack_sweep_duration_seconds_sum"),
        expired: value("redirector_conntrack_expired_total"),
        early_drops: value("redirector_conntrack_early_drops_total"),
        slowest_bucket,
        flows: FlowState::ALL
            .iter()
            .map(|s| {
                let v = value(&format!("redirector_conntrack_flows{{state=\"{}\"}}", s.name()));
                (s.name().to_owned(), v)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweepers_series_are_read_from_the_exposition() {
        let text = "# HELP x\n\
            redirector_conntrack_sweep_duration_seconds_sum 0.25\n\
            redirector_conntrack_sweep_duration_seconds_count 5\n\
            redirector_conntrack_sweep_duration_seconds_bucket{le=\"0.01\"} 2\n\
            redirector_conntrack_sweep_duration_seconds_bucket{le=\"0.1\"} 5\n\
            redirector_conntrack_sweep_duration_seconds_bucket{le=\"+Inf\"} 5\n\
            redirector_conntrack_expired_total 1234\n\
            redirector_conntrack_early_drops_total 0\n\
            redirector_conntrack_flows{state=\"ESTABLISHED\"} 1000\n\
            redirector_conntrack_flows{state=\"CLOSE\"} 77\n";
        let m = sweep_metrics(text);
        assert_eq!(
            (m.sweeps, m.sweep_seconds),
            (5.0, 0.25),
            "histogram count and sum"
        );
        assert_eq!((m.expired, m.early_drops), (1234.0, 0.0), "counters with _total");
        assert_eq!(
            m.slowest_bucket,
            Some(0.1),
            "the first bucket holding every sweep"
        );
        assert_eq!(m.flows.get("ESTABLISHED"), Some(&1000.0), "flows by state");
        assert_eq!(m.flows.get("CLOSE"), Some(&77.0), "flows by state");
        assert_eq!(m.flows.get("SYN_SENT"), Some(&0.0), "a state not listed is 0");
    }

    #[test]
    fn cpu_time_of_this_process_is_read() {
        let before = process_cpu_seconds(std::process::id()).expect("own /proc/<pid>/stat");
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let after = process_cpu_seconds(std::process::id()).expect("own /proc/<pid>/stat");
        assert!(
            after - before >= 0.05,
            "100 ms of spinning counted as {:.3} s of CPU",
            after - before
        );
    }
}
