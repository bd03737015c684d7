//! The multi-node bed: pods on two nodes, the underlay, and each way of
//! carrying pod traffic between nodes ([`PodNetwork`]); one agent per node.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use common::manifests::{KUBERNETES_SERVICE, web_pod, web_service};
use common::{agent_binary, eventually, tcp_request, udp_request};
use redirector::datapath::{Maps, maps_pin_dir};
use testbed::cluster::{Cluster, PodLink, PodNetwork, pod_address};
use testbed::foreign::ForeignCounter;

const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53);

/// A client pod on node 0 and the only endpoint on node 1.
fn cross_node(tag: &str, network: PodNetwork) -> (Cluster, String) {
    let mut cluster = Cluster::new(tag, 2, network);
    let client = cluster.add_pod(0, "client", pod_address(0, 5));
    let web = cluster.add_pod(1, "web-b", pod_address(1, 10));
    cluster.serve(&web, "web-b", 8080);
    cluster.write_manifest(
        "web.yaml",
        &format!(
            "{}---\n{}",
            web_pod("web-b", pod_address(1, 10), Some(1)),
            web_service("web", *SERVICE.ip())
        ),
    );
    (cluster, client)
}

fn pod_to_service_on_another_node(tag: &str, network: PodNetwork) {
    let (cluster, client) = cross_node(tag, network);
    let mut agents = cluster.start_agents(agent_binary(), &[]);
    // A CNI's program after ours on the client's interface (node 0's only
    // pod interface): it must see every packet ours lets through.
    agents[0].wait_for_log("attached to vp0", 1);
    let foreign = ForeignCounter::attach(&cluster.nodes[0].netns, "vp0");
    let node0 = Maps::from_pins(&maps_pin_dir(cluster.nodes[0].bpffs.path())).expect("node 0's maps");
    let ours_now = || -> u64 { node0.counter_totals().expect("counters").iter().sum() };
    let foreign_now = || {
        let (ingress, egress) = foreign.counts();
        ingress + egress
    };
    // Counted from a quiet moment: packets from before the foreign program
    // was attached are ours alone.
    let (ours_before, foreign_before) = eventually("node 0 quiet", SYNC_TIMEOUT, || {
        let first = (ours_now(), foreign_now());
        std::thread::sleep(Duration::from_millis(200));
        if (ours_now(), foreign_now()) == first {
            Ok(first)
        } else {
            Err("packets still flowing".to_owned())
        }
    });
    // Pod to pod across nodes works without the agents' help.
    eventually(
        &format!("{network:?}: pod to pod across nodes"),
        SYNC_TIMEOUT,
        || tcp_request(&client, SocketAddrV4::new(pod_address(1, 10), 8080)).map_err(|e| e.to_string()),
    );
    let answer = eventually(
        &format!("{network:?}: TCP to the ClusterIP"),
        SYNC_TIMEOUT,
        || tcp_request(&client, SERVICE).map_err(|e| e.to_string()),
    );
    assert_eq!(
        answer.pod, "web-b",
        "{network:?}: the endpoint on node 1 answered"
    );
    assert_eq!(
        *answer.client.ip(),
        pod_address(0, 5),
        "{network:?}: the endpoint saw the client pod's address"
    );
    let answer = eventually(
        &format!("{network:?}: UDP to the ClusterIP"),
        SYNC_TIMEOUT,
        || udp_request(&client, DNS).map_err(|e| e.to_string()),
    );
    assert_eq!(
        answer.pod, "web-b",
        "{network:?}: UDP: the endpoint on node 1 answered"
    );
    assert_eq!(
        *answer.client.ip(),
        pod_address(0, 5),
        "{network:?}: UDP: the client address is kept"
    );

    // Every packet either program of ours saw on node 0 has exactly one
    // counter; none was dropped or redirected here, so the foreign program
    // after ours must have seen as many since it was attached.
    eventually(
        &format!("{network:?}: the foreign program saw every packet"),
        SYNC_TIMEOUT,
        || {
            let (ours, theirs) = (ours_now() - ours_before, foreign_now() - foreign_before);
            if ours > 0 && ours == theirs {
                Ok(())
            } else {
                Err(format!("ours {ours}, foreign {theirs} since it was attached"))
            }
        },
    );

    // kube-proxy's refusals: a port the Service does not define is refused
    // at once; an unallocated address of the service range is dropped, with
    // no ICMP, so the connect times out.
    let undefined = SocketAddrV4::new(*SERVICE.ip(), 81);
    let err = tcp_request(&client, undefined).expect_err("an undefined port must not answer");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{network:?}: an undefined port is refused: {err}"
    );
    let unallocated = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 99), 80);
    let err = tcp_request(&client, unallocated).expect_err("an unallocated address must not answer");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "{network:?}: an unallocated address is dropped: {err}"
    );
}

#[test]
fn routed_pod_reaches_a_service_endpoint_on_another_node() {
    pod_to_service_on_another_node("rt", PodNetwork::Routed);
}

#[test]
fn vxlan_pod_reaches_a_service_endpoint_on_another_node() {
    pod_to_service_on_another_node("vx", PodNetwork::Vxlan);
}

#[test]
fn l3_tunnel_pod_reaches_a_service_endpoint_on_another_node() {
    pod_to_service_on_another_node("l3", PodNetwork::L3Tunnel);
}

const KUBERNETES: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 443);

/// Pods on both nodes reach the API server on node 0's host network through
/// the `kubernetes` Service, with flannel's masquerade rule off and on.
fn kubernetes_service_from_both_nodes(tag: &str, network: PodNetwork) {
    let mut cluster = Cluster::new(tag, 2, network);
    let clients = [
        cluster.add_pod(0, "client-0", pod_address(0, 5)),
        cluster.add_pod(1, "client-1", pod_address(1, 5)),
    ];
    cluster.serve_on_node(0, "apiserver", 6443);
    cluster.write_manifest("kubernetes.yaml", KUBERNETES_SERVICE);
    let _agents = cluster.start_agents(agent_binary(), &[]);
    for masquerade in [false, true] {
        cluster.set_masquerade(masquerade);
        for (node, client) in clients.iter().enumerate() {
            let what =
                format!("{network:?}, masquerade {masquerade}: kubernetes Service from a pod on node {node}");
            let answer = eventually(&what, SYNC_TIMEOUT, || {
                tcp_request(client, KUBERNETES).map_err(|e| e.to_string())
            });
            assert_eq!(
                answer.pod, "apiserver",
                "{what}: the host-network endpoint answered"
            );
            // Node 0's own pod is delivered locally, never masqueraded.
            let seen_as = if masquerade && node == 1 {
                cluster.nodes[1].address
            } else {
                pod_address(node, 5)
            };
            assert_eq!(
                *answer.client.ip(),
                seen_as,
                "{what}: the client address the endpoint saw"
            );
        }
    }
}

#[test]
fn routed_kubernetes_service_reaches_the_host_network_endpoint() {
    kubernetes_service_from_both_nodes("rk", PodNetwork::Routed);
}

#[test]
fn vxlan_kubernetes_service_reaches_the_host_network_endpoint() {
    kubernetes_service_from_both_nodes("vk", PodNetwork::Vxlan);
}

#[test]
fn l3_tunnel_kubernetes_service_reaches_the_host_network_endpoint() {
    kubernetes_service_from_both_nodes("lk", PodNetwork::L3Tunnel);
}

/// Pods plugged by links without Ethernet headers (as netkit in L3 mode,
/// Cilium's netkit datapath, plugs them): the agent attaches the programs'
/// L3 builds. The client and one endpoint on node 0, another
/// endpoint on node 1: a reply is translated leaving the local endpoint
/// (ingress) and entering the client (egress), both without Ethernet.
#[test]
fn pods_on_l3_interfaces_reach_services_both_ways() {
    let mut cluster = Cluster::new("l3p", 2, PodNetwork::Routed);
    let client = cluster.add_pod_with(PodLink::Tun, 0, "client", pod_address(0, 5));
    let web_a = cluster.add_pod_with(PodLink::Tun, 0, "web-a", pod_address(0, 10));
    let web_b = cluster.add_pod_with(PodLink::Tun, 1, "web-b", pod_address(1, 10));
    cluster.serve(&web_a, "web-a", 8080);
    cluster.serve(&web_b, "web-b", 8080);
    cluster.write_manifest(
        "web.yaml",
        &format!(
            "{}---\n{}---\n{}",
            web_pod("web-a", pod_address(0, 10), Some(0)),
            web_pod("web-b", pod_address(1, 10), Some(1)),
            web_service("web", *SERVICE.ip())
        ),
    );
    let mut agents = cluster.start_agents(agent_binary(), &[]);
    agents[0].wait_for_log("attached to vp1", 1);

    let mut answered = std::collections::BTreeSet::new();
    for attempt in 0..40 {
        let answer = eventually("L3 pod links: TCP to the ClusterIP", SYNC_TIMEOUT, || {
            tcp_request(&client, SERVICE).map_err(|e| e.to_string())
        });
        assert_eq!(
            *answer.client.ip(),
            pod_address(0, 5),
            "L3 pod links: attempt {attempt}: the endpoint saw the client pod's address"
        );
        answered.insert(answer.pod);
        if answered.len() == 2 {
            break;
        }
    }
    assert_eq!(
        answered,
        ["web-a", "web-b"].map(str::to_owned).into(),
        "L3 pod links: both endpoints answered within 40 connections"
    );
    let answer = eventually("L3 pod links: UDP to the ClusterIP", SYNC_TIMEOUT, || {
        udp_request(&client, DNS).map_err(|e| e.to_string())
    });
    assert!(
        ["web-a", "web-b"].contains(&answer.pod.as_str()),
        "L3 pod links: UDP answered by an endpoint, not {}",
        answer.pod
    );

    // The refusal is built without an Ethernet header too.
    let undefined = SocketAddrV4::new(*SERVICE.ip(), 81);
    let err = tcp_request(&client, undefined).expect_err("an undefined port must not answer");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "L3 pod links: an undefined port is refused: {err}"
    );
    let unallocated = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 99), 80);
    let err = tcp_request(&client, unallocated).expect_err("an unallocated address must not answer");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "L3 pod links: an unallocated address is dropped: {err}"
    );
}
