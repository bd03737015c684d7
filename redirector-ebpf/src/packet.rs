//! Parsing and rewriting of IPv4/TCP/UDP headers, behind an Ethernet header
//! or, on devices without one, at the start of the packet.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use redirector_common::{conntrack::CtKey, counters, proto};

use crate::Verdict;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
pub const IPV4_MIN_HLEN: usize = 20;
const IP_DADDR_OFF: usize = 16;
const IP_SADDR_OFF: usize = 12;
const IP_CSUM_OFF: usize = 10;
/// More-fragments flag and fragment offset, in host order.
const IP_MF: u16 = 0x2000;
const IP_OFFSET: u16 = 0x1fff;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// What precedes the IP header on the interface a program is attached to.
/// Each program is built once per kind (the value is a constant after
/// inlining, as Cilium compiles `ETH_HLEN` per device) and the agent attaches
/// the one matching the interface's link type.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// veth, netkit in L2 mode, bridges, VXLAN: an Ethernet header.
    Ethernet,
    /// netkit in L3 mode, ipip, WireGuard, TUN: the IP header comes first and
    /// the protocol is only in the skb's metadata.
    Ip,
}

impl Link {
    /// Offset of the IP header.
    pub const fn l3_offset(self) -> usize {
        match self {
            Self::Ethernet => ETH_HLEN,
            Self::Ip => 0,
        }
    }
}

/// Where a packet stands among the fragments of its datagram.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// A whole datagram.
    None,
    /// The first fragment: it carries the TCP/UDP header.
    First,
    /// A later fragment: no ports; they are recalled from the first.
    Later,
}

/// The fields the datapath decides on, copied out of the packet.
pub struct Packet {
    /// Where the IP header starts.
    pub l3: usize,
    /// Addresses and ports in network byte order, as on the wire.
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// IPv4 header length in bytes (20..=60).
    pub ip_hlen: usize,
    /// The IP identification, as on the wire: ties fragments together.
    pub ip_id: u16,
    pub fragment: Fragment,
    /// Ports were not read: the L4 header is cut short.
    pub l4_truncated: bool,
}

impl Packet {
    pub fn tuple(&self) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    pub fn l4_offset(&self) -> usize {
        self.l3 + self.ip_hlen
    }

    /// A TCP SYN without ACK, or any UDP datagram: a packet that may start a
    /// new connection on a reused tuple.
    pub fn opens_connection(&self) -> bool {
        self.proto == proto::UDP || self.is_pure_syn()
    }

    /// A TCP SYN without ACK: a connection's first packet, never a reply.
    pub fn is_pure_syn(&self) -> bool {
        self.proto == proto::TCP && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
    }

    fn l4_csum_offset(&self) -> usize {
        self.l4_offset() + if self.proto == proto::TCP { 16 } else { 6 }
    }

    /// UDP's zero checksum means "none" and must stay zero.
    fn l4_csum_flags(&self) -> u64 {
        if self.proto == proto::UDP {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        }
    }
}

#[inline(always)]
pub(crate) fn bytes_at<const N: usize>(ctx: &TcContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data();
    if start + offset + N > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked above against data_end, as the verifier requires.
    Some(unsafe { *((start + offset) as *const [u8; N]) })
}

/// Writes `value` at `offset` by direct packet access; `None` when the bytes
/// are not in the linear area.
#[inline(always)]
pub(crate) fn write_at<T: Copy>(ctx: &TcContext, offset: usize, value: T) -> Option<()> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked above against data_end, as the verifier requires; the
    // field may be unaligned within the frame.
    unsafe { core::ptr::write_unaligned((start + offset) as *mut T, value) };
    Some(())
}

/// Makes `len` bytes readable by direct access when the skb is non-linear.
#[inline(always)]
pub(crate) fn ensure_linear(ctx: &TcContext, len: usize) {
    if ctx.data() + len > ctx.data_end() && ctx.len() as usize >= len {
        let _ = ctx.pull_data(len as u32);
    }
}

#[inline(always)]
pub fn parse(ctx: &TcContext, link: Link) -> Result<Packet, Verdict> {
    let l3 = link.l3_offset();
    ensure_linear(ctx, l3 + IPV4_MIN_HLEN + TCP_HLEN);
    let unparsable = Verdict::pass(counters::PASS_UNPARSABLE);

    let l3_proto = match link {
        Link::Ethernet => u16::from_be_bytes(bytes_at(ctx, 12).ok_or(unparsable)?),
        // skb->protocol holds the big-endian ethertype in its low 16 bits.
        Link::Ip => u16::from_be(ctx.skb.protocol() as u16),
    };
    if l3_proto != ETH_P_IP {
        return Err(Verdict::pass(counters::PASS_NOT_IPV4));
    }
    let ip: [u8; IPV4_MIN_HLEN] = bytes_at(ctx, l3).ok_or(unparsable)?;
    let ip_hlen = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ip_hlen < IPV4_MIN_HLEN {
        return Err(unparsable);
    }
    let l4_proto = ip[9];
    if l4_proto != proto::TCP && l4_proto != proto::UDP {
        return Err(Verdict::pass(counters::PASS_NOT_TCP_UDP));
    }

    let mut pkt = Packet {
        l3,
        saddr: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        daddr: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        sport: 0,
        dport: 0,
        proto: l4_proto,
        tcp_flags: 0,
        ip_hlen,
        ip_id: u16::from_ne_bytes([ip[4], ip[5]]),
        fragment: match u16::from_be_bytes([ip[6], ip[7]]) {
            frag if frag & IP_OFFSET != 0 => Fragment::Later,
            frag if frag & IP_MF != 0 => Fragment::First,
            _ => Fragment::None,
        },
        l4_truncated: false,
    };
    if pkt.fragment == Fragment::Later {
        return Ok(pkt);
    }

    let l4 = pkt.l4_offset();
    let l4_hlen = if l4_proto == proto::TCP {
        TCP_HLEN
    } else {
        UDP_HLEN
    };
    ensure_linear(ctx, l4 + l4_hlen);
    let l4_header = if l4_proto == proto::TCP {
        l4_fields::<TCP_HLEN>(ctx, l4)
    } else {
        l4_fields::<UDP_HLEN>(ctx, l4)
    };
    match l4_header {
        Some((sport, dport, flags)) => {
            pkt.sport = sport;
            pkt.dport = dport;
            pkt.tcp_flags = flags;
        }
        None => pkt.l4_truncated = true,
    }
    Ok(pkt)
}

/// Ports (network order) and, for TCP, the flags byte of a complete L4 header.
#[inline(always)]
fn l4_fields<const N: usize>(ctx: &TcContext, l4: usize) -> Option<(u16, u16, u8)> {
    let h: [u8; N] = bytes_at(ctx, l4)?;
    let flags = if N == TCP_HLEN { h[13] } else { 0 };
    Some((
        u16::from_ne_bytes([h[0], h[1]]),
        u16::from_ne_bytes([h[2], h[3]]),
        flags,
    ))
}

/// A frame sent back to where it came from: its destination becomes its
/// source (the pod's address) and its source the destination (the node
/// side's), so the pod accepts it as from its gateway.
#[inline(always)]
pub fn swap_ethernet_addresses(ctx: &TcContext) -> Result<(), Verdict> {
    let failed = Verdict::drop(counters::DROP_REWRITE_FAILED);
    let macs: [u8; 12] = bytes_at(ctx, 0).ok_or(failed)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    write_at(ctx, 0, swapped).ok_or(failed)
}

/// Client → service: the destination becomes the backend.
#[inline(always)]
pub fn rewrite_destination(ctx: &TcContext, pkt: &Packet, addr: u32, port: u16) -> Result<(), Verdict> {
    rewrite(
        ctx,
        pkt,
        pkt.l3 + IP_DADDR_OFF,
        pkt.daddr,
        addr,
        pkt.l4_offset() + 2,
        pkt.dport,
        port,
    )
}

/// Backend → client: the source becomes the service.
#[inline(always)]
pub fn rewrite_source(ctx: &TcContext, pkt: &Packet, addr: u32, port: u16) -> Result<(), Verdict> {
    rewrite(
        ctx,
        pkt,
        pkt.l3 + IP_SADDR_OFF,
        pkt.saddr,
        addr,
        pkt.l4_offset(),
        pkt.sport,
        port,
    )
}

/// Replaces one address and one port, fixing the IPv4 and L4 checksums
/// incrementally (the address is part of the L4 pseudo-header).
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "both rewrites share one helper: what to replace, where"
)]
fn rewrite(
    ctx: &TcContext,
    pkt: &Packet,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), Verdict> {
    let failed = Verdict::drop(counters::DROP_REWRITE_FAILED);
    if pkt.fragment == Fragment::Later {
        // No L4 header here: the first fragment's checksum covers the whole
        // datagram and was fixed when it passed.
        write_at(ctx, addr_off, new_addr).ok_or(failed)?;
        return ctx
            .l3_csum_replace(pkt.l3 + IP_CSUM_OFF, u64::from(old_addr), u64::from(new_addr), 4)
            .map_err(|_| failed);
    }
    let csum_off = pkt.l4_csum_offset();
    let l4_flags = pkt.l4_csum_flags();
    // The new address and port are written directly (the headers were
    // checked to be in the linear area by `parse`), then the checksum
    // helpers, which take offsets and know the skb's checksum state, fix the
    // sums. Direct writes first: helpers invalidate packet pointers.
    write_at(ctx, addr_off, new_addr).ok_or(failed)?;
    if old_port != new_port {
        write_at(ctx, port_off, new_port).ok_or(failed)?;
    }
    ctx.l4_csum_replace(
        csum_off,
        u64::from(old_addr),
        u64::from(new_addr),
        l4_flags | BPF_F_PSEUDO_HDR as u64 | 4,
    )
    .map_err(|_| failed)?;
    ctx.l3_csum_replace(pkt.l3 + IP_CSUM_OFF, u64::from(old_addr), u64::from(new_addr), 4)
        .map_err(|_| failed)?;
    if old_port != new_port {
        ctx.l4_csum_replace(csum_off, u64::from(old_port), u64::from(new_port), l4_flags | 2)
            .map_err(|_| failed)?;
    }
    Ok(())
}
