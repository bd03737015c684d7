//! Building and checking Ethernet/IPv4/TCP/UDP/ICMP frames byte by byte, so
//! datapath tests state exactly what goes in and what must come out.

use std::net::Ipv4Addr;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

#[derive(Clone, Debug)]
pub struct Spec {
    pub proto: u8,
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
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

    pub fn build(&self) -> Vec<u8> {
        let ip_hlen = 20 + self.ip_options.len();
        let l4_hlen = if self.proto == TCP { 20 } else { 8 };
        let total = ip_hlen + l4_hlen + self.payload.len();
        let mut f = Vec::with_capacity(14 + total);
        f.extend_from_slice(&NODE_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.push(0x40 | (ip_hlen / 4) as u8);
        f.push(0);
        f.extend_from_slice(&(total as u16).to_be_bytes());
        f.extend_from_slice(&0x1234u16.to_be_bytes());
        f.extend_from_slice(&self.frag.to_be_bytes());
        f.push(64);
        f.push(self.proto);
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&self.src.0.octets());
        f.extend_from_slice(&self.dst.0.octets());
        f.extend_from_slice(&self.ip_options);
        let l4 = f.len();
        f.extend_from_slice(&self.src.1.to_be_bytes());
        f.extend_from_slice(&self.dst.1.to_be_bytes());
        if self.proto == TCP {
            f.extend_from_slice(&1000u32.to_be_bytes());
            f.extend_from_slice(&(if self.tcp_flags & ACK != 0 { 2000u32 } else { 0 }).to_be_bytes());
            f.push(5 << 4);
            f.push(self.tcp_flags);
            f.extend_from_slice(&64240u16.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0, 0]);
        } else {
            f.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
        }
        f.extend_from_slice(&self.payload);
        let ip_csum = checksum(&f[14..14 + ip_hlen]);
        f[24..26].copy_from_slice(&ip_csum.to_be_bytes());
        if !(self.proto == UDP && self.udp_zero_checksum) {
            let csum_at = l4 + if self.proto == TCP { 16 } else { 6 };
            let mut c = l4_checksum(&f);
            if self.proto == UDP && c == 0 {
                c = 0xffff;
            }
            f[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        }
        f
    }
}

/// Internet checksum (RFC 1071) of `data`, as a big-endian value.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

fn sum(data: &[u8]) -> u64 {
    data.chunks(2)
        .map(|c| u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// TCP/UDP checksum over pseudo-header and segment, with the checksum field
/// taken as zero.
fn l4_checksum(frame: &[u8]) -> u16 {
    let p = Parsed::new(frame);
    let mut seg = frame[p.l4..].to_vec();
    let at = if p.proto == TCP { 16 } else { 6 };
    seg[at] = 0;
    seg[at + 1] = 0;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&frame[26..34]);
    pseudo.push(0);
    pseudo.push(p.proto);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    !fold(sum(&pseudo) + sum(&seg))
}

/// A received frame, read back.
#[derive(Debug)]
pub struct Parsed {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub l4: usize,
    pub ip_hlen: usize,
}

impl Parsed {
    pub fn new(f: &[u8]) -> Self {
        let ip_hlen = usize::from(f[14] & 0x0f) * 4;
        let l4 = 14 + ip_hlen;
        Self {
            dst_mac: f[0..6].try_into().unwrap(),
            src_mac: f[6..12].try_into().unwrap(),
            proto: f[23],
            src: Ipv4Addr::new(f[26], f[27], f[28], f[29]),
            dst: Ipv4Addr::new(f[30], f[31], f[32], f[33]),
            sport: u16::from_be_bytes([f[l4], f[l4 + 1]]),
            dport: u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]),
            l4,
            ip_hlen,
        }
    }
}

/// Asserts the IPv4 header checksum and the TCP/UDP/ICMP checksum verify.
pub fn assert_checksums(frame: &[u8], case: &str) {
    let p = Parsed::new(frame);
    assert_eq!(
        checksum(&frame[14..14 + p.ip_hlen]),
        0,
        "{case}: IPv4 header checksum"
    );
    match p.proto {
        ICMP => assert_eq!(checksum(&frame[p.l4..]), 0, "{case}: ICMP checksum"),
        UDP if frame[p.l4 + 6..p.l4 + 8] == [0, 0] => {}
        _ => {
            let stored = u16::from_be_bytes([
                frame[p.l4 + if p.proto == TCP { 16 } else { 6 }],
                frame[p.l4 + if p.proto == TCP { 17 } else { 7 }],
            ]);
            let mut expect = l4_checksum(frame);
            if p.proto == UDP && expect == 0 {
                expect = 0xffff;
            }
            assert_eq!(stored, expect, "{case}: L4 checksum");
        }
    }
}
