//! Shared test support: packets for the datapath tests; the netns test bed
//! lives in the library (`redirector::testbed`) so the demo can use it too.
#![allow(dead_code)]

pub mod packet;

use std::path::Path;

pub use redirector::testbed::*;

/// The agent binary built for these tests.
pub fn agent_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_redirector"))
}
