//! This node's Node object, watched for its zone label: which zone's
//! topology hints the agent follows (kube-proxy's `NodeTopologyConfig`);
//! and for whether it is going away (being deleted, or tainted
//! `ToBeDeletedByClusterAutoscaler`), which `/healthz` reports as
//! kube-proxy's `NodeEligibleHandler` does.
//!
//! Only the one Node is listed and watched (field selector on its name), and
//! only its name, labels, deletion timestamp and taint keys are decoded. Until the first list completes, and
//! while the Node does not exist, the node has no zone, so no zone hints are
//! followed; programming never waits for it.

use std::borrow::Cow;
use std::collections::BTreeMap;

use futures_util::StreamExt;
use k8s_openapi::ClusterResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde::Deserialize;
use tokio::sync::watch;

use super::endpoints::ZONE_LABEL;
use crate::metrics::TO_BE_DELETED_TAINT;
use crate::model::NodeTopology;

/// A Node as the proxy sees it: its name, labels, and whether it is going
/// away.
#[derive(Clone, Debug, Default, Deserialize)]
struct CompactNode {
    #[serde(default)]
    metadata: NodeMeta,
    #[serde(default)]
    spec: NodeSpecFields,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeMeta {
    name: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    resource_version: Option<String>,
    deletion_timestamp: Option<Time>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct NodeSpecFields {
    #[serde(default)]
    taints: Vec<TaintKey>,
}

#[derive(Clone, Debug, Default, Deserialize)]
struct TaintKey {
    #[serde(default)]
    key: String,
}

impl CompactNode {
    fn zone(&self) -> Option<String> {
        self.metadata.labels.as_ref()?.get(ZONE_LABEL).cloned()
    }

    /// kube-proxy's `SyncNode`: not being deleted, and not tainted for
    /// deletion by the Cluster Autoscaler.
    fn eligible(&self) -> bool {
        self.metadata.deletion_timestamp.is_none()
            && !self.spec.taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT)
    }
}

/// `kube::Resource` hands out an `ObjectMeta`; the watcher reads only the
/// name and resourceVersion of it.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "CompactNode")]
struct WatchedNode {
    metadata: ObjectMeta,
    zone: Option<String>,
    eligible: bool,
}

impl From<CompactNode> for WatchedNode {
    fn from(node: CompactNode) -> Self {
        let zone = node.zone();
        let eligible = node.eligible();
        Self {
            metadata: ObjectMeta {
                name: node.metadata.name,
                resource_version: node.metadata.resource_version,
                ..ObjectMeta::default()
            },
            zone,
            eligible,
        }
    }
}

impl kube::Resource for WatchedNode {
    type DynamicType = ();
    type Scope = ClusterResourceScope;
    fn kind(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("Node")
    }
    fn group(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("")
    }
    fn version(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("v1")
    }
    fn plural(_: &()) -> Cow<'_, str> {
        Cow::Borrowed("nodes")
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The watched node's topology and eligibility, as they change.
pub struct NodeWatch {
    topology: watch::Receiver<NodeTopology>,
    eligible: watch::Receiver<bool>,
}

impl NodeWatch {
    /// Starts watching Node `name` on the current tokio runtime.
    pub fn start(client: Client, name: &str) -> Self {
        let (tx, topology) = watch::channel(NodeTopology {
            name: Some(name.to_owned()),
            zone: None,
        });
        // Eligible while starting, as kube-proxy's health server.
        let (eligible_tx, eligible) = watch::channel(true);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let stream = watcher(Api::<WatchedNode>::all(client), config).default_backoff();
        let name = name.to_owned();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            // The Node a (re)list is finding, published once it is complete.
            let mut listed: Option<Option<WatchedNode>> = None;
            while let Some(event) = stream.next().await {
                let (zone, eligible) = match event {
                    Ok(watcher::Event::Apply(node)) => (node.zone, Some(node.eligible)),
                    // A deleted Node's agent is not eligible.
                    Ok(watcher::Event::Delete(_)) => (None, Some(false)),
                    Ok(watcher::Event::Init) => {
                        listed = Some(None);
                        continue;
                    }
                    Ok(watcher::Event::InitApply(node)) => {
                        listed = Some(Some(node));
                        continue;
                    }
                    // A Node missing from the list leaves eligibility as it
                    // was: a node's agent may start before its Node exists.
                    Ok(watcher::Event::InitDone) => match listed.take().flatten() {
                        Some(node) => (node.zone, Some(node.eligible)),
                        None => (None, None),
                    },
                    Err(e) => {
                        tracing::warn!(
                            "watching Node {name}: {e}; retrying with backoff (its zone stays as it was)"
                        );
                        continue;
                    }
                };
                if let Some(eligible) = eligible {
                    eligible_tx.send_if_modified(|was| {
                        let changed = *was != eligible;
                        if changed {
                            let state = if eligible {
                                "eligible again"
                            } else {
                                "being deleted or tainted for deletion: /healthz fails"
                            };
                            tracing::info!("Node {name}: {state}");
                            *was = eligible;
                        }
                        changed
                    });
                }
                tx.send_if_modified(|topology| {
                    let changed = topology.zone != zone;
                    if changed {
                        tracing::info!("Node {name}: zone {}", zone.as_deref().unwrap_or("<none>"));
                        topology.zone = zone;
                    }
                    changed
                });
            }
        });
        Self { topology, eligible }
    }

    /// Whether the node is eligible (not being deleted, not tainted for
    /// deletion), as it changes.
    pub fn eligibility(&self) -> watch::Receiver<bool> {
        self.eligible.clone()
    }

    /// The node's topology as last seen.
    pub fn current(&mut self) -> NodeTopology {
        self.topology.borrow_and_update().clone()
    }

    /// Resolves when the topology changed since [`Self::current`] last read
    /// it.
    pub async fn changed(&mut self) {
        if self.topology.changed().await.is_err() {
            // The sender lives in the watch task, which never ends.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use kube::Resource;

    use super::*;

    #[test]
    fn a_node_is_read_for_its_name_and_zone() {
        let json = r#"{
          "apiVersion": "v1", "kind": "Node",
          "metadata": {"name": "node-1", "resourceVersion": "42",
                       "labels": {"topology.kubernetes.io/zone": "zone-a", "kubernetes.io/os": "linux"},
                       "managedFields": [{"manager": "kubelet"}]},
          "status": {"images": [{"names": ["registry/image:tag"], "sizeBytes": 1}]}
        }"#;
        let node: WatchedNode = serde_json::from_str(json).expect("parses");
        assert_eq!(node.zone.as_deref(), Some("zone-a"), "zone label");
        assert_eq!(node.meta().name.as_deref(), Some("node-1"), "name");
        assert_eq!(
            node.meta().resource_version.as_deref(),
            Some("42"),
            "resourceVersion"
        );
        let unlabelled: WatchedNode =
            serde_json::from_str(r#"{"metadata": {"name": "node-2"}}"#).expect("parses");
        assert_eq!(unlabelled.zone, None, "no zone label, no zone");
        assert_eq!(<WatchedNode as Resource>::url_path(&(), None), "/api/v1/nodes");
        assert!(
            node.eligible && unlabelled.eligible,
            "neither deleted nor tainted"
        );
    }

    #[test]
    fn a_node_going_away_is_not_eligible() {
        for (json, eligible, why) in [
            (
                r#"{"metadata": {"name": "n", "deletionTimestamp": "2026-11-27T00:00:00Z"}}"#,
                false,
                "being deleted",
            ),
            (
                r#"{"metadata": {"name": "n"}, "spec": {"taints": [
                     {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"},
                     {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}]}}"#,
                false,
                "tainted by the Cluster Autoscaler",
            ),
            (
                r#"{"metadata": {"name": "n"}, "spec": {"taints": [
                     {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}"#,
                true,
                "cordoned only",
            ),
        ] {
            let node: WatchedNode = serde_json::from_str(json).expect("parses");
            assert_eq!(node.eligible, eligible, "{why}");
        }
    }
}
