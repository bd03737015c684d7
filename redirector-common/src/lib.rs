//! Types shared by the redirector eBPF programs and the agent.
//!
//! Every value stored in a BPF map is `#[repr(C)]` with explicit padding and a
//! size assertion, so kernel and user space agree on the bytes. Map names carry a
//! layout version (`_V1`): a layout change bumps it, so an agent never reads a
//! pinned map written with another layout.
#![no_std]

pub mod config;
pub mod conntrack;
pub mod counters;
pub mod service;
pub mod sock;

/// IANA protocol numbers, as they appear in the IPv4 header.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}
