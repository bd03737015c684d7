//! Datapath configuration written by the agent at start-up.

/// Array of one [`Config`].
pub const CONFIG_MAP: &str = "CONFIG_V1";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Config {
    /// Service CIDR base address, network byte order. Traffic to an address in
    /// the CIDR that no service uses is dropped, as kube-proxy's nftables mode
    /// does, instead of being routed onward. 0/0 (both zero) disables the check.
    pub service_cidr_addr: u32,
    /// Service CIDR netmask, network byte order.
    pub service_cidr_mask: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 8);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
unsafe impl aya::Pod for Config {}
