//! Loading, pinning and attaching the eBPF datapath.

pub mod maps;
pub mod writer;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

use aya::programs::{ProgramError, SchedClassifier, TcAttachType, tc::SchedClassifierLinkId};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use redirector_common::{
    conntrack::CT_MAP,
    service::{BACKEND_MAP, SERVICE_MAP, VIP_MAP},
};

pub use maps::Maps;

/// Name of the TC program in the eBPF object.
pub const PROGRAM: &str = "redirector_tc";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

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
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: 262_144,
            backends: 262_144,
            addresses: 65_536,
            flows: 524_288,
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

/// The loaded program, attached to a set of interfaces.
pub struct Datapath {
    ebpf: Ebpf,
    attached: BTreeMap<String, SchedClassifierLinkId>,
    use_tcx: bool,
}

/// Where an agent keeps its pins below the bpffs mount.
pub fn maps_pin_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("redirector").join("maps")
}

impl Datapath {
    /// Loads the program, creating its maps or reusing those pinned under
    /// `bpffs` by an earlier agent (so a restart keeps services and flows).
    pub fn load(bpffs: &Path, sizes: &MapSizes) -> Result<(Self, Maps), LoadError> {
        ensure_bpffs(bpffs)?;
        let pin_dir = maps_pin_dir(bpffs);
        std::fs::create_dir_all(&pin_dir).map_err(|source| LoadError::CreateDir {
            path: pin_dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .map_max_entries(SERVICE_MAP, sizes.services)
            .map_max_entries(BACKEND_MAP, sizes.backends)
            .map_max_entries(VIP_MAP, sizes.addresses)
            .map_max_entries(CT_MAP, sizes.flows)
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
        let maps = Maps::from_ebpf(&mut ebpf)?;
        let use_tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        Ok((
            Self {
                ebpf,
                attached: BTreeMap::new(),
                use_tcx,
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
    /// it); attaching twice is a no-op.
    pub fn attach(&mut self, interface: &str) -> Result<bool, AttachError> {
        if self.attached.contains_key(interface) {
            return Ok(false);
        }
        if !self.use_tcx {
            // Before tcx (Linux 6.6) TC programs hang off a clsact qdisc;
            // an existing one is fine.
            let _ = aya::programs::tc::qdisc_add_clsact(interface);
        }
        let link = self
            .program_mut()
            .attach(interface, TcAttachType::Ingress)
            .map_err(|source| AttachError::Attach {
                interface: interface.to_owned(),
                source,
            })?;
        self.attached.insert(interface.to_owned(), link);
        Ok(true)
    }

    /// Forgets an interface that went away (its link went with it).
    pub fn forget(&mut self, interface: &str) {
        if let Some(link) = self.attached.remove(interface) {
            let _ = self.program_mut().detach(link);
        }
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
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
    let target = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| mount_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(mount_err(io::Error::last_os_error()));
    }
    Ok(())
}

pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    unsafe { libc::statfs(c_path.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC }
}
