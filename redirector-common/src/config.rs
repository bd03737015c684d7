//! Datapath configuration written by the agent: at start-up, and again
//! whenever the service ranges change.

/// Array of one [`Config`].
pub const CONFIG_MAP: &str = "CONFIG_V2";

/// Service ranges the datapath holds (a cluster has one or two IPv4 ranges;
/// more ServiceCIDR objects are rare).
pub const MAX_SERVICE_CIDRS: usize = 4;

/// One IPv4 service range.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ServiceCidr {
    /// Base address with the host bits cleared, network byte order.
    pub addr: u32,
    /// Netmask, network byte order. A zero mask matches nothing, so a range
    /// read while the agent rewrites the entry never matches every address.
    pub mask: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceCidr>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Config {
    /// How many of `service_cidrs` are in use (the first ones), host byte
    /// order, at most [`MAX_SERVICE_CIDRS`]. Traffic to an address in a range
    /// that no service uses is dropped, as kube-proxy's nftables mode does,
    /// instead of being routed onward; 0 disables the check.
    pub service_cidr_count: u32,
    /// The ranges; unused ones are zero. No padding: 4 + 4 × 8 bytes.
    pub service_cidrs: [ServiceCidr; MAX_SERVICE_CIDRS],
}
const _: () = assert!(core::mem::size_of::<Config>() == 4 + 8 * MAX_SERVICE_CIDRS);

#[cfg(feature = "user")]
// SAFETY: #[repr(C)], bytemuck::Pod (explicit padding, no invalid bit patterns).
unsafe impl aya::Pod for Config {}
