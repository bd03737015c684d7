//! The redirector agent and CLI.

/// The compiled eBPF object, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector"));

pub mod agent;
pub mod cli;
pub mod datapath;
pub mod inspect;
pub mod interfaces;
pub mod metrics;
pub mod model;
pub mod source;
