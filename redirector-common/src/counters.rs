//! Per-CPU packet counters: one slot per verdict and drop reason.

/// `PerCpuArray<u64>` with [`COUNT`] slots, indexed by the constants below.
/// V2: `pass_to_pod_untouched` (the reverse-translation program on the way
/// into pods), kube-proxy's refusals (an undefined port is refused, an
/// unallocated address dropped) and the refusals' rate limit.
/// V3: `drop_no_local_endpoints` (internalTrafficPolicy: Local), the
/// connection table's clashes and stale reply entries, ICMP errors
/// translated for a flow's client, and the outcomes of connect-time
/// translation (`sock_*`), counted once per `connect`, `sendmsg`, `recvmsg`
/// or `getpeername` call, not per packet; the hairpin verdicts (a pod
/// chosen as the endpoint of its own connection: its packets are sent back
/// out of the interface they came in on).
pub const COUNTER_MAP: &str = "COUNTERS_V3";

macro_rules! counters {
    ($($name:ident = $index:literal : $label:literal,)+) => {
        $(pub const $name: u32 = $index;)+
        /// Number of counter slots.
        pub const COUNT: u32 = [$($index),+].len() as u32;
        /// Metric label of each slot, by index.
        pub const LABELS: [&str; COUNT as usize] = [$($label),+];
        const _: () = {
            let mut i = 0;
            let indexes = [$($index),+];
            while i < indexes.len() {
                assert!(indexes[i] == i as u32, "counter indexes must be dense and in order");
                i += 1;
            }
        };
    };
}

counters! {
    PASS_NOT_IPV4 = 0: "pass_not_ipv4",
    PASS_NOT_TCP_UDP = 1: "pass_not_tcp_udp",
    PASS_NOT_SERVICE = 2: "pass_not_service",
    PASS_UNPARSABLE = 3: "pass_unparsable",
    FORWARD_NEW_FLOW = 4: "forward_new_flow",
    FORWARD_ESTABLISHED = 5: "forward_established",
    REPLY_TRANSLATED = 6: "reply_translated",
    REFUSED_NO_ENDPOINTS = 7: "refused_no_endpoints",
    REFUSED_UNKNOWN_PORT = 8: "refused_unknown_port",
    DROP_UNALLOCATED_IP = 9: "drop_unallocated_cluster_ip",
    DROP_FRAGMENT = 10: "drop_fragment",
    DROP_TRUNCATED = 11: "drop_truncated",
    DROP_BACKEND_MISSING = 12: "drop_backend_missing",
    DROP_CT_FULL = 13: "drop_conntrack_insert_failed",
    DROP_REWRITE_FAILED = 14: "drop_rewrite_failed",
    PASS_TO_POD = 15: "pass_to_pod_untouched",
    DROP_REFUSAL_RATE_LIMITED = 16: "drop_refusal_rate_limited",
    DROP_NO_LOCAL_ENDPOINTS = 17: "drop_no_local_endpoints",
    DROP_CT_CLASH = 18: "drop_conntrack_clash",
    PASS_STALE_REPLY = 19: "pass_stale_reply_entry_removed",
    ICMP_ERROR_TRANSLATED = 20: "icmp_error_translated",
    SOCK_CONNECT_TRANSLATED = 21: "sock_connect_translated",
    SOCK_SENDMSG_TRANSLATED = 22: "sock_sendmsg_translated",
    SOCK_REPLY_ADDRESS_RESTORED = 23: "sock_reply_address_restored",
    SOCK_REFUSED_NO_ENDPOINTS = 24: "sock_refused_no_endpoints",
    SOCK_REFUSED_UNKNOWN_PORT = 25: "sock_refused_unknown_port",
    SOCK_REFUSED_NO_LOCAL_ENDPOINTS = 26: "sock_refused_no_local_endpoints",
    SOCK_REFUSED_BACKEND_MISSING = 27: "sock_refused_backend_missing",
    SOCK_REFUSED_REVERSE_FULL = 28: "sock_refused_reverse_insert_failed",
    SOCK_PASS_NOT_SERVICE = 29: "sock_pass_not_service",
    SOCK_PASS_OTHER_NETNS = 30: "sock_pass_other_netns",
    HAIRPIN_NEW_FLOW = 31: "hairpin_new_flow",
    HAIRPIN_ESTABLISHED = 32: "hairpin_forward_established",
    HAIRPIN_REPLY_TRANSLATED = 33: "hairpin_reply_translated",
}

/// `skb->mark` that asks the program to decide without side effects (no
/// connection-table entry, no counters): `redirector explain` runs it this way
/// under BPF_PROG_TEST_RUN and reads the decision from `cb`.
pub const EXPLAIN_MARK: u32 = 0x7265_6478; // "redx"
/// `cb` slots filled in explain mode.
pub const EXPLAIN_CB_COUNTER: usize = 0;
pub const EXPLAIN_CB_BACKEND: usize = 1;
pub const EXPLAIN_CB_SLOT: usize = 2;
pub const EXPLAIN_CB_SVC: usize = 3;
/// 1 when session affinity chose the backend.
pub const EXPLAIN_CB_AFFINITY: usize = 4;
