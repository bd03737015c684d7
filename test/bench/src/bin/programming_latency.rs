//! Network programming latency with the Kubernetes source: N services (2
//! endpoints each) on the in-process API server, then single endpoint changes
//! one at a time. For each change it reports the agent's own figure (change
//! observed → maps written, from its log) and the end-to-end one seen from
//! outside (object applied on the API server → the backend readable in the
//! pinned map).
//!
//! `programming_latency --agent PATH [--services N] [--endpoints E] [--changes N]`

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use clap::builder::RangedU64ValueParser;
use redirector::datapath::{Maps, maps_pin_dir};
use serde_json::json;
use testbed::apiserver::FakeApiServer;
use testbed::procfs::status_kib;
use testbed::{Fixture, in_netns};

/// Network programming latency with the Kubernetes source (root).
#[derive(Debug, Parser)]
#[command(name = "programming_latency")]
struct Args {
    /// The release redirector binary.
    #[arg(long, value_name = "PATH")]
    agent: PathBuf,
    // Addresses are 10.(128+n).x.y with x < 250, and changes use 10.200/16:
    // hence the limits on --services and --endpoints.
    /// Services on the API server.
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = RangedU64ValueParser::<usize>::new().range(..=62_500))]
    services: usize,
    /// Endpoints per service.
    #[arg(long, value_name = "E", default_value_t = 2, value_parser = RangedU64ValueParser::<usize>::new().range(1..=64))]
    endpoints: usize,
    /// Single endpoint changes timed, one at a time.
    #[arg(long, value_name = "N", default_value_t = 100)]
    changes: usize,
}

fn main() -> anyhow::Result<()> {
    let Args {
        agent,
        services,
        endpoints,
        changes,
    } = Args::parse();

    let fx = Fixture::new("lat");
    let listener = in_netns(&fx.node, || TcpListener::bind("127.0.0.1:0"))?;
    let api = FakeApiServer::start(listener);
    for i in 0..services {
        api.apply(service(i));
        let ips: Vec<Ipv4Addr> = (0..endpoints).map(|n| endpoint_ip(i, n)).collect();
        api.apply(slice(i, &ips));
    }
    let started = Instant::now();
    let mut agent = fx.start_agent_watching(&agent, &api.url(), &["--metrics-bind-address", ""]);
    agent.wait_for_log("initial lists complete", 1);
    let listed = started.elapsed();
    agent.wait_for_log("synced ", 1);
    println!(
        "{services} services x {endpoints} endpoints: first sync after {:?} (agent start to maps written); \
         both lists complete after {listed:?}",
        started.elapsed()
    );
    // Where the cold start went: the first sync line states the writer's share.
    if let Some(line) = agent.log().lines().find(|l| l.contains("synced ")) {
        println!(
            "  agent: {}",
            line.split("] ")
                .nth(1)
                .unwrap_or(line)
                .split("; changed")
                .next()
                .unwrap_or("")
        );
    }
    for field in ["VmHWM:", "VmRSS:", "RssAnon:", "RssFile:", "RssShmem:"] {
        if let Some(kib) = status_kib(agent.pid(), field) {
            println!("  agent {field} {kib} kB");
        }
    }
    let maps = Maps::from_pins(&maps_pin_dir(fx.bpffs.path()))?;

    let (mut agent_us, mut outside_us) = (Vec::new(), Vec::new());
    for change in 0..changes {
        let i = (change * 7919) % services;
        // Replace the second endpoint with a new address.
        let fresh = Ipv4Addr::new(10, 200, (change / 250) as u8, (change % 250) as u8 + 1);
        let syncs = agent.syncs();
        let applied = Instant::now();
        api.apply(slice(i, &[endpoint_ip(i, 0), fresh]));
        let deadline = applied + Duration::from_secs(10);
        loop {
            let present = maps
                .backends
                .iter()
                .filter_map(Result::ok)
                .any(|(_, b)| b.addr == u32::from_ne_bytes(fresh.octets()));
            if present {
                outside_us.push(applied.elapsed().as_micros() as u64);
                break;
            }
            if Instant::now() > deadline {
                bail!("change {change} never reached the maps:\n{}", agent.log());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        agent.wait_for_log("synced ", syncs + 1);
        let log = agent.log();
        let line = log
            .lines()
            .rfind(|l| l.contains("synced "))
            .context("sync line")?;
        let us: u64 = line
            .rsplit("programming latency ")
            .next()
            .and_then(|s| s.split("us").next())
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("no latency in {line:?}"))?;
        agent_us.push(us);
    }
    report("agent: change observed -> maps written", &mut agent_us);
    report(
        "outside: object applied on the API server -> backend in the pinned map",
        &mut outside_us,
    );
    Ok(())
}

fn report(what: &str, samples: &mut [u64]) {
    samples.sort_unstable();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "{what}: n={} median {} us, p99 {} us, max {} us, min {} us",
        samples.len(),
        pick(0.5),
        pick(0.99),
        samples[samples.len() - 1],
        samples[0]
    );
}

/// Endpoint `n` of service `i`: 10.(128+n).x.y.
fn endpoint_ip(i: usize, n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 128 + n as u8, (i / 250) as u8, (i % 250) as u8 + 1)
}

fn service(i: usize) -> serde_json::Value {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 16, 0)) + i as u32);
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {"type": "ClusterIP", "clusterIP": ip.to_string(), "selector": {"app": format!("svc-{i}")},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    })
}

fn slice(i: usize, endpoints: &[Ipv4Addr]) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})).collect::<Vec<_>>()
    })
}
