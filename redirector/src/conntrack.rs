//! The connection table's lifetimes. The datapath records what each
//! direction of a flow has seen and when; this module pairs the two entries
//! of each flow, names its state as nf_conntrack would, and decides which
//! flows ended: idle longer than their state's timeout (kube-proxy's
//! settings of the kernel's timeouts), or, when the table is nearly full,
//! never answered (nf_conntrack's "early drop"). The sweeper applies that to
//! the pinned table; the CLI lists the same flows.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError};
use redirector_common::conntrack::{
    CT_FORWARD, CT_REPLY, CT_TIMEOUTS_MAP, CtEntry, CtKey, CtTimeouts, FlowState,
};

use crate::datapath::batch;

/// How long a flow may stay idle in each state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// SYN seen, handshake not complete (the kernel's `tcp_timeout_syn_sent`).
    pub tcp_syn_sent: Duration,
    /// kube-proxy's `--conntrack-tcp-timeout-established`.
    pub tcp_established: Duration,
    /// One side closed; kube-proxy's `--conntrack-tcp-timeout-close-wait`.
    pub tcp_close_wait: Duration,
    /// Both sides closed.
    pub tcp_time_wait: Duration,
    /// Reset.
    pub tcp_close: Duration,
    /// kube-proxy's `--conntrack-udp-timeout` (the kernel's default).
    pub udp: Duration,
    /// A replied UDP flow still active after [`UDP_STREAM_AFTER`].
    pub udp_stream: Duration,
}

/// Whole seconds, rounded up so a sub-second timeout does not read as none.
fn whole_seconds(d: Duration) -> u32 {
    let up = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    u32::try_from(up).unwrap_or(u32::MAX)
}

impl From<&Timeouts> for CtTimeouts {
    fn from(t: &Timeouts) -> Self {
        Self {
            tcp_syn_sent: whole_seconds(t.tcp_syn_sent),
            tcp_established: whole_seconds(t.tcp_established),
            tcp_close_wait: whole_seconds(t.tcp_close_wait),
            tcp_time_wait: whole_seconds(t.tcp_time_wait),
            tcp_close: whole_seconds(t.tcp_close),
            udp: whole_seconds(t.udp),
            udp_stream: whole_seconds(t.udp_stream),
        }
    }
}

impl From<&CtTimeouts> for Timeouts {
    fn from(t: &CtTimeouts) -> Self {
        let secs = |s: u32| Duration::from_secs(s.into());
        Self {
            tcp_syn_sent: secs(t.tcp_syn_sent),
            tcp_established: secs(t.tcp_established),
            tcp_close_wait: secs(t.tcp_close_wait),
            tcp_time_wait: secs(t.tcp_time_wait),
            tcp_close: secs(t.tcp_close),
            udp: secs(t.udp),
            udp_stream: secs(t.udp_stream),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TimeoutsError {
    #[error("publishing the connection table's timeouts in {CT_TIMEOUTS_MAP}")]
    Write { source: MapError },
    #[error("reading the connection table's timeouts from {CT_TIMEOUTS_MAP}")]
    Read { source: MapError },
}

/// Writes the sweeper's timeouts where the CLI reads them.
pub fn publish_timeouts(
    map: &mut Array<MapData, CtTimeouts>,
    timeouts: &Timeouts,
) -> Result<(), TimeoutsError> {
    map.set(0, CtTimeouts::from(timeouts), 0)
        .map_err(|source| TimeoutsError::Write { source })
}

/// The timeouts an agent published; `None` if it never wrote them (the map
/// starts zeroed).
pub fn published_timeouts(map: &Array<MapData, CtTimeouts>) -> Result<Option<Timeouts>, TimeoutsError> {
    let raw = map.get(&0, 0).map_err(|source| TimeoutsError::Read { source })?;
    Ok((raw != CtTimeouts::default()).then(|| Timeouts::from(&raw)))
}

/// nf_conntrack's rule: a replied UDP flow still going this long after it
/// started is a stream and gets the longer timeout.
pub const UDP_STREAM_AFTER: Duration = Duration::from_secs(2);

impl Default for Timeouts {
    /// The kernel's defaults, with kube-proxy's two settings.
    fn default() -> Self {
        Self {
            tcp_syn_sent: Duration::from_secs(120),
            tcp_established: Duration::from_secs(86_400),
            tcp_close_wait: Duration::from_secs(3_600),
            tcp_time_wait: Duration::from_secs(120),
            tcp_close: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
        }
    }
}

impl Timeouts {
    fn of(&self, flow: &Flow) -> Duration {
        match flow.state() {
            FlowState::TcpSynSent => self.tcp_syn_sent,
            FlowState::TcpEstablished => self.tcp_established,
            FlowState::TcpCloseWait => self.tcp_close_wait,
            FlowState::TcpTimeWait => self.tcp_time_wait,
            FlowState::TcpClose => self.tcp_close,
            FlowState::UdpUnreplied => self.udp,
            FlowState::UdpReplied => {
                let lived = flow.last_seen_ns().saturating_sub(flow.created_ns());
                if lived >= UDP_STREAM_AFTER.as_nanos() as u64 {
                    self.udp_stream
                } else {
                    self.udp
                }
            }
        }
    }
}

/// One flow: its forward entry and the reply entry that points back at it.
/// Either may be missing: a reply entry taken over by a later flow on the
/// same reply tuple leaves the earlier flow's forward entry alone, and an
/// entry whose partner was removed is alone until it expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub forward: Option<(CtKey, CtEntry)>,
    pub reply: Option<(CtKey, CtEntry)>,
}

impl Flow {
    fn entries(&self) -> impl Iterator<Item = &(CtKey, CtEntry)> {
        self.forward.iter().chain(&self.reply)
    }

    pub fn proto(&self) -> u8 {
        self.entries().next().map_or(0, |(key, _)| key.proto)
    }

    pub fn state(&self) -> FlowState {
        let seen = |side: &Option<(CtKey, CtEntry)>| side.as_ref().map_or(0, |(_, entry)| entry.seen);
        FlowState::of(self.proto(), seen(&self.forward), seen(&self.reply))
    }

    /// When either direction last sent a packet (CLOCK_MONOTONIC_COARSE ns).
    pub fn last_seen_ns(&self) -> u64 {
        self.entries().map(|(_, e)| e.last_seen_ns).max().unwrap_or(0)
    }

    pub fn created_ns(&self) -> u64 {
        self.entries().map(|(_, e)| e.created_ns).min().unwrap_or(0)
    }

    /// The service port the flow was translated for.
    pub fn svc_id(&self) -> u32 {
        self.entries().next().map_or(0, |(_, e)| e.svc_id)
    }

    /// When the flow ends unless a packet comes first.
    pub fn expires_ns(&self, timeouts: &Timeouts) -> u64 {
        self.last_seen_ns()
            .saturating_add(timeouts.of(self).as_nanos() as u64)
    }

    pub fn keys(&self) -> impl Iterator<Item = CtKey> + '_ {
        self.entries().map(|(key, _)| *key)
    }

    /// The client's address and port.
    pub fn client(&self) -> SocketAddrV4 {
        match (&self.forward, &self.reply) {
            (Some((key, _)), _) => socket(key.saddr, key.sport),
            // A hairpin flow's reply goes to the hairpin address, not the
            // client: the forward key the entry names has the client.
            (None, Some((key, entry))) => {
                let forward = key.partner(entry);
                socket(forward.saddr, forward.sport)
            }
            (None, None) => socket(0, 0),
        }
    }

    /// The service address the client connected to.
    pub fn frontend(&self) -> SocketAddrV4 {
        match (&self.forward, &self.reply) {
            (Some((key, _)), _) => socket(key.daddr, key.dport),
            (None, Some((_, entry))) => socket(entry.nat_addr, entry.nat_port),
            (None, None) => socket(0, 0),
        }
    }

    /// The endpoint the flow is pinned to.
    pub fn endpoint(&self) -> SocketAddrV4 {
        match (&self.forward, &self.reply) {
            (Some((_, entry)), _) => socket(entry.nat_addr, entry.nat_port),
            (None, Some((key, _))) => socket(key.saddr, key.sport),
            (None, None) => socket(0, 0),
        }
    }
}

/// An address and port as the table holds them (network byte order).
fn socket(addr: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(addr.to_ne_bytes()), u16::from_be(port))
}

/// Pairs the table's entries into flows. Two entries are one flow when each
/// names the other ([`CtKey::partner`]).
pub fn flows(entries: impl IntoIterator<Item = (CtKey, CtEntry)>) -> Vec<Flow> {
    let table: HashMap<CtKey, CtEntry> = entries.into_iter().collect();
    let pointing_back = |key: &CtKey, entry: &CtEntry| {
        let partner = key.partner(entry);
        table
            .get(&partner)
            .filter(|other| other.kind != entry.kind && partner.partner(other) == *key)
            .map(|other| (partner, *other))
    };
    let mut flows = Vec::new();
    for (key, entry) in &table {
        match entry.kind {
            CT_FORWARD => flows.push(Flow {
                forward: Some((*key, *entry)),
                reply: pointing_back(key, entry),
            }),
            CT_REPLY if pointing_back(key, entry).is_none() => flows.push(Flow {
                forward: None,
                reply: Some((*key, *entry)),
            }),
            // A paired reply entry comes with its forward entry.
            _ => {}
        }
    }
    flows
}

/// What one sweep found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Flows left, by state.
    pub flows: BTreeMap<FlowState, usize>,
    /// Entries in the table before the sweep.
    pub entries: usize,
    /// Flows removed because they outlived their timeout.
    pub expired: usize,
    /// Unanswered flows removed to make room.
    pub early_dropped: usize,
}

/// Early drop starts above this share of the table and stops at the lower one.
const EARLY_DROP_ABOVE: (usize, usize) = (9, 10);
const EARLY_DROP_DOWN_TO: (usize, usize) = (8, 10);

/// Which entries to remove at `now_ns`: those of expired flows, then, while
/// the table is fuller than 90% of `capacity`, those of unanswered flows,
/// oldest first, down to 80%. Established flows are never chosen for room.
pub fn plan(flows: &[Flow], now_ns: u64, timeouts: &Timeouts, capacity: usize) -> (Vec<CtKey>, SweepReport) {
    let mut report = SweepReport {
        entries: flows.iter().map(|f| f.keys().count()).sum(),
        ..SweepReport::default()
    };
    let mut remove = Vec::new();
    let mut alive = Vec::new();
    for flow in flows {
        if now_ns >= flow.expires_ns(timeouts) {
            report.expired += 1;
            remove.extend(flow.keys());
        } else {
            alive.push(flow);
        }
    }
    let mut left = report.entries - remove.len();
    if left * EARLY_DROP_ABOVE.1 > capacity * EARLY_DROP_ABOVE.0 {
        let target = capacity * EARLY_DROP_DOWN_TO.0 / EARLY_DROP_DOWN_TO.1;
        let mut unanswered: Vec<usize> = (0..alive.len())
            .filter(|&i| alive[i].state().is_unreplied())
            .collect();
        unanswered.sort_by_key(|&i| alive[i].last_seen_ns());
        let mut dropped = vec![false; alive.len()];
        for i in unanswered {
            if left <= target {
                break;
            }
            left -= alive[i].keys().count();
            remove.extend(alive[i].keys());
            dropped[i] = true;
            report.early_dropped += 1;
        }
        alive = alive
            .into_iter()
            .zip(dropped)
            .filter_map(|(flow, dropped)| (!dropped).then_some(flow))
            .collect();
    }
    for flow in alive {
        *report.flows.entry(flow.state()).or_default() += 1;
    }
    (remove, report)
}

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("reading the connection table")]
    Read { source: std::io::Error },
    #[error("removing {count} ended flows' entries from the connection table")]
    Remove { count: usize, source: std::io::Error },
    #[error("deleting {flows} flows from the connection table")]
    Delete { flows: usize, source: std::io::Error },
}

/// Now on the clock the datapath stamps entries with (`bpf_ktime_get_coarse_ns`).
pub fn now_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse);
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Every flow in the table.
pub fn read(table: &BpfHashMap<MapData, CtKey, CtEntry>) -> Result<Vec<Flow>, SweepError> {
    let entries = batch::lookup_all(table).map_err(|source| SweepError::Read { source })?;
    Ok(flows(entries))
}

/// Removes `flows`, both entries of each, as `conntrack -D` does: the next
/// packet of a connection starts a new flow (and picks an endpoint again).
pub fn delete(table: &mut BpfHashMap<MapData, CtKey, CtEntry>, flows: &[&Flow]) -> Result<(), SweepError> {
    let keys: Vec<CtKey> = flows.iter().flat_map(|flow| flow.keys()).collect();
    batch::delete_all(table, &keys).map_err(|source| SweepError::Delete {
        flows: flows.len(),
        source,
    })
}

/// One sweep of the pinned table. A packet arriving between the read and the
/// removal of its flow finds no entry and starts a new flow, as after the
/// kernel's conntrack expired it.
pub fn sweep(
    table: &mut BpfHashMap<MapData, CtKey, CtEntry>,
    timeouts: &Timeouts,
    capacity: usize,
) -> Result<SweepReport, SweepError> {
    let flows = read(table)?;
    let (remove, report) = plan(&flows, now_ns(), timeouts, capacity);
    batch::delete_all(table, &remove).map_err(|source| SweepError::Remove {
        count: remove.len(),
        source,
    })?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use redirector_common::conntrack::seen;
    use redirector_common::proto;

    const SEC: u64 = 1_000_000_000;

    fn key(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16, proto: u8) -> CtKey {
        CtKey {
            saddr: u32::from_ne_bytes(saddr),
            daddr: u32::from_ne_bytes(daddr),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto,
            _pad: [0; 3],
        }
    }

    /// A flow from 10.244.0.5:40000 to 10.96.0.10:80, endpoint 10.244.1.2:8080,
    /// with each side's flags and last packets.
    fn flow(proto: u8, forward: (u8, u64), reply: Option<(u8, u64)>) -> Vec<(CtKey, CtEntry)> {
        let fwd_key = key([10, 244, 0, 5], 40000, [10, 96, 0, 10], 80, proto);
        let fwd = CtEntry {
            nat_addr: u32::from_ne_bytes([10, 244, 1, 2]),
            nat_port: 8080u16.to_be(),
            kind: CT_FORWARD,
            seen: forward.0,
            backend_id: 1,
            svc_id: 7,
            created_ns: 0,
            last_seen_ns: forward.1,
        };
        let mut entries = vec![(fwd_key, fwd)];
        if let Some((seen, last)) = reply {
            let rep = CtEntry {
                nat_addr: u32::from_ne_bytes([10, 96, 0, 10]),
                nat_port: 80u16.to_be(),
                kind: CT_REPLY,
                seen,
                last_seen_ns: last,
                ..fwd
            };
            entries.push((fwd_key.partner(&fwd), rep));
        }
        entries
    }

    #[test]
    fn the_two_entries_of_a_flow_are_one_flow() {
        let flows = flows(flow(proto::TCP, (seen::SYN | seen::ACK, 5), Some((seen::SYN, 9))));
        assert_eq!(flows.len(), 1, "one flow");
        assert!(
            flows[0].forward.is_some() && flows[0].reply.is_some(),
            "both entries paired"
        );
        assert_eq!(flows[0].last_seen_ns(), 9, "the later direction counts");
        assert_eq!(flows[0].state(), FlowState::TcpEstablished);
    }

    #[test]
    fn a_flow_names_client_service_and_endpoint_from_either_entry() {
        let entries = flow(proto::TCP, (seen::SYN, 5), Some((seen::SYN, 5)));
        let client = SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), 40000);
        let frontend = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
        let endpoint = SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 2), 8080);
        let whole = &flows(entries.clone())[0];
        let reply_only = &flows(entries[1..].to_vec())[0];
        assert!(reply_only.forward.is_none(), "the reply entry alone");
        for (what, flow) in [("both entries", whole), ("reply entry only", reply_only)] {
            assert_eq!(
                (flow.client(), flow.frontend(), flow.endpoint()),
                (client, frontend, endpoint),
                "{what}"
            );
        }
    }

    #[test]
    fn a_hairpin_flow_is_one_flow_named_by_its_client() {
        // The pod 10.244.0.5 chosen as the endpoint of its own connection:
        // its reply goes to the hairpin address.
        let pod = [10, 244, 0, 5];
        let fwd_key = key(pod, 40000, [10, 96, 0, 10], 80, proto::TCP);
        let fwd = CtEntry {
            nat_addr: u32::from_ne_bytes(pod),
            nat_port: 8080u16.to_be(),
            kind: CT_FORWARD,
            seen: seen::SYN | seen::ACK,
            backend_id: 1,
            svc_id: 7,
            created_ns: 0,
            last_seen_ns: 5,
        };
        let rep_key = key(pod, 8080, [169, 254, 42, 1], 40000, proto::TCP);
        let rep = CtEntry {
            nat_addr: u32::from_ne_bytes([10, 96, 0, 10]),
            nat_port: 80u16.to_be(),
            kind: CT_REPLY,
            seen: seen::SYN | seen::ACK,
            ..fwd
        };
        assert_eq!(
            fwd_key.partner(&fwd),
            rep_key,
            "the forward entry names the reply entry"
        );
        assert_eq!(
            rep_key.partner(&rep),
            fwd_key,
            "the reply entry names the forward entry"
        );
        assert!(
            fwd_key.is_hairpin(&fwd) && rep_key.is_hairpin(&rep),
            "both entries are told as hairpin"
        );
        let whole = flows([(fwd_key, fwd), (rep_key, rep)]);
        assert_eq!(whole.len(), 1, "one flow: {whole:?}");
        assert_eq!(whole[0].state(), FlowState::TcpEstablished);
        let client = SocketAddrV4::new(Ipv4Addr::from(pod), 40000);
        let endpoint = SocketAddrV4::new(Ipv4Addr::from(pod), 8080);
        let reply_only = &flows([(rep_key, rep)])[0];
        for (what, flow) in [("both entries", &whole[0]), ("reply entry only", reply_only)] {
            assert_eq!(
                (flow.client(), flow.endpoint()),
                (client, endpoint),
                "{what}: the pod is client and endpoint"
            );
        }
        // An ordinary flow's entries are not hairpin.
        let ordinary = flow(proto::TCP, (seen::SYN, 5), Some((seen::SYN, 5)));
        assert!(
            ordinary.iter().all(|(key, entry)| !key.is_hairpin(entry)),
            "a flow to another pod is not hairpin"
        );
    }

    #[test]
    fn published_timeouts_are_whole_seconds_rounded_up() {
        let t = Timeouts {
            tcp_close: Duration::from_millis(300),
            udp: Duration::from_millis(1500),
            ..Timeouts::default()
        };
        let published = CtTimeouts::from(&t);
        assert_eq!(
            (published.tcp_established, published.tcp_close, published.udp),
            (86_400, 1, 2),
            "seconds, a fraction rounds up"
        );
        let back = Timeouts::from(&published);
        assert_eq!(
            back,
            Timeouts {
                tcp_close: Duration::from_secs(1),
                udp: Duration::from_secs(2),
                ..Timeouts::default()
            },
            "read back as whole seconds"
        );
    }

    #[test]
    fn a_reply_entry_taken_over_by_another_flow_is_not_paired() {
        let mut entries = flow(proto::TCP, (seen::SYN, 5), Some((seen::SYN, 5)));
        // Another service's flow from the same client port to the same
        // endpoint: its forward entry names the reply entry, which names the
        // first flow's.
        let (mut other_key, mut other) = entries[0];
        other_key.daddr = u32::from_ne_bytes([10, 96, 0, 12]);
        other.svc_id = 8;
        entries.push((other_key, other));
        let flows = flows(entries);
        assert_eq!(flows.len(), 2, "two flows");
        let paired: Vec<_> = flows.iter().filter(|f| f.reply.is_some()).collect();
        assert_eq!(paired.len(), 1, "the reply entry belongs to one flow");
        assert_eq!(paired[0].svc_id(), 7, "the flow it names");
    }

    #[test]
    fn flows_are_named_as_nf_conntrack_names_them() {
        use seen::*;
        let cases = [
            (proto::TCP, SYN, 0, FlowState::TcpSynSent, "a SYN only"),
            (
                proto::TCP,
                SYN,
                SYN,
                FlowState::TcpSynSent,
                "SYN-ACK, not yet acknowledged",
            ),
            (
                proto::TCP,
                SYN | ACK,
                SYN,
                FlowState::TcpEstablished,
                "handshake complete",
            ),
            (
                proto::TCP,
                ACK,
                ACK,
                FlowState::TcpEstablished,
                "picked up mid-stream",
            ),
            (
                proto::TCP,
                SYN | ACK | FIN,
                SYN | PEER_FIN,
                FlowState::TcpCloseWait,
                "client closed",
            ),
            (
                proto::TCP,
                SYN | ACK | PEER_FIN,
                SYN | FIN,
                FlowState::TcpCloseWait,
                "endpoint closed",
            ),
            (
                proto::TCP,
                SYN | ACK | FIN,
                SYN | FIN,
                FlowState::TcpTimeWait,
                "both closed",
            ),
            (
                proto::TCP,
                SYN | ACK | RST,
                SYN | PEER_RST,
                FlowState::TcpClose,
                "client reset",
            ),
            (
                proto::TCP,
                SYN | ACK | PEER_RST,
                SYN | RST,
                FlowState::TcpClose,
                "endpoint reset",
            ),
            (proto::UDP, DATAGRAM, 0, FlowState::UdpUnreplied, "UDP, no answer"),
            (
                proto::UDP,
                DATAGRAM,
                DATAGRAM,
                FlowState::UdpReplied,
                "UDP, answered",
            ),
        ];
        for (proto, forward, reply, expected, what) in cases {
            assert_eq!(FlowState::of(proto, forward, reply), expected, "{what}");
        }
    }

    #[test]
    fn flows_expire_after_their_state_timeout() {
        let t = Timeouts::default();
        let established = flows(flow(
            proto::TCP,
            (seen::SYN | seen::ACK, 100 * SEC),
            Some((seen::SYN, 100 * SEC)),
        ));
        let closed = flows(flow(
            proto::TCP,
            (seen::SYN | seen::ACK | seen::FIN, 100 * SEC),
            Some((seen::SYN | seen::FIN, 100 * SEC)),
        ));
        let udp_once = flows(flow(
            proto::UDP,
            (seen::DATAGRAM, SEC),
            Some((seen::DATAGRAM, SEC)),
        ));
        let udp_stream = flows(flow(
            proto::UDP,
            (seen::DATAGRAM, 10 * SEC),
            Some((seen::DATAGRAM, 10 * SEC)),
        ));
        let cases = [
            (
                &established,
                100 * SEC + 86_400 * SEC,
                "established: a day after the last packet",
            ),
            (
                &closed,
                100 * SEC + 120 * SEC,
                "both closed: TIME_WAIT's two minutes",
            ),
            (&udp_once, SEC + 30 * SEC, "UDP replied at once: 30 s"),
            (
                &udp_stream,
                10 * SEC + 120 * SEC,
                "UDP still going after 2 s: a stream, 120 s",
            ),
        ];
        for (flows, expires, what) in cases {
            assert_eq!(flows[0].expires_ns(&t), expires, "{what}");
            let (before, _) = plan(flows, expires - 1, &t, 1000);
            assert!(before.is_empty(), "{what}: kept just before");
            let (at, report) = plan(flows, expires, &t, 1000);
            assert_eq!(at.len(), 2, "{what}: both entries removed at expiry");
            assert_eq!(report.expired, 1, "{what}: counted");
        }
    }

    #[test]
    fn a_nearly_full_table_drops_unanswered_flows_never_established_ones() {
        let t = Timeouts::default();
        let mut entries = Vec::new();
        // 10 established flows and 10 unanswered SYNs, on distinct client ports.
        for port in 0..20u16 {
            let answered = port < 10;
            for (mut key, entry) in flow(
                proto::TCP,
                (
                    if answered {
                        seen::SYN | seen::ACK
                    } else {
                        seen::SYN
                    },
                    u64::from(port) * SEC,
                ),
                Some((if answered { seen::SYN } else { 0 }, u64::from(port) * SEC)),
            ) {
                if entry.kind == CT_FORWARD {
                    key.sport = (41000 + port).to_be();
                } else {
                    key.dport = (41000 + port).to_be();
                }
                entries.push((key, entry));
            }
        }
        let flows = flows(entries);
        // 40 entries in a table of 40: early drop down to 32 entries.
        let (remove, report) = plan(&flows, 30 * SEC, &t, 40);
        assert_eq!(report.early_dropped, 4, "four unanswered flows go");
        assert_eq!(remove.len(), 8, "with both their entries");
        assert_eq!(
            report.flows.get(&FlowState::TcpEstablished),
            Some(&10),
            "every established flow stays"
        );
        assert_eq!(
            report.flows.get(&FlowState::TcpSynSent),
            Some(&6),
            "the newer unanswered stay"
        );
        // The oldest unanswered flows went first.
        let ports: Vec<u16> = remove
            .iter()
            .filter(|k| k.proto == proto::TCP && k.daddr == u32::from_ne_bytes([10, 96, 0, 10]))
            .map(|k| u16::from_be(k.sport))
            .collect();
        assert_eq!(ports.len(), 4);
        assert!(
            ports.iter().all(|p| (41010..41014).contains(p)),
            "oldest first: {ports:?}"
        );

        let (remove, _) = plan(&flows, 30 * SEC, &t, 100);
        assert!(remove.is_empty(), "a roomy table drops nothing");
    }
}
