//! Hairpin on the multi-node bed: a pod that reaches a Service and is
//! chosen as its endpoint. On the TC path its requests come to it from the
//! hairpin address (169.254.42.1) and its replies go back to it from the
//! service; on the socket path (`--socket-lb all`) its socket is connected
//! to its own address and the kernel delivers locally.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Agent, agent_binary, eventually, tcp_request, udp_request_from};
use redirector::datapath::{Maps, maps_pin_dir};
use redirector_common::counters;
use testbed::cgroup::{Request, TestCgroup};
use testbed::cluster::{Cluster, PodLink, PodNetwork, pod_address};

const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// A Service whose one endpoint is `web-a`.
const SOLO: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 30), 80);
const SOLO_UDP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 30), 53);
/// A Service with `web-a` (node 0) and `web-b` (node 1).
const WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const WEB_UDP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53);
const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
const ATTEMPTS: usize = 50;

fn pod_yaml(name: &str, addr: Ipv4Addr, node: usize, solo: bool) -> String {
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels:
    app: web
    solo: \"{solo}\"
spec:
  nodeName: node-{node}
status:
  phase: Running
  podIP: {addr}
  conditions:
  - type: Ready
    status: \"True\"
---
"
    )
}

fn service_yaml(name: &str, ip: Ipv4Addr, selector: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  clusterIP: {ip}
  selector:
    {selector}
  ports:
  - name: http
    port: 80
    targetPort: 8080
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 8080
---
"
    )
}

/// Two nodes; `web-a` on node 0 (joined by `link`), the one endpoint of
/// solo and one of web's two; `web-b` on node 1. Returns web-a's netns.
fn bed(tag: &str, link: PodLink) -> (Cluster, String) {
    let mut cluster = Cluster::new(tag, 2, PodNetwork::Routed);
    let web_a = cluster.add_pod_with(link, 0, "web-a", pod_address(0, 10));
    let web_b = cluster.add_pod(1, "web-b", pod_address(1, 10));
    cluster.serve(&web_a, "web-a", 8080);
    cluster.serve(&web_b, "web-b", 8080);
    cluster.write_manifest(
        "web.yaml",
        &format!(
            "{}{}{}{}",
            pod_yaml("web-a", pod_address(0, 10), 0, true),
            pod_yaml("web-b", pod_address(1, 10), 1, false),
            service_yaml("solo", *SOLO.ip(), "solo: \"true\""),
            service_yaml("web", *WEB.ip(), "app: web"),
        ),
    );
    (cluster, web_a)
}

fn wait_synced(agents: &mut [Agent]) {
    for agent in agents {
        agent.wait_for_log("synced 4 service ports", 1);
    }
}

fn counter(bpffs: &Path, index: u32) -> u64 {
    let maps = Maps::from_pins(&maps_pin_dir(bpffs)).expect("node 0's maps");
    maps.counter_totals().expect("counters")[index as usize]
}

/// Strict reverse-path filtering on node 0: the hairpin packets (from
/// 169.254.42.1, or from the service address) must not depend on the
/// node's routing accepting them.
fn strict_rp_filter(cluster: &Cluster) {
    let out = Command::new("ip")
        .args(["netns", "exec", &cluster.nodes[0].netns])
        .args(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"])
        .output()
        .expect("running sysctl");
    assert!(
        out.status.success(),
        "setting rp_filter on node 0: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Client ports of the UDP requests, below the ephemeral range and apart
/// per service: hairpin flows from one client port to two services sharing
/// the pod would share a reply tuple (the pod's port and the hairpin
/// address's), and the second is dropped as a clash while the first lives,
/// as nf_conntrack drops it without masquerade's port remapping.
const SOLO_UDP_PORTS: u16 = 20_000;
const WEB_UDP_PORTS: u16 = 21_000;

fn reaches_itself_on_the_tc_path(tag: &str, link: PodLink) {
    let (cluster, web_a) = bed(tag, link);
    strict_rp_filter(&cluster);
    let mut agents = cluster.start_agents(agent_binary(), &[]);
    wait_synced(&mut agents);
    let bpffs = cluster.nodes[0].bpffs.path().to_owned();
    // The first request may race the interface attach: once one succeeds,
    // every one must.
    eventually(
        &format!("{link:?}: the first hairpin request"),
        SYNC_TIMEOUT,
        || tcp_request(&web_a, SOLO).map_err(|e| e.to_string()),
    );
    let new_flows_before = counter(&bpffs, counters::HAIRPIN_NEW_FLOW);

    for attempt in 0..ATTEMPTS {
        let answer = tcp_request(&web_a, SOLO)
            .unwrap_or_else(|e| panic!("{link:?}: TCP to solo from its own pod, attempt {attempt}: {e}"));
        assert_eq!(answer.pod, "web-a", "{link:?}: the only endpoint answered");
        assert_eq!(
            *answer.client.ip(),
            HAIRPIN,
            "{link:?}: the pod saw its own connection come from the hairpin address"
        );
        let answer = udp_request_from(&web_a, SOLO_UDP_PORTS + attempt as u16, SOLO_UDP)
            .unwrap_or_else(|e| panic!("{link:?}: UDP to solo from its own pod, attempt {attempt}: {e}"));
        assert_eq!(answer.pod, "web-a", "{link:?}: UDP: the only endpoint answered");
        assert_eq!(
            *answer.client.ip(),
            HAIRPIN,
            "{link:?}: UDP: from the hairpin address"
        );
    }
    // Every request is a new flow: TCP's closed predecessors' tuples wait
    // in TIME_WAIT, and each UDP request has a client port of its own.
    assert_eq!(
        counter(&bpffs, counters::HAIRPIN_NEW_FLOW) - new_flows_before,
        2 * ATTEMPTS as u64,
        "{link:?}: every connection was a hairpin flow"
    );
    assert!(
        counter(&bpffs, counters::HAIRPIN_REPLY_TRANSLATED) >= 2 * ATTEMPTS as u64,
        "{link:?}: the replies were translated back"
    );

    // Two endpoints: whichever is chosen, the connection works; the other
    // pod sees the client's own address.
    let mut answered = std::collections::BTreeSet::new();
    for attempt in 0..ATTEMPTS {
        for (what, answer) in [
            ("TCP", tcp_request(&web_a, WEB)),
            (
                "UDP",
                udp_request_from(&web_a, WEB_UDP_PORTS + attempt as u16, WEB_UDP),
            ),
        ] {
            let answer = answer
                .unwrap_or_else(|e| panic!("{link:?}: {what} to web from web-a, attempt {attempt}: {e}"));
            let expected_client = match answer.pod.as_str() {
                "web-a" => HAIRPIN,
                "web-b" => pod_address(0, 10),
                other => panic!("{link:?}: {what}: unexpected answer from {other}"),
            };
            assert_eq!(
                *answer.client.ip(),
                expected_client,
                "{link:?}: {what}: the client address {} saw",
                answer.pod
            );
            answered.insert(answer.pod);
        }
    }
    assert_eq!(
        answered.len(),
        2,
        "{link:?}: both endpoints were chosen in {ATTEMPTS} tries"
    );
}

#[test]
fn a_pod_reaches_itself_through_its_service_over_a_veth() {
    reaches_itself_on_the_tc_path("hv", PodLink::Veth);
}

#[test]
fn a_pod_reaches_itself_through_its_service_without_an_ethernet_header() {
    reaches_itself_on_the_tc_path("ht", PodLink::Tun);
}

/// `--socket-lb all`: the pod's connect is translated to its own address
/// and the kernel delivers it locally, with no hairpin address and no
/// per-packet work.
#[test]
fn a_pod_reaches_itself_through_its_socket() {
    let (cluster, web_a) = bed("hs", PodLink::Veth);
    let cgroup = TestCgroup::new("hs");
    let root = cgroup.path().to_str().expect("UTF-8 temp dir");
    let mut agents = vec![
        cluster.start_agent(0, agent_binary(), &["--socket-lb", "all", "--cgroup-root", root]),
        cluster.start_agent(1, agent_binary(), &[]),
    ];
    wait_synced(&mut agents);
    agents[0].wait_for_log("connect-time translation (All sockets) attached to cgroup", 1);
    let bpffs = cluster.nodes[0].bpffs.path().to_owned();
    let per_packet = || {
        (
            counter(&bpffs, counters::FORWARD_NEW_FLOW),
            counter(&bpffs, counters::HAIRPIN_NEW_FLOW),
        )
    };
    let per_packet_before = per_packet();
    let translated_before = counter(&bpffs, counters::SOCK_CONNECT_TRANSLATED)
        + counter(&bpffs, counters::SOCK_SENDMSG_TRANSLATED);

    let mut answered = std::collections::BTreeSet::new();
    for attempt in 0..ATTEMPTS {
        for (request, to) in [
            (Request::Tcp, SOLO),
            (Request::UdpConnected, SOLO_UDP),
            (Request::UdpSendto, SOLO_UDP),
            (Request::Tcp, WEB),
            (Request::UdpSendto, WEB_UDP),
        ] {
            let result = cgroup.request(&web_a, request, to);
            let what = format!("{request:?} to {to} from web-a, attempt {attempt}");
            let (answer, peer) = match &result.outcome {
                Ok(ok) => ok,
                Err(errno) => panic!("{what}: errno {errno}: {}", result.line),
            };
            assert_eq!(peer, &to, "{what}: the socket shows the service");
            if to == SOLO || to == SOLO_UDP {
                assert_eq!(answer.pod, "web-a", "{what}: the only endpoint answered");
            }
            assert_eq!(
                *answer.client.ip(),
                pod_address(0, 10),
                "{what}: {} saw the pod's own address",
                answer.pod
            );
            answered.insert(answer.pod.clone());
        }
    }
    assert_eq!(answered.len(), 2, "both endpoints of web were chosen");
    assert_eq!(
        per_packet(),
        per_packet_before,
        "no flow took the per-packet path (forward_new_flow, hairpin_new_flow)"
    );
    let translated = counter(&bpffs, counters::SOCK_CONNECT_TRANSLATED)
        + counter(&bpffs, counters::SOCK_SENDMSG_TRANSLATED);
    assert_eq!(
        translated - translated_before,
        5 * ATTEMPTS as u64,
        "every connect and sendto was translated by the socket programs"
    );
}
