//! A cluster in network namespaces: two or more nodes, each with its own pod
//! CIDR (10.244.N.0/24), pods behind veths, and one agent with its own bpffs;
//! an underlay (a bridge in its own netns) joining the nodes' uplinks, with
//! an external client on it that has no route to any pod CIDR; and pod
//! traffic between nodes carried in one of three ways ([`PodNetwork`]), as
//! the common CNIs carry it.
//!
//! Addresses: node N's uplink is 192.0.2.(11+N)/24, the external client
//! 192.0.2.100; pods are 10.244.N.x/32 behind the link-local gateway, as in
//! [`crate::Fixture`]. Nothing routes out of the namespaces, and everything
//! is removed on drop (and leftovers of the same prefix on start).

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use crate::{
    Agent, Bpffs, Server, address_pod, in_netns, ip, new_netns, plug_pod, remove_namespaces_with_prefix,
    require_root, sysctl, unique_name,
};

/// How pod traffic crosses from one node to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodNetwork {
    /// Plain routes to the other nodes' pod CIDRs via their uplink addresses
    /// (Calico BGP, flannel host-gw).
    Routed,
    /// A `vxlan` device per node with static FDB and neighbour entries
    /// (flannel's vxlan backend).
    Vxlan,
    /// A device without an Ethernet header, as ipip and WireGuard are: this
    /// kernel has neither driver, so each node gets a TUN device and the test
    /// process relays its packets to the other nodes as IPIP over the uplinks.
    L3Tunnel,
}

impl PodNetwork {
    pub const ALL: [PodNetwork; 3] = [PodNetwork::Routed, PodNetwork::Vxlan, PodNetwork::L3Tunnel];

    /// The name of the node's tunnel device, if the mode has one.
    pub fn tunnel_device(self) -> Option<&'static str> {
        match self {
            PodNetwork::Routed => None,
            PodNetwork::Vxlan => Some("vx0"),
            PodNetwork::L3Tunnel => Some("tun0"),
        }
    }
}

/// The uplink's address of node `index`.
pub fn node_address(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 11 + index as u8)
}

/// A pod address on node `index`.
pub fn pod_address(node: usize, host: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node as u8, host)
}

/// The external client's address on the underlay.
pub const EXTERNAL_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const UNDERLAY_PREFIX: u8 = 24;
const POD_CIDRS: &str = "10.244.0.0/16";

/// One node: its netns, its bpffs, and the index of its next pod interface.
pub struct Node {
    pub netns: String,
    pub address: Ipv4Addr,
    pub bpffs: Bpffs,
    next_iface: u32,
}

pub struct Cluster {
    prefix: String,
    pub network: PodNetwork,
    pub nodes: Vec<Node>,
    pub underlay: String,
    /// The external client's netns (on the underlay, outside the pod network).
    pub external: String,
    pub manifests: PathBuf,
    servers: Vec<Server>,
    relay: Option<TunnelRelay>,
    /// Pods plugged with [`PodLink::Tun`].
    tun_links: Vec<TunLink>,
    /// Hosts added with [`Cluster::add_external_host`], for their port names.
    externals: u32,
}

impl Cluster {
    /// `nodes` nodes joined by `network`; `tag` names the test.
    pub fn new(tag: &str, nodes: usize, network: PodNetwork) -> Self {
        require_root();
        assert!((2..=8).contains(&nodes), "a test cluster has 2 to 8 nodes");
        let prefix = unique_name(&format!("rc{tag}"));
        remove_namespaces_with_prefix(&prefix);
        let underlay = format!("{prefix}-ul");
        new_netns(&underlay);
        ip(&["-n", &underlay, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &underlay, "link", "set", "br0", "up"]);
        let manifests = std::env::temp_dir().join(format!("{prefix}-manifests"));
        let _ = std::fs::remove_dir_all(&manifests);
        std::fs::create_dir_all(&manifests).expect("manifest dir");

        let mut cluster = Self {
            external: format!("{prefix}-ext"),
            network,
            nodes: Vec::new(),
            underlay,
            manifests,
            servers: Vec::new(),
            relay: None,
            tun_links: Vec::new(),
            externals: 0,
            prefix,
        };
        cluster.plug_into_underlay(&cluster.external.clone(), "uext", EXTERNAL_CLIENT);
        for index in 0..nodes {
            let netns = format!("{}-n{index}", cluster.prefix);
            let address = node_address(index);
            cluster.plug_into_underlay(&netns, &format!("u{index}"), address);
            sysctl(&netns, "net.ipv4.ip_forward", "1");
            // Replies may come back over another device than the request
            // left by (a tunnel): no reverse-path filtering, as CNIs set it.
            sysctl(&netns, "net.ipv4.conf.all.rp_filter", "0");
            sysctl(&netns, "net.ipv4.conf.default.rp_filter", "0");
            cluster.nodes.push(Node {
                bpffs: Bpffs::new(&format!("{}-bpf{index}", cluster.prefix)),
                netns,
                address,
                next_iface: 0,
            });
        }
        match network {
            PodNetwork::Routed => cluster.route_pod_cidrs(),
            PodNetwork::Vxlan => cluster.add_vxlan(),
            PodNetwork::L3Tunnel => cluster.add_l3_tunnel(),
        }
        cluster
    }

    /// A netns joined to the underlay bridge by a veth whose inner end is
    /// `ul0` with `address`.
    fn plug_into_underlay(&self, netns: &str, bridge_port: &str, address: Ipv4Addr) {
        new_netns(netns);
        ip(&[
            "-n",
            &self.underlay,
            "link",
            "add",
            bridge_port,
            "type",
            "veth",
            "peer",
            "name",
            "ul0",
            "netns",
            netns,
        ]);
        ip(&[
            "-n",
            &self.underlay,
            "link",
            "set",
            bridge_port,
            "master",
            "br0",
            "up",
        ]);
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{address}/{UNDERLAY_PREFIX}"),
            "dev",
            "ul0",
        ]);
        ip(&["-n", netns, "link", "set", "ul0", "up"]);
    }

    fn other_nodes(&self, index: usize) -> impl Iterator<Item = usize> + use<> {
        let count = self.nodes.len();
        (0..count).filter(move |&other| other != index)
    }

    fn route_pod_cidrs(&self) {
        for (index, node) in self.nodes.iter().enumerate() {
            for other in self.other_nodes(index) {
                ip(&[
                    "-n",
                    &node.netns,
                    "route",
                    "add",
                    &pod_cidr(other),
                    "via",
                    &node_address(other).to_string(),
                    "dev",
                    "ul0",
                ]);
            }
        }
    }

    /// flannel's vxlan backend: each node's `vx0` owns 10.244.N.0/32 and
    /// reaches the others' through static neighbour and FDB entries.
    fn add_vxlan(&self) {
        let mac = |index: usize| format!("02:00:00:00:{index:02x}:01");
        for (index, node) in self.nodes.iter().enumerate() {
            let netns = &node.netns;
            ip(&[
                "-n",
                netns,
                "link",
                "add",
                "vx0",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &node.address.to_string(),
                "dev",
                "ul0",
                "dstport",
                "4789",
                "nolearning",
            ]);
            ip(&["-n", netns, "link", "set", "vx0", "address", &mac(index)]);
            ip(&[
                "-n",
                netns,
                "addr",
                "add",
                &format!("10.244.{index}.0/32"),
                "dev",
                "vx0",
            ]);
            ip(&["-n", netns, "link", "set", "vx0", "up"]);
            for other in self.other_nodes(index) {
                let gateway = format!("10.244.{other}.0");
                ip(&[
                    "-n",
                    netns,
                    "route",
                    "add",
                    &pod_cidr(other),
                    "via",
                    &gateway,
                    "dev",
                    "vx0",
                    "onlink",
                ]);
                ip(&[
                    "-n",
                    netns,
                    "neigh",
                    "add",
                    &gateway,
                    "lladdr",
                    &mac(other),
                    "dev",
                    "vx0",
                    "nud",
                    "permanent",
                ]);
                run(Command::new("bridge").args([
                    "-n",
                    netns,
                    "fdb",
                    "append",
                    &mac(other),
                    "dev",
                    "vx0",
                    "dst",
                    &node_address(other).to_string(),
                ]));
            }
        }
    }

    /// A TUN device per node, routes to the other pod CIDRs through it, and
    /// the relay that carries its packets as IPIP between the uplinks.
    fn add_l3_tunnel(&mut self) {
        let mut ends = Vec::new();
        for (index, node) in self.nodes.iter().enumerate() {
            let tun = in_netns(&node.netns, || open_tun("tun0")).expect("creating tun0");
            ip(&[
                "-n",
                &node.netns,
                "addr",
                "add",
                &format!("10.244.{index}.0/32"),
                "dev",
                "tun0",
            ]);
            ip(&["-n", &node.netns, "link", "set", "tun0", "up"]);
            for other in self.other_nodes(index) {
                ip(&["-n", &node.netns, "route", "add", &pod_cidr(other), "dev", "tun0"]);
            }
            let raw = in_netns(&node.netns, open_ipip_socket).expect("opening the IPIP raw socket");
            ends.push((tun, raw));
        }
        self.relay = Some(TunnelRelay::start(ends));
    }

    /// A pod at `addr` on node `node`, behind a veth whose node side matches
    /// [`crate::NODE_IFACE_GLOB`]. Returns its netns name.
    pub fn add_pod(&mut self, node: usize, name: &str, addr: Ipv4Addr) -> String {
        self.add_pod_with(PodLink::Veth, node, name, addr)
    }

    /// [`Cluster::add_pod`] with a choice of link into the pod.
    pub fn add_pod_with(&mut self, link: PodLink, node: usize, name: &str, addr: Ipv4Addr) -> String {
        let netns = format!("{}-{name}", self.prefix);
        let node_iface = format!("vp{}", self.nodes[node].next_iface);
        self.nodes[node].next_iface += 1;
        new_netns(&netns);
        let node_netns = &self.nodes[node].netns;
        match link {
            PodLink::Veth => plug_pod(node_netns, &node_iface, &netns, addr),
            PodLink::Tun => {
                let iface = node_iface.clone();
                let node_end = in_netns(node_netns, move || open_tun(&iface))
                    .unwrap_or_else(|e| panic!("creating {node_iface} on node {node}: {e}"));
                let pod_end = in_netns(&netns, || open_tun("eth0"))
                    .unwrap_or_else(|e| panic!("creating eth0 in {netns}: {e}"));
                address_pod(node_netns, &node_iface, &netns, addr);
                self.tun_links.push(TunLink::start(node_end, pod_end));
            }
        }
        netns
    }

    /// A host outside the pod network at `addr` on the underlay (a legacy
    /// server a selectorless Service points at): the nodes reach it on the
    /// link, and it reaches each pod CIDR through that pod's node. Returns
    /// its netns name.
    pub fn add_external_host(&mut self, name: &str, addr: Ipv4Addr) -> String {
        let netns = format!("{}-{name}", self.prefix);
        let port = format!("x{}", self.externals);
        self.externals += 1;
        new_netns(&netns);
        ip(&[
            "-n",
            &self.underlay,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "ul0",
            "netns",
            &netns,
        ]);
        ip(&["-n", &self.underlay, "link", "set", &port, "master", "br0", "up"]);
        ip(&["-n", &netns, "addr", "add", &format!("{addr}/32"), "dev", "ul0"]);
        ip(&["-n", &netns, "link", "set", "ul0", "up"]);
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            &format!("192.0.2.0/{UNDERLAY_PREFIX}"),
            "dev",
            "ul0",
        ]);
        for (index, node) in self.nodes.iter().enumerate() {
            ip(&[
                "-n",
                &netns,
                "route",
                "add",
                &pod_cidr(index),
                "via",
                &node.address.to_string(),
            ]);
            ip(&[
                "-n",
                &node.netns,
                "route",
                "add",
                &format!("{addr}/32"),
                "dev",
                "ul0",
            ]);
        }
        netns
    }

    /// TCP and UDP servers on `port` in `netns` answering as `name`.
    pub fn serve(&mut self, netns: &str, name: &str, port: u16) {
        self.servers.push(Server::start(netns, name, port));
    }

    /// A server in node `node`'s own netns (host network), answering as `name`.
    pub fn serve_on_node(&mut self, node: usize, name: &str, port: u16) {
        let netns = self.nodes[node].netns.clone();
        self.serve(&netns, name, port);
    }

    /// flannel's ip-masq: pod traffic leaving the pod network is masqueraded
    /// to the node's address (iptables, in every node). Idempotent.
    pub fn set_masquerade(&self, on: bool) {
        const RULE: [&str; 10] = [
            "POSTROUTING",
            "-s",
            POD_CIDRS,
            "!",
            "-d",
            POD_CIDRS,
            "-j",
            "MASQUERADE",
            "-w",
            "5",
        ];
        let iptables = |netns: &str, action: &str| {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", netns, "iptables", "-t", "nat", action])
                .args(RULE);
            cmd
        };
        for node in &self.nodes {
            let present = iptables(&node.netns, "-C")
                .output()
                .expect("running iptables")
                .status
                .success();
            match (on, present) {
                (true, false) => run(&mut iptables(&node.netns, "-A")),
                (false, true) => run(&mut iptables(&node.netns, "-D")),
                _ => {}
            }
        }
    }

    pub fn write_manifest(&self, file: &str, yaml: &str) {
        crate::write_manifest(&self.manifests, file, yaml);
    }

    /// Starts one agent per node on the shared manifests, each with `extra`
    /// arguments and the node's own bpffs.
    pub fn start_agents(&self, binary: &Path, extra: &[&str]) -> Vec<Agent> {
        (0..self.nodes.len())
            .map(|node| self.start_agent(node, binary, extra))
            .collect()
    }

    pub fn start_agent(&self, node: usize, binary: &Path, extra: &[&str]) -> Agent {
        let mut args = vec!["--manifests", self.manifests.to_str().expect("UTF-8 temp dir")];
        args.extend_from_slice(extra);
        let node = &self.nodes[node];
        Agent::start(binary, &node.netns, node.bpffs.path(), &args)
    }

    /// A node's address and port, for host-network endpoints.
    pub fn node_endpoint(&self, node: usize, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.nodes[node].address, port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.servers.clear();
        // Closing a TUN device's last fd deletes it, before its netns goes.
        self.relay = None;
        self.tun_links.clear();
        remove_namespaces_with_prefix(&self.prefix);
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}

fn pod_cidr(node: usize) -> String {
    format!("10.244.{node}.0/24")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates TUN device `name` (no packet-info header) in the calling thread's
/// netns.
fn open_tun(name: &str) -> io::Result<OwnedFd> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let file = File::options().read(true).write(true).open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifreq: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifreq.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifreq.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which outlives the call.
    if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(OwnedFd::from(file))
}

/// A raw IPv4 socket for protocol 4 (IP in IP) in the calling thread's netns:
/// it sends inner packets to another node and receives theirs, outer header
/// included.
fn open_ipip_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_IPIP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// How a pod is joined to its node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodLink {
    /// A veth pair: Ethernet headers, as most CNIs plug pods.
    Veth,
    /// A TUN device on each side and a relay passing packets between them:
    /// a link without Ethernet headers, as netkit in L3 mode (Cilium's netkit
    /// datapath), ipip and WireGuard are; this kernel has none of those.
    Tun,
}

/// The relay behind a [`PodLink::Tun`]: what one end's device sends comes
/// out of the other's. Stops on drop.
struct TunLink {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TunLink {
    fn start(node_end: OwnedFd, pod_end: OwnedFd) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let mut fds = [&node_end, &pod_end].map(|fd| libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    // SAFETY: poll(2) on two valid pollfds for at most 50 ms.
                    if unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) } <= 0 {
                        continue;
                    }
                    for (from, to, ready) in [
                        (&node_end, &pod_end, fds[0].revents),
                        (&pod_end, &node_end, fds[1].revents),
                    ] {
                        if ready & libc::POLLIN != 0
                            && let Ok(n) = read(from, &mut buf)
                        {
                            let _ = write(to, &buf[..n]);
                        }
                    }
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TunLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Carries each node's TUN packets to the node owning their destination's
/// pod CIDR as IPIP over the underlay, and delivers what arrives into the TUN
/// device: the L3 tunnel of [`PodNetwork::L3Tunnel`]. Stops on drop.
struct TunnelRelay {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl TunnelRelay {
    fn start(ends: Vec<(OwnedFd, OwnedFd)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = ends
            .into_iter()
            .map(|(tun, raw)| {
                let stop = stop.clone();
                std::thread::spawn(move || relay(&tun, &raw, &stop))
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for TunnelRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn relay(tun: &OwnedFd, raw: &OwnedFd, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [
            libc::pollfd {
                fd: tun.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: raw.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll(2) on two valid pollfds for at most 50 ms.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, 50) } <= 0 {
            continue;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            // A packet the node routed into its tunnel: to the owner of its
            // destination's pod CIDR (10.244.N.0/24 is node N's).
            if let Ok(n) = read(tun, &mut buf)
                && n >= 20
                && buf[16] == 10
                && buf[17] == 244
            {
                let to = node_address(usize::from(buf[18]));
                let _ = send_to(raw, &buf[..n], to);
            }
        }
        if fds[1].revents & libc::POLLIN != 0 {
            // IPIP from another node: the outer header comes with it.
            if let Ok(n) = read(raw, &mut buf) {
                let outer = usize::from(buf[0] & 0x0f) * 4;
                if n > outer {
                    let _ = write(tun, &buf[outer..n]);
                }
            }
        }
    }
}

fn read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the buffer is valid for writes of its length.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn write(fd: &OwnedFd, packet: &[u8]) -> io::Result<usize> {
    // SAFETY: the packet is valid for reads of its length.
    let n = unsafe { libc::write(fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn send_to(raw: &OwnedFd, packet: &[u8], to: Ipv4Addr) -> io::Result<usize> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the packet and the address are valid for the call's duration.
    let n = unsafe {
        libc::sendto(
            raw.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
