//! `redirector run`: load the datapath, attach it to matching interfaces as
//! they come and go, and keep the maps in line with the manifests.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{SignalKind, signal};

use crate::datapath::{self, Datapath, MapSizes, writer::MapWriter};
use crate::interfaces::{self, InterfaceGlobs, LinkEvent};
use crate::model::{Desired, Ipv4Cidr};
use crate::source::manifests::ManifestStore;

/// How often the manifest directory is checked for changes.
const MANIFEST_POLL: Duration = Duration::from_millis(250);

pub struct AgentConfig {
    pub manifests: PathBuf,
    pub interfaces: InterfaceGlobs,
    pub bpffs: PathBuf,
    pub service_cidr: Ipv4Cidr,
    pub map_sizes: MapSizes,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Load(#[from] datapath::LoadError),
    #[error(transparent)]
    Sync(#[from] datapath::writer::SyncError),
    #[error(transparent)]
    Interfaces(#[from] interfaces::InterfaceError),
    #[error("installing the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
    #[error("manifest directory {path}: {source}")]
    ManifestDir { path: PathBuf, source: std::io::Error },
}

pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    std::fs::read_dir(&config.manifests).map_err(|source| AgentError::ManifestDir {
        path: config.manifests.clone(),
        source,
    })?;
    let (mut datapath, maps) = Datapath::load(&config.bpffs, &config.map_sizes)?;
    log::info!(
        "datapath loaded; maps pinned under {}",
        datapath::maps_pin_dir(&config.bpffs).display()
    );
    let mut writer = MapWriter::new(maps)?;
    writer.set_service_cidr(config.service_cidr)?;

    let mut links = interfaces::watch()?;
    let signal_err = |signal| move |source| AgentError::Signal { signal, source };
    let mut sigterm = signal(SignalKind::terminate()).map_err(signal_err("SIGTERM"))?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(signal_err("SIGINT"))?;

    let mut store = ManifestStore::default();
    let mut seen = None;
    let mut poll = tokio::time::interval(MANIFEST_POLL);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { log::info!("SIGTERM: exiting"); break; }
            _ = sigint.recv() => { log::info!("SIGINT: exiting"); break; }
            Some(event) = links.recv() => on_link_event(&mut datapath, &config.interfaces, event),
            _ = poll.tick() => {
                let now = fingerprint(&config.manifests);
                if seen.as_ref() != Some(&now) {
                    seen = Some(now);
                    resync(&mut store, &mut writer, &config);
                }
            }
        }
    }
    // Maps stay pinned: a restarted agent resumes services and open flows.
    Ok(())
}

fn on_link_event(datapath: &mut Datapath, globs: &InterfaceGlobs, event: LinkEvent) {
    match event {
        LinkEvent::Added(name) if globs.matches(&name) => match datapath.attach(&name) {
            Ok(true) => log::info!("attached to {name}"),
            Ok(false) => {}
            Err(e) => log::error!("{e}"),
        },
        LinkEvent::Removed(name) if globs.matches(&name) => {
            datapath.forget(&name);
            log::info!("interface {name} is gone");
        }
        _ => {}
    }
}

fn resync(store: &mut ManifestStore, writer: &mut MapWriter, config: &AgentConfig) {
    let started = std::time::Instant::now();
    for error in store.reload(&config.manifests) {
        log::error!("{error} (keeping its last good state)");
    }
    let (desired, warnings) = store.desired(config.service_cidr);
    for warning in warnings {
        log::warn!("{warning}");
    }
    sync(writer, &desired, started);
}

pub fn sync(writer: &mut MapWriter, desired: &Desired, started: std::time::Instant) {
    let report = writer.sync(desired);
    for error in &report.errors {
        log::error!("{error}");
    }
    log::info!(
        "synced {} service ports: {} map writes, {} deletes, {} errors in {:?}",
        desired.len(),
        report.writes,
        report.deletes,
        report.errors.len(),
        started.elapsed()
    );
}

/// Names, sizes and modification times of the directory's entries.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
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
