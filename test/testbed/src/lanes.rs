//! Benchmark lanes: one client pod → node → server pod path per way of
//! serving ClusterIPs, each in network namespaces of its own, all present at
//! once so the benchmark can interleave them.
//!
//! | lane | node netns holds |
//! |---|---|
//! | `bare` | nothing: clients connect to the pod IP |
//! | `bare+ct` | one `ct state established,related accept` rule (conntrack on) |
//! | `iptables-legacy` | kube-proxy's iptables ruleset, loaded with iptables-legacy-restore |
//! | `iptables-nft` | the same ruleset through iptables-nft-restore |
//! | `nftables` | kube-proxy's nftables-mode ruleset, loaded with `nft -f` |
//! | `redirector` | the agent, watching an in-process API server in the node netns |
//! | `redirector-socket` | the agent with `--socket-lb=all`, its socket programs on a test cgroup of the lane's own |
//!
//! The socket lane's clients translate at `connect()` only inside its test
//! cgroup ([`TestCgroup`]): they run as processes the lane starts there
//! ([`Lane::run_client`]), never as threads of the caller, so it is not in
//! [`LaneKind::ALL`] (the lanes checked from the caller's own threads).
//!
//! The server pod answers every connection on [`TARGET_PORT`], for its own
//! address and for every address of [`ENDPOINT_RANGE`] (routed to it by the
//! node, local on its loopback), telling which address it was reached at:
//! so every service of a lane is reachable, and the answer proves that the
//! right endpoint was chosen. Service `i` has ClusterIP [`service_frontend`]
//! and endpoints [`service_endpoints`].
//!
//! Nothing here touches the root network namespace: every `ip`, `iptables*`
//! and `nft` command runs inside the lane's own namespaces.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redirector_common::service::MASTER_SLOT;
use serde_json::json;

use super::apiserver::FakeApiServer;
use super::cgroup::TestCgroup;
use super::kubeproxy::{self, NodeConfig};
use super::{Agent, Fixture, in_netns};
use redirector::datapath::{self, MapSizes, Maps};
use redirector::model::{Desired, Endpoint, Frontend, Protocol, ServicePort, ServicePortName};

/// The client pod.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
/// The server pod's own address (the "plain pod IP").
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
/// Endpoint addresses: all local to the server pod.
pub const ENDPOINT_RANGE: &str = "10.128.0.0/10";
/// Where the server listens, for every endpoint.
pub const TARGET_PORT: u16 = 8080;
/// Service ports start here; services beyond [`ADDRESSES`] share addresses
/// on the next port.
pub const SERVICE_PORT: u16 = 80;
/// Distinct ClusterIPs used (the agent's address map holds 65,536).
pub const ADDRESSES: usize = 60_000;
const IO_TIMEOUT: Duration = Duration::from_secs(3);
const NAMESPACE: &str = "bench";

/// The lanes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LaneKind {
    Bare,
    BareConntrack,
    IptablesLegacy,
    IptablesNft,
    Nftables,
    Redirector,
    /// The agent translating at connect() (`--socket-lb=all`) for clients
    /// in the lane's test cgroup.
    RedirectorSocket,
}

impl LaneKind {
    /// The lanes whose clients can be threads of the caller (in the client netns).
    pub const ALL: [LaneKind; 6] = [
        LaneKind::Bare,
        LaneKind::BareConntrack,
        LaneKind::IptablesLegacy,
        LaneKind::IptablesNft,
        LaneKind::Nftables,
        LaneKind::Redirector,
    ];

    /// Every lane the benchmark builds: [`LaneKind::ALL`] and the socket lane.
    pub const BENCH: [LaneKind; 7] = [
        LaneKind::Bare,
        LaneKind::BareConntrack,
        LaneKind::IptablesLegacy,
        LaneKind::IptablesNft,
        LaneKind::Nftables,
        LaneKind::Redirector,
        LaneKind::RedirectorSocket,
    ];

    /// The lane of [`LaneKind::name`] `name`.
    pub fn named(name: &str) -> Option<Self> {
        Self::BENCH.into_iter().find(|k| k.name() == name)
    }

    /// Whether the lane runs the agent.
    pub fn runs_agent(self) -> bool {
        matches!(self, LaneKind::Redirector | LaneKind::RedirectorSocket)
    }

    pub fn name(self) -> &'static str {
        match self {
            LaneKind::Bare => "bare",
            LaneKind::BareConntrack => "bare+ct",
            LaneKind::IptablesLegacy => "iptables-legacy",
            LaneKind::IptablesNft => "iptables-nft",
            LaneKind::Nftables => "nftables",
            LaneKind::Redirector => "redirector",
            LaneKind::RedirectorSocket => "redirector-socket",
        }
    }

    /// Short tag for namespace names.
    fn tag(self) -> &'static str {
        match self {
            LaneKind::Bare => "bare",
            LaneKind::BareConntrack => "ct",
            LaneKind::IptablesLegacy => "ipl",
            LaneKind::IptablesNft => "ipn",
            LaneKind::Nftables => "nft",
            LaneKind::Redirector => "rd",
            LaneKind::RedirectorSocket => "rds",
        }
    }

    /// Whether clients reach services through ClusterIPs (else the bare
    /// lanes: straight to an endpoint address).
    pub fn serves_cluster_ips(self) -> bool {
        !matches!(self, LaneKind::Bare | LaneKind::BareConntrack)
    }
}

/// ClusterIP and port of service `i`: 10.96.0.16 + (i mod [`ADDRESSES`]),
/// port 80 + i / [`ADDRESSES`].
pub fn service_frontend(i: usize) -> Frontend {
    Frontend {
        addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 16)) + (i % ADDRESSES) as u32),
        port: SERVICE_PORT + (i / ADDRESSES) as u16,
        protocol: Protocol::Tcp,
    }
}

/// The `e` endpoints of service `i`: consecutive addresses from 10.128.0.1.
pub fn service_endpoints(i: usize, e: usize) -> Vec<Endpoint> {
    (0..e)
        .map(|j| Endpoint {
            addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 1)) + (i * e + j) as u32),
            port: TARGET_PORT,
        })
        .collect()
}

pub fn service_name(i: usize) -> ServicePortName {
    ServicePortName {
        namespace: NAMESPACE.into(),
        name: format!("svc-{i}"),
        port: "http".into(),
    }
}

/// `n` services × `e` endpoints, in `KUBE-SERVICES` order (service 0 first).
#[derive(Clone, Debug)]
pub struct ServiceSet {
    pub list: Vec<(Frontend, ServicePort)>,
}

impl ServiceSet {
    pub fn new(n: usize, e: usize) -> Self {
        Self {
            list: (0..n)
                .map(|i| {
                    (
                        service_frontend(i),
                        ServicePort {
                            no_endpoints: Default::default(),
                            affinity: None,
                            name: service_name(i),
                            endpoints: service_endpoints(i, e),
                            also_serving: Vec::new(),
                            info: Default::default(),
                        },
                    )
                })
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn desired(&self) -> Desired {
        self.list.iter().cloned().collect()
    }
}

/// What the server said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub pod: String,
    /// The address the connection reached (the endpoint chosen).
    pub local: SocketAddrV4,
    /// The client address the server saw.
    pub client: SocketAddrV4,
}

impl Reply {
    pub fn parse(line: &str) -> Option<Self> {
        let mut pod = None;
        let mut local = None;
        let mut client = None;
        for field in line.split_whitespace() {
            if let Some(v) = field.strip_prefix("pod=") {
                pod = Some(v.to_owned());
            } else if let Some(v) = field.strip_prefix("local=") {
                local = v.parse().ok();
            } else if let Some(v) = field.strip_prefix("client=") {
                client = v.parse().ok();
            }
        }
        Some(Self {
            pod: pod?,
            local: local?,
            client: client?,
        })
    }
}

/// Sets SO_LINGER {on, 0}: `close` then sends RST and leaves no TIME_WAIT.
pub fn set_linger_zero(stream: &TcpStream) -> std::io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the option value outlives the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One request on a new connection, closed with RST. Must run on a thread in
/// the client's network namespace (see [`in_netns`]).
pub fn request(to: SocketAddrV4, timeout: Duration) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&to.into(), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    set_linger_zero(&stream)?;
    stream.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Reply::parse(&line).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unexpected answer {line:?} from {to}"),
        )
    })
}

/// Runs a command, `stdin` fed to it, killed after `timeout`. Returns how
/// long it took, or an error naming the command with its stderr.
pub fn run_with_timeout(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<Duration, String> {
    let shown = format!("{program} {}", args.join(" "));
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {shown}: {e}"))?;
    let feeder = stdin.map(|text| {
        let mut pipe = child.stdin.take().expect("piped stdin");
        let text = text.to_owned();
        std::thread::spawn(move || {
            let _ = pipe.write_all(text.as_bytes());
        })
    });
    let mut stderr = child.stderr.take().expect("piped stderr");
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{shown}: still running after {timeout:?}; killed"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => return Err(format!("{shown}: {e}")),
        }
    };
    let took = started.elapsed();
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        let mut err = err;
        err.truncate(2000);
        return Err(format!("{shown} failed ({status}): {err}"));
    }
    Ok(took)
}

fn ip(args: &[&str]) -> Result<(), String> {
    run_with_timeout("ip", args, None, Duration::from_secs(20)).map(|_| ())
}

/// Runs `program args` inside network namespace `netns`.
pub fn netns_exec(
    netns: &str,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<Duration, String> {
    let mut all = vec!["netns", "exec", netns, program];
    all.extend_from_slice(args);
    run_with_timeout("ip", &all, stdin, timeout)
}

/// The output of `program args` run inside `netns`.
pub fn netns_output(netns: &str, program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .output()
        .map_err(|e| format!("running {program} in {netns}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {} in {netns}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Options shared by the lanes of a run.
#[derive(Clone, Debug)]
pub struct LaneOptions {
    /// The agent binary (required for the redirector lane).
    pub agent: Option<PathBuf>,
    /// The most services any step of the run programs (sizes the agent's maps).
    pub max_services: usize,
    /// Endpoints per service.
    pub endpoints: usize,
}

/// What the redirector lane's agent and server get beyond the defaults, for
/// runs that need more than [`Lane::new`] gives (B9's flood).
#[derive(Clone, Debug)]
pub struct AgentExtras {
    /// Connection-table entries (`--max-flow-entries`); `None`: sized by
    /// [`agent_map_sizes`].
    pub flow_entries: Option<u32>,
    /// Serve /metrics on this port of the node netns's loopback.
    pub metrics_port: Option<u16>,
    /// More agent arguments, after the lane's own.
    pub args: Vec<String>,
    /// Server threads: each serves one connection at a time, so this bounds
    /// the connections the server holds open at once.
    pub server_threads: usize,
}

impl Default for AgentExtras {
    fn default() -> Self {
        Self {
            flow_entries: None,
            metrics_port: None,
            args: Vec::new(),
            server_threads: 16,
        }
    }
}

/// How a lane was programmed.
#[derive(Clone, Debug)]
pub struct Programmed {
    pub services: usize,
    /// Loading time: the restore / `nft -f` command, or the agent's change
    /// (objects applied → its sync logged).
    pub took: Duration,
    /// How: "iptables-legacy-restore", "agent (API watch)"...
    pub how: String,
}

pub struct Lane {
    pub kind: LaneKind,
    pub fixture: Fixture,
    pub client: String,
    pub server: String,
    pub options: LaneOptions,
    _server: EchoServer,
    agent: Option<Agent>,
    /// The socket lane's test cgroup: its agent's programs attach there and
    /// its clients run there. Dropped after the agent (field order).
    cgroup: Option<TestCgroup>,
    api: Option<FakeApiServer>,
    /// Services on the API server.
    applied: usize,
    /// Services currently programmed.
    pub programmed: usize,
    pub node_config: NodeConfig,
    /// For [`Lane::new_preloaded`]: agent start → its sync of every service
    /// logged, and → the service it writes last answering the client.
    pub cold_start: Option<ColdStart>,
}

#[derive(Clone, Copy, Debug)]
pub struct ColdStart {
    pub services: usize,
    pub to_sync_logged: Duration,
    pub to_last_service_reachable: Duration,
}

impl Lane {
    /// Builds the lane's namespaces and server; the redirector lane also
    /// starts its API server and agent (with no services yet).
    pub fn new(kind: LaneKind, options: &LaneOptions) -> Result<Self, String> {
        Self::build(kind, options, None, &AgentExtras::default())
    }

    /// The redirector lane with `extras` for its agent and server.
    pub fn new_redirector(options: &LaneOptions, extras: &AgentExtras) -> Result<Self, String> {
        Self::build(LaneKind::Redirector, options, None, extras)
    }

    /// The redirector lane with `set` already on the API server when the
    /// agent starts: [`Lane::cold_start`] tells how long until it served them.
    pub fn new_preloaded(options: &LaneOptions, set: &ServiceSet, timeout: Duration) -> Result<Self, String> {
        Self::build(
            LaneKind::Redirector,
            options,
            Some((set, timeout)),
            &AgentExtras::default(),
        )
    }

    fn build(
        kind: LaneKind,
        options: &LaneOptions,
        preload: Option<(&ServiceSet, Duration)>,
        extras: &AgentExtras,
    ) -> Result<Self, String> {
        let mut fixture = Fixture::new(&format!("b{}", kind.tag()));
        let client = fixture.add_host("client", CLIENT_IP);
        let server = fixture.add_host("server", SERVER_IP);
        // Every endpoint address is local to the server pod, and routed to
        // it by the node (one neighbour entry for all of them).
        ip(&["-n", &server, "addr", "add", ENDPOINT_RANGE, "dev", "lo"])?;
        ip(&[
            "-n",
            &fixture.node,
            "route",
            "add",
            ENDPOINT_RANGE,
            "via",
            &SERVER_IP.to_string(),
            "dev",
            "vp1",
        ])?;
        let echo = EchoServer::start(&server, "server", TARGET_PORT, extras.server_threads)?;
        let mut lane = Self {
            kind,
            client,
            server,
            options: options.clone(),
            _server: echo,
            agent: None,
            cgroup: None,
            api: None,
            applied: 0,
            programmed: 0,
            node_config: NodeConfig::default(),
            cold_start: None,
            fixture,
        };
        match kind {
            LaneKind::BareConntrack => {
                let script = "add table ip bench\n\
                    add chain ip bench forward { type filter hook forward priority 0 ; }\n\
                    add rule ip bench forward ct state established,related accept\n";
                lane.node_exec("nft", &["-f", "-"], Some(script), Duration::from_secs(20))?;
            }
            LaneKind::Redirector => lane.start_agent(preload, extras)?,
            LaneKind::RedirectorSocket => {
                let cgroup = TestCgroup::new(kind.tag());
                let mut extras = extras.clone();
                extras.args.extend([
                    "--socket-lb".into(),
                    "all".into(),
                    "--cgroup-root".into(),
                    cgroup.path().display().to_string(),
                ]);
                lane.cgroup = Some(cgroup);
                lane.start_agent(preload, &extras)?;
            }
            _ => {}
        }
        Ok(lane)
    }

    /// Runs `program args` in the lane's node namespace.
    pub fn node_exec(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
        timeout: Duration,
    ) -> Result<Duration, String> {
        netns_exec(&self.fixture.node, program, args, stdin, timeout)
    }

    pub fn agent(&self) -> Option<&Agent> {
        self.agent.as_ref()
    }

    pub fn api(&self) -> Option<&FakeApiServer> {
        self.api.as_ref()
    }

    fn start_agent(
        &mut self,
        preload: Option<(&ServiceSet, Duration)>,
        extras: &AgentExtras,
    ) -> Result<(), String> {
        let binary = self
            .options
            .agent
            .clone()
            .ok_or("the redirector lane needs the agent binary")?;
        let listener = in_netns(&self.fixture.node, || std::net::TcpListener::bind("127.0.0.1:0"))
            .map_err(|e| format!("binding the API server in the node netns: {e}"))?;
        let api = FakeApiServer::start(listener);
        let preloaded = preload.map_or(0, |(set, _)| set.len());
        if let Some((set, _)) = preload {
            for (i, (fe, sp)) in set.list.iter().enumerate() {
                api.apply(service_object(i, fe));
                api.apply(slice_object(i, &sp.endpoints));
            }
        }
        let sizes = agent_map_sizes(self.options.max_services.max(preloaded), self.options.endpoints);
        let mut args: Vec<String> = vec![
            "--healthz-bind-address".into(),
            String::new(),
            "--metrics-bind-address".into(),
            extras
                .metrics_port
                .map_or_else(String::new, |port| format!("127.0.0.1:{port}")),
            "--max-service-entries".into(),
            sizes.services.to_string(),
            "--max-backends".into(),
            sizes.backends.to_string(),
            "--max-service-ports".into(),
            sizes.service_ports.to_string(),
            "--max-flow-entries".into(),
            extras.flow_entries.unwrap_or(sizes.flows).to_string(),
        ];
        args.extend(extras.args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let timeout = preload.map_or(Duration::from_secs(30), |(_, t)| t);
        // The service the writer programs last (the highest ClusterIP).
        let probe = preload.and_then(|(set, _)| {
            set.list
                .iter()
                .max_by_key(|(fe, _)| *fe)
                .map(|(fe, sp)| (SocketAddrV4::new(fe.addr, fe.port), sp.endpoints.clone()))
        });
        let started = Instant::now();
        let mut agent = self.fixture.start_agent_watching(&binary, &api.url(), &args);
        let reachable = probe.map(|(to, endpoints)| {
            let client = self.client.clone();
            std::thread::spawn(move || {
                in_netns(&client, move || -> Result<Duration, String> {
                    let deadline = started + timeout;
                    loop {
                        if let Ok(reply) = request(to, Duration::from_millis(500))
                            && endpoints.iter().any(|e| e.addr == *reply.local.ip())
                        {
                            return Ok(started.elapsed());
                        }
                        if Instant::now() > deadline {
                            return Err(format!("{to} still unreachable after {timeout:?}"));
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
            })
        });
        let synced = format!("synced {preloaded} service ports");
        let logged = wait_for_log(&mut agent, &synced, 1, timeout).map(|()| started.elapsed());
        let reachable = reachable.map(|t| {
            t.join()
                .map_err(|_| "probe thread panicked".to_owned())
                .and_then(|r| r)
        });
        let logged = logged?;
        if let Some(reachable) = reachable {
            self.cold_start = Some(ColdStart {
                services: preloaded,
                to_sync_logged: logged,
                to_last_service_reachable: reachable?,
            });
        }
        wait_for_log(&mut agent, "attached to vp1", 1, Duration::from_secs(30))?;
        self.applied = preloaded;
        self.programmed = preloaded;
        self.api = Some(api);
        self.agent = Some(agent);
        Ok(())
    }

    /// Programs the first `n` services of `set` (growing or shrinking from
    /// what is there), within `timeout`.
    pub fn program(&mut self, set: &ServiceSet, n: usize, timeout: Duration) -> Result<Programmed, String> {
        assert!(n <= set.len(), "asked for {n} services of a set of {}", set.len());
        let list = &set.list[..n];
        let programmed = match self.kind {
            LaneKind::Bare | LaneKind::BareConntrack => Programmed {
                services: n,
                took: Duration::ZERO,
                how: "no rules".into(),
            },
            LaneKind::IptablesLegacy | LaneKind::IptablesNft => {
                let restore = if self.kind == LaneKind::IptablesLegacy {
                    "iptables-legacy-restore"
                } else {
                    "iptables-nft-restore"
                };
                let text = kubeproxy::iptables_restore(list, &self.node_config);
                let took = self.node_exec(restore, &[], Some(&text), timeout)?;
                Programmed {
                    services: n,
                    took,
                    how: restore.into(),
                }
            }
            LaneKind::Nftables => {
                // A fresh table each time: a full sync as kube-proxy's first.
                let mut text = String::from("add table ip kube-proxy\ndelete table ip kube-proxy\n");
                text.push_str(&kubeproxy::nft_script(list, &self.node_config));
                let took = self.node_exec("nft", &["-f", "-"], Some(&text), timeout)?;
                Programmed {
                    services: n,
                    took,
                    how: "nft -f".into(),
                }
            }
            LaneKind::Redirector | LaneKind::RedirectorSocket => self.program_agent(set, n, timeout)?,
        };
        self.programmed = n;
        Ok(programmed)
    }

    /// Applies Services and EndpointSlices to the API server and waits for
    /// the agent to log the sync of exactly `n` service ports without errors.
    fn program_agent(&mut self, set: &ServiceSet, n: usize, timeout: Duration) -> Result<Programmed, String> {
        let needle = format!("synced {n} service ports");
        let agent = self.agent.as_mut().ok_or("no agent")?;
        let before = agent.log().matches(&needle).count();
        let api = self.api.as_ref().ok_or("no API server")?;
        let started = Instant::now();
        for i in self.applied..n {
            let (fe, sp) = &set.list[i];
            api.apply(service_object(i, fe));
            api.apply(slice_object(i, &sp.endpoints));
        }
        for i in n..self.applied {
            api.delete("EndpointSlice", NAMESPACE, &format!("svc-{i}-bench"));
            api.delete("Service", NAMESPACE, &format!("svc-{i}"));
        }
        let changed = n != self.applied;
        self.applied = n;
        if changed {
            wait_for_log(agent, &needle, before + 1, timeout)?;
        }
        // A sync may cover a Service before its EndpointSlice arrived on the
        // other watch: done when the map holds every service with all its
        // endpoints.
        let maps = Maps::from_pins(&datapath::maps_pin_dir(self.fixture.bpffs.path()))
            .map_err(|e| format!("opening the agent's maps: {e}"))?;
        let mut next = 0;
        let deadline = started + timeout;
        while next < n {
            let (fe, sp) = &set.list[next];
            if master_count(&maps, fe) == Some(sp.endpoints.len()) {
                next += 1;
                continue;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "after {timeout:?} the agent's maps hold only the first {next} of {n} services with \
                     their endpoints"
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let took = started.elapsed();
        let log = agent.log();
        let line = log.lines().rfind(|l| l.contains("synced ")).unwrap_or_default();
        if !line.contains(" 0 errors") {
            return Err(format!("the agent's last sync reported errors: {line}"));
        }
        Ok(Programmed {
            services: n,
            took,
            how: "agent (API watch)".into(),
        })
    }

    /// Where a client of this lane connects for service `i`: its ClusterIP,
    /// or on the bare lanes its first endpoint.
    pub fn target(&self, i: usize) -> SocketAddrV4 {
        target(self.kind, self.options.endpoints, i)
    }

    /// The plain pod address (no service).
    pub fn pod_target(&self) -> SocketAddrV4 {
        SocketAddrV4::new(SERVER_IP, TARGET_PORT)
    }

    /// Checks through this lane, with `n` services programmed, that services
    /// first, last and at `random` answer from one of their own endpoints
    /// (every endpoint of the last one eventually), that the plain pod IP
    /// answers itself, and that the server sees the client's own address.
    /// Not for the socket lane, whose clients must be processes in its
    /// cgroup: run [`check_from_here`] in one ([`Lane::run_client`]).
    pub fn check(&self, n: usize, random: usize) -> Result<(), String> {
        if self.cgroup.is_some() {
            return Err(format!(
                "{}: its clients translate only in its cgroup: check from a client process there",
                self.kind.name()
            ));
        }
        let (kind, endpoints) = (self.kind, self.options.endpoints);
        in_netns(&self.client, move || check_from_here(kind, endpoints, n, random))
    }

    /// Runs `program args` in the client netns, inside the lane's test
    /// cgroup if it has one (moved there between fork and exec, as
    /// [`TestCgroup`]'s clients are), with `stdin`; returns its stdout.
    pub fn run_client(&self, program: &Path, args: &[&str], stdin: &str) -> Result<String, String> {
        let shown = format!("{} {}", program.display(), args.join(" "));
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.client])
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The cgroup's directory is bind-mounted at its path: the same files.
        let procs = match &self.cgroup {
            Some(cgroup) => {
                let path = cgroup.path().join("cgroup.procs");
                Some(
                    std::fs::File::options()
                        .write(true)
                        .open(&path)
                        .map_err(|e| format!("opening {}: {e}", path.display()))?,
                )
            }
            None => None,
        };
        if let Some(fd) = procs.as_ref().map(AsRawFd::as_raw_fd) {
            // SAFETY: the hook only calls write(2), async-signal-safe, on an
            // fd this function keeps open until the child has started.
            unsafe {
                command.pre_exec(move || {
                    // "0" moves the writing process: the child, before it execs.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().map_err(|e| format!("starting {shown}: {e}"))?;
        drop(procs);
        let mut pipe = child.stdin.take().ok_or("no stdin pipe")?;
        let input = stdin.to_owned();
        let feeder = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
        let output = child
            .wait_with_output()
            .map_err(|e| format!("waiting for {shown}: {e}"))?;
        let _ = feeder.join();
        if !output.status.success() {
            return Err(format!(
                "{shown} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// PID of the agent process (its `ip netns exec` became the agent), while
    /// it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        let pid = self.agent.as_ref()?.pid();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        (!cmdline.is_empty()).then_some(pid)
    }
}

/// Where a client of a `kind` lane connects for service `i`: its ClusterIP,
/// or on the bare lanes its first endpoint.
pub fn target(kind: LaneKind, endpoints: usize, i: usize) -> SocketAddrV4 {
    if kind.serves_cluster_ips() {
        let fe = service_frontend(i);
        SocketAddrV4::new(fe.addr, fe.port)
    } else {
        let ep = service_endpoints(i, endpoints)[0];
        SocketAddrV4::new(ep.addr, ep.port)
    }
}

/// [`Lane::check`]'s connections, made from the calling thread (which must
/// be in the lane's client netns, and for the socket lane in its cgroup).
pub fn check_from_here(kind: LaneKind, endpoints: usize, n: usize, random: usize) -> Result<(), String> {
    let e = endpoints;
    let pod_target = SocketAddrV4::new(SERVER_IP, TARGET_PORT);
    let mut cases: Vec<(String, SocketAddrV4, Vec<SocketAddrV4>)> = Vec::new();
    if n > 0 {
        for (what, i) in [("first", 0), ("last", n - 1), ("random", random % n)] {
            let allowed = if kind.serves_cluster_ips() {
                service_endpoints(i, e)
                    .iter()
                    .map(|ep| SocketAddrV4::new(ep.addr, ep.port))
                    .collect()
            } else {
                vec![target(kind, e, i)]
            };
            cases.push((format!("{what} service (#{i})"), target(kind, e, i), allowed));
        }
    }
    cases.push(("plain pod IP".into(), pod_target, vec![pod_target]));
    let lane = kind.name();
    let last_allowed = if n > 0 && kind.serves_cluster_ips() {
        cases[1].2.clone()
    } else {
        Vec::new()
    };
    let last_target = target(kind, e, n.saturating_sub(1));
    for (what, to, allowed) in &cases {
        let reply = request(*to, IO_TIMEOUT).map_err(|e| format!("{lane}: {what} via {to}: {e}"))?;
        if !allowed.contains(&reply.local) {
            return Err(format!(
                "{lane}: {what} via {to} was answered at {}, not by one of its endpoints {allowed:?}",
                reply.local
            ));
        }
        if *reply.client.ip() != CLIENT_IP {
            return Err(format!(
                "{lane}: {what} via {to}: the server saw {} instead of the client's address {CLIENT_IP}",
                reply.client
            ));
        }
    }
    // Endpoint selection runs: every endpoint of the last service answers.
    let mut seen = Vec::new();
    for _ in 0..64 {
        if last_allowed.iter().all(|a| seen.contains(a)) {
            break;
        }
        let reply = request(last_target, IO_TIMEOUT)
            .map_err(|e| format!("{lane}: last service via {last_target}: {e}"))?;
        if !seen.contains(&reply.local) {
            seen.push(reply.local);
        }
    }
    if !last_allowed.iter().all(|a| seen.contains(a)) {
        return Err(format!(
            "{lane}: in 64 connections to {last_target} only {seen:?} of {last_allowed:?} answered"
        ));
    }
    Ok(())
}

/// The endpoint count of `fe`'s master entry in the service map.
pub fn master_count(maps: &Maps, fe: &Frontend) -> Option<usize> {
    let key = datapath::writer::service_key(*fe, MASTER_SLOT);
    maps.services.get(&key, 0).ok().map(|m| usize::from(m.count))
}

/// Map sizes for `n` services × `e` endpoints with room to spare.
pub fn agent_map_sizes(n: usize, e: usize) -> MapSizes {
    let defaults = MapSizes::default();
    let services = ((n * (e + 1)) as u32 + 1024).max(defaults.services);
    let backends = ((n * e) as u32 + 1024).max(defaults.backends);
    let service_ports = (n as u32 + 2).next_power_of_two().max(defaults.service_ports);
    MapSizes {
        services,
        backends,
        service_ports,
        ..defaults
    }
}

/// Polls the agent's log until `needle` appears `count` times or `timeout`.
pub fn wait_for_log(agent: &mut Agent, needle: &str, count: usize, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let log = agent.log();
        if log.matches(needle).count() >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            return Err(format!(
                "no {needle:?} (x{count}) in the agent log after {timeout:?}; last lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The Service object of service `i` (explicit ClusterIP, selector).
pub fn service_object(i: usize, fe: &Frontend) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": NAMESPACE},
        "spec": {"type": "ClusterIP", "clusterIP": fe.addr.to_string(),
                 "selector": {"app": format!("svc-{i}")},
                 "ports": [{"name": "http", "port": fe.port, "protocol": "TCP", "targetPort": TARGET_PORT}]}
    })
}

/// The EndpointSlice of service `i` with `endpoints`.
pub fn slice_object(i: usize, endpoints: &[Endpoint]) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{i}-bench"), "namespace": NAMESPACE,
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|ep| json!({"addresses": [ep.addr.to_string()], "conditions": {"ready": true}})).collect::<Vec<_>>()
    })
}

/// A TCP server for the benchmarks: `threads` threads blocked in accept()
/// (no polling delay), each serving its connection to the end. Every line
/// gets `pod=<name> local=<address reached> client=<peer>`; a first line
/// `sink` makes it read and discard everything until EOF, then answer
/// `got <bytes>`.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    listener: Arc<TcpListener>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(netns: &str, name: &str, port: u16, threads: usize) -> Result<Self, String> {
        let listener = in_netns(netns, move || {
            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
        })
        .map_err(|e| format!("binding the server in {netns}: {e}"))?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let listener = listener.clone();
                let stop = stop.clone();
                let name = name.to_owned();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((conn, peer)) = listener.accept() {
                            serve(conn, &name, peer.to_string(), &stop);
                        }
                    }
                })
            })
            .collect();
        Ok(Self {
            stop,
            listener,
            threads,
        })
    }
}

fn serve(conn: TcpStream, name: &str, peer: String, stop: &AtomicBool) {
    let local = conn.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let _ = conn.set_nodelay(true);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let Ok(clone) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(256 * 1024, clone);
    let mut writer = conn;
    let answer = format!("pod={name} local={local} client={peer}\n");
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line == "sink\n" => {
                let mut total = 0u64;
                loop {
                    match reader.fill_buf() {
                        Ok([]) => break,
                        Ok(buf) => {
                            let n = buf.len();
                            total += n as u64;
                            reader.consume(n);
                        }
                        Err(e) if is_timeout(&e) => {
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = writer.write_all(format!("got {total}\n").as_bytes());
                return;
            }
            Ok(_) => {
                if writer.write_all(answer.as_bytes()).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes every thread blocked in accept() (EINVAL from then on).
        // SAFETY: shutdown(2) on a socket this server owns and keeps open.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Sends `sink`, then `bytes` of data, and waits for the server's count;
/// returns the time from the first byte sent to the count received. Runs on
/// a thread in the client netns.
pub fn stream_bytes(to: SocketAddrV4, bytes: u64, timeout: Duration) -> std::io::Result<Duration> {
    let mut stream = TcpStream::connect_timeout(&to.into(), IO_TIMEOUT)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    set_linger_zero(&stream)?;
    stream.write_all(b"sink\n")?;
    let chunk = vec![0x5au8; 256 * 1024];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        stream.write_all(&chunk[..n])?;
        sent += n as u64;
        if started.elapsed() > timeout {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "stream exceeded its time cap",
            ));
        }
    }
    stream.shutdown(Shutdown::Write)?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let took = started.elapsed();
    if line.trim() != format!("got {bytes}") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the server counted {line:?}, {bytes} were sent"),
        ));
    }
    Ok(took)
}
