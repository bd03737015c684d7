//! A stand-in for a CNI's own TC program (Cilium's, Calico's) attached
//! after redirector's on a pod interface: it counts every packet it sees, per
//! hook, and lets it go on. If redirector ended the TC chain, these counts
//! would fall behind redirector's own.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC, macros::classifier, macros::map, maps::PerCpuArray, programs::TcContext,
};

/// Slot 0: packets seen on ingress; slot 1: on egress.
#[map]
static FOREIGN_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

#[classifier]
pub fn foreign_ingress(_ctx: TcContext) -> i32 {
    count(0)
}

#[classifier]
pub fn foreign_egress(_ctx: TcContext) -> i32 {
    count(1)
}

#[inline(always)]
fn count(slot: u32) -> i32 {
    if let Some(count) = FOREIGN_COUNTS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot: no other writer while the program runs.
        unsafe { *count += 1 };
    }
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
