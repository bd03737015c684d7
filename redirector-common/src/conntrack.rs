//! The connection table: pins each flow to the backend chosen for its first
//! packet, maps replies back to the service address, and records what each
//! direction has seen so flows end like the kernel's conntrack entries.
//!
//! One hash map holds two entries per flow, both keyed by the tuple as it
//! appears on the wire: the forward entry (client → service) says where to
//! send, the reply entry (backend → client) says which service address to
//! show. Each entry records the TCP flags its own direction has sent, and the
//! closing flags of the other (the datapath copies those across on the rare
//! packets that carry them), plus when its direction was last seen.
//!
//! The datapath never evicts: a full table refuses new flows (the map is a
//! plain hash, not an LRU), an entry is never overwritten while its flow
//! lives, and the agent's sweeper removes flows whose lifetime ran out, with
//! the kernel's timeouts as kube-proxy sets them ([`FlowState`]).

/// Key [`CtKey`], value [`CtEntry`]. V2: a plain hash (V1 was an LRU that
/// evicted idle open flows), entries carry what they have seen and when.
pub const CT_MAP: &str = "CT_V2";

/// The ports of fragmented datagrams, learned from their first fragment,
/// for the later ones, which carry none (as Cilium's `cilium_ipv4_frag_datagrams`).
/// Key [`FragKey`], value [`FragPorts`]; an LRU: a datagram's fragments
/// follow each other closely.
pub const FRAG_MAP: &str = "FRAG_V1";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FragKey {
    /// Source and destination IPv4 addresses as on the wire, network byte order.
    pub saddr: u32,
    pub daddr: u32,
    /// IP identification, network byte order.
    pub id: u16,
    /// [`crate::proto`] number.
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 12);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct FragPorts {
    /// Source and destination ports of the datagram, network byte order.
    pub sport: u16,
    pub dport: u16,
}
const _: () = assert!(core::mem::size_of::<FragPorts>() == 4);

/// Forward entry: rewrite the destination to `nat_addr:nat_port`.
pub const CT_FORWARD: u8 = 1;
/// Reply entry: rewrite the source to `nat_addr:nat_port`.
pub const CT_REPLY: u8 = 2;

/// What an entry's direction has sent ([`CtEntry::seen`]), and the closing
/// flags of the other direction.
pub mod seen {
    /// A SYN (forward) or SYN-ACK (reply).
    pub const SYN: u8 = 1 << 0;
    /// A segment with ACK and without SYN: the handshake completed from this
    /// side (or the flow was picked up mid-stream).
    pub const ACK: u8 = 1 << 1;
    pub const FIN: u8 = 1 << 2;
    pub const RST: u8 = 1 << 3;
    /// The other direction sent a FIN.
    pub const PEER_FIN: u8 = 1 << 4;
    /// The other direction sent a RST.
    pub const PEER_RST: u8 = 1 << 5;
    /// UDP: any datagram in this direction.
    pub const DATAGRAM: u8 = 1 << 6;
    /// Flags the other direction's entry learns about.
    pub const CLOSING: u8 = FIN | RST;

    /// `closing` ([`CLOSING`] flags of one direction) as the other
    /// direction's entry records them.
    pub const fn as_peer(closing: u8) -> u8 {
        (closing & CLOSING) << 2
    }
    const _: () = assert!(as_peer(FIN) == PEER_FIN && as_peer(RST) == PEER_RST);
}

/// TCP flags as in the header's flags byte.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, bytemuck::Pod, bytemuck::Zeroable,
)]
pub struct CtKey {
    /// Source IPv4 address, network byte order.
    pub saddr: u32,
    /// Destination IPv4 address, network byte order.
    pub daddr: u32,
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// [`crate::proto`] number.
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtEntry {
    /// Forward: backend address; reply: service address. Network byte order.
    pub nat_addr: u32,
    /// Forward: backend port; reply: service port. Network byte order.
    pub nat_port: u16,
    /// [`CT_FORWARD`] or [`CT_REPLY`].
    pub kind: u8,
    /// [`seen`] flags.
    pub seen: u8,
    /// Backend ID the flow is pinned to (host order); a new connection on a
    /// tuple whose backend is gone selects again.
    pub backend_id: u32,
    /// Service port ID (host order).
    pub svc_id: u32,
    /// When the flow was created, `bpf_ktime_get_ns` (CLOCK_MONOTONIC), host order.
    pub created_ns: u64,
    /// When this direction last sent a packet, same clock; refreshed at most
    /// once per [`REFRESH_NS`] so busy flows do not write on every packet.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 32);

/// How stale `last_seen_ns` may get before a packet writes it again.
pub const REFRESH_NS: u64 = 1_000_000_000;

/// The source a hairpin flow's requests carry (a pod that reached a Service
/// and was chosen as its endpoint), network byte order: 169.254.42.1, the
/// address Cilium uses (`IPV4_LOOPBACK`). Link-local, so no pod or node has
/// it; the pod answers it through its default route, back to its node.
///
/// A hairpin flow's entries are told by their keys, so the layout needs no
/// flag: its forward entry's endpoint is its own source address, and its
/// reply entry's destination is this address.
pub const HAIRPIN_ADDR: u32 = u32::from_ne_bytes([169, 254, 42, 1]);

impl CtKey {
    /// The key of the other direction's entry, given this entry's value: the
    /// two keys of a flow name each other through their NAT addresses.
    pub const fn partner(&self, entry: &CtEntry) -> CtKey {
        match entry.kind {
            // Forward (client → service): the reply comes from the backend,
            // to the client or, for hairpin, to the hairpin address.
            CT_FORWARD => CtKey {
                saddr: entry.nat_addr,
                daddr: if self.is_hairpin(entry) {
                    HAIRPIN_ADDR
                } else {
                    self.saddr
                },
                sport: entry.nat_port,
                dport: self.sport,
                proto: self.proto,
                _pad: [0; 3],
            },
            // Reply (backend → client): the request went to the service,
            // from the client or, for hairpin, from the backend itself.
            _ => CtKey {
                saddr: if self.is_hairpin(entry) {
                    self.saddr
                } else {
                    self.daddr
                },
                daddr: entry.nat_addr,
                sport: self.dport,
                dport: entry.nat_port,
                proto: self.proto,
                _pad: [0; 3],
            },
        }
    }

    /// Whether this entry is of a hairpin flow (see [`HAIRPIN_ADDR`]): a
    /// forward entry whose endpoint is its client, or a reply entry to the
    /// hairpin address.
    pub const fn is_hairpin(&self, entry: &CtEntry) -> bool {
        match entry.kind {
            CT_FORWARD => entry.nat_addr == self.saddr,
            _ => self.daddr == HAIRPIN_ADDR,
        }
    }
}

impl CtEntry {
    /// The flow ended for this entry's direction: it or its peer reset, or
    /// it sent a FIN. A new connection on the tuple starts a new flow, and a
    /// SYN-ACK on a reply entry so marked belongs to another connection.
    pub const fn is_closed(&self) -> bool {
        self.seen & (seen::FIN | seen::RST | seen::PEER_RST) != 0
    }

    /// The [`seen`] flags after one more packet of this entry's direction.
    pub const fn seen_after(&self, proto: u8, flags: u8) -> u8 {
        if proto != crate::proto::TCP {
            return self.seen | seen::DATAGRAM;
        }
        let mut seen = self.seen;
        if flags & tcp_flags::SYN != 0 {
            seen |= seen::SYN;
        } else if flags & tcp_flags::ACK != 0 {
            seen |= seen::ACK;
        }
        if flags & tcp_flags::FIN != 0 {
            seen |= seen::FIN;
        }
        if flags & tcp_flags::RST != 0 {
            seen |= seen::RST;
        }
        seen
    }
}

/// A flow's state as nf_conntrack would name it, from both entries' flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FlowState {
    /// TCP: no SYN-ACK yet, or no ACK for it.
    TcpSynSent,
    TcpEstablished,
    /// TCP: one side sent a FIN.
    TcpCloseWait,
    /// TCP: both sides sent a FIN.
    TcpTimeWait,
    /// TCP: reset.
    TcpClose,
    /// UDP: no reply yet.
    UdpUnreplied,
    /// UDP: replied.
    UdpReplied,
}

impl FlowState {
    /// `forward` and `reply` are the two entries' [`seen`] flags.
    pub const fn of(proto: u8, forward: u8, reply: u8) -> FlowState {
        if proto != crate::proto::TCP {
            return if reply & seen::DATAGRAM != 0 {
                FlowState::UdpReplied
            } else {
                FlowState::UdpUnreplied
            };
        }
        let both = forward | reply;
        if both & (seen::RST | seen::PEER_RST) != 0 {
            FlowState::TcpClose
        } else if forward & seen::FIN != 0 && reply & seen::FIN != 0 {
            FlowState::TcpTimeWait
        } else if both & (seen::FIN | seen::PEER_FIN) != 0 {
            FlowState::TcpCloseWait
        } else if forward & seen::ACK != 0 && reply & (seen::SYN | seen::ACK) != 0 {
            FlowState::TcpEstablished
        } else {
            FlowState::TcpSynSent
        }
    }

    /// Not yet confirmed by the other side: what nf_conntrack drops first
    /// when its table is full ("early drop").
    pub const fn is_unreplied(self) -> bool {
        matches!(self, FlowState::TcpSynSent | FlowState::UdpUnreplied)
    }

    pub const fn name(self) -> &'static str {
        match self {
            FlowState::TcpSynSent => "SYN_SENT",
            FlowState::TcpEstablished => "ESTABLISHED",
            FlowState::TcpCloseWait => "CLOSE_WAIT",
            FlowState::TcpTimeWait => "TIME_WAIT",
            FlowState::TcpClose => "CLOSE",
            FlowState::UdpUnreplied => "UNREPLIED",
            FlowState::UdpReplied => "REPLIED",
        }
    }

    pub const ALL: [FlowState; 7] = [
        FlowState::TcpSynSent,
        FlowState::TcpEstablished,
        FlowState::TcpCloseWait,
        FlowState::TcpTimeWait,
        FlowState::TcpClose,
        FlowState::UdpUnreplied,
        FlowState::UdpReplied,
    ];
}

/// Array of one [`CtTimeouts`]: the timeouts the agent's sweeper applies,
/// published for the CLI (`redirector conntrack list` shows when each flow
/// expires). Written and read by user space only.
pub const CT_TIMEOUTS_MAP: &str = "CT_TIMEOUTS_V1";

/// How long a flow may stay idle in each [`FlowState`], in whole seconds,
/// host order. No padding: 7 × 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CtTimeouts {
    pub tcp_syn_sent: u32,
    pub tcp_established: u32,
    pub tcp_close_wait: u32,
    pub tcp_time_wait: u32,
    pub tcp_close: u32,
    pub udp: u32,
    /// A replied UDP flow that is a stream.
    pub udp_stream: u32,
}
const _: () = assert!(core::mem::size_of::<CtTimeouts>() == 7 * 4);

#[cfg(feature = "user")]
mod user {
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::CtKey {}
    // SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
    unsafe impl aya::Pod for super::CtEntry {}
    // SAFETY: #[repr(C)], bytemuck::Pod (u32 fields only, no padding).
    unsafe impl aya::Pod for super::CtTimeouts {}
}
