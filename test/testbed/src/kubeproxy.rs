//! kube-proxy's rulesets, generated for the benchmark peers: the
//! `iptables-restore` input of kube-proxy's iptables mode and the `nft -f`
//! transaction of its nftables mode, for a list of ClusterIP service ports
//! (TCP, cluster traffic policy, no session affinity), in the exact layout
//! of `pkg/proxy/iptables/proxier.go` and `pkg/proxy/nftables/proxier.go`
//! (chain names, rule order and matches, comments, the "large cluster" mode
//! that drops per-endpoint comments above 1000 endpoints).
//!
//! Pure text generation: nothing here runs a command. The lanes load the text
//! inside their own node network namespace.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use redirector::model::{Endpoint, Frontend, Ipv4Cidr, ServicePort, ServicePortName};

/// kube-proxy's default masquerade mark (`--iptables-masquerade-bit 14`).
pub const MASQUERADE_MARK: &str = "0x4000";
/// Above this many endpoints in total, kube-proxy's iptables mode leaves the
/// per-endpoint comments out (`largeClusterEndpointsThreshold`).
pub const LARGE_CLUSTER_ENDPOINTS: usize = 1000;

/// What kube-proxy knows about the node besides the services.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// `--cluster-cidr`: traffic to a ClusterIP from outside it is masqueraded.
    pub cluster_cidr: Ipv4Cidr,
    /// The service CIDR (nftables mode drops traffic to its unallocated addresses).
    pub service_cidr: Ipv4Cidr,
    /// The node's addresses that accept NodePort traffic (nftables `nodeport-ips`).
    pub node_ips: Vec<Ipv4Addr>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            cluster_cidr: "10.0.0.0/8".parse().expect("valid CIDR"),
            service_cidr: "10.96.0.0/12".parse().expect("valid CIDR"),
            node_ips: vec![Ipv4Addr::new(192, 0, 2, 1)],
        }
    }
}

/// One service port in the order kube-proxy happens to write it (its map
/// iteration order, effectively random): the order of `KUBE-SERVICES`.
pub type ServiceList = [(Frontend, ServicePort)];

// ---------------------------------------------------------------------------
// Chain names

/// `KUBE-SVC-` + base32(sha256("ns/name:port" + "tcp"))[:16].
pub fn iptables_service_chain(name: &ServicePortName, protocol: &str) -> String {
    format!("KUBE-SVC-{}", port_proto_hash(&format!("{name}{protocol}")))
}

/// `KUBE-SEP-` + base32(sha256("ns/name:port" + "tcp" + "ip:port"))[:16].
pub fn iptables_endpoint_chain(name: &ServicePortName, protocol: &str, endpoint: &Endpoint) -> String {
    format!(
        "KUBE-SEP-{}",
        port_proto_hash(&format!("{name}{protocol}{endpoint}"))
    )
}

fn port_proto_hash(input: &str) -> String {
    base32(&sha256(input.as_bytes()))[..16].to_owned()
}

/// nftables' `HASH8-ns/name/proto/port` (`servicePortChainNameBase`).
pub fn nft_service_chain_base(name: &ServicePortName, protocol: &str) -> String {
    hash_and_truncate(&format!(
        "{}/{}/{protocol}/{}",
        name.namespace, name.name, name.port
    ))
}

/// nftables' `HASH8-ns/name/proto/port__ip/port` (`servicePortEndpointChainNameBase`).
pub fn nft_endpoint_chain_base(name: &ServicePortName, protocol: &str, endpoint: &Endpoint) -> String {
    hash_and_truncate(&format!(
        "{}/{}/{protocol}/{}__{}/{}",
        name.namespace, name.name, name.port, endpoint.addr, endpoint.port
    ))
}

/// `knftables.NameLengthMax` (256) minus the longest chain prefix (16).
const NFT_CHAIN_BASE_MAX: usize = 256 - 16;

fn hash_and_truncate(name: &str) -> String {
    let mut out = format!("{}-{name}", &base32(&sha256(name.as_bytes()))[..8]);
    if out.len() > NFT_CHAIN_BASE_MAX {
        out.truncate(NFT_CHAIN_BASE_MAX - 3);
        out.push_str("...");
    }
    out
}

// ---------------------------------------------------------------------------
// iptables mode

/// kube-proxy's full-sync `iptables-restore` input (filter and nat tables),
/// plus the jumps from the built-in chains that kube-proxy installs with
/// `iptables -I` at startup, so a fresh network namespace gets everything with
/// one `iptables-restore` (without `--noflush`).
pub fn iptables_restore(services: &ServiceList, node: &NodeConfig) -> String {
    let mut out = String::new();
    out.push_str(&iptables_filter_table(true));
    out.push_str(&iptables_nat_table(services, node, None, &[], true));
    out
}

/// The rules kube-proxy writes in the nat table, for counting: every `-A KUBE-…` line.
pub fn nat_rule_count(restore: &str) -> usize {
    let Some(start) = restore.find("*nat\n") else {
        return 0;
    };
    restore[start..]
        .lines()
        .take_while(|l| *l != "COMMIT")
        .filter(|l| l.starts_with("-A KUBE-"))
        .count()
}

/// The formula kube-proxy's nat table follows for S service ports with E
/// endpoints each (ClusterIP only): 5 + S·(2 + 3E).
pub fn expected_nat_rules(services: usize, endpoints_per_service: usize) -> usize {
    5 + services * (2 + 3 * endpoints_per_service)
}

/// A partial sync as kube-proxy (MinimizeIPTablesRestore) writes it for
/// `iptables-restore --noflush`: the top-level chains in full, and only the
/// chains of the service ports at `changed` (indexes into `services`);
/// `removed_endpoint_chains` are deleted (`-X`), as kube-proxy does for
/// endpoints that went away.
pub fn iptables_partial_restore(
    services: &ServiceList,
    node: &NodeConfig,
    changed: &[usize],
    removed_endpoint_chains: &[String],
) -> String {
    let mut out = iptables_filter_table(false);
    let changed: BTreeSet<usize> = changed.iter().copied().collect();
    out.push_str(&iptables_nat_table(
        services,
        node,
        Some(&changed),
        removed_endpoint_chains,
        false,
    ));
    out
}

fn iptables_filter_table(with_jumps: bool) -> String {
    let mut out = String::from("*filter\n");
    for chain in [
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FIREWALL",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    if with_jumps {
        // iptables.go ensureRules: the jumps from the built-in chains.
        out.push_str(concat!(
            "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
            "-A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n",
            "-A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
            "-A INPUT -j KUBE-FIREWALL\n",
            "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
            "-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
            "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
            "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
            "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
            "-A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
            "-A OUTPUT -j KUBE-FIREWALL\n",
        ));
    }
    out.push_str(concat!(
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        "COMMIT\n",
    ));
    out
}

/// The nat table; `only` limits the per-service chains written and `removed`
/// chains are deleted (a partial sync).
fn iptables_nat_table(
    services: &ServiceList,
    node: &NodeConfig,
    only: Option<&BTreeSet<usize>>,
    removed: &[String],
    with_jumps: bool,
) -> String {
    let total_endpoints: usize = services.iter().map(|(_, sp)| sp.endpoints.len()).sum();
    let large_cluster = total_endpoints > LARGE_CLUSTER_ENDPOINTS;
    let mut chains = String::from("*nat\n");
    for chain in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(chains, ":{chain} - [0:0]");
    }
    let mut rules = String::new();
    if with_jumps {
        rules.push_str(concat!(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
            "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
            "-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
        ));
    }
    let _ = writeln!(
        rules,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQUERADE_MARK}/{MASQUERADE_MARK} -j RETURN"
    );
    let _ = writeln!(rules, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQUERADE_MARK}");
    rules.push_str(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    let _ = writeln!(rules, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQUERADE_MARK}");

    for (index, (fe, sp)) in services.iter().enumerate() {
        let protocol = fe.protocol.to_string();
        let name = sp.name.to_string();
        let svc_chain = iptables_service_chain(&sp.name, &protocol);
        if sp.endpoints.is_empty() {
            // Filter-table REJECT rules; not generated for the benchmark.
            continue;
        }
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {protocol} -p {protocol} -d {} --dport {} -j {svc_chain}",
            fe.addr, fe.port
        );
        if only.is_some_and(|o| !o.contains(&index)) {
            continue;
        }
        let _ = writeln!(chains, ":{svc_chain} - [0:0]");
        let _ = writeln!(
            rules,
            "-A {svc_chain} -m comment --comment \"{name} cluster IP\" -m {protocol} -p {protocol} -d {} --dport {} ! -s {} -j KUBE-MARK-MASQ",
            fe.addr, fe.port, node.cluster_cidr
        );
        let n = sp.endpoints.len();
        for (i, ep) in sp.endpoints.iter().enumerate() {
            let sep = iptables_endpoint_chain(&sp.name, &protocol, ep);
            let _ = write!(rules, "-A {svc_chain}");
            if !large_cluster {
                let _ = write!(rules, " -m comment --comment \"{name} -> {ep}\"");
            }
            if i < n - 1 {
                let _ = write!(
                    rules,
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                );
            }
            let _ = writeln!(rules, " -j {sep}");
        }
        for ep in &sp.endpoints {
            let sep = iptables_endpoint_chain(&sp.name, &protocol, ep);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let comment = if large_cluster {
                String::new()
            } else {
                format!(" -m comment --comment {name}")
            };
            let _ = writeln!(rules, "-A {sep}{comment} -s {} -j KUBE-MARK-MASQ", ep.addr);
            let _ = writeln!(
                rules,
                "-A {sep}{comment} -m {protocol} -p {protocol} -j DNAT --to-destination {ep}"
            );
        }
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    for chain in removed {
        let _ = writeln!(chains, ":{chain} - [0:0]");
        let _ = writeln!(rules, "-X {chain}");
    }
    chains.push_str(&rules);
    chains.push_str("COMMIT\n");
    chains
}

// ---------------------------------------------------------------------------
// nftables mode

/// kube-proxy's full nftables transaction (`nft -f`), table `ip kube-proxy`.
/// Every chain is declared before a rule or map element refers to it.
pub fn nft_script(services: &ServiceList, node: &NodeConfig) -> String {
    let mut out = nft_base(node);
    let mut cluster_ips = BTreeSet::new();
    for (fe, sp) in services {
        nft_service(&mut out, fe, sp, node);
        if cluster_ips.insert(fe.addr) {
            let _ = writeln!(out, "add element ip kube-proxy cluster-ips {{ {} }}", fe.addr);
        }
        nft_service_element(&mut out, fe, sp);
    }
    out
}

/// A partial nftables sync for one service port: its chains are (re)created
/// and flushed, its endpoint chains written, stale endpoint chains deleted,
/// and its map element added when `new` (kube-proxy's partial transaction).
pub fn nft_partial(
    fe: &Frontend,
    sp: &ServicePort,
    node: &NodeConfig,
    new: bool,
    removed_endpoints: &[Endpoint],
) -> String {
    let mut out = String::new();
    nft_service(&mut out, fe, sp, node);
    let protocol = fe.protocol.to_string();
    for ep in removed_endpoints {
        let _ = writeln!(
            out,
            "delete chain ip kube-proxy endpoint-{}",
            nft_endpoint_chain_base(&sp.name, &protocol, ep)
        );
    }
    if new {
        let _ = writeln!(out, "add element ip kube-proxy cluster-ips {{ {} }}", fe.addr);
        nft_service_element(&mut out, fe, sp);
    }
    out
}

fn nft_base(node: &NodeConfig) -> String {
    let mut out = String::from("add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n");
    out.push_str(concat!(
        "add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }\n",
        "add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }\n",
        "add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }\n",
        "add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }\n",
        "add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }\n",
        "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n",
        "add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }\n",
        "add chain ip kube-proxy cluster-ips-check\n",
        "add chain ip kube-proxy filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }\n",
        "add chain ip kube-proxy filter-output-pre-dnat { type filter hook output priority -110 ; }\n",
        "add chain ip kube-proxy filter-forward { type filter hook forward priority 0 ; }\n",
        "add chain ip kube-proxy filter-input { type filter hook input priority 0 ; }\n",
        "add chain ip kube-proxy filter-output { type filter hook output priority 0 ; }\n",
        "add chain ip kube-proxy firewall-check\n",
        "add chain ip kube-proxy mark-for-masquerade\n",
        "add chain ip kube-proxy masquerading\n",
        "add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n",
        "add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n",
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n",
        "add chain ip kube-proxy nodeport-endpoints-check\n",
        "add chain ip kube-proxy reject-chain { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }\n",
        "add chain ip kube-proxy services\n",
        "add chain ip kube-proxy service-endpoints-check\n",
        "add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n",
    ));
    let _ = writeln!(
        out,
        "add rule ip kube-proxy cluster-ips-check ip daddr {{ {} }} drop comment \"Drop traffic to unallocated ClusterIPs\"",
        node.service_cidr
    );
    out.push_str(concat!(
        "add rule ip kube-proxy filter-prerouting-pre-dnat ct state new jump firewall-check\n",
        "add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check\n",
        "add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check\n",
        "add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check\n",
        "add rule ip kube-proxy filter-input ct state new jump service-endpoints-check\n",
        "add rule ip kube-proxy filter-output ct state new jump service-endpoints-check\n",
        "add rule ip kube-proxy filter-output-pre-dnat ct state new jump firewall-check\n",
        "add rule ip kube-proxy filter-output ct state new jump cluster-ips-check\n",
        "add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n",
    ));
    let _ = writeln!(
        out,
        "add rule ip kube-proxy mark-for-masquerade mark set mark or {MASQUERADE_MARK}"
    );
    let _ = writeln!(
        out,
        "add rule ip kube-proxy masquerading mark and {MASQUERADE_MARK} == 0 return"
    );
    let _ = writeln!(
        out,
        "add rule ip kube-proxy masquerading mark set mark xor {MASQUERADE_MARK}"
    );
    out.push_str(concat!(
        "add rule ip kube-proxy masquerading masquerade fully-random\n",
        "add rule ip kube-proxy nat-output jump services\n",
        "add rule ip kube-proxy nat-postrouting jump masquerading\n",
        "add rule ip kube-proxy nat-prerouting jump services\n",
        "add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports\n",
        "add rule ip kube-proxy reject-chain reject\n",
        "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n",
        "add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n",
    ));
    for ip in &node.node_ips {
        let _ = writeln!(out, "add element ip kube-proxy nodeport-ips {{ {ip} }}");
    }
    out.push_str(
        "add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n",
    );
    out
}

/// A service port's endpoint chains, then its service chain (created and
/// flushed, so the same text serves a full and a partial sync).
fn nft_service(out: &mut String, fe: &Frontend, sp: &ServicePort, node: &NodeConfig) {
    if sp.endpoints.is_empty() {
        return;
    }
    let protocol = fe.protocol.to_string();
    let mut targets = Vec::new();
    for ep in &sp.endpoints {
        let chain = format!("endpoint-{}", nft_endpoint_chain_base(&sp.name, &protocol, ep));
        let _ = writeln!(out, "add chain ip kube-proxy {chain}");
        let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {chain} ip saddr {} jump mark-for-masquerade",
            ep.addr
        );
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {chain} meta l4proto {protocol} dnat to {ep}"
        );
        targets.push(chain);
    }
    let chain = format!("service-{}", nft_service_chain_base(&sp.name, &protocol));
    let _ = writeln!(out, "add chain ip kube-proxy {chain}");
    let _ = writeln!(out, "flush chain ip kube-proxy {chain}");
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} ip daddr {} ip saddr != {} jump mark-for-masquerade",
        fe.addr, node.cluster_cidr
    );
    let vmap: Vec<String> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{i} : goto {t}"))
        .collect();
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {chain} numgen random mod {} vmap {{ {} }}",
        targets.len(),
        vmap.join(" , ")
    );
}

fn nft_service_element(out: &mut String, fe: &Frontend, sp: &ServicePort) {
    if sp.endpoints.is_empty() {
        return;
    }
    let protocol = fe.protocol.to_string();
    let _ = writeln!(
        out,
        "add element ip kube-proxy service-ips {{ {} . {protocol} . {} : goto service-{} }}",
        fe.addr,
        fe.port,
        nft_service_chain_base(&sp.name, &protocol)
    );
}

// ---------------------------------------------------------------------------
// SHA-256 (FIPS 180-4) and base32 (RFC 4648, standard alphabet), as Go's
// crypto/sha256 and encoding/base32.StdEncoding compute them.

const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
    ];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (state, v) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *state = state.wrapping_add(v);
        }
    }
    let mut out = [0u8; 32];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

pub fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    for chunk in data.chunks(5) {
        let mut buf = [0u8; 5];
        buf[..chunk.len()].copy_from_slice(chunk);
        let bits = buf.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let symbols = (chunk.len() * 8).div_ceil(5);
        for i in 0..8 {
            if i < symbols {
                out.push(ALPHABET[((bits >> (35 - 5 * i)) & 31) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use redirector::model::Protocol;

    fn spn(ns: &str, name: &str, port: &str) -> ServicePortName {
        ServicePortName {
            namespace: ns.into(),
            name: name.into(),
            port: port.into(),
        }
    }

    fn ep(addr: &str, port: u16) -> Endpoint {
        Endpoint {
            addr: addr.parse().unwrap(),
            port,
        }
    }

    /// `count` services `ns/svc-i:http` at 10.96.0.(i+1):80 with `eps` endpoints each.
    fn services(count: usize, eps: usize) -> Vec<(Frontend, ServicePort)> {
        (0..count)
            .map(|i| {
                let fe = Frontend {
                    addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32),
                    port: 80,
                    protocol: Protocol::Tcp,
                };
                let sp = ServicePort {
                    no_endpoints: Default::default(),
                    affinity: None,
                    name: spn("bench", &format!("svc-{i}"), "http"),
                    endpoints: (0..eps)
                        .map(|j| Endpoint {
                            addr: Ipv4Addr::from(
                                u32::from(Ipv4Addr::new(10, 128, 0, 1)) + (i * eps + j) as u32,
                            ),
                            port: 8080,
                        })
                        .collect(),
                    also_serving: Vec::new(),
                    info: Default::default(),
                };
                (fe, sp)
            })
            .collect()
    }

    #[test]
    fn sha256_and_base32_match_the_standard_vectors() {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256 of the empty string"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            "sha256(abc)"
        );
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
            "sha256 of a two-block message"
        );
        for (input, expected) in [
            ("", ""),
            ("f", "MY======"),
            ("fo", "MZXQ===="),
            ("foo", "MZXW6==="),
            ("foob", "MZXW6YQ="),
            ("fooba", "MZXW6YTB"),
            ("foobar", "MZXW6YTBOI======"),
        ] {
            assert_eq!(
                base32(input.as_bytes()),
                expected,
                "base32({input:?}) (RFC 4648 vectors)"
            );
        }
    }

    #[test]
    fn chain_names_match_kube_proxy_golden_rulesets() {
        // From kube-proxy's proxier_test.go (iptables and nftables modes).
        let svc1 = spn("ns1", "svc1", "p80");
        let svc4 = spn("ns4", "svc4", "p80");
        let cases = [
            (
                "iptables service chain of ns1/svc1:p80",
                iptables_service_chain(&svc1, "tcp"),
                "KUBE-SVC-XPGD46QRK7WJZT7O",
            ),
            (
                "iptables endpoint chain of ns1/svc1:p80 -> 10.180.0.1:80",
                iptables_endpoint_chain(&svc1, "tcp", &ep("10.180.0.1", 80)),
                "KUBE-SEP-SXIVWICOYRO3J4NJ",
            ),
            (
                "iptables service chain of ns4/svc4:p80",
                iptables_service_chain(&svc4, "tcp"),
                "KUBE-SVC-4SW47YFZTEDKD3PK",
            ),
            (
                "iptables endpoint chain of ns4/svc4:p80 -> 10.180.0.4:80",
                iptables_endpoint_chain(&svc4, "tcp", &ep("10.180.0.4", 80)),
                "KUBE-SEP-UKSFD7AGPMPPLUHC",
            ),
            (
                "iptables endpoint chain of ns4/svc4:p80 -> 10.180.0.5:80",
                iptables_endpoint_chain(&svc4, "tcp", &ep("10.180.0.5", 80)),
                "KUBE-SEP-C6EBXVWJJZMIWKLZ",
            ),
            (
                "nftables service chain base of ns1/svc1:p80",
                nft_service_chain_base(&svc1, "tcp"),
                "ULMVA6XW-ns1/svc1/tcp/p80",
            ),
            (
                "nftables endpoint chain base of ns1/svc1:p80 -> 10.180.0.1:80",
                nft_endpoint_chain_base(&svc1, "tcp", &ep("10.180.0.1", 80)),
                "5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80",
            ),
            (
                "nftables endpoint chain base of ns4/svc4:p80 -> 10.180.0.4:80",
                nft_endpoint_chain_base(&svc4, "tcp", &ep("10.180.0.4", 80)),
                "UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80",
            ),
        ];
        for (what, got, expected) in cases {
            assert_eq!(got, expected, "{what}");
        }
    }

    #[test]
    fn nat_rule_count_follows_kube_proxys_formula() {
        // (services, endpoints each): small and "large cluster" (> 1000 endpoints) modes.
        for (s, e) in [(1, 1), (1, 2), (3, 2), (20, 2), (10, 10), (600, 2), (1000, 3)] {
            let restore = iptables_restore(&services(s, e), &NodeConfig::default());
            assert_eq!(
                nat_rule_count(&restore),
                expected_nat_rules(s, e),
                "{s} services x {e} endpoints: nat rules = 5 + S(2 + 3E)"
            );
        }
    }

    #[test]
    fn iptables_golden_snippets() {
        let fe = Frontend {
            addr: "172.30.0.44".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let sp = ServicePort {
            no_endpoints: Default::default(),
            affinity: None,
            name: spn("ns4", "svc4", "p80"),
            endpoints: vec![ep("10.180.0.4", 80), ep("10.180.0.5", 80)],
            also_serving: Vec::new(),
            info: Default::default(),
        };
        let restore = iptables_restore(&[(fe, sp)], &NodeConfig::default());
        for line in [
            "-A KUBE-SERVICES -m comment --comment \"ns4/svc4:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK",
            "-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment \"ns4/svc4:p80 cluster IP\" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
            "-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment \"ns4/svc4:p80 -> 10.180.0.4:80\" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC",
            "-A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment \"ns4/svc4:p80 -> 10.180.0.5:80\" -j KUBE-SEP-C6EBXVWJJZMIWKLZ",
            "-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ",
            "-A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80",
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
            ":KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]",
        ] {
            assert!(
                restore.lines().any(|l| l == line),
                "missing golden line {line:?} in:\n{restore}"
            );
        }
        let nat = &restore[restore.find("*nat").expect("nat table")..];
        assert!(
            nat.trim_end()
                .lines()
                .rev()
                .nth(1)
                .is_some_and(|l| l.contains("KUBE-NODEPORTS")),
            "the nodeports rule is the last of KUBE-SERVICES (and of the table):\n{nat}"
        );
        // Three endpoints: probabilities 1/3, 1/2, then none.
        let sp3 = ServicePort {
            no_endpoints: Default::default(),
            affinity: None,
            name: spn("ns", "three", "p"),
            endpoints: vec![ep("10.1.0.1", 80), ep("10.1.0.2", 80), ep("10.1.0.3", 80)],
            also_serving: Vec::new(),
            info: Default::default(),
        };
        let restore = iptables_restore(&[(fe, sp3)], &NodeConfig::default());
        assert!(
            restore.contains("--probability 0.3333333333 -j KUBE-SEP-"),
            "1/3 formatted as %0.10f:\n{restore}"
        );
        assert!(
            restore.contains("--probability 0.5000000000 -j KUBE-SEP-"),
            "then 1/2:\n{restore}"
        );
    }

    #[test]
    fn large_clusters_drop_the_endpoint_comments() {
        let restore = iptables_restore(&services(600, 2), &NodeConfig::default());
        let svc = iptables_service_chain(&spn("bench", "svc-0", "http"), "tcp");
        let sep = iptables_endpoint_chain(&spn("bench", "svc-0", "http"), "tcp", &ep("10.128.0.1", 8080));
        for line in [
            format!("-A {svc} -m statistic --mode random --probability 0.5000000000 -j {sep}"),
            format!("-A {sep} -s 10.128.0.1 -j KUBE-MARK-MASQ"),
            format!("-A {sep} -m tcp -p tcp -j DNAT --to-destination 10.128.0.1:8080"),
        ] {
            assert!(
                restore.lines().any(|l| l == line),
                "1200 endpoints is a large cluster: expected {line:?}"
            );
        }
    }

    #[test]
    fn nft_golden_snippets() {
        let fe = Frontend {
            addr: "172.30.0.44".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
        };
        let sp = ServicePort {
            no_endpoints: Default::default(),
            affinity: None,
            name: spn("ns4", "svc4", "p80"),
            endpoints: vec![ep("10.180.0.4", 80), ep("10.180.0.5", 80)],
            also_serving: Vec::new(),
            info: Default::default(),
        };
        let script = nft_script(&[(fe, sp)], &NodeConfig::default());
        for line in [
            "add table ip kube-proxy { comment \"rules for kube-proxy\" ; }",
            "add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }",
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
            "add rule ip kube-proxy nat-prerouting jump services",
            "add rule ip kube-proxy masquerading masquerade fully-random",
            "add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 ip daddr 172.30.0.44 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
            "add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 , 1 : goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 }",
            "add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 ip saddr 10.180.0.5 jump mark-for-masquerade",
            "add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 meta l4proto tcp dnat to 10.180.0.5:80",
            "add element ip kube-proxy cluster-ips { 172.30.0.44 }",
            "add element ip kube-proxy service-ips { 172.30.0.44 . tcp . 80 : goto service-LAUZTJTB-ns4/svc4/tcp/p80 }",
        ] {
            assert!(
                script.lines().any(|l| l == line),
                "missing golden line {line:?} in:\n{script}"
            );
        }
        // Every chain is declared before anything refers to it.
        let position = |needle: &str| {
            script
                .find(needle)
                .unwrap_or_else(|| panic!("{needle} in script"))
        };
        assert!(
            position("add chain ip kube-proxy endpoint-UNZV3OEC") < position("numgen random mod 2 vmap")
                && position("add chain ip kube-proxy service-LAUZTJTB")
                    < position("service-ips { 172.30.0.44"),
            "endpoint chains precede the vmap, the service chain precedes its element:\n{script}"
        );
    }

    #[test]
    fn partial_syncs_write_only_the_changed_service() {
        let list = services(5, 2);
        let node = NodeConfig::default();
        let partial = iptables_partial_restore(&list, &node, &[3], &["KUBE-SEP-GONE".into()]);
        let svc3 = iptables_service_chain(&list[3].1.name, "tcp");
        let svc2 = iptables_service_chain(&list[2].1.name, "tcp");
        assert_eq!(
            partial
                .lines()
                .filter(|l| l.starts_with("-A KUBE-SERVICES"))
                .count(),
            6,
            "KUBE-SERVICES is written in full (5 services + nodeports):\n{partial}"
        );
        assert!(
            partial.contains(&format!(":{svc3} - [0:0]")),
            "the changed service's chain is rewritten"
        );
        assert!(
            !partial.contains(&format!(":{svc2} - [0:0]")),
            "an unchanged service's chain is left alone"
        );
        let declared = partial.find(":KUBE-SEP-GONE").expect("stale chain declared");
        let deleted = partial.find("-X KUBE-SEP-GONE").expect("stale chain deleted");
        assert!(declared < deleted, "declared, then deleted");
        let nft = nft_partial(&list[1].0, &list[1].1, &node, true, &[]);
        assert!(
            nft.contains("add element ip kube-proxy service-ips { 10.96.0.2 . tcp . 80 : goto service-"),
            "a new service gets its map element:\n{nft}"
        );
    }
}
