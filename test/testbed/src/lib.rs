//! The netns test bed of redirector's tests, demo and benchmarks (its own
//! crate, so the product exports no test code): a cluster node in network
//! namespaces: a "node" netns with no default route,
//! pods (and hosts outside the pod network) as netns joined to it by veth
//! pairs, servers in them that answer with their name and the client address
//! they saw, and the agent running inside the node. Everything is created
//! under a unique prefix, removed on drop, and leftovers of an earlier run with
//! the same prefix are removed first. No interface of the root namespace is
//! touched.

pub mod apiserver;
pub mod cgroup;
pub mod cluster;
pub mod foreign;
pub mod kubeproxy;
pub mod lanes;
pub mod procfs;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::sync::atomic::AtomicU32;

use rustix::mount::UnmountFlags;
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// Privileged tests fail loudly, never skip: CI runs them as root.
pub fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test loads eBPF programs and creates network namespaces: it must run as root \
         (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); run `cargo xtask test` as root"
    );
}

/// A name unique to this test process and call, for netns/dirs: `<prefix><pid>x<n>`.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A bpffs mounted on a fresh directory, unmounted and removed on drop.
pub struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    pub fn new(prefix: &str) -> Self {
        require_root();
        let path = std::env::temp_dir().join(unique_name(prefix));
        redirector::datapath::ensure_bpffs(&path)
            .unwrap_or_else(|e| panic!("mounting a bpffs at {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.path, UnmountFlags::DETACH);
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// The node side of every pod interface is `vp<N>`; the agent attaches to `vp*`.
pub const NODE_IFACE_GLOB: &str = "vp*";
/// Pods reach the node through this link-local gateway.
const GATEWAY: &str = "169.254.1.1";
const IO_TIMEOUT: Duration = Duration::from_secs(3);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip(8)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `f` on a thread that entered network namespace `netns`; sockets it
/// creates stay in that namespace wherever they are used afterwards.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network))
            .unwrap_or_else(|e| panic!("setns into {path}: {e}"));
        f()
    })
    .join()
    .expect("netns thread panicked")
}

pub struct Fixture {
    prefix: String,
    pub node: String,
    servers: Vec<Server>,
    next_iface: u32,
    /// Each host's netns and the node side of its link.
    links: Vec<(String, String)>,
    pub bpffs: Bpffs,
    pub manifests: PathBuf,
}

impl Fixture {
    /// `tag` names the test; the prefix adds the pid so parallel tests and
    /// runs never share a name.
    pub fn new(tag: &str) -> Self {
        require_root();
        let prefix = unique_name(&format!("rd{tag}"));
        remove_namespaces_with_prefix(&prefix);
        let node = format!("{prefix}-node");
        new_netns(&node);
        sysctl(&node, "net.ipv4.ip_forward", "1");
        let manifests = std::env::temp_dir().join(format!("{prefix}-manifests"));
        let _ = std::fs::remove_dir_all(&manifests);
        std::fs::create_dir_all(&manifests).expect("manifest dir");
        Self {
            bpffs: Bpffs::new(&format!("{prefix}-bpf")),
            prefix,
            node,
            servers: Vec::new(),
            next_iface: 0,
            links: Vec::new(),
            manifests,
        }
    }

    /// A host (pod, or a machine outside the pod network) at `addr`, joined
    /// to the node by a veth pair whose node side matches [`NODE_IFACE_GLOB`].
    /// Returns its netns name.
    pub fn add_host(&mut self, name: &str, addr: Ipv4Addr) -> String {
        let netns = format!("{}-{name}", self.prefix);
        let node_iface = format!("vp{}", self.next_iface);
        self.next_iface += 1;
        new_netns(&netns);
        plug_pod(&self.node, &node_iface, &netns, addr);
        self.links.push((netns.clone(), node_iface));
        netns
    }

    /// Sets the MTU of the node's side of the link to the host named `name`
    /// (as a hop with a smaller MTU on the way to it).
    pub fn set_node_link_mtu(&self, name: &str, mtu: u32) {
        let netns = format!("{}-{name}", self.prefix);
        let (_, iface) = self
            .links
            .iter()
            .find(|(host, _)| *host == netns)
            .unwrap_or_else(|| panic!("no host {name} on this node"));
        ip(&["-n", &self.node, "link", "set", iface, "mtu", &mtu.to_string()]);
    }

    /// TCP and UDP servers on `port` in `netns` answering as `name`.
    pub fn serve(&mut self, netns: &str, name: &str, port: u16) {
        self.servers.push(Server::start(netns, name, port));
    }

    pub fn write_manifest(&self, file: &str, yaml: &str) {
        write_manifest(&self.manifests, file, yaml);
    }

    pub fn remove_manifest(&self, file: &str) {
        std::fs::remove_file(self.manifests.join(file)).expect("removing manifest");
    }

    /// Starts `<binary> run` (the redirector agent) inside the node netns,
    /// with `extra` arguments.
    pub fn start_agent(&self, binary: &Path, extra: &[&str]) -> Agent {
        let mut args = vec!["--manifests", self.manifests.to_str().expect("UTF-8 temp dir")];
        args.extend_from_slice(extra);
        Agent::start(binary, &self.node, self.bpffs.path(), &args)
    }

    /// Starts the agent on the Kubernetes API at `api_server` (an address
    /// reachable from the node netns).
    pub fn start_agent_watching(&self, binary: &Path, api_server: &str, extra: &[&str]) -> Agent {
        let mut args = vec!["--api-server", api_server];
        args.extend_from_slice(extra);
        Agent::start(binary, &self.node, self.bpffs.path(), &args)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.servers.clear();
        remove_namespaces_with_prefix(&self.prefix);
        let _ = std::fs::remove_dir_all(&self.manifests);
    }
}

/// A new network namespace with its loopback up.
fn new_netns(name: &str) {
    ip(&["netns", "add", name]);
    ip(&["-n", name, "link", "set", "lo", "up"]);
}

/// Writes then renames, so no agent reads a half-written file.
fn write_manifest(dir: &Path, file: &str, yaml: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, yaml).expect("writing manifest");
    std::fs::rename(&tmp, dir.join(file)).expect("renaming manifest");
}

/// Joins `netns` (a pod, or a host behind the node) to the `node` netns: a
/// veth pair, `node_iface` on the node side, `eth0` with `addr`/32 in the
/// pod, a default route via the link-local gateway that every node-side veth
/// owns (so the node answers the pod's ARP for it), and the node's route back.
fn plug_pod(node: &str, node_iface: &str, netns: &str, addr: Ipv4Addr) {
    ip(&[
        "-n", node, "link", "add", node_iface, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ]);
    address_pod(node, node_iface, netns, addr);
}

/// Addresses and routes of a pod joined to its node by `node_iface` (node
/// side) and `eth0` (pod side), whatever the link between them.
fn address_pod(node: &str, node_iface: &str, netns: &str, addr: Ipv4Addr) {
    ip(&["-n", netns, "addr", "add", &format!("{addr}/32"), "dev", "eth0"]);
    ip(&["-n", netns, "link", "set", "eth0", "up"]);
    ip(&[
        "-n", netns, "route", "add", GATEWAY, "dev", "eth0", "scope", "link",
    ]);
    ip(&[
        "-n", netns, "route", "add", "default", "via", GATEWAY, "dev", "eth0",
    ]);
    ip(&["-n", node, "link", "set", node_iface, "up"]);
    ip(&[
        "-n",
        node,
        "route",
        "add",
        &format!("{addr}/32"),
        "dev",
        node_iface,
    ]);
    ip(&[
        "-n",
        node,
        "addr",
        "add",
        &format!("{GATEWAY}/32"),
        "dev",
        node_iface,
    ]);
}

fn sysctl(netns: &str, key: &str, value: &str) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "sysctl", "-qw", &format!("{key}={value}")])
        .output()
        .expect("running sysctl");
    assert!(
        out.status.success(),
        "sysctl {key}={value} in {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn remove_namespaces_with_prefix(prefix: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.starts_with(prefix) {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

/// `redirector run` in the node netns; SIGTERM and wait on drop. Its stderr
/// is collected so tests can wait for log lines and show them on failure.
pub struct Agent {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Agent {
    fn start(binary: &Path, node: &str, bpffs: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new("ip")
            .args(["netns", "exec", node])
            .arg(binary)
            .arg("run")
            .args(["--interfaces", NODE_IFACE_GLOB])
            .arg("--bpffs")
            .arg(bpffs)
            // Socket programs attach only where a test asks, to its own
            // cgroup (`cgroup::TestCgroup`), never to the host's hierarchy.
            .args(if extra.contains(&"--socket-lb") {
                &[][..]
            } else {
                &["--socket-lb", "off"][..]
            })
            .args(extra)
            .env("RUST_LOG", "info")
            // Never a kubeconfig from the developer's environment.
            .env_remove("KUBECONFIG")
            .env("HOME", "/nonexistent")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting redirector run");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("agent stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self { child, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the log has `count` lines containing `needle`.
    pub fn wait_for_log(&mut self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.log().matches(needle).count() >= count {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the agent exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} (x{count}) in the agent log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Number of completed syncs so far.
    pub fn syncs(&self) -> usize {
        self.log().matches("synced ").count()
    }

    /// Sends SIGTERM and waits; returns whether it exited successfully.
    pub fn stop(mut self) -> bool {
        self.terminate()
    }

    fn terminate(&mut self) -> bool {
        // SAFETY: kill(2) on the agent's own pid (a child we have not reaped).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate();
        }
    }
}

/// TCP: answers every request line with `pod=<name> client=<ip:port>`; UDP:
/// answers every datagram the same way. Stops on drop.
struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    fn start(netns: &str, name: &str, port: u16) -> Self {
        let bind = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port);
        let (tcp, udp) = in_netns(netns, move || {
            (
                TcpListener::bind(bind).expect("binding TCP server"),
                UdpSocket::bind(bind).expect("binding UDP server"),
            )
        });
        let stop = Arc::new(AtomicBool::new(false));
        tcp.set_nonblocking(true).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let (tcp_stop, udp_stop) = (stop.clone(), stop.clone());
        let (tcp_name, udp_name) = (name.to_owned(), name.to_owned());
        let tcp_thread = std::thread::spawn(move || {
            while !tcp_stop.load(Ordering::Relaxed) {
                match tcp.accept() {
                    Ok((conn, peer)) => {
                        let name = tcp_name.clone();
                        let stop = tcp_stop.clone();
                        std::thread::spawn(move || answer_lines(conn, &name, peer.to_string(), &stop));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        let udp_thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !udp_stop.load(Ordering::Relaxed) {
                if let Ok((len, peer)) = udp.recv_from(&mut buf) {
                    // As long as the request: a large one gets a reply that
                    // is fragmented on its way back too.
                    let mut answer = format!("pod={udp_name} client={peer}\n").into_bytes();
                    if answer.len() < len {
                        answer.resize(len, b'.');
                    }
                    let _ = udp.send_to(&answer, peer);
                }
            }
        });
        Self {
            stop,
            threads: vec![tcp_thread, udp_thread],
        }
    }
}

fn answer_lines(conn: TcpStream, name: &str, peer: String, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut reader = BufReader::new(conn.try_clone().expect("clone stream"));
    let mut writer = conn;
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if writer
                    .write_all(format!("pod={name} client={peer}\n").as_bytes())
                    .is_err()
                {
                    return;
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a server said: which pod answered and the client address it saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub pod: String,
    pub client: SocketAddrV4,
}

fn parse_answer(line: &str) -> Answer {
    let mut pod = None;
    let mut client = None;
    for field in line.split_whitespace() {
        if let Some(v) = field.strip_prefix("pod=") {
            pod = Some(v.to_owned());
        } else if let Some(v) = field.strip_prefix("client=") {
            client = v.parse().ok();
        }
    }
    Answer {
        pod: pod.unwrap_or_else(|| panic!("no pod= in answer {line:?}")),
        client: client.unwrap_or_else(|| panic!("no client= in answer {line:?}")),
    }
}

/// A TCP connection from inside a client netns, kept open across requests.
pub struct Connection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    pub local: SocketAddrV4,
}

impl Connection {
    pub fn open(netns: &str, to: SocketAddrV4) -> std::io::Result<Self> {
        let stream = in_netns(netns, move || TcpStream::connect_timeout(&to.into(), IO_TIMEOUT))?;
        Self::from_stream(stream)
    }

    /// [`Connection::open`] from client port `port` (with SO_REUSEADDR, so
    /// the port of a connection that just closed can carry the next one).
    pub fn open_from(netns: &str, port: u16, to: SocketAddrV4) -> std::io::Result<Self> {
        let stream = in_netns(netns, move || -> std::io::Result<TcpStream> {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port).into())?;
            socket.connect_timeout(&to.into(), IO_TIMEOUT)?;
            Ok(socket.into())
        })?;
        Self::from_stream(stream)
    }

    /// Closes with a RST (SO_LINGER 0): no TIME_WAIT on the client, so its
    /// port and tuple can be used again at once.
    pub fn reset(self) -> std::io::Result<()> {
        socket2::SockRef::from(&self.writer).set_linger(Some(Duration::ZERO))
    }

    fn from_stream(stream: TcpStream) -> std::io::Result<Self> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let local = match stream.local_addr()? {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("unexpected local address {other}"),
        };
        Ok(Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            local,
        })
    }

    pub fn ask(&mut self) -> std::io::Result<Answer> {
        self.ask_with("hello")
    }

    /// [`Connection::ask`] with `line` (no newline) as the request.
    pub fn ask_with(&mut self, line: &str) -> std::io::Result<Answer> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(parse_answer(&line))
    }
}

/// One TCP request on a fresh connection.
pub fn tcp_request(netns: &str, to: SocketAddrV4) -> std::io::Result<Answer> {
    Connection::open(netns, to)?.ask()
}

/// One UDP request/reply; the reply must come from `to` (the service address).
pub fn udp_request(netns: &str, to: SocketAddrV4) -> std::io::Result<Answer> {
    udp_request_from(netns, 0, to)
}

/// [`udp_request`] from client port `port` (0: any).
pub fn udp_request_from(netns: &str, port: u16, to: SocketAddrV4) -> std::io::Result<Answer> {
    let socket = in_netns(netns, move || {
        UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
    })?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.connect(to)?;
    socket.send(b"hello")?;
    let mut buf = [0u8; 2048];
    let n = socket.recv(&mut buf)?;
    Ok(parse_answer(&String::from_utf8_lossy(&buf[..n])))
}

/// Retries `f` until it returns `Ok` or `timeout` passes (the agent syncs
/// asynchronously); the last error is shown on failure.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() >= deadline => panic!("{what}: still failing after {timeout:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A plain HTTP/1.1 GET from inside `netns`: status code and body.
pub fn http_get(netns: &str, addr: SocketAddrV4, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = in_netns(netns, move || {
        TcpStream::connect_timeout(&addr.into(), IO_TIMEOUT)
    })?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP status line"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}
