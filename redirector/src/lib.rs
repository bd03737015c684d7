//! The redirector agent: datapath, sources of services, model, metrics.
//! The CLI (src/cli/) is the binary's own.

/// The compiled eBPF object, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirector"));

pub mod agent;
pub mod conntrack;
pub mod datapath;
pub mod error;
pub mod interfaces;
pub mod metrics;
pub mod model;
pub mod source;
