//! End to end: the agent in a netns node, real pods, real packets.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use common::{Answer, Connection, Fixture, agent_binary, eventually, http_get, tcp_request, udp_request};
use redirector::model::{Desired, Ipv4Cidr};
use redirector::source::manifests::ManifestStore;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const LEGACY_1: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const LEGACY_2: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

fn example(name: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/");
    std::fs::read_to_string(format!("{path}{name}")).unwrap_or_else(|e| panic!("examples/{name}: {e}"))
}

/// What the agent should program for the fixture's manifests, computed with
/// the same library code, to learn allocated ClusterIPs.
fn desired(fx: &Fixture) -> Desired {
    let mut store = ManifestStore::default();
    let errors = store.reload(&fx.manifests);
    assert!(errors.is_empty(), "test manifests must be valid: {errors:?}");
    store.desired("10.96.0.0/12".parse::<Ipv4Cidr>().unwrap()).0
}

/// The service address of `namespace/name` port `port_name`.
fn service_address(fx: &Fixture, name: &str, port_name: &str) -> SocketAddrV4 {
    desired(fx)
        .iter()
        .find(|(_, sp)| sp.name.name == name && sp.name.port == port_name)
        .map(|(fe, _)| SocketAddrV4::new(fe.addr, fe.port))
        .unwrap_or_else(|| panic!("service {name} port {port_name} is not in the manifests"))
}

/// The seed cluster: a client pod, the two jordy pods serving 8080 and 8443,
/// two legacy hosts serving 9000, and the example manifests.
fn seed_cluster(tag: &str) -> (Fixture, String) {
    let mut fx = Fixture::new(tag);
    let client = fx.add_host("client", CLIENT);
    for (name, addr) in [("jordy-a", POD_A), ("jordy-b", POD_B)] {
        let netns = fx.add_host(name, addr);
        fx.serve(&netns, name, 8080);
        fx.serve(&netns, name, 8443);
    }
    for (name, addr) in [("legacy-1", LEGACY_1), ("legacy-2", LEGACY_2)] {
        let netns = fx.add_host(name, addr);
        fx.serve(&netns, name, 9000);
    }
    for file in ["pods.yaml", "services.yaml", "legacy.yaml"] {
        fx.write_manifest(file, &example(file));
    }
    (fx, client)
}

/// Connects until every pod in `expected` has answered (bounded attempts).
fn pods_answering(client: &str, to: SocketAddrV4, expected: &[&str]) -> Result<Vec<Answer>, String> {
    let mut answers = Vec::new();
    for _ in 0..40 {
        let answer = tcp_request(client, to).map_err(|e| format!("{to}: {e}"))?;
        answers.push(answer);
        if expected.iter().all(|p| answers.iter().any(|a| a.pod == *p)) {
            return Ok(answers);
        }
    }
    Err(format!(
        "{to}: only {:?} answered in 40 connections",
        answers.iter().map(|a| &a.pod).collect::<Vec<_>>()
    ))
}

#[test]
fn seed_services_reach_every_pod_and_keep_the_client_address() {
    let (fx, client) = seed_cluster("seed");
    let mut agent = fx.start_agent(agent_binary(), &[]);
    agent.wait_for_log("synced ", 1);
    agent.wait_for_log("attached to", 1);
    let log = agent.log();
    let (synced, attached) = (log.find("synced "), log.find("attached to"));
    assert!(
        synced < attached,
        "the programs are attached only after the first sync programmed the maps:\n{log}"
    );

    for service in ["jordy-svc-alloc-port", "jordy-svc-alloc-named-port"] {
        for port in ["http", "https"] {
            let to = service_address(&fx, service, port);
            let answers = eventually(&format!("{service}:{port} via {to}"), SYNC_TIMEOUT, || {
                pods_answering(&client, to, &["jordy-a", "jordy-b"])
            });
            for answer in answers {
                assert_eq!(
                    *answer.client.ip(),
                    CLIENT,
                    "{service}:{port}: the pod sees the client's own address"
                );
                assert!(
                    answer.client.port() >= 1024,
                    "{service}:{port}: the client's ephemeral port is kept"
                );
            }
        }
    }
    let legacy = service_address(&fx, "legacy-backend", "http");
    let answers = eventually("legacy-backend", SYNC_TIMEOUT, || {
        pods_answering(&client, legacy, &["legacy-1", "legacy-2"])
    });
    assert!(
        answers.iter().all(|a| *a.client.ip() == CLIENT),
        "legacy hosts see the client address"
    );

    // kube-proxy's health and metrics endpoints, from the node.
    let (status, body) =
        http_get(&fx.node, "127.0.0.1:10256".parse().unwrap(), "/healthz").expect("GET /healthz");
    assert_eq!(status, 200, "healthy after a successful sync: {body}");
    assert!(
        body.contains("lastUpdated"),
        "healthz body as kube-proxy's: {body}"
    );
    let (status, metrics) =
        http_get(&fx.node, "127.0.0.1:10249".parse().unwrap(), "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "metrics served");
    let new_flows: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("redirector_packets_total{verdict=\"forward_new_flow\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no new-flow counter in metrics:\n{metrics}"));
    assert!(
        new_flows >= 6,
        "every connection made above was counted as a new flow ({new_flows})"
    );
    assert!(
        metrics.contains("kubeproxy_sync_proxy_rules_duration_seconds_count"),
        "kube-proxy's sync histogram"
    );
    assert!(agent.stop(), "the agent exits cleanly on SIGTERM");
}

#[test]
fn named_target_ports_resolve_per_pod() {
    let mut fx = Fixture::new("named");
    let client = fx.add_host("client", CLIENT);
    // The same port name maps to a different number in each pod.
    for (name, addr, port) in [("pod-a", POD_A, 8080), ("pod-b", POD_B, 9090)] {
        let netns = fx.add_host(name, addr);
        fx.serve(&netns, name, port);
    }
    fx.write_manifest(
        "named.yaml",
        &format!(
            "{}---\n{}---\n{}",
            pod_yaml("pod-a", POD_A, "web", 8080),
            pod_yaml("pod-b", POD_B, "web", 9090),
            service_yaml("named", "10.96.0.50", "web")
        ),
    );
    let _agent = fx.start_agent(agent_binary(), &[]);
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 50), 80);
    eventually("named port service", SYNC_TIMEOUT, || {
        pods_answering(&client, to, &["pod-a", "pod-b"])
    });
}

#[test]
fn udp_request_and_reply_come_from_the_service_address() {
    let mut fx = Fixture::new("udp");
    let client = fx.add_host("client", CLIENT);
    let netns = fx.add_host("pod-a", POD_A);
    fx.serve(&netns, "pod-a", 5353);
    fx.write_manifest(
        "udp.yaml",
        &format!(
            "{}---\n{}",
            pod_yaml("pod-a", POD_A, "dns", 5353),
            service_yaml_proto("dns", "10.96.0.53", "dns", "UDP", 53)
        ),
    );
    let _agent = fx.start_agent(agent_binary(), &[]);
    let to = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 53), 53);
    // The client's socket is connected to the service address: a reply from
    // any other source would not be delivered.
    let answer = eventually("UDP via the service", SYNC_TIMEOUT, || {
        udp_request(&client, to).map_err(|e| e.to_string())
    });
    assert_eq!(answer.pod, "pod-a", "the UDP endpoint answered");
    assert_eq!(
        *answer.client.ip(),
        CLIENT,
        "the UDP endpoint saw the client address"
    );
}

#[test]
fn endpoint_removal_lets_established_connections_finish() {
    let (fx, client) = seed_cluster("epdel");
    let mut agent = fx.start_agent(agent_binary(), &[]);
    agent.wait_for_log("synced ", 1);
    let to = service_address(&fx, "jordy-svc-alloc-port", "http");
    eventually("both pods answer", SYNC_TIMEOUT, || {
        pods_answering(&client, to, &["jordy-a", "jordy-b"])
    });

    // An open connection pinned to jordy-b.
    let mut pinned = eventually("a connection to jordy-b", SYNC_TIMEOUT, || {
        let mut c = Connection::open(&client, to).map_err(|e| e.to_string())?;
        match c.ask() {
            Ok(a) if a.pod == "jordy-b" => Ok(c),
            Ok(a) => Err(format!("reached {}", a.pod)),
            Err(e) => Err(e.to_string()),
        }
    });

    // jordy-b stops being ready.
    let syncs = agent.syncs();
    fx.write_manifest("pods.yaml", &mark_unready(&example("pods.yaml"), &["jordy-b"]));
    agent.wait_for_log("synced ", syncs + 1);

    for i in 0..20 {
        let answer = tcp_request(&client, to).expect("new connection after endpoint removal");
        assert_eq!(
            answer.pod, "jordy-a",
            "new connection {i} must not reach the removed endpoint"
        );
    }
    let answer = pinned.ask().expect("the established connection keeps working");
    assert_eq!(
        answer.pod, "jordy-b",
        "the established connection stays on its endpoint"
    );
}

#[test]
fn a_service_without_endpoints_is_refused_at_once_and_a_deleted_one_dropped() {
    let (fx, client) = seed_cluster("refuse");
    let mut agent = fx.start_agent(agent_binary(), &[]);
    agent.wait_for_log("synced ", 1);
    let to = service_address(&fx, "jordy-svc-alloc-port", "http");
    eventually("service answers", SYNC_TIMEOUT, || {
        tcp_request(&client, to).map_err(|e| e.to_string())
    });

    // No ready pods: the service stays, without endpoints.
    let syncs = agent.syncs();
    fx.write_manifest(
        "pods.yaml",
        &mark_unready(&example("pods.yaml"), &["jordy-a", "jordy-b"]),
    );
    agent.wait_for_log("synced ", syncs + 1);
    assert_refused(&client, to, "a service without endpoints");

    // Deleted services: their address is unallocated in the service range,
    // dropped as kube-proxy drops it, never routed onward.
    let syncs = agent.syncs();
    fx.remove_manifest("services.yaml");
    agent.wait_for_log("synced ", syncs + 1);
    let err = tcp_request(&client, to).expect_err("a deleted service must not answer");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::TimedOut,
        "a deleted service: dropped, so the connect times out; got {err}"
    );
    let counters = cli(&fx, &["counters"]);
    assert!(
        counters
            .lines()
            .any(|l| l.starts_with("drop_unallocated_cluster_ip ") && l != "drop_unallocated_cluster_ip 0"),
        "the drops are counted:\n{counters}"
    );
}

fn assert_refused(client: &str, to: SocketAddrV4, what: &str) {
    let started = Instant::now();
    let err = tcp_request(client, to).expect_err(&format!("{what} must not answer"));
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{what}: connection refused, got {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{what}: refused at once, took {:?}",
        started.elapsed()
    );
}

/// The pods manifest with the Ready condition of `pods` turned False.
fn mark_unready(pods_yaml: &str, pods: &[&str]) -> String {
    pods_yaml
        .split("\n---\n")
        .map(|doc| {
            if pods.iter().any(|p| doc.contains(&format!("name: {p}\n"))) {
                doc.replace("status: \"True\"", "status: \"False\"")
            } else {
                doc.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

fn pod_yaml(name: &str, ip: Ipv4Addr, port_name: &str, port: u16) -> String {
    let protocol = if port_name == "dns" { "UDP" } else { "TCP" };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    app: test\n\
         spec:\n  containers:\n    - name: c\n      image: x\n      ports:\n        - name: {port_name}\n          \
         containerPort: {port}\n          protocol: {protocol}\n\
         status:\n  phase: Running\n  podIP: {ip}\n  conditions:\n    - type: Ready\n      status: \"True\"\n"
    )
}

fn service_yaml(name: &str, cluster_ip: &str, target: &str) -> String {
    service_yaml_proto(name, cluster_ip, target, "TCP", 80)
}

fn service_yaml_proto(name: &str, cluster_ip: &str, target: &str, protocol: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  \
         clusterIP: {cluster_ip}\n  selector:\n    app: test\n  ports:\n    - name: p\n      port: {port}\n      \
         targetPort: {target}\n      protocol: {protocol}\n"
    )
}

#[test]
fn the_datapath_keeps_working_while_the_agent_restarts_and_cleanup_removes_it() {
    restart_keeps_the_datapath("restart", &[]);
}

/// Kernels without tcx: netlink TC filters at a fixed priority and handle,
/// which the agent leaves in place on exit and a restarted agent takes over.
#[test]
fn netlink_tc_filters_keep_working_while_the_agent_restarts_and_cleanup_removes_them() {
    restart_keeps_the_datapath("nlrestart", &["--tc-attach", "netlink"]);
}

fn restart_keeps_the_datapath(tag: &str, mode: &[&str]) {
    let netlink = mode.contains(&"netlink");
    let (mut fx, client) = seed_cluster(tag);
    let mut agent = fx.start_agent(agent_binary(), mode);
    agent.wait_for_log("synced ", 1);
    let to = service_address(&fx, "jordy-svc-alloc-port", "http");
    let mut open = eventually("service answers", SYNC_TIMEOUT, || {
        Connection::open(&client, to).map_err(|e| e.to_string())
    });
    let first = open.ask().expect("first answer");
    assert!(agent.stop(), "the agent exits cleanly");
    assert_eq!(
        tc_filters(&fx, "vp0").is_empty(),
        !netlink,
        "netlink TC filters are left in place (and only in netlink mode)"
    );

    // No agent: links (or filters) and maps stay, so both old and new
    // connections work.
    assert_eq!(
        open.ask()
            .expect("established connection while the agent is down")
            .pod,
        first.pod,
        "same pod"
    );
    tcp_request(&client, to).expect("a new connection while the agent is down");

    // An interface created while the agent is away is attached when it returns.
    let late = fx.add_host("late", Ipv4Addr::new(10, 244, 9, 9));
    let mut agent = fx.start_agent(agent_binary(), mode);
    agent.wait_for_log("synced ", 1);
    let log = agent.log();
    let sync = log.lines().find(|l| l.contains("synced ")).expect("a sync line");
    assert!(
        sync.contains(" 0 map writes, 0 deletes"),
        "the restarted agent rewrote nothing: {sync}"
    );
    assert_eq!(
        open.ask().expect("established connection after restart").pod,
        first.pod,
        "same pod"
    );
    let answer = eventually("the late pod reaches the service", SYNC_TIMEOUT, || {
        tcp_request(&late, to).map_err(|e| e.to_string())
    });
    assert_eq!(
        *answer.client.ip(),
        Ipv4Addr::new(10, 244, 9, 9),
        "the late pod's own address"
    );
    if netlink {
        assert_eq!(
            tc_filters(&fx, "vp0").matches("handle 0x7264 ").count(),
            2,
            "the restarted agent replaced its filters in place (one per direction), not beside them: {}",
            tc_filters(&fx, "vp0")
        );
    }
    assert!(agent.stop(), "the agent exits cleanly");

    // In the node's network namespace, where the agent ran.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &fx.node])
        .arg(agent_binary())
        .args(["cleanup", "--bpffs"])
        .arg(fx.bpffs.path())
        .output()
        .expect("running redirector cleanup");
    assert!(
        out.status.success(),
        "cleanup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Links are released asynchronously once their last pin goes.
    let err = eventually(
        "no translation after cleanup",
        SYNC_TIMEOUT,
        || match tcp_request(&client, to) {
            Ok(answer) => Err(format!("still answered by {}", answer.pod)),
            Err(e) => Ok(e),
        },
    );
    assert_ne!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "no datapath is left to refuse: {err}"
    );
    let left: Vec<_> = std::fs::read_dir(fx.bpffs.path().join("redirector/links"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "no link pins left: {left:?}");
    assert_eq!(tc_filters(&fx, "vp0"), "", "no TC filters left");
}

/// `tc filter show` for both directions of `interface` in the node.
fn tc_filters(fx: &Fixture, interface: &str) -> String {
    ["ingress", "egress"]
        .iter()
        .map(|direction| {
            let out = std::process::Command::new("ip")
                .args([
                    "netns", "exec", &fx.node, "tc", "filter", "show", "dev", interface, direction,
                ])
                .output()
                .expect("running tc");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
}

/// Runs the agent binary as a CLI (`redirector ARGS --bpffs <fixture>`).
fn cli(fx: &Fixture, args: &[&str]) -> String {
    let out = std::process::Command::new(agent_binary())
        .args(args)
        .arg("--bpffs")
        .arg(fx.bpffs.path())
        .output()
        .expect("running the redirector CLI");
    assert!(
        out.status.success(),
        "redirector {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

const NO_ENDPOINTS_SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: no-endpoints
  namespace: default
spec:
  clusterIP: 10.96.0.77
  selector:
    app: nobody
  ports:
    - name: web
      port: 8080
";

#[test]
fn operator_views_show_what_is_programmed() {
    let (fx, client) = seed_cluster("views");
    fx.write_manifest("empty.yaml", NO_ENDPOINTS_SERVICE);
    let mut agent = fx.start_agent(agent_binary(), &[]);
    agent.wait_for_log("synced 6 service ports", 1);
    let alloc = service_address(&fx, "jordy-svc-alloc-port", "http");
    let named = service_address(&fx, "jordy-svc-alloc-named-port", "http");
    let legacy = service_address(&fx, "legacy-backend", "http");
    // The allocated addresses, spelled out so the expected text reads as the user sees it.
    assert_eq!(
        (
            alloc.ip().to_string(),
            named.ip().to_string(),
            legacy.ip().to_string()
        ),
        (
            "10.107.81.105".into(),
            "10.99.76.193".into(),
            "10.109.116.176".into()
        ),
        "ClusterIPs allocated from namespace/name"
    );

    assert_eq!(
        cli(&fx, &["get", "endpoints"]),
        "\
NAME                         ENDPOINTS                                                        AGE
jordy-svc-alloc-named-port   10.244.1.10:8080,10.244.2.10:8080,10.244.1.10:8443 + 1 more...   <unknown>
jordy-svc-alloc-port         10.244.1.10:8080,10.244.2.10:8080,10.244.1.10:8443 + 1 more...   <unknown>
legacy-backend               198.51.100.10:9000,198.51.100.11:9000                            <unknown>
no-endpoints                 <none>                                                           <unknown>
",
        "get endpoints"
    );
    for (service, ip, http_target, https_target) in [
        ("jordy-svc-alloc-port", "10.107.81.105", "8080", "8443"),
        (
            "jordy-svc-alloc-named-port",
            "10.99.76.193",
            "jordy-http",
            "jordy-https",
        ),
    ] {
        assert_eq!(
            cli(&fx, &["describe", "service", service]),
            format!(
                "\
Name:                     {service}
Namespace:                default
Labels:                   <none>
Selector:                 app=jordy
Type:                     ClusterIP
IP:                       {ip}
Port:                     http  80/TCP
TargetPort:               {http_target}/TCP
Endpoints:                10.244.1.10:8080,10.244.2.10:8080
Traffic:                  0 packets, 0 new flows
Port:                     https  443/TCP
TargetPort:               {https_target}/TCP
Endpoints:                10.244.1.10:8443,10.244.2.10:8443
Traffic:                  0 packets, 0 new flows
Session Affinity:         None
Drift:                    none (the maps hold what the agent wants)
"
            ),
            "describe service {service}"
        );
    }
    let env = cli(&fx, &["env", "-n", "default"]);
    let alloc_env = "\
JORDY_SVC_ALLOC_PORT_SERVICE_HOST=10.107.81.105
JORDY_SVC_ALLOC_PORT_SERVICE_PORT=80
JORDY_SVC_ALLOC_PORT_SERVICE_PORT_HTTP=80
JORDY_SVC_ALLOC_PORT_SERVICE_PORT_HTTPS=443
JORDY_SVC_ALLOC_PORT_PORT=tcp://10.107.81.105:80
JORDY_SVC_ALLOC_PORT_PORT_80_TCP=tcp://10.107.81.105:80
JORDY_SVC_ALLOC_PORT_PORT_80_TCP_PROTO=tcp
JORDY_SVC_ALLOC_PORT_PORT_80_TCP_PORT=80
JORDY_SVC_ALLOC_PORT_PORT_80_TCP_ADDR=10.107.81.105
JORDY_SVC_ALLOC_PORT_PORT_443_TCP=tcp://10.107.81.105:443
JORDY_SVC_ALLOC_PORT_PORT_443_TCP_PROTO=tcp
JORDY_SVC_ALLOC_PORT_PORT_443_TCP_PORT=443
JORDY_SVC_ALLOC_PORT_PORT_443_TCP_ADDR=10.107.81.105
";
    let legacy_env = "\
LEGACY_BACKEND_SERVICE_HOST=10.109.116.176
LEGACY_BACKEND_SERVICE_PORT=80
LEGACY_BACKEND_SERVICE_PORT_HTTP=80
LEGACY_BACKEND_PORT=tcp://10.109.116.176:80
LEGACY_BACKEND_PORT_80_TCP=tcp://10.109.116.176:80
LEGACY_BACKEND_PORT_80_TCP_PROTO=tcp
LEGACY_BACKEND_PORT_80_TCP_PORT=80
LEGACY_BACKEND_PORT_80_TCP_ADDR=10.109.116.176
";
    assert!(
        env.contains(alloc_env),
        "env has the kubelet's variables for jordy-svc-alloc-port:\n{env}"
    );
    assert!(
        env.contains(legacy_env),
        "env has the variables of the selectorless service:\n{env}"
    );
    assert_eq!(
        env.lines().count(),
        13 + 13 + 8 + 8,
        "four services' variables, nothing else:\n{env}"
    );
    assert_eq!(
        cli(&fx, &["env", "-n", "kube-system"]),
        "",
        "no services in kube-system"
    );

    // explain: a service port, a port the service does not define, a service without endpoints.
    let ct_entries = |fx: &Fixture| {
        let (_, metrics) =
            http_get(&fx.node, "127.0.0.1:10249".parse().unwrap(), "/metrics").expect("metrics");
        metric(&metrics, "redirector_map_entries{map=\"CT_V2\"}")
    };
    let ct_before = ct_entries(&fx);
    let explained = cli(
        &fx,
        &["explain", "--from", "10.244.0.5", "--to", &alloc.to_string()],
    );
    let lines: Vec<&str> = explained.lines().collect();
    assert_eq!(
        lines[..4],
        [
            "packet:    10.244.0.5:40000 -> 10.107.81.105:80/tcp (first packet of a new connection)",
            "service:   default/jordy-svc-alloc-port:http (10.107.81.105:80/tcp)",
            "endpoints: 10.244.1.10:8080, 10.244.2.10:8080 (2 in the maps)",
            "verdict:   forward_new_flow",
        ],
        "explain for a service port:\n{explained}"
    );
    assert!(
        ["10.244.1.10:8080 (slot 1 of 2)", "10.244.2.10:8080 (slot 2 of 2)"]
            .iter()
            .any(|pick| lines[4].starts_with(&format!("why:       new flow: this run picked {pick}"))),
        "explain names the pick: {}",
        lines[4]
    );
    assert_eq!(
        cli(&fx, &["explain", "--from", "10.244.0.5", "--to", &format!("{}:81", alloc.ip())]),
        "\
packet:    10.244.0.5:40000 -> 10.107.81.105:81/tcp (first packet of a new connection)
verdict:   refused_unknown_port
why:       refused: 10.107.81.105 is a service address, but no service defines 81/tcp there (it has 80/tcp, 443/tcp); the client gets ICMP port unreachable
",
        "explain for a port the service does not define"
    );
    assert_eq!(
        cli(&fx, &["explain", "--from", "10.244.0.5", "--to", "10.96.0.77:8080/tcp"]),
        "\
packet:    10.244.0.5:40000 -> 10.96.0.77:8080/tcp (first packet of a new connection)
service:   default/no-endpoints:web (10.96.0.77:8080/tcp)
endpoints: <none> (0 in the maps)
verdict:   refused_no_endpoints
why:       refused: the service port has no endpoints; the client gets ICMP port unreachable (connection refused)
",
        "explain for a service without endpoints"
    );
    assert_eq!(
        ct_entries(&fx),
        ct_before,
        "explain left no connection-table entry"
    );
    assert!(
        cli(&fx, &["describe", "service", "jordy-svc-alloc-port"])
            .contains("Traffic:                  0 packets, 0 new flows"),
        "explain counted nothing"
    );

    // Traffic shows in the metrics and in describe.
    let flows = |fx: &Fixture| {
        let (_, metrics) =
            http_get(&fx.node, "127.0.0.1:10249".parse().unwrap(), "/metrics").expect("metrics");
        metric(
            &metrics,
            "redirector_service_new_flows_total{namespace=\"default\",service=\"jordy-svc-alloc-port\",port=\"http\",frontend=\"10.107.81.105:80/tcp\"}",
        )
    };
    let before = flows(&fx);
    const CONNECTIONS: u64 = 5;
    for _ in 0..CONNECTIONS {
        tcp_request(&client, alloc).expect("request through the service");
    }
    assert_eq!(
        flows(&fx) - before,
        CONNECTIONS,
        "each connection is one new flow in the metrics"
    );
    assert!(
        cli(&fx, &["describe", "service", "jordy-svc-alloc-port"]).contains("new flows\n")
            && cli(&fx, &["describe", "service", "jordy-svc-alloc-port"]).contains(", 5 new flows"),
        "describe shows the flows"
    );

    let err = std::process::Command::new(agent_binary())
        .args(["describe", "service", "nope", "--bpffs"])
        .arg(fx.bpffs.path())
        .output()
        .expect("redirector describe");
    assert!(!err.status.success(), "an unknown service is an error");
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("default/nope is not programmed"),
        "the error names the service: {}",
        String::from_utf8_lossy(&err.stderr)
    );
    let err = std::process::Command::new(agent_binary())
        .args(["get", "services", "--bpffs", "/nonexistent"])
        .output()
        .expect("redirector get");
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("no redirector state under /nonexistent"),
        "a path without agent state is a clear error: {}",
        String::from_utf8_lossy(&err.stderr)
    );
    let err = std::process::Command::new(agent_binary())
        .args(["explain", "--from", "10.0.0.1", "--to", "10.96.0.1"])
        .output()
        .expect("redirector explain");
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("expected IP:PORT"),
        "a malformed address is a clear error: {}",
        String::from_utf8_lossy(&err.stderr)
    );
}

/// The value of one metric line.
fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(str::trim))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics:\n{text}"))
}

#[test]
fn interfaces_that_appear_later_are_attached_and_bad_manifests_keep_the_last_good_state() {
    let (mut fx, client) = seed_cluster("late");
    let mut agent = fx.start_agent(agent_binary(), &[]);
    agent.wait_for_log("synced ", 1);
    let to = service_address(&fx, "jordy-svc-alloc-port", "http");
    eventually("service answers", SYNC_TIMEOUT, || {
        tcp_request(&client, to).map_err(|e| e.to_string())
    });

    // A pod created while the agent runs: rtnetlink tells the agent.
    let newcomer = Ipv4Addr::new(10, 244, 7, 7);
    let late = fx.add_host("newpod", newcomer);
    agent.wait_for_log("attached to vp5", 1);
    let answer = eventually("the new pod reaches the service", SYNC_TIMEOUT, || {
        tcp_request(&late, to).map_err(|e| e.to_string())
    });
    assert_eq!(
        *answer.client.ip(),
        newcomer,
        "the pod sees the newcomer's own address"
    );

    // A broken file: an error naming file, object and field; the rest keeps working.
    let syncs = agent.syncs();
    fx.write_manifest(
        "services.yaml",
        &example("services.yaml").replacen("port: 80", "port: eighty", 1),
    );
    agent.wait_for_log("synced ", syncs + 1);
    let log = agent.log();
    let error = log
        .lines()
        .find(|l| l.contains("ERROR") && l.contains("services.yaml"))
        .unwrap_or_else(|| panic!("no error naming the file:\n{log}"));
    assert!(
        error.contains("Service default/jordy-svc-alloc-port") && error.contains("spec.ports"),
        "the error names the object and the field: {error}"
    );
    let answer = tcp_request(&client, to).expect("the service keeps its last good state");
    assert!(
        answer.pod.starts_with("jordy-"),
        "still answered by a jordy pod: {answer:?}"
    );
}

/// The datapath logs anomalies only, and the agent's log shows them: a slot
/// (or the master's copy of it) that names no backend (the maps corrupted
/// behind the agent's back) drops
/// the new flow, counts it, and says which service port and slot.
#[test]
fn datapath_anomalies_reach_the_agent_log() {
    use redirector::datapath::writer::service_key;
    use redirector::datapath::{Maps, maps_pin_dir};
    use redirector::model::{Frontend, Protocol};
    use redirector_common::counters;

    let (fx, client) = seed_cluster("anomaly");
    let mut agent = fx.start_agent(agent_binary(), &[]);
    agent.wait_for_log("synced ", 1);
    let to = service_address(&fx, "jordy-svc-alloc-port", "http");
    eventually("both pods answer", SYNC_TIMEOUT, || {
        pods_answering(&client, to, &["jordy-a", "jordy-b"])
    });

    let mut maps = Maps::from_pins(&maps_pin_dir(fx.bpffs.path())).expect("pinned maps");
    let frontend = Frontend {
        addr: *to.ip(),
        port: to.port(),
        protocol: Protocol::Tcp,
    };
    for slot in 1..=2 {
        let key = service_key(frontend, slot);
        let mut entry = maps.services.get(&key, 0).expect("the slot is programmed");
        entry.backend_id = 0;
        maps.services.insert(key, entry, 0).expect("corrupting the slot");
    }
    // A port this small is picked from its master's copies of the slots.
    let key = service_key(frontend, 0);
    let mut master = maps.services.get(&key, 0).expect("the master is programmed");
    for copy in &mut master.inline {
        copy.backend_id = 0;
    }
    maps.services
        .insert(key, master, 0)
        .expect("corrupting the master's copies");
    let dropped_before = maps.counter_totals().unwrap()[counters::DROP_BACKEND_MISSING as usize];
    assert!(
        tcp_request(&client, to).is_err(),
        "a new flow to a slot without a backend is dropped"
    );
    let dropped = maps.counter_totals().unwrap()[counters::DROP_BACKEND_MISSING as usize] - dropped_before;
    assert!(dropped >= 1, "the drop is counted ({dropped})");
    agent.wait_for_log("names no backend", 1);
    assert!(
        !agent.log().contains("connection table insert failed"),
        "only the anomaly that happened is logged:\n{}",
        agent.log()
    );
}

/// `--log-format json`: every line the agent logs is one JSON object, and a
/// sync's events carry the `sync` span.
#[test]
fn json_logs_are_one_object_per_line() {
    let (fx, _client) = seed_cluster("jsonlog");
    let mut agent = fx.start_agent(agent_binary(), &["--log-format", "json"]);
    agent.wait_for_log("synced ", 1);
    let log = agent.log();
    let events: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    let synced = events
        .iter()
        .find(|e| {
            e["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("synced "))
        })
        .unwrap_or_else(|| panic!("no sync event:\n{log}"));
    assert_eq!(synced["level"], "INFO", "the sync summary's level: {synced}");
    assert_eq!(
        synced["span"]["name"], "sync",
        "the sync summary is in the sync span: {synced}"
    );
}
