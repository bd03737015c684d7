//! `redirector conntrack list|flush`: the connection table's flows, each
//! named by the service port it was translated for, as `conntrack -L` and
//! `conntrack -D` show and delete the kernel's entries for kube-proxy.

use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use redirector::conntrack::{self, Flow, Timeouts};
use redirector::datapath::maps::{conntrack_from_pins, timeouts_from_pins};
use redirector::datapath::maps_pin_dir;
use redirector::datapath::record::Snapshot;
use redirector::model::{NamespacedName, Protocol, ServicePortName};
use redirector_common::conntrack::{CT_TIMEOUTS_MAP, FlowState};

use super::BpffsArg;
use super::describe::UnknownService;
use super::views::{human_duration, plural, table};

#[derive(Args)]
pub struct ConntrackArgs {
    #[command(subcommand)]
    what: ConntrackWhat,
}

#[derive(Subcommand)]
enum ConntrackWhat {
    /// One line per flow: client, service, endpoint, state and expiry (like conntrack -L).
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// Output format: table (default), wide (adds age and entries) or json.
        #[arg(short, long, default_value = "table", value_parser = ["table", "wide", "json"])]
        output: String,
    },
    /// Delete flows, both entries of each (like conntrack -D): a connection's
    /// next packet starts a new flow and picks an endpoint again.
    Flush {
        #[command(flatten)]
        filter: FilterArgs,
    },
}

/// Which flows, under which bpffs.
#[derive(Args)]
struct FilterArgs {
    /// Only the flows of this Service, as NAMESPACE/NAME.
    #[arg(long, value_name = "NAMESPACE/NAME", value_parser = parse_service)]
    service: Option<NamespacedName>,
    #[command(flatten)]
    pins: BpffsArg,
}

fn parse_service(text: &str) -> Result<NamespacedName, String> {
    match text.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(NamespacedName {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
        }
        _ => Err(format!("{text:?} is not NAMESPACE/NAME")),
    }
}

pub fn run(args: ConntrackArgs) -> anyhow::Result<()> {
    match args.what {
        ConntrackWhat::List { filter, output } => {
            let bpffs = &filter.pins.bpffs;
            let names = port_names(bpffs, filter.service.as_ref()).context("redirector conntrack list")?;
            let table = conntrack_from_pins(&maps_pin_dir(bpffs)).context("redirector conntrack list")?;
            let flows = conntrack::read(&table).context("redirector conntrack list")?;
            let timeouts = published_timeouts(bpffs).context("redirector conntrack list")?;
            if timeouts.is_none() {
                tracing::warn!(
                    "expiry unknown: the agent did not publish its timeouts in {CT_TIMEOUTS_MAP} (an older agent?)"
                );
            }
            let chosen = select(&flows, &names, filter.service.as_ref());
            let rows = rows(&chosen, &names, timeouts.as_ref(), conntrack::now_ns());
            match output.as_str() {
                "json" => println!("{:#}", json(&rows)),
                wide => print!("{}", text(&rows, wide == "wide")),
            }
        }
        ConntrackWhat::Flush { filter } => {
            let bpffs = &filter.pins.bpffs;
            let names = port_names(bpffs, filter.service.as_ref()).context("redirector conntrack flush")?;
            let mut table =
                conntrack_from_pins(&maps_pin_dir(bpffs)).context("redirector conntrack flush")?;
            let flows = conntrack::read(&table).context("redirector conntrack flush")?;
            let chosen = select(&flows, &names, filter.service.as_ref());
            conntrack::delete(&mut table, &chosen).context("redirector conntrack flush")?;
            println!("{} deleted", plural(chosen.len() as u64, "flow"));
        }
    }
    Ok(())
}

/// The name of each programmed service port by its ID; an error if `service`
/// is given and has no port programmed.
fn port_names(
    bpffs: &Path,
    service: Option<&NamespacedName>,
) -> anyhow::Result<HashMap<u32, ServicePortName>> {
    let snapshot = Snapshot::read(bpffs)?;
    let names: HashMap<u32, ServicePortName> = snapshot
        .ports
        .iter()
        .filter_map(|port| Some((port.svc_id, port.record.as_ref()?.port_name())))
        .collect();
    if let Some(service) = service
        && !names.values().any(|name| name.service() == *service)
    {
        return Err(UnknownService {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            bpffs: bpffs.to_owned(),
        }
        .into());
    }
    Ok(names)
}

/// The timeouts the agent's sweeper applies, if it published them.
fn published_timeouts(bpffs: &Path) -> anyhow::Result<Option<Timeouts>> {
    let Some(map) = timeouts_from_pins(&maps_pin_dir(bpffs))? else {
        return Ok(None);
    };
    Ok(conntrack::published_timeouts(&map)?)
}

/// The flows translated for `service` (all flows without one).
fn select<'a>(
    flows: &'a [Flow],
    names: &HashMap<u32, ServicePortName>,
    service: Option<&NamespacedName>,
) -> Vec<&'a Flow> {
    flows
        .iter()
        .filter(|flow| {
            service.is_none_or(|service| {
                names
                    .get(&flow.svc_id())
                    .is_some_and(|name| name.service() == *service)
            })
        })
        .collect()
}

/// One flow as listed.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    protocol: &'static str,
    client: SocketAddrV4,
    frontend: SocketAddrV4,
    /// `None` for a service port no longer programmed.
    service: Option<ServicePortName>,
    endpoint: SocketAddrV4,
    state: FlowState,
    idle: Duration,
    /// Time left before the sweeper removes the flow, unless a packet comes
    /// first; `None` without the agent's timeouts.
    expires_in: Option<Duration>,
    age: Duration,
    /// Which of the flow's two entries the table holds.
    entries: &'static str,
}

/// The rows for `flows` at `now_ns`, sorted by service, frontend, protocol,
/// client and endpoint.
fn rows(
    flows: &[&Flow],
    names: &HashMap<u32, ServicePortName>,
    timeouts: Option<&Timeouts>,
    now_ns: u64,
) -> Vec<Row> {
    let since = |ns: u64| Duration::from_nanos(now_ns.saturating_sub(ns));
    let mut rows: Vec<Row> = flows
        .iter()
        .map(|flow| Row {
            protocol: Protocol::from_number(flow.proto()).map_or("?", Protocol::as_k8s),
            client: flow.client(),
            frontend: flow.frontend(),
            service: names.get(&flow.svc_id()).cloned(),
            endpoint: flow.endpoint(),
            state: flow.state(),
            idle: since(flow.last_seen_ns()),
            expires_in: timeouts.map(|t| Duration::from_nanos(flow.expires_ns(t).saturating_sub(now_ns))),
            age: since(flow.created_ns()),
            entries: match (&flow.forward, &flow.reply) {
                (Some(_), Some(_)) => "both",
                (Some(_), None) => "forward",
                _ => "reply",
            },
        })
        .collect();
    rows.sort_by(|a, b| {
        let key = |r: &Row| (r.service.clone(), r.frontend, r.protocol, r.client, r.endpoint);
        key(a).cmp(&key(b))
    });
    rows
}

fn seconds(d: Duration) -> String {
    human_duration(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The table `list` prints; `wide` adds each flow's age and entries.
fn text(rows: &[Row], wide: bool) -> String {
    let mut headers = vec![
        "PROTOCOL", "CLIENT", "FRONTEND", "SERVICE", "ENDPOINT", "STATE", "IDLE", "EXPIRES",
    ];
    if wide {
        headers.extend(["AGE", "ENTRIES"]);
    }
    let lines: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut line = vec![
                r.protocol.to_owned(),
                r.client.to_string(),
                r.frontend.to_string(),
                r.service
                    .as_ref()
                    .map_or("<unknown>".to_owned(), ToString::to_string),
                r.endpoint.to_string(),
                r.state.name().to_owned(),
                seconds(r.idle),
                r.expires_in.map_or("<unknown>".to_owned(), seconds),
            ];
            if wide {
                line.extend([seconds(r.age), r.entries.to_owned()]);
            }
            line
        })
        .collect();
    table(&headers, &lines)
}

/// `-o json`: the same fields, durations in whole seconds.
fn json(rows: &[Row]) -> serde_json::Value {
    let items: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "protocol": r.protocol,
                "client": r.client.to_string(),
                "frontend": r.frontend.to_string(),
                "service": r.service.as_ref().map(ToString::to_string),
                "endpoint": r.endpoint.to_string(),
                "state": r.state.name(),
                "idleSeconds": r.idle.as_secs(),
                "expiresInSeconds": r.expires_in.map(|d| d.as_secs()),
                "ageSeconds": r.age.as_secs(),
                "entries": r.entries,
            })
        })
        .collect();
    serde_json::json!({ "items": items })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use redirector_common::conntrack::{CT_FORWARD, CT_REPLY, CtEntry, CtKey, seen};
    use redirector_common::proto;

    const SEC: u64 = 1_000_000_000;

    fn addr(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    /// A flow from 10.244.0.5:`sport` to `frontend`, pinned to `endpoint`,
    /// for service port `svc_id`, created at 10 s, last seen at `last` s:
    /// its forward entry, then its reply entry.
    fn flow(
        proto: u8,
        sport: u16,
        frontend: ([u8; 4], u16),
        endpoint: ([u8; 4], u16),
        svc_id: u32,
        (forward, reply): (u8, u8),
        last: u64,
    ) -> Vec<(CtKey, CtEntry)> {
        let key = CtKey {
            saddr: addr([10, 244, 0, 5]),
            daddr: addr(frontend.0),
            sport: sport.to_be(),
            dport: frontend.1.to_be(),
            proto,
            _pad: [0; 3],
        };
        let entry = CtEntry {
            nat_addr: addr(endpoint.0),
            nat_port: endpoint.1.to_be(),
            kind: CT_FORWARD,
            seen: forward,
            backend_id: 1,
            svc_id,
            created_ns: 10 * SEC,
            last_seen_ns: last * SEC,
        };
        let reply_entry = CtEntry {
            nat_addr: key.daddr,
            nat_port: key.dport,
            kind: CT_REPLY,
            seen: reply,
            ..entry
        };
        vec![(key, entry), (key.partner(&entry), reply_entry)]
    }

    const WEB: ([u8; 4], u16) = ([10, 96, 0, 10], 80);
    const DNS: ([u8; 4], u16) = ([10, 96, 0, 11], 53);
    const POD_A: ([u8; 4], u16) = ([10, 244, 1, 2], 8080);
    const POD_B: ([u8; 4], u16) = ([10, 244, 1, 3], 5353);

    fn port_name(namespace: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName {
            namespace: namespace.into(),
            name: name.into(),
            port: port.into(),
        }
    }

    /// Service port 1 is shop/web:http, 2 is kube-system/dns:dns; 3 is gone.
    fn names() -> HashMap<u32, ServicePortName> {
        [
            (1, port_name("shop", "web", "http")),
            (2, port_name("kube-system", "dns", "dns")),
        ]
        .into()
    }

    /// An established TCP flow to web, an unanswered UDP flow to dns, a
    /// TCP flow of a service port no longer programmed, and the forward half
    /// of another web flow; listed at 100 s.
    fn table() -> Vec<Flow> {
        let established = (seen::SYN | seen::ACK, seen::SYN);
        let mut entries = flow(proto::TCP, 40001, WEB, POD_A, 1, established, 95);
        entries.extend(flow(proto::UDP, 40002, DNS, POD_B, 2, (seen::DATAGRAM, 0), 90));
        entries.extend(flow(proto::TCP, 40003, WEB, POD_A, 3, established, 40));
        let half = flow(proto::TCP, 40000, WEB, POD_A, 1, (seen::SYN, 0), 99);
        entries.push(half[0]);
        conntrack::flows(entries)
    }

    fn all(flows: &[Flow]) -> Vec<&Flow> {
        flows.iter().collect()
    }

    #[test]
    fn rows_name_the_service_port_and_say_when_each_flow_expires() {
        let flows = table();
        let rows = rows(&all(&flows), &names(), Some(&Timeouts::default()), 100 * SEC);
        let summary: Vec<_> = rows
            .iter()
            .map(|r| {
                (
                    r.service.as_ref().map(ToString::to_string),
                    r.client.port(),
                    r.state,
                    r.expires_in.map(|d| d.as_secs()),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (None, 40003, FlowState::TcpEstablished, Some(86_340)),
                (
                    Some("kube-system/dns:dns".into()),
                    40002,
                    FlowState::UdpUnreplied,
                    Some(20)
                ),
                (
                    Some("shop/web:http".into()),
                    40000,
                    FlowState::TcpSynSent,
                    Some(119)
                ),
                (
                    Some("shop/web:http".into()),
                    40001,
                    FlowState::TcpEstablished,
                    Some(86_395)
                ),
            ],
            "sorted by service (unknown first), then client; expiry = last packet + the state's timeout - now"
        );
        let web = &rows[3];
        assert_eq!(
            (web.frontend, web.endpoint, web.protocol),
            (
                SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80),
                SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 8080),
                "TCP"
            ),
            "addresses in host order"
        );
        assert_eq!(
            (web.idle, web.age, web.entries),
            (Duration::from_secs(5), Duration::from_secs(90), "both"),
            "idle since the last packet, age since creation"
        );
        assert_eq!(rows[2].entries, "forward", "a half flow says so");
        let unknown = super::rows(&all(&flows), &names(), None, 100 * SEC);
        assert!(
            unknown.iter().all(|r| r.expires_in.is_none()),
            "no timeouts, no expiry"
        );
    }

    #[test]
    fn a_flow_past_its_timeout_expires_in_zero() {
        let flows = table();
        let rows = rows(&all(&flows), &names(), Some(&Timeouts::default()), 200 * SEC);
        let dns = rows.iter().find(|r| r.protocol == "UDP").expect("the UDP flow");
        assert_eq!(
            dns.expires_in,
            Some(Duration::ZERO),
            "waiting for the sweeper, not negative"
        );
    }

    #[test]
    fn service_filter_keeps_only_that_services_flows() {
        let flows = table();
        let web = NamespacedName {
            namespace: "shop".into(),
            name: "web".into(),
        };
        let mut ports: Vec<u16> = select(&flows, &names(), Some(&web))
            .iter()
            .map(|f| f.client().port())
            .collect();
        ports.sort();
        assert_eq!(
            ports,
            [40000, 40001],
            "web's flows, not the gone port's flow to the same address"
        );
        let other_ns = NamespacedName {
            namespace: "default".into(),
            name: "web".into(),
        };
        assert!(
            select(&flows, &names(), Some(&other_ns)).is_empty(),
            "the namespace counts"
        );
        assert_eq!(select(&flows, &names(), None).len(), 4, "no filter: every flow");
    }

    #[test]
    fn prints_a_kubectl_table_and_json() {
        let flows = table();
        let chosen = select(
            &flows,
            &names(),
            Some(&NamespacedName {
                namespace: "kube-system".into(),
                name: "dns".into(),
            }),
        );
        let rows = rows(&chosen, &names(), Some(&Timeouts::default()), 100 * SEC);
        assert_eq!(
            text(&rows, false),
            "PROTOCOL   CLIENT             FRONTEND        SERVICE               ENDPOINT          STATE       IDLE   EXPIRES\n\
             UDP        10.244.0.5:40002   10.96.0.11:53   kube-system/dns:dns   10.244.1.3:5353   UNREPLIED   10s    20s\n",
            "table"
        );
        assert!(
            text(&rows, true)
                .lines()
                .nth(1)
                .is_some_and(|l| l.ends_with("20s       90s   both")),
            "wide adds age and entries:\n{}",
            text(&rows, true)
        );
        let unknown = super::rows(&chosen, &names(), None, 100 * SEC);
        assert!(
            text(&unknown, false)
                .lines()
                .nth(1)
                .is_some_and(|l| l.ends_with("10s    <unknown>")),
            "expiry unknown without timeouts:\n{}",
            text(&unknown, false)
        );
        assert_eq!(
            json(&rows),
            serde_json::json!({"items": [{
                "protocol": "UDP",
                "client": "10.244.0.5:40002",
                "frontend": "10.96.0.11:53",
                "service": "kube-system/dns:dns",
                "endpoint": "10.244.1.3:5353",
                "state": "UNREPLIED",
                "idleSeconds": 10,
                "expiresInSeconds": 20,
                "ageSeconds": 90,
                "entries": "both",
            }]}),
            "json"
        );
        assert_eq!(
            json(&unknown)["items"][0]["expiresInSeconds"],
            serde_json::Value::Null,
            "json: unknown expiry is null"
        );
    }

    #[test]
    fn service_names_are_namespace_slash_name() {
        assert_eq!(
            parse_service("shop/web"),
            Ok(NamespacedName {
                namespace: "shop".into(),
                name: "web".into()
            })
        );
        for bad in ["web", "/web", "shop/", "a/b/c"] {
            assert!(parse_service(bad).is_err(), "{bad:?} is refused");
        }
    }
}
