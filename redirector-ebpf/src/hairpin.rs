//! Hairpin: a pod that reaches a Service and is chosen as its endpoint.
//!
//! Translating only the destination would hand the pod a packet from its own
//! address, which its kernel drops as a martian source, and its reply would
//! stay inside the pod, never translated back. So, as kube-proxy masquerades
//! this case (`KUBE-MARK-MASQ` when the source is the endpoint) and Cilium
//! rewrites it to `IPV4_LOOPBACK`, the request's source becomes
//! [`HAIRPIN_ADDR`]; the pod answers that address through its default route,
//! so the reply leaves through the same interface, where its reply entry
//! gives it the service as source and the pod as destination.
//!
//! Both directions are sent straight back out of the interface they came in
//! on (`bpf_redirect` to its egress, the Ethernet addresses swapped), not
//! through the node's routing: a packet from 169.254.42.1 or from a service
//! address would fail strict reverse-path filtering, and nothing but the pod
//! needs to see it. On the way out, `redirector_tc_to_pod` finds no entry for
//! either and lets them pass.
//!
//! Which entries are hairpin is told by their keys ([`CtKey::is_hairpin`]),
//! so the connection table's layout is that of every flow.

use aya_ebpf::{helpers::bpf_redirect, programs::TcContext};
use redirector_common::conntrack::HAIRPIN_ADDR;

use crate::{
    Verdict,
    packet::{self, Link, Packet},
};

/// A request of a hairpin flow, its destination already translated: its
/// source becomes the hairpin address and it goes back to the pod.
#[inline(always)]
pub fn send_request_back(
    ctx: &TcContext,
    link: Link,
    pkt: &Packet,
    counter: u32,
) -> Result<Verdict, Verdict> {
    packet::rewrite_source(ctx, pkt, HAIRPIN_ADDR, pkt.sport)?;
    send_back(ctx, link, counter)
}

/// A reply of a hairpin flow, its source already translated to the service:
/// its destination becomes the pod (`client`, the reply's own source) and it
/// goes back to the pod.
#[inline(always)]
pub fn send_reply_back(
    ctx: &TcContext,
    link: Link,
    pkt: &Packet,
    client: u32,
    counter: u32,
) -> Result<Verdict, Verdict> {
    packet::rewrite_destination(ctx, pkt, client, pkt.dport)?;
    send_back(ctx, link, counter)
}

/// Out of the interface the packet came in on, to the pod it came from.
#[inline(always)]
fn send_back(ctx: &TcContext, link: Link, counter: u32) -> Result<Verdict, Verdict> {
    if link == Link::Ethernet {
        packet::swap_ethernet_addresses(ctx)?;
    }
    // SAFETY: the context pointer is valid for the whole program run.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: a BPF helper with plain values; it returns TC_ACT_REDIRECT
    // (flags 0 is a valid argument) and the redirect happens on return.
    let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
    Ok(Verdict { action, counter })
}
