//! `cargo xtask demo`: the example manifests, served through the eBPF datapath
//! in a netns test bed, with a report of who answered.
//!
//! Every endpoint address in the manifests becomes a host (named after its
//! Pod when there is one) serving the endpoint ports; a client pod then
//! connects to every service port a few times.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use redirector::datapath::{Maps, maps_pin_dir};
use redirector::model::{Ipv4Cidr, Protocol};
use redirector::source::manifests::ManifestStore;
use serde::Deserialize;
use testbed::{Answer, Fixture, eventually, tcp_request, udp_request};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const REQUESTS_PER_PORT: usize = 8;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut agent_bin, mut manifests) = (None, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--agent" => agent_bin = args.next().map(PathBuf::from),
            "--manifests" => manifests = args.next().map(PathBuf::from),
            other => bail!("unknown argument {other}; usage: demo --agent PATH --manifests DIR"),
        }
    }
    let agent_bin = agent_bin.context("--agent PATH is required")?;
    let manifests = manifests.context("--manifests DIR is required")?;
    let cidr: Ipv4Cidr = "10.96.0.0/12".parse()?;

    let mut store = ManifestStore::default();
    let errors = store.reload(&manifests);
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("error: {e}");
        }
        bail!("the manifests in {} are invalid", manifests.display());
    }
    let (desired, _) = store.desired(cidr);
    let pod_names = pod_names(&manifests)?;

    println!(
        "redirector demo: {} service ports from {}",
        desired.len(),
        manifests.display()
    );
    let mut fx = Fixture::new("demo");
    let client = fx.add_host("client", CLIENT);
    let mut hosts: BTreeMap<Ipv4Addr, Vec<u16>> = BTreeMap::new();
    for ep in desired.values().flat_map(|sp| &sp.endpoints) {
        hosts.entry(ep.addr).or_default().push(ep.port);
    }
    let mut names = BTreeMap::new();
    for (addr, mut ports) in hosts {
        let name = pod_names
            .get(&addr)
            .cloned()
            .unwrap_or_else(|| format!("host-{addr}"));
        let netns = fx.add_host(&name, addr);
        ports.sort();
        ports.dedup();
        for port in &ports {
            fx.serve(&netns, &name, *port);
        }
        println!("  host {name:<20} {addr:<15} serving {ports:?}");
        names.insert(addr, name);
    }
    println!("  client pod   {CLIENT}");
    for entry in std::fs::read_dir(&manifests)? {
        let path = entry?.path();
        if let Some(file) = path.file_name().and_then(|f| f.to_str()) {
            fx.write_manifest(file, &std::fs::read_to_string(&path)?);
        }
    }

    let mut agent = fx.start_agent(&agent_bin, &[]);
    agent.wait_for_log("synced ", 1);
    println!(
        "\nagent running in the node netns; {} connections per service port:\n",
        REQUESTS_PER_PORT
    );
    println!(
        "{:<42} {:<22} {:<44} POD SAW CLIENT AS",
        "SERVICE PORT", "ADDRESS", "ANSWERED BY"
    );
    for (fe, sp) in &desired {
        let to = SocketAddrV4::new(fe.addr, fe.port);
        let mut answered: BTreeMap<String, usize> = BTreeMap::new();
        let mut seen = Vec::new();
        let mut failure = None;
        for _ in 0..REQUESTS_PER_PORT {
            let ask = |c: &str| match fe.protocol {
                Protocol::Tcp => tcp_request(c, to),
                Protocol::Udp => udp_request(c, to),
            };
            let result = if sp.endpoints.is_empty() {
                ask(&client)
            } else {
                Ok(eventually(&format!("{fe}"), Duration::from_secs(10), || {
                    ask(&client).map_err(|e| e.to_string())
                }))
            };
            match result {
                Ok(Answer { pod, client }) => {
                    *answered.entry(pod).or_default() += 1;
                    seen.push(client);
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        let by = match failure {
            Some(e) => format!("refused ({e})"),
            None => answered
                .iter()
                .map(|(p, n)| format!("{p}×{n}"))
                .collect::<Vec<_>>()
                .join(", "),
        };
        let clients: Vec<String> = seen
            .iter()
            .map(|c| c.ip().to_string())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        println!(
            "{:<42} {:<22} {:<44} {}",
            sp.name.to_string(),
            fe.to_string(),
            by,
            clients.join(",")
        );
    }

    let maps = Maps::from_pins(&maps_pin_dir(fx.bpffs.path()))?;
    let totals = maps.counter_totals()?;
    println!("\ndatapath counters (redirector counters):");
    for (label, value) in redirector_common::counters::LABELS.iter().zip(totals) {
        if value > 0 {
            println!("  {label:<32} {value}");
        }
    }
    let clean = agent.stop();
    println!(
        "\nagent stopped ({}); test bed removed.",
        if clean { "clean exit" } else { "killed" }
    );
    Ok(())
}

/// Pod name by `status.podIP`, for naming the demo hosts.
fn pod_names(dir: &std::path::Path) -> anyhow::Result<BTreeMap<Ipv4Addr, String>> {
    let mut names = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let text = std::fs::read_to_string(entry?.path())?;
        for doc in yaml_serde::Deserializer::from_str(&text) {
            let Ok(value) = yaml_serde::Value::deserialize(doc) else {
                continue;
            };
            if value["kind"].as_str() != Some("Pod") {
                continue;
            }
            if let (Some(name), Some(ip)) = (
                value["metadata"]["name"].as_str(),
                value["status"]["podIP"].as_str(),
            ) && let Ok(ip) = ip.parse()
            {
                names.insert(ip, name.to_owned());
            }
        }
    }
    Ok(names)
}
