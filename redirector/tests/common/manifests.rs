//! The manifests the end-to-end tests write most: `app: web` Pods, the
//! Services selecting them, and `default/kubernetes`.

use std::net::Ipv4Addr;

/// A running, ready `app: web` Pod at `addr` serving `http` on 8080, on
/// node `node-N` when `node` is given.
pub fn web_pod(name: &str, addr: Ipv4Addr, node: Option<usize>) -> String {
    let node_name = node.map_or_else(String::new, |n| format!("\n  nodeName: node-{n}"));
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels:
    app: web
spec:{node_name}
  containers:
  - name: web
    ports:
    - name: http
      containerPort: 8080
status:
  phase: Running
  podIP: {addr}
  conditions:
  - type: Ready
    status: \"True\"
"
    )
}

/// A Service `name` at `cluster_ip` selecting `app: web`: `http` 80 → 8080
/// over TCP and `dns` 53 → 8080 over UDP.
pub fn web_service(name: &str, cluster_ip: Ipv4Addr) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  clusterIP: {cluster_ip}
  selector:
    app: web
  ports:
  - name: http
    port: 80
    targetPort: 8080
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 8080
"
    )
}

/// default/kubernetes, served by a process on node 0's own address (as
/// kube-apiserver is on a control-plane node), through a selectorless
/// Service and its EndpointSlice.
pub const KUBERNETES_SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: kubernetes
  namespace: default
spec:
  clusterIP: 10.96.0.1
  ports:
  - name: https
    port: 443
    targetPort: 6443
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  namespace: default
  labels:
    kubernetes.io/service-name: kubernetes
addressType: IPv4
ports:
- name: https
  port: 6443
  protocol: TCP
endpoints:
- addresses:
  - 192.0.2.11
";
