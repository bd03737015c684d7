//! `redirector run`: load the datapath, keep the maps in line with the source
//! of services (manifest files, or the Kubernetes API) and, from the first
//! sync on, attach the programs to matching interfaces as they come and go.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use redirector_common::conntrack::CT_TIMEOUTS_MAP;
use tokio::signal::unix::{SignalKind, signal};

use crate::conntrack;
use crate::datapath::maps::ConntrackTable;
use crate::datapath::socket::{SocketLb, SocketLbError};
use crate::datapath::writer::{MapWriter, SyncError, SyncReport};
use crate::datapath::{self, Datapath, MapSizes, Maps};
use crate::error::Chain;
use crate::interfaces::{self, InterfaceGlobs, LinkEvent};
use crate::metrics::{self, Metrics};
use crate::model::{Frontend, Ipv4Cidr, NamespacedName, NodeTopology};
use crate::source::Update;
use crate::source::kube::{self as kube_source, Change, ChangeHook, KubeSource};
use crate::source::manifests::ManifestStore;
use crate::source::node::NodeWatch;
use crate::source::service_cidrs::ServiceRanges;

/// How often the manifest directory is checked for changes.
const MANIFEST_POLL: Duration = Duration::from_millis(250);
/// Services computed and written at a time after a (re)list.
const RELIST_PART: usize = 1000;

/// Where services, endpoints and the service ranges come from.
pub enum Source {
    /// A directory of Kubernetes YAML, re-read when it changes; missing
    /// clusterIPs are allocated from `service_cidr`, the one service range.
    Manifests { dir: PathBuf, service_cidr: Ipv4Cidr },
    /// The Kubernetes API, watched. The service ranges are the ServiceCIDR
    /// objects', or `service_cidr` if the API server does not serve them.
    Kubernetes {
        connection: kube_source::Connection,
        service_proxy_name: Option<String>,
        service_cidr: Option<Ipv4Cidr>,
    },
}

pub struct AgentConfig {
    pub source: Source,
    /// The node this agent runs on (`--node-name`): which endpoints are
    /// local, and whose zone topology hints are read for.
    pub node_name: Option<String>,
    pub healthz_bind_address: Option<SocketAddr>,
    /// How long a queued change may wait for its sync before `/livez` and
    /// `/healthz` fail (`--healthz-timeout`).
    pub healthz_timeout: Duration,
    pub metrics_bind_address: Option<SocketAddr>,
    pub interfaces: InterfaceGlobs,
    pub bpffs: PathBuf,
    pub map_sizes: MapSizes,
    pub attach_mode: datapath::AttachMode,
    /// Which sockets connect-time translation serves, and the cgroup its
    /// programs attach to (default: the cgroup v2 mount).
    pub socket_lb: SocketLb,
    pub cgroup_root: Option<PathBuf>,
    pub conntrack_timeouts: conntrack::Timeouts,
    pub conntrack_sweep_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Load(#[from] datapath::LoadError),
    #[error(transparent)]
    Sync(#[from] datapath::writer::SyncError),
    #[error("connect-time translation (--socket-lb)")]
    SocketLb(#[source] SocketLbError),
    #[error(transparent)]
    Interfaces(#[from] interfaces::InterfaceError),
    #[error("installing the {signal} handler")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
    #[error("manifest directory {path}")]
    ManifestDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Kube(#[from] kube_source::KubeSourceError),
    #[error("listening on {addr} for {what}")]
    Listen {
        addr: SocketAddr,
        what: &'static str,
        source: std::io::Error,
    },
}

pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    if let Source::Manifests { dir, .. } = &config.source {
        std::fs::read_dir(dir).map_err(|source| AgentError::ManifestDir {
            path: dir.clone(),
            source,
        })?;
    }
    // Before the watchers start: they report each change to it as they see it.
    let metrics = Metrics::new(config.healthz_timeout);
    // The watchers list while the maps are created and the program verified
    // (off this thread): the two are the bulk of a cold start.
    let mut feed = Feed::start(&config.source, config.node_name.as_deref(), &metrics).await?;
    let (bpffs, sizes) = (config.bpffs.clone(), config.map_sizes);
    let (mut datapath, maps) = match tokio::task::spawn_blocking(move || Datapath::load(&bpffs, &sizes)).await
    {
        Ok(loaded) => loaded?,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    tracing::info!(
        "datapath loaded; maps pinned under {}",
        datapath::maps_pin_dir(&config.bpffs).display()
    );
    datapath.set_attach_mode(config.attach_mode);
    if let Some(logs) = datapath.take_logs() {
        tokio::spawn(datapath::forward_logs(logs));
    }
    let mut writer = MapWriter::new(maps)?;
    if let Source::Manifests { service_cidr, .. } = &config.source {
        let ranges = ServiceRanges::from_flag(Some(*service_cidr));
        writer.set_service_cidrs(&ranges.cidrs)?;
        tracing::info!("service ranges: {ranges}");
    }
    let listen_err = |addr, what| move |source| AgentError::Listen { addr, what, source };
    if let Some(addr) = config.healthz_bind_address {
        metrics::serve_health(addr, metrics.clone())
            .await
            .map_err(listen_err(addr, "/healthz"))?;
    }
    if let Some(addr) = config.metrics_bind_address {
        // A second handle on the pinned maps, read per scrape.
        let maps = Maps::from_pins(&datapath::maps_pin_dir(&config.bpffs)).ok();
        metrics::serve_metrics(addr, metrics.clone(), maps)
            .await
            .map_err(listen_err(addr, "/metrics"))?;
    }

    publish_timeouts(&config.bpffs, &config.conntrack_timeouts);
    match datapath::maps::conntrack_from_pins(&datapath::maps_pin_dir(&config.bpffs)) {
        Ok(table) => {
            tokio::spawn(sweep_forever(
                table,
                config.conntrack_timeouts,
                config.conntrack_sweep_interval,
                config.map_sizes.flows as usize,
                metrics.clone(),
            ));
        }
        Err(e) => tracing::error!("ended flows will not be removed: {}", Chain(&e)),
    }

    let mut links = interfaces::watch().await?;
    let signal_err = |signal| move |source| AgentError::Signal { signal, source };
    let mut sigterm = signal(SignalKind::terminate()).map_err(signal_err("SIGTERM"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(signal_err("SIGINT"))?;

    // The programs are attached (to cgroups and interfaces) once the first
    // sync has programmed the maps: until then one attached now could find
    // a map of a newer layout still empty (an upgrade) and refuse new flows,
    // while an earlier agent's programs, pinned, keep serving.
    let mut before_first_sync = Some(Vec::new());
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: exiting"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: exiting"); break; }
            Some(event) = links.recv() => match &mut before_first_sync {
                Some(held) => held.push(event),
                None => on_link_event(&mut datapath, &config.interfaces, event),
            },
            () = feed.changed(&metrics) => {
                feed.sync(&mut writer, &metrics);
                if let Some(held) = before_first_sync.take() {
                    attach_socket_lb(&mut datapath, &config)?;
                    for event in held {
                        on_link_event(&mut datapath, &config.interfaces, event);
                    }
                }
            }
        }
    }
    // Links and maps stay pinned: traffic keeps flowing while the agent is
    // away, and a restarted agent resumes services and open flows.
    tracing::info!(
        "the datapath stays attached; `redirector cleanup --bpffs {}` removes it",
        config.bpffs.display()
    );
    Ok(())
}

/// Tells `redirector conntrack list` the timeouts the sweeper applies, so it
/// can say when each flow expires; without them it only says it cannot.
fn publish_timeouts(bpffs: &Path, timeouts: &conntrack::Timeouts) {
    let unpublished = |why: String| tracing::warn!("`redirector conntrack list` will not show expiry: {why}");
    match datapath::maps::timeouts_from_pins(&datapath::maps_pin_dir(bpffs)) {
        Ok(Some(mut map)) => {
            if let Err(e) = conntrack::publish_timeouts(&mut map, timeouts) {
                unpublished(Chain(&e).to_string());
            }
        }
        Ok(None) => unpublished(format!("{CT_TIMEOUTS_MAP} is not pinned")),
        Err(e) => unpublished(Chain(&e).to_string()),
    }
}

/// Removes ended flows from the connection table every `interval`, off the
/// async thread (a sweep of a full table reads every entry).
async fn sweep_forever(
    mut table: ConntrackTable,
    timeouts: conntrack::Timeouts,
    interval: Duration,
    capacity: usize,
    metrics: Metrics,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let swept = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = conntrack::sweep(&mut table, &timeouts, capacity);
            (table, started.elapsed(), result)
        })
        .await;
        let (took, result);
        (table, took, result) = match swept {
            Ok(swept) => swept,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        };
        match result {
            Ok(report) => {
                if report.expired + report.early_dropped > 0 {
                    tracing::debug!(
                        "connection table: {} entries, {} flows expired, {} unanswered dropped for room, in {took:?}",
                        report.entries,
                        report.expired,
                        report.early_dropped
                    );
                }
                if report.early_dropped > 0 {
                    tracing::warn!(
                        "the connection table is nearly full: {} unanswered flows removed to make room",
                        report.early_dropped
                    );
                }
                metrics.record_sweep(took, &report);
            }
            Err(e) => tracing::error!("{}", Chain(&e)),
        }
    }
}

/// The source being followed, and what it needs to tell a change.
enum Feed {
    Manifests {
        dir: PathBuf,
        service_cidr: Ipv4Cidr,
        store: ManifestStore,
        seen: Option<Fingerprint>,
        poll: tokio::time::Interval,
    },
    Kubernetes {
        /// Boxed: far larger than the manifest variant, and made once.
        source: Box<KubeSource>,
        ready: bool,
        /// The change that woke us, and when it was observed.
        woke_by: Option<(Instant, Change)>,
        /// The service ranges last written (none before the first sync).
        ranges: Option<ServiceRanges>,
        /// This node's Node (with `--node-name`): a zone change recomputes
        /// every Service, as kube-proxy's full sync on a topology change.
        node: Option<NodeWatch>,
        /// Services a sync could not program every port of: computed and
        /// written again at the next sync (kube-proxy retries a failed
        /// sync), so a sync without errors means nothing is left out.
        retry: BTreeSet<NamespacedName>,
    },
}

impl Feed {
    async fn start(source: &Source, node_name: Option<&str>, metrics: &Metrics) -> Result<Self, AgentError> {
        Ok(match source {
            Source::Manifests { dir, service_cidr } => {
                let mut store = ManifestStore::default();
                store.set_node_name(node_name.map(str::to_owned));
                Feed::Manifests {
                    dir: dir.clone(),
                    service_cidr: *service_cidr,
                    store,
                    seen: None,
                    poll: tokio::time::interval(MANIFEST_POLL),
                }
            }
            Source::Kubernetes {
                connection,
                service_proxy_name,
                service_cidr,
            } => {
                let client = kube_source::client(connection).await?;
                tracing::info!(
                    "watching Services, EndpointSlices and ServiceCIDRs; nothing is programmed until all \
                     are listed"
                );
                let node = node_name.map(|name| NodeWatch::start(client.clone(), name));
                if let Some(node) = &node {
                    tokio::spawn(follow_eligibility(node.eligibility(), metrics.clone()));
                }
                let mut source = KubeSource::start(
                    client,
                    service_proxy_name.as_deref(),
                    *service_cidr,
                    queue_hook(metrics.clone()),
                );
                source.set_node(NodeTopology {
                    name: node_name.map(str::to_owned),
                    zone: None,
                });
                Feed::Kubernetes {
                    source: Box::new(source),
                    ready: false,
                    woke_by: None,
                    ranges: None,
                    node,
                    retry: BTreeSet::new(),
                }
            }
        })
    }

    /// Resolves when a sync is due. Changes the loop notices itself (files,
    /// the node's zone) are queued in `metrics` here; the watchers queue
    /// theirs as they see them.
    async fn changed(&mut self, metrics: &Metrics) {
        match self {
            Feed::Manifests { dir, seen, poll, .. } => loop {
                poll.tick().await;
                let now = fingerprint(dir);
                if seen.as_ref() != Some(&now) {
                    *seen = Some(now);
                    metrics.queued();
                    return;
                }
            },
            Feed::Kubernetes {
                source,
                ready,
                woke_by,
                node,
                ..
            } => {
                if !*ready {
                    source.wait_until_ready().await;
                    *ready = true;
                    tracing::info!("initial lists complete");
                    if let Some(node) = node {
                        source.set_node(node.current());
                    }
                    *woke_by = Some((Instant::now(), Change::Relisted));
                    return;
                }
                let node_changed = async {
                    match node {
                        Some(node) => node.changed().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    change = source.changes.recv() => match change {
                        Some(change) => *woke_by = Some(change),
                        // The senders live in the watcher tasks, which never end.
                        None => std::future::pending::<()>().await,
                    },
                    () = node_changed => {
                        if let Some(node) = node {
                            source.set_node(node.current());
                        }
                        metrics.queued();
                        *woke_by = Some((Instant::now(), Change::Relisted));
                    }
                }
            }
        }
    }

    /// Writes what changed. A source that recomputed everything (a manifest
    /// reload, a relist) is followed by the removal of what it no longer
    /// holds, including what a previous run left pinned.
    fn sync(&mut self, writer: &mut MapWriter, metrics: &Metrics) {
        // One span per sync: every event it logs (errors, warnings, the
        // summary) carries it.
        let _sync = tracing::info_span!("sync").entered();
        let started = Instant::now();
        let mut report = SyncReport::default();
        let observed = match self {
            Feed::Manifests {
                dir,
                service_cidr,
                store,
                ..
            } => {
                for error in store.reload(dir) {
                    tracing::error!("{error} (keeping its last good state)");
                }
                let update = store.update(*service_cidr);
                let held: HashSet<Frontend> = update.upserts.iter().map(|(fe, _)| *fe).collect();
                report.absorb(write_update(writer, update));
                report.absorb(remove_unheld(writer, |fe| held.contains(fe)));
                started
            }
            Feed::Kubernetes {
                source,
                woke_by,
                ranges,
                retry,
                ..
            } => {
                // Everything observed so far is covered by this sync.
                let mut observed = started;
                let mut changes = Vec::new();
                // Slice changes' trigger times, observed once programmed.
                let mut triggers = Vec::new();
                let pending = std::iter::from_fn(|| source.changes.try_recv().ok());
                for (at, change) in woke_by.take().into_iter().chain(pending) {
                    observed = observed.min(at);
                    match &change {
                        Change::Service(service) => metrics.service_change_taken(service),
                        Change::Slice { service, trigger, .. } => {
                            metrics.endpoint_change_taken();
                            triggers.extend(trigger.map(|t| (service.clone(), t)));
                        }
                        Change::Relisted | Change::ServiceCidrs => {}
                    }
                    changes.push(change);
                }
                changes.extend(std::mem::take(retry).into_iter().map(Change::Service));
                // The first sync is a relist, so the ranges are written then.
                if changes
                    .iter()
                    .any(|c| matches!(c, Change::Relisted | Change::ServiceCidrs))
                {
                    write_service_ranges(writer, source, ranges, &mut report);
                }
                if changes.contains(&Change::Relisted) {
                    for part in source.restart().chunks(RELIST_PART) {
                        let update = source.update(part.iter().cloned().map(Change::Service));
                        report.absorb(write_update(writer, update));
                    }
                    report.absorb(remove_unheld(writer, |fe| source.holds(fe)));
                } else {
                    report.absorb(write_update(writer, source.update(changes)));
                }
                retry.extend(report.errors.iter().filter_map(failed_service));
                for (service, trigger) in triggers {
                    // A slice of a Service left out is not programmed yet.
                    if !retry.contains(&service) {
                        metrics.observe_programmed(trigger);
                    }
                }
                observed
            }
        };
        log_sync(&report, writer.programmed_count(), started, observed, metrics);
    }
}

/// Tells `metrics` of each change the watchers see, as they see it.
fn queue_hook(metrics: Metrics) -> ChangeHook {
    Arc::new(move |change: &Change| match change {
        Change::Service(service) => metrics.service_change_queued(service),
        Change::Slice { .. } => metrics.endpoint_change_queued(),
        Change::Relisted | Change::ServiceCidrs => metrics.queued(),
    })
}

/// Passes the Node's eligibility on to `/healthz`.
async fn follow_eligibility(mut eligible: tokio::sync::watch::Receiver<bool>, metrics: Metrics) {
    loop {
        metrics.set_node_eligible(*eligible.borrow_and_update());
        if eligible.changed().await.is_err() {
            // The sender lives in the watch task, which never ends.
            return;
        }
    }
}

/// The Service whose port `error` left out, if it names one.
fn failed_service(error: &SyncError) -> Option<NamespacedName> {
    match error {
        SyncError::MapFull { service, .. }
        | SyncError::Write { service, .. }
        | SyncError::TooManyEndpoints { service, .. } => Some(service.service()),
        _ => None,
    }
}

/// Logs what `update` warns of and writes it: the one way from a source into
/// the maps.
fn write_update(writer: &mut MapWriter, update: Update) -> SyncReport {
    for warning in &update.warnings {
        tracing::warn!("{warning}");
    }
    let upserts: Vec<_> = update.upserts.iter().map(|(fe, port)| (*fe, port)).collect();
    writer.sync_frontends(&upserts, &update.removals)
}

/// Writes the source's service ranges if they differ from those last written.
fn write_service_ranges(
    writer: &mut MapWriter,
    source: &KubeSource,
    written: &mut Option<ServiceRanges>,
    report: &mut SyncReport,
) {
    let (ranges, warnings) = source.service_ranges();
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    if written.as_ref() == Some(&ranges) {
        return;
    }
    match writer.set_service_cidrs(&ranges.cidrs) {
        Ok(()) => {
            tracing::info!("service ranges: {ranges}");
            report.writes += 1;
            *written = Some(ranges);
        }
        // Tried again at the next ServiceCIDR change or relist.
        Err(error) => tracing::error!("{}", Chain(&error)),
    }
}

/// Removes the programmed frontends that the source does not hold.
fn remove_unheld(writer: &mut MapWriter, holds: impl Fn(&Frontend) -> bool) -> SyncReport {
    let gone: Vec<Frontend> = writer
        .programmed_frontends()
        .filter(|fe| !holds(fe))
        .copied()
        .collect();
    writer.sync_frontends(&[], &gone)
}

fn attach_socket_lb(datapath: &mut Datapath, config: &AgentConfig) -> Result<(), AgentError> {
    match datapath.set_socket_lb(config.socket_lb, config.cgroup_root.as_deref()) {
        Ok(Some(cgroup)) => tracing::info!(
            "connect-time translation ({:?} sockets) attached to cgroup {}",
            config.socket_lb,
            cgroup.display()
        ),
        Ok(None) => tracing::info!("connect-time translation is off"),
        // The default, on a host (or in a mount namespace) without cgroup
        // v2: pods are still served per packet.
        Err(e @ SocketLbError::NoCgroup2) => tracing::warn!(
            "connect-time translation is off: {}; the node's own processes do not reach services",
            Chain(&e)
        ),
        Err(e) => return Err(AgentError::SocketLb(e)),
    }
    Ok(())
}

fn on_link_event(datapath: &mut Datapath, globs: &InterfaceGlobs, event: LinkEvent) {
    match event {
        LinkEvent::Added(interface) if globs.matches(&interface.name) => match datapath.attach(&interface) {
            Ok(true) => tracing::info!("attached to {}", interface.name),
            Ok(false) => {}
            Err(e) => tracing::error!("{}", Chain(&e)),
        },
        LinkEvent::Removed(name) if globs.matches(&name) => {
            datapath.forget(&name);
            tracing::info!("interface {name} is gone");
        }
        _ => {}
    }
}

/// Logs and records one sync; `observed` is when the oldest change it covers
/// was seen, so the log states how long it waited to be programmed (the
/// metric counts from the EndpointSlice's trigger time instead).
fn log_sync(
    report: &SyncReport,
    service_ports: usize,
    started: Instant,
    observed: Instant,
    metrics: &Metrics,
) {
    metrics.record_sync(started, service_ports, report.errors.len());
    for error in &report.errors {
        tracing::error!("{}", Chain(error));
    }
    const SHOWN: usize = 8;
    let mut changed: Vec<String> = report
        .changed
        .iter()
        .take(SHOWN)
        .map(|fe| fe.to_string())
        .collect();
    if report.changed.len() > SHOWN {
        changed.push(format!("+{} more", report.changed.len() - SHOWN));
    }
    tracing::info!(
        "synced {} service ports: {} map writes, {} deletes, {} errors in {:?}; programming latency {}us; \
         changed: [{}]",
        service_ports,
        report.writes,
        report.deletes,
        report.errors.len(),
        started.elapsed(),
        observed.elapsed().as_micros(),
        changed.join(", ")
    );
}

type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// Names, sizes and modification times of the directory's entries.
fn fingerprint(dir: &Path) -> Fingerprint {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let meta = e.metadata().ok();
            (
                e.path(),
                meta.as_ref().map_or(0, |m| m.len()),
                meta.and_then(|m| m.modified().ok()),
            )
        })
        .collect();
    entries.sort();
    entries
}
