//! `cargo xtask demo`: the example manifests, served through the eBPF datapath
//! on a cluster of network-namespace nodes, with a report of who answered.
//!
//! Every pod address in the manifests (10.244.N.x) becomes a pod on node N,
//! and every other endpoint address a host outside the cluster on the
//! underlay; each serves its endpoint ports. One agent runs per node, and a
//! client pod on node 0 connects to every service port a few times.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use redirector::datapath::{Maps, maps_pin_dir};
use redirector::model::{Ipv4Cidr, Protocol};
use redirector::source::manifests::ManifestStore;
use serde::Deserialize;
use testbed::cluster::{Cluster, PodNetwork};
use testbed::{Answer, eventually, tcp_request, udp_request};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const REQUESTS_PER_PORT: usize = 8;

/// The node a pod address belongs to (10.244.N.0/24 is node N's CIDR).
fn pod_node(addr: Ipv4Addr) -> Option<usize> {
    let [a, b, n, _] = addr.octets();
    (a == 10 && b == 244).then_some(usize::from(n))
}

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

    let mut hosts: BTreeMap<Ipv4Addr, Vec<u16>> = BTreeMap::new();
    for ep in desired.values().flat_map(|sp| &sp.endpoints) {
        hosts.entry(ep.addr).or_default().push(ep.port);
    }
    let nodes = hosts
        .keys()
        .filter_map(|&addr| pod_node(addr))
        .max()
        .unwrap_or(0)
        .max(1)
        + 1;
    if nodes > 8 {
        bail!(
            "the demo builds at most 8 nodes; a pod address needs node {}",
            nodes - 1
        );
    }
    println!(
        "redirector demo: {} service ports from {}, on {nodes} nodes (pod network: routed)",
        desired.len(),
        manifests.display()
    );
    let mut cluster = Cluster::new("demo", nodes, PodNetwork::Routed);
    let client = cluster.add_pod(0, "client", CLIENT);
    println!("  client pod          {CLIENT:<15} on node-0");
    let mut names = BTreeMap::new();
    for (addr, mut ports) in hosts {
        let pod = pod_names.get(&addr);
        let (name, netns, place) = match (pod, pod_node(addr)) {
            (Some(pod), Some(node)) => (
                pod.clone(),
                cluster.add_pod(node, pod, addr),
                format!("node-{node}"),
            ),
            _ => {
                let name = format!("host-{addr}");
                let netns = cluster.add_external_host(&name, addr);
                (name, netns, "outside".to_owned())
            }
        };
        ports.sort();
        ports.dedup();
        for port in &ports {
            cluster.serve(&netns, &format!("{name}@{place}"), *port);
        }
        // The answer names the pod and where it runs, in one word.
        let shown = if place == "outside" {
            "outside the cluster".to_owned()
        } else {
            format!("on {place}")
        };
        println!("  {name:<19} {addr:<15} {shown}, serving {ports:?}");
        names.insert(addr, name);
    }
    for entry in std::fs::read_dir(&manifests)? {
        let path = entry?.path();
        if let Some(file) = path.file_name().and_then(|f| f.to_str()) {
            cluster.write_manifest(file, &std::fs::read_to_string(&path)?);
        }
    }

    let mut agents = cluster.start_agents(&agent_bin, &[]);
    for agent in &mut agents {
        agent.wait_for_log("synced ", 1);
    }
    println!(
        "\none agent per node; {} connections per service port from the client pod on node-0:\n",
        REQUESTS_PER_PORT
    );
    println!(
        "{:<42} {:<22} {:<62} POD SAW CLIENT AS",
        "SERVICE PORT", "ADDRESS", "ANSWERED BY (WHERE)"
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
            "{:<42} {:<22} {:<62} {}",
            sp.name.to_string(),
            fe.to_string(),
            by,
            clients.join(",")
        );
    }

    println!("\ndatapath counters per node (redirector counters):");
    for (index, node) in cluster.nodes.iter().enumerate() {
        let maps = Maps::from_pins(&maps_pin_dir(node.bpffs.path()))?;
        let totals = maps.counter_totals()?;
        let shown: Vec<String> = redirector_common::counters::LABELS
            .iter()
            .zip(totals)
            .filter(|(_, value)| *value > 0)
            .map(|(label, value)| format!("{label} {value}"))
            .collect();
        println!("  node-{index}: {}", shown.join(", "));
    }
    // Every agent is stopped, whatever the others' exits.
    let exits: Vec<bool> = agents.into_iter().map(|agent| agent.stop()).collect();
    let clean = exits.iter().all(|&ok| ok);
    println!(
        "\nagents stopped ({}); test bed removed.",
        if clean { "clean exits" } else { "some killed" }
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
