//! B6: programming. The agent (watching the in-process API server) from cold
//! start to every service served, single changes until the map holds them,
//! and a burst; against loading and partially updating kube-proxy's
//! equivalent rulesets (iptables-legacy, iptables-nft, nftables) the way
//! kube-proxy writes them (full sync, then partial syncs).
//!
//! B7: footprint: the agent's peak RSS and the memory of its maps.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use redirector::datapath::writer::service_key;
use redirector::datapath::{Maps, maps_pin_dir};
use redirector::model::{Endpoint, Frontend};
use serde::Serialize;
use testbed::kubeproxy::{self, NodeConfig};
use testbed::lanes::{
    Lane, LaneKind, LaneOptions, ServiceSet, TARGET_PORT, master_count, netns_exec, request,
    service_endpoints, service_frontend, service_name, service_object, slice_object,
};
use testbed::procfs::{fdinfo_field, status_kib};
use testbed::{Fixture, in_netns};

use crate::measure::Summary;
use crate::progress::Progress;

#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub services: usize,
    pub endpoints: usize,
    /// Single changes timed (each kind) on the agent.
    pub changes: usize,
    /// Single changes timed (each kind) on each kube-proxy backend.
    pub kube_proxy_changes: usize,
    pub burst: usize,
    /// Cap on one ruleset load or agent cold start.
    pub load_cap: Duration,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Backend {
    pub name: String,
    /// Full load (cold), seconds; None when it failed or hit the cap.
    pub cold_seconds: Option<f64>,
    /// Agent only: start → last service answering.
    pub reachable_seconds: Option<f64>,
    /// Single endpoint change → in the map / ruleset loaded, ms.
    pub endpoint_change_ms: Option<Summary>,
    /// One new service, ms.
    pub new_service_ms: Option<Summary>,
    /// Burst of `burst` endpoint changes, seconds (until all are in).
    pub burst_seconds: Option<f64>,
    /// Agent only: its own "programming latency" per single change, ms.
    pub agent_reported_ms: Option<Summary>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct B6 {
    pub config: Option<Config>,
    pub backends: Vec<Backend>,
    pub footprint: Option<Footprint>,
}

/// `rulesets`: also load kube-proxy's rulesets for comparison (slow at 10k).
pub fn run(agent: &Path, config: &Config, rulesets: bool, progress: &Progress) -> B6 {
    let mut out = B6 {
        config: Some(config.clone()),
        ..Default::default()
    };
    let kube_proxy = [
        LaneKind::IptablesLegacy,
        LaneKind::IptablesNft,
        LaneKind::Nftables,
    ];
    // Steps per backend: the full load, each single change, the burst.
    let agent_steps = 2 * config.changes as u64 + 2;
    let kube_proxy_steps = 2 * config.kube_proxy_changes as u64 + 2;
    let rulesets_steps = if rulesets {
        kube_proxy.len() as u64 * kube_proxy_steps
    } else {
        0
    };
    progress.stage("B6", agent_steps + rulesets_steps);
    let set = ServiceSet::new(config.services, config.endpoints);
    let (backend, footprint) = agent_backend(agent, config, &set, progress);
    out.backends.push(backend);
    out.footprint = footprint;
    // A backend that failed part-way skips its remaining steps.
    progress.reach(agent_steps);
    if !rulesets {
        return out;
    }
    for (done, kind) in (1..).zip(kube_proxy) {
        out.backends
            .push(kube_proxy_backend(kind, config, &set, progress));
        progress.reach(agent_steps + kube_proxy_steps * done);
    }
    out
}

/// A fresh endpoint address (inside the server's range, past every service's).
fn fresh_endpoint(k: usize) -> Endpoint {
    Endpoint {
        addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 160, 0, 1)) + k as u32),
        port: TARGET_PORT,
    }
}

/// Whether a slot of `fe` names a backend at `addr`.
fn map_has_endpoint(maps: &Maps, fe: &Frontend, slots: u16, addr: Ipv4Addr) -> bool {
    let want = u32::from_ne_bytes(addr.octets());
    (1..=slots).any(|slot| {
        maps.services
            .get(&service_key(*fe, slot), 0)
            .ok()
            .and_then(|entry| maps.backends.get(&entry.backend_id, 0).ok())
            .is_some_and(|b| b.addr == want)
    })
}

fn map_has_service(maps: &Maps, fe: &Frontend, endpoints: usize) -> bool {
    master_count(maps, fe) == Some(endpoints)
}

/// Polls `done` every 100 µs until true or `cap`; the time it took.
fn until(cap: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    loop {
        if done() {
            return Some(started.elapsed());
        }
        if started.elapsed() > cap {
            return None;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn ms(samples: &[Duration]) -> Option<Summary> {
    (!samples.is_empty())
        .then(|| Summary::of(&samples.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>()))
}

fn agent_backend(
    agent: &Path,
    config: &Config,
    set: &ServiceSet,
    progress: &Progress,
) -> (Backend, Option<Footprint>) {
    let mut b = Backend {
        name: "redirector (agent, API watch)".into(),
        ..Default::default()
    };
    let options = LaneOptions {
        agent: Some(agent.to_owned()),
        max_services: config.services + config.changes + 16,
        endpoints: config.endpoints,
    };
    progress.doing("the agent".into());
    progress.log(&format!(
        "B6: agent cold start with {} services x {} endpoints",
        config.services, config.endpoints
    ));
    let lane = match Lane::new_preloaded(&options, set, config.load_cap) {
        Ok(lane) => lane,
        Err(e) => {
            b.error = Some(format!("cold start: {e}"));
            return (b, None);
        }
    };
    if let Some(cold) = lane.cold_start {
        b.cold_seconds = Some(cold.to_sync_logged.as_secs_f64());
        b.reachable_seconds = Some(cold.to_last_service_reachable.as_secs_f64());
    }
    // Every service answers (one connection each, bounded).
    let targets: Vec<(SocketAddrV4, Vec<Endpoint>)> = set
        .list
        .iter()
        .map(|(fe, sp)| (SocketAddrV4::new(fe.addr, fe.port), sp.endpoints.clone()))
        .collect();
    let unreachable = in_netns(&lane.client, move || {
        let deadline = Instant::now() + Duration::from_secs(120);
        targets
            .iter()
            .filter(|(to, eps)| {
                Instant::now() < deadline
                    && !request(*to, Duration::from_secs(1))
                        .is_ok_and(|r| eps.iter().any(|e| e.addr == *r.local.ip()))
            })
            .count()
    });
    if unreachable > 0 {
        b.error = Some(format!(
            "{unreachable} services did not answer after the cold start"
        ));
    }
    progress.advance(1);
    let footprint = lane
        .agent_pid()
        .map(|pid| footprint(pid, lane.fixture.bpffs.path(), config.services, config.endpoints));
    let maps = match Maps::from_pins(&maps_pin_dir(lane.fixture.bpffs.path())) {
        Ok(m) => m,
        Err(e) => {
            b.error = Some(format!("opening the pinned maps: {e}"));
            return (b, footprint);
        }
    };
    let e = config.endpoints;
    let slots = e as u16;
    let mut endpoints: Vec<Vec<Endpoint>> = set.list.iter().map(|(_, sp)| sp.endpoints.clone()).collect();
    let mut fresh = 0usize;
    let api = lane.api().expect("API server");
    // Single endpoint changes.
    let mut change_times = Vec::new();
    let mut agent_ms = Vec::new();
    progress.log(&format!(
        "B6: {} single endpoint changes on the agent",
        config.changes
    ));
    for k in 0..config.changes {
        let i = (k * 7919) % set.len();
        fresh += 1;
        let ep = fresh_endpoint(fresh);
        endpoints[i][1] = ep;
        let syncs = lane.agent().map_or(0, |a| a.syncs());
        let fe = service_frontend(i);
        let started = Instant::now();
        api.apply(slice_object(i, &endpoints[i]));
        match until(Duration::from_secs(10), || {
            map_has_endpoint(&maps, &fe, slots, ep.addr)
        }) {
            Some(_) => change_times.push(started.elapsed()),
            None => {
                b.error = Some(format!("endpoint change {k} never reached the map"));
                break;
            }
        }
        if let Some(us) = wait_agent_latency(&lane, syncs) {
            agent_ms.push(Duration::from_micros(us));
        }
        progress.advance(1);
    }
    b.endpoint_change_ms = ms(&change_times);
    b.agent_reported_ms = ms(&agent_ms);
    // New services.
    let mut new_times = Vec::new();
    progress.log(&format!("B6: {} new services on the agent", config.changes));
    for k in 0..config.changes {
        let i = set.len() + k;
        let fe = service_frontend(i);
        let eps = service_endpoints(i, e);
        let syncs = lane.agent().map_or(0, |a| a.syncs());
        let started = Instant::now();
        api.apply(service_object(i, &fe));
        api.apply(slice_object(i, &eps));
        match until(Duration::from_secs(10), || map_has_service(&maps, &fe, e)) {
            Some(_) => new_times.push(started.elapsed()),
            None => {
                b.error = Some(format!("new service {k} never reached the map"));
                break;
            }
        }
        let _ = wait_agent_latency(&lane, syncs);
        progress.advance(1);
    }
    b.new_service_ms = ms(&new_times);
    // A burst of endpoint changes on distinct services.
    progress.log(&format!(
        "B6: burst of {} endpoint changes on the agent",
        config.burst
    ));
    let burst: Vec<(usize, Endpoint)> = (0..config.burst.min(set.len()))
        .map(|k| {
            fresh += 1;
            ((k * 104_729 + 1) % set.len(), fresh_endpoint(fresh))
        })
        .collect();
    let started = Instant::now();
    for (i, ep) in &burst {
        endpoints[*i][0] = *ep;
        api.apply(slice_object(*i, &endpoints[*i]));
    }
    let mut next = 0;
    let all_in = until(config.load_cap, || {
        while next < burst.len() {
            let (i, ep) = burst[next];
            if !map_has_endpoint(&maps, &service_frontend(i), slots, ep.addr) {
                return false;
            }
            next += 1;
        }
        true
    });
    match all_in {
        Some(_) => b.burst_seconds = Some(started.elapsed().as_secs_f64()),
        None => {
            b.error = Some(format!(
                "only {next} of {} burst changes reached the map",
                burst.len()
            ))
        }
    }
    (b, footprint)
}

/// Waits (bounded) for the agent's next sync after `syncs` and returns the
/// programming latency it logged, µs.
fn wait_agent_latency(lane: &Lane, syncs: usize) -> Option<u64> {
    let agent = lane.agent()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.syncs() <= syncs {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let log = agent.log();
    let line = log.lines().rfind(|l| l.contains("synced "))?;
    let after = line.split("programming latency ").nth(1)?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn kube_proxy_backend(kind: LaneKind, config: &Config, set: &ServiceSet, progress: &Progress) -> Backend {
    let mut b = Backend {
        name: kind.name().into(),
        ..Default::default()
    };
    let fx = Fixture::new(&format!("b6{}", &kind.name()[..3]));
    let node = NodeConfig::default();
    let mut list = set.list.clone();
    let (restore, is_nft) = match kind {
        LaneKind::IptablesLegacy => ("iptables-legacy-restore", false),
        LaneKind::IptablesNft => ("iptables-nft-restore", false),
        _ => ("nft", true),
    };
    let apply = |text: &str, noflush: bool, cap: Duration| -> Result<Duration, String> {
        if is_nft {
            netns_exec(&fx.node, "nft", &["-f", "-"], Some(text), cap)
        } else if noflush {
            netns_exec(&fx.node, restore, &["--noflush"], Some(text), cap)
        } else {
            netns_exec(&fx.node, restore, &[], Some(text), cap)
        }
    };
    progress.doing(kind.name().into());
    progress.log(&format!(
        "B6: {} full load of {} services x {} endpoints (cap {:?})",
        kind.name(),
        list.len(),
        config.endpoints,
        config.load_cap
    ));
    let full = if is_nft {
        kubeproxy::nft_script(&list, &node)
    } else {
        kubeproxy::iptables_restore(&list, &node)
    };
    match apply(&full, false, config.load_cap) {
        Ok(d) => b.cold_seconds = Some(d.as_secs_f64()),
        Err(e) => {
            b.error = Some(format!("full load: {e}"));
            return b;
        }
    }
    progress.advance(1);
    drop(full);
    let cap = Duration::from_secs(120);
    let mut fresh = 1_000_000usize;
    let mut change =
        |i: usize, list: &mut Vec<(Frontend, redirector::model::ServicePort)>| -> (String, Endpoint) {
            fresh += 1;
            let old = list[i].1.endpoints[1];
            list[i].1.endpoints[1] = fresh_endpoint(fresh);
            (
                kubeproxy::iptables_endpoint_chain(&list[i].1.name, "tcp", &old),
                old,
            )
        };
    // Single endpoint changes, one partial sync each.
    let mut times = Vec::new();
    for k in 0..config.kube_proxy_changes {
        let i = (k * 7919) % set.len();
        let (old_chain, old) = change(i, &mut list);
        let text = if is_nft {
            kubeproxy::nft_partial(&list[i].0, &list[i].1, &node, false, &[old])
        } else {
            kubeproxy::iptables_partial_restore(&list, &node, &[i], &[old_chain])
        };
        match apply(&text, true, cap) {
            Ok(d) => times.push(d),
            Err(e) => {
                b.error = Some(format!("endpoint change: {e}"));
                break;
            }
        }
        progress.advance(1);
    }
    b.endpoint_change_ms = ms(&times);
    // New services.
    let mut times = Vec::new();
    for k in 0..config.kube_proxy_changes {
        let i = set.len() + k;
        let fe = service_frontend(i);
        list.push((
            fe,
            redirector::model::ServicePort {
                no_endpoints: Default::default(),
                affinity: None,
                name: service_name(i),
                endpoints: service_endpoints(i, config.endpoints),
                also_serving: Vec::new(),
                info: Default::default(),
            },
        ));
        let last = list.len() - 1;
        let text = if is_nft {
            kubeproxy::nft_partial(&list[last].0, &list[last].1, &node, true, &[])
        } else {
            kubeproxy::iptables_partial_restore(&list, &node, &[last], &[])
        };
        match apply(&text, true, cap) {
            Ok(d) => times.push(d),
            Err(e) => {
                b.error = Some(format!("new service: {e}"));
                break;
            }
        }
        progress.advance(1);
    }
    b.new_service_ms = ms(&times);
    // A burst: kube-proxy coalesces it into one partial sync.
    let indexes: Vec<usize> = (0..config.burst.min(set.len()))
        .map(|k| (k * 104_729 + 1) % set.len())
        .collect();
    let mut removed_chains = Vec::new();
    let mut removed = Vec::new();
    for &i in &indexes {
        let (chain, old) = change(i, &mut list);
        removed_chains.push(chain);
        removed.push((i, old));
    }
    let text = if is_nft {
        let mut text = String::new();
        for (i, old) in &removed {
            text.push_str(&kubeproxy::nft_partial(
                &list[*i].0,
                &list[*i].1,
                &node,
                false,
                &[*old],
            ));
        }
        text
    } else {
        kubeproxy::iptables_partial_restore(&list, &node, &indexes, &removed_chains)
    };
    progress.log(&format!("B6: {} burst of {} changes", kind.name(), indexes.len()));
    match apply(&text, true, config.load_cap) {
        Ok(d) => b.burst_seconds = Some(d.as_secs_f64()),
        Err(e) => b.error = Some(format!("burst: {e}")),
    }
    b
}

// ---------------------------------------------------------------------------
// B7

#[derive(Clone, Debug, Default, Serialize)]
pub struct Footprint {
    pub context: String,
    pub services: usize,
    pub endpoints: usize,
    /// Agent peak RSS (VmHWM) and current RSS, KiB; None without an agent.
    pub vm_hwm_kib: Option<u64>,
    pub vm_rss_kib: Option<u64>,
    /// Memory charged to the maps (fdinfo `memlock`), bytes, by map.
    pub maps: Vec<(String, u64)>,
    pub maps_total: u64,
}

/// Names of the maps pinned under `bpffs`, by map id.
fn pinned_names(bpffs: &Path) -> std::collections::BTreeMap<u64, String> {
    let mut names = std::collections::BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(maps_pin_dir(bpffs)) {
        for entry in dir.flatten() {
            let Ok(data) = aya::maps::MapData::from_pin(entry.path()) else {
                continue;
            };
            let fd = data.fd().as_fd().as_raw_fd();
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
            if let Some(id) = fdinfo_field(&info, "map_id:") {
                names.insert(id, entry.file_name().to_string_lossy().into_owned());
            }
        }
    }
    names
}

/// The agent's RSS and the memlock of every map it holds (by map id, named
/// after its pin under `bpffs`).
pub fn footprint(pid: u32, bpffs: &Path, services: usize, endpoints: usize) -> Footprint {
    let names = pinned_names(bpffs);
    let mut seen = std::collections::BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for entry in dir.flatten() {
            let Ok(info) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            if let (Some(id), Some(memlock)) =
                (fdinfo_field(&info, "map_id:"), fdinfo_field(&info, "memlock:"))
            {
                let entries = fdinfo_field(&info, "max_entries:").unwrap_or(0);
                let name = names.get(&id).cloned().unwrap_or_else(|| format!("map {id}"));
                seen.insert(id, (format!("{name} ({entries} entries)"), memlock));
            }
        }
    }
    let maps: Vec<(String, u64)> = seen.into_values().collect();
    Footprint {
        context: "agent".into(),
        services,
        endpoints,
        vm_hwm_kib: status_kib(pid, "VmHWM:"),
        vm_rss_kib: status_kib(pid, "VmRSS:"),
        maps_total: maps.iter().map(|m| m.1).sum(),
        maps,
    }
}

/// Memory of the maps pinned under `bpffs`, by name, when the agent process
/// is not found.
pub fn pinned_footprint(bpffs: &Path, services: usize, endpoints: usize) -> Footprint {
    let mut maps = Vec::new();
    if let Ok(dir) = std::fs::read_dir(maps_pin_dir(bpffs)) {
        for entry in dir.flatten() {
            let Ok(data) = aya::maps::MapData::from_pin(entry.path()) else {
                continue;
            };
            let fd = data.fd().as_fd().as_raw_fd();
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
            if let Some(memlock) = fdinfo_field(&info, "memlock:") {
                let entries = fdinfo_field(&info, "max_entries:").unwrap_or(0);
                maps.push((
                    format!("{} ({entries} entries)", entry.file_name().to_string_lossy()),
                    memlock,
                ));
            }
        }
    }
    maps.sort();
    Footprint {
        context: "pinned maps (agent process not found)".into(),
        services,
        endpoints,
        vm_hwm_kib: None,
        vm_rss_kib: None,
        maps_total: maps.iter().map(|m| m.1).sum(),
        maps,
    }
}
