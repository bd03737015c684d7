//! Reading a manifest directory: which files count, and the Kubernetes
//! objects each holds (decoded, then validated), or every error found in it.

use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::validate;
use crate::source::endpoints::{DEFAULT_NAMESPACE, namespace_of};

/// Which object in a file an error is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectId {
    pub kind: Option<String>,
    pub namespace: String,
    pub name: Option<String>,
    /// 1-based position of the YAML document in its file.
    pub document: usize,
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.kind, &self.name) {
            (Some(kind), Some(name)) => write!(f, "{kind} {}/{name}", self.namespace),
            (Some(kind), None) => write!(f, "{kind} in document {}", self.document),
            (None, _) => write!(f, "document {}", self.document),
        }
    }
}

/// Why (part of) the manifest directory could not be used. Every variant
/// names the file; the affected file keeps its last good objects.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot list manifest directory {}: {error}", dir.display())]
    ListDir { dir: PathBuf, error: std::io::Error },
    #[error("cannot read {}: {error}", path.display())]
    ReadFile { path: PathBuf, error: std::io::Error },
    /// Not YAML; the message carries line and column.
    #[error("{}: document {document}: {error}", path.display())]
    Syntax {
        path: PathBuf,
        document: usize,
        error: yaml_serde::Error,
    },
    #[error("{}: document {document}: expected a Kubernetes object (a mapping with apiVersion and kind)", path.display())]
    NotAnObject { path: PathBuf, document: usize },
    /// Does not fit the Kubernetes schema; the message carries the field path,
    /// line and column.
    #[error("{}: {object}: {error}", path.display())]
    Decode {
        path: PathBuf,
        object: ObjectId,
        error: yaml_serde::Error,
    },
    /// Fits the schema but Kubernetes would reject it.
    #[error("{}: {object}: {field}: {reason}", path.display())]
    Invalid {
        path: PathBuf,
        object: ObjectId,
        field: String,
        reason: String,
    },
}

/// An object redirector uses, as decoded from a manifest.
#[derive(Clone, Debug)]
pub(super) enum Object {
    Service(Box<Service>),
    Pod(Box<Pod>),
    Endpoints(Box<Endpoints>),
    EndpointSlice(Box<EndpointSlice>),
    /// Read for its zone label (which endpoints are near this node, and
    /// the zone of the endpoints of the Pods on it).
    Node(Box<Node>),
}

impl Object {
    pub(super) fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Endpoints(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
        }
    }
}

/// `*.yaml`, `*.yml` and `*.json` files directly in `dir`, sorted. Hidden
/// files are left out: editors and atomic writers use them as scratch space.
pub(super) fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let wanted = ["yaml", "yml", "json"].iter().any(|ext| {
            path.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| e.eq_ignore_ascii_case(ext))
        });
        // `metadata` follows symlinks (ConfigMap volumes are made of them); a
        // dangling one counts as absent.
        if wanted && !name.starts_with('.') && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// All objects of one file, or every error found in it.
pub(super) fn parse_file(path: &Path, text: &str) -> Result<Vec<Object>, Vec<ManifestError>> {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    // The same text twice: generic values to learn kind and name, typed
    // decoding straight from the text so errors carry field path and line.
    let typed_docs = yaml_serde::Deserializer::from_str(text);
    for (i, (generic, typed)) in yaml_serde::Deserializer::from_str(text)
        .zip(typed_docs)
        .enumerate()
    {
        let document = i + 1;
        let path = path.to_owned();
        let value = match yaml_serde::Value::deserialize(generic) {
            Ok(value) => value,
            Err(error) => {
                // The parser cannot find the next document after a syntax error.
                errors.push(ManifestError::Syntax {
                    path,
                    document,
                    error,
                });
                break;
            }
        };
        if value.is_null() {
            continue;
        }
        if !value.is_mapping() {
            errors.push(ManifestError::NotAnObject { path, document });
            continue;
        }
        let text_at =
            |v: &yaml_serde::Value, key: &str| v.get(key).and_then(|v| v.as_str()).map(str::to_owned);
        let metadata = value.get("metadata").cloned().unwrap_or_default();
        let mut object = ObjectId {
            kind: text_at(&value, "kind"),
            namespace: text_at(&metadata, "namespace")
                .filter(|ns| !ns.is_empty())
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
            name: text_at(&metadata, "name").filter(|n| !n.is_empty()),
            document,
        };
        let invalid = |object: &ObjectId, field: &str, reason: &str| ManifestError::Invalid {
            path: path.clone(),
            object: object.clone(),
            field: field.to_owned(),
            reason: reason.to_owned(),
        };
        let (Some(kind), Some(api_version)) = (object.kind.clone(), text_at(&value, "apiVersion")) else {
            let field = if object.kind.is_none() {
                "kind"
            } else {
                "apiVersion"
            };
            errors.push(invalid(&object, field, "is required"));
            continue;
        };
        let decoded = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => decode(typed).map(|o| Object::Service(Box::new(o))),
            ("v1", "Pod") => decode(typed).map(|o| Object::Pod(Box::new(o))),
            ("v1", "Endpoints") => decode(typed).map(|o| Object::Endpoints(Box::new(o))),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                decode(typed).map(|o| Object::EndpointSlice(Box::new(o)))
            }
            ("v1", "Node") => decode(typed).map(|o| Object::Node(Box::new(o))),
            _ => {
                tracing::debug!(
                    "{}: {object}: skipping {api_version} {kind}, which redirector does not use",
                    path.display()
                );
                continue;
            }
        };
        let decoded = match decoded {
            Ok(decoded) => decoded,
            Err(error) => {
                errors.push(ManifestError::Decode { path, object, error });
                continue;
            }
        };
        // The typed metadata is authoritative (YAML may spell a name as a number).
        let meta = decoded.metadata();
        object.namespace = namespace_of(meta).to_owned();
        object.name = meta.name.clone().filter(|n| !n.is_empty());
        let problems = validate::problems(&decoded);
        if problems.is_empty() {
            objects.push(decoded);
        }
        errors.extend(
            problems
                .into_iter()
                .map(|problem| invalid(&object, &problem.field, &problem.reason)),
        );
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(errors)
    }
}

fn decode<'de, T: Deserialize<'de>>(doc: yaml_serde::Deserializer<'de>) -> Result<T, yaml_serde::Error> {
    T::deserialize(doc)
}
