//! What an agent leaves under the bpffs for the CLI: per service port, a
//! record of its names and of what the agent wants programmed (stored in the
//! `SVCMETA_V1` map), beside what the maps actually hold. Reading both is how
//! `redirector get`/`describe` tell the truth, drift included.

use std::collections::BTreeMap;

use std::path::Path;

use redirector_common::service::{SERVICE_META_LEN, ServiceMeta, ServiceStats};
use serde::{Deserialize, Serialize};

use crate::datapath::maps::MapsError;
use crate::datapath::{Maps, maps_pin_dir};
use crate::model::fnv1a;
use crate::model::{Endpoint, Frontend, ServiceInfo, ServicePort, ServicePortName};

/// The agent's record of one service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRecord {
    pub namespace: String,
    pub name: String,
    pub port: String,
    #[serde(flatten)]
    pub info: ServiceInfo,
    /// How many endpoints the agent wants programmed.
    pub want: usize,
    /// [`fingerprint`] of those endpoints.
    pub fingerprint: u64,
    /// Labels or selector were left out to fit the record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

impl PortRecord {
    pub fn new(port: &ServicePort) -> Self {
        Self {
            namespace: port.name.namespace.clone(),
            name: port.name.name.clone(),
            port: port.name.port.clone(),
            info: port.info.clone(),
            want: port.endpoints.len(),
            fingerprint: fingerprint(&port.endpoints),
            truncated: false,
        }
    }

    pub fn port_name(&self) -> ServicePortName {
        ServicePortName {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            port: self.port.clone(),
        }
    }

    /// The record as stored; labels, then the selector, are dropped when the
    /// whole would not fit (and `truncated` says so).
    pub fn encode(&self) -> ServiceMeta {
        let mut record = self.clone();
        let mut json = serde_json::to_vec(&record).unwrap_or_default();
        if json.len() > SERVICE_META_LEN {
            record.truncated = true;
            record.info.labels.clear();
            json = serde_json::to_vec(&record).unwrap_or_default();
        }
        if json.len() > SERVICE_META_LEN {
            record.info.selector = Some(BTreeMap::new());
            json = serde_json::to_vec(&record).unwrap_or_default();
        }
        json.truncate(SERVICE_META_LEN);
        let mut meta = ServiceMeta {
            len: json.len() as u32,
            json: [0; SERVICE_META_LEN],
        };
        meta.json[..json.len()].copy_from_slice(&json);
        meta
    }

    pub fn decode(meta: &ServiceMeta) -> Option<Self> {
        let len = (meta.len as usize).min(SERVICE_META_LEN);
        serde_json::from_slice(&meta.json[..len]).ok()
    }
}

/// FNV-1a over the endpoints in sorted order: equal sets, equal prints.
pub fn fingerprint(endpoints: &[Endpoint]) -> u64 {
    let mut sorted = endpoints.to_vec();
    sorted.sort();
    let bytes: Vec<u8> = sorted
        .iter()
        .flat_map(|ep| ep.addr.octets().into_iter().chain(ep.port.to_be_bytes()))
        .collect();
    fnv1a(&bytes)
}

/// One service port as the maps hold it, with the agent's record.
#[derive(Clone, Debug)]
pub struct ProgrammedPort {
    pub frontend: Frontend,
    pub svc_id: u32,
    /// In slot order.
    pub endpoints: Vec<Endpoint>,
    /// No longer picked by new flows but still serving: flows already on
    /// them keep them (see `BACKEND_FLAG_DRAINING`).
    pub draining: Vec<Endpoint>,
    pub record: Option<PortRecord>,
    pub stats: ServiceStats,
}

impl ProgrammedPort {
    /// A difference between what the agent wants and what the maps hold,
    /// stated in words; `None` when they agree.
    pub fn drift(&self) -> Option<String> {
        let Some(record) = &self.record else {
            return Some("no agent record for this service port (written by another agent?)".into());
        };
        if record.want != self.endpoints.len() {
            return Some(format!(
                "the agent wants {} endpoints, the maps hold {}",
                record.want,
                self.endpoints.len()
            ));
        }
        (record.fingerprint != fingerprint(&self.endpoints))
            .then(|| "the maps hold other endpoints than the agent wants".into())
    }
}

/// Everything programmed under one bpffs.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub ports: Vec<ProgrammedPort>,
    /// Records of service ports that are not in the maps at all (e.g. they
    /// did not fit): drift too.
    pub unprogrammed: Vec<PortRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("no redirector state under {bpffs}: is the agent running with --bpffs {bpffs}?")]
    NoState { bpffs: String, source: Box<MapsError> },
    #[error(transparent)]
    Maps(Box<MapsError>),
}

impl From<MapsError> for SnapshotError {
    fn from(e: MapsError) -> Self {
        Self::Maps(Box::new(e))
    }
}

impl Snapshot {
    pub fn read(bpffs: &Path) -> Result<Self, SnapshotError> {
        let maps = Maps::from_pins(&maps_pin_dir(bpffs)).map_err(|source| SnapshotError::NoState {
            bpffs: bpffs.display().to_string(),
            source: Box::new(source),
        })?;
        Self::from_maps(&maps)
    }

    pub fn from_maps(maps: &Maps) -> Result<Self, SnapshotError> {
        let read = |name| move |source| MapsError::Read { name, source };
        let mut records = BTreeMap::new();
        for item in maps.meta.iter() {
            let (svc_id, meta) = item.map_err(read(redirector_common::service::SERVICE_META_MAP))?;
            if let Some(record) = PortRecord::decode(&meta) {
                records.insert(svc_id, record);
            }
        }
        let mut snapshot = Snapshot::default();
        for port in maps.stored_ports()? {
            snapshot.ports.push(ProgrammedPort {
                frontend: port.frontend,
                svc_id: port.master.svc_id,
                endpoints: port
                    .slots
                    .into_iter()
                    .flatten()
                    .map(|(_, endpoint)| endpoint)
                    .collect(),
                draining: port.draining.into_iter().map(|(_, endpoint)| endpoint).collect(),
                record: records.remove(&port.master.svc_id),
                stats: maps.service_stats(port.master.svc_id).unwrap_or_default(),
            });
        }
        snapshot.unprogrammed = records.into_values().collect();
        snapshot.ports.sort_by(|a, b| {
            let key = |p: &ProgrammedPort| p.record.as_ref().map(|r| (r.namespace.clone(), r.name.clone()));
            key(a).cmp(&key(b)).then(a.frontend.cmp(&b.frontend))
        });
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn port(labels: usize) -> ServicePort {
        ServicePort {
            no_endpoints: Default::default(),
            affinity: None,
            name: ServicePortName {
                namespace: "default".into(),
                name: "web".into(),
                port: "http".into(),
            },
            endpoints: vec![
                Endpoint {
                    addr: Ipv4Addr::new(10, 0, 0, 2),
                    port: 80,
                },
                Endpoint {
                    addr: Ipv4Addr::new(10, 0, 0, 1),
                    port: 80,
                },
            ],
            also_serving: Vec::new(),
            info: ServiceInfo {
                labels: (0..labels)
                    .map(|i| (format!("label-{i}"), "x".repeat(20)))
                    .collect(),
                selector: Some([("app".to_string(), "web".to_string())].into()),
                service_type: "ClusterIP".into(),
                session_affinity: "None".into(),
                target_port: "8080".into(),
                port_index: 0,
                created: None,
                ..ServiceInfo::default()
            },
        }
    }

    #[test]
    fn records_round_trip_and_shed_labels_to_fit() {
        let small = PortRecord::new(&port(2));
        assert_eq!(
            PortRecord::decode(&small.encode()),
            Some(small.clone()),
            "a small record round-trips"
        );
        let big = PortRecord::new(&port(40));
        let decoded = PortRecord::decode(&big.encode()).expect("a big record still decodes");
        assert!(decoded.truncated, "the big record says it was cut");
        assert!(decoded.info.labels.is_empty(), "labels went first");
        assert_eq!(decoded.info.selector, big.info.selector, "the selector was kept");
        assert_eq!(
            (decoded.want, decoded.fingerprint),
            (big.want, big.fingerprint),
            "drift data kept"
        );
    }

    #[test]
    fn fingerprints_ignore_order_and_see_changes() {
        let a = port(0).endpoints;
        let mut b = a.clone();
        b.reverse();
        assert_eq!(fingerprint(&a), fingerprint(&b), "order does not matter");
        b[0].port = 81;
        assert_ne!(
            fingerprint(&a),
            fingerprint(&b),
            "a different endpoint changes it"
        );
    }
}
