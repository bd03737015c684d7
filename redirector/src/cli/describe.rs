//! `redirector describe service NAME`, as `kubectl describe service`, plus
//! traffic per port and any drift between what the agent wants and the maps.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use redirector::conntrack;
use redirector::datapath::maps::conntrack_from_pins;
use redirector::datapath::maps_pin_dir;
use redirector::datapath::record::Snapshot;
use redirector::model::{ServiceInfo, TopologyMode};
use redirector_common::conntrack::FlowState;

use super::BpffsArg;
use super::views::{Scope, field, key_values, list_endpoints, plural, services, sorted};

#[derive(Args)]
pub struct DescribeArgs {
    #[command(subcommand)]
    what: DescribeWhat,
}

#[derive(Subcommand)]
enum DescribeWhat {
    #[command(visible_alias = "svc")]
    Service {
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[command(flatten)]
        pins: BpffsArg,
    },
}

#[derive(Debug, thiserror::Error)]
#[error("service {namespace}/{name} is not programmed in the datapath under {}", bpffs.display())]
pub struct UnknownService {
    pub(super) namespace: String,
    pub(super) name: String,
    pub(super) bpffs: PathBuf,
}

pub fn run(args: DescribeArgs) -> anyhow::Result<()> {
    let DescribeWhat::Service {
        name,
        namespace,
        pins,
    } = args.what;
    let snapshot = Snapshot::read(&pins.bpffs).context("redirector describe")?;
    let flows = flows_by_port(&pins.bpffs);
    print!(
        "{}",
        describe_service(&snapshot, &namespace, &name, &pins.bpffs, flows.as_ref())?
    );
    Ok(())
}

/// Flows in the connection table, by service port ID and state.
pub type FlowCounts = HashMap<u32, BTreeMap<FlowState, usize>>;

/// Counts the connection table's flows (one batched read of the table); the
/// description goes without them if the table cannot be read.
fn flows_by_port(bpffs: &Path) -> Option<FlowCounts> {
    let read = || -> anyhow::Result<Vec<conntrack::Flow>> {
        let table = conntrack_from_pins(&maps_pin_dir(bpffs))?;
        Ok(conntrack::read(&table)?)
    };
    let flows = read()
        .inspect_err(|e| tracing::warn!("flows per port not shown: {e:#}"))
        .ok()?;
    let mut counts = FlowCounts::new();
    for flow in &flows {
        *counts
            .entry(flow.svc_id())
            .or_default()
            .entry(flow.state())
            .or_default() += 1;
    }
    Some(counts)
}

/// `3 (2 ESTABLISHED, 1 TIME_WAIT)`.
fn flow_summary(by_state: &BTreeMap<FlowState, usize>) -> String {
    let states: Vec<String> = by_state
        .iter()
        .map(|(state, n)| format!("{n} {}", state.name()))
        .collect();
    format!("{} ({})", by_state.values().sum::<usize>(), states.join(", "))
}

/// `redirector describe service NAME`, as `kubectl describe service`, plus
/// traffic per port and any drift between what the agent wants and the maps.
pub fn describe_service(
    snapshot: &Snapshot,
    namespace: &str,
    name: &str,
    bpffs: &Path,
    flows: Option<&FlowCounts>,
) -> Result<String, UnknownService> {
    let scope = Scope::Namespace(namespace.to_owned());
    let svc = services(snapshot, &scope)
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| UnknownService {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            bpffs: bpffs.to_owned(),
        })?;
    let mut out = String::new();
    field(&mut out, "Name", svc.name);
    field(&mut out, "Namespace", svc.namespace);
    field(&mut out, "Labels", &key_values(&svc.info.labels, "\n"));
    let selector = svc
        .info
        .selector
        .as_ref()
        .map_or("<none>".to_owned(), |s| key_values(s, ","));
    field(&mut out, "Selector", &selector);
    field(&mut out, "Type", &svc.info.service_type);
    field(&mut out, "IP", &svc.cluster_ip.to_string());
    let mut drift = Vec::new();
    for (port, record) in &svc.ports {
        let port_name = if record.port.is_empty() {
            "<unset>"
        } else {
            &record.port
        };
        let proto = port.frontend.protocol.as_k8s();
        field(
            &mut out,
            "Port",
            &format!("{port_name}  {}/{proto}", port.frontend.port),
        );
        field(
            &mut out,
            "TargetPort",
            &format!("{}/{proto}", record.info.target_port),
        );
        field(&mut out, "Endpoints", &list_endpoints(&sorted(&port.endpoints)));
        // Only while some drain, as `Chosen Here`.
        if !port.draining.is_empty() {
            field(
                &mut out,
                "Draining",
                &format!(
                    "{} (still serving: their flows stay, new ones go elsewhere)",
                    list_endpoints(&sorted(&port.draining))
                ),
            );
        }
        if let Some(chosen) = chosen_here(&record.info) {
            field(&mut out, "Chosen Here", &chosen);
        }
        field(
            &mut out,
            "Traffic",
            &format!(
                "{}, {}",
                plural(port.stats.packets, "packet"),
                plural(port.stats.new_flows, "new flow")
            ),
        );
        // Only ports with flows: like `Chosen Here`, the line is there when
        // it says something.
        if let Some(by_state) = flows.and_then(|f| f.get(&port.svc_id)) {
            field(&mut out, "Flows", &flow_summary(by_state));
        }
        if let Some(d) = port.drift() {
            drift.push(format!("{port_name}: {d}"));
        }
    }
    for record in snapshot
        .unprogrammed
        .iter()
        .filter(|r| r.namespace == namespace && r.name == name)
    {
        drift.push(format!(
            "{}: not in the maps (the agent wants {} endpoints)",
            if record.port.is_empty() {
                "<unset>"
            } else {
                &record.port
            },
            record.want
        ));
    }
    match svc.info.affinity_timeout_seconds {
        Some(timeout) => field(
            &mut out,
            "Session Affinity",
            &format!("{} (timeout {timeout}s)", svc.info.session_affinity),
        ),
        None => field(&mut out, "Session Affinity", &svc.info.session_affinity),
    }
    for (label, value) in [
        ("Internal Traffic Policy", &svc.info.internal_traffic_policy),
        ("External Traffic Policy", &svc.info.external_traffic_policy),
        ("Traffic Distribution", &svc.info.traffic_distribution),
    ] {
        if let Some(value) = value {
            field(&mut out, label, value);
        }
    }
    if let Some(node) = &svc.info.node {
        let zone = svc.info.zone.as_deref().unwrap_or("<none>");
        field(&mut out, "Node", &format!("{node} (zone {zone})"));
    }
    let drift = if drift.is_empty() {
        "none (the maps hold what the agent wants)".to_owned()
    } else {
        drift.join("\n")
    };
    field(&mut out, "Drift", &drift);
    Ok(out)
}

/// Which endpoints this node uses for a port and why, when that is not
/// simply every ready endpoint.
fn chosen_here(info: &ServiceInfo) -> Option<String> {
    let local = info.internal_traffic_policy.as_deref() == Some("Local");
    if info.no_local_endpoints {
        return Some(
            "none: every endpoint is on another node (internalTrafficPolicy: Local); new connections are \
             dropped"
                .to_owned(),
        );
    }
    let zone = info.zone.as_deref().unwrap_or("<none>");
    let node = info.node.as_deref().unwrap_or("<none>");
    match info.topology {
        _ if local => Some(format!("this node's ({node}; internalTrafficPolicy: Local)")),
        TopologyMode::PreferSameZone => Some(format!("those hinted for zone {zone} (topology hints)")),
        TopologyMode::PreferSameNode => Some(format!("those hinted for node {node} (topology hints)")),
        TopologyMode::None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::views::fixture::snapshot;

    #[test]
    fn describes_like_kubectl_with_traffic_and_drift() {
        let mut s = snapshot();
        let text = describe_service(&s, "shop", "web-app", Path::new("/sys/fs/bpf"), None).unwrap();
        let expected = "\
Name:                     web-app
Namespace:                shop
Labels:                   app=web
                          tier=front
Selector:                 app=web
Type:                     ClusterIP
IP:                       10.96.0.10
Port:                     http  80/TCP
TargetPort:               8080/TCP
Endpoints:                10.244.1.1:8080,10.244.1.2:8080
Traffic:                  7 packets, 2 new flows
Port:                     https  443/TCP
TargetPort:               https/TCP
Endpoints:                10.244.1.1:8443,10.244.1.2:8443,10.244.1.3:8443 + 2 more...
Traffic:                  7 packets, 2 new flows
Session Affinity:         None
Drift:                    none (the maps hold what the agent wants)
";
        assert_eq!(text, expected, "describe service");
        s.ports[1].endpoints.pop();
        let text = describe_service(&s, "shop", "web-app", Path::new("/x"), None).unwrap();
        assert!(
            text.contains("Drift:                    http: the agent wants 2 endpoints, the maps hold 1"),
            "drift is stated: {text}"
        );
        let err = describe_service(&s, "shop", "nope", Path::new("/x"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shop/nope") && err.contains("/x"),
            "unknown service names it: {err}"
        );
    }

    #[test]
    fn draining_endpoints_get_a_line_under_their_port() {
        let mut s = snapshot();
        // The fixture's ports come https, then http.
        s.ports[1].draining = vec![crate::cli::views::fixture::ep(3, 8080)];
        let text = describe_service(&s, "shop", "web-app", Path::new("/x"), None).expect("described");
        let draining: Vec<&str> = text.lines().filter(|l| l.starts_with("Draining:")).collect();
        assert_eq!(
            draining,
            [
                "Draining:                 10.244.1.3:8080 (still serving: their flows stay, new ones go elsewhere)"
            ],
            "a line for the port with a draining endpoint only:\n{text}"
        );
        assert!(
            text.contains("Endpoints:                10.244.1.1:8080,10.244.1.2:8080\nDraining:"),
            "under the http port's endpoints:\n{text}"
        );
        assert!(
            text.contains("Drift:                    none"),
            "draining endpoints are not drift:\n{text}"
        );
    }

    #[test]
    fn counts_flows_per_port_by_state() {
        let s = snapshot();
        // The fixture's http port is service port 1, https 2.
        let counts: FlowCounts = [(
            1,
            [(FlowState::TcpEstablished, 2), (FlowState::TcpTimeWait, 1)].into(),
        )]
        .into();
        let text =
            describe_service(&s, "shop", "web-app", Path::new("/x"), Some(&counts)).expect("described");
        let flows: Vec<&str> = text.lines().filter(|l| l.starts_with("Flows:")).collect();
        assert!(
            text.contains("Traffic:                  7 packets, 2 new flows\nFlows:"),
            "under the http port's traffic:\n{text}"
        );
        assert_eq!(
            flows,
            ["Flows:                    3 (2 ESTABLISHED, 1 TIME_WAIT)"],
            "a line for the port with flows only:\n{text}"
        );
    }

    #[test]
    fn describes_policies_and_what_this_node_uses() {
        let with = |edit: &dyn Fn(&mut ServiceInfo)| {
            let mut s = snapshot();
            for port in &mut s.ports {
                let record = port.record.as_mut().expect("fixture records");
                record.info.node = Some("node-1".into());
                record.info.zone = Some("zone-a".into());
                edit(&mut record.info);
            }
            describe_service(&s, "shop", "web-app", Path::new("/x"), None).expect("described")
        };
        /// What, how the records change, what the output holds, what it does not.
        type Row<'a> = (
            &'a str,
            &'a dyn Fn(&mut ServiceInfo),
            &'a [&'a str],
            &'a [&'a str],
        );
        let cases: [Row; 4] = [
            (
                "Local policy",
                &|info| info.internal_traffic_policy = Some("Local".into()),
                &[
                    "Internal Traffic Policy:  Local\n",
                    "Chosen Here:              this node's (node-1; internalTrafficPolicy: Local)\n",
                    "Node:                     node-1 (zone zone-a)\n",
                ],
                &["External Traffic Policy", "Traffic Distribution"],
            ),
            (
                "Local policy, endpoints only elsewhere",
                &|info| {
                    info.internal_traffic_policy = Some("Local".into());
                    info.no_local_endpoints = true;
                },
                &["Chosen Here:              none: every endpoint is on another node"],
                &[],
            ),
            (
                "zone hints",
                &|info| {
                    info.traffic_distribution = Some("PreferClose".into());
                    info.external_traffic_policy = Some("Cluster".into());
                    info.topology = TopologyMode::PreferSameZone;
                },
                &[
                    "Traffic Distribution:     PreferClose\n",
                    "External Traffic Policy:  Cluster\n",
                    "Chosen Here:              those hinted for zone zone-a (topology hints)\n",
                ],
                &["Internal Traffic Policy"],
            ),
            (
                "every ready endpoint",
                &|_| {},
                &["Node:                     node-1 (zone zone-a)\n"],
                &["Chosen Here", "Traffic Policy", "Traffic Distribution"],
            ),
        ];
        for (what, edit, present, absent) in cases {
            let text = with(edit);
            for needle in present {
                assert!(text.contains(needle), "{what}: {needle:?} in\n{text}");
            }
            for needle in absent {
                assert!(!text.contains(needle), "{what}: no {needle:?} in\n{text}");
            }
        }
    }
}
