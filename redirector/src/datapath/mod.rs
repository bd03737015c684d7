//! Loading, pinning and attaching the eBPF datapath.

pub mod batch;
pub mod maps;
pub mod record;
pub mod writer;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, SchedClassifierLinkId};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use redirector_common::{
    conntrack::CT_MAP,
    service::{BACKEND_MAP, SERVICE_MAP, SERVICE_META_MAP, SERVICE_STATS_MAP, VIP_MAP},
};
use rustix::fs::FsWord;
use rustix::mount::MountFlags;

pub use maps::Maps;

/// Name of the TC program in the eBPF object.
pub const PROGRAM: &str = "redirector_tc";
/// `statfs` type of a bpffs (the kernel's BPF_FS_MAGIC, an `__fsword_t`).
const BPF_FS_MAGIC: FsWord = 0xcafe4a11_u32 as FsWord;

/// Capacities of the maps, fixed when they are first created and pinned.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Service map entries: one per service port plus one per endpoint slot.
    pub services: u32,
    /// Backend entries: one per endpoint of a service port.
    pub backends: u32,
    /// Distinct service addresses.
    pub addresses: u32,
    /// Connection table entries: two per flow.
    pub flows: u32,
    /// Service ports (statistics and metadata slots; IDs are below this).
    pub service_ports: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: 262_144,
            backends: 262_144,
            addresses: 65_536,
            flows: 524_288,
            service_ports: 65_536,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path} is not a bpffs and mounting one there failed: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("creating {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object (pins under {pin_dir}): {source}")]
    Object {
        pin_dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("the eBPF object has no program {PROGRAM}")]
    MissingProgram,
    #[error("loading program {PROGRAM} into the kernel: {source}")]
    Program { source: ProgramError },
    #[error(transparent)]
    Maps(#[from] maps::MapsError),
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("attaching {PROGRAM} to {interface} (tc ingress): {source}")]
    Attach { interface: String, source: ProgramError },
}

/// How the program hangs off an interface.
enum Attachment {
    /// A tcx link pinned under `<bpffs>/redirector/links/`: it outlives the
    /// agent, so traffic keeps being translated across restarts and upgrades.
    Pinned(PathBuf),
    /// A netlink tc filter (kernels before 6.6), owned by this process.
    Owned(SchedClassifierLinkId),
}

/// The loaded program, attached to a set of interfaces.
pub struct Datapath {
    ebpf: Ebpf,
    attached: BTreeMap<String, Attachment>,
    use_tcx: bool,
    links_dir: PathBuf,
}

/// Where an agent keeps its map pins below the bpffs mount.
pub fn maps_pin_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("redirector").join("maps")
}

/// Where the loaded program is pinned below the bpffs mount.
pub fn program_pin_path(bpffs: &Path) -> PathBuf {
    bpffs.join("redirector").join("program")
}

/// Where an agent keeps its link pins (one per interface) below the bpffs mount.
pub fn links_pin_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("redirector").join("links")
}

/// Removes every pin an agent left under `bpffs`: the program detaches from
/// every interface and the maps are freed (as `kube-proxy --cleanup`).
/// Returns how many pins were removed.
pub fn cleanup(bpffs: &Path) -> io::Result<usize> {
    let mut removed = 0;
    match std::fs::remove_file(program_pin_path(bpffs)) {
        Ok(()) => removed += 1,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    for dir in [links_pin_dir(bpffs), maps_pin_dir(bpffs)] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            std::fs::remove_file(entry?.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

impl Datapath {
    /// Loads the program, creating its maps or reusing those pinned under
    /// `bpffs` by an earlier agent (so a restart keeps services and flows).
    pub fn load(bpffs: &Path, sizes: &MapSizes) -> Result<(Self, Maps), LoadError> {
        ensure_bpffs(bpffs)?;
        let pin_dir = maps_pin_dir(bpffs);
        let links_dir = links_pin_dir(bpffs);
        for dir in [&pin_dir, &links_dir] {
            std::fs::create_dir_all(dir).map_err(|source| LoadError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(SERVICE_MAP, sizes.services)
            .map_max_entries(BACKEND_MAP, sizes.backends)
            .map_max_entries(VIP_MAP, sizes.addresses)
            .map_max_entries(CT_MAP, sizes.flows)
            .map_max_entries(SERVICE_STATS_MAP, sizes.service_ports)
            .map_max_entries(SERVICE_META_MAP, sizes.service_ports)
            .load(crate::EBPF_OBJECT)
            .map_err(|source| LoadError::Object {
                pin_dir,
                source: Box::new(source),
            })?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or(LoadError::MissingProgram)?
            .try_into()
            .map_err(|source| LoadError::Program { source })?;
        program.load().map_err(|source| LoadError::Program { source })?;
        // Pinned so `redirector explain` can run this very program.
        let program_pin = program_pin_path(bpffs);
        let _ = std::fs::remove_file(&program_pin);
        program.pin(&program_pin).map_err(|e| LoadError::Program {
            source: ProgramError::IOError(io::Error::other(e)),
        })?;
        let maps = Maps::from_ebpf(&mut ebpf)?;
        let use_tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        Ok((
            Self {
                ebpf,
                attached: BTreeMap::new(),
                use_tcx,
                links_dir,
            },
            maps,
        ))
    }

    pub fn program(&self) -> &SchedClassifier {
        // Checked to exist and to be a classifier in `load`.
        self.ebpf
            .program(PROGRAM)
            .and_then(|p| <&SchedClassifier>::try_from(p).ok())
            .expect("program checked at load")
    }

    fn program_mut(&mut self) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(PROGRAM)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
            .expect("program checked at load")
    }

    /// Attaches to the ingress of `interface` (traffic leaving the pod behind
    /// it); attaching twice is a no-op. With tcx, a link an earlier agent
    /// pinned for the interface gets this program swapped in atomically, so
    /// no packet goes untranslated across a restart.
    pub fn attach(&mut self, interface: &str) -> Result<bool, AttachError> {
        if self.attached.contains_key(interface) {
            return Ok(false);
        }
        let attach_err = |source| AttachError::Attach {
            interface: interface.to_owned(),
            source,
        };
        if !self.use_tcx {
            // Before tcx (Linux 6.6) TC programs hang off a clsact qdisc;
            // an existing one is fine.
            let _ = aya::programs::tc::qdisc_add_clsact(interface);
            let link = self
                .program_mut()
                .attach(interface, TcAttachType::Ingress)
                .map_err(attach_err)?;
            self.attached
                .insert(interface.to_owned(), Attachment::Owned(link));
            return Ok(true);
        }
        let pin = self.links_dir.join(interface);
        if pin.exists() {
            let reused = PinnedLink::from_pin(&pin)
                .ok()
                .map(FdLink::from)
                .and_then(|fd| SchedClassifierLink::try_from(fd).ok())
                .map(|link| self.program_mut().attach_to_link(link));
            match reused {
                Some(Ok(id)) => {
                    // The pin keeps the link; the program needs no handle on it.
                    if let Ok(link) = self.program_mut().take_link(id) {
                        drop(link);
                    }
                    self.attached
                        .insert(interface.to_owned(), Attachment::Pinned(pin));
                    return Ok(true);
                }
                // The interface was re-created since: that link is defunct.
                _ => {
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let program = self.program_mut();
        let id = program
            .attach(interface, TcAttachType::Ingress)
            .map_err(attach_err)?;
        let link = program.take_link(id).map_err(attach_err)?;
        let pinned = FdLink::try_from(link)
            .map_err(|e| attach_err(ProgramError::IOError(io::Error::other(e))))?
            .pin(&pin)
            .map_err(|e| attach_err(ProgramError::IOError(io::Error::other(e))))?;
        drop(pinned);
        self.attached
            .insert(interface.to_owned(), Attachment::Pinned(pin));
        Ok(true)
    }

    /// Forgets an interface that went away (its link went with it).
    pub fn forget(&mut self, interface: &str) {
        match self.attached.remove(interface) {
            Some(Attachment::Owned(link)) => {
                let _ = self.program_mut().detach(link);
            }
            Some(Attachment::Pinned(pin)) => {
                let _ = std::fs::remove_file(pin);
            }
            None => {}
        }
    }
}

/// Mounts a bpffs at `path` unless one is there already.
pub fn ensure_bpffs(path: &Path) -> Result<(), LoadError> {
    let mount_err = |source| LoadError::Mount {
        path: path.to_owned(),
        source,
    };
    if is_bpffs(path) {
        return Ok(());
    }
    std::fs::create_dir_all(path).map_err(mount_err)?;
    rustix::mount::mount("bpf", path, "bpf", MountFlags::empty(), None)
        .map_err(|errno| mount_err(errno.into()))
}

pub fn is_bpffs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|st| st.f_type == BPF_FS_MAGIC)
}
