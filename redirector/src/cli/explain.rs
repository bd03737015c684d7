//! `redirector explain`: what the loaded program would do with the first
//! packet of a connection, in words (the run itself is `datapath::explain`).

use std::fmt::Write as _;
use std::net::SocketAddrV4;

use anyhow::Context;
use clap::Args;
use redirector::datapath::explain::{self as run_program, Explanation};
use redirector::datapath::record::{ProgrammedPort, Snapshot};
use redirector::model::{Endpoint, Protocol};
use redirector_common::counters;

use super::BpffsArg;

#[derive(Args)]
pub struct ExplainArgs {
    /// Client address, IP[:PORT] (port default 40000).
    #[arg(long, value_parser = parse_from)]
    from: SocketAddrV4,
    /// Destination, IP:PORT[/tcp|udp] (default tcp).
    #[arg(long, value_parser = parse_to)]
    to: (SocketAddrV4, Protocol),
    #[command(flatten)]
    pins: BpffsArg,
}

pub fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let (to, protocol) = args.to;
    let bpffs = &args.pins.bpffs;
    let snapshot = Snapshot::read(bpffs).context("redirector explain")?;
    let run = run_program::run(bpffs, args.from, to, protocol).context("redirector explain")?;
    print!("{}", explain(&snapshot, args.from, to, protocol, &run));
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[error("invalid address {input:?}: expected {expected}")]
pub struct AddressError {
    input: String,
    expected: &'static str,
}

fn parse_from(s: &str) -> Result<SocketAddrV4, AddressError> {
    let err = || AddressError {
        input: s.to_owned(),
        expected: "an IPv4 address with an optional :PORT, e.g. 10.244.0.5:40000",
    };
    if let Ok(addr) = s.parse::<SocketAddrV4>() {
        return Ok(addr);
    }
    s.parse::<std::net::Ipv4Addr>()
        .map(|ip| SocketAddrV4::new(ip, 40000))
        .map_err(|_| err())
}

fn parse_to(s: &str) -> Result<(SocketAddrV4, Protocol), AddressError> {
    let err = || AddressError {
        input: s.to_owned(),
        expected: "IP:PORT with an optional /tcp or /udp, e.g. 10.96.0.10:80/tcp",
    };
    let (addr, proto) = match s.rsplit_once('/') {
        Some((addr, "tcp" | "TCP")) => (addr, Protocol::Tcp),
        Some((addr, "udp" | "UDP")) => (addr, Protocol::Udp),
        Some(_) => return Err(err()),
        None => (s, Protocol::Tcp),
    };
    Ok((addr.parse().map_err(|_| err())?, proto))
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
    let rewritten_to = run
        .rewritten_to
        .map_or_else(|| "<not a TCP/UDP frame>".to_owned(), |to| to.to_string());
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
        counters::FORWARD_NEW_FLOW if run.affinity => format!(
            "new flow: session affinity (ClientIP) keeps this client on {rewritten_to}, the endpoint its \
             last connection used within the timeout; replies come back from {to}"
        ),
        counters::FORWARD_NEW_FLOW => format!(
            "new flow: this run picked {} (slot {} of {}); each new flow picks uniformly at random, and \
             replies come back from {to}",
            rewritten_to,
            run.slot,
            port.map_or(0, |p| p.endpoints.len())
        ),
        counters::FORWARD_ESTABLISHED => format!(
            "this tuple is an established flow in the connection table, pinned to {}",
            rewritten_to
        ),
        counters::REFUSED_NO_ENDPOINTS => {
            "refused: the service port has no endpoints; the client gets ICMP port unreachable \
             (connection refused)"
                .to_owned()
        }
        counters::DROP_NO_LOCAL_ENDPOINTS => {
            "dropped, no ICMP: the Service has internalTrafficPolicy: Local and none of its endpoints \
             is on this node (those on other nodes are not used); as kube-proxy, the packet is dropped \
             and the client's connection times out"
                .to_owned()
        }
        counters::DROP_UNALLOCATED_IP => format!(
            "dropped: {} is in the service CIDR but no service uses it (as kube-proxy drops it)",
            to.ip()
        ),
        counters::REFUSED_UNKNOWN_PORT => {
            let defined: Vec<String> = snapshot
                .ports
                .iter()
                .filter(|p| p.frontend.addr == *to.ip())
                .map(|p| format!("{}/{}", p.frontend.port, p.frontend.protocol))
                .collect();
            format!(
                "refused: {} is a service address, but no service defines {}/{protocol} there \
                 (it has {}); the client gets ICMP port unreachable",
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
        // The connection-table verdicts (drop_conntrack_clash,
        // pass_stale_reply_entry_removed, icmp_error_translated) need a
        // table write, a SYN-ACK or an ICMP error: a synthetic first packet
        // run in explain mode never gets them.
        _ => format!("verdict {label}"),
    };
    let _ = writeln!(out, "verdict:   {label}");
    let _ = writeln!(out, "why:       {why}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drop_for_want_of_a_local_endpoint_says_so() {
        let snapshot = Snapshot {
            ports: Vec::new(),
            unprogrammed: Vec::new(),
        };
        let run = Explanation {
            verdict: counters::DROP_NO_LOCAL_ENDPOINTS,
            action: 0,
            backend_id: 0,
            slot: 0,
            svc_id: 0,
            affinity: false,
            rewritten_to: None,
        };
        let from = "10.244.0.5:40000".parse().expect("address");
        let to = "10.96.0.10:80".parse().expect("address");
        let text = explain(&snapshot, from, to, Protocol::Tcp, &run);
        assert!(
            text.contains("verdict:   drop_no_local_endpoints"),
            "the verdict's label: {text}"
        );
        assert!(
            text.contains("internalTrafficPolicy: Local") && text.contains("on this node"),
            "the reason in words: {text}"
        );
    }
}
