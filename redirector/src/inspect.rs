//! The operator's views of the live datapath, as kubectl shows Services:
//! `get services`, `get endpoints`, `describe service`, `env`, and `explain`
//! (what the loaded program would do with a packet). Everything is read from
//! what an agent pinned under the bpffs; nothing is changed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use redirector_common::counters;

use crate::datapath::program_pin_path;
use crate::datapath::record::{PortRecord, ProgrammedPort, Snapshot, SnapshotError};
use crate::model::{Endpoint, Protocol, ServiceInfo};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("service {namespace}/{name} is not programmed in the datapath under {bpffs}")]
    UnknownService {
        namespace: String,
        name: String,
        bpffs: String,
    },
    #[error("no loaded program pinned at {path}: is the agent running with this --bpffs? ({source})")]
    NoProgram {
        path: String,
        source: aya::programs::ProgramError,
    },
    #[error("running the program on a synthetic packet (BPF_PROG_TEST_RUN): {source}")]
    TestRun { source: aya::programs::ProgramError },
}

/// Which namespaces a listing covers.
#[derive(Clone, Debug)]
pub enum Scope {
    Namespace(String),
    All,
}

impl Scope {
    fn includes(&self, namespace: &str) -> bool {
        match self {
            Scope::Namespace(ns) => ns == namespace,
            Scope::All => true,
        }
    }
}

/// One Service as the datapath holds it: its ports in spec order.
struct ServiceView<'a> {
    namespace: &'a str,
    name: &'a str,
    info: &'a ServiceInfo,
    cluster_ip: Ipv4Addr,
    ports: Vec<(&'a ProgrammedPort, &'a PortRecord)>,
}

fn services<'a>(snapshot: &'a Snapshot, scope: &Scope) -> Vec<ServiceView<'a>> {
    let mut by_name: BTreeMap<(&str, &str), ServiceView<'a>> = BTreeMap::new();
    for port in &snapshot.ports {
        let Some(record) = &port.record else { continue };
        if !scope.includes(&record.namespace) {
            continue;
        }
        by_name
            .entry((&record.namespace, &record.name))
            .or_insert_with(|| ServiceView {
                namespace: &record.namespace,
                name: &record.name,
                info: &record.info,
                cluster_ip: port.frontend.addr,
                ports: Vec::new(),
            })
            .ports
            .push((port, record));
    }
    let mut views: Vec<_> = by_name.into_values().collect();
    for view in &mut views {
        view.ports.sort_by_key(|(p, r)| (r.info.port_index, p.frontend));
    }
    views
}

/// `redirector get services`, as `kubectl get services`.
pub fn get_services(snapshot: &Snapshot, scope: &Scope, now: SystemTime) -> String {
    let all = matches!(scope, Scope::All);
    let mut rows = Vec::new();
    for svc in services(snapshot, scope) {
        let ports: Vec<String> = svc
            .ports
            .iter()
            .map(|(p, _)| format!("{}/{}", p.frontend.port, p.frontend.protocol.as_k8s()))
            .collect();
        let mut row = Vec::new();
        if all {
            row.push(svc.namespace.to_owned());
        }
        row.extend([
            svc.name.to_owned(),
            svc.info.service_type.clone(),
            svc.cluster_ip.to_string(),
            "<none>".to_owned(),
            ports.join(","),
            age(svc.info.created.as_deref(), now),
        ]);
        rows.push(row);
    }
    let mut headers = vec!["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"];
    if all {
        headers.insert(0, "NAMESPACE");
    }
    table(&headers, &rows)
}

/// `redirector get endpoints [NAME]`, as `kubectl get endpoints`.
pub fn get_endpoints(snapshot: &Snapshot, scope: &Scope, name: Option<&str>, now: SystemTime) -> String {
    let all = matches!(scope, Scope::All);
    let mut rows = Vec::new();
    for svc in services(snapshot, scope) {
        if name.is_some_and(|n| n != svc.name) {
            continue;
        }
        let endpoints: Vec<Endpoint> = svc.ports.iter().flat_map(|(p, _)| sorted(&p.endpoints)).collect();
        let mut row = Vec::new();
        if all {
            row.push(svc.namespace.to_owned());
        }
        row.extend([
            svc.name.to_owned(),
            list_endpoints(&endpoints),
            age(svc.info.created.as_deref(), now),
        ]);
        rows.push(row);
    }
    let mut headers = vec!["NAME", "ENDPOINTS", "AGE"];
    if all {
        headers.insert(0, "NAMESPACE");
    }
    table(&headers, &rows)
}

/// `redirector describe service NAME`, as `kubectl describe service`, plus
/// traffic per port and any drift between what the agent wants and the maps.
pub fn describe_service(
    snapshot: &Snapshot,
    namespace: &str,
    name: &str,
    bpffs: &Path,
) -> Result<String, InspectError> {
    let scope = Scope::Namespace(namespace.to_owned());
    let svc = services(snapshot, &scope)
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| InspectError::UnknownService {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            bpffs: bpffs.display().to_string(),
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
        field(
            &mut out,
            "Traffic",
            &format!(
                "{}, {}",
                plural(port.stats.packets, "packet"),
                plural(port.stats.new_flows, "new flow")
            ),
        );
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
    field(&mut out, "Session Affinity", &svc.info.session_affinity);
    let drift = if drift.is_empty() {
        "none (the maps hold what the agent wants)".to_owned()
    } else {
        drift.join("\n")
    };
    field(&mut out, "Drift", &drift);
    Ok(out)
}

/// `redirector env`: the service variables the kubelet gives a pod created in
/// `namespace` (pkg/kubelet/envvars: services with a ClusterIP in the
/// namespace, and the `kubernetes` service of `default`).
pub fn env(snapshot: &Snapshot, namespace: &str) -> String {
    let mut chosen: BTreeMap<&str, ServiceView<'_>> = BTreeMap::new();
    for svc in services(snapshot, &Scope::All) {
        if svc.namespace == namespace || (svc.namespace == "default" && svc.name == "kubernetes") {
            // The pod's own namespace wins a name clash, as in the kubelet.
            if svc.namespace == namespace || !chosen.contains_key(svc.name) {
                chosen.insert(svc.name, svc);
            }
        }
    }
    let mut out = String::new();
    for (name, svc) in chosen {
        let Some((first, _)) = svc.ports.first() else {
            continue;
        };
        let prefix = name.to_uppercase().replace('-', "_");
        let ip = svc.cluster_ip;
        let _ = writeln!(out, "{prefix}_SERVICE_HOST={ip}");
        let _ = writeln!(out, "{prefix}_SERVICE_PORT={}", first.frontend.port);
        for (port, record) in &svc.ports {
            if !record.port.is_empty() {
                let port_name = record.port.to_uppercase().replace('-', "_");
                let _ = writeln!(out, "{prefix}_SERVICE_PORT_{port_name}={}", port.frontend.port);
            }
        }
        for (index, (port, _)) in svc.ports.iter().enumerate() {
            let proto = port.frontend.protocol.as_k8s();
            let lower = proto.to_lowercase();
            let number = port.frontend.port;
            if index == 0 {
                let _ = writeln!(out, "{prefix}_PORT={lower}://{ip}:{number}");
            }
            let port_prefix = format!("{prefix}_PORT_{number}_{proto}");
            let _ = writeln!(out, "{port_prefix}={lower}://{ip}:{number}");
            let _ = writeln!(out, "{port_prefix}_PROTO={lower}");
            let _ = writeln!(out, "{port_prefix}_PORT={number}");
            let _ = writeln!(out, "{port_prefix}_ADDR={ip}");
        }
    }
    out
}

/// What `redirector explain` decided, from one side-effect-free run of the
/// loaded program.
#[derive(Debug)]
pub struct Explanation {
    pub verdict: u32,
    pub action: u32,
    pub backend_id: u32,
    pub slot: u32,
    pub svc_id: u32,
    /// Destination of the packet as the program left it.
    pub rewritten_to: SocketAddrV4,
}

/// Runs the pinned program on a synthetic first packet (TCP SYN, or a UDP
/// datagram) from `from` to `to`, in explain mode: no connection-table entry
/// and no counter is written.
pub fn run_explain(
    bpffs: &Path,
    from: SocketAddrV4,
    to: SocketAddrV4,
    protocol: Protocol,
) -> Result<Explanation, InspectError> {
    let path = program_pin_path(bpffs);
    let program = SchedClassifier::from_pin(&path).map_err(|source| InspectError::NoProgram {
        path: path.display().to_string(),
        source,
    })?;
    let frame = first_packet(from, to, protocol);
    // struct __sk_buff: `mark` at byte 8, `cb[5]` from byte 48.
    let mut ctx_in = [0u8; 192];
    ctx_in[8..12].copy_from_slice(&counters::EXPLAIN_MARK.to_ne_bytes());
    let mut ctx_out = [0u8; 192];
    let mut out = vec![0u8; 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..Default::default()
        })
        .map_err(|source| InspectError::TestRun { source })?;
    let cb = |i: usize| u32::from_ne_bytes(ctx_out[48 + 4 * i..52 + 4 * i].try_into().unwrap());
    let l4 = 14 + usize::from(out[14] & 0x0f) * 4;
    Ok(Explanation {
        verdict: cb(counters::EXPLAIN_CB_COUNTER),
        action: result.return_value,
        backend_id: cb(counters::EXPLAIN_CB_BACKEND),
        slot: cb(counters::EXPLAIN_CB_SLOT),
        svc_id: cb(counters::EXPLAIN_CB_SVC),
        rewritten_to: SocketAddrV4::new(
            Ipv4Addr::new(out[30], out[31], out[32], out[33]),
            u16::from_be_bytes([out[l4 + 2], out[l4 + 3]]),
        ),
    })
}

/// `redirector explain`: the run's decision, in words, with the service
/// port, the endpoints considered and the choice (or the refusal and why).
pub fn explain(
    snapshot: &Snapshot,
    from: SocketAddrV4,
    to: SocketAddrV4,
    protocol: Protocol,
    run: &Explanation,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "packet:    {from} -> {to}/{protocol} (first packet of a new connection)"
    );
    let port = snapshot
        .ports
        .iter()
        .find(|p| p.svc_id == run.svc_id && run.svc_id != 0);
    let name = |p: &ProgrammedPort| {
        p.record
            .as_ref()
            .map_or_else(|| "<no agent record>".to_owned(), |r| r.port_name().to_string())
    };
    if let Some(p) = port {
        let _ = writeln!(out, "service:   {} ({})", name(p), p.frontend);
        let eps: Vec<String> = p.endpoints.iter().map(Endpoint::to_string).collect();
        let considered = if eps.is_empty() {
            "<none>".to_owned()
        } else {
            eps.join(", ")
        };
        let _ = writeln!(out, "endpoints: {considered} ({} in the maps)", eps.len());
    }
    let label = counters::LABELS
        .get(run.verdict as usize)
        .copied()
        .unwrap_or("unknown");
    let why = match run.verdict {
        counters::FORWARD_NEW_FLOW => format!(
            "new flow: this run picked {} (slot {} of {}); each new flow picks uniformly at random, and \
             replies come back from {to}",
            run.rewritten_to,
            run.slot,
            port.map_or(0, |p| p.endpoints.len())
        ),
        counters::FORWARD_ESTABLISHED => format!(
            "this tuple is an established flow in the connection table, pinned to {}",
            run.rewritten_to
        ),
        counters::REFUSED_NO_ENDPOINTS => {
            "refused: the service port has no endpoints; the client gets ICMP port unreachable \
             (connection refused)"
                .to_owned()
        }
        counters::REFUSED_UNALLOCATED_IP => format!(
            "refused: {} is in the service CIDR but no service uses it; the client gets ICMP port \
             unreachable",
            to.ip()
        ),
        counters::DROP_UNKNOWN_PORT => {
            let defined: Vec<String> = snapshot
                .ports
                .iter()
                .filter(|p| p.frontend.addr == *to.ip())
                .map(|p| format!("{}/{}", p.frontend.port, p.frontend.protocol))
                .collect();
            format!(
                "dropped: {} is a service address, but no service defines {}/{protocol} there \
                 (it has {})",
                to.ip(),
                to.port(),
                defined.join(", ")
            )
        }
        counters::PASS_NOT_SERVICE => {
            format!(
                "not a service address: passed untouched, routed to {} as is",
                to.ip()
            )
        }
        counters::REPLY_TRANSLATED => "a reply of an established flow: its source is rewritten".to_owned(),
        _ => format!("verdict {label}"),
    };
    let _ = writeln!(out, "verdict:   {label}");
    let _ = writeln!(out, "why:       {why}");
    out
}

/// A TCP SYN or a small UDP datagram, with valid checksums.
fn first_packet(from: SocketAddrV4, to: SocketAddrV4, protocol: Protocol) -> Vec<u8> {
    let l4_len = if protocol == Protocol::Tcp { 20 } else { 8 + 4 };
    let mut f = vec![0u8; 14 + 20 + l4_len];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = protocol.number();
    f[26..30].copy_from_slice(&from.ip().octets());
    f[30..34].copy_from_slice(&to.ip().octets());
    let ip_csum = checksum(&[&f[14..34]]);
    f[24..26].copy_from_slice(&ip_csum.to_be_bytes());
    f[34..36].copy_from_slice(&from.port().to_be_bytes());
    f[36..38].copy_from_slice(&to.port().to_be_bytes());
    let csum_at = if protocol == Protocol::Tcp {
        f[46] = 5 << 4;
        f[47] = 0x02; // SYN
        f[48..50].copy_from_slice(&64240u16.to_be_bytes());
        50
    } else {
        f[38..40].copy_from_slice(&(l4_len as u16).to_be_bytes());
        f[42..46].copy_from_slice(b"why?");
        40
    };
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&f[26..34]);
    pseudo.extend_from_slice(&[0, protocol.number()]);
    pseudo.extend_from_slice(&(l4_len as u16).to_be_bytes());
    let l4_csum = checksum(&[&pseudo, &f[34..]]);
    f[csum_at..csum_at + 2].copy_from_slice(&l4_csum.to_be_bytes());
    f
}

fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    for part in parts {
        for chunk in part.chunks(2) {
            sum += u64::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

fn sorted(endpoints: &[Endpoint]) -> Vec<Endpoint> {
    let mut v = endpoints.to_vec();
    v.sort();
    v
}

/// kubectl's endpoint list: at most three, then `+ N more...`.
fn list_endpoints(endpoints: &[Endpoint]) -> String {
    const MAX: usize = 3;
    if endpoints.is_empty() {
        return "<none>".to_owned();
    }
    let shown: Vec<String> = endpoints.iter().take(MAX).map(Endpoint::to_string).collect();
    if endpoints.len() > MAX {
        format!("{} + {} more...", shown.join(","), endpoints.len() - MAX)
    } else {
        shown.join(",")
    }
}

fn key_values(map: &BTreeMap<String, String>, separator: &str) -> String {
    if map.is_empty() {
        return "<none>".to_owned();
    }
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(separator)
}

/// A `describe` line: the label padded as kubectl does; continuation lines of
/// a multi-line value are indented under it.
fn field(out: &mut String, label: &str, value: &str) {
    const WIDTH: usize = 26;
    let mut lines = value.lines();
    let _ = writeln!(
        out,
        "{:<WIDTH$}{}",
        format!("{label}:"),
        lines.next().unwrap_or("")
    );
    for line in lines {
        let _ = writeln!(out, "{:<WIDTH$}{line}", "");
    }
}

/// Columns separated by three spaces, as kubectl's tabwriter.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        let mut text = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}   ", width = widths[i]);
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// kubectl's AGE: `<unknown>` without a creation time.
fn age(created: Option<&str>, now: SystemTime) -> String {
    let Some(created) = created.and_then(parse_rfc3339) else {
        return "<unknown>".to_owned();
    };
    let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    human_duration(now - created)
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS(.fff)Z`.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// k8s.io/apimachinery's duration.HumanDuration.
fn human_duration(seconds: i64) -> String {
    if seconds < -1 {
        return "<invalid>".to_owned();
    }
    if seconds < 0 {
        return "0s".to_owned();
    }
    if seconds < 120 {
        return format!("{seconds}s");
    }
    let minutes = seconds / 60;
    if minutes < 10 {
        let s = seconds % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = minutes / 60;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    let days = hours / 24;
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{days}d")
        } else {
            format!("{days}d{h}h")
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{days}d");
    }
    let years = days / 365;
    if hours < 24 * 365 * 8 {
        let d = days % 365;
        return if d == 0 {
            format!("{years}y")
        } else {
            format!("{years}y{d}d")
        };
    }
    format!("{years}y")
}

/// `-o json` for `get services` and `get endpoints`: one object per Service
/// with its ports as programmed.
pub fn services_json(snapshot: &Snapshot, scope: &Scope, name: Option<&str>) -> serde_json::Value {
    let items: Vec<serde_json::Value> = services(snapshot, scope)
        .into_iter()
        .filter(|svc| name.is_none_or(|n| n == svc.name))
        .map(|svc| {
            let ports: Vec<serde_json::Value> = svc
                .ports
                .iter()
                .map(|(p, r)| {
                    serde_json::json!({
                        "name": r.port,
                        "port": p.frontend.port,
                        "protocol": p.frontend.protocol.as_k8s(),
                        "targetPort": r.info.target_port,
                        "endpoints": sorted(&p.endpoints).iter().map(Endpoint::to_string).collect::<Vec<_>>(),
                        "packets": p.stats.packets,
                        "bytes": p.stats.bytes,
                        "newFlows": p.stats.new_flows,
                        "drift": p.drift(),
                    })
                })
                .collect();
            serde_json::json!({
                "namespace": svc.namespace,
                "name": svc.name,
                "type": svc.info.service_type,
                "clusterIP": svc.cluster_ip.to_string(),
                "labels": svc.info.labels,
                "selector": svc.info.selector,
                "sessionAffinity": svc.info.session_affinity,
                "creationTimestamp": svc.info.created,
                "ports": ports,
            })
        })
        .collect();
    serde_json::json!({ "items": items })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Frontend, ServicePort, ServicePortName};
    use redirector_common::service::ServiceStats;

    fn ep(last: u8, port: u16) -> Endpoint {
        Endpoint {
            addr: Ipv4Addr::new(10, 244, 1, last),
            port,
        }
    }

    fn programmed(name: &str, index: usize, port: u16, target: &str, eps: Vec<Endpoint>) -> ProgrammedPort {
        let info = ServiceInfo {
            labels: [
                ("app".to_owned(), "web".to_owned()),
                ("tier".to_owned(), "front".to_owned()),
            ]
            .into(),
            selector: Some([("app".to_owned(), "web".to_owned())].into()),
            service_type: "ClusterIP".into(),
            session_affinity: "None".into(),
            target_port: target.into(),
            port_index: index,
            created: Some("2026-11-27T00:00:00Z".into()),
        };
        let sp = ServicePort {
            name: ServicePortName {
                namespace: "shop".into(),
                name: "web-app".into(),
                port: name.into(),
            },
            endpoints: eps.clone(),
            info,
        };
        ProgrammedPort {
            frontend: Frontend {
                addr: Ipv4Addr::new(10, 96, 0, 10),
                port,
                protocol: Protocol::Tcp,
            },
            svc_id: index as u32 + 1,
            endpoints: eps,
            record: Some(PortRecord::new(&sp)),
            stats: ServiceStats {
                packets: 7,
                bytes: 700,
                new_flows: 2,
            },
        }
    }

    fn snapshot() -> Snapshot {
        let many = (1..=5).map(|i| ep(i, 8443)).collect();
        Snapshot {
            ports: vec![
                programmed("https", 1, 443, "https", many),
                programmed("http", 0, 80, "8080", vec![ep(2, 8080), ep(1, 8080)]),
            ],
            unprogrammed: Vec::new(),
        }
    }

    fn now() -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_secs(parse_rfc3339("2026-11-27T00:05:30Z").unwrap() as u64)
    }

    #[test]
    fn lists_like_kubectl() {
        let s = snapshot();
        let ns = Scope::Namespace("shop".into());
        assert_eq!(
            get_services(&s, &ns, now()),
            "NAME      TYPE        CLUSTER-IP   EXTERNAL-IP   PORT(S)          AGE\n\
             web-app   ClusterIP   10.96.0.10   <none>        80/TCP,443/TCP   5m30s\n",
            "get services"
        );
        assert_eq!(
            get_endpoints(&s, &ns, None, now()),
            "NAME      ENDPOINTS                                                     AGE\n\
             web-app   10.244.1.1:8080,10.244.1.2:8080,10.244.1.1:8443 + 4 more...   5m30s\n",
            "get endpoints: three, then the count of the rest"
        );
        assert!(
            get_services(&s, &Scope::Namespace("other".into()), now())
                .lines()
                .count()
                == 1,
            "other ns: header only"
        );
        assert!(
            get_services(&s, &Scope::All, now()).starts_with("NAMESPACE   NAME"),
            "-A adds NAMESPACE"
        );
    }

    #[test]
    fn describes_like_kubectl_with_traffic_and_drift() {
        let mut s = snapshot();
        let text = describe_service(&s, "shop", "web-app", Path::new("/sys/fs/bpf")).unwrap();
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
        let text = describe_service(&s, "shop", "web-app", Path::new("/x")).unwrap();
        assert!(
            text.contains("Drift:                    http: the agent wants 2 endpoints, the maps hold 1"),
            "drift is stated: {text}"
        );
        let err = describe_service(&s, "shop", "nope", Path::new("/x"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("shop/nope") && err.contains("/x"),
            "unknown service names it: {err}"
        );
    }

    #[test]
    fn env_follows_the_kubelet() {
        let text = env(&snapshot(), "shop");
        let expected = "\
WEB_APP_SERVICE_HOST=10.96.0.10
WEB_APP_SERVICE_PORT=80
WEB_APP_SERVICE_PORT_HTTP=80
WEB_APP_SERVICE_PORT_HTTPS=443
WEB_APP_PORT=tcp://10.96.0.10:80
WEB_APP_PORT_80_TCP=tcp://10.96.0.10:80
WEB_APP_PORT_80_TCP_PROTO=tcp
WEB_APP_PORT_80_TCP_PORT=80
WEB_APP_PORT_80_TCP_ADDR=10.96.0.10
WEB_APP_PORT_443_TCP=tcp://10.96.0.10:443
WEB_APP_PORT_443_TCP_PROTO=tcp
WEB_APP_PORT_443_TCP_PORT=443
WEB_APP_PORT_443_TCP_ADDR=10.96.0.10
";
        assert_eq!(text, expected, "env for the namespace");
        assert_eq!(env(&snapshot(), "other"), "", "no services in another namespace");
    }

    #[test]
    fn human_durations() {
        for (secs, want) in [
            (5, "5s"),
            (119, "119s"),
            (150, "2m30s"),
            (600, "10m"),
            (3 * 3600 + 60, "3h1m"),
            (9 * 3600, "9h"),
            (50 * 3600, "2d2h"),
            (30 * 86400, "30d"),
            (800 * 86400, "2y70d"),
        ] {
            assert_eq!(human_duration(secs), want, "{secs} seconds");
        }
        assert_eq!(age(None, now()), "<unknown>", "no creation time");
    }

    #[test]
    fn synthetic_packets_have_valid_checksums() {
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let f = first_packet(
                "10.0.0.1:40000".parse().unwrap(),
                "10.96.0.10:80".parse().unwrap(),
                protocol,
            );
            assert_eq!(checksum(&[&f[14..34]]), 0, "{protocol}: IPv4 checksum");
            let mut pseudo = f[26..34].to_vec();
            pseudo.extend_from_slice(&[0, protocol.number()]);
            pseudo.extend_from_slice(&((f.len() - 34) as u16).to_be_bytes());
            assert_eq!(checksum(&[&pseudo, &f[34..]]), 0, "{protocol}: L4 checksum");
        }
    }
}
