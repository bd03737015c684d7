//! Connect-time translation for clients whose packets never cross a pod
//! interface (processes in the node's network namespace): cgroup v2
//! socket-address programs, after Cilium's `bpf_sock.c`.
//!
//! `connect4` (TCP, connected UDP) and `sendmsg4` (unconnected UDP) replace
//! a service frontend by an endpoint before the socket sends anything, so
//! its packets carry the endpoint's address from the start and need no
//! per-packet work; `recvmsg4` and `getpeername4` show the service address
//! again. The endpoint is chosen as the TC path chooses (the same maps,
//! [`crate::pick_slot`] and [`crate::slot_entry`]); the refusals the TC path
//! answers with ICMP are errors of the call here. A destination that is not a
//! service frontend is untouched.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock_addr, map},
    maps::{Array, LruHashMap},
    programs::SockAddrContext,
};
use redirector_common::{
    counters, proto,
    service::{FLAG_NO_LOCAL_ENDPOINTS, MASTER_SLOT, ServiceKey},
    sock::{SockConfig, SockRevEntry, SockRevKey},
};

use crate::{SVC_V3, SVCSTATS_V1, VIP_V1, Verdict, count, pick_slot, slot_entry};

/// Entries die with the LRU, not with their socket: no hook sees every close.
#[map]
static SOCK_REVERSE_V1: LruHashMap<SockRevKey, SockRevEntry> = LruHashMap::pinned(65536, 0);
#[map]
static SOCK_CONFIG_V1: Array<SockConfig> = Array::pinned(1, 0);

/// What a cgroup program returns: the call fails (with the error set by
/// `bpf_set_retval`, else EPERM) or goes on.
const SYS_REJECT: i32 = 0;
const SYS_PROCEED: i32 = 1;

const ENOMEM: i32 = 12;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

#[cgroup_sock_addr(connect4)]
pub fn redirector_connect4(ctx: SockAddrContext) -> i32 {
    to_endpoint(&ctx, counters::SOCK_CONNECT_TRANSLATED)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn redirector_sendmsg4(ctx: SockAddrContext) -> i32 {
    to_endpoint(&ctx, counters::SOCK_SENDMSG_TRANSLATED)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn redirector_recvmsg4(ctx: SockAddrContext) -> i32 {
    to_service(&ctx);
    SYS_PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn redirector_getpeername4(ctx: SockAddrContext) -> i32 {
    to_service(&ctx);
    SYS_PROCEED
}

/// The destination of a `connect` or `sendmsg`, if it is a service frontend,
/// becomes an endpoint; a frontend that cannot be served fails the call at
/// once, as the TC path's ICMP error fails it a round trip later.
#[inline(always)]
fn to_endpoint(ctx: &SockAddrContext, translated: u32) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    let (protocol, daddr, user_port) = unsafe { ((*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    let proto = if protocol == u32::from(proto::TCP) {
        proto::TCP
    } else if protocol == u32::from(proto::UDP) {
        proto::UDP
    } else {
        return SYS_PROCEED;
    };
    // SAFETY: only whether the entry exists is read.
    if unsafe { VIP_V1.get(daddr) }.is_none() {
        count(Verdict::pass(counters::SOCK_PASS_NOT_SERVICE));
        return SYS_PROCEED;
    }
    if !serves(ctx) {
        count(Verdict::pass(counters::SOCK_PASS_OTHER_NETNS));
        return SYS_PROCEED;
    }
    // The port is the low 16 bits, in network byte order as in sin_port.
    let dport = user_port as u16;
    let master_key = ServiceKey {
        addr: daddr,
        port: dport,
        slot: MASTER_SLOT,
        proto,
        _pad: [0; 3],
    };
    // SAFETY: the entry is copied out at once.
    let Some(master) = (unsafe { SVC_V3.get(master_key) }).copied() else {
        return refuse(ECONNREFUSED, counters::SOCK_REFUSED_UNKNOWN_PORT);
    };
    if master.count == 0 {
        // The TC path drops these silently; a call cannot be dropped, and
        // "unreachable" is what such a client ends with.
        if master.flags & FLAG_NO_LOCAL_ENDPOINTS != 0 {
            return refuse(EHOSTUNREACH, counters::SOCK_REFUSED_NO_LOCAL_ENDPOINTS);
        }
        return refuse(ECONNREFUSED, counters::SOCK_REFUSED_NO_ENDPOINTS);
    }
    let Ok(chosen) = slot_entry(&master, master_key, pick_slot(master.count)) else {
        return refuse(EHOSTUNREACH, counters::SOCK_REFUSED_BACKEND_MISSING);
    };
    let key = SockRevKey {
        // SAFETY: a BPF helper on the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr: chosen.backend_addr,
        port: chosen.backend_port,
        _pad: [0; 2],
    };
    let service = SockRevEntry {
        addr: daddr,
        port: dport,
        _pad: [0; 2],
    };
    // Without it, replies would show the endpoint: a resolver drops those.
    if SOCK_REVERSE_V1.insert(key, service, 0).is_err() {
        return refuse(ENOMEM, counters::SOCK_REFUSED_REVERSE_FULL);
    }
    // SAFETY: as above; connect4 and sendmsg4 may write both fields.
    unsafe {
        (*sa).user_ip4 = chosen.backend_addr;
        (*sa).user_port = u32::from(chosen.backend_port);
    }
    if let Some(stats) = SVCSTATS_V1.get_ptr_mut(master.svc_id) {
        // SAFETY: a per-CPU slot: no other writer while the program runs.
        unsafe { (*stats).new_flows += 1 };
    }
    count(Verdict::pass(translated));
    SYS_PROCEED
}

/// The source of a received datagram, or the peer of a socket, becomes the
/// service address again if this socket was translated to it.
#[inline(always)]
fn to_service(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the whole program run.
    let (addr, port) = unsafe { ((*sa).user_ip4, (*sa).user_port as u16) };
    let key = SockRevKey {
        // SAFETY: a BPF helper on the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        addr,
        port,
        _pad: [0; 2],
    };
    // SAFETY: the entry is copied out at once.
    if let Some(service) = unsafe { SOCK_REVERSE_V1.get(key) }.copied() {
        // SAFETY: as above; recvmsg4 and getpeername4 may write both fields.
        unsafe {
            (*sa).user_ip4 = service.addr;
            (*sa).user_port = u32::from(service.port);
        }
        count(Verdict::pass(counters::SOCK_REPLY_ADDRESS_RESTORED));
    }
}

/// Whether this socket is served: with `--socket-lb host`, only those of the
/// agent's network namespace.
#[inline(always)]
fn serves(ctx: &SockAddrContext) -> bool {
    let Some(config) = SOCK_CONFIG_V1.get(0) else {
        return false;
    };
    // SAFETY: a BPF helper on the program's own context.
    config.netns_cookie == 0 || config.netns_cookie == unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// Fails the call with `errno`.
#[inline(always)]
fn refuse(errno: i32, counter: u32) -> i32 {
    // SAFETY: a BPF helper with a plain value; connect4 and sendmsg4 may set
    // their return value.
    unsafe { bpf_set_retval(-errno) };
    count(Verdict::pass(counter));
    SYS_REJECT
}
