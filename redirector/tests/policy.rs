//! kube-proxy's endpoint choice end to end: on the multi-node bed, one agent
//! per node, each told its node's name, on the same manifests (Pods with
//! `spec.nodeName`, Nodes with zone labels); and in Kubernetes mode, an agent
//! following its Node's zone label and the slices' nodeName at run time.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::Duration;

use common::apiserver::FakeApiServer;
use common::manifests::web_pod;
use common::{Fixture, agent_binary, eventually, in_netns, tcp_request};
use redirector::datapath::{Maps, maps_pin_dir};
use redirector_common::counters;
use serde_json::{Value, json};
use testbed::cluster::{Cluster, PodNetwork, pod_address};

const SYNC_TIMEOUT: Duration = Duration::from_secs(10);
const SERVICE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 80);
/// New connections per client: with two endpoints to pick from at random,
/// all of them reaching one by chance has odds of 1 in 2^11.
const TRIES: usize = 12;

fn node_yaml(node: usize, zone: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: Node
metadata:
  name: node-{node}
  labels:
    topology.kubernetes.io/zone: {zone}
"
    )
}

/// The web Service at [`SERVICE`], with `extra` spec lines.
fn service_yaml(extra: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  clusterIP: {}
  {extra}
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
",
        SERVICE.ip()
    )
}

/// A cluster of `nodes` routed nodes with a web endpoint on each node of
/// `web_on` and a client pod on every node; agents run with their node's name.
fn bed(
    tag: &str,
    nodes: usize,
    web_on: &[usize],
    manifests: &str,
) -> (Cluster, Vec<String>, Vec<testbed::Agent>) {
    let mut cluster = Cluster::new(tag, nodes, PodNetwork::Routed);
    let clients = (0..nodes)
        .map(|node| cluster.add_pod(node, &format!("client-{node}"), pod_address(node, 5)))
        .collect();
    let mut pods = String::new();
    for &node in web_on {
        let name = format!("web-{node}");
        let addr = pod_address(node, 10);
        let netns = cluster.add_pod(node, &name, addr);
        cluster.serve(&netns, &name, 8080);
        pods.push_str(&format!("---\n{}", web_pod(&name, addr, Some(node))));
    }
    cluster.write_manifest("web.yaml", &format!("{manifests}{pods}"));
    let agents = (0..nodes)
        .map(|node| {
            let name = format!("node-{node}");
            cluster.start_agent(node, agent_binary(), &["--node-name", &name])
        })
        .collect();
    (cluster, clients, agents)
}

/// The pods that answered [`TRIES`] new connections from `client`.
fn answering(client: &str, what: &str) -> BTreeSet<String> {
    (0..TRIES)
        .map(|_| {
            eventually(what, SYNC_TIMEOUT, || {
                tcp_request(client, SERVICE).map_err(|e| e.to_string())
            })
            .pod
        })
        .collect()
}

fn set(pods: &[&str]) -> BTreeSet<String> {
    pods.iter().map(|p| (*p).to_owned()).collect()
}

/// internalTrafficPolicy: Local. Endpoints on nodes 0 and 1: a client on
/// node 0 reaches only node 0's; a client on node 2, which has none, is
/// dropped (no ICMP: the connect times out), as kube-proxy drops it.
#[test]
fn local_policy_keeps_to_the_clients_node_and_drops_elsewhere() {
    let (cluster, clients, _agents) = bed("itp", 3, &[0, 1], &service_yaml("internalTrafficPolicy: Local"));
    assert_eq!(
        answering(&clients[0], "a client on node 0"),
        set(&["web-0"]),
        "only node 0's endpoint answers node 0's client"
    );
    assert_eq!(
        answering(&clients[1], "a client on node 1"),
        set(&["web-1"]),
        "only node 1's endpoint answers node 1's client"
    );

    let node2 = Maps::from_pins(&maps_pin_dir(cluster.nodes[2].bpffs.path())).expect("node 2's maps");
    let dropped = || node2.counter_totals().expect("counters")[counters::DROP_NO_LOCAL_ENDPOINTS as usize];
    // Once node 2's agent has programmed the Service, its packets are
    // counted as dropped for want of a local endpoint (before, the address
    // is unallocated, which is dropped too, under another counter).
    eventually("node 2 drops for want of a local endpoint", SYNC_TIMEOUT, || {
        let before = dropped();
        let err = match tcp_request(&clients[2], SERVICE) {
            Ok(answer) => panic!("node 2's client must not be answered, {} did", answer.pod),
            Err(err) => err,
        };
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::TimedOut,
            "dropped, not refused: the connect times out: {err}"
        );
        if dropped() > before {
            Ok(())
        } else {
            Err("not counted as drop_no_local_endpoints yet".to_owned())
        }
    });
}

/// trafficDistribution: PreferClose with nodes 0 and 2 in zone-a and node 1
/// in zone-b, endpoints on nodes 0 and 1: each client is answered from its
/// zone, node 2's (without an endpoint of its own) by node 0's.
#[test]
fn zone_hints_keep_traffic_in_the_clients_zone() {
    let manifests = [
        node_yaml(0, "zone-a"),
        node_yaml(1, "zone-b"),
        node_yaml(2, "zone-a"),
        service_yaml("trafficDistribution: PreferClose"),
    ]
    .concat();
    let (_cluster, clients, _agents) = bed("zone", 3, &[0, 1], &manifests);
    for (node, want) in [(0, "web-0"), (1, "web-1"), (2, "web-0")] {
        assert_eq!(
            answering(&clients[node], &format!("a client on node {node}")),
            set(&[want]),
            "node {node}'s client is answered in its zone"
        );
    }
}

/// trafficDistribution: PreferSameNode with endpoints on nodes 0 and 2,
/// nodes 0 and 1 in zone-a and node 2 in zone-b: a node with an endpoint of
/// its own uses it; node 1, without one, falls back to its zone's hints.
#[test]
fn prefer_same_node_keeps_traffic_on_the_node_then_in_the_zone() {
    let manifests = [
        node_yaml(0, "zone-a"),
        node_yaml(1, "zone-a"),
        node_yaml(2, "zone-b"),
        service_yaml("trafficDistribution: PreferSameNode"),
    ]
    .concat();
    let (_cluster, clients, _agents) = bed("psn", 3, &[0, 2], &manifests);
    for (node, want) in [(0, "web-0"), (1, "web-0"), (2, "web-2")] {
        assert_eq!(
            answering(&clients[node], &format!("a client on node {node}")),
            set(&[want]),
            "node {node}'s client is answered on its node, else in its zone"
        );
    }
}

/// The same endpoints without a policy or hints: every node uses both, so
/// the tests above do not pass by accident of the bed.
#[test]
fn without_policy_or_hints_every_node_uses_every_endpoint() {
    let manifests = [node_yaml(0, "zone-a"), node_yaml(1, "zone-b"), service_yaml("")].concat();
    let (_cluster, clients, _agents) = bed("all", 2, &[0, 1], &manifests);
    for (node, client) in clients.iter().enumerate() {
        assert_eq!(
            answering(client, &format!("a client on node {node}")),
            set(&["web-0", "web-1"]),
            "node {node}'s client reaches both endpoints"
        );
    }
}

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);

fn node_object(zone: Option<&str>) -> Value {
    let labels = match zone {
        Some(zone) => json!({"topology.kubernetes.io/zone": zone}),
        None => json!({}),
    };
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "labels": labels}})
}

fn service_object(spec: Value) -> Value {
    let mut object = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "clusterIP": SERVICE.ip().to_string(),
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]
        }
    });
    if let (Some(have), Some(extra)) = (object["spec"].as_object_mut(), spec.as_object()) {
        have.extend(extra.clone());
    }
    object
}

/// The slice of the web Service: pod-a and pod-b on `nodes`, hinted for
/// zone-a and zone-b.
fn slice_object(nodes: [&str; 2]) -> Value {
    let endpoint = |addr: Ipv4Addr, node: &str, zone: &str| {
        json!({
            "addresses": [addr.to_string()],
            "conditions": {"ready": true},
            "nodeName": node,
            "zone": zone,
            "hints": {"forZones": [{"name": zone}]}
        })
    };
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [endpoint(POD_A, nodes[0], "zone-a"), endpoint(POD_B, nodes[1], "zone-b")]
    })
}

/// Kubernetes mode, one node (node-1) with a client and two endpoints the
/// slices place on nodes and zones: the agent follows its Node's zone label
/// as it changes, and the Local policy as the slice moves endpoints.
#[test]
fn kubernetes_mode_follows_the_nodes_zone_and_the_endpoints_nodes() {
    let mut fx = Fixture::new("pol-k8s");
    let client = fx.add_host("client", Ipv4Addr::new(10, 244, 0, 5));
    for (name, addr) in [("pod-a", POD_A), ("pod-b", POD_B)] {
        let netns = fx.add_host(name, addr);
        fx.serve(&netns, name, 8080);
    }
    let listener = in_netns(&fx.node, || {
        TcpListener::bind("127.0.0.1:0").expect("bind API server")
    });
    let api = FakeApiServer::start(listener);
    api.apply(node_object(Some("zone-a")));
    api.apply(service_object(json!({})));
    api.apply(slice_object(["node-1", "node-2"]));
    let mut agent = fx.start_agent_watching(agent_binary(), &api.url(), &["--node-name", "node-1"]);
    agent.wait_for_log("initial lists complete", 1);
    let answered_by = |want: &[&str], what: &str| {
        eventually(what, SYNC_TIMEOUT, || {
            let seen: BTreeSet<String> = (0..TRIES)
                .map(|_| tcp_request(&client, SERVICE).map(|a| a.pod))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            if seen == set(want) {
                Ok(())
            } else {
                Err(format!("answered by {seen:?}"))
            }
        })
    };
    answered_by(&["pod-a"], "zone-a: the endpoint hinted for zone-a");
    api.apply(node_object(Some("zone-b")));
    answered_by(
        &["pod-b"],
        "the Node moved to zone-b: the endpoint hinted for zone-b",
    );
    api.apply(node_object(None));
    answered_by(
        &["pod-a", "pod-b"],
        "the Node lost its zone label: every endpoint",
    );

    api.apply(service_object(json!({"internalTrafficPolicy": "Local"})));
    answered_by(&["pod-a"], "internalTrafficPolicy: Local: the endpoint on node-1");
    api.apply(slice_object(["node-2", "node-3"]));
    let maps = Maps::from_pins(&maps_pin_dir(fx.bpffs.path())).expect("the node's maps");
    let dropped = || maps.counter_totals().expect("counters")[counters::DROP_NO_LOCAL_ENDPOINTS as usize];
    eventually("no endpoint left on node-1: dropped", SYNC_TIMEOUT, || {
        let before = dropped();
        match tcp_request(&client, SERVICE) {
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut && dropped() > before => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}
