//! Which interfaces to attach to: the current ones, then every one that
//! appears later, learned from rtnetlink link notifications (no polling).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use glob::Pattern;
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Added(String),
    Removed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error("invalid interface pattern {pattern:?}: {source}")]
    Pattern {
        pattern: String,
        source: glob::PatternError,
    },
    #[error("opening a rtnetlink socket for link notifications: {source}")]
    Netlink { source: io::Error },
    #[error("listing interfaces: {source}")]
    List { source: io::Error },
}

/// Interface name globs, e.g. `veth*,eth0`.
#[derive(Debug, Clone)]
pub struct InterfaceGlobs(Vec<Pattern>);

impl InterfaceGlobs {
    pub fn parse(list: &str) -> Result<Self, InterfaceError> {
        list.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                Pattern::new(p).map_err(|source| InterfaceError::Pattern {
                    pattern: p.to_owned(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Self)
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| p.matches(name))
    }
}

const RTMGRP_LINK: u32 = 1;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;

/// Starts watching links. The receiver first gets `Added` for every existing
/// interface, then changes as they happen. Subscribing before listing means
/// no interface created in between is missed (it may be reported twice).
pub fn watch() -> Result<mpsc::UnboundedReceiver<LinkEvent>, InterfaceError> {
    let socket = subscribe().map_err(|source| InterfaceError::Netlink { source })?;
    let (tx, rx) = mpsc::unbounded_channel();
    for name in current().map_err(|source| InterfaceError::List { source })? {
        let _ = tx.send(LinkEvent::Added(name));
    }
    std::thread::Builder::new()
        .name("rtnetlink".into())
        .spawn(move || read_events(socket, tx))
        .map_err(|source| InterfaceError::Netlink { source })?;
    Ok(rx)
}

fn subscribe() -> io::Result<OwnedFd> {
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = RTMGRP_LINK;
    let rc = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&addr as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// Names of the interfaces that exist now.
pub fn current() -> io::Result<Vec<String>> {
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut names = Vec::new();
    let mut entry = list;
    unsafe {
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            names.push(CStr::from_ptr((*entry).if_name).to_string_lossy().into_owned());
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    Ok(names)
}

fn read_events(socket: OwnedFd, tx: mpsc::UnboundedSender<LinkEvent>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // ENOBUFS: notifications were lost; re-list so nothing is missed.
            if err.raw_os_error() == Some(libc::ENOBUFS) {
                log::warn!("rtnetlink notifications overflowed; re-listing interfaces");
                for name in current().unwrap_or_default() {
                    if tx.send(LinkEvent::Added(name)).is_err() {
                        return;
                    }
                }
                continue;
            }
            log::error!("rtnetlink socket failed, no longer watching interfaces: {err}");
            return;
        }
        for event in parse_messages(&buf[..n as usize]) {
            if tx.send(event).is_err() {
                return;
            }
        }
    }
}

/// Link events in one datagram of netlink messages.
pub fn parse_messages(mut data: &[u8]) -> Vec<LinkEvent> {
    let mut events = Vec::new();
    while data.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().unwrap());
        if len < NLMSG_HDRLEN || len > data.len() {
            break;
        }
        let body = &data[NLMSG_HDRLEN..len];
        if (kind == RTM_NEWLINK || kind == RTM_DELLINK)
            && let Some(name) = link_name(body)
        {
            events.push(if kind == RTM_NEWLINK {
                LinkEvent::Added(name)
            } else {
                LinkEvent::Removed(name)
            });
        }
        data = &data[align4(len).min(data.len())..];
    }
    events
}

fn link_name(body: &[u8]) -> Option<String> {
    let mut attrs = body.get(IFINFOMSG_LEN..)?;
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == IFLA_IFNAME {
            let value = &attrs[4..len];
            let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
            return Some(String::from_utf8_lossy(&value[..end]).into_owned());
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    None
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, name: &str) -> Vec<u8> {
        let mut attr = Vec::new();
        let value_len = name.len() + 1;
        attr.extend_from_slice(&((4 + value_len) as u16).to_ne_bytes());
        attr.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        attr.extend_from_slice(name.as_bytes());
        attr.push(0);
        attr.resize(align4(attr.len()), 0);
        let len = NLMSG_HDRLEN + IFINFOMSG_LEN + attr.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0u8; 10]);
        m.extend_from_slice(&[0u8; IFINFOMSG_LEN]);
        m.extend_from_slice(&attr);
        m
    }

    #[test]
    fn parses_link_notifications() {
        let mut datagram = message(RTM_NEWLINK, "veth1");
        datagram.extend(message(RTM_DELLINK, "eth0"));
        datagram.extend(message(24, "ignored-route"));
        assert_eq!(
            parse_messages(&datagram),
            vec![
                LinkEvent::Added("veth1".into()),
                LinkEvent::Removed("eth0".into())
            ],
            "new and deleted links are reported, other messages skipped"
        );
        assert_eq!(
            parse_messages(&datagram[..10]),
            vec![],
            "a truncated datagram yields nothing"
        );
    }

    #[test]
    fn globs_match_interface_names() {
        let globs = InterfaceGlobs::parse("veth*, eth0,lxc?").expect("valid globs");
        for (name, expected) in [
            ("veth12", true),
            ("eth0", true),
            ("eth1", false),
            ("lxc1", true),
            ("lxc12", false),
        ] {
            assert_eq!(globs.matches(name), expected, "glob match for {name}");
        }
        assert!(InterfaceGlobs::parse("[").is_err(), "an invalid glob is an error");
    }
}
