//! Checks the Kubernetes manifests in `deploy/`: every document parses into
//! its k8s-openapi type with no field the API would drop, the RBAC grants
//! exactly read access to Services, EndpointSlices and ServiceCIDRs, and the
//! DaemonSet runs the agent the way the README describes (host network, not
//! privileged, only the datapath's capabilities, bpffs from the host,
//! kube-proxy's /livez and /healthz).

use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, Namespace, PodSpec, Probe, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::de::DeserializeOwned;

const DEPLOY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
const NAMESPACE: &str = "redirector-system";
const SERVICE_ACCOUNT: &str = "redirector";
const CLUSTER_ROLE: &str = "redirector";
const CONTAINER: &str = "redirector";
const BPFFS: &str = "/sys/fs/bpf";
/// Where the DaemonSet mounts the host's cgroup v2 hierarchy (`--cgroup-root`).
const CGROUP: &str = "/host/sys/fs/cgroup";
/// What each probe asks: liveness only whether the sync loop keeps up, so a
/// Service that does not fit the maps never crash-loops the agents.
const LIVENESS_PATH: &str = "/livez";
const READINESS_PATH: &str = "/healthz";
const HEALTHZ_PORT: i32 = 10256;

/// A parsed manifest object, by kind.
enum Object {
    Namespace(Box<Namespace>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    DaemonSet(Box<DaemonSet>),
}

impl Object {
    fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::DaemonSet(_) => "DaemonSet",
        }
    }

    fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(o) => &o.metadata,
            Object::ServiceAccount(o) => &o.metadata,
            Object::ClusterRole(o) => &o.metadata,
            Object::ClusterRoleBinding(o) => &o.metadata,
            Object::DaemonSet(o) => &o.metadata,
        }
    }

    /// The object as the API would store it: only the fields its type knows.
    fn to_json(&self) -> serde_json::Value {
        let value = match self {
            Object::Namespace(o) => serde_json::to_value(o),
            Object::ServiceAccount(o) => serde_json::to_value(o),
            Object::ClusterRole(o) => serde_json::to_value(o),
            Object::ClusterRoleBinding(o) => serde_json::to_value(o),
            Object::DaemonSet(o) => serde_json::to_value(o),
        };
        value.expect("k8s-openapi objects serialize to JSON")
    }
}

/// One document of one file in `deploy/`.
struct Doc {
    file: String,
    /// 1-based position of the document in its file.
    index: usize,
    /// The document as written.
    raw: serde_json::Value,
    object: Object,
}

impl fmt::Display for Doc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.object.metadata().name.as_deref().unwrap_or("<no name>");
        write!(
            f,
            "deploy/{} document {} ({} {name})",
            self.file,
            self.index,
            self.object.kind()
        )
    }
}

fn parse_as<T: DeserializeOwned>(
    value: yaml_serde::Value,
    wrap: fn(Box<T>) -> Object,
) -> Result<Object, yaml_serde::Error> {
    yaml_serde::from_value::<T>(value).map(|o| wrap(Box::new(o)))
}

/// Parses one document; the error names what is wrong but not where.
fn parse_document(value: yaml_serde::Value) -> Result<Object, String> {
    let kind = value
        .get("kind")
        .and_then(yaml_serde::Value::as_str)
        .ok_or("no string `kind`")?
        .to_owned();
    let parsed = match kind.as_str() {
        "Namespace" => parse_as(value, Object::Namespace),
        "ServiceAccount" => parse_as(value, Object::ServiceAccount),
        "ClusterRole" => parse_as(value, Object::ClusterRole),
        "ClusterRoleBinding" => parse_as(value, Object::ClusterRoleBinding),
        "DaemonSet" => parse_as(value, Object::DaemonSet),
        other => return Err(format!("unexpected kind {other:?}")),
    };
    parsed.map_err(|e| format!("not a valid {kind}: {e}"))
}

/// Every document of every `*.yaml`/`*.yml` file in `deploy/`, in file order;
/// the error names each file and document that could not be parsed.
fn load() -> Result<Vec<Doc>, String> {
    let dir = Path::new(DEPLOY_DIR);
    let entries = std::fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| format!("reading {}: {e}", dir.display()))?
            .path();
        if path.extension().is_some_and(|ext| ext == "yaml" || ext == "yml") {
            files.push(path);
        }
    }
    files.sort();

    let mut docs = Vec::new();
    let mut errors = Vec::new();
    for path in &files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => {
                errors.push(format!("deploy/{file}: {e}"));
                continue;
            }
        };
        for (i, document) in yaml_serde::Deserializer::from_str(&text).enumerate() {
            let index = i + 1;
            let at = format!("deploy/{file} document {index}");
            let value = match yaml_serde::Value::deserialize(document) {
                Ok(yaml_serde::Value::Null) => continue, // empty document (e.g. a trailing `---`)
                Ok(value) => value,
                Err(e) => {
                    errors.push(format!("{at}: not YAML: {e}"));
                    // A syntax error ends the stream: later documents are not reachable.
                    break;
                }
            };
            let raw = match serde_json::to_value(&value) {
                Ok(raw) => raw,
                Err(e) => {
                    errors.push(format!("{at}: not representable as JSON: {e}"));
                    continue;
                }
            };
            match parse_document(value) {
                Ok(object) => docs.push(Doc {
                    file: file.clone(),
                    index,
                    raw,
                    object,
                }),
                Err(e) => errors.push(format!("{at}: {e}")),
            }
        }
    }
    if files.is_empty() {
        errors.push(format!("no YAML files in {}", dir.display()));
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors.join("\n"))
    }
}

fn docs() -> Vec<Doc> {
    load().unwrap_or_else(|e| panic!("deploy/ does not parse:\n{e}"))
}

/// The single object of a kind; panics naming the kind if there is not exactly one.
fn the<'a, T>(docs: &'a [Doc], kind: &str, pick: fn(&Object) -> Option<&T>) -> (&'a Doc, &'a T) {
    let found: Vec<(&Doc, &T)> = docs
        .iter()
        .filter_map(|d| pick(&d.object).map(|o| (d, o)))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "deploy/ must hold exactly one {kind}; found: {:?}",
        found.iter().map(|(d, _)| d.to_string()).collect::<Vec<_>>()
    );
    found[0]
}

fn cluster_role(docs: &[Doc]) -> (&Doc, &ClusterRole) {
    the(docs, "ClusterRole", |o| match o {
        Object::ClusterRole(r) => Some(&**r),
        _ => None,
    })
}

fn binding(docs: &[Doc]) -> (&Doc, &ClusterRoleBinding) {
    the(docs, "ClusterRoleBinding", |o| match o {
        Object::ClusterRoleBinding(b) => Some(&**b),
        _ => None,
    })
}

fn service_account(docs: &[Doc]) -> (&Doc, &ServiceAccount) {
    the(docs, "ServiceAccount", |o| match o {
        Object::ServiceAccount(s) => Some(&**s),
        _ => None,
    })
}

fn daemon_set(docs: &[Doc]) -> (&Doc, &DaemonSet) {
    the(docs, "DaemonSet", |o| match o {
        Object::DaemonSet(d) => Some(&**d),
        _ => None,
    })
}

fn pod_spec<'a>(doc: &Doc, ds: &'a DaemonSet) -> &'a PodSpec {
    ds.spec
        .template
        .spec
        .as_ref()
        .unwrap_or_else(|| panic!("{doc}: no spec.template.spec"))
}

fn container<'a>(doc: &Doc, ds: &'a DaemonSet) -> &'a Container {
    let containers = &pod_spec(doc, ds).containers;
    assert_eq!(
        containers.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        [CONTAINER],
        "{doc}: the pod must have the one container {CONTAINER:?}"
    );
    &containers[0]
}

/// Paths at which `written` and `stored` differ (fields the type does not
/// know are dropped when parsing, so they show up here).
fn differences(path: &str, written: &serde_json::Value, stored: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (written, stored) {
        (Value::Object(w), Value::Object(s)) => {
            let keys: BTreeSet<&String> = w.keys().chain(s.keys()).collect();
            for key in keys {
                let sub = format!("{path}.{key}");
                match (w.get(key), s.get(key)) {
                    (Some(wv), Some(sv)) => differences(&sub, wv, sv, out),
                    (Some(_), None) => out.push(format!("{sub}: not a field of this type (dropped)")),
                    (None, Some(sv)) => out.push(format!("{sub}: appears after parsing as {sv}")),
                    (None, None) => unreachable!(),
                }
            }
        }
        (Value::Array(w), Value::Array(s)) if w.len() == s.len() => {
            for (i, (wv, sv)) in w.iter().zip(s).enumerate() {
                differences(&format!("{path}[{i}]"), wv, sv, out);
            }
        }
        _ if written == stored => {}
        _ => out.push(format!("{path}: written {written}, parsed as {stored}")),
    }
}

fn strings(list: &Option<Vec<String>>) -> BTreeSet<&str> {
    list.iter().flatten().map(String::as_str).collect()
}

#[test]
fn every_file_holds_one_object_of_its_kind() {
    let docs = docs();
    let expected = [
        ("00-namespace.yaml", "Namespace"),
        ("01-serviceaccount.yaml", "ServiceAccount"),
        ("02-clusterrole.yaml", "ClusterRole"),
        ("03-clusterrolebinding.yaml", "ClusterRoleBinding"),
        ("04-daemonset.yaml", "DaemonSet"),
    ];
    let found: Vec<(&str, &str)> = docs.iter().map(|d| (d.file.as_str(), d.object.kind())).collect();
    assert_eq!(
        found, expected,
        "deploy/ files (in apply order) and the kind each holds"
    );
}

#[test]
fn no_field_is_unknown_to_the_api() {
    for doc in docs() {
        let mut diffs = Vec::new();
        differences("", &doc.raw, &doc.object.to_json(), &mut diffs);
        assert!(
            diffs.is_empty(),
            "{doc}: fields the API would not keep as written:\n{}",
            diffs.join("\n")
        );
    }
}

#[test]
fn every_object_is_in_the_redirector_namespace_unless_cluster_scoped() {
    let docs = docs();
    // kind, namespaced
    let scopes = [
        ("Namespace", false),
        ("ServiceAccount", true),
        ("ClusterRole", false),
        ("ClusterRoleBinding", false),
        ("DaemonSet", true),
    ];
    for doc in &docs {
        let (_, namespaced) = scopes
            .iter()
            .find(|(kind, _)| *kind == doc.object.kind())
            .unwrap_or_else(|| panic!("{doc}: no scope known for this kind"));
        let namespace = doc.object.metadata().namespace.as_deref();
        if *namespaced {
            assert_eq!(
                namespace,
                Some(NAMESPACE),
                "{doc}: namespaced object outside {NAMESPACE}"
            );
        } else {
            assert_eq!(namespace, None, "{doc}: cluster-scoped object with a namespace");
        }
    }
    let namespaces: Vec<&str> = docs
        .iter()
        .filter(|d| matches!(d.object, Object::Namespace(_)))
        .filter_map(|d| d.object.metadata().name.as_deref())
        .collect();
    assert_eq!(
        namespaces,
        [NAMESPACE],
        "deploy/ must create the namespace its objects live in"
    );
}

#[test]
fn cluster_role_grants_exactly_read_access_to_services_endpointslices_and_servicecidrs() {
    let docs = docs();
    let (doc, role) = cluster_role(&docs);
    assert_eq!(role.metadata.name.as_deref(), Some(CLUSTER_ROLE), "{doc}: name");
    assert!(
        role.aggregation_rule.is_none(),
        "{doc}: an aggregated role grants whatever it selects"
    );

    let read = ["get", "list", "watch"];
    // (API group, resource, verbs)
    let expected: BTreeSet<(&str, &str, BTreeSet<&str>)> = [
        ("", "services", read.into_iter().collect()),
        ("discovery.k8s.io", "endpointslices", read.into_iter().collect()),
        // Only listed and watched (the service ranges).
        (
            "networking.k8s.io",
            "servicecidrs",
            ["list", "watch"].into_iter().collect(),
        ),
        ("", "nodes", read.into_iter().collect()),
    ]
    .into_iter()
    .collect();

    let rules = role.rules.as_deref().unwrap_or_default();
    assert_eq!(rules.len(), expected.len(), "{doc}: number of rules");
    let mut granted = BTreeSet::new();
    for (i, rule) in rules.iter().enumerate() {
        assert!(
            strings(&rule.resource_names).is_empty(),
            "{doc}: rules[{i}] has resourceNames {:?}",
            rule.resource_names
        );
        assert!(
            strings(&rule.non_resource_urls).is_empty(),
            "{doc}: rules[{i}] has nonResourceURLs {:?}",
            rule.non_resource_urls
        );
        let lists = [
            ("apiGroups", strings(&rule.api_groups)),
            ("resources", strings(&rule.resources)),
            ("verbs", rule.verbs.iter().map(String::as_str).collect()),
        ];
        for (field, values) in &lists {
            assert!(!values.is_empty(), "{doc}: rules[{i}].{field} is empty");
            for value in values {
                assert!(
                    !value.contains('*'),
                    "{doc}: rules[{i}].{field} has the wildcard {value:?}"
                );
            }
        }
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        for group in strings(&rule.api_groups) {
            for resource in strings(&rule.resources) {
                granted.insert((group, resource, verbs.clone()));
            }
        }
    }
    assert_eq!(granted, expected, "{doc}: (apiGroup, resource, verbs) granted");
}

#[test]
fn binding_grants_the_role_to_the_service_account() {
    let docs = docs();
    let (role_doc, role) = cluster_role(&docs);
    let (sa_doc, sa) = service_account(&docs);
    let (doc, binding) = binding(&docs);

    assert_eq!(
        sa.metadata.name.as_deref(),
        Some(SERVICE_ACCOUNT),
        "{sa_doc}: name"
    );
    let role_ref = &binding.role_ref;
    let checks = [
        (
            "roleRef.apiGroup",
            role_ref.api_group.as_deref(),
            Some("rbac.authorization.k8s.io"),
        ),
        ("roleRef.kind", Some(role_ref.kind.as_str()), Some("ClusterRole")),
        (
            "roleRef.name",
            Some(role_ref.name.as_str()),
            role.metadata.name.as_deref(),
        ),
    ];
    for (field, actual, expected) in checks {
        assert_eq!(
            actual, expected,
            "{doc}: {field} must name the ClusterRole of {role_doc}"
        );
    }

    let subjects: Vec<(&str, &str, Option<&str>)> = binding
        .subjects
        .iter()
        .flatten()
        .map(|s| (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()))
        .collect();
    assert_eq!(
        subjects,
        [("ServiceAccount", SERVICE_ACCOUNT, Some(NAMESPACE))],
        "{doc}: subjects must be exactly the ServiceAccount of {sa_doc}"
    );
    assert_eq!(
        sa.metadata.namespace.as_deref(),
        Some(NAMESPACE),
        "{sa_doc}: namespace"
    );
}

#[test]
fn daemonset_runs_in_the_host_network_as_the_service_account() {
    let docs = docs();
    let (doc, ds) = daemon_set(&docs);
    let pod = pod_spec(doc, ds);
    let checks = [
        (
            "serviceAccountName",
            pod.service_account_name.as_deref(),
            Some(SERVICE_ACCOUNT),
        ),
        // The node's resolver: cluster DNS is a ClusterIP, and traffic the host
        // sends is not translated (the program is on tc ingress only).
        ("dnsPolicy", pod.dns_policy.as_deref(), Some("Default")),
        (
            "priorityClassName",
            pod.priority_class_name.as_deref(),
            Some("system-node-critical"),
        ),
    ];
    for (field, actual, expected) in checks {
        assert_eq!(actual, expected, "{doc}: spec.template.spec.{field}");
    }
    assert_eq!(
        pod.host_network,
        Some(true),
        "{doc}: spec.template.spec.hostNetwork"
    );
    for (field, value) in [("hostPID", pod.host_pid), ("hostIPC", pod.host_ipc)] {
        assert_ne!(
            value,
            Some(true),
            "{doc}: spec.template.spec.{field} is not needed"
        );
    }
    assert!(
        pod.tolerations
            .iter()
            .flatten()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "{doc}: must tolerate every taint (a toleration with only `operator: Exists`)"
    );

    let spec = &ds.spec;
    let selector = spec.selector.match_labels.as_ref();
    let labels = spec.template.metadata.as_ref().and_then(|m| m.labels.as_ref());
    assert!(
        selector.is_some_and(
            |sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        ),
        "{doc}: spec.selector.matchLabels {selector:?} must select the template's labels {labels:?}"
    );
    let strategy = spec.update_strategy.as_ref();
    assert_eq!(
        strategy.and_then(|s| s.type_.as_deref()),
        Some("RollingUpdate"),
        "{doc}: updateStrategy.type"
    );
    assert_eq!(
        strategy
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|r| r.max_unavailable.as_ref()),
        Some(&IntOrString::Int(1)),
        "{doc}: updateStrategy.rollingUpdate.maxUnavailable"
    );
}

#[test]
fn daemonset_is_not_privileged_and_adds_only_the_datapath_capabilities() {
    let docs = docs();
    let (doc, ds) = daemon_set(&docs);
    let c = container(doc, ds);
    let sc = c
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{doc}: container {CONTAINER} has no securityContext"));
    assert_ne!(sc.privileged, Some(true), "{doc}: securityContext.privileged");
    assert_eq!(
        sc.allow_privilege_escalation,
        Some(false),
        "{doc}: securityContext.allowPrivilegeEscalation"
    );
    assert_eq!(
        sc.read_only_root_filesystem,
        Some(true),
        "{doc}: securityContext.readOnlyRootFilesystem"
    );
    // Added capabilities are effective only for UID 0 (no file capabilities).
    assert_eq!(sc.run_as_user, Some(0), "{doc}: securityContext.runAsUser");

    let caps = sc
        .capabilities
        .as_ref()
        .unwrap_or_else(|| panic!("{doc}: securityContext.capabilities missing"));
    // field, as written, expected set
    let expected = [
        ("drop", &caps.drop, &["ALL"][..]),
        (
            "add",
            &caps.add,
            &["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN"][..],
        ),
    ];
    for (field, actual, wanted) in expected {
        let list: Vec<&str> = actual.iter().flatten().map(String::as_str).collect();
        let set: BTreeSet<&str> = list.iter().copied().collect();
        assert_eq!(
            list.len(),
            set.len(),
            "{doc}: capabilities.{field} has duplicates: {list:?}"
        );
        assert_eq!(
            set,
            wanted.iter().copied().collect(),
            "{doc}: capabilities.{field}"
        );
    }
}

#[test]
fn daemonset_mounts_the_hosts_bpffs() {
    let docs = docs();
    let (doc, ds) = daemon_set(&docs);
    let pod = pod_spec(doc, ds);
    let c = container(doc, ds);

    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == BPFFS)
        .unwrap_or_else(|| panic!("{doc}: nothing mounted at {BPFFS}"));
    assert_eq!(
        mount.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "{doc}: {BPFFS} mountPropagation"
    );
    assert_ne!(
        mount.read_only,
        Some(true),
        "{doc}: {BPFFS} must be writable (the agent pins maps)"
    );
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap_or_else(|| panic!("{doc}: no volume {:?} for {BPFFS}", mount.name));
    let host_path = volume
        .host_path
        .as_ref()
        .unwrap_or_else(|| panic!("{doc}: volume {:?} is not a hostPath", volume.name));
    assert_eq!(
        host_path.path, BPFFS,
        "{doc}: volume {:?} hostPath.path",
        volume.name
    );

    let mounts: Vec<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert_eq!(
        mounts,
        [BPFFS, CGROUP],
        "{doc}: the bpffs and the cgroup hierarchy are the only host paths the agent needs"
    );
    let cgroup = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == CGROUP)
        .expect("the cgroup mount");
    assert_eq!(cgroup.read_only, Some(true), "{doc}: {CGROUP} is read-only");
    let cgroup_volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == cgroup.name)
        .and_then(|v| v.host_path.as_ref())
        .unwrap_or_else(|| panic!("{doc}: no hostPath volume {:?}", cgroup.name));
    assert_eq!(
        cgroup_volume.path, "/sys/fs/cgroup",
        "{doc}: the host's cgroup hierarchy"
    );
    assert_eq!(
        flag_value(doc, c, "--cgroup-root"),
        CGROUP,
        "{doc}: --cgroup-root must be the mounted hierarchy"
    );
    assert_eq!(
        flag_value(doc, c, "--bpffs"),
        BPFFS,
        "{doc}: --bpffs must be the mounted bpffs"
    );
}

#[test]
fn daemonset_probes_livez_and_healthz_on_kube_proxys_port() {
    let docs = docs();
    let (doc, ds) = daemon_set(&docs);
    let c = container(doc, ds);
    let probes: [(&str, &Option<Probe>, &str); 2] = [
        ("livenessProbe", &c.liveness_probe, LIVENESS_PATH),
        ("readinessProbe", &c.readiness_probe, READINESS_PATH),
    ];
    for (name, probe, path) in probes {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .unwrap_or_else(|| panic!("{doc}: no {name}.httpGet"));
        assert_eq!(get.path.as_deref(), Some(path), "{doc}: {name}.httpGet.path");
        assert_eq!(
            get.port,
            IntOrString::Int(HEALTHZ_PORT),
            "{doc}: {name}.httpGet.port"
        );
    }
    let bind = flag_value(doc, c, "--healthz-bind-address");
    assert!(
        bind.ends_with(&format!(":{HEALTHZ_PORT}")),
        "{doc}: --healthz-bind-address {bind:?} must serve the probed port {HEALTHZ_PORT}"
    );
}

/// The value after `flag` in the container's command and args (`--flag value`
/// or `--flag=value`); panics if the flag is absent or has no value.
fn flag_value<'a>(doc: &Doc, c: &'a Container, flag: &str) -> &'a str {
    let words: Vec<&str> = c
        .command
        .iter()
        .chain(&c.args)
        .flatten()
        .map(String::as_str)
        .collect();
    let prefix = format!("{flag}=");
    for (i, word) in words.iter().enumerate() {
        if let Some(value) = word.strip_prefix(&prefix) {
            return value;
        }
        if *word == flag {
            let value = words.get(i + 1).copied().unwrap_or_default();
            assert!(
                !value.is_empty() && !value.starts_with("--"),
                "{doc}: {flag} has no value"
            );
            return value;
        }
    }
    panic!("{doc}: container {CONTAINER} is not given {flag}; its command and args: {words:?}")
}

#[test]
fn daemonset_runs_the_agent_with_the_cluster_flags() {
    let docs = docs();
    let (doc, ds) = daemon_set(&docs);
    let c = container(doc, ds);
    let words: Vec<&str> = c
        .command
        .iter()
        .chain(&c.args)
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(
        words.get(..2),
        Some(&["redirector", "run"][..]),
        "{doc}: must run `redirector run`"
    );

    // flag, the environment variable it is taken from
    let flags = [
        ("--api-server", "KUBERNETES_API_SERVER"),
        ("--node-name", "NODE_NAME"),
        ("--interfaces", "REDIRECTOR_INTERFACES"),
    ];
    for (flag, var) in flags {
        assert_eq!(
            flag_value(doc, c, flag),
            format!("$({var})"),
            "{doc}: {flag} must come from ${var}"
        );
    }

    // Every $(VAR) in command and args is defined, or Kubernetes passes it literally.
    let env: Vec<&str> = c.env.iter().flatten().map(|e| e.name.as_str()).collect();
    for word in &words {
        let mut rest = *word;
        while let Some(start) = rest.find("$(") {
            let end = rest[start..].find(')').map(|e| start + e).unwrap_or(rest.len());
            let var = &rest[start + 2..end];
            assert!(
                env.contains(&var),
                "{doc}: {word:?} refers to $({var}), which env does not define"
            );
            rest = &rest[end..];
        }
    }

    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.as_str());
    assert_eq!(
        node_name,
        Some("spec.nodeName"),
        "{doc}: NODE_NAME must come from the downward API"
    );
}
