//! A stand-in for a CNI's own TC program: [`ForeignCounter`] attaches the
//! counting programs of test/foreign-ebpf after whatever is on a pod
//! interface's ingress and egress, so a test can tell whether redirector's
//! programs let every packet go on down the chain.

use aya::Ebpf;
use aya::maps::{MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TcAttachType};

use crate::in_netns;

static FOREIGN_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/foreign"));

/// The attached programs (detached on drop) and their per-hook counts.
pub struct ForeignCounter {
    _ebpf: Ebpf,
    counts: PerCpuArray<MapData, u64>,
}

impl ForeignCounter {
    /// Attaches to `interface` in `netns`, after the programs already there.
    pub fn attach(netns: &str, interface: &str) -> Self {
        let interface = interface.to_owned();
        in_netns(netns, move || {
            let mut ebpf = Ebpf::load(FOREIGN_OBJECT).expect("loading the foreign program");
            for (name, hook) in [
                ("foreign_ingress", TcAttachType::Ingress),
                ("foreign_egress", TcAttachType::Egress),
            ] {
                let program: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .expect("the foreign object has its programs")
                    .try_into()
                    .expect("a classifier");
                program.load().expect("loading the foreign program");
                program
                    .attach(&interface, hook)
                    .unwrap_or_else(|e| panic!("attaching {name} to {interface}: {e}"));
            }
            let counts = PerCpuArray::try_from(ebpf.take_map("FOREIGN_COUNTS").expect("the counts map"))
                .expect("a per-CPU array");
            Self { _ebpf: ebpf, counts }
        })
    }

    /// Packets seen so far on (ingress, egress).
    pub fn counts(&self) -> (u64, u64) {
        let total = |slot| {
            self.counts
                .get(&slot, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .expect("reading the foreign counts")
        };
        (total(0), total(1))
    }
}
