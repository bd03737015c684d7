//! Where the desired state comes from.
//!
//! [`manifests`] reads Kubernetes objects from a directory of YAML/JSON files
//! and plays the part of the API server and the endpoints controllers.
//! [`endpoints`] holds kube-proxy's rules for turning EndpointSlices into
//! programmed endpoints, shared by every source so they cannot drift apart.
//! [`kube`] watches the API server into caches of [`compact`] objects.

pub mod compact;
pub mod endpoints;
pub mod kube;
pub mod manifests;
