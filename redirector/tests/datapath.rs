//! The TC program under BPF_PROG_TEST_RUN: input frame → verdict + output frame,
//! against maps programmed through the real map writer.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions};
use common::packet::{
    ACK, CLIENT_MAC, FIN, ICMP, NODE_MAC, Parsed, RST, SYN, Spec, assert_checksums, fragments, icmp_error,
    quoted, reassemble,
};
use redirector::datapath::{
    Datapath, MapSizes,
    writer::{MapWriter, service_key},
};
use redirector::datapath::{Maps, explain, maps_pin_dir};
use redirector::model::{
    ClientIpAffinity, Desired, Endpoint, Frontend, Ipv4Cidr, NoEndpoints, Protocol, ServicePort,
    ServicePortName,
};
use redirector_common::config::MAX_SERVICE_CIDRS;
use redirector_common::counters;

/// What the program returns for every packet it lets through: go on down the
/// TC chain (tcx "next"), so a CNI program attached after ours still runs.
const TC_ACT_UNSPEC: u32 = -1i32 as u32;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP_EMPTY: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// Another service whose only endpoint is `POD:8080`, as `VIP:80`'s.
const VIP_SHARED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
/// internalTrafficPolicy: Local, every endpoint on another node.
const VIP_NO_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const UNALLOCATED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 99);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

struct Harness {
    bpffs: common::Bpffs,
    datapath: Datapath,
    writer: MapWriter,
}

impl Harness {
    fn new() -> Self {
        let bpffs = common::Bpffs::new("rdt-bpf");
        let (datapath, maps) = Datapath::load(bpffs.path(), &MapSizes::default()).expect("load datapath");
        let mut writer = MapWriter::new(maps).expect("map writer");
        writer
            .set_service_cidrs(&["10.96.0.0/12".parse().unwrap()])
            .expect("service cidr");
        let mut desired = Desired::new();
        let port = |name: &str, eps: &[(Ipv4Addr, u16)]| ServicePort {
            no_endpoints: Default::default(),
            affinity: None,
            also_serving: Vec::new(),
            info: Default::default(),
            name: ServicePortName {
                namespace: "default".into(),
                name: name.into(),
                port: "p".into(),
            },
            endpoints: eps
                .iter()
                .map(|(addr, port)| Endpoint {
                    addr: *addr,
                    port: *port,
                })
                .collect(),
        };
        desired.insert(fe(VIP, 80, Protocol::Tcp), port("web", &[(POD, 8080)]));
        desired.insert(fe(VIP, 53, Protocol::Udp), port("dns", &[(POD, 5353)]));
        desired.insert(fe(VIP_EMPTY, 80, Protocol::Tcp), port("empty", &[]));
        desired.insert(fe(VIP_SHARED, 80, Protocol::Tcp), port("shared", &[(POD, 8080)]));
        desired.insert(
            fe(VIP_NO_LOCAL, 80, Protocol::Tcp),
            ServicePort {
                no_endpoints: NoEndpoints::Drop,
                ..port("elsewhere", &[])
            },
        );
        let report = writer.sync(&desired);
        assert!(
            report.errors.is_empty(),
            "programming the test services: {:?}",
            report.errors
        );
        Self {
            bpffs,
            datapath,
            writer,
        }
    }

    /// Runs one frame; returns the verdict and the frame as the program left it.
    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(Hook::FromPod, frame).expect("BPF_PROG_TEST_RUN")
    }

    fn try_run(&self, hook: Hook, frame: &[u8]) -> Result<(u32, Vec<u8>), aya::programs::ProgramError> {
        let program = match hook {
            Hook::FromPod => self.datapath.program(),
            Hook::ToPod => self.datapath.to_pod_program(),
        };
        let mut out = vec![0u8; 2048];
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    fn counters(&self) -> [u64; counters::COUNT as usize] {
        self.writer.maps().counter_totals().expect("read counters")
    }
}

/// Which of the programs a frame meets: on a pod interface's node side,
/// ingress (the packet leaves the pod) or egress (it enters the pod).
#[derive(Clone, Copy)]
enum Hook {
    FromPod,
    ToPod,
}

fn fe(addr: Ipv4Addr, port: u16, protocol: Protocol) -> Frontend {
    Frontend { addr, port, protocol }
}

/// What must come out of the program.
enum Expect {
    /// Let through (TC_ACT_UNSPEC), frame unchanged.
    Untouched,
    /// Let through (TC_ACT_UNSPEC), addresses/ports rewritten to these, payload
    /// kept, checksums valid.
    Translated {
        src: (Ipv4Addr, u16),
        dst: (Ipv4Addr, u16),
    },
    /// Redirected back out as ICMP port unreachable from `from` quoting the input.
    Refused {
        from: Ipv4Addr,
    },
    Dropped,
}

struct Case {
    name: &'static str,
    frame: Vec<u8>,
    expect: Expect,
    counter: u32,
}

fn check(h: &Harness, case: Case) {
    check_on(h, Hook::FromPod, case);
}

fn check_on(h: &Harness, hook: Hook, case: Case) {
    let before = h.counters();
    let name = case.name;
    let (verdict, out) = h
        .try_run(hook, &case.frame)
        .unwrap_or_else(|e| panic!("{name}: BPF_PROG_TEST_RUN: {e:?}"));
    match case.expect {
        Expect::Untouched => {
            assert_eq!(verdict, TC_ACT_UNSPEC, "{name}: verdict");
            assert_eq!(out, case.frame, "{name}: frame must pass unchanged");
        }
        Expect::Translated { src, dst } => {
            assert_eq!(verdict, TC_ACT_UNSPEC, "{name}: verdict");
            let p = Parsed::new(&out);
            assert_eq!((p.src, p.sport), src, "{name}: source");
            assert_eq!((p.dst, p.dport), dst, "{name}: destination");
            assert_eq!(out.len(), case.frame.len(), "{name}: length");
            let q = Parsed::new(&case.frame);
            let csum_at = if p.proto == common::packet::TCP { 16 } else { 6 };
            assert_eq!(
                out[p.l4 + 4..p.l4 + csum_at],
                case.frame[q.l4 + 4..q.l4 + csum_at],
                "{name}: L4 header kept"
            );
            assert_eq!(
                out[p.l4 + csum_at + 2..],
                case.frame[q.l4 + csum_at + 2..],
                "{name}: rest of segment kept"
            );
            assert_checksums(&out, name);
        }
        Expect::Refused { from } => {
            assert_eq!(verdict, TC_ACT_REDIRECT, "{name}: verdict");
            let p = Parsed::new(&out);
            let q = Parsed::new(&case.frame);
            assert_eq!(p.proto, ICMP, "{name}: an ICMP reply");
            assert_eq!(
                (p.src, p.dst),
                (from, q.src),
                "{name}: ICMP from the service address to the sender"
            );
            assert_eq!(
                (p.dst_mac, p.src_mac),
                (CLIENT_MAC, NODE_MAC),
                "{name}: MACs swapped"
            );
            assert_eq!(out[p.l4], 3, "{name}: destination unreachable");
            assert_eq!(out[p.l4 + 1], 3, "{name}: port unreachable");
            let quote_len = q.ip_hlen + 8;
            assert_eq!(out.len(), 14 + 20 + 8 + quote_len, "{name}: frame length");
            assert_eq!(
                out[p.l4 + 8..],
                case.frame[14..14 + quote_len],
                "{name}: quotes the IP header and 8 bytes"
            );
            assert_checksums(&out, name);
        }
        Expect::Dropped => assert_eq!(verdict, TC_ACT_SHOT, "{name}: verdict"),
    }
    let after = h.counters();
    assert_eq!(
        after[case.counter as usize] - before[case.counter as usize],
        1,
        "{name}: counter {} must count the packet",
        counters::LABELS[case.counter as usize]
    );
}

/// Replies are translated on their way into the client pod too: there the
/// reply of an endpoint on another node, of a process on the node, or of a
/// masqueraded flow is first seen.
#[test]
fn translates_replies_on_their_way_into_the_pod() {
    let h = Harness::new();
    check(
        &h,
        Case {
            name: "a SYN from the client pod opens a flow",
            frame: Spec::tcp((CLIENT, 42000), (VIP, 80), SYN).build(),
            expect: Expect::Translated {
                src: (CLIENT, 42000),
                dst: (POD, 8080),
            },
            counter: counters::FORWARD_NEW_FLOW,
        },
    );
    let cases = [
        Case {
            name: "into the client pod: the endpoint's SYN-ACK comes from the service address",
            frame: Spec::tcp((POD, 8080), (CLIENT, 42000), SYN | ACK).build(),
            expect: Expect::Translated {
                src: (VIP, 80),
                dst: (CLIENT, 42000),
            },
            counter: counters::REPLY_TRANSLATED,
        },
        Case {
            name: "into the client pod: a packet already from the service address passes as is",
            frame: Spec::tcp((VIP, 80), (CLIENT, 42000), ACK).build(),
            expect: Expect::Untouched,
            counter: counters::PASS_TO_POD,
        },
        Case {
            name: "into the endpoint pod: the translated request passes as is",
            frame: Spec::tcp((CLIENT, 42000), (POD, 8080), ACK).build(),
            expect: Expect::Untouched,
            counter: counters::PASS_TO_POD,
        },
        Case {
            name: "into a pod: traffic of no translated flow passes as is",
            frame: Spec::udp((OUTSIDE, 5000), (CLIENT, 53), b"q").build(),
            expect: Expect::Untouched,
            counter: counters::PASS_TO_POD,
        },
    ];
    for case in cases {
        check_on(&h, Hook::ToPod, case);
    }
}

/// Refusals are ICMP errors, rate-limited per sender as the kernel limits its
/// own (a burst of six, then one a second): a seventh at once is dropped, and
/// another sender still gets its refusal.
#[test]
fn refusals_are_rate_limited_per_sender() {
    let h = Harness::new();
    let flooder = Ipv4Addr::new(10, 244, 0, 77);
    for port in 0..6 {
        check(
            &h,
            Case {
                name: "within the burst: refused",
                frame: Spec::tcp((flooder, 40000 + port), (VIP_EMPTY, 80), SYN).build(),
                expect: Expect::Refused { from: VIP_EMPTY },
                counter: counters::REFUSED_NO_ENDPOINTS,
            },
        );
    }
    check(
        &h,
        Case {
            name: "beyond the burst: dropped",
            frame: Spec::tcp((flooder, 40100), (VIP_EMPTY, 80), SYN).build(),
            expect: Expect::Dropped,
            counter: counters::DROP_REFUSAL_RATE_LIMITED,
        },
    );
    check(
        &h,
        Case {
            name: "another sender keeps its own credit",
            frame: Spec::tcp((Ipv4Addr::new(10, 244, 0, 78), 40000), (VIP_EMPTY, 80), SYN).build(),
            expect: Expect::Refused { from: VIP_EMPTY },
            counter: counters::REFUSED_NO_ENDPOINTS,
        },
    );
}

fn with_options(mut spec: Spec, options: &[u8]) -> Spec {
    spec.ip_options = options.to_vec();
    spec
}

#[test]
fn translates_forward_and_reply() {
    let h = Harness::new();
    let payload = b"GET / HTTP/1.0\r\n\r\n".to_vec();
    let cases = [
        Case {
            name: "TCP SYN to a service port picks the endpoint",
            frame: Spec::tcp((CLIENT, 40000), (VIP, 80), SYN).build(),
            expect: Expect::Translated {
                src: (CLIENT, 40000),
                dst: (POD, 8080),
            },
            counter: counters::FORWARD_NEW_FLOW,
        },
        Case {
            name: "later segments of the flow follow the connection table",
            frame: Spec {
                payload: payload.clone(),
                ..Spec::tcp((CLIENT, 40000), (VIP, 80), ACK)
            }
            .build(),
            expect: Expect::Translated {
                src: (CLIENT, 40000),
                dst: (POD, 8080),
            },
            counter: counters::FORWARD_ESTABLISHED,
        },
        Case {
            name: "UDP datagram to a service port",
            frame: Spec::udp((CLIENT, 41000), (VIP, 53), b"query").build(),
            expect: Expect::Translated {
                src: (CLIENT, 41000),
                dst: (POD, 5353),
            },
            counter: counters::FORWARD_NEW_FLOW,
        },
        Case {
            name: "UDP without checksum keeps a zero checksum",
            frame: Spec {
                udp_zero_checksum: true,
                ..Spec::udp((CLIENT, 41001), (VIP, 53), b"q")
            }
            .build(),
            expect: Expect::Translated {
                src: (CLIENT, 41001),
                dst: (POD, 5353),
            },
            counter: counters::FORWARD_NEW_FLOW,
        },
        Case {
            name: "IPv4 options: the L4 header is found after them",
            frame: with_options(Spec::tcp((CLIENT, 40001), (VIP, 80), SYN), &[1, 1, 1, 0]).build(),
            expect: Expect::Translated {
                src: (CLIENT, 40001),
                dst: (POD, 8080),
            },
            counter: counters::FORWARD_NEW_FLOW,
        },
    ];
    for case in cases {
        check(&h, case);
    }
    // Replies are translated on their way into the client pod.
    let replies = [
        (
            Hook::ToPod,
            Case {
                name: "the endpoint's SYN-ACK comes back from the service address",
                frame: Spec::tcp((POD, 8080), (CLIENT, 40000), SYN | ACK).build(),
                expect: Expect::Translated {
                    src: (VIP, 80),
                    dst: (CLIENT, 40000),
                },
                counter: counters::REPLY_TRANSLATED,
            },
        ),
        (
            Hook::ToPod,
            Case {
                name: "UDP reply",
                frame: Spec::udp((POD, 5353), (CLIENT, 41000), b"answer").build(),
                expect: Expect::Translated {
                    src: (VIP, 53),
                    dst: (CLIENT, 41000),
                },
                counter: counters::REPLY_TRANSLATED,
            },
        ),
        (
            Hook::FromPod,
            Case {
                name: "a reply leaving the endpoint pod is left for its client's interface",
                frame: Spec::udp((POD, 5353), (CLIENT, 41000), b"answer").build(),
                expect: Expect::Untouched,
                counter: counters::PASS_NOT_SERVICE,
            },
        ),
    ];
    for (hook, case) in replies {
        check_on(&h, hook, case);
    }
    // The zero checksum must really stay zero.
    let (_, out) = h.run(
        &Spec {
            udp_zero_checksum: true,
            ..Spec::udp((CLIENT, 41002), (VIP, 53), b"q")
        }
        .build(),
    );
    let p = Parsed::new(&out);
    assert_eq!(out[p.l4 + 6..p.l4 + 8], [0, 0], "zero UDP checksum stays zero");
}

#[test]
fn passes_what_is_not_for_a_service() {
    let h = Harness::new();
    // One field of a built frame altered rather than a real ARP or ICMP packet,
    // so only the EtherType or the IP protocol number tells them apart from a
    // SYN the program would translate.
    let mut arp = Spec::tcp((CLIENT, 1), (VIP, 80), SYN).build();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let mut icmp = Spec::tcp((CLIENT, 1), (VIP, 80), 0).build();
    icmp[23] = ICMP;
    let cases = [
        Case {
            name: "pod to pod traffic",
            frame: Spec::tcp((CLIENT, 40000), (POD, 8080), SYN).build(),
            expect: Expect::Untouched,
            counter: counters::PASS_NOT_SERVICE,
        },
        Case {
            name: "traffic leaving the cluster",
            frame: Spec::udp((CLIENT, 40000), (OUTSIDE, 53), b"x").build(),
            expect: Expect::Untouched,
            counter: counters::PASS_NOT_SERVICE,
        },
        Case {
            name: "non-IPv4 frames",
            frame: arp,
            expect: Expect::Untouched,
            counter: counters::PASS_NOT_IPV4,
        },
        Case {
            name: "non-TCP/UDP to a service address",
            frame: icmp,
            expect: Expect::Untouched,
            counter: counters::PASS_NOT_TCP_UDP,
        },
        Case {
            name: "a first fragment not addressed to a service",
            frame: Spec {
                frag: 0x2000,
                ..Spec::udp((CLIENT, 1), (OUTSIDE, 53), b"frag")
            }
            .build(),
            expect: Expect::Untouched,
            counter: counters::PASS_NOT_SERVICE,
        },
        Case {
            name: "a later fragment not addressed to a service",
            frame: Spec {
                frag: 0x0010,
                ..Spec::udp((CLIENT, 1), (OUTSIDE, 53), b"frag")
            }
            .build(),
            expect: Expect::Untouched,
            counter: counters::PASS_UNPARSABLE,
        },
    ];
    for case in cases {
        check(&h, case);
    }
}

#[test]
fn refuses_and_drops() {
    let h = Harness::new();
    // The builder only writes well-formed frames: these are built whole, then cut
    // or altered.
    let mut truncated = Spec::tcp((CLIENT, 40000), (VIP, 80), SYN).build();
    truncated.truncate(14 + 20 + 10);
    // The kernel's test runner refuses frames shorter than an IPv4 header, so
    // the malformed header cases lie about their lengths instead.
    let mut bad_ihl = Spec::tcp((CLIENT, 40000), (VIP, 80), SYN).build();
    bad_ihl[14] = 0x44;
    let mut long_ihl = Spec::tcp((CLIENT, 40000), (VIP, 80), SYN).build();
    long_ihl[14] = 0x4f;
    let cases = [
        Case {
            name: "TCP to a service without endpoints is refused",
            frame: Spec::tcp((CLIENT, 40000), (VIP_EMPTY, 80), SYN).build(),
            expect: Expect::Refused { from: VIP_EMPTY },
            counter: counters::REFUSED_NO_ENDPOINTS,
        },
        Case {
            name: "refusal quotes IPv4 options too",
            frame: with_options(
                Spec::tcp((CLIENT, 40002), (VIP_EMPTY, 80), SYN),
                &[1, 1, 1, 1, 1, 1, 1, 0],
            )
            .build(),
            expect: Expect::Refused { from: VIP_EMPTY },
            counter: counters::REFUSED_NO_ENDPOINTS,
        },
        Case {
            name: "TCP to a Local-policy service with endpoints only on other nodes is dropped, not refused",
            frame: Spec::tcp((CLIENT, 40003), (VIP_NO_LOCAL, 80), SYN).build(),
            expect: Expect::Dropped,
            counter: counters::DROP_NO_LOCAL_ENDPOINTS,
        },
        Case {
            name: "any segment to it is dropped: there is no flow to follow",
            frame: Spec::tcp((CLIENT, 40003), (VIP_NO_LOCAL, 80), ACK).build(),
            expect: Expect::Dropped,
            counter: counters::DROP_NO_LOCAL_ENDPOINTS,
        },
        Case {
            name: "its address on a port it does not define is still refused",
            frame: Spec::tcp((CLIENT, 40003), (VIP_NO_LOCAL, 81), SYN).build(),
            expect: Expect::Refused { from: VIP_NO_LOCAL },
            counter: counters::REFUSED_UNKNOWN_PORT,
        },
        Case {
            name: "a large UDP datagram to a port the service does not define",
            frame: Spec::udp((CLIENT, 41000), (VIP_EMPTY, 80), &[7u8; 300]).build(),
            expect: Expect::Refused { from: VIP_EMPTY },
            counter: counters::REFUSED_UNKNOWN_PORT,
        },
        Case {
            name: "an unused address of the service CIDR is dropped, as kube-proxy does",
            frame: Spec::tcp((CLIENT, 40000), (UNALLOCATED, 80), SYN).build(),
            expect: Expect::Dropped,
            counter: counters::DROP_UNALLOCATED_IP,
        },
        Case {
            name: "a service address on a port it does not define is refused",
            frame: Spec::tcp((CLIENT, 40000), (VIP, 81), SYN).build(),
            expect: Expect::Refused { from: VIP },
            counter: counters::REFUSED_UNKNOWN_PORT,
        },
        Case {
            name: "the right port with the wrong protocol is refused",
            frame: Spec::udp((CLIENT, 40000), (VIP, 80), b"x").build(),
            expect: Expect::Refused { from: VIP },
            counter: counters::REFUSED_UNKNOWN_PORT,
        },
        Case {
            name: "a later fragment to a service address whose first was not seen",
            frame: Spec {
                frag: 0x0010,
                ..Spec::udp((CLIENT, 41000), (VIP, 53), b"later")
            }
            .build(),
            expect: Expect::Dropped,
            counter: counters::DROP_FRAGMENT,
        },
        Case {
            name: "a truncated TCP header to a service address",
            frame: truncated,
            expect: Expect::Dropped,
            counter: counters::DROP_TRUNCATED,
        },
        Case {
            name: "an IPv4 header length below 20 passes to the kernel, which drops it",
            frame: bad_ihl,
            expect: Expect::Untouched,
            counter: counters::PASS_UNPARSABLE,
        },
        Case {
            name: "an IPv4 header length past the end of the packet, to a service",
            frame: long_ihl,
            expect: Expect::Dropped,
            counter: counters::DROP_TRUNCATED,
        },
    ];
    for case in cases {
        check(&h, case);
    }
}

/// The master entry's "no local endpoints" flag follows the model through
/// every change of a port (and only an empty port drops), and a restarted
/// agent finds it as it was.
#[test]
fn dropping_without_local_endpoints_follows_the_model() {
    let mut h = Harness::new();
    let frontend = fe(VIP_NO_LOCAL, 80, Protocol::Tcp);
    let port = |endpoints: &[Ipv4Addr], no_endpoints| ServicePort {
        no_endpoints,
        ..service("elsewhere", endpoints)
    };
    let steps = [
        (
            "no endpoints anywhere: refused (the flag is cleared)",
            port(&[], NoEndpoints::Reject),
            Expect::Refused { from: VIP_NO_LOCAL },
            counters::REFUSED_NO_ENDPOINTS,
        ),
        (
            "endpoints only elsewhere: dropped (the flag is set, the count stays 0)",
            port(&[], NoEndpoints::Drop),
            Expect::Dropped,
            counters::DROP_NO_LOCAL_ENDPOINTS,
        ),
        (
            "a local endpoint: forwarded",
            port(&[POD], NoEndpoints::Reject),
            Expect::Translated {
                src: (CLIENT, 0),
                dst: (POD, 8080),
            },
            counters::FORWARD_NEW_FLOW,
        ),
        (
            "the local endpoint gone: dropped again (count and flag in one write)",
            port(&[], NoEndpoints::Drop),
            Expect::Dropped,
            counters::DROP_NO_LOCAL_ENDPOINTS,
        ),
    ];
    for (index, (name, wanted, expect, counter)) in steps.into_iter().enumerate() {
        let report = h.writer.sync_frontends(&[(frontend, &wanted)], &[]);
        assert!(report.errors.is_empty(), "{name}: {:?}", report.errors);
        // A fresh client port per step: no flow of an earlier step applies.
        let sport = 43000 + index as u16;
        let expect = match expect {
            Expect::Translated { dst, .. } => Expect::Translated {
                src: (CLIENT, sport),
                dst,
            },
            other => other,
        };
        check(
            &h,
            Case {
                name,
                frame: Spec::tcp((CLIENT, sport), (VIP_NO_LOCAL, 80), SYN).build(),
                expect,
                counter,
            },
        );
    }
    let last = port(&[], NoEndpoints::Drop);
    let Harness {
        bpffs,
        datapath,
        writer,
    } = h;
    drop((datapath, writer));
    let (_datapath, maps) = Datapath::load(bpffs.path(), &MapSizes::default()).expect("reload");
    let mut writer = MapWriter::new(maps).expect("writer after restart");
    let resumed = writer.sync_frontends(&[(frontend, &last)], &[]);
    assert_eq!(
        (resumed.writes, resumed.deletes),
        (0, 0),
        "a restart finds the flag as it was written and rewrites nothing"
    );
}

#[test]
fn new_connection_on_a_reused_tuple_leaves_a_removed_endpoint() {
    let mut h = Harness::new();
    let pod2 = Ipv4Addr::new(10, 244, 2, 2);
    let syn = Spec::tcp((CLIENT, 42000), (VIP, 80), SYN).build();
    let (_, out) = h.run(&syn);
    assert_eq!(
        Parsed::new(&out).dst,
        POD,
        "first connection reaches the only endpoint"
    );

    // The endpoint is replaced.
    let mut desired: Desired = BTreeMap::new();
    desired.insert(
        fe(VIP, 80, Protocol::Tcp),
        ServicePort {
            no_endpoints: Default::default(),
            affinity: None,
            also_serving: Vec::new(),
            info: Default::default(),
            name: ServicePortName {
                namespace: "default".into(),
                name: "web".into(),
                port: "p".into(),
            },
            endpoints: vec![Endpoint {
                addr: pod2,
                port: 8080,
            }],
        },
    );
    let report = h.writer.sync(&desired);
    assert!(report.errors.is_empty(), "resync: {:?}", report.errors);

    let ack = Spec::tcp((CLIENT, 42000), (VIP, 80), ACK).build();
    let (_, out) = h.run(&ack);
    assert_eq!(
        Parsed::new(&out).dst,
        POD,
        "the established connection still finishes on the removed endpoint"
    );
    let (_, out) = h.run(&syn);
    assert_eq!(
        Parsed::new(&out).dst,
        pod2,
        "a new connection on the same tuple goes to a current endpoint"
    );
    let (verdict, _) = h.run(&Spec::tcp((CLIENT, 42000), (VIP_EMPTY, 80), SYN).build());
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "a deleted service's address is dropped like any unallocated cluster IP"
    );
}

#[test]
fn every_packet_is_counted_once() {
    let h = Harness::new();
    let before: u64 = h.counters().iter().sum();
    for frame in [
        Spec::tcp((CLIENT, 1), (VIP, 80), SYN).build(),
        Spec::tcp((CLIENT, 1), (POD, 80), SYN).build(),
        Spec::udp((CLIENT, 1), (VIP_EMPTY, 80), b"x").build(),
    ] {
        h.run(&frame);
    }
    let after: u64 = h.counters().iter().sum();
    assert_eq!(after - before, 3, "one counter per packet");
}

fn service(name: &str, endpoints: &[Ipv4Addr]) -> ServicePort {
    ServicePort {
        no_endpoints: Default::default(),
        affinity: None,
        also_serving: Vec::new(),
        info: Default::default(),
        name: ServicePortName {
            namespace: "default".into(),
            name: name.into(),
            port: "http".into(),
        },
        endpoints: endpoints
            .iter()
            .map(|addr| Endpoint {
                addr: *addr,
                port: 8080,
            })
            .collect(),
    }
}

/// A master entry carries up to three slots itself; larger services use
/// the slot entries. Either way new flows reach exactly the current
/// endpoints, across changes that keep the count (the inline copy must
/// follow), grow past three (to the slots) and shrink back.
#[test]
fn new_flows_reach_exactly_the_current_endpoints_inline_or_in_slots() {
    let mut h = Harness::new();
    let pod = |last: u8| Ipv4Addr::new(10, 244, 3, last);
    let steps: [(&str, Vec<Ipv4Addr>); 6] = [
        ("one endpoint", vec![pod(1)]),
        ("three endpoints", vec![pod(1), pod(2), pod(3)]),
        ("one of three replaced", vec![pod(1), pod(4), pod(3)]),
        ("four endpoints", vec![pod(1), pod(4), pod(3), pod(5)]),
        ("one of four replaced", vec![pod(6), pod(4), pod(3), pod(5)]),
        ("back to two", vec![pod(4), pod(5)]),
    ];
    let mut client_port = 44000;
    for (step, endpoints) in steps {
        let mut desired = Desired::new();
        desired.insert(fe(VIP, 80, Protocol::Tcp), service("web", &endpoints));
        let report = h.writer.sync(&desired);
        assert!(report.errors.is_empty(), "{step}: sync: {:?}", report.errors);
        let mut reached = BTreeSet::new();
        // 60 flows: each endpoint is missed with a chance below 1e-5.
        for _ in 0..60 {
            client_port += 1;
            let (verdict, out) = h.run(&Spec::tcp((CLIENT, client_port), (VIP, 80), SYN).build());
            assert_eq!(verdict, TC_ACT_UNSPEC, "{step}: verdict");
            let p = Parsed::new(&out);
            assert_eq!(p.dport, 8080, "{step}: endpoint port");
            reached.insert(p.dst);
        }
        let want: BTreeSet<Ipv4Addr> = endpoints.into_iter().collect();
        assert_eq!(
            reached, want,
            "{step}: new flows reach every current endpoint and no other"
        );
    }
}

/// An agent that stopped between a slot's write and its master's leaves an
/// inline copy that is not the slot: the next agent rewrites the port, so
/// new flows do not go to the endpoint the copy still names.
#[test]
fn a_restart_rewrites_a_master_whose_inline_slots_are_stale() {
    let bpffs = common::Bpffs::new("rdt-inline");
    let pod2 = Ipv4Addr::new(10, 244, 2, 2);
    let mut desired = Desired::new();
    desired.insert(fe(VIP, 80, Protocol::Tcp), service("web", &[pod2]));
    {
        let (_datapath, maps) = Datapath::load(bpffs.path(), &MapSizes::default()).expect("load");
        let mut writer = MapWriter::new(maps).expect("writer");
        let first = writer.sync(&desired);
        assert!(first.errors.is_empty(), "first sync: {:?}", first.errors);
        // The master's copy names another endpoint than its slot 1.
        let key = service_key(fe(VIP, 80, Protocol::Tcp), 0);
        let mut pins = Maps::from_pins(&maps_pin_dir(bpffs.path())).expect("the pinned maps");
        let mut master = pins.services.get(&key, 0).expect("the master entry");
        master.inline[0].addr = u32::from_ne_bytes(POD.octets());
        pins.services
            .insert(key, master, 0)
            .expect("writing the stale copy");
    }
    let (datapath, maps) = Datapath::load(bpffs.path(), &MapSizes::default()).expect("reload");
    let mut writer = MapWriter::new(maps).expect("writer after restart");
    let resumed = writer.sync(&desired);
    assert!(resumed.errors.is_empty(), "resync: {:?}", resumed.errors);
    assert!(resumed.writes > 0, "the damaged port is written again");
    let frame = Spec::tcp((CLIENT, 45000), (VIP, 80), SYN).build();
    let mut out = vec![0u8; 2048];
    let result = datapath
        .program()
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    assert_eq!(
        Parsed::new(&out).dst,
        pod2,
        "a new flow reaches the slot's endpoint"
    );
}

#[test]
fn resync_without_changes_writes_nothing_and_a_restart_resumes_from_pins() {
    let bpffs = common::Bpffs::new("rdt-resync");
    let mut desired = Desired::new();
    desired.insert(
        fe(VIP, 80, Protocol::Tcp),
        service("web", &[POD, Ipv4Addr::new(10, 244, 2, 2)]),
    );
    desired.insert(fe(VIP_EMPTY, 80, Protocol::Tcp), service("empty", &[]));
    {
        let (_datapath, maps) = Datapath::load(bpffs.path(), &MapSizes::default()).expect("load");
        let mut writer = MapWriter::new(maps).expect("writer");
        let first = writer.sync(&desired);
        assert!(first.errors.is_empty(), "first sync: {:?}", first.errors);
        assert_eq!(
            first.writes,
            2 + 3 + 1 + 2 + 2,
            "backends, web's slots+master, empty's master, addresses, one record per port on first sync"
        );
        let again = writer.sync(&desired);
        assert_eq!(
            (again.writes, again.deletes),
            (0, 0),
            "a resync that changes nothing touches no entry"
        );
    }
    // A new agent on the same pins: same programmed state, nothing rewritten.
    let (_datapath, maps) = Datapath::load(bpffs.path(), &MapSizes::default()).expect("reload");
    let mut writer = MapWriter::new(maps).expect("writer after restart");
    assert_eq!(
        writer.programmed().keys().copied().collect::<Vec<_>>(),
        desired.keys().copied().collect::<Vec<_>>(),
        "the restarted writer sees what was programmed"
    );
    let resumed = writer.sync(&desired);
    assert_eq!(
        (resumed.writes, resumed.deletes),
        (0, 0),
        "a restart with the same services touches no entry"
    );

    // Removing one endpoint rewrites only what it must.
    desired.insert(fe(VIP, 80, Protocol::Tcp), service("web", &[POD]));
    let shrink = writer.sync(&desired);
    assert!(shrink.errors.is_empty(), "shrink: {:?}", shrink.errors);
    assert_eq!(
        shrink.writes, 2,
        "only the master count and the agent's record change (the kept endpoint stays in slot 1)"
    );
    assert_eq!(shrink.deletes, 2, "the freed slot and its backend are deleted");
}

#[test]
fn a_full_map_names_the_service_that_did_not_fit_and_the_rest_keeps_working() {
    let bpffs = common::Bpffs::new("rdt-full");
    // Room for one service port with two endpoints (master + 2 slots) only.
    let sizes = MapSizes {
        services: 3,
        ..MapSizes::default()
    };
    let (datapath, maps) = Datapath::load(bpffs.path(), &sizes).expect("load");
    let mut writer = MapWriter::new(maps).expect("writer");
    let mut desired = Desired::new();
    desired.insert(fe(VIP, 80, Protocol::Tcp), service("fits", &[POD]));
    desired.insert(
        fe(VIP_EMPTY, 80, Protocol::Tcp),
        service("too-big", &[POD, CLIENT]),
    );
    let report = writer.sync(&desired);
    assert_eq!(
        report.errors.len(),
        1,
        "one service does not fit: {:?}",
        report.errors
    );
    let message = report.errors[0].to_string();
    assert!(
        message.contains("default/too-big:http") && message.contains("SVC_V3") && message.contains("full"),
        "the error names the service and the map: {message}"
    );
    assert_eq!(
        writer.programmed().keys().copied().collect::<Vec<_>>(),
        vec![fe(VIP, 80, Protocol::Tcp)],
        "only the service that fit is programmed, nothing half-written"
    );
    let h = Harness {
        bpffs,
        datapath,
        writer,
    };
    let (_, out) = h.run(&Spec::tcp((CLIENT, 40000), (VIP, 80), SYN).build());
    assert_eq!(Parsed::new(&out).dst, POD, "the service that fit works");
}

#[test]
fn new_ports_written_in_batches_fall_back_one_by_one_when_a_map_fills() {
    let bpffs = common::Bpffs::new("rdt-batch");
    // Twenty new ports of three entries each (master + 2 slots); room for ten.
    let sizes = MapSizes {
        services: 31,
        ..MapSizes::default()
    };
    let (datapath, maps) = Datapath::load(bpffs.path(), &sizes).expect("load");
    let mut writer = MapWriter::new(maps).expect("writer");
    let vip = |i: u8| Ipv4Addr::new(10, 96, 1, i);
    let mut desired = Desired::new();
    for i in 1..=20u8 {
        let endpoints = [Ipv4Addr::new(10, 244, 3, i), Ipv4Addr::new(10, 244, 4, i)];
        desired.insert(
            fe(vip(i), 80, Protocol::Tcp),
            service(&format!("svc-{i}"), &endpoints),
        );
    }
    let report = writer.sync(&desired);
    assert_eq!(
        report.errors.len(),
        10,
        "ten ports do not fit: {:?}",
        report.errors
    );
    for (error, i) in report.errors.iter().zip(11..) {
        let message = error.to_string();
        assert!(
            message.contains(&format!("default/svc-{i}:http")) && message.contains("is full"),
            "the error names the port that did not fit and the full map: {message}"
        );
    }
    let programmed: Vec<Frontend> = writer.programmed().keys().copied().collect();
    let want: Vec<Frontend> = (1..=10).map(|i| fe(vip(i), 80, Protocol::Tcp)).collect();
    assert_eq!(programmed, want, "the first ten are programmed, in order");
    let maps = writer.maps();
    assert_eq!(
        maps.services.keys().count(),
        30,
        "no slot or master of a port that failed is left"
    );
    assert_eq!(
        maps.backends.keys().count(),
        20,
        "no backend of a port that failed is left"
    );
    assert_eq!(maps.meta.keys().count(), 10, "one record per programmed port");
    assert_eq!(
        report.writes,
        10 * (2 + 3 + 1) + 20 + 10 * 3,
        "backends, slots+master and a record per programmed port, every address, and for each \
         port that failed its backends and first slot (written, then undone)"
    );
    assert_eq!(
        maps.vips.keys().count(),
        10,
        "addresses of ports that failed are withdrawn"
    );
    let h = Harness {
        bpffs,
        datapath,
        writer,
    };
    for i in [1u8, 10] {
        let (_, out) = h.run(&Spec::tcp((CLIENT, 40000 + u16::from(i)), (vip(i), 80), SYN).build());
        let dst = Parsed::new(&out).dst;
        assert!(
            [Ipv4Addr::new(10, 244, 3, i), Ipv4Addr::new(10, 244, 4, i)].contains(&dst),
            "service {i} sends to one of its endpoints, not {dst}"
        );
    }
}

#[test]
fn every_service_range_up_to_the_count_drops_its_unused_addresses() {
    let mut h = Harness::new();
    let ranges: Vec<Ipv4Cidr> = [
        "10.96.0.0/12",
        "10.200.0.0/16",
        "172.20.0.0/16",
        "192.168.100.0/24",
    ]
    .iter()
    .map(|r| r.parse().expect("test range"))
    .collect();
    assert_eq!(ranges.len(), MAX_SERVICE_CIDRS, "the test fills the datapath");
    let probe = |h: &Harness, name: &'static str, to: Ipv4Addr, expect: Expect, counter: u32| {
        check(
            h,
            Case {
                name,
                frame: Spec::tcp((CLIENT, 40100), (to, 80), SYN).build(),
                expect,
                counter,
            },
        );
    };
    let last = Ipv4Addr::new(192, 168, 100, 7);
    h.writer.set_service_cidrs(&ranges).expect("four ranges");
    probe(
        &h,
        "first range",
        UNALLOCATED,
        Expect::Dropped,
        counters::DROP_UNALLOCATED_IP,
    );
    probe(
        &h,
        "last range",
        last,
        Expect::Dropped,
        counters::DROP_UNALLOCATED_IP,
    );
    probe(
        &h,
        "outside every range",
        OUTSIDE,
        Expect::Untouched,
        counters::PASS_NOT_SERVICE,
    );

    // Only the first `count` ranges count.
    h.writer.set_service_cidrs(&ranges[..3]).expect("three ranges");
    probe(
        &h,
        "a range beyond the count",
        last,
        Expect::Untouched,
        counters::PASS_NOT_SERVICE,
    );
    h.writer.set_service_cidrs(&[]).expect("no range");
    probe(
        &h,
        "no range",
        UNALLOCATED,
        Expect::Untouched,
        counters::PASS_NOT_SERVICE,
    );
    probe(
        &h,
        "a service address without a range",
        VIP_EMPTY,
        Expect::Refused { from: VIP_EMPTY },
        counters::REFUSED_NO_ENDPOINTS,
    );
    let too_many = [ranges.as_slice(), &ranges[..1]].concat();
    assert!(
        h.writer.set_service_cidrs(&too_many).is_err(),
        "more ranges than the datapath holds are refused"
    );
}

/// A TCP handshake from `client` through `vip`:80 to `POD:8080`, checked.
fn handshake(h: &Harness, client: (Ipv4Addr, u16), vip: Ipv4Addr, what: &str) {
    let pod = (POD, 8080);
    for (hook, case) in [
        (
            Hook::FromPod,
            Case {
                name: "handshake: SYN",
                frame: Spec::tcp(client, (vip, 80), SYN).build(),
                expect: Expect::Translated {
                    src: client,
                    dst: pod,
                },
                counter: counters::FORWARD_NEW_FLOW,
            },
        ),
        (
            Hook::ToPod,
            Case {
                name: "handshake: SYN-ACK",
                frame: Spec::tcp(pod, client, SYN | ACK).build(),
                expect: Expect::Translated {
                    src: (vip, 80),
                    dst: client,
                },
                counter: counters::REPLY_TRANSLATED,
            },
        ),
        (
            Hook::FromPod,
            Case {
                name: "handshake: ACK",
                frame: Spec::tcp(client, (vip, 80), ACK).build(),
                expect: Expect::Translated {
                    src: client,
                    dst: pod,
                },
                counter: counters::FORWARD_ESTABLISHED,
            },
        ),
    ] {
        check_on(
            h,
            hook,
            Case {
                name: Box::leak(format!("{what}: {}", case.name).into_boxed_str()),
                ..case
            },
        );
    }
}

/// The endpoint's next segment to `client`, entering the client pod, comes
/// from `vip`:80.
fn replies_come_from(h: &Harness, client: (Ipv4Addr, u16), vip: Ipv4Addr, name: &'static str) {
    check_on(
        h,
        Hook::ToPod,
        Case {
            name,
            frame: Spec::tcp((POD, 8080), client, ACK).build(),
            expect: Expect::Translated {
                src: (vip, 80),
                dst: client,
            },
            counter: counters::REPLY_TRANSLATED,
        },
    );
}

/// Both sides send FIN: the flow is over (TIME_WAIT for nf_conntrack).
fn close_with_fins(h: &Harness, client: (Ipv4Addr, u16), vip: Ipv4Addr) {
    check(
        h,
        Case {
            name: "the client's FIN",
            frame: Spec::tcp(client, (vip, 80), FIN | ACK).build(),
            expect: Expect::Translated {
                src: client,
                dst: (POD, 8080),
            },
            counter: counters::FORWARD_ESTABLISHED,
        },
    );
    check_on(
        h,
        Hook::ToPod,
        Case {
            name: "the endpoint's FIN",
            frame: Spec::tcp((POD, 8080), client, FIN | ACK).build(),
            expect: Expect::Translated {
                src: (vip, 80),
                dst: client,
            },
            counter: counters::REPLY_TRANSLATED,
        },
    );
}

/// A new flow never takes over a live flow's entries: a SYN to another
/// service whose endpoint is the same pod, from a client port whose flow is
/// open, would need the same reply entry. It is dropped (nf_conntrack drops
/// a flow whose reply tuple is taken), and the open flow is untouched.
#[test]
fn a_new_flow_never_overwrites_a_live_one() {
    let h = Harness::new();
    let client = (CLIENT, 43000);
    handshake(&h, client, VIP, "the open flow");
    check(
        &h,
        Case {
            name: "a SYN that would take the open flow's reply entry is dropped",
            frame: Spec::tcp(client, (VIP_SHARED, 80), SYN).build(),
            expect: Expect::Dropped,
            counter: counters::DROP_CT_CLASH,
        },
    );
    replies_come_from(
        &h,
        client,
        VIP,
        "the open flow's replies still come from its own service",
    );
}

/// Once a flow closed, its entries give way: two services sharing a pod,
/// used in turn from one client port, each answer from their own address,
/// and so does the first again.
#[test]
fn a_closed_flow_gives_way_to_the_next_on_its_tuple() {
    let h = Harness::new();
    let client = (CLIENT, 43100);
    handshake(&h, client, VIP, "first service");
    close_with_fins(&h, client, VIP);
    handshake(&h, client, VIP_SHARED, "second service, same client port");
    close_with_fins(&h, client, VIP_SHARED);
    handshake(&h, client, VIP, "first service again");
    let entries = h.writer.maps().conntrack.iter().filter_map(Result::ok).count();
    assert_eq!(
        entries, 3,
        "each service's forward entry and one reply entry (both flows' replies have the same tuple; \
         the latest flow holds it): nothing else is left behind"
    );
}

/// A direct connection to the pod from a client port that just carried a
/// service flow to it: the pod's SYN-ACK matches the old flow's reply entry,
/// which is stale once that flow closed; it must not be made to look like
/// the service's.
#[test]
fn a_direct_connection_after_a_service_flow_is_left_alone() {
    let h = Harness::new();
    let client = (CLIENT, 43200);
    handshake(&h, client, VIP, "the service flow");
    check(
        &h,
        Case {
            name: "the client resets the service flow",
            frame: Spec::tcp(client, (VIP, 80), RST).build(),
            expect: Expect::Translated {
                src: client,
                dst: (POD, 8080),
            },
            counter: counters::FORWARD_ESTABLISHED,
        },
    );
    let cases = [
        (
            Hook::FromPod,
            Case {
                name: "a direct SYN to the pod is not service traffic",
                frame: Spec::tcp(client, (POD, 8080), SYN).build(),
                expect: Expect::Untouched,
                counter: counters::PASS_NOT_SERVICE,
            },
        ),
        (
            Hook::ToPod,
            Case {
                name: "the pod's SYN-ACK into the client is not translated, and the stale entry goes",
                frame: Spec::tcp((POD, 8080), client, SYN | ACK).build(),
                expect: Expect::Untouched,
                counter: counters::PASS_STALE_REPLY,
            },
        ),
        (
            Hook::ToPod,
            Case {
                name: "the pod's next segments pass as they are",
                frame: Spec::tcp((POD, 8080), client, ACK).build(),
                expect: Expect::Untouched,
                counter: counters::PASS_TO_POD,
            },
        ),
    ];
    for (hook, case) in cases {
        check_on(&h, hook, case);
    }
}

/// A SYN without ACK opens a connection and is never a reply: one from the
/// endpoint to a client port whose service flow is open (the endpoint
/// connecting back, from its service port) is a new direct connection, left
/// as it is on its way out and into the client, and the open flow's replies
/// still translate.
#[test]
fn a_syn_is_never_taken_for_a_reply() {
    let h = Harness::new();
    let client = (CLIENT, 43300);
    handshake(&h, client, VIP, "the open flow");
    for hook in [Hook::FromPod, Hook::ToPod] {
        check_on(
            &h,
            hook,
            Case {
                name: "a SYN from the endpoint to the open flow's client port passes as it is",
                frame: Spec::tcp((POD, 8080), client, SYN).build(),
                expect: Expect::Untouched,
                counter: match hook {
                    Hook::FromPod => counters::PASS_NOT_SERVICE,
                    Hook::ToPod => counters::PASS_TO_POD,
                },
            },
        );
    }
    replies_come_from(
        &h,
        client,
        VIP,
        "the open flow's replies still come from its service",
    );
}

/// `sessionAffinity: ClientIP`: a client's new connections keep the
/// endpoint its last one used, until the endpoint leaves or the client
/// opened none for the timeout; other clients pick on their own.
#[test]
fn session_affinity_keeps_a_client_on_its_endpoint() {
    let h = Harness::new();
    let pod_2 = Ipv4Addr::new(10, 244, 1, 3);
    let sticky = |timeout_seconds: u32, endpoints: &[Ipv4Addr]| ServicePort {
        no_endpoints: Default::default(),
        affinity: Some(ClientIpAffinity { timeout_seconds }),
        also_serving: Vec::new(),
        info: Default::default(),
        name: ServicePortName {
            namespace: "default".into(),
            name: format!("sticky-{timeout_seconds}"),
            port: "p".into(),
        },
        endpoints: endpoints
            .iter()
            .map(|addr| Endpoint {
                addr: *addr,
                port: 8080,
            })
            .collect(),
    };
    let (long, short) = (Ipv4Addr::new(10, 96, 0, 30), Ipv4Addr::new(10, 96, 0, 31));
    let program = |desired: &[(Ipv4Addr, ServicePort)]| {
        let mut writer = MapWriter::new(Maps::from_pins(&maps_pin_dir(h.bpffs.path())).expect("pinned maps"))
            .expect("a second writer");
        let desired: Desired = desired
            .iter()
            .map(|(vip, port)| (fe(*vip, 80, Protocol::Tcp), port.clone()))
            .collect();
        let report = writer.sync(&desired);
        assert!(report.errors.is_empty(), "programming: {:?}", report.errors);
    };
    program(&[
        (long, sticky(10_800, &[POD, pod_2])),
        (short, sticky(1, &[POD, pod_2])),
    ]);

    let endpoint_of = |client: Ipv4Addr, port: u16, vip: Ipv4Addr| -> Ipv4Addr {
        let (verdict, out) = h.run(&Spec::tcp((client, port), (vip, 80), SYN).build());
        assert_eq!(
            verdict, TC_ACT_UNSPEC,
            "a SYN to {vip} from {client}:{port} is let through"
        );
        Parsed::new(&out).dst
    };
    let first = endpoint_of(CLIENT, 50000, long);
    for port in 50001..50020 {
        assert_eq!(
            endpoint_of(CLIENT, port, long),
            first,
            "connection from port {port} keeps {first}"
        );
    }
    let explained = explain::run(
        h.bpffs.path(),
        "10.244.0.5:50100".parse().unwrap(),
        "10.96.0.30:80".parse().unwrap(),
        Protocol::Tcp,
    )
    .expect("explain");
    assert!(explained.affinity, "explain says affinity chose");
    assert_eq!(
        explained.rewritten_to.map(|a| *a.ip()),
        Some(first),
        "explain names the same endpoint"
    );

    // The endpoint leaves: the client moves to the other and stays there.
    let other = if first == POD { pod_2 } else { POD };
    program(&[
        (long, sticky(10_800, &[other])),
        (short, sticky(1, &[POD, pod_2])),
    ]);
    assert_eq!(
        endpoint_of(CLIENT, 50030, long),
        other,
        "moved off the removed endpoint"
    );
    program(&[
        (long, sticky(10_800, &[POD, pod_2])),
        (short, sticky(1, &[POD, pod_2])),
    ]);
    for port in 50031..50040 {
        assert_eq!(
            endpoint_of(CLIENT, port, long),
            other,
            "connection from port {port} stays on {other}"
        );
    }

    // A one-second timeout: affinity decides at once, not once it passed.
    let _ = endpoint_of(CLIENT, 50200, short);
    let from = "10.244.0.5:50201".parse().unwrap();
    let to = "10.96.0.31:80".parse().unwrap();
    assert!(
        explain::run(h.bpffs.path(), from, to, Protocol::Tcp)
            .expect("explain")
            .affinity,
        "within the timeout"
    );
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    assert!(
        !explain::run(h.bpffs.path(), from, to, Protocol::Tcp)
            .expect("explain")
            .affinity,
        "after the timeout: a fresh pick"
    );
}

/// ICMP errors about a translated flow reach its client as if the service
/// had been the peer: the quoted packet's destination is the service again
/// (so the client's kernel matches its socket), and so is the outer source
/// when the endpoint itself sent the error. Whether the error leaves a local
/// endpoint pod or enters the client pod.
#[test]
fn icmp_errors_about_a_flow_reach_its_client_translated() {
    let h = Harness::new();
    let router = Ipv4Addr::new(192, 0, 2, 1);
    check(
        &h,
        Case {
            name: "a UDP flow to the service",
            frame: Spec::udp((CLIENT, 41500), (VIP, 53), b"query").build(),
            expect: Expect::Translated {
                src: (CLIENT, 41500),
                dst: (POD, 5353),
            },
            counter: counters::FORWARD_NEW_FLOW,
        },
    );
    // The datagram as the endpoint got it: what its ICMP error quotes.
    let delivered = Spec::udp((CLIENT, 41500), (POD, 5353), b"query").build();
    let quote = &delivered[14..];
    let cases = [
        ("the endpoint's port unreachable", POD, (3, 3), [0; 4], VIP),
        (
            "a router's fragmentation needed",
            router,
            (3, 4),
            [0, 0, 0x05, 0x00],
            router,
        ),
        ("a router's time exceeded", router, (11, 0), [0; 4], router),
    ];
    for (hook, place) in [
        (Hook::FromPod, "leaving the endpoint pod"),
        (Hook::ToPod, "entering the client pod"),
    ] {
        for (what, from, kind, rest, outer_source) in cases {
            let name = format!("{what}, {place}");
            let before = h.counters();
            let (verdict, out) = h
                .try_run(hook, &icmp_error(from, CLIENT, kind, rest, quote))
                .expect("BPF_PROG_TEST_RUN");
            assert_eq!(verdict, TC_ACT_UNSPEC, "{name}: let through");
            assert_eq!(
                h.counters()[counters::ICMP_ERROR_TRANSLATED as usize]
                    - before[counters::ICMP_ERROR_TRANSLATED as usize],
                1,
                "{name}: counted"
            );
            let outer = Parsed::new(&out);
            assert_eq!(
                (outer.src, outer.dst),
                (outer_source, CLIENT),
                "{name}: outer addresses"
            );
            assert_checksums(&out, &name);
            let (inner, sport, dport) = quoted(&out);
            assert_eq!(
                (Ipv4Addr::from(inner.source), sport),
                (CLIENT, 41500),
                "{name}: the quoted source is the client's"
            );
            assert_eq!(
                (Ipv4Addr::from(inner.destination), dport),
                (VIP, 53),
                "{name}: the quoted destination is the service"
            );
            assert_eq!(
                inner.header_checksum,
                inner.calc_header_checksum(),
                "{name}: quoted header checksum"
            );
        }
    }
    // An error about a flow the table does not hold passes as it is.
    let stranger = Spec::udp((CLIENT, 41501), (POD, 5353), b"query").build();
    let frame = icmp_error(POD, CLIENT, (3, 3), [0; 4], &stranger[14..]);
    check_on(
        &h,
        Hook::ToPod,
        Case {
            name: "an ICMP error about no translated flow",
            frame,
            expect: Expect::Untouched,
            counter: counters::PASS_NOT_TCP_UDP,
        },
    );
}

/// A datagram larger than the MTU, both ways: the first fragment carries the
/// ports and opens (or follows) the flow; the later one, which has none, is
/// translated from the ports the first left behind. Reassembled, each
/// datagram has the translated addresses and ports and a valid checksum.
#[test]
fn fragmented_datagrams_are_translated_both_ways() {
    let h = Harness::new();
    let payload = vec![7u8; 3000];
    let request = Spec::udp((CLIENT, 41600), (VIP, 53), &payload).build();
    let reply = Spec::udp((POD, 5353), (CLIENT, 41600), &payload).build();
    let cases = [
        (
            "a 3000-byte request",
            Hook::FromPod,
            request,
            ((CLIENT, 41600), (POD, 5353)),
            [counters::FORWARD_NEW_FLOW, counters::FORWARD_ESTABLISHED],
        ),
        (
            "a 3000-byte reply, entering the client pod",
            Hook::ToPod,
            reply,
            ((VIP, 53), (CLIENT, 41600)),
            [counters::REPLY_TRANSLATED; 2],
        ),
    ];
    for (what, hook, datagram, (src, dst), counted) in cases {
        let [first, later] = fragments(&datagram, 1480);
        let mut out = Vec::new();
        for (frame, counter, which) in [(first, counted[0], "first"), (later, counted[1], "later")] {
            let before = h.counters();
            let (verdict, translated) = h.try_run(hook, &frame).expect("BPF_PROG_TEST_RUN");
            assert_eq!(verdict, TC_ACT_UNSPEC, "{what}: {which} fragment let through");
            assert_eq!(
                h.counters()[counter as usize] - before[counter as usize],
                1,
                "{what}: {which} fragment counted as {}",
                counters::LABELS[counter as usize]
            );
            out.push(translated);
        }
        let whole = reassemble(&out[0], &out[1]);
        let p = Parsed::new(&whole);
        assert_eq!(
            ((p.src, p.sport), (p.dst, p.dport)),
            (src, dst),
            "{what}: translated"
        );
        assert_checksums(&whole, what);
    }
}

/// An upgrade that changed a map's layout leaves the old version's pin
/// behind (`CT_V1` when the table became `CT_V2`); the next load removes it,
/// and keeps every pin of the maps it uses.
#[test]
fn a_load_removes_pins_of_older_map_layouts() {
    let bpffs = common::Bpffs::new("rdt-stale");
    let dir = maps_pin_dir(bpffs.path());
    drop(Datapath::load(bpffs.path(), &MapSizes::default()).expect("first load"));
    // An older layout's pin: a real pinned map under another version's name.
    std::fs::rename(dir.join("AFFINITY_V1"), dir.join("AFFINITY_V0")).expect("renaming a pin");
    drop(Datapath::load(bpffs.path(), &MapSizes::default()).expect("second load"));
    assert!(
        !dir.join("AFFINITY_V0").exists(),
        "the older layout's pin is gone"
    );
    for name in ["AFFINITY_V1", "CT_V2", "SVC_V3", "COUNTERS_V3"] {
        assert!(dir.join(name).exists(), "{name} is pinned");
    }
}
