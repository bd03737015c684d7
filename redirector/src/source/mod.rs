//! Where the desired state comes from.
//!
//! [`manifests`] reads Kubernetes objects from a directory of YAML/JSON files
//! and plays the part of the API server and the endpoints controllers.
//! [`endpoints`] holds kube-proxy's rules for turning EndpointSlices into
//! programmed endpoints, shared by every source so they cannot drift apart.
//! [`kube`] watches the API server into caches of [`compact`] objects, and
//! [`node`] this node's Node for its zone. [`service_cidrs`] says which
//! ranges are service addresses, whose unused addresses the datapath drops.
//! Both sources hand the agent an [`Update`] and warn with a [`Warning`].

pub mod compact;
pub mod endpoints;
pub mod kube;
pub mod manifests;
pub mod node;
pub mod service_cidrs;
mod warning;

pub use warning::{ObjectKind, SourceObject, Warning};

use crate::model::{Frontend, ServicePort};

/// What a source asks of the datapath: service ports to program (again) and
/// frontends to drop, with what it warns of on the way. Both sources speak
/// it, so the agent has one way into the maps.
#[derive(Debug, Default)]
pub struct Update {
    pub upserts: Vec<(Frontend, ServicePort)>,
    pub removals: Vec<Frontend>,
    pub warnings: Vec<Warning>,
}
