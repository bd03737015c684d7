//! File mode: a directory of Kubernetes manifests stands in for the API
//! server, and this module for the controllers that would act on them.
//!
//! Services, Pods, Endpoints and EndpointSlices are read from `*.yaml`,
//! `*.yml` and `*.json` files (multi-document YAML; JSON is read as YAML,
//! which it is). [`ManifestStore::desired`] then does what the endpoints
//! controllers, the cluster IP allocator and kube-proxy would do with them.

mod controller;
mod read;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use read::{ManifestError, ObjectId};
use read::{Object, manifest_files, parse_file};

use super::{Update, Warning};
use crate::model::{Desired, Ipv4Cidr};

/// The objects of a manifest directory, per file, as last read successfully.
#[derive(Debug, Default)]
pub struct ManifestStore {
    files: BTreeMap<PathBuf, Vec<Object>>,
    /// The node endpoints are chosen for (`--node-name`).
    node_name: Option<String>,
}

impl ManifestStore {
    /// Chooses endpoints as the proxy of node `name` would (its zone comes
    /// from the Node object of that name, if the manifests hold one).
    pub fn set_node_name(&mut self, name: Option<String>) {
        self.node_name = name;
    }

    /// Re-reads every manifest file in `dir` (not recursive). A file with any
    /// error keeps its previous objects (none if it is new); files that are
    /// gone are dropped. If `dir` itself cannot be listed nothing changes, so a
    /// passing hiccup does not withdraw every service.
    pub fn reload(&mut self, dir: &Path) -> Vec<ManifestError> {
        let paths = match manifest_files(dir) {
            Ok(paths) => paths,
            Err(error) => {
                return vec![ManifestError::ListDir {
                    dir: dir.to_owned(),
                    error,
                }];
            }
        };
        let mut errors = Vec::new();
        self.files.retain(|path, _| paths.contains(path));
        for path in paths {
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    // Removed since the listing.
                    self.files.remove(&path);
                    continue;
                }
                Err(error) => {
                    errors.push(ManifestError::ReadFile { path, error });
                    continue;
                }
            };
            match parse_file(&path, &text) {
                Ok(objects) => {
                    self.files.insert(path, objects);
                }
                Err(mut file_errors) => errors.append(&mut file_errors),
            }
        }
        errors
    }
    /// What the datapath should hold, and warnings about manifests that are
    /// valid but will not do what they seem to. Services without a clusterIP
    /// get one from `service_cidr`.
    pub fn desired(&self, service_cidr: Ipv4Cidr) -> (Desired, Vec<Warning>) {
        controller::desired(&self.files, service_cidr, self.node_name.as_deref())
    }

    /// [`Self::desired`] as an update: every service port of the directory.
    /// The directory is the whole truth, so whatever else the datapath holds
    /// is to go once this is written.
    pub fn update(&self, service_cidr: Ipv4Cidr) -> Update {
        let (desired, warnings) = self.desired(service_cidr);
        Update {
            upserts: desired.into_iter().collect(),
            removals: Vec::new(),
            warnings,
        }
    }
}
