//! The connection table end to end: flows live as long as nf_conntrack's
//! would, a full table never drops an open connection, and flows that ended
//! give way to the next ones on their tuples.

mod common;

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use common::manifests::{web_pod, web_service};
use common::{Connection, Fixture, agent_binary, eventually, tcp_request, udp_request};
use redirector::conntrack::{self, Flow};
use redirector::datapath::maps::conntrack_from_pins;
use redirector::datapath::maps_pin_dir;
use redirector::datapath::record::Snapshot;
use redirector::model::{Endpoint, Protocol};
use redirector_common::conntrack::FlowState;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 10);
const WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 80);
const DNS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 53);
/// A second Service selecting the same pods as `WEB`.
const WEB_TOO: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 21), 80);
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// A client pod, `pods` serving 8080 (TCP and UDP), and the two Services.
fn bed(tag: &str, pods: &[(&str, Ipv4Addr)]) -> (Fixture, String) {
    let mut fx = Fixture::new(tag);
    let client = fx.add_host("client", CLIENT);
    for (name, addr) in pods {
        let netns = fx.add_host(name, *addr);
        fx.serve(&netns, name, 8080);
        fx.write_manifest(&format!("{name}.yaml"), &web_pod(name, *addr, None));
    }
    fx.write_manifest(
        "services.yaml",
        &format!(
            "{}---\n{}",
            web_service("web", *WEB.ip()),
            web_service("web-too", *WEB_TOO.ip())
        ),
    );
    (fx, client)
}

fn flows(fx: &Fixture) -> Vec<Flow> {
    let table = conntrack_from_pins(&maps_pin_dir(fx.bpffs.path())).expect("the pinned connection table");
    conntrack::read(&table).expect("reading the connection table")
}

/// The states of the flows to `service` (their forward entry's destination).
fn states_to(fx: &Fixture, service: SocketAddrV4) -> Vec<FlowState> {
    flows(fx)
        .iter()
        .filter(|f| {
            f.forward.as_ref().is_some_and(|(key, _)| {
                key.daddr == u32::from_ne_bytes(service.ip().octets())
                    && u16::from_be(key.dport) == service.port()
            })
        })
        .map(Flow::state)
        .collect()
}

/// An open, idle connection outlives a flood of short ones five times the
/// table's size: a full table refuses new flows (they retry) and the sweeper
/// makes room from closed ones, but nothing evicts the open one.
#[test]
fn an_idle_connection_survives_a_flood_five_times_the_table() {
    const TABLE: usize = 32;
    let (fx, client) = bed("ctflood", &[("web-a", POD_A)]);
    let table = TABLE.to_string();
    let _agent = fx.start_agent(
        agent_binary(),
        &[
            "--max-flow-entries",
            &table,
            "--conntrack-tcp-timeout-time-wait",
            "300ms",
            "--conntrack-tcp-timeout-close",
            "300ms",
            "--conntrack-sweep-interval",
            "200ms",
        ],
    );
    let mut idle = eventually("the idle connection opens", SYNC_TIMEOUT, || {
        Connection::open(&client, WEB).map_err(|e| e.to_string())
    });
    let first = idle.ask().expect("the idle connection answers");

    let mut answered = 0;
    for _ in 0..5 * TABLE {
        // A refused SYN is retried by the client's TCP (after 1 s), as it
        // would be against a full nf_conntrack table.
        if tcp_request(&client, WEB).is_ok() {
            answered += 1;
        }
    }
    assert!(
        answered > TABLE,
        "the table turned over: {answered} of {} short connections answered",
        5 * TABLE
    );
    let again = idle
        .ask()
        .expect("the idle connection still answers after the flood");
    assert_eq!(again.pod, first.pod, "same endpoint");
    assert_eq!(
        states_to(&fx, WEB)
            .iter()
            .filter(|s| **s == FlowState::TcpEstablished)
            .count(),
        1,
        "the open connection is the one established flow left"
    );
}

/// Entries end on schedule: a UDP flow after the UDP timeout, an idle
/// established TCP flow after the established timeout, and a TCP flow
/// closed with FINs after TIME_WAIT, not a day later.
#[test]
fn flows_end_when_their_state_times_out() {
    let (fx, client) = bed("ctexpiry", &[("web-a", POD_A)]);
    let _agent = fx.start_agent(
        agent_binary(),
        &[
            "--conntrack-udp-timeout",
            "1s",
            "--conntrack-tcp-timeout-established",
            "2s",
            "--conntrack-tcp-timeout-time-wait",
            "1s",
            "--conntrack-sweep-interval",
            "200ms",
        ],
    );
    eventually("UDP to the service", SYNC_TIMEOUT, || {
        udp_request(&client, DNS).map_err(|e| e.to_string())
    });
    assert_eq!(
        states_to(&fx, DNS),
        [FlowState::UdpReplied],
        "the UDP flow, answered"
    );
    eventually(
        "the UDP flow ends after 1 s",
        Duration::from_secs(3),
        || match states_to(&fx, DNS).as_slice() {
            [] => Ok(()),
            left => Err(format!("still {left:?}")),
        },
    );

    let mut open = Connection::open(&client, WEB).expect("a TCP connection");
    open.ask().expect("answered");
    assert_eq!(
        states_to(&fx, WEB),
        [FlowState::TcpEstablished],
        "the open connection"
    );
    eventually(
        "the idle established flow ends after 2 s",
        Duration::from_secs(5),
        || match states_to(&fx, WEB).as_slice() {
            [] => Ok(()),
            left => Err(format!("still {left:?}")),
        },
    );
    // Its close is picked up mid-stream as a new flow (as nf_conntrack's
    // loose TCP tracking does), closed at once.
    drop(open);
    eventually(
        "the late close's flow ends too",
        Duration::from_secs(5),
        || match states_to(&fx, WEB).as_slice() {
            [] => Ok(()),
            left => Err(format!("still {left:?}")),
        },
    );

    // Closed with FINs both ways: TIME_WAIT, then gone.
    eventually("a connection closed with FINs", Duration::from_secs(3), || {
        tcp_request(&client, WEB).map_err(|e| e.to_string())
    });
    eventually(
        "the closed flow is in TIME_WAIT",
        Duration::from_secs(2),
        || match states_to(&fx, WEB).as_slice() {
            [FlowState::TcpTimeWait] => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    eventually(
        "the closed flow ends after 1 s",
        Duration::from_secs(3),
        || match states_to(&fx, WEB).as_slice() {
            [] => Ok(()),
            left => Err(format!("still {left:?}")),
        },
    );
}

/// A direct connection to a pod from the client port that just carried a
/// ClusterIP connection to it: the pod's SYN-ACK must not be made to look
/// like the service's.
#[test]
fn a_direct_connection_from_a_port_that_just_reached_the_service_works() {
    let (fx, client) = bed("ctdirect", &[("web-a", POD_A)]);
    let _agent = fx.start_agent(agent_binary(), &[]);
    const PORT: u16 = 45000;
    let mut via_service = eventually("the service from port 45000", SYNC_TIMEOUT, || {
        Connection::open_from(&client, PORT, WEB).map_err(|e| e.to_string())
    });
    via_service.ask().expect("the service answers");
    drop(via_service);
    // Both sides' FINs, then the direct connection on the same client port.
    eventually(
        "the service flow closed",
        Duration::from_secs(3),
        || match states_to(&fx, WEB).as_slice() {
            [FlowState::TcpTimeWait] => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let mut direct = Connection::open_from(&client, PORT, SocketAddrV4::new(POD_A, 8080))
        .expect("a direct connection from the same port");
    let answer = direct.ask().expect("the pod answers directly");
    assert_eq!(answer.pod, "web-a", "the pod itself");
}

/// Two Services selecting the same pod, used in turn from one client port:
/// each connection gets its answers from its own Service's address (a wrong
/// one would reset the connect), the first Service again too.
#[test]
fn services_sharing_a_pod_used_in_turn_from_one_port_each_answer() {
    let (fx, client) = bed("ctturn", &[("web-a", POD_A)]);
    let _agent = fx.start_agent(agent_binary(), &[]);
    const PORT: u16 = 45100;
    for (round, service) in [WEB, WEB_TOO, WEB, WEB_TOO].into_iter().enumerate() {
        let mut connection = eventually(
            &format!("round {round}: {service} from port {PORT}"),
            SYNC_TIMEOUT,
            || Connection::open_from(&client, PORT, service).map_err(|e| e.to_string()),
        );
        let answer = connection
            .ask()
            .unwrap_or_else(|e| panic!("round {round}: {service} answers: {e}"));
        assert_eq!(answer.pod, "web-a", "round {round}");
        connection.reset().expect("closing with a reset");
    }
}

/// One UDP flow from `netns` to `to`: a connected socket, so every datagram
/// has the same client port. `ask` sends one and says which pod answered.
fn udp_flow(netns: &str, to: SocketAddrV4) -> impl Fn() -> Result<String, String> {
    let socket = common::in_netns(netns, || std::net::UdpSocket::bind("0.0.0.0:0")).expect("a UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    socket.connect(to).expect("connect");
    move || {
        socket.send(b"hello").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        text.split_whitespace()
            .find_map(|field| field.strip_prefix("pod="))
            .map(str::to_owned)
            .ok_or(text)
    }
}

/// Pod `name` as `web_pod` writes it, but terminating (`deletionTimestamp`
/// set): serving while it is still Ready, not serving once it is not.
fn terminating_pod(name: &str, addr: Ipv4Addr, serving: bool) -> String {
    let pod = web_pod(name, addr, None).replace(
        "  namespace: default\n",
        "  namespace: default\n  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n",
    );
    if serving {
        pod
    } else {
        pod.replace("status: \"True\"", "status: \"False\"")
    }
}

/// Pod `name` as `web_pod` writes it, but not Ready (neither picked nor serving).
fn unready_pod(name: &str, addr: Ipv4Addr) -> String {
    web_pod(name, addr, None).replace("status: \"True\"", "status: \"False\"")
}

/// Waits until the agent programmed the service port at `frontend` with
/// `picked` for new flows and `draining` kept for the flows already on them
/// (endpoints on port 8080).
fn wait_for_port(
    fx: &Fixture,
    frontend: SocketAddrV4,
    protocol: Protocol,
    picked: &[Ipv4Addr],
    draining: &[Ipv4Addr],
) {
    let endpoints = |addrs: &[Ipv4Addr]| -> Vec<Endpoint> {
        let mut v: Vec<Endpoint> = addrs.iter().map(|&addr| Endpoint { addr, port: 8080 }).collect();
        v.sort();
        v
    };
    let want = (endpoints(picked), endpoints(draining));
    eventually(
        &format!("{frontend}/{protocol}: picks {picked:?}, drains {draining:?}"),
        SYNC_TIMEOUT,
        || {
            let snapshot = Snapshot::read(fx.bpffs.path()).map_err(|e| e.to_string())?;
            let port = snapshot
                .ports
                .iter()
                .find(|p| {
                    p.frontend.addr == *frontend.ip()
                        && p.frontend.port == frontend.port()
                        && p.frontend.protocol == protocol
                })
                .ok_or("not programmed")?;
            let mut got = (port.endpoints.clone(), port.draining.clone());
            got.0.sort();
            got.1.sort();
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    );
}

/// A UDP flow whose endpoint leaves moves to another one at its next
/// datagram, as kube-proxy clears conntrack for a removed UDP endpoint.
#[test]
fn udp_flows_move_off_a_removed_endpoint_at_once() {
    let (fx, client) = bed("ctudp", &[("web-a", POD_A), ("web-b", POD_B)]);
    let _agent = fx.start_agent(agent_binary(), &[]);
    let ask = udp_flow(&client, DNS);
    let first = eventually("UDP to the service", SYNC_TIMEOUT, &ask);
    assert_eq!(
        ask().as_deref(),
        Ok(first.as_str()),
        "the flow sticks to its endpoint"
    );
    fx.remove_manifest(&format!("{first}.yaml"));
    let other = if first == "web-a" { "web-b" } else { "web-a" };
    eventually(
        "the same socket reaches the other endpoint",
        SYNC_TIMEOUT,
        || match ask() {
            Ok(pod) if pod == other => Ok(()),
            Ok(pod) => Err(format!("still {pod}")),
            Err(e) => Err(e),
        },
    );
}

/// A UDP flow keeps an endpoint that is terminating but still serving, as
/// kube-proxy keeps a UDP endpoint's conntrack entries until it stops
/// serving: its next datagrams still reach it while new flows go to the
/// ready endpoint; once it stops serving, the flow moves at its next datagram.
#[test]
fn udp_flows_stay_on_a_terminating_endpoint_while_it_serves() {
    let (fx, client) = bed("ctdrain", &[("web-a", POD_A), ("web-b", POD_B)]);
    fx.write_manifest("web-b.yaml", &unready_pod("web-b", POD_B));
    let _agent = fx.start_agent(agent_binary(), &[]);
    let ask = udp_flow(&client, DNS);
    let first = eventually("UDP to the service", SYNC_TIMEOUT, &ask);
    assert_eq!(first, "web-a", "web-a is the only ready endpoint");

    fx.write_manifest("web-b.yaml", &web_pod("web-b", POD_B, None));
    fx.write_manifest("web-a.yaml", &terminating_pod("web-a", POD_A, true));
    wait_for_port(&fx, DNS, Protocol::Udp, &[POD_B], &[POD_A]);
    for datagram in 0..5 {
        assert_eq!(
            ask().as_deref(),
            Ok("web-a"),
            "datagram {datagram} of the open flow still reaches the terminating, serving endpoint"
        );
    }
    for flow in 0..5 {
        let answer = udp_request(&client, DNS).unwrap_or_else(|e| panic!("new flow {flow}: {e}"));
        assert_eq!(
            answer.pod, "web-b",
            "new flow {flow} (another client port) goes to the ready endpoint"
        );
    }

    fx.write_manifest("web-a.yaml", &terminating_pod("web-a", POD_A, false));
    wait_for_port(&fx, DNS, Protocol::Udp, &[POD_B], &[]);
    assert_eq!(
        ask().as_deref(),
        Ok("web-b"),
        "the flow's next datagram moves once its endpoint stops serving"
    );
}

const STICKY: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 22), 80);
/// `STICKY`: `app: web` on port 80 with `sessionAffinity: ClientIP`.
const STICKY_SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: sticky
  namespace: default
spec:
  clusterIP: 10.96.0.22
  selector:
    app: web
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 600
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

/// `sessionAffinity: ClientIP` end to end: 20 connections from one client
/// all reach the same endpoint, and the client moves when it leaves (that it
/// stays there once the first endpoint is back, and the timeout, are in the
/// datapath tests).
#[test]
fn session_affinity_holds_and_moves_when_the_endpoint_leaves() {
    let (fx, client) = bed("ctaff", &[("web-a", POD_A), ("web-b", POD_B)]);
    fx.write_manifest("sticky.yaml", STICKY_SERVICE);
    let _agent = fx.start_agent(agent_binary(), &[]);
    let first = eventually("the sticky service", SYNC_TIMEOUT, || {
        tcp_request(&client, STICKY).map_err(|e| e.to_string())
    });
    for attempt in 0..20 {
        let answer = tcp_request(&client, STICKY).unwrap_or_else(|e| panic!("connection {attempt}: {e}"));
        assert_eq!(
            answer.pod, first.pod,
            "connection {attempt} keeps the client's endpoint"
        );
    }
    fx.remove_manifest(&format!("{}.yaml", first.pod));
    let other = if first.pod == "web-a" { "web-b" } else { "web-a" };
    eventually(
        "the client moves off the removed endpoint",
        SYNC_TIMEOUT,
        || match tcp_request(&client, STICKY) {
            Ok(a) if a.pod == other => Ok(()),
            Ok(a) => Err(format!("still {}", a.pod)),
            Err(e) => Err(e.to_string()),
        },
    );
}

/// Session affinity never sends a new connection to a terminating endpoint,
/// even one that still serves (kube-proxy's `recent` rules exist only for
/// the endpoints it picks from): the client's next connection goes to the
/// ready one, and stays there.
#[test]
fn session_affinity_leaves_a_terminating_endpoint() {
    let (fx, client) = bed("ctaffdrain", &[("web-a", POD_A), ("web-b", POD_B)]);
    fx.write_manifest("sticky.yaml", STICKY_SERVICE);
    fx.write_manifest("web-b.yaml", &unready_pod("web-b", POD_B));
    let _agent = fx.start_agent(agent_binary(), &[]);
    let first = eventually("the sticky service", SYNC_TIMEOUT, || {
        tcp_request(&client, STICKY).map_err(|e| e.to_string())
    });
    assert_eq!(first.pod, "web-a", "web-a is the only ready endpoint");

    fx.write_manifest("web-b.yaml", &web_pod("web-b", POD_B, None));
    fx.write_manifest("web-a.yaml", &terminating_pod("web-a", POD_A, true));
    wait_for_port(&fx, STICKY, Protocol::Tcp, &[POD_B], &[POD_A]);
    for attempt in 0..5 {
        let answer = tcp_request(&client, STICKY).unwrap_or_else(|e| panic!("connection {attempt}: {e}"));
        assert_eq!(
            answer.pod, "web-b",
            "connection {attempt} leaves the client's draining endpoint for the ready one"
        );
    }
}

/// An endpoint's ICMP port unreachable reaches the client as the service's:
/// UDP to a service whose endpoint has nothing on the target port is
/// refused (ECONNREFUSED on the client's connected socket), not a timeout.
#[test]
fn udp_to_a_closed_endpoint_port_is_refused_by_the_service() {
    let (fx, client) = bed("cticmp", &[("web-a", POD_A)]);
    fx.write_manifest(
        "closed.yaml",
        "apiVersion: v1
kind: Service
metadata:
  name: closed
  namespace: default
spec:
  clusterIP: 10.96.0.23
  selector:
    app: web
  ports:
  - name: dns
    port: 53
    protocol: UDP
    targetPort: 9999
",
    );
    let _agent = fx.start_agent(agent_binary(), &[]);
    eventually("the agent programmed the services", SYNC_TIMEOUT, || {
        udp_request(&client, DNS).map(drop).map_err(|e| e.to_string())
    });
    let socket = common::in_netns(&client, || std::net::UdpSocket::bind("0.0.0.0:0")).expect("a UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    socket.connect("10.96.0.23:53").expect("connect");
    socket.send(b"anyone?").expect("send");
    let err = socket
        .recv(&mut [0u8; 64])
        .expect_err("nothing listens on the endpoint's port");
    assert_eq!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "the endpoint's port unreachable reached the client's socket: {err}"
    );
}

/// Path-MTU discovery through a ClusterIP: the hop toward the endpoint has a
/// smaller MTU than the client's link; its fragmentation-needed quotes the
/// translated segment and must be translated back, or the client's large
/// segments vanish.
#[test]
fn path_mtu_discovery_works_through_a_cluster_ip() {
    let (fx, client) = bed("ctpmtu", &[("web-a", POD_A)]);
    let _agent = fx.start_agent(agent_binary(), &[]);
    fx.set_node_link_mtu("web-a", 1000);
    let mut connection = eventually("the service", SYNC_TIMEOUT, || {
        Connection::open(&client, WEB).map_err(|e| e.to_string())
    });
    let large = "x".repeat(4000);
    let answer = connection
        .ask_with(&large)
        .expect("a 4000-byte request over a 1000-byte hop is answered");
    assert_eq!(answer.pod, "web-a");
}

/// A 4000-byte UDP request and its 4000-byte reply over 1500-byte links:
/// both are fragmented, and every fragment is translated.
#[test]
fn large_udp_datagrams_are_translated_both_ways() {
    let (fx, client) = bed("ctfrag", &[("web-a", POD_A)]);
    let _agent = fx.start_agent(agent_binary(), &[]);
    eventually("UDP to the service", SYNC_TIMEOUT, || {
        udp_request(&client, DNS).map(drop).map_err(|e| e.to_string())
    });
    let socket = common::in_netns(&client, || std::net::UdpSocket::bind("0.0.0.0:0")).expect("a UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    socket.connect(DNS).expect("connect");
    socket.send(&[b'q'; 4000]).expect("a 4000-byte request");
    let mut reply = vec![0u8; 8192];
    let len = socket
        .recv(&mut reply)
        .expect("the 4000-byte reply, from the service address");
    assert_eq!(len, 4000, "the whole reply arrived");
    let text = String::from_utf8_lossy(&reply[..len]);
    assert!(
        text.starts_with(&format!("pod=web-a client={CLIENT}:")),
        "answered by the endpoint, which saw the client's address: {}",
        &text[..60.min(text.len())]
    );
}
