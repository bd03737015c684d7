//! The Kubernetes source end to end: an in-process API server speaking the
//! list/watch protocol inside the node netns, the agent watching it, and real
//! packets through the datapath.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::{Duration, Instant};

use common::apiserver::FakeApiServer;
use common::{Agent, Fixture, agent_binary, eventually, in_netns, tcp_request};
use serde_json::{Value, json};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const SVC: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SVC2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// Hosts (not Services) at addresses of the ranges the ServiceCIDR tests use.
const HOST_96: Ipv4Addr = Ipv4Addr::new(10, 96, 200, 1);
const HOST_100: Ipv4Addr = Ipv4Addr::new(10, 100, 200, 1);
const HOST_101: Ipv4Addr = Ipv4Addr::new(10, 101, 200, 1);
const SYNC_TIMEOUT: Duration = Duration::from_secs(15);

/// A node with a client and two pods serving 8080 and 8443, and an API server
/// listening on the node's loopback.
struct Cluster {
    fx: Fixture,
    client: String,
    api: FakeApiServer,
    api_addr: std::net::SocketAddr,
}

impl Cluster {
    /// With the ServiceCIDR a kube-apiserver creates from its
    /// `--service-cluster-ip-range` (here 10.96.0.0/12).
    fn new(tag: &str) -> Self {
        let cluster = Self::without_service_cidrs(tag);
        cluster.api.apply(service_cidr("kubernetes", &["10.96.0.0/12"]));
        cluster
    }

    fn without_service_cidrs(tag: &str) -> Self {
        let mut fx = Fixture::new(tag);
        let client = fx.add_host("client", CLIENT);
        for (name, addr) in [("pod-a", POD_A), ("pod-b", POD_B)] {
            let netns = fx.add_host(name, addr);
            fx.serve(&netns, name, 8080);
            fx.serve(&netns, name, 8443);
        }
        let listener = in_netns(&fx.node, || {
            TcpListener::bind("127.0.0.1:0").expect("bind API server")
        });
        let api_addr = listener.local_addr().unwrap();
        let api = FakeApiServer::start(listener);
        Self {
            fx,
            client,
            api,
            api_addr,
        }
    }

    fn start_agent(&self, extra: &[&str]) -> Agent {
        let mut agent = self
            .fx
            .start_agent_watching(agent_binary(), &self.api.url(), extra);
        agent.wait_for_log("initial lists complete", 1);
        agent
    }

    fn pods_answering(&self, to: SocketAddrV4, expected: &[&str]) {
        eventually(
            &format!("{to} answered by exactly {expected:?}"),
            SYNC_TIMEOUT,
            || {
                let mut seen = std::collections::BTreeSet::new();
                for _ in 0..30 {
                    let answer = tcp_request(&self.client, to).map_err(|e| format!("{to}: {e}"))?;
                    assert_eq!(*answer.client.ip(), CLIENT, "the pod sees the client's address");
                    seen.insert(answer.pod);
                    if seen.len() == expected.len() && expected.iter().all(|p| seen.contains(*p)) {
                        break;
                    }
                }
                let want: std::collections::BTreeSet<String> =
                    expected.iter().map(|s| s.to_string()).collect();
                if seen == want {
                    Ok(())
                } else {
                    Err(format!("answered by {seen:?}"))
                }
            },
        );
    }

    /// An address of the service range that no Service of ours holds is
    /// dropped, as kube-proxy drops it: the connect times out.
    fn dropped(&self, to: SocketAddrV4) {
        eventually(&format!("{to} dropped"), SYNC_TIMEOUT, || {
            match tcp_request(&self.client, to) {
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
    }

    /// Adds a host (not a Service) at `addr` that answers on port 80 with
    /// `name`.
    fn add_host(&mut self, name: &str, addr: Ipv4Addr) {
        let netns = self.fx.add_host(name, addr);
        self.fx.serve(&netns, name, 80);
    }

    fn refused(&self, to: SocketAddrV4) {
        eventually(&format!("{to} refused"), SYNC_TIMEOUT, || {
            match tcp_request(&self.client, to) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
    }
}

fn service_cidr(name: &str, cidrs: &[&str]) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "ServiceCIDR",
        "metadata": {"name": name},
        "spec": {"cidrs": cidrs}
    })
}

fn service(name: &str, ip: Ipv4Addr, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip.to_string(),
            "clusterIPs": [ip.to_string()],
            "ipFamilies": ["IPv4"],
            "selector": {"app": name},
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                {"name": "https", "port": 443, "protocol": "TCP", "targetPort": 8443}
            ]
        },
        "status": {"loadBalancer": {}}
    })
}

/// An endpoint as the EndpointSlice controller writes it.
fn endpoint(ip: Ipv4Addr, ready: bool, serving: bool, terminating: bool) -> Value {
    json!({
        "addresses": [ip.to_string()],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "nodeName": "node-1"
    })
}

fn slice(name: &str, service: &str, ports: &[(&str, u16)], endpoints: Vec<Value>) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {
                "kubernetes.io/service-name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            }
        },
        "addressType": "IPv4",
        "ports": ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"})).collect::<Vec<_>>(),
        "endpoints": endpoints
    })
}

fn both_ports(endpoints: Vec<Value>) -> Value {
    slice("web-abc12", "web", &[("http", 8080), ("https", 8443)], endpoints)
}

fn http(ip: Ipv4Addr) -> SocketAddrV4 {
    SocketAddrV4::new(ip, 80)
}

#[test]
fn services_and_slices_program_the_datapath_and_follow_scaling() {
    let cluster = Cluster::new("k8sscale");
    cluster.api.apply(service("web", SVC, json!({})));
    cluster.api.apply(both_ports(vec![
        endpoint(POD_A, true, true, false),
        endpoint(POD_B, true, true, false),
    ]));
    let _agent = cluster.start_agent(&[]);
    cluster.pods_answering(http(SVC), &["pod-a", "pod-b"]);
    cluster.pods_answering(SocketAddrV4::new(SVC, 443), &["pod-a", "pod-b"]);

    cluster
        .api
        .apply(both_ports(vec![endpoint(POD_A, true, true, false)]));
    cluster.pods_answering(http(SVC), &["pod-a"]);
    cluster.api.apply(both_ports(vec![
        endpoint(POD_A, true, true, false),
        endpoint(POD_B, true, true, false),
    ]));
    cluster.pods_answering(http(SVC), &["pod-a", "pod-b"]);
    cluster.api.apply(both_ports(vec![]));
    cluster.refused(http(SVC));
}

#[test]
fn an_endpoint_moves_from_ready_to_terminating_to_gone() {
    let cluster = Cluster::new("k8sterm");
    cluster.api.apply(service("web", SVC, json!({})));
    cluster.api.apply(both_ports(vec![
        endpoint(POD_A, true, true, false),
        endpoint(POD_B, true, true, false),
    ]));
    let _agent = cluster.start_agent(&[]);
    cluster.pods_answering(http(SVC), &["pod-a", "pod-b"]);

    // pod-b terminating but still serving: not used while pod-a is ready.
    cluster.api.apply(both_ports(vec![
        endpoint(POD_A, true, true, false),
        endpoint(POD_B, false, true, true),
    ]));
    cluster.pods_answering(http(SVC), &["pod-a"]);
    // pod-a not ready and not serving; pod-b terminating and serving: with no
    // ready endpoint left, the serving-terminating one takes traffic.
    cluster.api.apply(both_ports(vec![
        endpoint(POD_A, false, false, false),
        endpoint(POD_B, false, true, true),
    ]));
    cluster.pods_answering(http(SVC), &["pod-b"]);
    // pod-b gone, pod-a unready and not serving: nothing to use.
    cluster
        .api
        .apply(both_ports(vec![endpoint(POD_A, false, false, false)]));
    cluster.refused(http(SVC));
}

#[test]
fn ports_split_across_two_slices_are_matched_by_name() {
    let cluster = Cluster::new("k8ssplit");
    cluster.api.apply(service("web", SVC, json!({})));
    cluster.api.apply(slice(
        "web-http",
        "web",
        &[("http", 8080)],
        vec![endpoint(POD_A, true, true, false)],
    ));
    cluster.api.apply(slice(
        "web-https",
        "web",
        &[("https", 8443)],
        vec![endpoint(POD_B, true, true, false)],
    ));
    let _agent = cluster.start_agent(&[]);
    cluster.pods_answering(http(SVC), &["pod-a"]);
    cluster.pods_answering(SocketAddrV4::new(SVC, 443), &["pod-b"]);
}

#[test]
fn proxy_name_and_headless_labels_program_and_withdraw_a_service() {
    let cluster = Cluster::new("k8slabel");
    cluster.api.apply(service(
        "web",
        SVC,
        json!({"service.kubernetes.io/service-proxy-name": "other"}),
    ));
    cluster
        .api
        .apply(both_ports(vec![endpoint(POD_A, true, true, false)]));
    let _agent = cluster.start_agent(&[]);
    // Another proxy's service: not ours, so its (unused) address is dropped.
    cluster.dropped(http(SVC));
    cluster.api.apply(service("web", SVC, json!({})));
    cluster.pods_answering(http(SVC), &["pod-a"]);
    cluster
        .api
        .apply(service("web", SVC, json!({"service.kubernetes.io/headless": ""})));
    cluster.dropped(http(SVC));
    cluster.api.apply(service("web", SVC, json!({})));
    cluster.pods_answering(http(SVC), &["pod-a"]);
}

#[test]
fn a_proxy_name_selects_only_its_services() {
    let cluster = Cluster::new("k8sname");
    cluster.api.apply(service(
        "web",
        SVC,
        json!({"service.kubernetes.io/service-proxy-name": "redirector"}),
    ));
    // The EndpointSlice controller copies the Service's labels onto its slices.
    let mut labelled = both_ports(vec![endpoint(POD_A, true, true, false)]);
    labelled["metadata"]["labels"]["service.kubernetes.io/service-proxy-name"] = json!("redirector");
    cluster.api.apply(labelled);
    let _agent = cluster.start_agent(&["--service-proxy-name", "redirector"]);
    cluster.pods_answering(http(SVC), &["pod-a"]);
    cluster.api.apply(service("web", SVC, json!({})));
    cluster.dropped(http(SVC));
}

#[test]
fn traffic_keeps_flowing_while_the_api_server_is_down() {
    let mut cluster = Cluster::new("k8sdown");
    cluster.api.apply(service("web", SVC, json!({})));
    cluster.api.apply(both_ports(vec![
        endpoint(POD_A, true, true, false),
        endpoint(POD_B, true, true, false),
    ]));
    let mut agent = cluster.start_agent(&[]);
    cluster.pods_answering(http(SVC), &["pod-a", "pod-b"]);

    let api = std::mem::replace(
        &mut cluster.api,
        FakeApiServer::start(placeholder_listener(&cluster.fx.node)),
    );
    let state = api.stop();
    agent.wait_for_log("retrying with backoff", 1);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let answer =
            tcp_request(&cluster.client, http(SVC)).expect("service answers while the API server is down");
        assert!(
            ["pod-a", "pod-b"].contains(&answer.pod.as_str()),
            "a current endpoint answered: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        agent.log().contains("retrying with backoff"),
        "the agent says it is retrying"
    );

    // Back, with a change made meanwhile.
    let addr = cluster.api_addr;
    let listener = in_netns(&cluster.fx.node, move || {
        TcpListener::bind(addr).expect("rebind API server")
    });
    cluster.api = FakeApiServer::start_with_state(listener, state);
    cluster
        .api
        .apply(both_ports(vec![endpoint(POD_B, true, true, false)]));
    cluster.pods_answering(http(SVC), &["pod-b"]);
}

/// A listener nobody uses, to hold the place of a stopped API server.
fn placeholder_listener(node: &str) -> TcpListener {
    in_netns(node, || {
        TcpListener::bind("127.0.0.1:0").expect("bind placeholder")
    })
}

#[test]
fn a_forced_relist_removes_a_service_deleted_meanwhile() {
    let mut cluster = Cluster::new("k8s410");
    cluster.api.apply(service("web", SVC, json!({})));
    cluster
        .api
        .apply(both_ports(vec![endpoint(POD_A, true, true, false)]));
    let mut other = service("other", SVC2, json!({}));
    other["spec"]["selector"] = json!({"app": "other"});
    cluster.api.apply(other);
    cluster.api.apply(slice(
        "other-1",
        "other",
        &[("http", 8080)],
        vec![endpoint(POD_B, true, true, false)],
    ));
    let mut agent = cluster.start_agent(&[]);
    cluster.pods_answering(http(SVC), &["pod-a"]);
    cluster.pods_answering(http(SVC2), &["pod-b"]);

    // The API server goes away; while the agent backs off, a service is
    // deleted and history compacted, so the watch it resumes gets 410 Expired
    // and it must relist to learn of the deletion.
    let syncs = agent.syncs();
    let addr = cluster.api_addr;
    let node = cluster.fx.node.clone();
    let placeholder = FakeApiServer::start(placeholder_listener(&node));
    let mut state = std::mem::replace(&mut cluster.api, placeholder).stop();
    agent.wait_for_log("retrying with backoff", 1);
    assert!(
        state.delete("Service", "default", "other"),
        "service deleted while the agent cannot watch"
    );
    assert!(
        state.delete("EndpointSlice", "default", "other-1"),
        "its slice too"
    );
    state.compact();
    let listener = in_netns(&node, move || TcpListener::bind(addr).expect("rebind API server"));
    cluster.api = FakeApiServer::start_with_state(listener, state);
    cluster.dropped(http(SVC2));
    cluster.pods_answering(http(SVC), &["pod-a"]);
    agent.wait_for_log("synced ", syncs + 1);
    assert!(
        cluster.api.expired_count() >= 1,
        "the resumed watch was answered 410 Expired"
    );
    let log = agent.log();
    let after_relist: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("synced "))
        .skip(syncs)
        .collect();
    assert!(!after_relist.is_empty(), "the agent synced after the relist");
    for line in &after_relist {
        assert!(
            !line.contains("10.96.0.10:"),
            "the relist rewrote nothing of the unchanged service: {line}\n{log}"
        );
    }
    assert!(
        after_relist.iter().any(|l| l.contains("10.96.0.20:80/tcp")),
        "the deleted service was removed: {after_relist:?}"
    );
}

#[test]
fn service_cidr_objects_give_the_ranges_and_follow_their_changes() {
    let mut cluster = Cluster::without_service_cidrs("k8scidr");
    for (name, addr) in [
        ("host-96", HOST_96),
        ("host-100", HOST_100),
        ("host-101", HOST_101),
    ] {
        cluster.add_host(name, addr);
    }
    let svc = Ipv4Addr::new(10, 100, 0, 10);
    cluster
        .api
        .apply(service_cidr("primary", &["10.100.0.0/16", "fd00:10:100::/112"]));
    cluster.api.apply(service("web", svc, json!({})));
    cluster
        .api
        .apply(both_ports(vec![endpoint(POD_A, true, true, false)]));
    let mut agent = cluster.start_agent(&[]);
    agent.wait_for_log("service ranges: 10.100.0.0/16 (from the ServiceCIDR objects)", 1);
    cluster.pods_answering(http(svc), &["pod-a"]);
    // An unallocated address of the range is dropped; one of the old
    // default range (10.96.0.0/12) is an ordinary address now.
    cluster.dropped(http(HOST_100));
    cluster.pods_answering(http(HOST_96), &["host-96"]);
    cluster.pods_answering(http(HOST_101), &["host-101"]);

    // A range added at run time.
    cluster.api.apply(service_cidr("secondary", &["10.101.0.0/16"]));
    cluster.dropped(http(HOST_101));
    cluster.dropped(http(HOST_100));
    cluster.pods_answering(http(svc), &["pod-a"]);

    // Both objects deleted: nothing is dropped by range any more.
    assert!(
        cluster.api.delete("ServiceCIDR", "", "primary").is_some(),
        "primary deleted"
    );
    assert!(
        cluster.api.delete("ServiceCIDR", "", "secondary").is_some(),
        "secondary deleted"
    );
    cluster.pods_answering(http(HOST_100), &["host-100"]);
    cluster.pods_answering(http(HOST_101), &["host-101"]);
    cluster.pods_answering(http(svc), &["pod-a"]);
    let log = agent.log();
    assert!(
        log.contains("service ranges: from the ServiceCIDR objects"),
        "the agent says once where the ranges come from:\n{log}"
    );
    assert!(
        log.contains("service ranges: none (no ServiceCIDR object holds an IPv4 range)"),
        "the agent logs the ranges it writes:\n{log}"
    );
}

#[test]
fn without_the_service_cidr_kind_the_flag_gives_the_range() {
    let mut cluster = Cluster::without_service_cidrs("k8scidrflag");
    cluster.api.set_served("ServiceCIDR", false);
    for (name, addr) in [("host-96", HOST_96), ("host-100", HOST_100)] {
        cluster.add_host(name, addr);
    }
    let mut agent = cluster.start_agent(&["--service-cidr", "10.100.0.0/16"]);
    agent.wait_for_log(
        "service ranges: the API server does not serve ServiceCIDR (Kubernetes < 1.33); using \
         --service-cidr 10.100.0.0/16",
        1,
    );
    cluster.dropped(http(HOST_100));
    cluster.pods_answering(http(HOST_96), &["host-96"]);
}

#[test]
fn without_the_service_cidr_kind_or_the_flag_nothing_is_dropped_by_range() {
    let mut cluster = Cluster::without_service_cidrs("k8scidrnone");
    cluster.api.set_served("ServiceCIDR", false);
    cluster.add_host("host-96", HOST_96);
    cluster.api.apply(service("web", SVC, json!({})));
    cluster
        .api
        .apply(both_ports(vec![endpoint(POD_A, true, true, false)]));
    let mut agent = cluster.start_agent(&[]);
    agent.wait_for_log("--service-cidr is not set; nothing is dropped by range", 1);
    cluster.pods_answering(http(SVC), &["pod-a"]);
    // In 10.96.0.0/12, which used to be the default range.
    cluster.pods_answering(http(HOST_96), &["host-96"]);
    assert_eq!(
        cluster.api.list_count("ServiceCIDR"),
        1,
        "one LIST told the agent the kind is not served, and it did not watch"
    );
    assert_eq!(
        cluster.api.watch_count("ServiceCIDR"),
        0,
        "no WATCH of an unserved kind"
    );
}
