//! The live source: Services and EndpointSlices watched from the Kubernetes
//! API with kube-proxy's label selector, reflected into local caches.
//!
//! Each watcher runs `watcher(..).default_backoff().reflect(..)`: on a dropped
//! connection or an expired resourceVersion (410) it relists, and the cache is
//! replaced whole once the relist is complete, so the model computed from it is
//! never a partial list. While the API server is unreachable the caches (and
//! so the datapath) keep their last state.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Config};
use tokio::sync::mpsc;

use super::endpoints::{
    ClusterIp, SERVICE_NAME_LABEL, cluster_ip, entries_with, namespace_of, slice_candidates,
};
use crate::model::Desired;

/// Services with this label belong to another proxy unless it names us.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services with this label are never proxied.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: not in a pod, and no kubeconfig (--kubeconfig, KUBECONFIG, \
         ~/.kube/config); {source}"
    )]
    Infer { source: kube::config::InferConfigError },
    #[error("invalid --api-server {url:?}: {reason}")]
    ApiServer { url: String, reason: String },
    #[error("creating the Kubernetes client: {source}")]
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

/// The two caches, and a channel that ticks (with the time the change was
/// observed) whenever either changes.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    pub changes: mpsc::UnboundedReceiver<Instant>,
}

impl KubeSource {
    /// Starts both watchers on the current tokio runtime.
    pub fn start(client: Client, service_proxy_name: Option<&str>) -> Self {
        let selector = label_selector(service_proxy_name);
        let (tx, changes) = mpsc::unbounded_channel();
        let services =
            spawn_reflector::<Service>(Api::all(client.clone()), &selector, "services", tx.clone());
        let slices = spawn_reflector::<EndpointSlice>(Api::all(client), &selector, "endpointslices", tx);
        Self {
            services,
            slices,
            changes,
        }
    }

    /// Resolves once both caches hold a complete initial list.
    pub async fn wait_until_ready(&self) {
        // The writers live as long as their tasks, which never end.
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
    }

    /// The model for the current caches: every Service with an IPv4 ClusterIP,
    /// its endpoints chosen by kube-proxy's rules.
    pub fn desired(&self) -> (Desired, Vec<String>) {
        let slices = self.slices.state();
        let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for slice in &slices {
            let Some(service) = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            else {
                continue;
            };
            by_service
                .entry((namespace_of(&slice.metadata), service.as_str()))
                .or_default()
                .push(slice.as_ref());
        }
        let mut desired = Desired::new();
        let mut warnings = Vec::new();
        let mut services: Vec<Arc<Service>> = self.services.state();
        // Deterministic winner when two Services claim one frontend.
        services.sort_by(|a, b| {
            (namespace_of(&a.metadata), &a.metadata.name).cmp(&(namespace_of(&b.metadata), &b.metadata.name))
        });
        for service in &services {
            let ClusterIp::V4(ip) = cluster_ip(service) else {
                continue;
            };
            let key = (
                namespace_of(&service.metadata),
                service.metadata.name.as_deref().unwrap_or(""),
            );
            let own = by_service.get(&key).map(Vec::as_slice).unwrap_or_default();
            for (frontend, port) in entries_with(service, ip, |p| slice_candidates(p.name, p.protocol, own)) {
                if let Some(existing) = desired.get(&frontend) {
                    warnings.push(format!(
                        "Service {}/{}: {frontend} is already used by {}; ignored",
                        key.0, key.1, existing.name
                    ));
                    continue;
                }
                desired.insert(frontend, port);
            }
        }
        (desired, warnings)
    }
}

fn spawn_reflector<K>(
    api: Api<K>,
    selector: &str,
    what: &'static str,
    changes: mpsc::UnboundedSender<Instant>,
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
    let config = watcher::Config::default().labels(selector);
    let stream = watcher(api, config).default_backoff().reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let mut failing = false;
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if failing {
                        log::info!("watching {what}: connected again");
                        failing = false;
                    }
                    // A relist is only complete at InitDone; Init and InitApply
                    // do not change what the cache shows.
                    if matches!(
                        event,
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone
                    ) {
                        let _ = changes.send(Instant::now());
                    }
                }
                Err(e) => {
                    log::warn!("watching {what}: {e}; retrying with backoff (the datapath keeps its state)");
                    failing = true;
                }
            }
        }
    });
    reader
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
