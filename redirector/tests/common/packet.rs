//! Ethernet/IPv4/TCP/UDP frames built and read back with etherparse, so
//! datapath tests state exactly what goes in and what must come out.

use std::net::Ipv4Addr;

use etherparse::{
    Icmpv4Type, IpFragOffset, IpHeaders, IpNumber, Ipv4Header, LinkSlice, NetSlice, PacketBuilder,
    SlicedPacket, TcpHeader, TransportSlice, UdpHeader,
};

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const TCP: u8 = IpNumber::TCP.0;
pub const UDP: u8 = IpNumber::UDP.0;
pub const ICMP: u8 = IpNumber::ICMP.0;
/// TCP flag bits as they sit in the header's flags byte.
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

// The IPv4 flags+fragment offset field, as `Spec::frag` carries it.
const DONT_FRAGMENT: u16 = 0x4000;
const MORE_FRAGMENTS: u16 = 0x2000;
const FRAGMENT_OFFSET: u16 = 0x1fff;

#[derive(Clone, Debug)]
pub struct Spec {
    pub proto: u8,
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    /// SYN and/or ACK.
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    /// Raw IPv4 options (length a multiple of 4).
    pub ip_options: Vec<u8>,
    /// Flags+fragment offset field, host order (0x2000 = more fragments).
    pub frag: u16,
    /// UDP only: send a zero ("none") checksum.
    pub udp_zero_checksum: bool,
}

impl Spec {
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Self {
        Self {
            proto: TCP,
            src,
            dst,
            tcp_flags: flags,
            payload: Vec::new(),
            ip_options: Vec::new(),
            frag: 0,
            udp_zero_checksum: false,
        }
    }

    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Self {
        Self {
            proto: UDP,
            payload: payload.to_vec(),
            ..Self::tcp(src, dst, 0)
        }
    }

    /// The frame, with valid IPv4 and TCP/UDP checksums (bar a requested zero
    /// UDP checksum).
    pub fn build(&self) -> Vec<u8> {
        assert_eq!(
            self.frag & !(DONT_FRAGMENT | MORE_FRAGMENTS | FRAGMENT_OFFSET),
            0,
            "the reserved IPv4 flag cannot be built"
        );
        let ip = Ipv4Header {
            identification: 0x1234,
            dont_fragment: self.frag & DONT_FRAGMENT != 0,
            more_fragments: self.frag & MORE_FRAGMENTS != 0,
            fragment_offset: IpFragOffset::try_new(self.frag & FRAGMENT_OFFSET).unwrap(),
            time_to_live: 64,
            source: self.src.0.octets(),
            destination: self.dst.0.octets(),
            options: self
                .ip_options
                .as_slice()
                .try_into()
                .expect("IPv4 options: at most 40 bytes, a multiple of 4"),
            ..Default::default()
        };
        let ip = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC).ip(IpHeaders::Ipv4(ip, Default::default()));
        let mut frame = Vec::new();
        match self.proto {
            TCP => {
                assert_eq!(
                    self.tcp_flags & !(FIN | SYN | RST | ACK),
                    0,
                    "only FIN, SYN, RST and ACK can be built"
                );
                let mut tcp = TcpHeader::new(self.src.1, self.dst.1, 1000, 64240);
                tcp.fin = self.tcp_flags & FIN != 0;
                tcp.syn = self.tcp_flags & SYN != 0;
                tcp.rst = self.tcp_flags & RST != 0;
                tcp.ack = self.tcp_flags & ACK != 0;
                if tcp.ack {
                    tcp.acknowledgment_number = 2000;
                }
                ip.tcp_header(tcp).write(&mut frame, &self.payload)
            }
            // The builder always fills in the UDP checksum; a datagram without
            // one (zero, allowed over IPv4) goes in as the IP payload instead.
            UDP if self.udp_zero_checksum => {
                let udp = UdpHeader {
                    source_port: self.src.1,
                    destination_port: self.dst.1,
                    length: (UdpHeader::LEN + self.payload.len()) as u16,
                    checksum: 0,
                };
                let datagram = [&udp.to_bytes()[..], &self.payload].concat();
                ip.write(&mut frame, IpNumber::UDP, &datagram)
            }
            UDP => ip.udp(self.src.1, self.dst.1).write(&mut frame, &self.payload),
            other => panic!("cannot build IP protocol {other}"),
        }
        .expect("build frame");
        frame
    }
}

/// A received Ethernet/IPv4 frame carrying TCP, UDP or ICMP, read back.
#[derive(Debug)]
pub struct Parsed<'a> {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// TCP/UDP ports; zero for ICMP.
    pub sport: u16,
    pub dport: u16,
    /// Offset of the TCP/UDP/ICMP header in the frame.
    pub l4: usize,
    pub ip_hlen: usize,
    ip: Ipv4Header,
    transport: TransportSlice<'a>,
}

impl<'a> Parsed<'a> {
    pub fn new(frame: &'a [u8]) -> Self {
        let packet = SlicedPacket::from_ethernet(frame).expect("an Ethernet frame");
        let Some(LinkSlice::Ethernet2(eth)) = &packet.link else {
            panic!("an Ethernet II frame: {packet:?}");
        };
        let Some(NetSlice::Ipv4(ipv4)) = &packet.net else {
            panic!("an IPv4 packet: {packet:?}");
        };
        let ip = ipv4.header().to_header();
        let transport = packet
            .transport
            .clone()
            .unwrap_or_else(|| panic!("a TCP, UDP or ICMP header: {packet:?}"));
        let (sport, dport) = match &transport {
            TransportSlice::Tcp(tcp) => (tcp.source_port(), tcp.destination_port()),
            TransportSlice::Udp(udp) => (udp.source_port(), udp.destination_port()),
            _ => (0, 0),
        };
        Self {
            dst_mac: eth.destination(),
            src_mac: eth.source(),
            proto: ip.protocol.0,
            src: ip.source.into(),
            dst: ip.destination.into(),
            sport,
            dport,
            l4: eth.header_slice().len() + ip.header_len(),
            ip_hlen: ip.header_len(),
            ip,
            transport,
        }
    }
}

/// Asserts the IPv4 header checksum and the TCP/UDP/ICMP checksum verify.
pub fn assert_checksums(frame: &[u8], case: &str) {
    let p = Parsed::new(frame);
    assert_eq!(
        p.ip.header_checksum,
        p.ip.calc_header_checksum(),
        "{case}: IPv4 header checksum"
    );
    let (src, dst) = (p.ip.source, p.ip.destination);
    match &p.transport {
        TransportSlice::Icmpv4(icmp) => {
            // Summed over the raw bytes 5-8: etherparse's typed port
            // unreachable drops them, yet the checksum covers them.
            let raw = Icmpv4Type::Unknown {
                type_u8: icmp.type_u8(),
                code_u8: icmp.code_u8(),
                bytes5to8: icmp.bytes5to8(),
            };
            assert_eq!(
                icmp.checksum(),
                raw.calc_checksum(icmp.payload()),
                "{case}: ICMP checksum"
            );
        }
        TransportSlice::Udp(udp) if udp.checksum() == 0 => {}
        TransportSlice::Udp(udp) => {
            let expect = udp.to_header().calc_checksum_ipv4_raw(src, dst, udp.payload());
            assert_eq!(udp.checksum(), expect.unwrap(), "{case}: L4 checksum");
        }
        TransportSlice::Tcp(tcp) => {
            let expect = tcp.calc_checksum_ipv4(src, dst);
            assert_eq!(tcp.checksum(), expect.unwrap(), "{case}: L4 checksum");
        }
        other => panic!("{case}: unexpected transport {other:?}"),
    }
}

/// An ICMP error from `from` to `to` of `type_u8`/`code_u8` (bytes 5-8 as
/// given: the next-hop MTU of a fragmentation-needed), quoting `quoted` (an
/// IPv4 packet without its Ethernet header), as a host's kernel sends it.
pub fn icmp_error(
    from: Ipv4Addr,
    to: Ipv4Addr,
    (type_u8, code_u8): (u8, u8),
    bytes5to8: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(NODE_MAC, CLIENT_MAC)
        .ipv4(from.octets(), to.octets(), 64)
        .icmpv4(Icmpv4Type::Unknown {
            type_u8,
            code_u8,
            bytes5to8,
        })
        .write(&mut frame, quoted)
        .expect("an ICMP error frame");
    frame
}

/// The IPv4 header and the ports an ICMP error in `frame` quotes.
pub fn quoted(frame: &[u8]) -> (Ipv4Header, u16, u16) {
    let p = Parsed::new(frame);
    let inner = &frame[p.l4 + 8..];
    let (header, rest) = Ipv4Header::from_slice(inner).expect("a quoted IPv4 header");
    let sport = u16::from_be_bytes([rest[0], rest[1]]);
    let dport = u16::from_be_bytes([rest[2], rest[3]]);
    (header, sport, dport)
}

/// `frame` (Ethernet + IPv4 without options) cut in two IP fragments, the
/// first carrying `first_len` bytes of the IP payload (a multiple of 8), as
/// a sender's kernel fragments a datagram larger than the path MTU.
pub fn fragments(frame: &[u8], first_len: usize) -> [Vec<u8>; 2] {
    assert_eq!(first_len % 8, 0, "fragment payloads are cut at 8-byte boundaries");
    let (header, payload) = Ipv4Header::from_slice(&frame[14..]).expect("an IPv4 frame");
    let payload = &payload[..header.payload_len().expect("a consistent length") as usize];
    let piece = |offset: usize, bytes: &[u8], more: bool| {
        let mut h = header.clone();
        h.more_fragments = more;
        h.fragment_offset = IpFragOffset::try_new((offset / 8) as u16).unwrap();
        h.set_payload_len(bytes.len()).unwrap();
        h.header_checksum = h.calc_header_checksum();
        [&frame[..14], &h.to_bytes()[..], bytes].concat()
    };
    [
        piece(0, &payload[..first_len], true),
        piece(first_len, &payload[first_len..], false),
    ]
}

/// The whole frame back from its two fragments (as the receiver reassembles
/// it), so its addresses, ports and checksums can be read.
pub fn reassemble(first: &[u8], later: &[u8]) -> Vec<u8> {
    let (mut header, first_payload) = Ipv4Header::from_slice(&first[14..]).expect("the first fragment");
    let (later_header, later_payload) = Ipv4Header::from_slice(&later[14..]).expect("the later fragment");
    assert_eq!(
        (header.source, header.destination),
        (later_header.source, later_header.destination),
        "both fragments carry the same addresses"
    );
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "the first fragment's header checksum"
    );
    assert_eq!(
        later_header.header_checksum,
        later_header.calc_header_checksum(),
        "the later fragment's header checksum"
    );
    let payload = [first_payload, later_payload].concat();
    header.more_fragments = false;
    header.set_payload_len(payload.len()).unwrap();
    header.header_checksum = header.calc_header_checksum();
    [&first[..14], &header.to_bytes()[..], &payload].concat()
}
