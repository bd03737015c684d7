//! Which interfaces to attach to: the current ones, then every one that
//! appears later, learned from rtnetlink link notifications (no polling).

use crate::error::Chain;
use std::collections::BTreeMap;

use futures_util::{StreamExt, TryStreamExt};
use glob::Pattern;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::link::{LinkAttribute, LinkLayerType, LinkMessage};
use rtnetlink::{Handle, MulticastGroup};
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Added(Interface),
    Removed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub layer: LinkLayer,
}

/// What precedes the IP header of a packet on an interface: the datapath has
/// a build of each program per kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkLayer {
    /// veth, netkit in L2 mode, bridges, VXLAN.
    Ethernet,
    /// No link-layer header: netkit in L3 mode, TUN, ipip, sit, WireGuard.
    Ip,
    /// Anything else (its ARPHRD type): not attached to.
    Unsupported(u16),
}

impl From<LinkLayerType> for LinkLayer {
    fn from(kind: LinkLayerType) -> Self {
        match kind {
            LinkLayerType::Ether => Self::Ethernet,
            // WireGuard and TUN report ARPHRD_NONE, ipip ARPHRD_TUNNEL.
            LinkLayerType::None
            | LinkLayerType::Rawip
            | LinkLayerType::Tunnel
            | LinkLayerType::Tunnel6
            | LinkLayerType::Sit => Self::Ip,
            other => Self::Unsupported(other.into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error("invalid interface pattern {pattern:?}: {source}")]
    Pattern {
        pattern: String,
        source: glob::PatternError,
    },
    #[error("opening a rtnetlink socket for link notifications")]
    Netlink { source: std::io::Error },
    #[error("listing interfaces")]
    List { source: rtnetlink::Error },
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

/// Starts watching links on the current tokio runtime. The receiver first
/// gets `Added` for every existing interface, then changes as they happen.
/// Subscribing before listing means no interface created in between is
/// missed (it may be reported twice).
pub async fn watch() -> Result<mpsc::UnboundedReceiver<LinkEvent>, InterfaceError> {
    let (connection, handle, mut notifications) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
            .map_err(|source| InterfaceError::Netlink { source })?;
    tokio::spawn(connection);
    let mut links = Links::default();
    let (tx, rx) = mpsc::unbounded_channel();
    let now = current(&handle)
        .await
        .map_err(|source| InterfaceError::List { source })?;
    for event in links.relist(now) {
        let _ = tx.send(event);
    }
    tokio::spawn(async move {
        while let Some((message, _)) = notifications.next().await {
            for event in links.follow(&handle, message).await {
                if tx.send(event).is_err() {
                    return;
                }
            }
        }
        tracing::error!("the rtnetlink connection closed; no longer watching interfaces");
    });
    Ok(rx)
}

/// The interfaces that exist now, by index.
pub async fn current(handle: &Handle) -> Result<BTreeMap<u32, Interface>, rtnetlink::Error> {
    handle
        .link()
        .get()
        .execute()
        .try_filter_map(|link| std::future::ready(Ok(index_and_interface(&link))))
        .try_collect()
        .await
}

fn index_and_interface(link: &LinkMessage) -> Option<(u32, Interface)> {
    link.attributes.iter().find_map(|attribute| match attribute {
        LinkAttribute::IfName(name) => Some((
            link.header.index,
            Interface {
                name: name.clone(),
                layer: link.header.link_layer_type.into(),
            },
        )),
        _ => None,
    })
}

/// Each interface index seen so far, with its name. Notifications are keyed by
/// index: a deletion names the interface that had the index (even if it was
/// renamed since), and a rename is told apart from a mere change of state.
/// A name is only reported removed while no other known index has it: the
/// initial listing can already hold an interface re-created under the name
/// of one whose deletion is still queued.
#[derive(Debug, Default)]
struct Links {
    known: BTreeMap<u32, Interface>,
}

impl Links {
    /// Events for one notification; an overrun (notifications were lost)
    /// re-lists the interfaces so nothing is missed.
    async fn follow(
        &mut self,
        handle: &Handle,
        message: NetlinkMessage<RouteNetlinkMessage>,
    ) -> Vec<LinkEvent> {
        match message.payload {
            NetlinkPayload::InnerMessage(message) => self.apply(&message),
            NetlinkPayload::Overrun(_) => {
                tracing::warn!("rtnetlink notifications overflowed; re-listing interfaces");
                match current(handle).await {
                    Ok(now) => self.relist(now),
                    Err(e) => {
                        tracing::error!("re-listing interfaces: {}", Chain(&e));
                        Vec::new()
                    }
                }
            }
            _ => Vec::new(),
        }
    }

    /// Events for one rtnetlink message: a new or changed link is `Added`
    /// (attaching is idempotent), after `Removed` for its old name if it was
    /// renamed; a deleted link is `Removed` under the name its index had.
    fn apply(&mut self, message: &RouteNetlinkMessage) -> Vec<LinkEvent> {
        match message {
            RouteNetlinkMessage::NewLink(link) => {
                let Some((index, interface)) = index_and_interface(link) else {
                    return Vec::new();
                };
                let renamed_from = self
                    .known
                    .insert(index, interface.clone())
                    .map(|old| old.name)
                    .filter(|old| *old != interface.name);
                self.removed(renamed_from)
                    .into_iter()
                    .chain([LinkEvent::Added(interface)])
                    .collect()
            }
            RouteNetlinkMessage::DelLink(link) => {
                let name = self
                    .known
                    .remove(&link.header.index)
                    .or_else(|| index_and_interface(link).map(|(_, interface)| interface))
                    .map(|interface| interface.name);
                self.removed(name).into_iter().collect()
            }
            _ => Vec::new(),
        }
    }

    /// `Removed` for a name that no known link has any more.
    fn removed(&self, name: Option<String>) -> Option<LinkEvent> {
        name.filter(|name| !self.known.values().any(|known| known.name == *name))
            .map(LinkEvent::Removed)
    }

    /// Events that bring the known links in line with a fresh listing: links
    /// gone or renamed meanwhile are `Removed`, every listed one is `Added`
    /// (so a link re-created under its name meanwhile is attached again).
    fn relist(&mut self, now: BTreeMap<u32, Interface>) -> Vec<LinkEvent> {
        let old = std::mem::replace(&mut self.known, now);
        let gone = old
            .into_iter()
            .filter(|(index, old)| self.known.get(index).map(|now| &now.name) != Some(&old.name))
            .map(|(_, old)| LinkEvent::Removed(old.name));
        let listed = self.known.values().cloned().map(LinkEvent::Added);
        gone.chain(listed).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str) -> LinkMessage {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.link_layer_type = LinkLayerType::Ether;
        link.attributes.push(LinkAttribute::IfName(name.to_owned()));
        link
    }

    fn ethernet(name: &str) -> Interface {
        Interface {
            name: name.to_owned(),
            layer: LinkLayer::Ethernet,
        }
    }

    fn added(name: &str) -> LinkEvent {
        LinkEvent::Added(ethernet(name))
    }

    fn removed(name: &str) -> LinkEvent {
        LinkEvent::Removed(name.to_owned())
    }

    #[test]
    fn follows_link_notifications_by_index() {
        let mut links = Links::default();
        assert_eq!(
            links.apply(&RouteNetlinkMessage::NewLink(link(7, "veth1"))),
            vec![added("veth1")],
            "a new link is added"
        );
        assert_eq!(
            links.apply(&RouteNetlinkMessage::NewLink(link(7, "veth1"))),
            vec![added("veth1")],
            "a change of state reports the link again (attaching is idempotent)"
        );
        assert_eq!(
            links.apply(&RouteNetlinkMessage::NewLink(link(7, "pod1"))),
            vec![removed("veth1"), added("pod1")],
            "a rename removes the old name"
        );
        assert_eq!(
            links.apply(&RouteNetlinkMessage::DelLink(link(7, "ignored"))),
            vec![removed("pod1")],
            "a deletion removes the name the index had"
        );
        assert_eq!(
            links.apply(&RouteNetlinkMessage::DelLink(link(3, "eth0"))),
            vec![removed("eth0")],
            "a deletion of a link never seen removes the name it carries"
        );
        assert_eq!(
            links.apply(&RouteNetlinkMessage::NewLink(LinkMessage::default())),
            vec![],
            "a link without a name is skipped"
        );
        assert_eq!(
            links.apply(&RouteNetlinkMessage::NewRoute(Default::default())),
            vec![],
            "other messages are skipped"
        );
    }

    #[test]
    fn a_link_recreated_under_its_name_is_removed_then_added() {
        let mut links = Links::default();
        let mut events = Vec::new();
        for message in [
            RouteNetlinkMessage::NewLink(link(4, "vp1")),
            RouteNetlinkMessage::DelLink(link(4, "vp1")),
            RouteNetlinkMessage::NewLink(link(9, "vp1")),
        ] {
            events.extend(links.apply(&message));
        }
        assert_eq!(events, vec![added("vp1"), removed("vp1"), added("vp1")]);
        assert_eq!(
            links.apply(&RouteNetlinkMessage::DelLink(link(9, "ignored"))),
            vec![removed("vp1")],
            "the new index has the name"
        );
    }

    #[test]
    fn a_queued_deletion_keeps_a_listed_link_of_the_same_name() {
        let mut links = Links::default();
        // vp1 was deleted (index 4) and re-created (index 9) between the
        // subscription and the listing: both notifications are still queued.
        links.relist(BTreeMap::from([(9, ethernet("vp1"))]));
        assert_eq!(
            links.apply(&RouteNetlinkMessage::DelLink(link(4, "vp1"))),
            vec![],
            "index 9 still has the name"
        );
        assert_eq!(
            links.apply(&RouteNetlinkMessage::NewLink(link(9, "vp1"))),
            vec![added("vp1")]
        );
    }

    #[test]
    fn a_relist_removes_what_vanished_and_adds_what_is_listed() {
        let mut links = Links::default();
        let listing = |pairs: &[(u32, &str)]| {
            pairs
                .iter()
                .map(|(index, name)| (*index, ethernet(name)))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(
            links.relist(listing(&[(1, "lo"), (2, "vp1")])),
            vec![added("lo"), added("vp1")]
        );
        assert_eq!(
            links.relist(listing(&[(1, "lo"), (2, "vp9"), (5, "vp2")])),
            vec![removed("vp1"), added("lo"), added("vp9"), added("vp2")],
            "a link renamed while notifications were lost is removed under its old name"
        );
        assert_eq!(
            links.apply(&RouteNetlinkMessage::DelLink(link(5, "ignored"))),
            vec![removed("vp2")],
            "the listing is what later deletions are matched against"
        );
    }

    #[test]
    fn each_link_type_gets_the_program_build_for_its_header() {
        let mut links = Links::default();
        for (kind, expected) in [
            (LinkLayerType::Ether, LinkLayer::Ethernet),
            (LinkLayerType::None, LinkLayer::Ip),
            (LinkLayerType::Tunnel, LinkLayer::Ip),
            (LinkLayerType::Rawip, LinkLayer::Ip),
            (LinkLayerType::Ipgre, LinkLayer::Unsupported(778)),
            (LinkLayerType::Loopback, LinkLayer::Unsupported(772)),
        ] {
            let mut message = link(3, "if3");
            message.header.link_layer_type = kind;
            let events = links.apply(&RouteNetlinkMessage::NewLink(message));
            assert_eq!(
                events.last(),
                Some(&LinkEvent::Added(Interface {
                    name: "if3".to_owned(),
                    layer: expected
                })),
                "link type {kind:?}"
            );
        }
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
