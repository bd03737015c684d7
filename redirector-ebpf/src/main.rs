//! The service datapath: two TC programs on the node side of pod interfaces,
//! each built twice: for interfaces with an Ethernet header and, suffixed
//! `_l3`, for those without (netkit in L3 mode, TUN, ipip, WireGuard).
//!
//! `redirector_tc` (ingress: packets leaving a pod) translates service
//! traffic; `redirector_tc_to_pod` (egress: packets on their way into a pod)
//! translates replies back, wherever they come from: an endpoint on the
//! node or another node (over a route or a tunnel), a process on the node,
//! or a flow that a masquerade rule rewrote after our translation. Only a
//! hairpin flow's reply, which never enters a pod from outside, is
//! translated on its way out. Packets that are not ours go on down the TC
//! chain (TC_ACT_UNSPEC: tcx "next"), so a CNI's program attached after ours
//! still sees them; so do the ones we translated.
//!
//! Per packet leaving a pod: parse → destination → conntrack (only when the
//! packet can meet an entry) → (new flow: look up service → select backend
//! → record both directions) → rewrite with checksums. A packet to no
//! service, most of what leaves a pod, is settled without the table. Every
//! outcome bumps one per-CPU counter. Only anomalies are logged (aya-log,
//! forwarded into the agent's log): a slot with no backend, a failed
//! connection-table insert;
//! never the normal path, and only once the packet's fate is settled, so the
//! logging code stays out of the parse-and-rewrite chain.
//!
//! Deliberate handling of awkward input (see also the README):
//! - non-IPv4, non-TCP/UDP: passed untouched;
//! - an IPv4 header that is truncated or malformed: passed (the kernel drops it;
//!   it cannot be matched to a service);
//! - IPv4 options: honoured (the L4 header is found after them; the ICMP quote
//!   carries them);
//! - fragments addressed to a service: dropped (no L4 ports in later fragments,
//!   so translating only the first would mis-translate); other fragments pass;
//! - a truncated TCP/UDP header addressed to a service: dropped.
#![no_std]
#![no_main]

mod hairpin;
mod icmp;
mod packet;
mod refuse;
mod sock;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_EXIST, BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use aya_log_ebpf::warn;
use redirector_common::{
    config::Config,
    conntrack::{
        CT_FORWARD, CT_REPLY, CtEntry, CtKey, FragKey, FragPorts, HAIRPIN_ADDR, REFRESH_NS, seen, tcp_flags,
    },
    counters, proto,
    service::{
        AffinityEntry, AffinityKey, BACKEND_FLAG_DRAINING, Backend, FLAG_NO_LOCAL_ENDPOINTS, INLINE_BACKENDS,
        MASTER_SLOT, ServiceEntry, ServiceKey, ServiceMeta, ServiceStats, VipEntry,
    },
};

use packet::{Fragment, Link, Packet};

// Sizes here are defaults; the agent sets the real ones at load time.
#[map]
static SVC_V3: HashMap<ServiceKey, ServiceEntry> = HashMap::pinned(65536, 0);
#[map]
static BACKEND_V1: HashMap<u32, Backend> = HashMap::pinned(65536, 0);
#[map]
static VIP_V1: HashMap<u32, VipEntry> = HashMap::pinned(16384, 0);
/// A plain hash, preallocated: a full table refuses new flows and never
/// evicts a live one; the agent's sweeper removes flows that ended.
#[map]
pub(crate) static CT_V2: HashMap<CtKey, CtEntry> = HashMap::pinned(262144, 0);
#[map]
static CONFIG_V2: Array<Config> = Array::pinned(1, 0);
#[map]
static COUNTERS_V3: PerCpuArray<u64> = PerCpuArray::pinned(counters::COUNT, 0);
#[map]
static SVCSTATS_V1: PerCpuArray<ServiceStats> = PerCpuArray::pinned(65536, 0);
/// A datagram's fragments follow each other closely: an LRU.
#[map]
static FRAG_V1: LruHashMap<FragKey, FragPorts> = LruHashMap::pinned(8192, 0);
/// Soft state (losing an entry only means a new pick): an LRU.
#[map]
static AFFINITY_V1: LruHashMap<AffinityKey, AffinityEntry> = LruHashMap::pinned(65536, 0);
/// Written and read by user space only; allocated per entry, not up front.
#[map]
static SVCMETA_V1: HashMap<u32, ServiceMeta> = HashMap::pinned(65536, BPF_F_NO_PREALLOC);
/// The agent's connection-table timeouts, for the CLI; user space only.
#[map]
static CT_TIMEOUTS_V1: Array<redirector_common::conntrack::CtTimeouts> = Array::pinned(1, 0);

/// What happens to a packet, and which counter says so.
#[must_use]
#[derive(Clone, Copy)]
pub struct Verdict {
    action: i32,
    counter: u32,
}

/// Whether this run may change state (connection table, counters). Explain
/// runs (BPF_PROG_TEST_RUN with [`counters::EXPLAIN_MARK`]) may not.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Live,
    Explain,
}

/// What a new flow was given, for explain runs.
#[derive(Clone, Copy, Default)]
pub struct Choice {
    backend_id: u32,
    slot: u32,
    svc_id: u32,
    /// Session affinity chose the backend.
    affinity: bool,
}

impl Verdict {
    const fn pass(counter: u32) -> Self {
        Self {
            // Not TC_ACT_OK: that would end the chain before a CNI's program.
            action: TC_ACT_UNSPEC,
            counter,
        }
    }
    const fn drop(counter: u32) -> Self {
        Self {
            action: TC_ACT_SHOT,
            counter,
        }
    }
}

#[classifier]
pub fn redirector_tc(ctx: TcContext) -> i32 {
    from_pod(ctx, Link::Ethernet)
}

/// [`redirector_tc`] for interfaces without an Ethernet header.
#[classifier]
pub fn redirector_tc_l3(ctx: TcContext) -> i32 {
    from_pod(ctx, Link::Ip)
}

#[inline(always)]
fn from_pod(mut ctx: TcContext, link: Link) -> i32 {
    // SAFETY: the context pointer is valid for the whole program run.
    let mode = if unsafe { (*ctx.skb.skb).mark } == counters::EXPLAIN_MARK {
        Mode::Explain
    } else {
        Mode::Live
    };
    let mut choice = Choice::default();
    let (Ok(verdict) | Err(verdict)) = try_redirect(&ctx, link, mode, &mut choice);
    match verdict.counter {
        counters::DROP_BACKEND_MISSING => warn!(
            &ctx,
            "service port {} slot {} names no backend: the service map is inconsistent",
            choice.svc_id,
            choice.slot
        ),
        counters::DROP_CT_FULL => warn!(
            &ctx,
            "connection table insert failed: a new flow to service port {} was dropped", choice.svc_id
        ),
        _ => {}
    }
    match mode {
        Mode::Live => count(verdict),
        Mode::Explain => {
            let cb = ctx.cb_mut();
            cb[counters::EXPLAIN_CB_COUNTER] = verdict.counter;
            cb[counters::EXPLAIN_CB_BACKEND] = choice.backend_id;
            cb[counters::EXPLAIN_CB_SLOT] = choice.slot;
            cb[counters::EXPLAIN_CB_SVC] = choice.svc_id;
            cb[counters::EXPLAIN_CB_AFFINITY] = u32::from(choice.affinity);
        }
    }
    verdict.action
}

/// Packets on their way into a pod: a reply of a translated flow gets the
/// service address back as its source; anything else goes on untouched.
#[classifier]
pub fn redirector_tc_to_pod(ctx: TcContext) -> i32 {
    to_pod(&ctx, Link::Ethernet)
}

/// [`redirector_tc_to_pod`] for interfaces without an Ethernet header.
#[classifier]
pub fn redirector_tc_to_pod_l3(ctx: TcContext) -> i32 {
    to_pod(&ctx, Link::Ip)
}

#[inline(always)]
fn to_pod(ctx: &TcContext, link: Link) -> i32 {
    let (Ok(verdict) | Err(verdict)) = try_translate_reply(ctx, link);
    count(verdict);
    verdict.action
}

#[inline(always)]
fn try_translate_reply(ctx: &TcContext, link: Link) -> Result<Verdict, Verdict> {
    let mut pkt = match packet::parse(ctx, link) {
        Err(not_tcp_udp) if not_tcp_udp.counter == counters::PASS_NOT_TCP_UDP => {
            return icmp::translate_error(ctx, link);
        }
        parsed => parsed?,
    };
    if pkt.l4_truncated || !ports_of_fragment(&mut pkt, Mode::Live) {
        return Ok(Verdict::pass(counters::PASS_UNPARSABLE));
    }
    let tuple = pkt.tuple();
    // A SYN without ACK opens a connection: it is no reply, whatever entry
    // its tuple matches, and needs no lookup.
    if !pkt.is_pure_syn()
        && let Some(entry) = CT_V2.get_ptr_mut(tuple)
        // SAFETY: the entry is copied out at once.
        && let entry_now = unsafe { *entry }
        && entry_now.kind == CT_REPLY
    {
        return translate_reply(ctx, &pkt, &tuple, entry, &entry_now, Mode::Live);
    }
    Ok(Verdict::pass(counters::PASS_TO_POD))
}

/// A packet matching a reply entry: its source becomes the service again,
/// unless it opens another connection than the entry's (a SYN-ACK after the
/// entry's flow closed: a direct connection from the same client port), in
/// which case the stale entry goes and the packet passes as it is.
#[inline(always)]
fn translate_reply(
    ctx: &TcContext,
    pkt: &Packet,
    tuple: &CtKey,
    entry: *mut CtEntry,
    entry_now: &CtEntry,
    mode: Mode,
) -> Result<Verdict, Verdict> {
    let syn_ack = tcp_flags::SYN | tcp_flags::ACK;
    if pkt.proto == proto::TCP && pkt.tcp_flags & syn_ack == syn_ack && entry_now.is_closed() {
        if mode == Mode::Live {
            let _ = CT_V2.remove(tuple);
        }
        return Ok(Verdict::pass(counters::PASS_STALE_REPLY));
    }
    if mode == Mode::Live {
        note_packet(entry, entry_now, tuple, pkt);
    }
    packet::rewrite_source(ctx, pkt, entry_now.nat_addr, entry_now.nat_port)?;
    Ok(Verdict::pass(counters::REPLY_TRANSLATED))
}

/// Records a packet of an entry's direction: its flags, and when it was seen
/// (written at most once per [`REFRESH_NS`] unless the flags change, so busy
/// flows do not write on every packet). A FIN or RST is also told to the
/// other direction's entry, which needs it to know its flow closed.
#[inline(always)]
fn note_packet(entry: *mut CtEntry, entry_now: &CtEntry, tuple: &CtKey, pkt: &Packet) {
    let now = now_ns();
    let seen_now = entry_now.seen_after(pkt.proto, pkt.tcp_flags);
    if seen_now != entry_now.seen || now.saturating_sub(entry_now.last_seen_ns) >= REFRESH_NS {
        // SAFETY: a pointer into the map's value; a racing writer on another
        // CPU can only lose a flag or a timestamp, never corrupt the entry.
        unsafe {
            (*entry).seen = seen_now;
            (*entry).last_seen_ns = now;
        }
    }
    let closing = seen_now & !entry_now.seen & seen::CLOSING;
    if closing != 0
        && let Some(partner) = CT_V2.get_ptr_mut(tuple.partner(entry_now))
    {
        // SAFETY: as above.
        unsafe { (*partner).seen |= seen::as_peer(closing) };
    }
}

/// Fragments: the first one's ports are remembered for the later ones (not
/// in explain runs, which change no state); a later one gets them back.
/// False when a later fragment's first was not seen: its ports are unknown.
#[inline(always)]
fn ports_of_fragment(pkt: &mut Packet, mode: Mode) -> bool {
    match pkt.fragment {
        Fragment::None => true,
        Fragment::First => {
            if mode == Mode::Live {
                let ports = FragPorts {
                    sport: pkt.sport,
                    dport: pkt.dport,
                };
                let _ = FRAG_V1.insert(frag_key(pkt), ports, 0);
            }
            true
        }
        // SAFETY: the entry is copied out at once.
        Fragment::Later => match unsafe { FRAG_V1.get(frag_key(pkt)) }.copied() {
            Some(ports) => {
                pkt.sport = ports.sport;
                pkt.dport = ports.dport;
                true
            }
            None => false,
        },
    }
}

/// What ties a datagram's fragments together.
#[inline(always)]
fn frag_key(pkt: &Packet) -> FragKey {
    FragKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        id: pkt.ip_id,
        proto: pkt.proto,
        _pad: 0,
    }
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: a BPF helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn count(verdict: Verdict) {
    if let Some(count) = COUNTERS_V3.get_ptr_mut(verdict.counter) {
        // SAFETY: a per-CPU slot: no other writer while the program runs.
        unsafe { *count += 1 };
    }
}

/// `Ok` for packets that go on (passed, translated, answered); `Err` ends
/// early, with a drop or with a pass decided while parsing. Both arms carry
/// the verdict and are handled alike.
#[inline(always)]
fn try_redirect(ctx: &TcContext, link: Link, mode: Mode, choice: &mut Choice) -> Result<Verdict, Verdict> {
    let mut pkt = match packet::parse(ctx, link) {
        // An ICMP error an endpoint pod sends its client about the flow.
        Err(not_tcp_udp) if not_tcp_udp.counter == counters::PASS_NOT_TCP_UDP => {
            return icmp::translate_error(ctx, link);
        }
        parsed => parsed?,
    };

    if pkt.l4_truncated {
        return without_ports(&pkt, counters::DROP_TRUNCATED);
    }
    if !ports_of_fragment(&mut pkt, mode) {
        return without_ports(&pkt, counters::DROP_FRAGMENT);
    }

    let tuple = pkt.tuple();
    let pure_syn = pkt.is_pure_syn();
    let destination = Destination::of(pkt.daddr);
    // The entries this packet can meet. Forward entries are keyed by a
    // service address (or, with no service range known, by any address that
    // may have been one). Replies are looked up here only for hairpin flows:
    // any other reply is translated on its way into its client pod, whose
    // interface has `redirector_tc_to_pod`. A SYN without ACK is never a
    // reply. So a packet to no service, most of what leaves a pod, is settled
    // without the table (large, its lines cold).
    let may_be_forward = match destination {
        Destination::ServiceRange | Destination::Service => true,
        Destination::NoService => false,
        Destination::Unknown => !pure_syn,
    };
    let may_be_reply = !pure_syn && pkt.daddr == HAIRPIN_ADDR;
    // The flow an opening packet replaces: its reply entry goes with it.
    let mut replaces = None;
    if (may_be_forward || may_be_reply)
        && let Some(entry) = CT_V2.get_ptr_mut(tuple)
    {
        // SAFETY: the entry is copied out at once.
        let entry_now = unsafe { *entry };
        if entry_now.kind == CT_REPLY && may_be_reply {
            let verdict = translate_reply(ctx, &pkt, &tuple, entry, &entry_now, mode)?;
            if verdict.counter == counters::REPLY_TRANSLATED && tuple.is_hairpin(&entry_now) {
                return hairpin::send_reply_back(
                    ctx,
                    link,
                    &pkt,
                    tuple.saddr,
                    counters::HAIRPIN_REPLY_TRANSLATED,
                );
            }
            return Ok(verdict);
        }
        // A new connection on the tuple of a flow that closed, or whose
        // backend left, is a new flow.
        let reopens = pkt.opens_connection()
            && (backend_gone(entry_now.backend_id) || (pkt.proto == proto::TCP && entry_now.is_closed()));
        if entry_now.kind == CT_FORWARD && !reopens {
            *choice = Choice {
                backend_id: entry_now.backend_id,
                slot: 0,
                svc_id: entry_now.svc_id,
                affinity: false,
            };
            if mode == Mode::Live {
                note_packet(entry, &entry_now, &tuple, &pkt);
            }
            count_forward(ctx, mode, entry_now.svc_id, false);
            packet::rewrite_destination(ctx, &pkt, entry_now.nat_addr, entry_now.nat_port)?;
            if tuple.is_hairpin(&entry_now) {
                return hairpin::send_request_back(ctx, link, &pkt, counters::HAIRPIN_ESTABLISHED);
            }
            return Ok(Verdict::pass(counters::FORWARD_ESTABLISHED));
        }
        if entry_now.kind == CT_FORWARD {
            replaces = Some(tuple.partner(&entry_now));
        }
    }
    // A later fragment belongs to a datagram whose first fragment chose its
    // flow; it never starts one.
    if pkt.fragment == Fragment::Later {
        return without_ports(&pkt, counters::DROP_FRAGMENT);
    }

    // Not in the connection table. Most such packets are not for a service
    // at all: the address settles them before any per-port lookup. As
    // kube-proxy: an unallocated address of the service range is dropped;
    // a service address on a port it does not define, or a service port
    // without endpoints, is refused (ICMP port unreachable, rate-limited).
    if !destination.is_service() {
        return Ok(Verdict::pass(counters::PASS_NOT_SERVICE));
    }
    let master_key = service_key(&pkt, MASTER_SLOT);
    // SAFETY: the entry is copied out at once.
    let Some(master) = (unsafe { SVC_V3.get(master_key) }).copied() else {
        if destination == Destination::ServiceRange && !is_allocated(pkt.daddr) {
            return Err(Verdict::drop(counters::DROP_UNALLOCATED_IP));
        }
        return refuse::port_unreachable(ctx, link, mode, &pkt, counters::REFUSED_UNKNOWN_PORT);
    };
    choice.svc_id = master.svc_id;
    if master.count == 0 {
        // Endpoints exist, only not on this node: kube-proxy drops rather
        // than refuses, so clients time out as they would against a node
        // that cannot reach the service.
        if master.flags & FLAG_NO_LOCAL_ENDPOINTS != 0 {
            return Err(Verdict::drop(counters::DROP_NO_LOCAL_ENDPOINTS));
        }
        return refuse::port_unreachable(ctx, link, mode, &pkt, counters::REFUSED_NO_ENDPOINTS);
    }

    // The master's backend_id field holds the affinity timeout (seconds).
    let affinity = (master.backend_id != 0).then_some(AffinityKey {
        svc_id: master.svc_id,
        client_addr: pkt.saddr,
    });
    let chosen = match affinity.and_then(|key| affine_backend(&key, master.backend_id)) {
        Some(kept) => {
            choice.affinity = true;
            kept
        }
        None => {
            let slot = pick_slot(master.count);
            choice.slot = u32::from(slot);
            slot_entry(&master, master_key, slot)?
        }
    };
    choice.backend_id = chosen.backend_id;
    if mode == Mode::Live {
        let now = now_ns();
        if let Some(key) = affinity {
            let used = AffinityEntry {
                backend_id: chosen.backend_id,
                _pad: 0,
                last_used_ns: now,
            };
            let _ = AFFINITY_V1.insert(key, used, 0);
        }
        remember_flow(&pkt, &tuple, &chosen, master.svc_id, replaces, now)?;
    }
    count_forward(ctx, mode, master.svc_id, true);
    packet::rewrite_destination(ctx, &pkt, chosen.backend_addr, chosen.backend_port)?;
    if chosen.backend_addr == pkt.saddr {
        return hairpin::send_request_back(ctx, link, &pkt, counters::HAIRPIN_NEW_FLOW);
    }
    Ok(Verdict::pass(counters::FORWARD_NEW_FLOW))
}

/// A packet whose ports are unknown (a cut-short L4 header, a later fragment
/// whose first was not seen): dropped with `drop` if it is addressed to a
/// service, which it cannot be matched to; else passed.
#[inline(always)]
fn without_ports(pkt: &Packet, drop: u32) -> Result<Verdict, Verdict> {
    if is_service_address(pkt.daddr) {
        Err(Verdict::drop(drop))
    } else {
        Ok(Verdict::pass(counters::PASS_UNPARSABLE))
    }
}

/// Per service port statistics for a packet sent on to an endpoint.
#[inline(always)]
fn count_forward(ctx: &TcContext, mode: Mode, svc_id: u32, new_flow: bool) {
    if mode == Mode::Explain {
        return;
    }
    if let Some(stats) = SVCSTATS_V1.get_ptr_mut(svc_id) {
        // SAFETY: a per-CPU slot: no other writer while the program runs.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += u64::from(ctx.len());
            (*stats).new_flows += u64::from(new_flow);
        }
    }
}

/// The backend a client's last new connection to the service port used, as
/// a slot entry, while it exists, is not draining (kube-proxy's `recent`
/// rules exist only for selected endpoints) and the client opened a
/// connection within `timeout_s` (kube-proxy's `recent --rcheck --seconds`).
#[inline(always)]
fn affine_backend(key: &AffinityKey, timeout_s: u32) -> Option<ServiceEntry> {
    // SAFETY: the entry is copied out at once.
    let last = unsafe { AFFINITY_V1.get(key) }.copied()?;
    if now_ns().saturating_sub(last.last_used_ns) >= u64::from(timeout_s) * 1_000_000_000 {
        return None;
    }
    // SAFETY: the entry is copied out at once.
    let backend = unsafe { BACKEND_V1.get(last.backend_id) }.copied()?;
    if backend.flags & BACKEND_FLAG_DRAINING != 0 {
        return None;
    }
    Some(ServiceEntry::slot(
        last.backend_id,
        key.svc_id,
        backend.addr,
        backend.port,
    ))
}

/// A new flow picks uniformly among the service port's slots.
#[inline(always)]
fn pick_slot(count: u16) -> u16 {
    // SAFETY: a BPF helper without arguments.
    1 + (unsafe { bpf_get_prandom_u32() } % u32::from(count)) as u16
}

/// The slot entry carries the backend's ID and address, so no backend lookup
/// follows; a small service's master carries its slots, so no slot lookup
/// either. The writer writes slots before their master: a missing or empty
/// slot means the maps are inconsistent.
#[inline(always)]
fn slot_entry(master: &ServiceEntry, master_key: ServiceKey, slot: u16) -> Result<ServiceEntry, Verdict> {
    let missing = Verdict::drop(counters::DROP_BACKEND_MISSING);
    if usize::from(master.count) <= INLINE_BACKENDS {
        return master.inline_slot(slot).ok_or(missing);
    }
    // SAFETY: the entry is copied out at once.
    let entry = unsafe { SVC_V3.get(ServiceKey { slot, ..master_key }) }
        .copied()
        .ok_or(missing)?;
    if entry.backend_id == 0 {
        return Err(missing);
    }
    Ok(entry)
}

/// Records both directions; the reply entry first so a forward packet always
/// has its way back. Neither overwrites a live flow: a reply entry is only
/// taken over from a flow that closed or no longer points at it, and a
/// forward entry only from the flow this one `replaces` (an opening packet
/// on its tuple after it closed); anything else is a clash and the packet is
/// dropped, as nf_conntrack drops a flow whose reply tuple is taken.
#[inline(always)]
fn remember_flow(
    pkt: &Packet,
    tuple: &CtKey,
    slot: &ServiceEntry,
    svc_id: u32,
    replaces: Option<CtKey>,
    now: u64,
) -> Result<(), Verdict> {
    let reply = CtEntry {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        kind: CT_REPLY,
        seen: 0,
        backend_id: slot.backend_id,
        svc_id,
        created_ns: now,
        last_seen_ns: now,
    };
    let blank = CtEntry { seen: 0, ..reply };
    let forward = CtEntry {
        nat_addr: slot.backend_addr,
        nat_port: slot.backend_port,
        kind: CT_FORWARD,
        seen: blank.seen_after(pkt.proto, pkt.tcp_flags),
        ..reply
    };
    // The reply's tuple, hairpin included: the one the forward entry names.
    let reply_key = tuple.partner(&forward);
    let full = Verdict::drop(counters::DROP_CT_FULL);
    let clash = Verdict::drop(counters::DROP_CT_CLASH);
    if CT_V2.insert(reply_key, reply, u64::from(BPF_NOEXIST)).is_err() {
        // SAFETY: the entry is copied out at once.
        let Some(existing) = (unsafe { CT_V2.get(reply_key) }).copied() else {
            return Err(full);
        };
        if !reply_entry_is_free(&reply_key, &existing, replaces) {
            return Err(clash);
        }
        CT_V2
            .insert(reply_key, reply, u64::from(BPF_EXIST))
            .map_err(|_| clash)?;
    }
    let how = if replaces.is_some() { BPF_ANY } else { BPF_NOEXIST };
    if CT_V2.insert(tuple, forward, u64::from(how)).is_err() {
        let _ = CT_V2.remove(reply_key);
        return Err(full);
    }
    if let Some(old_reply) = replaces
        && old_reply != reply_key
    {
        let _ = CT_V2.remove(old_reply);
    }
    Ok(())
}

/// Whether a new flow may take over an existing reply entry: its flow closed,
/// it is the reply entry of the flow being replaced, or no forward entry
/// points at it any more.
#[inline(always)]
fn reply_entry_is_free(key: &CtKey, existing: &CtEntry, replaces: Option<CtKey>) -> bool {
    if existing.kind != CT_REPLY {
        return false;
    }
    if existing.is_closed() || replaces == Some(*key) {
        return true;
    }
    // SAFETY: the entry is copied out at once.
    match unsafe { CT_V2.get(key.partner(existing)) }.copied() {
        Some(forward) => {
            forward.kind != CT_FORWARD || forward.nat_addr != key.saddr || forward.nat_port != key.sport
        }
        None => true,
    }
}

#[inline(always)]
fn backend_gone(backend_id: u32) -> bool {
    // SAFETY: only whether the entry exists is read.
    unsafe { BACKEND_V1.get(backend_id) }.is_none()
}

#[inline(always)]
fn is_service_address(addr: u32) -> bool {
    Destination::of(addr).is_service()
}

/// Whether a service has `addr` (network byte order).
#[inline(always)]
fn is_allocated(addr: u32) -> bool {
    // SAFETY: only whether the entry exists is read.
    unsafe { VIP_V1.get(addr) }.is_some()
}

/// What a packet's destination address is: whether it can lead to a forward
/// entry of the connection table or to a service port.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Destination {
    /// In a service range: a service's address or an unallocated one (told
    /// apart only when no service port matches, so a new flow to a
    /// ClusterIP needs no address lookup).
    ServiceRange,
    /// A service's address outside the ranges.
    Service,
    /// Outside the service ranges and no service's.
    NoService,
    /// No service's, and no range is known: it may have been a deleted
    /// service's ClusterIP, whose open flows still follow the table.
    Unknown,
}

impl Destination {
    #[inline(always)]
    fn of(addr: u32) -> Self {
        match in_service_range(addr) {
            Some(true) => Self::ServiceRange,
            _ if is_allocated(addr) => Self::Service,
            Some(false) => Self::NoService,
            None => Self::Unknown,
        }
    }

    /// A service's address, or an unallocated one of a service range.
    #[inline(always)]
    fn is_service(self) -> bool {
        matches!(self, Self::ServiceRange | Self::Service)
    }
}

/// Whether `addr` (network byte order) is in one of the service ranges;
/// `None` when no range is known. The loop is bounded by the array.
#[inline(always)]
fn in_service_range(addr: u32) -> Option<bool> {
    let cfg = CONFIG_V2.get(0)?;
    let count = cfg.service_cidr_count as usize;
    if count == 0 {
        return None;
    }
    Some(
        cfg.service_cidrs
            .iter()
            .take(count)
            .any(|cidr| cidr.mask != 0 && addr & cidr.mask == cidr.addr),
    )
}

#[inline(always)]
fn service_key(pkt: &Packet, slot: u16) -> ServiceKey {
    ServiceKey {
        addr: pkt.daddr,
        port: pkt.dport,
        slot,
        proto: pkt.proto,
        _pad: [0; 3],
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
