//! Where a lane's client measurements run. Every lane but the socket lane:
//! on threads of this process in the lane's client netns. The socket lane
//! translates at `connect()` only for processes in its test cgroup, so there
//! the same measurement runs in a child process (this binary again, as
//! `bench lane-client`) that the lane starts in its cgroup and client netns;
//! the job goes in on stdin and the result comes back on stdout, as JSON.

use std::io::Read as _;
use std::net::SocketAddrV4;
use std::time::Duration;

use redirector::datapath::{self, maps::Maps};
use redirector_common::counters;
use serde::{Deserialize, Serialize};
use testbed::lanes::{Lane, LaneKind, check_from_here};

use crate::measure::{self, ConnectBatch, EstablishedResult, RateResult};

/// The first argument that makes the binary a lane client.
pub const LANE_CLIENT: &str = "lane-client";

#[derive(Debug, Serialize, Deserialize)]
enum Job {
    Check {
        lane: String,
        endpoints: usize,
        services: usize,
        random: usize,
    },
    Connect {
        targets: Vec<SocketAddrV4>,
        cap: Duration,
    },
    Saturate {
        target: SocketAddrV4,
        threads: usize,
        duration: Duration,
    },
    Established {
        target: SocketAddrV4,
        round_trips: usize,
        stream: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
enum Outcome {
    Check(Result<(), String>),
    Connect(ConnectBatch),
    Saturate(RateResult),
    Established(EstablishedResult),
}

/// Runs `job` with the client netns `client`; `in_place`: the caller is in
/// it already (a lane client).
fn perform(job: Job, client: &str, in_place: bool) -> Outcome {
    match job {
        Job::Check {
            lane,
            endpoints,
            services,
            random,
        } => Outcome::Check(match LaneKind::named(&lane) {
            Some(kind) if in_place => check_from_here(kind, endpoints, services, random),
            Some(kind) => {
                testbed::in_netns(client, move || check_from_here(kind, endpoints, services, random))
            }
            None => Err(format!("no lane {lane:?}")),
        }),
        Job::Connect { targets, cap } => Outcome::Connect(measure::connect_batch(client, targets, cap)),
        Job::Saturate {
            target,
            threads,
            duration,
        } => Outcome::Saturate(measure::saturate(client, target, threads, duration)),
        Job::Established {
            target,
            round_trips,
            stream,
        } => Outcome::Established(measure::established(client, target, round_trips, stream)),
    }
}

/// `bench lane-client NETNS`: one job from stdin, its outcome on stdout.
pub fn main(args: &[String]) -> anyhow::Result<()> {
    let [netns] = args else {
        anyhow::bail!("usage: bench {LANE_CLIENT} NETNS (the job as JSON on stdin)");
    };
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let job: Job = serde_json::from_str(&input)?;
    let outcome = perform(job, netns, true);
    println!("{}", serde_json::to_string(&outcome)?);
    Ok(())
}

/// Runs `job` for `lane`'s clients, where they must run.
fn run(lane: &Lane, job: Job) -> Result<Outcome, String> {
    if lane.kind != LaneKind::RedirectorSocket {
        return Ok(perform(job, &lane.client, false));
    }
    let exe = std::env::current_exe().map_err(|e| format!("this binary's path: {e}"))?;
    let input = serde_json::to_string(&job).map_err(|e| e.to_string())?;
    let out = lane.run_client(&exe, &[LANE_CLIENT, &lane.client], &input)?;
    serde_json::from_str(out.trim()).map_err(|e| format!("the lane client's answer {out:?}: {e}"))
}

fn mismatch(what: &str, outcome: Result<Outcome, String>) -> String {
    match outcome {
        Ok(other) => format!("{what}: the lane client answered {other:?}"),
        Err(e) => format!("{what}: {e}"),
    }
}

/// [`testbed::lanes::Lane::check`], from a client where the lane needs it.
/// On the socket lane the program's counters must also show that its
/// connections were translated at connect() and not by the TC program.
pub fn check(lane: &Lane, services: usize, random: usize) -> Result<(), String> {
    let job = Job::Check {
        lane: lane.kind.name().into(),
        endpoints: lane.options.endpoints,
        services,
        random,
    };
    let counters = || -> Result<Vec<u64>, String> {
        let maps = Maps::from_pins(&datapath::maps_pin_dir(lane.fixture.bpffs.path()))
            .map_err(|e| format!("opening the agent's maps: {e}"))?;
        Ok(maps.counter_totals().map_err(|e| e.to_string())?.to_vec())
    };
    let socket = lane.kind == LaneKind::RedirectorSocket;
    let before = if socket { counters()? } else { Vec::new() };
    match run(lane, job) {
        Ok(Outcome::Check(result)) => result?,
        other => return Err(mismatch("check", other)),
    }
    if socket {
        let after = counters()?;
        let delta = |i: u32| after[i as usize] - before[i as usize];
        let (translated, new_flows) = (
            delta(counters::SOCK_CONNECT_TRANSLATED),
            delta(counters::FORWARD_NEW_FLOW),
        );
        if translated == 0 || new_flows != 0 {
            return Err(format!(
                "{}: its check counted {translated} connect() calls translated and {new_flows} new flows \
                 translated by the TC program: every connection must be translated at connect()",
                lane.kind.name()
            ));
        }
    }
    Ok(())
}

pub fn connect_batch(lane: &Lane, targets: Vec<SocketAddrV4>, cap: Duration) -> ConnectBatch {
    match run(lane, Job::Connect { targets, cap }) {
        Ok(Outcome::Connect(batch)) => batch,
        other => ConnectBatch {
            first_error: Some(mismatch("connections", other)),
            ..Default::default()
        },
    }
}

pub fn saturate(lane: &Lane, target: SocketAddrV4, threads: usize, duration: Duration) -> RateResult {
    let job = Job::Saturate {
        target,
        threads,
        duration,
    };
    match run(lane, job) {
        Ok(Outcome::Saturate(rate)) => rate,
        other => RateResult {
            connections_per_second: f64::NAN,
            cpu_us_per_connection: f64::NAN,
            errors: 1,
            first_error: Some(mismatch("connection rate", other)),
        },
    }
}

pub fn established(lane: &Lane, target: SocketAddrV4, round_trips: usize, stream: u64) -> EstablishedResult {
    let job = Job::Established {
        target,
        round_trips,
        stream,
    };
    match run(lane, job) {
        Ok(Outcome::Established(result)) => result,
        other => EstablishedResult {
            gbit_per_s: f64::NAN,
            error: Some(mismatch("established connection", other)),
            ..Default::default()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_and_outcomes_cross_the_pipe_intact() {
        let job = Job::Saturate {
            target: "10.96.0.16:80".parse().expect("address"),
            threads: 4,
            duration: Duration::from_millis(500),
        };
        let text = serde_json::to_string(&job).expect("encodes");
        match serde_json::from_str::<Job>(&text).expect("decodes") {
            Job::Saturate {
                target,
                threads,
                duration,
            } => assert_eq!(
                (target.to_string(), threads, duration),
                ("10.96.0.16:80".into(), 4, Duration::from_millis(500)),
                "the job read back"
            ),
            other => panic!("decoded as {other:?}"),
        }
        let outcome = Outcome::Check(Err("no".into()));
        let text = serde_json::to_string(&outcome).expect("encodes");
        assert!(
            matches!(serde_json::from_str::<Outcome>(&text), Ok(Outcome::Check(Err(e))) if e == "no"),
            "{text} read back"
        );
    }
}
