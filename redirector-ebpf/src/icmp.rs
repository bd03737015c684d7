//! ICMP errors about a translated flow, on their way to its client: an
//! endpoint's port unreachable, a hop's fragmentation needed or time
//! exceeded. They quote the packet as it left the node (client → endpoint),
//! which the client's kernel would not match to its socket (connected to the
//! service); the quote and, when the endpoint itself sent the error, the
//! outer source become the service's again, as nf_nat does for related ICMP.
//! Without this a closed UDP port on the endpoint is a timeout instead of a
//! refusal, and path-MTU discovery through a ClusterIP black-holes.

use aya_ebpf::programs::TcContext;
use redirector_common::{
    conntrack::{CT_REPLY, CtKey},
    counters, proto,
};

use crate::{
    CT_V2, Verdict,
    packet::{IPV4_MIN_HLEN, Link, bytes_at, ensure_linear, write_at},
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMP_HLEN: usize = 8;
/// Outer header, ICMP header, quoted header and the quoted ports.
const USUAL_LEN: usize = IPV4_MIN_HLEN + ICMP_HLEN + IPV4_MIN_HLEN + 4;

/// Translates the packet if it is an ICMP error quoting a translated flow's
/// forward packet; anything else that is not TCP or UDP passes as before.
#[inline(always)]
pub fn translate_error(ctx: &TcContext, link: Link) -> Result<Verdict, Verdict> {
    let not_ours = Ok(Verdict::pass(counters::PASS_NOT_TCP_UDP));
    let failed = Verdict::drop(counters::DROP_REWRITE_FAILED);
    let l3 = link.l3_offset();
    ensure_linear(ctx, l3 + USUAL_LEN);
    let Some(outer) = bytes_at::<IPV4_MIN_HLEN>(ctx, l3) else {
        return not_ours;
    };
    let outer_hlen = usize::from(outer[0] & 0x0f) * 4;
    if outer[9] != proto::ICMP || outer_hlen < IPV4_MIN_HLEN {
        return not_ours;
    }
    let icmp_off = l3 + outer_hlen;
    let Some(icmp) = bytes_at::<ICMP_HLEN>(ctx, icmp_off) else {
        return not_ours;
    };
    if !matches!(
        icmp[0],
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    ) {
        return not_ours;
    }
    let inner_l3 = icmp_off + ICMP_HLEN;
    let Some(inner) = bytes_at::<IPV4_MIN_HLEN>(ctx, inner_l3) else {
        return not_ours;
    };
    let inner_hlen = usize::from(inner[0] & 0x0f) * 4;
    let inner_proto = inner[9];
    if inner[0] >> 4 != 4
        || inner_hlen < IPV4_MIN_HLEN
        || (inner_proto != proto::TCP && inner_proto != proto::UDP)
    {
        return not_ours;
    }
    let inner_l4 = inner_l3 + inner_hlen;
    ensure_linear(ctx, inner_l4 + 4);
    let Some(ports) = bytes_at::<4>(ctx, inner_l4) else {
        return not_ours;
    };
    let quoted_saddr = u32::from_ne_bytes([inner[12], inner[13], inner[14], inner[15]]);
    let quoted_daddr = u32::from_ne_bytes([inner[16], inner[17], inner[18], inner[19]]);
    let quoted_sport = u16::from_ne_bytes([ports[0], ports[1]]);
    let quoted_dport = u16::from_ne_bytes([ports[2], ports[3]]);
    // The quoted packet went client → endpoint: the flow's reply entry is
    // keyed endpoint → client and names the service.
    let reply_key = CtKey {
        saddr: quoted_daddr,
        daddr: quoted_saddr,
        sport: quoted_dport,
        dport: quoted_sport,
        proto: inner_proto,
        _pad: [0; 3],
    };
    // SAFETY: the entry is copied out at once.
    let Some(entry) = (unsafe { CT_V2.get(reply_key) }).copied() else {
        return not_ours;
    };
    if entry.kind != CT_REPLY {
        return not_ours;
    }
    let (service_addr, service_port) = (entry.nat_addr, entry.nat_port);
    let outer_saddr = u32::from_ne_bytes([outer[12], outer[13], outer[14], outer[15]]);
    let inner_csum_off = inner_l3 + 10;
    let old_inner_csum = u16::from_ne_bytes(bytes_at::<2>(ctx, inner_csum_off).ok_or(failed)?);

    // Direct writes first: the checksum helpers invalidate packet pointers.
    write_at(ctx, inner_l3 + 16, service_addr).ok_or(failed)?;
    write_at(ctx, inner_l4 + 2, service_port).ok_or(failed)?;
    if outer_saddr == quoted_daddr {
        write_at(ctx, l3 + 12, service_addr).ok_or(failed)?;
    }
    // The quoted header's checksum, then the ICMP checksum over all three
    // changed fields (ICMP has no pseudo-header: the outer source is not in
    // it). The quoted TCP/UDP checksum is left: receivers do not check it.
    ctx.l3_csum_replace(
        inner_csum_off,
        u64::from(quoted_daddr),
        u64::from(service_addr),
        4,
    )
    .map_err(|_| failed)?;
    let new_inner_csum = u16::from_ne_bytes(bytes_at::<2>(ctx, inner_csum_off).ok_or(failed)?);
    let icmp_csum_off = icmp_off + 2;
    ctx.l4_csum_replace(icmp_csum_off, u64::from(quoted_daddr), u64::from(service_addr), 4)
        .map_err(|_| failed)?;
    ctx.l4_csum_replace(icmp_csum_off, u64::from(quoted_dport), u64::from(service_port), 2)
        .map_err(|_| failed)?;
    ctx.l4_csum_replace(
        icmp_csum_off,
        u64::from(old_inner_csum),
        u64::from(new_inner_csum),
        2,
    )
    .map_err(|_| failed)?;
    if outer_saddr == quoted_daddr {
        ctx.l3_csum_replace(l3 + 10, u64::from(outer_saddr), u64::from(service_addr), 4)
            .map_err(|_| failed)?;
    }
    Ok(Verdict::pass(counters::ICMP_ERROR_TRANSLATED))
}
