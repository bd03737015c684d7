//! Loading, pinning and attaching the eBPF datapath.

pub mod batch;
pub mod explain;
pub mod maps;
pub mod record;
pub mod socket;
pub mod writer;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::Chain;
use crate::interfaces::{Interface, LinkLayer};
use aya::programs::Link as _;
use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{ProgramError, SchedClassifier, TcAttachType};
use aya::util::KernelVersion;
use aya::{Ebpf, EbpfLoader};
use redirector_common::{
    conntrack::CT_MAP,
    service::{BACKEND_MAP, SERVICE_MAP, SERVICE_META_MAP, SERVICE_STATS_MAP, VIP_MAP},
};
use rustix::fs::FsWord;
use rustix::mount::MountFlags;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

pub use maps::Maps;

/// Name of the TC program that translates traffic leaving pods.
pub const PROGRAM: &str = "redirector_tc";
/// Name of the TC program that translates replies on their way into pods.
pub const TO_POD_PROGRAM: &str = "redirector_tc_to_pod";

/// The programs and where each hangs off a pod interface's node side:
/// ingress there is traffic leaving the pod, egress traffic entering it.
///
/// Position among other programs on the hook (a CNI's) follows where
/// kube-proxy's netfilter rules act: requests are translated after TC
/// ingress (in PREROUTING), so our ingress program goes after those already
/// there and a CNI's program still sees the service address; replies reach
/// the pod already translated, so our egress program goes first.
///
/// The pin suffix names the link pin: an interface name cannot contain ':',
/// so the egress pin never collides with an interface's ingress pin (named
/// as the interface, as before the egress program existed).
///
/// Each program has a build for interfaces without an Ethernet header; the
/// interface's link type chooses.
const HOOKS: [Hook; 2] = [
    Hook {
        program: PROGRAM,
        l3_program: "redirector_tc_l3",
        attach_type: TcAttachType::Ingress,
        first: false,
        pin_suffix: "",
        netlink_priority: 0xfff0,
    },
    Hook {
        program: TO_POD_PROGRAM,
        l3_program: "redirector_tc_to_pod_l3",
        attach_type: TcAttachType::Egress,
        first: true,
        pin_suffix: ":egress",
        netlink_priority: 1,
    },
];

/// The handle of our netlink TC filters (kernels without tcx), at each hook's
/// fixed priority: a restarted agent finds its predecessor's filter there and
/// swaps its program in; `cleanup` removes what is there.
const NETLINK_HANDLE: u32 = 0x7264; // "rd"

/// How the programs hang off interfaces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx where the kernel has it (Linux 6.6), netlink TC filters elsewhere.
    #[default]
    Auto,
    /// tcx links, pinned under `<bpffs>/redirector/links/`.
    Tcx,
    /// netlink TC filters on a clsact qdisc at a fixed priority and handle.
    Netlink,
}

impl std::str::FromStr for AttachMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "tcx" => Ok(Self::Tcx),
            "netlink" => Ok(Self::Netlink),
            other => Err(format!("{other:?}: expected auto, tcx or netlink")),
        }
    }
}

struct Hook {
    program: &'static str,
    l3_program: &'static str,
    attach_type: TcAttachType,
    /// Before the programs already on the hook, or after them.
    first: bool,
    pin_suffix: &'static str,
    /// Lower runs first (netlink TC filters).
    netlink_priority: u16,
}

impl Hook {
    fn tcx_order(&self) -> TcAttachOptions {
        TcAttachOptions::TcxOrder(if self.first {
            LinkOrder::first()
        } else {
            LinkOrder::last()
        })
    }

    fn netlink_options(&self) -> TcAttachOptions {
        TcAttachOptions::Netlink(NlOptions {
            priority: self.netlink_priority,
            handle: TcHandle::from(NETLINK_HANDLE),
            ..NlOptions::default()
        })
    }

    /// Our filter on `interface` at this hook, whether it exists or not.
    fn netlink_link(&self, interface: &str) -> io::Result<SchedClassifierLink> {
        SchedClassifierLink::attached(
            interface,
            self.attach_type,
            self.netlink_priority,
            TcHandle::from(NETLINK_HANDLE),
            None,
        )
    }
}

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
    #[error("{path} is not a bpffs and mounting one there failed")]
    Mount { path: PathBuf, source: io::Error },
    #[error("creating {path}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object (pins under {pin_dir})")]
    Object {
        pin_dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("loading program {program} into the kernel")]
    Program {
        program: &'static str,
        source: ProgramError,
    },
    #[error(transparent)]
    Maps(#[from] maps::MapsError),
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "not attaching to {interface}: its link type (ARPHRD {link_type}) has a header the datapath cannot parse"
    )]
    UnsupportedLinkType { interface: String, link_type: u16 },
    #[error("attaching {program} to {interface} (tc {hook:?})")]
    Attach {
        program: &'static str,
        interface: String,
        hook: TcAttachType,
        source: Box<ProgramError>,
    },
}

/// How the program hangs off an interface.
enum Attachment {
    /// A tcx link pinned under `<bpffs>/redirector/links/`: it outlives the
    /// agent, so traffic keeps being translated across restarts and upgrades.
    Pinned(PathBuf),
    /// A netlink TC filter at the hook's fixed priority and handle: also left
    /// in place when the agent exits.
    Netlink(&'static Hook),
}

/// The reader of the program's log records (anomalies only).
pub type ProgramLogs = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The loaded programs, attached to a set of interfaces.
pub struct Datapath {
    ebpf: Ebpf,
    logs: Option<ProgramLogs>,
    /// Per interface, one attachment per hook, in [`HOOKS`] order.
    attached: BTreeMap<String, Vec<Attachment>>,
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

fn tcx_available() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// Removes every pin an agent left under `bpffs`, and its netlink TC filters
/// from the interfaces of this network namespace: the programs detach and
/// the maps are freed (as `kube-proxy --cleanup`). Returns how many pins and
/// filters were removed.
pub fn cleanup(bpffs: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir("/sys/class/net")? {
        let interface = entry?.file_name();
        let Some(interface) = interface.to_str() else {
            continue;
        };
        for hook in &HOOKS {
            if let Ok(link) = hook.netlink_link(interface)
                && link.detach().is_ok()
            {
                removed += 1;
            }
        }
    }
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
                pin_dir: pin_dir.clone(),
                source: Box::new(source),
            })?;
        for name in HOOKS.iter().flat_map(|hook| [hook.program, hook.l3_program]) {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(LoadError::MissingProgram(name))?
                .try_into()
                .map_err(|source| LoadError::Program {
                    program: name,
                    source,
                })?;
            program.load().map_err(|source| LoadError::Program {
                program: name,
                source,
            })?;
        }
        // Pinned so `redirector explain` can run this very program.
        let program_pin = program_pin_path(bpffs);
        let _ = std::fs::remove_file(&program_pin);
        classifier_mut(&mut ebpf, PROGRAM)
            .pin(&program_pin)
            .map_err(|e| LoadError::Program {
                program: PROGRAM,
                source: ProgramError::IOError(io::Error::other(e)),
            })?;
        remove_stale_pins(&pin_dir, &ebpf);
        let maps = Maps::from_ebpf(&mut ebpf)?;
        let logs = aya_log::EbpfLogger::init(&mut ebpf)
            .inspect_err(|e| tracing::warn!("the datapath's log records will not be shown: {}", Chain(e)))
            .ok();
        let use_tcx = tcx_available();
        Ok((
            Self {
                ebpf,
                logs,
                attached: BTreeMap::new(),
                use_tcx,
                links_dir,
            },
            maps,
        ))
    }

    /// The program's log records, once: [`forward_logs`] passes them on.
    pub fn take_logs(&mut self) -> Option<ProgramLogs> {
        self.logs.take()
    }

    /// Chooses tcx links or netlink TC filters for the interfaces attached
    /// from now on.
    pub fn set_attach_mode(&mut self, mode: AttachMode) {
        self.use_tcx = match mode {
            AttachMode::Auto => tcx_available(),
            AttachMode::Tcx => true,
            AttachMode::Netlink => false,
        };
    }

    /// The program that translates traffic leaving pods.
    pub fn program(&self) -> &SchedClassifier {
        self.classifier(PROGRAM)
    }

    /// The program that translates replies on their way into pods.
    pub fn to_pod_program(&self) -> &SchedClassifier {
        self.classifier(TO_POD_PROGRAM)
    }

    fn classifier(&self, name: &str) -> &SchedClassifier {
        // Checked to exist and to be a classifier in `load`.
        self.ebpf
            .program(name)
            .and_then(|p| <&SchedClassifier>::try_from(p).ok())
            .expect("program checked at load")
    }

    /// Attaches every program, in its build for the interface's link layer,
    /// to its hook on `interface`; attaching twice is a no-op. With tcx, a
    /// link an earlier agent pinned for the interface gets this agent's
    /// program swapped in atomically, so no packet goes untranslated across a
    /// restart.
    pub fn attach(&mut self, interface: &Interface) -> Result<bool, AttachError> {
        let Interface {
            name: interface,
            layer,
        } = interface;
        if self.attached.contains_key(interface) {
            return Ok(false);
        }
        let without_ethernet = match *layer {
            LinkLayer::Ethernet => false,
            LinkLayer::Ip => true,
            LinkLayer::Unsupported(link_type) => {
                return Err(AttachError::UnsupportedLinkType {
                    interface: interface.clone(),
                    link_type,
                });
            }
        };
        let mut attachments = Vec::with_capacity(HOOKS.len());
        for hook in &HOOKS {
            let program = if without_ethernet {
                hook.l3_program
            } else {
                hook.program
            };
            let pin = self.links_dir.join(format!("{interface}{}", hook.pin_suffix));
            match self.attach_one(hook, program, interface, pin) {
                Ok(attachment) => attachments.push(attachment),
                Err(e) => {
                    // All hooks or none: half a datapath would translate
                    // requests whose replies go untranslated.
                    for attachment in attachments {
                        self.detach(interface, attachment);
                    }
                    return Err(e);
                }
            }
        }
        self.attached.insert(interface.to_owned(), attachments);
        Ok(true)
    }

    fn attach_one(
        &mut self,
        hook: &'static Hook,
        name: &'static str,
        interface: &str,
        pin: PathBuf,
    ) -> Result<Attachment, AttachError> {
        let attach_err = |source| AttachError::Attach {
            program: name,
            interface: interface.to_owned(),
            hook: hook.attach_type,
            source: Box::new(source),
        };
        let program = classifier_mut(&mut self.ebpf, name);
        if !self.use_tcx {
            // TC filters hang off a clsact qdisc; an existing one is fine.
            let _ = aya::programs::tc::qdisc_add_clsact(interface);
            // An earlier agent's filter: this program is swapped in in place.
            let replaced = hook
                .netlink_link(interface)
                .ok()
                .map(|link| program.attach_to_link(link));
            let id = match replaced {
                Some(Ok(id)) => id,
                _ => program
                    .attach_with_options(interface, hook.attach_type, hook.netlink_options())
                    .map_err(attach_err)?,
            };
            // Dropping the link would remove the filter: like a pinned tcx
            // link, it stays when the agent exits, until `cleanup`.
            std::mem::forget(program.take_link(id).map_err(attach_err)?);
            return Ok(Attachment::Netlink(hook));
        }
        if pin.exists() {
            let reused = PinnedLink::from_pin(&pin)
                .ok()
                .map(FdLink::from)
                .and_then(|fd| SchedClassifierLink::try_from(fd).ok())
                .map(|link| program.attach_to_link(link));
            match reused {
                Some(Ok(id)) => {
                    // The pin keeps the link; the program needs no handle on it.
                    if let Ok(link) = program.take_link(id) {
                        drop(link);
                    }
                    return Ok(Attachment::Pinned(pin));
                }
                // The interface was re-created since: that link is defunct.
                _ => {
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let id = program
            .attach_with_options(interface, hook.attach_type, hook.tcx_order())
            .map_err(attach_err)?;
        let link = program.take_link(id).map_err(attach_err)?;
        let pinned = FdLink::try_from(link)
            .map_err(|e| attach_err(ProgramError::IOError(io::Error::other(e))))?
            .pin(&pin)
            .map_err(|e| attach_err(ProgramError::IOError(io::Error::other(e))))?;
        drop(pinned);
        Ok(Attachment::Pinned(pin))
    }

    /// Forgets an interface that went away (its links went with it).
    pub fn forget(&mut self, interface: &str) {
        for attachment in self.attached.remove(interface).unwrap_or_default() {
            self.detach(interface, attachment);
        }
    }

    fn detach(&mut self, interface: &str, attachment: Attachment) {
        match attachment {
            Attachment::Netlink(hook) => {
                if let Ok(link) = hook.netlink_link(interface) {
                    let _ = link.detach();
                }
            }
            Attachment::Pinned(pin) => {
                let _ = std::fs::remove_file(pin);
            }
        }
    }
}

/// Removes the pins of maps this object does not have: an older layout's
/// (`CT_V1` once the table is `CT_V2`). Programs still attached from before
/// keep their maps until they are swapped out; the pins only held memory.
fn remove_stale_pins(pin_dir: &Path, ebpf: &Ebpf) {
    let current: std::collections::HashSet<&str> = ebpf.maps().map(|(name, _)| name).collect();
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if current.contains(name) {
            continue;
        }
        match std::fs::remove_file(entry.path()) {
            Ok(()) => {
                tracing::info!("removed the pin of map {name}: an older layout this datapath no longer uses")
            }
            Err(e) => tracing::warn!("removing the stale pin {}: {e}", entry.path().display()),
        }
    }
}

/// A program of the object, checked to exist and to be a classifier in `load`.
fn classifier_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut SchedClassifier {
    ebpf.program_mut(name)
        .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        .expect("program checked at load")
}

/// Passes the program's log records into the agent's log as they come.
pub async fn forward_logs(logs: ProgramLogs) {
    // SAFETY: the logger owns its ring buffer's fd and keeps it open, unchanged,
    // for as long as the AsyncFd owns the logger.
    let mut logs = match unsafe { AsyncFd::register_with_interest(logs, Interest::READABLE) } {
        Ok(logs) => logs,
        Err(e) => {
            tracing::warn!("the datapath's log records will not be shown: {e}");
            return;
        }
    };
    while let Ok(mut ready) = logs.readable_mut().await {
        ready.get_inner_mut().flush();
        ready.clear_ready();
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
