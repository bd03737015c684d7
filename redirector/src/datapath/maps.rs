//! Typed handles on the datapath's maps, opened from a loaded object or from
//! their pins (for the CLI and for a restarted agent).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::model::{Endpoint, Frontend, Protocol};
use aya::maps::{Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray};
use redirector_common::{
    config::{CONFIG_MAP, Config},
    conntrack::{CT_MAP, CT_TIMEOUTS_MAP, CtEntry, CtKey, CtTimeouts},
    counters::{self, COUNTER_MAP},
    service::{
        BACKEND_MAP, Backend, MASTER_SLOT, SERVICE_MAP, SERVICE_META_MAP, SERVICE_STATS_MAP, ServiceEntry,
        ServiceKey, ServiceMeta, ServiceStats, VIP_MAP, VipEntry,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("map {name} is missing from the eBPF object")]
    Missing { name: &'static str },
    #[error("opening pinned map {path}")]
    Pin { path: PathBuf, source: MapError },
    #[error("map {name} has an unexpected type or layout")]
    Layout { name: &'static str, source: MapError },
    #[error("reading map {name}")]
    Read { name: &'static str, source: MapError },
}

/// One service port as the maps hold it; see [`Maps::stored_ports`].
#[derive(Clone, Debug)]
pub struct StoredPort {
    pub frontend: Frontend,
    pub master: ServiceEntry,
    pub slots: Vec<Option<(u32, Endpoint)>>,
    /// The draining backends: the slots after the master's count, up to the
    /// first one missing (it or its backend).
    pub draining: Vec<(u32, Endpoint)>,
}

/// The connection table, as the sweeper and the CLI hold it.
pub type ConntrackTable = HashMap<MapData, CtKey, CtEntry>;

/// Opens only the connection table an agent pinned under `dir`.
pub fn conntrack_from_pins(dir: &Path) -> Result<ConntrackTable, MapsError> {
    let map = open_pin(dir, CT_MAP)?;
    ConntrackTable::try_from(map).map_err(|source| MapsError::Layout { name: CT_MAP, source })
}

/// The connection table's timeouts, as the agent publishes them.
pub type TimeoutsMap = Array<MapData, CtTimeouts>;

/// Opens the timeouts an agent pinned under `dir`; `None` when there is no
/// such pin (an agent from before they were published).
pub fn timeouts_from_pins(dir: &Path) -> Result<Option<TimeoutsMap>, MapsError> {
    if !dir.join(CT_TIMEOUTS_MAP).exists() {
        return Ok(None);
    }
    let map = open_pin(dir, CT_TIMEOUTS_MAP)?;
    TimeoutsMap::try_from(map)
        .map(Some)
        .map_err(|source| MapsError::Layout {
            name: CT_TIMEOUTS_MAP,
            source,
        })
}

/// The map pinned as `name` under `dir`.
fn open_pin(dir: &Path, name: &str) -> Result<Map, MapsError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| MapsError::Pin {
        path: path.clone(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| MapsError::Pin { path, source })
}

pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceEntry>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub vips: HashMap<MapData, u32, VipEntry>,
    pub conntrack: ConntrackTable,
    pub config: Array<MapData, Config>,
    pub counters: PerCpuArray<MapData, u64>,
    pub stats: PerCpuArray<MapData, ServiceStats>,
    pub meta: HashMap<MapData, u32, ServiceMeta>,
}

impl Maps {
    /// Takes the maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, MapsError> {
        Self::build(|name| ebpf.take_map(name).ok_or(MapsError::Missing { name }))
    }

    /// Opens the maps an agent pinned under `dir` (`<bpffs>/maps`).
    pub fn from_pins(dir: &Path) -> Result<Self, MapsError> {
        Self::build(|name| open_pin(dir, name))
    }

    fn build(mut open: impl FnMut(&'static str) -> Result<Map, MapsError>) -> Result<Self, MapsError> {
        fn typed<T: TryFrom<Map, Error = MapError>>(name: &'static str, map: Map) -> Result<T, MapsError> {
            T::try_from(map).map_err(|source| MapsError::Layout { name, source })
        }
        Ok(Self {
            services: typed(SERVICE_MAP, open(SERVICE_MAP)?)?,
            backends: typed(BACKEND_MAP, open(BACKEND_MAP)?)?,
            vips: typed(VIP_MAP, open(VIP_MAP)?)?,
            conntrack: typed(CT_MAP, open(CT_MAP)?)?,
            config: typed(CONFIG_MAP, open(CONFIG_MAP)?)?,
            counters: typed(COUNTER_MAP, open(COUNTER_MAP)?)?,
            stats: typed(SERVICE_STATS_MAP, open(SERVICE_STATS_MAP)?)?,
            meta: typed(SERVICE_META_MAP, open(SERVICE_META_MAP)?)?,
        })
    }

    /// Every service port in the maps: its master entry and, slot by slot,
    /// the backend ID and endpoint it names (`None` where a slot or its
    /// backend is missing, as after an interrupted update), then its
    /// draining backends.
    pub fn stored_ports(&self) -> Result<Vec<StoredPort>, MapsError> {
        let mut backends = std::collections::HashMap::new();
        for item in self.backends.iter() {
            let (id, b) = item.map_err(|source| MapsError::Read {
                name: BACKEND_MAP,
                source,
            })?;
            let endpoint = Endpoint {
                addr: Ipv4Addr::from(b.addr.to_ne_bytes()),
                port: u16::from_be(b.port),
            };
            backends.insert(id, endpoint);
        }
        let mut masters = BTreeMap::new();
        let mut slots = std::collections::HashMap::new();
        for item in self.services.iter() {
            let (key, entry) = item.map_err(|source| MapsError::Read {
                name: SERVICE_MAP,
                source,
            })?;
            let Some(protocol) = Protocol::from_number(key.proto) else {
                continue;
            };
            let frontend = Frontend {
                addr: Ipv4Addr::from(key.addr.to_ne_bytes()),
                port: u16::from_be(key.port),
                protocol,
            };
            if key.slot == MASTER_SLOT {
                masters.insert(frontend, entry);
            } else {
                slots.insert((frontend, key.slot), entry.backend_id);
            }
        }
        let named = |frontend: Frontend, slot: u16| {
            let id = *slots.get(&(frontend, slot))?;
            Some((id, *backends.get(&id)?))
        };
        Ok(masters
            .into_iter()
            .map(|(frontend, master)| StoredPort {
                frontend,
                master,
                slots: (1..=master.count).map(|slot| named(frontend, slot)).collect(),
                draining: (master.count..u16::MAX)
                    .map_while(|before| named(frontend, before + 1))
                    .collect(),
            })
            .collect())
    }

    /// Entries in use and capacity of each hash map (a full scan: for
    /// scrapes, not for the packet path).
    pub fn occupancy(&self) -> Vec<(&'static str, usize, u32)> {
        fn of<K: aya::Pod, V: aya::Pod>(
            name: &'static str,
            map: &HashMap<MapData, K, V>,
        ) -> (&'static str, usize, u32) {
            let capacity = map.map().info().map_or(0, |i| i.max_entries());
            (name, map.keys().filter(Result::is_ok).count(), capacity)
        }
        vec![
            of(SERVICE_MAP, &self.services),
            of(BACKEND_MAP, &self.backends),
            of(VIP_MAP, &self.vips),
            of(CT_MAP, &self.conntrack),
            of(SERVICE_META_MAP, &self.meta),
        ]
    }

    /// Statistics of service port `svc_id`, summed over CPUs.
    pub fn service_stats(&self, svc_id: u32) -> Result<ServiceStats, MapsError> {
        let per_cpu = self.stats.get(&svc_id, 0).map_err(|source| MapsError::Read {
            name: SERVICE_STATS_MAP,
            source,
        })?;
        Ok(per_cpu
            .iter()
            .fold(ServiceStats::default(), |sum, s| ServiceStats {
                packets: sum.packets + s.packets,
                bytes: sum.bytes + s.bytes,
                new_flows: sum.new_flows + s.new_flows,
            }))
    }

    /// Every counter summed over CPUs, by [`counters::LABELS`] index.
    pub fn counter_totals(&self) -> Result<[u64; counters::COUNT as usize], MapsError> {
        let mut totals = [0u64; counters::COUNT as usize];
        for (index, total) in totals.iter_mut().enumerate() {
            let per_cpu = self
                .counters
                .get(&(index as u32), 0)
                .map_err(|source| MapsError::Read {
                    name: COUNTER_MAP,
                    source,
                })?;
            *total = per_cpu.iter().sum();
        }
        Ok(totals)
    }
}
