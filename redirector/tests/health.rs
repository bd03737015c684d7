//! `/healthz`, `/livez` and the sync metrics of a running agent on the
//! Kubernetes source: a change that cannot be programmed (a Service that
//! does not fit the maps) turns `/healthz` to 503 after `--healthz-timeout`
//! while `/livez` stays 200, and both are 200 once the change is resolved.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::time::{Duration, Instant, SystemTime};

use common::apiserver::FakeApiServer;
use common::{Fixture, agent_binary, eventually, http_get, in_netns, tcp_request};
use serde_json::{Value, json};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BIG: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const HEALTHZ: &str = "127.0.0.1:10256";
const METRICS: &str = "127.0.0.1:10249";
const TIMEOUT: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(15);

fn service(name: &str, ip: Ipv4Addr, ports: &[u16]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": ip.to_string(),
            "selector": {"app": name},
            "ports": ports.iter().map(|p| json!({
                "name": format!("p{p}"), "port": p, "protocol": "TCP", "targetPort": 8080
            })).collect::<Vec<_>>()
        }
    })
}

/// `name`'s slice: pod-a on every port, changed at `trigger`.
fn slice(name: &str, ports: &[u16], trigger: SystemTime) -> Value {
    let trigger = jiff::Timestamp::try_from(trigger).expect("a time");
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-1"),
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": name},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": format!("{trigger:.0}")}
        },
        "addressType": "IPv4",
        "ports": ports.iter().map(|p| json!({"name": format!("p{p}"), "port": 8080, "protocol": "TCP"}))
            .collect::<Vec<_>>(),
        "endpoints": [{"addresses": [POD_A.to_string()], "conditions": {"ready": true}}]
    })
}

fn status(fx: &Fixture, path: &str) -> (u16, String) {
    http_get(&fx.node, HEALTHZ.parse().unwrap(), path).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The value of the unlabelled series `name`.
fn metric(fx: &Fixture, name: &str) -> f64 {
    let (_, text) = http_get(&fx.node, METRICS.parse().unwrap(), "/metrics").expect("GET /metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

#[test]
fn healthz_fails_while_a_change_is_not_programmed_and_livez_does_not() {
    let mut fx = Fixture::new("health");
    let client = fx.add_host("client", CLIENT);
    let pod = fx.add_host("pod-a", POD_A);
    fx.serve(&pod, "pod-a", 8080);
    let listener = in_netns(&fx.node, || {
        TcpListener::bind("127.0.0.1:0").expect("bind API server")
    });
    let api = FakeApiServer::start(listener);
    api.apply(service("web", WEB, &[80]));
    api.apply(slice("web", &[80], SystemTime::now()));
    // Room for two service ports (IDs 1 and 2): web's one, and one of big's two.
    let mut agent = fx.start_agent_watching(
        agent_binary(),
        &api.url(),
        &["--max-service-ports", "3", "--healthz-timeout", "2s"],
    );
    agent.wait_for_log("initial lists complete", 1);
    eventually("web answers", WAIT, || {
        tcp_request(&client, SocketAddrV4::new(WEB, 80))
            .map(|a| assert_eq!(a.pod, "pod-a"))
            .map_err(|e| e.to_string())
    });
    for path in ["/healthz", "/livez"] {
        let (code, body) = status(&fx, path);
        assert_eq!(code, 200, "{path} after the first sync: {body}");
    }
    let (_, body) = status(&fx, "/healthz");
    assert!(
        body.contains("\"nodeEligible\": true"),
        "kube-proxy's body: {body}"
    );

    // A change that cannot be programmed: big's second port finds no room.
    let queued = metric(&fx, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds");
    let failed_at = Instant::now();
    api.apply(service("big", BIG, &[80, 81]));
    api.apply(slice("big", &[80, 81], SystemTime::now()));
    agent.wait_for_log("was not programmed", 1);
    let (code, body) = status(&fx, "/healthz");
    assert!(
        code == 200 || failed_at.elapsed() >= TIMEOUT,
        "healthy until the change waited --healthz-timeout: {code} {body}"
    );
    let unhealthy = eventually("/healthz 503", WAIT, || match status(&fx, "/healthz") {
        (503, body) => Ok(body),
        (code, body) => Err(format!("{code} {body}")),
    });
    assert!(
        failed_at.elapsed() >= TIMEOUT,
        "not before the timeout ({:?})",
        failed_at.elapsed()
    );
    assert!(
        unhealthy.contains("\"nodeEligible\": true"),
        "the node is fine, the maps are not: {unhealthy}"
    );
    // A change that keeps failing, retried at every sync: still 503, and
    // the loop is alive all along.
    api.apply(slice("web", &[80], SystemTime::now()));
    for _ in 0..5 {
        let (code, body) = status(&fx, "/livez");
        assert_eq!(code, 200, "/livez: the sync loop keeps up: {body}");
        assert_eq!(status(&fx, "/healthz").0, 503, "/healthz while big is left out");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        metric(&fx, "redirector_sync_errors_total") >= 2.0,
        "big was tried again at the next sync"
    );
    assert!(
        metric(&fx, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") > queued,
        "the last queued time moved"
    );
    // After the initial lists: big, and the slices of big and web.
    for (name, least) in [
        ("kubeproxy_sync_proxy_rules_service_changes_total", 1.0),
        ("kubeproxy_sync_proxy_rules_endpoint_changes_total", 2.0),
    ] {
        let value = metric(&fx, name);
        assert!(value >= least, "{name} {value}: every watched change counted");
    }
    assert_eq!(
        metric(&fx, "kubeproxy_sync_proxy_rules_endpoint_changes_pending"),
        0.0,
        "the loop took every change"
    );
    assert!(
        metric(&fx, "kubeproxy_network_programming_duration_seconds_count") >= 1.0,
        "web's slice, programmed, was measured from its trigger time"
    );

    // The change resolved: big goes away, and with it what could not fit.
    api.delete("Service", "default", "big");
    eventually("/healthz 200 again", WAIT, || match status(&fx, "/healthz") {
        (200, _) => Ok(()),
        (code, body) => Err(format!("{code} {body}")),
    });
    assert_eq!(status(&fx, "/livez").0, 200, "/livez too");
    assert!(agent.stop(), "the agent exits cleanly on SIGTERM");
}
