//! The live source: Services and EndpointSlices watched from the Kubernetes
//! API with kube-proxy's label selector, and ServiceCIDRs (the service
//! ranges), reflected into local caches.
//!
//! Each watcher runs `watcher(..).default_backoff().reflect(..)`: on a dropped
//! connection or an expired resourceVersion (410) it relists, and the cache is
//! replaced whole once the relist is complete, so the model computed from it is
//! never a partial list. While the API server is unreachable the caches (and
//! so the datapath) keep their last state.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use kube::api::ListParams;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};
use tokio::sync::mpsc;

use super::compact::{CompactService, CompactSlice};
use super::endpoints::{ClusterIp, cluster_ip, entries_with, namespace_of, slice_candidates};
use super::service_cidrs::ServiceRanges;
use super::{SourceObject, Update, Warning};
use crate::model::{Frontend, Ipv4Cidr, NamespacedName, NodeTopology, ServicePort};

/// Services with this label belong to another proxy unless it names us.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services with this label are never proxied.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: not in a pod, and no kubeconfig (--kubeconfig, KUBECONFIG, \
         ~/.kube/config)"
    )]
    Infer { source: kube::config::InferConfigError },
    #[error("invalid --api-server {url:?}: {reason}")]
    ApiServer { url: String, reason: String },
    #[error("creating the Kubernetes client")]
    Client { source: kube::Error },
}

/// How to reach the API server.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    pub kubeconfig: Option<PathBuf>,
    /// Overrides the server address of whatever config was found (so the agent
    /// never depends on a ClusterIP it programs itself).
    pub api_server: Option<String>,
}

/// kube-proxy's selector: no headless label, and no proxy-name label unless
/// it names this proxy. Applied to Services and EndpointSlices alike (the
/// EndpointSlice controller copies Service labels onto slices).
pub fn label_selector(service_proxy_name: Option<&str>) -> String {
    match service_proxy_name {
        Some(name) => format!("{SERVICE_PROXY_NAME_LABEL}={name},!{HEADLESS_LABEL}"),
        None => format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"),
    }
}

pub async fn client(connection: &Connection) -> Result<Client, KubeSourceError> {
    let mut config = match &connection.kubeconfig {
        Some(path) => {
            let kubeconfig =
                kube::config::Kubeconfig::read_from(path).map_err(|source| KubeSourceError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?;
            Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| KubeSourceError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => match (Config::infer().await, &connection.api_server) {
            (Ok(config), _) => config,
            // Only an address: plain config for it (tests, or a local proxy).
            (Err(_), Some(url)) => Config::new(parse_url(url)?),
            (Err(source), None) => return Err(KubeSourceError::Infer { source }),
        },
    };
    if let Some(url) = &connection.api_server {
        config.cluster_url = parse_url(url)?;
    }
    Client::try_from(config).map_err(|source| KubeSourceError::Client { source })
}

fn parse_url(url: &str) -> Result<http::Uri, KubeSourceError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| KubeSourceError::ApiServer {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
    if uri.scheme().is_none() || uri.host().is_none() {
        return Err(KubeSourceError::ApiServer {
            url: url.to_owned(),
            reason: "expected a URL such as https://10.0.0.1:6443".into(),
        });
    }
    Ok(uri)
}

/// What one watch event touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A Service.
    Service(NamespacedName),
    /// An EndpointSlice of a Service.
    Slice {
        service: NamespacedName,
        name: String,
        /// Its `endpoints.kubernetes.io/last-change-trigger-time`; none for a
        /// deletion, whose annotation dates the slice's last update, not the
        /// deletion (kube-proxy ignores it too).
        trigger: Option<SystemTime>,
    },
    /// A ServiceCIDR, or their cache replaced by a (re)list: the service
    /// ranges may differ.
    ServiceCidrs,
    /// A cache was replaced by a (re)list: everything may differ.
    Relisted,
}

impl Change {
    /// The change as a deletion of the object reports it.
    fn deleted(self) -> Self {
        match self {
            Change::Slice { service, name, .. } => Change::Slice {
                service,
                name,
                trigger: None,
            },
            other => other,
        }
    }
}

/// Told of every change as its watcher applies it to the cache, before the
/// sync loop takes it from the channel (so a stuck loop still shows).
pub type ChangeHook = Arc<dyn Fn(&Change) + Send + Sync>;

/// The caches, a channel reporting each change (with the time it was
/// observed), and what each Service contributes to the model, so a change
/// is turned into the few frontends it affects.
pub struct KubeSource {
    services: Store<CompactService>,
    slices: Store<CompactSlice>,
    service_cidrs: ServiceCidrCache,
    pub changes: mpsc::UnboundedReceiver<(Instant, Change)>,
    frontends_of: HashMap<NamespacedName, Vec<Frontend>>,
    owner_of: HashMap<Frontend, NamespacedName>,
    /// Names of the slices seen for each Service (possibly stale: checked
    /// against the cache when used).
    /// (A Vec: nearly always one or two names, and a set's node is 300 bytes.)
    slices_of: HashMap<NamespacedName, Vec<String>>,
    /// The node endpoints are chosen for ([`Self::set_node`]).
    node: NodeTopology,
}

impl KubeSource {
    /// Starts the watchers on the current tokio runtime. `service_cidr`
    /// (`--service-cidr`) is the service range if the API server does not
    /// serve ServiceCIDR. `hook` is told of each change as it is observed.
    pub fn start(
        client: Client,
        service_proxy_name: Option<&str>,
        service_cidr: Option<Ipv4Cidr>,
        hook: ChangeHook,
    ) -> Self {
        let selector = label_selector(service_proxy_name);
        let (raw, changes) = mpsc::unbounded_channel();
        let tx = Reporter { channel: raw, hook };
        let services = spawn_reflector::<CompactService>(
            Api::all(client.clone()),
            watcher::Config::default().labels(&selector),
            "services",
            |svc| name_of(svc).map(Change::Service),
            tx.clone(),
        );
        let slices = spawn_reflector::<CompactSlice>(
            Api::all(client.clone()),
            watcher::Config::default().labels(&selector),
            "endpointslices",
            |slice| {
                Some(Change::Slice {
                    service: slice_owner(slice)?,
                    name: slice.metadata.name.clone()?,
                    trigger: slice.trigger_time(),
                })
            },
            tx.clone(),
        );
        let service_cidrs = ServiceCidrCache::start(Api::all(client), service_cidr, tx);
        Self {
            services,
            slices,
            service_cidrs,
            changes,
            frontends_of: HashMap::new(),
            owner_of: HashMap::new(),
            slices_of: HashMap::new(),
            node: NodeTopology::default(),
        }
    }

    /// Chooses endpoints for `node` from now on; what is programmed already
    /// changes only once every Service is computed again ([`Self::restart`]).
    pub fn set_node(&mut self, node: NodeTopology) {
        self.node = node;
    }

    /// Resolves once every cache holds a complete initial list (and the
    /// source of the service ranges is known).
    pub async fn wait_until_ready(&self) {
        // The writers live as long as their tasks, which never end (the
        // ServiceCIDR one is dropped only once its cache is ready).
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        let _ = self.service_cidrs.store.wait_until_ready().await;
    }

    /// The service ranges now, with what is wrong in the ServiceCIDRs.
    pub fn service_ranges(&self) -> (ServiceRanges, Vec<Warning>) {
        self.service_cidrs.ranges()
    }

    /// Starts the model over from the caches (after a relist): forgets which
    /// Service holds which frontend and returns every Service, sorted, so a
    /// frontend two Services claim goes to the same one every time. Feed
    /// them to [`Self::update`] (in parts: the model of a large cluster then
    /// never sits in memory whole), then remove what [`Self::holds`] denies.
    pub fn restart(&mut self) -> Vec<NamespacedName> {
        self.frontends_of.clear();
        self.owner_of.clear();
        self.slices_of.clear();
        for slice in self.slices.state() {
            if let (Some(service), Some(name)) = (slice_owner(&slice), &slice.metadata.name) {
                self.note_slice(service, name);
            }
        }
        let mut services: Vec<NamespacedName> =
            self.services.state().iter().filter_map(|s| name_of(s)).collect();
        services.sort_unstable();
        services
    }

    /// Whether a Service of the model holds `frontend`.
    pub fn holds(&self, frontend: &Frontend) -> bool {
        self.owner_of.contains_key(frontend)
    }

    /// What changed for the Services that `changes` touch since the model was
    /// last computed: only their frontends are recomputed.
    pub fn update(&mut self, changes: impl IntoIterator<Item = Change>) -> Update {
        let mut touched = BTreeSet::new();
        for change in changes {
            match change {
                Change::Service(service) => {
                    touched.insert(service);
                }
                Change::Slice { service, name, .. } => {
                    self.note_slice(service.clone(), &name);
                    touched.insert(service);
                }
                Change::Relisted | Change::ServiceCidrs => {}
            }
        }
        let mut update = Update::default();
        for service in touched {
            let old = self.frontends_of.remove(&service).unwrap_or_default();
            for fe in &old {
                self.owner_of.remove(fe);
            }
            let own = self.live_slices(&service);
            let reference = ObjectRef::<CompactService>::new(&service.name).within(&service.namespace);
            let new = match self.services.get(&reference) {
                Some(cached) => {
                    let own: Vec<&CompactSlice> = own.iter().map(AsRef::as_ref).collect();
                    let api = cached.to_api();
                    warn_of_sctp(&service, &api, &mut update.warnings);
                    self.claim(&service, entries(&api, &own, &self.node), &mut update.warnings)
                }
                None => Vec::new(),
            };
            let kept: Vec<Frontend> = new.iter().map(|(fe, _)| *fe).collect();
            update
                .removals
                .extend(old.into_iter().filter(|fe| !kept.contains(fe)));
            update.upserts.extend(new);
        }
        update
    }

    /// Remembers that slice `name` belongs to `service`.
    fn note_slice(&mut self, service: NamespacedName, name: &str) {
        let names = self.slices_of.entry(service).or_default();
        if !names.iter().any(|n| n == name) {
            names.push(name.to_owned());
        }
    }

    /// The cached slices of `service`. Names that no longer belong (deleted
    /// or relabelled) are forgotten, and the entry with the last of them, so
    /// deleted Services leave nothing behind.
    fn live_slices(&mut self, service: &NamespacedName) -> Vec<Arc<CompactSlice>> {
        let Some(names) = self.slices_of.get_mut(service) else {
            return Vec::new();
        };
        let own: Vec<Arc<CompactSlice>> = names
            .iter()
            .filter_map(|n| self.slices.get(&ObjectRef::new(n).within(&service.namespace)))
            .filter(|s| s.service_name() == Some(service.name.as_str()))
            .collect();
        names.retain(|n| own.iter().any(|s| s.metadata.name.as_deref() == Some(n)));
        if names.is_empty() {
            self.slices_of.remove(service);
        }
        own
    }

    /// Records that `service` serves `entries`, except frontends another
    /// Service holds already (warned about, as kube-proxy keeps the first).
    fn claim(
        &mut self,
        service: &NamespacedName,
        entries: Vec<(Frontend, ServicePort)>,
        warnings: &mut Vec<Warning>,
    ) -> Vec<(Frontend, ServicePort)> {
        let mut claimed = Vec::new();
        for (frontend, port) in entries {
            if let Some(holder) = self.owner_of.get(&frontend).filter(|h| *h != service) {
                warnings.push(Warning::FrontendTaken {
                    service: SourceObject::service(service.clone()),
                    frontend,
                    holder: holder.clone(),
                });
                continue;
            }
            self.owner_of.insert(frontend, service.clone());
            self.frontends_of
                .entry(service.clone())
                .or_default()
                .push(frontend);
            claimed.push((frontend, port));
        }
        claimed
    }
}

/// The name of a Service.
fn name_of(service: &CompactService) -> Option<NamespacedName> {
    Some(NamespacedName {
        namespace: namespace_of(&service.metadata).to_owned(),
        name: service.metadata.name.clone()?,
    })
}

/// The name of the Service a slice belongs to.
fn slice_owner(slice: &CompactSlice) -> Option<NamespacedName> {
    Some(NamespacedName {
        namespace: namespace_of(&slice.metadata).to_owned(),
        name: slice.service_name()?.to_owned(),
    })
}

/// The entries of one Service from its own slices, for `node`.
fn entries(service: &Service, own: &[&CompactSlice], node: &NodeTopology) -> Vec<(Frontend, ServicePort)> {
    match cluster_ip(service) {
        ClusterIp::V4(ip) => entries_with(service, ip, node, |p| slice_candidates(p.name, p.protocol, own)),
        _ => Vec::new(),
    }
}

/// Names each SCTP port of a Service with a virtual IP: none is programmed
/// (see [`Warning::SctpPort`]).
fn warn_of_sctp(service: &NamespacedName, api: &Service, warnings: &mut Vec<Warning>) {
    if cluster_ip(api) == ClusterIp::NoVirtualIp {
        return;
    }
    let ports = api
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    for port in ports.iter().filter(|p| p.protocol.as_deref() == Some("SCTP")) {
        warnings.push(Warning::SctpPort {
            service: SourceObject::service(service.clone()),
            port: port.port,
        });
    }
}

/// The channel of changes, and the hook told of each.
#[derive(Clone)]
struct Reporter {
    channel: mpsc::UnboundedSender<(Instant, Change)>,
    hook: ChangeHook,
}

impl Reporter {
    fn send(&self, change: Change) {
        (self.hook)(&change);
        // The receiver lives as long as the agent.
        let _ = self.channel.send((Instant::now(), change));
    }
}

fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    change_of: fn(&K) -> Option<Change>,
    changes: Reporter,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    tokio::spawn(follow(stream, what, change_of, Change::Relisted, changes));
    reader
}

/// Reports every change a reflector stream applies to its cache; `relisted`
/// is what a complete (re)list changed.
async fn follow<K>(
    stream: impl Stream<Item = watcher::Result<watcher::Event<K>>>,
    what: &'static str,
    change_of: fn(&K) -> Option<Change>,
    relisted: Change,
    changes: Reporter,
) {
    let mut stream = std::pin::pin!(stream);
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if failing {
                    tracing::info!("watching {what}: connected again");
                    failing = false;
                }
                // A relist is only complete at InitDone; Init and InitApply
                // do not change what the cache shows.
                let change = match &event {
                    watcher::Event::Apply(obj) => change_of(obj),
                    watcher::Event::Delete(obj) => change_of(obj).map(Change::deleted),
                    watcher::Event::InitDone => Some(relisted.clone()),
                    watcher::Event::Init | watcher::Event::InitApply(_) => None,
                };
                if let Some(change) = change {
                    changes.send(change);
                }
            }
            Err(e) => {
                tracing::warn!("watching {what}: {e}; retrying with backoff (the datapath keeps its state)");
                failing = true;
            }
        }
    }
}

/// The ServiceCIDR objects, once the API server said it serves them.
struct ServiceCidrCache {
    store: Store<ServiceCIDR>,
    /// Whether the API server serves ServiceCIDR; set before `store` is
    /// ready.
    served: Arc<OnceLock<bool>>,
    flag: Option<Ipv4Cidr>,
}

/// First wait between two attempts to learn whether ServiceCIDR is served;
/// doubled up to [`PROBE_BACKOFF_MAX`].
const PROBE_BACKOFF: Duration = Duration::from_millis(500);
const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(30);

impl ServiceCidrCache {
    /// Asks whether the API server serves ServiceCIDR (retrying until it
    /// answers), says once where the service ranges come from, then
    /// watches them, or leaves the cache empty if the kind is not served.
    fn start(api: Api<ServiceCIDR>, flag: Option<Ipv4Cidr>, changes: Reporter) -> Self {
        let (store, mut writer) = reflector::store();
        let served = Arc::new(OnceLock::new());
        let decided = served.clone();
        tokio::spawn(async move {
            let is_served = serves_service_cidrs(&api).await;
            match (is_served, flag) {
                (true, Some(flag)) => tracing::info!(
                    "service ranges: from the ServiceCIDR objects (--service-cidr {flag} is not used)"
                ),
                (true, None) => tracing::info!("service ranges: from the ServiceCIDR objects"),
                (false, Some(flag)) => tracing::info!(
                    "service ranges: the API server does not serve ServiceCIDR (Kubernetes < 1.33); \
                     using --service-cidr {flag}"
                ),
                (false, None) => tracing::info!(
                    "service ranges: the API server does not serve ServiceCIDR (Kubernetes < 1.33) and \
                     --service-cidr is not set; nothing is dropped by range"
                ),
            }
            let _ = decided.set(is_served);
            if is_served {
                let stream = watcher(api, watcher::Config::default())
                    .default_backoff()
                    .reflect(writer);
                let change_of = |_: &ServiceCIDR| Some(Change::ServiceCidrs);
                follow(stream, "servicecidrs", change_of, Change::ServiceCidrs, changes).await;
            } else {
                // Empty and complete: the agent waits for it as for the others.
                writer.apply_watcher_event(&watcher::Event::Init);
                writer.apply_watcher_event(&watcher::Event::InitDone);
            }
        });
        Self { store, served, flag }
    }

    fn ranges(&self) -> (ServiceRanges, Vec<Warning>) {
        if self.served.get() != Some(&true) {
            return (ServiceRanges::from_flag(self.flag), Vec::new());
        }
        let objects = self.store.state();
        let named = objects.iter().filter_map(|object| {
            let name = object.metadata.name.as_deref()?;
            let cidrs = object.spec.as_ref()?.cidrs.as_deref()?;
            Some((name, cidrs))
        });
        ServiceRanges::from_objects(named)
    }
}

/// Whether the API server serves ServiceCIDR: a LIST of one object's
/// metadata. 404 means no (before Kubernetes 1.33); 403 too, with a warning
/// (the ClusterRole predates the kind). Any other failure is retried with
/// backoff, as the watchers retry.
async fn serves_service_cidrs(api: &Api<ServiceCIDR>) -> bool {
    let mut wait = PROBE_BACKOFF;
    loop {
        match api.list_metadata(&ListParams::default().limit(1)).await {
            Ok(_) => return true,
            Err(kube::Error::Api(status)) if status.code == 404 => return false,
            Err(kube::Error::Api(status)) if status.code == 403 => {
                tracing::warn!(
                    "listing servicecidrs is forbidden ({}): grant list and watch on \
                     networking.k8s.io servicecidrs (deploy/02-clusterrole.yaml); until the agent \
                     restarts, the service ranges are as without ServiceCIDR",
                    status.message
                );
                return false;
            }
            Err(e) => {
                tracing::warn!("listing servicecidrs: {e}; retrying in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(PROBE_BACKOFF_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_follows_kube_proxy() {
        for (name, expected) in [
            (
                None,
                "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
            ),
            (
                Some("mine"),
                "service.kubernetes.io/service-proxy-name=mine,!service.kubernetes.io/headless",
            ),
        ] {
            assert_eq!(label_selector(name), expected, "selector for proxy name {name:?}");
        }
    }

    #[test]
    fn sctp_ports_are_named_and_deletions_carry_no_trigger_time() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "sig", "namespace": "core"},
            "spec": {"clusterIP": "10.96.0.40", "ports": [
                {"name": "s1ap", "port": 36412, "protocol": "SCTP"},
                {"name": "http", "port": 80, "protocol": "TCP"}
            ]}
        }))
        .expect("a Service");
        let name = NamespacedName {
            namespace: "core".into(),
            name: "sig".into(),
        };
        let mut warnings = Vec::new();
        warn_of_sctp(&name, &service, &mut warnings);
        let text: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 1, "one warning for the one SCTP port: {text:?}");
        assert!(
            text[0].contains("core/sig") && text[0].contains("36412/SCTP is not programmed"),
            "names the Service, the port and what happens: {text:?}"
        );
        let slice = Change::Slice {
            service: name,
            name: "sig-1".into(),
            trigger: Some(SystemTime::now()),
        };
        assert!(
            matches!(slice.deleted(), Change::Slice { trigger: None, .. }),
            "a deletion's annotation is not a trigger time"
        );
    }

    #[test]
    fn api_server_urls_are_checked() {
        assert!(
            parse_url("https://10.0.0.1:6443").is_ok(),
            "a full URL is accepted"
        );
        for bad in ["10.0.0.1:6443", "not a url", ""] {
            assert!(parse_url(bad).is_err(), "{bad:?} is rejected");
        }
    }
}
