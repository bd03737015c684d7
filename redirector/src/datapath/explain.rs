//! `redirector explain`'s run: the pinned program itself, run once with
//! BPF_PROG_TEST_RUN on a synthetic first packet, in explain mode (the
//! program writes no connection entry and no counter, and reports its
//! decision in the skb's control block).

use std::net::SocketAddrV4;
use std::path::{Path, PathBuf};

use aya::programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions};
use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use redirector_common::counters;

use crate::datapath::program_pin_path;
use crate::model::Protocol;

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("no loaded program pinned at {}: is the agent running with this --bpffs?", path.display())]
    NoProgram {
        path: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("running the program on a synthetic packet (BPF_PROG_TEST_RUN)")]
    TestRun {
        #[source]
        source: ProgramError,
    },
}

/// What the program decided, read from its control block and its output frame.
#[derive(Debug)]
pub struct Explanation {
    pub verdict: u32,
    pub action: u32,
    pub backend_id: u32,
    pub slot: u32,
    pub svc_id: u32,
    /// Session affinity chose the backend (the client's last connection's).
    pub affinity: bool,
    /// Destination of the packet as the program left it; `None` when the
    /// program answered with something else (an ICMP error for a refusal).
    pub rewritten_to: Option<SocketAddrV4>,
}

/// Runs the program pinned under `bpffs` on a TCP SYN (or a small UDP
/// datagram) from `from` to `to`, in explain mode.
pub fn run(
    bpffs: &Path,
    from: SocketAddrV4,
    to: SocketAddrV4,
    protocol: Protocol,
) -> Result<Explanation, ExplainError> {
    let path = program_pin_path(bpffs);
    let program =
        SchedClassifier::from_pin(&path).map_err(|source| ExplainError::NoProgram { path, source })?;
    let frame = first_packet(from, to, protocol);
    // struct __sk_buff: `mark` at byte 8, `cb[5]` from byte 48.
    let mut ctx_in = [0u8; 192];
    ctx_in[8..12].copy_from_slice(&counters::EXPLAIN_MARK.to_ne_bytes());
    let mut ctx_out = [0u8; 192];
    let mut out = vec![0u8; 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx_in),
            ctx_out: Some(&mut ctx_out),
            ..Default::default()
        })
        .map_err(|source| ExplainError::TestRun { source })?;
    let cb = |i: usize| u32::from_ne_bytes(ctx_out[48 + 4 * i..52 + 4 * i].try_into().unwrap());
    Ok(Explanation {
        verdict: cb(counters::EXPLAIN_CB_COUNTER),
        action: result.return_value,
        backend_id: cb(counters::EXPLAIN_CB_BACKEND),
        slot: cb(counters::EXPLAIN_CB_SLOT),
        svc_id: cb(counters::EXPLAIN_CB_SVC),
        affinity: cb(counters::EXPLAIN_CB_AFFINITY) != 0,
        rewritten_to: destination(&out, protocol),
    })
}

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// A TCP SYN or a small UDP datagram, with valid checksums.
fn first_packet(from: SocketAddrV4, to: SocketAddrV4, protocol: Protocol) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ipv4(from.ip().octets(), to.ip().octets(), 64);
    let mut frame = Vec::new();
    let written = match protocol {
        Protocol::Tcp => ip
            .tcp(from.port(), to.port(), 0, 64240)
            .syn()
            .write(&mut frame, &[]),
        Protocol::Udp => ip.udp(from.port(), to.port()).write(&mut frame, b"why?"),
    };
    written.expect("a Vec takes any frame");
    frame
}

/// The destination of the frame the program left.
fn destination(frame: &[u8], protocol: Protocol) -> Option<SocketAddrV4> {
    let packet = SlicedPacket::from_ethernet(frame).ok()?;
    let ip = match packet.net? {
        etherparse::NetSlice::Ipv4(ip) => ip.header().destination_addr(),
        _ => return None,
    };
    let port = match (packet.transport?, protocol) {
        (TransportSlice::Tcp(tcp), Protocol::Tcp) => tcp.destination_port(),
        (TransportSlice::Udp(udp), Protocol::Udp) => udp.destination_port(),
        _ => return None,
    };
    Some(SocketAddrV4::new(ip, port))
}

#[cfg(test)]
mod tests {
    use etherparse::{NetSlice, TransportSlice};

    use super::*;

    #[test]
    fn synthetic_packets_are_valid_and_read_back() {
        let from: SocketAddrV4 = "10.0.0.1:40000".parse().unwrap();
        let to: SocketAddrV4 = "10.96.0.10:80".parse().unwrap();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let frame = first_packet(from, to, protocol);
            let packet = SlicedPacket::from_ethernet(&frame).expect("parses");
            let Some(NetSlice::Ipv4(ip)) = &packet.net else {
                panic!("{protocol}: not IPv4")
            };
            let header = ip.header().to_header();
            assert_eq!(
                header.header_checksum,
                header.calc_header_checksum(),
                "{protocol}: IPv4 checksum"
            );
            match (&packet.transport, protocol) {
                (Some(TransportSlice::Tcp(tcp)), Protocol::Tcp) => {
                    assert!(tcp.syn() && !tcp.ack(), "TCP: a SYN");
                    let want = tcp
                        .to_header()
                        .calc_checksum_ipv4(&header, tcp.payload())
                        .unwrap();
                    assert_eq!(tcp.checksum(), want, "TCP checksum");
                }
                (Some(TransportSlice::Udp(udp)), Protocol::Udp) => {
                    let want = udp
                        .to_header()
                        .calc_checksum_ipv4(&header, udp.payload())
                        .unwrap();
                    assert_eq!(udp.checksum(), want, "UDP checksum");
                }
                _ => panic!("{protocol}: wrong transport"),
            }
            assert_eq!(
                destination(&frame, protocol),
                Some(to),
                "{protocol}: destination read back"
            );
        }
    }
}
