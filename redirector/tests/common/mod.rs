//! Shared test support: packets for the datapath tests; the netns test bed
//! is the `testbed` crate (test/testbed), shared with the demo and the benchmark.
#![allow(
    dead_code,
    reason = "each test binary uses its own part of the shared support"
)]

pub mod manifests;
pub mod packet;

use std::path::Path;

pub use testbed::*;

/// The agent binary built for these tests.
pub fn agent_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_redirector"))
}
