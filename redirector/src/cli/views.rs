//! What the read-only commands share: the Services grouped from the pinned
//! snapshot, and kubectl's ways of printing them (tables, `describe` fields,
//! ages, endpoint lists). Everything is read from what an agent pinned under
//! the bpffs; nothing is changed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::time::SystemTime;

use redirector::datapath::record::{PortRecord, ProgrammedPort, Snapshot};
use redirector::model::{Endpoint, ServiceInfo};

/// Which namespaces a listing covers.
#[derive(Clone, Debug)]
pub enum Scope {
    Namespace(String),
    All,
}

impl Scope {
    pub fn includes(&self, namespace: &str) -> bool {
        match self {
            Scope::Namespace(ns) => ns == namespace,
            Scope::All => true,
        }
    }
}

/// One Service as the datapath holds it: its ports in spec order.
pub struct ServiceView<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub info: &'a ServiceInfo,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<(&'a ProgrammedPort, &'a PortRecord)>,
}

pub fn services<'a>(snapshot: &'a Snapshot, scope: &Scope) -> Vec<ServiceView<'a>> {
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

pub fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

pub fn sorted(endpoints: &[Endpoint]) -> Vec<Endpoint> {
    let mut v = endpoints.to_vec();
    v.sort();
    v
}

/// kubectl's endpoint list: at most three, then `+ N more...`.
pub fn list_endpoints(endpoints: &[Endpoint]) -> String {
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

pub fn key_values(map: &BTreeMap<String, String>, separator: &str) -> String {
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
pub fn field(out: &mut String, label: &str, value: &str) {
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
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
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

/// kubectl's AGE: `<unknown>` without a (readable) creation time.
pub fn age(created: Option<&str>, now: SystemTime) -> String {
    let created = created.and_then(|c| c.parse::<jiff::Timestamp>().ok());
    let now = jiff::Timestamp::try_from(now).ok();
    let (Some(created), Some(now)) = (created, now) else {
        return "<unknown>".to_owned();
    };
    human_duration(now.as_second() - created.as_second())
}

/// k8s.io/apimachinery's duration.HumanDuration.
pub fn human_duration(seconds: i64) -> String {
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

#[cfg(test)]
pub(super) mod fixture {
    //! A two-port Service as the snapshot holds it, for the commands' tests.
    use super::*;
    use redirector::model::{Frontend, Protocol, ServicePort, ServicePortName};
    use redirector_common::service::ServiceStats;

    pub fn ep(last: u8, port: u16) -> Endpoint {
        Endpoint {
            addr: Ipv4Addr::new(10, 244, 1, last),
            port,
        }
    }

    pub fn programmed(
        name: &str,
        index: usize,
        port: u16,
        target: &str,
        eps: Vec<Endpoint>,
    ) -> ProgrammedPort {
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
            ..ServiceInfo::default()
        };
        let sp = ServicePort {
            no_endpoints: Default::default(),
            affinity: None,
            name: ServicePortName {
                namespace: "shop".into(),
                name: "web-app".into(),
                port: name.into(),
            },
            endpoints: eps.clone(),
            also_serving: Vec::new(),
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
            draining: Vec::new(),
            record: Some(PortRecord::new(&sp)),
            stats: ServiceStats {
                packets: 7,
                bytes: 700,
                new_flows: 2,
            },
        }
    }

    pub fn snapshot() -> Snapshot {
        let many = (1..=5).map(|i| ep(i, 8443)).collect();
        Snapshot {
            ports: vec![
                programmed("https", 1, 443, "https", many),
                programmed("http", 0, 80, "8080", vec![ep(2, 8080), ep(1, 8080)]),
            ],
            unprogrammed: Vec::new(),
        }
    }

    pub fn now() -> SystemTime {
        SystemTime::try_from("2026-11-27T00:05:30Z".parse::<jiff::Timestamp>().unwrap()).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::fixture::now;
    use super::*;

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
}
