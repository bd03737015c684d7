//! Writes the desired service model into the maps, changing only what differs.
//!
//! Ordering keeps every intermediate state valid for the datapath:
//! backends before the slots that name them, slots before the master entry
//! that counts them (and, for a port of at most three, carries copies of
//! them), and removals (shrunk masters first, then slots, then backends, then
//! whole services) after every addition. A service port whose writes fail is
//! rolled back to its previous state and reported; the others go on.
//!
//! Draining endpoints: an endpoint that leaves a port's selection while it
//! still serves (terminating while others are ready, or left out by topology
//! or policy) keeps its backend, ID and all, flagged
//! [`BACKEND_FLAG_DRAINING`], so flows already on it stay (kube-proxy keeps a
//! UDP endpoint's conntrack entries until it stops serving or goes) and
//! session affinity no longer sends new connections to it. Its slot moves
//! after the master's count (slot `count + 1 + i` holds the `i`th draining
//! backend), where new flows never pick it and where a restarted agent reads
//! it back; it goes, slot and backend, once the endpoint stops serving or
//! leaves the port. So the rule above has one more step: slots up to the new
//! count are written before the master, the draining slots after it, so that
//! no new flow picks a draining backend in between.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use aya::maps::{MapError, PerCpuValues};
use redirector_common::{
    config::{CONFIG_MAP, Config, MAX_SERVICE_CIDRS, ServiceCidr},
    service::{
        BACKEND_FLAG_DRAINING, BACKEND_MAP, Backend, FLAG_NO_LOCAL_ENDPOINTS, INLINE_BACKENDS, InlineSlot,
        MASTER_SLOT, SERVICE_MAP, SERVICE_META_MAP, SERVICE_STATS_MAP, ServiceEntry, ServiceKey, ServiceMeta,
        ServiceStats, VIP_MAP, VipEntry,
    },
};

use super::Maps;
use super::batch;
use super::maps::MapsError;
use crate::datapath::record::PortRecord;
use crate::model::{Desired, Endpoint, Frontend, Ipv4Cidr, NoEndpoints, ServicePort, ServicePortName};

/// Slots are numbered by a `u16`, slot 0 being the master entry.
pub const MAX_ENDPOINTS_PER_PORT: usize = u16::MAX as usize;

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(
        "service port {service} ({frontend}) was not programmed: map {map} is full \
         (raise its size; the service keeps its previous state)"
    )]
    MapFull {
        service: ServicePortName,
        frontend: Frontend,
        map: &'static str,
    },
    #[error("service port {service} ({frontend}): writing map {map}")]
    Write {
        service: ServicePortName,
        frontend: Frontend,
        map: &'static str,
        source: Box<MapError>,
    },
    #[error(
        "service port {service} ({frontend}) has {count} endpoints; at most \
         {MAX_ENDPOINTS_PER_PORT} per service port are supported"
    )]
    TooManyEndpoints {
        service: ServicePortName,
        frontend: Frontend,
        count: usize,
    },
    #[error("service address {addr}: writing map {VIP_MAP}")]
    Address { addr: Ipv4Addr, source: Box<MapError> },
    #[error("writing map {CONFIG_MAP}")]
    Config { source: Box<MapError> },
    #[error("{count} service ranges given; the datapath holds at most {MAX_SERVICE_CIDRS}")]
    TooManyServiceCidrs { count: usize },
    #[error("reading the maps to resume from their pinned state")]
    Restore { source: Box<MapsError> },
}

/// What one sync changed.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Map entries inserted or overwritten.
    pub writes: usize,
    /// Map entries deleted.
    pub deletes: usize,
    /// Service ports that could not be programmed (each kept its old state).
    pub errors: Vec<SyncError>,
    /// Frontends whose entries were written or deleted.
    pub changed: Vec<Frontend>,
}

impl SyncReport {
    fn entries(&self) -> usize {
        self.writes + self.deletes
    }

    /// Adds what a later sync of the same change did.
    pub fn absorb(&mut self, later: SyncReport) {
        self.writes += later.writes;
        self.deletes += later.deletes;
        self.errors.extend(later.errors);
        self.changed.extend(later.changed);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    backend_id: u32,
    endpoint: Endpoint,
}

#[derive(Clone, Debug)]
struct Programmed {
    svc_id: u32,
    /// What the master entry says beyond the slot count.
    master: MasterParams,
    /// Slot `i + 1` holds `slots[i]`.
    slots: Vec<Slot>,
    /// Slot `slots.len() + 1 + i` holds `draining[i]`, beyond the master's
    /// count: no longer selected, still serving.
    draining: Vec<Slot>,
    /// Digest of the record last written to the metadata map (the record
    /// itself is 512 bytes; this keeps the agent small at scale).
    meta: Option<u64>,
}

impl Programmed {
    /// Every slot in key order: the selected ones, then the draining ones.
    fn layout(&self) -> impl Iterator<Item = (&Slot, bool)> {
        let selected = self.slots.iter().map(|slot| (slot, false));
        selected.chain(self.draining.iter().map(|slot| (slot, true)))
    }
}

/// Service port IDs index per-service arrays, so they stay below the arrays'
/// capacity and are reused once freed.
#[derive(Debug)]
struct SvcIds {
    next: u32,
    free: BTreeSet<u32>,
    capacity: u32,
}

impl SvcIds {
    fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next < self.capacity).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    fn release(&mut self, id: u32) {
        self.free.insert(id);
    }
}

/// Undo log of one service port's update, applied in reverse on failure.
enum Undo {
    DeleteBackend(u32),
    RestoreBackend(u32, Backend),
    /// A slot or master entry that did not exist.
    DeleteEntry(ServiceKey),
    RestoreEntry(ServiceKey, ServiceEntry),
}

pub struct MapWriter {
    maps: Maps,
    programmed: HashMap<Frontend, Programmed>,
    addresses: HashMap<Ipv4Addr, u32>,
    /// Programmed service ports per address (what `addresses` should say).
    ports_per_address: HashMap<Ipv4Addr, u32>,
    svc_ids: SvcIds,
    next_backend_id: u32,
    /// Set after resuming from pins: entries no programmed service accounts
    /// for are removed at the end of the first sync.
    collect_garbage: bool,
}

impl MapWriter {
    /// Resumes from whatever the maps hold (empty maps for a first start).
    pub fn new(maps: Maps) -> Result<Self, SyncError> {
        let capacity = maps.stats.len();
        let mut writer = Self {
            maps,
            programmed: HashMap::new(),
            addresses: HashMap::new(),
            ports_per_address: HashMap::new(),
            svc_ids: SvcIds {
                next: 1,
                free: BTreeSet::new(),
                capacity,
            },
            next_backend_id: 1,
            collect_garbage: false,
        };
        writer.restore()?;
        Ok(writer)
    }

    /// Number of service ports in the maps.
    pub fn programmed_count(&self) -> usize {
        self.programmed.len()
    }

    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Frontends currently in the maps.
    pub fn programmed_frontends(&self) -> impl Iterator<Item = &Frontend> {
        self.programmed.keys()
    }

    /// Frontends currently in the maps, with their endpoints by slot order.
    pub fn programmed(&self) -> BTreeMap<Frontend, Vec<Endpoint>> {
        self.programmed
            .iter()
            .map(|(fe, p)| (*fe, p.slots.iter().map(|s| s.endpoint).collect()))
            .collect()
    }

    /// Replaces the service ranges (none: nothing is dropped by range). One
    /// map write: a packet sees the old ranges or the new ones (at worst, a
    /// mix of both while the entry is copied; never an empty range that would
    /// match every address, see [`ServiceCidr::mask`]).
    pub fn set_service_cidrs(&mut self, cidrs: &[Ipv4Cidr]) -> Result<(), SyncError> {
        if cidrs.len() > MAX_SERVICE_CIDRS {
            return Err(SyncError::TooManyServiceCidrs { count: cidrs.len() });
        }
        let mut config = Config {
            service_cidr_count: cidrs.len() as u32,
            ..Config::default()
        };
        for (slot, cidr) in config.service_cidrs.iter_mut().zip(cidrs) {
            *slot = ServiceCidr {
                addr: (u32::from(cidr.addr) & cidr.mask()).to_be(),
                mask: cidr.mask().to_be(),
            };
        }
        self.maps
            .config
            .set(0, config, 0)
            .map_err(|source| SyncError::Config {
                source: Box::new(source),
            })
    }

    /// Makes the maps hold exactly `desired`.
    pub fn sync(&mut self, desired: &Desired) -> SyncReport {
        let gone: Vec<Frontend> = self
            .programmed
            .keys()
            .filter(|fe| !desired.contains_key(fe))
            .copied()
            .collect();
        let upserts: Vec<(Frontend, &ServicePort)> = desired.iter().map(|(fe, p)| (*fe, p)).collect();
        self.sync_frontends(&upserts, &gone)
    }

    /// Programs `upserts` and removes `removals`, leaving every other
    /// frontend as it is: the cost follows the change, not the cluster.
    pub fn sync_frontends(
        &mut self,
        upserts: &[(Frontend, &ServicePort)],
        removals: &[Frontend],
    ) -> SyncReport {
        let mut report = SyncReport::default();
        // Addresses first: the datapath looks a packet's address up before
        // its service port.
        self.add_addresses(upserts.iter().map(|(fe, _)| fe), &mut report);
        // A frontend listed twice is new only the first time.
        let mut seen = HashSet::new();
        let (new, known): (Vec<_>, Vec<_>) = upserts
            .iter()
            .copied()
            .partition(|(fe, _)| !self.programmed.contains_key(fe) && seen.insert(*fe));
        let left = self.add_new_ports(new, &mut report);
        for (frontend, port) in left.iter().chain(&known) {
            let before = report.entries();
            if let Err(error) = self.upsert(*frontend, port, &mut report) {
                report.errors.push(error);
            }
            if report.entries() != before {
                report.changed.push(*frontend);
            }
        }
        for frontend in removals {
            if self.programmed.contains_key(frontend) {
                self.remove(*frontend, &mut report);
                report.changed.push(*frontend);
            }
        }
        let touched: HashSet<Ipv4Addr> = upserts
            .iter()
            .map(|(fe, _)| fe.addr)
            .chain(removals.iter().map(|fe| fe.addr))
            .collect();
        self.settle_addresses(touched, &mut report);
        if self.collect_garbage {
            self.collect_garbage = false;
            self.remove_unaccounted(&mut report);
        }
        report
    }

    /// Programs service ports the maps do not hold yet (a cold start, a
    /// relist, new Services) with one batch per map, in the order a single
    /// update uses: backends, slots, masters, then the records. A batch that
    /// fails (a full map) is undone and its ports are returned, for the
    /// one-by-one path to program what fits and name what does not; a
    /// records batch that fails is finished one by one.
    fn add_new_ports<'a>(
        &mut self,
        ports: Vec<(Frontend, &'a ServicePort)>,
        report: &mut SyncReport,
    ) -> Vec<(Frontend, &'a ServicePort)> {
        let mut next_backend_id = self.next_backend_id;
        let mut planned = Vec::new();
        let mut left = Vec::new();
        for &(fe, port) in &ports {
            // The one-by-one path names what is wrong with these.
            let svc_id = (port.endpoints.len() <= MAX_ENDPOINTS_PER_PORT)
                .then(|| self.svc_ids.alloc())
                .flatten();
            let Some(svc_id) = svc_id else {
                left.push((fe, port));
                continue;
            };
            let slots = plan_slots(&[], &port.endpoints, |_| alloc_id(&mut next_backend_id));
            planned.push((fe, port, svc_id, slots));
        }
        let backends: Vec<(u32, Backend)> = planned
            .iter()
            .flat_map(|(fe, _, _, slots)| {
                slots
                    .iter()
                    .map(|slot| (slot.backend_id, backend_entry(*fe, slot, false)))
            })
            .collect();
        let slots: Vec<(ServiceKey, ServiceEntry)> = planned
            .iter()
            .flat_map(|(fe, _, svc_id, slots)| {
                slots
                    .iter()
                    .enumerate()
                    .map(|(index, slot)| (service_key(*fe, index as u16 + 1), slot_entry(slot, *svc_id)))
            })
            .collect();
        let masters: Vec<(ServiceKey, ServiceEntry)> = planned
            .iter()
            .map(|(fe, port, svc_id, slots)| {
                let master = master_entry(slots, *svc_id, MasterParams::of(port));
                (service_key(*fe, MASTER_SLOT), master)
            })
            .collect();
        let written = batch::update_batch(&mut self.maps.backends, &backends)
            .map_err(|e| (e.written, 0, 0))
            .and_then(|()| {
                batch::update_batch(&mut self.maps.services, &slots)
                    .map_err(|e| (backends.len(), e.written, 0))
            })
            .and_then(|()| {
                batch::update_batch(&mut self.maps.services, &masters)
                    .map_err(|e| (backends.len(), slots.len(), e.written))
            });
        if let Err((b, s, m)) = written {
            for (key, _) in masters[..m].iter().chain(&slots[..s]) {
                let _ = self.maps.services.remove(key);
            }
            for (id, _) in &backends[..b] {
                let _ = self.maps.backends.remove(id);
            }
            for (_, _, svc_id, _) in planned {
                self.svc_ids.release(svc_id);
            }
            return ports;
        }
        self.next_backend_id = next_backend_id;
        report.writes += backends.len() + slots.len() + masters.len();

        let mut owners = Vec::with_capacity(planned.len());
        let mut records: Vec<(u32, ServiceMeta)> = Vec::with_capacity(planned.len());
        for (fe, port, svc_id, slots) in planned {
            report.changed.push(fe);
            self.track(
                fe,
                Programmed {
                    svc_id,
                    master: MasterParams::of(port),
                    slots,
                    draining: Vec::new(),
                    meta: None,
                },
            );
            owners.push((fe, port));
            records.push((svc_id, PortRecord::new(port).encode()));
        }
        let stored = match batch::update_batch(&mut self.maps.meta, &records) {
            Ok(()) => records.len(),
            Err(e) => e.written,
        };
        report.writes += stored;
        for (index, ((fe, port), (svc_id, meta))) in owners.into_iter().zip(records).enumerate() {
            if index < stored {
                if let Some(p) = self.programmed.get_mut(&fe) {
                    p.meta = Some(digest(&meta));
                }
            } else if let Err(source) = self.write_meta(fe, svc_id, meta, report) {
                report
                    .errors
                    .push(write_error(port, fe, SERVICE_META_MAP, source));
            }
        }
        left
    }

    fn upsert(&mut self, fe: Frontend, port: &ServicePort, report: &mut SyncReport) -> Result<(), SyncError> {
        if port.endpoints.len() > MAX_ENDPOINTS_PER_PORT {
            return Err(SyncError::TooManyEndpoints {
                service: port.name.clone(),
                frontend: fe,
                count: port.endpoints.len(),
            });
        }
        let old = self.programmed.get(&fe).cloned();
        let (old_slots, old_draining): (&[Slot], &[Slot]) =
            old.as_ref().map_or((&[], &[]), |p| (&p.slots, &p.draining));
        let mut next_backend_id = self.next_backend_id;
        // An endpoint selected again keeps the ID it drained with, so the
        // flows and the affinity entries naming it stay valid.
        let drained: HashMap<Endpoint, u32> =
            old_draining.iter().map(|s| (s.endpoint, s.backend_id)).collect();
        let new_slots = plan_slots(old_slots, &port.endpoints, |endpoint| {
            drained
                .get(endpoint)
                .copied()
                .unwrap_or_else(|| alloc_id(&mut next_backend_id))
        });
        let mut new_draining = plan_draining(old_slots, old_draining, &new_slots, &port.also_serving);
        // Slots are numbered by a u16: beyond that, draining endpoints go
        // (their flows move, as they did before endpoints drained).
        new_draining.truncate(MAX_ENDPOINTS_PER_PORT - new_slots.len());
        let meta = PortRecord::new(port).encode();
        let params = MasterParams::of(port);
        if let Some(old) = &old
            && new_slots == old.slots
            && new_draining == old.draining
            && old.master == params
        {
            // Forwarding unchanged; only what operators see may differ.
            if old.meta != Some(digest(&meta)) {
                self.write_meta(fe, old.svc_id, meta, report)
                    .map_err(|source| write_error(port, fe, SERVICE_META_MAP, source))?;
            }
            return Ok(());
        }
        let svc_id = match &old {
            Some(p) => p.svc_id,
            None => self.svc_ids.alloc().ok_or_else(|| SyncError::MapFull {
                service: port.name.clone(),
                frontend: fe,
                map: SERVICE_STATS_MAP,
            })?,
        };
        let mut new = Programmed {
            svc_id,
            master: params,
            slots: new_slots,
            draining: new_draining,
            meta: old.as_ref().and_then(|o| o.meta),
        };

        let mut undo = Vec::new();
        let mut result = self.write_service(fe, old.as_ref(), &new, &mut undo, report);
        if let Err((SERVICE_MAP, e)) = &result
            && is_map_full(e)
            && !new.draining.is_empty()
        {
            // Draining slots are a courtesy to open flows: a full map drops
            // them (the flows move, as before endpoints drained), not the
            // update new flows need.
            self.rollback(std::mem::take(&mut undo), report);
            new.draining.clear();
            result = self.write_service(fe, old.as_ref(), &new, &mut undo, report);
        }
        if let Err(source) = result {
            self.rollback(undo, report);
            match &old {
                // Record what is wanted, so the CLI shows the drift.
                Some(old) => {
                    let _ = self.write_meta(fe, old.svc_id, meta, report);
                }
                None => self.svc_ids.release(svc_id),
            }
            let (map, source) = source;
            return Err(write_error(port, fe, map, source));
        }
        self.next_backend_id = next_backend_id;

        // Now that the master no longer counts them: surplus slots, then
        // backends no slot names.
        let old_len = old.as_ref().map_or(0, |o| o.layout().count());
        for slot in new.layout().count() + 1..=old_len {
            self.delete_service_entry(service_key(fe, slot as u16), report);
        }
        let kept: HashSet<u32> = new.layout().map(|(slot, _)| slot.backend_id).collect();
        for (gone, _) in old
            .iter()
            .flat_map(Programmed::layout)
            .filter(|(slot, _)| !kept.contains(&slot.backend_id))
        {
            self.delete_backend(gone.backend_id, report);
        }
        self.track(fe, new);
        self.write_meta(fe, svc_id, meta, report)
            .map_err(|source| write_error(port, fe, SERVICE_META_MAP, source))
    }

    /// Writes the operator-facing record of a service port (not used for
    /// forwarding) and remembers it.
    fn write_meta(
        &mut self,
        fe: Frontend,
        svc_id: u32,
        meta: ServiceMeta,
        report: &mut SyncReport,
    ) -> Result<(), MapError> {
        self.maps.meta.insert(svc_id, meta, 0)?;
        report.writes += 1;
        if let Some(p) = self.programmed.get_mut(&fe) {
            p.meta = Some(digest(&meta));
        }
        Ok(())
    }

    /// Backends (new ones, and those moving between selected and draining),
    /// then the changed slots up to the new count, then the master entry
    /// (when it is new, or its count, parameters or inline copies change),
    /// then the changed
    /// draining slots. `old` is `None` for a new port.
    fn write_service(
        &mut self,
        fe: Frontend,
        old: Option<&Programmed>,
        new: &Programmed,
        undo: &mut Vec<Undo>,
        report: &mut SyncReport,
    ) -> Result<(), (&'static str, MapError)> {
        let was_draining: HashMap<u32, bool> = old
            .iter()
            .flat_map(|o| o.layout())
            .map(|(slot, draining)| (slot.backend_id, draining))
            .collect();
        for (slot, draining) in new.layout() {
            let was = was_draining.get(&slot.backend_id).copied();
            if was == Some(draining) {
                continue;
            }
            self.maps
                .backends
                .insert(slot.backend_id, backend_entry(fe, slot, draining), 0)
                .map_err(|e| (BACKEND_MAP, e))?;
            undo.push(match was {
                Some(was) => Undo::RestoreBackend(slot.backend_id, backend_entry(fe, slot, was)),
                None => Undo::DeleteBackend(slot.backend_id),
            });
            report.writes += 1;
        }
        let old_layout: Vec<&Slot> = old
            .iter()
            .flat_map(|o| o.layout())
            .map(|(slot, _)| slot)
            .collect();
        let changed: Vec<(ServiceKey, ServiceEntry, Option<ServiceEntry>)> = new
            .layout()
            .enumerate()
            .filter(|(index, (slot, _))| {
                old_layout.get(*index).map(|o| o.backend_id) != Some(slot.backend_id)
            })
            .map(|(index, (slot, _))| {
                (
                    service_key(fe, index as u16 + 1),
                    slot_entry(slot, new.svc_id),
                    old_layout.get(index).map(|o| slot_entry(o, new.svc_id)),
                )
            })
            .collect();
        let counted = changed.partition_point(|(key, _, _)| usize::from(key.slot) <= new.slots.len());
        self.write_entries(&changed[..counted], undo, report)?;
        let master = master_entry(&new.slots, new.svc_id, new.master);
        let old_master = old.map(|o| master_entry(&o.slots, o.svc_id, o.master));
        if old_master != Some(master) {
            self.write_entries(
                &[(service_key(fe, MASTER_SLOT), master, old_master)],
                undo,
                report,
            )?;
        }
        self.write_entries(&changed[counted..], undo, report)
    }

    /// Writes service map entries, each with what it replaces (`None`: a
    /// new key), logging how to undo them.
    fn write_entries(
        &mut self,
        entries: &[(ServiceKey, ServiceEntry, Option<ServiceEntry>)],
        undo: &mut Vec<Undo>,
        report: &mut SyncReport,
    ) -> Result<(), (&'static str, MapError)> {
        for (key, entry, before) in entries {
            self.maps
                .services
                .insert(key, entry, 0)
                .map_err(|e| (SERVICE_MAP, e))?;
            undo.push(match before {
                Some(before) => Undo::RestoreEntry(*key, *before),
                None => Undo::DeleteEntry(*key),
            });
            report.writes += 1;
        }
        Ok(())
    }

    fn rollback(&mut self, undo: Vec<Undo>, report: &mut SyncReport) {
        for step in undo.into_iter().rev() {
            match step {
                Undo::DeleteBackend(id) => self.delete_backend(id, report),
                Undo::DeleteEntry(key) => self.delete_service_entry(key, report),
                // Overwriting an existing key needs no new room.
                Undo::RestoreBackend(id, entry) => {
                    if self.maps.backends.insert(id, entry, 0).is_ok() {
                        report.writes += 1;
                    }
                }
                Undo::RestoreEntry(key, entry) => {
                    if self.maps.services.insert(key, entry, 0).is_ok() {
                        report.writes += 1;
                    }
                }
            }
        }
    }

    /// Master first (new flows stop), then slots, then backends.
    fn remove(&mut self, fe: Frontend, report: &mut SyncReport) {
        let Some(old) = self.untrack(fe) else {
            return;
        };
        self.delete_service_entry(service_key(fe, MASTER_SLOT), report);
        for slot in 1..=old.layout().count() {
            self.delete_service_entry(service_key(fe, slot as u16), report);
        }
        for (slot, _) in old.layout() {
            self.delete_backend(slot.backend_id, report);
        }
        self.delete_meta(old.svc_id, report);
        // A reused ID starts from zero; zeroing an array slot is its delete.
        if let Ok(cpus) = aya::util::nr_cpus()
            && let Ok(zero) = PerCpuValues::try_from(vec![ServiceStats::default(); cpus])
            && self.maps.stats.set(old.svc_id, zero, 0).is_ok()
        {
            report.deletes += 1;
        }
        self.svc_ids.release(old.svc_id);
    }

    /// Records `fe` as programmed.
    fn track(&mut self, fe: Frontend, programmed: Programmed) {
        if self.programmed.insert(fe, programmed).is_none() {
            *self.ports_per_address.entry(fe.addr).or_default() += 1;
        }
    }

    /// Forgets `fe`, returning what was programmed for it.
    fn untrack(&mut self, fe: Frontend) -> Option<Programmed> {
        let old = self.programmed.remove(&fe)?;
        if let Some(count) = self.ports_per_address.get_mut(&fe.addr) {
            *count -= 1;
            if *count == 0 {
                self.ports_per_address.remove(&fe.addr);
            }
        }
        Some(old)
    }

    /// Writes the address entries `frontends` need that the map lacks.
    fn add_addresses<'a>(&mut self, frontends: impl Iterator<Item = &'a Frontend>, report: &mut SyncReport) {
        let mut wanted: HashMap<Ipv4Addr, u32> = HashMap::new();
        for fe in frontends {
            *wanted.entry(fe.addr).or_default() += 1;
        }
        for (addr, count) in wanted {
            if !self.addresses.contains_key(&addr) {
                self.write_address(addr, count, report);
            }
        }
    }

    /// Brings the entries of `addrs` in line with what is programmed: counts
    /// updated, addresses no service port uses any more removed.
    fn settle_addresses(&mut self, addrs: HashSet<Ipv4Addr>, report: &mut SyncReport) {
        for addr in addrs {
            let Some(count) = self.addresses.get(&addr).copied() else {
                continue;
            };
            match self.ports_per_address.get(&addr).copied() {
                Some(want) if want != count => self.write_address(addr, want, report),
                Some(_) => {}
                None => {
                    if self.maps.vips.remove(&u32::from_ne_bytes(addr.octets())).is_ok() {
                        report.deletes += 1;
                    }
                    self.addresses.remove(&addr);
                }
            }
        }
    }

    fn write_address(&mut self, addr: Ipv4Addr, count: u32, report: &mut SyncReport) {
        let key = u32::from_ne_bytes(addr.octets());
        match self.maps.vips.insert(key, VipEntry { port_count: count }, 0) {
            Ok(()) => {
                report.writes += 1;
                self.addresses.insert(addr, count);
            }
            Err(source) => report.errors.push(SyncError::Address {
                addr,
                source: Box::new(source),
            }),
        }
    }

    fn delete_service_entry(&mut self, key: ServiceKey, report: &mut SyncReport) {
        if self.maps.services.remove(&key).is_ok() {
            report.deletes += 1;
        }
    }

    fn delete_meta(&mut self, svc_id: u32, report: &mut SyncReport) {
        if self.maps.meta.remove(&svc_id).is_ok() {
            report.deletes += 1;
        }
    }

    fn delete_backend(&mut self, id: u32, report: &mut SyncReport) {
        if self.maps.backends.remove(&id).is_ok() {
            report.deletes += 1;
        }
    }

    /// Rebuilds the programmed state from the maps an earlier agent left.
    fn restore(&mut self) -> Result<(), SyncError> {
        let restore_err = |source| SyncError::Restore {
            source: Box::new(source),
        };
        let stored = self.maps.stored_ports().map_err(restore_err)?;
        let backend_ids: Vec<u32> = self.maps.backends.keys().filter_map(Result::ok).collect();
        let entries = stored.len() + backend_ids.len();
        let to_slots = |slots: Vec<(u32, Endpoint)>| -> Vec<Slot> {
            slots
                .into_iter()
                .map(|(backend_id, endpoint)| Slot { backend_id, endpoint })
                .collect()
        };
        for port in stored {
            // A damaged port is forgotten, so the next sync rewrites it whole:
            // a slot or backend missing, or a master whose inline slots are
            // not its slots (an agent stopped between the two writes).
            let Some(slots) = port.slots.into_iter().collect::<Option<Vec<_>>>() else {
                continue;
            };
            let slots = to_slots(slots);
            let master = MasterParams::of_entry(&port.master);
            if master_entry(&slots, port.master.svc_id, master) != port.master {
                continue;
            }
            self.track(
                port.frontend,
                Programmed {
                    svc_id: port.master.svc_id,
                    master,
                    slots,
                    draining: to_slots(port.draining),
                    meta: self
                        .maps
                        .meta
                        .get(&port.master.svc_id, 0)
                        .ok()
                        .map(|m| digest(&m)),
                },
            );
        }
        let used: BTreeSet<u32> = self.programmed.values().map(|p| p.svc_id).collect();
        self.svc_ids.next = used.last().map_or(1, |max| max + 1);
        self.svc_ids.free = (1..self.svc_ids.next).filter(|id| !used.contains(id)).collect();
        self.next_backend_id = backend_ids
            .iter()
            .copied()
            .max()
            .unwrap_or(0)
            .wrapping_add(1)
            .max(1);
        for item in self.maps.vips.iter() {
            let (addr, entry) = item
                .map_err(|source| MapsError::Read {
                    name: VIP_MAP,
                    source,
                })
                .map_err(restore_err)?;
            self.addresses
                .insert(Ipv4Addr::from(addr.to_ne_bytes()), entry.port_count);
        }
        self.collect_garbage = entries > 0;
        Ok(())
    }

    /// Deletes entries that no programmed service accounts for (left by an
    /// agent that stopped mid-update, or by services removed while it was
    /// down), and gives a backend whose draining flag disagrees with where
    /// its slot is (an agent that stopped between the two writes) the flag
    /// its slot says: the slots are what a restart reads back.
    fn remove_unaccounted(&mut self, report: &mut SyncReport) {
        let mut keep_keys: HashSet<ServiceKey> = HashSet::new();
        let mut keep_backends: HashMap<u32, bool> = HashMap::new();
        for (fe, p) in &self.programmed {
            keep_keys.insert(service_key(*fe, MASTER_SLOT));
            for (index, (slot, draining)) in p.layout().enumerate() {
                keep_keys.insert(service_key(*fe, index as u16 + 1));
                keep_backends.insert(slot.backend_id, draining);
            }
        }
        let stale_keys: Vec<ServiceKey> = self
            .maps
            .services
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep_keys.contains(k))
            .collect();
        for key in stale_keys {
            self.delete_service_entry(key, report);
        }
        let mut stale_backends = Vec::new();
        let mut misflagged = Vec::new();
        for (id, backend) in self.maps.backends.iter().filter_map(Result::ok) {
            match keep_backends.get(&id) {
                None => stale_backends.push(id),
                Some(&draining) if draining != is_draining(&backend) => misflagged.push((
                    id,
                    Backend {
                        flags: backend_flags(draining),
                        ..backend
                    },
                )),
                Some(_) => {}
            }
        }
        for id in stale_backends {
            self.delete_backend(id, report);
        }
        for (id, backend) in misflagged {
            if self.maps.backends.insert(id, backend, 0).is_ok() {
                report.writes += 1;
            }
        }
        let orphan_addresses: HashSet<Ipv4Addr> = self.addresses.keys().copied().collect();
        self.settle_addresses(orphan_addresses, report);
        let live: HashSet<u32> = self.programmed.values().map(|p| p.svc_id).collect();
        let stale_meta: Vec<u32> = self
            .maps
            .meta
            .keys()
            .filter_map(Result::ok)
            .filter(|id| !live.contains(id))
            .collect();
        for id in stale_meta {
            self.delete_meta(id, report);
        }
    }
}

/// Why a write to `map` for service port `fe` failed: a full map, or another error.
fn write_error(port: &ServicePort, fe: Frontend, map: &'static str, source: MapError) -> SyncError {
    let service = port.name.clone();
    if is_map_full(&source) {
        SyncError::MapFull {
            service,
            frontend: fe,
            map,
        }
    } else {
        SyncError::Write {
            service,
            frontend: fe,
            map,
            source: Box::new(source),
        }
    }
}

/// The backend map's entry for the endpoint in `slot` of `fe`.
fn backend_entry(fe: Frontend, slot: &Slot, draining: bool) -> Backend {
    Backend {
        addr: u32::from_ne_bytes(slot.endpoint.addr.octets()),
        port: slot.endpoint.port.to_be(),
        proto: fe.protocol.number(),
        flags: backend_flags(draining),
    }
}

fn backend_flags(draining: bool) -> u8 {
    if draining { BACKEND_FLAG_DRAINING } else { 0 }
}

fn is_draining(backend: &Backend) -> bool {
    backend.flags & BACKEND_FLAG_DRAINING != 0
}

/// The service map's entry for `slot`: its backend ID and address.
/// The master entry of a service port with `slots`, carrying them inline
/// when they are few enough.
fn master_entry(slots: &[Slot], svc_id: u32, params: MasterParams) -> ServiceEntry {
    let mut inline = [InlineSlot::EMPTY; INLINE_BACKENDS];
    if slots.len() <= INLINE_BACKENDS {
        for (copy, slot) in inline.iter_mut().zip(slots) {
            let entry = slot_entry(slot, svc_id);
            *copy = InlineSlot {
                backend_id: entry.backend_id,
                addr: entry.backend_addr,
                port: entry.backend_port,
                _pad: [0; 2],
            };
        }
    }
    ServiceEntry {
        flags: params.flags,
        backend_id: params.affinity_timeout,
        inline,
        ..ServiceEntry::master(slots.len() as u16, svc_id)
    }
}

/// What a master entry says besides its slot count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MasterParams {
    flags: u16,
    /// Session affinity timeout in seconds, 0 for none.
    affinity_timeout: u32,
}

impl MasterParams {
    /// What `port` needs: only an empty port has flags.
    fn of(port: &ServicePort) -> Self {
        let flags = if port.endpoints.is_empty() && port.no_endpoints == NoEndpoints::Drop {
            FLAG_NO_LOCAL_ENDPOINTS
        } else {
            0
        };
        Self {
            flags,
            affinity_timeout: port.affinity.map_or(0, |a| a.timeout_seconds),
        }
    }

    fn of_entry(master: &ServiceEntry) -> Self {
        Self {
            flags: master.flags,
            affinity_timeout: master.backend_id,
        }
    }
}

fn slot_entry(slot: &Slot, svc_id: u32) -> ServiceEntry {
    ServiceEntry::slot(
        slot.backend_id,
        svc_id,
        u32::from_ne_bytes(slot.endpoint.addr.octets()),
        slot.endpoint.port.to_be(),
    )
}

/// Identifies a metadata record's bytes, to tell whether it must be rewritten.
fn digest(meta: &ServiceMeta) -> u64 {
    crate::model::fnv1a(&meta.json[..(meta.len as usize).min(meta.json.len())])
}

/// Keeps surviving endpoints in their slots, fills freed slots with new
/// endpoints (their backend ID from `id_for`), closes remaining gaps by
/// moving the last slot in, and appends the rest: as few slot writes as
/// possible.
fn plan_slots(old: &[Slot], desired: &[Endpoint], mut id_for: impl FnMut(&Endpoint) -> u32) -> Vec<Slot> {
    let wanted: HashSet<&Endpoint> = desired.iter().collect();
    let mut slots: Vec<Option<Slot>> = old
        .iter()
        .map(|s| wanted.contains(&s.endpoint).then(|| s.clone()))
        .collect();
    let present: HashSet<Endpoint> = slots.iter().flatten().map(|s| s.endpoint).collect();
    let mut fresh = desired.iter().filter(|e| !present.contains(e)).map(|e| Slot {
        backend_id: id_for(e),
        endpoint: *e,
    });
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        match fresh.next() {
            Some(new) => *slot = Some(new),
            None => break,
        }
    }
    let mut index = 0;
    while index < slots.len() {
        if slots[index].is_some() {
            index += 1;
            continue;
        }
        let last = slots.pop().flatten();
        if index < slots.len() {
            slots[index] = last;
        }
    }
    let mut result: Vec<Slot> = slots.into_iter().flatten().collect();
    result.extend(fresh);
    result
}

/// The draining slots after an update: of the old slots, draining ones
/// first, those whose endpoint `new` does not select but which is still
/// `serving`, each endpoint once; every other old backend goes.
fn plan_draining(old: &[Slot], old_draining: &[Slot], new: &[Slot], serving: &[Endpoint]) -> Vec<Slot> {
    let selected: HashSet<&Endpoint> = new.iter().map(|s| &s.endpoint).collect();
    let serving: HashSet<&Endpoint> = serving.iter().collect();
    let mut seen = HashSet::new();
    old_draining
        .iter()
        .chain(old)
        .filter(|s| {
            !selected.contains(&s.endpoint) && serving.contains(&s.endpoint) && seen.insert(s.endpoint)
        })
        .cloned()
        .collect()
}

fn alloc_id(next: &mut u32) -> u32 {
    let id = *next;
    *next = next.wrapping_add(1).max(1);
    id
}

/// The service map key of `fe`'s `slot` (0: the master entry).
pub fn service_key(fe: Frontend, slot: u16) -> ServiceKey {
    ServiceKey {
        addr: u32::from_ne_bytes(fe.addr.octets()),
        port: fe.port.to_be(),
        slot,
        proto: fe.protocol.number(),
        _pad: [0; 3],
    }
}

/// A hash map refuses a new key with E2BIG when full (ENOMEM when the kernel
/// cannot allocate one).
fn is_map_full(error: &MapError) -> bool {
    match error {
        MapError::SyscallError(e) => matches!(e.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOMEM)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(last: u8) -> Endpoint {
        Endpoint {
            addr: Ipv4Addr::new(10, 0, 0, last),
            port: 8080,
        }
    }

    fn slots(eps: &[(u32, u8)]) -> Vec<Slot> {
        eps.iter()
            .map(|(id, last)| Slot {
                backend_id: *id,
                endpoint: ep(*last),
            })
            .collect()
    }

    #[test]
    fn plan_slots_moves_as_little_as_possible() {
        // (name, old slots as (backend id, endpoint), desired endpoints, expected slots)
        type Case<'a> = (&'a str, &'a [(u32, u8)], &'a [u8], &'a [(u32, u8)]);
        let cases: &[Case] = &[
            ("fresh service", &[], &[1, 2], &[(100, 1), (101, 2)]),
            ("unchanged", &[(1, 1), (2, 2)], &[1, 2], &[(1, 1), (2, 2)]),
            ("append", &[(1, 1)], &[1, 2], &[(1, 1), (100, 2)]),
            (
                "replace in place",
                &[(1, 1), (2, 2), (3, 3)],
                &[1, 3, 4],
                &[(1, 1), (100, 4), (3, 3)],
            ),
            (
                "remove middle: last moves in",
                &[(1, 1), (2, 2), (3, 3)],
                &[1, 3],
                &[(1, 1), (3, 3)],
            ),
            (
                "remove first",
                &[(1, 1), (2, 2), (3, 3)],
                &[2, 3],
                &[(3, 3), (2, 2)],
            ),
            (
                "remove last",
                &[(1, 1), (2, 2), (3, 3)],
                &[1, 2],
                &[(1, 1), (2, 2)],
            ),
            ("remove all", &[(1, 1), (2, 2)], &[], &[]),
            (
                "remove two of four",
                &[(1, 1), (2, 2), (3, 3), (4, 4)],
                &[1, 4],
                &[(1, 1), (4, 4)],
            ),
        ];
        for (name, old, desired, expected) in cases {
            let desired: Vec<Endpoint> = desired.iter().map(|d| ep(*d)).collect();
            let mut next = 100;
            let got = plan_slots(&slots(old), &desired, |_| {
                next += 1;
                next - 1
            });
            assert_eq!(got, slots(expected), "case {name}");
        }
    }

    #[test]
    fn plan_draining_keeps_what_still_serves() {
        // (name, old slots, old draining, new slots, serving, expected draining)
        type Case<'a> = (
            &'a str,
            &'a [(u32, u8)],
            &'a [(u32, u8)],
            &'a [(u32, u8)],
            &'a [u8],
            &'a [(u32, u8)],
        );
        let cases: &[Case] = &[
            (
                "left the selection, still serving: drains",
                &[(1, 1), (2, 2)],
                &[],
                &[(2, 2)],
                &[1],
                &[(1, 1)],
            ),
            (
                "left the selection, not serving: goes",
                &[(1, 1), (2, 2)],
                &[],
                &[(2, 2)],
                &[],
                &[],
            ),
            (
                "draining, stops serving: goes",
                &[(2, 2)],
                &[(1, 1)],
                &[(2, 2)],
                &[],
                &[],
            ),
            (
                "draining, still serving: stays",
                &[(2, 2)],
                &[(1, 1)],
                &[(2, 2)],
                &[1],
                &[(1, 1)],
            ),
            (
                "draining, selected again: no longer draining",
                &[(2, 2)],
                &[(1, 1)],
                &[(2, 2), (1, 1)],
                &[],
                &[],
            ),
            (
                "draining ones keep their order, new ones come after",
                &[(3, 3), (4, 4)],
                &[(2, 2), (1, 1)],
                &[(4, 4)],
                &[1, 2, 3],
                &[(2, 2), (1, 1), (3, 3)],
            ),
            (
                "serving but never selected: no backend",
                &[(1, 1)],
                &[],
                &[(1, 1)],
                &[5],
                &[],
            ),
        ];
        for (name, old, old_draining, new, serving, expected) in cases {
            let serving: Vec<Endpoint> = serving.iter().map(|d| ep(*d)).collect();
            let got = plan_draining(&slots(old), &slots(old_draining), &slots(new), &serving);
            assert_eq!(got, slots(expected), "case {name}");
        }
    }

    /// Maps of the given sizes, pinned under `bpffs`.
    fn new_maps(bpffs: &testbed::Bpffs, sizes: &crate::datapath::MapSizes) -> Maps {
        let (datapath, maps) = crate::datapath::Datapath::load(bpffs.path(), sizes).expect("load");
        // The pinned maps outlive the program.
        drop(datapath);
        maps
    }

    /// The maps a restarted agent finds: those pinned under `bpffs`.
    fn pinned_maps(bpffs: &testbed::Bpffs) -> Maps {
        Maps::from_pins(&crate::datapath::maps_pin_dir(bpffs.path())).expect("the pinned maps")
    }

    const DNS: Frontend = Frontend {
        addr: Ipv4Addr::new(10, 96, 0, 53),
        port: 53,
        protocol: crate::model::Protocol::Udp,
    };

    /// One UDP service port picking `selected`, with `serving` still serving.
    fn dns(selected: &[u8], serving: &[u8]) -> Desired {
        let port = ServicePort {
            name: ServicePortName {
                namespace: "default".into(),
                name: "dns".into(),
                port: "dns".into(),
            },
            endpoints: selected.iter().map(|d| ep(*d)).collect(),
            also_serving: serving.iter().map(|d| ep(*d)).collect(),
            no_endpoints: NoEndpoints::Reject,
            affinity: None,
            info: Default::default(),
        };
        [(DNS, port)].into()
    }

    fn sync(writer: &mut MapWriter, desired: &Desired, what: &str) -> SyncReport {
        let report = writer.sync(desired);
        assert!(report.errors.is_empty(), "{what}: {:?}", report.errors);
        report
    }

    /// Slots as (backend ID, the endpoint's last octet, the backend's
    /// draining flag).
    type HeldSlots = Vec<(u32, u8, bool)>;

    /// What the maps hold for `fe`: its slots up to the count and its
    /// draining ones.
    fn held(maps: &Maps, fe: Frontend) -> (HeldSlots, HeldSlots) {
        let port = maps
            .stored_ports()
            .expect("reading the maps")
            .into_iter()
            .find(|p| p.frontend == fe)
            .expect("the port is in the maps");
        let with_flag = |(id, endpoint): (u32, Endpoint)| {
            let backend = maps.backends.get(&id, 0).expect("the slot's backend exists");
            (id, endpoint.addr.octets()[3], is_draining(&backend))
        };
        let slots = port
            .slots
            .into_iter()
            .map(|slot| with_flag(slot.expect("no slot is missing")))
            .collect();
        (slots, port.draining.into_iter().map(with_flag).collect())
    }

    #[test]
    fn draining_backends_keep_their_ids_through_updates_and_restarts() {
        let bpffs = testbed::Bpffs::new("rdt-drain");
        let (fe, desired) = (DNS, dns);
        let mut writer = MapWriter::new(new_maps(&bpffs, &Default::default())).expect("writer");
        sync(&mut writer, &desired(&[1, 2], &[]), "two endpoints");
        let (both, _) = held(writer.maps(), fe);
        let id = |last: u8| both.iter().find(|s| s.1 == last).expect("endpoint's slot").0;
        let (id1, id2) = (id(1), id(2));

        sync(&mut writer, &desired(&[2], &[1]), "1 terminating, still serving");
        assert_eq!(
            held(writer.maps(), fe),
            (vec![(id2, 2, false)], vec![(id1, 1, true)]),
            "1 drains after the count, same backend ID, flagged; 2 alone is picked"
        );

        // A restart: a new writer on the same maps changes nothing.
        drop(writer);
        let mut writer = MapWriter::new(pinned_maps(&bpffs)).expect("writer after a restart");
        let report = sync(&mut writer, &desired(&[2], &[1]), "after a restart");
        assert_eq!(
            (report.writes, report.deletes),
            (0, 0),
            "the draining backend was read back: nothing to rewrite or collect"
        );
        assert_eq!(
            held(writer.maps(), fe),
            (vec![(id2, 2, false)], vec![(id1, 1, true)]),
            "still draining after the restart"
        );

        sync(&mut writer, &desired(&[2, 1], &[]), "1 ready again");
        assert_eq!(
            held(writer.maps(), fe),
            (vec![(id2, 2, false), (id1, 1, false)], vec![]),
            "1 is picked again with its old backend ID, no longer flagged"
        );
        sync(&mut writer, &desired(&[2], &[1]), "1 terminating again");

        // An agent that stopped between the flag and the slot moves: the
        // slots say what the backend is, and the first sync fixes the flag.
        let mut backend = writer.maps().backends.get(&id1, 0).expect("backend 1");
        backend.flags = 0;
        drop(writer);
        let mut maps = pinned_maps(&bpffs);
        maps.backends.insert(id1, backend, 0).expect("clearing the flag");
        let mut writer = MapWriter::new(maps).expect("writer after a restart");
        sync(
            &mut writer,
            &desired(&[2], &[1]),
            "after a restart with a wrong flag",
        );
        assert_eq!(
            held(writer.maps(), fe),
            (vec![(id2, 2, false)], vec![(id1, 1, true)]),
            "the flag follows the slot again"
        );

        sync(&mut writer, &desired(&[2], &[]), "1 stops serving");
        assert_eq!(
            held(writer.maps(), fe),
            (vec![(id2, 2, false)], vec![]),
            "1's slot is gone"
        );
        assert!(
            writer.maps().backends.get(&id1, 0).is_err(),
            "1's backend is gone: its flows pick again"
        );
        assert_eq!(
            writer.maps().services.keys().count(),
            2,
            "the master and one slot are left"
        );

        sync(
            &mut writer,
            &desired(&[2], &[1]),
            "1 serving, never selected since",
        );
        assert_eq!(
            held(writer.maps(), fe).1,
            vec![],
            "an endpoint with no backend gets none back by serving"
        );
        sync(&mut writer, &desired(&[1], &[2]), "2 drains");
        sync(&mut writer, &Desired::new(), "the service goes");
        assert_eq!(
            (
                writer.maps().services.keys().count(),
                writer.maps().backends.keys().count()
            ),
            (0, 0),
            "removing the service removes its draining slots and backends too"
        );
    }

    #[test]
    fn a_full_service_map_drops_the_draining_slots_not_the_update() {
        let bpffs = testbed::Bpffs::new("rdt-drainfull");
        // Room for the master and three slots.
        let sizes = crate::datapath::MapSizes {
            services: 4,
            ..Default::default()
        };
        let mut writer = MapWriter::new(new_maps(&bpffs, &sizes)).expect("writer");
        sync(&mut writer, &dns(&[1, 2], &[]), "two endpoints");
        let (before, _) = held(writer.maps(), DNS);
        let id1 = before.iter().find(|s| s.1 == 1).expect("endpoint 1's slot").0;

        // Three picked and one draining would take five entries.
        sync(&mut writer, &dns(&[2, 3, 4], &[1]), "1 drains as 3 and 4 come");
        let (picked, draining) = held(writer.maps(), DNS);
        let mut picked: Vec<u8> = picked.iter().map(|s| s.1).collect();
        picked.sort_unstable();
        assert_eq!(
            (picked, draining),
            (vec![2, 3, 4], vec![]),
            "the new endpoints are programmed, without the draining slot"
        );
        assert!(
            writer.maps().backends.get(&id1, 0).is_err(),
            "1's backend is gone with its slot"
        );
    }
}
