//! A fake Kubernetes API server for tests: core/v1 Services and Nodes,
//! discovery.k8s.io/v1 EndpointSlices and networking.k8s.io/v1 ServiceCIDRs
//! (Nodes and ServiceCIDRs are cluster-scoped) over plain HTTP/1.1, speaking
//! the real list/watch protocol closely enough for kube-rs's `watcher` (it is
//! tested against kube-rs itself, see the tests at the bottom).
//!
//! What a client sees, as from a real kube-apiserver:
//! - LIST `GET /api/v1/services`, `GET /api/v1/namespaces/{ns}/services` (same
//!   for `/apis/discovery.k8s.io/v1/.../endpointslices`, and
//!   `/apis/networking.k8s.io/v1/servicecidrs` and `/api/v1/nodes` without
//!   namespaces): a `ServiceList` / `EndpointSliceList` / `ServiceCIDRList` /
//!   `NodeList` with `metadata.resourceVersion`, `labelSelector`,
//!   `fieldSelector` (`metadata.name`, `metadata.namespace`), `limit` +
//!   `continue` (pages are a consistent snapshot at the first page's
//!   resourceVersion; an expired token is a 410), `resourceVersion` +
//!   `resourceVersionMatch` (`NotOlderThan`, `Exact`). Items carry no
//!   `apiVersion`/`kind`, as real servers send them.
//! - WATCH (`watch=true|1`): chunked newline-delimited events starting after
//!   `resourceVersion` (replayed from the history, then live), or with
//!   synthetic ADDED events for `resourceVersion` "0"/absent or
//!   `sendInitialEvents=true` (then a bookmark annotated
//!   `k8s.io/initial-events-end`). Objects entering/leaving the selectors are
//!   ADDED/DELETED. `allowWatchBookmarks=true` gives a BOOKMARK every
//!   [`FakeApiServer::set_bookmark_interval`]. `timeoutSeconds` ends the stream
//!   cleanly. A resourceVersion older than the compaction point gets one
//!   in-band ERROR event (Status 410 Expired) and the end of the stream, which
//!   is what makes kube-rs relist.
//! - GET of one object (404 Status when missing), `/version`, `/healthz`;
//!   404 Status for any other path, 405 Status for any method but GET.
//! - [`FakeApiServer::set_served`] makes a kind's paths answer 404, as an API
//!   server too old for the kind does (ServiceCIDR before Kubernetes 1.33).
//!
//! The server runs on its own thread and tokio runtime, so synchronous tests
//! drive it through [`FakeApiServer`]'s methods. It only ever uses the
//! listener it is given: a caller can bind it inside another network
//! namespace.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// Bookmark period of a new server (real servers: about a minute; tests want
/// them soon).
pub const DEFAULT_BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// History kept for watch resumption; older changes are compacted away.
const MAX_HISTORY: usize = 100_000;
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: u64 = 1024 * 1024;
/// Sent by real servers when a continue token's snapshot is compacted.
const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a consistent \
     list result. You can start a new list without the continue parameter.";

/// The resources served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Service,
    EndpointSlice,
    ServiceCidr,
    /// Cluster-scoped: stored with an empty namespace.
    Node,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Service, Kind::EndpointSlice, Kind::ServiceCidr, Kind::Node];

    /// Accepts the kind, the plural and kubectl's short name, any case.
    fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "service" | "services" | "svc" => Some(Self::Service),
            "endpointslice" | "endpointslices" => Some(Self::EndpointSlice),
            "servicecidr" | "servicecidrs" => Some(Self::ServiceCidr),
            "node" | "nodes" | "no" => Some(Self::Node),
            _ => None,
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::ServiceCidr => "ServiceCIDR",
            Self::Node => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::Service | Self::Node => "v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
            Self::ServiceCidr => "networking.k8s.io/v1",
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Self::Service => "ServiceList",
            Self::EndpointSlice => "EndpointSliceList",
            Self::ServiceCidr => "ServiceCIDRList",
            Self::Node => "NodeList",
        }
    }

    fn plural(self) -> &'static str {
        match self {
            Self::Service => "services",
            Self::EndpointSlice => "endpointslices",
            Self::ServiceCidr => "servicecidrs",
            Self::Node => "nodes",
        }
    }

    fn group(self) -> &'static str {
        match self {
            Self::Service | Self::Node => "",
            Self::EndpointSlice => "discovery.k8s.io",
            Self::ServiceCidr => "networking.k8s.io",
        }
    }

    /// Objects of a cluster-scoped kind have no namespace (stored under "").
    fn namespaced(self) -> bool {
        !matches!(self, Self::ServiceCidr | Self::Node)
    }
}

/// Test helpers name kinds by string; an unknown one is a bug in the test.
fn kind_arg(kind: &str) -> Kind {
    Kind::parse(kind).unwrap_or_else(|| {
        panic!("FakeApiServer: unknown kind {kind:?} (expected Service, EndpointSlice, ServiceCIDR or Node)")
    })
}

/// (kind, namespace, name): ordered as etcd keys, so lists come out sorted by
/// namespace then name. The namespace of a cluster-scoped object is "".
type Key = (Kind, String, String);

/// The key of an object named by a test helper: the namespace of a
/// cluster-scoped kind is ignored.
fn object_key(kind: Kind, namespace: &str, name: &str) -> Key {
    let namespace = if kind.namespaced() { namespace } else { "" };
    (kind, namespace.to_owned(), name.to_owned())
}

/// One committed change: the state before and after (None: absent).
#[derive(Debug)]
struct Change {
    rv: u64,
    key: Key,
    prev: Option<Value>,
    cur: Option<Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verb {
    List,
    Watch,
    Get,
    Other,
}

#[derive(Clone, Debug)]
struct RequestRecord {
    line: String,
    kind: Option<Kind>,
    verb: Verb,
}

/// Why [`FakeApiServer::try_apply`] refused an object.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the object is not a JSON object")]
    NotAnObject,
    #[error(
        "unsupported object {api_version:?}/{kind:?}: the fake serves v1 Service, \
         discovery.k8s.io/v1 EndpointSlice networking.k8s.io/v1 ServiceCIDR and v1 Node"
    )]
    Unsupported { api_version: String, kind: String },
    #[error("{kind} without metadata.name")]
    MissingName { kind: &'static str },
    #[error("invalid {kind} {namespace}/{name}: {source}")]
    Invalid {
        kind: &'static str,
        namespace: String,
        name: String,
        source: serde_json::Error,
    },
    #[error("YAML document {index}: {source}")]
    Yaml { index: usize, source: yaml_serde::Error },
}

/// Everything a restarted server keeps: objects, the resourceVersion
/// counter, the change history (for watch resumption) and the request log.
#[derive(Clone, Debug)]
pub struct ApiState {
    rv: u64,
    /// The history holds every change with a resourceVersion above this.
    compacted_rv: u64,
    objects: BTreeMap<Key, Value>,
    /// Each stored object's JSON as a list item, by key and resourceVersion:
    /// kube-apiserver's watch cache keeps objects' encodings too, so a large
    /// list is served by copying, not by encoding every object again.
    encoded: HashMap<(Key, String), Arc<str>>,
    history: VecDeque<Arc<Change>>,
    uids: u64,
    requests: Vec<RequestRecord>,
    expired: usize,
}

impl Default for ApiState {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiState {
    /// No objects, resourceVersion 1.
    pub fn new() -> Self {
        Self {
            rv: 1,
            compacted_rv: 1,
            objects: BTreeMap::new(),
            encoded: HashMap::new(),
            history: VecDeque::new(),
            uids: 0,
            requests: Vec::new(),
            expired: 0,
        }
    }

    /// Forgets the history, as etcd compaction (or an apiserver restart with
    /// a fresh watch cache) does: resuming a watch from any resourceVersion
    /// handed out so far, or continuing a list taken so far, then gets 410
    /// Expired. (Stricter than etcd, so that a test can count on the 410: the
    /// compaction takes a resourceVersion of its own, and only it and later
    /// ones stay valid.)
    pub fn compact(&mut self) {
        self.history.clear();
        self.rv += 1;
        self.compacted_rv = self.rv;
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Deletes an object while no server runs (as if it happened while the
    /// clients could not watch); true when it existed.
    pub fn delete(&mut self, kind: &str, namespace: &str, name: &str) -> bool {
        let key = object_key(kind_arg(kind), namespace, name);
        if !self.objects.contains_key(&key) {
            return false;
        }
        self.commit(key, None);
        true
    }

    fn next_uid(&mut self) -> String {
        self.uids += 1;
        format!("5a1e0000-0000-4000-8000-{:012x}", self.uids)
    }

    /// Stores `cur` (None: deletes) under a new resourceVersion, which the
    /// caller has already written into `cur`.
    fn commit(&mut self, key: Key, cur: Option<Value>) -> Arc<Change> {
        self.rv += 1;
        let prev = match &cur {
            Some(object) => self.objects.insert(key.clone(), object.clone()),
            None => self.objects.remove(&key),
        };
        if let Some(rv) = prev.as_ref().map(resource_version_of) {
            // A list of an older snapshot encodes it again if it needs it.
            self.encoded.remove(&(key.clone(), rv));
        }
        let change = Arc::new(Change {
            rv: self.rv,
            key,
            prev,
            cur,
        });
        self.history.push_back(change.clone());
        while self.history.len() > MAX_HISTORY {
            if let Some(old) = self.history.pop_front() {
                self.compacted_rv = old.rv;
            }
        }
        change
    }

    /// The objects of `kind` as they were at `at`, in key order after
    /// `after`, borrowed and produced lazily: a page of a large list must not
    /// copy or walk the whole collection (real servers page from their watch
    /// cache). The caller checks `at` against the compaction point.
    fn objects_at<'a>(
        &'a self,
        kind: Kind,
        at: u64,
        after: Option<(&'a str, &'a str)>,
    ) -> impl Iterator<Item = ((&'a str, &'a str), &'a Value)> + 'a {
        // Objects changed since `at`, as they were then (None: absent). The
        // oldest change after `at` is inserted last and wins.
        let mut then: BTreeMap<(&str, &str), Option<&Value>> = BTreeMap::new();
        for change in self.history.iter().rev().take_while(|change| change.rv > at) {
            if change.key.0 == kind {
                then.insert(
                    (change.key.1.as_str(), change.key.2.as_str()),
                    change.prev.as_ref(),
                );
            }
        }
        let is_after = move |key: &(&str, &str)| after.is_none_or(|after| *key > after);
        let lower = match after {
            Some((ns, name)) => Bound::Excluded((kind, ns.to_owned(), name.to_owned())),
            None => Bound::Included((kind, String::new(), String::new())),
        };
        let past: Vec<((&str, &str), &Value)> = then
            .iter()
            .filter(|(key, _)| is_after(key))
            .filter_map(|(key, object)| object.map(|object| (*key, object)))
            .collect();
        let current = self
            .objects
            .range((lower, Bound::Unbounded))
            .take_while(move |(key, _)| key.0 == kind)
            .map(|((_, ns, name), object)| ((ns.as_str(), name.as_str()), object))
            .filter(move |(key, _)| !then.contains_key(key))
            .peekable();
        MergeByKey {
            a: current,
            b: past.into_iter().peekable(),
        }
    }
}

/// Two iterators sorted by key (with no key in both), merged.
struct MergeByKey<A: Iterator, B: Iterator> {
    a: std::iter::Peekable<A>,
    b: std::iter::Peekable<B>,
}

impl<K: Ord, V, A: Iterator<Item = (K, V)>, B: Iterator<Item = (K, V)>> Iterator for MergeByKey<A, B> {
    type Item = (K, V);
    fn next(&mut self) -> Option<(K, V)> {
        match (self.a.peek(), self.b.peek()) {
            (Some((a, _)), Some((b, _))) if b < a => self.b.next(),
            (Some(_), _) => self.a.next(),
            (None, _) => self.b.next(),
        }
    }
}

enum WatchMsg {
    Change(Arc<Change>),
    /// Close the connection without ending the chunked body.
    Drop,
}

struct WatchReg {
    id: u64,
    kind: Kind,
    tx: mpsc::UnboundedSender<WatchMsg>,
}

struct Inner {
    api: ApiState,
    watches: Vec<WatchReg>,
    next_watch_id: u64,
    bookmark_interval: Duration,
    /// Kinds whose paths answer 404, as on an API server without them.
    unserved: HashSet<Kind>,
}

impl Inner {
    /// Queues the change for every open watch of its kind. Called with the
    /// lock held, so each watch gets changes in resourceVersion order and
    /// none between its replay and its registration is lost.
    fn publish(&mut self, change: &Arc<Change>) {
        self.watches
            .retain(|w| w.kind != change.key.0 || w.tx.send(WatchMsg::Change(change.clone())).is_ok());
    }
}

type Shared = Mutex<Inner>;

/// A panic elsewhere must not take the server down with it.
fn lock(shared: &Shared) -> MutexGuard<'_, Inner> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Handle on a running fake API server. Dropping it stops the server.
pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Serves on `listener` (already bound, possibly in another network
    /// namespace) with no objects.
    pub fn start(listener: std::net::TcpListener) -> Self {
        Self::start_with_state(listener, ApiState::new())
    }

    /// Serves `state` (from [`FakeApiServer::stop`]) on `listener`. To
    /// restart on the same address, bind a new listener to [`Self::addr`]
    /// after `stop` (std sets SO_REUSEADDR, so the old connections in
    /// TIME_WAIT do not prevent it).
    pub fn start_with_state(listener: std::net::TcpListener, state: ApiState) -> Self {
        let addr = listener
            .local_addr()
            .expect("FakeApiServer: the listener has no local address");
        listener
            .set_nonblocking(true)
            .expect("FakeApiServer: setting the listener non-blocking");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("FakeApiServer: building its tokio runtime");
        let listener = {
            let _entered = runtime.enter();
            TcpListener::from_std(listener).expect("FakeApiServer: registering the listener")
        };
        let shared = Arc::new(Mutex::new(Inner {
            api: state,
            watches: Vec::new(),
            next_watch_id: 0,
            bookmark_interval: DEFAULT_BOOKMARK_INTERVAL,
            unserved: HashSet::new(),
        }));
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name(format!("fake-apiserver-{}", addr.port()))
            .spawn({
                let shared = shared.clone();
                move || {
                    runtime.block_on(accept_loop(listener, shared, shutdown_rx));
                    // Dropping the runtime drops every connection task, so
                    // closes every socket.
                    drop(runtime);
                }
            })
            .expect("FakeApiServer: spawning its thread");
        Self {
            addr,
            shared,
            shutdown: Some(shutdown_tx),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for `kube::Config::new` or the agent's `--api-server`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Creates or replaces an object (a Service, an EndpointSlice, or a
    /// cluster-scoped ServiceCIDR), like `kubectl apply`: sets
    /// resourceVersion (and on create uid and creationTimestamp), defaults a
    /// few fields as the apiserver does (Service type, sessionAffinity,
    /// port protocol and targetPort, clusterIP allocated in 10.96.0.0/16 and
    /// kept on update, clusterIPs, ipFamilies; EndpointSlice port protocol)
    /// and emits ADDED or MODIFIED. An update that changes nothing is a
    /// no-op (no new resourceVersion, no event), as on a real server.
    /// Returns the stored object. Panics on an invalid object (a bug in the
    /// test): see [`Self::try_apply`].
    pub fn apply(&self, object: Value) -> Value {
        self.try_apply(object)
            .unwrap_or_else(|e| panic!("FakeApiServer::apply: {e}"))
    }

    /// [`Self::apply`], returning why an object is refused: not a Service or
    /// EndpointSlice, no name, or not deserializable as the k8s-openapi type.
    pub fn try_apply(&self, object: Value) -> Result<Value, ApplyError> {
        apply_object(&mut lock(&self.shared), object)
    }

    /// Applies every document of a (multi-document) YAML manifest, and the
    /// items of `kind: List` documents. Panics on an invalid manifest.
    pub fn apply_yaml(&self, yaml: &str) -> Vec<Value> {
        self.try_apply_yaml(yaml)
            .unwrap_or_else(|e| panic!("FakeApiServer::apply_yaml: {e}"))
    }

    /// [`Self::apply_yaml`], stopping at the first invalid document (the
    /// earlier ones stay applied).
    pub fn try_apply_yaml(&self, yaml: &str) -> Result<Vec<Value>, ApplyError> {
        let mut applied = Vec::new();
        for (index, document) in yaml_serde::Deserializer::from_str(yaml).enumerate() {
            let value = Value::deserialize(document).map_err(|source| ApplyError::Yaml { index, source })?;
            if value.is_null() {
                continue;
            }
            let is_list = value.get("kind").and_then(Value::as_str) == Some("List");
            match value.get("items").and_then(Value::as_array) {
                Some(items) if is_list => {
                    for item in items {
                        applied.push(self.try_apply(item.clone())?);
                    }
                }
                _ => applied.push(self.try_apply(value)?),
            }
        }
        Ok(applied)
    }

    /// Deletes an object (kind: `Service`/`EndpointSlice`/`ServiceCIDR`, or
    /// the plural; the namespace of a ServiceCIDR is ignored), emitting DELETED with its last state under a new resourceVersion.
    /// Returns that object, or None if there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = object_key(kind_arg(kind), namespace, name);
        let mut inner = lock(&self.shared);
        if !inner.api.objects.contains_key(&key) {
            return None;
        }
        let change = inner.api.commit(key, None);
        inner.publish(&change);
        let mut object = change.prev.clone()?;
        set_resource_version(&mut object, change.rv);
        Some(object)
    }

    /// The stored object, as a GET returns it.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = object_key(kind_arg(kind), namespace, name);
        lock(&self.shared).api.objects.get(&key).cloned()
    }

    /// All objects of a kind, sorted by namespace and name.
    pub fn objects(&self, kind: &str) -> Vec<Value> {
        let kind = kind_arg(kind);
        lock(&self.shared)
            .api
            .objects
            .iter()
            .filter(|(key, _)| key.0 == kind)
            .map(|(_, object)| object.clone())
            .collect()
    }

    /// The current resourceVersion (of the last change).
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared).api.rv
    }

    /// Forgets the history: see [`ApiState::compact`]. Open watches go on.
    pub fn compact(&self) {
        lock(&self.shared).api.compact();
    }

    /// Closes every open watch connection abruptly (no end of the chunked
    /// body), as a dropped connection would.
    pub fn drop_watches(&self) {
        for watch in lock(&self.shared).watches.drain(..) {
            let _ = watch.tx.send(WatchMsg::Drop);
        }
    }

    /// Period of BOOKMARK events on watches that allow them (zero: none).
    /// Open watches pick it up after their current period.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        lock(&self.shared).bookmark_interval = interval;
    }

    /// Whether `kind`'s paths are served (the default). Not served, every
    /// request on them (LIST, WATCH, GET) answers 404 NotFound, as from an
    /// API server that predates the kind; the objects stay stored. Open
    /// watches of the kind go on.
    pub fn set_served(&self, kind: &str, served: bool) {
        let kind = kind_arg(kind);
        let unserved = &mut lock(&self.shared).unserved;
        if served {
            unserved.remove(&kind);
        } else {
            unserved.insert(kind);
        }
    }

    /// Every request so far (kept across restarts), as `METHOD TARGET`, e.g.
    /// `GET /api/v1/services?&limit=500`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared)
            .api
            .requests
            .iter()
            .map(|r| r.line.clone())
            .collect()
    }

    /// LIST requests on `kind` so far (each page counts), any namespace.
    pub fn list_count(&self, kind: &str) -> usize {
        self.count(kind_arg(kind), Verb::List)
    }

    /// WATCH requests on `kind` so far, any namespace.
    pub fn watch_count(&self, kind: &str) -> usize {
        self.count(kind_arg(kind), Verb::Watch)
    }

    /// Watches of `kind` open now.
    pub fn open_watch_count(&self, kind: &str) -> usize {
        let kind = kind_arg(kind);
        lock(&self.shared)
            .watches
            .iter()
            .filter(|w| w.kind == kind)
            .count()
    }

    /// How many times a client was told 410 Expired (watch ERROR events and
    /// LIST continue tokens).
    pub fn expired_count(&self) -> usize {
        lock(&self.shared).api.expired
    }

    /// Stops serving (closes the listener and every connection, so the port
    /// can be bound again) and returns the state, for
    /// [`Self::start_with_state`].
    pub fn stop(mut self) -> ApiState {
        self.shutdown();
        std::mem::take(&mut lock(&self.shared).api)
    }

    fn count(&self, kind: Kind, verb: Verb) -> usize {
        lock(&self.shared)
            .api
            .requests
            .iter()
            .filter(|r| r.kind == Some(kind) && r.verb == verb)
            .count()
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

// ---- objects ---------------------------------------------------------------

fn apply_object(inner: &mut Inner, mut object: Value) -> Result<Value, ApplyError> {
    let kind = object_kind(&mut object)?;
    let Some(map) = object.as_object_mut() else {
        return Err(ApplyError::NotAnObject);
    };
    let Some(meta) = map.entry("metadata").or_insert_with(|| json!({})).as_object_mut() else {
        return Err(ApplyError::MissingName { kind: kind.kind() });
    };
    let name = meta
        .get("name")
        .and_then(Value::as_str)
        .filter(|name| !name.is_empty())
        .ok_or(ApplyError::MissingName { kind: kind.kind() })?
        .to_owned();
    let namespace = if kind.namespaced() {
        let namespace = meta
            .get("namespace")
            .and_then(Value::as_str)
            .filter(|ns| !ns.is_empty())
            .unwrap_or("default")
            .to_owned();
        meta.insert("namespace".into(), namespace.clone().into());
        namespace
    } else {
        // As the apiserver does for a cluster-scoped kind.
        meta.remove("namespace");
        String::new()
    };
    meta.remove("resourceVersion");
    let key = (kind, namespace.clone(), name.clone());
    let existing = inner.api.objects.get(&key).cloned();
    // Identity is the server's: kept across updates, fresh on create.
    let uid = existing
        .as_ref()
        .and_then(|old| old.pointer("/metadata/uid").cloned());
    let created = existing
        .as_ref()
        .and_then(|old| old.pointer("/metadata/creationTimestamp").cloned());
    let uid = uid.unwrap_or_else(|| inner.api.next_uid().into());
    meta.insert("uid".into(), uid);
    meta.insert(
        "creationTimestamp".into(),
        created.unwrap_or_else(|| now_rfc3339().into()),
    );
    match kind {
        Kind::Service => default_service(&mut object, existing.as_ref(), &inner.api),
        Kind::EndpointSlice => default_endpoint_slice(&mut object),
        Kind::ServiceCidr => {}
        Kind::Node => {}
    }
    if let Some(old) = &existing {
        let mut unversioned = old.clone();
        if let Some(meta) = unversioned.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("resourceVersion");
        }
        if unversioned == object {
            return Ok(old.clone());
        }
    }
    set_resource_version(&mut object, inner.api.rv + 1);
    // The agent deserializes what it gets: refuse here what it could not.
    let typed = match kind {
        Kind::Service => serde_json::from_value::<Service>(object.clone()).map(drop),
        Kind::EndpointSlice => serde_json::from_value::<EndpointSlice>(object.clone()).map(drop),
        Kind::ServiceCidr => serde_json::from_value::<ServiceCIDR>(object.clone()).map(drop),
        Kind::Node => serde_json::from_value::<Node>(object.clone()).map(drop),
    };
    typed.map_err(|source| ApplyError::Invalid {
        kind: kind.kind(),
        namespace,
        name,
        source,
    })?;
    let change = inner.api.commit(key, Some(object.clone()));
    inner.publish(&change);
    Ok(object)
}

/// The kind of an object to apply, filling in a missing apiVersion.
fn object_kind(object: &mut Value) -> Result<Kind, ApplyError> {
    let map = object.as_object_mut().ok_or(ApplyError::NotAnObject)?;
    let kind_name = map.get("kind").and_then(Value::as_str).unwrap_or("").to_owned();
    let api_version = map.get("apiVersion").and_then(Value::as_str).map(str::to_owned);
    let kind = Kind::ALL
        .into_iter()
        .find(|k| k.kind() == kind_name && api_version.as_deref().is_none_or(|v| v == k.api_version()))
        .ok_or_else(|| ApplyError::Unsupported {
            api_version: api_version.unwrap_or_default(),
            kind: kind_name,
        })?;
    map.insert("apiVersion".into(), kind.api_version().into());
    Ok(kind)
}

fn set_resource_version(object: &mut Value, rv: u64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert("resourceVersion".into(), rv.to_string().into());
    }
}

/// The part of the apiserver's Service defaulting the agent relies on.
fn default_service(object: &mut Value, existing: Option<&Value>, api: &ApiState) {
    let Some(map) = object.as_object_mut() else {
        return;
    };
    let Some(spec) = map.entry("spec").or_insert_with(|| json!({})).as_object_mut() else {
        return;
    };
    let service_type = spec
        .entry("type")
        .or_insert_with(|| "ClusterIP".into())
        .as_str()
        .unwrap_or("ClusterIP")
        .to_owned();
    spec.entry("sessionAffinity").or_insert_with(|| "None".into());
    if let Some(ports) = spec.get_mut("ports").and_then(Value::as_array_mut) {
        for port in ports.iter_mut().filter_map(Value::as_object_mut) {
            port.entry("protocol").or_insert_with(|| "TCP".into());
            if let Some(number) = port.get("port").cloned() {
                port.entry("targetPort").or_insert(number);
            }
        }
    }
    if service_type == "ExternalName" {
        return;
    }
    spec.entry("internalTrafficPolicy")
        .or_insert_with(|| "Cluster".into());
    if service_type == "NodePort" || service_type == "LoadBalancer" {
        spec.entry("externalTrafficPolicy")
            .or_insert_with(|| "Cluster".into());
    }
    let missing = spec
        .get("clusterIP")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty);
    if missing {
        // clusterIP is immutable: an update without it keeps the old one.
        let old_spec = existing.and_then(|old| old.get("spec"));
        let old_ip = old_spec
            .and_then(|s| s.get("clusterIP"))
            .and_then(Value::as_str)
            .filter(|ip| !ip.is_empty());
        match old_ip {
            Some(ip) => {
                spec.insert("clusterIP".into(), ip.into());
                if let Some(ips) = old_spec.and_then(|s| s.get("clusterIPs")) {
                    spec.entry("clusterIPs").or_insert_with(|| ips.clone());
                }
            }
            None => {
                spec.insert("clusterIP".into(), allocate_cluster_ip(api).into());
            }
        }
    }
    let ip = spec
        .get("clusterIP")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    spec.entry("clusterIPs").or_insert_with(|| json!([ip]));
    if let Ok(addr) = ip.parse::<IpAddr>() {
        let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
        spec.entry("ipFamilies").or_insert_with(|| json!([family]));
        spec.entry("ipFamilyPolicy")
            .or_insert_with(|| "SingleStack".into());
    }
}

/// The first free address from 10.96.0.10 (10.96.0.0/12 is the testbed's
/// service CIDR).
fn allocate_cluster_ip(api: &ApiState) -> String {
    let used: HashSet<&str> = api
        .objects
        .iter()
        .filter(|(key, _)| key.0 == Kind::Service)
        .filter_map(|(_, object)| object.pointer("/spec/clusterIP").and_then(Value::as_str))
        .collect();
    let base = u32::from(Ipv4Addr::new(10, 96, 0, 0));
    (10..65_534)
        .map(|offset| Ipv4Addr::from(base + offset).to_string())
        .find(|ip| !used.contains(ip.as_str()))
        .unwrap_or_else(|| "10.96.255.254".into())
}

fn default_endpoint_slice(object: &mut Value) {
    let Some(map) = object.as_object_mut() else {
        return;
    };
    map.entry("endpoints").or_insert_with(|| json!([]));
    if let Some(ports) = map.get_mut("ports").and_then(Value::as_array_mut) {
        for port in ports.iter_mut().filter_map(Value::as_object_mut) {
            port.entry("protocol").or_insert_with(|| "TCP".into());
        }
    }
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

// ---- selectors -------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Gt(String, i64),
    Lt(String, i64),
}

impl LabelReq {
    fn key(&self) -> &str {
        match self {
            Self::Exists(k)
            | Self::NotExists(k)
            | Self::Equals(k, _)
            | Self::NotEquals(k, _)
            | Self::In(k, _)
            | Self::NotIn(k, _)
            | Self::Gt(k, _)
            | Self::Lt(k, _) => k,
        }
    }

    fn matches(&self, labels: Option<&serde_json::Map<String, Value>>) -> bool {
        let value = labels.and_then(|l| l.get(self.key())).and_then(Value::as_str);
        match self {
            Self::Exists(_) => value.is_some(),
            Self::NotExists(_) => value.is_none(),
            Self::Equals(_, v) => value == Some(v.as_str()),
            Self::NotEquals(_, v) => value != Some(v.as_str()),
            Self::In(_, set) => value.is_some_and(|value| set.iter().any(|v| v == value)),
            Self::NotIn(_, set) => value.is_none_or(|value| set.iter().all(|v| v != value)),
            Self::Gt(_, n) => value.and_then(|v| v.parse::<i64>().ok()).is_some_and(|v| v > *n),
            Self::Lt(_, n) => value.and_then(|v| v.parse::<i64>().ok()).is_some_and(|v| v < *n),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Ident(String),
    Not,
    Eq,
    NotEq,
    Gt,
    Lt,
    Open,
    Close,
    Comma,
}

fn tokenize(selector: &str) -> Vec<Tok> {
    const SPECIAL: &[char] = &[',', '(', ')', '!', '=', '<', '>'];
    let chars: Vec<char> = selector.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let next_is_eq = chars.get(i + 1) == Some(&'=');
        let (token, len) = match chars[i] {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            ',' => (Tok::Comma, 1),
            '(' => (Tok::Open, 1),
            ')' => (Tok::Close, 1),
            '!' if next_is_eq => (Tok::NotEq, 2),
            '!' => (Tok::Not, 1),
            '=' if next_is_eq => (Tok::Eq, 2),
            '=' => (Tok::Eq, 1),
            '>' => (Tok::Gt, 1),
            '<' => (Tok::Lt, 1),
            _ => {
                let start = i;
                while i < chars.len() && !chars[i].is_whitespace() && !SPECIAL.contains(&chars[i]) {
                    i += 1;
                }
                tokens.push(Tok::Ident(chars[start..i].iter().collect()));
                continue;
            }
        };
        tokens.push(token);
        i += len;
    }
    tokens
}

fn valid_label_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn valid_label_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// Kubernetes label selector syntax: comma-separated (AND) `key`, `!key`,
/// `key=v`, `key==v`, `key!=v`, `key in (a,b)`, `key notin (a,b)`,
/// `key>n`, `key<n`. Empty selects everything.
fn parse_label_selector(selector: &str) -> Result<Vec<LabelReq>, String> {
    let tokens = tokenize(selector);
    let mut reqs = Vec::new();
    if tokens.is_empty() {
        return Ok(reqs);
    }
    let err = |what: &str| format!("unable to parse requirement in label selector {selector:?}: {what}");
    let mut i = 0;
    loop {
        let req = match tokens.get(i) {
            Some(Tok::Not) => match tokens.get(i + 1) {
                Some(Tok::Ident(key)) => {
                    i += 2;
                    LabelReq::NotExists(key.clone())
                }
                _ => return Err(err("expected a key after '!'")),
            },
            Some(Tok::Ident(key)) => {
                let key = key.clone();
                i += 1;
                match tokens.get(i) {
                    None | Some(Tok::Comma) => LabelReq::Exists(key),
                    Some(op @ (Tok::Eq | Tok::NotEq)) => {
                        let value = match tokens.get(i + 1) {
                            Some(Tok::Ident(value)) => {
                                i += 1;
                                value.clone()
                            }
                            _ => String::new(),
                        };
                        i += 1;
                        if *op == Tok::Eq {
                            LabelReq::Equals(key, value)
                        } else {
                            LabelReq::NotEquals(key, value)
                        }
                    }
                    Some(op @ (Tok::Gt | Tok::Lt)) => {
                        let Some(Tok::Ident(n)) = tokens.get(i + 1) else {
                            return Err(err("expected an integer after '>' or '<'"));
                        };
                        let n = n.parse::<i64>().map_err(|_| err("expected an integer"))?;
                        i += 2;
                        if *op == Tok::Gt {
                            LabelReq::Gt(key, n)
                        } else {
                            LabelReq::Lt(key, n)
                        }
                    }
                    Some(Tok::Ident(op)) if op == "in" || op == "notin" => {
                        let negate = op == "notin";
                        if tokens.get(i + 1) != Some(&Tok::Open) {
                            return Err(err("expected '(' after in/notin"));
                        }
                        i += 2;
                        let mut values = Vec::new();
                        loop {
                            match tokens.get(i) {
                                Some(Tok::Ident(value)) => values.push(value.clone()),
                                _ => return Err(err("expected a value in the set")),
                            }
                            match tokens.get(i + 1) {
                                Some(Tok::Comma) => i += 2,
                                Some(Tok::Close) => {
                                    i += 2;
                                    break;
                                }
                                _ => return Err(err("expected ',' or ')' in the set")),
                            }
                        }
                        if negate {
                            LabelReq::NotIn(key, values)
                        } else {
                            LabelReq::In(key, values)
                        }
                    }
                    Some(_) => return Err(err("expected an operator after the key")),
                }
            }
            _ => return Err(err("expected a key")),
        };
        if !valid_label_key(req.key()) {
            return Err(err(&format!("invalid label key {:?}", req.key())));
        }
        let values: &[String] = match &req {
            LabelReq::Equals(_, v) | LabelReq::NotEquals(_, v) => std::slice::from_ref(v),
            LabelReq::In(_, vs) | LabelReq::NotIn(_, vs) => vs,
            _ => &[],
        };
        if let Some(bad) = values.iter().find(|v| !valid_label_value(v)) {
            return Err(err(&format!("invalid label value {bad:?}")));
        }
        reqs.push(req);
        match tokens.get(i) {
            None => return Ok(reqs),
            Some(Tok::Comma) => i += 1,
            Some(_) => return Err(err("expected ',' between requirements")),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
struct FieldReq {
    /// The metadata field: `name` or `namespace`.
    field: &'static str,
    equal: bool,
    value: String,
}

/// `metadata.name` and `metadata.namespace` with `=`, `==`, `!=`: the
/// fields both resources support on a real server.
fn parse_field_selector(selector: &str) -> Result<Vec<FieldReq>, String> {
    let mut reqs = Vec::new();
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
            (f, false, v)
        } else if let Some((f, v)) = term.split_once("==") {
            (f, true, v)
        } else if let Some((f, v)) = term.split_once('=') {
            (f, true, v)
        } else {
            return Err(format!("invalid field selector term {term:?}"));
        };
        let field = match field.trim() {
            "metadata.name" => "name",
            "metadata.namespace" => "namespace",
            other => return Err(format!("field label not supported: {other}")),
        };
        reqs.push(FieldReq {
            field,
            equal,
            value: value.trim().to_owned(),
        });
    }
    Ok(reqs)
}

/// What a LIST or WATCH selects: the path's namespace (and name) and the
/// selectors.
#[derive(Debug)]
struct Filter {
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    fn new(scope: &Scope, query: &[(String, String)]) -> Result<Self, String> {
        let labels = parse_label_selector(param(query, "labelSelector").unwrap_or(""))?;
        let mut fields = parse_field_selector(param(query, "fieldSelector").unwrap_or(""))?;
        if let Some(name) = &scope.name {
            fields.push(FieldReq {
                field: "name",
                equal: true,
                value: name.clone(),
            });
        }
        Ok(Self {
            namespace: scope.namespace.clone(),
            labels,
            fields,
        })
    }

    fn has_selectors(&self) -> bool {
        !self.labels.is_empty() || !self.fields.is_empty()
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = |field: &str| {
            object
                .get("metadata")
                .and_then(|m| m.get(field))
                .and_then(Value::as_str)
                .unwrap_or("")
        };
        if self
            .namespace
            .as_deref()
            .is_some_and(|ns| meta("namespace") != ns)
        {
            return false;
        }
        let labels = object.pointer("/metadata/labels").and_then(Value::as_object);
        self.fields.iter().all(|f| (meta(f.field) == f.value) == f.equal)
            && self.labels.iter().all(|req| req.matches(labels))
    }
}

// ---- API semantics -----------------------------------------------------------

/// A resource path: the collection (all namespaces or one) or one object.
#[derive(Clone, Debug)]
struct Scope {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
}

enum Route {
    Resource(Scope),
    Version,
    Health,
    NotFound,
}

fn route(path: &str) -> Route {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (kind, rest) = match segments.as_slice() {
        ["version"] => return Route::Version,
        ["healthz" | "readyz" | "livez"] => return Route::Health,
        ["api", "v1", "nodes"] => return node_route(None),
        ["api", "v1", "nodes", name] => return node_route(Some(name)),
        ["api", "v1", rest @ ..] => (Kind::Service, rest),
        ["apis", "discovery.k8s.io", "v1", rest @ ..] => (Kind::EndpointSlice, rest),
        ["apis", "networking.k8s.io", "v1", rest @ ..] => (Kind::ServiceCidr, rest),
        _ => return Route::NotFound,
    };
    let plural = kind.plural();
    let (namespace, name) = match rest {
        [p] if *p == plural => (None, None),
        [p, name] if *p == plural && !kind.namespaced() => (None, Some(name.to_string())),
        ["namespaces", ns, p] if *p == plural && kind.namespaced() => (Some(ns.to_string()), None),
        ["namespaces", ns, p, name] if *p == plural && kind.namespaced() => {
            (Some(ns.to_string()), Some(name.to_string()))
        }
        _ => return Route::NotFound,
    };
    Route::Resource(Scope {
        kind,
        namespace,
        name,
    })
}

/// A Node path: cluster-scoped, so no namespace.
fn node_route(name: Option<&str>) -> Route {
    Route::Resource(Scope {
        kind: Kind::Node,
        namespace: None,
        name: name.map(str::to_owned),
    })
}

fn status(code: u16, reason: &str, message: impl Into<String>) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message.into(),
        "reason": reason,
        "code": code,
    })
}

fn bad_request(message: impl Into<String>) -> Value {
    status(400, "BadRequest", message)
}

fn expired(message: impl Into<String>) -> Value {
    status(410, "Expired", message)
}

fn not_found(kind: Kind, name: &str) -> Value {
    let mut body = status(404, "NotFound", format!("{} \"{name}\" not found", kind.plural()));
    let mut details = json!({ "name": name, "kind": kind.plural() });
    if !kind.group().is_empty() {
        details["group"] = kind.group().into();
    }
    body["details"] = details;
    body
}

fn too_large(rv: u64, current: u64) -> Value {
    status(
        504,
        "Timeout",
        format!("Too large resource version: {rv}, current: {current}"),
    )
}

fn param<'a>(query: &'a [(String, String)], key: &str) -> Option<&'a str> {
    query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Go's strconv.ParseBool, which the apiserver uses for query flags.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

fn parse_rv(value: &str) -> Result<u64, Value> {
    value
        .parse::<u64>()
        .map_err(|_| bad_request(format!("invalid resource version {value:?}")))
}

fn encode_continue(rv: u64, namespace: &str, name: &str) -> String {
    json!([rv, namespace, name])
        .to_string()
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(u64, (String, String))> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let (rv, namespace, name): (u64, String, String) = serde_json::from_slice(&bytes?).ok()?;
    Some((rv, (namespace, name)))
}

/// A list item as real servers send it: without apiVersion and kind.
fn list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
    }
    item
}

/// The list as JSON text (items copied from their cached encodings).
fn list(api: &mut ApiState, scope: &Scope, query: &[(String, String)]) -> Result<String, Value> {
    let filter = Filter::new(scope, query).map_err(bad_request)?;
    let limit = match param(query, "limit").filter(|v| !v.is_empty()) {
        None => 0,
        Some(v) => {
            let n = v
                .parse::<i64>()
                .map_err(|_| bad_request(format!("invalid limit {v:?}")))?;
            usize::try_from(n).unwrap_or(0)
        }
    };
    let rv = param(query, "resourceVersion").filter(|v| !v.is_empty());
    let (at, after) = match param(query, "continue").filter(|v| !v.is_empty()) {
        Some(token) => {
            if rv.is_some_and(|v| v != "0") {
                return Err(bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let (at, after) = decode_continue(token)
                .filter(|(at, _)| *at <= api.rv)
                .ok_or_else(|| bad_request("continue key is not valid"))?;
            if at < api.compacted_rv {
                api.expired += 1;
                return Err(expired(CONTINUE_EXPIRED));
            }
            (at, Some(after))
        }
        None => {
            let at = match param(query, "resourceVersionMatch").filter(|v| !v.is_empty()) {
                // "", "0" ("any") and N without a match rule (legacy "not
                // older than") are all served from the latest state.
                None => api.rv,
                Some("NotOlderThan") => {
                    let n = parse_rv(rv.ok_or_else(|| {
                        bad_request("resourceVersionMatch is forbidden unless resourceVersion is provided")
                    })?)?;
                    if n > api.rv {
                        return Err(too_large(n, api.rv));
                    }
                    api.rv
                }
                Some("Exact") => {
                    let n = parse_rv(rv.filter(|v| *v != "0").ok_or_else(|| {
                        bad_request("resourceVersionMatch=Exact requires a non-zero resourceVersion")
                    })?)?;
                    if n > api.rv {
                        return Err(too_large(n, api.rv));
                    }
                    if n < api.compacted_rv {
                        api.expired += 1;
                        return Err(expired(format!(
                            "too old resource version: {n} ({})",
                            api.compacted_rv
                        )));
                    }
                    n
                }
                Some(other) => {
                    return Err(bad_request(format!("unsupported resourceVersionMatch {other:?}")));
                }
            };
            (at, None)
        }
    };
    // Every `at` chosen above is at or after the compaction point.
    let after = after.as_ref().map(|(ns, name)| (ns.as_str(), name.as_str()));
    let mut items = Vec::new();
    let mut last: Option<(&str, &str)> = None;
    let mut remaining: i64 = 0;
    for (key, object) in api.objects_at(scope.kind, at, after) {
        if !filter.matches(object) {
            continue;
        }
        if limit > 0 && items.len() == limit {
            remaining += 1;
            // Counting the rest is only worth it when it will be reported.
            if filter.has_selectors() {
                break;
            }
            continue;
        }
        items.push((key, object));
        last = Some(key);
    }
    let mut fresh = Vec::new();
    let items: Vec<Arc<str>> = items
        .into_iter()
        .map(|((ns, name), object)| {
            let id = (
                (scope.kind, ns.to_owned(), name.to_owned()),
                resource_version_of(object),
            );
            match api.encoded.get(&id) {
                Some(text) => Arc::clone(text),
                None => {
                    let text: Arc<str> = list_item(object).to_string().into();
                    fresh.push((id, Arc::clone(&text)));
                    text
                }
            }
        })
        .collect();
    let last = last.map(|(ns, name)| (ns.to_owned(), name.to_owned()));
    api.encoded.extend(fresh);
    let mut metadata = json!({ "resourceVersion": at.to_string() });
    if remaining > 0
        && let Some((namespace, name)) = last
    {
        metadata["continue"] = encode_continue(at, &namespace, &name).into();
        // Real servers only count when no selector makes it expensive.
        if !filter.has_selectors() {
            metadata["remainingItemCount"] = remaining.into();
        }
    }
    let mut body = json!({
        "kind": scope.kind.list_kind(),
        "apiVersion": scope.kind.api_version(),
        "metadata": metadata,
    })
    .to_string();
    body.pop(); // the closing brace: the items follow
    body.push_str(",\"items\":[");
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            body.push(',');
        }
        body.push_str(item);
    }
    body.push_str("]}");
    Ok(body)
}

/// `metadata.resourceVersion` of a stored object.
fn resource_version_of(object: &Value) -> String {
    object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn get_object(api: &ApiState, scope: &Scope) -> Result<Value, Value> {
    let name = scope.name.clone().unwrap_or_default();
    let key = (scope.kind, scope.namespace.clone().unwrap_or_default(), name);
    api.objects
        .get(&key)
        .cloned()
        .ok_or_else(|| not_found(scope.kind, &key.2))
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-redirector-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24.0",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn event_line(event_type: &str, object: &Value) -> String {
    let mut line = json!({ "type": event_type, "object": object }).to_string();
    line.push('\n');
    line
}

fn bookmark_line(kind: Kind, rv: u64, initial_events_end: bool) -> String {
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if initial_events_end {
        metadata["annotations"] = json!({ "k8s.io/initial-events-end": "true" });
    }
    let object = json!({ "kind": kind.kind(), "apiVersion": kind.api_version(), "metadata": metadata });
    event_line("BOOKMARK", &object)
}

/// The event a watch with `filter` sees for `change`, as the apiserver's
/// watch cache computes it: entering the selection is ADDED, leaving it is
/// DELETED (with the previous state at the change's resourceVersion).
fn change_line(change: &Change, filter: &Filter) -> Option<String> {
    let cur = change.cur.as_ref().filter(|o| filter.matches(o));
    let prev = change.prev.as_ref().filter(|o| filter.matches(o));
    match (cur, prev) {
        (Some(cur), None) => Some(event_line("ADDED", cur)),
        (Some(cur), Some(_)) => Some(event_line("MODIFIED", cur)),
        (None, Some(prev)) => {
            let mut prev = prev.clone();
            set_resource_version(&mut prev, change.rv);
            Some(event_line("DELETED", &prev))
        }
        (None, None) => None,
    }
}

enum WatchStart {
    /// An HTTP error before any streaming (bad parameters).
    Rejected(Value),
    /// The requested resourceVersion is compacted: one in-band ERROR.
    Expired(Value),
    Stream {
        lines: Vec<String>,
        rx: mpsc::UnboundedReceiver<WatchMsg>,
        id: u64,
    },
}

/// Under the lock: the events owed before the live ones, and the
/// registration for the live ones, atomically.
fn start_watch(
    inner: &mut Inner,
    scope: &Scope,
    filter: &Filter,
    rv: &str,
    send_initial: Option<bool>,
) -> WatchStart {
    let kind = scope.kind;
    let any = rv.is_empty() || rv == "0";
    let mut lines = Vec::new();
    if !any && let Err(status) = parse_rv(rv) {
        return WatchStart::Rejected(status);
    }
    if send_initial == Some(true) || (any && send_initial.is_none()) {
        // Synthetic ADDED events for the current state.
        lines.extend(
            inner
                .api
                .objects
                .iter()
                .filter(|(key, object)| key.0 == kind && filter.matches(object))
                .map(|(_, object)| event_line("ADDED", object)),
        );
        if send_initial == Some(true) {
            lines.push(bookmark_line(kind, inner.api.rv, true));
        }
    } else if !any {
        let from = parse_rv(rv).unwrap_or(0);
        if from < inner.api.compacted_rv {
            inner.api.expired += 1;
            return WatchStart::Expired(expired(format!(
                "too old resource version: {from} ({})",
                inner.api.compacted_rv
            )));
        }
        lines.extend(
            inner
                .api
                .history
                .iter()
                .filter(|change| change.rv > from && change.key.0 == kind)
                .filter_map(|change| change_line(change, filter)),
        );
    }
    let (tx, rx) = mpsc::unbounded_channel();
    inner.next_watch_id += 1;
    let id = inner.next_watch_id;
    inner.watches.push(WatchReg { id, kind, tx });
    WatchStart::Stream { lines, rx, id }
}

/// Unregisters a watch when its connection task ends, however it ends.
struct WatchGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        lock(&self.shared).watches.retain(|w| w.id != self.id);
    }
}

// ---- HTTP ------------------------------------------------------------------

struct Request {
    method: String,
    target: String,
    path: String,
    query: Vec<(String, String)>,
    keep_alive: bool,
}

enum ReadError {
    Io(io::Error),
    Bad(&'static str),
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fn percent_decode(s: &str, plus_is_space: bool) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex_value(bytes[i + 1]), hex_value(bytes[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `application/x-www-form-urlencoded`, as kube-rs builds it (including the
/// empty pair of its `?&`).
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(key, true), percent_decode(value, true))
        })
        .collect()
}

/// The next request on the connection; None when the client closed it
/// between requests. Bodies are read and dropped (only GET is served).
async fn read_request(rd: &mut BufReader<OwnedReadHalf>) -> Result<Option<Request>, ReadError> {
    let mut lines: Vec<String> = Vec::new();
    let mut total = 0;
    loop {
        let mut line = Vec::new();
        let limit = (MAX_HEAD - total) as u64;
        let n = (&mut *rd)
            .take(limit)
            .read_until(b'\n', &mut line)
            .await
            .map_err(ReadError::Io)?;
        if n == 0 {
            return if lines.is_empty() {
                Ok(None)
            } else {
                Err(ReadError::Bad("connection closed inside the request head"))
            };
        }
        total += n;
        if line.last() != Some(&b'\n') {
            return Err(ReadError::Bad(if total >= MAX_HEAD {
                "request head too large"
            } else {
                "connection closed inside the request head"
            }));
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.is_empty() {
            // Empty lines before a request are tolerated (RFC 9112 2.2).
            if lines.is_empty() {
                continue;
            }
            break;
        }
        lines.push(String::from_utf8(line).map_err(|_| ReadError::Bad("request head is not UTF-8"))?);
    }
    let mut words = lines[0].split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(ReadError::Bad("malformed request line"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ReadError::Bad("unsupported HTTP version"));
    }
    let mut keep_alive = version != "HTTP/1.0";
    let mut content_length: u64 = 0;
    for header in &lines[1..] {
        let Some((name, value)) = header.split_once(':') else {
            return Err(ReadError::Bad("malformed header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .map_err(|_| ReadError::Bad("invalid Content-Length"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // A body we do not decode: answer, then close.
            keep_alive = false;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    if content_length > MAX_BODY {
        return Err(ReadError::Bad("request body too large"));
    }
    if content_length > 0 {
        let read = tokio::io::copy(&mut (&mut *rd).take(content_length), &mut tokio::io::sink())
            .await
            .map_err(ReadError::Io)?;
        if read < content_length {
            return Err(ReadError::Bad("connection closed inside the request body"));
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Some(Request {
        method: method.to_owned(),
        target: target.to_owned(),
        path: percent_decode(path, false),
        query: parse_query(query),
        keep_alive,
    }))
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        410 => "Gone",
        500 => "Internal Server Error",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

async fn respond(
    wr: &mut OwnedWriteHalf,
    code: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {content_type}\r\nCache-Control: no-cache, private\r\n\
         Content-Length: {}\r\n{}\r\n",
        reason_phrase(code),
        body.len(),
        if keep_alive { "" } else { "Connection: close\r\n" },
    );
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    wr.write_all(&bytes).await
}

/// Ok: 200 with the object; Err: the Status, with its code.
async fn respond_json(
    wr: &mut OwnedWriteHalf,
    result: Result<Value, Value>,
    keep_alive: bool,
) -> io::Result<()> {
    let (code, body) = match result {
        Ok(body) => (200, body),
        Err(status) => {
            let code = status
                .get("code")
                .and_then(Value::as_u64)
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(500);
            (code, status)
        }
    };
    respond(
        wr,
        code,
        "application/json",
        body.to_string().as_bytes(),
        keep_alive,
    )
    .await
}

async fn write_chunk(wr: &mut OwnedWriteHalf, data: &str) -> io::Result<()> {
    let mut bytes = format!("{:x}\r\n", data.len()).into_bytes();
    bytes.extend_from_slice(data.as_bytes());
    bytes.extend_from_slice(b"\r\n");
    wr.write_all(&bytes).await
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut shutdown: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            // Sent by stop, or the handle was dropped.
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(serve_connection(shared.clone(), stream));
                }
                Err(e) => {
                    // E.g. out of file descriptors: retry, without spinning.
                    log::debug!("fake apiserver: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: TcpStream) {
    // Events must leave as soon as they are written.
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let request = match read_request(&mut rd).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(ReadError::Io(e)) => {
                log::debug!("fake apiserver: reading a request: {e}");
                return;
            }
            Err(ReadError::Bad(message)) => {
                let _ = respond_json(&mut wr, Err(bad_request(message)), false).await;
                return;
            }
        };
        match handle(&shared, &request, &mut rd, &mut wr).await {
            Ok(true) if request.keep_alive => {}
            Ok(_) => return,
            Err(e) => {
                log::debug!("fake apiserver: answering {}: {e}", request.target);
                return;
            }
        }
    }
}

/// Answers one request; Ok(false) when the connection must close.
async fn handle(
    shared: &Arc<Shared>,
    request: &Request,
    rd: &mut BufReader<OwnedReadHalf>,
    wr: &mut OwnedWriteHalf,
) -> io::Result<bool> {
    let route = route(&request.path);
    let watch = param(&request.query, "watch").and_then(parse_bool) == Some(true);
    let is_get = request.method == "GET";
    let (kind, verb) = match &route {
        Route::Resource(scope) if is_get && watch => (Some(scope.kind), Verb::Watch),
        Route::Resource(scope) if is_get && scope.name.is_some() => (Some(scope.kind), Verb::Get),
        Route::Resource(scope) if is_get => (Some(scope.kind), Verb::List),
        Route::Resource(scope) => (Some(scope.kind), Verb::Other),
        _ => (None, Verb::Other),
    };
    lock(shared).api.requests.push(RequestRecord {
        line: format!("{} {}", request.method, request.target),
        kind,
        verb,
    });
    let keep_alive = request.keep_alive;
    let route = match route {
        Route::Resource(scope) if lock(shared).unserved.contains(&scope.kind) => Route::NotFound,
        route => route,
    };
    if !is_get {
        // A response to HEAD has no body: close rather than confuse.
        let keep_alive = keep_alive && request.method != "HEAD";
        let status = status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        );
        respond_json(wr, Err(status), keep_alive).await?;
        return Ok(keep_alive);
    }
    match route {
        Route::Resource(scope) if watch => serve_watch(shared, &scope, request, rd, wr).await,
        Route::Resource(scope) => {
            let result = {
                let mut inner = lock(shared);
                if scope.name.is_some() {
                    get_object(&inner.api, &scope).map(|object| object.to_string())
                } else {
                    list(&mut inner.api, &scope, &request.query)
                }
            };
            match result {
                Ok(body) => respond(wr, 200, "application/json", body.as_bytes(), keep_alive).await?,
                Err(status) => respond_json(wr, Err(status), keep_alive).await?,
            }
            Ok(true)
        }
        Route::Version => {
            respond_json(wr, Ok(version_info()), keep_alive).await?;
            Ok(true)
        }
        Route::Health => {
            respond(wr, 200, "text/plain; charset=utf-8", b"ok", keep_alive).await?;
            Ok(true)
        }
        Route::NotFound => {
            let status = status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            );
            respond_json(wr, Err(status), keep_alive).await?;
            Ok(true)
        }
    }
}

/// Streams a watch until its timeout (clean end: the connection stays
/// usable), `drop_watches`, the client going away, or a write error.
async fn serve_watch(
    shared: &Arc<Shared>,
    scope: &Scope,
    request: &Request,
    rd: &mut BufReader<OwnedReadHalf>,
    wr: &mut OwnedWriteHalf,
) -> io::Result<bool> {
    let query = &request.query;
    let keep_alive = request.keep_alive;
    let filter = match Filter::new(scope, query) {
        Ok(filter) => filter,
        Err(message) => {
            respond_json(wr, Err(bad_request(message)), keep_alive).await?;
            return Ok(true);
        }
    };
    let timeout = match param(query, "timeoutSeconds").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(0) => None,
            Ok(secs) => Some(Duration::from_secs(secs)),
            Err(_) => {
                respond_json(
                    wr,
                    Err(bad_request(format!("invalid timeoutSeconds {v:?}"))),
                    keep_alive,
                )
                .await?;
                return Ok(true);
            }
        },
    };
    let bookmarks = param(query, "allowWatchBookmarks").and_then(parse_bool) == Some(true);
    let send_initial = param(query, "sendInitialEvents").and_then(parse_bool);
    let rv = param(query, "resourceVersion").unwrap_or("");
    let start = start_watch(&mut lock(shared), scope, &filter, rv, send_initial);
    let (lines, mut rx, _guard) = match start {
        WatchStart::Rejected(status) => {
            respond_json(wr, Err(status), keep_alive).await?;
            return Ok(true);
        }
        WatchStart::Expired(status) => {
            // In-band, after a 200, as real servers do: kube-rs relists on
            // an ERROR event with code 410, but retries an HTTP 410 forever.
            write_watch_head(wr, keep_alive).await?;
            write_chunk(wr, &event_line("ERROR", &status)).await?;
            wr.write_all(b"0\r\n\r\n").await?;
            return Ok(true);
        }
        WatchStart::Stream { lines, rx, id } => {
            let guard = WatchGuard {
                shared: shared.clone(),
                id,
            };
            (lines, rx, guard)
        }
    };
    write_watch_head(wr, keep_alive).await?;
    for line in &lines {
        write_chunk(wr, line).await?;
    }
    // checked_add: a huge timeoutSeconds or interval means "never".
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    let next_tick = |shared: &Shared| {
        let interval = lock(shared).bookmark_interval;
        // Zero disables bookmarks; look again later in case that changes.
        let wait = if interval.is_zero() {
            Duration::from_millis(100)
        } else {
            interval
        };
        Instant::now().checked_add(wait)
    };
    let mut next_bookmark = if bookmarks { next_tick(shared) } else { None };
    let mut probe = [0u8; 64];
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(WatchMsg::Change(change)) => {
                    if let Some(line) = change_line(&change, &filter) {
                        write_chunk(wr, &line).await?;
                    }
                }
                // drop_watches, or the server is going away: no clean end.
                Some(WatchMsg::Drop) | None => return Ok(false),
            },
            () = sleep_until_opt(next_bookmark) => {
                let (rv, interval) = {
                    let inner = lock(shared);
                    (inner.api.rv, inner.bookmark_interval)
                };
                // Every change up to `rv` is queued by now: send those first,
                // so a bookmark never gets ahead of an event.
                while let Ok(msg) = rx.try_recv() {
                    match msg {
                        WatchMsg::Change(change) => {
                            if let Some(line) = change_line(&change, &filter) {
                                write_chunk(wr, &line).await?;
                            }
                        }
                        WatchMsg::Drop => return Ok(false),
                    }
                }
                if !interval.is_zero() {
                    write_chunk(wr, &bookmark_line(scope.kind, rv, false)).await?;
                }
                next_bookmark = next_tick(shared);
            },
            () = sleep_until_opt(deadline) => {
                wr.write_all(b"0\r\n\r\n").await?;
                return Ok(true);
            },
            // A client does not send during a watch: EOF (or anything) means
            // it is gone.
            _ = rd.read(&mut probe) => return Ok(false),
        }
    }
}

async fn write_watch_head(wr: &mut OwnedWriteHalf, keep_alive: bool) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nCache-Control: no-cache, private\r\n\
         Transfer-Encoding: chunked\r\n{}\r\n",
        if keep_alive { "" } else { "Connection: close\r\n" },
    );
    wr.write_all(head.as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures_util::StreamExt;
    use kube::api::{Api, ListParams, WatchEvent, WatchParams};
    use kube::runtime::{WatchStreamExt, watcher};
    use kube::{Client, ResourceExt};
    use tokio::sync::mpsc::UnboundedReceiver;
    use tokio::time::timeout;

    /// Bound on every wait: generous, tests normally take milliseconds.
    const STEP: Duration = Duration::from_secs(5);
    const HEADLESS: &str = "service.kubernetes.io/headless";

    type Item = Result<watcher::Event<Service>, String>;

    fn start_local() -> FakeApiServer {
        FakeApiServer::start(std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0"))
    }

    fn client(server: &FakeApiServer) -> Client {
        let url = server.url().parse().expect("the server URL is a URI");
        // kube builds a rustls connector even for http://, and rustls panics
        // when no crypto provider is compiled in: say what to fix.
        let built = std::panic::catch_unwind(|| Client::try_from(kube::Config::new(url)));
        built
            .unwrap_or_else(|_| {
                panic!(
                    "kube::Client::try_from panicked: rustls has no CryptoProvider; enable kube's \
                     `ring` (or `aws-lc-rs`) feature next to `rustls-tls` in redirector/Cargo.toml"
                )
            })
            .expect("a kube client for the fake server")
    }

    fn service(namespace: &str, name: &str, labels: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name, "namespace": namespace, "labels": labels },
            "spec": { "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }] },
        })
    }

    /// Drives kube-rs's watcher (with its default backoff) in a task, so it
    /// progresses (e.g. reconnects) while the test waits on the server.
    fn spawn_watcher(api: Api<Service>, config: watcher::Config) -> UnboundedReceiver<Item> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut stream = Box::pin(watcher(api, config).default_backoff());
            while let Some(item) = stream.next().await {
                if tx.send(item.map_err(|e| e.to_string())).is_err() {
                    break;
                }
            }
        });
        rx
    }

    /// The next watcher event; errors (each failed attempt of a recovering
    /// watcher is reported) are collected in `errors`.
    async fn next_event(
        rx: &mut UnboundedReceiver<Item>,
        errors: &mut Vec<String>,
    ) -> watcher::Event<Service> {
        loop {
            match timeout(STEP, rx.recv()).await {
                Ok(Some(Ok(event))) => return event,
                Ok(Some(Err(e))) => errors.push(e),
                Ok(None) => panic!("the watcher task ended (errors: {errors:?})"),
                Err(_) => panic!("no watcher event within {STEP:?} (errors: {errors:?})"),
            }
        }
    }

    async fn expect_events(rx: &mut UnboundedReceiver<Item>, errors: &mut Vec<String>, expected: &[&str]) {
        for want in expected {
            let got = next_event(rx, errors).await.to_string();
            assert_eq!(
                got, *want,
                "watcher events: expected {expected:?} in order (errors: {errors:?})"
            );
        }
    }

    async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + STEP;
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends raw bytes, returns everything until the server closes.
    async fn raw_exchange(addr: SocketAddr, request: &str) -> String {
        let mut stream = timeout(STEP, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connecting to the fake server");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("sending the request");
        let mut out = Vec::new();
        timeout(STEP, stream.read_to_end(&mut out))
            .await
            .expect("the server did not close the connection in time")
            .expect("reading the response");
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Head, de-chunked body, and whether the body ended with the last chunk.
    fn dechunk(response: &str) -> (String, String, bool) {
        let (head, mut body) = response
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of the response head in {response:?}"));
        let mut data = String::new();
        while let Some((size, rest)) = body.split_once("\r\n") {
            let size =
                usize::from_str_radix(size, 16).unwrap_or_else(|_| panic!("bad chunk size in {response:?}"));
            if size == 0 {
                return (head.to_owned(), data, rest == "\r\n");
            }
            data.push_str(&rest[..size]);
            body = &rest[size + 2..];
        }
        (head.to_owned(), data, false)
    }

    fn names(items: &[Service]) -> Vec<String> {
        items.iter().map(|s| s.name_any()).collect()
    }

    #[tokio::test]
    async fn list_pages_are_a_consistent_snapshot() {
        let server = start_local();
        for i in 0..7 {
            server.apply(service("default", &format!("svc-{i}"), json!({})));
        }
        let api: Api<Service> = Api::all(client(&server));
        let mut params = ListParams::default().limit(3);
        let first = timeout(STEP, api.list(&params))
            .await
            .expect("list timed out")
            .expect("first page");
        let rv = first
            .metadata
            .resource_version
            .clone()
            .expect("a list has a resourceVersion");
        assert_eq!(
            rv,
            server.resource_version().to_string(),
            "the list is at the latest RV"
        );
        assert_eq!(names(&first.items), ["svc-0", "svc-1", "svc-2"], "first page");
        assert_eq!(
            first.metadata.remaining_item_count,
            Some(4),
            "remainingItemCount without selectors"
        );
        // Changes between pages must not show in the later pages.
        server.apply(service("default", "svc-9", json!({})));
        server.apply(service("default", "svc-5", json!({ "changed": "yes" })));
        server.delete("Service", "default", "svc-4");
        let mut all = names(&first.items);
        let mut token = first.metadata.continue_;
        let mut pages = 1;
        while let Some(next) = token.filter(|t| !t.is_empty()) {
            params.continue_token = Some(next);
            let page = timeout(STEP, api.list(&params))
                .await
                .expect("list timed out")
                .expect("next page");
            assert_eq!(
                page.metadata.resource_version.as_deref(),
                Some(rv.as_str()),
                "every page is at the first page's RV"
            );
            assert!(
                page.items.iter().all(|s| s.labels().get("changed").is_none()),
                "pages show the snapshot, not later changes"
            );
            all.extend(names(&page.items));
            token = page.metadata.continue_;
            pages += 1;
        }
        let expected: Vec<String> = (0..7).map(|i| format!("svc-{i}")).collect();
        assert_eq!(all, expected, "all 7 services, once each, in order");
        assert_eq!(pages, 3, "7 items in pages of 3");
        assert_eq!(server.list_count("Service"), 3, "one request per page");

        // A continue token whose snapshot is compacted is expired (410).
        params.continue_token = None;
        let page = api.list(&params).await.expect("first page again");
        server.compact();
        params.continue_token = page.metadata.continue_;
        match timeout(STEP, api.list(&params)).await.expect("list timed out") {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 410, "an expired continue token is 410: {status:?}");
                assert_eq!(status.reason, "Expired", "reason of an expired token");
            }
            other => panic!("continuing a compacted list must fail with 410, got {other:?}"),
        }
        assert_eq!(server.expired_count(), 1, "the server counted the 410");
    }

    #[tokio::test]
    async fn watcher_lists_then_follows_changes() {
        let server = start_local();
        server.apply(service("b-ns", "one", json!({})));
        server.apply(service("a-ns", "two", json!({})));
        let mut rx = spawn_watcher(Api::all(client(&server)), watcher::Config::default());
        let mut errors = Vec::new();
        expect_events(
            &mut rx,
            &mut errors,
            &["Init", "InitApply(two)", "InitApply(one)", "InitDone"],
        )
        .await;

        server.apply(service("a-ns", "three", json!({})));
        expect_events(&mut rx, &mut errors, &["Apply(three)"]).await;
        server.apply(service("b-ns", "one", json!({ "app": "x" })));
        match next_event(&mut rx, &mut errors).await {
            watcher::Event::Apply(svc) => {
                assert_eq!(svc.name_any(), "one", "the modified service");
                assert_eq!(
                    svc.labels().get("app").map(String::as_str),
                    Some("x"),
                    "the new state"
                );
                assert_eq!(
                    svc.resource_version(),
                    Some(server.resource_version().to_string()),
                    "the event carries the change's RV"
                );
                let spec = svc.spec.expect("a spec");
                assert!(
                    spec.cluster_ip
                        .as_deref()
                        .is_some_and(|ip| ip.starts_with("10.96.")),
                    "a clusterIP was allocated: {:?}",
                    spec.cluster_ip
                );
            }
            other => panic!("expected Apply(one), got {other}"),
        }
        // Applying the same object again changes nothing: no event.
        server.apply(service("b-ns", "one", json!({ "app": "x" })));
        server.delete("Service", "a-ns", "two");
        expect_events(&mut rx, &mut errors, &["Delete(two)"]).await;
        assert!(errors.is_empty(), "no watcher errors: {errors:?}");
        assert_eq!(server.list_count("Service"), 1, "one LIST");
        assert_eq!(server.watch_count("Service"), 1, "one WATCH");
        let requests = server.requests();
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with("GET /api/v1/services?") && r.contains("limit=500")),
            "kube-rs lists in pages of 500: {requests:?}"
        );
        assert!(
            requests
                .iter()
                .any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")),
            "kube-rs watches with bookmarks: {requests:?}"
        );
    }

    #[tokio::test]
    async fn streaming_list_watcher_gets_initial_events() {
        let server = start_local();
        server.apply(service("default", "a", json!({})));
        let config = watcher::Config::default().streaming_lists();
        let mut rx = spawn_watcher(Api::all(client(&server)), config);
        let mut errors = Vec::new();
        expect_events(&mut rx, &mut errors, &["Init", "InitApply(a)", "InitDone"]).await;
        server.apply(service("default", "b", json!({})));
        expect_events(&mut rx, &mut errors, &["Apply(b)"]).await;
        assert!(errors.is_empty(), "no watcher errors: {errors:?}");
        assert_eq!(server.list_count("Service"), 0, "a streaming list does not LIST");
    }

    #[tokio::test]
    async fn label_selector_transitions_are_added_and_deleted() {
        let server = start_local();
        server.apply(service("default", "plain", json!({})));
        server.apply(service("default", "headless", json!({ HEADLESS: "" })));
        let config = watcher::Config::default().labels(&format!("!{HEADLESS}"));
        let mut rx = spawn_watcher(Api::all(client(&server)), config);
        let mut errors = Vec::new();
        expect_events(&mut rx, &mut errors, &["Init", "InitApply(plain)", "InitDone"]).await;

        server.apply(service("default", "plain", json!({ HEADLESS: "" })));
        match next_event(&mut rx, &mut errors).await {
            watcher::Event::Delete(svc) => {
                assert_eq!(svc.name_any(), "plain", "the service that left the selection");
                assert!(
                    svc.labels().get(HEADLESS).is_none(),
                    "DELETED carries the last state that matched"
                );
            }
            other => panic!("labelling a watched service headless must delete it, got {other}"),
        }
        server.apply(service("default", "plain", json!({})));
        expect_events(&mut rx, &mut errors, &["Apply(plain)"]).await;
        server.apply(service("default", "headless", json!({})));
        expect_events(&mut rx, &mut errors, &["Apply(headless)"]).await;
        // A change invisible to the selection yields nothing; the next one does.
        server.apply(service("default", "other", json!({ HEADLESS: "" })));
        server.delete("Service", "default", "other");
        server.delete("Service", "default", "headless");
        expect_events(&mut rx, &mut errors, &["Delete(headless)"]).await;
        assert!(errors.is_empty(), "no watcher errors: {errors:?}");
    }

    #[test]
    fn label_selector_syntax() {
        let labels = json!({ "a": "1", "b": "x", "n": "7" });
        let labels = labels.as_object();
        let matches = |selector: &str| {
            parse_label_selector(selector)
                .unwrap_or_else(|e| panic!("{selector:?} must parse: {e}"))
                .iter()
                .all(|req| req.matches(labels))
        };
        for selector in [
            "",
            "a",
            "!c",
            "a=1",
            "a==1",
            "a!=2",
            "c!=2",
            "a in (1,2)",
            "b notin (y, z)",
            "c notin (x)",
            "n>5",
            "n<8",
            " a = 1 , b , !c ",
            "example.com/c-d_e.f!=v",
        ] {
            assert!(matches(selector), "{selector:?} must match {labels:?}");
        }
        for selector in [
            "c",
            "!a",
            "a=2",
            "a!=1",
            "a in (2,3)",
            "b notin (x)",
            "n>7",
            "a,c",
        ] {
            assert!(!matches(selector), "{selector:?} must not match {labels:?}");
        }
        for bad in [
            "a=1,", ",a", "a in 1", "a in ()", "a b", "!", "=1", "a=b c", "n>x", "a=(1)",
        ] {
            assert!(parse_label_selector(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[tokio::test]
    async fn expired_watch_makes_the_watcher_relist() {
        let server = start_local();
        server.apply(service("default", "a", json!({})));
        server.apply(service("default", "b", json!({})));
        let mut rx = spawn_watcher(Api::all(client(&server)), watcher::Config::default());
        let mut errors = Vec::new();
        expect_events(
            &mut rx,
            &mut errors,
            &["Init", "InitApply(a)", "InitApply(b)", "InitDone"],
        )
        .await;
        wait_until("the watcher's WATCH", || server.open_watch_count("Service") == 1).await;

        // The connection drops and, before the watcher resumes, its RV is
        // compacted away: the resumed watch gets ERROR 410.
        server.drop_watches();
        server.compact();
        server.apply(service("default", "c", json!({})));
        server.delete("Service", "default", "a");
        expect_events(
            &mut rx,
            &mut errors,
            &["Init", "InitApply(b)", "InitApply(c)", "InitDone"],
        )
        .await;
        assert!(
            errors.iter().any(|e| e.contains("too old resource version")),
            "the watcher reported the 410: {errors:?}"
        );
        assert_eq!(server.expired_count(), 1, "one in-band 410");
        assert_eq!(server.list_count("Service"), 2, "the 410 caused a second LIST");
        assert!(
            server.watch_count("Service") >= 2,
            "the watch was resumed before the relist"
        );
        server.apply(service("default", "d", json!({})));
        expect_events(&mut rx, &mut errors, &["Apply(d)"]).await;
    }

    #[tokio::test]
    async fn bookmarks_and_watch_timeout() {
        let server = start_local();
        server.set_bookmark_interval(Duration::from_millis(100));
        server.apply(service("default", "a", json!({})));
        let api: Api<Service> = Api::all(client(&server));
        let rv = server.resource_version().to_string();
        let stream = timeout(STEP, api.watch(&WatchParams::default(), &rv))
            .await
            .expect("watch timed out")
            .expect("starting a watch");
        let mut stream = Box::pin(stream);
        server.apply(service("default", "b", json!({})));
        let mut added = false;
        loop {
            let event = timeout(STEP, stream.next())
                .await
                .expect("no watch event in time")
                .expect("the watch ended")
                .expect("a watch event");
            match event {
                WatchEvent::Added(svc) => {
                    assert_eq!(svc.name_any(), "b", "only changes after the RV");
                    added = true;
                }
                WatchEvent::Bookmark(bookmark) => {
                    assert!(added, "the bookmark comes after the event it covers");
                    assert_eq!(bookmark.types.kind, "Service", "bookmark kind");
                    assert_eq!(bookmark.types.api_version, "v1", "bookmark apiVersion");
                    assert_eq!(
                        bookmark.metadata.resource_version,
                        server.resource_version().to_string(),
                        "bookmark at the latest RV"
                    );
                    break;
                }
                other => panic!("unexpected watch event {other:?}"),
            }
        }

        // Raw: watch=1, chunked, bookmarks, and a clean end at timeoutSeconds.
        let request = format!(
            "GET /api/v1/namespaces/default/services?watch=1&resourceVersion={rv}&allowWatchBookmarks=true\
             &timeoutSeconds=1 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        );
        let started = std::time::Instant::now();
        let response = raw_exchange(server.addr(), &request).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "timeoutSeconds=1 ends the watch"
        );
        let (head, body, terminated) = dechunk(&response);
        assert!(head.starts_with("HTTP/1.1 200 OK"), "watch status: {head}");
        assert!(
            head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
            "chunked watch: {head}"
        );
        assert!(terminated, "the stream ends with the last chunk: {response:?}");
        let events: Vec<Value> = body
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("event {line:?}: {e}")))
            .collect();
        assert_eq!(
            events[0]["type"], "ADDED",
            "first the replayed change: {events:?}"
        );
        assert_eq!(
            events[0]["object"]["metadata"]["name"], "b",
            "the replayed object"
        );
        assert!(
            events.iter().skip(1).any(|e| e["type"] == "BOOKMARK"),
            "bookmarks every 100 ms: {events:?}"
        );
    }

    #[tokio::test]
    async fn restarted_server_resumes_the_watch() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let server = FakeApiServer::start(listener);
        server.apply(service("default", "a", json!({})));
        let mut rx = spawn_watcher(Api::all(client(&server)), watcher::Config::default());
        let mut errors = Vec::new();
        expect_events(&mut rx, &mut errors, &["Init", "InitApply(a)", "InitDone"]).await;
        wait_until("the watcher's WATCH", || server.open_watch_count("Service") == 1).await;

        let state = server.stop();
        // While down, the watcher reports failed attempts (and backs off).
        match timeout(STEP, rx.recv()).await {
            Ok(Some(Err(e))) => errors.push(e),
            other => panic!("a watcher error while the server is down, got {other:?}"),
        }
        let server = FakeApiServer::start_with_state(
            std::net::TcpListener::bind(addr).expect("binding the same address again"),
            state,
        );
        server.apply(service("default", "b", json!({})));
        expect_events(&mut rx, &mut errors, &["Apply(b)"]).await;
        assert_eq!(server.list_count("Service"), 1, "resumed from its RV, no relist");
        assert_eq!(
            server
                .get("Service", "default", "a")
                .map(|a| a["metadata"]["name"].clone()),
            Some(json!("a")),
            "objects survive the restart"
        );
    }

    #[tokio::test]
    async fn restart_with_compacted_history_relists() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let server = FakeApiServer::start(listener);
        server.apply(service("default", "a", json!({})));
        let mut rx = spawn_watcher(Api::all(client(&server)), watcher::Config::default());
        let mut errors = Vec::new();
        expect_events(&mut rx, &mut errors, &["Init", "InitApply(a)", "InitDone"]).await;
        wait_until("the watcher's WATCH", || server.open_watch_count("Service") == 1).await;

        let mut state = server.stop();
        state.compact();
        let server = FakeApiServer::start_with_state(
            std::net::TcpListener::bind(addr).expect("binding the same address again"),
            state,
        );
        server.apply(service("default", "b", json!({})));
        expect_events(
            &mut rx,
            &mut errors,
            &["Init", "InitApply(a)", "InitApply(b)", "InitDone"],
        )
        .await;
        assert_eq!(
            server.list_count("Service"),
            2,
            "the compacted RV forced a relist"
        );
    }

    /// Nodes are cluster-scoped: listed, got and watched without a
    /// namespace, one selected by a field selector on its name.
    #[tokio::test]
    async fn nodes_are_cluster_scoped_and_selected_by_name() {
        let server = start_local();
        let node = |name: &str, zone: &str| {
            json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "namespace": "ignored",
                             "labels": {"topology.kubernetes.io/zone": zone}},
            })
        };
        server.apply(node("node-1", "zone-a"));
        server.apply(node("node-2", "zone-b"));
        let api: Api<Node> = Api::all(client(&server));
        let listed = api
            .list(&ListParams::default().fields("metadata.name=node-1"))
            .await
            .expect("listing one Node");
        let names: Vec<String> = listed.items.iter().map(ResourceExt::name_any).collect();
        assert_eq!(names, ["node-1"], "the field selector picks one Node");
        assert_eq!(
            listed.items[0].metadata.namespace, None,
            "a Node has no namespace"
        );
        let got = api.get("node-2").await.expect("getting a Node");
        assert_eq!(
            got.labels()
                .get("topology.kubernetes.io/zone")
                .map(String::as_str),
            Some("zone-b"),
            "GET returns the Node"
        );
        assert!(
            server.get("Node", "", "node-1").is_some(),
            "stored without a namespace"
        );

        let params = WatchParams::default().fields("metadata.name=node-1");
        let version = listed
            .metadata
            .resource_version
            .clone()
            .expect("list resourceVersion");
        let mut events = Box::pin(api.watch(&params, &version).await.expect("watching"));
        server.apply(node("node-2", "zone-c"));
        server.apply(node("node-1", "zone-c"));
        let event = timeout(STEP, events.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .expect("a good event");
        match event {
            WatchEvent::Modified(node) => {
                assert_eq!(node.name_any(), "node-1", "only the selected Node is watched");
                assert_eq!(
                    node.labels()
                        .get("topology.kubernetes.io/zone")
                        .map(String::as_str),
                    Some("zone-c"),
                    "its new label"
                );
            }
            other => panic!("expected node-1 modified, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn service_cidrs_are_cluster_scoped_and_can_be_unserved() {
        let server = start_local();
        let cidr = |name: &str, range: &str| {
            json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "ServiceCIDR",
                // A namespace is dropped, as for any cluster-scoped kind.
                "metadata": { "name": name, "namespace": "ignored" },
                "spec": { "cidrs": [range] },
            })
        };
        let stored = server.apply(cidr("kubernetes", "10.96.0.0/12"));
        assert!(
            stored.pointer("/metadata/namespace").is_none(),
            "no namespace stored: {stored}"
        );
        let api: Api<ServiceCIDR> = Api::all(client(&server));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let watched = api.clone();
        tokio::spawn(async move {
            let mut stream = Box::pin(watcher(watched, watcher::Config::default()).default_backoff());
            while let Some(item) = stream.next().await {
                let item = item.map(|event| match event {
                    watcher::Event::Apply(o) => format!("Apply({})", o.name_any()),
                    watcher::Event::Delete(o) => format!("Delete({})", o.name_any()),
                    watcher::Event::InitApply(o) => format!("InitApply({})", o.name_any()),
                    watcher::Event::Init => "Init".to_owned(),
                    watcher::Event::InitDone => "InitDone".to_owned(),
                });
                if tx.send(item.map_err(|e| e.to_string())).is_err() {
                    break;
                }
            }
        });
        let mut next = async || {
            timeout(STEP, rx.recv())
                .await
                .expect("no watcher event in time")
                .expect("the watcher task ended")
                .expect("a watcher event, not an error")
        };
        for want in ["Init", "InitApply(kubernetes)", "InitDone"] {
            assert_eq!(next().await, want, "the initial list");
        }
        server.apply(cidr("extra", "10.100.0.0/16"));
        assert_eq!(next().await, "Apply(extra)", "an added ServiceCIDR");
        assert!(
            server.delete("ServiceCIDR", "", "extra").is_some(),
            "deleted by name alone"
        );
        assert_eq!(next().await, "Delete(extra)", "a deleted ServiceCIDR");
        let one = api.get("kubernetes").await.expect("GET of a ServiceCIDR");
        assert_eq!(
            one.spec.and_then(|s| s.cidrs),
            Some(vec!["10.96.0.0/12".to_owned()]),
            "the stored spec"
        );
        let response = raw_exchange(
            server.addr(),
            "GET /apis/networking.k8s.io/v1/namespaces/default/servicecidrs HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            response.starts_with("HTTP/1.1 404"),
            "no namespaced path for a cluster-scoped kind: {response}"
        );

        server.set_served("ServiceCIDR", false);
        match api.list(&ListParams::default()).await {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 404, "unserved kind: {status:?}"),
            other => panic!("LIST of an unserved kind must be 404, got {other:?}"),
        }
        match api.get("kubernetes").await {
            Err(kube::Error::Api(status)) => assert_eq!(status.code, 404, "unserved kind: {status:?}"),
            other => panic!("GET of an unserved kind must be 404, got {other:?}"),
        }
        server.set_served("ServiceCIDR", true);
        let list = api.list(&ListParams::default()).await.expect("served again");
        assert_eq!(list.items.len(), 1, "the objects were kept while unserved");
    }

    #[tokio::test]
    async fn endpoint_slices_get_and_http_errors() {
        let server = start_local();
        let applied = server.apply_yaml(
            "apiVersion: discovery.k8s.io/v1\n\
             kind: EndpointSlice\n\
             metadata:\n  name: web-abc\n  namespace: demo\n  labels:\n    kubernetes.io/service-name: web\n\
             addressType: IPv4\n\
             endpoints:\n- addresses: [10.0.0.5]\n  conditions: {ready: true}\n\
             ports:\n- name: http\n  port: 8080\n\
             ---\n\
             apiVersion: v1\n\
             kind: Service\n\
             metadata: {name: web, namespace: demo}\n\
             spec: {clusterIP: 10.96.0.50, ports: [{port: 80}]}\n",
        );
        assert_eq!(applied.len(), 2, "two documents applied");
        let c = client(&server);
        let slices: Api<EndpointSlice> = Api::namespaced(c.clone(), "demo");
        let list = timeout(
            STEP,
            slices.list(&ListParams::default().labels("kubernetes.io/service-name=web")),
        )
        .await
        .expect("list timed out")
        .expect("listing slices");
        assert_eq!(list.items.len(), 1, "the slice is selected by its service label");
        assert_eq!(
            list.items[0]
                .ports
                .as_ref()
                .and_then(|p| p[0].protocol.clone())
                .as_deref(),
            Some("TCP"),
            "port protocol defaulted"
        );
        let services: Api<Service> = Api::namespaced(c, "demo");
        let web = services.get("web").await.expect("GET of an existing service");
        assert_eq!(
            web.spec.and_then(|s| s.ports).map(|p| p[0].target_port.clone()),
            Some(Some(
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(80)
            )),
            "targetPort defaults to port"
        );
        match services.get("missing").await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 404, "missing object: {status:?}");
                assert_eq!(status.reason, "NotFound", "missing object reason");
            }
            other => panic!("GET of a missing service must be 404, got {other:?}"),
        }
        assert!(
            server
                .try_apply(json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "p" } }))
                .is_err(),
            "unsupported kinds are refused"
        );

        let addr = server.addr();
        let response = raw_exchange(addr, "GET /api/v1/pods HTTP/1.1\r\nConnection: close\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 404"), "unknown path: {response}");
        assert!(
            response.contains("\"kind\":\"Status\""),
            "404 is a Status: {response}"
        );
        let response = raw_exchange(
            addr,
            "POST /api/v1/namespaces/demo/services HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 405"), "POST: {response}");
        assert!(
            response.contains("MethodNotAllowed"),
            "405 is a Status: {response}"
        );
        let response = raw_exchange(addr, "garbage\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 400"), "garbage: {response}");
        let response = raw_exchange(
            addr,
            "GET /api/v1/services?labelSelector=a+b HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(response.starts_with("HTTP/1.1 400"), "a bad selector: {response}");
        // Keep-alive: two requests on one connection, the second closing it.
        let response = raw_exchange(
            addr,
            "GET /version HTTP/1.1\r\n\r\nGET /api/v1/namespaces/demo/services/web HTTP/1.1\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(
            response.matches("HTTP/1.1 200 OK").count(),
            2,
            "two answers: {response}"
        );
        assert!(
            response.contains("\"gitVersion\""),
            "the /version answer: {response}"
        );
        assert!(
            response.contains("\"clusterIP\":\"10.96.0.50\""),
            "the GET answer: {response}"
        );
        assert!(
            server
                .requests()
                .iter()
                .any(|r| r == "GET /api/v1/namespaces/demo/services/web"),
            "the request log: {:?}",
            server.requests()
        );
    }
}
