use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::{ManifestError, ManifestStore};
use crate::model::{
    Desired, Endpoint, Frontend, Ipv4Cidr, NamespacedName, NoEndpoints, Protocol, ServicePortName,
};
use crate::source::{ObjectKind, SourceObject, Warning};

/// A scratch manifest directory, removed afterwards.
struct Dir(PathBuf);

/// Where the scratch directory of `test` is.
fn scratch_path(test: &str) -> PathBuf {
    std::env::temp_dir().join(format!("redirector-manifests-{}-{test}", std::process::id()))
}

impl Dir {
    fn new(test: &str) -> Self {
        let path = scratch_path(test);
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating scratch dir");
        Dir(path)
    }

    fn write(&self, file: &str, text: &str) {
        std::fs::write(self.0.join(file), text).expect("writing manifest");
    }

    fn remove(&self, file: &str) {
        std::fs::remove_file(self.0.join(file)).expect("removing manifest");
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn cidr() -> Ipv4Cidr {
    "10.96.0.0/16".parse().expect("test CIDR")
}

/// Loads `files` into a fresh store, insisting they are valid.
fn load(test: &str, files: &[(&str, &str)]) -> ManifestStore {
    let dir = Dir::new(test);
    for (name, text) in files {
        dir.write(name, text);
    }
    let mut store = ManifestStore::default();
    let errors = store.reload(&dir.0);
    assert!(errors.is_empty(), "{test}: unexpected errors: {errors:#?}");
    store
}

fn desired(test: &str, files: &[(&str, &str)]) -> (Desired, Vec<Warning>) {
    load(test, files).desired(cidr())
}

fn name(namespace: &str, name: &str) -> NamespacedName {
    NamespacedName {
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// How warnings name object `namespace/name` of file `file` of `test`'s
/// scratch directory.
fn object(kind: ObjectKind, namespace: &str, object: &str, test: &str, file: &str) -> SourceObject {
    SourceObject {
        kind,
        name: name(namespace, object),
        file: Some(scratch_path(test).join(file)),
    }
}

fn ep(ip: &str, port: u16) -> Endpoint {
    Endpoint {
        addr: ip.parse().expect("test IP"),
        port,
    }
}

fn frontend(ip: &str, port: u16, protocol: Protocol) -> Frontend {
    Frontend {
        addr: ip.parse().expect("test IP"),
        port,
        protocol,
    }
}

fn endpoints_at(desired: &Desired, ip: &str, port: u16, protocol: Protocol) -> Option<Vec<Endpoint>> {
    desired
        .get(&frontend(ip, port, protocol))
        .map(|sp| sp.endpoints.clone())
}

/// A Pod manifest; `ports` are container ports (name, number, protocol).
fn pod(name: &str, ip: Option<&str>, phase: &str, ready: &str, ports: &[(&str, u16, &str)]) -> String {
    let ports: String = ports
        .iter()
        .map(|(n, p, proto)| format!("        - {{name: {n}, containerPort: {p}, protocol: {proto}}}\n"))
        .collect();
    let ip = ip.map(|ip| format!("  podIP: {ip}\n")).unwrap_or_default();
    format!(
        "---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: shop
  labels:
    app: web
    tier: front
spec:
  containers:
    - name: main
      image: nginx
      ports:
{ports}status:
  phase: {phase}
{ip}  conditions:
    - type: Initialized
      status: \"True\"
    - type: Ready
      status: \"{ready}\"
"
    )
}

const WEB_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  clusterIP: 10.96.0.10
  selector:
    app: web
  ports:
    - name: http
      port: 80
      targetPort: web
    - name: metrics
      port: 9100
      targetPort: 9101
    - name: dns
      port: 53
      protocol: UDP
"#;

#[test]
fn selector_service_uses_running_ready_pods() {
    let running = |name: &str, ip: &str| pod(name, Some(ip), "Running", "True", &[("web", 8080, "TCP")]);
    let cases: Vec<(&str, Vec<String>, Vec<Endpoint>)> = vec![
        (
            "running and ready",
            vec![running("a", "10.1.0.1")],
            vec![ep("10.1.0.1", 9101)],
        ),
        (
            "not running",
            vec![
                pod("a", Some("10.1.0.1"), "Pending", "True", &[]),
                running("b", "10.1.0.2"),
            ],
            vec![ep("10.1.0.2", 9101)],
        ),
        (
            "not ready",
            vec![
                pod("a", Some("10.1.0.1"), "Running", "False", &[]),
                running("b", "10.1.0.2"),
            ],
            vec![ep("10.1.0.2", 9101)],
        ),
        (
            "no IP",
            vec![pod("a", None, "Running", "True", &[]), running("b", "10.1.0.2")],
            vec![ep("10.1.0.2", 9101)],
        ),
        (
            "labels must all match",
            vec![
                running("a", "10.1.0.1").replace("app: web", "app: api"),
                running("b", "10.1.0.2"),
            ],
            vec![ep("10.1.0.2", 9101)],
        ),
        (
            "same namespace only",
            vec![
                running("a", "10.1.0.1").replace("namespace: shop", "namespace: other"),
                running("b", "10.1.0.2"),
            ],
            vec![ep("10.1.0.2", 9101)],
        ),
        ("no pods", vec![], vec![]),
    ];
    for (what, pods, want) in cases {
        let pods = pods.concat();
        let (desired, warnings) = desired(
            "selector",
            &[("pods.yaml", pods.as_str()), ("svc.yaml", WEB_SERVICE)],
        );
        assert_eq!(
            endpoints_at(&desired, "10.96.0.10", 9100, Protocol::Tcp),
            Some(want),
            "{what}: metrics endpoints"
        );
        assert!(
            warnings.is_empty(),
            "{what}: no warnings expected, got {warnings:?}"
        );
    }
}

#[test]
fn named_target_port_is_resolved_per_pod() {
    let pods = [
        pod(
            "a",
            Some("10.1.0.1"),
            "Running",
            "True",
            &[("web", 8080, "TCP"), ("dns", 5353, "UDP")],
        ),
        pod("b", Some("10.1.0.2"), "Running", "True", &[("web", 8081, "TCP")]),
        pod(
            "c",
            Some("10.1.0.3"),
            "Running",
            "True",
            &[("admin", 8080, "TCP")],
        ),
        pod("d", Some("10.1.0.4"), "Running", "True", &[("web", 8082, "UDP")]),
    ]
    .concat();
    let (desired, _) = desired("named", &[("all.yaml", &format!("{WEB_SERVICE}{pods}"))]);
    let cases = [
        (
            "name maps to different numbers per pod; pods without it (or with it on another protocol) are left out",
            80,
            Protocol::Tcp,
            vec![ep("10.1.0.1", 8080), ep("10.1.0.2", 8081)],
        ),
        (
            "numeric targetPort applies to every pod",
            9100,
            Protocol::Tcp,
            vec![
                ep("10.1.0.1", 9101),
                ep("10.1.0.2", 9101),
                ep("10.1.0.3", 9101),
                ep("10.1.0.4", 9101),
            ],
        ),
        (
            "absent targetPort means the service port",
            53,
            Protocol::Udp,
            vec![
                ep("10.1.0.1", 53),
                ep("10.1.0.2", 53),
                ep("10.1.0.3", 53),
                ep("10.1.0.4", 53),
            ],
        ),
    ];
    for (what, port, protocol, want) in cases {
        assert_eq!(
            endpoints_at(&desired, "10.96.0.10", port, protocol),
            Some(want),
            "{what}"
        );
    }
    let name = desired
        .get(&frontend("10.96.0.10", 80, Protocol::Tcp))
        .map(|sp| sp.name.clone());
    let want = ServicePortName {
        namespace: "shop".into(),
        name: "web".into(),
        port: "http".into(),
    };
    assert_eq!(name, Some(want), "service port name");
}

const PLAIN_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: shop
spec:
  clusterIP: 10.96.0.20
  ports:
    - name: sql
      port: 5432
    - name: stats
      port: 9187
      targetPort: 9999
"#;

#[test]
fn selectorless_service_from_endpoints() {
    let endpoints = r#"
apiVersion: v1
kind: Endpoints
metadata:
  name: db
  namespace: shop
subsets:
  - addresses:
      - ip: 192.168.1.1
      - ip: 192.168.1.2
    notReadyAddresses:
      - ip: 192.168.1.9
    ports:
      - name: sql
        port: 5432
      - name: stats
        port: 9187
  - addresses:
      - ip: 192.168.1.3
    ports:
      - name: sql
        port: 6432
"#;
    let (desired, warnings) = desired(
        "endpoints",
        &[("db.yaml", &format!("{PLAIN_SERVICE}---{endpoints}"))],
    );
    let cases = [
        (
            "sql: addresses x ports of every subset, notReadyAddresses unused",
            5432,
            vec![
                ep("192.168.1.1", 5432),
                ep("192.168.1.2", 5432),
                ep("192.168.1.3", 6432),
            ],
        ),
        (
            "stats: endpoint port taken as is; targetPort is for selectors",
            9187,
            vec![ep("192.168.1.1", 9187), ep("192.168.1.2", 9187)],
        ),
    ];
    for (what, port, want) in cases {
        assert_eq!(
            endpoints_at(&desired, "10.96.0.20", port, Protocol::Tcp),
            Some(want),
            "{what}"
        );
    }
    assert!(warnings.is_empty(), "no warnings expected, got {warnings:?}");
}

#[test]
fn selectorless_service_from_slices_split_by_port() {
    let slices = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-sql
  namespace: shop
  labels:
    kubernetes.io/service-name: db
addressType: IPv4
ports:
  - name: sql
    port: 5432
    protocol: TCP
endpoints:
  - addresses: ["192.168.2.1"]
    conditions: {ready: true}
  - addresses: ["192.168.2.2"]
    conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-stats
  namespace: shop
  labels:
    kubernetes.io/service-name: db
addressType: IPv4
ports:
  - name: stats
    port: 9000
endpoints:
  - addresses: ["192.168.2.3"]
    conditions: {ready: false, serving: true, terminating: true}
  - addresses: ["192.168.2.4"]
    conditions: {ready: false, serving: false, terminating: true}
"#;
    let (desired, warnings) = desired("slices", &[("db.yaml", PLAIN_SERVICE), ("slices.yaml", slices)]);
    let cases = [
        ("sql: ready endpoint only", 5432, vec![ep("192.168.2.1", 5432)]),
        (
            "stats: none ready, so the serving terminating one",
            9187,
            vec![ep("192.168.2.3", 9000)],
        ),
    ];
    for (what, port, want) in cases {
        assert_eq!(
            endpoints_at(&desired, "10.96.0.20", port, Protocol::Tcp),
            Some(want),
            "{what}"
        );
    }
    assert!(warnings.is_empty(), "no warnings expected, got {warnings:?}");
}

#[test]
fn warnings_name_the_object() {
    let orphan = r#"
apiVersion: v1
kind: Endpoints
metadata: {name: ghost, namespace: shop}
subsets: [{addresses: [{ip: 192.168.1.1}], ports: [{port: 80}]}]
"#;
    let shadowed = r#"
apiVersion: v1
kind: Endpoints
metadata: {name: web, namespace: shop}
subsets: [{addresses: [{ip: 192.168.1.1}], ports: [{name: http, port: 80}]}]
"#;
    let bad_port_endpoints = r#"
apiVersion: v1
kind: Endpoints
metadata: {name: db, namespace: shop}
subsets: [{addresses: [{ip: 192.168.1.1}], ports: [{name: sql, port: 5432}, {name: mysql, port: 3306}]}]
"#;
    let bad_port_slice = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-x
  namespace: shop
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: sql, port: 5432, protocol: UDP}]
endpoints: [{addresses: [192.168.1.5]}]
"#;
    let extra = |kind, object_name| object(kind, "shop", object_name, "warnings", "extra.yaml");
    let cases = [
        (
            "Endpoints without Service",
            orphan,
            Warning::NoSuchService {
                object: extra(ObjectKind::Endpoints, "ghost"),
                service: name("shop", "ghost"),
            },
            "Endpoints shop/ghost (",
            "no Service shop/ghost",
        ),
        (
            "Endpoints of a selector Service",
            shadowed,
            Warning::EndpointsOfSelectorService {
                endpoints: extra(ObjectKind::Endpoints, "web"),
                service: name("shop", "web"),
            },
            "Endpoints shop/web (",
            "has a selector",
        ),
        (
            "Endpoints port name unknown",
            bad_port_endpoints,
            Warning::UnmatchedPort {
                object: extra(ObjectKind::Endpoints, "db"),
                port_name: "mysql".into(),
                protocol: "TCP".into(),
                service: name("shop", "db"),
            },
            "Endpoints shop/db (",
            "\"mysql\" (TCP) matches no port",
        ),
        (
            "EndpointSlice port unknown",
            bad_port_slice,
            Warning::UnmatchedPort {
                object: extra(ObjectKind::EndpointSlice, "db-x"),
                port_name: "sql".into(),
                protocol: "UDP".into(),
                service: name("shop", "db"),
            },
            "EndpointSlice shop/db-x (",
            "\"sql\" (UDP) matches no port",
        ),
    ];
    for (what, extra, want, named, field) in cases {
        let (desired, warnings) = desired(
            "warnings",
            &[
                ("svc.yaml", &format!("{WEB_SERVICE}---{PLAIN_SERVICE}")),
                ("extra.yaml", extra),
            ],
        );
        assert_eq!(warnings, [want], "{what}: exactly this warning");
        // What the log shows names the object, its file and the field at fault.
        let text = warnings[0].to_string();
        for needle in [named, "extra.yaml", field] {
            assert!(
                text.contains(needle),
                "{what}: warning {text:?} should say {needle:?}"
            );
        }
        assert_eq!(
            endpoints_at(&desired, "10.96.0.10", 80, Protocol::Tcp),
            Some(vec![]),
            "{what}: hand-written Endpoints never feed a selector Service"
        );
    }
}

fn service(name: &str, spec: &str) -> String {
    format!("---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: apps\nspec:\n{spec}")
}

#[test]
fn cluster_ips_are_allocated_stably_inside_the_cidr() {
    let mut services: Vec<String> = (0..12)
        .map(|i| service(&format!("svc{i}"), "  ports: [{port: 80}]\n"))
        .collect();
    services.push(service(
        "fixed",
        "  clusterIP: 10.96.7.1\n  ports: [{port: 80}]\n",
    ));
    let cidr: Ipv4Cidr = "10.96.7.0/28".parse().expect("test CIDR");
    let first_half = services[..6].concat();
    let second_half = services[6..].concat();

    let layouts = [
        [("a.yaml", first_half.as_str()), ("b.yaml", second_half.as_str())],
        [("a.yaml", second_half.as_str()), ("b.yaml", first_half.as_str())],
    ];
    let mut results = Vec::new();
    for (i, files) in layouts.iter().enumerate() {
        let store = load("alloc", files);
        let (one, warnings) = store.desired(cidr);
        let (two, _) = store.desired(cidr);
        assert_eq!(one, two, "layout {i}: same result when asked twice");
        assert!(
            warnings.is_empty(),
            "layout {i}: no warnings expected, got {warnings:?}"
        );
        results.push(one);
    }
    assert_eq!(
        results[0], results[1],
        "independent of which file holds which Service"
    );

    let ips: Vec<Ipv4Addr> = results[0].keys().map(|f| f.addr).collect();
    let distinct: BTreeSet<Ipv4Addr> = ips.iter().copied().collect();
    assert_eq!(distinct.len(), 13, "every Service has its own address: {ips:?}");
    for ip in &ips {
        assert!(cidr.contains(*ip), "{ip} inside {cidr}");
        assert_ne!(*ip, Ipv4Addr::new(10, 96, 7, 0), "network address skipped");
        assert_ne!(*ip, Ipv4Addr::new(10, 96, 7, 15), "last address skipped");
    }
    let fixed = results[0].values().filter(|sp| sp.name.name == "fixed").count();
    assert_eq!(fixed, 1, "explicit clusterIP kept");
    assert!(
        results[0]
            .get(&frontend("10.96.7.1", 80, Protocol::Tcp))
            .is_some_and(|sp| sp.name.name == "fixed"),
        "explicit clusterIP never handed to another Service"
    );
}

#[test]
fn cluster_ip_allocation_runs_out() {
    let services: String = ["a", "b", "c"]
        .map(|n| service(n, "  ports: [{port: 80}]\n"))
        .concat();
    let cidr: Ipv4Cidr = "10.96.7.0/30".parse().expect("test CIDR");
    let (desired, warnings) = load("exhausted", &[("s.yaml", &services)]).desired(cidr);
    let ips: BTreeSet<Ipv4Addr> = desired.keys().map(|f| f.addr).collect();
    let want: BTreeSet<Ipv4Addr> = [Ipv4Addr::new(10, 96, 7, 1), Ipv4Addr::new(10, 96, 7, 2)].into();
    assert_eq!(ips, want, "the two usable addresses of a /30 are used");
    assert!(
        matches!(
            warnings.as_slice(),
            [Warning::ServiceCidrFull { service, service_cidr }]
                if service.kind == ObjectKind::Service && service.name.namespace == "apps" && *service_cidr == cidr
        ),
        "one Service left without an address: {warnings:?}"
    );
}

#[test]
fn what_is_programmed() {
    let sctp = Warning::SctpPort {
        service: object(ObjectKind::Service, "apps", "m", "programmed", "s.yaml"),
        port: 36412,
    };
    let cases: &[(&str, String, Vec<Frontend>, Option<Warning>)] = &[
        (
            "headless",
            service(
                "h",
                "  clusterIP: None\n  selector: {app: x}\n  ports: [{port: 80}]\n",
            ),
            vec![],
            None,
        ),
        (
            "ExternalName",
            service(
                "e",
                "  type: ExternalName\n  externalName: db.example.com\n  ports: [{port: 80}]\n",
            ),
            vec![],
            None,
        ),
        (
            "TCP and UDP, not SCTP",
            service(
                "m",
                "  clusterIP: 10.96.0.30\n  ports:\n  - {name: a, port: 53, protocol: UDP}\n  - {name: b, port: 53}\n  - {name: c, port: 36412, protocol: SCTP}\n",
            ),
            vec![
                frontend("10.96.0.30", 53, Protocol::Tcp),
                frontend("10.96.0.30", 53, Protocol::Udp),
            ],
            Some(sctp),
        ),
        (
            "explicit clusterIP outside the CIDR",
            service("o", "  clusterIP: 172.16.0.1\n  ports: [{port: 80}]\n"),
            vec![frontend("172.16.0.1", 80, Protocol::Tcp)],
            None,
        ),
        (
            "NodePort has a cluster IP too",
            service(
                "n",
                "  type: NodePort\n  clusterIP: 10.96.0.31\n  ports: [{port: 80, nodePort: 30080}]\n",
            ),
            vec![frontend("10.96.0.31", 80, Protocol::Tcp)],
            None,
        ),
    ];
    for (what, yaml, want, warning) in cases {
        let (desired, warnings) = desired("programmed", &[("s.yaml", yaml)]);
        let got: Vec<Frontend> = desired.keys().copied().collect();
        assert_eq!(&got, want, "{what}: frontends");
        assert!(
            desired.values().all(|sp| sp.endpoints.is_empty()),
            "{what}: no endpoints, yet still programmed (to refuse)"
        );
        assert_eq!(
            warnings,
            warning.iter().cloned().collect::<Vec<_>>(),
            "{what}: warnings"
        );
    }
}

#[test]
fn documents_and_files() {
    let mixed = r#"
# a comment-only document
---
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec: {}
---
apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: knative, namespace: shop}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cfg}
data: {a: b}
---
"#;
    let json = r#"{
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "json", "namespace": "shop"},
    "spec": {"clusterIP": "10.96.0.40", "ports": [{"port": 443, "targetPort": 8443}]}
}"#;
    let store = load(
        "documents",
        &[
            ("mixed.yml", mixed),
            ("svc.json", json),
            ("web.yaml", WEB_SERVICE),
            ("notes.txt", "not: [a manifest"),
            (".hidden.yaml", "not: [a manifest"),
        ],
    );
    let (desired, warnings) = store.desired(cidr());
    let services: BTreeSet<String> = desired.values().map(|sp| sp.name.name.clone()).collect();
    let want: BTreeSet<String> = ["json".to_owned(), "web".to_owned()].into();
    assert_eq!(
        services, want,
        "only v1 Services from *.yaml/*.yml/*.json; other kinds and files skipped"
    );
    assert!(warnings.is_empty(), "no warnings expected, got {warnings:?}");
}

#[test]
fn errors_name_file_object_and_field() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "malformed YAML",
            "apiVersion: v1\nkind: Service\nmetadata: {name: [x\n",
            &["bad.yaml", "document 1", "line"],
        ),
        (
            "wrong type",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports:\n  - port: eighty\n",
            &["bad.yaml", "Service shop/web", "spec.ports[0].port", "line 6"],
        ),
        (
            "port out of range",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: 70000}]}\n",
            &["bad.yaml", "Service shop/web", "spec.ports[0].port", "70000"],
        ),
        (
            "protocol",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, protocol: ICMP}]}\n",
            &["Service default/web", "spec.ports[0].protocol", "ICMP"],
        ),
        (
            "clusterIP",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.300, ports: [{port: 80}]}\n",
            &["Service default/web", "spec.clusterIP", "10.96.0.300"],
        ),
        (
            "targetPort number",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, targetPort: 65536}]}\n",
            &["Service default/web", "spec.ports[0].targetPort", "65536"],
        ),
        (
            "targetPort name",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, targetPort: Web_Port}]}\n",
            &["Service default/web", "spec.ports[0].targetPort", "Web_Port"],
        ),
        (
            "unnamed ports",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}, {name: b, port: 81}]}\n",
            &["Service default/web", "spec.ports[0].name", "more than one port"],
        ),
        (
            "internalTrafficPolicy",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {internalTrafficPolicy: local, ports: [{port: 80}]}\n",
            &[
                "Service default/web",
                "spec.internalTrafficPolicy",
                "Cluster, Local",
                "\"local\"",
            ],
        ),
        (
            "trafficDistribution",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {trafficDistribution: Nearby, ports: [{port: 80}]}\n",
            &[
                "Service default/web",
                "spec.trafficDistribution",
                "PreferClose",
                "Nearby",
            ],
        ),
        (
            "sessionAffinity",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {sessionAffinity: Sticky, ports: [{port: 80}]}\n",
            &["Service default/web", "spec.sessionAffinity", "Sticky"],
        ),
        (
            "affinity timeout",
            "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}, ports: [{port: 80}]}\n",
            &[
                "Service default/web",
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                "got 0",
            ],
        ),
        (
            "pod IP",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: shop}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 10.1.2}\n",
            &["Pod shop/p", "status.podIP", "10.1.2"],
        ),
        (
            "slice address",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: [{addresses: [\"fd00::1\"]}]\n",
            &["EndpointSlice default/s", "endpoints[0].addresses[0]"],
        ),
        (
            "missing name",
            "apiVersion: v1\nkind: Service\nspec: {ports: [{port: 80}]}\n",
            &["Service in document 1", "metadata.name"],
        ),
        (
            "missing kind",
            "apiVersion: v1\nmetadata: {name: x}\n",
            &["bad.yaml", "document 1", "kind"],
        ),
        (
            "not an object",
            "- just\n- a list\n",
            &["bad.yaml", "document 1", "expected a Kubernetes object"],
        ),
        (
            "second document",
            "apiVersion: v1\nkind: Service\nmetadata: {name: ok}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 0}]}\n",
            &["Service default/web", "spec.ports[0].port"],
        ),
    ];
    for (what, text, needles) in cases {
        let dir = Dir::new("errors");
        dir.write("bad.yaml", text);
        let mut store = ManifestStore::default();
        let errors = store.reload(&dir.0);
        assert_eq!(errors.len(), 1, "{what}: one error expected, got {errors:#?}");
        let message = errors[0].to_string();
        for needle in *needles {
            assert!(
                message.contains(needle),
                "{what}: {message:?} should contain {needle:?}"
            );
        }
        assert!(
            store.desired(cidr()).0.is_empty(),
            "{what}: nothing from an invalid file"
        );
    }
}

enum Action<'a> {
    Write(&'a str, &'a str),
    Remove(&'a str),
}

#[test]
fn last_good_state_is_kept_and_vanished_files_dropped() {
    use Action::{Remove, Write};
    let dir = Dir::new("lifecycle");
    let mut store = ManifestStore::default();
    let broken_web = WEB_SERVICE.replace("port: 80\n", "port: 80000\n");
    // (what, actions, expected errors, web programmed, db programmed)
    let steps: &[(&str, &[Action], usize, bool, bool)] = &[
        (
            "both files good",
            &[Write("web.yaml", WEB_SERVICE), Write("db.yaml", PLAIN_SERVICE)],
            0,
            true,
            true,
        ),
        (
            "web.yaml becomes invalid: its last good state stays",
            &[Write("web.yaml", &broken_web)],
            1,
            true,
            true,
        ),
        (
            "web.yaml becomes unparseable: still kept",
            &[Write("web.yaml", "kind: [\n")],
            1,
            true,
            true,
        ),
        ("db.yaml removed: dropped", &[Remove("db.yaml")], 1, true, false),
        (
            "web.yaml removed while broken: dropped",
            &[Remove("web.yaml")],
            0,
            false,
            false,
        ),
    ];
    for (what, actions, want_errors, want_web, want_db) in steps {
        for action in *actions {
            match action {
                Write(file, text) => dir.write(file, text),
                Remove(file) => dir.remove(file),
            }
        }
        let errors = store.reload(&dir.0);
        assert_eq!(errors.len(), *want_errors, "{what}: errors {errors:#?}");
        for error in &errors {
            assert!(
                error.to_string().contains("web.yaml"),
                "{what}: {error} names the file"
            );
        }
        let (desired, _) = store.desired(cidr());
        assert_eq!(
            endpoints_at(&desired, "10.96.0.10", 80, Protocol::Tcp).is_some(),
            *want_web,
            "{what}: web programmed"
        );
        assert_eq!(
            endpoints_at(&desired, "10.96.0.20", 5432, Protocol::Tcp).is_some(),
            *want_db,
            "{what}: db programmed"
        );
    }

    dir.write("web.yaml", WEB_SERVICE);
    assert!(store.reload(&dir.0).is_empty(), "web.yaml good again");
    let errors = store.reload(&dir.0.join("nope"));
    assert!(
        matches!(errors.as_slice(), [ManifestError::ListDir { .. }]),
        "a missing directory is reported: {errors:#?}"
    );
    let (desired, _) = store.desired(cidr());
    assert!(
        endpoints_at(&desired, "10.96.0.10", 80, Protocol::Tcp).is_some(),
        "an unlistable directory changes nothing"
    );
}

#[test]
fn duplicate_definitions_and_frontends_warn() {
    let copy = WEB_SERVICE.replace("targetPort: web", "targetPort: 8080");
    let clash = WEB_SERVICE.replace("name: web\n", "name: web2\n");
    let file = |file| scratch_path("duplicates").join(file);
    let cases = [
        (
            "same Service in two files: the later file wins",
            copy.as_str(),
            Warning::DefinedTwice {
                object: object(ObjectKind::Service, "shop", "web", "duplicates", "b.yaml"),
                earlier: file("a.yaml"),
            },
            1,
            8080,
        ),
        (
            "two Services on one frontend: the first keeps it",
            clash.as_str(),
            Warning::FrontendTaken {
                service: object(ObjectKind::Service, "shop", "web2", "duplicates", "b.yaml"),
                frontend: frontend("10.96.0.10", 80, Protocol::Tcp),
                holder: name("shop", "web"),
            },
            3,
            9000,
        ),
    ];
    for (what, second, warning, count, port) in cases {
        let pod = pod("a", Some("10.1.0.1"), "Running", "True", &[("web", 9000, "TCP")]);
        let (desired, warnings) = desired(
            "duplicates",
            &[("a.yaml", WEB_SERVICE), ("b.yaml", second), ("p.yaml", &pod)],
        );
        assert_eq!(warnings.len(), count, "{what}: warnings {warnings:?}");
        assert!(
            warnings.contains(&warning),
            "{what}: {warnings:?} should hold {warning:?}"
        );
        let want = vec![ep("10.1.0.1", port)];
        assert_eq!(
            endpoints_at(&desired, "10.96.0.10", 80, Protocol::Tcp),
            Some(want),
            "{what}"
        );
    }
}

#[test]
fn selector_service_endpoints_follow_pod_state() {
    let terminating = pod("t", Some("10.1.0.9"), "Running", "True", &[("web", 8080, "TCP")]).replace(
        "  namespace: shop\n",
        "  namespace: shop\n  deletionTimestamp: \"2025-01-01T00:00:00Z\"\n",
    );
    let ready = pod("r", Some("10.1.0.1"), "Running", "True", &[("web", 8080, "TCP")]);
    let unready = pod("u", Some("10.1.0.2"), "Running", "False", &[("web", 8080, "TCP")]);
    let publish = WEB_SERVICE.replace("  selector:", "  publishNotReadyAddresses: true\n  selector:");
    let cases = [
        (
            "terminating ignored while another is ready",
            WEB_SERVICE,
            vec![&ready, &terminating],
            vec![ep("10.1.0.1", 8080)],
        ),
        (
            "terminating but serving used when nothing is ready",
            WEB_SERVICE,
            vec![&unready, &terminating],
            vec![ep("10.1.0.9", 8080)],
        ),
        (
            "publishNotReadyAddresses",
            publish.as_str(),
            vec![&unready],
            vec![ep("10.1.0.2", 8080)],
        ),
    ];
    for (what, svc, pods, want) in cases {
        let pods: String = pods.into_iter().map(String::as_str).collect();
        let (desired, _) = desired("podstate", &[("svc.yaml", svc), ("pods.yaml", &pods)]);
        assert_eq!(
            endpoints_at(&desired, "10.96.0.10", 80, Protocol::Tcp),
            Some(want),
            "{what}"
        );
    }
}

/// A Node manifest, with its zone label when `zone` is given.
fn node(name: &str, zone: Option<&str>) -> String {
    let labels = zone
        .map(|z| format!("  labels: {{topology.kubernetes.io/zone: {z}}}\n"))
        .unwrap_or_default();
    format!("---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n{labels}")
}

/// A running, ready web Pod scheduled on `node`.
fn pod_on(name: &str, ip: &str, node: &str) -> String {
    pod(name, Some(ip), "Running", "True", &[("web", 8080, "TCP")]).replace(
        "spec:\n  containers:",
        &format!("spec:\n  nodeName: {node}\n  containers:"),
    )
}

/// What agents on different nodes program for the metrics port of `service`
/// (10.96.0.10:9100), from the same manifests.
fn per_node(test: &str, service: &str, objects: &str, nodes: &[(Option<&str>, Vec<Endpoint>, NoEndpoints)]) {
    let files = [("svc.yaml", service), ("objects.yaml", objects)];
    for (node_name, want, want_verdict) in nodes {
        let mut store = load(test, &files);
        store.set_node_name(node_name.map(str::to_owned));
        let (desired, warnings) = store.desired(cidr());
        assert!(
            warnings.is_empty(),
            "{test}: no warnings expected, got {warnings:?}"
        );
        let port = desired
            .get(&frontend("10.96.0.10", 9100, Protocol::Tcp))
            .unwrap_or_else(|| panic!("{test}: the port is programmed"));
        assert_eq!(&port.endpoints, want, "{test}: endpoints on node {node_name:?}");
        assert_eq!(
            port.no_endpoints, *want_verdict,
            "{test}: without endpoints, on node {node_name:?}"
        );
    }
}

#[test]
fn internal_traffic_policy_local_keeps_to_the_pods_of_this_node() {
    let service = WEB_SERVICE.replace(
        "  clusterIP: 10.96.0.10\n",
        "  clusterIP: 10.96.0.10\n  internalTrafficPolicy: Local\n",
    );
    let objects = [
        pod_on("a", "10.1.0.1", "node-1"),
        pod_on("b", "10.1.0.2", "node-2"),
    ]
    .concat();
    per_node(
        "itp-local",
        &service,
        &objects,
        &[
            (Some("node-1"), vec![ep("10.1.0.1", 9101)], NoEndpoints::Reject),
            (Some("node-2"), vec![ep("10.1.0.2", 9101)], NoEndpoints::Reject),
            (Some("node-3"), vec![], NoEndpoints::Drop),
            (None, vec![], NoEndpoints::Drop),
        ],
    );
    // Without the policy every node uses both.
    per_node(
        "itp-cluster",
        WEB_SERVICE,
        &objects,
        &[(
            Some("node-3"),
            vec![ep("10.1.0.1", 9101), ep("10.1.0.2", 9101)],
            NoEndpoints::Reject,
        )],
    );
}

#[test]
fn traffic_distribution_hints_come_from_the_nodes_zones() {
    let nodes = [
        node("node-1", Some("zone-a")),
        node("node-2", Some("zone-b")),
        node("node-3", Some("zone-a")),
        node("node-4", None),
    ]
    .concat();
    let pods = [
        pod_on("a", "10.1.0.1", "node-1"),
        pod_on("b", "10.1.0.2", "node-2"),
    ]
    .concat();
    let objects = format!("{nodes}{pods}");
    let both = vec![ep("10.1.0.1", 9101), ep("10.1.0.2", 9101)];
    let with = |distribution: &str| {
        WEB_SERVICE.replace(
            "  clusterIP: 10.96.0.10\n",
            &format!("  clusterIP: 10.96.0.10\n  trafficDistribution: {distribution}\n"),
        )
    };
    for distribution in ["PreferClose", "PreferSameZone"] {
        per_node(
            distribution,
            &with(distribution),
            &objects,
            &[
                (Some("node-1"), vec![ep("10.1.0.1", 9101)], NoEndpoints::Reject),
                (Some("node-3"), vec![ep("10.1.0.1", 9101)], NoEndpoints::Reject),
                (Some("node-2"), vec![ep("10.1.0.2", 9101)], NoEndpoints::Reject),
                // No zone label, or no Node object: no zone to prefer.
                (Some("node-4"), both.clone(), NoEndpoints::Reject),
                (Some("node-9"), both.clone(), NoEndpoints::Reject),
            ],
        );
    }
    per_node(
        "PreferSameNode",
        &with("PreferSameNode"),
        &objects,
        &[
            (Some("node-2"), vec![ep("10.1.0.2", 9101)], NoEndpoints::Reject),
            // No endpoint on node-3: its zone's.
            (Some("node-3"), vec![ep("10.1.0.1", 9101)], NoEndpoints::Reject),
            (Some("node-4"), both.clone(), NoEndpoints::Reject),
        ],
    );
    per_node(
        "no trafficDistribution",
        WEB_SERVICE,
        &objects,
        &[(Some("node-1"), both.clone(), NoEndpoints::Reject)],
    );
    // A ready Pod on a node without a zone gets no hint, so no node filters.
    let unzoned = format!("{nodes}{pods}{}", pod_on("c", "10.1.0.3", "node-4"));
    per_node(
        "an endpoint without a zone",
        &with("PreferClose"),
        &unzoned,
        &[(
            Some("node-1"),
            vec![ep("10.1.0.1", 9101), ep("10.1.0.2", 9101), ep("10.1.0.3", 9101)],
            NoEndpoints::Reject,
        )],
    );
}

#[test]
fn a_node_defined_twice_is_named_without_a_namespace() {
    let (_, warnings) = desired(
        "node-twice",
        &[
            ("a.yaml", &node("node-1", Some("zone-a"))),
            ("b.yaml", &node("node-1", Some("zone-b"))),
        ],
    );
    let messages: Vec<String> = warnings.iter().map(ToString::to_string).collect();
    assert_eq!(messages.len(), 1, "one warning: {messages:?}");
    assert!(
        messages[0].starts_with("Node node-1 (") && messages[0].contains("also defined in"),
        "the Node is named as kubectl names it: {messages:?}"
    );
}
