//! Connect-time translation on the multi-node bed: processes in node 0's
//! own network namespace (the host network), run in a test cgroup of their
//! own to which node 0's agent attaches its socket programs.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::Duration;

use common::manifests::{KUBERNETES_SERVICE, web_pod, web_service};
use common::{Agent, agent_binary, eventually, tcp_request};
use redirector::datapath::{Maps, links_pin_dir, maps_pin_dir};
use redirector_common::counters;
use testbed::cgroup::{ClientResult, Request, TestCgroup};
use testbed::cluster::{Cluster, PodNetwork, pod_address};

const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
const WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 53);
const EMPTY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 80);
const KUBERNETES: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 1), 443);
const ECONNREFUSED: i32 = 111;
const ENETUNREACH: i32 = 101;

/// A Service whose selector matches no pod.
const EMPTY_SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: empty
  namespace: default
spec:
  clusterIP: 10.96.0.20
  selector:
    app: nothing
  ports:
  - port: 80
    targetPort: 8080
";

/// Two nodes, an endpoint of web on each, the API server on node 0's host
/// network, a client pod on node 0, and the test cgroup. Node 1's agent
/// does no socket translation. Returns the client pod's netns too.
fn bed(tag: &str) -> (Cluster, TestCgroup, String) {
    let mut cluster = Cluster::new(tag, 2, PodNetwork::Routed);
    let client = cluster.add_pod(0, "client", pod_address(0, 5));
    let web_a = cluster.add_pod(0, "web-a", pod_address(0, 10));
    let web_b = cluster.add_pod(1, "web-b", pod_address(1, 10));
    cluster.serve(&web_a, "web-a", 8080);
    cluster.serve(&web_b, "web-b", 8080);
    cluster.serve_on_node(0, "apiserver", 6443);
    cluster.write_manifest(
        "web.yaml",
        &[
            web_pod("web-a", pod_address(0, 10), Some(0)),
            web_pod("web-b", pod_address(1, 10), Some(1)),
            // web (TCP 80, UDP 53 → 8080), one without endpoints, and
            // default/kubernetes on node 0's host network (192.0.2.11:6443).
            web_service("web", *WEB.ip()),
            EMPTY_SERVICE.to_owned(),
            KUBERNETES_SERVICE.to_owned(),
        ]
        .join("---\n"),
    );
    (cluster, TestCgroup::new(tag), client)
}

fn start_agents(cluster: &Cluster, cgroup: &TestCgroup, socket_lb: &str) -> Vec<Agent> {
    let root = cgroup.path().to_str().expect("UTF-8 temp dir");
    let mut node0 = cluster.start_agent(
        0,
        agent_binary(),
        &["--socket-lb", socket_lb, "--cgroup-root", root],
    );
    node0.wait_for_log("synced 4 service ports", 1);
    let mut node1 = cluster.start_agent(1, agent_binary(), &[]);
    node1.wait_for_log("synced 4 service ports", 1);
    vec![node0, node1]
}

fn counter(bpffs: &Path, index: u32) -> u64 {
    let maps = Maps::from_pins(&maps_pin_dir(bpffs)).expect("node 0's maps");
    maps.counter_totals().expect("counters")[index as usize]
}

fn answered(result: &ClientResult, what: &str) -> (String, SocketAddrV4) {
    match &result.outcome {
        Ok((answer, peer)) => (answer.pod.clone(), *peer),
        Err(errno) => panic!("{what}: failed with errno {errno}: {}", result.line),
    }
}

#[test]
fn host_processes_reach_services_through_their_sockets() {
    let (cluster, cgroup, client) = bed("sh");
    let mut agents = start_agents(&cluster, &cgroup, "host");
    agents[0].wait_for_log("connect-time translation (Host sockets) attached to cgroup", 1);
    let node0 = cluster.nodes[0].netns.clone();
    let bpffs = cluster.nodes[0].bpffs.path().to_owned();

    // TCP reaches the endpoints on both nodes; the socket shows the service.
    let mut pods = BTreeSet::new();
    for attempt in 0..40 {
        let result = cgroup.request(&node0, Request::Tcp, WEB);
        let (pod, peer) = answered(&result, &format!("TCP to {WEB}, attempt {attempt}"));
        assert_eq!(peer, WEB, "getpeername shows the ClusterIP: {}", result.line);
        pods.insert(pod);
        if pods.len() == 2 {
            break;
        }
    }
    assert_eq!(
        pods,
        ["web-a", "web-b"].map(str::to_owned).into(),
        "the endpoints on node 0 and node 1 answered within 40 connections"
    );

    let result = cgroup.request(&node0, Request::UdpConnected, DNS);
    let (pod, peer) = answered(&result, "connected UDP");
    assert!(
        pod.starts_with("web-"),
        "connected UDP answered by an endpoint: {}",
        result.line
    );
    assert_eq!(peer, DNS, "connected UDP: getpeername shows the ClusterIP");

    let result = cgroup.request(&node0, Request::UdpSendto, DNS);
    let (pod, from) = answered(&result, "unconnected UDP");
    assert!(
        pod.starts_with("web-"),
        "unconnected UDP answered by an endpoint: {}",
        result.line
    );
    assert_eq!(
        from, DNS,
        "recvfrom shows the reply coming from the ClusterIP:port"
    );

    // A host-network endpoint on the client's own node.
    let result = cgroup.request(&node0, Request::Tcp, KUBERNETES);
    let (pod, peer) = answered(&result, "the kubernetes Service");
    assert_eq!(pod, "apiserver", "the host-network endpoint answered");
    assert_eq!(peer, KUBERNETES, "getpeername shows the kubernetes ClusterIP");

    // No endpoints: refused by connect itself, no packet sent.
    let refused_before = counter(&bpffs, counters::SOCK_REFUSED_NO_ENDPOINTS);
    let result = cgroup.request(&node0, Request::Tcp, EMPTY);
    assert_eq!(
        result.outcome.as_ref().map(|_| ()),
        Err(&ECONNREFUSED),
        "a Service without endpoints is refused: {}",
        result.line
    );
    assert!(
        result.elapsed < Duration::from_millis(500),
        "refused at once, not after a timeout: {:?}",
        result.elapsed
    );
    assert_eq!(
        counter(&bpffs, counters::SOCK_REFUSED_NO_ENDPOINTS),
        refused_before + 1,
        "the refusal is counted"
    );

    for (index, what) in [
        (counters::SOCK_CONNECT_TRANSLATED, "connects translated"),
        (counters::SOCK_SENDMSG_TRANSLATED, "sendmsg translated"),
        (
            counters::SOCK_REPLY_ADDRESS_RESTORED,
            "addresses shown as the service",
        ),
    ] {
        assert!(counter(&bpffs, index) > 0, "node 0 counted {what}");
    }

    // Only the test cgroup is served: the same namespace outside it is not
    // translated (and the node has no route to the service range).
    let err = tcp_request(&node0, WEB).expect_err("outside the test cgroup nothing is translated");
    assert_eq!(
        err.raw_os_error(),
        Some(ENETUNREACH),
        "a process outside the cgroup is not translated: {err}"
    );

    // A pod's socket in the cgroup is in another network namespace: with
    // `host`, the socket programs leave it and the TC path translates it.
    let (other_before, tc_before) = (
        counter(&bpffs, counters::SOCK_PASS_OTHER_NETNS),
        counter(&bpffs, counters::FORWARD_NEW_FLOW),
    );
    let result = eventually("TCP from a client pod in the cgroup", SYNC_TIMEOUT, || {
        let result = cgroup.request(&client, Request::Tcp, WEB);
        match &result.outcome {
            Ok(_) => Ok(result),
            Err(_) => Err(result.line),
        }
    });
    let (pod, peer) = answered(&result, "TCP from a client pod");
    assert!(
        pod.starts_with("web-"),
        "the pod reached an endpoint: {}",
        result.line
    );
    assert_eq!(peer, WEB, "the pod's socket shows the ClusterIP");
    assert!(
        counter(&bpffs, counters::SOCK_PASS_OTHER_NETNS) > other_before,
        "the socket programs left the pod's connect alone"
    );
    assert!(
        counter(&bpffs, counters::FORWARD_NEW_FLOW) > tc_before,
        "the TC path translated the pod's flow"
    );
}

#[test]
fn socket_lb_off_translates_no_socket() {
    let (cluster, cgroup, _client) = bed("so");
    let mut agents = start_agents(&cluster, &cgroup, "off");
    agents[0].wait_for_log("connect-time translation is off", 1);
    let node0 = cluster.nodes[0].netns.clone();
    let result = cgroup.request(&node0, Request::Tcp, WEB);
    assert_eq!(
        result.outcome.as_ref().map(|_| ()),
        Err(&ENETUNREACH),
        "with --socket-lb off the ClusterIP is left as it is (and unroutable here): {}",
        result.line
    );
    let links = std::fs::read_dir(links_pin_dir(cluster.nodes[0].bpffs.path()))
        .expect("node 0's links")
        .map(|entry| {
            entry
                .expect("link pin")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.starts_with("cgroup:"))
        .collect::<Vec<_>>();
    assert!(links.is_empty(), "no socket program is attached: {links:?}");
    let bpffs = cluster.nodes[0].bpffs.path();
    assert_eq!(
        counter(bpffs, counters::SOCK_CONNECT_TRANSLATED),
        0,
        "no connect was translated"
    );
}

/// The socket programs outlive the agent as the TC programs do: connects
/// are translated while it is down and after it restarts (its links replace
/// the old ones), and `redirector cleanup` detaches them.
#[test]
fn socket_translation_outlives_the_agent_until_cleanup() {
    let (cluster, cgroup, _client) = bed("sr");
    let mut agents = start_agents(&cluster, &cgroup, "host");
    let node0 = cluster.nodes[0].netns.clone();
    let bpffs = cluster.nodes[0].bpffs.path().to_owned();
    let reaches_web = |what: &str| {
        let result = cgroup.request(&node0, Request::Tcp, WEB);
        let (pod, peer) = answered(&result, what);
        assert!(
            pod.starts_with("web-"),
            "{what}: an endpoint answered: {}",
            result.line
        );
        assert_eq!(peer, WEB, "{what}: getpeername shows the ClusterIP");
    };
    reaches_web("agent running");

    assert!(agents.remove(0).stop(), "node 0's agent exits cleanly");
    reaches_web("agent stopped");

    let mut restarted = cluster.start_agent(
        0,
        agent_binary(),
        &[
            "--socket-lb",
            "host",
            "--cgroup-root",
            cgroup.path().to_str().expect("UTF-8 temp dir"),
        ],
    );
    restarted.wait_for_log("connect-time translation (Host sockets) attached", 1);
    let (translated_before, passed_before) = (
        counter(&bpffs, counters::SOCK_CONNECT_TRANSLATED),
        counter(&bpffs, counters::SOCK_PASS_NOT_SERVICE),
    );
    reaches_web("agent restarted");
    // Two programs on the hook would show as one translation and one pass
    // (the second sees the endpoint): the old link must have been replaced.
    assert_eq!(
        (
            counter(&bpffs, counters::SOCK_CONNECT_TRANSLATED),
            counter(&bpffs, counters::SOCK_PASS_NOT_SERVICE)
        ),
        (translated_before + 1, passed_before),
        "after the restart exactly one program runs per connect"
    );
    assert!(restarted.stop(), "the restarted agent exits cleanly");

    let cleanup = std::process::Command::new("ip")
        .args(["netns", "exec", &node0])
        .arg(agent_binary())
        .arg("cleanup")
        .arg("--bpffs")
        .arg(&bpffs)
        .output()
        .expect("running redirector cleanup");
    assert!(
        cleanup.status.success(),
        "redirector cleanup: {}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    let result = cgroup.request(&node0, Request::Tcp, WEB);
    assert_eq!(
        result.outcome.as_ref().map(|_| ()),
        Err(&ENETUNREACH),
        "after cleanup nothing is translated: {}",
        result.line
    );
}

/// The per-packet path's counters on node 0: new flows and packets of
/// established ones, translated by the TC programs.
fn per_packet(bpffs: &Path) -> (u64, u64, u64) {
    (
        counter(bpffs, counters::FORWARD_NEW_FLOW),
        counter(bpffs, counters::FORWARD_ESTABLISHED),
        counter(bpffs, counters::REPLY_TRANSLATED),
    )
}

fn socket_translations(bpffs: &Path) -> u64 {
    counter(bpffs, counters::SOCK_CONNECT_TRANSLATED) + counter(bpffs, counters::SOCK_SENDMSG_TRANSLATED)
}

/// `--socket-lb all`: a pod's sockets are translated at connect time, so
/// its flows carry the endpoint's address from the first packet and the
/// TC programs have nothing to translate.
#[test]
fn with_all_pods_reach_services_through_their_sockets() {
    let (cluster, cgroup, client) = bed("sa");
    let mut agents = start_agents(&cluster, &cgroup, "all");
    agents[0].wait_for_log("connect-time translation (All sockets) attached to cgroup", 1);
    let bpffs = cluster.nodes[0].bpffs.path().to_owned();
    let (per_packet_before, translated_before) = (per_packet(&bpffs), socket_translations(&bpffs));

    let mut pods = BTreeSet::new();
    let requests = [
        (Request::Tcp, WEB),
        (Request::UdpConnected, DNS),
        (Request::UdpSendto, DNS),
    ];
    const ROUNDS: usize = 20;
    for attempt in 0..ROUNDS {
        for (request, to) in requests {
            let result = cgroup.request(&client, request, to);
            let (pod, peer) = answered(
                &result,
                &format!("{request:?} to {to} from a pod, attempt {attempt}"),
            );
            assert_eq!(peer, to, "{request:?}: the pod's socket shows the service");
            pods.insert(pod);
        }
    }
    assert_eq!(
        pods,
        ["web-a", "web-b"].map(str::to_owned).into(),
        "the endpoints on node 0 and node 1 answered"
    );
    // The host network is served too.
    let node0 = cluster.nodes[0].netns.clone();
    let result = cgroup.request(&node0, Request::Tcp, KUBERNETES);
    assert_eq!(
        answered(&result, "the kubernetes Service from the node").0,
        "apiserver"
    );

    assert_eq!(
        per_packet(&bpffs),
        per_packet_before,
        "no flow took the per-packet path (forward_new_flow, forward_established, reply_translated)"
    );
    assert_eq!(
        socket_translations(&bpffs) - translated_before,
        (ROUNDS * requests.len() + 1) as u64,
        "every connect and sendto was translated by the socket programs"
    );
}

/// With `--socket-lb all`, a pod's open connection through a Service
/// survives an agent restart, and new ones work while the agent is down.
#[test]
fn with_all_open_connections_survive_a_restart_and_new_ones_work_without_the_agent() {
    let (cluster, cgroup, client) = bed("sw");
    let mut agents = start_agents(&cluster, &cgroup, "all");
    let bpffs = cluster.nodes[0].bpffs.path().to_owned();
    let root = cgroup.path().to_str().expect("UTF-8 temp dir").to_owned();
    let per_packet_before = per_packet(&bpffs);

    let mut held = cgroup.hold(&client, WEB);
    let (first, peer) = answered(&held.ask(), "the held connection, agent running");
    assert_eq!(peer, WEB, "the held connection shows the service");
    let still_answers = |held: &mut testbed::cgroup::HeldConnection, when: &str| {
        let result = held.ask();
        let (pod, peer) = answered(&result, &format!("the held connection, {when}"));
        assert_eq!(
            pod, first,
            "{when}: the same endpoint answers on the open connection"
        );
        assert_eq!(peer, WEB, "{when}: the socket still shows the service");
    };
    let new_ones_work = |when: &str| {
        for (request, to) in [(Request::Tcp, WEB), (Request::UdpSendto, DNS)] {
            let result = cgroup.request(&client, request, to);
            let (pod, peer) = answered(&result, &format!("a new {request:?} request, {when}"));
            assert!(
                pod.starts_with("web-"),
                "{when}: an endpoint answered: {}",
                result.line
            );
            assert_eq!(peer, to, "{when}: {request:?} shows the service");
        }
    };

    assert!(agents.remove(0).stop(), "node 0's agent exits cleanly");
    still_answers(&mut held, "agent stopped");
    new_ones_work("agent stopped");

    let mut restarted =
        cluster.start_agent(0, agent_binary(), &["--socket-lb", "all", "--cgroup-root", &root]);
    restarted.wait_for_log("connect-time translation (All sockets) attached", 1);
    restarted.wait_for_log("synced 4 service ports", 1);
    still_answers(&mut held, "agent restarted");
    new_ones_work("agent restarted");
    assert_eq!(
        per_packet(&bpffs),
        per_packet_before,
        "the pod's flows never took the per-packet path"
    );
}
