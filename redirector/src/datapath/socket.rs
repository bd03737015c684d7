//! Connect-time translation: the cgroup v2 socket-address programs that
//! serve clients whose packets never cross a pod interface (processes in the
//! node's network namespace), attached to one cgroup and everything below it.
//!
//! Their links are pinned beside the TC links (`cgroup:<hook>`: an interface
//! name cannot contain ':'), so they outlive the agent; `cleanup` removes
//! them with the rest.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use aya::maps::{Array, MapError};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError};
use redirector_common::sock::{SOCK_CONFIG_MAP, SockConfig};

use super::Datapath;

/// Which sockets connect-time translation serves (`--socket-lb`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SocketLb {
    /// Sockets in the agent's own network namespace: the host network.
    #[default]
    Host,
    /// Every socket in the cgroup, pods' included.
    All,
    /// None: the programs are detached.
    Off,
}

impl std::str::FromStr for SocketLb {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(Self::Host),
            "all" => Ok(Self::All),
            "off" => Ok(Self::Off),
            other => Err(format!("{other:?}: expected host, all or off")),
        }
    }
}

/// The programs and the names of their link pins.
const PROGRAMS: [(&str, &str); 4] = [
    ("redirector_connect4", "cgroup:connect4"),
    ("redirector_sendmsg4", "cgroup:sendmsg4"),
    ("redirector_recvmsg4", "cgroup:recvmsg4"),
    ("redirector_getpeername4", "cgroup:getpeername4"),
];

#[derive(Debug, thiserror::Error)]
pub enum SocketLbError {
    #[error("finding the cgroup v2 mount: /proc/mounts has none (give --cgroup-root)")]
    NoCgroup2,
    #[error("reading /proc/mounts")]
    Mounts(#[source] io::Error),
    #[error("opening cgroup {path}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("reading this network namespace's cookie")]
    NetnsCookie(#[source] io::Error),
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    #[error("writing map {SOCK_CONFIG_MAP}")]
    Config(#[source] MapError),
    #[error("loading program {program}")]
    Load {
        program: &'static str,
        source: ProgramError,
    },
    #[error("attaching {program} to cgroup {cgroup}")]
    Attach {
        program: &'static str,
        cgroup: PathBuf,
        source: ProgramError,
    },
    #[error("pinning the link of {program} at {path}")]
    Pin {
        program: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("removing link pin {path}")]
    Unpin { path: PathBuf, source: io::Error },
}

impl Datapath {
    /// Attaches the socket programs to `cgroup_root` (default: the cgroup v2
    /// mount), serving the sockets `mode` names, or with [`SocketLb::Off`]
    /// detaches those an earlier agent left. A link an earlier agent pinned
    /// is replaced: the new one is attached first, then its pin takes the
    /// old one's name, which detaches the old one, so no connect goes
    /// untranslated across a restart (while both are attached, the second
    /// sees an endpoint, not a service, and leaves it). Returns the cgroup
    /// attached to.
    pub fn set_socket_lb(
        &mut self,
        mode: SocketLb,
        cgroup_root: Option<&Path>,
    ) -> Result<Option<PathBuf>, SocketLbError> {
        let netns_cookie = match mode {
            SocketLb::Off => {
                self.detach_socket_lb()?;
                return Ok(None);
            }
            SocketLb::Host => netns_cookie().map_err(SocketLbError::NetnsCookie)?,
            SocketLb::All => 0,
        };
        let cgroup = match cgroup_root {
            Some(path) => path.to_owned(),
            None => cgroup2_mount()?,
        };
        let dir = File::open(&cgroup).map_err(|source| SocketLbError::Cgroup {
            path: cgroup.clone(),
            source,
        })?;
        // Written before any program is attached: none runs unconfigured.
        let map = self
            .ebpf
            .map_mut(SOCK_CONFIG_MAP)
            .ok_or(SocketLbError::Missing(SOCK_CONFIG_MAP))?;
        let mut config: Array<_, SockConfig> = Array::try_from(map).map_err(SocketLbError::Config)?;
        config
            .set(0, SockConfig { netns_cookie }, 0)
            .map_err(SocketLbError::Config)?;
        for (name, pin_name) in PROGRAMS {
            let attach_err = |source| SocketLbError::Attach {
                program: name,
                cgroup: cgroup.clone(),
                source,
            };
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(SocketLbError::Missing(name))?
                .try_into()
                .map_err(|source| SocketLbError::Load {
                    program: name,
                    source,
                })?;
            program.load().map_err(|source| SocketLbError::Load {
                program: name,
                source,
            })?;
            // A cgroup link takes no flags: links always share the cgroup
            // with the programs of others (as BPF_F_ALLOW_MULTI).
            let id = program
                .attach(dir.as_fd(), CgroupAttachMode::Single)
                .map_err(attach_err)?;
            let link = program.take_link(id).map_err(attach_err)?;
            let link =
                FdLink::try_from(link).map_err(|e| attach_err(ProgramError::IOError(io::Error::other(e))))?;
            let pin = self.links_dir.join(pin_name);
            // bpffs reserves names with a dot.
            let fresh = self.links_dir.join(format!("{pin_name}:new"));
            let _ = std::fs::remove_file(&fresh);
            let pin_err = |path: &Path, source| SocketLbError::Pin {
                program: name,
                path: path.to_owned(),
                source,
            };
            drop(
                link.pin(&fresh)
                    .map_err(|e| pin_err(&fresh, io::Error::other(e)))?,
            );
            std::fs::rename(&fresh, &pin).map_err(|e| pin_err(&pin, e))?;
        }
        Ok(Some(cgroup))
    }

    /// Removes the socket programs' link pins: with no other holder, the
    /// links go and the programs detach.
    fn detach_socket_lb(&self) -> Result<(), SocketLbError> {
        for (_, pin_name) in PROGRAMS {
            let path = self.links_dir.join(pin_name);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(SocketLbError::Unpin { path, source: e });
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on hybrid hosts).
pub fn cgroup2_mount() -> Result<PathBuf, SocketLbError> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(SocketLbError::Mounts)?;
    mount_of_type(&mounts, "cgroup2").ok_or(SocketLbError::NoCgroup2)
}

/// The first mount point of file system type `fstype` in a /proc/mounts
/// text, its octal escapes (`\040` for a space) undone.
fn mount_of_type(mounts: &str, fstype: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == fstype).then(|| PathBuf::from(unescape_mount_path(target)))
    })
}

fn unescape_mount_path(escaped: &str) -> String {
    let mut out = Vec::with_capacity(escaped.len());
    let bytes = escaped.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes.get(i + 1..i + 4).and_then(|digits| {
            let digits = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(digits, 8).ok()
        });
        match (bytes[i], code) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cookie of the calling thread's network namespace, as
/// `bpf_get_netns_cookie` reports it for a socket there.
pub fn netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cookie`, which
    // outlives the call; the socket is open.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_mount_is_found_on_hybrid_and_unified_hosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            mount_of_type(hybrid, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified")),
            "hybrid: the unified hierarchy"
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n";
        assert_eq!(
            mount_of_type(unified, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup")),
            "unified"
        );
        let escaped = "cgroup2 /mnt/my\\040cgroup cgroup2 rw 0 0\n";
        assert_eq!(
            mount_of_type(escaped, "cgroup2"),
            Some(PathBuf::from("/mnt/my cgroup")),
            "octal escapes are undone"
        );
        assert_eq!(
            mount_of_type("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n", "cgroup2"),
            None,
            "v1 only: none"
        );
    }

    #[test]
    fn socket_lb_modes_parse() {
        assert_eq!("host".parse::<SocketLb>(), Ok(SocketLb::Host));
        assert_eq!("all".parse::<SocketLb>(), Ok(SocketLb::All));
        assert_eq!("off".parse::<SocketLb>(), Ok(SocketLb::Off));
        assert!("pods".parse::<SocketLb>().is_err(), "an unknown mode is refused");
    }
}
