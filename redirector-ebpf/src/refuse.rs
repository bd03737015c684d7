//! Refusal: turn the packet into an ICMP port-unreachable for its sender and
//! send it back out the interface it came in on, as kube-proxy's `REJECT` does
//! for services without endpoints and for ports a service does not define.
//! For TCP the client's connect() fails at once with ECONNREFUSED; for UDP the
//! next send/recv does. Like the kernel's own ICMP errors (`icmp_ratelimit`),
//! refusals are rate-limited per sender: a burst of [`BURST`], then one per
//! [`INTERVAL_NS`]; beyond that the packet is dropped.

use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::{
        bpf_csum_diff, bpf_ktime_get_ns, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes,
        bpf_skb_store_bytes,
    },
    macros::map,
    maps::LruHashMap,
    programs::TcContext,
};
use redirector_common::{counters, proto};

use crate::{
    Mode, Verdict,
    packet::{IPV4_MIN_HLEN as IP_HLEN, Link, Packet},
};

/// One refusal per second per sender once the burst is spent: the kernel's
/// `icmp_ratelimit` default (1000 ms) and its burst factor (6).
const INTERVAL_NS: u64 = 1_000_000_000;
const BURST: u64 = 6;

/// Per sender address (network byte order): refusal credit in nanoseconds
/// and when it was last topped up. Not pinned: a restart forgets it, as a
/// rate limit may.
#[map]
static REFUSALS_V1: LruHashMap<u32, RefusalCredit> = LruHashMap::with_max_entries(16384, 0);

#[derive(Clone, Copy)]
struct RefusalCredit {
    credit_ns: u64,
    updated_ns: u64,
}

/// Takes one refusal's credit from `saddr`'s bucket, as the kernel's
/// `inet_peer_xrlim_allow`; false when there is none.
#[inline(always)]
fn refusal_allowed(saddr: u32) -> bool {
    // SAFETY: a BPF helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let full = RefusalCredit {
        credit_ns: BURST * INTERVAL_NS,
        updated_ns: now,
    };
    // SAFETY: the entry is copied out at once; a racing update from another
    // CPU only blurs the credit, never lets more than a burst through.
    let mut bucket = unsafe { REFUSALS_V1.get(saddr) }.copied().unwrap_or(full);
    bucket.credit_ns = (bucket.credit_ns + now.saturating_sub(bucket.updated_ns)).min(full.credit_ns);
    bucket.updated_ns = now;
    let allowed = bucket.credit_ns >= INTERVAL_NS;
    if allowed {
        bucket.credit_ns -= INTERVAL_NS;
    }
    let _ = REFUSALS_V1.insert(saddr, bucket, 0);
    allowed
}

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMP_HLEN: usize = 8;
/// RFC 792: the offending IP header (with options) and 8 bytes of its payload.
const MAX_QUOTE: usize = 60 + 8;

/// Answers `pkt` with ICMP port unreachable, counted as `counter`; explain
/// runs take no rate-limit credit.
#[inline(always)]
pub fn port_unreachable(
    ctx: &TcContext,
    link: Link,
    mode: Mode,
    pkt: &Packet,
    counter: u32,
) -> Result<Verdict, Verdict> {
    if mode == Mode::Live && !refusal_allowed(pkt.saddr) {
        return Err(Verdict::drop(counters::DROP_REFUSAL_RATE_LIMITED));
    }
    let failed = Verdict::drop(counters::DROP_REWRITE_FAILED);
    let skb = ctx.skb.skb;

    let mut quote = [0u8; MAX_QUOTE];
    // Read back opaquely so the compiler cannot drop the mask: the verifier
    // needs it to prove the length fits the buffer (8..=68, a multiple of 4).
    let ip_hlen = pkt.ip_hlen as u32;
    // SAFETY: a read of a local.
    let quote_len = (unsafe { core::ptr::read_volatile(&ip_hlen) } & 0x3c) + 8;
    let l3 = link.l3_offset();
    // SAFETY: the buffer holds MAX_QUOTE >= quote_len bytes.
    if unsafe { bpf_skb_load_bytes(skb.cast(), l3 as u32, quote.as_mut_ptr().cast(), quote_len) } != 0 {
        return Err(failed);
    }
    if link == Link::Ethernet {
        // Back to where it came from.
        let macs: [u8; 12] = ctx.load(0).map_err(|_| failed)?;
        let mut swapped = [0u8; 12];
        swapped[..6].copy_from_slice(&macs[6..12]);
        swapped[6..].copy_from_slice(&macs[..6]);
        ctx.store(0, &swapped, 0).map_err(|_| failed)?;
    }

    let total = l3 + IP_HLEN + ICMP_HLEN + quote_len as usize;
    // SAFETY: the skb of this program run.
    if unsafe { bpf_skb_change_tail(skb, total as u32, 0) } != 0 {
        return Err(failed);
    }

    let mut hdr = [0u8; IP_HLEN + ICMP_HLEN];
    let ip_total = (IP_HLEN + ICMP_HLEN) as u16 + quote_len as u16;
    hdr[0] = 0x45;
    hdr[1] = 0xc0; // precedence "internetwork control", as Linux sends ICMP errors
    hdr[2..4].copy_from_slice(&ip_total.to_be_bytes());
    hdr[8] = 64;
    hdr[9] = proto::ICMP;
    hdr[12..16].copy_from_slice(&pkt.daddr.to_ne_bytes());
    hdr[16..20].copy_from_slice(&pkt.saddr.to_ne_bytes());
    let ip_csum = fold(sum_words(&hdr[..IP_HLEN]));
    hdr[10..12].copy_from_slice(&ip_csum.to_ne_bytes());

    hdr[IP_HLEN] = ICMP_DEST_UNREACH;
    hdr[IP_HLEN + 1] = ICMP_PORT_UNREACH;
    // SAFETY: the buffer holds MAX_QUOTE >= quote_len bytes.
    let quote_sum =
        unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, quote.as_mut_ptr().cast(), quote_len, 0) };
    if quote_sum < 0 {
        return Err(failed);
    }
    let icmp_csum = fold(sum_words(&hdr[IP_HLEN..]) + (quote_sum as u64 & 0xffff_ffff));
    hdr[IP_HLEN + 2..IP_HLEN + 4].copy_from_slice(&icmp_csum.to_ne_bytes());

    ctx.store(l3, &hdr, 0).map_err(|_| failed)?;
    // SAFETY: the buffer holds MAX_QUOTE >= quote_len bytes.
    if unsafe {
        bpf_skb_store_bytes(
            skb.cast(),
            (l3 + IP_HLEN + ICMP_HLEN) as u32,
            quote.as_ptr().cast(),
            quote_len,
            0,
        )
    } != 0
    {
        return Err(failed);
    }

    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*skb).ifindex };
    // SAFETY: a BPF helper taking plain values.
    unsafe { bpf_redirect(ifindex, 0) };
    Ok(Verdict {
        action: TC_ACT_REDIRECT,
        counter,
    })
}

/// Sum of 16-bit words as laid out in memory (the checksum is byte-order neutral).
#[inline(always)]
fn sum_words(bytes: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u64::from(u16::from_ne_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
